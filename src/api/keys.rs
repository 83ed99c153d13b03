//! Item keys as DynamoDB compares them, whoever writes them: a request's JSON
//! (`{"N": "7.0"}`, binary in base64) and a stream record's image both give the same
//! bytes for the same item, so `7`, `7.0` and `7e0` are one key and a change read from
//! the stream finds what a request cached.

use std::borrow::Cow;

use serde_json::{Map, Value};

use crate::cache::{CacheKey, KeyParts};
use crate::store::keys::{kv_partition_key, split_kv_partition_key};
use crate::store::StoreTable;
use crate::stream::api::{Attr, Image};

/// Which attributes make a key: a partition key and, for a composite key, a sort key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySchema {
    pub partition: String,
    pub sort: Option<String>,
}

/// One key attribute's value, as DynamoDB compares it.
enum Scalar<'a> {
    S(&'a str),
    N(String),
    B(Cow<'a, [u8]>),
}

impl Scalar<'_> {
    /// Appends a self-delimiting encoding: a type tag, the length, the bytes.
    fn encode(&self, out: &mut Vec<u8>) {
        let (tag, bytes): (u8, &[u8]) = match self {
            Scalar::S(s) => (b'S', s.as_bytes()),
            Scalar::N(n) => (b'N', n.as_bytes()),
            Scalar::B(b) => (b'B', b),
        };
        out.push(tag);
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(bytes);
    }
}

/// A key attribute of a request (`{"S": ...}`, `{"N": ...}`, `{"B": base64}`); `None`
/// for anything DynamoDB would not take as a key (it answers that request itself).
fn scalar_of_json(value: &Value) -> Option<Scalar<'_>> {
    let (kind, v) = value.as_object().filter(|o| o.len() == 1)?.iter().next()?;
    let v = v.as_str()?;
    match kind.as_str() {
        "S" => Some(Scalar::S(v)),
        "N" => canonical_number(v).map(Scalar::N),
        "B" => aws_smithy_types::base64::decode(v)
            .ok()
            .map(|b| Scalar::B(Cow::Owned(b))),
        _ => None,
    }
}

fn scalar_of_attr(value: &Attr) -> Option<Scalar<'_>> {
    match value {
        Attr::S(s) => Some(Scalar::S(s)),
        Attr::N(n) => canonical_number(n).map(Scalar::N),
        Attr::B(b) => Some(Scalar::B(Cow::Borrowed(b))),
        Attr::Other => None,
    }
}

/// The encodings of `parts`, one after the other; `None` if one is missing.
fn encode<'a>(parts: impl IntoIterator<Item = Option<Scalar<'a>>>) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(64);
    for part in parts {
        part?.encode(&mut out);
    }
    Some(out)
}

/// The key `schema` names, each attribute's value read by `scalar`.
fn key_of<'a>(schema: &KeySchema, scalar: impl Fn(&str) -> Option<Scalar<'a>>) -> Option<Vec<u8>> {
    let sort = schema.sort.as_deref().map(&scalar);
    encode(std::iter::once(scalar(&schema.partition)).chain(sort))
}

/// The canonical bytes of the key `schema` names in `item` (a request's `Key`, or a
/// whole item: other attributes are ignored). `None` if a key attribute is missing or
/// not a valid key value.
pub fn of_json(schema: &KeySchema, item: &Map<String, Value>) -> Option<Vec<u8>> {
    key_of(schema, |attr| scalar_of_json(item.get(attr)?))
}

/// [`of_json`] for a stream record's image.
pub fn of_image(schema: &KeySchema, image: &Image) -> Option<Vec<u8>> {
    key_of(schema, |attr| scalar_of_attr(image.get(attr)?))
}

/// The canonical bytes of the partition key alone, from a request's value.
pub fn partition_of_json(value: &Value) -> Option<Vec<u8>> {
    encode([scalar_of_json(value)])
}

/// The canonical bytes of the partition key `schema` names in a stream image.
pub fn partition_of_image(schema: &KeySchema, image: &Image) -> Option<Vec<u8>> {
    encode([image.get(&schema.partition).and_then(scalar_of_attr)])
}

/// The canonical partition of a stores' key, in the table the store keeps it in (a
/// key-value key's `zflow_kv_key`, a topic's `zflow_idx_topic`); `None` for a key the
/// store would refuse.
pub fn partition_of_store_key(key: &CacheKey) -> Option<Vec<u8>> {
    match key.parts() {
        KeyParts::Kv { ns, key } => {
            let pk = kv_partition_key(ns, key).ok()?;
            encode([Some(Scalar::B(Cow::Owned(pk)))])
        }
        KeyParts::Log { topic } => encode([Some(Scalar::S(topic))]),
    }
}

/// The stores' key whose items a canonical partition of `store`'s table holds: the
/// inverse of [`partition_of_store_key`]. `None` for a partition no store key has (an
/// item written through the front that the store could not have written).
pub fn store_key_of_partition(store: StoreTable, partition: &[u8]) -> Option<CacheKey> {
    let (&tag, rest) = partition.split_first()?;
    let (len, value) = rest.split_at_checked(4)?;
    if value.len() != u32::from_be_bytes(len.try_into().ok()?) as usize {
        return None;
    }
    match (store, tag) {
        (StoreTable::Kv, b'B') => {
            let (ns, key) = split_kv_partition_key(value)?;
            Some(CacheKey::kv(std::str::from_utf8(ns).ok()?, key))
        }
        (StoreTable::Log, b'S') => Some(CacheKey::log(std::str::from_utf8(value).ok()?)),
        _ => None,
    }
}

