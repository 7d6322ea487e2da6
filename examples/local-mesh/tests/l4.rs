//! Kubernetes Service semantics for TCP, through the whole mesh: every pod has the
//! interception rules and the sidecar (`wasmesh-proxy run`), control serves the table, and a
//! client in one pod calls a Service by name. What is checked is what the client sees (which
//! pod answered, or that the call failed and how fast) and, where it matters, the sidecars'
//! counters. Needs root; see `tests/support/mod.rs`.
//!
//! The Service ports are named `tcp…`, so the sidecars treat them as opaque TCP even though
//! the demo app speaks HTTP: the L4 path is what is under test here (HTTP: `l7.rs`).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use support::{NS, TestMesh, backend, client, namespace, service};
use wasmesh_local::mesh::Command as MeshCommand;

fn files(list: &[(&str, String)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| (a.to_string(), b.clone()))
        .collect()
}

fn up(test: &str, list: &[(&str, String)]) -> Option<TestMesh> {
    let owned = files(list);
    let refs: Vec<(&str, &str)> = owned
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    TestMesh::up(test, &refs)
}

/// Waits until the client's sidecar has `n` ready endpoints for the Service port.
fn wait_ready_endpoints(mesh: &TestMesh, client: &str, svc: &str, port: u16, n: usize) {
    mesh.wait_proxy(
        NS,
        client,
        (NS, svc, port),
        &format!("{n} ready endpoints"),
        |eps| eps.iter().filter(|e| e.ready).count() == n && eps.len() == n,
    );
}

fn counter(m: &BTreeMap<String, f64>, name: &str) -> f64 {
    m.get(name).copied().unwrap_or(0.0)
}

#[test]
fn every_replica_is_reached_with_a_roughly_even_spread() {
    let Some(mesh) = up(
        "every_replica_is_reached_with_a_roughly_even_spread",
        &[
            ("ns.yaml", namespace()),
            ("web.yaml", backend(NS, "web", 3, &[("http", 8080)], "")),
            (
                "svc.yaml",
                service(NS, "web", "web", &[("tcp", 80, "http")], ""),
            ),
            ("client.yaml", client(NS, "client", "")),
        ],
    ) else {
        return;
    };
    let pods = mesh.ready_pods(NS, "web-", 3);
    mesh.ready_pods(NS, "client", 1);
    wait_ready_endpoints(&mesh, "client", "web", 80, 3);

    let calls = mesh.calls(NS, "client", "http://web/", 90);
    assert!(calls.failures.is_empty(), "{}", calls.output);
    let tally = calls.tally();
    assert_eq!(tally.len(), 3, "{tally:?}");
    for p in &pods {
        let n = tally.get(&p.name).copied().unwrap_or(0);
        // Expected 30 each; 15 is more than 3 standard deviations away.
        assert!(n >= 15, "{} answered {n} of 90: {tally:?}", p.name);
    }
    // Every call went through both sidecars: the backend saw the inbound proxy's 127.0.0.6,
    // at the pod's own address and port.
    for a in &calls.answers {
        assert!(a.peer.starts_with("127.0.0.6:"), "{a:?}");
        let pod = pods.iter().find(|p| p.name == a.pod).expect("pod");
        assert_eq!(a.served_at, format!("{}:8080", pod.ip), "{a:?}");
    }
    let m = mesh.metrics(NS, "client");
    assert!(
        counter(&m, "wasmesh_outbound_service_connections_total") >= 90.0,
        "{m:?}"
    );
}

#[test]
fn a_named_target_port_reaches_each_pod_on_its_own_number() {
    let web = |name: &str, port: u16| {
        backend(NS, name, 1, &[("http", port)], "")
            .replace(&format!("app: {name}"), &format!("app: web, track: {name}"))
    };
    let Some(mesh) = up(
        "a_named_target_port_reaches_each_pod_on_its_own_number",
        &[
            ("ns.yaml", namespace()),
            ("a.yaml", web("web-a", 8080)),
            ("b.yaml", web("web-b", 9090)),
            (
                "svc.yaml",
                service(NS, "web", "web", &[("tcp", 80, "http")], ""),
            ),
            ("client.yaml", client(NS, "client", "")),
        ],
    ) else {
        return;
    };
    let a = mesh.ready_pods(NS, "web-a-", 1).remove(0);
    let b = mesh.ready_pods(NS, "web-b-", 1).remove(0);
    mesh.ready_pods(NS, "client", 1);
    wait_ready_endpoints(&mesh, "client", "web", 80, 2);
    let calls = mesh.calls(NS, "client", "http://web/", 40);
    assert!(calls.failures.is_empty(), "{}", calls.output);
    let served: BTreeSet<String> = calls.answers.iter().map(|x| x.served_at.clone()).collect();
    assert_eq!(
        served,
        BTreeSet::from([format!("{}:8080", a.ip), format!("{}:9090", b.ip)]),
        "{}",
        calls.output
    );
}

