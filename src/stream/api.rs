//! The DynamoDB Streams calls the tailer makes, behind a trait: DynamoDB Local has one
//! shard per stream and never rolls it over, so shard lineage and the error paths are
//! tested against a scripted fake instead. [`SdkStreams`] is the real implementation.

use std::collections::HashMap;
use std::future::Future;

use aws_sdk_dynamodbstreams::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodbstreams::types::{
    AttributeValue, OperationType, ShardFilter, ShardFilterType, ShardIteratorType,
};
use bytes::Bytes;

/// One shard as DescribeStream lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardInfo {
    pub id: String,
    pub parent: Option<String>,
    /// It has an ending sequence number: it takes no new records.
    pub closed: bool,
}

/// One page of DescribeStream.
#[derive(Clone, Debug, Default)]
pub struct ShardPage {
    pub shards: Vec<ShardInfo>,
    /// Where the next page starts; `None` after the last page.
    pub last_evaluated: Option<String>,
}

/// Where a shard iterator starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartAt {
    TrimHorizon,
    Latest,
    /// Just after this sequence number (the last record applied).
    After(String),
}

/// An attribute value, reduced to the types the two tables use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attr {
    S(String),
    N(String),
    B(Bytes),
    Other,
}

/// An item's attributes.
pub type Image = HashMap<String, Attr>;

/// What happened to an item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    Insert,
    Modify,
    Remove,
}

impl Event {
    pub fn name(self) -> &'static str {
        match self {
            Event::Insert => "insert",
            Event::Modify => "modify",
            Event::Remove => "remove",
        }
    }
}

/// One stream record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub sequence_number: String,
    pub event: Event,
    pub keys: Image,
    /// The item after the change (absent for removals, or if the stream does not carry
    /// new images).
    pub new_image: Option<Image>,
    /// The item before the change (absent for insertions, or if the stream does not
    /// carry old images).
    pub old_image: Option<Image>,
}

/// One GetRecords answer.
#[derive(Clone, Debug, Default)]
pub struct RecordsPage {
    pub records: Vec<Record>,
    /// `None`: the shard is closed and fully read.
    pub next_iterator: Option<String>,
}

/// What the tailer must react to.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The iterator is older than 15 minutes.
    #[error("shard iterator expired")]
    ExpiredIterator,
    /// The records asked for are gone (older than 24 hours): continuity is lost.
    #[error("stream records were trimmed: {0}")]
    Trimmed(String),
    /// The shard or the stream no longer exists.
    #[error("not found: {0}")]
    NotFound(String),
    /// Too many requests, past the SDK's own retries.
    #[error("throttled: {0}")]
    Throttled(String),
    /// Anything else; worth retrying later.
    #[error("{0}")]
    Transient(String),
}

/// The Streams operations of one table's tailer.
pub trait StreamsApi: Send + Sync + 'static {
    /// The table's current stream (`LatestStreamArn`), if it has one.
    fn latest_stream_arn(
        &self,
        table: &str,
    ) -> impl Future<Output = Result<Option<String>, StreamError>> + Send;

    /// One page of the stream's shards, after `start_after`, or only the children of
    /// `children_of`.
    fn describe(
        &self,
        stream_arn: &str,
        start_after: Option<&str>,
        children_of: Option<&str>,
    ) -> impl Future<Output = Result<ShardPage, StreamError>> + Send;

    /// An iterator into a shard.
    fn iterator(
        &self,
        stream_arn: &str,
        shard: &str,
        at: &StartAt,
    ) -> impl Future<Output = Result<String, StreamError>> + Send;

    /// Up to 1000 records from an iterator.
    fn records(
        &self,
        iterator: &str,
    ) -> impl Future<Output = Result<RecordsPage, StreamError>> + Send;
}

/// The real Streams API (and DynamoDB's DescribeTable for the stream's ARN).
pub struct SdkStreams {
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub streams: aws_sdk_dynamodbstreams::Client,
}

/// GetRecords returns at most this many records (a larger `Limit` is rejected).
const RECORDS_PER_CALL: i32 = 1000;

impl StreamsApi for SdkStreams {
    async fn latest_stream_arn(&self, table: &str) -> Result<Option<String>, StreamError> {
        let out = self
            .dynamodb
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(classify)?;
        Ok(out.table.and_then(|t| t.latest_stream_arn))
    }

