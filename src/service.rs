//! One request in, its replies out: the read path and the write path, where the stores
//! meet the cache.
//!
//! Reads look in the cache first, once: the connection's reader task looks and answers a
//! hit itself ([`Service::answer_from_cache`]); anything else goes on as a [`Pending`]
//! request carrying what the cache held. On a miss one request per key reads DynamoDB
//! (strongly consistent) and fills the cache, the others wait for it, all through the
//! cache's read-through (see [`crate::cache`] for why a fill that raced a write is never
//! stored). Writes go to DynamoDB first and, once it has
//! accepted them, update the cache before the client is answered; the daemon's writes to
//! one key run one at a time so the cache applies them in DynamoDB's order. A write that
//! failed after reaching DynamoDB may or may not have been applied, so it drops the key.
//!
//! Not cached, on purpose: namespace scans (`kv.scan`) read DynamoDB's `namespace_index`,
//! which is only eventually consistent, so what they read must never fill the cache; they
//! are rare (garbage collection) and served from DynamoDB. Log scans are served from the
//! cache when the topic's cached tail holds every entry asked for, and from DynamoDB
//! otherwise; short reads near the tail are added to the cached tail.
//!
//! Results that may be long (timestamps, scans) are produced as a stream of [`Items`]
//! pieces, each small enough for one frame.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ddbcached_protocol::{Items, Op, Reply, Request, RequestRef, Versioned};
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};

use crate::cache::{
    Cache, CacheKey, Cached, KeyBuf, KeyVersions, Known, Lookup, Queued, ReadOp, Served, TopicTail,
};
use crate::changes::Changes;
use crate::coherence::{Coherence, ItemKey};
use crate::config::Config;
use crate::fleet::Hints;
use crate::probe::Probe;
use crate::store::{KvStore, LogStore, StoreError, StoreTable};

/// MessagePack framing of one item (type tag and length) plus slack, so that summing
/// payload lengths with it never underestimates a frame.
const ITEM_OVERHEAD_BYTES: usize = 16;

/// What a request produces.
pub enum Outcome {
    /// A single reply frame.
    Reply(Reply),
    /// Pieces of a streamed result, in order; an error ends the stream.
    Stream(BoxStream<'static, Result<Items, StoreError>>),
}

/// A request the cache could not answer at once, with what the cache was found to hold,
/// so that the full path does not look again.
pub struct Pending {
    request: Request,
    lookup: Lookup,
}

impl Pending {
    /// A request that has not been looked up in the cache.
    fn new(request: Request) -> Pending {
        Pending {
            request,
            lookup: Lookup::Look,
        }
    }
}

/// The stores behind the socket, and the cache in front of them.
pub struct Service {
    kv: KvStore,
    log: LogStore,
    cache: Arc<Cache>,
    coherence: Arc<Coherence>,
    /// Answers the `health` request.
    probe: Arc<Probe>,
    /// In fleet mode, where acknowledged writes are announced to the other daemons.
    hints: Option<Hints>,
    fill_max_versions: u32,
    /// Longest wait for a key's lock (the DynamoDB operation timeout).
    lock_wait: Duration,
    /// Payload budget of one streamed piece: half a frame leaves room for the envelope.
    piece_bytes: usize,
    /// Where writes through the socket tell the DynamoDB API front's cache, when it
    /// holds a store's table too, before they are answered.
    changes: Arc<Changes>,
}

impl Service {
    /// A service over the stores, with `cache` in front of them kept coherent by the
    /// coherence of `changes` (the daemon builds these; see [`crate::daemon`]).
    pub fn new(
        kv: KvStore,
        log: LogStore,
        cache: Arc<Cache>,
        changes: Arc<Changes>,
        probe: Arc<Probe>,
        hints: Option<Hints>,
        config: &Config,
    ) -> Service {
        Service {
            kv,
            log,
            cache,
            coherence: changes.coherence().clone(),
            hints,
            fill_max_versions: config.cache.fill_max_versions,
            lock_wait: config.dynamodb.operation_timeout(),
            piece_bytes: config.server.max_frame_bytes / 2,
            changes,
            probe,
        }
    }

    /// The cache (its counters, and the invalidation interface for tests).
    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// The cache's coherence with the tables (freshness, echoes, flushes).
    pub fn coherence(&self) -> &Coherence {
        &self.coherence
    }

