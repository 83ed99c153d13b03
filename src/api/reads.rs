//! The reads the front answers from memory: GetItem, BatchGetItem and Query of cached
//! tables ([`super::cache`] keeps the entries coherent). What the cache does not
//! answer is forwarded as it came: consistent reads, reads of a table whose freshness
//! is not proven, and requests whose shape it does not read.
//!
//! A miss is filled with DynamoDB's own answer to a consistent read (a global index's
//! as it comes: it cannot be read consistently), so that a cached answer carries what
//! DynamoDB would answer, number spellings and projections included; the fill also
//! asks what it consumed, to count what the hits save. Entries are keyed by everything
//! in the request that shapes the answer, so only an identical request that DynamoDB
//! accepted is ever answered from one: a request DynamoDB would refuse is sent to it.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{Map, Value};

use super::cache::{ApiCache, EntryKey, Of, Read, Served, Ticket};
use super::error::{ApiError, JSON_1_0};
use super::keys;
use super::tables::ApiTable;
use super::Shared;

/// BatchGetItem's limit of keys per request.
const BATCH_GET_MAX_KEYS: usize = 100;

/// A JSON object of a request or an answer.
type Object = Map<String, Value>;

/// One request as the front forwards it: the operation and the client's content type.
pub struct Call<'a> {
    pub shared: &'a Shared,
    pub target: &'a HeaderValue,
    pub content_type: Option<&'a HeaderValue>,
}

impl Call<'_> {
    /// Sends `request` and returns DynamoDB's answer as it came.
    pub async fn forward(&self, request: Bytes) -> Result<Response<Full<Bytes>>, ApiError> {
        self.shared
            .upstream
            .forward(self.target, self.content_type, request)
            .await
    }

    /// Sends a request the front wrote (a fill) and reads the answer: `Ok(object)` for a
    /// success, `Err(response)` for any other answer, to relay as it came.
    async fn fill(&self, request: &Object) -> Result<Filled, ApiError> {
        let body = Bytes::from(serde_json::to_vec(request).expect("JSON values serialize"));
        let response = self.forward(body).await?;
        if response.status() != StatusCode::OK {
            return Ok(Filled::Refused(response));
        }
        let request_id = response.headers().get("x-amzn-requestid").cloned();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        match serde_json::from_slice::<Object>(&body) {
            Ok(answer) => Ok(Filled::Answer { answer, request_id }),
            Err(e) => Err(ApiError::Upstream(format!(
                "DynamoDB's answer is not a JSON object: {e}"
            ))),
        }
    }
}

enum Filled {
    Answer {
        answer: Object,
        request_id: Option<HeaderValue>,
    },
    Refused(Response<Full<Bytes>>),
}

/// An answer the front wrote: DynamoDB's headers as it sets them, the checksum of this
/// body, and the request id of the call it came from (a hit makes one up).
pub fn respond(body: Vec<u8>, request_id: Option<HeaderValue>) -> Response<Full<Bytes>> {
    let crc = crc32fast::hash(&body);
    let mut response = Response::new(Full::new(Bytes::from(body)));
    let h = response.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(JSON_1_0),
    );
    h.insert("x-amz-crc32", HeaderValue::from(crc));
    h.insert(
        "x-amzn-requestid",
        request_id.unwrap_or_else(new_request_id),
    );
    response
}

/// A request id in DynamoDB's form (52 characters, capitals and digits).
fn new_request_id() -> HeaderValue {
    use rand::Rng;
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::rng();
    let id: Vec<u8> = (0..52)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())])
        .collect();
    HeaderValue::from_bytes(&id).expect("capitals and digits are a valid header")
}

/// What the client asked of `ReturnConsumedCapacity`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Capacity {
    None,
    Total,
    Indexes,
}

impl Capacity {
    fn of(request: &Object) -> Capacity {
        match request
            .get("ReturnConsumedCapacity")
            .and_then(Value::as_str)
        {
            Some("TOTAL") => Capacity::Total,
            Some("INDEXES") => Capacity::Indexes,
            _ => Capacity::None,
        }
    }

