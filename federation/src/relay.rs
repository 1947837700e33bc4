//! A user-space TCP relay that can cut a path (close every connection through it and refuse new
//! ones) and heal it: the loopback lab's stand-in for a network link, and the tests' way to
//! partition one client from etcd.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

struct State {
    up: AtomicBool,
    /// Bumped on every cut: connections opened before it close.
    generation: watch::Sender<u64>,
}

/// A TCP relay from a local address to a target.
pub struct TcpRelay {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.task.abort();
        self.state.up.store(false, Ordering::SeqCst);
        self.state.generation.send_modify(|g| *g += 1);
    }
}

impl TcpRelay {
    /// Listen on a free loopback port and relay to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), target).await
    }

    /// Listen on `listen` and relay to `target`.
    pub async fn start_on(listen: SocketAddr, target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (generation, _) = watch::channel(0u64);
        let state = Arc::new(State {
            up: AtomicBool::new(true),
            generation,
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let inbound = match listener.accept().await {
                    Ok((s, _)) => s,
                    Err(e) => {
                        // E.g. out of file descriptors: back off instead of spinning.
                        tracing::warn!(error = %e, "relay accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Subscribe before checking `up`, so a cut between the two still closes it.
                let mut gen_rx = st.generation.subscribe();
                if !st.up.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (mut a, mut b) = (inbound, outbound);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                        _ = gen_rx.changed() => {}
                    }
                });
            }
        });
        Ok(Self { addr, state, task })
    }

    /// The relay's listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Close every connection (reset, as a crashed peer would) and refuse new ones. A silent
    /// black hole is what the UDP relays of the gateway tests model.
    pub fn cut(&self) {
        self.state.up.store(false, Ordering::SeqCst);
        self.state.generation.send_modify(|g| *g += 1);
    }

    /// Accept connections again.
    pub fn heal(&self) {
        self.state.up.store(true, Ordering::SeqCst);
    }

    pub fn is_up(&self) -> bool {
        self.state.up.load(Ordering::SeqCst)
    }
}

/// Faults a [`UdpRelay`] applies to both directions.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Faults {
    /// Drop everything, silently.
    pub blackhole: bool,
    /// Drop each datagram with this probability (0..=1).
    pub loss: f64,
    /// Hold each datagram this long …
    pub delay: std::time::Duration,
    /// … ± up to this much (uniform; datagrams may be reordered).
    pub jitter: std::time::Duration,
}

/// Datagrams forwarded and dropped, per direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    pub forwarded_to_target: u64,
    pub forwarded_to_client: u64,
    pub dropped: u64,
}

struct UdpState {
    faults: std::sync::Mutex<Faults>,
    client: std::sync::Mutex<Option<SocketAddr>>,
    to_target: std::sync::atomic::AtomicU64,
    to_client: std::sync::atomic::AtomicU64,
    dropped: std::sync::atomic::AtomicU64,
}

/// A user-space UDP relay between one client (the latest source seen on the listening socket)
/// and a fixed target, applying [`Faults`]: the gateway tests' and the loopback lab's stand-in
/// for an inter-cluster link that can be cut, made lossy or slow.
pub struct UdpRelay {
    addr: SocketAddr,
    state: Arc<UdpState>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl UdpRelay {
    /// Listen on a free loopback port and relay to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), target).await
    }

    pub async fn start_on(listen: SocketAddr, target: SocketAddr) -> std::io::Result<Self> {
        let front = Arc::new(tokio::net::UdpSocket::bind(listen).await?);
        let back_bind = if target.is_ipv4() {
            SocketAddr::from(([127, 0, 0, 1], 0))
        } else {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0))
        };
        let back = Arc::new(tokio::net::UdpSocket::bind(back_bind).await?);
        let addr = front.local_addr()?;
        let state = Arc::new(UdpState {
            faults: std::sync::Mutex::new(Faults::default()),
            client: std::sync::Mutex::new(None),
            to_target: Default::default(),
            to_client: Default::default(),
            dropped: Default::default(),
        });
        let forward_out = {
            let (front, back, state) = (front.clone(), back.clone(), state.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65_535];
                loop {
                    let (n, from) = match front.recv_from(&mut buf).await {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::debug!(error = %e, "udp relay receive failed");
                            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                            continue;
                        }
                    };
                    if let Ok(mut c) = state.client.lock() {
                        *c = Some(from);
                    }
                    send_with_faults(&state, &back, buf[..n].to_vec(), target, true);
                }
            })
        };
        let forward_back = {
            let (front, back, state) = (front.clone(), back.clone(), state.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65_535];
                loop {
                    let (n, _) = match back.recv_from(&mut buf).await {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::debug!(error = %e, "udp relay receive failed");
                            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                            continue;
                        }
                    };
                    let client = state.client.lock().ok().and_then(|c| *c);
                    if let Some(client) = client {
                        send_with_faults(&state, &front, buf[..n].to_vec(), client, false);
                    }
                }
            })
        };
        Ok(Self {
            addr,
            state,
            tasks: vec![forward_out, forward_back],
        })
    }

    /// The relay's listening address (what the client sends to).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set_faults(&self, faults: Faults) {
        if let Ok(mut f) = self.state.faults.lock() {
            *f = faults;
        }
    }

    pub fn faults(&self) -> Faults {
        self.state.faults.lock().map(|f| *f).unwrap_or_default()
    }

    pub fn stats(&self) -> RelayStats {
        use std::sync::atomic::Ordering::Relaxed;
        RelayStats {
            forwarded_to_target: self.state.to_target.load(Relaxed),
            forwarded_to_client: self.state.to_client.load(Relaxed),
            dropped: self.state.dropped.load(Relaxed),
        }
    }
}

fn send_with_faults(
    state: &Arc<UdpState>,
    socket: &Arc<tokio::net::UdpSocket>,
    data: Vec<u8>,
    to: SocketAddr,
    outbound: bool,
) {
    use rand::Rng;
    use std::sync::atomic::Ordering::Relaxed;
    let f = state.faults.lock().map(|f| *f).unwrap_or_default();
    if f.blackhole || (f.loss > 0.0 && rand::rng().random::<f64>() < f.loss) {
        state.dropped.fetch_add(1, Relaxed);
        return;
    }
    let counter = if outbound {
        &state.to_target
    } else {
        &state.to_client
    };
    counter.fetch_add(1, Relaxed);
    if f.delay.is_zero() && f.jitter.is_zero() {
        let _ = socket.try_send_to(&data, to);
        return;
    }
    let jitter = if f.jitter.is_zero() {
        0i128
    } else {
        let j = f.jitter.as_micros() as i128;
        rand::rng().random_range(-j..=j)
    };
    let delay =
        std::time::Duration::from_micros((f.delay.as_micros() as i128 + jitter).max(0) as u64);
    let socket = socket.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let _ = socket.send_to(&data, to).await;
    });
}
