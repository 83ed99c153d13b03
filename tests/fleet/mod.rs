//! Fleet mode on real parts: DynamoDB Local, a real `redis-server`, and daemon processes
//! on tables of their own (so that their leases and streams are theirs alone).

mod api;
mod cluster;
mod prometheus;
mod redis_faults;
mod relays;
mod scale;
mod visibility;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ddbcached::cache::Cache;
use ddbcached::changes::Changes;
use ddbcached::coherence::Coherence;
use ddbcached::config::{CacheConfig, Config};
use ddbcached::fleet::consumer::{self, Consuming};
use ddbcached::fleet::entry::{wall_ms, Codec, DecodeError, Entry, Event, Fact};
use ddbcached::fleet::lease::{lease_id, Leases};
use ddbcached::fleet::transport::{stream_key, Redis};
use ddbcached::fleet::FleetStats;
use ddbcached::registry::Table;
use ddbcached::store::KvStore;
use ddbcached::store::StoreTable;
use ddbcached::stream::FlushCause;
use ddbcached::{aws, tables};
use ddbcached_protocol::Client;
use tokio::process::Child;
use tokio_util::sync::CancellationToken;

use crate::harness::{
    dynamo_config, dynamodb_toml, endpoint, free_port, http_get, name, spawn_api_daemon,
    spawn_daemon_at, RedisCluster, RedisServer,
};
use crate::ops::{collect_exprs, samples};

/// The staleness bound the fleets here run with (the default).
const BOUND: Duration = Duration::from_millis(2000);
/// How long a fleet gets to show a change everywhere, on a machine loaded enough to make
/// DynamoDB Local and Redis ten times slower than usual; past the bound, reads bypass.
const CONVERGENCE: Duration = Duration::from_secs(60);

/// The Redis a fleet shares: one server, or a cluster.
trait SharedRedis {
    fn url(&self) -> String;
    /// The authority to trust (empty without TLS).
    fn ca_file(&self) -> String;
    /// Bytes sent to clients so far (`INFO stats`), summed over the nodes.
    async fn output_bytes(&self) -> u64;
    /// A plain `redis://` URL of the node holding `key` (of a Redis without TLS).
    async fn node_of(&self, key: &str) -> String;
}

impl SharedRedis for RedisServer {
    fn url(&self) -> String {
        RedisServer::url(self)
    }
    fn ca_file(&self) -> String {
        RedisServer::ca_file(self)
    }
    async fn output_bytes(&self) -> u64 {
        let client = redis::Client::open(self.url()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let info: String = redis::cmd("INFO")
            .arg("stats")
            .query_async(&mut c)
            .await
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    }
    async fn node_of(&self, _key: &str) -> String {
        self.url()
    }
}

impl SharedRedis for RedisCluster {
    fn url(&self) -> String {
        RedisCluster::url(self)
    }
    fn ca_file(&self) -> String {
        RedisCluster::ca_file(self)
    }
    async fn output_bytes(&self) -> u64 {
        RedisCluster::output_bytes(self).await
    }
    async fn node_of(&self, key: &str) -> String {
        let port = self.master_of(self.slot(key).await).await;
        format!("redis://127.0.0.1:{port}")
    }
}

/// Fleet daemons sharing tables of their own and one Redis.
struct Fleet<R = RedisServer> {
    // Dropped in this order: the daemons before their Redis.
    members: Vec<Member>,
    redis: R,
    /// Its DynamoDB's endpoint and tables.
    config: Config,
    /// Lines of the `[streams]` section of daemons added from now on.
    streams: String,
    dir: tempfile::TempDir,
}

struct Member {
    /// Killed when dropped.
    process: Child,
    /// Neither killed nor paused: its metrics can be scraped.
    answering: bool,
    socket: PathBuf,
    metrics: std::net::SocketAddr,
}

impl Fleet {
    /// Creates tables for it and starts `n` daemons with `extra` configuration lines in
    /// their `[fleet]` section.
    async fn start(n: usize, extra: &str) -> Fleet {
        Fleet::start_on(RedisServer::start().await, n, extra).await
    }

    /// A fleet of no daemon yet on the DynamoDB at `endpoint`.
    async fn start_at(endpoint: &str) -> Fleet {
        Fleet::start_at_on(RedisServer::start().await, endpoint, 0, "").await
    }

