//! The two stores of semantics.md on DynamoDB, with no cache: every read is a strongly
//! consistent DynamoDB read where DynamoDB offers one.
//!
//! - [`keys`]: how (namespace, key) and topics become DynamoDB keys, and item sizes.
//! - [`kv`]: the multi-version key-value store.
//! - [`log`]: the append-only indexed store.
//! - [`batch`]: deletes of any size (batches of 25, unprocessed items retried).
//!
//! Errors are [`StoreError`]s, each mapped to a protocol [`ErrorCode`].

pub mod batch;
pub mod item;
pub mod keys;
pub mod kv;
pub mod log;

use std::time::Duration;

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use ddbcached_protocol::ErrorCode;

pub use kv::KvStore;
pub use log::LogStore;

/// Which store a table holds: the key-value store's versions or the indexed store's
/// topics. Tables are counted, labelled and kept fresh apart, by this.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StoreTable {
    Kv = 0,
    Log = 1,
}

impl StoreTable {
    pub const ALL: [StoreTable; 2] = [StoreTable::Kv, StoreTable::Log];

    /// The label metrics and health use.
    pub fn name(self) -> &'static str {
        match self {
            StoreTable::Kv => "kv",
            StoreTable::Log => "log",
        }
    }
}

impl crate::stream::sink::Tailed for StoreTable {
    fn slot(self) -> usize {
        self as usize
    }
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The request cannot be stored as asked (sizes, lengths).
    #[error("{0}")]
    InvalidArgument(String),
    /// The item would exceed DynamoDB's item size limit; nothing was written.
    #[error("item would be {size} bytes, over DynamoDB's limit of {limit} bytes (400 KB, attribute names included); nothing was written")]
    ItemTooLarge { size: usize, limit: usize },
    /// The call did not finish in time; for a write the outcome is unknown.
    #[error("DynamoDB {api} did not finish within the configured timeout (the write may or may not have been applied)")]
    Timeout { api: &'static str },
    /// The request waited too long behind earlier ones on the same key; nothing was sent.
    #[error("gave up after {waited_ms} ms behind earlier requests on the same key (DynamoDB is slow or unreachable); nothing was sent")]
    Queued { waited_ms: u64 },
    /// DynamoDB could not be reached.
    #[error("DynamoDB {api} unreachable: {detail}")]
    Unavailable { api: &'static str, detail: String },
    /// DynamoDB kept throttling past the retries.
    #[error("DynamoDB {api} throttled after retries: {detail}")]
    Throttled { api: &'static str, detail: String },
    /// Index allocation kept losing to other writers.
    #[error("index allocation on topic {topic:?} lost to concurrent writers {attempts} times; nothing was written")]
    Conflict { topic: String, attempts: u32 },
    /// DynamoDB refused the call.
    #[error("DynamoDB {api} failed: {code}: {message}")]
    Backend {
        api: &'static str,
        code: String,
        message: String,
    },
    /// An item in the table does not have the shape this daemon writes.
    #[error("table {table} holds an item this daemon cannot read: {detail}")]
    Corrupt { table: String, detail: String },
}

impl StoreError {
    /// The protocol code a client receives for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            StoreError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            StoreError::ItemTooLarge { .. } => ErrorCode::ValueTooLarge,
            StoreError::Timeout { .. } | StoreError::Queued { .. } => ErrorCode::Timeout,
            StoreError::Unavailable { .. } => ErrorCode::Unavailable,
            StoreError::Throttled { .. } => ErrorCode::Throttled,
            StoreError::Conflict { .. } => ErrorCode::Conflict,
            StoreError::Backend { .. } => ErrorCode::Backend,
            StoreError::Corrupt { .. } => ErrorCode::Internal,
        }
    }

    /// Maps an SDK error of call `api` to a store error.
    pub fn from_sdk<E, R>(api: &'static str, err: SdkError<E, R>) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        match &err {
            SdkError::TimeoutError(_) => StoreError::Timeout { api },
            SdkError::DispatchFailure(d) if d.is_timeout() => StoreError::Timeout { api },
            SdkError::DispatchFailure(_) => StoreError::Unavailable {
                api,
                detail: error_chain(&err),
            },
            SdkError::ServiceError(s) => {
                let e = s.err();
                let code = e.code().unwrap_or("Unknown").to_owned();
                let message = e.message().unwrap_or_default().to_owned();
                if is_throttling(&code) {
                    StoreError::Throttled {
                        api,
                        detail: format!("{code}: {message}"),
                    }
                } else {
                    StoreError::Backend { api, code, message }
                }
            }
            // A response that could not be parsed, or a request that could not be built.
            _ => StoreError::Backend {
                api,
                code: "Client".into(),
                message: error_chain(&err),
            },
        }
    }
}

/// Error codes DynamoDB uses for throttling (retried by the SDK before they reach us).
pub(crate) fn is_throttling(code: &str) -> bool {
    matches!(
        code,
        "ProvisionedThroughputExceededException"
            | "ThrottlingException"
            | "RequestLimitExceeded"
            | "LimitExceededException"
    )
}

/// The error and its sources on one line: SDK errors put the useful part in a source.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Exponential backoff with full jitter, for the retry loops the SDK does not cover
/// (unprocessed batch items, lost index races).
pub(crate) fn backoff(attempt: u32) -> Duration {
    let cap_ms = 10u64.saturating_mul(1 << attempt.min(7)).min(1000);
    Duration::from_millis(rand::random_range(1..=cap_ms))
}
