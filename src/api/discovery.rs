//! Tables found at first use, under `dynamodb_api.tables = ["*"]`: a request that names
//! a table the cache does not hold has it described in the background (the request
//! itself is forwarded meanwhile); one that has a stream is added to the cache and its
//! stream followed ([`Follow`]): by a tailer of this daemon's own, or in fleet mode by
//! the fleet, which carries it from then on as it carries the tables found at start. Its
//! reads bypass the cache until what follows its stream proves it fresh, exactly as for
//! a table found at start. So a table created after the daemon started is cached from
//! its first use on, without a restart. The front is such a table's only user (the
//! stores' tables are known at start), so its tailer hands what it reads to the front's
//! cache directly.
//!
//! Nothing here grows with what clients send: a name is described at most once a
//! minute (names found uncacheable are remembered, up to a bound), at most a few at
//! once, only if DynamoDB would accept it as a table name, and the cache holds at most
//! [`MAX_TABLES`] tables.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::cache::{ApiCache, MAX_TABLES};
use super::tables::{describe_one, ApiTable, Described, TableId};
use crate::config::StreamsConfig;
use crate::stream::api::SdkStreams;
use crate::stream::{TailStats, Tailer};

/// How long a name found uncacheable (no stream, no such table, a failed description)
/// passes through before it is described again: a stream enabled later is found then.
const RECHECK: Duration = Duration::from_secs(60);
/// Names remembered as uncacheable; past it the oldest are described again sooner.
const REMEMBERED: u64 = 4096;
/// Descriptions in flight at once; a name that finds none free is tried at its next use.
const AT_ONCE: usize = 4;

/// Who reads the stream of a table found at first use.
pub trait Follow: Send + Sync {
    /// Starts following the stream of `name`, the front's table `id`, in the background.
    fn follow(&self, name: &str, id: TableId);
}

/// A tailer of the daemon's own per table, handing what it reads to the front's cache.
pub struct Tail {
    pub cache: Arc<ApiCache>,
    pub streams: Arc<SdkStreams>,
    pub tail_stats: Arc<TailStats>,
    pub streams_config: StreamsConfig,
    /// The daemon's tailers: a new one joins them, and stops with them.
    pub tasks: TaskTracker,
    pub stop: CancellationToken,
}

impl Follow for Tail {
    fn follow(&self, name: &str, id: TableId) {
        let start = Tailer::start(
            self.streams.clone(),
            name.to_owned(),
            id,
            self.cache.clone(),
            self.tail_stats.clone(),
            self.streams_config.clone(),
        );
        let (name, stop) = (name.to_owned(), self.stop.clone());
        self.tasks.spawn(async move {
            match start.await {
                Ok(tailer) => tailer.run(stop).await,
                // Never proven fresh, its reads bypass the cache.
                Err(e) => {
                    tracing::warn!(table = %name, error = %e, "the stream of a table found at first use cannot be read: its reads bypass the cache")
                }
            }
        });
    }
}

/// Finds the tables of `["*"]` created after start.
pub struct Discovery {
    client: aws_sdk_dynamodb::Client,
    cache: Arc<ApiCache>,
    tail_stats: Arc<TailStats>,
    follow: Box<dyn Follow>,
    /// Where the descriptions run, stopped with the daemon's tailers.
    tasks: TaskTracker,
    /// Names described lately (or being described) that the cache does not hold.
    asked: moka::sync::Cache<String, ()>,
    describing: Arc<Semaphore>,
    /// Whether the warning that the cache is full was logged.
    full: AtomicBool,
}

impl Discovery {
    pub fn new(
        client: aws_sdk_dynamodb::Client,
        cache: Arc<ApiCache>,
        tail_stats: Arc<TailStats>,
        follow: Box<dyn Follow>,
        tasks: TaskTracker,
    ) -> Discovery {
        Discovery {
            client,
            cache,
            tail_stats,
            follow,
            tasks,
            asked: moka::sync::Cache::builder()
                .max_capacity(REMEMBERED)
                .time_to_live(RECHECK)
                .build(),
            describing: Arc::new(Semaphore::new(AT_ONCE)),
            full: AtomicBool::new(false),
        }
    }

