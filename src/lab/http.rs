//! HTTP/1.1 from this process into the lab's namespaces: one-off GETs (readiness, admin
//! endpoints) and a pooled client (the load generator) whose connections are made in a namespace.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// `GET http://HOST/PATH` sent to `addr` in namespace `ns`: status and body, or what went wrong.
pub async fn get(
    ns: &str,
    addr: SocketAddr,
    host: &str,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), String> {
    request(ns, addr, host, http::Method::GET, path, None, timeout).await
}

/// `POST http://HOST/PATH` with a JSON `body`, like [`get`].
pub async fn post(
    ns: &str,
    addr: SocketAddr,
    host: &str,
    path: &str,
    body: &str,
    timeout: Duration,
) -> Result<(u16, String), String> {
    request(
        ns,
        addr,
        host,
        http::Method::POST,
        path,
        Some(body),
        timeout,
    )
    .await
}

async fn request(
    ns: &str,
    addr: SocketAddr,
    host: &str,
    method: http::Method,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let fut = async {
        let stream = super::netns::connect(ns, addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake with {addr}: {e}"))?;
        let driver = tokio::spawn(conn);
        let mut req = http::Request::builder()
            .method(method.clone())
            .uri(path)
            .header(http::header::HOST, host);
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(http_body_util::Full::new(Bytes::from(
                body.unwrap_or_default().to_string(),
            )))
            .map_err(|e| format!("request: {e}"))?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| format!("{method} {path} from {addr}: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading the body from {addr}: {e}"))?
            .to_bytes();
        driver.abort();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| format!("no answer from {addr} within {timeout:?}"))?
}

/// Connects every request to one address in one namespace, whatever the URI says.
#[derive(Clone)]
pub struct NsConnector {
    pub ns: String,
    pub addr: SocketAddr,
}

type Connecting =
    Pin<Box<dyn Future<Output = std::io::Result<TokioIo<tokio::net::TcpStream>>> + Send>>;

impl tower_service::Service<http::Uri> for NsConnector {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let (ns, addr) = (self.ns.clone(), self.addr);
        Box::pin(async move { super::netns::connect(&ns, addr).await.map(TokioIo::new) })
    }
}

/// A keep-alive HTTP/1.1 client whose connections go to `addr` in `ns`.
pub type PooledClient = Client<NsConnector, Empty<Bytes>>;

pub fn pooled(ns: &str, addr: SocketAddr) -> PooledClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(NsConnector {
            ns: ns.to_string(),
            addr,
        })
}