    /// What a fill asks for: the client's choice, or at least the total, to count.
    fn for_fill(self) -> &'static str {
        match self {
            Capacity::Indexes => "INDEXES",
            _ => "TOTAL",
        }
    }

    /// A hit's `ConsumedCapacity`: nothing, in the shape asked for.
    fn nothing(self, table: &str, index: Option<(&str, bool)>) -> Option<Value> {
        let zero = || serde_json::json!({"CapacityUnits": 0.0});
        let mut c = match self {
            Capacity::None => return None,
            _ => serde_json::json!({"TableName": table, "CapacityUnits": 0.0}),
        };
        if self == Capacity::Indexes {
            c["Table"] = zero();
            if let Some((name, global)) = index {
                let kind = if global {
                    "GlobalSecondaryIndexes"
                } else {
                    "LocalSecondaryIndexes"
                };
                c[kind] = serde_json::json!({ name: zero() });
            }
        }
        Some(c)
    }
}

/// The read units in a `ConsumedCapacity` object.
fn units_of(consumed: Option<&Value>) -> f64 {
    consumed
        .and_then(|c| c.get("CapacityUnits"))
        .and_then(Value::as_f64)
        .unwrap_or(0.0)
}

/// `object` with `fields` removed, as canonical text (object keys sorted, as the map
/// keeps them), written without copying the request.
fn canonical_without(object: &Object, fields: &[&str]) -> Vec<u8> {
    let rest: std::collections::BTreeMap<&String, &Value> = object
        .iter()
        .filter(|(k, _)| !fields.contains(&k.as_str()))
        .collect();
    serde_json::to_vec(&rest).expect("JSON values serialize")
}

/// A stored answer (a JSON object's text) with `ConsumedCapacity` put in front.
fn with_capacity(stored: &[u8], consumed: Option<Value>) -> Vec<u8> {
    let Some(consumed) = consumed else {
        return stored.to_vec();
    };
    let mut out = Vec::with_capacity(stored.len() + 96);
    out.extend_from_slice(b"{\"ConsumedCapacity\":");
    serde_json::to_writer(&mut out, &consumed).expect("JSON values serialize");
    if stored.len() > 2 {
        out.push(b',');
        out.extend_from_slice(&stored[1..]);
    } else {
        out.push(b'}');
    }
    out
}

fn is_true(request: &Object, field: &str) -> bool {
    request.get(field).and_then(Value::as_bool) == Some(true)
}

/// The cached table a read names, if the cache may answer it now; counts a bypass.
fn cached_table(cache: &ApiCache, request: &Object, read: Read) -> Option<Arc<ApiTable>> {
    let table = cache.table(request.get("TableName")?.as_str()?)?;
    if is_true(request, "ConsistentRead") || cache.must_bypass(table.id) {
        cache.count(table.id, read, Served::Bypass, 0.0);
        return None;
    }
    Some(table)
}

/// An item's canonical key and partition key.
#[derive(Clone, PartialEq, Eq, Hash)]
struct ItemKey {
    key: Vec<u8>,
    partition: Vec<u8>,
}

impl ItemKey {
    /// Of a request's `Key`, if it names exactly the table's key; or of a whole item.
    fn of(table: &ApiTable, item: Option<&Value>, whole: bool) -> Option<ItemKey> {
        let item = item?.as_object()?;
        let expected = 1 + usize::from(table.key.sort.is_some());
        if !whole && item.len() != expected {
            return None;
        }
        Some(ItemKey {
            key: keys::of_json(&table.key, item)?,
            partition: keys::partition_of_json(item.get(&table.key.partition)?)?,
        })
    }

    fn of_entry(&self) -> Of<'_> {
        Of::Item {
            key: &self.key,
            partition: &self.partition,
        }
    }
}

