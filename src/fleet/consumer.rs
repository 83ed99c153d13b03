//! The consumer every daemon runs in fleet mode: one blocking XREAD over every fleet
//! table's Redis stream, on a connection of its own; each entry goes through the table's
//! [`Rules`] and what they say is done to the caches of the table: the stores' through
//! [`Coherence`], the DynamoDB API front's through its [`ApiCache`].
//!
//! Its position is taken before the daemon serves anything from the cache: everything
//! published afterwards is read, and reads bypass the cache until the first watermark.
//! When the connection is lost the consumer reconnects with backoff and reads on from
//! the streams' ends, flushing every table, since what was published meanwhile is
//! unknown; its freshness is not renewed meanwhile, so reads bypass once the staleness
//! bound has passed.
//!
//! A table found after start (under `["*"]`) joins between two reads, at its stream's
//! end, the way every table joined at start: its reads bypass the cache until a
//! watermark read from there on proves it fresh.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::entry::{wall_ms, Codec, Entry, Key};
use super::rules::{Action, Rules};
use super::transport::{Connection, Redis};
use super::FleetStats;
use crate::cache::CacheKey;
use crate::changes::Changes;
use crate::registry::{Table, Users};
use crate::stream::change::Change;
use crate::stream::FlushCause;

/// Longest wait of one XREAD; also how long shutdown may wait for it.
const BLOCK: Duration = Duration::from_millis(1000);
/// Entries per stream per XREAD.
const COUNT: usize = 512;
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What the consumer needs.
pub struct Consuming {
    /// This daemon's incarnation number: its own hints are skipped.
    pub me: u64,
    pub redis: Redis,
    pub codec: Codec,
    /// Where what the entries say is applied.
    pub changes: Arc<Changes>,
    pub clock_skew_ms: u64,
    pub stats: Arc<FleetStats>,
    pub fleet_lag: metrics::Histogram,
    pub hint_lag: metrics::Histogram,
}

/// The tables carried, in the fleet's order, with their Redis streams and rules.
pub struct Carried {
    tables: Vec<Table>,
    keys: Vec<String>,
    rules: Vec<Rules>,
}

impl Carried {
    /// `tables`, whose Redis streams are `keys`, read by the consumer `me`.
    pub fn new(me: u64, tables: Vec<Table>, keys: Vec<String>) -> Carried {
        let rules = tables.iter().map(|_| Rules::new(me)).collect();
        Carried {
            tables,
            keys,
            rules,
        }
    }

    fn join(&mut self, me: u64, table: Table, key: String) {
        self.tables.push(table);
        self.keys.push(key);
        self.rules.push(Rules::new(me));
    }
}

/// A connection and where it reads from.
pub struct Position {
    connection: Connection,
    after: Vec<String>,
}

/// Connects and takes the end of every stream of `keys`.
pub async fn position(ctx: &Consuming, keys: &[String]) -> redis::RedisResult<Position> {
    let mut connection = ctx.redis.connect(Some(BLOCK * 3)).await?;
    let mut after = Vec::with_capacity(keys.len());
    for key in keys {
        after.push(connection.last_id(key).await?);
    }
    Ok(Position { connection, after })
}

