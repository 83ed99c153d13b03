//! Deletes of any number of items: BatchWriteItem takes at most 25 requests, and may
//! leave some unprocessed under load; those are retried with backoff until done or the
//! configured attempts run out.

use aws_sdk_dynamodb::types::{DeleteRequest, WriteRequest};
use aws_sdk_dynamodb::Client;

use crate::store::item::Item;
use crate::store::{backoff, StoreError};

/// DynamoDB's cap on requests in one BatchWriteItem.
const BATCH_LIMIT: usize = 25;

/// Deletes the items with these primary keys from `table`.
pub async fn delete_keys(
    client: &Client,
    table: &str,
    keys: Vec<Item>,
    max_attempts: u32,
) -> Result<(), StoreError> {
    let mut requests = keys
        .into_iter()
        .map(|key| {
            DeleteRequest::builder()
                .set_key(Some(key))
                .build()
                .map(|d| WriteRequest::builder().delete_request(d).build())
                .map_err(|e| StoreError::InvalidArgument(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    while !requests.is_empty() {
        let rest = requests.split_off(requests.len().min(BATCH_LIMIT));
        write_batch(
            client,
            table,
            std::mem::replace(&mut requests, rest),
            max_attempts,
        )
        .await?;
    }
    Ok(())
}

async fn write_batch(
    client: &Client,
    table: &str,
    mut batch: Vec<WriteRequest>,
    max_attempts: u32,
) -> Result<(), StoreError> {
    for attempt in 0..max_attempts {
        if attempt > 0 {
            tokio::time::sleep(backoff(attempt)).await;
        }
        let out = client
            .batch_write_item()
            .request_items(table, batch)
            .send()
            .await
            .map_err(|e| StoreError::from_sdk("BatchWriteItem", e))?;
        batch = out
            .unprocessed_items
            .and_then(|mut m| m.remove(table))
            .unwrap_or_default();
        if batch.is_empty() {
            return Ok(());
        }
    }
    Err(StoreError::Throttled {
        api: "BatchWriteItem",
        detail: format!(
            "{} items still unprocessed after {max_attempts} attempts",
            batch.len()
        ),
    })
}
