//! Test helpers (behind the `test-util` feature).
