//! The messages of the protocol: typed requests and replies, and their MessagePack maps.
//!
//! Every frame body is one MessagePack map with string keys. Requests carry `id` and `op`
//! plus the operation's fields; responses carry `id` and `code` plus the result's fields.
//! The typed enums here are what both sides program against; the `Wire*` structs are the
//! exact maps on the wire, kept private so the two cannot drift apart.

use bytes::Bytes;
use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_bytes::ByteBuf;

use crate::error::{ErrorCode, ServerError};

/// The protocol version this crate speaks (sent in `hello`).
pub const PROTOCOL_VERSION: u32 = 1;

/// A request, as the server acts on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// First frame of every connection: the client's protocol version.
    Hello {
        version: u32,
        client: Option<String>,
    },
    /// Liveness check; answered with an empty success.
    Ping,
    /// Readiness: whether the daemon serves from its cache with its stream tailers
    /// positioned.
    Health,
    /// Store `value` as the version `ts` of `key` in namespace `ns`.
    KvPut {
        ns: String,
        key: Bytes,
        value: Bytes,
        ts: i64,
    },
    /// The newest version of `key` (with `ts <= before` when given). `consistent` asks to
    /// bypass any cache and read DynamoDB directly.
    KvGet {
        ns: String,
        key: Bytes,
        before: Option<i64>,
        consistent: bool,
    },
    /// The largest timestamp of `key`.
    KvLatestTs { ns: String, key: Bytes },
    /// Every timestamp of `key`, ascending (streamed).
    KvTimestamps { ns: String, key: Bytes },
    /// Every key of `ns` with its newest value, or only the keys (streamed).
    KvScan { ns: String, keys_only: bool },
    /// Delete all versions of `key`, or with a marker all but the newest `<= marker` and
    /// those `> marker`.
    KvDelete {
        ns: String,
        key: Bytes,
        marker: Option<i64>,
    },
    /// Append `value` to `topic`; answers the new 1-based index.
    LogPut { topic: String, value: Bytes },
    /// The last allocated index of `topic` (0 when none).
    LogPosition { topic: String },
    /// The values at indices `from..=until` of `topic` (streamed).
    LogScan {
        topic: String,
        from: i64,
        until: i64,
    },
    /// Remove `topic` and all its entries.
    LogDelete { topic: String },
}

/// An operation: a closed set, with the wire name of each (also its metrics label) and
/// an index for tables of counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Hello,
    Ping,
    Health,
    KvPut,
    KvGet,
    KvLatestTs,
    KvTimestamps,
    KvScan,
    KvDelete,
    LogPut,
    LogPosition,
    LogScan,
    LogDelete,
}

impl Op {
    pub const ALL: [Op; 13] = [
        Op::Hello,
        Op::Ping,
        Op::Health,
        Op::KvPut,
        Op::KvGet,
        Op::KvLatestTs,
        Op::KvTimestamps,
        Op::KvScan,
        Op::KvDelete,
        Op::LogPut,
        Op::LogPosition,
        Op::LogScan,
        Op::LogDelete,
    ];

    /// The name on the wire (`kv.get`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Op::Hello => "hello",
            Op::Ping => "ping",
            Op::Health => "health",
            Op::KvPut => "kv.put",
            Op::KvGet => "kv.get",
            Op::KvLatestTs => "kv.latest_ts",
            Op::KvTimestamps => "kv.timestamps",
            Op::KvScan => "kv.scan",
            Op::KvDelete => "kv.delete",
            Op::LogPut => "log.put",
            Op::LogPosition => "log.position",
            Op::LogScan => "log.scan",
            Op::LogDelete => "log.delete",
        }
    }

    /// The position in [`Op::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl Request {
    /// The operation (its `name()` is the `op` field).
    pub fn op(&self) -> Op {
        match self {
            Request::Hello { .. } => Op::Hello,
            Request::Ping => Op::Ping,
            Request::Health => Op::Health,
            Request::KvPut { .. } => Op::KvPut,
            Request::KvGet { .. } => Op::KvGet,
            Request::KvLatestTs { .. } => Op::KvLatestTs,
            Request::KvTimestamps { .. } => Op::KvTimestamps,
            Request::KvScan { .. } => Op::KvScan,
            Request::KvDelete { .. } => Op::KvDelete,
            Request::LogPut { .. } => Op::LogPut,
            Request::LogPosition { .. } => Op::LogPosition,
            Request::LogScan { .. } => Op::LogScan,
            Request::LogDelete { .. } => Op::LogDelete,
        }
    }
}

