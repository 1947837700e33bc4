//! A proxyless gRPC client (PyPI grpcio) calling `xds:///echo.default`, configured by the
//! control plane over ADS: answers come from priority 0, then from priority 1 once priority 0
//! is taken away, then from priority 0 again; the client never NACKs. A service policy's HTTP
//! rules route by gRPC metadata too.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use crate::common::*;
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

    let (mut lines, _client) = grpc_client(
        dir.path(),
        "grpc-client-1",
        cp.xds_addr,
        "xds:///echo.default",
        &[],
    );

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

/// A proxyless gRPC client of `target` with `metadata` (KEY=VALUE), bootstrapped for cluster
/// east from the control plane at `xds`; its answers, line by line.
fn grpc_client(
    dir: &std::path::Path,
    node_id: &str,
    xds: SocketAddr,
    target: &str,
    metadata: &[&str],
) -> (Lines<BufReader<ChildStdout>>, Py) {
    let spec = BootstrapSpec {
        node_id: node_id.into(),
        cluster: Name::parse("c", "east").unwrap(),
        locality: Locality::parse("l", "us-east/us-east-1a").unwrap(),
        labels: Labels::default(),
        xds: xds.into(),
        xds_replicas: Vec::new(),
        tls: None,
        delta: false,
        admin: free_addr(),
        outbound: free_addr(),
        transparent: None,
        gateway: None,
    };
    let bootstrap = dir.join(format!("{node_id}.json"));
    std::fs::write(&bootstrap, serde_json::to_vec(&grpc(&spec)).unwrap()).unwrap();
    spawn_client(&bootstrap, target, metadata)
}

