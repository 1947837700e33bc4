//! Runs local etcd server processes (Debian's `etcd-server`): for the lab, benchmarks and tests
//! that need a real registry — one member or a cluster of several, plaintext or TLS with client
//! certificates ([`EtcdPki`] makes the certificates). Stops its processes when dropped.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why an etcd server could not be run.
#[derive(Debug, thiserror::Error)]
pub enum EtcdServerError {
    #[error(
        "cannot start `{binary}`: {source} (install Debian's etcd-server package; `cargo xtask setup` does)"
    )]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("etcd for {endpoint} exited during start-up; its log is {log}")]
    Exited { endpoint: String, log: String },
    #[error("etcd at {endpoint} did not become healthy within {timeout:?}; its log is {log}")]
    NotReady {
        endpoint: String,
        timeout: Duration,
        log: String,
    },
    #[error("cannot make the etcd certificates: {0}")]
    Pki(String),
}

/// TLS on a member's client port.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// With a CA, clients must present a certificate it signed (`--client-cert-auth`).
    pub client_ca: Option<PathBuf>,
}

/// A local etcd member (one of a cluster, or alone).
pub struct EtcdServer {
    child: Option<Child>,
    name: String,
    data_dir: PathBuf,
    client: SocketAddr,
    peer: SocketAddr,
    metrics: SocketAddr,
    initial_cluster: String,
    tls: Option<ServerTls>,
    log: PathBuf,
    binary: String,
    extra_args: Vec<String>,
}

/// A free TCP port on 127.0.0.1 (bound and released; fine for tests and the lab on loopback).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `n` distinct free loopback addresses (all held while choosing, so they differ).
fn free_addrs(n: usize) -> std::io::Result<Vec<SocketAddr>> {
    let held = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    held.iter().map(|l| l.local_addr()).collect()
}

impl EtcdServer {
    /// Start etcd keeping its data in `data_dir`, on free loopback ports.
    pub fn start(data_dir: &Path) -> Result<Self, EtcdServerError> {
        Self::start_with(data_dir, None, Vec::new())
    }

    /// Start etcd on free loopback ports, with TLS on its client port and extra command-line
    /// arguments (e.g. `--auth-token-ttl`).
    pub fn start_with(
        data_dir: &Path,
        tls: Option<ServerTls>,
        extra_args: Vec<String>,
    ) -> Result<Self, EtcdServerError> {
        let a = free_addrs(2)?;
        let mut server = Self::member(
            "strait",
            data_dir,
            a[0],
            a[1],
            String::new(),
            tls,
            extra_args,
        )?;
        server.spawn()?;
        server.wait_ready(Duration::from_secs(20))?;
        Ok(server)
    }

    /// Start etcd on the given addresses, with extra command-line arguments.
    pub fn start_on(
        data_dir: &Path,
        client: SocketAddr,
        peer: SocketAddr,
        extra_args: Vec<String>,
    ) -> Result<Self, EtcdServerError> {
        let mut server = Self::member(
            "strait",
            data_dir,
            client,
            peer,
            String::new(),
            None,
            extra_args,
        )?;
        server.spawn()?;
        server.wait_ready(Duration::from_secs(20))?;
        Ok(server)
    }

    fn member(
        name: &str,
        data_dir: &Path,
        client: SocketAddr,
        peer: SocketAddr,
        initial_cluster: String,
        tls: Option<ServerTls>,
        extra_args: Vec<String>,
    ) -> Result<Self, EtcdServerError> {
        std::fs::create_dir_all(data_dir)?;
        let metrics = free_addrs(1)?[0];
        let initial_cluster = if initial_cluster.is_empty() {
            format!("{name}=http://{peer}")
        } else {
            initial_cluster
        };
        Ok(Self {
            child: None,
            name: name.to_string(),
            data_dir: data_dir.to_path_buf(),
            client,
            peer,
            metrics,
            initial_cluster,
            tls,
            log: data_dir.with_extension("log"),
            binary: std::env::var("STRAIT_ETCD_BIN").unwrap_or_else(|_| "etcd".into()),
            extra_args,
        })
    }

