//! A DynamoDB outage under traffic: while clients write and read through a daemon, every
//! connection to DynamoDB is cut (a proxy in between), and a DynamoDB Local of the test's
//! own, with its data on disk, is stopped (SIGTERM) and started again on the same port
//! with the same data before the daemon may connect again.
//!
//! DynamoDB Local answers a write before it has stored it: stopped at that moment, it
//! loses an acknowledged write (seen once in about 2,700 acknowledged transactions). So
//! it is stopped only a second after the cut, once whatever it acknowledged is stored,
//! and the test can hold the daemon to "every acknowledged write is in DynamoDB".

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ddbcached::store::StoreTable;
use ddbcached::store::{KvStore, LogStore};
use ddbcached_protocol::{ClientError, ErrorCode};
use futures::TryStreamExt;

use crate::harness::{dynamo_config, name, Daemon, OwnLocal, Proxy};

const KEYS: usize = 4;
const TOPICS: usize = 2;

/// One operation as a client saw it.
struct Op {
    read: bool,
    start: Instant,
    took: Duration,
    error: Option<ClientError>,
}

/// What the clients wrote and DynamoDB acknowledged through the daemon.
#[derive(Default)]
struct Acked {
    puts: Vec<(usize, i64)>,
    appends: Vec<(usize, i64, Bytes)>,
}