#[test]
fn each_port_of_a_multi_port_service_goes_to_its_own_target_port() {
    let Some(mesh) = up(
        "each_port_of_a_multi_port_service_goes_to_its_own_target_port",
        &[
            ("ns.yaml", namespace()),
            (
                "web.yaml",
                backend(NS, "web", 2, &[("http", 8080), ("admin", 9090)], ""),
            ),
            (
                "svc.yaml",
                service(
                    NS,
                    "web",
                    "web",
                    &[("tcp", 80, "http"), ("tcp-admin", 81, "9090")],
                    "",
                ),
            ),
            ("client.yaml", client(NS, "client", "")),
        ],
    ) else {
        return;
    };
    mesh.ready_pods(NS, "web-", 2);
    mesh.ready_pods(NS, "client", 1);
    wait_ready_endpoints(&mesh, "client", "web", 80, 2);
    wait_ready_endpoints(&mesh, "client", "web", 81, 2);
    for (port, target) in [(80, ":8080"), (81, ":9090")] {
        let calls = mesh.calls(NS, "client", &format!("http://web:{port}/"), 20);
        assert!(calls.failures.is_empty(), "{}", calls.output);
        assert_eq!(calls.tally().len(), 2, "{}", calls.output);
        assert!(
            calls.answers.iter().all(|a| a.served_at.ends_with(target)),
            "port {port}: {}",
            calls.output
        );
    }
    // A port the Service does not have is refused at once.
    let calls = mesh.calls(NS, "client", "http://web:82/", 1);
    assert_eq!(calls.failures.len(), 1, "{}", calls.output);
}

#[test]
fn a_removed_endpoint_gets_no_new_connections_a_second_after_the_change() {
    // The removed backend keeps serving for a while (terminating): only the table keeps
    // connections away from it.
    let deploy = |n: u32| {
        backend(NS, "web", n, &[("http", 8080)], "")
            .replace("\"300ms\"", "\"8s\"")
            .replace(
                "      containers:",
                "      terminationGracePeriodSeconds: 10\n      containers:",
            )
    };
    let Some(mesh) = up(
        "a_removed_endpoint_gets_no_new_connections_a_second_after_the_change",
        &[
            ("ns.yaml", namespace()),
            ("web.yaml", deploy(3)),
            (
                "svc.yaml",
                service(NS, "web", "web", &[("tcp", 80, "http")], ""),
            ),
            ("client.yaml", client(NS, "client", "")),
        ],
    ) else {
        return;
    };
    mesh.ready_pods(NS, "web-", 3);
    mesh.ready_pods(NS, "client", 1);
    wait_ready_endpoints(&mesh, "client", "web", 80, 3);

    mesh.write("web.yaml", &deploy(2));
    let changed = Instant::now();
    let s = mesh.wait("a terminating pod", |s| {
        s.pods
            .iter()
            .any(|p| p.phase == wasmesh_local::state::Phase::Terminating)
    });
    let victim = s
        .pods
        .iter()
        .find(|p| p.phase == wasmesh_local::state::Phase::Terminating)
        .map(|p| p.name.clone())
        .expect("victim");
    std::thread::sleep(Duration::from_secs(1).saturating_sub(changed.elapsed()));
    let calls = mesh.calls(NS, "client", "http://web/", 60);
    assert!(calls.failures.is_empty(), "{}", calls.output);
    let tally = calls.tally();
    assert_eq!(
        tally.get(&victim),
        None,
        "{victim} still got connections: {tally:?}"
    );
    assert_eq!(tally.len(), 2, "{tally:?}");
    // It was still there to be reached: terminating, serving.
    let s = mesh.status();
    assert!(
        s.pods.iter().any(|p| p.name == victim),
        "the victim already left; the test proves nothing"
    );
}

