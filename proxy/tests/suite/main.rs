//! The proxy's integration tests, in one binary (one link instead of eleven).
// Tests and benchmarks: an unwrap is an assertion (a failure with the value's message).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../../controlplane/tests/common/mod.rs"]
mod common;
#[path = "../support/mod.rs"]
mod support;

mod config;
mod cross_cluster;
mod dataplane;
mod early_tcp;
mod hot_updates;
mod inbound;
mod lb;
mod mutual_tls;
mod protocols;
mod routing;
mod xds_client;
