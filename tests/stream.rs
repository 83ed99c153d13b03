//! Two daemons on the same tables, on DynamoDB Local: what one writes (or what anything
//! writes around both) reaches the other's cache through the stream within a bounded time,
//! and a daemon whose tailer is behind stops trusting its cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ddbcached::cache::Served;
use ddbcached::store::KvStore;
use ddbcached::store::StoreTable;
use ddbcached_protocol::{Client, Versioned};
use futures::future::try_join_all;

use crate::harness::{dynamo_config, endpoint, name, Daemon};

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// Reads until `check` holds, for at most `limit`; returns when the last read that did
/// not satisfy it began (`None`: none did), or `Err` if it never held.
async fn visible_within<T, F>(
    limit: Duration,
    mut read: impl FnMut() -> F,
    check: impl Fn(&T) -> bool,
) -> Result<Option<Instant>, ()>
where
    F: std::future::Future<Output = T>,
{
    let start = Instant::now();
    let mut missed = None;
    while start.elapsed() <= limit {
        let began = Instant::now();
        if check(&read().await) {
            return Ok(missed);
        }
        missed = Some(began);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Err(())
}

/// Reads until `check` holds, failing if a read that began more than `bound` after
/// `since` (a write's acknowledgement) did not satisfy it, or if it never holds.
async fn seen_within_bound<T, F>(
    what: &str,
    bound: Duration,
    since: Instant,
    read: impl FnMut() -> F,
    check: impl Fn(&T) -> bool,
) where
    F: std::future::Future<Output = T>,
{
    let missed = visible_within(Duration::from_secs(60), read, check)
        .await
        .unwrap_or_else(|()| panic!("{what} never seen"));
    if let Some(at) = missed {
        let late = at.saturating_duration_since(since);
        assert!(late <= bound, "{what} missed by a read {late:?} after it");
    }
}

async fn direct_kv() -> KvStore {
    let config = dynamo_config(endpoint());
    KvStore::new(
        ddbcached::aws::dynamodb_client(&config.dynamodb, Default::default()).await,
        config.dynamodb.kv_table.clone(),
        10,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_through_one_daemon_reach_the_others_cache_within_the_bound() {
    let (a, b_) = (Daemon::start().await, Daemon::start().await);
    let bound = Duration::from_millis(b_.config.cache.max_staleness_ms);
    let (ca, cb) = (a.client().await, b_.client().await);
    let ns = name();
    let keys: Vec<Bytes> = (0..200).map(|k| b(&format!("k{k}"))).collect();
    for chunk in keys.chunks(50) {
        try_join_all(chunk.iter().map(|k| ca.kv_put(&ns, k.clone(), b("old"), 1)))
            .await
            .unwrap();
    }
    // B caches every key.
    for k in &keys {
        assert_eq!(
            cb.kv_get(&ns, k.clone(), None)
                .await
                .unwrap()
                .unwrap()
                .value,
            b("old")
        );
    }
    let hits_before = b_.service.cache().stats().await.total(Served::Hit);

    // A writes a new version of every key; B reads each until it sees it. A read of B
    // that began more than the staleness bound after a write's acknowledgement must show
    // it (B's tailer applied it, or B bypasses its cache for want of a proof). The lag
    // of a key runs from the acknowledgement to B's last read that missed it.
    let acked = Arc::new(Mutex::new(HashMap::new()));
    let writes = async {
        for chunk in keys.chunks(20) {
            try_join_all(chunk.iter().map(|k| async {
                ca.kv_put(&ns, k.clone(), b("new"), 2).await?;
                acked.lock().unwrap().insert(k.clone(), Instant::now());
                Ok::<_, ddbcached_protocol::ClientError>(())
            }))
            .await
            .unwrap();
        }
    };
    let watch = try_join_all(keys.iter().map(|k| {
        let (cb, ns, k) = (cb.clone(), ns.clone(), k.clone());
        async move {
            let missed = visible_within(
                Duration::from_secs(60),
                || cb.kv_get(&ns, k.clone(), None),
                |got| matches!(got, Ok(Some(Versioned { ts: 2, .. }))),
            )
            .await
            .map_err(|()| format!("{k:?} not seen within 60 s"))?;
            Ok::<_, String>((k, missed))
        }
    }));
    let ((), seen) = tokio::join!(writes, watch);
    let acked = acked.lock().unwrap().clone();
    let mut lags: Vec<Duration> = seen
        .unwrap()
        .into_iter()
        .map(|(k, missed)| {
            missed.map_or(Duration::ZERO, |at| at.saturating_duration_since(acked[&k]))
        })
        .collect();
    lags.sort();
    let pct = |p: f64| lags[((lags.len() as f64 * p) as usize).min(lags.len() - 1)];
    println!(
        "cross-daemon visibility lag over {} writes: p50 {:?} p99 {:?} max {:?}",
        lags.len(),
        pct(0.5),
        pct(0.99),
        lags.last().unwrap()
    );
    assert!(
        *lags.last().unwrap() <= bound,
        "a read {:?} after the acknowledgement missed the write",
        lags.last().unwrap()
    );
    // B served them from its cache (not by bypassing it), refreshed by the stream key by
    // key: each cached entry was dropped by a record, or was never stored because a record
    // of the setup writes raced its fill; unless DynamoDB Local's spurious trim made the
    // tailer drop them all at once.
    let tail = b_.service.coherence().snapshot();
    let rejected = b_.service.cache().stats().await.rejected_fills;
    assert!(
        tail.invalidations[StoreTable::Kv as usize] + rejected >= 200 || b_.flushes() > 0,
        "{tail:?}, {rejected} fills rejected"
    );
    // And B serves from its cache (once its tailer proves it caught up again, if a loaded
    // machine let it fall behind the bound).
    b_.wait_until_fresh().await;
    for k in keys.iter().cycle().take(2 * keys.len()) {
        cb.kv_get(&ns, k.clone(), None).await.unwrap();
    }
    assert!(b_.service.cache().stats().await.total(Served::Hit) > hits_before);
}

#[tokio::test(flavor = "multi_thread")]
async fn deletes_and_appends_through_one_daemon_reach_the_other() {
    let (a, b_) = (Daemon::start().await, Daemon::start().await);
    let bound = Duration::from_millis(b_.config.cache.max_staleness_ms);
    let (ca, cb) = (a.client().await, b_.client().await);
    let (ns, topic) = (name(), name());
    ca.kv_put(&ns, b("k"), b("v"), 1).await.unwrap();
    assert!(cb.kv_get(&ns, b("k"), None).await.unwrap().is_some());
    ca.kv_delete(&ns, b("k"), None).await.unwrap();
    let since = Instant::now();
    seen_within_bound(
        "the delete",
        bound,
        since,
        || cb.kv_get(&ns, b("k"), None),
        |got| matches!(got, Ok(None)),
    )
    .await;

    ca.log_put(&topic, b("e1")).await.unwrap();
    assert_eq!(cb.log_position(&topic).await.unwrap(), 1);
    ca.log_put(&topic, b("e2")).await.unwrap();
    let since = Instant::now();
    seen_within_bound(
        "the append",
        bound,
        since,
        || cb.log_scan(&topic, 1, i64::MAX),
        |got| matches!(got, Ok(v) if *v == vec![b("e1"), b("e2")]),
    )
    .await;
    assert_eq!(cb.log_position(&topic).await.unwrap(), 2);
    ca.log_delete(&topic).await.unwrap();
    let since = Instant::now();
    seen_within_bound(
        "the topic's deletion",
        bound,
        since,
        || cb.log_position(&topic),
        |got| matches!(got, Ok(0)),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_around_both_daemons_reaches_both() {
    let (a, b_) = (Daemon::start().await, Daemon::start().await);
    let bound = Duration::from_millis(b_.config.cache.max_staleness_ms);
    let clients: Vec<Client> = vec![a.client().await, b_.client().await];
    let ns = name();
    clients[0].kv_put(&ns, b("k"), b("v1"), 1).await.unwrap();
    for c in &clients {
        assert_eq!(
            c.kv_get(&ns, b("k"), None).await.unwrap().unwrap().value,
            b("v1")
        );
    }
    // Another program writes the table directly.
    direct_kv().await.put(&ns, b"k", b("v2"), 1).await.unwrap();
    let since = Instant::now();
    for c in &clients {
        seen_within_bound(
            "the outside write",
            bound,
            since,
            || c.kv_get(&ns, b("k"), None),
            |got| matches!(got, Ok(Some(v)) if v.value == b("v2")),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_bypass_the_cache_once_the_tailer_falls_behind() {
    let d = Daemon::start_with(|c| {
        c.cache.max_staleness_ms = 600;
        c.streams.propagation_allowance_ms = 100;
    })
    .await;
    let c = d.client().await;
    let ns = name();
    c.kv_put(&ns, b("k"), b("v1"), 1).await.unwrap();
    assert_eq!(
        c.kv_get(&ns, b("k"), None).await.unwrap().unwrap().value,
        b("v1")
    );

    d.stop_tailers().await;
    // Once the bound has passed without a caught-up poll, the daemon says so...
    let stale = visible_within(
        Duration::from_secs(5),
        || async {
            StoreTable::ALL
                .iter()
                .all(|t| d.service.coherence().must_bypass(*t))
        },
        |s| *s,
    )
    .await;
    assert!(stale.is_ok(), "the staleness bound is noticed");
    // ...and reads go to DynamoDB: a write the stopped tailer cannot report is seen.
    direct_kv().await.put(&ns, b"k", b("v2"), 1).await.unwrap();
    assert_eq!(
        c.kv_get(&ns, b("k"), None).await.unwrap().unwrap().value,
        b("v2")
    );
    assert_eq!(c.log_position(&name()).await.unwrap(), 0);
    let stats = d.service.cache().stats().await;
    assert!(stats.total(Served::Bypass) >= 2, "{stats:?}");
    assert!(
        d.service.coherence().snapshot().bypass_switches >= 2,
        "start-up switch, then this one"
    );
}
