//! The HTTP data plane: listeners from the published config, requests routed by host, path and
//! headers, load-balanced with Envoy's semantics, retried to another host and priority.
//!
//! - **Hot updates.** Each published config is compiled into a [`Compiled`] snapshot (route
//!   tables, one balancer and one connection pool per cluster); requests take the snapshot of
//!   the moment they arrive, so an update never disturbs a request in flight. A cluster whose
//!   settings did not change keeps its connection pool, and every host keeps its runtime state
//!   (active requests, outlier ejection). Listeners are bound when they appear and stop
//!   accepting when they go; open connections finish.
//! - **Requests.** HTTP/1.1 and HTTP/2 (h2c) downstream; HTTP/1.1 or HTTP/2 upstream as the
//!   cluster says. A request whose body is small and complete (≤ 64 KiB) can be retried; others
//!   stream through on one attempt.
//! - **Retries** follow the route's policy (connect-failure, reset, refused-stream, 5xx,
//!   gateway-error, retriable status codes), each on another host and, with
//!   `previous_priorities`, another priority; within the route timeout; bounded by the
//!   cluster's `max_retries` in flight.
//! - **Upgrades** (WebSockets): an HTTP/1.1 upgrade request is passed on; on 101 the two
//!   upgraded connections are spliced together.
//! - **Circuit breaking**: a cluster with `max_requests` in flight answers 503 at once.
//! - Errors are answered with a status and a reason (`x-strait-reason`): no route 404, no
//!   cluster or no healthy upstream 503, upstream timeout 504.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Body as _, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::config::{
    ClusterConfig, ListenerKind, RouteEntry, RouteSource, RouteTable, RouteTarget, Upstream,
};
use crate::lb::{Balancer, Host, Outcome, Random, ThreadRandom, Tried};
use crate::tls::TlsSource;
use crate::tunnel::{Connector, Gateway, tunnel_authority};
use crate::xds::ProxyConfig;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// Request bodies up to this size are buffered so a retry can send them again.
const REPLAYABLE: u64 = 64 * 1024;

/// One cluster, ready to serve.
pub struct ClusterRuntime {
    pub config: Arc<ClusterConfig>,
    pub balancer: Balancer,
    client: Client<Connector, Body>,
    /// One pool per transport-socket match (`None`: the match is plaintext, use `client`).
    tls_clients: Vec<Option<Client<Connector, Body>>>,
    in_flight: Arc<AtomicU64>,
    retries_in_flight: Arc<AtomicU64>,
    /// TCP connections open through this cluster (its `max_connections` bound).
    tcp_connections: Arc<AtomicU64>,
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
                    in_flight: reuse.map_or_else(Default::default, |p| p.in_flight.clone()),
                    retries_in_flight: reuse
                        .map_or_else(Default::default, |p| p.retries_in_flight.clone()),
                    tcp_connections: prev
                        .map_or_else(Default::default, |p| p.tcp_connections.clone()),
                }),
            );
        }
        Self {
            config,
            clusters,
            reach: reach.clone(),
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

/// A bound listener: its name, address and what it serves. A listener whose key changes is
/// bound anew.
type ListenerKey = (String, SocketAddr, Serves);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Serves {
    Http,
    Tcp(String),
    Transparent,
}

/// How the data plane reaches what is not local, and its limits on downstream clients.
#[derive(Debug, Clone)]
pub struct DataplaneOptions {
    /// The local east-west gateway: endpoints of other clusters are reached through it. Without
    /// one, an attempt on such an endpoint fails (and is retried elsewhere).
    pub gateway: Option<Arc<Gateway>>,
    /// The proxy's workload certificate: endpoints behind sidecars are reached with mutual TLS
    /// presenting it. Without one, an attempt on such an endpoint fails (and is retried
    /// elsewhere); a control plane does not send them to a proxy that did not announce one.
    pub workload_tls: Option<Arc<TlsSource>>,
    /// An HTTP/1 client must send a request's whole header within this time, or its connection
    /// is closed (slowloris).
    pub header_read_timeout: Duration,
    /// The largest request header accepted: HTTP/1 answers 431 beyond it, HTTP/2 refuses the
    /// stream.
    pub max_request_headers: usize,
}

impl Default for DataplaneOptions {
    fn default() -> Self {
        Self {
            gateway: None,
            workload_tls: None,
            header_read_timeout: Duration::from_secs(10),
            max_request_headers: 64 * 1024,
        }
    }
}

/// The running data plane.
pub struct Dataplane {
    current: watch::Receiver<Arc<Compiled>>,
    task: tokio::task::JoinHandle<()>,
    extra: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.task.abort();
        for t in &self.extra {
            t.abort();
        }
    }
}