/// GetItem: from memory, or filled by a consistent GetItem.
pub async fn get_item(
    call: &Call<'_>,
    cache: &ApiCache,
    request: Object,
    body: Bytes,
) -> Result<(Response<Full<Bytes>>, Served), ApiError> {
    let Some(table) = cached_table(cache, &request, Read::GetItem) else {
        return Ok((call.forward(body).await?, Served::Bypass));
    };
    let Some(key) = ItemKey::of(&table, request.get("Key"), false) else {
        cache.count(table.id, Read::GetItem, Served::Bypass, 0.0);
        return Ok((call.forward(body).await?, Served::Bypass));
    };
    let capacity = Capacity::of(&request);
    let projection = canonical_without(
        &request,
        &[
            "TableName",
            "Key",
            "ConsistentRead",
            "ReturnConsumedCapacity",
        ],
    );
    let entry_key = EntryKey::item(table.id, &key.key, &projection);
    if let Some(entry) = cache.get(&entry_key) {
        cache.count(table.id, Read::GetItem, Served::Hit, entry.units);
        let consumed = capacity.nothing(&table.name, None);
        return Ok((
            respond(item_answer(&entry.body, consumed), None),
            Served::Hit,
        ));
    }
    let ticket = cache.ticket(&table);
    let mut fill = request;
    fill.insert("ConsistentRead".into(), Value::Bool(true));
    fill.insert("ReturnConsumedCapacity".into(), capacity.for_fill().into());
    let (mut answer, request_id) = match call.fill(&fill).await? {
        Filled::Answer { answer, request_id } => (answer, request_id),
        Filled::Refused(response) => return Ok((response, Served::Bypass)),
    };
    let consumed = answer.remove("ConsumedCapacity");
    let item = match answer.get("Item") {
        Some(item) => Bytes::from(serde_json::to_vec(item).expect("JSON values serialize")),
        None => Bytes::new(),
    };
    // The client's own read would have been eventually consistent: half a fill's cost.
    let units = units_of(consumed.as_ref()) / 2.0;
    cache.fill(entry_key, ticket, key.of_entry(), item.clone(), units);
    cache.count(table.id, Read::GetItem, Served::Miss, 0.0);
    let consumed = consumed.filter(|_| capacity != Capacity::None);
    Ok((
        respond(item_answer(&item, consumed), request_id),
        Served::Miss,
    ))
}

/// GetItem's answer for a stored item (empty: no such item).
fn item_answer(item: &[u8], consumed: Option<Value>) -> Vec<u8> {
    let mut out = Vec::with_capacity(item.len() + 10);
    out.push(b'{');
    if let Some(c) = consumed {
        out.extend_from_slice(b"\"ConsumedCapacity\":");
        serde_json::to_writer(&mut out, &c).expect("JSON values serialize");
        if !item.is_empty() {
            out.push(b',');
        }
    }
    if !item.is_empty() {
        out.extend_from_slice(b"\"Item\":");
        out.extend_from_slice(item);
    }
    out.push(b'}');
    out
}

/// One table's part of a BatchGetItem, as the cache reads it.
struct BatchPart {
    table: Arc<ApiTable>,
    projection: Vec<u8>,
    /// Items found in memory (their JSON).
    hits: Vec<Value>,
    /// Keys sent to DynamoDB: the request's value and its canonical key.
    missing: Vec<(Value, ItemKey)>,
    saved: f64,
}

