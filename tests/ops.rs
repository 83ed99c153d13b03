//! Operating the daemon: the Prometheus endpoint and its documentation, the dashboard,
//! readiness, graceful shutdown, and the socket's guards.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ddbcached::cache::{CacheKey, HookPoint};
use ddbcached_protocol::Client;
use tokio::sync::{oneshot, Notify};

use crate::harness::{dynamo_config, field, http_get, msgpack_map, name, Daemon, Raw, Val};

/// Exposition samples: `name{labels}` -> value.
pub fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

/// Checks that every DynamoDB API a daemon called (its `ddbcached_dynamodb_calls_total`)
/// is allowed by `config/iam-policy.json`, the least privilege the daemon needs.
pub fn assert_calls_allowed_by_policy(all: &BTreeMap<String, f64>) {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/iam-policy.json"),
    )
    .unwrap();
    let policy: serde_json::Value = serde_json::from_str(&text).unwrap();
    let allowed: BTreeSet<&str> = policy["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["Action"].as_array().unwrap())
        .map(|a| a.as_str().unwrap())
        .collect();
    let called: BTreeSet<&str> = all
        .iter()
        .filter(|(_, v)| **v > 0.0)
        .filter_map(|(k, _)| k.strip_prefix("ddbcached_dynamodb_calls_total{api=\""))
        .filter_map(|rest| rest.split('"').next())
        .collect();
    assert!(!called.is_empty());
    for api in called {
        // A transaction's permissions are those of the writes in it: the daemon's put.
        let action = match api {
            "TransactWriteItems" => "PutItem",
            other => other,
        };
        assert!(
            allowed.contains(format!("dynamodb:{action}").as_str()),
            "the daemon called {api}, which config/iam-policy.json does not allow"
        );
    }
}

fn sample(all: &BTreeMap<String, f64>, key: &str) -> f64 {
    *all.get(key).unwrap_or_else(|| panic!("no sample {key}"))
}

/// Metric names the metrics table of docs/OPERATIONS.md documents.
fn documented_metrics() -> BTreeSet<String> {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/OPERATIONS.md"))
            .unwrap();
    doc.lines()
        .filter_map(|l| l.strip_prefix("| `ddbcached_"))
        .map(|l| format!("ddbcached_{}", l.split('`').next().unwrap()))
        .collect()
}

