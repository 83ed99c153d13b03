//! Fleet mode on real parts: DynamoDB Local, a real `redis-server`, and daemon processes
//! on tables of their own (so that their leases and streams are theirs alone).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ddbcached::cache::{Cache, CacheKey, Cached, KeyVersions};
use ddbcached::coherence::Coherence;
use ddbcached::config::{CacheConfig, Config};
use ddbcached::fleet::consumer::{self, Consuming};
use ddbcached::fleet::entry::{wall_ms, Codec, Entry, Event};
use ddbcached::fleet::lease::{lease_id, Leases};
use ddbcached::fleet::transport::{stream_key, Redis};
use ddbcached::fleet::FleetStats;
use ddbcached::store::KvStore;
use ddbcached::store::StoreTable;
use ddbcached::stream::FlushCause;
use ddbcached::{aws, tables};
use ddbcached_protocol::Client;
use tokio::process::Child;
use tokio_util::sync::CancellationToken;

use crate::harness::{
    dynamo_config, endpoint, free_port, http_get, name, spawn_daemon, RedisServer,
};
use crate::ops::{collect_exprs, samples};

/// The staleness bound the fleets here run with (the default).
const BOUND: Duration = Duration::from_millis(2000);

/// Fleet daemons sharing tables of their own and one Redis.
struct Fleet {
    // Dropped in this order: the daemons before their Redis.
    members: Vec<Member>,
    redis: RedisServer,
    config: Config,
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