    async fn describe(
        &self,
        stream_arn: &str,
        start_after: Option<&str>,
        children_of: Option<&str>,
    ) -> Result<ShardPage, StreamError> {
        let filter = children_of.map(|id| {
            ShardFilter::builder()
                .r#type(ShardFilterType::ChildShards)
                .shard_id(id)
                .build()
        });
        let out = self
            .streams
            .describe_stream()
            .stream_arn(stream_arn)
            .set_exclusive_start_shard_id(start_after.map(str::to_owned))
            .set_shard_filter(filter)
            .send()
            .await
            .map_err(classify)?;
        let Some(desc) = out.stream_description else {
            return Ok(ShardPage::default());
        };
        Ok(ShardPage {
            shards: desc
                .shards()
                .iter()
                .filter_map(|s| {
                    Some(ShardInfo {
                        id: s.shard_id()?.to_owned(),
                        parent: s.parent_shard_id().map(str::to_owned),
                        closed: s
                            .sequence_number_range()
                            .is_some_and(|r| r.ending_sequence_number().is_some()),
                    })
                })
                .collect(),
            last_evaluated: desc.last_evaluated_shard_id,
        })
    }

    async fn iterator(
        &self,
        stream_arn: &str,
        shard: &str,
        at: &StartAt,
    ) -> Result<String, StreamError> {
        let (kind, seq) = match at {
            StartAt::TrimHorizon => (ShardIteratorType::TrimHorizon, None),
            StartAt::Latest => (ShardIteratorType::Latest, None),
            StartAt::After(seq) => (ShardIteratorType::AfterSequenceNumber, Some(seq.clone())),
        };
        let out = self
            .streams
            .get_shard_iterator()
            .stream_arn(stream_arn)
            .shard_id(shard)
            .shard_iterator_type(kind)
            .set_sequence_number(seq)
            .send()
            .await
            .map_err(classify)?;
        out.shard_iterator
            .ok_or_else(|| StreamError::NotFound(format!("no iterator for shard {shard}")))
    }

    async fn records(&self, iterator: &str) -> Result<RecordsPage, StreamError> {
        let sent = self
            .streams
            .get_records()
            .shard_iterator(iterator)
            .limit(RECORDS_PER_CALL)
            .send()
            .await;
        let out = match sent {
            Ok(out) => out,
            // A page the SDK cannot read would hold the tailer at it for good.
            Err(err) => {
                let page = err
                    .raw_response()
                    .filter(|r| r.status().is_success())
                    .and_then(|r| r.body().bytes())
                    .and_then(lenient_page);
                return page.ok_or_else(|| classify(err));
            }
        };
        Ok(RecordsPage {
            records: out
                .records
                .unwrap_or_default()
                .into_iter()
                .filter_map(convert_record)
                .collect(),
            next_iterator: out.next_shard_iterator,
        })
    }
}

fn convert_record(r: aws_sdk_dynamodbstreams::types::Record) -> Option<Record> {
    let event = match r.event_name? {
        OperationType::Insert => Event::Insert,
        OperationType::Modify => Event::Modify,
        OperationType::Remove => Event::Remove,
        _ => return None,
    };
    let data = r.dynamodb?;
    Some(Record {
        sequence_number: data.sequence_number?,
        event,
        keys: convert_image(data.keys?),
        new_image: data.new_image.map(convert_image),
        old_image: data.old_image.map(convert_image),
    })
}

/// The Streams SDK has its own `AttributeValue`, distinct from DynamoDB's.
fn convert_image(image: HashMap<String, AttributeValue>) -> Image {
    image
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                AttributeValue::S(s) => Attr::S(s),
                AttributeValue::N(n) => Attr::N(n),
                AttributeValue::B(b) => Attr::B(Bytes::from(b.into_inner())),
                _ => Attr::Other,
            };
            (k, v)
        })
        .collect()
}

