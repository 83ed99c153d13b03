//! The DynamoDB API front, with the Rust AWS SDK pointed at it and DynamoDB Local as the
//! oracle: the same request sent to DynamoDB Local directly is the answer expected.
//! Requests the front refuses or cannot take are sent by hand, in raw HTTP.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::types::{
    AttributeValue, BillingMode, KeyType, KeysAndAttributes, Put, PutRequest, ScalarAttributeType,
    TransactWriteItem, WriteRequest,
};
use aws_sdk_dynamodb::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{
    api_url as url, attribute, dynamo_config, endpoint, http_get, key_part, n, name, s,
    sdk_client as client, Daemon,
};

/// A daemon answering the API on a free loopback port.
async fn daemon_with_api(edit: impl FnOnce(&mut ddbcached::config::Config)) -> Daemon {
    Daemon::start_with(|c| {
        c.dynamodb_api.listen = "127.0.0.1:0".into();
        edit(c);
    })
    .await
}

/// An item read with a strongly consistent GetItem.
async fn consistent_get(
    c: &Client,
    table: &str,
    pk: &str,
    sk: &str,
) -> Option<HashMap<String, AttributeValue>> {
    c.get_item()
        .table_name(table)
        .set_key(Some(key(pk, sk)))
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .item
}

/// A table of the test's own (partition key `pk` S, sort key `sk` N), made directly,
/// without a stream.
pub(crate) async fn table(direct: &Client) -> String {
    let table: String = format!("api-{}", name()).chars().take(60).collect();
    direct
        .create_table()
        .table_name(&table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attribute("pk", ScalarAttributeType::S))
        .attribute_definitions(attribute("sk", ScalarAttributeType::N))
        .key_schema(key_part("pk", KeyType::Hash))
        .key_schema(key_part("sk", KeyType::Range))
        .send()
        .await
        .unwrap();
    table
}

fn key(pk: &str, sk: &str) -> HashMap<String, AttributeValue> {
    HashMap::from([("pk".to_owned(), s(pk)), ("sk".to_owned(), n(sk))])
}

