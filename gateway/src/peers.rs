//! Peer links: a QUIC connection to each gateway replica of every peer cluster (one per replica:
//! no duplicates when both sides dial), probes and link health per replica, the link to a
//! cluster up while any replica's is, inbound tunnels, and opening outbound tunnels on the
//! replicas that are up.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use federation::backoff::Backoff;
use federation::model::{LinkHealth, Name, ServiceKey};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::Shared;
use crate::config::LinkConfig;
use crate::health::{LinkTracker, ProbeKind, decode_probe, encode_probe};
use crate::protocol::{StatusCode, TunnelHeader, TunnelStatus, read_frame, write_frame};

/// QUIC application close codes.
pub const CLOSE_DUPLICATE: u32 = 1;
pub const CLOSE_LINK_DOWN: u32 = 2;
pub const CLOSE_SHUTDOWN: u32 = 3;

/// One connection to a peer and who dialed it.
#[derive(Clone)]
pub struct PeerConn {
    pub conn: quinn::Connection,
    pub dialer: Name,
}

/// What is known about one link, for the admin endpoint and the registry.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkView {
    pub state: LinkHealth,
    pub rtt_ms: f64,
    pub loss: f64,
    pub since: SystemTime,
    pub connected: bool,
    /// Every remote gateway replica this gateway is connected to or dials.
    pub replicas: Vec<ReplicaView>,
}

/// One remote gateway replica as `/links` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReplicaView {
    /// The address dialed, or the one the replica's connection came from (`single` when the
    /// peer has one gateway address: every connection is to that gateway).
    pub address: String,
    pub state: String,
    pub rtt_ms: f64,
    pub connected: bool,
    /// It said it is shutting down: new tunnels go to the other replicas.
    #[serde(default)]
    pub leaving: bool,
}

/// The slot of a peer with one gateway address (or none known): any connection is to it.
const SINGLE: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// One remote gateway replica: its connection and the health of the link to it.
struct Replica {
    current: Option<PeerConn>,
    tracker: LinkTracker,
    /// Its current connection said it is shutting down: no new tunnels while another will do.
    leaving: bool,
}

/// One peer cluster: a connection to each of its gateway replicas this gateway can reach. The
/// link to the cluster is up while the link to any replica is; tunnels go to the replicas whose
/// links are up.
pub struct Peer {
    pub cluster: Name,
    pub link: LinkConfig,
    /// By remote replica: the address dialed (or accepted from); [`SINGLE`] for a peer with one
    /// gateway address.
    replicas: Mutex<BTreeMap<SocketAddr, Replica>>,
    /// Spreads new tunnels over the replicas that are up.
    next: AtomicUsize,
    pub addresses: watch::Sender<Vec<SocketAddr>>,
    /// What `addresses` is resolved from (static peer list or the cluster's registry record).
    pub targets: watch::Sender<Vec<federation::model::GatewayAddress>>,
    pub view: watch::Sender<LinkView>,
    /// Wakes the dialers (connection lost, addresses changed).
    pub wake: tokio::sync::Notify,
}

impl Peer {
    pub fn new(cluster: Name, link: LinkConfig) -> Self {
        Self {
            cluster,
            link,
            replicas: Mutex::new(BTreeMap::new()),
            next: AtomicUsize::new(0),
            addresses: watch::channel(Vec::new()).0,
            targets: watch::channel(Vec::new()).0,
            view: watch::channel(LinkView {
                state: LinkHealth::Down,
                rtt_ms: 0.0,
                loss: 0.0,
                since: SystemTime::now(),
                connected: false,
                replicas: Vec::new(),
            })
            .0,
            wake: tokio::sync::Notify::new(),
        }
    }

    fn replicas(&self) -> std::sync::MutexGuard<'_, BTreeMap<SocketAddr, Replica>> {
        self.replicas.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The slot of a connection to (or from) `addr`: the address itself when the peer has
    /// several gateway addresses, [`SINGLE`] when it has one (or none known).
    fn slot_of(&self, addr: SocketAddr) -> SocketAddr {
        let addrs = self.addresses.borrow();
        if addrs.len() > 1 { addr } else { SINGLE }
    }

    /// The live connection of one slot.
    fn slot_connection(&self, slot: SocketAddr) -> Option<quinn::Connection> {
        self.replicas()
            .get(&slot)
            .and_then(|r| r.current.as_ref())
            .filter(|c| c.conn.close_reason().is_none())
            .map(|c| c.conn.clone())
    }

