//! The versioned cache: moka storage of key versions and topic tails, and the guards that
//! keep it from ever holding something DynamoDB no longer says.
//!
//! - [`versions`]: one key's newest versions ([`KeyVersions`]).
//! - [`tail`]: one topic's position and top entries ([`TopicTail`]).
//!
//! ## No stale fill
//!
//! A fill reads DynamoDB, then inserts what it read. If a write or an invalidation of the
//! same key lands while the read is in flight, the read may predate it, and inserting it
//! would resurrect the old state (memcache's stale-set problem). So, as with memcache's
//! leases, a fill takes a [`Ticket`] *before* its read: the generation of the key's stripe
//! and the cache's epoch. Every write and invalidation bumps the stripe's generation
//! (invalidating everything bumps the epoch), under the stripe's lock; a fill commits
//! under the same lock and only if both numbers are unchanged. Stripes are a fixed array
//! indexed by the key's hash, so memory stays bounded whatever the number of keys; two keys
//! sharing a stripe only cost an occasional rejected fill.
//!
//! The epoch is also a read-write lock: mutations hold it shared, and invalidating
//! everything (or a namespace) holds it exclusively, so no mutation can slip an old entry
//! in after moka's `invalidate_all` has run.
//!
//! ## Coalescing
//!
//! Concurrent misses of one key queue on a per-key fill lock: the first reads DynamoDB,
//! the others wait and then find its entry (a "coalesced wait"), or, if its fill was
//! rejected, read themselves.
//!
//! ## Reading through
//!
//! Every read that fills goes through [`Cache::read_through`] (look, coalesce, ticket,
//! load, commit) or, to add what it read to an entry without coalescing, [`Cache::fill`]
//! (ticket, load, commit): the protocol above is written once.

pub mod tail;
pub mod versions;

use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use moka::notification::RemovalCause;

pub use tail::TopicTail;
pub use versions::{KeyVersions, Known};

use crate::config::CacheConfig;
use crate::locks::{KeyGuard, KeyedLocks};
use crate::metrics::{Exposition, Kind};

/// Stripes of generations. A power of two; 4096 × (8 + lock) bytes.
const STRIPES: usize = 4096;
/// Bookkeeping per cache entry counted by the weigher (moka's node, hash slots, key).
const ENTRY_OVERHEAD_BYTES: usize = 160;

/// What the cache stores things under: one key of the key-value store (namespace and key)
/// or one topic of the indexed store, held as one flat byte string so that a lookup can
/// be made from borrowed parts written into a reusable [`KeyBuf`], without allocating.
///
/// The flat form: a tag byte, then for a key the namespace's length (u32, big-endian), the
/// namespace and the key; for a topic, the topic. Two keys are equal exactly when their
/// parts are. `Hash` is the flat form's, as `Borrow<[u8]>` requires.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CacheKey(Box<[u8]>);

/// The parts of a [`CacheKey`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyParts<'a> {
    Kv { ns: &'a str, key: &'a [u8] },
    Log { topic: &'a str },
}

const KV_TAG: u8 = 0;
const LOG_TAG: u8 = 1;
const NS_LEN_BYTES: usize = 4;

fn write_kv(out: &mut Vec<u8>, ns: &str, key: &[u8]) {
    out.clear();
    out.push(KV_TAG);
    // A namespace is a DynamoDB string attribute: far below 4 GiB.
    out.extend_from_slice(&(ns.len() as u32).to_be_bytes());
    out.extend_from_slice(ns.as_bytes());
    out.extend_from_slice(key);
}

fn write_log(out: &mut Vec<u8>, topic: &str) {
    out.clear();
    out.push(LOG_TAG);
    out.extend_from_slice(topic.as_bytes());
}

impl CacheKey {
    /// Key `key` of namespace `ns` of the key-value store.
    pub fn kv(ns: &str, key: &[u8]) -> CacheKey {
        let mut flat = Vec::with_capacity(1 + NS_LEN_BYTES + ns.len() + key.len());
        write_kv(&mut flat, ns, key);
        CacheKey(flat.into_boxed_slice())
    }

