//! Choosing an endpoint for a new connection.
//!
//! - `random`: uniform, what kube-proxy's iptables and nftables modes do;
//! - `round-robin`;
//! - `least-conn`: fewest open connections (from this proxy);
//! - `p2c` (the default): power of two choices — two random candidates, the one with fewer open
//!   connections wins. Nearly as good as least-conn at spreading load, without its herd
//!   behaviour when many proxies see the same counts.
//!
//! Every balancer skips endpoints that failed a connect in the last few seconds (passive
//! outlier detection) unless all of them did.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use rand::Rng;
use serde::Serialize;

/// How long an endpoint that refused or timed out a connect is avoided.
pub const FAILURE_MEMORY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BalancerKind {
    Random,
    RoundRobin,
    LeastConn,
    #[default]
    P2c,
}

impl std::str::FromStr for BalancerKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "random" => Ok(BalancerKind::Random),
            "round-robin" => Ok(BalancerKind::RoundRobin),
            "least-conn" => Ok(BalancerKind::LeastConn),
            "p2c" => Ok(BalancerKind::P2c),
            _ => Err(format!(
                "unknown balancer {s:?}: use random, round-robin, least-conn or p2c"
            )),
        }
    }
}

/// What this proxy knows about one endpoint's load, shared by every Service port that lists it
/// and kept across table updates.
#[derive(Debug, Default)]
pub struct EndpointLoad {
    active: AtomicUsize,
    /// Milliseconds (on [`clock`]) until which the endpoint is avoided.
    failed_until: AtomicU64,
    /// Connections made, for `/config` and tests.
    pub picked: AtomicU64,
}

fn clock() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

impl EndpointLoad {
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Counts an open connection until the guard drops.
    pub fn open(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.picked.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self.clone())
    }

    pub fn record_failure(&self) {
        self.failed_until.store(
            clock() + FAILURE_MEMORY.as_millis() as u64,
            Ordering::Relaxed,
        );
    }

    pub fn record_success(&self) {
        self.failed_until.store(0, Ordering::Relaxed);
    }

    pub fn recently_failed(&self) -> bool {
        self.failed_until.load(Ordering::Relaxed) > clock()
    }
}

/// Decrements the endpoint's open-connection count when the connection ends.
#[derive(Debug)]
pub struct ActiveGuard(Arc<EndpointLoad>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One [`EndpointLoad`] per endpoint address.
#[derive(Debug, Default)]
pub struct Loads(HashMap<SocketAddr, Arc<EndpointLoad>>);

impl Loads {
    pub fn get(&mut self, addr: SocketAddr) -> Arc<EndpointLoad> {
        self.0.entry(addr).or_default().clone()
    }

    /// Forgets endpoints no Service port lists any more.
    pub fn collect_garbage(&mut self) {
        self.0.retain(|_, l| Arc::strong_count(l) > 1);
    }
}

/// Picks one of `candidates` (indices into `loads`), never one in `tried`.
pub fn pick(
    kind: BalancerKind,
    candidates: &[usize],
    loads: &dyn Fn(usize) -> Arc<EndpointLoad>,
    tried: &[usize],
    rr: &AtomicUsize,
) -> Option<usize> {
    let fresh: Vec<usize> = candidates
        .iter()
        .copied()
        .filter(|i| !tried.contains(i))
        .collect();
    // Prefer endpoints that have not failed lately; if all have, try them anyway.
    let healthy: Vec<usize> = fresh
        .iter()
        .copied()
        .filter(|i| !loads(*i).recently_failed())
        .collect();
    let pool = if healthy.is_empty() { fresh } else { healthy };
    if pool.is_empty() {
        return None;
    }
    let mut rng = rand::rng();
    Some(match kind {
        BalancerKind::Random => pool[rng.random_range(0..pool.len())],
        BalancerKind::RoundRobin => pool[rr.fetch_add(1, Ordering::Relaxed) % pool.len()],
        BalancerKind::LeastConn => {
            let min = pool.iter().map(|i| loads(*i).active()).min().unwrap_or(0);
            let least: Vec<usize> = pool
                .iter()
                .copied()
                .filter(|i| loads(*i).active() == min)
                .collect();
            least[rng.random_range(0..least.len())]
        }
        BalancerKind::P2c => {
            if pool.len() == 1 {
                pool[0]
            } else {
                let a = rng.random_range(0..pool.len());
                let mut b = rng.random_range(0..pool.len() - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (pool[a], pool[b]);
                if loads(b).active() < loads(a).active() {
                    b
                } else {
                    a
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loads(n: usize) -> Vec<Arc<EndpointLoad>> {
        (0..n).map(|_| Arc::new(EndpointLoad::default())).collect()
    }

    fn spread(kind: BalancerKind, n: usize, picks: usize) -> Vec<usize> {
        let l = loads(n);
        let rr = AtomicUsize::new(0);
        let cands: Vec<usize> = (0..n).collect();
        let mut counts = vec![0; n];
        for _ in 0..picks {
            let i = pick(kind, &cands, &|i| l[i].clone(), &[], &rr).expect("pick");
            counts[i] += 1;
        }
        counts
    }

    #[test]
    fn random_and_round_robin_spread_evenly() {
        // kube-proxy's rule of thumb: 3000 connections over 3 endpoints → each 33 % ± 5 %.
        for kind in [
            BalancerKind::Random,
            BalancerKind::RoundRobin,
            BalancerKind::P2c,
            BalancerKind::LeastConn,
        ] {
            for c in spread(kind, 3, 3000) {
                assert!((850..=1150).contains(&c), "{kind:?}: {c}");
            }
        }
        assert_eq!(
            spread(BalancerKind::RoundRobin, 3, 3000),
            [1000, 1000, 1000]
        );
    }

    #[test]
    fn least_conn_and_p2c_avoid_busy_endpoints() {
        let l = loads(3);
        let guards: Vec<ActiveGuard> = (0..10).map(|_| l[0].open()).collect();
        let rr = AtomicUsize::new(0);
        let cands = [0, 1, 2];
        for _ in 0..100 {
            assert_ne!(
                pick(BalancerKind::LeastConn, &cands, &|i| l[i].clone(), &[], &rr),
                Some(0)
            );
        }
        // p2c picks the busy one only when both draws land on it, which cannot happen.
        for _ in 0..100 {
            assert_ne!(
                pick(BalancerKind::P2c, &cands, &|i| l[i].clone(), &[], &rr),
                Some(0)
            );
        }
        drop(guards);
        assert_eq!(l[0].active(), 0);
    }

    #[test]
    fn recently_failed_and_tried_endpoints_are_skipped_unless_nothing_else_is_left() {
        let l = loads(3);
        l[1].record_failure();
        let rr = AtomicUsize::new(0);
        for _ in 0..50 {
            let p = pick(
                BalancerKind::Random,
                &[0, 1, 2],
                &|i| l[i].clone(),
                &[0],
                &rr,
            );
            assert_eq!(p, Some(2));
        }
        // Everything left has failed: try it anyway.
        assert_eq!(
            pick(BalancerKind::Random, &[0, 1], &|i| l[i].clone(), &[0], &rr),
            Some(1)
        );
        assert_eq!(
            pick(BalancerKind::Random, &[0], &|i| l[i].clone(), &[0], &rr),
            None
        );
        l[1].record_success();
        assert!(!l[1].recently_failed());
    }

    #[test]
    fn balancer_names_parse() {
        assert_eq!("least-conn".parse(), Ok(BalancerKind::LeastConn));
        assert!("fastest".parse::<BalancerKind>().is_err());
    }
}
