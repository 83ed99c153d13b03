//! A Redis Cluster for the fleet tests, from Debian's `redis-server` and `redis-cli`:
//! three masters with a replica each on free loopback ports, made with
//! `redis-cli --cluster create`, without persistence, plain, speaking only TLS (between
//! its nodes too) or requiring a password. A test can kill a master (SIGKILL)
//! and wait for its replica to take over, move a slot to another master while it is in
//! use, or restart the whole cluster empty. Every node is killed when it is dropped.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use super::free_port;
use super::redis::certificates;

/// How long a master may be silent before its replica takes over: short for the tests,
/// long enough that a loaded machine does not cause a failover of its own.
const NODE_TIMEOUT_MS: &str = "2000";
/// How long the cluster gets to settle after a change, on a loaded machine.
const SETTLE: Duration = Duration::from_secs(60);

pub struct RedisCluster {
    ports: Vec<u16>,
    /// Per node, its process while it runs.
    processes: Vec<Option<Child>>,
    dir: tempfile::TempDir,
    /// With TLS: the certificates ([`certificates`]).
    tls: Option<tempfile::TempDir>,
    /// The password every node requires (of the `default` user), if any.
    password: Option<String>,
}

/// One line of `CLUSTER NODES`.
struct Node {
    id: String,
    port: u16,
    master: bool,
    failed: bool,
    /// Slot ranges served (masters only), inclusive.
    slots: Vec<(u16, u16)>,
}

impl RedisCluster {
    pub async fn start() -> RedisCluster {
        RedisCluster::with(None, None).await
    }

    /// One whose nodes speak only TLS, to clients and to each other.
    pub async fn start_tls() -> RedisCluster {
        RedisCluster::with(Some(certificates()), None).await
    }

    /// One whose nodes require `password` of clients and of each other.
    pub async fn start_with_password(password: &str) -> RedisCluster {
        RedisCluster::with(None, Some(password.to_owned())).await
    }

    async fn with(tls: Option<tempfile::TempDir>, password: Option<String>) -> RedisCluster {
        let mut cluster = RedisCluster {
            ports: (0..6).map(|_| free_port()).collect(),
            processes: (0..6).map(|_| None).collect(),
            dir: tempfile::tempdir().unwrap(),
            tls,
            password,
        };
        cluster.create().await;
        cluster
    }