    fn spawn(&mut self) -> Result<(), EtcdServerError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let log2 = log.try_clone()?;
        let client_url = self.endpoint();
        let peer_url = format!("http://{}", self.peer);
        let mut args = member_args(
            &self.name,
            &self.data_dir.join("data"),
            &client_url,
            &client_url,
            &peer_url,
            &self.initial_cluster,
        );
        args.extend([
            "--listen-metrics-urls".to_string(),
            format!("http://{}", self.metrics),
        ]);
        if let Some(t) = &self.tls {
            args.extend([
                "--cert-file".to_string(),
                t.cert.display().to_string(),
                "--key-file".to_string(),
                t.key.display().to_string(),
            ]);
            if let Some(ca) = &t.client_ca {
                args.extend([
                    "--trusted-ca-file".to_string(),
                    ca.display().to_string(),
                    "--client-cert-auth".to_string(),
                ]);
            }
        }
        let child = Command::new(&self.binary)
            .args(args)
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|source| EtcdServerError::Spawn {
                binary: self.binary.clone(),
                source,
            })?;
        self.child = Some(child);
        Ok(())
    }

    /// `http://127.0.0.1:PORT` (`https://` with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.client)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn client_addr(&self) -> SocketAddr {
        self.client
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Poll `/health` (on the plaintext metrics port) until etcd says it is healthy (blocking:
    /// call it from a blocking context).
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), EtcdServerError> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if health(self.metrics) {
                return Ok(());
            }
            if !self.is_running() {
                return Err(EtcdServerError::Exited {
                    endpoint: self.endpoint(),
                    log: self.log.display().to_string(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(EtcdServerError::NotReady {
            endpoint: self.endpoint(),
            timeout,
            log: self.log.display().to_string(),
        })
    }

    /// Kill the process at once (SIGKILL), keeping the data directory.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again with the same data directory and addresses.
    pub fn restart(&mut self) -> Result<(), EtcdServerError> {
        self.kill();
        self.spawn()?;
        self.wait_ready(Duration::from_secs(20))
    }

    /// Start a member that was killed, without waiting for it to be healthy.
    pub fn respawn(&mut self) -> Result<(), EtcdServerError> {
        self.kill();
        self.spawn()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A local etcd cluster of several members on loopback.
pub struct EtcdCluster {
    pub members: Vec<EtcdServer>,
}

impl EtcdCluster {
    /// Start `n` members (data under `dir/m0`, `dir/m1`, …) and wait until each is healthy.
    /// `extra_args` go to every member (e.g. `--heartbeat-interval`).
    pub fn start(
        dir: &Path,
        n: usize,
        tls: Option<ServerTls>,
        extra_args: Vec<String>,
    ) -> Result<Self, EtcdServerError> {
        let addrs = free_addrs(2 * n)?;
        let initial: Vec<String> = (0..n)
            .map(|i| format!("m{i}=http://{}", addrs[2 * i + 1]))
            .collect();
        let initial = initial.join(",");
        let mut members = Vec::new();
        for i in 0..n {
            let mut m = EtcdServer::member(
                &format!("m{i}"),
                &dir.join(format!("m{i}")),
                addrs[2 * i],
                addrs[2 * i + 1],
                initial.clone(),
                tls.clone(),
                extra_args.clone(),
            )?;
            m.spawn()?;
            members.push(m);
        }
        for m in &mut members {
            m.wait_ready(Duration::from_secs(30))?;
        }
        Ok(Self { members })
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdServer::endpoint).collect()
    }

    /// The index of the member named `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.members.iter().position(|m| m.name == name)
    }
}

fn health(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.contains("\"health\":\"true\"")
}

/// The command-line arguments of a one-member etcd: data in `data_dir`, clients served on
/// `listen_clients` (comma-separated URLs) and told to use `advertise`, the member's peer URL
/// `peer_url`. Logs warnings only; keep-alives as often as every 500 ms are allowed, so that
/// clients detect a silently dead connection within a couple of seconds.
pub fn single_member_args(
    data_dir: &Path,
    listen_clients: &str,
    advertise: &str,
    peer_url: &str,
) -> Vec<String> {
    member_args(
        "strait",
        data_dir,
        listen_clients,
        advertise,
        peer_url,
        &format!("strait={peer_url}"),
    )
}

/// The command line of member `name` of a cluster whose members' peer URLs are
/// `initial_cluster` (`m0=http://…,m1=http://…`); the lab starts its three members with it.
pub fn member_args(
    name: &str,
    data_dir: &Path,
    listen_clients: &str,
    advertise: &str,
    peer_url: &str,
    initial_cluster: &str,
) -> Vec<String> {
    [
        "--name",
        name,
        "--data-dir",
        &data_dir.to_string_lossy(),
        "--listen-client-urls",
        listen_clients,
        "--advertise-client-urls",
        advertise,
        "--listen-peer-urls",
        peer_url,
        "--initial-advertise-peer-urls",
        peer_url,
        "--initial-cluster",
        initial_cluster,
        "--initial-cluster-token",
        "strait",
        "--log-level",
        "warn",
        "--logger",
        "zap",
        "--grpc-keepalive-min-time",
        "500ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Certificates for an etcd with TLS, as an operator's own etcd PKI would make them: a CA, a
/// server certificate for `127.0.0.1`/`localhost`, and client certificates whose common name is
/// the etcd user. Written as PEM files under a directory.
pub struct EtcdPki {
    dir: PathBuf,
    ca_file: PathBuf,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

/// Files of an issued certificate.
#[derive(Debug, Clone)]
pub struct PkiFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl EtcdPki {
    /// A new CA named `name`, written to `dir/ca.pem`.
    pub fn new(dir: &Path, name: &str) -> Result<Self, EtcdServerError> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyUsagePurpose};
        std::fs::create_dir_all(dir)?;
        let ca_key = rcgen::KeyPair::generate().map_err(pki)?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = params.self_signed(&ca_key).map_err(pki)?;
        let ca_file = dir.join(format!("{name}.pem"));
        std::fs::write(&ca_file, ca.pem())?;
        let issuer = rcgen::Issuer::new(params, ca_key);
        Ok(Self {
            dir: dir.to_path_buf(),
            ca_file,
            issuer,
        })
    }

    /// The CA certificate's file.
    pub fn ca_file(&self) -> PathBuf {
        self.ca_file.clone()
    }

    /// A server certificate for `127.0.0.1`, `::1` and `localhost`.
    pub fn server(&self, name: &str) -> Result<ServerTls, EtcdServerError> {
        let f = self.issue(
            name,
            name,
            &[
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ],
            true,
            None,
        )?;
        Ok(ServerTls {
            cert: f.cert,
            key: f.key,
            client_ca: None,
        })
    }

    /// A client certificate whose common name is `user`.
    pub fn client(&self, file_name: &str, user: &str) -> Result<PkiFiles, EtcdServerError> {
        self.issue(
            file_name,
            user,
            &[rcgen::ExtendedKeyUsagePurpose::ClientAuth],
            false,
            None,
        )
    }

    /// A client certificate that expired a day ago.
    pub fn expired_client(&self, file_name: &str, user: &str) -> Result<PkiFiles, EtcdServerError> {
        let now = time::OffsetDateTime::now_utc();
        self.issue(
            file_name,
            user,
            &[rcgen::ExtendedKeyUsagePurpose::ClientAuth],
            false,
            Some((
                now - time::Duration::days(30),
                now - time::Duration::days(1),
            )),
        )
    }

    fn issue(
        &self,
        file_name: &str,
        common_name: &str,
        usages: &[rcgen::ExtendedKeyUsagePurpose],
        server: bool,
        validity: Option<(time::OffsetDateTime, time::OffsetDateTime)>,
    ) -> Result<PkiFiles, EtcdServerError> {
        use rcgen::{CertificateParams, DnType, KeyUsagePurpose, SanType};
        let key = rcgen::KeyPair::generate().map_err(pki)?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = usages.to_vec();
        if server {
            params.subject_alt_names = vec![
                SanType::DnsName("localhost".try_into().map_err(pki)?),
                SanType::IpAddress([127, 0, 0, 1].into()),
                SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()),
            ];
        }
        if let Some((from, to)) = validity {
            params.not_before = from;
            params.not_after = to;
        }
        let cert = params.signed_by(&key, &self.issuer).map_err(pki)?;
        let files = PkiFiles {
            cert: self.dir.join(format!("{file_name}.pem")),
            key: self.dir.join(format!("{file_name}-key.pem")),
        };
        std::fs::write(&files.cert, cert.pem())?;
        write_private(&files.key, &key.serialize_pem())?;
        Ok(files)
    }
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

fn pki(e: impl std::fmt::Display) -> EtcdServerError {
    EtcdServerError::Pki(e.to_string())
}
