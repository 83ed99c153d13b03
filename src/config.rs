//! Settings: one TOML section per component, every key with a default, and
//! `DDBCACHED_<SECTION>_<KEY>` environment variables that override the file.
//!
//! Errors name the key and the value (`server.max_frame_bytes = 10 is not valid: ...`),
//! so an operator can fix a bad setting without reading code. The binary exits with code
//! 64 (EX_USAGE) on any [`ConfigError`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// DynamoDB's item size limit; a frame must be able to carry one whole item.
const MIN_FRAME_BYTES: usize = 512 * 1024;

/// Environment variables that are not `DDBCACHED_<SECTION>_<KEY>` but name a key directly.
const ENV_ALIASES: [(&str, &str, &str); 1] = [("DDBCACHED_SOCKET", "server", "socket_path")];

/// Sections that were renamed, old name first. Files and variables that use the old name
/// still load, with a warning ([`Config::warnings`]).
const RENAMED_SECTIONS: [(&str, &str); 2] = [("fanout", "fleet"), ("log", "logging")];

/// The whole configuration.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub stores: StoresConfig,
    pub dynamodb: DynamoConfig,
    pub cache: CacheConfig,
    pub streams: StreamsConfig,
    pub fleet: FleetConfig,
    pub dynamodb_api: DynamoApiConfig,
    pub metrics: MetricsConfig,
    pub logging: LoggingConfig,
    /// What the configuration said in an outdated way (a renamed section), for the
    /// daemon to log once logging is set up.
    #[serde(skip)]
    pub warnings: Vec<String>,
}

/// The Unix-socket server.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Where the daemon listens; its parent directory is created if missing.
    pub socket_path: PathBuf,
    /// File mode of the socket: who may connect (owner and group by default).
    pub socket_mode: u32,
    /// Largest frame accepted from a client; a larger one is answered with an error and the
    /// connection is closed. Also bounds the frames the daemon sends.
    pub max_frame_bytes: usize,
    /// Connections served at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// Requests of one connection processed at once; past this the daemon stops reading
    /// that connection until one finishes (back-pressure instead of unbounded buffering).
    pub max_in_flight_per_connection: usize,
    /// On shutdown, how long requests in progress get to finish.
    pub shutdown_grace_ms: u64,
    /// A connection with nothing in flight and no frame for this long is closed, and so is
    /// one whose client has not read its replies for this long; 0: never.
    pub idle_timeout_ms: u64,
    /// If not empty, only peers running as one of these uids (or in `allowed_gids`) may
    /// connect; checked with the peer's credentials (SO_PEERCRED).
    pub allowed_uids: Vec<u32>,
    /// If not empty, peers whose gid is one of these may connect too.
    pub allowed_gids: Vec<u32>,
    /// Threads that run the daemon. 1 runs everything on one thread (no wake-up crosses
    /// threads: the cheapest on a small host); 0 picks 1 on a host of at most two cores
    /// and one per core on larger ones.
    pub worker_threads: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            socket_path: PathBuf::from("/run/ddbcached/ddbcached.sock"),
            socket_mode: 0o660,
            max_frame_bytes: 1024 * 1024,
            max_connections: 1024,
            max_in_flight_per_connection: 128,
            shutdown_grace_ms: 5000,
            idle_timeout_ms: 300_000,
            allowed_uids: Vec::new(),
            allowed_gids: Vec::new(),
            worker_threads: 0,
        }
    }
}

/// DynamoDB access.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DynamoConfig {
    /// Endpoint URL; empty means the AWS default for the region.
    pub endpoint: String,
    /// Region; empty means the standard AWS chain (`AWS_REGION`, profile, instance metadata).
    pub region: String,
    /// Sign requests with a fixed dummy key instead of the AWS credential chain. Only for
    /// DynamoDB Local, which accepts any key.
    pub use_dummy_credentials: bool,
    /// Table of the key-value store.
    pub kv_table: String,
    /// Table of the indexed store.
    pub log_table: String,
    /// Time to open a connection to DynamoDB.
    pub connect_timeout_ms: u64,
    /// Time for one attempt of a call.
    pub attempt_timeout_ms: u64,
    /// Time for a whole call, retries included: the longest a client waits on DynamoDB.
    pub operation_timeout_ms: u64,
    /// Attempts per call (throttling and 5xx are retried with backoff by the SDK).
    pub max_attempts: u32,
    /// `standard` or `adaptive` (adaptive also rate-limits the client when throttled).
    pub retry_mode: String,
    /// Attempts to write a batch whose items DynamoDB left unprocessed.
    pub batch_max_attempts: u32,
    /// Attempts to allocate a log index when other writers keep winning the race.
    pub index_allocation_max_attempts: u32,
    /// Table of the relay leases of fleet mode (`[fleet]`): who reads which table's
    /// stream, and where each reader stands.
    pub lease_table: String,
}

