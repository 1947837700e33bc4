//! Transparent mode: connections an iptables `REDIRECT` sent to the proxy, handled by their
//! original destination (`SO_ORIGINAL_DST`), the way an application that knows nothing of the
//! mesh expects:
//!
//! 1. a destination port that is a `tcp` service port (the proxy has a TCP listener for it):
//!    proxied to that service, with its balancing and failover;
//! 2. HTTP (sniffed from the first bytes) whose `Host` the outbound routes know: served as
//!    outbound HTTP (routes, retries, failover across priorities and clusters);
//! 3. anything else — a server-first protocol (nothing sent within [`SNIFF_WAIT`]), another
//!    protocol, a host the mesh does not know — goes to the listener's fallback cluster: an
//!    `ORIGINAL_DST` cluster (the control plane's `PassthroughCluster`) passes it through to
//!    its original destination unchanged; an EDS cluster takes it like a TCP listener; a
//!    cluster the proxy does not have refuses it (Istio's `REGISTRY_ONLY`).
//!
//! The listener comes from the control plane (LDS: `use_original_dst` with a `TcpProxy` to
//! the fallback cluster), asked for with the node metadata `STRAIT_TRANSPARENT`.
//!
//! The proxy's own upstream connections must be exempt from the redirection (Istio exempts the
//! proxy's user id, 1337), or they would come back here; a connection made straight to the
//! transparent port is refused for the same reason.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto::Builder;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::config::{ListenerKind, TCP_IDLE_TIMEOUT};
use crate::runtime::Compiled;

/// How long to wait for a client's first bytes before treating it as server-first.
pub const SNIFF_WAIT: Duration = Duration::from_millis(100);
/// The most of an HTTP request head looked at to find its `Host`.
const SNIFF_MAX: usize = 8 * 1024;
/// How long a client may take to send the head once it started.
const SNIFF_HEAD_WAIT: Duration = Duration::from_secs(1);
/// Connect timeout of passthrough connections.
const PASSTHROUGH_CONNECT: Duration = Duration::from_secs(10);

const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// Serve the transparent listener `name` (its fallback cluster is read from the config each
/// connection starts with).
pub async fn serve(
    listener: TcpListener,
    name: String,
    current: watch::Receiver<Arc<Compiled>>,
    server: Builder<TokioExecutor>,
) {
    let own = listener.local_addr().ok();
    if let Some(a) = own {
        tracing::info!(listener = %name, address = %a, "transparent listener");
    }
    let name: Arc<str> = name.into();
    loop {
        let (stream, peer) = crate::runtime::accept(&listener, &name).await;
        let (current, server, name) = (current.clone(), server.clone(), name.clone());
        tokio::spawn(async move {
            if let Err(e) = one(stream, peer, own, &name, current, server).await {
                tracing::debug!(%peer, error = %e, "intercepted connection not proxied");
            }
        });
    }
}

/// The original destination of a redirected connection.
pub fn original_dst(stream: &TcpStream) -> Result<SocketAddr, String> {
    let sock = socket2::SockRef::from(stream);
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    let addr = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    }
    .map_err(|e| format!("no original destination (not redirected?): {e}"))?;
    addr.as_socket()
        .ok_or_else(|| "the original destination is not an IP address".to_string())
}

/// What an intercepted connection becomes.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Tcp {
        cluster: String,
        idle: Option<Duration>,
    },
    Http {
        listener: String,
    },
    Passthrough,
    Refused(String),
}

async fn one(
    stream: TcpStream,
    peer: SocketAddr,
    own: Option<SocketAddr>,
    name: &str,
    current: watch::Receiver<Arc<Compiled>>,
    server: Builder<TokioExecutor>,
) -> Result<(), String> {
    let dst = original_dst(&stream)?;
    if Some(dst) == own {
        return Err(format!(
            "connected straight to the transparent port {dst}: refused (it would loop)"
        ));
    }
    let compiled = current.borrow().clone();
    let verdict = match tcp_port(&compiled, dst.port()) {
        Some(v) => v,
        None => match http_listener(&compiled) {
            Some(listener) => match sniff_host(&stream).await {
                Some(host)
                    if compiled
                        .table(&listener)
                        .is_some_and(|t| t.virtual_host(&host).is_some()) =>
                {
                    Verdict::Http { listener }
                }
                _ => fallback(&compiled, name),
            },
            None => fallback(&compiled, name),
        },
    };
    tracing::debug!(%peer, %dst, ?verdict, "intercepted connection");
    match verdict {
        Verdict::Tcp { cluster, idle } => {
            crate::tcp::proxy_one(&compiled, &cluster, stream, idle).await
        }
        Verdict::Http { listener } => {
            crate::stack::serve_connection(stream, peer, listener.into(), current, server).await;
            Ok(())
        }
        Verdict::Passthrough => {
            let up = tokio::time::timeout(PASSTHROUGH_CONNECT, TcpStream::connect(dst))
                .await
                .map_err(|_| format!("passthrough to {dst}: no connection within 10 s"))?
                .map_err(|e| format!("passthrough to {dst}: {e}"))?;
            let _ = up.set_nodelay(true);
            crate::tcp::splice(stream, Box::new(up), Some(TCP_IDLE_TIMEOUT)).await
        }
        Verdict::Refused(why) => Err(format!("to {dst}: {why}")),
    }
}