#[tokio::test(flavor = "multi_thread")]
async fn every_operation_through_the_api_answers_as_dynamodb_does() {
    let d = daemon_with_api(|_| {}).await;
    let (api, direct) = (client(&url(&d)).await, client(endpoint()).await);
    let t = table(&direct).await;

    // Writes through the front land in DynamoDB.
    let mut item = key("a", "1");
    item.insert("v".into(), s("one"));
    item.insert(
        "tags".into(),
        AttributeValue::Ss(vec!["x".into(), "y".into()]),
    );
    item.insert("price".into(), n("1.50"));
    api.put_item()
        .table_name(&t)
        .set_item(Some(item))
        .send()
        .await
        .unwrap();
    let updated = api
        .update_item()
        .table_name(&t)
        .set_key(Some(key("a", "2")))
        .update_expression("SET v = :v")
        .expression_attribute_values(":v", s("two"))
        .return_values(aws_sdk_dynamodb::types::ReturnValue::AllNew)
        .send()
        .await
        .unwrap();
    assert_eq!(updated.attributes().unwrap()["v"], s("two"));
    api.batch_write_item()
        .request_items(
            &t,
            (3..6)
                .map(|i| {
                    WriteRequest::builder()
                        .put_request(
                            PutRequest::builder()
                                .set_item(Some(key("a", &i.to_string())))
                                .build()
                                .unwrap(),
                        )
                        .build()
                })
                .collect(),
        )
        .send()
        .await
        .unwrap();
    api.transact_write_items()
        .transact_items(
            TransactWriteItem::builder()
                .put(
                    Put::builder()
                        .table_name(&t)
                        .set_item(Some(key("b", "1")))
                        .build()
                        .unwrap(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();

    // Reads through the front equal the same reads made directly.
    for c in [&api, &direct] {
        let got = consistent_get(c, &t, "a", "1").await.unwrap();
        assert_eq!(got["price"], n("1.5"), "DynamoDB's normal form");
    }
    let get = |c: &Client| {
        c.get_item()
            .table_name(&t)
            .set_key(Some(key("a", "1")))
            .projection_expression("v, tags")
            .send()
    };
    assert_eq!(
        get(&api).await.unwrap().item,
        get(&direct).await.unwrap().item
    );
    let query = |c: &Client| {
        c.query()
            .table_name(&t)
            .key_condition_expression("pk = :pk AND sk BETWEEN :lo AND :hi")
            .expression_attribute_values(":pk", s("a"))
            .expression_attribute_values(":lo", n("2"))
            .expression_attribute_values(":hi", n("4"))
            .scan_index_forward(false)
            .limit(2)
            .send()
    };
    let (q_api, q_direct) = (query(&api).await.unwrap(), query(&direct).await.unwrap());
    assert_eq!(q_api.items, q_direct.items);
    assert_eq!(q_api.last_evaluated_key, q_direct.last_evaluated_key);
    assert_eq!(q_api.items().len(), 2);
    let scan = |c: &Client| {
        c.scan()
            .table_name(&t)
            .filter_expression("pk = :b")
            .expression_attribute_values(":b", s("b"))
            .send()
    };
    assert_eq!(
        scan(&api).await.unwrap().items,
        scan(&direct).await.unwrap().items
    );
    let batch = |c: &Client| {
        c.batch_get_item()
            .request_items(
                &t,
                KeysAndAttributes::builder()
                    .keys(key("a", "3"))
                    .keys(key("b", "1"))
                    .keys(key("z", "9"))
                    .build()
                    .unwrap(),
            )
            .send()
    };
    let mut from_api = batch(&api)
        .await
        .unwrap()
        .responses
        .unwrap()
        .remove(&t)
        .unwrap();
    let mut from_direct = batch(&direct)
        .await
        .unwrap()
        .responses
        .unwrap()
        .remove(&t)
        .unwrap();
    let order = |items: &mut Vec<HashMap<String, AttributeValue>>| {
        items.sort_by_key(|i| format!("{:?}{:?}", i["pk"], i["sk"]))
    };
    order(&mut from_api);
    order(&mut from_direct);
    assert_eq!(from_api, from_direct);
    assert_eq!(from_api.len(), 2);
    let statement = format!("SELECT * FROM \"{t}\" WHERE pk = 'b'");
    let partiql = |c: &Client| c.execute_statement().statement(&statement).send();
    assert_eq!(
        partiql(&api).await.unwrap().items,
        partiql(&direct).await.unwrap().items
    );
    let described = api.describe_table().table_name(&t).send().await.unwrap();
    assert_eq!(described.table().unwrap().table_name(), Some(t.as_str()));
    let listed = api.list_tables().send().await.unwrap();
    assert!(listed.table_names().contains(&t));

    // DynamoDB's errors come back as DynamoDB gave them.
    let failed = api
        .put_item()
        .table_name(&t)
        .set_item(Some(key("a", "1")))
        .condition_expression("attribute_not_exists(pk)")
        .send()
        .await
        .unwrap_err();
    assert_eq!(failed.code(), Some("ConditionalCheckFailedException"));
    let missing = api
        .get_item()
        .table_name("no-such-table")
        .set_key(Some(key("a", "1")))
        .send()
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Some("ResourceNotFoundException"));
    api.delete_item()
        .table_name(&t)
        .set_key(Some(key("a", "1")))
        .send()
        .await
        .unwrap();
    assert!(consistent_get(&direct, &t, "a", "1").await.is_none());

    // Every request was counted under its operation, none failed.
    let metrics = http_get(d.metrics_endpoint(), "/metrics").await.1;
    let sample = |labels: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("ddbcached_api_requests_total{{{labels}}} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no sample {labels}"))
    };
    assert_eq!(sample("operation=\"GetItem\",outcome=\"forwarded\""), 3.0);
    assert_eq!(sample("operation=\"describe\",outcome=\"forwarded\""), 2.0);
    assert_eq!(sample("operation=\"PutItem\",outcome=\"failed\""), 0.0);
}

/// DescribeEndpoints is the front's to answer: with its own address, as the client
/// reached it, so that an SDK with endpoint discovery on stays on the daemon. DynamoDB's
/// answer (a regional endpoint) would take the client around it.
#[tokio::test(flavor = "multi_thread")]
async fn describe_endpoints_names_the_front_itself() {
    let d = daemon_with_api(|_| {}).await;
    let api = client(&url(&d)).await;
    let out = api.describe_endpoints().send().await.unwrap();
    let endpoints = out.endpoints();
    assert_eq!(endpoints.len(), 1);
    assert_eq!(endpoints[0].address(), d.api.unwrap().to_string());
    assert_eq!(endpoints[0].cache_period_in_minutes(), 1440);
}