    /// The reply to a read the cache answers right now, without touching DynamoDB, or the
    /// request with what the cache holds for it when it needs the full path (a miss, a
    /// write, a scan, a bypass). Cheap enough to run in the connection's own task, which
    /// saves hits a task each; the one cache lookup of the request happens here. A hit
    /// allocates nothing: the request borrows from its frame, the key is looked up in its
    /// flat form written into `buf`, and the reply shares the cached value. `received`:
    /// when the request had arrived (freshness is judged as of then). The caller counts
    /// its hits, a batch at a time, with [`Service::hits_answered`].
    pub async fn answer_from_cache(
        &self,
        request: RequestRef<'_>,
        buf: &mut KeyBuf,
        received: tokio::time::Instant,
    ) -> Result<Reply, Pending> {
        let lookup = match &request {
            RequestRef::KvGet {
                ns,
                key,
                consistent,
                ..
            } => {
                self.lookup(StoreTable::Kv, buf.kv(ns, key), *consistent, received)
                    .await
            }
            RequestRef::KvLatestTs { ns, key } => {
                self.lookup(StoreTable::Kv, buf.kv(ns, key), false, received)
                    .await
            }
            RequestRef::LogPosition { topic } => {
                self.lookup(StoreTable::Log, buf.log(topic), false, received)
                    .await
            }
            RequestRef::Owned(_) => return Err(Pending::new(request.into_owned())),
        };
        let reply = match (&request, &lookup) {
            (RequestRef::KvGet { before, .. }, Lookup::Looked(Some(Cached::Kv(v)))) => {
                match v.latest(*before) {
                    Known::Yes(answer) => Some(Reply::Value(answer)),
                    Known::Unknown => None,
                }
            }
            (RequestRef::KvLatestTs { .. }, Lookup::Looked(Some(Cached::Kv(v)))) => {
                match v.latest_ts() {
                    Known::Yes(answer) => Some(Reply::Timestamp(answer)),
                    Known::Unknown => None,
                }
            }
            (RequestRef::LogPosition { .. }, Lookup::Looked(Some(Cached::Log(t)))) => {
                Some(Reply::Index(t.position()))
            }
            _ => None,
        };
        reply.ok_or_else(|| Pending {
            request: request.into_owned(),
            lookup,
        })
    }

    /// Counts `count` hits of `op` that a connection answered from the cache in one turn
    /// of its loop (the connection counts them as requests too).
    pub fn hits_answered(&self, op: Op, count: u64) {
        let read = match op {
            Op::KvGet => ReadOp::KvGet,
            Op::KvLatestTs => ReadOp::KvLatestTs,
            Op::LogPosition => ReadOp::LogPosition,
            // No other operation is answered by `answer_from_cache`.
            _ => return,
        };
        self.cache.record_many(read, Served::Hit, count);
    }

    /// Looks a key or topic of `table` (its flat form) up, unless its read must bypass
    /// the cache.
    async fn lookup(
        &self,
        table: StoreTable,
        flat: &[u8],
        consistent: bool,
        at: tokio::time::Instant,
    ) -> Lookup {
        if consistent || self.coherence.must_bypass_at(table, at) {
            return Lookup::Bypass;
        }
        Lookup::Looked(self.cache.get(flat).await)
    }

    /// `lookup`, or a bypass when the table's freshness is not proven.
    fn fresh(&self, lookup: Lookup, table: StoreTable) -> Lookup {
        match lookup {
            Lookup::Look if self.coherence.must_bypass(table) => Lookup::Bypass,
            other => other,
        }
    }

    /// Runs one request (never `Hello`, which the connection answers itself).
    pub async fn handle(&self, pending: Pending) -> Outcome {
        let Pending { request, lookup } = pending;
        let reply = match request {
            Request::Hello { .. } => Err(StoreError::InvalidArgument(
                "hello is only valid as the first frame of a connection".into(),
            )),
            Request::Ping => Ok(Reply::Done),
            Request::Health => {
                let health = self.probe.health();
                Ok(Reply::Health {
                    ready: health.ready,
                    detail: health.detail(),
                })
            }

            // Reads.
            Request::KvGet {
                ns,
                key,
                before,
                consistent,
            } => {
                let lookup = if consistent { Lookup::Bypass } else { lookup };
                self.kv_get(ns, key, before, lookup).await.map(Reply::Value)
            }
            Request::KvLatestTs { ns, key } => self
                .kv_latest_ts(ns, key, lookup)
                .await
                .map(Reply::Timestamp),
            Request::KvTimestamps { ns, key } => {
                return match self.kv_timestamps(ns, key, lookup).await {
                    Ok(ts) => self.pieces(ts, |_| 8, Items::Timestamps),
                    Err(e) => Outcome::Reply(error_reply(e)),
                };
            }
            Request::KvScan { ns, keys_only } => {
                return if keys_only {
                    match self.kv.scan_keys(&ns).await {
                        Ok(keys) => self.pieces(keys, |k| k.len(), Items::Keys),
                        Err(e) => Outcome::Reply(error_reply(e)),
                    }
                } else {
                    match self.kv.scan(&ns).await {
                        Ok(entries) => {
                            self.pieces(entries, |(k, v)| k.len() + v.len(), Items::Entries)
                        }
                        Err(e) => Outcome::Reply(error_reply(e)),
                    }
                };
            }
            Request::LogPosition { topic } => {
                self.log_position(topic, lookup).await.map(Reply::Index)
            }
            Request::LogScan { topic, from, until } => {
                return self.log_scan(topic, from, until).await
            }

            // Writes.
            Request::KvPut { ns, key, value, ts } => {
                self.kv_put(ns, key, value, ts).await.map(|()| Reply::Done)
            }
            Request::KvDelete { ns, key, marker } => {
                self.kv_delete(ns, key, marker).await.map(|()| Reply::Done)
            }
            Request::LogPut { topic, value } => self.log_put(topic, value).await.map(Reply::Index),
            Request::LogDelete { topic } => self.log_delete(topic).await.map(|()| Reply::Done),
        };
        Outcome::Reply(reply.unwrap_or_else(error_reply))
    }

