//! The pipelined request loop over the daemon's framing, for the daemon and for the echo
//! floor alike: one connection, `depth` requests in flight, replies matched by id.
//!
//! As lean as the RESP loop, so that the generator's own cost weighs the same on both
//! sides of a comparison: a reply is read in place (its `id` and `code`, which every
//! reply of these servers carries first) without allocating, and the start times live in
//! a table of `depth` slots: the request id is the slot, taken from a free list when the
//! request is sent and given back when its reply arrives. No map, no lock.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use ddbcached_protocol::codec::{decode_response, encode_request, frame_codec};
use ddbcached_protocol::{Request, PROTOCOL_VERSION};
use futures::{SinkExt, StreamExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite};

/// Largest reply frame accepted.
const MAX_FRAME: usize = 16 * 1024 * 1024;

/// Runs requests from `next` on one connection until `stop_at`, `depth` at a time;
/// returns the latencies (ns) of those sent after `warm_until`.
pub async fn run(
    socket: &Path,
    depth: usize,
    warm_until: Instant,
    stop_at: Instant,
    mut next: impl FnMut() -> Request + Send + 'static,
) -> anyhow::Result<Vec<u64>> {
    let stream = UnixStream::connect(socket)
        .await
        .with_context(|| format!("connecting to {}", socket.display()))?;
    let (rd, wr) = stream.into_split();
    let mut frames = FramedRead::new(rd, frame_codec(MAX_FRAME));
    let mut sink = FramedWrite::new(wr, frame_codec(MAX_FRAME));
    let hello = Request::Hello {
        version: PROTOCOL_VERSION,
        client: Some("ddbcached-bench".into()),
    };
    sink.send(encode_request(0, &hello)).await?;
    let reply = frames.next().await.context("no hello reply")??;
    ensure!(!decode_response(&reply)?.is_error(), "hello refused");

    // Start times in ns since `base`, one per slot.
    let base = Instant::now();
    let starts: Arc<[AtomicU64]> = (0..depth).map(|_| AtomicU64::new(0)).collect();
    let (free, mut freed) = mpsc::unbounded_channel::<usize>();
    for slot in 0..depth {
        free.send(slot)?;
    }
    let mut writer = {
        let starts = starts.clone();
        tokio::spawn(async move {
            let mut sent = 0u64;
            loop {
                // Flush what is queued only when no slot is free: pipelined requests
                // share a system call, as any pipelining client does.
                let slot = match freed.try_recv() {
                    Ok(slot) => slot,
                    Err(_) => {
                        SinkExt::<Bytes>::flush(&mut sink).await?;
                        freed.recv().await.context("the reader stopped")?
                    }
                };
                let now = Instant::now();
                if now >= stop_at {
                    SinkExt::<Bytes>::flush(&mut sink).await?;
                    return Ok::<u64, anyhow::Error>(sent);
                }
                starts[slot].store(nanos_since(base, now), Ordering::SeqCst);
                sink.feed(encode_request(slot as u64, &next())).await?;
                sent += 1;
            }
        })
    };
    let mut latencies = Vec::new();
    let mut received = 0u64;
    let mut sent = None;
    while sent.is_none_or(|s| received < s) {
        tokio::select! {
            frame = frames.next() => {
                let Some(frame) = frame else {
                    // The server closes once the writer has stopped and every reply is
                    // out; the end of the stream can come before the writer's result.
                    let sent = match sent {
                        Some(sent) => sent,
                        None => (&mut writer).await??,
                    };
                    ensure!(received == sent, "connection closed after {received} of {sent} replies");
                    break;
                };
                let (id, code) = reply_head(&frame?)?;
                ensure!(code == 0, "error reply {code} to request {id}");
                let slot = usize::try_from(id).ok().filter(|s| *s < depth).context("unknown id")?;
                let started = base + Duration::from_nanos(starts[slot].load(Ordering::SeqCst));
                if started >= warm_until {
                    latencies.push(started.elapsed().as_nanos() as u64);
                }
                received += 1;
                // The writer may have stopped already; then nobody needs the slot.
                let _ = free.send(slot);
            }
            done = &mut writer, if sent.is_none() => {
                sent = Some(done??);
            }
        }
    }
    Ok(latencies)
}

fn nanos_since(base: Instant, at: Instant) -> u64 {
    at.saturating_duration_since(base).as_nanos() as u64
}

/// The `id` and `code` of a reply, read in place: the daemon and the echo floor write
/// them first in every reply. (Streamed replies are not used by these workloads.)
fn reply_head(body: &[u8]) -> anyhow::Result<(u64, u64)> {
    let mut rd = body;
    let fields = rmp::decode::read_map_len(&mut rd).map_err(|e| anyhow::anyhow!("{e}"))?;
    ensure!(fields >= 2, "a reply map of {fields} fields");
    let mut field = |name: &str| -> anyhow::Result<u64> {
        let (key, rest) =
            rmp::decode::read_str_from_slice(rd).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        if key != name {
            bail!("a reply whose field is `{key}`, not `{name}`");
        }
        rd = rest;
        rmp::decode::read_int(&mut rd).map_err(|e| anyhow::anyhow!("{e}"))
    };
    Ok((field("id")?, field("code")?))
}