impl Default for DynamoConfig {
    fn default() -> Self {
        DynamoConfig {
            endpoint: String::new(),
            region: String::new(),
            use_dummy_credentials: false,
            kv_table: "_zflow_key_value_store".into(),
            log_table: "_zflow_indexed_store".into(),
            connect_timeout_ms: 1000,
            attempt_timeout_ms: 2000,
            operation_timeout_ms: 5000,
            max_attempts: 3,
            retry_mode: "standard".into(),
            batch_max_attempts: 10,
            index_allocation_max_attempts: 64,
            lease_table: "_ddbcached_leases".into(),
        }
    }
}

impl DynamoConfig {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    pub fn attempt_timeout(&self) -> Duration {
        Duration::from_millis(self.attempt_timeout_ms)
    }
    pub fn operation_timeout(&self) -> Duration {
        Duration::from_millis(self.operation_timeout_ms)
    }
}

/// The in-memory cache.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Memory for cached keys and values (keys, values and per-entry bookkeeping).
    pub max_bytes: u64,
    /// Entries older than this are dropped even if nothing invalidated them (a safety
    /// net); 0 turns it off.
    pub ttl_secs: u64,
    /// Versions of a key read by one fill (newest first); reads older than those go to
    /// DynamoDB.
    pub fill_max_versions: u32,
    /// Entries kept per topic (the newest), for reads of a log's tail.
    pub log_tail_entries: usize,
    /// When the stream tailer cannot prove it has applied every change older than this,
    /// reads bypass the cache (strongly consistent DynamoDB reads) until it can.
    pub max_staleness_ms: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_bytes: 256 * 1024 * 1024,
            ttl_secs: 600,
            fill_max_versions: 64,
            log_tail_entries: 128,
            max_staleness_ms: 2000,
        }
    }
}

/// The DynamoDB Streams tailers.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StreamsConfig {
    /// Pause between two polls of a table's shards (none while a shard has a backlog).
    pub poll_interval_ms: u64,
    /// How long a write's record may take to become readable in the stream after
    /// DynamoDB acknowledged the write. DynamoDB promises no bound; a poll's proof of
    /// freshness is dated this much before the poll began.
    pub propagation_allowance_ms: u64,
    /// How often the whole stream is re-described to find new shards, and the table's
    /// stream ARN re-read to notice a replaced stream.
    pub discovery_interval_ms: u64,
    /// Processes reading each table's stream, this daemon included (other daemons,
    /// Lambda triggers...). DynamoDB Streams serves about two readers per shard.
    pub stream_readers: u32,
}

impl Default for StreamsConfig {
    fn default() -> Self {
        StreamsConfig {
            poll_interval_ms: 250,
            propagation_allowance_ms: 500,
            discovery_interval_ms: 60_000,
            stream_readers: 1,
        }
    }
}

impl StreamsConfig {
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }
    pub fn propagation_allowance(&self) -> Duration {
        Duration::from_millis(self.propagation_allowance_ms)
    }
    pub fn discovery_interval(&self) -> Duration {
        Duration::from_millis(self.discovery_interval_ms)
    }
}

