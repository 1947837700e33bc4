//! Inbound listeners: mutual TLS from other workloads of the federation, terminated with the
//! proxy's workload certificate, then plaintext to the local application.
//!
//! A client must present a workload certificate issued by the federation's CA (any cluster of
//! the trust domain), or be the east-west gateway of the proxy's own cluster (bringing requests
//! from other clusters); anything else — no certificate, another CA, another cluster's
//! gateway, plaintext — is refused at the handshake, with the reason in the log. The accepted peer's
//! SPIFFE id is logged. ALPN is what the application speaks (`http/1.1` by default, `h2` for an
//! h2c or gRPC application, none for other TCP protocols), since the bytes are passed on as
//! they are. Certificate files are re-read when they change; open connections are kept.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use federation::identity::{handshake_failure, spiffe_id_from_cert};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::config::TCP_IDLE_TIMEOUT;
use crate::tls::TlsSource;

/// How long a client may take to complete its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting to the local application may take.
const APP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// `LISTEN=APP[@ALPN]`: e.g. `0.0.0.0:15443=127.0.0.1:8080` or `…=127.0.0.1:9090@h2`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundSpec {
    pub listen: SocketAddr,
    pub app: SocketAddr,
    /// ALPN protocols offered to clients (empty: none).
    pub alpn: Vec<Vec<u8>>,
}

impl InboundSpec {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (listen, rest) = text
            .split_once('=')
            .ok_or_else(|| format!("`{text}` is not LISTEN=APP[@ALPN]"))?;
        let (app, alpn) = match rest.split_once('@') {
            Some((a, p)) => (a, Some(p)),
            None => (rest, None),
        };
        let listen = listen
            .parse()
            .map_err(|e| format!("`{listen}` in `{text}`: {e}"))?;
        let app = app
            .parse()
            .map_err(|e| format!("`{app}` in `{text}`: {e}"))?;
        let alpn = match alpn {
            None | Some("http/1.1") => vec![b"http/1.1".to_vec()],
            Some("h2") => vec![b"h2".to_vec()],
            Some("none") => Vec::new(),
            Some(other) => {
                return Err(format!(
                    "ALPN `{other}` in `{text}`: one of http/1.1, h2, none"
                ));
            }
        };
        Ok(Self { listen, app, alpn })
    }
}

/// Serve one inbound listener until the task is dropped.
pub async fn serve(listener: TcpListener, app: SocketAddr, tls: Arc<TlsSource>) {
    let name = format!(
        "inbound {}",
        listener
            .local_addr()
            .map_or_else(|_| "?".into(), |a| a.to_string())
    );
    loop {
        let (stream, peer) = crate::runtime::accept(&listener, &name).await;
        let tls = tls.clone();
        tokio::spawn(async move {
            if let Err(e) = one(stream, peer, app, &tls).await {
                tracing::info!(%peer, %app, error = %e, "inbound connection refused or ended");
            }
        });
    }
}

async fn one(
    stream: TcpStream,
    peer: SocketAddr,
    app: SocketAddr,
    tls: &TlsSource,
) -> Result<(), String> {
    let config = tls.server_config().map_err(|e| e.to_string())?;
    let accepted =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(config).accept(stream))
            .await
            .map_err(|_| format!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}"))?
            .map_err(|e| format!("TLS handshake: {}", handshake_failure(&e)))?;
    let who = accepted
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(spiffe_id_from_cert)
        .transpose()
        .map_err(|e| e.to_string())?
        .map_or_else(|| "?".to_string(), |id| id.to_string());
    let up = tokio::time::timeout(APP_CONNECT_TIMEOUT, TcpStream::connect(app))
        .await
        .map_err(|_| format!("the application at {app} did not accept within 5 s"))?
        .map_err(|e| format!("the application at {app}: {e}"))?;
    let _ = up.set_nodelay(true);
    tracing::debug!(%peer, peer_id = %who, %app, "inbound connection");
    crate::tcp::splice(accepted, up, Some(TCP_IDLE_TIMEOUT)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_errors_name_the_part() {
        let s = InboundSpec::parse("0.0.0.0:15443=127.0.0.1:8080").unwrap();
        assert_eq!(s.app, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(s.alpn, vec![b"http/1.1".to_vec()]);
        assert_eq!(
            InboundSpec::parse("127.0.0.1:1=127.0.0.1:2@h2")
                .unwrap()
                .alpn,
            vec![b"h2".to_vec()]
        );
        assert!(
            InboundSpec::parse("127.0.0.1:1=127.0.0.1:2@none")
                .unwrap()
                .alpn
                .is_empty()
        );
        assert!(
            InboundSpec::parse("127.0.0.1:1")
                .unwrap_err()
                .contains("LISTEN=APP")
        );
        assert!(
            InboundSpec::parse("x=127.0.0.1:2")
                .unwrap_err()
                .contains("`x`")
        );
        assert!(
            InboundSpec::parse("127.0.0.1:1=127.0.0.1:2@spdy")
                .unwrap_err()
                .contains("spdy")
        );
    }
}
