//! The recorded history: every operation with the daemon it went to, its start and end
//! (nanoseconds since the run began) and what it returned.

use bytes::Bytes;

/// Nanoseconds since the start of the run.
pub type Nanos = u64;

/// A `kv.put` of a version: its timestamp is unique in the run and names its value.
#[derive(Clone, Debug)]
pub struct KvWrite {
    pub key: usize,
    pub ts: i64,
    pub daemon: usize,
    pub start: Nanos,
    pub end: Nanos,
    /// False when the daemon answered an error: the write may or may not have happened.
    pub acked: bool,
}

/// A `kv.get` (of the newest version, or the newest `<= before`).
#[derive(Clone, Debug)]
pub struct KvRead {
    pub key: usize,
    pub before: Option<i64>,
    pub daemon: usize,
    pub start: Nanos,
    pub end: Nanos,
    pub found: Option<(i64, Bytes)>,
}

/// A `log.put`: its value is unique in the run.
#[derive(Clone, Debug)]
pub struct LogAppend {
    pub topic: usize,
    pub value: Bytes,
    pub daemon: usize,
    pub start: Nanos,
    pub end: Nanos,
    /// The index the daemon answered; `None` when it answered an error.
    pub index: Option<i64>,
}

/// A `log.scan` of the tail from `from`: the values at `from`, `from + 1`, ...
#[derive(Clone, Debug)]
pub struct LogRead {
    pub topic: usize,
    pub from: i64,
    pub daemon: usize,
    pub start: Nanos,
    pub end: Nanos,
    pub values: Vec<Bytes>,
}

/// Everything one run did.
#[derive(Default)]
pub struct History {
    pub kv_writes: Vec<KvWrite>,
    pub kv_reads: Vec<KvRead>,
    pub log_appends: Vec<LogAppend>,
    pub log_reads: Vec<LogRead>,
    /// Reads that failed, by message (they show nothing about consistency).
    pub read_errors: Vec<String>,
}

impl History {
    pub fn merge(&mut self, other: History) {
        self.kv_writes.extend(other.kv_writes);
        self.kv_reads.extend(other.kv_reads);
        self.log_appends.extend(other.log_appends);
        self.log_reads.extend(other.log_reads);
        self.read_errors.extend(other.read_errors);
    }

    pub fn operations(&self) -> usize {
        self.kv_writes.len() + self.kv_reads.len() + self.log_appends.len() + self.log_reads.len()
    }
}

/// The value of version `ts` of a key: unique in the run, so a read names its write.
pub fn kv_value(run: &str, ts: i64) -> Bytes {
    Bytes::from(format!("{run}/v{ts}"))
}
