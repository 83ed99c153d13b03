//! The DynamoDB API front (`[dynamodb_api]`): DynamoDB's own HTTP/JSON API (JSON 1.0,
//! `X-Amz-Target: DynamoDB_20120810.<Operation>`) answered on a loopback address and,
//! optionally, a Unix socket, so that an unmodified AWS SDK reaches DynamoDB through the
//! daemon by changing its endpoint.
//!
//! Reads of the tables in `dynamodb_api.tables` (GetItem, BatchGetItem, Query) are
//! answered from memory where the cache holds them ([`reads`], [`cache`]); writes to
//! those tables drop what they touched once DynamoDB has answered ([`writes`], told to
//! an [`OnWritten`] that reaches every cache of the table), and each table's stream
//! brings in what was written around the daemon. Under `["*"]`, tables created after
//! start are found at their first use ([`discovery`]). Every other request is
//! forwarded to the configured DynamoDB, re-signed with the daemon's own credentials
//! ([`upstream`]), and DynamoDB's answer is relayed as it came. What the front refuses,
//! with a DynamoDB-shaped error ([`error`]) and without sending anything: an operation it
//! does not know, one that changes tables unless `dynamodb_api.control_plane` is on
//! ([`operation`]), a body that is not a JSON object, and a body over
//! `dynamodb_api.max_body_bytes` (after gzip decoding).
//!
//! Trust: whoever can connect acts with the daemon's IAM permissions, so the address must
//! be a loopback one (checked at start) and the socket carries the peer uid/gid check of
//! the protocol's socket.
//!
//! Connections: HTTP/1.1 with keep-alive (hyper), at most
//! `dynamodb_api.max_connections` at once; a connection idle, or slow to send a request's
//! head or body, for `dynamodb_api.idle_timeout_ms` is closed; on shutdown requests in
//! progress finish within `server.shutdown_grace_ms`.

pub mod cache;
pub mod descriptions;
pub mod discovery;
pub mod error;
pub mod keys;
pub mod operation;
mod reads;
pub mod stats;
pub mod tables;
pub mod upstream;
mod writes;

