//! The DynamoDB API front on the stores' own tables, as zio-flow's DynamoDB backend
//! writes them beside executors that use the socket: a write through either front is
//! read through the other at once, the stream being far too slow to have told it.

use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;
use bytes::Bytes;
use ddbcached::store::keys::{
    kv_partition_key, KV_KEY, KV_NAMESPACE, KV_TIMESTAMP, KV_VALUE, LOG_INDEX, LOG_TOPIC, LOG_VALUE,
};
use ddbcached_protocol::Versioned;

use crate::harness::{api_url, n, name, s, sdk_client, Daemon};

/// A staleness bound no stream lag reaches, and a stream polled once in it: a write is
/// seen at once only if the write itself dropped what it changed.
const SLOW_STREAM_MS: u64 = 600_000;

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

async fn daemon() -> Daemon {
    Daemon::start_with(|c| {
        c.dynamodb_api.listen = "127.0.0.1:0".into();
        c.dynamodb_api.tables = vec![c.dynamodb.kv_table.clone(), c.dynamodb.log_table.clone()];
        c.cache.max_staleness_ms = SLOW_STREAM_MS;
        c.streams.poll_interval_ms = SLOW_STREAM_MS / 2;
    })
    .await
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
