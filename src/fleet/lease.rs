//! Relay leases, kept in DynamoDB the way the Kinesis Client Library keeps its own: one
//! item per (table, slot) holding its owner, a counter the owner bumps to renew it, an
//! epoch bumped at each change of owner, and the owner's checkpoint on each shard.
//!
//! Every change is a conditional write on the counter last seen, so two daemons can
//! never both believe a take-over succeeded, and a deposed owner (a paused process, a
//! partitioned host) can neither renew nor move the checkpoints. Whether a lease has
//! expired is judged on the observer's own monotonic clock (the counter has not moved
//! for `lease_ms` since it was first seen at that value): no clock is compared across
//! hosts.

use std::collections::{BTreeMap, HashMap};

use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_dynamodb::Client;

use crate::store::StoreError;

/// The lease table's partition key: `<data table>/<slot>`.
pub const LEASE_KEY: &str = "lease";
const OWNER: &str = "owner";
const COUNTER: &str = "counter";
const EPOCH: &str = "epoch";
const STREAM_ARN: &str = "stream_arn";
const CHECKPOINTS: &str = "checkpoints";

/// One lease as last read or written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub id: String,
    /// The holder's daemon id; empty: released.
    pub owner: String,
    pub counter: u64,
    pub epoch: u64,
    /// The stream the checkpoints belong to.
    pub stream_arn: Option<String>,
    /// Per shard, the last sequence number the holder published.
    pub checkpoints: BTreeMap<String, String>,
}

/// The lease table.
#[derive(Clone)]
pub struct Leases {
    client: Client,
    table: String,
}

/// The id of a table's lease in `slot`.
pub fn lease_id(table_name: &str, slot: u32) -> String {
    format!("{table_name}/{slot}")
}

impl Leases {
    pub fn new(client: Client, table: String) -> Leases {
        Leases { client, table }
    }

    /// The lease table's name, which also names the fleet.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The lease as it stands (strongly consistent), if it exists.
    pub async fn read(&self, id: &str) -> Result<Option<Lease>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(LEASE_KEY, AttributeValue::S(id.to_owned()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| StoreError::from_sdk("GetItem", e))?;
        out.item.map(|item| parse(&self.table, &item)).transpose()
    }

    /// Creates the lease, held by `owner` at epoch 1; `None` if it exists already.
    pub async fn create(&self, id: &str, owner: &str) -> Result<Option<Lease>, StoreError> {
        let lease = Lease {
            id: id.to_owned(),
            owner: owner.to_owned(),
            counter: 1,
            epoch: 1,
            stream_arn: None,
            checkpoints: BTreeMap::new(),
        };
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .item(LEASE_KEY, AttributeValue::S(id.to_owned()))
            .item(OWNER, AttributeValue::S(owner.to_owned()))
            .item(COUNTER, number(1))
            .item(EPOCH, number(1))
            .condition_expression("attribute_not_exists(#k)")
            .expression_attribute_names("#k", LEASE_KEY)
            .send()
            .await;
        match result {
            Ok(_) => Ok(Some(lease)),
            Err(e) if lost_race(&e) => Ok(None),
            Err(e) => Err(StoreError::from_sdk("PutItem", e)),
        }
    }