/// BatchGetItem: each key from memory where it can be, the rest in one BatchGetItem
/// whose `UnprocessedKeys` come back to the client as DynamoDB gave them.
pub async fn batch_get_item(
    call: &Call<'_>,
    cache: &ApiCache,
    request: Object,
    body: Bytes,
) -> Result<(Response<Full<Bytes>>, Served), ApiError> {
    let Some(items) = request.get("RequestItems").and_then(Value::as_object) else {
        return Ok((call.forward(body).await?, Served::Bypass));
    };
    let total_keys: usize = items
        .values()
        .filter_map(|p| p.get("Keys")?.as_array().map(Vec::len))
        .sum();
    if total_keys > BATCH_GET_MAX_KEYS {
        // DynamoDB refuses it: let it say so.
        return Ok((call.forward(body).await?, Served::Bypass));
    }
    let mut parts = Vec::new();
    for (name, part) in items {
        let Some(table) = cache.table(name) else {
            continue;
        };
        let Some(part) = part.as_object() else {
            return Ok((call.forward(body).await?, Served::Bypass));
        };
        let served = if is_true(part, "ConsistentRead") || cache.must_bypass(table.id) {
            Served::Bypass
        } else {
            Served::Miss
        };
        let Some(keys) = batch_keys(&table, part) else {
            // Keys DynamoDB would refuse (or duplicates): it answers the whole request.
            return Ok((call.forward(body).await?, Served::Bypass));
        };
        if served == Served::Bypass {
            cache.count(table.id, Read::BatchGetItem, Served::Bypass, 0.0);
            continue;
        }
        let projection = canonical_without(part, &["Keys", "ConsistentRead"]);
        let mut p = BatchPart {
            table,
            projection,
            hits: Vec::new(),
            missing: Vec::new(),
            saved: 0.0,
        };
        for (value, key) in keys {
            match cache.get(&EntryKey::item(p.table.id, &key.key, &p.projection)) {
                Some(entry) => {
                    p.saved += entry.units;
                    if !entry.body.is_empty() {
                        p.hits
                            .push(serde_json::from_slice(&entry.body).map_err(|e| {
                                ApiError::Upstream(format!("a cached item does not decode: {e}"))
                            })?);
                    }
                }
                None => p.missing.push((value, key)),
            }
        }
        parts.push(p);
    }
    let capacity = Capacity::of(&request);
    let all_hit = parts.iter().all(|p| p.missing.is_empty());
    if parts.is_empty() {
        return Ok((call.forward(body).await?, Served::Bypass));
    }
    if all_hit && parts.len() == items.len() {
        let mut responses = Object::new();
        let mut consumed = Vec::new();
        for p in parts {
            cache.count(p.table.id, Read::BatchGetItem, Served::Hit, p.saved);
            consumed.extend(capacity.nothing(&p.table.name, None));
            responses.insert(p.table.name.clone(), Value::Array(p.hits));
        }
        let mut answer = Object::new();
        answer.insert("Responses".into(), Value::Object(responses));
        answer.insert("UnprocessedKeys".into(), Value::Object(Object::new()));
        if capacity != Capacity::None {
            answer.insert("ConsumedCapacity".into(), Value::Array(consumed));
        }
        let body = serde_json::to_vec(&answer).expect("JSON values serialize");
        return Ok((respond(body, None), Served::Hit));
    }

    // Ask DynamoDB for what memory lacks: cached tables' keys read consistently.
    let tickets: Vec<_> = parts.iter().map(|p| cache.ticket(&p.table)).collect();
    let cached: Vec<String> = parts.iter().map(|p| p.table.name.clone()).collect();
    let mut fill = request.clone();
    let fill_items = fill
        .get_mut("RequestItems")
        .and_then(Value::as_object_mut)
        .expect("checked above");
    for p in &parts {
        if p.missing.is_empty() {
            fill_items.remove(&p.table.name);
            continue;
        }
        if let Some(part) = fill_items
            .get_mut(&p.table.name)
            .and_then(Value::as_object_mut)
        {
            let keys = p.missing.iter().map(|(v, _)| v.clone()).collect();
            part.insert("Keys".into(), Value::Array(keys));
            part.insert("ConsistentRead".into(), Value::Bool(true));
        }
    }
    fill.insert("ReturnConsumedCapacity".into(), capacity.for_fill().into());
    let (mut answer, request_id) = match call.fill(&fill).await? {
        Filled::Answer { answer, request_id } => (answer, request_id),
        Filled::Refused(response) => return Ok((response, Served::Bypass)),
    };
    let mut consumed: Vec<Value> = match answer.remove("ConsumedCapacity") {
        Some(Value::Array(c)) => c,
        _ => Vec::new(),
    };
    let unprocessed = answer
        .get("UnprocessedKeys")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let responses = answer
        .entry("Responses")
        .or_insert_with(|| Value::Object(Object::new()));
    let Some(responses) = responses.as_object_mut() else {
        return Err(ApiError::Upstream(
            "DynamoDB's BatchGetItem answer has no Responses object".into(),
        ));
    };
    for (p, ticket) in parts.into_iter().zip(tickets) {
        let read = responses
            .entry(p.table.name.clone())
            .or_insert_with(|| Value::Array(Vec::new()));
        let Some(read) = read.as_array_mut() else {
            continue;
        };
        if !p.missing.is_empty() {
            let units = consumed
                .iter()
                .find(|c| c.get("TableName").and_then(Value::as_str) == Some(&p.table.name))
                .map(|c| units_of(Some(c)))
                .unwrap_or(0.0);
            fill_batch_part(
                cache,
                ticket,
                &p,
                read,
                unprocessed.get(&p.table.name),
                units,
            );
            cache.count(p.table.id, Read::BatchGetItem, Served::Miss, p.saved);
        } else {
            cache.count(p.table.id, Read::BatchGetItem, Served::Hit, p.saved);
            consumed.extend(capacity.nothing(&p.table.name, None));
        }
        read.extend(p.hits);
    }
    if let Some(left) = answer
        .get_mut("UnprocessedKeys")
        .and_then(Value::as_object_mut)
    {
        for name in &cached {
            // The client asked for eventually consistent reads: its retry asks the same.
            if let Some(part) = left.get_mut(name).and_then(Value::as_object_mut) {
                part.remove("ConsistentRead");
            }
        }
    }
    if capacity != Capacity::None {
        answer.insert("ConsumedCapacity".into(), Value::Array(consumed));
    }
    let body = serde_json::to_vec(&answer).expect("JSON values serialize");
    Ok((respond(body, request_id), Served::Miss))
}

