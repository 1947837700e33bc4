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
