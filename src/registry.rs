//! The tables this daemon caches and who caches each: the zio-flow stores (served over
//! the socket) and the DynamoDB API front, which may cache a store's table too. One
//! tailer (or, in fleet mode, one relay) reads each table's stream, and what it reads
//! reaches every user of the table ([`crate::changes`]).

use crate::api::cache::ApiCache;
use crate::api::tables::TableId;
use crate::config::Config;
use crate::store::StoreTable;
use crate::stream::sink::Tailed;

/// A table the daemon caches, and who caches it.
#[derive(Clone, Debug)]
pub struct Table {
    /// Its DynamoDB name.
    pub name: String,
    pub users: Users,
}

/// Who caches a table's items.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Users {
    pub store: Option<StoreTable>,
    pub api: Option<TableId>,
}

impl Tailed for Users {
    /// A table's tailer counts under the store's slot, else the front's.
    fn slot(self) -> usize {
        match (self.store, self.api) {
            (Some(store), _) => store.slot(),
            (None, Some(api)) => api.slot(),
            (None, None) => unreachable!("a cached table has a user"),
        }
    }
}

impl Table {
    /// The stores' tables, `names` in [`StoreTable`] order, each with the id `api` gives
    /// it if the DynamoDB API front caches it too.
    pub fn stores(names: [&str; 2], api: impl Fn(&str) -> Option<TableId>) -> [Table; 2] {
        StoreTable::ALL.map(|t| Table {
            name: names[t as usize].to_owned(),
            users: Users {
                store: Some(t),
                api: api(names[t as usize]),
            },
        })
    }

    /// The `table` label of its metrics: the store's name, else the table's own.
    pub fn label(&self) -> &str {
        match self.users.store {
            Some(store) => store.name(),
            None => &self.name,
        }
    }
}

/// The tables `config` caches: the stores' two (when the daemon serves them), then every
/// other table the API front caches (`api`); a store's table the front caches too is
/// listed once, with both users.
pub fn tables(config: &Config, api: Option<&ApiCache>) -> Vec<Table> {
    let api_id = |name: &str| api.and_then(|c| c.table(name)).map(|t| t.id);
    let d = &config.dynamodb;
    let stores = match config.stores.enabled {
        true => Table::stores([&d.kv_table, &d.log_table], api_id).to_vec(),
        false => Vec::new(),
    };
    let others: Vec<Table> = api
        .into_iter()
        .flat_map(|c| c.tables())
        .filter(|t| !stores.iter().any(|s| s.name == t.name))
        .map(|t| Table {
            name: t.name.clone(),
            users: Users {
                store: None,
                api: Some(t.id),
            },
        })
        .collect();
    stores.into_iter().chain(others).collect()
}
