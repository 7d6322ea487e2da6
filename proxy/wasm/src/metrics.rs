//! Metrics: the ones filters define (`proxy_define_metric` and friends — counters, gauges,
//! histograms, process-wide as in Envoy), the host's own event counters (loads, faults by
//! kind, fail-closed replies, instance replacements) and the guest callbacks run per plugin.
//! [`Metrics::snapshot`] hands the values to the proxy, which encodes them with the rest of its
//! `/metrics`; [`Metrics::render_prometheus`] writes them in the Prometheus text format for
//! callers without an encoder of their own. Filter metrics are named `wasmcustom_<name>`
//! (Envoy's `wasmcustom.<name>` with the dots a Prometheus name can't hold replaced by `_`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Kind of a filter-defined metric (`proxy_metric_type_t`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MetricKind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Distribution of recorded values.
    Histogram,
}

impl MetricKind {
    pub(crate) fn from_abi(v: i32) -> Option<Self> {
        match v {
            0 => Some(Self::Counter),
            1 => Some(Self::Gauge),
            2 => Some(Self::Histogram),
            _ => None,
        }
    }
}

/// Envoy's default histogram buckets.
const BUCKETS: [u64; 19] = [
    1,
    5,
    10,
    25,
    50,
    100,
    250,
    500,
    1_000,
    2_500,
    5_000,
    10_000,
    30_000,
    60_000,
    300_000,
    600_000,
    1_800_000,
    3_600_000,
    u64::MAX,
];

struct Metric {
    name: String,
    kind: MetricKind,
    value: AtomicI64,
    sum: AtomicU64,
    buckets: Vec<AtomicU64>,
}

/// Why a metric operation was refused (mapped to `NOT_FOUND` / `BAD_ARGUMENT`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum MetricError {
    #[error("no metric with id {0}")]
    NotFound(u32),
    #[error("counter {0:?} can only increase")]
    Negative(String),
    #[error("metric {0:?} is a histogram: record values, don't read or increment it")]
    Histogram(String),
}

/// A host event, counted per plugin.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HostEvent {
    /// A plugin loaded (its first instance configured).
    Loaded,
    /// A load failed (validation, link, init, rejected config).
    LoadFailed,
    /// A callback trapped (panic, unreachable, bad pointer handed to the host…).
    Trap,
    /// A callback ran past its deadline.
    Deadline,
    /// An instance hit its memory cap.
    MemoryLimit,
    /// An instance was discarded after a fault and will be recreated.
    InstanceReplaced,
    /// A request got a 503 because a FAIL_CLOSE filter faulted.
    FailClosed,
    /// A filter that faulted was skipped for a request (FAIL_OPEN).
    FailOpen,
}

impl HostEvent {
    const ALL: [HostEvent; 8] = [
        HostEvent::Loaded,
        HostEvent::LoadFailed,
        HostEvent::Trap,
        HostEvent::Deadline,
        HostEvent::MemoryLimit,
        HostEvent::InstanceReplaced,
        HostEvent::FailClosed,
        HostEvent::FailOpen,
    ];

    /// The `event` label.
    pub fn label(self) -> &'static str {
        match self {
            HostEvent::Loaded => "loaded",
            HostEvent::LoadFailed => "load_failed",
            HostEvent::Trap => "trap",
            HostEvent::Deadline => "deadline",
            HostEvent::MemoryLimit => "memory_limit",
            HostEvent::InstanceReplaced => "instance_replaced",
            HostEvent::FailClosed => "fail_closed",
            HostEvent::FailOpen => "fail_open",
        }
    }
}

