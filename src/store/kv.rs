//! The multi-version key-value store on the `_zflow_key_value_store` table.
//!
//! One item per version: partition key = encoded (namespace, key) (see [`keys`]), sort key
//! = timestamp. Every read of versions is a strongly consistent Query on the partition, so
//! it sees every acknowledged write. Namespace scans query the `namespace_index` GSI
//! instead of scanning the table; a GSI cannot be read consistently, so a scan may miss a
//! write acknowledged a moment before it (DynamoDB propagates to GSIs within about a
//! second). Callers of scans (garbage collection) tolerate that.

use std::collections::HashMap;

use aws_sdk_dynamodb::Client;
use bytes::Bytes;
use ddbcached_protocol::Versioned;

use crate::store::batch::delete_keys;
use crate::store::item::{bin, get_num, num, str, take_bin, Item, Pages};
use crate::store::keys::{
    check_kv_item, kv_partition_key, split_kv_partition_key, KV_KEY, KV_NAMESPACE,
    KV_NAMESPACE_INDEX, KV_TIMESTAMP, KV_VALUE,
};
use crate::store::StoreError;

/// The key-value store.
#[derive(Clone)]
pub struct KvStore {
    client: Client,
    table: String,
    batch_max_attempts: u32,
}

impl KvStore {
    pub fn new(client: Client, table: String, batch_max_attempts: u32) -> KvStore {
        KvStore {
            client,
            table,
            batch_max_attempts,
        }
    }

    /// Stores one version; overwrites the same (ns, key, ts).
    pub async fn put(&self, ns: &str, key: &[u8], value: Bytes, ts: i64) -> Result<(), StoreError> {
        let pk = kv_partition_key(ns, key)?;
        check_kv_item(ns, pk.len(), ts, value.len())?;
        self.client
            .put_item()
            .table_name(&self.table)
            .item(KV_KEY, bin(pk))
            .item(KV_TIMESTAMP, num(ts))
            .item(KV_VALUE, bin(value))
            .item(KV_NAMESPACE, str(ns))
            .send()
            .await
            .map_err(|e| StoreError::from_sdk("PutItem", e))?;
        Ok(())
    }

    /// The newest version, or the newest with `ts <= before`.
    pub async fn get_latest(
        &self,
        ns: &str,
        key: &[u8],
        before: Option<i64>,
    ) -> Result<Option<Versioned>, StoreError> {
        let items = self.newest(ns, key, before, "#k, #t, #v").await?;
        let Some(mut item) = items.into_iter().next() else {
            return Ok(None);
        };
        Ok(Some(Versioned {
            ts: get_num(&self.table, &item, KV_TIMESTAMP)?,
            value: take_bin(&self.table, &mut item, KV_VALUE)?,
        }))
    }

    /// The newest `limit` versions of the key, newest first, and whether they are all of
    /// them: one consistent Query, the read behind a cache fill.
    pub async fn newest_versions(
        &self,
        ns: &str,
        key: &[u8],
        limit: u32,
    ) -> Result<(Vec<(i64, Bytes)>, bool), StoreError> {
        let pk = kv_partition_key(ns, key)?;
        let out = self
            .versions(pk, None, false)
            .limit(limit.try_into().unwrap_or(i32::MAX))
            .projection_expression("#t, #v")
            .expression_attribute_names("#v", KV_VALUE)
            .send()
            .await
            .map_err(|e| StoreError::from_sdk("Query", e))?;
        let complete = out.last_evaluated_key.is_none();
        let versions = out
            .items
            .unwrap_or_default()
            .into_iter()
            .map(|mut item| {
                Ok((
                    get_num(&self.table, &item, KV_TIMESTAMP)?,
                    take_bin(&self.table, &mut item, KV_VALUE)?,
                ))
            })
            .collect::<Result<_, StoreError>>()?;
        Ok((versions, complete))
    }

    /// The largest timestamp of the key.
    pub async fn latest_ts(&self, ns: &str, key: &[u8]) -> Result<Option<i64>, StoreError> {
        let items = self.newest(ns, key, None, "#k, #t").await?;
        items
            .first()
            .map(|item| get_num(&self.table, item, KV_TIMESTAMP))
            .transpose()
    }

    /// Every timestamp of the key, ascending.
    pub async fn timestamps(&self, ns: &str, key: &[u8]) -> Result<Vec<i64>, StoreError> {
        let pk = kv_partition_key(ns, key)?;
        let mut pages = Pages::new(self.versions(pk, None, true));
        let mut out = Vec::new();
        while let Some(page) = pages.next().await? {
            for item in &page {
                out.push(get_num(&self.table, item, KV_TIMESTAMP)?);
            }
        }
        Ok(out)
    }

    /// Every version of the key with its value, ascending: what an audit compares
    /// against (`ddbcached-check`), never on a request path.
    pub async fn versions_with_values(
        &self,
        ns: &str,
        key: &[u8],
    ) -> Result<Vec<(i64, Bytes)>, StoreError> {
        let pk = kv_partition_key(ns, key)?;
        let query = self
            .versions(pk, None, true)
            .projection_expression("#k, #t, #v")
            .expression_attribute_names("#v", KV_VALUE);
        let mut pages = Pages::new(query);
        let mut out = Vec::new();
        while let Some(page) = pages.next().await? {
            for mut item in page {
                out.push((
                    get_num(&self.table, &item, KV_TIMESTAMP)?,
                    take_bin(&self.table, &mut item, KV_VALUE)?,
                ));
            }
        }
        Ok(out)
    }

