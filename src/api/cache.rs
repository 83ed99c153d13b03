//! What the DynamoDB API front keeps in memory: items (GetItem, BatchGetItem) and query
//! results of the cached tables, and the rules that keep them coherent with DynamoDB,
//! whoever changes it (writes through the front, the table's stream).
//!
//! - **Stamps, not scans.** Every change is a tick of one clock, recorded against the
//!   scopes it touches: the item, its partition and, for a global index, the index
//!   partitions it left and entered. An entry carries the tick taken before its fill
//!   was sent, and is served only while it is newer than its scope's last change, its
//!   table's last flush and, for a global index, the last write through the front. So
//!   a change drops every query of a partition in O(1), and a fill that raced a change
//!   (its read may predate it) is never served.
//! - **Bounded memory.** Scopes hash into a fixed array of ticks: two scopes that share
//!   a slot only cost each other misses, never staleness, and nothing grows with the
//!   number of keys. The entries are a moka cache bounded by their bytes.
//! - **Fills read the base table consistently**; a global index cannot be read that
//!   way, so its results may be behind already and expire after the staleness bound.
//! - **Freshness**: the tailer proves from time to time that every change before an
//!   instant has been applied; reads of a table bypass the cache while that proof is
//!   older than `cache.max_staleness_ms`, and lost continuity flushes the table.
//! - **Descriptions follow the table.** A table whose stream was replaced may have been
//!   deleted and re-created with other keys and indexes, and one whose unlisted index
//!   DynamoDB answered a query of has gained an index: its reads bypass the cache until
//!   it is described again (by the daemon's describer); the new description
//!   flushes the table, and a fill begun under the old one is not kept.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::keys;
use super::tables::{ApiTable, TableId};
use crate::cache::CacheKey;
use crate::freshness::Freshness;
use crate::metrics::{Exposition, Kind};
use crate::stream::api::Record;
use crate::stream::sink::{Seen, Sink, SinkError};
use crate::stream::FlushCause;

/// Slots of change ticks (8 MiB): enough that unrelated scopes rarely share one.
const STAMP_SLOTS: usize = 1 << 20;

/// The reads the front answers from memory, as their counters are labelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Read {
    GetItem = 0,
    BatchGetItem = 1,
    Query = 2,
}

impl Read {
    const ALL: [Read; 3] = [Read::GetItem, Read::BatchGetItem, Read::Query];

    fn name(self) -> &'static str {
        match self {
            Read::GetItem => "GetItem",
            Read::BatchGetItem => "BatchGetItem",
            Read::Query => "Query",
        }
    }
}

/// How a read was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// From memory.
    Hit = 0,
    /// From DynamoDB, and kept.
    Miss = 1,
    /// From DynamoDB, the cache not used: freshness not proven, or a read the cache
    /// does not answer (consistent, or of a shape it does not keep).
    Bypass = 2,
}

impl Served {
    const ALL: [Served; 3] = [Served::Hit, Served::Miss, Served::Bypass];

    fn name(self) -> &'static str {
        match self {
            Served::Hit => "hit",
            Served::Miss => "miss",
            Served::Bypass => "bypass",
        }
    }
}

/// Where an entry lives: its table, what kind it is and the request that filled it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EntryKey(Box<[u8]>);

impl EntryKey {
    /// An item's entry, for one projection: `key` from [`keys::of_json`], `projection`
    /// the canonical text of what the request asks to see of it.
    pub fn item(table: TableId, key: &[u8], projection: &[u8]) -> EntryKey {
        Self::of(table, b'I', &[key, projection])
    }

    /// A query's entry: `request` is the canonical text of the whole request.
    pub fn query(table: TableId, request: &[u8]) -> EntryKey {
        Self::of(table, b'Q', &[request])
    }

    fn of(table: TableId, kind: u8, parts: &[&[u8]]) -> EntryKey {
        let mut k = Vec::with_capacity(3 + parts.iter().map(|p| p.len() + 4).sum::<usize>());
        k.extend_from_slice(&table.0.to_be_bytes());
        k.push(kind);
        for p in parts {
            k.extend_from_slice(&(p.len() as u32).to_be_bytes());
            k.extend_from_slice(p);
        }
        EntryKey(k.into_boxed_slice())
    }
}