/// The keys of a table's part of a BatchGetItem, each with its canonical key; `None`
/// if one is not a key of the table or a key comes twice (DynamoDB refuses both).
fn batch_keys(table: &ApiTable, part: &Object) -> Option<Vec<(Value, ItemKey)>> {
    let mut seen = std::collections::HashSet::new();
    part.get("Keys")?
        .as_array()?
        .iter()
        .map(|v| {
            let key = ItemKey::of(table, Some(v), false)?;
            seen.insert(key.key.clone()).then(|| (v.clone(), key))
        })
        .collect()
}

/// Keeps what DynamoDB returned for a table's missing keys: each item under its key,
/// and the keys it neither returned nor left unprocessed as absent, unless an item
/// came back without its key (a projection left it out), which makes absence unknown.
fn fill_batch_part(
    cache: &ApiCache,
    ticket: Ticket,
    part: &BatchPart,
    returned: &[Value],
    unprocessed: Option<&Value>,
    units: f64,
) {
    let t = &part.table;
    let per_item = if returned.is_empty() {
        0.0
    } else {
        units / 2.0 / returned.len() as f64
    };
    let mut found = std::collections::HashSet::new();
    for item in returned {
        let Some(key) = ItemKey::of(t, Some(item), true) else {
            return;
        };
        let body = Bytes::from(serde_json::to_vec(item).expect("JSON values serialize"));
        let entry = EntryKey::item(t.id, &key.key, &part.projection);
        cache.fill(entry, ticket, key.of_entry(), body, per_item);
        found.insert(key);
    }
    let left: std::collections::HashSet<ItemKey> = unprocessed
        .and_then(|u| u.get("Keys")?.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|k| ItemKey::of(t, Some(k), false))
        .collect();
    for (_, key) in &part.missing {
        if !found.contains(key) && !left.contains(key) {
            let entry = EntryKey::item(t.id, &key.key, &part.projection);
            cache.fill(entry, ticket, key.of_entry(), Bytes::new(), 0.0);
        }
    }
}

