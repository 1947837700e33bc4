//! The proxy's xDS client: delta ADS to its control plane.
//!
//! - Subscribes to every cluster and listener (wildcard), to the endpoints of the clusters it
//!   holds and to the route configurations its listeners name.
//! - Each response is translated and validated as a whole ([`crate::config`]): if any resource
//!   is refused, the response is NACKed with the errors (resource and field) and nothing of it
//!   is applied; the proxy keeps its last good config.
//! - **Warming**: a config is published only once it is complete (every cluster has its
//!   endpoints, every listener its routes), or after `warm_timeout` with what there is.
//! - **Static stability**: when the control plane is away the last good config stays published;
//!   the client reconnects with jittered backoff and tells the server what it holds
//!   (`initial_resource_versions`), so a resync sends only what changed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use federation::backoff::Backoff;
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, watch};
use tonic::transport::{Channel, Endpoint};

use crate::config::{
    self, ASSIGNMENT_TYPE, Assignment, CLUSTER_TYPE, ClusterConfig, ClusterResource, LISTENER_TYPE,
    ListenerConfig, ListenerKind, ROUTES_TYPE, RouteSource, RouteTable,
};
use crate::tls::TlsSource;

/// Everything the proxy was configured with, validated.
#[derive(Debug, Clone, Default)]
pub struct ProxyConfig {
    pub clusters: BTreeMap<String, Arc<ClusterConfig>>,
    pub assignments: BTreeMap<String, Arc<Assignment>>,
    pub listeners: BTreeMap<String, Arc<ListenerConfig>>,
    pub routes: BTreeMap<String, Arc<RouteTable>>,
    /// Passthrough clusters (`ORIGINAL_DST`): no endpoints, no subscription.
    pub passthrough: BTreeSet<String>,
    /// Resource versions by type URL and name (what the proxy holds).
    pub versions: BTreeMap<&'static str, BTreeMap<String, String>>,
}

impl ProxyConfig {
    /// Route configurations the listeners name.
    fn route_names(&self) -> BTreeSet<String> {
        self.listeners
            .values()
            .filter_map(|l| match &l.kind {
                ListenerKind::Http {
                    routes: RouteSource::Rds(n),
                } => Some(n.clone()),
                _ => None,
            })
            .collect()
    }

    /// What is still missing before this config is complete.
    pub fn missing(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .clusters
            .keys()
            .filter(|c| !self.assignments.contains_key(*c))
            .map(|c| format!("endpoints of cluster {c}"))
            .collect();
        out.extend(
            self.route_names()
                .into_iter()
                .filter(|r| !self.routes.contains_key(r))
                .map(|r| format!("route configuration {r}")),
        );
        out
    }
}

/// The client's connection state, for `/ready` and metrics.
#[derive(Debug, Clone, Default)]
pub struct XdsStatus {
    pub connected: bool,
    /// A complete config has been published at least once.
    pub warm: bool,
    pub acks: u64,
    pub nacks: u64,
    pub last_nack: Option<String>,
    pub last_error: Option<String>,
    pub connects: u64,
    /// The control plane (replica) the current or last stream went to.
    pub server: String,
}

#[derive(Debug, Clone)]
pub struct XdsOptions {
    /// The control plane, e.g. `http://127.0.0.1:15010`.
    pub server: String,
    /// Other replicas of the control plane, tried in turn when a stream to one ends or cannot
    /// be opened (the config is kept meanwhile, and the next stream resumes from it).
    pub fallbacks: Vec<String>,
    /// Mutual TLS to the control plane with the workload certificate (the control plane must
    /// present a workload identity of the proxy's own cluster).
    pub tls: Option<Arc<TlsSource>>,
    pub node: Node,
    /// Publish an incomplete config after this long rather than nothing.
    pub warm_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Delta xDS (default); state of the world when false, and automatically when the server
    /// does not implement delta.
    pub delta: bool,
}

impl XdsOptions {
    pub fn new(server: impl Into<String>, node: Node) -> Self {
        Self {
            server: server.into(),
            fallbacks: Vec::new(),
            tls: None,
            node,
            warm_timeout: Duration::from_secs(15),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            delta: true,
        }
    }
}