#[test]
fn a_service_without_endpoints_fails_at_once() {
    let Some(mesh) = up(
        "a_service_without_endpoints_fails_at_once",
        &[
            ("ns.yaml", namespace()),
            (
                "svc.yaml",
                service(NS, "nothing", "nobody", &[("tcp", 80, "8080")], ""),
            ),
            ("client.yaml", client(NS, "client", "")),
        ],
    ) else {
        return;
    };
    mesh.ready_pods(NS, "client", 1);
    mesh.wait_proxy(NS, "client", (NS, "nothing", 80), "the Service", |eps| {
        eps.is_empty()
    });
    let calls = mesh.calls(NS, "client", "http://nothing/", 3);
    assert_eq!(calls.failures.len(), 3, "{}", calls.output);
    let ms: Vec<u64> = calls
        .failures
        .iter()
        .filter_map(|f| f.split_whitespace().next().and_then(|n| n.parse().ok()))
        .collect();
    assert_eq!(ms.len(), 3, "{:?}", calls.failures);
    assert!(
        ms.iter().all(|m| *m < 1000),
        "failures took {ms:?} ms: {:?}",
        calls.failures
    );
    let m = mesh.metrics(NS, "client");
    assert!(
        counter(&m, "wasmesh_outbound_refused_no_endpoints_total") >= 3.0,
        "{m:?}"
    );
}

#[test]
fn with_every_endpoint_terminating_the_serving_ones_are_still_used() {
    let deploy = |n: u32| {
        backend(NS, "web", n, &[("http", 8080)], "")
            .replace("\"300ms\"", "\"9s\"")
            .replace(
                "      containers:",
                "      terminationGracePeriodSeconds: 10\n      containers:",
            )
    };
    let Some(mesh) = up(
        "with_every_endpoint_terminating_the_serving_ones_are_still_used",
        &[
            ("ns.yaml", namespace()),
            ("web.yaml", deploy(2)),
            (
                "svc.yaml",
                service(NS, "web", "web", &[("tcp", 80, "http")], ""),
            ),
            ("client.yaml", client(NS, "client", "")),
        ],
    ) else {
        return;
    };
    let pods = mesh.ready_pods(NS, "web-", 2);
    mesh.ready_pods(NS, "client", 1);
    wait_ready_endpoints(&mesh, "client", "web", 80, 2);
    mesh.write("web.yaml", &deploy(0));
    mesh.wait_proxy(
        NS,
        "client",
        (NS, "web", 80),
        "two serving, terminating endpoints",
        |eps| eps.len() == 2 && eps.iter().all(|e| !e.ready && e.serving && e.terminating),
    );
    let calls = mesh.calls(NS, "client", "http://web/", 20);
    assert!(calls.failures.is_empty(), "{}", calls.output);
    let names: BTreeSet<String> = pods.iter().map(|p| p.name.clone()).collect();
    assert!(
        calls.tally().keys().all(|k| names.contains(k)),
        "{}",
        calls.output
    );
}

#[test]
fn client_ip_affinity_sticks_and_is_chosen_again_after_the_timeout() {
    let Some(mesh) = up(
        "client_ip_affinity_sticks_and_is_chosen_again_after_the_timeout",
        &[
            ("ns.yaml", namespace()),
            ("web.yaml", backend(NS, "web", 3, &[("http", 8080)], "")),
            (
                "svc.yaml",
                service(
                    NS,
                    "web",
                    "web",
                    &[("tcp", 80, "http")],
                    "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}\n",
                ),
            ),
            ("client.yaml", client(NS, "client", "")),
        ],
    ) else {
        return;
    };
    mesh.ready_pods(NS, "web-", 3);
    mesh.ready_pods(NS, "client", 1);
    wait_ready_endpoints(&mesh, "client", "web", 80, 3);
    let calls = mesh.calls(NS, "client", "http://web/", 15);
    assert!(calls.failures.is_empty(), "{}", calls.output);
    assert_eq!(
        calls.tally().len(),
        1,
        "15 connections, one endpoint: {}",
        calls.output
    );

    // After the timeout without connections the endpoint is chosen afresh (and sticks again).
    let mut chosen: BTreeSet<String> = calls.tally().into_keys().collect();
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(1300));
        let calls = mesh.calls(NS, "client", "http://web/", 3);
        assert!(calls.failures.is_empty(), "{}", calls.output);
        assert_eq!(calls.tally().len(), 1, "{}", calls.output);
        chosen.extend(calls.tally().into_keys());
        if chosen.len() > 1 {
            return;
        }
    }
    panic!("11 affinity periods all chose {chosen:?}");
}

