//! The consumer's rules, as a pure state machine: the entries of one table's stream go
//! in, in stream order; what to do to the cache comes out. No I/O, no clock: the
//! property tests below drive it with interleaved relays, lost, repeated and forged
//! entries, and check that no change is ever missed without a flush.
//!
//! - Each relay numbers its entries 1, 2, ... per lease epoch. A number past the next
//!   one means entries were lost (Redis trimmed, restarted or failed over; XREAD silently
//!   resumes after a missing id, so stream ids alone cannot show it): a gap. A number
//!   already seen is a repeat and is ignored. A new (relay, epoch) starts a new sequence;
//!   entries of an epoch older than the newest seen of that relay only invalidate.
//! - A batch invalidates its changes. Its `prev` beyond what this consumer has seen of
//!   the shard (from any relay) is a gap: a relay that took over resumed from a
//!   checkpoint past entries that never arrived here. A batch that reads on from its
//!   relay's own previous batch of the shard says so (`Prev::Same`) instead: when every
//!   earlier entry of its relay's epoch was heard, its number shows whether that batch
//!   arrived; when some were not (the epoch was first heard past its first entry, once
//!   joined), it is a gap.
//! - A reset is a gap. A watermark whose position on a shard is beyond what was seen is
//!   a gap; otherwise it proves freshness as of its time.
//! - A gap flushes the table, so nothing cached predates it, and the freshness already
//!   proven stays true. What was seen of each shard is kept across it: forgetting it
//!   would let a second loss pass unseen.
//! - On joining (or rejoining after a lost connection, which flushes) nothing is known
//!   of the shards: a shard's position is learned from the first entry that names it.
//!   Until the first watermark, which names every shard, a lost entry followed by its
//!   relay's failover could pass unseen; only trimming or a Redis failure loses an entry,
//!   and a Redis failure breaks the connection, so the window is the one poll round a
//!   joining daemon spends bypassing the cache anyway.
//! - Right after joining, a watermark can name a position that another relay's batch,
//!   published before the join, reached: that is counted as a gap too (a harmless flush
//!   of an almost empty cache; the relays' positions cannot be told apart from here).

use std::cmp::Ordering;
use std::collections::HashMap;

use crate::fleet::entry::{Entry, Event, Fact, Key, Prev};
use crate::stream::FlushCause;

/// Relay incarnations remembered (each restart or take-over is a new one); past this the
/// oldest are forgotten, so that a long-lived consumer does not grow with them.
const RELAYS_REMEMBERED: usize = 64;

/// What the consumer must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Bring the cache in line with these changes (echoes of own writes change nothing).
    Apply(Vec<Fact>),
    /// Drop these keys (another daemon wrote them).
    Drop(Vec<Key>),
    /// Forget the table's entries: something was missed.
    Flush(FlushCause),
    /// Every change made before this relay wall-clock time has been applied.
    Fresh(u64),
}

/// One table's consumer state.
#[derive(Debug)]
pub struct Rules {
    /// This daemon's incarnation number: its own hints are skipped.
    me: u64,
    /// What was heard of each relay.
    relays: HashMap<u64, Heard>,
    /// Entries read, the clock of `relays`.
    read: u64,
    /// Per shard: the furthest sequence number known published.
    shards: HashMap<String, String>,
    /// The newest watermark time accepted.
    fresh_ms: Option<u64>,
    /// A watermark was read since joining or rejoining (see the module's note on joining).
    joined: bool,
}

/// What a consumer knows of one relay.
#[derive(Clone, Copy, Debug)]
struct Heard {
    /// The newest epoch seen, and the last number of it.
    epoch: u64,
    last: u64,
    /// When it was last heard from (in entries read).
    at: u64,
    /// Every entry of the epoch up to `last` arrived, or a flush came after the missing
    /// ones: only then does a [`Prev::Same`] batch show that the batch it follows arrived.
    whole: bool,
}

