//! One client connection: the peer check, the handshake, then requests read in order and
//! served concurrently, with replies written as they finish.
//!
//! The reader takes a permit from a per-connection semaphore before each request, so at
//! most `max_in_flight_per_connection` run at once and a client that floods the socket is
//! slowed down (it is simply not read) instead of buffered without bound. A read the
//! cache answers is answered by the reader itself; every other request runs in its own
//! task, so a slow DynamoDB call does not hold up the answers behind it;
//! replies carry the request id and may leave in any order. One writer task owns the
//! socket's write half and batches frames into few system calls.

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ddbcached_protocol::codec::{decode_request, encode_reply, frame_codec, is_frame_too_large};
use ddbcached_protocol::message::PROTOCOL_VERSION;
use ddbcached_protocol::{ErrorCode, Items, Op, Reply, Request};
use futures::{SinkExt, StreamExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ServerConfig;
use crate::server::Rejection;
use crate::service::{error_reply, Outcome, Pending, Service};

/// Frames queued for the writer; a bound keeps a client that does not read from making the
/// daemon buffer its replies without limit.
const OUTBOX_FRAMES: usize = 256;

/// Serves one connection until the client closes it, a protocol error ends it, it idles
/// past `idle_timeout_ms`, or `shutdown` fires: then requests already running complete,
/// and any that arrive meanwhile are answered `shutting_down` without being run.
pub async fn serve(
    stream: UnixStream,
    service: Arc<Service>,
    config: ServerConfig,
    shutdown: CancellationToken,
) {
    if !peer_allowed(&stream, &config, &service) {
        return;
    }
    service.server_stats().connection_opened();
    let idle = (config.idle_timeout_ms > 0).then(|| Duration::from_millis(config.idle_timeout_ms));
    let (rd, wr) = stream.into_split();
    let mut frames = FramedRead::new(rd, frame_codec(config.max_frame_bytes));
    let (outbox, queued) = mpsc::channel::<Bytes>(OUTBOX_FRAMES);
    let writer = tokio::spawn(write_frames(
        FramedWrite::new(wr, frame_codec(config.max_frame_bytes)),
        queued,
        idle,
    ));

    let greeted = match idle {
        // A client that connects and never says hello is idle too.
        Some(limit) => {
            tokio::time::timeout(limit, handshake(&mut frames, &outbox, &config, &service))
                .await
                .unwrap_or(false)
        }
        None => handshake(&mut frames, &outbox, &config, &service).await,
    };
    if greeted {
        let requests = TaskTracker::new();
        let in_flight = Arc::new(Semaphore::new(config.max_in_flight_per_connection));
        // Once the daemon is stopping, requests still arriving are answered
        // `shutting_down` (not run: safe to send elsewhere) until those in flight are done.
        let mut draining = false;
        loop {
            let next = tokio::select! {
                // Shutdown first: a frame read after it began is never run.
                biased;
                _ = shutdown.cancelled(), if !draining => {
                    draining = true;
                    requests.close();
                    continue;
                }
                _ = requests.wait(), if draining => break,
                next = frames.next() => next,
                _ = tokio::time::sleep(idle.unwrap_or_default()), if idle.is_some() => {
                    if in_flight.available_permits() == config.max_in_flight_per_connection {
                        tracing::debug!("closing an idle connection");
                        break;
                    }
                    continue;
                }
            };
            let body = match next {
                None => break,
                Some(Ok(body)) => body,
                Some(Err(e)) => {
                    refuse_frame(&e, &outbox, &config, &service).await;
                    break;
                }
            };
            let (id, request) = match decode_request(&body) {
                Ok(ok) => ok,
                Err(e) => {
                    // The frame boundary is intact, so the connection stays usable.
                    service.answered(None, Some(e.code), Duration::ZERO);
                    service.server_stats().frame_rejected(match e.code {
                        ErrorCode::UnknownOperation => Rejection::UnknownOperation,
                        _ => Rejection::Malformed,
                    });
                    let reply = Reply::error(e.code, e.message);
                    if outbox.send(encode_reply(e.id, &reply)).await.is_err() {
                        break;
                    }
                    continue;
                }
            };
            if draining {
                if !refuse_stopping(id, request.op(), &outbox, &service).await {
                    break;
                }
                continue;
            }
            // A hit is answered here: spawning a task for it would cost more than the hit.
            let started = Instant::now();
            let op = request.op();
            let pending = match service.answer_from_cache(request).await {
                Ok(reply) => {
                    if outbox.send(encode_reply(Some(id), &reply)).await.is_err() {
                        break;
                    }
                    service.answered(Some(op), None, started.elapsed());
                    continue;
                }
                Err(pending) => pending,
            };
            // The writer gave up on a client that stopped reading: nothing read from now
            // on could be answered, so its queued requests are not run. (A hit finds out
            // when its reply cannot be queued.)
            if outbox.is_closed() {
                break;
            }
            let permit = tokio::select! {
                permit = in_flight.clone().acquire_owned() => permit.expect("never closed"),
                // Stopping while waiting for a slot: this request was read, so it is
                // answered like any other that arrives now.
                _ = shutdown.cancelled() => {
                    refuse_stopping(id, op, &outbox, &service).await;
                    continue;
                }
            };
            let service = service.clone();
            let outbox = outbox.clone();
            requests.spawn(async move {
                let started = Instant::now();
                let error = respond(id, pending, &service, &outbox).await;
                service.answered(Some(op), error, started.elapsed());
                drop(permit);
            });
        }
        // Nothing more is read. If the writer has given up too, this closes the socket
        // now rather than after the requests in flight, which run to the end (a write
        // cut short would leave the cache unsure of DynamoDB).
        drop(frames);
        requests.close();
        requests.wait().await;
    }
    drop(outbox);
    // The writer ends once every queued reply is written (or the client has gone).
    let _ = writer.await;
    service.server_stats().connection_closed();
}

/// Answers a request that arrived while the daemon is stopping, without running it;
/// returns whether the reply could be queued.
async fn refuse_stopping(id: u64, op: Op, outbox: &mpsc::Sender<Bytes>, service: &Service) -> bool {
    service.answered(Some(op), Some(ErrorCode::ShuttingDown), Duration::ZERO);
    let reply = Reply::error(
        ErrorCode::ShuttingDown,
        "the server is stopping; this request was not run",
    );
    outbox.send(encode_reply(Some(id), &reply)).await.is_ok()
}

/// Whether the peer may use the daemon: with an allow-list configured, its uid or gid
/// (from SO_PEERCRED) must be on it. A refused peer is logged, counted and disconnected.
fn peer_allowed(stream: &UnixStream, config: &ServerConfig, service: &Service) -> bool {
    if config.allowed_uids.is_empty() && config.allowed_gids.is_empty() {
        return true;
    }
    match stream.peer_cred() {
        Ok(cred)
            if config.allowed_uids.contains(&cred.uid())
                || config.allowed_gids.contains(&cred.gid()) =>
        {
            true
        }
        Ok(cred) => {
            tracing::warn!(uid = cred.uid(), gid = cred.gid(), pid = ?cred.pid(), "refused a peer not on the allow-list");
            service.server_stats().peer_refused();
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "refused a peer whose credentials cannot be read");
            service.server_stats().peer_refused();
            false
        }
    }
}

