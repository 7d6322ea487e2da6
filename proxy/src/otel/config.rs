//! Whether and where spans go: the standard `OTEL_*` environment variables of the pod first,
//! then the mesh-wide settings control ships, then the specification's defaults.
//!
//! | setting | pod environment | control (mesh-wide) | default |
//! |---|---|---|---|
//! | on/off | `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` turn it off | an endpoint turns it on | off (no endpoint) |
//! | endpoint | `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as it is), `OTEL_EXPORTER_OTLP_ENDPOINT` (HTTP: `/v1/traces` appended) | `--otlp-endpoint` (like the generic one) | — |
//! | protocol | `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, `OTEL_EXPORTER_OTLP_PROTOCOL` | `--otlp-protocol` | `http/protobuf` |
//! | headers | `OTEL_EXPORTER_OTLP_TRACES_HEADERS`, else `OTEL_EXPORTER_OTLP_HEADERS` (`key=value,…`, values percent-encoded) | — | — |
//! | timeout | `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT`, `OTEL_EXPORTER_OTLP_TIMEOUT` (ms, per export) | — | 10000 ms |
//! | sampler | `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG` | `--trace-sampling` (parent-based ratio) | `parentbased_always_on` |
//! | batching | `OTEL_BSP_MAX_QUEUE_SIZE`, `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`, `OTEL_BSP_SCHEDULE_DELAY`, `OTEL_BSP_EXPORT_TIMEOUT` | — | 2048, 512, 5000 ms, 30000 ms |
//! | a span per TCP connection (L4: not HTTP) | `WASMESH_TRACE_TCP=true` | — | off |
//! | resource | `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES` | — | `service.name` from the pod's `app.kubernetes.io/name` or `app` label, else its name; `k8s.pod.name`, `k8s.namespace.name` |

use std::collections::BTreeMap;
use std::time::Duration;

use super::sampler::Sampler;

/// OTLP over gRPC or over HTTP with protobuf bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    Grpc,
    #[default]
    HttpProtobuf,
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "grpc" => Ok(Protocol::Grpc),
            "http/protobuf" => Ok(Protocol::HttpProtobuf),
            other => Err(format!(
                "OTLP protocol {other:?}: use grpc or http/protobuf"
            )),
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http/protobuf",
        })
    }
}

/// Everything the tracer and its exporter are built from.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceConfig {
    /// Where to send spans: for OTLP/HTTP the URL to `POST` to, for OTLP/gRPC the server's
    /// `http://host:port`.
    pub endpoint: String,
    pub protocol: Protocol,
    /// Sent with every export (e.g. a vendor's API key).
    pub headers: Vec<(String, String)>,
    pub sampler: Sampler,
    pub queue_size: usize,
    pub batch_size: usize,
    pub schedule_delay: Duration,
    /// The longest one export may take (connect included): the smaller of the exporter's
    /// timeout and the batch processor's.
    pub export_timeout: Duration,
    /// Resource attributes (`service.name` first).
    pub resource: Vec<(String, String)>,
    /// A span for each proxied TCP connection (the L4 path; HTTP has its request spans).
    pub tcp_spans: bool,
}

impl Default for TraceConfig {
    fn default() -> Self {
        TraceConfig {
            endpoint: String::new(),
            protocol: Protocol::default(),
            headers: Vec::new(),
            sampler: Sampler::default(),
            queue_size: 2048,
            batch_size: 512,
            schedule_delay: Duration::from_millis(5000),
            export_timeout: Duration::from_millis(10_000),
            resource: Vec::new(),
            tcp_spans: false,
        }
    }
}

/// What control says for the whole mesh.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MeshTracing {
    /// Empty: control sets no endpoint.
    pub endpoint: String,
    /// Empty: not set.
    pub protocol: String,
    /// Ratio of new traces to record (parent-based); None: not set.
    pub sampling: Option<f64>,
}

/// Who this proxy traces for.
#[derive(Debug, Clone, Default)]
pub struct Workload {
    pub pod_name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
}

