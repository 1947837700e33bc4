//! The sidecar's HTTP request path, as a stack of layers (tower [`Service`]s) read top-down in
//! the order a request meets them. [`journey`] assembles it, in one place:
//!
//! | layer | request in | what it does |
//! | --- | --- | --- |
//! | [`route::Route`] | [`Downstream`] | virtual host and route for `Host`, path and headers; the cluster (weighted); the route's deadline. No route: 404; no cluster: 503 |
//! | *the slot* | [`Routed`] | authorization, tracing and request metrics, fault injection, rate limiting go here (see below) |
//! | [`breaker::CircuitBreaker`] | [`Routed`] | a permit of the cluster's `max_requests`, taken atomically, held until the response's head; none left: 503 |
//! | [`upgrade::Upgrade`] | [`Routed`] | an HTTP/1.1 upgrade (WebSocket) leaves the stack here: its own attempts, then the two connections spliced |
//! | [`retry::Replay`] | [`Routed`] | a small complete body (≤ 64 KiB) is buffered when the route retries, so it can be sent again |
//! | [`retry::Retry`] | [`Prepared`] | one attempt after another: a host not tried (another priority, as the policy says), the retry budget as a permit, [`classify()`] to decide, the route's deadline |
//! | [`attempt::Outlier`] | [`Attempt`] | every attempt's outcome reported to the cluster's outlier detection |
//! | [`attempt::PerTryTimeout`] | [`Attempt`] | the attempt bounded by the per-try timeout and what is left of the deadline |
//! | [`attempt::Hygiene`] | [`Attempt`] | the upstream request: hop-by-hop headers dropped, `Host` and target set for the endpoint; hop-by-hop headers dropped from the response |
//! | [`attempt::Upstream`] | [`Upstreamed`] | the leaf: the host's active count, the cluster's connection pool (direct, mTLS to a sidecar, or a tunnel through the gateway), a draining tunnel retired |
//!
//! **The slot.** Layers that decide on the whole request once it is routed — authorization
//! (who may call this route), tracing and request metrics (they see the final response and its
//! flags), fault injection and rate limiting (they answer before any upstream is touched) —
//! go between [`route::Route`] and [`breaker::CircuitBreaker`], where [`Routed`] carries the
//! route, the cluster and the deadline. A layer that must see every attempt (per-attempt
//! spans) goes between [`retry::Retry`] and [`attempt::Outlier`].
//!
//! Every layer is always ready (`poll_ready` never waits: limits answer at once with a local
//! reply, as Envoy's circuit breakers do) and never fails (`Error = Infallible`): errors are
//! answered with a status and a reason (`x-strait-reason`).

