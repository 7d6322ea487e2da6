//! The EndpointSlice controller: the slices a Service's selector implies, as Kubernetes'
//! `endpointslice-controller.k8s.io` writes them. Pure.
//!
//! - Pods in the Service's namespace whose labels include the selector, that have an IP and
//!   have not finished. Services without a selector (or with an empty one) and ExternalName
//!   Services get no slices: their EndpointSlices are the user's.
//! - Each Service port's `targetPort` is resolved per pod: a number as is, a name through the
//!   pod's container ports (name and protocol); a name the pod lacks leaves that port out for
//!   that pod. Pods are grouped by the resulting port set, one slice per set, so two pods
//!   that give a named port different numbers land in different slices.
//! - Conditions: `serving` is the pod's readiness, `terminating` is set while it shuts down,
//!   `ready` is serving and not terminating (always true with `publishNotReadyAddresses`).
//! - Every endpoint names its node, zone and Pod (targetRef); `hostname` is set when the pod's
//!   `hostname` and `subdomain` (= the Service) are.
//! - A Service that selects nothing gets one empty slice, as in Kubernetes.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{Container, ObjectReference, Service, ServicePort};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::manifests::NsName;
use crate::workloads::hash_of;

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "endpointslice-controller.k8s.io";

/// What the controller needs to know about one pod.
#[derive(Debug, Clone)]
pub struct PodView<'a> {
    pub key: &'a NsName,
    pub uid: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub ip: Ipv4Addr,
    pub node: &'a str,
    pub zone: &'a str,
    /// Readiness (every container port accepts connections; the sidecar has its table).
    pub ready: bool,
    pub terminating: bool,
    pub containers: &'a [Container],
    pub hostname: Option<&'a str>,
    pub subdomain: Option<&'a str>,
}

