//! Strait's per-cluster control plane: publishes the cluster's endpoints to the registry,
//! follows every other cluster, resolves locality-aware routes and serves them to the
//! cluster's proxies over ADS (state of the world and delta) — Envoy and proxyless gRPC.
#![forbid(unsafe_code)]

mod admin;
pub mod bootstrap;
pub mod certificates;
pub mod config;
pub mod debug;
pub mod health;
pub mod kubernetes;
pub mod metrics;
pub mod resources;
pub mod server;
pub mod serving;
pub mod session;
pub mod view;
pub mod xds;