    /// A fresh fleet of `n` daemons in which key `k` holds `v1` and every daemon has
    /// read it: the clients and the namespace.
    async fn with_cached_key(n: usize, extra: &str) -> (Fleet, Vec<Client>, String) {
        Fleet::with_cached_key_on(RedisServer::start().await, n, extra).await
    }
}

impl<R: SharedRedis> Fleet<R> {
    /// The same on a given Redis.
    async fn start_on(redis: R, n: usize, extra: &str) -> Fleet<R> {
        Fleet::start_at_on(redis, endpoint(), n, extra).await
    }

    /// The same on a given Redis and DynamoDB.
    async fn start_at_on(redis: R, endpoint: &str, n: usize, extra: &str) -> Fleet<R> {
        let mut config = dynamo_config(endpoint);
        // Short enough for DynamoDB's 255 characters with any suffix.
        let prefix: String = name().chars().take(24).collect();
        config.dynamodb.kv_table = format!("{prefix}_kv");
        config.dynamodb.log_table = format!("{prefix}_log");
        config.dynamodb.lease_table = format!("{prefix}_leases");
        let client = aws::dynamodb_client(&config.dynamodb, Default::default()).await;
        tables::init_tables(&client, &config.dynamodb)
            .await
            .unwrap();
        let mut fleet = Fleet {
            config,
            redis,
            members: Vec::new(),
            streams: String::new(),
            dir: tempfile::tempdir().unwrap(),
        };
        for _ in 0..n {
            fleet.add(extra).await;
        }
        fleet
    }

    /// The same on a given Redis.
    async fn with_cached_key_on(
        redis: R,
        n: usize,
        extra: &str,
    ) -> (Fleet<R>, Vec<Client>, String) {
        let fleet = Fleet::start_on(redis, n, extra).await;
        fleet.wait_until_fresh().await;
        let clients = fleet.clients().await;
        let ns = name();
        clients[0].kv_put(&ns, b("k"), b("v1"), 1).await.unwrap();
        for c in &clients {
            c.kv_get(&ns, b("k"), None).await.unwrap();
        }
        (fleet, clients, ns)
    }

    /// Starts one more daemon.
    async fn add(&mut self, extra: &str) {
        self.add_member(extra, true).await;
    }

