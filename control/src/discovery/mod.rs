//! Discovery: the service table streamed to proxies over gRPC.
//!
//! [`publisher`] turns source events into deltas, [`hub`] keeps the encoded table and fans
//! deltas out, [`server`] speaks `wasmesh.discovery.v1.Discovery/Watch`.

pub mod hub;
pub mod publisher;
pub mod server;

pub use hub::Hub;
