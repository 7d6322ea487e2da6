//! The proxy's service table: what control streams, decoded once per change into the shape
//! the data path reads — a map from a destination address to the Service port behind it, with
//! the endpoints this proxy may use already chosen.
//!
//! Which endpoints a client may use depends on the client (its node and zone), and a sidecar
//! has exactly one client pod, so [`select`] runs when a Service port changes, not per
//! connection: a connection only looks up its destination and asks the balancer.
//!
//! Reads are lock-free ([`arc_swap`]). A change to a Service port's endpoints swaps that port's
//! cell; only a change of addresses (a Service added, removed, or given new VIPs) rebuilds the
//! address map.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;
use wasmesh_api::discovery as pb;
use wasmesh_api::table::{PortId, port_id};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::balance::{BalancerKind, EndpointLoad, Loads};
use crate::detect::{self, Declared};
use crate::http::route::Routes;
use crate::metrics::EndpointLabels;
use crate::otel::Attributes;
use crate::reject::{Verdict, Verdicts};

/// Who this proxy serves: its pod's node and zone decide node-local and zone-local endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Locality {
    pub node: Option<String>,
    pub zone: Option<String>,
    /// The pod's namespace: consumer HTTPRoutes apply only to clients in their namespace.
    pub namespace: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node: Option<String>,
    pub zone: Option<String>,
    pub hint_zones: Vec<String>,
    pub hint_nodes: Vec<String>,
    /// `namespace/name` of the Pod behind it.
    pub pod: Option<String>,
    pub service_account: Option<String>,
    pub meshed: bool,
    #[serde(skip)]
    pub load: Arc<EndpointLoad>,
    /// `wasmesh_balancer_picks_total` for this Service and Pod: a pick is one atomic add.
    #[serde(skip)]
    pub picks: Counter,
    /// Its attributes in a client span, made by the first traced request sent to it.
    #[serde(skip)]
    pub span_attributes: OnceLock<Attributes>,
}

impl Endpoint {
    /// What mTLS needs to know about this endpoint's pod.
    pub fn mesh_peer(&self) -> crate::identity::connect::Peer<'_> {
        crate::identity::connect::Peer {
            addr: self.addr,
            meshed: self.meshed,
            pod: self.pod.as_deref(),
            service_account: self.service_account.as_deref(),
        }
    }
}

/// The endpoints a new connection may go to, or what to do instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Selection {
    /// Indices into [`ServicePort::endpoints`]; never empty.
    Endpoints(Vec<usize>),
    /// No usable endpoint: refuse at once (kube-proxy: REJECT).
    Reject,
    /// Endpoints exist, none this client may use (internalTrafficPolicy Local with none on this
    /// node; kube-proxy: DROP).
    Drop,
}

#[derive(Debug, Serialize)]
pub struct ServicePort {
    pub namespace: String,
    pub service: String,
    /// `namespace/service`, the `service` label of metrics (made once per change).
    #[serde(skip)]
    pub label: Arc<str>,
    /// Where outbound responses that matched no HTTPRoute rule are counted.
    #[serde(skip)]
    pub outcomes: Arc<crate::metrics::Outcomes>,
    pub port_name: String,
    pub port: u16,
    pub headless: bool,
    pub external_name: Option<String>,
    pub affinity: Option<Duration>,
    pub balancer: Option<BalancerKind>,
    pub options: BTreeMap<String, String>,
    pub node_port: Option<u16>,
    pub app_protocol: Option<String>,
    /// HTTP, HTTP/2, opaque or detect ([`crate::detect`]).
    pub protocol: Declared,
    /// The HTTPRoutes attached to this port, compiled for this proxy's namespace.
    #[serde(skip)]
    pub routes: Routes,
    /// `namespace/name` of the routes in force, for `/config`.
    pub http_routes: Vec<String>,
    pub endpoints: Vec<Endpoint>,
    /// Usable endpoints per way in ([`Via`]) and address family (IPv4, IPv6): kube-proxy never
    /// translates families. Connections to a clusterIP obey internalTrafficPolicy; connections
    /// from a pod to an externalIP, LB IP or NodePort are short-circuited to the cluster-wide
    /// set, whatever the traffic policies say.
    pub selections: [[Selection; 2]; 2],
    #[serde(skip)]
    pub id: PortId,
    /// Round-robin position.
    #[serde(skip)]
    pub rr: std::sync::atomic::AtomicUsize,
    /// Its attributes in a client span, made by the first traced request to it.
    #[serde(skip)]
    pub span_attributes: OnceLock<Attributes>,
    #[serde(skip)]
    addrs: Vec<(SocketAddr, Via)>,
}