use std::convert::Infallible;
use std::io::Read;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{HeaderValue, Method, Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{DynamoApiConfig, ServerConfig};
use crate::peer;
use crate::server::{self, BindError, Listener};
use cache::{ApiCache, Served};
use discovery::Discovery;
use error::ApiError;
use operation::{Kind, Operation, UNKNOWN_LABEL};
use stats::{ApiStats, Outcome};
use tables::TableId;
use upstream::Upstream;

/// The most a request head (request line and headers) may take.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Why the front could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("binding the DynamoDB API on {addr} (dynamodb_api.listen): {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the DynamoDB API's socket (dynamodb_api.socket_path): {0}")]
    Socket(#[from] BindError),
    #[error("the DynamoDB API cannot reach DynamoDB: {0}")]
    Upstream(#[from] upstream::UpstreamError),
    #[error(transparent)]
    Tables(#[from] tables::TableError),
}

/// What every request of the front shares.
struct Shared {
    upstream: Upstream,
    /// `None` when no table is cached.
    caching: Option<Caching>,
    config: DynamoApiConfig,
    stats: Arc<ApiStats>,
    /// Writes in flight, which may outlive their connections (a write runs to its end
    /// when its client hangs up): as many as there may be connections.
    writes: Arc<Semaphore>,
}

/// What the front needs to cache tables.
pub struct Caching {
    /// The cached tables' entries.
    pub cache: Arc<ApiCache>,
    /// Where its writes go once DynamoDB has answered.
    pub on_written: Arc<dyn OnWritten>,
    /// Under `["*"]` (but for fleet mode), what finds tables created after start.
    pub discovery: Option<Arc<Discovery>>,
}

/// Told of what a write through the front changed once DynamoDB accepted it (or may
/// have), before its client is answered: the front's own cache, the stores' for a
/// table the front shares with them, and in fleet mode the other daemons.
pub trait OnWritten: Send + Sync {
    /// An item of `table`, by its canonical key and partition key.
    fn item<'a>(&'a self, table: TableId, key: &'a [u8], partition: &'a [u8]) -> BoxFuture<'a, ()>;
    /// Items of `table` the front could not make out (PartiQL, a key it cannot read).
    fn unknown(&self, table: TableId) -> BoxFuture<'_, ()>;
}

/// The front, bound and ready to serve.
pub struct Front {
    tcp: Option<TcpListener>,
    unix: Option<Listener>,
    shared: Arc<Shared>,
    server: ServerConfig,
}

impl Front {
    /// Binds what `config` asks for (a loopback address, a socket, or both); `None` when
    /// it asks for neither.
    pub async fn bind(
        config: &DynamoApiConfig,
        server: &ServerConfig,
        upstream: Upstream,
        caching: Option<Caching>,
        stats: Arc<ApiStats>,
    ) -> Result<Option<Front>, StartError> {
        let tcp = match config.listen.as_str() {
            "" => None,
            addr => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Listen {
                        addr: addr.to_owned(),
                        source,
                    })?,
            ),
        };
        let unix = if config.socket_path.as_os_str().is_empty() {
            None
        } else {
            Some(server::bind(&ServerConfig {
                socket_path: config.socket_path.clone(),
                socket_mode: config.socket_mode,
                ..server.clone()
            })?)
        };
        if tcp.is_none() && unix.is_none() {
            return Ok(None);
        }
        Ok(Some(Front {
            tcp,
            unix,
            shared: Arc::new(Shared {
                upstream,
                caching,
                config: config.clone(),
                stats,
                writes: Arc::new(Semaphore::new(config.max_connections)),
            }),
            server: server.clone(),
        }))
    }

    /// The loopback address it listens on, if any.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves until `shutdown`, then lets requests in progress finish within the grace
    /// period.
    pub async fn run(self, shutdown: CancellationToken) {
        let connections = TaskTracker::new();
        let slots = Arc::new(Semaphore::new(self.shared.config.max_connections));
        if let Some(addr) = self.local_addr() {
            tracing::info!(%addr, "DynamoDB API listening");
        }
        loop {
            let slot = tokio::select! {
                slot = slots.clone().acquire_owned() => slot.expect("never closed"),
                _ = shutdown.cancelled() => break,
            };
            let shared = self.shared.clone();
            let stop = shutdown.clone();
            tokio::select! {
                accepted = accept_tcp(&self.tcp) => match accepted {
                    Ok(stream) => {
                        connections.spawn(async move {
                            serve(stream, shared, stop).await;
                            drop(slot);
                        });
                    }
                    Err(e) => backoff(e).await,
                },
                accepted = accept_unix(&self.unix) => match accepted {
                    Ok(stream) if peer::allowed(&stream, &self.server) => {
                        connections.spawn(async move {
                            serve(stream, shared, stop).await;
                            drop(slot);
                        });
                    }
                    Ok(_) => shared.stats.peer_refused(),
                    Err(e) => backoff(e).await,
                },
                _ = shutdown.cancelled() => break,
            }
        }
        // New clients are refused at once; the socket file goes with its listener.
        drop(self.tcp);
        drop(self.unix);
        connections.close();
        let grace = Duration::from_millis(self.server.shutdown_grace_ms);
        if tokio::time::timeout(grace, connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = connections.len(),
                "shutdown grace period over; abandoning DynamoDB API connections still busy"
            );
        }
    }
}

async fn accept_tcp(listener: &Option<TcpListener>) -> std::io::Result<tokio::net::TcpStream> {
    match listener {
        Some(l) => {
            let (stream, _) = l.accept().await?;
            // Answers are written whole: waiting to coalesce them only adds latency.
            stream.set_nodelay(true)?;
            Ok(stream)
        }
        None => std::future::pending().await,
    }
}

