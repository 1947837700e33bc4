//! The east-west gateway end to end on loopback: real QUIC, real mTLS, real TCP servers, a real
//! curl, and a user-space UDP relay to cut and degrade links.
// Tests and benchmarks: an unwrap is an assertion (a failure with the value's message).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use federation::identity::{CertificateAuthority, ExtraNames, SpiffeId};
use gateway::config::GatewayConfig;
use gateway::{Gateway, LinkReport};
use testkit::relay::{Faults, UdpRelay};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(20);
const TD: &str = "test.strait";

struct Pki {
    dir: PathBuf,
    ca: CertificateAuthority,
    td: &'static str,
}

impl Pki {
    fn new(dir: &Path) -> Self {
        Self::with_trust_domain(dir, TD)
    }
    fn with_trust_domain(dir: &Path, td: &'static str) -> Self {
        let ca = CertificateAuthority::init(td, Duration::from_secs(86400)).unwrap();
        ca.write(dir.join("ca"), false).unwrap();
        Self {
            dir: dir.to_path_buf(),
            ca,
            td,
        }
    }
    fn ca_file(&self) -> PathBuf {
        self.dir.join("ca/ca.pem")
    }
    fn gateway(&self, cluster: &str) -> PathBuf {
        let id: SpiffeId = format!("spiffe://{}/cluster/{cluster}/gateway", self.td)
            .parse()
            .unwrap();
        let names = ExtraNames {
            dns: vec!["localhost".into()],
            ips: vec!["127.0.0.1".parse().unwrap()],
        };
        let out = self.dir.join(format!("{cluster}-gw"));
        self.ca
            .issue_with_names(&id, Duration::from_secs(3600), &names)
            .unwrap()
            .write(&out)
            .unwrap();
        out
    }
    fn workload(&self, cluster: &str, sa: &str) -> PathBuf {
        let id: SpiffeId = format!("spiffe://{}/cluster/{cluster}/ns/default/sa/{sa}", self.td)
            .parse()
            .unwrap();
        let out = self.dir.join(format!("{cluster}-{sa}"));
        self.ca
            .issue(&id, Duration::from_secs(3600))
            .unwrap()
            .write(&out)
            .unwrap();
        out
    }
}

/// A TCP echo server (the "service" in a cluster). With `reply_on_eof`, it reads until EOF and
/// then answers `got N bytes` (to test half-close).
async fn echo_server(reply_on_eof: bool) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                if reply_on_eof {
                    let mut buf = Vec::new();
                    if s.read_to_end(&mut buf).await.is_ok() {
                        let _ = s
                            .write_all(format!("got {} bytes", buf.len()).as_bytes())
                            .await;
                    }
                    let _ = s.shutdown().await;
                } else {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
        }
    });
    addr
}

