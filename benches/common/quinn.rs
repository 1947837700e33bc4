//! Raw quinn, the peer of the gateways' QUIC links: endpoints with a gateway identity and the
//! gateways' own TLS provider and transport settings, and a byte source for bulk downloads.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use federation::identity::{PeerVerifier, Role};

/// Server and client configs holding the identity in `cert`/`key`, trusting `ca` for gateway
/// peers, offering `alpn`, with the gateways' transport settings (`tuning`).
pub fn configs(
    cert: &Path,
    key: &Path,
    ca: &Path,
    alpn: &[u8],
    tuning: &gateway::config::TransportTuning,
) -> (quinn::ServerConfig, quinn::ClientConfig) {
    let certs = federation::identity::load_certs(cert).expect("the gateway certificate");
    let key = federation::identity::load_private_key(key).expect("the gateway key");
    let v = Arc::new(
        PeerVerifier::from_ca_file(ca, Role::Gateway, federation::identity::allow_any())
            .expect("the CA"),
    );
    let mut sc =
        federation::identity::server_config(certs.clone(), key.clone_key(), v.clone()).expect("sc");
    sc.alpn_protocols = vec![alpn.to_vec()];
    let mut cc = federation::identity::client_config(certs, key, v).expect("cc");
    cc.alpn_protocols = vec![alpn.to_vec()];
    let link = gateway::config::LinkConfig::default();
    let transport = Arc::new(
        gateway::tls::transport(tuning, link.keep_alive, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(sc)).expect("qsc"),
    ));
    server.transport_config(transport.clone());
    let mut client = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(cc)).expect("qcc"),
    ));
    client.transport_config(transport);
    (server, client)
}

/// A client endpoint on `bind` with `config`.
pub fn client(bind: SocketAddr, config: quinn::ClientConfig) -> quinn::Endpoint {
    let mut ep = quinn::Endpoint::client(bind).expect("a quinn client endpoint");
    ep.set_default_client_config(config);
    ep
}

/// Serve downloads on `ep`: on every bidirectional stream, read a big-endian u64 N, send N
/// bytes, finish.
pub async fn serve_bytes(ep: quinn::Endpoint) {
    while let Some(inc) = ep.accept().await {
        tokio::spawn(async move {
            let Ok(conn) = inc.await else { return };
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                tokio::spawn(async move {
                    let mut n = [0u8; 8];
                    if recv.read_exact(&mut n).await.is_err() {
                        return;
                    }
                    let mut left = u64::from_be_bytes(n);
                    let block = vec![0x5au8; 256 * 1024];
                    while left > 0 {
                        let k = left.min(block.len() as u64) as usize;
                        if send.write_all(&block[..k]).await.is_err() {
                            return;
                        }
                        left -= k as u64;
                    }
                    let _ = send.finish();
                    let _ = send.stopped().await;
                });
            }
        });
    }
}

/// Download `bytes` from `serve_bytes` at `to` on a new connection, cut off after `limit`:
/// MiB/s from the connect.
pub async fn fetch(
    ep: &quinn::Endpoint,
    to: SocketAddr,
    bytes: u64,
    limit: Duration,
) -> Result<f64, String> {
    let t0 = tokio::time::Instant::now();
    let deadline = t0 + limit;
    let conn = ep
        .connect(to, "peer")
        .map_err(|e| format!("quinn connect {to}: {e}"))?
        .await
        .map_err(|e| format!("quinn connect {to}: {e}"))?;
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| format!("quinn stream to {to}: {e}"))?;
    send.write_all(&bytes.to_be_bytes())
        .await
        .map_err(|e| format!("quinn write to {to}: {e}"))?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    while got < bytes {
        match tokio::time::timeout_at(deadline, recv.read(&mut buf)).await {
            Err(_) => break,
            Ok(Ok(Some(n))) => got += n as u64,
            Ok(Ok(None)) => return Err(format!("{to} finished after {got} of {bytes} bytes")),
            Ok(Err(e)) => return Err(format!("{to} after {got} of {bytes} bytes: {e}")),
        }
    }
    let rate = got as f64 / (1u64 << 20) as f64 / t0.elapsed().as_secs_f64();
    conn.close(0u32.into(), b"done");
    Ok(rate)
}
