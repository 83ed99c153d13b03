//! The key-value store through the socket: zio-flow's shared backend suite, then what it
//! leaves out (semantics.md).

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use ddbcached_protocol::{ErrorCode, Versioned};
use futures::future::try_join_all;

use crate::harness::{key, name, value, Daemon};

fn v(ts: i64, value: &Bytes) -> Option<Versioned> {
    Some(Versioned {
        ts,
        value: value.clone(),
    })
}

// --- zio-flow's shared suite, cases 1-9 ---

#[tokio::test(flavor = "multi_thread")]
async fn suite_1_put_then_get_latest_at_each_timestamp() {
    let d = Daemon::start().await;
    let c = d.client().await;
    let (ns, k, v1, v2) = (name(), key(), value(), value());
    c.kv_put(&ns, k.clone(), v1.clone(), 1).await.unwrap();
    assert_eq!(c.kv_get(&ns, k.clone(), Some(1)).await.unwrap(), v(1, &v1));
    c.kv_put(&ns, k.clone(), v2.clone(), 2).await.unwrap();
    assert_eq!(c.kv_get(&ns, k.clone(), Some(2)).await.unwrap(), v(2, &v2));
}

#[tokio::test(flavor = "multi_thread")]
async fn suite_2_and_3_delete_removes_every_version() {
    let d = Daemon::start().await;
    let c = d.client().await;
    for stamps in [&[1][..], &[1, 2, 5]] {
        let (ns, k) = (name(), key());
        for &ts in stamps {
            c.kv_put(&ns, k.clone(), value(), ts).await.unwrap();
        }
        c.kv_delete(&ns, k.clone(), None).await.unwrap();
        let last = *stamps.last().unwrap();
        assert_eq!(c.kv_get(&ns, k.clone(), Some(last)).await.unwrap(), None);
        assert_eq!(
            c.kv_timestamps(&ns, k.clone()).await.unwrap(),
            Vec::<i64>::new()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn suite_4_delete_with_marker_between_versions() {
    let d = Daemon::start().await;
    let c = d.client().await;
    for m in 2..=4 {
        let (ns, k, v1, v2, v3) = (name(), key(), value(), value(), value());
        c.kv_put(&ns, k.clone(), v1, 1).await.unwrap();
        c.kv_put(&ns, k.clone(), v2.clone(), 2).await.unwrap();
        c.kv_put(&ns, k.clone(), v3.clone(), 5).await.unwrap();
        c.kv_delete(&ns, k.clone(), Some(m)).await.unwrap();
        assert_eq!(c.kv_get(&ns, k.clone(), Some(5)).await.unwrap(), v(5, &v3));
        assert_eq!(c.kv_get(&ns, k.clone(), Some(2)).await.unwrap(), v(2, &v2));
        assert_eq!(c.kv_get(&ns, k.clone(), Some(1)).await.unwrap(), None);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn suite_5_to_7_unknown_namespace_or_key_is_empty() {
    let d = Daemon::start().await;
    let c = d.client().await;
    assert_eq!(c.kv_get(&name(), key(), None).await.unwrap(), None);
    let (ns, k) = (name(), key());
    c.kv_put(&ns, k.clone(), value(), 1).await.unwrap();
    let mut other = key();
    while other == k {
        other = key();
    }
    assert_eq!(c.kv_get(&ns, other, Some(2)).await.unwrap(), None);
    assert!(c.kv_scan(&name()).await.unwrap().is_empty());
    assert!(c.kv_scan_keys(&name()).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn suite_8_and_9_scan_all_returns_every_key_once() {
    let d = Daemon::start().await;
    let c = d.client().await;
    let ns = name();
    let want: HashMap<Bytes, Bytes> = (0..1001)
        .map(|n| {
            (
                Bytes::from(format!("abc_{n}")),
                Bytes::from(format!("xyz_{n}")),
            )
        })
        .collect();
    // 1001 puts, 50 at a time on one pipelined connection.
    let pairs: Vec<_> = want.iter().collect();
    for chunk in pairs.chunks(50) {
        try_join_all(
            chunk
                .iter()
                .map(|(k, v)| c.kv_put(&ns, (*k).clone(), (*v).clone(), 1)),
        )
        .await
        .unwrap();
    }
    let scanned = c.kv_scan(&ns).await.unwrap();
    assert_eq!(scanned.len(), 1001, "one entry per key");
    assert_eq!(scanned.into_iter().collect::<HashMap<_, _>>(), want);
    let keys = c.kv_scan_keys(&ns).await.unwrap();
    assert_eq!(keys.len(), 1001, "each key once");
    assert_eq!(
        keys.into_iter().collect::<HashSet<_>>(),
        want.keys().cloned().collect()
    );
}

// --- beyond the shared suite ---

#[tokio::test(flavor = "multi_thread")]
async fn latest_timestamp_and_all_timestamps_ascending() {
    let d = Daemon::start().await;
    let c = d.client().await;
    let (ns, k) = (name(), key());
    assert_eq!(c.kv_latest_ts(&ns, k.clone()).await.unwrap(), None);
    assert!(c.kv_timestamps(&ns, k.clone()).await.unwrap().is_empty());
    // Out of order, negative and repeated, as zio-flow's clocks produce them.
    for ts in [7, -3, 100, 0, 7, i64::MAX, i64::MIN] {
        c.kv_put(&ns, k.clone(), value(), ts).await.unwrap();
    }
    assert_eq!(
        c.kv_latest_ts(&ns, k.clone()).await.unwrap(),
        Some(i64::MAX)
    );
    assert_eq!(
        c.kv_timestamps(&ns, k.clone()).await.unwrap(),
        vec![i64::MIN, -3, 0, 7, 100, i64::MAX]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn get_latest_before_is_inclusive_and_absent_below_oldest() {
    let d = Daemon::start().await;
    let c = d.client().await;
    let (ns, k, a, b) = (name(), key(), value(), value());
    c.kv_put(&ns, k.clone(), a.clone(), 10).await.unwrap();
    c.kv_put(&ns, k.clone(), b.clone(), 20).await.unwrap();
    assert_eq!(c.kv_get(&ns, k.clone(), None).await.unwrap(), v(20, &b));
    assert_eq!(c.kv_get(&ns, k.clone(), Some(20)).await.unwrap(), v(20, &b));
    assert_eq!(c.kv_get(&ns, k.clone(), Some(19)).await.unwrap(), v(10, &a));
    assert_eq!(c.kv_get(&ns, k.clone(), Some(10)).await.unwrap(), v(10, &a));
    assert_eq!(c.kv_get(&ns, k.clone(), Some(9)).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn same_timestamp_overwrites_and_empty_value_is_a_value() {
    let d = Daemon::start().await;
    let c = d.client().await;
    let (ns, k) = (name(), key());
    c.kv_put(&ns, k.clone(), Bytes::from_static(b"first"), 3)
        .await
        .unwrap();
    c.kv_put(&ns, k.clone(), Bytes::new(), 3).await.unwrap();
    assert_eq!(
        c.kv_get(&ns, k.clone(), None).await.unwrap(),
        v(3, &Bytes::new())
    );
    assert_eq!(c.kv_timestamps(&ns, k.clone()).await.unwrap(), vec![3]);
}

#[tokio::test(flavor = "multi_thread")]
async fn scan_all_gives_the_newest_version_of_each_key() {
    let d = Daemon::start().await;
    let c = d.client().await;
    let ns = name();
    let mut want = HashMap::new();
    for n in 0..20 {
        let k = Bytes::from(format!("key{n}"));
        // Newest written first for half of them: order of writes must not matter.
        let stamps: Vec<i64> = if n % 2 == 0 {
            vec![1, 5, 3]
        } else {
            vec![9, 2]
        };
        for ts in stamps {
            c.kv_put(&ns, k.clone(), Bytes::from(format!("v{n}@{ts}")), ts)
                .await
                .unwrap();
        }
        let newest = if n % 2 == 0 { 5 } else { 9 };
        want.insert(k, Bytes::from(format!("v{n}@{newest}")));
    }
    let got: HashMap<_, _> = c.kv_scan(&ns).await.unwrap().into_iter().collect();
    assert_eq!(got, want);
    assert_eq!(c.kv_scan_keys(&ns).await.unwrap().len(), 20);
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_with_marker_below_between_and_above_versions() {
    let d = Daemon::start().await;
    let c = d.client().await;
    // Versions at 10, 20, 30; (marker, timestamps kept).
    for (marker, kept) in [
        (5, vec![10, 20, 30]),  // below all: nothing is at or before it, nothing goes
        (10, vec![10, 20, 30]), // on the oldest: it is the newest <= marker, kept
        (25, vec![20, 30]),     // between: 20 is the newest <= 25, 10 goes
        (30, vec![30]),         // on the newest
        (99, vec![30]),         // above all: only the newest survives
    ] {
        let (ns, k) = (name(), key());
        let mut before = HashMap::new();
        for ts in [10, 20, 30] {
            c.kv_put(&ns, k.clone(), value(), ts).await.unwrap();
        }
        for probe in [marker, 15, 25, 35] {
            before.insert(probe, c.kv_get(&ns, k.clone(), Some(probe)).await.unwrap());
        }
        c.kv_delete(&ns, k.clone(), Some(marker)).await.unwrap();
        assert_eq!(
            c.kv_timestamps(&ns, k.clone()).await.unwrap(),
            kept,
            "marker {marker}"
        );
        // get_latest at the marker answers as before, and so does every later probe.
        for (probe, answer) in before {
            if probe >= marker {
                assert_eq!(c.kv_get(&ns, k.clone(), Some(probe)).await.unwrap(), answer);
            }
        }
    }
    // An unknown key is a no-op.
    c.kv_delete(&name(), key(), Some(1)).await.unwrap();
    c.kv_delete(&name(), key(), None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn namespace_and_key_boundaries_do_not_collide() {
    // zio-flow's backend stores ns ++ key: ("ab", "c") and ("a", "bc") were one item.
    let d = Daemon::start().await;
    let c = d.client().await;
    let base = name();
    let (ns1, ns2) = (format!("{base}ab"), format!("{base}a"));
    c.kv_put(
        &ns1,
        Bytes::from_static(b"c"),
        Bytes::from_static(b"one"),
        1,
    )
    .await
    .unwrap();
    c.kv_put(
        &ns2,
        Bytes::from_static(b"bc"),
        Bytes::from_static(b"two"),
        1,
    )
    .await
    .unwrap();
    let one = c
        .kv_get(&ns1, Bytes::from_static(b"c"), None)
        .await
        .unwrap()
        .unwrap();
    let two = c
        .kv_get(&ns2, Bytes::from_static(b"bc"), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (one.value, two.value),
        (Bytes::from_static(b"one"), Bytes::from_static(b"two"))
    );
    assert_eq!(
        c.kv_scan_keys(&ns1).await.unwrap(),
        vec![Bytes::from_static(b"c")]
    );
    assert_eq!(
        c.kv_scan_keys(&ns2).await.unwrap(),
        vec![Bytes::from_static(b"bc")]
    );
}

/// The largest value a key-value item can hold, by DynamoDB's size rules, computed here
/// independently of the daemon: names + values, the number 1 taking 2 bytes.
fn max_value_len(ns: &str, key: &[u8]) -> usize {
    let pk = 2 + ns.len() + key.len();
    400 * 1024
        - ("zflow_kv_key".len() + pk)
        - ("zflow_kv_timestamp".len() + 2)
        - "zflow_kv_value".len()
        - ("zflow_kv_namespace".len() + ns.len())
}

#[tokio::test(flavor = "multi_thread")]
async fn values_at_the_item_limit_are_stored_and_one_byte_more_is_refused() {
    let d = Daemon::start().await;
    let c = d.client().await;
    let (ns, k) = (name(), key());
    let max = max_value_len(&ns, &k);
    let fits = Bytes::from(vec![7u8; max]);
    c.kv_put(&ns, k.clone(), fits.clone(), 1).await.unwrap();
    assert_eq!(c.kv_get(&ns, k.clone(), None).await.unwrap(), v(1, &fits));

    let other = key();
    let err = c
        .kv_put(
            &ns,
            other.clone(),
            Bytes::from(vec![7u8; max_value_len(&ns, &other) + 1]),
            1,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ValueTooLarge), "{err}");
    assert!(err.to_string().contains("nothing was written"), "{err}");
    assert_eq!(
        c.kv_get(&ns, other, None).await.unwrap(),
        None,
        "nothing written"
    );
    // The connection is still usable after the refusal.
    c.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_names_and_keys_are_refused() {
    let d = Daemon::start().await;
    let c = d.client().await;
    for (ns, k) in [("", &b"k"[..]), ("ns", &b""[..])] {
        let err = c
            .kv_put(ns, Bytes::copy_from_slice(k), value(), 1)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::InvalidArgument), "{err}");
    }
    // A partition key over DynamoDB's 2048 bytes.
    let err = c
        .kv_get(&"n".repeat(2000), Bytes::from(vec![1; 100]), None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidArgument), "{err}");
    c.ping().await.unwrap();
}
