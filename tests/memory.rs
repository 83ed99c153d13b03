//! A daemon nobody scrapes, under sustained hit load, keeps its memory bounded. The
//! metrics recorder keeps every histogram sample until something folds it into buckets;
//! without upkeep of its own, a daemon with `metrics.listen` empty grew by about 17 bytes
//! a request, for ever.

use std::time::{Duration, Instant};

use bytes::Bytes;
use ddbcached_protocol::codec::encode_request;
use ddbcached_protocol::{Client, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::harness::{name, rss, spawn_daemon};

/// Connections and requests in flight on each, as the benchmark's 16 x 16 row.
const CONNECTIONS: usize = 8;
const DEPTH: usize = 16;

#[tokio::test(flavor = "multi_thread")]
async fn memory_stays_bounded_under_hits_with_no_scrape() {
    let dir = tempfile::tempdir().unwrap();
    let (mut daemon, socket) = spawn_daemon(dir.path(), "[metrics]\nlisten = \"\"\n").await;
    let pid = daemon.id().unwrap();
    let ns = name();
    let c = Client::connect(&socket).await.unwrap();
    c.kv_put(&ns, "k", Bytes::from_static(b"value"), 1)
        .await
        .unwrap();
    assert!(c.kv_get(&ns, "k", None).await.unwrap().is_some());

    // Warm up (allocator pools, the cache, the connections' buffers), then three
    // phases of hits; memory is read after each.
    let warm = hits(&socket, &ns, Duration::from_secs(3)).await;
    let mut phases = Vec::new();
    for _ in 0..3 {
        let served = hits(&socket, &ns, Duration::from_secs(6)).await;
        phases.push((served, rss(pid)));
    }
    let served: u64 = phases.iter().map(|(n, _)| n).sum();
    let growth = phases[2].1 as i64 - phases[0].1 as i64;
    eprintln!(
        "hits with no scrape: {warm} warm-up, then {:?} (requests, RSS MiB); \
         {growth} bytes from the first phase to the last",
        phases
            .iter()
            .map(|(n, r)| (*n, r >> 20))
            .collect::<Vec<_>>()
    );
    // Between the first reading and the last pass the last two phases' requests: at 17
    // bytes a request that is several MiB. Measured with a debug build: 18 bytes a
    // request without upkeep (5.4 MiB over 295,000), nothing with it.
    let tail: u64 = phases[1..].iter().map(|(n, _)| n).sum();
    assert!(
        tail >= 200_000,
        "too few requests ({tail}) to tell a leak apart"
    );
    let bound = (tail * 17 / 2) as i64;
    assert!(
        growth < bound,
        "memory grew by {growth} bytes over {tail} hits ({served} in all); a leak of \
         half the recorder's 17 bytes a sample would be {bound}"
    );
    assert!(daemon.try_wait().unwrap().is_none(), "the daemon exited");
}

/// Sends `kv.get` hits on [`CONNECTIONS`] connections, [`DEPTH`] in flight on each, for
/// `period`; returns how many were answered.
async fn hits(socket: &std::path::Path, ns: &str, period: Duration) -> u64 {
    let deadline = Instant::now() + period;
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let (socket, ns) = (socket.to_owned(), ns.to_owned());
            tokio::spawn(async move {
                let mut s = UnixStream::connect(&socket).await.unwrap();
                let hello = encode_request(
                    0,
                    &Request::Hello {
                        version: 1,
                        client: None,
                    },
                );
                s.write_all(&framed(&[hello])).await.unwrap();
                skip_replies(&mut s, 1).await;
                let gets: Vec<Bytes> = (1..=DEPTH as u64)
                    .map(|id| {
                        encode_request(
                            id,
                            &Request::KvGet {
                                ns: ns.clone(),
                                key: Bytes::from_static(b"k"),
                                before: None,
                                consistent: false,
                            },
                        )
                    })
                    .collect();
                let batch = framed(&gets);
                let mut served = 0u64;
                while Instant::now() < deadline {
                    s.write_all(&batch).await.unwrap();
                    skip_replies(&mut s, DEPTH).await;
                    served += DEPTH as u64;
                }
                served
            })
        })
        .collect();
    let mut served = 0;
    for t in tasks {
        served += t.await.unwrap();
    }
    served
}

/// The bodies, each behind its 4-byte length.
fn framed(bodies: &[Bytes]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in bodies {
        out.extend_from_slice(&(b.len() as u32).to_be_bytes());
        out.extend_from_slice(b);
    }
    out
}

/// Reads and drops `n` reply frames.
async fn skip_replies(s: &mut UnixStream, n: usize) {
    let mut body = Vec::new();
    for _ in 0..n {
        let len = s.read_u32().await.unwrap() as usize;
        body.resize(len, 0);
        s.read_exact(&mut body).await.unwrap();
    }
}
