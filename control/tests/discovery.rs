//! The discovery stream as a proxy sees it: a real tonic client against the real server.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::time::timeout;
use tonic::Streaming;
use wasmesh_api::discovery::discovery_client::DiscoveryClient;
use wasmesh_api::table::Table;
use wasmesh_api::{TableUpdate, UpdateKind, WatchRequest};
use wasmesh_control::app;
use wasmesh_control::discovery::hub::{Hub, Publish};
use wasmesh_control::discovery::server;
use wasmesh_control::model::{
    Cidr, EndpointEntry, PortKey, Protocol, ServicePortEntry, ServiceType, TrafficPolicy,
};
use wasmesh_control::source::folder::FolderSource;
use wasmesh_control::source::{Event, Kind, Object};

const WAIT: Duration = Duration::from_secs(10);

async fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    (l, a)
}

/// Control serving `folder` on a fresh port (until the test ends); its address.
async fn serve_folder(folder: FolderSource) -> SocketAddr {
    let (l, addr) = listener().await;
    tokio::spawn(app::serve(
        wasmesh_control::source::Source::Folder(folder),
        l,
        None,
        Duration::ZERO,
        std::future::pending(),
    ));
    addr
}

fn cidr() -> Cidr {
    Cidr::parse("10.96.0.0/12").expect("cidr")
}

