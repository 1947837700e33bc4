//! The `strait` command's integration tests (CLI, registry, transparent proxy), in one binary.
// Tests and benchmarks: an unwrap is an assertion (a failure with the value's message).
#![allow(clippy::unwrap_used, clippy::expect_used)]

/// Golden files of this release's encodings (rolling upgrades).
#[path = "../compat/mod.rs"]
mod compat;
#[path = "../support/mod.rs"]
mod support;

mod proxy_cli;
mod registry_cli;
mod transparent;
