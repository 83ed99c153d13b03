//! Fleet mode for the tables the DynamoDB API front caches: a user table's changes reach
//! every daemon's front within the bound, whether written through another daemon's front
//! or around them all, and only the table's publisher reads its stream; a daemon that
//! serves only the API takes part like the others.

use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;
use ddbcached::store::keys::{kv_partition_key, KV_KEY, KV_NAMESPACE, KV_TIMESTAMP, KV_VALUE};

use super::*;
use crate::api_cache::{cached_table, consistent_get, key, re_create_with_other_keys, sorted};
use crate::harness::{n, s, sdk_client, OwnLocal};
use ddbcached::fleet::entry::Key;

type Api = aws_sdk_dynamodb::Client;

/// The item every read here is of.
fn item(v: &str) -> HashMap<String, AttributeValue> {
    let mut item = key("p", "1");
    item.insert("v".into(), s(v));
    item.insert("color".into(), s("red"));
    item
}

async fn put(c: &Api, t: &str, v: &str) {
    c.put_item()
        .table_name(t)
        .set_item(Some(item(v)))
        .send()
        .await
        .unwrap();
}

/// The item's `v` and its partition's items, as `c` answers (eventually consistent
/// reads: the front may answer them from memory).
async fn read(c: &Api, t: &str) -> (Option<String>, Vec<HashMap<String, AttributeValue>>) {
    let got = c
        .get_item()
        .table_name(t)
        .set_key(Some(key("p", "1")))
        .send()
        .await
        .unwrap();
    let v = got
        .item
        .and_then(|i| i.get("v").and_then(|v| v.as_s().ok().cloned()));
    let query = c
        .query()
        .table_name(t)
        .key_condition_expression("pk = :p")
        .expression_attribute_values(":p", s("p"))
        .send()
        .await
        .unwrap();
    (v, sorted(query.items.unwrap_or_default()))
}

