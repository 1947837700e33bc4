//! Tunnels to other clusters through the local east-west gateway.
//!
//! An endpoint of another cluster ([`Upstream::Tunnel`](crate::config::Upstream)) is reached
//! with an HTTP/2 `CONNECT SERVICE.NAMESPACE:PORT` carrying `strait-cluster: C`, sent to the
//! local gateway's ingress over mutual TLS with the workload certificate (the gateway must
//! present `spiffe://TD/cluster/OWN/gateway`). Every tunnel is one stream of **one** HTTP/2
//! connection to the gateway, opened on first use, kept alive with pings (a dead gateway is
//! noticed within seconds) and opened again when it fails.
//!
//! Each connection keeps a drain watch (`GET /strait/v1/drain`, answered when the gateway
//! starts shutting down): from then on new tunnels go through the next replica, and pooled
//! connections riding this connection's tunnels are not reused after their request under way
//! ([`Draining`]), so the gateway's tunnels end and its drain completes without a request lost.
//!
//! The gateway's refusals keep their meaning: unknown cluster 404, link down or no endpoint
//! 503, not authorized 403 — each a connect failure of the attempt, with the gateway's reason,
//! so the request is retried elsewhere.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper::upgrade::Upgraded;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::config::UpstreamTls;
use crate::tls::TlsSource;
use federation::tunnel::EARLY_STATUS_HEADER;
/// The gateway ingress protocol's headers (defined with the tunnel protocol).
pub use federation::tunnel::{CLUSTER_HEADER, ENDPOINT_HEADER, REASON_HEADER};

/// The host suffix of the synthetic URIs that address a tunnelled endpoint (see
/// [`tunnel_authority`]).
const TUNNEL_SUFFIX: &str = ".strait-tunnel";

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("no gateway is configured to reach cluster {0}")]
    NoGateway(String),
    #[error("gateway {gateway}: {message}")]
    Connect {
        gateway: SocketAddr,
        message: String,
    },
    #[error("gateway {gateway} refused {authority} in cluster {cluster}: {status} {reason}")]
    Refused {
        gateway: SocketAddr,
        cluster: String,
        authority: String,
        status: u16,
        reason: String,
        /// Whether the refusal is the endpoint's failure (`strait-refusal` names one), not the
        /// path's; a gateway of an earlier release does not say, and counts as the endpoint's.
        endpoint_fault: bool,
    },
    #[error("gateway {gateway}: the tunnel to {authority} in cluster {cluster} failed: {message}")]
    Stream {
        gateway: SocketAddr,
        cluster: String,
        authority: String,
        message: String,
    },
    #[error("bad tunnel target {0}")]
    Target(String),
}

impl TunnelError {
    /// Whether this is a failure of the endpoint the tunnel went to (counted by outlier
    /// detection) rather than of the path to it: the local gateway, a link between clusters,
    /// the remote gateway's own trouble — retried elsewhere, not counted against the endpoint,
    /// so a link outage ejects no endpoint. A refusal from a gateway of an earlier release
    /// (no `strait-refusal`) counts, as it did.
    pub fn blames_endpoint(&self) -> bool {
        match self {
            TunnelError::Refused { endpoint_fault, .. } => *endpoint_fault,
            TunnelError::NoGateway(_)
            | TunnelError::Connect { .. }
            | TunnelError::Stream { .. }
            | TunnelError::Target(_) => false,
        }
    }

    /// The tunnel error somewhere in `e`'s chain of sources.
    pub fn find<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a TunnelError> {
        let mut cur = Some(e);
        while let Some(e) = cur {
            if let Some(t) = e.downcast_ref::<TunnelError>() {
                return Some(t);
            }
            cur = e.source();
        }
        None
    }
}

/// Set when the gateway connection a tunnel rides on is draining: a pooled connection over it
/// is not reused (the data plane poisons it after its request).
#[derive(Clone, Debug, Default)]
pub struct Draining(Arc<std::sync::atomic::AtomicBool>);