/// Reads the first frame, which must be `hello` with a version this server speaks.
/// Answers it; returns whether the connection may go on.
async fn handshake(
    frames: &mut FramedRead<OwnedReadHalf, LengthDelimitedCodec>,
    outbox: &mpsc::Sender<Bytes>,
    config: &ServerConfig,
    service: &Service,
) -> bool {
    let body = match frames.next().await {
        None => return false,
        Some(Ok(body)) => body,
        Some(Err(e)) => {
            refuse_frame(&e, outbox, config, service).await;
            return false;
        }
    };
    let (id, reply, ok) = match decode_request(&body) {
        Ok((id, Request::Hello { version, .. })) if version == PROTOCOL_VERSION => (
            Some(id),
            Reply::Hello {
                version: PROTOCOL_VERSION,
                server: concat!("ddbcached ", env!("CARGO_PKG_VERSION")).into(),
                max_frame_bytes: config.max_frame_bytes as u64,
            },
            true,
        ),
        Ok((id, Request::Hello { version, .. })) => (
            Some(id),
            Reply::error(
                ErrorCode::UnsupportedVersion,
                format!("protocol version {version} is not supported; this server speaks version {PROTOCOL_VERSION}"),
            ),
            false,
        ),
        Ok((id, _)) => (Some(id), handshake_required(), false),
        Err(e) => (e.id, handshake_required(), false),
    };
    if !ok {
        service.server_stats().frame_rejected(Rejection::Handshake);
    }
    let _ = outbox.send(encode_reply(id, &reply)).await;
    ok
}

