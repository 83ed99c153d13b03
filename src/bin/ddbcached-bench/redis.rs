//! The same pipelined loop over Redis's protocol (RESP) on its Unix socket: `depth`
//! requests in flight on one connection, replies in request order.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::UnixStream;
use tokio::sync::Semaphore;

/// A GET or SET of one key.
pub enum Command {
    Get(Vec<u8>),
    Set(Vec<u8>, Vec<u8>),
}

impl Command {
    fn encode(&self, out: &mut Vec<u8>) {
        let parts: Vec<&[u8]> = match self {
            Command::Get(k) => vec![b"GET", k],
            Command::Set(k, v) => vec![b"SET", k, v],
        };
        out.extend_from_slice(format!("*{}\r\n", parts.len()).as_bytes());
        for p in parts {
            out.extend_from_slice(format!("${}\r\n", p.len()).as_bytes());
            out.extend_from_slice(p);
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// Runs commands from `next` on one connection until `stop_at`, `depth` at a time;
/// returns the latencies (ns) of those sent after `warm_until`.
pub async fn run(
    socket: &Path,
    depth: usize,
    warm_until: Instant,
    stop_at: Instant,
    mut next: impl FnMut() -> Command + Send + 'static,
) -> anyhow::Result<Vec<u64>> {
    let stream = UnixStream::connect(socket)
        .await
        .with_context(|| format!("connecting to {}", socket.display()))?;
    let (mut rd, wr) = stream.into_split();
    let slots = Arc::new(Semaphore::new(depth));
    let started: Arc<Mutex<VecDeque<Instant>>> = Arc::default();
    let mut writer = {
        let (slots, started) = (slots.clone(), started.clone());
        tokio::spawn(async move {
            let mut out = BufWriter::new(wr);
            let mut buf = Vec::new();
            let mut sent = 0u64;
            loop {
                let slot = match slots.clone().try_acquire_owned() {
                    Ok(slot) => slot,
                    Err(_) => {
                        out.flush().await?;
                        slots.clone().acquire_owned().await?
                    }
                };
                slot.forget();
                let now = Instant::now();
                if now >= stop_at {
                    out.flush().await?;
                    return Ok::<u64, anyhow::Error>(sent);
                }
                buf.clear();
                next().encode(&mut buf);
                started.lock().expect("start times").push_back(now);
                out.write_all(&buf).await?;
                sent += 1;
            }
        })
    };
    let mut latencies = Vec::new();
    let mut pending = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let (mut received, mut sent) = (0u64, None);
    while sent.is_none_or(|s| received < s) {
        tokio::select! {
            n = rd.read(&mut chunk) => {
                let n = n?;
                if n == 0 {
                    // As in the framed loop: the end can come before the writer's result.
                    let sent = match sent {
                        Some(sent) => sent,
                        None => (&mut writer).await??,
                    };
                    if received != sent {
                        bail!("redis closed the connection after {received} of {sent} replies");
                    }
                    break;
                }
                pending.extend_from_slice(&chunk[..n]);
                while let Some(used) = reply_len(&pending)? {
                    pending.drain(..used);
                    let at = started.lock().expect("start times").pop_front().context("reply without request")?;
                    if at >= warm_until {
                        latencies.push(at.elapsed().as_nanos() as u64);
                    }
                    received += 1;
                    slots.add_permits(1);
                }
            }
            done = &mut writer, if sent.is_none() => sent = Some(done??),
        }
    }
    Ok(latencies)
}

/// The length of the first complete reply in `buf` (a bulk string, nil or status), if any.
fn reply_len(buf: &[u8]) -> anyhow::Result<Option<usize>> {
    let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    match buf.first() {
        Some(b'+') | Some(b':') => Ok(Some(eol + 2)),
        Some(b'$') => {
            let len: i64 = std::str::from_utf8(&buf[1..eol])?.parse()?;
            if len < 0 {
                return Ok(Some(eol + 2));
            }
            let end = eol + 2 + len as usize + 2;
            Ok((buf.len() >= end).then_some(end))
        }
        Some(b'-') => bail!("redis error: {}", String::from_utf8_lossy(&buf[..eol])),
        _ => bail!("unexpected redis reply"),
    }
}