/// A running xDS client.
pub struct XdsClient {
    pub config: watch::Receiver<Arc<ProxyConfig>>,
    pub status: watch::Receiver<XdsStatus>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for XdsClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl XdsClient {
    pub fn start(options: XdsOptions) -> Self {
        let (config_tx, config) = watch::channel(Arc::new(ProxyConfig::default()));
        let (status_tx, status) = watch::channel(XdsStatus::default());
        let task = tokio::spawn(run(options, config_tx, status_tx));
        Self {
            config,
            status,
            task,
        }
    }
}

/// How a delta stream ends when the server does not implement delta xDS.
const DELTA_UNIMPLEMENTED: &str = "the control plane does not implement delta xDS";

/// The client's working state across streams.
struct State {
    /// What has been applied (published, or waiting to be while it is incomplete).
    current: ProxyConfig,
    /// Since when `current` has been incomplete and unpublished.
    pending_since: Option<Instant>,
}

async fn run(
    options: XdsOptions,
    config_tx: watch::Sender<Arc<ProxyConfig>>,
    status_tx: watch::Sender<XdsStatus>,
) {
    let mut backoff = Backoff::new(options.backoff_initial, options.backoff_max);
    let mut state = State {
        current: ProxyConfig::default(),
        pending_since: Some(Instant::now()),
    };
    let mut delta = options.delta;
    // Every replica of the control plane, tried in turn.
    let servers: Vec<String> = std::iter::once(options.server.clone())
        .chain(options.fallbacks.iter().cloned())
        .collect();
    let mut current = 0usize;
    loop {
        status_tx.send_modify(|s| s.connects += 1);
        let mut this = options.clone();
        this.server = servers[current % servers.len()].clone();
        let result = if delta {
            stream_once(&this, &mut state, &config_tx, &status_tx, &mut backoff).await
        } else {
            stream_sotw(&this, &mut state, &config_tx, &status_tx, &mut backoff).await
        };
        if delta && result == DELTA_UNIMPLEMENTED {
            tracing::warn!(server = %this.server,
                "the control plane does not serve delta xDS; falling back to state of the world");
            delta = false;
            continue;
        }
        status_tx.send_modify(|s| {
            s.connected = false;
            s.last_error = Some(result.clone());
        });
        current = (current + 1) % servers.len();
        tracing::warn!(server = %this.server, error = %result, next = %servers[current],
            "xDS stream to the control plane ended; keeping the last good config and reconnecting");
        // With several replicas, the next one is tried at once after a stream that was up;
        // back-off applies when every replica failed in turn.
        if servers.len() == 1 || current == 0 {
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }
}

fn subscribe(
    t: &'static str,
    names: Vec<String>,
    initial: HashMap<String, String>,
    node: Option<Node>,
) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node,
        type_url: t.to_string(),
        resource_names_subscribe: names,
        initial_resource_versions: initial,
        ..Default::default()
    }
}

/// A channel to the control plane: plaintext, or mutual TLS with the workload certificate.
async fn connect(
    options: &XdsOptions,
) -> Result<AggregatedDiscoveryServiceClient<Channel>, String> {
    let fail = |e: &dyn std::fmt::Display| format!("cannot connect to {}: {e}", options.server);
    let endpoint = Endpoint::from_shared(options.server.clone())
        .map_err(|e| fail(&e))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    let channel = match &options.tls {
        None => endpoint.connect().await.map_err(|e| fail(&e))?,
        Some(tls) => {
            let tls = tls.clone();
            let connector = tower_fn(move |uri: http::Uri| {
                let tls = tls.clone();
                async move { tls_connect(&tls, &uri).await }
            });
            endpoint
                .connect_with_connector(connector)
                .await
                .map_err(|e| fail(&crate::error_chain(&e)))?
        }
    };
    Ok(AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(256 << 20))
}