impl Dataplane {
    /// Follow `configs` (the xDS client's published configs): compile each, bind and unbind
    /// listeners.
    pub fn start(configs: watch::Receiver<Arc<ProxyConfig>>) -> Self {
        Self::start_with(configs, DataplaneOptions::default())
    }

    /// [`Dataplane::start`] with options (the gateway that reaches other clusters).
    pub fn start_with(
        mut configs: watch::Receiver<Arc<ProxyConfig>>,
        options: DataplaneOptions,
    ) -> Self {
        let reach = Reach {
            gateway: options.gateway.clone(),
            tls: options.workload_tls.clone(),
        };
        let mut server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        server
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(options.header_read_timeout)
            .max_buf_size(options.max_request_headers.max(8192))
            .http2()
            .max_header_list_size(u32::try_from(options.max_request_headers).unwrap_or(u32::MAX));
        let first = Arc::new(Compiled::new(
            configs.borrow_and_update().clone(),
            None,
            &reach,
        ));
        let (tx, current) = watch::channel(first);
        let rx = current.clone();
        let task = tokio::spawn(async move {
            let mut listeners: HashMap<ListenerKey, tokio::task::JoinHandle<()>> = HashMap::new();
            loop {
                let compiled = tx.borrow().clone();
                // Listeners: bind the new, stop the gone (their connections finish).
                let want: HashMap<ListenerKey, ()> = compiled
                    .config
                    .listeners
                    .values()
                    .map(|l| {
                        let serves = match &l.kind {
                            ListenerKind::Tcp { cluster, .. } => Serves::Tcp(cluster.clone()),
                            ListenerKind::Http { .. } => Serves::Http,
                            ListenerKind::Transparent { .. } => Serves::Transparent,
                        };
                        ((l.name.clone(), l.address, serves), ())
                    })
                    .collect();
                listeners.retain(|k, task| {
                    let keep = want.contains_key(k);
                    if !keep {
                        task.abort();
                    }
                    keep
                });
                for key in want.keys() {
                    if listeners.contains_key(key) {
                        continue;
                    }
                    match TcpListener::bind(key.1).await {
                        Ok(l) => {
                            tracing::info!(listener = %key.0, address = %key.1, "listening");
                            let task = match &key.2 {
                                Serves::Http => tokio::spawn(serve(
                                    l,
                                    key.0.clone(),
                                    rx.clone(),
                                    server.clone(),
                                )),
                                Serves::Tcp(cluster) => tokio::spawn(crate::tcp::serve(
                                    l,
                                    key.0.clone(),
                                    cluster.clone(),
                                    rx.clone(),
                                )),
                                Serves::Transparent => tokio::spawn(crate::transparent::serve(
                                    l,
                                    key.0.clone(),
                                    rx.clone(),
                                    server.clone(),
                                )),
                            };
                            listeners.insert(key.clone(), task);
                        }
                        Err(e) => {
                            tracing::error!(listener = %key.0, address = %key.1, error = %e,
                                "cannot bind the listener");
                        }
                    }
                }
                if configs.changed().await.is_err() {
                    break;
                }
                let next = configs.borrow_and_update().clone();
                let compiled = Arc::new(Compiled::new(next, Some(&tx.borrow()), &reach));
                tx.send_replace(compiled);
            }
            for (_, t) in listeners {
                t.abort();
            }
        });
        Self {
            current,
            task,
            extra: Vec::new(),
        }
    }

    /// Serve an inbound listener: mutual TLS from workloads of the federation, terminated with
    /// `tls`, then plaintext to `app` (see [`crate::inbound`]).
    pub fn serve_inbound(
        &mut self,
        listener: TcpListener,
        app: SocketAddr,
        tls: Arc<crate::tls::TlsSource>,
    ) {
        self.extra
            .push(tokio::spawn(crate::inbound::serve(listener, app, tls)));
    }

    /// The compiled config requests use now.
    pub fn current(&self) -> Arc<Compiled> {
        self.current.borrow().clone()
    }

    /// Follow the compiled configs (for the admin endpoint).
    pub fn watch(&self) -> watch::Receiver<Arc<Compiled>> {
        self.current.clone()
    }
}

