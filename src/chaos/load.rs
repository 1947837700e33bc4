//! The built-in load generator: fixed-rate (open-loop) HTTP GETs, gRPC unary calls or TCP
//! connections from a cluster's client sidecar to a service, each request's outcome, latency
//! and serving cluster recorded. HTTP goes over HTTP/1.1 with keep-alive; gRPC over one h2c
//! connection (calls multiplexed as streams), `POST /strait.lab.Echo/Who`, a call succeeding
//! only with HTTP 200, `grpc-status: 0` and a reply message naming who served it. TCP opens a
//! new connection per request to the sidecar's listener of the service's port (opaque TCP to
//! the sidecar), writes one HTTP/1.1 request with `Connection: close` and reads to the end: it
//! succeeds only with a whole 200 answer naming who served it. Latency
//! is measured from the moment a request was due, not when it was sent, so a stalled
//! generator cannot hide a stall of the system (no coordinated omission).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::lab::echo::{GRPC_METHOD, WhoReply, grpc_frame, is_grpc};
use crate::lab::http::{NsConnector, PooledClient, pooled};
use crate::lab::state::Lab;

/// One stream of load.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadSpec {
    /// The cluster whose client sidecar sends the requests.
    pub from: String,
    /// `SERVICE.NAMESPACE`, sent as the Host header.
    pub service: String,
    /// Requests per second.
    #[serde(default = "default_rate")]
    pub rate: f64,
    /// The request path (HTTP only; gRPC calls `/strait.lab.Echo/Who`).
    #[serde(default = "default_path")]
    pub path: String,
    /// `http` (GET over HTTP/1.1), `grpc` (unary calls over h2c) or `tcp` (a connection per
    /// request to the sidecar's TCP listener of the service's port).
    #[serde(default)]
    pub protocol: LoadProtocol,
    /// Send to this address, inside the `from` cluster's namespace, instead of its client
    /// sidecar: another proxy on the same path, for comparisons (the benchmarks run the same
    /// scenario through an Envoy mesh this way).
    #[serde(default)]
    pub via: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadProtocol {
    #[default]
    Http,
    Grpc,
    Tcp,
}

impl LoadSpec {
    /// `GET http://payments.default/` or `gRPC payments.default/strait.lab.Echo/Who`.
    pub fn describe(&self) -> String {
        let what = match self.protocol {
            LoadProtocol::Http => format!("GET http://{}{}", self.service, self.path),
            LoadProtocol::Grpc => format!("gRPC {}{GRPC_METHOD}", self.service),
            LoadProtocol::Tcp => format!("TCP {}", self.service),
        };
        match self.via {
            Some(via) => format!("{what} via {via}"),
            None => what,
        }
    }
}

/// How one stream sends its requests.
#[derive(Clone)]
enum Caller {
    Http(PooledClient, http::Uri),
    Grpc(Client<NsConnector, Full<Bytes>>, http::Uri),
    /// A connection per request, in namespace `ns`, to `addr`; `Host: service`.
    Tcp {
        ns: String,
        addr: std::net::SocketAddr,
        service: String,
    },
}

/// The most a TCP answer may be.
const MAX_TCP_ANSWER: u64 = 64 * 1024;

/// One request over a new TCP connection to `addr` (in namespace `ns`): `GET /` for `service`
/// with `Connection: close`, read to the end; the body of a whole 200 answer (who served it).
pub async fn tcp_request(
    ns: &str,
    addr: std::net::SocketAddr,
    service: &str,
) -> Result<String, String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut conn = crate::lab::netns::connect(ns, addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let request = format!("GET / HTTP/1.1\r\nHost: {service}\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut data = Vec::new();
    (&mut conn)
        .take(MAX_TCP_ANSWER)
        .read_to_end(&mut data)
        .await
        .map_err(|e| format!("read after {} bytes: {e}", data.len()))?;
    parse_answer(&data)
}

/// A whole HTTP/1.1 answer read to the end of the connection: its body, if it is a 200 with
/// exactly its `content-length` of body.
fn parse_answer(data: &[u8]) -> Result<String, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(data) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return Err(format!(
                "the connection ended after {} bytes, within the answer's head",
                data.len()
            ));
        }
        Err(e) => return Err(format!("not an HTTP answer: {e}")),
    };
    let body = data.get(head..).unwrap_or_default();
    let length = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        });
    if length.is_some_and(|l| l != body.len()) {
        return Err(format!(
            "the connection ended after {} of {} body bytes",
            body.len(),
            length.unwrap_or_default()
        ));
    }
    let text = String::from_utf8_lossy(body).into_owned();
    match resp.code {
        Some(200) => Ok(text),
        Some(code) => Err(format!("{code} {}", text.trim())),
        None => Err("an answer without a status".into()),
    }
}

