//! A real Prometheus scraping a loaded fleet: every dashboard query has data.

use super::*;

/// A GET to a loopback HTTP server that may answer in chunks: the body.
async fn http_body(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, mut body) = out.split_once("\r\n\r\n").unwrap();
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return body.to_owned();
    }
    let mut whole = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            return whole;
        }
        whole.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|c| match c {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (c as char).to_string()
            }
            _ => format!("%{c:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_prometheus_scrapes_a_loaded_fleet_and_every_dashboard_query_has_data() {
    let fleet = Fleet::start(2, "").await;
    fleet.wait_until_fresh().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let targets: Vec<String> = fleet
        .members
        .iter()
        .map(|m| format!("\"{}\"", m.metrics))
        .collect();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: ddbcached\n    \
             static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        ),
    )
    .unwrap();
    let mut prometheus = tokio::process::Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start prometheus (Debian's prometheus package)");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    // Load on both daemons: writes (hints, echoes, relayed batches) and reads.
    let clients = fleet.clients().await;
    let ns = name();
    let started = Instant::now();
    let mut i = 0u64;
    while started.elapsed() < Duration::from_secs(20) {
        for c in &clients {
            let key = b(&format!("k{}", i % 50));
            c.kv_put(&ns, key.clone(), b("v"), i as i64).await.unwrap();
            c.kv_get(&ns, key, None).await.unwrap();
            c.log_put(&ns, b("e")).await.unwrap();
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/grafana-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    let mut empty = Vec::new();
    for expr in &exprs {
        let query = expr
            .replace("$instance", ".*")
            .replace("$__rate_interval", "15s");
        let body = http_body(addr, &format!("/api/v1/query?query={}", encode(&query))).await;
        let answer: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert_eq!(answer["status"], "success", "{query}: {answer}");
        if answer["data"]["result"]
            .as_array()
            .is_none_or(|r| r.is_empty())
        {
            empty.push(query);
        }
    }
    assert!(empty.is_empty(), "queries without data: {empty:#?}");
    eprintln!(
        "{} dashboard queries evaluated by Prometheus, each with data",
        exprs.len()
    );
    prometheus.kill().await.unwrap();
}
