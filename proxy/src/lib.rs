//! Strait's sidecar proxy: the xDS-fed data plane in every cluster.
//!
//! - [`admin`] — `/ready`, `/metrics`, `/config_dump`, `/clusters`.
//! - [`config`] — the proxy's configuration model, translated and validated from xDS resources
//!   (an error names the resource and the field; the xDS client NACKs with it).
//! - [`xds`] — the delta ADS client: NACKs what it cannot apply, warms before publishing,
//!   keeps its last good config while the control plane is away, and resyncs.
//! - [`dataplane`] — outbound HTTP listeners: routing, retries across hosts and priorities,
//!   outlier reporting, circuit breaking, hot updates.
//! - [`lb`] — Envoy's load-balancing semantics: priority load with overprovisioning and panic,
//!   locality weights, round robin and least request, outlier ejection, retries that avoid the
//!   priorities and hosts already tried.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod dataplane;
pub mod lb;
pub mod xds;
