//! The ADS server: state-of-the-world (`StreamAggregatedResources`) and delta
//! (`DeltaAggregatedResources`) for CDS, EDS, LDS and RDS.
//!
//! - **Generations.** [`Xds::follow`] watches the registry cache; a burst of changes is
//!   debounced (quiet period, bounded by a maximum delay) into one generation. Each proxy's
//!   resources are computed once per (view, generation), shared by every proxy with that view.
//! - **Streams.** Each stream runs in its own task with a small bounded outbox: a client that
//!   stops reading blocks only itself, and is dropped after `send_timeout`.
//! - **Flow.** One response in flight per type: the next waits for the ACK or NACK. Types are
//!   pushed in the order CDS, EDS, LDS, RDS; a cluster that listeners or routes the client has
//!   acknowledged still refer to is kept until a route update without it is acknowledged
//!   (make-before-break). A changed cluster's endpoints are re-sent after it.
//! - **NACK.** Logged with the client's message and counted; the server does not re-send the
//!   rejected content (the client keeps its last good config) and sends again when content
//!   changes.
//! - **Nonces.** A request whose nonce is not the latest sent for its type is stale and ignored
//!   (counted). Unknown type URLs are logged once per stream and counted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use federation::registry::Snapshot;
use federation::registry::cache::LocalState;
use futures::Stream;
use tokio::sync::{OnceCell, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::metrics::Metrics;
use crate::session::{AdsSession, Event, Message, Req};
use crate::view::{self, NodeInfo, Resource, View, ViewKey, ViewSettings};

/// Server tuning.
#[derive(Debug, Clone)]
pub struct XdsOptions {
    /// Wait this long without further registry changes before publishing a generation.
    pub debounce: Duration,
    /// ... but never longer than this after the first change.
    pub max_delay: Duration,
    /// Drop a stream whose client has not read a response for this long.
    pub send_timeout: Duration,
    /// Delta: split updates larger than this (resource bytes) over several responses.
    pub max_response_bytes: usize,
}

impl Default for XdsOptions {
    fn default() -> Self {
        Self {
            debounce: Duration::from_millis(5),
            max_delay: Duration::from_millis(50),
            send_timeout: Duration::from_secs(30),
            max_response_bytes: 256 * 1024,
        }
    }
}

/// One published registry state and the views computed from it.
pub struct Generation {
    pub id: u64,
    pub snapshot: Arc<Snapshot>,
    /// When the change that led to it was seen.
    pub seen: Instant,
    views: Mutex<HashMap<ViewKey, Arc<OnceCell<Arc<View>>>>>,
}

/// What a connected proxy was last sent, for `/debug/config`.
pub struct ClientRecord {
    pub node: NodeInfo,
    pub delta: bool,
    pub connected: SystemTime,
    pub sent: Mutex<[BTreeMap<String, Arc<Resource>>; 4]>,
    pub acked: Mutex<[Option<String>; 4]>,
    pub last_nack: Mutex<Option<String>>,
}

/// The xDS server's shared state. Cheap to clone.
#[derive(Clone)]
pub struct Xds {
    inner: Arc<Inner>,
}

/// A view and the snapshot it was computed from.
type BaseView = (Arc<Snapshot>, Arc<View>);

struct Inner {
    settings: ViewSettings,
    options: XdsOptions,
    generations: watch::Sender<Option<Arc<Generation>>>,
    metrics: Arc<Metrics>,
    clients: Mutex<BTreeMap<u64, Arc<ClientRecord>>>,
    next_client: AtomicU64,
    shutdown: CancellationToken,
    /// The latest view computed per key, the base of the next generation's.
    last_views: Mutex<HashMap<ViewKey, BaseView>>,
    /// With mTLS: only workload certificates of this cluster may connect.
    require_workload: Mutex<Option<federation::model::ClusterId>>,
}

impl Xds {
    pub fn new(settings: ViewSettings, options: XdsOptions, metrics: Arc<Metrics>) -> Self {
        let (generations, _) = watch::channel(None);
        Self {
            inner: Arc::new(Inner {
                settings,
                options,
                generations,
                metrics,
                clients: Mutex::new(BTreeMap::new()),
                next_client: AtomicU64::new(1),
                shutdown: CancellationToken::new(),
                require_workload: Mutex::new(None),
                last_views: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Require every stream to come over mTLS with a workload certificate of `cluster`.
    pub fn require_workload_of(&self, cluster: federation::model::ClusterId) {
        *self
            .inner
            .require_workload
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(cluster);
    }

    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(cluster) = self
            .inner
            .require_workload
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return Ok(());
        };
        let refuse = |why: String| {
            self.inner.metrics.rejected_streams.fetch_add(1, Relaxed);
            tracing::warn!(peer = ?request.remote_addr(), reason = %why, "xDS client refused");
            Err(Status::permission_denied(why))
        };
        let Some(certs) = request.peer_certs() else {
            return refuse("no client certificate".into());
        };
        let Some(leaf) = certs.first() else {
            return refuse("no client certificate".into());
        };
        match federation::identity::spiffe_id_from_cert(leaf) {
            Ok(id)
                if id.cluster() == cluster.as_str()
                    && id.role() == federation::identity::Role::Workload =>
            {
                Ok(())
            }
            Ok(id) => refuse(format!(
                "{id} is not a workload of cluster {cluster}: only this cluster's workloads get its xDS"
            )),
            Err(e) => refuse(format!("client certificate: {e}")),
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Close every stream.
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
    }

    /// True once a generation has been published (streams are served from then on).
    pub fn ready(&self) -> bool {
        self.inner.generations.borrow().is_some()
    }

    /// How many views are cached as the base of the next generation's (one per distinct view
    /// of the connected proxies).
    pub fn cached_views(&self) -> usize {
        self.inner
            .last_views
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// The current generation, if any.
    pub fn generation(&self) -> Option<Arc<Generation>> {
        self.inner.generations.borrow().clone()
    }

    /// Publish a snapshot as a new generation now.
    pub fn publish(&self, snapshot: Arc<Snapshot>, seen: Instant) {
        let id = self.inner.metrics.generations.fetch_add(1, Relaxed) + 1;
        let g = Arc::new(Generation {
            id,
            snapshot,
            seen,
            views: Mutex::new(HashMap::new()),
        });
        self.inner.generations.send_replace(Some(g));
    }

    /// Follow a registry cache: publish its snapshots as generations, debounced. `synced`
    /// gates the first one (proxies must never be sent the empty state of a cache that has not
    /// loaded yet).
    pub async fn follow(
        self,
        snapshots: watch::Receiver<Arc<Snapshot>>,
        synced: watch::Receiver<bool>,
    ) {
        self.follow_with_local(snapshots, synced, None).await
    }

    /// [`Self::follow`], with this cluster's own entries taken from `local` (what its
    /// publisher writes: the discovery source) rather than from the registry, which can lose
    /// them for a while (the lease expired during an etcd partition and the publisher has not
    /// written them again yet) — the cluster's own proxies keep their local endpoints.
    pub async fn follow_with_local(
        self,
        mut snapshots: watch::Receiver<Arc<Snapshot>>,
        mut synced: watch::Receiver<bool>,
        mut local: Option<watch::Receiver<BTreeMap<String, Vec<u8>>>>,
    ) {
        let shutdown = self.inner.shutdown.clone();
        let opts = self.inner.options.clone();
        tokio::select! {
            _ = synced.wait_for(|s| *s) => {}
            _ = shutdown.cancelled() => return,
        }
        let mut last: Option<Arc<Snapshot>> = None;
        let mut local_state: Option<LocalState> = None;
        let mut local_dirty = true;
        loop {
            let seen = Instant::now();
            // Debounce: wait for a quiet period, at most max_delay.
            let deadline = tokio::time::Instant::now() + opts.max_delay;
            if last.is_some() {
                loop {
                    snapshots.mark_unchanged();
                    let quiet = tokio::time::sleep(opts.debounce);
                    tokio::select! {
                        _ = quiet => break,
                        _ = tokio::time::sleep_until(deadline) => break,
                        r = snapshots.changed() => if r.is_err() { return },
                        _ = shutdown.cancelled() => return,
                    }
                    if tokio::time::Instant::now() >= deadline {
                        break;
                    }
                }
            }
            if let Some(l) = local.as_mut()
                && (local_dirty || l.has_changed().unwrap_or(false))
            {
                let kvs = l.borrow_and_update().clone();
                match LocalState::decode(&kvs) {
                    Ok(state) => local_state = Some(state),
                    Err(e) => tracing::warn!("this cluster's own state cannot be decoded: {e}"),
                }
                local_dirty = true;
            }
            let snap = snapshots.borrow_and_update().clone();
            if local_dirty || last.as_ref().is_none_or(|l| !Arc::ptr_eq(l, &snap)) {
                let effective = local_state
                    .as_mut()
                    .and_then(|ls| snap.overlay(ls))
                    .map(Arc::new)
                    .unwrap_or_else(|| snap.clone());
                self.publish(effective, seen);
                last = Some(snap);
                local_dirty = false;
            }
            tokio::select! {
                r = snapshots.changed() => if r.is_err() { return },
                _ = local_changed(&mut local) => local_dirty = true,
                _ = shutdown.cancelled() => return,
            }
        }
    }

    async fn view(&self, g: &Arc<Generation>, key: &ViewKey) -> Arc<View> {
        let cell = {
            let mut views = g.views.lock().unwrap_or_else(|p| p.into_inner());
            views.entry(key.clone()).or_default().clone()
        };
        cell.get_or_init(|| async {
            let snapshot = g.snapshot.clone();
            let key = key.clone();
            let settings = self.inner.settings.clone();
            let prev = self
                .inner
                .last_views
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&key)
                .cloned();
            self.inner.metrics.view_builds.fetch_add(1, Relaxed);
            let k2 = key.clone();
            let s2 = snapshot.clone();
            let metrics = self.inner.metrics.clone();
            let built = tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                let prev = prev.as_ref().map(|(s, v)| (&**s, &**v));
                let v = view::build_from(&s2, &k2, &settings, prev);
                metrics.view_build.observe(started.elapsed());
                v
            })
            .await;
            match built {
                Ok(v) => {
                    let v = Arc::new(v);
                    // Lock order: clients, then last_views (as on disconnect).
                    let clients = self.inner.clients.lock().unwrap_or_else(|p| p.into_inner());
                    let mut last = self
                        .inner
                        .last_views
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    // Keep the newest generation's view as the base for the next one, while a
                    // proxy with this view is connected.
                    if clients.values().any(|c| c.node.key == key)
                        && last
                            .get(&key)
                            .is_none_or(|(s, _)| s.revision <= snapshot.revision)
                    {
                        last.insert(key, (snapshot, v.clone()));
                        self.inner
                            .metrics
                            .views_cached
                            .store(last.len() as u64, Relaxed);
                    }
                    v
                }
                Err(e) => {
                    tracing::error!(error = %e, "building a proxy view failed");
                    Arc::new(View::default())
                }
            }
        })
        .await
        .clone()
    }

    /// The resources computed for `node_id`'s view in the current generation, and what it was
    /// last sent, for `/debug/config`.
    pub fn clients(&self) -> Vec<Arc<ClientRecord>> {
        self.inner
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn outbox<T: Send + 'static>() -> (mpsc::Sender<Result<T, Status>>, BoxStream<T>) {
    let (tx, mut rx) = mpsc::channel::<Result<T, Status>>(4);
    let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    (tx, Box::pin(stream))
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Xds {
    type StreamAggregatedResourcesStream = BoxStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        self.authorize(&request)?;
        let peer = request.remote_addr();
        let (tx, stream) = outbox();
        let session = Session::new(self.clone(), false, peer);
        tokio::spawn(session.run(Inbound::Sotw(request.into_inner()), Outbound::Sotw(tx)));
        Ok(Response::new(stream))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        self.authorize(&request)?;
        let peer = request.remote_addr();
        let (tx, stream) = outbox();
        let session = Session::new(self.clone(), true, peer);
        tokio::spawn(session.run(Inbound::Delta(request.into_inner()), Outbound::Delta(tx)));
        Ok(Response::new(stream))
    }
}

enum Inbound {
    Sotw(Streaming<DiscoveryRequest>),
    Delta(Streaming<DeltaDiscoveryRequest>),
}

enum Outbound {
    Sotw(mpsc::Sender<Result<DiscoveryResponse, Status>>),
    Delta(mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>),
}

struct Session {
    xds: Xds,
    delta: bool,
    peer: String,
    client_id: u64,
    node: Option<NodeInfo>,
    record: Option<Arc<ClientRecord>>,
    /// The stream's ADS state machine; this task does its I/O.
    machine: AdsSession,
    warned_types: BTreeSet<String>,
}

enum Fatal {
    Gone,
    Refuse(Status),
}

impl Session {
    fn new(xds: Xds, delta: bool, peer: Option<std::net::SocketAddr>) -> Self {
        let client_id = xds.inner.next_client.fetch_add(1, Relaxed);
        Self {
            machine: AdsSession::new(delta, xds.inner.options.max_response_bytes),
            xds,
            delta,
            peer: peer.map_or_else(|| "unknown".to_string(), |p| p.to_string()),
            client_id,
            node: None,
            record: None,
            warned_types: BTreeSet::new(),
        }
    }

    async fn run(mut self, inbound: Inbound, outbound: Outbound) {
        // Requests are read by their own task: `select!` below may drop a pending read, and a
        // dropped read must never lose a message (an ACK lost would stall the stream's type).
        let (req_tx, mut requests) = mpsc::channel::<Result<Req, Status>>(16);
        let reader = tokio::spawn(async move {
            let mut inbound = inbound;
            loop {
                let r = next(&mut inbound).await;
                let end = !matches!(r, Ok(Some(_)));
                let msg = match r {
                    Ok(Some(req)) => Ok(req),
                    Ok(None) => return,
                    Err(status) => Err(status),
                };
                if req_tx.send(msg).await.is_err() || end {
                    return;
                }
            }
        });
        let metrics = self.xds.inner.metrics.clone();
        metrics.streams.fetch_add(1, Relaxed);
        let mut gens = self.xds.inner.generations.subscribe();
        let shutdown = self.xds.inner.shutdown.clone();
        let result: Result<(), Fatal> = async {
            loop {
                self.push(&outbound).await?;
                tokio::select! {
                    r = requests.recv() => match r {
                        Some(Ok(req)) => self.handle(req).await?,
                        None => return Err(Fatal::Gone),
                        Some(Err(status)) => {
                            tracing::debug!(peer = %self.peer, %status, "xDS stream ended");
                            return Err(Fatal::Gone);
                        }
                    },
                    r = gens.changed() => {
                        if r.is_err() {
                            return Err(Fatal::Gone);
                        }
                        let g = gens.borrow_and_update().clone();
                        self.load_generation(&g).await;
                    }
                    _ = shutdown.cancelled() => return Err(Fatal::Gone),
                }
            }
        }
        .await;
        reader.abort();
        if let Err(Fatal::Refuse(status)) = result {
            metrics.rejected_streams.fetch_add(1, Relaxed);
            tracing::warn!(peer = %self.peer, reason = %status.message(), "xDS stream refused");
            match &outbound {
                Outbound::Sotw(tx) => {
                    let _ = tx.try_send(Err(status));
                }
                Outbound::Delta(tx) => {
                    let _ = tx.try_send(Err(status));
                }
            }
        }
        if let Some(node) = &self.node {
            metrics.connected.fetch_sub(1, Relaxed);
            tracing::info!(node = %node.id, peer = %self.peer, "proxy disconnected");
            let mut clients = self
                .xds
                .inner
                .clients
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            clients.remove(&self.client_id);
            // The last proxy of its view is gone: forget the view (labels and localities come
            // and go with workloads; the cache must not grow with every one ever seen).
            if !clients.values().any(|c| c.node.key == node.key) {
                self.xds
                    .inner
                    .last_views
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&node.key);
                let n = self.xds.cached_views();
                self.xds.inner.metrics.views_cached.store(n as u64, Relaxed);
            }
        }
    }

    async fn load_generation(&mut self, g: &Option<Arc<Generation>>) {
        let (Some(g), Some(node)) = (g, &self.node) else {
            return;
        };
        let view = self.xds.view(g, &node.key).await;
        self.machine.set_view(g.id, g.seen, view);
    }

    async fn handle(&mut self, req: Req) -> Result<(), Fatal> {
        if self.node.is_none() {
            let Some(node) = &req.node else {
                return Err(Fatal::Refuse(Status::invalid_argument(
                    "the first xDS request must carry the node",
                )));
            };
            let s = &self.xds.inner.settings;
            let info = NodeInfo::parse(node, &s.cluster, &s.region)
                .map_err(|e| Fatal::Refuse(Status::invalid_argument(e)))?;
            tracing::info!(node = %info.id, peer = %self.peer, kind = ?info.key.kind,
                locality = %info.key.locality, delta = self.delta, "proxy connected");
            let record = Arc::new(ClientRecord {
                node: info.clone(),
                delta: self.delta,
                connected: SystemTime::now(),
                sent: Default::default(),
                acked: Default::default(),
                last_nack: Mutex::new(None),
            });
            self.xds
                .inner
                .clients
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(self.client_id, record.clone());
            self.xds.inner.metrics.connected.fetch_add(1, Relaxed);
            self.record = Some(record);
            self.node = Some(info);
            let g = self.xds.inner.generations.borrow().clone();
            self.load_generation(&g).await;
        }
        let metrics = &self.xds.inner.metrics;
        match self.machine.handle(req) {
            None => {}
            Some(Event::UnknownType(url)) => {
                metrics.unknown_types.fetch_add(1, Relaxed);
                if self.warned_types.len() < 16 && self.warned_types.insert(url.clone()) {
                    tracing::warn!(node = %self.node_id(), type_url = %url,
                        "request for a resource type this server does not serve; ignored");
                }
            }
            Some(Event::StaleNonce { t, nonce }) => {
                metrics.stale_nonces.fetch_add(1, Relaxed);
                tracing::debug!(node = %self.node_id(), type_ = t.short(), %nonce,
                    "stale or unknown nonce; request ignored");
            }
            Some(Event::Nack { t, nonce, error }) => {
                metrics.nacks[t as usize].fetch_add(1, Relaxed);
                tracing::warn!(node = %self.node_id(), type_ = t.short(), %nonce, %error,
                    "proxy rejected a response (NACK); it keeps its last good config");
                if let Some(r) = &self.record {
                    *r.last_nack.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(format!("{}: {error}", t.short()));
                }
            }
            Some(Event::Ack {
                t,
                nonce,
                converged,
            }) => {
                metrics.acks[t as usize].fetch_add(1, Relaxed);
                if let Some(seen) = converged {
                    metrics.convergence.observe(seen.elapsed());
                }
                if let Some(r) = &self.record {
                    r.acked.lock().unwrap_or_else(|p| p.into_inner())[t as usize] = Some(nonce);
                }
            }
        }
        Ok(())
    }

    fn node_id(&self) -> &str {
        self.node.as_ref().map_or("?", |n| n.id.as_str())
    }

    /// Send every response the state machine has, and keep the debug record of what the
    /// client holds.
    async fn push(&mut self, outbound: &Outbound) -> Result<(), Fatal> {
        while let Some(out) = self.machine.poll_response() {
            let t = out.t;
            self.xds.inner.metrics.pushes[t as usize].fetch_add(1, Relaxed);
            if let Some(rec) = &self.record {
                let mut held = rec.sent.lock().unwrap_or_else(|p| p.into_inner());
                if out.in_place {
                    for n in &out.removed {
                        held[t as usize].remove(n);
                    }
                    for r in &out.changed {
                        held[t as usize].insert(r.name.clone(), r.clone());
                    }
                } else {
                    held[t as usize] = self.machine.held(t).clone();
                }
            }
            match (out.message, outbound) {
                (Message::Delta(m), Outbound::Delta(tx)) => {
                    send(&self.xds, tx, m, self.node.as_ref()).await?;
                }
                (Message::Sotw(m), Outbound::Sotw(tx)) => {
                    send(&self.xds, tx, m, self.node.as_ref()).await?;
                }
                _ => return Err(Fatal::Gone),
            }
        }
        for t in self.machine.take_adopted() {
            if let Some(rec) = &self.record {
                rec.sent.lock().unwrap_or_else(|p| p.into_inner())[t as usize] =
                    self.machine.held(t).clone();
            }
        }
        Ok(())
    }
}

async fn next(inbound: &mut Inbound) -> Result<Option<Req>, Status> {
    match inbound {
        Inbound::Sotw(s) => Ok(s.message().await?.map(Req::from)),
        Inbound::Delta(s) => Ok(s.message().await?.map(Req::from)),
    }
}

async fn send<T>(
    xds: &Xds,
    tx: &mpsc::Sender<Result<T, Status>>,
    msg: T,
    node: Option<&NodeInfo>,
) -> Result<(), Fatal> {
    match tokio::time::timeout(xds.inner.options.send_timeout, tx.send(Ok(msg))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Fatal::Gone),
        Err(_) => {
            xds.inner.metrics.slow_clients.fetch_add(1, Relaxed);
            tracing::warn!(node = node.map_or("?", |n| n.id.as_str()),
                timeout = ?xds.inner.options.send_timeout,
                "proxy stopped reading its xDS stream; closing it");
            Err(Fatal::Gone)
        }
    }
}

/// Resolves when `local` changes; never when there is none (or it is closed).
async fn local_changed(local: &mut Option<watch::Receiver<BTreeMap<String, Vec<u8>>>>) {
    if let Some(l) = local
        && l.changed().await.is_ok()
    {
        return;
    }
    std::future::pending().await
}
