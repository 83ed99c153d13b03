//! The clients: on every daemon, `clients` connections, each running one operation at a
//! time on a small shared set of keys and topics, recording each into the history; and
//! optionally clients writing key-value versions straight to DynamoDB, around every
//! daemon (recorded as writes of a daemon index past the last one).

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use ddbcached::store::KvStore;
use ddbcached_protocol::Client;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::history::{kv_value, History, KvRead, KvWrite, LogAppend, LogRead, Nanos};

/// What to run.
#[derive(Clone, Debug)]
pub struct Workload {
    pub ops: u64,
    pub clients_per_daemon: usize,
    /// Clients writing around the daemons.
    pub around: usize,
    pub keys: usize,
    pub topics: usize,
    /// Fraction of operations that write.
    pub write_fraction: f64,
    /// Fraction of operations on the indexed store (the rest are key-value).
    pub log_fraction: f64,
    pub seed: u64,
}

/// Where a run's operations go: one namespace and topic prefix of its own, so that runs
/// never see each other's data.
pub struct Names {
    pub run: String,
}

impl Names {
    pub fn namespace(&self) -> String {
        format!("check-{}", self.run)
    }

    pub fn key(&self, key: usize) -> Bytes {
        Bytes::from(format!("k{key}"))
    }

    pub fn topic(&self, topic: usize) -> String {
        format!("check-{}-t{topic}", self.run)
    }
}

/// State the clients share: the operation budget, the timestamp counter (so every
/// version is unique and the version order is the order of allocation), and per topic
/// the highest index acknowledged so far (where tail reads start).
struct Shared {
    names: Names,
    origin: Instant,
    started_ops: AtomicU64,
    next_ts: AtomicI64,
    log_tail: Vec<AtomicI64>,
}

impl Shared {
    fn now(&self) -> Nanos {
        self.origin.elapsed().as_nanos() as Nanos
    }
}

/// Runs the workload against the daemons at `sockets`; returns the history and how long
/// the operations took.
pub async fn run(
    sockets: &[PathBuf],
    direct: &KvStore,
    workload: &Workload,
    names: Names,
) -> anyhow::Result<(History, Duration)> {
    let shared = Arc::new(Shared {
        names,
        origin: Instant::now(),
        started_ops: AtomicU64::new(0),
        next_ts: AtomicI64::new(1),
        log_tail: (0..workload.topics).map(|_| AtomicI64::new(0)).collect(),
    });
    let mut tasks = tokio::task::JoinSet::new();
    for (daemon, socket) in sockets.iter().enumerate() {
        for n in 0..workload.clients_per_daemon {
            let client = Client::connect_as(socket, "ddbcached-check")
                .await
                .with_context(|| format!("connecting to {}", socket.display()))?;
            let seed = workload.seed ^ ((daemon as u64) << 32 | n as u64);
            tasks.spawn(client_loop(
                client,
                daemon,
                shared.clone(),
                workload.clone(),
                StdRng::seed_from_u64(seed),
            ));
        }
    }
    for n in 0..workload.around {
        let seed = workload.seed ^ (u64::MAX - n as u64);
        tasks.spawn(around_loop(
            direct.clone(),
            sockets.len(),
            shared.clone(),
            workload.clone(),
            StdRng::seed_from_u64(seed),
        ));
    }
    let progress = tokio::spawn(report_progress(shared.clone(), workload.ops));
    let mut history = History::default();
    while let Some(done) = tasks.join_next().await {
        history.merge(done.context("a client task failed")??);
    }
    progress.abort();
    Ok((history, shared.origin.elapsed()))
}

