//! The admin HTTP server every component runs (gateway, control plane, proxy): one accept loop,
//! one set of connection bounds, one routing of `/ready`, `/metrics` and the component's dumps.
//!
//! A component describes what it serves with [`Endpoints`]; [`serve`] does the rest:
//!
//! - accept errors (`EMFILE`, `ENFILE`, …) are logged and waited out with back-off, never retried
//!   in a busy loop;
//! - a connection must send its request head within [`Limits::header_read_timeout`] (a
//!   connection that sends one byte and then nothing is closed), and at most
//!   [`Limits::max_connections`] connections are served at once; past that, new ones are closed
//!   at once;
//! - `/ready` answers 200 or 503 with the reason, `/metrics` Prometheus text, any other path
//!   the component's own dump or a 404 listing every path served.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::backoff::Backoff;

/// The bounds of one admin listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// How long a connection may take to send a request head.
    pub header_read_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_connections: 128,
        }
    }
}
/// The content type of Prometheus' text exposition format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4";

/// One answer of the admin server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    /// A `200` answer.
    pub fn ok(content_type: &'static str, body: String) -> Self {
        Self {
            status: StatusCode::OK,
            content_type,
            body,
        }
    }

    /// A `200` JSON answer.
    pub fn json(body: String) -> Self {
        Self::ok("application/json", body)
    }

    /// A plain-text answer with any status.
    pub fn text(status: StatusCode, body: String) -> Self {
        Self {
            status,
            content_type: "text/plain",
            body,
        }
    }
}

/// What a component serves on its admin port.
pub trait Endpoints: Send + Sync + 'static {
    /// The component's own paths besides `/ready` and `/metrics` (listed in a 404's answer).
    const DUMPS: &'static [&'static str];

    /// `Ok` when the component serves; otherwise why not (the body of the 503).
    fn ready(&self) -> Result<(), String>;

    /// The Prometheus text exposition of the component's metrics.
    fn metrics(&self) -> String;

    /// The answer for one of [`Self::DUMPS`] (`query` is the URI's query, `""` if none);
    /// `None` for a path not served.
    fn dump(&self, path: &str, query: &str) -> Option<Reply>;
}

/// The answer for one request path (and query): the routing shared by every component.
pub fn route<E: Endpoints>(endpoints: &E, path: &str, query: &str) -> Reply {
    match path {
        "/ready" => match endpoints.ready() {
            Ok(()) => Reply::text(StatusCode::OK, "ready\n".into()),
            Err(why) => Reply::text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        },
        "/metrics" => Reply::ok(PROMETHEUS_TEXT, endpoints.metrics()),
        _ => endpoints.dump(path, query).unwrap_or_else(|| {
            let mut paths = vec!["/ready", "/metrics"];
            paths.extend_from_slice(E::DUMPS);
            Reply::text(
                StatusCode::NOT_FOUND,
                format!("not found; try {}\n", paths.join(", ")),
            )
        }),
    }
}

fn response(reply: Reply) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(reply.body)));
    *r.status_mut() = reply.status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(reply.content_type),
    );
    r
}

/// Serve `endpoints` on `listener` until `stop` completes (pass `std::future::pending()` to serve
/// for the life of the process). Connections already accepted finish on their own.
pub async fn serve<E: Endpoints>(
    listener: TcpListener,
    endpoints: Arc<E>,
    limits: Limits,
    stop: impl Future<Output = ()> + Send,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
    tokio::pin!(stop);
    loop {
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => {
                    backoff.reset();
                    tcp
                }
                Err(e) => {
                    let wait = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?wait, "admin accept failed");
                    tokio::select! {
                        () = tokio::time::sleep(wait) => continue,
                        () = &mut stop => return,
                    }
                }
            },
            () = &mut stop => return,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(
                limit = limits.max_connections,
                "admin connection refused: too many open"
            );
            continue;
        };
        let endpoints = endpoints.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let uri = req.uri();
                let reply = route(&*endpoints, uri.path(), uri.query().unwrap_or(""));
                async move { Ok::<_, Infallible>(response(reply)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    struct Fake {
        ready: bool,
    }

    impl Endpoints for Fake {
        const DUMPS: &'static [&'static str] = &["/dump"];

        fn ready(&self) -> Result<(), String> {
            if self.ready {
                Ok(())
            } else {
                Err("not ready: waiting".into())
            }
        }

        fn metrics(&self) -> String {
            "m 1\n".into()
        }

        fn dump(&self, path: &str, query: &str) -> Option<Reply> {
            (path == "/dump").then(|| Reply::json(format!("{{\"q\":\"{query}\"}}")))
        }
    }

    #[test]
    fn routes_ready_metrics_dumps_and_lists_paths_on_404() {
        let up = Fake { ready: true };
        let down = Fake { ready: false };
        assert_eq!(route(&up, "/ready", "").status, StatusCode::OK);
        let r = route(&down, "/ready", "");
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.body, "not ready: waiting\n");
        let m = route(&up, "/metrics", "");
        assert_eq!(
            (m.content_type, m.body.as_str()),
            (PROMETHEUS_TEXT, "m 1\n")
        );
        assert_eq!(route(&up, "/dump", "node=a").body, "{\"q\":\"node=a\"}");
        let nf = route(&up, "/nope", "");
        assert_eq!(nf.status, StatusCode::NOT_FOUND);
        assert_eq!(nf.body, "not found; try /ready, /metrics, /dump\n");
    }

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut tcp = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connect to the admin server");
        let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        // The server may already have closed a refused connection.
        let _ = tcp.write_all(req.as_bytes()).await;
        let mut out = Vec::new();
        // A refused connection may be reset rather than closed: both read as no answer.
        let _ = tcp.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn bounds_slow_connections_and_their_number_and_stops_on_request() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let limits = Limits {
            header_read_timeout: Duration::from_millis(300),
            max_connections: 1,
        };
        let server = tokio::spawn(serve(
            listener,
            Arc::new(Fake { ready: true }),
            limits,
            async {
                let _ = stop_rx.await;
            },
        ));

        let mut slow = tokio::net::TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"G").await.expect("write one byte");
        // The only permit is taken: a second connection is closed without an answer.
        let refused = get(addr, "/metrics").await;
        assert_eq!(
            refused, "",
            "past the connection cap, a connection gets no answer"
        );
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(30), slow.read(&mut buf)).await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "a connection that sent one byte must be closed after the header-read timeout, got {closed:?}"
        );
        drop(slow);

        // Its permit is back once the server has closed it.
        let answer = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let a = get(addr, "/metrics").await;
                if !a.is_empty() {
                    return a;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the slow connection's permit comes back");
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("m 1\n"),
            "{answer}"
        );

        let _ = stop_tx.send(());
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server stops when asked")
            .expect("the server task does not panic");
    }
}
