//! Shared fixtures for the control plane's end-to-end tests: a real etcd, the control plane
//! in-process, HTTP backends that answer with their name, a real Envoy, bounded waits.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use controlplane::config::ControlPlaneConfig;
use controlplane::server::ControlPlane;
use federation::discovery::DiscoveryFile;
use federation::registry::codec::cluster_state_kvs;
use federation::registry::etcd::{EtcdBackend, EtcdOptions};
use federation::registry::{Backend, Op};
use testkit::etcd::EtcdServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub fn install_crypto() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

pub fn envoy_binary() -> PathBuf {
    let p = std::env::var_os("STRAIT_ENVOY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/envoy"));
    assert!(
        p.exists(),
        "Envoy 1.40 not found at {} (set STRAIT_ENVOY, or run `cargo xtask setup`)",
        p.display()
    );
    p
}

pub fn python() -> PathBuf {
    let p = std::env::var_os("STRAIT_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"));
    assert!(
        p.exists(),
        "the venv's python (with grpcio) not found at {} (set STRAIT_PYTHON, or run `cargo xtask setup`)",
        p.display()
    );
    p
}

pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], testkit::etcd::free_port().unwrap()))
}

/// A real etcd and a client of it.
pub struct Registry {
    pub etcd: EtcdServer,
    pub backend: Backend,
}

impl Registry {
    pub async fn start(dir: &Path) -> Self {
        let etcd = EtcdServer::start(&dir.join("etcd")).expect("etcd starts");
        let backend = Backend::Etcd(
            EtcdBackend::connect(&[etcd.endpoint()], EtcdOptions::default())
                .await
                .expect("etcd client connects"),
        );
        Self { etcd, backend }
    }

    /// Write a cluster's discovery file (YAML) into the registry as its publisher would; keys of
    /// the cluster that the file no longer has are deleted.
    pub async fn publish(&self, yaml: &str) {
        let file = DiscoveryFile::parse("test.yaml", yaml).expect("test discovery file parses");
        let kvs = cluster_state_kvs(&file.state);
        let prefix = federation::registry::RegistryKey::endpoints_prefix(&file.state.cluster.id);
        let (_, old) = self.backend.get_prefix(&prefix).await.expect("read");
        let mut ops: Vec<Op> = old
            .into_iter()
            .filter(|kv| !kvs.contains_key(&kv.key))
            .map(|kv| Op::Delete { key: kv.key })
            .collect();
        ops.extend(kvs.into_iter().map(|(key, value)| Op::Put {
            key,
            value,
            lease: None,
        }));
        for batch in federation::registry::publisher::batches(ops, 128, 1 << 20) {
            self.backend.commit(batch).await.expect("commit");
        }
    }

    pub async fn put(&self, key: String, value: Vec<u8>) {
        self.backend
            .commit(vec![Op::Put {
                key,
                value,
                lease: None,
            }])
            .await
            .expect("commit");
    }
}

pub fn config(cluster: &str, region: &str, etcd: &str) -> ControlPlaneConfig {
    ControlPlaneConfig::parse(
        "cp.yaml",
        &format!(
            "cluster: {cluster}\nregion: {region}\nregistry: {{etcd: [\"{etcd}\"]}}\n\
             xds: {{listen: \"127.0.0.1:0\"}}\nadmin: {{listen: \"127.0.0.1:0\"}}\n"
        ),
    )
    .expect("test config parses")
}

pub async fn start_cp(reg: &Registry, cluster: &str, region: &str) -> ControlPlane {
    start_cp_with(reg, config(cluster, region, &reg.etcd.endpoint())).await
}

/// The control plane of cluster east (us-east) publishing the discovery file `file`, read
/// every `poll` (e.g. `50ms`).
pub async fn start_cp_discovery(reg: &Registry, file: &Path, poll: &str) -> ControlPlane {
    let cfg = ControlPlaneConfig::parse(
        file.with_extension("cp.yaml"),
        &format!(
            "cluster: east\nregion: us-east\nregistry: {{etcd: [\"{}\"]}}\n\
             discovery: {{file: {}, poll: {poll}}}\nxds: {{listen: \"127.0.0.1:0\"}}\nadmin: {{listen: \"127.0.0.1:0\"}}\n",
            reg.etcd.endpoint(),
            file.display()
        ),
    )
    .expect("control plane config");
    start_cp_with(reg, cfg).await
}

pub async fn start_cp_with(reg: &Registry, cfg: ControlPlaneConfig) -> ControlPlane {
    ControlPlane::start_with(cfg, reg.backend.clone())
        .await
        .expect("controlplane starts")
}

/// An HTTP/1.1 server answering every request with `name`. Aborting the task kills it whole:
/// its kept-alive connections close too (they live in the task's `JoinSet`).
pub async fn http_backend(name: &'static str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    http_backend_at("127.0.0.1:0".parse().unwrap(), name).await
}