async fn serve(
    listener: TcpListener,
    name: String,
    current: watch::Receiver<Arc<Compiled>>,
    server: hyper_util::server::conn::auto::Builder<TokioExecutor>,
) {
    let name: Arc<str> = name.into();
    loop {
        let (stream, peer) = accept(&listener, &name).await;
        tokio::spawn(serve_connection(
            stream,
            peer,
            name.clone(),
            current.clone(),
            server.clone(),
        ));
    }
}

/// Serve one downstream HTTP connection with the routes of listener `name`.
pub(crate) async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    name: Arc<str>,
    current: watch::Receiver<Arc<Compiled>>,
    builder: hyper_util::server::conn::auto::Builder<TokioExecutor>,
) {
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let compiled = current.borrow().clone();
        let name = name.clone();
        async move { Ok::<_, Infallible>(handle(&compiled, &name, req).await) }
    });
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
        .await
    {
        tracing::debug!(%peer, error = %e, "downstream connection ended with an error");
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

fn local_reply(status: StatusCode, reason: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{reason}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(reason) {
        r.headers_mut().insert("x-strait-reason", v);
    }
    r
}

/// Hop-by-hop headers, never forwarded.
const HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
];

pub(crate) fn table<'a>(compiled: &'a Compiled, listener: &str) -> Option<&'a RouteTable> {
    let l = compiled.config.listeners.get(listener)?;
    match &l.kind {
        ListenerKind::Http {
            routes: RouteSource::Rds(n),
        } => compiled.config.routes.get(n).map(|t| &**t),
        ListenerKind::Http {
            routes: RouteSource::Inline(t),
        } => Some(t),
        ListenerKind::Tcp { .. } | ListenerKind::Transparent { .. } => None,
    }
}

fn pick_cluster(route: &RouteEntry, rng: &mut dyn Random) -> String {
    match &route.target {
        RouteTarget::Cluster(c) => c.clone(),
        RouteTarget::Weighted { clusters, total } => {
            let mut x = rng.below(u64::from(*total));
            for (c, w) in clusters {
                if x < u64::from(*w) {
                    return c.clone();
                }
                x -= u64::from(*w);
            }
            clusters.last().map(|(c, _)| c.clone()).unwrap_or_default()
        }
    }
}

impl Compiled {
    /// The local gateway, if the proxy has one.
    pub fn gateway(&self) -> Option<&Arc<Gateway>> {
        self.reach.gateway.as_ref()
    }

    /// The proxy's workload certificate, if it has one.
    pub fn workload_tls(&self) -> Option<&Arc<TlsSource>> {
        self.reach.tls.as_ref()
    }
}

impl ClusterRuntime {
    /// The pool that reaches `host`: its transport-socket match's, or the cluster's.
    fn client(&self, host: &Host) -> &Client<Connector, Body> {
        host.socket
            .and_then(|i| self.tls_clients.get(i))
            .and_then(Option::as_ref)
            .unwrap_or(&self.client)
    }

    /// TCP connections open now, and a guard that counts one more while it lives — or `None`
    /// when the cluster is at `max_connections`.
    pub(crate) fn tcp_slot(&self) -> Option<Decrement> {
        let n = self.tcp_connections.fetch_add(1, Relaxed);
        let guard = Decrement(self.tcp_connections.clone());
        (n < u64::from(self.config.thresholds.max_connections)).then_some(guard)
    }
}

