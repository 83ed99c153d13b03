//! What travels through a table's Redis stream, and how it is encoded: MessagePack (the
//! protocol's encoding) in one field, and, when a shared key is configured, an
//! HMAC-SHA256 of those bytes in another. An entry that does not decode or whose MAC is
//! wrong is never interpreted: the consumer counts it as a gap.
//!
//! Values never travel: a change carries its item's key and the digest of its new value,
//! enough to recognise an own write's echo and to keep an entry that already shows it.
//!
//! Every host receives every entry, so entries are kept small: variants are tagged with
//! one letter, senders are named by a random 64-bit number per daemon process (not by
//! host name), a batch that follows its relay's previous batch of the shard does not
//! repeat the sequence number it follows, and the MAC is HMAC-SHA256 truncated to 128
//! bits (RFC 2104's truncation; forging one still takes 2^128 guesses). In a list of
//! facts or keys, a namespace or topic is written once before the run of elements that
//! share it ([`shared_names`]).

use std::collections::BTreeMap;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::api::cache::ItemChange;
use crate::cache::{CacheKey, KeyParts};
use crate::stream::api::StartAt;
use crate::stream::change::{Change, Content, Digest};

/// The Redis stream field holding the encoded entry.
pub const FIELD_ENTRY: &str = "e";
/// The Redis stream field holding the entry's MAC.
pub const FIELD_MAC: &str = "m";
/// Bytes of the MAC kept (of HMAC-SHA256's 32).
const MAC_BYTES: usize = 16;

/// One entry of a table's stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    /// Published by a relay: numbered `n` = 1, 2, ... per relay and lease epoch, so that
    /// a consumer can see a missing one.
    #[serde(rename = "r")]
    Relay {
        /// The relay process's incarnation number.
        relay: u64,
        epoch: u64,
        n: u64,
        event: Event,
    },
    /// Published by a daemon after DynamoDB acknowledged writes of these keys.
    #[serde(rename = "h")]
    Hint {
        /// The writing daemon's incarnation number.
        from: u64,
        #[serde(with = "shared_names")]
        keys: Vec<Key>,
    },
}

/// What a relay saw on the table's stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// The records of one poll of one shard, read from just after `prev`; `last` is the
    /// sequence number of the last one.
    #[serde(rename = "b")]
    Batch {
        shard: String,
        prev: Prev,
        last: String,
        #[serde(with = "shared_names")]
        facts: Vec<Fact>,
    },
    /// The shard is closed and read to its end.
    #[serde(rename = "e")]
    End { shard: String },
    /// Continuity lost: some changes were never published. `cause` names a
    /// [`crate::stream::FlushCause`].
    #[serde(rename = "x")]
    Reset { cause: String },
    /// Every record visible on the stream at `t_ms` (the relay's wall clock, read before
    /// the poll round began) has been published; `shards` are the relay's positions.
    #[serde(rename = "w")]
    Watermark {
        t_ms: u64,
        shards: BTreeMap<String, String>,
    },
}

/// Where a batch's records follow from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Prev {
    #[serde(rename = "t")]
    TrimHorizon,
    #[serde(rename = "l")]
    Latest,
    #[serde(rename = "a")]
    After(String),
    /// Just after the `last` of the same relay's previous batch of the shard, in the
    /// same epoch (whose contiguous numbering shows that batch was not lost).
    #[serde(rename = "s")]
    Same,
}

impl From<&StartAt> for Prev {
    fn from(start: &StartAt) -> Prev {
        match start {
            StartAt::TrimHorizon => Prev::TrimHorizon,
            StartAt::Latest => Prev::Latest,
            StartAt::After(seq) => Prev::After(seq.clone()),
        }
    }
}

