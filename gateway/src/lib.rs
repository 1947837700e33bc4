//! Strait's east-west gateway: clusters joined over QUIC with mutual TLS, one stream per
//! tunnelled connection, local ingress by HTTP CONNECT over mTLS, and link health measured by
//! probes and reported to the registry and the admin endpoint. See `docs/gateway.md`.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod dns;
pub mod health;
pub mod ingress;
pub mod local;
pub mod metrics;
pub mod peers;
pub mod protocol {
    //! The stream protocol between gateways (and, for early statuses, the sidecar): see
    //! [`federation::tunnel`].
    pub use federation::tunnel::*;
}
pub mod splice;
pub mod tls;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use federation::discovery::DiscoveryFile;
use federation::model::{LinkHealth, LinkState, Name, Peering};
use federation::registry::codec::encode_link;
use federation::registry::publisher::Owned;
use federation::registry::{
    Backend, EtcdBackend, EtcdOptions, LeasedPublisher, PublisherConfig, RegistryCache, RegistryKey,
};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

use crate::config::GatewayConfig;
use crate::local::{LocalEndpoints, LocalTable};
use crate::metrics::Metrics;
use crate::peers::{Peer, PeerMap};
use crate::tls::{Members, TlsSource};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{0}")]
    Config(String),
    #[error("cannot listen on {what} {addr}: {source}")]
    Listen {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Discovery(#[from] federation::config::DiscoveryError),
    #[error(transparent)]
    Registry(#[from] federation::registry::RegistryError),
}

/// For this long after it starts, a gateway is ready only once its links to every peer it
/// knows are up; after it, whatever they are (a peer may be down for good).
pub const READY_GRACE: Duration = Duration::from_secs(30);

/// A cancellation signal shared by every task.
#[derive(Clone)]
pub struct Shutdown(watch::Sender<bool>);

impl Shutdown {
    fn new() -> Self {
        Self(watch::channel(false).0)
    }
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
    pub async fn cancelled(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|v| *v).await;
    }
    /// Whether the shutdown has begun.
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }
}

/// The tunnels under way, from the request that opens one (a sidecar's CONNECT, a peer's
/// stream) to the end of its splice: what a graceful shutdown waits for.
#[derive(Default)]
pub struct InFlight {
    count: std::sync::atomic::AtomicUsize,
    idle: Notify,
}

/// One tunnel under way; dropping it ends it.
pub struct InFlightGuard(Arc<InFlight>);

impl InFlight {
    pub fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.count.fetch_add(1, Relaxed);
        InFlightGuard(self.clone())
    }

    pub fn count(&self) -> usize {
        self.count.load(Relaxed)
    }

    /// Wait until no tunnel is under way.
    pub async fn until_idle(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            idle.await;
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Relaxed) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// State shared by the gateway's tasks.
pub struct Shared {
    pub config: GatewayConfig,
    pub own: Name,
    pub members: Members,
    /// Peers pinned to their own CA bundle (peerings).
    pub pinned: tls::Pinned,
    /// The federation's trust domain (of the CA file).
    pub trust_domain: RwLock<String>,
    pub peers: Mutex<PeerMap>,
    pub local: LocalEndpoints,
    pub endpoint: quinn::Endpoint,
    pub quic_client: RwLock<quinn::ClientConfig>,
    pub ingress_tls: RwLock<Arc<rustls::ServerConfig>>,
    /// Mutual TLS to local endpoints behind sidecars.
    pub sidecar_tls: RwLock<tls::SidecarTls>,
    pub metrics: Arc<Metrics>,
    pub shutdown: Shutdown,
    /// Tunnels under way (a graceful shutdown waits for them).
    pub in_flight: Arc<InFlight>,
    pub started: std::time::Instant,
    /// Its links to every known peer have been up together once (see [`Shared::readiness`]).
    pub linked: std::sync::atomic::AtomicBool,
    pub links_changed: Notify,
    pub ready: watch::Sender<bool>,
    pub dns: Arc<dns::PeerResolver>,
}