/// Metric families an exposition declares (`# TYPE name kind`).
fn exported_families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_cover_the_documented_table_and_move_with_the_workload() {
    // A staleness bound no stream lag reaches, even on a loaded machine: the read below
    // must be a hit, which is what it counts.
    let d = Daemon::start_with(|c| c.cache.max_staleness_ms = 600_000).await;
    let addr = d.metrics_endpoint();
    let c = d.client().await;
    let (ns, topic) = (name(), name());
    c.kv_put(&ns, Bytes::from_static(b"k"), Bytes::from_static(b"v"), 1)
        .await
        .unwrap();
    c.kv_get(&ns, Bytes::from_static(b"k"), None).await.unwrap();
    c.log_put(&topic, Bytes::from_static(b"e")).await.unwrap();
    let before = samples(&http_get(addr, "/metrics").await.1);

    // One hit, one write, one rejected frame.
    c.kv_get(&ns, Bytes::from_static(b"k"), None).await.unwrap();
    c.kv_put(&ns, Bytes::from_static(b"k"), Bytes::from_static(b"w"), 2)
        .await
        .unwrap();
    let mut raw = Raw::ready(&d.socket).await;
    raw.send(b"\xc1").await;
    raw.recv().await.unwrap();
    let (status, text) = http_get(addr, "/metrics").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    let after = samples(&text);

    let delta = |key: &str| sample(&after, key) - before.get(key).copied().unwrap_or(0.0);
    assert_eq!(
        delta(r#"ddbcached_cache_reads_total{op="kv.get",served="hit"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"ddbcached_dynamodb_calls_total{api="PutItem",outcome="ok"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"ddbcached_server_requests_total{op="kv.put",result="ok"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"ddbcached_server_requests_total{op="invalid",result="malformed"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"ddbcached_server_frames_rejected_total{reason="malformed"}"#),
        1.0
    );
    // The histogram has its 10 µs bucket.
    assert!(after.contains_key(
        r#"ddbcached_server_request_duration_seconds_bucket{op="kv.get",le="0.00001"}"#
    ));
    assert!(
        sample(
            &after,
            r#"ddbcached_server_request_duration_seconds_count{op="kv.get"}"#
        ) >= 2.0
    );
    assert!(sample(&after, "ddbcached_server_connections") >= 2.0);
    assert!(sample(&after, "ddbcached_cache_entries") >= 2.0);
    assert_eq!(
        sample(&after, r#"ddbcached_stream_bypassing{table="kv"}"#),
        0.0
    );
    assert_eq!(
        sample(&after, r#"ddbcached_stream_shards{table="log"}"#),
        1.0
    );
    // The writes' records come back through the stream within a poll or two.
    let echoed = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let now = samples(&http_get(addr, "/metrics").await.1);
            if now.get(r#"ddbcached_stream_records_total{table="kv",event="insert"}"#) >= Some(&1.0)
                && now.get("ddbcached_stream_visibility_lag_seconds_count") >= Some(&1.0)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        echoed.is_ok(),
        "stream records applied and their lag measured"
    );
    assert_calls_allowed_by_policy(&samples(&http_get(addr, "/metrics").await.1));

    // Every metric of the documented table is exported, and every exported one documented.
    let exported = exported_families(&text);
    let documented = documented_metrics();
    assert!(documented.len() >= 20, "{documented:?}");
    for m in &documented {
        assert!(
            exported.contains(m),
            "docs/OPERATIONS.md documents {m}, the daemon does not export it"
        );
    }
    for m in &exported {
        assert!(
            documented.contains(m),
            "{m} is exported but not in the table of docs/OPERATIONS.md"
        );
    }
    // Labels come from closed sets: no namespace, key or topic appears.
    assert!(!text.contains(&ns) && !text.contains(&topic));
}

#[tokio::test(flavor = "multi_thread")]
async fn every_dashboard_expression_names_an_exported_metric() {
    let d = Daemon::start().await;
    let addr = d.metrics_endpoint();
    let c = d.client().await;
    c.kv_get(&name(), Bytes::from_static(b"k"), None)
        .await
        .unwrap();
    let exported = exported_families(&http_get(addr, "/metrics").await.1);
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/grafana-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 8, "{exprs:?}");
    for expr in exprs {
        let names: Vec<&str> = expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("ddbcached_"))
            .collect();
        assert!(!names.is_empty(), "{expr} names no ddbcached metric");
        for n in names {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s).filter(|f| exported.contains(*f)))
                .unwrap_or(n);
            assert!(
                exported.contains(family),
                "the dashboard uses {n}, which the daemon does not export"
            );
        }
    }
}

