//! Outbound TCP listeners: every accepted connection goes to one endpoint of the listener's
//! cluster, chosen with the cluster's balancer (priorities, localities, outlier ejection), and
//! bytes are copied both ways, half-closes included.
//!
//! A connection that cannot be made (refused, timed out, a tunnel the gateway refuses) is tried
//! again on another host and another priority, up to [`CONNECT_ATTEMPTS`] times, before the
//! downstream connection is closed.
//!
//! A tunnel to another cluster asks its gateway for an early status, so that a new connection
//! costs one trip across clusters, not two: the client's first bytes go out right behind the
//! tunnel's header (up to [`EARLY_KEEP`]) while the other cluster's gateway connects, and they
//! are kept until its status comes. A refusal means no server got them: they are replayed on
//! the next host. A tunnel that fails after they went out and before its status is not tried
//! elsewhere (a server may have them; the client sees its connection reset, as it would with
//! a direct connection); one that fails before the client sent anything is.
//!
//! The cluster's `max_connections` bounds the connections open through it (more are closed at
//! once). A connection with no bytes either way for the listener's idle timeout (Envoy's default
//! 1 h) is closed.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use tower::Layer;
use tower_service::Service;

use crate::config::{
    ClusterConfig, ListenerKind, RetryOn, RetryPolicy, TCP_IDLE_TIMEOUT, Upstream,
};
use crate::lb::{Host, ThreadRandom, Tried};
use crate::runtime::{ClusterRuntime, Compiled};
use crate::stack::attempt::{Observes, OnHost, OutlierLayer};
use crate::stack::{Fut, Observed, Retry, classify};

/// Connection attempts per downstream connection (on different hosts and priorities).
pub const CONNECT_ATTEMPTS: usize = 3;

pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
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
        let (stream, peer) = crate::runtime::accept(&listener, &name).await;
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

/// A TCP connection's retry policy: a connection that cannot be made (a refusal included) is
/// tried on another host and priority, [`CONNECT_ATTEMPTS`] times in all; one that may have
/// delivered the client's bytes (a reset after they went out) is not.
pub fn connect_policy() -> RetryPolicy {
    RetryPolicy {
        on: RetryOn {
            connect_failure: true,
            ..RetryOn::default()
        },
        num_retries: u32::try_from(CONNECT_ATTEMPTS.saturating_sub(1)).unwrap_or(0),
        per_try_timeout: None,
        retriable_status_codes: Vec::new(),
        other_host: true,
        other_priority: true,
    }
}