impl Shared {
    /// The peer for a member cluster (created on first use).
    pub fn peer(self: &Arc<Self>, cluster: &str) -> Option<Arc<Peer>> {
        if cluster == self.own.as_str() || !self.members.contains(cluster) {
            return None;
        }
        let name = Name::parse("cluster", cluster).ok()?;
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = peers.get(cluster) {
            return Some(p.clone());
        }
        let peer = Arc::new(Peer::new(name.clone(), self.config.link_for(&name)));
        peers.insert(cluster.to_string(), peer.clone());
        tokio::spawn(peers::dial_loop(self.clone(), peer.clone()));
        tokio::spawn(dns::track(
            self.dns.clone(),
            peer.clone(),
            peer.targets.subscribe(),
            self.shutdown.clone(),
        ));
        Some(peer)
    }

    /// Every link as the admin endpoint shows it.
    /// Whether the gateway can serve tunnels (`/ready`): started, not shutting down, and once
    /// its links to every peer it knows have been up together (or [`READY_GRACE`] has passed
    /// since it started), so that a rolling restart moves on to the next replica only once this
    /// one carries traffic. A link lost later does not make it unready (that is the link's
    /// fault, not the gateway's).
    pub fn readiness(&self) -> Result<(), String> {
        if self.shutdown.is_triggered() {
            return Err("shutting down".into());
        }
        if !*self.ready.borrow() {
            return Err("starting".into());
        }
        if !self.linked.load(Relaxed) && self.started.elapsed() < READY_GRACE {
            let waiting = self.links_not_up();
            if !waiting.is_empty() {
                return Err(format!(
                    "starting: waiting for the links to {} (at most {READY_GRACE:?} after start)",
                    waiting.join(", ")
                ));
            }
            self.linked.store(true, Relaxed);
        }
        Ok(())
    }

    /// A graceful shutdown (SIGTERM): stop accepting; tell the sidecars (their drain watches
    /// answered, HTTP/2 GOAWAY) and every peer (a `Leaving` datagram on each connection) to send
    /// new tunnels to other replicas; let the tunnels under way finish, for up to
    /// `tunnel.drain_timeout`; then close every connection and wait a moment for the close to
    /// be sent.
    pub async fn shut_down_gracefully(&self) {
        let shared = self;
        shared.shutdown.trigger();
        let _ = shared.ready.send_replace(false);
        peers::announce_leaving(shared);
        let drain = shared.config.tunnel.drain_timeout;
        let deadline = tokio::time::Instant::now() + drain;
        // A peer that has not heard yet may still open a tunnel for about a round trip.
        let rtt = shared.links().iter().map(|l| l.rtt_ms).fold(0.0, f64::max);
        let settle = Duration::from_secs_f64((2.0 * rtt / 1000.0).clamp(0.1, 1.0)).min(drain);
        tokio::time::sleep(settle).await;
        let under_way = shared.in_flight.count();
        match tokio::time::timeout_at(deadline, shared.in_flight.until_idle()).await {
            Ok(()) => tracing::info!(
                tunnels = under_way,
                "shutting down: every tunnel under way has finished"
            ),
            Err(_) => tracing::warn!(
                tunnels = shared.in_flight.count(),
                ?drain,
                "shutting down: tunnels still under way after tunnel.drain_timeout are closed"
            ),
        }
        shared
            .endpoint
            .close(quinn::VarInt::from_u32(peers::CLOSE_SHUTDOWN), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(1), shared.endpoint.wait_idle()).await;
    }