#[test]
fn headless_services_and_pod_ips_pass_through_the_sidecar() {
    let Some(mesh) = up(
        "headless_services_and_pod_ips_pass_through_the_sidecar",
        &[
            ("ns.yaml", namespace()),
            ("web.yaml", backend(NS, "web", 2, &[("http", 8080)], "")),
            (
                "svc.yaml",
                service(
                    NS,
                    "web-headless",
                    "web",
                    &[("tcp", 8080, "8080")],
                    "  clusterIP: None\n",
                ),
            ),
            ("client.yaml", client(NS, "client", "")),
        ],
    ) else {
        return;
    };
    let pods = mesh.ready_pods(NS, "web-", 2);
    mesh.ready_pods(NS, "client", 1);
    let before = mesh.metrics(NS, "client");
    // By name: the headless Service's names are the pods' addresses.
    let calls = mesh.calls(NS, "client", "http://web-headless:8080/", 5);
    assert!(calls.failures.is_empty(), "{}", calls.output);
    // By pod IP.
    let direct = mesh.calls(NS, "client", &format!("http://{}:8080/", pods[1].ip), 5);
    assert!(direct.failures.is_empty(), "{}", direct.output);
    assert_eq!(
        direct.tally().get(&pods[1].name),
        Some(&5),
        "{}",
        direct.output
    );
    let after = mesh.metrics(NS, "client");
    let delta = |n: &str| counter(&after, n) - counter(&before, n);
    assert_eq!(
        delta("wasmesh_outbound_passthrough_connections_total"),
        10.0,
        "{after:?}"
    );
    assert_eq!(
        delta("wasmesh_outbound_service_connections_total"),
        0.0,
        "{after:?}"
    );
    // Still through the backend's inbound sidecar.
    assert!(
        direct
            .answers
            .iter()
            .all(|a| a.peer.starts_with("127.0.0.6:")),
        "{}",
        direct.output
    );
}

#[test]
fn an_external_name_service_reaches_what_its_name_points_to() {
    let Some(mesh) = up(
        "an_external_name_service_reaches_what_its_name_points_to",
        &[
            ("ns.yaml", namespace()),
            ("web.yaml", backend(NS, "web", 2, &[("http", 8080)], "")),
            (
                "svc.yaml",
                service(NS, "web", "web", &[("tcp", 80, "http")], ""),
            ),
            (
                "alias.yaml",
                format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: alias, namespace: {NS}}}\nspec: {{type: ExternalName, externalName: web.{NS}.svc.cluster.local}}\n"
                ),
            ),
            ("client.yaml", client(NS, "client", "")),
        ],
    ) else {
        return;
    };
    mesh.ready_pods(NS, "web-", 2);
    mesh.ready_pods(NS, "client", 1);
    wait_ready_endpoints(&mesh, "client", "web", 80, 2);
    let before = mesh.metrics(NS, "client");
    let calls = mesh.calls(NS, "client", "http://alias/", 20);
    assert!(calls.failures.is_empty(), "{}", calls.output);
    assert_eq!(calls.tally().len(), 2, "{}", calls.output);
    let after = mesh.metrics(NS, "client");
    // The alias has no address of its own: the connection is to the target Service.
    assert_eq!(
        counter(&after, "wasmesh_outbound_service_connections_total")
            - counter(&before, "wasmesh_outbound_service_connections_total"),
        20.0
    );
}

#[test]
fn a_selector_less_service_uses_the_endpoint_slice_written_for_it() {
    let db = |name: &str, ip: &str| {
        format!(
            r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {NS}
  annotations: {{local.wasmesh.io/pod-ip: "{ip}"}}
spec:
  containers:
  - name: db
    command: ["wasmesh-demo", "backend", "--drain", "0", "--listen", "0.0.0.0:7000"]
    ports: [{{containerPort: 7000}}]
"#
        )
    };
    let legacy = format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: legacy, namespace: {NS}}}