    /// Topic `topic` of the indexed store.
    pub fn log(topic: &str) -> CacheKey {
        let mut flat = Vec::with_capacity(1 + topic.len());
        write_log(&mut flat, topic);
        CacheKey(flat.into_boxed_slice())
    }

    /// The namespace and key, or the topic.
    pub fn parts(&self) -> KeyParts<'_> {
        // The flat form is only ever written by `write_kv` and `write_log`, from a `&str`.
        let text = |b| std::str::from_utf8(b).expect("written from a str");
        match self.0.split_first() {
            Some((&KV_TAG, rest)) => {
                let (len, rest) = rest.split_at(NS_LEN_BYTES);
                let len = u32::from_be_bytes(len.try_into().expect("four bytes")) as usize;
                let (ns, key) = rest.split_at(len);
                KeyParts::Kv { ns: text(ns), key }
            }
            Some((_, topic)) => KeyParts::Log { topic: text(topic) },
            None => unreachable!("a flat key has a tag"),
        }
    }

    /// Whether this is a key of the key-value store (else a topic).
    pub fn is_kv(&self) -> bool {
        self.0[0] == KV_TAG
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

impl std::borrow::Borrow<[u8]> for CacheKey {
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.parts() {
            KeyParts::Kv { ns, key } => write!(f, "Kv({ns:?}, {:?})", Bytes::copy_from_slice(key)),
            KeyParts::Log { topic } => write!(f, "Log({topic:?})"),
        }
    }
}

/// A buffer reused across lookups, in which a key's flat form is written to look it up
/// with [`Cache::get`] without allocating a [`CacheKey`].
#[derive(Default)]
pub struct KeyBuf(Vec<u8>);

impl KeyBuf {
    /// The flat form of key `key` of namespace `ns`.
    pub fn kv(&mut self, ns: &str, key: &[u8]) -> &[u8] {
        write_kv(&mut self.0, ns, key);
        &self.0
    }

    /// The flat form of topic `topic`.
    pub fn log(&mut self, topic: &str) -> &[u8] {
        write_log(&mut self.0, topic);
        &self.0
    }
}

/// What the cache stores. Values are shared: a hit clones an `Arc`, not the data.
#[derive(Clone, Debug)]
pub enum Cached {
    Kv(Arc<KeyVersions>),
    Log(Arc<TopicTail>),
}

impl Cached {
    fn weight(&self) -> usize {
        match self {
            Cached::Kv(v) => v.weight(),
            Cached::Log(t) => t.weight(),
        }
    }
}

/// The operations that read through the cache, for per-operation counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadOp {
    KvGet = 0,
    KvLatestTs = 1,
    KvTimestamps = 2,
    LogPosition = 3,
    LogScan = 4,
}

impl ReadOp {
    pub const ALL: [ReadOp; 5] = [
        ReadOp::KvGet,
        ReadOp::KvLatestTs,
        ReadOp::KvTimestamps,
        ReadOp::LogPosition,
        ReadOp::LogScan,
    ];

    /// The operation's protocol name.
    pub fn name(self) -> &'static str {
        match self {
            ReadOp::KvGet => "kv.get",
            ReadOp::KvLatestTs => "kv.latest_ts",
            ReadOp::KvTimestamps => "kv.timestamps",
            ReadOp::LogPosition => "log.position",
            ReadOp::LogScan => "log.scan",
        }
    }
}

/// How a read was served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// From memory.
    Hit,
    /// From memory, after waiting for another request's fill of the same key.
    Coalesced,
    /// From DynamoDB.
    Miss,
    /// From DynamoDB because the client asked for a consistent read.
    Bypass,
}

impl Served {
    pub const ALL: [Served; 4] = [Served::Hit, Served::Coalesced, Served::Miss, Served::Bypass];