    /// Every peer cluster known now.
    pub fn peer_list(&self) -> Vec<Arc<Peer>> {
        self.peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// A link just came up: if every known peer's is up now, the gateway is linked for good.
    pub fn note_linked(&self) {
        if !self.linked.load(Relaxed) && self.links_not_up().is_empty() {
            self.linked.store(true, Relaxed);
        }
    }

    fn links_not_up(&self) -> Vec<String> {
        self.links()
            .into_iter()
            .filter(|l| l.state != LinkHealth::Up.as_str())
            .map(|l| l.cluster)
            .collect()
    }

    pub fn links(&self) -> Vec<LinkReport> {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<LinkReport> = peers
            .values()
            .map(|p| {
                let v = p.view.borrow().clone();
                LinkReport {
                    cluster: p.cluster.to_string(),
                    state: v.state.as_str().to_string(),
                    rtt_ms: (v.rtt_ms * 1000.0).round() / 1000.0,
                    loss: (v.loss * 10000.0).round() / 10000.0,
                    since: humantime::format_rfc3339_millis(v.since).to_string(),
                    connected: v.connected,
                    replicas: v.replicas,
                }
            })
            .collect();
        out.sort_by(|a, b| a.cluster.cmp(&b.cluster));
        out
    }
}

/// One link in `/links`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct LinkReport {
    pub cluster: String,
    pub state: String,
    pub rtt_ms: f64,
    pub loss: f64,
    pub since: String,
    pub connected: bool,
    /// The peer's gateway replicas, each with its own link (the link above is the best).
    #[serde(default)]
    pub replicas: Vec<peers::ReplicaView>,
}

/// A running gateway.
pub struct Gateway {
    shared: Arc<Shared>,
    pub peer_addr: SocketAddr,
    pub ingress_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _registry: Option<RegistryCache>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shared.shutdown.trigger();
        self.shared
            .endpoint
            .close(quinn::VarInt::from_u32(peers::CLOSE_SHUTDOWN), b"shutdown");
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn udp_socket(addr: SocketAddr, buffer: usize) -> std::io::Result<std::net::UdpSocket> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = s.set_recv_buffer_size(buffer);
    let _ = s.set_send_buffer_size(buffer);
    s.bind(&addr.into())?;
    Ok(s.into())
}

fn local_table_from(state: &federation::model::ClusterState) -> LocalTable {
    LocalTable {
        services: state
            .services
            .iter()
            .map(|s| (s.service.key.clone(), Arc::new(s.clone())))
            .collect(),
    }
}

impl Gateway {
    /// Start every listener and task.
    pub async fn start(config: GatewayConfig) -> Result<Self, GatewayError> {
        let own = config.cluster.clone();
        let members = Members::default();
        for p in &config.peers {
            members.insert(p.cluster.as_str());
        }
        let transport = Arc::new(
            tls::transport(
                &config.transport,
                config.link.keep_alive,
                config.link.idle_timeout,
            )
            .map_err(GatewayError::Config)?,
        );
        let pinned = tls::Pinned::default();
        let metrics = Arc::new(Metrics::default());
        let on_reject: tls::OnReject = {
            let metrics = metrics.clone();
            Arc::new(move |side, why| {
                let name = match side {
                    tls::Side::Accepting => "strait_gateway_handshake_failures_total",
                    tls::Side::Dialling => "strait_gateway_dial_failures_total",
                };
                metrics.count(name, why);
            })
        };
        let source = Arc::new(TlsSource::new(
            config.tls.clone(),
            own.clone(),
            members.clone(),
            pinned.clone(),
            transport,
            on_reject,
        ));
        let material = source.build()?;

        // Local endpoints: the discovery file, or this cluster's entries in the registry.
        let (local_tx, local_rx) = watch::channel(Arc::new(LocalTable::default()));
        let mut tasks = Vec::new();
        let mut discovery_path = None;
        if let Some(d) = &config.discovery {
            let f = DiscoveryFile::load(&d.file)?;
            if f.state.cluster.id != own {
                return Err(GatewayError::Config(format!(
                    "{}: the discovery file is for cluster `{}`, this gateway is `{own}`",
                    d.file.display(),
                    f.state.cluster.id
                )));
            }
            local_tx.send_replace(Arc::new(local_table_from(&f.state)));
            discovery_path = Some(d.file.clone());
        } else if let Some(path) = &config.local_snapshot {
            match local::load_snapshot(path, &own) {
                Ok(Some(table)) => {
                    tracing::info!(file = %path.display(), services = table.services.len(),
                        "serving the local endpoints kept from the last run until the registry has them");
                    local_tx.send_replace(Arc::new(table));
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(file = %path.display(), "{e}; starting without kept local endpoints")
                }
            }
        }

        let socket =
            udp_socket(config.listen.peers, config.transport.udp_buffer).map_err(|source| {
                GatewayError::Listen {
                    what: "peers (UDP)",
                    addr: config.listen.peers,
                    source,
                }
            })?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(material.quic_server.clone()),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| GatewayError::Listen {
            what: "peers (QUIC)",
            addr: config.listen.peers,
            source,
        })?;
        let peer_addr = endpoint
            .local_addr()
            .map_err(|source| GatewayError::Listen {
                what: "peers",
                addr: config.listen.peers,
                source,
            })?;
        let ingress = TcpListener::bind(config.listen.ingress)
            .await
            .map_err(|source| GatewayError::Listen {
                what: "ingress",
                addr: config.listen.ingress,
                source,
            })?;
        let ingress_addr = ingress
            .local_addr()
            .map_err(|source| GatewayError::Listen {
                what: "ingress",
                addr: config.listen.ingress,
                source,
            })?;
        let admin = TcpListener::bind(config.listen.admin)
            .await
            .map_err(|source| GatewayError::Listen {
                what: "admin",
                addr: config.listen.admin,
                source,
            })?;
        let admin_addr = admin.local_addr().map_err(|source| GatewayError::Listen {
            what: "admin",
            addr: config.listen.admin,
            source,
        })?;

