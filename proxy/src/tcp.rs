//! Outbound TCP listeners: every accepted connection goes to one endpoint of the listener's
//! cluster, chosen with the cluster's balancer (priorities, localities, outlier ejection), and
//! bytes are copied both ways, half-closes included.
//!
//! A connection that cannot be made (refused, timed out, a tunnel the gateway refuses) is tried
//! again on another host and another priority, up to [`CONNECT_ATTEMPTS`] times, before the
//! downstream connection is closed — nothing has been sent yet, so moving is always safe. The
//! cluster's `max_connections` bounds the connections open through it (more are closed at once).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::config::Upstream;
use crate::dataplane::Compiled;
use crate::lb::{Host, Outcome, ThreadRandom};

/// Connection attempts per downstream connection (on different hosts and priorities).
pub const CONNECT_ATTEMPTS: usize = 3;

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

pub async fn serve(
    listener: TcpListener,
    name: String,
    cluster: String,
    current: watch::Receiver<Arc<Compiled>>,
) {
    let name: Arc<str> = name.into();
    let cluster: Arc<str> = cluster.into();
    loop {
        let (stream, peer) = crate::dataplane::accept(&listener, &name).await;
        let compiled = current.borrow().clone();
        let (name, cluster) = (name.clone(), cluster.clone());
        tokio::spawn(async move {
            if let Err(e) = proxy_one(&compiled, &cluster, stream).await {
                tracing::debug!(listener = %name, %peer, error = %e, "TCP connection not proxied");
            }
        });
    }
}

async fn proxy_one(
    compiled: &Compiled,
    cluster_name: &str,
    mut down: TcpStream,
) -> Result<(), String> {
    let cluster = compiled
        .clusters
        .get(cluster_name)
        .ok_or_else(|| format!("cluster {cluster_name} has no endpoints"))?;
    let Some(_slot) = cluster.tcp_slot() else {
        return Err(format!("cluster {cluster_name} is at max_connections"));
    };
    let mut rng = ThreadRandom;
    let mut tried_hosts: Vec<Arc<Host>> = Vec::new();
    let mut tried_priorities: Vec<usize> = Vec::new();
    let mut errors = Vec::new();
    for _ in 0..CONNECT_ATTEMPTS {
        let Some(host) =
            cluster
                .balancer
                .pick(&mut rng, Instant::now(), &tried_priorities, &tried_hosts)
        else {
            break;
        };
        tried_hosts.push(host.clone());
        if !tried_priorities.contains(&host.priority) {
            tried_priorities.push(host.priority);
        }
        match connect(compiled, &host, cluster.config.connect_timeout).await {
            Ok(mut up) => {
                cluster
                    .balancer
                    .report(&host, Outcome::Success, Instant::now());
                host.state
                    .active
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let r = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                host.state
                    .active
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                return r
                    .map(|_| ())
                    .map_err(|e| format!("{:?}: {e}", host.upstream));
            }
            Err(e) => {
                if cluster
                    .balancer
                    .report(&host, Outcome::GatewayError, Instant::now())
                {
                    tracing::warn!(cluster = %cluster_name, upstream = ?host.upstream,
                        "outlier detection ejected a host");
                }
                errors.push(e);
            }
        }
    }
    if errors.is_empty() {
        Err(format!("no healthy upstream in cluster {cluster_name}"))
    } else {
        Err(format!(
            "no connection to cluster {cluster_name}: {}",
            errors.join("; ")
        ))
    }
}

async fn connect(
    compiled: &Compiled,
    host: &Host,
    timeout: Duration,
) -> Result<Box<dyn Stream>, String> {
    match &host.upstream {
        Upstream::Direct(addr) => {
            let s = tokio::time::timeout(timeout, TcpStream::connect(addr))
                .await
                .map_err(|_| format!("{addr}: no connection within {timeout:?}"))?
                .map_err(|e| format!("{addr}: {e}"))?;
            let _ = s.set_nodelay(true);
            Ok(Box::new(s))
        }
        Upstream::Tunnel { cluster, authority } => {
            let g = compiled
                .gateway()
                .ok_or_else(|| format!("no gateway is configured to reach cluster {cluster}"))?;
            let up = g
                .open(cluster, authority)
                .await
                .map_err(|e| e.to_string())?;
            Ok(Box::new(hyper_util::rt::TokioIo::new(up)))
        }
    }
}
