//! Relays: leases that change hands only by conditional writes, one publisher per table
//! and a standby, a killed relay replaced (one slot) or by the standby (two slots), a
//! zombie that can change nothing.

use super::*;

#[tokio::test(flavor = "multi_thread")]
async fn leases_change_hands_only_by_conditional_writes() {
    let mut config = dynamo_config(endpoint());
    config.dynamodb.lease_table = format!("{}_leases", name().chars().take(24).collect::<String>());
    let client = aws::dynamodb_client(&config.dynamodb, Default::default()).await;
    tables::init_tables(&client, &config.dynamodb)
        .await
        .unwrap();
    let leases = Leases::new(client, config.dynamodb.lease_table.clone());
    let id = lease_id("t", 0);

    let a = leases.create(&id, "a").await.unwrap().expect("a new lease");
    assert_eq!((a.counter, a.epoch), (1, 1));
    assert!(
        leases.create(&id, "b").await.unwrap().is_none(),
        "exists already"
    );
    let checkpoints = BTreeMap::from([("shard".to_owned(), "100".to_owned())]);
    let a = leases
        .renew(&a, "arn", &checkpoints, false)
        .await
        .unwrap()
        .unwrap();

    // b takes it over from what it read; a, paused meanwhile, can neither renew nor
    // move the checkpoint; b resumes from a's checkpoint, in a new epoch.
    let seen = leases.read(&id).await.unwrap().unwrap();
    let b = leases.take(&seen, "b").await.unwrap().expect("taken over");
    assert_eq!((b.owner.as_str(), b.epoch), ("b", 2));
    assert_eq!(b.checkpoints, checkpoints);
    let late = BTreeMap::from([("shard".to_owned(), "999".to_owned())]);
    assert!(leases
        .renew(&a, "arn", &late, false)
        .await
        .unwrap()
        .is_none());
    assert!(
        leases.take(&seen, "c").await.unwrap().is_none(),
        "counter moved"
    );
    assert_eq!(
        leases.read(&id).await.unwrap().unwrap().checkpoints,
        checkpoints
    );

    // Released: free for anyone at once, checkpoints kept.
    let released = leases
        .renew(&b, "arn", &checkpoints, true)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(released.owner, "");
    let stored = leases.read(&id).await.unwrap().unwrap();
    assert_eq!(
        (stored.owner.as_str(), stored.counter),
        ("", released.counter)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn one_slot_a_killed_relay_is_replaced_and_nothing_stale_is_served_meanwhile() {
    let (mut fleet, clients, ns) = Fleet::with_cached_key(3, "relay_slots = 1").await;
    let relay = fleet.a_kv_relay().await;
    let others: Vec<usize> = (0..3).filter(|i| *i != relay).collect();

    let resets = fleet.flushes(&others, "no_checkpoint").await;
    fleet.signal(relay, "KILL");
    let killed = Instant::now();
    let watching: Vec<&Client> = others.iter().map(|&i| &clients[i]).collect();
    let seen = write_around_and_watch(
        &fleet,
        &watching,
        &ns,
        "v1",
        "v2",
        2,
        Duration::from_secs(15),
    )
    .await;

    // Another daemon took the lease within lease_ms plus a few rounds.
    let deadline = killed + Duration::from_millis(1500 + 3000);
    loop {
        let held = fleet.kv_relays().await;
        if others.iter().any(|&i| held[i] > 0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the lease was not taken over: {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "lease taken over {:?} after the kill; the write around seen after {seen:?}",
        killed.elapsed()
    );
    // The new relay resumed from the old one's checkpoint: it published no reset.
    // A reset would be the new relay's first entry. Past the bound since the kill, a
    // fresh daemon has read a watermark of the new relay, so whatever preceded it.
    tokio::time::sleep_until((killed + BOUND).into()).await;
    fleet.wait_until_fresh().await;
    assert_eq!(fleet.flushes(&others, "no_checkpoint").await, resets);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_slots_the_standby_takes_over_from_the_publishers_checkpoint() {
    let (mut fleet, clients, ns) = Fleet::with_cached_key(4, "").await;
    let relay = fleet.a_kv_relay().await;
    let others: Vec<usize> = (0..4).filter(|i| *i != relay).collect();
    let resets = fleet.flushes(&others, "no_checkpoint").await;
    fleet.signal(relay, "KILL");
    let watching: Vec<&Client> = others.iter().map(|&i| &clients[i]).collect();
    // Seen once the standby has taken the publisher's lapsed lease, and nobody flushed
    // for want of a checkpoint: it carries on where the publisher's stood.
    let seen = write_around_and_watch(&fleet, &watching, &ns, "v1", "v2", 2, CONVERGENCE).await;
    assert_eq!(fleet.flushes(&others, "no_checkpoint").await, resets);
    // And every daemon serves from its cache again (a loaded machine may have made one
    // bypass for a moment).
    let deadline = Instant::now() + CONVERGENCE;
    for &i in &others {
        while total(
            &scrape(fleet.members[i].metrics).await,
            "ddbcached_stream_bypassing",
            &["table=\"kv\""],
        ) != 0.0
        {
            assert!(Instant::now() < deadline, "daemon {i} never fresh again");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    eprintln!("with the publisher killed, the write around seen after {seen:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_zombie_relay_cannot_move_the_checkpoint_and_changes_nothing() {
    let (mut fleet, clients, ns) = Fleet::with_cached_key(3, "relay_slots = 1").await;
    let relay = fleet.a_kv_relay().await;
    let others: Vec<usize> = (0..3).filter(|i| *i != relay).collect();

    fleet.signal(relay, "STOP");
    let deadline = Instant::now() + CONVERGENCE;
    while !fleet.kv_relays_among(&others).await {
        assert!(
            Instant::now() < deadline,
            "no take-over from the paused relay"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let leases = Leases::new(
        aws::dynamodb_client(&fleet.config.dynamodb, Default::default()).await,
        fleet.config.dynamodb.lease_table.clone(),
    );
    let id = lease_id(&fleet.config.dynamodb.kv_table, 0);
    let holder = leases.read(&id).await.unwrap().unwrap();

    fleet.signal(relay, "CONT");
    let watching: Vec<&Client> = clients.iter().collect();
    write_around_and_watch(&fleet, &watching, &ns, "v1", "v2", 2, CONVERGENCE).await;
    // The zombie finds its renewal refused at its next attempt and stops relaying.
    let deadline = Instant::now() + CONVERGENCE;
    while fleet.kv_relays().await[relay] > 0.0 {
        assert!(Instant::now() < deadline, "the zombie kept relaying");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The new holder renews on (its counter moves) and is still the owner, in its epoch.
    let now = loop {
        let now = leases.read(&id).await.unwrap().unwrap();
        if now.counter > holder.counter {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "the lease is not renewed any more"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(now.owner, holder.owner, "the zombie got its lease back");
    assert_eq!(now.epoch, holder.epoch);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_slots_one_publisher_a_standby_and_every_write_published_once() {
    let (mut fleet, _clients, ns) = Fleet::with_cached_key(3, "").await;
    // One daemon publishes, another holds the second lease and stands by.
    let deadline = Instant::now() + CONVERGENCE;
    let (publisher, standby) = loop {
        let publishing = fleet.kv_relays().await;
        let held = fleet.kv_gauge("ddbcached_fleet_leases_held").await;
        let standby = (0..3).find(|&i| held[i] > 0.0 && publishing[i] == 0.0);
        if let (1.0, Some(standby)) = (publishing.iter().sum::<f64>(), standby) {
            break (fleet.a_kv_relay().await, standby);
        }
        assert!(Instant::now() < deadline, "{publishing:?} {held:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // A write around the daemons appears once in the table's Redis stream.
    fleet
        .direct_kv()
        .await
        .put(&ns, b"once", b("v"), 1)
        .await
        .unwrap();
    let published = async || {
        let once = |f: &Fact| matches!(f, Fact::KvVersion { ns: s, key, .. } if *s == ns && key == b"once");
        let mut n = 0;
        for entry in fleet.kv_entries().await {
            if let Ok(Entry::Relay {
                event: Event::Batch { facts, .. },
                ..
            }) = entry
            {
                n += facts.iter().filter(|f| once(f)).count();
            }
        }
        n
    };
    let deadline = Instant::now() + CONVERGENCE;
    while published().await == 0 {
        assert!(Instant::now() < deadline, "never published");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Ten poll rounds later: still once.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(published().await, 1);

    // The publisher gone, the standby takes its slot over and publishes.
    fleet.signal(publisher, "KILL");
    let deadline = Instant::now() + CONVERGENCE;
    while fleet.kv_relays().await[standby] == 0.0 {
        assert!(Instant::now() < deadline, "the standby never took over");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
