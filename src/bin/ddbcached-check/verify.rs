//! The checks on a recorded history: correct values, read-your-writes per daemon, bounded
//! staleness, and unique indices; and the staleness of every read.
//!
//! Times are uncertain: a write took effect at some instant between its start and its
//! end. A read is therefore judged against what was certainly true: a version was
//! certainly superseded once a newer write of the key had ended. A read's staleness is
//! how long before its start the version it returned was certainly superseded (0 when
//! it may still have been the latest); a violation is a staleness past the bound, a
//! superseding write acknowledged by the same daemon before the read started, or a value
//! no write could have produced by the read's end.

use std::collections::HashMap;

use bytes::Bytes;

use crate::history::{kv_value, History, KvRead, KvWrite, LogAppend, LogRead, Nanos};

/// One broken promise, with the operations that show it.
#[derive(Debug)]
pub struct Violation {
    pub kind: &'static str,
    pub history: Vec<String>,
}

/// What the history shows.
#[derive(Default)]
pub struct Verdict {
    pub violations: Vec<Violation>,
    /// The staleness of every successful read, in nanoseconds.
    pub staleness: Vec<Nanos>,
}

impl Verdict {
    pub fn violation(&mut self, kind: &'static str, history: Vec<String>) {
        self.violations.push(Violation { kind, history });
    }
}

/// Checks every read and index in `history`; `bound` is the staleness bound.
pub fn check(history: &History, run: &str, daemons: usize, bound: Nanos) -> Verdict {
    let mut verdict = Verdict::default();
    let mut writes: HashMap<usize, Vec<&KvWrite>> = HashMap::new();
    for w in &history.kv_writes {
        writes.entry(w.key).or_default().push(w);
    }
    let keys: HashMap<usize, KeyWrites> = writes
        .into_iter()
        .map(|(k, ws)| (k, KeyWrites::new(ws, daemons)))
        .collect();
    let none = KeyWrites::new(Vec::new(), daemons);
    for r in &history.kv_reads {
        let key = keys.get(&r.key).unwrap_or(&none);
        check_kv_read(&mut verdict, key, r, run, bound);
    }

    let mut appends: HashMap<usize, Vec<&LogAppend>> = HashMap::new();
    for a in &history.log_appends {
        appends.entry(a.topic).or_default().push(a);
    }
    let topics: HashMap<usize, TopicAppends> = appends
        .into_iter()
        .map(|(t, appends)| (t, TopicAppends::new(&mut verdict, appends, daemons)))
        .collect();
    let empty = TopicAppends::new(&mut verdict, Vec::new(), daemons);
    for r in &history.log_reads {
        let topic = topics.get(&r.topic).unwrap_or(&empty);
        check_log_read(&mut verdict, topic, r, bound);
    }
    verdict
}

/// A key's writes in version order, with range minima of their ends: over all writes,
/// and over each daemon's (an unacknowledged write never ends).
struct KeyWrites<'a> {
    writes: Vec<&'a KvWrite>,
    all: RangeMin,
    by_daemon: Vec<RangeMin>,
}

