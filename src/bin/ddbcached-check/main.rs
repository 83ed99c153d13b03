//! `ddbcached-check`: measures the consistency of daemons that share tables.
//!
//! Clients on every daemon run concurrent writes and reads on a small shared set of keys
//! and topics, recording each operation with its start and end. Then the history is
//! checked: every read returned a value that was the latest in DynamoDB at some instant
//! within [start - max_staleness, end]; a daemon's reads see the writes it acknowledged
//! before them; indices were allocated without gap or duplicate; and, once writes have
//! stopped for `max_staleness`, every daemon answers exactly what DynamoDB holds and
//! DynamoDB holds every acknowledged write. The report gives the operations, each
//! violation with the history that shows it, and the staleness of reads in nines.
//!
//! Exit status: 0 no violation, 1 violations, 2 the run itself failed.

mod history;
mod truth;
mod verify;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use ddbcached::aws::dynamodb_client;
use ddbcached::config::Config;
use ddbcached::store::kv::KvStore;
use ddbcached::store::log::LogStore;
use serde_json::json;

use crate::history::{History, Nanos};
use crate::truth::Truth;
use crate::verify::{ms, Verdict};
use crate::workload::{Names, Workload};

#[derive(Parser)]
#[command(
    version,
    about = "Measures the consistency of ddbcached daemons sharing tables"
)]
struct Args {
    /// Socket of a daemon; give two or more, all on the same tables.
    #[arg(long = "socket", required = true)]
    sockets: Vec<PathBuf>,
    /// The daemons' configuration: the tables, DynamoDB's endpoint and the staleness
    /// bound (DDBCACHED_* variables apply as for the daemon).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Operations to run, over all clients.
    #[arg(long, default_value_t = 100_000)]
    ops: u64,
    /// Connections per daemon, each running one operation at a time.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Keys shared by all clients.
    #[arg(long, default_value_t = 8)]
    keys: usize,
    /// Topics shared by all clients.
    #[arg(long, default_value_t = 4)]
    topics: usize,
    /// Fraction of operations that write.
    #[arg(long, default_value_t = 0.2)]
    write_fraction: f64,
    /// Fraction of operations on the indexed store.
    #[arg(long, default_value_t = 0.25)]
    log_fraction: f64,
    /// Clients writing key-value versions straight to DynamoDB, around every daemon (the
    /// daemons learn of them only from the stream, or in fleet mode from the relays).
    #[arg(long, default_value_t = 0)]
    around: usize,
    /// Seed of the clients' choices (default: random).
    #[arg(long)]
    seed: Option<u64>,
    /// Violations to print in full.
    #[arg(long, default_value_t = 20)]
    show: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("ddbcached-check: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs, checks and reports; true when nothing was violated.
async fn run(args: Args) -> anyhow::Result<bool> {
    let config = Config::load(args.config.as_deref())?;
    for (name, f) in [
        ("--write-fraction", args.write_fraction),
        ("--log-fraction", args.log_fraction),
    ] {
        anyhow::ensure!((0.0..=1.0).contains(&f), "{name} must be within 0 and 1");
    }
    anyhow::ensure!(
        args.keys > 0 && args.topics > 0 && args.clients > 0,
        "--keys, --topics and --clients must be positive"
    );
    let bound = Duration::from_millis(config.cache.max_staleness_ms);
    let seed = args.seed.unwrap_or_else(rand::random);
    let run_id = format!("{:016x}", rand::random::<u64>());
    let client = dynamodb_client(&config.dynamodb, Default::default()).await;
    let kv = KvStore::new(
        client.clone(),
        config.dynamodb.kv_table.clone(),
        config.dynamodb.batch_max_attempts,
    );
    let workload = Workload {
        ops: args.ops,
        clients_per_daemon: args.clients,
        around: args.around,
        keys: args.keys,
        topics: args.topics,
        write_fraction: args.write_fraction,
        log_fraction: args.log_fraction,
        seed,
    };

    let (history, elapsed) = workload::run(
        &args.sockets,
        &kv,
        &workload,
        Names {
            run: run_id.clone(),
        },
    )
    .await?;
    let mut verdict = verify::check(
        &history,
        &run_id,
        args.sockets.len(),
        bound.as_nanos() as Nanos,
    );

    // Quiescence: with no writes for the staleness bound, every daemon must have caught up.
    tokio::time::sleep(bound + Duration::from_millis(100)).await;
    let truth = Truth {
        kv,
        log: LogStore::new(
            client,
            config.dynamodb.log_table.clone(),
            config.dynamodb.batch_max_attempts,
            config.dynamodb.index_allocation_max_attempts,
        ),
    };
    let compared = truth
        .compare(
            &mut verdict,
            &history,
            &Names {
                run: run_id.clone(),
            },
            args.keys,
            args.topics,
            &args.sockets,
        )
        .await?;

    let report = Report {
        args: &args,
        history: &history,
        verdict: &verdict,
        elapsed,
        compared,
        bound,
        seed,
        run_id,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.json())?);
    } else {
        report.print();
    }
    Ok(verdict.violations.is_empty())
}

struct Report<'a> {
    args: &'a Args,
    history: &'a History,
    verdict: &'a Verdict,
    elapsed: Duration,
    compared: usize,
    bound: Duration,
    seed: u64,
    run_id: String,
}

/// Staleness percentiles reported.
const PERCENTILES: [f64; 5] = [50.0, 99.0, 99.9, 99.99, 100.0];