async fn tls_connect(
    tls: &TlsSource,
    uri: &http::Uri,
) -> Result<TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>, std::io::Error> {
    let io = |e: String| std::io::Error::other(e);
    let host = uri.host().ok_or_else(|| io(format!("{uri} has no host")))?;
    let port = uri.port_u16().unwrap_or(443);
    let config = tls.config().map_err(|e| io(e.to_string()))?;
    let tcp = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port)).await?;
    let _ = tcp.set_nodelay(true);
    // The control plane is authenticated by its SPIFFE identity; the name is not checked.
    let name = rustls_pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_string())
        .map_err(|e| io(format!("{host}: {e}")))?;
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| io(format!("TLS: {e}")))?;
    Ok(TokioIo::new(stream))
}

/// A `tower` service from a closure (the connector tonic takes).
#[derive(Clone)]
struct TowerFn<F>(F);

fn tower_fn<F>(f: F) -> TowerFn<F> {
    TowerFn(f)
}

impl<F, Fut, T> tower_service::Service<http::Uri> for TowerFn<F>
where
    F: FnMut(http::Uri) -> Fut,
    Fut: std::future::Future<Output = Result<T, std::io::Error>>,
{
    type Response = T;
    type Error = std::io::Error;
    type Future = Fut;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), std::io::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Fut {
        (self.0)(uri)
    }
}

/// One ADS stream, until it fails. Returns why it ended.
async fn stream_once(
    options: &XdsOptions,
    state: &mut State,
    config_tx: &watch::Sender<Arc<ProxyConfig>>,
    status_tx: &watch::Sender<XdsStatus>,
    backoff: &mut Backoff,
) -> String {
    let mut client = match connect(options).await {
        Ok(c) => c,
        Err(e) => return e,
    };
    let (tx, mut rx) = mpsc::channel::<DeltaDiscoveryRequest>(64);
    let held = |t: &'static str| -> HashMap<String, String> {
        state
            .current
            .versions
            .get(t)
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    };
    // Wildcard clusters and listeners; the endpoints and routes already held, by name.
    let eds: Vec<String> = state.current.clusters.keys().cloned().collect();
    let rds: Vec<String> = state.current.route_names().into_iter().collect();
    let mut first = vec![
        subscribe(
            CLUSTER_TYPE,
            Vec::new(),
            held(CLUSTER_TYPE),
            Some(options.node.clone()),
        ),
        subscribe(LISTENER_TYPE, Vec::new(), held(LISTENER_TYPE), None),
    ];
    // (An empty first subscription would ask for everything: only with names.)
    if !eds.is_empty() {
        first.push(subscribe(ASSIGNMENT_TYPE, eds, held(ASSIGNMENT_TYPE), None));
    }
    if !rds.is_empty() {
        first.push(subscribe(ROUTES_TYPE, rds, held(ROUTES_TYPE), None));
    }
    for r in first {
        if tx.send(r).await.is_err() {
            return "request channel closed".into();
        }
    }
    let requests = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut responses = match client.delta_aggregated_resources(requests).await {
        Ok(r) => r.into_inner(),
        Err(e) if e.code() == tonic::Code::Unimplemented => return DELTA_UNIMPLEMENTED.into(),
        Err(e) => return format!("ADS stream refused: {e}"),
    };
    opened(options, status_tx, "delta");
    loop {
        let resp = match next_response(&mut responses, state, options, config_tx, status_tx).await {
            Ok(r) => r,
            Err(why) => return why,
        };
        backoff.reset();
        let (follow_ups, error) = apply(&mut state.current, &resp);
        let ack = DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            error_detail: error.as_deref().map(nack_status),
            ..Default::default()
        };
        // Subscriptions first, then the ACK (the server answers them together).
        for r in follow_ups.into_iter().chain(std::iter::once(ack)) {
            if tx.send(r).await.is_err() {
                return "request channel closed".into();
            }
        }
        settle(state, config_tx, status_tx, &resp.type_url, error);
    }
}

fn opened(options: &XdsOptions, status_tx: &watch::Sender<XdsStatus>, kind: &str) {
    status_tx.send_modify(|s| {
        s.connected = true;
        s.last_error = None;
        s.server = options.server.clone();
    });
    tracing::info!(server = %options.server, "xDS stream open ({kind})");
}