/// A GetRecords answer read without the SDK, for one it refused: DynamoDB Local writes
/// an empty map in a record's image as `{}`, a value of no type, and the SDK then
/// refuses the whole page. A value it cannot type is [`Attr::Other`], as any the tables'
/// keys do not use; `None` if the body is not a GetRecords answer at all.
fn lenient_page(body: &[u8]) -> Option<RecordsPage> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Page {
        #[serde(default)]
        records: Vec<Raw>,
        next_shard_iterator: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Raw {
        #[serde(rename = "eventName")]
        event_name: Option<String>,
        dynamodb: Option<Data>,
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Data {
        sequence_number: Option<String>,
        keys: Option<HashMap<String, serde_json::Value>>,
        new_image: Option<HashMap<String, serde_json::Value>>,
        old_image: Option<HashMap<String, serde_json::Value>>,
    }
    fn image(raw: HashMap<String, serde_json::Value>) -> Image {
        raw.into_iter()
            .map(|(name, v)| {
                let typed = v
                    .as_object()
                    .filter(|o| o.len() == 1)
                    .and_then(|o| o.iter().next());
                let attr = match typed {
                    Some((t, serde_json::Value::String(s))) if t == "S" => Attr::S(s.clone()),
                    Some((t, serde_json::Value::String(n))) if t == "N" => Attr::N(n.clone()),
                    Some((t, serde_json::Value::String(b))) if t == "B" => {
                        match aws_smithy_types::base64::decode(b) {
                            Ok(bytes) => Attr::B(Bytes::from(bytes)),
                            Err(_) => Attr::Other,
                        }
                    }
                    _ => Attr::Other,
                };
                (name, attr)
            })
            .collect()
    }
    let page: Page = serde_json::from_slice(body).ok()?;
    let records = page
        .records
        .into_iter()
        .filter_map(|r| {
            let event = match r.event_name?.as_str() {
                "INSERT" => Event::Insert,
                "MODIFY" => Event::Modify,
                "REMOVE" => Event::Remove,
                _ => return None,
            };
            let data = r.dynamodb?;
            Some(Record {
                sequence_number: data.sequence_number?,
                event,
                keys: image(data.keys?),
                new_image: data.new_image.map(image),
                old_image: data.old_image.map(image),
            })
        })
        .collect();
    Some(RecordsPage {
        records,
        next_iterator: page.next_shard_iterator,
    })
}

/// Sorts an SDK error into what the tailer does about it (streams.md's table).
fn classify<E, R>(err: SdkError<E, R>) -> StreamError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let code = err.as_service_error().and_then(|e| e.code()).unwrap_or("");
    let message = err
        .as_service_error()
        .and_then(|e| e.message())
        .map(str::to_owned)
        // The SDK's own text of an error without a message says only "service error";
        // its full context holds the whole response, so only its start is kept.
        .unwrap_or_else(|| {
            DisplayErrorContext(&err)
                .to_string()
                .chars()
                .take(300)
                .collect()
        });
    match code {
        "ExpiredIteratorException" => StreamError::ExpiredIterator,
        "TrimmedDataAccessException" => StreamError::Trimmed(message),
        // An unknown sequence number: the records after it are gone as far as we can tell.
        "ValidationException"
            if message
                .to_ascii_lowercase()
                .contains("invalid sequencenumber") =>
        {
            StreamError::Trimmed(message)
        }
        "ResourceNotFoundException" => StreamError::NotFound(message),
        "LimitExceededException"
        | "ThrottlingException"
        | "ProvisionedThroughputExceededException" => StreamError::Throttled(message),
        _ => StreamError::Transient(format!("{code} {message}").trim().to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_the_sdk_refuses_is_read_with_its_untyped_values_unknown() {
        let body = br#"{"Records":[{"eventName":"INSERT","dynamodb":{
            "Keys":{"pk":{"S":"p"},"sk":{"N":"1"}},
            "NewImage":{"pk":{"S":"p"},"sk":{"N":"1"},"b":{"B":"/w=="},"v":{}},
            "SequenceNumber":"15"}},
            {"eventName":"REMOVE","dynamodb":{"Keys":{"pk":{"S":"q"}},"SequenceNumber":"16"}}],
            "NextShardIterator":"next"}"#;
        let page = lenient_page(body).unwrap();
        assert_eq!(page.next_iterator.as_deref(), Some("next"));
        let [put, removed] = &page.records[..] else {
            panic!("two records: {:?}", page.records)
        };
        assert_eq!(
            (put.event, put.sequence_number.as_str()),
            (Event::Insert, "15")
        );
        let new = put.new_image.as_ref().unwrap();
        assert_eq!(new["sk"], Attr::N("1".into()));
        assert_eq!(new["b"], Attr::B(Bytes::from_static(b"\xff")));
        assert_eq!(new["v"], Attr::Other);
        assert_eq!(removed.keys["pk"], Attr::S("q".into()));
        // A closed shard read to its end has no next iterator.
        assert!(lenient_page(br#"{"Records":[]}"#)
            .unwrap()
            .next_iterator
            .is_none());
        assert!(lenient_page(b"<html>").is_none());
    }
}
