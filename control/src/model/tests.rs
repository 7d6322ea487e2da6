//! The model against the numbered cases of `k8s-service-semantics.md` that concern the table:
//! YAML in (objects as the API server stores them), table out.

use std::net::IpAddr;

use super::*;
use crate::source::{Event, Kind, Object};

/// Objects exactly as written (no defaulting), as the kube source delivers them.
fn objects(yaml: &str) -> Vec<Object> {
    yaml.split("\n---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|doc| {
            let v: serde_json::Value = serde_saphyr::from_str(doc).expect("test YAML");
            match v["kind"].as_str().expect("kind") {
                "Service" => Object::Service(serde_json::from_value(v).expect("Service")),
                "EndpointSlice" => {
                    Object::EndpointSlice(serde_json::from_value(v).expect("EndpointSlice"))
                }
                "Pod" => Object::Pod(serde_json::from_value(v).expect("Pod")),
                "Node" => Object::Node(serde_json::from_value(v).expect("Node")),
                k => panic!("unexpected kind {k}"),
            }
        })
        .collect()
}

/// A synced model holding `yaml`.
fn model(yaml: &str) -> Model {
    let mut m = Model::new();
    let objs = objects(yaml);
    for kind in Kind::ALL {
        m.apply(Event::Replace {
            kind,
            namespace: None,
            objects: objs.iter().filter(|o| o.kind() == kind).cloned().collect(),
        });
        m.apply(Event::Synced(kind));
    }
    m
}

fn key(svc: &str, port: &str, protocol: Protocol) -> PortKey {
    let (ns, name) = svc.split_once('/').expect("ns/name");
    PortKey {
        namespace: ns.into(),
        service: name.into(),
        port_name: port.into(),
        protocol,
    }
}

fn entry<'m>(m: &'m Model, svc: &str, port: &str) -> &'m ServicePortEntry {
    m.entry(&key(svc, port, Protocol::Tcp))
        .unwrap_or_else(|| panic!("no entry {svc} {port}; have {:?}", m.entries().keys()))
}

