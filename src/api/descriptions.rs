//! Keeping the cached tables' descriptions true while the daemon runs. The cache asks
//! for a table to be described again when its stream was replaced (the table deleted and
//! re-created, maybe with other keys and indexes) or when DynamoDB answered a query of an
//! index its description lacks (one added with UpdateTable); until the new description
//! is installed, the table's reads bypass the cache.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::cache::ApiCache;
use super::tables::{describe_one, Described};

/// The first wait before a table that could not be described again is tried again;
/// each failure doubles it, up to [`REDESCRIBE_MAX_WAIT`].
const REDESCRIBE_WAIT: Duration = Duration::from_secs(1);
const REDESCRIBE_MAX_WAIT: Duration = Duration::from_secs(60);

/// Describes again every cached table the cache asks for (its stream was replaced, or
/// it gained an index), until `stop`. Until it is, its reads bypass the cache; one gone,
/// or re-created without a stream, stays so and is tried again (its tailer finds a
/// stream enabled later, which is another replacement).
pub async fn keep_described(
    client: aws_sdk_dynamodb::Client,
    cache: Arc<ApiCache>,
    stop: CancellationToken,
) {
    let mut wait = REDESCRIBE_WAIT;
    loop {
        let mut failed = false;
        for (id, name, generation) in cache.undescribed() {
            // A DynamoDB that does not answer must not hold up the daemon's shutdown.
            let described = tokio::select! {
                _ = stop.cancelled() => return,
                described = describe_one(&client, &name) => described,
            };
            let why = match described {
                Ok(Described::Cached(mut table)) => {
                    table.id = id;
                    tracing::info!(table = %name, key = ?table.key, local = ?table.local, global = ?table.global.keys().collect::<Vec<_>>(), "the table is described again");
                    cache.described_again(table, generation);
                    continue;
                }
                Ok(Described::NoStream) => "it has no stream".to_owned(),
                Ok(Described::Missing) => "no such table".to_owned(),
                Err(e) => e.to_string(),
            };
            tracing::warn!(table = %name, reason = %why, retry_in = ?wait, "a table cannot be described again: its reads bypass the cache");
            failed = true;
        }
        let retry = async {
            match failed {
                true => tokio::time::sleep(wait).await,
                false => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = cache.descriptions_asked() => {}
            _ = retry => {}
        }
        wait = match failed {
            true => (wait * 2).min(REDESCRIBE_MAX_WAIT),
            false => REDESCRIBE_WAIT,
        };
    }
}
