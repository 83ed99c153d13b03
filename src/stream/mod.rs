//! The DynamoDB Streams tailer: one per table, it reads what other nodes (or anything
//! else) write to the table and hands it, in order, to a [`Sink`] (applying it to the
//! local cache is [`crate::coherence`]'s; publishing it to other hosts is another sink).
//!
//! - [`api`]: the Streams calls, behind a trait (real SDK or a scripted fake).
//! - [`shards`]: the shard graph (lineage, discovery, readiness).
//! - [`change`]: what a record says changed.
//!
//! The loop follows `shared/design/streams.md`: positions are taken (LATEST on open
//! shards) before the daemon serves any read from the cache; each round polls every shard
//! being read, hands the records over in shard order and checkpoints them once the sink
//! has accepted them (a refused page is read again from the same iterator); a closed
//! shard's children are looked up with the child-shard filter, and the whole stream is
//! re-described periodically; an expired iterator resumes after the checkpoint; trimmed
//! records, an unknown sequence number or a replaced stream are reported as lost
//! continuity (the sink flushes the table); throttling and errors back off.
//!
//! Bounded staleness: a round that finds a shard caught up (fewer records than a full
//! page) proves that every record readable when the round began has been handed over,
//! and so, since a record becomes readable at most `streams.propagation_allowance_ms`
//! after its write (an assumption: DynamoDB promises no bound), every write made that
//! long before. The oldest such proof among the shards being read is reported to the
//! sink after every round as the table's freshness.

pub mod api;
pub mod change;
#[cfg(test)]
mod fake;
pub mod shards;
pub mod sink;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::future::join_all;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::StreamsConfig;
use crate::metrics::{Exposition, Kind};
use crate::store::StoreTable;
use api::{ShardInfo, StartAt, StreamError, StreamsApi};
use shards::Shards;
use sink::{Seen, Sink, Tailed};

/// Records per GetRecords call; a page this full means the shard is not caught up.
const FULL_PAGE: usize = 1000;
/// The longest pause after repeated errors.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Why the whole cache was invalidated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushCause {
    /// Records were trimmed (or a sequence number was unknown): some were never seen.
    Trimmed = 0,
    /// The table's stream was replaced.
    StreamReplaced = 1,
    /// An iterator expired before any record was read from its shard's LATEST position.
    IteratorLost = 2,
    /// Fleet mode: a relay started without a usable checkpoint (from LATEST).
    NoCheckpoint = 3,
    /// Fleet mode: an entry was missing (a skipped number, a batch or watermark beyond
    /// what was seen of a shard).
    Gap = 4,
    /// Fleet mode: the connection to Redis was lost, so whatever was published meanwhile
    /// is unknown.
    Reconnected = 5,
    /// Fleet mode: an entry did not decode or failed authentication.
    BadEntry = 6,
    /// A write through the DynamoDB API to a store's table whose items the front could
    /// not make out (PartiQL): not a stream's fault, but as unknown.
    UnreadWrite = 7,
}

impl FlushCause {
    pub const ALL: [FlushCause; 8] = [
        FlushCause::Trimmed,
        FlushCause::StreamReplaced,
        FlushCause::IteratorLost,
        FlushCause::NoCheckpoint,
        FlushCause::Gap,
        FlushCause::Reconnected,
        FlushCause::BadEntry,
        FlushCause::UnreadWrite,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FlushCause::Trimmed => "trimmed",
            FlushCause::StreamReplaced => "stream_replaced",
            FlushCause::IteratorLost => "iterator_lost",
            FlushCause::NoCheckpoint => "no_checkpoint",
            FlushCause::Gap => "gap",
            FlushCause::Reconnected => "reconnected",
            FlushCause::BadEntry => "bad_entry",
            FlushCause::UnreadWrite => "unread_write",
        }
    }

    /// The cause of this name.
    pub fn named(name: &str) -> Option<FlushCause> {
        FlushCause::ALL.into_iter().find(|c| c.name() == name)
    }
}

/// What the tailers count per table: records read, failed calls, shards tracked. A
/// table's slot is [`Tailed::slot`]: the stores' two tables first, then the DynamoDB API
/// front's, in the order of `dynamodb_api.tables`.
pub struct TailStats {
    /// By slot; exported once named.
    tables: Box<[TableCounters]>,
}

