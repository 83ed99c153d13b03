//! One client connection: the peer check, the handshake, then requests answered in
//! batches by one task that owns the socket, the way Redis and memcached serve one.
//!
//! Each turn of the loop reads what the socket has, decodes every complete frame in the
//! buffer, answers the cache's hits inline into one output buffer, hands every other
//! request (misses, writes, scans) to a task of its own, and writes the output with one
//! system call. Those tasks send their reply frames back on a channel that the same loop
//! waits on, so replies carry the request id and may leave in any order, and a slow
//! DynamoDB call does not hold up the answers behind it.
//!
//! Nothing is created per frame: the shutdown signal and the one timer (idle and stall
//! limits) are made once per connection, and the clock is read twice per turn (before
//! and after answering), not per request. Hits are counted per turn: one add per
//! operation and figure.
//!
//! Back-pressure: at most `max_in_flight_per_connection` requests run in tasks, and the
//! output holds at most [`OUTPUT_HIGH_WATER`] bytes (plus one turn's replies) before
//! the loop stops decoding; frames it has not decoded stay in the input buffer, and while
//! they do the socket is not read, so a client that floods it is slowed down instead of
//! buffered without bound.

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use ddbcached_protocol::codec::{
    complete_frame, decode_request_ref, encode_reply, write_frame, write_reply, FRAME_HEADER_BYTES,
};
use ddbcached_protocol::message::PROTOCOL_VERSION;
use ddbcached_protocol::{ErrorCode, Items, Op, Reply, Request, RequestRef};
use futures::StreamExt;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cache::KeyBuf;
use crate::config::ServerConfig;
use crate::peer;
use crate::server_stats::{Rejection, ServerStats};
use crate::service::{error_reply, Outcome, Pending, Service};

/// Output bytes beyond which no more frames are decoded until the client has read some.
const OUTPUT_HIGH_WATER: usize = 256 * 1024;
/// Free input space ensured before each read.
const READ_BYTES: usize = 16 * 1024;
/// Input buffer kept between requests; a larger one (left by a large request) is freed.
const INPUT_KEPT_BYTES: usize = 64 * 1024;
/// Reply frames the request tasks of one connection may have queued for it; a full queue
/// makes them wait, as the client's reading makes the loop wait.
const QUEUED_FRAMES: usize = 256;

/// What a request running in its own task sends back to its connection.
enum Sent {
    /// The body of one of its reply frames.
    Frame(Bytes),
    /// It is over (after its last frame), with the error code it ended with.
    Finished(Op, Option<ErrorCode>, Duration),
}

/// Serves one connection until the client closes it, a protocol error ends it, it idles
/// past `idle_timeout_ms`, or `shutdown` fires: then requests already running complete,
/// and any that arrive meanwhile are answered `shutting_down` without being run.
pub async fn serve(
    stream: UnixStream,
    service: Arc<Service>,
    stats: Arc<ServerStats>,
    config: ServerConfig,
    shutdown: CancellationToken,
) {
    if !peer::allowed(&stream, &config) {
        stats.peer_refused();
        return;
    }
    stats.connection_opened();
    let (sent, queued) = mpsc::channel(QUEUED_FRAMES);
    let mut connection = Connection {
        stream,
        service,
        stats,
        config,
        input: BytesMut::new(),
        output: Vec::new(),
        written: 0,
        keys: KeyBuf::default(),
        hits: [0; Op::ALL.len()],
        sent,
        queued,
        in_flight: 0,
        gone: CancellationToken::new(),
        state: State::Greeting,
        reading: true,
        draining: false,
    };
    connection.run(&shutdown).await;
    connection.stats.connection_closed();
}

/// Where a connection is in its life.
#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for `hello`.
    Greeting,
    /// Serving requests.
    Serving,
    /// Refused (a bad handshake, an oversized frame): nothing more is read; the refusal
    /// is written, then the connection closes.
    Refused,
    /// The client is gone or stopped reading: nothing more is read or written; requests
    /// in flight run to the end (a write cut short would leave the cache unsure of
    /// DynamoDB) and their replies are dropped.
    Gone,
}

