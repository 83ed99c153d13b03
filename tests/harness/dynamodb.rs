//! DynamoDB Local for the tests: one per test binary, shared by every test (tables made
//! once), or one of a test's own that it can kill and restart; and the tests'
//! configuration for reaching it.

use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use ddbcached::config::Config;
use ddbcached::{aws, tables};

use super::free_port;

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
    /// Where its data lives; `None`: in memory (a restart starts it empty).
    data: Option<tempfile::TempDir>,
    process: Option<Child>,
}

impl OwnLocal {
    /// Starts it, keeping its data on disk, and creates the tables.
    pub async fn start() -> OwnLocal {
        Self::start_with(Some(tempfile::tempdir().unwrap())).await
    }

    /// Starts one in memory and creates the tables: for a test that writes so much that
    /// it would slow every other test sharing the binary's DynamoDB Local.
    pub async fn start_in_memory() -> OwnLocal {
        Self::start_with(None).await
    }

    async fn start_with(data: Option<tempfile::TempDir>) -> OwnLocal {
        let port = free_port();
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

    /// The `[dynamodb]` section of a configuration file reaching it.
    pub fn toml(&self) -> String {
        dynamodb_toml(&self.endpoint)
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
        let storage: Vec<String> = match &self.data {
            Some(dir) => vec!["-dbPath".into(), dir.path().to_str().unwrap().to_owned()],
            None => vec!["-inMemory".into()],
        };
        let child = tokio::task::spawn_blocking(move || {
            let storage: Vec<&str> = storage.iter().map(String::as_str).collect();
            spawn_java(port, &storage)
        })
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

/// DynamoDB timeouts of the tests' daemons (connect, attempt, operation), unless a test
/// is about timeouts and sets its own: generous, since a loaded machine can make DynamoDB
/// Local ten times slower than usual, and a test that is not about timeouts must not
/// fail on one.
pub(super) const TEST_TIMEOUTS_MS: [(&str, u64); 3] = [
    ("connect_timeout_ms", 10_000),
    ("attempt_timeout_ms", 30_000),
    ("operation_timeout_ms", 60_000),
];

/// The `[dynamodb]` section of a configuration file for DynamoDB Local at `endpoint`, with
/// the tests' timeouts (for the programs the tests run, which read files).
pub fn dynamodb_toml(endpoint: &str) -> String {
    let mut toml = format!(
        "[dynamodb]\nendpoint = {endpoint:?}\nregion = \"us-east-1\"\nuse_dummy_credentials = true\n"
    );
    for (key, ms) in TEST_TIMEOUTS_MS {
        toml.push_str(&format!("{key} = {ms}\n"));
    }
    toml
}

/// A configuration for DynamoDB at `endpoint`, with the tests' timeouts.
pub fn dynamo_config(endpoint: &str) -> Config {
    let mut c = Config::default();
    c.dynamodb.endpoint = endpoint.to_owned();
    c.dynamodb.region = "us-east-1".into();
    c.dynamodb.use_dummy_credentials = true;
    let [(_, connect), (_, attempt), (_, operation)] = TEST_TIMEOUTS_MS;
    c.dynamodb.connect_timeout_ms = connect;
    c.dynamodb.attempt_timeout_ms = attempt;
    c.dynamodb.operation_timeout_ms = operation;
    // Tests that scrape metrics start their own endpoint.
    c.metrics.listen = String::new();
    c
}
