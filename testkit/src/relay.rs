//! User-space relays: the loopback lab's stand-ins for network links, and the tests' way to cut,
//! degrade and heal a path.
//!
//! # `TcpRelay`
//!
//! A TCP relay that can cut a path (close every connection through it and refuse new ones) and
//! heal it: the tests' way to partition one client from etcd, and the loopback lab's path from a
//! cluster to etcd. It can also delay what it carries ([`TcpRelay::set_delay`]): every chunk
//! read is written on no sooner than `delay` later, in order, so a delay adds latency without
//! reordering bytes. At most 256 chunks (of up to 64 KiB) are held per direction: beyond that
//! the relay stops reading, and backpressure reaches the sender. Loss cannot be modelled on a
//! byte stream (TCP would hide it as delay), so this relay has none.
//!
//! # `UdpRelay`
//!
//! A UDP relay with fault injection, for the QUIC links between gateways. It listens on one
//! socket (the client side) and forwards every datagram to a fixed target from a second socket
//! (the target side, bound to an ephemeral port on the loopback address, or on the unspecified
//! address when the target is not a loopback address). Datagrams from the target go back to the
//! client: the latest source address seen on the listening socket (one client at a time).
//! Datagrams reaching the target-side socket from anyone but the target are ignored. From the
//! target's point of view the client *is* the target-side socket
//! ([`UdpRelay::outbound_addr`]).
//!
//! [`UdpRelay::between`] makes a relay with two fixed ends instead, as a wire between two hosts
//! would be: the client-side socket and the target-side socket are both bound to given
//! addresses, datagrams are taken only from the fixed client (on the first) and the fixed
//! target (on the second), and either end may speak first. Each end sees the other at a stable
//! address — the target sees the client at the target-side socket's — so two peers that dial
//! each other through it recognise each other's connections (the loopback lab's gateways).
//!
//! [`Faults`] apply to both directions and can be changed at any time:
//!
//! - `blackhole`: every datagram is dropped silently (no ICMP-like signal, nothing), including
//!   the ones held back by a delay: a path cut now loses what is still on the wire.
//! - `loss`: each datagram is dropped with this probability.
//! - `delay` ± `jitter`: each datagram is held for `delay` plus a uniform offset in
//!   `[-jitter, +jitter]` (never below zero). Held datagrams are released by the forwarding task
//!   itself (a timer queue), so a delay never blocks forwarding; with jitter they may be
//!   reordered. At most 64 MiB per direction is held; beyond that datagrams are dropped.
//!
//! Healing is `set_faults(Faults::default())`. [`UdpRelay::stats`] counts the datagrams forwarded
//! and dropped (by the faults, for lack of a client, or on a send error) in each direction.
//! Datagrams up to 65,535 bytes pass. Network errors are logged at debug level and never stop the
//! relay. Dropping the relay stops its tasks and closes its sockets.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

struct State {
    up: AtomicBool,
    /// The delay added to every chunk, in microseconds.
    delay_us: AtomicU64,
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
            delay_us: AtomicU64::new(0),
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
                let st = st.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (a_read, a_write) = inbound.into_split();
                    let (b_read, b_write) = outbound.into_split();
                    tokio::select! {
                        _ = async {
                            tokio::join!(
                                delayed_copy(a_read, b_write, &st),
                                delayed_copy(b_read, a_write, &st),
                            )
                        } => {}
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

    /// Delay every chunk by `delay` from now on, both ways (zero: none).
    pub fn set_delay(&self, delay: Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.state.delay_us.store(us, Ordering::SeqCst);
    }

    pub fn delay(&self) -> Duration {
        Duration::from_micros(self.state.delay_us.load(Ordering::SeqCst))
    }
}

/// The chunks a TCP relay holds per direction while delaying them.
const HELD_CHUNKS: usize = 256;

/// Copy `from` to `to`, each chunk no sooner than the relay's delay after it was read; EOF is
/// passed on (half-close) once everything before it is written.
async fn delayed_copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: &State,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, Vec<u8>)>(HELD_CHUNKS);
    let read = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let delay = Duration::from_micros(state.delay_us.load(Ordering::Relaxed));
            if tx
                .send((Instant::now() + delay, buf[..n].to_vec()))
                .await
                .is_err()
            {
                return;
            }
        }
    };
    let write = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}

/// The largest datagram the UDP relay carries.
const MAX_DATAGRAM: usize = 65_535;

/// The most bytes held back by a delay, per direction.
const MAX_HELD_BYTES: usize = 64 << 20;

/// The pause after a repeated receive error, so a persistent error cannot spin the CPU.
const ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// The faults a [`UdpRelay`] injects, in both directions. The default is a healthy path.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Faults {
    /// Drop every datagram silently.
    pub blackhole: bool,
    /// The probability (0..=1) of dropping each datagram.
    pub loss: f64,
    /// How long to hold each datagram.
    pub delay: Duration,
    /// A uniform random offset in `[-jitter, +jitter]` added to `delay` (never below zero).
    pub jitter: Duration,
}

