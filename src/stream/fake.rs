//! A scripted DynamoDB Streams for the tailer's tests: shards that close, split, appear
//! late or lose their parent, listings longer than a page, and injected errors.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;

use crate::store::keys::{kv_partition_key, KV_KEY, KV_TIMESTAMP, KV_VALUE};
use crate::stream::api::{
    Attr, Event, Image, Record, RecordsPage, ShardInfo, ShardPage, StartAt, StreamError, StreamsApi,
};

/// Shards per DescribeStream page, as DynamoDB.
const PAGE: usize = 100;
const RECORDS_PER_CALL: usize = 1000;

#[derive(Default)]
struct Shard {
    id: String,
    parent: Option<String>,
    closed: bool,
    records: Vec<Record>,
    /// Records before this index are trimmed.
    horizon: usize,
    /// Listed only once this many DescribeStream calls have been made.
    listed_from_describe: usize,
}

#[derive(Default)]
struct State {
    arn: Option<String>,
    shards: Vec<Shard>,
    next_seq: u64,
    describes: usize,
    /// Errors the next GetRecords calls on a shard return, in order.
    errors: HashMap<String, VecDeque<StreamError>>,
    /// Every call, for checking the order of reads.
    calls: Vec<String>,
}

/// The fake.
#[derive(Default)]
pub struct FakeStreams {
    state: Mutex<State>,
}

impl FakeStreams {
    pub fn new(arn: &str) -> FakeStreams {
        let fake = FakeStreams::default();
        fake.state().arn = Some(arn.into());
        fake
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Adds an open shard, listed from the start.
    pub fn add_shard(&self, id: &str, parent: Option<&str>) {
        self.add_shard_listed_after(id, parent, 0);
    }

    /// Adds an open shard that DescribeStream lists only after `describes` more calls.
    pub fn add_shard_listed_after(&self, id: &str, parent: Option<&str>, describes: usize) {
        let mut s = self.state();
        let listed_from_describe = s.describes + describes;
        s.shards.push(Shard {
            id: id.into(),
            parent: parent.map(Into::into),
            listed_from_describe,
            ..Shard::default()
        });
    }

    pub fn close(&self, id: &str) {
        self.state()
            .shards
            .iter_mut()
            .find(|s| s.id == id)
            .unwrap()
            .closed = true;
    }

    /// Appends a key-value put of `value` at `ts` to a shard.
    pub fn put(&self, shard: &str, ns: &str, key: &[u8], ts: i64, value: &[u8]) {
        let pk = Bytes::from(kv_partition_key(ns, key).unwrap());
        let keys = Image::from([
            (KV_KEY.to_owned(), Attr::B(pk)),
            (KV_TIMESTAMP.to_owned(), Attr::N(ts.to_string())),
        ]);
        let mut image = keys.clone();
        image.insert(KV_VALUE.to_owned(), Attr::B(Bytes::copy_from_slice(value)));
        let mut s = self.state();
        s.next_seq += 1;
        let sequence_number = format!("{:021}", s.next_seq);
        s.shards
            .iter_mut()
            .find(|x| x.id == shard)
            .unwrap()
            .records
            .push(Record {
                sequence_number,
                event: Event::Insert,
                keys,
                new_image: Some(image),
                old_image: None,
            });
    }

    /// Drops a shard's records older than the last `keep`.
    pub fn trim(&self, shard: &str, keep: usize) {
        let mut s = self.state();
        let sh = s.shards.iter_mut().find(|x| x.id == shard).unwrap();
        sh.horizon = sh.records.len().saturating_sub(keep);
    }

    /// Makes the next GetRecords calls on `shard` fail with these errors.
    pub fn fail_next(&self, shard: &str, errors: impl IntoIterator<Item = StreamError>) {
        self.state()
            .errors
            .entry(shard.into())
            .or_default()
            .extend(errors);
    }

    /// Replaces the table's stream by a new one with a fresh open shard.
    pub fn replace_stream(&self, arn: &str, shard: &str) {
        let mut s = self.state();
        s.arn = Some(arn.into());
        s.shards = vec![Shard {
            id: shard.into(),
            ..Shard::default()
        }];
    }

    /// Whether a call was made (e.g. `iterator a TrimHorizon`).
    pub fn state_calls_contain(&self, call: &str) -> bool {
        self.state().calls.iter().any(|c| c == call)
    }

    /// The GetRecords calls made so far, as shard ids.
    pub fn reads(&self) -> Vec<String> {
        self.state()
            .calls
            .iter()
            .filter_map(|c| c.strip_prefix("records ").map(str::to_owned))
            .collect()
    }

    fn check_arn(s: &State, arn: &str) -> Result<(), StreamError> {
        if s.arn.as_deref() == Some(arn) {
            Ok(())
        } else {
            Err(StreamError::NotFound(format!("stream {arn}")))
        }
    }
}

impl StreamsApi for FakeStreams {
    async fn latest_stream_arn(&self, _table: &str) -> Result<Option<String>, StreamError> {
        Ok(self.state().arn.clone())
    }

