//! The tracing pairs' checks: after a pair's phases, that its spans really reached the
//! receiver. The sidecars' `/metrics` say how many spans each recorded, exported and dropped
//! (`wasmesh_tracing_*`) and how many requests the client side carried
//! (`wasmesh_http_requests_total`); an Envoy's `/stats` say the same with its HCM's tracing
//! decisions and its tracer's counters ([`Sidecar::parse_envoy`]); the receiver
//! ([`crate::otlp`]) says what it decoded. With every request traced the receiver must have 2
//! spans per request (the client side's and the server side's) less what the proxies dropped;
//! with a ratio, about that share of it.
//!
//! Also here: the receiver started for the run, and the check that the `wasmesh` pair the
//! tracing pairs are compared with has tracing off.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use wasmesh_benches::harness::mesh::{self, LOAD_CPU};
use wasmesh_benches::harness::mtls::{Flavor, envoy_sum, prom_sum};
use wasmesh_benches::harness::netns::{Daemon, Placement, Pod, command_in};
use wasmesh_benches::harness::run::{Run, interrupted, tool};

use crate::otlp::Counts;

/// The run's OTLP receiver.
#[derive(Debug, Clone, Copy)]
pub struct Receiver {
    pub addr: SocketAddr,
    pub pid: u32,
    /// What the tracing pairs export with (`OTEL_EXPORTER_OTLP_PROTOCOL`): `grpc` or
    /// `http/protobuf`; the receiver takes both on the one port.
    pub protocol: &'static str,
}

impl Receiver {
    /// Starts `l7 __otlp` in the node's namespace on the load core; returns it once it answers.
    pub fn start(
        run: Run<'_>,
        node: &str,
        addr: SocketAddr,
        protocol: &'static str,
    ) -> anyhow::Result<(Daemon, Self)> {
        let cmd = command_in(
            &Placement {
                ns: node,
                cpu: LOAD_CPU,
                uid: None,
            },
            run.me,
            &[
                "__otlp".into(),
                "--listen".into(),
                addr.to_string(),
                "--max-secs".into(),
                "86400".into(),
            ],
        );
        let mut d = Daemon::spawn("OTLP receiver", cmd, run.dir.join("otlp.log"))?;
        let ready = tool(
            run,
            node,
            &[
                "__wait-http",
                "--addr",
                &addr.to_string(),
                "--path",
                "/count",
                "--secs",
                "30",
            ],
            Duration::from_secs(40),
        );
        d.check()?;
        ready.with_context(|| {
            format!("waiting for the OTLP receiver; its log:\n{}", d.log_tail())
        })?;
        let pid = d.pid();
        Ok((
            d,
            Self {
                addr,
                pid,
                protocol,
            },
        ))
    }

    /// What it has counted so far.
    pub fn counts(&self, run: Run<'_>, node: &str) -> anyhow::Result<Counts> {
        let body = tool(
            run,
            node,
            &[
                "__get",
                "--addr",
                &self.addr.to_string(),
                "--path",
                "/count",
            ],
            Duration::from_secs(30),
        )
        .context("reading the OTLP receiver's counts")?;
        serde_json::from_str(body.trim())
            .with_context(|| format!("the OTLP receiver's counts: {body}"))
    }
}

/// One sidecar's tracing counters (a wasmesh sidecar's, or an Envoy's).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sidecar {
    pub enabled: bool,
    /// HTTP requests from the app (the client side's outbound requests).
    pub requests: f64,
    /// Spans recorded (sampled).
    pub spans: f64,
    pub exported: f64,
    pub dropped_queue_full: f64,
    pub dropped_export_failed: f64,
}

impl Sidecar {
    pub fn parse(metrics: &str) -> Self {
        let g = |name: &str| prom_sum(metrics, name);
        Self {
            enabled: g("wasmesh_tracing_enabled") >= 1.0,
            requests: g("wasmesh_http_requests_total"),
            spans: g("wasmesh_tracing_spans_total"),
            exported: g("wasmesh_tracing_spans_exported_total"),
            dropped_queue_full: g("wasmesh_tracing_spans_dropped_total{reason=\"queue_full\"}"),
            dropped_export_failed: g(
                "wasmesh_tracing_spans_dropped_total{reason=\"export_failed\"}",
            ),
        }
    }

