//! The whole daemon as one value, built from a [`Config`] and run until a shutdown signal.
//! The binary and the test harness both go through here, so that what the tests run is
//! what is deployed.
//!
//! The order of start-up is part of the correctness argument: the tables are checked and
//! the stream tailers (in fleet mode, the Redis consumer) take their positions before the
//! socket exists, so no read is served
//! from the cache before every later write is sure to reach it. The metrics endpoint is
//! bound early, so that a bad address fails the start rather than a scrape.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ServerConfig};
use crate::metrics::Metrics;
use crate::server::{self, BindError, Listener};
use crate::service::Service;
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
    listener: Listener,
    metrics_endpoint: Option<TcpListener>,
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
        let service = Service::connect(config).await;
        let tailers = if tail {
            let fleet_mode = config.fanout.enabled();
            tables::check_tables(service.dynamodb(), &config.dynamodb, fleet_mode).await?;
            let stop = CancellationToken::new();
            let tasks = if fleet_mode {
                service.start_fleet(config, stop.clone()).await?
            } else {
                service.start_tailers(stop.clone()).await?
            };
            Some(Tailers { tasks, stop })
        } else {
            None
        };
        let listener = server::bind(&config.server)?;
        Ok(Daemon {
            service,
            listener,
            metrics_endpoint,
            tailers,
            server: config.server.clone(),
        })
    }

    /// The daemon's internals: its cache, tailers' state and counters.
    pub fn service(&self) -> &Arc<Service> {
        &self.service
    }

    /// Where the metrics endpoint listens, if it is enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_endpoint
            .as_ref()
            .and_then(|l| l.local_addr().ok())
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
            tokio::spawn(http::serve(
                endpoint,
                self.service.clone(),
                shutdown.clone(),
            ));
        }
        tokio::spawn(upkeep(self.service.metrics().clone(), shutdown.clone()));
        server::run(self.listener, self.service, self.server, shutdown).await;
        if let Some(tailers) = self.tailers {
            tailers.stop().await;
        }
    }
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
