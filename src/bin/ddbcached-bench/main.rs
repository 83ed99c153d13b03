//! `ddbcached-bench`: the load generator. It drives a target over its socket with N
//! connections and D requests in flight per connection for a fixed time, and prints
//! throughput and latency percentiles (send to reply), as text or JSON.
//!
//! Targets, measured by the same loops with the same settings:
//! - `daemon`: a running ddbcached;
//! - `echo`: the floor, `ddbcached-bench echo-server`: the same framing, answered at once;
//! - `redis`: a Redis server on its Unix socket (GET/SET of the same sizes);
//! - `dynamodb`: DynamoDB called directly with the AWS SDK (endpoint and tables from
//!   `--config` / `DDBCACHED_*`): for `miss` and `put` as the daemon's misses and writes
//!   call it, for `log` and `step` as zio-flow's own DynamoDB backend does ([`zioflow`]),
//!   for the item workloads as any program does ([`items`]);
//! - `api`: the daemon's DynamoDB API front at `--endpoint`, with the same SDK calls as
//!   `dynamodb` for the item workloads;
//! - `api-echo`: the floor of those, `ddbcached-bench api-echo-server` at `--endpoint`: an
//!   HTTP server answering every call at once with a canned item ([`api_echo`]).
//!
//! With `--server-pid`, every row also reports the server's CPU time per million
//! operations, read from `/proc` over the measured period: client and server share the
//! cores, so throughput alone would favour a server that leaves more of them to the client.
//!
//! Workloads: `get-hit` (preloaded keys, read once before the clock starts), `mixed` (90%
//! get, 10% put), `miss` (every read goes to DynamoDB: the daemon's consistent-read
//! bypass, or the SDK's Query), `put`, `log` (append, then read the entry back) and `step`
//! (a workflow step: read a variable, write its next version, append to the flow's log,
//! read the entry back, as one operation); through DynamoDB's API, `item-get`, `item-query`
//! and `item-put` ([`items`]).

mod api_echo;
mod echo;
mod framed;
mod items;
mod redis;
mod zioflow;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use ddbcached::config::Config;
use ddbcached::store::KvStore;
use ddbcached_protocol::{Client, Request};
use futures::future::try_join_all;

const NAMESPACE: &str = "ddbcached-bench";