async fn client_loop(
    client: Client,
    daemon: usize,
    shared: Arc<Shared>,
    w: Workload,
    mut rng: StdRng,
) -> anyhow::Result<History> {
    let mut h = History::default();
    let ns = shared.names.namespace();
    let mut appended = 0u64;
    while shared.started_ops.fetch_add(1, Ordering::Relaxed) < w.ops {
        let write = rng.random_bool(w.write_fraction);
        if rng.random_bool(w.log_fraction) {
            let t = rng.random_range(0..w.topics);
            let topic = shared.names.topic(t);
            if write {
                appended += 1;
                let value = Bytes::from(format!(
                    "{}/d{daemon}/{:x}/{appended}",
                    topic,
                    rng.random::<u64>()
                ));
                let start = shared.now();
                let result = client.log_put(&topic, value.clone()).await;
                let end = shared.now();
                if let Ok(index) = result {
                    shared.log_tail[t].fetch_max(index, Ordering::Relaxed);
                }
                h.log_appends.push(LogAppend {
                    topic: t,
                    value,
                    daemon,
                    start,
                    end,
                    index: result.ok(),
                });
            } else {
                // Start a little before the newest acknowledged index, so that the read
                // shows entries and, past them, whether newer ones are missing.
                let from = (shared.log_tail[t].load(Ordering::Relaxed) - 3).max(1);
                let start = shared.now();
                let result = client.log_scan(&topic, from, i64::MAX).await;
                let end = shared.now();
                match result {
                    Ok(values) => h.log_reads.push(LogRead {
                        topic: t,
                        from,
                        daemon,
                        start,
                        end,
                        values,
                    }),
                    Err(e) => h
                        .read_errors
                        .push(format!("log.scan on daemon {daemon}: {e}")),
                }
            }
        } else {
            let k = rng.random_range(0..w.keys);
            let key = shared.names.key(k);
            if write {
                let (client, ns) = (&client, &ns);
                let write = kv_write(&shared, k, daemon, |ts, value| async move {
                    client.kv_put(ns, key, value, ts).await.is_ok()
                });
                h.kv_writes.push(write.await);
            } else {
                // One read in four asks for the newest version up to a past timestamp.
                let before = rng
                    .random_bool(0.25)
                    .then(|| rng.random_range(0..shared.next_ts.load(Ordering::Relaxed).max(1)));
                let start = shared.now();
                let result = client.kv_get(&ns, key, before).await;
                let end = shared.now();
                match result {
                    Ok(found) => h.kv_reads.push(KvRead {
                        key: k,
                        before,
                        daemon,
                        start,
                        end,
                        found: found.map(|v| (v.ts, v.value)),
                    }),
                    Err(e) => h
                        .read_errors
                        .push(format!("kv.get on daemon {daemon}: {e}")),
                }
            }
        }
        if client.is_closed() {
            bail!("daemon {daemon} closed a connection");
        }
    }
    Ok(h)
}

/// A client around the daemons: key-value writes straight to DynamoDB, as `daemon`
/// (an index no daemon has, so that no read-your-writes rule applies to them).
async fn around_loop(
    store: KvStore,
    daemon: usize,
    shared: Arc<Shared>,
    w: Workload,
    mut rng: StdRng,
) -> anyhow::Result<History> {
    let mut h = History::default();
    let ns = shared.names.namespace();
    while shared.started_ops.fetch_add(1, Ordering::Relaxed) < w.ops {
        let k = rng.random_range(0..w.keys);
        let key = shared.names.key(k);
        let (store, ns, key) = (&store, &ns, &key);
        let write = kv_write(&shared, k, daemon, |ts, value| async move {
            store.put(ns, key, value, ts).await.is_ok()
        });
        h.kv_writes.push(write.await);
        // As often as one daemon client writes, roughly.
        tokio::time::sleep(Duration::from_millis(rng.random_range(1..10))).await;
    }
    Ok(h)
}

/// A put of key `k` at the next timestamp with its run's value, made by `put` (which says
/// whether it was acknowledged) and timed.
async fn kv_write<F: std::future::Future<Output = bool>>(
    shared: &Shared,
    k: usize,
    daemon: usize,
    put: impl FnOnce(i64, Bytes) -> F,
) -> KvWrite {
    let ts = shared.next_ts.fetch_add(1, Ordering::Relaxed);
    let start = shared.now();
    let acked = put(ts, kv_value(&shared.names.run, ts)).await;
    KvWrite {
        key: k,
        ts,
        daemon,
        start,
        end: shared.now(),
        acked,
    }
}

/// A progress line on stderr every ten seconds, for long runs.
async fn report_progress(shared: Arc<Shared>, total: u64) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.tick().await;
    loop {
        tick.tick().await;
        let started = shared.started_ops.load(Ordering::Relaxed).min(total);
        let secs = shared.origin.elapsed().as_secs_f64();
        eprintln!(
            "ddbcached-check: {started} of {total} operations started, {:.0} ops/s",
            started as f64 / secs
        );
    }
}
