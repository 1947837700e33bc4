//! Kubernetes discovery, the I/O part: `kube` watchers on Services, EndpointSlices, Nodes and
//! `ServiceExport`s keep one [`Objects`] view of the cluster; after every change (coalesced) the
//! view is turned into the cluster's state by [`cluster_state`] and handed on.
//!
//! - Each watcher lists, then watches from the list's resource version; when the watch expires
//!   (410 Gone) it lists again, and the relisted objects replace that kind's objects at once
//!   (objects gone meanwhile disappear without a delete event).
//! - Nothing is handed on before every kind has been listed once: a control plane that starts
//!   while the API server is away does not publish an empty cluster.
//! - Errors (the API server unreachable, a watch refused) are logged and retried with back-off
//!   (0.8 s doubling to 30 s, jittered); meanwhile the last good state stays where it is.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use federation::model::{Cluster, ClusterState};
use futures::StreamExt as _;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::{Node, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, Config};
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{ObjectKey, Objects, cluster_state};

/// `discovery: {kubernetes: …}` in the control plane's configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// A kubeconfig file; without it, the in-cluster service account
    /// (`KUBERNETES_SERVICE_HOST`, the mounted token and CA).
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context (default: its current context).
    #[serde(default)]
    pub context: Option<String>,
    /// Where other clusters reach this cluster's east-west gateway (`HOST:PORT`, e.g. the
    /// address of its LoadBalancer Service), published with the cluster.
    #[serde(default)]
    pub gateways: Vec<String>,
    /// Issue the identity Secrets of injected workloads with this CA (see
    /// [`super::identities`]).
    #[serde(default)]
    pub identities: Option<super::identities::IdentitiesConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no kubeconfig given and not running in a Kubernetes pod (in-cluster configuration): {0}"
    )]
    InCluster(#[from] kube::config::InClusterError),
    #[error("Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A client for the configured API server.
pub async fn client(cfg: &KubernetesConfig) -> Result<Client, ClientError> {
    let config = match &cfg.kubeconfig {
        Some(path) => {
            let err = |source| ClientError::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(err)?;
            let options = kube::config::KubeConfigOptions {
                context: cfg.context.clone(),
                ..Default::default()
            };
            Config::from_custom_kubeconfig(kc, &options)
                .await
                .map_err(err)?
        }
        None => Config::incluster()?,
    };
    Ok(Client::try_from(config)?)
}

/// The `ServiceExport` resource of the Multi-Cluster Services API.
pub fn service_export_resource() -> ApiResource {
    let gvk = GroupVersionKind::gvk("multicluster.x-k8s.io", "v1alpha1", "ServiceExport");
    ApiResource::from_gvk_with_plural(&gvk, "serviceexports")
}

/// Strait's `FailoverPolicy` resource (see [`super::crd`]).
pub fn failover_policy_resource() -> ApiResource {
    let gvk = GroupVersionKind::gvk(super::crd::GROUP, super::crd::VERSION, "FailoverPolicy");
    ApiResource::from_gvk_with_plural(&gvk, "failoverpolicies")
}

/// Strait's `FederatedCluster` resource (see [`super::crd`]).
pub fn federated_cluster_resource() -> ApiResource {
    let gvk = GroupVersionKind::gvk(super::crd::GROUP, super::crd::VERSION, "FederatedCluster");
    ApiResource::from_gvk_with_plural(&gvk, "federatedclusters")
}

/// One registry entry made from an object: its key, what it is (for messages), its value.
pub struct Entry {
    pub key: String,
    pub what: String,
    pub value: Vec<u8>,
}

/// What a follower writes and how (see [`follow_objects`]).
pub struct Follower {
    /// The kind, for messages (`FailoverPolicy`).
    pub kind: &'static str,
    pub resource: ApiResource,
    pub crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    /// An object (name, whole object, already checked against the CRD's schema) → its entry, or
    /// `None` when it has none to write.
    #[allow(clippy::type_complexity)]
    pub translate: Box<dyn Fn(&str, &serde_json::Value) -> Result<Option<Entry>, String> + Send>,
    /// A registry prefix this follower owns whole: what it holds beyond the objects' entries is
    /// deleted at the first sync (left by objects deleted while no control plane ran).
    pub owns: Option<String>,
}

/// Follow the cluster's `FailoverPolicy` objects until `stop` and keep the registry's policies
/// in step, as `strait policy apply` / `delete` would: a policy object's spec (checked against
/// the CRD's schema and read by the policy-file parser) is written under its scope; a deleted
/// object's policy is removed.
pub async fn follow_policies(
    client: Client,
    backend: federation::registry::Backend,
    coalesce: Duration,
    stop: CancellationToken,
) {
    use federation::registry::codec::{RegistryKey, encode_policy};
    let follower = Follower {
        kind: "FailoverPolicy",
        resource: failover_policy_resource(),
        crd: super::crd::failover_policy_crd(),
        translate: Box::new(|name, obj| {
            let p = super::crd::policy_from_spec(name, &obj["spec"])?;
            Ok(Some(Entry {
                key: RegistryKey::Policy(p.scope.clone()).encode(),
                what: format!("policy {}", p.scope),
                value: encode_policy(&p),
            }))
        }),
        owns: None,
    };
    follow_objects(client, backend, follower, coalesce, stop).await
}

/// Follow the cluster's `FederatedCluster` objects until `stop` and keep this cluster's
/// peerings in the registry (`/strait/v1/peerings/OWN/PEER`, no lease) in step: the object's
/// name is the peer cluster, its spec where the peer's gateways answer and the trust they are
/// accepted under. The object naming this cluster itself is skipped (one set of objects can be
/// applied to every cluster); this control plane owns the prefix, so peerings of objects
/// deleted while it was away are removed when it starts.
pub async fn follow_federated_clusters(
    client: Client,
    backend: federation::registry::Backend,
    own: federation::model::ClusterId,
    coalesce: Duration,
    stop: CancellationToken,
) {
    use federation::registry::codec::{RegistryKey, encode_peering};
    let prefix = RegistryKey::peerings_prefix(&own);
    let follower = Follower {
        kind: "FederatedCluster",
        resource: federated_cluster_resource(),
        crd: super::crd::federated_cluster_crd(),
        translate: Box::new(move |name, obj| {
            let Some(p) = super::crd::peering_from_spec(&own, name, &obj["spec"])? else {
                return Ok(None);
            };
            Ok(Some(Entry {
                key: RegistryKey::Peering(p.cluster.clone(), p.peer.clone()).encode(),
                what: format!("peering with {}", p.peer),
                value: encode_peering(&p),
            }))
        }),
        owns: Some(prefix),
    };
    follow_objects(client, backend, follower, coalesce, stop).await
}

/// Follow one kind of cluster-scoped object and keep registry entries made from them in step.
/// An invalid object is reported (once) and left out; of two objects for one key the first by
/// name wins. Nothing is written before the first complete list; a failed read or write is
/// retried with back-off.
pub async fn follow_objects(
    client: Client,
    backend: federation::registry::Backend,
    follower: Follower,
    coalesce: Duration,
    stop: CancellationToken,
) {
    use federation::registry::backend::Op;
    let kind = follower.kind;
    let mut events = watcher(
        Api::<DynamicObject>::all_with(client, &follower.resource),
        watcher::Config::default(),
    )
    .default_backoff()
    .boxed();
    let mut live: BTreeMap<String, DynamicObject> = BTreeMap::new();
    let mut relist: Relist<String, DynamicObject> = Relist::default();
    // What is in the registry of ours: key → value (`None` until read, for an owned prefix).
    let mut written: Option<BTreeMap<String, Vec<u8>>> =
        follower.owns.is_none().then(BTreeMap::new);
    let mut reported: BTreeSet<String> = BTreeSet::new();
    let mut dirty = false;
    let mut retry = Duration::from_millis(500);
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(timer);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            e = events.next() => {
                let Some(e) = e else { return };
                let changed = match e {
                    Ok(e) => relist.apply(&mut live, e, |o: DynamicObject| {
                        let name = o.metadata.name.clone()?;
                        Some((name, o))
                    }),
                    Err(e) => { warn(kind, &e); continue }
                };
                if changed && !dirty {
                    dirty = true;
                    timer.as_mut().reset(tokio::time::Instant::now() + coalesce);
                }
            }
            () = &mut timer, if dirty => {
                if !relist.synced {
                    dirty = false;
                    continue;
                }
                let mut want: BTreeMap<String, (String, Vec<u8>)> = BTreeMap::new();
                let mut problems = BTreeSet::new();
                for (name, o) in &live {
                    let obj = serde_json::to_value(o).unwrap_or_default();
                    let entry = super::crd::validate(&follower.crd, &obj)
                        .map_err(|e| e.join("; "))
                        .and_then(|()| (follower.translate)(name, &obj));
                    match entry {
                        Ok(Some(e)) => {
                            if let Some((first, _)) = want.get(&e.key) {
                                problems.insert(format!(
                                    "{kind}/{name}: {} is {kind}/{first}'s; left out",
                                    e.what
                                ));
                            } else {
                                want.insert(e.key, (name.clone(), e.value));
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            problems.insert(format!("{kind}/{name}: {e}; left out"));
                        }
                    }
                }
                for p in problems.difference(&reported) {
                    tracing::warn!("kubernetes {kind}: {p}");
                }
                reported = problems;
                let held = match (&written, &follower.owns) {
                    (Some(w), _) => w.clone(),
                    (None, Some(prefix)) => match backend.get_prefix(prefix).await {
                        Ok((_, kvs)) => kvs.into_iter().map(|kv| (kv.key, kv.value)).collect(),
                        Err(e) => {
                            tracing::warn!(error = %e, retry_in = ?retry, "cannot read what the registry holds of the {kind} objects; retrying");
                            timer.as_mut().reset(tokio::time::Instant::now() + retry);
                            retry = (retry * 2).min(Duration::from_secs(30));
                            continue;
                        }
                    },
                    (None, None) => BTreeMap::new(),
                };
                let mut ops = Vec::new();
                for (key, (_, value)) in &want {
                    if held.get(key) != Some(value) {
                        ops.push(Op::Put { key: key.clone(), value: value.clone(), lease: None });
                    }
                }
                for key in held.keys() {
                    if !want.contains_key(key) {
                        ops.push(Op::Delete { key: key.clone() });
                    }
                }
                if ops.is_empty() {
                    written = Some(held);
                    dirty = false;
                    continue;
                }
                let n = ops.len();
                match backend.commit(ops).await {
                    Ok(rev) => {
                        tracing::info!(changes = n, revision = rev, "{kind} objects written to the registry");
                        written = Some(want.into_iter().map(|(k, (_, v))| (k, v)).collect());
                        dirty = false;
                        retry = Duration::from_millis(500);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?retry, "cannot write the {kind} objects to the registry; retrying");
                        if follower.owns.is_some() {
                            // Read again: the write may have landed.
                            written = None;
                        }
                        timer.as_mut().reset(tokio::time::Instant::now() + retry);
                        retry = (retry * 2).min(Duration::from_secs(30));
                    }
                }
            }
        }
    }
}