/// [`http_backend`] on `addr` (to bring one back on the address it had).
pub async fn http_backend_at(
    addr: SocketAddr,
    name: &'static str,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind(addr).await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            while conns.try_join_next().is_some() {}
            conns.spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut have = Vec::new();
                loop {
                    let n = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    have.extend_from_slice(&buf[..n]);
                    while let Some(end) = have.windows(4).position(|w| w == b"\r\n\r\n") {
                        have.drain(..end + 4);
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n\r\n{name}",
                            name.len()
                        );
                        if s.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, task)
}

/// GET / with `Host: host` through `proxy`; the status and body.
pub async fn get(proxy: SocketAddr, host: &str) -> Result<(u16, String), String> {
    request(proxy, host, "/", &[]).await
}

/// GET `path` with `Host: host` and `headers` through `proxy` (`connection: close`); the status
/// and body.
pub async fn request(
    proxy: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String), String> {
    let fut = async {
        let mut s = TcpStream::connect(proxy).await.map_err(|e| e.to_string())?;
        let mut req = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out).into_owned();
        let status: u16 = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("not an HTTP response: {text:?}"))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| format!("{host}{path}: no answer within 10 s"))?
}

/// Poll `f` until it returns `Some`, at most `within`; panics with `what` and the last value.
pub async fn wait_for<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        let last = match f().await {
            Ok(v) => return v,
            Err(e) => e,
        };
        if start.elapsed() > within {
            panic!("timed out after {within:?} waiting for {what}; last: {last}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A real Envoy process, killed on drop.
pub struct Envoy {
    pub child: Child,
    pub admin: SocketAddr,
    pub outbound: SocketAddr,
    pub log: PathBuf,
}

impl Envoy {
    pub fn start(
        dir: &Path,
        name: &str,
        bootstrap: &serde_json::Value,
        admin: SocketAddr,
        outbound: SocketAddr,
    ) -> Self {
        let cfg = dir.join(format!("{name}.json"));
        std::fs::write(&cfg, serde_json::to_vec_pretty(bootstrap).unwrap()).unwrap();
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(envoy_binary())
            .arg("-c")
            .arg(&cfg)
            .args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "-l",
                &std::env::var("STRAIT_ENVOY_LOG").unwrap_or_else(|_| "info".into()),
            ])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("envoy starts");
        Self {
            child,
            admin,
            outbound,
            log,
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Envoy's stats matching `filter` (admin `/stats?filter=`), as (name, value).
    pub async fn stats(&self, filter: &str) -> Vec<(String, u64)> {
        let text = admin_get(self.admin, &format!("/stats?filter={filter}"))
            .await
            .unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(": ")?;
                Some((k.to_string(), v.trim().parse().ok()?))
            })
            .collect()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET `path` from an admin endpoint; the body.
pub async fn admin_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let fut = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").ok_or("no response")?;
        if !head.starts_with("HTTP/1.1 200") {
            return Err(format!("{head}\n{body}"));
        }
        // Chunked bodies (Envoy's admin): strip the chunk framing.
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            let mut rest = body;
            let mut plain = String::new();
            while let Some((size, after)) = rest.split_once("\r\n") {
                let n = usize::from_str_radix(size.trim(), 16).map_err(|e| e.to_string())?;
                if n == 0 {
                    break;
                }
                plain.push_str(&after[..n.min(after.len())]);
                rest = after.get(n + 2..).unwrap_or("");
            }
            return Ok(plain);
        }
        Ok(body.to_string())
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| "admin request timed out".to_string())?
}

/// The metric `name` (no labels, or with the exact label set `labels`) from Prometheus text.
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(name_and_labels)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The grpcio test script (`tests/py/grpc_echo.py`).
pub fn grpc_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../controlplane/tests/py/grpc_echo.py")
}

/// A Python child process, killed when dropped.
pub struct Py(pub tokio::process::Child);

