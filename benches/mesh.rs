//! The cross-cluster path, side by side in one run, against the Istio multi-network path built
//! from stock Envoys (benchmark issue, items 2 and 3).
//!
//! A lab of two clusters in network namespaces (`strait lab up --clusters 2`, netns mode: root)
//! with a veth link between them. This process starts a server in the remote cluster's namespace
//! on the cluster's address — HTTP/1.1 1 KiB answers (`:26080`), a TCP echo (`:26081`) and a
//! TCP bulk source (`:26082`: the client writes a byte count and a newline, the server sends
//! that many bytes) — and publishes it in the remote cluster's discovery file as three services
//! (`bench-http`, `bench-echo`, `bench-bulk`), with no sidecar in front: the remote gateway
//! dials it. From the first cluster's namespace it then drives three paths:
//!
//! - **direct**: client → server over the link;
//! - **strait**: client → the cluster's client sidecar (`strait proxy`, one worker) → its
//!   gateway (HTTP/2 CONNECT over mTLS) ⇒ QUIC over the link ⇒ the remote gateway → server;
//! - **envoy** (Istio's multi-network data path, stock Envoy 1.40): client → Envoy sidecar
//!   (`--concurrency 1`; mTLS origination with the workload certificate, SNI
//!   `outbound_.PORT_._.HOST`) → over the link → Envoy east-west gateway in the remote
//!   namespace (`--concurrency 2`; TLS passthrough routed by SNI, like `AUTO_PASSTHROUGH`) →
//!   Envoy sidecar (`--concurrency 1`; mTLS termination) → server.
//!
//! Measured, in this order, each path back to back:
//!
//! 1. latency: `--rate` (1,000) requests/s for `--secs` (10) s on keep-alive connections, from
//!    each request's due time (coordinated-omission correction); added p50/p90/p99 over direct;
//!    CPU time of the path's three processes per request; repeated `--repeat` (3) rounds;
//! 2. bulk: one TCP connection carrying `--mib` (256) MiB from the server, `--bulk-repeat` (3)
//!    times: MiB/s;
//! 3. new connection: connect, send a byte, read its echo: time to first byte, median of
//!    `--ttfb` (200);
//! 4. under impairment (`--impair 0` skips it): the link degraded by `strait chaos degrade`
//!    (each direction's loss 1 % then 5 %, 50 ms round trip): latency at 200 requests/s, bulk
//!    for 10 s, time to first byte (median of 20).
//!
//! `--strait PATH` runs the lab with another `strait` binary (an earlier commit's build): the
//! same run against the previous commit.
//!
//! Run: `cargo xtask bench mesh` (= `cargo bench --bench mesh`, as root).
// Tests and benchmarks: an unwrap is an assertion (a failure with the value's message).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use common::envoy::{
    certs, http_manager, istio_sni, retries, sock, static_cluster, tcp_proxy, tls_inspector,
    tls_socket,
};
use common::http::{Conn, fixed_rate, fixed_rate_run, median, us};
use common::lab::{Lab, Place, in_ns};
use common::{arg, cpu_secs, percentile};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LAB: &str = "mesh";
const HOST: &str = "bench-http.default";
/// The server's ports, and the services' (the client sidecar's TCP listeners are at these
/// ports on its own loopback).
const HTTP: u16 = 26080;
const ECHO: u16 = 26081;
const BULK: u16 = 26082;
/// Raw quinn's byte source (UDP), the peer of the gateways' link.
const RAW_QUIC: u16 = 26443;
/// The Envoy mesh: the client sidecar's admin, HTTP and TCP listeners (in the first cluster's
/// namespace), the east-west gateway's TLS port and admin, the server sidecar's admin and its
/// inbound listeners (server port + 1100) in the remote namespace.
const E_ADMIN: u16 = 27000;
const E_HTTP: u16 = 27001;
const E_TCP_OFFSET: u16 = 1000;
const EW_PORT: u16 = 27443;
const EW_ADMIN: u16 = 27100;
const W_ADMIN: u16 = 27200;
const W_INBOUND_OFFSET: u16 = 1100;

const MIB: f64 = 1024.0 * 1024.0;

