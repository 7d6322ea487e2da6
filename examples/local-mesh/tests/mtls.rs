//! mTLS between sidecars in the local mesh, on by default: what the apps see (plaintext, as
//! always), what the wire carries (TLS, seen by a passive listener), and what is refused
//! (identity mismatch, plaintext to a strict workload, a denied identity), with the sidecars'
//! counters. AuthorizationPolicies in the folder reach the sidecars through control. Most
//! Service ports are named `tcp` (opaque): the L4 path carries them, and a denied connection is
//! closed; on an `http` port the L7 path answers a denied request with 403. Needs root; see
//! `tests/support/mod.rs`.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use support::{NS, TestMesh, WAIT, backend, client, namespace, service};
use wasmesh_local::cli;

fn up(test: &str, list: &[(&str, String)]) -> Option<TestMesh> {
    let refs: Vec<(&str, &str)> = list.iter().map(|(a, b)| (*a, b.as_str())).collect();
    TestMesh::up(test, &refs)
}

fn counter(m: &BTreeMap<String, f64>, name: &str) -> f64 {
    m.get(name).copied().unwrap_or(0.0)
}

/// A bare pod running `command`, with a ServiceAccount and annotations; a server (anything
/// but `sleep`) declares port 8080, which readiness probes.
fn pod(name: &str, sa: &str, annotations: &str, command: &str) -> String {
    let ports = if command.contains("sleep") {
        String::new()
    } else {
        "    ports: [{name: http, containerPort: 8080}]\n".to_string()
    };
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {NS}
  labels: {{app: {name}}}
  annotations: {{{annotations}}}
spec:
  serviceAccountName: {sa}
  terminationGracePeriodSeconds: 0
  containers:
  - name: app
    command: {command}
{ports}"#
    )
}

/// A selector-less Service `name` whose one endpoint is `ip:8080`, standing for `target_pod`
/// (control takes meshed-ness and ServiceAccount from the pod behind targetRef).
fn slice_service(name: &str, ip: &str, target_pod: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {NS}}}
spec:
  ports: [{{name: tcp, port: 80, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: {NS}
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports: [{{name: tcp, port: 8080}}]
endpoints:
- addresses: ["{ip}"]
  conditions: {{ready: true}}
  targetRef: {{kind: Pod, name: {target_pod}, namespace: {NS}}}
"#
    )
}

/// The last lines of a pod's sidecar log, for failure messages.
fn sidecar_log(mesh: &TestMesh, pod: &str) -> String {
    let path = mesh
        .state
        .join("logs")
        .join(NS)
        .join(pod)
        .join("wasmesh-proxy.log");
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(30)..].join("\n");
    format!("--- {} (last 30 lines) ---\n{tail}", path.display())
}

/// Waits until `pod`'s sidecar has `n` ready endpoints for `svc`:80.
fn wait_endpoints(mesh: &TestMesh, pod: &str, svc: &str, n: usize) {
    mesh.wait_proxy(
        NS,
        pod,
        (NS, svc, 80),
        &format!("{n} ready endpoints"),
        |eps| eps.iter().filter(|e| e.ready).count() == n,
    );
}

