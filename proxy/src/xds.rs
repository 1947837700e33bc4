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

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use federation::backoff::Backoff;
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, watch};
use tonic::transport::{Channel, Endpoint};

use crate::ads::{AdsClient, Event, Request};
use crate::config::{
    Assignment, ClusterConfig, ListenerConfig, ListenerKind, RouteSource, RouteTable,
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
    pub(crate) fn route_names(&self) -> BTreeSet<String> {
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

async fn run(
    options: XdsOptions,
    config_tx: watch::Sender<Arc<ProxyConfig>>,
    status_tx: watch::Sender<XdsStatus>,
) {
    let mut backoff = Backoff::new(options.backoff_initial, options.backoff_max);
    // The protocol's state machine: it outlives streams (the last good config).
    let mut ads = AdsClient::new(options.node.clone(), options.warm_timeout, Instant::now());
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
            stream_delta(&this, &mut ads, &config_tx, &status_tx, &mut backoff).await
        } else {
            stream_sotw(&this, &mut ads, &config_tx, &status_tx, &mut backoff).await
        };
        ads.close_stream();
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

/// One delta ADS stream, until it fails. Returns why it ended.
async fn stream_delta(
    options: &XdsOptions,
    ads: &mut AdsClient,
    config_tx: &watch::Sender<Arc<ProxyConfig>>,
    status_tx: &watch::Sender<XdsStatus>,
    backoff: &mut Backoff,
) -> String {
    let mut client = match connect(options).await {
        Ok(c) => c,
        Err(e) => return e,
    };
    let (tx, mut rx) = mpsc::channel::<DeltaDiscoveryRequest>(64);
    ads.open_stream(true);
    if let Err(e) = flush(ads, |r| match r {
        Request::Delta(r) => tx.try_send(r).map_err(|e| e.to_string()),
        Request::Sotw(_) => Err("a state-of-the-world request on a delta stream".into()),
    }) {
        return e;
    }
    let requests = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut responses = match client.delta_aggregated_resources(requests).await {
        Ok(r) => r.into_inner(),
        Err(e) if e.code() == tonic::Code::Unimplemented => return DELTA_UNIMPLEMENTED.into(),
        Err(e) => return format!("ADS stream refused: {e}"),
    };
    opened(options, status_tx, "delta");
    loop {
        let resp = match next_response(&mut responses, ads, config_tx, status_tx).await {
            Ok(r) => r,
            Err(why) => return why,
        };
        backoff.reset();
        ads.handle_delta(&resp, Instant::now());
        while let Some(r) = ads.poll_request() {
            let Request::Delta(r) = r else {
                return "a state-of-the-world request on a delta stream".into();
            };
            if tx.send(r).await.is_err() {
                return "request channel closed".into();
            }
        }
        events(ads, config_tx, status_tx);
    }
}

/// Queue the machine's requests with `send` (the stream's first ones: the channel has room).
fn flush(
    ads: &mut AdsClient,
    mut send: impl FnMut(Request) -> Result<(), String>,
) -> Result<(), String> {
    while let Some(r) = ads.poll_request() {
        send(r).map_err(|e| format!("request channel: {e}"))?;
    }
    Ok(())
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
    ads: &mut AdsClient,
    config_tx: &watch::Sender<Arc<ProxyConfig>>,
    status_tx: &watch::Sender<XdsStatus>,
) -> Result<T, String> {
    loop {
        let warm = ads.poll_timeout();
        tokio::select! {
            r = responses.message() => return match r {
                Ok(Some(r)) => Ok(r),
                Ok(None) => Err("the control plane closed the stream".into()),
                Err(e) => Err(format!("stream failed: {e}")),
            },
            () = until(warm) => {
                ads.handle_timeout(Instant::now());
                events(ads, config_tx, status_tx);
            }
        }
    }
}

/// Resolves at `at`; never without one.
async fn until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
        None => std::future::pending().await,
    }
}

/// The machine's events: counted, logged, the config published.
fn events(
    ads: &mut AdsClient,
    config_tx: &watch::Sender<Arc<ProxyConfig>>,
    status_tx: &watch::Sender<XdsStatus>,
) {
    while let Some(e) = ads.poll_event() {
        match e {
            Event::Ack { .. } => status_tx.send_modify(|s| s.acks += 1),
            Event::Nack { type_url, error } => {
                tracing::warn!(%type_url, %error,
                    "rejected an xDS response (NACK); keeping the last good config");
                status_tx.send_modify(|s| {
                    s.nacks += 1;
                    s.last_nack = Some(error);
                });
            }
            Event::WarmTimeout { missing } => {
                tracing::warn!(
                    ?missing,
                    "config still incomplete after the warm-up timeout; serving what there is"
                );
            }
            Event::Publish { config, complete } => {
                // Warm first: whoever sees the complete config sees the status that says so.
                if complete {
                    status_tx.send_modify(|s| s.warm = true);
                }
                config_tx.send_replace(config);
            }
        }
    }
}

/// One state-of-the-world ADS stream (the fallback for control planes without delta), until
/// it fails.
async fn stream_sotw(
    options: &XdsOptions,
    ads: &mut AdsClient,
    config_tx: &watch::Sender<Arc<ProxyConfig>>,
    status_tx: &watch::Sender<XdsStatus>,
    backoff: &mut Backoff,
) -> String {
    let mut client = match connect(options).await {
        Ok(c) => c,
        Err(e) => return e,
    };
    let (tx, mut rx) = mpsc::channel::<DiscoveryRequest>(64);
    ads.open_stream(false);
    if let Err(e) = flush(ads, |r| match r {
        Request::Sotw(r) => tx.try_send(r).map_err(|e| e.to_string()),
        Request::Delta(_) => Err("a delta request on a state-of-the-world stream".into()),
    }) {
        return e;
    }
    let requests = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut responses = match client.stream_aggregated_resources(requests).await {
        Ok(r) => r.into_inner(),
        Err(e) => return format!("ADS stream refused: {e}"),
    };
    opened(options, status_tx, "state of the world");
    loop {
        let resp = match next_response(&mut responses, ads, config_tx, status_tx).await {
            Ok(r) => r,
            Err(why) => return why,
        };
        backoff.reset();
        ads.handle_sotw(&resp, Instant::now());
        while let Some(r) = ads.poll_request() {
            let Request::Sotw(r) = r else {
                return "a delta request on a state-of-the-world stream".into();
            };
            if tx.send(r).await.is_err() {
                return "request channel closed".into();
            }
        }
        events(ads, config_tx, status_tx);
    }
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