struct Connection {
    stream: UnixStream,
    service: Arc<Service>,
    stats: Arc<ServerStats>,
    config: ServerConfig,
    /// Bytes read and not yet decoded.
    input: BytesMut,
    /// Reply frames to write; `output[..written]` has been written.
    output: Vec<u8>,
    written: usize,
    /// Where hits' keys are looked up from.
    keys: KeyBuf,
    /// Hits answered this turn, by operation.
    hits: [u64; Op::ALL.len()],
    sent: mpsc::Sender<Sent>,
    queued: mpsc::Receiver<Sent>,
    /// Requests running in their own tasks.
    in_flight: usize,
    /// Fired when the state becomes [`State::Gone`]: a streamed result stops there.
    gone: CancellationToken,
    state: State,
    /// Whether the client may still send (no end of stream or read error yet).
    reading: bool,
    /// Whether the daemon is stopping.
    draining: bool,
}

impl Connection {
    async fn run(&mut self, shutdown: &CancellationToken) {
        let idle = (self.config.idle_timeout_ms > 0)
            .then(|| Duration::from_millis(self.config.idle_timeout_ms));
        let mut stopping = pin!(shutdown.cancelled());
        let mut now = Instant::now();
        // The timer is armed once and moved only when it fires: a frame that arrives
        // just moves `last_read`, which the timer looks at then. A client that connects
        // and never says hello is idle too.
        let mut last_read = now;
        let mut last_written = now;
        let mut timer = pin!(tokio::time::sleep_until(now + idle.unwrap_or_default()));
        loop {
            // A frame read after shutdown began is never run.
            self.draining |= shutdown.is_cancelled();
            self.answer_buffered(now).await;
            // Counted before their replies leave: a client that has its answer sees it
            // counted.
            self.count_hits(now);
            self.take_queued();
            let had_output = self.pending() > 0;
            if self.write() || (!had_output && self.pending() > 0) {
                // The stall limit counts from the last progress, or from when output
                // started to wait.
                last_written = now;
            }
            if self.state == State::Gone {
                self.gone.cancel();
            }
            if self.over() {
                break;
            }
            let mut got_bytes = false;
            tokio::select! {
                biased;
                _ = &mut stopping, if !self.draining => self.draining = true,
                ready = self.stream.readable(), if self.may_read() => match ready {
                    Ok(()) => got_bytes = self.read(),
                    Err(e) => {
                        tracing::debug!(error = %e, "connection read failed");
                        self.reading = false;
                    }
                },
                _ = self.stream.writable(), if self.pending() > 0 && self.state != State::Gone => {}
                sent = self.queued.recv(), if self.in_flight > 0 && self.room() => {
                    // Never `None`: the connection holds a sender.
                    if let Some(sent) = sent {
                        self.take(sent);
                    }
                }
                _ = &mut timer, if idle.is_some() => {
                    let limit = idle.unwrap_or_default();
                    let at = Instant::now();
                    if self.pending() > 0 && self.state != State::Gone {
                        if at >= last_written + limit {
                            // The client stopped reading its replies: it would hold its
                            // queued replies and requests forever.
                            tracing::debug!("closing a connection whose client stopped reading");
                            self.state = State::Gone;
                        }
                    } else if at >= last_read + limit && self.in_flight == 0 {
                        tracing::debug!("closing an idle connection");
                        break;
                    }
                    let since = if self.pending() > 0 { last_written } else { last_read };
                    // Past due with nothing to act on (requests still running): look
                    // again a whole period later.
                    let next = Some(since + limit).filter(|&t| t > at).unwrap_or(at + limit);
                    timer.as_mut().reset(next);
                }
            }
            now = Instant::now();
            if got_bytes {
                last_read = now;
            }
        }
    }

    /// Whether the connection is over: nothing runs, and nothing is left to write or
    /// read.
    fn over(&self) -> bool {
        if self.in_flight > 0 {
            return false;
        }
        match self.state {
            State::Gone => true,
            State::Refused => self.pending() == 0,
            // Stopping: once what was running is done, the rest of its replies are written
            // and the connection closes, whatever the client still sends.
            State::Greeting | State::Serving => {
                self.pending() == 0 && (!self.reading || self.draining)
            }
        }
    }

    /// Output bytes not yet written.
    fn pending(&self) -> usize {
        self.output.len() - self.written
    }

    /// Whether replies may still be added to the output.
    fn room(&self) -> bool {
        self.pending() < OUTPUT_HIGH_WATER || self.state == State::Gone
    }

    /// Whether the socket should be read: the client may still send, and every frame read
    /// so far could be decoded (no limit holds the loop back).
    fn may_read(&self) -> bool {
        self.reading
            && matches!(self.state, State::Greeting | State::Serving)
            && self.in_flight < self.config.max_in_flight_per_connection
            && self.room()
    }

