//! Fleet mode (`[fleet]`): past two daemons per table, DynamoDB Streams cannot serve
//! every daemon its own reader, so one or two daemons per table, elected through leases
//! in DynamoDB, read the stream and relay what they read through a Redis stream that
//! every daemon consumes. The design, and why each rule is there:
//! `shared/design/fleet.md`; `docs/FLEET.md` for operators.
//!
//! - [`lease`]: the relay leases (DynamoDB conditional writes).
//! - [`relay`]: competing for a lease, and the tailer's sink that publishes.
//! - [`entry`]: what a Redis stream entry says, and its authentication.
//! - [`rules`]: what a consumer makes of the entries, as a pure state machine.
//! - [`consumer`]: the loop that reads Redis and applies the rules' actions.
//! - [`transport`]: the Redis calls.
//!
//! Write hints: once DynamoDB has acknowledged a write, the daemon appends the key to the
//! table's stream ([`Hints`]); the others drop it at once. Hints only ever invalidate,
//! never count toward freshness, and a lost one costs only time.
//!
//! Under `dynamodb_api.tables = ["*"]` a table the front finds after start joins the
//! fleet ([`Joining`]): consumed, competed for, hinted, like the tables of the start.

pub mod consumer;
pub mod entry;
pub mod lease;
pub mod relay;
pub mod rules;
pub mod transport;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::cache::{ApiCache, MAX_TABLES};
use crate::api::discovery::Follow;
use crate::api::tables::TableId;
use crate::cache::CacheKey;
use crate::changes::Changes;
use crate::config::{FleetConfig, StreamsConfig};
use crate::metrics::{Exposition, Kind};
use crate::registry::{Table, Users};
use crate::store::StoreTable;
use crate::stream::api::SdkStreams;
use crate::stream::TailStats;
use entry::{wall_ms, Codec, Entry, Key};
use lease::Leases;
use transport::{stream_key, Redis};

/// Write hints waiting to be published; past this they are dropped (counted).
const HINT_QUEUE: usize = 8192;
/// Keys per hint entry.
const HINT_BATCH: usize = 256;
/// The most tables a fleet daemon carries: the stores' and as many as the front caches.
const MAX_CARRIED: usize = StoreTable::ALL.len() + MAX_TABLES;

/// A counter per fleet table, by its place in the fleet's list.
pub struct PerTable(Box<[AtomicU64]>);

impl PerTable {
    fn new() -> PerTable {
        PerTable((0..MAX_CARRIED).map(|_| AtomicU64::new(0)).collect())
    }

    pub fn of(&self, table: usize) -> &AtomicU64 {
        &self.0[table]
    }
}

/// What fleet mode counts.
pub struct FleetStats {
    /// The fleet tables' labels, in the fleet's order.
    labels: RwLock<Vec<String>>,
    /// Relay leases held, per table (0: a consumer only).
    pub leases_held: PerTable,
    /// Per table, 1 while this daemon is the table's publisher (it holds slot 0).
    pub publishing: PerTable,
    /// Leases taken or given up by this daemon.
    pub lease_changes: AtomicU64,
    /// Entries this daemon published as a relay, per table.
    pub published: PerTable,
    /// Entries read, per table.
    pub consumed: PerTable,
    /// Entries that did not decode or authenticate.
    pub bad_entries: AtomicU64,
    pub hints_published: AtomicU64,
    /// Hints not published because the queue was full (costs only time).
    pub hints_dropped: AtomicU64,
    /// Failed Redis calls (connects, appends, reads).
    pub redis_errors: AtomicU64,
}

impl FleetStats {
    /// Counters for `tables` (none outside fleet mode), with room for more.
    pub fn new(tables: &[Table]) -> FleetStats {
        FleetStats {
            labels: RwLock::new(tables.iter().map(|t| t.label().to_owned()).collect()),
            leases_held: PerTable::new(),
            publishing: PerTable::new(),
            lease_changes: AtomicU64::new(0),
            published: PerTable::new(),
            consumed: PerTable::new(),
            bad_entries: AtomicU64::new(0),
            hints_published: AtomicU64::new(0),
            hints_dropped: AtomicU64::new(0),
            redis_errors: AtomicU64::new(0),
        }
    }