        let shared = Arc::new(Shared {
            own: own.clone(),
            members: members.clone(),
            pinned,
            trust_domain: RwLock::new(material.trust_domain.clone()),
            peers: Mutex::new(HashMap::new()),
            local: LocalEndpoints::new(local_rx),
            endpoint,
            quic_client: RwLock::new(material.quic_client),
            ingress_tls: RwLock::new(material.ingress),
            sidecar_tls: RwLock::new(material.sidecars),
            metrics,
            shutdown: Shutdown::new(),
            in_flight: Arc::new(InFlight::default()),
            started: std::time::Instant::now(),
            linked: std::sync::atomic::AtomicBool::new(false),
            links_changed: Notify::new(),
            ready: watch::channel(false).0,
            dns: Arc::new(dns::PeerResolver::new(&config.dns)),
            config: config.clone(),
        });

        // Static peers.
        for p in &config.peers {
            if let Some(peer) = shared.peer(p.cluster.as_str()) {
                let mut targets = vec![p.address.clone()];
                targets.extend(p.replicas.iter().cloned());
                peer.targets.send_replace(targets);
            }
        }

        tasks.push(tokio::spawn(peers::accept_loop(shared.clone())));
        tasks.push(tokio::spawn(ingress::serve(shared.clone(), ingress)));
        tasks.push(tokio::spawn(admin::serve(shared.clone(), admin)));
        tasks.push(tokio::spawn(reload_tls(shared.clone(), source)));
        if let Some(path) = discovery_path {
            tasks.push(tokio::spawn(reload_discovery(
                shared.clone(),
                path,
                local_tx.clone(),
            )));
        }