/// Every `expr` string in a dashboard.
pub fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// `ddbcached client health` against a daemon.
fn client_health(d: &Daemon) -> std::process::Output {
    tokio::task::block_in_place(|| {
        Command::new(env!("CARGO_BIN_EXE_ddbcached"))
            .args(["client", "--socket", d.socket.to_str().unwrap(), "health"])
            .output()
            .unwrap()
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_follows_the_tailers() {
    let ready = Daemon::start().await;
    let addr = ready.metrics_endpoint();
    assert_eq!(http_get(addr, "/ready").await.0, "HTTP/1.1 200 OK");
    assert!(ready.client().await.health().await.unwrap().0);
    let out = client_health(&ready);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let not_ready = Daemon::start_without_tailers(dynamo_config(crate::harness::endpoint())).await;
    let addr = not_ready.metrics_endpoint();
    let (status, body) = http_get(addr, "/ready").await;
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
    assert!(body.contains("not ready"), "{body}");
    let out = client_health(&not_ready);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("not ready"));
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_refuses_newcomers_and_waits_for_requests_in_progress() {
    let d = Daemon::start().await;
    let c = d.client().await;
    let ns = name();
    c.kv_put(&ns, Bytes::from_static(b"k"), Bytes::from_static(b"v"), 1)
        .await
        .unwrap();
    // Hold the next read of the key inside the daemon.
    let (reached_tx, reached) = oneshot::channel::<()>();
    let reached_tx = Mutex::new(Some(reached_tx));
    let release = Arc::new(Notify::new());
    let (r, target) = (release.clone(), CacheKey::kv(&ns, b"k"));
    d.service.cache().set_test_hook(Arc::new(move |at, key| {
        let first = (at == HookPoint::Fill && key == target)
            .then(|| reached_tx.lock().unwrap().take())
            .flatten();
        let r = r.clone();
        Box::pin(async move {
            if let Some(tx) = first {
                let _ = tx.send(());
                r.notified().await;
            }
        })
    }));
    // The held read, on a connection spoken by hand.
    let mut raw = Raw::ready(&d.socket).await;
    raw.send(&msgpack_map(&[
        ("id", Val::U(1)),
        ("op", Val::S("kv.get")),
        ("ns", Val::S(&ns)),
        ("key", Val::B(b"k")),
    ]))
    .await;
    // An open connection with nothing in flight: it is closed at once.
    let mut idle = Raw::ready(&d.socket).await;
    reached.await.unwrap();
    d.begin_shutdown();
    assert!(idle.closed().await);
    // A request sent after shutdown began, beside the one in progress, is answered
    // without being run.
    raw.send(&msgpack_map(&[("id", Val::U(9)), ("op", Val::S("ping"))]))
        .await;
    let refused = raw.recv().await.expect("an answer to the late request");
    assert_eq!(field(&refused, "id"), Some(rmpv::Value::from(9)));
    assert_eq!(field(&refused, "code"), Some(rmpv::Value::from(21)));
    // Newcomers are refused, not left waiting in the backlog: while the request above is
    // held, the socket is closed and removed (a bound socket accepts connections into
    // its backlog even when nobody accepts them).
    tokio::time::timeout(Duration::from_secs(5), async {
        while tokio::net::UnixStream::connect(&d.socket).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("new connections are refused while stopping");
    assert!(!d.socket.exists());
    // The server waits for the request in progress: it has not stopped while the
    // request is held (it would within milliseconds if it did not wait)...
    let mut stopping = tokio::spawn(d.stop());
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut stopping)
            .await
            .is_err(),
        "the server stopped with a request still in progress"
    );
    // ...which completes once released; then the connection closes and the server stops.
    release.notify_one();
    let done = raw
        .recv()
        .await
        .expect("the answer to the request in progress");
    assert_eq!(field(&done, "id"), Some(rmpv::Value::from(1)));
    assert_eq!(
        field(&done, "value"),
        Some(rmpv::Value::Binary(b"v".to_vec()))
    );
    assert!(raw.closed().await);
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("the server stops once the request is done")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_outside_the_allow_list_is_refused() {
    let me = tempfile::tempfile().unwrap().metadata().unwrap();
    let (uid, gid) = (me.uid(), me.gid());
    let d = Daemon::start_with(|c| {
        c.server.allowed_uids = vec![uid.wrapping_add(1)];
        c.server.allowed_gids = vec![gid.wrapping_add(1)];
    })
    .await;
    assert!(Client::connect(&d.socket).await.is_err(), "refused");
    let addr = d.metrics_endpoint();
    assert_eq!(
        sample(
            &samples(&http_get(addr, "/metrics").await.1),
            "ddbcached_server_peers_refused_total"
        ),
        1.0
    );

    for allow in [(vec![uid], vec![]), (vec![], vec![gid])] {
        let d =
            Daemon::start_with(|c| (c.server.allowed_uids, c.server.allowed_gids) = allow.clone())
                .await;
        d.client().await.ping().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_are_closed() {
    let d = Daemon::start_with(|c| c.server.idle_timeout_ms = 200).await;
    let mut raw = Raw::ready(&d.socket).await;
    assert!(raw.closed().await, "an idle connection is closed");
    // A connection that never says hello too.
    let mut silent = Raw::connect(&d.socket).await;
    assert!(silent.closed().await);
}
