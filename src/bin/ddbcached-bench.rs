//! `ddbcached-bench`: a load generator that drives a running daemon over its Unix socket
//! with N connections and D requests in flight per connection for a fixed time, and
//! prints throughput and latency percentiles (from sending a request to its reply).
//!
//! Workloads:
//! - `get`: `kv.get` of keys written before the clock starts (`--keys` of them): once
//!   warm, every read is a cache hit;
//! - `miss`: `kv.get` with the `consistent` flag, so every read bypasses the cache: one
//!   strongly consistent DynamoDB Query and a cache fill, the path of a miss;
//! - `put`: `kv.put` of random keys at increasing timestamps (every one goes to DynamoDB);
//! - `log`: `log.put` to one topic per request slot, then `log.scan` of the entry written;
//! - `step`: a workflow step, as one operation: read the flow's variable as of its clock,
//!   write its next version, append to the flow's log, read that entry back.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use ddbcached_protocol::Client;
use futures::future::try_join_all;

#[derive(Parser)]
#[command(
    name = "ddbcached-bench",
    about = "Load generator for a running ddbcached daemon"
)]
struct Args {
    /// Socket of the daemon.
    #[arg(long, env = "DDBCACHED_SOCKET", default_value = "/tmp/ddbcached.sock")]
    socket: PathBuf,
    #[arg(long, value_enum, default_value = "get")]
    workload: Workload,
    /// Connections.
    #[arg(long, short = 'c', default_value_t = 1)]
    connections: usize,
    /// Requests in flight per connection (pipeline depth).
    #[arg(long, short = 'd', default_value_t = 1)]
    depth: usize,
    /// Measured time, in seconds (after a one-second warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Distinct keys of the `get` workload.
    #[arg(long, default_value_t = 1000)]
    keys: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 64)]
    value_bytes: usize,
    /// Print one JSON object instead of a line of text.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Workload {
    Get,
    Miss,
    Put,
    Log,
    Step,
}

const NAMESPACE: &str = "ddbcached-bench";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.connections > 0 && args.depth > 0 && args.keys > 0,
        "counts must be positive"
    );
    let mut clients = Vec::new();
    for _ in 0..args.connections {
        clients.push(
            Client::connect_as(&args.socket, "ddbcached-bench")
                .await
                .with_context(|| format!("connecting to {}", args.socket.display()))?,
        );
    }
    let value = Bytes::from(vec![b'v'; args.value_bytes]);
    if let Workload::Get | Workload::Miss = args.workload {
        for chunk in (0..args.keys).collect::<Vec<_>>().chunks(64) {
            try_join_all(
                chunk
                    .iter()
                    .map(|k| clients[0].kv_put(NAMESPACE, key(*k), value.clone(), 1)),
            )
            .await?;
        }
    }

    let warm_until = Instant::now() + Duration::from_secs(1);
    let stop_at = warm_until + Duration::from_secs(args.seconds);
    let mut workers = Vec::new();
    for (ci, client) in clients.iter().enumerate() {
        for slot in 0..args.depth {
            let worker = Worker {
                client: client.clone(),
                workload: args.workload,
                keys: args.keys,
                value: value.clone(),
                topic: format!("{NAMESPACE}-{}-{ci}-{slot}", std::process::id()),
                seed: (ci * args.depth + slot) as u64,
            };
            workers.push(tokio::spawn(worker.run(warm_until, stop_at)));
        }
    }
    let mut latencies = Vec::new();
    for w in workers {
        latencies.extend(w.await??);
    }
    latencies.sort_unstable();
    let ops = latencies.len() as f64 / args.seconds as f64;
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |ns| *ns as f64 / 1000.0)
    };
    let (p50, p99, p999) = (pct(0.50), pct(0.99), pct(0.999));
    let name = args
        .workload
        .to_possible_value()
        .expect("no skipped variants");
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "workload": name.get_name(), "connections": args.connections, "depth": args.depth,
                "value_bytes": args.value_bytes, "seconds": args.seconds, "requests": latencies.len(),
                "ops_per_sec": ops, "p50_us": p50, "p99_us": p99, "p999_us": p999,
            })
        );
    } else {
        println!(
            "{:<5} c={:<3} d={:<3} {:>6} B  {:>10.0} ops/s  p50 {:>8.1} us  p99 {:>8.1} us  p99.9 {:>8.1} us",
            name.get_name(), args.connections, args.depth, args.value_bytes, ops, p50, p99, p999
        );
    }
    Ok(())
}

fn key(n: usize) -> Bytes {
    Bytes::from(format!("key-{n:08}"))
}

/// One request loop: a slot of a connection's pipeline.
struct Worker {
    client: Client,
    workload: Workload,
    keys: usize,
    value: Bytes,
    topic: String,
    seed: u64,
}

impl Worker {
    /// Runs requests back to back until `stop_at`; returns the latencies (ns) of those
    /// that started after `warm_until`.
    async fn run(self, warm_until: Instant, stop_at: Instant) -> anyhow::Result<Vec<u64>> {
        let mut latencies = Vec::new();
        // A small xorshift: key choice must not cost more than the request.
        let mut x = self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut ts = (self.seed as i64) << 32;
        loop {
            let start = Instant::now();
            if start >= stop_at {
                return Ok(latencies);
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            match self.workload {
                Workload::Get | Workload::Miss => {
                    let k = key(x as usize % self.keys);
                    let consistent = matches!(self.workload, Workload::Miss);
                    let got = self
                        .client
                        .kv_get_with(NAMESPACE, k, None, consistent)
                        .await?;
                    anyhow::ensure!(got.is_some(), "a preloaded key is missing");
                }
                Workload::Put => {
                    ts += 1;
                    let k = key(x as usize % self.keys);
                    self.client
                        .kv_put(NAMESPACE, k, self.value.clone(), ts)
                        .await?;
                }
                Workload::Step => {
                    ts += 1;
                    let state = Bytes::from_static(b"state");
                    self.client
                        .kv_get(&self.topic, state.clone(), Some(ts - 1))
                        .await?;
                    self.client
                        .kv_put(&self.topic, state, self.value.clone(), ts)
                        .await?;
                    let i = self.client.log_put(&self.topic, self.value.clone()).await?;
                    let tail = self.client.log_scan(&self.topic, i, i).await?;
                    anyhow::ensure!(tail.len() == 1, "the entry just written is missing");
                }
                Workload::Log => {
                    let i = self.client.log_put(&self.topic, self.value.clone()).await?;
                    let tail = self.client.log_scan(&self.topic, i, i).await?;
                    anyhow::ensure!(tail.len() == 1, "the entry just written is missing");
                }
            }
            if start >= warm_until {
                latencies.push(start.elapsed().as_nanos() as u64);
            }
        }
    }
}
