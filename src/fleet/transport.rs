//! Redis, as fleet mode uses it: one stream per table, entries appended with XADD (and
//! trimmed by age on the way), read with a blocking XREAD on a connection of its own;
//! over TCP, TLS (rustls) or a Unix socket, to one server or to a Redis Cluster
//! (`redis+cluster://` or `rediss+cluster://` and the seed nodes, comma-separated: the
//! cluster client follows MOVED and ASK and refreshes the slot map itself).
//! Every call has a deadline: a Redis that stops answering is an error here, never a
//! hang.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::streams::{StreamRangeReply, StreamReadReply};
use redis::{
    AsyncConnectionConfig, ErrorKind, FromRedisValue, RedisError, RedisResult, TlsCertificates,
    Value,
};

/// Time to connect, and to answer any call but a blocking read.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Attempts of a call on a cluster (after MOVED, ASK or a failed node) before it fails.
const CLUSTER_RETRIES: u32 = 3;

/// The Redis stream of a table in the fleet whose lease table is `fleet`. The braces make
/// `fleet` the key's hash tag: every stream of a fleet lies in one cluster slot, so the
/// one XREAD a consumer makes over all of them is answered by one node.
pub fn stream_key(fleet: &str, table_name: &str) -> String {
    format!("ddbcached:{{{fleet}}}:{table_name}")
}

/// The Redis server, or cluster, the fleet shares.
#[derive(Clone)]
pub enum Redis {
    Server(redis::Client),
    Cluster(ClusterClient),
}

/// An entry read from a stream: its id and fields.
#[derive(Debug)]
pub struct StreamEntry {
    pub id: String,
    pub fields: HashMap<String, Vec<u8>>,
}

impl Redis {
    /// Checks the URL (and reads `tls_ca_file`, a PEM file, for `rediss://` or
    /// `rediss+cluster://`; empty: the system's roots); connects only when asked.
    pub fn open(url: &str, tls_ca_file: &str) -> RedisResult<Redis> {
        let certificates = |tls: bool| -> RedisResult<Option<TlsCertificates>> {
            Ok((tls && !tls_ca_file.is_empty())
                .then(|| std::fs::read(tls_ca_file))
                .transpose()?
                .map(|root| TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root),
                }))
        };
        if let Some((scheme, rest)) = url.split_once("+cluster://") {
            let nodes = cluster_nodes(scheme, rest)?;
            let mut builder = ClusterClientBuilder::new(nodes).retries(CLUSTER_RETRIES);
            if let Some(certs) = certificates(scheme == "rediss")? {
                builder = builder.certs(certs);
            }
            return Ok(Redis::Cluster(builder.build()?));
        }
        Ok(Redis::Server(
            match certificates(url.starts_with("rediss://"))? {
                Some(certs) => redis::Client::build_with_tls(url, certs)?,
                None => redis::Client::open(url)?,
            },
        ))
    }

    /// A new connection whose calls may take up to `reply_within` (a blocking read's
    /// block time plus a margin; [`CALL_TIMEOUT`] for the others).
    pub async fn connect(&self, reply_within: Option<Duration>) -> RedisResult<Connection> {
        let reply_within = reply_within.unwrap_or(CALL_TIMEOUT);
        let link = match self {
            Redis::Server(client) => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(CALL_TIMEOUT)
                    .set_response_timeout(reply_within);
                Link::Server(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                )
            }
            Redis::Cluster(client) => {
                let config = ClusterConfig::new()
                    .set_connection_timeout(CALL_TIMEOUT)
                    .set_response_timeout(reply_within);
                // Connecting reads the slot map from the seeds; it has a deadline too.
                let connecting = client.get_async_connection_with_config(config);
                Link::Cluster(within(CALL_TIMEOUT * 2, connecting).await?)
            }
        };
        Ok(Connection { link, reply_within })
    }
}

/// The node URLs of `redis+cluster://[user:password@]host:port,host:port` (`scheme` is
/// `redis` or `rediss`): the credentials, given once, apply to every node.
fn cluster_nodes(scheme: &str, rest: &str) -> RedisResult<Vec<String>> {
    if scheme != "redis" && scheme != "rediss" {
        return Err(invalid(
            "a cluster URL begins redis+cluster:// or rediss+cluster://",
        ));
    }
    let (credentials, hosts) = match rest.rsplit_once('@') {
        Some((c, h)) => (format!("{c}@"), h),
        None => (String::new(), rest),
    };
    let nodes: Vec<String> = hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| format!("{scheme}://{credentials}{h}"))
        .collect();
    if nodes.is_empty() {
        return Err(invalid("a cluster URL names at least one seed node"));
    }
    Ok(nodes)
}

fn invalid(detail: &'static str) -> RedisError {
    RedisError::from((ErrorKind::InvalidClientConfig, detail))
}

/// `call`, or an I/O error once `limit` has passed.
async fn within<T>(
    limit: Duration,
    call: impl std::future::Future<Output = RedisResult<T>>,
) -> RedisResult<T> {
    tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
        Err(RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "Redis did not answer in time",
        )))
    })
}

enum Link {
    Server(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Clone for Link {
    fn clone(&self) -> Link {
        match self {
            Link::Server(c) => Link::Server(c.clone()),
            Link::Cluster(c) => Link::Cluster(c.clone()),
        }
    }
}

/// One connection (cheap to clone: clones share it and pipeline their calls); to a
/// cluster, one per node.
#[derive(Clone)]
pub struct Connection {
    link: Link,
    reply_within: Duration,
}

impl Connection {
    /// Runs `cmd`; a cluster's redirections and retries are inside the deadline.
    async fn query<T: FromRedisValue>(&mut self, cmd: &redis::Cmd) -> RedisResult<T> {
        // The connection's own response timeout bounds each attempt; this bounds them all.
        let limit = self.reply_within + CALL_TIMEOUT;
        match &mut self.link {
            Link::Server(c) => within(limit, cmd.query_async(c)).await,
            Link::Cluster(c) => within(limit, cmd.query_async(c)).await,
        }
    }

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
        self.query(&cmd).await
    }

    /// The id of the stream's last entry (`0-0` if it is empty or absent): reading after
    /// it gets exactly what is appended from now on.
    pub async fn last_id(&mut self, key: &str) -> RedisResult<String> {
        let mut cmd = redis::cmd("XREVRANGE");
        cmd.arg(key).arg("+").arg("-").arg("COUNT").arg(1);
        let reply: StreamRangeReply = self.query(&cmd).await?;
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
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(block.as_millis() as u64)
            .arg("STREAMS")
            .arg(keys)
            .arg(after);
        let reply: Option<StreamReadReply> = self.query(&cmd).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_url_names_every_seed_with_the_credentials_given_once() {
        assert_eq!(
            cluster_nodes("rediss", "user:p@ss,word@h1:6379,h2:6380").unwrap(),
            [
                "rediss://user:p@ss,word@h1:6379",
                "rediss://user:p@ss,word@h2:6380"
            ]
        );
        assert_eq!(cluster_nodes("redis", "h1:1,").unwrap(), ["redis://h1:1"]);
        assert!(cluster_nodes("redis", "").is_err());
        assert!(cluster_nodes("unix", "h:1").is_err());
        assert!(Redis::open("http+cluster://h:1", "").is_err());
        assert!(matches!(
            Redis::open("redis+cluster://h1:1,h2:2", ""),
            Ok(Redis::Cluster(_))
        ));
    }
}
