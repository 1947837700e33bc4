//! The lab's sample service (`strait lab echo`): every listener is one replica; every answer
//! names the cluster, zone and instance that served it (`CLUSTER ZONE INSTANCE`, and the header
//! `x-served-by: CLUSTER/ZONE/INSTANCE`), so traffic can be attributed. HTTP/1.1 and h2c.

use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

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

async fn serve(listener: tokio::net::TcpListener, who: String) {
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
        let header = header.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |_req| {
                let resp = http::Response::builder()
                    .header("content-type", "text/plain")
                    .header("x-served-by", header.as_str())
                    .body(Full::new(body.clone()))
                    .unwrap_or_else(|_| http::Response::new(Full::new(body.clone())));
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