/// All metrics of one host.
#[derive(Default)]
pub struct Metrics {
    defined: RwLock<Vec<Arc<Metric>>>,
    by_name: Mutex<HashMap<(String, MetricKind), u32>>,
    events: Mutex<HashMap<(String, HostEvent), u64>>,
    /// Guest callbacks run, per plugin name.
    calls: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

/// Every value at one moment, for a caller that encodes them itself.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Filter-defined metrics, in definition order.
    pub defined: Vec<DefinedMetric>,
    /// `(plugin, event, count)`, sorted.
    pub events: Vec<(String, HostEvent, u64)>,
    /// `(plugin, guest callbacks run)`, sorted.
    pub calls: Vec<(String, u64)>,
}

/// One filter-defined metric.
#[derive(Clone, Debug, PartialEq)]
pub struct DefinedMetric {
    /// Prometheus name (`wasmcustom_<name>`).
    pub name: String,
    pub kind: MetricKind,
    /// Counter or gauge value; for histograms the number of samples.
    pub value: i64,
    /// Histograms: the sum of the samples.
    pub sum: u64,
    /// Histograms: `(upper bound, samples in this bucket)` (not cumulative); the last bound is
    /// `f64::INFINITY` (+Inf).
    pub buckets: Vec<(f64, u64)>,
}

/// One value, for callers that want numbers rather than text.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Prometheus name.
    pub name: String,
    /// Labels.
    pub labels: Vec<(String, String)>,
    /// Value (for histograms: the count).
    pub value: f64,
}

impl Metrics {
    /// Defines (or finds) a metric; ids start at 1.
    pub(crate) fn define(&self, kind: MetricKind, name: &str) -> u32 {
        let mut by_name = self.by_name.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(id) = by_name.get(&(name.to_string(), kind)) {
            return *id;
        }
        let mut defined = self.defined.write().unwrap_or_else(|e| e.into_inner());
        defined.push(Arc::new(Metric {
            name: name.to_string(),
            kind,
            value: AtomicI64::new(0),
            sum: AtomicU64::new(0),
            buckets: if kind == MetricKind::Histogram {
                BUCKETS.iter().map(|_| AtomicU64::new(0)).collect()
            } else {
                Vec::new()
            },
        }));
        let id = defined.len() as u32;
        by_name.insert((name.to_string(), kind), id);
        id
    }

    fn get(&self, id: u32) -> Result<Arc<Metric>, MetricError> {
        let defined = self.defined.read().unwrap_or_else(|e| e.into_inner());
        id.checked_sub(1)
            .and_then(|i| defined.get(i as usize))
            .cloned()
            .ok_or(MetricError::NotFound(id))
    }

