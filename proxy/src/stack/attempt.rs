//! The layers of one attempt on one host: [`Outlier`] reports its outcome, [`PerTryTimeout`]
//! bounds it, [`Hygiene`] builds the upstream request and cleans the response, [`Upstream`]
//! sends it through the cluster's connection pool.
//!
//! These three run on every attempt, so their futures are named types wrapping the inner one
//! ([`Reported`], [`PerTry`], [`Cleaned`]) rather than boxes: one allocation per layer and
//! attempt saved, the inner future not moved into a box.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use http::{HeaderMap, HeaderValue, Request, Uri};
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::CaptureConnection;
use pin_project_lite::pin_project;
use tower_service::Service;

use super::{Attempt, Attempted, Fut, HOP, Observed, Upstreamed, classify};
use crate::config::Upstream as Endpoint;
use crate::lb::Host;
use crate::runtime::{Body, BoxError, ClusterRuntime};
use crate::tunnel::tunnel_authority;

layer!(
    /// Reports every attempt's outcome (per [`classify`]) to its cluster's outlier detection,
    /// which may eject the host. HTTP attempts and TCP connection attempts alike.
    OutlierLayer,
    Outlier
);
layer!(
    /// Bounds an attempt by the route's per-try timeout and what is left of its deadline.
    PerTryTimeoutLayer,
    PerTryTimeout
);
layer!(
    /// Builds the upstream request (hop-by-hop headers dropped, `Host` and target set for the
    /// endpoint) and drops hop-by-hop headers from the response.
    HygieneLayer,
    Hygiene
);

/// What outlier detection needs of a request: its host and cluster.
pub trait OnHost {
    fn host(&self) -> &Arc<Host>;
    fn cluster(&self) -> &Arc<ClusterRuntime>;
}

/// What outlier detection needs of a result: what the upstream did (`None`: no upstream was
/// involved, nothing to report).
pub trait Observes {
    fn observed(&self) -> Option<Observed>;
    /// Whether what was observed is the host's doing (counted by outlier detection), not the
    /// path's to it (retried all the same).
    fn blames_host(&self) -> bool {
        true
    }
}

impl OnHost for Attempt {
    fn host(&self) -> &Arc<Host> {
        &self.host
    }
    fn cluster(&self) -> &Arc<ClusterRuntime> {
        &self.cluster
    }
}

impl Observes for Attempted {
    fn observed(&self) -> Option<Observed> {
        Attempted::observed(self)
    }
    fn blames_host(&self) -> bool {
        !matches!(self, Attempted::Failed { path: true, .. })
    }
}

impl<R, S> Service<R> for Outlier<S>
where
    R: OnHost,
    S: Service<R, Error = Infallible>,
    S::Response: Observes,
{
    type Response = S::Response;
    type Error = Infallible;
    type Future = Reported<S::Future>;

    always_ready!();

    fn call(&mut self, r: R) -> Self::Future {
        let (host, cluster) = (r.host().clone(), r.cluster().clone());
        Reported {
            attempt: self.inner.call(r),
            on: Some((host, cluster)),
        }
    }
}

pin_project! {
    /// [`Outlier`]'s future: the attempt, then its outcome reported to the host's cluster.
    pub struct Reported<F> {
        #[pin]
        attempt: F,
        on: Option<(Arc<Host>, Arc<ClusterRuntime>)>,
    }
}

impl<F, T> Future for Reported<F>
where
    F: Future<Output = Result<T, Infallible>>,
    T: Observes,
{
    type Output = Result<T, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.attempt.poll(cx));
        if let (Ok(result), Some((host, cluster))) = (&result, this.on.take())
            && let Some(observed) = result.observed()
            && result.blames_host()
        {
            let (outcome, _) = classify(observed, None);
            if cluster.balancer.report(&host, outcome, Instant::now()) {
                tracing::warn!(cluster = %cluster.config.name, upstream = ?host.upstream,
                    "outlier detection ejected a host");
            }
        }
        Poll::Ready(result)
    }
}