    /// Any live connection to the peer (the link is connected).
    pub fn connection(&self) -> Option<quinn::Connection> {
        self.replicas()
            .values()
            .filter_map(|r| r.current.as_ref())
            .find(|c| c.conn.close_reason().is_none())
            .map(|c| c.conn.clone())
    }

    /// The connection a new tunnel takes: one to a replica whose link is up (degraded only if
    /// none is), preferring replicas that answered the last probes; turn by turn among equals.
    /// `Err(true)` when the link is down, `Err(false)` when there is no connection at all.
    fn pick(&self) -> Result<quinn::Connection, bool> {
        let now = Instant::now();
        let reps = self.replicas();
        let rank = |r: &Replica| {
            // A replica that said it is leaving, or silent for two probe intervals (probably
            // going away): others first.
            let silent = r.tracker.silent_for(now) > self.link.probe_interval * 2;
            (r.leaving || silent, r.tracker.state())
        };
        let live: Vec<(&Replica, (bool, LinkHealth))> = reps
            .values()
            .filter(|r| {
                r.current
                    .as_ref()
                    .is_some_and(|c| c.conn.close_reason().is_none())
            })
            .map(|r| (r, rank(r)))
            .collect();
        if live.is_empty() {
            let down = reps.values().all(|r| r.tracker.state() == LinkHealth::Down);
            return Err(down);
        }
        let Some(best) = live
            .iter()
            .map(|(_, k)| *k)
            .filter(|k| k.1 != LinkHealth::Down)
            .min()
        else {
            return Err(true);
        };
        let equals: Vec<&Replica> = live
            .iter()
            .filter(|(_, k)| *k == best)
            .map(|(r, _)| *r)
            .collect();
        let i = self.next.fetch_add(1, Relaxed) % equals.len().max(1);
        equals
            .get(i)
            .and_then(|r| r.current.as_ref())
            .map(|c| c.conn.clone())
            .ok_or(true)
    }

    fn refresh_view(&self, shared: &Shared) {
        let (state, rtt_ms, loss, connected, replicas) = {
            let reps = self.replicas();
            let state = best_state(reps.values().map(|r| r.tracker.state()));
            // RTT and loss of the best replica with that state.
            let best = reps
                .values()
                .filter(|r| r.tracker.state() == state)
                .min_by(|a, b| a.tracker.rtt_ms().total_cmp(&b.tracker.rtt_ms()));
            let (rtt, loss) = best.map_or((0.0, 0.0), |r| (r.tracker.rtt_ms(), r.tracker.loss()));
            let connected = reps.values().any(|r| r.tracker.is_connected());
            let replicas = reps
                .iter()
                .map(|(addr, r)| ReplicaView {
                    address: if *addr == SINGLE {
                        "single".to_string()
                    } else {
                        addr.to_string()
                    },
                    state: r.tracker.state().as_str().to_string(),
                    rtt_ms: (r.tracker.rtt_ms() * 1000.0).round() / 1000.0,
                    connected: r.tracker.is_connected(),
                    leaving: r.leaving,
                })
                .collect();
            (state, rtt, loss, connected, replicas)
        };
        let changed_state = self.view.borrow().state != state;
        self.view.send_if_modified(|v| {
            let since = if v.state == state {
                v.since
            } else {
                SystemTime::now()
            };
            let new = LinkView {
                state,
                rtt_ms,
                loss,
                since,
                connected,
                replicas,
            };
            if *v != new {
                *v = new;
                true
            } else {
                false
            }
        });
        if changed_state {
            shared.links_changed.notify_one();
            if state == LinkHealth::Up {
                shared.note_linked();
            }
        }
    }
}

/// The link to a cluster: the best of its replicas' (down with none).
fn best_state(states: impl Iterator<Item = LinkHealth>) -> LinkHealth {
    states.min().unwrap_or(LinkHealth::Down)
}