/// A number in one spelling per value: significant digits without leading or trailing
/// zeros and a decimal exponent (`1.50`, `15e-1` and `+1.5` are all `15E0`, read as
/// 0.15 × 10¹); zero is `0`. `None` for anything that is not a decimal number.
pub fn canonical_number(text: &str) -> Option<String> {
    let (negative, rest) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(at) => (&rest[..at], rest[at + 1..].parse::<i64>().ok()?),
        None => (rest, 0),
    };
    let (whole, fraction) = match mantissa.split_once('.') {
        Some((w, f)) => (w, f),
        None => (mantissa, ""),
    };
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.len() + fraction.len() == 0 || !all_digits(whole) || !all_digits(fraction) {
        return None;
    }
    let digits: String = whole.chars().chain(fraction.chars()).collect();
    let leading = digits.len() - digits.trim_start_matches('0').len();
    let significant = digits.trim_matches('0');
    if significant.is_empty() {
        return Some("0".into());
    }
    // The value is 0.<significant> × 10^point.
    let point = exponent
        .checked_add(whole.len() as i64)?
        .checked_sub(leading as i64)?;
    Some(format!(
        "{}{significant}E{point}",
        if negative { "-" } else { "" }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use serde_json::json;

    #[test]
    fn a_stores_key_and_its_partition_name_each_other() {
        for (store, key) in [
            (StoreTable::Kv, CacheKey::kv("ns", b"k\x00\xff")),
            (StoreTable::Kv, CacheKey::kv("", b"k")),
            (StoreTable::Log, CacheKey::log("topic")),
        ] {
            let partition = partition_of_store_key(&key).unwrap();
            assert!(store_key_of_partition(store, &partition) == Some(key));
        }
        // What the front may be sent and no store writes: another type, a key without
        // the namespace's length, a truncated encoding.
        let topic = partition_of_store_key(&CacheKey::log("t")).unwrap();
        assert!(store_key_of_partition(StoreTable::Kv, &topic).is_none());
        let short = encode([Some(Scalar::B(Cow::Borrowed(b"\x00")))]).unwrap();
        assert!(store_key_of_partition(StoreTable::Kv, &short).is_none());
        assert!(store_key_of_partition(StoreTable::Log, &topic[..topic.len() - 1]).is_none());
    }

    #[test]
    fn numbers_that_dynamodb_holds_equal_have_one_spelling() {
        let same = |a: &str, b: &str| {
            assert_eq!(canonical_number(a), canonical_number(b), "{a} vs {b}");
            assert!(canonical_number(a).is_some(), "{a}");
        };
        same("7", "7.0");
        same("7", "7e0");
        same("7", "0.7E1");
        same("7", "+007.000");
        same("1.5", "1.50");
        same("150", "1.5e2");
        same("-0.001", "-1E-3");
        same("0", "-0.0");
        same("0", "0e9");
        assert_ne!(canonical_number("7"), canonical_number("-7"));
        assert_ne!(canonical_number("7"), canonical_number("70"));
        assert_ne!(canonical_number("0.7"), canonical_number("7"));
        for bad in [
            "",
            "-",
            ".",
            "1.2.3",
            "1e",
            "e1",
            "0x10",
            "1,5",
            " 1",
            "NaN",
            "1e99999999999999999999",
        ] {
            assert_eq!(canonical_number(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_request_and_a_stream_image_give_one_key() {
        let schema = KeySchema {
            partition: "pk".into(),
            sort: Some("sk".into()),
        };
        let request = json!({"pk": {"B": "AAEC"}, "sk": {"N": "7.0"}, "other": {"S": "x"}});
        let image = Image::from([
            ("pk".to_owned(), Attr::B(Bytes::from_static(&[0, 1, 2]))),
            ("sk".to_owned(), Attr::N("7".into())),
        ]);
        let from_request = of_json(&schema, request.as_object().unwrap()).unwrap();
        assert_eq!(Some(from_request), of_image(&schema, &image));
        // Keys that differ only where one attribute ends and the next begins stay apart.
        let s = KeySchema {
            partition: "a".into(),
            sort: Some("b".into()),
        };
        let one = of_json(
            &s,
            json!({"a": {"S": "xy"}, "b": {"S": "z"}})
                .as_object()
                .unwrap(),
        );
        let two = of_json(
            &s,
            json!({"a": {"S": "x"}, "b": {"S": "yz"}})
                .as_object()
                .unwrap(),
        );
        assert_ne!(one, two);
        // A missing or mistyped key attribute makes no key.
        assert_eq!(
            of_json(&s, json!({"a": {"S": "x"}}).as_object().unwrap()),
            None
        );
        assert_eq!(
            of_json(
                &s,
                json!({"a": {"BOOL": true}, "b": {"S": "z"}})
                    .as_object()
                    .unwrap()
            ),
            None
        );
    }
}
