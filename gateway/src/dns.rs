//! Resolving peer gateway addresses: IP literals as they are, DNS names with `hickory-resolver`,
//! re-resolved when their records expire.
//!
//! Every peer has a list of target addresses (from the static `peers:` list or from its cluster's
//! record in the registry). A task per peer resolves them and publishes the socket addresses the
//! dialer uses. Names are looked up again when the shortest TTL among them runs out (at least
//! `min_refresh`, at most `max_refresh` apart), so a gateway that moves behind a DNS name is
//! followed without a restart. A failed lookup keeps the last good addresses and is retried
//! after `min_refresh` (a DNS outage must not take a working link away).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use federation::model::GatewayAddress;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::DnsConfig;
use crate::peers::Peer;

/// A resolver for peer gateway names.
pub struct PeerResolver {
    /// The resolver, or why it could not be built (reported on every lookup of a name; IP
    /// literals never need it).
    resolver: Result<TokioResolver, String>,
    min_refresh: Duration,
    max_refresh: Duration,
}

/// One resolution of a peer's targets.
#[derive(Debug, Default)]
pub struct Resolved {
    pub addrs: Vec<SocketAddr>,
    /// When to resolve again (`None`: only IP literals, nothing to refresh).
    pub refresh_at: Option<Instant>,
    /// Names that could not be resolved, with the reason.
    pub failures: Vec<(String, String)>,
}

impl PeerResolver {
    /// A resolver from the gateway's `dns:` settings: the given name servers, or the system's
    /// (`/etc/resolv.conf`) when none are given.
    pub fn new(cfg: &DnsConfig) -> Self {
        let provider = TokioRuntimeProvider::default();
        let builder = if cfg.nameservers.is_empty() {
            TokioResolver::builder(provider).map_err(|e| {
                format!("cannot read the system DNS configuration (/etc/resolv.conf): {e}")
            })
        } else {
            let servers = cfg
                .nameservers
                .iter()
                .map(|a| {
                    let mut ns = NameServerConfig::udp_and_tcp(a.ip());
                    for c in &mut ns.connections {
                        c.port = a.port();
                    }
                    ns
                })
                .collect();
            Ok(TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                provider,
            ))
        };
        let resolver = builder.and_then(|mut b| {
            let o = b.options_mut();
            o.timeout = cfg.timeout;
            o.attempts = 2;
            // Never cache past our own refresh bound.
            o.positive_max_ttl = Some(cfg.max_refresh);
            o.negative_max_ttl = Some(cfg.min_refresh);
            b.build()
                .map_err(|e| format!("cannot build the DNS resolver: {e}"))
        });
        Self {
            resolver,
            min_refresh: cfg.min_refresh,
            max_refresh: cfg.max_refresh,
        }
    }

    /// Resolve every target; the addresses are sorted and deduplicated.
    pub async fn resolve(&self, targets: &[GatewayAddress]) -> Resolved {
        let mut out = Resolved::default();
        let now = Instant::now();
        for t in targets {
            if let Some(a) = t.socket_addr() {
                out.addrs.push(a);
                continue;
            }
            let next = match &self.resolver {
                Err(why) => {
                    out.failures.push((t.to_string(), why.clone()));
                    now + self.min_refresh
                }
                Ok(r) => match r.lookup_ip(t.host()).await {
                    Ok(found) => {
                        out.addrs
                            .extend(found.iter().map(|ip| SocketAddr::new(ip, t.port())));
                        let ttl = found
                            .valid_until()
                            .saturating_duration_since(std::time::Instant::now());
                        now + ttl.clamp(self.min_refresh, self.max_refresh)
                    }
                    Err(e) => {
                        out.failures.push((t.to_string(), e.to_string()));
                        now + self.min_refresh
                    }
                },
            };
            out.refresh_at = Some(out.refresh_at.map_or(next, |r: Instant| r.min(next)));
        }
        out.addrs.sort();
        out.addrs.dedup();
        out
    }
}

/// Keep `addresses` equal to the resolution of `targets` until `shutdown` fires.
pub async fn track(
    resolver: Arc<PeerResolver>,
    peer: Arc<Peer>,
    mut targets: watch::Receiver<Vec<GatewayAddress>>,
    shutdown: crate::Shutdown,
) {
    loop {
        let want = targets.borrow_and_update().clone();
        let r = resolver.resolve(&want).await;
        for (name, why) in &r.failures {
            tracing::warn!(peer = %peer.cluster, address = %name, error = %why,
                "cannot resolve a peer gateway address; keeping the last good addresses");
        }
        // A name that failed keeps what it resolved to before: only replace the addresses when
        // every target resolved, or when there were none before.
        let complete = r.failures.is_empty();
        peer.addresses.send_if_modified(|cur| {
            if (complete || cur.is_empty()) && *cur != r.addrs {
                tracing::info!(peer = %peer.cluster, addrs = ?r.addrs, "peer gateway addresses");
                *cur = r.addrs.clone();
                true
            } else {
                false
            }
        });
        let wake_at = r.refresh_at;
        tokio::select! {
            changed = targets.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = async {
                match wake_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
