//! The wire format, byte by byte, with a stock MessagePack library (rmpv) as a client in
//! another language would use it: handshake, errors that keep or close the connection,
//! pipelining and streamed results.

use rmpv::Value;
use tokio::io::AsyncWriteExt;

use crate::harness::{field, msgpack_map, name, Daemon, Raw, Val};

fn code(v: &Value) -> u64 {
    field(v, "code").and_then(|c| c.as_u64()).expect("a code")
}

fn id(v: &Value) -> Option<u64> {
    field(v, "id").and_then(|i| i.as_u64())
}

fn ping(id: u64) -> Vec<u8> {
    msgpack_map(&[("id", Val::U(id)), ("op", Val::S("ping"))])
}

#[tokio::test(flavor = "multi_thread")]
async fn handshake_answers_version_and_limits() {
    let d = Daemon::start().await;
    let mut raw = Raw::connect(&d.socket).await;
    raw.send(&msgpack_map(&[
        ("id", Val::U(0)),
        ("op", Val::S("hello")),
        ("version", Val::U(1)),
        ("client", Val::S("raw-test")),
    ]))
    .await;
    let r = raw.recv().await.unwrap();
    assert_eq!((id(&r), code(&r)), (Some(0), 0));
    assert_eq!(field(&r, "version").and_then(|v| v.as_u64()), Some(1));
    assert_eq!(
        field(&r, "max_frame_bytes").and_then(|v| v.as_u64()),
        Some(d.config.server.max_frame_bytes as u64)
    );
    assert!(field(&r, "server")
        .unwrap()
        .as_str()
        .unwrap()
        .starts_with("ddbcached "));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_before_hello_is_refused_and_closes() {
    let d = Daemon::start().await;
    let mut raw = Raw::connect(&d.socket).await;
    raw.send(&ping(7)).await;
    let r = raw.recv().await.unwrap();
    assert_eq!((id(&r), code(&r)), (Some(7), 6), "handshake_required: {r}");
    assert!(raw.closed().await);
}

#[tokio::test(flavor = "multi_thread")]
async fn first_frames_and_a_second_hello_are_answered_as_protocol_md_says() {
    let d = Daemon::start().await;
    // Not MessagePack, and an empty body: the handshake rule wins, addressed to nil.
    for body in [&b"\xc1"[..], &b""[..]] {
        let mut raw = Raw::connect(&d.socket).await;
        raw.send(body).await;
        let r = raw.recv().await.unwrap();
        assert_eq!((id(&r), code(&r)), (None, 6), "{r}");
        assert!(raw.closed().await);
    }
    // `hello` without `version`.
    let mut raw = Raw::connect(&d.socket).await;
    raw.send(&msgpack_map(&[("id", Val::U(3)), ("op", Val::S("hello"))]))
        .await;
    let r = raw.recv().await.unwrap();
    assert_eq!((id(&r), code(&r)), (Some(3), 6), "{r}");
    assert!(raw.closed().await);
    // A second `hello` is an invalid argument and the connection stays usable; `op` and
    // `ns` are also accepted as bin.
    let mut raw = Raw::ready(&d.socket).await;
    raw.send(&msgpack_map(&[
        ("id", Val::U(4)),
        ("op", Val::S("hello")),
        ("version", Val::U(1)),
    ]))
    .await;
    let r = raw.recv().await.unwrap();
    assert_eq!((id(&r), code(&r)), (Some(4), 3), "{r}");
    raw.send(&msgpack_map(&[
        ("id", Val::U(5)),
        ("op", Val::B(b"kv.get")),
        ("ns", Val::B(b"bin-ns")),
        ("key", Val::S("k")),
    ]))
    .await;
    let r = raw.recv().await.unwrap();
    assert_eq!((id(&r), code(&r)), (Some(5), 0), "{r}");
    // A timestamp above the signed 64-bit range is malformed, answered to its id.
    raw.send(&msgpack_map(&[
        ("id", Val::U(6)),
        ("op", Val::S("kv.put")),
        ("ns", Val::S("n")),
        ("key", Val::B(b"k")),
        ("value", Val::B(b"v")),
        ("ts", Val::U(u64::MAX)),
    ]))
    .await;
    let r = raw.recv().await.unwrap();
    assert_eq!((id(&r), code(&r)), (Some(6), 1), "{r}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unsupported_version_is_refused_and_closes() {
    let d = Daemon::start().await;
    let mut raw = Raw::connect(&d.socket).await;
    raw.send(&msgpack_map(&[
        ("id", Val::U(1)),
        ("op", Val::S("hello")),
        ("version", Val::U(99)),
    ]))
    .await;
    let r = raw.recv().await.unwrap();
    assert_eq!((id(&r), code(&r)), (Some(1), 7), "unsupported_version: {r}");
    assert!(raw.closed().await);
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_bodies_and_unknown_operations_keep_the_connection() {
    let d = Daemon::start().await;
    let mut raw = Raw::ready(&d.socket).await;
    // Not MessagePack: no id can be read, so the error is addressed to nil.
    raw.send(b"\xc1\xc1 not msgpack").await;
    let r = raw.recv().await.unwrap();
    assert_eq!((id(&r), code(&r)), (None, 1), "{r}");
    // A map whose field has the wrong type: the id is echoed.
    raw.send(&msgpack_map(&[
        ("id", Val::U(2)),
        ("op", Val::S("kv.put")),
        ("ts", Val::S("soon")),
    ]))
    .await;
    let r = raw.recv().await.unwrap();
    assert_eq!((id(&r), code(&r)), (Some(2), 1), "{r}");
    // An array instead of a map, and an empty body.
    raw.send(b"\x92\x01\x02").await;
    assert_eq!(code(&raw.recv().await.unwrap()), 1);
    raw.send(b"").await;
    assert_eq!(code(&raw.recv().await.unwrap()), 1);
    // An unknown operation.
    raw.send(&msgpack_map(&[
        ("id", Val::U(3)),
        ("op", Val::S("kv.frobnicate")),
    ]))
    .await;
    let r = raw.recv().await.unwrap();
    assert_eq!((id(&r), code(&r)), (Some(3), 2), "{r}");
    // A missing field and an empty key: invalid_argument, naming the field.
    raw.send(&msgpack_map(&[
        ("id", Val::U(4)),
        ("op", Val::S("kv.get")),
        ("ns", Val::S("n")),
    ]))
    .await;
    let r = raw.recv().await.unwrap();
    assert_eq!((id(&r), code(&r)), (Some(4), 3), "{r}");
    assert!(field(&r, "message")
        .unwrap()
        .as_str()
        .unwrap()
        .contains("`key`"));
    raw.send(&msgpack_map(&[
        ("id", Val::U(5)),
        ("op", Val::S("kv.get")),
        ("ns", Val::S("n")),
        ("key", Val::B(b"")),
    ]))
    .await;
    assert_eq!(code(&raw.recv().await.unwrap()), 3);
    // Still usable.
    raw.send(&ping(6)).await;
    let r = raw.recv().await.unwrap();
    assert_eq!((id(&r), code(&r)), (Some(6), 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_frame_is_answered_then_the_connection_closes() {
    let d = Daemon::start().await;
    let mut raw = Raw::ready(&d.socket).await;
    let too_big = d.config.server.max_frame_bytes as u32 + 1;
    // Only the length prefix and a little of the body: the server must not wait for it.
    let mut start = too_big.to_be_bytes().to_vec();
    start.extend_from_slice(&[0u8; 100]);
    raw.stream.write_all(&start).await.unwrap();
    let r = raw.recv().await.unwrap();
    assert_eq!((id(&r), code(&r)), (None, 4), "frame_too_large: {r}");
    assert!(raw.closed().await);
    // The daemon is fine.
    Raw::ready(&d.socket).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_truncated_frame_ends_only_that_connection() {
    let d = Daemon::start().await;
    let mut raw = Raw::ready(&d.socket).await;
    raw.stream.write_all(&100u32.to_be_bytes()).await.unwrap();
    raw.stream.write_all(&[0x80; 10]).await.unwrap();
    raw.stream.shutdown().await.unwrap();
    assert!(raw.closed().await);
    // Half a length prefix, then gone.
    let mut raw = Raw::ready(&d.socket).await;
    raw.stream.write_all(&[0, 0]).await.unwrap();
    drop(raw);
    let mut other = Raw::ready(&d.socket).await;
    other.send(&ping(1)).await;
    assert_eq!(code(&other.recv().await.unwrap()), 0);
    assert!(d.is_running());
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_requests_are_each_answered_by_id() {
    let d = Daemon::start().await;
    let mut raw = Raw::ready(&d.socket).await;
    let ns = name();
    // Three requests in one write, before reading anything.
    let mut batch = Vec::new();
    for body in [
        msgpack_map(&[
            ("id", Val::U(10)),
            ("op", Val::S("kv.put")),
            ("ns", Val::S(&ns)),
            ("key", Val::B(b"k")),
            ("value", Val::B(b"v")),
            ("ts", Val::I(-1)),
        ]),
        ping(11),
        msgpack_map(&[
            ("id", Val::U(12)),
            ("op", Val::S("log.position")),
            ("topic", Val::S(&ns)),
        ]),
    ] {
        batch.extend_from_slice(&(body.len() as u32).to_be_bytes());
        batch.extend_from_slice(&body);
    }
    raw.stream.write_all(&batch).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let r = raw.recv().await.unwrap();
        assert_eq!(code(&r), 0, "{r}");
        if id(&r) == Some(12) {
            assert_eq!(field(&r, "index").and_then(|i| i.as_i64()), Some(0));
        }
        seen.push(id(&r).unwrap());
    }
    seen.sort_unstable();
    assert_eq!(seen, vec![10, 11, 12]);
    // And the put is readable.
    raw.send(&msgpack_map(&[
        ("id", Val::U(13)),
        ("op", Val::S("kv.get")),
        ("ns", Val::S(&ns)),
        ("key", Val::B(b"k")),
    ]))
    .await;
    let r = raw.recv().await.unwrap();
    assert_eq!(field(&r, "found"), Some(Value::Boolean(true)));
    assert_eq!(field(&r, "ts").and_then(|t| t.as_i64()), Some(-1));
    assert_eq!(field(&r, "value"), Some(Value::Binary(b"v".to_vec())));
}

#[tokio::test(flavor = "multi_thread")]
async fn long_scans_stream_in_pieces_within_the_frame_limit() {
    // The smallest allowed frame limit, so that 1 MiB of entries needs several pieces.
    let d = Daemon::start_with(|c| c.server.max_frame_bytes = 512 * 1024).await;
    let c = d.client().await;
    let topic = name();
    let value = bytes::Bytes::from(vec![b'x'; 2048]);
    for chunk in (0..512).collect::<Vec<_>>().chunks(64) {
        futures::future::try_join_all(chunk.iter().map(|_| c.log_put(&topic, value.clone())))
            .await
            .unwrap();
    }
    let mut raw = Raw::ready(&d.socket).await;
    raw.send(&msgpack_map(&[
        ("id", Val::U(1)),
        ("op", Val::S("log.scan")),
        ("topic", Val::S(&topic)),
        ("from", Val::I(1)),
        ("until", Val::I(i64::MAX)),
    ]))
    .await;
    let (mut pieces, mut items) = (0, 0);
    loop {
        let r = raw.recv().await.unwrap();
        assert_eq!((id(&r), code(&r)), (Some(1), 0), "{r}");
        let mut encoded = Vec::new();
        rmpv::encode::write_value(&mut encoded, &r).unwrap();
        assert!(
            encoded.len() <= 512 * 1024,
            "piece of {} bytes",
            encoded.len()
        );
        pieces += 1;
        items += field(&r, "items").unwrap().as_array().unwrap().len();
        if field(&r, "more") == Some(Value::Boolean(false)) {
            break;
        }
    }
    assert_eq!(items, 512);
    assert!(
        pieces >= 4,
        "1 MiB in {pieces} pieces of at most 256 KiB of payload"
    );
    // The connection goes on after a stream.
    raw.send(&ping(2)).await;
    assert_eq!(id(&raw.recv().await.unwrap()), Some(2));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_socket_is_guarded_and_removed_on_shutdown() {
    use std::os::unix::fs::PermissionsExt;
    let d = Daemon::start_with(|c| c.server.socket_mode = 0o600).await;
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // A second daemon may not take over a socket a live daemon answers on.
    let err = ddbcached::server::bind(&d.config.server)
        .err()
        .expect("refused");
    assert!(
        matches!(err, ddbcached::server::BindError::InUse(_)),
        "{err}"
    );
    let socket = d.socket.clone();
    d.stop().await;
    assert!(!socket.exists(), "socket file removed on shutdown");

    // A stale socket file (its daemon died) is replaced; a regular file is left alone.
    let dir = tempfile::tempdir().unwrap();
    let mut config = ddbcached::config::ServerConfig {
        socket_path: dir.path().join("stale.sock"),
        ..Default::default()
    };
    drop(std::os::unix::net::UnixListener::bind(&config.socket_path).unwrap());
    assert!(config.socket_path.exists());
    drop(ddbcached::server::bind(&config).unwrap());
    config.socket_path = dir.path().join("file");
    std::fs::write(&config.socket_path, "data").unwrap();
    let err = ddbcached::server::bind(&config).err().expect("refused");
    assert!(
        matches!(err, ddbcached::server::BindError::NotASocket(_)),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&config.socket_path).unwrap(),
        "data"
    );
}

/// The Python interpreter of `scripts/python-env.sh` (with msgpack).
fn python() -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = std::process::Command::new(root.join("scripts/python-env.sh"))
        .output()
        .expect("scripts/python-env.sh runs");
    assert!(
        python.status.success(),
        "{}",
        String::from_utf8_lossy(&python.stderr)
    );
    String::from_utf8(python.stdout).unwrap().trim().to_owned()
}

#[test]
fn the_python_codec_reads_and_writes_the_shared_vectors() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(python())
        .arg(root.join("protocol/check_vectors.py"))
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stdout == b"ok\n",
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_python_client_of_protocol_md_works() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/PROTOCOL.md")).unwrap();
    let code = doc
        .split("```python\n")
        .nth(1)
        .and_then(|rest| rest.split("\n```").next())
        .expect("PROTOCOL.md has a python block");
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("client.py");
    std::fs::write(&script, code).unwrap();
    let python = python();

    let d = Daemon::start().await;
    let out = tokio::process::Command::new(python)
        .arg(&script)
        .arg(&d.socket)
        .arg(name())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success() && out.stdout == b"ok\n",
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_whose_daemon_stopped_gets_an_error_not_a_hang() {
    let d = Daemon::start().await;
    let c = d.client().await;
    c.ping().await.unwrap();
    d.stop().await;
    // Once the client has seen the connection end, no request may wait for an answer.
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while !c.is_closed() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the client notices the closed connection");
    for _ in 0..2 {
        let err = tokio::time::timeout(std::time::Duration::from_secs(10), c.ping())
            .await
            .expect("an answer, not a hang")
            .unwrap_err();
        assert!(
            matches!(err, ddbcached_protocol::ClientError::Closed),
            "{err}"
        );
    }
}