/// The TCP echo: every byte back, until the client closes.
async fn echo_server(bind: SocketAddr) {
    let l = TcpListener::bind(bind).await.expect("bind the echo server");
    while let Ok((mut s, _)) = l.accept().await {
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// The bulk source: reads `N\n`, sends N bytes, half-closes, waits for the client to close.
async fn bulk_server(bind: SocketAddr) {
    let l = TcpListener::bind(bind).await.expect("bind the bulk server");
    while let Ok((mut s, _)) = l.accept().await {
        tokio::spawn(async move {
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            loop {
                match s.read(&mut b).await {
                    Ok(1) if b[0] == b'\n' => break,
                    Ok(1) if line.len() < 32 => line.push(b[0]),
                    _ => return,
                }
            }
            let Some(mut left) = std::str::from_utf8(&line)
                .ok()
                .and_then(|l| l.trim().parse::<u64>().ok())
            else {
                return;
            };
            let chunk = vec![b'x'; 64 * 1024];
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                if s.write_all(&chunk[..n]).await.is_err() {
                    return;
                }
                left -= n as u64;
            }
            let _ = s.shutdown().await;
            let _ = s.read(&mut b).await;
        });
    }
}

/// One bulk transfer of `bytes` through `to`, cut off after `limit`: MiB/s from the connect.
async fn bulk(to: SocketAddr, bytes: u64, limit: Duration) -> Result<f64, String> {
    let t0 = tokio::time::Instant::now();
    let deadline = t0 + limit;
    let mut s = TcpStream::connect(to)
        .await
        .map_err(|e| format!("connect {to}: {e}"))?;
    s.write_all(format!("{bytes}\n").as_bytes())
        .await
        .map_err(|e| format!("write to {to}: {e}"))?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    while got < bytes {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => break,
            Ok(Ok(0)) => return Err(format!("{to} closed after {got} of {bytes} bytes")),
            Ok(Ok(n)) => got += n as u64,
            Ok(Err(e)) => return Err(format!("{to} after {got} of {bytes} bytes: {e}")),
        }
    }
    Ok(got as f64 / MIB / t0.elapsed().as_secs_f64())
}

/// Connect, send one byte, read its echo: the time from the connect to the byte.
async fn first_byte(to: SocketAddr) -> Result<Duration, String> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(to)
        .await
        .map_err(|e| format!("connect {to}: {e}"))?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.write_all(b"x").await.map_err(|e| e.to_string())?;
    let mut b = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut b))
        .await
        .map_err(|_| format!("{to}: no echo within 10 s"))?
        .map_err(|e| format!("{to}: {e}"))?;
    Ok(t0.elapsed())
}

fn median_duration(mut v: Vec<Duration>) -> Duration {
    v.sort();
    percentile(&v, 0.5)
}

/// Wait (60 s at most) until `to` answers HTTP and the TCP echo at `echo` works.
async fn wait_path(what: &str, to: SocketAddr, echo: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let http = match Conn::open(to, HOST).await {
            Ok(mut c) => c.get().await,
            Err(e) => Err(e.to_string()),
        };
        let tcp = first_byte(echo).await;
        if http.is_ok() && tcp.is_ok() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the {what} path never served within 60 s: HTTP: {http:?}; echo: {tcp:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One path's addresses (seen from the first cluster's namespace) and processes.
#[derive(Clone)]
struct Path3 {
    name: &'static str,
    http: SocketAddr,
    echo: SocketAddr,
    bulk: SocketAddr,
    pids: Vec<u32>,
}

fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().map(|p| cpu_secs(&p.to_string())).sum()
}

const PORTS: [(u16, &str); 3] = [
    (HTTP, "bench-http"),
    (ECHO, "bench-echo"),
    (BULK, "bench-bulk"),
];

