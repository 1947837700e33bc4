//! The proxy across clusters with real parts: west's `strait proxy` (library), fed by west's
//! control plane over mutual-TLS ADS, serves `echo.default` from west's own endpoint; when that
//! endpoint dies, every request still succeeds — retried on priority 1, cluster east, through
//! a tunnel: HTTP/2 CONNECT over mTLS to west's gateway, the QUIC link, east's gateway and
//! east's endpoint. Tunnels share one connection to the gateway. The gateway's refusals
//! (unknown cluster) come back with their status and reason.

#[path = "../../controlplane/tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::*;
use controlplane::config::ControlPlaneConfig;
use federation::identity::{CertificateAuthority, ExtraNames, IssuedPaths, SpiffeId};
use gateway::Gateway;
use gateway::config::GatewayConfig;
use proxy::dataplane::{Dataplane, DataplaneOptions};
use proxy::tls::{Peer, TlsFiles, TlsSource};
use proxy::tunnel::{Gateway as GatewayClient, GatewayOptions, TunnelError};
use proxy::xds::{XdsClient, XdsOptions};

const TD: &str = "test.strait";

fn issue(ca: &CertificateAuthority, dir: &Path, id: &str, what: &str) -> IssuedPaths {
    let id: SpiffeId = id.parse().expect("valid SPIFFE id");
    let names = ExtraNames {
        dns: vec!["localhost".into()],
        ips: vec!["127.0.0.1".parse().expect("ip")],
    };
    ca.issue_with_names(&id, Duration::from_secs(3600), &names)
        .expect("issue")
        .write(dir.join(what))
        .expect("write certificate")
}

fn files(p: &IssuedPaths) -> TlsFiles {
    TlsFiles {
        cert: p.cert.clone(),
        key: p.key.clone(),
        ca: p.ca.clone(),
    }
}

fn discovery_yaml(cluster: &str, region: &str, zone: &str, ep: Option<SocketAddr>) -> String {
    let endpoints = match ep {
        Some(a) => format!(
            "    endpoints:\n      - {{address: 127.0.0.1, port: {}, zone: {zone}}}\n",
            a.port()
        ),
        None => "    endpoints: []\n".to_string(),
    };
    format!(
        "cluster: {cluster}\nregion: {region}\nservices:\n  - name: echo\n    ports: [{{name: http, port: 8080, protocol: http}}]\n{endpoints}"
    )
}

