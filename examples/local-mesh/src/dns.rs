//! Service names inside pods, without a DNS server: every pod's `/etc/hosts`.
//!
//! `ip netns exec <pod>` bind-mounts `/etc/netns/<pod>/hosts` over `/etc/hosts` (and
//! `resolv.conf` likewise) for everything the pod runs. The file lists, for every Service:
//! `<svc>.<ns>.svc.cluster.local`, `<svc>.<ns>.svc`, `<svc>.<ns>`, and the short `<svc>` for the
//! pod's own namespace — the names a search path `<ns>.svc.cluster.local svc.cluster.local
//! cluster.local` would complete — pointing at:
//! - the ClusterIP for a normal Service;
//! - the ready endpoints' pod IPs for a headless one (all of them with
//!   `publishNotReadyAddresses`);
//! - for an ExternalName Service, whatever its target resolves to here (another Service's
//!   name, or an IP address); an outside name does not resolve (nothing leaves the mesh).
//!
//! The file is rewritten in place (same inode) so the bind mounts see every change, and never
//! shortened (a shorter version is padded with a comment), so a lookup at that moment never
//! reads an empty or cut file ([`write_in_place`]).
//! `resolv.conf` points at 127.0.0.1, where nothing answers, so an unknown name fails at once.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::controller::SERVICE_NAME_LABEL;
use crate::manifests::NsName;

pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// The addresses one Service's names stand for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAddrs {
    pub key: NsName,
    pub addrs: Vec<IpAddr>,
}

/// What every Service's names resolve to, from the Services (with their ClusterIPs) and every
/// EndpointSlice (derived and the user's).
pub fn service_addresses<'a>(
    services: &BTreeMap<NsName, Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> Vec<ServiceAddrs> {
    let mut endpoints: BTreeMap<NsName, Vec<(IpAddr, bool)>> = BTreeMap::new();
    for s in slices {
        let Some(svc) = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        let key = NsName::new(s.metadata.namespace.clone().unwrap_or_default(), svc);
        for e in &s.endpoints {
            let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            for a in &e.addresses {
                if let Ok(ip) = a.parse() {
                    endpoints.entry(key.clone()).or_default().push((ip, ready));
                }
            }
        }
    }
    let mut direct: BTreeMap<NsName, Vec<IpAddr>> = BTreeMap::new();
    for (key, svc) in services {
        let Some(spec) = svc.spec.as_ref() else {
            continue;
        };
        let addrs = match spec.cluster_ip.as_deref() {
            _ if spec.type_.as_deref() == Some("ExternalName") => continue,
            Some("None") => {
                let all = spec.publish_not_ready_addresses == Some(true);
                let mut v: Vec<IpAddr> = endpoints
                    .get(key)
                    .into_iter()
                    .flatten()
                    .filter(|(_, ready)| all || *ready)
                    .map(|(ip, _)| *ip)
                    .collect();
                v.sort();
                v.dedup();
                v
            }
            _ => spec
                .cluster_ips
                .iter()
                .flatten()
                .chain(spec.cluster_ip.iter())
                .filter_map(|ip| ip.parse().ok())
                .take(1)
                .collect(),
        };
        direct.insert(key.clone(), addrs);
    }
    let mut out: Vec<ServiceAddrs> = Vec::new();
    for (key, svc) in services {
        let spec = svc.spec.as_ref();
        let addrs = if spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName") {
            let target = spec
                .and_then(|s| s.external_name.as_deref())
                .unwrap_or("")
                .trim_end_matches('.');
            match target.parse::<IpAddr>() {
                Ok(ip) => vec![ip],
                Err(_) => service_of_name(target)
                    .and_then(|k| direct.get(&k).cloned())
                    .unwrap_or_default(),
            }
        } else {
            direct.get(key).cloned().unwrap_or_default()
        };
        if !addrs.is_empty() {
            out.push(ServiceAddrs {
                key: key.clone(),
                addrs,
            });
        }
    }
    out
}

/// `svc.ns`, `svc.ns.svc` or `svc.ns.svc.cluster.local` → the Service it names.
fn service_of_name(name: &str) -> Option<NsName> {
    let name = name
        .strip_suffix(&format!(".svc.{CLUSTER_DOMAIN}"))
        .or_else(|| name.strip_suffix(".svc"))
        .unwrap_or(name);
    let (svc, ns) = name.split_once('.')?;
    (!ns.contains('.')).then(|| NsName::new(ns, svc))
}