/// Orders DynamoDB Streams sequence numbers: decimal strings of varying length.
pub fn seq_cmp(a: &str, b: &str) -> Ordering {
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

impl Rules {
    pub fn new(me: u64) -> Rules {
        Rules {
            me,
            relays: HashMap::new(),
            read: 0,
            shards: HashMap::new(),
            fresh_ms: None,
            joined: false,
        }
    }

    /// Something was missed (a skipped number, an undecodable entry): flush.
    pub fn gap(&mut self, cause: FlushCause, out: &mut Vec<Action>) {
        out.push(Action::Flush(cause));
    }

    /// The connection was lost and the stream is read again from its end: flush, and
    /// know nothing of the relays and shards, as on joining.
    pub fn rejoin(&mut self, out: &mut Vec<Action>) {
        out.push(Action::Flush(FlushCause::Reconnected));
        self.relays.clear();
        self.shards.clear();
        self.joined = false;
    }

    /// The next entry of the stream.
    pub fn entry(&mut self, entry: Entry, out: &mut Vec<Action>) {
        match entry {
            Entry::Hint { from, keys, .. } => {
                if from != self.me && !keys.is_empty() {
                    out.push(Action::Drop(keys));
                }
            }
            Entry::Relay {
                relay,
                epoch,
                n,
                event,
                ..
            } => {
                self.read += 1;
                // A new epoch is whole if it is heard from its first entry, or before
                // this consumer has (re)joined (see the module's note on joining).
                let mut whole = n == 1 || !self.joined;
                match self.relays.get(&relay) {
                    Some(heard) if epoch < heard.epoch => {
                        // A deposed relay's late entry: a fact still, but it proves nothing.
                        if let Event::Batch { facts, .. } = event {
                            out.push(Action::Apply(facts));
                        }
                        return;
                    }
                    Some(heard) if epoch == heard.epoch => {
                        if n <= heard.last {
                            return;
                        }
                        whole = heard.whole;
                        if n > heard.last + 1 {
                            self.gap(FlushCause::Gap, out);
                            whole = true;
                        }
                    }
                    _ => {}
                }
                if !whole
                    && matches!(
                        event,
                        Event::Batch {
                            prev: Prev::Same,
                            ..
                        }
                    )
                {
                    // The batch it follows may be among the entries never heard.
                    self.gap(FlushCause::Gap, out);
                    whole = true;
                }
                let heard = Heard {
                    epoch,
                    last: n,
                    at: self.read,
                    whole,
                };
                self.relays.insert(relay, heard);
                if self.relays.len() > RELAYS_REMEMBERED {
                    // A forgotten relay's next entry starts a new sequence: one number
                    // goes unchecked, the positions still are.
                    let oldest = self
                        .relays
                        .iter()
                        .min_by_key(|(_, heard)| heard.at)
                        .map(|(r, _)| *r);
                    if let Some(r) = oldest {
                        self.relays.remove(&r);
                    }
                }
                self.event(event, out);
            }
        }
    }

    fn event(&mut self, event: Event, out: &mut Vec<Action>) {
        match event {
            Event::Batch {
                shard,
                prev,
                last,
                facts,
            } => {
                if let (Prev::After(prev), Some(seen)) = (&prev, self.shards.get(&shard)) {
                    if seq_cmp(prev, seen) == Ordering::Greater {
                        self.gap(FlushCause::Gap, out);
                    }
                }
                self.learn(shard, last);
                out.push(Action::Apply(facts));
            }
            Event::End { shard } => {
                self.shards.remove(&shard);
            }
            Event::Reset { cause } => {
                self.gap(FlushCause::named(&cause).unwrap_or(FlushCause::Gap), out);
            }
            Event::Watermark { t_ms, shards } => {
                let beyond = shards.iter().any(|(shard, at)| {
                    self.shards
                        .get(shard)
                        .is_some_and(|seen| seq_cmp(at, seen) == Ordering::Greater)
                });
                if beyond {
                    self.gap(FlushCause::Gap, out);
                }
                for (shard, at) in shards {
                    self.learn(shard, at);
                }
                self.joined = true;
                if self.fresh_ms.is_none_or(|f| t_ms > f) {
                    self.fresh_ms = Some(t_ms);
                    out.push(Action::Fresh(t_ms));
                }
            }
        }
    }

    fn learn(&mut self, shard: String, at: String) {
        match self.shards.get_mut(&shard) {
            Some(seen) if seq_cmp(&at, seen) == Ordering::Greater => *seen = at,
            Some(_) => {}
            None => {
                self.shards.insert(shard, at);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The model: one shard whose records are numbered 1, 2, ...; relays read it and
    //! publish batches, watermarks and resets; the transport may lose or repeat any
    //! entry once the consumer has accepted its first watermark (before that, see the
    //! module's note on joining). A record is *covered* at the consumer once it was
    //! applied or a flush came after it was written. The property: whenever the consumer
    //! is told it is fresh as of T, every record written before T is covered.
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    const SHARD: &str = "s";
    /// The consumer's own incarnation number.
    const ME: u64 = 1000;

    fn seq(i: u64) -> String {
        // Varying lengths, as DynamoDB's are: ordered by length, then digits.
        format!("{}", 100 + i)
    }

    fn fact(i: u64) -> Fact {
        Fact::LogCounter {
            topic: "t".into(),
            position: Some(i as i64),
        }
    }

    /// A relay as the model runs it: where it has read to, its lease epoch and number.
    struct Relay {
        id: u64,
        epoch: u64,
        n: u64,
        read: u64,
        /// The `last` of its previous batch in this epoch, as the publisher remembers it.
        followed: Option<u64>,
    }

    impl Relay {
        fn entry(&mut self, event: Event) -> Entry {
            self.n += 1;
            Entry::Relay {
                relay: self.id,
                epoch: self.epoch,
                n: self.n,
                event,
            }
        }
    }

    #[derive(Clone, Debug)]
    enum Step {
        /// A record is written (time advances by one).
        Write,
        /// Relay `r` polls: publishes what it has not read yet, then a watermark.
        Poll { r: usize, watermark: bool },
        /// Relay `r` loses its lease; a new epoch resumes from `back` records before its
        /// position (a checkpoint older than what it published).
        Failover { r: usize, back: u64 },
        /// Relay `r` restarts without a checkpoint: a reset, then from the tip.
        Restart { r: usize },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => Just(Step::Write),
            3 => (0..2usize, any::<bool>()).prop_map(|(r, watermark)| Step::Poll { r, watermark }),
            1 => (0..2usize, 0..3u64).prop_map(|(r, back)| Step::Failover { r, back }),
            1 => (0..2usize).prop_map(|r| Step::Restart { r }),
        ]
    }

    /// What the transport does to each published entry: deliver, lose, or repeat.
    #[derive(Clone, Copy, Debug)]
    enum Fate {
        Deliver,
        Lose,
        Repeat,
    }

    fn fate() -> impl Strategy<Value = Fate> {
        prop_oneof![20 => Just(Fate::Deliver), 1 => Just(Fate::Lose), 1 => Just(Fate::Repeat)]
    }

    /// Runs a scenario; returns the consumer's actions and, for every `Fresh(T)`, the
    /// records written before T that were not covered then (must be none).
    fn run(steps: &[Step], fates: &[Fate]) -> Vec<u64> {
        let mut relays: Vec<Relay> = (0..2)
            .map(|i| Relay {
                id: i as u64 + 1,
                epoch: 1,
                n: 0,
                read: 0,
                followed: None,
            })
            .collect();
        let mut written = 0u64; // records 1..=written exist; record i written at time i
        let mut rules = Rules::new(ME);
        let mut covered: BTreeMap<u64, bool> = BTreeMap::new();
        let mut fates = fates.iter().cycle();
        let mut violations = Vec::new();
        let mut joined = false;
        let mut deliver = |entry: Entry, covered: &mut BTreeMap<u64, bool>, written: u64| {
            let fate = match joined {
                true => fates.next().copied().unwrap_or(Fate::Deliver),
                false => Fate::Deliver,
            };
            let times = match fate {
                Fate::Deliver => 1,
                Fate::Lose => 0,
                Fate::Repeat => 2,
            };
            for _ in 0..times {
                let mut out = Vec::new();
                rules.entry(entry.clone(), &mut out);
                for action in out {
                    match action {
                        Action::Apply(facts) => {
                            for f in facts {
                                if let Fact::LogCounter {
                                    position: Some(i), ..
                                } = f
                                {
                                    covered.insert(i as u64, true);
                                }
                            }
                        }
                        Action::Flush(_) => {
                            for i in 1..=written {
                                covered.insert(i, true);
                            }
                        }
                        Action::Fresh(t) => {
                            joined = true;
                            // Records written strictly before t (record i at time i).
                            violations.extend(
                                (1..t.min(written + 1)).filter(|i| !covered.contains_key(i)),
                            );
                        }
                        Action::Drop(_) => {}
                    }
                }
            }
        };
        for s in steps {
            match *s {
                Step::Write => written += 1,
                Step::Poll { r, watermark } => {
                    let started = written + 1; // the round begins before any read
                    let relay = &mut relays[r];
                    if relay.read < written {
                        let prev = match relay.followed == Some(relay.read) {
                            true => Prev::Same,
                            false => Prev::After(seq(relay.read)),
                        };
                        let facts = (relay.read + 1..=written).map(fact).collect();
                        relay.read = written;
                        relay.followed = Some(written);
                        let e = relay.entry(Event::Batch {
                            shard: SHARD.into(),
                            prev,
                            last: seq(written),
                            facts,
                        });
                        deliver(e, &mut covered, written);
                    }
                    if watermark {
                        let e = relay.entry(Event::Watermark {
                            t_ms: started,
                            shards: BTreeMap::from([(SHARD.to_owned(), seq(relay.read))]),
                        });
                        deliver(e, &mut covered, written);
                    }
                }
                Step::Failover { r, back } => {
                    let relay = &mut relays[r];
                    relay.epoch += 1;
                    relay.n = 0;
                    relay.followed = None;
                    relay.read = relay.read.saturating_sub(back);
                }
                Step::Restart { r } => {
                    let relay = &mut relays[r];
                    relay.epoch += 1;
                    relay.n = 0;
                    relay.followed = None;
                    relay.read = written;
                    let e = relay.entry(Event::Reset {
                        cause: FlushCause::NoCheckpoint.name().into(),
                    });
                    deliver(e, &mut covered, written);
                }
            }
        }
        violations
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn no_freshness_is_claimed_over_a_missed_record(
            steps in prop::collection::vec(step(), 1..80),
            fates in prop::collection::vec(fate(), 1..40),
        ) {
            let violations = run(&steps, &fates);
            prop_assert!(violations.is_empty(), "missed records {violations:?}");
        }

        #[test]
        fn a_clean_transport_never_flushes_after_the_first_watermark(
            steps in prop::collection::vec(
                prop_oneof![3 => Just(Step::Write), 3 => (0..2usize, any::<bool>())
                    .prop_map(|(r, watermark)| Step::Poll { r, watermark })],
                1..80,
            ),
        ) {
            // Without loss, failover or restart nothing justifies a flush: count them by
            // replaying with a consumer that records its actions.
            let mut relays = [0u64, 0u64];
            let mut ns = [0u64, 0u64];
            let mut written = 0;
            let mut rules = Rules::new(ME);
            let mut flushes = 0;
            for s in &steps {
                let mut out = Vec::new();
                match *s {
                    Step::Write => written += 1,
                    Step::Poll { r, watermark } => {
                        let started = written + 1;
                        if relays[r] < written {
                            ns[r] += 1;
                            rules.entry(Entry::Relay {
                                relay: r as u64 + 1, epoch: 1, n: ns[r],
                                event: Event::Batch {
                                    shard: SHARD.into(), prev: Prev::After(seq(relays[r])),
                                    last: seq(written), facts: vec![],
                                },
                            }, &mut out);
                            relays[r] = written;
                        }
                        if watermark {
                            ns[r] += 1;
                            rules.entry(Entry::Relay {
                                relay: r as u64 + 1, epoch: 1, n: ns[r],
                                event: Event::Watermark {
                                    t_ms: started,
                                    shards: BTreeMap::from([(SHARD.to_owned(), seq(relays[r]))]),
                                },
                            }, &mut out);
                        }
                    }
                    _ => unreachable!(),
                }
                flushes += out.iter().filter(|a| matches!(a, Action::Flush(_))).count();
            }
            // Two relays read independently: one may be ahead of the other, which is no gap.
            prop_assert_eq!(flushes, 0);
        }
    }

    #[test]
    fn hints_of_others_drop_keys_and_own_hints_are_skipped() {
        let mut rules = Rules::new(ME);
        let mut out = Vec::new();
        let key = crate::fleet::entry::Key::Log { topic: "t".into() };
        rules.entry(
            Entry::Hint {
                from: ME,
                keys: vec![key.clone()],
            },
            &mut out,
        );
        assert!(out.is_empty());
        rules.entry(
            Entry::Hint {
                from: ME + 1,
                keys: vec![key],
            },
            &mut out,
        );
        assert_eq!(
            out,
            vec![Action::Drop(vec![Key::Log { topic: "t".into() }])]
        );
    }

    #[test]
    fn a_deposed_epoch_invalidates_but_proves_nothing() {
        let mut rules = Rules::new(ME);
        let mut out = Vec::new();
        let entry = |epoch, n, event| Entry::Relay {
            relay: 1,
            epoch,
            n,
            event,
        };
        let mark = |t_ms| Event::Watermark {
            t_ms,
            shards: BTreeMap::new(),
        };
        rules.entry(entry(2, 1, mark(10)), &mut out);
        assert_eq!(out, vec![Action::Fresh(10)]);
        out.clear();
        rules.entry(entry(1, 9, mark(20)), &mut out);
        let batch = Event::Batch {
            shard: SHARD.into(),
            prev: Prev::Latest,
            last: seq(1),
            facts: vec![fact(1)],
        };
        rules.entry(entry(1, 10, batch), &mut out);
        assert_eq!(out, vec![Action::Apply(vec![fact(1)])]);
    }

    #[test]
    fn relay_incarnations_are_remembered_up_to_a_bound() {
        let mut rules = Rules::new(ME);
        let mut out = Vec::new();
        for r in 0..1000 {
            rules.entry(
                Entry::Relay {
                    relay: r as u64 + 1,
                    epoch: 1,
                    n: 1,
                    event: Event::End { shard: "s".into() },
                },
                &mut out,
            );
        }
        assert_eq!(rules.relays.len(), RELAYS_REMEMBERED);
        assert!(rules.relays.contains_key(&1000), "the newest is kept");
    }

    #[test]
    fn sequence_numbers_order_by_length_first() {
        assert_eq!(seq_cmp("99", "100"), Ordering::Less);
        assert_eq!(seq_cmp("100", "099"), Ordering::Greater);
        assert_eq!(seq_cmp("5", "5"), Ordering::Equal);
    }
}
