//! An async client: one Unix-socket connection, many requests in flight at once.
//!
//! Requests are written by one writer task (so callers never contend on the socket) and
//! responses are routed back to their caller by request id by one reader task, which is
//! what lets a slow request and a fast one share a connection without blocking each other.
//! `Client` is cheap to clone; the connection closes when the last clone is dropped.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use crate::codec::{decode_response, encode_request, frame_codec, Response, ResponseError};
use crate::error::{ClientError, ServerError};
use crate::message::{Items, Reply, Request, Versioned, PROTOCOL_VERSION};

/// Largest frame the client accepts from the server. The server bounds its frames by its
/// own `max_frame_bytes`, which it announces in `hello`; this is only a sanity ceiling.
const MAX_RESPONSE_FRAME_BYTES: usize = 64 * 1024 * 1024;

/// Responses not yet delivered, by request id; `None` once the connection has ended, so
/// that no request can register after the reader has stopped and wait forever. A streamed
/// request stays registered until its last piece arrives.
type Pending = Arc<Mutex<Option<HashMap<u64, mpsc::UnboundedSender<Response>>>>>;

/// What the server said about itself in the handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerInfo {
    pub version: u32,
    pub server: String,
    pub max_frame_bytes: u64,
}

/// A connection to a ddbcached daemon.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    next_id: AtomicU64,
    pending: Pending,
    frames: mpsc::Sender<Bytes>,
    server: ServerInfo,
    reader: AbortHandle,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Client {
    /// Connects to the daemon's socket and performs the version handshake.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        Self::connect_as(path, "ddbcached-protocol").await
    }

    /// Like [`Client::connect`], naming the client in the handshake (shown in server logs).
    pub async fn connect_as(path: impl AsRef<Path>, name: &str) -> Result<Client, ClientError> {
        let path = path.as_ref();
        let io_err = |source| ClientError::Io {
            path: path.display().to_string(),
            source,
        };
        let stream = UnixStream::connect(path).await.map_err(io_err)?;
        let (rd, wr) = stream.into_split();
        let mut rd = FramedRead::new(rd, frame_codec(MAX_RESPONSE_FRAME_BYTES));
        let mut wr = FramedWrite::new(wr, frame_codec(MAX_RESPONSE_FRAME_BYTES));

        let hello = Request::Hello {
            version: PROTOCOL_VERSION,
            client: Some(name.to_owned()),
        };
        wr.send(encode_request(0, &hello)).await.map_err(io_err)?;
        let frame = rd
            .next()
            .await
            .ok_or(ClientError::Closed)?
            .map_err(io_err)?;
        let server = match read(&hello, decode_response(&frame))? {
            Reply::Hello {
                version,
                server,
                max_frame_bytes,
            } => ServerInfo {
                version,
                server,
                max_frame_bytes,
            },
            other => return Err(unexpected(&other)),
        };

        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let (frames, outbox) = mpsc::channel(256);
        tokio::spawn(write_frames(wr, outbox));
        let reader = tokio::spawn(route_responses(rd, pending.clone())).abort_handle();
        Ok(Client {
            inner: Arc::new(Inner {
                next_id: AtomicU64::new(1),
                pending,
                frames,
                server,
                reader,
            }),
        })
    }

    /// Whether the connection has ended (the server closed it or it failed); every
    /// request on it now fails with [`ClientError::Closed`].
    pub fn is_closed(&self) -> bool {
        self.inner
            .pending
            .lock()
            .expect("pending map lock poisoned")
            .is_none()
    }

    /// What the server announced in the handshake.
    pub fn server_info(&self) -> &ServerInfo {
        &self.inner.server
    }

    /// Sends one request and waits for its complete answer. A streamed answer is gathered
    /// into a single `Reply::Items { more: false }`; an error response becomes `Err`.
    pub async fn call(&self, request: Request) -> Result<Reply, ClientError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.inner
            .pending
            .lock()
            .expect("pending map lock poisoned")
            .as_mut()
            .ok_or(ClientError::Closed)?
            .insert(id, tx);
        if self
            .inner
            .frames
            .send(encode_request(id, &request))
            .await
            .is_err()
        {
            self.forget(id);
            return Err(ClientError::Closed);
        }
        let mut gathered: Option<Items> = None;
        loop {
            let frame = rx.recv().await.ok_or(ClientError::Closed)?;
            let (piece, more) = match read(&request, Ok(frame)) {
                Ok(Reply::Items { items, more }) => (items, more),
                Ok(Reply::Error(e)) => {
                    self.forget(id);
                    return Err(e.into());
                }
                Ok(reply) => return Ok(reply),
                Err(e) => {
                    self.forget(id);
                    return Err(e);
                }
            };
            match &mut gathered {
                None => gathered = Some(piece),
                Some(all) => extend(all, piece)?,
            }
            if !more {
                return Ok(Reply::Items {
                    items: gathered.expect("set just above"),
                    more: false,
                });
            }
        }
    }

    fn forget(&self, id: u64) {
        if let Some(pending) = self
            .inner
            .pending
            .lock()
            .expect("pending map lock poisoned")
            .as_mut()
        {
            pending.remove(&id);
        }
    }

    /// `ping`.
    pub async fn ping(&self) -> Result<(), ClientError> {
        self.call(Request::Ping).await.map(drop)
    }

    /// `health`: whether the daemon is ready, and why not.
    pub async fn health(&self) -> Result<(bool, String), ClientError> {
        match self.call(Request::Health).await? {
            Reply::Health { ready, detail } => Ok((ready, detail)),
            other => Err(unexpected(&other)),
        }
    }

    /// `kv.put`: returns once the version is durable in DynamoDB.
    pub async fn kv_put(
        &self,
        ns: &str,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
        ts: i64,
    ) -> Result<(), ClientError> {
        let request = Request::KvPut {
            ns: ns.into(),
            key: key.into(),
            value: value.into(),
            ts,
        };
        self.call(request).await.map(drop)
    }

    /// `kv.get`: the newest version (with `ts <= before` when given).
    pub async fn kv_get(
        &self,
        ns: &str,
        key: impl Into<Bytes>,
        before: Option<i64>,
    ) -> Result<Option<Versioned>, ClientError> {
        self.kv_get_with(ns, key, before, false).await
    }

    /// `kv.get` with the `consistent` flag: read DynamoDB directly, bypassing any cache.
    pub async fn kv_get_with(
        &self,
        ns: &str,
        key: impl Into<Bytes>,
        before: Option<i64>,
        consistent: bool,
    ) -> Result<Option<Versioned>, ClientError> {
        let request = Request::KvGet {
            ns: ns.into(),
            key: key.into(),
            before,
            consistent,
        };
        match self.call(request).await? {
            Reply::Value(v) => Ok(v),
            other => Err(unexpected(&other)),
        }
    }

    /// `kv.latest_ts`.
    pub async fn kv_latest_ts(
        &self,
        ns: &str,
        key: impl Into<Bytes>,
    ) -> Result<Option<i64>, ClientError> {
        let request = Request::KvLatestTs {
            ns: ns.into(),
            key: key.into(),
        };
        match self.call(request).await? {
            Reply::Timestamp(ts) => Ok(ts),
            other => Err(unexpected(&other)),
        }
    }

    /// `kv.timestamps`: ascending.
    pub async fn kv_timestamps(
        &self,
        ns: &str,
        key: impl Into<Bytes>,
    ) -> Result<Vec<i64>, ClientError> {
        let request = Request::KvTimestamps {
            ns: ns.into(),
            key: key.into(),
        };
        match self.call(request).await? {
            Reply::Items {
                items: Items::Timestamps(v),
                ..
            } => Ok(v),
            other => Err(unexpected(&other)),
        }
    }

    /// `kv.scan`: every key of the namespace with its newest value.
    pub async fn kv_scan(&self, ns: &str) -> Result<Vec<(Bytes, Bytes)>, ClientError> {
        let request = Request::KvScan {
            ns: ns.into(),
            keys_only: false,
        };
        match self.call(request).await? {
            Reply::Items {
                items: Items::Entries(v),
                ..
            } => Ok(v),
            other => Err(unexpected(&other)),
        }
    }

    /// `kv.scan` with `keys_only`.
    pub async fn kv_scan_keys(&self, ns: &str) -> Result<Vec<Bytes>, ClientError> {
        let request = Request::KvScan {
            ns: ns.into(),
            keys_only: true,
        };
        match self.call(request).await? {
            Reply::Items {
                items: Items::Keys(v),
                ..
            } => Ok(v),
            other => Err(unexpected(&other)),
        }
    }

    /// `kv.delete`.
    pub async fn kv_delete(
        &self,
        ns: &str,
        key: impl Into<Bytes>,
        marker: Option<i64>,
    ) -> Result<(), ClientError> {
        let request = Request::KvDelete {
            ns: ns.into(),
            key: key.into(),
            marker,
        };
        self.call(request).await.map(drop)
    }

    /// `log.put`: the new index.
    pub async fn log_put(&self, topic: &str, value: impl Into<Bytes>) -> Result<i64, ClientError> {
        let request = Request::LogPut {
            topic: topic.into(),
            value: value.into(),
        };
        match self.call(request).await? {
            Reply::Index(i) => Ok(i),
            other => Err(unexpected(&other)),
        }
    }

    /// `log.position`.
    pub async fn log_position(&self, topic: &str) -> Result<i64, ClientError> {
        let request = Request::LogPosition {
            topic: topic.into(),
        };
        match self.call(request).await? {
            Reply::Index(i) => Ok(i),
            other => Err(unexpected(&other)),
        }
    }

    /// `log.scan`: values at `from..=until`, in index order.
    pub async fn log_scan(
        &self,
        topic: &str,
        from: i64,
        until: i64,
    ) -> Result<Vec<Bytes>, ClientError> {
        let request = Request::LogScan {
            topic: topic.into(),
            from,
            until,
        };
        match self.call(request).await? {
            Reply::Items {
                items: Items::Values(v),
                ..
            } => Ok(v),
            other => Err(unexpected(&other)),
        }
    }

    /// `log.delete`.
    pub async fn log_delete(&self, topic: &str) -> Result<(), ClientError> {
        let request = Request::LogDelete {
            topic: topic.into(),
        };
        self.call(request).await.map(drop)
    }
}

