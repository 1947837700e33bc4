//! Transparent mode as a pod runs it: `strait proxy run --transparent` in its own network
//! namespace as user 1337, with an iptables `REDIRECT` of every TCP connection of the namespace
//! except the proxy's own (Istio's interception). An application that knows nothing of the
//! mesh connects to plain IP addresses; a real control plane (real etcd) configures the proxy.
//!
//! - HTTP to any address with the `Host` of a mesh service is served by the mesh (the address
//!   itself has no server: without the proxy the connection would be refused);
//! - a connection to a `tcp` service port goes to that service;
//! - HTTP for a host the mesh does not know, and a server-first protocol, pass through to the
//!   original destination unchanged.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::os::unix::fs::PermissionsExt;

use controlplane::config::ControlPlaneConfig;
use controlplane::server::ControlPlane;
use federation::identity::{CertificateAuthority, ExtraNames, SpiffeId};
use testkit::etcd::{EtcdServer, free_port};

const BIN: &str = env!("CARGO_BIN_EXE_strait");
const PROXY_UID: &str = "1337";

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A network namespace joined to this one by a veth pair; removed (with the pair) on drop.
struct Netns {
    name: String,
    host_ip: String,
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "{} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    fn create() -> Self {
        let id = std::process::id() % 10_000;
        let name = format!("strait-tp-{id}");
        let (veth_host, veth_ns) = (format!("stp{id}h"), format!("stp{id}n"));
        let subnet = id % 250 + 1;
        let host_ip = format!("10.231.{subnet}.1");
        let ns_ip = format!("10.231.{subnet}.2");
        // A namespace left over by a crashed run of this test goes first.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let _ = Command::new("ip")
            .args(["link", "del", &veth_host])
            .output();
        sh(&["ip", "netns", "add", &name]);
        let ns = Self {
            name: name.clone(),
            host_ip: host_ip.clone(),
        };
        sh(&[
            "ip", "link", "add", &veth_host, "type", "veth", "peer", "name", &veth_ns,
        ]);
        sh(&["ip", "link", "set", &veth_ns, "netns", &name]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{host_ip}/30"),
            "dev",
            &veth_host,
        ]);
        sh(&["ip", "link", "set", &veth_host, "up"]);
        let exec = |args: &[&str]| {
            let mut all = vec!["ip", "netns", "exec", &name];
            all.extend_from_slice(args);
            sh(&all);
        };
        exec(&["ip", "addr", "add", &format!("{ns_ip}/30"), "dev", &veth_ns]);
        exec(&["ip", "link", "set", &veth_ns, "up"]);
        exec(&["ip", "link", "set", "lo", "up"]);
        // Applications may dial any address (a service VIP, say): route it all out.
        exec(&["ip", "route", "add", "default", "via", &host_ip]);
        // Every TCP connection leaving an application goes to the proxy's transparent port;
        // the proxy's own (user 1337) and loopback ones do not. Set by the injected init
        // container's command, run twice (a restarted init container) without doubling.
        for _ in 0..2 {
            exec(&[
                BIN,
                "proxy",
                "iptables",
                "--uid",
                PROXY_UID,
                "--to-port",
                "15006",
            ]);
        }
        let rules = Command::new("ip")
            .args([
                "netns", "exec", &name, "iptables", "-t", "nat", "-S", "OUTPUT",
            ])
            .output()
            .expect("iptables -S");
        let rules = String::from_utf8_lossy(&rules.stdout);
        assert_eq!(
            rules.matches("-j STRAIT_OUTPUT").count(),
            1,
            "one jump to Strait's chain:\n{rules}"
        );
        ns
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// The application: a Python client in the namespace. `http HOST IP PORT` prints the body of
/// `GET /` with that `Host`; `tcp IP PORT` prints what the server says first.
const CLIENT: &str = r#"
import socket, sys
mode, rest = sys.argv[1], sys.argv[2:]
if mode == "http":
    host, ip, port = rest
    s = socket.create_connection((ip, int(port)), timeout=5)
    s.sendall(f"GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n".encode())
    data = b""
    while True:
        b = s.recv(4096)
        if not b:
            break
        data += b
    print(data.split(b"\r\n\r\n", 1)[1].decode(), end="")
else:
    ip, port = rest
    s = socket.create_connection((ip, int(port)), timeout=5)
    print(s.recv(100).decode().strip(), end="")
"#;

