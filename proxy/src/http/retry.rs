//! The retry budget: retries may add at most a fixed share of the requests this proxy sends
//! (20 %), plus a small floor per second so a quiet proxy can still retry, so that retries
//! cannot multiply load on a failing Service (Finagle's and Linkerd's retry budget).

use std::sync::Mutex;
use std::time::Instant;

use http::Method;

/// Retries allowed per request sent.
const RATIO: f64 = 0.2;
/// Retries allowed per second whatever the traffic.
const FLOOR_PER_SEC: f64 = 10.0;
/// At most this many retries saved up.
const MAX_TOKENS: f64 = 100.0;

#[derive(Debug)]
pub struct Budget {
    state: Mutex<(f64, Instant)>,
}

impl Default for Budget {
    fn default() -> Self {
        Self {
            state: Mutex::new((FLOOR_PER_SEC, Instant::now())),
        }
    }
}

impl Budget {
    fn refill(state: &mut (f64, Instant)) {
        let now = Instant::now();
        let secs = now.duration_since(state.1).as_secs_f64();
        state.0 = (state.0 + secs * FLOOR_PER_SEC).min(MAX_TOKENS);
        state.1 = now;
    }

    /// A request was sent: it earns a share of a retry.
    pub fn deposit(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        Self::refill(&mut s);
        s.0 = (s.0 + RATIO).min(MAX_TOKENS);
    }

    /// May one retry be made now? Takes it from the budget if so.
    pub fn withdraw(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        Self::refill(&mut s);
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Methods that may be sent twice (RFC 9110 §9.2.2).
pub fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_bounded_by_traffic() {
        let b = Budget::default();
        // The floor: about 10 retries with no traffic.
        let mut free = 0;
        while b.withdraw() {
            free += 1;
            assert!(free < 20, "the floor is bounded");
        }
        assert!(free >= 9, "floor {free}");
        // 100 requests earn 20 retries, no more.
        for _ in 0..100 {
            b.deposit();
        }
        let mut earned = 0;
        while b.withdraw() {
            earned += 1;
            assert!(earned < 25);
        }
        assert!((19..=21).contains(&earned), "earned {earned}");
    }
}