    pub fn name(self) -> &'static str {
        match self {
            Served::Hit => "hit",
            Served::Coalesced => "coalesced",
            Served::Miss => "miss",
            Served::Bypass => "bypass",
        }
    }
}

/// Counters of the cache (the metrics endpoint exports them).
#[derive(Default)]
pub struct CacheStats {
    served: [[AtomicU64; 4]; 5],
    rejected_fills: AtomicU64,
    evictions: AtomicU64,
    invalidations: AtomicU64,
}

/// A snapshot of [`CacheStats`] plus moka's estimates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// `[op][served]` in the order of [`ReadOp::ALL`] and hit, coalesced, miss, bypass.
    pub served: [[u64; 4]; 5],
    pub rejected_fills: u64,
    pub evictions: u64,
    pub invalidations: u64,
    pub entries: u64,
    pub weighted_bytes: u64,
}

impl StatsSnapshot {
    /// How often `op` was served as `served`.
    pub fn count(&self, op: ReadOp, served: Served) -> u64 {
        self.served[op as usize][served as usize]
    }

    /// Sum over all operations.
    pub fn total(&self, served: Served) -> u64 {
        ReadOp::ALL.iter().map(|op| self.count(*op, served)).sum()
    }
}

/// How a read-through looks at the cache before loading.
#[derive(Clone, Debug)]
pub enum Lookup {
    /// Look first.
    Look,
    /// The caller has just looked and found this (`None`: nothing): do not look again.
    Looked(Option<Cached>),
    /// Do not use what is cached: load, and fill with what was loaded (a consistent
    /// read, or a table whose freshness is not proven).
    Bypass,
}

/// A read-through waited longer than it may for another fill of the same key; nothing
/// was loaded.
#[derive(Clone, Copy, Debug)]
pub struct Queued {
    pub waited: Duration,
}

/// Where a fill stood before its read; see the module docs.
#[derive(Clone, Copy, Debug)]
pub struct Ticket {
    stripe: usize,
    generation: u64,
    epoch: u64,
}

/// Where a [`TestHook`] is called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookPoint {
    /// A fill, between its DynamoDB read and its commit.
    Fill,
    /// A write, between DynamoDB's acceptance and the cache update.
    Update,
}

/// Called at a [`HookPoint`]; tests use it to hold an operation there and race another
/// against it deterministically. Never set in production.
pub type TestHook = Arc<dyn Fn(HookPoint, CacheKey) -> BoxFuture<'static, ()> + Send + Sync>;

struct Stripe {
    generation: AtomicU64,
    lock: tokio::sync::Mutex<()>,
}

/// The cache.
pub struct Cache {
    /// moka's `sync` cache: none of its calls waits on I/O, so calling it from async code
    /// holds a thread for microseconds (a write may also apply moka's pending queue
    /// first); measured against its `future` cache on the hit path (`benches/cache.rs`,
    /// `benches/run.sh`), a lookup costs less and its housekeeping allocates a tenth as
    /// often.
    entries: moka::sync::Cache<CacheKey, Cached>,
    stripes: Box<[Stripe]>,
    /// Epoch number, bumped by whole-cache and namespace invalidations.
    epoch: AtomicU64,
    /// Held shared by every mutation, exclusively by whole-cache invalidations.
    epoch_lock: tokio::sync::RwLock<()>,
    fills: KeyedLocks<CacheKey>,
    writes: KeyedLocks<CacheKey>,
    stats: Arc<CacheStats>,
    hasher: std::collections::hash_map::RandomState,
    test_hook: OnceLock<TestHook>,
    tail_capacity: usize,
}