    /// Counts the table labelled `label` too, as the next in the fleet's order: its
    /// place, or `None` if there is no room.
    fn add(&self, label: &str) -> Option<usize> {
        let mut labels = self.labels.write().expect("labels lock poisoned");
        let place = labels.len();
        (place < MAX_CARRIED).then(|| {
            labels.push(label.to_owned());
            place
        })
    }

    /// Writes the counters into a scrape.
    pub fn export(&self, out: &mut Exposition) {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let labels = self.labels.read().expect("labels lock poisoned");
        let per_table = |a: &PerTable| {
            labels
                .iter()
                .zip(&a.0)
                .map(|(label, v)| (label.as_str(), load(v)))
                .collect::<Vec<_>>()
        };
        out.by_label(
            "ddbcached_fleet_leases_held",
            Kind::Gauge,
            "Relay leases this daemon holds, by table (0: it only consumes).",
            "table",
            per_table(&self.leases_held),
        );
        out.by_label(
            "ddbcached_fleet_publishing",
            Kind::Gauge,
            "1 while this daemon publishes the table's changes (a relay lease held, not standing by).",
            "table",
            per_table(&self.publishing),
        );
        out.single(
            "ddbcached_fleet_lease_changes_total",
            Kind::Counter,
            "Relay leases taken or given up by this daemon.",
            load(&self.lease_changes),
        );
        out.by_label(
            "ddbcached_fleet_published_total",
            Kind::Counter,
            "Entries this daemon published as a relay, by table.",
            "table",
            per_table(&self.published),
        );
        out.by_label(
            "ddbcached_fleet_consumed_total",
            Kind::Counter,
            "Fan-out entries read, by table.",
            "table",
            per_table(&self.consumed),
        );
        out.single(
            "ddbcached_fleet_bad_entries_total",
            Kind::Counter,
            "Fan-out entries that did not decode or authenticate (each flushes its table).",
            load(&self.bad_entries),
        );
        out.single(
            "ddbcached_fleet_hints_published_total",
            Kind::Counter,
            "Write hints published.",
            load(&self.hints_published),
        );
        out.single(
            "ddbcached_fleet_hints_dropped_total",
            Kind::Counter,
            "Write hints dropped because Redis could not keep up.",
            load(&self.hints_dropped),
        );
        out.single(
            "ddbcached_fleet_redis_errors_total",
            Kind::Counter,
            "Failed Redis calls.",
            load(&self.redis_errors),
        );
    }