impl<'a> KeyWrites<'a> {
    fn new(mut writes: Vec<&'a KvWrite>, daemons: usize) -> KeyWrites<'a> {
        writes.sort_by_key(|w| w.ts);
        let end = |w: &KvWrite| if w.acked { w.end } else { Nanos::MAX };
        let all = RangeMin::new(writes.iter().map(|w| end(w)).collect());
        let by_daemon = (0..daemons)
            .map(|d| {
                RangeMin::new(
                    writes
                        .iter()
                        .map(|w| if w.daemon == d { end(w) } else { Nanos::MAX })
                        .collect(),
                )
            })
            .collect();
        KeyWrites {
            writes,
            all,
            by_daemon,
        }
    }

    /// Positions of the versions in `(after, upto]`.
    fn newer(&self, after: Option<i64>, upto: i64) -> (usize, usize) {
        let lo = after.map_or(0, |ts| self.writes.partition_point(|w| w.ts <= ts));
        let hi = self.writes.partition_point(|w| w.ts <= upto);
        (lo, hi.max(lo))
    }
}

fn check_kv_read(v: &mut Verdict, key: &KeyWrites, r: &KvRead, run: &str, bound: Nanos) {
    let upto = r.before.unwrap_or(i64::MAX);
    let returned = r.found.as_ref().map(|(ts, _)| *ts);
    if let Some((ts, value)) = &r.found {
        let write = key
            .writes
            .binary_search_by_key(ts, |w| w.ts)
            .ok()
            .map(|i| key.writes[i]);
        let wrong = match write {
            None => Some("a version no write produced"),
            Some(_) if *value != kv_value(run, *ts) => Some("a value that is not its version's"),
            Some(_) if *ts > upto => Some("a version newer than asked for"),
            Some(w) if w.start > r.end => Some("a version written after the read ended"),
            Some(_) => None,
        };
        if let Some(what) = wrong {
            let mut history = vec![
                format!("returned {what}"),
                format!("read  {}", show_kv_read(r)),
            ];
            history.extend(write.map(|w| format!("write {}", show_kv_write(w))));
            v.violation("kv: wrong value", history);
            return;
        }
    }
    let (lo, hi) = key.newer(returned, upto);
    if key.by_daemon[r.daemon].min(lo, hi) < r.start {
        let newer = key.writes[lo..hi]
            .iter()
            .find(|w| w.daemon == r.daemon && w.acked && w.end < r.start)
            .expect("the range minimum comes from such a write");
        v.violation(
            "kv: read-your-writes",
            vec![
                format!("read  {}", show_kv_read(r)),
                format!(
                    "newer write acknowledged by the same daemon before it: {}",
                    show_kv_write(newer)
                ),
            ],
        );
    }
    let superseded = key.all.min(lo, hi);
    let staleness = r.start.saturating_sub(superseded);
    if staleness > bound {
        let newer = key.writes[lo..hi]
            .iter()
            .find(|w| w.acked && w.end == superseded)
            .expect("the range minimum comes from such a write");
        v.violation(
            "kv: staleness past the bound",
            vec![
                format!("read  {}", show_kv_read(r)),
                format!(
                    "newer write {} ms before it: {}",
                    ms(staleness),
                    show_kv_write(newer)
                ),
            ],
        );
    }
    v.staleness.push(staleness);
}

/// A topic's acknowledged appends by index, with suffix minima of their ends: over all
/// appends, and over each daemon's.
struct TopicAppends<'a> {
    by_index: HashMap<i64, &'a LogAppend>,
    by_value: HashMap<&'a Bytes, &'a LogAppend>,
    /// `after_all[i]`: the earliest end of an acknowledged append with index > i.
    after_all: Vec<Nanos>,
    after_daemon: Vec<Vec<Nanos>>,
}

