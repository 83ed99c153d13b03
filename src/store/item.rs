//! Conversions between Rust values and DynamoDB attribute values, and paginated queries.

use std::collections::HashMap;

use aws_sdk_dynamodb::operation::query::builders::QueryFluentBuilder;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;
use bytes::Bytes;

use crate::store::StoreError;

/// One DynamoDB item, or one primary key.
pub type Item = HashMap<String, AttributeValue>;

pub fn num(n: i64) -> AttributeValue {
    AttributeValue::N(n.to_string())
}

pub fn bin(b: impl Into<Vec<u8>>) -> AttributeValue {
    AttributeValue::B(Blob::new(b))
}

pub fn str(s: impl Into<String>) -> AttributeValue {
    AttributeValue::S(s.into())
}

/// Reads a number attribute as i64.
pub fn get_num(table: &str, item: &Item, name: &str) -> Result<i64, StoreError> {
    match item.get(name) {
        Some(AttributeValue::N(n)) => n.parse().map_err(|_| corrupt(table, name, "is not an i64")),
        _ => Err(corrupt(table, name, "is missing or not a number")),
    }
}

/// Takes a binary attribute out of an item.
pub fn take_bin(table: &str, item: &mut Item, name: &str) -> Result<Bytes, StoreError> {
    match item.remove(name) {
        Some(AttributeValue::B(b)) => Ok(Bytes::from(b.into_inner())),
        _ => Err(corrupt(table, name, "is missing or not binary")),
    }
}

fn corrupt(table: &str, name: &str, what: &str) -> StoreError {
    StoreError::Corrupt {
        table: table.to_owned(),
        detail: format!("attribute {name} {what}"),
    }
}

/// The pages of a query, fetched one at a time: DynamoDB returns at most 1 MB per call and
/// a `LastEvaluatedKey` to continue from.
pub struct Pages {
    query: QueryFluentBuilder,
    start: Option<Item>,
    done: bool,
}

impl Pages {
    pub fn new(query: QueryFluentBuilder) -> Pages {
        Pages {
            query,
            start: None,
            done: false,
        }
    }

    /// The next page of items, or `None` after the last.
    pub async fn next(&mut self) -> Result<Option<Vec<Item>>, StoreError> {
        if self.done {
            return Ok(None);
        }
        let out = self
            .query
            .clone()
            .set_exclusive_start_key(self.start.take())
            .send()
            .await
            .map_err(|e| StoreError::from_sdk("Query", e))?;
        self.start = out.last_evaluated_key;
        self.done = self.start.is_none();
        Ok(Some(out.items.unwrap_or_default()))
    }
}
