//! The composition root: the whole daemon built from a [`Config`] (SDK clients, metrics,
//! cache, coherence, stores, tailers or fleet mode, the socket, the DynamoDB API front)
//! and run until a shutdown signal. The binary and the test harness both go through here, so that what the tests
//! run is what is deployed.
//!
//! The order of start-up is part of the correctness argument: the tables are checked and
//! the stream tailers (in fleet mode, the Redis consumer) take their positions before the
//! request path and the socket exist, so no read is served from the cache before every
//! later write is sure to reach it. The metrics endpoint is bound first, so that a bad
//! address fails the start rather than a scrape.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::cache::{ApiCache, MAX_TABLES};
use crate::api::discovery::{self, Discovery, Follow};
use crate::api::upstream::Upstream;
use crate::api::{self, Front};
use crate::aws::{self, ApiCalls};
use crate::cache::Cache;
use crate::changes::Changes;
use crate::coherence::Coherence;
use crate::config::{Config, ServerConfig};
use crate::fleet::lease::Leases;
use crate::fleet::{FleetStats, Hints};
use crate::metrics::Metrics;
use crate::probe::Probe;
use crate::registry::{self, Table};
use crate::server::{self, BindError, Listener};
use crate::service::Service;
use crate::store::{KvStore, LogStore};
use crate::stream::api::SdkStreams;
use crate::stream::Tailer;
use crate::tables::{self, TableError};
use crate::{fleet, http, stream};