/// The client's Envoy sidecar: an HTTP listener and a TCP listener per TCP port, each to a
/// cluster of one endpoint — the remote east-west gateway — with mTLS and Istio's SNI.
fn envoy_client(remote: &Place, me: &Path) -> Value {
    let ca = json!({"filename": me.join("ca.pem").to_string_lossy()});
    let peer = format!(
        "spiffe://lab.strait/cluster/{}/ns/default/sa/echo",
        remote.name
    );
    let lo = Ipv4Addr::LOCALHOST;
    let mut listeners = vec![json!({
        "name": "http",
        "address": sock(lo, E_HTTP),
        "filter_chains": [{"filters": [http_manager("outbound_http", &format!("outbound|{HTTP}||bench-http"), retries())]}],
    })];
    let mut clusters = Vec::new();
    for (port, svc) in PORTS {
        let name = format!("outbound|{port}||{svc}");
        let mut ctx = json!({
            "sni": istio_sni(port, svc, "default"),
            "common_tls_context": {
                "tls_certificates": [certs(me)],
                "validation_context": {
                    "trusted_ca": ca,
                    "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": peer}}],
                },
            },
        });
        if port == HTTP {
            ctx["common_tls_context"]["alpn_protocols"] = json!(["http/1.1"]);
        } else {
            listeners.push(json!({
                "name": svc,
                "address": sock(lo, port + E_TCP_OFFSET),
                "filter_chains": [{"filters": [tcp_proxy(svc, &name)]}],
            }));
        }
        clusters.push(static_cluster(
            &name,
            &[(sock(remote.addr, EW_PORT), 0)],
            Some(tls_socket("UpstreamTlsContext", ctx)),
        ));
    }
    json!({
        "admin": {"address": sock(lo, E_ADMIN)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    })
}

/// The east-west gateway: TLS passthrough, the destination chosen by SNI.
fn envoy_gateway(remote: &Place) -> Value {
    let mut chains = Vec::new();
    let mut clusters = Vec::new();
    for (port, svc) in PORTS {
        let name = format!("inbound|{port}||{svc}");
        chains.push(json!({
            "filter_chain_match": {"server_names": [istio_sni(port, svc, "default")]},
            "filters": [tcp_proxy(&format!("ew_{svc}"), &name)],
        }));
        clusters.push(static_cluster(
            &name,
            &[(sock(remote.addr, port + W_INBOUND_OFFSET), 0)],
            None,
        ));
    }
    json!({
        "admin": {"address": sock(Ipv4Addr::LOCALHOST, EW_ADMIN)},
        "static_resources": {
            "listeners": [{
                "name": "eastwest",
                "address": sock(remote.addr, EW_PORT),
                "listener_filters": [tls_inspector()],
                "filter_chains": chains,
            }],
            "clusters": clusters,
        },
    })
}

