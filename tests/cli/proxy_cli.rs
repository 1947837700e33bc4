//! `strait proxy run` as an operator runs it: a real process fed by a real control plane (with
//! a real etcd) serves HTTP on its outbound listener, reports ready on its admin port only once
//! configured, shows its clusters and config, and exits cleanly on SIGTERM.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use controlplane::config::ControlPlaneConfig;
use controlplane::server::ControlPlane;
use testkit::etcd::{EtcdServer, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_strait");

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn addr() -> SocketAddr {
    format!("127.0.0.1:{}", free_port().expect("a free port"))
        .parse()
        .expect("addr")
}

/// One HTTP/1.1 GET: (status, body).
async fn get(to: SocketAddr, host: &str, path: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect(to).await.map_err(|e| e.to_string())?;
    let req = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out).to_string();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or(format!("bad response {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or(format!("bad status line {head:?}"))?;
    Ok((status, body.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strait_proxy_run_serves_what_the_control_plane_says() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The service: a backend answering "hello".
    let be = crate::support::server("127.0.0.1:0", "hello", true).await;
    std::fs::write(
        d.join("east.yaml"),
        format!(
            "cluster: east\nregion: us-east\nservices:\n  - name: echo\n    ports: [{{name: http, port: 8080, protocol: http}}]\n    endpoints:\n      - {{address: 127.0.0.1, port: {}, zone: us-east-1a}}\n",
            be.port()
        ),
    )
    .unwrap();
    let etcd = EtcdServer::start(&d.join("etcd")).expect("etcd");
    let xds = addr();

    // The proxy first: not ready while there is no control plane.
    let (outbound, admin) = (addr(), addr());
    let mut proxy = Proc(
        Command::new(BIN)
            .args(["proxy", "run", "--node-id", "app-1", "--cluster", "east"])
            .args(["--locality", "us-east/us-east-1a", "--label", "version=v1"])
            .args([
                "--xds",
                &xds.to_string(),
                "--outbound",
                &outbound.to_string(),
            ])
            .args(["--admin", &admin.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("strait proxy run starts"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let not_ready = loop {
        match get(admin, "admin", "/ready").await {
            Ok(r) => break r,
            Err(e) if Instant::now() > deadline => panic!("admin never answered: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    assert_eq!(not_ready.0, 503, "{not_ready:?}");
    assert!(not_ready.1.contains("not ready"), "{not_ready:?}");

    // Then the control plane.
    let cp = ControlPlane::start(
        ControlPlaneConfig::parse(
            d.join("cp.yaml"),
            &format!(
                "cluster: east\nregion: us-east\nregistry: {{etcd: [\"{}\"]}}\n\
                 discovery: {{file: {}, poll: 50ms}}\nxds: {{listen: \"{xds}\"}}\nadmin: {{listen: \"127.0.0.1:0\"}}\n",
                etcd.endpoint(),
                d.join("east.yaml").display()
            ),
        )
        .expect("config"),
    )
    .await
    .expect("control plane");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match get(admin, "admin", "/ready").await {
            Ok((200, _)) => break,
            other if Instant::now() > deadline => panic!("never ready: {other:?}"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    // Traffic, by the service's names.
    for host in ["echo.default", "echo.default.svc.cluster.local:8080"] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match get(outbound, host, "/").await {
                Ok((200, body)) => {
                    assert_eq!(body, "hello");
                    break;
                }
                other if Instant::now() > deadline => panic!("{host}: {other:?}"),
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
    // What it holds, as an operator sees it.
    let (_, clusters) = get(admin, "admin", "/clusters").await.unwrap();
    assert!(
        clusters.contains(&format!("echo.default:8080::{be}::priority=0::locality=us-east/us-east-1a::health=healthy::ejected=false")),
        "{clusters}"
    );
    let (_, dump) = get(admin, "admin", "/config_dump").await.unwrap();
    let dump: serde_json::Value = serde_json::from_str(&dump).expect("config_dump is JSON");
    assert_eq!(dump["clusters"][0]["name"], "echo.default:8080", "{dump}");
    assert!(
        dump["versions"]["routes"]["strait_outbound"].is_string(),
        "{dump}"
    );
    let (_, metrics) = get(admin, "admin", "/metrics").await.unwrap();
    assert!(
        metrics.contains("strait_proxy_xds_connected 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("strait_proxy_xds_nacks_total 0"),
        "{metrics}"
    );

    // SIGTERM (what Kubernetes sends): a clean exit.
    let kill = Command::new("kill")
        .args(["-TERM", &proxy.0.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(kill.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = proxy.0.try_wait().expect("try_wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy did not stop within 10 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit after SIGTERM: {status}");
    cp.shutdown().await;
}

#[test]
fn strait_proxy_run_refuses_a_certificate_of_another_cluster_and_a_gateway_without_one() {
    use federation::identity::{CertificateAuthority, SpiffeId};
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = CertificateAuthority::init("test.strait", Duration::from_secs(86400)).expect("CA");
    let id: SpiffeId = "spiffe://test.strait/cluster/west/ns/default/sa/app"
        .parse()
        .expect("id");
    let paths = ca
        .issue(&id, Duration::from_secs(3600))
        .expect("issue")
        .write(dir.path().join("west-app"))
        .expect("write");
    let run = |extra: &[&str]| {
        Command::new(BIN)
            .args(["proxy", "run", "--node-id", "app-1", "--cluster", "east"])
            .args(["--locality", "us-east/us-east-1a"])
            .args([
                "--outbound",
                &addr().to_string(),
                "--admin",
                &addr().to_string(),
            ])
            .args(extra)
            .output()
            .expect("strait runs")
    };
    let out = run(&[
        "--cert",
        &paths.cert.display().to_string(),
        "--key",
        &paths.key.display().to_string(),
        "--ca",
        &paths.ca.display().to_string(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a west certificate for an east proxy"
    );
    assert!(
        err.contains(&paths.cert.display().to_string())
            && err.contains("workload of cluster west, not east"),
        "{err}"
    );
    let out = run(&["--gateway", "127.0.0.1:15008"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "--gateway without a certificate");
    assert!(err.contains("--cert"), "{err}");
}
