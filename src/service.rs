//! One request in, its replies out. This is where every operation meets the stores, and
//! so the one place the cache will sit: all reads go through [`Service::handle`]'s read
//! arms and all writes through its write arms.
//!
//! Results that may be long (timestamps, namespace scans, log scans) are produced as a
//! stream of [`Items`] pieces, each small enough for one frame, so that a scan of any
//! length neither builds one giant frame nor exceeds the client's frame limit.

use std::sync::Arc;

use aws_sdk_dynamodb::Client;
use bytes::Bytes;
use ddbcached_protocol::{Items, Reply, Request};
use futures::stream::{self, BoxStream, StreamExt};

use crate::config::Config;
use crate::store::{KvStore, LogStore, StoreError};

/// MessagePack framing of one item (type tag and length) plus slack, so that summing
/// payload lengths with it never underestimates a frame.
const ITEM_OVERHEAD_BYTES: usize = 16;

/// What a request produces.
pub enum Outcome {
    /// A single reply frame.
    Reply(Reply),
    /// Pieces of a streamed result, in order; an error ends the stream.
    Stream(BoxStream<'static, Result<Items, StoreError>>),
}

/// The stores behind the socket.
pub struct Service {
    kv: KvStore,
    log: LogStore,
    /// Payload budget of one streamed piece: half a frame leaves room for the envelope.
    piece_bytes: usize,
}

impl Service {
    pub fn new(client: Client, config: &Config) -> Arc<Service> {
        let d = &config.dynamodb;
        Arc::new(Service {
            kv: KvStore::new(client.clone(), d.kv_table.clone(), d.batch_max_attempts),
            log: LogStore::new(
                client,
                d.log_table.clone(),
                d.batch_max_attempts,
                d.index_allocation_max_attempts,
            ),
            piece_bytes: config.server.max_frame_bytes / 2,
        })
    }

    /// Runs one request (never `Hello`, which the connection answers itself).
    pub async fn handle(&self, request: Request) -> Outcome {
        let budget = self.piece_bytes;
        let reply = match request {
            Request::Hello { .. } => Err(StoreError::InvalidArgument(
                "hello is only valid as the first frame of a connection".into(),
            )),
            Request::Ping => Ok(Reply::Done),

            // Reads.
            Request::KvGet {
                ns, key, before, ..
            } => self
                .kv
                .get_latest(&ns, &key, before)
                .await
                .map(Reply::Value),
            Request::KvLatestTs { ns, key } => {
                self.kv.latest_ts(&ns, &key).await.map(Reply::Timestamp)
            }
            Request::KvTimestamps { ns, key } => {
                return match self.kv.timestamps(&ns, &key).await {
                    Ok(ts) => pieces(ts, |_| 8, budget, Items::Timestamps),
                    Err(e) => Outcome::Reply(error_reply(e)),
                };
            }
            Request::KvScan { ns, keys_only } => {
                return if keys_only {
                    match self.kv.scan_keys(&ns).await {
                        Ok(keys) => pieces(keys, |k| k.len(), budget, Items::Keys),
                        Err(e) => Outcome::Reply(error_reply(e)),
                    }
                } else {
                    match self.kv.scan(&ns).await {
                        Ok(entries) => {
                            pieces(entries, |(k, v)| k.len() + v.len(), budget, Items::Entries)
                        }
                        Err(e) => Outcome::Reply(error_reply(e)),
                    }
                };
            }
            Request::LogPosition { topic } => self.log.position(&topic).await.map(Reply::Index),
            Request::LogScan { topic, from, until } => {
                let pages = self.log.scan(&topic, from, until);
                return Outcome::Stream(
                    pages
                        .flat_map(move |page| match page {
                            Ok(values) => stream::iter(
                                split(values, |v: &Bytes| v.len(), budget)
                                    .into_iter()
                                    .map(|p| Ok(Items::Values(p)))
                                    .collect::<Vec<_>>(),
                            ),
                            Err(e) => stream::iter(vec![Err(e)]),
                        })
                        .boxed(),
                );
            }

            // Writes.
            Request::KvPut { ns, key, value, ts } => self
                .kv
                .put(&ns, &key, value, ts)
                .await
                .map(|()| Reply::Done),
            Request::KvDelete { ns, key, marker } => self
                .kv
                .delete(&ns, &key, marker)
                .await
                .map(|()| Reply::Done),
            Request::LogPut { topic, value } => self.log.put(&topic, value).await.map(Reply::Index),
            Request::LogDelete { topic } => self.log.delete(&topic).await.map(|()| Reply::Done),
        };
        Outcome::Reply(reply.unwrap_or_else(error_reply))
    }
}

/// The error reply for a failed store call.
pub fn error_reply(e: StoreError) -> Reply {
    Reply::error(e.code(), e.to_string())
}

/// A finished list as a stream of frame-sized pieces.
fn pieces<T: Send + 'static>(
    items: Vec<T>,
    size: impl Fn(&T) -> usize,
    budget: usize,
    wrap: fn(Vec<T>) -> Items,
) -> Outcome {
    let parts: Vec<Result<Items, StoreError>> = split(items, size, budget)
        .into_iter()
        .map(|p| Ok(wrap(p)))
        .collect();
    Outcome::Stream(stream::iter(parts).boxed())
}

/// Splits a list into consecutive runs whose sizes (plus per-item overhead) stay within
/// `budget`; an item larger than the budget still goes, alone, so nothing is lost.
fn split<T>(items: Vec<T>, size: impl Fn(&T) -> usize, budget: usize) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    let mut current = Vec::new();
    let mut used = 0;
    for item in items {
        let s = size(&item) + ITEM_OVERHEAD_BYTES;
        if !current.is_empty() && used + s > budget {
            out.push(std::mem::take(&mut current));
            used = 0;
        }
        used += s;
        current.push(item);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn split_respects_budget_and_keeps_everything() {
        let items: Vec<usize> = (0..100).map(|i| i % 7 * 10).collect();
        let parts = split(items.clone(), |n| *n, 100);
        assert!(parts
            .iter()
            .all(|p| p.len() == 1 || p.iter().map(|n| n + 16).sum::<usize>() <= 100));
        assert_eq!(parts.concat(), items);
        // An oversized item travels alone.
        assert_eq!(split(vec![500, 1], |n| *n, 100), vec![vec![500], vec![1]]);
        assert!(split(Vec::<usize>::new(), |n| *n, 100).is_empty());
    }
}