fn handshake_required() -> Reply {
    Reply::error(
        ErrorCode::HandshakeRequired,
        "the first frame of a connection must be a `hello` request",
    )
}

/// Answers a frame the codec refused. Only an oversized frame gets an answer (addressed to
/// no id: its body was never read); for other I/O errors there is no one to answer.
async fn refuse_frame(
    e: &std::io::Error,
    outbox: &mpsc::Sender<Bytes>,
    config: &ServerConfig,
    service: &Service,
) {
    if is_frame_too_large(e) {
        service.server_stats().frame_rejected(Rejection::TooLarge);
        let reply = Reply::error(
            ErrorCode::FrameTooLarge,
            format!(
                "frame exceeds this server's limit of {} bytes; closing the connection",
                config.max_frame_bytes
            ),
        );
        let _ = outbox.send(encode_reply(None, &reply)).await;
    } else {
        tracing::debug!(error = %e, "connection read failed");
    }
}

/// Runs one request and queues its reply frames; returns the error code it ended with.
async fn respond(
    id: u64,
    pending: Pending,
    service: &Service,
    outbox: &mpsc::Sender<Bytes>,
) -> Option<ErrorCode> {
    match service.handle(pending).await {
        Outcome::Reply(reply) => {
            let code = match &reply {
                Reply::Error(e) => Some(e.known_code().unwrap_or(ErrorCode::Internal)),
                _ => None,
            };
            let _ = outbox.send(encode_reply(Some(id), &reply)).await;
            code
        }
        Outcome::Stream(mut pieces) => {
            // Hold one piece back so the last one can be marked `more: false`.
            let mut held: Option<Items> = None;
            while let Some(piece) = pieces.next().await {
                let piece = match piece {
                    Ok(p) if p.is_empty() => continue,
                    Ok(p) => p,
                    Err(e) => {
                        let code = e.code();
                        let _ = outbox.send(encode_reply(Some(id), &error_reply(e))).await;
                        return Some(code);
                    }
                };
                if let Some(prev) = held.replace(piece) {
                    let reply = Reply::Items {
                        items: prev,
                        more: true,
                    };
                    if outbox.send(encode_reply(Some(id), &reply)).await.is_err() {
                        return None;
                    }
                }
            }
            let last = Reply::Items {
                items: held.unwrap_or(Items::Values(Vec::new())),
                more: false,
            };
            let _ = outbox.send(encode_reply(Some(id), &last)).await;
            None
        }
    }
}

/// Writes queued frames, flushing only when the queue is momentarily empty.
async fn write_frames(
    mut sink: FramedWrite<OwnedWriteHalf, LengthDelimitedCodec>,
    mut queued: mpsc::Receiver<Bytes>,
    stall: Option<Duration>,
) {
    while let Some(frame) = queued.recv().await {
        if !in_time(stall, sink.feed(frame)).await {
            return;
        }
        while let Ok(frame) = queued.try_recv() {
            if !in_time(stall, sink.feed(frame)).await {
                return;
            }
        }
        if !in_time(stall, SinkExt::<Bytes>::flush(&mut sink)).await {
            return;
        }
    }
}

/// Whether a write finished within `stall`. A client that stops reading its replies
/// would otherwise hold its connection, its queued replies and its in-flight requests
/// forever; giving up closes the outbox, which ends the connection. Most writes finish
/// at once (a frame into the buffer, a flush into the socket), so the timer, and its
/// clock read, is only started for one that has to wait.
async fn in_time(
    stall: Option<Duration>,
    write: impl Future<Output = std::io::Result<()>>,
) -> bool {
    let mut write = std::pin::pin!(write);
    if let Poll::Ready(done) = futures::poll!(write.as_mut()) {
        return done.is_ok();
    }
    match stall {
        Some(limit) => matches!(tokio::time::timeout(limit, write).await, Ok(Ok(()))),
        None => write.await.is_ok(),
    }
}