/// Waits until the sidecar of `pod` has a certificate.
fn wait_certified(mesh: &TestMesh, pod: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = mesh.metrics(NS, pod);
        if counter(&m, "wasmesh_mtls_certificates_total") >= 1.0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the sidecar of {pod} got no certificate: {m:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_app_sees_plaintext_while_the_wire_carries_tls() {
    let Some(mesh) = up(
        "the_app_sees_plaintext_while_the_wire_carries_tls",
        &[
            ("ns.yaml", namespace()),
            ("web.yaml", backend(NS, "web", 2, &[("http", 8080)], "")),
            (
                "svc.yaml",
                service(NS, "web", "web", &[("tcp", 80, "http")], ""),
            ),
            ("client.yaml", client(NS, "client", "")),
            (
                "spy.yaml",
                pod(
                    "spy",
                    "default",
                    "wasmesh.io/inject: \"false\"",
                    r#"["wasmesh-demo", "spy", "--listen", "0.0.0.0:8080"]"#,
                ),
            ),
        ],
    ) else {
        return;
    };
    let webs = mesh.ready_pods(NS, "web-", 2);
    let client_pod = mesh.ready_pods(NS, "client", 1).remove(0);
    let spy = mesh.ready_pods(NS, "spy", 1).remove(0);
    wait_certified(&mesh, "client");
    wait_endpoints(&mesh, "client", "web", 2);

    // The apps: plain HTTP both ends, every call answered, through mTLS.
    let calls = mesh.calls(NS, "client", "http://web/", 20);
    assert!(
        calls.failures.is_empty(),
        "{}\n{}\n{}\n{}",
        calls.output,
        sidecar_log(&mesh, "client"),
        sidecar_log(&mesh, &webs[0].name),
        sidecar_log(&mesh, &webs[1].name)
    );
    assert_eq!(calls.answers.len(), 20, "{}", calls.output);
    let m = mesh.metrics(NS, "client");
    assert!(
        counter(&m, "wasmesh_mtls_outbound_connections_total") >= 20.0,
        "{m:?}"
    );
    let inbound: f64 = webs
        .iter()
        .map(|w| {
            counter(
                &mesh.metrics(NS, &w.name),
                "wasmesh_mtls_inbound_connections_total",
            )
        })
        .sum();
    assert!(
        inbound >= 20.0,
        "backends terminated {inbound} mTLS connections"
    );

    // The wire: an endpoint that stands for the (meshed) client pod but is the spy's address.
    // The client's sidecar speaks TLS to it; the spy prints the first bytes it got.
    mesh.write(
        "wire.yaml",
        &slice_service("wire", &spy.ip.to_string(), "client"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let log = mesh.state.join("logs").join(NS).join("spy").join("app.log");
    loop {
        let _ = mesh.calls(NS, "client", "http://wire/", 1);
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        // Readiness probes connect and send nothing; the client's sidecar sends a handshake.
        let client_ip = format!("first bytes from {}:", client_pod.ip);
        if let Some(line) = text.lines().find(|l| l.starts_with(&client_ip)) {
            let bytes = line.rsplit(": ").next().unwrap_or("");
            assert!(
                bytes.starts_with("16 03"),
                "the wire carries a TLS handshake record, not the app's bytes: {line}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "the spy saw nothing: {text}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn a_server_with_another_identity_is_refused() {
    let Some(mesh) = up(
        "a_server_with_another_identity_is_refused",
        &[
            ("ns.yaml", namespace()),
            ("client.yaml", client(NS, "client", "")),
            (
                "impostor.yaml",
                pod(
                    "impostor",
                    "impostor",
                    "",
                    r#"["wasmesh-demo", "backend", "--listen", "0.0.0.0:8080"]"#,
                ),
            ),
        ],
    ) else {
        return;
    };
    mesh.ready_pods(NS, "client", 1);
    let impostor = mesh.ready_pods(NS, "impostor", 1).remove(0);
    wait_certified(&mesh, "client");
    wait_certified(&mesh, "impostor");
    // The endpoint claims to be the client pod (ServiceAccount default); the impostor's
    // sidecar presents ns/t/sa/impostor.
    mesh.write(
        "fake.yaml",
        &slice_service("fake", &impostor.ip.to_string(), "client"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let calls = mesh.calls(NS, "client", "http://fake/", 1);
        assert!(
            calls.answers.is_empty(),
            "the impostor answered: {}",
            calls.output
        );
        let m = mesh.metrics(NS, "client");
        if counter(&m, "wasmesh_mtls_refused_total{reason=\"wrong_identity\"}") >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no wrong-identity refusal counted: {m:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn strict_refuses_a_non_meshed_client_and_permissive_accepts_it() {
    let Some(mesh) = up(
        "strict_refuses_a_non_meshed_client_and_permissive_accepts_it",
        &[
            ("ns.yaml", namespace()),
            ("web.yaml", backend(NS, "web", 1, &[("http", 8080)], "")),
            (
                "vault.yaml",
                backend(NS, "vault", 1, &[("http", 8080)], "wasmesh.io/mtls: strict"),
            ),
            (
                "svc.yaml",
                service(NS, "web", "web", &[("tcp", 80, "http")], ""),
            ),
            (
                "vsvc.yaml",
                service(NS, "vault", "vault", &[("tcp", 80, "http")], ""),
            ),
            ("client.yaml", client(NS, "client", "")),
            (
                "outsider.yaml",
                client(NS, "outsider", "wasmesh.io/inject: \"false\""),
            ),
        ],
    ) else {
        return;
    };
    mesh.ready_pods(NS, "web-", 1);
    let vault = mesh.ready_pods(NS, "vault-", 1).remove(0);
    mesh.ready_pods(NS, "client", 1);
    mesh.ready_pods(NS, "outsider", 1);
    wait_certified(&mesh, "client");
    wait_certified(&mesh, &vault.name);
    wait_endpoints(&mesh, "client", "vault", 1);
    // Without a sidecar the outsider's client resolves Services to ClusterIPs that nothing
    // serves; it calls the pods' addresses.
    let web = mesh.ready_pods(NS, "web-", 1).remove(0);
    let plain = mesh.calls(NS, "outsider", &format!("http://{}:8080/", web.ip), 5);
    assert!(
        plain.failures.is_empty(),
        "permissive accepts plaintext: {}",
        plain.output
    );
    let refused = mesh.calls(NS, "outsider", &format!("http://{}:8080/", vault.ip), 3);
    assert!(
        refused.answers.is_empty(),
        "strict answered plaintext: {}",
        refused.output
    );
    assert!(
        counter(
            &mesh.metrics(NS, &vault.name),
            "wasmesh_inbound_plaintext_refused_total"
        ) >= 3.0
    );
    let meshed = mesh.calls(NS, "client", "http://vault/", 5);
    assert!(
        meshed.failures.is_empty(),
        "strict accepts mTLS: {}",
        meshed.output
    );
}

/// An AuthorizationPolicy for the `web` pods that lets only ServiceAccount `sa` in, on 8080.
fn web_policy(sa: &str) -> String {
    format!(
        r#"apiVersion: wasmesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: web, namespace: {NS}}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  rules:
  - from: [spiffe://cluster.local/ns/{NS}/sa/{sa}]
    ports: [8080]
"#
    )
}

/// `web` (one replica, port 8080 behind Service port `port_name`), the policy letting only
/// `friend` in, and two sleeping pods with ServiceAccounts `friend` and `stranger`.
fn friend_and_stranger(port_name: &str) -> Vec<(&'static str, String)> {
    vec![
        ("ns.yaml", namespace()),
        ("web.yaml", backend(NS, "web", 1, &[("http", 8080)], "")),
        (
            "svc.yaml",
            service(NS, "web", "web", &[(port_name, 80, "http")], ""),
        ),
        (
            "friend.yaml",
            pod("friend", "friend", "", r#"["sleep", "3600"]"#),
        ),
        (
            "stranger.yaml",
            pod("stranger", "stranger", "", r#"["sleep", "3600"]"#),
        ),
        ("policy.yaml", web_policy("friend")),
    ]
}

/// Calls `url` from `pod` (one new connection each) until `done` holds for a round of calls;
/// panics with the last round after a generous bound.
fn until_calls(
    mesh: &TestMesh,
    pod: &str,
    url: &str,
    what: &str,
    done: impl Fn(&support::Calls) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let calls = mesh.calls(NS, pod, url, 3);
        if done(&calls) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still not after 30 s; last calls from {pod}: {}",
            calls.output
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn authorization_allows_and_denies_by_identity() {
    let Some(mesh) = up(
        "authorization_allows_and_denies_by_identity",
        &friend_and_stranger("tcp"),
    ) else {
        return;
    };
    let web = mesh.ready_pods(NS, "web-", 1).remove(0);
    mesh.ready_pods(NS, "friend", 1);
    mesh.ready_pods(NS, "stranger", 1);
    wait_certified(&mesh, "friend");
    wait_certified(&mesh, "stranger");
    wait_endpoints(&mesh, "friend", "web", 1);
    wait_endpoints(&mesh, "stranger", "web", 1);
    assert!(
        !mesh.state.join("policies").exists(),
        "the policy reaches the sidecars through control, not a folder"
    );
    // The web sidecar received the policy with its first table: no wait.
    let allowed = mesh.calls(NS, "friend", "http://web/", 5);
    assert!(allowed.failures.is_empty(), "{}", allowed.output);
    let denied = mesh.calls(NS, "stranger", "http://web/", 3);
    assert!(
        denied.answers.is_empty(),
        "a denied identity got answers: {}",
        denied.output
    );
    assert!(counter(&mesh.metrics(NS, &web.name), "wasmesh_authz_denied_total") >= 3.0);
    let log = sidecar_log(&mesh, &web.name);
    assert!(
        log.contains(&format!(
            "client=spiffe://cluster.local/ns/{NS}/sa/stranger"
        )) && log.contains(&format!("local=spiffe://cluster.local/ns/{NS}/sa/default")),
        "the denial is logged with both identities: {log}"
    );
}

#[test]
fn changing_a_policy_file_flips_allow_to_deny_for_new_connections() {
    let Some(mesh) = up(
        "changing_a_policy_file_flips_allow_to_deny_for_new_connections",
        &friend_and_stranger("tcp"),
    ) else {
        return;
    };
    let web = mesh.ready_pods(NS, "web-", 1).remove(0);
    mesh.ready_pods(NS, "friend", 1);
    wait_certified(&mesh, "friend");
    wait_endpoints(&mesh, "friend", "web", 1);
    let allowed = mesh.calls(NS, "friend", "http://web/", 3);
    assert!(allowed.failures.is_empty(), "{}", allowed.output);

    // The file now lets another ServiceAccount in: friend's new connections are closed.
    let before = counter(&mesh.metrics(NS, &web.name), "wasmesh_authz_denied_total");
    mesh.write("policy.yaml", &web_policy("someone-else"));
    until_calls(&mesh, "friend", "http://web/", "friend denied", |c| {
        c.answers.is_empty() && c.failures.len() == 3
    });
    assert!(counter(&mesh.metrics(NS, &web.name), "wasmesh_authz_denied_total") >= before + 3.0);

    // And back: allowed again, without restarting anything.
    mesh.write("policy.yaml", &web_policy("friend"));
    until_calls(
        &mesh,
        "friend",
        "http://web/",
        "friend allowed again",
        |c| c.failures.is_empty() && c.answers.len() == 3,
    );
    // Removing the policy opens the port to everyone.
    mesh.ready_pods(NS, "stranger", 1);
    wait_certified(&mesh, "stranger");
    wait_endpoints(&mesh, "stranger", "web", 1);
    mesh.remove("policy.yaml");
    until_calls(
        &mesh,
        "stranger",
        "http://web/",
        "stranger allowed without a policy",
        |c| c.failures.is_empty() && c.answers.len() == 3,
    );
}

#[test]
fn an_http_port_answers_a_denied_identity_with_403() {
    let Some(mesh) = up(
        "an_http_port_answers_a_denied_identity_with_403",
        &friend_and_stranger("http"),
    ) else {
        return;
    };
    let web = mesh.ready_pods(NS, "web-", 1).remove(0);
    mesh.ready_pods(NS, "friend", 1);
    mesh.ready_pods(NS, "stranger", 1);
    wait_certified(&mesh, "friend");
    wait_certified(&mesh, "stranger");
    wait_endpoints(&mesh, "friend", "web", 1);
    wait_endpoints(&mesh, "stranger", "web", 1);

    let allowed = mesh.calls(NS, "friend", "http://web/", 5);
    assert!(allowed.failures.is_empty(), "{}", allowed.output);
    assert_eq!(allowed.statuses(), [(200, 5)].into(), "{}", allowed.output);
    assert!(
        allowed.answers.iter().all(|a| a.pod == web.name),
        "{}",
        allowed.output
    );

    let denied = mesh.calls(NS, "stranger", "http://web/", 4);
    assert!(
        denied.failures.is_empty(),
        "an answer, not a reset: {}",
        denied.output
    );
    assert_eq!(denied.statuses(), [(403, 4)].into(), "{}", denied.output);
    assert!(
        denied
            .answers
            .iter()
            .all(|a| a.error.as_deref() == Some("forbidden") && a.pod == "proxy"),
        "the sidecar answered, saying why: {}",
        denied.output
    );
    assert!(counter(&mesh.metrics(NS, &web.name), "wasmesh_authz_denied_total") >= 4.0);
    let log = sidecar_log(&mesh, &web.name);
    assert!(
        log.contains("request denied by authorization policy")
            && log.contains(&format!(
                "client=spiffe://cluster.local/ns/{NS}/sa/stranger"
            )),
        "the denial is logged with both identities: {log}"
    );

    // The friend is unaffected by the stranger's refusals.
    let again = mesh.calls(NS, "friend", "http://web/", 3);
    assert_eq!(again.statuses(), [(200, 3)].into(), "{}", again.output);
}

#[test]
fn a_ca_rotation_fails_no_request() {
    let Some(mesh) = TestMesh::up_with(
        "a_ca_rotation_fails_no_request",
        &[
            ("ns.yaml", &namespace()),
            ("web.yaml", &backend(NS, "web", 2, &[("http", 8080)], "")),
            (
                "svc.yaml",
                &service(NS, "web", "web", &[("tcp", 80, "http")], ""),
            ),
            ("client.yaml", &client(NS, "client", "")),
        ],
        // Control's default: the window in which every sidecar must be seen trusting both
        // roots, polled between batches of calls, is long even on a loaded machine.
        |cfg| cfg.control_args = vec!["--ca-propagation".into(), "10s".into()],
    ) else {
        return;
    };
    let webs = mesh.ready_pods(NS, "web-", 2);
    mesh.ready_pods(NS, "client", 1);
    wait_certified(&mesh, "client");
    wait_endpoints(&mesh, "client", "web", 2);
    let pods: Vec<String> = ["client".to_string()]
        .into_iter()
        .chain(webs.iter().map(|w| w.name.clone()))
        .collect();
    let logs = || {
        let sidecars: Vec<String> = pods.iter().map(|p| sidecar_log(&mesh, p)).collect();
        format!(
            "{}\n--- control ---\n{}",
            sidecars.join("\n"),
            mesh.log_tail("logs/wasmesh-control.log", 30)
        )
    };
    let root =
        wasmesh_control::identity::Root::generate("cluster.local", Duration::from_secs(3600))
            .expect("a new root");
    let ca_dir = mesh.state.join("ca");
    let started = Instant::now();
    let mut rotated = false;
    let mut total = 0;
    // Per sidecar: seen trusting both roots while still on its first certificate (step 1 of
    // the rotation, before the new root signs), and renewed (step 2).
    let mut trusted_both_first = vec![false; pods.len()];
    let mut renewed = vec![false; pods.len()];
    while started.elapsed() < Duration::from_secs(15) || !renewed.iter().all(|r| *r) {
        assert!(
            started.elapsed() < WAIT + Duration::from_secs(15),
            "the rotation did not reach every sidecar (renewed: {renewed:?})\n{}",
            logs()
        );
        if !rotated && started.elapsed() > Duration::from_secs(1) {
            root.write_to_dir(&ca_dir).expect("new CA files");
            rotated = true;
        }
        // A rotation breaks calls by refusing handshakes (a reset, at once), not by making
        // them slow; refusals are counted below, even those failover hid from the client.
        let calls = mesh.calls(NS, "client", "http://web/", 10);
        assert!(
            calls.failures.is_empty(),
            "a call failed during the rotation ({:?} after the start): {}\n{}",
            started.elapsed(),
            calls.output,
            logs()
        );
        total += calls.answers.len();
        for (i, p) in pods.iter().enumerate() {
            let m = mesh.metrics(NS, p);
            let certificates = counter(&m, "wasmesh_mtls_certificates_total");
            let roots = counter(&m, "wasmesh_mtls_trust_bundle_roots");
            trusted_both_first[i] |= certificates == 1.0 && roots == 2.0;
            renewed[i] = certificates >= 2.0;
        }
    }
    assert!(total >= 50, "{total} calls");
    assert!(
        trusted_both_first.iter().all(|t| *t),
        "every sidecar trusts the new root before it signs (per sidecar: {trusted_both_first:?})\n{}",
        logs()
    );
    // Both roots stay trusted after the renewal, and no handshake was refused on either side.
    for p in &pods {
        let m = mesh.metrics(NS, p);
        assert_eq!(
            counter(&m, "wasmesh_mtls_trust_bundle_roots"),
            2.0,
            "{p}: {m:?}"
        );
        let refused: f64 = m
            .iter()
            .filter(|(k, _)| k.starts_with("wasmesh_mtls_refused_total"))
            .map(|(_, v)| v)
            .sum();
        assert_eq!(refused, 0.0, "{p} refused handshakes: {m:?}\n{}", logs());
    }
    assert_eq!(
        counter(
            &mesh.metrics(NS, "client"),
            "wasmesh_outbound_connect_failures_total"
        ),
        0.0,
        "the client's sidecar failed over\n{}",
        logs()
    );
}

#[test]
fn a_one_minute_certificate_is_renewed_under_a_long_lived_stream() {
    let Some(mesh) = TestMesh::up_with(
        "a_one_minute_certificate_is_renewed_under_a_long_lived_stream",
        &[
            ("ns.yaml", &namespace()),
            ("web.yaml", &backend(NS, "web", 1, &[("http", 8080)], "")),
            (
                "svc.yaml",
                &service(NS, "web", "web", &[("tcp", 80, "http")], ""),
            ),
            ("client.yaml", &client(NS, "client", "")),
        ],
        |cfg| cfg.control_args = vec!["--cert-lifetime".into(), "1m".into()],
    ) else {
        return;
    };
    let web = mesh.ready_pods(NS, "web-", 1).remove(0);
    mesh.ready_pods(NS, "client", 1);
    wait_certified(&mesh, "client");
    wait_certified(&mesh, &web.name);
    wait_endpoints(&mesh, "client", "web", 1);
    let expiry = |pod: &str| {
        counter(
            &mesh.metrics(NS, pod),
            "wasmesh_mtls_certificate_expiry_seconds",
        )
    };
    let first = expiry("client");
    // One kept-alive connection, a call a second for 50 s: the certificates (renewed at ~40 s)
    // change under it.
    let argv: Vec<String> = [
        "timeout",
        "90",
        "wasmesh-demo",
        "client",
        "--url",
        "http://web/",
        "--count",
        "50",
        "--interval",
        "1s",
        "--timeout",
        "3s",
        "--reuse",
        "--verbose",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = cli::exec_command(&mesh.status(), NS, "client", &argv)
        .expect("exec")
        .output()
        .expect("client runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // `#<i> <status> answered by <pod> ... for <peer>`; the summary line says "answered by" too.
    let answers: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with('#') && l.contains(" answered by "))
        .collect();
    assert_eq!(
        answers.len(),
        50,
        "every call on the long-lived connection answered: {stdout}\n{}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        sidecar_log(&mesh, "client"),
        sidecar_log(&mesh, &web.name)
    );
    let peers: std::collections::BTreeSet<&str> = answers
        .iter()
        .filter_map(|l| {
            l.split("  |")
                .next()?
                .rsplit_once(" for ")
                .map(|(_, p)| p.trim())
        })
        .collect();
    assert_eq!(
        peers.len(),
        1,
        "one connection carried every call: {peers:?}"
    );
    for pod in ["client", web.name.as_str()] {
        let m = mesh.metrics(NS, pod);
        assert!(
            counter(&m, "wasmesh_mtls_certificates_total") >= 2.0,
            "{pod} renewed its 1-minute certificate: {m:?}"
        );
    }
    assert!(
        expiry("client") > first,
        "the client's sidecar uses a newer certificate"
    );
    // New connections handshake with the new certificates.
    let calls = mesh.calls(NS, "client", "http://web/", 5);
    assert!(calls.failures.is_empty(), "{}", calls.output);
}

/// The JSON access log lines in a pod's sidecar log (the sidecars run with
/// `--access-log stdout`, which lands in the same file as their own log).
fn access_log(mesh: &TestMesh, pod: &str) -> Vec<serde_json::Value> {
    let path = mesh
        .state
        .join("logs")
        .join(NS)
        .join(pod)
        .join("wasmesh-proxy.log");
    std::fs::read_to_string(&path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("{\"kind\""))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn metrics_and_access_logs_count_every_request_and_connection_exactly() {
    const N: usize = 10;
    let Some(mesh) = TestMesh::up_with(
        "metrics_and_access_logs_count_every_request_and_connection_exactly",
        &[
            ("ns.yaml", &namespace()),
            (
                "web.yaml",
                &backend(NS, "web", 1, &[("http", 8080), ("raw", 8081)], ""),
            ),
            (
                "svc.yaml",
                &service(
                    NS,
                    "web",
                    "web",
                    &[("http", 80, "http"), ("tcp", 81, "raw")],
                    "",
                ),
            ),
            ("client.yaml", &client(NS, "client", "")),
        ],
        |cfg| cfg.proxy_args = vec!["--access-log".into(), "stdout".into()],
    ) else {
        return;
    };
    let web = mesh.ready_pods(NS, "web-", 1).remove(0);
    mesh.ready_pods(NS, "client", 1);
    wait_certified(&mesh, "client");
    wait_certified(&mesh, &web.name);
    for port in [80, 81] {
        mesh.wait_proxy(NS, "client", (NS, "web", port), "1 ready endpoint", |eps| {
            eps.iter().filter(|e| e.ready).count() == 1
        });
    }
    // N HTTP requests (L7, port `http`), then N TCP connections (L4, port `tcp`), each call
    // on a new connection.
    for url in ["http://web/", "http://web:81/"] {
        let calls = mesh.calls(NS, "client", url, N);
        assert!(
            calls.failures.is_empty() && calls.answers.len() == N,
            "{url}: {}\n{}",
            calls.output,
            sidecar_log(&mesh, "client")
        );
    }

    let svc = format!("{NS}/web");
    let closed =
        format!("wasmesh_tcp_connections_closed_total{{direction=\"outbound\",service=\"{svc}\"}}");
    // A connection is counted closed just after the client saw it end.
    let deadline = Instant::now() + Duration::from_secs(20);
    let m = loop {
        let m = mesh.metrics(NS, "client");
        if counter(&m, &closed) == N as f64 || Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let n = N as f64;
    let want = [
        (
            format!(
                "wasmesh_http_responses_total{{direction=\"outbound\",service=\"{svc}\",route=\"\",class=\"2xx\",cause=\"\",peer=\"\"}}"
            ),
            n,
        ),
        (
            format!(
                "wasmesh_http_request_duration_seconds_count{{direction=\"outbound\",service=\"{svc}\"}}"
            ),
            n,
        ),
        (
            format!(
                "wasmesh_tcp_connections_opened_total{{direction=\"outbound\",service=\"{svc}\"}}"
            ),
            n,
        ),
        (closed.clone(), n),
        // One pick per request and per connection, under the pod's name (not its address).
        (
            format!(
                "wasmesh_balancer_picks_total{{service=\"{svc}\",pod=\"{}\"}}",
                web.name
            ),
            2.0 * n,
        ),
        ("wasmesh_http_requests_total".to_string(), n),
        (
            "wasmesh_control_state{state=\"connected\"}".to_string(),
            1.0,
        ),
    ];
    for (key, value) in &want {
        assert_eq!(counter(&m, key), *value, "client: {key} in {m:#?}");
    }
    assert!(counter(&m, "wasmesh_table_version") >= 1.0, "{m:?}");
    assert!(m.contains_key("wasmesh_table_age_seconds"), "{m:?}");

    // The client's access log: one line per request and per connection, bytes as counted.
    let deadline = Instant::now() + Duration::from_secs(20);
    let lines = loop {
        let lines = access_log(&mesh, "client");
        if lines.len() >= 2 * N || Instant::now() > deadline {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let http: Vec<_> = lines.iter().filter(|l| l["kind"] == "http").collect();
    let tcp: Vec<_> = lines.iter().filter(|l| l["kind"] == "tcp").collect();
    assert_eq!((http.len(), tcp.len()), (N, N), "{lines:#?}");
    for l in &http {
        assert_eq!(l["direction"], "outbound", "{l}");
        assert_eq!(l["status"], 200, "{l}");
        assert_eq!(l["service"], svc.as_str(), "{l}");
        assert_eq!(l["method"], "GET", "{l}");
        assert_eq!(l["path"], "/", "{l}");
        assert_eq!(l["upstream"], format!("{}:8080", web.ip), "{l}");
    }
    let sent: u64 = tcp.iter().filter_map(|l| l["sent_bytes"].as_u64()).sum();
    assert_eq!(
        sent as f64,
        counter(
            &m,
            &format!("wasmesh_tcp_sent_bytes_total{{direction=\"outbound\",service=\"{svc}\"}}")
        ),
        "{tcp:#?}"
    );
    assert!(sent > 0);

    // The backend's sidecar: the requests came over mTLS from the client's identity.
    let m = mesh.metrics(NS, &web.name);
    let peer = format!("spiffe://cluster.local/ns/{NS}/sa/default");
    let key = format!(
        "wasmesh_http_responses_total{{direction=\"inbound\",service=\"{svc}\",route=\"\",class=\"2xx\",cause=\"\",peer=\"{peer}\"}}"
    );
    assert_eq!(counter(&m, &key), n, "{key} in {m:#?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let inbound_tcp = loop {
        let n = access_log(&mesh, &web.name)
            .into_iter()
            .filter(|l| l["kind"] == "tcp" && l["peer"] == peer.as_str())
            .count();
        if n >= N || Instant::now() > deadline {
            break n;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(inbound_tcp, N, "{}", sidecar_log(&mesh, &web.name));
}
