//! The DynamoDB API front on the stores' own tables, as zio-flow's DynamoDB backend
//! writes them beside executors that use the socket: a write through either front is
//! read through the other at once, the stream being far too slow to have told it; and
//! one reader of each table's stream keeps both caches coherent with writes around.

use std::time::Duration;

use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;
use bytes::Bytes;
use ddbcached::store::keys::{
    kv_partition_key, KV_KEY, KV_NAMESPACE, KV_TIMESTAMP, KV_VALUE, LOG_INDEX, LOG_TOPIC, LOG_VALUE,
};
use ddbcached::store::KvStore;
use ddbcached_protocol::Versioned;

use crate::harness::{api_url, http_get, n, name, s, sdk_client, Daemon};

/// A staleness bound no stream lag reaches, and a stream polled once in it: a write is
/// seen at once only if the write itself dropped what it changed.
const SLOW_STREAM_MS: u64 = 600_000;
/// How long a change around the daemon may take to show on a loaded machine.
const CONVERGENCE: Duration = Duration::from_secs(60);

fn b(text: &str) -> Bytes {
    Bytes::copy_from_slice(text.as_bytes())
}

fn blob(bytes: impl Into<Vec<u8>>) -> AttributeValue {
    AttributeValue::B(Blob::new(bytes))
}

/// DynamoDB calls of one API the daemon's stores made so far.
fn calls(d: &Daemon, api: &str) -> u64 {
    d.api_calls.snapshot().get(api).map_or(0, |c| c.calls)
}

/// A daemon whose front caches the stores' tables too.
async fn daemon_with(edit: impl FnOnce(&mut ddbcached::config::Config)) -> Daemon {
    Daemon::start_with(|c| {
        c.dynamodb_api.listen = "127.0.0.1:0".into();
        c.dynamodb_api.tables = vec![c.dynamodb.kv_table.clone(), c.dynamodb.log_table.clone()];
        c.cache.max_staleness_ms = SLOW_STREAM_MS;
        edit(c);
    })
    .await
}

async fn daemon() -> Daemon {
    daemon_with(|c| c.streams.poll_interval_ms = SLOW_STREAM_MS / 2).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_version_written_through_the_api_is_read_through_the_socket_at_once() {
    let d = daemon().await;
    let (socket, api) = (d.client().await, sdk_client(&api_url(&d)).await);
    let ns = name();
    socket.kv_put(&ns, b("k"), b("v1"), 1).await.unwrap();
    let v1 = Some(Versioned {
        ts: 1,
        value: b("v1"),
    });
    assert_eq!(socket.kv_get(&ns, b("k"), None).await.unwrap(), v1);
    let queries = calls(&d, "Query");
    assert_eq!(socket.kv_get(&ns, b("k"), None).await.unwrap(), v1);
    assert_eq!(calls(&d, "Query"), queries, "the key is cached");

    // A newer version, written as zio-flow's backend writes one.
    api.put_item()
        .table_name(&d.config.dynamodb.kv_table)
        .item(KV_KEY, blob(kv_partition_key(&ns, b"k").unwrap()))
        .item(KV_TIMESTAMP, n("2"))
        .item(KV_VALUE, blob("v2"))
        .item(KV_NAMESPACE, s(&ns))
        .send()
        .await
        .unwrap();
    assert_eq!(
        socket.kv_get(&ns, b("k"), None).await.unwrap(),
        Some(Versioned {
            ts: 2,
            value: b("v2")
        })
    );
}

/// A PartiQL write names its items in a statement the front does not read: the store's
/// table is flushed, so the socket reads what it wrote too.
#[tokio::test(flavor = "multi_thread")]
async fn a_partiql_write_through_the_api_is_read_through_the_socket_at_once() {
    let d = daemon().await;
    let (socket, api) = (d.client().await, sdk_client(&api_url(&d)).await);
    let topic = name();
    let index = socket.log_put(&topic, b("one")).await.unwrap();
    assert_eq!(
        socket.log_scan(&topic, index, index).await.unwrap(),
        [b("one")]
    );
    let queries = calls(&d, "Query");
    assert_eq!(
        socket.log_scan(&topic, index, index).await.unwrap(),
        [b("one")]
    );
    assert_eq!(calls(&d, "Query"), queries, "the topic is cached");

    let log = &d.config.dynamodb.log_table;
    api.execute_statement()
        .statement(format!(
            "UPDATE \"{log}\" SET {LOG_VALUE} = ? WHERE {LOG_TOPIC} = ? AND {LOG_INDEX} = ?"
        ))
        .parameters(blob("uno"))
        .parameters(s(&topic))
        .parameters(n(&index.to_string()))
        .send()
        .await
        .unwrap();
    assert_eq!(
        socket.log_scan(&topic, index, index).await.unwrap(),
        [b("uno")]
    );
}

/// One tailer per table feeds both caches of it: a version written around the daemon
/// reaches the socket's cached key and the front's cached query of its partition, and
/// the stream's counters name the stores' tables only (a second reader of the same
/// stream would count under the table's own name).
#[tokio::test(flavor = "multi_thread")]
async fn one_reader_of_a_shared_tables_stream_keeps_both_caches_coherent() {
    let d = daemon_with(|_| {}).await;
    let (socket, api) = (d.client().await, sdk_client(&api_url(&d)).await);
    let kv = d.config.dynamodb.kv_table.clone();
    let ns = name();
    let pk = kv_partition_key(&ns, b"k").unwrap();
    let versions = || async {
        let got = api
            .query()
            .table_name(&kv)
            .key_condition_expression("#k = :k")
            .expression_attribute_names("#k", KV_KEY)
            .expression_attribute_values(":k", blob(pk.clone()))
            .send()
            .await
            .unwrap();
        got.items.unwrap_or_default().len()
    };
    socket.kv_put(&ns, b("k"), b("v1"), 1).await.unwrap();
    socket.kv_get(&ns, b("k"), None).await.unwrap();
    assert_eq!(versions().await, 1);

    let around = KvStore::new(
        ddbcached::aws::dynamodb_client(&d.config.dynamodb, Default::default()).await,
        kv.clone(),
        10,
    );
    around.put(&ns, b"k", b("v2"), 2).await.unwrap();
    let v2 = Some(Versioned {
        ts: 2,
        value: b("v2"),
    });
    tokio::time::timeout(CONVERGENCE, async {
        while socket.kv_get(&ns, b("k"), None).await.unwrap() != v2 || versions().await != 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the write around the daemon reaches both caches");

    let metrics = http_get(d.metrics_endpoint(), "/metrics").await.1;
    let tailed: Vec<&str> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("ddbcached_stream_shards{table=\""))
        .filter_map(|l| l.split('"').next())
        .collect();
    assert_eq!(tailed, ["kv", "log"], "one reader per table");
}
