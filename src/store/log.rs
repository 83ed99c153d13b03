//! The append-only indexed store on the `_zflow_indexed_store` table.
//!
//! Entries are items (topic, index); the topic's counter is the item at index -1 whose
//! value is a number, the last allocated index. An append reads the counter (consistent)
//! and writes, in one `TransactWriteItems`, the counter moved from c to c+1 under the
//! condition that it still is c, and the entry at c+1. Only one writer can move the
//! counter from c, and the entry is written with it or not at all, so indices are handed
//! out exactly once and never skipped, whichever daemons append. The transaction carries a
//! client request token, which makes the SDK's own retries of it idempotent.
//!
//! Callers serialize their own appends to one topic (the cache's write lock does), so that
//! only other daemons cause retries; a caller that knows the position (from its cache)
//! passes it and saves the counter read, paying a retry only if it was out of date.

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{Put, TransactWriteItem};
use aws_sdk_dynamodb::Client;
use bytes::Bytes;
use futures::{Stream, StreamExt};

use crate::store::batch::delete_keys;
use crate::store::item::{bin, get_num, num, str, take_bin, Item, Pages};
use crate::store::keys::{
    check_log_item, check_topic, LOG_COUNTER_INDEX, LOG_INDEX, LOG_TOPIC, LOG_VALUE,
};
use crate::store::{backoff, StoreError};

/// The indexed store.
#[derive(Clone)]
pub struct LogStore {
    client: Client,
    table: String,
    batch_max_attempts: u32,
    index_max_attempts: u32,
}

impl LogStore {
    pub fn new(
        client: Client,
        table: String,
        batch_max_attempts: u32,
        index_max_attempts: u32,
    ) -> LogStore {
        LogStore {
            client,
            table,
            batch_max_attempts,
            index_max_attempts,
        }
    }

    /// The last allocated index (0 for an unknown or deleted topic).
    pub async fn position(&self, topic: &str) -> Result<i64, StoreError> {
        check_topic(topic)?;
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .consistent_read(true)
            .key(LOG_TOPIC, str(topic))
            .key(LOG_INDEX, num(LOG_COUNTER_INDEX))
            .projection_expression("#v")
            .expression_attribute_names("#v", LOG_VALUE)
            .send()
            .await
            .map_err(|e| StoreError::from_sdk("GetItem", e))?;
        match out.item {
            Some(item) => get_num(&self.table, &item, LOG_VALUE),
            None => Ok(0),
        }
    }

    /// Appends a value; returns its index. `known_last`, when given, is taken as the
    /// position for the first attempt instead of reading it.
    pub async fn put(
        &self,
        topic: &str,
        value: Bytes,
        known_last: Option<i64>,
    ) -> Result<i64, StoreError> {
        check_topic(topic)?;
        let mut known_last = known_last;
        for attempt in 0..self.index_max_attempts {
            if attempt > 0 {
                tokio::time::sleep(backoff(attempt)).await;
            }
            let last = match known_last.take() {
                Some(last) => last,
                None => self.position(topic).await?,
            };
            let next = last + 1;
            check_log_item(topic, next, value.len())?;
            let counter = Put::builder()
                .table_name(&self.table)
                .item(LOG_TOPIC, str(topic))
                .item(LOG_INDEX, num(LOG_COUNTER_INDEX))
                .item(LOG_VALUE, num(next));
            let counter = if last == 0 {
                counter
                    .condition_expression("attribute_not_exists(#i)")
                    .expression_attribute_names("#i", LOG_INDEX)
            } else {
                counter
                    .condition_expression("#v = :last")
                    .expression_attribute_names("#v", LOG_VALUE)
                    .expression_attribute_values(":last", num(last))
            };
            // No condition on the entry: the counter's condition already makes this writer
            // the only one for index `next`, and an entry left over from a deleted topic
            // must be overwritten.
            let entry = Put::builder()
                .table_name(&self.table)
                .item(LOG_TOPIC, str(topic))
                .item(LOG_INDEX, num(next))
                .item(LOG_VALUE, bin(value.clone()));
            let result = self
                .client
                .transact_write_items()
                .transact_items(TransactWriteItem::builder().put(build(counter)?).build())
                .transact_items(TransactWriteItem::builder().put(build(entry)?).build())
                .client_request_token(request_token())
                .send()
                .await;
            match result {
                Ok(_) => return Ok(next),
                // Lost to another writer, or the known position was out of date.
                Err(e) if lost_race(&e) => continue,
                Err(e) => return Err(StoreError::from_sdk("TransactWriteItems", e)),
            }
        }
        Err(StoreError::Conflict {
            topic: topic.to_owned(),
            attempts: self.index_max_attempts,
        })
    }

