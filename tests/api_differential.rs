//! The DynamoDB API front's cache, differentially: random sequences of writes (through the
//! front and around the daemon, conditional ones, batches, transactions, every attribute
//! type, numbers and keys in several spellings) and reads (GetItem with and without a
//! projection, BatchGetItem, Query of the table and of a global index), each read's answer
//! checked against DynamoDB's consistent answer to the same request. A read is held to
//! that once the staleness bound has passed since the last write made around the daemon
//! (before then, DynamoDB's own answer may be newer than what the bound promises); a
//! write through the front is read back at once. A failing sequence is shrunk.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{
    AttributeValue, DeleteRequest, KeysAndAttributes, PutRequest, TransactWriteItem, Update,
    WriteRequest,
};
use aws_sdk_dynamodb::Client;
use ddbcached::api::tables::TableId;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use crate::api_cache::{cached_table, consistent_get, daemon_caching, sorted, Item};
use crate::harness::{endpoint, n, name, s, sdk_client};

/// The staleness bound of the daemon under test: short, so that sequences can wait it out.
const BOUND_MS: u64 = 1000;
/// How long DynamoDB Local may take to show a write's record in the stream.
const PROPAGATION_MS: u64 = 100;
/// How long after a write around the daemon a read is held to DynamoDB's answer.
const SETTLED: Duration = Duration::from_millis(BOUND_MS + 50);

/// Who writes: the client through the front, or something else straight to DynamoDB.
#[derive(Clone, Copy, Debug)]
enum Via {
    Front,
    Around,
}

/// A sort key: its value (0..3) and how it is spelled (`1`, `1.0`, `10E-1`, `+1`).
#[derive(Clone, Copy, Debug)]
struct Sk(u8, u8);

impl Sk {
    fn attr(self) -> AttributeValue {
        let v = self.0;
        n(&match self.1 % 4 {
            0 => v.to_string(),
            1 => format!("{v}.0"),
            2 => format!("{v}0E-1"),
            _ => format!("+{v}"),
        })
    }
}

#[derive(Clone, Debug)]
enum Op {
    Put {
        via: Via,
        pk: u8,
        sk: Sk,
        color: Option<u8>,
        value: AttributeValue,
        if_absent: bool,
    },
    Update {
        via: Via,
        pk: u8,
        sk: Sk,
        value: AttributeValue,
        color: Option<u8>,
        if_exists: bool,
    },
    Delete {
        via: Via,
        pk: u8,
        sk: Sk,
    },
    BatchWrite {
        puts: Vec<(u8, Sk, AttributeValue)>,
        deletes: Vec<(u8, Sk)>,
    },
    Transact {
        updates: Vec<(u8, Sk, AttributeValue)>,
        cancel: bool,
    },
    Get {
        pk: u8,
        sk: Sk,
        projected: bool,
    },
    BatchGet {
        keys: Vec<(u8, Sk)>,
    },
    Query {
        pk: u8,
        limit: Option<i32>,
        forward: bool,
        after: Option<Sk>,
    },
    QueryColor {
        color: u8,
    },
    /// Waits out the staleness bound.
    Wait,
}

fn value() -> impl Strategy<Value = AttributeValue> {
    let number = prop::sample::select(vec!["0", "-0.0", "1.50", "7", "7.0", "1e3", "-12.25"]);
    let leaf = prop_oneof![
        "[a-z]{0,6}".prop_map(AttributeValue::S),
        number.prop_map(n),
        prop::collection::vec(any::<u8>(), 0..6).prop_map(|b| AttributeValue::B(Blob::new(b))),
        any::<bool>().prop_map(AttributeValue::Bool),
        Just(AttributeValue::Null(true)),
        prop::collection::btree_set("[a-z]{1,3}", 1..3)
            .prop_map(|s| AttributeValue::Ss(s.into_iter().collect())),
        prop::collection::btree_set(0u8..20, 1..3)
            .prop_map(|s| AttributeValue::Ns(s.into_iter().map(|v| v.to_string()).collect())),
        prop::collection::btree_set(prop::collection::vec(any::<u8>(), 1..3), 1..3)
            .prop_map(|s| AttributeValue::Bs(s.into_iter().map(Blob::new).collect())),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(AttributeValue::L),
            prop::collection::btree_map("[a-z]{1,3}", inner, 0..3)
                .prop_map(|m| AttributeValue::M(m.into_iter().collect())),
        ]
    })
}