fn gateway_config(
    dir: &Path,
    cluster: &str,
    certs: &IssuedPaths,
    discovery: &Path,
    peer: (&str, SocketAddr),
) -> GatewayConfig {
    let yaml = format!(
        "cluster: {cluster}\nlisten: {{peers: \"127.0.0.1:0\", ingress: \"127.0.0.1:0\", admin: \"127.0.0.1:0\"}}\n\
         tls: {{cert: {}, key: {}, ca: {}}}\ndiscovery: {{file: {}}}\n\
         peers:\n  - {{cluster: {}, address: \"{}\"}}\n",
        certs.cert.display(),
        certs.key.display(),
        certs.ca.display(),
        discovery.display(),
        peer.0,
        peer.1
    );
    GatewayConfig::parse(dir.join(format!("{cluster}-gw.yaml")), &yaml)
        .unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_fails_over_to_another_cluster_through_the_gateway() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = CertificateAuthority::init(TD, Duration::from_secs(86400)).expect("CA");
    let west_gw_certs = issue(
        &ca,
        d,
        &format!("spiffe://{TD}/cluster/west/gateway"),
        "west-gw",
    );
    let east_gw_certs = issue(
        &ca,
        d,
        &format!("spiffe://{TD}/cluster/east/gateway"),
        "east-gw",
    );
    let cp_certs = issue(
        &ca,
        d,
        &format!("spiffe://{TD}/cluster/west/ns/strait-system/sa/controlplane"),
        "west-cp",
    );
    let app_certs = issue(
        &ca,
        d,
        &format!("spiffe://{TD}/cluster/west/ns/default/sa/app"),
        "west-app",
    );

    let (west_ep, west_task) = http_backend("west").await;
    let (east_ep, _te) = http_backend("east").await;
    let reg = Registry::start(d).await;
    let west_yaml = |ep| discovery_yaml("west", "us-west", "us-west-1a", ep);
    reg.publish(&west_yaml(Some(west_ep))).await;
    let east_yaml = discovery_yaml("east", "us-east", "us-east-1a", Some(east_ep));
    reg.publish(&east_yaml).await;
    let east_disc = d.join("east-discovery.yaml");
    std::fs::write(&east_disc, &east_yaml).unwrap();
    let west_disc = d.join("west-discovery.yaml");
    std::fs::write(&west_disc, west_yaml(Some(west_ep))).unwrap();
    let placeholder: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let east_gw = Gateway::start(gateway_config(
        d,
        "east",
        &east_gw_certs,
        &east_disc,
        ("west", placeholder),
    ))
    .await
    .expect("east gateway starts");
    let west_gw = Gateway::start(gateway_config(
        d,
        "west",
        &west_gw_certs,
        &west_disc,
        ("east", east_gw.peer_addr),
    ))
    .await
    .expect("west gateway starts");
    wait_for(
        Duration::from_secs(20),
        "the west → east link to come up",
        || async {
            match west_gw.links().into_iter().find(|l| l.cluster == "east") {
                Some(l) if l.state == "up" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;

    // West's control plane, xDS over mTLS; remote clusters through west's gateway.
    let cfg = ControlPlaneConfig::parse(
        d.join("west-cp.yaml"),
        &format!(
            "cluster: west\nregion: us-west\nregistry: {{etcd: [\"{}\"]}}\n\
             xds: {{listen: \"127.0.0.1:0\", tls: {{cert: {}, key: {}, ca: {}}}}}\n\
             gateway: {{ingress: \"{}\"}}\nadmin: {{listen: \"127.0.0.1:0\"}}\n",
            reg.etcd.endpoint(),
            cp_certs.cert.display(),
            cp_certs.key.display(),
            cp_certs.ca.display(),
            west_gw.ingress_addr
        ),
    )
    .expect("control plane config");
    let cp = start_cp_with(&reg, cfg).await;

    // The proxy: workload certificate for both the control plane and the gateway.
    let outbound = free_addr();
    let node = proxy::xds::node(
        "west-app",
        "west",
        ("us-west", "us-west-1a", ""),
        &[],
        outbound,
        true,
    );
    let mut opts = XdsOptions::new(format!("http://{}", cp.xds_addr), node);
    opts.tls = Some(Arc::new(
        TlsSource::new(files(&app_certs), Peer::Workload, &[b"h2"]).expect("xDS TLS"),
    ));
    let client = XdsClient::start(opts);
    let gateway = Arc::new(GatewayClient::new(
        GatewayOptions::new(west_gw.ingress_addr),
        TlsSource::new(files(&app_certs), Peer::Gateway, &[b"h2"]).expect("gateway TLS"),
    ));
    let dp = Dataplane::start_with(
        client.config.clone(),
        DataplaneOptions {
            gateway: Some(gateway.clone()),
            ..Default::default()
        },
    );

    // Priority 0: west's own endpoint, directly; nothing crosses the gateway.
    wait_for(
        Duration::from_secs(20),
        "the proxy to serve west",
        || async {
            match get(outbound, "echo.default").await {
                Ok((200, b)) if b == "west" => Ok(()),
                other => Err(format!("{other:?}; xDS {:?}", client.status.borrow())),
            }
        },
    )
    .await;
    assert_eq!(
        west_gw
            .shared()
            .metrics
            .ingress_requests_total
            .load(Relaxed),
        0,
        "nothing went through the gateway while west's endpoint served"
    );
    {
        let compiled = dp.current();
        let c = compiled
            .clusters
            .get("echo.default:8080")
            .expect("the cluster");
        assert!(
            c.balancer.hosts().iter().any(|h| matches!(
                &h.upstream,
                proxy::config::Upstream::Tunnel { cluster, authority }
                    if cluster == "east" && authority == "echo.default:8080"
            )),
            "east's endpoint is configured behind the gateway: {:?}",
            c.balancer.hosts()
        );
    }

    // West's endpoint dies while the registry still lists it: every request succeeds on
    // east, retried across priorities through the tunnel.
    west_task.abort();
    let _ = west_task.await;
    for i in 0..30 {
        let r = get(outbound, "echo.default").await;
        assert_eq!(
            r,
            Ok((200, "east".to_string())),
            "request {i} after west's endpoint died"
        );
    }
    let m = &west_gw.shared().metrics;
    let connects = m.ingress_requests_total.load(Relaxed);
    assert!(
        connects >= 1,
        "requests crossed west's gateway ({connects} CONNECTs)"
    );
    assert!(
        east_gw.shared().metrics.inbound_streams_total.load(Relaxed) >= 1,
        "and the QUIC link to east"
    );
    assert_eq!(
        m.ingress_connections_total.load(Relaxed),
        1,
        "every tunnel is a stream of one connection to the gateway"
    );

    // The gateway's refusals come back with their status and reason.
    match gateway.open("nowhere", "echo.default:8080").await {
        Err(TunnelError::Refused { status, reason, .. }) => {
            assert_eq!(status, 404, "unknown cluster: {reason}");
            assert!(reason.contains("nowhere"), "the reason names it: {reason}");
        }
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("a tunnel to an unknown cluster opened"),
    }

    drop(dp);
    drop(client);
    cp.shutdown().await;
    west_gw.shutdown().await;
    east_gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_of_another_cluster_or_a_foreign_certificate_is_refused() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = CertificateAuthority::init(TD, Duration::from_secs(86400)).expect("CA");
    let other_ca = CertificateAuthority::init(TD, Duration::from_secs(86400)).expect("CA 2");
    let east_gw_certs = issue(
        &ca,
        d,
        &format!("spiffe://{TD}/cluster/east/gateway"),
        "east-gw",
    );
    let west_app = issue(
        &ca,
        d,
        &format!("spiffe://{TD}/cluster/west/ns/default/sa/app"),
        "west-app",
    );
    let east_app = issue(
        &ca,
        d,
        &format!("spiffe://{TD}/cluster/east/ns/default/sa/app"),
        "east-app",
    );
    let foreign = issue(
        &other_ca,
        d,
        &format!("spiffe://{TD}/cluster/east/ns/default/sa/app"),
        "foreign-app",
    );
    let east_disc = d.join("east-discovery.yaml");
    std::fs::write(
        &east_disc,
        discovery_yaml("east", "us-east", "us-east-1a", None),
    )
    .unwrap();
    let east_gw = Gateway::start(gateway_config(
        d,
        "east",
        &east_gw_certs,
        &east_disc,
        ("west", "127.0.0.1:9".parse().unwrap()),
    ))
    .await
    .expect("east gateway starts");

    // West's workload dialling east's gateway: the proxy refuses the gateway (it is not its
    // own cluster's).
    let west_client = GatewayClient::new(
        GatewayOptions::new(east_gw.ingress_addr),
        TlsSource::new(files(&west_app), Peer::Gateway, &[b"h2"]).expect("TLS"),
    );
    match west_client.open("west", "echo.default:8080").await {
        Err(TunnelError::Connect { message, .. }) => {
            assert!(message.contains("TLS"), "{message}");
        }
        other => panic!("expected a TLS refusal, got {:?}", other.err()),
    }
    // A certificate of another CA: the gateway refuses it.
    let foreign_client = GatewayClient::new(
        GatewayOptions::new(east_gw.ingress_addr),
        TlsSource::new(
            TlsFiles {
                cert: foreign.cert.clone(),
                key: foreign.key.clone(),
                ca: east_app.ca.clone(),
            },
            Peer::Gateway,
            &[b"h2"],
        )
        .expect("TLS"),
    );
    let r = foreign_client.open("west", "echo.default:8080").await;
    assert!(
        matches!(
            r,
            Err(TunnelError::Connect { .. }) | Err(TunnelError::Stream { .. })
        ),
        "a foreign certificate is refused: {:?}",
        r.err()
    );
    // East's own workload is accepted; the link to west is down: 503 with a reason.
    let east_client = GatewayClient::new(
        GatewayOptions::new(east_gw.ingress_addr),
        TlsSource::new(files(&east_app), Peer::Gateway, &[b"h2"]).expect("TLS"),
    );
    match east_client.open("west", "echo.default:8080").await {
        Err(TunnelError::Refused { status, reason, .. }) => {
            assert_eq!(status, 503, "{reason}");
            assert!(!reason.is_empty());
        }
        other => panic!("expected 503, got {:?}", other.err()),
    }
    east_gw.shutdown().await;
}