#[tokio::test(flavor = "multi_thread")]
async fn changes_to_tables_are_refused_unless_the_control_plane_is_on() {
    let direct = client(endpoint()).await;
    let t: String = format!("refused-{}", name()).chars().take(60).collect();
    let create = |c: Client, t: String| async move {
        c.create_table()
            .table_name(t)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(attribute("k", ScalarAttributeType::S))
            .key_schema(key_part("k", KeyType::Hash))
            .send()
            .await
    };
    let d = daemon_with_api(|_| {}).await;
    let refused = create(client(&url(&d)).await, t.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Some("AccessDeniedException"), "{refused:?}");
    assert!(refused
        .message()
        .unwrap()
        .contains("dynamodb_api.control_plane"));
    let absent = direct
        .describe_table()
        .table_name(&t)
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        absent.code(),
        Some("ResourceNotFoundException"),
        "nothing was sent"
    );

    let open = daemon_with_api(|c| c.dynamodb_api.control_plane = true).await;
    create(client(&url(&open)).await, t.clone()).await.unwrap();
    direct.describe_table().table_name(&t).send().await.unwrap();
    client(&url(&open))
        .await
        .delete_table()
        .table_name(&t)
        .send()
        .await
        .unwrap();
}

/// One raw HTTP/1.1 exchange on a connection of its own: the status code and the body.
async fn raw(addr: SocketAddr, head: &str, body: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut out))
        .await
        .expect("an answer")
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not HTTP: {text}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

/// A request head for `target` (none if empty) with these extra header lines.
fn head(target: &str, length: usize, extra: &str) -> String {
    let target = match target {
        "" => String::new(),
        t => format!("X-Amz-Target: DynamoDB_20120810.{t}\r\n"),
    };
    format!(
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-amz-json-1.0\r\n\
         {target}{extra}Content-Length: {length}\r\nConnection: close\r\n\r\n"
    )
}