/// A change, without its value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fact {
    #[serde(rename = "v")]
    KvVersion {
        ns: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        ts: i64,
        #[serde(with = "serde_bytes")]
        digest: Option<Digest>,
    },
    #[serde(rename = "u")]
    KvUnknown {
        ns: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        ts: i64,
    },
    #[serde(rename = "l")]
    LogEntry {
        topic: String,
        index: i64,
        #[serde(with = "serde_bytes")]
        digest: Option<Digest>,
    },
    #[serde(rename = "c")]
    LogCounter {
        topic: String,
        position: Option<i64>,
    },
    /// A change of an item of a table the DynamoDB API front caches: what it touched,
    /// as the front's cache keys it ([`crate::api::cache::Scope`]).
    #[serde(rename = "i")]
    Item {
        /// The item's canonical key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// Its partition key's canonical bytes.
        #[serde(with = "serde_bytes")]
        partition: Vec<u8>,
        /// The global index partitions it left or entered: index name, partition key.
        global: Vec<(String, serde_bytes::ByteBuf)>,
    },
    /// A change of a cached table's item whose key this relay could not read: whatever
    /// it touched is unknown. (Not a unit variant: that encodes as a bare string, which a
    /// list of shared names reads as a name.)
    #[serde(rename = "?")]
    ItemUnknown {},
}

impl From<&Change> for Fact {
    fn from(change: &Change) -> Fact {
        match change {
            Change::KvVersion { ns, key, ts, value } => Fact::KvVersion {
                ns: ns.clone(),
                key: key.to_vec(),
                ts: *ts,
                digest: value.as_ref().map(Content::digest),
            },
            Change::KvUnknown { ns, key, ts } => Fact::KvUnknown {
                ns: ns.clone(),
                key: key.to_vec(),
                ts: *ts,
            },
            Change::LogEntry {
                topic,
                index,
                value,
            } => Fact::LogEntry {
                topic: topic.clone(),
                index: *index,
                digest: value.as_ref().map(Content::digest),
            },
            Change::LogCounter { topic, position } => Fact::LogCounter {
                topic: topic.clone(),
                position: *position,
            },
        }
    }
}

/// An API item's fact: its change, or that some unreadable change happened (`None`).
impl From<Option<ItemChange>> for Fact {
    fn from(change: Option<ItemChange>) -> Fact {
        match change {
            Some(c) => Fact::Item {
                key: c.key,
                partition: c.partition,
                global: c
                    .global
                    .into_iter()
                    .map(|(index, key)| (index, serde_bytes::ByteBuf::from(key)))
                    .collect(),
            },
            None => Fact::ItemUnknown {},
        }
    }
}

impl Fact {
    /// The API item change this fact tells of: `Some(None)` for an unreadable one, `None`
    /// for a store's fact.
    pub fn item_change(self) -> Option<Option<ItemChange>> {
        match self {
            Fact::Item {
                key,
                partition,
                global,
            } => Some(Some(ItemChange {
                key,
                partition,
                global: global
                    .into_iter()
                    .map(|(index, key)| (index, key.into_vec()))
                    .collect(),
            })),
            Fact::ItemUnknown {} => Some(None),
            _ => None,
        }
    }
}

/// A store's change from its fact; a DynamoDB API item's fact is given back.
impl TryFrom<Fact> for Change {
    type Error = Fact;

    fn try_from(fact: Fact) -> Result<Change, Fact> {
        Ok(match fact {
            Fact::KvVersion {
                ns,
                key,
                ts,
                digest,
            } => Change::KvVersion {
                ns,
                key: Bytes::from(key),
                ts,
                value: digest.map(Content::Digest),
            },
            Fact::KvUnknown { ns, key, ts } => Change::KvUnknown {
                ns,
                key: Bytes::from(key),
                ts,
            },
            Fact::LogEntry {
                topic,
                index,
                digest,
            } => Change::LogEntry {
                topic,
                index,
                value: digest.map(Content::Digest),
            },
            Fact::LogCounter { topic, position } => Change::LogCounter { topic, position },
            item @ (Fact::Item { .. } | Fact::ItemUnknown {}) => return Err(item),
        })
    }
}

/// A written item's cache key, as a hint names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Key {
    #[serde(rename = "k")]
    Kv {
        ns: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    #[serde(rename = "l")]
    Log { topic: String },
    /// An item of a table the DynamoDB API front caches, written through a front: its
    /// canonical key and partition key.
    #[serde(rename = "i")]
    Item {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        partition: Vec<u8>,
    },
    /// A write through a front whose items it could not make out (PartiQL): anything of
    /// the table may have changed. Not a unit variant, which would encode as a bare
    /// string and be read as a shared name.
    #[serde(rename = "u")]
    Unread {},
}

