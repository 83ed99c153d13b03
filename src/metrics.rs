//! Prometheus metrics: names `ddbcached_<component>_<what>_<unit>`, base units, `_total`
//! on counters, labels only from closed sets (operation, result code, API, table, event,
//! cause), never from client data.
//!
//! Counters and gauges are owned by the components that count (the server's
//! [`crate::server::ServerStats`], the cache, the tailers, the coherence module, the AWS
//! call counter): each keeps its own atomics and writes them into an [`Exposition`] at a
//! scrape, so there is one copy of every figure. The request durations are such a figure
//! too ([`Durations`]): a connection records a batch of hits with one add per bucket,
//! without a clock read or an allocation per request. The other histograms (call
//! durations, lags) go to metrics-exporter-prometheus's recorder, for its buckets: each
//! daemon owns one (built, not installed as the process-wide recorder), so that several
//! daemons in one process, as in the tests, keep separate figures.

use std::collections::HashMap;
use std::fmt::{Display, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use ddbcached_protocol::Op;
use metrics::{Histogram, Key, KeyName, Label, Level, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

/// Latency buckets, 10 µs to 10 s.
const BUCKETS_SECONDS: [f64; 19] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The `op` label of a request: its operation, or `invalid` for one that did not decode.
pub fn op_label(op: Option<Op>) -> &'static str {
    op.map_or("invalid", Op::name)
}

/// The `op` labels in index order: every operation, then `invalid`.
pub fn op_labels() -> impl Iterator<Item = (usize, &'static str)> {
    Op::ALL
        .iter()
        .map(|op| Some(*op))
        .chain([None])
        .enumerate()
        .map(|(i, op)| (i, op_label(op)))
}

/// The index of a request's `op` label in [`op_labels`].
pub fn op_index(op: Option<Op>) -> usize {
    op.map_or(Op::ALL.len(), Op::index)
}

/// Number of `op` labels.
pub const OP_LABELS: usize = Op::ALL.len() + 1;

/// The recorder's histograms of one daemon.
pub struct Metrics {
    handle: PrometheusHandle,
    recorder: PrometheusRecorder,
    /// Per DynamoDB API, registered at its first call (the SDK names the API).
    call_durations: Mutex<HashMap<String, Histogram>>,
    stream_lag: Histogram,
    fleet_lag: Histogram,
    hint_lag: Histogram,
}

impl Metrics {
    pub fn new() -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&BUCKETS_SECONDS)
            // Cannot fail: the bucket list is not empty.
            .expect("bucket list is not empty")
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &BUCKETS_SECONDS)
            .expect("bucket list is not empty")
            .build_recorder();
        let r = &recorder;
        describe(
            r,
            "ddbcached_dynamodb_call_duration_seconds",
            "Duration of DynamoDB calls, retries included, by API.",
        );
        describe(
            r,
            "ddbcached_stream_visibility_lag_seconds",
            "From the acknowledgement of this daemon's write to the arrival of its stream record.",
        );
        describe(
            r,
            "ddbcached_fleet_lag_seconds",
            "Fleet mode: from a relay's publication of an entry to this daemon's applying it (wall clocks of two hosts).",
        );
        describe(
            r,
            "ddbcached_fleet_hint_lag_seconds",
            "Fleet mode: from another daemon's publication of a write hint to this daemon's dropping the key.",
        );
        Metrics {
            call_durations: Mutex::default(),
            stream_lag: histogram(r, "ddbcached_stream_visibility_lag_seconds", &[]),
            fleet_lag: histogram(r, "ddbcached_fleet_lag_seconds", &[]),
            hint_lag: histogram(r, "ddbcached_fleet_hint_lag_seconds", &[]),
            handle: recorder.handle(),
            recorder,
        }
    }

    /// Where the visibility lag of this daemon's writes is recorded.
    pub fn stream_lag(&self) -> Histogram {
        self.stream_lag.clone()
    }

    /// Where fleet mode records the lag of relayed entries.
    pub fn fleet_lag(&self) -> Histogram {
        self.fleet_lag.clone()
    }

    /// Where fleet mode records the lag of write hints.
    pub fn hint_lag(&self) -> Histogram {
        self.hint_lag.clone()
    }

    /// How long a DynamoDB call took.
    pub fn call_duration(&self, api: &str, elapsed: Duration) {
        let mut apis = self
            .call_durations
            .lock()
            .expect("call histograms poisoned");
        let h = match apis.get(api) {
            Some(h) => h,
            None => apis.entry(api.to_owned()).or_insert_with(|| {
                histogram(
                    &self.recorder,
                    "ddbcached_dynamodb_call_duration_seconds",
                    &[("api", api)],
                )
            }),
        };
        h.record(elapsed.as_secs_f64());
    }

    /// Folds the histograms' pending samples into their buckets, which frees them.
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// The histograms' exposition text.
    pub fn render_histograms(&self) -> String {
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

/// Prometheus exposition text, written family by family by the components that count.
#[derive(Default)]
pub struct Exposition {
    text: String,
}

/// The kind of a metric family.
#[derive(Clone, Copy)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Exposition {
    /// Starts a family: its help and type lines.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        // Writing to a String cannot fail.
        let _ = write!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
    }

    /// One sample of the family just started.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"{v}\"");
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }

    /// A family whose samples differ in one label: (that label's value, sample) pairs.
    pub fn by_label<'a, V: Display>(
        &mut self,
        name: &str,
        kind: Kind,
        help: &str,
        label: &str,
        samples: impl IntoIterator<Item = (&'a str, V)>,
    ) {
        self.family(name, kind, help);
        for (value, sample) in samples {
            self.sample(name, &[(label, value)], sample);
        }
    }

    /// A family of one sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: impl Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// The whole text, with the recorder's histograms after the components' families.
    pub fn finish(mut self, histograms: &str) -> String {
        self.text.push('\n');
        self.text.push_str(histograms);
        self.text
    }
}

