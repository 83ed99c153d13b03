//! Creating and checking the tables: the two data tables, with exactly the layout of
//! zio-flow's DynamoDB backend (so that its operators' tooling still applies), plus
//! on-demand billing and a stream of new and old images for the invalidation tailer; and
//! the small lease table of fleet mode ([`crate::fleet::lease`]).

use std::time::Duration;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, IndexStatus, KeySchemaElement, KeyType,
    Projection, ProjectionType, ScalarAttributeType, StreamSpecification, StreamViewType,
    TableDescription, TableStatus,
};
use aws_sdk_dynamodb::Client;

use crate::config::DynamoConfig;
use crate::fleet::lease::LEASE_KEY;
use crate::store::keys::{
    KV_KEY, KV_NAMESPACE, KV_NAMESPACE_INDEX, KV_TIMESTAMP, KV_VALUE, LOG_INDEX, LOG_TOPIC,
};
use crate::store::StoreError;

/// How long `init-tables` waits for a new table to become ACTIVE.
const ACTIVE_TIMEOUT: Duration = Duration::from_secs(300);

/// What is wrong with the tables.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error(transparent)]
    Dynamo(#[from] StoreError),
    #[error("table {table} does not exist; create it with `ddbcached init-tables`")]
    Missing { table: String },
    #[error("table {table} exists with a different layout: {difference}")]
    Mismatch { table: String, difference: String },
    #[error("table {table} did not become ACTIVE within {0:?}", ACTIVE_TIMEOUT)]
    NotActive { table: String },
}

/// One table's required layout.
struct Layout {
    hash: (&'static str, ScalarAttributeType),
    range: Option<(&'static str, ScalarAttributeType)>,
    namespace_index: bool,
    /// A stream of new and old images (the data tables: their changes are tailed).
    stream: bool,
}

const KV_LAYOUT: Layout = Layout {
    hash: (KV_KEY, ScalarAttributeType::B),
    range: Some((KV_TIMESTAMP, ScalarAttributeType::N)),
    namespace_index: true,
    stream: true,
};

const LOG_LAYOUT: Layout = Layout {
    hash: (LOG_TOPIC, ScalarAttributeType::S),
    range: Some((LOG_INDEX, ScalarAttributeType::N)),
    namespace_index: false,
    stream: true,
};

const LEASE_LAYOUT: Layout = Layout {
    hash: (LEASE_KEY, ScalarAttributeType::S),
    range: None,
    namespace_index: false,
    stream: false,
};

/// The tables and their layouts: the data tables only if `stores`, the lease table only
/// if `leases`.
fn layouts(config: &DynamoConfig, stores: bool, leases: bool) -> Vec<(&String, &'static Layout)> {
    let mut all = Vec::new();
    if stores {
        all.push((&config.kv_table, &KV_LAYOUT));
        all.push((&config.log_table, &LOG_LAYOUT));
    }
    if leases {
        all.push((&config.lease_table, &LEASE_LAYOUT));
    }
    all
}

/// Creates whichever table is missing (the lease table included, so that fleet mode can
/// be turned on later), waits until all are ACTIVE, and checks that existing ones have
/// the required layout. Running it again changes nothing.
pub async fn init_tables(client: &Client, config: &DynamoConfig) -> Result<(), TableError> {
    for (table, layout) in layouts(config, true, true) {
        match describe(client, table).await? {
            Some(desc) => check_layout(table, layout, &desc)?,
            None => create(client, table, layout).await?,
        }
        wait_active(client, table, layout).await?;
    }
    Ok(())
}

/// Checks that the tables exist with the required layout (done by `serve` at start): the
/// data tables when the daemon serves the stores (`stores`), the lease table in fleet
/// mode (`leases`).
pub async fn check_tables(
    client: &Client,
    config: &DynamoConfig,
    stores: bool,
    leases: bool,
) -> Result<(), TableError> {
    for (table, layout) in layouts(config, stores, leases) {
        let desc = describe(client, table)
            .await?
            .ok_or_else(|| TableError::Missing {
                table: table.clone(),
            })?;
        check_layout(table, layout, &desc)?;
    }
    Ok(())
}

async fn describe(client: &Client, table: &str) -> Result<Option<TableDescription>, TableError> {
    match client.describe_table().table_name(table).send().await {
        Ok(out) => Ok(out.table),
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_resource_not_found_exception()) =>
        {
            Ok(None)
        }
        Err(e) => Err(StoreError::from_sdk("DescribeTable", e).into()),
    }
}

async fn create(client: &Client, table: &str, layout: &Layout) -> Result<(), TableError> {
    let attr = |(name, ty): (&str, ScalarAttributeType)| {
        AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(ty)
            .build()
            .map_err(invalid)
    };
    let key = |name: &str, ty: KeyType| {
        KeySchemaElement::builder()
            .attribute_name(name)
            .key_type(ty)
            .build()
            .map_err(invalid)
    };
    let mut req = client
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attr(layout.hash.clone())?)
        .key_schema(key(layout.hash.0, KeyType::Hash)?);
    if let Some(range) = &layout.range {
        req = req
            .attribute_definitions(attr(range.clone())?)
            .key_schema(key(range.0, KeyType::Range)?);
    }
    if layout.stream {
        req = req.stream_specification(
            StreamSpecification::builder()
                .stream_enabled(true)
                .stream_view_type(StreamViewType::NewAndOldImages)
                .build()
                .map_err(invalid)?,
        );
    }
    if layout.namespace_index {
        req = req
            .attribute_definitions(attr((KV_NAMESPACE, ScalarAttributeType::S))?)
            .global_secondary_indexes(
                GlobalSecondaryIndex::builder()
                    .index_name(KV_NAMESPACE_INDEX)
                    .key_schema(key(KV_NAMESPACE, KeyType::Hash)?)
                    .projection(
                        Projection::builder()
                            .projection_type(ProjectionType::Include)
                            .non_key_attributes(KV_VALUE)
                            .build(),
                    )
                    .build()
                    .map_err(invalid)?,
            );
    }
    match req.send().await {
        Ok(_) => {
            tracing::info!(table, "created table");
            Ok(())
        }
        // Another process created it in the meantime: fine, its layout is checked next.
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_resource_in_use_exception()) =>
        {
            Ok(())
        }
        Err(e) => Err(StoreError::from_sdk("CreateTable", e).into()),
    }
}