/// What a change touches, to find its slot of ticks.
#[derive(Clone, Copy, Debug)]
pub enum Scope<'a> {
    /// One item, by its canonical key.
    Item(&'a [u8]),
    /// One partition of the table (`index` empty: the table and its local indexes) or
    /// of a global index, by its canonical partition key: the queries of it.
    Partition { index: &'a str, key: &'a [u8] },
    /// Every item of a partition of the table, for a write that does not say which
    /// items it changed (the socket protocol's deletes of every version of a key).
    Items(&'a [u8]),
}

/// What a cached entry holds, and so which changes drop it.
#[derive(Clone, Copy, Debug)]
pub enum Of<'a> {
    /// An item: `key` canonical, `partition` its partition key's canonical bytes.
    Item { key: &'a [u8], partition: &'a [u8] },
    /// A query's result: of a partition of the table or of a global index.
    Query { index: &'a str, partition: &'a [u8] },
}

/// A cached answer.
pub struct Entry {
    /// The tick taken before the fill was sent.
    stamp: u64,
    table: TableId,
    /// The slots of the scopes whose changes drop it.
    slots: [usize; 2],
    /// A global index's result: dropped by any write through the front too, and
    /// expiring after the staleness bound.
    expires: Option<Instant>,
    /// The answer's JSON without `ConsumedCapacity`: an item (empty: no such item), or
    /// a query's whole answer.
    pub body: Bytes,
    /// Read capacity units the client's own read would have cost DynamoDB.
    pub units: f64,
}

/// A tick taken before a fill of a table is sent.
#[derive(Clone, Copy, Debug)]
pub struct Ticket {
    stamp: u64,
    table: TableId,
}

/// Per cached table.
struct TableState {
    flushed: AtomicU64,
    written_through: AtomicU64,
    reads: [[AtomicU64; Served::ALL.len()]; Read::ALL.len()],
    /// Read units saved, in thousandths.
    saved_milli: AtomicU64,
    invalidations: AtomicU64,
    flushes: AtomicU64,
    /// Descriptions asked for so far: one per replacement of the table's stream, one
    /// per index found that its description lacks.
    asked: AtomicU64,
    /// The current description's [`ApiTable::generation`]: the descriptions asked for
    /// that it accounts for. Below `asked`, the table waits to be described again.
    generation: AtomicU64,
    /// When a found index last asked for a description, in ms since the cache began
    /// (0: never).
    index_asked_ms: AtomicU64,
}

/// How often a table may be described again because a query named an index its
/// description lacks: every description flushes the table.
const INDEX_RECHECK: Duration = Duration::from_secs(60);

/// The most tables one daemon caches: under `["*"]`, tables found after start are added
/// up to it (every table has its counters and labels, which must not grow without
/// bound), and a table past it passes through.
pub const MAX_TABLES: usize = 256;

/// The front's cache of the tables in `dynamodb_api.tables`.
pub struct ApiCache {
    /// By [`TableId`]; the first `count` are set, and each is replaced only by a
    /// description read again ([`ApiCache::described_again`]).
    tables: Box<[RwLock<Option<Arc<ApiTable>>>]>,
    count: AtomicUsize,
    by_name: RwLock<HashMap<String, TableId>>,
    /// Woken when a table is to be described again, for whoever describes it.
    asked: Notify,
    /// The origin of `index_asked_ms`.
    began: Instant,
    /// By [`TableId`], as many as `tables`.
    state: Box<[TableState]>,
    clock: AtomicU64,
    stamps: Box<[AtomicU64]>,
    hasher: RandomState,
    entries: moka::sync::Cache<EntryKey, Arc<Entry>>,
    /// Per table, by [`TableId`].
    freshness: Freshness,
}

impl ApiCache {
    /// A cache of `tables`, in order (each takes the next id), with room for more up to
    /// [`MAX_TABLES`].
    pub fn new(tables: Vec<ApiTable>, max_staleness_ms: u64, max_bytes: u64) -> ApiCache {
        let capacity = MAX_TABLES.max(tables.len());
        let cache = ApiCache {
            tables: (0..capacity).map(|_| RwLock::default()).collect(),
            count: AtomicUsize::new(0),
            by_name: RwLock::default(),
            asked: Notify::new(),
            began: Instant::now(),
            state: (0..capacity)
                .map(|_| TableState {
                    flushed: AtomicU64::new(0),
                    written_through: AtomicU64::new(0),
                    reads: Default::default(),
                    saved_milli: AtomicU64::new(0),
                    invalidations: AtomicU64::new(0),
                    flushes: AtomicU64::new(0),
                    asked: AtomicU64::new(0),
                    generation: AtomicU64::new(0),
                    index_asked_ms: AtomicU64::new(0),
                })
                .collect(),
            clock: AtomicU64::new(1),
            stamps: (0..STAMP_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            hasher: RandomState::new(),
            entries: moka::sync::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|k: &EntryKey, e: &Arc<Entry>| {
                    (k.0.len() + e.body.len() + 96)
                        .try_into()
                        .unwrap_or(u32::MAX)
                })
                .build(),
            freshness: Freshness::new(capacity, max_staleness_ms),
        };
        for table in tables {
            cache.add(table);
        }
        cache
    }