/// Reads through `c` until both the item and its partition's query show `want`, written
/// before this call. Fails if a read that began more than the bound after the call showed
/// anything else, or if `want` is never seen.
async fn seen_within_bound(c: &Api, t: &str, want: &str) {
    let start = Instant::now();
    loop {
        let began = start.elapsed();
        let (v, partition) = read(c, t).await;
        if v.as_deref() == Some(want) && partition == [item(want)] {
            return;
        }
        assert!(
            began <= BOUND,
            "a read that began {began:?} after the write missed it: {v:?}, {partition:?}"
        );
        assert!(start.elapsed() < CONVERGENCE, "never seen");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Waits until every daemon's front has a proof of `table`'s freshness.
async fn wait_until_fronts_fresh(fleet: &Fleet, table: &str) {
    let fresh = format!("table=\"{table}\"");
    let deadline = Instant::now() + CONVERGENCE;
    for m in &fleet.members {
        while total(
            &scrape(m.metrics).await,
            "ddbcached_api_cache_bypassing",
            &[&fresh],
        ) != 0.0
        {
            assert!(Instant::now() < deadline, "{table} never fresh");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_tables_changes_reach_every_daemons_front_within_the_bound() {
    let mut fleet = Fleet::start(0, "").await;
    let direct = sdk_client(endpoint()).await;
    let t = cached_table(&direct).await;
    let mut fronts = Vec::new();
    // The last daemon serves only the API: the fleet carries its table without the
    // stores'.
    for stores in [true, true, false] {
        let port = free_port();
        let api = format!("[dynamodb_api]\nlisten = \"127.0.0.1:{port}\"\ntables = [{t:?}]");
        fleet.add_member(&api, stores).await;
        fronts.push(sdk_client(&format!("http://127.0.0.1:{port}")).await);
    }
    wait_until_fronts_fresh(&fleet, &t).await;
    writes_reach_every_front(&fleet, &fronts, &direct, &t).await;

    // A PartiQL write through daemon 0's front: its hint drops the table elsewhere.
    fronts[0]
        .execute_statement()
        .statement(format!("UPDATE \"{t}\" SET v = ? WHERE pk = ? AND sk = ?"))
        .parameters(s("v4"))
        .parameters(s("p"))
        .parameters(n("1"))
        .send()
        .await
        .unwrap();
    for c in &fronts[1..] {
        seen_within_bound(c, &t, "v4").await;
    }
    let unread = fleet.entries(&t).await.into_iter().any(|e| {
        matches!(e, Ok(Entry::Hint { keys, .. })
            if keys.iter().any(|k| matches!(k, Key::Unread {})))
    });
    assert!(unread, "a PartiQL write is hinted as one of unread items");

    one_publisher_reads_the_stream(&fleet, &t).await;
    answered_from_memory(&fleet, &fronts, &t).await;
}

/// Writes through daemon 0's front and around every daemon reach every front within
/// the bound, and the front's writes are hinted.
async fn writes_reach_every_front(fleet: &Fleet, fronts: &[Api], direct: &Api, t: &str) {
    // Every front caches the first value: daemon 0 reads its own write at once.
    put(&fronts[0], t, "v1").await;
    let (v, _) = read(&fronts[0], t).await;
    assert_eq!(v.as_deref(), Some("v1"));
    for c in fronts {
        seen_within_bound(c, t, "v1").await;
    }
    // Through daemon 0's front: its hint, and the publisher's batch, reach the others.
    put(&fronts[0], t, "v2").await;
    for c in &fronts[1..] {
        seen_within_bound(c, t, "v2").await;
    }
    let hinted = fleet.entries(t).await.into_iter().any(|e| {
        matches!(e, Ok(Entry::Hint { keys, .. })
            if keys.iter().any(|k| matches!(k, Key::Item { .. })))
    });
    assert!(hinted, "the front's writes are hinted");
    // Around every daemon.
    put(direct, t, "v3").await;
    for c in fronts {
        seen_within_bound(c, t, "v3").await;
    }
}

/// Only the lease holders read the table `t`'s stream, and one publishes it.
async fn one_publisher_reads_the_stream(fleet: &Fleet, t: &str) {
    let fresh = format!("table=\"{t}\"");
    let mut publishing = 0.0;
    for m in &fleet.members {
        let s = scrape(m.metrics).await;
        publishing += total(&s, "ddbcached_fleet_publishing", &[&fresh]);
        if total(&s, "ddbcached_fleet_lease_changes_total", &[]) == 0.0 {
            let get_records = total(
                &s,
                "ddbcached_dynamodb_calls_total",
                &["api=\"GetRecords\""],
            );
            assert_eq!(get_records, 0.0, "a daemon without a lease read a stream");
        }
    }
    assert!(publishing <= 1.0, "one publisher at most: {publishing}");
}

/// The fronts answer from memory: once fresh, a repeated read of `t` is a hit.
async fn answered_from_memory(fleet: &Fleet, fronts: &[Api], t: &str) {
    let fresh = format!("table=\"{t}\"");
    let deadline = Instant::now() + CONVERGENCE;
    loop {
        for c in fronts {
            read(c, t).await;
            read(c, t).await;
        }
        let mut hits = 0.0;
        for m in &fleet.members {
            let s = scrape(m.metrics).await;
            hits += total(
                &s,
                "ddbcached_api_cache_reads_total",
                &[&fresh, "served=\"hit\""],
            );
        }
        if hits >= fronts.len() as f64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the fronts never answered from memory"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Under `["*"]` a fleet carries a table created after it started from the table's first
/// use on each daemon: consumed, relayed by one lease holder, hinted, and answered from
/// memory, like a table found at start. The fleet starts with no table to carry at all
/// (its consumers wait for one to join), and a second table joins consumers that carry
/// the first already.
#[tokio::test(flavor = "multi_thread")]
async fn under_a_star_tables_created_after_the_fleet_started_are_carried_from_their_first_use() {
    // A DynamoDB of its own: `*` takes in every table with a stream. The daemons serve
    // only the API: every table but the fleet's leases goes (the stores' have streams).
    let local = OwnLocal::start_in_memory().await;
    let mut fleet = Fleet::start_at(&local.endpoint).await;
    let direct = sdk_client(&local.endpoint).await;
    let listed = direct.list_tables().send().await.unwrap().table_names;
    for table in listed.unwrap_or_default() {
        if table != fleet.config.dynamodb.lease_table {
            direct
                .delete_table()
                .table_name(table)
                .send()
                .await
                .unwrap();
        }
    }
    let mut fronts = Vec::new();
    for _ in 0..2 {
        let port = free_port();
        let api = format!("[dynamodb_api]\nlisten = \"127.0.0.1:{port}\"\ntables = [\"*\"]");
        fleet.add_member(&api, false).await;
        fronts.push(sdk_client(&format!("http://127.0.0.1:{port}")).await);
    }
    for m in &fleet.members {
        let cached: Vec<String> = scrape(m.metrics)
            .await
            .into_keys()
            .filter(|k| k.starts_with("ddbcached_api_cache_reads_total{"))
            .collect();
        assert!(cached.is_empty(), "no table at start: {cached:?}");
    }

    for _ in 0..2 {
        let t = cached_table(&direct).await;
        // Its first reads pass through and have each daemon find it.
        let label = format!("table=\"{t}\"");
        let deadline = Instant::now() + CONVERGENCE;
        for (c, m) in fronts.iter().zip(&fleet.members) {
            while !scrape(m.metrics).await.keys().any(|k| k.contains(&label)) {
                assert!(Instant::now() < deadline, "{t} never found");
                read(c, &t).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        wait_until_fronts_fresh(&fleet, &t).await;
        writes_reach_every_front(&fleet, &fronts, &direct, &t).await;
        one_publisher_reads_the_stream(&fleet, &t).await;
        answered_from_memory(&fleet, &fronts, &t).await;
    }
}

/// A user table deleted and re-created with other keys while the fleet runs: its relay
/// finds the new stream and tells the fleet, every daemon describes the table again,
/// and each front answers reads by the new key from memory; a write around them all
/// reaches every front within the bound.
#[tokio::test(flavor = "multi_thread")]
async fn a_user_table_re_created_with_other_keys_is_described_again_by_every_daemon() {
    let mut fleet = Fleet::start(0, "").await;
    fleet.streams = "discovery_interval_ms = 500".into();
    let direct = sdk_client(endpoint()).await;
    let t = cached_table(&direct).await;
    let mut fronts = Vec::new();
    for _ in 0..2 {
        let port = free_port();
        let api = format!("[dynamodb_api]\nlisten = \"127.0.0.1:{port}\"\ntables = [{t:?}]");
        fleet.add_member(&api, false).await;
        fronts.push(sdk_client(&format!("http://127.0.0.1:{port}")).await);
    }
    wait_until_fronts_fresh(&fleet, &t).await;
    put(&fronts[0], &t, "v1").await;
    answered_from_memory(&fleet, &fronts, &t).await;

    re_create_with_other_keys(&direct, &t).await;
    let only_key = HashMap::from([("pk".to_owned(), s("a"))]);
    let with = |v: &str| {
        let mut item = only_key.clone();
        item.insert("v".into(), s(v));
        item
    };
    let item_of = |c: &Api| {
        let (c, t, key) = (c.clone(), t.clone(), only_key.clone());
        async move {
            let got = c.get_item().table_name(t).set_key(Some(key)).send();
            got.await.unwrap().item
        }
    };
    let put_around = |v: &str| {
        let put = direct.put_item().table_name(&t).set_item(Some(with(v)));
        async move { put.send().await.unwrap() }
    };
    put_around("w1").await;
    let got_hits = |s: &BTreeMap<String, f64>| {
        let table = format!("table=\"{t}\"");
        total(
            s,
            "ddbcached_api_cache_reads_total",
            &[&table, "operation=\"GetItem\"", "served=\"hit\""],
        )
    };
    let mut before = Vec::new();
    for m in &fleet.members {
        before.push(got_hits(&scrape(m.metrics).await));
    }
    // Every answer is DynamoDB's; once described again, a repeated read is a hit.
    let deadline = Instant::now() + CONVERGENCE;
    for ((c, m), before) in fronts.iter().zip(&fleet.members).zip(before) {
        loop {
            for _ in 0..2 {
                assert_eq!(
                    item_of(c).await,
                    consistent_get(&direct, &t, only_key.clone()).await
                );
            }
            if got_hits(&scrape(m.metrics).await) > before {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "a front never answered by the new key from memory"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    put_around("w2").await;
    let start = Instant::now();
    for c in &fronts {
        loop {
            let began = start.elapsed();
            let got = item_of(c).await;
            if got == Some(with("w2")) {
                break;
            }
            assert!(
                began <= BOUND,
                "a read that began {began:?} after the write missed it: {got:?}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// The values of a key-value key's versions, oldest first, as a front answers the query
/// of its partition (an eventually consistent read: from memory where it can).
async fn versions(c: &Api, table: &str, pk: &[u8]) -> Vec<String> {
    let got = c
        .query()
        .table_name(table)
        .key_condition_expression("#k = :k")
        .expression_attribute_names("#k", KV_KEY)
        .expression_attribute_values(":k", AttributeValue::B(Blob::new(pk)))
        .send()
        .await
        .unwrap();
    got.items
        .unwrap_or_default()
        .iter()
        .map(|i| match i.get(KV_VALUE) {
            Some(AttributeValue::B(v)) => String::from_utf8_lossy(v.as_ref()).into_owned(),
            other => panic!("not a version: {other:?}"),
        })
        .collect()
}

/// Queries through `c` until the partition's versions are `want`, written before this
/// call; fails if a read that began more than the bound after the call showed anything
/// else.
async fn versions_within_bound(c: &Api, table: &str, pk: &[u8], want: &[&str]) {
    let start = Instant::now();
    loop {
        let began = start.elapsed();
        let got = versions(c, table, pk).await;
        if got == want {
            return;
        }
        assert!(
            began <= BOUND,
            "a query that began {began:?} after the write missed it: {got:?}"
        );
        assert!(start.elapsed() < CONVERGENCE, "never seen");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A store's table that the fronts cache too: its relay publishes both kinds of fact,
/// and either front's hints drop both caches, so a write through one daemon's socket is
/// seen through the other's front, one through a front through the other's socket, and
/// one around both through both, each within the bound.
#[tokio::test(flavor = "multi_thread")]
async fn a_stores_table_the_fronts_cache_too_shows_every_write_through_both_fronts() {
    let mut fleet = Fleet::start(0, "").await;
    let kv = fleet.config.dynamodb.kv_table.clone();
    let mut fronts = Vec::new();
    for _ in 0..2 {
        let port = free_port();
        let api = format!("[dynamodb_api]\nlisten = \"127.0.0.1:{port}\"\ntables = [{kv:?}]");
        fleet.add(&api).await;
        fronts.push(sdk_client(&format!("http://127.0.0.1:{port}")).await);
    }
    fleet.wait_until_fresh().await;
    wait_until_fronts_fresh(&fleet, &kv).await;
    let sockets = fleet.clients().await;
    let ns = name();
    let pk = kv_partition_key(&ns, b"k").unwrap();

    // Through daemon 0's socket; daemon 1 then holds the key in both caches.
    sockets[0].kv_put(&ns, b("k"), b("v1"), 1).await.unwrap();
    versions_within_bound(&fronts[1], &kv, &pk, &["v1"]).await;
    super::seen_within_bound(&sockets[1], &ns, "k", "v1").await;
    sockets[0].kv_put(&ns, b("k"), b("v2"), 2).await.unwrap();
    versions_within_bound(&fronts[1], &kv, &pk, &["v1", "v2"]).await;
    super::seen_within_bound(&sockets[1], &ns, "k", "v2").await;

    // Through daemon 0's front, as zio-flow's own backend writes a version.
    let version = |ts: &str, v: &str| {
        HashMap::from([
            (KV_KEY.to_owned(), AttributeValue::B(Blob::new(pk.clone()))),
            (KV_TIMESTAMP.to_owned(), AttributeValue::N(ts.into())),
            (KV_VALUE.to_owned(), AttributeValue::B(Blob::new(v))),
            (KV_NAMESPACE.to_owned(), s(&ns)),
        ])
    };
    let put = |c: &Api, item| c.put_item().table_name(&kv).set_item(Some(item)).send();
    put(&fronts[0], version("3", "v3")).await.unwrap();
    super::seen_within_bound(&sockets[1], &ns, "k", "v3").await;
    versions_within_bound(&fronts[1], &kv, &pk, &["v1", "v2", "v3"]).await;

    // Around both.
    let direct = sdk_client(endpoint()).await;
    put(&direct, version("4", "v4")).await.unwrap();
    for i in 0..2 {
        super::seen_within_bound(&sockets[i], &ns, "k", "v4").await;
        versions_within_bound(&fronts[i], &kv, &pk, &["v1", "v2", "v3", "v4"]).await;
    }
}
