//! Addresses: pod IPs from 10.244.0.0/16 and ClusterIPs from 10.96.0.0/12.
//!
//! Pod IPs are handed out in order and not reused right away (a new pod does not inherit a
//! just-removed pod's address while proxies may still hold it); a pod may ask for a fixed one
//! with the annotation [`POD_IP_ANNOTATION`]. ClusterIPs are what the API server would do: the
//! Service's own if it sets one, else a free address derived from its name, kept for as long as
//! the Service exists.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::Hasher;
use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::core::v1::Service;

use crate::config::{NODE_IP, POD_NETWORK, POD_PREFIX_LEN};
use crate::manifests::NsName;
use crate::workloads::Fnv;

/// Pins a pod's IP (local mesh only), e.g. for a selector-less Service's EndpointSlice.
pub const POD_IP_ANNOTATION: &str = "local.wasmesh.io/pod-ip";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error("no free pod address left in 10.244.0.0/16")]
    PodNetworkFull,
    #[error(
        "annotation {POD_IP_ANNOTATION}: {0:?} is not an address in 10.244.0.0/16 other than the network, broadcast and node (10.244.0.1) addresses"
    )]
    BadPinnedIp(String),
    #[error("annotation {POD_IP_ANNOTATION}: {0} is already used by another pod")]
    PinnedIpTaken(Ipv4Addr),
}

/// Pod addresses in use.
#[derive(Debug)]
pub struct PodIps {
    used: BTreeSet<Ipv4Addr>,
    /// Offset of the next address to try.
    next: u32,
}

impl Default for PodIps {
    fn default() -> Self {
        Self::new()
    }
}

impl PodIps {
    const FIRST: u32 = 2;

    pub fn new() -> Self {
        Self {
            used: BTreeSet::new(),
            next: Self::FIRST,
        }
    }

    fn size() -> u32 {
        1 << (32 - u32::from(POD_PREFIX_LEN))
    }

    fn usable(ip: Ipv4Addr) -> bool {
        let base = u32::from(POD_NETWORK);
        let n = u32::from(ip);
        n > base && n < base + Self::size() - 1 && ip != NODE_IP && n >> 16 == base >> 16
    }

    /// A free address, or the pinned one (`pinned` is the annotation's value).
    pub fn allocate(&mut self, pinned: Option<&str>) -> Result<Ipv4Addr, IpamError> {
        if let Some(p) = pinned {
            let ip: Ipv4Addr = p
                .trim()
                .parse()
                .map_err(|_| IpamError::BadPinnedIp(p.to_string()))?;
            if !Self::usable(ip) {
                return Err(IpamError::BadPinnedIp(p.to_string()));
            }
            if !self.used.insert(ip) {
                return Err(IpamError::PinnedIpTaken(ip));
            }
            return Ok(ip);
        }
        let base = u32::from(POD_NETWORK);
        for _ in 0..Self::size() {
            let offset = self.next;
            self.next += 1;
            if self.next >= Self::size() - 1 {
                self.next = Self::FIRST;
            }
            let ip = Ipv4Addr::from(base + offset);
            if Self::usable(ip) && self.used.insert(ip) {
                return Ok(ip);
            }
        }
        Err(IpamError::PodNetworkFull)
    }

    pub fn release(&mut self, ip: Ipv4Addr) {
        self.used.remove(&ip);
    }
}

/// ClusterIPs of the Services that exist.
#[derive(Debug, Default)]
pub struct ServiceIps {
    assigned: BTreeMap<NsName, IpAddr>,
}

/// 10.96.0.0/12: the network, and how many addresses.
const SERVICE_NET: (u32, u32) = (0x0a60_0000, 1 << 20);

