//! The service table as control computes it: one [`ServicePortEntry`] per Service port, with the
//! endpoints merged from every EndpointSlice of the Service.
//!
//! These are the types the `table` command prints and the discovery stream encodes
//! ([`ServicePortEntry::to_proto`]). They carry facts, not decisions: which endpoints a given
//! client may use (ready first, then serving+terminating, node-local, same zone) depends on the
//! client and is decided in the proxy.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;
use wasmesh_api::discovery as pb;

use super::routes::RouteEntry;

/// L4 protocol of a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Parses the Kubernetes spelling; `None` (unset) is TCP, as the API server defaults it.
    pub fn parse(s: Option<&str>) -> Option<Protocol> {
        match s {
            None | Some("TCP") => Some(Protocol::Tcp),
            Some("UDP") => Some(Protocol::Udp),
            Some("SCTP") => Some(Protocol::Sctp),
            Some(_) => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    fn to_proto(self) -> pb::Protocol {
        match self {
            Protocol::Tcp => pb::Protocol::Tcp,
            Protocol::Udp => pb::Protocol::Udp,
            Protocol::Sctp => pb::Protocol::Sctp,
        }
    }
}

/// `(namespace, service, port name, protocol)`: how kube-proxy joins a Service port to the
/// ports of its EndpointSlices (never by number, never by targetPort).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortKey {
    pub namespace: String,
    pub service: String,
    pub port_name: String,
    pub protocol: Protocol,
}

impl PortKey {
    pub fn to_proto(&self) -> pb::ServicePortKey {
        pb::ServicePortKey {
            namespace: self.namespace.clone(),
            service: self.service.clone(),
            port_name: self.port_name.clone(),
            protocol: self.protocol.to_proto() as i32,
        }
    }
}

impl std::fmt::Display for PortKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service)?;
        if !self.port_name.is_empty() {
            write!(f, ":{}", self.port_name)?;
        }
        write!(f, "/{}", self.protocol.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ServiceType {
    ClusterIP,
    NodePort,
    LoadBalancer,
    ExternalName,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

impl TrafficPolicy {
    pub fn parse(s: Option<&str>) -> TrafficPolicy {
        match s {
            Some("Local") => TrafficPolicy::Local,
            _ => TrafficPolicy::Cluster,
        }
    }

    fn to_proto(self) -> pb::TrafficPolicy {
        match self {
            TrafficPolicy::Cluster => pb::TrafficPolicy::Cluster,
            TrafficPolicy::Local => pb::TrafficPolicy::Local,
        }
    }
}

/// An address range, e.g. a `loadBalancerSourceRanges` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Cidr> {
        let (a, p) = s.trim().split_once('/')?;
        let addr: IpAddr = a.parse().ok()?;
        let prefix: u8 = p.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Everything a proxy needs to know about one Service port.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePortEntry {
    #[serde(flatten)]
    pub key: PortKey,
    pub port: u16,
    #[serde(rename = "type")]
    pub service_type: ServiceType,
    /// `clusterIPs` (both families for dual-stack Services). Empty when headless.
    pub cluster_ips: Vec<IpAddr>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` whose ipMode is VIP (or unset).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub load_balancer_ips: Vec<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
    /// `sessionAffinity: ClientIP` timeout in seconds; `None` for `sessionAffinity: None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_affinity_timeout_seconds: Option<u32>,
    pub internal_traffic_policy: TrafficPolicy,
    pub external_traffic_policy: TrafficPolicy,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traffic_distribution: Option<String>,
    /// `clusterIP: None`, or labelled `service.kubernetes.io/headless`: nothing to balance;
    /// connections keep their destination. Endpoints are still listed (identities for mTLS).
    pub headless: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_name: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub load_balancer_source_ranges: Vec<Cidr>,
    /// wasmesh settings from `wasmesh.io/*` annotations, prefix stripped (e.g. `balancer`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
    /// Sorted by address then port; one entry per address:port.
    pub endpoints: Vec<EndpointEntry>,
    /// HTTPRoutes attached to this port (GAMMA), sorted by namespace then name; shared with
    /// the other ports they attach to. Non-empty makes the port HTTP.
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "shared_routes"
    )]
    pub http_routes: Vec<Arc<RouteEntry>>,
}

