//! A proxyless gRPC client (PyPI grpcio) calling `xds:///echo.default`, configured by the
//! control plane over ADS: answers come from priority 0, then from priority 1 once priority 0
//! is taken away, then from priority 0 again; the client never NACKs.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use controlplane::bootstrap::{BootstrapSpec, grpc};
use federation::model::{Labels, Locality, Name};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{ChildStdout, Command};

fn discovery(a: SocketAddr, a_health: &str, b: SocketAddr) -> String {
    format!(
        "cluster: east\nregion: us-east\nservices:\n  - name: echo\n    ports: [{{name: grpc, port: 9090, protocol: grpc}}]\n    endpoints:\n      - {{address: 127.0.0.1, port: {}, zone: us-east-1a, health: {a_health}}}\n      - {{address: 127.0.0.1, port: {}, zone: us-east-1b}}\n",
        a.port(),
        b.port()
    )
}

/// Read answers until `want` has answered `n` times in a row (failing on a NACK-worthy error
/// from the client, i.e. UNAVAILABLE for a config it could not use, only after the bound).
async fn expect_all(lines: &mut Lines<BufReader<ChildStdout>>, want: &str, n: usize, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut streak = 0;
    let mut seen = Vec::new();
    while streak < n {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}; answers: {seen:?}"))
            .expect("client output")
            .expect("client still running");
        if line == want {
            streak += 1;
        } else if streak > 0 {
            panic!("{what}: {line:?} answered after {streak} answers from {want}");
        }
        seen.push(line);
        if seen.len() > 400 {
            seen.drain(..200);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxyless_grpc_follows_priorities() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(dir.path()).await;
    let (a, _sa) = grpc_server("A").await;
    let (b, _sb) = grpc_server("B").await;
    reg.publish(&discovery(a, "healthy", b)).await;
    let cp = start_cp(&reg, "east", "us-east").await;

    let spec = BootstrapSpec {
        node_id: "grpc-client-1".into(),
        cluster: Name::parse("c", "east").unwrap(),
        locality: Locality::parse("l", "us-east/us-east-1a").unwrap(),
        labels: Labels::default(),
        xds: cp.xds_addr,
        tls: None,
        delta: false,
        admin: free_addr(),
        outbound: free_addr(),
        gateway: None,
    };
    let bootstrap = dir.path().join("grpc-bootstrap.json");
    std::fs::write(&bootstrap, serde_json::to_vec(&grpc(&spec)).unwrap()).unwrap();
    let mut child = Command::new(python())
        .arg(grpc_script())
        .args(["client", "xds:///echo.default"])
        .env("GRPC_XDS_BOOTSTRAP", &bootstrap)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let _client = Py(child);

    expect_all(&mut lines, "A", 10, "answers from A (priority 0)").await;
    reg.publish(&discovery(a, "unhealthy", b)).await;
    expect_all(
        &mut lines,
        "B",
        10,
        "answers from B after A turned unhealthy",
    )
    .await;
    reg.publish(&discovery(a, "healthy", b)).await;
    expect_all(&mut lines, "A", 10, "answers from A again").await;

    let metrics = admin_get(cp.admin_addr, "/metrics").await.unwrap();
    for t in ["CDS", "EDS", "LDS", "RDS"] {
        assert_eq!(
            metric(&metrics, &format!("strait_xds_nacks_total{{type=\"{t}\"}}")),
            Some(0.0),
            "{t} NACKs\n{metrics}"
        );
    }
    let debug = admin_get(cp.admin_addr, "/debug/config?node=grpc-client-1")
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&debug).unwrap();
    assert_eq!(v["kind"], "Grpc", "{debug}");
    let lds = v["sent"]["LDS"]["resources"].as_array().unwrap();
    assert_eq!(lds.len(), 1, "only the subscribed listener: {debug}");
    assert_eq!(lds[0]["name"], "echo.default");
    cp.shutdown().await;
}