/// The next response of a stream; meanwhile an incomplete config is published once its warm-up
/// time is over. `Err`: why the stream ended.
async fn next_response<T>(
    responses: &mut tonic::Streaming<T>,
    state: &mut State,
    options: &XdsOptions,
    config_tx: &watch::Sender<Arc<ProxyConfig>>,
    status_tx: &watch::Sender<XdsStatus>,
) -> Result<T, String> {
    loop {
        tokio::select! {
            r = responses.message() => return match r {
                Ok(Some(r)) => Ok(r),
                Ok(None) => Err("the control plane closed the stream".into()),
                Err(e) => Err(format!("stream failed: {e}")),
            },
            _ = warm_deadline(state, options) => warm_timeout(state, config_tx, status_tx),
        }
    }
}

fn nack_status(message: &str) -> RpcStatus {
    RpcStatus {
        code: 3, // INVALID_ARGUMENT
        message: message.to_string(),
        details: Vec::new(),
    }
}

/// Warming: an incomplete config waits for what it misses, at most `warm_timeout`.
async fn warm_deadline(state: &State, options: &XdsOptions) {
    match state.pending_since {
        Some(t) => {
            tokio::time::sleep_until(tokio::time::Instant::from_std(t + options.warm_timeout)).await
        }
        None => std::future::pending().await,
    }
}

fn warm_timeout(
    state: &mut State,
    config_tx: &watch::Sender<Arc<ProxyConfig>>,
    status_tx: &watch::Sender<XdsStatus>,
) {
    tracing::warn!(missing = ?state.current.missing(),
        "config still incomplete after the warm-up timeout; serving what there is");
    publish(state, config_tx, status_tx, false);
}

/// After a response: count the ACK or NACK, and publish the config once it is complete.
fn settle(
    state: &mut State,
    config_tx: &watch::Sender<Arc<ProxyConfig>>,
    status_tx: &watch::Sender<XdsStatus>,
    type_url: &str,
    error: Option<String>,
) {
    match error {
        Some(e) => {
            tracing::warn!(%type_url, error = %e,
                "rejected an xDS response (NACK); keeping the last good config");
            status_tx.send_modify(|s| {
                s.nacks += 1;
                s.last_nack = Some(e);
            });
        }
        None => {
            status_tx.send_modify(|s| s.acks += 1);
            if state.current.missing().is_empty() {
                publish(state, config_tx, status_tx, true);
            } else if state.pending_since.is_none() {
                state.pending_since = Some(Instant::now());
            }
        }
    }
}