    /// Every table `request` names that the cache does not hold is looked at, in the
    /// background.
    pub fn consider(self: &Arc<Self>, request: &Map<String, Value>) {
        for name in tables_named(request) {
            self.consider_table(name);
        }
    }

    fn consider_table(self: &Arc<Self>, name: &str) {
        if self.cache.table(name).is_some() || self.asked.contains_key(name) || !valid(name) {
            return;
        }
        let Ok(permit) = self.describing.clone().try_acquire_owned() else {
            return;
        };
        // Claimed atomically: two requests naming it at once have it described, and its
        // stream followed, once.
        if !self.asked.entry_by_ref(name).or_insert(()).is_fresh() {
            return;
        }
        let (this, name) = (self.clone(), name.to_owned());
        self.tasks.spawn(async move {
            let _permit = permit;
            match describe_one(&this.client, &name).await {
                Ok(Described::Cached(table)) => this.add(table),
                Ok(Described::NoStream | Described::Missing) => {}
                Err(e) => tracing::warn!(table = %name, error = %e, "a table named by a request could not be described; it passes through"),
            }
        });
    }

    /// Caches `table` and has its stream followed.
    fn add(&self, table: ApiTable) {
        let name = table.name.clone();
        let Some(id) = self.cache.add(table) else {
            if !self.full.swap(true, Ordering::Relaxed) {
                tracing::warn!(table = %name, max = MAX_TABLES, "the DynamoDB API caches as many tables as it may: further tables pass through");
            }
            return;
        };
        self.tail_stats.name(id, &name);
        self.follow.follow(&name, id);
        tracing::info!(table = %name, "a table with a stream, found at first use, is cached from now on");
    }
}

/// The tables a request names: its `TableName`, the tables of a batch's `RequestItems`,
/// and those of a transaction's items.
fn tables_named(request: &Map<String, Value>) -> impl Iterator<Item = &str> {
    let single = request.get("TableName").and_then(Value::as_str);
    let batch = request
        .get("RequestItems")
        .and_then(Value::as_object)
        .into_iter()
        .flat_map(|items| items.keys().map(String::as_str));
    let transaction = request
        .get("TransactItems")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_object)
        .flat_map(|item| item.values())
        .filter_map(|part| part.get("TableName")?.as_str());
    single.into_iter().chain(batch).chain(transaction)
}

/// Whether DynamoDB would take `name` as a table's name: 3 to 255 of `a-z A-Z 0-9 _ - .`.
fn valid(name: &str) -> bool {
    (3..=255).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_request_names_its_tables_wherever_it_puts_them() {
        let named = |request: Value| -> Vec<String> {
            tables_named(request.as_object().unwrap())
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(named(json!({"TableName": "a", "Key": {}})), ["a"]);
        assert_eq!(
            named(json!({"RequestItems": {"b": {"Keys": []}, "c": []}})),
            ["b", "c"]
        );
        assert_eq!(
            named(json!({"TransactItems": [
                {"Put": {"TableName": "d"}}, {"ConditionCheck": {"TableName": "e"}}, {"Get": 1}
            ]})),
            ["d", "e"]
        );
        assert!(named(json!({"Statement": "SELECT * FROM f"})).is_empty());
    }

    #[test]
    fn only_names_dynamodb_would_take_are_described() {
        for ok in ["abc", "Orders-2026.v1_x", &"t".repeat(255)] {
            assert!(valid(ok), "{ok}");
        }
        for bad in ["ab", "", "a b c", "tablé", "a/b/c", &"t".repeat(256)] {
            assert!(!valid(bad), "{bad}");
        }
    }
}