/// A minimal HTTP/1.1 server answering every request with `hello from CLUSTER`.
async fn http_server(cluster: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let body = format!("hello from {cluster}\n");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

fn discovery(dir: &Path, cluster: &str, services: &[(&str, u16, SocketAddr)]) -> PathBuf {
    let mut s = format!("cluster: {cluster}\nregion: r-{cluster}\nservices:\n");
    // Entries of the same service (and port) are its endpoints, in order.
    let mut names: Vec<(&str, u16)> = Vec::new();
    for (name, port, _) in services {
        if !names.contains(&(*name, *port)) {
            names.push((*name, *port));
        }
    }
    for (name, port) in names {
        s.push_str(&format!(
            "  - name: {name}\n    ports: [{{name: p, port: {port}, protocol: tcp}}]\n    endpoints:\n"
        ));
        for (_, _, addr) in services.iter().filter(|(n, p, _)| (*n, *p) == (name, port)) {
            s.push_str(&format!(
                "      - {{address: {}, port: {}, zone: z1}}\n",
                addr.ip(),
                addr.port()
            ));
        }
    }
    if services.is_empty() {
        s = s.replace("services:\n", "services: []\n");
    }
    let p = dir.join(format!("{cluster}-discovery.yaml"));
    std::fs::write(&p, s).unwrap();
    p
}

fn config(
    pki: &Pki,
    cluster: &str,
    gw_dir: &Path,
    discovery: &Path,
    peers: &[(&str, SocketAddr)],
    extra: &str,
) -> GatewayConfig {
    let peers: Vec<(&str, String)> = peers.iter().map(|(c, a)| (*c, a.to_string())).collect();
    config_named(pki, cluster, gw_dir, discovery, &peers, extra)
}

/// Like [`config`], with peer addresses as written (DNS names allowed).
fn config_named(
    pki: &Pki,
    cluster: &str,
    gw_dir: &Path,
    discovery: &Path,
    peers: &[(&str, String)],
    extra: &str,
) -> GatewayConfig {
    let mut yaml = format!(
        "cluster: {cluster}\nlisten: {{peers: \"127.0.0.1:0\", ingress: \"127.0.0.1:0\", admin: \"127.0.0.1:0\"}}\n\
         tls: {{cert: {}, key: {}, ca: {}, reload_interval: 100ms}}\ndiscovery: {{file: {}}}\npeers:\n",
        gw_dir.join("cert.pem").display(),
        gw_dir.join("key.pem").display(),
        pki.ca_file().display(),
        discovery.display()
    );
    if peers.is_empty() {
        yaml = yaml.replace("peers:\n", "peers: []\n");
    }
    // "A,B,C": the peer's gateway replicas, A first.
    for (c, a) in peers {
        let mut addrs = a.split(',');
        let first = addrs.next().unwrap_or_default();
        let more: Vec<String> = addrs.map(|r| format!("\"{r}\"")).collect();
        yaml.push_str(&format!(
            "  - {{cluster: {c}, address: \"{first}\", replicas: [{}]}}\n",
            more.join(", ")
        ));
    }
    yaml.push_str(extra);
    GatewayConfig::parse(pki.dir.join(format!("{cluster}-gw.yaml")), &yaml)
        .unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

/// Two gateways, east and west, peered directly (or through `relay` for east → west).
struct Pair {
    _dir: tempfile::TempDir,
    pki: Pki,
    east: Gateway,
    west: Gateway,
    relay: Option<UdpRelay>,
    east_app: PathBuf,
}

async fn pair(west_services: &[(&str, u16, SocketAddr)], with_relay: bool, extra: &str) -> Pair {
    pair_full(west_services, with_relay, &[], &[], extra).await
}

/// [`pair`] where east also has `more_peers` (addresses as written).
async fn pair_full(
    west_services: &[(&str, u16, SocketAddr)],
    with_relay: bool,
    more_peers: &[(&str, String)],
    west_more_peers: &[(&str, String)],
    extra: &str,
) -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let east_gw = pki.gateway("east");
    let west_gw = pki.gateway("west");
    let east_app = pki.workload("east", "app");
    let west_disc = discovery(dir.path(), "west", west_services);
    let east_disc = discovery(dir.path(), "east", &[]);
    // West first (it only accepts: its peer entry for east has an address nobody listens on
    // until east exists; east dials west).
    let placeholder: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let mut west_peers = vec![("east", placeholder.to_string())];
    west_peers.extend(west_more_peers.iter().cloned());
    let west = Gateway::start(config_named(
        &pki,
        "west",
        &west_gw,
        &west_disc,
        &west_peers,
        extra,
    ))
    .await
    .unwrap();
    let (relay, target) = if with_relay {
        let r = UdpRelay::start(west.peer_addr).await.unwrap();
        let a = r.addr();
        (Some(r), a)
    } else {
        (None, west.peer_addr)
    };
    let mut east_peers = vec![("west", target.to_string())];
    east_peers.extend(more_peers.iter().cloned());
    let east = Gateway::start(config_named(
        &pki,
        "east",
        &east_gw,
        &east_disc,
        &east_peers,
        extra,
    ))
    .await
    .unwrap();
    let p = Pair {
        _dir: dir,
        pki,
        east,
        west,
        relay,
        east_app,
    };
    wait_link(&p.east, "west", "up", WAIT).await;
    p
}

fn link(gw: &Gateway, peer: &str) -> Option<LinkReport> {
    gw.links().into_iter().find(|l| l.cluster == peer)
}

async fn wait_link(gw: &Gateway, peer: &str, state: &str, within: Duration) -> Duration {
    let t = Instant::now();
    loop {
        if link(gw, peer).is_some_and(|l| l.state == state) {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < within,
            "link to {peer} not {state} within {within:?}: {:?}",
            link(gw, peer)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A TLS client with the identity in `dir` that expects a gateway on the other side.
fn client_config(dir: &Path, ca: &Path, alpn: &[u8]) -> rustls::ClientConfig {
    let certs = federation::identity::load_certs(dir.join("cert.pem")).unwrap();
    let key = federation::identity::load_private_key(dir.join("key.pem")).unwrap();
    let verifier = Arc::new(
        federation::identity::PeerVerifier::from_ca_file(
            ca,
            federation::identity::Role::Gateway,
            federation::identity::allow_any(),
        )
        .unwrap(),
    );
    let mut c = federation::identity::client_config(certs, key, verifier).unwrap();
    c.alpn_protocols = vec![alpn.to_vec()];
    c
}

fn client_tls(dir: &Path, ca: &Path) -> Arc<rustls::ClientConfig> {
    Arc::new(client_config(dir, ca, b"http/1.1"))
}

/// HTTP/1.1 CONNECT through an ingress; returns the status and, on 200, the tunnel.
async fn connect_h1(
    ingress: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    authority: &str,
    cluster: Option<&str>,
) -> (
    u16,
    String,
    Option<tokio_rustls::client::TlsStream<TcpStream>>,
) {
    connect_h1_with(ingress, tls, authority, cluster, "").await
}

/// [`connect_h1`] with more request header lines (each ending in CRLF).
async fn connect_h1_with(
    ingress: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    authority: &str,
    cluster: Option<&str>,
    more_headers: &str,
) -> (
    u16,
    String,
    Option<tokio_rustls::client::TlsStream<TcpStream>>,
) {
    let tcp = TcpStream::connect(ingress).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let connector = tokio_rustls::TlsConnector::from(tls);
    let mut s = connector
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let mut req = format!("CONNECT {authority} HTTP/1.1\r\nhost: {authority}\r\n");
    if let Some(c) = cluster {
        req.push_str(&format!("strait-cluster: {c}\r\n"));
    }
    req.push_str(more_headers);
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await.unwrap_or(0) == 0 {
            break;
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    if status == 200 {
        (status, text, Some(s))
    } else {
        // The reason comes with the status; do not wait for a keep-alive connection to close.
        let mut body = vec![0u8; 4096];
        let n = match tokio::time::timeout(Duration::from_millis(300), s.read(&mut body)).await {
            Ok(Ok(n)) => n,
            _ => 0,
        };
        body.truncate(n);
        (
            status,
            format!("{text}{}", String::from_utf8_lossy(&body)),
            None,
        )
    }
}

fn checksum(mut acc: u64, data: &[u8]) -> u64 {
    for chunk in data.chunks(8) {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        acc = (acc ^ u64::from_le_bytes(b))
            .wrapping_mul(0x100000001b3)
            .rotate_left(5);
    }
    acc
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_reaches_a_service_in_the_other_cluster() {
    let http = http_server("west").await;
    let p = pair(&[("web", 8080, http)], false, "").await;
    let proxy = format!("https://127.0.0.1:{}", p.east.ingress_addr.port());
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "-p", "--proxy", &proxy])
        .arg("--proxy-cert")
        .arg(p.east_app.join("cert.pem"))
        .arg("--proxy-key")
        .arg(p.east_app.join("key.pem"))
        .arg("--proxy-cacert")
        .arg(p.pki.ca_file())
        .args([
            "--proxy-header",
            "strait-cluster: west",
            "http://web.default:8080/",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from west\n");
}

/// The sidecar's load balancer names the endpoint (`strait-endpoint`, carried in the tunnel
/// header): the remote gateway connects to that one every time, and refuses an address that is
/// not a serving endpoint of the service (503, counted) instead of choosing another itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_reaches_the_endpoint_it_names_and_no_other() {
    let a = http_server("replica-a").await;
    let b = http_server("replica-b").await;
    let p = pair(&[("web", 8080, a), ("web", 8080, b)], false, "").await;
    let tls = client_tls(&p.east_app, &p.pki.ca_file());
    let ingress = p.east.ingress_addr;
    let through = |endpoint: String| {
        let tls = tls.clone();
        async move {
            let (status, head, s) = connect_h1_with(
                ingress,
                tls,
                "web.default:8080",
                Some("west"),
                &format!("strait-endpoint: {endpoint}\r\n"),
            )
            .await;
            let Some(mut s) = s else {
                return (status, head);
            };
            s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut out = Vec::new();
            let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
            (status, String::from_utf8_lossy(&out).to_string())
        }
    };
    // Without a name the gateway alternates; with one, the same replica every time.
    for (addr, who) in [(a, "replica-a"), (b, "replica-b")] {
        for _ in 0..3 {
            let (status, body) = through(addr.to_string()).await;
            assert_eq!(status, 200, "{body}");
            assert!(
                body.ends_with(&format!("hello from {who}\n")),
                "a tunnel naming {addr} reached another endpoint: {body}"
            );
        }
    }
    // An address that is not an endpoint of the service (here: the other gateway's ingress).
    let stranger = p.west.ingress_addr.to_string();
    let (status, body) = through(stranger.clone()).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.to_ascii_lowercase()
            .contains("strait-refusal: not_an_endpoint"),
        "the refusal says it is the endpoint's: {body}"
    );
    assert!(
        body.contains(&format!(
            "{stranger} is not a serving endpoint of web.default:8080"
        )),
        "{body}"
    );
    wait_counted(
        &p.west,
        "strait_gateway_stream_errors_total",
        "not_an_endpoint",
        1,
    )
    .await;
    // A name that is not an address is the sidecar's mistake: 400 at its own gateway.
    let (status, body) = through("web-1".into()).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("strait-endpoint"), "{body}");
}

/// A gateway serving a discovery file leaves out the endpoints the registry holds as not
/// serving (its control plane's active health checks failed them): the round robin skips them
/// and a tunnel naming one is refused; back when the registry says healthy again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_the_registry_holds_unhealthy_are_left_out() {
    use federation::registry::backend::Op;
    let dir = tempfile::tempdir().unwrap();
    let etcd = testkit::etcd::EtcdServer::start(&dir.path().join("etcd")).unwrap();
    let extra = format!("registry: {{etcd: [\"{}\"]}}\n", etcd.endpoint());
    let a = http_server("replica-a").await;
    let b = http_server("replica-b").await;
    let p = pair(&[("web", 8080, a), ("web", 8080, b)], false, &extra).await;
    let backend = federation::registry::Backend::Etcd(
        federation::registry::EtcdBackend::connect(
            &[etcd.endpoint()],
            federation::registry::EtcdOptions::default(),
        )
        .await
        .unwrap(),
    );
    // West's state as its control plane publishes it, with b's health as `health`.
    let file =
        federation::discovery::DiscoveryFile::load(p._dir.path().join("west-discovery.yaml"))
            .unwrap();
    let publish = |health: federation::model::Health| {
        let mut state = file.state.clone();
        for set in &mut state.services {
            for e in &mut set.endpoints {
                if e.socket_addr() == b {
                    e.health = health;
                }
            }
        }
        let ops: Vec<Op> = federation::registry::codec::cluster_state_kvs(&state)
            .into_iter()
            .map(|(key, value)| Op::Put {
                key,
                value,
                lease: None,
            })
            .collect();
        let backend = backend.clone();
        async move { backend.commit(ops).await.unwrap() }
    };
    let web = federation::model::ServiceKey::new("default", "web").unwrap();
    let local = &p.west.shared().local;
    publish(federation::model::Health::Unhealthy).await;
    let t = Instant::now();
    while local.named(&web, 8080, b).is_ok() {
        assert!(t.elapsed() < WAIT, "the gateway still serves b");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let picked: Vec<SocketAddr> = (0..4)
        .map(|_| local.pick(&web, 8080, 1).unwrap()[0].addr)
        .collect();
    assert_eq!(picked, vec![a; 4], "the round robin skips b");
    let tls = client_tls(&p.east_app, &p.pki.ca_file());
    let (status, head, _) = connect_h1_with(
        p.east.ingress_addr,
        tls,
        "web.default:8080",
        Some("west"),
        &format!("strait-endpoint: {b}\r\n"),
    )
    .await;
    assert_eq!(
        status, 503,
        "a tunnel naming the unhealthy endpoint: {head}"
    );
    publish(federation::model::Health::Healthy).await;
    let t = Instant::now();
    while local.named(&web, 8080, b).is_err() {
        assert!(t.elapsed() < WAIT, "the gateway never took b back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gibibyte_each_way_arrives_intact() {
    let echo = echo_server(false).await;
    let p = pair(&[("echo", 9000, echo)], false, "").await;
    let tls = client_tls(&p.east_app, &p.pki.ca_file());
    let (status, head, tunnel) =
        connect_h1(p.east.ingress_addr, tls, "echo.default:9000", Some("west")).await;
    assert_eq!(status, 200, "{head}");
    let (mut r, mut w) = tokio::io::split(tunnel.unwrap());
    const TOTAL: usize = 1 << 30;
    let writer = tokio::spawn(async move {
        let mut sum = 0u64;
        let mut block = vec![0u8; 256 * 1024];
        let mut sent = 0usize;
        let mut x = 0x9e3779b97f4a7c15u64;
        while sent < TOTAL {
            for b in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
            }
            sum = checksum(sum, &block);
            w.write_all(&block).await.unwrap();
            sent += block.len();
        }
        w.shutdown().await.unwrap();
        sum
    });
    let t = Instant::now();
    let mut sum = 0u64;
    let mut got = 0usize;
    let mut buf = vec![0u8; 256 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let n = tokio::time::timeout(WAIT, r.read(&mut buf))
            .await
            .expect("transfer stalled")
            .unwrap();
        if n == 0 {
            break;
        }
        got += n;
        // Checksum in the writer's 256 KiB blocks so both sides agree.
        pending.extend_from_slice(&buf[..n]);
        let whole = pending.len() / (256 * 1024) * (256 * 1024);
        if whole > 0 {
            for block in pending[..whole].chunks(256 * 1024) {
                sum = checksum(sum, block);
            }
            pending.drain(..whole);
        }
    }
    let sent_sum = writer.await.unwrap();
    assert_eq!(got, TOTAL, "bytes lost");
    assert!(pending.is_empty());
    assert_eq!(sum, sent_sum, "bytes corrupted");
    let secs = t.elapsed().as_secs_f64();
    println!(
        "1 GiB each way through the tunnel in {secs:.1} s ({:.0} MiB/s per direction)",
        1024.0 / secs
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_still_gets_the_full_reply() {
    let server = echo_server(true).await;
    let p = pair(&[("count", 7000, server)], false, "").await;
    let tls = client_tls(&p.east_app, &p.pki.ca_file());
    let (status, head, tunnel) =
        connect_h1(p.east.ingress_addr, tls, "count.default:7000", Some("west")).await;
    assert_eq!(status, 200, "{head}");
    let mut t = tunnel.unwrap();
    t.write_all(&[7u8; 100_000]).await.unwrap();
    // Shut down our write side only (TLS close_notify through the ingress, FIN on the stream).
    t.shutdown().await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(WAIT, t.read_to_end(&mut reply))
        .await
        .unwrap()
        .ok();
    assert_eq!(String::from_utf8_lossy(&reply), "got 100000 bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_tunnels_over_http2() {
    let echo = echo_server(false).await;
    let p = pair(&[("echo", 9000, echo)], false, "").await;
    let certs = federation::identity::load_certs(p.east_app.join("cert.pem")).unwrap();
    let key = federation::identity::load_private_key(p.east_app.join("key.pem")).unwrap();
    let verifier = Arc::new(
        federation::identity::PeerVerifier::from_ca_file(
            p.pki.ca_file(),
            federation::identity::Role::Gateway,
            federation::identity::allow_any(),
        )
        .unwrap(),
    );
    let mut tls = federation::identity::client_config(certs, key, verifier).unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tls = Arc::new(tls);
    let mut tasks = Vec::new();
    for conn in 0..10 {
        let tls = tls.clone();
        let ingress = p.east.ingress_addr;
        tasks.push(tokio::spawn(async move {
            let tcp = TcpStream::connect(ingress).await.unwrap();
            let s = tokio_rustls::TlsConnector::from(tls)
                .connect(
                    rustls_pki_types::ServerName::try_from("localhost").unwrap(),
                    tcp,
                )
                .await
                .unwrap();
            assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
            let (sender, connection) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(s),
            )
            .await
            .unwrap();
            tokio::spawn(connection);
            let mut streams = Vec::new();
            for i in 0..100 {
                let mut sender = sender.clone();
                streams.push(tokio::spawn(async move {
                    let req = http::Request::builder()
                        .method("CONNECT")
                        .uri("echo.default:9000")
                        .header("strait-cluster", "west")
                        .body(http_body_util::Empty::<bytes::Bytes>::new())
                        .unwrap();
                    let resp = sender.send_request(req).await.unwrap();
                    assert_eq!(resp.status(), 200);
                    let up = hyper::upgrade::on(resp).await.unwrap();
                    let mut io = hyper_util::rt::TokioIo::new(up);
                    let msg = format!("tunnel {conn}/{i}");
                    io.write_all(msg.as_bytes()).await.unwrap();
                    let mut back = vec![0u8; msg.len()];
                    io.read_exact(&mut back).await.unwrap();
                    assert_eq!(back, msg.as_bytes());
                }));
            }
            for s in streams {
                s.await.unwrap();
            }
        }));
    }
    let t = Instant::now();
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("tunnels stalled")
            .unwrap();
    }
    println!("1,000 concurrent tunnels echoed in {:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_errors_map_to_http_statuses() {
    let http = http_server("west").await;
    let p = pair(
        &[
            ("web", 8080, http),
            ("empty", 8081, "127.0.0.1:1".parse().unwrap()),
        ],
        false,
        "",
    )
    .await;
    let tls = client_tls(&p.east_app, &p.pki.ca_file());
    let ingress = p.east.ingress_addr;
    let (s, body, _) = connect_h1(ingress, tls.clone(), "web.default:8080", None).await;
    assert_eq!(s, 400, "{body}");
    assert!(body.contains("strait-cluster"), "{body}");
    let (s, body, _) = connect_h1(ingress, tls.clone(), "web.default:8080", Some("north")).await;
    assert_eq!(s, 404, "{body}");
    assert!(body.contains("north"), "{body}");
    let (s, body, _) = connect_h1(ingress, tls.clone(), "nothing.default:8080", Some("west")).await;
    assert_eq!(s, 404, "{body}");
    let (s, body, _) = connect_h1(ingress, tls.clone(), "empty.default:8081", Some("west")).await;
    assert_eq!(s, 502, "{body}");
    let (s, body, _) = connect_h1(ingress, tls.clone(), "not-an-authority", Some("west")).await;
    assert_eq!(s, 400, "{body}");
    // Another cluster's workload is refused with 403 and the reason.
    let west_app = p.pki.workload("west", "app");
    let (s, body, _) = connect_h1(
        ingress,
        client_tls(&west_app, &p.pki.ca_file()),
        "web.default:8080",
        Some("west"),
    )
    .await;
    assert_eq!(s, 403, "{body}");
    assert!(body.contains("cluster `east`"), "{body}");
    // TLS refusals are counted under their typed reason: a workload of another CA, and a client
    // without a certificate.
    let other = Pki::new(&p.pki.dir.join("other"));
    let foreign = other.workload("east", "app");
    tls_refused(ingress, client_tls(&foreign, &p.pki.ca_file())).await;
    wait_counted(&p.east, INGRESS_HANDSHAKE_FAILURES, "unknown_ca", 1).await;
    let gateways = federation::identity::PeerVerifier::from_ca_file(
        p.pki.ca_file(),
        federation::identity::Role::Gateway,
        federation::identity::allow_any(),
    )
    .unwrap();
    let mut anonymous =
        rustls::ClientConfig::builder_with_provider(federation::identity::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(gateways))
            .with_no_client_auth();
    anonymous.alpn_protocols = vec![b"http/1.1".to_vec()];
    tls_refused(ingress, Arc::new(anonymous)).await;
    wait_counted(&p.east, INGRESS_HANDSHAKE_FAILURES, "no_certificate", 1).await;
    // The gateway still serves good requests.
    let (s, body, _) = connect_h1(ingress, tls, "web.default:8080", Some("west")).await;
    assert_eq!(s, 200, "{body}");
}

/// A TLS connection to `ingress` that the gateway refuses: the client's side of the handshake may
/// complete (TLS 1.3 checks the client's certificate after), but no answer ever comes.
async fn tls_refused(ingress: SocketAddr, tls: Arc<rustls::ClientConfig>) {
    let tcp = TcpStream::connect(ingress).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("east").unwrap();
    let Ok(mut stream) = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
    else {
        return;
    };
    let _ = stream
        .write_all(b"CONNECT web.default:8080 HTTP/1.1\r\nhost: web.default:8080\r\n\r\n")
        .await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut buf)).await;
    assert!(
        matches!(read, Ok(Err(_))) || matches!(read, Ok(Ok(_)) if buf.is_empty()),
        "the ingress answered a client it must refuse: {read:?} {:?}",
        String::from_utf8_lossy(&buf)
    );
}

/// With `strait-early-status: 1`, the ingress answers once the stream to the peer is open; the
/// peer's status frame is the tunnel's first bytes (then the endpoint's bytes, or the end after
/// a refusal), and bytes sent right behind the CONNECT reach the endpoint. Local refusals keep
/// their HTTP statuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_status_tunnels_carry_the_peers_status_first() {
    use gateway::protocol::{StatusCode, TunnelStatus, parse_frame};
    const EARLY: &str = "strait-early-status: 1\r\n";
    let echo = echo_server(false).await;
    let p = pair(
        &[
            ("echo", 9000, echo),
            ("empty", 8081, "127.0.0.1:1".parse().unwrap()),
        ],
        false,
        "",
    )
    .await;
    let tls = client_tls(&p.east_app, &p.pki.ca_file());
    let ingress = p.east.ingress_addr;

    // OK: the status, then the echo of what was sent before it came.
    let (s, head, t) = connect_h1_with(
        ingress,
        tls.clone(),
        "echo.default:9000",
        Some("west"),
        EARLY,
    )
    .await;
    assert_eq!(s, 200, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("strait-early-status: 1"),
        "the gateway grants the early status: {head}"
    );
    let mut t = t.unwrap();
    t.write_all(b"ping").await.unwrap();
    let mut got = Vec::new();
    let (status, used) = tokio::time::timeout(WAIT, async {
        loop {
            if let Some((status, used)) = parse_frame::<TunnelStatus>(&got).unwrap()
                && got.len() >= used + 4
            {
                return (status, used);
            }
            let mut b = [0u8; 256];
            let n = t.read(&mut b).await.unwrap();
            assert!(n > 0, "the tunnel ended early: {got:?}");
            got.extend_from_slice(&b[..n]);
        }
    })
    .await
    .expect("the status and the echo in time");
    assert_eq!(status.code, StatusCode::Ok as i32, "{status:?}");
    assert_eq!(&got[used..], b"ping");
    drop(t);

    // The peer's refusals: 200 at once, then the refusal frame and the end of the tunnel; what
    // was sent meanwhile is dropped.
    for (authority, code) in [
        ("nothing.default:9000", StatusCode::UnknownService),
        ("empty.default:8081", StatusCode::ConnectFailed),
    ] {
        let (s, head, t) =
            connect_h1_with(ingress, tls.clone(), authority, Some("west"), EARLY).await;
        assert_eq!(s, 200, "{authority}: {head}");
        let mut t = t.unwrap();
        let _ = t.write_all(b"dropped").await;
        let mut all = Vec::new();
        tokio::time::timeout(WAIT, t.read_to_end(&mut all))
            .await
            .expect("the refused tunnel ends")
            .ok();
        let (status, used) = parse_frame::<TunnelStatus>(&all)
            .unwrap()
            .unwrap_or_else(|| panic!("{authority}: no status frame in {all:?}"));
        assert_eq!(status.code, code as i32, "{authority}: {status:?}");
        assert_eq!(used, all.len(), "{authority}: nothing follows a refusal");
        assert!(!status.message.is_empty(), "{authority}: a reason");
    }

    // Refusals made here keep their HTTP statuses.
    let (s, body, _) = connect_h1_with(
        ingress,
        tls.clone(),
        "echo.default:9000",
        Some("north"),
        EARLY,
    )
    .await;
    assert_eq!(s, 404, "{body}");
    let m = &p.east.shared().metrics;
    assert_eq!(
        m.ingress_early_total
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
    assert!(m.get("strait_gateway_ingress_refused_total", "refused") >= 2);

    // And the plain behaviour without the header: the status is not in the tunnel.
    let (s, _, t) = connect_h1(ingress, tls, "echo.default:9000", Some("west")).await;
    assert_eq!(s, 200);
    let mut t = t.unwrap();
    t.write_all(b"pong").await.unwrap();
    let mut b = [0u8; 4];
    tokio::time::timeout(WAIT, t.read_exact(&mut b))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(&b, b"pong");
}

const HANDSHAKE_FAILURES: &str = "strait_gateway_handshake_failures_total";
const INGRESS_HANDSHAKE_FAILURES: &str = "strait_gateway_ingress_handshake_failures_total";

/// Handshake failures a gateway has counted, all reasons together.
fn failures(gw: &Gateway) -> u64 {
    gw.shared()
        .metrics
        .render(gw.shared().own.as_str(), &[])
        .lines()
        .filter(|l| l.starts_with("strait_gateway_handshake_failures_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum::<u64>()
}

/// A refusal reaches the client before the gateway counts it: wait (bounded) until counter
/// `name{reason}` has reached `n`.
async fn wait_counted(gw: &Gateway, name: &'static str, reason: &str, n: u64) {
    let t = Instant::now();
    loop {
        let now = gw.shared().metrics.get(name, reason);
        if now >= n {
            return;
        }
        assert!(
            t.elapsed() < WAIT,
            "{name}{{reason=\"{reason}\"}} is {now}, expected at least {n}; the gateway counted:\n{}",
            gw.shared()
                .metrics
                .render(gw.shared().own.as_str(), &[])
                .lines()
                .filter(|l| l.contains("failures_total{"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A refusal reaches the client before the gateway's accept task counts it: wait (bounded) until
/// the gateway has counted at least `n` handshake failures.
async fn wait_handshake_failures(gw: &Gateway, n: u64) {
    let t = Instant::now();
    while failures(gw) < n {
        assert!(
            t.elapsed() < WAIT,
            "the gateway counted {} handshake failures, expected at least {n}",
            failures(gw)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A raw QUIC client presenting `cert_dir`'s certificate to `addr`.
async fn raw_quic(
    cert_dir: &Path,
    ca: &Path,
    addr: SocketAddr,
) -> Result<quinn::Connection, String> {
    let c = client_config(cert_dir, ca, gateway::tls::ALPN_PEER);
    let qc = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(c)).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(qc)));
    let conn = tokio::time::timeout(Duration::from_secs(5), ep.connect(addr, "east").unwrap())
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string())?;
    // The server may refuse after the handshake completes on the client side: wait a moment for
    // the close to arrive, and report it as a refusal.
    match tokio::time::timeout(Duration::from_millis(500), conn.closed()).await {
        Ok(reason) => Err(reason.to_string()),
        Err(_) => Ok(conn),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_that_are_not_member_gateways_are_refused() {
    let p = pair(&[], false, "").await;
    let before = failures(&p.east);
    let east_peer = p.east.peer_addr;
    let ca = p.pki.ca_file();
    // A gateway certificate from another CA.
    let other_dir = p.pki.dir.join("other");
    let other = Pki::new(&other_dir);
    let foreign = other.gateway("west");
    assert!(
        raw_quic(&foreign, &ca, east_peer).await.is_err(),
        "another CA's gateway was accepted"
    );
    // An expired gateway certificate.
    let id: SpiffeId = format!("spiffe://{TD}/cluster/west/gateway")
        .parse()
        .unwrap();
    let now = SystemTime::now();
    let expired = p
        .pki
        .ca
        .issue_with_validity(
            &id,
            now - Duration::from_secs(7200),
            now - Duration::from_secs(3600),
        )
        .unwrap();
    let expired_dir = p.pki.dir.join("expired");
    expired.write(&expired_dir).unwrap();
    assert!(
        raw_quic(&expired_dir, &ca, east_peer).await.is_err(),
        "an expired certificate was accepted"
    );
    // A workload certificate presented as a gateway.
    let wl = p.pki.workload("west", "app");
    assert!(
        raw_quic(&wl, &ca, east_peer).await.is_err(),
        "a workload certificate was accepted as a gateway"
    );
    // The gateway of a cluster nobody knows.
    let north = p.pki.gateway("north");
    assert!(
        raw_quic(&north, &ca, east_peer).await.is_err(),
        "an unknown cluster's gateway was accepted"
    );
    // Each refusal is counted under its typed reason (from the verifier's error, not its
    // message); the real peer link is untouched.
    wait_handshake_failures(&p.east, before + 4).await;
    for reason in ["unknown_ca", "expired", "wrong_role", "not_authorized"] {
        wait_counted(&p.east, HANDSHAKE_FAILURES, reason, 1).await;
    }
    assert_eq!(link(&p.east, "west").unwrap().state, "up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_bad_headers_affect_only_their_stream() {
    let echo = echo_server(false).await;
    let p = pair(&[("echo", 9000, echo)], false, "").await;
    // Garbage datagrams at the QUIC port.
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..200u32 {
        let junk: Vec<u8> = (0..(i % 1200 + 1)).map(|j| (i * 31 + j) as u8).collect();
        sock.send_to(&junk, p.west.peer_addr).await.unwrap();
    }
    // A legitimate peer (east's gateway identity) opening streams with bad headers.
    let conn = raw_quic(
        &p.pki.dir.join("east-gw"),
        &p.pki.ca_file(),
        p.west.peer_addr,
    )
    .await;
    // West keeps one connection per peer: our raw one may be the duplicate and get closed; if
    // it survives, exercise bad streams on it.
    if let Ok(conn) = conn {
        if let Ok((mut send, mut recv)) = conn.open_bi().await {
            let _ = send.write_all(b"GET / HTTP/1.1\r\n\r\n").await;
            let _ = send.finish();
            let buf = match tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1 << 16))
                .await
            {
                Ok(Ok(b)) => b,
                _ => Vec::new(),
            };
            let text = String::from_utf8_lossy(&buf);
            assert!(
                buf.is_empty() || text.contains("bad tunnel header"),
                "{text}"
            );
        }
        if let Ok((mut send, _recv)) = conn.open_bi().await {
            let _ = send.write_all(b"ST\xff\xff").await; // oversized
            let _ = send.finish();
        }
        conn.close(0u32.into(), b"done");
    }
    // Everything else still works (east re-establishes its link if our raw connection, which
    // carried east's identity, displaced it).
    wait_link(&p.east, "west", "up", Duration::from_secs(5)).await;
    let tls = client_tls(&p.east_app, &p.pki.ca_file());
    let (s, body, t) =
        connect_h1(p.east.ingress_addr, tls, "echo.default:9000", Some("west")).await;
    assert_eq!(s, 200, "{body}");
    let mut t = t.unwrap();
    t.write_all(b"still here").await.unwrap();
    let mut back = [0u8; 10];
    t.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_goes_down_fast_and_comes_back() {
    let echo = echo_server(false).await;
    let p = pair(&[("echo", 9000, echo)], true, "").await;
    let relay = p.relay.as_ref().unwrap();
    let tls = client_tls(&p.east_app, &p.pki.ca_file());
    // An open tunnel before the cut.
    let (s, body, t) = connect_h1(
        p.east.ingress_addr,
        tls.clone(),
        "echo.default:9000",
        Some("west"),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let mut open = t.unwrap();
    open.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    open.read_exact(&mut b).await.unwrap();

    relay.set_faults(Faults {
        blackhole: true,
        ..Faults::default()
    });
    let cut = Instant::now();
    // Declared down after 600 ms of silence; the bound leaves room for a loaded machine.
    let down = wait_link(&p.east, "west", "down", Duration::from_secs(3)).await;
    // The open tunnel fails (EOF or error) rather than hanging.
    let r = tokio::time::timeout(Duration::from_secs(1), open.read(&mut b)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "the open tunnel hung after the link went down: {r:?}"
    );
    let tunnel_failed = cut.elapsed();
    // New tunnels get 503 at once.
    let t = Instant::now();
    let (s, body, _) = connect_h1(
        p.east.ingress_addr,
        tls.clone(),
        "echo.default:9000",
        Some("west"),
    )
    .await;
    assert_eq!(s, 503, "{body}");
    assert!(
        body.to_ascii_lowercase()
            .contains("strait-refusal: link_down"),
        "the refusal says it is the path's, not the endpoint's: {body}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "a tunnel over a down link took {:?} to be refused",
        t.elapsed()
    );

    relay.set_faults(Faults::default());
    let up = wait_link(&p.east, "west", "up", Duration::from_secs(6)).await;
    let (s, body, _) =
        connect_h1(p.east.ingress_addr, tls, "echo.default:9000", Some("west")).await;
    assert_eq!(s, 200, "{body}");
    println!(
        "blackhole → down in {down:?}, open tunnel failed after {tunnel_failed:?}; heal → up in {up:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_percent_loss_never_flaps_down() {
    let p = pair(&[], true, "").await;
    let relay = p.relay.as_ref().unwrap();
    relay.set_faults(Faults {
        loss: 0.05,
        ..Faults::default()
    });
    let mut states = Vec::new();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(8) {
        let s = link(&p.east, "west").unwrap().state;
        if states.last() != Some(&s) {
            states.push(s);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !states.iter().any(|s| s == "down"),
        "5% loss took the link down: {states:?}"
    );
    assert!(states.len() <= 2, "the link flapped: {states:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_under_traffic_breaks_no_tunnel() {
    let echo = echo_server(false).await;
    let p = pair(&[("echo", 9000, echo)], false, "").await;
    let tls = client_tls(&p.east_app, &p.pki.ca_file());
    let mut tunnels = Vec::new();
    for _ in 0..4 {
        let (s, body, t) = connect_h1(
            p.east.ingress_addr,
            tls.clone(),
            "echo.default:9000",
            Some("west"),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        tunnels.push(t.unwrap());
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let traffic: Vec<_> = tunnels
        .into_iter()
        .enumerate()
        .map(|(i, mut t)| {
            let stop_rx = stop_rx.clone();
            tokio::spawn(async move {
                let mut rounds = 0u32;
                while !*stop_rx.borrow() {
                    let msg = format!("tunnel {i} round {rounds}");
                    t.write_all(msg.as_bytes())
                        .await
                        .expect("write failed during rotation");
                    let mut back = vec![0u8; msg.len()];
                    tokio::time::timeout(Duration::from_secs(5), t.read_exact(&mut back))
                        .await
                        .expect("tunnel stalled during rotation")
                        .expect("tunnel broke during rotation");
                    assert_eq!(back, msg.as_bytes());
                    rounds += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                rounds
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Rotate both gateways' certificates (new keys) while traffic flows.
    p.pki.gateway("east");
    p.pki.gateway("west");
    let t = Instant::now();
    while p
        .east
        .shared()
        .metrics
        .get("strait_gateway_cert_reloads_total", "ok")
        < 1
        || p.west
            .shared()
            .metrics
            .get("strait_gateway_cert_reloads_total", "ok")
            < 1
    {
        assert!(t.elapsed() < WAIT, "certificates were not reloaded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_tx.send_replace(true);
    for t in traffic {
        let rounds = t.await.unwrap();
        assert!(rounds > 10, "too little traffic: {rounds}");
    }
    // New tunnels after the rotation work, and the link never went down.
    let (s, body, _) =
        connect_h1(p.east.ingress_addr, tls, "echo.default:9000", Some("west")).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(link(&p.east, "west").unwrap().state, "up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_states_reach_the_registry() {
    use federation::registry::{Backend, EtcdBackend, EtcdOptions, RegistryCache};
    let dir = tempfile::tempdir().unwrap();
    let etcd = testkit::etcd::EtcdServer::start(&dir.path().join("etcd")).unwrap();
    let extra = format!(
        "registry: {{etcd: [\"{}\"], lease_ttl: 3s}}\n",
        etcd.endpoint()
    );
    let p = pair(&[], true, &extra).await;
    let cache = RegistryCache::spawn(Backend::Etcd(
        EtcdBackend::connect(&[etcd.endpoint()], EtcdOptions::default())
            .await
            .unwrap(),
    ));
    let state = |s: &federation::registry::Snapshot, from: &str, to: &str| {
        s.links
            .iter()
            .find(|((a, b), _)| a.as_str() == from && b.as_str() == to)
            .map(|(_, l)| l.state.as_str().to_string())
    };
    cache
        .wait_for(WAIT, |s| {
            state(s, "east", "west").as_deref() == Some("up")
                && state(s, "west", "east").as_deref() == Some("up")
        })
        .await
        .unwrap_or_else(|s| panic!("links not in the registry: {:?}", s.links));
    p.relay.as_ref().unwrap().set_faults(Faults {
        blackhole: true,
        ..Faults::default()
    });
    let t = Instant::now();
    cache
        .wait_for(WAIT, |s| {
            state(s, "east", "west").as_deref() == Some("down")
        })
        .await
        .unwrap_or_else(|s| panic!("the registry never showed the link down: {:?}", s.links));
    println!("link down in the registry {:?} after the cut", t.elapsed());
    // The admin endpoint shows the same.
    let body = http_get(p.east.admin_addr, "/links").await;
    let links: Vec<LinkReport> = serde_json::from_str(&body).unwrap();
    assert_eq!(links[0].cluster, "west");
    assert_eq!(links[0].state, "down");
    let metrics = http_get(p.east.admin_addr, "/metrics").await;
    assert!(
        metrics
            .contains("strait_gateway_link_state{cluster=\"east\",peer=\"west\",state=\"down\"} 1"),
        "{metrics}"
    );
    assert!(
        http_get(p.east.admin_addr, "/ready")
            .await
            .contains("ready")
    );
    // The gateway's lease ends with it: its link entries leave the registry.
    drop(p);
    cache
        .wait_for(Duration::from_secs(10), |s| s.links.is_empty())
        .await
        .unwrap_or_else(|s| panic!("link entries outlived the gateways: {:?}", s.links));
}

/// Writes (or, with `None`, deletes) `cluster`'s peering with `peer` in the registry.
async fn put_peering(
    backend: &federation::registry::Backend,
    cluster: &str,
    peer: &str,
    value: Option<federation::model::Peering>,
) {
    use federation::registry::backend::Op;
    use federation::registry::codec::{RegistryKey, encode_peering};
    let name = |n: &str| federation::model::Name::parse("cluster", n).unwrap();
    let key = RegistryKey::Peering(name(cluster), name(peer)).encode();
    let op = match value {
        Some(p) => Op::Put {
            key,
            value: encode_peering(&p),
            lease: None,
        },
        None => Op::Delete { key },
    };
    backend.commit(vec![op]).await.unwrap();
}

fn peering(
    cluster: &str,
    peer: &str,
    at: SocketAddr,
    trust_domain: &str,
    ca_bundle: Option<&str>,
) -> federation::model::Peering {
    let name = |n: &str| federation::model::Name::parse("cluster", n).unwrap();
    federation::model::Peering {
        cluster: name(cluster),
        peer: name(peer),
        region: name("r-peer"),
        gateways: vec![federation::model::GatewayAddress::parse("g", &at.to_string()).unwrap()],
        trust_domain: trust_domain.into(),
        ca_bundle: ca_bundle.map(str::to_string),
    }
}

/// Two clusters with CAs and trust domains of their own, linked by nothing but the peerings
/// (`FederatedCluster` objects) each declared in the registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peerings_link_clusters_of_two_cas_and_pin_each_to_its_own() {
    use federation::registry::{Backend, EtcdBackend, EtcdOptions};
    let dir = tempfile::tempdir().unwrap();
    let etcd = testkit::etcd::EtcdServer::start(&dir.path().join("etcd")).unwrap();
    let backend = Backend::Etcd(
        EtcdBackend::connect(&[etcd.endpoint()], EtcdOptions::default())
            .await
            .unwrap(),
    );
    let extra = format!(
        "registry: {{etcd: [\"{}\"], lease_ttl: 3s}}\n",
        etcd.endpoint()
    );
    std::fs::create_dir_all(dir.path().join("east")).unwrap();
    std::fs::create_dir_all(dir.path().join("west")).unwrap();
    let east_pki = Pki::with_trust_domain(&dir.path().join("east"), "east.example");
    let west_pki = Pki::with_trust_domain(&dir.path().join("west"), "west.example");
    let web = http_server("west").await;
    let west_disc = discovery(&west_pki.dir, "west", &[("web", 8080, web)]);
    let east_disc = discovery(&east_pki.dir, "east", &[]);
    let west = Gateway::start(config_named(
        &west_pki,
        "west",
        &west_pki.gateway("west"),
        &west_disc,
        &[],
        &extra,
    ))
    .await
    .unwrap();
    let east = Gateway::start(config_named(
        &east_pki,
        "east",
        &east_pki.gateway("east"),
        &east_disc,
        &[],
        &extra,
    ))
    .await
    .unwrap();

    // West declares east with east's CA; east declares west in west's trust domain but
    // without its CA: east cannot verify west, ignores the peering, and refuses west's dials.
    put_peering(
        &backend,
        "west",
        "east",
        Some(peering(
            "west",
            "east",
            east.peer_addr,
            "east.example",
            Some(east_pki.ca.ca_cert_pem()),
        )),
    )
    .await;
    put_peering(
        &backend,
        "east",
        "west",
        Some(peering(
            "east",
            "west",
            west.peer_addr,
            "west.example",
            None,
        )),
    )
    .await;
    let t = Instant::now();
    while failures(&east) == 0 {
        assert!(t.elapsed() < WAIT, "west never dialled east");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        link(&east, "west").is_none_or(|l| l.state != "up"),
        "east accepted a gateway no CA of its own vouches for"
    );

    // With west's CA bundle, the clusters peer both ways and a tunnel reaches west's service.
    put_peering(
        &backend,
        "east",
        "west",
        Some(peering(
            "east",
            "west",
            west.peer_addr,
            "west.example",
            Some(west_pki.ca.ca_cert_pem()),
        )),
    )
    .await;
    wait_link(&east, "west", "up", WAIT).await;
    wait_link(&west, "east", "up", WAIT).await;
    let app = east_pki.workload("east", "app");
    let reply = get_through(
        east.ingress_addr,
        client_tls(&app, &east_pki.ca_file()),
        "web.default:8080",
    )
    .await;
    assert!(reply.ends_with("hello from west\n"), "{reply}");

    // West is pinned to its CA: a certificate for west's gateway from east's own CA (which
    // east trusts for everyone else) is refused; the real link is untouched.
    let impostor = east_pki.gateway("west");
    let before = failures(&east);
    assert!(
        raw_quic(&impostor, &east_pki.ca_file(), east.peer_addr)
            .await
            .is_err(),
        "a certificate for a pinned cluster from another CA was accepted"
    );
    wait_handshake_failures(&east, before + 1).await;
    wait_counted(&east, HANDSHAKE_FAILURES, "unknown_ca", 1).await;
    assert_eq!(link(&east, "west").unwrap().state, "up");
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or(out)
}

/// A DNS server on loopback UDP that answers A queries for one name with an address that the test
/// can change (TTL 1 s), and counts the queries.
struct FakeDns {
    addr: SocketAddr,
    answer: Arc<std::sync::Mutex<std::net::Ipv4Addr>>,
    queries: Arc<std::sync::atomic::AtomicUsize>,
}

async fn fake_dns(name: &'static str, ip: std::net::Ipv4Addr) -> FakeDns {
    use hickory_proto::op::Message;
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{RData, Record, RecordType};
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let answer = Arc::new(std::sync::Mutex::new(ip));
    let queries = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (a, q) = (answer.clone(), queries.clone());
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                return;
            };
            let Ok(query) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut resp = Message::response(query.metadata.id, query.metadata.op_code);
            for qu in &query.queries {
                resp.add_query(qu.clone());
                if qu.query_type() == RecordType::A
                    && qu.name().to_ascii().trim_end_matches('.') == name
                {
                    q.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let ip = *a.lock().unwrap();
                    resp.add_answer(Record::from_rdata(qu.name().clone(), 1, RData::A(A(ip))));
                }
            }
            if let Ok(bytes) = resp.to_vec() {
                let _ = sock.send_to(&bytes, from).await;
            }
        }
    });
    FakeDns {
        addr,
        answer,
        queries,
    }
}

async fn get_through(
    ingress: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    authority: &str,
) -> String {
    let (status, head, s) = connect_h1(ingress, tls, authority, Some("west")).await;
    let Some(mut s) = s else {
        return format!("CONNECT failed: {status} {head}");
    };
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_behind_a_dns_name_is_followed_when_it_moves() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let east_gw = pki.gateway("east");
    let west_gw = pki.gateway("west");
    let east_app = pki.workload("east", "app");
    let old_site = http_server("the old west").await;
    let new_site = http_server("the new west").await;
    let dns = fake_dns("west.strait.test", "127.0.0.1".parse().unwrap()).await;
    let placeholder: SocketAddr = "127.0.0.1:9".parse().unwrap();

    let west_a = Gateway::start(config(
        &pki,
        "west",
        &west_gw,
        &discovery(dir.path(), "west", &[("web", 8080, old_site)]),
        &[("east", placeholder)],
        "",
    ))
    .await
    .unwrap();
    let port = west_a.peer_addr.port();
    let east = Gateway::start(config_named(
        &pki,
        "east",
        &east_gw,
        &discovery(dir.path(), "east", &[]),
        &[("west", format!("west.strait.test:{port}"))],
        &format!(
            "dns: {{nameservers: [\"{}\"], min_refresh: 200ms, max_refresh: 2s}}\n",
            dns.addr
        ),
    ))
    .await
    .unwrap();
    wait_link(&east, "west", "up", WAIT).await;
    assert!(dns.queries.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    let tls = client_tls(&east_app, &pki.ca_file());
    let got = get_through(east.ingress_addr, tls.clone(), "web.default:8080").await;
    assert!(got.contains("hello from the old west"), "{got}");

    // West moves to another address (same port, 127.0.0.2) and DNS follows it.
    west_a.shutdown().await;
    std::fs::create_dir_all(dir.path().join("moved")).unwrap();
    let mut moved = config(
        &pki,
        "west",
        &west_gw,
        &discovery(
            &dir.path().join("moved"),
            "west",
            &[("web", 8080, new_site)],
        ),
        &[("east", placeholder)],
        "",
    );
    moved.listen.peers = SocketAddr::from(([127, 0, 0, 2], port));
    let west_b = Gateway::start(moved).await.unwrap();
    let before = dns.queries.load(std::sync::atomic::Ordering::SeqCst);
    *dns.answer.lock().unwrap() = "127.0.0.2".parse().unwrap();
    let t = Instant::now();
    loop {
        let got = get_through(east.ingress_addr, tls.clone(), "web.default:8080").await;
        if got.contains("hello from the new west") {
            break;
        }
        assert!(
            t.elapsed() < WAIT,
            "east never followed west to its new address: {got}; links {:?}",
            east.links()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        dns.queries.load(std::sync::atomic::Ordering::SeqCst) > before,
        "the name was not looked up again"
    );
    east.shutdown().await;
    west_b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unresolvable_peer_name_is_reported_and_harms_nothing_else() {
    let http = http_server("west").await;
    let dns = fake_dns("other.strait.test", "127.0.0.1".parse().unwrap()).await;
    // A third peer whose name does not resolve; west and east still link and serve.
    let extra = format!(
        "dns: {{nameservers: [\"{}\"], min_refresh: 200ms}}\n",
        dns.addr
    );
    let p = pair_full(
        &[("web", 8080, http)],
        false,
        &[("north", "north.strait.test:4433".to_string())],
        &[],
        &extra,
    )
    .await;
    let tls = client_tls(&p.east_app, &p.pki.ca_file());
    let got = get_through(p.east.ingress_addr, tls.clone(), "web.default:8080").await;
    assert!(got.contains("hello from west"), "{got}");
    let l = link(&p.east, "north").expect("north is a known peer");
    assert_eq!(l.state, "down");
    assert!(!l.connected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_sent_right_behind_the_header_are_delivered() {
    use gateway::protocol::{
        StatusCode, TunnelHeader, TunnelStatus, VERSION, read_frame, write_frame,
    };
    let echo = echo_server(false).await;
    // West also knows "north": this test, as a member gateway.
    let p = pair_full(
        &[("echo", 9000, echo)],
        false,
        &[],
        &[("north", "127.0.0.1:9".to_string())],
        "",
    )
    .await;
    let north = p.pki.gateway("north");
    let conn = raw_quic(&north, &p.pki.ca_file(), p.west.peer_addr)
        .await
        .expect("north is a member of west's federation");
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let header = TunnelHeader {
        version: VERSION,
        service: "echo".into(),
        namespace: "default".into(),
        port: 9000,
        source_cluster: "north".into(),
        source_identity: format!("spiffe://{TD}/cluster/north/ns/default/sa/app"),
        request_id: "early-1".into(),
        endpoint: String::new(),
    };
    // Header and data in one flight, before any status: west must hold the data until it has
    // connected to the endpoint, then deliver it.
    write_frame(&mut send, &header).await.unwrap();
    send.write_all(b"early bytes").await.unwrap();
    let status: TunnelStatus = tokio::time::timeout(WAIT, read_frame(&mut recv))
        .await
        .expect("status in time")
        .unwrap();
    assert_eq!(status.code, StatusCode::Ok as i32, "{status:?}");
    let mut back = [0u8; 11];
    tokio::time::timeout(WAIT, recv.read_exact(&mut back))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(&back, b"early bytes");
    conn.close(0u32.into(), b"done");
}

/// The value of a counter on a gateway's `/metrics`.
async fn counter(gw: &Gateway, name: &str) -> u64 {
    let text = http_get(gw.admin_addr, "/metrics").await;
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// One tunnel from east's ingress to `echo.default:7000` in west, and a round trip through it.
async fn echo_through(ingress: SocketAddr, tls: Arc<rustls::ClientConfig>) -> Result<(), String> {
    let (status, head, stream) = connect_h1(ingress, tls, "echo.default:7000", Some("west")).await;
    let mut s = stream.ok_or_else(|| format!("status {status}: {head}"))?;
    s.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    if &buf != b"ping" {
        return Err(format!("echo returned {buf:?}"));
    }
    Ok(())
}

fn replica_state(gw: &Gateway, peer: &str, address: SocketAddr) -> Option<String> {
    link(gw, peer).and_then(|l| {
        l.replicas
            .into_iter()
            .find(|r| r.address == address.to_string())
            .map(|r| r.state)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_gateway_replicas_share_its_tunnels_and_losing_or_stopping_one_fails_none() {
    use federation::registry::{Backend, EtcdBackend, EtcdOptions, RegistryCache};
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let etcd = testkit::etcd::EtcdServer::start(&dir.path().join("etcd")).unwrap();
    let registry = format!(
        "registry: {{etcd: [\"{}\"], lease_ttl: 3s}}\n",
        etcd.endpoint()
    );
    let echo = echo_server(false).await;
    let (west_certs, east_certs) = (pki.gateway("west"), pki.gateway("east"));
    let east_app = pki.workload("east", "app");
    let west_disc = discovery(dir.path(), "west", &[("echo", 7000, echo)]);
    let east_disc = discovery(dir.path(), "east", &[]);
    // West runs two gateway replicas (one configuration but the replica name); east knows both
    // and reaches the second through a relay, to silence it as a dead node would be.
    let west = |replica: &str| {
        config_named(
            &pki,
            "west",
            &west_certs,
            &west_disc,
            &[("east", "127.0.0.1:9".to_string())],
            &format!("replica: {replica}\n{registry}"),
        )
    };
    let w1 = Gateway::start(west("w1")).await.unwrap();
    let w2 = Gateway::start(west("w2")).await.unwrap();
    let relay = UdpRelay::start(w2.peer_addr).await.unwrap();
    let (a1, a2) = (w1.peer_addr, relay.addr());
    let east = Gateway::start(config_named(
        &pki,
        "east",
        &east_certs,
        &east_disc,
        &[("west", format!("{a1},{a2}"))],
        &registry,
    ))
    .await
    .unwrap();
    let tls = client_tls(&east_app, &pki.ca_file());

    // A connection to each replica, both up.
    let t = Instant::now();
    while !(replica_state(&east, "west", a1).as_deref() == Some("up")
        && replica_state(&east, "west", a2).as_deref() == Some("up"))
    {
        assert!(
            t.elapsed() < WAIT,
            "east's links to both west replicas never came up: {:?}",
            link(&east, "west")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // New tunnels are spread over both replicas.
    for i in 0..40 {
        echo_through(east.ingress_addr, tls.clone())
            .await
            .unwrap_or_else(|e| panic!("tunnel {i}: {e}"));
    }
    let (n1, n2) = (
        counter(&w1, "strait_gateway_inbound_streams_total").await,
        counter(&w2, "strait_gateway_inbound_streams_total").await,
    );
    println!("40 tunnels: {n1} through west's replica w1, {n2} through w2");
    assert!(n1 >= 10 && n2 >= 10, "tunnels not spread: w1 {n1}, w2 {n2}");

    // Each west replica writes its own link key; readers merge them.
    let cache = RegistryCache::spawn(Backend::Etcd(
        EtcdBackend::connect(&[etcd.endpoint()], EtcdOptions::default())
            .await
            .unwrap(),
    ));
    let entry = |s: &federation::registry::Snapshot, from: &str, to: &str, r: Option<&str>| {
        s.link_entries
            .iter()
            .find(|((a, b, x), _)| {
                a.as_str() == from && b.as_str() == to && x.as_ref().map(|x| x.as_str()) == r
            })
            .map(|(_, l)| l.state.as_str().to_string())
    };
    cache
        .wait_for(WAIT, |s| {
            entry(s, "west", "east", Some("w1")).as_deref() == Some("up")
                && entry(s, "west", "east", Some("w2")).as_deref() == Some("up")
                && entry(s, "east", "west", None).as_deref() == Some("up")
        })
        .await
        .unwrap_or_else(|s| {
            panic!(
                "per-replica link keys not in the registry: {:?}",
                s.link_entries
            )
        });

    // w2 falls silent (a dead node: no close, no answer). East's link to west never goes down;
    // the replica's does, and every tunnel opened a second after the cut goes through w1.
    let states: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let watcher = tokio::spawn(east_links_view(&east, states.clone()));
    relay.set_faults(Faults {
        blackhole: true,
        ..Faults::default()
    });
    let cut = Instant::now();
    let load = {
        let (ingress, tls) = (east.ingress_addr, tls.clone());
        tokio::spawn(async move {
            let mut attempts = Vec::new();
            while cut.elapsed() < Duration::from_millis(2500) {
                let tls = tls.clone();
                attempts.push((
                    cut.elapsed(),
                    tokio::spawn(async move {
                        tokio::time::timeout(Duration::from_secs(8), echo_through(ingress, tls))
                            .await
                    }),
                ));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            attempts
        })
    };
    let replica_down = {
        while replica_state(&east, "west", a2).as_deref() != Some("down") {
            assert!(
                cut.elapsed() < WAIT,
                "the silent replica was never marked down: {:?}",
                link(&east, "west")
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        cut.elapsed()
    };
    assert!(
        replica_down < Duration::from_secs(2),
        "the silent replica's link went down only after {replica_down:?}"
    );
    let attempts = load.await.unwrap();
    let mut failed_early = 0;
    let mut last_failure = None;
    for (at, h) in attempts {
        let ok = matches!(h.await, Ok(Ok(Ok(()))));
        if !ok {
            last_failure = Some(at);
            if at < Duration::from_secs(1) {
                failed_early += 1;
            } else {
                panic!("a tunnel opened {at:?} after the cut failed");
            }
        }
    }
    println!(
        "w2 silenced: its link down after {replica_down:?}; {failed_early} tunnels opened in the first second failed (the last at {last_failure:?}); every later one went through w1"
    );
    watcher.abort();
    assert_eq!(
        link(&east, "west").map(|l| l.state),
        Some("up".to_string()),
        "the link to west must stay up while a replica is"
    );
    let states = states.lock().unwrap().clone();
    assert!(
        states.iter().all(|s| s == "up"),
        "east's link to west left `up` during the replica's loss: {states:?}"
    );

    // w2 comes back and takes tunnels again; then w1 stops gracefully and no tunnel fails.
    relay.set_faults(Faults::default());
    let t = Instant::now();
    while replica_state(&east, "west", a2).as_deref() != Some("up") {
        assert!(
            t.elapsed() < WAIT,
            "w2 never came back: {:?}",
            link(&east, "west")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Tunnels held open over both replicas (each echoes once), some through w1.
    let w1_before = counter(&w1, "strait_gateway_inbound_streams_total").await;
    let mut held = Vec::new();
    for i in 0..6 {
        let (status, head, stream) = connect_h1(
            east.ingress_addr,
            tls.clone(),
            "echo.default:7000",
            Some("west"),
        )
        .await;
        let mut s = stream.unwrap_or_else(|| panic!("held tunnel {i}: {status} {head}"));
        s.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        held.push(s);
    }
    let through_w1 = counter(&w1, "strait_gateway_inbound_streams_total").await - w1_before;
    assert!(through_w1 >= 1, "none of the held tunnels went through w1");
    // w1 stops gracefully: it tells east it is leaving, and waits for its tunnels under way.
    let stopping = Instant::now();
    let stopped = tokio::spawn(async move {
        w1.shutdown().await;
        stopping.elapsed()
    });
    let t = Instant::now();
    while !link(&east, "west").is_some_and(|l| {
        l.replicas
            .iter()
            .any(|r| r.address == a1.to_string() && r.leaving)
    }) {
        assert!(
            t.elapsed() < WAIT,
            "east never heard that w1 is leaving: {:?}",
            link(&east, "west")
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Every new tunnel goes through w2 while w1 drains; the held ones still carry bytes.
    let w2_before = counter(&w2, "strait_gateway_inbound_streams_total").await;
    for i in 0..20 {
        echo_through(east.ingress_addr, tls.clone())
            .await
            .unwrap_or_else(|e| panic!("tunnel {i} while w1 drains: {e}"));
    }
    assert_eq!(
        counter(&w2, "strait_gateway_inbound_streams_total").await - w2_before,
        20,
        "a new tunnel went to the leaving replica"
    );
    assert!(!stopped.is_finished(), "w1 stopped with tunnels under way");
    for (i, s) in held.iter_mut().enumerate() {
        s.write_all(b"pong").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf)
            .await
            .unwrap_or_else(|e| panic!("held tunnel {i} cut while w1 drains: {e}"));
        assert_eq!(&buf, b"pong");
    }
    // Once they close, w1's shutdown completes (well before its 10 s drain timeout).
    let closed = Instant::now();
    drop(held);
    let took = tokio::time::timeout(WAIT, stopped)
        .await
        .expect("w1's shutdown never completed")
        .unwrap();
    println!(
        "w1 drained {through_w1} held tunnels: stopped {took:?} after SIGTERM, {:?} after they closed",
        closed.elapsed()
    );
    assert!(
        closed.elapsed() < Duration::from_secs(5),
        "w1 waited {:?} after its last tunnel closed",
        closed.elapsed()
    );
    for i in 0..20 {
        echo_through(east.ingress_addr, tls.clone())
            .await
            .unwrap_or_else(|e| panic!("tunnel {i} after w1 stopped: {e}"));
    }
    assert_eq!(link(&east, "west").map(|l| l.state), Some("up".to_string()));
    drop(w2);
    drop(east);
}

/// Record in `states` every state east's link to west shows, every 5 ms, until aborted.
fn east_links_view(
    east: &Gateway,
    states: Arc<std::sync::Mutex<Vec<String>>>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let admin = east.admin_addr;
    async move {
        loop {
            let body = http_get(admin, "/links").await;
            if let Ok(links) = serde_json::from_str::<Vec<LinkReport>>(&body)
                && let Some(l) = links.into_iter().find(|l| l.cluster == "west")
            {
                states
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(l.state);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
