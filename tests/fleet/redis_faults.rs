//! Redis failing or lying: restarted empty, down past the bound, a consumer paused past
//! the retention, forged and garbled entries, a skipped or repeated entry number.

use super::*;

#[tokio::test(flavor = "multi_thread")]
async fn redis_restarted_empty_every_daemon_flushes_and_recovers() {
    let (mut fleet, clients, ns) = Fleet::with_cached_key(3, "").await;
    let causes = ["reconnected"];
    let before = fleet.flushes_for(&causes).await;
    fleet.redis.kill();
    fleet.redis.restart().await;
    fleet
        .recovers_from_an_empty_redis(&clients, &ns, &causes, before)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_down_past_the_bound_reads_bypass_then_recover() {
    let (mut fleet, clients, ns) = Fleet::with_cached_key(3, "").await;
    fleet.redis.kill();
    // Nothing invalidates now: the write around is seen only by bypassing.
    let watching: Vec<&Client> = clients.iter().collect();
    let seen = write_around_and_watch(&fleet, &watching, &ns, "v1", "v2", 2, CONVERGENCE).await;
    // Once the last watermark is older than the bound, both tables bypass.
    tokio::time::sleep(BOUND).await;
    for m in &fleet.members {
        assert_eq!(bypassing(m.metrics, &[]).await, 2.0);
    }
    eprintln!("with Redis down, the write around seen after {seen:?} (by bypassing)");
    fleet.redis.restart().await;
    fleet.wait_until_fresh().await;
    write_around_and_watch(&fleet, &watching, &ns, "v2", "v3", 3, CONVERGENCE).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_paused_past_the_retention_flushes_and_serves_the_news() {
    let mut fleet = Fleet::start(3, "retention_ms = 2500").await;
    fleet.wait_until_fresh().await;
    // A daemon that relays nothing: pausing it stops only its consumer.
    let held = fleet.kv_relays().await;
    let mut logs = Vec::new();
    for m in &fleet.members {
        let s = scrape(m.metrics).await;
        logs.push(total(&s, "ddbcached_fleet_leases_held", &["table=\"log\""]));
    }
    let paused = (0..3)
        .find(|&i| held[i] == 0.0 && logs[i] == 0.0)
        .expect("two slots per table, three daemons: at least one consumer only");
    let clients = fleet.clients().await;
    let ns = name();
    clients[paused]
        .kv_put(&ns, b("k"), b("v1"), 1)
        .await
        .unwrap();
    clients[paused].kv_get(&ns, b("k"), None).await.unwrap();
    // Either way of noticing counts: a skipped entry number (the trim), or the read's
    // deadline passing while it was paused (a reconnect, which flushes as well).
    let flushes = async |fleet: &Fleet| {
        fleet.flushes(&[paused], "gap").await + fleet.flushes(&[paused], "reconnected").await
    };
    let before = flushes(&fleet).await;

    fleet.signal(paused, "STOP");
    fleet
        .direct_kv()
        .await
        .put(&ns, b"k", b("v2"), 2)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5000)).await;
    fleet.signal(paused, "CONT");

    // What it missed was trimmed away: it flushed, and serves the news.
    let deadline = Instant::now() + CONVERGENCE;
    while flushes(&fleet).await <= before {
        assert!(Instant::now() < deadline, "no flush after the trim");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = clients[paused]
        .kv_get(&ns, b("k"), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.value, b("v2"));
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_and_garbled_entries_are_gaps_never_proofs() {
    // No relay: nothing but the entries forged below could make the daemon fresh.
    let fleet = Fleet::start(1, "relay_eligible = false\nauth_key = \"fleet-secret\"").await;
    let metrics = fleet.members[0].metrics;
    let d = &fleet.config.dynamodb;
    let mut redis = Redis::open(&fleet.redis.url(), "")
        .unwrap()
        .connect(None)
        .await
        .unwrap();
    let kv = stream_key(&d.lease_table, &d.kv_table);
    let watermark = |n| Entry::Relay {
        relay: 7,
        epoch: 1,
        n,
        event: Event::Watermark {
            t_ms: wall_ms() + 3_600_000,
            shards: BTreeMap::new(),
        },
    };
    let fresh = async || kv_fresh(metrics).await;
    assert!(!fresh().await);
    let bad_entries = || async {
        total(
            &scrape(fleet.members[0].metrics).await,
            "ddbcached_fleet_bad_entries_total",
            &[],
        )
    };

    // Unsigned, signed with another key, and garbage: each refused, counted and flushed.
    for fields in [
        Codec::new("").encode(&watermark(1)),
        Codec::new("guess").encode(&watermark(2)),
        vec![("e", vec![0xc1, 0x00, 0xff])],
    ] {
        redis.append(&kv, &fields, 0).await.unwrap();
    }
    let deadline = Instant::now() + CONVERGENCE;
    while bad_entries().await < 3.0 {
        assert!(Instant::now() < deadline, "entries not refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!fresh().await, "a forged watermark was believed");
    assert_eq!(fleet.flushes(&[0], "bad_entry").await, 3.0);

    // The same watermark signed with the fleet's key is believed: the check above could
    // have failed.
    redis
        .append(&kv, &Codec::new("fleet-secret").encode(&watermark(3)), 0)
        .await
        .unwrap();
    let deadline = Instant::now() + CONVERGENCE;
    while !fresh().await {
        assert!(
            Instant::now() < deadline,
            "the fleet's own watermark was not believed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_consumer_on_real_redis_flushes_on_a_skipped_number_and_ignores_a_repeat() {
    // The daemon's consumer code against a real Redis, fed by this test as the relay, so
    // that which entries exist is up to the test.
    let redis_server = RedisServer::start().await;
    let redis = Redis::open(&redis_server.url(), "").unwrap();
    let table = format!("t{}", name().chars().take(12).collect::<String>());
    let keys = [
        stream_key(&table, &format!("{table}_kv")),
        stream_key(&table, &format!("{table}_log")),
    ];
    let cache = Arc::new(Cache::new(&CacheConfig::default()));
    let coherence = Arc::new(Coherence::new(cache, 2000, metrics::Histogram::noop()));
    let tables =
        Table::stores([&format!("{table}_kv"), &format!("{table}_log")], |_| None).to_vec();
    let stats = Arc::new(FleetStats::new(&tables));
    let ctx = Consuming {
        me: 1,
        redis: redis.clone(),
        codec: Codec::new(""),
        changes: Arc::new(Changes::new(&tables, coherence.clone(), None)),
        clock_skew_ms: 250,
        stats: stats.clone(),
        fleet_lag: metrics::Histogram::noop(),
        hint_lag: metrics::Histogram::noop(),
    };
    let stop = CancellationToken::new();
    consume(ctx, tables, &keys, &stop).await;

    let mut relay = redis.connect(None).await.unwrap();
    let mut publish = async |n: u64| {
        let entry = Entry::Relay {
            relay: 2,
            epoch: 1,
            n,
            event: Event::Watermark {
                t_ms: wall_ms(),
                shards: BTreeMap::new(),
            },
        };
        relay
            .append(&keys[0], &Codec::new("").encode(&entry), 0)
            .await
            .unwrap();
    };
    // The consumer handles entries one after the other: once it has read an (ignored)
    // hint appended after the others, it has acted on every one before.
    let settled = async |entries: u64| {
        let marker = Entry::Hint {
            from: 3,
            keys: Vec::new(),
        };
        let mut c = redis.connect(None).await.unwrap();
        c.append(&keys[0], &Codec::new("").encode(&marker), 0)
            .await
            .unwrap();
        let deadline = Instant::now() + CONVERGENCE;
        while stats
            .consumed
            .of(StoreTable::Kv as usize)
            .load(Ordering::Relaxed)
            < entries + 1
        {
            assert!(Instant::now() < deadline, "the consumer did not read on");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let gaps = || coherence.snapshot().flushes[FlushCause::Gap as usize];

    publish(1).await;
    publish(2).await;
    publish(2).await; // a repeat: ignored
    settled(3).await;
    assert_eq!(gaps(), 0);
    assert!(
        !coherence.must_bypass(StoreTable::Kv),
        "the watermarks made it fresh"
    );
    publish(4).await; // 3 never arrives
    settled(5).await;
    assert_eq!(gaps(), 1, "the skipped number was seen");
    publish(5).await;
    settled(7).await;
    assert_eq!(gaps(), 1, "one gap, one flush");
    stop.cancel();
}
