//! What the DynamoDB API front counts: requests by operation label and outcome, and
//! connections open. Labels come from closed sets only ([`super::operation::labels`]).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use super::operation::{labels, LABELS};
use crate::metrics::{Exposition, Kind};

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Sent to DynamoDB, and its answer (of any status) relayed.
    Forwarded = 0,
    /// Not allowed by the configuration (a control-plane change).
    Refused = 1,
    /// Not a request the front can take (unknown operation, bad or oversized body).
    Rejected = 2,
    /// DynamoDB could not be reached or did not answer in time.
    Failed = 3,
    /// Answered by the daemon (from memory, or DescribeEndpoints), DynamoDB not called.
    Cached = 4,
}

impl Outcome {
    const ALL: [Outcome; 5] = [
        Outcome::Forwarded,
        Outcome::Refused,
        Outcome::Rejected,
        Outcome::Failed,
        Outcome::Cached,
    ];

    fn name(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::Refused => "refused",
            Outcome::Rejected => "rejected",
            Outcome::Failed => "failed",
            Outcome::Cached => "cached",
        }
    }
}

/// The front's counters (zero while it is off, so that every daemon exports the same
/// families).
pub struct ApiStats {
    requests: [[AtomicU64; Outcome::ALL.len()]; LABELS],
    connections: AtomicI64,
    peers_refused: AtomicU64,
}

impl Default for ApiStats {
    fn default() -> ApiStats {
        ApiStats {
            requests: std::array::from_fn(|_| Default::default()),
            connections: AtomicI64::new(0),
            peers_refused: AtomicU64::new(0),
        }
    }
}

impl ApiStats {
    pub fn request(&self, label: usize, outcome: Outcome) {
        self.requests[label][outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_opened(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_closed(&self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn peer_refused(&self) {
        self.peers_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Writes the counters into a scrape.
    pub fn export(&self, out: &mut Exposition) {
        let name = "ddbcached_api_requests_total";
        out.family(
            name,
            Kind::Counter,
            "DynamoDB API requests, by operation (item operations by name; describe, change or unknown otherwise) and outcome.",
        );
        for (i, op) in labels() {
            for outcome in Outcome::ALL {
                out.sample(
                    name,
                    &[("operation", op), ("outcome", outcome.name())],
                    self.requests[i][outcome as usize].load(Ordering::Relaxed),
                );
            }
        }
        out.single(
            "ddbcached_api_connections",
            Kind::Gauge,
            "DynamoDB API connections open.",
            self.connections.load(Ordering::Relaxed),
        );
        out.single(
            "ddbcached_api_peers_refused_total",
            Kind::Counter,
            "DynamoDB API socket connections refused because the peer's uid/gid is not allowed.",
            self.peers_refused.load(Ordering::Relaxed),
        );
    }
}
