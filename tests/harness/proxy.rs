//! A TCP proxy in front of DynamoDB Local that can swallow its responses, hold back the
//! answers to one operation until told to let them go, or cut every connection.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// A TCP proxy in front of DynamoDB Local. It can swallow responses: requests still
/// reach DynamoDB (and writes are applied) but the daemon never hears back, which is what
/// a lost connection or a timeout after the fact looks like. And it can hold the answers
/// to requests of one operation: DynamoDB has answered (a read has been made), but the
/// daemon hears of it only once the test lets it, so that something can happen between
/// a read and its answer's arrival.
pub struct Proxy {
    pub endpoint: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

struct Shared {
    swallow: AtomicBool,
    /// The `X-Amz-Target` whose answers are held, while set.
    hold: Mutex<Option<String>>,
    /// Flips to `true` when held answers may go.
    released: watch::Sender<bool>,
    /// Answers held back so far.
    held: AtomicUsize,
    /// While `true`, every connection is closed and new ones are refused.
    cut: watch::Sender<bool>,
}

impl Proxy {
    pub async fn start(upstream: &str) -> Proxy {
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let shared = Arc::new(Shared {
            swallow: AtomicBool::new(false),
            hold: Mutex::new(None),
            released: watch::channel(true).0,
            held: AtomicUsize::new(0),
            cut: watch::channel(false).0,
        });
        let task = {
            let shared = shared.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    if *shared.cut.borrow() {
                        continue;
                    }
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                        continue;
                    };
                    tokio::spawn(relay(client, server, shared.clone()));
                }
            })
        };
        Proxy {
            endpoint,
            shared,
            task,
        }
    }

    /// From now on, drop DynamoDB's responses (`true`) or pass them (`false`).
    pub fn swallow_responses(&self, on: bool) {
        self.shared.swallow.store(on, Ordering::SeqCst);
    }

    /// From now on, hold back the answers to requests of `operation` (`GetItem`).
    pub fn hold_answers_to(&self, operation: &str) {
        self.shared.released.send_replace(false);
        *self.shared.hold.lock().unwrap() = Some(format!("DynamoDB_20120810.{operation}"));
    }

    /// From now on, close every connection and refuse new ones (`true`): to the daemon,
    /// DynamoDB is gone, while DynamoDB Local itself goes on; or connect again (`false`).
    pub fn cut(&self, on: bool) {
        self.shared.cut.send_replace(on);
    }

    /// Answers held back so far.
    pub fn held(&self) -> usize {
        self.shared.held.load(Ordering::SeqCst)
    }

    /// Lets the held answers go, and holds no more.
    pub fn release(&self) {
        *self.shared.hold.lock().unwrap() = None;
        self.shared.released.send_replace(true);
    }
}

/// One connection: requests up as they come; answers down, held while the request last
/// seen on the connection is of the held operation.
async fn relay(client: tokio::net::TcpStream, server: tokio::net::TcpStream, shared: Arc<Shared>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let holding = Arc::new(AtomicBool::new(false));
    let up = {
        let (shared, holding) = (shared.clone(), holding.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match cr.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let target = shared.hold.lock().unwrap().clone();
                let text = String::from_utf8_lossy(&buf[..n]);
                if text.to_ascii_lowercase().contains("x-amz-target") {
                    let held = target.is_some_and(|t| text.contains(&t));
                    holding.store(held, Ordering::SeqCst);
                }
                if sw.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        })
    };
    let down = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if holding.swap(false, Ordering::SeqCst) {
                shared.held.fetch_add(1, Ordering::SeqCst);
                let mut released = shared.released.subscribe();
                let _ = released.wait_for(|r| *r).await;
            }
            if !shared.swallow.load(Ordering::SeqCst) && cw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    };
    let mut cut = shared.cut.subscribe();
    tokio::select! {
        _ = down => {}
        _ = cut.wait_for(|c| *c) => {}
    }
    up.abort();
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