/// Fleet mode: one or two daemons per table read its stream and relay what they read
/// through a Redis stream that every daemon consumes.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FleetConfig {
    /// `redis://host:port`, `rediss://host:port` (TLS) or `unix:///path`; a Redis
    /// Cluster: `redis+cluster://host:port,host:port` (seed nodes; `rediss+cluster://`
    /// with TLS). Empty: no fleet, this daemon reads the streams itself (for one or two
    /// daemons per table). Credentials belong in the environment
    /// (`DDBCACHED_FLEET_REDIS_URL`), not in this file.
    pub redis_url: String,
    /// Relay lease slots per table: the holder of slot 0 reads the stream and publishes;
    /// with 2, the holder of slot 1 stands by (reads nothing) and takes slot 0 first once
    /// its lease lapses.
    pub relay_slots: u32,
    /// Whether this daemon may hold a relay lease (read a stream and publish it).
    pub relay_eligible: bool,
    /// A relay lease not renewed for this long (on the observer's own clock) is taken
    /// over; renewed every third of it.
    pub lease_ms: u64,
    /// The most the relays' wall clocks may be ahead of this host's: subtracted from
    /// every freshness claim they publish.
    pub clock_skew_ms: u64,
    /// Entries older than this are trimmed from the Redis streams; a daemon that falls
    /// further behind flushes the table.
    pub retention_ms: u64,
    /// Publish the key of every acknowledged write so that the other daemons drop it at
    /// once instead of a poll round later.
    pub write_hints: bool,
    /// With `rediss://`: the PEM file of the certificate authority that signed Redis's
    /// certificate; empty: the system's trusted roots.
    pub tls_ca_file: String,
    /// Shared key authenticating every entry (HMAC-SHA256); empty: entries are not
    /// authenticated, and whoever can write to Redis can claim freshness. Set it from the
    /// environment (`DDBCACHED_FLEET_AUTH_KEY`).
    pub auth_key: String,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            redis_url: String::new(),
            relay_slots: 2,
            relay_eligible: true,
            lease_ms: 10_000,
            clock_skew_ms: 250,
            retention_ms: 600_000,
            write_hints: true,
            tls_ca_file: String::new(),
            auth_key: String::new(),
        }
    }
}

impl FleetConfig {
    /// Whether fleet mode is on.
    pub fn enabled(&self) -> bool {
        !self.redis_url.is_empty()
    }
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }
}

/// DynamoDB's own HTTP API, answered for any AWS SDK ([`crate::api`]).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DynamoApiConfig {
    /// Loopback address to answer on (`127.0.0.1:8100`); empty: not on TCP. Whoever can
    /// connect acts with the daemon's AWS credentials, so no other address is accepted.
    pub listen: String,
    /// The same API on a Unix socket too (its peers checked against
    /// `server.allowed_uids` and `server.allowed_gids`); empty: no socket.
    pub socket_path: PathBuf,
    /// File mode of that socket.
    pub socket_mode: u32,
    /// Forward operations that change tables (CreateTable, DeleteTable, UpdateTable,
    /// tags, backups, ...); refused with AccessDeniedException when false.
    pub control_plane: bool,
    /// Largest request body taken (after gzip decoding); DynamoDB's largest request, a
    /// BatchWriteItem, is 16 MB.
    pub max_body_bytes: usize,
    /// Connections served at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// A connection with no request for this long is closed, and so is one that takes
    /// longer to send a request's head or body.
    pub idle_timeout_ms: u64,
    /// Tables whose reads the front answers from memory (each must have a stream, which
    /// the daemon tails); every other table passes through untouched.
    pub tables: Vec<String>,
    /// The most the front's cached items and query results take in memory, in bytes.
    pub cache_max_bytes: u64,
}

impl Default for DynamoApiConfig {
    fn default() -> Self {
        DynamoApiConfig {
            listen: String::new(),
            socket_path: PathBuf::new(),
            socket_mode: 0o660,
            control_plane: false,
            max_body_bytes: 16 * 1024 * 1024,
            max_connections: 256,
            idle_timeout_ms: 60_000,
            tables: Vec::new(),
            cache_max_bytes: 256 * 1024 * 1024,
        }
    }
}

/// The zio-flow stores: the key-value and indexed stores in `dynamodb.kv_table` and
/// `dynamodb.log_table`, served over the Unix socket (`[server]`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoresConfig {
    /// Off: the daemon serves only DynamoDB's API (`[dynamodb_api]`); the stores' tables
    /// need not exist and are neither checked nor tailed, and no socket is bound.
    pub enabled: bool,
}

impl Default for StoresConfig {
    fn default() -> Self {
        StoresConfig { enabled: true }
    }
}

/// The Prometheus endpoint.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the HTTP endpoint serving `/metrics` and `/ready`; empty turns it off
    /// (so that several daemons can share a host).
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: "127.0.0.1:9464".into(),
        }
    }
}