    pub(crate) fn increment(&self, id: u32, delta: i64) -> Result<(), MetricError> {
        let m = self.get(id)?;
        match m.kind {
            MetricKind::Counter if delta < 0 => Err(MetricError::Negative(m.name.clone())),
            MetricKind::Histogram => Err(MetricError::Histogram(m.name.clone())),
            _ => {
                m.value.fetch_add(delta, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    pub(crate) fn record(&self, id: u32, value: u64) -> Result<(), MetricError> {
        let m = self.get(id)?;
        match m.kind {
            MetricKind::Histogram => {
                let i = BUCKETS
                    .iter()
                    .position(|b| value <= *b)
                    .unwrap_or(BUCKETS.len() - 1);
                m.buckets[i].fetch_add(1, Ordering::Relaxed);
                m.sum.fetch_add(value, Ordering::Relaxed);
                m.value.fetch_add(1, Ordering::Relaxed);
            }
            _ => m.value.store(value as i64, Ordering::Relaxed),
        }
        Ok(())
    }

    pub(crate) fn read(&self, id: u32) -> Result<u64, MetricError> {
        let m = self.get(id)?;
        match m.kind {
            MetricKind::Histogram => Err(MetricError::Histogram(m.name.clone())),
            _ => Ok(m.value.load(Ordering::Relaxed) as u64),
        }
    }

    /// Counts a host event for a plugin.
    pub(crate) fn event(&self, plugin: &str, event: HostEvent) {
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        *events.entry((plugin.to_string(), event)).or_default() += 1;
    }

    /// The counter of guest callbacks for `plugin` (one per name, kept across reloads).
    pub(crate) fn calls_counter(&self, plugin: &str) -> Arc<AtomicU64> {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        calls.entry(plugin.to_string()).or_default().clone()
    }

    /// Guest callbacks run for `plugin` so far.
    pub fn calls(&self, plugin: &str) -> u64 {
        let calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        calls.get(plugin).map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Every value now.
    pub fn snapshot(&self) -> Snapshot {
        let defined = self
            .defined
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|m| DefinedMetric {
                name: prometheus_name(&m.name),
                kind: m.kind,
                value: m.value.load(Ordering::Relaxed),
                sum: m.sum.load(Ordering::Relaxed),
                buckets: BUCKETS
                    .iter()
                    .zip(&m.buckets)
                    .map(|(b, c)| {
                        let le = if *b == u64::MAX {
                            f64::INFINITY
                        } else {
                            *b as f64
                        };
                        (le, c.load(Ordering::Relaxed))
                    })
                    .collect(),
            })
            .collect();
        let mut events: Vec<(String, HostEvent, u64)> = self
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|((p, e), n)| (p.clone(), *e, *n))
            .collect();
        events.sort_by(|a, b| (&a.0, a.1.label()).cmp(&(&b.0, b.1.label())));
        let mut calls: Vec<(String, u64)> = self
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(p, c)| (p.clone(), c.load(Ordering::Relaxed)))
            .collect();
        calls.sort();
        Snapshot {
            defined,
            events,
            calls,
        }
    }

    /// How many times `event` happened to `plugin`.
    pub fn event_count(&self, plugin: &str, event: HostEvent) -> u64 {
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        events
            .get(&(plugin.to_string(), event))
            .copied()
            .unwrap_or(0)
    }

    /// Current value of a filter-defined counter or gauge (histograms: number of samples).
    pub fn filter_metric(&self, name: &str) -> Option<i64> {
        let defined = self.defined.read().unwrap_or_else(|e| e.into_inner());
        defined
            .iter()
            .find(|m| m.name == name)
            .map(|m| m.value.load(Ordering::Relaxed))
    }

    /// Every value, for callers that render their own format.
    pub fn samples(&self) -> Vec<Sample> {
        let mut out = Vec::new();
        for m in self
            .defined
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            out.push(Sample {
                name: prometheus_name(&m.name),
                labels: Vec::new(),
                value: m.value.load(Ordering::Relaxed) as f64,
            });
        }
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        for ((plugin, event), n) in events.iter() {
            out.push(Sample {
                name: "wasmesh_wasm_events_total".into(),
                labels: vec![
                    ("plugin".into(), plugin.clone()),
                    ("event".into(), event.label().into()),
                ],
                value: *n as f64,
            });
        }
        out
    }

    /// Appends every metric in the Prometheus text format (0.0.4).
    pub fn render_prometheus(&self, out: &mut String) {
        {
            let calls = self.snapshot().calls;
            let _ = writeln!(
                out,
                "# HELP wasmesh_wasm_calls_total Guest callbacks run, per Wasm plugin"
            );
            let _ = writeln!(out, "# TYPE wasmesh_wasm_calls_total counter");
            for (plugin, n) in calls {
                let _ = writeln!(
                    out,
                    "wasmesh_wasm_calls_total{{plugin=\"{}\"}} {n}",
                    escape(&plugin)
                );
            }
        }
        {
            let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
            let _ = writeln!(
                out,
                "# HELP wasmesh_wasm_events_total Wasm plugin lifecycle events and faults"
            );
            let _ = writeln!(out, "# TYPE wasmesh_wasm_events_total counter");
            let mut rows: Vec<_> = events.iter().collect();
            rows.sort_by(|a, b| (&a.0.0, a.0.1.label()).cmp(&(&b.0.0, b.0.1.label())));
            for ((plugin, event), n) in rows {
                debug_assert!(HostEvent::ALL.contains(event));
                let _ = writeln!(
                    out,
                    "wasmesh_wasm_events_total{{plugin=\"{}\",event=\"{}\"}} {n}",
                    escape(plugin),
                    event.label()
                );
            }
        }
        for m in self
            .defined
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let name = prometheus_name(&m.name);
            match m.kind {
                MetricKind::Counter => {
                    let _ = writeln!(out, "# TYPE {name} counter");
                    let _ = writeln!(out, "{name} {}", m.value.load(Ordering::Relaxed));
                }
                MetricKind::Gauge => {
                    let _ = writeln!(out, "# TYPE {name} gauge");
                    let _ = writeln!(out, "{name} {}", m.value.load(Ordering::Relaxed));
                }
                MetricKind::Histogram => {
                    let _ = writeln!(out, "# TYPE {name} histogram");
                    let mut cumulative = 0;
                    for (b, c) in BUCKETS.iter().zip(&m.buckets) {
                        cumulative += c.load(Ordering::Relaxed);
                        let le = if *b == u64::MAX {
                            "+Inf".to_string()
                        } else {
                            b.to_string()
                        };
                        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
                    }
                    let _ = writeln!(out, "{name}_sum {}", m.sum.load(Ordering::Relaxed));
                    let _ = writeln!(out, "{name}_count {}", m.value.load(Ordering::Relaxed));
                }
            }
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `wasmcustom_<name>` with every character a Prometheus name can't hold replaced by `_`.
pub(crate) fn prometheus_name(name: &str) -> String {
    let mut out = String::with_capacity(11 + name.len());
    out.push_str("wasmcustom_");
    out.extend(name.chars().map(|c| {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            c
        } else {
            '_'
        }
    }));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_gauges_histograms_render() {
        let m = Metrics::default();
        let c = m.define(MetricKind::Counter, "reqs.total");
        assert_eq!(
            m.define(MetricKind::Counter, "reqs.total"),
            c,
            "defining twice finds the same id"
        );
        let g = m.define(MetricKind::Gauge, "inflight");
        let h = m.define(MetricKind::Histogram, "len");
        m.increment(c, 2).unwrap();
        assert_eq!(
            m.increment(c, -1),
            Err(MetricError::Negative("reqs.total".into()))
        );
        m.increment(g, 3).unwrap();
        m.increment(g, -1).unwrap();
        m.record(h, 7).unwrap();
        assert_eq!(m.read(c).unwrap(), 2);
        assert_eq!(m.read(g).unwrap(), 2);
        assert_eq!(m.read(99), Err(MetricError::NotFound(99)));
        m.event("p", HostEvent::Trap);
        m.calls_counter("p").fetch_add(3, Ordering::Relaxed);
        m.calls_counter("p").fetch_add(1, Ordering::Relaxed);
        assert_eq!(m.calls("p"), 4, "one counter per plugin name");
        let snap = m.snapshot();
        assert_eq!(snap.calls, vec![("p".to_string(), 4)]);
        assert_eq!(snap.events, vec![("p".to_string(), HostEvent::Trap, 1)]);
        let len = snap
            .defined
            .iter()
            .find(|d| d.name == "wasmcustom_len")
            .expect("the histogram");
        assert_eq!((len.value, len.sum), (1, 7));
        assert_eq!(len.buckets.iter().map(|b| b.1).sum::<u64>(), 1);
        assert_eq!(len.buckets.last().map(|b| b.0), Some(f64::INFINITY));
        let mut text = String::new();
        m.render_prometheus(&mut text);
        assert!(text.contains("wasmcustom_reqs_total 2\n"), "{text}");
        assert!(text.contains("wasmcustom_inflight 2\n"), "{text}");
        assert!(
            text.contains("wasmcustom_len_bucket{le=\"10\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("wasmesh_wasm_events_total{plugin=\"p\",event=\"trap\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("wasmesh_wasm_calls_total{plugin=\"p\"} 4\n"),
            "{text}"
        );
    }
}
