//! Pure functions from Kubernetes objects to [`ServicePortEntry`]s, following kube-proxy
//! (`pkg/proxy/serviceport.go`, `endpointslicecache.go`, `utils.go`; the numbered cases of
//! `k8s-service-semantics.md` are cited where they apply).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::entry::*;

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// A Service with this label (any value) is not proxied (case 15).
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// A Service with this label belongs to another proxy, unless the value is ours (case 17).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Our name for `service-proxy-name`: Services labelled with it are ours even though
/// kube-proxy leaves them alone.
pub const WASMESH_PROXY_NAME: &str = "wasmesh";
/// Annotations with this prefix become the entry's `options`.
pub const OPTION_PREFIX: &str = "wasmesh.io/";
/// Set by the injector on pods that carry the sidecar.
pub const INJECTED_ANNOTATION: &str = "wasmesh.io/injected";
/// The sidecar's container name.
pub const PROXY_CONTAINER: &str = "wasmesh-proxy";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// `sessionAffinityConfig.clientIP.timeoutSeconds` default and maximum (case 20).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;
pub const MAX_AFFINITY_TIMEOUT: u32 = 86400;

/// What control keeps of a Pod: only what endpoints carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub labels: BTreeMap<String, String>,
    pub service_account: Option<String>,
    pub meshed: bool,
}

impl PodInfo {
    pub fn from_pod(pod: &Pod) -> PodInfo {
        let spec = pod.spec.as_ref();
        let has_proxy = spec.is_some_and(|s| {
            s.containers.iter().any(|c| c.name == PROXY_CONTAINER)
                || s.init_containers
                    .iter()
                    .flatten()
                    .any(|c| c.name == PROXY_CONTAINER)
        });
        let annotated = pod
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(INJECTED_ANNOTATION));
        PodInfo {
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .or_else(|| Some("default".to_string())),
            meshed: has_proxy || annotated,
        }
    }
}

/// The node facts a proxy needs.
pub fn node_entry(node: &Node) -> NodeEntry {
    let zone = node
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(ZONE_LABEL))
        .cloned();
    let mut addresses: Vec<IpAddr> = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    addresses.sort();
    addresses.dedup();
    NodeEntry {
        name: node.metadata.name.clone().unwrap_or_default(),
        zone,
        addresses,
    }
}

/// Whether wasmesh handles this Service at all (kube-proxy's `ShouldSkipService` plus the
/// service-proxy-name label). Headless Services are handled (listed, not balanced).
pub fn is_ours(svc: &Service) -> bool {
    match svc
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_PROXY_NAME_LABEL))
    {
        Some(owner) => owner == WASMESH_PROXY_NAME,
        None => true,
    }
}

fn parse_ips<'a>(ips: impl IntoIterator<Item = &'a String>) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = ips.into_iter().filter_map(|s| s.parse().ok()).collect();
    out.dedup();
    out
}

/// Endpoints of every slice of one Service, keyed by slice name (sorted, so merging is
/// deterministic).
pub type Slices = BTreeMap<String, EndpointSlice>;

/// Looks up the facts of a Pod by `(namespace, name)`.
pub type Pods = HashMap<(String, String), PodInfo>;