    async fn kv_get(
        &self,
        ns: String,
        key: Bytes,
        before: Option<i64>,
        lookup: Lookup,
    ) -> Result<Option<Versioned>, StoreError> {
        let (versions, served) = self.key_versions(&ns, &key, lookup).await?;
        match versions.latest(before) {
            Known::Yes(answer) => {
                self.cache.record(ReadOp::KvGet, served);
                Ok(answer)
            }
            Known::Unknown => {
                self.cache.record(ReadOp::KvGet, uncached(served));
                self.kv.get_latest(&ns, &key, before).await
            }
        }
    }

    async fn kv_latest_ts(
        &self,
        ns: String,
        key: Bytes,
        lookup: Lookup,
    ) -> Result<Option<i64>, StoreError> {
        let (versions, served) = self.key_versions(&ns, &key, lookup).await?;
        match versions.latest_ts() {
            Known::Yes(answer) => {
                self.cache.record(ReadOp::KvLatestTs, served);
                Ok(answer)
            }
            Known::Unknown => {
                self.cache.record(ReadOp::KvLatestTs, uncached(served));
                self.kv.latest_ts(&ns, &key).await
            }
        }
    }

    async fn kv_timestamps(
        &self,
        ns: String,
        key: Bytes,
        lookup: Lookup,
    ) -> Result<Vec<i64>, StoreError> {
        let (versions, served) = self.key_versions(&ns, &key, lookup).await?;
        match versions.timestamps() {
            Known::Yes(answer) => {
                self.cache.record(ReadOp::KvTimestamps, served);
                Ok(answer)
            }
            Known::Unknown => {
                self.cache.record(ReadOp::KvTimestamps, uncached(served));
                self.kv.timestamps(&ns, &key).await
            }
        }
    }

    /// The key's versions, from the cache or read from DynamoDB (filling the cache).
    async fn key_versions(
        &self,
        ns: &str,
        key: &Bytes,
        lookup: Lookup,
    ) -> Result<(Arc<KeyVersions>, Served), StoreError> {
        let ck = CacheKey::kv(ns, key);
        let load = || async {
            let (newest, complete) = self
                .kv
                .newest_versions(ns, key, self.fill_max_versions)
                .await?;
            Ok::<_, StoreError>(Cached::Kv(Arc::new(KeyVersions::from_fill(
                newest, complete,
            ))))
        };
        let lookup = self.fresh(lookup, StoreTable::Kv);
        match self
            .cache
            .read_through(&ck, lookup, self.lock_wait, load)
            .await?
        {
            (Cached::Kv(versions), served) => Ok((versions, served)),
            (Cached::Log(_), _) => unreachable!("key-value keys only ever hold key versions"),
        }
    }

    async fn log_position(&self, topic: String, lookup: Lookup) -> Result<i64, StoreError> {
        let ck = CacheKey::log(&topic);
        let load = || async {
            let position = self.log.position(&topic).await?;
            Ok::<_, StoreError>(Cached::Log(Arc::new(TopicTail::at(
                position,
                self.cache.tail_capacity(),
            ))))
        };
        let lookup = self.fresh(lookup, StoreTable::Log);
        match self
            .cache
            .read_through(&ck, lookup, self.lock_wait, load)
            .await?
        {
            (Cached::Log(tail), served) => {
                self.cache.record(ReadOp::LogPosition, served);
                Ok(tail.position())
            }
            (Cached::Kv(_), _) => unreachable!("topics only ever hold topic tails"),
        }
    }