    /// An Envoy's, from its `/stats` (what a tracing pair's stats matcher keeps): requests, its
    /// HCM's `downstream_rq_total`; spans recorded, the requests its HCM decided to trace
    /// (`tracing.random_sampling`, `service_forced`, `client_enabled`: every sampled request
    /// gets a span, exported when the tracer's buffer flushes); exported, the tracer's
    /// `spans_sent`; dropped, its `spans_dropped` (as queue full: Envoy counts a failed export
    /// as sent, so that shows only in the receiver's count).
    pub fn parse_envoy(stats: &str) -> Self {
        let hcm = |suffix: &str| envoy_sum(stats, "http.", suffix);
        Self {
            enabled: stats
                .lines()
                .any(|l| l.starts_with("tracing.opentelemetry.spans_sent:")),
            requests: hcm(".downstream_rq_total"),
            spans: hcm(".tracing.random_sampling")
                + hcm(".tracing.service_forced")
                + hcm(".tracing.client_enabled"),
            exported: envoy_sum(stats, "tracing.opentelemetry.spans_sent", ""),
            dropped_queue_full: envoy_sum(stats, "tracing.opentelemetry.spans_dropped", ""),
            dropped_export_failed: 0.0,
        }
    }

    pub fn dropped(&self) -> f64 {
        self.dropped_queue_full + self.dropped_export_failed
    }

    /// What was counted since `before` (`enabled` is now's).
    pub fn since(&self, before: &Sidecar) -> Sidecar {
        Sidecar {
            enabled: self.enabled,
            requests: self.requests - before.requests,
            spans: self.spans - before.spans,
            exported: self.exported - before.exported,
            dropped_queue_full: self.dropped_queue_full - before.dropped_queue_full,
            dropped_export_failed: self.dropped_export_failed - before.dropped_export_failed,
        }
    }

    /// Every recorded span exported or dropped: nothing left in its queue.
    pub fn flushed(&self) -> bool {
        self.spans <= self.exported + self.dropped()
    }
}

/// The tracing counters of the proxy in `pod` (a wasmesh sidecar's or an Envoy's).
pub fn sidecar(run: Run<'_>, flavor: Flavor, pod: &Pod) -> anyhow::Result<Sidecar> {
    let (path, parse): (_, fn(&str) -> Sidecar) = match flavor {
        Flavor::Wasmesh => ("/metrics", Sidecar::parse),
        Flavor::Envoy => ("/stats", Sidecar::parse_envoy),
    };
    let text = mesh::admin_get(run, pod, path)
        .with_context(|| format!("reading the proxy's {path} in {}", pod.ns))?;
    Ok(parse(&text))
}

/// Fails if the pair's sidecars trace: the pair tracing is compared with must not.
pub fn check_off(run: Run<'_>, client: &Pod, server: &Pod) -> anyhow::Result<()> {
    for (role, pod) in [("client", client), ("server", server)] {
        if sidecar(run, Flavor::Wasmesh, pod)?.enabled {
            bail!(
                "the {role} sidecar of the `wasmesh` pair has tracing on (wasmesh_tracing_enabled \
                 1): the tracing pairs are compared with it, it must be off"
            );
        }
    }
    Ok(())
}

/// What a tracing pair's sidecars and the receiver counted over the pair's life.
#[derive(Debug, Clone)]
pub struct Check {
    /// The share of new traces sampled.
    pub ratio: f64,
    pub client: Sidecar,
    pub server: Sidecar,
    /// What the receiver got from this pair.
    pub received: Counts,
    /// Whether every recorded span was exported or dropped before the counts were read.
    pub flushed: bool,
    /// What does not add up (empty: the row can be trusted).
    pub problems: Vec<String>,
}

impl Check {
    pub fn requests(&self) -> f64 {
        self.client.requests
    }

    pub fn dropped(&self) -> f64 {
        self.client.dropped() + self.server.dropped()
    }

    pub fn recorded(&self) -> f64 {
        self.client.spans + self.server.spans
    }

    pub fn record(&self, rec: &mut BTreeMap<String, f64>) {
        let n = self.requests().max(1.0);
        for (k, v) in [
            ("trace.ratio", self.ratio),
            ("trace.requests", self.requests()),
            ("trace.recorded", self.recorded()),
            (
                "trace.exported",
                self.client.exported + self.server.exported,
            ),
            ("trace.dropped", self.dropped()),
            ("trace.received", self.received.spans as f64),
            ("trace.received_per_request", self.received.spans as f64 / n),
            ("trace.sampled", self.client.spans / n),
            (
                "trace.dropped_share",
                self.dropped() / self.recorded().max(1.0),
            ),
            ("trace.ok", f64::from(u8::from(self.problems.is_empty()))),
        ] {
            rec.insert(k.to_string(), v);
        }
    }

