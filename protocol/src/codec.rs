//! Bytes <-> messages: the frame codec and the MessagePack bodies.
//!
//! Frames are tokio-util's length-delimited frames: a 4-byte big-endian length that does
//! not count itself, then that many bytes of body. Decoding a body never panics: anything
//! that is not a well-formed request becomes a [`RequestError`] carrying the code to answer
//! with and, when it could be read, the request id to answer to.

use bytes::Bytes;
use tokio_util::codec::LengthDelimitedCodec;

use crate::error::ErrorCode;
use crate::message::{
    Reply, Request, ResponseFrame, WireIdOnly, WireRequestIn, WireRequestOut, WireResponseOut,
};

/// The length-delimited codec both sides use, refusing frames larger than `max_frame_bytes`.
pub fn frame_codec(max_frame_bytes: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .big_endian()
        .max_frame_length(max_frame_bytes)
        .new_codec()
}

/// Whether an I/O error from the frame codec means the peer announced an oversized frame.
pub fn is_frame_too_large(err: &std::io::Error) -> bool {
    err.get_ref()
        .is_some_and(|e| e.is::<tokio_util::codec::LengthDelimitedCodecError>())
}

/// Why a request body could not be turned into a [`Request`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct RequestError {
    /// The request id, when it could be read; the error response is addressed to it.
    pub id: Option<u64>,
    pub code: ErrorCode,
    pub message: String,
}

/// Encodes a request body (without the length prefix).
pub fn encode_request(id: u64, request: &Request) -> Bytes {
    let mut w = WireRequestOut {
        id,
        op: request.op().name(),
        ..Default::default()
    };
    match request {
        Request::Hello { version, client } => {
            w.version = Some(*version);
            w.client = client.as_deref();
        }
        Request::Ping | Request::Health => {}
        Request::KvPut { ns, key, value, ts } => {
            w.ns = Some(ns);
            w.key = Some(key);
            w.value = Some(value);
            w.ts = Some(*ts);
        }
        Request::KvGet {
            ns,
            key,
            before,
            consistent,
        } => {
            w.ns = Some(ns);
            w.key = Some(key);
            w.before = *before;
            w.consistent = *consistent;
        }
        Request::KvLatestTs { ns, key } | Request::KvTimestamps { ns, key } => {
            w.ns = Some(ns);
            w.key = Some(key);
        }
        Request::KvScan { ns, keys_only } => {
            w.ns = Some(ns);
            w.keys_only = *keys_only;
        }
        Request::KvDelete { ns, key, marker } => {
            w.ns = Some(ns);
            w.key = Some(key);
            w.marker = *marker;
        }
        Request::LogPut { topic, value } => {
            w.topic = Some(topic);
            w.value = Some(value);
        }
        Request::LogPosition { topic } | Request::LogDelete { topic } => w.topic = Some(topic),
        Request::LogScan { topic, from, until } => {
            w.topic = Some(topic);
            w.from = Some(*from);
            w.until = Some(*until);
        }
    }
    to_msgpack(&w)
}

/// Decodes a request body, checking every field the operation needs.
pub fn decode_request(body: &[u8]) -> Result<(u64, Request), RequestError> {
    let w: WireRequestIn = rmp_serde::from_slice(body).map_err(|e| RequestError {
        // The body did not decode as a whole; its id may still be readable.
        id: rmp_serde::from_slice::<WireIdOnly>(body)
            .ok()
            .and_then(|w| w.id),
        code: ErrorCode::Malformed,
        message: format!("request body is not a valid request map: {e}"),
    })?;
    let Some(id) = w.id else {
        return Err(RequestError {
            id: None,
            code: ErrorCode::Malformed,
            message: "request has no `id` field".into(),
        });
    };
    let mut fields = Fields { id, w };
    let request = fields.request()?;
    Ok((id, request))
}

/// Checks and takes the fields of one decoded request map.
struct Fields {
    id: u64,
    w: WireRequestIn,
}