    /// `redis+cluster://` (`rediss+cluster://` with TLS) and the masters as seed nodes.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self.ports[..3]
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let scheme = match self.tls {
            Some(_) => "rediss+cluster",
            None => "redis+cluster",
        };
        let credentials = self
            .password
            .as_ref()
            .map_or_else(String::new, |p| format!("default:{p}@"));
        format!("{scheme}://{credentials}{}", seeds.join(","))
    }

    /// The authority to trust (empty without TLS).
    pub fn ca_file(&self) -> String {
        self.tls.as_ref().map_or_else(String::new, |d| {
            d.path().join("ca.crt").to_str().unwrap().to_owned()
        })
    }

    /// How a node is listened on (a plain port, or a TLS one with its certificates), and
    /// the password it requires and gives its master.
    fn listen_args(&self, port: u16) -> Vec<String> {
        let port = port.to_string();
        let mut args = match &self.password {
            Some(p) => ["--requirepass", p, "--masterauth", p]
                .map(String::from)
                .to_vec(),
            None => vec![],
        };
        args.extend(match &self.tls {
            None => vec!["--port".into(), port],
            Some(dir) => {
                let file = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
                vec![
                    "--port".into(),
                    "0".into(),
                    "--tls-port".into(),
                    port,
                    "--tls-cluster".into(),
                    "yes".into(),
                    "--tls-replication".into(),
                    "yes".into(),
                    "--tls-cert-file".into(),
                    file("server.crt"),
                    "--tls-key-file".into(),
                    file("server.key"),
                    "--tls-ca-cert-file".into(),
                    file("ca.crt"),
                    "--tls-auth-clients".into(),
                    "no".into(),
                ]
            }
        });
        args
    }

    /// What `redis-cli` needs to reach the nodes.
    fn cli_args(&self) -> Vec<String> {
        let mut args = match &self.tls {
            None => vec![],
            Some(_) => vec!["--tls".into(), "--cacert".into(), self.ca_file()],
        };
        if let Some(p) = &self.password {
            args.extend(["-a", p, "--no-auth-warning"].map(String::from));
        }
        args
    }

    /// Starts every node empty and joins them into a cluster whose every slot is served.
    async fn create(&mut self) {
        for i in 0..self.ports.len() {
            let dir = self.dir.path().join(i.to_string());
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let child = Command::new("redis-server")
                .args(self.listen_args(self.ports[i]))
                .args(["--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", "nodes.conf"])
                .args(["--cluster-node-timeout", NODE_TIMEOUT_MS])
                .args(["--save", "", "--appendonly", "no"])
                .current_dir(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .expect("start redis-server (Debian's redis-server package)");
            self.processes[i] = Some(child);
        }
        for &port in &self.ports {
            let deadline = Instant::now() + SETTLE;
            while tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                assert!(Instant::now() < deadline, "redis-server did not start");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let mut args = vec!["--cluster".to_owned(), "create".to_owned()];
        args.extend(self.ports.iter().map(|p| format!("127.0.0.1:{p}")));
        args.extend(["--cluster-replicas", "1", "--cluster-yes"].map(String::from));
        let made = Command::new("redis-cli")
            .args(self.cli_args())
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .status()
            .await
            .expect("run redis-cli");
        assert!(made.success(), "redis-cli --cluster create failed");
        self.wait_until_ok(&[]).await;
        // A replica takes over only once it has a copy of its master's data.
        let deadline = Instant::now() + SETTLE;
        for &port in &self.ports {
            while self
                .cli(port, &["INFO", "replication"])
                .await
                .contains("role:slave")
                && !self
                    .cli(port, &["INFO", "replication"])
                    .await
                    .contains("master_link_status:up")
            {
                assert!(Instant::now() < deadline, "a replica never synchronised");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Kills every node and starts the cluster again, empty, on the same ports.
    pub async fn restart_empty(&mut self) {
        for i in 0..self.ports.len() {
            self.kill(self.ports[i]).await;
        }
        self.create().await;
    }

    /// Stops the node on `port` at once (SIGKILL).
    pub async fn kill(&mut self, port: u16) {
        let i = self.ports.iter().position(|p| *p == port).unwrap();
        if let Some(mut child) = self.processes[i].take() {
            let _ = child.kill().await;
        }
    }

    /// The slot of `key`.
    pub async fn slot(&self, key: &str) -> u16 {
        self.cli(self.live_port(&[]), &["CLUSTER", "KEYSLOT", key])
            .await
            .trim()
            .parse()
            .unwrap()
    }

    /// The port of the master serving `slot`.
    pub async fn master_of(&self, slot: u16) -> u16 {
        self.nodes(self.live_port(&[]))
            .await
            .into_iter()
            .find(|n| n.master && !n.failed && serves(n, slot))
            .expect("a master serves every slot")
            .port
    }

    /// Another master than the one serving `slot`.
    pub async fn other_master(&self, slot: u16) -> u16 {
        self.nodes(self.live_port(&[]))
            .await
            .into_iter()
            .find(|n| n.master && !n.failed && !serves(n, slot))
            .unwrap()
            .port
    }

    /// Waits until every node but those on `dead` sees a cluster whose every slot is
    /// served by a live master (after a failover: the replica has been promoted).
    pub async fn wait_until_ok(&self, dead: &[u16]) {
        let deadline = Instant::now() + SETTLE;
        for &port in self.ports.iter().filter(|p| !dead.contains(p)) {
            loop {
                let info = self.cli(port, &["CLUSTER", "INFO"]).await;
                let listing = self.cli(port, &["CLUSTER", "NODES"]).await;
                let nodes: Vec<Node> = listing.lines().filter_map(parse_node).collect();
                let covered: u32 = nodes
                    .iter()
                    .filter(|n| n.master && !n.failed && !dead.contains(&n.port))
                    .flat_map(|n| n.slots.iter())
                    .map(|(a, b)| u32::from(b - a) + 1)
                    .sum();
                if info.contains("cluster_state:ok") && covered == 16384 {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the cluster did not settle, as node {port} sees it:\n{info}\n{listing}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Moves `slot`, and the keys in it, to the master on `to`, as `redis-cli --cluster
    /// reshard` does: importing and migrating states, MIGRATE of every key, then the new
    /// owner announced to every master.
    pub async fn migrate(&self, slot: u16, to: u16) {
        let from = self.master_of(slot).await;
        let nodes = self.nodes(from).await;
        let id = |port: u16| nodes.iter().find(|n| n.port == port).unwrap().id.clone();
        let (from_id, to_id) = (id(from), id(to));
        let s = slot.to_string();
        self.ok(to, &["CLUSTER", "SETSLOT", &s, "IMPORTING", &from_id])
            .await;
        self.ok(from, &["CLUSTER", "SETSLOT", &s, "MIGRATING", &to_id])
            .await;
        loop {
            let keys = self
                .cli(from, &["CLUSTER", "GETKEYSINSLOT", &s, "100"])
                .await;
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let port = to.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            args.extend(keys);
            self.ok(from, &args).await;
        }
        for n in nodes.iter().filter(|n| n.master && !n.failed) {
            self.ok(n.port, &["CLUSTER", "SETSLOT", &s, "NODE", &to_id])
                .await;
        }
    }

    /// Bytes the nodes still running have sent to their clients so far.
    pub async fn output_bytes(&self) -> u64 {
        let mut sum = 0;
        for (i, &port) in self.ports.iter().enumerate() {
            if self.processes[i].is_some() {
                let info = self.cli(port, &["INFO", "stats"]).await;
                sum += info
                    .lines()
                    .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap();
            }
        }
        sum
    }

    fn live_port(&self, dead: &[u16]) -> u16 {
        self.ports
            .iter()
            .enumerate()
            .find(|(i, p)| self.processes[*i].is_some() && !dead.contains(p))
            .map(|(_, p)| *p)
            .expect("a node runs")
    }

    async fn nodes(&self, port: u16) -> Vec<Node> {
        self.cli(port, &["CLUSTER", "NODES"])
            .await
            .lines()
            .filter_map(parse_node)
            .collect()
    }

    async fn ok(&self, port: u16, args: &[&str]) {
        let answer = self.cli(port, args).await;
        assert!(
            answer.trim() == "OK" || answer.trim() == "NOKEY",
            "{args:?} on {port}: {answer}"
        );
    }

    async fn cli(&self, port: u16, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(self.cli_args())
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .output()
            .await
            .expect("run redis-cli");
        String::from_utf8(out.stdout).unwrap()
    }
}

fn serves(node: &Node, slot: u16) -> bool {
    node.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot))
}

/// `<id> <ip:port@cport> <flags> <master> <ping> <pong> <epoch> <state> <slot>...`
fn parse_node(line: &str) -> Option<Node> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let port = fields.get(1)?.split('@').next()?.rsplit(':').next()?;
    let flags = fields.get(2)?;
    let slots = fields
        .iter()
        .skip(8)
        .filter(|s| !s.starts_with('['))
        .filter_map(|s| match s.split_once('-') {
            Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
            None => s.parse().ok().map(|a| (a, a)),
        })
        .collect();
    Some(Node {
        id: fields[0].to_owned(),
        port: port.parse().ok()?,
        master: flags.contains("master"),
        failed: flags.contains("fail"),
        slots,
    })
}
