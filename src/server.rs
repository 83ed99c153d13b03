//! The Unix socket: binding it safely, accepting connections, shutting down, and what
//! the server counts ([`ServerStats`]).
//!
//! Binding refuses to take over a socket a live daemon still answers on, replaces a stale
//! socket file left by a crash, never deletes a file that is not a socket, and sets the
//! socket's mode. The socket file is removed when the [`Listener`] is dropped.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ddbcached_protocol::{ErrorCode, Op};

use tokio::net::UnixListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ServerConfig;
use crate::connection;
use crate::metrics::{self, Durations, Exposition, Kind, OP_LABELS};
use crate::service::Service;

/// Results a request can end with: ok, or an error code.
const RESULTS: usize = 1 + ErrorCode::ALL.len();

/// Why a frame or a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    TooLarge = 0,
    Malformed = 1,
    UnknownOperation = 2,
    Handshake = 3,
}

impl Rejection {
    const ALL: [Rejection; 4] = [
        Rejection::TooLarge,
        Rejection::Malformed,
        Rejection::UnknownOperation,
        Rejection::Handshake,
    ];

    fn name(self) -> &'static str {
        match self {
            Rejection::TooLarge => "frame_too_large",
            Rejection::Malformed => "malformed",
            Rejection::UnknownOperation => "unknown_operation",
            Rejection::Handshake => "handshake",
        }
    }
}

/// What the server counts: requests by operation and result, their durations,
/// connections, refusals.
pub struct ServerStats {
    /// `[op label][result]`: see [`metrics::op_labels`]; result 0 is ok, then the codes.
    requests: [[AtomicU64; RESULTS]; OP_LABELS],
    /// By op label.
    durations: [Durations; OP_LABELS],
    connections: AtomicI64,
    rejected: [AtomicU64; 4],
    peers_refused: AtomicU64,
}

impl Default for ServerStats {
    fn default() -> ServerStats {
        ServerStats {
            requests: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            durations: Default::default(),
            connections: AtomicI64::new(0),
            rejected: Default::default(),
            peers_refused: AtomicU64::new(0),
        }
    }
}

impl ServerStats {
    /// A request was answered after `elapsed` (`op` `None`: it did not decode).
    pub fn request(&self, op: Option<Op>, error: Option<ErrorCode>, elapsed: Duration) {
        self.add(op, error, 1, elapsed);
    }

    /// `count` requests of `op` were answered successfully, none after more than
    /// `elapsed`: a connection's batch of hits.
    pub fn requests_ok(&self, op: Op, count: u64, elapsed: Duration) {
        self.add(Some(op), None, count, elapsed);
    }

    fn add(&self, op: Option<Op>, error: Option<ErrorCode>, count: u64, elapsed: Duration) {
        let result = error.map_or(0, |c| 1 + c.index());
        let op = metrics::op_index(op);
        self.requests[op][result].fetch_add(count, Ordering::Relaxed);
        self.durations[op].record(elapsed, count);
    }

    pub fn connection_opened(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_closed(&self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn frame_rejected(&self, why: Rejection) {
        self.rejected[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn peer_refused(&self) {
        self.peers_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Writes the counters into a scrape.
    pub fn export(&self, out: &mut Exposition) {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let name = "ddbcached_server_requests_total";
        out.family(
            name,
            Kind::Counter,
            "Requests answered, by operation and result (ok or the error code's name).",
        );
        for (i, op) in metrics::op_labels() {
            let results = std::iter::once("ok").chain(ErrorCode::ALL.iter().map(|c| c.name()));
            for (r, result) in results.enumerate() {
                out.sample(
                    name,
                    &[("op", op), ("result", result)],
                    load(&self.requests[i][r]),
                );
            }
        }
        let name = "ddbcached_server_request_duration_seconds";
        out.family(
            name,
            Kind::Histogram,
            "Time from a request's decoding to its last reply frame being queued (for a batch of hits answered together: the batch's).",
        );
        for (i, op) in metrics::op_labels() {
            self.durations[i].export(out, name, &[("op", op)]);
        }
        out.single(
            "ddbcached_server_connections",
            Kind::Gauge,
            "Client connections open.",
            self.connections.load(Ordering::Relaxed),
        );
        out.by_label(
            "ddbcached_server_frames_rejected_total",
            Kind::Counter,
            "Frames refused by reason.",
            "reason",
            Rejection::ALL.map(|why| (why.name(), load(&self.rejected[why as usize]))),
        );
        out.single(
            "ddbcached_server_peers_refused_total",
            Kind::Counter,
            "Connections refused because the peer's uid/gid is not allowed.",
            load(&self.peers_refused),
        );
    }
}

/// Why the socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("another daemon is already serving on {0}")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot bind {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A bound socket; dropping it removes the socket file.
pub struct Listener {
    listener: UnixListener,
    path: PathBuf,
}

impl Listener {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds the socket at `config.socket_path` with mode `config.socket_mode`.
pub fn bind(config: &ServerConfig) -> Result<Listener, BindError> {
    let path = config.socket_path.clone();
    let io = |source| BindError::Io {
        path: path.clone(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if !meta.file_type().is_socket() => return Err(BindError::NotASocket(path)),
        Ok(_) => {
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                return Err(BindError::InUse(path));
            }
            tracing::info!(path = %path.display(), "removing stale socket file");
            std::fs::remove_file(&path).map_err(io)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let listener = UnixListener::bind(&path).map_err(io)?;
    // From here on the Listener owns the file and removes it on any early return.
    let listener = Listener { listener, path };
    std::fs::set_permissions(
        &listener.path,
        std::fs::Permissions::from_mode(config.socket_mode),
    )
    .map_err(|source| BindError::Io {
        path: listener.path.clone(),
        source,
    })?;
    Ok(listener)
}

/// Accepts and serves connections until `shutdown` fires; then closes and removes the
/// socket at once, and lets requests in progress finish for up to `shutdown_grace_ms`.
pub async fn run(
    listener: Listener,
    service: Arc<Service>,
    config: ServerConfig,
    shutdown: CancellationToken,
) {
    let connections = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let mut accept_failures = 0u32;
    tracing::info!(path = %listener.path.display(), "listening");
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("never closed"),
            _ = shutdown.cancelled() => break,
        };
        let accepted = tokio::select! {
            accepted = listener.listener.accept() => accepted,
            _ = shutdown.cancelled() => break,
        };
        match accepted {
            Ok((stream, _)) => {
                accept_failures = 0;
                let service = service.clone();
                let config = config.clone();
                let shutdown = shutdown.clone();
                connections.spawn(async move {
                    connection::serve(stream, service, config, shutdown).await;
                    drop(slot);
                });
            }
            Err(e) => {
                // Typically out of file descriptors: back off instead of spinning.
                accept_failures += 1;
                let pause = Duration::from_millis(10 << accept_failures.min(7));
                tracing::warn!(error = %e, ?pause, "accept failed");
                tokio::time::sleep(pause).await;
            }
        }
    }
    // Refuse newcomers at once: with the socket still bound they would queue in the
    // backlog, unanswered, until the grace period ended.
    drop(listener);
    tracing::info!("stopped accepting; finishing requests in progress");
    connections.close();
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    if tokio::time::timeout(grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            remaining = connections.len(),
            "shutdown grace period over; abandoning connections still busy"
        );
    }
    tracing::info!("stopped");
}