impl Fields {
    fn request(&mut self) -> Result<Request, RequestError> {
        let op = self
            .w
            .op
            .take()
            .ok_or_else(|| self.malformed("request has no `op` field"))?;
        Ok(match op.as_str() {
            "hello" => Request::Hello {
                version: self.need("hello", "version", |w| w.version.take())?,
                client: self.w.client.take(),
            },
            "ping" => Request::Ping,
            "health" => Request::Health,
            "kv.put" => Request::KvPut {
                ns: self.name("kv.put", "ns")?,
                key: self.key("kv.put")?,
                value: self
                    .need("kv.put", "value", |w| w.value.take())?
                    .into_vec()
                    .into(),
                ts: self.need("kv.put", "ts", |w| w.ts.take())?,
            },
            "kv.get" => Request::KvGet {
                ns: self.name("kv.get", "ns")?,
                key: self.key("kv.get")?,
                before: self.w.before,
                consistent: self.w.consistent.unwrap_or(false),
            },
            "kv.latest_ts" => Request::KvLatestTs {
                ns: self.name("kv.latest_ts", "ns")?,
                key: self.key("kv.latest_ts")?,
            },
            "kv.timestamps" => Request::KvTimestamps {
                ns: self.name("kv.timestamps", "ns")?,
                key: self.key("kv.timestamps")?,
            },
            "kv.scan" => Request::KvScan {
                ns: self.name("kv.scan", "ns")?,
                keys_only: self.w.keys_only.unwrap_or(false),
            },
            "kv.delete" => Request::KvDelete {
                ns: self.name("kv.delete", "ns")?,
                key: self.key("kv.delete")?,
                marker: self.w.marker,
            },
            "log.put" => Request::LogPut {
                topic: self.name("log.put", "topic")?,
                value: self
                    .need("log.put", "value", |w| w.value.take())?
                    .into_vec()
                    .into(),
            },
            "log.position" => Request::LogPosition {
                topic: self.name("log.position", "topic")?,
            },
            "log.scan" => Request::LogScan {
                topic: self.name("log.scan", "topic")?,
                from: self.need("log.scan", "from", |w| w.from.take())?,
                until: self.need("log.scan", "until", |w| w.until.take())?,
            },
            "log.delete" => Request::LogDelete {
                topic: self.name("log.delete", "topic")?,
            },
            other => {
                return Err(RequestError {
                    id: Some(self.id),
                    code: ErrorCode::UnknownOperation,
                    message: format!("unknown operation `{}`", other.escape_debug()),
                })
            }
        })
    }

    fn malformed(&self, message: &str) -> RequestError {
        RequestError {
            id: Some(self.id),
            code: ErrorCode::Malformed,
            message: message.into(),
        }
    }

    fn invalid(&self, message: String) -> RequestError {
        RequestError {
            id: Some(self.id),
            code: ErrorCode::InvalidArgument,
            message,
        }
    }

    fn need<T>(
        &mut self,
        op: &str,
        field: &str,
        take: impl FnOnce(&mut WireRequestIn) -> Option<T>,
    ) -> Result<T, RequestError> {
        take(&mut self.w).ok_or_else(|| self.invalid(format!("{op} needs field `{field}`")))
    }

    /// A namespace or topic: present, non-empty, UTF-8.
    fn name(&mut self, op: &str, field: &str) -> Result<String, RequestError> {
        let raw = match field {
            "ns" => self.w.ns.take(),
            _ => self.w.topic.take(),
        };
        let raw = raw.ok_or_else(|| self.invalid(format!("{op} needs field `{field}`")))?;
        if raw.is_empty() {
            return Err(self.invalid(format!("`{field}` must not be empty")));
        }
        String::from_utf8(raw.into_vec())
            .map_err(|e| self.invalid(format!("`{field}` is not valid UTF-8: {e}")))
    }

    /// A key: present and non-empty.
    fn key(&mut self, op: &str) -> Result<Bytes, RequestError> {
        let key = self.need(op, "key", |w| w.key.take())?;
        if key.is_empty() {
            return Err(self.invalid("`key` must not be empty".into()));
        }
        Ok(key.into_vec().into())
    }
}

/// Encodes a response body addressed to `id` (`None` when the request id is unknown).
pub fn encode_reply(id: Option<u64>, reply: &Reply) -> Bytes {
    let mut w = WireResponseOut {
        id,
        ..Default::default()
    };
    match reply {
        Reply::Hello {
            version,
            server,
            max_frame_bytes,
        } => {
            w.version = Some(*version);
            w.server = Some(server);
            w.max_frame_bytes = Some(*max_frame_bytes);
        }
        Reply::Done => {}
        Reply::Health { ready, detail } => {
            w.ready = Some(*ready);
            w.detail = Some(detail);
        }
        Reply::Value(v) => {
            w.found = Some(v.is_some());
            if let Some(v) = v {
                w.ts = Some(v.ts);
                w.value = Some(&v.value);
            }
        }
        Reply::Timestamp(ts) => {
            w.found = Some(ts.is_some());
            w.ts = *ts;
        }
        Reply::Index(i) => w.index = Some(*i),
        Reply::Items { items, more } => {
            w.items = Some(items);
            w.more = Some(*more);
        }
        Reply::Error(e) => {
            w.code = e.raw_code;
            w.message = Some(&e.message);
        }
    }
    to_msgpack(&w)
}