struct TableCounters {
    /// The `table` label.
    name: OnceLock<String>,
    records: [AtomicU64; 3],
    errors: AtomicU64,
    shards: AtomicU64,
}

/// A snapshot of the tailers' counters, by slot.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TailSnapshot {
    /// `[table][event]`: insert, modify, remove.
    pub records: Vec<[u64; 3]>,
    /// Failed Streams calls per table.
    pub errors: Vec<u64>,
    /// Shards tracked per table.
    pub shards: Vec<u64>,
}

impl Default for TailStats {
    /// The stores' two tables only.
    fn default() -> TailStats {
        TailStats::new(0)
    }
}

impl TailStats {
    /// Counters for the stores' tables, and room for `api_slots` of the DynamoDB API's
    /// (exported once named: [`Self::name`]).
    pub fn new(api_slots: usize) -> TailStats {
        let mut names = StoreTable::ALL.iter().map(|t| t.name().to_owned());
        TailStats {
            tables: (0..StoreTable::ALL.len() + api_slots)
                .map(|_| TableCounters {
                    name: names.next().map(OnceLock::from).unwrap_or_default(),
                    records: Default::default(),
                    errors: AtomicU64::new(0),
                    shards: AtomicU64::new(0),
                })
                .collect(),
        }
    }

    /// Names a table's counters (once), so that they are exported.
    pub fn name(&self, table: impl Tailed, name: &str) {
        if let Some(t) = self.tables.get(table.slot()) {
            t.name.get_or_init(|| name.to_owned());
        }
    }

    fn of(&self, table: impl Tailed) -> &TableCounters {
        &self.tables[table.slot()]
    }

    /// The named tables' counters.
    fn named(&self) -> impl Iterator<Item = (&str, &TableCounters)> {
        self.tables
            .iter()
            .filter_map(|t| Some((t.name.get()?.as_str(), t)))
    }

    /// Writes the counters into a scrape.
    pub fn export(&self, out: &mut Exposition) {
        let name = "ddbcached_stream_records_total";
        out.family(
            name,
            Kind::Counter,
            "Stream records read and applied, by table and event.",
        );
        for (table, t) in self.named() {
            for (e, event) in ["insert", "modify", "remove"].into_iter().enumerate() {
                let labels = [("table", table), ("event", event)];
                out.sample(name, &labels, t.records[e].load(Ordering::Relaxed));
            }
        }
        let per_table = |value: fn(&TableCounters) -> &AtomicU64| {
            self.named()
                .map(move |(table, t)| (table, value(t).load(Ordering::Relaxed)))
        };
        out.by_label(
            "ddbcached_stream_errors_total",
            Kind::Counter,
            "Failed Streams calls, by table.",
            "table",
            per_table(|t| &t.errors),
        );
        out.by_label(
            "ddbcached_stream_shards",
            Kind::Gauge,
            "Stream shards tracked, by table.",
            "table",
            per_table(|t| &t.shards),
        );
    }