/// Logging.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingConfig {
    /// Filter in `tracing` syntax (`info`, `ddbcached=debug`); `RUST_LOG` overrides it.
    pub level: String,
    /// `text` for people, `json` for log collectors.
    pub format: String,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: String, message: String },
    #[error("{name}={value} is not valid: {reason}")]
    Env {
        name: String,
        value: String,
        reason: String,
    },
    #[error("{key} = {value} is not valid: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: String,
    },
}

impl Config {
    /// Loads the file (if any), applies `DDBCACHED_*` variables from the process
    /// environment, and checks the result.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    /// Like [`Config::load`] with an explicit environment (for tests).
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let (text, origin) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_owned(),
                    source,
                })?,
                p.display().to_string(),
            ),
            None => (String::new(), "(defaults)".to_owned()),
        };
        let mut table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: origin.clone(),
            message: e.to_string(),
        })?;
        let mut warnings = Vec::new();
        rename_sections(&mut table, &origin, &mut warnings)?;
        apply_env(&mut table, env, &mut warnings)?;
        let mut config: Config =
            table
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: origin,
                    message: e.to_string(),
                })?;
        config.validate()?;
        config.warnings = warnings;
        Ok(config)
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        let d = &self.dynamodb;
        check(
            "server.socket_path",
            s.socket_path.display(),
            !s.socket_path.as_os_str().is_empty(),
            "must not be empty",
        )?;
        check(
            "server.socket_mode",
            format!("{:#o}", s.socket_mode),
            s.socket_mode <= 0o777,
            "must be a file mode between 0o000 and 0o777",
        )?;
        check(
            "server.max_frame_bytes",
            s.max_frame_bytes,
            (MIN_FRAME_BYTES..=u32::MAX as usize).contains(&s.max_frame_bytes),
            "must be between 524288 (one whole DynamoDB item) and 4294967295",
        )?;
        check(
            "server.max_connections",
            s.max_connections,
            s.max_connections > 0,
            "must be at least 1",
        )?;
        check(
            "server.max_in_flight_per_connection",
            s.max_in_flight_per_connection,
            s.max_in_flight_per_connection > 0,
            "must be at least 1",
        )?;
        check(
            "dynamodb.kv_table",
            &d.kv_table,
            !d.kv_table.is_empty(),
            "must not be empty",
        )?;
        check(
            "dynamodb.log_table",
            &d.log_table,
            !d.log_table.is_empty(),
            "must not be empty",
        )?;
        check(
            "dynamodb.log_table",
            &d.log_table,
            d.log_table != d.kv_table,
            "must differ from dynamodb.kv_table",
        )?;
        for (key, v) in [
            ("dynamodb.connect_timeout_ms", d.connect_timeout_ms),
            ("dynamodb.attempt_timeout_ms", d.attempt_timeout_ms),
            ("dynamodb.operation_timeout_ms", d.operation_timeout_ms),
        ] {
            check(key, v, v > 0, "must be at least 1")?;
        }
        for (key, v) in [
            ("dynamodb.max_attempts", d.max_attempts),
            ("dynamodb.batch_max_attempts", d.batch_max_attempts),
            (
                "dynamodb.index_allocation_max_attempts",
                d.index_allocation_max_attempts,
            ),
        ] {
            check(key, v, v > 0, "must be at least 1")?;
        }
        check(
            "dynamodb.retry_mode",
            &d.retry_mode,
            matches!(d.retry_mode.as_str(), "standard" | "adaptive"),
            "must be `standard` or `adaptive`",
        )?;
        check(
            "cache.max_bytes",
            self.cache.max_bytes,
            self.cache.max_bytes > 0,
            "must be at least 1",
        )?;
        check(
            "cache.fill_max_versions",
            self.cache.fill_max_versions,
            self.cache.fill_max_versions > 0,
            "must be at least 1",
        )?;
        check(
            "streams.poll_interval_ms",
            self.streams.poll_interval_ms,
            self.streams.poll_interval_ms > 0
                && self.streams.poll_interval_ms < self.cache.max_staleness_ms,
            "must be at least 1 and less than cache.max_staleness_ms",
        )?;
        let st = &self.streams;
        check(
            "streams.propagation_allowance_ms",
            st.propagation_allowance_ms,
            st.poll_interval_ms + st.propagation_allowance_ms < self.cache.max_staleness_ms,
            "plus streams.poll_interval_ms must be less than cache.max_staleness_ms",
        )?;
        check(
            "streams.stream_readers",
            self.streams.stream_readers,
            self.streams.stream_readers > 0,
            "must be at least 1",
        )?;
        let f = &self.fleet;
        check(
            "fleet.redis_url",
            redacted(&f.redis_url),
            f.redis_url.is_empty()
                || [
                    "redis://",
                    "rediss://",
                    "unix://",
                    "redis+cluster://",
                    "rediss+cluster://",
                ]
                .iter()
                .any(|scheme| f.redis_url.starts_with(scheme)),
            "must be empty or start with redis://, rediss://, unix://, redis+cluster:// or \
             rediss+cluster://",
        )?;
        check(
            "fleet.relay_slots",
            f.relay_slots,
            (1..=2).contains(&f.relay_slots),
            "must be 1 or 2 (DynamoDB Streams serves about two readers per shard)",
        )?;
        check(
            "fleet.lease_ms",
            f.lease_ms,
            f.lease_ms >= 300,
            "must be at least 300",
        )?;
        if f.enabled() {
            check(
                "fleet.clock_skew_ms",
                f.clock_skew_ms,
                f.clock_skew_ms + st.poll_interval_ms + st.propagation_allowance_ms
                    < self.cache.max_staleness_ms,
                "plus streams.poll_interval_ms and streams.propagation_allowance_ms must be \
                 less than cache.max_staleness_ms",
            )?;
            check(
                "fleet.retention_ms",
                f.retention_ms,
                f.retention_ms > self.cache.max_staleness_ms,
                "must be more than cache.max_staleness_ms",
            )?;
        }
        check(
            "dynamodb.lease_table",
            &d.lease_table,
            !d.lease_table.is_empty()
                && d.lease_table != d.kv_table
                && d.lease_table != d.log_table,
            "must not be empty and must differ from the data tables",
        )?;
        let a = &self.dynamodb_api;
        let front = !a.listen.is_empty() || !a.socket_path.as_os_str().is_empty();
        check(
            "stores.enabled",
            self.stores.enabled,
            self.stores.enabled || front,
            "may be false only with the DynamoDB API on (dynamodb_api.listen or \
             dynamodb_api.socket_path): there would be nothing to serve",
        )?;
        check(
            "stores.enabled",
            self.stores.enabled,
            self.stores.enabled || !self.fleet.enabled() || !a.tables.is_empty(),
            "may be false in fleet mode only with tables to carry (dynamodb_api.tables)",
        )?;
        check(
            "dynamodb_api.listen",
            &a.listen,
            a.listen.is_empty()
                || a.listen
                    .parse::<std::net::SocketAddr>()
                    .is_ok_and(|addr| addr.ip().is_loopback()),
            "must be empty or a loopback address like 127.0.0.1:8100 (whoever can connect \
             acts with the daemon's AWS credentials)",
        )?;
        check(
            "dynamodb_api.socket_mode",
            format!("{:#o}", a.socket_mode),
            a.socket_mode <= 0o777,
            "must be a file mode between 0o000 and 0o777",
        )?;
        check(
            "dynamodb_api.socket_path",
            a.socket_path.display(),
            a.socket_path.as_os_str().is_empty() || a.socket_path != s.socket_path,
            "must differ from server.socket_path",
        )?;
        check(
            "dynamodb_api.max_body_bytes",
            a.max_body_bytes,
            a.max_body_bytes >= 65536,
            "must be at least 65536",
        )?;
        check(
            "dynamodb_api.max_connections",
            a.max_connections,
            a.max_connections > 0,
            "must be at least 1",
        )?;
        check(
            "dynamodb_api.idle_timeout_ms",
            a.idle_timeout_ms,
            a.idle_timeout_ms >= 100,
            "must be at least 100",
        )?;
        check(
            "dynamodb_api.tables",
            a.tables.join(","),
            a.tables.iter().all(|t| !t.is_empty() && !t.contains(','))
                && a.tables
                    .iter()
                    .collect::<std::collections::BTreeSet<_>>()
                    .len()
                    == a.tables.len(),
            "must name each table once",
        )?;
        check(
            "dynamodb_api.cache_max_bytes",
            a.cache_max_bytes,
            a.cache_max_bytes >= 1024 * 1024,
            "must be at least 1048576",
        )?;
        check(
            "metrics.listen",
            &self.metrics.listen,
            self.metrics.listen.is_empty()
                || self.metrics.listen.parse::<std::net::SocketAddr>().is_ok(),
            "must be empty or an address like 127.0.0.1:9464",
        )?;
        check(
            "logging.format",
            &self.logging.format,
            matches!(self.logging.format.as_str(), "text" | "json"),
            "must be `text` or `json`",
        )?;
        Ok(())
    }
}