/// Install a new connection to one of `peer`'s replicas (`slot`), keeping exactly one per
/// replica: when both sides dialed, the connection dialed by the smaller cluster id wins on
/// both ends.
pub fn install(
    shared: &Arc<Shared>,
    peer: &Arc<Peer>,
    conn: quinn::Connection,
    dialer: Name,
    slot: SocketAddr,
) {
    let preferred = if shared.own < peer.cluster {
        shared.own.clone()
    } else {
        peer.cluster.clone()
    };
    {
        let mut reps = peer.replicas();
        let rep = reps.entry(slot).or_insert_with(|| Replica {
            current: None,
            tracker: LinkTracker::new(peer.link.health(), Instant::now()),
            leaving: false,
        });
        if let Some(existing) = rep.current.as_ref()
            && existing.conn.close_reason().is_none()
        {
            if existing.dialer == preferred && dialer != preferred {
                tracing::debug!(peer = %peer.cluster, "closing a duplicate connection");
                conn.close(quinn::VarInt::from_u32(CLOSE_DUPLICATE), b"duplicate");
                return;
            }
            existing
                .conn
                .close(quinn::VarInt::from_u32(CLOSE_DUPLICATE), b"duplicate");
        }
        rep.current = Some(PeerConn {
            conn: conn.clone(),
            dialer,
        });
        rep.leaving = false;
        rep.tracker.on_connected(Instant::now());
    }
    peer.refresh_view(shared);
    tracing::info!(peer = %peer.cluster, remote = %conn.remote_address(), "peer connected");
    let (shared, peer) = (shared.clone(), peer.clone());
    tokio::spawn(async move { run_connection(shared, peer, conn, slot).await });
}

/// The replica in `slot`, if `conn` is its current connection.
fn current_of<'a>(
    reps: &'a mut BTreeMap<SocketAddr, Replica>,
    slot: SocketAddr,
    conn: &quinn::Connection,
) -> Option<&'a mut Replica> {
    reps.get_mut(&slot).filter(|r| {
        r.current
            .as_ref()
            .is_some_and(|c| c.conn.stable_id() == conn.stable_id())
    })
}

/// Probes, inbound streams and health for one connection, until it closes.
async fn run_connection(
    shared: Arc<Shared>,
    peer: Arc<Peer>,
    conn: quinn::Connection,
    slot: SocketAddr,
) {
    // The tracker of this connection's replica, while this connection is its current one.
    let with_tracker =
        |peer: &Peer, conn: &quinn::Connection, f: &mut dyn FnMut(&mut LinkTracker)| {
            let mut reps = peer.replicas();
            current_of(&mut reps, slot, conn)
                .map(|r| f(&mut r.tracker))
                .is_some()
        };
    let probes = {
        let (conn, peer, shared) = (conn.clone(), peer.clone(), shared.clone());
        async move {
            loop {
                match conn.read_datagram().await {
                    Ok(d) => match decode_probe(&d) {
                        Ok((ProbeKind::Ping, seq)) => {
                            let _ = conn.send_datagram(Bytes::copy_from_slice(&encode_probe(
                                ProbeKind::Pong,
                                seq,
                            )));
                        }
                        Ok((ProbeKind::Pong, seq)) => {
                            with_tracker(&peer, &conn, &mut |t| t.on_reply(seq, Instant::now()));
                        }
                        Ok((ProbeKind::Leaving, _)) => {
                            let mut reps = peer.replicas();
                            if let Some(r) = current_of(&mut reps, slot, &conn)
                                && !r.leaving
                            {
                                r.leaving = true;
                                tracing::info!(peer = %peer.cluster, remote = %conn.remote_address(),
                                    "a gateway replica of the peer is shutting down: new tunnels go to its others");
                                drop(reps);
                                peer.refresh_view(&shared);
                            }
                        }
                        Err(e) => {
                            tracing::debug!(peer = %peer.cluster, error = %e, "ignoring a bad datagram")
                        }
                    },
                    Err(_) => return,
                }
            }
        }
    };
    let ticker = {
        let (conn, peer, shared) = (conn.clone(), peer.clone(), shared.clone());
        async move {
            let mut tick = tokio::time::interval(peer.link.probe_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let now = Instant::now();
                let mut seq = None;
                let mut transition = None;
                let current = with_tracker(&peer, &conn, &mut |t| {
                    transition = t.evaluate(now);
                    seq = Some(t.next_probe(now));
                });
                if !current {
                    // Replaced by another connection to the same replica.
                    return;
                }
                if let Some(seq) = seq {
                    let _ = conn
                        .send_datagram(Bytes::copy_from_slice(&encode_probe(ProbeKind::Ping, seq)));
                }
                if shared.shutdown.is_triggered() {
                    // Said again every probe interval while draining: a datagram may be lost.
                    let _ = conn.send_datagram(Bytes::copy_from_slice(&encode_probe(
                        ProbeKind::Leaving,
                        0,
                    )));
                }
                if let Some(tr) = transition {
                    tracing::info!(peer = %peer.cluster, remote = %conn.remote_address(), from = %tr.from, to = %tr.to, reason = %tr.reason, "link state changed");
                    peer.refresh_view(&shared);
                    if tr.to == LinkHealth::Down {
                        // Fail every tunnel on this link now rather than letting them hang.
                        conn.close(quinn::VarInt::from_u32(CLOSE_LINK_DOWN), b"link down");
                        return;
                    }
                } else {
                    peer.refresh_view(&shared);
                }
            }
        }
    };
    let inbound = {
        let (conn, peer, shared) = (conn.clone(), peer.clone(), shared.clone());
        async move {
            loop {
                match conn.accept_bi().await {
                    Ok((send, recv)) => {
                        shared.metrics.inbound_streams_total.fetch_add(1, Relaxed);
                        let busy = shared.in_flight.enter();
                        let (shared, peer) = (shared.clone(), peer.clone());
                        tokio::spawn(async move {
                            handle_inbound(shared, peer, send, recv).await;
                            drop(busy);
                        });
                    }
                    Err(_) => return,
                }
            }
        }
    };
    tokio::select! {
        _ = probes => {}
        _ = ticker => {}
        _ = inbound => {}
        _ = conn.closed() => {}
    }
    let reason = conn.closed().await;
    let lost = {
        let mut reps = peer.replicas();
        let mut lost = None;
        if let Some(r) = current_of(&mut reps, slot, &conn) {
            r.current = None;
            lost = Some(r.tracker.on_disconnected(Instant::now()));
            // A replica this gateway does not dial (it came from an address not in the peer's
            // list) is forgotten with its connection.
            if slot != SINGLE && !peer.addresses.borrow().contains(&slot) {
                reps.remove(&slot);
            }
        }
        lost
    };
    if let Some(tr) = lost {
        if let Some(tr) = tr {
            tracing::warn!(peer = %peer.cluster, remote = %conn.remote_address(), from = %tr.from, reason = %reason, "link to a gateway replica down: connection lost");
        }
        peer.refresh_view(&shared);
        peer.wake.notify_waiters();
    }
}