/// `addr:port` of every endpoint.
fn eps(e: &ServicePortEntry) -> Vec<String> {
    e.endpoints
        .iter()
        .map(|ep| match ep.address {
            IpAddr::V6(a) => format!("[{a}]:{}", ep.port),
            a => format!("{a}:{}", ep.port),
        })
        .collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

const SVC1: &str = "
apiVersion: v1
kind: Service
metadata: {name: svc1, namespace: ns1}
spec:
  clusterIP: 172.30.0.41
  clusterIPs: [172.30.0.41]
  ports: [{name: p80, port: 80, protocol: TCP, targetPort: 9376}]
";

#[test]
fn case01_cluster_ip_to_endpoint() {
    let m = model(&format!(
        "{SVC1}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: svc1-abc, namespace: ns1, labels: {{kubernetes.io/service-name: svc1}}}}
addressType: IPv4
ports: [{{name: p80, port: 9376, protocol: TCP}}]
endpoints: [{{addresses: [10.180.0.1]}}]
"
    ));
    let e = entry(&m, "ns1/svc1", "p80");
    assert_eq!(e.cluster_ips, vec![ip("172.30.0.41")]);
    assert_eq!(e.port, 80);
    assert_eq!(e.service_type, ServiceType::ClusterIP);
    assert_eq!(eps(e), ["10.180.0.1:9376"]);
    assert!(!e.headless);
    assert_eq!(e.session_affinity_timeout_seconds, None);
}

#[test]
fn case02_port_comes_from_the_slice_not_target_port() {
    let m = model(&format!(
        "{SVC1}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: s, namespace: ns1, labels: {{kubernetes.io/service-name: svc1}}}}
addressType: IPv4
ports: [{{name: p80, port: 8443, protocol: TCP}}]
endpoints: [{{addresses: [10.180.0.1]}}]
"
    ));
    assert_eq!(eps(entry(&m, "ns1/svc1", "p80")), ["10.180.0.1:8443"]);
}

#[test]
fn case03_named_target_port_different_numbers_per_slice() {
    let m = model(
        "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, protocol: TCP, targetPort: example-name}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-a, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 3000, protocol: TCP}]
endpoints: [{addresses: [10.244.0.5]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-b, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 3001, protocol: TCP}]
endpoints: [{addresses: [10.244.0.6]}]
",
    );
    let e = entry(&m, "default/web", "http");
    // clusterIP without clusterIPs still gives the VIP.
    assert_eq!(e.cluster_ips, vec![ip("10.96.0.10")]);
    assert_eq!(eps(e), ["10.244.0.5:3000", "10.244.0.6:3001"]);
}

const MULTI: &str = "
apiVersion: v1
kind: Service
metadata: {name: multi, namespace: default}
spec:
  clusterIP: 10.96.0.20
  ports:
  - {name: portname1, port: 80, protocol: TCP, targetPort: svc1}
  - {name: portname2, port: 81, protocol: TCP, targetPort: svc2}
";

#[test]
fn case04_05_multi_port_services_are_independent_ports() {
    let slices = "
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: multi-1, namespace: default, labels: {kubernetes.io/service-name: multi}}
addressType: IPv4
ports: [{name: portname1, port: 100, protocol: TCP}]
endpoints: [{addresses: [10.244.1.1]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: multi-2, namespace: default, labels: {kubernetes.io/service-name: multi}}
addressType: IPv4
ports: [{name: portname2, port: 101, protocol: TCP}]
endpoints: [{addresses: [10.244.1.2]}]
";
    let mut m = model(&format!("{MULTI}{slices}"));
    assert_eq!(
        eps(entry(&m, "default/multi", "portname1")),
        ["10.244.1.1:100"]
    );
    assert_eq!(
        eps(entry(&m, "default/multi", "portname2")),
        ["10.244.1.2:101"]
    );

    // Deleting pod1's slice empties port 80 only; the delta names only that port.
    let gone = objects(slices.split("\n---\n").nth(1).expect("slice 1"));
    let delta = m.apply(Event::Delete(gone[0].clone()));
    assert_eq!(
        delta.upserts.keys().cloned().collect::<Vec<_>>(),
        vec![key("default/multi", "portname1", Protocol::Tcp)]
    );
    assert!(entry(&m, "default/multi", "portname1").endpoints.is_empty());
    assert_eq!(
        eps(entry(&m, "default/multi", "portname2")),
        ["10.244.1.2:101"]
    );
}

#[test]
fn case06_same_port_number_different_protocols() {
    let m = model(
        "
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: kube-system}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 5353}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dns-x, namespace: kube-system, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 5353, protocol: TCP}]
endpoints: [{addresses: [10.244.0.2]}]
",
    );
    let udp = m
        .entry(&key("kube-system/dns", "dns", Protocol::Udp))
        .expect("udp");
    assert_eq!(eps(udp), ["10.244.0.2:53"]);
    assert_eq!(
        eps(entry(&m, "kube-system/dns", "dns-tcp")),
        ["10.244.0.2:5353"]
    );
    // A TCP-only port does not exist as UDP.
    assert!(
        m.entry(&key("kube-system/dns", "dns-tcp", Protocol::Udp))
            .is_none()
    );
}

#[test]
fn case07_slices_are_unioned_and_case08_duplicates_deduplicated() {
    let m = model(&format!(
        "{SVC1}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: a, namespace: ns1, labels: {{kubernetes.io/service-name: svc1}}}}
addressType: IPv4
ports: [{{name: p80, port: 80, protocol: TCP}}]
endpoints:
- {{addresses: [10.0.1.1], conditions: {{ready: false, serving: true, terminating: true}}}}
- {{addresses: [10.0.1.2]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: b, namespace: ns1, labels: {{kubernetes.io/service-name: svc1}}}}
addressType: IPv4
ports: [{{name: p80, port: 80, protocol: TCP}}]
endpoints:
- {{addresses: [10.0.1.1], conditions: {{ready: true, serving: true, terminating: false}}}}
- {{addresses: [10.0.1.3]}}
"
    ));
    let e = entry(&m, "ns1/svc1", "p80");
    assert_eq!(eps(e), ["10.0.1.1:80", "10.0.1.2:80", "10.0.1.3:80"]);
    let dup = &e.endpoints[0];
    assert!(
        dup.ready && !dup.terminating,
        "the non-terminating copy wins: {dup:?}"
    );
}