/// The configuration to run with (None: tracing off), and warnings about values that were
/// ignored (each names the variable and what it wants).
pub fn resolve(
    env: &dyn Fn(&str) -> Option<String>,
    mesh: Option<&MeshTracing>,
    workload: &Workload,
) -> (Option<TraceConfig>, Vec<String>) {
    let mut warnings = Vec::new();
    let env = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return (None, warnings);
    }
    match env("OTEL_TRACES_EXPORTER").as_deref().map(str::trim) {
        None | Some("otlp") => {}
        Some("none") => return (None, warnings),
        Some(other) => warnings.push(format!(
            "OTEL_TRACES_EXPORTER={other:?}: only otlp (or none) is supported; using otlp"
        )),
    }
    let mesh_endpoint = mesh
        .map(|m| m.endpoint.trim().to_string())
        .filter(|e| !e.is_empty());
    // The signal's own endpoint is a whole URL; the generic one (and control's) a base.
    let (endpoint, base) = match (
        env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        env("OTEL_EXPORTER_OTLP_ENDPOINT"),
        mesh_endpoint,
    ) {
        (Some(e), _, _) => (e, false),
        (None, Some(e), _) | (None, None, Some(e)) => (e, true),
        (None, None, None) => return (None, warnings),
    };
    let mut cfg = TraceConfig::default();

    let protocol = env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .or_else(|| {
            mesh.map(|m| m.protocol.clone())
                .filter(|p| !p.trim().is_empty())
        });
    if let Some(p) = protocol {
        match p.parse() {
            Ok(p) => cfg.protocol = p,
            Err(e) => warnings.push(format!("{e}; using http/protobuf")),
        }
    }

    let sampler_name = env("OTEL_TRACES_SAMPLER");
    if sampler_name.is_some() {
        match Sampler::from_env_values(
            sampler_name.as_deref(),
            env("OTEL_TRACES_SAMPLER_ARG").as_deref(),
        ) {
            Ok(s) => cfg.sampler = s,
            Err(e) => warnings.push(format!("{e}; using parentbased_always_on")),
        }
    } else if let Some(r) = mesh.and_then(|m| m.sampling) {
        cfg.sampler = Sampler::parent_based_ratio(r);
    }

    let mut number = |name: &str, min: u64, into: &mut u64| {
        if let Some(v) = env(name) {
            match v.trim().parse::<u64>() {
                Ok(n) if n >= min => *into = n,
                _ => warnings.push(format!(
                    "{name}={v:?}: want a whole number ≥ {min}; using {into}"
                )),
            }
        }
    };
    let (mut queue, mut batch) = (cfg.queue_size as u64, cfg.batch_size as u64);
    let mut delay = cfg.schedule_delay.as_millis() as u64;
    let mut timeout = 30_000u64;
    number("OTEL_BSP_MAX_QUEUE_SIZE", 1, &mut queue);
    number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 1, &mut batch);
    number("OTEL_BSP_SCHEDULE_DELAY", 1, &mut delay);
    number("OTEL_BSP_EXPORT_TIMEOUT", 1, &mut timeout);
    let mut otlp_timeout = 10_000;
    if env("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT").is_some() {
        number("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", 1, &mut otlp_timeout);
    } else {
        number("OTEL_EXPORTER_OTLP_TIMEOUT", 1, &mut otlp_timeout);
    }
    cfg.queue_size = queue as usize;
    cfg.batch_size = batch.min(queue) as usize;
    cfg.schedule_delay = Duration::from_millis(delay);
    cfg.export_timeout = Duration::from_millis(timeout.min(otlp_timeout));

    let endpoint = endpoint.trim();
    let endpoint = if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    };
    cfg.endpoint = if base && cfg.protocol == Protocol::HttpProtobuf {
        super::export::http_traces_url(&endpoint)
    } else {
        endpoint
    };
    let headers = env("OTEL_EXPORTER_OTLP_TRACES_HEADERS")
        .map(|h| ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", h))
        .or_else(|| env("OTEL_EXPORTER_OTLP_HEADERS").map(|h| ("OTEL_EXPORTER_OTLP_HEADERS", h)));
    if let Some((name, h)) = headers {
        for item in h.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let pair = item
                .split_once('=')
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), percent_decode(v.trim())))
                .filter(|(k, v)| {
                    http::HeaderName::from_bytes(k.as_bytes()).is_ok()
                        && http::HeaderValue::from_str(v).is_ok()
                });
            match pair {
                Some(kv) => cfg.headers.push(kv),
                None => warnings.push(format!(
                    "{name}: {item:?} is not key=value with a valid header name and value; ignored"
                )),
            }
        }
    }
    match env("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION")
        .or_else(|| env("OTEL_EXPORTER_OTLP_COMPRESSION"))
        .as_deref()
        .map(str::trim)
    {
        None | Some("none") => {}
        Some(other) => warnings.push(format!(
            "OTEL_EXPORTER_OTLP_COMPRESSION={other:?}: not supported; spans are sent uncompressed"
        )),
    }

    match env("WASMESH_TRACE_TCP").map(|v| v.trim().to_ascii_lowercase()) {
        None => {}
        Some(v) if v == "true" || v == "1" => cfg.tcp_spans = true,
        Some(v) if v == "false" || v == "0" => {}
        Some(v) => warnings.push(format!(
            "WASMESH_TRACE_TCP={v:?}: want true or false; no span per TCP connection"
        )),
    }

    cfg.resource = resource(
        env("OTEL_SERVICE_NAME"),
        env("OTEL_RESOURCE_ATTRIBUTES"),
        workload,
        &mut warnings,
    );
    (Some(cfg), warnings)
}

