//! The `ddbcached` binary: the client's output formats and exit codes, and configuration
//! errors.

use std::process::{Command, Output};

use crate::harness::{name, Daemon};

fn ddbcached(daemon: &Daemon, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ddbcached"))
        .env("DDBCACHED_SOCKET", &daemon.socket)
        .args(args)
        .output()
        .unwrap()
}

/// Runs the client in a blocking thread (the daemon runs on this test's runtime).
async fn client(daemon: &Daemon, args: &[&str]) -> (i32, String, String) {
    let mut full = vec!["client"];
    full.extend_from_slice(args);
    let out = tokio::task::block_in_place(|| ddbcached(daemon, &full));
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn kv_commands_print_plain_and_json() {
    let d = Daemon::start().await;
    let ns = name();
    assert_eq!(client(&d, &["ping"]).await.0, 0);
    assert_eq!(
        client(&d, &["kv", "put", &ns, "k", "hello", "--ts", "5"])
            .await
            .0,
        0
    );
    assert_eq!(
        client(&d, &["kv", "put", &ns, "k", "older", "--ts", "-2"])
            .await
            .0,
        0
    );
    assert_eq!(
        client(&d, &["kv", "get", &ns, "k"]).await,
        (0, "hello".into(), String::new())
    );
    assert_eq!(
        client(&d, &["kv", "get", &ns, "k", "--before", "0"])
            .await
            .1,
        "older"
    );
    assert_eq!(
        client(&d, &["kv", "get", &ns, "k", "--consistent"]).await.1,
        "hello"
    );
    assert_eq!(
        client(&d, &["kv", "get", &ns, "k", "--before", "-3"]).await,
        (1, String::new(), String::new())
    );
    assert_eq!(client(&d, &["kv", "latest-ts", &ns, "k"]).await.1, "5\n");
    assert_eq!(client(&d, &["kv", "latest-ts", &ns, "nope"]).await.0, 1);
    assert_eq!(
        client(&d, &["kv", "timestamps", &ns, "k"]).await.1,
        "-2\n5\n"
    );
    assert_eq!(client(&d, &["kv", "scan", &ns]).await.1, "k\thello\n");
    assert_eq!(
        client(&d, &["kv", "scan", &ns, "--keys-only"]).await.1,
        "k\n"
    );
    assert_eq!(
        client(&d, &["--json", "kv", "get", &ns, "k"]).await.1,
        "{\"found\":true,\"ts\":5,\"value\":\"hello\"}\n"
    );
    assert_eq!(
        client(&d, &["kv", "get", &ns, "nope", "--json"]).await.1,
        "{\"found\":false}\n"
    );
    assert_eq!(
        client(&d, &["kv", "scan", &ns, "--json"]).await.1,
        "[{\"key\":\"k\",\"value\":\"hello\"}]\n"
    );
    assert_eq!(
        client(&d, &["kv", "delete", &ns, "k", "--marker", "0"])
            .await
            .0,
        0
    );
    assert_eq!(
        client(&d, &["kv", "timestamps", &ns, "k", "--json"])
            .await
            .1,
        "[-2,5]\n"
    );
    assert_eq!(client(&d, &["kv", "delete", &ns, "k"]).await.0, 0);
    assert_eq!(client(&d, &["kv", "timestamps", &ns, "k"]).await.1, "");
}

#[tokio::test(flavor = "multi_thread")]
async fn hex_keys_and_values_round_trip_binary() {
    let d = Daemon::start().await;
    let ns = name();
    assert_eq!(
        client(
            &d,
            &["--hex", "kv", "put", &ns, "00ff", "0a000d", "--ts", "1"]
        )
        .await
        .0,
        0
    );
    assert_eq!(
        client(&d, &["kv", "get", &ns, "00ff", "--hex"]).await.1,
        "0a000d\n"
    );
    assert_eq!(
        client(&d, &["kv", "get", &ns, "00ff", "--hex", "--json"])
            .await
            .1,
        "{\"found\":true,\"ts\":1,\"value\":\"0a000d\"}\n"
    );
    let (code, _, err) = client(&d, &["kv", "get", &ns, "xyz", "--hex"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("not valid hex"), "{err}");
    // Binary that is not UTF-8 cannot be JSON text without --hex: a clear error.
    let (code, _, err) = client(&d, &["kv", "scan", &ns, "--json"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("--hex"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn log_commands_print_indices_and_values() {
    let d = Daemon::start().await;
    let t = name();
    assert_eq!(client(&d, &["log", "position", &t]).await.1, "0\n");
    assert_eq!(client(&d, &["log", "put", &t, "a"]).await.1, "1\n");
    assert_eq!(client(&d, &["log", "put", &t, "b"]).await.1, "2\n");
    assert_eq!(client(&d, &["log", "position", &t]).await.1, "2\n");
    assert_eq!(
        client(&d, &["log", "scan", &t, "1", "9223372036854775807"])
            .await
            .1,
        "a\nb\n"
    );
    assert_eq!(
        client(&d, &["log", "scan", &t, "2", "2", "--json"]).await.1,
        "[\"b\"]\n"
    );
    assert_eq!(client(&d, &["log", "delete", &t]).await.0, 0);
    assert_eq!(
        client(&d, &["log", "position", &t, "--json"]).await.1,
        "0\n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_exit_2_with_a_message() {
    let d = Daemon::start().await;
    let (code, out, err) = client(&d, &["kv", "put", "", "k", "v", "--ts", "1"]).await;
    assert_eq!((code, out.as_str()), (2, ""));
    assert!(
        err.contains("invalid_argument") && err.contains("`ns` must not be empty"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_ddbcached"))
        .args(["client", "--socket", "/nonexistent/ddbcached.sock", "ping"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/ddbcached.sock"));
}

#[test]
fn a_bad_setting_exits_64_naming_the_key() {
    let out = Command::new(env!("CARGO_BIN_EXE_ddbcached"))
        .args(["serve"])
        .env("DDBCACHED_SERVER_MAX_CONNECTIONS", "many")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("DDBCACHED_SERVER_MAX_CONNECTIONS=many is not valid"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[dynamodb]\nretry_mode = \"sometimes\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ddbcached"))
        .args(["serve", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("dynamodb.retry_mode = sometimes is not valid"));
}

#[tokio::test(flavor = "multi_thread")]
async fn values_too_large_for_an_argument_come_from_stdin_or_a_file() {
    use std::io::Write;
    let d = Daemon::start().await;
    let (ns, topic) = (name(), name());
    // 300 KB of every byte value: over the 128 KiB a single argument may take on Linux.
    let value: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().write_all(&value).unwrap();
    let path = file.path().to_str().unwrap();
    let put = client(
        &d,
        &["kv", "put", &ns, "k", "--value-file", path, "--ts", "1"],
    )
    .await;
    assert_eq!(put.0, 0, "{put:?}");
    let got = tokio::task::block_in_place(|| ddbcached(&d, &["client", "kv", "get", &ns, "k"]));
    assert_eq!(got.stdout, value);

    // `-` reads standard input, for kv and log alike.
    let piped = |args: &[&str]| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ddbcached"))
            .env("DDBCACHED_SOCKET", &d.socket)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&value).unwrap();
        child.wait_with_output().unwrap()
    };
    let out =
        tokio::task::block_in_place(|| piped(&["client", "kv", "put", &ns, "k", "-", "--ts", "2"]));
    assert!(out.status.success());
    let out = tokio::task::block_in_place(|| piped(&["client", "log", "put", &topic, "-"]));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1\n");
    let got = tokio::task::block_in_place(|| {
        ddbcached(&d, &["client", "kv", "get", &ns, "k", "--before", "2"])
    });
    assert_eq!(got.stdout, value);
    let got = tokio::task::block_in_place(|| {
        ddbcached(&d, &["client", "log", "scan", &topic, "1", "1", "--hex"])
    });
    assert_eq!(
        String::from_utf8_lossy(&got.stdout).trim(),
        hex::encode(&value)
    );

    // Both, or neither, is a usage error.
    let both = client(
        &d,
        &[
            "kv",
            "put",
            &ns,
            "k",
            "v",
            "--value-file",
            path,
            "--ts",
            "3",
        ],
    )
    .await;
    assert_eq!(both.0, 2, "{both:?}");
    let neither = client(&d, &["log", "put", &topic]).await;
    assert_eq!(neither.0, 2, "{neither:?}");
}