/// The error code (the part of `__type` after `#`) of an error body.
fn code(body: &str) -> String {
    let json: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    json["__type"]
        .as_str()
        .unwrap()
        .rsplit('#')
        .next()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_dynamodb_shaped_errors_and_nothing_is_sent() {
    let d = daemon_with_api(|c| c.dynamodb_api.max_body_bytes = 65536).await;
    let addr = d.api.unwrap();
    let oracle: SocketAddr = endpoint().trim_start_matches("http://").parse().unwrap();

    // An unknown operation: the same error code as DynamoDB Local's.
    let body = b"{}";
    let (status, text) = raw(addr, &head("Frobnicate", body.len(), ""), body).await;
    let (oracle_status, oracle_text) = raw(
        oracle,
        &head("Frobnicate", body.len(), "Authorization: AWS4-HMAC-SHA256 Credential=x/20260101/us-east-1/dynamodb/aws4_request, SignedHeaders=host, Signature=0\r\nX-Amz-Date: 20260101T000000Z\r\n"),
        body,
    )
    .await;
    assert_eq!((status, code(&text)), (oracle_status, code(&oracle_text)));
    assert_eq!(code(&text), "UnknownOperationException");
    let (status, text) = raw(addr, &head("", body.len(), ""), body).await;
    assert_eq!(
        (status, code(&text).as_str()),
        (400, "UnknownOperationException")
    );

    // A body that is not a JSON object (DynamoDB answers SerializationException; DynamoDB
    // Local, an internal failure).
    for bad in [&b"not json"[..], b"[1, 2]", b"{\"TableName\": "] {
        let (status, text) = raw(addr, &head("GetItem", bad.len(), ""), bad).await;
        assert_eq!(
            (status, code(&text).as_str()),
            (400, "SerializationException"),
            "{text}"
        );
    }

    // Over the limit: announced, sent without a length, or inflated from gzip.
    let big = vec![b' '; 70_000];
    let (status, text) = raw(addr, &head("GetItem", big.len(), ""), &big).await;
    assert_eq!(
        (status, code(&text).as_str()),
        (400, "ValidationException"),
        "{text}"
    );
    assert!(text.contains("dynamodb_api.max_body_bytes"), "{text}");
    let mut chunked = b"11170\r\n".to_vec();
    chunked.extend_from_slice(&big);
    chunked.extend_from_slice(b"\r\n0\r\n\r\n");
    let (status, text) = raw(
        addr,
        "POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: DynamoDB_20120810.GetItem\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        &chunked,
    )
    .await;
    assert_eq!(
        (status, code(&text).as_str()),
        (400, "ValidationException"),
        "{text}"
    );
    let mut bomb = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    bomb.write_all(&big).unwrap();
    let bomb = bomb.finish().unwrap();
    let (status, text) = raw(
        addr,
        &head("GetItem", bomb.len(), "Content-Encoding: gzip\r\n"),
        &bomb,
    )
    .await;
    assert_eq!(
        (status, code(&text).as_str()),
        (400, "ValidationException"),
        "{text}"
    );

    // A gzip body DynamoDB accepts is decoded and forwarded.
    let list = br#"{"Limit": 1}"#;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(list).unwrap();
    let gz = gz.finish().unwrap();
    let (status, text) = raw(
        addr,
        &head("ListTables", gz.len(), "Content-Encoding: gzip\r\n"),
        &gz,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("TableNames"), "{text}");

    // Garbage that is not HTTP ends that connection only.
    let mut garbage = TcpStream::connect(addr).await.unwrap();
    garbage
        .write_all(b"\x00\x01\x02 nonsense\r\n\r\n")
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(60), garbage.read_to_end(&mut sink)).await;
    let (status, _) = raw(addr, &head("ListTables", 2, ""), b"{}").await;
    assert_eq!(status, 200, "the front still answers");
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_are_kept_alive_and_closed_when_idle() {
    let d = daemon_with_api(|c| c.dynamodb_api.idle_timeout_ms = 300).await;
    let mut stream = TcpStream::connect(d.api.unwrap()).await.unwrap();
    let request = "POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: DynamoDB_20120810.ListTables\r\n\
                   Content-Type: application/x-amz-json-1.0\r\nContent-Length: 2\r\n\r\n{}";
    // Two requests on one connection, each answered.
    for _ in 0..2 {
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("TableNames") {
            let n = tokio::time::timeout(Duration::from_secs(60), stream.read(&mut buf))
                .await
                .expect("an answer")
                .unwrap();
            assert!(n > 0, "closed while in use");
            got.extend_from_slice(&buf[..n]);
        }
    }
    // Then nothing: the front closes it.
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf))
        .await
        .expect("closed within the idle limit")
        .unwrap_or(0);
    assert_eq!(n, 0);
}

/// A DynamoDB stand-in on a free loopback port: answers every request with a canned
/// answer carrying a request id and a checksum, and hands each request's head (lowercase)
/// to the test.
async fn recording_upstream() -> (String, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (heads, received) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let heads = heads.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let length = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if body.len() >= length {
                            let _ = heads.send(head.to_owned());
                            let answer = "{\"TableNames\":[]}";
                            let reply = format!(
                                "HTTP/1.1 200 OK\r\nx-amzn-RequestId: canned-id\r\nx-amz-crc32: 12345\r\n\
                                 Content-Type: application/x-amz-json-1.0\r\nContent-Length: {}\r\n\r\n{answer}",
                                answer.len()
                            );
                            if stream.write_all(reply.as_bytes()).await.is_err() {
                                return;
                            }
                            got.clear();
                            continue;
                        }
                    }
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
            });
        }
    });
    (url, received)
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_are_signed_with_the_daemons_credentials_and_answers_relayed() {
    let (upstream, mut heads) = recording_upstream().await;
    let mut config = dynamo_config(&upstream);
    config.dynamodb_api.listen = "127.0.0.1:0".into();
    let d = Daemon::start_without_tailers(config).await;
    let client_auth = "Authorization: AWS4-HMAC-SHA256 Credential=CLIENTKEY/20260101/eu-west-1/dynamodb/aws4_request, SignedHeaders=host, Signature=0\r\n";
    let mut stream = TcpStream::connect(d.api.unwrap()).await.unwrap();
    stream
        .write_all((head("ListTables", 2, client_auth) + "{}").as_bytes())
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(60), stream.read_to_string(&mut answer))
        .await
        .expect("an answer")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let lower = answer.to_ascii_lowercase();
    assert!(lower.contains("x-amzn-requestid: canned-id"), "{answer}");
    assert!(lower.contains("x-amz-crc32: 12345"), "{answer}");
    assert!(answer.ends_with("{\"TableNames\":[]}"), "{answer}");

    let sent = heads.recv().await.unwrap();
    let header = |name: &str| {
        sent.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} in {sent}"))
            .to_owned()
    };
    assert!(
        !sent.contains("clientkey"),
        "the client's credentials went on: {sent}"
    );
    let auth = header("authorization");
    assert!(auth.starts_with("aws4-hmac-sha256 credential="), "{auth}");
    assert!(auth.contains("/us-east-1/dynamodb/aws4_request"), "{auth}");
    let signed = auth.split("signedheaders=").nth(1).unwrap();
    for name in ["host", "x-amz-date", "x-amz-target"] {
        assert!(signed.contains(name), "{name} not signed: {auth}");
    }
    assert_eq!(header("x-amz-target"), "dynamodb_20120810.listtables");
    assert_eq!(header("host"), upstream.trim_start_matches("http://"));
}

