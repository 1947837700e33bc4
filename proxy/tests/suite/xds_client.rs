//! The proxy's xDS client against a real `strait controlplane` (in process) and a real etcd:
//! it warms up to a complete config (clusters with their endpoints, the outbound listener with
//! its routes), follows changes, keeps its last good config while the control plane is away,
//! and resyncs when it returns.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use controlplane::config::ControlPlaneConfig;
use controlplane::server::ControlPlane;
use envoy_types::pb::google::protobuf::{Value, value::Kind};
use proxy::config::{ListenerKind, RouteSource, Upstream};
use proxy::xds::{ProxyConfig, XdsClient, XdsOptions};
use testkit::etcd::{EtcdServer, free_port};

fn discovery(zone_a: bool, web: bool) -> String {
    let mut s = String::from(
        "cluster: east\nregion: us-east\nservices:\n  - name: echo\n    ports: [{name: http, port: 8080, protocol: http}]\n    endpoints:\n",
    );
    if zone_a {
        s.push_str("      - {address: 10.0.0.1, port: 8080, zone: us-east-1a}\n");
    }
    s.push_str("      - {address: 10.0.0.2, port: 8080, zone: us-east-1b}\n");
    if web {
        s.push_str("  - name: web\n    ports: [{name: http, port: 80, protocol: http}]\n    endpoints:\n      - {address: 10.0.0.3, port: 80, zone: us-east-1a}\n");
    }
    s
}

fn write(path: &Path, text: &str) {
    // Write then rename: the control plane's poller never sees half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn cp_config(dir: &Path, etcd: &str, xds: SocketAddr) -> ControlPlaneConfig {
    ControlPlaneConfig::parse(
        dir.join("cp.yaml"),
        &format!(
            "cluster: east\nregion: us-east\nregistry: {{etcd: [\"{etcd}\"], lease_ttl: 2s}}\n\
             discovery: {{file: {}, poll: 50ms}}\nxds: {{listen: \"{xds}\"}}\nadmin: {{listen: \"127.0.0.1:0\"}}\n",
            dir.join("east.yaml").display()
        ),
    )
    .expect("config")
}

fn node() -> envoy_types::pb::envoy::config::core::v3::Node {
    let mut n = testkit::ads::node("proxy-1", "east", "us-east", "us-east-1a", false);
    if let Some(m) = n.metadata.as_mut() {
        m.fields.insert(
            "STRAIT_OUTBOUND".into(),
            Value {
                kind: Some(Kind::StringValue("127.0.0.1:15001".into())),
            },
        );
    }
    n.user_agent_name = "strait-proxy".into();
    n
}

async fn wait_config(
    c: &XdsClient,
    what: &str,
    f: impl Fn(&ProxyConfig) -> bool,
) -> Arc<ProxyConfig> {
    let mut rx = c.config.clone();
    match tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|cfg| f(cfg))).await {
        Ok(Ok(cfg)) => cfg.clone(),
        _ => panic!(
            "timed out waiting for {what}; config {:?}; status {:?}",
            c.config.borrow(),
            c.status.borrow()
        ),
    }
}

