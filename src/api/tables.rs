//! The tables the DynamoDB API front caches (`dynamodb_api.tables`), as DynamoDB
//! describes them at start: their keys, their indexes, and whether their stream carries
//! what the cache needs. A named table without a stream is refused: its changes made
//! elsewhere could never be seen. `["*"]` stands for every table that has a stream when
//! the daemon starts. A table whose stream is replaced while the daemon runs (deleted and
//! re-created, maybe with other keys and indexes), or that gained an index, is described
//! again by the describer of `descriptions`, beside this module.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::{KeySchemaElement, KeyType, StreamViewType};

use super::keys::KeySchema;
use crate::store::StoreTable;
use crate::stream::sink::Tailed;

/// A cached table, by its place in `dynamodb_api.tables`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TableId(pub u16);

impl Tailed for TableId {
    /// After the stores' two tables.
    fn slot(self) -> usize {
        StoreTable::ALL.len() + self.0 as usize
    }
}

/// What the front knows of a cached table.
#[derive(Clone, Debug)]
pub struct ApiTable {
    pub id: TableId,
    pub name: String,
    pub key: KeySchema,
    /// Local secondary indexes: they share the table's partitions.
    pub local: Vec<String>,
    /// Global secondary indexes and their keys.
    pub global: HashMap<String, KeySchema>,
    /// The stream carries old and new images, so that a change shows which index
    /// partitions an item left and entered; without them a global index's results are
    /// not cached.
    pub images: bool,
    /// How many descriptions asked for (on a replaced stream, an index found) this one
    /// accounts for: one read after the table was re-created has a higher one (the
    /// cache sets it).
    pub generation: u64,
}

/// Why a named table cannot be cached.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("dynamodb_api.tables names {0}, which has no stream: enable one (NEW_AND_OLD_IMAGES) or leave it out")]
    NoStream(String),
    #[error("dynamodb_api.tables names {table}, which cannot be described: {reason}")]
    Describe { table: String, reason: String },
}

/// What `dynamodb_api.tables` holds for every table that has a stream.
pub const EVERY_TABLE: &str = "*";

/// Describes every table in `names`, in order; for `["*"]`, every table of the account
/// and region that has a stream.
pub async fn describe(
    client: &aws_sdk_dynamodb::Client,
    names: &[String],
) -> Result<Vec<ApiTable>, TableError> {
    let every = names == [EVERY_TABLE];
    let names = if every {
        list(client).await?
    } else {
        names.to_vec()
    };
    let mut tables = Vec::with_capacity(names.len());
    for name in &names {
        match describe_one(client, name).await? {
            Described::Cached(mut table) => {
                table.id = TableId(tables.len() as u16);
                tables.push(table);
            }
            // Listed a moment ago, gone since; or its changes made elsewhere could not
            // be seen: it passes through.
            Described::Missing | Described::NoStream if every => {}
            Described::Missing => {
                return Err(TableError::Describe {
                    table: name.clone(),
                    reason: "no such table".into(),
                })
            }
            Described::NoStream => return Err(TableError::NoStream(name.clone())),
        }
    }
    Ok(tables)
}

/// What DynamoDB says of one table.
#[derive(Debug)]
pub enum Described {
    /// It can be cached (its id is 0: the cache gives it one).
    Cached(ApiTable),
    /// It has no stream.
    NoStream,
    /// There is no such table.
    Missing,
}

/// Describes one table.
pub async fn describe_one(
    client: &aws_sdk_dynamodb::Client,
    name: &str,
) -> Result<Described, TableError> {
    let fail = |reason: String| TableError::Describe {
        table: name.to_owned(),
        reason,
    };
    let out = match client.describe_table().table_name(name).send().await {
        Ok(out) => out,
        Err(e)
            if e.as_service_error()
                .is_some_and(|e| e.is_resource_not_found_exception()) =>
        {
            return Ok(Described::Missing)
        }
        Err(e) => {
            return Err(fail(
                aws_sdk_dynamodb::error::DisplayErrorContext(e).to_string(),
            ))
        }
    };
    let t = out.table.ok_or_else(|| fail("no description".into()))?;
    let Some(stream) = t.stream_specification().filter(|s| s.stream_enabled()) else {
        return Ok(Described::NoStream);
    };
    let key = schema(t.key_schema()).ok_or_else(|| fail("no partition key".into()))?;
    let mut global = HashMap::new();
    for g in t.global_secondary_indexes() {
        if let (Some(index), Some(key)) = (g.index_name(), schema(g.key_schema())) {
            global.insert(index.to_owned(), key);
        }
    }
    let images = stream.stream_view_type() == Some(&StreamViewType::NewAndOldImages);
    if !images && !global.is_empty() {
        tracing::warn!(
            table = %name,
            "the table's stream does not carry old and new images: queries of its global indexes are not cached"
        );
    }
    Ok(Described::Cached(ApiTable {
        id: TableId(0),
        name: name.to_owned(),
        key,
        local: t
            .local_secondary_indexes()
            .iter()
            .filter_map(|l| l.index_name().map(str::to_owned))
            .collect(),
        global,
        images,
        generation: 0,
    }))
}

/// Every table's name, page by page.
async fn list(client: &aws_sdk_dynamodb::Client) -> Result<Vec<String>, TableError> {
    let mut names = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = client
            .list_tables()
            .set_exclusive_start_table_name(after)
            .send()
            .await
            .map_err(|e| TableError::Describe {
                table: EVERY_TABLE.into(),
                reason: aws_sdk_dynamodb::error::DisplayErrorContext(e).to_string(),
            })?;
        names.extend(page.table_names.unwrap_or_default());
        match page.last_evaluated_table_name {
            Some(last) => after = Some(last),
            None => return Ok(names),
        }
    }
}

fn schema(elements: &[KeySchemaElement]) -> Option<KeySchema> {
    let named = |kind: KeyType| {
        elements
            .iter()
            .find(|e| *e.key_type() == kind)
            .map(|e| e.attribute_name().to_owned())
    };
    Some(KeySchema {
        partition: named(KeyType::Hash)?,
        sort: named(KeyType::Range),
    })
}
