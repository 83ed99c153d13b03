//! DynamoDB keys and item sizes.
//!
//! The key-value table has a single binary partition key for both namespace and key.
//! zio-flow's own backend concatenates them with no separator, so namespace "ab" + key "c"
//! and namespace "a" + key "bc" collide. ddbcached prefixes the namespace with its length:
//!
//! ```text
//! zflow_kv_key = u16 big-endian byte length of ns | ns (UTF-8) | key
//! ```
//!
//! Decoding reads the length and splits there, so distinct pairs give distinct keys and
//! the key can be recovered from an item (the `namespace_index` GSI returns it). DynamoDB
//! caps a partition key at 2048 bytes, so the length always fits in two bytes.
//!
//! Sizes follow DynamoDB's rules: an item's size is the sum of its attribute names' and
//! values' lengths, a number taking one byte per two significant digits plus one.

use crate::store::StoreError;

/// DynamoDB's largest item, names and values together (400 KB).
pub const MAX_ITEM_BYTES: usize = 400 * 1024;
/// DynamoDB's largest partition key value.
pub const MAX_PARTITION_KEY_BYTES: usize = 2048;

pub const KV_KEY: &str = "zflow_kv_key";
pub const KV_TIMESTAMP: &str = "zflow_kv_timestamp";
pub const KV_VALUE: &str = "zflow_kv_value";
pub const KV_NAMESPACE: &str = "zflow_kv_namespace";
pub const KV_NAMESPACE_INDEX: &str = "namespace_index";

pub const LOG_TOPIC: &str = "zflow_idx_topic";
pub const LOG_INDEX: &str = "zflow_idx_index";
pub const LOG_VALUE: &str = "zflow_idx_value";
/// The index of the item that holds a topic's counter (its value is a number).
pub const LOG_COUNTER_INDEX: i64 = -1;

/// Encodes (namespace, key) into the `zflow_kv_key` partition key.
pub fn kv_partition_key(ns: &str, key: &[u8]) -> Result<Vec<u8>, StoreError> {
    let len = 2 + ns.len() + key.len();
    if len > MAX_PARTITION_KEY_BYTES {
        return Err(StoreError::InvalidArgument(format!(
            "namespace ({} bytes) and key ({} bytes) are too long: together they must fit in {} bytes",
            ns.len(),
            key.len(),
            MAX_PARTITION_KEY_BYTES - 2
        )));
    }
    let mut out = Vec::with_capacity(len);
    // Cannot truncate: ns.len() <= MAX_PARTITION_KEY_BYTES < u16::MAX, checked above.
    out.extend_from_slice(&(ns.len() as u16).to_be_bytes());
    out.extend_from_slice(ns.as_bytes());
    out.extend_from_slice(key);
    Ok(out)
}

/// Splits a `zflow_kv_key` into (namespace bytes, key); `None` if it is not of our format.
pub fn split_kv_partition_key(pk: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u16::from_be_bytes(pk.get(..2)?.try_into().ok()?) as usize;
    let rest = &pk[2..];
    (rest.len() > len).then(|| rest.split_at(len))
}

/// Checks that a topic can be a partition key.
pub fn check_topic(topic: &str) -> Result<(), StoreError> {
    if topic.len() > MAX_PARTITION_KEY_BYTES {
        return Err(StoreError::InvalidArgument(format!(
            "topic is {} bytes; at most {MAX_PARTITION_KEY_BYTES} allowed",
            topic.len()
        )));
    }
    Ok(())
}

/// The size DynamoDB counts for a number attribute's value.
pub fn number_size(n: i64) -> usize {
    let digits = n.unsigned_abs().to_string();
    let significant = digits.trim_end_matches('0').len().max(1);
    significant.div_ceil(2) + 1 + usize::from(n < 0)
}

/// Size of a key-value item, or an error when it is over the limit.
pub fn check_kv_item(ns: &str, pk_len: usize, ts: i64, value_len: usize) -> Result<(), StoreError> {
    let size = KV_KEY.len()
        + pk_len
        + KV_TIMESTAMP.len()
        + number_size(ts)
        + KV_VALUE.len()
        + value_len
        + KV_NAMESPACE.len()
        + ns.len();
    check_size(size)
}

/// Size of a log entry item, or an error when it is over the limit.
pub fn check_log_item(topic: &str, index: i64, value_len: usize) -> Result<(), StoreError> {
    let size = LOG_TOPIC.len()
        + topic.len()
        + LOG_INDEX.len()
        + number_size(index)
        + LOG_VALUE.len()
        + value_len;
    check_size(size)
}

fn check_size(size: usize) -> Result<(), StoreError> {
    if size > MAX_ITEM_BYTES {
        return Err(StoreError::ItemTooLarge {
            size,
            limit: MAX_ITEM_BYTES,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_boundary_is_unambiguous() {
        let a = kv_partition_key("ab", b"c").unwrap();
        let b = kv_partition_key("a", b"bc").unwrap();
        assert_ne!(a, b);
        assert_eq!(split_kv_partition_key(&a), Some((&b"ab"[..], &b"c"[..])));
        assert_eq!(split_kv_partition_key(&b), Some((&b"a"[..], &b"bc"[..])));
    }

    #[test]
    fn foreign_keys_do_not_split() {
        assert_eq!(split_kv_partition_key(b""), None);
        assert_eq!(split_kv_partition_key(b"\x00\x05ab"), None);
        // A zero-length key is not ours either: keys are non-empty.
        assert_eq!(split_kv_partition_key(b"\x00\x02ab"), None);
    }

    #[test]
    fn partition_key_length_is_checked() {
        let ns = "n".repeat(1000);
        assert!(kv_partition_key(&ns, &[1; 1046]).is_ok());
        assert!(matches!(
            kv_partition_key(&ns, &[1; 1047]),
            Err(StoreError::InvalidArgument(_))
        ));
    }

    #[test]
    fn number_sizes() {
        assert_eq!(number_size(0), 2);
        assert_eq!(number_size(1), 2);
        assert_eq!(number_size(100), 2);
        assert_eq!(number_size(123), 3);
        assert_eq!(number_size(-1), 3);
        assert_eq!(number_size(i64::MIN), 12);
    }
}