    async fn log_scan(&self, topic: String, from: i64, until: i64) -> Outcome {
        if self.coherence.must_bypass(StoreTable::Log) {
            self.cache.record(ReadOp::LogScan, Served::Bypass);
            return self.stream_values(self.log.scan(&topic, from, until));
        }
        let ck = CacheKey::log(&topic);
        let cached = match self.cache.get(&ck).await {
            Some(Cached::Log(t)) => Some(t),
            _ => None,
        };
        if let Some(Known::Yes(values)) = cached.as_ref().map(|t| t.scan(from, until)) {
            self.cache.record(ReadOp::LogScan, Served::Hit);
            return self.pieces(values, |v| v.len(), Items::Values);
        }
        self.cache.record(ReadOp::LogScan, Served::Miss);
        let near_tail = cached.is_some_and(|t| {
            from.max(1) > t.position() - self.cache.tail_capacity() as i64 && from <= until
        });
        if !near_tail {
            return self.stream_values(self.log.scan(&topic, from, until));
        }
        // A short read at the top of a cached topic: keep what it reads.
        let load = || self.log.scan(&topic, from, until).try_concat();
        let values: Vec<Bytes> = match self
            .cache
            .fill(&ck, load, |values, current| match current {
                Some(Cached::Log(t)) => Some(Cached::Log(Arc::new(t.with_read(from, values)))),
                other => other,
            })
            .await
        {
            Ok(values) => values,
            Err(e) => return Outcome::Reply(error_reply(e)),
        };
        self.pieces(values, |v| v.len(), Items::Values)
    }

    async fn kv_put(
        &self,
        ns: String,
        key: Bytes,
        value: Bytes,
        ts: i64,
    ) -> Result<(), StoreError> {
        let ck = CacheKey::kv(&ns, &key);
        let _writing = self.wait_for(self.cache.lock_write(&ck)).await?;
        let item = ItemKey::Kv(ns.clone(), key.clone(), ts);
        let result = self
            .coherence
            .own_write(item, &value, self.kv.put(&ns, &key, value.clone(), ts))
            .await;
        self.after_write(ck, &result, |_, current| match current {
            Some(Cached::Kv(v)) => Some(Cached::Kv(Arc::new(v.with_put(ts, value)))),
            _ => None,
        })
        .await;
        result
    }

    async fn kv_delete(
        &self,
        ns: String,
        key: Bytes,
        marker: Option<i64>,
    ) -> Result<(), StoreError> {
        let ck = CacheKey::kv(&ns, &key);
        let _writing = self.wait_for(self.cache.lock_write(&ck)).await?;
        let result = self.kv.delete(&ns, &key, marker).await;
        self.after_write(ck, &result, |_, current| match (current, marker) {
            // All versions are gone: the key's state is known exactly, cached or not.
            (_, None) => Some(Cached::Kv(Arc::new(KeyVersions::absent()))),
            (Some(Cached::Kv(v)), Some(_)) => Some(Cached::Kv(Arc::new(v.with_delete(marker)))),
            _ => None,
        })
        .await;
        result
    }

    async fn log_put(&self, topic: String, value: Bytes) -> Result<i64, StoreError> {
        let ck = CacheKey::log(&topic);
        let _writing = self.wait_for(self.cache.lock_write(&ck)).await?;
        let known = match self.cache.get(&ck).await {
            Some(Cached::Log(t)) => Some(t.position()),
            _ => None,
        };
        let result = self.log.put(&topic, value.clone(), known).await;
        if let Ok(index) = result {
            // The index is known only from the acknowledgement, so only then registered.
            self.coherence
                .note_write(ItemKey::Log(topic.clone(), index), &value);
            self.coherence
                .note_write(ItemKey::Counter(topic), &index.to_be_bytes());
        }
        let capacity = self.cache.tail_capacity();
        self.after_write(ck, &result, |&index, current| {
            // After the append the position is known exactly, cached or not.
            let tail = match current {
                Some(Cached::Log(t)) => t.with_entry(index, value),
                _ => TopicTail::at(index - 1, capacity).with_entry(index, value),
            };
            Some(Cached::Log(Arc::new(tail)))
        })
        .await;
        result
    }

    async fn log_delete(&self, topic: String) -> Result<(), StoreError> {
        let ck = CacheKey::log(&topic);
        let _writing = self.wait_for(self.cache.lock_write(&ck)).await?;
        let result = self.log.delete(&topic).await;
        let deleted = Cached::Log(Arc::new(TopicTail::deleted(self.cache.tail_capacity())));
        self.after_write(ck, &result, |_, _| Some(deleted)).await;
        result
    }

