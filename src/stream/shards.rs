//! The shards of one stream and what the tailer does with each: parents are read to the
//! end before their children, children are read from their first record, and DescribeStream's
//! momentary inconsistencies (a parent still open after its children appeared, a closed
//! shard whose children are not listed yet, a child whose parent aged out) are tolerated.

use std::collections::{BTreeMap, BTreeSet};

use crate::stream::api::{ShardInfo, StartAt};

/// What the tailer does with one shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Its parent is still being read.
    Waiting,
    /// Being read: from `start` when it has no iterator yet.
    Reading(ShardCursor),
    /// Read to the end (or closed before the tailer started).
    Finished,
}

/// Where the tailer stands in a shard it reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardCursor {
    /// Where a new iterator starts.
    pub start: StartAt,
    /// The current iterator, if one was taken.
    pub iterator: Option<String>,
    /// The last record applied, to resume after if the iterator expires.
    pub checkpoint: Option<String>,
    /// When the last poll that found the shard caught up began (ms on the tailer's clock).
    pub caught_up_at: Option<u64>,
}

impl ShardCursor {
    fn at(start: StartAt) -> ShardCursor {
        ShardCursor {
            start,
            iterator: None,
            checkpoint: None,
            caught_up_at: None,
        }
    }
}

#[derive(Clone, Debug)]
struct Shard {
    parent: Option<String>,
    phase: Phase,
}

/// The shard graph of one stream.
#[derive(Debug, Default)]
pub struct Shards {
    shards: BTreeMap<String, Shard>,
}

impl Shards {
    /// The graph at start-up: open shards are read from LATEST (the cache is empty, so
    /// older records do not matter), closed ones are done; an open shard whose parent is
    /// also open waits for it, as it would later.
    pub fn at_start(listing: &[ShardInfo]) -> Shards {
        let open: BTreeSet<&str> = listing
            .iter()
            .filter(|s| !s.closed)
            .map(|s| s.id.as_str())
            .collect();
        let mut shards = Shards::default();
        for s in listing {
            let phase = if s.closed {
                Phase::Finished
            } else if s.parent.as_deref().is_some_and(|p| open.contains(p)) {
                Phase::Waiting
            } else {
                Phase::Reading(ShardCursor::at(StartAt::Latest))
            };
            shards.shards.insert(
                s.id.clone(),
                Shard {
                    parent: s.parent.clone(),
                    phase,
                },
            );
        }
        shards
    }

    /// The graph for a reader taking over from an earlier one that handed over every
    /// record up to `checkpoints` (per shard): those shards are read after their
    /// checkpoint, whatever DescribeStream says of them, and their children wait for
    /// them. An open shard without a checkpoint had no record the earlier reader saw, so
    /// it is read from its first record (the earlier reader's LATEST is a moment nobody
    /// recorded).
    pub fn resumed(listing: &[ShardInfo], checkpoints: &BTreeMap<String, String>) -> Shards {
        let mut shards = Shards::at_start(listing);
        for (id, s) in shards.shards.iter_mut() {
            match checkpoints.get(id) {
                Some(seq) => {
                    s.phase = Phase::Reading(ShardCursor {
                        start: StartAt::After(seq.clone()),
                        iterator: None,
                        checkpoint: Some(seq.clone()),
                        caught_up_at: None,
                    })
                }
                None => {
                    if let Phase::Reading(c) = &mut s.phase {
                        c.start = StartAt::TrimHorizon;
                    }
                }
            }
        }
        let unfinished: BTreeSet<String> = shards
            .shards
            .iter()
            .filter(|(_, s)| s.phase != Phase::Finished)
            .map(|(id, _)| id.clone())
            .collect();
        for (id, s) in shards.shards.iter_mut() {
            let parent_unfinished = s.parent.as_ref().is_some_and(|p| unfinished.contains(p));
            if parent_unfinished && !checkpoints.contains_key(id) {
                s.phase = Phase::Waiting;
            }
        }
        shards
    }

