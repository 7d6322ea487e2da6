//! What the network-namespace benches (`l4`, `l7`) share: the run's network ([`netns`]), what
//! processes cost ([`procfs`]), the run itself — signals, the run folder, tools started inside
//! the pods, waiting for a quiet machine ([`run`]) — the pieces of a pair every bench starts the
//! same way: interception, control, wasmesh and Envoy sidecars ([`mesh`]), mTLS for the pairs
//! that run with it — one CA, certificates, Envoy's TLS contexts, the checks ([`mtls`], with the
//! probe tool [`tls_probe`]) — and medians over rounds in Markdown ([`report`]).
//!
//! Each bench is one binary that is both the orchestrator and, started again inside a pod
//! namespace as `BENCH __tool …`, its own app server and load generators.

pub mod mesh;
pub mod mtls;
pub mod netns;
pub mod procfs;
pub mod report;
pub mod run;
pub mod tls_probe;