/// Every slice the Services' selectors imply, keyed by (namespace, slice name).
pub fn endpoint_slices(
    services: &BTreeMap<NsName, Service>,
    pods: &[PodView<'_>],
) -> BTreeMap<NsName, EndpointSlice> {
    let mut out = BTreeMap::new();
    for (key, svc) in services {
        for slice in service_slices(key, svc, pods) {
            let name = slice.metadata.name.clone().unwrap_or_default();
            out.insert(NsName::new(&key.namespace, name), slice);
        }
    }
    out
}

fn service_slices(key: &NsName, svc: &Service, pods: &[PodView<'_>]) -> Vec<EndpointSlice> {
    let Some(spec) = svc.spec.as_ref() else {
        return Vec::new();
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Vec::new();
    }
    let selector = match spec.selector.as_ref() {
        Some(s) if !s.is_empty() => s,
        _ => return Vec::new(),
    };
    let publish_not_ready = spec.publish_not_ready_addresses == Some(true);
    let svc_ports = spec.ports.as_deref().unwrap_or_default();

    // Port set → endpoints.
    let mut groups: BTreeMap<Vec<PortKey>, Vec<Endpoint>> = BTreeMap::new();
    let mut selected: Vec<&PodView<'_>> = pods
        .iter()
        .filter(|p| p.key.namespace == key.namespace)
        .filter(|p| selector.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
        .collect();
    selected.sort_by(|a, b| a.key.name.cmp(&b.key.name));
    for pod in selected {
        let ports: Vec<PortKey> = svc_ports
            .iter()
            .filter_map(|sp| resolve(sp, pod.containers))
            .collect();
        let ready = publish_not_ready || (pod.ready && !pod.terminating);
        let hostname = match (pod.hostname, pod.subdomain) {
            (Some(h), Some(s)) if s == key.name => Some(h.to_string()),
            _ => None,
        };
        groups.entry(ports).or_default().push(Endpoint {
            addresses: vec![pod.ip.to_string()],
            conditions: Some(EndpointConditions {
                ready: Some(ready),
                serving: Some(pod.ready),
                terminating: Some(pod.terminating),
            }),
            hostname,
            node_name: Some(pod.node.to_string()),
            zone: Some(pod.zone.to_string()),
            target_ref: Some(ObjectReference {
                kind: Some("Pod".into()),
                namespace: Some(pod.key.namespace.clone()),
                name: Some(pod.key.name.clone()),
                uid: Some(pod.uid.to_string()),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    if groups.is_empty() {
        groups.insert(Vec::new(), Vec::new());
    }
    groups
        .into_iter()
        .map(|(ports, endpoints)| {
            let name = format!("{}-{}", key.name, &hash_of(&ports)[..5]);
            EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(name),
                    namespace: Some(key.namespace.clone()),
                    labels: Some(BTreeMap::from([
                        (SERVICE_NAME_LABEL.to_string(), key.name.clone()),
                        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
                    ])),
                    ..Default::default()
                },
                address_type: "IPv4".into(),
                // Kubernetes leaves `ports` unset on a Service's placeholder slice.
                ports: (!(ports.is_empty() && endpoints.is_empty()))
                    .then(|| ports.iter().map(PortKey::to_port).collect()),
                endpoints,
            }
        })
        .collect()
}

/// One resolved port of an endpoint: the Service port's name, the number, the protocol.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
struct PortKey {
    name: String,
    port: i32,
    protocol: String,
    app_protocol: Option<String>,
}

impl PortKey {
    fn to_port(&self) -> EndpointPort {
        EndpointPort {
            name: Some(self.name.clone()),
            port: Some(self.port),
            protocol: Some(self.protocol.clone()),
            app_protocol: self.app_protocol.clone(),
        }
    }
}

/// The number a pod serves a Service port on; `None` when a named target port is not one of
/// the pod's container ports (of the same protocol).
fn resolve(sp: &ServicePort, containers: &[Container]) -> Option<PortKey> {
    let protocol = sp.protocol.clone().unwrap_or_else(|| "TCP".into());
    let port = match sp.target_port.as_ref() {
        None => sp.port,
        Some(IntOrString::Int(n)) => *n,
        Some(IntOrString::String(name)) => {
            containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| {
                    p.name.as_deref() == Some(name.as_str())
                        && p.protocol.as_deref().unwrap_or("TCP") == protocol
                })?
                .container_port
        }
    };
    Some(PortKey {
        name: sp.name.clone().unwrap_or_default(),
        port,
        protocol,
        app_protocol: sp.app_protocol.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerPort, ServiceSpec};

    fn service(selector: &[(&str, &str)], ports: Vec<ServicePort>) -> Service {
        Service {
            spec: Some(ServiceSpec {
                selector: Some(
                    selector
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ports: Some(ports),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn port(name: &str, port: i32, target: IntOrString) -> ServicePort {
        ServicePort {
            name: Some(name.into()),
            port,
            target_port: Some(target),
            protocol: Some("TCP".into()),
            ..Default::default()
        }
    }

    fn container(ports: &[(&str, i32)]) -> Container {
        Container {
            name: "c".into(),
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p)| ContainerPort {
                        name: Some(n.to_string()),
                        container_port: *p,
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }
    }

    struct Fixture {
        keys: Vec<NsName>,
        labels: BTreeMap<String, String>,
        containers: Vec<Vec<Container>>,
    }

    impl Fixture {
        fn new(pods: &[(&str, &[(&str, i32)])]) -> Self {
            Self {
                keys: pods.iter().map(|(n, _)| NsName::new("demo", *n)).collect(),
                labels: BTreeMap::from([("app".to_string(), "web".to_string())]),
                containers: pods.iter().map(|(_, p)| vec![container(p)]).collect(),
            }
        }

        fn views(&self) -> Vec<PodView<'_>> {
            self.keys
                .iter()
                .zip(&self.containers)
                .enumerate()
                .map(|(i, (key, containers))| PodView {
                    key,
                    uid: "uid",
                    labels: &self.labels,
                    ip: Ipv4Addr::new(10, 244, 0, 2 + i as u8),
                    node: "local-node",
                    zone: "local-zone",
                    ready: true,
                    terminating: false,
                    containers,
                    hostname: None,
                    subdomain: None,
                })
                .collect()
        }
    }

    fn slices_of(svc: Service, pods: &[PodView<'_>]) -> Vec<EndpointSlice> {
        let services = BTreeMap::from([(NsName::new("demo", "web"), svc)]);
        endpoint_slices(&services, pods).into_values().collect()
    }

    #[test]
    fn a_named_target_port_with_two_numbers_makes_two_slices() {
        let f = Fixture::new(&[
            ("a", &[("http", 8080)]),
            ("b", &[("http", 9090)]),
            ("c", &[("http", 8080)]),
        ]);
        let svc = service(
            &[("app", "web")],
            vec![port("http", 80, IntOrString::String("http".into()))],
        );
        let slices = slices_of(svc, &f.views());
        assert_eq!(slices.len(), 2);
        let mut seen = BTreeMap::new();
        for s in &slices {
            let labels = s.metadata.labels.as_ref().expect("labels");
            assert_eq!(
                labels.get(SERVICE_NAME_LABEL).map(String::as_str),
                Some("web")
            );
            assert_eq!(
                labels.get(MANAGED_BY_LABEL).map(String::as_str),
                Some(MANAGED_BY)
            );
            let ports = s.ports.as_ref().expect("ports");
            assert_eq!(ports.len(), 1);
            assert_eq!(ports[0].name.as_deref(), Some("http"));
            let pods: Vec<_> = s
                .endpoints
                .iter()
                .map(|e| {
                    e.target_ref
                        .as_ref()
                        .and_then(|r| r.name.clone())
                        .unwrap_or_default()
                })
                .collect();
            seen.insert(ports[0].port, pods);
        }
        assert_eq!(
            seen.get(&Some(8080)),
            Some(&vec!["a".to_string(), "c".to_string()])
        );
        assert_eq!(seen.get(&Some(9090)), Some(&vec!["b".to_string()]));
    }

    #[test]
    fn conditions_follow_readiness_and_termination() {
        let f = Fixture::new(&[("a", &[]), ("b", &[]), ("c", &[])]);
        let mut views = f.views();
        views[1].ready = false;
        views[2].terminating = true;
        let svc = service(
            &[("app", "web")],
            vec![port("", 80, IntOrString::Int(8080))],
        );
        let slices = slices_of(svc.clone(), &views);
        assert_eq!(slices.len(), 1);
        let cond: Vec<_> = slices[0]
            .endpoints
            .iter()
            .map(|e| {
                let c = e.conditions.as_ref().expect("conditions");
                (c.ready, c.serving, c.terminating)
            })
            .collect();
        assert_eq!(
            cond,
            vec![
                (Some(true), Some(true), Some(false)),
                (Some(false), Some(false), Some(false)),
                (Some(false), Some(true), Some(true)),
            ]
        );
        let e = &slices[0].endpoints[0];
        assert_eq!(e.node_name.as_deref(), Some("local-node"));
        assert_eq!(e.zone.as_deref(), Some("local-zone"));
        assert_eq!(e.addresses, vec!["10.244.0.2".to_string()]);
        assert_eq!(slices[0].ports.as_ref().expect("ports")[0].port, Some(8080));

        let mut pna = svc;
        if let Some(s) = pna.spec.as_mut() {
            s.publish_not_ready_addresses = Some(true);
        }
        let slices = slices_of(pna, &views);
        assert!(
            slices[0]
                .endpoints
                .iter()
                .all(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        );
    }

    #[test]
    fn selection_by_labels_and_namespace_only() {
        let f = Fixture::new(&[("a", &[])]);
        let other_labels = BTreeMap::from([("app".to_string(), "db".to_string())]);
        let other_ns = NsName::new("elsewhere", "z");
        let mut views = f.views();
        let mut wrong_labels = views[0].clone();
        wrong_labels.labels = &other_labels;
        let mut wrong_ns = views[0].clone();
        wrong_ns.key = &other_ns;
        views.push(wrong_labels);
        views.push(wrong_ns);
        let svc = service(&[("app", "web")], vec![port("", 80, IntOrString::Int(80))]);
        let slices = slices_of(svc, &views);
        assert_eq!(slices.len(), 1);
        assert_eq!(slices[0].endpoints.len(), 1);
    }

    #[test]
    fn no_selector_no_slices_and_selecting_nothing_gives_an_empty_slice() {
        let f = Fixture::new(&[("a", &[])]);
        let mut no_selector = service(&[], vec![port("", 80, IntOrString::Int(80))]);
        assert!(slices_of(no_selector.clone(), &f.views()).is_empty());
        if let Some(s) = no_selector.spec.as_mut() {
            s.selector = None;
        }
        assert!(slices_of(no_selector, &f.views()).is_empty());
        let nothing = service(&[("app", "none")], vec![port("", 80, IntOrString::Int(80))]);
        let slices = slices_of(nothing, &f.views());
        assert_eq!(slices.len(), 1);
        assert!(slices[0].endpoints.is_empty());
        assert!(slices[0].ports.is_none());
    }

    #[test]
    fn a_port_name_the_pod_lacks_is_left_out_for_that_pod() {
        let f = Fixture::new(&[
            ("a", &[("http", 8080), ("admin", 9000)]),
            ("b", &[("http", 8080)]),
        ]);
        let svc = service(
            &[("app", "web")],
            vec![
                port("http", 80, IntOrString::String("http".into())),
                port("admin", 90, IntOrString::String("admin".into())),
            ],
        );
        let slices = slices_of(svc, &f.views());
        let mut shapes: Vec<_> = slices
            .iter()
            .map(|s| {
                (
                    s.ports.as_ref().map(Vec::len).unwrap_or(0),
                    s.endpoints.len(),
                )
            })
            .collect();
        shapes.sort();
        assert_eq!(shapes, vec![(1, 1), (2, 1)]);
    }
}
