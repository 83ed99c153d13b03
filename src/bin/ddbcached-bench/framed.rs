//! The pipelined request loop over the daemon's framing, for the daemon and for the echo
//! floor alike: one connection, `depth` requests in flight, replies matched by id.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{ensure, Context};
use bytes::Bytes;
use ddbcached_protocol::codec::{decode_response, encode_request, frame_codec};
use ddbcached_protocol::{Request, PROTOCOL_VERSION};
use futures::{SinkExt, StreamExt};
use tokio::net::UnixStream;
use tokio::sync::Semaphore;
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

    let slots = Arc::new(Semaphore::new(depth));
    let started: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let mut writer = {
        let (slots, started) = (slots.clone(), started.clone());
        tokio::spawn(async move {
            let mut id = 0u64;
            loop {
                // Flush what is queued only when no slot is free: pipelined requests
                // share a system call, as any pipelining client does.
                let slot = match slots.clone().try_acquire_owned() {
                    Ok(slot) => slot,
                    Err(_) => {
                        SinkExt::<Bytes>::flush(&mut sink).await?;
                        slots.clone().acquire_owned().await?
                    }
                };
                slot.forget();
                let now = Instant::now();
                if now >= stop_at {
                    SinkExt::<Bytes>::flush(&mut sink).await?;
                    return Ok::<u64, anyhow::Error>(id);
                }
                id += 1;
                started.lock().expect("start times").insert(id, now);
                sink.feed(encode_request(id, &next())).await?;
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
                let frame = frame?;
                let reply = decode_response(&frame)?;
                ensure!(!reply.is_error(), "error reply: {reply:?}");
                let id = reply.id().context("reply without id")?;
                if !reply.is_last() {
                    continue;
                }
                let at = started.lock().expect("start times").remove(&id).context("unknown id")?;
                if at >= warm_until {
                    latencies.push(at.elapsed().as_nanos() as u64);
                }
                received += 1;
                slots.add_permits(1);
            }
            done = &mut writer, if sent.is_none() => {
                sent = Some(done??);
            }
        }
    }
    Ok(latencies)
}
