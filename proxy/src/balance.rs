//! Choosing an endpoint for a new connection.
//!
//! - `random`: uniform, what kube-proxy's iptables and nftables modes do;
//! - `round-robin`;
//! - `least-conn`: fewest open connections (from this proxy);
//! - `p2c` (the default): power of two choices — two random candidates, the one with fewer open
//!   connections wins. Nearly as good as least-conn at spreading load, without its herd
//!   behaviour when many proxies see the same counts.
//!
//! At L7 ([`Unit::Request`]) the same names balance requests: `least-conn` counts requests in
//! flight, and `p2c` compares a cost — the endpoint's recent response time (an exponentially
//! weighted moving average over time, [`EWMA_DECAY`]) times its requests in flight plus one,
//! after Finagle's and Linkerd's — so a slow or overloaded replica gets less traffic, while
//! equally fast replicas share it evenly.
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

/// The time constant of the response-time average: a measurement this old weighs 1/e.
pub const EWMA_DECAY: Duration = Duration::from_secs(2);
/// Each new measurement moves the average at least this much of the way, so a persistent
/// change shows within tens of requests even at high rates.
const MIN_ALPHA: f64 = 0.05;
/// Added to every endpoint's response time in the cost, so requests in flight count even for
/// an endpoint with no measurement yet (whose response time is taken as 0: new and long-idle
/// endpoints are tried, not starved by a measured one).
const BASE_COST_US: u64 = 50;
/// An idle endpoint whose response time was last measured this long ago is costed as if never
/// measured, so it gets a request and a fresh measurement. Without this, the costliest of a
/// few endpoints loses every two-way comparison and starves until its average has decayed
/// below the others' — seconds during which it serves nothing, and a replica that fails or
/// recovered goes unnoticed.
pub const PROBE_AFTER: Duration = Duration::from_secs(1);

/// What is being balanced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Connection,
    Request,
}

/// What this proxy knows about one endpoint's load, shared by every Service port that lists it
/// and kept across table updates.
#[derive(Debug, Default)]
pub struct EndpointLoad {
    active: AtomicUsize,
    /// HTTP requests in flight.
    pending: AtomicUsize,
    /// Average response time in µs (0 = not measured yet) and when it was last updated
    /// (µs on [`clock_us`]).
    ewma_us: AtomicU64,
    ewma_at: AtomicU64,
    /// Requests sent, for `/config` and tests.
    pub requests: AtomicU64,
    /// Milliseconds (on [`clock`]) until which the endpoint is avoided.
    failed_until: AtomicU64,
    /// Connections made, for `/config` and tests.
    pub picked: AtomicU64,
}

fn start() -> std::time::Instant {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *START.get_or_init(std::time::Instant::now)
}

fn clock() -> u64 {
    start().elapsed().as_millis() as u64
}

/// µs since an instant an hour before the first use, so "long ago" fits in the range.
fn clock_us() -> u64 {
    start().elapsed().as_micros() as u64 + 3_600_000_000
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

    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Counts a request in flight until the guard drops; [`RequestGuard::observe`] records its
    /// response time.
    pub fn request(self: &Arc<Self>) -> RequestGuard {
        self.pending.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        RequestGuard(self.clone())
    }

    /// The average response time now, in µs (0 = never measured). It decays while the
    /// endpoint gets no requests, so an endpoint that was slow once is tried again later.
    pub fn ewma_us(&self) -> u64 {
        self.ewma_and_age().0
    }

    /// The decayed average (as [`EndpointLoad::ewma_us`]) and how long ago it was last
    /// measured, in µs, from one clock read.
    fn ewma_and_age(&self) -> (u64, u64) {
        let age = clock_us().saturating_sub(self.ewma_at.load(Ordering::Relaxed));
        let v = self.ewma_us.load(Ordering::Relaxed);
        if v == 0 {
            return (0, age);
        }
        let w = (-(age as f64) / EWMA_DECAY.as_micros() as f64).exp();
        ((v as f64 * w) as u64, age)
    }

    fn observe(&self, rtt: Duration) {
        let rtt = (rtt.as_micros() as u64).max(1);
        let now = clock_us();
        let cur = self.ewma_us.load(Ordering::Relaxed);
        let next = if cur == 0 {
            // The first measurement is taken as it is.
            rtt
        } else {
            // A single slow answer moves the average a little; a lasting slowdown, all the way.
            let age = now.saturating_sub(self.ewma_at.load(Ordering::Relaxed));
            let alpha =
                (1.0 - (-(age as f64) / EWMA_DECAY.as_micros() as f64).exp()).max(MIN_ALPHA);
            (cur as f64 * (1.0 - alpha) + rtt as f64 * alpha) as u64
        };
        self.ewma_us.store(next.max(1), Ordering::Relaxed);
        self.ewma_at.store(now, Ordering::Relaxed);
    }

    /// What [`pick`] compares: lower is better.
    fn weight(&self, unit: Unit, kind: BalancerKind) -> u64 {
        match (unit, kind) {
            (Unit::Connection, _) => self.active() as u64,
            (Unit::Request, BalancerKind::P2c) => {
                let pending = self.pending() as u64;
                let (ewma, age) = self.ewma_and_age();
                let stale = age > PROBE_AFTER.as_micros() as u64;
                let ewma = if pending == 0 && stale { 0 } else { ewma };
                (ewma + BASE_COST_US) * (pending + 1)
            }
            (Unit::Request, _) => self.pending() as u64,
        }
    }
}

