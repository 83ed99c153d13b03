//! Redis, as fleet mode uses it: one stream per table, entries appended with XADD (and
//! trimmed by age on the way), read with a blocking XREAD on a connection of its own;
//! over TCP, TLS (rustls) or a Unix socket.
//! Every call has a deadline: a Redis that stops answering is an error here, never a
//! hang.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::streams::{StreamRangeReply, StreamReadReply};
use redis::{AsyncConnectionConfig, RedisResult, TlsCertificates, Value};

/// Time to connect, and to answer any call but a blocking read.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// The Redis stream of a table (the braces keep a table's keys on one cluster slot).
pub fn stream_key(table_name: &str) -> String {
    format!("ddbcached:{{{table_name}}}")
}

/// The Redis server the fleet shares.
#[derive(Clone)]
pub struct Redis {
    client: redis::Client,
}

/// An entry read from a stream: its id and fields.
#[derive(Debug)]
pub struct StreamEntry {
    pub id: String,
    pub fields: HashMap<String, Vec<u8>>,
}

impl Redis {
    /// Checks the URL (and reads `tls_ca_file`, a PEM file, for `rediss://`; empty: the
    /// system's roots); connects only when asked.
    pub fn open(url: &str, tls_ca_file: &str) -> RedisResult<Redis> {
        let client = if url.starts_with("rediss://") && !tls_ca_file.is_empty() {
            let root_cert = Some(std::fs::read(tls_ca_file)?);
            redis::Client::build_with_tls(
                url,
                TlsCertificates {
                    client_tls: None,
                    root_cert,
                },
            )?
        } else {
            redis::Client::open(url)?
        };
        Ok(Redis { client })
    }

    /// A new connection whose calls may take up to `reply_within` (a blocking read's
    /// block time plus a margin; [`CALL_TIMEOUT`] for the others).
    pub async fn connect(&self, reply_within: Option<Duration>) -> RedisResult<Connection> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(CALL_TIMEOUT)
            .set_response_timeout(reply_within.unwrap_or(CALL_TIMEOUT));
        Ok(Connection(
            self.client
                .get_multiplexed_async_connection_with_config(&config)
                .await?,
        ))
    }
}

/// One connection (cheap to clone: clones share it and pipeline their calls).
#[derive(Clone)]
pub struct Connection(MultiplexedConnection);

impl Connection {
    /// Appends an entry to `key`, trimming entries older than `keep_after_ms` (wall clock,
    /// approximately, as Redis trims whole nodes). Returns the entry's id.
    pub async fn append(
        &mut self,
        key: &str,
        fields: &[(&'static str, Vec<u8>)],
        keep_after_ms: u64,
    ) -> RedisResult<String> {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(key)
            .arg("MINID")
            .arg("~")
            .arg(keep_after_ms)
            .arg("*");
        for (name, value) in fields {
            cmd.arg(*name).arg(value.as_slice());
        }
        cmd.query_async(&mut self.0).await
    }

    /// The id of the stream's last entry (`0-0` if it is empty or absent): reading after
    /// it gets exactly what is appended from now on.
    pub async fn last_id(&mut self, key: &str) -> RedisResult<String> {
        let reply: StreamRangeReply = redis::cmd("XREVRANGE")
            .arg(key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut self.0)
            .await?;
        Ok(reply
            .ids
            .into_iter()
            .next()
            .map_or_else(|| "0-0".to_owned(), |e| e.id))
    }

    /// Entries of `keys[i]` after `after[i]`, waiting up to `block` for the first one;
    /// per key, in stream order.
    pub async fn read(
        &mut self,
        keys: &[String],
        after: &[String],
        block: Duration,
        count: usize,
    ) -> RedisResult<Vec<(String, Vec<StreamEntry>)>> {
        let reply: Option<StreamReadReply> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(block.as_millis() as u64)
            .arg("STREAMS")
            .arg(keys)
            .arg(after)
            .query_async(&mut self.0)
            .await?;
        Ok(reply
            .map(|r| r.keys)
            .unwrap_or_default()
            .into_iter()
            .map(|k| {
                let entries = k
                    .ids
                    .into_iter()
                    .map(|e| StreamEntry {
                        id: e.id,
                        fields: e
                            .map
                            .into_iter()
                            .filter_map(|(name, v)| match v {
                                Value::BulkString(b) => Some((name, b)),
                                _ => None,
                            })
                            .collect(),
                    })
                    .collect();
                (k.key, entries)
            })
            .collect())
    }
}