#[test]
fn case09_malformed_and_foreign_slices_are_ignored() {
    let m = model(&format!(
        "{SVC1}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: no-label, namespace: ns1}}
addressType: IPv4
ports: [{{name: p80, port: 80, protocol: TCP}}]
endpoints: [{{addresses: [10.0.9.1]}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: fqdn, namespace: ns1, labels: {{kubernetes.io/service-name: svc1}}}}
addressType: FQDN
ports: [{{name: p80, port: 80, protocol: TCP}}]
endpoints: [{{addresses: [db.example.com]}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: nil-name, namespace: ns1, labels: {{kubernetes.io/service-name: svc1}}}}
addressType: IPv4
ports: [{{port: 80, protocol: TCP}}]
endpoints: [{{addresses: [10.0.9.2]}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: zero-port, namespace: ns1, labels: {{kubernetes.io/service-name: svc1}}}}
addressType: IPv4
ports: [{{name: p80, port: 0, protocol: TCP}}]
endpoints: [{{addresses: [10.0.9.3]}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: odd, namespace: ns1, labels: {{kubernetes.io/service-name: svc1}}}}
addressType: IPv4
ports: [{{name: p80, port: 80, protocol: TCP}}]
endpoints:
- {{addresses: []}}
- {{addresses: [not-an-ip]}}
- {{addresses: ['fd00::1']}}
- {{addresses: [10.0.9.4, 10.0.9.5]}}
"
    ));
    // Only the first address of the one good endpoint survives.
    assert_eq!(eps(entry(&m, "ns1/svc1", "p80")), ["10.0.9.4:80"]);
}

#[test]
fn case10_condition_defaults() {
    let m = model(&format!(
        "{SVC1}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: s, namespace: ns1, labels: {{kubernetes.io/service-name: svc1}}}}
addressType: IPv4
ports: [{{name: p80, port: 80, protocol: TCP}}]
endpoints:
- {{addresses: [10.0.0.1], conditions: {{}}}}
- {{addresses: [10.0.0.2], conditions: {{ready: false}}}}
- {{addresses: [10.0.0.3], conditions: {{ready: false, terminating: true}}}}
"
    ));
    let e = entry(&m, "ns1/svc1", "p80");
    let c: Vec<(bool, bool, bool)> = e
        .endpoints
        .iter()
        .map(|ep| (ep.ready, ep.serving, ep.terminating))
        .collect();
    // nil ready → ready; nil serving → serving (kube-proxy's rule); nil terminating → false.
    assert_eq!(
        c,
        [
            (true, true, false),
            (false, true, false),
            (false, true, true)
        ]
    );
}