fn p0(cfg: &ProxyConfig) -> Vec<Upstream> {
    cfg.assignments
        .get("echo.default:8080")
        .and_then(|a| a.priorities.first())
        .map(|p| {
            p.iter()
                .flat_map(|l| &l.endpoints)
                .map(|e| e.upstream.clone())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_the_control_plane_and_outlives_it_delta() {
    follows_the_control_plane_and_outlives_it(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_the_control_plane_and_outlives_it_state_of_the_world() {
    follows_the_control_plane_and_outlives_it(false).await;
}

async fn follows_the_control_plane_and_outlives_it(delta: bool) {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let etcd = EtcdServer::start(&d.join("etcd")).expect("etcd");
    write(&d.join("east.yaml"), &discovery(true, false));
    let xds: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
        .parse()
        .unwrap();
    let cp = ControlPlane::start(cp_config(d, &etcd.endpoint(), xds))
        .await
        .expect("control plane");

    let mut opts = XdsOptions::new(format!("http://{xds}"), node());
    opts.delta = delta;
    let client = XdsClient::start(opts);
    let a: Upstream = Upstream::Direct("10.0.0.1:8080".parse().unwrap());
    let b: Upstream = Upstream::Direct("10.0.0.2:8080".parse().unwrap());

    // Warm: everything, complete, at once.
    let cfg = wait_config(&client, "the first complete config", |c| {
        c.clusters.contains_key("echo.default:8080")
    })
    .await;
    assert!(
        cfg.missing().is_empty(),
        "published only when complete: {:?}",
        cfg.missing()
    );
    assert_eq!(
        p0(&cfg),
        vec![a.clone()],
        "priority 0: the proxy's own zone"
    );
    let l = cfg
        .listeners
        .get("strait_outbound_http")
        .expect("outbound listener");
    assert_eq!(l.address, "127.0.0.1:15001".parse().unwrap());
    let ListenerKind::Http {
        routes: RouteSource::Rds(rds),
    } = &l.kind
    else {
        panic!("{:?}", l.kind)
    };
    let table = cfg.routes.get(rds).expect("its routes");
    assert!(
        table
            .route("echo.default", "/", &http::HeaderMap::new())
            .is_some()
    );
    assert!(client.status.borrow().warm);

    // A change: zone a's endpoint leaves; priority 0 becomes zone b.
    write(&d.join("east.yaml"), &discovery(false, false));
    wait_config(&client, "zone b at priority 0", |c| {
        p0(c) == vec![b.clone()]
    })
    .await;

    // The control plane goes away: the last good config stays.
    cp.shutdown().await;
    let mut st = client.status.clone();
    tokio::time::timeout(Duration::from_secs(10), st.wait_for(|s| !s.connected))
        .await
        .expect("the client notices the control plane left")
        .unwrap();
    assert_eq!(
        p0(&client.config.borrow()),
        vec![b.clone()],
        "static stability"
    );
    assert!(
        client
            .config
            .borrow()
            .clusters
            .contains_key("echo.default:8080")
    );

    // It comes back with a new service: the client reconnects and resyncs.
    write(&d.join("east.yaml"), &discovery(false, true));
    // The old server may hold its port a moment after shutdown: retry the bind, bounded.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let cp = loop {
        match ControlPlane::start(cp_config(d, &etcd.endpoint(), xds)).await {
            Ok(cp) => break cp,
            Err(e)
                if std::time::Instant::now() < deadline
                    && format!("{e:?}").contains("AddrInUse") =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("control plane restarts: {e:?}"),
        }
    };
    let cfg = wait_config(&client, "the new service after the resync", |c| {
        c.assignments.contains_key("web.default:80")
    })
    .await;
    assert_eq!(p0(&cfg), vec![b]);
    let status = client.status.borrow().clone();
    assert!(status.connects >= 2, "{status:?}");
    assert_eq!(status.nacks, 0, "{status:?}");
    cp.shutdown().await;
}

/// A scripted ADS server: sends the given delta responses one by one, each after the client's
/// answer to the previous one, and reports every request it receives.
mod scripted {
    use std::pin::Pin;

    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
        AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    };
    use envoy_types::pb::envoy::service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    };
    use futures::Stream;
    use tokio::sync::{Mutex, mpsc};
    use tonic::{Request, Response, Status, Streaming};

    type Out<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

    pub struct Server {
        pub script: Mutex<Option<Vec<DeltaDiscoveryResponse>>>,
        pub seen: mpsc::UnboundedSender<DeltaDiscoveryRequest>,
    }

    #[tonic::async_trait]
    impl AggregatedDiscoveryService for Server {
        type StreamAggregatedResourcesStream = Out<DiscoveryResponse>;
        type DeltaAggregatedResourcesStream = Out<DeltaDiscoveryResponse>;

        async fn stream_aggregated_resources(
            &self,
            _: Request<Streaming<DiscoveryRequest>>,
        ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
            Err(Status::unimplemented("delta only"))
        }

        async fn delta_aggregated_resources(
            &self,
            request: Request<Streaming<DeltaDiscoveryRequest>>,
        ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
            let mut script = self.script.lock().await.take().unwrap_or_default();
            script.reverse();
            let seen = self.seen.clone();
            let (tx, mut rx) = mpsc::channel(16);
            let mut inbound = request.into_inner();
            tokio::spawn(async move {
                if let Some(first) = script.pop() {
                    let _ = tx.send(Ok(first)).await;
                }
                while let Ok(Some(req)) = inbound.message().await {
                    let answer = !req.response_nonce.is_empty();
                    let _ = seen.send(req);
                    if answer && let Some(next) = script.pop() {
                        let _ = tx.send(Ok(next)).await;
                    }
                }
            });
            Ok(Response::new(Box::pin(futures::stream::poll_fn(
                move |cx| rx.poll_recv(cx),
            ))))
        }
    }

    pub fn service(s: Server) -> AggregatedDiscoveryServiceServer<Server> {
        AggregatedDiscoveryServiceServer::new(s)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_resource_is_nacked_with_its_field_and_the_last_good_config_stays() {
    use envoy_types::pb::envoy::config::cluster::v3 as cluster;
    use envoy_types::pb::envoy::config::endpoint::v3 as endpoint;
    use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
    use envoy_types::util::pack_any;

    let eds = |name: &str| cluster::Cluster {
        name: name.into(),
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::Eds as i32,
        )),
        ..Default::default()
    };
    let mut bad = eds("bad");
    bad.lb_policy = cluster::cluster::LbPolicy::Maglev as i32;
    let resp = |nonce: &str, t: &str, rs: Vec<(&str, envoy_types::pb::google::protobuf::Any)>| {
        DeltaDiscoveryResponse {
            type_url: t.into(),
            nonce: nonce.into(),
            resources: rs
                .into_iter()
                .map(|(n, any)| Resource {
                    name: n.into(),
                    version: format!("v-{n}"),
                    resource: Some(any),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    };
    let cla = endpoint::ClusterLoadAssignment {
        cluster_name: "good".into(),
        ..Default::default()
    };
    let script = vec![
        resp(
            "1",
            proxy::config::CLUSTER_TYPE,
            vec![("good", pack_any(eds("good")))],
        ),
        resp(
            "2",
            proxy::config::ASSIGNMENT_TYPE,
            vec![("good", pack_any(cla))],
        ),
        // One good and one bad cluster in one response: all of it is refused.
        resp(
            "3",
            proxy::config::CLUSTER_TYPE,
            vec![("other", pack_any(eds("other"))), ("bad", pack_any(bad))],
        ),
    ];
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(scripted::service(scripted::Server {
                script: tokio::sync::Mutex::new(Some(script)),
                seen: seen_tx,
            }))
            .serve_with_incoming(tokio_stream_listener(listener)),
    );
    let client = XdsClient::start(XdsOptions::new(format!("http://{addr}"), node()));
    // The NACK names the resource and the field; the ACKs before it were clean.
    let nack = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let r = seen.recv().await.expect("server alive");
            if r.response_nonce == "3" {
                return r;
            }
            assert!(r.error_detail.is_none(), "unexpected NACK: {r:?}");
        }
    })
    .await
    .expect("an answer to the bad response");
    let detail = nack.error_detail.expect("a NACK");
    assert!(
        detail
            .message
            .contains("cluster \"bad\": lb_policy: MAGLEV is not supported"),
        "{}",
        detail.message
    );
    let mut st = client.status.clone();
    tokio::time::timeout(Duration::from_secs(5), st.wait_for(|s| s.nacks == 1))
        .await
        .expect("counted")
        .unwrap();
    let cfg = client.config.borrow().clone();
    assert!(cfg.clusters.contains_key("good") && cfg.assignments.contains_key("good"));
    assert!(
        !cfg.clusters.contains_key("other"),
        "nothing of a refused response is applied"
    );
    server.abort();
}

/// Accepted TCP connections as a stream, for `serve_with_incoming`.
fn tokio_stream_listener(
    l: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(l, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    })
}

