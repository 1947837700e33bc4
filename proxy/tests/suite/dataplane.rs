//! The data plane end to end with real parts: a real `strait controlplane` and etcd feed the
//! proxy's xDS client; HTTP requests through the proxy's outbound listener reach priority 0;
//! when priority 0's endpoint dies, every request still succeeds (retried on priority 1) and
//! outlier detection ejects the dead endpoint, and traffic returns when it comes back; unknown
//! hosts get 404 with a reason.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use controlplane::config::ControlPlaneConfig;
use controlplane::server::ControlPlane;
use envoy_types::pb::google::protobuf::{Value, value::Kind};
use proxy::config::ListenerKind;
use proxy::dataplane::Dataplane;
use proxy::xds::ProxyConfig;
use proxy::xds::{XdsClient, XdsOptions};
use testkit::etcd::{EtcdServer, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An HTTP/1.1 server answering every request with `name`.
async fn backend(name: &'static str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    backend_at(name, "127.0.0.1:0".parse().unwrap()).await
}

/// [`backend`] on a given address (to bring a dead endpoint back where it was).
async fn backend_at(
    name: &'static str,
    at: SocketAddr,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind(at).await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{name}",
                    name.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, task)
}

/// One HTTP/1.1 GET with `Host: host`: (status, body, x-strait-reason).
async fn get(proxy: SocketAddr, host: &str) -> Result<(u16, String, String), String> {
    let mut s = TcpStream::connect(proxy).await.map_err(|e| e.to_string())?;
    let req = format!("GET /hello HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .map_err(|_| "no answer within 10 s".to_string())?
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out).to_string();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or(format!("bad response {text:?}"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or(format!("bad status line {head:?}"))?;
    let reason = head
        .lines()
        .find_map(|l| l.strip_prefix("x-strait-reason: "))
        .unwrap_or_default()
        .to_string();
    Ok((status, body.to_string(), reason))
}

/// Outlier detection has ejected endpoint `addr` of `cluster`, which is still configured.
fn assert_ejected(dp: &Dataplane, cluster: &str, addr: SocketAddr) {
    let compiled = dp.current();
    let dead = compiled
        .clusters
        .get(cluster)
        .expect("the cluster")
        .balancer
        .hosts()
        .iter()
        .find(|h| h.upstream == proxy::config::Upstream::Direct(addr))
        .cloned()
        .expect("the endpoint is still configured");
    assert!(
        dead.state.ejected(std::time::Instant::now()),
        "outlier detection ejected {addr}"
    );
}

fn discovery(a: SocketAddr, b: SocketAddr) -> String {
    format!(
        "cluster: east\nregion: us-east\nservices:\n  - name: echo\n    ports: [{{name: http, port: 8080, protocol: http}}]\n    endpoints:\n      - {{address: 127.0.0.1, port: {}, zone: us-east-1a}}\n      - {{address: 127.0.0.1, port: {}, zone: us-east-1b}}\n",
        a.port(),
        b.port()
    )
}

fn cp_config(dir: &Path, etcd: &str, xds: SocketAddr) -> ControlPlaneConfig {
    ControlPlaneConfig::parse(
        dir.join("cp.yaml"),
        &format!(
            "cluster: east\nregion: us-east\nregistry: {{etcd: [\"{etcd}\"]}}\n\
             discovery: {{file: {}, poll: 50ms}}\nxds: {{listen: \"{xds}\"}}\nadmin: {{listen: \"127.0.0.1:0\"}}\n",
            dir.join("east.yaml").display()
        ),
    )
    .expect("config")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_fail_over_to_priority_one_without_a_single_error() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let etcd = EtcdServer::start(&d.join("etcd")).expect("etcd");
    let (a, a_task) = backend("A").await;
    let (b, _b_task) = backend("B").await;
    std::fs::write(d.join("east.yaml"), discovery(a, b)).unwrap();
    let xds: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
        .parse()
        .unwrap();
    let cp = ControlPlane::start(cp_config(d, &etcd.endpoint(), xds))
        .await
        .expect("control plane");

    let outbound: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
        .parse()
        .unwrap();
    let mut node = testkit::ads::node("proxy-1", "east", "us-east", "us-east-1a", false);
    if let Some(m) = node.metadata.as_mut() {
        m.fields.insert(
            "STRAIT_OUTBOUND".into(),
            Value {
                kind: Some(Kind::StringValue(outbound.to_string())),
            },
        );
    }
    let client = XdsClient::start(XdsOptions::new(format!("http://{xds}"), node));
    let dp = Dataplane::start(client.config.clone());

    // Priority 0: A, the proxy's own zone.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match get(outbound, "echo.default").await {
            Ok((200, body, _)) if body == "A" => break,
            other if tokio::time::Instant::now() > deadline => {
                panic!(
                    "the proxy never served A: {other:?}; status {:?}",
                    client.status.borrow()
                )
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    for i in 0..20 {
        let r = get(outbound, "echo.default.svc.clusterset.local").await;
        assert_eq!(r, Ok((200, "A".to_string(), String::new())), "request {i}");
    }

    // A dies (connections refused) under load — four clients back to back. The registry still
    // lists it: every request must still succeed, retried on priority 1, and outlier detection
    // must eject A.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let served_by_b = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, by_b) = (stop.clone(), served_by_b.clone());
        clients.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                match get(outbound, "echo.default").await {
                    Ok((200, b, _)) if b == "B" => {
                        by_b.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok((200, _, _)) => {}
                    other => failures.push(format!("request {n}: {other:?}")),
                }
            }
            (n, failures)
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    a_task.abort();
    let _ = a_task.await;
    // Until 100 requests have been served by B after the kill (bounded).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while served_by_b.load(std::sync::atomic::Ordering::Relaxed) < 100 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "B served only {} requests in 20 s",
            served_by_b.load(std::sync::atomic::Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Asserted now, well inside the ejection's 5 s.
    assert_ejected(&dp, "echo.default:8080", a);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for c in clients {
        let (n, failures) = c.await.expect("client task");
        total += n;
        assert!(
            failures.is_empty(),
            "failed requests under load: {failures:?}"
        );
    }
    assert!(total >= 100, "{total} requests under load");
    for i in 0..50 {
        let r = get(outbound, "echo.default").await;
        assert_eq!(
            r,
            Ok((200, "B".to_string(), String::new())),
            "request {i} after A died"
        );
    }

    // A comes back on its address: once its ejection (5 s) ends, priority 0 serves again.
    let (_, _a_again) = backend_at("A", a).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match get(outbound, "echo.default").await {
            Ok((200, body, _)) if body == "A" => break,
            Ok((200, body, _)) if body == "B" && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("traffic did not return to A: {other:?}"),
        }
    }
    for i in 0..20 {
        let r = get(outbound, "echo.default").await;
        assert_eq!(
            r,
            Ok((200, "A".to_string(), String::new())),
            "request {i} after A came back"
        );
    }

    // An unknown host: 404 with the reason.
    let (status, _, reason) = get(outbound, "nope.default").await.unwrap();
    assert_eq!(status, 404);
    assert!(reason.contains("no route for nope.default"), "{reason}");
    drop(dp);
    drop(client);
    cp.shutdown().await;
}

/// A server whose every answer says `content-length: 1024` and is cut after 100 bytes (the
/// connection closes): a response caught by a link failure.
async fn cutting_backend() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1024\r\n\r\n")
                    .await;
                let _ = s.write_all(&[b'c'; 100]).await;
                let _ = s.flush().await;
                // Then the connection closes: the body ends 924 bytes short.
            });
        }
    });
    (addr, task)
}