    /// One line for the report.
    pub fn line(&self, pair: &str, round: usize) -> String {
        let n = self.requests();
        let r = &self.received;
        let expected = 2.0 * n * self.ratio;
        let verdict = if self.problems.is_empty() {
            "adds up".to_string()
        } else {
            format!("**does not add up**: {}", self.problems.join("; "))
        };
        format!(
            "{pair} (round {round}): {n:.0} requests (counted by the client side: \
             wasmesh_http_requests_total, or Envoy's downstream_rq_total); spans recorded: \
             client side {:.0} ({:.2} % of the requests), server side {:.0}; exported {:.0}; \
             dropped {:.0} (queue full {:.0}, export failed {:.0}); the receiver decoded {} spans in {} exports ({} client, {} server, {} \
             of them with a parent) = {:.4} per request; expected {}; {verdict}",
            self.client.spans,
            self.client.spans / n.max(1.0) * 100.0,
            self.server.spans,
            self.client.exported + self.server.exported,
            self.dropped(),
            self.client.dropped_queue_full + self.server.dropped_queue_full,
            self.client.dropped_export_failed + self.server.dropped_export_failed,
            r.spans,
            r.exports,
            r.client,
            r.server,
            r.server_with_parent,
            r.spans as f64 / n.max(1.0),
            if self.ratio >= 1.0 {
                format!(
                    "2 × {n:.0} − {:.0} dropped = {:.0}",
                    self.dropped(),
                    expected - self.dropped()
                )
            } else {
                format!(
                    "≈ 2 × {:.0} % × {n:.0} = {expected:.0}, less what was dropped",
                    self.ratio * 100.0
                )
            },
        )
    }
}

