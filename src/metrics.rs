//! Prometheus metrics: names `ddbcached_<component>_<what>_<unit>`, base units, `_total`
//! on counters, labels only from closed sets (operation, result code, API, table, event,
//! cause), never from client data.
//!
//! Each daemon owns its recorder (metrics-exporter-prometheus's, built but not installed
//! as the process-wide one), so that several daemons in one process, as in the tests,
//! keep separate figures. Event counters and histograms are recorded when things happen;
//! the cache's and the tailers' counters are copied in at each scrape.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use ddbcached_protocol::ErrorCode;
use metrics::{
    Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder, SharedString, Unit,
};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::cache::{ReadOp, Served, StatsSnapshot};
use crate::coherence::CoherenceSnapshot;
use crate::stream::{FlushCause, Table, TailSnapshot};

/// Latency buckets, 10 µs to 10 s.
const BUCKETS_SECONDS: [f64; 19] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Operations as they appear in the `op` label; `invalid` is a request that did not decode.
pub const OPS: [&str; 14] = [
    "hello",
    "ping",
    "health",
    "kv.put",
    "kv.get",
    "kv.latest_ts",
    "kv.timestamps",
    "kv.scan",
    "kv.delete",
    "log.put",
    "log.position",
    "log.scan",
    "log.delete",
    "invalid",
];

/// Why a frame or a connection was refused, for `ddbcached_server_frames_rejected_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    TooLarge = 0,
    Malformed = 1,
    UnknownOperation = 2,
    Handshake = 3,
}

const REJECTIONS: [&str; 4] = [
    "frame_too_large",
    "malformed",
    "unknown_operation",
    "handshake",
];

/// How a DynamoDB call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallOutcome {
    Ok,
    Throttled,
    Timeout,
    Error,
}

impl CallOutcome {
    fn name(self) -> &'static str {
        match self {
            CallOutcome::Ok => "ok",
            CallOutcome::Throttled => "throttled",
            CallOutcome::Timeout => "timeout",
            CallOutcome::Error => "error",
        }
    }
}

struct ApiHandles {
    outcomes: [Counter; 4],
    duration: Histogram,
    throttles: Counter,
    retries: Counter,
}

/// One daemon's metrics.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    requests: Vec<Vec<Counter>>,
    durations: Vec<Histogram>,
    connections: Gauge,
    rejected: Vec<Counter>,
    peers_refused: Counter,
    apis: Mutex<HashMap<String, ApiHandles>>,
    cache_reads: Vec<Vec<Counter>>,
    cache_rejected_fills: Counter,
    cache_evictions: Counter,
    cache_invalidations: Counter,
    cache_entries: Gauge,
    cache_bytes: Gauge,
    stream_records: Vec<Vec<Counter>>,
    stream_invalidations: Vec<Counter>,
    stream_flushes: Vec<Counter>,
    stream_errors: Vec<Counter>,
    stream_bypass_switches: Counter,
    stream_bypassing: Vec<Gauge>,
    stream_shards: Vec<Gauge>,
    stream_since_caught_up: Vec<Gauge>,
    stream_lag: Histogram,
}

const SERVED: [&str; 4] = ["hit", "coalesced", "miss", "bypass"];
const EVENTS: [&str; 3] = ["insert", "modify", "remove"];

