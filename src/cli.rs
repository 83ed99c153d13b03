//! `ddbcached client`: every store operation from the shell, for operators and scripts.
//!
//! Keys and values are UTF-8 text, or hex with `--hex`. A value too large for the command
//! line comes from standard input (`-`) or a file (`--value-file`), taken as raw bytes.
//! Plain output is meant for pipes (`kv get` writes the raw value); `--json` prints one
//! JSON document instead. Exit status: 0 found / done, 1 not found, 2 error (message on
//! stderr).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use bytes::Bytes;
use clap::{Args, Subcommand};
use ddbcached::config::Config;
use ddbcached_protocol::{Client, ClientError};
use serde_json::{json, Value};

#[derive(Args)]
pub struct ClientArgs {
    /// Socket of the daemon (default: server.socket_path of the config, or DDBCACHED_SOCKET).
    #[arg(long, short, global = true)]
    socket: Option<PathBuf>,
    /// Configuration file to take the socket path from.
    #[arg(long, short, global = true)]
    pub config: Option<PathBuf>,
    /// Keys and values are hex on the command line and in the output.
    #[arg(long, global = true)]
    hex: bool,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: ClientCommand,
}

#[derive(Subcommand)]
enum ClientCommand {
    /// Check that the daemon answers.
    Ping,
    /// Check that the daemon is ready (exit 0), or say why not (exit 1).
    Health,
    /// The key-value store.
    #[command(subcommand)]
    Kv(KvCommand),
    /// The indexed store (append-only logs).
    #[command(subcommand)]
    Log(LogCommand),
}

#[derive(Subcommand)]
#[command(allow_negative_numbers = true)]
enum KvCommand {
    /// Store VALUE as version --ts of KEY.
    Put {
        /// Namespace (non-empty UTF-8).
        ns: String,
        /// Key (text, or hex with --hex).
        key: String,
        #[command(flatten)]
        value: ValueArg,
        /// The version's timestamp (signed 64-bit).
        #[arg(long, allow_negative_numbers = true)]
        ts: i64,
    },
    /// Print the newest value of KEY (at or before --before).
    Get {
        /// Namespace.
        ns: String,
        /// Key (text, or hex with --hex).
        key: String,
        /// Only versions with a timestamp at or below this one.
        #[arg(long, allow_negative_numbers = true)]
        before: Option<i64>,
        /// Read DynamoDB directly, bypassing the cache.
        #[arg(long)]
        consistent: bool,
    },
    /// Print the largest timestamp of KEY.
    LatestTs {
        /// Namespace.
        ns: String,
        /// Key (text, or hex with --hex).
        key: String,
    },
    /// Print every timestamp of KEY, ascending, one per line.
    Timestamps {
        /// Namespace.
        ns: String,
        /// Key (text, or hex with --hex).
        key: String,
    },
    /// Print every key of NS with its newest value (tab-separated), one per line.
    Scan {
        /// Namespace.
        ns: String,
        /// Print the keys only.
        #[arg(long)]
        keys_only: bool,
    },
    /// Delete KEY's versions: all, or with --marker all but those after the marker and
    /// the newest at or before it.
    Delete {
        /// Namespace.
        ns: String,
        /// Key (text, or hex with --hex).
        key: String,
        /// Keep the versions after this timestamp and the newest at or before it.
        #[arg(long, allow_negative_numbers = true)]
        marker: Option<i64>,
    },
}

/// A value: on the command line, or from standard input or a file for one too large for
/// an argument.
#[derive(Args)]
#[group(required = true, multiple = false)]
struct ValueArg {
    /// The value (text, or hex with --hex); `-` reads it from standard input, raw.
    value: Option<String>,
    /// Read the value from this file, raw (`-`: standard input).
    #[arg(long)]
    value_file: Option<PathBuf>,
}

