//! The consumer every daemon runs in fleet mode: one blocking XREAD over both tables'
//! Redis streams, on a connection of its own; each entry goes through the table's
//! [`Rules`] and what they say is done to the cache through [`Coherence`].
//!
//! Its position is taken before the daemon serves anything from the cache: everything
//! published afterwards is read, and reads bypass the cache until the first watermark.
//! When the connection is lost the consumer reconnects with backoff and reads on from
//! the streams' ends, flushing both tables, since what was published meanwhile is
//! unknown; its freshness is not renewed meanwhile, so reads bypass once the staleness
//! bound has passed.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::entry::{wall_ms, Codec, Entry};
use super::rules::{Action, Rules};
use super::transport::{Connection, Redis};
use super::FleetStats;
use crate::coherence::Coherence;
use crate::store::StoreTable;
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
    pub coherence: Arc<Coherence>,
    /// The Redis stream of each table, in [`StoreTable`] order.
    pub keys: [String; 2],
    pub clock_skew_ms: u64,
    pub stats: Arc<FleetStats>,
    pub fleet_lag: metrics::Histogram,
    pub hint_lag: metrics::Histogram,
}

/// A connection and where it reads from.
pub struct Position {
    connection: Connection,
    after: [String; 2],
}

/// Connects and takes both streams' ends.
pub async fn position(ctx: &Consuming) -> redis::RedisResult<Position> {
    let mut connection = ctx.redis.connect(Some(BLOCK * 3)).await?;
    let mut after = [String::new(), String::new()];
    for t in StoreTable::ALL {
        after[t as usize] = connection.last_id(&ctx.keys[t as usize]).await?;
    }
    Ok(Position { connection, after })
}

/// Reads until `shutdown`, starting from `start` (taken at start-up) if given.
pub async fn run(ctx: Arc<Consuming>, mut start: Option<Position>, shutdown: CancellationToken) {
    let mut rules = StoreTable::ALL.map(|_| Rules::new(ctx.me));
    let mut backoff = Duration::from_millis(100);
    let mut actions = Vec::new();
    loop {
        let mut position = match start.take() {
            Some(p) => p,
            None => match position(&ctx).await {
                Ok(p) => {
                    tracing::info!("fan-out consumer connected to Redis");
                    for t in StoreTable::ALL {
                        rules[t as usize].rejoin(&mut actions);
                        perform(&ctx, t, &mut actions).await;
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
            let read = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = position.connection.read(&ctx.keys, &position.after, BLOCK, COUNT) => r,
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
                let Some(t) = StoreTable::ALL
                    .into_iter()
                    .find(|t| ctx.keys[*t as usize] == key)
                else {
                    continue;
                };
                for e in entries {
                    let decoded = ctx
                        .codec
                        .decode(|name| e.fields.get(name).map(Vec::as_slice));
                    let rules = &mut rules[t as usize];
                    match decoded {
                        Ok(entry) => {
                            ctx.stats.consumed[t as usize].fetch_add(1, Ordering::Relaxed);
                            record_lag(&ctx, &entry, &e.id);
                            rules.entry(entry, &mut actions);
                        }
                        Err(err) => {
                            ctx.stats.bad_entries.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(table = t.name(), error = %err, "a fan-out entry was not used");
                            rules.gap(FlushCause::BadEntry, &mut actions);
                        }
                    }
                    perform(&ctx, t, &mut actions).await;
                    position.after[t as usize] = e.id;
                }
            }
        }
    }
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

/// Does what the rules said, in order, and empties `actions`.
async fn perform(ctx: &Consuming, table: StoreTable, actions: &mut Vec<Action>) {
    for action in actions.drain(..) {
        match action {
            Action::Apply(facts) => {
                for fact in facts {
                    ctx.coherence.apply(table, &fact.into()).await;
                }
            }
            Action::Drop(keys) => {
                for key in keys {
                    ctx.coherence.drop_key(table, key).await;
                }
            }
            Action::Flush(cause) => ctx.coherence.flush(table, cause).await,
            Action::Fresh(t_ms) => {
                // The relay's claim, made conservative by the allowed skew, on this
                // host's monotonic clock.
                let behind = wall_ms().saturating_sub(t_ms.saturating_sub(ctx.clock_skew_ms));
                if let Some(at) = Instant::now().checked_sub(Duration::from_millis(behind)) {
                    ctx.coherence.fresh_as_of(table, Some(at));
                }
            }
        }
    }
}