#[test]
fn case15_headless_services_have_no_vip_but_list_endpoints() {
    let m = model(
        "
apiVersion: v1
kind: Service
metadata: {name: db, namespace: default}
spec:
  clusterIP: None
  ports: [{name: pg, port: 5432, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: labelled, namespace: default, labels: {service.kubernetes.io/headless: ''}}
spec:
  clusterIP: 10.96.0.99
  ports: [{name: http, port: 80, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-1, namespace: default, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
ports: [{name: pg, port: 5432, protocol: TCP}]
endpoints: [{addresses: [10.244.0.7], conditions: {ready: false}}]
",
    );
    let db = entry(&m, "default/db", "pg");
    assert!(db.headless && db.cluster_ips.is_empty());
    assert_eq!(eps(db), ["10.244.0.7:5432"]);
    let l = entry(&m, "default/labelled", "http");
    assert!(l.headless && l.cluster_ips.is_empty());
}

#[test]
fn case16_external_name_is_never_proxied_and_type_changes_follow() {
    let en = "
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: default}
spec:
  type: ExternalName
  externalName: my.database.example.com
  clusterIP: 10.96.0.50
";
    let mut m = model(en);
    let e = m
        .entries()
        .values()
        .find(|e| e.key.service == "ext")
        .expect("ExternalName listed");
    assert_eq!(e.external_name.as_deref(), Some("my.database.example.com"));
    assert!(e.cluster_ips.is_empty(), "a stale clusterIP is not a VIP");

    // ExternalName → ClusterIP: a VIP appears.
    let svc = objects(
        "
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: default}
spec:
  type: ClusterIP
  clusterIP: 10.96.0.51
  ports: [{name: http, port: 80, protocol: TCP}]
",
    );
    let delta = m.apply(Event::Apply(svc[0].clone()));
    assert_eq!(
        delta.removals.len(),
        1,
        "the port-less ExternalName entry goes"
    );
    assert_eq!(
        entry(&m, "default/ext", "http").cluster_ips,
        vec![ip("10.96.0.51")]
    );

    // And back: the VIP disappears.
    m.apply(Event::Apply(objects(en)[0].clone()));
    assert!(
        m.entry(&key("default/ext", "http", Protocol::Tcp))
            .is_none()
    );
}

#[test]
fn case17_service_proxy_name_label_opts_out_unless_it_names_wasmesh() {
    let m = model(
        "
apiVersion: v1
kind: Service
metadata: {name: theirs, namespace: default, labels: {service.kubernetes.io/service-proxy-name: foo-bar}}
spec: {clusterIP: 10.96.0.60, ports: [{name: a, port: 80, protocol: TCP}]}
---
apiVersion: v1
kind: Service
metadata: {name: ours, namespace: default, labels: {service.kubernetes.io/service-proxy-name: wasmesh}}
spec: {clusterIP: 10.96.0.61, ports: [{name: a, port: 80, protocol: TCP}]}
",
    );
    assert!(
        m.entry(&key("default/theirs", "a", Protocol::Tcp))
            .is_none()
    );
    assert!(m.entry(&key("default/ours", "a", Protocol::Tcp)).is_some());
}

#[test]
fn case18_selector_less_service_with_hand_made_slice() {
    let m = model(
        "
apiVersion: v1
kind: Service
metadata: {name: my-service, namespace: default}
spec: {clusterIP: 10.96.0.70, ports: [{port: 80, protocol: TCP, targetPort: 9376}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: my-service-1
  namespace: default
  labels: {kubernetes.io/service-name: my-service, endpointslice.kubernetes.io/managed-by: staff}
addressType: IPv4
ports: [{name: '', port: 9376, protocol: TCP}]
endpoints: [{addresses: [10.4.5.6]}, {addresses: [10.1.2.3]}]
",
    );
    assert_eq!(
        eps(entry(&m, "default/my-service", "")),
        ["10.1.2.3:9376", "10.4.5.6:9376"]
    );
}

#[test]
fn case20_session_affinity_timeout_default_and_explicit() {
    let m = model(
        "
apiVersion: v1
kind: Service
metadata: {name: a, namespace: default}
spec: {clusterIP: 10.96.1.1, sessionAffinity: ClientIP, ports: [{name: x, port: 80, protocol: TCP}]}
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: default}
spec:
  clusterIP: 10.96.1.2
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
  ports: [{name: x, port: 80, protocol: TCP}]
",
    );
    assert_eq!(
        entry(&m, "default/a", "x").session_affinity_timeout_seconds,
        Some(10800)
    );
    assert_eq!(
        entry(&m, "default/b", "x").session_affinity_timeout_seconds,
        Some(60)
    );
}

#[test]
fn case21_to_26_policies_node_ports_external_and_lb_ips() {
    let m = model(
        "
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: default, annotations: {wasmesh.io/balancer: round-robin, other.io/x: z}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.2.1
  externalIPs: [203.0.113.250]
  internalTrafficPolicy: Local
  externalTrafficPolicy: Local
  trafficDistribution: PreferClose
  loadBalancerSourceRanges: [203.0.113.0/25]
  ports: [{name: http, port: 80, protocol: TCP, nodePort: 30080, appProtocol: http}]
status:
  loadBalancer:
    ingress:
    - {ip: 1.2.3.4}
    - {ip: 5.6.7.8, ipMode: Proxy}
    - {hostname: lb.example.com}
",
    );
    let e = entry(&m, "default/lb", "http");
    assert_eq!(e.service_type, ServiceType::LoadBalancer);
    assert_eq!(e.external_ips, vec![ip("203.0.113.250")]);
    assert_eq!(
        e.load_balancer_ips,
        vec![ip("1.2.3.4")],
        "ipMode Proxy and hostnames are not captured"
    );
    assert_eq!(e.node_port, Some(30080));
    assert_eq!(e.internal_traffic_policy, TrafficPolicy::Local);
    assert_eq!(e.external_traffic_policy, TrafficPolicy::Local);
    assert_eq!(e.traffic_distribution.as_deref(), Some("PreferClose"));
    assert_eq!(e.app_protocol.as_deref(), Some("http"));
    assert_eq!(
        e.load_balancer_source_ranges[0].to_string(),
        "203.0.113.0/25"
    );
    assert_eq!(
        e.options.get("balancer").map(String::as_str),
        Some("round-robin")
    );
    assert_eq!(e.options.len(), 1);
}

#[test]
fn case23_topology_hints_and_case27_dual_stack() {
    let m = model(
        "
apiVersion: v1
kind: Service
metadata: {name: ds, namespace: default}
spec:
  clusterIP: 10.96.3.1
  clusterIPs: [10.96.3.1, 'fd00::3:1']
  ipFamilies: [IPv4, IPv6]
  ports: [{name: http, port: 80, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ds-v4, namespace: default, labels: {kubernetes.io/service-name: ds}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.244.0.1]
  zone: zone-a
  nodeName: node-a
  hints: {forZones: [{name: zone-a}], forNodes: [{name: node-a}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ds-v6, namespace: default, labels: {kubernetes.io/service-name: ds}}
addressType: IPv6
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [{addresses: ['fd00:244::1']}]
",
    );
    let e = entry(&m, "default/ds", "http");
    assert_eq!(e.cluster_ips, vec![ip("10.96.3.1"), ip("fd00::3:1")]);
    assert_eq!(eps(e), ["10.244.0.1:8080", "[fd00:244::1]:8080"]);
    let ep = &e.endpoints[0];
    assert_eq!(ep.zone.as_deref(), Some("zone-a"));
    assert_eq!(ep.node_name.as_deref(), Some("node-a"));
    assert_eq!(ep.hint_zones, ["zone-a"]);
    assert_eq!(ep.hint_nodes, ["node-a"]);
}

const WITH_POD_REF: &str = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.4.1, ports: [{name: http, port: 80, protocol: TCP}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [{addresses: [10.244.5.5], targetRef: {kind: Pod, name: web-0}}]
";

const POD: &str = "
apiVersion: v1
kind: Pod
metadata:
  name: web-0
  namespace: shop
  labels: {app: web, version: v2}
  annotations: {wasmesh.io/injected: '{\"version\":\"0.1.0\"}'}
spec:
  serviceAccountName: web-sa
  containers: [{name: app, image: web}]
";

#[test]
fn endpoints_carry_the_pod_behind_them_and_follow_pod_changes() {
    let mut m = model(WITH_POD_REF);
    let w = entry(&m, "shop/web", "http").endpoints[0]
        .workload
        .clone()
        .expect("workload");
    assert_eq!((w.name.as_str(), w.namespace.as_str()), ("web-0", "shop"));
    assert!(!w.meshed && w.labels.is_empty(), "pod not known yet");

    let delta = m.apply(Event::Apply(objects(POD)[0].clone()));
    assert_eq!(
        delta.upserts.len(),
        1,
        "the pod's arrival updates the Service that lists it"
    );
    let w = entry(&m, "shop/web", "http").endpoints[0]
        .workload
        .clone()
        .expect("workload");
    assert!(w.meshed);
    assert_eq!(w.service_account.as_deref(), Some("web-sa"));
    assert_eq!(w.labels.get("version").map(String::as_str), Some("v2"));

    // A change to something control does not keep changes nothing.
    let mut pod = objects(POD)[0].clone();
    if let Object::Pod(p) = &mut pod {
        p.status = Some(Default::default());
    }
    assert!(m.apply(Event::Apply(pod)).is_empty());
}

#[test]
fn not_synced_until_every_kind_is_listed() {
    let mut m = Model::new();
    let objs = objects(SVC1);
    m.apply(Event::Replace {
        kind: Kind::Service,
        namespace: None,
        objects: objs,
    });
    m.apply(Event::Synced(Kind::Service));
    assert!(!m.is_synced());
    assert_eq!(
        m.unsynced(),
        [
            Kind::EndpointSlice,
            Kind::Pod,
            Kind::Node,
            Kind::HttpRoute,
            Kind::WasmPlugin,
            Kind::AuthorizationPolicy
        ]
    );
    for k in [
        Kind::EndpointSlice,
        Kind::Pod,
        Kind::Node,
        Kind::HttpRoute,
        Kind::WasmPlugin,
    ] {
        m.apply(Event::Synced(k));
    }
    assert!(!m.is_synced(), "policies are not known yet: not \"none\"");
    m.apply(Event::Synced(Kind::AuthorizationPolicy));
    assert!(m.is_synced());
}

fn policy(ns: &str, name: &str, from: &str) -> Object {
    Object::AuthorizationPolicy(
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns},
            "spec": {"rules": [{"from": [from], "ports": [8080]}]},
        }))
        .expect("policy"),
    )
}

#[test]
fn policies_are_deltas_of_their_own() {
    let mut m = Model::new();
    let d = m.apply(Event::Replace {
        kind: Kind::AuthorizationPolicy,
        namespace: None,
        objects: vec![policy("a", "p1", "ns/x"), policy("b", "p2", "*")],
    });
    assert_eq!(
        d.policy_upserts.keys().collect::<Vec<_>>(),
        ["a/p1", "b/p2"]
    );
    assert!(d.upserts.is_empty() && d.plugin_upserts.is_empty());
    assert_eq!(m.policies()["a/p1"].to_proto().rules[0].from, ["ns/x"]);

    // The same again changes nothing; a change is that policy alone.
    assert!(m.apply(Event::Apply(policy("a", "p1", "ns/x"))).is_empty());
    let d = m.apply(Event::Apply(policy("a", "p1", "ns/y")));
    assert_eq!(d.policy_upserts.keys().collect::<Vec<_>>(), ["a/p1"]);
    assert!(d.policy_removals.is_empty());

    // A re-list of one namespace drops what it no longer has, there only.
    let d = m.apply(Event::Replace {
        kind: Kind::AuthorizationPolicy,
        namespace: Some("a".into()),
        objects: vec![],
    });
    assert_eq!(d.policy_removals.iter().collect::<Vec<_>>(), ["a/p1"]);
    assert_eq!(m.policies().keys().collect::<Vec<_>>(), ["b/p2"]);
    let d = m.apply(Event::Delete(policy("b", "p2", "*")));
    assert_eq!(d.policy_removals.iter().collect::<Vec<_>>(), ["b/p2"]);
    assert!(m.policies().is_empty());
}

#[test]
fn a_relist_removes_ghosts_in_its_scope_only() {
    let two_ns = "
apiVersion: v1
kind: Service
metadata: {name: a, namespace: ns1}
spec: {clusterIP: 10.96.5.1, ports: [{name: x, port: 80, protocol: TCP}]}
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: ns1}
spec: {clusterIP: 10.96.5.2, ports: [{name: x, port: 80, protocol: TCP}]}
---
apiVersion: v1
kind: Service
metadata: {name: c, namespace: ns2}
spec: {clusterIP: 10.96.5.3, ports: [{name: x, port: 80, protocol: TCP}]}
";
    let mut m = model(two_ns);
    let objs = objects(two_ns);
    // ns1 is re-listed without `b`: b goes, a is unchanged, ns2 is untouched.
    let delta = m.apply(Event::Replace {
        kind: Kind::Service,
        namespace: Some("ns1".into()),
        objects: vec![objs[0].clone()],
    });
    assert!(
        delta.upserts.is_empty(),
        "unchanged objects produce no change"
    );
    assert_eq!(
        delta.removals.into_iter().collect::<Vec<_>>(),
        vec![key("ns1/b", "x", Protocol::Tcp)]
    );
    assert!(m.entry(&key("ns2/c", "x", Protocol::Tcp)).is_some());
}