    /// Adds a table found after start, as the next id (whatever `table.id` says); its
    /// reads bypass the cache until its tailer proves it fresh. The id it has if it is
    /// cached already; `None` when [`MAX_TABLES`] are.
    pub fn add(&self, mut table: ApiTable) -> Option<TableId> {
        let mut by_name = self.by_name.write().expect("tables lock poisoned");
        if let Some(id) = by_name.get(&table.name) {
            return Some(*id);
        }
        let next = self.count.load(Ordering::Relaxed);
        let slot = self.tables.get(next)?;
        let id = TableId(next as u16);
        table.id = id;
        table.generation = 0;
        by_name.insert(table.name.clone(), id);
        *slot.write().expect("tables lock poisoned") = Some(Arc::new(table));
        self.count.store(next + 1, Ordering::Release);
        Some(id)
    }

    /// A cached table, by name.
    pub fn table(&self, name: &str) -> Option<Arc<ApiTable>> {
        let id = *self
            .by_name
            .read()
            .expect("tables lock poisoned")
            .get(name)?;
        Some(self.of(id))
    }

    /// The cached tables, by id.
    pub fn tables(&self) -> Vec<Arc<ApiTable>> {
        let count = self.count.load(Ordering::Acquire);
        (0..count).map(|i| self.of(TableId(i as u16))).collect()
    }

    /// A cached table, by id (one this cache gave out).
    fn of(&self, id: TableId) -> Arc<ApiTable> {
        self.tables[id.0 as usize]
            .read()
            .expect("tables lock poisoned")
            .clone()
            .expect("an id this cache gave out")
    }

    /// The tables to be described again: their ids, names and the generation a
    /// description read now would have.
    pub fn undescribed(&self) -> Vec<(TableId, String, u64)> {
        self.tables()
            .into_iter()
            .filter_map(|t| {
                let asked = self.state[t.id.0 as usize].asked.load(Ordering::SeqCst);
                (asked > t.generation).then(|| (t.id, t.name.clone(), asked))
            })
            .collect()
    }

    /// Returns once a table is to be described again since the last call (at once if
    /// one was since).
    pub async fn descriptions_asked(&self) {
        self.asked.notified().await;
    }

    /// Has `table` described again; its reads bypass the cache until it is.
    fn ask_description(&self, table: TableId) {
        self.state[table.0 as usize]
            .asked
            .fetch_add(1, Ordering::SeqCst);
        self.asked.notify_one();
    }

    /// DynamoDB answered a query of an index of `table` that its description does not
    /// list: one was added since (UpdateTable), and the table is described again, at
    /// most once per [`INDEX_RECHECK`].
    pub fn index_found(&self, table: TableId) {
        let now = self.began.elapsed().as_millis() as u64 + 1;
        let last = &self.state[table.0 as usize].index_asked_ms;
        let before = last.load(Ordering::Relaxed);
        let due = before == 0 || now.saturating_sub(before) >= INDEX_RECHECK.as_millis() as u64;
        if due
            && last
                .compare_exchange(before, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.ask_description(table);
        }
    }