    /// Waits for a key's lock, no longer than the operation timeout: while DynamoDB
    /// stalls, requests to one key would otherwise queue, each waiting out every call
    /// before it. Past the wait the request fails having sent nothing.
    async fn wait_for<G>(&self, lock: impl Future<Output = G>) -> Result<G, StoreError> {
        tokio::time::timeout(self.lock_wait, lock)
            .await
            .map_err(|_| StoreError::Queued {
                waited_ms: self.lock_wait.as_millis() as u64,
            })
    }

    /// Brings the cache in line with a write's outcome: on success `change` applies it; on
    /// a failure that may have reached DynamoDB the key is dropped, since whether the write
    /// happened is unknown; a request refused before sending changes nothing.
    async fn after_write<T>(
        &self,
        key: CacheKey,
        result: &Result<T, StoreError>,
        change: impl FnOnce(&T, Option<Cached>) -> Option<Cached>,
    ) {
        let refused = matches!(
            result,
            Err(StoreError::InvalidArgument(_) | StoreError::ItemTooLarge { .. })
        );
        // In fleet mode the other daemons drop the key too, unless it surely did not change.
        if let Some(hints) = &self.hints {
            if !refused {
                hints.publish(key.clone());
            }
        }
        if !refused {
            self.changes.store_written(&key);
        }
        match result {
            Ok(done) => {
                self.cache
                    .update(key, |current| change(done, current))
                    .await
            }
            Err(_) if refused => {}
            Err(_) => self.cache.invalidate(key).await,
        }
    }

    /// A finished list as a stream of frame-sized pieces.
    fn pieces<T: Send + 'static>(
        &self,
        items: Vec<T>,
        size: impl Fn(&T) -> usize,
        wrap: fn(Vec<T>) -> Items,
    ) -> Outcome {
        let parts: Vec<Result<Items, StoreError>> = split(items, size, self.piece_bytes)
            .into_iter()
            .map(|p| Ok(wrap(p)))
            .collect();
        Outcome::Stream(stream::iter(parts).boxed())
    }

    /// DynamoDB pages of values as a stream of frame-sized pieces.
    fn stream_values(
        &self,
        pages: impl futures::Stream<Item = Result<Vec<Bytes>, StoreError>> + Send + 'static,
    ) -> Outcome {
        let budget = self.piece_bytes;
        Outcome::Stream(
            pages
                .flat_map(move |page| match page {
                    Ok(values) => stream::iter(
                        split(values, |v: &Bytes| v.len(), budget)
                            .into_iter()
                            .map(|p| Ok(Items::Values(p)))
                            .collect::<Vec<_>>(),
                    ),
                    Err(e) => stream::iter(vec![Err(e)]),
                })
                .boxed(),
        )
    }
}

impl From<Queued> for StoreError {
    fn from(q: Queued) -> StoreError {
        StoreError::Queued {
            waited_ms: q.waited.as_millis() as u64,
        }
    }
}

/// How a read the cache could not answer is counted.
fn uncached(served: Served) -> Served {
    match served {
        Served::Bypass => Served::Bypass,
        _ => Served::Miss,
    }
}

/// The error reply for a failed store call.
pub fn error_reply(e: StoreError) -> Reply {
    Reply::error(e.code(), e.to_string())
}

/// Splits a list into consecutive runs whose sizes (plus per-item overhead) stay within
/// `budget`; an item larger than the budget still goes, alone, so nothing is lost.
fn split<T>(items: Vec<T>, size: impl Fn(&T) -> usize, budget: usize) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    let mut current = Vec::new();
    let mut used = 0;
    for item in items {
        let s = size(&item) + ITEM_OVERHEAD_BYTES;
        if !current.is_empty() && used + s > budget {
            out.push(std::mem::take(&mut current));
            used = 0;
        }
        used += s;
        current.push(item);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn split_respects_budget_and_keeps_everything() {
        let items: Vec<usize> = (0..100).map(|i| i % 7 * 10).collect();
        let parts = split(items.clone(), |n| *n, 100);
        assert!(parts
            .iter()
            .all(|p| p.len() == 1 || p.iter().map(|n| n + 16).sum::<usize>() <= 100));
        assert_eq!(parts.concat(), items);
        // An oversized item travels alone.
        assert_eq!(split(vec![500, 1], |n| *n, 100), vec![vec![500], vec![1]]);
        assert!(split(Vec::<usize>::new(), |n| *n, 100).is_empty());
    }
}