/// Keep a connection to every gateway address of `peer`: one dialer per address, started and
/// stopped as the addresses change.
pub async fn dial_loop(shared: Arc<Shared>, peer: Arc<Peer>) {
    let mut addrs_rx = peer.addresses.subscribe();
    let mut dialers: HashMap<SocketAddr, tokio::task::JoinHandle<()>> = HashMap::new();
    loop {
        let addrs = addrs_rx.borrow_and_update().clone();
        dialers.retain(|a, h| {
            let keep = addrs.contains(a);
            if !keep {
                h.abort();
            }
            keep
        });
        for a in addrs {
            dialers
                .entry(a)
                .or_insert_with(|| tokio::spawn(dial_replica(shared.clone(), peer.clone(), a)));
        }
        // Slots of addresses the peer no longer has, and nothing connected: forgotten.
        peer.replicas()
            .retain(|slot, r| *slot == SINGLE || dialers.contains_key(slot) || r.current.is_some());
        peer.refresh_view(&shared);
        tokio::select! {
            r = addrs_rx.changed() => if r.is_err() { break },
            _ = shared.shutdown.cancelled() => break,
        }
    }
    for h in dialers.values() {
        h.abort();
    }
}

/// Keep dialing one gateway address of `peer` while its replica has no connection.
async fn dial_replica(shared: Arc<Shared>, peer: Arc<Peer>, addr: SocketAddr) {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        let slot = peer.slot_of(addr);
        if let Some(conn) = peer.slot_connection(slot) {
            tokio::select! {
                _ = conn.closed() => {}
                _ = shared.shutdown.cancelled() => return,
            }
            continue;
        }
        match dial(&shared, &peer, addr).await {
            Ok(conn) => {
                install(&shared, &peer, conn, shared.own.clone(), slot);
                backoff.reset();
                continue;
            }
            Err(e) => {
                tracing::debug!(peer = %peer.cluster, %addr, error = %e, "dial failed");
                if let Some(reason) = e.reason() {
                    shared
                        .metrics
                        .count("strait_gateway_dial_failures_total", reason);
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = peer.wake.notified() => {}
            _ = shared.shutdown.cancelled() => return,
        }
    }
}

/// The `reason` label of a failed peer handshake, from quinn's typed error; `None` when this
/// gateway's own verifier refused the peer's certificate (a certificate alert): it counted the
/// typed reason already through [`crate::tls::OnReject`], since quinn keeps only the TLS alert
/// of a rustls error (and every identity refusal is `certificate_unknown`).
pub(crate) fn handshake_reason(e: &quinn::ConnectionError) -> Option<&'static str> {
    use quinn::ConnectionError as E;
    use rustls::AlertDescription as A;
    // TLS alerts travel as QUIC CRYPTO_ERROR codes 0x100..=0x1ff (RFC 9001, section 4.8).
    let alert = |code: quinn::TransportErrorCode| {
        u64::from(code)
            .checked_sub(0x100)
            .and_then(|a| u8::try_from(a).ok())
            .map(A::from)
    };
    Some(match e {
        E::TimedOut => "timeout",
        E::TransportError(t) => match alert(t.code) {
            Some(
                A::BadCertificate
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::CertificateUnknown
                | A::UnknownCA
                | A::AccessDenied
                | A::DecryptError
                | A::BadCertificateStatusResponse,
            ) => return None,
            Some(A::CertificateRequired) => "no_certificate",
            Some(A::NoApplicationProtocol) => "alpn",
            Some(_) => "tls",
            None => "protocol",
        },
        E::ConnectionClosed(c) if alert(c.error_code).is_some() => "rejected_by_peer",
        E::ConnectionClosed(_) | E::ApplicationClosed(_) => "closed_by_peer",
        E::Reset => "reset",
        E::VersionMismatch => "version_mismatch",
        E::LocallyClosed | E::CidsExhausted => "other",
    })
}