/// Decodes a response body.
pub fn decode_response(body: &[u8]) -> Result<ResponseFrame, rmp_serde::decode::Error> {
    rmp_serde::from_slice(body)
}

fn to_msgpack<T: serde::Serialize>(value: &T) -> Bytes {
    // Serializing these plain structs into a Vec cannot fail: every field is a number,
    // string, bytes or a sequence of them, and a Vec grows as needed.
    rmp_serde::to_vec_named(value)
        .expect("a request or response map always serializes")
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Item, Items, Versioned};

    fn roundtrip(req: Request) {
        let body = encode_request(42, &req);
        assert_eq!(decode_request(&body), Ok((42, req)));
    }

    #[test]
    fn every_request_roundtrips() {
        let key = Bytes::from_static(b"\x00k\xff");
        for req in [
            Request::Hello {
                version: 1,
                client: Some("t".into()),
            },
            Request::Ping,
            Request::KvPut {
                ns: "n".into(),
                key: key.clone(),
                value: Bytes::new(),
                ts: -5,
            },
            Request::KvGet {
                ns: "n".into(),
                key: key.clone(),
                before: Some(i64::MIN),
                consistent: true,
            },
            Request::KvGet {
                ns: "n".into(),
                key: key.clone(),
                before: None,
                consistent: false,
            },
            Request::KvLatestTs {
                ns: "n".into(),
                key: key.clone(),
            },
            Request::KvTimestamps {
                ns: "n".into(),
                key: key.clone(),
            },
            Request::KvScan {
                ns: "n".into(),
                keys_only: true,
            },
            Request::KvDelete {
                ns: "n".into(),
                key: key.clone(),
                marker: Some(3),
            },
            Request::LogPut {
                topic: "t".into(),
                value: key.clone(),
            },
            Request::LogPosition { topic: "t".into() },
            Request::LogScan {
                topic: "t".into(),
                from: 1,
                until: i64::MAX,
            },
            Request::LogDelete { topic: "t".into() },
        ] {
            roundtrip(req);
        }
    }

    #[test]
    fn every_reply_decodes() {
        let decode = |reply: &Reply| {
            let f = decode_response(&encode_reply(Some(3), reply)).unwrap();
            assert_eq!(f.id, Some(3));
            f
        };
        let f = decode(&Reply::Done);
        assert_eq!((f.code, f.found), (0, None));
        let value = Versioned {
            ts: 7,
            value: Bytes::from_static(b"v"),
        };
        let f = decode(&Reply::Value(Some(value)));
        assert_eq!((f.found, f.ts), (Some(true), Some(7)));
        assert_eq!(f.value.as_deref().map(|v| &v[..]), Some(&b"v"[..]));
        let f = decode(&Reply::Value(None));
        assert_eq!((f.found, f.value), (Some(false), None));
        assert_eq!(decode(&Reply::Index(9)).index, Some(9));
        let f = decode(&Reply::error(ErrorCode::Conflict, "x"));
        assert_eq!((f.code, f.message.as_deref()), (19, Some("x")));
    }

    #[test]
    fn items_decode_by_shape() {
        let b = |s: &'static [u8]| Bytes::from_static(s);
        for (items, want) in [
            (
                Items::Timestamps(vec![-1, 2]),
                vec![Item::Int(-1), Item::Int(2)],
            ),
            (Items::Keys(vec![b(b"a")]), vec![Item::Bin(b(b"a"))]),
            (
                Items::Entries(vec![(b(b"k"), b(b""))]),
                vec![Item::Pair(b(b"k"), b(b""))],
            ),
        ] {
            let f = decode_response(&encode_reply(Some(1), &Reply::Items { items, more: true }))
                .unwrap();
            assert_eq!(f.items, Some(want));
            assert_eq!(f.more, Some(true));
        }
    }

    #[test]
    fn bad_bodies_get_codes_not_panics() {
        // Not MessagePack at all.
        let e = decode_request(b"\xc1garbage").unwrap_err();
        assert_eq!((e.id, e.code), (None, ErrorCode::Malformed));
        // A map with an id but a field of the wrong type keeps the id.
        let body = rmp_serde::to_vec_named(&serde_json_like::Bad { id: 5, ts: "x" }).unwrap();
        let e = decode_request(&body).unwrap_err();
        assert_eq!((e.id, e.code), (Some(5), ErrorCode::Malformed));
        // Unknown operation.
        let body = rmp_serde::to_vec_named(&serde_json_like::Op {
            id: 6,
            op: "kv.frobnicate",
        })
        .unwrap();
        let e = decode_request(&body).unwrap_err();
        assert_eq!((e.id, e.code), (Some(6), ErrorCode::UnknownOperation));
    }

    #[test]
    fn invalid_arguments_are_named() {
        let cases: [(Request, &str); 4] = [
            (
                Request::KvGet {
                    ns: String::new(),
                    key: Bytes::from_static(b"k"),
                    before: None,
                    consistent: false,
                },
                "`ns` must not be empty",
            ),
            (
                Request::KvGet {
                    ns: "n".into(),
                    key: Bytes::new(),
                    before: None,
                    consistent: false,
                },
                "`key` must not be empty",
            ),
            (
                Request::LogPosition {
                    topic: String::new(),
                },
                "`topic` must not be empty",
            ),
            (
                Request::LogPut {
                    topic: "t".into(),
                    value: Bytes::new(),
                },
                "",
            ),
        ];
        for (req, msg) in cases {
            let got = decode_request(&encode_request(1, &req));
            if msg.is_empty() {
                assert!(got.is_ok(), "{req:?}: {got:?}");
            } else {
                let e = got.unwrap_err();
                assert_eq!(
                    (e.code, e.message.as_str()),
                    (ErrorCode::InvalidArgument, msg)
                );
            }
        }
    }

    #[test]
    fn non_utf8_namespace_is_invalid_argument() {
        // A MessagePack str whose bytes are not UTF-8 (0xff), as a careless client may send.
        let mut body = vec![0x84];
        body.extend(b"\xa2id\x01\xa2op\xa6kv.get\xa2ns\xa1\xff\xa3key\xc4\x01k");
        let e = decode_request(&body).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}");
        assert!(e.message.contains("UTF-8"), "{e}");
    }

    mod serde_json_like {
        #[derive(serde::Serialize)]
        pub struct Bad {
            pub id: u64,
            pub ts: &'static str,
        }
        #[derive(serde::Serialize)]
        pub struct Op {
            pub id: u64,
            pub op: &'static str,
        }
    }
}