    /// The counters.
    pub fn snapshot(&self) -> TailSnapshot {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TailSnapshot {
            records: self
                .named()
                .map(|(_, t)| t.records.each_ref().map(load))
                .collect(),
            errors: self.named().map(|(_, t)| load(&t.errors)).collect(),
            shards: self.named().map(|(_, t)| load(&t.shards)).collect(),
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
pub struct Tailer<A: StreamsApi, S: Sink> {
    api: Arc<A>,
    table_name: String,
    table: S::Table,
    sink: Arc<S>,
    stats: Arc<TailStats>,
    /// The origin of the shards' caught-up times.
    clock: Instant,
    /// Lost continuity the sink has not accepted yet: until it has, nothing is proven.
    pending_loss: Option<FlushCause>,
    config: StreamsConfig,
    stream_arn: String,
    shards: Shards,
    next_discovery: Instant,
    /// Finished shards whose children have not been listed yet.
    orphaned_parents: BTreeSet<String>,
    backoff: Duration,
}

impl<A: StreamsApi, S: Sink> Tailer<A, S> {
    /// Finds the table's stream and takes positions on its open shards; once this
    /// returns, every write made afterwards will be seen.
    pub async fn start(
        api: Arc<A>,
        table_name: String,
        table: S::Table,
        sink: Arc<S>,
        stats: Arc<TailStats>,
        config: StreamsConfig,
    ) -> Result<Tailer<A, S>, StartError> {
        Self::resume(api, table_name, table, sink, stats, config, None).await
    }

    /// Like [`Tailer::start`], but with `checkpoints`, reads on from where an earlier
    /// reader of the same stream stopped: per shard, after the last record it handed
    /// over (see [`Shards::resumed`]).
    pub async fn resume(
        api: Arc<A>,
        table_name: String,
        table: S::Table,
        sink: Arc<S>,
        stats: Arc<TailStats>,
        config: StreamsConfig,
        checkpoints: Option<&BTreeMap<String, String>>,
    ) -> Result<Tailer<A, S>, StartError> {
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
            shards: match checkpoints {
                Some(c) => Shards::resumed(&listing, c),
                None => Shards::at_start(&listing),
            },
            next_discovery: Instant::now() + config.discovery_interval(),
            stream_arn: arn,
            api,
            table_name: table_name.clone(),
            table,
            sink,
            stats,
            clock: Instant::now(),
            pending_loss: None,
            config,
            orphaned_parents: BTreeSet::new(),
            backoff: Duration::ZERO,
        };
        tailer.take_iterators().await.map_err(fail)?;
        tailer
            .stats
            .of(table)
            .shards
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
        if let Some(cause) = self.pending_loss.take() {
            self.flush(cause).await;
        }
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
        let caught_up = match self.pending_loss {
            Some(_) => None,
            None => self
                .shards
                .caught_up_at()
                .map(|ms| self.clock + Duration::from_millis(ms))
                .and_then(|began| began.checked_sub(self.config.propagation_allowance())),
        };
        if let Err(e) = self
            .sink
            .accept(self.table, Seen::CaughtUp(caught_up))
            .await
        {
            tracing::warn!(table = %self.table_name, error = %e, "the sink refused the freshness proof");
        }
        self.stats
            .of(self.table)
            .shards
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

    /// Polls every shard that has an iterator, at once, then hands what came back to the
    /// sink shard by shard, in order. Returns (a full page was seen, a call failed).
    async fn poll(&mut self) -> (bool, bool) {
        let started = self.clock.elapsed().as_millis() as u64;
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
                    if let Some(last) = page.records.last() {
                        let Some(cursor) = self.shards.cursor(&id) else {
                            continue;
                        };
                        let after = match &cursor.checkpoint {
                            Some(seq) => StartAt::After(seq.clone()),
                            None => cursor.start.clone(),
                        };
                        let seen = Seen::Records {
                            shard: &id,
                            after: &after,
                            records: &page.records,
                        };
                        if let Err(e) = self.sink.accept(self.table, seen).await {
                            // Not checkpointed: the same iterator reads the page again.
                            tracing::warn!(table = %self.table_name, shard = %id, error = %e, "the sink refused records");
                            failed = true;
                            continue;
                        }
                        self.count(&page.records);
                        if let Some(cursor) = self.shards.cursor(&id) {
                            cursor.checkpoint = Some(last.sequence_number.clone());
                        }
                    }
                    busy |= full;
                    let Some(cursor) = self.shards.cursor(&id) else {
                        continue;
                    };
                    if !full {
                        cursor.caught_up_at = Some(started);
                    }
                    match page.next_iterator {
                        Some(next) => cursor.iterator = Some(next),
                        None => {
                            // Closed and read to the end: on to its children, once the
                            // sink knows (until then the last iterator is read again).
                            let seen = Seen::ShardEnded { shard: &id };
                            if let Err(e) = self.sink.accept(self.table, seen).await {
                                tracing::warn!(table = %self.table_name, shard = %id, error = %e, "the sink refused a shard's end");
                                failed = true;
                                continue;
                            }
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

    fn count(&self, records: &[api::Record]) {
        let counts = &self.stats.of(self.table).records;
        for record in records {
            counts[record.event as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Continuity lost: the sink is told (it flushes the table); until it has accepted
    /// that, no freshness is claimed.
    async fn flush(&mut self, cause: FlushCause) {
        tracing::warn!(table = %self.table_name, cause = cause.name(), "stream continuity lost");
        if let Err(e) = self
            .sink
            .accept(self.table, Seen::ContinuityLost(cause))
            .await
        {
            tracing::warn!(table = %self.table_name, error = %e, "the sink refused lost continuity; trying again next round");
            self.pending_loss = Some(cause);
        }
    }

    fn note_error(&self, e: &StreamError) {
        self.stats
            .of(self.table)
            .errors
            .fetch_add(1, Ordering::Relaxed);
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