impl From<&CacheKey> for Key {
    fn from(key: &CacheKey) -> Key {
        match key.parts() {
            KeyParts::Kv { ns, key } => Key::Kv {
                ns: ns.to_owned(),
                key: key.to_vec(),
            },
            KeyParts::Log { topic } => Key::Log {
                topic: topic.to_owned(),
            },
        }
    }
}

/// A store's key from a hint's; a DynamoDB API item's key is given back.
impl TryFrom<Key> for CacheKey {
    type Error = Key;

    fn try_from(key: Key) -> Result<CacheKey, Key> {
        match key {
            Key::Kv { ns, key } => Ok(CacheKey::kv(&ns, &key)),
            Key::Log { topic } => Ok(CacheKey::log(&topic)),
            other @ (Key::Item { .. } | Key::Unread {}) => Err(other),
        }
    }
}

/// What names the item a fact or key is of: its namespace or topic (`None` for a
/// DynamoDB API item, which has neither).
trait Named {
    fn name(&self) -> Option<&str>;
    fn name_mut(&mut self) -> Option<&mut String>;
}

impl Named for Fact {
    fn name(&self) -> Option<&str> {
        match self {
            Fact::KvVersion { ns, .. } | Fact::KvUnknown { ns, .. } => Some(ns),
            Fact::LogEntry { topic, .. } | Fact::LogCounter { topic, .. } => Some(topic),
            Fact::Item { .. } | Fact::ItemUnknown {} => None,
        }
    }
    fn name_mut(&mut self) -> Option<&mut String> {
        match self {
            Fact::KvVersion { ns, .. } | Fact::KvUnknown { ns, .. } => Some(ns),
            Fact::LogEntry { topic, .. } | Fact::LogCounter { topic, .. } => Some(topic),
            Fact::Item { .. } | Fact::ItemUnknown {} => None,
        }
    }
}

impl Named for Key {
    fn name(&self) -> Option<&str> {
        match self {
            Key::Kv { ns, .. } => Some(ns),
            Key::Log { topic } => Some(topic),
            Key::Item { .. } | Key::Unread {} => None,
        }
    }
    fn name_mut(&mut self) -> Option<&mut String> {
        match self {
            Key::Kv { ns, .. } => Some(ns),
            Key::Log { topic } => Some(topic),
            Key::Item { .. } | Key::Unread {} => None,
        }
    }
}

/// A list of facts or keys with each name written once before the run of elements that
/// share it (a batch's changes are mostly of one namespace); the elements carry it empty.
mod shared_names {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::Named;

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Item<T> {
        /// The name of the elements that follow.
        Name(String),
        Element(T),
    }

    pub fn serialize<T, S>(elements: &[T], s: S) -> Result<S::Ok, S::Error>
    where
        T: Named + Clone + Serialize,
        S: Serializer,
    {
        let mut items = Vec::with_capacity(elements.len() + 1);
        let mut current: Option<&str> = None;
        for element in elements {
            let mut bare = element.clone();
            if let Some(name) = element.name() {
                if current != Some(name) {
                    items.push(Item::Name(name.to_owned()));
                    current = Some(name);
                }
                bare.name_mut().map(String::clear);
            }
            items.push(Item::Element(bare));
        }
        items.serialize(s)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<Vec<T>, D::Error>
    where
        T: Named + Deserialize<'de>,
        D: Deserializer<'de>,
    {
        let mut elements = Vec::new();
        let mut current: Option<String> = None;
        for item in Vec::<Item<T>>::deserialize(d)? {
            match item {
                Item::Name(name) => current = Some(name),
                Item::Element(mut element) => {
                    if let Some(own) = element.name_mut() {
                        let name = current
                            .as_ref()
                            .ok_or_else(|| D::Error::custom("an element before any name"))?;
                        if !own.is_empty() {
                            return Err(D::Error::custom("an element with a name of its own"));
                        }
                        own.clone_from(name);
                    }
                    elements.push(element);
                }
            }
        }
        Ok(elements)
    }
}

/// Why an entry was not interpreted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("the entry has no `{FIELD_ENTRY}` field")]
    Missing,
    #[error("the entry's MAC is missing or wrong")]
    Unauthenticated,
    #[error("the entry does not decode: {0}")]
    Malformed(String),
}