impl Metrics {
    pub fn new() -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&BUCKETS_SECONDS)
            // Cannot fail: the bucket list is not empty.
            .expect("bucket list is not empty")
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &BUCKETS_SECONDS)
            .expect("bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        let r = &recorder;
        describe(
            r,
            "ddbcached_server_requests_total",
            Unit::Count,
            "Requests answered, by operation and result (ok or the error code's name).",
            Kind::Counter,
        );
        describe(
            r,
            "ddbcached_server_request_duration_seconds",
            Unit::Seconds,
            "Time from a request's decoding to its last reply frame being queued.",
            Kind::Histogram,
        );
        describe(
            r,
            "ddbcached_server_connections",
            Unit::Count,
            "Client connections open.",
            Kind::Gauge,
        );
        describe(
            r,
            "ddbcached_server_frames_rejected_total",
            Unit::Count,
            "Frames refused by reason.",
            Kind::Counter,
        );
        describe(
            r,
            "ddbcached_server_peers_refused_total",
            Unit::Count,
            "Connections refused because the peer's uid/gid is not allowed.",
            Kind::Counter,
        );
        describe(
            r,
            "ddbcached_dynamodb_calls_total",
            Unit::Count,
            "DynamoDB and Streams calls by API and outcome.",
            Kind::Counter,
        );
        describe(
            r,
            "ddbcached_dynamodb_call_duration_seconds",
            Unit::Seconds,
            "Duration of DynamoDB calls, retries included, by API.",
            Kind::Histogram,
        );
        describe(
            r,
            "ddbcached_dynamodb_throttles_total",
            Unit::Count,
            "Attempts DynamoDB throttled, by API.",
            Kind::Counter,
        );
        describe(
            r,
            "ddbcached_dynamodb_retries_total",
            Unit::Count,
            "Attempts beyond the first, by API.",
            Kind::Counter,
        );
        describe(
            r,
            "ddbcached_cache_reads_total",
            Unit::Count,
            "Reads by operation and how they were served (hit, coalesced, miss, bypass).",
            Kind::Counter,
        );
        describe(
            r,
            "ddbcached_cache_rejected_fills_total",
            Unit::Count,
            "Fills not stored because a write or invalidation raced them.",
            Kind::Counter,
        );
        describe(
            r,
            "ddbcached_cache_evictions_total",
            Unit::Count,
            "Entries evicted for size or age.",
            Kind::Counter,
        );
        describe(
            r,
            "ddbcached_cache_invalidations_total",
            Unit::Count,
            "Entries dropped by writes with an unknown outcome, stream records and flushes.",
            Kind::Counter,
        );
        describe(
            r,
            "ddbcached_cache_entries",
            Unit::Count,
            "Cached keys and topics (estimate).",
            Kind::Gauge,
        );
        describe(
            r,
            "ddbcached_cache_weighted_bytes",
            Unit::Bytes,
            "Memory the cache accounts for (keys, values, bookkeeping).",
            Kind::Gauge,
        );
        describe(
            r,
            "ddbcached_stream_records_total",
            Unit::Count,
            "Stream records applied, by table and event.",
            Kind::Counter,
        );
        describe(
            r,
            "ddbcached_stream_invalidations_total",
            Unit::Count,
            "Cached entries dropped by stream records, by table.",
            Kind::Counter,
        );
        describe(
            r,
            "ddbcached_stream_flushes_total",
            Unit::Count,
            "Whole-table invalidations after lost stream continuity, by cause.",
            Kind::Counter,
        );
        describe(
            r,
            "ddbcached_stream_errors_total",
            Unit::Count,
            "Failed Streams calls, by table.",
            Kind::Counter,
        );
        describe(
            r,
            "ddbcached_stream_bypass_switches_total",
            Unit::Count,
            "Switches between serving from the cache and bypassing it.",
            Kind::Counter,
        );
        describe(
            r,
            "ddbcached_stream_bypassing",
            Unit::Count,
            "1 while reads of the table bypass the cache (tailer behind the staleness bound).",
            Kind::Gauge,
        );
        describe(
            r,
            "ddbcached_stream_shards",
            Unit::Count,
            "Stream shards tracked, by table.",
            Kind::Gauge,
        );
        describe(
            r,
            "ddbcached_stream_seconds_since_caught_up",
            Unit::Seconds,
            "Age of the table's last proof of being caught up (absent before the first).",
            Kind::Gauge,
        );
        describe(
            r,
            "ddbcached_stream_visibility_lag_seconds",
            Unit::Seconds,
            "From the acknowledgement of this daemon's write to the arrival of its stream record.",
            Kind::Histogram,
        );

        let table = |t: Table| ("table", t.name());
        Metrics {
            requests: OPS
                .iter()
                .map(|op| {
                    std::iter::once("ok")
                        .chain(ErrorCode::ALL.iter().map(|c| c.name()))
                        .map(|result| {
                            counter(
                                r,
                                "ddbcached_server_requests_total",
                                &[("op", op), ("result", result)],
                            )
                        })
                        .collect()
                })
                .collect(),
            durations: OPS
                .iter()
                .map(|op| {
                    histogram(
                        r,
                        "ddbcached_server_request_duration_seconds",
                        &[("op", op)],
                    )
                })
                .collect(),
            connections: gauge(r, "ddbcached_server_connections", &[]),
            rejected: REJECTIONS
                .iter()
                .map(|reason| {
                    counter(
                        r,
                        "ddbcached_server_frames_rejected_total",
                        &[("reason", reason)],
                    )
                })
                .collect(),
            peers_refused: counter(r, "ddbcached_server_peers_refused_total", &[]),
            apis: Mutex::default(),
            cache_reads: ReadOp::ALL
                .iter()
                .map(|op| {
                    SERVED
                        .iter()
                        .map(|s| {
                            counter(
                                r,
                                "ddbcached_cache_reads_total",
                                &[("op", op.name()), ("served", s)],
                            )
                        })
                        .collect()
                })
                .collect(),
            cache_rejected_fills: counter(r, "ddbcached_cache_rejected_fills_total", &[]),
            cache_evictions: counter(r, "ddbcached_cache_evictions_total", &[]),
            cache_invalidations: counter(r, "ddbcached_cache_invalidations_total", &[]),
            cache_entries: gauge(r, "ddbcached_cache_entries", &[]),
            cache_bytes: gauge(r, "ddbcached_cache_weighted_bytes", &[]),
            stream_records: Table::ALL
                .iter()
                .map(|t| {
                    EVENTS
                        .iter()
                        .map(|e| {
                            counter(
                                r,
                                "ddbcached_stream_records_total",
                                &[table(*t), ("event", e)],
                            )
                        })
                        .collect()
                })
                .collect(),
            stream_invalidations: Table::ALL
                .iter()
                .map(|t| counter(r, "ddbcached_stream_invalidations_total", &[table(*t)]))
                .collect(),
            stream_flushes: FlushCause::ALL
                .iter()
                .map(|c| counter(r, "ddbcached_stream_flushes_total", &[("cause", c.name())]))
                .collect(),
            stream_errors: Table::ALL
                .iter()
                .map(|t| counter(r, "ddbcached_stream_errors_total", &[table(*t)]))
                .collect(),
            stream_bypass_switches: counter(r, "ddbcached_stream_bypass_switches_total", &[]),
            stream_bypassing: Table::ALL
                .iter()
                .map(|t| gauge(r, "ddbcached_stream_bypassing", &[table(*t)]))
                .collect(),
            stream_shards: Table::ALL
                .iter()
                .map(|t| gauge(r, "ddbcached_stream_shards", &[table(*t)]))
                .collect(),
            stream_since_caught_up: Table::ALL
                .iter()
                .map(|t| gauge(r, "ddbcached_stream_seconds_since_caught_up", &[table(*t)]))
                .collect(),
            stream_lag: histogram(r, "ddbcached_stream_visibility_lag_seconds", &[]),
            handle,
            recorder,
        }
    }

    /// A request was answered.
    pub fn request(&self, op: &str, error: Option<ErrorCode>, elapsed: Duration) {
        let op = OPS.iter().position(|o| *o == op).unwrap_or(OPS.len() - 1);
        let result = error.map_or(0, |c| {
            1 + ErrorCode::ALL.iter().position(|x| *x == c).unwrap_or(0)
        });
        self.requests[op][result].increment(1);
        self.durations[op].record(elapsed.as_secs_f64());
    }

    pub fn connection_opened(&self) {
        self.connections.increment(1.0);
    }

    pub fn connection_closed(&self) {
        self.connections.decrement(1.0);
    }

    pub fn frame_rejected(&self, why: Rejection) {
        self.rejected[why as usize].increment(1);
    }

    pub fn peer_refused(&self) {
        self.peers_refused.increment(1);
    }

    /// The visibility lag of one of this daemon's writes.
    pub fn stream_lag(&self) -> Histogram {
        self.stream_lag.clone()
    }

    /// A DynamoDB call ended.
    pub fn dynamodb_call(
        &self,
        api: &str,
        outcome: CallOutcome,
        elapsed: Duration,
        attempts: u64,
        throttled: u64,
    ) {
        let mut apis = self.apis.lock().expect("api metrics poisoned");
        let h = apis.entry(api.to_owned()).or_insert_with(|| {
            let r = &self.recorder;
            let api: &str = api;
            ApiHandles {
                outcomes: [
                    CallOutcome::Ok,
                    CallOutcome::Throttled,
                    CallOutcome::Timeout,
                    CallOutcome::Error,
                ]
                .map(|o| {
                    counter(
                        r,
                        "ddbcached_dynamodb_calls_total",
                        &[("api", api), ("outcome", o.name())],
                    )
                }),
                duration: histogram(
                    r,
                    "ddbcached_dynamodb_call_duration_seconds",
                    &[("api", api)],
                ),
                throttles: counter(r, "ddbcached_dynamodb_throttles_total", &[("api", api)]),
                retries: counter(r, "ddbcached_dynamodb_retries_total", &[("api", api)]),
            }
        });
        h.outcomes[outcome as usize].increment(1);
        h.duration.record(elapsed.as_secs_f64());
        h.throttles.increment(throttled);
        h.retries.increment(attempts.saturating_sub(1));
    }

    /// Folds the histograms' pending samples into their buckets, which frees them.
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// The exposition text, with the cache's and tailers' counters brought up to date.
    pub fn render(
        &self,
        cache: &StatsSnapshot,
        tail: &TailSnapshot,
        coherence: &CoherenceSnapshot,
    ) -> String {
        for op in ReadOp::ALL {
            for (i, served) in [Served::Hit, Served::Coalesced, Served::Miss, Served::Bypass]
                .into_iter()
                .enumerate()
            {
                self.cache_reads[op as usize][i].absolute(cache.count(op, served));
            }
        }
        self.cache_rejected_fills.absolute(cache.rejected_fills);
        self.cache_evictions.absolute(cache.evictions);
        self.cache_invalidations.absolute(cache.invalidations);
        self.cache_entries.set(cache.entries as f64);
        self.cache_bytes.set(cache.weighted_bytes as f64);
        for t in Table::ALL {
            let i = t as usize;
            for (e, counter) in self.stream_records[i].iter().enumerate() {
                counter.absolute(tail.records[i][e]);
            }
            self.stream_invalidations[i].absolute(coherence.invalidations[i]);
            self.stream_errors[i].absolute(tail.errors[i]);
            self.stream_bypassing[i].set(if coherence.bypassing[i] { 1.0 } else { 0.0 });
            self.stream_shards[i].set(tail.shards[i] as f64);
            self.stream_since_caught_up[i]
                .set(coherence.seconds_since_caught_up[i].unwrap_or(f64::NAN));
        }
        for (c, counter) in self.stream_flushes.iter().enumerate() {
            counter.absolute(coherence.flushes[c]);
        }
        self.stream_bypass_switches
            .absolute(coherence.bypass_switches);
        self.handle.render()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    let labels: Vec<Label> = labels
        .iter()
        .map(|(k, v)| Label::new(*k, SharedString::from(v.to_string())))
        .collect();
    Key::from_parts(name, labels)
}

fn counter(r: &PrometheusRecorder, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
    r.register_counter(&key(name, labels), &METADATA)
}

fn gauge(r: &PrometheusRecorder, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
    r.register_gauge(&key(name, labels), &METADATA)
}

fn histogram(
    r: &PrometheusRecorder,
    name: &'static str,
    labels: &[(&'static str, &str)],
) -> Histogram {
    r.register_histogram(&key(name, labels), &METADATA)
}

/// The kind of a metric, for its description.
#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

fn describe(
    r: &PrometheusRecorder,
    name: &'static str,
    unit: Unit,
    help: &'static str,
    kind: Kind,
) {
    let name = KeyName::from_const_str(name);
    match kind {
        Kind::Counter => r.describe_counter(name, Some(unit), help.into()),
        Kind::Gauge => r.describe_gauge(name, Some(unit), help.into()),
        Kind::Histogram => r.describe_histogram(name, Some(unit), help.into()),
    }
}