/// The Python interpreter of `scripts/python-env.sh` (with boto3, click and the AWS CLI).
fn python() -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(root.join("scripts/python-env.sh"))
        .output()
        .expect("scripts/python-env.sh runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().into()
}

/// Runs a program with dummy AWS credentials and region (the daemon signs with its own),
/// no AWS configuration files, in `dir`; returns its standard output.
async fn run_aws_program(
    dir: &std::path::Path,
    program: &std::path::Path,
    args: &[&str],
) -> String {
    let out = tokio::process::Command::new(program)
        .args(args)
        .current_dir(dir)
        .env("AWS_ACCESS_KEY_ID", "client-key")
        .env("AWS_SECRET_ACCESS_KEY", "client-secret")
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{} {args:?}: {stdout}{}",
        program.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The StarbucksLocations scripts of the DynamoDB guide (`tests/fixtures/starbucks/`,
/// verbatim), run with boto3 against the front: unchanged but for their `endpoint_url`.
/// The first creates the table through a daemon that forwards control-plane changes;
/// once the table has a stream, a daemon that caches it takes the data and answers the
/// index queries, the second time from memory. Then the AWS CLI reads what they wrote.
/// On a DynamoDB Local of the test's own, since the scripts name their table.
#[tokio::test(flavor = "multi_thread")]
async fn boto3_scripts_and_the_aws_cli_work_through_the_api() {
    const TABLE: &str = "StarbucksLocations";
    let local = crate::harness::OwnLocal::start_in_memory().await;
    let creator = daemon_with_api(|c| {
        c.dynamodb.endpoint = local.endpoint.clone();
        c.dynamodb_api.control_plane = true;
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let fixtures =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/starbucks");
    let script = |name: &str, front: &str| {
        let text = std::fs::read_to_string(fixtures.join(name)).unwrap();
        assert!(
            text.contains("endpoint_url='http://localhost:8000'"),
            "{name}"
        );
        let text = text.replace("http://localhost:8000", front);
        std::fs::write(dir.path().join(name), text).unwrap();
    };
    let mut csv = String::from(
        "Brand,Store Number,Store Name,Ownership Type,Street Address,City,State/Province,Country,Postcode,Phone Number,Timezone,Longitude,Latitude\n",
    );
    let stores = [
        ("1-1", "OMAHA", "NE", "68144"),
        ("1-2", "OMAHA", "NE", "68144"),
        ("1-3", "OMAHA", "NE", "68154"),
        ("1-4", "LINCOLN", "NE", "68508"),
        ("1-5", "DENVER", "CO", "80202"),
    ];
    for (number, city, state, postcode) in stores {
        csv.push_str(&format!(
            "Starbucks,{number},Store {number},Company Owned,1 Main St,{city},{state},US,{postcode},555-0100,GMT-06:00,-96.0,41.2\n"
        ));
    }
    std::fs::write(dir.path().join("directory.csv"), csv).unwrap();

    let python = python();
    script("create_table.py", &url(&creator));
    let created = run_aws_program(dir.path(), &python, &["create_table.py"]).await;
    assert!(created.contains("Table created successfully!"), "{created}");
    creator.stop().await;
    // A cached table needs a stream: its changes made elsewhere must reach the daemon.
    client(&local.endpoint)
        .await
        .update_table()
        .table_name(TABLE)
        .stream_specification(
            aws_sdk_dynamodb::types::StreamSpecification::builder()
                .stream_enabled(true)
                .stream_view_type(aws_sdk_dynamodb::types::StreamViewType::NewAndOldImages)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    let d = daemon_with_api(|c| {
        c.dynamodb.endpoint = local.endpoint.clone();
        c.dynamodb_api.tables = vec![TABLE.into()];
        // Reads are counted: no stream lag may make them bypass.
        c.cache.max_staleness_ms = 600_000;
    })
    .await;
    let cache = d.api_cache.clone().unwrap();
    let table = cache.table(TABLE).unwrap().id;
    script("load_data.py", &url(&d));
    script("query.py", &url(&d));
    run_aws_program(dir.path(), &python, &["load_data.py"]).await;
    // The load's stream records are applied before the queries are counted.
    tokio::time::timeout(Duration::from_secs(120), async {
        while cache.applied(table).0 < stores.len() as u64 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the load's records arrive");
    let index_hits = || cache.reads(table)[2][0];
    for round in 0..2 {
        let before = index_hits();
        for (flag, expected) in [
            ("--default-postcode", 2),
            ("--default-city", 3),
            ("--default-state", 4),
        ] {
            let out = run_aws_program(dir.path(), &python, &["query.py", flag, "--count"]).await;
            assert!(
                out.contains(&format!("Retrieved {expected} locations.")),
                "{flag}: {out}"
            );
        }
        assert_eq!(index_hits() - before, [0, 3][round], "round {round}");
    }
    let listing = run_aws_program(dir.path(), &python, &["query.py", "--default-postcode"]).await;
    assert!(listing.contains("'StoreNumber': {'S': '1-1'}"), "{listing}");

    let aws = python.with_file_name("aws");
    let front = url(&d);
    let tables = run_aws_program(
        dir.path(),
        &aws,
        &["dynamodb", "list-tables", "--endpoint-url", &front],
    )
    .await;
    assert!(tables.contains(TABLE), "{tables}");
    let get = [
        "dynamodb",
        "get-item",
        "--endpoint-url",
        &front,
        "--table-name",
        TABLE,
        "--key",
        r#"{"StoreNumber": {"S": "1-5"}}"#,
    ];
    for round in 0..2 {
        let before = cache.reads(table)[0][0];
        let item = run_aws_program(dir.path(), &aws, &get).await;
        assert!(item.contains("DENVER"), "{item}");
        assert_eq!(cache.reads(table)[0][0] - before, round, "round {round}");
    }
}

/// One raw HTTP/1.1 exchange over a Unix socket: the status code, or `None` if the
/// daemon closed the connection without answering.
async fn raw_unix(socket: &std::path::Path, request: &str) -> Option<u16> {
    let mut stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    // A refused peer may be gone before the request is written.
    let _ = stream.write_all(request.as_bytes()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut out))
        .await
        .expect("an answer or a close");
    String::from_utf8_lossy(&out)
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_on_a_unix_socket_checks_its_peers() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let me = tempfile::tempfile().unwrap().metadata().unwrap();
    let request = head("ListTables", 2, "") + "{}";
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("dynamodb.sock");
    let on_socket = |c: &mut ddbcached::config::Config| {
        c.dynamodb_api.socket_path = socket.clone();
        c.dynamodb_api.socket_mode = 0o600;
    };
    {
        let d = Daemon::start_with(on_socket).await;
        assert!(d.api.is_none(), "no TCP listener was asked for");
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(raw_unix(&socket, &request).await, Some(200));
        d.stop().await;
    }
    assert!(!socket.exists(), "the socket file is removed at shutdown");

    let d = Daemon::start_with(|c| {
        on_socket(c);
        c.server.allowed_uids = vec![me.uid().wrapping_add(1)];
        c.server.allowed_gids = vec![me.gid().wrapping_add(1)];
    })
    .await;
    assert_eq!(raw_unix(&socket, &request).await, None, "refused");
    let metrics = http_get(d.metrics_endpoint(), "/metrics").await.1;
    assert!(
        metrics
            .lines()
            .any(|l| l == "ddbcached_api_peers_refused_total 1"),
        "{metrics}"
    );
}