/// Encodes and authenticates entries with the fleet's shared key (if any).
#[derive(Clone)]
pub struct Codec {
    key: Option<Hmac<Sha256>>,
}

impl Codec {
    /// `auth_key` empty: entries are neither signed nor checked.
    pub fn new(auth_key: &str) -> Codec {
        Codec {
            key: (!auth_key.is_empty()).then(|| {
                Hmac::<Sha256>::new_from_slice(auth_key.as_bytes())
                    .expect("HMAC takes keys of any length")
            }),
        }
    }

    /// The fields of the stream entry: the encoded entry, and its MAC if signed.
    pub fn encode(&self, entry: &Entry) -> Vec<(&'static str, Vec<u8>)> {
        let bytes = rmp_serde::to_vec(entry).expect("entries always encode");
        let mut fields = Vec::with_capacity(2);
        if let Some(key) = &self.key {
            let mut mac = key.clone();
            mac.update(&bytes);
            fields.push((FIELD_MAC, mac.finalize().into_bytes()[..MAC_BYTES].to_vec()));
        }
        fields.push((FIELD_ENTRY, bytes));
        fields
    }

    /// Reads an entry from its fields (`field(name)` gives a field's bytes).
    pub fn decode<'a>(
        &self,
        field: impl Fn(&str) -> Option<&'a [u8]>,
    ) -> Result<Entry, DecodeError> {
        let bytes = field(FIELD_ENTRY).ok_or(DecodeError::Missing)?;
        if let Some(key) = &self.key {
            let mut mac = key.clone();
            mac.update(bytes);
            let given = field(FIELD_MAC).ok_or(DecodeError::Unauthenticated)?;
            if given.len() != MAC_BYTES {
                return Err(DecodeError::Unauthenticated);
            }
            mac.verify_truncated_left(given)
                .map_err(|_| DecodeError::Unauthenticated)?;
        }
        rmp_serde::from_slice(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))
    }
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(codec: &Codec, fields: &[(&'static str, Vec<u8>)]) -> Result<Entry, DecodeError> {
        codec.decode(|name| {
            fields
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.as_slice())
        })
    }

    fn batch() -> Entry {
        let change = Change::KvVersion {
            ns: "ns".into(),
            key: Bytes::from_static(b"k"),
            ts: 3,
            value: Some(Content::Bytes(Bytes::from_static(b"v"))),
        };
        Entry::Relay {
            relay: 1,
            epoch: 2,
            n: 7,
            event: Event::Batch {
                shard: "s".into(),
                prev: Prev::After("10".into()),
                last: "12".into(),
                facts: vec![Fact::from(&change)],
            },
        }
    }

    #[test]
    fn entries_round_trip_and_keep_only_a_digest_of_values() {
        let codec = Codec::new("");
        let fields = codec.encode(&batch());
        assert_eq!(fields.len(), 1, "unsigned");
        // The digest travels as 16 raw bytes (MessagePack bin), not as 16 integers.
        let d = crate::stream::change::digest(b"v");
        assert!(fields[0].1.windows(16).any(|w| w == d));
        let back = decode(&codec, &fields).unwrap();
        assert_eq!(back, batch());
        let Entry::Relay {
            event: Event::Batch { facts, .. },
            ..
        } = back
        else {
            unreachable!()
        };
        let change = Change::try_from(facts[0].clone()).unwrap();
        let Change::KvVersion { value: Some(v), .. } = change else {
            unreachable!()
        };
        assert!(v.matches(b"v") && !v.matches(b"w"));
    }

    #[test]
    fn names_shared_by_neighbours_are_written_once() {
        let fact = |ns: &str, key: &[u8]| Fact::KvUnknown {
            ns: ns.into(),
            key: key.to_vec(),
            ts: 1,
        };
        let facts = vec![
            fact("a-long-namespace", b"1"),
            fact("a-long-namespace", b"2"),
            fact("", b"3"),
            fact("a-long-namespace", b"4"),
            Fact::LogCounter {
                topic: "a-long-namespace".into(),
                position: Some(1),
            },
        ];
        let entry = |facts| Entry::Relay {
            relay: 1,
            epoch: 1,
            n: 1,
            event: Event::Batch {
                shard: "s".into(),
                prev: Prev::Same,
                last: "1".into(),
                facts,
            },
        };
        let codec = Codec::new("");
        let fields = codec.encode(&entry(facts.clone()));
        let name = b"a-long-namespace";
        let times = fields[0]
            .1
            .windows(name.len())
            .filter(|w| w == name)
            .count();
        assert_eq!(times, 2, "once before the empty name, once after");
        assert_eq!(decode(&codec, &fields).unwrap(), entry(facts));
        let keys = vec![
            Key::Kv {
                ns: "n".into(),
                key: b"k".to_vec(),
            },
            Key::Item {
                key: b"ik".to_vec(),
                partition: b"ip".to_vec(),
            },
            Key::Unread {},
            Key::Log { topic: "t".into() },
        ];
        let hint = Entry::Hint { from: 1, keys };
        assert_eq!(decode(&codec, &codec.encode(&hint)).unwrap(), hint);
    }

    #[test]
    fn api_item_facts_travel_among_named_ones() {
        let change = ItemChange {
            key: vec![1, 2],
            partition: vec![1],
            global: vec![("byColor".into(), vec![3])],
        };
        let unknown = |key: &[u8]| Fact::KvUnknown {
            ns: "n".into(),
            key: key.to_vec(),
            ts: 1,
        };
        let facts = vec![
            unknown(b"1"),
            Fact::from(Some(change.clone())),
            Fact::ItemUnknown {},
            unknown(b"2"),
        ];
        let entry = Entry::Relay {
            relay: 1,
            epoch: 1,
            n: 1,
            event: Event::Batch {
                shard: "s".into(),
                prev: Prev::Same,
                last: "1".into(),
                facts: facts.clone(),
            },
        };
        let codec = Codec::new("");
        assert_eq!(decode(&codec, &codec.encode(&entry)).unwrap(), entry);
        assert_eq!(facts[1].clone().item_change(), Some(Some(change)));
        assert_eq!(facts[2].clone().item_change(), Some(None));
        assert_eq!(facts[0].clone().item_change(), None);
        assert!(Change::try_from(facts[1].clone()).is_err());
    }

    #[test]
    fn a_list_whose_names_do_not_resolve_is_malformed() {
        use rmpv::Value;
        // A key with no name before it, and one that carries its own.
        let key = |ns: &str| {
            Value::Map(vec![(
                "k".into(),
                Value::Array(vec![ns.into(), Value::Binary(b"k".to_vec())]),
            )])
        };
        let decoded = |keys: Vec<Value>| {
            let hint = Value::Map(vec![(
                "h".into(),
                Value::Array(vec![1.into(), Value::Array(keys)]),
            )]);
            let mut bytes = Vec::new();
            rmpv::encode::write_value(&mut bytes, &hint).unwrap();
            decode(&Codec::new(""), &[(FIELD_ENTRY, bytes)])
        };
        for keys in [vec![key("")], vec!["n".into(), key("n")]] {
            assert!(matches!(decoded(keys), Err(DecodeError::Malformed(_))));
        }
        // The same, well formed, decodes.
        assert!(decoded(vec!["n".into(), key("")]).is_ok());
    }

    #[test]
    fn a_signed_entry_is_checked() {
        let codec = Codec::new("secret");
        let mut fields = codec.encode(&batch());
        assert_eq!(decode(&codec, &fields).unwrap(), batch());
        assert_eq!(
            decode(&Codec::new("other"), &fields),
            Err(DecodeError::Unauthenticated)
        );
        // Unsigned, or tampered with: refused.
        let unsigned = Codec::new("").encode(&batch());
        assert_eq!(decode(&codec, &unsigned), Err(DecodeError::Unauthenticated));
        fields.last_mut().unwrap().1[3] ^= 1;
        assert_eq!(decode(&codec, &fields), Err(DecodeError::Unauthenticated));
        // Garbage is malformed, not a panic.
        let garbage = vec![(FIELD_ENTRY, vec![0xc1, 0xff])];
        assert!(matches!(
            decode(&Codec::new(""), &garbage),
            Err(DecodeError::Malformed(_))
        ));
    }
}
