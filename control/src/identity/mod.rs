//! Control as the mesh's certificate authority.
//!
//! - [`root`]: the CA certificate and key — from PEM files (`--ca-cert`, `--ca-key`), or made on
//!   first start and kept in a directory (`--ca-dir`, what the local mesh uses).
//! - [`authority`]: signs workload certificates whose only name is the SPIFFE ID of the proven
//!   ServiceAccount; keeps the trust bundle through rotations (new root trusted before it signs,
//!   old root trusted until its certificates expire).
//! - [`token`]: how a proxy proves who it is — TokenReview in a cluster, token files in the
//!   local mesh.
//! - [`service`]: the `wasmesh.identity.v1.Identity` gRPC service on the discovery port.
//! - [`reload`]: watches the CA files and starts a rotation when they change.
//!
//! See `docs/identity.md`.

pub mod authority;
pub mod reload;
pub mod root;
pub mod service;
#[cfg(test)]
mod tests;
pub mod token;

pub use authority::{Authority, AuthorityConfig, IssueError, Issued};
pub use root::{Root, RootError};
pub use service::IdentityService;
pub use token::{Claims, TokenError, TokenReviewer};
