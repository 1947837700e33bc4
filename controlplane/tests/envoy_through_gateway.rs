//! The whole cross-cluster path with real parts: a stock Envoy in cluster west, fed by west's
//! control plane over mutual-TLS ADS, first serves `echo.default` from west's own endpoint;
//! when that endpoint leaves the registry it fails over to cluster east — through the tunnel
//! listener of its bootstrap, an HTTP/2 CONNECT over mTLS to west's gateway, the QUIC link to
//! east's gateway, and east's local endpoint — and comes back when west's endpoint returns.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::*;
use controlplane::bootstrap::{BootstrapSpec, CertFiles, envoy};
use controlplane::config::ControlPlaneConfig;
use federation::identity::{CertificateAuthority, ExtraNames, IssuedPaths, SpiffeId};
use federation::model::{Labels, Locality, Name};
use gateway::Gateway;
use gateway::config::GatewayConfig;

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

async fn served_by(outbound: SocketAddr) -> Result<String, String> {
    match get(outbound, "echo.default").await? {
        (200, body) => Ok(body),
        (code, body) => Err(format!("status {code}: {body}")),
    }
}

/// Wait until `want` answers, then check that the next 10 requests all go there.
async fn expect_all(envoy: &Envoy, want: &str, what: &str) {
    wait_for(Duration::from_secs(15), what, || async {
        let got = served_by(envoy.outbound).await?;
        if got == want {
            Ok(())
        } else {
            Err(format!("served by {got}"))
        }
    })
    .await;
    for i in 0..10 {
        let got = served_by(envoy.outbound)
            .await
            .unwrap_or_else(|e| panic!("request {i} after {what}: {e}\n{}", envoy.log_tail()));
        assert_eq!(got, want, "request {i} after {what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_fails_over_to_another_cluster_through_the_gateways() {
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

    // The service in both clusters: west's instance answers "west", east's "east".
    let (west_ep, _tw) = http_backend("west").await;
    let (east_ep, _te) = http_backend("east").await;
    let reg = Registry::start(d).await;
    let west_yaml = |ep| discovery_yaml("west", "us-west", "us-west-1a", ep);
    reg.publish(&west_yaml(Some(west_ep))).await;
    reg.publish(&discovery_yaml(
        "east",
        "us-east",
        "us-east-1a",
        Some(east_ep),
    ))
    .await;

    // The gateways: east serves its local endpoints from its discovery file.
    let east_disc = d.join("east-discovery.yaml");
    std::fs::write(
        &east_disc,
        discovery_yaml("east", "us-east", "us-east-1a", Some(east_ep)),
    )
    .unwrap();
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

    // West's control plane: xDS over mTLS, remote clusters through the west gateway.
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

    let admin = free_addr();
    let outbound = free_addr();
    let spec = BootstrapSpec {
        node_id: "west-app".into(),
        cluster: Name::parse("c", "west").unwrap(),
        locality: Locality::parse("l", "us-west/us-west-1a").unwrap(),
        labels: Labels::default(),
        xds: cp.xds_addr,
        tls: Some(CertFiles {
            cert: app_certs.cert.clone(),
            key: app_certs.key.clone(),
            ca: app_certs.ca.clone(),
        }),
        delta: true,
        admin,
        outbound,
        gateway: Some((
            west_gw.ingress_addr,
            format!("spiffe://{TD}/cluster/west/gateway"),
        )),
    };
    let envoy = Envoy::start(d, "west-app", &envoy(&spec), admin, outbound);

    // Priority 0: west's own endpoint, directly.
    expect_all(&envoy, "west", "Envoy to route to west's own endpoint").await;
    let ingress_before = west_gw
        .shared()
        .metrics
        .ingress_requests_total
        .load(Relaxed);
    assert_eq!(
        east_gw.shared().metrics.inbound_streams_total.load(Relaxed),
        0,
        "nothing went to east while west's endpoint was there"
    );

    // West's endpoint leaves the registry: east, through both gateways.
    reg.publish(&west_yaml(None)).await;
    expect_all(
        &envoy,
        "east",
        "failover to cluster east through the gateways",
    )
    .await;
    let ingress = west_gw
        .shared()
        .metrics
        .ingress_requests_total
        .load(Relaxed)
        - ingress_before;
    let inbound = east_gw.shared().metrics.inbound_streams_total.load(Relaxed);
    assert!(
        ingress >= 1 && inbound >= 1,
        "the requests to east crossed west's ingress ({ingress} CONNECTs) and the QUIC link \
         ({inbound} streams at east)"
    );

    // West's endpoint returns: traffic comes home.
    reg.publish(&west_yaml(Some(west_ep))).await;
    expect_all(&envoy, "west", "traffic to return to west").await;

    // Envoy accepted every resource, over mTLS.
    for (k, v) in envoy.stats("update_rejected").await {
        assert_eq!(v, 0, "{k} = {v}\n{}", envoy.log_tail());
    }
    let metrics = admin_get(cp.admin_addr, "/metrics").await.unwrap();
    assert_eq!(
        metric(&metrics, "strait_xds_rejected_streams_total"),
        Some(0.0),
        "the workload certificate was accepted\n{metrics}"
    );
    drop(envoy);
    cp.shutdown().await;
    west_gw.shutdown().await;
    east_gw.shutdown().await;
}
