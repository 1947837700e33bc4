//! Strait's per-cluster control plane: local discovery, publishing into the registry, route
//! resolution and the merged xDS server. Built in the controlplane issue; today the cluster
//! publisher lives in `federation::registry::publisher` and `strait registry publish`.
#![forbid(unsafe_code)]

pub mod resources;