type Item<K> = Box<Result<watcher::Event<K>, watcher::Error>>;

/// One kind's event, tagged (boxed: the objects differ much in size).
enum Update {
    Service(Item<KubeService>),
    Slice(Item<EndpointSlice>),
    Node(Item<Node>),
    Export(Item<DynamicObject>),
}

/// A kind's relist in progress, and whether it was ever listed.
pub(super) struct Relist<K, V> {
    buffer: Option<BTreeMap<K, V>>,
    pub(super) synced: bool,
}

impl<K: Ord, V> Default for Relist<K, V> {
    fn default() -> Self {
        Self {
            buffer: None,
            synced: false,
        }
    }
}

impl<K: Ord, V: PartialEq> Relist<K, V> {
    /// Apply one event to `live`; whether `live` changed.
    pub(super) fn apply<O>(
        &mut self,
        live: &mut BTreeMap<K, V>,
        event: watcher::Event<O>,
        split: impl Fn(O) -> Option<(K, V)>,
    ) -> bool {
        match event {
            watcher::Event::Init => {
                self.buffer = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(o) => {
                if let (Some(buffer), Some((k, v))) = (self.buffer.as_mut(), split(o)) {
                    buffer.insert(k, v);
                }
                false
            }
            watcher::Event::InitDone => {
                let listed = self.buffer.take().unwrap_or_default();
                let first = !self.synced;
                self.synced = true;
                let changed = first || *live != listed;
                *live = listed;
                changed
            }
            watcher::Event::Apply(o) => match split(o) {
                Some((k, v)) => match live.get(&k) {
                    Some(old) if *old == v => false,
                    _ => {
                        live.insert(k, v);
                        true
                    }
                },
                None => false,
            },
            watcher::Event::Delete(o) => match split(o) {
                Some((k, _)) => live.remove(&k).is_some(),
                None => false,
            },
        }
    }
}

fn namespaced<O: kube::Resource>(o: O) -> Option<(ObjectKey, O)> {
    let m = o.meta();
    let key = (m.namespace.clone()?, m.name.clone()?);
    Some((key, o))
}

/// Follow the cluster's objects until `stop`; every new state goes to `states` (the first one
/// once every kind has been listed).
pub async fn follow(
    client: Client,
    cluster: Cluster,
    states: watch::Sender<Option<ClusterState>>,
    coalesce: Duration,
    stop: CancellationToken,
) {
    let cfg = watcher::Config::default;
    let exports = service_export_resource();
    let streams: Vec<BoxStream<'static, Update>> = vec![
        watcher(Api::<KubeService>::all(client.clone()), cfg())
            .default_backoff()
            .map(|r| Update::Service(Box::new(r)))
            .boxed(),
        watcher(Api::<EndpointSlice>::all(client.clone()), cfg())
            .default_backoff()
            .map(|r| Update::Slice(Box::new(r)))
            .boxed(),
        watcher(Api::<Node>::all(client.clone()), cfg())
            .default_backoff()
            .map(|r| Update::Node(Box::new(r)))
            .boxed(),
        watcher(Api::<DynamicObject>::all_with(client, &exports), cfg())
            .default_backoff()
            .map(|r| Update::Export(Box::new(r)))
            .boxed(),
    ];
    let mut updates = futures::stream::select_all(streams);

