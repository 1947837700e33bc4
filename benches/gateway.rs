//! Gateway benchmarks, each side by side with its peer in one run:
//!
//! 1. bulk throughput of one tunnelled TCP connection (client → east ingress (TLS) → QUIC → west →
//!    server) against a direct TCP connection and against raw quinn (one stream, same TLS
//!    provider, same transport windows) on the same machine;
//! 2. time to open a new tunnelled connection (a stream on the existing QUIC connection, CONNECT
//!    over an existing HTTP/2 connection to the ingress, until the first echoed byte) against a
//!    fresh mutual-TLS 1.3 handshake (until the first echoed byte), median of 200;
//! 3. memory per idle tunnel: RSS growth of both gateway processes with 10,000 idle tunnels open.
//!
//! Run: `cargo xtask bench gateway` (= `cargo bench --bench gateway`). Options: `--mib N` (bulk
//! size, default 1024), `--tunnels N` (default 10000), `--samples N` (default 200).
// Tests and benchmarks: an unwrap is an assertion (a failure with the value's message).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use federation::identity::{CertificateAuthority, ExtraNames, PeerVerifier, Role, SpiffeId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod common;

use common::{Proc, arg, cpu_secs, free_port, rss_kib};

const TD: &str = "bench.strait";

fn issue(ca: &CertificateAuthority, id: &str, dir: &Path) {
    let id: SpiffeId = id.parse().expect("bad id");
    let names = ExtraNames {
        dns: vec!["localhost".into()],
        ips: vec!["127.0.0.1".parse().expect("ip")],
    };
    ca.issue_with_names(&id, Duration::from_secs(3600), &names)
        .unwrap_or_else(|e| panic!("{e}"))
        .write(dir)
        .unwrap_or_else(|e| panic!("{e}"));
}

struct Gw {
    proc: Proc,
    peers: SocketAddr,
    ingress: SocketAddr,
}

fn gateway(
    dir: &Path,
    cluster: &str,
    peer: &str,
    peer_addr: SocketAddr,
    services: &str,
    more_peers: &str,
) -> Gw {
    let peers = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let ingress = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let disc = dir.join(format!("{cluster}.yaml"));
    std::fs::write(
        &disc,
        format!("cluster: {cluster}\nregion: r\nservices: {services}\n"),
    )
    .expect("write");
    let cfg = dir.join(format!("{cluster}-gw.yaml"));
    std::fs::write(
        &cfg,
        format!(
            "cluster: {cluster}\nlisten: {{peers: \"{peers}\", ingress: \"{ingress}\", admin: \"{admin}\"}}\n\
             tls: {{cert: {cluster}-gw/cert.pem, key: {cluster}-gw/key.pem, ca: ca/ca.pem}}\n\
             discovery: {{file: {cluster}.yaml}}\npeers: [{{cluster: {peer}, address: \"{peer_addr}\"}}{more_peers}]\n"
        ),
    )
    .expect("write");
    let child = Command::new(env!("CARGO_BIN_EXE_strait"))
        .args(["--log", "warn", "gateway", "--config"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn gateway");
    Gw {
        proc: Proc(child),
        peers,
        ingress,
    }
}

fn tls_client(dir: &Path, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
    let certs = federation::identity::load_certs(dir.join("cert.pem")).expect("certs");
    let key = federation::identity::load_private_key(dir.join("key.pem")).expect("key");
    let v = Arc::new(
        PeerVerifier::from_ca_file(
            dir.join("ca.pem"),
            Role::Gateway,
            federation::identity::allow_any(),
        )
        .expect("verifier"),
    );
    let mut c = federation::identity::client_config(certs, key, v).expect("client config");
    c.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(c)
}

async fn sink_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut n = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => {
                            // A one-byte probe is echoed (time to first byte); bulk is counted.
                            if n == 0 && k == 1 {
                                let _ = s.write_all(&buf[..1]).await;
                                continue;
                            }
                            n += k as u64;
                        }
                    }
                }
                let _ = s.write_all(&n.to_be_bytes()).await;
            });
        }
    });
    addr
}

