//! The admin HTTP endpoint: `/ready`, `/metrics` (Prometheus text), `/links` (JSON).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::Shared;

pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}

fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/ready" => match shared.readiness() {
            Ok(()) => respond(StatusCode::OK, "text/plain", "ready\n".into()),
            Err(why) => respond(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("{why}\n"),
            ),
        },
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            shared.metrics.render(shared.own.as_str(), &shared.links()),
        ),
        "/links" => respond(
            StatusCode::OK,
            "application/json",
            serde_json::to_string_pretty(&shared.links()).unwrap_or_else(|_| "[]".into()),
        ),
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /ready, /metrics, /links\n".into(),
        ),
    }
}