spec:
  ports: [{{port: 5432, targetPort: 7000}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: legacy-1
  namespace: {NS}
  labels: {{kubernetes.io/service-name: legacy}}
addressType: IPv4
ports: [{{port: 7000}}]
endpoints:
- addresses: ["10.244.200.10"]
- addresses: ["10.244.200.11"]
"#
    );
    let Some(mesh) = up(
        "a_selector_less_service_uses_the_endpoint_slice_written_for_it",
        &[
            ("ns.yaml", namespace()),
            ("db1.yaml", db("db-1", "10.244.200.10")),
            ("db2.yaml", db("db-2", "10.244.200.11")),
            ("legacy.yaml", legacy),
            ("client.yaml", client(NS, "client", "")),
        ],
    ) else {
        return;
    };
    let d1 = mesh.ready_pods(NS, "db-1", 1).remove(0);
    assert_eq!(d1.ip.to_string(), "10.244.200.10");
    mesh.ready_pods(NS, "db-2", 1);
    mesh.ready_pods(NS, "client", 1);
    wait_ready_endpoints(&mesh, "client", "legacy", 5432, 2);
    let calls = mesh.calls(NS, "client", "http://legacy:5432/", 30);
    assert!(calls.failures.is_empty(), "{}", calls.output);
    assert_eq!(
        calls.tally().into_keys().collect::<BTreeSet<_>>(),
        BTreeSet::from(["db-1".to_string(), "db-2".to_string()]),
        "{}",
        calls.output
    );
}

#[test]
fn internal_traffic_policy_local_uses_only_the_clients_node() {
    let pod_on = |name: &str, node: Option<&str>| {
        let node = node
            .map(|n| format!("  nodeName: {n}\n"))
            .unwrap_or_default();
        format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {NS}, labels: {{app: web}}}}
spec:
{node}  containers:
  - name: app
    command: ["wasmesh-demo", "backend", "--drain", "0"]
    ports: [{{name: http, containerPort: 8080}}]
"#
        )
    };
    let client_on = |name: &str, node: &str| {
        client(NS, name, "").replace("spec:\n", &format!("spec:\n  nodeName: {node}\n"))
    };
    let Some(mesh) = up(
        "internal_traffic_policy_local_uses_only_the_clients_node",
        &[
            ("ns.yaml", namespace()),
            ("here.yaml", pod_on("web-here", None)),
            ("there1.yaml", pod_on("web-there-1", Some("node-b"))),
            ("there2.yaml", pod_on("web-there-2", Some("node-b"))),
            (
                "svc.yaml",
                service(
                    NS,
                    "web",
                    "web",
                    &[("tcp", 80, "http")],
                    "  internalTrafficPolicy: Local\n",
                ),
            ),
            ("client.yaml", client(NS, "client", "")),
            ("client-b.yaml", client_on("client-b", "node-b")),
            ("client-c.yaml", client_on("client-c", "node-c")),
        ],
    ) else {
        return;
    };
    mesh.ready_pods(NS, "web-", 3);
    for c in ["client", "client-b", "client-c"] {
        mesh.ready_pods(NS, c, 1);
        wait_ready_endpoints(&mesh, c, "web", 80, 3);
    }
    let here = mesh.calls(NS, "client", "http://web/", 10);
    assert!(here.failures.is_empty(), "{}", here.output);
    assert_eq!(
        here.tally().into_keys().collect::<Vec<_>>(),
        ["web-here"],
        "{}",
        here.output
    );
    let there = mesh.calls(NS, "client-b", "http://web/", 20);
    assert!(there.failures.is_empty(), "{}", there.output);
    assert_eq!(
        there.tally().into_keys().collect::<Vec<_>>(),
        ["web-there-1", "web-there-2"],
        "{}",
        there.output
    );
    // No endpoint on node-c: refused (at once; kube-proxy would drop, docs/proxy.md).
    let none = mesh.calls(NS, "client-c", "http://web/", 2);
    assert_eq!(none.failures.len(), 2, "{}", none.output);
    let m = mesh.metrics(NS, "client-c");
    assert!(
        counter(&m, "wasmesh_outbound_refused_local_policy_total") >= 2.0,
        "{m:?}"
    );
}

