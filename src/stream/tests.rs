//! The tailer against the scripted fake, on tokio's paused clock: lineage, discovery,
//! pagination, lost iterators, trimmed records, a replaced stream, throttling.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::cache::{Cache, CacheKey, Cached, KeyVersions};
use crate::coherence::Coherence;
use crate::config::{CacheConfig, StreamsConfig};
use crate::store::StoreTable;
use crate::stream::api::{StartAt, StreamError};
use crate::stream::fake::FakeStreams;
use crate::stream::{FlushCause, TailStats, Tailer, MAX_BACKOFF};

struct Rig {
    fake: Arc<FakeStreams>,
    cache: Arc<Cache>,
    coherence: Arc<Coherence>,
    stats: Arc<TailStats>,
    tailer: Tailer<FakeStreams, Coherence>,
}

async fn rig(fake: FakeStreams) -> Rig {
    let fake = Arc::new(fake);
    let cache = Arc::new(Cache::new(&CacheConfig::default()));
    let coherence = Arc::new(Coherence::new(
        cache.clone(),
        CacheConfig::default().max_staleness_ms,
        metrics::Histogram::noop(),
    ));
    let stats = Arc::new(TailStats::default());
    let tailer = Tailer::start(
        fake.clone(),
        "t".into(),
        StoreTable::Kv,
        coherence.clone(),
        stats.clone(),
        StreamsConfig::default(),
    )
    .await
    .unwrap();
    Rig {
        fake,
        cache,
        coherence,
        stats,
        tailer,
    }
}

impl Rig {
    /// Records applied so far.
    fn applied(&self) -> u64 {
        self.stats.snapshot().records[StoreTable::Kv as usize]
            .iter()
            .sum()
    }

    /// Runs rounds until `done` holds (at most 10).
    async fn rounds_until(&mut self, done: impl Fn(&Rig) -> bool) -> usize {
        for n in 1..=10 {
            self.tailer.round().await;
            if done(self) {
                return n;
            }
        }
        panic!("not done after 10 rounds; reads: {:?}", self.fake.reads());
    }

    /// Caches key `k` of namespace "ns" as holding `v` at version 1.
    async fn cache_key(&self, k: &str, v: &str) -> CacheKey {
        let key = CacheKey::kv("ns", k.as_bytes());
        let t = self.cache.ticket(&key);
        let entry = KeyVersions::from_fill(vec![(1, Bytes::copy_from_slice(v.as_bytes()))], true);
        self.cache
            .commit_fill(key.clone(), t, |_| Some(Cached::Kv(Arc::new(entry))))
            .await;
        key
    }

    fn flushes(&self, cause: FlushCause) -> u64 {
        self.coherence.snapshot().flushes[cause as usize]
    }
}