    /// The values at `from..=until`, in index order, one DynamoDB page at a time.
    pub fn scan(
        &self,
        topic: &str,
        from: i64,
        until: i64,
    ) -> impl Stream<Item = Result<Vec<Bytes>, StoreError>> + Send + 'static {
        if let Err(e) = check_topic(topic) {
            return futures::stream::once(async { Err(e) }).left_stream();
        }
        // Indices start at 1; the counter lives at -1 and must never be returned.
        let from = from.max(1);
        let pages = (from <= until).then(|| {
            Pages::new(
                self.client
                    .query()
                    .table_name(&self.table)
                    .consistent_read(true)
                    .key_condition_expression("#t = :t AND #i BETWEEN :a AND :b")
                    .projection_expression("#v")
                    .expression_attribute_names("#t", LOG_TOPIC)
                    .expression_attribute_names("#i", LOG_INDEX)
                    .expression_attribute_names("#v", LOG_VALUE)
                    .expression_attribute_values(":t", str(topic))
                    .expression_attribute_values(":a", num(from))
                    .expression_attribute_values(":b", num(until)),
            )
        });
        let table = self.table.clone();
        futures::stream::try_unfold(pages, move |mut pages| {
            let table = table.clone();
            async move {
                let Some(page) = (match pages.as_mut() {
                    Some(p) => p.next().await?,
                    None => None,
                }) else {
                    return Ok(None);
                };
                let values = page
                    .into_iter()
                    .map(|mut item| take_bin(&table, &mut item, LOG_VALUE))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Some((values, pages)))
            }
        })
        .right_stream()
    }

    /// Removes the topic and all its entries; the counter goes last, so that a failure
    /// half-way leaves a topic whose position still covers what remains.
    pub async fn delete(&self, topic: &str) -> Result<(), StoreError> {
        check_topic(topic)?;
        let mut pages = Pages::new(
            self.client
                .query()
                .table_name(&self.table)
                .consistent_read(true)
                .key_condition_expression("#t = :t AND #i >= :one")
                .projection_expression("#i")
                .expression_attribute_names("#t", LOG_TOPIC)
                .expression_attribute_names("#i", LOG_INDEX)
                .expression_attribute_values(":t", str(topic))
                .expression_attribute_values(":one", num(1)),
        );
        while let Some(page) = pages.next().await? {
            let keys = page
                .iter()
                .map(|item| Ok(self.key(topic, get_num(&self.table, item, LOG_INDEX)?)))
                .collect::<Result<Vec<_>, StoreError>>()?;
            delete_keys(&self.client, &self.table, keys, self.batch_max_attempts).await?;
        }
        self.client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(self.key(topic, LOG_COUNTER_INDEX)))
            .send()
            .await
            .map_err(|e| StoreError::from_sdk("DeleteItem", e))?;
        Ok(())
    }

    fn key(&self, topic: &str, index: i64) -> Item {
        Item::from([
            (LOG_TOPIC.to_owned(), str(topic)),
            (LOG_INDEX.to_owned(), num(index)),
        ])
    }
}

fn build(put: aws_sdk_dynamodb::types::builders::PutBuilder) -> Result<Put, StoreError> {
    put.build()
        .map_err(|e| StoreError::InvalidArgument(e.to_string()))
}

/// A fresh idempotency token for one transaction attempt.
fn request_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Whether a failed append lost to another writer (and should re-read and retry).
fn lost_race<R>(err: &SdkError<TransactWriteItemsError, R>) -> bool {
    let Some(e) = err.as_service_error() else {
        return false;
    };
    match e {
        TransactWriteItemsError::TransactionCanceledException(c) => {
            c.cancellation_reasons().iter().any(|r| {
                matches!(
                    r.code(),
                    Some("ConditionalCheckFailed" | "TransactionConflict")
                )
            })
        }
        TransactWriteItemsError::TransactionInProgressException(_) => true,
        other => other.code() == Some("TransactionConflictException"),
    }
}
