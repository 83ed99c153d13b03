//! The tailer's output port: what a reader of a table's changes saw, and the [`Sink`]
//! it hands that to. The reader moves its checkpoint past something only once the sink
//! has accepted it. Applying changes to the local cache is one sink
//! ([`crate::coherence`]); publishing them to a fleet is another ([`crate::fleet`]).

use std::future::Future;

use tokio::time::Instant;

use crate::stream::api::{Record, StartAt};
use crate::stream::FlushCause;

/// What a reader of changes saw, in the order it saw it, for one table.
#[derive(Clone, Copy, Debug)]
pub enum Seen<'a> {
    /// Records of one shard, in shard order, read from just after `after`.
    Records {
        shard: &'a str,
        after: &'a StartAt,
        records: &'a [Record],
    },
    /// The shard is closed and every record of it has been handed over.
    ShardEnded { shard: &'a str },
    /// Continuity was lost: some changes were never seen.
    ContinuityLost(FlushCause),
    /// Every change made before this instant has been handed over (`None`: no such
    /// proof right now).
    CaughtUp(Option<Instant>),
}

/// Why a sink did not take what it was given; the reader keeps its position and gives
/// the same again later.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SinkError(pub String);

/// A table as a sink knows it: the zio-flow stores' tables, or a table the DynamoDB API
/// front caches.
pub trait Tailed: Copy + Send + Sync + 'static {
    /// Where the tailer's counters for this table go in [`crate::stream::TailStats`].
    fn slot(self) -> usize;
}

/// Where a reader of changes hands what it saw. It moves its checkpoint past something
/// only once the sink has accepted it.
pub trait Sink: Send + Sync + 'static {
    type Table: Tailed;

    fn accept(
        &self,
        table: Self::Table,
        seen: Seen<'_>,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;
}
