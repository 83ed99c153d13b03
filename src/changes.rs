//! The one path by which a change of a cached table reaches the caches, whoever reports
//! it: the socket's writes (their cache of the key is the stores' own business, in
//! [`crate::coherence`]), the DynamoDB API front's writes, a table's stream tailer and,
//! in fleet mode, the consumer of what the relays and the other daemons publish. Each
//! change goes to every user of its table ([`crate::registry`]): the stores' cache
//! ([`Coherence`]) and the front's ([`ApiCache`]), so a table both hold (zio-flow's
//! own DynamoDB backend beside executors on the socket) is read from one stream and
//! stays coherent in both, each front reading the other's writes at once.

use std::sync::Arc;

use tokio::time::Instant;

use crate::api::cache::{ApiCache, ItemChange};
use crate::api::keys::store_key_of_partition;
use crate::api::tables::TableId;
use crate::cache::{CacheKey, KeyParts};
use crate::coherence::Coherence;
use crate::registry::{Table, Users};
use crate::store::StoreTable;
use crate::stream::change::Change;
use crate::stream::sink::{Seen, Sink, SinkError};
use crate::stream::FlushCause;

/// Every cache of the daemon, and which tables each holds.
pub struct Changes {
    coherence: Arc<Coherence>,
    api: Option<Arc<ApiCache>>,
    /// The front's id of each store's table it caches too, by [`StoreTable`].
    shared: [Option<TableId>; 2],
}

impl Changes {
    pub fn new(tables: &[Table], coherence: Arc<Coherence>, api: Option<Arc<ApiCache>>) -> Changes {
        let mut shared = [None; 2];
        for t in tables {
            if let (Some(store), Some(id)) = (t.users.store, t.users.api) {
                shared[store as usize] = Some(id);
            }
        }
        Changes {
            coherence,
            api,
            shared,
        }
    }

    /// The stores' cache's coherence.
    pub fn coherence(&self) -> &Arc<Coherence> {
        &self.coherence
    }

    /// The users of the front's table `table`.
    fn users_of(&self, table: TableId) -> Users {
        Users {
            store: StoreTable::ALL
                .into_iter()
                .find(|s| self.shared[*s as usize] == Some(table)),
            api: Some(table),
        }
    }

    /// A write of `key` through the socket, acknowledged or of unknown outcome: what the
    /// front holds of the key's partition, if it caches the store's table.
    pub fn store_written(&self, key: &CacheKey) {
        let store = match key.parts() {
            KeyParts::Kv { .. } => StoreTable::Kv,
            KeyParts::Log { .. } => StoreTable::Log,
        };
        if let (Some(api), Some(id)) = (&self.api, self.shared[store as usize]) {
            api.store_key_written(id, key);
        }
    }

    /// A write of an item of the front's `table` (through this daemon's front, or
    /// hinted by another's), by its canonical key and partition: its entries in both
    /// caches.
    pub async fn item_written(&self, table: TableId, key: &[u8], partition: &[u8]) {
        self.item_written_to(self.users_of(table), key, partition)
            .await;
    }

    async fn item_written_to(&self, users: Users, key: &[u8], partition: &[u8]) {
        if let (Some(api), Some(id)) = (&self.api, users.api) {
            api.item_written(id, key, partition);
        }
        // A partition no store key has holds nothing the store caches.
        if let Some(store) = users.store {
            if let Some(key) = store_key_of_partition(store, partition) {
                self.coherence.drop_key(store, key).await;
            }
        }
    }

    /// A write through the front to `table` whose items it could not make out
    /// (PartiQL, a key it cannot read): everything cached of the table goes.
    pub async fn unknown_written(&self, table: TableId) {
        self.flush(self.users_of(table), FlushCause::UnreadWrite)
            .await;
    }

    /// A change of a store's item, read from the stream (here or by a relay).
    pub async fn apply_store(&self, users: Users, change: &Change) {
        if let Some(store) = users.store {
            self.coherence.apply(store, change).await;
        }
    }

    /// A change of an item as the front keys it (`None`: its key could not be read).
    pub fn apply_item(&self, users: Users, change: Option<&ItemChange>) {
        if let (Some(api), Some(id)) = (&self.api, users.api) {
            api.apply(id, change);
        }
    }

    /// A hint of a socket write of `key` by another daemon.
    pub async fn store_key_hinted(&self, users: Users, key: CacheKey) {
        if let (Some(api), Some(id)) = (&self.api, users.api) {
            api.store_key_written(id, &key);
        }
        if let Some(store) = users.store {
            self.coherence.drop_key(store, key).await;
        }
    }

    /// A hint of a write through another daemon's front.
    pub async fn item_hinted(&self, users: Users, key: &[u8], partition: &[u8]) {
        self.item_written_to(users, key, partition).await;
    }

    /// Continuity lost: everything cached of the table goes, from every cache.
    pub async fn flush(&self, users: Users, cause: FlushCause) {
        if let Some(store) = users.store {
            self.coherence.flush(store, cause).await;
        }
        if let (Some(api), Some(id)) = (&self.api, users.api) {
            api.lost(id, cause);
        }
    }

    /// Every change of the table made before `as_of` has been applied (`None`: no
    /// proof now), for every cache.
    pub fn fresh_as_of(&self, users: Users, as_of: Option<Instant>) {
        if let Some(store) = users.store {
            self.coherence.fresh_as_of(store, as_of);
        }
        if let (Some(api), Some(id)) = (&self.api, users.api) {
            api.fresh_as_of(id, as_of);
        }
    }
}

/// A table's tailer hands what it read to each of the table's caches.
impl Sink for Changes {
    type Table = Users;

    async fn accept(&self, users: Users, seen: Seen<'_>) -> Result<(), SinkError> {
        if let Some(store) = users.store {
            self.coherence.accept(store, seen).await?;
        }
        if let (Some(api), Some(id)) = (&self.api, users.api) {
            api.accept(id, seen).await?;
        }
        Ok(())
    }
}
