//! What every listener of the data plane shares: the compiled config of the moment
//! ([`Compiled`]: one balancer, one connection pool and one set of counters per cluster), the
//! accept loop, and the permits that bound a cluster's requests and connections.
//!
//! The HTTP request path ([`crate::stack`]), TCP listeners ([`crate::tcp`]), transparent
//! interception ([`crate::transparent`]) and inbound mTLS ([`crate::inbound`]) depend on this
//! module and not on each other's; [`crate::dataplane`] binds them to the listeners of the
//! published config.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::{TcpListener, TcpStream};

use crate::config::{ClusterConfig, ListenerKind, RouteSource, RouteTable};
use crate::lb::{Balancer, Host};
use crate::tls::TlsSource;
use crate::tunnel::{Connector, Gateway};
use crate::xds::ProxyConfig;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A request or response body of any source.
pub type Body = BoxBody<Bytes, BoxError>;

/// One cluster, ready to serve.
pub struct ClusterRuntime {
    pub config: Arc<ClusterConfig>,
    pub balancer: Balancer,
    client: Client<Connector, Body>,
    /// One pool per transport-socket match (`None`: the match is plaintext, use `client`).
    tls_clients: Vec<Option<Client<Connector, Body>>>,
    /// Requests in flight (its `max_requests` bound: the circuit breaker).
    pub(crate) requests: Permits,
    /// Retries in flight (its `max_retries` or retry budget).
    pub(crate) retries: Permits,
    /// TCP connections open through this cluster (its `max_connections` bound).
    pub(crate) connections: Permits,
}

/// A published config, compiled.
pub struct Compiled {
    pub config: Arc<ProxyConfig>,
    pub clusters: HashMap<String, Arc<ClusterRuntime>>,
    reach: Reach,
}

/// How the data plane reaches endpoints beyond plain TCP.
#[derive(Debug, Clone, Default)]
pub struct Reach {
    /// The local east-west gateway, for endpoints of other clusters.
    pub gateway: Option<Arc<Gateway>>,
    /// The proxy's workload certificate, for endpoints behind sidecars (mutual TLS).
    pub tls: Option<Arc<TlsSource>>,
}

impl Compiled {
    pub fn new(config: Arc<ProxyConfig>, previous: Option<&Compiled>, reach: &Reach) -> Self {
        let mut clusters = HashMap::new();
        for (name, c) in &config.clusters {
            let prev = previous.and_then(|p| p.clusters.get(name));
            let Some(a) = config.assignments.get(name) else {
                continue;
            };
            // Same settings: same connection pool and counters.
            let reuse = prev.filter(|p| *p.config == **c);
            let (client, tls_clients) = match reuse {
                Some(p) => (p.client.clone(), p.tls_clients.clone()),
                None => clients_for(c, reach),
            };
            clusters.insert(
                name.clone(),
                Arc::new(ClusterRuntime {
                    config: c.clone(),
                    balancer: Balancer::new(c, a, prev.map(|p| &p.balancer)),
                    client,
                    tls_clients,
                    requests: reuse.map_or_else(Permits::default, |p| p.requests.clone()),
                    retries: reuse.map_or_else(Permits::default, |p| p.retries.clone()),
                    connections: prev.map_or_else(Permits::default, |p| p.connections.clone()),
                }),
            );
        }
        Self {
            config,
            clusters,
            reach: reach.clone(),
        }
    }

    /// The local gateway, if the proxy has one.
    pub fn gateway(&self) -> Option<&Arc<Gateway>> {
        self.reach.gateway.as_ref()
    }

    /// The proxy's workload certificate, if it has one.
    pub fn workload_tls(&self) -> Option<&Arc<TlsSource>> {
        self.reach.tls.as_ref()
    }

    /// The route table of HTTP listener `listener` (`None`: no such listener, not HTTP, or its
    /// RDS routes have not come yet).
    pub fn table(&self, listener: &str) -> Option<&RouteTable> {
        let l = self.config.listeners.get(listener)?;
        match &l.kind {
            ListenerKind::Http {
                routes: RouteSource::Rds(n),
            } => self.config.routes.get(n).map(|t| &**t),
            ListenerKind::Http {
                routes: RouteSource::Inline(t),
            } => Some(t),
            ListenerKind::Tcp { .. } | ListenerKind::Transparent { .. } => None,
        }
    }
}

type Clients = (
    Client<Connector, Body>,
    Vec<Option<Client<Connector, Body>>>,
);