/// How often the recorder folds histogram samples into their buckets. It keeps every
/// sample until then, so a daemon that nobody scrapes would otherwise grow without bound;
/// at a million requests a second a second's samples are a few megabytes.
const METRICS_UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("checking the tables: {0}")]
    Tables(#[from] TableError),
    #[error("starting the stream tailers: {0}")]
    Streams(#[from] stream::StartError),
    #[error("starting fleet mode: {0}")]
    Fleet(#[from] fleet::StartError),
    #[error("binding the metrics endpoint on {addr} (metrics.listen): {source}")]
    Metrics {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Socket(#[from] BindError),
    #[error(transparent)]
    Api(#[from] api::StartError),
}

/// The stream tailers' tasks and the token that stops them.
#[derive(Clone)]
pub struct Tailers {
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl Tailers {
    /// Stops the tailers and waits until they have; the daemon goes on serving, and its
    /// reads bypass the cache once the staleness bound has passed.
    pub async fn stop(&self) {
        self.stop.cancel();
        self.tasks.wait().await;
    }
}

/// A daemon that has started: tables checked, streams positioned, socket bound.
pub struct Daemon {
    service: Arc<Service>,
    probe: Arc<Probe>,
    metrics_endpoint: Option<TcpListener>,
    /// The stores' socket (none when `stores.enabled` is off).
    listener: Option<Listener>,
    api: Option<Front>,
    tailers: Option<Tailers>,
    server: ServerConfig,
}

impl Daemon {
    /// Builds everything `config` describes, in the order that keeps the cache correct.
    pub async fn start(config: &Config) -> Result<Daemon, StartError> {
        Self::build(config, true).await
    }

    /// A daemon whose DynamoDB may be absent or have no streams: the tables are not
    /// checked and no tailer runs, so every read bypasses the cache and readiness stays
    /// false. For tests of backend faults and of readiness.
    pub async fn start_without_tailers(config: &Config) -> Result<Daemon, StartError> {
        Self::build(config, false).await
    }

    async fn build(config: &Config, tail: bool) -> Result<Daemon, StartError> {
        let metrics_endpoint = match config.metrics.listen.as_str() {
            "" => None,
            addr => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Metrics {
                        addr: addr.to_owned(),
                        source,
                    })?,
            ),
        };
        let d = &config.dynamodb;
        let metrics = Arc::new(Metrics::new());
        let api_calls = Arc::new(ApiCalls::with_metrics(metrics.clone()));
        let sdk = aws::sdk_config(d).await;
        let dynamodb = aws::dynamodb_client_from(&sdk, api_calls.clone());
        let streams = Arc::new(SdkStreams {
            dynamodb: dynamodb.clone(),
            streams: aws::streams_client_from(&sdk, api_calls.clone()),
        });
        let cache = Arc::new(Cache::new(&config.cache));
        let fleet_mode = config.fleet.enabled();
        let stores = config.stores.enabled;
        let api_cache = match api_cached_tables(config, tail) {
            [] => None,
            names => {
                let described = api::tables::describe(&dynamodb, names)
                    .await
                    .map_err(api::StartError::from)?;
                Some(Arc::new(ApiCache::new(
                    described,
                    config.cache.max_staleness_ms,
                    config.dynamodb_api.cache_max_bytes,
                )))
            }
        };
        let registry = registry::tables(config, api_cache.as_deref());
        let coherence = Arc::new(Coherence::new(
            cache.clone(),
            config.cache.max_staleness_ms,
            metrics.stream_lag(),
        ));
        let changes = Arc::new(Changes::new(
            &registry,
            coherence.clone(),
            api_cache.clone(),
        ));
        let tail_stats = stream::TailStats::new(MAX_TABLES);
        for t in &registry {
            tail_stats.name(t.users, t.label());
        }
        let probe = Arc::new(Probe {
            ready: Default::default(),
            stores,
            fleet_mode,
            server_stats: Arc::default(),
            api_calls: api_calls.clone(),
            cache: cache.clone(),
            tail_stats: Arc::new(tail_stats),
            coherence,
            fleet_stats: Arc::new(FleetStats::new(match fleet_mode {
                true => &registry,
                false => &[],
            })),
            api_stats: Arc::default(),
            api_cache: api_cache.clone(),
            metrics,
        });

        // Positions first: once the tailers (or the fleet's consumer) hold them, every
        // later write is sure to reach the cache, and only then may reads use it.
        let mut hints = None;
        let every_table = config.dynamodb_api.tables == [api::tables::EVERY_TABLE];
        // Under `["*"]` in fleet mode, where the tables found after start join.
        let mut joining = None;
        let tailers = if tail {
            let stop = CancellationToken::new();
            let tasks = TaskTracker::new();
            // With the stores off their tables are never read: they need not exist.
            tables::check_tables(&dynamodb, d, stores, fleet_mode).await?;
            if fleet_mode {
                let parts = fleet::Parts {
                    fleet: config.fleet.clone(),
                    // A quarter of the bound: proofs arrive often enough that a reader
                    // never bypasses while the relays keep up, and not every poll round.
                    watermark_every: Duration::from_millis(config.cache.max_staleness_ms / 4),
                    streams_config: config.streams.clone(),
                    tables: registry,
                    api: api_cache.clone(),
                    leases: Leases::new(dynamodb.clone(), d.lease_table.clone()),
                    streams: streams.clone(),
                    tail_stats: probe.tail_stats.clone(),
                    changes: changes.clone(),
                    fleet_lag: probe.metrics.fleet_lag(),
                    hint_lag: probe.metrics.hint_lag(),
                    stats: probe.fleet_stats.clone(),
                    grows: every_table,
                };
                let fleet = fleet::start(parts, &tasks, stop.clone()).await?;
                hints = fleet.hints;
                joining = Some(fleet.joining);
            } else {
                start_tailers(config, &registry, &streams, &changes, &probe, &tasks, &stop).await?;
            }
            if let Some(cache) = &api_cache {
                tasks.spawn(api::descriptions::keep_described(
                    dynamodb.clone(),
                    cache.clone(),
                    stop.clone(),
                ));
            }
            tasks.close();
            probe.set_ready();
            Some(Tailers { tasks, stop })
        } else {
            None
        };

        let caching = api_cache.map(|cache| api::Caching {
            discovery: match &tailers {
                Some(t) if every_table => {
                    // In fleet mode the fleet carries what is found; else it is tailed here.
                    let follow: Box<dyn Follow> = match joining {
                        Some(joining) => Box::new(joining),
                        None => Box::new(discovery::Tail {
                            cache: cache.clone(),
                            streams: streams.clone(),
                            tail_stats: probe.tail_stats.clone(),
                            streams_config: config.streams.clone(),
                            tasks: t.tasks.clone(),
                            stop: t.stop.clone(),
                        }),
                    };
                    Some(Arc::new(Discovery::new(
                        dynamodb.clone(),
                        cache.clone(),
                        probe.tail_stats.clone(),
                        follow,
                        t.tasks.clone(),
                    )))
                }
                _ => None,
            },
            cache,
            on_written: Arc::new(FrontWrites {
                changes: changes.clone(),
                hints: hints.clone(),
            }),
        });
        let kv = KvStore::new(dynamodb.clone(), d.kv_table.clone(), d.batch_max_attempts);
        let log = LogStore::new(
            dynamodb,
            d.log_table.clone(),
            d.batch_max_attempts,
            d.index_allocation_max_attempts,
        );
        let service = Arc::new(Service::new(
            kv,
            log,
            cache,
            changes,
            probe.clone(),
            hints.clone(),
            config,
        ));
        let api = if config.dynamodb_api.listen.is_empty()
            && config.dynamodb_api.socket_path.as_os_str().is_empty()
        {
            None
        } else {
            let upstream = Upstream::new(&sdk, d).map_err(api::StartError::from)?;
            Front::bind(
                &config.dynamodb_api,
                &config.server,
                upstream,
                caching,
                probe.api_stats.clone(),
            )
            .await?
        };
        let listener = match stores {
            true => Some(server::bind(&config.server)?),
            false => None,
        };
        Ok(Daemon {
            service,
            probe,
            listener,
            metrics_endpoint,
            api,
            tailers,
            server: config.server.clone(),
        })
    }

    /// The daemon's request path: its cache and coherence, for tests' counters and hooks.
    pub fn service(&self) -> &Arc<Service> {
        &self.service
    }

    /// The daemon's health and metrics.
    pub fn probe(&self) -> &Arc<Probe> {
        &self.probe
    }

    /// DynamoDB calls made so far, by API.
    pub fn api_calls(&self) -> &Arc<ApiCalls> {
        &self.probe.api_calls
    }

    /// Where the metrics endpoint listens, if it is enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_endpoint
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// Where the DynamoDB API listens on loopback, if it does.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api.as_ref().and_then(Front::local_addr)
    }

    /// The DynamoDB API front's cache, if it caches tables.
    pub fn api_cache(&self) -> Option<&Arc<ApiCache>> {
        self.probe.api_cache.as_ref()
    }

    /// The stream tailers, if they run.
    pub fn tailers(&self) -> Option<Tailers> {
        self.tailers.clone()
    }

    /// Serves until `shutdown` fires, then drains connections within the grace period,
    /// removes the socket and stops the tailers.
    pub async fn run(self, shutdown: CancellationToken) {
        if let Some(endpoint) = self.metrics_endpoint {
            if let Ok(addr) = endpoint.local_addr() {
                tracing::info!(%addr, "metrics endpoint listening");
            }
            tokio::spawn(http::serve(endpoint, self.probe.clone(), shutdown.clone()));
        }
        tokio::spawn(upkeep(self.probe.metrics.clone(), shutdown.clone()));
        let api = self
            .api
            .map(|front| tokio::spawn(front.run(shutdown.clone())));
        match self.listener {
            Some(listener) => {
                server::run(
                    listener,
                    self.service,
                    self.probe.server_stats.clone(),
                    self.server,
                    shutdown,
                )
                .await
            }
            None => shutdown.cancelled().await,
        }
        if let Some(api) = api {
            // Cannot fail: the front's task does not panic on what a client sends.
            let _ = api.await;
        }
        if let Some(tailers) = self.tailers {
            tailers.stop().await;
        }
    }
}

/// The tables whose reads the DynamoDB API front answers from memory: none when the
/// front is off or when no tailer runs.
fn api_cached_tables(config: &Config, tail: bool) -> &[String] {
    let a = &config.dynamodb_api;
    let front = !a.listen.is_empty() || !a.socket_path.as_os_str().is_empty();
    if !front || !tail {
        return &[];
    }
    &a.tables
}

/// Where a write through the DynamoDB API front goes once DynamoDB has answered: every
/// cache of its table, and in fleet mode the other daemons (as a hint).
struct FrontWrites {
    changes: Arc<Changes>,
    hints: Option<Hints>,
}

impl api::OnWritten for FrontWrites {
    fn item<'a>(
        &'a self,
        table: api::tables::TableId,
        key: &'a [u8],
        partition: &'a [u8],
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.changes.item_written(table, key, partition).await;
            if let Some(hints) = &self.hints {
                hints.publish_item(table, key.to_vec(), partition.to_vec());
            }
        })
    }

    fn unknown(&self, table: api::tables::TableId) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.changes.unknown_written(table).await;
            if let Some(hints) = &self.hints {
                hints.publish_unread(table);
            }
        })
    }
}