/// What a [`UdpRelay`] did with the datagrams it received.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Datagrams from the client sent on to the target.
    pub forwarded_to_target: u64,
    /// Datagrams from the client dropped.
    pub dropped_to_target: u64,
    /// Datagrams from the target sent on to the client.
    pub forwarded_to_client: u64,
    /// Datagrams from the target dropped (including those that arrived before any client).
    pub dropped_to_client: u64,
}

/// Which way a datagram goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    ToTarget,
    ToClient,
}

struct UdpState {
    faults: Mutex<Faults>,
    client: Mutex<Option<SocketAddr>>,
    /// The client is fixed ([`UdpRelay::between`]): datagrams from anyone else are ignored.
    fixed_client: bool,
    forwarded_to_target: AtomicU64,
    dropped_to_target: AtomicU64,
    forwarded_to_client: AtomicU64,
    dropped_to_client: AtomicU64,
}

impl UdpState {
    fn faults(&self) -> Faults {
        *self.faults.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn client(&self) -> Option<SocketAddr> {
        *self.client.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_client(&self, addr: SocketAddr) {
        let mut c = self.client.lock().unwrap_or_else(|p| p.into_inner());
        if *c != Some(addr) {
            tracing::debug!(client = %addr, previous = ?*c, "udp relay: client address");
            *c = Some(addr);
        }
    }

    fn forwarded(&self, dir: Direction) {
        match dir {
            Direction::ToTarget => &self.forwarded_to_target,
            Direction::ToClient => &self.forwarded_to_client,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    fn dropped(&self, dir: Direction) {
        match dir {
            Direction::ToTarget => &self.dropped_to_target,
            Direction::ToClient => &self.dropped_to_client,
        }
        .fetch_add(1, Ordering::Relaxed);
    }
}

/// A UDP relay between one client and a fixed target, with injectable faults (see the module
/// documentation).
pub struct UdpRelay {
    addr: SocketAddr,
    outbound_addr: SocketAddr,
    target: SocketAddr,
    state: Arc<UdpState>,
    tasks: [JoinHandle<()>; 2],
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

    /// Listen on `listen` and relay to `target`.
    pub async fn start_on(listen: SocketAddr, target: SocketAddr) -> std::io::Result<Self> {
        let outbound_ip = match target.ip() {
            IpAddr::V4(ip) if ip.is_loopback() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(ip) if ip.is_loopback() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        Self::open(listen, SocketAddr::new(outbound_ip, 0), target, None).await
    }

    /// A relay with two fixed ends: `client` reaches `target` by sending to `listen`, and
    /// `target` reaches `client` by sending to `outbound` (where it sees the client's datagrams
    /// come from). Datagrams from anyone else are ignored.
    pub async fn between(
        listen: SocketAddr,
        client: SocketAddr,
        outbound: SocketAddr,
        target: SocketAddr,
    ) -> std::io::Result<Self> {
        Self::open(listen, outbound, target, Some(client)).await
    }

    async fn open(
        listen: SocketAddr,
        outbound: SocketAddr,
        target: SocketAddr,
        client: Option<SocketAddr>,
    ) -> std::io::Result<Self> {
        let inbound = Arc::new(UdpSocket::bind(listen).await?);
        let addr = inbound.local_addr()?;
        let outbound = Arc::new(UdpSocket::bind(outbound).await?);
        let outbound_addr = outbound.local_addr()?;
        let state = Arc::new(UdpState {
            faults: Mutex::new(Faults::default()),
            client: Mutex::new(client),
            fixed_client: client.is_some(),
            forwarded_to_target: AtomicU64::new(0),
            dropped_to_target: AtomicU64::new(0),
            forwarded_to_client: AtomicU64::new(0),
            dropped_to_client: AtomicU64::new(0),
        });
        let up = tokio::spawn(pump(
            state.clone(),
            Direction::ToTarget,
            inbound.clone(),
            outbound.clone(),
            target,
        ));
        let down = tokio::spawn(pump(
            state.clone(),
            Direction::ToClient,
            outbound,
            inbound,
            target,
        ));
        tracing::debug!(listen = %addr, via = %outbound_addr, %target, "udp relay started");
        Ok(Self {
            addr,
            outbound_addr,
            target,
            state,
            tasks: [up, down],
        })
    }

    /// The listening (client-side) address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The target-side socket's address: where the target sees the client's datagrams come from.
    pub fn outbound_addr(&self) -> SocketAddr {
        self.outbound_addr
    }

    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// The client: the latest source address seen on the listening socket.
    pub fn client(&self) -> Option<SocketAddr> {
        self.state.client()
    }

    /// Replace the faults (both directions, from the next datagram on).
    pub fn set_faults(&self, faults: Faults) {
        *self.state.faults.lock().unwrap_or_else(|p| p.into_inner()) = faults;
        tracing::debug!(relay = %self.addr, ?faults, "udp relay faults");
    }

    pub fn faults(&self) -> Faults {
        self.state.faults()
    }

    pub fn stats(&self) -> RelayStats {
        let s = &self.state;
        RelayStats {
            forwarded_to_target: s.forwarded_to_target.load(Ordering::Relaxed),
            dropped_to_target: s.dropped_to_target.load(Ordering::Relaxed),
            forwarded_to_client: s.forwarded_to_client.load(Ordering::Relaxed),
            dropped_to_client: s.dropped_to_client.load(Ordering::Relaxed),
        }
    }
}

/// What happens to one datagram.
enum Fate {
    Drop,
    Now,
    At(Instant),
}

fn fate(f: &Faults) -> Fate {
    if f.blackhole || (f.loss > 0.0 && rand::random::<f64>() < f.loss) {
        return Fate::Drop;
    }
    if f.delay.is_zero() && f.jitter.is_zero() {
        return Fate::Now;
    }
    let jitter = f.jitter.as_secs_f64() * (rand::random::<f64>() * 2.0 - 1.0);
    let hold = (f.delay.as_secs_f64() + jitter).max(0.0);
    match Duration::try_from_secs_f64(hold)
        .ok()
        .and_then(|d| Instant::now().checked_add(d))
    {
        Some(at) => Fate::At(at),
        // A delay beyond the end of time: as good as lost.
        None => Fate::Drop,
    }
}

/// A datagram held back: when it is due, a tie-breaker (arrival order), where it goes, what it is.
type HeldDatagram = (Instant, u64, SocketAddr, Vec<u8>);

/// Datagrams held back by a delay, earliest first.
#[derive(Default)]
struct Held {
    queue: BinaryHeap<Reverse<HeldDatagram>>,
    bytes: usize,
    next_id: u64,
}

impl Held {
    fn next_due(&self) -> Option<Instant> {
        self.queue.peek().map(|Reverse((at, ..))| *at)
    }

    fn push(&mut self, at: Instant, dest: SocketAddr, data: &[u8]) -> bool {
        if self.bytes + data.len() > MAX_HELD_BYTES {
            return false;
        }
        self.bytes += data.len();
        self.next_id += 1;
        self.queue
            .push(Reverse((at, self.next_id, dest, data.to_vec())));
        true
    }

    fn pop_due(&mut self, now: Instant) -> Option<(SocketAddr, Vec<u8>)> {
        if self.next_due()? > now {
            return None;
        }
        let Reverse((_, _, dest, data)) = self.queue.pop()?;
        self.bytes = self.bytes.saturating_sub(data.len());
        Some((dest, data))
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Forward datagrams one way: received on `from`, sent from `to`.
async fn pump(
    state: Arc<UdpState>,
    dir: Direction,
    from: Arc<UdpSocket>,
    to: Arc<UdpSocket>,
    target: SocketAddr,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    let mut held = Held::default();
    let mut errors = 0u32;
    loop {
        tokio::select! {
            r = from.recv_from(&mut buf) => match r {
                Ok((n, source)) => {
                    errors = 0;
                    let dest = match dir {
                        Direction::ToTarget if state.fixed_client && state.client() != Some(source) => {
                            tracing::debug!(%source, "udp relay: ignoring a datagram from a stranger");
                            continue;
                        }
                        Direction::ToTarget => {
                            state.set_client(source);
                            Some(target)
                        }
                        Direction::ToClient if source != target => {
                            tracing::debug!(%source, "udp relay: ignoring a datagram from a stranger");
                            continue;
                        }
                        Direction::ToClient => state.client(),
                    };
                    let Some(dest) = dest else {
                        tracing::debug!("udp relay: no client yet, dropping a datagram from the target");
                        state.dropped(dir);
                        continue;
                    };
                    let data = buf.get(..n).unwrap_or(&[]);
                    match fate(&state.faults()) {
                        Fate::Drop => state.dropped(dir),
                        Fate::Now => send(&state, dir, &to, dest, data).await,
                        Fate::At(at) => {
                            if !held.push(at, dest, data) {
                                tracing::debug!(?dir, "udp relay: too much held back, dropping");
                                state.dropped(dir);
                            }
                        }
                    }
                }
                Err(e) => {
                    errors = errors.saturating_add(1);
                    tracing::debug!(?dir, error = %e, "udp relay: receive failed");
                    if errors > 1 {
                        tokio::time::sleep(ERROR_BACKOFF).await;
                    }
                }
            },
            () = sleep_until(held.next_due()) => {
                let now = Instant::now();
                while let Some((dest, data)) = held.pop_due(now) {
                    // A blackhole set meanwhile also swallows what is still on the wire.
                    if state.faults().blackhole {
                        state.dropped(dir);
                    } else {
                        send(&state, dir, &to, dest, &data).await;
                    }
                }
            }
        }
    }
}

async fn send(state: &UdpState, dir: Direction, socket: &UdpSocket, dest: SocketAddr, data: &[u8]) {
    match socket.send_to(data, dest).await {
        Ok(_) => state.forwarded(dir),
        Err(e) => {
            tracing::debug!(?dir, %dest, error = %e, "udp relay: send failed");
            state.dropped(dir);
        }
    }
}

#[cfg(test)]
#[path = "relay/tcp_tests.rs"]
mod tcp_tests;
#[cfg(test)]
#[path = "relay/udp_tests.rs"]
mod udp_tests;