/// A histogram of durations over the latency buckets, kept in atomics by its owner and
/// written into a scrape. Recording a batch of equal samples costs one add per figure.
pub struct Durations {
    /// Samples per bucket (not cumulative); the last counts those above every bound.
    buckets: [AtomicU64; BUCKETS_SECONDS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Default for Durations {
    fn default() -> Durations {
        Durations {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_nanos: AtomicU64::new(0),
        }
    }
}

impl Durations {
    /// Records `count` samples of `elapsed` each.
    pub fn record(&self, elapsed: Duration, count: u64) {
        let seconds = elapsed.as_secs_f64();
        let bucket = BUCKETS_SECONDS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(BUCKETS_SECONDS.len());
        self.buckets[bucket].fetch_add(count, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos
            .fetch_add(nanos.saturating_mul(count), Ordering::Relaxed);
    }

    /// Writes the `_bucket`, `_sum` and `_count` samples of family `name` (started with
    /// [`Kind::Histogram`]) with `labels`.
    pub fn export(&self, out: &mut Exposition, name: &str, labels: &[(&str, &str)]) {
        let mut cumulative = 0;
        let bucket_name = format!("{name}_bucket");
        let bounds = BUCKETS_SECONDS.iter().map(|b| b.to_string());
        for (count, le) in self.buckets.iter().zip(bounds.chain(["+Inf".into()])) {
            cumulative += count.load(Ordering::Relaxed);
            let mut with_le = labels.to_vec();
            with_le.push(("le", &le));
            out.sample(&bucket_name, &with_le, cumulative);
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        out.sample(&format!("{name}_sum"), labels, sum);
        out.sample(&format!("{name}_count"), labels, cumulative);
    }
}

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

fn histogram(
    r: &PrometheusRecorder,
    name: &'static str,
    labels: &[(&'static str, &str)],
) -> Histogram {
    let labels: Vec<Label> = labels
        .iter()
        .map(|(k, v)| Label::new(*k, SharedString::from(v.to_string())))
        .collect();
    r.register_histogram(&Key::from_parts(name, labels), &METADATA)
}

fn describe(r: &PrometheusRecorder, name: &'static str, help: &'static str) {
    r.describe_histogram(
        KeyName::from_const_str(name),
        Some(Unit::Seconds),
        help.into(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render_in_the_text_format() {
        let mut out = Exposition::default();
        out.family("ddbcached_x_total", Kind::Counter, "Things.");
        out.sample(
            "ddbcached_x_total",
            &[("op", "kv.get"), ("result", "ok")],
            3,
        );
        out.single("ddbcached_y", Kind::Gauge, "A level.", 1.5);
        out.by_label(
            "ddbcached_z",
            Kind::Gauge,
            "Per t.",
            "t",
            [("a", 1), ("b", 2)],
        );
        assert_eq!(
            out.finish(""),
            "# HELP ddbcached_x_total Things.\n# TYPE ddbcached_x_total counter\n\
             ddbcached_x_total{op=\"kv.get\",result=\"ok\"} 3\n\
             # HELP ddbcached_y A level.\n# TYPE ddbcached_y gauge\nddbcached_y 1.5\n\
             # HELP ddbcached_z Per t.\n# TYPE ddbcached_z gauge\n\
             ddbcached_z{t=\"a\"} 1\nddbcached_z{t=\"b\"} 2\n\n"
        );
    }

    #[test]
    fn durations_render_as_a_cumulative_histogram() {
        let d = Durations::default();
        d.record(Duration::from_micros(7), 3);
        d.record(Duration::from_millis(2), 1);
        d.record(Duration::from_secs(60), 1);
        let mut out = Exposition::default();
        out.family("h_seconds", Kind::Histogram, "H.");
        d.export(&mut out, "h_seconds", &[("op", "x")]);
        let text = out.finish("");
        for line in [
            "# TYPE h_seconds histogram",
            "h_seconds_bucket{op=\"x\",le=\"0.00001\"} 3\n",
            "h_seconds_bucket{op=\"x\",le=\"0.001\"} 3\n",
            "h_seconds_bucket{op=\"x\",le=\"0.0025\"} 4\n",
            "h_seconds_bucket{op=\"x\",le=\"10\"} 4\n",
            "h_seconds_bucket{op=\"x\",le=\"+Inf\"} 5\n",
            "h_seconds_sum{op=\"x\"} 60.002021\n",
            "h_seconds_count{op=\"x\"} 5\n",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
    }

    #[test]
    fn every_op_label_has_its_index() {
        let labels: Vec<_> = op_labels().collect();
        assert_eq!(labels.len(), OP_LABELS);
        for op in Op::ALL {
            assert_eq!(labels[op_index(Some(op))].1, op.name());
        }
        assert_eq!(labels[op_index(None)].1, "invalid");
    }
}
