//! Outbound TCP listeners: every accepted connection goes to one endpoint of the listener's
//! cluster, chosen with the cluster's balancer (priorities, localities, outlier ejection), and
//! bytes are copied both ways, half-closes included.
//!
//! A connection that cannot be made (refused, timed out, a tunnel the gateway refuses) is tried
//! again on another host and another priority, up to [`CONNECT_ATTEMPTS`] times, before the
//! downstream connection is closed — nothing has been sent yet, so moving is always safe. The
//! cluster's `max_connections` bounds the connections open through it (more are closed at once).
//! A connection with no bytes either way for the listener's idle timeout (Envoy's default 1 h)
//! is closed.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::config::{ClusterConfig, ListenerKind, TCP_IDLE_TIMEOUT, Upstream};
use crate::dataplane::Compiled;
use crate::lb::{Host, Outcome, ThreadRandom, Tried};

/// Connection attempts per downstream connection (on different hosts and priorities).
pub const CONNECT_ATTEMPTS: usize = 3;

pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
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
            // The listener's settings of the moment (a hot update applies to new connections).
            let idle = match compiled.config.listeners.get(&*name).map(|l| &l.kind) {
                Some(ListenerKind::Tcp { idle_timeout, .. }) => *idle_timeout,
                _ => Some(TCP_IDLE_TIMEOUT),
            };
            if let Err(e) = proxy_one(&compiled, &cluster, stream, idle).await {
                tracing::debug!(listener = %name, %peer, error = %e, "TCP connection not proxied");
            }
        });
    }
}

pub(crate) async fn proxy_one(
    compiled: &Compiled,
    cluster_name: &str,
    down: TcpStream,
    idle: Option<Duration>,
) -> Result<(), String> {
    let cluster = compiled
        .clusters
        .get(cluster_name)
        .ok_or_else(|| format!("cluster {cluster_name} has no endpoints"))?;
    let Some(_slot) = cluster.tcp_slot() else {
        return Err(format!("cluster {cluster_name} is at max_connections"));
    };
    let mut rng = ThreadRandom;
    let mut tried = Tried::default();
    let mut errors = Vec::new();
    for _ in 0..CONNECT_ATTEMPTS {
        let Some(host) = tried.next(&cluster.balancer, &mut rng, Instant::now(), true, true) else {
            break;
        };
        match connect(compiled, &cluster.config, &host).await {
            Ok(up) => {
                cluster
                    .balancer
                    .report(&host, Outcome::Success, Instant::now());
                host.state
                    .active
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let r = splice(down, up, idle).await;
                host.state
                    .active
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                return r.map_err(|e| format!("{:?}: {e}", host.upstream));
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
    cluster: &ClusterConfig,
    host: &Host,
) -> Result<Box<dyn Stream>, String> {
    let timeout = cluster.connect_timeout;
    match &host.upstream {
        Upstream::Direct(addr) => {
            // Behind a sidecar: mutual TLS with the match's settings.
            let mutual = match host.socket.and_then(|i| cluster.tls_matches.get(i)) {
                Some(m) => match (&m.tls, compiled.workload_tls()) {
                    (None, _) => None,
                    (Some(settings), Some(tls)) => Some((settings, tls)),
                    (Some(_), None) => return Err(crate::tls::no_certificate(addr)),
                },
                None => None,
            };
            let s = tokio::time::timeout(timeout, TcpStream::connect(addr))
                .await
                .map_err(|_| format!("{addr}: no connection within {timeout:?}"))?
                .map_err(|e| format!("{addr}: {e}"))?;
            let _ = s.set_nodelay(true);
            match mutual {
                None => Ok(Box::new(s)),
                Some((settings, tls)) => Ok(Box::new(
                    crate::tls::handshake(tls, settings, s, timeout).await?,
                )),
            }
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

/// Copy both ways (half-closes propagated) until both directions end, or until no byte has
/// moved either way for `idle`.
pub(crate) async fn splice(
    down: impl Stream,
    up: impl Stream,
    idle: Option<Duration>,
) -> Result<(), String> {
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut down = Active {
        inner: down,
        start,
        last: last.clone(),
    };
    let mut up = Active {
        inner: up,
        start,
        last: last.clone(),
    };
    let copy = tokio::io::copy_bidirectional(&mut down, &mut up);
    let Some(idle) = idle else {
        return copy.await.map(|_| ()).map_err(|e| e.to_string());
    };
    tokio::select! {
        r = copy => r.map(|_| ()).map_err(|e| e.to_string()),
        () = async {
            loop {
                let due = start
                    + Duration::from_millis(last.load(Relaxed))
                    + idle;
                if Instant::now() >= due {
                    return;
                }
                tokio::time::sleep_until(due.into()).await;
            }
        } => Err(format!("idle for {idle:?}: closed")),
    }
}

/// A stream that notes when bytes last moved through it (milliseconds since `start`).
struct Active<S> {
    inner: S,
    start: Instant,
    last: Arc<AtomicU64>,
}

impl<S> Active<S> {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.fetch_max(ms, Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Active<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Active<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
