//! The lab's sample service (`strait lab echo`): every listener is one replica; every answer
//! names the cluster, zone and instance that served it (`CLUSTER ZONE INSTANCE`, and the header
//! `x-served-by: CLUSTER/ZONE/INSTANCE`), so traffic can be attributed. HTTP/1.1 and h2c; a
//! gRPC request (`content-type: application/grpc…`, any method) gets a gRPC answer: one
//! [`WhoReply`] message and the trailer `grpc-status: 0`.

use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

/// The gRPC answer: who served the call (`CLUSTER ZONE INSTANCE`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct WhoReply {
    #[prost(string, tag = "1")]
    pub served_by: String,
}

/// The gRPC method the load generator calls (the echo answers any).
pub const GRPC_METHOD: &str = "/strait.lab.Echo/Who";

/// A gRPC message frame: uncompressed flag, length, message.
pub fn grpc_frame(message: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(5 + message.len());
    out.push(0);
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    Bytes::from(out)
}

/// Whether a request or response is gRPC, by its content type.
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

#[derive(clap::Args, Debug)]
pub struct EchoArgs {
    /// The cluster to report.
    #[arg(long)]
    pub cluster: String,
    /// The zone to report.
    #[arg(long)]
    pub zone: String,
    /// A replica: INSTANCE=ADDR (repeatable).
    #[arg(long = "serve", value_parser = parse_replica, required = true)]
    pub replicas: Vec<(String, SocketAddr)>,
}

fn parse_replica(s: &str) -> Result<(String, SocketAddr), String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected INSTANCE=ADDR"))?;
    let addr = addr
        .parse()
        .map_err(|e| format!("`{s}`: `{addr}` is not an address: {e}"))?;
    Ok((name.to_string(), addr))
}

pub async fn run(args: EchoArgs) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for (instance, addr) in &args.replicas {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("replica {instance}: cannot listen on {addr}"))?;
        let who = format!("{} {} {instance}", args.cluster, args.zone);
        println!("echo replica {instance} on {addr}");
        tasks.push(tokio::spawn(serve(listener, who)));
    }
    crate::shutdown_signal().await;
    for t in tasks {
        t.abort();
    }
    Ok(())
}

pub(crate) async fn serve(listener: tokio::net::TcpListener, who: String) {
    let header = who.replace(' ', "/");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let body = Bytes::from(format!("{who}\n"));
        let grpc = grpc_frame(&prost::Message::encode_to_vec(&WhoReply {
            served_by: who.clone(),
        }));
        let header = header.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (body, grpc, header) = (body.clone(), grpc.clone(), header.clone());
                    async move {
                        let grpc_call = is_grpc(req.headers());
                        // Read the request to its end (a gRPC call's message, a POST's body).
                        let _ = req.into_body().collect().await;
                        let builder =
                            http::Response::builder().header("x-served-by", header.as_str());
                        let resp = if grpc_call {
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                            builder.header("content-type", "application/grpc").body(
                                Full::new(grpc)
                                    .with_trailers(async move { Some(Ok(trailers)) })
                                    .boxed(),
                            )
                        } else {
                            builder
                                .header("content-type", "text/plain")
                                .body(Full::new(body.clone()).boxed())
                        };
                        let resp: http::Response<BoxBody<Bytes, Infallible>> =
                            resp.unwrap_or_else(|_| http::Response::new(Full::new(body).boxed()));
                        Ok::<_, Infallible>(resp)
                    }
                });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