fn app(ns: &Netns, args: &[&str]) -> Result<String, String> {
    let out = ns
        .command("python3")
        .arg("-c")
        .arg(CLIENT)
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(err.lines().last().unwrap_or_default().to_string())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intercepted_connections_are_routed_by_their_original_destination() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ns = Netns::create();
    let host = ns.host_ip.clone();

    // Servers on this side of the veth pair: two mesh services and two outside the mesh.
    let echo = crate::support::server(&format!("{host}:0"), "mesh-http", true).await;
    let db = crate::support::server(&format!("{host}:0"), "mesh-db", false).await;
    let outside_http = crate::support::server(&format!("{host}:0"), "outside-http", true).await;
    let outside_tcp = crate::support::server(&format!("{host}:0"), "outside-tcp", false).await;
    std::fs::write(
        d.join("east.yaml"),
        format!(
            "cluster: east\nregion: us-east\nservices:\n\
             \x20 - name: echo\n    ports: [{{name: http, port: 8080, protocol: http}}]\n    endpoints: [{{address: {host}, port: {}, zone: us-east-1a}}]\n\
             \x20 - name: db\n    ports: [{{name: tcp, port: 5432, protocol: tcp}}]\n    endpoints: [{{address: {host}, port: {}, zone: us-east-1a}}]\n",
            echo.port(),
            db.port()
        ),
    )
    .unwrap();
    // xDS beyond loopback is mTLS: certificates for the control plane and the app's sidecar
    // (readable by user 1337).
    let ca = CertificateAuthority::init("test.strait", Duration::from_secs(86400)).expect("CA");
    let issue = |id: &str, what: &str| {
        let id: SpiffeId = id.parse().expect("SPIFFE id");
        let names = ExtraNames {
            dns: vec![],
            ips: vec![host.parse().expect("ip")],
        };
        ca.issue_with_names(&id, Duration::from_secs(3600), &names)
            .expect("issue")
            .write(d.join(what))
            .expect("write certificate")
    };
    let cp_certs = issue(
        "spiffe://test.strait/cluster/east/ns/strait-system/sa/controlplane",
        "cp",
    );
    let app_certs = issue("spiffe://test.strait/cluster/east/ns/default/sa/app", "app");
    let uid: u32 = PROXY_UID.parse().unwrap();
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    for p in [
        d.join("app"),
        app_certs.cert.clone(),
        app_certs.key.clone(),
        app_certs.ca.clone(),
    ] {
        std::os::unix::fs::chown(&p, Some(uid), Some(uid)).unwrap();
    }
    let etcd = EtcdServer::start(&d.join("etcd")).expect("etcd");
    let xds: SocketAddr = format!("{host}:{}", free_port().unwrap()).parse().unwrap();
    let cp = ControlPlane::start(
        ControlPlaneConfig::parse(
            d.join("cp.yaml"),
            &format!(
                "cluster: east\nregion: us-east\nregistry: {{etcd: [\"{}\"]}}\n\
                 discovery: {{file: {}, poll: 50ms}}\nadmin: {{listen: \"127.0.0.1:0\"}}\n\
                 xds: {{listen: \"{xds}\", tls: {{cert: {}, key: {}, ca: {}}}}}\n",
                etcd.endpoint(),
                d.join("east.yaml").display(),
                cp_certs.cert.display(),
                cp_certs.key.display(),
                cp_certs.ca.display()
            ),
        )
        .expect("control plane config"),
    )
    .await
    .expect("control plane");

    // The sidecar, in the namespace, as user 1337.
    let log = std::fs::File::create(d.join("proxy.log")).unwrap();
    let _proxy = Proc(
        ns.command("setpriv")
            .args([
                &format!("--reuid={PROXY_UID}"),
                &format!("--regid={PROXY_UID}"),
                "--clear-groups",
                BIN,
            ])
            .args(["proxy", "run", "--node-id", "app-1", "--cluster", "east"])
            .args([
                "--locality",
                "us-east/us-east-1a",
                "--xds",
                &xds.to_string(),
            ])
            .args([
                "--outbound",
                "127.0.0.1:15001",
                "--admin",
                "127.0.0.1:15000",
            ])
            .args(["--transparent", "127.0.0.1:15006"])
            .arg("--cert")
            .arg(&app_certs.cert)
            .arg("--key")
            .arg(&app_certs.key)
            .arg("--ca")
            .arg(&app_certs.ca)
            .env("RUST_LOG", "proxy=debug,info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("strait proxy run starts"),
    );
    let log_tail = || {
        let t = std::fs::read_to_string(d.join("proxy.log")).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    };

    // HTTP to an address where nothing listens, for a mesh host: served by the mesh.
    let nowhere = host.clone();
    let start = Instant::now();
    loop {
        match app(&ns, &["http", "echo.default", &nowhere, "8080"]) {
            Ok(b) if b == "mesh-http" => break,
            other if start.elapsed() > Duration::from_secs(30) => panic!(
                "the intercepted request never reached the mesh: {other:?}\nproxy log:\n{}",
                log_tail()
            ),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    for i in 0..5 {
        assert_eq!(
            app(
                &ns,
                &["http", "echo.default.svc.cluster.local", "10.99.0.10", "80"]
            ),
            Ok("mesh-http".to_string()),
            "mesh request {i}"
        );
    }
    // A tcp service port: to that service, whatever the address.
    assert_eq!(
        app(&ns, &["tcp", "10.99.0.11", "5432"]),
        Ok("mesh-db".to_string()),
        "proxy log:\n{}",
        log_tail()
    );
    // Outside the mesh: passed through to the original destination, as if there were no proxy.
    assert_eq!(
        app(
            &ns,
            &[
                "http",
                "example.org",
                &host,
                &outside_http.port().to_string()
            ]
        ),
        Ok("outside-http".to_string()),
        "proxy log:\n{}",
        log_tail()
    );
    assert_eq!(
        app(&ns, &["tcp", &host, &outside_tcp.port().to_string()]),
        Ok("outside-tcp".to_string()),
        "a server-first protocol; proxy log:\n{}",
        log_tail()
    );
    // The interception is real: the mesh address has no server on this side.
    assert!(
        std::net::TcpStream::connect_timeout(
            &format!("{host}:8080").parse().unwrap(),
            Duration::from_secs(2)
        )
        .is_err(),
        "something listens at {host}:8080 outside the namespace"
    );
    cp.shutdown().await;
}
