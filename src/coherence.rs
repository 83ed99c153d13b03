//! What a change in the tables means for this daemon's cache, whoever reports it: the
//! rules that keep cached answers correct against writes made elsewhere.
//!
//! - **Own writes** are registered here before they are sent (and again once DynamoDB
//!   has acknowledged them); the record of one that comes back is its *echo* and changes
//!   nothing: the cache holds the write already, or is about to (a record may overtake
//!   the cache update that follows the acknowledgement), so evicting would only cost a
//!   miss. Only the exact content counts (compared by digest, so that a change relayed
//!   from another host without its value is recognised too): a record of the same item
//!   with other content is someone else's write.
//! - **Any other change** is reconciled, never applied blindly: if the cached entry
//!   already shows it nothing happens, otherwise the key is dropped (and fills in flight
//!   are rejected), so the next read fetches DynamoDB's state. A record older than one of
//!   this daemon's later writes therefore cannot undo it.
//! - **Lost continuity** (records trimmed, a stream replaced, an iterator lost) flushes
//!   the table's entries: something was missed, and nobody knows what.
//! - **Freshness**: whoever reads the changes proves from time to time that every change
//!   made before an instant has reached this module; the oldest such proof is the
//!   table's freshness, and reads bypass the cache while it is older than
//!   `cache.max_staleness_ms`.
//!
//! Changes come from the stream tailer ([`crate::stream`]), which emits what it reads
//! into a [`Sink`] (this module is the sink that applies it to the local cache), or in
//! fleet mode from the relays through Redis ([`crate::fleet`]), whose consumer calls
//! [`Coherence::apply`], [`Coherence::flush`], [`Coherence::drop_key`] and
//! [`Coherence::fresh_as_of`] directly.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::time::Instant;

use crate::cache::{Cache, CacheKey, Cached};
use crate::freshness::{Freshness, Judged};
use crate::metrics::{Exposition, Kind};
use crate::store::StoreTable;
use crate::stream::change::{digest, Change, Digest};
use crate::stream::sink::{Seen, Sink, SinkError};
use crate::stream::FlushCause;

/// Own writes remembered until their records come back.
const ECHOES_REMEMBERED: usize = 4096;

/// An item this daemon wrote, to recognise its record when it comes back: a key-value
/// version, a log entry, or a topic's counter.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ItemKey {
    Kv(String, Bytes, i64),
    Log(String, i64),
    Counter(String),
}

/// The coherence of one daemon's cache with the tables.
pub struct Coherence {
    cache: Arc<Cache>,
    /// Per table (by [`StoreTable`]).
    freshness: Freshness,
    echoes: Mutex<Echoes>,
    /// Where the visibility lag of own writes is recorded.
    lag: metrics::Histogram,
    stats: Stats,
}

/// Own writes whose records have not come back yet: when each was acknowledged, and a
/// digest of what it wrote (cryptographic, so that whoever writes the tables cannot aim
/// a different value at it).
#[derive(Default)]
struct Echoes {
    written: HashMap<ItemKey, (Instant, Digest)>,
    order: VecDeque<ItemKey>,
}

#[derive(Default)]
struct Stats {
    invalidations: [AtomicU64; 2],
    flushes: [AtomicU64; FlushCause::ALL.len()],
    bypass_switches: AtomicU64,
}

/// A snapshot of the coherence counters and state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CoherenceSnapshot {
    /// Keys dropped because a change showed news, per table.
    pub invalidations: [u64; 2],
    /// Whole-table invalidations by [`FlushCause`].
    pub flushes: [u64; FlushCause::ALL.len()],
    /// Switches between serving from the cache and bypassing it, both ways.
    pub bypass_switches: u64,
    pub bypassing: [bool; 2],
    /// Seconds since each table was last proven fresh (`None`: never).
    pub seconds_since_caught_up: [Option<f64>; 2],
}

impl Coherence {
    /// `lag` receives the visibility lag of each own write whose record comes back.
    pub fn new(cache: Arc<Cache>, max_staleness_ms: u64, lag: metrics::Histogram) -> Coherence {
        Coherence {
            cache,
            freshness: Freshness::new(StoreTable::ALL.len(), max_staleness_ms),
            echoes: Mutex::default(),
            lag,
            stats: Stats::default(),
        }
    }

    /// Whether reads of `table` must bypass the cache: nobody has proven it fresh within
    /// the staleness bound. Logs and counts each switch.
    pub fn must_bypass(&self, table: StoreTable) -> bool {
        self.must_bypass_at(table, Instant::now())
    }

