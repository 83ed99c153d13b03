//! The `log` and `step` workloads as zio-flow's own DynamoDB backend (zio-flow-dynamodb
//! 1.0.0-RC4) makes its calls, with the AWS SDK directly: the baseline those rows of the
//! daemon are compared with.
//!
//! - append (`IndexedStore.put`): GetItem of the topic's counter (not consistent), a
//!   PutItem of the counter conditioned on its old value, then a PutItem of the entry;
//!   the whole again when the condition fails;
//! - read back (`IndexedStore.scan`): a Query of the index range (not consistent);
//! - read a variable (`KeyValueStore.getLatest`): a Query of the key's versions at or
//!   before the clock, newest first, limit 1 (not consistent);
//! - write it (`KeyValueStore.put`): an UpdateItem setting the value and the namespace.
//!
//! Its partition key is zio-flow's too: the namespace's bytes followed by the key's.

use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_dynamodb::Client;
use bytes::Bytes;
use ddbcached::store::keys::{
    KV_KEY, KV_NAMESPACE, KV_TIMESTAMP, KV_VALUE, LOG_COUNTER_INDEX, LOG_INDEX, LOG_TOPIC,
    LOG_VALUE,
};

/// The tables, as the daemon's configuration names them.
pub struct Tables {
    pub kv: String,
    pub log: String,
}

fn n(v: i64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn b(v: &[u8]) -> AttributeValue {
    AttributeValue::B(v.to_vec().into())
}

/// Reads a variable at `clock - 1` and writes its version `clock`, as a step does.
pub async fn step_variable(
    client: &Client,
    tables: &Tables,
    ns: &str,
    value: &Bytes,
    clock: i64,
) -> anyhow::Result<()> {
    let key = [ns.as_bytes(), b"state"].concat();
    client
        .query()
        .table_name(&tables.kv)
        .limit(1)
        .scan_index_forward(false)
        .key_condition_expression("#k = :k AND #t <= :t")
        .expression_attribute_names("#k", KV_KEY)
        .expression_attribute_names("#t", KV_TIMESTAMP)
        .expression_attribute_values(":k", b(&key))
        .expression_attribute_values(":t", n(clock - 1))
        .send()
        .await?;
    client
        .update_item()
        .table_name(&tables.kv)
        .key(KV_KEY, b(&key))
        .key(KV_TIMESTAMP, n(clock))
        .update_expression("SET #v = :v, #n = :n")
        .expression_attribute_names("#v", KV_VALUE)
        .expression_attribute_names("#n", KV_NAMESPACE)
        .expression_attribute_values(":v", b(value))
        .expression_attribute_values(":n", AttributeValue::S(ns.to_owned()))
        .send()
        .await?;
    Ok(())
}

/// Appends `value` to `topic` and reads the entry back; returns its index.
pub async fn append_and_read(
    client: &Client,
    tables: &Tables,
    topic: &str,
    value: &Bytes,
) -> anyhow::Result<i64> {
    let topic_key = AttributeValue::S(topic.to_owned());
    let index = loop {
        let counter = client
            .get_item()
            .table_name(&tables.log)
            .key(LOG_TOPIC, topic_key.clone())
            .key(LOG_INDEX, n(LOG_COUNTER_INDEX))
            .send()
            .await?;
        let current = match counter.item().and_then(|i| i.get(LOG_VALUE)) {
            Some(AttributeValue::N(v)) => v.parse::<i64>()?,
            _ => 0,
        };
        let claimed = client
            .put_item()
            .table_name(&tables.log)
            .item(LOG_TOPIC, topic_key.clone())
            .item(LOG_INDEX, n(LOG_COUNTER_INDEX))
            .item(LOG_VALUE, n(current + 1))
            .condition_expression("#v = :idx OR attribute_not_exists(#v)")
            .expression_attribute_names("#v", LOG_VALUE)
            .expression_attribute_values(":idx", n(current))
            .send()
            .await;
        match claimed {
            Ok(_) => break current + 1,
            Err(SdkError::ServiceError(e))
                if matches!(e.err(), PutItemError::ConditionalCheckFailedException(_)) => {}
            Err(e) => return Err(e.into()),
        }
    };
    client
        .put_item()
        .table_name(&tables.log)
        .item(LOG_TOPIC, topic_key.clone())
        .item(LOG_INDEX, n(index))
        .item(LOG_VALUE, b(value))
        .send()
        .await?;
    let read = client
        .query()
        .table_name(&tables.log)
        .key_condition_expression("#t = :t AND #i BETWEEN :a AND :b")
        .expression_attribute_names("#t", LOG_TOPIC)
        .expression_attribute_names("#i", LOG_INDEX)
        .expression_attribute_values(":t", topic_key)
        .expression_attribute_values(":a", n(index))
        .expression_attribute_values(":b", n(index))
        .send()
        .await?;
    anyhow::ensure!(read.count() == 1, "the entry just written is missing");
    Ok(index)
}
