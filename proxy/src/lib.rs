//! Strait's sidecar proxy: the xDS-fed data plane in every cluster.
//!
//! - [`admin`] — `/ready`, `/metrics`, `/config_dump`, `/clusters`.
//! - [`config`] — the proxy's configuration model, translated and validated from xDS resources
//!   (an error names the resource and the field; the xDS client NACKs with it).
//! - [`xds`] — the delta ADS client: NACKs what it cannot apply, warms before publishing,
//!   keeps its last good config while the control plane is away, and resyncs.
//! - [`dataplane`] — the listeners of the published config, bound and unbound as it changes,
//!   each served by one of the next four; hot updates.
//! - [`runtime`] — what those share: the compiled config (a balancer, a connection pool and
//!   counters per cluster), the accept loop, permits.
//! - [`stack`] — the HTTP request path as tower layers: route, circuit breaker, upgrades,
//!   retries (with a pure classifier), outlier reports, per-try timeout, header hygiene.
//! - [`tcp`] — outbound TCP listeners: one endpoint per connection, another host and priority
//!   when a connection cannot be made.
//! - [`tunnel`] — endpoints of other clusters, through the local gateway: HTTP/2 CONNECT over
//!   mTLS, every tunnel a stream of one connection.
//! - [`tls`] — the workload certificate (mTLS to the control plane and the gateway), reloaded
//!   when its files change.
//! - [`lb`] — Envoy's load-balancing semantics: priority load with overprovisioning and panic,
//!   locality weights, round robin and least request, outlier ejection, retries that avoid the
//!   priorities and hosts already tried.
#![forbid(unsafe_code)]

pub mod admin;
pub mod ads;
pub mod config;
pub mod dataplane;
pub mod inbound;
pub mod lb;
pub mod runtime;
pub mod stack;
pub mod tcp;
pub mod tls;
pub mod transparent;
pub mod tunnel;
pub mod xds;

/// An error with its causes, `a: b: c` (hyper's and tonic's own messages alone say little).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}