/// Proxy one downstream connection to cluster `cluster_name`: a permit of its
/// `max_connections`, then attempts (each through outlier reporting, [`OutlierLayer`], to
/// [`Connect`]) until one connects or [`connect_policy`] says stop; then bytes both ways.
pub(crate) async fn proxy_one(
    compiled: &Arc<Compiled>,
    cluster_name: &str,
    down: TcpStream,
    idle: Option<Duration>,
) -> Result<(), String> {
    let cluster = compiled
        .clusters
        .get(cluster_name)
        .ok_or_else(|| format!("cluster {cluster_name} has no endpoints"))?;
    let limit = u64::from(cluster.config.thresholds.max_connections);
    let Some(_permit) = cluster.connections.try_acquire(limit) else {
        return Err(format!("cluster {cluster_name} is at max_connections"));
    };
    let policy = connect_policy();
    let mut attempt_svc = OutlierLayer.layer(Connect);
    let mut rng = ThreadRandom;
    let mut tried = Tried::default();
    let mut errors = Vec::new();
    let mut down = down;
    let mut first = FirstBytes::default();
    for _ in 0..=policy.num_retries {
        let Some(host) = tried.next(&cluster.balancer, &mut rng, Instant::now(), true, true) else {
            break;
        };
        let result = match attempt_svc
            .call(TcpAttempt {
                down,
                first,
                host: host.clone(),
                cluster: cluster.clone(),
                compiled: compiled.clone(),
            })
            .await
        {
            Ok(r) => r,
            Err(never) => match never {},
        };
        let again = result
            .observed()
            .map_or(Retry::No, |o| classify(o, Some(&policy)).1);
        match result {
            TcpAttempted::Connected { mut down, up, rest } => {
                if !rest.is_empty() {
                    use tokio::io::AsyncWriteExt as _;
                    down.write_all(&rest)
                        .await
                        .map_err(|e| format!("the client: {e}"))?;
                }
                let _active = host.state.active_guard();
                return splice(down, up, idle)
                    .await
                    .map_err(|e| format!("{:?}: {e}", host.upstream));
            }
            TcpAttempted::Refused {
                down: d,
                first: f,
                reason,
                ..
            } => {
                errors.push(reason);
                (down, first) = (d, f);
                if again == Retry::No {
                    break;
                }
            }
            TcpAttempted::Lost { down, reason } => {
                // Reset, not a clean end: the client must not take it for a reply.
                let _ = socket2::SockRef::from(&down).set_linger(Some(Duration::ZERO));
                return Err(format!(
                    "{:?}: {reason} (not tried elsewhere: the client's first bytes may have reached a server)",
                    host.upstream
                ));
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

/// One connection attempt on one host: the client's connection (and the first bytes it sent
/// to an earlier, refused attempt) go along and come back unless the attempt connects.
pub struct TcpAttempt {
    down: TcpStream,
    first: FirstBytes,
    host: Arc<Host>,
    cluster: Arc<ClusterRuntime>,
    compiled: Arc<Compiled>,
}

/// What a connection attempt gave.
pub enum TcpAttempted {
    /// Connected: bytes may flow (`rest`: the server's bytes that came with a tunnel's status).
    Connected {
        down: TcpStream,
        up: Box<dyn Stream>,
        rest: Vec<u8>,
    },
    /// Nothing of the client's reached a server (no connection, or a refusal): another host
    /// may be tried, with the client's first bytes replayed.
    Refused {
        down: TcpStream,
        first: FirstBytes,
        reason: String,
        /// The path's failure, not the host's (see [`Failure::Connect`]).
        path: bool,
    },
    /// The client's bytes may have reached a server (a tunnel failed after they went out and
    /// before its status came), or the client failed: the connection ends here.
    Lost { down: TcpStream, reason: String },
}

impl OnHost for TcpAttempt {
    fn host(&self) -> &Arc<Host> {
        &self.host
    }
    fn cluster(&self) -> &Arc<ClusterRuntime> {
        &self.cluster
    }
}

impl Observes for TcpAttempted {
    fn observed(&self) -> Option<Observed> {
        Some(match self {
            TcpAttempted::Connected { .. } => Observed::Connected,
            TcpAttempted::Refused { .. } => Observed::ConnectFailure,
            TcpAttempted::Lost { .. } => Observed::Reset,
        })
    }
    fn blames_host(&self) -> bool {
        !matches!(self, TcpAttempted::Refused { path: true, .. })
    }
}

/// The leaf of a TCP attempt: connect to the host (directly, with mutual TLS to a sidecar, or
/// through a tunnel), then replay the client's first bytes, or send them early on a tunnel
/// that gives an early status.
#[derive(Debug, Clone, Copy)]
pub struct Connect;

impl Service<TcpAttempt> for Connect {
    type Response = TcpAttempted;
    type Error = Infallible;
    type Future = Fut<TcpAttempted>;

    crate::stack::always_ready!();

    fn call(&mut self, a: TcpAttempt) -> Self::Future {
        Box::pin(async move {
            let TcpAttempt {
                mut down,
                mut first,
                host,
                cluster,
                compiled,
                ..
            } = a;
            let timeout = cluster.config.connect_timeout;
            let attempt = match connect(&compiled, &cluster.config, &host).await {
                Ok(Up::Ready(mut up)) => replay(&mut up, &first).await.map(|()| (up, Vec::new())),
                Ok(Up::Early(up)) => early_start(&mut down, up, &mut first, timeout).await,
                Err((reason, path)) => Err(Failure::Connect { reason, path }),
            };
            Ok(match attempt {
                Ok((up, rest)) => TcpAttempted::Connected { down, up, rest },
                Err(Failure::Connect { reason, path }) => TcpAttempted::Refused {
                    down,
                    first,
                    reason,
                    path,
                },
                Err(Failure::Lost(reason)) => TcpAttempted::Lost { down, reason },
            })
        })
    }
}

/// What one connection attempt gave.
enum Up {
    /// Ready for the client's bytes.
    Ready(Box<dyn Stream>),
    /// A tunnel with an early status: its first bytes will be the other cluster's gateway's
    /// status, and the client's first bytes may go out before it.
    Early(Box<dyn Stream>),
}

/// Why an attempt failed (see [`TcpAttempted`]).
enum Failure {
    /// Nothing of the client's reached a server (no connection, or a refusal): another host
    /// may be tried, with the client's first bytes replayed. `path`: the failure is the path's
    /// to an endpoint of another cluster, not the endpoint's (not counted by outlier
    /// detection).
    Connect { reason: String, path: bool },
    /// The client's bytes may have reached a server (a tunnel failed after they went out and
    /// before its status came), or the client failed: the connection ends here.
    Lost(String),
}

/// The most of a client's first bytes sent down an early-status tunnel before its status, and
/// kept until then for a replay elsewhere.
pub const EARLY_KEEP: usize = 64 * 1024;

/// The client's bytes sent before an upstream confirmed the connection.
#[derive(Default)]
pub struct FirstBytes {
    kept: Vec<u8>,
    /// The client has half-closed (its EOF reaches the upstream through the splice).
    ended: bool,
}

/// Replay the client's first bytes (refused by an earlier attempt) on a ready connection.
async fn replay(up: &mut Box<dyn Stream>, first: &FirstBytes) -> Result<(), Failure> {
    use tokio::io::AsyncWriteExt as _;
    if first.kept.is_empty() {
        return Ok(());
    }
    up.write_all(&first.kept)
        .await
        .map_err(|e| Failure::Lost(format!("replaying the client's first bytes: {e}")))
}

/// Start an early-status tunnel: the client's bytes (those of an earlier refused attempt first)
/// go out at once, up to [`EARLY_KEEP`], while the status is awaited (within `timeout`). An OK
/// gives the tunnel and whatever of the server's bytes came with the status.
async fn early_start(
    down: &mut TcpStream,
    mut up: Box<dyn Stream>,
    first: &mut FirstBytes,
    timeout: Duration,
) -> Result<(Box<dyn Stream>, Vec<u8>), Failure> {
    use federation::tunnel::{StatusCode, TunnelStatus, parse_frame};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    // Once the client's bytes went out on this tunnel, a failure before the status is not a
    // refusal: a server may have them.
    // The tunnel failing before its status is the path's doing (a gateway, the link).
    let failed = |sent: bool, why: String| {
        if sent {
            Failure::Lost(why)
        } else {
            Failure::Connect {
                reason: why,
                path: true,
            }
        }
    };
    let mut sent = false;
    if !first.kept.is_empty() {
        sent = true;
        up.write_all(&first.kept)
            .await
            .map_err(|e| failed(true, format!("tunnel: {e}")))?;
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut head: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match parse_frame::<TunnelStatus>(&head) {
            Ok(Some((status, used))) => {
                if status.code == StatusCode::Ok as i32 {
                    first.kept = Vec::new();
                    return Ok((up, head.split_off(used)));
                }
                let known = StatusCode::try_from(status.code).ok();
                let code = known
                    .map(|c| format!("{c:?}"))
                    .unwrap_or_else(|| format!("status {}", status.code));
                // A refusal: the other gateway connected to nothing, whatever was sent.
                return Err(Failure::Connect {
                    reason: format!(
                        "tunnel refused by the other cluster's gateway: {code}: {}",
                        status.message
                    ),
                    path: !known.is_some_and(|c| {
                        federation::tunnel::Refusal::blames_endpoint(
                            federation::tunnel::Refusal::Remote(c).as_str(),
                        )
                    }),
                });
            }
            Ok(None) => {}
            Err(e) => return Err(failed(sent, format!("the tunnel's status: {e}"))),
        }
        let room = EARLY_KEEP.saturating_sub(first.kept.len()).min(buf.len());
        let read_client = !first.ended && room > 0;
        tokio::select! {
            r = up.read_buf(&mut head) => match r {
                Ok(0) => return Err(failed(sent, "the tunnel ended before its status".into())),
                Ok(_) => {}
                Err(e) => {
                    return Err(failed(sent, format!("the tunnel failed before its status: {e}")));
                }
            },
            r = down.read(&mut buf[..room]), if read_client => match r {
                Ok(0) => first.ended = true,
                Ok(n) => {
                    let bytes = &buf[..n];
                    first.kept.extend_from_slice(bytes);
                    sent = true;
                    up.write_all(bytes)
                        .await
                        .map_err(|e| failed(true, format!("tunnel: {e}")))?;
                }
                Err(e) => return Err(Failure::Lost(format!("the client: {e}"))),
            },
            () = tokio::time::sleep_until(deadline) => {
                return Err(failed(sent, format!("no status from the tunnel within {timeout:?}")));
            }
        }
    }
}

/// Connect to `host`; a failure says why, and whether it is the path's (see
/// [`Failure::Connect`]).
async fn connect(
    compiled: &Compiled,
    cluster: &ClusterConfig,
    host: &Host,
) -> Result<Up, (String, bool)> {
    match &host.upstream {
        Upstream::Direct(addr) => connect_direct(compiled, cluster, host, *addr)
            .await
            .map_err(|e| (e, false)),
        Upstream::Tunnel {
            cluster: c,
            authority,
            endpoint,
        } => {
            let g = compiled.gateway().ok_or_else(|| {
                (
                    format!("no gateway is configured to reach cluster {c}"),
                    true,
                )
            })?;
            let (up, early) = g
                .open_early(c, authority, *endpoint)
                .await
                .map_err(|e| (e.to_string(), !e.blames_endpoint()))?;
            let up: Box<dyn Stream> = Box::new(hyper_util::rt::TokioIo::new(up));
            Ok(if early { Up::Early(up) } else { Up::Ready(up) })
        }
    }
}

async fn connect_direct(
    compiled: &Compiled,
    cluster: &ClusterConfig,
    host: &Host,
    addr: std::net::SocketAddr,
) -> Result<Up, String> {
    let timeout = cluster.connect_timeout;
    // Behind a sidecar: mutual TLS with the match's settings.
    let mutual = match host.socket.and_then(|i| cluster.tls_matches.get(i)) {
        Some(m) => match (&m.tls, compiled.workload_tls()) {
            (None, _) => None,
            (Some(settings), Some(tls)) => Some((settings, tls)),
            (Some(_), None) => return Err(crate::tls::no_certificate(&addr)),
        },
        None => None,
    };
    let s = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("{addr}: no connection within {timeout:?}"))?
        .map_err(|e| format!("{addr}: {e}"))?;
    let _ = s.set_nodelay(true);
    match mutual {
        None => Ok(Up::Ready(Box::new(s))),
        Some((settings, tls)) => Ok(Up::Ready(Box::new(
            crate::tls::handshake(tls, settings, s, timeout).await?,
        ))),
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

#[cfg(test)]
mod tests {
    use super::*;
    use federation::tunnel::{StatusCode, TunnelStatus, encode_frame};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// A client connection (its far end, and the proxy's end) over loopback.
    async fn client_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (down, _) = l.accept().await.unwrap();
        (client, down)
    }

    fn status(code: StatusCode) -> Vec<u8> {
        encode_frame(&TunnelStatus {
            code: code as i32,
            message: format!("{code:?}"),
            endpoint: String::new(),
        })
        .unwrap()
    }

    /// The tunnel's far end: a duplex pipe standing in for the gateway.
    fn tunnel() -> (Box<dyn Stream>, DuplexStream) {
        let (a, b) = tokio::io::duplex(256 * 1024);
        (Box::new(a), b)
    }

    const WAIT: Duration = Duration::from_secs(5);

    /// A TCP connection's attempts read the same classifier as HTTP's: a refusal moves on, a
    /// connection that may have delivered bytes does not, a connection is a success.
    #[test]
    fn tcp_attempts_are_classified_like_requests() {
        use crate::lb::Outcome;
        let p = connect_policy();
        assert_eq!(
            usize::try_from(p.num_retries).unwrap() + 1,
            CONNECT_ATTEMPTS
        );
        assert_eq!(
            classify(Observed::ConnectFailure, Some(&p)),
            (Outcome::GatewayError, Retry::Yes)
        );
        assert_eq!(
            classify(Observed::Reset, Some(&p)),
            (Outcome::GatewayError, Retry::No)
        );
        assert_eq!(
            classify(Observed::Connected, Some(&p)),
            (Outcome::Success, Retry::No)
        );
    }

    #[tokio::test]
    async fn an_ok_status_gives_the_tunnel_and_what_came_with_it() {
        let (mut client, mut down) = client_pair().await;
        let (up, mut gw) = tunnel();
        client.write_all(b"hello").await.unwrap();
        let far = tokio::spawn(async move {
            let mut got = [0u8; 5];
            gw.read_exact(&mut got).await.unwrap();
            let mut answer = status(StatusCode::Ok);
            answer.extend_from_slice(b"server says hi");
            gw.write_all(&answer).await.unwrap();
            (got, gw)
        });
        let mut first = FirstBytes::default();
        let (_up, rest) = early_start(&mut down, up, &mut first, WAIT)
            .await
            .unwrap_or_else(|_| panic!("the tunnel opened"));
        let (got, _gw) = far.await.unwrap();
        assert_eq!(&got, b"hello", "the first bytes went out before the status");
        assert!(first.kept.is_empty(), "nothing kept after an OK");
        // What followed the status in the same read belongs to the client (the status frame
        // may also come alone; then `rest` is empty and the bytes follow in the splice).
        assert!(b"server says hi".starts_with(&rest), "{rest:?}");
    }

    #[tokio::test]
    async fn a_refusal_keeps_the_first_bytes_for_a_replay() {
        let (mut client, mut down) = client_pair().await;
        let (up, mut gw) = tunnel();
        client.write_all(b"hello").await.unwrap();
        let far = tokio::spawn(async move {
            let mut got = [0u8; 5];
            gw.read_exact(&mut got).await.unwrap();
            gw.write_all(&status(StatusCode::NoEndpoint)).await.unwrap();
            gw
        });
        let mut first = FirstBytes::default();
        match early_start(&mut down, up, &mut first, WAIT).await {
            // The endpoint's failure (no endpoint there), counted against it.
            Err(Failure::Connect { reason, path }) => {
                assert!(reason.contains("NoEndpoint"), "{reason}");
                assert!(
                    !path,
                    "NoEndpoint is the endpoint's failure, not the path's"
                );
            }
            Err(Failure::Lost(why)) => panic!("a refusal taken for a loss: {why}"),
            Ok(_) => panic!("a refused tunnel opened"),
        }
        let _gw = far.await.unwrap();
        assert_eq!(first.kept, b"hello");

        // The next attempt (another early tunnel) gets them first.
        let (up, mut gw) = tunnel();
        let far = tokio::spawn(async move {
            let mut got = [0u8; 5];
            gw.read_exact(&mut got).await.unwrap();
            gw.write_all(&status(StatusCode::Ok)).await.unwrap();
            (got, gw)
        });
        assert!(early_start(&mut down, up, &mut first, WAIT).await.is_ok());
        let (got, _gw) = far.await.unwrap();
        assert_eq!(&got, b"hello", "replayed");
    }

    #[tokio::test]
    async fn a_tunnel_lost_after_the_first_bytes_went_out_is_not_moved() {
        let (mut client, mut down) = client_pair().await;
        let (up, mut gw) = tunnel();
        client.write_all(b"hello").await.unwrap();
        let far = tokio::spawn(async move {
            let mut got = [0u8; 5];
            gw.read_exact(&mut got).await.unwrap();
            // The link dies before any status.
            drop(gw);
        });
        let mut first = FirstBytes::default();
        match early_start(&mut down, up, &mut first, WAIT).await {
            Err(Failure::Lost(why)) => assert!(why.contains("before its status"), "{why}"),
            Err(Failure::Connect { reason, .. }) => {
                panic!("moved elsewhere after its bytes went out: {reason}")
            }
            Ok(_) => panic!("a dead tunnel opened"),
        }
        far.await.unwrap();
    }

    #[tokio::test]
    async fn a_tunnel_lost_before_the_client_sent_anything_is_moved() {
        let (_client, mut down) = client_pair().await;
        let (up, gw) = tunnel();
        drop(gw);
        let mut first = FirstBytes::default();
        assert!(matches!(
            early_start(&mut down, up, &mut first, WAIT).await,
            Err(Failure::Connect { .. })
        ));
    }

    #[tokio::test]
    async fn garbage_or_silence_instead_of_a_status_fails_the_attempt() {
        // Garbage, with the client's bytes out: lost.
        let (mut client, mut down) = client_pair().await;
        let (up, mut gw) = tunnel();
        client.write_all(b"hello").await.unwrap();
        let far = tokio::spawn(async move {
            let mut got = [0u8; 5];
            gw.read_exact(&mut got).await.unwrap();
            gw.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
            gw
        });
        let mut first = FirstBytes::default();
        match early_start(&mut down, up, &mut first, WAIT).await {
            Err(Failure::Lost(why)) => assert!(why.contains("status"), "{why}"),
            _ => panic!("garbage taken for a status"),
        }
        let _gw = far.await.unwrap();

        // Silence, the client silent too: moved after the timeout.
        let (_client, mut down) = client_pair().await;
        let (up, _gw) = tunnel();
        let mut first = FirstBytes::default();
        match early_start(&mut down, up, &mut first, Duration::from_millis(100)).await {
            // A tunnel that gives no status: the path's failure (a gateway, the link).
            Err(Failure::Connect { reason, path }) => {
                assert!(reason.contains("no status"), "{reason}");
                assert!(path, "a silent tunnel is the path's failure");
            }
            _ => panic!("a silent tunnel was not given up"),
        }
    }

    #[tokio::test]
    async fn no_more_than_the_replay_limit_goes_out_before_the_status() {
        let (mut client, mut down) = client_pair().await;
        let (up, mut gw) = tunnel();
        let writer = tokio::spawn(async move {
            // More than the limit; the rest waits in the socket.
            let _ = client.write_all(&vec![7u8; EARLY_KEEP * 2]).await;
            client
        });
        let far = tokio::spawn(async move {
            let mut got = vec![0u8; EARLY_KEEP];
            gw.read_exact(&mut got).await.unwrap();
            gw.write_all(&status(StatusCode::Ok)).await.unwrap();
            gw
        });
        let mut first = FirstBytes::default();
        let Ok((_up, _)) = early_start(&mut down, up, &mut first, WAIT).await else {
            panic!("the tunnel opened");
        };
        let mut gw = far.await.unwrap();
        // Exactly the limit went out before the status.
        let mut more = [0u8; 1];
        assert!(
            tokio::time::timeout(Duration::from_millis(200), gw.read(&mut more))
                .await
                .is_err(),
            "more than {EARLY_KEEP} bytes went out before the status"
        );
        drop(writer);
    }
}
