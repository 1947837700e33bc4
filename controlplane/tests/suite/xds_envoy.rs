//! A stock Envoy 1.40 fed by the control plane over ADS (state of the world and delta), with a
//! real etcd as the registry: it accepts every resource, routes by Host to the priority-0
//! endpoints, fails over to priority 1 when they are removed or turn unhealthy, and comes back.

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::*;
use controlplane::bootstrap::{BootstrapSpec, envoy};
use federation::model::{Labels, Locality, Name};

fn discovery(a: SocketAddr, a_health: &str, b: SocketAddr, with_a: bool) -> String {
    let a_line = if with_a {
        format!(
            "      - {{address: 127.0.0.1, port: {}, zone: us-east-1a, health: {a_health}}}\n",
            a.port()
        )
    } else {
        String::new()
    };
    format!(
        "cluster: east\nregion: us-east\nservices:\n  - name: echo\n    ports: [{{name: http, port: 8080, protocol: http}}]\n    endpoints:\n{a_line}      - {{address: 127.0.0.1, port: {}, zone: us-east-1b}}\n",
        b.port()
    )
}

async fn served_by(outbound: SocketAddr) -> Result<String, String> {
    match get(outbound, "echo.default").await? {
        (200, body) => Ok(body),
        (code, body) => Err(format!("status {code}: {body}")),
    }
}

/// Wait until `want` answers, then check that the next 20 requests all go there.
async fn expect_all(outbound: SocketAddr, want: &str, what: &str) {
    wait_for(Duration::from_secs(10), what, || async {
        let got = served_by(outbound).await?;
        if got == want {
            Ok(())
        } else {
            Err(format!("served by {got}"))
        }
    })
    .await;
    for i in 0..20 {
        let got = served_by(outbound).await.expect("request succeeds");
        assert_eq!(got, want, "request {i} after {what}");
    }
}

async fn fails_over(delta: bool) {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(dir.path()).await;
    let (a, _ta) = http_backend("A").await;
    let (b, _tb) = http_backend("B").await;
    reg.publish(&discovery(a, "healthy", b, true)).await;
    let cp = start_cp(&reg, "east", "us-east").await;

    let admin = free_addr();
    let outbound = free_addr();
    let node_id = format!("envoy-{}", if delta { "delta" } else { "sotw" });
    let spec = BootstrapSpec {
        node_id: node_id.clone(),
        cluster: Name::parse("c", "east").unwrap(),
        locality: Locality::parse("l", "us-east/us-east-1a").unwrap(),
        labels: Labels::default(),
        xds: cp.xds_addr.into(),
        xds_replicas: Vec::new(),
        tls: None,
        delta,
        admin,
        outbound,
        transparent: None,
        gateway: None,
    };
    let envoy = Envoy::start(dir.path(), &node_id, &envoy(&spec), admin, outbound);

    // Priority 0: the same zone.
    expect_all(outbound, "A", "Envoy to route to A (same zone, priority 0)").await;
    // Priority 0 turns unhealthy in the registry: priority 1.
    reg.publish(&discovery(a, "unhealthy", b, true)).await;
    expect_all(outbound, "B", "failover to B after A turned unhealthy").await;
    // Back.
    reg.publish(&discovery(a, "healthy", b, true)).await;
    expect_all(outbound, "A", "traffic to return to A").await;
    // Priority 0 removed from the registry.
    reg.publish(&discovery(a, "healthy", b, false)).await;
    expect_all(outbound, "B", "failover to B after A was removed").await;
    reg.publish(&discovery(a, "healthy", b, true)).await;
    expect_all(outbound, "A", "traffic to return to A after it came back").await;

    // Envoy accepted everything it was sent.
    let rejected = envoy.stats("update_rejected").await;
    assert!(
        rejected
            .iter()
            .any(|(k, _)| k.contains("cluster_manager.cds.update_rejected")),
        "Envoy's stats must list cds.update_rejected: {rejected:?}\n{}",
        envoy.log_tail()
    );
    for (k, v) in &rejected {
        assert_eq!(*v, 0, "{k} = {v}\n{}", envoy.log_tail());
    }
    let accepted = envoy.stats("cluster_manager.cds.update_success").await;
    assert!(
        accepted.iter().any(|(_, v)| *v >= 1),
        "CDS updates accepted: {accepted:?}"
    );

    // The control plane saw no NACK, and says what it sent this proxy.
    let metrics = admin_get(cp.admin_addr, "/metrics").await.unwrap();
    for t in ["CDS", "EDS", "LDS", "RDS"] {
        assert_eq!(
            metric(&metrics, &format!("strait_xds_nacks_total{{type=\"{t}\"}}")),
            Some(0.0),
            "{t} NACKs\n{metrics}"
        );
        assert!(
            metric(&metrics, &format!("strait_xds_acks_total{{type=\"{t}\"}}")).unwrap_or(0.0)
                >= 1.0,
            "{t} ACKs\n{metrics}"
        );
    }
    assert_eq!(metric(&metrics, "strait_xds_connected_proxies"), Some(1.0));
    assert!(
        metric(&metrics, "strait_xds_convergence_seconds_count").unwrap_or(0.0) >= 1.0,
        "convergence observed\n{metrics}"
    );
    let debug = admin_get(cp.admin_addr, &format!("/debug/config?node={node_id}"))
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&debug).unwrap();
    assert_eq!(v["delta"], serde_json::json!(delta));
    let eds = v["sent"]["EDS"]["resources"].as_array().unwrap();
    assert_eq!(eds.len(), 1, "{debug}");
    assert_eq!(eds[0]["name"], "echo.default:8080");
    drop(envoy);
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_sotw_routes_by_priority_and_fails_over() {
    fails_over(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_delta_routes_by_priority_and_fails_over() {
    fails_over(true).await;
}