impl<'a> TopicAppends<'a> {
    fn new(v: &mut Verdict, appends: Vec<&'a LogAppend>, daemons: usize) -> TopicAppends<'a> {
        let mut by_index: HashMap<i64, &LogAppend> = HashMap::new();
        for a in appends.iter().filter(|a| a.index.is_some()) {
            let index = a.index.expect("filtered");
            if index < 1 {
                v.violation(
                    "log: invalid index",
                    vec![format!("append {}", show_append(a))],
                );
            } else if let Some(first) = by_index.get(&index) {
                v.violation(
                    "log: index allocated twice",
                    vec![
                        format!("append {}", show_append(first)),
                        format!("append {}", show_append(a)),
                    ],
                );
            } else {
                by_index.insert(index, a);
            }
        }
        let top = by_index.keys().copied().max().unwrap_or(0) as usize;
        let suffix_min = |only: Option<usize>| {
            let mut after = vec![Nanos::MAX; top + 1];
            for i in (0..top).rev() {
                let next = by_index
                    .get(&(i as i64 + 1))
                    .filter(|a| only.is_none_or(|d| a.daemon == d))
                    .map_or(Nanos::MAX, |a| a.end);
                after[i] = after[i + 1].min(next);
            }
            after
        };
        TopicAppends {
            after_all: suffix_min(None),
            after_daemon: (0..daemons).map(|d| suffix_min(Some(d))).collect(),
            by_value: appends.iter().map(|a| (&a.value, *a)).collect(),
            by_index,
        }
    }

    /// The highest acknowledged index.
    fn top(&self) -> i64 {
        self.after_all.len() as i64 - 1
    }

    fn after(list: &[Nanos], last: i64) -> Nanos {
        usize::try_from(last)
            .ok()
            .and_then(|i| list.get(i))
            .copied()
            .unwrap_or(Nanos::MAX)
    }
}

fn check_log_read(v: &mut Verdict, topic: &TopicAppends, r: &LogRead, bound: Nanos) {
    for (index, value) in (r.from..).zip(&r.values) {
        let append = topic.by_value.get(value);
        let wrong = match (append, topic.by_index.get(&index)) {
            (None, _) => Some("a value nobody appended".to_owned()),
            (Some(a), _) if a.start > r.end => {
                Some("a value appended after the read ended".to_owned())
            }
            (Some(a), Some(at)) if a.value != at.value => Some(format!(
                "at index {index} the value appended at {:?}",
                a.index
            )),
            _ => None,
        };
        if let Some(what) = wrong {
            let mut history = vec![
                format!("returned {what}"),
                format!("read  {}", show_log_read(r)),
            ];
            history.extend(append.map(|a| format!("append {}", show_append(a))));
            v.violation("log: wrong value", history);
            return;
        }
    }
    let last = r.from + r.values.len() as i64 - 1;
    if TopicAppends::after(&topic.after_daemon[r.daemon], last) < r.start {
        let newer = (last + 1..=topic.top())
            .filter_map(|i| topic.by_index.get(&i))
            .find(|a| a.daemon == r.daemon && a.end < r.start)
            .expect("the suffix minimum comes from such an append");
        v.violation(
            "log: read-your-writes",
            vec![
                format!("read  {}", show_log_read(r)),
                format!(
                    "later append acknowledged by the same daemon before it: {}",
                    show_append(newer)
                ),
            ],
        );
    }
    let superseded = TopicAppends::after(&topic.after_all, last);
    let staleness = r.start.saturating_sub(superseded);
    if staleness > bound {
        let newer = (last + 1..=topic.top())
            .filter_map(|i| topic.by_index.get(&i))
            .find(|a| a.end == superseded)
            .expect("the suffix minimum comes from such an append");
        v.violation(
            "log: staleness past the bound",
            vec![
                format!("read  {}", show_log_read(r)),
                format!(
                    "later append {} ms before it: {}",
                    ms(staleness),
                    show_append(newer)
                ),
            ],
        );
    }
    v.staleness.push(staleness);
}

/// Minimum over any range of a fixed array in O(1), after O(n log n) preparation.
struct RangeMin {
    /// `levels[k][i]`: the minimum of `values[i..i + 2^k]`.
    levels: Vec<Vec<Nanos>>,
}

impl RangeMin {
    fn new(values: Vec<Nanos>) -> RangeMin {
        let n = values.len();
        let mut levels = vec![values];
        let mut width = 1;
        while 2 * width <= n {
            let prev = levels.last().expect("level 0 exists");
            let next = (0..=n - 2 * width)
                .map(|i| prev[i].min(prev[i + width]))
                .collect();
            levels.push(next);
            width *= 2;
        }
        RangeMin { levels }
    }

