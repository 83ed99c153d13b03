//! Bytes <-> messages: the frame codec and the MessagePack bodies.
//!
//! Frames are tokio-util's length-delimited frames: a 4-byte big-endian length that does
//! not count itself, then that many bytes of body. Decoding a body never panics: anything
//! that is not a well-formed request becomes a [`RequestError`] carrying the code to answer
//! with and, when it could be read, the request id to answer to.
//!
//! Requests decode into a typed [`Request`]; responses into a typed [`Reply`] in two
//! steps, since the wire format does not name the operation a response answers:
//! [`decode_response`] reads the map (and its id, to route it), then
//! [`Response::into_reply`] reads it as the answer to its request.

use bytes::Bytes;
use tokio_util::codec::LengthDelimitedCodec;

use crate::error::ErrorCode;
use crate::message::{
    Item, Items, Reply, Request, RequestRef, Versioned, WireIdOnly, WireRequestIn, WireRequestOut,
    WireResponseIn, WireResponseOut,
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

/// Bytes of a frame's length prefix.
pub const FRAME_HEADER_BYTES: usize = 4;

/// A frame whose length prefix announces more than the reader accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a frame of {announced} bytes exceeds the limit of {limit}")]
pub struct FrameTooLarge {
    pub announced: usize,
    pub limit: usize,
}

/// The body length of the frame at the start of `buf` once all of it is there (`None`
/// while it is incomplete), read the way [`frame_codec`] reads it: a prefix announcing more
/// than `max_frame_bytes` is refused as soon as the prefix is in, before any body.
pub fn complete_frame(buf: &[u8], max_frame_bytes: usize) -> Result<Option<usize>, FrameTooLarge> {
    let Some(prefix) = buf.first_chunk::<FRAME_HEADER_BYTES>() else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(*prefix) as usize;
    if len > max_frame_bytes {
        return Err(FrameTooLarge {
            announced: len,
            limit: max_frame_bytes,
        });
    }
    Ok((buf.len() - FRAME_HEADER_BYTES >= len).then_some(len))
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
    decode_fields(body).map(|(id, request)| (id, request.into_owned()))
}

/// Decodes a request body like [`decode_request`], borrowing what the reads a cache can
/// answer need from `body` instead of copying it. Those reads are first tried on a fast
/// path ([`scan_cacheable_read`]).
pub fn decode_request_ref(body: &[u8]) -> Result<(u64, RequestRef<'_>), RequestError> {
    match scan_cacheable_read(body) {
        Some(read) => Ok(read),
        None => decode_fields(body),
    }
}

/// The full decoder: the map through serde, then each operation's fields checked.
fn decode_fields(body: &[u8]) -> Result<(u64, RequestRef<'_>), RequestError> {
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

/// The fast path of [`decode_request_ref`]: a well-formed `kv.get`, `kv.latest_ts` or
/// `log.position` map (only their fields, each once, of the documented types) read with
/// MessagePack's primitives, field names compared as bytes. Anything else, including
/// every invalid request, is `None` and left to the full decoder, which reads the same
/// body to the same request or names what is wrong with it; so this path only has to be
/// right about what it accepts.
fn scan_cacheable_read(body: &[u8]) -> Option<(u64, RequestRef<'_>)> {
    use rmp::decode::{read_bool, read_int, read_map_len, read_marker};
    use rmp::Marker;

    /// A str or bin, borrowed.
    fn bytes<'a>(rd: &mut &'a [u8]) -> Option<&'a [u8]> {
        let len = match read_marker(rd).ok()? {
            Marker::FixStr(n) => usize::from(n),
            Marker::Str8 | Marker::Bin8 => {
                usize::from(rmp::decode::RmpRead::read_data_u8(rd).ok()?)
            }
            Marker::Str16 | Marker::Bin16 => {
                usize::from(rmp::decode::RmpRead::read_data_u16(rd).ok()?)
            }
            Marker::Str32 | Marker::Bin32 => {
                usize::try_from(rmp::decode::RmpRead::read_data_u32(rd).ok()?).ok()?
            }
            _ => return None,
        };
        let (value, rest) = rd.split_at_checked(len)?;
        *rd = rest;
        Some(value)
    }

    /// A namespace or topic: non-empty UTF-8.
    fn name(raw: Option<&[u8]>) -> Option<&str> {
        std::str::from_utf8(raw.filter(|n| !n.is_empty())?).ok()
    }

    let mut rd = body;
    let (mut id, mut op, mut ns, mut key, mut topic) = (None, None, None, None, None);
    let (mut before, mut consistent) = (None, None);
    for _ in 0..read_map_len(&mut rd).ok()? {
        let field = bytes(&mut rd)?;
        let fresh = match field {
            b"id" => id.replace(read_int::<u64, _>(&mut rd).ok()?).is_none(),
            b"op" => op.replace(bytes(&mut rd)?).is_none(),
            b"ns" => ns.replace(bytes(&mut rd)?).is_none(),
            b"key" => key.replace(bytes(&mut rd)?).is_none(),
            b"topic" => topic.replace(bytes(&mut rd)?).is_none(),
            b"before" => before.replace(read_int::<i64, _>(&mut rd).ok()?).is_none(),
            b"consistent" => consistent.replace(read_bool(&mut rd).ok()?).is_none(),
            _ => false,
        };
        if !fresh {
            return None;
        }
    }
    if !rd.is_empty() {
        return None;
    }
    let key = key.filter(|k| !k.is_empty());
    let request = match op? {
        b"kv.get" if topic.is_none() => RequestRef::KvGet {
            ns: name(ns)?,
            key: key?,
            before,
            consistent: consistent.unwrap_or(false),
        },
        b"kv.latest_ts" if topic.is_none() && before.is_none() && consistent.is_none() => {
            RequestRef::KvLatestTs {
                ns: name(ns)?,
                key: key?,
            }
        }
        b"log.position"
            if ns.is_none() && key.is_none() && before.is_none() && consistent.is_none() =>
        {
            RequestRef::LogPosition {
                topic: name(topic)?,
            }
        }
        _ => return None,
    };
    Some((id?, request))
}