        // The registry: membership, peer addresses, local endpoints, link states.
        let mut registry = None;
        if let Some(r) = &config.registry {
            let backend = Backend::Etcd(EtcdBackend::open(r.connection(), EtcdOptions::default())?);
            let cache = RegistryCache::spawn(backend.clone());
            tasks.push(tokio::spawn(follow_registry(
                shared.clone(),
                cache.snapshots(),
                config.discovery.is_none().then_some(local_tx),
                r.stale_bound,
            )));
            let (links_tx, links_rx) = watch::channel(BTreeMap::new());
            let (publisher, _status) = LeasedPublisher::new(
                backend,
                format!("gateway {own}"),
                Owned {
                    keys: vec![],
                    prefixes: vec![RegistryKey::links_prefix(&own)],
                    // A replica owns its own link keys only, never its siblings'.
                    suffix: config.replica.as_ref().map(|r| format!("/{r}")),
                },
                PublisherConfig {
                    lease_ttl: r.lease_ttl,
                    ..PublisherConfig::default()
                },
                links_rx,
            );
            let sd = shared.shutdown.clone();
            tasks.push(tokio::spawn(
                publisher.run(async move { sd.cancelled().await }),
            ));
            tasks.push(tokio::spawn(publish_links(shared.clone(), links_tx)));
            registry = Some(cache);
        }
        shared.ready.send_replace(true);
        tracing::info!(cluster = %own, peers = %peer_addr, ingress = %ingress_addr, admin = %admin_addr, "gateway started");
        Ok(Self {
            shared,
            peer_addr,
            ingress_addr,
            admin_addr,
            tasks,
            _registry: registry,
        })
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn links(&self) -> Vec<LinkReport> {
        self.shared.links()
    }

    /// A graceful shutdown (SIGTERM): see [`Shared::shut_down_gracefully`].
    pub async fn shutdown(self) {
        self.shared.shut_down_gracefully().await;
    }
}

async fn reload_tls(shared: Arc<Shared>, source: Arc<TlsSource>) {
    let interval = shared
        .config
        .tls
        .reload_interval
        .max(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shared.shutdown.cancelled() => return,
        }
        if !source.changed() {
            continue;
        }
        match source.build() {
            Ok(m) => {
                shared.endpoint.set_server_config(Some(m.quic_server));
                if let Ok(mut c) = shared.quic_client.write() {
                    *c = m.quic_client;
                }
                if let Ok(mut c) = shared.ingress_tls.write() {
                    *c = m.ingress;
                }
                if let Ok(mut c) = shared.sidecar_tls.write() {
                    *c = m.sidecars;
                }
                if let Ok(mut td) = shared.trust_domain.write() {
                    *td = m.trust_domain;
                }
                tracing::info!("certificates reloaded; existing connections keep theirs");
                shared
                    .metrics
                    .count("strait_gateway_cert_reloads_total", "ok");
            }
            Err(e) => {
                tracing::error!(error = %e, "certificate reload failed; keeping the current ones");
                shared
                    .metrics
                    .count("strait_gateway_cert_reloads_total", "failed");
            }
        }
    }
}

async fn reload_discovery(
    shared: Arc<Shared>,
    path: std::path::PathBuf,
    tx: watch::Sender<Arc<LocalTable>>,
) {
    let stamp = |p: &std::path::Path| {
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.modified().ok(), m.len()))
    };
    let mut last = stamp(&path);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shared.shutdown.cancelled() => return,
        }
        let now = stamp(&path);
        if now == last {
            continue;
        }
        last = now;
        match DiscoveryFile::load(&path) {
            Ok(f) if f.state.cluster.id == shared.own => {
                tx.send_replace(Arc::new(local_table_from(&f.state)));
                tracing::info!(file = %path.display(), "local endpoints reloaded");
            }
            Ok(f) => {
                tracing::error!(file = %path.display(), "the file now names cluster `{}`; keeping the last good endpoints", f.state.cluster.id)
            }
            Err(e) => tracing::error!("{e}; keeping the last good endpoints"),
        }
    }
}

/// What a gateway makes of its cluster's peerings: those it can use (by peer), the verifiers of
/// those pinned to a CA bundle of their own, and the problems of the others.
type UsablePeerings = (
    BTreeMap<String, Arc<Peering>>,
    BTreeMap<String, Arc<federation::identity::PeerVerifier>>,
    BTreeSet<String>,
);