async fn wait_active(client: &Client, table: &str, layout: &Layout) -> Result<(), TableError> {
    let deadline = tokio::time::Instant::now() + ACTIVE_TIMEOUT;
    loop {
        let desc = describe(client, table)
            .await?
            .ok_or_else(|| TableError::Missing {
                table: table.into(),
            })?;
        check_layout(table, layout, &desc)?;
        let indexes_active = desc
            .global_secondary_indexes()
            .iter()
            .all(|i| i.index_status() == Some(&IndexStatus::Active));
        if desc.table_status() == Some(&TableStatus::Active) && indexes_active {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(TableError::NotActive {
                table: table.into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Compares a table's keys, key types and (for the key-value table) its namespace index
/// with the layout; the error names the first difference.
fn check_layout(table: &str, layout: &Layout, desc: &TableDescription) -> Result<(), TableError> {
    let mismatch = |difference: String| TableError::Mismatch {
        table: table.into(),
        difference,
    };
    let key_of = |keys: &[KeySchemaElement], ty: KeyType| {
        keys.iter()
            .find(|k| k.key_type() == &ty)
            .map(|k| k.attribute_name().to_owned())
    };
    let type_of = |name: &str| {
        desc.attribute_definitions()
            .iter()
            .find(|a| a.attribute_name() == name)
            .map(|a| a.attribute_type().as_str().to_owned())
    };
    for (role, ty, want) in [
        ("partition key", KeyType::Hash, Some(&layout.hash)),
        ("sort key", KeyType::Range, layout.range.as_ref()),
    ] {
        let have = key_of(desc.key_schema(), ty);
        let Some((want_name, want_type)) = want else {
            if let Some(have) = have {
                return Err(mismatch(format!("{role} is {have}, ddbcached needs none")));
            }
            continue;
        };
        if have.as_deref() != Some(*want_name) {
            return Err(mismatch(format!(
                "{role} is {}, ddbcached needs {want_name} ({})",
                have.as_deref().unwrap_or("absent"),
                want_type.as_str()
            )));
        }
        let have_type = type_of(want_name);
        if have_type.as_deref() != Some(want_type.as_str()) {
            return Err(mismatch(format!(
                "{role} {want_name} has type {}, ddbcached needs {}",
                have_type.as_deref().unwrap_or("unknown"),
                want_type.as_str()
            )));
        }
    }
    if layout.namespace_index {
        let index = desc
            .global_secondary_indexes()
            .iter()
            .find(|i| i.index_name() == Some(KV_NAMESPACE_INDEX))
            .ok_or_else(|| {
                mismatch(format!(
                    "global secondary index {KV_NAMESPACE_INDEX} is missing"
                ))
            })?;
        let hash = key_of(index.key_schema(), KeyType::Hash);
        if hash.as_deref() != Some(KV_NAMESPACE) {
            return Err(mismatch(format!(
                "index {KV_NAMESPACE_INDEX} is keyed on {}, ddbcached needs {KV_NAMESPACE}",
                hash.as_deref().unwrap_or("nothing")
            )));
        }
        let projection = index.projection();
        let projects_value = projection.is_some_and(|p| {
            p.projection_type() == Some(&ProjectionType::All)
                || p.non_key_attributes().iter().any(|a| a == KV_VALUE)
        });
        if !projects_value {
            return Err(mismatch(format!(
                "index {KV_NAMESPACE_INDEX} does not project {KV_VALUE}"
            )));
        }
    }
    Ok(())
}

fn invalid(e: impl std::fmt::Display) -> TableError {
    TableError::Dynamo(StoreError::InvalidArgument(e.to_string()))
}