/// All entries of one Service, sorted by key, without routes (the model attaches those). Empty
/// when the Service is not ours.
pub fn service_entries(svc: &Service, slices: &Slices, pods: &Pods) -> Vec<ServicePortEntry> {
    if !is_ours(svc) {
        return Vec::new();
    }
    let namespace = svc
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = svc.metadata.name.clone().unwrap_or_default();
    let spec = svc.spec.clone().unwrap_or_default();
    let labels = svc.metadata.labels.clone().unwrap_or_default();

    let service_type = match spec.type_.as_deref() {
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => ServiceType::ExternalName,
        _ => ServiceType::ClusterIP,
    };
    let external_name = (service_type == ServiceType::ExternalName)
        .then(|| spec.external_name.clone())
        .flatten();

    // Case 15/16: "None" or empty clusterIP, the headless label, and ExternalName: no VIP.
    let cluster_ip_strings: Vec<String> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.clone(),
        (_, Some(ip)) => vec![ip.clone()],
        _ => Vec::new(),
    };
    let headless = service_type != ServiceType::ExternalName
        && (labels.contains_key(HEADLESS_LABEL)
            || cluster_ip_strings.is_empty()
            || cluster_ip_strings
                .iter()
                .any(|ip| ip == "None" || ip.is_empty()));
    let has_vips = !headless && service_type != ServiceType::ExternalName;
    let cluster_ips = if has_vips {
        parse_ips(&cluster_ip_strings)
    } else {
        Vec::new()
    };
    let external_ips = if has_vips {
        parse_ips(spec.external_ips.iter().flatten())
    } else {
        Vec::new()
    };
    // Case 25: LB ingress IPs are captured unless ipMode is Proxy; hostnames are ignored.
    let load_balancer_ips = if has_vips && service_type == ServiceType::LoadBalancer {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        parse_ips(
            ingress
                .into_iter()
                .flatten()
                .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
                .filter_map(|i| i.ip.as_ref()),
        )
    } else {
        Vec::new()
    };
    let load_balancer_source_ranges = spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .filter_map(|r| Cidr::parse(r))
        .collect();

    // Case 20: ClientIP affinity; the API server defaults the timeout to 10800 s.
    let session_affinity_timeout_seconds = (spec.session_affinity.as_deref() == Some("ClientIP"))
        .then(|| {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT as i32);
            if t > 0 && t as u32 <= MAX_AFFINITY_TIMEOUT {
                t as u32
            } else {
                DEFAULT_AFFINITY_TIMEOUT
            }
        });

    let options: BTreeMap<String, String> = svc
        .metadata
        .annotations
        .iter()
        .flatten()
        .filter_map(|(k, v)| {
            k.strip_prefix(OPTION_PREFIX)
                .map(|k| (k.to_string(), v.clone()))
        })
        .collect();

    // An ExternalName Service may declare no port at all; keep one entry so the table says the
    // name exists (proxies pass its traffic through).
    let ports = match spec.ports.as_deref() {
        Some(ports) if !ports.is_empty() => ports.to_vec(),
        _ if service_type == ServiceType::ExternalName => vec![Default::default()],
        _ => Vec::new(),
    };

    let mut entries: Vec<ServicePortEntry> = ports
        .iter()
        .filter_map(|p| {
            let protocol = Protocol::parse(p.protocol.as_deref())?;
            let port = u16::try_from(p.port).ok()?;
            let key = PortKey {
                namespace: namespace.clone(),
                service: name.clone(),
                port_name: p.name.clone().unwrap_or_default(),
                protocol,
            };
            let endpoints = if service_type == ServiceType::ExternalName {
                Vec::new()
            } else {
                merge_endpoints(&key, slices, pods)
            };
            Some(ServicePortEntry {
                port,
                service_type,
                cluster_ips: cluster_ips.clone(),
                external_ips: external_ips.clone(),
                load_balancer_ips: load_balancer_ips.clone(),
                node_port: p
                    .node_port
                    .and_then(|n| u16::try_from(n).ok())
                    .filter(|n| *n != 0),
                app_protocol: p.app_protocol.clone(),
                session_affinity_timeout_seconds,
                internal_traffic_policy: TrafficPolicy::parse(
                    spec.internal_traffic_policy.as_deref(),
                ),
                external_traffic_policy: TrafficPolicy::parse(
                    spec.external_traffic_policy.as_deref(),
                ),
                traffic_distribution: spec.traffic_distribution.clone(),
                headless,
                external_name: external_name.clone(),
                load_balancer_source_ranges: Vec::clone(&load_balancer_source_ranges),
                options: options.clone(),
                endpoints,
                http_routes: Vec::new(),
                key,
            })
        })
        .collect();
    entries.sort_by(|a, b| a.key.cmp(&b.key));
    entries.dedup_by(|a, b| a.key == b.key);
    entries
}

