//! DynamoDB faults that DynamoDB Local cannot produce, against fake endpoints on loopback:
//! nobody listening, a server that never answers, and one that always throttles.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ddbcached_protocol::ErrorCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::{dynamo_config, free_port, Daemon};

/// Longer than any configured timeout below: reaching it means the daemon hung.
const HANG: Duration = Duration::from_secs(30);

async fn daemon_on(endpoint: &str, edit: impl FnOnce(&mut ddbcached::config::Config)) -> Daemon {
    let mut config = dynamo_config(endpoint);
    edit(&mut config);
    Daemon::start_without_tailers(config).await
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_dynamodb_is_an_error_not_a_hang() {
    let d = daemon_on(&format!("http://127.0.0.1:{}", free_port()), |c| {
        c.dynamodb.max_attempts = 2;
    })
    .await;
    let c = d.client().await;
    let err = tokio::time::timeout(HANG, c.kv_get("ns", Bytes::from_static(b"k"), None))
        .await
        .expect("an answer, not a hang")
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unavailable), "{err}");
    let err = tokio::time::timeout(HANG, c.log_put("t", Bytes::from_static(b"v")))
        .await
        .expect("an answer, not a hang")
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unavailable), "{err}");
    c.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_dynamodb_times_out_without_holding_up_other_requests() {
    // Accepts connections and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            open.push(s);
        }
    });
    let d = daemon_on(&endpoint, |c| {
        c.dynamodb.attempt_timeout_ms = 1000;
        c.dynamodb.operation_timeout_ms = 2000;
    })
    .await;
    let c = d.client().await;
    let slow = {
        let c = c.clone();
        tokio::spawn(async move { c.kv_get("ns", Bytes::from_static(b"k"), None).await })
    };
    // On the same connection, a request behind the stuck one is answered at once.
    c.ping().await.unwrap();
    assert!(!slow.is_finished(), "the DynamoDB read is still waiting");
    let err = tokio::time::timeout(HANG, slow)
        .await
        .expect("no hang")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Timeout), "{err}");
    held.abort();
}

/// A DynamoDB endpoint that answers every request with ThrottlingException.
async fn throttling_endpoint() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let count = requests.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(answer_throttled(s, count.clone()));
        }
    });
    (endpoint, requests)
}

async fn answer_throttled(mut s: TcpStream, count: Arc<AtomicUsize>) {
    let body = r#"{"__type":"com.amazonaws.dynamodb.v20120810#ThrottlingException","message":"Rate of requests exceeds the allowed throughput."}"#;
    let mut buf = Vec::new();
    loop {
        // Read one request: headers, then Content-Length bytes of body.
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0);
        while buf.len() < head_end + len {
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_end + len);
        count.fetch_add(1, Ordering::SeqCst);
        let response = format!(
            "HTTP/1.1 400 Bad Request\r\nContent-Type: application/x-amz-json-1.0\r\nx-amzn-RequestId: test\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if s.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn throttling_is_retried_then_reported() {
    let (endpoint, requests) = throttling_endpoint().await;
    let d = daemon_on(&endpoint, |c| {
        c.dynamodb.max_attempts = 3;
        c.dynamodb.operation_timeout_ms = 20_000;
    })
    .await;
    let c = d.client().await;
    let err = tokio::time::timeout(
        HANG,
        c.kv_put("ns", Bytes::from_static(b"k"), Bytes::new(), 1),
    )
    .await
    .expect("no hang")
    .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Throttled), "{err}");
    assert_eq!(
        requests.load(Ordering::SeqCst),
        3,
        "one call and two retries"
    );
}