impl Cache {
    pub fn new(config: &CacheConfig) -> Cache {
        let stats = Arc::new(CacheStats::default());
        let evictions = stats.clone();
        let mut builder = moka::sync::Cache::builder()
            .max_capacity(config.max_bytes)
            .weigher(|k: &CacheKey, v: &Cached| {
                let bytes = ENTRY_OVERHEAD_BYTES + k.len() + v.weight();
                u32::try_from(bytes).unwrap_or(u32::MAX)
            })
            .eviction_listener(move |_, _, cause| {
                if matches!(cause, RemovalCause::Size | RemovalCause::Expired) {
                    evictions.evictions.fetch_add(1, Ordering::Relaxed);
                }
            })
            .support_invalidation_closures();
        if config.ttl_secs > 0 {
            builder = builder.time_to_live(Duration::from_secs(config.ttl_secs));
        }
        Cache {
            entries: builder.build(),
            stripes: (0..STRIPES)
                .map(|_| Stripe {
                    generation: AtomicU64::new(0),
                    lock: tokio::sync::Mutex::new(()),
                })
                .collect(),
            epoch: AtomicU64::new(0),
            epoch_lock: tokio::sync::RwLock::new(()),
            fills: KeyedLocks::new(),
            writes: KeyedLocks::new(),
            stats,
            hasher: Default::default(),
            test_hook: OnceLock::new(),
            tail_capacity: config.log_tail_entries,
        }
    }

    /// How many entries of a topic's tail are kept.
    pub fn tail_capacity(&self) -> usize {
        self.tail_capacity
    }

