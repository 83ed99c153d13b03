//! Shared test fixtures: DynamoDB Local, daemons, random names, raw protocol frames.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ddbcached::aws::{self, ApiCalls};
use ddbcached::config::Config;
use ddbcached::daemon::{Daemon as RootDaemon, Tailers};
use ddbcached::{service::Service, tables};
use ddbcached_protocol::Client;
use rand::distr::{Alphanumeric, SampleString};
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

/// The DynamoDB Local of this test binary.
struct Local {
    endpoint: String,
    /// Closing this pipe (when the test process exits, however it exits) makes the
    /// wrapper shell kill DynamoDB Local.
    _lifeline: Option<Mutex<ChildStdin>>,
    /// Kept, not waited for: the wrapper ends when the test process does.
    _process: Option<Mutex<Child>>,
}

static LOCAL: OnceLock<Local> = OnceLock::new();

/// The endpoint of a DynamoDB Local with both tables created.
pub fn endpoint() -> &'static str {
    &LOCAL.get_or_init(start_local).endpoint
}

fn start_local() -> Local {
    let local = match std::env::var("DDBCACHED_TEST_ENDPOINT") {
        Ok(endpoint) if !endpoint.is_empty() => Local {
            endpoint,
            _lifeline: None,
            _process: None,
        },
        _ => spawn_local(),
    };
    // Create the tables on a runtime of their own: the tests' runtimes come and go.
    let config = dynamo_config(&local.endpoint);
    std::thread::spawn(move || {
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            let client = aws::dynamodb_client(&config.dynamodb, Default::default()).await;
            tables::init_tables(&client, &config.dynamodb)
                .await
                .unwrap();
        })
    })
    .join()
    .unwrap();
    local
}

fn spawn_local() -> Local {
    let port = free_port();
    let mut child = spawn_java(port, &["-inMemory"]);
    Local {
        endpoint: format!("http://127.0.0.1:{port}"),
        _lifeline: Some(Mutex::new(child.stdin.take().unwrap())),
        _process: Some(Mutex::new(child)),
    }
}

/// Starts DynamoDB Local on `port` with `storage` options, under a shell that kills it
/// (SIGTERM) when its stdin closes; returns once it accepts connections.
fn spawn_java(port: u16, storage: &[&str]) -> Child {
    static JAR_DIR: OnceLock<String> = OnceLock::new();
    let dir = JAR_DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = Command::new(root.join("scripts/dynamodb-local.sh"))
            .arg("install")
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/dynamodb-local.sh install");
        assert!(out.status.success(), "installing DynamoDB Local failed");
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    });
    let log = std::fs::File::create(
        std::env::temp_dir().join(format!("ddbcached-test-dynamodb-{port}.log")),
    )
    .unwrap();
    let mut child = Command::new("sh")
        .args([
            "-c",
            r#"dir=$1 port=$2; shift 2
java -Djava.library.path="$dir/DynamoDBLocal_lib" -jar "$dir/DynamoDBLocal.jar" -port "$port" "$@" & pid=$!
read _; kill $pid; wait $pid"#,
            "sh",
            dir,
            &port.to_string(),
        ])
        .args(storage)
        .stdin(Stdio::piped())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start DynamoDB Local");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "DynamoDB Local did not start within 60 s"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "DynamoDB Local exited at start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    child
}

/// A DynamoDB Local of one test's own, keeping its data in a directory, that the test can
/// kill and start again on the same port with the same data: a backend outage.
pub struct OwnLocal {
    pub endpoint: String,
    port: u16,
    data: tempfile::TempDir,
    process: Option<Child>,
}

impl OwnLocal {
    /// Starts it and creates the tables.
    pub async fn start() -> OwnLocal {
        let port = free_port();
        let data = tempfile::tempdir().unwrap();
        let mut local = OwnLocal {
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
            data,
            process: None,
        };
        local.restart().await;
        let config = dynamo_config(&local.endpoint);
        let client = aws::dynamodb_client(&config.dynamodb, Default::default()).await;
        tables::init_tables(&client, &config.dynamodb)
            .await
            .unwrap();
        local
    }

    /// Kills it (SIGTERM: with SIGKILL, DynamoDB Local loses transactions it acknowledged
    /// a few milliseconds before) and waits until it is gone.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.process.take() {
            drop(child.stdin.take());
            tokio::task::spawn_blocking(move || child.wait())
                .await
                .unwrap()
                .unwrap();
        }
    }

    /// Starts it (again) on its port with its data.
    pub async fn restart(&mut self) {
        let port = self.port;
        let data = self.data.path().to_str().unwrap().to_owned();
        let child = tokio::task::spawn_blocking(move || spawn_java(port, &["-dbPath", &data]))
            .await
            .unwrap();
        self.process = Some(child);
    }
}

