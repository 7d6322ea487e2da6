//! The outbound data path in-process: a real control (gRPC on loopback) streams the table, the
//! proxy's outbound handler gets connections as if iptables had redirected them (the original
//! destination is given), and backends on 127.0.0.x say who they are. What is checked is what
//! a client sees: which endpoint answered, or that the connection was refused.
//! (The same paths through real iptables and namespaces: `examples/local-mesh/tests`.)

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use wasmesh_control::source::folder::{Outcome, parse_file};
use wasmesh_control::source::{Event, EventSender, Kind, Object};
use wasmesh_proxy::outbound::{Outbound, OutboundConfig};
use wasmesh_proxy::state::ProxyState;
use wasmesh_proxy::table::Locality;

const WAIT: Duration = Duration::from_secs(10);
const VIP: &str = "10.96.0.10:80";

/// A backend that writes its name and closes.
async fn backend(addr: SocketAddr, name: &'static str) -> (SocketAddr, JoinHandle<()>) {
    let l = TcpListener::bind(addr).await.expect("bind backend");
    let a = l.local_addr().expect("addr");
    let h = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let _ = s.write_all(name.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (a, h)
}

/// Three backends on 127.0.0.2-4 at one port.
async fn three_backends() -> (u16, Vec<JoinHandle<()>>) {
    let (a, h1) = backend("127.0.0.2:0".parse().expect("addr"), "b1").await;
    let port = a.port();
    let (_, h2) = backend(
        SocketAddr::new("127.0.0.3".parse().expect("ip"), port),
        "b2",
    )
    .await;
    let (_, h3) = backend(
        SocketAddr::new("127.0.0.4".parse().expect("ip"), port),
        "b3",
    )
    .await;
    (port, vec![h1, h2, h3])
}

fn objects(yaml: &str) -> Vec<Object> {
    parse_file(yaml)
        .into_iter()
        .flat_map(|d| match d.outcome {
            Outcome::Objects(o) => o,
            o => panic!("bad test YAML: {o:?}"),
        })
        .collect()
}

fn service(extra_spec: &str, annotations: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default, annotations: {{{annotations}}}}}
spec: {{clusterIP: 10.96.0.10, externalIPs: [203.0.113.7], ports: [{{name: tcp-web, port: 80}}]{extra_spec}}}
"
    )
}

fn slice(name: &str, port: u16, endpoints: &[(&str, &str)]) -> String {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|(ip, extra)| format!("{{addresses: [{ip}]{extra}}}"))
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: tcp-web, port: {port}}}]
endpoints: [{}]
",
        eps.join(", ")
    )
}

struct Mesh {
    events: EventSender,
    out: Arc<Outbound>,
    state: Arc<ProxyState>,
    control: Vec<JoinHandle<()>>,
}

/// Control with `yaml` loaded, a proxy following it on node-a, ready.
async fn mesh(yaml: &str) -> Mesh {
    mesh_with(yaml, OutboundConfig::default(), true).await
}

async fn mesh_with(yaml: &str, config: OutboundConfig, wait: bool) -> Mesh {
    let (events, hub, publisher) = wasmesh_control::app::start_publisher(Duration::ZERO);
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind control");
    let control_addr = l.local_addr().expect("addr");
    let server = tokio::spawn(wasmesh_control::discovery::server::serve(
        l,
        hub,
        std::future::pending(),
    ));
    let objs = objects(yaml);
    for kind in Kind::ALL {
        let of: Vec<Object> = objs.iter().filter(|o| o.kind() == kind).cloned().collect();
        events
            .send(Event::Replace {
                kind,
                namespace: None,
                objects: of,
            })
            .await
            .expect("send");
        events.send(Event::Synced(kind)).await.expect("send");
    }
    let state = ProxyState::new(Locality {
        node: Some("node-a".into()),
        zone: None,
        namespace: None,
    });
    let who = wasmesh_api::WatchRequest {
        pod_name: "client".into(),
        ..Default::default()
    };
    tokio::spawn(wasmesh_proxy::discovery::run(
        wasmesh_proxy::discovery::DiscoveryConfig {
            control: format!("http://{control_addr}"),
            who,
            verdicts: None,
        },
        state.clone(),
    ));
    if wait {
        assert!(state.wait_ready(WAIT).await, "proxy got a table");
    }
    let out = Arc::new(Outbound::new(state.clone(), config, vec![]));
    Mesh {
        events,
        out,
        state,
        control: vec![publisher, server],
    }
}