/// A request as decoded from its frame. The reads a cache can answer at once borrow their
/// namespace, key or topic from the frame, so answering them copies nothing; every other
/// request is read into an owned [`Request`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestRef<'a> {
    /// [`Request::KvGet`], borrowed.
    KvGet {
        ns: &'a str,
        key: &'a [u8],
        before: Option<i64>,
        consistent: bool,
    },
    /// [`Request::KvLatestTs`], borrowed.
    KvLatestTs { ns: &'a str, key: &'a [u8] },
    /// [`Request::LogPosition`], borrowed.
    LogPosition { topic: &'a str },
    /// Any other request.
    Owned(Request),
}

impl RequestRef<'_> {
    /// The operation.
    pub fn op(&self) -> Op {
        match self {
            RequestRef::KvGet { .. } => Op::KvGet,
            RequestRef::KvLatestTs { .. } => Op::KvLatestTs,
            RequestRef::LogPosition { .. } => Op::LogPosition,
            RequestRef::Owned(r) => r.op(),
        }
    }

    /// The same request, owning its fields.
    pub fn into_owned(self) -> Request {
        match self {
            RequestRef::KvGet {
                ns,
                key,
                before,
                consistent,
            } => Request::KvGet {
                ns: ns.to_owned(),
                key: Bytes::copy_from_slice(key),
                before,
                consistent,
            },
            RequestRef::KvLatestTs { ns, key } => Request::KvLatestTs {
                ns: ns.to_owned(),
                key: Bytes::copy_from_slice(key),
            },
            RequestRef::LogPosition { topic } => Request::LogPosition {
                topic: topic.to_owned(),
            },
            RequestRef::Owned(r) => r,
        }
    }
}

/// One version of a key: its timestamp and value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned {
    pub ts: i64,
    pub value: Bytes,
}

/// A piece of a streamed result. All items of one stream are of the same kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Items {
    /// `kv.timestamps`: integers.
    Timestamps(Vec<i64>),
    /// `kv.scan` with `keys_only`: binary keys.
    Keys(Vec<Bytes>),
    /// `log.scan`: binary values in index order.
    Values(Vec<Bytes>),
    /// `kv.scan`: `[key, value]` pairs.
    Entries(Vec<(Bytes, Bytes)>),
}

impl Items {
    /// Number of items in this piece.
    pub fn len(&self) -> usize {
        match self {
            Items::Timestamps(v) => v.len(),
            Items::Keys(v) | Items::Values(v) => v.len(),
            Items::Entries(v) => v.len(),
        }
    }

    /// Whether the piece holds no item.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A reply, as the server produces it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Answer to `hello`.
    Hello {
        version: u32,
        server: String,
        max_frame_bytes: u64,
    },
    /// Success with no data (`ping`, `kv.put`, `kv.delete`, `log.delete`).
    Done,
    /// Answer to `health`.
    Health { ready: bool, detail: String },
    /// `kv.get`: the version found, if any.
    Value(Option<Versioned>),
    /// `kv.latest_ts`: the largest timestamp, if any.
    Timestamp(Option<i64>),
    /// `log.put` (the new index) and `log.position`.
    Index(i64),
    /// One piece of a streamed result; `more` is false on the last piece.
    Items { items: Items, more: bool },
    /// An error response.
    Error(ServerError),
}

impl Reply {
    /// An error reply.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Reply {
        Reply::Error(ServerError::new(code, message))
    }
}

/// A request map as it is sent (borrowing, so encoding copies nothing twice).
#[derive(Serialize, Default)]
pub(crate) struct WireRequestOut<'a> {
    pub id: u64,
    pub op: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ns: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none", with = "serde_bytes")]
    pub key: Option<&'a [u8]>,
    #[serde(skip_serializing_if = "Option::is_none", with = "serde_bytes")]
    pub value: Option<&'a [u8]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ts: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub marker: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<i64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub consistent: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub keys_only: bool,
}

