//! Inbound listeners: mutual TLS terminated with the sidecar's workload certificate, then
//! plaintext to the local application. Workloads of any cluster of the federation and the
//! gateway of the sidecar's own cluster get through (HTTP/1.1, and HTTP/2 negotiated by ALPN to
//! an h2c application); another cluster's gateway, a certificate of another CA, no certificate
//! and plaintext are refused, and the listener keeps serving.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use crate::support::files;
use federation::identity::{
    CertificateAuthority, IssuedPaths, PeerVerifier, Role, allow_any, client_config, load_certs,
    load_private_key,
};
use http_body_util::{BodyExt, Empty};
use proxy::inbound::InboundSpec;
use proxy::tls::{Peer, TlsSource};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

/// A client presenting `me`, trusting workloads of `ca_of`'s CA, offering `alpn`.
fn connector(me: &IssuedPaths, ca_of: &Path, alpn: &[&[u8]]) -> TlsConnector {
    let verifier = PeerVerifier::from_ca_file(ca_of, Role::Workload, allow_any()).expect("CA");
    let mut c = client_config(
        load_certs(&me.cert).expect("cert"),
        load_private_key(&me.key).expect("key"),
        Arc::new(verifier),
    )
    .expect("client config");
    c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    TlsConnector::from(Arc::new(c))
}

/// GET / over TLS with `connector`: the body, or why it failed.
async fn get_tls(to: SocketAddr, connector: &TlsConnector) -> Result<String, String> {
    let tcp = TcpStream::connect(to).await.map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let mut s = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| format!("handshake: {e}"))?;
    s.write_all(b"GET / HTTP/1.1\r\nhost: app\r\nconnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    // The application keeps connections alive: read the head, then content-length bytes.
    let read = async {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&out).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(str::to_string)
                    })
                    .and_then(|v| v.trim().parse().ok())
                    .ok_or_else(|| format!("no content-length: {text:?}"))?;
                if body.len() >= len {
                    return if head.starts_with("HTTP/1.1 200") {
                        Ok(body[..len].to_string())
                    } else {
                        Err(format!("not a 200: {text:?}"))
                    };
                }
            }
            match s.read(&mut buf).await {
                Ok(0) => return Err(format!("closed: {text:?}")),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .map_err(|_| "no answer within 10 s".to_string())?
}

/// An HTTP/2-only (h2c) application answering `h2-app`.
async fn h2c_app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"h2-app")),
                    ))
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
            });
        }
    });
    addr
}

async fn inbound(spec: &str, tls: &IssuedPaths) -> SocketAddr {
    let spec = InboundSpec::parse(spec).expect("spec");
    let alpn: Vec<&[u8]> = spec.alpn.iter().map(Vec::as_slice).collect();
    let source = Arc::new(TlsSource::new(files(tls), Peer::Workload, &alpn).expect("tls"));
    let l = TcpListener::bind(spec.listen).await.expect("bind");
    let addr = l.local_addr().unwrap();
    tokio::spawn(proxy::inbound::serve(l, spec.app, source));
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_of_the_federation_get_through_and_everything_else_is_refused() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = CertificateAuthority::init(TD, Duration::from_secs(86400)).expect("CA");
    let sidecar = issue(
        &ca,
        d,
        &format!("spiffe://{TD}/cluster/east/ns/default/sa/app"),
        "app",
    );
    let west_client = issue(
        &ca,
        d,
        &format!("spiffe://{TD}/cluster/west/ns/default/sa/client"),
        "west-client",
    );
    let gateway = issue(&ca, d, &format!("spiffe://{TD}/cluster/west/gateway"), "gw");
    let own_gateway = issue(
        &ca,
        d,
        &format!("spiffe://{TD}/cluster/east/gateway"),
        "east-gw",
    );
    let other_ca = CertificateAuthority::init(TD, Duration::from_secs(86400)).expect("CA");
    let impostor = issue(
        &other_ca,
        d,
        &format!("spiffe://{TD}/cluster/west/ns/default/sa/client"),
        "impostor",
    );

    let (app, _app_task) = http_backend("app").await;
    let h1 = inbound(&format!("127.0.0.1:0={app}"), &sidecar).await;
    let h2_app = h2c_app().await;
    let h2 = inbound(&format!("127.0.0.1:0={h2_app}@h2"), &sidecar).await;

    // A workload of another cluster of the federation: through, in plaintext to the app.
    let good = connector(&west_client, &west_client.ca, &[b"http/1.1"]);
    assert_eq!(get_tls(h1, &good).await, Ok("app".to_string()));

    // The sidecar's own cluster's gateway (bringing other clusters' requests): through.
    let own_gw = connector(&own_gateway, &own_gateway.ca, &[b"http/1.1"]);
    assert_eq!(get_tls(h1, &own_gw).await, Ok("app".to_string()));

    // Refused at the handshake: another cluster's gateway, another CA's certificate.
    for (what, c) in [
        (
            "another cluster's gateway",
            connector(&gateway, &gateway.ca, &[]),
        ),
        ("another CA", connector(&impostor, &sidecar.ca, &[])),
    ] {
        let r = get_tls(h1, &c).await;
        assert!(r.is_err(), "{what} got through: {r:?}");
    }
    // No client certificate at all.
    let no_cert = {
        let verifier =
            PeerVerifier::from_ca_file(&sidecar.ca, Role::Workload, allow_any()).expect("CA");
        let c =
            rustls::ClientConfig::builder_with_provider(federation::identity::crypto_provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth();
        TlsConnector::from(Arc::new(c))
    };
    let r = get_tls(h1, &no_cert).await;
    assert!(
        r.is_err(),
        "a client without a certificate got through: {r:?}"
    );
    // Plaintext HTTP.
    let mut s = TcpStream::connect(h1).await.unwrap();
    let _ = s
        .write_all(b"GET / HTTP/1.1\r\nhost: app\r\nconnection: close\r\n\r\n")
        .await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    assert!(
        !String::from_utf8_lossy(&out).contains("200 OK"),
        "plaintext got through: {out:?}"
    );

    // The listener still serves.
    assert_eq!(get_tls(h1, &good).await, Ok("app".to_string()));

    // HTTP/2 negotiated by ALPN, to an h2c application.
    let c = connector(&west_client, &west_client.ca, &[b"h2"]);
    let tcp = TcpStream::connect(h2).await.unwrap();
    let tls = c
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .expect("h2 handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .expect("HTTP/2 over TLS");
    tokio::spawn(conn);
    for i in 0..3 {
        let resp = sender
            .send_request(
                http::Request::builder()
                    .uri(format!("https://app/{i}"))
                    .body(Empty::<bytes::Bytes>::new())
                    .unwrap(),
            )
            .await
            .expect("HTTP/2 request");
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"h2-app", "stream {i}");
    }
}
