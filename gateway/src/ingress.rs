//! Local ingress: sidecars (or anything holding a workload certificate of this cluster) open
//! tunnels with HTTP CONNECT over mutual TLS — HTTP/1.1 or HTTP/2 (HBONE-style) — naming
//! `SERVICE.NAMESPACE:PORT` as the authority and the target cluster in `strait-cluster`.
//!
//! With `strait-early-status: 1` (another cluster only), the answer comes as soon as the stream
//! to the peer gateway is open, and the peer's status frame is the tunnel's first bytes; the
//! sidecar's first bytes travel right behind the header meanwhile (see
//! [`federation::tunnel`]).
//!
//! A sidecar may keep a drain watch on its connection (`GET /strait/v1/drain`), answered when
//! the gateway starts shutting down, so that it stops reusing that connection's tunnels.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::Bytes;
use federation::identity::{Role, SpiffeId, spiffe_id_from_cert};
use federation::model::ServiceKey;
use federation::tunnel::Refusal;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};

use tokio::net::TcpListener;

use crate::Shared;
use crate::peers::{OpenError, connect_local, open_stream, open_tunnel};
use crate::protocol::{EARLY_STATUS_HEADER, StatusCode as TunnelCode, TunnelHeader, VERSION};
use crate::splice::{Abort as _, EarlyStatus, QuicStream};

/// The ingress protocol's headers (defined with the tunnel protocol).
pub use federation::tunnel::{CLUSTER_HEADER, ENDPOINT_HEADER, REASON_HEADER};

pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let (tcp, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "ingress accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shared.shutdown.cancelled() => return,
        };
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let config = match shared.ingress_tls.read() {
                Ok(c) => c.clone(),
                Err(_) => return,
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            let tls = match tokio::time::timeout(
                Duration::from_secs(10),
                acceptor.accept(crate::splice::Coalesce::new(tcp)),
            )
            .await
            {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tracing::warn!(%remote, error = %e, "ingress TLS handshake refused");
                    shared.metrics.count(
                        "strait_gateway_ingress_handshake_failures_total",
                        federation::identity::handshake_failure_reason(&e),
                    );
                    return;
                }
                Err(_) => {
                    shared
                        .metrics
                        .count("strait_gateway_ingress_handshake_failures_total", "timeout");
                    return;
                }
            };
            let identity = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| spiffe_id_from_cert(c).ok());
            let Some(identity) = identity else {
                return;
            };
            shared
                .metrics
                .ingress_connections_total
                .fetch_add(1, Relaxed);
            let svc = {
                let shared = shared.clone();
                hyper::service::service_fn(move |req| {
                    let (shared, identity) = (shared.clone(), identity.clone());
                    async move { Ok::<_, Infallible>(handle(shared, identity, req).await) }
                })
            };
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
            tokio::pin!(conn);
            // On shutdown, tell the sidecar (HTTP/2 GOAWAY; HTTP/1.1: close when idle) so that
            // its next tunnels go through another gateway replica; tunnels under way finish.
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = shared.shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%remote, error = %e, "ingress connection ended");
            }
        });
    }
}

fn refuse(status: u16, reason: impl Into<String>) -> Response<Full<Bytes>> {
    let reason = reason.into();
    let mut r = Response::new(Full::new(Bytes::from(format!("{reason}\n"))));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    if let Ok(v) = http::HeaderValue::from_str(&reason.replace(['\r', '\n'], " ")) {
        r.headers_mut().insert(REASON_HEADER, v);
    }
    r
}

