//! The DynamoDB Streams tailer: one per table, it applies what other nodes (or anything
//! else) write to the tables to the cache, and tells the read path whether the cache can
//! be trusted right now.
//!
//! - [`api`]: the Streams calls, behind a trait (real SDK or a scripted fake).
//! - [`shards`]: the shard graph (lineage, discovery, readiness).
//! - [`apply`]: a record's meaning for the cache.
//!
//! The loop follows `shared/design/streams.md`: positions are taken (LATEST on open
//! shards) before the daemon serves any read from the cache; each round polls every shard
//! being read, applies records in shard order and checkpoints them; a closed shard's
//! children are looked up with the child-shard filter, and the whole stream is
//! re-described periodically; an expired iterator resumes after the checkpoint; trimmed
//! records, an unknown sequence number or a replaced stream invalidate the whole cache;
//! throttling and errors back off. Invalidations after lost continuity are per table.
//!
//! Bounded staleness: a round that finds a shard caught up (fewer records than a full
//! page) proves that every record written before the round began has been applied. The
//! oldest such proof among the shards being read is the table's freshness; when it is
//! older than `cache.max_staleness_ms`, reads of that table bypass the cache.

pub mod api;
pub mod apply;
#[cfg(test)]
mod fake;
pub mod shards;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cache::Cache;
use crate::config::StreamsConfig;
use api::{ShardInfo, StartAt, StreamError, StreamsApi};
use apply::Change;
use shards::Shards;

/// Records per GetRecords call; a page this full means the shard is not caught up.
const FULL_PAGE: usize = 1000;
/// The longest pause after repeated errors.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Own writes remembered for measuring how long their records take to come back.
const ECHOES_REMEMBERED: usize = 4096;

/// The two tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Table {
    Kv = 0,
    Log = 1,
}

impl Table {
    pub const ALL: [Table; 2] = [Table::Kv, Table::Log];

    pub fn name(self) -> &'static str {
        match self {
            Table::Kv => "kv",
            Table::Log => "log",
        }
    }
}

/// Why the whole cache was invalidated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushCause {
    /// Records were trimmed (or a sequence number was unknown): some were never seen.
    Trimmed = 0,
    /// The table's stream was replaced.
    StreamReplaced = 1,
    /// An iterator expired before any record was read from its shard's LATEST position.
    IteratorLost = 2,
}

impl FlushCause {
    pub const ALL: [FlushCause; 3] = [
        FlushCause::Trimmed,
        FlushCause::StreamReplaced,
        FlushCause::IteratorLost,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FlushCause::Trimmed => "trimmed",
            FlushCause::StreamReplaced => "stream_replaced",
            FlushCause::IteratorLost => "iterator_lost",
        }
    }
}

/// An item this daemon wrote, to recognise its record when it comes back: a key-value
/// version, a log entry, or a topic's counter.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ItemKey {
    Kv(String, bytes::Bytes, i64),
    Log(String, i64),
    Counter(String),
}

/// What the tailers and the read path share: freshness, counters, own writes in flight.
pub struct TailState {
    clock: Instant,
    max_staleness_ms: u64,
    /// Per table: ms (on `clock`) since which every record is applied; `u64::MAX`: never.
    caught_up_ms: [AtomicU64; 2],
    bypassing: [AtomicBool; 2],
    echoes: Mutex<Echoes>,
    /// Where the visibility lag of own writes is recorded.
    lag: metrics::Histogram,
    stats: TailStats,
}

/// Own writes whose records have not come back yet: when each was acknowledged, and a
/// digest of what it wrote.
#[derive(Default)]
struct Echoes {
    written: HashMap<ItemKey, (Instant, u64)>,
    order: VecDeque<ItemKey>,
    /// Keyed per process, so digests cannot be aimed at by whoever writes the tables.
    hasher: std::collections::hash_map::RandomState,
}

#[derive(Default)]
struct TailStats {
    records: [[AtomicU64; 3]; 2],
    invalidations: [AtomicU64; 2],
    flushes: [AtomicU64; 3],
    errors: [AtomicU64; 2],
    bypass_switches: AtomicU64,
    shards: [AtomicU64; 2],
}