/// Why dialling a peer gateway failed.
#[derive(Debug, thiserror::Error)]
enum DialError {
    #[error("TLS state poisoned")]
    Poisoned,
    #[error(transparent)]
    Connect(#[from] quinn::ConnectError),
    #[error("handshake with {0} timed out")]
    Timeout(SocketAddr),
    #[error(transparent)]
    Handshake(#[from] quinn::ConnectionError),
    #[error("{0}")]
    Identity(String),
    #[error("{addr} is the gateway of `{found}`, not `{expected}`")]
    WrongPeer {
        addr: SocketAddr,
        found: String,
        expected: Name,
    },
}

impl DialError {
    /// The `reason` label of `strait_gateway_dial_failures_total`; `None` when the verifier
    /// counted it (see [`handshake_reason`]).
    fn reason(&self) -> Option<&'static str> {
        match self {
            Self::Poisoned | Self::Connect(_) => Some("other"),
            Self::Timeout(_) => Some("timeout"),
            Self::Handshake(e) => handshake_reason(e),
            Self::Identity(_) => Some("bad_identity"),
            Self::WrongPeer { .. } => Some("wrong_peer"),
        }
    }
}

async fn dial(
    shared: &Arc<Shared>,
    peer: &Arc<Peer>,
    addr: SocketAddr,
) -> Result<quinn::Connection, DialError> {
    let config = shared
        .quic_client
        .read()
        .map_err(|_| DialError::Poisoned)?
        .clone();
    let connecting = shared
        .endpoint
        .connect_with(config, addr, peer.cluster.as_str())?;
    let timeout = peer.link.idle_timeout.max(Duration::from_secs(1));
    let conn = tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| DialError::Timeout(addr))??;
    // The verifier accepted a member gateway; it must be the one we meant to reach.
    let who = peer_cluster(&conn).map_err(DialError::Identity)?;
    if who != peer.cluster.as_str() {
        conn.close(quinn::VarInt::from_u32(CLOSE_DUPLICATE), b"unexpected peer");
        return Err(DialError::WrongPeer {
            addr,
            found: who,
            expected: peer.cluster.clone(),
        });
    }
    Ok(conn)
}