impl Drop for OwnLocal {
    fn drop(&mut self) {
        if let Some(mut child) = self.process.take() {
            drop(child.stdin.take());
            let _ = child.wait();
        }
    }
}

/// An HTTP/1.1 GET on loopback: the status line and the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

/// The daemon binary as a process of its own (so that its memory and descriptors can be
/// read from /proc), on DynamoDB Local with a socket in `dir` and `config` as its
/// configuration file; returns once it is ready, with its socket.
pub async fn spawn_daemon(dir: &Path, config: &str) -> (tokio::process::Child, PathBuf) {
    let socket = dir.join("ddbcached.sock");
    let file = dir.join("ddbcached.toml");
    std::fs::write(&file, config).unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ddbcached"))
        .args(["serve", "--config"])
        .arg(&file)
        .env("RUST_LOG", "warn")
        .env("DDBCACHED_SOCKET", &socket)
        .env("DDBCACHED_DYNAMODB_ENDPOINT", endpoint())
        .env("DDBCACHED_DYNAMODB_REGION", "us-east-1")
        .env("DDBCACHED_DYNAMODB_USE_DUMMY_CREDENTIALS", "true")
        // Memory that glibc keeps after a peak would hide or fake a leak: one arena (with
        // one per thread the pools kept growing, 0.5 MiB a round over twelve rounds), and
        // fixed thresholds (glibc otherwise raises them after large frees), so that
        // blocks from 64 KiB are mapped and unmapped and a freed heap top is returned.
        .env("MALLOC_ARENA_MAX", "1")
        .env("MALLOC_MMAP_THRESHOLD_", "65536")
        .env("MALLOC_TRIM_THRESHOLD_", "131072")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(c) = Client::connect(&socket).await {
            if c.health().await.is_ok_and(|(ready, _)| ready) {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the daemon did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (child, socket)
}

/// A process's resident memory, bytes.
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// A loopback port nobody listens on at the moment.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A configuration for DynamoDB at `endpoint` with short timeouts.
pub fn dynamo_config(endpoint: &str) -> Config {
    let mut c = Config::default();
    c.dynamodb.endpoint = endpoint.to_owned();
    c.dynamodb.region = "us-east-1".into();
    c.dynamodb.use_dummy_credentials = true;
    // Tests that scrape metrics start their own endpoint.
    c.metrics.listen = String::new();
    c
}

/// A daemon running in this test's runtime, on its own socket, built by the same root
/// as the binary's.
pub struct Daemon {
    pub socket: PathBuf,
    pub config: Config,
    /// The daemon's internals, for counters and test hooks.
    pub service: Arc<Service>,
    /// DynamoDB calls the daemon made, by API.
    pub api_calls: Arc<ApiCalls>,
    metrics: std::net::SocketAddr,
    shutdown: CancellationToken,
    tailers: Option<Tailers>,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// A daemon on DynamoDB Local.
    pub async fn start() -> Daemon {
        Self::start_with(|_| {}).await
    }

    /// A daemon on DynamoDB Local with a changed configuration.
    pub async fn start_with(edit: impl FnOnce(&mut Config)) -> Daemon {
        let mut config = dynamo_config(endpoint());
        edit(&mut config);
        Self::start_config(config).await
    }

    /// A daemon with exactly this configuration (its socket path and metrics address are
    /// replaced), its stream tailers positioned and caught up.
    pub async fn start_config(config: Config) -> Daemon {
        let d = Self::launch(config, true).await;
        d.wait_until_fresh().await;
        d
    }

    /// A daemon whose DynamoDB has no usable stream (a fake endpoint): no tailers, so
    /// every read bypasses the cache.
    pub async fn start_without_tailers(config: Config) -> Daemon {
        Self::launch(config, false).await
    }

    async fn launch(mut config: Config, tail: bool) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        config.server.socket_path = dir.path().join("ddbcached.sock");
        config.metrics.listen = "127.0.0.1:0".into();
        config.validate().unwrap();
        let daemon = if tail {
            RootDaemon::start(&config).await
        } else {
            RootDaemon::start_without_tailers(&config).await
        }
        .unwrap();
        let shutdown = CancellationToken::new();
        Daemon {
            socket: config.server.socket_path.clone(),
            config,
            service: daemon.service().clone(),
            api_calls: daemon.api_calls().clone(),
            metrics: daemon.metrics_addr().unwrap(),
            tailers: daemon.tailers(),
            task: Some(tokio::spawn(daemon.run(shutdown.clone()))),
            shutdown,
            _dir: dir,
        }
    }

    /// A new connection.
    pub async fn client(&self) -> Client {
        Client::connect(&self.socket).await.unwrap()
    }

    /// Stops the daemon's stream tailers and waits until they have (the daemon goes on
    /// serving).
    pub async fn stop_tailers(&self) {
        if let Some(tailers) = &self.tailers {
            tailers.stop().await;
        }
    }

    /// Waits until both tailers have proven themselves caught up, so that reads are
    /// served from the cache.
    pub async fn wait_until_fresh(&self) {
        use ddbcached::store::StoreTable;
        tokio::time::timeout(Duration::from_secs(30), async {
            while StoreTable::ALL
                .iter()
                .any(|t| self.service.coherence().must_bypass(*t))
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the tailers catch up within 30 s");
    }

    /// Whole-table invalidations the tailers have made so far. DynamoDB Local sometimes
    /// reports stream records as trimmed when none were (aws/aws-sdk-java#2923); the
    /// tailer then rightly flushes, which tests counting DynamoDB calls must notice.
    pub fn flushes(&self) -> u64 {
        self.service.coherence().snapshot().flushes.iter().sum()
    }

    /// The address of the daemon's metrics endpoint (on a free loopback port).
    pub fn metrics_endpoint(&self) -> std::net::SocketAddr {
        self.metrics
    }

    /// Signals shutdown without waiting for it.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Stops the daemon and waits until it has.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }

    /// Whether the daemon's task is still running.
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A random alphanumeric name of 3 to 255 characters, like the shared backend suite's.
pub fn name() -> String {
    let len = rand::rng().random_range(3..=255);
    Alphanumeric.sample_string(&mut rand::rng(), len)
}

/// 1 to 100 random bytes (a key).
pub fn key() -> Bytes {
    let len = rand::rng().random_range(1..=100);
    random_bytes(len)
}

/// 0 to 100 random bytes (a value).
pub fn value() -> Bytes {
    let len = rand::rng().random_range(0..=100);
    random_bytes(len)
}

pub fn random_bytes(len: usize) -> Bytes {
    let mut v = vec![0u8; len];
    rand::rng().fill(&mut v[..]);
    Bytes::from(v)
}

/// A raw connection speaking frames by hand, to test the wire format itself.
pub struct Raw {
    pub stream: UnixStream,
}

impl Raw {
    pub async fn connect(socket: &Path) -> Raw {
        Raw {
            stream: UnixStream::connect(socket).await.unwrap(),
        }
    }

    /// Connects and completes the handshake.
    pub async fn ready(socket: &Path) -> Raw {
        let mut raw = Raw::connect(socket).await;
        raw.send(&msgpack_map(&[
            ("id", Val::U(0)),
            ("op", Val::S("hello")),
            ("version", Val::U(1)),
        ]))
        .await;
        let reply = raw.recv().await.expect("hello answered");
        assert_eq!(field(&reply, "code"), Some(rmpv::Value::from(0)));
        raw
    }

    /// Sends one frame with this body.
    pub async fn send(&mut self, body: &[u8]) {
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(body);
        self.stream.write_all(&frame).await.unwrap();
    }

    /// Reads one frame body and decodes it; `None` at end of stream.
    pub async fn recv(&mut self) -> Option<rmpv::Value> {
        let mut len = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(30), self.stream.read_exact(&mut len))
            .await
            .expect("a reply within 30 s")
            .ok()?;
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        self.stream.read_exact(&mut body).await.ok()?;
        Some(rmpv::decode::read_value(&mut &body[..]).expect("a MessagePack reply"))
    }

    /// Whether the server has closed the connection (reads reach end of stream).
    pub async fn closed(&mut self) -> bool {
        let mut buf = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

/// A field of a MessagePack map.
pub fn field(map: &rmpv::Value, name: &str) -> Option<rmpv::Value> {
    map.as_map()?
        .iter()
        .find(|(k, _)| k.as_str() == Some(name))
        .map(|(_, v)| v.clone())
}

/// Values for [`msgpack_map`].
pub enum Val<'a> {
    U(u64),
    I(i64),
    S(&'a str),
    B(&'a [u8]),
}

/// Encodes a MessagePack map with string keys, as a client in another language would.
pub fn msgpack_map(fields: &[(&str, Val)]) -> Vec<u8> {
    let map = rmpv::Value::Map(
        fields
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Val::U(n) => rmpv::Value::from(*n),
                    Val::I(n) => rmpv::Value::from(*n),
                    Val::S(s) => rmpv::Value::from(*s),
                    Val::B(b) => rmpv::Value::Binary(b.to_vec()),
                };
                (rmpv::Value::from(*k), v)
            })
            .collect(),
    );
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &map).unwrap();
    out
}

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
        let mut server = RedisServer {
            port: free_port(),
            process: None,
            tls: Some(dir),
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

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
