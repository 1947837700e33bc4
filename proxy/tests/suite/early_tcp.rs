//! TCP across clusters with early statuses, real parts: west's `strait proxy` (library), fed by
//! west's control plane over mutual-TLS ADS, reaches TCP services of east through west's
//! gateway, the QUIC link and east's gateway. Its tunnels ask for an early status: the client's
//! first bytes go out before east's gateway has connected, and arrive. When east's gateway
//! refuses (a service the registry lists in east but east's gateway does not serve), the
//! client's first bytes are replayed to the next priority, west's own endpoint, and nothing of
//! the connection is lost.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use crate::common::*;
use crate::support::WestProxy;
use federation::identity::CertificateAuthority;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TCP server that answers `NAME:` and then echoes everything back.
async fn tagged_echo(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                if w.write_all(format!("{name}:").as_bytes()).await.is_ok() {
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
        }
    });
    addr
}

fn tcp_service(name: &str, port: u16, ep: SocketAddr, zone: &str) -> String {
    format!(
        "  - name: {name}\n    ports: [{{name: tcp, port: {port}, protocol: tcp}}]\n    endpoints:\n      - {{address: 127.0.0.1, port: {}, zone: {zone}}}\n",
        ep.port()
    )
}

fn cluster_yaml(cluster: &str, region: &str, services: &[String]) -> String {
    format!(
        "cluster: {cluster}\nregion: {region}\nservices:\n{}",
        services.concat()
    )
}

/// Connect to `to`, send `msg` at once (before any answer), half-close, and read everything
/// back.
async fn send_first(to: SocketAddr, msg: &[u8]) -> Result<String, String> {
    let fut = async {
        let mut s = TcpStream::connect(to).await.map_err(|e| e.to_string())?;
        s.write_all(msg).await.map_err(|e| e.to_string())?;
        s.shutdown().await.map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&out).to_string())
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| "no answer within 10 s".to_string())?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_bytes_go_out_early_and_are_replayed_after_a_refusal() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = CertificateAuthority::init(TD, Duration::from_secs(86400)).expect("CA");
    let cert =
        |path: &str, what: &str| issue(&ca, d, &format!("spiffe://{TD}/cluster/{path}"), what);
    let cp_certs = cert("west/ns/strait-system/sa/controlplane", "west-cp");
    let client = cert("west/ns/default/sa/client", "west-client");
    let west_gw_certs = cert("west/gateway", "west-gw");
    let east_gw_certs = cert("east/gateway", "east-gw");

    let west_raw = tagged_echo("west").await;
    let east_raw = tagged_echo("east").await;
    let east_only = tagged_echo("east-only").await;
    let (raw_port, only_port) = (free_addr().port(), free_addr().port());
    let west_yaml = cluster_yaml(
        "west",
        "us-west",
        &[tcp_service("raw", raw_port, west_raw, "us-west-1a")],
    );
    // The registry lists `raw` in east too; east's gateway does not serve it (it refuses).
    let east_registry = cluster_yaml(
        "east",
        "us-east",
        &[
            tcp_service("raw", raw_port, east_raw, "us-east-1a"),
            tcp_service("only", only_port, east_only, "us-east-1a"),
        ],
    );
    let east_gateway_serves = cluster_yaml(
        "east",
        "us-east",
        &[tcp_service("only", only_port, east_only, "us-east-1a")],
    );
    let reg = Registry::start(d).await;
    reg.publish(&west_yaml).await;
    reg.publish(&east_registry).await;
    // `raw` prefers east, then west.
    let policy = federation::policy_file::parse(
        "policy.yaml",
        "policies:\n  - service: raw.default\n    targets: [{cluster: east}, {cluster: west}]\n",
    )
    .expect("policy");
    reg.put(
        "/strait/v1/policies/services/default/raw".to_string(),
        federation::registry::codec::encode_policy(&policy[0]),
    )
    .await;
    let west_disc = d.join("west-discovery.yaml");
    std::fs::write(&west_disc, &west_yaml).unwrap();
    let east_disc = d.join("east-discovery.yaml");
    std::fs::write(&east_disc, &east_gateway_serves).unwrap();
    let (west_gw, east_gw) = linked_gateways(
        d,
        (&west_gw_certs, &west_disc),
        (&east_gw_certs, &east_disc),
    )
    .await;
    let cp = start_cp_with(
        &reg,
        west_cp_config(d, &reg, &cp_certs, Some(west_gw.ingress_addr)),
    )
    .await;
    let WestProxy {
        xds,
        dataplane: dp,
        outbound,
        ..
    } = WestProxy::start(
        "west-client",
        cp.xds_addr,
        west_gw.ingress_addr,
        &client,
        false,
    );

    // A service only east has: the first bytes, sent before anything came back, are echoed by
    // east's endpoint through an early-status tunnel.
    let only = SocketAddr::new(outbound.ip(), only_port);
    wait_for(
        Duration::from_secs(20),
        "east's TCP service through the tunnel",
        || async {
            match send_first(only, b"hello").await {
                Ok(b) if b == "east-only:hello" => Ok(()),
                other => Err(format!("{other:?}; xDS {:?}", xds.status.borrow())),
            }
        },
    )
    .await;
    let early = west_gw.shared().metrics.ingress_early_total.load(Relaxed);
    assert!(early >= 1, "the tunnel had an early status");
    for i in 0..20 {
        assert_eq!(
            send_first(only, format!("message {i}").as_bytes()).await,
            Ok(format!("east-only:message {i}")),
            "connection {i}"
        );
    }
    assert!(
        west_gw.shared().metrics.ingress_early_total.load(Relaxed) >= early + 20,
        "every new connection is an early-status tunnel"
    );

    // `raw`: east (first by policy) refuses in the tunnel; the bytes already sent to it are
    // replayed to west's endpoint, and every connection is served, whole.
    let raw = SocketAddr::new(outbound.ip(), raw_port);
    wait_for(
        Duration::from_secs(20),
        "raw to be routed east first",
        || async {
            let compiled = dp.current();
            let Some(c) = compiled.clusters.get(&format!("raw.default:{raw_port}")) else {
                return Err("no cluster yet".to_string());
            };
            let hosts = c.balancer.hosts();
            let east_first = hosts.iter().any(|h| {
                matches!(&h.upstream, proxy::config::Upstream::Tunnel { cluster, .. } if cluster == "east")
                    && h.priority == 0
            });
            if east_first {
                Ok(())
            } else {
                Err(format!("{hosts:?}"))
            }
        },
    )
    .await;
    let refused_before = west_gw
        .shared()
        .metrics
        .get("strait_gateway_ingress_refused_total", "refused");
    let early_before = west_gw.shared().metrics.ingress_early_total.load(Relaxed);
    for i in 0..10 {
        let msg = format!("replayed {i} {}", "x".repeat(i * 1000));
        assert_eq!(
            send_first(raw, msg.as_bytes()).await,
            Ok(format!("west:{msg}")),
            "connection {i}: refused by east, replayed to west"
        );
    }
    assert!(
        west_gw
            .shared()
            .metrics
            .get("strait_gateway_ingress_refused_total", "refused")
            > refused_before,
        "east's gateway refused in the tunnel"
    );
    assert!(
        west_gw.shared().metrics.ingress_early_total.load(Relaxed) > early_before,
        "the refused tunnels had early statuses (the bytes were sent before the refusal)"
    );

    drop(dp);
    drop(xds);
    cp.shutdown().await;
    west_gw.shutdown().await;
    east_gw.shutdown().await;
}