    let mut objects = Objects::default();
    let mut export_set: BTreeMap<ObjectKey, ()> = BTreeMap::new();
    let mut services = Relist::default();
    let mut slices = Relist::default();
    let mut nodes = Relist::default();
    let mut exported = Relist::default();
    let mut dirty = false;
    let mut last_skipped: BTreeSet<String> = BTreeSet::new();
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(timer);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            update = updates.next() => {
                let Some(update) = update else { return };
                let (kind, changed) = match update {
                    Update::Service(r) => match *r {
                        Ok(e) => ("Services", services.apply(&mut objects.services, e, namespaced)),
                        Err(e) => { warn("Services", &e); continue }
                    },
                    Update::Slice(r) => match *r {
                        Ok(e) => ("EndpointSlices", slices.apply(&mut objects.slices, e, namespaced)),
                        Err(e) => { warn("EndpointSlices", &e); continue }
                    },
                    Update::Node(r) => match *r {
                        Ok(e) => ("Nodes", nodes.apply(&mut objects.nodes, e, |n: Node| {
                            let name = n.metadata.name.clone()?;
                            Some((name, n))
                        })),
                        Err(e) => { warn("Nodes", &e); continue }
                    },
                    Update::Export(r) => match *r {
                        Ok(e) => {
                            let changed = exported.apply(&mut export_set, e, |o| namespaced(o).map(|(k, _)| (k, ())));
                            if changed {
                                objects.exports = export_set.keys().cloned().collect();
                            }
                            ("ServiceExports", changed)
                        }
                        Err(e) => { warn("ServiceExports", &e); continue }
                    },
                };
                tracing::trace!(kind, changed, "kubernetes event");
                if changed && !dirty {
                    dirty = true;
                    timer.as_mut().reset(tokio::time::Instant::now() + coalesce);
                }
            }
            () = &mut timer, if dirty => {
                if !(services.synced && slices.synced && nodes.synced && exported.synced) {
                    // Not every kind listed yet: wait for the others (they will change).
                    dirty = false;
                    continue;
                }
                dirty = false;
                let conversion = cluster_state(&cluster, &objects);
                let skipped: BTreeSet<String> = conversion.skipped.into_iter().collect();
                for s in skipped.difference(&last_skipped) {
                    tracing::warn!("kubernetes discovery: {s}");
                }
                last_skipped = skipped;
                tracing::debug!(services = conversion.state.services.len(), "kubernetes state");
                states.send_replace(Some(conversion.state));
            }
        }
    }
}

pub(super) fn warn(kind: &str, e: &watcher::Error) {
    tracing::warn!(kind, error = %e, "kubernetes watch failed; keeping the last good state, retrying");
}