/// One state-of-the-world ADS stream (the fallback for control planes without delta), until
/// it fails. Each response is turned into the delta form `apply` takes: the resources it
/// carries, and for clusters and listeners the ones it no longer lists as removed.
async fn stream_sotw(
    options: &XdsOptions,
    state: &mut State,
    config_tx: &watch::Sender<Arc<ProxyConfig>>,
    status_tx: &watch::Sender<XdsStatus>,
    backoff: &mut Backoff,
) -> String {
    let mut client = match connect(options).await {
        Ok(c) => c,
        Err(e) => return e,
    };
    let (tx, mut rx) = mpsc::channel::<DiscoveryRequest>(64);
    // Per type: the last accepted version and the last nonce.
    let mut versions: HashMap<&'static str, String> = HashMap::new();
    let mut nonces: HashMap<&'static str, String> = HashMap::new();
    let names_for = |cfg: &ProxyConfig, t: &str| -> Vec<String> {
        match t {
            ASSIGNMENT_TYPE => cfg.clusters.keys().cloned().collect(),
            ROUTES_TYPE => cfg.route_names().into_iter().collect(),
            _ => Vec::new(),
        }
    };
    let mut first = vec![
        DiscoveryRequest {
            node: Some(options.node.clone()),
            type_url: CLUSTER_TYPE.into(),
            ..Default::default()
        },
        DiscoveryRequest {
            type_url: LISTENER_TYPE.into(),
            ..Default::default()
        },
    ];
    for t in [ASSIGNMENT_TYPE, ROUTES_TYPE] {
        let names = names_for(&state.current, t);
        if !names.is_empty() {
            first.push(DiscoveryRequest {
                type_url: t.into(),
                resource_names: names,
                ..Default::default()
            });
        }
    }
    for r in first {
        if tx.send(r).await.is_err() {
            return "request channel closed".into();
        }
    }
    let requests = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut responses = match client.stream_aggregated_resources(requests).await {
        Ok(r) => r.into_inner(),
        Err(e) => return format!("ADS stream refused: {e}"),
    };
    opened(options, status_tx, "state of the world");
    loop {
        let resp = match next_response(&mut responses, state, options, config_tx, status_tx).await {
            Ok(r) => r,
            Err(why) => return why,
        };
        backoff.reset();
        let Some(t) = [CLUSTER_TYPE, ASSIGNMENT_TYPE, LISTENER_TYPE, ROUTES_TYPE]
            .into_iter()
            .find(|t| *t == resp.type_url)
        else {
            let nack = DiscoveryRequest {
                type_url: resp.type_url.clone(),
                response_nonce: resp.nonce.clone(),
                error_detail: Some(nack_status("type not supported")),
                ..Default::default()
            };
            if tx.send(nack).await.is_err() {
                return "request channel closed".into();
            }
            continue;
        };
        nonces.insert(t, resp.nonce.clone());
        // The delta form of this response.
        let mut names = Vec::with_capacity(resp.resources.len());
        let mut bad = None;
        for any in &resp.resources {
            match config::resource_name(any) {
                Some(n) => names.push(n),
                None => {
                    bad = Some(format!(
                        "a resource of type {} cannot be decoded",
                        any.type_url
                    ))
                }
            }
        }
        let removed: Vec<String> = if t == CLUSTER_TYPE || t == LISTENER_TYPE {
            let present: BTreeSet<&String> = names.iter().collect();
            state
                .current
                .versions
                .get(t)
                .map(|held| {
                    held.keys()
                        .filter(|k| !present.contains(k))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let delta = DeltaDiscoveryResponse {
            type_url: t.to_string(),
            nonce: resp.nonce.clone(),
            removed_resources: removed,
            resources: resp
                .resources
                .iter()
                .zip(&names)
                .map(
                    |(any, name)| envoy_types::pb::envoy::service::discovery::v3::Resource {
                        name: name.clone(),
                        version: resp.version_info.clone(),
                        resource: Some(any.clone()),
                        ..Default::default()
                    },
                )
                .collect(),
            ..Default::default()
        };
        let (follow_ups, error) = match bad {
            Some(e) => (Vec::new(), Some(e)),
            None => apply(&mut state.current, &delta),
        };
        if error.is_none() {
            versions.insert(t, resp.version_info.clone());
        }
        let ack = DiscoveryRequest {
            version_info: versions.get(t).cloned().unwrap_or_default(),
            type_url: t.into(),
            resource_names: names_for(&state.current, t),
            response_nonce: resp.nonce.clone(),
            error_detail: error.as_deref().map(nack_status),
            ..Default::default()
        };
        // The ACK, then new name lists for the types whose subscriptions changed.
        let mut out = vec![ack];
        for f in follow_ups {
            let ft: &'static str = if f.type_url == ASSIGNMENT_TYPE {
                ASSIGNMENT_TYPE
            } else {
                ROUTES_TYPE
            };
            out.push(DiscoveryRequest {
                version_info: versions.get(ft).cloned().unwrap_or_default(),
                type_url: ft.into(),
                resource_names: names_for(&state.current, ft),
                response_nonce: nonces.get(ft).cloned().unwrap_or_default(),
                ..Default::default()
            });
        }
        for r in out {
            if tx.send(r).await.is_err() {
                return "request channel closed".into();
            }
        }
        settle(state, config_tx, status_tx, t, error);
    }
}

fn publish(
    state: &mut State,
    config_tx: &watch::Sender<Arc<ProxyConfig>>,
    status_tx: &watch::Sender<XdsStatus>,
    complete: bool,
) {
    state.pending_since = None;
    // Warm first: whoever sees the complete config sees the status that says so.
    if complete {
        status_tx.send_modify(|s| s.warm = true);
    }
    config_tx.send_replace(Arc::new(state.current.clone()));
}

/// Apply one response to `cfg` if every resource in it translates. Returns the subscription
/// changes it calls for, and the NACK message if it was refused.
fn apply(
    cfg: &mut ProxyConfig,
    resp: &DeltaDiscoveryResponse,
) -> (Vec<DeltaDiscoveryRequest>, Option<String>) {
    let t: &'static str = match resp.type_url.as_str() {
        CLUSTER_TYPE => CLUSTER_TYPE,
        ASSIGNMENT_TYPE => ASSIGNMENT_TYPE,
        LISTENER_TYPE => LISTENER_TYPE,
        ROUTES_TYPE => ROUTES_TYPE,
        other => return (Vec::new(), Some(format!("type {other} is not supported"))),
    };
    let mut errors = Vec::new();
    let mut next = cfg.clone();
    let versions = next.versions.entry(t).or_default();
    for name in &resp.removed_resources {
        versions.remove(name);
    }
    for r in &resp.resources {
        let Some(any) = &r.resource else {
            errors.push(format!("{}: no resource body", r.name));
            continue;
        };
        versions.insert(r.name.clone(), r.version.clone());
        let named = |got: &str| {
            (got != r.name).then(|| format!("{}: the resource inside is named {got:?}", r.name))
        };
        match t {
            CLUSTER_TYPE => match config::cluster_resource(any) {
                Ok(ClusterResource::Eds(c)) => match named(&c.name) {
                    Some(e) => errors.push(e),
                    None => {
                        next.passthrough.remove(&c.name);
                        next.clusters.insert(c.name.clone(), Arc::new(c));
                    }
                },
                Ok(ClusterResource::OriginalDst(name)) => match named(&name) {
                    Some(e) => errors.push(e),
                    None => {
                        next.clusters.remove(&name);
                        next.passthrough.insert(name);
                    }
                },
                Err(e) => errors.push(e.to_string()),
            },
            ASSIGNMENT_TYPE => match config::assignment(any) {
                Ok(a) => match named(&a.cluster) {
                    Some(e) => errors.push(e),
                    None => {
                        next.assignments.insert(a.cluster.clone(), Arc::new(a));
                    }
                },
                Err(e) => errors.push(e.to_string()),
            },
            LISTENER_TYPE => match config::listener(any) {
                Ok(Some(l)) => match named(&l.name) {
                    Some(e) => errors.push(e),
                    None => {
                        next.listeners.insert(l.name.clone(), Arc::new(l));
                    }
                },
                Ok(None) => {}
                Err(e) => errors.push(e.to_string()),
            },
            _ => match config::route_table(any) {
                Ok(rt) => match named(&rt.name) {
                    Some(e) => errors.push(e),
                    None => {
                        next.routes.insert(rt.name.clone(), Arc::new(rt));
                    }
                },
                Err(e) => errors.push(e.to_string()),
            },
        }
    }
    if !errors.is_empty() {
        return (Vec::new(), Some(errors.join("; ")));
    }
    for name in &resp.removed_resources {
        match t {
            CLUSTER_TYPE => {
                next.clusters.remove(name);
                next.passthrough.remove(name);
            }
            ASSIGNMENT_TYPE => {
                next.assignments.remove(name);
            }
            LISTENER_TYPE => {
                next.listeners.remove(name);
            }
            _ => {
                next.routes.remove(name);
            }
        }
    }
    // Follow the clusters with endpoint subscriptions, the listeners with route ones.
    let mut follow = Vec::new();
    let diff = |old: BTreeSet<String>, new: BTreeSet<String>, t: &'static str| {
        let sub: Vec<String> = new.difference(&old).cloned().collect();
        let unsub: Vec<String> = old.difference(&new).cloned().collect();
        (!sub.is_empty() || !unsub.is_empty()).then(|| DeltaDiscoveryRequest {
            type_url: t.to_string(),
            resource_names_subscribe: sub,
            resource_names_unsubscribe: unsub,
            ..Default::default()
        })
    };
    if t == CLUSTER_TYPE {
        let old: BTreeSet<String> = cfg.clusters.keys().cloned().collect();
        let new: BTreeSet<String> = next.clusters.keys().cloned().collect();
        for gone in old.difference(&new) {
            next.assignments.remove(gone);
            if let Some(v) = next.versions.get_mut(ASSIGNMENT_TYPE) {
                v.remove(gone);
            }
        }
        follow.extend(diff(old, new, ASSIGNMENT_TYPE));
    }
    if t == LISTENER_TYPE {
        let old = cfg.route_names();
        let new = next.route_names();
        for gone in old.difference(&new) {
            next.routes.remove(gone);
            if let Some(v) = next.versions.get_mut(ROUTES_TYPE) {
                v.remove(gone);
            }
        }
        follow.extend(diff(old, new, ROUTES_TYPE));
    }
    *cfg = next;
    (follow, None)
}