/// Checks and takes the fields of one decoded request map.
struct Fields<'a> {
    id: u64,
    w: WireRequestIn<'a>,
}

impl<'a> Fields<'a> {
    fn request(&mut self) -> Result<RequestRef<'a>, RequestError> {
        let op = self
            .w
            .op
            .take()
            .ok_or_else(|| self.malformed("request has no `op` field"))?;
        let owned = match op {
            "kv.get" => {
                return Ok(RequestRef::KvGet {
                    ns: self.name("kv.get", "ns")?,
                    key: self.key("kv.get")?,
                    before: self.w.before,
                    consistent: self.w.consistent.unwrap_or(false),
                })
            }
            "kv.latest_ts" => {
                return Ok(RequestRef::KvLatestTs {
                    ns: self.name("kv.latest_ts", "ns")?,
                    key: self.key("kv.latest_ts")?,
                })
            }
            "log.position" => {
                return Ok(RequestRef::LogPosition {
                    topic: self.name("log.position", "topic")?,
                })
            }
            "hello" => Request::Hello {
                version: self.need("hello", "version", |w| w.version.take())?,
                client: self.w.client.take().map(str::to_owned),
            },
            "ping" => Request::Ping,
            "health" => Request::Health,
            "kv.put" => Request::KvPut {
                ns: self.name("kv.put", "ns")?.to_owned(),
                key: Bytes::copy_from_slice(self.key("kv.put")?),
                value: Bytes::copy_from_slice(self.need("kv.put", "value", |w| w.value.take())?),
                ts: self.need("kv.put", "ts", |w| w.ts.take())?,
            },
            "kv.timestamps" => Request::KvTimestamps {
                ns: self.name("kv.timestamps", "ns")?.to_owned(),
                key: Bytes::copy_from_slice(self.key("kv.timestamps")?),
            },
            "kv.scan" => Request::KvScan {
                ns: self.name("kv.scan", "ns")?.to_owned(),
                keys_only: self.w.keys_only.unwrap_or(false),
            },
            "kv.delete" => Request::KvDelete {
                ns: self.name("kv.delete", "ns")?.to_owned(),
                key: Bytes::copy_from_slice(self.key("kv.delete")?),
                marker: self.w.marker,
            },
            "log.put" => Request::LogPut {
                topic: self.name("log.put", "topic")?.to_owned(),
                value: Bytes::copy_from_slice(self.need("log.put", "value", |w| w.value.take())?),
            },
            "log.scan" => Request::LogScan {
                topic: self.name("log.scan", "topic")?.to_owned(),
                from: self.need("log.scan", "from", |w| w.from.take())?,
                until: self.need("log.scan", "until", |w| w.until.take())?,
            },
            "log.delete" => Request::LogDelete {
                topic: self.name("log.delete", "topic")?.to_owned(),
            },
            other => {
                return Err(RequestError {
                    id: Some(self.id),
                    code: ErrorCode::UnknownOperation,
                    message: format!("unknown operation `{}`", other.escape_debug()),
                })
            }
        };
        Ok(RequestRef::Owned(owned))
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
        take: impl FnOnce(&mut WireRequestIn<'a>) -> Option<T>,
    ) -> Result<T, RequestError> {
        take(&mut self.w).ok_or_else(|| self.invalid(format!("{op} needs field `{field}`")))
    }