impl<S> Service<Attempt> for PerTryTimeout<S>
where
    S: Service<Attempt, Response = Attempted, Error = Infallible>,
{
    type Response = Attempted;
    type Error = Infallible;
    type Future = PerTry<S::Future>;

    always_ready!();

    fn call(&mut self, a: Attempt) -> Self::Future {
        let (per_try, remaining) = (a.per_try, a.remaining);
        let limit = match (per_try, remaining) {
            (Some(p), Some(r)) => Some(p.min(r)),
            (p, r) => p.or(r),
        };
        let attempt = self.inner.call(a);
        match limit {
            None => PerTry::Unbounded { attempt },
            Some(limit) => PerTry::Bounded {
                attempt: tokio::time::timeout(limit, attempt),
                // The per-try timeout fires if it is the shorter of the two.
                per_try: per_try.is_some_and(|p| remaining.is_none_or(|r| p < r)),
            },
        }
    }
}

pin_project! {
    /// [`PerTryTimeout`]'s future: the attempt, bounded when a limit applies.
    #[project = PerTryProjection]
    pub enum PerTry<F> {
        Unbounded { #[pin] attempt: F },
        Bounded { #[pin] attempt: tokio::time::Timeout<F>, per_try: bool },
    }
}

impl<F> Future for PerTry<F>
where
    F: Future<Output = Result<Attempted, Infallible>>,
{
    type Output = Result<Attempted, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            PerTryProjection::Unbounded { attempt } => attempt.poll(cx),
            PerTryProjection::Bounded { attempt, per_try } => {
                Poll::Ready(match ready!(attempt.poll(cx)) {
                    Ok(result) => result,
                    Err(_) => Ok(Attempted::TimedOut { per_try: *per_try }),
                })
            }
        }
    }
}

impl<S> Service<Attempt> for Hygiene<S>
where
    S: Service<Upstreamed, Response = Attempted, Error = Infallible>,
{
    type Response = Attempted;
    type Error = Infallible;
    type Future = Cleaned<S::Future>;

    always_ready!();

    fn call(&mut self, a: Attempt) -> Self::Future {
        let req = match upstream_request(&a.parts, &a.host, a.cluster.config.http2, a.body) {
            Built::Request(r) => r,
            Built::Unusable(why) => {
                return Cleaned::Answered {
                    answer: Some(Attempted::Unusable(why)),
                };
            }
            Built::Rejected(why) => {
                let reply = super::local_reply(http::StatusCode::BAD_REQUEST, &why);
                return Cleaned::Answered {
                    answer: Some(Attempted::Rejected(reply)),
                };
            }
        };
        Cleaned::Sent {
            attempt: self.inner.call(Upstreamed {
                req,
                host: a.host,
                cluster: a.cluster,
            }),
        }
    }
}

pin_project! {
    /// [`Hygiene`]'s future: the upstream's response without hop-by-hop headers, or the answer
    /// given when no upstream request could be built.
    #[project = CleanedProjection]
    pub enum Cleaned<F> {
        Answered { answer: Option<Attempted> },
        Sent { #[pin] attempt: F },
    }
}

impl<F> Future for Cleaned<F>
where
    F: Future<Output = Result<Attempted, Infallible>>,
{
    type Output = Result<Attempted, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            // Polled again after it completed: futures must not be, and this one only ever
            // answers once; a second poll sees the same kind of answer.
            CleanedProjection::Answered { answer } => Poll::Ready(Ok(answer
                .take()
                .unwrap_or_else(|| Attempted::Unusable("polled after completion".into())))),
            CleanedProjection::Sent { attempt } => {
                Poll::Ready(Ok(match ready!(attempt.poll(cx))? {
                    Attempted::Response(mut r) => {
                        for h in HOP {
                            r.headers_mut().remove(h);
                        }
                        Attempted::Response(r)
                    }
                    other => other,
                }))
            }
        }
    }
}

/// The leaf: the request goes out through the cluster's connection pool for the host
/// (plaintext, mutual TLS to a sidecar, or a tunnel through the local gateway), counted as
/// active on the host while it waits for the response's head.
#[derive(Debug, Clone, Copy)]
pub struct Upstream;

impl Service<Upstreamed> for Upstream {
    type Response = Attempted;
    type Error = Infallible;
    type Future = Fut<Attempted>;

    always_ready!();