    /// Installs `table`, read once `generation` descriptions had been asked for, in
    /// place of its former description: everything cached of it goes, and a fill begun
    /// under the former description is not kept ([`ApiCache::ticket`]).
    pub fn described_again(&self, mut table: ApiTable, generation: u64) {
        let id = table.id;
        let s = &self.state[id.0 as usize];
        table.generation = generation;
        *self.tables[id.0 as usize]
            .write()
            .expect("tables lock poisoned") = Some(Arc::new(table));
        s.generation.fetch_max(generation, Ordering::SeqCst);
        // After the new generation is visible: a ticket newer than this flush sees it.
        self.flush(id);
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The slot of a scope's ticks.
    fn slot(&self, table: TableId, scope: Scope<'_>) -> usize {
        let mut h = self.hasher.build_hasher();
        table.0.hash(&mut h);
        match scope {
            Scope::Item(key) => (0u8, key).hash(&mut h),
            Scope::Partition { index, key } => (1u8, index, key).hash(&mut h),
            Scope::Items(key) => (2u8, key).hash(&mut h),
        }
        h.finish() as usize & (STAMP_SLOTS - 1)
    }

    /// Taken before a fill is sent: an entry filled after it is dropped by any change
    /// recorded from now on. Under a description replaced since `table` was read, the
    /// fill is never kept: its entry was keyed by the former keys.
    pub fn ticket(&self, table: &ApiTable) -> Ticket {
        // Ticked first: if the description was replaced before the flush that came
        // with it, this sees the replacement or its stamp predates the flush.
        let stamp = self.tick();
        Ticket {
            // Older than every flush, change and tick: never valid.
            stamp: if self.is_current(table) { stamp } else { 0 },
            table: table.id,
        }
    }

    /// Whether `table` is the table's current description.
    pub fn is_current(&self, table: &ApiTable) -> bool {
        table.generation
            == self.state[table.id.0 as usize]
                .generation
                .load(Ordering::SeqCst)
    }

    /// Records a change of `scope`: every entry of it filled before now is dropped.
    pub fn changed(&self, table: TableId, scope: Scope<'_>) {
        let slot = self.slot(table, scope);
        let now = self.tick();
        self.stamps[slot].fetch_max(now, Ordering::SeqCst);
    }

    /// Records a write through the front to `table`: its global indexes' results are
    /// dropped (the write's old and new index keys are not known from the request).
    pub fn written_through(&self, table: TableId) {
        let now = self.tick();
        self.state[table.0 as usize]
            .written_through
            .fetch_max(now, Ordering::SeqCst);
    }

    /// Records a write to a partition of `table` through the socket protocol (whose
    /// stores share their tables with the API): its items, its queries and the global
    /// indexes' results are dropped.
    pub fn partition_written(&self, table: TableId, partition: &[u8]) {
        self.written(table, Scope::Items(partition), partition);
    }

    /// Records a write through the socket protocol (this daemon's, or another host's
    /// hinted) of `key` to `table`, a store's table the front caches too: every item of
    /// the key's (or topic's) partition may have changed.
    pub fn store_key_written(&self, table: TableId, key: &CacheKey) {
        if let Some(partition) = keys::partition_of_store_key(key) {
            self.partition_written(table, &partition);
        }
    }

    /// Records a write of one item of `table` (through this front, or another host's):
    /// its entries, its partition's queries and the global indexes' results go.
    pub fn item_written(&self, table: TableId, key: &[u8], partition: &[u8]) {
        self.written(table, Scope::Item(key), partition);
    }

    /// A write of `items` in `partition`: they, the partition's queries and the global
    /// indexes' results go.
    fn written(&self, table: TableId, items: Scope<'_>, partition: &[u8]) {
        self.changed(table, items);
        self.changed(
            table,
            Scope::Partition {
                index: "",
                key: partition,
            },
        );
        self.written_through(table);
    }

    /// Continuity of `table`'s changes lost: every entry goes; a replaced stream may
    /// mean a table re-created with other keys and indexes, so until it is described
    /// again its reads bypass the cache.
    pub fn lost(&self, table: TableId, cause: FlushCause) {
        if cause == FlushCause::StreamReplaced {
            self.ask_description(table);
        }
        self.flush(table);
    }

    /// Drops every entry of `table`: something changed, nobody knows what.
    pub fn flush(&self, table: TableId) {
        let now = self.tick();
        let s = &self.state[table.0 as usize];
        s.flushed.fetch_max(now, Ordering::SeqCst);
        s.flushes.fetch_add(1, Ordering::Relaxed);
    }

    /// The entry under `key`, if it is still good to serve.
    pub fn get(&self, key: &EntryKey) -> Option<Arc<Entry>> {
        let entry = self.entries.get(key)?;
        if self.valid(&entry) {
            return Some(entry);
        }
        self.entries.invalidate(key);
        None
    }

    fn valid(&self, e: &Entry) -> bool {
        let s = &self.state[e.table.0 as usize];
        e.slots
            .iter()
            .all(|slot| e.stamp > self.stamps[*slot].load(Ordering::SeqCst))
            && e.stamp > s.flushed.load(Ordering::SeqCst)
            && match e.expires {
                None => true,
                Some(at) => {
                    Instant::now() < at && e.stamp > s.written_through.load(Ordering::SeqCst)
                }
            }
    }

    /// Keeps a fill's answer, unless a change that drops it came in since `ticket`.
    pub fn fill(&self, key: EntryKey, ticket: Ticket, of: Of<'_>, body: Bytes, units: f64) {
        let t = ticket.table;
        let (slots, global) = match of {
            Of::Item { key, partition } => (
                [
                    self.slot(t, Scope::Item(key)),
                    self.slot(t, Scope::Items(partition)),
                ],
                false,
            ),
            Of::Query { index, partition } => {
                let s = self.slot(
                    t,
                    Scope::Partition {
                        index,
                        key: partition,
                    },
                );
                ([s, s], !index.is_empty())
            }
        };
        let entry = Entry {
            stamp: ticket.stamp,
            table: t,
            slots,
            expires: global
                .then(|| Instant::now() + Duration::from_millis(self.freshness.max_staleness_ms())),
            body,
            units,
        };
        if self.valid(&entry) {
            self.entries.insert(key, Arc::new(entry));
        }
    }

    /// Counts a read of `table`, and what a hit saved.
    pub fn count(&self, table: TableId, read: Read, served: Served, saved_units: f64) {
        let s = &self.state[table.0 as usize];
        s.reads[read as usize][served as usize].fetch_add(1, Ordering::Relaxed);
        if saved_units > 0.0 {
            s.saved_milli
                .fetch_add((saved_units * 1000.0).round() as u64, Ordering::Relaxed);
        }
    }

    /// Reads served from memory and by DynamoDB so far: `[read][served]`.
    pub fn reads(&self, table: TableId) -> [[u64; 3]; 3] {
        self.state[table.0 as usize]
            .reads
            .each_ref()
            .map(|r| r.each_ref().map(|c| c.load(Ordering::Relaxed)))
    }

    /// Stream records applied to `table`'s entries, and its flushes, so far.
    pub fn applied(&self, table: TableId) -> (u64, u64) {
        let s = &self.state[table.0 as usize];
        (
            s.invalidations.load(Ordering::Relaxed),
            s.flushes.load(Ordering::Relaxed),
        )
    }

    /// Whether reads of `table` must bypass the cache: nobody has proven it fresh within
    /// the staleness bound, or it is to be described again and is not yet. Logs each
    /// switch of the first.
    pub fn must_bypass(&self, table: TableId) -> bool {
        let s = &self.state[table.0 as usize];
        if s.asked.load(Ordering::SeqCst) > s.generation.load(Ordering::SeqCst) {
            return true;
        }
        let judged = self.freshness.judge(table.0 as usize, Instant::now());
        if judged.switched {
            let name = &self.of(table).name;
            if judged.stale {
                tracing::warn!(table = %name, "stream tailer is behind: DynamoDB API reads bypass the cache");
            } else {
                tracing::info!(table = %name, "stream tailer caught up: DynamoDB API reads use the cache");
            }
        }
        judged.stale
    }

    /// What a stream record of `table` changed, as this cache keys it; `None` if its key
    /// cannot be read.
    pub fn change_of(&self, table: TableId, record: &Record) -> Option<ItemChange> {
        let t = self.of(table);
        let global = t
            .global
            .iter()
            .flat_map(|(index, schema)| {
                [&record.old_image, &record.new_image]
                    .into_iter()
                    .flatten()
                    .filter_map(|image| {
                        Some((index.clone(), keys::partition_of_image(schema, image)?))
                    })
            })
            .collect();
        Some(ItemChange {
            key: keys::of_image(&t.key, &record.keys)?,
            partition: keys::partition_of_image(&t.key, &record.keys)?,
            global,
        })
    }

    /// Applies a change read from the table's stream (here or by a fleet's relay): its
    /// item, its partition and the global index partitions it left and entered; `None`,
    /// a change whose key could not be read, drops the whole table.
    pub fn apply(&self, table: TableId, change: Option<&ItemChange>) {
        let Some(change) = change else {
            self.flush(table);
            return;
        };
        self.changed(table, Scope::Item(&change.key));
        self.changed(
            table,
            Scope::Partition {
                index: "",
                key: &change.partition,
            },
        );
        for (index, key) in &change.global {
            self.changed(table, Scope::Partition { index, key });
        }
        self.state[table.0 as usize]
            .invalidations
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Every change of `table` made before `as_of` has been applied (`None`: not proven).
    pub fn fresh_as_of(&self, table: TableId, as_of: Option<Instant>) {
        self.freshness.set(table.0 as usize, as_of);
    }
}

/// A change of one item, as the cache keys it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ItemChange {
    /// The item's canonical key.
    pub key: Vec<u8>,
    /// Its partition key's canonical bytes.
    pub partition: Vec<u8>,
    /// The global index partitions it left or entered: index name, partition key.
    pub global: Vec<(String, Vec<u8>)>,
}

/// Writes the cache's counters into a scrape: the families always, so that every daemon
/// exports the same ones, with a sample per cached table.
pub fn export(cache: Option<&ApiCache>, out: &mut Exposition) {
    let described = cache.map(ApiCache::tables).unwrap_or_default();
    let tables = || {
        cache.into_iter().flat_map(|c| {
            described
                .iter()
                .map(move |t| (c, t.as_ref(), &c.state[t.id.0 as usize]))
        })
    };
    let name = "ddbcached_api_cache_reads_total";
    out.family(
        name,
        Kind::Counter,
        "DynamoDB API reads of cached tables, by table, operation and how they were served (hit: from memory; miss: from DynamoDB and kept; bypass: from DynamoDB only).",
    );
    for (_, t, s) in tables() {
        for read in Read::ALL {
            for served in Served::ALL {
                let labels = [
                    ("table", t.name.as_str()),
                    ("operation", read.name()),
                    ("served", served.name()),
                ];
                let v = s.reads[read as usize][served as usize].load(Ordering::Relaxed);
                out.sample(name, &labels, v);
            }
        }
    }
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    out.by_label(
        "ddbcached_api_read_units_saved_total",
        Kind::Counter,
        "Read capacity units the DynamoDB API's hits would have cost DynamoDB, by table.",
        "table",
        tables().map(|(_, t, s)| (t.name.as_str(), load(&s.saved_milli) as f64 / 1000.0)),
    );
    out.by_label(
        "ddbcached_api_cache_invalidations_total",
        Kind::Counter,
        "Stream records applied to the DynamoDB API's cache, by table.",
        "table",
        tables().map(|(_, t, s)| (t.name.as_str(), load(&s.invalidations))),
    );
    out.by_label(
        "ddbcached_api_cache_flushes_total",
        Kind::Counter,
        "Whole-table invalidations of the DynamoDB API's cache (lost continuity, PartiQL writes), by table.",
        "table",
        tables().map(|(_, t, s)| (t.name.as_str(), load(&s.flushes))),
    );
    out.by_label(
        "ddbcached_api_cache_bypassing",
        Kind::Gauge,
        "1 while the DynamoDB API's reads of a table bypass the cache (its freshness not proven within the bound, or the table to be described again and not yet).",
        "table",
        tables().map(|(c, t, _)| (t.name.as_str(), u8::from(c.must_bypass(t.id)))),
    );
    out.by_label(
        "ddbcached_api_cache_seconds_since_fresh",
        Kind::Gauge,
        "Seconds since every change of a table was last proven applied to the DynamoDB API's cache (NaN: never).",
        "table",
        tables().map(|(c, t, _)| {
            let since = c.freshness.seconds_since(t.id.0 as usize);
            (t.name.as_str(), since.unwrap_or(f64::NAN))
        }),
    );
    out.single(
        "ddbcached_api_cache_bytes",
        Kind::Gauge,
        "Bytes the DynamoDB API's cached items and query results take.",
        cache.map_or(0, |c| c.entries.weighted_size()),
    );
}

/// Applying what a cached table's tailer read.
impl Sink for ApiCache {
    type Table = TableId;

