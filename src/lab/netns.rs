//! Network namespaces for the lab: `ip`/`tc` commands, and TCP sockets made inside a
//! namespace from this process (so the lab's own probes, load generator and admin queries reach
//! components that live in namespaces without spawning a process per request).
//!
//! A socket belongs to the network namespace of the thread that created it, whatever thread
//! uses it afterwards. Each namespace gets one dedicated thread that enters it (`setns`) once and
//! then creates sockets on request; no other thread of the process changes namespace.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock, mpsc};

use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::oneshot;

/// Run `program args…`; an error carries the command line and its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("`{program} {}`: cannot run: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `ip ARGS…`.
pub fn ip(args: &[&str]) -> Result<String, String> {
    run("ip", args)
}

/// `ip -n NS ARGS…`.
pub fn ip_in(ns: &str, args: &[&str]) -> Result<String, String> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// `tc -n NS ARGS…`.
pub fn tc_in(ns: &str, args: &[&str]) -> Result<String, String> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    run("tc", &all)
}

/// Names of the existing network namespaces.
pub fn list() -> Vec<String> {
    ip(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// PIDs of the processes in namespace `ns`.
pub fn pids(ns: &str) -> Vec<u32> {
    ip(&["netns", "pids", ns])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Move the calling thread into network namespace `ns` (`""`: stay). Sockets it creates from
/// then on belong to `ns`; other threads of the process are not affected.
pub fn enter(ns: &str) -> io::Result<()> {
    if ns.is_empty() {
        return Ok(());
    }
    std::fs::File::open(format!("/var/run/netns/{ns}"))
        .and_then(|f| {
            rustix::thread::move_into_link_name_space(
                f.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .map_err(io::Error::from)
        })
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot enter network namespace {ns}: {e}"),
            )
        })
}

type Request = oneshot::Sender<io::Result<std::net::TcpStream>>;

/// One thread per namespace that makes sockets in it. `""` is this process's own namespace.
struct Maker {
    tx: Mutex<mpsc::Sender<(SocketAddr, Request)>>,
}

fn makers() -> &'static Mutex<HashMap<String, Arc<Maker>>> {
    static MAKERS: OnceLock<Mutex<HashMap<String, Arc<Maker>>>> = OnceLock::new();
    MAKERS.get_or_init(|| Mutex::new(HashMap::new()))
}

fn maker(ns: &str) -> io::Result<Arc<Maker>> {
    let mut all = makers().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(m) = all.get(ns) {
        return Ok(m.clone());
    }
    let (tx, rx) = mpsc::channel::<(SocketAddr, Request)>();
    let (ready_tx, ready_rx) = mpsc::channel::<io::Result<()>>();
    let name = ns.to_string();
    std::thread::Builder::new()
        .name(format!("netns-{ns}"))
        .spawn(move || {
            if let Err(e) = enter(&name) {
                let _ = ready_tx.send(Err(e));
                return;
            }
            let _ = ready_tx.send(Ok(()));
            while let Ok((addr, reply)) = rx.recv() {
                let domain = socket2::Domain::for_address(addr);
                let made = socket2::Socket::new(domain, socket2::Type::STREAM, None)
                    .and_then(|s| s.set_nonblocking(true).map(|()| s))
                    .map(std::net::TcpStream::from);
                let _ = reply.send(made);
            }
        })?;
    ready_rx
        .recv()
        .map_err(|_| io::Error::other("the namespace thread ended"))??;
    let m = Arc::new(Maker { tx: Mutex::new(tx) });
    all.insert(ns.to_string(), m.clone());
    Ok(m)
}

/// Connect to `addr` from inside network namespace `ns` (`""`: this process's own).
pub async fn connect(ns: &str, addr: SocketAddr) -> io::Result<TcpStream> {
    let m = maker(ns)?;
    let (tx, rx) = oneshot::channel();
    m.tx.lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((addr, tx))
        .map_err(|_| io::Error::other("the namespace thread ended"))?;
    let std_socket = rx
        .await
        .map_err(|_| io::Error::other("the namespace thread ended"))??;
    let socket = TcpSocket::from_std_stream(std_socket);
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}
