//! What a daemon reports about itself: its health (ready or not, and per table whether
//! reads may use the cache), answered to the socket's `health` request and to `/ready`,
//! and the Prometheus exposition, in which every part writes its own counters.
//!
//! The daemon builds one [`Probe`] from its parts; nothing here changes them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::api::cache::ApiCache;
use crate::api::stats::ApiStats;
use crate::aws::ApiCalls;
use crate::cache::Cache;
use crate::coherence::Coherence;
use crate::fleet::FleetStats;
use crate::metrics::{Exposition, Metrics};
use crate::server_stats::ServerStats;
use crate::store::StoreTable;
use crate::stream::TailStats;

/// The parts whose state and counters the daemon reports.
pub struct Probe {
    /// Set once the tailers (or fleet mode's consumer) have taken their positions: from
    /// then on the daemon can serve reads from the cache.
    pub(crate) ready: AtomicBool,
    /// Whether this daemon serves the stores (`stores.enabled`).
    pub(crate) stores: bool,
    /// Whether this daemon runs in fleet mode (health then names its roles).
    pub(crate) fleet_mode: bool,
    pub(crate) server_stats: Arc<ServerStats>,
    pub(crate) api_calls: Arc<ApiCalls>,
    pub(crate) cache: Arc<Cache>,
    pub(crate) tail_stats: Arc<TailStats>,
    pub(crate) coherence: Arc<Coherence>,
    pub(crate) fleet_stats: Arc<FleetStats>,
    pub(crate) api_stats: Arc<ApiStats>,
    /// The DynamoDB API front's cache, when it caches tables.
    pub(crate) api_cache: Option<Arc<ApiCache>>,
    pub(crate) metrics: Arc<Metrics>,
}

/// A daemon's health, table by table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    /// Tables checked and tailers positioned.
    pub ready: bool,
    /// Per table (indexed by [`StoreTable`]): whether its freshness is proven, so that
    /// reads of it are served from the cache; true when the stores are off (nothing
    /// reads them).
    pub fresh: [bool; 2],
    /// The DynamoDB API's cached tables whose freshness is not proven.
    pub api_behind: Vec<String>,
    /// In fleet mode, this daemon's role for each table (`kv: relay, log: consumer`).
    pub fleet_roles: Option<String>,
}

impl Health {
    /// The health in words, as the `health` request and `/ready` give it.
    pub fn detail(&self) -> String {
        if !self.ready {
            return "not ready: the stream tailers have not taken their positions".into();
        }
        let mut behind: Vec<&str> = StoreTable::ALL
            .into_iter()
            .filter(|t| !self.fresh[*t as usize])
            .map(StoreTable::name)
            .collect();
        behind.extend(self.api_behind.iter().map(String::as_str));
        let mut detail = if behind.is_empty() {
            "ready".to_owned()
        } else {
            format!(
                "ready; {} not proven fresh, reads bypass the cache",
                behind.join(" and ")
            )
        };
        if let Some(roles) = &self.fleet_roles {
            detail.push_str(&format!("; fleet mode ({roles})"));
        }
        detail
    }
}

impl Probe {
    /// The tailers have taken their positions.
    pub(crate) fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// The daemon's health now.
    pub fn health(&self) -> Health {
        let ready = self.ready.load(Ordering::Acquire);
        Health {
            ready,
            fresh: StoreTable::ALL
                .map(|t| !self.stores || (ready && !self.coherence.must_bypass(t))),
            api_behind: self
                .api_cache
                .iter()
                .flat_map(|c| {
                    c.tables()
                        .into_iter()
                        .filter(|t| !ready || c.must_bypass(t.id))
                        .map(|t| t.name.clone())
                })
                .collect(),
            fleet_roles: (ready && self.fleet_mode).then(|| self.fleet_stats.roles()),
        }
    }

    /// The Prometheus exposition of every metric, each written by its owner.
    pub async fn render_metrics(&self) -> String {
        let mut out = Exposition::default();
        self.server_stats.export(&mut out);
        self.api_calls.export(&mut out);
        self.cache.export(&mut out).await;
        self.tail_stats.export(&mut out);
        if self.stores {
            // Off, the stores' tables are never proven fresh: their gauges would alarm.
            self.coherence.export(&mut out);
        }
        self.fleet_stats.export(&mut out);
        self.api_stats.export(&mut out);
        crate::api::cache::export(self.api_cache.as_deref(), &mut out);
        out.finish(&self.metrics.render_histograms())
    }
}

#[cfg(test)]
mod tests {
    use super::Health;

    #[test]
    fn the_detail_names_the_tables_behind_and_the_roles() {
        let mut h = Health {
            ready: false,
            fresh: [false, false],
            api_behind: vec![],
            fleet_roles: None,
        };
        assert!(h.detail().starts_with("not ready"));
        h.ready = true;
        assert_eq!(
            h.detail(),
            "ready; kv and log not proven fresh, reads bypass the cache"
        );
        h.fresh = [true, false];
        assert_eq!(
            h.detail(),
            "ready; log not proven fresh, reads bypass the cache"
        );
        h.api_behind = vec!["Music".into()];
        assert_eq!(
            h.detail(),
            "ready; log and Music not proven fresh, reads bypass the cache"
        );
        h.fresh = [true, true];
        h.api_behind.clear();
        h.fleet_roles = Some("kv: relay, log: consumer".into());
        assert_eq!(h.detail(), "ready; fleet mode (kv: relay, log: consumer)");
    }
}