/// The grpcio client of `target` bootstrapped from the file `bootstrap`; its answers.
fn spawn_client(
    bootstrap: &std::path::Path,
    target: &str,
    metadata: &[&str],
) -> (Lines<BufReader<ChildStdout>>, Py) {
    let mut child = Command::new(python())
        .arg(grpc_script())
        .args(["client", target])
        .args(metadata)
        .env("GRPC_XDS_BOOTSTRAP", bootstrap)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python starts");
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    (lines, Py(child))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxyless_grpc_follows_http_rules_by_metadata() {
    use federation::registry::RegistryKey;
    use federation::registry::codec::encode_policy;
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(dir.path()).await;
    let (a, _sa) = grpc_server("A").await;
    let (v2, _sv2) = grpc_server("V2").await;
    reg.publish(&format!(
        "cluster: east\nregion: us-east\nservices:\n\
         \x20 - name: echo\n    ports: [{{name: grpc, port: 9090, protocol: grpc}}]\n    endpoints: [{{address: 127.0.0.1, port: {}, zone: us-east-1a}}]\n\
         \x20 - name: echo-v2\n    ports: [{{name: grpc, port: 9090, protocol: grpc}}]\n    endpoints: [{{address: 127.0.0.1, port: {}, zone: us-east-1a}}]\n",
        a.port(),
        v2.port()
    ))
    .await;
    let policies = federation::policy_file::parse(
        "p.yaml",
        "policies:\n  - service: echo.default\n    http:\n      - match: {headers: [{name: x-canary, exact: \"1\"}]}\n        to: [{service: echo-v2.default}]\n        retries: {attempts: 1, on: [5xx]}\n",
    )
    .expect("policy");
    for p in policies {
        reg.put(
            RegistryKey::Policy(p.scope.clone()).encode(),
            encode_policy(&p),
        )
        .await;
    }
    let cp = start_cp(&reg, "east", "us-east").await;

    let (mut plain, _p1) = grpc_client(
        dir.path(),
        "grpc-plain",
        cp.xds_addr,
        "xds:///echo.default",
        &[],
    );
    let (mut canary, _p2) = grpc_client(
        dir.path(),
        "grpc-canary",
        cp.xds_addr,
        "xds:///echo.default",
        &["x-canary=1"],
    );
    expect_all(&mut plain, "A", 10, "calls without the header to echo").await;
    expect_all(&mut canary, "V2", 10, "calls with x-canary: 1 to echo-v2").await;

    let metrics = admin_get(cp.admin_addr, "/metrics").await.unwrap();
    for t in ["CDS", "EDS", "LDS"] {
        assert_eq!(
            metric(&metrics, &format!("strait_xds_nacks_total{{type=\"{t}\"}}")),
            Some(0.0),
            "{t} NACKs\n{metrics}"
        );
    }
    cp.shutdown().await;
}

/// Certificates without hands: the control plane issues its own xDS serving certificate (with
/// the DNS name its clients use) and the gateway's from the CA it is given, before it serves;
/// a proxyless gRPC client bootstrapped by `strait proxy bootstrap --grpc` with mTLS reaches it
/// by that DNS name (grpcio checks the name against the certificate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxyless_grpc_reaches_the_control_plane_by_name_over_mtls() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(dir.path()).await;
    let (a, _sa) = grpc_server("A").await;
    let (b, _sb) = grpc_server("B").await;
    reg.publish(&discovery(a, "healthy", b)).await;
    let ca =
        federation::identity::CertificateAuthority::init("lab.strait", Duration::from_secs(86400))
            .unwrap();
    ca.write(dir.path().join("ca"), false).unwrap();
    let client_files = issue(
        &ca,
        dir.path(),
        "spiffe://lab.strait/cluster/east/ns/default/sa/client",
        "client",
    );
    let cfg = controlplane::config::ControlPlaneConfig::parse(
        dir.path().join("cp.yaml"),
        &format!(
            "cluster: east\nregion: us-east\nregistry: {{etcd: [\"{}\"]}}\n\
             xds: {{listen: \"127.0.0.1:0\"}}\nadmin: {{listen: \"127.0.0.1:0\"}}\n\
             certificates:\n  ca: ca\n  validity: 1h\n\
             \x20 controlplane: {{files: cp-tls, dns_names: [localhost]}}\n\
             \x20 gateway: {{files: gw-tls, dns_names: [gateway.east.example], ips: [203.0.113.7]}}\n",
            reg.etcd.endpoint()
        ),
    )
    .expect("control plane config");
    assert!(
        !dir.path().join("cp-tls").exists(),
        "nothing issued by hand"
    );
    let cp = start_cp_with(&reg, cfg).await;

    // What it issued: its own identity with the name, the gateway's with its names.
    let inspected = |f: &str| {
        federation::identity::inspect_pem(&std::fs::read_to_string(dir.path().join(f)).unwrap())
            .unwrap()
    };
    let cp_cert = inspected("cp-tls/cert.pem");
    assert_eq!(
        cp_cert.identity.as_deref(),
        Some("spiffe://lab.strait/cluster/east/ns/strait-system/sa/strait-controlplane")
    );
    assert_eq!(cp_cert.dns_names, ["localhost"]);
    let gw_cert = inspected("gw-tls/cert.pem");
    assert_eq!(
        gw_cert.identity.as_deref(),
        Some("spiffe://lab.strait/cluster/east/gateway")
    );
    assert_eq!(gw_cert.dns_names, ["gateway.east.example"]);
    assert_eq!(
        gw_cert.ip_addresses,
        ["203.0.113.7".parse::<std::net::IpAddr>().unwrap()]
    );

    let xds = format!("localhost:{}", cp.xds_addr.port());
    let mut spec = BootstrapSpec {
        node_id: "grpc-by-name".into(),
        cluster: Name::parse("c", "east").unwrap(),
        locality: Locality::parse("l", "us-east/us-east-1a").unwrap(),
        labels: Labels::default(),
        xds: xds.parse().unwrap(),
        xds_replicas: Vec::new(),
        tls: Some(controlplane::bootstrap::CertFiles {
            cert: client_files.cert.clone(),
            key: client_files.key.clone(),
            ca: client_files.ca.clone(),
        }),
        delta: false,
        admin: free_addr(),
        outbound: free_addr(),
        transparent: None,
        gateway: None,
    };
    let bootstrap = grpc(&spec);
    assert_eq!(bootstrap["xds_servers"][0]["server_uri"], xds.as_str());
    assert_eq!(
        bootstrap["xds_servers"][0]["channel_creds"][0]["type"],
        "tls"
    );
    // By an address the certificate does not name (127.0.0.1): refused, no answer.
    spec.xds = cp.xds_addr.into();
    let file = dir.path().join("grpc-by-ip.json");
    std::fs::write(&file, serde_json::to_vec(&grpc(&spec)).unwrap()).unwrap();
    let (mut lines, by_ip) = spawn_client(&file, "xds:///echo.default", &[]);
    for _ in 0..2 {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("the client answers within 20 s")
            .unwrap()
            .unwrap();
        assert!(
            line.starts_with("ERR"),
            "a control plane whose certificate does not name 127.0.0.1 was trusted: {line}"
        );
    }
    drop(by_ip);

    let file = dir.path().join("grpc-by-name.json");
    std::fs::write(&file, serde_json::to_vec(&bootstrap).unwrap()).unwrap();
    let (mut lines, _py) = spawn_client(&file, "xds:///echo.default", &[]);
    expect_all(
        &mut lines,
        "A",
        5,
        "answers from A, configured over mTLS by name",
    )
    .await;
    let debug = admin_get(cp.admin_addr, "/debug/config?node=grpc-by-name")
        .await
        .unwrap();
    assert!(debug.contains("\"Grpc\""), "{debug}");
    cp.shutdown().await;
}
