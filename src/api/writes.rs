//! What a write through the front touches in the cache: the items it names, their
//! partitions and, for tables with global indexes, those indexes' results. Read from
//! the request before it is sent, applied once DynamoDB has answered anything but a
//! refusal (a 4xx: a failed condition, a cancelled transaction, a throttle), so that
//! the client's next read cannot be answered from before its write; an unknown outcome
//! (no answer, a 5xx) counts as applied. A write the front cannot read (PartiQL, a key
//! it cannot make out) flushes the tables it may have touched, as does one whose table
//! was described again while it was on its way (its keys were read by the former keys).

use std::sync::Arc;

use serde_json::{Map, Value};

use super::cache::ApiCache;
use super::keys;
use super::tables::{ApiTable, TableId};

type Object = Map<String, Value>;

/// An item a write touched: its table, canonical key and partition key.
pub type ItemTouched = (TableId, Vec<u8>, Vec<u8>);

/// The cache entries a write may change.
#[derive(Debug, Default)]
pub struct Touched {
    /// Items by table (as described when they were read), with their canonical key and
    /// partition.
    items: Vec<(Arc<ApiTable>, Vec<u8>, Vec<u8>)>,
    /// Tables whose entries all go.
    flush: Vec<TableId>,
}

impl Touched {
    /// Reads what the write `operation` touches; `None` for an operation that writes
    /// nothing, or only tables the cache does not hold.
    pub fn of(cache: &ApiCache, operation: &str, request: &Object) -> Option<Touched> {
        let mut t = Touched::default();
        match operation {
            "PutItem" => t.item(cache, request, "Item"),
            "UpdateItem" | "DeleteItem" => t.item(cache, request, "Key"),
            "BatchWriteItem" => {
                for (table, writes) in object(request, "RequestItems").into_iter().flatten() {
                    let writes = writes.as_array().map(Vec::as_slice).unwrap_or_default();
                    for w in writes {
                        let (part, field) = match w.get("PutRequest") {
                            Some(put) => (put, "Item"),
                            None => (w.get("DeleteRequest").unwrap_or(&Value::Null), "Key"),
                        };
                        t.key(cache, table, part.get(field));
                    }
                }
            }
            "TransactWriteItems" => {
                let items = request.get("TransactItems").and_then(Value::as_array);
                for item in items.into_iter().flatten() {
                    for (kind, field) in [("Put", "Item"), ("Update", "Key"), ("Delete", "Key")] {
                        if let Some(part) = item.get(kind).and_then(Value::as_object) {
                            t.item(cache, part, field);
                        }
                    }
                }
            }
            "ExecuteStatement" | "BatchExecuteStatement" | "ExecuteTransaction" => {
                if statements(request).any(|s| !is_select(s)) {
                    // Which table a statement writes is PartiQL's to say: every cached
                    // table may have changed.
                    t.flush.extend(cache.tables().iter().map(|t| t.id));
                }
            }
            _ => return None,
        }
        (!t.items.is_empty() || !t.flush.is_empty()).then_some(t)
    }

    fn item(&mut self, cache: &ApiCache, request: &Object, field: &str) {
        if let Some(table) = request.get("TableName").and_then(Value::as_str) {
            self.key(cache, table, request.get(field));
        }
    }

    /// An item of `table` named by `item` (a key or a whole item).
    fn key(&mut self, cache: &ApiCache, table: &str, item: Option<&Value>) {
        let Some(t) = cache.table(table) else {
            return;
        };
        let item = item.and_then(Value::as_object);
        let key = item.and_then(|i| keys::of_json(&t.key, i));
        let partition = item
            .and_then(|i| i.get(&t.key.partition))
            .and_then(keys::partition_of_json);
        match (key, partition) {
            (Some(key), Some(partition)) => self.items.push((t, key, partition)),
            // DynamoDB will most likely refuse it; if it does not, nothing cached of the
            // table can be trusted.
            _ => self.flush.push(t.id),
        }
    }

    /// What to apply once DynamoDB has answered: the items it names (table, canonical
    /// key, partition key), and the tables whose entries all go: those it may have
    /// written items of that it does not name, and those described again since.
    pub fn settle(self, cache: &ApiCache) -> (Vec<ItemTouched>, Vec<TableId>) {
        let mut flush = self.flush;
        let mut items = Vec::with_capacity(self.items.len());
        for (table, key, partition) in self.items {
            match cache.is_current(&table) {
                true => items.push((table.id, key, partition)),
                false if !flush.contains(&table.id) => flush.push(table.id),
                false => {}
            }
        }
        (items, flush)
    }
}