/// In-flight protection with real parts: priority 0's endpoint answers every GET with a
/// 1,024-byte body cut after 100 bytes. The proxy holds each answer (small, of known length, to
/// a GET), sees the cut, and retries on priority 1: every client gets B's whole answer, none a
/// broken body. A POST is not held: its client sees the cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_cut_on_the_way_is_retried_not_delivered_broken() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let etcd = EtcdServer::start(&d.join("etcd")).expect("etcd");
    let (a, _a_task) = cutting_backend().await;
    let (b, _b_task) = backend("B").await;
    std::fs::write(d.join("east.yaml"), discovery(a, b)).unwrap();
    let xds: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
        .parse()
        .unwrap();
    let cp = ControlPlane::start(cp_config(d, &etcd.endpoint(), xds))
        .await
        .expect("control plane");
    let outbound: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
        .parse()
        .unwrap();
    let mut node = testkit::ads::node("proxy-1", "east", "us-east", "us-east-1a", false);
    if let Some(m) = node.metadata.as_mut() {
        m.fields.insert(
            "STRAIT_OUTBOUND".into(),
            Value {
                kind: Some(Kind::StringValue(outbound.to_string())),
            },
        );
    }
    let client = XdsClient::start(XdsOptions::new(format!("http://{xds}"), node));
    let dp = Dataplane::start(client.config.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match get(outbound, "echo.default").await {
            Ok((200, body, _)) if body == "B" => break,
            other if tokio::time::Instant::now() > deadline => {
                panic!("the proxy never served: {other:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    // A POST is not idempotent: its answer goes through as it comes, cut or not.
    let mut cut_posts = 0;
    for _ in 0..10 {
        let mut s = TcpStream::connect(outbound).await.unwrap();
        s.write_all(
            b"POST /x HTTP/1.1\r\nhost: echo.default\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out);
        if text.starts_with("HTTP/1.1 200") && text.contains("content-length: 1024") {
            cut_posts += 1;
        }
    }
    assert!(
        cut_posts > 0,
        "a POST to the cutting endpoint should have reached its client as it came"
    );
    // GETs: A is tried first every time (its answers' heads were good: outlier detection counts
    // them as successes), every cut retried on B; every answer a client sees is whole.
    for i in 0..30 {
        let r = get(outbound, "echo.default").await;
        assert_eq!(
            r,
            Ok((200, "B".to_string(), String::new())),
            "request {i}: a whole answer"
        );
    }
    drop(dp);
    drop(client);
    cp.shutdown().await;
}

/// The TCP listeners' idle timeout in the TCP test.
const IDLE: Duration = Duration::from_secs(1);

/// A TCP server that greets with `name\n` and then echoes; aborting the task closes every
/// connection it has.
async fn tcp_backend(name: &'static str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            while conns.try_join_next().is_some() {}
            conns.spawn(async move {
                if s.write_all(format!("{name}\n").as_bytes()).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, task)
}

/// Connect to `to`, read the greeting, send `msg`, half-close, read the echo to EOF.
async fn tcp_exchange(to: SocketAddr, msg: &str) -> Result<(String, String), String> {
    let fut = async {
        let mut s = TcpStream::connect(to).await.map_err(|e| e.to_string())?;
        s.write_all(msg.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        s.shutdown().await.map_err(|e| e.to_string())?;
        let mut out = String::new();
        s.read_to_string(&mut out)
            .await
            .map_err(|e| e.to_string())?;
        let (greeting, echo) = out
            .split_once('\n')
            .ok_or(format!("no greeting in {out:?}"))?;
        Ok((greeting.to_string(), echo.to_string()))
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| "no answer within 10 s".to_string())?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_reach_the_service_and_move_when_an_endpoint_dies() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let etcd = EtcdServer::start(&d.join("etcd")).expect("etcd");
    let (a, a_task) = tcp_backend("A").await;
    let (b, _b_task) = tcp_backend("B").await;
    // The service port is where the proxy listens (on its outbound address's IP).
    let port = free_port().unwrap();
    std::fs::write(
        d.join("east.yaml"),
        format!(
            "cluster: east\nregion: us-east\nservices:\n  - name: db\n    ports: [{{name: tcp, port: {port}, protocol: tcp}}]\n    endpoints:\n      - {{address: 127.0.0.1, port: {}, zone: us-east-1a}}\n      - {{address: 127.0.0.1, port: {}, zone: us-east-1b}}\n",
            a.port(),
            b.port()
        ),
    )
    .unwrap();
    let xds: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
        .parse()
        .unwrap();
    let cp = ControlPlane::start(cp_config(d, &etcd.endpoint(), xds))
        .await
        .expect("control plane");
    let (client, _outbound) = crate::support::east_client(xds);
    // The configs as the control plane sends them, with TCP listeners' idle timeout at 1 s.
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(ProxyConfig::default()));
    let mut from_cp = client.config.clone();
    tokio::spawn(async move {
        loop {
            let mut c = (**from_cp.borrow_and_update()).clone();
            for l in c.listeners.values_mut() {
                let mut changed = (**l).clone();
                if let ListenerKind::Tcp { idle_timeout, .. } = &mut changed.kind {
                    *idle_timeout = Some(IDLE);
                }
                *l = Arc::new(changed);
            }
            if tx.send(Arc::new(c)).is_err() || from_cp.changed().await.is_err() {
                return;
            }
        }
    });
    let dp = Dataplane::start(rx);
    let listener: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    // Priority 0 (the proxy's zone): A; the payload comes back whole after the half-close.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match tcp_exchange(listener, "ping").await {
            Ok(r) => {
                assert_eq!(r, ("A".to_string(), "ping".to_string()));
                break;
            }
            Err(e) if tokio::time::Instant::now() > deadline => panic!(
                "the TCP listener never served: {e}; status {:?}",
                client.status.borrow()
            ),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let big = "x".repeat(1 << 20);
    let r = tcp_exchange(listener, &big).await.expect("1 MiB through");
    assert_eq!(r.0, "A");
    assert!(r.1 == big, "1 MiB echoed intact ({} bytes back)", r.1.len());

    // A dies: every new connection still gets through, to B, and A is ejected.
    a_task.abort();
    let _ = a_task.await;
    for i in 0..20 {
        let r = tcp_exchange(listener, "after").await;
        assert_eq!(
            r,
            Ok(("B".to_string(), "after".to_string())),
            "connection {i} after A died"
        );
    }
    assert_ejected(&dp, &format!("db.default:{port}"), a);

    // A connection with no bytes either way for the idle timeout is closed; one that keeps
    // talking stays open well past it.
    // Timed from before the connection exists: the proxy's idle clock starts later than that.
    let since = std::time::Instant::now();
    let mut idle = TcpStream::connect(listener).await.unwrap();
    let mut greeting = [0u8; 2];
    idle.read_exact(&mut greeting).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), idle.read_to_end(&mut rest))
        .await
        .expect("the idle connection closed within 10 s")
        .expect("closed cleanly");
    let waited = since.elapsed();
    assert!(
        waited >= IDLE,
        "closed after {waited:?}, before the idle timeout"
    );
    let mut busy = TcpStream::connect(listener).await.unwrap();
    busy.read_exact(&mut greeting).await.unwrap();
    let since = std::time::Instant::now();
    while since.elapsed() < IDLE * 3 {
        busy.write_all(b"k").await.unwrap();
        let mut b = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(5), busy.read_exact(&mut b))
            .await
            .expect("an echo within 5 s")
            .expect("the busy connection stays open");
        tokio::time::sleep(IDLE / 5).await;
    }
    drop(dp);
    drop(client);
    cp.shutdown().await;
}