#[test]
fn traffic_continues_when_control_stops() {
    let Some(mesh) = up(
        "traffic_continues_when_control_stops",
        &[
            ("ns.yaml", namespace()),
            ("web.yaml", backend(NS, "web", 3, &[("http", 8080)], "")),
            (
                "svc.yaml",
                service(NS, "web", "web", &[("tcp", 80, "http")], ""),
            ),
            ("client.yaml", client(NS, "client", "")),
        ],
    ) else {
        return;
    };
    mesh.ready_pods(NS, "web-", 3);
    mesh.ready_pods(NS, "client", 1);
    wait_ready_endpoints(&mesh, "client", "web", 80, 3);
    mesh.send(MeshCommand::StopControl);
    mesh.wait("control stopped", |s| !s.control_running);
    // The sidecar notices the stream is gone...
    let deadline = Instant::now() + support::WAIT;
    while counter(&mesh.metrics(NS, "client"), "wasmesh_control_connected") != 0.0 {
        assert!(
            Instant::now() < deadline,
            "the sidecar never noticed control left"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // ...and keeps serving from its last table.
    let calls = mesh.calls(NS, "client", "http://web/", 30);
    assert!(calls.failures.is_empty(), "{}", calls.output);
    assert_eq!(calls.tally().len(), 3, "{}", calls.output);
    // Control back: the sidecar reconnects.
    mesh.send(MeshCommand::StartControl);
    let deadline = Instant::now() + support::WAIT;
    while counter(&mesh.metrics(NS, "client"), "wasmesh_control_connected") != 1.0 {
        assert!(Instant::now() < deadline, "the sidecar never reconnected");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_rules_exclusions_really_bypass_the_proxy() {
    let Some(mesh) = up(
        "the_rules_exclusions_really_bypass_the_proxy",
        &[
            ("ns.yaml", namespace()),
            (
                "web.yaml",
                backend(
                    NS,
                    "web",
                    1,
                    &[("http", 8080), ("direct", 9090)],
                    "traffic.wasmesh.io/exclude-inbound-ports: \"9090\"",
                ),
            ),
            (
                "svc.yaml",
                service(NS, "web", "web", &[("tcp", 80, "http")], ""),
            ),
            ("client.yaml", client(NS, "client", "")),
            (
                "client-port.yaml",
                client(
                    NS,
                    "client-port",
                    "traffic.wasmesh.io/exclude-outbound-ports: \"8080\"",
                ),
            ),
            (
                "client-cidr.yaml",
                client(
                    NS,
                    "client-cidr",
                    "traffic.wasmesh.io/exclude-outbound-ip-ranges: \"10.244.0.0/16\"",
                ),
            ),
        ],
    ) else {
        return;
    };
    let web = mesh.ready_pods(NS, "web-", 1).remove(0);
    let mut clients = BTreeMap::new();
    for c in ["client", "client-port", "client-cidr"] {
        let p = mesh.ready_pods(NS, c, 1).remove(0);
        wait_ready_endpoints(&mesh, c, "web", 80, 1);
        clients.insert(c, p);
    }
    let outbound =
        |pod: &str| counter(&mesh.metrics(NS, pod), "wasmesh_outbound_connections_total");
    let inbound = || {
        counter(
            &mesh.metrics(NS, &web.name),
            "wasmesh_inbound_connections_total",
        )
    };
    let url = |port: u16| format!("http://{}:{port}/", web.ip);
    let one = |pod: &str, u: &str| {
        let calls = mesh.calls(NS, pod, u, 1);
        assert!(calls.failures.is_empty(), "{pod} → {u}: {}", calls.output);
        calls.answers[0].clone()
    };

    // Excluded inbound port: the app sees the client itself, the backend's sidecar nothing.
    let (o, i) = (outbound("client"), inbound());
    let a = one("client", &url(9090));
    assert!(
        a.peer.starts_with(&format!("{}:", clients["client"].ip)),
        "{a:?}"
    );
    assert_eq!(inbound(), i);
    assert_eq!(outbound("client"), o + 1.0, "captured on the client's side");
    // A port that is not excluded: through the backend's sidecar (peer 127.0.0.6).
    let a = one("client", &url(8080));
    assert!(a.peer.starts_with("127.0.0.6:"), "{a:?}");
    assert_eq!(inbound(), i + 1.0);

    // Excluded outbound port: the client's sidecar never sees it.
    let o = outbound("client-port");
    one("client-port", &url(8080));
    assert_eq!(outbound("client-port"), o);

    // Excluded outbound CIDR: pod IPs bypass the client's sidecar, Services do not.
    let o = outbound("client-cidr");
    one("client-cidr", &url(8080));
    assert_eq!(outbound("client-cidr"), o);
    one("client-cidr", "http://web/");
    assert_eq!(outbound("client-cidr"), o + 1.0);

    // The proxy's UID: never captured (the binary is handed over on stdin, so this works
    // wherever the checkout is).
    let o = outbound("client");
    let status = mesh.status();
    let demo = mesh.bins.dir.join("wasmesh-demo");
    let u = url(8080);
    let argv: Vec<String> = [
        "timeout",
        "30",
        "setpriv",
        "--reuid",
        "1337",
        "--regid",
        "1337",
        "--clear-groups",
        "/proc/self/fd/0",
        "client",
        "--url",
        &u,
        "--count",
        "1",
        "--verbose",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut cmd = wasmesh_local::cli::exec_command(&status, NS, "client", &argv).expect("exec");
    cmd.stdin(std::fs::File::open(&demo).expect("wasmesh-demo"));
    let out = cmd.output().expect("run as 1337");
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("answered by {}", web.name)));
    assert_eq!(outbound("client"), o);
}

#[test]
fn a_refused_connect_fails_over_to_another_endpoint_unnoticed() {
    // `db-1` serves on 7000; `db-2` (no sidecar, so the kernel answers for it) has nothing
    // there and refuses. The slice lists both as ready.
    let db = |name: &str, ip: &str, port: u16, annotations: &str| {
        format!(
            r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {NS}
  annotations: {{local.wasmesh.io/pod-ip: "{ip}"{annotations}}}
spec:
  containers:
  - name: db
    command: ["wasmesh-demo", "backend", "--drain", "0", "--listen", "0.0.0.0:{port}"]
    ports: [{{containerPort: {port}}}]
"#
        )
    };
    let legacy = format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: legacy, namespace: {NS}}}
spec:
  ports: [{{port: 5432, targetPort: 7000}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: legacy-1
  namespace: {NS}
  labels: {{kubernetes.io/service-name: legacy}}
addressType: IPv4
ports: [{{port: 7000}}]
endpoints:
- addresses: ["10.244.200.10"]
- addresses: ["10.244.200.11"]
"#
    );
    let owned = files(&[
        ("ns.yaml", namespace()),
        ("db1.yaml", db("db-1", "10.244.200.10", 7000, "")),
        (
            "db2.yaml",
            db(
                "db-2",
                "10.244.200.11",
                7001,
                ", wasmesh.io/inject: \"false\"",
            ),
        ),
        ("legacy.yaml", legacy),
        ("client.yaml", client(NS, "client", "")),
    ]);
    let refs: Vec<(&str, &str)> = owned
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    // This mesh also runs its sidecars from their binary handed over on stdin.
    let Some(mesh) = TestMesh::up_with(
        "a_refused_connect_fails_over_to_another_endpoint_unnoticed",
        &refs,
        |cfg| cfg.sidecar_exec = wasmesh_local::SidecarExec::Stdin,
    ) else {
        return;
    };
    mesh.ready_pods(NS, "db-1", 1);
    mesh.ready_pods(NS, "db-2", 1);
    mesh.ready_pods(NS, "client", 1);
    wait_ready_endpoints(&mesh, "client", "legacy", 5432, 2);
    let calls = mesh.calls(NS, "client", "http://legacy:5432/", 30);
    assert!(calls.failures.is_empty(), "{}", calls.output);
    assert_eq!(
        calls.tally().into_keys().collect::<Vec<_>>(),
        ["db-1"],
        "{}",
        calls.output
    );
    let m = mesh.metrics(NS, "client");
    assert!(
        counter(&m, "wasmesh_outbound_failovers_total") >= 1.0,
        "{m:?}"
    );
}
