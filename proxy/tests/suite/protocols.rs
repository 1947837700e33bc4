//! Protocols through the proxy with real parts (etcd, the control plane, the proxy's xDS client
//! and data plane): gRPC from a real grpcio client to a real grpcio server — unary, a
//! bidirectional stream whose every message waits for the previous answer, trailers, and an
//! error status; HTTP/2 (h2c) downstream to an HTTP/1.1 service. Bad input — malformed HTTP,
//! oversized headers, a slowloris client — gets its error while other clients are served.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::common::*;
use http_body_util::{BodyExt, Empty};
use proxy::dataplane::{Dataplane, DataplaneOptions};
use proxy::xds::XdsClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

/// The control plane of cluster east with the discovery file `yaml`, and a proxy fed by it.
async fn proxy_with(
    d: &Path,
    reg: &Registry,
    yaml: &str,
    options: DataplaneOptions,
) -> (
    controlplane::server::ControlPlane,
    XdsClient,
    Dataplane,
    SocketAddr,
) {
    std::fs::write(d.join("east.yaml"), yaml).unwrap();
    let cp = start_cp_discovery(reg, &d.join("east.yaml"), "50ms").await;
    let (client, outbound) = crate::support::east_client(cp.xds_addr);
    let dp = Dataplane::start_with(client.config.clone(), options);
    wait_for(Duration::from_secs(20), "the proxy to warm", || async {
        let s = client.status.borrow().clone();
        if s.warm && !dp.current().config.listeners.is_empty() {
            Ok(())
        } else {
            Err(format!("{s:?}"))
        }
    })
    .await;
    (cp, client, dp, outbound)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_bidirectional_streaming_trailers_and_errors_pass_through() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let reg = Registry::start(d).await;
    let (server, _server) = grpc_server("east-1").await;
    let yaml = crate::support::one_service("echo", "grpc", 9090, server);
    let (cp, _client, dp, outbound) = proxy_with(d, &reg, &yaml, DataplaneOptions::default()).await;
    assert!(
        dp.current()
            .clusters
            .get("echo.default:9090")
            .is_some_and(|c| c.config.http2),
        "a grpc port is an HTTP/2 cluster"
    );

    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new(python())
            .arg(grpc_script())
            .args(["check", &outbound.to_string(), "echo.default:9090"])
            .output(),
    )
    .await
    .expect("the gRPC checks finish within 60 s")
    .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        vec![
            "unary east-1",
            "chat 20 east-1:m0 east-1:m19 rest=0 trailer=east-1 code=OK",
            "fail PERMISSION_DENIED east-1 says no",
        ],
        "{stderr}"
    );
    drop(dp);
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_reach_http1_services() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let reg = Registry::start(d).await;
    let (backend, _b) = http_backend("east-http").await;
    let yaml = crate::support::one_service("web", "http", 8080, backend);
    let (cp, _client, dp, outbound) = proxy_with(d, &reg, &yaml, DataplaneOptions::default()).await;
    wait_for(Duration::from_secs(20), "HTTP/1.1 to be served", || async {
        match get(outbound, "web.default").await {
            Ok((200, b)) if b == "east-http" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // h2c with prior knowledge; several streams on one connection.
    let tcp = tokio::net::TcpStream::connect(outbound)
        .await
        .expect("connect");
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2c handshake with the proxy");
    tokio::spawn(conn);
    let mut calls = Vec::new();
    for i in 0..10 {
        let mut sender = sender.clone();
        calls.push(tokio::spawn(async move {
            let req = http::Request::builder()
                .uri(format!("http://web.default.svc.clusterset.local/{i}"))
                .body(Empty::<bytes::Bytes>::new())
                .expect("request");
            let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, String::from_utf8_lossy(&body).into_owned()))
        }));
    }
    for (i, c) in calls.into_iter().enumerate() {
        let r = c.await.expect("task");
        assert_eq!(r, Ok((200, "east-http".to_string())), "stream {i}");
    }
    drop(dp);
    cp.shutdown().await;
}