    /// The daemon's role per table, in words.
    pub fn roles(&self) -> String {
        self.labels
            .read()
            .expect("labels lock poisoned")
            .iter()
            .enumerate()
            .map(|(i, label)| {
                let load = |a: &PerTable| a.of(i).load(Ordering::Relaxed);
                let role = match (load(&self.publishing), load(&self.leases_held)) {
                    (0, 0) => "consumer",
                    (0, _) => "standby",
                    _ => "relay",
                };
                format!("{label}: {role}")
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Publishes write hints without ever making a write wait.
#[derive(Clone)]
pub struct Hints {
    queue: mpsc::Sender<Written>,
    stats: Arc<FleetStats>,
}

/// What a hint names: a store's key, or an item (or items it could not make out) of a
/// table the API front caches.
enum Written {
    Store(CacheKey),
    Item(TableId, Key),
}

impl Hints {
    /// Hints that `key` was written (DynamoDB acknowledged it).
    pub fn publish(&self, key: CacheKey) {
        self.queue(Written::Store(key));
    }

    /// Hints that an item of the front's `table` was written: its canonical key and
    /// partition key.
    pub fn publish_item(&self, table: TableId, key: Vec<u8>, partition: Vec<u8>) {
        self.queue(Written::Item(table, Key::Item { key, partition }));
    }

    /// Hints that items of the front's `table` it could not make out were written
    /// (PartiQL): the other daemons drop everything of the table.
    pub fn publish_unread(&self, table: TableId) {
        self.queue(Written::Item(table, Key::Unread {}));
    }

    fn queue(&self, written: Written) {
        if self.queue.try_send(written).is_err() {
            self.stats.hints_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Fleet mode as the rest of the daemon sees it.
pub struct Fleet {
    pub hints: Option<Hints>,
    /// Where a table found after start joins.
    pub joining: Joining,
}

/// Has a table the front found after start carried by the fleet from then on: this
/// daemon's consumer reads its Redis stream, its relay (if eligible) competes for its
/// lease, and its writes are hinted.
pub struct Joining {
    leases_table: String,
    /// To the consumer and the hint publisher: a table and its Redis stream (no more
    /// than the counters have room for).
    consumer: mpsc::UnboundedSender<(Table, String)>,
    hints: mpsc::UnboundedSender<(Users, String)>,
    relaying: Option<Arc<relay::Relaying>>,
    stats: Arc<FleetStats>,
    /// Places in the counters are taken in the order the consumer is told of tables.
    order: Mutex<()>,
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl Follow for Joining {
    fn follow(&self, name: &str, id: TableId) {
        let table = Table {
            name: name.to_owned(),
            users: Users {
                store: None,
                api: Some(id),
            },
        };
        let key = stream_key(&self.leases_table, name);
        let place = {
            let _order = self.order.lock().expect("order lock poisoned");
            let Some(place) = self.stats.add(table.label()) else {
                tracing::warn!(table = %name, "the fleet carries as many tables as it may: this one's reads bypass the cache");
                return;
            };
            // Both receivers live as long as the fleet's tasks; once stopped, nothing
            // is served from the table.
            let _ = self.consumer.send((table.clone(), key.clone()));
            place
        };
        let _ = self.hints.send((table.users, key.clone()));
        if let Some(relaying) = &self.relaying {
            self.tasks.spawn(relay::run(
                relaying.clone(),
                place,
                table,
                key,
                self.stop.clone(),
            ));
        }
    }
}

/// What fleet mode is built from.
pub struct Parts {
    pub fleet: FleetConfig,
    /// The least time between two watermarks of a relay.
    pub watermark_every: std::time::Duration,
    pub streams_config: StreamsConfig,
    /// The tables carried.
    pub tables: Vec<Table>,
    /// The DynamoDB API front's cache, when some of `tables` are its: a relay reads
    /// what a change touched the way it keys items.
    pub api: Option<Arc<ApiCache>>,
    pub leases: Leases,
    pub streams: Arc<SdkStreams>,
    pub tail_stats: Arc<TailStats>,
    /// Where the consumer applies what it reads.
    pub changes: Arc<Changes>,
    pub fleet_lag: metrics::Histogram,
    pub hint_lag: metrics::Histogram,
    pub stats: Arc<FleetStats>,
    /// Whether tables join after start (`["*"]`): then the fleet may start with none.
    pub grows: bool,
}

/// Why fleet mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("fleet.redis_url is not usable: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(
        "there is no table to carry: the stores are off (stores.enabled) and \
         dynamodb_api.tables found no table with a stream"
    )]
    NoTables,
}

/// This daemon's id in the fleet: host, process and a random part (a restarted process
/// is a new relay).
pub fn daemon_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".into());
    format!(
        "{host}:{}:{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// Starts the consumer (its position taken before this returns, if Redis answers), the
/// relay candidates and the hint publisher, as tasks of `tasks` stopped by `stop`.
pub async fn start(
    parts: Parts,
    tasks: &TaskTracker,
    stop: CancellationToken,
) -> Result<Fleet, StartError> {
    if parts.tables.is_empty() && !parts.grows {
        return Err(StartError::NoTables);
    }
    let me = daemon_id();
    // Names this process in every entry it publishes: 8 bytes, not a host name.
    let incarnation: u64 = rand::random();
    let redis = Redis::open(&parts.fleet.redis_url, &parts.fleet.tls_ca_file)?;
    let codec = Codec::new(&parts.fleet.auth_key);
    let stats = parts.stats;
    let keys: Vec<String> = parts
        .tables
        .iter()
        .map(|t| stream_key(parts.leases.table(), &t.name))
        .collect();
    let consuming = Arc::new(consumer::Consuming {
        me: incarnation,
        redis: redis.clone(),
        codec: codec.clone(),
        changes: parts.changes,
        clock_skew_ms: parts.fleet.clock_skew_ms,
        stats: stats.clone(),
        fleet_lag: parts.fleet_lag,
        hint_lag: parts.hint_lag,
    });
    let start = match consumer::position(&consuming, &keys).await {
        Ok(p) => Some(p),
        Err(e) => {
            stats.redis_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "Redis unreachable at start: reads bypass the cache until it answers");
            None
        }
    };
    let (to_consumer, joining) = mpsc::unbounded_channel();
    let carried = consumer::Carried::new(incarnation, parts.tables.clone(), keys.clone());
    tasks.spawn(consumer::run(
        consuming,
        carried,
        joining,
        start,
        stop.clone(),
    ));
    let leases_table = parts.leases.table().to_owned();
    let relaying = parts.fleet.relay_eligible.then(|| {
        Arc::new(relay::Relaying {
            me,
            incarnation,
            redis: redis.clone(),
            leases: parts.leases,
            streams: parts.streams,
            tail_stats: parts.tail_stats,
            streams_config: parts.streams_config,
            fleet: parts.fleet.clone(),
            watermark_every: parts.watermark_every,
            codec: codec.clone(),
            api: parts.api,
            stats: stats.clone(),
        })
    });
    if let Some(relaying) = &relaying {
        for (i, table) in parts.tables.iter().enumerate() {
            tasks.spawn(relay::run(
                relaying.clone(),
                i,
                table.clone(),
                keys[i].clone(),
                stop.clone(),
            ));
        }
    }
    let hint_keys: Vec<(Users, String)> = parts.tables.iter().map(|t| t.users).zip(keys).collect();
    let (hint_keys_joining, joined_hint_keys) = mpsc::unbounded_channel();
    let hints = parts.fleet.write_hints.then(|| {
        let (queue, pending) = mpsc::channel(HINT_QUEUE);
        tasks.spawn(publish_hints(
            pending,
            redis,
            codec,
            incarnation,
            hint_keys,
            joined_hint_keys,
            parts.fleet.retention_ms,
            stats.clone(),
            stop.clone(),
        ));
        Hints {
            queue,
            stats: stats.clone(),
        }
    });
    tracing::info!(
        relay_eligible = parts.fleet.relay_eligible,
        "fleet mode started"
    );
    let joining = Joining {
        leases_table,
        consumer: to_consumer,
        hints: hint_keys_joining,
        relaying,
        stats,
        order: Mutex::new(()),
        tasks: tasks.clone(),
        stop,
    };
    Ok(Fleet { hints, joining })
}

/// Appends queued hints, batched per table (`keys`: each table's users and stream, and
/// those of tables that join later), until `stop`.
#[allow(clippy::too_many_arguments)]
async fn publish_hints(
    mut pending: mpsc::Receiver<Written>,
    redis: Redis,
    codec: Codec,
    me: u64,
    mut keys: Vec<(Users, String)>,
    mut joined: mpsc::UnboundedReceiver<(Users, String)>,
    retention_ms: u64,
    stats: Arc<FleetStats>,
    stop: CancellationToken,
) {
    let mut connection = None;
    let mut batch = Vec::with_capacity(HINT_BATCH);
    loop {
        let received = tokio::select! {
            _ = stop.cancelled() => return,
            n = pending.recv_many(&mut batch, HINT_BATCH) => n,
        };
        if received == 0 {
            return;
        }
        while let Ok(table) = joined.try_recv() {
            keys.push(table);
        }
        if connection.is_none() {
            match redis.connect(None).await {
                Ok(c) => connection = Some(c),
                Err(_) => {
                    stats.redis_errors.fetch_add(1, Ordering::Relaxed);
                    stats
                        .hints_dropped
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    batch.clear();
                    continue;
                }
            }
        }
        let Some(c) = connection.as_mut() else {
            continue;
        };
        for (users, key) in &keys {
            let of_table: Vec<Key> = batch
                .iter()
                .filter_map(|w| match w {
                    Written::Store(k) => {
                        let kind = if k.is_kv() {
                            StoreTable::Kv
                        } else {
                            StoreTable::Log
                        };
                        (users.store == Some(kind)).then(|| Key::from(k))
                    }
                    Written::Item(table, k) => (users.api == Some(*table)).then(|| k.clone()),
                })
                .collect();
            if of_table.is_empty() {
                continue;
            }
            let count = of_table.len() as u64;
            let entry = Entry::Hint {
                from: me,
                keys: of_table,
            };
            let keep_after = wall_ms().saturating_sub(retention_ms);
            match c.append(key, &codec.encode(&entry), keep_after).await {
                Ok(_) => {
                    stats.hints_published.fetch_add(count, Ordering::Relaxed);
                }
                Err(e) => {
                    stats.redis_errors.fetch_add(1, Ordering::Relaxed);
                    stats.hints_dropped.fetch_add(count, Ordering::Relaxed);
                    tracing::debug!(error = %e, "publishing write hints failed");
                    connection = None;
                    break;
                }
            }
        }
        batch.clear();
    }
}