impl ServiceIps {
    /// Fills in `spec.clusterIP`/`clusterIPs` of every Service that leaves them empty.
    pub fn assign(&mut self, services: &mut BTreeMap<NsName, Service>) {
        self.assigned.retain(|k, _| services.contains_key(k));
        let mut used: BTreeSet<IpAddr> = BTreeSet::new();
        let mut needs = Vec::new();
        for (key, svc) in services.iter() {
            let spec = svc.spec.as_ref();
            if spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName") {
                continue;
            }
            match spec.and_then(|s| s.cluster_ip.as_deref()) {
                Some("None") => {}
                Some(ip) if !ip.is_empty() => {
                    if let Ok(ip) = ip.parse() {
                        used.insert(ip);
                    }
                }
                _ => needs.push(key.clone()),
            }
        }
        // Keep what was given before, then allocate the rest.
        for key in &needs {
            if let Some(ip) = self.assigned.get(key)
                && !used.insert(*ip)
            {
                self.assigned.remove(key);
            }
        }
        for key in needs {
            let ip = match self.assigned.get(&key) {
                Some(ip) => *ip,
                None => {
                    let Some(ip) = free_service_ip(&key, &used) else {
                        tracing::warn!(service = %key, "the service range 10.96.0.0/12 is full; the Service gets no ClusterIP");
                        continue;
                    };
                    used.insert(ip);
                    self.assigned.insert(key.clone(), ip);
                    ip
                }
            };
            if let Some(spec) = services.get_mut(&key).and_then(|s| s.spec.as_mut()) {
                spec.cluster_ip = Some(ip.to_string());
                spec.cluster_ips = Some(vec![ip.to_string()]);
            }
        }
    }
}

fn free_service_ip(key: &NsName, used: &BTreeSet<IpAddr>) -> Option<IpAddr> {
    let (net, size) = SERVICE_NET;
    // Skip the network address and .1 (the `kubernetes` Service's in a real cluster).
    let span = size - 3;
    let mut h = Fnv::default();
    h.write(key.namespace.as_bytes());
    h.write(&[0]);
    h.write(key.name.as_bytes());
    let start = (h.finish() % u64::from(span)) as u32;
    (0..span).find_map(|i| {
        let ip = IpAddr::V4(Ipv4Addr::from(net + 2 + (start + i) % span));
        (!used.contains(&ip)).then_some(ip)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ServiceSpec;

    #[test]
    fn pod_ips_are_handed_out_in_order_and_pinned_ones_are_respected() {
        let mut ips = PodIps::new();
        assert_eq!(ips.allocate(None), Ok(Ipv4Addr::new(10, 244, 0, 2)));
        assert_eq!(
            ips.allocate(Some("10.244.0.3")),
            Ok(Ipv4Addr::new(10, 244, 0, 3))
        );
        assert_eq!(ips.allocate(None), Ok(Ipv4Addr::new(10, 244, 0, 4)));
        ips.release(Ipv4Addr::new(10, 244, 0, 2));
        // Not reused right away.
        assert_eq!(ips.allocate(None), Ok(Ipv4Addr::new(10, 244, 0, 5)));
        assert_eq!(
            ips.allocate(Some("10.244.0.3")),
            Err(IpamError::PinnedIpTaken(Ipv4Addr::new(10, 244, 0, 3)))
        );
        for bad in ["10.244.0.1", "10.245.0.9", "10.244.255.255", "x"] {
            assert!(
                matches!(ips.allocate(Some(bad)), Err(IpamError::BadPinnedIp(_))),
                "{bad}"
            );
        }
    }

    fn svc(ip: Option<&str>) -> Service {
        Service {
            spec: Some(ServiceSpec {
                cluster_ip: ip.map(str::to_string),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn ip_of(services: &BTreeMap<NsName, Service>, name: &str) -> Option<String> {
        services
            .get(&NsName::new("d", name))
            .and_then(|s| s.spec.as_ref())
            .and_then(|s| s.cluster_ip.clone())
    }

    #[test]
    fn cluster_ips_are_allocated_once_and_kept() {
        let mut ips = ServiceIps::default();
        let mut services = BTreeMap::from([
            (NsName::new("d", "a"), svc(None)),
            (NsName::new("d", "b"), svc(Some("10.96.0.10"))),
            (NsName::new("d", "h"), svc(Some("None"))),
        ]);
        ips.assign(&mut services);
        let a = ip_of(&services, "a").expect("allocated");
        let parsed: Ipv4Addr = a.parse().expect("ip");
        assert_eq!(
            u32::from(parsed) >> 20,
            0x0a60_0000 >> 20,
            "{a} in 10.96.0.0/12"
        );
        assert_eq!(ip_of(&services, "b").as_deref(), Some("10.96.0.10"));
        assert_eq!(ip_of(&services, "h").as_deref(), Some("None"));

        // Re-read from the folder (no IP again): the same address.
        services.insert(NsName::new("d", "a"), svc(None));
        services.insert(NsName::new("d", "c"), svc(None));
        ips.assign(&mut services);
        assert_eq!(ip_of(&services, "a"), Some(a));
        assert_ne!(ip_of(&services, "c"), ip_of(&services, "a"));
    }
}
