//! Fleet mode on real parts: DynamoDB Local, a real `redis-server`, and daemon processes
//! on tables of their own (so that their leases and streams are theirs alone).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ddbcached::config::Config;
use ddbcached::fleet::lease::{lease_id, Leases};
use ddbcached::store::KvStore;
use ddbcached::{aws, tables};
use ddbcached_protocol::Client;
use tokio::process::Child;

use crate::harness::{
    dynamo_config, endpoint, free_port, http_get, name, spawn_daemon, RedisServer,
};

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
    _process: Child,
    socket: PathBuf,
    metrics: std::net::SocketAddr,
}

impl Fleet {
    /// Creates tables for it and starts `n` daemons with `extra` configuration lines in
    /// their `[fanout]` section.
    async fn start(n: usize, extra: &str) -> Fleet {
        let mut config = dynamo_config(endpoint());
        let prefix = name();
        config.dynamodb.kv_table = format!("{prefix}_kv");
        config.dynamodb.log_table = format!("{prefix}_log");
        config.dynamodb.lease_table = format!("{prefix}_leases");
        let client = aws::dynamodb_client(&config.dynamodb, Default::default()).await;
        tables::init_tables(&client, &config.dynamodb)
            .await
            .unwrap();
        let mut fleet = Fleet {
            config,
            redis: RedisServer::start().await,
            members: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
        };
        for _ in 0..n {
            fleet.add(extra).await;
        }
        fleet
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
             [fanout]\nredis_url = {:?}\nlease_ms = 1500\n{extra}\n",
            d.kv_table,
            d.log_table,
            d.lease_table,
            self.redis.url(),
        );
        let (process, socket) = spawn_daemon(&dir, &toml).await;
        self.members.push(Member {
            _process: process,
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
        for m in &self.members {
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

/// One daemon's samples, by metric name with labels (`name{a="b",...}`).
async fn scrape(addr: std::net::SocketAddr) -> HashMap<String, f64> {
    let (_, body) = http_get(addr, "/metrics").await;
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

/// The sum of a metric's samples whose labels contain every one of `labels`.
fn total(samples: &HashMap<String, f64>, metric: &str, labels: &[&str]) -> f64 {
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

    let mut relays = [0.0; 2];
    for m in &fleet.members {
        let s = scrape(m.metrics).await;
        let held = [
            total(&s, "ddbcached_fanout_leases_held", &["table=\"kv\""]),
            total(&s, "ddbcached_fanout_leases_held", &["table=\"log\""]),
        ];
        relays[0] += held[0];
        relays[1] += held[1];
        let get_records = total(
            &s,
            "ddbcached_dynamodb_calls_total",
            &["api=\"GetRecords\""],
        );
        if held == [0.0, 0.0] {
            assert_eq!(get_records, 0.0, "a daemon without a lease read the stream");
        } else {
            assert!(get_records > 0.0, "a relay that never read");
        }
        // The cache was in use: hits, and no table bypassed at the end.
        assert!(total(&s, "ddbcached_cache_reads_total", &["served=\"hit\""]) > 0.0);
        assert_eq!(total(&s, "ddbcached_stream_bypassing", &[]), 0.0);
    }
    assert_eq!(relays, [2.0, 2.0], "two relay leases held per table");
}

#[tokio::test(flavor = "multi_thread")]
async fn leases_change_hands_only_by_conditional_writes() {
    let mut config = dynamo_config(endpoint());
    config.dynamodb.lease_table = format!("{}_leases", name());
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