/// The cluster of a connected peer gateway, from its verified certificate.
pub fn peer_cluster(conn: &quinn::Connection) -> Result<String, String> {
    let certs = conn
        .peer_identity()
        .and_then(|any| {
            any.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .ok_or_else(|| "peer presented no certificate".to_string())?;
    let leaf = certs
        .first()
        .ok_or_else(|| "peer presented no certificate".to_string())?;
    federation::identity::spiffe_id_from_cert(leaf)
        .map(|id| id.cluster().to_string())
        .map_err(|e| e.to_string())
}

/// Tell every peer connection that this gateway is shutting down (a `Leaving` datagram): the
/// peers open no new tunnels to it while they have another replica.
pub fn announce_leaving(shared: &Shared) {
    let leaving = Bytes::copy_from_slice(&encode_probe(ProbeKind::Leaving, 0));
    for peer in shared.peer_list() {
        for r in peer.replicas().values() {
            if let Some(c) = &r.current {
                let _ = c.conn.send_datagram(leaving.clone());
            }
        }
    }
}

/// Accept connections from peer gateways.
pub async fn accept_loop(shared: Arc<Shared>) {
    loop {
        let incoming = tokio::select! {
            i = shared.endpoint.accept() => match i { Some(i) => i, None => return },
            _ = shared.shutdown.cancelled() => return,
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let connecting = match incoming.accept() {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(%remote, error = %e, "refused a peer connection");
                    shared
                        .metrics
                        .count("strait_gateway_handshake_failures_total", "other");
                    return;
                }
            };
            let conn = match tokio::time::timeout(Duration::from_secs(5), connecting).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    tracing::warn!(%remote, error = %e, "peer handshake failed");
                    if let Some(reason) = handshake_reason(&e) {
                        shared
                            .metrics
                            .count("strait_gateway_handshake_failures_total", reason);
                    }
                    return;
                }
                Err(_) => {
                    tracing::warn!(%remote, "peer handshake timed out");
                    shared
                        .metrics
                        .count("strait_gateway_handshake_failures_total", "timeout");
                    return;
                }
            };
            let cluster = match peer_cluster(&conn) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(%remote, error = %e, "refused a peer");
                    shared
                        .metrics
                        .count("strait_gateway_handshake_failures_total", "bad_identity");
                    conn.close(quinn::VarInt::from_u32(CLOSE_DUPLICATE), b"no identity");
                    return;
                }
            };
            let Some(peer) = shared.peer(&cluster) else {
                tracing::warn!(%remote, %cluster, "refused a peer: not a member of the federation");
                shared
                    .metrics
                    .count("strait_gateway_handshake_failures_total", "not_authorized");
                conn.close(quinn::VarInt::from_u32(CLOSE_DUPLICATE), b"unknown cluster");
                return;
            };
            let slot = peer.slot_of(remote);
            install(&shared, &peer, conn, peer.cluster.clone(), slot);
        });
    }
}

/// Serve one tunnel opened by a peer: header, endpoint choice, status, bytes.
async fn handle_inbound(
    shared: Arc<Shared>,
    peer: Arc<Peer>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let header: TunnelHeader = match tokio::time::timeout(
        shared.config.tunnel.open_timeout,
        read_frame(&mut recv),
    )
    .await
    {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            tracing::warn!(peer = %peer.cluster, error = %e, "refused a stream with a bad header");
            shared
                .metrics
                .count("strait_gateway_stream_errors_total", "bad_header");
            reply(
                &mut send,
                StatusCode::BadHeader,
                format!("bad tunnel header: {e}"),
                "",
            )
            .await;
            return;
        }
        Err(_) => {
            shared
                .metrics
                .count("strait_gateway_stream_errors_total", "header_timeout");
            let _ = send.reset(quinn::VarInt::from_u32(1));
            return;
        }
    };
    if let Err(why) = header.validate() {
        shared
            .metrics
            .count("strait_gateway_stream_errors_total", "bad_header");
        let code = if header.version != crate::protocol::VERSION {
            StatusCode::UnsupportedVersion
        } else {
            StatusCode::BadHeader
        };
        reply(&mut send, code, why, "").await;
        return;
    }
    if header.source_cluster != peer.cluster.as_str() {
        shared
            .metrics
            .count("strait_gateway_stream_errors_total", "unauthorized");
        reply(
            &mut send,
            StatusCode::Unauthorized,
            format!(
                "the header claims cluster `{}` but the peer is `{}`",
                header.source_cluster, peer.cluster
            ),
            "",
        )
        .await;
        return;
    }
    let Ok(key) = ServiceKey::new(&header.namespace, &header.service) else {
        reply(
            &mut send,
            StatusCode::BadHeader,
            "invalid service".into(),
            "",
        )
        .await;
        return;
    };
    // `validate` checked the port's range and the endpoint's syntax.
    let port = u16::try_from(header.port).unwrap_or_default();
    let named = header.named_endpoint().ok().flatten();
    let (tcp, endpoint) = match connect_local(&shared, &key, port, named).await {
        Ok(t) => t,
        Err((code, why)) => {
            tracing::debug!(peer = %peer.cluster, service = %key, reason = %why, "tunnel refused");
            if code == StatusCode::NotAnEndpoint {
                shared
                    .metrics
                    .count("strait_gateway_stream_errors_total", "not_an_endpoint");
            }
            reply(&mut send, code, why, "").await;
            return;
        }
    };
    let endpoint = endpoint.to_string();
    if write_frame(
        &mut send,
        &TunnelStatus {
            code: StatusCode::Ok as i32,
            message: String::new(),
            endpoint,
        },
    )
    .await
    .is_err()
    {
        return;
    }
    crate::splice::splice(
        crate::splice::QuicStream { send, recv },
        tcp,
        shared.config.tunnel.idle_timeout,
        &shared.metrics,
    )
    .await;
}