#[derive(Parser)]
#[command(
    name = "ddbcached-bench",
    about = "Load generator for ddbcached and its baselines"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Drive a target and report.
    Run(RunArgs),
    /// Create the item workloads' table (with a stream) unless it exists.
    CreateItemsTable {
        /// Configuration naming DynamoDB.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Serve the DynamoDB API's floor on a loopback address (until killed).
    ApiEchoServer {
        #[arg(long)]
        listen: String,
        /// Size of the binary attribute in the canned item.
        #[arg(long, default_value_t = 64)]
        value_bytes: usize,
    },
    /// Serve the echo floor on a Unix socket (until killed).
    EchoServer {
        #[arg(long)]
        socket: PathBuf,
        /// Size of the value in each canned reply.
        #[arg(long, default_value_t = 64)]
        value_bytes: usize,
    },
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    #[arg(long, value_enum, default_value = "daemon")]
    target: Target,
    /// Socket of the daemon, the echo floor or Redis.
    #[arg(long, env = "DDBCACHED_SOCKET", default_value = "/tmp/ddbcached.sock")]
    socket: PathBuf,
    /// Configuration naming DynamoDB, for `--target dynamodb` and `--target api`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The daemon's DynamoDB API front, for `--target api`.
    #[arg(long, default_value = "http://127.0.0.1:8100")]
    endpoint: String,
    #[arg(long, value_enum, default_value = "get-hit")]
    workload: Workload,
    /// Connections.
    #[arg(long, short = 'c', default_value_t = 1)]
    connections: usize,
    /// Requests in flight per connection (pipeline depth).
    #[arg(long, short = 'd', default_value_t = 1)]
    depth: usize,
    /// Measured time, in seconds (after a one-second warm-up).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    seconds: u64,
    /// Distinct keys.
    #[arg(long, default_value_t = 1000)]
    keys: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 64)]
    value_bytes: usize,
    /// The server's process, to report its CPU time per operation.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Print one JSON object instead of a line of text.
    #[arg(long)]
    json: bool,
    /// The name the report gives the target, for rows of one target under other
    /// conditions (the same SDK calls against another DynamoDB Local, say).
    #[arg(long)]
    label: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Target {
    Daemon,
    Echo,
    Redis,
    Dynamodb,
    Api,
    ApiEcho,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Workload {
    GetHit,
    Mixed,
    Miss,
    Put,
    Log,
    Step,
    ItemGet,
    ItemQuery,
    ItemPut,
}

impl Workload {
    /// The item workload this is, if it is one.
    fn item(self) -> Option<items::Item> {
        match self {
            Workload::ItemGet => Some(items::Item::Get),
            Workload::ItemQuery => Some(items::Item::Query),
            Workload::ItemPut => Some(items::Item::Put),
            _ => None,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::EchoServer {
            socket,
            value_bytes,
        } => echo::serve(&socket, value_bytes).await,
        Command::ApiEchoServer {
            listen,
            value_bytes,
        } => api_echo::serve(&listen, value_bytes).await,
        Command::CreateItemsTable { config } => {
            items::create_table(&sdk_client(config.as_deref(), None).await?).await
        }
        Command::Run(args) => run(args).await,
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.connections > 0 && args.depth > 0 && args.keys > 0,
        "counts must be positive"
    );
    let value = Bytes::from(vec![b'v'; args.value_bytes]);
    preload(&args, &value)
        .await
        .context("preloading the keys")?;
    let warm_until = Instant::now() + Duration::from_secs(1);
    let stop_at = warm_until + Duration::from_secs(args.seconds);
    let cpu = args.server_pid.map(|pid| {
        tokio::spawn(async move {
            tokio::time::sleep_until(warm_until.into()).await;
            let before = cpu_seconds(pid)?;
            tokio::time::sleep_until(stop_at.into()).await;
            Ok::<f64, anyhow::Error>(cpu_seconds(pid)? - before)
        })
    });
    let loops = (0..args.connections).map(|c| {
        let (args, value) = (args.clone(), value.clone());
        tokio::spawn(async move {
            connection(&args, c, value, warm_until, stop_at)
                .await
                .with_context(|| format!("connection {c}"))
        })
    });
    let mut latencies: Vec<u64> = Vec::new();
    for l in try_join_all(loops).await? {
        latencies.extend(l?);
    }
    let server_cpu = match cpu {
        Some(task) => Some(task.await??),
        None => None,
    };
    report(&args, latencies, server_cpu);
    Ok(())
}

/// CPU time (user and system) a process has used, in seconds. `/proc/PID/stat` counts it
/// in USER_HZ ticks, which Linux fixes at 100 a second for user space.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces: the
    // 14th and 15th fields of the line (utime, stime) are the 12th and 13th after it.
    let rest = stat.rsplit_once(')').context("a /proc stat line")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .context("a short /proc stat line")?
            .parse::<u64>()? as f64)
    };
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// Puts the keys the workload reads where the target will find them (and, for the
/// daemon's hits, reads each once so that it is cached).
async fn preload(args: &RunArgs, value: &Bytes) -> anyhow::Result<()> {
    let reads = matches!(
        args.workload,
        Workload::GetHit | Workload::Mixed | Workload::Miss
    );
    if let Some(item) = args.workload.item() {
        if args.target == Target::ApiEcho {
            return Ok(());
        }
        return items::preload(&item_client(args).await?, item, args.keys, value).await;
    }
    if !reads {
        return Ok(());
    }
    match args.target {
        Target::Daemon | Target::Dynamodb => {
            // Dynamodb reads what the daemon wrote: both use the same tables and encoding.
            let socket = if args.target == Target::Dynamodb {
                None
            } else {
                Some(&args.socket)
            };
            match socket {
                Some(socket) => {
                    let c = Client::connect_as(socket, "ddbcached-bench").await?;
                    for chunk in (0..args.keys).collect::<Vec<_>>().chunks(64) {
                        try_join_all(
                            chunk
                                .iter()
                                .map(|k| c.kv_put(NAMESPACE, key(*k), value.clone(), 1)),
                        )
                        .await?;
                    }
                    for chunk in (0..args.keys).collect::<Vec<_>>().chunks(64) {
                        try_join_all(chunk.iter().map(|k| c.kv_get(NAMESPACE, key(*k), None)))
                            .await?;
                    }
                }
                None => {
                    let kv = direct_store(args).await?;
                    for chunk in (0..args.keys).collect::<Vec<_>>().chunks(64) {
                        try_join_all(chunk.iter().map(|k| {
                            let (kv, value, k) = (&kv, value.clone(), key(*k));
                            async move { kv.put(NAMESPACE, &k, value, 1).await }
                        }))
                        .await?;
                    }
                }
            }
        }
        Target::Redis => set_all_redis(args, value).await?,
        Target::Echo | Target::Api | Target::ApiEcho => {}
    }
    Ok(())
}

/// SETs every key once in Redis.
async fn set_all_redis(args: &RunArgs, value: &Bytes) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(&args.socket).await?;
    let mut buf = Vec::new();
    for k in 0..args.keys {
        let (kb, vb) = (key(k), value);
        buf.extend_from_slice(format!("*3\r\n$3\r\nSET\r\n${}\r\n", kb.len()).as_bytes());
        buf.extend_from_slice(&kb);
        buf.extend_from_slice(format!("\r\n${}\r\n", vb.len()).as_bytes());
        buf.extend_from_slice(vb);
        buf.extend_from_slice(b"\r\n");
    }
    s.write_all(&buf).await?;
    let want = b"+OK\r\n".len() * args.keys;
    let mut got = vec![0u8; want];
    s.read_exact(&mut got).await?;
    anyhow::ensure!(got.chunks(5).all(|c| c == b"+OK\r\n"), "redis SET failed");
    Ok(())
}