/// The error and its causes, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(&format!(": {x}"));
        src = x.source();
    }
    s
}

impl Caller {
    /// One request: who served it (`CLUSTER ZONE INSTANCE`), or what went wrong.
    async fn call(&self) -> Result<String, String> {
        match self {
            Caller::Tcp { ns, addr, service } => tcp_request(ns, *addr, service).await,
            Caller::Http(client, uri) => {
                let req = http::Request::get(uri.clone())
                    .body(http_body_util::Empty::new())
                    .map_err(|e| format!("request: {e}"))?;
                let resp = client.request(req).await.map_err(|e| chain(&e))?;
                let status = resp.status().as_u16();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| format!("body: {e}"))?
                    .to_bytes();
                let body = String::from_utf8_lossy(&body).into_owned();
                if status == 200 {
                    Ok(body)
                } else {
                    Err(format!("{status} {}", body.trim()))
                }
            }
            Caller::Grpc(client, uri) => {
                let req = http::Request::post(uri.clone())
                    .header(http::header::CONTENT_TYPE, "application/grpc")
                    .header(http::header::TE, "trailers")
                    .body(Full::new(grpc_frame(&[])))
                    .map_err(|e| format!("request: {e}"))?;
                let resp = client.request(req).await.map_err(|e| chain(&e))?;
                let status = resp.status().as_u16();
                let (parts, body) = resp.into_parts();
                let collected = body.collect().await.map_err(|e| format!("body: {e}"))?;
                let trailers = collected.trailers().cloned().unwrap_or_default();
                let data = collected.to_bytes();
                if status != 200 {
                    return Err(format!(
                        "{status} {}",
                        String::from_utf8_lossy(&data).trim()
                    ));
                }
                // grpc-status in the trailers, or in the headers of a trailers-only answer.
                let grpc_status = trailers
                    .get("grpc-status")
                    .or_else(|| parts.headers.get("grpc-status"))
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                if grpc_status != "0" {
                    let message = trailers
                        .get("grpc-message")
                        .or_else(|| parts.headers.get("grpc-message"))
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    return Err(format!("grpc-status `{grpc_status}` {message}"));
                }
                if !is_grpc(&parts.headers) {
                    return Err("a 200 that is not a gRPC answer (content-type)".into());
                }
                let message = data
                    .get(5..)
                    .filter(|m| data[0] == 0 && !m.is_empty())
                    .ok_or_else(|| {
                        format!("no gRPC message in the answer ({} bytes)", data.len())
                    })?;
                let reply = <WhoReply as prost::Message>::decode(message)
                    .map_err(|e| format!("the gRPC reply is not a WhoReply: {e}"))?;
                Ok(reply.served_by)
            }
        }
    }
}

fn default_rate() -> f64 {
    100.0
}

fn default_path() -> String {
    "/".into()
}

/// What happened to one request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    /// Index of the load stream.
    pub stream: usize,
    /// When it was due, in ms since the run started.
    pub at_ms: f64,
    /// From due to the end of the response (or the failure).
    pub latency_ms: f64,
    /// The serving cluster, for a 200.
    pub cluster: Option<String>,
    /// The serving zone, for a 200.
    pub zone: Option<String>,
    /// What went wrong, otherwise.
    pub error: Option<String>,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }

    pub fn end_ms(&self) -> f64 {
        self.at_ms + self.latency_ms
    }
}

