//! Async mutexes per key, made on demand and freed with their last user.
//!
//! The daemon serializes its own writes to one key (so that the cache applies them in the
//! order DynamoDB did) and its fills of one key (so that concurrent misses cost one read).
//! Keys come and go, so the locks are held weakly: the map keeps only locks somebody holds
//! or waits for, and sweeps dead entries whenever it has doubled since the last sweep.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::OwnedMutexGuard;

/// A family of async mutexes, one per key.
pub struct KeyedLocks<K> {
    map: Mutex<LockMap<K>>,
}

struct LockMap<K> {
    locks: HashMap<K, Weak<tokio::sync::Mutex<()>>>,
    sweep_at: usize,
}

/// A held lock; released on drop.
pub struct KeyGuard {
    _guard: OwnedMutexGuard<()>,
}

impl<K: Hash + Eq + Clone> KeyedLocks<K> {
    pub fn new() -> KeyedLocks<K> {
        KeyedLocks {
            map: Mutex::new(LockMap {
                locks: HashMap::new(),
                sweep_at: 64,
            }),
        }
    }

    /// Locks `key`; also says whether another holder had to be waited for.
    pub async fn lock(&self, key: &K) -> (KeyGuard, bool) {
        let lock = self.get(key);
        match lock.clone().try_lock_owned() {
            Ok(guard) => (KeyGuard { _guard: guard }, false),
            Err(_) => (
                KeyGuard {
                    _guard: lock.lock_owned().await,
                },
                true,
            ),
        }
    }

    fn get(&self, key: &K) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.map.lock().expect("keyed lock map poisoned");
        if let Some(lock) = m.locks.get(key).and_then(Weak::upgrade) {
            return lock;
        }
        if m.locks.len() >= m.sweep_at {
            m.locks.retain(|_, w| w.strong_count() > 0);
            m.sweep_at = (m.locks.len() * 2).max(64);
        }
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        m.locks.insert(key.clone(), Arc::downgrade(&lock));
        lock
    }

    /// Locks currently tracked (held, waited for, or not yet swept).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.map.lock().unwrap().locks.len()
    }
}

impl<K: Hash + Eq + Clone> Default for KeyedLocks<K> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_holder_per_key_and_waiters_are_told() {
        let locks = KeyedLocks::new();
        let (a, waited) = locks.lock(&"k").await;
        assert!(!waited);
        // Another key is independent.
        let (_b, waited) = locks.lock(&"other").await;
        assert!(!waited);
        let second = tokio::spawn({
            let locks = Arc::new(locks);
            let l = locks.clone();
            async move { l.lock(&"k").await.1 }
        });
        tokio::task::yield_now().await;
        assert!(!second.is_finished());
        drop(a);
        assert!(second.await.unwrap(), "the second locker waited");
    }

    #[tokio::test]
    async fn unused_locks_are_swept() {
        let locks = KeyedLocks::new();
        for n in 0..1000 {
            drop(locks.lock(&n).await);
        }
        assert!(locks.tracked() <= 128, "{} locks kept", locks.tracked());
    }
}
