//! The contract between wasmesh control and the proxies.
//!
//! - [`discovery`]: the generated protobuf types and the tonic client/server for the
//!   `wasmesh.discovery.v1.Discovery/Watch` stream (see `proto/`).
//! - [`table`]: what a subscriber does with the stream — apply snapshots and deltas to a local
//!   copy of the service table. The proxy and the tests use this one implementation.
//! - [`wire`]: helpers to build `TableUpdate` messages out of service ports that were encoded
//!   once, so that control's cost per change does not grow with the number of subscribers.

pub mod table;
pub mod wire;

/// Generated from `proto/wasmesh/discovery/v1/discovery.proto`.
#[allow(clippy::all, rust_2018_idioms, missing_docs)]
pub mod discovery {
    tonic::include_proto!("wasmesh.discovery.v1");
}

pub use discovery::{
    Endpoint, Node, Protocol, ServicePort, ServicePortKey, ServiceType, TableUpdate, TrafficPolicy,
    WatchRequest, Workload, table_update::Kind as UpdateKind,
};

/// Fully-qualified gRPC path of the watch method.
pub const WATCH_PATH: &str = "/wasmesh.discovery.v1.Discovery/Watch";
