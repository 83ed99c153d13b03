//! The relay: a daemon that holds one of a table's lease slots reads the table's stream
//! with the ordinary tailer and publishes what it reads to the table's Redis stream
//! instead of applying it ([`Publisher`] is the tailer's sink). Every daemon, relays
//! included, applies changes only from Redis ([`super::consumer`]).
//!
//! [`run`] competes for a slot. Only the holder of slot 0 publishes, so that every change
//! goes out once; the holder of another slot stands by: it renews its lease, reads no
//! stream, and takes slot 0 over once the publisher's lease has lapsed. The publisher
//! renews its lease every third of `lease_ms`, writing the positions it has had
//! acknowledged by Redis as the lease's checkpoints. A new holder resumes after those checkpoints (a restarted relay
//! may publish some records twice, which is harmless), and reads shards its predecessor
//! saw no record of from their first record; a lease never renewed on this stream (new,
//! or of a replaced stream) starts from LATEST after publishing a reset, since what
//! happened before is unknown. A relay that cannot renew within `lease_ms` stops
//! reading, as the others may have taken its slot by then; one whose entries Redis has
//! refused for that long gives the lease up to a daemon that may reach Redis better.
//! Watermarks go out at most every quarter of the staleness bound: every host receives
//! each one, and a quiet table needs no proof every poll round.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::entry::{wall_ms, Codec, Entry, Event, Fact, Prev};
use super::lease::{lease_id, Lease, Leases};
use super::transport::{Connection, Redis};
use super::FleetStats;
use crate::api::cache::ApiCache;
use crate::config::{FleetConfig, StreamsConfig};
use crate::registry::{Table, Users};
use crate::stream::api::{Record, SdkStreams, StartAt, StreamsApi};
use crate::stream::change::Change;
use crate::stream::sink::{Seen, Sink, SinkError};
use crate::stream::{FlushCause, TailStats, Tailer};

/// The tailer's sink in a relay: publishes each thing seen as one numbered entry.
pub struct Publisher {
    redis: Redis,
    /// The connection, made again after any failure (a restarted Redis breaks it).
    connection: tokio::sync::Mutex<Option<Connection>>,
    key: String,
    /// This daemon's incarnation number.
    relay: u64,
    epoch: u64,
    /// The table's place in the fleet's list.
    index: usize,
    /// The DynamoDB API front's cache, which reads the keys of its tables' records.
    api: Option<Arc<ApiCache>>,
    /// The next entry's number. A failed append consumes its number too: had it been
    /// written after all, reusing the number would make the next entry a "repeat".
    next: AtomicU64,
    /// Per shard, the last sequence number Redis acknowledged.
    positions: Mutex<BTreeMap<String, String>>,
    /// Per shard, the last sequence number of this publisher's own last batch: the next
    /// batch reading on from it says [`Prev::Same`] instead of repeating it.
    followed: Mutex<HashMap<String, String>>,
    /// Since when Redis has refused every entry (`None`: it took the last one).
    failing_since: Mutex<Option<Instant>>,
    /// The least time between two watermarks, and when the last one was published: a
    /// quiet table needs no proof every poll round, and every host receives each one.
    watermark_every: Duration,
    last_watermark: Mutex<Option<Instant>>,
    codec: Codec,
    retention_ms: u64,
    stats: Arc<FleetStats>,
}

impl Publisher {
    async fn publish(&self, event: Event) -> Result<(), SinkError> {
        let entry = Entry::Relay {
            relay: self.relay,
            epoch: self.epoch,
            n: self.next.fetch_add(1, Ordering::Relaxed),
            event,
        };
        let fields = self.codec.encode(&entry);
        let keep_after = wall_ms().saturating_sub(self.retention_ms);
        let mut connection = self.connection.lock().await;
        let appended = match connection.as_mut() {
            Some(c) => c.append(&self.key, &fields, keep_after).await,
            None => match self.redis.connect(None).await {
                Ok(mut c) => {
                    let appended = c.append(&self.key, &fields, keep_after).await;
                    *connection = Some(c);
                    appended
                }
                Err(e) => Err(e),
            },
        };
        match appended {
            Ok(_) => {
                self.stats
                    .published
                    .of(self.index)
                    .fetch_add(1, Ordering::Relaxed);
                *self.failing_since.lock().expect("clock poisoned") = None;
                Ok(())
            }
            Err(e) => {
                *connection = None;
                self.failing_since
                    .lock()
                    .expect("clock poisoned")
                    .get_or_insert_with(Instant::now);
                self.stats.redis_errors.fetch_add(1, Ordering::Relaxed);
                Err(SinkError(format!("publishing to Redis: {e}")))
            }
        }
    }