/// Waits until both proxies (`flavor`'s) have exported or dropped every span they recorded
/// (wasmesh's exporter sends a batch when it is full or every 5 s, Envoy's every 5 spans or
/// every 5 s; at most `max`), then compares what their counters grew by since
/// `sidecars_before` (client, server; zero for fresh sidecars) with what the receiver got
/// since `before`. Fails only when tracing is not working at all (off, or no span
/// recorded); what does not add up is in [`Check::problems`].
#[allow(clippy::too_many_arguments)]
pub fn check_pair(
    run: Run<'_>,
    flavor: Flavor,
    client: &Pod,
    server: &Pod,
    node: &str,
    receiver: &Receiver,
    (before, sidecars_before): (&Counts, &(Sidecar, Sidecar)),
    ratio: f64,
    max: Duration,
) -> anyhow::Result<Check> {
    let deadline = Instant::now() + max;
    let (c, s) = loop {
        let (c, s) = (sidecar(run, flavor, client)?, sidecar(run, flavor, server)?);
        if (c.flushed() && s.flushed()) || Instant::now() >= deadline || interrupted() {
            break (c.since(&sidecars_before.0), s.since(&sidecars_before.1));
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    for (role, side) in [("client", &c), ("server", &s)] {
        if !side.enabled {
            bail!(
                "the {role} proxy has tracing off (wasmesh_tracing_enabled 0, or no Envoy \
                 tracing.opentelemetry.spans_sent)"
            );
        }
    }
    if c.spans == 0.0 && s.spans == 0.0 && c.requests > 0.0 {
        bail!(
            "the sidecars recorded no span for {:.0} requests at {} % sampling",
            c.requests,
            ratio * 100.0
        );
    }
    let received = receiver.counts(run, node)?.since(before);
    let check = Check {
        ratio,
        client: c,
        server: s,
        received,
        flushed: c.flushed() && s.flushed(),
        problems: Vec::new(),
    };
    Ok(Check {
        problems: problems(&check),
        ..check
    })
}

/// What does not add up in a check.
pub fn problems(c: &Check) -> Vec<String> {
    let mut out = Vec::new();
    let r = &c.received;
    if !c.flushed {
        out.push(format!(
            "spans still queued when the counts were read (recorded {:.0}, exported {:.0}, \
             dropped {:.0})",
            c.recorded(),
            c.client.exported + c.server.exported,
            c.dropped()
        ));
    }
    let exported = c.client.exported + c.server.exported;
    if r.spans as f64 != exported {
        out.push(format!(
            "the receiver decoded {} spans, the sidecars say they exported {exported:.0}",
            r.spans
        ));
    }
    if r.client as f64 != c.client.exported || r.server as f64 != c.server.exported {
        out.push(format!(
            "by kind: the receiver has {} client and {} server spans, the client sidecar \
             exported {:.0}, the server sidecar {:.0}",
            r.client, r.server, c.client.exported, c.server.exported
        ));
    }
    if r.server_with_parent != r.server {
        out.push(format!(
            "{} server spans without a parent (no traceparent from the client sidecar)",
            r.server - r.server_with_parent
        ));
    }
    if c.server.spans != c.client.spans {
        out.push(format!(
            "the server sidecar recorded {:.0} spans, the client sidecar {:.0} (the server side \
             follows the client side's decision: they should be equal)",
            c.server.spans, c.client.spans
        ));
    }
    let n = c.requests();
    if c.ratio >= 1.0 {
        if c.client.spans != n {
            out.push(format!(
                "every request sampled, yet the client sidecar recorded {:.0} spans for {n:.0} \
                 requests",
                c.client.spans
            ));
        }
    } else {
        // New traces are sampled by their random trace id: binomial, 5 standard deviations.
        let mean = n * c.ratio;
        let sd = (n * c.ratio * (1.0 - c.ratio)).sqrt();
        if (c.client.spans - mean).abs() > 5.0 * sd + 1.0 {
            out.push(format!(
                "{:.0} of {n:.0} requests sampled, {mean:.0} ± {:.0} expected",
                c.client.spans,
                5.0 * sd + 1.0
            ));
        }
    }
    out
}

/// The Envoy tracing pairs' settings, for the report's header.
pub fn describe_envoy(addr: SocketAddr, protocol: &str, flush_spans: Option<u32>) -> String {
    let batching = match flush_spans {
        Some(n) => format!(
            "an export every {n} spans (runtime tracing.opentelemetry.min_flush_spans, \
             --envoy-flush-spans) or every 5 s"
        ),
        None => "Envoy's defaults (an export every 5 spans or every 5 s)".to_string(),
    };
    format!(
        "tracing pairs (envoy-traceN): the envoy pair with envoy.tracers.opentelemetry in both \
         HCMs, OTLP ({protocol}) to {addr} through a STATIC cluster, random_sampling N %, \
         traffic_direction OUTBOUND / INBOUND (client span / server span); batching: \
         {batching}; stats: the tracing counters and \
         downstream_rq_total only; the client Envoy starts every trace, the server Envoy follows \
         the traceparent"
    )
}

/// The sidecars' settings, for the report's header.
pub fn describe(addr: SocketAddr, protocol: &str) -> String {
    format!(
        "tracing pairs (wasmesh-traceN): the wasmesh pair with OTEL_EXPORTER_OTLP_ENDPOINT=http://{addr} \
         OTEL_EXPORTER_OTLP_PROTOCOL={protocol} OTEL_TRACES_SAMPLER=parentbased_traceidratio \
         OTEL_TRACES_SAMPLER_ARG=N/100 in both pods (batching: the defaults, queue 2048, batch 512, \
         every 5 s); the load generator sends no traceparent: the client sidecar starts every \
         trace, the server sidecar follows its decision; OTLP receiver `l7 __otlp` in the \
         node's namespace on core {LOAD_CPU} (decodes every export, counts spans by kind)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = "\
# HELP wasmesh_http_requests_total HTTP requests from the app
# TYPE wasmesh_http_requests_total counter
wasmesh_http_requests_total 1000
# TYPE wasmesh_tracing_enabled gauge
wasmesh_tracing_enabled 1
wasmesh_tracing_spans_total 1000
wasmesh_tracing_spans_exported_total 990
wasmesh_tracing_export_failures_total 1
wasmesh_tracing_spans_dropped_total{reason=\"queue_full\"} 4
wasmesh_tracing_spans_dropped_total{reason=\"export_failed\"} 6
";

    fn check(ratio: f64, client_spans: f64, received: Counts) -> Check {
        let side = Sidecar {
            enabled: true,
            requests: 1000.0,
            spans: client_spans,
            exported: client_spans,
            ..Sidecar::default()
        };
        let mut c = Check {
            ratio,
            client: side,
            server: Sidecar {
                requests: 0.0,
                ..side
            },
            received,
            flushed: true,
            problems: Vec::new(),
        };
        c.problems = problems(&c);
        c
    }

    #[test]
    fn reads_the_sidecar_counters() {
        let s = Sidecar::parse(METRICS);
        assert_eq!(
            s,
            Sidecar {
                enabled: true,
                requests: 1000.0,
                spans: 1000.0,
                exported: 990.0,
                dropped_queue_full: 4.0,
                dropped_export_failed: 6.0,
            }
        );
        assert!(s.flushed());
        assert!(!Sidecar::parse("wasmesh_tracing_spans_total 3\n").flushed());
    }

    /// What a tracing Envoy's `/stats` shows (its stats matcher's counters; recorded from
    /// Envoy 1.40 at 30 % sampling, two spans still in the tracer's buffer).
    const ENVOY_STATS: &str = "\
http.outbound_bench.downstream_rq_total: 60
http.outbound_bench.tracing.client_enabled: 0
http.outbound_bench.tracing.health_check: 0
http.outbound_bench.tracing.not_traceable: 48
http.outbound_bench.tracing.random_sampling: 12
http.outbound_bench.tracing.service_forced: 0
tracing.opentelemetry.spans_dropped: 0
tracing.opentelemetry.spans_sent: 10
tracing.opentelemetry.timer_flushed: 1
";

    #[test]
    fn reads_an_envoys_tracing_counters() {
        let e = Sidecar::parse_envoy(ENVOY_STATS);
        assert_eq!(
            e,
            Sidecar {
                enabled: true,
                requests: 60.0,
                spans: 12.0,
                exported: 10.0,
                dropped_queue_full: 0.0,
                dropped_export_failed: 0.0,
            }
        );
        // Two sampled requests' spans wait for the flush timer.
        assert!(!e.flushed());
        let flushed = ENVOY_STATS.replace("spans_sent: 10", "spans_sent: 12");
        assert!(Sidecar::parse_envoy(&flushed).flushed());
        // An Envoy without the tracer (stats off) is not tracing.
        assert!(!Sidecar::parse_envoy("").enabled);
    }

    #[test]
    fn an_interleaved_step_counts_only_what_grew_during_it() {
        // A sidecar that traced at 1 % before this step, then every request during it.
        let before = Sidecar::parse(METRICS);
        let after = Sidecar {
            requests: before.requests + 500.0,
            spans: before.spans + 500.0,
            exported: before.exported + 500.0,
            ..before
        };
        let step = after.since(&before);
        assert_eq!(
            (step.requests, step.spans, step.exported),
            (500.0, 500.0, 500.0)
        );
        assert_eq!(step.dropped(), 0.0);
        assert!(step.enabled && step.flushed());
    }

    #[test]
    fn every_request_traced_adds_up_only_with_two_spans_each() {
        let all = Counts {
            exports: 4,
            spans: 2000,
            client: 1000,
            server: 1000,
            server_with_parent: 1000,
        };
        let c = check(1.0, 1000.0, all);
        assert!(c.problems.is_empty(), "{:?}", c.problems);
        assert!(c.line("wasmesh-trace100", 1).contains("adds up"));
        // Spans lost between the sidecars and the receiver.
        let c = check(
            1.0,
            1000.0,
            Counts {
                spans: 1990,
                server: 990,
                server_with_parent: 990,
                ..all
            },
        );
        assert_eq!(c.problems.len(), 2, "{:?}", c.problems);
        assert!(c.line("wasmesh-trace100", 1).contains("does not add up"));
        // Server spans that started traces of their own.
        let c = check(
            1.0,
            1000.0,
            Counts {
                server_with_parent: 900,
                ..all
            },
        );
        assert_eq!(c.problems.len(), 1, "{:?}", c.problems);
    }

    #[test]
    fn a_ratio_is_checked_within_the_binomial_spread() {
        let at = |client: u64| Counts {
            exports: 1,
            spans: 2 * client,
            client,
            server: client,
            server_with_parent: client,
        };
        // 1 % of 1000: 10 ± 5σ (5 × 3.1 + 1).
        assert!(check(0.01, 12.0, at(12)).problems.is_empty());
        assert_eq!(check(0.01, 40.0, at(40)).problems.len(), 1);
    }
}