/// How long one request may take before it counts as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Send `spec`'s requests from `start` until `stop` turns true; every outcome goes to `out`.
/// Returns once every request sent has an outcome.
pub async fn generate(
    lab: &Lab,
    index: usize,
    spec: &LoadSpec,
    start: Instant,
    mut stop: watch::Receiver<bool>,
    out: mpsc::UnboundedSender<Outcome>,
) -> anyhow::Result<()> {
    let c = lab.cluster(&spec.from)?;
    if !(spec.rate > 0.0 && spec.rate <= 20_000.0) {
        anyhow::bail!(
            "load from {}: rate {} is not in (0, 20000] requests/s",
            spec.from,
            spec.rate
        );
    }
    let target = spec.via.unwrap_or(c.client.outbound);
    let caller = match spec.protocol {
        LoadProtocol::Tcp => {
            let port = lab.service_port(&spec.service).ok_or_else(|| {
                anyhow::anyhow!("TCP load to `{}`: no such service in the lab", spec.service)
            })?;
            Caller::Tcp {
                ns: c.ns.clone(),
                addr: spec
                    .via
                    .unwrap_or_else(|| std::net::SocketAddr::new(c.client.outbound.ip(), port)),
                service: spec.service.clone(),
            }
        }
        LoadProtocol::Http => Caller::Http(
            pooled(&c.ns, target),
            format!("http://{}{}", spec.service, spec.path)
                .parse()
                .map_err(|e| anyhow::anyhow!("load to `{}{}`: {e}", spec.service, spec.path))?,
        ),
        LoadProtocol::Grpc => Caller::Grpc(
            Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build(NsConnector {
                    ns: c.ns.clone(),
                    addr: target,
                }),
            format!("http://{}{GRPC_METHOD}", spec.service)
                .parse()
                .map_err(|e| anyhow::anyhow!("gRPC load to `{}`: {e}", spec.service))?,
        ),
    };
    let interval = Duration::from_secs_f64(1.0 / spec.rate);
    let mut tasks = tokio::task::JoinSet::new();
    let mut due = start;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            break;
        }
        let at_ms = due.duration_since(start).as_secs_f64() * 1000.0;
        let (caller, out, when) = (caller.clone(), out.clone(), due);
        tasks.spawn(async move {
            let result = tokio::time::timeout(REQUEST_TIMEOUT, caller.call())
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {REQUEST_TIMEOUT:?}")));
            let latency_ms = when.elapsed().as_secs_f64() * 1000.0;
            let mut o = Outcome {
                stream: index,
                at_ms,
                latency_ms,
                cluster: None,
                zone: None,
                error: None,
            };
            match result {
                Ok(body) => {
                    let mut words = body.split_whitespace();
                    o.cluster = words.next().map(str::to_string);
                    o.zone = words.next().map(str::to_string);
                    if o.cluster.is_none() {
                        o.error = Some("200 with an empty body".into());
                    }
                }
                Err(e) => o.error = Some(e),
            }
            let _ = out.send(o);
        });
        // Reap finished requests as we go, so the set stays small.
        while tasks.try_join_next().is_some() {}
        due += interval;
        // Behind schedule by more than a second (a stalled generator): skip ahead rather than
        // fire a burst; the skipped requests are not counted as failures (the generator, not
        // the system, stalled) and the gap shows in the timeline.
        let now = Instant::now();
        if now > due + Duration::from_secs(1) {
            tracing::warn!(
                "load from {} fell {:?} behind schedule",
                spec.from,
                now - due
            );
            due = now;
        }
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// Load streams sharing one stop signal; outcomes collected as they complete.
pub struct Running {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    collector: tokio::task::JoinHandle<()>,
    /// Every outcome so far, in order of completion.
    pub outcomes: Arc<Mutex<Vec<Outcome>>>,
}