/// Ask the control plane for a transparent listener on `addr` (node metadata
/// `STRAIT_TRANSPARENT`): where the pod's iptables redirection sends intercepted connections.
pub fn with_transparent(mut node: Node, addr: std::net::SocketAddr) -> Node {
    use envoy_types::pb::google::protobuf::{Value, value::Kind};
    node.metadata
        .get_or_insert_with(Default::default)
        .fields
        .insert(
            federation::xds_contract::META_TRANSPARENT.to_string(),
            Value {
                kind: Some(Kind::StringValue(addr.to_string())),
            },
        );
    node
}

/// The xDS node this proxy introduces itself with: Strait's metadata (cluster, kind, labels,
/// the outbound listener address, whether it reaches other clusters through a gateway
/// (`tunnel`) and sidecars with its workload certificate (`mtls`)) and its locality (`region`,
/// `zone`, `subzone`).
pub fn node(
    id: &str,
    cluster: &str,
    locality: (&str, &str, &str),
    labels: &[(String, String)],
    outbound: std::net::SocketAddr,
    tunnel: bool,
    mtls: bool,
) -> Node {
    use envoy_types::pb::envoy::config::core::v3::Locality;
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
    use federation::xds_contract::{
        KIND_ENVOY, META_CLUSTER, META_KIND, META_LABELS, META_MTLS, META_OUTBOUND, META_TUNNEL,
    };
    let s = |v: &str| Value {
        kind: Some(Kind::StringValue(v.to_string())),
    };
    let labels = Struct {
        fields: labels.iter().map(|(k, v)| (k.clone(), s(v))).collect(),
    };
    let fields = [
        (META_CLUSTER.to_string(), s(cluster)),
        // It takes the same resources as Envoy.
        (META_KIND.to_string(), s(KIND_ENVOY)),
        (
            META_LABELS.to_string(),
            Value {
                kind: Some(Kind::StructValue(labels)),
            },
        ),
        (META_OUTBOUND.to_string(), s(&outbound.to_string())),
        // Remote endpoints are reached through the gateway, when the proxy has one.
        (
            META_TUNNEL.to_string(),
            Value {
                kind: Some(Kind::BoolValue(tunnel)),
            },
        ),
        // Endpoints behind sidecars are reached with mutual TLS, when it has a certificate.
        (
            META_MTLS.to_string(),
            Value {
                kind: Some(Kind::BoolValue(mtls)),
            },
        ),
    ]
    .into_iter()
    .collect();
    Node {
        id: id.to_string(),
        cluster: cluster.to_string(),
        locality: Some(Locality {
            region: locality.0.to_string(),
            zone: locality.1.to_string(),
            sub_zone: locality.2.to_string(),
        }),
        metadata: Some(Struct { fields }),
        user_agent_name: "strait-proxy".to_string(),
        ..Default::default()
    }
}