/// Parse `SERVICE.NAMESPACE[.svc.clusterset.local]:PORT`.
pub fn parse_authority(authority: &str) -> Result<(ServiceKey, u16), String> {
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or_else(|| format!("authority `{authority}` is not SERVICE.NAMESPACE:PORT"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("authority `{authority}` has an invalid port"))?;
    let host = host
        .strip_suffix(".svc.clusterset.local")
        .or_else(|| host.strip_suffix(".svc.cluster.local"))
        .unwrap_or(host);
    let key = ServiceKey::parse("authority", host)
        .map_err(|e| format!("authority `{authority}`: {e}"))?;
    Ok((key, port))
}

async fn handle(
    shared: Arc<Shared>,
    identity: SpiffeId,
    mut req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let drain_watch =
        req.method() == Method::GET && req.uri().path() == federation::tunnel::DRAIN_PATH;
    if !drain_watch {
        shared.metrics.ingress_requests_total.fetch_add(1, Relaxed);
    }
    if identity.role() != Role::Workload || identity.cluster() != shared.own.as_str() {
        shared
            .metrics
            .count("strait_gateway_ingress_refused_total", "not_authorized");
        return refuse(
            403,
            format!(
                "{identity} is not a workload of cluster `{}`; only this cluster's workloads may use its gateway",
                shared.own
            ),
        );
    }
    if drain_watch {
        // A sidecar's drain watch: answered when this gateway starts shutting down.
        shared.shutdown.cancelled().await;
        return Response::new(Full::new(Bytes::from_static(b"draining\n")));
    }
    if req.method() != Method::CONNECT {
        return refuse(405, "only CONNECT is supported");
    }
    // Until its splice ends (a graceful shutdown waits for it).
    let busy = shared.in_flight.enter();
    let Some(authority) = req.uri().authority().map(|a| a.to_string()) else {
        return refuse(400, "CONNECT needs an authority SERVICE.NAMESPACE:PORT");
    };
    let (service, port) = match parse_authority(&authority) {
        Ok(x) => x,
        Err(e) => return refuse(400, e),
    };
    let Some(target) = req
        .headers()
        .get(CLUSTER_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
    else {
        shared
            .metrics
            .count("strait_gateway_ingress_refused_total", "no_cluster_header");
        return refuse(
            400,
            format!("missing `{CLUSTER_HEADER}` header naming the target cluster"),
        );
    };
    // The endpoint the sidecar's load balancer chose, if it names one.
    let endpoint = match req.headers().get(ENDPOINT_HEADER) {
        None => None,
        Some(v) => match v
            .to_str()
            .ok()
            .and_then(|v| v.parse::<std::net::SocketAddr>().ok())
        {
            Some(a) => Some(a),
            None => {
                shared.metrics.count(
                    "strait_gateway_ingress_refused_total",
                    "bad_endpoint_header",
                );
                return refuse(
                    400,
                    format!("`{ENDPOINT_HEADER}` must be ADDRESS:PORT, got {v:?}"),
                );
            }
        },
    };
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()));
    let on_upgrade = hyper::upgrade::on(&mut req);
    let idle = shared.config.tunnel.idle_timeout;

    if target == shared.own.as_str() {
        let tcp = match connect_local(&shared, &service, port, endpoint).await {
            Ok((t, _)) => t,
            Err((code, why)) => {
                let status = match code {
                    TunnelCode::UnknownService => 404,
                    TunnelCode::NoEndpoint | TunnelCode::NotAnEndpoint => 503,
                    _ => 502,
                };
                let mut r = refuse(status, why);
                r.headers_mut().insert(
                    federation::tunnel::REFUSAL_HEADER,
                    http::HeaderValue::from_static(Refusal::Remote(code).as_str()),
                );
                return r;
            }
        };
        let shared2 = shared.clone();
        tokio::spawn(async move {
            let _busy = busy;
            match on_upgrade.await {
                Ok(up) => {
                    crate::splice::splice(tcp, TokioIo::new(up), idle, &shared2.metrics).await;
                }
                Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
            }
        });
        return Response::new(Full::new(Bytes::new()));
    }

    let header = TunnelHeader {
        version: VERSION,
        service: service.name.to_string(),
        namespace: service.namespace.to_string(),
        port: u32::from(port),
        source_cluster: shared.own.to_string(),
        source_identity: identity.to_string(),
        request_id,
        endpoint: endpoint.map(|a| a.to_string()).unwrap_or_default(),
    };
    // An early status: the 200 as soon as the stream to the peer is open, the peer's status as
    // the tunnel's first bytes, and the sidecar's first bytes on their way meanwhile.
    let early = req
        .headers()
        .get(EARLY_STATUS_HEADER)
        .is_some_and(|v| v.as_bytes() == b"1");
    if early {
        return match open_stream(&shared, &target, header).await {
            Ok((send, recv)) => {
                shared.metrics.ingress_early_total.fetch_add(1, Relaxed);
                let shared2 = shared.clone();
                tokio::spawn(async move {
                    let _busy = busy;
                    let mut peer = QuicStream { send, recv };
                    match on_upgrade.await {
                        Ok(up) => {
                            let counted = shared2.clone();
                            let peer = EarlyStatus::new(
                                peer,
                                Box::new(move |code, message| {
                                    if code != TunnelCode::Ok {
                                        tracing::debug!(cluster = %target, ?code, %message,
                                            "the peer refused an early-status tunnel");
                                        counted.metrics.count(
                                            "strait_gateway_ingress_refused_total",
                                            refusal_label(code),
                                        );
                                    }
                                }),
                            );
                            crate::splice::splice(peer, TokioIo::new(up), idle, &shared2.metrics)
                                .await;
                        }
                        Err(e) => {
                            // Reset, not finish: the peer must not take the header for a
                            // complete connection.
                            peer.abort();
                            tracing::debug!(error = %e, "CONNECT upgrade failed");
                        }
                    }
                });
                let mut r = Response::new(Full::new(Bytes::new()));
                r.headers_mut()
                    .insert(EARLY_STATUS_HEADER, http::HeaderValue::from_static("1"));
                r
            }
            Err(e) => open_refused(&shared, e),
        };
    }
    match open_tunnel(&shared, &target, header).await {
        Ok((send, recv)) => {
            let shared2 = shared.clone();
            tokio::spawn(async move {
                let _busy = busy;
                match on_upgrade.await {
                    Ok(up) => {
                        crate::splice::splice(
                            crate::splice::QuicStream { send, recv },
                            TokioIo::new(up),
                            idle,
                            &shared2.metrics,
                        )
                        .await;
                    }
                    Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
                }
            });
            Response::new(Full::new(Bytes::new()))
        }
        Err(e) => open_refused(&shared, e),
    }
}