/// The cluster's pool, and one per transport-socket match that speaks TLS. Without a workload
/// certificate such a match gets a pool whose every connection fails with the reason.
fn clients_for(c: &ClusterConfig, reach: &Reach) -> Clients {
    let build = |connector: Connector| {
        let mut b = Client::builder(TokioExecutor::new());
        b.pool_idle_timeout(Duration::from_secs(60));
        if c.http2 {
            b.http2_only(true);
        }
        b.build(connector)
    };
    let plain = build(Connector::new(c.connect_timeout, reach.gateway.clone()));
    let tls = c
        .tls_matches
        .iter()
        .map(|m| {
            m.tls.as_ref().map(|settings| {
                let connector = Connector::new(c.connect_timeout, reach.gateway.clone());
                build(match &reach.tls {
                    Some(t) => connector.mutual(t.clone(), settings.clone()),
                    None => connector.refuse_mutual(),
                })
            })
        })
        .collect();
    (plain, tls)
}

impl ClusterRuntime {
    /// The pool that reaches `host`: its transport-socket match's, or the cluster's.
    pub(crate) fn client(&self, host: &Host) -> &Client<Connector, Body> {
        host.socket
            .and_then(|i| self.tls_clients.get(i))
            .and_then(Option::as_ref)
            .unwrap_or(&self.client)
    }
}

/// A counter of things in use with a bound, taken atomically: [`Permits::try_acquire`] either
/// counts one more and hands out a [`Permit`] (which counts it back when dropped), or refuses
/// — never more permits out than the limit of the moment, however many callers race.
#[derive(Debug, Clone, Default)]
pub struct Permits(Arc<AtomicU64>);

impl Permits {
    /// A permit if fewer than `limit` are out.
    pub fn try_acquire(&self, limit: u64) -> Option<Permit> {
        self.try_acquire_if(|out| out < limit)
    }

    /// A permit if `allowed(permits out now)`; the test and the count are one atomic step.
    pub fn try_acquire_if(&self, allowed: impl Fn(u64) -> bool) -> Option<Permit> {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |out| {
                allowed(out).then_some(out + 1)
            })
            .ok()
            .map(|_| Permit(self.0.clone()))
    }

    /// Permits out now.
    pub fn in_use(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

/// One unit of a [`Permits`], given back when dropped.
#[derive(Debug)]
pub struct Permit(Arc<AtomicU64>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The next downstream connection (with `TCP_NODELAY`); a failed accept (e.g. out of file
/// descriptors) is logged and tried again shortly.
pub(crate) async fn accept(listener: &TcpListener, name: &str) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                return (stream, peer);
            }
            Err(e) => {
                tracing::warn!(listener = %name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;

    /// However many threads race for permits, never more than the limit are out at once, and
    /// every permit comes back.
    #[test]
    fn permits_never_exceed_the_limit_under_concurrency() {
        const LIMIT: u64 = 3;
        const THREADS: usize = 8;
        let permits = Permits::default();
        let peak = Arc::new(AtomicU64::new(0));
        let granted = Arc::new(AtomicU64::new(0));
        let start = Arc::new(Barrier::new(THREADS));
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                let (permits, peak, granted, start) = (
                    permits.clone(),
                    peak.clone(),
                    granted.clone(),
                    start.clone(),
                );
                std::thread::spawn(move || {
                    start.wait();
                    for _ in 0..20_000 {
                        if let Some(p) = permits.try_acquire(LIMIT) {
                            peak.fetch_max(permits.in_use(), Ordering::AcqRel);
                            granted.fetch_add(1, Ordering::Relaxed);
                            std::hint::black_box(&p);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(
            peak.load(Ordering::Acquire) <= LIMIT,
            "{} permits were out at once, limit {LIMIT}",
            peak.load(Ordering::Acquire)
        );
        assert!(granted.load(Ordering::Relaxed) > 0, "no permit was granted");
        assert_eq!(permits.in_use(), 0, "permits leaked");
    }

    /// The limit of the moment applies: lowering it refuses new permits while the old ones
    /// finish; a refusal counts nothing.
    #[test]
    fn permits_follow_the_limit_of_the_moment() {
        let permits = Permits::default();
        let a = permits.try_acquire(2).unwrap();
        let b = permits.try_acquire(2).unwrap();
        assert!(permits.try_acquire(2).is_none());
        assert_eq!(permits.in_use(), 2);
        assert!(permits.try_acquire(1).is_none());
        drop(a);
        assert!(permits.try_acquire(1).is_none(), "one is still out");
        drop(b);
        let c = permits.try_acquire(1).unwrap();
        assert!(permits.try_acquire(0).is_none());
        drop(c);
        assert_eq!(permits.in_use(), 0);
    }
}
