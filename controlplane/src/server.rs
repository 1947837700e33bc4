//! A running control plane: the publisher of this cluster's discovery file, the registry cache,
//! the ADS server and the admin endpoint.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use federation::discovery::DiscoveryFile;
use federation::registry::codec::cluster_state_kvs;
use federation::registry::etcd::{EtcdBackend, EtcdOptions};
use federation::registry::publisher::Owned;
use federation::registry::{
    Backend, CacheStatus, EmbeddedRegistry, LeasedPublisher, PublisherConfig, RegistryCache,
    RegistryError,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::ControlPlaneConfig;
use crate::metrics::Metrics;
use crate::view::ViewSettings;
use crate::xds::{Xds, XdsOptions};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("registry: {0}")]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Discovery(#[from] federation::config::DiscoveryError),
    #[error(
        "discovery file {path}: it describes cluster `{found}`, but this control plane is `{expected}`"
    )]
    WrongCluster {
        path: String,
        found: String,
        expected: String,
    },
    #[error("kubernetes discovery: {0}")]
    Kubernetes(#[from] crate::kubernetes::source::ClientError),
    #[error("kubernetes discovery: {0}")]
    KubernetesCluster(federation::model::ModelError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Listen {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("xDS TLS: {0}")]
    Tls(String),
    #[error("discovery.kubernetes.identities.ca: {0}")]
    Identities(String),
    #[error("certificates: {0}")]
    Certificates(String),
}

/// A started control plane. Dropping it does not stop it: call [`ControlPlane::shutdown`].
pub struct ControlPlane {
    pub xds: Xds,
    pub xds_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The sidecar-injection webhook's address, when configured.
    pub webhook_addr: Option<SocketAddr>,
    cache: Arc<RegistryCache>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    backend: Backend,
    cluster: federation::model::ClusterId,
}

impl ControlPlane {
    pub async fn start(cfg: ControlPlaneConfig) -> Result<Self, StartError> {
        let backend = if cfg.registry.embedded {
            Backend::Embedded(EmbeddedRegistry::new())
        } else {
            Backend::Etcd(EtcdBackend::open(
                cfg.registry.connection(),
                EtcdOptions::default(),
            )?)
        };
        Self::start_with(cfg, backend).await
    }

    /// The publisher of this cluster's entries, under the cluster's lease.
    fn cluster_publisher(
        cfg: &ControlPlaneConfig,
        backend: &Backend,
        desired: watch::Receiver<std::collections::BTreeMap<String, Vec<u8>>>,
    ) -> LeasedPublisher {
        let (publisher, _status) = LeasedPublisher::new(
            backend.clone(),
            format!("cluster {}", cfg.cluster),
            Owned::cluster(&cfg.cluster),
            PublisherConfig {
                lease_ttl: cfg.registry.lease_ttl,
                // Replicas: one publishes, the others stand by (and serve xDS all the same).
                leader: Some(federation::registry::publisher::Leadership {
                    key: federation::registry::RegistryKey::leader(&cfg.cluster),
                    id: replica_name(),
                }),
                ..PublisherConfig::default()
            },
            desired,
        );
        publisher
    }

    /// Kubernetes discovery: the watchers, and the publisher of what they see once they have
    /// seen everything once (a control plane that starts while the API server is away does not
    /// withdraw its cluster's services). Returns the cluster's own entries for the xDS view.
    async fn start_kubernetes(
        cfg: &ControlPlaneConfig,
        k: &crate::kubernetes::source::KubernetesConfig,
        backend: &Backend,
        stop: &CancellationToken,
        tasks: &mut Vec<JoinHandle<()>>,
    ) -> Result<
        (
            watch::Receiver<std::collections::BTreeMap<String, Vec<u8>>>,
            kube::Client,
        ),
        StartError,
    > {
        let gateways = k
            .gateways
            .iter()
            .map(|g| federation::model::GatewayAddress::parse("gateways", g))
            .collect::<Result<Vec<_>, _>>()
            .map_err(StartError::KubernetesCluster)?;
        let cluster =
            federation::model::Cluster::new(cfg.cluster.clone(), &cfg.region, None, gateways)
                .map_err(StartError::KubernetesCluster)?;
        let client = crate::kubernetes::source::client(k).await?;
        let kept = client.clone();
        if let Some(ids) = &k.identities {
            let ca = federation::identity::CertificateAuthority::load(&ids.ca)
                .map_err(|e| StartError::Identities(format!("{}: {e}", ids.ca.display())))?;
            tasks.push(tokio::spawn(
                crate::kubernetes::identities::follow_identities(
                    client.clone(),
                    cfg.cluster.to_string(),
                    ids.clone(),
                    ca,
                    Duration::from_millis(100),
                    stop.clone(),
                ),
            ));
        }
        tasks.push(tokio::spawn(crate::kubernetes::source::follow_policies(
            client.clone(),
            backend.clone(),
            Duration::from_millis(100),
            stop.clone(),
        )));
        tasks.push(tokio::spawn(
            crate::kubernetes::source::follow_federated_clusters(
                client.clone(),
                backend.clone(),
                cfg.cluster.clone(),
                Duration::from_millis(100),
                stop.clone(),
            ),
        ));
        let (states_tx, mut states_rx) = watch::channel(None);
        tasks.push(tokio::spawn(crate::kubernetes::source::follow(
            client,
            cluster,
            states_tx,
            Duration::from_millis(100),
            stop.clone(),
        )));
        let (desired_tx, desired_rx) = watch::channel(std::collections::BTreeMap::new());
        let publisher = Self::cluster_publisher(cfg, backend, desired_rx.clone());
        let s = stop.clone();
        tasks.push(tokio::spawn(async move {
            // Publish nothing before the first complete view.
            loop {
                if let Some(state) = states_rx.borrow_and_update().as_ref() {
                    desired_tx.send_replace(cluster_state_kvs(state));
                    break;
                }
                tokio::select! {
                    () = s.cancelled() => return,
                    r = states_rx.changed() => if r.is_err() { return },
                }
            }
            let run = publisher.run(s.clone().cancelled_owned());
            let forward = async {
                while states_rx.changed().await.is_ok() {
                    if let Some(state) = states_rx.borrow_and_update().as_ref() {
                        desired_tx.send_replace(cluster_state_kvs(state));
                    }
                }
            };
            tokio::select! {
                () = run => {}
                () = forward => {}
            }
        }));
        Ok((desired_rx, kept))
    }

    /// Start on an existing registry backend.
    pub async fn start_with(cfg: ControlPlaneConfig, backend: Backend) -> Result<Self, StartError> {
        let backend_kept = backend.clone();
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();

        // Publish this cluster's discovery file.
        let mut local = None;
        let health = Arc::new(crate::health::HealthStatus::default());
        let mut kube_client = None;
        if let Some(d) = &cfg.discovery
            && let Some(k) = &d.kubernetes
        {
            let (desired, client) =
                Self::start_kubernetes(&cfg, k, &backend, &stop, &mut tasks).await?;
            local = Some(desired);
            kube_client = Some(client);
        }
        // The certificates it keeps (its own before it serves with it).
        if let Some(c) = &cfg.certificates {
            let mut keeper = crate::certificates::Keeper::new(
                c.clone(),
                cfg.cluster.to_string(),
                c.namespace.clone(),
                kube_client.clone(),
            )
            .map_err(StartError::Certificates)?;
            if let Err(e) = keeper.pass().await
                && cfg.xds.tls.as_ref().is_some_and(|t| {
                    federation::identity::load_certs(&t.cert).is_err()
                        || federation::identity::load_private_key(&t.key).is_err()
                })
            {
                return Err(StartError::Certificates(e));
            }
            tasks.push(tokio::spawn(keeper.run(stop.clone())));
        }
        if let Some(d) = &cfg.discovery
            && let Some(file) = &d.file
        {
            let parsed = DiscoveryFile::load(file)?;
            if parsed.state.cluster.id != cfg.cluster {
                return Err(StartError::WrongCluster {
                    path: file.display().to_string(),
                    found: parsed.state.cluster.id.to_string(),
                    expected: cfg.cluster.to_string(),
                });
            }
            let (desired_tx, desired_rx) = watch::channel(cluster_state_kvs(&parsed.state));
            local = Some(desired_rx.clone());
            let publisher = Self::cluster_publisher(&cfg, &backend, desired_rx);
            let s = stop.clone();
            tasks.push(tokio::spawn(async move {
                publisher.run(s.cancelled_owned()).await;
            }));
            // The file, followed; its endpoints' health checks applied to what is published.
            let (file_tx, file_rx) = watch::channel(Arc::new(parsed));
            let s = stop.clone();
            tasks.push(tokio::spawn(federation::discovery::follow_parsed(
                file.clone(),
                cfg.cluster.clone(),
                d.poll,
                file_tx,
                s.cancelled_owned(),
            )));
            tasks.push(tokio::spawn(crate::health::run(
                file_rx,
                desired_tx,
                health.clone(),
                stop.clone(),
            )));
        }

        // Follow the registry, keeping clusters whose control plane went silent (their lease
        // expired while their gateway link is up) for `registry.stale_bound`.
        let cache = Arc::new(RegistryCache::spawn(backend));
        let (effective_tx, effective) = watch::channel(cache.snapshot());
        let stale = Arc::new(std::sync::RwLock::new(BTreeMap::new()));
        tasks.push(tokio::spawn(retain_stale(
            cache.snapshots(),
            effective_tx,
            federation::registry::retention::Retention::new(
                cfg.cluster.clone(),
                cfg.registry.stale_bound,
            ),
            stale.clone(),
            stop.clone(),
        )));
        // The clusterset's services as ServiceImports in this Kubernetes cluster.
        if let Some(client) = kube_client {
            tasks.push(tokio::spawn(crate::kubernetes::imports::follow_imports(
                client,
                cfg.cluster.to_string(),
                effective.clone(),
                Duration::from_millis(200),
                stop.clone(),
            )));
        }
        let metrics = Arc::new(Metrics::default());
        let xds = Xds::new(
            ViewSettings {
                cluster: cfg.cluster.clone(),
                region: cfg.region.clone(),
                gateway: cfg.gateway.is_some(),
            },
            XdsOptions {
                debounce: cfg.xds.debounce,
                max_delay: cfg.xds.max_delay,
                send_timeout: cfg.xds.send_timeout,
                max_response_bytes: cfg.xds.max_response_bytes,
            },
            metrics,
        );
        let (synced_tx, synced_rx) = watch::channel(false);
        let mut status = cache.status_receiver();
        let s_stop = stop.clone();
        // Synced once the cache is and the snapshots served (`effective`) have caught up with
        // it: the first generation must not be built from the empty snapshot of before the load.
        let mut served = effective.clone();
        tasks.push(tokio::spawn(async move {
            let mut last: Option<bool> = None;
            loop {
                let s = status.borrow_and_update().clone();
                let ok = matches!(s, CacheStatus::Synced { .. });
                if let CacheStatus::Synced { revision } = s
                    && served.borrow_and_update().revision >= revision
                {
                    synced_tx.send_replace(true);
                }
                if last != Some(ok) {
                    match &s {
                        CacheStatus::Synced { revision } => {
                            tracing::info!(revision, "registry in sync")
                        }
                        CacheStatus::Disconnected { error, .. } => tracing::warn!(
                            %error, "registry unreachable; serving the last good state"
                        ),
                        CacheStatus::Starting => {}
                    }
                    last = Some(ok);
                }
                tokio::select! {
                    r = status.changed() => if r.is_err() { return },
                    r = served.changed() => if r.is_err() { return },
                    () = s_stop.cancelled() => return,
                }
            }
        }));
        tasks.push(tokio::spawn(
            xds.clone().follow_with_local(effective, synced_rx, local),
        ));

        // Serve xDS.
        let listener =
            TcpListener::bind(cfg.xds.listen)
                .await
                .map_err(|source| StartError::Listen {
                    what: "xds.listen",
                    addr: cfg.xds.listen,
                    source,
                })?;
        let xds_addr = listener.local_addr().map_err(|source| StartError::Listen {
            what: "xds.listen",
            addr: cfg.xds.listen,
            source,
        })?;
        let builder = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)));
        let service =
            AggregatedDiscoveryServiceServer::new(xds.clone()).max_decoding_message_size(4 << 20);
        let s = stop.clone();
        match &cfg.xds.tls {
            Some(t) => {
                // Our own TLS acceptor: handshakes bounded in time, the certificate reloaded
                // when its files change (tonic's own TLS never reloads).
                let tls = crate::serving::ServingTls::load(t.clone()).map_err(StartError::Tls)?;
                xds.require_workload_of(cfg.cluster.clone());
                let incoming = crate::serving::incoming(listener, tls, stop.clone(), |_| {});
                tasks.push(tokio::spawn(serve_xds(builder, service, incoming, s)));
            }
            None => {
                let incoming =
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
                tasks.push(tokio::spawn(serve_xds(builder, service, incoming, s)));
            }
        }

        // Admin.
        let admin = TcpListener::bind(cfg.admin.listen)
            .await
            .map_err(|source| StartError::Listen {
                what: "admin.listen",
                addr: cfg.admin.listen,
                source,
            })?;
        let admin_addr = admin.local_addr().map_err(|source| StartError::Listen {
            what: "admin.listen",
            addr: cfg.admin.listen,
            source,
        })?;
        tasks.push(tokio::spawn(crate::admin::serve(
            crate::admin::Admin {
                xds: xds.clone(),
                cache: cache.clone(),
                stale,
                health,
            },
            admin,
            stop.clone(),
        )));
        // The sidecar-injection webhook.
        let mut webhook_addr = None;
        if let Some(w) = &cfg.webhook {
            let tls = crate::kubernetes::inject::ServingTls::load(w.tls.clone())
                .map_err(StartError::Tls)?;
            let listener =
                TcpListener::bind(w.listen)
                    .await
                    .map_err(|source| StartError::Listen {
                        what: "webhook.listen",
                        addr: w.listen,
                        source,
                    })?;
            webhook_addr = listener.local_addr().ok();
            let injector = crate::kubernetes::inject::Injector {
                cluster: cfg.cluster.to_string(),
                region: cfg.region.clone(),
                sidecar: w.sidecar.clone(),
            };
            tasks.push(tokio::spawn(crate::kubernetes::inject::serve(
                listener,
                Arc::new(tls),
                Arc::new(injector),
                stop.clone(),
            )));
        }
        tracing::info!(cluster = %cfg.cluster, xds = %xds_addr, admin = %admin_addr,
            tls = cfg.xds.tls.is_some(), "controlplane started");
        Ok(Self {
            xds,
            xds_addr,
            admin_addr,
            webhook_addr,
            cache,
            stop,
            tasks,
            backend: backend_kept,
            cluster: cfg.cluster.clone(),
        })
    }

    pub fn cache(&self) -> &RegistryCache {
        &self.cache
    }

    /// Stop serving, close every stream and revoke the publisher's lease.
    /// Stop serving. The cluster's entries stay in the registry under their lease, for a
    /// successor to take over (a restart is not a withdrawal).
    pub async fn shutdown(self) {
        self.shutdown_with(false).await
    }

    /// Stop serving; with `withdraw`, then take the cluster out of the federation
    /// (decommissioning: `strait controlplane --withdraw-on-exit`).
    pub async fn shutdown_with(self, withdraw: bool) {
        self.xds.shutdown();
        self.stop.cancel();
        // Every task stops on the token; wait for all of them at once, a few seconds at most.
        let mut tasks = self.tasks;
        let all = futures::future::join_all(tasks.iter_mut());
        if tokio::time::timeout(Duration::from_secs(5), all)
            .await
            .is_err()
        {
            tracing::warn!("some tasks did not stop within 5 s; aborting them");
            for t in &tasks {
                t.abort();
            }
        }
        if withdraw {
            match tokio::time::timeout(
                Duration::from_secs(10),
                federation::registry::publisher::withdraw_cluster(&self.backend, &self.cluster),
            )
            .await
            {
                Ok(Ok(n)) => {
                    tracing::info!(cluster = %self.cluster, removed = n, "cluster withdrawn from the federation")
                }
                Ok(Err(e)) => {
                    tracing::error!(cluster = %self.cluster, error = %e, "could not withdraw the cluster")
                }
                Err(_) => {
                    tracing::error!(cluster = %self.cluster, "withdrawing the cluster timed out")
                }
            }
        }
    }
}