/// The answer to a CONNECT whose tunnel could not be opened, counted by reason.
fn open_refused(shared: &Shared, e: OpenError) -> Response<Full<Bytes>> {
    let label = match &e {
        OpenError::UnknownCluster(_) => "unknown_cluster",
        OpenError::LinkDown(_) => "link_down",
        OpenError::Refused(code, _) => refusal_label(*code),
        OpenError::Failed(_) => "failed",
    };
    shared
        .metrics
        .count("strait_gateway_ingress_refused_total", label);
    let link_down = matches!(e, OpenError::LinkDown(_));
    let refusal = match &e {
        OpenError::UnknownCluster(_) => Refusal::UnknownCluster,
        OpenError::LinkDown(_) => Refusal::LinkDown,
        OpenError::Refused(code, _) => Refusal::Remote(*code),
        OpenError::Failed(_) => Refusal::Failed,
    };
    let mut r = refuse(e.http_status(), e.reason().to_string());
    r.headers_mut().insert(
        federation::tunnel::REFUSAL_HEADER,
        http::HeaderValue::from_static(refusal.as_str()),
    );
    if link_down {
        // This replica's link is down; another replica's may be up.
        r.headers_mut().insert(
            federation::tunnel::TRY_ANOTHER_REPLICA_HEADER,
            http::HeaderValue::from_static("1"),
        );
    }
    r
}

/// The refusal counter's label for a peer's status.
fn refusal_label(code: TunnelCode) -> &'static str {
    match code {
        TunnelCode::NoEndpoint => "no_endpoint",
        TunnelCode::NotAnEndpoint => "not_an_endpoint",
        _ => "refused",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities() {
        let (k, p) = parse_authority("echo.default:8080").unwrap();
        assert_eq!((k.to_string().as_str(), p), ("echo.default", 8080));
        let (k, _) = parse_authority("echo.default.svc.clusterset.local:80").unwrap();
        assert_eq!(k.to_string(), "echo.default");
        assert!(parse_authority("echo:80").is_err());
        assert!(parse_authority("echo.default").is_err());
        assert!(parse_authority("echo.default:0").is_err());
        assert!(parse_authority("Echo.default:80").is_err());
    }
}