impl ValueArg {
    fn bytes(&self, hex: bool) -> Result<Bytes, String> {
        let path = match (&self.value, &self.value_file) {
            (Some(v), _) if v != "-" => return parse_bytes(v, hex),
            (Some(_), _) => PathBuf::from("-"),
            (None, Some(path)) => path.clone(),
            // clap's group makes one of the two required.
            (None, None) => return Err("a value or --value-file is needed".into()),
        };
        let mut raw = Vec::new();
        let read = if path.as_os_str() == "-" {
            std::io::stdin().lock().read_to_end(&mut raw)
        } else {
            std::fs::File::open(&path).and_then(|mut f| f.read_to_end(&mut raw))
        };
        read.map_err(|e| format!("reading the value from {}: {e}", path.display()))?;
        Ok(Bytes::from(raw))
    }
}

#[derive(Subcommand)]
#[command(allow_negative_numbers = true)]
enum LogCommand {
    /// Append VALUE to TOPIC; prints the new index.
    Put {
        /// Topic (non-empty UTF-8).
        topic: String,
        #[command(flatten)]
        value: ValueArg,
    },
    /// Print the last allocated index of TOPIC.
    Position {
        /// Topic.
        topic: String,
    },
    /// Print the values at FROM..=UNTIL, one per line.
    Scan {
        /// Topic.
        topic: String,
        /// First index (inclusive; indices start at 1).
        from: i64,
        /// Last index (inclusive; 9223372036854775807 for the end).
        until: i64,
    },
    /// Delete TOPIC and all its entries.
    Delete {
        /// Topic.
        topic: String,
    },
}

/// What a command produced, before formatting.
enum Output {
    Done,
    Health { ready: bool, detail: String },
    NotFound,
    Value { ts: i64, value: Bytes },
    Number(i64),
    Numbers(Vec<i64>),
    List(Vec<Bytes>),
    Entries(Vec<(Bytes, Bytes)>),
}

pub async fn run(args: ClientArgs, config: &Config) -> ExitCode {
    match execute(&args, config)
        .await
        .and_then(|out| print(&args, out))
    {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ddbcached client: {e}");
            ExitCode::from(2)
        }
    }
}

async fn execute(args: &ClientArgs, config: &Config) -> Result<Output, String> {
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| config.server.socket_path.clone());
    let client = Client::connect_as(&socket, "ddbcached-cli")
        .await
        .map_err(|e| e.to_string())?;
    let bytes = |s: &str| parse_bytes(s, args.hex);
    let e = |e: ClientError| e.to_string();
    Ok(match &args.command {
        ClientCommand::Ping => client.ping().await.map(|()| Output::Done).map_err(e)?,
        ClientCommand::Health => {
            let (ready, detail) = client.health().await.map_err(e)?;
            Output::Health { ready, detail }
        }
        ClientCommand::Kv(cmd) => match cmd {
            KvCommand::Put { ns, key, value, ts } => {
                client
                    .kv_put(ns, bytes(key)?, value.bytes(args.hex)?, *ts)
                    .await
                    .map_err(e)?;
                Output::Done
            }
            KvCommand::Get {
                ns,
                key,
                before,
                consistent,
            } => match client
                .kv_get_with(ns, bytes(key)?, *before, *consistent)
                .await
                .map_err(e)?
            {
                Some(v) => Output::Value {
                    ts: v.ts,
                    value: v.value,
                },
                None => Output::NotFound,
            },
            KvCommand::LatestTs { ns, key } => {
                match client.kv_latest_ts(ns, bytes(key)?).await.map_err(e)? {
                    Some(ts) => Output::Number(ts),
                    None => Output::NotFound,
                }
            }
            KvCommand::Timestamps { ns, key } => {
                Output::Numbers(client.kv_timestamps(ns, bytes(key)?).await.map_err(e)?)
            }
            KvCommand::Scan {
                ns,
                keys_only: true,
            } => Output::List(client.kv_scan_keys(ns).await.map_err(e)?),
            KvCommand::Scan {
                ns,
                keys_only: false,
            } => Output::Entries(client.kv_scan(ns).await.map_err(e)?),
            KvCommand::Delete { ns, key, marker } => {
                client
                    .kv_delete(ns, bytes(key)?, *marker)
                    .await
                    .map_err(e)?;
                Output::Done
            }
        },
        ClientCommand::Log(cmd) => match cmd {
            LogCommand::Put { topic, value } => Output::Number(
                client
                    .log_put(topic, value.bytes(args.hex)?)
                    .await
                    .map_err(e)?,
            ),
            LogCommand::Position { topic } => {
                Output::Number(client.log_position(topic).await.map_err(e)?)
            }
            LogCommand::Scan { topic, from, until } => {
                Output::List(client.log_scan(topic, *from, *until).await.map_err(e)?)
            }
            LogCommand::Delete { topic } => {
                client.log_delete(topic).await.map_err(e)?;
                Output::Done
            }
        },
    })
}