/// Cases 2, 3, 7, 8, 9, 10: the endpoints of one service port, from every slice of the Service.
fn merge_endpoints(key: &PortKey, slices: &Slices, pods: &Pods) -> Vec<EndpointEntry> {
    let mut by_addr: BTreeMap<(IpAddr, u16), EndpointEntry> = BTreeMap::new();
    for slice in slices.values() {
        let family_v6 = match slice.address_type.as_str() {
            "IPv4" => false,
            "IPv6" => true,
            _ => continue, // FQDN and anything unknown: ignored (case 9b)
        };
        // The slice port that carries this service port: same name and protocol (case 3: the
        // number may differ per slice). A nil name or port is ignored (case 9d).
        let Some(port) = slice.ports.iter().flatten().find_map(|p| {
            let name = p.name.as_deref()?;
            let proto = Protocol::parse(p.protocol.as_deref())?;
            let num = u16::try_from(p.port?).ok().filter(|n| *n != 0)?;
            (name == key.port_name && proto == key.protocol).then_some(num)
        }) else {
            continue;
        };
        let slice_ns = slice
            .metadata
            .namespace
            .as_deref()
            .unwrap_or(&key.namespace);
        for ep in &slice.endpoints {
            // Only addresses[0] has defined semantics (case 9c).
            let Some(address) = ep.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else {
                continue;
            };
            if address.is_ipv6() != family_v6 {
                continue;
            }
            let cond = ep.conditions.as_ref();
            // Case 10: nil ready → ready; nil serving → serving (kube-proxy's reading, not
            // the API doc's "defer to ready"); nil terminating → not terminating.
            let ready = cond.and_then(|c| c.ready).unwrap_or(true);
            let serving = cond.and_then(|c| c.serving).unwrap_or(true);
            let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
            let hints = ep.hints.as_ref();
            let workload = ep
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| {
                    let name = r.name.clone()?;
                    let namespace = r.namespace.clone().unwrap_or_else(|| slice_ns.to_string());
                    let info = pods.get(&(namespace.clone(), name.clone()));
                    Some(WorkloadEntry {
                        service_account: info.and_then(|i| i.service_account.clone()),
                        meshed: info.is_some_and(|i| i.meshed),
                        labels: info.map(|i| i.labels.clone()).unwrap_or_default(),
                        name,
                        namespace,
                    })
                });
            let entry = EndpointEntry {
                address,
                port,
                ready,
                serving,
                terminating,
                node_name: ep.node_name.clone(),
                zone: ep.zone.clone(),
                hint_zones: hints
                    .and_then(|h| h.for_zones.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|z| z.name.clone())
                    .collect(),
                hint_nodes: hints
                    .and_then(|h| h.for_nodes.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|n| n.name.clone())
                    .collect(),
                workload,
            };
            // Case 8: one entry per address:port; the non-terminating copy wins.
            match by_addr.get(&(address, port)) {
                Some(existing) if !existing.terminating || entry.terminating => {}
                _ => {
                    by_addr.insert((address, port), entry);
                }
            }
        }
    }
    by_addr.into_values().collect()
}

/// The Service an EndpointSlice belongs to, if it says (case 9a: no label → ignored).
pub fn slice_service(slice: &EndpointSlice) -> Option<&str> {
    slice
        .metadata
        .labels
        .as_ref()?
        .get(SERVICE_NAME_LABEL)
        .map(String::as_str)
        .filter(|s| !s.is_empty())
}

/// The Pods an entry's endpoints point at.
pub fn referenced_pods(
    entries: &[ServicePortEntry],
) -> impl Iterator<Item = (String, String)> + '_ {
    entries.iter().flat_map(|e| {
        e.endpoints
            .iter()
            .filter_map(|ep| ep.workload.as_ref())
            .map(|w| (w.namespace.clone(), w.name.clone()))
    })
}