    /// Adds shards seen in a later DescribeStream. New shards are read from their first
    /// record, once their parent is finished; a shard whose parent is unknown (aged out
    /// of the listing) is a root. With `complete` (a full listing), finished shards no
    /// longer listed are forgotten. Returns how many shards were new.
    pub fn merge(&mut self, listing: &[ShardInfo], complete: bool) -> usize {
        let mut added = 0;
        for s in listing {
            if self.shards.contains_key(&s.id) {
                continue;
            }
            added += 1;
            let phase = match s.parent.as_deref().and_then(|p| self.shards.get(p)) {
                Some(parent) if parent.phase != Phase::Finished => Phase::Waiting,
                _ => Phase::Reading(ShardCursor::at(StartAt::TrimHorizon)),
            };
            self.shards.insert(
                s.id.clone(),
                Shard {
                    parent: s.parent.clone(),
                    phase,
                },
            );
        }
        if complete {
            let listed: BTreeSet<&str> = listing.iter().map(|s| s.id.as_str()).collect();
            self.shards
                .retain(|id, s| listed.contains(id.as_str()) || s.phase != Phase::Finished);
        }
        // A parent may be gone from the listing while its child waits: the child is a root.
        let known: BTreeSet<String> = self.shards.keys().cloned().collect();
        for s in self.shards.values_mut() {
            if s.phase == Phase::Waiting && !s.parent.as_ref().is_some_and(|p| known.contains(p)) {
                s.phase = Phase::Reading(ShardCursor::at(StartAt::TrimHorizon));
            }
        }
        added
    }

    /// Marks a shard read to its end; its waiting children start from their first record.
    pub fn finish(&mut self, id: &str) {
        if let Some(s) = self.shards.get_mut(id) {
            s.phase = Phase::Finished;
        }
        for s in self.shards.values_mut() {
            if s.phase == Phase::Waiting && s.parent.as_deref() == Some(id) {
                s.phase = Phase::Reading(ShardCursor::at(StartAt::TrimHorizon));
            }
        }
    }

    /// The shards being read.
    pub fn reading(&mut self) -> impl Iterator<Item = (&String, &mut ShardCursor)> {
        self.shards
            .iter_mut()
            .filter_map(|(id, s)| match &mut s.phase {
                Phase::Reading(c) => Some((id, c)),
                _ => None,
            })
    }

    /// The cursor of one shard being read.
    pub fn cursor(&mut self, id: &str) -> Option<&mut ShardCursor> {
        match &mut self.shards.get_mut(id)?.phase {
            Phase::Reading(c) => Some(c),
            _ => None,
        }
    }

    /// Whether a shard has children in the graph.
    pub fn has_children(&self, id: &str) -> bool {
        self.shards
            .values()
            .any(|s| s.parent.as_deref() == Some(id))
    }

    /// The phase of a shard (tests).
    #[cfg(test)]
    pub fn phase(&self, id: &str) -> Option<&Phase> {
        self.shards.get(id).map(|s| &s.phase)
    }

    /// Shards tracked, finished ones included.
    pub fn tracked(&self) -> usize {
        self.shards.len()
    }