    /// The cached value, if any. Takes no lock.
    /// The entry under `key`: a [`CacheKey`], or a flat form written into a [`KeyBuf`].
    pub async fn get<Q>(&self, key: &Q) -> Option<Cached>
    where
        CacheKey: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entries.get(key)
    }

    /// Counts how a read was served.
    pub fn record(&self, op: ReadOp, served: Served) {
        self.record_many(op, served, 1);
    }

    /// Counts `count` reads served alike.
    pub fn record_many(&self, op: ReadOp, served: Served, count: u64) {
        self.stats.served[op as usize][served as usize].fetch_add(count, Ordering::Relaxed);
    }

    /// The entry of `key`: the cached one, or, on a miss, the one `load` reads from
    /// DynamoDB, which fills the cache unless a write or invalidation raced it. Concurrent
    /// misses of a key wait (no longer than `wait`) for the first one's fill and take its
    /// entry. Returns the entry and how it was served.
    pub async fn read_through<E, F>(
        &self,
        key: &CacheKey,
        lookup: Lookup,
        wait: Duration,
        load: impl FnOnce() -> F,
    ) -> Result<(Cached, Served), E>
    where
        F: Future<Output = Result<Cached, E>>,
        E: From<Queued>,
    {
        let bypass = match lookup {
            Lookup::Look => match self.get(key).await {
                Some(entry) => return Ok((entry, Served::Hit)),
                None => false,
            },
            Lookup::Looked(Some(entry)) => return Ok((entry, Served::Hit)),
            Lookup::Looked(None) => false,
            Lookup::Bypass => true,
        };
        let (_filling, waited) = tokio::time::timeout(wait, self.fills.lock(key))
            .await
            .map_err(|_| Queued { waited: wait })?;
        if waited && !bypass {
            if let Some(entry) = self.get(key).await {
                return Ok((entry, Served::Coalesced));
            }
        }
        let entry = self
            .fill(key, load, |loaded, _| Some(loaded.clone()))
            .await?;
        Ok((entry, if bypass { Served::Bypass } else { Served::Miss }))
    }

    /// Loads, then stores what `merge` computes from the loaded value and the current
    /// entry, unless a write or invalidation of `key` raced the load. Returns what was
    /// loaded, stored or not.
    pub async fn fill<T, E, F>(
        &self,
        key: &CacheKey,
        load: impl FnOnce() -> F,
        merge: impl FnOnce(&T, Option<Cached>) -> Option<Cached>,
    ) -> Result<T, E>
    where
        F: Future<Output = Result<T, E>>,
    {
        let ticket = self.ticket(key);
        let loaded = load().await?;
        self.commit_fill(key.clone(), ticket, |current| merge(&loaded, current))
            .await;
        Ok(loaded)
    }

    /// Takes the write lock of `key`: the daemon's writes to one key run one at a time,
    /// so that their cache updates happen in the order DynamoDB applied them.
    pub async fn lock_write(&self, key: &CacheKey) -> KeyGuard {
        self.writes.lock(key).await.0
    }

    /// The ticket a fill must take before its DynamoDB read.
    pub fn ticket(&self, key: &CacheKey) -> Ticket {
        let stripe = self.stripe_of(key);
        Ticket {
            stripe,
            // Acquire: pairs with the Release bumps, so a bump that happened before this
            // load is seen by the comparison at commit time.
            generation: self.stripes[stripe].generation.load(Ordering::Acquire),
            epoch: self.epoch.load(Ordering::Acquire),
        }
    }

    /// Commits a fill: `merge` computes the entry from the current one, and it is stored
    /// only if nothing invalidated the key since `ticket` was taken. Returns whether it
    /// was stored.
    pub async fn commit_fill(
        &self,
        key: CacheKey,
        ticket: Ticket,
        merge: impl FnOnce(Option<Cached>) -> Option<Cached>,
    ) -> bool {
        if let Some(hook) = self.test_hook.get() {
            hook(HookPoint::Fill, key.clone()).await;
        }
        let _epoch = self.epoch_lock.read().await;
        let stripe = &self.stripes[ticket.stripe];
        let _stripe = stripe.lock.lock().await;
        let current = stripe.generation.load(Ordering::Acquire) == ticket.generation
            && self.epoch.load(Ordering::Acquire) == ticket.epoch;
        if !current {
            self.stats.rejected_fills.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if let Some(value) = merge(self.entries.get(&key)) {
            self.entries.insert(key, value);
        }
        true
    }

    /// Applies a change to `key` that DynamoDB has made (a write of this daemon, or a
    /// stream record): bumps the key's generation, so fills in flight are rejected, and
    /// stores what `change` computes from the current entry (`None` removes it).
    pub async fn update(
        &self,
        key: CacheKey,
        change: impl FnOnce(Option<Cached>) -> Option<Cached>,
    ) {
        if let Some(hook) = self.test_hook.get() {
            hook(HookPoint::Update, key.clone()).await;
        }
        let _epoch = self.epoch_lock.read().await;
        let stripe = &self.stripes[self.stripe_of(&key)];
        let _stripe = stripe.lock.lock().await;
        stripe.generation.fetch_add(1, Ordering::Release);
        match change(self.entries.get(&key)) {
            Some(value) => self.entries.insert(key, value),
            None => self.entries.invalidate(&key),
        }
    }

    /// Brings `key` in line with a change DynamoDB reports (a stream record): if the entry
    /// already `reflects` it (typically the echo of this daemon's own write) nothing
    /// happens; otherwise the key is forgotten and fills in flight are rejected, so the
    /// next read fetches DynamoDB's state. A record is never applied blindly: it may be
    /// older than a write this daemon has made since. Returns whether an entry was dropped.
    pub async fn reconcile(&self, key: CacheKey, reflects: impl FnOnce(&Cached) -> bool) -> bool {
        let _epoch = self.epoch_lock.read().await;
        let stripe = &self.stripes[self.stripe_of(&key)];
        let _stripe = stripe.lock.lock().await;
        let current = self.entries.get(&key);
        if current.as_ref().is_some_and(reflects) {
            return false;
        }
        stripe.generation.fetch_add(1, Ordering::Release);
        if current.is_none() {
            return false;
        }
        self.entries.invalidate(&key);
        self.stats.invalidations.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Forgets `key` (and rejects fills of it in flight).
    pub async fn invalidate(&self, key: CacheKey) {
        self.stats.invalidations.fetch_add(1, Ordering::Relaxed);
        self.update(key, |_| None).await;
    }

    /// Forgets every key of namespace `ns`.
    pub async fn invalidate_namespace(&self, ns: &str) {
        let ns = ns.to_owned();
        self.invalidate_where(move |k| matches!(k.parts(), KeyParts::Kv { ns: n, .. } if n == ns))
            .await;
    }

    /// Forgets every topic of the indexed store (lost continuity of its stream).
    pub async fn invalidate_topics(&self) {
        self.invalidate_where(|k| !k.is_kv()).await;
    }

    /// Forgets every key of the key-value store (lost continuity of its stream).
    pub async fn invalidate_keys(&self) {
        self.invalidate_where(CacheKey::is_kv).await;
    }

    /// Forgets everything.
    pub async fn invalidate_all(&self) {
        self.invalidate_where(|_| true).await;
    }

    async fn invalidate_where(&self, matches: impl Fn(&CacheKey) -> bool + Send + Sync + 'static) {
        let _exclusive = self.epoch_lock.write().await;
        self.stats.invalidations.fetch_add(1, Ordering::Relaxed);
        self.epoch.fetch_add(1, Ordering::Release);
        // Cannot fail: the cache is built with `support_invalidation_closures`.
        self.entries
            .invalidate_entries_if(move |k, _| matches(k))
            .expect("invalidation closures are enabled");
    }

    /// Installs the test hook (once; tests only).
    pub fn set_test_hook(&self, hook: TestHook) {
        let _ = self.test_hook.set(hook);
    }

    /// The counters, with moka's current entry count and weighted size.
    pub async fn stats(&self) -> StatsSnapshot {
        self.entries.run_pending_tasks();
        let s = &self.stats;
        let mut served = [[0; 4]; 5];
        for (op, row) in served.iter_mut().enumerate() {
            for (kind, n) in row.iter_mut().enumerate() {
                *n = s.served[op][kind].load(Ordering::Relaxed);
            }
        }
        StatsSnapshot {
            served,
            rejected_fills: s.rejected_fills.load(Ordering::Relaxed),
            evictions: s.evictions.load(Ordering::Relaxed),
            invalidations: s.invalidations.load(Ordering::Relaxed),
            entries: self.entries.entry_count(),
            weighted_bytes: self.entries.weighted_size(),
        }
    }

    /// Writes the counters into a scrape.
    pub async fn export(&self, out: &mut Exposition) {
        let s = self.stats().await;
        let name = "ddbcached_cache_reads_total";
        out.family(
            name,
            Kind::Counter,
            "Reads by operation and how they were served (hit, coalesced, miss, bypass).",
        );
        for op in ReadOp::ALL {
            for served in Served::ALL {
                let labels = [("op", op.name()), ("served", served.name())];
                out.sample(name, &labels, s.count(op, served));
            }
        }
        out.single(
            "ddbcached_cache_rejected_fills_total",
            Kind::Counter,
            "Fills not stored because a write or invalidation raced them.",
            s.rejected_fills,
        );
        out.single(
            "ddbcached_cache_evictions_total",
            Kind::Counter,
            "Entries evicted for size or age.",
            s.evictions,
        );
        out.single(
            "ddbcached_cache_invalidations_total",
            Kind::Counter,
            "Entries dropped by writes with an unknown outcome, stream records and flushes.",
            s.invalidations,
        );
        out.single(
            "ddbcached_cache_entries",
            Kind::Gauge,
            "Cached keys and topics (estimate).",
            s.entries,
        );
        out.single(
            "ddbcached_cache_weighted_bytes",
            Kind::Gauge,
            "Memory the cache accounts for (keys, values, bookkeeping).",
            s.weighted_bytes,
        );
    }

    fn stripe_of(&self, key: &CacheKey) -> usize {
        (self.hasher.hash_one(key) as usize) & (STRIPES - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> Cache {
        Cache::new(&CacheConfig::default())
    }

    fn key(k: &str) -> CacheKey {
        CacheKey::kv("ns", k.as_bytes())
    }

    fn entry(ts: i64) -> Cached {
        Cached::Kv(Arc::new(KeyVersions::from_fill(
            vec![(ts, Bytes::new())],
            true,
        )))
    }

    fn ts_of(c: Option<Cached>) -> Option<i64> {
        match c? {
            Cached::Kv(v) => match v.latest_ts() {
                Known::Yes(ts) => ts,
                Known::Unknown => None,
            },
            Cached::Log(_) => None,
        }
    }

    #[tokio::test]
    async fn a_fill_commits_when_nothing_intervened() {
        let c = cache();
        let t = c.ticket(&key("a"));
        assert!(c.commit_fill(key("a"), t, |_| Some(entry(1))).await);
        assert_eq!(ts_of(c.get(&key("a")).await), Some(1));
    }

    #[tokio::test]
    async fn a_fill_that_raced_a_write_is_rejected() {
        let c = cache();
        let t = c.ticket(&key("a"));
        // A write lands while the fill's read is in flight; the key was not cached.
        c.update(key("a"), |cur| cur).await;
        assert!(!c.commit_fill(key("a"), t, |_| Some(entry(1))).await);
        assert!(c.get(&key("a")).await.is_none());
        assert_eq!(c.stats().await.rejected_fills, 1);
    }

    #[tokio::test]
    async fn a_fill_that_raced_an_invalidation_of_everything_is_rejected() {
        let c = cache();
        let t = c.ticket(&key("a"));
        c.invalidate_all().await;
        assert!(!c.commit_fill(key("a"), t, |_| Some(entry(1))).await);
        let t = c.ticket(&key("b"));
        c.invalidate_namespace("other").await;
        assert!(
            !c.commit_fill(key("b"), t, |_| Some(entry(1))).await,
            "conservative: any namespace"
        );
    }

    #[tokio::test]
    async fn invalidations_remove_entries() {
        let c = cache();
        for k in ["a", "b"] {
            let t = c.ticket(&key(k));
            c.commit_fill(key(k), t, |_| Some(entry(1))).await;
        }
        let t = c.ticket(&CacheKey::log("t"));
        c.commit_fill(CacheKey::log("t"), t, |_| {
            Some(Cached::Log(Arc::new(TopicTail::at(3, 8))))
        })
        .await;
        c.invalidate(key("a")).await;
        assert!(c.get(&key("a")).await.is_none());
        assert!(c.get(&key("b")).await.is_some());
        c.invalidate_namespace("ns").await;
        assert!(c.get(&key("b")).await.is_none());
        assert!(c.get(&CacheKey::log("t")).await.is_some());
        c.invalidate_all().await;
        assert!(c.get(&CacheKey::log("t")).await.is_none());
    }

    #[tokio::test]
    async fn updates_apply_to_the_current_entry() {
        let c = cache();
        c.update(key("a"), |cur| cur).await;
        assert!(c.get(&key("a")).await.is_none(), "no entry is made up");
        let t = c.ticket(&key("a"));
        c.commit_fill(key("a"), t, |_| Some(entry(1))).await;
        c.update(key("a"), |cur| match cur {
            Some(Cached::Kv(v)) => Some(Cached::Kv(Arc::new(v.with_put(5, Bytes::new())))),
            other => other,
        })
        .await;
        assert_eq!(ts_of(c.get(&key("a")).await), Some(5));
    }

    #[tokio::test]
    async fn the_weight_is_bounded_by_max_bytes() {
        let c = Cache::new(&CacheConfig {
            max_bytes: 64 * 1024,
            ..CacheConfig::default()
        });
        for n in 0..1000 {
            let k = key(&n.to_string());
            let t = c.ticket(&k);
            let value = Bytes::from(vec![0u8; 1000]);
            c.commit_fill(k, t, |_| {
                Some(Cached::Kv(Arc::new(KeyVersions::from_fill(
                    vec![(1, value)],
                    true,
                ))))
            })
            .await;
        }
        let s = c.stats().await;
        assert!(s.weighted_bytes <= 64 * 1024, "{s:?}");
        assert!(s.entries < 1000 && s.evictions > 0, "{s:?}");
    }
}