/// What the listener's fallback cluster makes of a connection no other rule took.
fn fallback(compiled: &Compiled, name: &str) -> Verdict {
    let cluster = match compiled.config.listeners.get(name).map(|l| &l.kind) {
        Some(ListenerKind::Transparent { fallback }) => fallback,
        _ => return Verdict::Refused(format!("listener {name} is gone")),
    };
    if compiled.config.passthrough.contains(cluster) {
        Verdict::Passthrough
    } else if compiled.config.clusters.contains_key(cluster) {
        Verdict::Tcp {
            cluster: cluster.clone(),
            idle: Some(TCP_IDLE_TIMEOUT),
        }
    } else {
        Verdict::Refused(format!("fallback cluster {cluster} is not configured"))
    }
}

/// The TCP service listener at `port`, if any.
fn tcp_port(compiled: &Compiled, port: u16) -> Option<Verdict> {
    compiled
        .config
        .listeners
        .values()
        .find_map(|l| match &l.kind {
            ListenerKind::Tcp {
                cluster,
                idle_timeout,
            } if l.address.port() == port => Some(Verdict::Tcp {
                cluster: cluster.clone(),
                idle: *idle_timeout,
            }),
            _ => None,
        })
}

/// The outbound HTTP listener (the first HTTP listener by name).
fn http_listener(compiled: &Compiled) -> Option<String> {
    compiled
        .config
        .listeners
        .values()
        .find(|l| matches!(l.kind, ListenerKind::Http { .. }))
        .map(|l| l.name.clone())
}

/// The `Host` of an HTTP/1 request head at the start of `stream` (read without consuming).
/// `None`: nothing within [`SNIFF_WAIT`], not HTTP/1, or no host.
async fn sniff_host(stream: &TcpStream) -> Option<String> {
    let mut buf = vec![0u8; SNIFF_MAX];
    let n = tokio::time::timeout(SNIFF_WAIT, stream.peek(&mut buf))
        .await
        .ok()?
        .ok()?;
    if n == 0 {
        return None;
    }
    let started = Instant::now();
    let mut n = n;
    loop {
        let have = &buf[..n];
        if !starts_like_http(have) {
            return None;
        }
        if let Some(end) = have.windows(4).position(|w| w == b"\r\n\r\n") {
            return host_header(&have[..end]);
        }
        if n == buf.len() || started.elapsed() > SNIFF_HEAD_WAIT {
            return None;
        }
        // The head is still arriving: look again shortly.
        tokio::time::sleep(Duration::from_millis(5)).await;
        n = stream.peek(&mut buf).await.ok()?;
    }
}

/// Whether `bytes` (possibly only a prefix) can be the start of an HTTP/1 request.
fn starts_like_http(bytes: &[u8]) -> bool {
    if bytes.starts_with(H2_PREFACE) {
        return false;
    }
    METHODS.iter().any(|m| {
        let k = bytes.len().min(m.len());
        bytes[..k] == m[..k]
    })
}

fn host_header(head: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(head).ok()?;
    text.split("\r\n").skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("host")
            .then(|| v.trim().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_is_recognised_from_its_first_bytes() {
        assert!(starts_like_http(b"GET / HTTP/1.1\r\n"));
        assert!(starts_like_http(b"GE"));
        assert!(starts_like_http(b"DELETE /x"));
        assert!(!starts_like_http(b"\x16\x03\x01"), "TLS");
        assert!(!starts_like_http(b"PRI * HTTP/2.0\r\n"));
        assert!(!starts_like_http(b"SSH-2.0-OpenSSH"));
        assert!(!starts_like_http(b"GETX"));
    }

    #[test]
    fn the_host_header_is_found_in_any_case() {
        let head = b"GET / HTTP/1.1\r\nAccept: */*\r\nHOST:  echo.default:8080 ";
        assert_eq!(host_header(head), Some("echo.default:8080".into()));
        assert_eq!(host_header(b"GET / HTTP/1.1\r\naccept: */*"), None);
    }
}