impl Draining {
    pub fn is_set(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn set(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A connection to the gateway: its sender, the replica it goes to (index in
/// [`Gateway::addresses`]), and whether the gateway said it is draining.
type GatewayConn = (SendRequest<Empty<Bytes>>, usize, Draining);

/// Settings of the connection to the gateway.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// The local gateway's ingress.
    pub address: SocketAddr,
    /// The ingresses of the cluster's other gateway replicas: when the connection to one
    /// cannot be made or ends, tunnels go through the next.
    pub replicas: Vec<SocketAddr>,
    /// TCP connect and TLS handshake, each.
    pub connect_timeout: Duration,
    /// HTTP/2 pings on the connection; a gateway that does not answer within
    /// `keepalive_timeout` is dropped and tunnels open on a new connection.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl GatewayOptions {
    pub fn new(address: SocketAddr) -> Self {
        Self {
            address,
            replicas: Vec::new(),
            connect_timeout: Duration::from_secs(2),
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(3),
        }
    }
}

/// The local gateway: tunnels on one multiplexed HTTP/2 connection, to one of the cluster's
/// gateway replicas at a time.
pub struct Gateway {
    options: GatewayOptions,
    tls: TlsSource,
    conn: tokio::sync::Mutex<Option<GatewayConn>>,
    /// The replica the last connection went to.
    current: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("address", &self.options.address)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// `tls` must be a [`TlsSource`] for [`Peer::Gateway`](crate::tls::Peer) offering `h2`.
    pub fn new(options: GatewayOptions, tls: TlsSource) -> Self {
        Self {
            options,
            tls,
            conn: tokio::sync::Mutex::new(None),
            current: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Every gateway replica's ingress, the first given first.
    fn addresses(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        std::iter::once(self.options.address).chain(self.options.replicas.iter().copied())
    }

    /// Whether the gateway of the connection in use said it is shutting down (its drain watch
    /// was answered).
    pub async fn draining(&self) -> bool {
        self.conn
            .lock()
            .await
            .as_ref()
            .is_some_and(|(_, _, d)| d.is_set())
    }

    /// The ingress of the replica tunnels go through now.
    pub fn address(&self) -> SocketAddr {
        let i = self.current.load(std::sync::atomic::Ordering::Relaxed);
        self.addresses().nth(i).unwrap_or(self.options.address)
    }

    /// Open a tunnel to `authority` (`SERVICE.NAMESPACE:PORT`) in `cluster`, to the endpoint the
    /// remote gateway chooses.
    pub async fn open(&self, cluster: &str, authority: &str) -> Result<Upgraded, TunnelError> {
        self.open_to(cluster, authority, None).await
    }

    /// Open a tunnel to `authority` in `cluster`, to its endpoint `endpoint` (its own address
    /// there) when given: the remote gateway connects to that endpoint if it is a serving
    /// endpoint of the service, and refuses the tunnel otherwise (503, `not_an_endpoint`).
    pub async fn open_to(
        &self,
        cluster: &str,
        authority: &str,
        endpoint: Option<SocketAddr>,
    ) -> Result<Upgraded, TunnelError> {
        self.open_with(cluster, authority, endpoint, false)
            .await
            .map(|(up, _, _)| up)
    }

    /// [`Gateway::open_to`] for a pooled connection: with the flag of the gateway connection's
    /// drain.
    pub async fn open_pooled(
        &self,
        cluster: &str,
        authority: &str,
        endpoint: Option<SocketAddr>,
    ) -> Result<(Upgraded, Draining), TunnelError> {
        self.open_with(cluster, authority, endpoint, false)
            .await
            .map(|(up, _, draining)| (up, draining))
    }

    /// Open a tunnel asking for an **early status**: the gateway answers as soon as its stream to
    /// the other cluster is open, and the tunnel's first bytes are then the other gateway's
    /// status frame ([`federation::tunnel::parse_frame`]), to be read before anything else; the
    /// client's first bytes can go out meanwhile. `true` when the gateway granted it (a gateway
    /// that does not know it answers after the status, and the tunnel carries only the
    /// connection's bytes).
    pub async fn open_early(
        &self,
        cluster: &str,
        authority: &str,
        endpoint: Option<SocketAddr>,
    ) -> Result<(Upgraded, bool), TunnelError> {
        self.open_with(cluster, authority, endpoint, true)
            .await
            .map(|(up, granted, _)| (up, granted))
    }

    async fn open_with(
        &self,
        cluster: &str,
        authority: &str,
        endpoint: Option<SocketAddr>,
        early: bool,
    ) -> Result<(Upgraded, bool, Draining), TunnelError> {
        // A CONNECT that got no answer on a connection made earlier (it just died, or the
        // gateway is shutting down: GOAWAY refuses new streams) is tried once more on a new
        // connection, to the next replica. So is one refused by a replica that has no link to
        // the cluster now (another replica's may be up: routes follow the cluster's link, up
        // while any replica's is). Safe: no byte of the client went out on it.
        let mut fresh = false;
        let several = self.addresses().nth(1).is_some();
        // The refusal of a replica without the link, while the next one is tried: what the
        // caller gets if the next one is that same replica or none can be reached.
        let mut refused_by: Option<(SocketAddr, TunnelError)> = None;
        loop {
            let (mut sender, new, gateway, draining) = match self.sender(fresh).await {
                Ok(s) => s,
                Err(e) => return Err(refused_by.map_or(e, |(_, r)| r)),
            };
            if let Some((by, refusal)) = refused_by.take()
                && by == gateway
            {
                return Err(refusal);
            }
            let mut req = Request::builder()
                .method(Method::CONNECT)
                .uri(authority)
                .header(CLUSTER_HEADER, cluster);
            if let Some(e) = endpoint {
                req = req.header(ENDPOINT_HEADER, e.to_string());
            }
            if early {
                req = req.header(EARLY_STATUS_HEADER, "1");
            }
            let req = req
                .body(Empty::new())
                .map_err(|e| TunnelError::Target(format!("{authority}: {e}")))?;
            let stream_err = |message: String| TunnelError::Stream {
                gateway,
                cluster: cluster.to_string(),
                authority: authority.to_string(),
                message,
            };
            let resp = match sender.send_request(req).await {
                Ok(r) => r,
                Err(e) if !new && !fresh => {
                    tracing::debug!(%gateway, error = %e, "the gateway connection refused a tunnel; trying a new connection");
                    fresh = true;
                    continue;
                }
                Err(e) => return Err(stream_err(e.to_string())),
            };
            if resp.status() != StatusCode::OK {
                let reason = resp
                    .headers()
                    .get(REASON_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let refusal = TunnelError::Refused {
                    gateway,
                    cluster: cluster.to_string(),
                    authority: authority.to_string(),
                    status: resp.status().as_u16(),
                    reason,
                    endpoint_fault: resp
                        .headers()
                        .get(federation::tunnel::REFUSAL_HEADER)
                        .is_none_or(|v| {
                            v.to_str()
                                .is_ok_and(federation::tunnel::Refusal::blames_endpoint)
                        }),
                };
                if several
                    && !fresh
                    && resp
                        .headers()
                        .contains_key(federation::tunnel::TRY_ANOTHER_REPLICA_HEADER)
                {
                    tracing::debug!(%gateway, %cluster, "the gateway replica has no link to the cluster; trying the next replica");
                    refused_by = Some((gateway, refusal));
                    fresh = true;
                    continue;
                }
                return Err(refusal);
            }
            let granted = early
                && resp
                    .headers()
                    .get(EARLY_STATUS_HEADER)
                    .is_some_and(|v| v.as_bytes() == b"1");
            return hyper::upgrade::on(resp)
                .await
                .map(|up| (up, granted, draining))
                .map_err(|e| stream_err(e.to_string()));
        }
    }

    /// The connection's sender, connecting if there is none (or `fresh` is asked, or the
    /// gateway said it is draining); `true` when it was made now; the ingress it goes to; its
    /// drain flag. A new connection goes to the replica after the one the last went to (that
    /// one just failed or is going away), then to each in turn.
    async fn sender(
        &self,
        fresh: bool,
    ) -> Result<(SendRequest<Empty<Bytes>>, bool, SocketAddr, Draining), TunnelError> {
        let mut conn = self.conn.lock().await;
        let start = match conn.as_ref() {
            Some((s, i, d)) if !fresh && !s.is_closed() && !d.is_set() => {
                let at = self.addresses().nth(*i).unwrap_or(self.options.address);
                return Ok((s.clone(), false, at, d.clone()));
            }
            Some((_, i, _)) => i + 1,
            None => self.current.load(std::sync::atomic::Ordering::Relaxed),
        };
        *conn = None;
        let addrs: Vec<SocketAddr> = self.addresses().collect();
        let mut last = None;
        for k in 0..addrs.len() {
            let i = (start + k) % addrs.len();
            let Some(&gateway) = addrs.get(i) else {
                continue;
            };
            match self.connect(gateway).await {
                Ok(s) => {
                    let draining = Draining::default();
                    watch_drain(s.clone(), gateway, draining.clone());
                    *conn = Some((s.clone(), i, draining.clone()));
                    self.current.store(i, std::sync::atomic::Ordering::Relaxed);
                    return Ok((s, true, gateway, draining));
                }
                Err(e) => {
                    if addrs.len() > 1 {
                        tracing::warn!(%gateway, error = %e, "gateway replica unreachable; trying the next");
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or(TunnelError::Connect {
            gateway: self.options.address,
            message: "no gateway address".into(),
        }))
    }

    async fn connect(&self, gateway: SocketAddr) -> Result<SendRequest<Empty<Bytes>>, TunnelError> {
        let err = |message: String| TunnelError::Connect { gateway, message };
        let config = self.tls.config().map_err(|e| err(e.to_string()))?;
        let timeout = self.options.connect_timeout;
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(gateway))
            .await
            .map_err(|_| err(format!("no TCP connection within {timeout:?}")))?
            .map_err(|e| err(format!("TCP: {e}")))?;
        let _ = tcp.set_nodelay(true);
        // The gateway is authenticated by its SPIFFE identity, not by a DNS name.
        let name = rustls_pki_types::ServerName::IpAddress(gateway.ip().into());
        let tls = tokio::time::timeout(
            timeout,
            tokio_rustls::TlsConnector::from(config).connect(name, tcp),
        )
        .await
        .map_err(|_| err(format!("no TLS handshake within {timeout:?}")))?
        .map_err(|e| err(format!("TLS: {e}")))?;
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(self.options.keepalive_interval)
            .keep_alive_timeout(self.options.keepalive_timeout)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| err(format!("HTTP/2: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(%gateway, error = %e, "connection to the gateway ended");
            }
        });
        tracing::info!(%gateway, "connected to the local gateway");
        Ok(sender)
    }
}

/// The authority the connection pool uses for a tunnelled endpoint:
/// `SERVICE.NAMESPACE.CLUSTER.ENDPOINT.strait-tunnel:PORT`, where `ENDPOINT` encodes the remote
/// endpoint's address (`any` when the remote gateway chooses): one pool per remote endpoint, so
/// requests to different endpoints never share a connection, and [`Connector`] turns it back
/// into a tunnel to that endpoint.
pub fn tunnel_authority(
    cluster: &str,
    authority: &str,
    endpoint: Option<SocketAddr>,
) -> Result<String, TunnelError> {
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or_else(|| TunnelError::Target(format!("{authority} has no port")))?;
    if host.is_empty()
        || cluster.is_empty()
        || cluster.contains('.')
        || port.parse::<u16>().is_err()
    {
        return Err(TunnelError::Target(format!(
            "{authority} in cluster {cluster}"
        )));
    }
    let label = endpoint.map_or_else(|| ANY_ENDPOINT.to_string(), endpoint_label);
    Ok(format!("{host}.{cluster}.{label}{TUNNEL_SUFFIX}:{port}"))
}

/// The label of [`tunnel_authority`] for no endpoint named.
const ANY_ENDPOINT: &str = "any";

/// A DNS label for an endpoint address: `e` and the address's bytes and port in hex
/// (`e0a0000011f90` is 10.0.0.1:8080; IPv6 addresses give 37 characters, under the label limit
/// of 63).
fn endpoint_label(a: SocketAddr) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(38);
    out.push('e');
    let octets = match a.ip() {
        std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
        std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    for b in octets {
        let _ = write!(out, "{b:02x}");
    }
    let _ = write!(out, "{:04x}", a.port());
    out
}

fn parse_endpoint_label(label: &str) -> Option<Option<SocketAddr>> {
    if label == ANY_ENDPOINT {
        return Some(None);
    }
    let hex = label.strip_prefix('e')?;
    if !hex.is_ascii() || hex.len() % 2 != 0 {
        return None;
    }
    let bytes: Vec<u8> = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
        .collect::<Option<_>>()?;
    let (ip, port) = match bytes.len() {
        6 => {
            let o: [u8; 4] = bytes.get(..4)?.try_into().ok()?;
            (std::net::IpAddr::from(o), bytes.get(4..6)?)
        }
        18 => {
            let o: [u8; 16] = bytes.get(..16)?.try_into().ok()?;
            (std::net::IpAddr::from(o), bytes.get(16..18)?)
        }
        _ => return None,
    };
    let port = u16::from_be_bytes(port.try_into().ok()?);
    Some(Some(SocketAddr::new(ip, port)))
}

/// What a URI with a [`tunnel_authority`] names: cluster, authority and endpoint.
type TunnelTarget = (String, String, Option<SocketAddr>);

fn tunnel_target(uri: &Uri) -> Option<TunnelTarget> {
    let host = uri.host()?.strip_suffix(TUNNEL_SUFFIX)?;
    let (rest, label) = host.rsplit_once('.')?;
    let endpoint = parse_endpoint_label(label)?;
    let (service, cluster) = rest.rsplit_once('.')?;
    let port = uri.port_u16()?;
    Some((cluster.to_string(), format!("{service}:{port}"), endpoint))
}

/// A connection to an endpoint: TCP, mutual TLS to its sidecar, or a tunnel through the
/// gateway.
pub enum Conn {
    Tcp(TokioIo<TcpStream>),
    Tls(Box<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>),
    /// A tunnel, with the drain flag of the gateway connection it rides on (in the
    /// connection's extras, for the data plane to check after each request).
    Tunnel(Upgraded, Draining),
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        match self {
            Conn::Tcp(t) => t.connected(),
            Conn::Tls(t) => t.inner().get_ref().0.connected(),
            Conn::Tunnel(_, draining) => Connected::new().extra(draining.clone()),
        }
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(t) => Pin::new(t).poll_read(cx, buf),
            Conn::Tls(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
            Conn::Tunnel(t, _) => Pin::new(t).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(t) => Pin::new(t).poll_write(cx, buf),
            Conn::Tls(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
            Conn::Tunnel(t, _) => Pin::new(t).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(t) => Pin::new(t).poll_flush(cx),
            Conn::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
            Conn::Tunnel(t, _) => Pin::new(t).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(t) => Pin::new(t).poll_shutdown(cx),
            Conn::Tls(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
            Conn::Tunnel(t, _) => Pin::new(t).poll_shutdown(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Tcp(t) => t.is_write_vectored(),
            Conn::Tls(t) => t.is_write_vectored(),
            Conn::Tunnel(t, _) => t.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(t) => Pin::new(t).poll_write_vectored(cx, bufs),
            Conn::Tls(t) => Pin::new(t.as_mut()).poll_write_vectored(cx, bufs),
            Conn::Tunnel(t, _) => Pin::new(t).poll_write_vectored(cx, bufs),
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Keep a drain watch on a new gateway connection: when the gateway answers it (it is shutting
/// down), set `draining`. A gateway that knows no drain watch refuses it at once: no watch.
fn watch_drain(mut sender: SendRequest<Empty<Bytes>>, gateway: SocketAddr, draining: Draining) {
    tokio::spawn(async move {
        let Ok(req) = Request::get(format!(
            "https://{gateway}{}",
            federation::tunnel::DRAIN_PATH
        ))
        .body(Empty::new()) else {
            return;
        };
        match sender.send_request(req).await {
            Ok(r) if r.status() == StatusCode::OK => {
                draining.set();
                tracing::info!(%gateway, "the gateway is shutting down: new tunnels go through the next replica, pooled ones end after their request");
            }
            Ok(r) => {
                tracing::debug!(%gateway, status = %r.status(), "the gateway keeps no drain watch")
            }
            Err(e) => tracing::debug!(%gateway, error = %e, "drain watch ended"),
        }
    });
}

/// The connection pools' connector: TCP to local endpoints (or mutual TLS to their sidecars),
/// tunnels to remote ones.
#[derive(Clone)]
pub struct Connector {
    http: HttpConnector,
    gateway: Option<Arc<Gateway>>,
    /// Every direct connection is mutual TLS with these settings (a pool for the endpoints of
    /// one transport-socket match).
    mutual: Option<(Arc<TlsSource>, Arc<UpstreamTls>)>,
    no_certificate: bool,
    timeout: Duration,
}

impl Connector {
    pub fn new(connect_timeout: Duration, gateway: Option<Arc<Gateway>>) -> Self {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        Self {
            http,
            gateway,
            mutual: None,
            no_certificate: false,
            timeout: connect_timeout,
        }
    }

    /// Refuse every direct connection: its endpoints need mutual TLS and the proxy has no
    /// workload certificate.
    pub fn refuse_mutual(mut self) -> Self {
        self.no_certificate = true;
        self
    }

    /// Speak mutual TLS to every endpoint reached directly.
    pub fn mutual(mut self, tls: Arc<TlsSource>, settings: UpstreamTls) -> Self {
        self.mutual = Some((tls, Arc::new(settings)));
        self
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = Conn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        match tunnel_target(&uri) {
            Some((cluster, authority, endpoint)) => {
                let gateway = self.gateway.clone();
                Box::pin(async move {
                    let g = gateway.ok_or_else(|| TunnelError::NoGateway(cluster.clone()))?;
                    let (up, draining) = g.open_pooled(&cluster, &authority, endpoint).await?;
                    Ok(Conn::Tunnel(up, draining))
                })
            }
            None if self.no_certificate => {
                Box::pin(async move { Err(crate::tls::no_certificate(&uri).into()) })
            }
            None => {
                let fut = self.http.call(uri);
                match self.mutual.clone() {
                    None => Box::pin(async move { Ok(Conn::Tcp(fut.await?)) }),
                    Some((tls, settings)) => {
                        let timeout = self.timeout;
                        Box::pin(async move {
                            let tcp = fut.await?.into_inner();
                            let s = crate::tls::handshake(&tls, &settings, tcp, timeout).await?;
                            Ok(Conn::Tls(Box::new(TokioIo::new(s))))
                        })
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_uris_name_their_target() {
        let a = tunnel_authority("west", "echo.default:8080", None).expect("authority");
        assert_eq!(a, "echo.default.west.any.strait-tunnel:8080");
        let uri: Uri = format!("http://{a}/path").parse().expect("uri");
        assert_eq!(
            tunnel_target(&uri),
            Some(("west".to_string(), "echo.default:8080".to_string(), None))
        );
        // A named endpoint, v4 and v6: its own pool key, and back to the same address.
        for ep in ["10.0.0.1:9090", "[fd00::1:2]:443", "127.0.0.1:1"] {
            let ep: SocketAddr = ep.parse().expect("endpoint");
            let a = tunnel_authority("west", "echo.default:8080", Some(ep)).expect("authority");
            let uri: Uri = format!("http://{a}/path").parse().expect("uri");
            assert_eq!(
                tunnel_target(&uri),
                Some((
                    "west".to_string(),
                    "echo.default:8080".to_string(),
                    Some(ep)
                )),
                "{a}"
            );
        }
        assert_eq!(
            tunnel_authority(
                "west",
                "echo.default:8080",
                Some("10.0.0.1:8080".parse().expect("a"))
            )
            .expect("authority"),
            "echo.default.west.e0a0000011f90.strait-tunnel:8080"
        );
        assert_eq!(
            tunnel_target(&"http://127.0.0.1:80/".parse().expect("u")),
            None
        );
        // Labels that are not an endpoint: not a tunnel URI.
        for bad in ["e0a00", "ezz00000000000", "x", "e0a0000011f9"] {
            let uri: Uri = format!("http://echo.default.west.{bad}.strait-tunnel:8080/")
                .parse()
                .expect("uri");
            assert_eq!(tunnel_target(&uri), None, "{bad}");
        }
        assert!(tunnel_authority("west", "no-port", None).is_err());
        assert!(tunnel_authority("a.b", "echo.default:80", None).is_err());
    }
}
