//! Daemons for the tests: in this test's runtime, built by the same root as the binary's,
//! or the binary as a process of its own; and what the tests read of them (metrics over
//! HTTP, resident memory).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ddbcached::api::cache::ApiCache;
use ddbcached::aws::ApiCalls;
use ddbcached::config::Config;
use ddbcached::daemon::{Daemon as RootDaemon, Tailers};
use ddbcached::service::Service;
use ddbcached_protocol::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::dynamodb::{dynamo_config, endpoint, TEST_TIMEOUTS_MS};

/// An HTTP/1.1 GET on loopback: the status line and the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

/// The daemon binary as a process of its own (so that its memory and descriptors can be
/// read from /proc), on DynamoDB Local with a socket in `dir` and `config` as its
/// configuration file; returns once it is ready, with its socket.
pub async fn spawn_daemon(dir: &Path, config: &str) -> (tokio::process::Child, PathBuf) {
    spawn_daemon_at(dir, config, endpoint()).await
}

/// The same on the DynamoDB at `endpoint`.
pub async fn spawn_daemon_at(
    dir: &Path,
    config: &str,
    endpoint: &str,
) -> (tokio::process::Child, PathBuf) {
    let (child, socket) = launch(dir, config, endpoint);
    wait_until_ready(|| async {
        match Client::connect(&socket).await {
            Ok(c) => c.health().await.is_ok_and(|(ready, _)| ready),
            Err(_) => false,
        }
    })
    .await;
    (child, socket)
}

/// The same for a daemon without the stores' socket (`stores.enabled = false`), on the
/// DynamoDB at `endpoint`: ready once its `/ready`, at `metrics`, says so.
pub async fn spawn_api_daemon(
    dir: &Path,
    config: &str,
    metrics: std::net::SocketAddr,
    endpoint: &str,
) -> tokio::process::Child {
    let (child, _) = launch(dir, config, endpoint);
    wait_until_ready(|| async {
        tokio::net::TcpStream::connect(metrics).await.is_ok()
            && http_get(metrics, "/ready").await.0.contains(" 200 ")
    })
    .await;
    child
}