    /// One (key, newest value) per key of the namespace, in no particular order.
    pub async fn scan(&self, ns: &str) -> Result<Vec<(Bytes, Bytes)>, StoreError> {
        let mut newest: HashMap<Bytes, (i64, Bytes)> = HashMap::new();
        let mut pages = Pages::new(self.namespace_query(ns, "#k, #t, #v"));
        while let Some(page) = pages.next().await? {
            for mut item in page {
                let Some(key) = self.key_of(ns, &mut item)? else {
                    continue;
                };
                let ts = get_num(&self.table, &item, KV_TIMESTAMP)?;
                let value = take_bin(&self.table, &mut item, KV_VALUE)?;
                match newest.get_mut(&key) {
                    Some(have) if have.0 >= ts => {}
                    Some(have) => *have = (ts, value),
                    None => {
                        newest.insert(key, (ts, value));
                    }
                }
            }
        }
        Ok(newest.into_iter().map(|(k, (_, v))| (k, v)).collect())
    }

    /// Every key of the namespace, each once, in no particular order.
    pub async fn scan_keys(&self, ns: &str) -> Result<Vec<Bytes>, StoreError> {
        let mut seen = std::collections::HashSet::new();
        let mut pages = Pages::new(self.namespace_query(ns, "#k"));
        while let Some(page) = pages.next().await? {
            for mut item in page {
                if let Some(key) = self.key_of(ns, &mut item)? {
                    seen.insert(key);
                }
            }
        }
        Ok(seen.into_iter().collect())
    }

    /// Deletes every version (`marker = None`), or every version except those newer than
    /// `marker` and the newest at or before it.
    pub async fn delete(
        &self,
        ns: &str,
        key: &[u8],
        marker: Option<i64>,
    ) -> Result<(), StoreError> {
        let pk = kv_partition_key(ns, key)?;
        // Newest first, so that with a marker the first item is the one to keep.
        let mut pages = Pages::new(self.versions(pk.clone(), marker, false));
        let mut keep_first = marker.is_some();
        while let Some(page) = pages.next().await? {
            let mut doomed = Vec::with_capacity(page.len());
            for item in &page {
                if std::mem::take(&mut keep_first) {
                    continue;
                }
                let ts = get_num(&self.table, item, KV_TIMESTAMP)?;
                doomed.push(Item::from([
                    (KV_KEY.to_owned(), bin(pk.clone())),
                    (KV_TIMESTAMP.to_owned(), num(ts)),
                ]));
            }
            delete_keys(&self.client, &self.table, doomed, self.batch_max_attempts).await?;
        }
        Ok(())
    }

    /// Up to one item: the newest version (`<= before` when given), consistently read.
    async fn newest(
        &self,
        ns: &str,
        key: &[u8],
        before: Option<i64>,
        projection: &str,
    ) -> Result<Vec<Item>, StoreError> {
        let pk = kv_partition_key(ns, key)?;
        let mut q = self
            .versions(pk, before, false)
            .limit(1)
            .projection_expression(projection);
        // DynamoDB rejects attribute names that the expressions do not use.
        if projection.contains("#v") {
            q = q.expression_attribute_names("#v", KV_VALUE);
        }
        let out = q
            .send()
            .await
            .map_err(|e| StoreError::from_sdk("Query", e))?;
        Ok(out.items.unwrap_or_default())
    }

    /// A consistent query of a key's versions (`<= upto` when given), projecting the
    /// timestamp; callers widen the projection as needed.
    fn versions(
        &self,
        pk: Vec<u8>,
        upto: Option<i64>,
        ascending: bool,
    ) -> aws_sdk_dynamodb::operation::query::builders::QueryFluentBuilder {
        let q = self
            .client
            .query()
            .table_name(&self.table)
            .consistent_read(true)
            .scan_index_forward(ascending)
            .projection_expression("#k, #t")
            .expression_attribute_names("#k", KV_KEY)
            .expression_attribute_names("#t", KV_TIMESTAMP)
            .expression_attribute_values(":k", bin(pk));
        match upto {
            Some(t) => q
                .key_condition_expression("#k = :k AND #t <= :t")
                .expression_attribute_values(":t", num(t)),
            None => q.key_condition_expression("#k = :k"),
        }
    }

    /// A query of the namespace's items on the GSI.
    fn namespace_query(
        &self,
        ns: &str,
        projection: &str,
    ) -> aws_sdk_dynamodb::operation::query::builders::QueryFluentBuilder {
        let q = self
            .client
            .query()
            .table_name(&self.table)
            .index_name(KV_NAMESPACE_INDEX)
            .key_condition_expression("#n = :n")
            .projection_expression(projection)
            .expression_attribute_names("#n", KV_NAMESPACE)
            .expression_attribute_names("#k", KV_KEY)
            .expression_attribute_values(":n", str(ns));
        if projection.contains("#t") {
            q.expression_attribute_names("#t", KV_TIMESTAMP)
                .expression_attribute_names("#v", KV_VALUE)
        } else {
            q
        }
    }

    /// The user key of a GSI item of namespace `ns`; `None` (with a warning) for an item
    /// whose partition key is not in ddbcached's encoding, such as one written by
    /// zio-flow's own backend.
    fn key_of(&self, ns: &str, item: &mut Item) -> Result<Option<Bytes>, StoreError> {
        let pk = take_bin(&self.table, item, KV_KEY)?;
        match split_kv_partition_key(&pk) {
            Some((n, key)) if n == ns.as_bytes() => Ok(Some(pk.slice_ref(key))),
            _ => {
                tracing::warn!(
                    table = %self.table,
                    "skipping an item of namespace {ns:?} whose key is not in ddbcached's encoding"
                );
                Ok(None)
            }
        }
    }
}