impl ServicePort {
    pub fn name(&self) -> String {
        if self.port_name.is_empty() {
            format!("{}/{}:{}", self.namespace, self.service, self.port)
        } else {
            format!("{}/{}:{}", self.namespace, self.service, self.port_name)
        }
    }

    /// How the reject chain treats this port's addresses ([`crate::reject`]).
    pub fn verdicts(&self) -> impl Iterator<Item = (SocketAddr, Verdict)> + '_ {
        self.addrs
            .iter()
            .filter_map(|(addr, via)| match self.selection(*via, *addr) {
                Selection::Reject => Some((*addr, Verdict::Reject)),
                Selection::Drop => Some((*addr, Verdict::Drop)),
                Selection::Endpoints(_) => None,
            })
    }

    /// The endpoints usable for a connection to `dst` that came in `via`.
    pub fn selection(&self, via: Via, dst: SocketAddr) -> &Selection {
        &self.selections[via as usize][usize::from(dst.is_ipv6())]
    }
}

/// How a connection reached a Service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Via {
    ClusterIp = 0,
    External = 1,
}

/// What the table says about a destination.
#[derive(Debug, Clone)]
pub enum Route {
    /// A Service port: balance over its endpoints.
    Service(Arc<ServicePort>, Via),
    /// A virtual IP, but no Service port listens there: refuse (nftables kube-proxy: REJECT).
    UnknownPort,
    /// Not a Service address (a pod IP, a headless Service's endpoint, anything else): connect
    /// to the original destination unchanged.
    Passthrough,
}

type Cell = Arc<ArcSwap<ServicePort>>;

/// One immutable view of the address map. Cells inside swap independently.
#[derive(Debug, Default)]
pub struct Table {
    by_addr: HashMap<SocketAddr, (Cell, Via)>,
    /// (namespace, Service, port number): HTTPRoute backendRefs name Services this way.
    by_name: HashMap<(String, String, u16), Cell>,
    vips: HashSet<IpAddr>,
    pub version: u64,
}

impl Table {
    pub fn route(&self, dst: SocketAddr) -> Route {
        match self.by_addr.get(&dst) {
            Some((cell, via)) => Route::Service(cell.load_full(), *via),
            None if self.vips.contains(&dst.ip()) => Route::UnknownPort,
            None => Route::Passthrough,
        }
    }

    /// A Service port by name, for HTTPRoute backendRefs.
    pub fn service_port(
        &self,
        namespace: &str,
        service: &str,
        port: u16,
    ) -> Option<Arc<ServicePort>> {
        self.by_name
            .get(&(namespace.to_string(), service.to_string(), port))
            .map(|c| c.load_full())
    }

    /// Every port of a Service, lowest port number first (HTTP callouts without a port).
    pub fn service_ports_of(&self, namespace: &str, service: &str) -> Vec<Arc<ServicePort>> {
        let mut v: Vec<Arc<ServicePort>> = self
            .by_name
            .iter()
            .filter(|((ns, svc, _), _)| ns == namespace && svc == service)
            .map(|(_, c)| c.load_full())
            .collect();
        v.sort_by_key(|sp| sp.port);
        v
    }

    pub fn len(&self) -> usize {
        self.by_addr.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_addr.is_empty()
    }
}