/// A URL with its credentials (`user:password@`) masked, for messages.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

fn check(
    key: &'static str,
    value: impl std::fmt::Display,
    ok: bool,
    reason: &str,
) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            key,
            value: value.to_string(),
            reason: reason.into(),
        })
    }
}

/// Moves each renamed section of the file to its new name; a file with both is refused.
fn rename_sections(
    table: &mut toml::Table,
    origin: &str,
    warnings: &mut Vec<String>,
) -> Result<(), ConfigError> {
    for (old, new) in RENAMED_SECTIONS {
        let Some(section) = table.remove(old) else {
            continue;
        };
        if table.contains_key(new) {
            return Err(ConfigError::Parse {
                path: origin.to_owned(),
                message: format!("[{old}] is the old name of [{new}]; keep only [{new}]"),
            });
        }
        warnings.push(format!(
            "config file {origin}: section [{old}] is now called [{new}]; the old name still works"
        ));
        table.insert(new.to_owned(), section);
    }
    Ok(())
}

/// A variable's name with a renamed section's old name replaced by the new one, and
/// whether it was.
fn current_env_name(name: &str) -> (String, bool) {
    for (old, new) in RENAMED_SECTIONS {
        let old_prefix = format!("DDBCACHED_{}_", old.to_ascii_uppercase());
        if let Some(key) = name.strip_prefix(&old_prefix) {
            return (
                format!("DDBCACHED_{}_{key}", new.to_ascii_uppercase()),
                true,
            );
        }
    }
    (name.to_owned(), false)
}