async fn h1_connect(
    ingress: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    authority: &str,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(ingress).await.expect("connect ingress");
    tcp.set_nodelay(true).expect("nodelay");
    let mut s = tokio_rustls::TlsConnector::from(tls)
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").expect("name"),
            tcp,
        )
        .await
        .unwrap_or_else(|e| panic!("ingress TLS: {e}"));
    s.write_all(
        format!(
            "CONNECT {authority} HTTP/1.1\r\nhost: {authority}\r\nstrait-cluster: west\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).await.expect("read head");
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

async fn bulk<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    bytes: u64,
) -> f64 {
    let block = vec![0x5au8; 256 * 1024];
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        s.write_all(&block).await.expect("bulk write");
        sent += block.len() as u64;
    }
    s.shutdown().await.expect("shutdown");
    let mut n = [0u8; 8];
    s.read_exact(&mut n).await.expect("bulk reply");
    assert_eq!(u64::from_be_bytes(n), sent, "bytes lost");
    sent as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64()
}

/// A quinn server endpoint and a client endpoint (west's gateway identity on both, same TLS
/// provider and transport settings as the gateways), for the raw-quinn peers.
fn quinn_pair(dir: &Path, alpn: &[u8]) -> (quinn::Endpoint, SocketAddr, quinn::Endpoint) {
    let (server, client) = common::quinn::configs(
        &dir.join("west-gw/cert.pem"),
        &dir.join("west-gw/key.pem"),
        &dir.join("ca/ca.pem"),
        alpn,
        &gateway::config::TransportTuning::default(),
    );
    let ep_s = quinn::Endpoint::server(server, "127.0.0.1:0".parse().expect("a")).expect("server");
    let addr = ep_s.local_addr().expect("addr");
    let ep_c = common::quinn::client("127.0.0.1:0".parse().expect("a"), client);
    (ep_s, addr, ep_c)
}

/// The smallest possible QUIC relay, for comparison: TCP in → one quinn stream per connection →
/// TCP out to `target`, plain `tokio::io::copy` both ways, no TLS on the TCP side, no header, no
/// health, in this process. Returns the TCP address to connect to.
async fn quinn_relay(dir: &Path, target: SocketAddr) -> SocketAddr {
    let (ep_s, addr, ep_c) = quinn_pair(dir, b"relay");
    tokio::spawn(async move {
        if let Some(inc) = ep_s.accept().await
            && let Ok(conn) = inc.await
        {
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                tokio::spawn(async move {
                    let Ok(tcp) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut r, mut w) = tcp.into_split();
                    let up = async {
                        let _ = tokio::io::copy(&mut recv, &mut w).await;
                        let _ = w.shutdown().await;
                    };
                    let down = async {
                        let _ = tokio::io::copy(&mut r, &mut send).await;
                        let _ = send.finish();
                    };
                    tokio::join!(up, down);
                });
            }
        }
    });
    let conn = ep_c
        .connect(addr, "west")
        .expect("connect")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let front = l.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ep = ep_c;
        while let Ok((tcp, _)) = l.accept().await {
            let Ok((mut send, mut recv)) = conn.open_bi().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.into_split();
                let up = async {
                    let _ = tokio::io::copy(&mut r, &mut send).await;
                    let _ = send.finish();
                };
                let down = async {
                    let _ = tokio::io::copy(&mut recv, &mut w).await;
                    let _ = w.shutdown().await;
                };
                tokio::join!(up, down);
            });
        }
    });
    front
}

async fn raw_quinn(dir: &Path, bytes: u64) -> f64 {
    let (ep_s, addr, ep_c) = quinn_pair(dir, b"raw");
    tokio::spawn(async move {
        if let Some(inc) = ep_s.accept().await
            && let Ok(conn) = inc.await
            && let Ok((mut send, mut recv)) = conn.accept_bi().await
        {
            let mut buf = vec![0u8; 256 * 1024];
            let mut n = 0u64;
            while let Ok(Some(k)) = recv.read(&mut buf).await {
                n += k as u64;
            }
            let _ = send.write_all(&n.to_be_bytes()).await;
            let _ = send.finish();
            conn.closed().await;
        }
    });
    let conn = ep_c
        .connect(addr, "west")
        .expect("connect")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (mut send, mut recv) = conn.open_bi().await.expect("open");
    let block = vec![0x5au8; 256 * 1024];
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        send.write_all(&block).await.expect("write");
        sent += block.len() as u64;
    }
    send.finish().expect("finish");
    let mut n = [0u8; 8];
    recv.read_exact(&mut n).await.expect("reply");
    assert_eq!(u64::from_be_bytes(n), sent);
    let r = sent as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64();
    conn.close(0u32.into(), b"done");
    r
}