impl Drop for Py {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

/// A grpcio echo server answering with `name`, ready.
pub async fn grpc_server(name: &str) -> (SocketAddr, Py) {
    use tokio::io::AsyncBufReadExt;
    let addr = free_addr();
    let mut child = tokio::process::Command::new(python())
        .arg(grpc_script())
        .args(["serve", name, &addr.port().to_string()])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python starts");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("gRPC server ready within 20 s");
    assert_eq!(first.ok().flatten().as_deref(), Some("ready"));
    (addr, Py(child))
}

/// The trust domain of the cross-cluster fixtures.
pub const TD: &str = "test.strait";

/// Issue `id` (valid for localhost and 127.0.0.1) and write it under `dir/what`.
pub fn issue(
    ca: &federation::identity::CertificateAuthority,
    dir: &Path,
    id: &str,
    what: &str,
) -> federation::identity::IssuedPaths {
    let id: federation::identity::SpiffeId = id.parse().expect("valid SPIFFE id");
    let names = federation::identity::ExtraNames {
        dns: vec!["localhost".into()],
        ips: vec!["127.0.0.1".parse().expect("ip")],
    };
    ca.issue_with_names(&id, Duration::from_secs(3600), &names)
        .expect("issue")
        .write(dir.join(what))
        .expect("write certificate")
}

/// A discovery file of `cluster` with service `echo` (HTTP, 8080) and at most one endpoint.
pub fn discovery_yaml(cluster: &str, region: &str, zone: &str, ep: Option<SocketAddr>) -> String {
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

/// A gateway of `cluster` on loopback, serving `discovery`, with one static peer.
pub fn gateway_config(
    dir: &Path,
    cluster: &str,
    certs: &federation::identity::IssuedPaths,
    discovery: &Path,
    peer: (&str, SocketAddr),
) -> gateway::config::GatewayConfig {
    gateway_config_with_replicas(dir, cluster, certs, discovery, peer, &[])
}

/// [`gateway_config`] with the addresses of the peer's other gateway replicas.
pub fn gateway_config_with_replicas(
    dir: &Path,
    cluster: &str,
    certs: &federation::identity::IssuedPaths,
    discovery: &Path,
    peer: (&str, SocketAddr),
    replicas: &[SocketAddr],
) -> gateway::config::GatewayConfig {
    let replicas: Vec<String> = replicas.iter().map(|r| format!("\"{r}\"")).collect();
    let yaml = format!(
        "cluster: {cluster}\nlisten: {{peers: \"127.0.0.1:0\", ingress: \"127.0.0.1:0\", admin: \"127.0.0.1:0\"}}\n\
         tls: {{cert: {}, key: {}, ca: {}}}\ndiscovery: {{file: {}}}\n\
         peers:\n  - {{cluster: {}, address: \"{}\", replicas: [{}]}}\n",
        certs.cert.display(),
        certs.key.display(),
        certs.ca.display(),
        discovery.display(),
        peer.0,
        peer.1,
        replicas.join(", ")
    );
    gateway::config::GatewayConfig::parse(dir.join(format!("{cluster}-gw.yaml")), &yaml)
        .unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

/// West's and east's gateways, each serving its discovery file; west dials east over QUIC and
/// the link is up when this returns.
pub async fn linked_gateways(
    d: &Path,
    west: (&federation::identity::IssuedPaths, &Path),
    east: (&federation::identity::IssuedPaths, &Path),
) -> (gateway::Gateway, gateway::Gateway) {
    let east_gw = gateway::Gateway::start(east_gateway_config(d, east.0, east.1))
        .await
        .expect("east gateway starts");
    let west_gw = gateway::Gateway::start(gateway_config(
        d,
        "west",
        west.0,
        west.1,
        ("east", east_gw.peer_addr),
    ))
    .await
    .expect("west gateway starts");
    wait_link_up(&west_gw, "east", "the west → east link to come up").await;
    (west_gw, east_gw)
}

/// East's gateway of [`linked_gateways`]: west dials it (west's replicas told apart by address).
pub fn east_gateway_config(
    d: &Path,
    certs: &federation::identity::IssuedPaths,
    discovery: &Path,
) -> gateway::config::GatewayConfig {
    gateway_config_with_replicas(
        d,
        "east",
        certs,
        discovery,
        ("west", "127.0.0.1:9".parse().unwrap()),
        &["127.0.0.1:10".parse().unwrap()],
    )
}

/// Wait (20 s at most) until `gw`'s link to `peer` is up.
pub async fn wait_link_up(gw: &gateway::Gateway, peer: &str, what: &str) {
    wait_for(Duration::from_secs(20), what, || async {
        match gw.links().into_iter().find(|l| l.cluster == peer) {
            Some(l) if l.state == "up" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

/// West's control plane (us-west) on the registry, serving xDS over mTLS with `certs`, reaching
/// other clusters through the gateway ingress `gateway` if given.
pub fn west_cp_config(
    d: &Path,
    reg: &Registry,
    certs: &federation::identity::IssuedPaths,
    gateway: Option<SocketAddr>,
) -> ControlPlaneConfig {
    let gateway = gateway
        .map(|g| format!("gateway: {{ingress: \"{g}\"}}\n"))
        .unwrap_or_default();
    ControlPlaneConfig::parse(
        d.join("west-cp.yaml"),
        &format!(
            "cluster: west\nregion: us-west\nregistry: {{etcd: [\"{}\"]}}\n\
             xds: {{listen: \"127.0.0.1:0\", tls: {{cert: {}, key: {}, ca: {}}}}}\n\
             {gateway}admin: {{listen: \"127.0.0.1:0\"}}\n",
            reg.etcd.endpoint(),
            certs.cert.display(),
            certs.key.display(),
            certs.ca.display(),
        ),
    )
    .expect("control plane config")
}

/// Two clusters linked across gateways: service `echo` in west (us-west) and in east
/// (us-east), each endpoint answering with its cluster's name; east's gateway serves east's
/// endpoint; west's gateway dials east's over QUIC (the link is up); west's control plane
/// serves xDS over mTLS and reaches remote clusters through west's gateway. `app` is a
/// workload certificate of west.
pub struct Linked {
    pub reg: Registry,
    pub west_gw: gateway::Gateway,
    pub east_gw: gateway::Gateway,
    pub cp: ControlPlane,
    pub app: federation::identity::IssuedPaths,
    /// West's gateway certificate and discovery file (for another replica of west's gateway).
    pub west_gw_certs: federation::identity::IssuedPaths,
    pub west_disc: std::path::PathBuf,
    pub west_ep: SocketAddr,
    /// West's endpoint: abort it to kill it.
    pub west_task: tokio::task::JoinHandle<()>,
    /// East's endpoint (answering `east`): abort it to kill it.
    pub east_task: tokio::task::JoinHandle<()>,
    /// East's gateway certificate and discovery file (to start east's gateway again).
    pub east_gw_certs: federation::identity::IssuedPaths,
    pub east_disc: std::path::PathBuf,
}

impl Linked {
    pub async fn start(d: &Path) -> Self {
        let ca = federation::identity::CertificateAuthority::init(TD, Duration::from_secs(86400))
            .expect("CA");
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
        let app = issue(
            &ca,
            d,
            &format!("spiffe://{TD}/cluster/west/ns/default/sa/app"),
            "west-app",
        );
        let (west_ep, west_task) = http_backend("west").await;
        let (east_ep, east_task) = http_backend("east").await;
        let reg = Registry::start(d).await;
        reg.publish(&Self::west_yaml(Some(west_ep))).await;
        let east_yaml = discovery_yaml("east", "us-east", "us-east-1a", Some(east_ep));
        reg.publish(&east_yaml).await;
        let east_disc = d.join("east-discovery.yaml");
        std::fs::write(&east_disc, &east_yaml).unwrap();
        let west_disc = d.join("west-discovery.yaml");
        std::fs::write(&west_disc, Self::west_yaml(Some(west_ep))).unwrap();
        let (west_gw, east_gw) = linked_gateways(
            d,
            (&west_gw_certs, &west_disc),
            (&east_gw_certs, &east_disc),
        )
        .await;
        let cp = start_cp_with(
            &reg,
            west_cp_config(d, &reg, &cp_certs, Some(west_gw.ingress_addr)),
        )
        .await;
        Self {
            reg,
            west_gw,
            east_gw,
            cp,
            app,
            west_gw_certs,
            west_disc,
            west_ep,
            west_task,
            east_task,
            east_gw_certs,
            east_disc,
        }
    }

    /// West's discovery file, with or without its endpoint.
    pub fn west_yaml(ep: Option<SocketAddr>) -> String {
        discovery_yaml("west", "us-west", "us-west-1a", ep)
    }

    /// A stock Envoy in west (`name`, us-west/us-west-1a) with the workload certificate, fed by
    /// west's control plane over mutual-TLS delta ADS, tunnelling to other clusters through
    /// west's gateway.
    pub fn west_envoy(&self, d: &Path, name: &str) -> Envoy {
        use controlplane::bootstrap::{BootstrapSpec, CertFiles, envoy};
        use federation::model::{Labels, Locality, Name};
        let admin = free_addr();
        let outbound = free_addr();
        let spec = BootstrapSpec {
            node_id: name.into(),
            cluster: Name::parse("c", "west").unwrap(),
            locality: Locality::parse("l", "us-west/us-west-1a").unwrap(),
            labels: Labels::default(),
            xds: self.cp.xds_addr.into(),
            xds_replicas: Vec::new(),
            tls: Some(CertFiles {
                cert: self.app.cert.clone(),
                key: self.app.key.clone(),
                ca: self.app.ca.clone(),
            }),
            delta: true,
            admin,
            outbound,
            transparent: None,
            gateway: Some((
                vec![self.west_gw.ingress_addr],
                format!("spiffe://{TD}/cluster/west/gateway"),
            )),
        };
        Envoy::start(d, name, &envoy(&spec), admin, outbound)
    }

    pub async fn shutdown(self) {
        self.cp.shutdown().await;
        self.west_gw.shutdown().await;
        self.east_gw.shutdown().await;
    }
}