    /// The minimum of `values[lo..hi]`; `Nanos::MAX` for an empty range.
    fn min(&self, lo: usize, hi: usize) -> Nanos {
        if lo >= hi {
            return Nanos::MAX;
        }
        let k = (usize::BITS - 1 - (hi - lo).leading_zeros()) as usize;
        self.levels[k][lo].min(self.levels[k][hi - (1 << k)])
    }
}

pub fn ms(ns: Nanos) -> String {
    format!("{:.3}", ns as f64 / 1e6)
}

fn span(start: Nanos, end: Nanos) -> String {
    format!("[{} ms, {} ms]", ms(start), ms(end))
}

fn show_kv_write(w: &KvWrite) -> String {
    format!(
        "kv.put k{} ts={} on daemon {} {}{}",
        w.key,
        w.ts,
        w.daemon,
        span(w.start, w.end),
        if w.acked { "" } else { " (failed)" }
    )
}

fn show_kv_read(r: &KvRead) -> String {
    let found = match &r.found {
        Some((ts, _)) => format!("ts={ts}"),
        None => "not found".to_owned(),
    };
    let before = r.before.map(|b| format!(" before={b}")).unwrap_or_default();
    format!(
        "kv.get k{}{before} on daemon {} {} -> {found}",
        r.key,
        r.daemon,
        span(r.start, r.end)
    )
}

fn show_append(a: &LogAppend) -> String {
    let index = a
        .index
        .map_or("failed".to_owned(), |i| format!("index {i}"));
    format!(
        "log.put t{} on daemon {} {} -> {index}",
        a.topic,
        a.daemon,
        span(a.start, a.end)
    )
}

fn show_log_read(r: &LogRead) -> String {
    format!(
        "log.scan t{} from {} on daemon {} {} -> {} entries (last index {})",
        r.topic,
        r.from,
        r.daemon,
        span(r.start, r.end),
        r.values.len(),
        r.from + r.values.len() as i64 - 1
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN: &str = "r";
    const BOUND: Nanos = 1_000;

    fn write(ts: i64, daemon: usize, start: Nanos, end: Nanos) -> KvWrite {
        KvWrite {
            key: 0,
            ts,
            daemon,
            start,
            end,
            acked: true,
        }
    }

    fn read(daemon: usize, start: Nanos, end: Nanos, ts: Option<i64>) -> KvRead {
        let found = ts.map(|ts| (ts, kv_value(RUN, ts)));
        KvRead {
            key: 0,
            before: None,
            daemon,
            start,
            end,
            found,
        }
    }

    fn kinds(h: &History) -> Vec<&'static str> {
        check(h, RUN, 2, BOUND)
            .violations
            .iter()
            .map(|v| v.kind)
            .collect()
    }

    #[test]
    fn a_read_within_the_bound_is_stale_but_no_violation() {
        let h = History {
            kv_writes: vec![write(1, 0, 0, 10), write(2, 0, 20, 30)],
            kv_reads: vec![read(1, 500, 510, Some(1)), read(1, 25, 40, Some(2))],
            ..History::default()
        };
        let v = check(&h, RUN, 2, BOUND);
        assert!(v.violations.is_empty(), "{:?}", v.violations);
        assert_eq!(v.staleness, vec![470, 0]);
    }

    #[test]
    fn stale_reads_past_the_bound_and_own_writes_missed_are_violations() {
        let h = History {
            kv_writes: vec![write(1, 0, 0, 10), write(2, 0, 20, 30)],
            kv_reads: vec![
                read(1, 2_000, 2_010, Some(1)),
                read(0, 40, 50, Some(1)),
                read(1, 2_000, 2_010, None),
            ],
            ..History::default()
        };
        assert_eq!(
            kinds(&h),
            [
                "kv: staleness past the bound",
                "kv: read-your-writes",
                "kv: staleness past the bound"
            ]
        );
    }

    #[test]
    fn values_nobody_wrote_or_from_the_future_are_violations() {
        let mut forged = read(0, 40, 50, Some(1));
        forged.found = Some((1, Bytes::from_static(b"forged")));
        let h = History {
            kv_writes: vec![write(1, 0, 100, 110)],
            kv_reads: vec![read(0, 40, 50, Some(1)), read(0, 40, 50, Some(7)), forged],
            ..History::default()
        };
        assert_eq!(kinds(&h), ["kv: wrong value"; 3]);
    }

    fn append(index: Option<i64>, daemon: usize, end: Nanos, value: &'static str) -> LogAppend {
        LogAppend {
            topic: 0,
            value: Bytes::from_static(value.as_bytes()),
            daemon,
            start: 0,
            end,
            index,
        }
    }

    fn scan(daemon: usize, start: Nanos, from: i64, values: &[&'static str]) -> LogRead {
        let values = values
            .iter()
            .map(|v| Bytes::from_static(v.as_bytes()))
            .collect();
        LogRead {
            topic: 0,
            from,
            daemon,
            start,
            end: start + 5,
            values,
        }
    }

    #[test]
    fn log_reads_are_checked_for_order_missing_entries_and_duplicates() {
        let h = History {
            log_appends: vec![
                append(Some(1), 0, 10, "a"),
                append(Some(2), 1, 20, "b"),
                append(Some(2), 1, 30, "c"),
            ],
            log_reads: vec![
                scan(0, 40, 1, &["a", "b"]),
                scan(1, 40, 1, &["a"]),
                scan(0, 5_000, 1, &["a"]),
                scan(0, 40, 1, &["b", "a"]),
            ],
            ..History::default()
        };
        assert_eq!(
            kinds(&h),
            [
                "log: index allocated twice",
                "log: read-your-writes",
                "log: staleness past the bound",
                "log: wrong value",
            ]
        );
    }

    #[test]
    fn range_min_matches_a_scan() {
        let values: Vec<Nanos> = (0..37u64).map(|i| (i * 7919) % 31).collect();
        let rm = RangeMin::new(values.clone());
        for lo in 0..=values.len() {
            for hi in lo..=values.len() {
                let want = values[lo..hi].iter().copied().min().unwrap_or(Nanos::MAX);
                assert_eq!(rm.min(lo, hi), want, "{lo}..{hi}");
            }
        }
    }
}