    /// How long Redis has refused every entry (zero if it took the last one).
    fn failing_for(&self) -> Duration {
        self.failing_since
            .lock()
            .expect("clock poisoned")
            .map_or(Duration::ZERO, |since| since.elapsed())
    }

    /// What Redis has acknowledged of each shard.
    pub fn positions(&self) -> BTreeMap<String, String> {
        self.positions.lock().expect("positions poisoned").clone()
    }
}

impl Publisher {
    /// What a record tells each of the table's users: a store's change, and the API
    /// front's item change.
    fn facts(&self, users: Users, record: &Record) -> impl Iterator<Item = Fact> {
        let store = users
            .store
            .and_then(|t| Change::of(t, record))
            .map(|c| Fact::from(&c));
        let api = self
            .api
            .as_ref()
            .zip(users.api)
            .map(|(cache, id)| Fact::from(cache.change_of(id, record)));
        store.into_iter().chain(api)
    }
}

impl Sink for Publisher {
    type Table = Users;

    async fn accept(&self, table: Users, seen: Seen<'_>) -> Result<(), SinkError> {
        match seen {
            Seen::Records {
                shard,
                after,
                records,
            } => {
                let Some(last) = records.last() else {
                    return Ok(());
                };
                let facts = records.iter().flat_map(|r| self.facts(table, r)).collect();
                let follows_own = match after {
                    StartAt::After(seq) => {
                        self.followed.lock().expect("followed poisoned").get(shard) == Some(seq)
                    }
                    _ => false,
                };
                self.publish(Event::Batch {
                    shard: shard.to_owned(),
                    prev: if follows_own {
                        Prev::Same
                    } else {
                        after.into()
                    },
                    last: last.sequence_number.clone(),
                    facts,
                })
                .await?;
                self.positions
                    .lock()
                    .expect("positions poisoned")
                    .insert(shard.to_owned(), last.sequence_number.clone());
                self.followed
                    .lock()
                    .expect("followed poisoned")
                    .insert(shard.to_owned(), last.sequence_number.clone());
            }
            Seen::ShardEnded { shard } => {
                self.publish(Event::End {
                    shard: shard.to_owned(),
                })
                .await?;
                self.positions
                    .lock()
                    .expect("positions poisoned")
                    .remove(shard);
                self.followed
                    .lock()
                    .expect("followed poisoned")
                    .remove(shard);
            }
            Seen::ContinuityLost(cause) => {
                self.publish(Event::Reset {
                    cause: cause.name().into(),
                })
                .await?;
            }
            Seen::CaughtUp(Some(at)) => {
                let due = self
                    .last_watermark
                    .lock()
                    .expect("clock poisoned")
                    .is_none_or(|last| last.elapsed() >= self.watermark_every);
                if due {
                    let t_ms = wall_ms().saturating_sub(at.elapsed().as_millis() as u64);
                    let shards = self.positions();
                    self.publish(Event::Watermark { t_ms, shards }).await?;
                    *self.last_watermark.lock().expect("clock poisoned") = Some(Instant::now());
                }
            }
            Seen::CaughtUp(None) => {}
        }
        Ok(())
    }
}

/// What a relay needs, shared by the tables' relay tasks.
pub struct Relaying {
    /// This daemon's id, as lease owner.
    pub me: String,
    /// This daemon's incarnation number, naming it in entries.
    pub incarnation: u64,
    pub redis: Redis,
    pub leases: Leases,
    pub streams: Arc<SdkStreams>,
    pub tail_stats: Arc<TailStats>,
    pub streams_config: StreamsConfig,
    pub fleet: FleetConfig,
    /// The least time between two watermarks of a relay.
    pub watermark_every: Duration,
    pub codec: Codec,
    pub api: Option<Arc<ApiCache>>,
    pub stats: Arc<FleetStats>,
}

/// The slot whose holder publishes; the others stand by.
const PUBLISHER: u32 = 0;