/// One pod's `/etc/hosts`.
pub fn render_hosts(pod: &NsName, pod_ip: Ipv4Addr, services: &[ServiceAddrs]) -> String {
    let mut out = String::from(
        "# Written by wasmesh-local: the Services of the local mesh.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    );
    let _ = writeln!(out, "{pod_ip}\t{}", pod.name);
    for s in services {
        let (svc, ns) = (&s.key.name, &s.key.namespace);
        let mut names = format!("{svc}.{ns}.svc.{CLUSTER_DOMAIN} {svc}.{ns}.svc {svc}.{ns}");
        if *ns == pod.namespace {
            let _ = write!(names, " {svc}");
        }
        for ip in &s.addrs {
            let _ = writeln!(out, "{ip}\t{names}");
        }
    }
    out
}

/// One pod's `/etc/resolv.conf`.
pub fn render_resolv_conf(namespace: &str) -> String {
    format!(
        "# Written by wasmesh-local: names resolve through /etc/hosts; nothing answers DNS here.\nnameserver 127.0.0.1\nsearch {namespace}.svc.{CLUSTER_DOMAIN} svc.{CLUSTER_DOMAIN} {CLUSTER_DOMAIN}\noptions ndots:5 timeout:1 attempts:1\n"
    )
}

/// Overwrites `path` from its start without truncating it first: content shorter than the file
/// is padded with a comment line to the old length.
pub fn write_in_place(path: &std::path::Path, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    let old = std::fs::metadata(path)
        .map(|m| m.len() as usize)
        .unwrap_or(0);
    let mut text = content.to_string();
    if text.len() < old {
        let pad = old - text.len();
        if pad == 1 {
            text.push('\n');
        } else {
            text.push('#');
            text.push_str(&" ".repeat(pad - 2));
            text.push('\n');
        }
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    f.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ServiceSpec;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn svc(ip: Option<&str>, external: Option<&str>) -> Service {
        Service {
            spec: Some(ServiceSpec {
                cluster_ip: ip.map(str::to_string),
                type_: Some(
                    if external.is_some() {
                        "ExternalName"
                    } else {
                        "ClusterIP"
                    }
                    .into(),
                ),
                external_name: external.map(str::to_string),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn slice(ns: &str, svc: &str, eps: &[(&str, bool)]) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                labels: Some(BTreeMap::from([(
                    SERVICE_NAME_LABEL.to_string(),
                    svc.to_string(),
                )])),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: eps
                .iter()
                .map(|(a, ready)| Endpoint {
                    addresses: vec![a.to_string()],
                    conditions: Some(EndpointConditions {
                        ready: Some(*ready),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
            ports: None,
        }
    }

    #[test]
    fn names_for_cluster_ip_headless_and_external_name_services() {
        let services = BTreeMap::from([
            (
                NsName::new("demo", "backend"),
                svc(Some("10.96.0.10"), None),
            ),
            (NsName::new("demo", "db"), svc(Some("None"), None)),
            (
                NsName::new("demo", "alias"),
                svc(None, Some("backend.demo.svc.cluster.local")),
            ),
            (
                NsName::new("demo", "outside"),
                svc(None, Some("search.example.com")),
            ),
            (NsName::new("other", "web"), svc(Some("10.96.0.20"), None)),
        ]);
        let slices = [slice(
            "demo",
            "db",
            &[("10.244.0.7", true), ("10.244.0.8", false)],
        )];
        let addrs = service_addresses(&services, &slices);
        let hosts = render_hosts(
            &NsName::new("demo", "client"),
            Ipv4Addr::new(10, 244, 0, 3),
            &addrs,
        );
        let expected = "\
# Written by wasmesh-local: the Services of the local mesh.
127.0.0.1\tlocalhost
::1\tlocalhost ip6-localhost ip6-loopback
10.244.0.3\tclient
10.96.0.10\talias.demo.svc.cluster.local alias.demo.svc alias.demo alias
10.96.0.10\tbackend.demo.svc.cluster.local backend.demo.svc backend.demo backend
10.244.0.7\tdb.demo.svc.cluster.local db.demo.svc db.demo db
10.96.0.20\tweb.other.svc.cluster.local web.other.svc web.other
";
        assert_eq!(hosts, expected);
    }

    #[test]
    fn rewriting_never_shortens_the_file() {
        let tmp = tempfile::tempdir().expect("tmp");
        let p = tmp.path().join("hosts");
        write_in_place(&p, "1.2.3.4 a\n5.6.7.8 b\n").expect("write");
        let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&p).expect("meta"));
        write_in_place(&p, "1.2.3.4 a\n").expect("write");
        let text = std::fs::read_to_string(&p).expect("read");
        assert_eq!(text.len(), 20);
        assert!(text.starts_with("1.2.3.4 a\n#"), "{text:?}");
        assert!(text.ends_with('\n'));
        write_in_place(&p, "1.2.3.4 a\n5.6.7.8 b\n9.9.9.9 c\n").expect("write");
        assert_eq!(
            std::fs::read_to_string(&p).expect("read"),
            "1.2.3.4 a\n5.6.7.8 b\n9.9.9.9 c\n"
        );
        assert_eq!(
            std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&p).expect("meta")),
            ino
        );
    }

    #[test]
    fn resolv_conf_has_the_search_path() {
        let r = render_resolv_conf("demo");
        assert!(r.contains("search demo.svc.cluster.local svc.cluster.local cluster.local"));
        assert!(r.contains("nameserver 127.0.0.1"));
    }

    #[test]
    fn service_names() {
        assert_eq!(service_of_name("a.b"), Some(NsName::new("b", "a")));
        assert_eq!(service_of_name("a.b.svc"), Some(NsName::new("b", "a")));
        assert_eq!(
            service_of_name("a.b.svc.cluster.local"),
            Some(NsName::new("b", "a"))
        );
        assert_eq!(service_of_name("search.example.com"), None);
        assert_eq!(service_of_name("a"), None);
    }
}