async fn reply(send: &mut quinn::SendStream, code: StatusCode, message: String, endpoint: &str) {
    let status = TunnelStatus {
        code: code as i32,
        message,
        endpoint: endpoint.to_string(),
    };
    let _ = write_frame(send, &status).await;
    let _ = send.finish();
}

/// A connection to a local endpoint: plain TCP, or mutual TLS to the sidecar in front of it.
pub enum LocalStream {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl crate::splice::Abort for LocalStream {
    fn abort(&mut self) {
        // Reset the TCP connection under the TLS session too: the far side sees an error.
        match self {
            LocalStream::Tcp(s) => s.abort(),
            LocalStream::Tls(s) => s.get_mut().0.abort(),
        }
    }
}

impl tokio::io::AsyncRead for LocalStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            LocalStream::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            LocalStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for LocalStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            LocalStream::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            LocalStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            LocalStream::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            LocalStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            LocalStream::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            LocalStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Connect to a healthy local endpoint of `service:port`: the one `named` (by the sidecar's load
/// balancer) if it is a serving endpoint now, else [`StatusCode::NotAnEndpoint`]; without a name,
/// a few in round-robin order. An endpoint behind a sidecar gets mutual TLS with the gateway's
/// certificate (the sidecar must be a workload of this cluster). Returns the stream and the
/// endpoint's address.
pub async fn connect_local(
    shared: &Shared,
    service: &ServiceKey,
    port: u16,
    named: Option<SocketAddr>,
) -> Result<(LocalStream, SocketAddr), (StatusCode, String)> {
    let candidates = match named {
        // The sidecar chose the endpoint: that one, if it is a serving endpoint now, or none.
        Some(addr) => vec![shared.local.named(service, port, addr)?],
        None => shared.local.pick(service, port, 3)?,
    };
    let timeout = shared.config.tunnel.connect_timeout;
    let mut last = String::new();
    for c in candidates {
        let addr = c.addr;
        let tcp = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                last = format!("{addr}: {e}");
                continue;
            }
            Err(_) => {
                last = format!("{addr}: connect timed out");
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let Some(alpn) = c.sidecar else {
            return Ok((LocalStream::Tcp(tcp), addr));
        };
        let config = match shared.sidecar_tls.read() {
            Ok(t) => t.get(alpn),
            Err(p) => p.into_inner().get(alpn),
        };
        let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
        match tokio::time::timeout(
            timeout,
            tokio_rustls::TlsConnector::from(config).connect(name, tcp),
        )
        .await
        {
            Ok(Ok(s)) => return Ok((LocalStream::Tls(Box::new(s)), addr)),
            Ok(Err(e)) => {
                let reason = federation::identity::handshake_failure(&e);
                tracing::warn!(endpoint = %addr, %reason, "mutual TLS to the endpoint's sidecar failed");
                shared
                    .metrics
                    .count("strait_gateway_sidecar_tls_failures_total", "handshake");
                last = format!("{addr}: mutual TLS to its sidecar: {reason}");
            }
            Err(_) => {
                last = format!("{addr}: no TLS handshake with its sidecar within {timeout:?}")
            }
        }
    }
    Err((
        StatusCode::ConnectFailed,
        format!("cannot connect to any endpoint of {service}: {last}"),
    ))
}

/// Why an outbound tunnel could not be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenError {
    UnknownCluster(String),
    LinkDown(String),
    Refused(StatusCode, String),
    Failed(String),
}

impl OpenError {
    /// The HTTP status for the ingress.
    pub fn http_status(&self) -> u16 {
        match self {
            OpenError::UnknownCluster(_) => 404,
            OpenError::LinkDown(_) => 503,
            // 503: the sidecar tries another endpoint (the one it named is gone) or priority.
            OpenError::Refused(StatusCode::NoEndpoint | StatusCode::NotAnEndpoint, _) => 503,
            OpenError::Refused(StatusCode::UnknownService, _) => 404,
            OpenError::Refused(StatusCode::Unauthorized, _) => 403,
            OpenError::Refused(StatusCode::ConnectFailed, _) => 502,
            OpenError::Refused(_, _) => 502,
            OpenError::Failed(_) => 502,
        }
    }
    pub fn reason(&self) -> &str {
        match self {
            OpenError::UnknownCluster(s) | OpenError::LinkDown(s) | OpenError::Failed(s) => s,
            OpenError::Refused(_, s) => s,
        }
    }
}

/// Open a tunnel to `service:port` in cluster `target`: the stream, the header, and the peer's
/// status, all within the tunnel's `open_timeout`.
pub async fn open_tunnel(
    shared: &Arc<Shared>,
    target: &str,
    header: TunnelHeader,
) -> Result<(quinn::SendStream, quinn::RecvStream), OpenError> {
    let deadline = tokio::time::Instant::now() + shared.config.tunnel.open_timeout;
    let (send, mut recv) = open_stream_until(shared, target, header, deadline).await?;
    let status = async {
        let status: TunnelStatus = read_frame(&mut recv).await.map_err(|e| {
            OpenError::Failed(format!("reading the tunnel status from `{target}`: {e}"))
        })?;
        let code = StatusCode::try_from(status.code).unwrap_or(StatusCode::BadHeader);
        if code != StatusCode::Ok {
            return Err(OpenError::Refused(
                code,
                format!("cluster `{target}`: {}", status.message),
            ));
        }
        Ok(())
    };
    tokio::time::timeout_at(deadline, status)
        .await
        .map_err(|_| OpenError::LinkDown(format!("opening a tunnel to `{target}` timed out")))??;
    Ok((send, recv))
}

/// Open a stream to cluster `target` and write the tunnel header, within the tunnel's
/// `open_timeout`; the peer's status is the first thing the stream will carry (an early-status
/// tunnel hands it to the sidecar as it is).
pub async fn open_stream(
    shared: &Arc<Shared>,
    target: &str,
    header: TunnelHeader,
) -> Result<(quinn::SendStream, quinn::RecvStream), OpenError> {
    let deadline = tokio::time::Instant::now() + shared.config.tunnel.open_timeout;
    open_stream_until(shared, target, header, deadline).await
}

async fn open_stream_until(
    shared: &Arc<Shared>,
    target: &str,
    header: TunnelHeader,
    deadline: tokio::time::Instant,
) -> Result<(quinn::SendStream, quinn::RecvStream), OpenError> {
    let Some(peer) = shared.peer(target) else {
        return Err(OpenError::UnknownCluster(format!(
            "cluster `{target}` is not a member of the federation"
        )));
    };
    let conn = match peer.pick() {
        Ok(c) => c,
        Err(true) => {
            return Err(OpenError::LinkDown(format!(
                "the link to cluster `{target}` is down"
            )));
        }
        Err(false) => {
            return Err(OpenError::LinkDown(format!(
                "no connection to cluster `{target}`"
            )));
        }
    };
    let open = async {
        let (mut send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| OpenError::LinkDown(format!("link to `{target}`: {e}")))?;
        write_frame(&mut send, &header)
            .await
            .map_err(|e| OpenError::Failed(format!("sending the tunnel header: {e}")))?;
        Ok((send, recv))
    };
    tokio::time::timeout_at(deadline, open)
        .await
        .map_err(|_| OpenError::LinkDown(format!("opening a tunnel to `{target}` timed out")))?
}

/// Peers by cluster id.
pub type PeerMap = HashMap<String, Arc<Peer>>;
