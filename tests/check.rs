//! The consistency checker (`ddbcached-check`) against two daemons sharing the tables: a
//! short history of concurrent writes and reads must show no violation.

use std::process::Stdio;

use serde_json::Value;

use crate::harness::{Daemon, OwnLocal};

#[tokio::test(flavor = "multi_thread")]
async fn two_daemons_pass_the_consistency_checker() {
    // Twenty thousand operations: on a DynamoDB Local of their own, so that they slow no
    // other test.
    let local = OwnLocal::start_in_memory().await;
    let on_local = |c: &mut ddbcached::config::Config| c.dynamodb.endpoint = local.endpoint.clone();
    let a = Daemon::start_with(on_local).await;
    let b = Daemon::start_with(on_local).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("check.toml");
    std::fs::write(
        &config,
        format!(
            "{}[cache]\nmax_staleness_ms = {}\n",
            local.toml(),
            a.config.cache.max_staleness_ms
        ),
    )
    .unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ddbcached-check"))
        .arg("--config")
        .arg(&config)
        .args(["--socket"])
        .arg(&a.socket)
        .args(["--socket"])
        .arg(&b.socket)
        .args(["--ops", "20000", "--json"])
        .stderr(Stdio::inherit())
        .output()
        .await
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(report["violation_count"], 0, "{report:#}");
    assert!(out.status.success(), "{report:#}");
    let ops = &report["operations"];
    assert_eq!(ops["total"], 20000);
    for kind in ["kv_put", "kv_get", "log_put", "log_scan"] {
        assert!(ops[kind].as_u64().unwrap() > 500, "{kind}: {ops}");
    }
    assert_eq!(ops["failed_writes"], 0, "{ops}");
    assert_eq!(ops["failed_reads"], 0, "{ops}");
    // Every key and topic compared on both daemons: 3 answers per key, 2 per topic.
    assert_eq!(report["compared_after_quiescence"], 2 * (8 * 3 + 4 * 2));
    a.stop().await;
    b.stop().await;
}