/// A snapshot of the tailers' counters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TailSnapshot {
    /// `[table][event]`: insert, modify, remove.
    pub records: [[u64; 3]; 2],
    /// Keys dropped because a record showed news, per table.
    pub invalidations: [u64; 2],
    /// Whole-cache invalidations by [`FlushCause`].
    pub flushes: [u64; 3],
    /// Failed Streams calls per table.
    pub errors: [u64; 2],
    /// Switches between serving from the cache and bypassing it, both ways.
    pub bypass_switches: u64,
    pub bypassing: [bool; 2],
    /// Shards tracked per table.
    pub shards: [u64; 2],
    /// Seconds since each table was last proven caught up (`None`: never).
    pub seconds_since_caught_up: [Option<f64>; 2],
}

impl TailState {
    /// `lag` receives the visibility lag of each own write whose record comes back.
    pub fn new(max_staleness_ms: u64, lag: metrics::Histogram) -> TailState {
        TailState {
            lag,
            clock: Instant::now(),
            max_staleness_ms,
            caught_up_ms: [AtomicU64::new(u64::MAX), AtomicU64::new(u64::MAX)],
            bypassing: [AtomicBool::new(true), AtomicBool::new(true)],
            echoes: Mutex::default(),
            stats: TailStats::default(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    /// Whether reads of `table` must bypass the cache: its tailer has not proven itself
    /// caught up within the staleness bound. Logs and counts each switch.
    pub fn must_bypass(&self, table: Table) -> bool {
        let caught_up = self.caught_up_ms[table as usize].load(Ordering::Acquire);
        let stale = caught_up == u64::MAX
            || self.now_ms().saturating_sub(caught_up) > self.max_staleness_ms;
        let flag = &self.bypassing[table as usize];
        if flag.load(Ordering::Relaxed) != stale && flag.swap(stale, Ordering::Relaxed) != stale {
            self.stats.bypass_switches.fetch_add(1, Ordering::Relaxed);
            if stale {
                tracing::warn!(
                    table = table.name(),
                    max_staleness_ms = self.max_staleness_ms,
                    "stream tailer is behind: reads bypass the cache"
                );
            } else {
                tracing::info!(
                    table = table.name(),
                    "stream tailer caught up: reads use the cache again"
                );
            }
        }
        stale
    }

    /// Remembers an acknowledged write of `written` (a value, or a counter's bytes), to
    /// recognise its record when it comes back and to time it.
    pub fn note_write(&self, item: ItemKey, written: &[u8]) {
        let mut e = self.echoes.lock().expect("echo map poisoned");
        let digest = e.hasher.hash_one(written);
        if e.written
            .insert(item.clone(), (Instant::now(), digest))
            .is_none()
        {
            e.order.push_back(item);
        }
        while e.order.len() > ECHOES_REMEMBERED {
            if let Some(old) = e.order.pop_front() {
                e.written.remove(&old);
            }
        }
    }

    /// Forgets a write that failed: no record of it will come.
    pub fn forget_write(&self, item: &ItemKey) {
        self.echoes
            .lock()
            .expect("echo map poisoned")
            .written
            .remove(item);
    }

    /// Whether a record of `item` now holding `content` is the echo of one of this
    /// daemon's writes (then it times its return). Only the exact content counts: a
    /// record of the same item with other content is someone else's write.
    fn is_echo(&self, item: &ItemKey, content: &[u8]) -> bool {
        let mut e = self.echoes.lock().expect("echo map poisoned");
        let digest = e.hasher.hash_one(content);
        match e.written.get(item) {
            Some((at, d)) if *d == digest => {
                self.lag.record(at.elapsed().as_secs_f64());
                e.written.remove(item);
                true
            }
            _ => false,
        }
    }

    fn set_caught_up(&self, table: Table, at: Option<u64>) {
        self.caught_up_ms[table as usize].store(at.unwrap_or(u64::MAX), Ordering::Release);
    }

    /// The counters.
    pub fn snapshot(&self) -> TailSnapshot {
        let s = &self.stats;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let now = self.now_ms();
        TailSnapshot {
            records: [0, 1].map(|t| [0, 1, 2].map(|e| load(&s.records[t][e]))),
            invalidations: [0, 1].map(|t| load(&s.invalidations[t])),
            flushes: [0, 1, 2].map(|c| load(&s.flushes[c])),
            errors: [0, 1].map(|t| load(&s.errors[t])),
            bypass_switches: load(&s.bypass_switches),
            bypassing: [0, 1].map(|t| self.bypassing[t].load(Ordering::Relaxed)),
            shards: [0, 1].map(|t| load(&s.shards[t])),
            seconds_since_caught_up: [0, 1].map(|t| match load(&self.caught_up_ms[t]) {
                u64::MAX => None,
                at => Some(now.saturating_sub(at) as f64 / 1000.0),
            }),
        }
    }
}

/// Why a tailer could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("table {0} has no stream; enable one with NEW_AND_OLD_IMAGES (`ddbcached init-tables` creates tables with it)")]
    NoStream(String),
    #[error("cannot read the stream of table {table}: {source}")]
    Api {
        table: String,
        #[source]
        source: StreamError,
    },
}

/// The tailer of one table's stream.
pub struct Tailer<A: StreamsApi> {
    api: Arc<A>,
    table_name: String,
    table: Table,
    cache: Arc<Cache>,
    state: Arc<TailState>,
    config: StreamsConfig,
    stream_arn: String,
    shards: Shards,
    next_discovery: Instant,
    /// Finished shards whose children have not been listed yet.
    orphaned_parents: BTreeSet<String>,
    backoff: Duration,
}

impl<A: StreamsApi> Tailer<A> {
    /// Finds the table's stream and takes positions on its open shards; once this
    /// returns, every write made afterwards will be seen.
    pub async fn start(
        api: Arc<A>,
        table_name: String,
        table: Table,
        cache: Arc<Cache>,
        state: Arc<TailState>,
        config: StreamsConfig,
    ) -> Result<Tailer<A>, StartError> {
        let fail = |source| StartError::Api {
            table: table_name.clone(),
            source,
        };
        let arn = api
            .latest_stream_arn(&table_name)
            .await
            .map_err(fail)?
            .ok_or_else(|| StartError::NoStream(table_name.clone()))?;
        let listing = list_all(&*api, &arn).await.map_err(fail)?;
        let mut tailer = Tailer {
            shards: Shards::at_start(&listing),
            next_discovery: Instant::now() + config.discovery_interval(),
            stream_arn: arn,
            api,
            table_name: table_name.clone(),
            table,
            cache,
            state,
            config,
            orphaned_parents: BTreeSet::new(),
            backoff: Duration::ZERO,
        };
        tailer.take_iterators().await.map_err(fail)?;
        tailer.state.stats.shards[table as usize]
            .store(tailer.shards.tracked() as u64, Ordering::Relaxed);
        tracing::info!(table = %table_name, shards = tailer.shards.tracked(), "stream tailer positioned");
        Ok(tailer)
    }

    /// Polls until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let busy = self.round().await;
            let pause = if busy {
                Duration::ZERO
            } else {
                self.config.poll_interval().max(self.backoff)
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// One round: discovery when due, then a poll of every shard being read. Returns
    /// whether a shard had more records than one call returns (poll again at once).
    pub async fn round(&mut self) -> bool {
        let mut failed = false;
        if Instant::now() >= self.next_discovery {
            failed |= self.discover().await.is_err();
        }
        failed |= self.find_children().await.is_err();
        failed |= self.take_iterators().await.is_err();
        let (busy, poll_failed) = self.poll().await;
        failed |= poll_failed;
        self.backoff = if failed {
            (self.backoff * 2)
                .max(self.config.poll_interval())
                .min(MAX_BACKOFF)
        } else {
            Duration::ZERO
        };
        self.state
            .set_caught_up(self.table, self.shards.caught_up_at());
        self.state.stats.shards[self.table as usize]
            .store(self.shards.tracked() as u64, Ordering::Relaxed);
        busy
    }

    /// Re-reads the table's stream ARN and the full shard listing.
    async fn discover(&mut self) -> Result<(), StreamError> {
        self.next_discovery = Instant::now() + self.config.discovery_interval();
        let arn = self.call(self.api.latest_stream_arn(&self.table_name).await)?;
        match arn {
            Some(arn) if arn == self.stream_arn => {
                let listing = self.call(list_all(&*self.api, &self.stream_arn).await)?;
                let added = self.shards.merge(&listing, true);
                if added > 0 {
                    tracing::debug!(table = %self.table_name, added, "new shards");
                }
                Ok(())
            }
            Some(arn) => {
                tracing::warn!(table = %self.table_name, old = %self.stream_arn, new = %arn, "the table's stream was replaced");
                let listing = self.call(list_all(&*self.api, &arn).await)?;
                self.stream_arn = arn;
                self.shards = Shards::at_start(&listing);
                self.orphaned_parents.clear();
                self.take_iterators().await?;
                // Positions on the new stream are taken; whatever happened between the
                // two streams is unknown.
                self.flush(FlushCause::StreamReplaced).await;
                Ok(())
            }
            None => {
                tracing::error!(table = %self.table_name, "the table has no stream any more: reads bypass the cache");
                self.shards = Shards::default();
                Err(StreamError::NotFound("stream disabled".into()))
            }
        }
    }

    /// Lists the children of shards finished since they were last looked for.
    async fn find_children(&mut self) -> Result<(), StreamError> {
        let parents: Vec<String> = self.orphaned_parents.iter().cloned().collect();
        for parent in parents {
            let page = self.call(
                self.api
                    .describe(&self.stream_arn, None, Some(&parent))
                    .await,
            )?;
            self.shards.merge(&page.shards, false);
            if self.shards.has_children(&parent) {
                self.orphaned_parents.remove(&parent);
            }
        }
        Ok(())
    }

    /// Takes an iterator for every shard being read that has none.
    async fn take_iterators(&mut self) -> Result<(), StreamError> {
        let missing: Vec<(String, StartAt)> = self
            .shards
            .reading()
            .filter(|(_, c)| c.iterator.is_none())
            .map(|(id, c)| (id.clone(), c.start.clone()))
            .collect();
        for (id, start) in missing {
            let result = self.api.iterator(&self.stream_arn, &id, &start).await;
            match result {
                Ok(iterator) => {
                    if let Some(c) = self.shards.cursor(&id) {
                        c.iterator = Some(iterator);
                    }
                }
                Err(StreamError::Trimmed(why)) => {
                    tracing::warn!(table = %self.table_name, shard = %id, %why, "resume point trimmed");
                    self.restart_from_horizon(&id).await;
                }
                Err(e) => {
                    self.note_error(&e);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Polls every shard that has an iterator, at once, then applies what came back
    /// shard by shard, in order. Returns (a full page was seen, a call failed).
    async fn poll(&mut self) -> (bool, bool) {
        let started = self.state.now_ms();
        let polls: Vec<(String, String)> = self
            .shards
            .reading()
            .filter_map(|(id, c)| Some((id.clone(), c.iterator.clone()?)))
            .collect();
        let api = &*self.api;
        let pages = join_all(polls.iter().map(|(_, it)| api.records(it))).await;
        let (mut busy, mut failed) = (false, false);
        for ((id, _), page) in polls.into_iter().zip(pages) {
            match page {
                Ok(page) => {
                    let full = page.records.len() >= FULL_PAGE;
                    busy |= full;
                    let mut checkpoint = None;
                    for record in &page.records {
                        self.apply(record).await;
                        checkpoint = Some(record.sequence_number.clone());
                    }
                    let Some(cursor) = self.shards.cursor(&id) else {
                        continue;
                    };
                    if checkpoint.is_some() {
                        cursor.checkpoint = checkpoint;
                    }
                    if !full {
                        cursor.caught_up_at = Some(started);
                    }
                    match page.next_iterator {
                        Some(next) => cursor.iterator = Some(next),
                        None => {
                            // Closed and read to the end: on to its children.
                            self.shards.finish(&id);
                            if !self.shards.has_children(&id) {
                                self.orphaned_parents.insert(id);
                            }
                        }
                    }
                }
                Err(e) => {
                    failed = true;
                    self.note_error(&e);
                    self.recover(&id, e).await;
                }
            }
        }
        (busy, failed)
    }

    /// What to do after a failed GetRecords on shard `id` (streams.md's table).
    async fn recover(&mut self, id: &str, e: StreamError) {
        match e {
            StreamError::ExpiredIterator => {
                let Some(c) = self.shards.cursor(id) else {
                    return;
                };
                c.iterator = None;
                match (c.checkpoint.clone(), &c.start) {
                    (Some(seq), _) => c.start = StartAt::After(seq),
                    (None, StartAt::TrimHorizon) => {}
                    (None, _) => {
                        // The position was LATEST at some moment now forgotten.
                        c.start = StartAt::Latest;
                        self.flush(FlushCause::IteratorLost).await;
                    }
                }
            }
            StreamError::Trimmed(why) => {
                tracing::warn!(table = %self.table_name, shard = %id, %why, "stream records lost");
                self.restart_from_horizon(id).await;
            }
            StreamError::NotFound(_) => {
                if let Some(c) = self.shards.cursor(id) {
                    c.iterator = None;
                }
                // The shard or the stream is gone: look again now.
                self.next_discovery = Instant::now();
            }
            StreamError::Throttled(_) | StreamError::Transient(_) => {}
        }
    }

    async fn restart_from_horizon(&mut self, id: &str) {
        if let Some(c) = self.shards.cursor(id) {
            *c = shards::ShardCursor {
                start: StartAt::TrimHorizon,
                iterator: None,
                checkpoint: None,
                caught_up_at: None,
            };
        }
        self.flush(FlushCause::Trimmed).await;
    }

    async fn apply(&self, record: &api::Record) {
        let t = self.table as usize;
        let event = record.event as usize;
        self.state.stats.records[t][event].fetch_add(1, Ordering::Relaxed);
        let Some(change) = Change::of(self.table, record) else {
            return;
        };
        // The echo of this daemon's own write: the cache holds it, or is about to (the
        // record may overtake the update that follows DynamoDB's acknowledgement), so
        // there is nothing to do, and above all nothing to evict.
        let echo = match &change {
            Change::KvVersion {
                ns,
                key,
                ts,
                value: Some(v),
            } => self
                .state
                .is_echo(&ItemKey::Kv(ns.clone(), key.clone(), *ts), v),
            Change::LogEntry {
                topic,
                index,
                value: Some(v),
            } => self.state.is_echo(&ItemKey::Log(topic.clone(), *index), v),
            Change::LogCounter {
                topic,
                position: Some(p),
            } => self
                .state
                .is_echo(&ItemKey::Counter(topic.clone()), &p.to_be_bytes()),
            _ => false,
        };
        if echo {
            return;
        }
        if change.apply(&self.cache).await {
            self.state.stats.invalidations[t].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Continuity lost: forgets everything cached from this table (the other table's
    /// stream is unaffected).
    async fn flush(&self, cause: FlushCause) {
        tracing::warn!(table = %self.table_name, cause = cause.name(), "stream continuity lost: invalidating the table's cache");
        self.state.stats.flushes[cause as usize].fetch_add(1, Ordering::Relaxed);
        match self.table {
            Table::Kv => self.cache.invalidate_keys().await,
            Table::Log => self.cache.invalidate_topics().await,
        }
    }

    fn note_error(&self, e: &StreamError) {
        self.state.stats.errors[self.table as usize].fetch_add(1, Ordering::Relaxed);
        tracing::debug!(table = %self.table_name, error = %e, "stream call failed");
    }

    /// Counts a failed discovery call and passes the result on.
    fn call<T>(&self, result: Result<T, StreamError>) -> Result<T, StreamError> {
        if let Err(e) = &result {
            self.note_error(e);
        }
        result
    }
}

/// Every shard of the stream, following `LastEvaluatedShardId` page by page.
async fn list_all<A: StreamsApi>(api: &A, arn: &str) -> Result<Vec<ShardInfo>, StreamError> {
    let mut all = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = api.describe(arn, after.as_deref(), None).await?;
        all.extend(page.shards);
        match page.last_evaluated {
            Some(last) => after = Some(last),
            None => return Ok(all),
        }
    }
}