/// An SDK client of the configured DynamoDB, or of `endpoint` (the daemon's front).
async fn sdk_client(
    config: Option<&std::path::Path>,
    endpoint: Option<&str>,
) -> anyhow::Result<aws_sdk_dynamodb::Client> {
    let mut config = Config::load(config).context("loading the configuration")?;
    if let Some(endpoint) = endpoint {
        config.dynamodb.endpoint = endpoint.to_owned();
    }
    Ok(ddbcached::aws::dynamodb_client(&config.dynamodb, Default::default()).await)
}

/// The SDK client an item workload of `args` calls.
async fn item_client(args: &RunArgs) -> anyhow::Result<aws_sdk_dynamodb::Client> {
    let front = matches!(args.target, Target::Api | Target::ApiEcho);
    let endpoint = front.then_some(args.endpoint.as_str());
    sdk_client(args.config.as_deref(), endpoint).await
}

async fn direct_store(args: &RunArgs) -> anyhow::Result<KvStore> {
    let config = Config::load(args.config.as_deref()).context("loading the configuration")?;
    let client = ddbcached::aws::dynamodb_client(&config.dynamodb, Default::default()).await;
    Ok(KvStore::new(
        client,
        config.dynamodb.kv_table.clone(),
        config.dynamodb.batch_max_attempts,
    ))
}

/// One connection's loop (or, for the direct SDK target, `depth` concurrent callers).
async fn connection(
    args: &RunArgs,
    c: usize,
    value: Bytes,
    warm_until: Instant,
    stop_at: Instant,
) -> anyhow::Result<Vec<u64>> {
    let keys = args.keys;
    let mut rng = XorShift::new(c as u64);
    let mut ts = ((c as i64) << 40) + 2;
    let sdk = matches!(
        args.target,
        Target::Api | Target::ApiEcho | Target::Dynamodb
    );
    if let (true, Some(item)) = (sdk, args.workload.item()) {
        let client = item_client(args).await?;
        let callers = args.depth;
        return items::run(&client, item, callers, keys, &value, warm_until, stop_at).await;
    }
    match (args.target, args.workload) {
        (
            Target::Daemon | Target::Echo,
            Workload::GetHit | Workload::Mixed | Workload::Miss | Workload::Put,
        ) => {
            let workload = args.workload;
            framed::run(&args.socket, args.depth, warm_until, stop_at, move || {
                let k = key(rng.below(keys));
                let write = workload == Workload::Put
                    || (workload == Workload::Mixed && rng.below(10) == 0);
                if write {
                    ts += 1;
                    Request::KvPut {
                        ns: NAMESPACE.into(),
                        key: k,
                        value: value.clone(),
                        ts,
                    }
                } else {
                    Request::KvGet {
                        ns: NAMESPACE.into(),
                        key: k,
                        before: None,
                        consistent: workload == Workload::Miss,
                    }
                }
            })
            .await
        }
        (Target::Redis, Workload::GetHit | Workload::Mixed | Workload::Put) => {
            let workload = args.workload;
            redis::run(&args.socket, args.depth, warm_until, stop_at, move || {
                let k = key(rng.below(keys)).to_vec();
                if workload == Workload::Put || (workload == Workload::Mixed && rng.below(10) == 0)
                {
                    redis::Command::Set(k, value.to_vec())
                } else {
                    redis::Command::Get(k)
                }
            })
            .await
        }
        (Target::Dynamodb, Workload::Miss | Workload::Put) => {
            let kv = direct_store(args).await?;
            let callers = (0..args.depth).map(|slot| {
                let (kv, value, workload) = (kv.clone(), value.clone(), args.workload);
                let mut rng = XorShift::new((c * 1000 + slot) as u64);
                async move {
                    let mut latencies = Vec::new();
                    let mut ts = ((c * 1000 + slot) as i64) << 32;
                    loop {
                        let start = Instant::now();
                        if start >= stop_at {
                            return Ok::<_, anyhow::Error>(latencies);
                        }
                        let k = key(rng.below(keys));
                        if workload == Workload::Put {
                            ts += 1;
                            kv.put(NAMESPACE, &k, value.clone(), ts).await?;
                        } else {
                            kv.newest_versions(NAMESPACE, &k, 64).await?;
                        }
                        if start >= warm_until {
                            latencies.push(start.elapsed().as_nanos() as u64);
                        }
                    }
                }
            });
            Ok(try_join_all(callers).await?.concat())
        }
        (Target::Dynamodb, Workload::Log | Workload::Step) => {
            let config =
                Config::load(args.config.as_deref()).context("loading the configuration")?;
            let client =
                ddbcached::aws::dynamodb_client(&config.dynamodb, Default::default()).await;
            let tables = zioflow::Tables {
                kv: config.dynamodb.kv_table.clone(),
                log: config.dynamodb.log_table.clone(),
            };
            let callers = (0..args.depth).map(|slot| {
                let (client, tables, value, workload) =
                    (&client, &tables, value.clone(), args.workload);
                let topic = format!("{NAMESPACE}-sdk-{}-{c}-{slot}", std::process::id());
                async move {
                    let mut latencies = Vec::new();
                    let mut clock = 0i64;
                    loop {
                        let start = Instant::now();
                        if start >= stop_at {
                            return Ok::<_, anyhow::Error>(latencies);
                        }
                        clock += 1;
                        if workload == Workload::Step {
                            zioflow::step_variable(client, tables, &topic, &value, clock).await?;
                        }
                        zioflow::append_and_read(client, tables, &topic, &value).await?;
                        if start >= warm_until {
                            latencies.push(start.elapsed().as_nanos() as u64);
                        }
                    }
                }
            });
            Ok(try_join_all(callers).await?.concat())
        }
        (Target::Daemon, Workload::Log | Workload::Step) => {
            let client = Client::connect_as(&args.socket, "ddbcached-bench").await?;
            let callers = (0..args.depth).map(|slot| {
                let (client, value, workload) = (client.clone(), value.clone(), args.workload);
                let topic = format!("{NAMESPACE}-{}-{c}-{slot}", std::process::id());
                async move { sequence(client, workload, topic, value, warm_until, stop_at).await }
            });
            Ok(try_join_all(callers).await?.concat())
        }
        _ => bail!("this workload does not apply to this target"),
    }
}

