//! A TCP proxy in front of DynamoDB Local that can swallow its responses.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A TCP proxy in front of DynamoDB Local that can swallow responses: requests still
/// reach DynamoDB (and writes are applied) but the daemon never hears back, which is what
/// a lost connection or a timeout after the fact looks like.
pub struct Proxy {
    pub endpoint: String,
    swallow: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: &str) -> Proxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let swallow = Arc::new(AtomicBool::new(false));
        let flag = swallow.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let flag = flag.clone();
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = tokio::spawn(async move { tokio::io::copy(&mut cr, &mut sw).await });
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if !flag.load(Ordering::SeqCst) && cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    up.abort();
                });
            }
        });
        Proxy {
            endpoint,
            swallow,
            task,
        }
    }

    /// From now on, drop DynamoDB's responses (`true`) or pass them (`false`).
    pub fn swallow_responses(&self, on: bool) {
        self.swallow.store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