async fn accept_unix(listener: &Option<Listener>) -> std::io::Result<tokio::net::UnixStream> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// After a failed accept (typically out of file descriptors): a pause, not a spin.
async fn backoff(e: std::io::Error) {
    tracing::warn!(error = %e, "DynamoDB API: accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Serves one connection until the client closes it, it idles past the limit, or
/// `shutdown` fires (then the request in progress, if any, is answered first).
async fn serve<S>(stream: S, shared: Arc<Shared>, shutdown: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let idle = Duration::from_millis(shared.config.idle_timeout_ms);
    shared.stats.connection_opened();
    // Requests in progress, and when the last one ended: a connection is idle only
    // between requests.
    let activity = Arc::new(Activity::default());
    let service = {
        let (shared, activity) = (shared.clone(), activity.clone());
        service_fn(move |request| {
            let (shared, activity) = (shared.clone(), activity.clone());
            async move {
                activity.begin();
                let response = answer(&shared, request, idle).await;
                activity.end();
                Ok::<_, Infallible>(response)
            }
        })
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(idle)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    let mut connection = pin!(builder.serve_connection(TokioIo::new(stream), service));
    let mut check = tokio::time::interval(idle / 4);
    let mut closing = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "DynamoDB API connection ended");
                }
                break;
            }
            _ = shutdown.cancelled(), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = check.tick(), if !closing => {
                if activity.idle_for() >= Some(idle) {
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
    shared.stats.connection_closed();
}

/// Requests of one connection in progress, and when the last one ended.
struct Activity {
    running: AtomicUsize,
    last: std::sync::Mutex<Instant>,
}

impl Default for Activity {
    fn default() -> Activity {
        Activity {
            running: AtomicUsize::new(0),
            last: std::sync::Mutex::new(Instant::now()),
        }
    }
}

impl Activity {
    fn begin(&self) {
        self.running.fetch_add(1, Ordering::Relaxed);
    }

    fn end(&self) {
        *self.last.lock().expect("activity lock poisoned") = Instant::now();
        self.running.fetch_sub(1, Ordering::Relaxed);
    }

    /// How long nothing has run on the connection (`None`: something runs now).
    fn idle_for(&self) -> Option<Duration> {
        if self.running.load(Ordering::Relaxed) > 0 {
            return None;
        }
        Some(self.last.lock().expect("activity lock poisoned").elapsed())
    }
}

/// One request's answer: DynamoDB's, or the front's own error.
async fn answer(
    shared: &Arc<Shared>,
    request: Request<Incoming>,
    slow: Duration,
) -> Response<Full<Bytes>> {
    let target = request.headers().get("x-amz-target").cloned();
    let operation = target
        .as_ref()
        .and_then(|t| t.to_str().ok())
        .and_then(operation::from_target);
    let label = operation.map_or(UNKNOWN_LABEL, |op| op.label);
    let (outcome, response) = match (operation, target) {
        (Some(op), Some(target)) => match take(shared, op, &target, request, slow).await {
            Ok((response, Served::Hit)) => (Outcome::Cached, response),
            Ok((response, _)) => (Outcome::Forwarded, response),
            Err(e) => (outcome_of(&e), e.response()),
        },
        (_, target) => {
            let e = ApiError::UnknownOperation(match target {
                None => "no X-Amz-Target header: not a DynamoDB API request".into(),
                Some(t) => format!("unknown operation {}", t.to_str().unwrap_or("(not text)")),
            });
            (Outcome::Rejected, e.response())
        }
    };
    shared.stats.request(label, outcome);
    response
}

fn outcome_of(e: &ApiError) -> Outcome {
    match e {
        ApiError::AccessDenied(_) => Outcome::Refused,
        ApiError::Upstream(_) => Outcome::Failed,
        _ => Outcome::Rejected,
    }
}

/// Checks and reads a request of a known operation, and answers it from the cache or
/// forwards it.
async fn take(
    shared: &Arc<Shared>,
    op: Operation,
    target: &HeaderValue,
    request: Request<Incoming>,
    slow: Duration,
) -> Result<(Response<Full<Bytes>>, Served), ApiError> {
    if op.kind == Kind::Change && !shared.config.control_plane {
        return Err(ApiError::AccessDenied(format!(
            "ddbcached does not forward {}: operations that change tables are off \
             (dynamodb_api.control_plane = false)",
            op.name
        )));
    }
    if request.method() != Method::POST {
        return Err(ApiError::UnknownOperation(format!(
            "{} {}: DynamoDB's API takes POST requests",
            request.method(),
            request.uri().path()
        )));
    }
    let host = request.headers().get(http::header::HOST).cloned();
    let limit = shared.config.max_body_bytes;
    let too_large = |size: &dyn std::fmt::Display| {
        ApiError::Validation(format!(
            "the request body ({size} bytes) is over this daemon's limit of {limit} bytes \
             (dynamodb_api.max_body_bytes)"
        ))
    };
    let declared = request
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if let Some(size) = declared.filter(|size| *size > limit as u64) {
        return Err(too_large(&size));
    }
    let encoding = request
        .headers()
        .get(http::header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("").to_ascii_lowercase());
    let content_type = request.headers().get(http::header::CONTENT_TYPE).cloned();
    let body = tokio::time::timeout(slow, Limited::new(request.into_body(), limit).collect())
        .await
        .map_err(|_| {
            ApiError::Validation(format!(
                "the request body did not arrive within {} ms (dynamodb_api.idle_timeout_ms)",
                slow.as_millis()
            ))
        })?
        .map_err(|e| match e.downcast::<http_body_util::LengthLimitError>() {
            Ok(_) => too_large(&format!("more than {limit}")),
            Err(e) => ApiError::Validation(format!("the request body could not be read: {e}")),
        })?
        .to_bytes();
    let body = match encoding.as_deref() {
        None | Some("identity") | Some("") => body,
        Some("gzip") => gunzip(&body, limit).map_err(|e| match e {
            Gunzip::TooLarge => too_large(&format!("more than {limit}, decoded")),
            Gunzip::Broken(e) => {
                ApiError::Serialization(format!("the gzip body does not decode: {e}"))
            }
        })?,
        Some(other) => {
            return Err(ApiError::Serialization(format!(
                "Content-Encoding {other} is not supported (gzip is)"
            )))
        }
    };
    let parsed = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&body)
        .map_err(|e| {
            ApiError::Serialization(format!("the request body is not a JSON object: {e}"))
        })?;
    if op.name == "DescribeEndpoints" {
        return Ok((describe_endpoints(host), Served::Hit));
    }
    let call = reads::Call {
        shared,
        target,
        content_type: content_type.as_ref(),
    };
    let Some(caching) = &shared.caching else {
        return Ok((call.forward(body).await?, Served::Bypass));
    };
    if let Some(discovery) = &caching.discovery {
        discovery.consider(&parsed);
    }
    let cache = &caching.cache;
    match op.name {
        "GetItem" => return reads::get_item(&call, cache, parsed, body).await,
        "BatchGetItem" => return reads::batch_get_item(&call, cache, parsed, body).await,
        "Query" => return reads::query(&call, cache, parsed, body).await,
        _ => {}
    }
    let Some(touched) = writes::Touched::of(cache, op.name, &parsed) else {
        return Ok((call.forward(body).await?, Served::Bypass));
    };
    // The write runs to its end in its own task: once sent it may be applied, so its
    // entries must go even if the client hangs up before the answer (the client's
    // retry may then be refused, a failed condition, and apply nothing itself). Until
    // it is sent, a client that hangs up takes it along.
    let permit = shared
        .writes
        .clone()
        .acquire_owned()
        .await
        .expect("never closed");
    let (shared, target) = (shared.clone(), target.clone());
    let (on_written, cache) = (caching.on_written.clone(), cache.clone());
    let write = tokio::spawn(async move {
        let _permit = permit;
        let result = shared
            .upstream
            .forward(&target, content_type.as_ref(), body)
            .await;
        // Applied unless DynamoDB refused it; no answer may still mean applied.
        let refused = matches!(&result, Ok(r) if r.status().is_client_error());
        if !refused {
            let (items, flushed) = touched.settle(&cache);
            for (table, key, partition) in &items {
                on_written.item(*table, key, partition).await;
            }
            for table in flushed {
                on_written.unknown(table).await;
            }
        }
        result
    });
    let result = write
        .await
        .map_err(|e| ApiError::Upstream(format!("the write's task ended abnormally: {e}")))?;
    Ok((result?, Served::Bypass))
}

/// DescribeEndpoints, answered by the front: the address the client reached it at (its
/// `Host`). An SDK with endpoint discovery on (the Java SDK's `endpointDiscoveryEnabled`)
/// sends every later request to the address it is given, with its configured scheme:
/// DynamoDB's own answer, a regional endpoint, would take it around the daemon.
fn describe_endpoints(host: Option<HeaderValue>) -> Response<Full<Bytes>> {
    let address = host
        .as_ref()
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or("localhost");
    let body = serde_json::json!({
        "Endpoints": [{ "Address": address, "CachePeriodInMinutes": 1440 }]
    });
    reads::respond(body.to_string().into_bytes(), None)
}

/// Why a gzip body was not decoded.
enum Gunzip {
    TooLarge,
    Broken(std::io::Error),
}

/// Decodes a gzip body, refusing to produce more than `limit` bytes.
fn gunzip(body: &[u8], limit: usize) -> Result<Bytes, Gunzip> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(body)
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(Gunzip::Broken)?;
    if out.len() > limit {
        return Err(Gunzip::TooLarge);
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn gzip_bodies_decode_within_the_limit() {
        assert_eq!(&gunzip(&gzip(b"{}"), 10).ok().unwrap()[..], b"{}");
        // A small body that inflates past the limit is refused, not decoded whole.
        let bomb = gzip(&vec![b' '; 1 << 20]);
        assert!(bomb.len() < 4096);
        assert!(matches!(gunzip(&bomb, 1000), Err(Gunzip::TooLarge)));
        assert!(matches!(gunzip(b"not gzip", 1000), Err(Gunzip::Broken(_))));
    }
}