/// The hex dumps in `docs/PROTOCOL.md` are what this codec produces, byte for byte.
#[cfg(test)]
mod documented_examples {
    use super::*;
    use crate::message::{Items, Versioned};

    fn framed_hex(body: &[u8]) -> String {
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(body);
        frame
            .chunks(16)
            .map(|line| {
                line.iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn protocol_md_hex_dumps_match_the_codec() {
        let doc = include_str!("../../docs/PROTOCOL.md");
        let b = Bytes::from_static;
        let examples = [
            encode_request(
                0,
                &Request::Hello {
                    version: 1,
                    client: Some("py".into()),
                },
            ),
            encode_reply(
                Some(0),
                &Reply::Hello {
                    version: 1,
                    server: "ddbcached 0.1.0".into(),
                    max_frame_bytes: 1048576,
                },
            ),
            encode_request(
                7,
                &Request::KvGet {
                    ns: "flow1".into(),
                    key: b(b"x"),
                    before: Some(5),
                    consistent: false,
                },
            ),
            encode_reply(
                Some(7),
                &Reply::Value(Some(Versioned {
                    ts: 3,
                    value: b(b"hi"),
                })),
            ),
            encode_reply(Some(7), &Reply::Value(None)),
            encode_request(
                8,
                &Request::LogPut {
                    topic: "t".into(),
                    value: b(b"e1"),
                },
            ),
            encode_reply(Some(8), &Reply::Index(1)),
            encode_reply(
                Some(9),
                &Reply::error(ErrorCode::UnknownOperation, "unknown operation `kv.nope`"),
            ),
            encode_reply(
                Some(10),
                &Reply::Items {
                    items: Items::Entries(vec![(b(b"a"), b(b"1"))]),
                    more: false,
                },
            ),
        ];
        for body in examples {
            let dump = framed_hex(&body);
            assert!(
                doc.contains(&format!("```\n{dump}\n```")),
                "PROTOCOL.md lacks:\n{dump}"
            );
        }
    }

    #[test]
    fn protocol_md_lists_every_error_code() {
        let doc = include_str!("../../docs/PROTOCOL.md");
        for code in ErrorCode::ALL {
            let row = format!("| {} | `{}` |", code.as_u16(), code.name());
            assert!(doc.contains(&row), "PROTOCOL.md lacks the row {row}");
        }
    }
}
