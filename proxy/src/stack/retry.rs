//! Retries: [`Replay`] keeps a small complete request body so it can be sent again, [`Retry`]
//! makes one attempt after another.
//!
//! Each attempt goes to a host from the cluster's balancer, one not tried yet where the
//! policy says `other_host`, in a priority not tried yet where it says `previous_priorities`.
//! A retry takes a permit of the cluster's retry budget (or `max_retries`), atomically, for
//! its duration; none left: the last answer stands. [`classify`] decides whether an answer is
//! retried; the route's deadline ends the request whatever is left.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Body as _;
use tower_service::Service;

use super::{
    Attempt, Attempted, Fut, Prepared, Replayable, Retry as Again, Routed, classify, local_reply,
};
use crate::config::RouteEntry;
use crate::lb::{ThreadRandom, Tried};
use crate::runtime::Body;

/// Request bodies up to this size are buffered so a retry can send them again.
pub const REPLAYABLE: u64 = 64 * 1024;

/// The default [`RouteEntry::response_buffer`](crate::config::RouteEntry): responses of at most
/// this many bytes to an idempotent request are held until complete, so that a body cut on the
/// way (a link failure) is retried instead of reaching the client broken.
pub const RESPONSE_BUFFER: u64 = 64 * 1024;

layer!(
    /// Buffers a request body that a retry may need to send again: the route retries, and the
    /// body is complete and at most [`REPLAYABLE`] bytes. Anything else streams through on one
    /// attempt.
    ReplayLayer,
    Replay
);

impl<S> Service<Routed> for Replay<S>
where
    S: Service<
            Prepared,
            Response = Response<Body>,
            Error = Infallible,
            Future = Fut<Response<Body>>,
        > + Clone
        + Send
        + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Fut<Response<Body>>;

    always_ready!();

    fn call(&mut self, r: Routed) -> Self::Future {
        let Routed {
            req,
            route,
            cluster,
            deadline,
            permit,
        } = r;
        let (parts, body) = req.into_parts();
        let replay = route.retry.is_some()
            && body.size_hint().upper().is_some_and(|u| u <= REPLAYABLE)
            && parts.headers.get(http::header::UPGRADE).is_none();
        let prepared = move |body| Prepared {
            parts: Arc::new(parts),
            body,
            route,
            cluster,
            deadline,
            permit,
        };
        if !replay {
            return self.inner.call(prepared(Replayable::Once(Some(body))));
        }
        // Nothing to read (a GET, most often): replayable as it is, with no future of our own.
        if body.is_end_stream() {
            return self
                .inner
                .call(prepared(Replayable::Buffered(bytes::Bytes::new())));
        }
        let mut inner = self.inner.clone();
        Box::pin(async move {
            match body.collect().await {
                Ok(b) => {
                    inner
                        .call(prepared(Replayable::Buffered(b.to_bytes())))
                        .await
                }
                Err(e) => Ok(local_reply(
                    StatusCode::BAD_REQUEST,
                    &format!("reading the request body: {e}"),
                )),
            }
        })
    }
}

layer!(
    /// Attempts until one is not to be retried, the attempts or the budget are spent, or the
    /// deadline passed.
    RetryLayer,
    Retry
);

impl<S> Service<Prepared> for Retry<S>
where
    S: Service<Attempt, Response = Attempted, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Fut<Response<Body>>;

    always_ready!();

    fn call(&mut self, p: Prepared) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move { Ok(attempts(inner, p).await) })
    }
}

/// Whether the response `r` to the request `parts` on `route` is held until complete: the
/// request is idempotent (GET, HEAD, OPTIONS, or the route says so), not an upgrade, and the
/// response says how long it is (a `content-length`, or a body known to be empty) and that is
/// at most the route's buffer. A response of unknown length (chunked: maybe a stream of events)
/// or a larger one goes through as it comes.
fn holds(parts: &http::request::Parts, route: &RouteEntry, r: &Response<Body>) -> bool {
    use http::Method;
    let idempotent =
        matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS) || route.idempotent;
    idempotent
        && route.response_buffer > 0
        && r.status() != StatusCode::SWITCHING_PROTOCOLS
        && parts.headers.get(http::header::UPGRADE).is_none()
        && r.body()
            .size_hint()
            .exact()
            .is_some_and(|n| n <= route.response_buffer)
}