/// Writes queued frames, flushing once the queue is drained so pipelined requests share
/// system calls.
async fn write_frames(
    mut sink: FramedWrite<OwnedWriteHalf, LengthDelimitedCodec>,
    mut outbox: mpsc::Receiver<Bytes>,
) {
    while let Some(frame) = outbox.recv().await {
        if sink.feed(frame).await.is_err() {
            return;
        }
        while let Ok(frame) = outbox.try_recv() {
            if sink.feed(frame).await.is_err() {
                return;
            }
        }
        if SinkExt::<Bytes>::flush(&mut sink).await.is_err() {
            return;
        }
    }
}

/// Routes each response to the caller waiting for its id; when the connection ends every
/// waiting caller sees `Closed` (its sender is dropped).
async fn route_responses(
    mut frames: FramedRead<OwnedReadHalf, LengthDelimitedCodec>,
    pending: Pending,
) {
    while let Some(Ok(body)) = frames.next().await {
        let Ok(frame) = decode_response(&body) else {
            break;
        };
        let Some(id) = frame.id() else {
            // An error not addressed to any request (the server could not read an id):
            // the connection is about to close or a request was unreadable; nothing waits
            // on it by id.
            continue;
        };
        let last = frame.is_last();
        let mut pending = pending.lock().expect("pending map lock poisoned");
        let Some(pending) = pending.as_mut() else {
            break;
        };
        if let Some(tx) = pending.get(&id) {
            // A caller that gave up has dropped its receiver; nothing to deliver then.
            let _ = tx.send(frame);
        }
        if last {
            pending.remove(&id);
        }
    }
    // Every waiting caller sees its sender dropped (`Closed`); later calls are refused.
    pending.lock().expect("pending map lock poisoned").take();
}

/// A response read as the reply to `request`.
fn read(
    request: &Request,
    response: Result<Response, ResponseError>,
) -> Result<Reply, ClientError> {
    response
        .and_then(|r| r.into_reply(request))
        .map_err(|e| ClientError::Protocol(e.to_string()))
}

fn extend(all: &mut Items, piece: Items) -> Result<(), ClientError> {
    match (all, piece) {
        (Items::Timestamps(a), Items::Timestamps(b)) => a.extend(b),
        (Items::Keys(a), Items::Keys(b)) | (Items::Values(a), Items::Values(b)) => a.extend(b),
        (Items::Entries(a), Items::Entries(b)) => a.extend(b),
        _ => return Err(ClientError::Protocol("stream changed item kind".into())),
    }
    Ok(())
}

fn unexpected(reply: &Reply) -> ClientError {
    match reply {
        Reply::Error(e) => ClientError::Server(ServerError::clone(e)),
        other => ClientError::Protocol(format!("unexpected reply {other:?}")),
    }
}
