//! The Unix socket: binding it safely, accepting connections, and shutting down.
//!
//! Binding refuses to take over a socket a live daemon still answers on, replaces a stale
//! socket file left by a crash, never deletes a file that is not a socket, and sets the
//! socket's mode. The socket file is removed when the [`Listener`] is dropped.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ServerConfig;
use crate::connection;
use crate::server_stats::ServerStats;
use crate::service::Service;

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

    /// The next connection.
    pub async fn accept(&self) -> std::io::Result<UnixStream> {
        self.listener.accept().await.map(|(stream, _)| stream)
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
    stats: Arc<ServerStats>,
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
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => break,
        };
        match accepted {
            Ok(stream) => {
                accept_failures = 0;
                let service = service.clone();
                let stats = stats.clone();
                let config = config.clone();
                let shutdown = shutdown.clone();
                connections.spawn(async move {
                    connection::serve(stream, service, stats, config, shutdown).await;
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
