//! What the cache holds for one key of the key-value store: the newest versions, enough to
//! answer reads exactly as DynamoDB would.
//!
//! A fill reads the key's versions newest first, up to a limit. The entry then knows every
//! version at or above the oldest one read (its `floor`), and, when the read reached the
//! end, every version there is (`complete`). Reads inside that knowledge are answered from
//! memory; reads below the floor of an incomplete entry go to DynamoDB. Writes keep the
//! knowledge exact: they change only what they know to have changed.

use bytes::Bytes;
use ddbcached_protocol::Versioned;

/// Per-version bookkeeping counted by the weigher (timestamp, `Bytes` handle, vector slot).
const VERSION_OVERHEAD_BYTES: usize = 48;

/// An answer from the cache, or the admission that it does not know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Known<T> {
    Yes(T),
    Unknown,
}

/// The newest versions of one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyVersions {
    /// Ascending by timestamp, each timestamp once.
    versions: Vec<(i64, Bytes)>,
    /// Every version with `ts >= floor` is in `versions`; `None` means every version of
    /// the key is (the entry is complete; an empty complete entry is a cached absence).
    floor: Option<i64>,
}

impl KeyVersions {
    /// From a fill: `newest_first` as DynamoDB returned them (descending), and whether the
    /// read reached the last version.
    pub fn from_fill(newest_first: Vec<(i64, Bytes)>, complete: bool) -> KeyVersions {
        let floor = match (complete, newest_first.last()) {
            (false, Some((oldest, _))) => Some(*oldest),
            _ => None,
        };
        let mut versions = newest_first;
        versions.reverse();
        KeyVersions { versions, floor }
    }

    /// The key has no version (after a delete of all of them).
    pub fn absent() -> KeyVersions {
        KeyVersions {
            versions: Vec::new(),
            floor: None,
        }
    }

    fn complete(&self) -> bool {
        self.floor.is_none()
    }

    /// `get_latest`: the newest version, or the newest with `ts <= before`.
    pub fn latest(&self, before: Option<i64>) -> Known<Option<Versioned>> {
        let upto = before.unwrap_or(i64::MAX);
        // Versions are ascending: the candidate is the last one with ts <= upto.
        let at = self.versions.partition_point(|(ts, _)| *ts <= upto);
        match at.checked_sub(1).map(|i| &self.versions[i]) {
            Some((ts, value)) => Known::Yes(Some(Versioned {
                ts: *ts,
                value: value.clone(),
            })),
            // Nothing known at or before `upto`: absent if we know everything, else a
            // version below the floor may exist.
            None if self.complete() => Known::Yes(None),
            None => Known::Unknown,
        }
    }

    /// `get_latest_timestamp`.
    pub fn latest_ts(&self) -> Known<Option<i64>> {
        match self.versions.last() {
            Some((ts, _)) => Known::Yes(Some(*ts)),
            None if self.complete() => Known::Yes(None),
            None => Known::Unknown,
        }
    }

    /// `get_all_timestamps`, ascending.
    pub fn timestamps(&self) -> Known<Vec<i64>> {
        if self.complete() {
            Known::Yes(self.versions.iter().map(|(ts, _)| *ts).collect())
        } else {
            Known::Unknown
        }
    }

    /// After `put(ts, value)` succeeded (or a stream record said so).
    pub fn with_put(&self, ts: i64, value: Bytes) -> KeyVersions {
        let mut next = self.clone();
        if self.floor.is_some_and(|floor| ts < floor) {
            // Below what the entry knows about; it stays outside its knowledge.
            return next;
        }
        match next.versions.binary_search_by_key(&ts, |(t, _)| *t) {
            Ok(i) => next.versions[i].1 = value,
            Err(i) => next.versions.insert(i, (ts, value)),
        }
        next
    }

    /// After version `ts` was removed (a stream record of another node's delete).
    pub fn with_removed(&self, ts: i64) -> KeyVersions {
        let mut next = self.clone();
        if let Ok(i) = next.versions.binary_search_by_key(&ts, |(t, _)| *t) {
            next.versions.remove(i);
        }
        next
    }

    /// After `delete(marker)` succeeded: all versions, or all but those after the marker
    /// and the newest at or before it.
    pub fn with_delete(&self, marker: Option<i64>) -> KeyVersions {
        let Some(m) = marker else {
            return KeyVersions::absent();
        };
        let at = self.versions.partition_point(|(ts, _)| *ts <= m);
        match at.checked_sub(1) {
            // The newest version <= m is known: it stays, everything older is gone, in
            // DynamoDB too, so the entry now knows every version.
            Some(keep) => KeyVersions {
                versions: self.versions[keep..].to_vec(),
                floor: None,
            },
            // Nothing known at or before m: the delete only touched versions below the
            // floor (or none at all), which the entry does not hold.
            None => self.clone(),
        }
    }

    /// Whether the entry already agrees that version `ts` holds a value `same` accepts (or cannot know:
    /// `ts` is below its floor). A stream record it agrees with changes nothing.
    pub fn reflects_put(&self, ts: i64, same: impl Fn(&[u8]) -> bool) -> bool {
        if self.floor.is_some_and(|floor| ts < floor) {
            return true;
        }
        matches!(self.versions.binary_search_by_key(&ts, |(t, _)| *t), Ok(i) if same(&self.versions[i].1))
    }