    /// A namespace or topic: present, non-empty, UTF-8.
    fn name(&mut self, op: &str, field: &str) -> Result<&'a str, RequestError> {
        let raw = match field {
            "ns" => self.w.ns.take(),
            _ => self.w.topic.take(),
        };
        let raw = raw.ok_or_else(|| self.invalid(format!("{op} needs field `{field}`")))?;
        if raw.is_empty() {
            return Err(self.invalid(format!("`{field}` must not be empty")));
        }
        std::str::from_utf8(raw)
            .map_err(|e| self.invalid(format!("`{field}` is not valid UTF-8: {e}")))
    }

    /// A key: present and non-empty.
    fn key(&mut self, op: &str) -> Result<&'a [u8], RequestError> {
        let key = self.need(op, "key", |w| w.key.take())?;
        if key.is_empty() {
            return Err(self.invalid("`key` must not be empty".into()));
        }
        Ok(key)
    }
}

/// Encodes a response body addressed to `id` (`None` when the request id is unknown).
pub fn encode_reply(id: Option<u64>, reply: &Reply) -> Bytes {
    let mut body = Vec::new();
    write_reply_body(&mut body, id, reply);
    body.into()
}

/// Appends a whole response frame (length prefix and body) addressed to `id` to `out`:
/// a server answers into one buffer and writes many frames with one system call.
pub fn write_reply(out: &mut Vec<u8>, id: Option<u64>, reply: &Reply) {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
    write_reply_body(out, id, reply);
    let len = u32::try_from(out.len() - start - FRAME_HEADER_BYTES)
        .expect("a reply frame is smaller than 4 GiB");
    out[start..start + FRAME_HEADER_BYTES].copy_from_slice(&len.to_be_bytes());
}

/// Appends a whole frame holding `body` to `out`.
pub fn write_frame(out: &mut Vec<u8>, body: &[u8]) {
    let len = u32::try_from(body.len()).expect("a frame is smaller than 4 GiB");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
}

fn write_reply_body(out: &mut Vec<u8>, id: Option<u64>, reply: &Reply) {
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
    to_msgpack_into(out, &w)
}

/// Why a response body could not be read as a reply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("the response is not a MessagePack map of the documented shape: {0}")]
    Malformed(String),
    #[error("the {op} answer lacks `{field}`")]
    Missing {
        op: &'static str,
        field: &'static str,
    },
    #[error("the {op} answer has items of the wrong kind")]
    WrongItems { op: &'static str },
}

/// A response body as received: its id, to route it to the request it answers, and the
/// rest, to read as that request's [`Reply`].
#[derive(Clone, Debug)]
pub struct Response {
    wire: WireResponseIn,
}

impl Response {
    /// The id of the request this answers; `None` when the server could not read it.
    pub fn id(&self) -> Option<u64> {
        self.wire.id
    }

    /// Whether this is an error response.
    pub fn is_error(&self) -> bool {
        self.wire.code != 0
    }

    /// Whether no further frame answers the same request: an error, or anything but a
    /// streamed piece with `more: true`.
    pub fn is_last(&self) -> bool {
        self.is_error() || !self.wire.more.unwrap_or(false)
    }