/// A QUIC endpoint holding the "bench" cluster's gateway identity.
fn member_endpoint(dir: &Path) -> quinn::Endpoint {
    let certs = federation::identity::load_certs(dir.join("bench-gw/cert.pem")).expect("certs");
    let key = federation::identity::load_private_key(dir.join("bench-gw/key.pem")).expect("key");
    let v = Arc::new(
        PeerVerifier::from_ca_file(
            dir.join("ca/ca.pem"),
            Role::Gateway,
            federation::identity::allow_any(),
        )
        .expect("verifier"),
    );
    let mut cc = federation::identity::client_config(certs, key, v).expect("client config");
    cc.alpn_protocols = vec![gateway::tls::ALPN_PEER.to_vec()];
    let tuning = gateway::config::TransportTuning::default();
    let link = gateway::config::LinkConfig::default();
    let transport = gateway::tls::transport(&tuning, link.keep_alive, link.idle_timeout)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut client = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(cc)).expect("quic client"),
    ));
    client.transport_config(Arc::new(transport));
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("a")).expect("endpoint");
    ep.set_default_client_config(client);
    ep
}

/// Answer west's link probes on a kept connection (as a gateway does), so west keeps it up.
fn answer_probes(conn: quinn::Connection) {
    use gateway::health::{ProbeKind, decode_probe, encode_probe};
    tokio::spawn(async move {
        while let Ok(d) = conn.read_datagram().await {
            if let Ok((ProbeKind::Ping, seq)) = decode_probe(&d) {
                let _ = conn.send_datagram(bytes::Bytes::copy_from_slice(&encode_probe(
                    ProbeKind::Pong,
                    seq,
                )));
            }
        }
    });
}

