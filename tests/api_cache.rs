//! The DynamoDB API front's cache (`dynamodb_api.tables`), with the Rust AWS SDK and
//! DynamoDB Local as the oracle: every answer the front gives, from memory or not,
//! equals DynamoDB's consistent answer to the same request (within the staleness bound
//! for writes made around the daemon).

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::operation::query::builders::QueryFluentBuilder;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{
    AttributeValue, BillingMode, CreateGlobalSecondaryIndexAction, GlobalSecondaryIndex,
    GlobalSecondaryIndexUpdate, IndexStatus, KeyType, KeysAndAttributes, LocalSecondaryIndex,
    Projection, ProjectionType, PutRequest, ReturnConsumedCapacity, ScalarAttributeType,
    StreamSpecification, StreamViewType, TransactWriteItem, Update, WriteRequest,
};
use aws_sdk_dynamodb::Client;
use ddbcached::api::cache::ApiCache;
use ddbcached::api::tables::TableId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{
    api_url, attribute, endpoint, http_get, key_part, n, name, s, sdk_client, Daemon, Proxy,
};

pub(crate) type Item = HashMap<String, AttributeValue>;

/// A staleness bound no stream lag on a loaded machine reaches: tests that count hits
/// must never see the daemon bypass.
const NO_BYPASS_MS: u64 = 600_000;

/// A table of the test's own, with a stream of old and new images: partition key `pk`
/// (S), sort key `sk` (N), a local index `byPrice` (`price` N) and a global index
/// `byColor` (`color` S, `sk` N).
pub(crate) async fn cached_table(direct: &Client) -> String {
    let table: String = format!("cached-{}", name()).chars().take(60).collect();
    direct
        .create_table()
        .table_name(&table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attribute("pk", ScalarAttributeType::S))
        .attribute_definitions(attribute("sk", ScalarAttributeType::N))
        .attribute_definitions(attribute("price", ScalarAttributeType::N))
        .attribute_definitions(attribute("color", ScalarAttributeType::S))
        .key_schema(key_part("pk", KeyType::Hash))
        .key_schema(key_part("sk", KeyType::Range))
        .local_secondary_indexes(
            LocalSecondaryIndex::builder()
                .index_name("byPrice")
                .key_schema(key_part("pk", KeyType::Hash))
                .key_schema(key_part("price", KeyType::Range))
                .projection(all_attributes())
                .build()
                .unwrap(),
        )
        .global_secondary_indexes(
            GlobalSecondaryIndex::builder()
                .index_name("byColor")
                .key_schema(key_part("color", KeyType::Hash))
                .key_schema(key_part("sk", KeyType::Range))
                .projection(all_attributes())
                .build()
                .unwrap(),
        )
        .stream_specification(old_and_new_images())
        .send()
        .await
        .unwrap();
    table
}

/// An index's projection of every attribute.
fn all_attributes() -> Projection {
    Projection::builder()
        .projection_type(ProjectionType::All)
        .build()
}

/// A stream that carries every change's old and new images.
fn old_and_new_images() -> StreamSpecification {
    StreamSpecification::builder()
        .stream_enabled(true)
        .stream_view_type(StreamViewType::NewAndOldImages)
        .build()
        .unwrap()
}

/// A daemon caching `table` through its API front, caught up with the table's stream.
/// The first write to a fresh table's stream makes DynamoDB Local report its records as
/// trimmed (aws/aws-sdk-java#2923), and the tailer rightly flushes: a first write is
/// made here and waited for, so that the test's own counts start after it.
pub(crate) async fn daemon_caching(
    table: &str,
    direct: &Client,
    edit: impl FnOnce(&mut ddbcached::config::Config),
) -> (Daemon, Client) {
    let d = Daemon::start_with(|c| {
        c.dynamodb_api.listen = "127.0.0.1:0".into();
        c.dynamodb_api.tables = vec![table.to_owned()];
        c.cache.max_staleness_ms = NO_BYPASS_MS;
        edit(c);
    })
    .await;
    put(direct, table, item("warm-up", "0", &[])).await;
    wait_applied(&d, 1).await;
    d.wait_until_fresh().await;
    let api = sdk_client(&api_url(&d)).await;
    (d, api)
}

pub(crate) fn cache(d: &Daemon) -> &ApiCache {
    d.api_cache.as_deref().expect("the daemon caches a table")
}