/// The peerings this gateway's cluster declared, sorted out (see [`UsablePeerings`]).
fn usable_peerings(shared: &Shared, snap: &federation::registry::Snapshot) -> UsablePeerings {
    let federation_td = shared
        .trust_domain
        .read()
        .map(|t| t.clone())
        .unwrap_or_default();
    let mut usable = BTreeMap::new();
    let mut pinned = BTreeMap::new();
    let mut problems = BTreeSet::new();
    for p in snap.peerings_of(&shared.own) {
        let peer = p.peer.to_string();
        let verdict = match p.ca_certs() {
            Ok(certs) if !certs.is_empty() => tls::pinned_verifier(
                shared.own.as_str(),
                &peer,
                &p.trust_domain,
                &certs,
                shared.members.clone(),
            )
            .map(|v| Some(Arc::new(v)))
            .map_err(|e| format!("ca_bundle: {e}")),
            Ok(_) if p.trust_domain == federation_td => Ok(None),
            Ok(_) => Err(format!(
                "trust domain `{}` is not the federation's (`{federation_td}`) and no ca_bundle says which CA vouches for it",
                p.trust_domain
            )),
            Err(e) => Err(format!("ca_bundle: {e}")),
        };
        match verdict {
            Ok(v) => {
                if let Some(v) = v {
                    pinned.insert(peer.clone(), v);
                }
                usable.insert(peer, p.clone());
            }
            Err(e) => {
                problems.insert(format!("peering with `{peer}`: {e}; ignored"));
            }
        }
    }
    (usable, pinned, problems)
}