/// Competes for one of `table`'s slots until `shutdown`: publishing to the Redis stream
/// `key` while it holds slot 0, standing by to take slot 0 over while it holds another.
pub async fn run(
    ctx: Arc<Relaying>,
    index: usize,
    table: Table,
    key: String,
    shutdown: CancellationToken,
) {
    let table_name = &table.name;
    let period = ctx.fleet.lease() / 3;
    // Per slot: the counter last seen and since when (on this host's clock).
    let mut observed: HashMap<u32, (u64, Instant)> = HashMap::new();
    loop {
        if let Some((slot, lease)) = acquire(&ctx, table_name, &mut observed).await {
            ctx.stats.lease_changes.fetch_add(1, Ordering::Relaxed);
            tracing::info!(table = %table_name, lease = %lease.id, epoch = lease.epoch, "relay lease taken");
            ctx.stats
                .leases_held
                .of(index)
                .fetch_add(1, Ordering::Relaxed);
            let publishing = match slot {
                PUBLISHER => Some(lease),
                _ => stand_by(&ctx, table_name, lease, &mut observed, &shutdown).await,
            };
            if let Some(lease) = publishing {
                ctx.stats.publishing.of(index).store(1, Ordering::Relaxed);
                hold(&ctx, index, &table, &key, lease, &shutdown).await;
                ctx.stats.publishing.of(index).store(0, Ordering::Relaxed);
            }
            ctx.stats
                .leases_held
                .of(index)
                .fetch_sub(1, Ordering::Relaxed);
            ctx.stats.lease_changes.fetch_add(1, Ordering::Relaxed);
            observed.clear();
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
    }
}

/// Takes a free, released or expired slot, if there is one, and says which. With a
/// standby slot, the publisher's lapsed lease is left to the standby for another
/// `lease_ms`: a fleet of many daemons does not race for it, and it is taken here only
/// if the standby is gone too.
async fn acquire(
    ctx: &Relaying,
    table_name: &str,
    observed: &mut HashMap<u32, (u64, Instant)>,
) -> Option<(u32, Lease)> {
    for slot in 0..ctx.fleet.relay_slots {
        let patience = match slot {
            PUBLISHER if ctx.fleet.relay_slots > 1 => ctx.fleet.lease() * 2,
            _ => ctx.fleet.lease(),
        };
        match take_if_lapsed(ctx, &lease_id(table_name, slot), slot, patience, observed).await {
            Ok(Some(lease)) => return Some((slot, lease)),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(table = %table_name, slot, error = %e, "reading the relay lease failed")
            }
        }
    }
    None
}

/// Takes the lease `id` (of `slot`) if it is missing, released, or its counter has not
/// moved for `patience` on this host's clock; `None` if it is held, or another daemon
/// took it first.
async fn take_if_lapsed(
    ctx: &Relaying,
    id: &str,
    slot: u32,
    patience: Duration,
    observed: &mut HashMap<u32, (u64, Instant)>,
) -> Result<Option<Lease>, crate::store::StoreError> {
    match ctx.leases.read(id).await? {
        None => ctx.leases.create(id, &ctx.me).await,
        Some(lease) => {
            let now = Instant::now();
            let since = match observed.get(&slot) {
                Some(&(counter, since)) if counter == lease.counter => since,
                _ => {
                    observed.insert(slot, (lease.counter, now));
                    now
                }
            };
            if lease.owner.is_empty() || now.duration_since(since) >= patience {
                ctx.leases.take(&lease, &ctx.me).await
            } else {
                Ok(None)
            }
        }
    }
}

/// Holds a standby slot: renews it, reads nothing, and watches the publisher's lease.
/// Once that lease has lapsed (released, or not renewed for `lease_ms` on this host's
/// clock) it is taken over and returned, the standby slot released for another daemon;
/// `None` if the standby lease is lost or on shutdown.
async fn stand_by(
    ctx: &Relaying,
    table_name: &str,
    mut lease: Lease,
    observed: &mut HashMap<u32, (u64, Instant)>,
    shutdown: &CancellationToken,
) -> Option<Lease> {
    let period = ctx.fleet.lease() / 3;
    let publisher = lease_id(table_name, PUBLISHER);
    let mut renewed = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(period) => {}
        }
        let arn = lease.stream_arn.clone().unwrap_or_default();
        match ctx
            .leases
            .renew(&lease, &arn, &lease.checkpoints, false)
            .await
        {
            Ok(Some(l)) => {
                lease = l;
                renewed = Instant::now();
            }
            Ok(None) => {
                tracing::warn!(table = %table_name, lease = %lease.id, "standby lease lost to another daemon");
                return None;
            }
            Err(e) if renewed.elapsed() >= ctx.fleet.lease() => {
                tracing::warn!(table = %table_name, error = %e, "standby lease not renewed in time");
                return None;
            }
            Err(e) => {
                tracing::debug!(table = %table_name, error = %e, "renewing the standby lease failed");
                continue;
            }
        }
        let lease_ms = ctx.fleet.lease();
        match take_if_lapsed(ctx, &publisher, PUBLISHER, lease_ms, observed).await {
            Ok(Some(taken)) => {
                tracing::info!(table = %table_name, lease = %taken.id, epoch = taken.epoch, "the publisher's lease lapsed: taking over from standby");
                release(ctx, &lease, None).await;
                ctx.stats.lease_changes.fetch_add(2, Ordering::Relaxed);
                return Some(taken);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(table = %table_name, error = %e, "reading the publisher's lease failed")
            }
        }
    }
    release(ctx, &lease, None).await;
    None
}

