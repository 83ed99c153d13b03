//! Bounded staleness, table by table: the instant before which every change of a table
//! is proven applied to a cache, and whether reads of it must bypass that cache because
//! the proof is older than `cache.max_staleness_ms`. The stores' coherence and the
//! DynamoDB API's cache keep their tables' freshness here; whoever reads the changes
//! reports the proofs.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// The freshness of a fixed set of tables, by slot.
pub struct Freshness {
    /// The origin of the stored instants, set back by the bound, so that any proof
    /// still within it can be represented (one older than the origin is stale anyway).
    origin: Instant,
    max_staleness_ms: u64,
    tables: Vec<Table>,
}

struct Table {
    /// Ms since `origin` before which every change is applied; `u64::MAX`: never proven.
    fresh_as_of_ms: AtomicU64,
    /// What the last judgement found, to tell a switch.
    bypassing: AtomicBool,
}

/// A judgement of one table's freshness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Judged {
    /// Reads must bypass the cache.
    pub stale: bool,
    /// The judgement differs from the previous one.
    pub switched: bool,
}

impl Freshness {
    /// `tables` slots, none proven fresh.
    pub fn new(tables: usize, max_staleness_ms: u64) -> Freshness {
        Freshness {
            origin: Instant::now()
                .checked_sub(Duration::from_millis(max_staleness_ms))
                .unwrap_or_else(Instant::now),
            max_staleness_ms,
            tables: (0..tables)
                .map(|_| Table {
                    fresh_as_of_ms: AtomicU64::new(u64::MAX),
                    bypassing: AtomicBool::new(true),
                })
                .collect(),
        }
    }

    pub fn max_staleness_ms(&self) -> u64 {
        self.max_staleness_ms
    }

    /// Every change of table `slot` made before `as_of` has been applied (`None`: not
    /// proven).
    pub fn set(&self, slot: usize, as_of: Option<Instant>) {
        let ms = as_of
            .and_then(|at| at.checked_duration_since(self.origin))
            .map_or(u64::MAX, |since| since.as_millis() as u64);
        self.tables[slot]
            .fresh_as_of_ms
            .store(ms, Ordering::Release);
    }

    /// Whether reads of table `slot` received by `at` must bypass the cache: nobody has
    /// proven it fresh within the bound of `at`.
    pub fn judge(&self, slot: usize, at: Instant) -> Judged {
        let t = &self.tables[slot];
        let fresh_as_of = t.fresh_as_of_ms.load(Ordering::Acquire);
        let at_ms = at.saturating_duration_since(self.origin).as_millis() as u64;
        let stale =
            fresh_as_of == u64::MAX || at_ms.saturating_sub(fresh_as_of) > self.max_staleness_ms;
        let switched = t.bypassing.load(Ordering::Relaxed) != stale
            && t.bypassing.swap(stale, Ordering::Relaxed) != stale;
        Judged { stale, switched }
    }

    /// What the last judgement of table `slot` found.
    pub fn bypassing(&self, slot: usize) -> bool {
        self.tables[slot].bypassing.load(Ordering::Relaxed)
    }

    /// Seconds since table `slot` was last proven fresh (`None`: never).
    pub fn seconds_since(&self, slot: usize) -> Option<f64> {
        match self.tables[slot].fresh_as_of_ms.load(Ordering::Acquire) {
            u64::MAX => None,
            at => {
                let now = self.origin.elapsed().as_millis() as u64;
                Some(now.saturating_sub(at) as f64 / 1000.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_is_fresh_only_within_the_bound_of_its_last_proof() {
        let f = Freshness::new(2, 60_000);
        let now = Instant::now();
        assert!(f.judge(0, now).stale, "never proven");
        f.set(0, Some(now));
        let fresh = f.judge(0, now);
        assert_eq!((fresh.stale, fresh.switched), (false, true));
        assert!(!f.judge(0, now).switched, "no switch twice");
        assert!(f.judge(1, now).stale, "tables apart");
        // A proof older than the bound, even older than the origin, proves nothing.
        f.set(0, now.checked_sub(Duration::from_secs(61)));
        assert!(f.judge(0, now).stale);
        f.set(0, None);
        assert!(f.judge(0, now).stale);
        assert_eq!(f.seconds_since(0), None);
    }
}