fn op() -> impl Strategy<Value = Op> {
    let via = prop_oneof![3 => Just(Via::Front), 2 => Just(Via::Around)];
    // Few keys, so that writes and reads of one item, in its several spellings, meet.
    let pk = 0u8..2;
    let sk = (0u8..3, 0u8..4).prop_map(|(v, spelling)| Sk(v, spelling));
    let color = prop::option::weighted(0.8, 0u8..3);
    prop_oneof![
        4 => (via.clone(), pk.clone(), sk.clone(), color.clone(), value(), any::<bool>())
            .prop_map(|(via, pk, sk, color, value, c)| Op::Put {
                via, pk, sk, color, value, if_absent: c && pk == 0,
            }),
        3 => (via.clone(), pk.clone(), sk.clone(), value(), color.clone(), any::<bool>())
            .prop_map(|(via, pk, sk, value, color, if_exists)| Op::Update {
                via, pk, sk, value, color, if_exists,
            }),
        2 => (via, pk.clone(), sk.clone()).prop_map(|(via, pk, sk)| Op::Delete { via, pk, sk }),
        1 => (
            prop::collection::vec((pk.clone(), sk.clone(), value()), 0..3),
            prop::collection::vec((pk.clone(), sk.clone()), 0..2),
        )
            .prop_map(|(puts, deletes)| Op::BatchWrite { puts, deletes }),
        1 => (prop::collection::vec((pk.clone(), sk.clone(), value()), 1..3), any::<bool>())
            .prop_map(|(updates, cancel)| Op::Transact { updates, cancel }),
        6 => (pk.clone(), sk.clone(), any::<bool>())
            .prop_map(|(pk, sk, projected)| Op::Get { pk, sk, projected }),
        2 => prop::collection::vec((pk.clone(), sk.clone()), 1..5)
            .prop_map(|keys| Op::BatchGet { keys }),
        4 => (pk, prop::option::of(1i32..3), any::<bool>(), prop::option::of(sk))
            .prop_map(|(pk, limit, forward, after)| Op::Query { pk, limit, forward, after }),
        2 => (0u8..3).prop_map(|color| Op::QueryColor { color }),
        1 => Just(Op::Wait),
    ]
}

/// One sequence's world: the clients, its table and the names it writes under.
struct World<'a> {
    api: &'a Client,
    direct: &'a Client,
    table: &'a str,
    /// Partition keys of this sequence (sequences share the table).
    prefix: String,
    /// Colors of this sequence, for the global index.
    colors: [String; 3],
    last_around: Option<Instant>,
}

impl World<'_> {
    fn pk(&self, pk: u8) -> AttributeValue {
        s(&format!("{}-{pk}", self.prefix))
    }

    fn key(&self, pk: u8, sk: Sk) -> Item {
        HashMap::from([("pk".to_owned(), self.pk(pk)), ("sk".to_owned(), sk.attr())])
    }

    fn client(&self, via: Via) -> &Client {
        match via {
            Via::Front => self.api,
            Via::Around => self.direct,
        }
    }

    /// Whether a read beginning now must equal DynamoDB's consistent answer.
    fn settled(&self) -> bool {
        self.last_around.is_none_or(|at| at.elapsed() > SETTLED)
    }

    fn wrote(&mut self, via: Via) {
        if let Via::Around = via {
            self.last_around = Some(Instant::now());
        }
    }
}