    /// The time since which every shard being read has been caught up: the oldest
    /// caught-up poll among them (`None` if one has not caught up yet, or none is read).
    pub fn caught_up_at(&self) -> Option<u64> {
        let mut oldest: Option<u64> = None;
        for s in self.shards.values() {
            if let Phase::Reading(c) = &s.phase {
                let at = c.caught_up_at?;
                oldest = Some(oldest.map_or(at, |o| o.min(at)));
            }
        }
        oldest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(id: &str, parent: Option<&str>, closed: bool) -> ShardInfo {
        ShardInfo {
            id: id.into(),
            parent: parent.map(Into::into),
            closed,
        }
    }

    fn reading_from(s: &Shards, id: &str) -> Option<StartAt> {
        match s.phase(id)? {
            Phase::Reading(c) => Some(c.start.clone()),
            _ => None,
        }
    }

    #[test]
    fn start_reads_open_shards_from_latest_and_skips_closed_ones() {
        let s = Shards::at_start(&[shard("p", None, true), shard("c", Some("p"), false)]);
        assert_eq!(s.phase("p"), Some(&Phase::Finished));
        assert_eq!(reading_from(&s, "c"), Some(StartAt::Latest));
        // A child listed open with its parent still open waits for the parent.
        let s = Shards::at_start(&[shard("p", None, false), shard("c", Some("p"), false)]);
        assert_eq!(reading_from(&s, "p"), Some(StartAt::Latest));
        assert_eq!(s.phase("c"), Some(&Phase::Waiting));
    }

    #[test]
    fn a_resumed_graph_reads_after_the_checkpoints() {
        let listing = [
            shard("p", None, true),
            shard("c", Some("p"), false),
            shard("quiet", None, false),
            shard("old", None, true),
        ];
        // The earlier reader saw no record at all: every open shard from its first.
        let s = Shards::resumed(&listing, &BTreeMap::new());
        assert_eq!(reading_from(&s, "c"), Some(StartAt::TrimHorizon));
        assert_eq!(reading_from(&s, "quiet"), Some(StartAt::TrimHorizon));
        // The closed parent was not read to its end: read on after its checkpoint, and
        // its child waits; a shard the earlier reader saw nothing of is read from its
        // first record; a closed one without checkpoint was done.
        let checkpoints = BTreeMap::from([("p".to_owned(), "15".to_owned())]);
        let s = Shards::resumed(&listing, &checkpoints);
        assert_eq!(reading_from(&s, "p"), Some(StartAt::After("15".into())));
        assert_eq!(s.phase("c"), Some(&Phase::Waiting));
        assert_eq!(reading_from(&s, "quiet"), Some(StartAt::TrimHorizon));
        assert_eq!(s.phase("old"), Some(&Phase::Finished));
        // Both checkpointed: the child was being read already.
        let checkpoints = BTreeMap::from([
            ("p".to_owned(), "15".to_owned()),
            ("c".to_owned(), "20".to_owned()),
        ]);
        let s = Shards::resumed(&listing, &checkpoints);
        assert_eq!(reading_from(&s, "c"), Some(StartAt::After("20".into())));
    }

    #[test]
    fn children_wait_for_their_parent_then_read_from_the_start() {
        let mut s = Shards::at_start(&[shard("p", None, false)]);
        assert_eq!(
            s.merge(
                &[
                    shard("p", None, true),
                    shard("a", Some("p"), false),
                    shard("b", Some("p"), false)
                ],
                true
            ),
            2
        );
        assert_eq!(s.phase("a"), Some(&Phase::Waiting));
        assert!(s.has_children("p"));
        s.finish("p");
        assert_eq!(reading_from(&s, "a"), Some(StartAt::TrimHorizon));
        assert_eq!(reading_from(&s, "b"), Some(StartAt::TrimHorizon));
    }

    #[test]
    fn a_child_of_a_finished_or_unknown_parent_is_read_at_once() {
        let mut s = Shards::at_start(&[shard("p", None, false)]);
        s.finish("p");
        s.merge(&[shard("c", Some("p"), false)], false);
        assert_eq!(reading_from(&s, "c"), Some(StartAt::TrimHorizon));
        s.merge(&[shard("orphan", Some("long-gone"), false)], false);
        assert_eq!(reading_from(&s, "orphan"), Some(StartAt::TrimHorizon));
    }

    #[test]
    fn a_waiting_child_whose_parent_leaves_the_listing_becomes_a_root() {
        let mut s = Shards::at_start(&[shard("p", None, false)]);
        s.merge(
            &[shard("p", None, false), shard("c", Some("p"), false)],
            true,
        );
        assert_eq!(s.phase("c"), Some(&Phase::Waiting));
        // The parent is finished and drops out of a full listing: forgotten.
        s.finish("p");
        s.merge(&[shard("c", Some("p"), false)], true);
        assert_eq!(s.phase("p"), None);
        assert!(matches!(s.phase("c"), Some(Phase::Reading(_))));
    }

    #[test]
    fn freshness_is_the_oldest_caught_up_poll() {
        let mut s = Shards::at_start(&[shard("a", None, false), shard("b", None, false)]);
        assert_eq!(s.caught_up_at(), None);
        s.cursor("a").unwrap().caught_up_at = Some(10);
        assert_eq!(s.caught_up_at(), None, "b has not caught up yet");
        s.cursor("b").unwrap().caught_up_at = Some(7);
        assert_eq!(s.caught_up_at(), Some(7));
    }
}
