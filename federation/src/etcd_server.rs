//! Runs a local etcd server process (Debian's `etcd-server`): for the lab, and for tests that
//! need a real registry. Stops its process when dropped.

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
}

/// A local single-member etcd server.
pub struct EtcdServer {
    child: Option<Child>,
    data_dir: PathBuf,
    client: SocketAddr,
    peer: SocketAddr,
    log: PathBuf,
    binary: String,
    extra_args: Vec<String>,
}

/// A free TCP port on 127.0.0.1 (bound and released; fine for tests and the lab on loopback).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl EtcdServer {
    /// Start etcd keeping its data in `data_dir`, on free loopback ports.
    pub fn start(data_dir: &Path) -> Result<Self, EtcdServerError> {
        // Hold both listeners while choosing, so the two ports differ.
        let a = TcpListener::bind("127.0.0.1:0")?;
        let b = TcpListener::bind("127.0.0.1:0")?;
        let client = a.local_addr()?;
        let peer = b.local_addr()?;
        drop((a, b));
        Self::start_on(data_dir, client, peer, Vec::new())
    }

    /// Start etcd on the given addresses, with extra command-line arguments.
    pub fn start_on(
        data_dir: &Path,
        client: SocketAddr,
        peer: SocketAddr,
        extra_args: Vec<String>,
    ) -> Result<Self, EtcdServerError> {
        std::fs::create_dir_all(data_dir)?;
        let mut server = Self {
            child: None,
            data_dir: data_dir.to_path_buf(),
            client,
            peer,
            log: data_dir.with_extension("log"),
            binary: std::env::var("STRAIT_ETCD_BIN").unwrap_or_else(|_| "etcd".into()),
            extra_args,
        };
        server.spawn()?;
        server.wait_ready(Duration::from_secs(20))?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<(), EtcdServerError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let log2 = log.try_clone()?;
        let client_url = format!("http://{}", self.client);
        let peer_url = format!("http://{}", self.peer);
        let child = Command::new(&self.binary)
            .args(single_member_args(
                &self.data_dir.join("data"),
                &client_url,
                &client_url,
                &peer_url,
            ))
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

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.client)
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

    /// Poll `/health` until etcd says it is healthy (blocking: call it from a blocking context).
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), EtcdServerError> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if health(self.client) {
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
    [
        "--name",
        "strait",
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
        &format!("strait={peer_url}"),
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