/// A control plane that serves only state of the world: the client falls back to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falls_back_to_state_of_the_world_when_delta_is_not_served() {
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
        AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    };
    use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
    use tonic::{Request, Response, Status, Streaming};

    struct SotwOnly(controlplane::xds::Xds);

    #[tonic::async_trait]
    impl AggregatedDiscoveryService for SotwOnly {
        type StreamAggregatedResourcesStream =
            <controlplane::xds::Xds as AggregatedDiscoveryService>::StreamAggregatedResourcesStream;
        type DeltaAggregatedResourcesStream =
            <controlplane::xds::Xds as AggregatedDiscoveryService>::DeltaAggregatedResourcesStream;

        async fn stream_aggregated_resources(
            &self,
            request: Request<Streaming<DiscoveryRequest>>,
        ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
            self.0.stream_aggregated_resources(request).await
        }

        async fn delta_aggregated_resources(
            &self,
            _: Request<Streaming<DeltaDiscoveryRequest>>,
        ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
            Err(Status::unimplemented("no delta here"))
        }
    }

    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let etcd = EtcdServer::start(&d.join("etcd")).expect("etcd");
    write(&d.join("east.yaml"), &discovery(true, true));
    let xds: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
        .parse()
        .unwrap();
    let cp = ControlPlane::start(cp_config(d, &etcd.endpoint(), xds))
        .await
        .expect("control plane");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(SotwOnly(
                cp.xds.clone(),
            )))
            .serve_with_incoming(tokio_stream_listener(listener)),
    );
    let client = XdsClient::start(XdsOptions::new(format!("http://{addr}"), node()));
    let cfg = wait_config(&client, "a complete config over state of the world", |c| {
        c.assignments.contains_key("web.default:80") && !c.routes.is_empty()
    })
    .await;
    assert_eq!(
        p0(&cfg),
        vec![Upstream::Direct("10.0.0.1:8080".parse().unwrap())]
    );
    // And it follows a removal (state of the world: absence from the cluster list).
    write(&d.join("east.yaml"), &discovery(true, false));
    wait_config(&client, "web to go", |c| {
        !c.clusters.contains_key("web.default:80") && !c.assignments.contains_key("web.default:80")
    })
    .await;
    assert_eq!(client.status.borrow().nacks, 0);
    server.abort();
    cp.shutdown().await;
}

