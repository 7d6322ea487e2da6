//! sessionAffinity ClientIP: a client IP sticks to the endpoint it last reached through a
//! Service port until `timeoutSeconds` pass without a new connection (each new connection
//! refreshes the deadline, traffic on open connections does not), or until that endpoint is no
//! longer usable. Keyed by Service port and client IP only, whichever VIP was dialled — as
//! kube-proxy keys its `recent` lists.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use wasmesh_api::table::PortId;

#[derive(Debug, Default)]
pub struct Affinity {
    sticky: Mutex<HashMap<(PortId, IpAddr), (SocketAddr, Instant)>>,
}

impl Affinity {
    /// The endpoint this client is stuck to, if the stickiness has not expired and `usable`
    /// still allows it.
    pub fn lookup(
        &self,
        port: &PortId,
        client: IpAddr,
        timeout: Duration,
        usable: impl Fn(SocketAddr) -> bool,
    ) -> Option<SocketAddr> {
        let map = self.sticky.lock().unwrap_or_else(|e| e.into_inner());
        let (ep, last) = map.get(&(port.clone(), client))?;
        (last.elapsed() < timeout && usable(*ep)).then_some(*ep)
    }

    /// Records (or refreshes) the client's endpoint after a new connection.
    pub fn record(&self, port: &PortId, client: IpAddr, endpoint: SocketAddr, timeout: Duration) {
        let mut map = self.sticky.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if map.len() > 4096 {
            map.retain(|_, (_, last)| now.duration_since(*last) < timeout);
        }
        map.insert((port.clone(), client), (endpoint, now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> PortId {
        ("default".into(), "web".into(), "http".into(), 1)
    }

    #[tokio::test(start_paused = true)]
    async fn sticks_until_the_timeout_passes_without_a_new_connection() {
        let a = Affinity::default();
        let client: IpAddr = "10.244.0.9".parse().expect("ip");
        let ep: SocketAddr = "10.244.0.5:8080".parse().expect("addr");
        let t = Duration::from_secs(10);
        assert_eq!(a.lookup(&id(), client, t, |_| true), None);
        a.record(&id(), client, ep, t);
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(8)).await;
            assert_eq!(
                a.lookup(&id(), client, t, |_| true),
                Some(ep),
                "refreshed by each connection"
            );
            a.record(&id(), client, ep, t);
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(a.lookup(&id(), client, t, |_| true), None, "expired");
    }

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_that_left_is_not_returned_and_other_clients_and_ports_are_separate() {
        let a = Affinity::default();
        let c1: IpAddr = "10.244.0.9".parse().expect("ip");
        let c2: IpAddr = "10.244.0.10".parse().expect("ip");
        let ep: SocketAddr = "10.244.0.5:8080".parse().expect("addr");
        let t = Duration::from_secs(10);
        a.record(&id(), c1, ep, t);
        assert_eq!(a.lookup(&id(), c1, t, |e| e != ep), None);
        assert_eq!(a.lookup(&id(), c2, t, |_| true), None);
        let other: PortId = ("default".into(), "web".into(), "https".into(), 1);
        assert_eq!(a.lookup(&other, c1, t, |_| true), None);
    }
}
