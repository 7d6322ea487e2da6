//! The contract between wasmesh control and the proxies.
//!
//! - [`discovery`]: the generated protobuf types and the tonic client/server for the
//!   `wasmesh.discovery.v1.Discovery/Watch` stream (see `proto/`).
//! - [`table`]: what a subscriber does with the stream — apply snapshots and deltas to a local
//!   copy of the service table. The proxy and the tests use this one implementation.
//! - [`identity`]: the generated types and tonic client/server for
//!   `wasmesh.identity.v1.Identity` (Certify, WatchTrustBundle); [`spiffe`]: the SPIFFE IDs in
//!   workload certificates.
//! - [`authz`]: the AuthorizationPolicy spec (shared by control and the proxy's own policy
//!   folder), its validation, its wire form, and who a rule admits.
//! - [`wire`]: helpers to build `TableUpdate` messages out of service ports that were encoded
//!   once, so that control's cost per change does not grow with the number of subscribers.

pub mod authz;
pub mod spiffe;
pub mod table;
pub mod wire;

/// Generated from `proto/wasmesh/discovery/v1/discovery.proto`.
#[allow(clippy::all, rust_2018_idioms, missing_docs)]
pub mod discovery {
    tonic::include_proto!("wasmesh.discovery.v1");
}

/// Generated from `proto/wasmesh/identity/v1/identity.proto`.
#[allow(clippy::all, rust_2018_idioms, missing_docs)]
pub mod identity {
    tonic::include_proto!("wasmesh.identity.v1");
}

pub use discovery::{
    AuthorizationPolicy, AuthorizationRule, Endpoint, GetModuleRequest, Module, Node, Protocol,
    ServicePort, ServicePortKey, ServiceType, TableUpdate, TrafficPolicy, WasmPlugin, WatchRequest,
    Workload, table_update::Kind as UpdateKind,
};

/// Fully-qualified gRPC path of the watch method.
pub const WATCH_PATH: &str = "/wasmesh.discovery.v1.Discovery/Watch";

/// Fully-qualified gRPC path of the method that returns a Wasm module's bytes by sha256.
pub const GET_MODULE_PATH: &str = "/wasmesh.discovery.v1.Discovery/GetModule";

/// The largest Wasm module control serves (and a `GetModule` response may carry); clients
/// should accept messages of this size plus a little framing.
pub const MAX_MODULE_SIZE: usize = 64 * 1024 * 1024;

/// Prefix of every method path of the identity service.
pub const IDENTITY_PATH_PREFIX: &str = "/wasmesh.identity.v1.Identity/";
