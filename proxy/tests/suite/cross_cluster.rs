//! The proxy across clusters with real parts: west's `strait proxy` (library), fed by west's
//! control plane over mutual-TLS ADS, serves `echo.default` from west's own endpoint; when that
//! endpoint dies, every request still succeeds — retried on priority 1, cluster east, through
//! a tunnel: HTTP/2 CONNECT over mTLS to west's gateway, the QUIC link, east's gateway and
//! east's endpoint. Tunnels share one connection to the gateway. The gateway's refusals
//! (unknown cluster) come back with their status and reason.

use std::net::SocketAddr;
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
                proxy::config::Upstream::Tunnel { cluster, authority, endpoint: Some(_) }
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

/// East's discovery file: service `echo` (HTTP, 8080) with `replicas`, equal weights, in zone
/// us-east-1a.
fn east_replicas(replicas: &[SocketAddr]) -> String {
    let mut yaml = "cluster: east\nregion: us-east\nservices:\n  - name: echo\n    ports: [{name: http, port: 8080, protocol: http}]\n    endpoints:\n".to_string();
    for r in replicas {
        yaml.push_str(&format!(
            "      - {{address: {}, port: {}, zone: us-east-1a}}\n",
            r.ip(),
            r.port()
        ));
    }
    yaml
}

/// One request of a [`drive`]: when it was sent (from the start), and the replica that answered
/// or what went wrong.
type Sent = (Duration, Result<String, String>);

/// `count` GETs of `echo.default` through `outbound` at 100 per second from `start`, on kept-alive
/// connections (as an application's HTTP client sends them), each on its own task so a slow
/// answer does not slow the rate.
async fn drive(outbound: SocketAddr, count: usize, start: tokio::time::Instant) -> Vec<Sent> {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    let client: Client<_, Empty<bytes::Bytes>> =
        Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let mut tick = tokio::time::interval_at(start, Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        tick.tick().await;
        let at = start.elapsed();
        let client = client.clone();
        tasks.spawn(async move {
            let req = http::Request::get(format!("http://{outbound}/"))
                .header(http::header::HOST, "echo.default")
                .body(Empty::new())
                .map_err(|e| e.to_string());
            let fut = async {
                let resp = client.request(req?).await.map_err(|e| e.to_string())?;
                let status = resp.status();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?
                    .to_bytes();
                let body = String::from_utf8_lossy(&body).into_owned();
                if status == http::StatusCode::OK {
                    Ok(body)
                } else {
                    Err(format!("status {status}: {body}"))
                }
            };
            let r = tokio::time::timeout(Duration::from_secs(10), fut)
                .await
                .unwrap_or_else(|_| Err("no answer within 10 s".into()));
            (i, at, r)
        });
    }
    let mut out = vec![(Duration::ZERO, Err("not sent".to_string())); count];
    while let Some(r) = tasks.join_next().await {
        let (i, at, r) = r.expect("a request task");
        out[i] = (at, r);
    }
    out
}

/// Each replica's share (percent) of `sent`.
fn shares<'a>(sent: impl Iterator<Item = &'a Sent>, replicas: &[&str]) -> Vec<f64> {
    let answered: Vec<&str> = sent.filter_map(|(_, r)| r.as_deref().ok()).collect();
    replicas
        .iter()
        .map(|r| 100.0 * answered.iter().filter(|a| *a == r).count() as f64 / answered.len() as f64)
        .collect()
}

