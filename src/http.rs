//! The operators' HTTP endpoint: `GET /metrics` (Prometheus exposition) and `GET /ready`
//! (200 once the daemon is ready, 503 before, for readiness probes). Deliberately tiny:
//! one request per connection, bounded reads and a timeout, so a stuck scraper costs
//! nothing.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::probe::Probe;

/// Longest request head read.
const MAX_HEAD_BYTES: usize = 8192;
/// Time a client gets to send its request and take the answer.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the endpoint on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, probe: Arc<Probe>, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => return,
        };
        match accepted {
            Ok((stream, _)) => {
                let probe = probe.clone();
                tokio::spawn(async move {
                    if tokio::time::timeout(EXCHANGE_TIMEOUT, exchange(stream, &probe))
                        .await
                        .is_err()
                    {
                        tracing::debug!("metrics client timed out");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn exchange(mut stream: TcpStream, probe: &Probe) {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > MAX_HEAD_BYTES {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            )
            .await;
        }
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|b| *b == b' ');
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    match (method, path) {
        (b"GET", b"/metrics") => {
            let body = probe.render_metrics().await;
            respond(&mut stream, "200 OK", "text/plain; version=0.0.4", &body).await
        }
        (b"GET", b"/ready") => {
            let health = probe.health();
            let detail = health.detail();
            let status = if health.ready {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            respond(&mut stream, status, "text/plain", &format!("{detail}\n")).await
        }
        (b"GET", _) => {
            respond(
                &mut stream,
                "404 Not Found",
                "text/plain",
                "try /metrics or /ready\n",
            )
            .await
        }
        _ => respond(&mut stream, "405 Method Not Allowed", "text/plain", "").await,
    }
}

async fn respond(stream: &mut TcpStream, status: &str, content_type: &str, body: &str) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
}
