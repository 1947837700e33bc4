//! Upgrades (WebSockets): an HTTP/1.1 request asking to switch protocols leaves the stack here.
//! It is passed on to a host (connection failures tried on another host and priority, as the
//! route allows; the handshake bounded by the route's deadline, the upgraded connection not);
//! on 101 the two upgraded connections are spliced together until either side closes. Every
//! other request goes on down the stack.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tower_service::Service;

use super::attempt::{Built, upstream_request};
use super::{Fut, HOP, Observed, Routed, classify, local_reply};
use crate::lb::{ThreadRandom, Tried};
use crate::runtime::{Body, BoxError};

layer!(UpgradeLayer, Upgrade);

impl<S> Service<Routed> for Upgrade<S>
where
    S: Service<Routed, Response = Response<Body>, Error = Infallible, Future = Fut<Response<Body>>>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Fut<Response<Body>>;

    always_ready!();

    fn call(&mut self, r: Routed) -> Self::Future {
        if is_upgrade(&r.req) {
            return Box::pin(async move { Ok(upgrade(r).await) });
        }
        self.inner.call(r)
    }
}

/// An HTTP/1.1 request asking to switch protocols (`Upgrade` named by `Connection`), e.g. a
/// WebSocket handshake.
fn is_upgrade<B>(req: &Request<B>) -> bool {
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
/// upgraded connections together until either side closes.
async fn upgrade(r: Routed) -> Response<Body> {
    let Routed {
        mut req,
        route,
        cluster,
        deadline,
        permit: _permit,
    } = r;
    let cluster_name = cluster.config.name.as_str();
    if cluster.config.http2 {
        return local_reply(
            StatusCode::BAD_GATEWAY,
            &format!("cluster {cluster_name} speaks HTTP/2 upstream: upgrades need HTTP/1.1"),
        );
    }
    let downstream = hyper::upgrade::on(&mut req);
    let (parts, _) = req.into_parts();
    let parts = Arc::new(parts);
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
            Built::Request(up) => up,
            Built::Unusable(e) => {
                last = Some(local_reply(StatusCode::SERVICE_UNAVAILABLE, &e));
                continue;
            }
            Built::Rejected(e) => return local_reply(StatusCode::BAD_REQUEST, &e),
        };
        // The upgrade is the point: pass it on.
        if let Some(u) = parts.headers.get(http::header::UPGRADE) {
            up.headers_mut().insert(http::header::UPGRADE, u.clone());
        }
        up.headers_mut().insert(
            http::header::CONNECTION,
            HeaderValue::from_static("upgrade"),
        );
        let active = host.state.active_guard();
        let sent = cluster.client(&host).request(up);
        let result = match deadline {
            Some(d) => tokio::time::timeout(d.saturating_duration_since(Instant::now()), sent)
                .await
                .ok(),
            None => Some(sent.await),
        };
        drop(active);
        let now = Instant::now();
        match result {
            None => {
                let (outcome, _) = classify(Observed::Timeout { per_try: false }, None);
                cluster.balancer.report(&host, outcome, now);
                return local_reply(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout");
            }
            Some(Err(e)) => {
                let connect = e.is_connect();
                let observed = if connect {
                    Observed::ConnectFailure
                } else {
                    Observed::Reset
                };
                if !super::attempt::path_failure(&host, connect, &e) {
                    cluster
                        .balancer
                        .report(&host, classify(observed, None).0, now);
                }
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
                let (outcome, _) = classify(Observed::Status(resp.status()), None);
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