    /// The same on a given Redis.
    async fn start_on(redis: RedisServer, n: usize, extra: &str) -> Fleet {
        let mut config = dynamo_config(endpoint());
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
            dir: tempfile::tempdir().unwrap(),
        };
        for _ in 0..n {
            fleet.add(extra).await;
        }
        fleet
    }

    /// A fresh fleet of `n` daemons in which key `k` holds `v1` and every daemon has
    /// read it: the clients and the namespace.
    async fn with_cached_key(n: usize, extra: &str) -> (Fleet, Vec<Client>, String) {
        let fleet = Fleet::start(n, extra).await;
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
        let i = self.members.len();
        let dir = self.dir.path().join(format!("d{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let d = &self.config.dynamodb;
        let toml = format!(
            "[dynamodb]\nkv_table = {:?}\nlog_table = {:?}\nlease_table = {:?}\n\
             [streams]\npoll_interval_ms = 100\n\
             [metrics]\nlisten = \"{metrics}\"\n\
             [fleet]\nredis_url = {:?}\ntls_ca_file = {:?}\nlease_ms = 1500\n{extra}\n",
            d.kv_table,
            d.log_table,
            d.lease_table,
            self.redis.url(),
            self.redis.ca_file(),
        );
        let (process, socket) = spawn_daemon(&dir, &toml).await;
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

    /// Waits until every daemon says it is fresh (it has accepted a watermark).
    async fn wait_until_fresh(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for m in self.members.iter().filter(|m| m.answering) {
            let c = Client::connect(&m.socket).await.unwrap();
            loop {
                let (_, detail) = c.health().await.unwrap();
                if !detail.contains("not proven fresh") {
                    break;
                }
                assert!(Instant::now() < deadline, "never fresh: {detail}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Whether a daemon's health detail proves the key-value table fresh (it lists the
/// tables that are not: "kv and log not proven fresh", "log not proven fresh").
fn kv_fresh(detail: &str) -> bool {
    !detail.contains("kv and log not proven") && !detail.contains("; kv not proven")
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

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// Reads `key` through `c` until it holds `want`; how long that took, or `None` past `limit`.
async fn seen_within(
    c: &Client,
    ns: &str,
    key: &str,
    want: &str,
    limit: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() <= limit {
        let got = c.kv_get(ns, b(key), None).await.unwrap();
        if got.is_some_and(|v| v.value == b(want)) {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread")]
async fn four_daemons_two_relays_per_table_and_every_write_seen_everywhere() {
    let fleet = Fleet::start(4, "").await;
    fleet.wait_until_fresh().await;
    let clients = fleet.clients().await;
    let ns = name();

    // Every daemon caches the key's first value.
    clients[0].kv_put(&ns, b("k"), b("v1"), 1).await.unwrap();
    for c in &clients {
        assert!(seen_within(c, &ns, "k", "v1", BOUND).await.is_some());
        c.kv_get(&ns, b("k"), None).await.unwrap();
    }

    // Through daemon 0: the write hint reaches the others.
    clients[0].kv_put(&ns, b("k"), b("v2"), 2).await.unwrap();
    let mut through = Vec::new();
    for c in &clients[1..] {
        let lag = seen_within(c, &ns, "k", "v2", BOUND).await;
        through.push(lag.expect("a write through a daemon is seen within the bound"));
    }

    // Around every daemon: the relays' batches reach everyone.
    fleet
        .direct_kv()
        .await
        .put(&ns, b"k", b("v3"), 3)
        .await
        .unwrap();
    let mut around = Vec::new();
    for c in &clients {
        let lag = seen_within(c, &ns, "k", "v3", BOUND).await;
        around.push(lag.expect("a write around the daemons is seen within the bound"));
    }
    eprintln!("visibility: through a daemon {through:?}, around them {around:?}");

    // Only lease holders read the stream: a daemon that never held a lease (under a
    // loaded machine a lease can change hands) made no GetRecords call.
    let mut relays = [0.0; 2];
    for m in &fleet.members {
        let s = scrape(m.metrics).await;
        let held = [
            total(&s, "ddbcached_fleet_leases_held", &["table=\"kv\""]),
            total(&s, "ddbcached_fleet_leases_held", &["table=\"log\""]),
        ];
        relays[0] += held[0];
        relays[1] += held[1];
        let get_records = total(
            &s,
            "ddbcached_dynamodb_calls_total",
            &["api=\"GetRecords\""],
        );
        if total(&s, "ddbcached_fleet_lease_changes_total", &[]) == 0.0 {
            assert_eq!(get_records, 0.0, "a daemon without a lease read the stream");
        } else if held != [0.0, 0.0] {
            assert!(get_records > 0.0, "a relay that never read");
        }
    }
    assert!(relays[0] <= 2.0 && relays[1] <= 2.0, "{relays:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while fleet.kv_relays().await.iter().sum::<f64>() < 2.0 {
        assert!(Instant::now() < deadline, "two relay leases held per table");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The cache is in use: once a daemon is fresh, a second read of a key is a hit
    // (on a loaded machine a relay may fall behind and reads bypass for a while).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        fleet.wait_until_fresh().await;
        for c in &clients {
            c.kv_get(&ns, b("k"), None).await.unwrap();
            c.kv_get(&ns, b("k"), None).await.unwrap();
        }
        let mut hits = 0.0;
        for m in &fleet.members {
            let s = scrape(m.metrics).await;
            hits += total(&s, "ddbcached_cache_reads_total", &["served=\"hit\""]);
        }
        if hits > 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no read was served from the cache"
        );
    }
    // Health says each daemon's role.
    let mut roles = Vec::new();
    for c in &clients {
        let (ready, detail) = c.health().await.unwrap();
        assert!(ready);
        roles.push(detail);
    }
    assert!(
        roles.iter().all(|d| d.contains("fleet mode (kv: ")),
        "{roles:?}"
    );
    assert!(roles.iter().any(|d| d.contains("kv: relay")), "{roles:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn leases_change_hands_only_by_conditional_writes() {
    let mut config = dynamo_config(endpoint());
    config.dynamodb.lease_table = format!("{}_leases", name().chars().take(24).collect::<String>());
    let client = aws::dynamodb_client(&config.dynamodb, Default::default()).await;
    tables::init_tables(&client, &config.dynamodb)
        .await
        .unwrap();
    let leases = Leases::new(client, config.dynamodb.lease_table.clone());
    let id = lease_id("t", 0);

    let a = leases.create(&id, "a").await.unwrap().expect("a new lease");
    assert_eq!((a.counter, a.epoch), (1, 1));
    assert!(
        leases.create(&id, "b").await.unwrap().is_none(),
        "exists already"
    );
    let checkpoints = BTreeMap::from([("shard".to_owned(), "100".to_owned())]);
    let a = leases
        .renew(&a, "arn", &checkpoints, false)
        .await
        .unwrap()
        .unwrap();

    // b takes it over from what it read; a, paused meanwhile, can neither renew nor
    // move the checkpoint; b resumes from a's checkpoint, in a new epoch.
    let seen = leases.read(&id).await.unwrap().unwrap();
    let b = leases.take(&seen, "b").await.unwrap().expect("taken over");
    assert_eq!((b.owner.as_str(), b.epoch), ("b", 2));
    assert_eq!(b.checkpoints, checkpoints);
    let late = BTreeMap::from([("shard".to_owned(), "999".to_owned())]);
    assert!(leases
        .renew(&a, "arn", &late, false)
        .await
        .unwrap()
        .is_none());
    assert!(
        leases.take(&seen, "c").await.unwrap().is_none(),
        "counter moved"
    );
    assert_eq!(
        leases.read(&id).await.unwrap().unwrap().checkpoints,
        checkpoints
    );

    // Released: free for anyone at once, checkpoints kept.
    let released = leases
        .renew(&b, "arn", &checkpoints, true)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(released.owner, "");
    let stored = leases.read(&id).await.unwrap().unwrap();
    assert_eq!(
        (stored.owner.as_str(), stored.counter),
        ("", released.counter)
    );
}

impl Fleet {
    /// Per daemon, the relay leases it holds on the key-value table (0 for one that
    /// does not answer).
    async fn kv_relays(&self) -> Vec<f64> {
        let mut held = Vec::new();
        for m in &self.members {
            held.push(match m.answering {
                true => total(
                    &scrape(m.metrics).await,
                    "ddbcached_fleet_leases_held",
                    &["table=\"kv\""],
                ),
                false => 0.0,
            });
        }
        held
    }

    /// The index of a daemon relaying the key-value table.
    async fn a_kv_relay(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(10);
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
}

/// Writes `key` around every daemon to `new` (it held `old`), then reads it through every
/// client until each sees `new`, failing if any read that began more than `BOUND` after
/// the write returns `old`. Returns the longest time to see it.
async fn write_around_and_watch(
    fleet: &Fleet,
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

#[tokio::test(flavor = "multi_thread")]
async fn one_slot_a_killed_relay_is_replaced_and_nothing_stale_is_served_meanwhile() {
    let (mut fleet, clients, ns) = Fleet::with_cached_key(3, "relay_slots = 1").await;
    let relay = fleet.a_kv_relay().await;
    let others: Vec<usize> = (0..3).filter(|i| *i != relay).collect();

    let resets = fleet.flushes(&others, "no_checkpoint").await;
    fleet.signal(relay, "KILL");
    let killed = Instant::now();
    let watching: Vec<&Client> = others.iter().map(|&i| &clients[i]).collect();
    let seen = write_around_and_watch(
        &fleet,
        &watching,
        &ns,
        "v1",
        "v2",
        2,
        Duration::from_secs(15),
    )
    .await;

    // Another daemon took the lease within lease_ms plus a few rounds.
    let deadline = killed + Duration::from_millis(1500 + 3000);
    loop {
        let held = fleet.kv_relays().await;
        if others.iter().any(|&i| held[i] > 0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the lease was not taken over: {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "lease taken over {:?} after the kill; the write around seen after {seen:?}",
        killed.elapsed()
    );
    // The new relay resumed from the old one's checkpoint: it published no reset.
    // A reset would be the new relay's first entry. Past the bound since the kill, a
    // fresh daemon has read a watermark of the new relay, so whatever preceded it.
    tokio::time::sleep_until((killed + BOUND).into()).await;
    fleet.wait_until_fresh().await;
    assert_eq!(fleet.flushes(&others, "no_checkpoint").await, resets);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_slots_the_other_relay_keeps_the_fleet_fresh() {
    let (mut fleet, clients, ns) = Fleet::with_cached_key(4, "").await;
    let relay = fleet.a_kv_relay().await;
    let others: Vec<usize> = (0..4).filter(|i| *i != relay).collect();
    fleet.signal(relay, "KILL");
    let watching: Vec<&Client> = others.iter().map(|&i| &clients[i]).collect();
    // Seen through the surviving relay well within the bound, with no bypass.
    let seen = write_around_and_watch(&fleet, &watching, &ns, "v1", "v2", 2, BOUND).await;
    for &i in &others {
        let s = scrape(fleet.members[i].metrics).await;
        assert_eq!(total(&s, "ddbcached_stream_bypassing", &[]), 0.0);
    }
    eprintln!("with one of two relays killed, the write around seen after {seen:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_zombie_relay_cannot_move_the_checkpoint_and_changes_nothing() {
    let (mut fleet, clients, ns) = Fleet::with_cached_key(3, "relay_slots = 1").await;
    let relay = fleet.a_kv_relay().await;
    let others: Vec<usize> = (0..3).filter(|i| *i != relay).collect();

    fleet.signal(relay, "STOP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fleet.kv_relays_among(&others).await {
        assert!(
            Instant::now() < deadline,
            "no take-over from the paused relay"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let leases = Leases::new(
        aws::dynamodb_client(&fleet.config.dynamodb, Default::default()).await,
        fleet.config.dynamodb.lease_table.clone(),
    );
    let id = lease_id(&fleet.config.dynamodb.kv_table, 0);
    let holder = leases.read(&id).await.unwrap().unwrap();

    fleet.signal(relay, "CONT");
    let watching: Vec<&Client> = clients.iter().collect();
    write_around_and_watch(
        &fleet,
        &watching,
        &ns,
        "v1",
        "v2",
        2,
        Duration::from_secs(10),
    )
    .await;
    // The zombie finds its renewal refused at its next attempt and stops relaying.
    let deadline = Instant::now() + Duration::from_secs(5);
    while fleet.kv_relays().await[relay] > 0.0 {
        assert!(Instant::now() < deadline, "the zombie kept relaying");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The new holder renews on (its counter moves) and is still the owner, in its epoch.
    let now = loop {
        let now = leases.read(&id).await.unwrap().unwrap();
        if now.counter > holder.counter {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "the lease is not renewed any more"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(now.owner, holder.owner, "the zombie got its lease back");
    assert_eq!(now.epoch, holder.epoch);
}

impl Fleet {
    async fn kv_relays_among(&self, of: &[usize]) -> bool {
        let held = self.kv_relays().await;
        of.iter().any(|&i| held[i] > 0.0)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_restarted_empty_every_daemon_flushes_and_recovers() {
    let (mut fleet, clients, ns) = Fleet::with_cached_key(3, "").await;
    let all: Vec<usize> = (0..3).collect();
    let before = fleet.flushes(&all, "reconnected").await;
    fleet.redis.kill();
    fleet.redis.restart().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while fleet.flushes(&all, "reconnected").await < before + 3.0 {
        assert!(Instant::now() < deadline, "not every daemon flushed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fleet.wait_until_fresh().await;
    let watching: Vec<&Client> = clients.iter().collect();
    write_around_and_watch(&fleet, &watching, &ns, "v1", "v2", 2, BOUND).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_down_past_the_bound_reads_bypass_then_recover() {
    let (mut fleet, clients, ns) = Fleet::with_cached_key(3, "").await;
    fleet.redis.kill();
    // Nothing invalidates now: the write around is seen only by bypassing.
    let watching: Vec<&Client> = clients.iter().collect();
    let seen = write_around_and_watch(
        &fleet,
        &watching,
        &ns,
        "v1",
        "v2",
        2,
        Duration::from_secs(10),
    )
    .await;
    // Once the last watermark is older than the bound, both tables bypass.
    tokio::time::sleep(BOUND).await;
    for c in &clients {
        let (_, detail) = c.health().await.unwrap();
        assert!(detail.contains("kv and log not proven fresh"), "{detail}");
    }
    eprintln!("with Redis down, the write around seen after {seen:?} (by bypassing)");
    fleet.redis.restart().await;
    fleet.wait_until_fresh().await;
    write_around_and_watch(&fleet, &watching, &ns, "v2", "v3", 3, BOUND).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn three_daemons_in_fleet_mode_and_writes_around_them_pass_the_consistency_checker() {
    let fleet = Fleet::start(3, "").await;
    fleet.wait_until_fresh().await;
    let d = &fleet.config.dynamodb;
    let config = fleet.dir.path().join("check.toml");
    std::fs::write(
        &config,
        format!(
            "[dynamodb]\nendpoint = \"{}\"\nregion = \"us-east-1\"\nuse_dummy_credentials = true\n\
             kv_table = {:?}\nlog_table = {:?}\n",
            endpoint(),
            d.kv_table,
            d.log_table,
        ),
    )
    .unwrap();
    let mut check = tokio::process::Command::new(env!("CARGO_BIN_EXE_ddbcached-check"));
    check.arg("--config").arg(&config);
    for m in &fleet.members {
        check.arg("--socket").arg(&m.socket);
    }
    let out = check
        .args(["--ops", "15000", "--around", "2", "--json"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .await
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(report["violation_count"], 0, "{report:#}");
    assert!(out.status.success(), "{report:#}");
    assert_eq!(report["operations"]["total"], 15000);
    // The writes around the daemons were among those the reads were checked against.
    assert!(report["operations"]["kv_put_around"].as_u64().unwrap() > 100);
    assert_eq!(report["operations"]["failed_reads"], 0);
}

/// One simulated host: its own small cache, the daemon's coherence and consumer code,
/// and its own Redis connection.
struct SimHost {
    cache: Arc<Cache>,
}

/// Percentile `p` (0..=100) of sorted durations.
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() - 1) * p / 100]
}

#[tokio::test(flavor = "multi_thread")]
async fn a_simulated_fleet_of_hundreds_of_hosts_sees_every_write_within_the_bound() {
    let hosts: usize = std::env::var("DDBCACHED_SIM_HOSTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let writes = 20;
    // Two real daemons: the relays, and the writers of half the writes.
    let fleet = Fleet::start(2, "").await;
    fleet.wait_until_fresh().await;
    let clients = fleet.clients().await;
    let direct = fleet.direct_kv().await;
    let d = &fleet.config.dynamodb;
    let redis = Redis::open(&fleet.redis.url(), "").unwrap();
    let keys = [stream_key(&d.kv_table), stream_key(&d.log_table)];
    let stop = CancellationToken::new();
    let mut sims = Vec::new();
    for h in 0..hosts {
        let cache = Arc::new(Cache::new(&CacheConfig {
            max_bytes: 1 << 20,
            ..CacheConfig::default()
        }));
        let ctx = Arc::new(Consuming {
            me: format!("sim-{h}"),
            redis: redis.clone(),
            codec: Codec::new(""),
            coherence: Arc::new(Coherence::new(
                cache.clone(),
                2000,
                metrics::Histogram::noop(),
            )),
            keys: keys.clone(),
            clock_skew_ms: 250,
            stats: Arc::default(),
            fleet_lag: metrics::Histogram::noop(),
            hint_lag: metrics::Histogram::noop(),
        });
        let start = consumer::position(&ctx).await.unwrap();
        tokio::spawn(consumer::run(ctx, Some(start), stop.clone()));
        sims.push(SimHost { cache });
    }

    let ns = name();
    let (mut through, mut around) = (Vec::new(), Vec::new());
    for w in 0..writes {
        let key = CacheKey::kv(&ns, format!("k{w}").as_bytes());
        // Every host holds the key's old state.
        for s in &sims {
            let t = s.cache.ticket(&key);
            let absent = Cached::Kv(Arc::new(KeyVersions::absent()));
            assert!(s.cache.commit_fill(key.clone(), t, |_| Some(absent)).await);
        }
        let by_daemon = w % 2 == 0;
        if by_daemon {
            clients[0]
                .kv_put(&ns, b(&format!("k{w}")), b("v"), 1)
                .await
                .unwrap();
        } else {
            direct
                .put(&ns, format!("k{w}").as_bytes(), b("v"), 1)
                .await
                .unwrap();
        }
        let acked = Instant::now();
        let mut pending: Vec<usize> = (0..hosts).collect();
        while !pending.is_empty() {
            let mut still = Vec::new();
            for h in pending {
                if sims[h].cache.get(&key).await.is_some() {
                    still.push(h);
                } else if by_daemon {
                    through.push(acked.elapsed());
                } else {
                    around.push(acked.elapsed());
                }
            }
            pending = still;
            assert!(
                acked.elapsed() < BOUND,
                "{} hosts still hold the old state past the bound",
                pending.len()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    through.sort();
    around.sort();
    for (what, lags) in [
        ("through daemons (hints)", &through),
        ("around them (stream)", &around),
    ] {
        eprintln!(
            "{hosts} simulated hosts, writes {what}: p50 {:?}, p99 {:?}, max {:?} over {} host-writes",
            percentile(lags, 50),
            percentile(lags, 99),
            lags.last().unwrap(),
            lags.len()
        );
    }

    // Costs, without the poller above: an idle window (watermarks only), then a window
    // of writes through a daemon and around them; what the writes add over idle is
    // theirs. CPU: the relays' processes, and this process (the simulated consumers).
    // Daemon 1 serves none of the writes: it only relays (both tables, like daemon 0)
    // and consumes.
    let relay_pid = fleet.members[1].process.id().unwrap();
    let window = Duration::from_secs(3);
    let measure = async |load: bool| {
        let (egress, relay_cpu, consumer_cpu) = (
            redis_output_bytes(&fleet.redis).await,
            cpu_seconds(relay_pid),
            cpu_seconds(std::process::id()),
        );
        let started = Instant::now();
        let mut n = 0;
        while started.elapsed() < window {
            if load {
                let key = format!("cost{n}");
                clients[0].kv_put(&ns, b(&key), b("v"), 1).await.unwrap();
                direct.put(&ns, key.as_bytes(), b("v"), 2).await.unwrap();
                n += 2;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        (
            n as f64,
            (redis_output_bytes(&fleet.redis).await - egress) as f64,
            cpu_seconds(relay_pid) - relay_cpu,
            cpu_seconds(std::process::id()) - consumer_cpu,
        )
    };
    let (_, idle_egress, idle_relay, idle_consumer) = measure(false).await;
    let (n, egress, relay, consumer) = measure(true).await;
    let per_write = |busy: f64, idle: f64| (busy - idle).max(0.0) / n;
    eprintln!(
        "{hosts} simulated hosts, {n} writes: Redis egress {:.0} B per write per host \
         ({:.0} B/s per host idle); a relay's CPU (its own consumer included) {:.0} µs per \
         write ({:.1} ms/s idle); a simulated host's consumer CPU {:.1} µs per write",
        per_write(egress, idle_egress) / hosts as f64,
        idle_egress / 3.5 / hosts as f64,
        per_write(relay, idle_relay) * 1e6,
        idle_relay / 3.5 * 1e3,
        per_write(consumer, idle_consumer) * 1e6 / hosts as f64,
    );
    stop.cancel();
}

/// Bytes Redis has sent to its clients so far.
async fn redis_output_bytes(server: &RedisServer) -> u64 {
    let client = redis::Client::open(server.url()).unwrap();
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

/// CPU seconds a process has used (user and system).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): utime and stime are the
    // 12th and 13th, in clock ticks of 1/100 s.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / 100.0
}

/// A GET to a loopback HTTP server that may answer in chunks: the body.
async fn http_body(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, mut body) = out.split_once("\r\n\r\n").unwrap();
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return body.to_owned();
    }
    let mut whole = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            return whole;
        }
        whole.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|c| match c {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (c as char).to_string()
            }
            _ => format!("%{c:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_prometheus_scrapes_a_loaded_fleet_and_every_dashboard_query_has_data() {
    let fleet = Fleet::start(2, "").await;
    fleet.wait_until_fresh().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let targets: Vec<String> = fleet
        .members
        .iter()
        .map(|m| format!("\"{}\"", m.metrics))
        .collect();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: ddbcached\n    \
             static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        ),
    )
    .unwrap();
    let mut prometheus = tokio::process::Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start prometheus (Debian's prometheus package)");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    // Load on both daemons: writes (hints, echoes, relayed batches) and reads.
    let clients = fleet.clients().await;
    let ns = name();
    let started = Instant::now();
    let mut i = 0u64;
    while started.elapsed() < Duration::from_secs(20) {
        for c in &clients {
            let key = b(&format!("k{}", i % 50));
            c.kv_put(&ns, key.clone(), b("v"), i as i64).await.unwrap();
            c.kv_get(&ns, key, None).await.unwrap();
            c.log_put(&ns, b("e")).await.unwrap();
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/grafana-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    let mut empty = Vec::new();
    for expr in &exprs {
        let query = expr
            .replace("$instance", ".*")
            .replace("$__rate_interval", "15s");
        let body = http_body(addr, &format!("/api/v1/query?query={}", encode(&query))).await;
        let answer: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert_eq!(answer["status"], "success", "{query}: {answer}");
        if answer["data"]["result"]
            .as_array()
            .is_none_or(|r| r.is_empty())
        {
            empty.push(query);
        }
    }
    assert!(empty.is_empty(), "queries without data: {empty:#?}");
    eprintln!(
        "{} dashboard queries evaluated by Prometheus, each with data",
        exprs.len()
    );
    prometheus.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_and_garbled_entries_are_gaps_never_proofs() {
    // No relay: nothing but the entries forged below could make the daemon fresh.
    let fleet = Fleet::start(1, "relay_eligible = false\nauth_key = \"fleet-secret\"").await;
    let client = &fleet.clients().await[0];
    let d = &fleet.config.dynamodb;
    let mut redis = Redis::open(&fleet.redis.url(), "")
        .unwrap()
        .connect(None)
        .await
        .unwrap();
    let kv = stream_key(&d.kv_table);
    let watermark = |n| Entry::Relay {
        relay: "forger".into(),
        epoch: 1,
        n,
        sent_ms: wall_ms(),
        event: Event::Watermark {
            t_ms: wall_ms() + 3_600_000,
            shards: BTreeMap::new(),
        },
    };
    let fresh = async || kv_fresh(&client.health().await.unwrap().1);
    assert!(!fresh().await);
    let bad_entries = || async {
        total(
            &scrape(fleet.members[0].metrics).await,
            "ddbcached_fleet_bad_entries_total",
            &[],
        )
    };

    // Unsigned, signed with another key, and garbage: each refused, counted and flushed.
    for fields in [
        Codec::new("").encode(&watermark(1)),
        Codec::new("guess").encode(&watermark(2)),
        vec![("e", vec![0xc1, 0x00, 0xff])],
    ] {
        redis.append(&kv, &fields, 0).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while bad_entries().await < 3.0 {
        assert!(Instant::now() < deadline, "entries not refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!fresh().await, "a forged watermark was believed");
    assert_eq!(fleet.flushes(&[0], "bad_entry").await, 3.0);

    // The same watermark signed with the fleet's key is believed: the check above could
    // have failed.
    redis
        .append(&kv, &Codec::new("fleet-secret").encode(&watermark(3)), 0)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, detail) = client.health().await.unwrap();
        if kv_fresh(&detail) {
            break;
        }
        assert!(Instant::now() < deadline, "{detail}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_paused_past_the_retention_flushes_and_serves_the_news() {
    let mut fleet = Fleet::start(3, "retention_ms = 2500").await;
    fleet.wait_until_fresh().await;
    // A daemon that relays nothing: pausing it stops only its consumer.
    let held = fleet.kv_relays().await;
    let mut logs = Vec::new();
    for m in &fleet.members {
        let s = scrape(m.metrics).await;
        logs.push(total(&s, "ddbcached_fleet_leases_held", &["table=\"log\""]));
    }
    let paused = (0..3)
        .find(|&i| held[i] == 0.0 && logs[i] == 0.0)
        .expect("two slots per table, three daemons: at least one consumer only");
    let clients = fleet.clients().await;
    let ns = name();
    clients[paused]
        .kv_put(&ns, b("k"), b("v1"), 1)
        .await
        .unwrap();
    clients[paused].kv_get(&ns, b("k"), None).await.unwrap();
    // Either way of noticing counts: a skipped entry number (the trim), or the read's
    // deadline passing while it was paused (a reconnect, which flushes as well).
    let flushes = async |fleet: &Fleet| {
        fleet.flushes(&[paused], "gap").await + fleet.flushes(&[paused], "reconnected").await
    };
    let before = flushes(&fleet).await;

    fleet.signal(paused, "STOP");
    fleet
        .direct_kv()
        .await
        .put(&ns, b"k", b("v2"), 2)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5000)).await;
    fleet.signal(paused, "CONT");

    // What it missed was trimmed away: it flushed, and serves the news.
    let deadline = Instant::now() + Duration::from_secs(5);
    while flushes(&fleet).await <= before {
        assert!(Instant::now() < deadline, "no flush after the trim");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = clients[paused]
        .kv_get(&ns, b("k"), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.value, b("v2"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fleet_over_tls_relays_and_hints() {
    let fleet = Fleet::start_on(RedisServer::start_tls().await, 2, "").await;
    assert!(fleet.redis.url().starts_with("rediss://"));
    fleet.wait_until_fresh().await;
    let clients = fleet.clients().await;
    let ns = name();
    clients[0].kv_put(&ns, b("k"), b("v1"), 1).await.unwrap();
    assert!(seen_within(&clients[1], &ns, "k", "v1", BOUND)
        .await
        .is_some());
    clients[0].kv_put(&ns, b("k"), b("v2"), 2).await.unwrap();
    assert!(seen_within(&clients[1], &ns, "k", "v2", BOUND)
        .await
        .is_some());
    fleet
        .direct_kv()
        .await
        .put(&ns, b"k", b("v3"), 3)
        .await
        .unwrap();
    for c in &clients {
        assert!(seen_within(c, &ns, "k", "v3", BOUND).await.is_some());
    }
    let s = scrape(fleet.members[1].metrics).await;
    assert!(total(&s, "ddbcached_fleet_consumed_total", &[]) > 0.0);
    assert_eq!(total(&s, "ddbcached_fleet_redis_errors_total", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_consumer_on_real_redis_flushes_on_a_skipped_number_and_ignores_a_repeat() {
    // The daemon's consumer code against a real Redis, fed by this test as the relay, so
    // that which entries exist is up to the test.
    let redis_server = RedisServer::start().await;
    let redis = Redis::open(&redis_server.url(), "").unwrap();
    let table = format!("t{}", name().chars().take(12).collect::<String>());
    let keys = [
        stream_key(&format!("{table}_kv")),
        stream_key(&format!("{table}_log")),
    ];
    let cache = Arc::new(Cache::new(&CacheConfig::default()));
    let coherence = Arc::new(Coherence::new(cache, 2000, metrics::Histogram::noop()));
    let stats = Arc::new(FleetStats::default());
    let ctx = Arc::new(Consuming {
        me: "consumer".into(),
        redis: redis.clone(),
        codec: Codec::new(""),
        coherence: coherence.clone(),
        keys: keys.clone(),
        clock_skew_ms: 250,
        stats: stats.clone(),
        fleet_lag: metrics::Histogram::noop(),
        hint_lag: metrics::Histogram::noop(),
    });
    let stop = CancellationToken::new();
    let start = consumer::position(&ctx).await.unwrap();
    tokio::spawn(consumer::run(ctx, Some(start), stop.clone()));

    let mut relay = redis.connect(None).await.unwrap();
    let mut publish = async |n: u64| {
        let entry = Entry::Relay {
            relay: "relay".into(),
            epoch: 1,
            n,
            sent_ms: wall_ms(),
            event: Event::Watermark {
                t_ms: wall_ms(),
                shards: BTreeMap::new(),
            },
        };
        relay
            .append(&keys[0], &Codec::new("").encode(&entry), 0)
            .await
            .unwrap();
    };
    // The consumer handles entries one after the other: once it has read an (ignored)
    // hint appended after the others, it has acted on every one before.
    let settled = async |entries: u64| {
        let marker = Entry::Hint {
            from: "another daemon".into(),
            sent_ms: wall_ms(),
            keys: Vec::new(),
        };
        let mut c = redis.connect(None).await.unwrap();
        c.append(&keys[0], &Codec::new("").encode(&marker), 0)
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while stats.consumed[StoreTable::Kv as usize].load(Ordering::Relaxed) < entries + 1 {
            assert!(Instant::now() < deadline, "the consumer did not read on");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let gaps = || coherence.snapshot().flushes[FlushCause::Gap as usize];

    publish(1).await;
    publish(2).await;
    publish(2).await; // a repeat: ignored
    settled(3).await;
    assert_eq!(gaps(), 0);
    assert!(
        !coherence.must_bypass(StoreTable::Kv),
        "the watermarks made it fresh"
    );
    publish(4).await; // 3 never arrives
    settled(5).await;
    assert_eq!(gaps(), 1, "the skipped number was seen");
    publish(5).await;
    settled(7).await;
    assert_eq!(gaps(), 1, "one gap, one flush");
    stop.cancel();
}