    /// Reads what the socket has; returns whether anything was read.
    fn read(&mut self) -> bool {
        self.input.reserve(READ_BYTES);
        match self.stream.try_read_buf(&mut self.input) {
            Ok(0) => {
                self.reading = false;
                false
            }
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(e) => {
                tracing::debug!(error = %e, "connection read failed");
                self.reading = false;
                false
            }
        }
    }

    /// Writes as much output as the socket takes, in one system call; returns whether
    /// anything was written. A failed write means the client is gone.
    fn write(&mut self) -> bool {
        if self.pending() == 0 || self.state == State::Gone {
            return false;
        }
        match self.stream.try_write(&self.output[self.written..]) {
            Ok(n) => {
                self.written += n;
                if self.written == self.output.len() {
                    self.output.clear();
                    self.written = 0;
                    // One large reply must not pin its buffer to the connection.
                    self.output.shrink_to(OUTPUT_HIGH_WATER);
                }
                n > 0
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(e) => {
                tracing::debug!(error = %e, "connection write failed");
                self.state = State::Gone;
                false
            }
        }
    }

    /// Decodes and answers the complete frames in the input, all received by `now`,
    /// while no limit holds.
    async fn answer_buffered(&mut self, now: Instant) {
        let max_frame_bytes = self.config.max_frame_bytes;
        while matches!(self.state, State::Greeting | State::Serving)
            && self.in_flight < self.config.max_in_flight_per_connection
            && self.room()
        {
            let len = match complete_frame(&self.input, max_frame_bytes) {
                Ok(Some(len)) => len,
                Ok(None) => break,
                Err(_) => {
                    self.refuse_too_large();
                    break;
                }
            };
            let Connection {
                input,
                service,
                stats,
                output,
                keys,
                ..
            } = self;
            let body = &input[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len];
            let pending = match decode_request_ref(body) {
                Err(e) if self.state == State::Greeting => {
                    refuse_handshake(output, stats, e.id);
                    self.state = State::Refused;
                    None
                }
                Err(e) => {
                    // The frame boundary is intact, so the connection stays usable.
                    stats.request(None, Some(e.code), Duration::ZERO);
                    stats.frame_rejected(match e.code {
                        ErrorCode::UnknownOperation => Rejection::UnknownOperation,
                        _ => Rejection::Malformed,
                    });
                    write_reply(output, e.id, &Reply::error(e.code, e.message));
                    None
                }
                Ok((id, request)) if self.state == State::Greeting => {
                    self.state = greet(output, stats, &self.config, id, request);
                    None
                }
                Ok((id, request)) if self.draining => {
                    refuse_stopping(output, stats, id, request.op());
                    None
                }
                Ok((id, request)) => {
                    let op = request.op();
                    match service.answer_from_cache(request, keys, now).await {
                        Ok(reply) => {
                            write_reply(output, Some(id), &reply);
                            self.hits[op.index()] += 1;
                            None
                        }
                        Err(pending) => Some((id, op, pending)),
                    }
                }
            };
            self.input.advance(FRAME_HEADER_BYTES + len);
            if let Some((id, op, pending)) = pending {
                self.spawn(id, op, pending);
            }
        }
        if self.input.is_empty() && self.input.capacity() > INPUT_KEPT_BYTES {
            // Nor one large request its buffer.
            self.input = BytesMut::new();
        }
    }

    /// Runs a request the cache could not answer in a task of its own.
    fn spawn(&mut self, id: u64, op: Op, pending: Pending) {
        self.in_flight += 1;
        let service = self.service.clone();
        let sent = self.sent.clone();
        let gone = self.gone.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let error = respond(id, pending, &service, &sent, &gone).await;
            // The connection waits for this message, so it is never closed before it.
            let _ = sent
                .send(Sent::Finished(op, error, started.elapsed()))
                .await;
        });
    }

    /// Moves what request tasks have sent into the output, while there is room.
    fn take_queued(&mut self) {
        while self.in_flight > 0 && self.room() {
            match self.queued.try_recv() {
                Ok(sent) => self.take(sent),
                Err(_) => break,
            }
        }
    }

    fn take(&mut self, sent: Sent) {
        match sent {
            Sent::Frame(body) if self.state != State::Gone => write_frame(&mut self.output, &body),
            Sent::Frame(_) => {}
            Sent::Finished(op, error, elapsed) => {
                self.in_flight -= 1;
                self.stats.request(Some(op), error, elapsed);
            }
        }
    }

    /// Counts this turn's hits, each as taking the whole turn (which began at `began`).
    fn count_hits(&mut self, began: Instant) {
        if self.hits.iter().all(|&n| n == 0) {
            return;
        }
        let elapsed = began.elapsed();
        for op in Op::ALL {
            let count = std::mem::take(&mut self.hits[op.index()]);
            if count > 0 {
                self.stats.requests_ok(op, count, elapsed);
                self.service.hits_answered(op, count);
            }
        }
    }

    /// Answers a frame whose prefix announces more than the limit (addressed to no id:
    /// its body is never read); the connection closes once that is written.
    fn refuse_too_large(&mut self) {
        self.stats.frame_rejected(Rejection::TooLarge);
        let reply = Reply::error(
            ErrorCode::FrameTooLarge,
            format!(
                "frame exceeds this server's limit of {} bytes; closing the connection",
                self.config.max_frame_bytes
            ),
        );
        write_reply(&mut self.output, None, &reply);
        self.state = State::Refused;
    }
}