    /// Whether the entry already agrees that version `ts` does not exist.
    pub fn reflects_removal(&self, ts: i64) -> bool {
        self.versions
            .binary_search_by_key(&ts, |(t, _)| *t)
            .is_err()
    }

    /// Bytes counted against `cache.max_bytes` (values, timestamps and bookkeeping).
    pub fn weight(&self) -> usize {
        self.versions
            .iter()
            .map(|(_, v)| v.len() + VERSION_OVERHEAD_BYTES)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn v(ts: i64, s: &str) -> Known<Option<Versioned>> {
        Known::Yes(Some(Versioned { ts, value: b(s) }))
    }

    /// Versions at 10, 20, 30, as a complete fill.
    fn full() -> KeyVersions {
        KeyVersions::from_fill(vec![(30, b("c")), (20, b("b")), (10, b("a"))], true)
    }

    /// Only 30 and 20 were read; 10 (or others) may exist below.
    fn partial() -> KeyVersions {
        KeyVersions::from_fill(vec![(30, b("c")), (20, b("b"))], false)
    }

    #[test]
    fn complete_entries_answer_everything() {
        let e = full();
        assert_eq!(e.latest(None), v(30, "c"));
        assert_eq!(e.latest(Some(25)), v(20, "b"));
        assert_eq!(e.latest(Some(20)), v(20, "b"));
        assert_eq!(e.latest(Some(9)), Known::Yes(None));
        assert_eq!(e.latest_ts(), Known::Yes(Some(30)));
        assert_eq!(e.timestamps(), Known::Yes(vec![10, 20, 30]));
        let none = KeyVersions::from_fill(vec![], true);
        assert_eq!(none.latest(None), Known::Yes(None));
        assert_eq!(none.latest_ts(), Known::Yes(None));
        assert_eq!(none.timestamps(), Known::Yes(vec![]));
    }

    #[test]
    fn partial_entries_know_only_down_to_their_floor() {
        let e = partial();
        assert_eq!(e.latest(None), v(30, "c"));
        assert_eq!(e.latest(Some(20)), v(20, "b"));
        assert_eq!(e.latest(Some(19)), Known::Unknown);
        assert_eq!(e.latest_ts(), Known::Yes(Some(30)));
        assert_eq!(e.timestamps(), Known::Unknown);
    }

    #[test]
    fn puts_inside_knowledge_are_applied_and_below_the_floor_ignored() {
        let e = partial()
            .with_put(25, b("x"))
            .with_put(30, b("c2"))
            .with_put(5, b("old"));
        assert_eq!(e.latest(Some(27)), v(25, "x"));
        assert_eq!(e.latest(None), v(30, "c2"));
        assert_eq!(
            e.latest(Some(19)),
            Known::Unknown,
            "5 is below the floor: not known"
        );
        let e = full().with_put(5, b("old"));
        assert_eq!(e.latest(Some(9)), v(5, "old"));
        assert_eq!(e.timestamps(), Known::Yes(vec![5, 10, 20, 30]));
    }

    #[test]
    fn deletes_follow_the_marker_rule() {
        assert_eq!(full().with_delete(None), KeyVersions::absent());
        // Marker between versions: 20 stays (newest <= 25), 10 goes.
        assert_eq!(
            full().with_delete(Some(25)).timestamps(),
            Known::Yes(vec![20, 30])
        );
        // Marker below everything: nothing goes.
        assert_eq!(
            full().with_delete(Some(5)).timestamps(),
            Known::Yes(vec![10, 20, 30])
        );
        // On a partial entry whose floor is at or below the marker, everything older than
        // the kept version is gone in DynamoDB too: the entry becomes complete.
        assert_eq!(
            partial().with_delete(Some(25)).timestamps(),
            Known::Yes(vec![20, 30])
        );
        // Marker below the floor: only unknown versions were touched.
        assert_eq!(partial().with_delete(Some(15)), partial());
    }

    #[test]
    fn reflection_of_stream_records() {
        let e = partial();
        assert!(e.reflects_put(30, |v| v == b"c"));
        assert!(
            !e.reflects_put(30, |v| v == b"other"),
            "same version, other value"
        );
        assert!(
            !e.reflects_put(25, |v| v == b"x"),
            "a version it does not hold"
        );
        assert!(
            e.reflects_put(5, |v| v == b"x"),
            "below the floor: outside its knowledge"
        );
        assert!(e.reflects_removal(25));
        assert!(!e.reflects_removal(20));
    }

    #[test]
    fn removing_the_last_known_version_of_a_partial_entry_is_unknown() {
        let e = KeyVersions::from_fill(vec![(30, b("c"))], false).with_removed(30);
        assert_eq!(e.latest(None), Known::Unknown);
        assert_eq!(e.latest_ts(), Known::Unknown);
        assert_eq!(
            full().with_removed(20).timestamps(),
            Known::Yes(vec![10, 30])
        );
    }
}