/// Starts a stream tailer per table, each handing what it reads to every cache of its
/// table, tracked by `tasks` and stopped by `stop`. When this returns, all have taken
/// their positions.
async fn start_tailers(
    config: &Config,
    tables: &[Table],
    streams: &Arc<SdkStreams>,
    changes: &Arc<Changes>,
    probe: &Probe,
    tasks: &TaskTracker,
    stop: &CancellationToken,
) -> Result<(), stream::StartError> {
    if config.streams.stream_readers > 2 {
        tracing::warn!(
            stream_readers = config.streams.stream_readers,
            "DynamoDB Streams serves about two readers per shard; with more, reads of the \
             stream get throttled and invalidations arrive late: past two daemons per \
             table, run fleet mode ([fleet] in the configuration)"
        );
    }
    for table in tables {
        let tailer = Tailer::start(
            streams.clone(),
            table.name.clone(),
            table.users,
            changes.clone(),
            probe.tail_stats.clone(),
            config.streams.clone(),
        )
        .await?;
        tasks.spawn(tailer.run(stop.clone()));
    }
    Ok(())
}

/// Folds histogram samples into buckets every [`METRICS_UPKEEP_INTERVAL`] until `shutdown`.
async fn upkeep(metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(METRICS_UPKEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => metrics.run_upkeep(),
            _ = shutdown.cancelled() => return,
        }
    }
}