/// Query of a table, a local index (filled consistently) or a global index (filled as
/// asked, kept within the staleness bound), keyed by the whole request.
pub async fn query(
    call: &Call<'_>,
    cache: &ApiCache,
    request: Object,
    body: Bytes,
) -> Result<(Response<Full<Bytes>>, Served), ApiError> {
    let Some(table) = cached_table(cache, &request, Read::Query) else {
        return Ok((call.forward(body).await?, Served::Bypass));
    };
    let index = request
        .get("IndexName")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let (scope_index, partition_attr, global) = match index.as_deref() {
        None => ("", &table.key.partition, false),
        Some(i) if table.local.iter().any(|l| l == i) => ("", &table.key.partition, false),
        Some(i) => match table.global.get(i) {
            Some(schema) if table.images => (i, &schema.partition, true),
            known => {
                cache.count(table.id, Read::Query, Served::Bypass, 0.0);
                let response = call.forward(body).await?;
                if known.is_none() && response.status().is_success() {
                    // An index added since the table was described.
                    cache.index_found(table.id);
                }
                return Ok((response, Served::Bypass));
            }
        },
    };
    let Some(partition) =
        partition_value(&request, partition_attr).and_then(keys::partition_of_json)
    else {
        cache.count(table.id, Read::Query, Served::Bypass, 0.0);
        return Ok((call.forward(body).await?, Served::Bypass));
    };
    let of = Of::Query {
        index: scope_index,
        partition: &partition,
    };
    let capacity = Capacity::of(&request);
    let canonical = canonical_without(&request, &["ConsistentRead", "ReturnConsumedCapacity"]);
    let entry_key = EntryKey::query(table.id, &canonical);
    if let Some(entry) = cache.get(&entry_key) {
        cache.count(table.id, Read::Query, Served::Hit, entry.units);
        let consumed = capacity.nothing(&table.name, index.as_deref().map(|i| (i, global)));
        return Ok((
            respond(with_capacity(&entry.body, consumed), None),
            Served::Hit,
        ));
    }
    let ticket = cache.ticket(&table);
    let mut fill = request;
    if !global {
        fill.insert("ConsistentRead".into(), Value::Bool(true));
    }
    fill.insert("ReturnConsumedCapacity".into(), capacity.for_fill().into());
    let (mut answer, request_id) = match call.fill(&fill).await? {
        Filled::Answer { answer, request_id } => (answer, request_id),
        Filled::Refused(response) => return Ok((response, Served::Bypass)),
    };
    let consumed = answer.remove("ConsumedCapacity");
    let stored = Bytes::from(serde_json::to_vec(&answer).expect("JSON values serialize"));
    let units = units_of(consumed.as_ref()) / if global { 1.0 } else { 2.0 };
    cache.fill(entry_key, ticket, of, stored.clone(), units);
    cache.count(table.id, Read::Query, Served::Miss, 0.0);
    let consumed = consumed.filter(|_| capacity != Capacity::None);
    Ok((
        respond(with_capacity(&stored, consumed), request_id),
        Served::Miss,
    ))
}

/// The value a Query's key condition gives the partition key `attr`: from
/// `KeyConditionExpression` (`attr = :v`, the name maybe through `#name`) or the legacy
/// `KeyConditions` (`EQ`).
fn partition_value<'r>(request: &'r Object, attr: &str) -> Option<&'r Value> {
    if let Some(legacy) = request.get("KeyConditions").and_then(Value::as_object) {
        let c = legacy.get(attr)?;
        if c.get("ComparisonOperator")?.as_str()? != "EQ" {
            return None;
        }
        return c.get("AttributeValueList")?.as_array()?.first();
    }
    let expression = request.get("KeyConditionExpression")?.as_str()?;
    let names = request
        .get("ExpressionAttributeNames")
        .and_then(Value::as_object);
    let values = request.get("ExpressionAttributeValues")?.as_object()?;
    let name = |token: &str| -> Option<String> {
        match token.strip_prefix('#') {
            Some(_) => names?.get(token)?.as_str().map(str::to_owned),
            None => Some(token.to_owned()),
        }
    };
    for clause in split_and(expression) {
        let clause = clause
            .trim()
            .trim_start_matches('(')
            .trim_end_matches(')')
            .trim();
        let Some((left, right)) = split_equals(clause) else {
            continue;
        };
        let (left, right) = (left.trim(), right.trim());
        let (attr_side, value_side) = if right.starts_with(':') {
            (left, right)
        } else {
            (right, left)
        };
        if value_side.starts_with(':') && name(attr_side).as_deref() == Some(attr) {
            return values.get(value_side);
        }
    }
    None
}