async fn follow_registry(
    shared: Arc<Shared>,
    mut snapshots: watch::Receiver<Arc<federation::registry::Snapshot>>,
    local: Option<watch::Sender<Arc<LocalTable>>>,
    stale_bound: Duration,
) {
    let mut reported = BTreeSet::new();
    // Clusters that left the registry without being withdrawn, and since when: still members
    // while connected, or for `stale_bound` (their control plane may only be restarting).
    let mut departed: BTreeMap<String, tokio::time::Instant> = BTreeMap::new();
    let mut own_missing = false;
    let mut kept_local: Option<Arc<federation::registry::Snapshot>> = None;
    // The peerings last sorted out, with the trust domain they were checked against: most
    // snapshots (endpoints, link states) leave them as they are.
    let mut sorted: Option<(Arc<federation::registry::Snapshot>, String)> = None;
    let mut peerings = BTreeMap::new();
    loop {
        let snap = snapshots.borrow_and_update().clone();
        if snap.revision > 0 {
            let td = shared
                .trust_domain
                .read()
                .map(|t| t.clone())
                .unwrap_or_default();
            let same = sorted
                .as_ref()
                .is_some_and(|(s, t)| *t == td && s.peerings == snap.peerings);
            if !same {
                // Peerings first: a cluster becoming pinned must not pass as a federation
                // member in between.
                let (usable, pinned, problems) = usable_peerings(&shared, &snap);
                for p in problems.difference(&reported) {
                    tracing::error!("{p}");
                }
                reported = problems;
                shared.pinned.replace(pinned);
                peerings = usable;
                sorted = Some((snap.clone(), td));
            }
            let is_static = |id: &str| shared.config.peers.iter().any(|p| p.cluster.as_str() == id);
            let mut clusters: BTreeSet<String> = shared
                .config
                .peers
                .iter()
                .map(|p| p.cluster.to_string())
                .collect();
            clusters.extend(snap.clusters.keys().map(|c| c.to_string()));
            clusters.extend(peerings.keys().cloned());
            // A member that left the registry stays one while its link is connected, or for
            // `stale_bound` — unless it was withdrawn on purpose.
            let now = tokio::time::Instant::now();
            let withdrawn: BTreeSet<String> =
                snap.withdrawn.keys().map(|c| c.to_string()).collect();
            for m in shared.members.list() {
                if !clusters.contains(&m) && !withdrawn.contains(&m) {
                    departed.entry(m).or_insert(now);
                }
            }
            departed.retain(|c, since| {
                if clusters.contains(c) || withdrawn.contains(c) {
                    return false;
                }
                let connected = shared
                    .peers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(c)
                    .is_some_and(|p| p.connection().is_some());
                connected || now.duration_since(*since) < stale_bound
            });
            if !departed.is_empty() {
                tracing::debug!(clusters = ?departed.keys().collect::<Vec<_>>(),
                    "members gone from the registry kept (connected, or within the stale bound)");
            }
            clusters.extend(departed.keys().cloned());
            shared.members.replace(clusters.clone());
            for id in &clusters {
                if *id == shared.own.as_str() || is_static(id) {
                    continue;
                }
                // A peering's addresses come before those the peer publishes itself.
                let Some(targets) = peerings.get(id).map(|p| &p.gateways).or_else(|| {
                    Name::parse("cluster", id)
                        .ok()
                        .and_then(|n| snap.clusters.get(&n))
                        .map(|c| &c.gateways)
                }) else {
                    continue;
                };
                if let Some(peer) = shared.peer(id) {
                    peer.targets.send_if_modified(|cur| {
                        if cur != targets {
                            cur.clone_from(targets);
                            true
                        } else {
                            false
                        }
                    });
                }
            }
            if let Some(tx) = &local {
                // Only while the registry holds this cluster: a control plane that is away (its
                // lease expired) must change nothing for traffic — the last table stays.
                if snap.clusters.contains_key(&shared.own) {
                    if own_missing {
                        tracing::info!(
                            "the registry holds this cluster again; local endpoints follow it"
                        );
                        own_missing = false;
                    }
                    let table = LocalTable {
                        services: snap
                            .cluster_services(&shared.own)
                            .map(|s| (s.service.key.clone(), s.clone()))
                            .collect(),
                    };
                    let changed = kept_local
                        .as_ref()
                        .is_none_or(|k| !k.same_cluster_entries(&snap, &shared.own));
                    tx.send_replace(Arc::new(table));
                    if changed {
                        kept_local = Some(snap.clone());
                        if let Some(path) = &shared.config.local_snapshot
                            && let Err(e) = local::save_snapshot(path, &snap, &shared.own)
                        {
                            tracing::warn!(file = %path.display(), "cannot keep the local endpoints: {e}");
                        }
                    }
                } else if !own_missing {
                    own_missing = true;
                    tracing::warn!(
                        "the registry does not hold this cluster (its control plane is away?): serving the last known local endpoints"
                    );
                }
            } else if snap.clusters.contains_key(&shared.own) {
                // A discovery file: its endpoints, less those the registry holds as not serving
                // (the control plane's health checks failed them).
                shared.local.set_not_serving(
                    snap.cluster_services(&shared.own)
                        .flat_map(|s| {
                            s.endpoints
                                .iter()
                                .filter(|e| !e.health.is_serving())
                                .map(|e| (s.service.key.clone(), e.socket_addr()))
                        })
                        .collect(),
                );
            }
        }
        tokio::select! {
            r = snapshots.changed() => if r.is_err() { return },
            _ = shared.shutdown.cancelled() => return,
        }
    }
}

async fn publish_links(shared: Arc<Shared>, tx: watch::Sender<BTreeMap<String, Vec<u8>>>) {
    loop {
        let mut desired = BTreeMap::new();
        for p in shared.peer_list() {
            let v = p.view.borrow().clone();
            let state = LinkState {
                from: shared.own.clone(),
                to: p.cluster.clone(),
                state: v.state,
                rtt_ms: if v.rtt_ms.is_finite() {
                    (v.rtt_ms * 1000.0).round() / 1000.0
                } else {
                    0.0
                },
                loss: v.loss.clamp(0.0, 1.0),
                since: v.since,
            };
            let key = match &shared.config.replica {
                Some(r) => {
                    RegistryKey::ReplicaLink(shared.own.clone(), p.cluster.clone(), r.clone())
                }
                None => RegistryKey::Link(shared.own.clone(), p.cluster.clone()),
            };
            desired.insert(key.encode(), encode_link(&state));
        }
        tx.send_if_modified(|cur| {
            if *cur != desired {
                *cur = desired;
                true
            } else {
                false
            }
        });
        // State changes are published at once; RTT and loss at most every 5 s.
        tokio::select! {
            _ = shared.links_changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = shared.shutdown.cancelled() => return,
        }
    }
}