/// Staleness thresholds (ms) at which consistency is counted in nines; the bound is added.
const WITHIN_MS: [u64; 4] = [0, 100, 500, 1000];

impl Report<'_> {
    fn stats(&self) -> Stats {
        let mut staleness = self.verdict.staleness.clone();
        staleness.sort_unstable();
        let reads = staleness.len();
        let percentile = |p: f64| {
            if reads == 0 {
                return 0;
            }
            let rank = ((p / 100.0) * reads as f64).ceil() as usize;
            staleness[rank.clamp(1, reads) - 1]
        };
        let bound_ms = self.bound.as_millis() as u64;
        let within = WITHIN_MS
            .iter()
            .copied()
            .filter(|&t| t < bound_ms)
            .chain([bound_ms])
            .map(|t| (t, staleness.partition_point(|&s| s <= t * 1_000_000)))
            .collect();
        Stats {
            reads,
            within,
            percentiles: PERCENTILES.iter().map(|&p| (p, percentile(p))).collect(),
        }
    }

    fn print(&self) {
        let h = self.history;
        let s = self.stats();
        let failed_writes = h.kv_writes.iter().filter(|w| !w.acked).count()
            + h.log_appends.iter().filter(|a| a.index.is_none()).count();
        println!(
            "ddbcached-check run {} (seed {}): {} daemons x {} clients, {} keys, {} topics, staleness bound {} ms",
            self.run_id,
            self.seed,
            self.args.sockets.len(),
            self.args.clients,
            self.args.keys,
            self.args.topics,
            self.bound.as_millis()
        );
        println!(
            "operations: {} in {:.1} s ({:.0}/s): kv.put {}, kv.get {}, log.put {}, log.scan {}; {} writes failed, {} reads failed",
            h.operations(),
            self.elapsed.as_secs_f64(),
            h.operations() as f64 / self.elapsed.as_secs_f64(),
            h.kv_writes.len(),
            h.kv_reads.len(),
            h.log_appends.len(),
            h.log_reads.len(),
            failed_writes,
            h.read_errors.len()
        );
        println!(
            "after quiescence: {} daemon answers compared with DynamoDB",
            self.compared
        );
        // Staleness 0: the version read may still have been the latest when the read began.
        for &(t, n) in &s.within {
            println!(
                "reads within {t} ms of the latest: {n} of {} ({:.6}%, {})",
                s.reads,
                s.fraction(n) * 100.0,
                nines_text(s.fraction(n))
            );
        }
        let pct: Vec<String> = s
            .percentiles
            .iter()
            .map(|(p, v)| format!("p{p} {} ms", ms(*v)))
            .collect();
        println!("staleness: {}", pct.join(", "));
        for e in h.read_errors.iter().take(self.args.show) {
            println!("read error: {e}");
        }
        println!("violations: {}", self.verdict.violations.len());
        for v in self.verdict.violations.iter().take(self.args.show) {
            println!("- {}", v.kind);
            for line in &v.history {
                println!("    {line}");
            }
        }
    }

    fn json(&self) -> serde_json::Value {
        let h = self.history;
        let s = self.stats();
        json!({
            "run": self.run_id,
            "seed": self.seed,
            "daemons": self.args.sockets.len(),
            "staleness_bound_ms": self.bound.as_millis() as u64,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "operations": {
                "total": h.operations(),
                "kv_put": h.kv_writes.len(),
                "kv_put_around": h
                    .kv_writes
                    .iter()
                    .filter(|w| w.daemon >= self.args.sockets.len())
                    .count(),
                "kv_get": h.kv_reads.len(),
                "log_put": h.log_appends.len(),
                "log_scan": h.log_reads.len(),
                "failed_writes": h.kv_writes.iter().filter(|w| !w.acked).count()
                    + h.log_appends.iter().filter(|a| a.index.is_none()).count(),
                "failed_reads": h.read_errors.len(),
            },
            "compared_after_quiescence": self.compared,
            "reads": s.reads,
            "within_ms": s.within.iter().map(|&(t, n)| json!({"ms": t, "reads": n, "fraction": s.fraction(n), "nines": nines(s.fraction(n))})).collect::<Vec<_>>(),
            "staleness_ms": s.percentiles.iter().map(|(p, v)| (format!("p{p}"), json!(*v as f64 / 1e6))).collect::<serde_json::Map<_, _>>(),
            "violations": self.verdict.violations.iter().take(self.args.show).map(|v| json!({"kind": v.kind, "history": v.history})).collect::<Vec<_>>(),
            "violation_count": self.verdict.violations.len(),
        })
    }
}

struct Stats {
    reads: usize,
    /// (threshold in ms, reads at most that stale).
    within: Vec<(u64, usize)>,
    percentiles: Vec<(f64, Nanos)>,
}

impl Stats {
    fn fraction(&self, n: usize) -> f64 {
        if self.reads == 0 {
            1.0
        } else {
            n as f64 / self.reads as f64
        }
    }
}

/// Consistency in nines: -log10 of the fraction of reads that fall short (`None` when
/// none does).
fn nines(fraction: f64) -> Option<f64> {
    (fraction < 1.0).then(|| -(1.0 - fraction).log10())
}

fn nines_text(fraction: f64) -> String {
    match nines(fraction) {
        Some(n) => format!("{n:.2} nines"),
        None => "all".to_owned(),
    }
}