    /// Takes `seen` over for `owner` (a new epoch, keeping its checkpoints); `None` if
    /// its counter moved since it was read.
    pub async fn take(&self, seen: &Lease, owner: &str) -> Result<Option<Lease>, StoreError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(LEASE_KEY, AttributeValue::S(seen.id.clone()))
            .update_expression("SET #o = :me, #c = :next, #e = :epoch")
            .condition_expression("#c = :seen")
            .expression_attribute_names("#o", OWNER)
            .expression_attribute_names("#c", COUNTER)
            .expression_attribute_names("#e", EPOCH)
            .expression_attribute_values(":me", AttributeValue::S(owner.to_owned()))
            .expression_attribute_values(":seen", number(seen.counter))
            .expression_attribute_values(":next", number(seen.counter + 1))
            .expression_attribute_values(":epoch", number(seen.epoch + 1))
            .send()
            .await;
        match result {
            Ok(_) => Ok(Some(Lease {
                owner: owner.to_owned(),
                counter: seen.counter + 1,
                epoch: seen.epoch + 1,
                ..seen.clone()
            })),
            Err(e) if lost_race(&e) => Ok(None),
            Err(e) => Err(StoreError::from_sdk("UpdateItem", e)),
        }
    }

    /// Renews `held` and records its checkpoints (released instead if `release`);
    /// `None` if it is no longer held as it was (someone took it over).
    pub async fn renew(
        &self,
        held: &Lease,
        stream_arn: &str,
        checkpoints: &BTreeMap<String, String>,
        release: bool,
    ) -> Result<Option<Lease>, StoreError> {
        let owner = if release { "" } else { held.owner.as_str() };
        let map: HashMap<String, AttributeValue> = checkpoints
            .iter()
            .map(|(shard, seq)| (shard.clone(), AttributeValue::S(seq.clone())))
            .collect();
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(LEASE_KEY, AttributeValue::S(held.id.clone()))
            .update_expression("SET #o = :owner, #c = :next, #a = :arn, #p = :checkpoints")
            .condition_expression("#c = :seen AND #o = :me")
            .expression_attribute_names("#o", OWNER)
            .expression_attribute_names("#c", COUNTER)
            .expression_attribute_names("#a", STREAM_ARN)
            .expression_attribute_names("#p", CHECKPOINTS)
            .expression_attribute_values(":owner", AttributeValue::S(owner.to_owned()))
            .expression_attribute_values(":me", AttributeValue::S(held.owner.clone()))
            .expression_attribute_values(":seen", number(held.counter))
            .expression_attribute_values(":next", number(held.counter + 1))
            .expression_attribute_values(":arn", AttributeValue::S(stream_arn.to_owned()))
            .expression_attribute_values(":checkpoints", AttributeValue::M(map))
            .send()
            .await;
        match result {
            Ok(_) => Ok(Some(Lease {
                owner: owner.to_owned(),
                counter: held.counter + 1,
                stream_arn: Some(stream_arn.to_owned()),
                checkpoints: checkpoints.clone(),
                ..held.clone()
            })),
            Err(e) if lost_race(&e) => Ok(None),
            Err(e) => Err(StoreError::from_sdk("UpdateItem", e)),
        }
    }
}

fn number(n: u64) -> AttributeValue {
    AttributeValue::N(n.to_string())
}

/// Whether a conditional write failed its condition (another daemon got there first).
fn lost_race<E, R>(e: &SdkError<E, R>) -> bool
where
    E: aws_sdk_dynamodb::error::ProvideErrorMetadata,
{
    matches!(e, SdkError::ServiceError(s) if s.err().code() == Some("ConditionalCheckFailedException"))
}

fn parse(table: &str, item: &HashMap<String, AttributeValue>) -> Result<Lease, StoreError> {
    let bad = |detail: String| StoreError::Corrupt {
        table: table.to_owned(),
        detail,
    };
    let s = |name: &str| match item.get(name) {
        Some(AttributeValue::S(v)) => Some(v.clone()),
        _ => None,
    };
    let n = |name: &str| match item.get(name) {
        Some(AttributeValue::N(v)) => v.parse::<u64>().ok(),
        _ => None,
    };
    let id = s(LEASE_KEY).ok_or_else(|| bad("a lease without its key".into()))?;
    let checkpoints = match item.get(CHECKPOINTS) {
        Some(AttributeValue::M(m)) => m
            .iter()
            .filter_map(|(shard, v)| match v {
                AttributeValue::S(seq) => Some((shard.clone(), seq.clone())),
                _ => None,
            })
            .collect(),
        _ => BTreeMap::new(),
    };
    Ok(Lease {
        owner: s(OWNER).unwrap_or_default(),
        counter: n(COUNTER).ok_or_else(|| bad(format!("lease {id} has no counter")))?,
        epoch: n(EPOCH).ok_or_else(|| bad(format!("lease {id} has no epoch")))?,
        stream_arn: s(STREAM_ARN),
        checkpoints,
        id,
    })
}