/// A layer (a unit struct) and its service (the inner service wrapped): `layer!(Layer, Service)`.
macro_rules! layer {
    ($(#[$doc:meta])* $layer:ident, $service:ident) => {
        #[derive(Debug, Clone, Copy)]
        pub struct $layer;

        impl<S> tower::Layer<S> for $layer {
            type Service = $service<S>;
            fn layer(&self, inner: S) -> $service<S> {
                $service { inner }
            }
        }

        $(#[$doc])*
        #[derive(Debug, Clone)]
        pub struct $service<S> {
            inner: S,
        }
    };
}

/// `poll_ready` of a service that is always ready: limits answer at once, they never wait.
macro_rules! always_ready {
    () => {
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), std::convert::Infallible>> {
            std::task::Poll::Ready(Ok(()))
        }
    };
}
pub(crate) use always_ready;

pub mod attempt;
pub mod breaker;
pub mod classify;
pub mod retry;
pub mod route;
pub mod upgrade;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tower::ServiceBuilder;
use tower::layer::util::{Identity, Stack};
use tower_service::Service;

use crate::config::RouteEntry;
use crate::lb::Host;
use crate::runtime::{Body, BoxError, ClusterRuntime, Compiled, Permit};

pub use classify::{Observed, Retry, classify};

/// A layer's future: boxed, `'static`, never failing.
pub type Fut<T> = Pin<Box<dyn Future<Output = Result<T, Infallible>> + Send>>;

/// A request as it arrives on a listener, with the compiled config of that moment.
pub struct Downstream {
    pub req: Request<Body>,
    pub compiled: Arc<Compiled>,
    pub listener: Arc<str>,
}

/// A request with its route and cluster.
pub struct Routed {
    pub req: Request<Body>,
    pub route: Arc<RouteEntry>,
    pub cluster: Arc<ClusterRuntime>,
    /// The route's deadline for the whole request, retries included.
    pub deadline: Option<Instant>,
    /// The circuit breaker's permit, held until the response's head.
    pub permit: Option<Permit>,
}

/// The request's body, as attempts can use it.
pub enum Replayable {
    /// Buffered: every attempt sends it.
    Buffered(Bytes),
    /// Streamed through: one attempt only.
    Once(Option<Body>),
}

/// A routed request ready for attempts.
pub struct Prepared {
    pub parts: Arc<http::request::Parts>,
    pub body: Replayable,
    pub route: Arc<RouteEntry>,
    pub cluster: Arc<ClusterRuntime>,
    pub deadline: Option<Instant>,
    pub permit: Option<Permit>,
}

/// One attempt on one host.
pub struct Attempt {
    pub parts: Arc<http::request::Parts>,
    pub body: Body,
    pub host: Arc<Host>,
    pub cluster: Arc<ClusterRuntime>,
    /// The route's per-try timeout.
    pub per_try: Option<Duration>,
    /// What is left of the route's deadline when the attempt starts.
    pub remaining: Option<Duration>,
}

/// An attempt's upstream request, for the leaf.
pub struct Upstreamed {
    pub req: Request<Body>,
    pub host: Arc<Host>,
    pub cluster: Arc<ClusterRuntime>,
}

/// What an attempt gave.
pub enum Attempted {
    /// The upstream answered (any status).
    Response(Response<Body>),
    /// The per-try timeout (`per_try: true`) or the route's deadline fired.
    TimedOut { per_try: bool },
    /// No connection (`connect: true`), or the request or its connection was reset. `path`:
    /// the failure is the path's to an endpoint of another cluster (the local gateway, a link,
    /// a reset inside a tunnel), not the endpoint's: retried, but not counted by outlier
    /// detection.
    Failed {
        connect: bool,
        reason: String,
        path: bool,
    },
    /// The endpoint cannot be used (its tunnel name is unusable): nothing was sent; another
    /// endpoint may be tried.
    Unusable(String),
    /// The request itself cannot be sent anywhere: answered at once.
    Rejected(Response<Body>),
}

impl Attempted {
    /// What the upstream did, for outlier detection and retries (`None`: no upstream was
    /// involved).
    pub fn observed(&self) -> Option<Observed> {
        match self {
            Attempted::Response(r) => Some(Observed::Status(r.status())),
            Attempted::TimedOut { per_try } => Some(Observed::Timeout { per_try: *per_try }),
            Attempted::Failed { connect: true, .. } => Some(Observed::ConnectFailure),
            Attempted::Failed { connect: false, .. } => Some(Observed::Reset),
            Attempted::Unusable(_) | Attempted::Rejected(_) => None,
        }
    }

    /// The response the client gets if this attempt is the last.
    pub fn into_response(self) -> Response<Body> {
        match self {
            Attempted::Response(r) | Attempted::Rejected(r) => r,
            Attempted::TimedOut { .. } => {
                local_reply(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout")
            }
            Attempted::Failed { reason, .. } | Attempted::Unusable(reason) => {
                local_reply(StatusCode::SERVICE_UNAVAILABLE, &reason)
            }
        }
    }
}

/// The layers of the request path, outermost first.
pub type Layers = Stack<
    attempt::HygieneLayer,
    Stack<
        attempt::PerTryTimeoutLayer,
        Stack<
            attempt::OutlierLayer,
            Stack<
                retry::RetryLayer,
                Stack<
                    retry::ReplayLayer,
                    Stack<
                        upgrade::UpgradeLayer,
                        Stack<breaker::CircuitBreakerLayer, Stack<route::RouteLayer, Identity>>,
                    >,
                >,
            >,
        >,
    >,
>;

/// The request's journey, top-down.
pub fn journey() -> ServiceBuilder<Layers> {
    ServiceBuilder::new()
        .layer(route::RouteLayer)
        // The slot: authorization, tracing and request metrics, fault injection and rate
        // limiting go here (`Service<Routed>` layers).
        .layer(breaker::CircuitBreakerLayer)
        .layer(upgrade::UpgradeLayer)
        .layer(retry::ReplayLayer)
        .layer(retry::RetryLayer)
        // Per-attempt layers (`Service<Attempt>`).
        .layer(attempt::OutlierLayer)
        .layer(attempt::PerTryTimeoutLayer)
        .layer(attempt::HygieneLayer)
}

/// The whole request path over `leaf` (the upstream connection pools in production, a fake
/// upstream in tests).
pub fn stack<L>(leaf: L) -> <Layers as tower::Layer<L>>::Service
where
    Layers: tower::Layer<L>,
{
    journey().service(leaf)
}

/// The request path the data plane serves with.
pub type Served = <Layers as tower::Layer<attempt::Upstream>>::Service;

/// Serve one downstream HTTP connection with the routes of listener `name`.
pub(crate) async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    name: Arc<str>,
    current: watch::Receiver<Arc<Compiled>>,
    builder: hyper_util::server::conn::auto::Builder<TokioExecutor>,
) {
    let path: Served = stack(attempt::Upstream);
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        // The config of the moment the request arrives: an update never disturbs it.
        let compiled = current.borrow().clone();
        let req = req.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed());
        path.clone().call(Downstream {
            req,
            compiled,
            listener: name.clone(),
        })
    });
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
        .await
    {
        tracing::debug!(%peer, error = %e, "downstream connection ended with an error");
    }
}

/// The host a request asked for: its `Host` header, or the authority of its target (HTTP/2),
/// or empty.
pub(crate) fn requested_host<'a>(headers: &'a http::HeaderMap, uri: &'a http::Uri) -> &'a str {
    headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()))
        .unwrap_or_default()
}

/// A response made here, not upstream: `status`, and the reason in the body and in
/// `x-strait-reason`.
pub fn local_reply(status: StatusCode, reason: &str) -> Response<Body> {
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
pub(crate) const HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
];

#[cfg(test)]
mod tests;