impl Running {
    pub fn start(lab: Arc<Lab>, specs: &[LoadSpec], start: Instant) -> Running {
        let (stop, stop_rx) = watch::channel(false);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let tasks = specs
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let (lab, spec, stop_rx, tx) =
                    (lab.clone(), spec.clone(), stop_rx.clone(), tx.clone());
                tokio::spawn(async move { generate(&lab, i, &spec, start, stop_rx, tx).await })
            })
            .collect();
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let sink = outcomes.clone();
        let collector = tokio::spawn(async move {
            while let Some(o) = rx.recv().await {
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(o);
            }
        });
        Running {
            stop,
            tasks,
            collector,
            outcomes,
        }
    }

    /// Stop sending and wait for every request in flight; every outcome, by due time.
    pub async fn finish(self) -> anyhow::Result<Vec<Outcome>> {
        let _ = self.stop.send(true);
        let mut first_error = None;
        for t in self.tasks {
            match t.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => first_error = first_error.or(Some(e)),
                Err(e) => first_error = first_error.or(Some(anyhow::anyhow!("load task: {e}"))),
            }
        }
        let _ = self.collector.await;
        if let Some(e) = first_error {
            return Err(e);
        }
        let mut all = std::mem::take(&mut *self.outcomes.lock().unwrap_or_else(|p| p.into_inner()));
        all.sort_by(|a, b| a.at_ms.total_cmp(&b.at_ms));
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tcp_answer_counts_only_when_whole_and_a_200() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 20\r\n\r\nwest zone-a store-a1";
        assert_eq!(parse_answer(ok).as_deref(), Ok("west zone-a store-a1"));
        let short = b"HTTP/1.1 200 OK\r\ncontent-length: 20\r\n\r\nwest zone";
        assert!(
            parse_answer(short)
                .unwrap_err()
                .contains("after 9 of 20 body bytes")
        );
        let head = b"HTTP/1.1 200 OK\r\ncontent-le";
        assert!(
            parse_answer(head)
                .unwrap_err()
                .contains("within the answer's head")
        );
        assert!(parse_answer(b"").unwrap_err().contains("after 0 bytes"));
        let refused = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 7\r\n\r\nno way\n";
        assert_eq!(parse_answer(refused), Err("503 no way".into()));
        assert!(
            parse_answer(b"SSH-2.0-x\r\n\r\n")
                .unwrap_err()
                .starts_with("not an HTTP answer")
        );
    }

    async fn echo(who: &str) -> std::net::SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(crate::lab::echo::serve(l, who.to_string()));
        addr
    }

    fn grpc_caller(addr: std::net::SocketAddr) -> Caller {
        Caller::Grpc(
            Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build(NsConnector {
                    ns: String::new(),
                    addr,
                }),
            format!("http://ledger.default{GRPC_METHOD}")
                .parse()
                .unwrap(),
        )
    }

    #[tokio::test]
    async fn a_grpc_call_to_the_echo_names_who_served_it() {
        let addr = echo("west zone-a ledger-a1").await;
        let caller = grpc_caller(addr);
        for _ in 0..3 {
            assert_eq!(caller.call().await.unwrap(), "west zone-a ledger-a1");
        }
        let http = Caller::Http(
            pooled("", addr),
            "http://payments.default/".parse().unwrap(),
        );
        assert_eq!(http.call().await.unwrap().trim(), "west zone-a ledger-a1");
    }

    /// An h2c server that answers every request with `status`, `headers` and `body`.
    async fn fake(
        status: u16,
        headers: Vec<(&'static str, &'static str)>,
        body: &'static [u8],
    ) -> std::net::SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let headers = headers.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        let mut b = http::Response::builder().status(status);
                        for (k, v) in &headers {
                            b = b.header(*k, *v);
                        }
                        let resp = b.body(Full::new(Bytes::from_static(body))).unwrap();
                        async move { Ok::<_, std::convert::Infallible>(resp) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_grpc_call_fails_on_anything_but_a_grpc_success_with_a_reply() {
        type Case = (
            u16,
            Vec<(&'static str, &'static str)>,
            &'static [u8],
            &'static str,
        );
        let cases: [Case; 4] = [
            (
                503,
                vec![],
                b"no healthy upstream",
                "503 no healthy upstream",
            ),
            (
                200,
                vec![
                    ("content-type", "application/grpc"),
                    ("grpc-status", "14"),
                    ("grpc-message", "unavailable"),
                ],
                b"",
                "grpc-status `14` unavailable",
            ),
            (
                200,
                vec![("content-type", "text/plain"), ("grpc-status", "0")],
                b"hello",
                "not a gRPC answer",
            ),
            (
                200,
                vec![("content-type", "application/grpc"), ("grpc-status", "0")],
                b"",
                "no gRPC message",
            ),
        ];
        for (status, headers, body, want) in cases {
            let addr = fake(status, headers, body).await;
            let err = grpc_caller(addr).call().await.unwrap_err();
            assert!(err.contains(want), "want `{want}` in `{err}`");
        }
    }
}