#[tokio::test(flavor = "multi_thread")]
async fn an_outage_fails_requests_in_time_and_the_daemon_recovers_without_a_restart() {
    let mut local = OwnLocal::start().await;
    let proxy = Proxy::start(&local.endpoint).await;
    let mut config = dynamo_config(&proxy.endpoint);
    config.dynamodb.attempt_timeout_ms = 1000;
    config.dynamodb.operation_timeout_ms = 2000;
    config.dynamodb.max_attempts = 2;
    let bound = Duration::from_millis(config.cache.max_staleness_ms);
    // Waiting behind earlier requests on the key, then the request's own call.
    let longest = 2 * config.dynamodb.operation_timeout() + Duration::from_secs(1);
    let d = Daemon::start_config(config.clone()).await;
    let ns = name();
    let topics: Vec<String> = (0..TOPICS).map(|_| name()).collect();
    // A fresh JVM answers its first calls slowly: warm it before anything is timed.
    let warm_up = |c: ddbcached_protocol::Client, ns: String, topic: String| async move {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut done = 0;
        while done < 20 {
            assert!(Instant::now() < deadline, "DynamoDB Local does not answer");
            let put = c.kv_put(&ns, "warm", Bytes::new(), 0).await;
            let append = c.log_put(&topic, Bytes::new()).await;
            done = if put.is_ok() && append.is_ok() {
                done + 1
            } else {
                0
            };
        }
    };
    warm_up(d.client().await, name(), name()).await;

    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(Mutex::new(Vec::<Op>::new()));
    let acked = Arc::new(Mutex::new(Acked::default()));
    let next_ts = Arc::new(AtomicI64::new(1));
    let mut workers = Vec::new();
    for w in 0..8 {
        let c = d.client().await;
        let (stop, ops, acked, next_ts) =
            (stop.clone(), ops.clone(), acked.clone(), next_ts.clone());
        let (ns, topics) = (ns.clone(), topics.clone());
        workers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let (k, t) = (n % KEYS, n % TOPICS);
                let key = Bytes::from(format!("k{k}"));
                let start = Instant::now();
                // Half the clients write (a put, then an append), half read.
                let (read, error) = match (w % 2, n % 2) {
                    (0, 0) => {
                        let ts = next_ts.fetch_add(1, Ordering::Relaxed);
                        let r = c.kv_put(&ns, key, Bytes::from(format!("v{ts}")), ts).await;
                        if r.is_ok() {
                            acked.lock().unwrap().puts.push((k, ts));
                        }
                        (false, r.err())
                    }
                    (0, _) => {
                        let value = Bytes::from(format!("w{w}n{n}"));
                        let r = c.log_put(&topics[t], value.clone()).await;
                        match r {
                            Ok(index) => {
                                acked.lock().unwrap().appends.push((t, index, value));
                                (false, None)
                            }
                            Err(e) => (false, Some(e)),
                        }
                    }
                    (_, 0) => (true, c.kv_get(&ns, key, None).await.err()),
                    _ => (true, c.log_scan(&topics[t], 1, i64::MAX).await.err()),
                };
                let took = start.elapsed();
                ops.lock().unwrap().push(Op {
                    read,
                    start,
                    took,
                    error,
                });
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    // The daemon itself stays up throughout: pings never touch DynamoDB.
    let pinger = {
        let (c, stop) = (d.client().await, stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::timeout(Duration::from_secs(1), c.ping())
                    .await
                    .expect("ping answers within a second")
                    .expect("ping succeeds");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let flushes_before = d.flushes();
    proxy.cut(true);
    let lost = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    local.kill().await;
    tokio::time::sleep(bound + Duration::from_millis(2000)).await;
    for table in StoreTable::ALL {
        assert!(
            d.service.coherence().must_bypass(table),
            "{table:?}: reads still served from the cache {:?} into the outage",
            lost.elapsed()
        );
    }
    let restarted = Instant::now();
    local.restart().await;
    proxy.cut(false);
    // Recovery, without restarting the daemon: its tailers catch up again, and it
    // writes again.
    d.wait_until_fresh().await;
    warm_up(d.client().await, name(), name()).await;
    let recovered = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    pinger.await.unwrap();

    let ops = std::mem::take(&mut *ops.lock().unwrap());
    let in_outage = |op: &Op| op.start >= lost && op.start < restarted;
    assert!(
        ops.iter()
            .filter(|op| in_outage(op))
            .any(|op| op.error.is_some()),
        "the outage failed nothing"
    );
    for op in &ops {
        assert!(
            op.took <= longest,
            "an operation took {:?} (at most {longest:?})",
            op.took
        );
        if let Some(e) = &op.error {
            assert!(
                matches!(e.code(), Some(ErrorCode::Unavailable | ErrorCode::Timeout)),
                "undocumented error for an outage: {e}"
            );
            assert!(
                op.start + op.took > lost,
                "an operation failed before the outage: {e}"
            );
        }
        // A read that succeeded before DynamoDB was back came from the cache: only while
        // the cache could still prove itself fresh. (A read that started later may have
        // waited for the restarted DynamoDB.)
        if op.read && op.error.is_none() && in_outage(op) && op.start + op.took < restarted {
            assert!(
                op.start < lost + bound + Duration::from_millis(100),
                "a read served from the cache {:?} into the outage (bound {bound:?})",
                op.start - lost
            );
        }
        if op.start >= recovered {
            assert!(op.error.is_none(), "failed after recovery: {:?}", op.error);
        }
    }
    assert!(
        ops.iter().filter(|op| op.start >= recovered).count() > 20,
        "no traffic after recovery"
    );

    // Every acknowledged write is in DynamoDB, and the daemon answers what DynamoDB holds.
    let client = ddbcached::aws::dynamodb_client(&config.dynamodb, Default::default()).await;
    let kv = KvStore::new(client.clone(), config.dynamodb.kv_table.clone(), 3);
    let log = LogStore::new(client, config.dynamodb.log_table.clone(), 3, 3);
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    let c = d.client().await;
    for k in 0..KEYS {
        let key = Bytes::from(format!("k{k}"));
        let stored: Vec<i64> = kv.timestamps(&ns, &key).await.unwrap();
        for (_, ts) in acked.puts.iter().filter(|(key, _)| *key == k) {
            assert!(stored.contains(ts), "acknowledged put k{k} ts={ts} lost");
        }
        let newest = kv.get_latest(&ns, &key, None).await.unwrap();
        assert_eq!(c.kv_get(&ns, key, None).await.unwrap(), newest, "k{k}");
    }
    for (t, topic) in topics.iter().enumerate() {
        let stored: Vec<Bytes> = log.scan(topic, 1, i64::MAX).try_concat().await.unwrap();
        for (_, index, value) in acked.appends.iter().filter(|(topic, ..)| *topic == t) {
            assert_eq!(
                stored.get(*index as usize - 1),
                Some(value),
                "acknowledged append {index} lost"
            );
        }
        assert_eq!(
            c.log_scan(topic, 1, i64::MAX).await.unwrap(),
            stored,
            "topic {t}"
        );
    }
    eprintln!(
        "outage: {} operations, {} failed, {} acknowledged puts and {} appends kept; \
         slowest {:?}; recovered {:?} after the restart began; tailer flushes {flushes_before} -> {}",
        ops.len(),
        ops.iter().filter(|op| op.error.is_some()).count(),
        acked.puts.len(),
        acked.appends.len(),
        ops.iter().map(|op| op.took).max().unwrap_or_default(),
        recovered - restarted,
        d.flushes()
    );
    d.stop().await;
}