#[test]
fn a_slice_relabelled_to_another_service_moves_its_endpoints() {
    let yaml = "
apiVersion: v1
kind: Service
metadata: {name: a, namespace: d}
spec: {clusterIP: 10.96.6.1, ports: [{name: x, port: 80, protocol: TCP}]}
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: d}
spec: {clusterIP: 10.96.6.2, ports: [{name: x, port: 80, protocol: TCP}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: s, namespace: d, labels: {kubernetes.io/service-name: a}}
addressType: IPv4
ports: [{name: x, port: 80, protocol: TCP}]
endpoints: [{addresses: [10.244.6.1]}]
";
    let mut m = model(yaml);
    assert_eq!(eps(entry(&m, "d/a", "x")), ["10.244.6.1:80"]);
    let moved = yaml.replace("service-name: a}", "service-name: b}");
    let slice = objects(&moved).pop().expect("slice");
    let delta = m.apply(Event::Apply(slice));
    assert_eq!(delta.upserts.len(), 2);
    assert!(entry(&m, "d/a", "x").endpoints.is_empty());
    assert_eq!(eps(entry(&m, "d/b", "x")), ["10.244.6.1:80"]);
}

#[test]
fn nodes_carry_zone_and_addresses() {
    let mut m = model(
        "
apiVersion: v1
kind: Node
metadata: {name: node-a, labels: {topology.kubernetes.io/zone: zone-a}}
status: {addresses: [{type: InternalIP, address: 192.168.1.10}, {type: Hostname, address: node-a}]}
",
    );
    let n = m.nodes().get("node-a").expect("node");
    assert_eq!(n.zone.as_deref(), Some("zone-a"));
    assert_eq!(n.addresses, vec![ip("192.168.1.10")]);
    let node = objects(
        "
apiVersion: v1
kind: Node
metadata: {name: node-a}
",
    );
    let delta = m.apply(Event::Delete(node[0].clone()));
    assert!(delta.node_removals.contains("node-a"));
}