/// Issue 24's first must-show. East runs two replicas of `echo`, then three; west's sidecars — a
/// strait proxy and a stock Envoy, side by side, from the same xDS — send 100 requests/s each,
/// 3,000 in all, through west's gateway, the QUIC link and east's gateway. Each sidecar's
/// balancer chooses the remote replica per request (every remote endpoint is an endpoint of its
/// own in EDS, and the tunnel names it), so each replica's share is within 5 percentage points of
/// its weight's share: 50/50, then 33/33/33 once the third has been in the registry for 2 s; the
/// third is served within 2 s of its appearance; no request fails. An endpoint the registry names
/// but east's gateway does not serve is refused there and retried on another by both sidecars.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_replicas_share_the_load_per_request_from_strait_and_envoy_sidecars() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fed = Linked::start(d).await;
    // West has no endpoint of its own: every request crosses to east.
    fed.reg.publish(&Linked::west_yaml(None)).await;
    let (r1, _t1) = http_backend("r1").await;
    let (r2, _t2) = http_backend("r2").await;
    let (r3, _t3) = http_backend("r3").await;
    let east_disc = d.join("east-discovery.yaml");
    let echo = federation::model::ServiceKey::new("default", "echo").unwrap();
    // East's gateway learns its endpoints from its discovery file, the other clusters from the
    // registry (east's control plane publishes what its discovery says): the gateway first.
    let add = |replicas: Vec<SocketAddr>| {
        let fed = &fed;
        let east_disc = &east_disc;
        let echo = &echo;
        async move {
            let yaml = east_replicas(&replicas);
            std::fs::write(east_disc, &yaml).unwrap();
            let last = *replicas.last().unwrap();
            wait_for(
                Duration::from_secs(10),
                "east's gateway to load its discovery file",
                || async {
                    fed.east_gw
                        .shared()
                        .local
                        .named(echo, 8080, last)
                        .map(|_| ())
                        .map_err(|e| e.1)
                },
            )
            .await;
            fed.reg.publish(&yaml).await;
        }
    };
    add(vec![r1, r2]).await;

    let strait = crate::support::WestProxy::start(
        "west-app",
        fed.cp.xds_addr,
        fed.west_gw.ingress_addr,
        &fed.app,
        false,
    );
    let envoy = fed.west_envoy(d, "west-envoy");
    for (name, outbound) in [("strait", strait.outbound), ("Envoy", envoy.outbound)] {
        wait_for(
            Duration::from_secs(20),
            &format!("the {name} sidecar to reach both of east's replicas"),
            || async {
                let mut seen = std::collections::BTreeSet::new();
                for _ in 0..8 {
                    if let Ok((200, b)) = get(outbound, "echo.default").await {
                        seen.insert(b);
                    }
                }
                if seen.len() == 2 {
                    Ok(())
                } else {
                    Err(format!("answered by {seen:?}"))
                }
            },
        )
        .await;
    }

    // 1,500 requests each with two replicas, then the third appears; 1,500 more.
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let load = |outbound| tokio::spawn(drive(outbound, 3000, start));
    let strait_load = load(strait.outbound);
    let envoy_load = load(envoy.outbound);
    tokio::time::sleep_until(start + Duration::from_secs(15)).await;
    add(vec![r1, r2, r3]).await;
    let appeared = start.elapsed();
    let results = [
        ("strait", strait_load.await.unwrap()),
        ("Envoy", envoy_load.await.unwrap()),
    ];

    for (name, sent) in &results {
        let failed: Vec<String> = sent
            .iter()
            .enumerate()
            .filter_map(|(i, (at, r))| r.as_ref().err().map(|e| format!("#{i} at {at:?}: {e}")))
            .collect();
        assert!(
            failed.is_empty(),
            "{name}: {} of {} requests failed: {:?}\n{}",
            failed.len(),
            sent.len(),
            &failed[..failed.len().min(10)],
            envoy.log_tail()
        );
        let two = shares(
            sent.iter().filter(|(at, _)| *at < Duration::from_secs(15)),
            &["r1", "r2", "r3"],
        );
        assert!(
            (two[0] - 50.0).abs() <= 5.0 && (two[1] - 50.0).abs() <= 5.0 && two[2] == 0.0,
            "{name}: shares with two replicas r1 {:.1} % r2 {:.1} % (r3 {:.1} %)",
            two[0],
            two[1],
            two[2]
        );
        let first_r3 = sent
            .iter()
            .filter(|(_, r)| r.as_deref() == Ok("r3"))
            .map(|(at, _)| *at)
            .min();
        assert!(
            first_r3.is_some_and(|t| t <= appeared + Duration::from_secs(2)),
            "{name}: the third replica appeared at {appeared:?} and was first served at {first_r3:?}"
        );
        let settled: Vec<&Sent> = sent
            .iter()
            .filter(|(at, _)| *at >= appeared + Duration::from_secs(2))
            .collect();
        assert!(
            settled.len() >= 800,
            "{name}: only {} requests after the third replica settled",
            settled.len()
        );
        let three = shares(settled.into_iter(), &["r1", "r2", "r3"]);
        let third = 100.0 / 3.0;
        assert!(
            three.iter().all(|s| (s - third).abs() <= 5.0),
            "{name}: shares with three replicas r1 {:.1} % r2 {:.1} % r3 {:.1} %",
            three[0],
            three[1],
            three[2]
        );
        eprintln!(
            "{name}: two replicas {:.1}/{:.1} %, three {:.1}/{:.1}/{:.1} %; r3 first served {:?} after it appeared",
            two[0],
            two[1],
            three[0],
            three[1],
            three[2],
            first_r3.map(|t| t.saturating_sub(appeared))
        );
    }

    // The registry names an endpoint east's gateway does not serve (a stale entry, or one the
    // gateway has not loaded yet): the gateway refuses the tunnels that name it, counted, and
    // both sidecars retry those requests on another endpoint: none fails.
    let stranger = free_addr();
    fed.reg
        .publish(&east_replicas(&[r1, r2, r3, stranger]))
        .await;
    let refused = || {
        fed.east_gw
            .shared()
            .metrics
            .get("strait_gateway_stream_errors_total", "not_an_endpoint")
    };
    for (name, outbound) in [("strait", strait.outbound), ("Envoy", envoy.outbound)] {
        let before = refused();
        wait_for(
            Duration::from_secs(20),
            &format!("the {name} sidecar to try the stranger endpoint"),
            || async {
                let r = get(outbound, "echo.default").await;
                assert!(
                    matches!(&r, Ok((200, b)) if b.starts_with('r')),
                    "{name}: a request failed while the registry names a stranger: {r:?}"
                );
                if refused() > before {
                    Ok(())
                } else {
                    Err("no tunnel named it yet".to_string())
                }
            },
        )
        .await;
    }
    drop(envoy);
    fed.shutdown().await;
}