/// A write's outcome: done, or refused as DynamoDB refuses it (a failed condition, a
/// cancelled transaction); anything else fails the sequence.
fn accepted<T, E: ProvideErrorMetadata + std::fmt::Debug>(
    result: Result<T, E>,
) -> Result<(), TestCaseError> {
    match result {
        Ok(_) => Ok(()),
        Err(e)
            if matches!(
                e.code(),
                Some("ConditionalCheckFailedException" | "TransactionCanceledException")
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(TestCaseError::fail(format!("write failed: {e:?}"))),
    }
}

async fn apply(w: &mut World<'_>, op: &Op) -> Result<(), TestCaseError> {
    let t = w.table;
    match op {
        Op::Put {
            via,
            pk,
            sk,
            color,
            value,
            if_absent,
        } => {
            let mut item = w.key(*pk, *sk);
            item.insert("v".into(), value.clone());
            if let Some(c) = color {
                item.insert("color".into(), s(&w.colors[*c as usize]));
            }
            let mut put = w.client(*via).put_item().table_name(t).set_item(Some(item));
            if *if_absent {
                put = put.condition_expression("attribute_not_exists(pk)");
            }
            accepted(put.send().await)?;
            w.wrote(*via);
        }
        Op::Update {
            via,
            pk,
            sk,
            value,
            color,
            if_exists,
        } => {
            let mut update = w
                .client(*via)
                .update_item()
                .table_name(t)
                .set_key(Some(w.key(*pk, *sk)))
                .expression_attribute_values(":v", value.clone());
            update = match color {
                Some(c) => update
                    .update_expression("SET v = :v, color = :c")
                    .expression_attribute_values(":c", s(&w.colors[*c as usize])),
                None => update.update_expression("SET v = :v REMOVE color"),
            };
            if *if_exists {
                update = update.condition_expression("attribute_exists(pk)");
            }
            accepted(update.send().await)?;
            w.wrote(*via);
        }
        Op::Delete { via, pk, sk } => {
            let delete = w
                .client(*via)
                .delete_item()
                .table_name(t)
                .set_key(Some(w.key(*pk, *sk)));
            accepted(delete.send().await)?;
            w.wrote(*via);
        }
        Op::BatchWrite { puts, deletes } => {
            // One write per item in a batch: later entries for a key replace earlier ones.
            let mut writes: HashMap<(u8, u8), WriteRequest> = HashMap::new();
            for (pk, sk, value) in puts {
                let mut item = w.key(*pk, *sk);
                item.insert("v".into(), value.clone());
                let put = PutRequest::builder().set_item(Some(item)).build().unwrap();
                writes.insert(
                    (*pk, sk.0),
                    WriteRequest::builder().put_request(put).build(),
                );
            }
            for (pk, sk) in deletes {
                let delete = DeleteRequest::builder()
                    .set_key(Some(w.key(*pk, *sk)))
                    .build()
                    .unwrap();
                let request = WriteRequest::builder().delete_request(delete).build();
                writes.insert((*pk, sk.0), request);
            }
            if writes.is_empty() {
                return Ok(());
            }
            let out = w
                .api
                .batch_write_item()
                .request_items(t, writes.into_values().collect())
                .send()
                .await;
            accepted(out)?;
        }
        Op::Transact { updates, cancel } => {
            let mut items = Vec::new();
            let mut seen = std::collections::HashSet::new();
            for (pk, sk, value) in updates {
                if !seen.insert((*pk, sk.0)) {
                    continue;
                }
                let mut update = Update::builder()
                    .table_name(t)
                    .set_key(Some(w.key(*pk, *sk)))
                    .update_expression("SET v = :v")
                    .expression_attribute_values(":v", value.clone());
                if *cancel {
                    update = update
                        .condition_expression("v = :never")
                        .expression_attribute_values(":never", s("never written"));
                }
                items.push(
                    TransactWriteItem::builder()
                        .update(update.build().unwrap())
                        .build(),
                );
            }
            let out = w
                .api
                .transact_write_items()
                .set_transact_items(Some(items))
                .send()
                .await;
            accepted(out)?;
        }
        Op::Get { pk, sk, projected } => {
            let get = |c: &Client| {
                let mut g = c.get_item().table_name(t).set_key(Some(w.key(*pk, *sk)));
                if *projected {
                    g = g
                        .projection_expression("#v, sk")
                        .expression_attribute_names("#v", "v");
                }
                g
            };
            let settled = w.settled();
            let got = get(w.api).send().await.unwrap().item;
            if settled {
                let expected = get(w.direct)
                    .consistent_read(true)
                    .send()
                    .await
                    .unwrap()
                    .item;
                prop_assert_eq!(got, expected, "{:?}", op);
            }
        }
        Op::BatchGet { keys } => {
            let mut unique: Vec<Item> = Vec::new();
            let mut seen = std::collections::HashSet::new();
            for (pk, sk) in keys {
                if seen.insert((*pk, sk.0)) {
                    unique.push(w.key(*pk, *sk));
                }
            }
            let settled = w.settled();
            let got = w
                .api
                .batch_get_item()
                .request_items(
                    t,
                    KeysAndAttributes::builder()
                        .set_keys(Some(unique.clone()))
                        .build()
                        .unwrap(),
                )
                .send()
                .await
                .unwrap();
            prop_assert!(got.unprocessed_keys().is_none_or(|u| u.is_empty()));
            let got = sorted(got.responses.unwrap().remove(t).unwrap_or_default());
            if settled {
                let mut expected = Vec::new();
                for k in unique {
                    expected.extend(consistent_get(w.direct, t, k).await);
                }
                prop_assert_eq!(got, sorted(expected), "{:?}", op);
            }
        }
        Op::Query {
            pk,
            limit,
            forward,
            after,
        } => {
            let query = |c: &Client| {
                let mut q = c
                    .query()
                    .table_name(t)
                    .key_condition_expression("pk = :pk")
                    .expression_attribute_values(":pk", w.pk(*pk))
                    .scan_index_forward(*forward)
                    .set_limit(*limit);
                if let Some(sk) = after {
                    q = q.set_exclusive_start_key(Some(w.key(*pk, *sk)));
                }
                q
            };
            let settled = w.settled();
            let got = query(w.api).send().await.unwrap();
            if settled {
                let expected = query(w.direct).consistent_read(true).send().await.unwrap();
                prop_assert_eq!(&got.items, &expected.items, "{:?}", op);
                prop_assert_eq!(&got.last_evaluated_key, &expected.last_evaluated_key);
                prop_assert_eq!(got.count, expected.count);
            }
        }
        Op::QueryColor { color } => {
            let query = |c: &Client| {
                c.query()
                    .table_name(t)
                    .index_name("byColor")
                    .key_condition_expression("color = :c")
                    .expression_attribute_values(":c", s(&w.colors[*color as usize]))
            };
            let settled = w.settled();
            let got = query(w.api).send().await.unwrap();
            if settled {
                let expected = query(w.direct).send().await.unwrap();
                prop_assert_eq!(&got.items, &expected.items, "{:?}", op);
            }
        }
        Op::Wait => tokio::time::sleep(SETTLED).await,
    }
    Ok(())
}

// A failure returns its shrunk sequence as the test's error rather than panicking, so
// that the sequence is the last thing the run prints.
#[tokio::test(flavor = "multi_thread")]
async fn random_sequences_answer_as_dynamodb_does() -> Result<(), String> {
    let direct = sdk_client(endpoint()).await;
    let table = cached_table(&direct).await;
    let (d, api) = daemon_caching(&table, &direct, |c| {
        c.cache.max_staleness_ms = BOUND_MS;
        // DynamoDB Local shows a record within 40 ms of its write (measured, loaded): the
        // product's allowance, made for DynamoDB itself, would leave this short bound
        // little room for a poll round on a loaded machine.
        c.streams.propagation_allowance_ms = PROPAGATION_MS;
    })
    .await;
    let handle = tokio::runtime::Handle::current();
    let mut runner = TestRunner::new(Config {
        cases: 20,
        max_shrink_iters: 64,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = prop::collection::vec(op(), 4..28);
    let result = tokio::task::block_in_place(|| {
        runner.run(&strategy, |ops| {
            handle.block_on(async {
                let prefix = name();
                let mut w = World {
                    api: &api,
                    direct: &direct,
                    table: &table,
                    colors: ["red", "blue", "green"].map(|c| format!("{prefix}-{c}")),
                    prefix,
                    last_around: None,
                };
                for op in &ops {
                    apply(&mut w, op).await?;
                }
                // Finally, everything settled: every item reads as DynamoDB holds it.
                tokio::time::sleep(SETTLED).await;
                for pk in 0..2 {
                    for v in 0..3 {
                        apply(
                            &mut w,
                            &Op::Get {
                                pk,
                                sk: Sk(v, 0),
                                projected: false,
                            },
                        )
                        .await?;
                    }
                    let query = Op::Query {
                        pk,
                        limit: None,
                        forward: true,
                        after: None,
                    };
                    apply(&mut w, &query).await?;
                }
                Ok(())
            })
        })
    });
    result.map_err(|e| e.to_string())?;
    // The sequences' reads were answered from memory too, unless the machine was too
    // loaded for the tailer to prove freshness within the short bound (then they all
    // bypassed, rightly). Either way, once fresh, a repeated read is a hit.
    let cache = d.api_cache.as_ref().unwrap();
    let hits = || -> u64 { cache.reads(TableId(0)).iter().map(|r| r[0]).sum() };
    eprintln!("reads of the sequences answered from memory: {}", hits());
    let deadline = Instant::now() + Duration::from_secs(60);
    while hits() == 0 {
        assert!(
            Instant::now() < deadline,
            "no read was ever answered from memory"
        );
        if !cache.must_bypass(TableId(0)) {
            for _ in 0..2 {
                let key =
                    HashMap::from([("pk".to_owned(), s("warm-up")), ("sk".to_owned(), n("0"))]);
                api.get_item()
                    .table_name(&table)
                    .set_key(Some(key))
                    .send()
                    .await
                    .unwrap();
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