/// Relays while the lease holds: tails from its checkpoints, renews it, stops the
/// tailer when it is lost (or on shutdown, then releases it).
async fn hold(
    ctx: &Relaying,
    index: usize,
    table: &Table,
    key: &str,
    mut lease: Lease,
    shutdown: &CancellationToken,
) {
    let table_name = table.name.as_str();
    let arn = match ctx.streams.latest_stream_arn(table_name).await {
        Ok(Some(arn)) => arn,
        Ok(None) | Err(_) => {
            tracing::warn!(table = %table_name, "relay cannot read the table's stream; giving the lease up");
            release(ctx, &lease, None).await;
            return;
        }
    };
    // The earlier holder's checkpoints, if it read this stream (an empty map: it saw no
    // record since it began).
    let resume = match &lease.stream_arn {
        Some(a) if *a == arn => Some(lease.checkpoints.clone()),
        _ => None,
    };
    let publisher = Arc::new(Publisher {
        redis: ctx.redis.clone(),
        connection: tokio::sync::Mutex::new(None),
        key: key.to_owned(),
        relay: ctx.incarnation,
        epoch: lease.epoch,
        index,
        api: ctx.api.clone(),
        next: AtomicU64::new(1),
        // Shards without news keep their checkpoints through this holder's renewals.
        positions: Mutex::new(resume.clone().unwrap_or_default()),
        followed: Mutex::new(HashMap::new()),
        failing_since: Mutex::new(None),
        watermark_every: ctx.watermark_every,
        last_watermark: Mutex::new(None),
        codec: ctx.codec.clone(),
        retention_ms: ctx.fleet.retention_ms,
        stats: ctx.stats.clone(),
    });
    let started = Tailer::resume(
        ctx.streams.clone(),
        table_name.to_owned(),
        table.users,
        publisher.clone(),
        ctx.tail_stats.clone(),
        ctx.streams_config.clone(),
        resume.as_ref(),
    )
    .await;
    let tailer = match started {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(table = %table_name, error = %e, "relay cannot start tailing; giving the lease up");
            release(ctx, &lease, None).await;
            return;
        }
    };
    if resume.is_none() {
        // What happened on the stream before this relay's LATEST is unknown to the fleet.
        let cause = match &lease.stream_arn {
            Some(a) if *a != arn => FlushCause::StreamReplaced,
            _ => FlushCause::NoCheckpoint,
        };
        let _ = publisher
            .accept(table.users, Seen::ContinuityLost(cause))
            .await;
    }
    let stop = shutdown.child_token();
    let reading = tokio::spawn(tailer.run(stop.clone()));
    let period = ctx.fleet.lease() / 3;
    let mut renewed = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(period) => {}
        }
        // A relay that cannot publish (Redis unreachable from here only, say) gives its
        // slot to a daemon that may do better; a watermark takes at most a poll round.
        if publisher.failing_for() >= ctx.fleet.lease() {
            tracing::warn!(table = %table_name, "relay cannot publish to Redis; giving the lease up");
            break;
        }
        match ctx
            .leases
            .renew(&lease, &arn, &publisher.positions(), false)
            .await
        {
            Ok(Some(l)) => {
                lease = l;
                renewed = Instant::now();
            }
            Ok(None) => {
                tracing::warn!(table = %table_name, lease = %lease.id, "relay lease lost to another daemon");
                stop.cancel();
                let _ = reading.await;
                return;
            }
            Err(e) if renewed.elapsed() >= ctx.fleet.lease() => {
                tracing::warn!(table = %table_name, error = %e, "relay lease not renewed in time; stopping");
                stop.cancel();
                let _ = reading.await;
                return;
            }
            Err(e) => {
                tracing::debug!(table = %table_name, error = %e, "renewing the relay lease failed")
            }
        }
    }
    stop.cancel();
    let _ = reading.await;
    release(ctx, &lease, Some((&arn, &publisher.positions()))).await;
}

/// Gives the lease up, so that another daemon takes it at once instead of after
/// `lease_ms`: with `progress` (the stream read and the checkpoints reached), or as it
/// was when nothing was read.
async fn release(
    ctx: &Relaying,
    lease: &Lease,
    progress: Option<(&str, &BTreeMap<String, String>)>,
) {
    let (arn, checkpoints) = progress.unwrap_or((
        lease.stream_arn.as_deref().unwrap_or_default(),
        &lease.checkpoints,
    ));
    if let Err(e) = ctx.leases.renew(lease, arn, checkpoints, true).await {
        tracing::debug!(lease = %lease.id, error = %e, "releasing the relay lease failed");
    }
}