/// Read the whole body of `r` (its length is known and small, [`holds`]): the response with
/// the body complete, or, when the body fails on the way, a failed attempt (a reset) that the
/// retry policy may send elsewhere. Bounded by the route's deadline.
async fn hold(r: Response<Body>, host: &crate::lb::Host, deadline: Option<Instant>) -> Attempted {
    let (parts, body) = r.into_parts();
    let read = body.collect();
    let collected = match deadline {
        Some(d) => match tokio::time::timeout_at(d.into(), read).await {
            Ok(r) => r,
            Err(_) => return Attempted::TimedOut { per_try: false },
        },
        None => read.await,
    };
    match collected {
        Ok(c) => Attempted::Response(Response::from_parts(
            parts,
            c.map_err(|never| match never {}).boxed(),
        )),
        Err(e) => Attempted::Failed {
            connect: false,
            // Cut inside a tunnel: the path's failure (see `attempt::path_failure`).
            path: matches!(host.upstream, crate::config::Upstream::Tunnel { .. }),
            reason: format!(
                "upstream reset: the response body was cut ({}); held, not sent",
                crate::error_chain(e.as_ref())
            ),
        },
    }
}

async fn attempts<S>(mut inner: S, p: Prepared) -> Response<Body>
where
    S: Service<Attempt, Response = Attempted, Error = Infallible>,
{
    let Prepared {
        parts,
        mut body,
        route,
        cluster,
        deadline,
        permit: _permit,
    } = p;
    let cluster_name = cluster.config.name.as_str();
    let policy = route.retry.as_ref();
    let max_attempts = match &body {
        Replayable::Buffered(_) => 1 + policy.map_or(0, |r| r.num_retries),
        Replayable::Once(_) => 1,
    };
    let mut rng = ThreadRandom;
    let mut tried = Tried::default();
    let mut last: Option<Response<Body>> = None;
    for attempt in 0..max_attempts {
        // A retry holds a permit of the cluster's retry budget while it runs.
        let retry_permit = if attempt > 0 {
            let thresholds = &cluster.config.thresholds;
            let requests = cluster.requests.in_use();
            match cluster
                .retries
                .try_acquire_if(|retries| thresholds.retry_allowed(requests, retries))
            {
                Some(p) => Some(p),
                // The budget (or `max_retries`) is spent: answer with what we have.
                None => break,
            }
        } else {
            None
        };
        let Some(host) = tried.next(
            &cluster.balancer,
            &mut rng,
            Instant::now(),
            policy.is_some_and(|p| p.other_priority),
            policy.is_some_and(|p| p.other_host),
        ) else {
            return local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("no healthy upstream in cluster {cluster_name}"),
            );
        };
        let attempt_body = match &mut body {
            Replayable::Buffered(b) => Full::new(b.clone()).map_err(|never| match never {}).boxed(),
            Replayable::Once(b) => match b.take() {
                Some(b) => b,
                None => break,
            },
        };
        let this_host = host.clone();
        let result = match inner
            .call(Attempt {
                parts: parts.clone(),
                body: attempt_body,
                host,
                cluster: cluster.clone(),
                per_try: policy.and_then(|p| p.per_try_timeout),
                remaining: deadline.map(|d| d.saturating_duration_since(Instant::now())),
            })
            .await
        {
            Ok(r) => r,
            Err(never) => match never {},
        };
        drop(retry_permit);
        // In-flight protection: an idempotent request's small response is held until it is
        // complete while another attempt is possible, so a body cut on the way is retried.
        let result = match result {
            Attempted::Response(r)
                if attempt + 1 < max_attempts
                    && policy.is_some_and(|p| p.on.reset || p.on.gateway_error)
                    && holds(&parts, &route, &r) =>
            {
                hold(r, &this_host, deadline).await
            }
            other => other,
        };
        let again = match &result {
            // Nothing was sent: another endpoint may do.
            Attempted::Unusable(_) => Again::Yes,
            Attempted::Rejected(_) => return result.into_response(),
            other => match other.observed() {
                Some(o) => classify(o, policy).1,
                None => Again::No,
            },
        };
        let reply = result.into_response();
        let out_of_time = deadline.is_some_and(|d| Instant::now() >= d);
        if again == Again::No || out_of_time || attempt + 1 >= max_attempts {
            return reply;
        }
        last = Some(reply);
    }
    last.unwrap_or_else(|| local_reply(StatusCode::SERVICE_UNAVAILABLE, "no upstream answered"))
}