/// Two replicas of the control plane: the proxy is given both; when the one it talks to stops
/// (SIGTERM's path: a graceful shutdown) it moves to the other within a second, keeps its
/// config meanwhile (never emptied), and follows the other replica — which took the leadership
/// over and publishes the cluster's changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_to_another_replica_and_keeps_its_config() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let etcd = EtcdServer::start(&d.join("etcd")).expect("etcd");
    write(&d.join("east.yaml"), &discovery(false, false));
    let addr = || -> SocketAddr {
        format!("127.0.0.1:{}", free_port().unwrap())
            .parse()
            .unwrap()
    };
    let (x1, x2) = (addr(), addr());
    let cp1 = ControlPlane::start(cp_config(d, &etcd.endpoint(), x1))
        .await
        .expect("control plane 1");
    let cp2 = ControlPlane::start(cp_config(d, &etcd.endpoint(), x2))
        .await
        .expect("control plane 2");
    let mut opts = XdsOptions::new(format!("http://{x1}"), node());
    opts.fallbacks = vec![format!("http://{x2}")];
    let client = XdsClient::start(opts);
    wait_config(&client, "the first complete config", |c| {
        c.clusters.contains_key("echo.default:8080") && p0(c).len() == 1
    })
    .await;
    assert_eq!(client.status.borrow().server, format!("http://{x1}"));

    // The config the proxy holds may never be emptied from here on.
    let mut watch = client.config.clone();
    let emptied = tokio::spawn(async move {
        while watch.changed().await.is_ok() {
            if !watch.borrow().clusters.contains_key("echo.default:8080") {
                return true;
            }
        }
        false
    });
    let t = std::time::Instant::now();
    cp1.shutdown().await;
    let mut status = client.status.clone();
    tokio::time::timeout(
        Duration::from_secs(5),
        status.wait_for(|s| s.connected && s.server == format!("http://{x2}")),
    )
    .await
    .expect("the proxy did not move to the other replica")
    .unwrap();
    let moved = t.elapsed();
    assert!(moved < Duration::from_secs(1), "moving took {moved:?}");
    // The other replica publishes the cluster now: a change reaches the proxy through it.
    write(&d.join("east.yaml"), &discovery(true, false));
    wait_config(&client, "the change, published by the other replica", |c| {
        // The new endpoint is in the proxy's own zone: priority 0.
        p0(c) == [Upstream::Direct("10.0.0.1:8080".parse().unwrap())]
    })
    .await;
    assert!(
        !emptied.is_finished() || !emptied.await.unwrap(),
        "the config was emptied"
    );
    // ... and into the registry (a replica's own proxies get its discovery file anyway): the
    // other replica leads now.
    let cache = federation::registry::RegistryCache::spawn(federation::registry::Backend::Etcd(
        federation::registry::EtcdBackend::connect(&[etcd.endpoint()], Default::default())
            .await
            .unwrap(),
    ));
    cache
        .wait_for(Duration::from_secs(10), |s| s.endpoint_count() == 2)
        .await
        .expect("the other replica did not publish the change");
    println!("moved to the other replica {moved:?} after the first stopped");
    cp2.shutdown().await;
}
