//! Who may use a Unix socket of the daemon: with an allow-list configured
//! (`server.allowed_uids`, `server.allowed_gids`), the peer's uid or gid, read from the
//! kernel (SO_PEERCRED), must be on it. Both the socket protocol and the DynamoDB API's
//! socket ask here.

use tokio::net::UnixStream;

use crate::config::ServerConfig;

/// Whether the peer of `stream` may connect; a refusal is logged (the caller counts it).
pub fn allowed(stream: &UnixStream, config: &ServerConfig) -> bool {
    if config.allowed_uids.is_empty() && config.allowed_gids.is_empty() {
        return true;
    }
    match stream.peer_cred() {
        Ok(cred)
            if config.allowed_uids.contains(&cred.uid())
                || config.allowed_gids.contains(&cred.gid()) =>
        {
            true
        }
        Ok(cred) => {
            tracing::warn!(uid = cred.uid(), gid = cred.gid(), pid = ?cred.pid(), "refused a peer not on the allow-list");
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "refused a peer whose credentials cannot be read");
            false
        }
    }
}