/// Waits until the daemon has applied at least `records` stream records of its table.
pub(crate) async fn wait_applied(d: &Daemon, records: u64) {
    tokio::time::timeout(Duration::from_secs(120), async {
        while cache(d).applied(TableId(0)).0 < records {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the stream's records arrive within 120 s");
}

/// Reads of the table the front answered from memory so far (every operation).
fn hits(d: &Daemon) -> u64 {
    cache(d).reads(TableId(0)).iter().map(|r| r[0]).sum()
}

pub(crate) fn key(pk: &str, sk: &str) -> Item {
    HashMap::from([("pk".to_owned(), s(pk)), ("sk".to_owned(), n(sk))])
}

fn item(pk: &str, sk: &str, more: &[(&str, AttributeValue)]) -> Item {
    let mut i = key(pk, sk);
    i.extend(more.iter().map(|(k, v)| (k.to_string(), v.clone())));
    i
}

/// An item with an attribute of every type.
fn rich(pk: &str, sk: &str, color: &str, price: &str) -> Item {
    item(
        pk,
        sk,
        &[
            ("color", s(color)),
            ("price", n(price)),
            ("b", AttributeValue::B(Blob::new(vec![0, 1, 2, 255]))),
            ("yes", AttributeValue::Bool(true)),
            ("none", AttributeValue::Null(true)),
            (
                "l",
                AttributeValue::L(vec![s("x"), n("2.50"), AttributeValue::Bool(false)]),
            ),
            (
                "m",
                AttributeValue::M(HashMap::from([
                    ("inner".to_owned(), s("deep")),
                    ("n".to_owned(), n("007")),
                ])),
            ),
            ("ss", AttributeValue::Ss(vec!["a".into(), "b".into()])),
            ("ns", AttributeValue::Ns(vec!["1".into(), "2.0".into()])),
            (
                "bs",
                AttributeValue::Bs(vec![Blob::new(vec![1]), Blob::new(vec![2])]),
            ),
        ],
    )
}

async fn put(c: &Client, table: &str, item: Item) {
    c.put_item()
        .table_name(table)
        .set_item(Some(item))
        .send()
        .await
        .unwrap();
}

async fn get(c: &Client, table: &str, key: Item) -> Option<Item> {
    c.get_item()
        .table_name(table)
        .set_key(Some(key))
        .send()
        .await
        .unwrap()
        .item
}

pub(crate) async fn consistent_get(c: &Client, table: &str, key: Item) -> Option<Item> {
    c.get_item()
        .table_name(table)
        .set_key(Some(key))
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .item
}

/// A query's items and where it stopped.
type Page = (Vec<Item>, Option<Item>);

async fn run(q: QueryFluentBuilder) -> Page {
    let out = q.send().await.unwrap();
    (out.items.unwrap_or_default(), out.last_evaluated_key)
}

fn partition(c: &Client, table: &str, pk: &str) -> QueryFluentBuilder {
    c.query()
        .table_name(table)
        .key_condition_expression("pk = :pk")
        .expression_attribute_values(":pk", s(pk))
}

fn by_color(c: &Client, table: &str, color: &str) -> QueryFluentBuilder {
    c.query()
        .table_name(table)
        .index_name("byColor")
        .key_condition_expression("#c = :c")
        .expression_attribute_names("#c", "color")
        .expression_attribute_values(":c", s(color))
}

/// The same query with ConsistentRead, as DynamoDB answers it now (global indexes
/// cannot be read consistently: DynamoDB Local's are up to date at once).
async fn truth(q: QueryFluentBuilder, global: bool) -> Page {
    run(if global { q } else { q.consistent_read(true) }).await
}

/// Items in a stable order, for answers whose order DynamoDB does not fix.
pub(crate) fn sorted(mut items: Vec<Item>) -> Vec<Item> {
    items.sort_by_key(|i| format!("{:?}{:?}", i["pk"], i["sk"]));
    items
}

/// Items `p`/1..3, the partition `p` and the red and blue index partitions, through the
/// front and as DynamoDB answers them now.
async fn reads_answer_as_dynamodb_does(api: &Client, direct: &Client, t: &str, label: &str) {
    for sk in ["1", "2", "3"] {
        assert_eq!(
            get(api, t, key("p", sk)).await,
            consistent_get(direct, t, key("p", sk)).await,
            "{label}: item {sk}"
        );
    }
    assert_eq!(
        run(partition(api, t, "p")).await,
        truth(partition(direct, t, "p"), false).await,
        "{label}: partition"
    );
    for color in ["red", "blue"] {
        assert_eq!(
            run(by_color(api, t, color)).await,
            truth(by_color(direct, t, color), true).await,
            "{label}: {color} index partition"
        );
    }
}

async fn batch(c: &Client, table: &str, keys: &[Item]) -> Vec<Item> {
    let out = c
        .batch_get_item()
        .request_items(
            table,
            KeysAndAttributes::builder()
                .set_keys(Some(keys.to_vec()))
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert!(out.unprocessed_keys().is_none_or(|u| u.is_empty()));
    sorted(out.responses.unwrap().remove(table).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_are_answered_from_memory_as_dynamodb_answers_them() {
    let direct = sdk_client(endpoint()).await;
    let t = cached_table(&direct).await;
    let (d, api) = daemon_caching(&t, &direct, |_| {}).await;
    for (sk, color, price) in [("1", "red", "3"), ("2", "blue", "1.50"), ("3", "red", "2")] {
        put(&direct, &t, rich("p", sk, color, price)).await;
    }
    put(&direct, &t, rich("q", "1", "red", "9")).await;
    // The records of these writes are applied before anything is filled, so that none
    // drops an entry this test counts on.
    wait_applied(&d, 5).await;

    let get_projected = |c: &Client| {
        c.get_item()
            .table_name(&t)
            .set_key(Some(key("p", "2")))
            .projection_expression("#c, m.#i, l[1], ns")
            .expression_attribute_names("#c", "color")
            .expression_attribute_names("#i", "inner")
            .send()
    };
    let lsi = |c: &Client| {
        c.query()
            .table_name(&t)
            .index_name("byPrice")
            .key_condition_expression("pk = :pk AND price < :max")
            .expression_attribute_values(":pk", s("p"))
            .expression_attribute_values(":max", n("2.5"))
    };
    let page = |c: &Client| {
        partition(c, &t, "p")
            .scan_index_forward(false)
            .limit(2)
            .exclusive_start_key("pk", s("p"))
            .exclusive_start_key("sk", n("3"))
    };
    let keys = [key("p", "1"), key("q", "1"), key("nobody", "1")];
    let mut round_hits = Vec::new();
    for _ in 0..2 {
        let before = hits(&d);
        // GetItem: a whole item, a projection, an absent item, the same key spelled
        // another way (7 and 7.0 are one key).
        let whole = get(&api, &t, key("p", "2")).await;
        assert_eq!(whole, consistent_get(&direct, &t, key("p", "2")).await);
        assert_eq!(
            whole.as_ref().unwrap()["price"],
            n("1.5"),
            "DynamoDB's normal form"
        );
        assert_eq!(get(&api, &t, key("p", "2.0")).await, whole);
        assert_eq!(
            get_projected(&api).await.unwrap().item,
            get_projected(&direct).await.unwrap().item
        );
        assert_eq!(get(&api, &t, key("p", "9")).await, None);
        // Query: a partition, a page of it, a local index, a global index.
        assert_eq!(
            run(partition(&api, &t, "p")).await,
            truth(partition(&direct, &t, "p"), false).await
        );
        assert_eq!(run(page(&api)).await, truth(page(&direct), false).await);
        assert_eq!(run(lsi(&api)).await, truth(lsi(&direct), false).await);
        assert_eq!(
            run(by_color(&api, &t, "red")).await,
            truth(by_color(&direct, &t, "red"), true).await
        );
        // BatchGetItem, an absent key among them.
        assert_eq!(
            batch(&api, &t, &keys).await,
            batch(&direct, &t, &keys).await
        );
        round_hits.push(hits(&d) - before);
    }
    // 9 reads a round (the batch counts once): the first filled, the second hit.
    assert_eq!(
        round_hits,
        [1, 9],
        "the first round's only hit is 2.0 after 2"
    );

    // A hit consumed nothing, in the shape asked for.
    let consumed = api
        .get_item()
        .table_name(&t)
        .set_key(Some(key("p", "2")))
        .return_consumed_capacity(ReturnConsumedCapacity::Total)
        .send()
        .await
        .unwrap();
    assert_eq!(consumed.item, whole_item(&direct, &t).await);
    let c = consumed.consumed_capacity().unwrap();
    assert_eq!(
        (c.table_name(), c.capacity_units()),
        (Some(t.as_str()), Some(0.0))
    );

    // A consistent read goes to DynamoDB, whatever the cache holds: a write made around
    // the daemon a moment ago shows at once.
    put(&direct, &t, rich("p", "2", "green", "4")).await;
    let fresh = api
        .get_item()
        .table_name(&t)
        .set_key(Some(key("p", "2")))
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .item;
    assert_eq!(fresh.unwrap()["color"], s("green"));

    // Keys DynamoDB refuses are refused as DynamoDB refuses them, and nothing is kept.
    for bad in [
        HashMap::from([("pk".to_owned(), n("1")), ("sk".to_owned(), n("1"))]),
        item("p", "1", &[("extra", s("x"))]),
        HashMap::from([("pk".to_owned(), s("p"))]),
    ] {
        let from = |c: Client, bad: Item| {
            let t = t.clone();
            async move {
                c.get_item()
                    .table_name(t)
                    .set_key(Some(bad))
                    .send()
                    .await
                    .unwrap_err()
                    .code()
                    .map(str::to_owned)
            }
        };
        let expected = from(direct.clone(), bad.clone()).await;
        assert_eq!(expected.as_deref(), Some("ValidationException"));
        assert_eq!(from(api.clone(), bad.clone()).await, expected);
        assert_eq!(from(api.clone(), bad).await, expected, "not kept");
    }

    // Metrics name the table and count the hits, and what they saved.
    let metrics = crate::harness::http_get(d.metrics_endpoint(), "/metrics")
        .await
        .1;
    let hit_line = format!(
        "ddbcached_api_cache_reads_total{{table=\"{t}\",operation=\"GetItem\",served=\"hit\"}} "
    );
    assert!(metrics.contains(&hit_line), "{metrics}");
    let saved = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!(
                "ddbcached_api_read_units_saved_total{{table=\"{t}\"}} "
            ))
        })
        .and_then(|v| v.parse::<f64>().ok())
        .expect("read units saved are exported");
    assert!(saved > 0.0, "{saved}");
    assert!(
        metrics.contains("ddbcached_api_requests_total{operation=\"GetItem\",outcome=\"cached\"}")
    );
}

/// The item `("p", "2")` as DynamoDB holds it.
async fn whole_item(direct: &Client, t: &str) -> Option<Item> {
    consistent_get(direct, t, key("p", "2")).await
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_through_the_api_are_read_back_at_once() {
    let direct = sdk_client(endpoint()).await;
    let t = cached_table(&direct).await;
    let (_d, api) = daemon_caching(&t, &direct, |_| {}).await;
    put(&api, &t, rich("p", "1", "red", "1")).await;

    // Each write through the front, then the reads it touched: equal to DynamoDB's
    // consistent answers at once, though each was cached just before.
    reads_answer_as_dynamodb_does(&api, &direct, &t, "filled").await;
    // Written under other spellings of the key read as `1`: one item.
    put(&api, &t, rich("p", "1.0", "blue", "2")).await;
    reads_answer_as_dynamodb_does(&api, &direct, &t, "PutItem").await;
    api.update_item()
        .table_name(&t)
        .set_key(Some(key("p", "10E-1")))
        .update_expression("SET color = :c, v = :v")
        .expression_attribute_values(":c", s("red"))
        .expression_attribute_values(":v", n("1.10"))
        .send()
        .await
        .unwrap();
    reads_answer_as_dynamodb_does(&api, &direct, &t, "UpdateItem").await;
    api.batch_write_item()
        .request_items(
            &t,
            ["2", "3"]
                .iter()
                .map(|sk| {
                    WriteRequest::builder()
                        .put_request(
                            PutRequest::builder()
                                .set_item(Some(rich("p", sk, "blue", sk)))
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
    reads_answer_as_dynamodb_does(&api, &direct, &t, "BatchWriteItem").await;
    api.transact_write_items()
        .transact_items(
            TransactWriteItem::builder()
                .update(
                    Update::builder()
                        .table_name(&t)
                        .set_key(Some(key("p", "2")))
                        .update_expression("SET color = :c")
                        .expression_attribute_values(":c", s("red"))
                        .build()
                        .unwrap(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();
    reads_answer_as_dynamodb_does(&api, &direct, &t, "TransactWriteItems").await;
    api.execute_statement()
        .statement(format!(
            "UPDATE \"{t}\" SET color = 'blue' WHERE pk = 'p' AND sk = 3"
        ))
        .send()
        .await
        .unwrap();
    reads_answer_as_dynamodb_does(&api, &direct, &t, "ExecuteStatement").await;
    api.delete_item()
        .table_name(&t)
        .set_key(Some(key("p", "1")))
        .send()
        .await
        .unwrap();
    reads_answer_as_dynamodb_does(&api, &direct, &t, "DeleteItem").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_write_changes_nothing_cached() {
    let direct = sdk_client(endpoint()).await;
    let t = cached_table(&direct).await;
    let (d, api) = daemon_caching(&t, &direct, |_| {}).await;
    put(&direct, &t, rich("p", "1", "red", "1")).await;
    wait_applied(&d, 2).await;
    let cached = get(&api, &t, key("p", "1")).await;
    let before = hits(&d);
    let failed = api
        .put_item()
        .table_name(&t)
        .set_item(Some(rich("p", "1", "blue", "2")))
        .condition_expression("attribute_not_exists(pk)")
        .send()
        .await
        .unwrap_err();
    assert_eq!(failed.code(), Some("ConditionalCheckFailedException"));
    let cancelled = api
        .transact_write_items()
        .transact_items(
            TransactWriteItem::builder()
                .update(
                    Update::builder()
                        .table_name(&t)
                        .set_key(Some(key("p", "1")))
                        .update_expression("SET color = :c")
                        .condition_expression("color = :other")
                        .expression_attribute_values(":c", s("blue"))
                        .expression_attribute_values(":other", s("green"))
                        .build()
                        .unwrap(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap_err();
    assert_eq!(cancelled.code(), Some("TransactionCanceledException"));
    assert_eq!(get(&api, &t, key("p", "1")).await, cached);
    assert_eq!(hits(&d) - before, 1, "still served from memory");
    assert_eq!(cached, consistent_get(&direct, &t, key("p", "1")).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_around_the_daemon_are_seen_within_the_bound() {
    const BOUND_MS: u64 = 2000;
    let direct = sdk_client(endpoint()).await;
    let t = cached_table(&direct).await;
    let (_d, api) = daemon_caching(&t, &direct, |c| c.cache.max_staleness_ms = BOUND_MS).await;
    put(&direct, &t, rich("p", "1", "red", "1")).await;
    put(&direct, &t, rich("p", "2", "red", "2")).await;
    let reads = |label: &'static str| {
        let (api, direct, t) = (api.clone(), direct.clone(), t.clone());
        async move {
            let keys = [key("p", "1"), key("p", "2"), key("p", "3")];
            assert_eq!(
                batch(&api, &t, &keys).await,
                sorted(
                    futures::future::join_all(keys.iter().map(|k| consistent_get(
                        &direct,
                        &t,
                        k.clone()
                    )))
                    .await
                    .into_iter()
                    .flatten()
                    .collect()
                ),
                "{label}: batch"
            );
            reads_answer_as_dynamodb_does(&api, &direct, &t, label).await;
        }
    };
    // Settled, then read (and so cached) through the front.
    tokio::time::sleep(Duration::from_millis(BOUND_MS + 100)).await;
    reads("before").await;
    // Around the daemon: an item moves from the red index partition to the blue one,
    // another is deleted, a third is new. Every read that begins more than the bound
    // after the writes were acknowledged must show them (from memory invalidated by the
    // stream, or from DynamoDB while freshness is not proven).
    direct
        .update_item()
        .table_name(&t)
        .set_key(Some(key("p", "1")))
        .update_expression("SET color = :c")
        .expression_attribute_values(":c", s("blue"))
        .send()
        .await
        .unwrap();
    direct
        .delete_item()
        .table_name(&t)
        .set_key(Some(key("p", "2")))
        .send()
        .await
        .unwrap();
    put(&direct, &t, rich("p", "3", "red", "3")).await;
    tokio::time::sleep(Duration::from_millis(BOUND_MS + 100)).await;
    reads("after").await;
}

/// A fill whose answer is held back while a write lands, through the stream or through
/// the front: the answer it brings may predate the write, so it must not be kept.
#[tokio::test(flavor = "multi_thread")]
async fn a_fill_that_raced_a_write_is_never_kept() {
    let (direct, t, proxy) = proxied_table().await;
    let (d, api) = daemon_caching(&t, &direct, |c| {
        c.dynamodb.endpoint = proxy.endpoint.clone()
    })
    .await;
    put(&direct, &t, rich("p", "1", "red", "1")).await;
    wait_applied(&d, 2).await;

    for (round, operation) in ["GetItem", "Query", "GetItem"].into_iter().enumerate() {
        let color = ["blue", "green", "white"][round];
        let read = |c: &Client| {
            let (c, t) = (c.clone(), t.clone());
            async move {
                match operation {
                    "GetItem" => get(&c, &t, key("p", "1")).await.into_iter().collect(),
                    _ => run(partition(&c, &t, "p")).await.0,
                }
            }
        };
        let held = proxy.held();
        proxy.hold_answers_to(operation);
        let fill = tokio::spawn(read(&api));
        tokio::time::timeout(Duration::from_secs(60), async {
            while proxy.held() == held {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the fill is sent");
        // DynamoDB has read the item; now it changes.
        let applied = cache(&d).applied(TableId(0)).0;
        let changed = rich("p", "1", color, "1");
        if round < 2 {
            // Around the daemon: the stream brings the change before the fill's answer.
            put(&direct, &t, changed).await;
            wait_applied(&d, applied + 1).await;
        } else {
            // Through the front (the write's answer is not held).
            put(&api, &t, changed).await;
        }
        proxy.release();
        fill.await.unwrap();
        let now: Vec<Item> = read(&direct).await;
        assert_eq!(now[0]["color"], s(color));
        assert_eq!(read(&api).await, now, "round {round} ({operation})");
    }
}

/// A write whose client hangs up before DynamoDB's answer: DynamoDB has applied it, so
/// the entries it changed must go all the same (the client's retry of a conditional
/// write would be refused and drop nothing itself). The stream is polled too rarely to
/// bring the change during the test: only the write's own path can drop the entry.
#[tokio::test(flavor = "multi_thread")]
async fn a_write_whose_client_hung_up_still_drops_what_it_changed() {
    let (direct, t, proxy) = proxied_table().await;
    let d = daemon_behind(&proxy, &t, |c| {
        c.cache.max_staleness_ms = NO_BYPASS_MS;
        c.streams.poll_interval_ms = NO_BYPASS_MS / 2;
    })
    .await;
    d.wait_until_fresh().await;
    let api = sdk_client(&api_url(&d)).await;
    put(&api, &t, item("p", "1", &[("v", s("old"))])).await;
    get(&api, &t, key("p", "1")).await;
    let before = hits(&d);
    assert_eq!(
        get(&api, &t, key("p", "1")).await,
        Some(item("p", "1", &[("v", s("old"))]))
    );
    assert_eq!(hits(&d), before + 1, "the old item is cached");

    proxy.hold_answers_to("PutItem");
    let open = api_connections(&d).await;
    let client = send_raw(&d, &put_request(&t, "1", "new")).await;
    wait_for(|| proxy.held() == 1, "the write reaches DynamoDB").await;
    // DynamoDB has applied the write; its client goes away before hearing so, and the
    // daemon sees the connection end while the write's answer is still held.
    drop(client);
    wait_until_connections(&d, open).await;
    proxy.release();
    let new = item("p", "1", &[("v", s("new"))]);
    assert_eq!(
        consistent_get(&direct, &t, key("p", "1")).await,
        Some(new.clone())
    );
    // The daemon hears DynamoDB's answer a moment after the release; from then on no
    // read may be answered from before the write.
    tokio::time::timeout(Duration::from_secs(60), async {
        while get(&api, &t, key("p", "1")).await.as_ref() != Some(&new) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the hung-up write's item is dropped, not served old until the stream's poll");
    assert_eq!(
        cache(&d).applied(TableId(0)).0,
        0,
        "the stream brought nothing"
    );
}

/// Writes that outlive their clients are bounded: with one connection allowed, a second
/// client's write waits for the first, hung-up one to end before it is sent.
#[tokio::test(flavor = "multi_thread")]
async fn writes_whose_clients_hung_up_are_bounded_by_max_connections() {
    let (direct, t, proxy) = proxied_table().await;
    let d = daemon_behind(&proxy, &t, |c| c.dynamodb_api.max_connections = 1).await;
    proxy.hold_answers_to("PutItem");
    let first = send_raw(&d, &put_request(&t, "1", "first")).await;
    wait_for(|| proxy.held() == 1, "the first write reaches DynamoDB").await;
    drop(first);
    wait_until_connections(&d, 0.0).await;

    // The connection's slot is free, the write's is not.
    let mut second = send_raw(&d, &put_request(&t, "2", "second")).await;
    wait_until_connections(&d, 1.0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        proxy.held(),
        1,
        "the second write waits for the first's slot"
    );
    proxy.release();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), second.read_to_end(&mut answer))
        .await
        .expect("the second write is answered once the first ends")
        .unwrap_or_default();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    for (sk, v) in [("1", "first"), ("2", "second")] {
        assert_eq!(
            consistent_get(&direct, &t, key("p", sk)).await,
            Some(item("p", sk, &[("v", s(v))]))
        );
    }
}

/// A direct client, a cached table of its own, and a proxy in front of DynamoDB Local.
async fn proxied_table() -> (Client, String, Proxy) {
    let direct = sdk_client(endpoint()).await;
    let t = cached_table(&direct).await;
    (direct, t, Proxy::start(endpoint()).await)
}

/// A daemon that reaches DynamoDB through `proxy` and caches `table` through its front.
async fn daemon_behind(
    proxy: &Proxy,
    table: &str,
    edit: impl FnOnce(&mut ddbcached::config::Config),
) -> Daemon {
    Daemon::start_with(|c| {
        c.dynamodb.endpoint = proxy.endpoint.clone();
        c.dynamodb_api.listen = "127.0.0.1:0".into();
        c.dynamodb_api.tables = vec![table.to_owned()];
        edit(c);
    })
    .await
}

/// A PutItem of item `p`/`sk` with `v` set, as an SDK sends it, closing the connection
/// after its answer.
fn put_request(table: &str, sk: &str, v: &str) -> String {
    let body = format!(
        r#"{{"TableName":"{table}","Item":{{"pk":{{"S":"p"}},"sk":{{"N":"{sk}"}},"v":{{"S":"{v}"}}}}}}"#
    );
    format!(
        "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-amz-json-1.0\r\n\
         X-Amz-Target: DynamoDB_20120810.PutItem\r\nConnection: close\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// A connection to the front that has sent `request`.
async fn send_raw(d: &Daemon, request: &str) -> TcpStream {
    let mut client = TcpStream::connect(d.api.unwrap()).await.unwrap();
    client.write_all(request.as_bytes()).await.unwrap();
    client
}

/// The front's open connections, as its metrics show them.
async fn api_connections(d: &Daemon) -> f64 {
    let metrics = http_get(d.metrics_endpoint(), "/metrics").await.1;
    crate::ops::samples(&metrics)["ddbcached_api_connections"]
}

async fn wait_until_connections(d: &Daemon, open: f64) {
    tokio::time::timeout(Duration::from_secs(60), async {
        while api_connections(d).await != open {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the front's open connections reach {open}"));
}

async fn wait_for(done: impl Fn() -> bool, what: &str) {
    tokio::time::timeout(Duration::from_secs(60), async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_without_a_stream_is_refused_at_start_by_name() {
    let direct = sdk_client(endpoint()).await;
    let t = crate::api::table(&direct).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = crate::harness::dynamo_config(endpoint());
    config.server.socket_path = dir.path().join("d.sock");
    config.dynamodb_api.listen = "127.0.0.1:0".into();
    config.dynamodb_api.tables = vec![t.clone()];
    let refused = ddbcached::daemon::Daemon::start(&config)
        .await
        .err()
        .unwrap();
    let message = refused.to_string();
    assert!(
        message.contains(&t) && message.contains("no stream"),
        "{message}"
    );
}

/// `["*"]`: every table with a stream is cached, every other passes through. On a
/// DynamoDB Local of its own, whose every table the daemon then tails.
#[tokio::test(flavor = "multi_thread")]
async fn every_table_with_a_stream_is_cached_under_a_star() {
    let local = crate::harness::OwnLocal::start_in_memory().await;
    let direct = sdk_client(&local.endpoint).await;
    let streamed = cached_table(&direct).await;
    let plain = crate::api::table(&direct).await;
    let d = Daemon::start_with(|c| {
        c.dynamodb.endpoint = local.endpoint.clone();
        c.dynamodb_api.listen = "127.0.0.1:0".into();
        c.dynamodb_api.tables = vec!["*".into()];
        c.cache.max_staleness_ms = NO_BYPASS_MS;
    })
    .await;
    let c = cache(&d);
    assert!(c.table(&streamed).is_some());
    assert!(c.table(&plain).is_none(), "no stream: passes through");
    let api = sdk_client(&api_url(&d)).await;
    put(&api, &plain, item("p", "1", &[])).await;
    assert_eq!(
        get(&api, &plain, key("p", "1")).await,
        Some(item("p", "1", &[]))
    );
    // The stores' tables have streams too: cached alike.
    assert!(c.table(&d.config.dynamodb.log_table).is_some());
}

/// `["*"]` finds a table created after start at its first use: its reads bypass the
/// cache until its tailer has proven it fresh, then are answered from memory, and a
/// write around the daemon reaches them. A table created without a stream passes
/// through and makes no label.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_created_after_start_is_cached_from_its_first_use_under_a_star() {
    let local = crate::harness::OwnLocal::start_in_memory().await;
    let direct = sdk_client(&local.endpoint).await;
    let d = Daemon::start_with(|c| {
        c.dynamodb.endpoint = local.endpoint.clone();
        c.dynamodb_api.listen = "127.0.0.1:0".into();
        c.dynamodb_api.tables = vec!["*".into()];
        c.cache.max_staleness_ms = NO_BYPASS_MS;
    })
    .await;
    let api = sdk_client(&api_url(&d)).await;
    let (t, plain) = (
        cached_table(&direct).await,
        crate::api::table(&direct).await,
    );
    let c = cache(&d);
    assert!(c.table(&t).is_none(), "created after start");
    let old = item("p", "1", &[("v", s("old"))]);
    put(&api, &t, old.clone()).await;
    put(&api, &plain, item("p", "1", &[])).await;

    // Described, tailed, proven fresh: then a repeated read is a hit.
    let id = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Some(id) = c.table(&t).map(|t| t.id).filter(|id| !c.must_bypass(*id)) {
                return id;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the new table is cached and fresh within 60 s");
    // A fresh table's first stream read may report records trimmed (DynamoDB Local,
    // aws/aws-sdk-java#2923): the tailer rightly flushes, and the reads are made again.
    let hits = || c.reads(id).iter().map(|r| r[0]).sum::<u64>();
    for attempt in 1.. {
        let (flushes, before) = (c.applied(id).1, hits());
        for _ in 0..2 {
            assert_eq!(get(&api, &t, key("p", "1")).await, Some(old.clone()));
        }
        if hits() > before {
            break;
        }
        assert!(
            c.applied(id).1 > flushes && attempt < 3,
            "a repeated read is answered from memory"
        );
    }

    // A write around the daemon reaches the new table's entries through its stream.
    let new = item("p", "1", &[("v", s("new"))]);
    put(&direct, &t, new.clone()).await;
    tokio::time::timeout(Duration::from_secs(60), async {
        while get(&api, &t, key("p", "1")).await.as_ref() != Some(&new) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the write around the daemon is seen");

    assert!(c.table(&plain).is_none(), "no stream: passes through");
    let metrics = http_get(d.metrics_endpoint(), "/metrics").await.1;
    assert!(metrics.contains(&format!("table=\"{t}\"")));
    assert!(
        !metrics.contains(&plain),
        "a table passing through makes no label"
    );
}

/// Deletes `table` and creates it again with other keys and indexes: partition key `pk`
/// (S) alone, and `byPrice`, a local index before, a global index on `price` (N).
pub(crate) async fn re_create_with_other_keys(direct: &Client, table: &str) {
    direct
        .delete_table()
        .table_name(table)
        .send()
        .await
        .unwrap();
    direct
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attribute("pk", ScalarAttributeType::S))
        .attribute_definitions(attribute("price", ScalarAttributeType::N))
        .key_schema(key_part("pk", KeyType::Hash))
        .global_secondary_indexes(
            GlobalSecondaryIndex::builder()
                .index_name("byPrice")
                .key_schema(key_part("price", KeyType::Hash))
                .projection(all_attributes())
                .build()
                .unwrap(),
        )
        .stream_specification(old_and_new_images())
        .send()
        .await
        .unwrap();
}

/// A cached table deleted and re-created with other keys and indexes while the daemon
/// runs: once its tailer finds the new stream, the table is described again and cached
/// by its new keys (a GetItem by the partition key alone is a hit), the former local
/// index's name now names a global index whose results follow its own partitions, and
/// every answer is DynamoDB's.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_re_created_with_other_keys_and_indexes_is_cached_by_its_new_description() {
    let direct = sdk_client(endpoint()).await;
    let t = cached_table(&direct).await;
    let (d, api) = daemon_caching(&t, &direct, |c| {
        c.streams.discovery_interval_ms = 500;
    })
    .await;
    put(&api, &t, rich("p", "1", "red", "1")).await;
    get(&api, &t, key("p", "1")).await;
    let before = hits(&d);
    get(&api, &t, key("p", "1")).await;
    assert_eq!(hits(&d), before + 1, "cached under its first description");

    re_create_with_other_keys(&direct, &t).await;
    let c = cache(&d);
    tokio::time::timeout(Duration::from_secs(120), async {
        while c.table(&t).unwrap().key.sort.is_some() || c.must_bypass(TableId(0)) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the re-created table is described again and proven fresh within 120 s");
    let described = c.table(&t).unwrap();
    assert!(described.local.is_empty() && described.global.contains_key("byPrice"));

    let one =
        |price: &str| HashMap::from([("pk".to_owned(), s("a")), ("price".to_owned(), n(price))]);
    let only_key = HashMap::from([("pk".to_owned(), s("a"))]);
    let by_price = |c: &Client, price: &str| {
        c.query()
            .table_name(&t)
            .index_name("byPrice")
            .key_condition_expression("price = :p")
            .expression_attribute_values(":p", n(price))
    };
    put(&api, &t, one("1")).await;
    // The new stream's first write may be reported trimmed (DynamoDB Local,
    // aws/aws-sdk-java#2923): the tailer rightly flushes, and the reads are made again.
    for attempt in 1.. {
        let (flushes, before) = (c.applied(TableId(0)).1, hits(&d));
        for _ in 0..2 {
            assert_eq!(
                get(&api, &t, only_key.clone()).await,
                Some(one("1")),
                "by the new key"
            );
            assert_eq!(run(by_price(&api, "1")).await, (vec![one("1")], None));
        }
        if hits(&d) >= before + 2 {
            break;
        }
        assert!(
            c.applied(TableId(0)).1 > flushes && attempt < 3,
            "repeated reads by the new key and index are answered from memory"
        );
    }

    // Around the daemon, the item moves from one index partition to another: both the
    // item and the former partition's result follow, through the new stream.
    direct
        .update_item()
        .table_name(&t)
        .set_key(Some(only_key.clone()))
        .update_expression("SET price = :p")
        .expression_attribute_values(":p", n("2"))
        .send()
        .await
        .unwrap();
    moved_from_1_to_2(&api, &direct, by_price).await;
    assert_eq!(get(&api, &t, only_key).await, Some(one("2")));
}

/// Waits until the index query `q` through the front no longer shows an item moved
/// around the daemon from index partition `1` to `2` (the change came through the
/// stream), then checks partition `2` against DynamoDB's answer.
async fn moved_from_1_to_2(
    api: &Client,
    direct: &Client,
    q: impl Fn(&Client, &str) -> QueryFluentBuilder,
) {
    tokio::time::timeout(Duration::from_secs(60), async {
        while run(q(api, "1")).await != (vec![], None) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the item's move out of the index partition is seen");
    assert_eq!(run(q(api, "2")).await, run(q(direct, "2")).await);
}

/// A global index added with UpdateTable while the daemon runs: its first query is
/// forwarded, and DynamoDB's answer to it has the table described again; from then on
/// its queries are answered from memory, and an item moving between its partitions is
/// seen through the stream.
#[tokio::test(flavor = "multi_thread")]
async fn a_global_index_added_later_is_cached_once_dynamodb_answers_a_query_of_it() {
    let direct = sdk_client(endpoint()).await;
    let t = cached_table(&direct).await;
    let (d, api) = daemon_caching(&t, &direct, |_| {}).await;
    put(&api, &t, item("p", "1", &[("size", n("1"))])).await;
    direct
        .update_table()
        .table_name(&t)
        .attribute_definitions(attribute("size", ScalarAttributeType::N))
        .global_secondary_index_updates(
            GlobalSecondaryIndexUpdate::builder()
                .create(
                    CreateGlobalSecondaryIndexAction::builder()
                        .index_name("bySize")
                        .key_schema(key_part("size", KeyType::Hash))
                        .projection(all_attributes())
                        .build()
                        .unwrap(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let described = direct.describe_table().table_name(&t).send().await.unwrap();
            let indexes = described
                .table
                .unwrap()
                .global_secondary_indexes
                .unwrap_or_default();
            let active = indexes.iter().any(|g| {
                g.index_name() == Some("bySize") && g.index_status() == Some(&IndexStatus::Active)
            });
            if active {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("DynamoDB Local makes the index active within 60 s");

    // `size` is a reserved word: named through `#s`.
    let by_size = |c: &Client, size: &str| {
        c.query()
            .table_name(&t)
            .index_name("bySize")
            .key_condition_expression("#s = :s")
            .expression_attribute_names("#s", "size")
            .expression_attribute_values(":s", n(size))
    };
    let c = cache(&d);
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            assert_eq!(
                run(by_size(&api, "1")).await,
                run(by_size(&direct, "1")).await
            );
            let table = c.table(&t).unwrap();
            if table.global.contains_key("bySize") && !c.must_bypass(table.id) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the table is described again within 60 s");
    let before = hits(&d);
    for _ in 0..2 {
        assert_eq!(
            run(by_size(&api, "1")).await,
            run(by_size(&direct, "1")).await
        );
    }
    assert!(
        hits(&d) > before,
        "the new index's query answered from memory"
    );

    direct
        .update_item()
        .table_name(&t)
        .set_key(Some(key("p", "1")))
        .update_expression("SET #s = :s")
        .expression_attribute_names("#s", "size")
        .expression_attribute_values(":s", n("2"))
        .send()
        .await
        .unwrap();
    moved_from_1_to_2(&api, &direct, by_size).await;
}

/// A daemon serving only DynamoDB's API: the stores' tables need not exist, no socket is
/// bound, it is ready with no store table behind, and its reads are answered from memory.
#[tokio::test(flavor = "multi_thread")]
async fn with_the_stores_off_only_the_api_is_served() {
    let direct = sdk_client(endpoint()).await;
    let t = cached_table(&direct).await;
    let absent = || {
        format!("absent-{}", name())
            .chars()
            .take(60)
            .collect::<String>()
    };
    let (d, api) = daemon_caching(&t, &direct, |c| {
        c.stores.enabled = false;
        c.dynamodb.kv_table = absent();
        c.dynamodb.log_table = absent();
    })
    .await;
    assert!(!d.socket.exists(), "no socket is bound");
    let (status, body) = http_get(d.metrics_endpoint(), "/ready").await;
    assert_eq!((status.as_str(), body.trim()), ("HTTP/1.1 200 OK", "ready"));
    let (_, metrics) = http_get(d.metrics_endpoint(), "/metrics").await;
    assert!(
        !metrics.contains("ddbcached_stream_bypassing"),
        "no freshness gauge of a store that is not served"
    );
    put(&api, &t, item("p", "1", &[])).await;
    assert_eq!(
        get(&api, &t, key("p", "1")).await,
        Some(item("p", "1", &[]))
    );
    let before = hits(&d);
    assert_eq!(
        get(&api, &t, key("p", "1")).await,
        Some(item("p", "1", &[]))
    );
    assert_eq!(hits(&d), before + 1, "answered from memory");
}