/// Handle one downstream request.
pub async fn handle(compiled: &Compiled, listener: &str, req: Request<Incoming>) -> Response<Body> {
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
    let Some(table) = table(compiled, listener) else {
        return local_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "listener has no routes yet",
        );
    };
    let Some(route) = table.route(&host, &path, req.headers()) else {
        return local_reply(StatusCode::NOT_FOUND, &format!("no route for {host}{path}"));
    };
    let mut rng = ThreadRandom;
    let cluster_name = pick_cluster(route, &mut rng);
    let Some(cluster) = compiled.clusters.get(&cluster_name) else {
        return local_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("cluster {cluster_name} has no endpoints"),
        );
    };
    // Circuit breaker.
    if cluster.in_flight.load(Relaxed) >= u64::from(cluster.config.thresholds.max_requests) {
        return local_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("cluster {cluster_name} is at max_requests"),
        );
    }
    cluster.in_flight.fetch_add(1, Relaxed);
    let _in_flight = Decrement(cluster.in_flight.clone());
    let deadline = route.timeout.map(|t| Instant::now() + t);
    if is_upgrade(&req) {
        return upgrade(cluster, &cluster_name, route, req, deadline).await;
    }

    let (parts, body) = req.into_parts();
    // A small, complete body can be replayed on a retry; anything else streams through once.
    let size = body.size_hint();
    let replay = route.retry.is_some()
        && size.upper().is_some_and(|u| u <= REPLAYABLE)
        && parts.headers.get(http::header::UPGRADE).is_none();
    let (mut stream_body, buffered) = if replay {
        match body.collect().await {
            Ok(b) => (None, Some(b.to_bytes())),
            Err(e) => {
                return local_reply(
                    StatusCode::BAD_REQUEST,
                    &format!("reading the request body: {e}"),
                );
            }
        }
    } else {
        (
            Some(body.map_err(|e| Box::new(e) as BoxError).boxed()),
            None,
        )
    };
    let max_attempts = 1 + route
        .retry
        .as_ref()
        .filter(|_| replay)
        .map_or(0, |r| r.num_retries);
    let mut tried = Tried::default();
    let mut last: Option<Response<Body>> = None;
    for attempt in 0..max_attempts {
        if attempt > 0
            && !cluster.config.thresholds.retry_allowed(
                cluster.in_flight.load(Relaxed),
                cluster.retries_in_flight.load(Relaxed),
            )
        {
            // The cluster's retry budget (or `max_retries`) is spent: answer with what we have.
            break;
        }
        let now = Instant::now();
        let policy = route.retry.as_ref();
        let Some(host) = tried.next(
            &cluster.balancer,
            &mut rng,
            now,
            policy.is_some_and(|p| p.other_priority),
            policy.is_some_and(|p| p.other_host),
        ) else {
            return local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("no healthy upstream in cluster {cluster_name}"),
            );
        };
        let body = match (&buffered, stream_body.take()) {
            (Some(b), _) => Full::new(b.clone()).map_err(|never| match never {}).boxed(),
            (None, Some(b)) => b,
            (None, None) => break,
        };
        let up = match upstream_request(&parts, &host, cluster.config.http2, body) {
            Ok(up) => up,
            Err(Failed::Tunnel(e)) => {
                last = Some(local_reply(StatusCode::SERVICE_UNAVAILABLE, &e));
                continue;
            }
            Err(Failed::Request(e)) => return local_reply(StatusCode::BAD_REQUEST, &e),
        };
        if attempt > 0 {
            cluster.retries_in_flight.fetch_add(1, Relaxed);
        }
        host.state.active.fetch_add(1, Relaxed);
        let per_try = policy.and_then(|p| p.per_try_timeout);
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let limit = match (per_try, remaining) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let mut up = up;
        let captured = capture_tunnel(&host, &mut up);
        let sent = cluster.client(&host).request(up);
        let result = match limit {
            Some(l) => tokio::time::timeout(l, sent).await.ok(),
            None => Some(sent.await),
        };
        retire_if_draining(captured);
        host.state.active.fetch_sub(1, Relaxed);
        if attempt > 0 {
            cluster.retries_in_flight.fetch_sub(1, Relaxed);
        }
        let now = Instant::now();
        let (outcome, retry_it, reply) = match result {
            None => {
                // A per-try timeout (not the route's deadline) is retried like a 504, as Envoy
                // does under `5xx` and `gateway-error`.
                let on = policy.map(|p| p.on).unwrap_or_default();
                let per_try_fired = per_try.is_some_and(|p| remaining.is_none_or(|r| p < r));
                (
                    Outcome::GatewayError,
                    per_try_fired && (on.server_error || on.gateway_error),
                    local_reply(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout"),
                )
            }
            Some(Err(e)) => {
                let connect = e.is_connect();
                let on = policy.map(|p| p.on).unwrap_or_default();
                // A connect failure or a reset is a gateway error (and a 5xx) too.
                let retry_it = on.gateway_error
                    || on.server_error
                    || if connect {
                        on.connect_failure
                    } else {
                        on.reset
                    };
                (
                    Outcome::GatewayError,
                    retry_it,
                    local_reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &format!(
                            "upstream {}: {}",
                            if connect { "connect failure" } else { "reset" },
                            crate::error_chain(&e)
                        ),
                    ),
                )
            }
            Some(Ok(resp)) => {
                let status = resp.status();
                let code = status.as_u16();
                let gateway = matches!(code, 502..=504);
                let outcome = if gateway {
                    Outcome::GatewayError
                } else if status.is_server_error() {
                    Outcome::ServerError
                } else {
                    Outcome::Success
                };
                let on = policy.map(|p| p.on).unwrap_or_default();
                let retry_it = (on.server_error && status.is_server_error())
                    || (on.gateway_error && gateway)
                    || (on.retriable_status_codes
                        && policy.is_some_and(|p| p.retriable_status_codes.contains(&code)));
                let (mut rp, body) = resp.into_parts();
                for h in HOP {
                    rp.headers.remove(h);
                }
                (
                    outcome,
                    retry_it,
                    Response::from_parts(rp, body.map_err(|e| Box::new(e) as BoxError).boxed()),
                )
            }
        };
        if cluster.balancer.report(&host, outcome, now) {
            tracing::warn!(cluster = %cluster_name, upstream = ?host.upstream,
                "outlier detection ejected a host");
        }
        let out_of_time = deadline.is_some_and(|d| Instant::now() >= d);
        if !retry_it || out_of_time || attempt + 1 >= max_attempts {
            return reply;
        }
        last = Some(reply);
    }
    last.unwrap_or_else(|| local_reply(StatusCode::SERVICE_UNAVAILABLE, "no upstream answered"))
}

