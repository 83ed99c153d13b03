//! The `ddbcached` binary: parses the command line, loads the configuration, sets up
//! logging and wires the library together. Exit codes: 0 success, 1 not found (client
//! lookups), 2 error, 64 bad configuration.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ddbcached::config::Config;
use ddbcached::daemon::Daemon;
use ddbcached::{aws, tables};
use tokio_util::sync::CancellationToken;

/// EX_USAGE from sysexits.h: the configuration is bad.
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "ddbcached",
    version,
    about = "A DynamoDB cache for workflow executors, served over a Unix socket"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the stores on the Unix socket and DynamoDB's API, as configured, until SIGINT
    /// or SIGTERM.
    Serve {
        /// Configuration file (TOML); defaults apply when omitted.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Create both tables (idempotent) and wait until they are ACTIVE.
    InitTables {
        /// Configuration file (TOML) naming DynamoDB and the tables; defaults apply when
        /// omitted.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Talk to a running daemon.
    Client(cli::ClientArgs),
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config_path = match &args.command {
        Command::Serve { config } | Command::InitTables { config } => config.clone(),
        Command::Client(c) => c.config.clone(),
    };
    let config = match Config::load(config_path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ddbcached: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match runtime(config.server.worker_threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ddbcached: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match args.command {
        Command::Client(c) => runtime.block_on(cli::run(c, &config)),
        Command::Serve { .. } => report(runtime.block_on(serve(config))),
        Command::InitTables { .. } => report(runtime.block_on(init_tables(config))),
    }
}

/// The async runtime, with `server.worker_threads` threads. 0 picks one thread on a host
/// of at most two cores (measured there: one thread serves more hits for less CPU, no
/// wake-up crossing threads) and one per core on larger hosts.
fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let workers = match workers {
        0 if cores <= 2 => 1,
        0 => cores,
        n => n,
    };
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    builder.enable_all().build()
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("ddbcached: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Libraries whose debug and trace output can carry request and response bodies (keys,
/// values, signed headers): capped at info whatever the filter says, so data and
/// credentials never reach the logs.
const WIRE_LEVEL_TARGETS: [&str; 6] = [
    "aws_smithy_runtime",
    "aws_smithy_http",
    "aws_smithy_http_client",
    "aws_sigv4",
    "hyper",
    "h2",
];

fn init_logging(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let mut filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.logging.level));
    for target in WIRE_LEVEL_TARGETS {
        // Cannot fail: a literal target with a level is a valid directive.
        filter = filter.add_directive(format!("{target}=info").parse().expect("a valid directive"));
    }
    // The Redis client warns at every connection attempt to every node while a cluster
    // node is down (hundreds of lines a second); fleet mode logs each failure itself.
    filter = filter.add_directive("redis=error".parse().expect("a valid directive"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if config.logging.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
}

async fn init_tables(config: Config) -> anyhow::Result<()> {
    init_logging(&config);
    let client = aws::dynamodb_client(&config.dynamodb, Default::default()).await;
    tables::init_tables(&client, &config.dynamodb).await?;
    println!(
        "tables {} and {} are ready",
        config.dynamodb.kv_table, config.dynamodb.log_table
    );
    Ok(())
}

async fn serve(config: Config) -> anyhow::Result<()> {
    init_logging(&config);
    let daemon = Daemon::start(&config).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    daemon.run(shutdown).await;
    Ok(())
}

/// Cancels `shutdown` on SIGINT or SIGTERM.
async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the daemon");
            let _ = tokio::signal::ctrl_c().await;
            shutdown.cancel();
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
    }
    shutdown.cancel();
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every command, argument and option says what it is for in `--help`.
    #[test]
    fn every_command_argument_and_option_has_a_line_of_help() {
        fn check(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if arg.get_help().is_none() && !builtin {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                let sub_path = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() && sub.get_name() != "help" {
                    missing.push(sub_path.clone());
                }
                check(sub, &sub_path, missing);
            }
        }
        let mut missing = Vec::new();
        check(&super::Args::command(), "ddbcached", &mut missing);
        assert!(missing.is_empty(), "without help: {missing:?}");
    }
}
