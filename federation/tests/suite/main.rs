//! The federation crate's integration tests, in one binary (one link instead of several).
// Tests and benchmarks: an unwrap is an assertion (a failure with the value's message).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod identity;
mod registry;
mod route;