async fn watch(addr: SocketAddr, pod: &str) -> Streaming<TableUpdate> {
    let mut client = DiscoveryClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
        .max_decoding_message_size(64 << 20);
    client
        .watch(WatchRequest {
            pod_name: pod.into(),
            pod_namespace: "default".into(),
            node_name: "node-a".into(),
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner()
}

async fn next(s: &mut Streaming<TableUpdate>) -> TableUpdate {
    timeout(WAIT, s.message())
        .await
        .expect("an update in time")
        .expect("no stream error")
        .expect("stream open")
}

/// Reads until the table is consistent (a whole snapshot, or one delta).
async fn next_complete(s: &mut Streaming<TableUpdate>, table: &mut Table) -> Vec<TableUpdate> {
    let mut got = Vec::new();
    loop {
        let u = next(s).await;
        got.push(u.clone());
        if table.apply(u).expect("applies").complete {
            return got;
        }
    }
}

fn endpoints(table: &Table, svc: &str) -> Vec<String> {
    let sp = table
        .ports
        .values()
        .find(|p| p.key.as_ref().is_some_and(|k| k.service == svc))
        .unwrap_or_else(|| panic!("no {svc} in table"));
    sp.endpoints
        .iter()
        .map(|e| {
            let ip: IpAddr = match e.address.len() {
                4 => <[u8; 4]>::try_from(&e.address[..]).expect("v4").into(),
                _ => <[u8; 16]>::try_from(&e.address[..]).expect("v6").into(),
            };
            format!("{ip}:{}", e.port)
        })
        .collect()
}

fn svc_yaml(name: &str, ep: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec: {{ports: [{{name: http, port: 80}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints: [{{addresses: [{ep}]}}]
"
    )
}

#[tokio::test]
async fn a_proxy_gets_a_snapshot_then_only_the_service_ports_that_changed() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("a.yaml"), svc_yaml("alpha", "10.244.0.1")).expect("write");
    std::fs::write(dir.path().join("b.yaml"), svc_yaml("beta", "10.244.0.2")).expect("write");
    let addr = serve_folder(FolderSource::new(dir.path(), cidr())).await;

    let mut stream = watch(addr, "client-1").await;
    let mut table = Table::default();
    let first = next_complete(&mut stream, &mut table).await;
    assert_eq!(first[0].kind, UpdateKind::Snapshot as i32);
    assert_eq!(table.ports.len(), 2);
    assert_eq!(endpoints(&table, "beta"), ["10.244.0.2:8080"]);
    let v = table.version;

    std::fs::write(dir.path().join("b.yaml"), svc_yaml("beta", "10.244.0.3")).expect("write");
    let delta = next_complete(&mut stream, &mut table).await;
    assert_eq!(delta.len(), 1);
    let d = &delta[0];
    assert_eq!((d.kind, d.version), (UpdateKind::Delta as i32, v + 1));
    assert_eq!(
        d.service_ports.len(),
        1,
        "only the changed service port travels"
    );
    assert_eq!(
        d.service_ports[0].key.as_ref().map(|k| k.service.as_str()),
        Some("beta")
    );
    assert_eq!(endpoints(&table, "beta"), ["10.244.0.3:8080"]);
    assert_eq!(endpoints(&table, "alpha"), ["10.244.0.1:8080"]);

    // A second proxy joining now gets the current table in its snapshot.
    let mut s2 = watch(addr, "client-2").await;
    let mut t2 = Table::default();
    next_complete(&mut s2, &mut t2).await;
    assert_eq!(t2.version, table.version);
    assert_eq!(endpoints(&t2, "beta"), ["10.244.0.3:8080"]);
}

/// HTTPRoutes in a folder reach proxies on the Service ports they name, defaults filled in;
/// editing a route sends exactly the ports it was and is attached to.
#[tokio::test]
async fn http_routes_in_a_folder_reach_proxies_on_the_ports_they_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let two_ports = "apiVersion: v1
kind: Service
metadata: {name: shop, namespace: web}
spec: {ports: [{name: http, port: 80}, {name: admin, port: 9090}]}
";
    let route = |port: u16, weight: u32| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: split, namespace: web}}
spec:
  parentRefs: [{{group: '', kind: Service, name: shop, port: {port}}}]
  rules:
  - matches: [{{path: {{value: /api}}, headers: [{{name: X-Canary, value: 'yes'}}]}}]
    backendRefs: [{{name: shop-v2, port: 80, weight: {weight}}}]
    timeouts: {{request: 1500ms}}
  - backendRefs: [{{name: shop, port: 80}}]
"
        )
    };
    std::fs::write(dir.path().join("svc.yaml"), two_ports).expect("write");
    std::fs::write(dir.path().join("route.yaml"), route(80, 90)).expect("write");
    let addr = serve_folder(FolderSource::new(dir.path(), cidr())).await;
    let mut stream = watch(addr, "client").await;
    let mut table = Table::default();
    next_complete(&mut stream, &mut table).await;
    let port = |table: &Table, name: &str| {
        table
            .ports
            .values()
            .find(|p| p.key.as_ref().is_some_and(|k| k.port_name == name))
            .cloned()
            .unwrap_or_else(|| panic!("no port {name}"))
    };
    assert!(port(&table, "admin").http_routes.is_empty(), "port 80 only");
    let http = port(&table, "http");
    assert_eq!(http.http_routes.len(), 1);
    let r = &http.http_routes[0];
    assert_eq!((r.namespace.as_str(), r.name.as_str()), ("web", "split"));
    let first = &r.rules[0];
    let m = &first.matches[0];
    assert_eq!(
        m.path.as_ref().map(|p| (p.r#type, p.value.as_str())),
        Some((wasmesh_api::discovery::MatchType::PathPrefix as i32, "/api")),
        "the path match type is filled in"
    );
    assert_eq!(m.headers[0].name, "x-canary", "header names lower-cased");
    assert_eq!(first.backends[0].namespace, "web");
    assert_eq!(first.backends[0].weight, 90);
    assert_eq!(first.request_timeout_ms, Some(1500));
    assert_eq!(first.backend_request_timeout_ms, None);
    assert_eq!(r.rules[1].backends[0].weight, 1, "weight defaults to 1");
    let v = table.version;

    // Moved to the admin port: one delta with both ports.
    std::fs::write(dir.path().join("route.yaml"), route(9090, 90)).expect("write");
    let delta = next_complete(&mut stream, &mut table).await;
    assert_eq!((delta.len(), delta[0].version), (1, v + 1));
    let mut names: Vec<&str> = delta[0]
        .service_ports
        .iter()
        .filter_map(|p| p.key.as_ref().map(|k| k.port_name.as_str()))
        .collect();
    names.sort();
    assert_eq!(names, ["admin", "http"]);
    assert!(port(&table, "http").http_routes.is_empty());
    assert_eq!(port(&table, "admin").http_routes.len(), 1);

    // Broken: logged, the last good version stays, nothing is sent.
    std::fs::write(
        dir.path().join("route.yaml"),
        route(9090, 90).replace("weight: 90", "weight: 2000000"),
    )
    .expect("write");
    // A change to the weight of the good version follows; only that one arrives.
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(dir.path().join("route.yaml"), route(9090, 10)).expect("write");
    let delta = next_complete(&mut stream, &mut table).await;
    assert_eq!(
        delta[0].version,
        v + 2,
        "nothing was sent for the broken version"
    );
    assert_eq!(
        port(&table, "admin").http_routes[0].rules[0].backends[0].weight,
        10
    );
}

fn objects(yaml: &str) -> Vec<Object> {
    wasmesh_control::source::folder::parse_file(yaml)
        .into_iter()
        .flat_map(|d| match d.outcome {
            wasmesh_control::source::folder::Outcome::Objects(o) => o,
            o => panic!("bad test object: {o:?}"),
        })
        .collect()
}

#[tokio::test]
async fn nothing_is_sent_before_services_and_endpoint_slices_are_listed() {
    let (tx, hub, _p) = app::start_publisher(Duration::ZERO);
    let (l, addr) = listener().await;
    tokio::spawn(server::serve(l, hub, std::future::pending()));
    let mut stream = watch(addr, "early").await;

    let mut objs = objects(&svc_yaml("alpha", "10.244.0.1"));
    objs.iter_mut().for_each(|o| o.meta_mut().uid = None);
    let svc: Vec<Object> = objs
        .iter()
        .filter(|o| o.kind() == Kind::Service)
        .cloned()
        .collect();
    tx.send(Event::Replace {
        kind: Kind::Service,
        namespace: None,
        objects: svc,
    })
    .await
    .expect("send");
    tx.send(Event::Synced(Kind::Service)).await.expect("send");
    // Services are known but their endpoints are not: no answer at all, never "no endpoints".
    assert!(
        timeout(Duration::from_millis(300), stream.message())
            .await
            .is_err(),
        "a half-synced table must not be sent"
    );
    let slices: Vec<Object> = objs
        .into_iter()
        .filter(|o| o.kind() == Kind::EndpointSlice)
        .collect();
    tx.send(Event::Replace {
        kind: Kind::EndpointSlice,
        namespace: None,
        objects: slices,
    })
    .await
    .expect("send");
    for k in [
        Kind::EndpointSlice,
        Kind::Pod,
        Kind::Node,
        Kind::HttpRoute,
        Kind::WasmPlugin,
        Kind::AuthorizationPolicy,
    ] {
        tx.send(Event::Synced(k)).await.expect("send");
    }
    let mut table = Table::default();
    next_complete(&mut stream, &mut table).await;
    assert_eq!(endpoints(&table, "alpha"), ["10.244.0.1:8080"]);
}

#[tokio::test]
async fn an_endpoint_moving_between_slices_never_disappears() {
    // A grace far longer than the 30 ms between the two halves of the move, so a loaded
    // machine cannot split them.
    let (tx, hub, _p) = app::start_publisher(Duration::from_secs(1));
    let (l, addr) = listener().await;
    tokio::spawn(server::serve(l, hub, std::future::pending()));
    let objs = objects(&svc_yaml("alpha", "10.244.0.1"));
    for kind in Kind::ALL {
        let of_kind = objs.iter().filter(|o| o.kind() == kind).cloned().collect();
        tx.send(Event::Replace {
            kind,
            namespace: None,
            objects: of_kind,
        })
        .await
        .expect("send");
        tx.send(Event::Synced(kind)).await.expect("send");
    }
    let mut stream = watch(addr, "p").await;
    let mut table = Table::default();
    next_complete(&mut stream, &mut table).await;

    // The EndpointSlice controller moves the endpoint: slice 1 loses it first, slice 2 gets it
    // a moment later.
    let old = objs
        .iter()
        .find(|o| o.kind() == Kind::EndpointSlice)
        .cloned()
        .expect("slice");
    let mut moved = old.clone();
    moved.meta_mut().name = Some("alpha-2".into());
    tx.send(Event::Delete(old)).await.expect("send");
    tokio::time::sleep(Duration::from_millis(30)).await;
    tx.send(Event::Apply(moved)).await.expect("send");
    // Then a real removal: the endpoint goes for good.
    tokio::time::sleep(Duration::from_millis(30)).await;
    let mut gone = objs
        .iter()
        .find(|o| o.kind() == Kind::EndpointSlice)
        .cloned()
        .expect("slice");
    gone.meta_mut().name = Some("alpha-2".into());
    tx.send(Event::Delete(gone)).await.expect("send");

    // Every table the proxy holds until the real removal lists the endpoint.
    loop {
        next_complete(&mut stream, &mut table).await;
        let eps = endpoints(&table, "alpha");
        if eps.is_empty() {
            break;
        }
        assert_eq!(eps, ["10.244.0.1:8080"]);
    }
}

fn entry(i: u32) -> Arc<ServicePortEntry> {
    Arc::new(ServicePortEntry {
        key: PortKey {
            namespace: "default".into(),
            service: "svc".into(),
            port_name: "http".into(),
            protocol: Protocol::Tcp,
        },
        port: 80,
        service_type: ServiceType::ClusterIP,
        cluster_ips: vec!["10.96.0.10".parse().expect("ip")],
        external_ips: vec![],
        load_balancer_ips: vec![],
        node_port: None,
        app_protocol: None,
        session_affinity_timeout_seconds: None,
        internal_traffic_policy: TrafficPolicy::Cluster,
        external_traffic_policy: TrafficPolicy::Cluster,
        traffic_distribution: None,
        headless: false,
        external_name: None,
        load_balancer_source_ranges: vec![],
        options: Default::default(),
        endpoints: vec![EndpointEntry {
            address: "10.244.0.1".parse().expect("ip"),
            port: (1000 + i % 60000) as u16,
            ready: true,
            serving: true,
            terminating: false,
            node_name: None,
            zone: None,
            hint_zones: vec![],
            hint_nodes: vec![],
            workload: None,
        }],
        http_routes: vec![],
    })
}

/// An entry of about 2 KB, so that deltas fill transport buffers.
fn big_entry(i: u32) -> Arc<ServicePortEntry> {
    let mut e = (*entry(i)).clone();
    e.options.insert("padding".into(), "x".repeat(2048));
    Arc::new(e)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_proxy_is_resynced_and_does_not_stall_the_others() {
    let hub = Arc::new(Hub::new());
    hub.init([&entry(0)], []);
    let (l, addr) = listener().await;
    tokio::spawn(server::serve(l, hub.clone(), std::future::pending()));

    let mut slow = watch(addr, "slow").await;
    let mut fast = watch(addr, "fast").await;
    let mut fast_table = Table::default();
    next_complete(&mut fast, &mut fast_table).await;
    let start = fast_table.version;

    // The fast proxy reads as deltas arrive; the slow one reads nothing meanwhile. The
    // publisher never runs more than half a ring ahead of the fast reader, so only the slow
    // one can fall behind, however loaded the machine is.
    let n = 8 * Hub::RING as u32;
    let seen = Arc::new(std::sync::atomic::AtomicU64::new(start));
    let seen_by_reader = seen.clone();
    let reader = tokio::spawn(async move {
        let mut snapshots = 0;
        while fast_table.version < start + u64::from(n) {
            for u in next_complete(&mut fast, &mut fast_table).await {
                snapshots += usize::from(u.kind == UpdateKind::Snapshot as i32);
            }
            seen_by_reader.store(fast_table.version, std::sync::atomic::Ordering::Relaxed);
        }
        assert_eq!(snapshots, 0, "the fast proxy was never resynced");
        fast_table
    });
    for i in 1..=n {
        while start + u64::from(i)
            > seen.load(std::sync::atomic::Ordering::Relaxed) + Hub::RING as u64 / 2
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        hub.publish(Publish {
            upserts: vec![big_entry(i)],
            ..Default::default()
        });
    }
    let fast_table = timeout(WAIT, reader)
        .await
        .expect("fast proxy kept up")
        .expect("join");
    assert_eq!(
        fast_table.version,
        start + u64::from(n),
        "every delta, in order, no gap"
    );
    assert_eq!(
        endpoints(&fast_table, "svc"),
        [format!("10.244.0.1:{}", 1000 + n)]
    );

    // The slow proxy catches up through a fresh snapshot and ends at the same table.
    let mut slow_table = Table::default();
    let mut snapshots = 0;
    while slow_table.version != fast_table.version {
        for u in next_complete(&mut slow, &mut slow_table).await {
            if u.kind == UpdateKind::Snapshot as i32 {
                snapshots += 1;
            }
        }
    }
    assert!(
        snapshots >= 2,
        "the slow proxy was resynced with a new snapshot"
    );
    assert!(hub.stats.resyncs.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    assert_eq!(endpoints(&slow_table, "svc"), endpoints(&fast_table, "svc"));
}

#[tokio::test]
async fn large_snapshots_arrive_in_parts_that_add_up() {
    let hub = Arc::new(Hub::new());
    let entries: Vec<Arc<ServicePortEntry>> = (0..2000)
        .map(|i| {
            let mut e = (*entry(i)).clone();
            e.key.service = format!("svc-{i}");
            Arc::new(e)
        })
        .collect();
    hub.init(entries.iter(), []);
    let (l, addr) = listener().await;
    tokio::spawn(server::serve(l, hub.clone(), std::future::pending()));
    let mut s = watch(addr, "p").await;
    let mut t = Table::default();
    let parts = next_complete(&mut s, &mut t).await;
    assert!(parts.len() > 1, "split into parts");
    assert_eq!(parts[0].kind, UpdateKind::Snapshot as i32);
    assert!(
        parts[1..]
            .iter()
            .all(|p| p.kind == UpdateKind::SnapshotContinued as i32)
    );
    assert_eq!(t.ports.len(), 2000);
}

#[tokio::test]
async fn an_unknown_method_gets_unimplemented_and_the_server_keeps_serving() {
    let hub = Arc::new(Hub::new());
    hub.init([&entry(0)], []);
    let (l, addr) = listener().await;
    tokio::spawn(server::serve(l, hub, std::future::pending()));
    let mut ch = tonic::client::Grpc::new(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect"),
    );
    ch.ready().await.expect("ready");
    let err = ch
        .unary::<WatchRequest, WatchRequest, _>(
            tonic::Request::new(WatchRequest::default()),
            "/wasmesh.discovery.v1.Discovery/Nope"
                .parse()
                .expect("path"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .expect_err("unimplemented");
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    let mut t = Table::default();
    next_complete(&mut watch(addr, "after").await, &mut t).await;
    assert_eq!(t.ports.len(), 1);
}

fn wasm(tail: &str) -> Vec<u8> {
    let mut v = b"\0asm\x01\0\0\0".to_vec();
    v.extend_from_slice(tail.as_bytes());
    v
}

fn sha256_hex(bytes: &[u8]) -> String {
    wasmesh_control::source::wasmplugin::module::sha256_hex(bytes)
}

async fn get_module(addr: SocketAddr, sha256: &str) -> Result<wasmesh_api::Module, tonic::Status> {
    let mut client = DiscoveryClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
        .max_decoding_message_size(wasmesh_api::MAX_MODULE_SIZE + 1024);
    client
        .get_module(wasmesh_api::GetModuleRequest {
            sha256: sha256.into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// A WasmPlugin in a folder reaches proxies with its module's sha256; GetModule serves the
/// bytes; editing the module file sends a delta with only that plugin and the new sha256, and
/// the old module is no longer served.
#[tokio::test]
async fn wasm_plugins_in_a_folder_reach_proxies_and_modules_are_served_by_sha256() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("filters")).expect("mkdir");
    let auth = wasm("auth v1");
    let stats = wasm("stats");
    std::fs::write(dir.path().join("filters/auth.wasm"), &auth).expect("write");
    std::fs::write(dir.path().join("stats.wasm"), &stats).expect("write");
    std::fs::write(dir.path().join("svc.yaml"), svc_yaml("web", "10.244.0.1")).expect("write");
    let plugins = format!(
        "apiVersion: wasmesh.io/v1alpha1
kind: WasmPlugin
metadata: {{name: auth, namespace: default}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  targetRefs: [{{kind: Service, group: '', name: web}}]
  url: file://filters/auth.wasm
  pluginName: auth
  pluginConfig: {{header: x-user}}
  phase: AUTHN
  failStrategy: FAIL_OPEN
  match: [{{mode: SERVER, ports: [{{number: 8080}}]}}]
---
apiVersion: wasmesh.io/v1alpha1
kind: WasmPlugin
metadata: {{name: stats, namespace: wasmesh-system}}
spec:
  url: file://{}
  sha256: '{}'
  phase: STATS
",
        dir.path().join("stats.wasm").display(),
        sha256_hex(&stats)
    );
    std::fs::write(dir.path().join("plugins.yaml"), plugins).expect("write");
    let addr = serve_folder(FolderSource::new(dir.path(), cidr())).await;
    let mut stream = watch(addr, "client").await;
    let mut table = Table::default();
    next_complete(&mut stream, &mut table).await;
    assert_eq!(
        table.wasm_plugins.keys().collect::<Vec<_>>(),
        ["default/auth", "wasmesh-system/stats"]
    );
    let a = table.wasm_plugins["default/auth"].clone();
    assert_eq!(a.sha256, sha256_hex(&auth));
    assert_eq!(a.module_size, auth.len() as u64);
    assert_eq!(a.plugin_config, br#"{"header":"x-user"}"#);
    assert_eq!(a.target_services, ["web"]);
    assert_eq!(a.selector.get("app").map(String::as_str), Some("web"));
    assert_eq!(
        (a.phase, a.fail_strategy, a.generation, a.mesh_wide),
        (1, 1, 1, false)
    );
    assert_eq!(a.r#match[0].ports, [8080]);
    let s = table.wasm_plugins["wasmesh-system/stats"].clone();
    assert!(s.mesh_wide, "the root namespace's plugins are mesh-wide");

    // GetModule: the bytes by sha256; NOT_FOUND for anything else.
    let m = get_module(addr, &a.sha256).await.expect("module");
    assert_eq!(
        (m.sha256.as_str(), &m.wasm[..]),
        (a.sha256.as_str(), &auth[..])
    );
    let m = get_module(addr, &s.sha256.to_uppercase())
        .await
        .expect("any case");
    assert_eq!(m.wasm, stats);
    let err = get_module(addr, &"0".repeat(64))
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");

    // The module file changes: one delta with only that plugin.
    let v = table.version;
    let old_sha = a.sha256.clone();
    let auth2 = wasm("auth v2, a little longer");
    std::fs::write(dir.path().join("filters/auth.wasm"), &auth2).expect("write");
    let delta = next_complete(&mut stream, &mut table).await;
    assert_eq!(delta.len(), 1);
    let d = &delta[0];
    assert_eq!((d.kind, d.version), (UpdateKind::Delta as i32, v + 1));
    assert!(d.service_ports.is_empty() && d.nodes.is_empty() && d.removed_wasm_plugins.is_empty());
    assert_eq!(d.wasm_plugins.len(), 1);
    let a2 = &d.wasm_plugins[0];
    assert_eq!((a2.name.as_str(), a2.generation), ("auth", 2));
    assert_eq!(a2.sha256, sha256_hex(&auth2));
    assert_eq!(
        get_module(addr, &a2.sha256).await.expect("new module").wasm,
        auth2
    );
    let err = get_module(addr, &old_sha)
        .await
        .expect_err("old module dropped");
    assert_eq!(err.code(), tonic::Code::NotFound);

    // The pinned module changes: refused (sha256 mismatch), the last good version stays and
    // nothing is sent; removing the other plugin is the next delta.
    std::fs::write(dir.path().join("stats.wasm"), wasm("tampered")).expect("write");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let only_stats = std::fs::read_to_string(dir.path().join("plugins.yaml"))
        .expect("read")
        .split("---\n")
        .nth(1)
        .expect("second document")
        .to_string();
    std::fs::write(dir.path().join("plugins.yaml"), only_stats).expect("write");
    let delta = next_complete(&mut stream, &mut table).await;
    let d = &delta[0];
    assert_eq!(
        d.version,
        v + 2,
        "nothing was sent for the mismatching module"
    );
    assert!(d.wasm_plugins.is_empty(), "{d:?}");
    assert_eq!(d.removed_wasm_plugins, ["default/auth"]);
    assert_eq!(
        get_module(addr, &s.sha256).await.expect("last good").wasm,
        stats
    );

    // A proxy joining now gets the plugins in its snapshot.
    let mut s2 = watch(addr, "client-2").await;
    let mut t2 = Table::default();
    next_complete(&mut s2, &mut t2).await;
    assert_eq!(
        t2.wasm_plugins.keys().collect::<Vec<_>>(),
        ["wasmesh-system/stats"]
    );
}

/// A plugin whose module file is not there when control starts is left out, and goes out —
/// with the module's sha256, the bytes served by GetModule — once the file is written, without
/// the manifest being touched: inside the folder (in a subfolder made later) and outside it (in
/// a folder made later). The periodic rescan is far away: the files are noticed as they appear.
#[tokio::test]
async fn a_plugin_goes_out_once_its_missing_module_is_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let outside = tempfile::tempdir().expect("tempdir");
    let stats_path = outside.path().join("later/stats.wasm");
    std::fs::write(dir.path().join("svc.yaml"), svc_yaml("web", "10.244.0.1")).expect("write");
    let plugins = format!(
        "apiVersion: wasmesh.io/v1alpha1
kind: WasmPlugin
metadata: {{name: auth, namespace: default}}
spec:
  url: file://filters/auth.wasm
---
apiVersion: wasmesh.io/v1alpha1
kind: WasmPlugin
metadata: {{name: stats, namespace: default}}
spec:
  url: file://{}
",
        stats_path.display()
    );
    std::fs::write(dir.path().join("plugins.yaml"), plugins).expect("write");
    let mut folder = FolderSource::new(dir.path(), cidr());
    folder.resync = Duration::from_secs(600);
    let addr = serve_folder(folder).await;
    let mut stream = watch(addr, "client").await;
    let mut table = Table::default();
    next_complete(&mut stream, &mut table).await;
    assert_eq!(table.ports.len(), 1, "the rest of the folder is served");
    assert!(table.wasm_plugins.is_empty(), "{:?}", table.wasm_plugins);

    let auth = wasm("auth, written after control started");
    std::fs::create_dir_all(dir.path().join("filters")).expect("mkdir");
    std::fs::write(dir.path().join("filters/auth.wasm"), &auth).expect("write");
    next_complete(&mut stream, &mut table).await;
    assert_eq!(
        table.wasm_plugins.keys().collect::<Vec<_>>(),
        ["default/auth"]
    );
    let sha = table.wasm_plugins["default/auth"].sha256.clone();
    assert_eq!(sha, sha256_hex(&auth));
    assert_eq!(get_module(addr, &sha).await.expect("module").wasm, auth);

    let stats = wasm("stats, in a folder made after control started");
    std::fs::create_dir_all(stats_path.parent().expect("parent")).expect("mkdir");
    std::fs::write(&stats_path, &stats).expect("write");
    next_complete(&mut stream, &mut table).await;
    assert_eq!(
        table.wasm_plugins.keys().collect::<Vec<_>>(),
        ["default/auth", "default/stats"]
    );
    let sha = table.wasm_plugins["default/stats"].sha256.clone();
    assert_eq!(sha, sha256_hex(&stats));
    assert_eq!(get_module(addr, &sha).await.expect("module").wasm, stats);
}

/// A module larger than gRPC's usual 4 MiB message limit is served whole.
#[tokio::test]
async fn a_large_module_is_served_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut big = wasm("");
    big.extend((0..6 * 1024 * 1024u32).map(|i| (i % 251) as u8));
    std::fs::write(dir.path().join("big.wasm"), &big).expect("write");
    std::fs::write(
        dir.path().join("p.yaml"),
        "apiVersion: wasmesh.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: big}\nspec: {url: big.wasm}\n",
    )
    .expect("write");
    let addr = serve_folder(FolderSource::new(dir.path(), cidr())).await;
    let mut stream = watch(addr, "client").await;
    let mut table = Table::default();
    next_complete(&mut stream, &mut table).await;
    let p = &table.wasm_plugins["default/big"];
    assert_eq!(p.module_size, big.len() as u64);
    let m = get_module(addr, &p.sha256).await.expect("module");
    assert_eq!(m.wasm.len(), big.len());
    assert_eq!(sha256_hex(&m.wasm), p.sha256);
}

/// AuthorizationPolicies in a folder reach every proxy in the snapshot, in the wire form
/// (absent rules apart from empty ones); a change is a delta with only that policy, a removal
/// names it; a broken edit keeps the last good version and sends nothing.
#[tokio::test]
async fn authorization_policies_in_a_folder_reach_proxies() {
    use wasmesh_api::discovery::authorization_policy::Mtls;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("svc.yaml"), svc_yaml("web", "10.244.0.1")).expect("write");
    let policies = |sa: &str| {
        format!(
            "apiVersion: wasmesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: web, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  rules:
  - from: [spiffe://cluster.local/ns/shop/sa/{sa}, ns/ops]
    ports: [8080]
  - ports: [9090]
---
apiVersion: wasmesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: lockdown, namespace: vault}}
spec: {{mtls: strict, rules: []}}
"
        )
    };
    std::fs::write(dir.path().join("policies.yaml"), policies("client")).expect("write");
    let addr = serve_folder(FolderSource::new(dir.path(), cidr())).await;
    let mut stream = watch(addr, "client").await;
    let mut table = Table::default();
    next_complete(&mut stream, &mut table).await;
    assert_eq!(
        table.authorization_policies.keys().collect::<Vec<_>>(),
        ["shop/web", "vault/lockdown"],
        "every proxy gets every policy"
    );
    let web = &table.authorization_policies["shop/web"];
    assert_eq!(web.selector.get("app").map(String::as_str), Some("web"));
    assert!(web.has_rules);
    assert_eq!(
        web.rules[0].from,
        ["spiffe://cluster.local/ns/shop/sa/client", "ns/ops"]
    );
    assert_eq!(web.rules[0].ports, [8080]);
    assert!(!web.rules[0].any_client && web.rules[1].any_client);
    assert_eq!(web.mtls, Mtls::Unset as i32);
    let lockdown = &table.authorization_policies["vault/lockdown"];
    assert!(lockdown.has_rules && lockdown.rules.is_empty(), "deny all");
    assert_eq!(lockdown.mtls, Mtls::Strict as i32);

    // Edited: a delta with that policy alone.
    let v = table.version;
    std::fs::write(dir.path().join("policies.yaml"), policies("other")).expect("write");
    let delta = next_complete(&mut stream, &mut table).await;
    assert_eq!(delta.len(), 1);
    let d = &delta[0];
    assert_eq!((d.kind, d.version), (UpdateKind::Delta as i32, v + 1));
    assert!(d.service_ports.is_empty() && d.wasm_plugins.is_empty());
    assert_eq!(d.authorization_policies.len(), 1);
    assert_eq!(
        d.authorization_policies[0].rules[0].from[0],
        "spiffe://cluster.local/ns/shop/sa/other"
    );

    // A broken edit sends nothing; the next real change (a removal) is the next delta.
    std::fs::write(
        dir.path().join("policies.yaml"),
        policies("other").replace("ns/ops", "ops"),
    )
    .expect("write");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let only_web = policies("other")
        .split("---\n")
        .next()
        .expect("first document")
        .to_string();
    std::fs::write(dir.path().join("policies.yaml"), only_web).expect("write");
    let delta = next_complete(&mut stream, &mut table).await;
    let d = &delta[0];
    assert_eq!(d.version, v + 2, "nothing was sent for the broken edit");
    assert!(d.authorization_policies.is_empty(), "{d:?}");
    assert_eq!(d.removed_authorization_policies, ["vault/lockdown"]);
    assert_eq!(
        table.authorization_policies.keys().collect::<Vec<_>>(),
        ["shop/web"]
    );
}
