//! What the socket server counts: requests by operation and result with their durations,
//! connections open, frames and peers refused. The accept loop and every connection
//! share one [`ServerStats`]; the daemon exports it with the other parts' counters.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use ddbcached_protocol::{ErrorCode, Op};

use crate::metrics::{self, Durations, Exposition, Kind, OP_LABELS};

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