/// One request in flight to an endpoint.
#[derive(Debug)]
pub struct RequestGuard(Arc<EndpointLoad>);

impl RequestGuard {
    /// Records how long the endpoint took to answer (response headers).
    pub fn observe(&self, rtt: Duration) {
        self.0.observe(rtt);
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::Relaxed);
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
    unit: Unit,
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
            let w = |i: usize| loads(i).weight(unit, kind);
            let min = pool.iter().map(|i| w(*i)).min().unwrap_or(0);
            let least: Vec<usize> = pool.iter().copied().filter(|i| w(*i) == min).collect();
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
                if loads(b).weight(unit, kind) < loads(a).weight(unit, kind) {
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
            let i =
                pick(kind, Unit::Connection, &cands, &|i| l[i].clone(), &[], &rr).expect("pick");
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
                pick(
                    BalancerKind::LeastConn,
                    Unit::Connection,
                    &cands,
                    &|i| l[i].clone(),
                    &[],
                    &rr
                ),
                Some(0)
            );
        }
        // p2c picks the busy one only when both draws land on it, which cannot happen.
        for _ in 0..100 {
            assert_ne!(
                pick(
                    BalancerKind::P2c,
                    Unit::Connection,
                    &cands,
                    &|i| l[i].clone(),
                    &[],
                    &rr
                ),
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
                Unit::Connection,
                &[0, 1, 2],
                &|i| l[i].clone(),
                &[0],
                &rr,
            );
            assert_eq!(p, Some(2));
        }
        // Everything left has failed: try it anyway.
        assert_eq!(
            pick(
                BalancerKind::Random,
                Unit::Connection,
                &[0, 1],
                &|i| l[i].clone(),
                &[0],
                &rr
            ),
            Some(1)
        );
        assert_eq!(
            pick(
                BalancerKind::Random,
                Unit::Connection,
                &[0],
                &|i| l[i].clone(),
                &[0],
                &rr
            ),
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

    #[test]
    fn p2c_per_request_avoids_the_slow_endpoint() {
        let l = loads(2);
        // Endpoint 0 answered in 50 ms, endpoint 1 in 1 ms.
        l[0].request().observe(Duration::from_millis(50));
        l[1].request().observe(Duration::from_millis(1));
        let rr = AtomicUsize::new(0);
        let mut to_slow = 0;
        for _ in 0..200 {
            let i = pick(
                BalancerKind::P2c,
                Unit::Request,
                &[0, 1],
                &|i| l[i].clone(),
                &[],
                &rr,
            )
            .expect("pick");
            to_slow += usize::from(i == 0);
        }
        assert_eq!(
            to_slow, 0,
            "with two endpoints p2c compares both: never the slow one"
        );
        // Requests piling up on the fast one make the slow one worth it again.
        let _inflight: Vec<_> = (0..100).map(|_| l[1].request()).collect();
        let i = pick(
            BalancerKind::P2c,
            Unit::Request,
            &[0, 1],
            &|i| l[i].clone(),
            &[],
            &rr,
        );
        assert_eq!(i, Some(0));
    }

    #[test]
    fn p2c_probes_an_endpoint_not_measured_for_a_while() {
        // Three endpoints; the slow one loses every comparison while its measurement is fresh.
        let l = loads(3);
        l[0].request().observe(Duration::from_millis(50));
        l[1].request().observe(Duration::from_millis(1));
        l[2].request().observe(Duration::from_millis(1));
        let rr = AtomicUsize::new(0);
        let picks = |n: usize| {
            (0..n)
                .filter(|_| {
                    pick(
                        BalancerKind::P2c,
                        Unit::Request,
                        &[0, 1, 2],
                        &|i| l[i].clone(),
                        &[],
                        &rr,
                    ) == Some(0)
                })
                .count()
        };
        assert_eq!(picks(100), 0);
        // Its measurement ages past PROBE_AFTER: the next comparisons it is in, it wins.
        l[0].ewma_at.store(
            clock_us() - PROBE_AFTER.as_micros() as u64 - 1,
            Ordering::Relaxed,
        );
        assert!(picks(100) > 0, "the stale endpoint is never probed");
        // A request in flight to it is not stale: no pile-up on a slow endpoint.
        let _inflight = l[0].request();
        assert_eq!(picks(100), 0);
    }

    #[test]
    fn ewma_takes_the_first_measurement_and_moves_gradually() {
        let l = Arc::new(EndpointLoad::default());
        assert_eq!(l.ewma_us(), 0);
        l.request().observe(Duration::from_millis(20));
        assert!(l.ewma_us() >= 19_000, "first: {}", l.ewma_us());
        l.request().observe(Duration::from_micros(100));
        assert!(
            l.ewma_us() > 10_000,
            "a fast answer lowers it slowly: {}",
            l.ewma_us()
        );
        assert_eq!(l.pending(), 0);
    }
}
