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
            .arg("--name")
            .arg("strait")
            .arg("--data-dir")
            .arg(self.data_dir.join("data"))
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(format!("strait={peer_url}"))
            .arg("--log-level")
            .arg("warn")
            .arg("--logger")
            .arg("zap")
            // Let clients detect a silently dead connection within a couple of seconds.
            .arg("--grpc-keepalive-min-time")
            .arg("500ms")
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
