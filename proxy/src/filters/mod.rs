//! Wasm filters in the sidecar: which WasmPlugins from control apply to this pod
//! ([`select`]).

pub mod select;