/// The dependent workloads: each operation waits for the previous one's answer.
async fn sequence(
    client: Client,
    workload: Workload,
    topic: String,
    value: Bytes,
    warm_until: Instant,
    stop_at: Instant,
) -> anyhow::Result<Vec<u64>> {
    let mut latencies = Vec::new();
    let mut clock = 0i64;
    loop {
        let start = Instant::now();
        if start >= stop_at {
            return Ok(latencies);
        }
        clock += 1;
        if workload == Workload::Step {
            let state = Bytes::from_static(b"state");
            client
                .kv_get(&topic, state.clone(), Some(clock - 1))
                .await?;
            client.kv_put(&topic, state, value.clone(), clock).await?;
        }
        let i = client.log_put(&topic, value.clone()).await?;
        let tail = client.log_scan(&topic, i, i).await?;
        anyhow::ensure!(tail.len() == 1, "the entry just written is missing");
        if start >= warm_until {
            latencies.push(start.elapsed().as_nanos() as u64);
        }
    }
}

fn report(args: &RunArgs, mut latencies: Vec<u64>, server_cpu: Option<f64>) {
    latencies.sort_unstable();
    let ops = latencies.len() as f64 / args.seconds as f64;
    // CPU seconds per million operations (numerically, µs of server CPU per operation).
    let cpu_per_mop = server_cpu.map(|s| s * 1e6 / latencies.len().max(1) as f64);
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |ns| *ns as f64 / 1000.0)
    };
    let (p50, p99, p999) = (pct(0.50), pct(0.99), pct(0.999));
    let target = args
        .target
        .to_possible_value()
        .expect("no skipped variants");
    let target = args.label.as_deref().unwrap_or(target.get_name());
    let workload = args
        .workload
        .to_possible_value()
        .expect("no skipped variants");
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "target": target, "workload": workload.get_name(),
                "connections": args.connections, "depth": args.depth, "value_bytes": args.value_bytes,
                "seconds": args.seconds, "requests": latencies.len(),
                "ops_per_sec": ops, "p50_us": p50, "p99_us": p99, "p999_us": p999,
                "server_cpu_s_per_mop": cpu_per_mop,
            })
        );
    } else {
        let cpu = cpu_per_mop.map_or(String::new(), |c| format!("  server CPU {c:.1} s/Mop"));
        println!(
            "{:<8} {:<7} c={:<3} d={:<3} {:>6} B {:>10.0} ops/s  p50 {:>8.1} us  p99 {:>8.1} us  p99.9 {:>8.1} us{cpu}",
            target,
            workload.get_name(),
            args.connections,
            args.depth,
            args.value_bytes,
            ops,
            p50,
            p99,
            p999
        );
    }
}

fn key(n: usize) -> Bytes {
    Bytes::from(format!("key-{n:08}"))
}

/// A small xorshift: choosing a key must cost less than the request.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        XorShift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}
