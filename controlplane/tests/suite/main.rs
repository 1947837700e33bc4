//! The control plane's integration tests, in one binary (one link instead of six).
// Tests and benchmarks: an unwrap is an assertion (a failure with the value's message).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../common/mod.rs"]
mod common;

mod envoy_accepts;
mod envoy_through_gateway;
mod health_checks;
mod kubernetes;
mod xds_behaviour;
mod xds_envoy;
mod xds_grpc;
