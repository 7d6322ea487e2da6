//! Trace and span ids: wyrand, one state per thread, seeded from the OS's generator.
//!
//! `rand::random` reached the thread's ChaCha generator through a reference-counted handle
//! on every call and refilled its block every few requests. The ids need to be unique and
//! spread evenly (collectors and tail samplers shard and sample by them), not secret: the
//! OpenTelemetry Java SDK draws them from `ThreadLocalRandom`, a non-cryptographic generator
//! too. wyrand passes the BigCrush and PractRand batteries, in a multiply and a few adds.

use std::cell::Cell;

use opentelemetry::trace::{SpanId, TraceId};

thread_local! {
    static STATE: Cell<u64> = Cell::new(rand::random());
}

fn next() -> u64 {
    STATE.with(|s| {
        let x = s.get().wrapping_add(0xa076_1d64_78bd_642f);
        s.set(x);
        let t = u128::from(x) * u128::from(x ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) ^ t) as u64
    })
}

/// A new trace id (never the invalid all-zero one).
pub fn trace_id() -> TraceId {
    TraceId::from((u128::from(next()) << 64 | u128::from(next())).max(1))
}

/// A new span id (never the invalid zero).
pub fn span_id() -> SpanId {
    SpanId::from(next().max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_are_distinct_and_their_bits_balanced_within_and_across_threads() {
        let mine: Vec<u64> = (0..50_000).map(|_| next()).collect();
        let theirs: Vec<u64> = std::thread::spawn(|| (0..50_000).map(|_| next()).collect())
            .join()
            .expect("thread");
        let all: HashSet<u64> = mine.iter().chain(&theirs).copied().collect();
        assert_eq!(all.len(), 100_000, "a repeated id");
        // Each bit is set in about half of the ids (±1 % over 100,000: > 6 sigma).
        for bit in 0..64 {
            let ones = all.iter().filter(|v| *v >> bit & 1 == 1).count();
            assert!((49_000..=51_000).contains(&ones), "bit {bit}: {ones} ones");
        }
        let t = trace_id();
        assert_ne!(t, TraceId::INVALID);
        assert_ne!(t.to_bytes()[..8], t.to_bytes()[8..], "both halves drawn");
        assert_ne!(span_id(), SpanId::INVALID);
    }
}