fn parse_bytes(s: &str, hex: bool) -> Result<Bytes, String> {
    if hex {
        hex::decode(s)
            .map(Bytes::from)
            .map_err(|e| format!("{s:?} is not valid hex: {e}"))
    } else {
        Ok(Bytes::copy_from_slice(s.as_bytes()))
    }
}

fn print(args: &ClientArgs, out: Output) -> Result<ExitCode, String> {
    let found = !matches!(out, Output::NotFound | Output::Health { ready: false, .. });
    let mut stdout = std::io::stdout().lock();
    let io = |e: std::io::Error| format!("writing output: {e}");
    if args.json {
        let text = |b: &Bytes| text_json(b, args.hex);
        let doc = match out {
            Output::Done => json!({ "ok": true }),
            Output::Health { ready, detail } => json!({ "ready": ready, "detail": detail }),
            Output::NotFound => json!({ "found": false }),
            Output::Value { ts, value } => {
                json!({ "found": true, "ts": ts, "value": text(&value)? })
            }
            Output::Number(n) => json!(n),
            Output::Numbers(v) => json!(v),
            Output::List(v) => Value::Array(v.iter().map(text).collect::<Result<_, _>>()?),
            Output::Entries(v) => Value::Array(
                v.iter()
                    .map(|(k, val)| Ok(json!({ "key": text(k)?, "value": text(val)? })))
                    .collect::<Result<_, String>>()?,
            ),
        };
        writeln!(stdout, "{doc}").map_err(io)?;
    } else {
        let show = |b: &Bytes| display(b, args.hex);
        match out {
            Output::Done | Output::NotFound => {}
            Output::Health { detail, .. } => writeln!(stdout, "{detail}").map_err(io)?,
            Output::Value { value, .. } if args.hex => {
                writeln!(stdout, "{}", hex::encode(value)).map_err(io)?
            }
            Output::Value { value, .. } => stdout.write_all(&value).map_err(io)?,
            Output::Number(n) => writeln!(stdout, "{n}").map_err(io)?,
            Output::Numbers(v) => {
                for n in v {
                    writeln!(stdout, "{n}").map_err(io)?;
                }
            }
            Output::List(v) => {
                for b in v {
                    writeln!(stdout, "{}", show(&b)).map_err(io)?;
                }
            }
            Output::Entries(v) => {
                for (k, val) in v {
                    writeln!(stdout, "{}\t{}", show(&k), show(&val)).map_err(io)?;
                }
            }
        }
    }
    stdout.flush().map_err(io)?;
    Ok(if found {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Bytes as a JSON string: hex with `--hex`, else UTF-8 (an error if they are not).
fn text_json(b: &Bytes, hex: bool) -> Result<Value, String> {
    if hex {
        return Ok(Value::String(hex::encode(b)));
    }
    std::str::from_utf8(b)
        .map(|s| Value::String(s.to_owned()))
        .map_err(|_| "the result is not UTF-8 text; use --hex".to_owned())
}

/// Bytes for a line of plain output: hex with `--hex`, else text (invalid UTF-8 replaced).
fn display(b: &Bytes, hex: bool) -> String {
    if hex {
        hex::encode(b)
    } else {
        String::from_utf8_lossy(b).into_owned()
    }
}