    /// The reply, read as the answer to `request`; an error response is `Reply::Error`
    /// whatever the request.
    pub fn into_reply(self, request: &Request) -> Result<Reply, ResponseError> {
        let w = self.wire;
        if let Some(e) = w.error() {
            return Ok(Reply::Error(e));
        }
        let op = request.op().name();
        let missing = |field| ResponseError::Missing { op, field };
        Ok(match request {
            Request::Hello { .. } => Reply::Hello {
                version: w.version.ok_or_else(|| missing("version"))?,
                server: w.server.ok_or_else(|| missing("server"))?,
                max_frame_bytes: w
                    .max_frame_bytes
                    .ok_or_else(|| missing("max_frame_bytes"))?,
            },
            Request::Ping
            | Request::KvPut { .. }
            | Request::KvDelete { .. }
            | Request::LogDelete { .. } => Reply::Done,
            Request::Health => Reply::Health {
                ready: w.ready.ok_or_else(|| missing("ready"))?,
                detail: w.detail.unwrap_or_default(),
            },
            Request::KvGet { .. } => Reply::Value(match (w.found, w.ts, w.value) {
                (Some(true), Some(ts), Some(value)) => Some(Versioned {
                    ts,
                    value: value.into_vec().into(),
                }),
                (Some(false), _, _) => None,
                _ => return Err(missing("found, ts and value")),
            }),
            Request::KvLatestTs { .. } => Reply::Timestamp(match (w.found, w.ts) {
                (Some(true), Some(ts)) => Some(ts),
                (Some(false), _) => None,
                _ => return Err(missing("found and ts")),
            }),
            Request::LogPut { .. } | Request::LogPosition { .. } => {
                Reply::Index(w.index.ok_or_else(|| missing("index"))?)
            }
            Request::KvTimestamps { .. } | Request::KvScan { .. } | Request::LogScan { .. } => {
                Reply::Items {
                    items: items_of(request, w.items.unwrap_or_default())?,
                    more: w.more.unwrap_or(false),
                }
            }
        })
    }
}

/// Decodes a response body.
pub fn decode_response(body: &[u8]) -> Result<Response, ResponseError> {
    rmp_serde::from_slice(body)
        .map(|wire| Response { wire })
        .map_err(|e| ResponseError::Malformed(e.to_string()))
}

/// The items of a streamed piece, of the kind `request` streams.
fn items_of(request: &Request, items: Vec<Item>) -> Result<Items, ResponseError> {
    fn each<T>(
        items: Vec<Item>,
        op: &'static str,
        pick: fn(Item) -> Option<T>,
    ) -> Result<Vec<T>, ResponseError> {
        items
            .into_iter()
            .map(|i| pick(i).ok_or(ResponseError::WrongItems { op }))
            .collect()
    }
    fn bin(i: Item) -> Option<Bytes> {
        match i {
            Item::Bin(b) => Some(b),
            _ => None,
        }
    }
    let op = request.op().name();
    Ok(match request {
        Request::KvTimestamps { .. } => Items::Timestamps(each(items, op, |i| match i {
            Item::Int(t) => Some(t),
            _ => None,
        })?),
        Request::KvScan {
            keys_only: false, ..
        } => Items::Entries(each(items, op, |i| match i {
            Item::Pair(k, v) => Some((k, v)),
            _ => None,
        })?),
        Request::KvScan { .. } => Items::Keys(each(items, op, bin)?),
        _ => Items::Values(each(items, op, bin)?),
    })
}

fn to_msgpack<T: serde::Serialize>(value: &T) -> Bytes {
    let mut out = Vec::new();
    to_msgpack_into(&mut out, value);
    out.into()
}