/// Why an upstream request could not be built.
enum Failed {
    /// The endpoint's tunnel name is unusable (503): try another endpoint.
    Tunnel(String),
    /// The request itself is unusable (400).
    Request(String),
}

/// The request to send to `host`: the downstream method, path and end-to-end headers.
/// For a request to an endpoint of another cluster: a handle on the pooled connection (a
/// tunnel) it goes out on.
fn capture_tunnel(
    host: &Host,
    up: &mut Request<Body>,
) -> Option<hyper_util::client::legacy::connect::CaptureConnection> {
    matches!(host.upstream, Upstream::Tunnel { .. })
        .then(|| hyper_util::client::legacy::connect::capture_connection(up))
}

/// A pooled tunnel whose gateway connection is draining (its gateway replica is shutting
/// down) is not reused after this request: the next goes through a new tunnel, via another
/// replica, and the old one ends.
fn retire_if_draining(captured: Option<hyper_util::client::legacy::connect::CaptureConnection>) {
    let Some(captured) = captured else {
        return;
    };
    if let Some(conn) = captured.connection_metadata().as_ref() {
        let mut extras = http::Extensions::new();
        conn.get_extras(&mut extras);
        if extras
            .get::<crate::tunnel::Draining>()
            .is_some_and(crate::tunnel::Draining::is_set)
        {
            conn.poison();
        }
    }
}

fn upstream_request(
    parts: &http::request::Parts,
    host: &Host,
    http2: bool,
    body: Body,
) -> Result<Request<Body>, Failed> {
    let authority = match &host.upstream {
        Upstream::Direct(a) => a.to_string(),
        Upstream::Tunnel {
            cluster: c,
            authority,
        } => tunnel_authority(c, authority).map_err(|e| Failed::Tunnel(e.to_string()))?,
    };
    let mut up = Request::new(body);
    *up.method_mut() = parts.method.clone();
    let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    *up.uri_mut() = Uri::builder()
        .scheme("http")
        .authority(authority.as_str())
        .path_and_query(pq)
        .build()
        .map_err(|e| Failed::Request(format!("request target: {e}")))?;
    copy_headers(&parts.headers, up.headers_mut());
    if !http2 && let Ok(v) = HeaderValue::from_str(&host_header(&host_of(parts), &host.upstream)) {
        up.headers_mut().insert(http::header::HOST, v);
    }
    Ok(up)
}