/// This replica's name in the leadership key: the host (a pod's name) and the process.
fn replica_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "host".to_string());
    format!("{host}/{}", std::process::id())
}

/// Clusters served from their last entries, with when they left the registry.
pub(crate) type StaleView =
    Arc<std::sync::RwLock<BTreeMap<federation::model::ClusterId, std::time::Instant>>>;

/// Map the registry's snapshots to the ones served: with clusters whose control plane went
/// silent kept (see `federation::registry::retention`).
async fn retain_stale(
    mut snapshots: watch::Receiver<Arc<federation::registry::Snapshot>>,
    effective: watch::Sender<Arc<federation::registry::Snapshot>>,
    mut retention: federation::registry::retention::Retention,
    view: StaleView,
    stop: CancellationToken,
) {
    use federation::registry::retention::Release;
    let report = |changes: Vec<(federation::model::ClusterId, Option<Release>)>,
                  retention: &federation::registry::retention::Retention| {
        for (c, why) in changes {
            match why {
                None => tracing::warn!(cluster = %c,
                    "cluster left the registry without a withdrawal while its gateway link is up (its control plane is away?): serving its last endpoints, marked stale"),
                Some(Release::Back) => {
                    tracing::info!(cluster = %c, "cluster is back in the registry")
                }
                Some(Release::Withdrawn) => {
                    tracing::info!(cluster = %c, "stale cluster withdrawn: no longer served")
                }
                Some(Release::LinkDown) => {
                    tracing::warn!(cluster = %c, "the link to stale cluster is down: no longer served")
                }
                Some(Release::Bound) => {
                    tracing::warn!(cluster = %c, "stale cluster silent longer than registry.stale_bound: no longer served")
                }
            }
        }
        if let Ok(mut v) = view.write() {
            *v = retention
                .stale()
                .iter()
                .map(|(c, s)| (c.clone(), s.since))
                .collect();
        }
    };
    loop {
        let snap = snapshots.borrow_and_update().clone();
        let (eff, changes) = retention.apply(&snap, std::time::Instant::now());
        effective.send_replace(eff);
        report(changes, &retention);
        loop {
            let tick = async {
                if retention.stale().is_empty() {
                    std::future::pending::<()>().await
                } else {
                    tokio::time::sleep(Duration::from_secs(1)).await
                }
            };
            tokio::select! {
                r = snapshots.changed() => {
                    if r.is_err() { return }
                    break;
                }
                () = tick => {
                    if let Some((eff, changes)) = retention.tick(std::time::Instant::now()) {
                        effective.send_replace(eff);
                        report(changes, &retention);
                    }
                }
                () = stop.cancelled() => return,
            }
        }
    }
}

/// Serve ADS on the connections `incoming` hands over until `stop`.
async fn serve_xds<I, IO, E>(
    mut builder: tonic::transport::Server,
    service: AggregatedDiscoveryServiceServer<Xds>,
    incoming: I,
    stop: CancellationToken,
) where
    I: futures::Stream<Item = Result<IO, E>>,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if let Err(e) = builder
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "xDS server failed");
    }
}