/// Issue 24, "outages of links do not punish endpoints". West's sidecar reaches `echo` only in
/// east, through the gateways. East's gateway goes away (the link is down at west's gateway):
/// every request fails — there is nowhere else to go — but east's endpoint is not ejected, since
/// the refusals are the path's (`strait-refusal: link_down` and the like), not the endpoint's.
/// When east's gateway is back, the very next requests reach the endpoint. Then the endpoint
/// itself dies: east's gateway refuses with `connect_failed`, the endpoint's failure, and
/// outlier detection ejects it — the same count of failures that the outage did not punish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_outage_ejects_no_remote_endpoint_but_a_dead_endpoint_is_ejected() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let Linked {
        reg,
        west_gw,
        east_gw,
        cp,
        app,
        east_task,
        east_gw_certs,
        east_disc,
        ..
    } = Linked::start(d).await;
    reg.publish(&Linked::west_yaml(None)).await;
    let proxy = WestProxy::start("west-app", cp.xds_addr, west_gw.ingress_addr, &app, false);
    wait_for(
        Duration::from_secs(20),
        "the proxy to serve east",
        || async {
            match get(proxy.outbound, "echo.default").await {
                Ok((200, b)) if b == "east" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let host = || {
        let compiled = proxy.dataplane.current();
        compiled
            .clusters
            .get("echo.default:8080")
            .expect("the cluster")
            .balancer
            .hosts()
            .iter()
            .find(|h| matches!(h.upstream, proxy::config::Upstream::Tunnel { .. }))
            .cloned()
            .expect("east's endpoint")
    };
    let ejected = || host().state.ejected(std::time::Instant::now());

    // The outage: east's gateway stops; west's gateway refuses tunnels to east.
    let east_peer = east_gw.peer_addr;
    east_gw.shutdown().await;
    let mut refused = 0;
    for _ in 0..10 {
        match get(proxy.outbound, "echo.default").await {
            Ok((200, b)) => panic!("answered by {b} while the only cluster with echo is cut off"),
            _ => refused += 1,
        }
    }
    assert!(
        !ejected(),
        "{refused} requests failed on the path to east; its endpoint was ejected all the same"
    );

    // East's gateway is back on its address: the link comes up and the endpoint serves at once.
    let mut cfg = east_gateway_config(d, &east_gw_certs, &east_disc);
    cfg.listen.peers = east_peer;
    let east_gw = gateway::Gateway::start(cfg)
        .await
        .expect("east's gateway starts again");
    wait_link_up(&west_gw, "east", "the link to east to come back").await;
    wait_for(
        Duration::from_secs(5),
        "east's endpoint to serve again",
        || async {
            match get(proxy.outbound, "echo.default").await {
                Ok((200, b)) if b == "east" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert!(!ejected(), "no ejection is left over from the outage");

    // The endpoint itself dies: east's gateway cannot connect to it (`connect_failed`), which
    // is the endpoint's failure: ejected.
    east_task.abort();
    let _ = east_task.await;
    for _ in 0..10 {
        let r = get(proxy.outbound, "echo.default").await;
        assert!(
            !matches!(&r, Ok((200, _))),
            "a dead endpoint answered: {r:?}"
        );
    }
    assert!(
        ejected(),
        "ten refusals naming the endpoint's own failure (connect_failed) did not eject it"
    );
    drop(proxy);
    cp.shutdown().await;
    west_gw.shutdown().await;
    east_gw.shutdown().await;
}
