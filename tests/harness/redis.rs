//! `redis-server` for the fleet tests: one of a test's own, plain or TLS-only, that the
//! test can kill and restart empty.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

/// A `redis-server` of one test's own on a free loopback port, without persistence (a
/// restart loses every stream), killed when dropped.
pub struct RedisServer {
    pub port: u16,
    process: Option<Child>,
    /// With TLS: the directory holding its certificates and their authority's.
    tls: Option<tempfile::TempDir>,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        let mut server = RedisServer {
            port: free_port(),
            process: None,
            tls: None,
        };
        server.restart().await;
        server
    }

    /// One that speaks only TLS, with a certificate for 127.0.0.1 signed by an authority
    /// made for it (`openssl`).
    pub async fn start_tls() -> RedisServer {
        let mut server = RedisServer {
            port: free_port(),
            process: None,
            tls: Some(certificates()),
        };
        server.restart().await;
        server
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The authority to trust (empty without TLS).
    pub fn ca_file(&self) -> String {
        self.tls.as_ref().map_or_else(String::new, |d| {
            d.path().join("ca.crt").to_str().unwrap().to_owned()
        })
    }

    /// Stops it at once (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it (again) on its port, empty.
    pub async fn restart(&mut self) {
        let port = self.port.to_string();
        let mut command = Command::new("redis-server");
        match &self.tls {
            Some(dir) => {
                let file = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
                command.args([
                    "--port",
                    "0",
                    "--tls-port",
                    &port,
                    "--tls-cert-file",
                    &file("server.crt"),
                    "--tls-key-file",
                    &file("server.key"),
                    "--tls-ca-cert-file",
                    &file("ca.crt"),
                    "--tls-auth-clients",
                    "no",
                ]);
            }
            None => {
                command.args(["--port", &port]);
            }
        }
        let child = command
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            // Small stream nodes, so that trimming by age (MINID ~) is nearly exact.
            .args(["--stream-node-max-entries", "4"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start redis-server (Debian's redis-server package)");
        self.process = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A directory holding `ca.crt`, an authority made for one test (`openssl`), and
/// `server.crt` and `server.key`, a certificate for 127.0.0.1 it signed.
pub fn certificates() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"set -e
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=test-ca
openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=127.0.0.1
printf 'subjectAltName=IP:127.0.0.1\n' > san.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 2 -extfile san.ext"#;
    let made = Command::new("sh")
        .args(["-c", script])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run openssl");
    assert!(
        made.success(),
        "making test certificates with openssl failed"
    );
    dir
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
