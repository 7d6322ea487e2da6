//! OpenTelemetry traces through the whole mesh, received by the local mesh's OTLP receiver
//! (`up --otlp local`: a receiver on the official `opentelemetry-proto` types, see
//! `src/otlp.rs`): a call client → a → b gives one trace whose spans link up, with their
//! attributes; an incoming `traceparent` is continued; a collector that is down costs no
//! request and its drops are counted. Needs root; see `tests/support/mod.rs`.

mod support;

use std::time::{Duration, Instant};

use support::{Demo, NS, TestMesh, client, namespace, service_for};
use wasmesh_local::otlp::{SpanLine, read, traces_file};

const B: Demo<'static> = Demo {
    name: "b",
    replicas: 1,
    labels: "app: b",
    ports: &[("http", 8080)],
    grpc_ports: &[],
    args: &[],
    env: &[],
};

/// `a` answers after calling `b`, passing the trace context on (as an instrumented app does).
const A: Demo<'static> = Demo {
    name: "a",
    replicas: 1,
    labels: "app: a",
    ports: &[("http", 8080)],
    grpc_ports: &[],
    args: &["--call", "http://b/"],
    env: &[],
};

fn files() -> Vec<(&'static str, String)> {
    vec![
        ("ns.yaml", namespace()),
        ("a.yaml", A.yaml(NS)),
        (
            "a-svc.yaml",
            service_for(NS, "a", "app: a", &[("http", 80, 8080, "")]),
        ),
        ("b.yaml", B.yaml(NS)),
        (
            "b-svc.yaml",
            service_for(NS, "b", "app: b", &[("http", 80, 8080, "")]),
        ),
        // a's calls to b match a route: a's client span is named after it.
        (
            "b-route.yaml",
            format!(
                r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: b-route, namespace: {NS}}}
spec:
  parentRefs:
  - {{group: "", kind: Service, name: b, port: 80}}
  rules:
  - backendRefs:
    - {{name: b, port: 80}}
"#
            ),
        ),
        ("client.yaml", client(NS, "client", "")),
    ]
}

fn chain_mesh(test: &str, otlp: &str, protocol: &str) -> Option<TestMesh> {
    let files = files();
    let refs: Vec<(&str, &str)> = files.iter().map(|(a, b)| (*a, b.as_str())).collect();
    let (otlp, protocol) = (otlp.to_string(), protocol.to_string());
    let mesh = TestMesh::up_with(test, &refs, move |cfg| {
        cfg.otlp = Some(otlp);
        cfg.otlp_protocol = protocol;
    })?;
    mesh.ready_pods(NS, "a-", 1);
    mesh.ready_pods(NS, "b-", 1);
    mesh.ready_pods(NS, "client", 1);
    mesh.wait_endpoints("client", (NS, "a", 80), 1);
    mesh.wait_endpoints(&mesh.ready_pods(NS, "a-", 1)[0].name, (NS, "b", 80), 1);
    Some(mesh)
}

/// Waits until the receiver has `n` spans of one trace (the sidecars batch for 500 ms).
fn wait_trace(mesh: &TestMesh, pick: impl Fn(&SpanLine) -> bool, n: usize) -> Vec<SpanLine> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let spans = read(&traces_file(&mesh.state));
        if let Some(first) = spans.iter().find(|s| pick(s)) {
            let trace: Vec<SpanLine> = spans
                .iter()
                .filter(|s| s.trace_id == first.trace_id)
                .cloned()
                .collect();
            if trace.len() >= n {
                return trace;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no trace with {n} spans after 30s; the receiver has {} spans: {spans:#?}\nreceiver log: {}\nclient sidecar's log: {}\nclient sidecar's tracing metrics: {:?}",
            spans.len(),
            mesh.log_tail("logs/otlp-receiver.log", 20),
            mesh.log_tail(&format!("logs/{NS}/client/wasmesh-proxy.log"), 20),
            mesh.metrics(NS, "client")
                .into_iter()
                .filter(|(k, _)| k.contains("tracing"))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn one<'a>(spans: &'a [SpanLine], service: &str, kind: &str, what: &str) -> &'a SpanLine {
    let found: Vec<&SpanLine> = spans
        .iter()
        .filter(|s| s.service == service && s.kind == kind)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{what}: want one {kind} span of {service}: {spans:#?}"
    );
    found[0]
}

fn attr<'a>(s: &'a SpanLine, key: &str) -> &'a serde_json::Value {
    s.attributes
        .get(key)
        .unwrap_or_else(|| panic!("span {} has no {key}: {:#?}", s.name, s.attributes))
}