/// The server's Envoy sidecar: mTLS termination (a client certificate of the lab's CA
/// required), then HTTP or TCP to the server.
fn envoy_server(remote: &Place, me: &Path) -> Value {
    let ca = json!({"filename": me.join("ca.pem").to_string_lossy()});
    let mut listeners = Vec::new();
    let mut clusters = Vec::new();
    for (port, svc) in PORTS {
        let name = format!("local|{port}");
        let mut ctx = json!({
            "require_client_certificate": true,
            "common_tls_context": {
                "tls_certificates": [certs(me)],
                "validation_context": {"trusted_ca": ca},
            },
        });
        let filter = if port == HTTP {
            ctx["common_tls_context"]["alpn_protocols"] = json!(["http/1.1"]);
            http_manager("inbound_http", &name, json!({"timeout": "30s"}))
        } else {
            tcp_proxy(&format!("inbound_{svc}"), &name)
        };
        listeners.push(json!({
            "name": format!("inbound_{svc}"),
            "address": sock(remote.addr, port + W_INBOUND_OFFSET),
            "filter_chains": [{
                "transport_socket": tls_socket("DownstreamTlsContext", ctx),
                "filters": [filter],
            }],
        }));
        clusters.push(static_cluster(&name, &[(sock(remote.addr, port), 0)], None));
    }
    json!({
        "admin": {"address": sock(Ipv4Addr::LOCALHOST, W_ADMIN)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    })
}

/// The latency figures of one round: added p50/p90/p99 (µs) over direct, per path.
struct Round {
    added: Vec<[f64; 3]>,
    absolute: Vec<[f64; 3]>,
    cpu_us: Vec<f64>,
    /// Every path's latencies, sorted.
    lat: Vec<Vec<Duration>>,
}

async fn latency_round(paths: &[Path3], rate: u64, secs: u64) -> Round {
    let mut absolute = Vec::new();
    let mut cpu_us = Vec::new();
    let mut lats = Vec::new();
    for p in paths {
        let c0 = cpu_of(&p.pids);
        let lat = fixed_rate(p.http, HOST, rate, secs).await;
        cpu_us.push((cpu_of(&p.pids) - c0) * 1e6 / lat.len() as f64);
        absolute.push([0.5, 0.9, 0.99].map(|q| us(percentile(&lat, q))));
        lats.push(lat);
    }
    let added = absolute
        .iter()
        .map(|a| [0, 1, 2].map(|i| a[i] - absolute[0][i]))
        .collect();
    Round {
        added,
        absolute,
        cpu_us,
        lat: lats,
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    a / if b.abs() < 1.0 { 1.0 } else { b }
}

/// Raw quinn across the same link: a client endpoint here, the byte source in the remote
/// namespace.
struct Raw {
    ep: quinn::Endpoint,
    to: SocketAddr,
}

fn raw_quic_configs(
    certs: &Path,
    tuning: &gateway::config::TransportTuning,
) -> (quinn::ServerConfig, quinn::ClientConfig) {
    common::quinn::configs(
        &certs.join("cert.pem"),
        &certs.join("key.pem"),
        &certs.join("ca.pem"),
        b"bench",
        tuning,
    )
}

/// `--congestion cubic|new_reno|bbr`: the gateways' (and raw quinn's) congestion controller;
/// default: the gateways' default.
fn congestion() -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--congestion")
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// Runs `strait chaos ARGS…` from this process's own network namespace (a command started
/// from a thread inside a lab namespace would run there, away from the lab's shaper).
struct Chaos(std::sync::mpsc::Sender<ChaosCall>);

/// A `strait chaos` command line and where its outcome goes.
type ChaosCall = (Vec<String>, std::sync::mpsc::Sender<Result<String, String>>);

impl Chaos {
    fn run(&self, args: &[&str]) {
        let (tx, rx) = std::sync::mpsc::channel();
        self.0
            .send((args.iter().map(|a| a.to_string()).collect(), tx))
            .expect("the main thread runs chaos commands");
        rx.recv()
            .expect("the main thread answers")
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

async fn measure(paths: Vec<Path3>, raw: Raw, chaos: Chaos, local: &str, remote: &str) {
    let secs = arg("--secs", 10) as u64;
    let rate = arg("--rate", 1000) as u64;
    let repeat = arg("--repeat", 3).max(1);
    let mib = arg("--mib", 256) as u64;
    let bulk_repeat = arg("--bulk-repeat", 3).max(1);
    let ttfb_n = arg("--ttfb", 200).max(1);
    for p in &paths {
        wait_path(p.name, p.http, p.echo).await;
    }
    let names: Vec<&str> = paths.iter().map(|p| p.name).collect();
    println!(
        "cross-cluster path ({}), HTTP/1.1 {} B answers; {rate}/s for {secs} s per path and round (latency from the due time), {repeat} rounds",
        names.join(", "),
        common::http::BODY
    );

    // 1. Latency.
    let mut rounds = Vec::new();
    println!(
        "\n| round | path | p50 µs (added) | p90 µs (added) | p99 µs (added) | CPU µs/request (3 processes) |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for r in 1..=repeat {
        let round = latency_round(&paths, rate, secs).await;
        for (i, p) in paths.iter().enumerate() {
            let (a, d) = (round.absolute[i], round.added[i]);
            println!(
                "| {r} | {} | {:.0} ({:+.0}) | {:.0} ({:+.0}) | {:.0} ({:+.0}) | {} |",
                p.name,
                a[0],
                d[0],
                a[1],
                d[1],
                a[2],
                d[2],
                if i == 0 {
                    "–".to_string()
                } else {
                    format!("{:.0}", round.cpu_us[i])
                }
            );
        }
        rounds.push(round);
    }
    if let Some(last) = rounds.last() {
        common::write_latency(
            "2-cross-cluster",
            &format!("Cross-cluster path, HTTP/1.1 at {rate} requests/s (last round)"),
            &[
                ("direct", &last.lat[0]),
                ("strait", &last.lat[1]),
                ("Envoy mesh", &last.lat[2]),
            ],
        );
    }
    let med = |f: &dyn Fn(&Round) -> f64| median(&mut rounds.iter().map(f).collect::<Vec<_>>());
    let spread = |f: &dyn Fn(&Round) -> f64| {
        let v: Vec<f64> = rounds.iter().map(f).collect();
        (
            v.iter().copied().fold(f64::INFINITY, f64::min),
            v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        )
    };

    // 2. Bulk (raw quinn last).
    let mut bulk_rates: Vec<Vec<f64>> = vec![Vec::new(); paths.len() + 1];
    for _ in 0..bulk_repeat {
        let r = common::quinn::fetch(&raw.ep, raw.to, mib << 20, Duration::from_secs(300))
            .await
            .unwrap_or_else(|e| panic!("raw quinn bulk: {e}"));
        bulk_rates[paths.len()].push(r);
        for (i, p) in paths.iter().enumerate() {
            let r = bulk(p.bulk, mib << 20, Duration::from_secs(300))
                .await
                .unwrap_or_else(|e| panic!("bulk through the {} path: {e}", p.name));
            bulk_rates[i].push(r);
        }
    }

    // 3. Time to first byte on a new connection.
    let mut ttfb = Vec::new();
    for p in &paths {
        let mut v = Vec::with_capacity(ttfb_n);
        for _ in 0..ttfb_n {
            v.push(
                first_byte(p.echo)
                    .await
                    .unwrap_or_else(|e| panic!("new connection through the {} path: {e}", p.name)),
            );
        }
        ttfb.push(median_duration(v));
    }

    println!("\n| measure | direct | strait | Envoy mesh | strait / Envoy | goal |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (q, label) in [(0, "p50"), (1, "p90"), (2, "p99")] {
        let s = med(&|r| r.added[1][q]);
        let e = med(&|r| r.added[2][q]);
        let (lo, hi) = spread(&|r| ratio(r.added[1][q], r.added[2][q]));
        println!(
            "| added {label} at {rate}/s, median of {repeat} rounds | {:.0} µs | {s:+.0} µs | {e:+.0} µs | {:.2}× (rounds {lo:.2}–{hi:.2}×) | {} |",
            med(&|r| r.absolute[0][q]),
            med(&|r| ratio(r.added[1][q], r.added[2][q])),
            if q == 2 { "≤ 0.7×" } else { "" }
        );
    }
    let (sc, ec) = (med(&|r| r.cpu_us[1]), med(&|r| r.cpu_us[2]));
    println!(
        "| CPU per request, the path's 3 processes | – | {sc:.0} µs | {ec:.0} µs | {:.2}× | |",
        sc / ec.max(1.0)
    );
    let b: Vec<(f64, f64, f64)> = bulk_rates
        .iter()
        .map(|v| {
            let mut v = v.clone();
            let m = median(&mut v);
            (m, v[0], v[v.len() - 1])
        })
        .collect();
    println!(
        "| bulk {mib} MiB, one connection, median of {bulk_repeat} (range) | {:.0} MiB/s ({:.0}–{:.0}) | {:.0} MiB/s ({:.0}–{:.0}) | {:.0} MiB/s ({:.0}–{:.0}) | {:.2}× | ≥ 1.0× |",
        b[0].0,
        b[0].1,
        b[0].2,
        b[1].0,
        b[1].1,
        b[1].2,
        b[2].0,
        b[2].1,
        b[2].2,
        b[1].0 / b[2].0.max(0.001)
    );
    let q = b[paths.len()];
    println!(
        "| bulk, raw quinn across the same link (one stream), median (range) | – | {:.0} MiB/s ({:.0}–{:.0}) | – | strait = {:.0} % of raw quinn | ≥ 70 % |",
        q.0,
        q.1,
        q.2,
        b[1].0 / q.0.max(0.001) * 100.0
    );
    println!(
        "| new connection, time to first byte, median of {ttfb_n} | {:.0} µs | {:.0} µs | {:.0} µs | {:.2}× (added: {:+.0} / {:+.0} µs = {:.2}×) | ≤ 0.5× |",
        us(ttfb[0]),
        us(ttfb[1]),
        us(ttfb[2]),
        us(ttfb[1]) / us(ttfb[2]).max(1.0),
        us(ttfb[1]) - us(ttfb[0]),
        us(ttfb[2]) - us(ttfb[0]),
        ratio(us(ttfb[1]) - us(ttfb[0]), us(ttfb[2]) - us(ttfb[0]))
    );

    // 4. Under impairment.
    if arg("--impair", 1) == 0 {
        return;
    }
    println!(
        "\nunder impairment: the link {local} ↔ {remote} degraded with `strait chaos degrade` (50 ms round trip); 200 requests/s for 5 s, bulk for 10 s, time to first byte median of 20"
    );
    println!(
        "\n| loss each way | path | p50 ms | p99 ms | requests failed | bulk MiB/s | first byte ms |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    let mut summary = Vec::new();
    for each_way in [0.01f64, 0.05] {
        // `--loss` is the round-trip figure: each direction loses 1 − √(1 − L).
        let round_trip = 1.0 - (1.0 - each_way).powi(2);
        let loss = format!("{:.4}%", round_trip * 100.0);
        chaos.run(&["degrade", local, remote, "--loss", &loss, "--delay", "50ms"]);
        let mut rates = Vec::new();
        for p in &paths {
            let run = fixed_rate_run(p.http, HOST, 200, 5).await;
            let r = match bulk(p.bulk, 4 << 30, Duration::from_secs(10)).await {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("bulk through the {} path under loss: {e}", p.name);
                    0.0
                }
            };
            let mut v = Vec::new();
            let mut ttfb_failed = 0;
            for _ in 0..20 {
                match first_byte(p.echo).await {
                    Ok(d) => v.push(d),
                    Err(_) => ttfb_failed += 1,
                }
            }
            println!(
                "| {:.0} % | {} | {:.1} | {:.1} | {} of {} | {r:.2} | {:.1}{} |",
                each_way * 100.0,
                p.name,
                us(percentile(&run.lat, 0.5)) / 1e3,
                us(percentile(&run.lat, 0.99)) / 1e3,
                run.failed.len(),
                run.failed.len() + run.lat.len(),
                us(median_duration(v)) / 1e3,
                if ttfb_failed > 0 {
                    format!(" ({ttfb_failed} of 20 failed)")
                } else {
                    String::new()
                }
            );
            if let Some(first) = run.failed.first() {
                eprintln!(
                    "{} path under loss, the first failed request: {first}",
                    p.name
                );
            }
            rates.push(r);
        }
        let q = common::quinn::fetch(&raw.ep, raw.to, 4 << 30, Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("raw quinn bulk under loss: {e}"));
        println!(
            "| {:.0} % | raw quinn | – | – | – | {q:.2} | – |",
            each_way * 100.0
        );
        summary.push((each_way, rates[1] / rates[2].max(0.001)));
        chaos.run(&["heal", local, remote]);
    }
    for (l, r) in summary {
        println!(
            "\nbulk under {:.0} % loss each way, 50 ms RTT: strait / Envoy mesh {r:.2}×{}",
            l * 100.0,
            if l >= 0.05 { " (goal ≥ 2×)" } else { "" }
        );
    }
}

fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut lab = Lab::up(&root.join("target/bench-mesh"), LAB, 2);
    let clusters = lab.clusters();
    let (local, remote) = (clusters[0].clone(), clusters[1].clone());
    let mut tuning = gateway::config::TransportTuning::default();
    if let Some(cc) = congestion() {
        tuning.congestion = serde_json::from_value(json!(cc))
            .unwrap_or_else(|e| panic!("--congestion {cc}: {e} (cubic, new_reno, bbr)"));
        for c in [&local, &remote] {
            let file = lab.dir.join(&c.name).join("gateway.yaml");
            let mut text = std::fs::read_to_string(&file).expect("the gateway's config");
            text.push_str(&format!("transport: {{congestion: {cc}}}\n"));
            std::fs::write(&file, text).expect("write the gateway's config");
            lab.chaos(&["restart", "gateway", &c.name])
                .unwrap_or_else(|e| panic!("{e}"));
        }
        lab.reload();
        println!("the gateways and raw quinn use the {cc} congestion controller");
    }

    // The server, in the remote namespace on the cluster's address, and raw quinn's source.
    let addr = remote.addr;
    let (quic_server, _) = raw_quic_configs(&lab.certs(&remote.name, "gateway"), &tuning);
    let _server = in_ns(remote.ns.clone(), move || async move {
        common::http::server(SocketAddr::from((addr, HTTP))).await;
        tokio::spawn(echo_server(SocketAddr::from((addr, ECHO))));
        let quic = quinn::Endpoint::server(quic_server, SocketAddr::from((addr, RAW_QUIC)))
            .expect("the raw quinn endpoint");
        tokio::spawn(common::quinn::serve_bytes(quic));
        bulk_server(SocketAddr::from((addr, BULK))).await;
    });
    let (_, quic_client) = raw_quic_configs(&lab.certs(&local.name, "gateway"), &tuning);

    // Published by the remote cluster, with no sidecar in front.
    let discovery = lab.dir.join(&remote.name).join("discovery.yaml");
    let mut text = std::fs::read_to_string(&discovery).expect("the remote discovery file");
    let zone = remote
        .zones
        .first()
        .cloned()
        .unwrap_or_else(|| "zone-a".into());
    for (port, svc) in PORTS {
        let protocol = if port == HTTP { "http" } else { "tcp" };
        text.push_str(&format!(
            "  - name: {svc}\n    namespace: default\n    ports: [{{name: {protocol}, port: {port}, protocol: {protocol}}}]\n    endpoints:\n      - {{address: {addr}, port: {port}, zone: {zone}}}\n"
        ));
    }
    std::fs::write(&discovery, text).expect("write the discovery file");

    // The Envoy mesh; its files outside the lab's directory, which `lab down` removes.
    let envoy_dir = root.join("target/bench-mesh-envoy");
    std::fs::create_dir_all(&envoy_dir).expect("create target/bench-mesh-envoy");
    let start = |name: &str, ns: &str, workers: u32, boot: Value| {
        common::envoy::start_in(&envoy_dir, name, ns, workers, &boot)
    };
    let e_client = start(
        "client",
        &local.ns,
        1,
        envoy_client(&remote, &lab.certs(&local.name, "client")),
    );
    let e_gateway = start("gateway", &remote.ns, 2, envoy_gateway(&remote));
    let e_server = start(
        "server",
        &remote.ns,
        1,
        envoy_server(&remote, &lab.certs(&remote.name, "echo")),
    );

    let lo = Ipv4Addr::LOCALHOST;
    let paths = vec![
        Path3 {
            name: "direct",
            http: SocketAddr::from((addr, HTTP)),
            echo: SocketAddr::from((addr, ECHO)),
            bulk: SocketAddr::from((addr, BULK)),
            pids: vec![],
        },
        Path3 {
            name: "strait",
            http: local.client,
            echo: SocketAddr::from((lo, ECHO)),
            bulk: SocketAddr::from((lo, BULK)),
            pids: vec![
                lab.pid("client", &local.name),
                lab.pid("gateway", &local.name),
                lab.pid("gateway", &remote.name),
            ],
        },
        Path3 {
            name: "envoy",
            http: SocketAddr::from((lo, E_HTTP)),
            echo: SocketAddr::from((lo, ECHO + E_TCP_OFFSET)),
            bulk: SocketAddr::from((lo, BULK + E_TCP_OFFSET)),
            pids: vec![e_client.0.id(), e_gateway.0.id(), e_server.0.id()],
        },
    ];
    let (chaos_tx, chaos_rx) = std::sync::mpsc::channel();
    let measuring = in_ns(local.ns.clone(), move || async move {
        let raw = Raw {
            ep: common::quinn::client(SocketAddr::from(([0, 0, 0, 0], 0)), quic_client),
            to: SocketAddr::from((addr, RAW_QUIC)),
        };
        measure(paths, raw, Chaos(chaos_tx), &local.name, &remote.name).await
    });
    // Until the measuring thread is done (its sender dropped, also on a panic).
    for (args, reply) in chaos_rx {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let _ = reply.send(lab.chaos(&args));
    }
    let outcome = measuring.join();
    drop((e_client, e_gateway, e_server));
    drop(lab);
    if outcome.is_err() {
        eprintln!(
            "the benchmark failed (above); the Envoys' logs are in {}",
            envoy_dir.display()
        );
        std::process::exit(1);
    }
}
