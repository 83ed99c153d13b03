//! The item workloads, through DynamoDB's own API with the Rust AWS SDK: the daemon's
//! DynamoDB API front (`--target api`, `--endpoint`) or DynamoDB called directly
//! (`--target dynamodb`), on a table of their own, [`TABLE`], which the daemon caches.
//!
//! - `item-get`: GetItem of a preloaded item (through the front: a hit);
//! - `item-query`: Query of a preloaded item's partition (through the front: a hit);
//! - `item-put`: PutItem of an item (forwarded by the front, which drops what it held).

use std::time::Instant;

use anyhow::Context;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType, StreamSpecification, StreamViewType,
};
use aws_sdk_dynamodb::Client;
use bytes::Bytes;
use futures::future::try_join_all;

/// The items' table: partition key `pk` (S), sort key `sk` (N), a stream of old and new
/// images.
pub const TABLE: &str = "ddbcached-bench-items";

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Item {
    Get,
    Query,
    Put,
}

/// Creates [`TABLE`] unless it exists.
pub async fn create_table(client: &Client) -> anyhow::Result<()> {
    let attribute = |name: &str, kind| {
        AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(kind)
            .build()
    };
    let key = |name: &str, kind| {
        KeySchemaElement::builder()
            .attribute_name(name)
            .key_type(kind)
            .build()
    };
    let created = client
        .create_table()
        .table_name(TABLE)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attribute("pk", ScalarAttributeType::S)?)
        .attribute_definitions(attribute("sk", ScalarAttributeType::N)?)
        .key_schema(key("pk", KeyType::Hash)?)
        .key_schema(key("sk", KeyType::Range)?)
        .stream_specification(
            StreamSpecification::builder()
                .stream_enabled(true)
                .stream_view_type(StreamViewType::NewAndOldImages)
                .build()?,
        )
        .send()
        .await;
    match created {
        Ok(_) => Ok(()),
        Err(e)
            if e.as_service_error()
                .is_some_and(|e| e.is_resource_in_use_exception()) =>
        {
            Ok(())
        }
        Err(e) => Err(e).context("creating the items' table"),
    }
}

fn pk(k: usize) -> AttributeValue {
    AttributeValue::S(format!("item-{k:08}"))
}

fn item(k: usize, sk: i64, value: &Bytes) -> std::collections::HashMap<String, AttributeValue> {
    std::collections::HashMap::from([
        ("pk".to_owned(), pk(k)),
        ("sk".to_owned(), AttributeValue::N(sk.to_string())),
        ("v".to_owned(), AttributeValue::B(value.to_vec().into())),
    ])
}

/// Writes the items the reads find, then reads each once through `client` (so that the
/// front holds them).
pub async fn preload(
    client: &Client,
    workload: Item,
    keys: usize,
    value: &Bytes,
) -> anyhow::Result<()> {
    if workload == Item::Put {
        return Ok(());
    }
    for chunk in (0..keys).collect::<Vec<_>>().chunks(64) {
        try_join_all(chunk.iter().map(|k| {
            client
                .put_item()
                .table_name(TABLE)
                .set_item(Some(item(*k, 1, value)))
                .send()
        }))
        .await?;
    }
    for chunk in (0..keys).collect::<Vec<_>>().chunks(64) {
        try_join_all(chunk.iter().map(|k| read(client, workload, *k))).await?;
    }
    Ok(())
}

async fn read(client: &Client, workload: Item, k: usize) -> anyhow::Result<()> {
    let found = match workload {
        Item::Get => client
            .get_item()
            .table_name(TABLE)
            .key("pk", pk(k))
            .key("sk", AttributeValue::N("1".into()))
            .send()
            .await?
            .item
            .is_some(),
        _ => !client
            .query()
            .table_name(TABLE)
            .key_condition_expression("pk = :pk")
            .expression_attribute_values(":pk", pk(k))
            .send()
            .await?
            .items()
            .is_empty(),
    };
    anyhow::ensure!(found, "item {k} is missing");
    Ok(())
}

/// `callers` concurrent callers of `workload` until `stop_at`; latencies after
/// `warm_until`.
pub async fn run(
    client: &Client,
    workload: Item,
    callers: usize,
    keys: usize,
    value: &Bytes,
    warm_until: Instant,
    stop_at: Instant,
) -> anyhow::Result<Vec<u64>> {
    let loops = (0..callers).map(|c| async move {
        let mut rng = super::XorShift::new(c as u64 + 1);
        let mut latencies = Vec::new();
        let mut sk = (c as i64) << 40;
        loop {
            let start = Instant::now();
            if start >= stop_at {
                return Ok::<_, anyhow::Error>(latencies);
            }
            let k = rng.below(keys);
            match workload {
                Item::Put => {
                    sk += 1;
                    client
                        .put_item()
                        .table_name(TABLE)
                        .set_item(Some(item(k, sk, value)))
                        .send()
                        .await?;
                }
                _ => read(client, workload, k).await?,
            }
            if start >= warm_until {
                latencies.push(start.elapsed().as_nanos() as u64);
            }
        }
    });
    Ok(try_join_all(loops).await?.concat())
}