fn to_msgpack_into<T: serde::Serialize>(out: &mut Vec<u8>, value: &T) {
    // Serializing these plain structs into a Vec cannot fail: every field is a number,
    // string, bytes or a sequence of them, and a Vec grows as needed.
    rmp_serde::encode::write_named(out, value)
        .expect("a request or response map always serializes");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Items, Versioned};

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
    fn every_reply_roundtrips_as_the_answer_to_its_request() {
        let b = |s: &'static [u8]| Bytes::from_static(s);
        let ns = || "n".to_owned();
        let get = Request::KvGet {
            ns: ns(),
            key: b(b"k"),
            before: None,
            consistent: false,
        };
        let scan = |keys_only| Request::KvScan {
            ns: ns(),
            keys_only,
        };
        let cases = [
            (
                Request::Hello {
                    version: 1,
                    client: None,
                },
                Reply::Hello {
                    version: 1,
                    server: "s".into(),
                    max_frame_bytes: 1 << 20,
                },
            ),
            (Request::Ping, Reply::Done),
            (
                Request::Health,
                Reply::Health {
                    ready: true,
                    detail: "ready".into(),
                },
            ),
            (
                get.clone(),
                Reply::Value(Some(Versioned {
                    ts: -7,
                    value: b(b""),
                })),
            ),
            (get.clone(), Reply::Value(None)),
            (
                Request::KvLatestTs {
                    ns: ns(),
                    key: b(b"k"),
                },
                Reply::Timestamp(Some(i64::MAX)),
            ),
            (Request::LogPosition { topic: "t".into() }, Reply::Index(9)),
            (
                Request::KvTimestamps {
                    ns: ns(),
                    key: b(b"k"),
                },
                Reply::Items {
                    items: Items::Timestamps(vec![-1, 2]),
                    more: true,
                },
            ),
            (
                scan(true),
                Reply::Items {
                    items: Items::Keys(vec![b(b"a")]),
                    more: false,
                },
            ),
            (
                scan(false),
                Reply::Items {
                    items: Items::Entries(vec![(b(b"k"), b(b""))]),
                    more: false,
                },
            ),
            (
                Request::LogScan {
                    topic: "t".into(),
                    from: 1,
                    until: i64::MAX,
                },
                Reply::Items {
                    items: Items::Values(Vec::new()),
                    more: false,
                },
            ),
            (get, Reply::error(ErrorCode::Conflict, "x")),
        ];
        let mut frames = vec![0xee];
        for (request, reply) in cases {
            let body = encode_reply(Some(3), &reply);
            // The same body, framed, appended after what the buffer already holds.
            let at = frames.len();
            write_reply(&mut frames, Some(3), &reply);
            assert_eq!(
                complete_frame(&frames[at..], usize::MAX),
                Ok(Some(body.len()))
            );
            assert_eq!(&frames[at + FRAME_HEADER_BYTES..], &body[..]);
            let r = decode_response(&body).unwrap();
            assert_eq!(r.id(), Some(3));
            assert_eq!(r.is_error(), matches!(reply, Reply::Error(_)));
            assert_eq!(r.into_reply(&request), Ok(reply), "{request:?}");
        }
    }

    #[test]
    fn cacheable_reads_borrow_from_the_frame() {
        let get = Request::KvGet {
            ns: "n".into(),
            key: Bytes::from_static(b"key"),
            before: Some(7),
            consistent: true,
        };
        let body = encode_request(5, &get);
        let (id, borrowed) = decode_request_ref(&body).unwrap();
        let RequestRef::KvGet { key, .. } = borrowed else {
            panic!("{borrowed:?}");
        };
        assert!(
            body.as_ptr_range().contains(&key.as_ptr()),
            "the key was copied"
        );
        assert_eq!((id, borrowed.clone().into_owned()), (5, get));
        for read in [
            Request::KvLatestTs {
                ns: "n".into(),
                key: Bytes::from_static(b"k"),
            },
            Request::LogPosition { topic: "t".into() },
        ] {
            let body = encode_request(1, &read);
            let (_, borrowed) = decode_request_ref(&body).unwrap();
            assert!(!matches!(borrowed, RequestRef::Owned(_)), "{read:?}");
            assert_eq!(borrowed.op(), read.op());
            assert_eq!(borrowed.into_owned(), read);
        }
    }

    #[test]
    fn the_fast_path_reads_what_the_full_decoder_reads() {
        use rmpv::Value;
        let s = |v: &str| Value::from(v);
        let bin = |v: &[u8]| Value::Binary(v.to_vec());
        let get = || {
            vec![
                (s("id"), Value::from(7)),
                (s("op"), s("kv.get")),
                (s("ns"), s("n")),
                (s("key"), bin(b"k")),
            ]
        };
        let with = |extra: Vec<(Value, Value)>| {
            let mut m = get();
            m.extend(extra);
            m
        };
        let without = |field: &str| {
            let mut m = get();
            m.retain(|(k, _)| k.as_str() != Some(field));
            m
        };
        let replaced = |field: &str, v: Value| {
            let mut m = without(field);
            m.push((s(field), v));
            m
        };
        let maps = [
            get(),
            with(vec![
                (s("before"), Value::from(-3)),
                (s("consistent"), Value::from(true)),
            ]),
            replaced("ns", bin(b"n")),
            replaced("key", s("k")),
            replaced("op", bin(b"kv.get")),
            replaced("op", s("kv.latest_ts")),
            replaced("op", s("kv.put")),
            replaced("op", s("KV.GET")),
            vec![
                (s("id"), Value::from(1)),
                (s("op"), s("log.position")),
                (s("topic"), s("t")),
            ],
            vec![
                (s("id"), Value::from(1)),
                (s("op"), s("log.position")),
                (s("ns"), s("t")),
            ],
            // Each of these is refused, or read otherwise, by the full decoder.
            with(vec![(s("id"), Value::from(8))]),
            with(vec![(s("extra"), Value::from(1))]),
            with(vec![(s("before"), Value::Nil)]),
            with(vec![(s("before"), Value::from(u64::MAX))]),
            with(vec![(s("consistent"), Value::from(1))]),
            with(vec![(s("topic"), s("t"))]),
            replaced("op", s("kv.latest_ts"))
                .into_iter()
                .chain([(s("before"), Value::from(1))])
                .collect(),
            replaced("id", Value::from(-1)),
            replaced("id", Value::Nil),
            replaced("ns", s("")),
            replaced("ns", bin(b"\xff")),
            replaced("key", bin(b"")),
            replaced("key", Value::from(vec![Value::from(1)])),
            without("id"),
            without("op"),
            without("ns"),
            without("key"),
        ];
        let mut fast = 0;
        for map in maps {
            let mut body = Vec::new();
            rmpv::encode::write_value(&mut body, &Value::Map(map.clone())).unwrap();
            let full = decode_request(&body);
            let scanned = scan_cacheable_read(&body);
            if let Some((id, read)) = scanned.clone() {
                fast += 1;
                assert_eq!(Ok((id, read.into_owned())), full, "{map:?}");
            }
            assert_eq!(
                decode_request_ref(&body).map(|(id, r)| (id, r.into_owned())),
                full,
                "{map:?}"
            );
            // Trailing bytes are the full decoder's to judge.
            body.push(0xc0);
            assert_eq!(scan_cacheable_read(&body), None, "{map:?}");
        }
        // A key sent as a str that is not UTF-8: both read its bytes.
        let mut body = Vec::new();
        rmp::encode::write_map_len(&mut body, 4).unwrap();
        for (field, value) in [("id", None), ("op", Some("kv.get")), ("ns", Some("n"))] {
            rmp::encode::write_str(&mut body, field).unwrap();
            match value {
                Some(v) => rmp::encode::write_str(&mut body, v).unwrap(),
                None => rmp::encode::write_uint(&mut body, 7).map(drop).unwrap(),
            }
        }
        rmp::encode::write_str(&mut body, "key").unwrap();
        body.extend_from_slice(&[0xa1, 0xff]);
        let full = decode_request(&body);
        assert!(full.is_ok(), "{full:?}");
        let (id, read) = scan_cacheable_read(&body).expect("a well-formed kv.get");
        assert_eq!(Ok((id, read.into_owned())), full);
        assert_eq!(
            fast, 7,
            "the fast path took another number of the good reads"
        );
    }

    #[test]
    fn frames_are_split_as_the_codec_splits_them() {
        assert_eq!(complete_frame(&[0, 0], 8), Ok(None));
        assert_eq!(complete_frame(&[0, 0, 0, 2, 1], 8), Ok(None));
        assert_eq!(complete_frame(&[0, 0, 0, 2, 1, 2, 3], 8), Ok(Some(2)));
        assert_eq!(complete_frame(&[0, 0, 0, 8], 8), Ok(None));
        assert_eq!(
            complete_frame(&[0, 0, 0, 9], 8),
            Err(FrameTooLarge {
                announced: 9,
                limit: 8
            })
        );
    }

    #[test]
    fn a_reply_that_does_not_fit_its_request_is_an_error() {
        let index = decode_response(&encode_reply(Some(1), &Reply::Index(1))).unwrap();
        let get = Request::KvGet {
            ns: "n".into(),
            key: Bytes::from_static(b"k"),
            before: None,
            consistent: false,
        };
        assert!(matches!(
            index.into_reply(&get),
            Err(ResponseError::Missing { op: "kv.get", .. })
        ));
        let keys = Reply::Items {
            items: Items::Keys(vec![Bytes::from_static(b"k")]),
            more: false,
        };
        let keys = decode_response(&encode_reply(Some(1), &keys)).unwrap();
        let timestamps = Request::KvTimestamps {
            ns: "n".into(),
            key: Bytes::from_static(b"k"),
        };
        assert_eq!(
            keys.into_reply(&timestamps),
            Err(ResponseError::WrongItems {
                op: "kv.timestamps"
            })
        );
        assert!(matches!(
            decode_response(b"\xc1"),
            Err(ResponseError::Malformed(_))
        ));
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

/// The shared test vectors (`protocol/vectors.json`, which every client's tests check
/// too) are what this codec reads and writes, byte for byte, and the hex dumps of
/// `docs/PROTOCOL.md` are among them.
#[cfg(test)]
mod documented_vectors {
    use super::*;
    use serde_json::Value as Json;

    struct Vector {
        name: String,
        kind: String,
        answers: Option<String>,
        frame: Vec<u8>,
        body: Json,
    }

    fn vectors() -> Vec<Vector> {
        let file: Json = serde_json::from_str(include_str!("../vectors.json")).unwrap();
        let text = |v: &Json, k: &str| v[k].as_str().map(str::to_owned);
        file["vectors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| Vector {
                name: text(v, "name").unwrap(),
                kind: text(v, "kind").unwrap(),
                answers: text(v, "answers"),
                frame: hex_bytes(&text(v, "frame").unwrap()),
                body: v["body"].clone(),
            })
            .collect()
    }

    fn hex_bytes(hex: &str) -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The JSON form of a MessagePack value: binary as `{"bin": hex}`.
    fn json_of(v: &rmpv::Value) -> Json {
        use rmpv::Value as V;
        match v {
            V::Nil => Json::Null,
            V::Boolean(b) => Json::Bool(*b),
            V::Integer(i) => match (i.as_u64(), i.as_i64()) {
                (Some(u), _) => Json::from(u),
                (None, Some(n)) => Json::from(n),
                _ => panic!("integer out of range"),
            },
            V::String(s) => Json::from(s.as_str().unwrap()),
            V::Binary(b) => {
                let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
                serde_json::json!({ "bin": hex })
            }
            V::Array(a) => Json::Array(a.iter().map(json_of).collect()),
            V::Map(m) => Json::Object(
                m.iter()
                    .map(|(k, v)| (k.as_str().unwrap().to_owned(), json_of(v)))
                    .collect(),
            ),
            other => panic!("unexpected value {other:?}"),
        }
    }

    #[test]
    fn vectors_are_what_the_codec_reads_and_writes() {
        let vectors = vectors();
        assert!(vectors.len() >= 9);
        for v in &vectors {
            let (len, body) = v.frame.split_at(4);
            assert_eq!(
                u32::from_be_bytes(len.try_into().unwrap()) as usize,
                body.len(),
                "{}: the length counts the body only",
                v.name
            );
            let value = rmpv::decode::read_value(&mut &body[..]).unwrap();
            assert_eq!(json_of(&value), v.body, "{}", v.name);
            let again = match v.kind.as_str() {
                "request" => {
                    let (id, request) = decode_request(body).unwrap();
                    encode_request(id, &request)
                }
                "response" => {
                    let answers = v.answers.as_deref().unwrap();
                    let asked = vectors
                        .iter()
                        .find(|r| r.kind == "request" && r.name == answers)
                        .unwrap_or_else(|| panic!("{}: no request {answers}", v.name));
                    let (_, request) = decode_request(&asked.frame[4..]).unwrap();
                    let response = decode_response(body).unwrap();
                    let id = response.id();
                    encode_reply(id, &response.into_reply(&request).unwrap())
                }
                other => panic!("{}: unknown kind {other}", v.name),
            };
            assert_eq!(&again[..], body, "{}: the codec writes it back", v.name);
        }
    }

    #[test]
    fn protocol_md_hex_dumps_are_vectors() {
        let doc = include_str!("../../docs/PROTOCOL.md");
        let examples = &doc[doc.find("## Examples").unwrap()..];
        let frames: Vec<Vec<u8>> = vectors().into_iter().map(|v| v.frame).collect();
        let mut dumps = 0;
        for block in examples.split("```\n").skip(1).step_by(2) {
            let hex: String = block
                .split("```")
                .next()
                .unwrap()
                .split_whitespace()
                .collect();
            if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                continue;
            }
            dumps += 1;
            assert!(
                frames.contains(&hex_bytes(&hex)),
                "PROTOCOL.md shows a frame that protocol/vectors.json lacks: {hex}"
            );
        }
        assert_eq!(dumps, 9, "the hex dumps of PROTOCOL.md's examples");
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