/// A request map as it is received, borrowing from the frame: every field optional,
/// checked per operation after decoding so that errors can name the field and echo the
/// request id. Namespaces and topics arrive as bytes so that invalid UTF-8 is reported as
/// such, not as a decode error. Byte fields accept a bin or a str, as documented.
#[derive(Deserialize, Default)]
pub(crate) struct WireRequestIn<'a> {
    pub id: Option<u64>,
    #[serde(borrow)]
    pub op: Option<&'a str>,
    pub version: Option<u32>,
    #[serde(borrow)]
    pub client: Option<&'a str>,
    #[serde(borrow, default, with = "serde_bytes")]
    pub ns: Option<&'a [u8]>,
    #[serde(borrow, default, with = "serde_bytes")]
    pub topic: Option<&'a [u8]>,
    #[serde(borrow, default, with = "serde_bytes")]
    pub key: Option<&'a [u8]>,
    #[serde(borrow, default, with = "serde_bytes")]
    pub value: Option<&'a [u8]>,
    pub ts: Option<i64>,
    pub before: Option<i64>,
    pub marker: Option<i64>,
    pub from: Option<i64>,
    pub until: Option<i64>,
    pub consistent: Option<bool>,
    pub keys_only: Option<bool>,
}

/// Only the id of a request whose other fields did not decode, to address the error.
#[derive(Deserialize)]
pub(crate) struct WireIdOnly {
    pub id: Option<u64>,
}

/// A response map as it is sent.
#[derive(Serialize, Default)]
pub(crate) struct WireResponseOut<'a> {
    pub id: Option<u64>,
    pub code: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_frame_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub found: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ts: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none", with = "serde_bytes")]
    pub value: Option<&'a [u8]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub items: Option<&'a Items>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub more: Option<bool>,
}

/// A response map as it is received; [`crate::codec::Response`] reads it as a [`Reply`].
#[derive(Deserialize, Clone, Debug, Default)]
pub(crate) struct WireResponseIn {
    /// The request id this answers; nil when the request's id could not be read.
    pub id: Option<u64>,
    /// 0 on success, otherwise an [`ErrorCode`] number.
    pub code: u16,
    pub message: Option<String>,
    pub version: Option<u32>,
    pub server: Option<String>,
    pub max_frame_bytes: Option<u64>,
    pub ready: Option<bool>,
    pub detail: Option<String>,
    pub found: Option<bool>,
    pub ts: Option<i64>,
    pub value: Option<ByteBuf>,
    pub index: Option<i64>,
    pub items: Option<Vec<Item>>,
    pub more: Option<bool>,
}

impl WireResponseIn {
    /// The error this frame carries, if it is an error response.
    pub fn error(&self) -> Option<ServerError> {
        (self.code != 0).then(|| ServerError {
            raw_code: self.code,
            code: self.code.into(),
            message: self.message.clone().unwrap_or_default(),
        })
    }
}

/// One element of a received `items` array, whatever the stream's kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Item {
    Int(i64),
    Bin(Bytes),
    Pair(Bytes, Bytes),
}

impl Serialize for Items {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(self.len()))?;
        match self {
            Items::Timestamps(v) => {
                for ts in v {
                    seq.serialize_element(ts)?;
                }
            }
            Items::Keys(v) | Items::Values(v) => {
                for b in v {
                    seq.serialize_element(serde_bytes::Bytes::new(b))?;
                }
            }
            Items::Entries(v) => {
                for (k, val) in v {
                    seq.serialize_element(&(
                        serde_bytes::Bytes::new(k),
                        serde_bytes::Bytes::new(val),
                    ))?;
                }
            }
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for Item {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Item, D::Error> {
        struct ItemVisitor;
        impl<'de> Visitor<'de> for ItemVisitor {
            type Value = Item;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an integer, a binary, or a [binary, binary] pair")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Item, E> {
                Ok(Item::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Item, E> {
                i64::try_from(v)
                    .map(Item::Int)
                    .map_err(|_| E::custom("integer item out of i64 range"))
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Item, E> {
                Ok(Item::Bin(Bytes::copy_from_slice(v)))
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Item, E> {
                Ok(Item::Bin(Bytes::from(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Item, E> {
                self.visit_bytes(v.as_bytes())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Item, A::Error> {
                let k: ByteBuf = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(0, &self))?;
                let v: ByteBuf = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(1, &self))?;
                if seq.next_element::<de::IgnoredAny>()?.is_some() {
                    return Err(de::Error::invalid_length(3, &self));
                }
                Ok(Item::Pair(
                    Bytes::from(k.into_vec()),
                    Bytes::from(v.into_vec()),
                ))
            }
        }
        d.deserialize_any(ItemVisitor)
    }
}
