//! A simulated fleet of hundreds of hosts on one Redis: visibility and what each write
//! costs (Redis egress, relay and consumer CPU).

use super::*;
use ddbcached::cache::{CacheKey, Cached, KeyVersions};

/// One simulated host: its own small cache, the daemon's coherence and consumer code,
/// and its own Redis connection.
struct SimHost {
    cache: Arc<Cache>,
    coherence: Arc<Coherence>,
}

/// Percentile `p` (0..=100) of sorted durations.
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() - 1) * p / 100]
}

/// Hosts simulated: `DDBCACHED_SIM_HOSTS`, or `default`.
fn hosts(default: usize) -> usize {
    std::env::var("DDBCACHED_SIM_HOSTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_simulated_fleet_of_hundreds_of_hosts_sees_every_write_within_the_bound() {
    simulate(Fleet::start(2, "").await, hosts(500)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_simulated_fleet_on_a_redis_cluster_sees_every_write_within_the_bound() {
    simulate(
        Fleet::start_on(RedisCluster::start().await, 2, "").await,
        hosts(100),
    )
    .await;
}

/// `hosts` simulated hosts beside `fleet`'s two real daemons (the relays, and the writers
/// of half the writes): how soon each sees each write, and what a write costs.
async fn simulate<R: SharedRedis>(fleet: Fleet<R>, hosts: usize) {
    let writes = 20;
    fleet.wait_until_fresh().await;
    let clients = fleet.clients().await;
    let direct = fleet.direct_kv().await;
    let d = &fleet.config.dynamodb;
    let redis = Redis::open(&fleet.redis.url(), "").unwrap();
    let keys = [
        stream_key(&d.lease_table, &d.kv_table),
        stream_key(&d.lease_table, &d.log_table),
    ];
    let tables = Table::stores([&d.kv_table, &d.log_table], |_| None).to_vec();
    let stop = CancellationToken::new();
    let mut sims = Vec::new();
    for h in 0..hosts {
        let cache = Arc::new(Cache::new(&CacheConfig {
            max_bytes: 1 << 20,
            ..CacheConfig::default()
        }));
        let coherence = Arc::new(Coherence::new(
            cache.clone(),
            BOUND.as_millis() as u64,
            metrics::Histogram::noop(),
        ));
        let ctx = Consuming {
            me: h as u64 + 1,
            redis: redis.clone(),
            codec: Codec::new(""),
            changes: Arc::new(Changes::new(&tables, coherence.clone(), None)),
            clock_skew_ms: 250,
            stats: Arc::new(FleetStats::new(&tables)),
            fleet_lag: metrics::Histogram::noop(),
            hint_lag: metrics::Histogram::noop(),
        };
        consume(ctx, tables.clone(), &keys, &stop).await;
        sims.push(SimHost { cache, coherence });
    }

    let ns = name();
    let (mut through, mut around) = (Vec::new(), Vec::new());
    for w in 0..writes {
        let key = CacheKey::kv(&ns, format!("k{w}").as_bytes());
        // Every host holds the key's old state. A fill is refused if the table was
        // flushed meanwhile (a consumer that reconnected on a loaded machine): again.
        for s in &sims {
            let deadline = Instant::now() + CONVERGENCE;
            loop {
                let t = s.cache.ticket(&key);
                let absent = Cached::Kv(Arc::new(KeyVersions::absent()));
                if s.cache.commit_fill(key.clone(), t, |_| Some(absent)).await {
                    break;
                }
                assert!(Instant::now() < deadline, "a host never kept the old state");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
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
        let mut bound_checked = false;
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
            if !bound_checked && acked.elapsed() >= BOUND {
                // Past the bound a host that still holds the old state must not serve it:
                // its freshness is unproven, so its reads bypass the cache. (Freshness
                // proven now would be as of after the write, which the consumer reads
                // first: the key would be gone.) A loaded machine may get here; a host
                // that serves stale data may not.
                for &h in &pending {
                    let bypassing = sims[h].coherence.must_bypass(StoreTable::Kv);
                    let held = sims[h].cache.get(&key).await.is_some();
                    assert!(
                        bypassing || !held,
                        "host {h} would serve the old state past the bound"
                    );
                }
                bound_checked = true;
            }
            assert!(
                acked.elapsed() < CONVERGENCE,
                "{} hosts never dropped the old state",
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
    // Long enough that the watermarks' timing (a few per second, idle or not) averages
    // out of the difference.
    let window = Duration::from_secs(10);
    let settle = Duration::from_millis(500);
    // Writes per burst through a daemon, and as many around them.
    const BURST: usize = 8;
    // Items of 32-byte keys: an 8-byte namespace and 24-byte keys.
    const COST_NS: &str = "costs-ns";
    let measure = async |load: bool| {
        let (egress, relay_cpu, consumer_cpu) = (
            fleet.redis.output_bytes().await,
            cpu_seconds(relay_pid),
            cpu_seconds(std::process::id()),
        );
        let started = Instant::now();
        let mut n = 0;
        while started.elapsed() < window {
            if load {
                // Bursts of BURST writes through a daemon and as many around it, as a
                // busy fleet makes them: entries carry several keys each.
                let keys: Vec<String> = (0..BURST).map(|i| format!("key-{:020}", n + i)).collect();
                let through = keys
                    .iter()
                    .map(|k| clients[0].kv_put(COST_NS, b(k), b("v"), 1));
                let around = keys
                    .iter()
                    .map(|k| direct.put(COST_NS, k.as_bytes(), b("v"), 2));
                for put in futures::future::join_all(through).await {
                    put.unwrap();
                }
                for put in futures::future::join_all(around).await {
                    put.unwrap();
                }
                n += 2 * BURST;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(settle).await;
        (
            n as f64,
            (fleet.redis.output_bytes().await - egress) as f64,
            cpu_seconds(relay_pid) - relay_cpu,
            cpu_seconds(std::process::id()) - consumer_cpu,
        )
    };
    let idle_from = wall_ms();
    let (_, idle_egress, idle_relay, idle_consumer) = measure(false).await;
    let busy_from = wall_ms();
    let (n, egress, relay, consumer) = measure(true).await;
    let busy_to = wall_ms();
    let (idle_entries, idle_bytes) = published(&fleet.redis, &keys, idle_from, busy_from).await;
    let (entries, bytes) = published(&fleet.redis, &keys, busy_from, busy_to).await;
    let per_write = |busy: f64, idle: f64| (busy - idle).max(0.0) / n;
    let per_second = |idle: f64| idle / (window + settle).as_secs_f64();
    eprintln!(
        "{hosts} simulated hosts, {n} writes: Redis egress {:.0} B per write per host \
         ({:.0} B/s per host idle); a relay's CPU (its own consumer included) {:.0} µs per \
         write ({:.1} ms/s idle); a simulated host's consumer CPU {:.1} µs per write",
        per_write(egress, idle_egress) / hosts as f64,
        per_second(idle_egress) / hosts as f64,
        per_write(relay, idle_relay) * 1e6,
        per_second(idle_relay) * 1e3,
        per_write(consumer, idle_consumer) * 1e6 / hosts as f64,
    );
    // What the streams hold, whatever the replies that carry it: each host receives
    // every entry once, plus each reply's framing (the stream's name, ids).
    eprintln!(
        "{hosts} simulated hosts, {n} writes: {entries} entries published ({idle_entries} \
         idle), {:.1} B of entries (ids and fields) per write",
        per_write(bytes as f64, idle_bytes as f64),
    );
    stop.cancel();
}

/// A stream entry as XRANGE answers it: its id and its fields.
type StreamEntry = (String, Vec<(String, Vec<u8>)>);

/// The entries of `keys` with ids from `from_ms` to before `to_ms`: how many, and their
/// ids' and fields' bytes.
async fn published<R: SharedRedis>(
    redis: &R,
    keys: &[String],
    from_ms: u64,
    to_ms: u64,
) -> (usize, usize) {
    let (mut count, mut bytes) = (0, 0);
    for key in keys {
        let client = redis::Client::open(redis.node_of(key).await).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let entries: Vec<StreamEntry> = redis::cmd("XRANGE")
            .arg(key)
            .arg(from_ms)
            .arg(format!("({to_ms}"))
            .query_async(&mut c)
            .await
            .unwrap();
        count += entries.len();
        bytes += entries
            .iter()
            .map(|(id, fields)| {
                id.len() + fields.iter().map(|(f, v)| f.len() + v.len()).sum::<usize>()
            })
            .sum::<usize>();
    }
    (count, bytes)
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
