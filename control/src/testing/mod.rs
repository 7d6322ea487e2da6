//! Test helpers (behind the `test-util` feature).
pub mod fake_apiserver;