/// Writes every `DDBCACHED_<SECTION>_<KEY>` (and alias) variable into `table`, typed like
/// the key's default so that `DDBCACHED_SERVER_MAX_FRAME_BYTES=2097152` is an integer.
/// Variables that name no key are left alone: other tools share the prefix.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
    warnings: &mut Vec<String>,
) -> Result<(), ConfigError> {
    let defaults = toml::Table::try_from(Config::default())
        .expect("the default configuration serializes to TOML");
    for (given, value) in env {
        if !given.starts_with("DDBCACHED_") {
            continue;
        }
        let (name, renamed) = current_env_name(&given);
        let target = ENV_ALIASES
            .iter()
            .find(|(alias, _, _)| *alias == name)
            .map(|(_, s, k)| (s.to_string(), k.to_string()))
            .or_else(|| {
                defaults.iter().find_map(|(section, keys)| {
                    let keys = keys.as_table()?;
                    keys.keys()
                        .find(|k| {
                            name == format!("DDBCACHED_{}_{}", section, k).to_ascii_uppercase()
                        })
                        .map(|k| (section.clone(), k.clone()))
                })
            });
        let Some((section, key)) = target else {
            continue;
        };
        if renamed {
            warnings.push(format!(
                "{given} is now called {name}; the old name still works"
            ));
        }
        let invalid = |reason: &str| ConfigError::Env {
            name: given.clone(),
            value: value.clone(),
            reason: reason.into(),
        };
        let typed = match &defaults[&section][&key] {
            toml::Value::Integer(_) => toml::Value::Integer(
                parse_int(&value).ok_or_else(|| invalid("expected an integer"))?,
            ),
            toml::Value::Boolean(_) => toml::Value::Boolean(
                value
                    .parse()
                    .map_err(|_| invalid("expected true or false"))?,
            ),
            toml::Value::Array(_) if STRING_LISTS.contains(&(section.as_str(), key.as_str())) => {
                toml::Value::Array(
                    value
                        .split(',')
                        .map(str::trim)
                        .filter(|v| !v.is_empty())
                        .map(|v| toml::Value::String(v.to_owned()))
                        .collect(),
                )
            }
            toml::Value::Array(_) => toml::Value::Array(
                value
                    .split(',')
                    .filter(|v| !v.trim().is_empty())
                    .map(|v| parse_int(v.trim()).map(toml::Value::Integer))
                    .collect::<Option<_>>()
                    .ok_or_else(|| invalid("expected integers separated by commas"))?,
            ),
            _ => toml::Value::String(value.clone()),
        };
        table
            .entry(section)
            .or_insert_with(|| toml::Value::Table(Default::default()))
            .as_table_mut()
            .ok_or_else(|| invalid("the config file's section of that name is not a table"))?
            .insert(key, typed);
    }
    Ok(())
}

