//! The indexed store through the socket: zio-flow's shared suite, then positions, deletes,
//! scan bounds and index allocation from several daemons at once.

use std::collections::HashSet;

use bytes::Bytes;
use futures::future::try_join_all;

use crate::harness::{name, Daemon};

fn b(s: impl Into<String>) -> Bytes {
    Bytes::from(s.into())
}

#[tokio::test(flavor = "multi_thread")]
async fn suite_1_and_2_puts_return_consecutive_indices() {
    let d = Daemon::start().await;
    let c = d.client().await;
    let topic = name();
    for want in 1..=10 {
        assert_eq!(
            c.log_put(&topic, b(format!("v{want}"))).await.unwrap(),
            want
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn suite_3_and_4_scan_empty_then_in_order() {
    let d = Daemon::start().await;
    let c = d.client().await;
    let topic = name();
    assert!(c.log_scan(&topic, 1, 10).await.unwrap().is_empty());
    let values: Vec<Bytes> = (0..10).map(|n| b(format!("Value{n}"))).collect();
    for v in &values {
        c.log_put(&topic, v.clone()).await.unwrap();
    }
    assert_eq!(c.log_scan(&topic, 1, 10).await.unwrap(), values);
}

#[tokio::test(flavor = "multi_thread")]
async fn suite_5_concurrent_puts_get_distinct_indices() {
    let d = Daemon::start().await;
    let c = d.client().await;
    let topic = name();
    let values: Vec<Bytes> = (0..10).map(|n| b(format!("Value{n}"))).collect();
    let indices = try_join_all(values.iter().map(|v| c.log_put(&topic, v.clone())))
        .await
        .unwrap();
    assert_eq!(
        indices.iter().copied().collect::<HashSet<_>>(),
        (1..=10).collect()
    );
    let scanned = c.log_scan(&topic, 1, 10).await.unwrap();
    assert_eq!(scanned.len(), 10);
    assert_eq!(
        scanned.into_iter().collect::<HashSet<_>>(),
        values.into_iter().collect::<HashSet<_>>()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn suite_6_delete_empties_the_topic_and_restarts_at_one() {
    let d = Daemon::start().await;
    let c = d.client().await;
    let topic = name();
    for n in 0..10 {
        c.log_put(&topic, b(format!("{n}"))).await.unwrap();
    }
    assert_eq!(c.log_scan(&topic, 1, 10).await.unwrap().len(), 10);
    c.log_delete(&topic).await.unwrap();
    assert!(c.log_scan(&topic, 1, 10).await.unwrap().is_empty());
    assert_eq!(c.log_position(&topic).await.unwrap(), 0);
    assert_eq!(c.log_put(&topic, b("again")).await.unwrap(), 1);
    assert_eq!(
        c.log_scan(&topic, 1, i64::MAX).await.unwrap(),
        vec![b("again")]
    );
    // Deleting an unknown topic is a no-op.
    c.log_delete(&name()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn suite_7_scan_from_the_middle_to_max() {
    let d = Daemon::start().await;
    let c = d.client().await;
    let topic = name();
    for n in 0..768 {
        c.log_put(&topic, b(n.to_string())).await.unwrap();
    }
    let want: Vec<Bytes> = (3..768).map(|n| b(n.to_string())).collect();
    assert_eq!(c.log_scan(&topic, 4, i64::MAX).await.unwrap(), want);
}

#[tokio::test(flavor = "multi_thread")]
async fn position_follows_puts_and_scan_bounds_are_inclusive() {
    let d = Daemon::start().await;
    let c = d.client().await;
    let topic = name();
    assert_eq!(c.log_position(&topic).await.unwrap(), 0);
    for n in 1..=5 {
        c.log_put(&topic, b(format!("e{n}"))).await.unwrap();
        assert_eq!(c.log_position(&topic).await.unwrap(), n);
    }
    assert_eq!(
        c.log_scan(&topic, 2, 4).await.unwrap(),
        vec![b("e2"), b("e3"), b("e4")]
    );
    assert_eq!(c.log_scan(&topic, 5, 5).await.unwrap(), vec![b("e5")]);
    assert!(
        c.log_scan(&topic, 4, 2).await.unwrap().is_empty(),
        "from > until"
    );
    assert!(c.log_scan(&topic, 6, i64::MAX).await.unwrap().is_empty());
    // The counter item lives at index -1 and is never returned as an entry.
    let all = c.log_scan(&topic, i64::MIN, i64::MAX).await.unwrap();
    assert_eq!(all.len(), 5);
    assert_eq!(c.log_scan(&topic, -1, 1).await.unwrap(), vec![b("e1")]);
}

#[tokio::test(flavor = "multi_thread")]
async fn empty_and_binary_values_keep_their_bytes() {
    let d = Daemon::start().await;
    let c = d.client().await;
    let topic = name();
    let values = [Bytes::new(), Bytes::from_static(b"\x00\xff\x00"), b("text")];
    for v in &values {
        c.log_put(&topic, v.clone()).await.unwrap();
    }
    assert_eq!(c.log_scan(&topic, 1, 3).await.unwrap(), values.to_vec());
}

#[tokio::test(flavor = "multi_thread")]
async fn two_daemons_allocate_without_gap_or_duplicate() {
    let (a, b_) = (Daemon::start().await, Daemon::start().await);
    let topic = name();
    // Four connections per daemon, eight appends each, all at once: 64 appends.
    let mut clients = Vec::new();
    for d in [&a, &b_] {
        for _ in 0..4 {
            clients.push(d.client().await);
        }
    }
    let puts = clients.iter().enumerate().flat_map(|(ci, c)| {
        let topic = topic.clone();
        (0..8).map(move |n| {
            let value = b(format!("c{ci}-{n}"));
            let topic = topic.clone();
            async move { c.log_put(&topic, value.clone()).await.map(|i| (i, value)) }
        })
    });
    let results = try_join_all(puts).await.unwrap();
    let mut indices: Vec<i64> = results.iter().map(|(i, _)| *i).collect();
    indices.sort_unstable();
    assert_eq!(
        indices,
        (1..=64).collect::<Vec<_>>(),
        "every index exactly once"
    );
    // Each value sits at the index its put returned, read by a daemon with nothing cached
    // (the appending daemons learn of each other's appends through the stream tailer).
    let mut by_index = results.clone();
    by_index.sort_by_key(|(i, _)| *i);
    let want: Vec<Bytes> = by_index.into_iter().map(|(_, v)| v).collect();
    let fresh = Daemon::start().await;
    let c = fresh.client().await;
    assert_eq!(c.log_scan(&topic, 1, i64::MAX).await.unwrap(), want);
    assert_eq!(c.log_position(&topic).await.unwrap(), 64);
}

#[tokio::test(flavor = "multi_thread")]
async fn log_values_over_the_item_limit_are_refused() {
    let d = Daemon::start().await;
    let c = d.client().await;
    let topic = name();
    let err = c
        .log_put(&topic, Bytes::from(vec![0u8; 400 * 1024]))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(ddbcached_protocol::ErrorCode::ValueTooLarge),
        "{err}"
    );
    assert_eq!(
        c.log_position(&topic).await.unwrap(),
        0,
        "no index was allocated"
    );
    assert_eq!(c.log_put(&topic, b("small")).await.unwrap(), 1);
}
