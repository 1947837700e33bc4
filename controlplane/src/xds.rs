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

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    Resource as DeltaResource,
};
use federation::registry::Snapshot;
use federation::registry::cache::LocalState;
use futures::Stream;
use tokio::sync::{OnceCell, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::metrics::Metrics;
use crate::view::{self, NodeInfo, ORDER, Resource, TypeKind, View, ViewKey, ViewSettings};

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

/// A request of either protocol, normalised.
struct Req {
    node: Option<Node>,
    type_url: String,
    nonce: String,
    error: Option<String>,
    /// SotW: the full list of names.
    names: Option<Vec<String>>,
    /// Delta: changes.
    subscribe: Vec<String>,
    unsubscribe: Vec<String>,
    initial_versions: HashMap<String, String>,
}

impl From<DiscoveryRequest> for Req {
    fn from(r: DiscoveryRequest) -> Self {
        Self {
            node: r.node,
            type_url: r.type_url,
            nonce: r.response_nonce,
            error: r
                .error_detail
                .map(|e| format!("code {}: {}", e.code, e.message)),
            names: Some(r.resource_names),
            subscribe: Vec::new(),
            unsubscribe: Vec::new(),
            initial_versions: HashMap::new(),
        }
    }
}

impl From<DeltaDiscoveryRequest> for Req {
    fn from(r: DeltaDiscoveryRequest) -> Self {
        Self {
            node: r.node,
            type_url: r.type_url,
            nonce: r.response_nonce,
            error: r
                .error_detail
                .map(|e| format!("code {}: {}", e.code, e.message)),
            names: None,
            subscribe: r.resource_names_subscribe,
            unsubscribe: r.resource_names_unsubscribe,
            initial_versions: r.initial_resource_versions,
        }
    }
}

/// Per-type stream state.
#[derive(Default)]
struct TypeState {
    /// A request for this type has been seen.
    subscribed: bool,
    wildcard: bool,
    names: BTreeSet<String>,
    /// SotW: the last response's resources. Delta: what the client holds, by our account.
    sent: BTreeMap<String, Arc<Resource>>,
    /// Delta: versions the client said it had on (re)connect, not yet confirmed.
    client_versions: HashMap<String, String>,
    /// Delta: named subscriptions already told they do not exist.
    told_absent: BTreeSet<String>,
    /// The nonce of the response awaiting its ACK/NACK, and the generation it carried.
    inflight: Option<(String, u64, Instant, bool)>,
    /// The latest nonce sent for this type (empty: nothing sent yet).
    last_nonce: String,
    /// Clusters referred to by what the client acknowledged (listeners, routes).
    acked_refs: BTreeSet<String>,
    /// Re-send these even if unchanged (endpoints of a changed cluster).
    force: BTreeSet<String>,
    /// An ACK was seen (later pushes count towards convergence).
    acked_once: bool,
    /// The id of the view whose desired state `sent` was last brought to (nothing else
    /// changed since): from there only the view's diff needs looking at.
    synced: Option<u64>,
    /// Delta: the last response was one part of a larger update; more is to come.
    incomplete: bool,
    /// Delta: the last name of the last part sent; the next part starts after it.
    resume_after: Option<String>,
}

struct Session {
    xds: Xds,
    delta: bool,
    peer: String,
    client_id: u64,
    node: Option<NodeInfo>,
    record: Option<Arc<ClientRecord>>,
    types: [TypeState; 4],
    nonce: u64,
    warned_types: BTreeSet<String>,
    generation: Option<Arc<Generation>>,
    view: Option<Arc<View>>,
}

enum Fatal {
    Gone,
    Refuse(Status),
}

impl Session {
    fn new(xds: Xds, delta: bool, peer: Option<std::net::SocketAddr>) -> Self {
        let client_id = xds.inner.next_client.fetch_add(1, Relaxed);
        Self {
            xds,
            delta,
            peer: peer.map_or_else(|| "unknown".to_string(), |p| p.to_string()),
            client_id,
            node: None,
            record: None,
            types: Default::default(),
            nonce: 0,
            warned_types: BTreeSet::new(),
            generation: None,
            view: None,
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
        self.view = Some(self.xds.view(g, &node.key).await);
        self.generation = Some(g.clone());
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
        let Some(t) = TypeKind::from_url(&req.type_url) else {
            self.xds.inner.metrics.unknown_types.fetch_add(1, Relaxed);
            if self.warned_types.len() < 16 && self.warned_types.insert(req.type_url.clone()) {
                tracing::warn!(node = %self.node_id(), type_url = %req.type_url,
                    "request for a resource type this server does not serve; ignored");
            }
            return Ok(());
        };
        let metrics = self.xds.inner.metrics.clone();
        let node_id = self.node_id().to_string();
        let delta = self.delta;
        let ts = &mut self.types[t as usize];
        if !req.nonce.is_empty() {
            if req.nonce != ts.last_nonce {
                metrics.stale_nonces.fetch_add(1, Relaxed);
                tracing::debug!(node = %node_id, type_ = t.short(), nonce = %req.nonce,
                    "stale or unknown nonce; request ignored");
                if !delta {
                    return Ok(());
                }
            } else if let Some((_, _, seen, counts)) = ts.inflight.take() {
                match &req.error {
                    Some(err) => {
                        metrics.nacks[t as usize].fetch_add(1, Relaxed);
                        tracing::warn!(node = %node_id, type_ = t.short(), nonce = %req.nonce,
                            error = %err, "proxy rejected a response (NACK); it keeps its last good config");
                        if let Some(r) = &self.record {
                            *r.last_nack.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some(format!("{}: {err}", t.short()));
                        }
                    }
                    None => {
                        metrics.acks[t as usize].fetch_add(1, Relaxed);
                        if counts && ts.acked_once {
                            metrics.convergence.observe(seen.elapsed());
                        }
                        ts.acked_once = true;
                        let refs: BTreeSet<String> = ts
                            .sent
                            .values()
                            .flat_map(|r| r.refs.iter().cloned())
                            .collect();
                        let refs_changed = refs != ts.acked_refs;
                        ts.acked_refs = refs;
                        if refs_changed {
                            // Clusters kept for the old listeners or routes may go now.
                            self.types[TypeKind::Cluster as usize].synced = None;
                        }
                        if let Some(r) = &self.record {
                            r.acked.lock().unwrap_or_else(|p| p.into_inner())[t as usize] =
                                Some(req.nonce.clone());
                        }
                    }
                }
            }
        }
        let ts = &mut self.types[t as usize];
        ts.subscribed = true;
        match req.names {
            Some(names) => {
                // State of the world: the full list each time.
                let wildcard =
                    names.iter().any(|n| n == "*") || (names.is_empty() && t.wildcard_by_default());
                let names: BTreeSet<String> = names.into_iter().filter(|n| n != "*").collect();
                if wildcard != ts.wildcard || names != ts.names {
                    ts.synced = None;
                }
                ts.wildcard = wildcard;
                ts.names = names;
            }
            None => {
                if !req.subscribe.is_empty()
                    || !req.unsubscribe.is_empty()
                    || !req.initial_versions.is_empty()
                    || ts.last_nonce.is_empty()
                {
                    ts.synced = None;
                }
                let first = ts.last_nonce.is_empty() && ts.names.is_empty() && !ts.wildcard;
                if first && req.subscribe.is_empty() && t.wildcard_by_default() {
                    ts.wildcard = true;
                }
                for n in req.subscribe {
                    if n == "*" {
                        ts.wildcard = true;
                    } else {
                        ts.names.insert(n);
                    }
                }
                let dropped = !req.unsubscribe.is_empty();
                for n in req.unsubscribe {
                    if n == "*" {
                        ts.wildcard = false;
                    } else {
                        ts.names.remove(&n);
                        ts.sent.remove(&n);
                        ts.told_absent.remove(&n);
                    }
                }
                ts.client_versions.extend(req.initial_versions);
                if dropped {
                    match t {
                        // Which endpoints are kept depends on the clusters the client holds.
                        TypeKind::Cluster => self.types[TypeKind::Endpoint as usize].synced = None,
                        // The client no longer holds what it unsubscribed: its clusters need
                        // not be kept for it.
                        TypeKind::Listener | TypeKind::Route => {
                            let ts = &mut self.types[t as usize];
                            ts.acked_refs = ts
                                .sent
                                .values()
                                .flat_map(|r| r.refs.iter().cloned())
                                .collect();
                            self.types[TypeKind::Cluster as usize].synced = None;
                        }
                        TypeKind::Endpoint => {}
                    }
                }
            }
        }
        Ok(())
    }

    fn node_id(&self) -> &str {
        self.node.as_ref().map_or("?", |n| n.id.as_str())
    }

    /// What the client should hold of type `t` now.
    fn desired(&self, t: TypeKind, view: &View) -> BTreeMap<String, Arc<Resource>> {
        let ts = &self.types[t as usize];
        let all = view.get(t);
        let mut out: BTreeMap<String, Arc<Resource>> = if ts.wildcard {
            all.clone()
        } else {
            ts.names
                .iter()
                .filter_map(|n| all.get(n).map(|r| (n.clone(), r.clone())))
                .collect()
        };
        match t {
            TypeKind::Cluster => {
                // Keep clusters the client's acknowledged listeners and routes still use.
                let refs: BTreeSet<&String> = self.types[TypeKind::Listener as usize]
                    .acked_refs
                    .iter()
                    .chain(self.types[TypeKind::Route as usize].acked_refs.iter())
                    .collect();
                for (n, r) in &ts.sent {
                    if !out.contains_key(n) && refs.contains(n) {
                        out.insert(n.clone(), r.clone());
                    }
                }
            }
            TypeKind::Endpoint => {
                // ... and their endpoints.
                let kept = &self.types[TypeKind::Cluster as usize].sent;
                for (n, r) in &ts.sent {
                    if !out.contains_key(n)
                        && kept.contains_key(n)
                        && !view.get(TypeKind::Cluster).contains_key(n)
                        && (ts.wildcard || ts.names.contains(n))
                    {
                        out.insert(n.clone(), r.clone());
                    }
                }
            }
            _ => {}
        }
        out
    }

    /// [`Self::desired`] for one name: what the client should hold under `name` now.
    fn desired_one(&self, t: TypeKind, name: &str, view: &View) -> Option<Arc<Resource>> {
        let ts = &self.types[t as usize];
        let subscribed = ts.wildcard || ts.names.contains(name);
        if subscribed && let Some(r) = view.get(t).get(name) {
            return Some(r.clone());
        }
        let sent = ts.sent.get(name)?;
        let keep = match t {
            TypeKind::Cluster => {
                self.types[TypeKind::Listener as usize]
                    .acked_refs
                    .contains(name)
                    || self.types[TypeKind::Route as usize]
                        .acked_refs
                        .contains(name)
            }
            TypeKind::Endpoint => {
                subscribed
                    && self.types[TypeKind::Cluster as usize]
                        .sent
                        .contains_key(name)
                    && !view.get(TypeKind::Cluster).contains_key(name)
            }
            _ => false,
        };
        keep.then(|| sent.clone())
    }

    /// The names that may differ between what the client holds of type `t` and what it should
    /// hold, when that is known without looking at every resource: the view's diff since the
    /// view `sent` was last brought to, plus the names to re-send.
    fn candidates(&self, t: TypeKind, view: &View) -> Option<BTreeSet<String>> {
        let ts = &self.types[t as usize];
        if !ts.client_versions.is_empty() {
            return None;
        }
        let mut out = match ts.synced {
            Some(id) if id == view.id && id != 0 => BTreeSet::new(),
            Some(id) => match &view.diff {
                Some(d) if d.base == id && id != 0 => d.changed[t as usize].clone(),
                _ => return None,
            },
            None => return None,
        };
        out.extend(ts.force.iter().cloned());
        Some(out)
    }

    async fn push(&mut self, outbound: &Outbound) -> Result<(), Fatal> {
        let (Some(view), Some(g)) = (self.view.clone(), self.generation.clone()) else {
            return Ok(());
        };
        for t in ORDER {
            let ts = &self.types[t as usize];
            if ts.incomplete && ts.inflight.is_some() {
                // Make-before-break: later types wait until this one's update is complete.
                break;
            }
            if !ts.subscribed || ts.inflight.is_some() {
                continue;
            }
            let candidates = self.candidates(t, &view);
            if candidates.as_ref().is_some_and(|c| c.is_empty()) {
                // Nothing can have changed for this type.
                self.types[t as usize].synced = Some(view.id);
                self.types[t as usize].incomplete = false;
                continue;
            }
            let nonce = format!("{}", self.nonce + 1);
            // (changed resources, removed names, whether `sent` was updated in place, whether
            // more remains to be sent)
            let (sent, removed, in_place, partial) = if self.delta {
                let mut changed: Vec<Arc<Resource>> = Vec::new();
                let mut removed: Vec<String> = Vec::new();
                match &candidates {
                    Some(names) => {
                        // Only the names that may differ.
                        for n in names {
                            let want = self.desired_one(t, n, &view);
                            let ts = &self.types[t as usize];
                            match want {
                                Some(r) => {
                                    let have = ts.sent.get(n).map(|s| s.version.as_str());
                                    if have != Some(r.version.as_str()) || ts.force.contains(n) {
                                        changed.push(r);
                                    }
                                }
                                None => {
                                    if ts.sent.contains_key(n)
                                        || (!ts.wildcard
                                            && ts.names.contains(n)
                                            && !ts.told_absent.contains(n))
                                    {
                                        removed.push(n.clone());
                                    }
                                }
                            }
                        }
                    }
                    None => {
                        let want = self.desired(t, &view);
                        let ts = &self.types[t as usize];
                        // Resources the client said it holds (delta reconnect) in the version
                        // it should: not sent again, but recorded as held.
                        let mut adopt: Vec<Arc<Resource>> = Vec::new();
                        for (n, r) in &want {
                            let sent = ts.sent.get(n).map(|s| s.version.as_str());
                            let held = ts.client_versions.get(n).map(String::as_str);
                            let have = sent.or(held);
                            if have != Some(r.version.as_str()) || ts.force.contains(n) {
                                changed.push(r.clone());
                            } else if sent.is_none() {
                                adopt.push(r.clone());
                            }
                        }
                        removed.extend(ts.sent.keys().filter(|n| !want.contains_key(*n)).cloned());
                        removed.extend(
                            ts.client_versions
                                .keys()
                                .filter(|n| !want.contains_key(*n) && !ts.sent.contains_key(*n))
                                .cloned(),
                        );
                        if !ts.wildcard {
                            for n in &ts.names {
                                if !want.contains_key(n)
                                    && !ts.sent.contains_key(n)
                                    && !ts.told_absent.contains(n)
                                {
                                    removed.push(n.clone());
                                }
                            }
                        }
                        if !adopt.is_empty() {
                            let ts = &mut self.types[t as usize];
                            for r in &adopt {
                                ts.sent.insert(r.name.clone(), r.clone());
                            }
                            if let Some(rec) = &self.record {
                                rec.sent.lock().unwrap_or_else(|p| p.into_inner())[t as usize] =
                                    ts.sent.clone();
                            }
                        }
                    }
                }
                removed.sort();
                removed.dedup();
                // A large update goes out in parts (each after the previous one's ACK), so no
                // stream holds one huge message; later types wait until this one is complete.
                let budget = self.xds.inner.options.max_response_bytes;
                if let Some(after) = &self.types[t as usize].resume_after {
                    // Continue after the previous part (then wrap): names that change again
                    // and again cannot starve the rest.
                    changed.sort_by_key(|r| r.name.as_str() <= after.as_str());
                }
                let mut size = 0usize;
                let fits = changed
                    .iter()
                    .position(|r| {
                        size += r.body.value.len()
                            + r.body.type_url.len()
                            + r.name.len()
                            + r.version.len();
                        size > budget
                    })
                    .map_or(changed.len(), |i| i.max(1));
                let partial = fits < changed.len();
                changed.truncate(fits);
                self.types[t as usize].resume_after = if partial {
                    changed.last().map(|r| r.name.clone())
                } else {
                    None
                };
                let ts = &mut self.types[t as usize];
                if changed.is_empty() && removed.is_empty() && !ts.last_nonce.is_empty() {
                    ts.client_versions.clear();
                    ts.force.clear();
                    ts.synced = Some(view.id);
                    ts.incomplete = false;
                    continue;
                }
                for n in &removed {
                    ts.sent.remove(n);
                    if ts.names.contains(n) {
                        ts.told_absent.insert(n.clone());
                    }
                }
                for r in &changed {
                    ts.sent.insert(r.name.clone(), r.clone());
                    ts.told_absent.remove(&r.name);
                }
                if partial {
                    // What was not sent yet is found by the next full comparison.
                    for r in &changed {
                        ts.client_versions.remove(&r.name);
                        ts.force.remove(&r.name);
                    }
                    for n in &removed {
                        ts.client_versions.remove(n);
                    }
                } else {
                    ts.client_versions.clear();
                }
                let resp = DeltaDiscoveryResponse {
                    system_version_info: format!("{}", g.id),
                    resources: changed
                        .iter()
                        .map(|r| DeltaResource {
                            name: r.name.clone(),
                            version: r.version.clone(),
                            resource: Some(r.body.clone()),
                            ..Default::default()
                        })
                        .collect(),
                    type_url: t.url().to_string(),
                    removed_resources: removed.clone(),
                    nonce: nonce.clone(),
                    ..Default::default()
                };
                let Outbound::Delta(tx) = outbound else {
                    return Err(Fatal::Gone);
                };
                send(&self.xds, tx, resp, self.node.as_ref()).await?;
                (changed, removed, candidates.is_some(), partial)
            } else {
                let ts = &self.types[t as usize];
                if let Some(names) = &candidates {
                    // State of the world: skip unless one of the names really changed.
                    let any = names.iter().any(|n| {
                        ts.force.contains(n)
                            || self.desired_one(t, n, &view).map(|r| r.version.clone())
                                != ts.sent.get(n).map(|r| r.version.clone())
                    });
                    if !any && !ts.last_nonce.is_empty() {
                        let ts = &mut self.types[t as usize];
                        ts.force.clear();
                        ts.synced = Some(view.id);
                        continue;
                    }
                }
                let want = self.desired(t, &view);
                let ts = &mut self.types[t as usize];
                let same = !ts.last_nonce.is_empty()
                    && ts.force.is_empty()
                    && want.len() == ts.sent.len()
                    && want
                        .iter()
                        .zip(ts.sent.iter())
                        .all(|((a, ra), (b, rb))| a == b && ra.version == rb.version);
                if same {
                    ts.synced = Some(view.id);
                    continue;
                }
                let changed: Vec<Arc<Resource>> = want
                    .values()
                    .filter(|r| {
                        ts.sent.get(&r.name).map(|s| s.version.as_str()) != Some(r.version.as_str())
                    })
                    .cloned()
                    .collect();
                let resp = DiscoveryResponse {
                    version_info: format!("{}", g.id),
                    resources: want.values().map(|r| r.body.clone()).collect(),
                    type_url: t.url().to_string(),
                    nonce: nonce.clone(),
                    ..Default::default()
                };
                ts.sent = want;
                let Outbound::Sotw(tx) = outbound else {
                    return Err(Fatal::Gone);
                };
                send(&self.xds, tx, resp, self.node.as_ref()).await?;
                (changed, Vec::new(), false, false)
            };
            self.nonce += 1;
            let ts = &mut self.types[t as usize];
            ts.incomplete = partial;
            if partial {
                ts.synced = None;
            } else {
                ts.force.clear();
                ts.synced = Some(view.id);
            }
            ts.last_nonce = nonce.clone();
            ts.inflight = Some((nonce, g.id, g.seen, !sent.is_empty()));
            self.xds.inner.metrics.pushes[t as usize].fetch_add(1, Relaxed);
            if t == TypeKind::Cluster {
                // A changed cluster re-warms: send its endpoints again. Clusters added or
                // removed change which endpoints are kept: look at them all next time.
                let eds = &mut self.types[TypeKind::Endpoint as usize];
                for r in &sent {
                    if eds.sent.contains_key(&r.name) {
                        eds.force.insert(r.name.clone());
                    }
                }
                eds.synced = None;
            }
            if let Some(rec) = &self.record {
                let mut held = rec.sent.lock().unwrap_or_else(|p| p.into_inner());
                let ts = &self.types[t as usize];
                if in_place {
                    for n in &removed {
                        held[t as usize].remove(n);
                    }
                    for r in &sent {
                        held[t as usize].insert(r.name.clone(), r.clone());
                    }
                } else {
                    held[t as usize] = ts.sent.clone();
                }
            }
            if partial {
                // Make-before-break: the types after this one wait until it is complete.
                break;
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
