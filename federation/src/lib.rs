//! Strait's federation crate: the vocabulary (clusters, localities, services, endpoints,
//! failover policies, link states), the static discovery file, the global registry (etcd or
//! embedded) with its local cache and lease-holding publisher, and identity (PKI, SPIFFE IDs,
//! the peer verifier).
#![forbid(unsafe_code)]

pub mod admin;
pub mod backoff;
pub mod config;
pub mod discovery;
pub mod health_check;
pub mod http_route;
pub mod identity;
pub mod metrics_text;
pub mod model;
pub mod policy_file;
pub mod registry;
pub mod route;
pub mod tunnel;
pub mod xds_contract;
