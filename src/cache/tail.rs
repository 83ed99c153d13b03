//! What the cache holds for one topic of the indexed store: its position and the entries
//! at the top of the log, so that the executor's pattern (append, then read back the
//! tail) is served from memory.
//!
//! Entries never change once written (a topic only grows, or is deleted as a whole), so
//! an entry known once stays right until the topic is deleted; the position is what the
//! writes and the stream keep up to date.

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::cache::versions::Known;

/// Per-entry bookkeeping counted by the weigher.
const ENTRY_OVERHEAD_BYTES: usize = 48;

/// The top of one topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicTail {
    /// The last allocated index (0: none).
    position: i64,
    /// Some of the entries, by index: at most `capacity`, the highest ones.
    entries: BTreeMap<i64, Bytes>,
    capacity: usize,
}

impl TopicTail {
    /// A topic whose position was read, with no entry known yet.
    pub fn at(position: i64, capacity: usize) -> TopicTail {
        TopicTail {
            position,
            entries: BTreeMap::new(),
            capacity,
        }
    }

    pub fn position(&self) -> i64 {
        self.position
    }

    /// `scan(from, until)`, if every entry it needs is known.
    pub fn scan(&self, from: i64, until: i64) -> Known<Vec<Bytes>> {
        let lo = from.max(1);
        let hi = until.min(self.position);
        if lo > hi {
            return Known::Yes(Vec::new());
        }
        // More indices than entries held: some cannot be known.
        if u64::try_from(hi - lo).map_or(true, |span| span >= self.entries.len() as u64) {
            return Known::Unknown;
        }
        let values: Vec<Bytes> = self
            .entries
            .range(lo..=hi)
            .map(|(_, v)| v.clone())
            .collect();
        if values.len() as i64 == hi - lo + 1 {
            Known::Yes(values)
        } else {
            Known::Unknown
        }
    }

    /// After entry `index` was appended (by this daemon or, via the stream, another).
    pub fn with_entry(&self, index: i64, value: Bytes) -> TopicTail {
        let mut next = self.clone();
        next.position = next.position.max(index);
        next.entries.insert(index, value);
        next.trim();
        next
    }

    /// Entries read from DynamoDB at `from..`: known from now on. A strongly consistent
    /// read that found entry `i` proves the position is at least `i`.
    pub fn with_read(&self, from: i64, values: &[Bytes]) -> TopicTail {
        let mut next = self.clone();
        for (index, value) in (from.max(1)..).zip(values) {
            next.position = next.position.max(index);
            next.entries.insert(index, value.clone());
        }
        next.trim();
        next
    }

    /// After the topic was deleted.
    pub fn deleted(capacity: usize) -> TopicTail {
        TopicTail::at(0, capacity)
    }

    /// Whether the tail already agrees with entry `index` holding a value `same` accepts: it is at or
    /// below the position, and the entry, if held, is that value.
    pub fn reflects_entry(&self, index: i64, same: impl Fn(&[u8]) -> bool) -> bool {
        index <= self.position && self.entries.get(&index).is_none_or(|v| same(v))
    }

    /// Whether the tail already agrees with a counter at `position` (it is at or past it:
    /// the record is an echo of an append it has seen).
    pub fn reflects_position(&self, position: i64) -> bool {
        position <= self.position
    }

    /// Whether the tail already agrees that the topic was deleted.
    pub fn reflects_deletion(&self) -> bool {
        self.position == 0
    }

    fn trim(&mut self) {
        while self.entries.len() > self.capacity {
            self.entries.pop_first();
        }
    }

    /// Bytes counted against `cache.max_bytes`.
    pub fn weight(&self) -> usize {
        self.entries
            .values()
            .map(|v| v.len() + ENTRY_OVERHEAD_BYTES)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn appended_entries_answer_the_tail() {
        let t = TopicTail::at(0, 4)
            .with_entry(1, b("a"))
            .with_entry(2, b("b"));
        assert_eq!(t.position(), 2);
        assert_eq!(t.scan(2, 2), Known::Yes(vec![b("b")]));
        assert_eq!(t.scan(1, i64::MAX), Known::Yes(vec![b("a"), b("b")]));
        assert_eq!(
            t.scan(3, 10),
            Known::Yes(vec![]),
            "beyond the position: nothing"
        );
        assert_eq!(t.scan(2, 1), Known::Yes(vec![]));
        assert_eq!(t.scan(i64::MIN, 1), Known::Yes(vec![b("a")]));
    }

    #[test]
    fn entries_not_held_are_unknown() {
        let t = TopicTail::at(10, 4).with_entry(11, b("k"));
        assert_eq!(t.scan(11, 11), Known::Yes(vec![b("k")]));
        assert_eq!(t.scan(10, 11), Known::Unknown);
        assert_eq!(t.scan(1, i64::MAX), Known::Unknown);
        let t = t.with_read(9, &[b("i"), b("j")]);
        assert_eq!(t.scan(9, 11), Known::Yes(vec![b("i"), b("j"), b("k")]));
        // A read that found entries past the position moves it.
        let t = t.with_read(12, &[b("l")]);
        assert_eq!(t.position(), 12);
        assert_eq!(t.scan(11, i64::MAX), Known::Yes(vec![b("k"), b("l")]));
    }

    #[test]
    fn reflection_of_stream_records() {
        let t = TopicTail::at(0, 4)
            .with_entry(1, b("a"))
            .with_entry(2, b("b"));
        assert!(t.reflects_entry(2, |v| v == b"b"));
        assert!(!t.reflects_entry(2, |v| v == b"x"));
        assert!(
            !t.reflects_entry(3, |v| v == b"c"),
            "beyond the position: news"
        );
        assert!(t.reflects_position(1) && t.reflects_position(2) && !t.reflects_position(3));
        assert!(!t.reflects_deletion());
        assert!(TopicTail::deleted(4).reflects_deletion());
    }

    #[test]
    fn only_the_highest_entries_are_kept() {
        let mut t = TopicTail::at(0, 3);
        for i in 1..=10 {
            t = t.with_entry(i, b(&i.to_string()));
        }
        assert_eq!(t.scan(8, 10), Known::Yes(vec![b("8"), b("9"), b("10")]));
        assert_eq!(t.scan(7, 10), Known::Unknown);
        assert_eq!(TopicTail::deleted(3).scan(1, 10), Known::Yes(vec![]));
    }
}