async fn wait_until_ready<F: std::future::Future<Output = bool>>(ready: impl Fn() -> F) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ready().await {
        assert!(Instant::now() < deadline, "the daemon did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn launch(dir: &Path, config: &str, endpoint: &str) -> (tokio::process::Child, PathBuf) {
    let socket = dir.join("ddbcached.sock");
    let file = dir.join("ddbcached.toml");
    std::fs::write(&file, config).unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ddbcached"))
        .args(["serve", "--config"])
        .arg(&file)
        .env("RUST_LOG", "warn")
        .env("DDBCACHED_SOCKET", &socket)
        .env("DDBCACHED_DYNAMODB_ENDPOINT", endpoint)
        .env("DDBCACHED_DYNAMODB_REGION", "us-east-1")
        .env("DDBCACHED_DYNAMODB_USE_DUMMY_CREDENTIALS", "true")
        .envs(
            TEST_TIMEOUTS_MS
                .iter()
                .filter(|(key, _)| !config.contains(key))
                .map(|(key, ms)| {
                    let name = format!("DDBCACHED_DYNAMODB_{}", key.to_ascii_uppercase());
                    (name, ms.to_string())
                }),
        )
        // Memory that glibc keeps after a peak would hide or fake a leak: one arena (with
        // one per thread the pools kept growing, 0.5 MiB a round over twelve rounds), and
        // fixed thresholds (glibc otherwise raises them after large frees), so that
        // blocks from 64 KiB are mapped and unmapped and a freed heap top is returned.
        .env("MALLOC_ARENA_MAX", "1")
        .env("MALLOC_MMAP_THRESHOLD_", "65536")
        .env("MALLOC_TRIM_THRESHOLD_", "131072")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    (child, socket)
}

/// A process's resident memory, bytes.
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// A daemon running in this test's runtime, on its own socket, built by the same root
/// as the binary's.
pub struct Daemon {
    pub socket: PathBuf,
    pub config: Config,
    /// The daemon's internals, for counters and test hooks.
    pub service: Arc<Service>,
    /// DynamoDB calls the daemon made, by API.
    pub api_calls: Arc<ApiCalls>,
    metrics: std::net::SocketAddr,
    /// Where the DynamoDB API listens, if the configuration turns it on.
    pub api: Option<std::net::SocketAddr>,
    /// The DynamoDB API's cache, if the configuration names tables to cache.
    pub api_cache: Option<Arc<ApiCache>>,
    shutdown: CancellationToken,
    tailers: Option<Tailers>,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// A daemon on DynamoDB Local.
    pub async fn start() -> Daemon {
        Self::start_with(|_| {}).await
    }

    /// A daemon on DynamoDB Local with a changed configuration.
    pub async fn start_with(edit: impl FnOnce(&mut Config)) -> Daemon {
        let mut config = dynamo_config(endpoint());
        edit(&mut config);
        Self::start_config(config).await
    }

    /// A daemon with exactly this configuration (its socket path and metrics address are
    /// replaced), its stream tailers positioned and caught up.
    pub async fn start_config(config: Config) -> Daemon {
        let d = Self::launch(config, true).await;
        d.wait_until_fresh().await;
        d
    }

    /// A daemon whose DynamoDB has no usable stream (a fake endpoint): no tailers, so
    /// every read bypasses the cache.
    pub async fn start_without_tailers(config: Config) -> Daemon {
        Self::launch(config, false).await
    }

    async fn launch(mut config: Config, tail: bool) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        config.server.socket_path = dir.path().join("ddbcached.sock");
        config.metrics.listen = "127.0.0.1:0".into();
        config.validate().unwrap();
        let daemon = if tail {
            RootDaemon::start(&config).await
        } else {
            RootDaemon::start_without_tailers(&config).await
        }
        .unwrap();
        let shutdown = CancellationToken::new();
        Daemon {
            socket: config.server.socket_path.clone(),
            config,
            service: daemon.service().clone(),
            api_calls: daemon.api_calls().clone(),
            metrics: daemon.metrics_addr().unwrap(),
            api: daemon.api_addr(),
            api_cache: daemon.api_cache().cloned(),
            tailers: daemon.tailers(),
            task: Some(tokio::spawn(daemon.run(shutdown.clone()))),
            shutdown,
            _dir: dir,
        }
    }

    /// A new connection.
    pub async fn client(&self) -> Client {
        Client::connect(&self.socket).await.unwrap()
    }

    /// Stops the daemon's stream tailers and waits until they have (the daemon goes on
    /// serving).
    pub async fn stop_tailers(&self) {
        if let Some(tailers) = &self.tailers {
            tailers.stop().await;
        }
    }

    /// Waits until every tailer has proven itself caught up, so that reads are served
    /// from the cache (the stores' only if the daemon serves them).
    pub async fn wait_until_fresh(&self) {
        use ddbcached::store::StoreTable;
        let stores = self.config.stores.enabled;
        let api_behind = || {
            self.api_cache
                .as_ref()
                .is_some_and(|c| c.tables().iter().any(|t| c.must_bypass(t.id)))
        };
        tokio::time::timeout(Duration::from_secs(120), async {
            while (stores
                && StoreTable::ALL
                    .iter()
                    .any(|t| self.service.coherence().must_bypass(*t)))
                || api_behind()
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the tailers catch up within 120 s");
    }

    /// Whole-table invalidations the tailers have made so far. DynamoDB Local sometimes
    /// reports stream records as trimmed when none were (aws/aws-sdk-java#2923); the
    /// tailer then rightly flushes, which tests counting DynamoDB calls must notice.
    pub fn flushes(&self) -> u64 {
        self.service.coherence().snapshot().flushes.iter().sum()
    }

    /// The address of the daemon's metrics endpoint (on a free loopback port).
    pub fn metrics_endpoint(&self) -> std::net::SocketAddr {
        self.metrics
    }

    /// Signals shutdown without waiting for it.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Stops the daemon and waits until it has.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }

    /// Whether the daemon's task is still running.
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
