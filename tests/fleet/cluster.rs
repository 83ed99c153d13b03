//! Fleet mode on a real Redis Cluster (three masters with a replica each): the master
//! serving the fleet's slot killed and its replica promoted, the slot moved to another
//! master while the fleet runs, the whole cluster restarted empty. Each time no read
//! that began past the bound returns the old value (a daemon either keeps proving
//! freshness or flushes and bypasses), and the fleet is fresh again afterwards. And
//! clusters speaking only TLS, or requiring a password.

use super::*;

impl Fleet<RedisCluster> {
    /// A fleet of three on a cluster of its own, `k` cached everywhere, and the slot of
    /// its streams.
    async fn on_cluster() -> (Fleet<RedisCluster>, Vec<Client>, String, u16) {
        let (fleet, clients, ns) =
            Fleet::with_cached_key_on(RedisCluster::start().await, 3, "").await;
        let d = &fleet.config.dynamodb;
        let slot = fleet
            .redis
            .slot(&stream_key(&d.lease_table, &d.kv_table))
            .await;
        (fleet, clients, ns, slot)
    }
}

/// After a change of the cluster, with `k` last written as `v2`: the fleet is fresh, a
/// write around reaches every daemon and writes through one reach the others.
async fn fresh_again(fleet: &Fleet<RedisCluster>, clients: &[Client], ns: &str) {
    fleet.wait_until_fresh().await;
    let watching: Vec<&Client> = clients.iter().collect();
    write_around_and_watch(fleet, &watching, ns, "v2", "v3", 3, CONVERGENCE).await;
    clients[0].kv_put(ns, b("k"), b("v4"), 4).await.unwrap();
    for c in &clients[1..] {
        seen_within_bound(c, ns, "k", "v4").await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_a_killed_master_is_replaced_by_its_replica_and_nothing_stale_is_served() {
    let (mut fleet, clients, ns, slot) = Fleet::on_cluster().await;
    assert!(!fleet.kv_entries().await.is_empty(), "the fleet publishes");
    let master = fleet.redis.master_of(slot).await;
    fleet.redis.kill(master).await;
    let watching: Vec<&Client> = clients.iter().collect();
    write_around_and_watch(&fleet, &watching, &ns, "v1", "v2", 2, CONVERGENCE).await;

    fleet.redis.wait_until_ok(&[master]).await;
    assert_ne!(fleet.redis.master_of(slot).await, master, "not failed over");
    fresh_again(&fleet, &clients, &ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_the_fleets_slot_moved_to_another_master_while_it_runs() {
    let (fleet, clients, ns, slot) = Fleet::on_cluster().await;
    let to = fleet.redis.other_master(slot).await;
    let watching: Vec<&Client> = clients.iter().collect();
    // Writes around are published, and read, while the slot's keys move.
    tokio::join!(
        fleet.redis.migrate(slot, to),
        write_around_and_watch(&fleet, &watching, &ns, "v1", "v2", 2, CONVERGENCE),
    );
    assert_eq!(fleet.redis.master_of(slot).await, to);
    assert!(
        !fleet.kv_entries().await.is_empty(),
        "the stream moved with its slot"
    );
    fresh_again(&fleet, &clients, &ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_restarted_empty_every_daemon_flushes_and_recovers() {
    let (mut fleet, clients, ns, _) = Fleet::on_cluster().await;
    // A reconnect flushes; so does a skipped entry number, if a client's own retries
    // carried a read across the restart.
    let causes = ["reconnected", "gap"];
    let before = fleet.flushes_for(&causes).await;
    fleet.redis.restart_empty().await;
    fleet
        .recovers_from_an_empty_redis(&clients, &ns, &causes, before)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_over_tls_relays_and_hints() {
    let cluster = RedisCluster::start_tls().await;
    assert!(cluster.url().starts_with("rediss+cluster://"));
    relays_and_hints(cluster).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_with_a_password_relays_and_hints() {
    let cluster = RedisCluster::start_with_password("fleet-secret").await;
    let without = cluster.url().replace("default:fleet-secret@", "");
    assert_ne!(without, cluster.url());
    let refused = Redis::open(&without, "").unwrap().connect(None).await;
    assert!(refused.is_err(), "a client without the password is refused");
    relays_and_hints(cluster).await;
}