/// `service.name` from `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, the workload's
/// labels or its pod name; then the Kubernetes attributes; then the rest of
/// `OTEL_RESOURCE_ATTRIBUTES` (`key=value,key=value`, values percent-encoded).
fn resource(
    service_name: Option<String>,
    attributes: Option<String>,
    w: &Workload,
    warnings: &mut Vec<String>,
) -> Vec<(String, String)> {
    let mut extra: Vec<(String, String)> = Vec::new();
    for item in attributes.iter().flat_map(|a| a.split(',')) {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        match item.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                extra.push((k.trim().to_string(), percent_decode(v.trim())))
            }
            _ => warnings.push(format!(
                "OTEL_RESOURCE_ATTRIBUTES: {item:?} is not key=value; ignored"
            )),
        }
    }
    let name = service_name
        .map(|s| s.trim().to_string())
        .or_else(|| {
            extra
                .iter()
                .find(|(k, _)| k == "service.name")
                .map(|(_, v)| v.clone())
        })
        .or_else(|| w.labels.get("app.kubernetes.io/name").cloned())
        .or_else(|| w.labels.get("app").cloned())
        .unwrap_or_else(|| {
            if w.pod_name.is_empty() {
                "wasmesh-proxy".to_string()
            } else {
                w.pod_name.clone()
            }
        });
    let mut out = vec![("service.name".to_string(), name)];
    if !w.namespace.is_empty() {
        out.push(("service.namespace".into(), w.namespace.clone()));
        out.push(("k8s.namespace.name".into(), w.namespace.clone()));
    }
    if !w.pod_name.is_empty() {
        out.push(("k8s.pod.name".into(), w.pod_name.clone()));
        out.push(("service.instance.id".into(), w.pod_name.clone()));
    }
    for (k, v) in extra {
        if !out.iter().any(|(have, _)| *have == k) {
            out.push((k, v));
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::otel::sampler::Root;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    fn workload() -> Workload {
        Workload {
            pod_name: "web-7d9f-abcde".into(),
            namespace: "shop".into(),
            labels: BTreeMap::from([("app".to_string(), "web".to_string())]),
        }
    }

    #[test]
    fn tcp_spans_only_when_the_pod_asks() {
        let w = workload();
        let on = |v: &str| {
            resolve(
                &env(&[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
                    ("WASMESH_TRACE_TCP", v),
                ]),
                None,
                &w,
            )
        };
        let (c, _) = resolve(
            &env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")]),
            None,
            &w,
        );
        assert!(!c.expect("on").tcp_spans, "off by default");
        for yes in ["true", "TRUE", "1"] {
            let (c, warn) = on(yes);
            assert!(
                c.expect("on").tcp_spans && warn.is_empty(),
                "{yes}: {warn:?}"
            );
        }
        let (c, warn) = on("false");
        assert!(!c.expect("on").tcp_spans && warn.is_empty());
        let (c, warn) = on("sometimes");
        assert!(!c.expect("on").tcp_spans);
        assert!(warn[0].contains("WASMESH_TRACE_TCP"), "{warn:?}");
    }

    #[test]
    fn off_without_an_endpoint_on_with_one_from_the_pod_or_control() {
        let w = workload();
        assert_eq!(resolve(&env(&[]), None, &w).0, None);
        let (c, warn) = resolve(
            &env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")]),
            None,
            &w,
        );
        let c = c.expect("on");
        assert!(warn.is_empty(), "{warn:?}");
        // The generic endpoint is a base: OTLP/HTTP posts to its traces path.
        assert_eq!(c.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(c.export_timeout, Duration::from_secs(10));
        assert_eq!(c.protocol, Protocol::HttpProtobuf);
        assert_eq!(c.sampler, Sampler::ParentBased(Root::AlwaysOn));
        assert_eq!(c.resource[0], ("service.name".into(), "web".into()));
        let mesh = MeshTracing {
            endpoint: "http://otel.observability:4317".into(),
            protocol: "grpc".into(),
            sampling: Some(0.01),
        };
        let c = resolve(&env(&[]), Some(&mesh), &w).0.expect("on");
        assert_eq!(c.endpoint, "http://otel.observability:4317");
        assert_eq!(c.protocol, Protocol::Grpc);
        assert_eq!(c.sampler, Sampler::ParentBased(Root::Ratio(0.01)));
        // The pod's own settings win over control's.
        let c = resolve(
            &env(&[
                (
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    "http://mine:4318/v1/traces",
                ),
                ("OTEL_TRACES_SAMPLER", "always_on"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ]),
            Some(&mesh),
            &w,
        )
        .0
        .expect("on");
        assert_eq!(c.endpoint, "http://mine:4318/v1/traces");
        assert_eq!(c.sampler, Sampler::AlwaysOn);
        assert_eq!(c.protocol, Protocol::HttpProtobuf);
        // And the pod can turn it off.
        assert_eq!(
            resolve(&env(&[("OTEL_SDK_DISABLED", "true")]), Some(&mesh), &w).0,
            None
        );
        assert_eq!(
            resolve(&env(&[("OTEL_TRACES_EXPORTER", "none")]), Some(&mesh), &w).0,
            None
        );
    }

    #[test]
    fn endpoint_headers_and_timeout_follow_the_specification() {
        let w = workload();
        let c = resolve(
            &env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector.obs:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=s%3Dcret, X-Team=pay"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ]),
            None,
            &w,
        )
        .0
        .expect("on");
        // gRPC: the base as it is (a scheme added when missing); no path appended.
        assert_eq!(c.endpoint, "http://collector.obs:4317");
        assert_eq!(
            c.headers,
            vec![
                ("api-key".to_string(), "s=cret".to_string()),
                ("x-team".to_string(), "pay".to_string())
            ]
        );
        assert_eq!(c.export_timeout, Duration::from_millis(2500));
        // The signal's own variables win; its endpoint is a whole URL.
        let c = resolve(
            &env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://generic:4318"),
                (
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    "http://traces:4318/custom",
                ),
                ("OTEL_EXPORTER_OTLP_HEADERS", "a=1"),
                ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "b=2"),
                ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "60000"),
            ]),
            None,
            &w,
        )
        .0
        .expect("on");
        assert_eq!(c.endpoint, "http://traces:4318/custom");
        assert_eq!(c.headers, vec![("b".to_string(), "2".to_string())]);
        // Bounded by the batch processor's export timeout (30 s).
        assert_eq!(c.export_timeout, Duration::from_secs(30));
        let (c, warn) = resolve(
            &env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "novalue,ok=1"),
                ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            ]),
            None,
            &w,
        );
        assert_eq!(
            c.expect("on").headers,
            vec![("ok".to_string(), "1".to_string())]
        );
        assert_eq!(warn.len(), 2, "{warn:?}");
    }

    #[test]
    fn bad_values_are_named_and_defaults_used() {
        let (c, warn) = resolve(
            &env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "half"),
                ("OTEL_BSP_MAX_QUEUE_SIZE", "-1"),
                ("OTEL_RESOURCE_ATTRIBUTES", "team=pay%20ments,broken"),
            ]),
            None,
            &workload(),
        );
        let c = c.expect("still on");
        assert_eq!(c.protocol, Protocol::HttpProtobuf);
        assert_eq!(c.sampler, Sampler::default());
        assert_eq!(c.queue_size, 2048);
        assert!(c.resource.contains(&("team".into(), "pay ments".into())));
        assert_eq!(warn.len(), 4, "{warn:?}");
        assert!(warn.iter().any(|w| w.contains("OTEL_BSP_MAX_QUEUE_SIZE")));
    }

    #[test]
    fn service_name_comes_from_the_environment_then_labels_then_the_pod() {
        let mut w = workload();
        let on = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")];
        let name = |pairs: &[(&str, &str)], w: &Workload| {
            resolve(&env(pairs), None, w).0.expect("on").resource[0]
                .1
                .clone()
        };
        assert_eq!(name(&on, &w), "web");
        assert_eq!(
            name(&[on[0], ("OTEL_SERVICE_NAME", "checkout")], &w),
            "checkout"
        );
        assert_eq!(
            name(
                &[on[0], ("OTEL_RESOURCE_ATTRIBUTES", "service.name=cart")],
                &w
            ),
            "cart"
        );
        w.labels.clear();
        assert_eq!(name(&on, &w), "web-7d9f-abcde");
    }
}