/// Send `raw` on a new connection and read what comes back until the proxy closes it.
async fn raw_exchange(to: SocketAddr, raw: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(to).await.expect("connect");
    // The proxy may answer and close before it has read everything.
    let _ = s.write_all(raw).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_clients_get_their_error_and_others_are_served() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let reg = Registry::start(d).await;
    let (backend, _b) = http_backend("east-http").await;
    let yaml = crate::support::one_service("web", "http", 8080, backend);
    let options = DataplaneOptions {
        header_read_timeout: Duration::from_secs(1),
        max_request_headers: 16 * 1024,
        ..Default::default()
    };
    let (cp, _client, dp, outbound) = proxy_with(d, &reg, &yaml, options).await;
    wait_for(Duration::from_secs(20), "HTTP/1.1 to be served", || async {
        match get(outbound, "web.default").await {
            Ok((200, b)) if b == "east-http" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // A slowloris client: a header line every 200 ms, never the end of the header.
    let mut slow = tokio::net::TcpStream::connect(outbound)
        .await
        .expect("connect");
    slow.write_all(b"GET / HTTP/1.1\r\nhost: web.default\r\n")
        .await
        .expect("write");
    let started = tokio::time::Instant::now();
    let dripping = tokio::spawn(async move {
        for i in 0..100 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if slow
                .write_all(format!("x-drip-{i}: y\r\n").as_bytes())
                .await
                .is_err()
            {
                return Some(started.elapsed());
            }
            let mut b = [0u8; 64];
            // A closed connection reads as EOF (or a reset) once the proxy gave up.
            if let Ok(Ok(0) | Err(_)) =
                tokio::time::timeout(Duration::from_millis(1), slow.read(&mut b)).await
            {
                return Some(started.elapsed());
            }
        }
        None
    });

    // Malformed HTTP: 400, and the connection closed.
    let r = raw_exchange(outbound, b"THIS IS NOT HTTP\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 400"), "malformed request: {r:?}");
    // A header larger than the limit: 431.
    let big = format!(
        "GET / HTTP/1.1\r\nhost: web.default\r\nx-big: {}\r\n\r\n",
        "a".repeat(32 * 1024)
    );
    let r = raw_exchange(outbound, big.as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 431"), "oversized header: {r:?}");
    // Meanwhile, a well-behaved client is served.
    assert_eq!(
        get(outbound, "web.default").await,
        Ok((200, "east-http".to_string())),
        "a normal request while the slowloris drips"
    );

    let cut = tokio::time::timeout(Duration::from_secs(30), dripping)
        .await
        .expect("the slowloris check ends")
        .expect("task");
    let cut = cut.expect("the proxy closed the slowloris connection");
    assert!(
        cut < Duration::from_secs(5),
        "closed after the 1 s header timeout, not at leisure ({cut:?})"
    );
    // And the proxy is still fine.
    for i in 0..10 {
        assert_eq!(
            get(outbound, "web.default").await,
            Ok((200, "east-http".to_string())),
            "request {i} after the bad clients"
        );
    }
    drop(dp);
    cp.shutdown().await;
}

/// A WebSocket-style server: answers an upgrade with 101 (echoing what `Connection` and
/// `Upgrade` it got), then echoes bytes until the client half-closes, then says `bye` and
/// closes. A request without an upgrade gets 426.
async fn upgrade_backend() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((mut s, _)) = l.accept().await {
            conns.spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(1) => head.push(b[0]),
                        _ => return,
                    }
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let header = |n: &str| {
                    head.lines()
                        .find_map(|l| l.strip_prefix(&format!("{n}: ")).map(str::to_string))
                        .unwrap_or_default()
                };
                if header("upgrade") != "websocket" {
                    let _ = s
                        .write_all(b"HTTP/1.1 426 Upgrade Required\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    return;
                }
                let resp = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
                     sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nx-seen-connection: {}\r\nx-seen-key: {}\r\n\r\n",
                    header("connection"),
                    header("sec-websocket-key")
                );
                if s.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = s.write_all(b"bye").await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_pass_through_both_ways_with_half_close() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let reg = Registry::start(d).await;
    let (backend, _b) = upgrade_backend().await;
    let yaml = crate::support::one_service("ws", "http", 8080, backend);
    let (cp, _client, dp, outbound) = proxy_with(d, &reg, &yaml, DataplaneOptions::default()).await;
    wait_for(
        Duration::from_secs(20),
        "the ws service to be routed",
        || async {
            match get(outbound, "ws.default").await {
                Ok((426, _)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;

    let mut s = tokio::net::TcpStream::connect(outbound)
        .await
        .expect("connect");
    s.write_all(
        b"GET /chat HTTP/1.1\r\nhost: ws.default\r\nconnection: keep-alive, Upgrade\r\nupgrade: websocket\r\n\
          sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
            .await
            .expect("the 101 within 10 s")
            .unwrap();
        assert_eq!(n, 1, "connection closed in the handshake: {head:?}");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    // The server saw the upgrade asked for, and the client's key.
    assert!(head.contains("x-seen-connection: upgrade"), "{head}");
    assert!(
        head.contains("x-seen-key: dghlihnhbxbszsbub25jzq=="),
        "{head}"
    );

    // Messages both ways, each waiting for its echo.
    for i in 0..20 {
        let msg = format!("frame-{i:02}");
        s.write_all(msg.as_bytes()).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got))
            .await
            .expect("an echo within 10 s")
            .unwrap();
        assert_eq!(got, msg.as_bytes(), "message {i}");
    }
    // Half-close: the server still answers after the client stops writing.
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("the server's last words within 10 s")
        .unwrap();
    assert_eq!(rest, b"bye");
    drop(dp);
    cp.shutdown().await;
}