    async fn describe(
        &self,
        stream_arn: &str,
        start_after: Option<&str>,
        children_of: Option<&str>,
    ) -> Result<ShardPage, StreamError> {
        let mut s = self.state();
        Self::check_arn(&s, stream_arn)?;
        s.describes += 1;
        let describes = s.describes;
        let listed = s
            .shards
            .iter()
            .filter(|sh| sh.listed_from_describe < describes);
        let info = |sh: &Shard| ShardInfo {
            id: sh.id.clone(),
            parent: sh.parent.clone(),
            closed: sh.closed,
        };
        if let Some(parent) = children_of {
            let shards = listed
                .filter(|sh| sh.parent.as_deref() == Some(parent))
                .map(info)
                .collect();
            return Ok(ShardPage {
                shards,
                last_evaluated: None,
            });
        }
        let all: Vec<ShardInfo> = listed.map(info).collect();
        let from = match start_after {
            Some(id) => all
                .iter()
                .position(|sh| sh.id == id)
                .map_or(all.len(), |i| i + 1),
            None => 0,
        };
        let page: Vec<ShardInfo> = all[from..].iter().take(PAGE).cloned().collect();
        let last_evaluated = (from + PAGE < all.len()).then(|| page.last().unwrap().id.clone());
        Ok(ShardPage {
            shards: page,
            last_evaluated,
        })
    }

    async fn iterator(
        &self,
        stream_arn: &str,
        shard: &str,
        at: &StartAt,
    ) -> Result<String, StreamError> {
        let mut s = self.state();
        Self::check_arn(&s, stream_arn)?;
        s.calls.push(format!("iterator {shard} {at:?}"));
        let sh = s
            .shards
            .iter()
            .find(|x| x.id == shard)
            .ok_or_else(|| StreamError::NotFound(shard.into()))?;
        let pos = match at {
            StartAt::TrimHorizon => sh.horizon,
            StartAt::Latest => sh.records.len(),
            StartAt::After(seq) => {
                let i = sh
                    .records
                    .iter()
                    .position(|r| &r.sequence_number == seq)
                    .ok_or_else(|| StreamError::Trimmed(format!("Invalid SequenceNumber {seq}")))?;
                if i < sh.horizon {
                    return Err(StreamError::Trimmed(seq.clone()));
                }
                i + 1
            }
        };
        Ok(format!("{stream_arn}|{shard}|{pos}"))
    }

    async fn records(&self, iterator: &str) -> Result<RecordsPage, StreamError> {
        let mut parts = iterator.split('|');
        let (arn, shard, pos) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        let pos: usize = pos.parse().unwrap();
        let mut s = self.state();
        s.calls.push(format!("records {shard}"));
        if let Some(e) = s.errors.get_mut(shard).and_then(VecDeque::pop_front) {
            return Err(e);
        }
        Self::check_arn(&s, arn)?;
        let sh = s
            .shards
            .iter()
            .find(|x| x.id == shard)
            .ok_or_else(|| StreamError::NotFound(shard.into()))?;
        if pos < sh.horizon {
            return Err(StreamError::Trimmed(format!("{shard} at {pos}")));
        }
        let end = (pos + RECORDS_PER_CALL).min(sh.records.len());
        let records = sh.records[pos..end].to_vec();
        let next_iterator =
            (!sh.closed || end < sh.records.len()).then(|| format!("{arn}|{shard}|{end}"));
        Ok(RecordsPage {
            records,
            next_iterator,
        })
    }
}
