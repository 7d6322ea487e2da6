//! wasmesh load benchmarks. The binaries are in `src/bin/` (see `benches/README.md`); this
//! library is what the network-namespace benches (`l4`, `l7`) share: [`harness`].

pub mod harness;