/// Answers the first frame, which must be `hello` with a version this server speaks;
/// returns the state the connection goes on in.
fn greet(
    output: &mut Vec<u8>,
    stats: &ServerStats,
    config: &ServerConfig,
    id: u64,
    request: RequestRef<'_>,
) -> State {
    let RequestRef::Owned(Request::Hello { version, .. }) = request else {
        refuse_handshake(output, stats, Some(id));
        return State::Refused;
    };
    if version != PROTOCOL_VERSION {
        stats.frame_rejected(Rejection::Handshake);
        let reply = Reply::error(
            ErrorCode::UnsupportedVersion,
            format!("protocol version {version} is not supported; this server speaks version {PROTOCOL_VERSION}"),
        );
        write_reply(output, Some(id), &reply);
        return State::Refused;
    }
    let reply = Reply::Hello {
        version: PROTOCOL_VERSION,
        server: concat!("ddbcached ", env!("CARGO_PKG_VERSION")).into(),
        max_frame_bytes: config.max_frame_bytes as u64,
    };
    write_reply(output, Some(id), &reply);
    State::Serving
}

/// Answers a first frame that is not a `hello` (the handshake rule wins over
/// `malformed`).
fn refuse_handshake(output: &mut Vec<u8>, stats: &ServerStats, id: Option<u64>) {
    stats.frame_rejected(Rejection::Handshake);
    let reply = Reply::error(
        ErrorCode::HandshakeRequired,
        "the first frame of a connection must be a `hello` request",
    );
    write_reply(output, id, &reply);
}

/// Answers a request that arrived while the daemon is stopping, without running it.
fn refuse_stopping(output: &mut Vec<u8>, stats: &ServerStats, id: u64, op: Op) {
    stats.request(Some(op), Some(ErrorCode::ShuttingDown), Duration::ZERO);
    let reply = Reply::error(
        ErrorCode::ShuttingDown,
        "the server is stopping; this request was not run",
    );
    write_reply(output, Some(id), &reply);
}

/// Runs one request and sends its reply frames; returns the error code it ended with. A
/// streamed result stops early once the client is `gone`.
async fn respond(
    id: u64,
    pending: Pending,
    service: &Service,
    sent: &mpsc::Sender<Sent>,
    gone: &CancellationToken,
) -> Option<ErrorCode> {
    let send = |reply: &Reply| sent.send(Sent::Frame(encode_reply(Some(id), reply)));
    match service.handle(pending).await {
        Outcome::Reply(reply) => {
            let code = match &reply {
                Reply::Error(e) => Some(e.known_code().unwrap_or(ErrorCode::Internal)),
                _ => None,
            };
            let _ = send(&reply).await;
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
                        let _ = send(&error_reply(e)).await;
                        return Some(code);
                    }
                };
                if gone.is_cancelled() {
                    return None;
                }
                if let Some(prev) = held.replace(piece) {
                    let reply = Reply::Items {
                        items: prev,
                        more: true,
                    };
                    let _ = send(&reply).await;
                }
            }
            let last = Reply::Items {
                items: held.unwrap_or(Items::Values(Vec::new())),
                more: false,
            };
            let _ = send(&last).await;
            None
        }
    }
}