    /// Starts one more daemon, serving the stores or (`stores` false) only the DynamoDB
    /// API, which `extra` must then configure.
    async fn add_member(&mut self, extra: &str, stores: bool) {
        let i = self.members.len();
        let dir = self.dir.path().join(format!("d{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let d = &self.config.dynamodb;
        let toml = format!(
            "[dynamodb]\nkv_table = {:?}\nlog_table = {:?}\nlease_table = {:?}\n\
             [streams]\npoll_interval_ms = 100\n{}\n\
             [metrics]\nlisten = \"{metrics}\"\n\
             [fleet]\nredis_url = {:?}\ntls_ca_file = {:?}\nlease_ms = 1500\n{extra}\n",
            d.kv_table,
            d.log_table,
            d.lease_table,
            self.streams,
            self.redis.url(),
            self.redis.ca_file(),
        );
        let (process, socket) = match stores {
            true => spawn_daemon_at(&dir, &toml, &self.config.dynamodb.endpoint).await,
            false => {
                let toml = format!("{toml}[stores]\nenabled = false\n");
                let process =
                    spawn_api_daemon(&dir, &toml, metrics, &self.config.dynamodb.endpoint).await;
                (process, dir.join("no-stores.sock"))
            }
        };
        self.members.push(Member {
            process,
            answering: true,
            socket,
            metrics,
        });
    }

    async fn clients(&self) -> Vec<Client> {
        let mut out = Vec::new();
        for m in &self.members {
            out.push(Client::connect(&m.socket).await.unwrap());
        }
        out
    }

    /// A plain SDK client on the fleet's key-value table: writes around every daemon.
    async fn direct_kv(&self) -> KvStore {
        KvStore::new(
            aws::dynamodb_client(&self.config.dynamodb, Default::default()).await,
            self.config.dynamodb.kv_table.clone(),
            10,
        )
    }

    /// Waits until every daemon is fresh (it has accepted a watermark for both tables).
    async fn wait_until_fresh(&self) {
        let deadline = Instant::now() + CONVERGENCE;
        for m in self.members.iter().filter(|m| m.answering) {
            while bypassing(m.metrics, &[]).await != 0.0 {
                assert!(Instant::now() < deadline, "never fresh");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Every entry the key-value table's Redis stream holds, decoded as unsigned, read
    /// through the daemon's own client.
    async fn kv_entries(&self) -> Vec<Result<Entry, DecodeError>> {
        self.entries(&self.config.dynamodb.kv_table).await
    }

    /// The same for any table the fleet carries.
    async fn entries(&self, table: &str) -> Vec<Result<Entry, DecodeError>> {
        let d = &self.config.dynamodb;
        let mut c = Redis::open(&self.redis.url(), &self.redis.ca_file())
            .unwrap()
            .connect(None)
            .await
            .unwrap();
        let (keys, after) = ([stream_key(&d.lease_table, table)], ["0-0".to_owned()]);
        let streams = c.read(&keys, &after, Duration::from_millis(1), 100_000);
        let codec = Codec::new("");
        streams
            .await
            .unwrap()
            .into_iter()
            .flat_map(|(_, entries)| entries)
            .map(|e| codec.decode(|f| e.fields.get(f).map(Vec::as_slice)))
            .collect()
    }
}

/// A fleet of two on `redis`: writes through one daemon reach the other, and a write
/// around both reaches both, with no failed Redis call.
async fn relays_and_hints<R: SharedRedis>(redis: R) {
    let fleet = Fleet::start_on(redis, 2, "").await;
    fleet.wait_until_fresh().await;
    let clients = fleet.clients().await;
    let ns = name();
    clients[0].kv_put(&ns, b("k"), b("v1"), 1).await.unwrap();
    seen_within_bound(&clients[1], &ns, "k", "v1").await;
    clients[0].kv_put(&ns, b("k"), b("v2"), 2).await.unwrap();
    seen_within_bound(&clients[1], &ns, "k", "v2").await;
    let direct = fleet.direct_kv().await;
    direct.put(&ns, b"k", b("v3"), 3).await.unwrap();
    for c in &clients {
        seen_within_bound(c, &ns, "k", "v3").await;
    }
    let s = scrape(fleet.members[1].metrics).await;
    assert!(total(&s, "ddbcached_fleet_consumed_total", &[]) > 0.0);
    assert_eq!(total(&s, "ddbcached_fleet_redis_errors_total", &[]), 0.0);
}

/// How many of a daemon's tables (among those `labels` select) bypass the cache, for
/// want of a proof of freshness.
async fn bypassing(addr: std::net::SocketAddr, labels: &[&str]) -> f64 {
    total(&scrape(addr).await, "ddbcached_stream_bypassing", labels)
}

/// Whether a daemon's key-value table is proven fresh.
async fn kv_fresh(addr: std::net::SocketAddr) -> bool {
    bypassing(addr, &["table=\"kv\""]).await == 0.0
}

/// One daemon's samples, by metric name with labels (`name{a="b",...}`).
async fn scrape(addr: std::net::SocketAddr) -> BTreeMap<String, f64> {
    samples(&http_get(addr, "/metrics").await.1)
}

/// The sum of a metric's samples whose labels contain every one of `labels`.
fn total(samples: &BTreeMap<String, f64>, metric: &str, labels: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(k, _)| {
            k.split('{').next() == Some(metric) && labels.iter().all(|l| k.contains(l))
        })
        .map(|(_, v)| v)
        .sum()
}

/// Runs a consumer of `tables`, whose Redis streams are `keys`, until `stop`: positioned
/// before this returns, and no table joins it later.
async fn consume(ctx: Consuming, tables: Vec<Table>, keys: &[String], stop: &CancellationToken) {
    let start = consumer::position(&ctx, keys).await.unwrap();
    let carried = consumer::Carried::new(ctx.me, tables, keys.to_vec());
    let (_, joining) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(consumer::run(
        Arc::new(ctx),
        carried,
        joining,
        Some(start),
        stop.clone(),
    ));
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// Reads `key` through `c` until it holds `want`, which was written before this call.
/// Fails if a read that began more than the bound after the call showed anything else
/// (past it, a daemon not proven fresh bypasses its cache), or if `want` is never seen.
/// Returns when the last read that did not show it began (zero: the first one did).
async fn seen_within_bound(c: &Client, ns: &str, key: &str, want: &str) -> Duration {
    let start = Instant::now();
    let mut missed_at = Duration::ZERO;
    loop {
        let began = start.elapsed();
        let got = c.kv_get(ns, b(key), None).await.unwrap();
        if got.is_some_and(|v| v.value == b(want)) {
            return missed_at;
        }
        missed_at = began;
        assert!(
            began <= BOUND,
            "a read that began {began:?} after the write missed it"
        );
        assert!(start.elapsed() < CONVERGENCE, "never seen");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

impl<R: SharedRedis> Fleet<R> {
    /// Per daemon, whether it publishes the key-value table (0 for one that does not
    /// answer).
    async fn kv_relays(&self) -> Vec<f64> {
        self.kv_gauge("ddbcached_fleet_publishing").await
    }

    /// Per daemon, a gauge of the key-value table (0 for one that does not answer).
    async fn kv_gauge(&self, metric: &str) -> Vec<f64> {
        let mut values = Vec::new();
        for m in &self.members {
            values.push(match m.answering {
                true => total(&scrape(m.metrics).await, metric, &["table=\"kv\""]),
                false => 0.0,
            });
        }
        values
    }

    /// The index of the daemon publishing the key-value table.
    async fn a_kv_relay(&self) -> usize {
        let deadline = Instant::now() + CONVERGENCE;
        loop {
            if let Some(i) = self.kv_relays().await.iter().position(|h| *h > 0.0) {
                return i;
            }
            assert!(Instant::now() < deadline, "no relay");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends `signal` to daemon `i`, which answers afterwards only if it is `CONT`.
    fn signal(&mut self, i: usize, signal: &str) {
        self.members[i].answering = signal == "CONT";
        let pid = self.members[i].process.id().unwrap();
        let ok = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} {pid}");
    }

    /// Flushes of the key-value table by `cause`, summed over the daemons `of`.
    async fn flushes(&self, of: &[usize], cause: &str) -> f64 {
        let mut sum = 0.0;
        for &i in of {
            let s = scrape(self.members[i].metrics).await;
            sum += total(
                &s,
                "ddbcached_stream_flushes_total",
                &[&format!("cause=\"{cause}\"")],
            );
        }
        sum
    }

    /// Flushes of the key-value table for any of `causes`, summed over every daemon.
    async fn flushes_for(&self, causes: &[&str]) -> f64 {
        let all: Vec<usize> = (0..self.members.len()).collect();
        let mut sum = 0.0;
        for cause in causes {
            sum += self.flushes(&all, cause).await;
        }
        sum
    }

    /// After its Redis lost every stream: waits until every daemon has flushed for one
    /// of `causes` since they counted `before`, then until the fleet is fresh again and a
    /// write around every daemon reaches them all.
    async fn recovers_from_an_empty_redis(
        &self,
        clients: &[Client],
        ns: &str,
        causes: &[&str],
        before: f64,
    ) {
        let deadline = Instant::now() + CONVERGENCE;
        while self.flushes_for(causes).await < before + self.members.len() as f64 {
            assert!(Instant::now() < deadline, "not every daemon flushed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.wait_until_fresh().await;
        let watching: Vec<&Client> = clients.iter().collect();
        write_around_and_watch(self, &watching, ns, "v1", "v2", 2, CONVERGENCE).await;
    }
}

/// Writes `key` around every daemon to `new` (it held `old`), then reads it through every
/// client until each sees `new`, failing if any read that began more than `BOUND` after
/// the write returns `old`. Returns the longest time to see it.
async fn write_around_and_watch<R: SharedRedis>(
    fleet: &Fleet<R>,
    clients: &[&Client],
    ns: &str,
    old: &str,
    new: &str,
    ts: i64,
    limit: Duration,
) -> Duration {
    fleet
        .direct_kv()
        .await
        .put(ns, b"k", b(new), ts)
        .await
        .unwrap();
    let written = Instant::now();
    let mut slowest = Duration::ZERO;
    for c in clients {
        loop {
            let began = Instant::now();
            let got = c.kv_get(ns, b("k"), None).await.unwrap().unwrap().value;
            if got == b(new) {
                slowest = slowest.max(began - written);
                break;
            }
            assert_eq!(got, b(old), "an unknown value");
            assert!(
                began - written <= BOUND,
                "stale read {:?} after the write",
                began - written
            );
            assert!(written.elapsed() < limit, "never seen");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    slowest
}

impl<R: SharedRedis> Fleet<R> {
    async fn kv_relays_among(&self, of: &[usize]) -> bool {
        let held = self.kv_relays().await;
        of.iter().any(|&i| held[i] > 0.0)
    }
}