/// The parts of an expression between its `AND`s (any case).
fn split_and(expression: &str) -> Vec<&str> {
    let upper = expression.to_ascii_uppercase();
    let mut parts = Vec::new();
    let mut start = 0;
    let bytes = upper.as_bytes();
    let mut i = 0;
    while let Some(found) = upper[i..].find("AND") {
        let at = i + found;
        let before = at == 0 || !is_word(bytes[at - 1]);
        let after = at + 3 >= bytes.len() || !is_word(bytes[at + 3]);
        if before && after {
            parts.push(&expression[start..at]);
            start = at + 3;
        }
        i = at + 3;
    }
    parts.push(&expression[start..]);
    parts
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'#' || b == b':'
}

/// `a = b` split at its `=`, unless the comparison is another (`<=`, `>=`, `<>`).
fn split_equals(clause: &str) -> Option<(&str, &str)> {
    let at = clause.find('=')?;
    let before = clause[..at].chars().last();
    if matches!(before, Some('<' | '>' | '!')) || clause[at + 1..].contains('=') {
        return None;
    }
    Some((&clause[..at], &clause[at + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(v: Value) -> Object {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn the_partition_key_is_read_from_any_spelling_of_a_key_condition() {
        let values = json!({":v": {"S": "x"}, ":a": {"N": "1"}, ":b": {"N": "2"}});
        for expression in [
            "pk = :v",
            "pk=:v AND sk > :a",
            ":v = pk and sk between :a AND :b",
            "(pk = :v) AND (sk <= :a)",
            "sk BETWEEN :a AND :b AND pk = :v",
            "#p = :v AND begins_with(#s, :a)",
        ] {
            let r = object(json!({
                "KeyConditionExpression": expression,
                "ExpressionAttributeNames": {"#p": "pk", "#s": "sk"},
                "ExpressionAttributeValues": values,
            }));
            assert_eq!(
                partition_value(&r, "pk"),
                Some(&json!({"S": "x"})),
                "{expression}"
            );
        }
        for expression in ["sk = :v", "pk <= :v", "pkx = :v", "#q = :v"] {
            let r = object(json!({
                "KeyConditionExpression": expression,
                "ExpressionAttributeNames": {"#q": "q"},
                "ExpressionAttributeValues": values,
            }));
            assert_eq!(partition_value(&r, "pk"), None, "{expression}");
        }
        let legacy = object(json!({"KeyConditions": {
            "pk": {"ComparisonOperator": "EQ", "AttributeValueList": [{"S": "x"}]}
        }}));
        assert_eq!(partition_value(&legacy, "pk"), Some(&json!({"S": "x"})));
    }

    #[test]
    fn stored_answers_take_consumed_capacity_in_front() {
        let c = Some(json!({"CapacityUnits": 0.0}));
        assert_eq!(
            with_capacity(br#"{"Count":0}"#, c.clone()),
            br#"{"ConsumedCapacity":{"CapacityUnits":0.0},"Count":0}"#
        );
        assert_eq!(
            with_capacity(b"{}", c.clone()),
            br#"{"ConsumedCapacity":{"CapacityUnits":0.0}}"#
        );
        assert_eq!(item_answer(b"", None), b"{}");
        assert_eq!(
            item_answer(br#"{"a":{"S":"x"}}"#, None),
            br#"{"Item":{"a":{"S":"x"}}}"#
        );
        assert_eq!(
            item_answer(b"", c),
            br#"{"ConsumedCapacity":{"CapacityUnits":0.0}}"#
        );
        for answer in [
            item_answer(br#"{"a":{"N":"1.5"}}"#, Some(json!({"TableName": "t"}))),
            with_capacity(br#"{"Items":[]}"#, Some(json!(1))),
        ] {
            serde_json::from_slice::<Object>(&answer).unwrap();
        }
    }
}