#[tokio::test(start_paused = true)]
async fn start_takes_latest_positions() {
    let fake = FakeStreams::new("arn1");
    fake.add_shard("a", None);
    fake.put("a", "ns", b"k", 1, b"before start");
    let mut r = rig(fake).await;
    r.tailer.round().await;
    assert_eq!(
        r.applied(),
        0,
        "records older than the start are not replayed"
    );
    r.fake.put("a", "ns", b"k", 2, b"after");
    r.tailer.round().await;
    assert_eq!(r.applied(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_parent_is_read_to_its_end_before_its_child() {
    let fake = FakeStreams::new("arn1");
    fake.add_shard("a", None);
    let mut r = rig(fake).await;
    r.fake.put("a", "ns", b"k", 1, b"in parent");
    r.fake.close("a");
    r.fake.add_shard("b", Some("a"));
    r.fake.put("b", "ns", b"k", 2, b"in child");
    r.rounds_until(|r| r.applied() == 2).await;
    let reads = r.fake.reads();
    let last_parent = reads.iter().rposition(|s| s == "a").unwrap();
    let first_child = reads.iter().position(|s| s == "b").unwrap();
    assert!(last_parent < first_child, "{reads:?}");
}

#[tokio::test(start_paused = true)]
async fn a_split_reads_both_children_from_their_start() {
    let fake = FakeStreams::new("arn1");
    fake.add_shard("a", None);
    let mut r = rig(fake).await;
    r.fake.close("a");
    for child in ["b", "c"] {
        r.fake.add_shard(child, Some("a"));
        r.fake.put(child, "ns", child.as_bytes(), 1, b"v");
        r.fake.put(child, "ns", child.as_bytes(), 2, b"w");
    }
    r.rounds_until(|r| r.applied() == 4).await;
}

#[tokio::test(start_paused = true)]
async fn children_listed_late_are_found() {
    let fake = FakeStreams::new("arn1");
    fake.add_shard("a", None);
    let mut r = rig(fake).await;
    r.fake.close("a");
    // DescribeStream shows the closed parent without children for a while.
    r.fake.add_shard_listed_after("b", Some("a"), 3);
    r.fake.put("b", "ns", b"k", 1, b"v");
    let rounds = r.rounds_until(|r| r.applied() == 1).await;
    assert!(rounds >= 3, "found only once listed (round {rounds})");
}

#[tokio::test(start_paused = true)]
async fn an_orphaned_child_is_read_as_a_root() {
    let fake = FakeStreams::new("arn1");
    // The parent aged out of the listing.
    fake.add_shard("x", Some("gone"));
    let mut r = rig(fake).await;
    r.fake.put("x", "ns", b"k", 1, b"v");
    r.tailer.round().await;
    assert_eq!(r.applied(), 1);
    // A shard appearing later whose parent is unknown: read from its first record at the
    // next full discovery.
    r.fake.add_shard("y", Some("missing"));
    r.fake.put("y", "ns", b"k", 2, b"w");
    tokio::time::advance(StreamsConfig::default().discovery_interval()).await;
    r.rounds_until(|r| r.applied() == 2).await;
}

#[tokio::test(start_paused = true)]
async fn listings_longer_than_a_page_are_followed() {
    let fake = FakeStreams::new("arn1");
    for n in 0..250 {
        fake.add_shard(&format!("s{n:03}"), None);
    }
    let mut r = rig(fake).await;
    assert_eq!(r.stats.snapshot().shards[0], 250);
    r.fake.put("s230", "ns", b"k", 1, b"v");
    r.fake.put("s001", "ns", b"k", 2, b"v");
    r.tailer.round().await;
    assert_eq!(r.applied(), 2);
}

#[tokio::test(start_paused = true)]
async fn an_expired_iterator_resumes_after_the_last_record_applied() {
    let fake = FakeStreams::new("arn1");
    fake.add_shard("a", None);
    let mut r = rig(fake).await;
    r.fake.put("a", "ns", b"k", 1, b"r1");
    r.tailer.round().await;
    r.fake.put("a", "ns", b"k", 2, b"r2");
    r.fake.fail_next("a", [StreamError::ExpiredIterator]);
    r.tailer.round().await;
    r.fake.put("a", "ns", b"k", 3, b"r3");
    r.rounds_until(|r| r.applied() == 3).await;
    r.tailer.round().await;
    assert_eq!(r.applied(), 3, "nothing lost, nothing applied twice");
    assert_eq!(r.flushes(FlushCause::IteratorLost), 0);
}

#[tokio::test(start_paused = true)]
async fn a_resume_point_already_trimmed_flushes_and_restarts_from_the_horizon() {
    let fake = FakeStreams::new("arn1");
    fake.add_shard("a", None);
    let mut r = rig(fake).await;
    r.fake.put("a", "ns", b"k", 1, b"r1");
    r.tailer.round().await;
    let key = r.cache_key("k", "v").await;
    // The loop stalls past the iterator's life and the retention both.
    for ts in 2..=4 {
        r.fake.put("a", "ns", b"k", ts, b"later");
    }
    r.fake.trim("a", 1);
    r.fake.fail_next("a", [StreamError::ExpiredIterator]);
    r.tailer.round().await;
    r.tailer.round().await;
    assert_eq!(r.flushes(FlushCause::Trimmed), 1);
    assert!(r.cache.get(&key).await.is_none());
    r.rounds_until(|r| r.applied() == 2).await;
}

#[tokio::test(start_paused = true)]
async fn an_iterator_lost_before_any_record_flushes_and_restarts_at_latest() {
    let fake = FakeStreams::new("arn1");
    fake.add_shard("a", None);
    let mut r = rig(fake).await;
    let key = r.cache_key("k", "v").await;
    r.fake.fail_next("a", [StreamError::ExpiredIterator]);
    r.tailer.round().await;
    assert_eq!(r.flushes(FlushCause::IteratorLost), 1);
    assert!(r.cache.get(&key).await.is_none());
}

#[tokio::test(start_paused = true)]
async fn trimmed_records_flush_the_table_and_restart_from_the_horizon() {
    let fake = FakeStreams::new("arn1");
    fake.add_shard("a", None);
    let mut r = rig(fake).await;
    let key = r.cache_key("k", "v").await;
    let topic = CacheKey::log("topic");
    let t = r.cache.ticket(&topic);
    let tail = crate::cache::TopicTail::at(3, 8);
    r.cache
        .commit_fill(topic.clone(), t, |_| Some(Cached::Log(Arc::new(tail))))
        .await;
    r.fake.put("a", "ns", b"other", 1, b"v");
    r.fake.fail_next("a", [StreamError::Trimmed("gone".into())]);
    r.tailer.round().await;
    assert_eq!(r.flushes(FlushCause::Trimmed), 1);
    assert!(
        r.cache.get(&key).await.is_none(),
        "the key-value table's entries are dropped"
    );
    assert!(
        r.cache.get(&topic).await.is_some(),
        "the other table's stream is intact"
    );
    r.rounds_until(|r| r.applied() == 1).await;
    assert!(r.fake.state_calls_contain("iterator a TrimHorizon"));
}

#[tokio::test(start_paused = true)]
async fn a_replaced_stream_is_followed_and_flushes_the_table() {
    let fake = FakeStreams::new("arn1");
    fake.add_shard("a", None);
    let mut r = rig(fake).await;
    let key = r.cache_key("k", "v").await;
    r.fake.replace_stream("arn2", "z");
    tokio::time::advance(StreamsConfig::default().discovery_interval()).await;
    r.tailer.round().await;
    assert_eq!(r.flushes(FlushCause::StreamReplaced), 1);
    assert!(r.cache.get(&key).await.is_none());
    r.fake.put("z", "ns", b"k", 5, b"on the new stream");
    r.rounds_until(|r| r.applied() == 1).await;
}

#[tokio::test(start_paused = true)]
async fn sustained_throttling_backs_off_and_reads_bypass_until_caught_up() {
    let fake = FakeStreams::new("arn1");
    fake.add_shard("a", None);
    let mut r = rig(fake).await;
    r.tailer.round().await;
    assert!(
        !r.coherence.must_bypass(StoreTable::Kv),
        "caught up after a clean round"
    );

    r.fake.fail_next(
        "a",
        (0..12).map(|_| StreamError::Throttled("slow down".into())),
    );
    let mut pauses = Vec::new();
    for _ in 0..12 {
        r.tailer.round().await;
        let pause = r.tailer.backoff;
        pauses.push(pause);
        tokio::time::advance(pause).await;
    }
    assert!(pauses.windows(2).all(|w| w[1] >= w[0]), "{pauses:?}");
    assert_eq!(*pauses.last().unwrap(), MAX_BACKOFF);
    assert!(
        r.coherence.must_bypass(StoreTable::Kv),
        "behind past the staleness bound: bypass"
    );

    r.fake.put("a", "ns", b"k", 1, b"v");
    r.tailer.round().await;
    assert_eq!(r.tailer.backoff, Duration::ZERO);
    assert_eq!(r.applied(), 1);
    assert!(!r.coherence.must_bypass(StoreTable::Kv), "caught up again");
    // Start-up (bypassing until the first caught-up round) -> cache -> bypass -> cache.
    assert_eq!(r.coherence.snapshot().bypass_switches, 3);
}

#[tokio::test(start_paused = true)]
async fn an_echo_that_overtakes_the_cache_update_evicts_nothing() {
    let fake = FakeStreams::new("arn1");
    fake.add_shard("a", None);
    let mut r = rig(fake).await;
    let key = r.cache_key("k", "v1").await;
    // DynamoDB acknowledged this daemon's write of version 2; the cache update that
    // follows has not happened yet when the record arrives.
    r.coherence.note_write(
        crate::coherence::ItemKey::Kv("ns".into(), Bytes::from_static(b"k"), 2),
        b"v2",
    );
    r.fake.put("a", "ns", b"k", 2, b"v2");
    r.tailer.round().await;
    assert!(r.cache.get(&key).await.is_some(), "the echo kept the entry");
    // The same item with other content is someone else's write: the key goes.
    r.fake.put("a", "ns", b"k", 2, b"theirs");
    r.tailer.round().await;
    assert!(r.cache.get(&key).await.is_none());
}

/// A sink that refuses the first `refusals` pages of records and shard ends, and logs
/// what it accepts.
struct RefusingSink {
    refusals: std::sync::atomic::AtomicUsize,
    log: std::sync::Mutex<Vec<Accepted>>,
}

/// What a [`RefusingSink`] accepted.
#[derive(Clone, Debug, PartialEq)]
enum Accepted {
    Records {
        shard: String,
        after: StartAt,
        sequence_numbers: Vec<String>,
    },
    Ended(String),
}

impl RefusingSink {
    fn new(refusals: usize) -> Arc<RefusingSink> {
        Arc::new(RefusingSink {
            refusals: refusals.into(),
            log: Default::default(),
        })
    }

    fn log(&self) -> Vec<Accepted> {
        self.log.lock().unwrap().clone()
    }
}

impl crate::stream::sink::Sink for RefusingSink {
    type Table = StoreTable;

    async fn accept(
        &self,
        _table: StoreTable,
        seen: crate::stream::sink::Seen<'_>,
    ) -> Result<(), crate::stream::sink::SinkError> {
        use crate::stream::sink::Seen;
        use std::sync::atomic::Ordering;
        let entry = match seen {
            Seen::Records {
                shard,
                after,
                records,
            } => Accepted::Records {
                shard: shard.to_owned(),
                after: after.clone(),
                sequence_numbers: records.iter().map(|r| r.sequence_number.clone()).collect(),
            },
            Seen::ShardEnded { shard } => Accepted::Ended(shard.to_owned()),
            _ => return Ok(()),
        };
        if self.refusals.load(Ordering::Relaxed) > 0 {
            self.refusals.fetch_sub(1, Ordering::Relaxed);
            return Err(crate::stream::sink::SinkError("not now".into()));
        }
        self.log.lock().unwrap().push(entry);
        Ok(())
    }
}

async fn tailer_into(
    fake: &Arc<FakeStreams>,
    sink: &Arc<RefusingSink>,
    stats: &Arc<TailStats>,
) -> Tailer<FakeStreams, RefusingSink> {
    Tailer::start(
        fake.clone(),
        "t".into(),
        StoreTable::Kv,
        sink.clone(),
        stats.clone(),
        StreamsConfig::default(),
    )
    .await
    .unwrap()
}

#[tokio::test(start_paused = true)]
async fn records_a_sink_refuses_are_handed_over_again_not_skipped() {
    let fake = Arc::new(FakeStreams::new("arn1"));
    fake.add_shard("a", None);
    let (sink, stats) = (RefusingSink::new(2), Arc::new(TailStats::default()));
    let mut tailer = tailer_into(&fake, &sink, &stats).await;
    fake.put("a", "ns", b"k", 1, b"v1");
    fake.put("a", "ns", b"k", 2, b"v2");
    tailer.round().await;
    tailer.round().await;
    assert!(sink.log().is_empty());
    assert_eq!(
        stats.snapshot().records[0],
        [0, 0, 0],
        "nothing counted yet"
    );
    tailer.round().await;
    fake.put("a", "ns", b"k", 3, b"v3");
    tailer.round().await;
    // Each page once, the second from where the first ended.
    let log = sink.log();
    let [Accepted::Records {
        after: first_after,
        sequence_numbers: first,
        ..
    }, Accepted::Records {
        after: second_after,
        sequence_numbers: second,
        ..
    }] = &log[..]
    else {
        panic!("two pages: {log:?}");
    };
    assert_eq!(first_after, &StartAt::Latest);
    assert_eq!(first.len(), 2);
    assert_eq!(second_after, &StartAt::After(first[1].clone()));
    assert_eq!(second.len(), 1);
    assert_eq!(stats.snapshot().records[0].iter().sum::<u64>(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_shard_end_the_sink_refuses_holds_back_its_children() {
    let fake = Arc::new(FakeStreams::new("arn1"));
    fake.add_shard("a", None);
    let (sink, stats) = (RefusingSink::new(0), Arc::new(TailStats::default()));
    let mut tailer = tailer_into(&fake, &sink, &stats).await;
    fake.put("a", "ns", b"k", 1, b"in parent");
    tailer.round().await;
    fake.close("a");
    fake.add_shard("b", Some("a"));
    fake.put("b", "ns", b"k", 2, b"in child");
    sink.refusals.store(2, std::sync::atomic::Ordering::Relaxed);
    for _ in 0..6 {
        tailer.round().await;
    }
    let log = sink.log();
    let a_ended = Accepted::Ended("a".into());
    let ended = log
        .iter()
        .position(|l| *l == a_ended)
        .expect("the end, once accepted");
    let child = log
        .iter()
        .position(|l| matches!(l, Accepted::Records { shard, .. } if shard == "b"))
        .expect("the child's records");
    assert!(ended < child, "{log:?}");
    assert_eq!(log.iter().filter(|l| **l == a_ended).count(), 1, "{log:?}");
}

#[tokio::test(start_paused = true)]
async fn a_rounds_proof_is_dated_the_propagation_allowance_before_it_began() {
    let fake = FakeStreams::new("arn1");
    fake.add_shard("a", None);
    let mut r = rig(fake).await;
    let began = tokio::time::Instant::now();
    r.tailer.round().await;
    // A write acknowledged just before the round may not have been readable yet: the
    // proof covers writes up to `began - allowance` only.
    let (bound, allowance) = (
        CacheConfig::default().max_staleness_ms,
        StreamsConfig::default().propagation_allowance_ms,
    );
    let within = began + Duration::from_millis(bound - allowance - 10);
    let past = began + Duration::from_millis(bound - allowance + 10);
    assert!(!r.coherence.must_bypass_at(StoreTable::Kv, within));
    assert!(r.coherence.must_bypass_at(StoreTable::Kv, past));
}