/// An HTTP/1.1 request asking to switch protocols (`Upgrade` named by `Connection`), e.g. a
/// WebSocket handshake.
fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() <= http::Version::HTTP_11
        && req.headers().contains_key(http::header::UPGRADE)
        && req
            .headers()
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Forward an upgrade request; when the upstream switches protocols (101), splice the two
/// upgraded connections together until either side closes. Connection failures are retried on
/// another host and priority (as the route allows); the handshake is bounded by the route's
/// deadline, the upgraded connection is not.
async fn upgrade(
    cluster: &ClusterRuntime,
    cluster_name: &str,
    route: &RouteEntry,
    mut req: Request<Incoming>,
    deadline: Option<Instant>,
) -> Response<Body> {
    if cluster.config.http2 {
        return local_reply(
            StatusCode::BAD_GATEWAY,
            &format!("cluster {cluster_name} speaks HTTP/2 upstream: upgrades need HTTP/1.1"),
        );
    }
    let downstream = hyper::upgrade::on(&mut req);
    let (parts, _) = req.into_parts();
    let mut rng = ThreadRandom;
    let attempts = 1 + route.retry.as_ref().map_or(0, |r| r.num_retries);
    let mut tried = Tried::default();
    let mut last = None;
    for _ in 0..attempts {
        let now = Instant::now();
        let Some(host) = tried.next(&cluster.balancer, &mut rng, now, true, true) else {
            break;
        };
        let body = Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed();
        let mut up = match upstream_request(&parts, &host, false, body) {
            Ok(up) => up,
            Err(Failed::Tunnel(e)) => {
                last = Some(local_reply(StatusCode::SERVICE_UNAVAILABLE, &e));
                continue;
            }
            Err(Failed::Request(e)) => return local_reply(StatusCode::BAD_REQUEST, &e),
        };
        // The upgrade is the point: pass it on.
        if let Some(u) = parts.headers.get(http::header::UPGRADE) {
            up.headers_mut().insert(http::header::UPGRADE, u.clone());
        }
        up.headers_mut().insert(
            http::header::CONNECTION,
            HeaderValue::from_static("upgrade"),
        );
        host.state.active.fetch_add(1, Relaxed);
        let sent = cluster.client(&host).request(up);
        let result = match deadline {
            Some(d) => tokio::time::timeout(d.saturating_duration_since(Instant::now()), sent)
                .await
                .ok(),
            None => Some(sent.await),
        };
        host.state.active.fetch_sub(1, Relaxed);
        let now = Instant::now();
        match result {
            None => {
                cluster.balancer.report(&host, Outcome::GatewayError, now);
                return local_reply(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout");
            }
            Some(Err(e)) => {
                cluster.balancer.report(&host, Outcome::GatewayError, now);
                let connect = e.is_connect();
                let reply = local_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!(
                        "upstream {}: {}",
                        if connect { "connect failure" } else { "reset" },
                        crate::error_chain(&e)
                    ),
                );
                if !connect {
                    return reply;
                }
                last = Some(reply);
            }
            Some(Ok(mut resp)) => {
                let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
                let outcome = if resp.status().is_server_error() {
                    Outcome::ServerError
                } else {
                    Outcome::Success
                };
                cluster.balancer.report(&host, outcome, now);
                if switched {
                    let upstream = hyper::upgrade::on(&mut resp);
                    tokio::spawn(splice(downstream, upstream));
                }
                let (mut rp, body) = resp.into_parts();
                for h in HOP {
                    if !(switched && (h == "upgrade" || h == "connection")) {
                        rp.headers.remove(h);
                    }
                }
                return Response::from_parts(rp, body.map_err(|e| Box::new(e) as BoxError).boxed());
            }
        }
    }
    last.unwrap_or_else(|| {
        local_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("no healthy upstream in cluster {cluster_name}"),
        )
    })
}

/// Copy both ways between the two sides of an upgraded connection until both are done.
async fn splice(downstream: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (d, u) = match tokio::try_join!(downstream, upstream) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!(error = %e, "an upgrade did not complete");
            return;
        }
    };
    let (mut d, mut u) = (TokioIo::new(d), TokioIo::new(u));
    if let Err(e) = tokio::io::copy_bidirectional(&mut d, &mut u).await {
        tracing::debug!(error = %e, "upgraded connection ended with an error");
    }
}

fn host_of(parts: &http::request::Parts) -> String {
    parts
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| parts.uri.authority().map(|a| a.to_string()))
        .unwrap_or_default()
}

fn host_header(requested: &str, upstream: &Upstream) -> String {
    match upstream {
        _ if !requested.is_empty() => requested.to_string(),
        Upstream::Direct(a) => a.to_string(),
        Upstream::Tunnel { authority, .. } => authority.clone(),
    }
}

fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    // Headers named by `Connection` are hop-by-hop too.
    let named: Vec<String> = from
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .collect();
    for (k, v) in from {
        let n = k.as_str();
        // `te: trailers` is end to end (gRPC needs it); every other TE is not.
        let te_trailers = n == "te" && v.as_bytes().eq_ignore_ascii_case(b"trailers");
        if (HOP.contains(&n) && !te_trailers) || named.iter().any(|x| x == n) || n == "host" {
            continue;
        }
        to.append(k.clone(), v.clone());
    }
}

pub(crate) struct Decrement(Arc<AtomicU64>);

impl Drop for Decrement {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}