/// Open a tunnel to sink.default:9000 on `conn` and wait for one echoed byte. `pipelined`: the
/// byte goes right behind the header, before the status arrives (one round trip instead of two;
/// west keeps it in the stream until the endpoint is connected).
async fn tunnel_first_byte(conn: &quinn::Connection, i: usize, pipelined: bool) {
    use gateway::protocol::{
        StatusCode, TunnelHeader, TunnelStatus, VERSION, read_frame, write_frame,
    };
    let (mut send, mut recv) = conn.open_bi().await.expect("open stream");
    let header = TunnelHeader {
        version: VERSION,
        service: "sink".into(),
        namespace: "default".into(),
        port: 9000,
        source_cluster: "bench".into(),
        source_identity: format!("spiffe://{TD}/cluster/bench/ns/default/sa/bench"),
        request_id: format!("bench-{i}"),
        endpoint: String::new(),
    };
    write_frame(&mut send, &header).await.expect("header");
    if pipelined {
        send.write_all(b"x").await.expect("write");
    }
    let status: TunnelStatus = read_frame(&mut recv)
        .await
        .unwrap_or_else(|e| panic!("tunnel {i}: no status: {e}"));
    assert_eq!(status.code, StatusCode::Ok as i32, "tunnel {i}: {status:?}");
    if !pipelined {
        send.write_all(b"x").await.expect("write");
    }
    let mut b = [0u8; 1];
    recv.read_exact(&mut b).await.expect("echo");
    let _ = send.finish();
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mib = arg("--mib", 1024) as u64;
    let tunnels = arg("--tunnels", 10_000);
    let samples = arg("--samples", 200);
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let tmp = std::env::temp_dir().join(format!("strait-bench-gw-{}", std::process::id()));
    let dir: PathBuf = tmp.clone();
    std::fs::create_dir_all(&dir).expect("mkdir");
    let ca = CertificateAuthority::init(TD, Duration::from_secs(86400))
        .unwrap_or_else(|e| panic!("{e}"));
    ca.write(dir.join("ca"), true)
        .unwrap_or_else(|e| panic!("{e}"));
    issue(
        &ca,
        &format!("spiffe://{TD}/cluster/east/gateway"),
        &dir.join("east-gw"),
    );
    issue(
        &ca,
        &format!("spiffe://{TD}/cluster/west/gateway"),
        &dir.join("west-gw"),
    );
    issue(
        &ca,
        &format!("spiffe://{TD}/cluster/bench/gateway"),
        &dir.join("bench-gw"),
    );
    issue(
        &ca,
        &format!("spiffe://{TD}/cluster/east/ns/default/sa/bench"),
        &dir.join("east-app"),
    );

    let sink = sink_server().await;
    let services = format!(
        "[{{name: sink, ports: [{{name: t, port: 9000, protocol: tcp}}], endpoints: [{{address: 127.0.0.1, port: {}, zone: z}}]}}]",
        sink.port()
    );
    let west_peers = SocketAddr::from(([127, 0, 0, 1], free_port()));
    // West first, then east pointing at it; west learns east's address from its config.
    let east_peers_guess = SocketAddr::from(([127, 0, 0, 1], 9));
    // West also knows "bench": this process, dialing west as a member gateway (section 2).
    let west = gateway(
        &dir,
        "west",
        "east",
        east_peers_guess,
        &services,
        ", {cluster: bench, address: \"127.0.0.1:9\"}",
    );
    let _ = west_peers;
    let east = gateway(&dir, "east", "west", west.peers, "[]", "");
    let tls_h1 = tls_client(&dir.join("east-app"), b"http/1.1");
    // Wait until a tunnel opens (the link is up).
    let t = Instant::now();
    loop {
        if let Ok(Ok(tcp)) =
            tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(east.ingress)).await
        {
            drop(tcp);
            let attempt = tokio::time::timeout(Duration::from_secs(2), async {
                let tcp = TcpStream::connect(east.ingress).await.ok()?;
                let mut s = tokio_rustls::TlsConnector::from(tls_h1.clone())
                    .connect(rustls_pki_types::ServerName::try_from("localhost").ok()?, tcp)
                    .await
                    .ok()?;
                s.write_all(b"CONNECT sink.default:9000 HTTP/1.1\r\nhost: x\r\nstrait-cluster: west\r\n\r\n").await.ok()?;
                let mut b = [0u8; 12];
                s.read_exact(&mut b).await.ok()?;
                Some(b.starts_with(b"HTTP/1.1 200"))
            })
            .await;
            if matches!(attempt, Ok(Some(true))) {
                break;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "gateways did not link up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("gateway benchmarks (east and west as separate `strait gateway` processes)\n");

    // 1. Memory per idle tunnel (first, while the gateways' heaps hold nothing freed by other
    //    phases that new tunnels could reuse unseen).
    let (east_pid, west_pid) = (east.proc.0.id(), west.proc.0.id());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let e_base = rss_kib(east_pid);
    let per_conn = 100usize;
    let conns = tunnels.div_ceil(per_conn);
    let mut held = Vec::new();
    let mut senders = Vec::new();
    for _ in 0..conns {
        let tcp = TcpStream::connect(east.ingress).await.expect("connect");
        let s = tokio_rustls::TlsConnector::from(tls_client(&dir.join("east-app"), b"h2"))
            .connect(
                rustls_pki_types::ServerName::try_from("localhost").expect("n"),
                tcp,
            )
            .await
            .expect("tls");
        let (mut sender, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .max_concurrent_reset_streams(0)
                .handshake(hyper_util::rt::TokioIo::new(s))
                .await
                .expect("h2");
        tokio::spawn(conn);
        sender.ready().await.expect("h2 ready");
        senders.push(sender);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (e0, w0) = (rss_kib(east_pid), rss_kib(west_pid));
    for i in 0..tunnels {
        let mut sender = senders[i / per_conn].clone();
        let req = http::Request::builder()
            .method("CONNECT")
            .uri("sink.default:9000")
            .header("strait-cluster", "west")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("req");
        let resp = sender
            .send_request(req)
            .await
            .unwrap_or_else(|e| panic!("tunnel {i}: {e}"));
        assert_eq!(resp.status(), 200, "tunnel {i}");
        held.push(hyper::upgrade::on(resp).await.expect("upgrade"));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (e1, w1) = (rss_kib(east_pid), rss_kib(west_pid));
    let per = |a: u64, b: u64| (b.saturating_sub(a)) as f64 * 1024.0 / tunnels as f64;
    println!(
        "{conns} idle HTTP/2 + mTLS ingress connections at east: {:.1} KiB each",
        (e0.saturating_sub(e_base)) as f64 / conns.max(1) as f64
    );
    println!("{tunnels} idle tunnels on them, RSS growth per tunnel:");
    println!(
        "  east gateway (HTTP/2 stream + QUIC stream)  {:6.0} B  ({} → {} KiB)",
        per(e0, e1),
        e0,
        e1
    );
    println!(
        "  west gateway (QUIC stream + TCP)            {:6.0} B  ({} → {} KiB)   (goal ≤ 4 KiB each)",
        per(w0, w1),
        w0,
        w1
    );
    drop(held);
    drop(senders);
    println!();

    // 2. Bulk throughput.
    let bytes = mib << 20;
    let (east_pid, west_pid) = (east.proc.0.id().to_string(), west.proc.0.id().to_string());
    let direct = bulk(TcpStream::connect(sink).await.expect("direct"), bytes).await;
    let c0 = cpu_secs("self");
    let raw = raw_quinn(&dir, bytes).await;
    let raw_cpu = cpu_secs("self") - c0;
    let relay_front = quinn_relay(&dir, sink).await;
    let relay = bulk(TcpStream::connect(relay_front).await.expect("relay"), bytes).await;
    let (s0, e0, w0) = (cpu_secs("self"), cpu_secs(&east_pid), cpu_secs(&west_pid));
    let tunnel = bulk(
        h1_connect(east.ingress, tls_h1.clone(), "sink.default:9000").await,
        bytes,
    )
    .await;
    let gw_cpu = cpu_secs(&east_pid) - e0 + cpu_secs(&west_pid) - w0;
    let ends_cpu = cpu_secs("self") - s0;
    let gib = bytes as f64 / (1u64 << 30) as f64;
    println!("bulk, one connection, {mib} MiB:");
    println!("  direct TCP          {direct:8.0} MiB/s");
    println!("  raw quinn (1 stream) {raw:7.0} MiB/s");
    println!(
        "  minimal quinn relay {relay:8.0} MiB/s   (TCP → quinn → TCP, plain copies, no ingress TLS)"
    );
    println!(
        "  strait tunnel       {tunnel:8.0} MiB/s   = {:.0}% of raw quinn, {:.0}% of direct TCP (goal ≥ 70% of raw quinn)",
        100.0 * tunnel / raw,
        100.0 * tunnel / direct
    );
    println!(
        "                                          = {:.0}% of the minimal quinn relay",
        100.0 * tunnel / relay
    );
    println!("CPU seconds per GiB (user + system; all parties share this machine's cores):");
    println!(
        "  raw quinn, both ends                        {:6.2}",
        raw_cpu / gib
    );
    println!(
        "  strait gateways, east + west                {:6.2}   = {:.2}× raw quinn",
        gw_cpu / gib,
        gw_cpu / raw_cpu
    );
    println!(
        "  tunnel's ends (TLS client, TCP sink)        {:6.2}",
        ends_cpu / gib
    );

    // 3. New connection time to first byte.
    //
    // The claim: a new tunnel needs no handshake, it is a stream on the link's existing QUIC
    // connection. Measured as a member gateway ("bench", in this process) opening tunnels to
    // west → sink: on one kept connection (what a gateway does), and each on a fresh QUIC
    // connection (a full mutual-TLS 1.3 handshake first). Same client, same west, same sink;
    // the only difference is the handshake. For context: a fresh mTLS 1.3 connection over TCP
    // straight to a TLS echo server, and a sidecar's whole path (a CONNECT on a kept HTTP/2
    // connection to east's ingress → QUIC → west → sink).
    let member = member_endpoint(&dir);
    let kept = member
        .connect(west.peers, "west")
        .expect("connect")
        .await
        .unwrap_or_else(|e| panic!("member connection to west: {e}"));
    answer_probes(kept.clone());
    let mut on_kept = Vec::new();
    for i in 0..samples {
        let t = Instant::now();
        tunnel_first_byte(&kept, i, false).await;
        on_kept.push(t.elapsed());
    }
    let mut pipelined = Vec::new();
    for i in 0..samples {
        let t = Instant::now();
        tunnel_first_byte(&kept, 2 * samples + i, true).await;
        pipelined.push(t.elapsed());
    }
    let mut on_fresh = Vec::new();
    for i in 0..samples {
        let t = Instant::now();
        let conn = member
            .connect(west.peers, "west")
            .expect("connect")
            .await
            .unwrap_or_else(|e| panic!("fresh member connection to west: {e}"));
        tunnel_first_byte(&conn, samples + i, false).await;
        on_fresh.push(t.elapsed());
        conn.close(0u32.into(), b"sample done");
    }
    kept.close(0u32.into(), b"done");

    let tls_h2 = tls_client(&dir.join("east-app"), b"h2");
    let tcp = TcpStream::connect(east.ingress).await.expect("h2 connect");
    tcp.set_nodelay(true).expect("nodelay");
    let s = tokio_rustls::TlsConnector::from(tls_h2)
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").expect("n"),
            tcp,
        )
        .await
        .expect("h2 tls");
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(s),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    let mut via_ingress = Vec::new();
    for _ in 0..samples {
        let mut sender = sender.clone();
        let t = Instant::now();
        let req = http::Request::builder()
            .method("CONNECT")
            .uri("sink.default:9000")
            .header("strait-cluster", "west")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("req");
        let resp = sender.send_request(req).await.expect("connect");
        let up = hyper::upgrade::on(resp).await.expect("upgrade");
        let mut io = hyper_util::rt::TokioIo::new(up);
        io.write_all(b"x").await.expect("w");
        let mut b = [0u8; 1];
        io.read_exact(&mut b).await.expect("r");
        via_ingress.push(t.elapsed());
    }
    // A fresh mutual-TLS 1.3 handshake over TCP to a TLS echo server (same provider), then one
    // byte.
    let certs = federation::identity::load_certs(dir.join("west-gw/cert.pem")).expect("c");
    let key = federation::identity::load_private_key(dir.join("west-gw/key.pem")).expect("k");
    let v = Arc::new(
        PeerVerifier::from_ca_file(
            dir.join("ca/ca.pem"),
            Role::Workload,
            federation::identity::allow_any(),
        )
        .expect("v"),
    );
    let sc = Arc::new(federation::identity::server_config(certs, key, v).expect("sc"));
    let tls_l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let tls_addr = tls_l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = tls_l.accept().await {
            let acc = tokio_rustls::TlsAcceptor::from(sc.clone());
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                if let Ok(mut s) = acc.accept(tcp).await {
                    let mut b = [0u8; 1];
                    if s.read_exact(&mut b).await.is_ok() {
                        let _ = s.write_all(&b).await;
                    }
                }
            });
        }
    });
    let mut tcp_tls = Vec::new();
    for _ in 0..samples {
        let t = Instant::now();
        let tcp = TcpStream::connect(tls_addr).await.expect("tls connect");
        tcp.set_nodelay(true).expect("nodelay");
        let mut s = tokio_rustls::TlsConnector::from(tls_h1.clone())
            .connect(
                rustls_pki_types::ServerName::try_from("localhost").expect("n"),
                tcp,
            )
            .await
            .expect("tls");
        s.write_all(b"x").await.expect("w");
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.expect("r");
        tcp_tls.push(t.elapsed());
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let tls_p50 = median(&mut tcp_tls);
    let (kept_p50, pipe_p50) = (median(&mut on_kept), median(&mut pipelined));
    let fresh_p50 = median(&mut on_fresh);
    let vs = |d: Duration| d.as_secs_f64() / tls_p50.as_secs_f64();
    println!("\nnew connection, time to first echoed byte, median of {samples}:");
    println!(
        "  fresh mTLS 1.3 connection over TCP to an echo server      {:7.3} ms   (the peer)",
        ms(tls_p50)
    );
    println!(
        "  new tunnel on the kept QUIC connection, byte after status {:7.3} ms   = {:.2}×",
        ms(kept_p50),
        vs(kept_p50)
    );
    println!(
        "  new tunnel on the kept QUIC connection, byte with header  {:7.3} ms   = {:.2}× (goal ≤ 0.5×)",
        ms(pipe_p50),
        vs(pipe_p50)
    );
    println!(
        "  for context: tunnel on a fresh QUIC connection            {:7.3} ms   = {:.2}×",
        ms(fresh_p50),
        vs(fresh_p50)
    );
    println!(
        "  for context: sidecar CONNECT via east's ingress (h2)      {:7.3} ms   = {:.2}× (two gateways)",
        ms(median(&mut via_ingress)),
        vs(median(&mut via_ingress))
    );

    drop(east);
    drop(west);
    let _ = std::fs::remove_dir_all(&tmp);
}