    fn call(&mut self, u: Upstreamed) -> Self::Future {
        Box::pin(async move {
            let Upstreamed {
                mut req,
                host,
                cluster,
            } = u;
            let _active = host.state.active_guard();
            let captured = capture_tunnel(&host, &mut req);
            let result = cluster.client(&host).request(req).await;
            retire_if_draining(captured);
            Ok(match result {
                Ok(resp) => Attempted::Response(
                    resp.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed()),
                ),
                Err(e) => {
                    let connect = e.is_connect();
                    Attempted::Failed {
                        connect,
                        path: path_failure(&host, connect, &e),
                        reason: format!(
                            "upstream {}: {}",
                            if connect { "connect failure" } else { "reset" },
                            crate::error_chain(&e)
                        ),
                    }
                }
            })
        })
    }
}

/// Whether a failed request to `host` failed on the path to it rather than at it: for an
/// endpoint of another cluster, a reset inside its tunnel (the link or a gateway may have
/// dropped it; the endpoint's own failures come back as refusals or statuses) or a tunnel that
/// did not open for a reason that is not the endpoint's (the local gateway unreachable, the link
/// down, the remote gateway's trouble).
pub(crate) fn path_failure(
    host: &Host,
    connect: bool,
    e: &(dyn std::error::Error + 'static),
) -> bool {
    matches!(host.upstream, Endpoint::Tunnel { .. })
        && (!connect || crate::tunnel::TunnelError::find(e).is_some_and(|t| !t.blames_endpoint()))
}

/// For a request to an endpoint of another cluster: a handle on the pooled connection (a
/// tunnel) it goes out on.
fn capture_tunnel(host: &Host, up: &mut Request<Body>) -> Option<CaptureConnection> {
    matches!(host.upstream, Endpoint::Tunnel { .. })
        .then(|| hyper_util::client::legacy::connect::capture_connection(up))
}

/// A pooled tunnel whose gateway connection is draining (its gateway replica is shutting
/// down) is not reused after this request: the next goes through a new tunnel, via another
/// replica, and the old one ends.
fn retire_if_draining(captured: Option<CaptureConnection>) {
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

/// An upstream request, or why there is none.
#[expect(
    clippy::large_enum_variant,
    reason = "made once per attempt and taken apart at once"
)]
pub(crate) enum Built {
    Request(Request<Body>),
    /// The endpoint's tunnel name is unusable (503): try another endpoint.
    Unusable(String),
    /// The request itself is unusable (400).
    Rejected(String),
}

/// The request to send to `host`: the downstream method, path and end-to-end headers, `Host`
/// kept (HTTP/1.1) or the endpoint's, the target the endpoint (or its tunnel).
pub(crate) fn upstream_request(
    parts: &http::request::Parts,
    host: &Host,
    http2: bool,
    body: Body,
) -> Built {
    let authority = match &host.upstream {
        Endpoint::Direct(a) => a.to_string(),
        Endpoint::Tunnel {
            cluster: c,
            authority,
            endpoint,
        } => match tunnel_authority(c, authority, *endpoint) {
            Ok(a) => a,
            Err(e) => return Built::Unusable(e.to_string()),
        },
    };
    let mut up = Request::new(body);
    *up.method_mut() = parts.method.clone();
    let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    *up.uri_mut() = match Uri::builder()
        .scheme("http")
        .authority(authority.as_str())
        .path_and_query(pq)
        .build()
    {
        Ok(u) => u,
        Err(e) => return Built::Rejected(format!("request target: {e}")),
    };
    copy_headers(&parts.headers, up.headers_mut());
    let requested = super::requested_host(&parts.headers, &parts.uri);
    if !http2 && let Ok(v) = HeaderValue::from_str(&host_header(requested, &host.upstream)) {
        up.headers_mut().insert(http::header::HOST, v);
    }
    Built::Request(up)
}

fn host_header(requested: &str, upstream: &Endpoint) -> String {
    match upstream {
        _ if !requested.is_empty() => requested.to_string(),
        Endpoint::Direct(a) => a.to_string(),
        Endpoint::Tunnel { authority, .. } => authority.clone(),
    }
}

/// End-to-end headers only: hop-by-hop headers, those named by `Connection`, and `Host` are
/// not copied; `te: trailers` is (gRPC needs it).
fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    let named: Vec<String> = from
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .collect();
    for (k, v) in from {
        let n = k.as_str();
        let te_trailers = n == "te" && v.as_bytes().eq_ignore_ascii_case(b"trailers");
        if (HOP.contains(&n) && !te_trailers) || named.iter().any(|x| x == n) || n == "host" {
            continue;
        }
        to.append(k.clone(), v.clone());
    }
}
