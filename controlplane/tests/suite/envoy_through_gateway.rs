//! The whole cross-cluster path with real parts: a stock Envoy in cluster west, fed by west's
//! control plane over mutual-TLS ADS, first serves `echo.default` from west's own endpoint;
//! when that endpoint leaves the registry it fails over to cluster east — through the tunnel
//! listener of its bootstrap, an HTTP/2 CONNECT over mTLS to west's gateway, the QUIC link to
//! east's gateway, and east's local endpoint — and comes back when west's endpoint returns.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use crate::common::*;

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
    let fed = Linked::start(d).await;
    let Linked {
        reg,
        west_gw,
        east_gw,
        cp,
        west_ep,
        ..
    } = &fed;
    let west_yaml = Linked::west_yaml;
    let envoy = fed.west_envoy(d, "west-app");

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
    reg.publish(&west_yaml(Some(*west_ep))).await;
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
    fed.shutdown().await;
}
