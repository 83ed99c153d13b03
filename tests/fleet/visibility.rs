//! Every write is seen everywhere within the bound: through a daemon (its hints), around
//! every daemon (the relays' batches), over TLS, and under the consistency checker.

use super::*;

#[tokio::test(flavor = "multi_thread")]
async fn four_daemons_two_relays_per_table_and_every_write_seen_everywhere() {
    let fleet = Fleet::start(4, "").await;
    fleet.wait_until_fresh().await;
    let clients = fleet.clients().await;
    let ns = name();

    // Every daemon caches the key's first value.
    clients[0].kv_put(&ns, b("k"), b("v1"), 1).await.unwrap();
    for c in &clients {
        seen_within_bound(c, &ns, "k", "v1").await;
        c.kv_get(&ns, b("k"), None).await.unwrap();
    }

    // Through daemon 0: the write hint reaches the others.
    clients[0].kv_put(&ns, b("k"), b("v2"), 2).await.unwrap();
    let mut through = Vec::new();
    for c in &clients[1..] {
        through.push(seen_within_bound(c, &ns, "k", "v2").await);
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
        around.push(seen_within_bound(c, &ns, "k", "v3").await);
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
        let publishing = [
            total(&s, "ddbcached_fleet_publishing", &["table=\"kv\""]),
            total(&s, "ddbcached_fleet_publishing", &["table=\"log\""]),
        ];
        relays[0] += held[0];
        relays[1] += held[1];
        let get_records = total(
            &s,
            "ddbcached_dynamodb_calls_total",
            &["api=\"GetRecords\""],
        );
        crate::ops::assert_calls_allowed_by_policy(&s);
        if total(&s, "ddbcached_fleet_lease_changes_total", &[]) == 0.0 {
            assert_eq!(get_records, 0.0, "a daemon without a lease read the stream");
        } else if publishing != [0.0, 0.0] {
            assert!(get_records > 0.0, "a publisher that never read");
        }
    }
    assert!(relays[0] <= 2.0 && relays[1] <= 2.0, "{relays:?}");
    let deadline = Instant::now() + CONVERGENCE;
    while fleet
        .kv_gauge("ddbcached_fleet_leases_held")
        .await
        .iter()
        .sum::<f64>()
        < 2.0
    {
        assert!(Instant::now() < deadline, "two relay leases held per table");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The cache is in use: once a daemon is fresh, a second read of a key is a hit
    // (on a loaded machine a relay may fall behind and reads bypass for a while).
    let deadline = Instant::now() + CONVERGENCE;
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
async fn a_fleet_over_tls_relays_and_hints() {
    let redis = RedisServer::start_tls().await;
    assert!(redis.url().starts_with("rediss://"));
    relays_and_hints(redis).await;
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
            "{}kv_table = {:?}\nlog_table = {:?}\n",
            dynamodb_toml(endpoint()),
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
