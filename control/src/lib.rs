//! wasmesh control: reads Services, EndpointSlices, Pods, Nodes, Gateway API HTTPRoutes and
//! WasmPlugins (with their modules) and streams the service table to every proxy.
//!
//! The path of an object, in module order:
//! - [`source`]: where objects come from — [`source::kube`] (watchers on the API server) or
//!   [`source::folder`] (a directory of YAML, the embedded default) — as one stream of events.
//! - [`model`]: pure; objects in, the table out ([`model::ServicePortEntry`] per Service port,
//!   endpoints merged from every EndpointSlice, the way kube-proxy reads them, and the
//!   HTTPRoutes attached to it; [`model::PluginEntry`] per WasmPlugin).
//! - [`discovery`]: the publisher folds events into deltas, the hub keeps the table encoded
//!   and fans deltas out (and keeps WasmPlugin modules by sha256), the server speaks the
//!   `Watch` gRPC stream and answers `GetModule`.
//! - [`identity`]: control as the mesh's certificate authority (SPIFFE workload certificates,
//!   token proofs, trust bundle rotation), served next to discovery.
//! - [`app`]: the wiring behind `wasmesh-control serve` and `wasmesh-control table`;
//!   [`admin`]: `/ready`, `/live`, `/metrics`; [`view`]: how `table` prints.

pub mod admin;
pub mod app;
pub mod discovery;
pub mod identity;
pub mod model;
pub mod source;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
pub mod view;