fn ip_from(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

fn opt(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

/// Kube-proxy's `CategorizeEndpoints` for one client: ready endpoints, else serving and
/// terminating ones; node-local only for internalTrafficPolicy Local; topology hints when every
/// ready endpoint carries them and one matches this client.
pub fn select(
    endpoints: &[Endpoint],
    v6: bool,
    local_only: bool,
    distribution_hints: bool,
    me: &Locality,
) -> Selection {
    let family_ok = |e: &Endpoint| e.addr.is_ipv6() == v6;
    if !endpoints.iter().any(family_ok) {
        return Selection::Reject;
    }
    let usable = |pred: &dyn Fn(&Endpoint) -> bool| -> Vec<usize> {
        endpoints
            .iter()
            .enumerate()
            .filter(|(_, e)| family_ok(e) && pred(e))
            .map(|(i, _)| i)
            .collect()
    };
    let is_local = |e: &Endpoint| e.node.is_some() && e.node == me.node;
    if local_only {
        let ready = usable(&|e| e.ready && is_local(e));
        if !ready.is_empty() {
            return Selection::Endpoints(ready);
        }
        let fallback = usable(&|e| e.serving && e.terminating && is_local(e));
        if !fallback.is_empty() {
            return Selection::Endpoints(fallback);
        }
        // The Service has endpoints, none on this node: kube-proxy drops.
        return if endpoints
            .iter()
            .any(|e| family_ok(e) && (e.ready || (e.serving && e.terminating)))
        {
            Selection::Drop
        } else {
            Selection::Reject
        };
    }
    let ready = usable(&|e| e.ready);
    if !ready.is_empty() {
        if distribution_hints && let Some(close) = topology(endpoints, &ready, me) {
            return Selection::Endpoints(close);
        }
        return Selection::Endpoints(ready);
    }
    // Terminating fallback ignores topology ("best effort to avoid dropping connections").
    let fallback = usable(&|e| e.serving && e.terminating);
    if fallback.is_empty() {
        Selection::Reject
    } else {
        Selection::Endpoints(fallback)
    }
}

/// Same-node hints first (PreferSameNode), then same-zone hints (PreferClose/PreferSameZone),
/// each only when every ready endpoint carries hints of that kind and one matches this client.
fn topology(endpoints: &[Endpoint], ready: &[usize], me: &Locality) -> Option<Vec<usize>> {
    let pick = |hints: &dyn Fn(&Endpoint) -> &Vec<String>, mine: &Option<String>| {
        let mine = mine.as_ref()?;
        if !ready.iter().all(|i| !hints(&endpoints[*i]).is_empty()) {
            return None;
        }
        let close: Vec<usize> = ready
            .iter()
            .copied()
            .filter(|i| hints(&endpoints[*i]).contains(mine))
            .collect();
        (!close.is_empty()).then_some(close)
    };
    pick(&|e| &e.hint_nodes, &me.node).or_else(|| pick(&|e| &e.hint_zones, &me.zone))
}

/// Decodes one Service port from the stream for this proxy.
pub fn decode(sp: &pb::ServicePort, me: &Locality, loads: &mut Loads) -> Option<ServicePort> {
    let key = sp.key.as_ref()?;
    let port = u16::try_from(sp.port).ok()?;
    let endpoints: Vec<Endpoint> = sp
        .endpoints
        .iter()
        .filter_map(|e| {
            let addr = SocketAddr::new(ip_from(&e.address)?, u16::try_from(e.port).ok()?);
            let w = e.workload.as_ref();
            Some(Endpoint {
                addr,
                ready: e.ready,
                serving: e.serving,
                terminating: e.terminating,
                node: opt(&e.node_name),
                zone: opt(&e.zone),
                hint_zones: e.hint_zones.clone(),
                hint_nodes: e.hint_nodes.clone(),
                pod: w.map(|w| format!("{}/{}", w.namespace, w.name)),
                service_account: w.and_then(|w| opt(&w.service_account)),
                meshed: w.is_some_and(|w| w.meshed),
                load: loads.get(addr),
                picks: Counter::default(),
                span_attributes: OnceLock::new(),
            })
        })
        .collect();
    let local_only = sp.internal_traffic_policy == pb::TrafficPolicy::Local as i32;
    let selections = [
        [
            select(&endpoints, false, local_only, true, me),
            select(&endpoints, true, local_only, true, me),
        ],
        [
            select(&endpoints, false, false, false, me),
            select(&endpoints, true, false, false, me),
        ],
    ];
    let mut addrs = Vec::new();
    let udp_or_sctp = key.protocol != pb::Protocol::Tcp as i32;
    if !sp.headless && sp.external_name.is_empty() && !udp_or_sctp {
        for ip in sp.cluster_ips.iter().filter_map(|b| ip_from(b)) {
            addrs.push((SocketAddr::new(ip, port), Via::ClusterIp));
        }
        for ip in sp
            .external_ips
            .iter()
            .chain(&sp.load_balancer_ips)
            .filter_map(|b| ip_from(b))
        {
            addrs.push((SocketAddr::new(ip, port), Via::External));
        }
    }
    let options: BTreeMap<String, String> = sp.options.clone().into_iter().collect();
    let (routes, errors) =
        Routes::compile(&sp.http_routes, &key.namespace, me.namespace.as_deref());
    for e in errors {
        tracing::warn!(service = %key.service, namespace = %key.namespace, error = %e, "HTTPRoute left out");
    }
    let mut protocol = detect::declared(&sp.app_protocol, &key.port_name);
    if detect::is_opaque_port(port, options.get("opaque-ports").map(String::as_str)) {
        protocol = Declared::Opaque;
    } else if protocol == Declared::Detect && !sp.http_routes.is_empty() {
        // A route attached says HTTP; detection still tells HTTP/1 from HTTP/2.
        protocol = Declared::Http;
    }
    let mut http_routes: Vec<String> = sp
        .http_routes
        .iter()
        .map(|r| format!("{}/{}", r.namespace, r.name))
        .collect();
    http_routes.dedup();
    let label = crate::metrics::label(&format!("{}/{}", key.namespace, key.service));
    Some(ServicePort {
        outcomes: Arc::new(crate::metrics::Outcomes::new(
            crate::metrics::Direction::Outbound,
            Some(label.clone()),
            None,
            None,
        )),
        label,
        namespace: key.namespace.clone(),
        service: key.service.clone(),
        port_name: key.port_name.clone(),
        port,
        headless: sp.headless,
        external_name: opt(&sp.external_name),
        affinity: (sp.affinity_timeout_seconds > 0)
            .then(|| Duration::from_secs(u64::from(sp.affinity_timeout_seconds))),
        balancer: options.get("balancer").and_then(|b| b.parse().ok()),
        options,
        node_port: u16::try_from(sp.node_port)
            .ok()
            .filter(|p| *p != 0 && !udp_or_sctp),
        app_protocol: opt(&sp.app_protocol),
        protocol,
        routes,
        http_routes,
        endpoints,
        selections,
        id: port_id(key),
        rr: Default::default(),
        span_attributes: OnceLock::new(),
        addrs,
    })
}

/// The picks label set of an endpoint of the Service `service`: the Pod's name without its
/// namespace (the Service's), "" for an endpoint without a Pod.
fn pick_labels(service: Arc<str>, ep: &Endpoint) -> EndpointLabels {
    EndpointLabels {
        service,
        pod: ep
            .pod
            .as_deref()
            .map(|p| crate::metrics::label(p.rsplit_once('/').map_or(p, |(_, name)| name))),
    }
}

/// Keeps the table current from decoded updates. Owned by the discovery task.
#[derive(Debug, Default)]
pub struct TableBuilder {
    me: Locality,
    cells: HashMap<PortId, Cell>,
    /// NodePort addresses: every node's addresses, for Services with a nodePort.
    node_ips: Vec<IpAddr>,
    pub loads: Loads,
    /// Service addresses to refuse or drop, kept per changed port.
    verdicts: Verdicts,
    verdicts_changed: bool,
    /// `wasmesh_balancer_picks_total`, and how many endpoints in the table use each of its
    /// label sets: a set no endpoint uses any more (its Pod or Service gone) is removed.
    picks: Option<Family<EndpointLabels, Counter>>,
    pick_refs: HashMap<EndpointLabels, usize>,
    /// `namespace/name` of this proxy's pod ([`TableBuilder::local_services`]).
    pod: Option<String>,
}

impl TableBuilder {
    pub fn new(me: Locality) -> Self {
        Self {
            me,
            ..Default::default()
        }
    }

    pub fn locality(&self) -> &Locality {
        &self.me
    }

    /// Gives every endpoint its counter in `family` from now on.
    pub fn count_picks(&mut self, family: Family<EndpointLabels, Counter>) {
        self.picks = Some(family);
    }

    /// This proxy's pod (`namespace/name`), to find the Services that select it.
    pub fn set_pod(&mut self, pod: String) {
        self.pod = Some(pod);
    }

    /// Sets the picks counters of a newly decoded port.
    fn attach(&mut self, sp: &mut ServicePort) {
        let Some(family) = &self.picks else { return };
        for ep in &mut sp.endpoints {
            let labels = pick_labels(sp.label.clone(), ep);
            ep.picks = family.get_or_create_owned(&labels);
            *self.pick_refs.entry(labels).or_default() += 1;
        }
    }

    /// A port left the table: its label sets lose a user.
    fn detach(&mut self, sp: &ServicePort) {
        let Some(family) = &self.picks else { return };
        for ep in &sp.endpoints {
            let labels = pick_labels(sp.label.clone(), ep);
            if let Some(n) = self.pick_refs.get_mut(&labels) {
                *n -= 1;
                if *n == 0 {
                    self.pick_refs.remove(&labels);
                    family.remove(&labels);
                }
            }
        }
    }

    fn decode(&mut self, sp: &pb::ServicePort) -> Option<ServicePort> {
        let mut new = decode(sp, &self.me, &mut self.loads)?;
        self.attach(&mut new);
        Some(new)
    }

    /// Applies a consistent table from the stream. `changed`: the ports a delta named (None:
    /// everything, after a snapshot). Returns a new address map when addresses changed;
    /// otherwise the changed ports were swapped in place.
    pub fn apply(
        &mut self,
        table: &wasmesh_api::table::Table,
        changed: Option<&[PortId]>,
    ) -> Option<Table> {
        // This proxy's zone and every node's addresses come from control; when they change,
        // every selection and NodePort address may change.
        let zone = self
            .me
            .node
            .as_ref()
            .and_then(|node| table.nodes.get(node))
            .and_then(|n| opt(&n.zone));
        let mut node_ips: Vec<IpAddr> = table
            .nodes
            .values()
            .flat_map(|n| n.addresses.iter().filter_map(|a| ip_from(a)))
            .collect();
        node_ips.sort();
        let Some(changed) = changed.filter(|_| zone == self.me.zone && node_ips == self.node_ips)
        else {
            self.me.zone = zone;
            self.node_ips = node_ips;
            // The new ports take their counters before the old ones let go of them, so an
            // endpoint that stays keeps counting from where it was.
            let old = std::mem::take(&mut self.cells);
            for (id, sp) in &table.ports {
                if let Some(new) = self.decode(sp) {
                    self.cells
                        .insert(id.clone(), Arc::new(ArcSwap::from_pointee(new)));
                }
            }
            for cell in old.values() {
                self.detach(&cell.load());
            }
            self.loads.collect_garbage();
            return Some(self.index(table.version));
        };
        let mut addresses_changed = false;
        for id in changed {
            match table.ports.get(id).and_then(|sp| self.decode(sp)) {
                Some(new) => match self.cells.get(id).cloned() {
                    Some(cell) => {
                        let old = cell.load_full();
                        addresses_changed |=
                            old.addrs != new.addrs || old.node_port != new.node_port;
                        cell.store(Arc::new(new));
                        self.detach(&old);
                    }
                    None => {
                        self.cells
                            .insert(id.clone(), Arc::new(ArcSwap::from_pointee(new)));
                        addresses_changed = true;
                    }
                },
                None => {
                    if let Some(old) = self.cells.remove(id) {
                        self.detach(&old.load());
                        addresses_changed = true;
                    }
                }
            }
        }
        addresses_changed.then(|| self.index(table.version))
    }

    fn index(&self, version: u64) -> Table {
        let mut t = Table {
            version,
            ..Default::default()
        };
        for cell in self.cells.values() {
            let sp = cell.load();
            t.by_name.insert(
                (sp.namespace.clone(), sp.service.clone(), sp.port),
                cell.clone(),
            );
            for (addr, via) in &sp.addrs {
                t.by_addr.insert(*addr, (cell.clone(), *via));
                if *via == Via::ClusterIp {
                    t.vips.insert(addr.ip());
                }
            }
            // NodePorts: every node's addresses at the nodePort, as external traffic.
            if let Some(np) = sp.node_port {
                for ip in &self.node_ips {
                    t.by_addr
                        .insert(SocketAddr::new(*ip, np), (cell.clone(), Via::External));
                }
            }
        }
        t
    }

    /// The addresses to refuse or drop, if they changed since the last call.
    pub fn take_verdicts(&mut self) -> Option<Verdicts> {
        std::mem::take(&mut self.verdicts_changed).then(|| self.verdicts.clone())
    }

    /// Endpoint addresses (pod IP and port) behind Service ports declared opaque: the inbound
    /// side serves them as plain TCP without waiting to detect HTTP.
    pub fn opaque_endpoints(&self) -> HashSet<SocketAddr> {
        self.cells
            .values()
            .map(|c| c.load())
            .filter(|sp| sp.protocol == Declared::Opaque)
            .flat_map(|sp| sp.endpoints.iter().map(|e| e.addr).collect::<Vec<_>>())
            .collect()
    }

    /// This pod's ports → the Service (`namespace/name`) whose endpoints name this pod there;
    /// when several do, the first by name. Empty when the pod is unknown.
    pub fn local_services(&self) -> HashMap<u16, Arc<str>> {
        let mut out: HashMap<u16, Arc<str>> = HashMap::new();
        let Some(me) = self.pod.as_deref() else {
            return out;
        };
        for cell in self.cells.values() {
            let sp = cell.load();
            for ep in sp.endpoints.iter().filter(|e| e.pod.as_deref() == Some(me)) {
                let port = ep.addr.port();
                if out.get(&port).is_none_or(|s| *s > sp.label) {
                    out.insert(port, sp.label.clone());
                }
            }
        }
        out
    }

    /// The current Service ports, for `/config`.
    pub fn ports(&self) -> Vec<Arc<ServicePort>> {
        let mut v: Vec<Arc<ServicePort>> = self.cells.values().map(|c| c.load_full()).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }
}

#[cfg(test)]
mod tests {
    //! `select` against kube-proxy's `CategorizeEndpoints` and the packet-flow vectors of
    //! `k8s-service-semantics.md` §D (V10–V15), from a pod's point of view.
    use super::*;

    /// `ip:port;conditions;node;zone hints` shorthand: r=ready, s=serving, t=terminating.
    fn ep(spec: &str) -> Endpoint {
        let mut parts = spec.split(';');
        let addr: SocketAddr = parts.next().and_then(|a| a.parse().ok()).expect("addr");
        let cond = parts.next().unwrap_or("rs");
        let node = parts.next().filter(|n| !n.is_empty()).map(String::from);
        let zones: Vec<String> = parts
            .next()
            .map(|z| {
                z.split(',')
                    .filter(|z| !z.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        Endpoint {
            addr,
            ready: cond.contains('r'),
            serving: cond.contains('s'),
            terminating: cond.contains('t'),
            node,
            zone: None,
            hint_zones: zones,
            hint_nodes: vec![],
            pod: None,
            service_account: None,
            meshed: false,
            load: Arc::default(),
            picks: Counter::default(),
            span_attributes: OnceLock::new(),
        }
    }

    fn addrs(eps: &[Endpoint], sel: &Selection) -> Vec<String> {
        match sel {
            Selection::Endpoints(i) => i.iter().map(|i| eps[*i].addr.to_string()).collect(),
            other => vec![format!("{other:?}")],
        }
    }

    fn me(node: &str, zone: Option<&str>) -> Locality {
        Locality {
            node: Some(node.into()),
            zone: zone.map(String::from),
            namespace: None,
        }
    }

    #[test]
    fn packet_flow_vectors() {
        let node0 = me("node0", None);
        // (endpoints, internalTrafficPolicy Local?, expected for a pod on node0 → ClusterIP)
        let cases: Vec<(&str, Vec<&str>, bool, Vec<&str>)> = vec![
            (
                "V1 simple",
                vec!["10.180.0.1:80"],
                false,
                vec!["10.180.0.1:80"],
            ),
            (
                "V10 iTP Local, none local",
                vec!["10.0.1.1:80;rs;node1", "10.0.1.2:80;rs;node2"],
                true,
                vec!["Drop"],
            ),
            ("V10 after slice delete", vec![], true, vec!["Reject"]),
            (
                "V12 Cluster: all ready, no terminating",
                vec![
                    "10.0.1.1:80;rs;node0",
                    "10.0.1.2:80;rs;node0",
                    "10.0.1.3:80;st;node0",
                    "10.0.1.4:80;t;node0",
                    "10.0.1.5:80;rs;node1",
                ],
                false,
                vec!["10.0.1.1:80", "10.0.1.2:80", "10.0.1.5:80"],
            ),
            (
                "V13 only remote ready",
                vec![
                    "10.0.1.2:80;st;node0",
                    "10.0.1.3:80;st;node0",
                    "10.0.1.5:80;rs;node1",
                ],
                false,
                vec!["10.0.1.5:80"],
            ),
            (
                "V14 only remote serving-terminating",
                vec!["10.0.1.5:80;st;node1"],
                false,
                vec!["10.0.1.5:80"],
            ),
            (
                "V15 only not-ready, not-serving",
                vec!["10.0.1.1:80;;node0", "10.0.1.2:80;t;node0"],
                false,
                vec!["Reject"],
            ),
            (
                "case 10: ready=false not terminating is never used",
                vec!["10.0.1.1:80;s"],
                false,
                vec!["Reject"],
            ),
            (
                "case 12: Local prefers local ready over local terminating",
                vec![
                    "10.0.1.1:80;rs;node0",
                    "10.0.1.2:80;st;node0",
                    "10.0.1.3:80;rs;node1",
                ],
                true,
                vec!["10.0.1.1:80"],
            ),
            (
                "case 12: Local falls back to local terminating",
                vec!["10.0.1.2:80;st;node0", "10.0.1.3:80;rs;node1"],
                true,
                vec!["10.0.1.2:80"],
            ),
            (
                "case 21: endpoints without nodeName are never local",
                vec!["10.0.1.1:80;rs"],
                true,
                vec!["Drop"],
            ),
        ];
        for (name, eps, local, want) in cases {
            let eps: Vec<Endpoint> = eps.into_iter().map(ep).collect();
            let got = addrs(&eps, &select(&eps, false, local, true, &node0));
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn zone_hints_are_used_only_when_every_ready_endpoint_has_them_and_one_matches() {
        let a = me("n1", Some("zone-a"));
        let c = me("n3", Some("zone-c"));
        let hinted = vec![
            ep("10.0.0.1:80;rs;n1;zone-a"),
            ep("10.0.0.2:80;rs;n2;zone-b"),
        ];
        assert_eq!(
            addrs(&hinted, &select(&hinted, false, false, true, &a)),
            ["10.0.0.1:80"]
        );
        // A client in a zone with no endpoint uses all of them.
        assert_eq!(
            addrs(&hinted, &select(&hinted, false, false, true, &c)).len(),
            2
        );
        // A client whose zone is unknown uses all of them.
        assert_eq!(
            addrs(
                &hinted,
                &select(&hinted, false, false, true, &me("n1", None))
            )
            .len(),
            2
        );
        // One ready endpoint without a hint disables hints.
        let partial = vec![ep("10.0.0.1:80;rs;n1;zone-a"), ep("10.0.0.2:80;rs;n2")];
        assert_eq!(
            addrs(&partial, &select(&partial, false, false, true, &a)).len(),
            2
        );
        // The terminating fallback ignores hints.
        let term = vec![
            ep("10.0.0.1:80;st;n1;zone-b"),
            ep("10.0.0.2:80;st;n2;zone-a"),
        ];
        assert_eq!(
            addrs(&term, &select(&term, false, false, true, &a)).len(),
            2
        );
    }

    #[test]
    fn picks_series_follow_the_pods_in_the_table_and_survive_a_snapshot() {
        use prometheus_client::metrics::counter::Counter;
        use prometheus_client::metrics::family::Family;
        let port = |service: &str, pods: &[&str]| pb::ServicePort {
            key: Some(pb::ServicePortKey {
                namespace: "ns".into(),
                service: service.into(),
                port_name: "http".into(),
                protocol: pb::Protocol::Tcp as i32,
            }),
            port: 80,
            cluster_ips: vec![vec![10, 96, 0, service.len() as u8]],
            endpoints: pods
                .iter()
                .enumerate()
                .map(|(i, pod)| pb::Endpoint {
                    address: vec![10, 0, 0, i as u8 + 1],
                    port: 8080,
                    ready: true,
                    serving: true,
                    workload: Some(pb::Workload {
                        name: pod.to_string(),
                        namespace: "ns".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let update = |version, kind: pb::table_update::Kind, ports, removed| pb::TableUpdate {
            version,
            kind: kind as i32,
            service_ports: ports,
            removed_service_ports: removed,
            complete: true,
            ..Default::default()
        };
        let family: Family<EndpointLabels, Counter> = Family::default();
        let mut b = TableBuilder::new(Locality::default());
        b.count_picks(family.clone());
        b.set_pod("ns/web-1".into());
        let mut wire = wasmesh_api::table::Table::default();
        let labels = |svc: &str, pod: &str| EndpointLabels {
            service: crate::metrics::label(svc),
            pod: Some(crate::metrics::label(pod)),
        };
        let snapshot = pb::table_update::Kind::Snapshot;
        wire.apply(update(
            1,
            snapshot,
            vec![port("web", &["web-1", "web-2"])],
            vec![],
        ))
        .expect("applies");
        let t = b.apply(&wire, None).expect("a table");
        let Route::Service(sp, _) = t.route("10.96.0.3:80".parse().expect("addr")) else {
            panic!("web is in the table");
        };
        sp.endpoints[0].picks.inc();
        assert_eq!(
            family.get(&labels("ns/web", "web-1")).map(|c| c.get()),
            Some(1)
        );
        assert_eq!(
            b.local_services().get(&8080).map(|s| s.to_string()),
            Some("ns/web".into()),
            "this pod is web-1, an endpoint of web on 8080"
        );
        // A new snapshot: web-1 stays and keeps its count; web-2 is gone.
        wire.apply(update(
            2,
            snapshot,
            vec![port("web", &["web-1", "web-3"])],
            vec![],
        ))
        .expect("applies");
        b.apply(&wire, None);
        assert_eq!(
            family.get(&labels("ns/web", "web-1")).map(|c| c.get()),
            Some(1)
        );
        assert!(family.get(&labels("ns/web", "web-2")).is_none());
        assert!(family.get(&labels("ns/web", "web-3")).is_some());
        // The Service removed by a delta: its series go with it.
        let key = wire.ports.keys().next().cloned().expect("a port");
        let removed = wire.ports[&key].key.clone().expect("key");
        wire.apply(update(
            3,
            pb::table_update::Kind::Delta,
            vec![],
            vec![removed],
        ))
        .expect("applies");
        b.apply(&wire, Some(&[key]));
        for pod in ["web-1", "web-3"] {
            assert!(family.get(&labels("ns/web", pod)).is_none(), "{pod}");
        }
        assert!(b.local_services().is_empty());
    }

    #[test]
    fn address_families_are_never_mixed() {
        let eps = vec![ep("10.0.0.1:80"), ep("[fd00::1]:80")];
        let m = me("n", None);
        assert_eq!(
            addrs(&eps, &select(&eps, false, false, true, &m)),
            ["10.0.0.1:80"]
        );
        assert_eq!(
            addrs(&eps, &select(&eps, true, false, true, &m)),
            ["[fd00::1]:80"]
        );
        let v4 = vec![ep("10.0.0.1:80")];
        assert_eq!(addrs(&v4, &select(&v4, true, false, true, &m)), ["Reject"]);
    }
}