    async fn accept(&self, table: TableId, seen: Seen<'_>) -> Result<(), SinkError> {
        match seen {
            Seen::Records { records, .. } => {
                for record in records {
                    self.apply(table, self.change_of(table, record).as_ref());
                }
            }
            Seen::ShardEnded { .. } => {}
            Seen::ContinuityLost(cause) => self.lost(table, cause),
            Seen::CaughtUp(at) => self.fresh_as_of(table, at),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::keys::KeySchema;
    use crate::stream::api::{Attr, Event, Image};

    fn cache() -> ApiCache {
        let table = ApiTable {
            id: TableId(0),
            name: "t".into(),
            key: KeySchema {
                partition: "pk".into(),
                sort: Some("sk".into()),
            },
            local: vec![],
            global: HashMap::from([(
                "byColor".to_owned(),
                KeySchema {
                    partition: "color".into(),
                    sort: None,
                },
            )]),
            images: true,
            generation: 0,
        };
        ApiCache::new(vec![table], 60_000, 1 << 20)
    }

    fn image(pk: &str, sk: &str, color: &str) -> Image {
        Image::from([
            ("pk".to_owned(), Attr::S(pk.into())),
            ("sk".to_owned(), Attr::N(sk.into())),
            ("color".to_owned(), Attr::S(color.into())),
        ])
    }

    fn record(old: Option<Image>, new: Option<Image>) -> Record {
        let keys = old.clone().or(new.clone()).unwrap();
        let keys = keys
            .into_iter()
            .filter(|(k, _)| k == "pk" || k == "sk")
            .collect();
        Record {
            sequence_number: "1".into(),
            event: Event::Modify,
            keys,
            new_image: new,
            old_image: old,
        }
    }

    fn key(pk: &str, sk: &str) -> Vec<u8> {
        let schema = KeySchema {
            partition: "pk".into(),
            sort: Some("sk".into()),
        };
        keys::of_image(&schema, &image(pk, sk, "")).unwrap()
    }

    /// A ticket under table 0's current description.
    fn ticket(c: &ApiCache) -> Ticket {
        c.ticket(&c.of(TableId(0)))
    }

    fn fill_item(c: &ApiCache, k: &[u8], ticket: Ticket) -> EntryKey {
        let e = EntryKey::item(TableId(0), k, b"");
        let of = Of::Item {
            key: k,
            partition: b"P",
        };
        c.fill(e.clone(), ticket, of, Bytes::from_static(b"{}"), 1.0);
        e
    }

    fn fill_query(c: &ApiCache, index: &str, pk: &[u8]) -> EntryKey {
        let e = EntryKey::query(TableId(0), format!("{index}{pk:?}").as_bytes());
        let of = Of::Query {
            index,
            partition: pk,
        };
        c.fill(e.clone(), ticket(c), of, Bytes::new(), 1.0);
        e
    }

    /// Applies a stream record of table 0 as the tailer does.
    fn apply(c: &ApiCache, r: Record) {
        c.apply(TableId(0), c.change_of(TableId(0), &r).as_ref());
    }

    #[test]
    fn tables_found_later_take_the_next_ids_up_to_the_bound() {
        let c = cache();
        let named = |name: &str| ApiTable {
            name: name.into(),
            ..(*c.of(TableId(0))).clone()
        };
        assert_eq!(c.add(named("t")), Some(TableId(0)), "cached already");
        assert_eq!(c.add(named("u")), Some(TableId(1)));
        assert_eq!(c.table("u").map(|t| t.id), Some(TableId(1)));
        assert!(c.must_bypass(TableId(1)), "not proven fresh yet");
        for i in 2..MAX_TABLES {
            assert_eq!(c.add(named(&format!("t{i}"))), Some(TableId(i as u16)));
        }
        assert_eq!(c.add(named("one-too-many")), None);
        assert!(c.table("one-too-many").is_none());
        let tables = c.tables();
        let names: Vec<&str> = tables.iter().take(3).map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["t", "u", "t2"]);
        assert_eq!(tables.len(), MAX_TABLES);
    }

    #[test]
    fn a_change_drops_its_item_and_partition_and_nothing_else() {
        let c = cache();
        let (a, b) = (key("p", "1"), key("p", "2"));
        let (ea, eb) = (fill_item(&c, &a, ticket(&c)), fill_item(&c, &b, ticket(&c)));
        let p = keys::partition_of_image(&c.of(TableId(0)).key, &image("p", "1", "")).unwrap();
        let q = keys::partition_of_image(&c.of(TableId(0)).key, &image("q", "1", "")).unwrap();
        let (qp, qq) = (fill_query(&c, "", &p), fill_query(&c, "", &q));
        assert!(c.get(&ea).is_some() && c.get(&eb).is_some() && c.get(&qp).is_some());
        apply(&c, record(None, Some(image("p", "1.0", "red"))));
        assert!(
            c.get(&ea).is_none(),
            "the item changed (7 and 7.0 are one key)"
        );
        assert!(c.get(&eb).is_some(), "another item of the partition");
        assert!(c.get(&qp).is_none(), "a query of its partition");
        assert!(c.get(&qq).is_some(), "a query of another partition");
    }

    #[test]
    fn a_write_to_a_whole_partition_drops_its_items_and_queries() {
        let c = cache();
        let (a, b) = (key("p", "1"), key("q", "1"));
        let ea = fill_item(&c, &a, ticket(&c));
        let eb = EntryKey::item(TableId(0), &b, b"");
        let of = Of::Item {
            key: &b,
            partition: b"Q",
        };
        c.fill(eb.clone(), ticket(&c), of, Bytes::new(), 1.0);
        let qp = fill_query(&c, "", b"P");
        c.partition_written(TableId(0), b"P");
        assert!(c.get(&ea).is_none() && c.get(&qp).is_none());
        assert!(c.get(&eb).is_some());
    }

    #[test]
    fn a_fill_that_raced_a_change_is_not_kept() {
        let c = cache();
        let a = key("p", "1");
        let before = ticket(&c);
        c.changed(TableId(0), Scope::Item(&a));
        let e = fill_item(&c, &a, before);
        assert!(c.get(&e).is_none());
        let e = fill_item(&c, &a, ticket(&c));
        assert!(c.get(&e).is_some());
        // A flush drops everything filled before it, and spares later fills.
        c.flush(TableId(0));
        assert!(c.get(&e).is_none());
        let e = fill_item(&c, &a, ticket(&c));
        assert!(c.get(&e).is_some());
    }

    #[test]
    fn an_index_move_drops_the_partitions_it_left_and_entered() {
        let c = cache();
        let table = c.of(TableId(0));
        let schema = &table.global["byColor"];
        let color = |name| keys::partition_of_image(schema, &image("p", "1", name)).unwrap();
        let (red, blue, green) = (
            fill_query(&c, "byColor", &color("red")),
            fill_query(&c, "byColor", &color("blue")),
            fill_query(&c, "byColor", &color("green")),
        );
        apply(
            &c,
            record(Some(image("p", "1", "red")), Some(image("p", "1", "blue"))),
        );
        assert!(c.get(&red).is_none() && c.get(&blue).is_none());
        assert!(c.get(&green).is_some());
        // Any write through the front drops the global index's results too.
        c.written_through(TableId(0));
        assert!(c.get(&green).is_none());
    }

    #[test]
    fn a_table_whose_stream_was_replaced_bypasses_until_described_again() {
        let c = cache();
        c.fresh_as_of(TableId(0), Some(Instant::now()));
        let e = fill_item(&c, &key("p", "1"), ticket(&c));
        c.lost(TableId(0), FlushCause::StreamReplaced);
        assert!(c.get(&e).is_none(), "flushed");
        assert!(
            c.must_bypass(TableId(0)),
            "fresh, but maybe keyed otherwise now"
        );
        assert_eq!(c.undescribed(), [(TableId(0), "t".to_owned(), 1)]);

        // Re-created with a partition key only: a read that began under the former
        // description keeps nothing, one under the new one does.
        let former = c.of(TableId(0));
        let mut again = (*former).clone();
        again.key.sort = None;
        c.described_again(again, 1);
        assert!(!c.must_bypass(TableId(0)) && c.undescribed().is_empty());
        assert_eq!(c.table("t").unwrap().key.sort, None);
        assert!(!c.is_current(&former));
        let late = fill_item(&c, b"late", c.ticket(&former));
        assert!(c.get(&late).is_none(), "keyed by the former keys");
        let now = fill_item(&c, b"now", ticket(&c));
        assert!(c.get(&now).is_some());

        // Other causes of lost continuity flush, and leave the description alone.
        c.lost(TableId(0), FlushCause::Trimmed);
        assert!(c.get(&now).is_none() && c.undescribed().is_empty());
    }

    #[test]
    fn an_index_found_asks_for_a_description_at_most_once_a_minute() {
        let c = cache();
        c.fresh_as_of(TableId(0), Some(Instant::now()));
        c.index_found(TableId(0));
        c.index_found(TableId(0));
        assert_eq!(c.undescribed(), [(TableId(0), "t".to_owned(), 1)]);
        assert!(c.must_bypass(TableId(0)));
        c.described_again((*c.of(TableId(0))).clone(), 1);
        c.index_found(TableId(0));
        assert!(c.undescribed().is_empty() && !c.must_bypass(TableId(0)));
    }

    #[tokio::test]
    async fn the_tailers_proofs_decide_whether_reads_bypass() {
        let c = cache();
        assert!(c.must_bypass(TableId(0)));
        let proof = |at| Seen::CaughtUp(at);
        c.accept(TableId(0), proof(Some(Instant::now())))
            .await
            .unwrap();
        assert!(!c.must_bypass(TableId(0)));
        c.accept(TableId(0), proof(None)).await.unwrap();
        assert!(c.must_bypass(TableId(0)));
    }
}