/// Reads until `shutdown`, starting from `start` (taken at start-up) if given; the
/// tables of `joining` join as they come.
pub async fn run(
    ctx: Arc<Consuming>,
    mut carried: Carried,
    mut joining: mpsc::UnboundedReceiver<(Table, String)>,
    mut start: Option<Position>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    let mut actions = Vec::new();
    loop {
        let mut position = match start.take() {
            Some(p) => p,
            None => match position(&ctx, &carried.keys).await {
                Ok(p) => {
                    tracing::info!("fan-out consumer connected to Redis");
                    for t in 0..carried.rules.len() {
                        carried.rules[t].rejoin(&mut actions);
                        perform(&ctx, carried.tables[t].users, &mut actions).await;
                    }
                    backoff = Duration::from_millis(100);
                    p
                }
                Err(e) => {
                    ctx.stats.redis_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "fan-out consumer cannot reach Redis; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            },
        };
        loop {
            // With no table to read yet, the first to join is waited for.
            let first = match carried.keys.is_empty() {
                true => tokio::select! {
                    _ = shutdown.cancelled() => return,
                    joined = joining.recv() => match joined {
                        Some(joined) => Some(joined),
                        // No table will ever join: nothing to read until shutdown.
                        None => return shutdown.cancelled().await,
                    },
                },
                false => None,
            };
            if !join(&ctx, &mut carried, first, &mut joining, &mut position).await {
                break;
            }
            let read = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = position.connection.read(&carried.keys, &position.after, BLOCK, COUNT) => r,
            };
            let streams = match read {
                Ok(s) => s,
                Err(e) => {
                    ctx.stats.redis_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "fan-out read failed; reconnecting");
                    break;
                }
            };
            for (key, entries) in streams {
                let Some(t) = carried.keys.iter().position(|k| *k == key) else {
                    continue;
                };
                let users = carried.tables[t].users;
                for e in entries {
                    let decoded = ctx
                        .codec
                        .decode(|name| e.fields.get(name).map(Vec::as_slice));
                    let rules = &mut carried.rules[t];
                    match decoded {
                        Ok(entry) => {
                            ctx.stats.consumed.of(t).fetch_add(1, Ordering::Relaxed);
                            record_lag(&ctx, &entry, &e.id);
                            rules.entry(entry, &mut actions);
                        }
                        Err(err) => {
                            ctx.stats.bad_entries.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(table = carried.tables[t].label(), error = %err, "a fan-out entry was not used");
                            rules.gap(FlushCause::BadEntry, &mut actions);
                        }
                    }
                    perform(&ctx, users, &mut actions).await;
                    position.after[t] = e.id;
                }
            }
        }
    }
}

/// Has `first` and the tables found since the last read join, each at its stream's end;
/// `false` if Redis failed meanwhile (the joined tables' ends are taken again at the
/// reconnection).
async fn join(
    ctx: &Consuming,
    carried: &mut Carried,
    first: Option<(Table, String)>,
    joining: &mut mpsc::UnboundedReceiver<(Table, String)>,
    position: &mut Position,
) -> bool {
    let pending = first
        .into_iter()
        .chain(std::iter::from_fn(|| joining.try_recv().ok()));
    for (table, key) in pending {
        let end = position.connection.last_id(&key).await;
        carried.join(ctx.me, table, key);
        match end {
            Ok(id) => position.after.push(id),
            Err(e) => {
                ctx.stats.redis_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "fan-out read failed; reconnecting");
                return false;
            }
        }
    }
    true
}

/// How long ago the entry was appended: its stream id begins with Redis's clock then
/// (milliseconds since the Unix epoch), so the entry need not carry a time of its own.
fn record_lag(ctx: &Consuming, entry: &Entry, id: &str) {
    let lag = match entry {
        Entry::Relay { .. } => &ctx.fleet_lag,
        Entry::Hint { from, .. } if *from != ctx.me => &ctx.hint_lag,
        Entry::Hint { .. } => return,
    };
    if let Some(appended_ms) = id.split('-').next().and_then(|ms| ms.parse::<u64>().ok()) {
        lag.record(wall_ms().saturating_sub(appended_ms) as f64 / 1000.0);
    }
}

/// Does what the rules said of a table, in order, to its `users`, and empties `actions`.
async fn perform(ctx: &Consuming, users: Users, actions: &mut Vec<Action>) {
    let changes = &ctx.changes;
    for action in actions.drain(..) {
        match action {
            Action::Apply(facts) => {
                for fact in facts {
                    match Change::try_from(fact) {
                        Ok(change) => changes.apply_store(users, &change).await,
                        Err(item) => {
                            if let Some(change) = item.item_change() {
                                changes.apply_item(users, change.as_ref());
                            }
                        }
                    }
                }
            }
            Action::Drop(keys) => {
                for key in keys {
                    match key {
                        Key::Item { key, partition } => {
                            changes.item_hinted(users, &key, &partition).await
                        }
                        Key::Unread {} => changes.flush(users, FlushCause::UnreadWrite).await,
                        store_key => {
                            if let Ok(key) = CacheKey::try_from(store_key) {
                                changes.store_key_hinted(users, key).await;
                            }
                        }
                    }
                }
            }
            Action::Flush(cause) => changes.flush(users, cause).await,
            Action::Fresh(t_ms) => {
                // The relay's claim, made conservative by the allowed skew, on this
                // host's monotonic clock.
                let behind = wall_ms().saturating_sub(t_ms.saturating_sub(ctx.clock_skew_ms));
                if let Some(at) = Instant::now().checked_sub(Duration::from_millis(behind)) {
                    changes.fresh_as_of(users, Some(at));
                }
            }
        }
    }
}
