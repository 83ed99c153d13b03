//! What a stream record says changed, read from its keys and new image: which item, and
//! its new content. What that means for a cached entry is [`crate::coherence`]'s business.

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use crate::store::keys::{
    split_kv_partition_key, KV_KEY, KV_TIMESTAMP, KV_VALUE, LOG_COUNTER_INDEX, LOG_INDEX,
    LOG_TOPIC, LOG_VALUE,
};
use crate::store::StoreTable;
use crate::stream::api::{Attr, Event, Image, Record};

/// A value's digest: SHA-256 cut to 128 bits, the same on every host, so that a change
/// relayed without its value can still be matched against what a cache holds.
pub type Digest = [u8; 16];

/// The digest of `value`.
pub fn digest(value: &[u8]) -> Digest {
    let full = Sha256::digest(value);
    let mut d = [0; 16];
    d.copy_from_slice(&full[..16]);
    d
}

/// A changed item's new value: the bytes (read from the stream) or only their digest
/// (relayed by another host).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    Bytes(Bytes),
    Digest(Digest),
}

impl Content {
    /// Whether `value` is this content.
    pub fn matches(&self, value: &[u8]) -> bool {
        match self {
            Content::Bytes(b) => b == value,
            Content::Digest(d) => digest(value) == *d,
        }
    }

    pub fn digest(&self) -> Digest {
        match self {
            Content::Bytes(b) => digest(b),
            Content::Digest(d) => *d,
        }
    }
}

/// What a record means for the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Version `ts` of a key now holds `value` (`None`: it was removed).
    KvVersion {
        ns: String,
        key: Bytes,
        ts: i64,
        value: Option<Content>,
    },
    /// Version `ts` of a key changed, but the record does not say to what.
    KvUnknown { ns: String, key: Bytes, ts: i64 },
    /// Entry `index` of a topic now holds `value` (`None`: it was removed).
    LogEntry {
        topic: String,
        index: i64,
        value: Option<Content>,
    },
    /// A topic's counter is now `position` (`None`: the topic was deleted).
    LogCounter {
        topic: String,
        position: Option<i64>,
    },
}

impl Change {
    /// Reads a record of `table`; `None` for items this daemon does not write (another
    /// key encoding, another layout), which it never caches either.
    pub fn of(table: StoreTable, record: &Record) -> Option<Change> {
        let removed = record.event == Event::Remove;
        let image = record.new_image.as_ref().filter(|_| !removed);
        match table {
            StoreTable::Kv => {
                let pk = bin(&record.keys, KV_KEY)?;
                let ts = num(&record.keys, KV_TIMESTAMP)?;
                let (ns, key) = split_kv_partition_key(&pk)?;
                let ns = String::from_utf8(ns.to_vec()).ok()?;
                let key = pk.slice_ref(key);
                Some(match (removed, image.and_then(|i| bin(i, KV_VALUE))) {
                    (true, _) => Change::KvVersion {
                        ns,
                        key,
                        ts,
                        value: None,
                    },
                    (false, Some(value)) => Change::KvVersion {
                        ns,
                        key,
                        ts,
                        value: Some(Content::Bytes(value)),
                    },
                    (false, None) => Change::KvUnknown { ns, key, ts },
                })
            }
            StoreTable::Log => {
                let topic = match record.keys.get(LOG_TOPIC)? {
                    Attr::S(s) => s.clone(),
                    _ => return None,
                };
                let index = num(&record.keys, LOG_INDEX)?;
                if index == LOG_COUNTER_INDEX {
                    let position = if removed {
                        None
                    } else {
                        Some(num(image?, LOG_VALUE)?)
                    };
                    Some(Change::LogCounter { topic, position })
                } else {
                    let value = if removed {
                        None
                    } else {
                        Some(Content::Bytes(bin(image?, LOG_VALUE)?))
                    };
                    Some(Change::LogEntry {
                        topic,
                        index,
                        value,
                    })
                }
            }
        }
    }
}

fn bin(image: &Image, name: &str) -> Option<Bytes> {
    match image.get(name)? {
        Attr::B(b) => Some(b.clone()),
        _ => None,
    }
}

fn num(image: &Image, name: &str) -> Option<i64> {
    match image.get(name)? {
        Attr::N(n) => n.parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::keys::kv_partition_key;

    fn kv_record(event: Event, ns: &str, key: &[u8], ts: i64, value: Option<&[u8]>) -> Record {
        let pk = Bytes::from(kv_partition_key(ns, key).unwrap());
        let keys = Image::from([
            (KV_KEY.to_owned(), Attr::B(pk.clone())),
            (KV_TIMESTAMP.to_owned(), Attr::N(ts.to_string())),
        ]);
        let new_image = value.map(|v| {
            let mut image = keys.clone();
            image.insert(KV_VALUE.to_owned(), Attr::B(Bytes::copy_from_slice(v)));
            image
        });
        Record {
            sequence_number: "1".into(),
            event,
            keys,
            new_image,
            old_image: None,
        }
    }

    fn log_record(event: Event, topic: &str, index: i64, value: Option<Attr>) -> Record {
        let keys = Image::from([
            (LOG_TOPIC.to_owned(), Attr::S(topic.into())),
            (LOG_INDEX.to_owned(), Attr::N(index.to_string())),
        ]);
        let new_image = value.map(|v| {
            let mut image = keys.clone();
            image.insert(LOG_VALUE.to_owned(), v);
            image
        });
        Record {
            sequence_number: "1".into(),
            event,
            keys,
            new_image,
            old_image: None,
        }
    }

    #[test]
    fn records_of_both_tables_parse() {
        let r = kv_record(Event::Insert, "ns", b"k", 5, Some(b"v"));
        assert_eq!(
            Change::of(StoreTable::Kv, &r),
            Some(Change::KvVersion {
                ns: "ns".into(),
                key: Bytes::from_static(b"k"),
                ts: 5,
                value: Some(Content::Bytes(Bytes::from_static(b"v")))
            })
        );
        let r = kv_record(Event::Remove, "ns", b"k", 5, None);
        assert!(matches!(
            Change::of(StoreTable::Kv, &r),
            Some(Change::KvVersion { value: None, .. })
        ));
        let r = kv_record(Event::Modify, "ns", b"k", 5, None);
        assert!(matches!(
            Change::of(StoreTable::Kv, &r),
            Some(Change::KvUnknown { .. })
        ));
        let r = log_record(Event::Modify, "t", -1, Some(Attr::N("7".into())));
        assert_eq!(
            Change::of(StoreTable::Log, &r),
            Some(Change::LogCounter {
                topic: "t".into(),
                position: Some(7)
            })
        );
        let r = log_record(
            Event::Insert,
            "t",
            7,
            Some(Attr::B(Bytes::from_static(b"e"))),
        );
        assert!(matches!(
            Change::of(StoreTable::Log, &r),
            Some(Change::LogEntry {
                index: 7,
                value: Some(_),
                ..
            })
        ));
        // A key in zio-flow's own encoding (no length prefix) is not ours.
        let mut r = kv_record(Event::Insert, "ns", b"k", 5, Some(b"v"));
        r.keys
            .insert(KV_KEY.into(), Attr::B(Bytes::from_static(b"nsk")));
        assert_eq!(Change::of(StoreTable::Kv, &r), None);
    }
}
