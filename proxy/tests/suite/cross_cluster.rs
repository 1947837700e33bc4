//! The proxy across clusters with real parts: west's `strait proxy` (library), fed by west's
//! control plane over mutual-TLS ADS, serves `echo.default` from west's own endpoint; when that
//! endpoint dies, every request still succeeds — retried on priority 1, cluster east, through
//! a tunnel: HTTP/2 CONNECT over mTLS to west's gateway, the QUIC link, east's gateway and
//! east's endpoint. Tunnels share one connection to the gateway. The gateway's refusals
//! (unknown cluster) come back with their status and reason.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use crate::common::*;
use crate::support::{WestProxy, files};
use federation::identity::CertificateAuthority;
use gateway::Gateway;
use proxy::tls::{Peer, TlsFiles, TlsSource};
use proxy::tunnel::{Gateway as GatewayClient, GatewayOptions, TunnelError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_fails_over_to_another_cluster_through_the_gateway() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let mut fed = Linked::start(dir.path()).await;
    let Linked {
        ref west_gw,
        ref east_gw,
        ref cp,
        app: ref app_certs,
        ref west_gw_certs,
        ref west_disc,
        ref mut west_task,
        ..
    } = fed;
    // A second replica of west's gateway, linked to east too.
    let mut second = gateway_config(
        dir.path(),
        "west",
        west_gw_certs,
        west_disc,
        ("east", east_gw.peer_addr),
    );
    second.replica = Some(federation::model::Name::parse("replica", "gateway-1").unwrap());
    let west_gw2 = Gateway::start(second)
        .await
        .expect("west's second gateway replica starts");
    wait_link_up(
        &west_gw2,
        "east",
        "the link of west's second gateway replica to east",
    )
    .await;

    // The proxy: workload certificate for both the control plane and the gateway; tunnels go
    // through west's first gateway replica, the second if it fails.
    let WestProxy {
        xds: client,
        dataplane: dp,
        gateway,
        outbound,
    } = WestProxy::start_with_replicas(
        "west-app",
        cp.xds_addr,
        west_gw.ingress_addr,
        &[west_gw2.ingress_addr],
        app_certs,
        false,
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

    // West's first gateway replica stops gracefully. The sidecar hears it on its drain watch;
    // its pooled connection through that replica's tunnel may carry one more request and is
    // then retired; every later request goes through the second replica. The first replica's
    // tunnels end, so its drain completes at once, not after its 10 s drain timeout (as it
    // would with the pooled connection left open). No request fails.
    let draining = west_gw.shared().clone();
    let stopping = tokio::spawn(async move {
        let t = std::time::Instant::now();
        draining.shut_down_gracefully().await;
        t.elapsed()
    });
    wait_for(
        Duration::from_secs(5),
        "the sidecar to hear that its gateway is draining",
        || async {
            if gateway.draining().await {
                Ok(())
            } else {
                Err("not yet".to_string())
            }
        },
    )
    .await;
    for i in 0..10 {
        assert_eq!(
            get(outbound, "echo.default").await,
            Ok((200, "east".to_string())),
            "request {i} while west's first gateway replica drains"
        );
    }
    let took = tokio::time::timeout(Duration::from_secs(8), stopping)
        .await
        .expect("the gateway's drain waited for a pooled tunnel the sidecar should have retired")
        .expect("the drain task");
    println!("west's first gateway replica drained in {took:?}");
    assert!(
        took < Duration::from_secs(5),
        "the gateway drained for {took:?}: the sidecar's pooled tunnel was not retired"
    );
    assert!(
        west_gw2
            .shared()
            .metrics
            .ingress_requests_total
            .load(Relaxed)
            >= 1,
        "the requests after the drain went through the second replica"
    );
    for i in 0..5 {
        assert_eq!(
            get(outbound, "echo.default").await,
            Ok((200, "east".to_string())),
            "request {i} after west's first gateway replica stopped"
        );
    }
    west_gw2.shutdown().await;

    drop(dp);
    drop(client);
    fed.shutdown().await;
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
            TlsFiles::new(&foreign.cert, &foreign.key, &east_app.ca),
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

/// The sidecar's tunnels go through one of its cluster's gateway replicas at a time: an
/// unreachable one is skipped, and when the one in use stops the next tunnel goes through
/// another — never a connection error for the caller while one replica is up; a replica with
/// no link to the target cluster passes the CONNECT on to the next replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_move_to_another_local_gateway_replica() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = CertificateAuthority::init(TD, Duration::from_secs(86400)).expect("CA");
    let gw_certs = issue(
        &ca,
        d,
        &format!("spiffe://{TD}/cluster/east/gateway"),
        "east-gw",
    );
    let app = issue(
        &ca,
        d,
        &format!("spiffe://{TD}/cluster/east/ns/default/sa/app"),
        "east-app",
    );
    let disc = d.join("east-discovery.yaml");
    std::fs::write(&disc, discovery_yaml("east", "us-east", "us-east-1a", None)).unwrap();
    let replica = || {
        Gateway::start(gateway_config(
            d,
            "east",
            &gw_certs,
            &disc,
            ("west", "127.0.0.1:9".parse().unwrap()),
        ))
    };
    let g1 = replica().await.expect("replica 1 starts");
    let g2 = replica().await.expect("replica 2 starts");
    // An address where no gateway listens any more (a replica that is gone), first.
    let gone = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut options = GatewayOptions::new(gone);
    options.replicas = vec![g1.ingress_addr, g2.ingress_addr];
    let client = GatewayClient::new(
        options,
        TlsSource::new(files(&app), Peer::Gateway, &[b"h2"]).expect("TLS"),
    );
    let requests = |gw: std::net::SocketAddr| async move {
        let text = admin_get(gw, "/metrics").await.expect("gateway metrics");
        metric(
            &text,
            "strait_gateway_ingress_requests_total{cluster=\"east\"}",
        )
        .unwrap_or(0.0)
    };
    // Each gateway refuses a cluster it does not know (404), and one it has no link to (503,
    // west here): the refusal shows who answered.
    let answered = |r: Result<_, TunnelError>, want: u16| match r {
        Err(TunnelError::Refused {
            status, gateway, ..
        }) => {
            assert_eq!(status, want);
            gateway
        }
        other => panic!("expected a gateway's {want}, got {:?}", other.err()),
    };
    let first = answered(client.open("nowhere", "echo.default:8080").await, 404);
    assert_eq!(first, g1.ingress_addr, "the unreachable replica is skipped");
    assert_eq!(requests(g1.admin_addr).await, 1.0);
    assert_eq!(client.address(), g1.ingress_addr);
    // A replica without a link to the cluster says so: the CONNECT is tried once more through
    // the next replica (whose link is down too here, so it answers), and tunnels go on there.
    let by = answered(client.open("west", "echo.default:8080").await, 503);
    assert_eq!(
        by, g2.ingress_addr,
        "replica 1 had no link: replica 2 was asked"
    );
    assert_eq!(requests(g1.admin_addr).await, 2.0);
    assert_eq!(requests(g2.admin_addr).await, 1.0);
    assert_eq!(client.address(), g2.ingress_addr);
    let by = answered(client.open("nowhere", "echo.default:8080").await, 404);
    assert_eq!(by, g2.ingress_addr, "no other replica is asked after a 404");
    let (g2_ingress, g2_admin) = (g2.ingress_addr, g2.admin_addr);
    g1.shutdown().await;
    for _ in 0..5 {
        // Replica 2 has no link either, and no other replica answers: its refusal, once.
        let by = answered(client.open("west", "echo.default:8080").await, 503);
        assert_eq!(by, g2_ingress, "replica 1 stopped: replica 2 answers");
    }
    assert_eq!(requests(g2_admin).await, 7.0);
    g2.shutdown().await;
}