fn shared_routes<S: serde::Serializer>(
    routes: &[Arc<RouteEntry>],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(routes.iter().map(Arc::as_ref))
}

/// One endpoint of a service port, as its EndpointSlice(s) describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointEntry {
    pub address: IpAddr,
    /// The port from the endpoint's slice (never the Service's targetPort).
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hint_zones: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hint_nodes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<WorkloadEntry>,
}

/// The Pod behind an endpoint's targetRef.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEntry {
    pub name: String,
    pub namespace: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// The pod carries the wasmesh sidecar.
    pub meshed: bool,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A node, for topology (its zone) and NodePorts (its addresses).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeEntry {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    pub addresses: Vec<IpAddr>,
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

impl ServicePortEntry {
    pub fn to_proto(&self) -> pb::ServicePort {
        pb::ServicePort {
            key: Some(self.key.to_proto()),
            port: u32::from(self.port),
            service_type: match self.service_type {
                ServiceType::ClusterIP => pb::ServiceType::ClusterIp,
                ServiceType::NodePort => pb::ServiceType::NodePort,
                ServiceType::LoadBalancer => pb::ServiceType::LoadBalancer,
                ServiceType::ExternalName => pb::ServiceType::ExternalName,
            } as i32,
            cluster_ips: self.cluster_ips.iter().map(ip_bytes).collect(),
            external_ips: self.external_ips.iter().map(ip_bytes).collect(),
            load_balancer_ips: self.load_balancer_ips.iter().map(ip_bytes).collect(),
            node_port: self.node_port.map(u32::from).unwrap_or(0),
            app_protocol: self.app_protocol.clone().unwrap_or_default(),
            affinity_timeout_seconds: self.session_affinity_timeout_seconds.unwrap_or(0),
            internal_traffic_policy: self.internal_traffic_policy.to_proto() as i32,
            external_traffic_policy: self.external_traffic_policy.to_proto() as i32,
            traffic_distribution: self.traffic_distribution.clone().unwrap_or_default(),
            headless: self.headless,
            external_name: self.external_name.clone().unwrap_or_default(),
            load_balancer_source_ranges: self
                .load_balancer_source_ranges
                .iter()
                .map(|c| pb::Cidr {
                    address: ip_bytes(&c.addr),
                    prefix_len: u32::from(c.prefix),
                })
                .collect(),
            options: self.options.clone().into_iter().collect(),
            endpoints: self.endpoints.iter().map(EndpointEntry::to_proto).collect(),
            http_routes: self.http_routes.iter().map(|r| r.to_proto()).collect(),
        }
    }
}

impl EndpointEntry {
    fn to_proto(&self) -> pb::Endpoint {
        pb::Endpoint {
            address: ip_bytes(&self.address),
            port: u32::from(self.port),
            ready: self.ready,
            serving: self.serving,
            terminating: self.terminating,
            node_name: self.node_name.clone().unwrap_or_default(),
            zone: self.zone.clone().unwrap_or_default(),
            hint_zones: self.hint_zones.clone(),
            hint_nodes: self.hint_nodes.clone(),
            workload: self.workload.as_ref().map(|w| pb::Workload {
                name: w.name.clone(),
                namespace: w.namespace.clone(),
                service_account: w.service_account.clone().unwrap_or_default(),
                meshed: w.meshed,
                labels: w.labels.clone().into_iter().collect(),
            }),
        }
    }
}

impl NodeEntry {
    pub fn to_proto(&self) -> pb::Node {
        pb::Node {
            name: self.name.clone(),
            zone: self.zone.clone().unwrap_or_default(),
            addresses: self.addresses.iter().map(ip_bytes).collect(),
        }
    }
}