impl Mesh {
    /// Connects as the app would to `dst`; returns what the upstream said, or the error.
    async fn call(&self, dst: &str) -> Result<String, std::io::Error> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        let out = self.out.clone();
        let dst: SocketAddr = dst.parse().expect("dst");
        let accept = tokio::spawn(async move {
            if let Ok((s, peer)) = l.accept().await {
                out.handle(s, peer, dst).await;
            }
        });
        let mut c = TcpStream::connect(addr).await?;
        let mut buf = String::new();
        let r = tokio::time::timeout(WAIT, c.read_to_string(&mut buf))
            .await
            .expect("never a hang");
        // The proxy copies until both directions end: close ours.
        drop(c);
        tokio::time::timeout(WAIT, accept)
            .await
            .expect("proxy finished")
            .expect("join");
        r.map(|_| buf)
    }

    async fn tally(&self, n: usize) -> BTreeMap<String, usize> {
        let mut t = BTreeMap::new();
        for _ in 0..n {
            *t.entry(self.call(VIP).await.expect("call")).or_default() += 1;
        }
        t
    }

    async fn apply(&self, yaml: &str) {
        for o in objects(yaml) {
            self.events.send(Event::Apply(o)).await.expect("send");
        }
    }

    async fn wait_version(&self, v: u64) {
        tokio::time::timeout(WAIT, async {
            while self.state.version.load(Ordering::Relaxed) < v {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("update reached the proxy");
    }

    fn version(&self) -> u64 {
        self.state.version.load(Ordering::Relaxed)
    }
}

fn refused(r: &Result<String, std::io::Error>) -> bool {
    matches!(r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
        || matches!(r, Ok(s) if s.is_empty())
}

#[tokio::test]
async fn connections_to_a_service_spread_over_every_ready_endpoint() {
    let (port, _b) = three_backends().await;
    let yaml = format!(
        "{}---\n{}",
        service("", ""),
        slice(
            "web-1",
            port,
            &[("127.0.0.2", ""), ("127.0.0.3", ""), ("127.0.0.4", "")]
        )
    );
    let m = mesh(&yaml).await;
    let t = m.tally(300).await;
    assert_eq!(t.len(), 3, "every replica answered: {t:?}");
    for (who, n) in &t {
        assert!((60..=140).contains(n), "{who} got {n} of 300: {t:?}");
    }
    // The externalIP reaches the same endpoints.
    assert!(
        m.call("203.0.113.7:80")
            .await
            .expect("external IP")
            .starts_with('b')
    );
}

#[tokio::test]
async fn a_service_port_without_usable_endpoints_is_refused_at_once() {
    let (port, _b) = three_backends().await;
    let yaml = format!(
        "{}---\n{}",
        service("", ""),
        slice(
            "web-1",
            port,
            &[("127.0.0.2", ", conditions: {ready: false}")]
        )
    );
    let m = mesh(&yaml).await;
    let start = tokio::time::Instant::now();
    let r = m.call(VIP).await;
    assert!(refused(&r), "{r:?}");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "refused at once, not after a timeout"
    );
    // A port the Service does not have on its VIP is refused too.
    assert!(refused(&m.call("10.96.0.10:443").await));
    assert_eq!(
        m.state
            .stats
            .outbound_refused_no_endpoints
            .load(Ordering::Relaxed),
        1
    );
    assert_eq!(
        m.state
            .stats
            .outbound_refused_unknown_port
            .load(Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn with_no_ready_endpoint_serving_terminating_ones_are_used() {
    let (port, _b) = three_backends().await;
    let yaml = format!(
        "{}---\n{}",
        service("", ""),
        slice(
            "web-1",
            port,
            &[
                (
                    "127.0.0.2",
                    ", conditions: {ready: false, serving: true, terminating: true}"
                ),
                (
                    "127.0.0.3",
                    ", conditions: {ready: false, serving: false, terminating: true}"
                ),
            ]
        )
    );
    let m = mesh(&yaml).await;
    assert_eq!(m.tally(20).await, BTreeMap::from([("b1".to_string(), 20)]));
    // Once a ready endpoint exists, the terminating one gets nothing new.
    let v = m.version();
    m.apply(&slice("web-2", port, &[("127.0.0.4", "")])).await;
    m.wait_version(v + 1).await;
    assert_eq!(m.tally(20).await, BTreeMap::from([("b3".to_string(), 20)]));
}

#[tokio::test]
async fn a_refused_connect_fails_over_to_another_endpoint_and_the_client_never_notices() {
    let (port, _b) = three_backends().await;
    // 127.0.0.9 has no listener: connects there are refused.
    let yaml = format!(
        "{}---\n{}",
        service("", "wasmesh.io/balancer: round-robin"),
        slice("web-1", port, &[("127.0.0.2", ""), ("127.0.0.9", "")])
    );
    let m = mesh(&yaml).await;
    assert_eq!(m.tally(30).await, BTreeMap::from([("b1".to_string(), 30)]));
    let failovers = m.state.stats.outbound_failovers.load(Ordering::Relaxed);
    assert!(failovers >= 1, "the dead endpoint was tried and skipped");
    // It is remembered as failed, so it is not tried on every connection.
    assert!(failovers < 10, "{failovers} failovers for 30 connections");
}

#[tokio::test]
async fn client_ip_affinity_sticks_and_is_rechosen_after_the_timeout() {
    let (port, _b) = three_backends().await;
    let yaml = format!(
        "{}---\n{}",
        service(
            ", sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}",
            ""
        ),
        slice(
            "web-1",
            port,
            &[("127.0.0.2", ""), ("127.0.0.3", ""), ("127.0.0.4", "")]
        )
    );
    let m = mesh(&yaml).await;
    let t = m.tally(15).await;
    assert_eq!(t.len(), 1, "15 connections, one endpoint: {t:?}");
    let first = t.keys().next().cloned().expect("one");
    // After timeoutSeconds without a new connection, the choice is made again; over a few
    // rounds another endpoint comes up.
    let mut others = 0;
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let t = m.tally(3).await;
        assert_eq!(t.len(), 1, "sticky again within the round: {t:?}");
        if !t.contains_key(&first) {
            others += 1;
        }
    }
    assert!(others > 0, "re-chosen after the timeout");
}

#[tokio::test]
async fn other_destinations_and_headless_services_pass_through_unchanged() {
    let (direct, _d) = backend("127.0.0.7:0".parse().expect("addr"), "direct").await;
    let yaml = "apiVersion: v1
kind: Service
metadata: {name: db, namespace: default}
spec: {clusterIP: None, ports: [{name: pg, port: 5432}]}
";
    let m = mesh(yaml).await;
    assert_eq!(
        m.call(&direct.to_string()).await.expect("passthrough"),
        "direct"
    );
    assert_eq!(
        m.state.stats.outbound_passthrough.load(Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn internal_traffic_policy_local_uses_only_this_nodes_endpoints() {
    let (port, _b) = three_backends().await;
    let yaml = format!(
        "{}---\n{}",
        service(", internalTrafficPolicy: Local", ""),
        slice(
            "web-1",
            port,
            &[
                ("127.0.0.2", ", nodeName: node-b"),
                ("127.0.0.3", ", nodeName: node-a")
            ]
        )
    );
    let m = mesh(&yaml).await;
    assert_eq!(m.tally(20).await, BTreeMap::from([("b2".to_string(), 20)]));
    // Pod traffic to an externalIP ignores the policy (kube-proxy's short-circuit).
    let mut ext = BTreeMap::<String, usize>::new();
    for _ in 0..40 {
        *ext.entry(m.call("203.0.113.7:80").await.expect("call"))
            .or_default() += 1;
    }
    assert_eq!(ext.len(), 2, "{ext:?}");
    // No endpoint on this node: refused (kube-proxy would drop; see docs/proxy.md).
    let v = m.version();
    m.apply(&slice(
        "web-1",
        port,
        &[("127.0.0.2", ", nodeName: node-b")],
    ))
    .await;
    m.wait_version(v + 1).await;
    assert!(refused(&m.call(VIP).await));
    assert_eq!(
        m.state
            .stats
            .outbound_refused_local_policy
            .load(Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn a_removed_endpoint_gets_no_new_connections_once_the_change_arrives() {
    let (port, _b) = three_backends().await;
    let yaml = format!(
        "{}---\n{}",
        service("", ""),
        slice(
            "web-1",
            port,
            &[("127.0.0.2", ""), ("127.0.0.3", ""), ("127.0.0.4", "")]
        )
    );
    let m = mesh(&yaml).await;
    assert_eq!(m.tally(60).await.len(), 3);
    let v = m.version();
    m.apply(&slice(
        "web-1",
        port,
        &[("127.0.0.2", ""), ("127.0.0.3", "")],
    ))
    .await;
    m.wait_version(v + 1).await;
    let t = m.tally(60).await;
    assert!(!t.contains_key("b3"), "{t:?}");
}

#[tokio::test]
async fn traffic_continues_when_control_goes_away() {
    let (port, _b) = three_backends().await;
    let yaml = format!(
        "{}---\n{}",
        service("", ""),
        slice("web-1", port, &[("127.0.0.2", "")])
    );
    let m = mesh(&yaml).await;
    for h in &m.control {
        h.abort();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(m.tally(10).await, BTreeMap::from([("b1".to_string(), 10)]));
}

#[tokio::test]
async fn a_connection_before_the_first_table_waits_for_it() {
    let (port, _b) = three_backends().await;
    let yaml = format!(
        "{}---\n{}",
        service("", ""),
        slice("web-1", port, &[("127.0.0.2", "")])
    );
    let m = mesh_with(&yaml, OutboundConfig::default(), false).await;
    // Whether or not the table is already there, the call must succeed.
    assert_eq!(m.call(VIP).await.expect("waited for the table"), "b1");
}

#[tokio::test]
async fn shutting_down_fails_ready_and_waits_for_open_connections() {
    // A backend that holds the connection open until told.
    let l = TcpListener::bind("127.0.0.2:0").await.expect("bind");
    let port = l.local_addr().expect("addr").port();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        if let Ok((mut s, _)) = l.accept().await {
            let _ = release_rx.await;
            use tokio::io::AsyncWriteExt;
            let _ = s.write_all(b"late").await;
        }
    });
    let yaml = format!(
        "{}---\n{}",
        service("", ""),
        slice("web-1", port, &[("127.0.0.2", "")])
    );
    let m = mesh(&yaml).await;
    let call = {
        let m_out = m.out.clone();
        let pl = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = pl.local_addr().expect("addr");
        tokio::spawn(async move {
            if let Ok((s, peer)) = pl.accept().await {
                m_out.handle(s, peer, VIP.parse().expect("vip")).await;
            }
        });
        tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.expect("connect");
            let mut buf = String::new();
            let _ = c.read_to_string(&mut buf).await;
            buf
        })
    };
    tokio::time::timeout(WAIT, async {
        while m.state.open_connections() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("connection open");
    assert!(m.state.is_ready());
    let state = m.state.clone();
    let drain = tokio::spawn(async move { state.drain(WAIT).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!m.state.is_ready(), "/ready fails while draining");
    assert!(!drain.is_finished(), "the open connection is waited for");
    let _ = release_tx.send(());
    assert_eq!(drain.await.expect("join"), 0, "drained");
    assert_eq!(
        call.await.expect("join"),
        "late",
        "the connection finished normally"
    );
}