#[test]
fn a_call_through_two_services_is_one_trace_with_linked_spans() {
    for protocol in ["grpc", "http/protobuf"] {
        let test = format!(
            "a_call_through_two_services_is_one_trace_{}",
            protocol.replace('/', "_")
        );
        let Some(mesh) = chain_mesh(&test, "local", protocol) else {
            return;
        };
        let calls = mesh.calls(NS, "client", "http://a/", 1);
        assert!(calls.failures.is_empty(), "{}", calls.output);
        // client sidecar (client span) → a's sidecar (server) → a's own call: a's sidecar
        // (client) → b's sidecar (server).
        let spans = wait_trace(&mesh, |s| s.service == "client" && s.kind == "client", 4);
        assert_eq!(spans.len(), 4, "{protocol}: {spans:#?}");
        let c_out = one(&spans, "client", "client", "client's sidecar");
        let a_in = one(&spans, "a", "server", "a's sidecar, inbound");
        let a_out = one(&spans, "a", "client", "a's sidecar, outbound");
        let b_in = one(&spans, "b", "server", "b's sidecar, inbound");
        // The client sent no context: the client sidecar's span is the root.
        assert_eq!(c_out.parent_span_id, "", "{c_out:#?}");
        assert_eq!(a_in.parent_span_id, c_out.span_id);
        // The app got its sidecar's span as parent and passed the context on: its outbound
        // call continues the trace under that span.
        assert_eq!(a_out.parent_span_id, a_in.span_id);
        assert_eq!(b_in.parent_span_id, a_out.span_id);

        assert_eq!(c_out.name, "GET");
        assert_eq!(attr(c_out, "http.request.method"), "GET");
        assert_eq!(attr(c_out, "url.path"), "/");
        assert_eq!(attr(c_out, "network.protocol.version"), "1.1");
        assert_eq!(attr(c_out, "http.response.status_code"), 200);
        assert_eq!(
            attr(c_out, "wasmesh.destination.service"),
            &format!("{NS}/a")
        );
        assert_eq!(attr(c_out, "server.address"), &format!("a.{NS}.svc"));
        assert_eq!(attr(c_out, "server.port"), 80);
        let a_pod = mesh.ready_pods(NS, "a-", 1)[0].name.clone();
        assert_eq!(
            attr(c_out, "wasmesh.endpoint.pod"),
            &format!("{NS}/{a_pod}")
        );
        assert!(
            attr(c_out, "wasmesh.peer.identity")
                .as_str()
                .is_some_and(|id| id.starts_with("spiffe://")
                    && id.ends_with(&format!("/ns/{NS}/sa/default"))),
            "{c_out:#?}"
        );
        assert_eq!(attr(a_in, "http.response.status_code"), 200);
        assert_eq!(attr(a_in, "server.port"), 8080);
        assert!(attr(a_in, "wasmesh.peer.identity").is_string(), "{a_in:#?}");
        assert_eq!(attr(b_in, "http.request.method"), "GET");
        assert!(
            attr(b_in, "network.protocol.version").is_string(),
            "{b_in:#?}"
        );
        // a → b matched b's HTTPRoute; client → a matched none (checked above: named `GET`).
        let route = attr(a_out, "http.route")
            .as_str()
            .unwrap_or_else(|| panic!("http.route is a string: {a_out:#?}"));
        assert!(route.starts_with(&format!("{NS}/b-route")), "{a_out:#?}");
        assert_eq!(a_out.name, format!("GET {route}"));
        assert!(!c_out.attributes.contains_key("http.route"), "{c_out:#?}");
        // The resource names the workload.
        assert_eq!(a_in.resource["k8s.namespace.name"], NS);
        assert_eq!(a_in.resource["k8s.pod.name"], a_pod.as_str());
        for s in &spans {
            assert!(s.end_unix_nano >= s.start_unix_nano, "{s:#?}");
            assert_eq!(s.status, "unset", "{s:#?}");
        }
        // Parents start before and end after their children.
        assert!(c_out.start_unix_nano <= a_in.start_unix_nano);
        assert!(c_out.end_unix_nano >= a_in.end_unix_nano);
    }
}

#[test]
fn an_incoming_traceparent_is_continued_and_errors_are_marked() {
    let Some(mesh) = chain_mesh("an_incoming_traceparent_is_continued", "local", "grpc") else {
        return;
    };
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let tp = format!("traceparent: 00-{trace}-{parent}-01");
    let calls = mesh.calls_with(NS, "client", "http://b/status/503", 1, &["--header", &tp]);
    assert!(calls.failures.is_empty(), "{}", calls.output);
    let spans = wait_trace(&mesh, |s| s.trace_id == trace, 2);
    let c_out = one(&spans, "client", "client", "client's sidecar");
    let b_in = one(&spans, "b", "server", "b's sidecar");
    assert_eq!(c_out.parent_span_id, parent);
    assert_eq!(b_in.parent_span_id, c_out.span_id);
    assert_eq!(attr(c_out, "http.response.status_code"), 503);
    // Client spans: 5xx is an error; server spans too.
    assert_eq!(c_out.status, "error");
    assert_eq!(b_in.status, "error");
}

#[test]
fn a_collector_that_is_down_costs_no_request_and_drops_are_counted() {
    // Nothing listens there.
    let Some(mesh) = chain_mesh("a_collector_that_is_down", "http://10.244.0.1:4999", "grpc")
    else {
        return;
    };
    let calls = mesh.calls_with(NS, "client", "http://b/", 50, &["--reuse"]);
    assert!(calls.failures.is_empty(), "{}", calls.output);
    assert_eq!(
        calls.statuses(),
        std::collections::BTreeMap::from([(200, 50)]),
        "{}",
        calls.output
    );
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let m = mesh.metrics(NS, "client");
        let recorded = m.get("wasmesh_tracing_spans_total").copied().unwrap_or(0.0);
        let dropped = m
            .get("wasmesh_tracing_spans_dropped_total{reason=\"export_failed\"}")
            .copied()
            .unwrap_or(0.0)
            + m.get("wasmesh_tracing_spans_dropped_total{reason=\"queue_full\"}")
                .copied()
                .unwrap_or(0.0);
        assert!(recorded >= 50.0, "{m:?}");
        if dropped >= 50.0 {
            assert_eq!(m.get("wasmesh_tracing_spans_exported_total"), Some(&0.0));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "spans not counted as dropped after 40s: {m:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