/// Keys whose values are lists of names (every other list holds integers).
const STRING_LISTS: [(&str, &str); 1] = [("dynamodb_api", "tables")];

/// Integers in decimal, or octal with `0o` (file modes).
fn parse_int(s: &str) -> Option<i64> {
    match s.strip_prefix("0o") {
        Some(oct) => i64::from_str_radix(oct, 8).ok(),
        None => s.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn shipped_configs_load_and_document_every_key() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let full = Config::load_with_env(Some(&root.join("config/ddbcached.toml")), []).unwrap();
        assert_eq!(
            full,
            Config::default(),
            "config/ddbcached.toml must show the defaults"
        );
        let text = std::fs::read_to_string(root.join("config/ddbcached.toml")).unwrap();
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        for (section, keys) in &defaults {
            assert!(
                text.contains(&format!("[{section}]")),
                "section {section} undocumented"
            );
            for key in keys.as_table().unwrap().keys() {
                assert!(
                    text.contains(&format!("\n{key} = ")),
                    "{section}.{key} undocumented"
                );
            }
        }
        let local = Config::load_with_env(Some(&root.join("config/local.toml")), []).unwrap();
        assert!(local.dynamodb.endpoint.starts_with("http://127.0.0.1:"));
    }

    #[test]
    fn env_overrides_file_and_defaults() {
        let c = Config::load_with_env(
            None,
            env(&[
                ("DDBCACHED_SOCKET", "/tmp/x.sock"),
                ("DDBCACHED_DYNAMODB_ENDPOINT", "http://127.0.0.1:9"),
                ("DDBCACHED_SERVER_SOCKET_MODE", "0o600"),
                ("DDBCACHED_DYNAMODB_USE_DUMMY_CREDENTIALS", "true"),
                ("DDBCACHED_SERVER_ALLOWED_UIDS", "0, 1000"),
                ("DDBCACHED_METRICS_LISTEN", ""),
                ("DDBCACHED_TEST_ENDPOINT", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(c.server.socket_path, Path::new("/tmp/x.sock"));
        assert_eq!(c.dynamodb.endpoint, "http://127.0.0.1:9");
        assert_eq!(c.server.socket_mode, 0o600);
        assert!(c.dynamodb.use_dummy_credentials);
        assert_eq!(c.server.allowed_uids, vec![0, 1000]);
        assert_eq!(
            c.metrics.listen, "",
            "an empty value turns the endpoint off"
        );
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = Config::load_with_env(None, env(&[("DDBCACHED_SERVER_MAX_FRAME_BYTES", "big")]))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "DDBCACHED_SERVER_MAX_FRAME_BYTES=big is not valid: expected an integer"
        );
        let e = Config::load_with_env(None, env(&[("DDBCACHED_SERVER_MAX_FRAME_BYTES", "10")]))
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("server.max_frame_bytes = 10 is not valid"),
            "{e}"
        );
        let e =
            Config::load_with_env(None, env(&[("DDBCACHED_LOGGING_FORMAT", "xml")])).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("logging.format = xml is not valid"),
            "{e}"
        );
    }

    #[test]
    fn a_bad_redis_url_is_named_without_its_password() {
        let e = Config::load_with_env(
            None,
            env(&[("DDBCACHED_FLEET_REDIS_URL", "http://u:hunter2@h:6379")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("fleet.redis_url = http://***@h:6379"), "{e}");
        assert!(!e.contains("hunter2"));
    }

    #[test]
    fn renamed_sections_still_load_with_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[fanout]\nlease_ms = 3000\n[log]\nformat = \"json\"\n").unwrap();
        let c = Config::load_with_env(
            Some(&p),
            env(&[
                ("DDBCACHED_FANOUT_RELAY_SLOTS", "1"),
                ("DDBCACHED_LOG_LEVEL", "warn"),
            ]),
        )
        .unwrap();
        assert_eq!(c.fleet.lease_ms, 3000);
        assert_eq!(c.fleet.relay_slots, 1);
        assert_eq!(c.logging.format, "json");
        assert_eq!(c.logging.level, "warn");
        assert_eq!(c.warnings.len(), 4, "{:?}", c.warnings);
        assert!(c
            .warnings
            .iter()
            .any(|w| w.contains("[fanout] is now called [fleet]")));
        assert!(c
            .warnings
            .iter()
            .any(|w| w.contains("DDBCACHED_LOG_LEVEL is now called DDBCACHED_LOGGING_LEVEL")));
        // Both names at once is a mistake to point out, not to guess at.
        std::fs::write(
            &p,
            "[log]\nformat = \"json\"\n[logging]\nlevel = \"info\"\n",
        )
        .unwrap();
        let e = Config::load_with_env(Some(&p), []).unwrap_err();
        assert!(
            e.to_string().contains("[log] is the old name of [logging]"),
            "{e}"
        );
        // The current names warn of nothing.
        let c = Config::load_with_env(None, env(&[("DDBCACHED_LOGGING_LEVEL", "warn")])).unwrap();
        assert!(c.warnings.is_empty());
    }

    #[test]
    fn the_stores_can_be_off_only_for_a_daemon_serving_the_api_and_its_tables() {
        let load = |pairs: &[(&str, &str)]| Config::load_with_env(None, env(pairs));
        assert!(load(&[]).unwrap().stores.enabled);
        let off = ("DDBCACHED_STORES_ENABLED", "false");
        let e = load(&[off]).unwrap_err().to_string();
        assert!(e.starts_with("stores.enabled = false is not valid"), "{e}");
        let api = ("DDBCACHED_DYNAMODB_API_LISTEN", "127.0.0.1:8100");
        assert!(!load(&[off, api]).unwrap().stores.enabled);
        let fleet = ("DDBCACHED_FLEET_REDIS_URL", "redis://127.0.0.1:6379");
        let e = load(&[off, api, fleet]).unwrap_err().to_string();
        assert!(e.contains("dynamodb_api.tables"), "{e}");
        let tables = ("DDBCACHED_DYNAMODB_API_TABLES", "orders");
        assert!(!load(&[off, api, fleet, tables]).unwrap().stores.enabled);
    }

    #[test]
    fn the_dynamodb_api_listens_on_loopback_only() {
        for ok in ["", "127.0.0.1:8100", "127.0.0.2:0", "[::1]:8100"] {
            let c =
                Config::load_with_env(None, env(&[("DDBCACHED_DYNAMODB_API_LISTEN", ok)])).unwrap();
            assert_eq!(c.dynamodb_api.listen, ok);
        }
        for bad in [
            "0.0.0.0:8100",
            "10.0.0.5:8100",
            "[::]:8100",
            "localhost:8100",
            "8100",
        ] {
            let e = Config::load_with_env(None, env(&[("DDBCACHED_DYNAMODB_API_LISTEN", bad)]))
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with(&format!("dynamodb_api.listen = {bad} is not valid")),
                "{e}"
            );
        }
    }

    #[test]
    fn cached_api_tables_come_as_names_separated_by_commas() {
        let c = Config::load_with_env(
            None,
            env(&[("DDBCACHED_DYNAMODB_API_TABLES", "Music, Orders,")]),
        )
        .unwrap();
        assert_eq!(c.dynamodb_api.tables, ["Music", "Orders"]);
        let e = Config::load_with_env(None, env(&[("DDBCACHED_DYNAMODB_API_TABLES", "a,a")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("dynamodb_api.tables = a,a is not valid"),
            "{e}"
        );
    }

    #[test]
    fn unknown_file_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[server]\nsocket_pth = \"/x\"\n").unwrap();
        let e = Config::load_with_env(Some(&p), []).unwrap_err();
        assert!(e.to_string().contains("socket_pth"), "{e}");
    }
}