    /// [`Coherence::must_bypass`] for reads received by `at`: judging them as of `at`
    /// (earlier than now) is safe, since they began no later. A connection answers a
    /// batch of reads with one clock read.
    pub fn must_bypass_at(&self, table: StoreTable, at: Instant) -> bool {
        let Judged { stale, switched } = self.freshness.judge(table as usize, at);
        if switched {
            self.stats.bypass_switches.fetch_add(1, Ordering::Relaxed);
            if stale {
                tracing::warn!(
                    table = table.name(),
                    max_staleness_ms = self.freshness.max_staleness_ms(),
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

    /// Runs an own write of `item` with `content`, registered before it is sent (DynamoDB
    /// makes the record visible before its acknowledgement arrives here) and again once
    /// acknowledged (to time the record's return from then); a failed write is forgotten.
    pub async fn own_write<T, E>(
        &self,
        item: ItemKey,
        content: &[u8],
        write: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let digest = digest(content);
        self.note_digest(item.clone(), digest);
        let result = write.await;
        match &result {
            Ok(_) => self.note_digest(item, digest),
            Err(_) => self.forget_write(&item),
        }
        result
    }

    /// Remembers an acknowledged write of `content` (a value, or a counter's bytes), to
    /// recognise its record when it comes back and to time it.
    pub fn note_write(&self, item: ItemKey, content: &[u8]) {
        self.note_digest(item, digest(content));
    }

    fn note_digest(&self, item: ItemKey, digest: Digest) {
        let mut e = self.echoes.lock().expect("echo map poisoned");
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
    fn forget_write(&self, item: &ItemKey) {
        self.echoes
            .lock()
            .expect("echo map poisoned")
            .written
            .remove(item);
    }

    /// Whether `change` is the echo of one of this daemon's writes (then it times its
    /// return).
    fn is_echo(&self, change: &Change) -> bool {
        let (item, content): (ItemKey, Digest) = match change {
            Change::KvVersion {
                ns,
                key,
                ts,
                value: Some(v),
            } => (ItemKey::Kv(ns.clone(), key.clone(), *ts), v.digest()),
            Change::LogEntry {
                topic,
                index,
                value: Some(v),
            } => (ItemKey::Log(topic.clone(), *index), v.digest()),
            Change::LogCounter {
                topic,
                position: Some(p),
            } => (ItemKey::Counter(topic.clone()), digest(&p.to_be_bytes())),
            _ => return false,
        };
        let mut e = self.echoes.lock().expect("echo map poisoned");
        match e.written.get(&item) {
            Some((at, d)) if *d == content => {
                self.lag.record(at.elapsed().as_secs_f64());
                e.written.remove(&item);
                true
            }
            _ => false,
        }
    }

    /// Brings the cache in line with a change of `table`; returns whether a cached entry
    /// was dropped.
    pub async fn apply(&self, table: StoreTable, change: &Change) -> bool {
        if self.is_echo(change) {
            return false;
        }
        let dropped = self
            .cache
            .reconcile(cache_key(change), |cached| reflected_by(change, cached))
            .await;
        if dropped {
            self.stats.invalidations[table as usize].fetch_add(1, Ordering::Relaxed);
        }
        dropped
    }

    /// Someone changed `key` (a write hint from another daemon, which does not say how):
    /// the entry is dropped and fills in flight are rejected.
    pub async fn drop_key(&self, table: StoreTable, key: CacheKey) {
        if self.cache.reconcile(key, |_| false).await {
            self.stats.invalidations[table as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Continuity lost: forgets everything cached from `table` (the other table is
    /// unaffected).
    pub async fn flush(&self, table: StoreTable, cause: FlushCause) {
        tracing::warn!(
            table = table.name(),
            cause = cause.name(),
            "continuity lost: invalidating the table's cache"
        );
        self.stats.flushes[cause as usize].fetch_add(1, Ordering::Relaxed);
        match table {
            StoreTable::Kv => self.cache.invalidate_keys().await,
            StoreTable::Log => self.cache.invalidate_topics().await,
        }
    }

    /// Every change of `table` made before `as_of` has been applied (`None`: not proven).
    pub fn fresh_as_of(&self, table: StoreTable, as_of: Option<Instant>) {
        self.freshness.set(table as usize, as_of);
    }

    /// Writes the counters into a scrape. Whether each table bypasses is judged now, not
    /// left as the last read found it, so that a scrape shows it while nobody reads.
    pub fn export(&self, out: &mut Exposition) {
        for table in StoreTable::ALL {
            self.must_bypass(table);
        }
        let s = self.snapshot();
        out.by_label(
            "ddbcached_stream_invalidations_total",
            Kind::Counter,
            "Cached entries dropped by stream records, by table.",
            "table",
            StoreTable::ALL.map(|t| (t.name(), s.invalidations[t as usize])),
        );
        out.by_label(
            "ddbcached_stream_flushes_total",
            Kind::Counter,
            "Whole-table invalidations after lost stream continuity, by cause.",
            "cause",
            FlushCause::ALL.map(|c| (c.name(), s.flushes[c as usize])),
        );
        out.single(
            "ddbcached_stream_bypass_switches_total",
            Kind::Counter,
            "Switches between serving from the cache and bypassing it.",
            s.bypass_switches,
        );
        out.by_label(
            "ddbcached_stream_bypassing",
            Kind::Gauge,
            "1 while reads of the table bypass the cache (tailer behind the staleness bound).",
            "table",
            StoreTable::ALL.map(|t| (t.name(), u8::from(s.bypassing[t as usize]))),
        );
        out.by_label(
            "ddbcached_stream_seconds_since_caught_up",
            Kind::Gauge,
            "Age of the table's last proof of being caught up (absent before the first).",
            "table",
            StoreTable::ALL
                .into_iter()
                .filter_map(|t| Some((t.name(), s.seconds_since_caught_up[t as usize]?))),
        );
    }

    /// The counters.
    pub fn snapshot(&self) -> CoherenceSnapshot {
        let s = &self.stats;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CoherenceSnapshot {
            invalidations: [0, 1].map(|t| load(&s.invalidations[t])),
            flushes: FlushCause::ALL.map(|c| load(&s.flushes[c as usize])),
            bypass_switches: load(&s.bypass_switches),
            bypassing: [0, 1].map(|t| self.freshness.bypassing(t)),
            seconds_since_caught_up: [0, 1].map(|t| self.freshness.seconds_since(t)),
        }
    }
}

/// The cache key the change concerns.
fn cache_key(change: &Change) -> CacheKey {
    match change {
        Change::KvVersion { ns, key, .. } | Change::KvUnknown { ns, key, .. } => {
            CacheKey::kv(ns, key)
        }
        Change::LogEntry { topic, .. } | Change::LogCounter { topic, .. } => CacheKey::log(topic),
    }
}

/// Whether the cached value already shows this change.
fn reflected_by(change: &Change, cached: &Cached) -> bool {
    match (change, cached) {
        (
            Change::KvVersion {
                ts, value: Some(v), ..
            },
            Cached::Kv(e),
        ) => e.reflects_put(*ts, |cached| v.matches(cached)),
        (
            Change::KvVersion {
                ts, value: None, ..
            },
            Cached::Kv(e),
        ) => e.reflects_removal(*ts),
        (
            Change::LogEntry {
                index,
                value: Some(v),
                ..
            },
            Cached::Log(t),
        ) => t.reflects_entry(*index, |cached| v.matches(cached)),
        (Change::LogEntry { value: None, .. }, Cached::Log(t))
        | (Change::LogCounter { position: None, .. }, Cached::Log(t)) => t.reflects_deletion(),
        (
            Change::LogCounter {
                position: Some(p), ..
            },
            Cached::Log(t),
        ) => t.reflects_position(*p),
        _ => false,
    }
}

/// Applying what a tailer read to the local cache.
impl Sink for Coherence {
    type Table = StoreTable;

    async fn accept(&self, table: StoreTable, seen: Seen<'_>) -> Result<(), SinkError> {
        match seen {
            Seen::Records { records, .. } => {
                for record in records {
                    // Items this daemon does not write (another layout) are never cached.
                    if let Some(change) = Change::of(table, record) {
                        self.apply(table, &change).await;
                    }
                }
            }
            // Nothing to do locally: the next shards' records follow.
            Seen::ShardEnded { .. } => {}
            Seen::ContinuityLost(cause) => self.flush(table, cause).await,
            Seen::CaughtUp(as_of) => self.fresh_as_of(table, as_of),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{CacheKey, Cached, KeyVersions, TopicTail};
    use crate::config::CacheConfig;
    use crate::stream::change::Content;

    fn coherence() -> (Arc<Cache>, Coherence) {
        let cache = Arc::new(Cache::new(&CacheConfig::default()));
        let c = Coherence::new(cache.clone(), 2000, metrics::Histogram::noop());
        (cache, c)
    }

    fn kv(ts: i64, value: Option<&'static [u8]>) -> Change {
        Change::KvVersion {
            ns: "ns".into(),
            key: Bytes::from_static(b"k"),
            ts,
            value: value.map(|v| Content::Bytes(Bytes::from_static(v))),
        }
    }

    async fn fill(cache: &Cache, key: &CacheKey, entry: Cached) {
        let t = cache.ticket(key);
        assert!(cache.commit_fill(key.clone(), t, |_| Some(entry)).await);
    }

    #[tokio::test]
    async fn changes_the_cache_shows_keep_the_entry_and_news_drop_it() {
        let (cache, c) = coherence();
        let key = CacheKey::kv("ns", b"k");
        let entry = KeyVersions::from_fill(vec![(5, Bytes::from_static(b"v"))], true);
        fill(&cache, &key, Cached::Kv(Arc::new(entry))).await;
        assert!(
            !c.apply(StoreTable::Kv, &kv(5, Some(b"v"))).await,
            "shown already"
        );
        assert!(cache.get(&key).await.is_some());
        assert!(c.apply(StoreTable::Kv, &kv(5, Some(b"w"))).await);
        assert!(cache.get(&key).await.is_none());
        // An uncached key: nothing to drop, but fills in flight are rejected.
        let t = cache.ticket(&key);
        assert!(!c.apply(StoreTable::Kv, &kv(5, Some(b"w"))).await);
        assert!(!cache.commit_fill(key.clone(), t, |_| None).await);
        assert_eq!(c.snapshot().invalidations, [1, 0]);

        let topic = CacheKey::log("t");
        let tail = TopicTail::at(0, 8)
            .with_entry(1, Bytes::from_static(b"e1"))
            .with_entry(2, Bytes::from_static(b"e2"));
        fill(&cache, &topic, Cached::Log(Arc::new(tail))).await;
        let entry = |index, v: &'static [u8]| Change::LogEntry {
            topic: "t".into(),
            index,
            value: Some(Content::Bytes(Bytes::from_static(v))),
        };
        let counter = |p| Change::LogCounter {
            topic: "t".into(),
            position: Some(p),
        };
        for shown in [entry(1, b"e1"), counter(1), counter(2)] {
            assert!(!c.apply(StoreTable::Log, &shown).await, "{shown:?}");
        }
        assert!(c.apply(StoreTable::Log, &entry(3, b"e3")).await);
    }

    #[tokio::test]
    async fn an_own_write_is_an_echo_once_and_only_with_its_content() {
        let (cache, c) = coherence();
        let key = CacheKey::kv("ns", b"k");
        let item = ItemKey::Kv("ns".into(), Bytes::from_static(b"k"), 7);
        let written: Result<(), ()> = c.own_write(item.clone(), b"mine", async { Ok(()) }).await;
        assert!(written.is_ok());
        // The cache holds an older state: a foreign record would drop it, the echo not.
        let old = KeyVersions::from_fill(vec![(1, Bytes::from_static(b"old"))], true);
        fill(&cache, &key, Cached::Kv(Arc::new(old.clone()))).await;
        assert!(!c.apply(StoreTable::Kv, &kv(7, Some(b"mine"))).await);
        assert!(cache.get(&key).await.is_some());
        // Recognised once: the same record again is news to reconcile.
        assert!(c.apply(StoreTable::Kv, &kv(7, Some(b"mine"))).await);
        // Another content for the same item is someone else's write.
        fill(&cache, &key, Cached::Kv(Arc::new(old.clone()))).await;
        c.note_write(item.clone(), b"mine");
        assert!(c.apply(StoreTable::Kv, &kv(7, Some(b"theirs"))).await);
        // A failed write leaves nothing to recognise.
        fill(&cache, &key, Cached::Kv(Arc::new(old))).await;
        let item = ItemKey::Kv("ns".into(), Bytes::from_static(b"k"), 8);
        let failed: Result<(), ()> = c.own_write(item, b"lost", async { Err(()) }).await;
        assert!(failed.is_err());
        assert!(c.apply(StoreTable::Kv, &kv(8, Some(b"lost"))).await);
    }

    #[tokio::test]
    async fn freshness_follows_the_proofs_and_a_flush_drops_one_table() {
        let (cache, c) = coherence();
        assert!(c.must_bypass(StoreTable::Kv), "no proof yet");
        c.fresh_as_of(StoreTable::Kv, Some(Instant::now()));
        assert!(!c.must_bypass(StoreTable::Kv));
        assert!(c.must_bypass(StoreTable::Log));
        c.fresh_as_of(StoreTable::Kv, None);
        assert!(c.must_bypass(StoreTable::Kv));
        assert_eq!(c.snapshot().bypass_switches, 2);

        let key = CacheKey::kv("ns", b"k");
        let topic = CacheKey::log("t");
        fill(&cache, &key, Cached::Kv(Arc::new(KeyVersions::absent()))).await;
        fill(&cache, &topic, Cached::Log(Arc::new(TopicTail::at(0, 8)))).await;
        c.accept(StoreTable::Kv, Seen::ContinuityLost(FlushCause::Trimmed))
            .await
            .unwrap();
        assert!(cache.get(&key).await.is_none());
        assert!(cache.get(&topic).await.is_some(), "the other table is kept");
        assert_eq!(c.snapshot().flushes[FlushCause::Trimmed as usize], 1);
        assert_eq!(c.snapshot().flushes.iter().sum::<u64>(), 1);
    }
}