fn object<'r>(request: &'r Object, field: &str) -> Option<&'r Object> {
    request.get(field)?.as_object()
}

/// The PartiQL statements of a request, whichever of the three operations it is.
fn statements(request: &Object) -> impl Iterator<Item = &str> {
    let single = request.get("Statement").and_then(Value::as_str);
    let many = ["Statements", "TransactStatements"]
        .into_iter()
        .filter_map(|f| request.get(f)?.as_array())
        .flatten()
        .map(|s| s.get("Statement").and_then(Value::as_str).unwrap_or(""));
    single.into_iter().chain(many)
}

fn is_select(statement: &str) -> bool {
    let s = statement.trim_start();
    s.len() >= 6 && s[..6].eq_ignore_ascii_case("select")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::keys::KeySchema;
    use crate::api::tables::ApiTable;
    use serde_json::json;

    fn cache() -> ApiCache {
        let table = |i: u16, name: &str| ApiTable {
            id: TableId(i),
            name: name.into(),
            key: KeySchema {
                partition: "pk".into(),
                sort: None,
            },
            local: vec![],
            global: Default::default(),
            images: true,
            generation: 0,
        };
        ApiCache::new(vec![table(0, "a"), table(1, "b")], 1000, 1 << 20)
    }

    fn touched(op: &str, request: Value) -> Option<Touched> {
        Touched::of(&cache(), op, request.as_object().unwrap())
    }

    #[test]
    fn every_write_operation_names_what_it_touches() {
        let t = touched(
            "PutItem",
            json!({"TableName": "a", "Item": {"pk": {"S": "x"}, "v": {"N": "1"}}}),
        )
        .unwrap();
        assert_eq!((t.items.len(), t.flush.len()), (1, 0));
        assert!(touched(
            "PutItem",
            json!({"TableName": "other", "Item": {"pk": {"S": "x"}}})
        )
        .is_none());
        let t = touched(
            "DeleteItem",
            json!({"TableName": "a", "Key": {"nokey": {"S": "x"}}}),
        )
        .unwrap();
        assert_eq!(t.flush, [TableId(0)]);
        let t = touched("BatchWriteItem", json!({"RequestItems": {
            "a": [{"PutRequest": {"Item": {"pk": {"S": "x"}}}}, {"DeleteRequest": {"Key": {"pk": {"S": "y"}}}}],
            "b": [{"DeleteRequest": {"Key": {"pk": {"N": "1"}}}}],
            "other": [{"DeleteRequest": {"Key": {"pk": {"N": "1"}}}}],
        }})).unwrap();
        assert_eq!(t.items.len(), 3);
        let t = touched(
            "TransactWriteItems",
            json!({"TransactItems": [
                {"Put": {"TableName": "a", "Item": {"pk": {"S": "x"}}}},
                {"Update": {"TableName": "b", "Key": {"pk": {"S": "x"}}}},
                {"ConditionCheck": {"TableName": "a", "Key": {"pk": {"S": "z"}}}},
            ]}),
        )
        .unwrap();
        assert_eq!(t.items.len(), 2);
        assert!(touched(
            "ExecuteStatement",
            json!({"Statement": "  select * FROM a"})
        )
        .is_none());
        let t = touched(
            "BatchExecuteStatement",
            json!({"Statements": [
                {"Statement": "SELECT * FROM a"}, {"Statement": "UPDATE b SET v = 1 WHERE pk = 'x'"}
            ]}),
        )
        .unwrap();
        assert_eq!(t.flush, [TableId(0), TableId(1)]);
        assert!(touched("GetItem", json!({"TableName": "a"})).is_none());
    }

    #[test]
    fn a_write_whose_table_was_described_again_meanwhile_flushes_it() {
        let c = cache();
        let request = json!({"RequestItems": {
            "a": [{"PutRequest": {"Item": {"pk": {"S": "x"}}}}],
            "b": [{"PutRequest": {"Item": {"pk": {"S": "y"}}}}],
        }});
        let t = Touched::of(&c, "BatchWriteItem", request.as_object().unwrap()).unwrap();
        let again = (*c.table("b").unwrap()).clone();
        c.described_again(again, 1);
        let (items, flush) = t.settle(&c);
        assert_eq!(items.iter().map(|i| i.0).collect::<Vec<_>>(), [TableId(0)]);
        assert_eq!(flush, [TableId(1)]);
    }
}
