//! wasmesh control.
pub mod source;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
pub mod model;
pub mod discovery;
