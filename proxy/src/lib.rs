//! wasmesh-proxy: the sidecar that runs in every meshed pod.
//!
//! Map of the modules, in the order a connection meets them:
//!
//! - [`intercept`] — `wasmesh-proxy init`: the nat rules that send the pod's TCP connections to
//!   the proxy (outbound → 15001, inbound → 15006), rendered by a pure function
//!   ([`intercept::render_rules`]) and installed with `iptables-restore`.
//!   See `docs/interception.md`.
//! - [`orig_dst`] — where a redirected connection was going ([`orig_dst::original_dst`]).

pub mod intercept;
pub mod orig_dst;
