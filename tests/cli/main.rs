//! The `strait` command's integration tests (CLI, registry, transparent proxy), in one binary.

/// Golden files of this release's encodings (rolling upgrades).
#[path = "../compat/mod.rs"]
mod compat;
#[path = "../support/mod.rs"]
mod support;

mod proxy_cli;
mod registry_cli;
mod transparent;
