//! The local registry cache: a consistent snapshot of everything under `/strait/v1/`, kept up to
//! date by one prefix watch, plus a stream of changes.
//!
//! Guarantees:
//! - a snapshot always reflects whole revisions (never half a transaction);
//! - after a broken watch, the cache resumes from the last revision it applied, so no update is
//!   lost or applied twice;
//! - when that revision has been compacted away, it reloads everything and emits the difference
//!   between what it had and what is there now as one `resync` change;
//! - while the store is unreachable the last good snapshot stays readable, and the cache retries
//!   with jittered back-off.

use std::sync::Arc;
use std::time::Duration;

use imbl::OrdMap;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use super::RegistryError;
use super::backend::{Backend, WatchEvent};
use super::codec::{Decoder, ROOT, RegistryKey, RegistryValue};
use crate::model::{
    Cluster, ClusterId, FailoverPolicy, LinkState, Name, Peering, PolicyScope, ServiceEndpoints,
    ServiceKey,
};

/// A consistent view of the registry at one revision.
#[derive(Clone, Default, PartialEq)]
pub struct Snapshot {
    /// The store revision this snapshot reflects (0 before the first load).
    pub revision: i64,
    pub clusters: OrdMap<ClusterId, Arc<Cluster>>,
    /// Keyed by service first, so one service's clusters are one range.
    pub endpoints: OrdMap<(ServiceKey, ClusterId), Arc<ServiceEndpoints>>,
    pub policies: OrdMap<PolicyScope, Arc<FailoverPolicy>>,
    /// Each directed link, merged over the measuring cluster's gateway replicas (see
    /// [`LinkState::merge`]).
    pub links: OrdMap<(ClusterId, ClusterId), Arc<LinkState>>,
    /// The link entries as stored: by replica, `None` for the key of a single gateway.
    pub link_entries: OrdMap<(ClusterId, ClusterId, Option<Name>), Arc<LinkState>>,
    /// Keyed by (declaring cluster, peer).
    pub peerings: OrdMap<(ClusterId, ClusterId), Arc<Peering>>,
    /// Clusters withdrawn on purpose (tombstones).
    pub withdrawn: OrdMap<ClusterId, Arc<crate::model::Withdrawal>>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("revision", &self.revision)
            .field("clusters", &self.clusters.len())
            .field("service_endpoints", &self.endpoints.len())
            .field("endpoints", &self.endpoint_count())
            .field("policies", &self.policies.len())
            .field("links", &self.links.len())
            .field("peerings", &self.peerings.len())
            .field("withdrawn", &self.withdrawn.len())
            .finish()
    }
}

/// One cluster's own entries as its discovery source has them (what its publisher writes),
/// decoded once, so that they can stand in for what the registry holds of that cluster.
#[derive(Debug, Clone)]
pub struct LocalState {
    pub cluster: Arc<Cluster>,
    pub endpoints: Vec<(ServiceKey, Arc<ServiceEndpoints>)>,
}

impl LocalState {
    /// Decode a publisher's key-values (`codec::cluster_state_kvs`).
    pub fn decode(
        kvs: &std::collections::BTreeMap<String, Vec<u8>>,
    ) -> Result<LocalState, RegistryError> {
        let mut decoder = Decoder::new();
        let mut cluster = None;
        let mut endpoints = Vec::new();
        for (raw, value) in kvs {
            let Some(key) = RegistryKey::parse(raw) else {
                continue;
            };
            match (decoder.decode(&key, raw, value)?, &key) {
                (RegistryValue::Cluster(c), _) => cluster = Some(c),
                (RegistryValue::Endpoints(e), RegistryKey::Endpoints(_, skey)) => {
                    endpoints.push((skey.clone(), e))
                }
                _ => {}
            }
        }
        let cluster = cluster.ok_or_else(|| RegistryError::Decode {
            key: "(local state)".into(),
            message: "no cluster record".into(),
        })?;
        Ok(LocalState { cluster, endpoints })
    }
}

impl Snapshot {
    /// This snapshot with `local` in place of whatever the registry holds of that cluster —
    /// so a control plane never loses its own cluster's endpoints because the registry did
    /// (its lease expired while etcd was out of reach, and the publisher has not written them
    /// again yet). `None` when the snapshot already holds exactly `local`.
    ///
    /// Runs on every generation: entries found equal to the registry's are replaced in `local`
    /// by the registry's own `Arc`s, so that while nothing changes each later check is a
    /// pointer comparison per service.
    pub fn overlay(&self, local: &mut LocalState) -> Option<Snapshot> {
        let id = local.cluster.id.clone();
        let mut same = match self.clusters.get(&id) {
            Some(c) if Arc::ptr_eq(c, &local.cluster) => true,
            Some(c) if **c == *local.cluster => {
                local.cluster = c.clone();
                true
            }
            _ => false,
        };
        let held: Vec<ServiceKey> = self
            .endpoints
            .keys()
            .filter(|(_, c)| *c == id)
            .map(|(s, _)| s.clone())
            .collect();
        same &= held.len() == local.endpoints.len();
        for (s, e) in &mut local.endpoints {
            match self.endpoints.get(&(s.clone(), id.clone())) {
                Some(r) if Arc::ptr_eq(r, e) => {}
                Some(r) if **r == **e => *e = r.clone(),
                _ => same = false,
            }
        }
        if same {
            return None;
        }
        let mut out = self.clone();
        out.clusters.insert(id.clone(), local.cluster.clone());
        for s in held {
            out.endpoints.remove(&(s, id.clone()));
        }
        for (s, e) in &local.endpoints {
            out.endpoints.insert((s.clone(), id.clone()), e.clone());
        }
        Some(out)
    }

    /// The total number of endpoints.
    pub fn endpoint_count(&self) -> usize {
        self.endpoints.values().map(|s| s.endpoints.len()).sum()
    }

    /// The endpoints of `service` in every cluster (a range lookup).
    pub fn service(&self, service: &ServiceKey) -> impl Iterator<Item = &Arc<ServiceEndpoints>> {
        let from = (service.clone(), Name::min_value());
        self.endpoints
            .range(from..)
            .take_while(move |((s, _), _)| s == service)
            .map(|(_, v)| v)
    }

    /// The endpoints of `service` in `cluster`.
    pub fn service_in(
        &self,
        service: &ServiceKey,
        cluster: &ClusterId,
    ) -> Option<&Arc<ServiceEndpoints>> {
        self.endpoints.get(&(service.clone(), cluster.clone()))
    }

    /// Every service set published by `cluster`.
    /// Whether `other` holds the same record and endpoint sets of `cluster` as this snapshot.
    pub fn same_cluster_entries(&self, other: &Snapshot, cluster: &ClusterId) -> bool {
        self.clusters.get(cluster) == other.clusters.get(cluster)
            && self
                .cluster_services(cluster)
                .eq(other.cluster_services(cluster))
    }

    pub fn cluster_services<'a>(
        &'a self,
        cluster: &'a ClusterId,
    ) -> impl Iterator<Item = &'a Arc<ServiceEndpoints>> + 'a {
        self.endpoints
            .iter()
            .filter(move |((_, c), _)| c == cluster)
            .map(|(_, v)| v)
    }

    /// The policy that applies to `service`: its own, or the default.
    pub fn policy_for(&self, service: &ServiceKey) -> Option<&Arc<FailoverPolicy>> {
        self.policies
            .get(&PolicyScope::Service(service.clone()))
            .or_else(|| self.policies.get(&PolicyScope::Default))
    }

    /// Whether both snapshots hold the same entries (whatever their revisions).
    pub fn same_content(&self, other: &Snapshot) -> bool {
        self.clusters == other.clusters
            && self.endpoints == other.endpoints
            && self.policies == other.policies
            && self.links == other.links
            && self.link_entries == other.link_entries
            && self.peerings == other.peerings
    }

    /// The peerings `cluster` declared, by peer.
    pub fn peerings_of<'a>(
        &'a self,
        cluster: &'a ClusterId,
    ) -> impl Iterator<Item = &'a Arc<Peering>> + 'a {
        self.peerings
            .range((cluster.clone(), Name::min_value())..)
            .take_while(move |((c, _), _)| c == cluster)
            .map(|(_, p)| p)
    }

    fn get(&self, key: &RegistryKey) -> Option<RegistryValue> {
        match key {
            RegistryKey::Cluster(c) => self.clusters.get(c).cloned().map(RegistryValue::Cluster),
            RegistryKey::Endpoints(c, s) => self
                .endpoints
                .get(&(s.clone(), c.clone()))
                .cloned()
                .map(RegistryValue::Endpoints),
            RegistryKey::Policy(p) => self.policies.get(p).cloned().map(RegistryValue::Policy),
            RegistryKey::Link(a, b) => self
                .link_entries
                .get(&(a.clone(), b.clone(), None))
                .cloned()
                .map(RegistryValue::Link),
            RegistryKey::ReplicaLink(a, b, r) => self
                .link_entries
                .get(&(a.clone(), b.clone(), Some(r.clone())))
                .cloned()
                .map(RegistryValue::Link),
            RegistryKey::Peering(a, b) => self
                .peerings
                .get(&(a.clone(), b.clone()))
                .cloned()
                .map(RegistryValue::Peering),
            RegistryKey::Withdrawn(c) => {
                self.withdrawn.get(c).cloned().map(RegistryValue::Withdrawn)
            }
        }
    }

    /// Set or remove one entry; returns whether anything changed.
    fn set(&mut self, key: &RegistryKey, value: Option<RegistryValue>) -> bool {
        match (key, value) {
            (RegistryKey::Cluster(c), Some(RegistryValue::Cluster(v))) => {
                self.clusters.insert(c.clone(), v.clone()).as_ref() != Some(&v)
            }
            (RegistryKey::Cluster(c), None) => self.clusters.remove(c).is_some(),
            (RegistryKey::Endpoints(c, s), Some(RegistryValue::Endpoints(v))) => {
                self.endpoints
                    .insert((s.clone(), c.clone()), v.clone())
                    .as_ref()
                    != Some(&v)
            }
            (RegistryKey::Endpoints(c, s), None) => {
                self.endpoints.remove(&(s.clone(), c.clone())).is_some()
            }
            (RegistryKey::Policy(p), Some(RegistryValue::Policy(v))) => {
                self.policies.insert(p.clone(), v.clone()).as_ref() != Some(&v)
            }
            (RegistryKey::Policy(p), None) => self.policies.remove(p).is_some(),
            (RegistryKey::Link(a, b), v) => self.set_link(a, b, None, v),
            (RegistryKey::ReplicaLink(a, b, r), v) => self.set_link(a, b, Some(r.clone()), v),
            (RegistryKey::Peering(a, b), Some(RegistryValue::Peering(v))) => {
                self.peerings
                    .insert((a.clone(), b.clone()), v.clone())
                    .as_ref()
                    != Some(&v)
            }
            (RegistryKey::Peering(a, b), None) => {
                self.peerings.remove(&(a.clone(), b.clone())).is_some()
            }
            (RegistryKey::Withdrawn(c), Some(RegistryValue::Withdrawn(v))) => {
                self.withdrawn.insert(c.clone(), v.clone()).as_ref() != Some(&v)
            }
            (RegistryKey::Withdrawn(c), None) => self.withdrawn.remove(c).is_some(),
            // A value of another kind than its key cannot come out of the decoder.
            _ => false,
        }
    }

    /// Set or remove one replica's (or the single gateway's) entry of link `a`→`b`, and merge
    /// the link again.
    fn set_link(
        &mut self,
        a: &ClusterId,
        b: &ClusterId,
        replica: Option<Name>,
        value: Option<RegistryValue>,
    ) -> bool {
        let key = (a.clone(), b.clone(), replica);
        let changed = match value {
            Some(RegistryValue::Link(v)) => {
                self.link_entries.insert(key, v.clone()).as_ref() != Some(&v)
            }
            None => self.link_entries.remove(&key).is_some(),
            // A value of another kind than its key cannot come out of the decoder.
            Some(_) => false,
        };
        if changed {
            let merged = LinkState::merge(
                self.link_entries
                    .range((a.clone(), b.clone(), None)..)
                    .take_while(|((x, y, _), _)| x == a && y == b)
                    .map(|(_, l)| l.as_ref()),
            );
            match merged {
                Some(l) => {
                    self.links.insert((a.clone(), b.clone()), Arc::new(l));
                }
                None => {
                    self.links.remove(&(a.clone(), b.clone()));
                }
            }
        }
        changed
    }

    fn keys(&self) -> Vec<RegistryKey> {
        let mut out: Vec<RegistryKey> = Vec::new();
        out.extend(
            self.clusters
                .keys()
                .map(|c| RegistryKey::Cluster(c.clone())),
        );
        out.extend(
            self.endpoints
                .keys()
                .map(|(s, c)| RegistryKey::Endpoints(c.clone(), s.clone())),
        );
        out.extend(self.policies.keys().map(|p| RegistryKey::Policy(p.clone())));
        out.extend(self.link_entries.keys().map(|(a, b, r)| match r {
            None => RegistryKey::Link(a.clone(), b.clone()),
            Some(r) => RegistryKey::ReplicaLink(a.clone(), b.clone(), r.clone()),
        }));
        out.extend(
            self.peerings
                .keys()
                .map(|(a, b)| RegistryKey::Peering(a.clone(), b.clone())),
        );
        out.extend(
            self.withdrawn
                .keys()
                .map(|c| RegistryKey::Withdrawn(c.clone())),
        );
        out
    }
}

/// One entry that changed: its new value, or `None` when it was removed.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    pub key: RegistryKey,
    pub value: Option<RegistryValue>,
}

/// What changed at one revision (or, for a resync, between the old and the reloaded state).
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub revision: i64,
    /// True when this change comes from a full reload (start-up, or after compaction).
    pub resync: bool,
    pub updates: Vec<Update>,
}

/// The cache's connection state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheStatus {
    /// Never loaded yet.
    Starting,
    /// Up to date and watching.
    Synced { revision: i64 },
    /// The store is away; the last good snapshot is still served.
    Disconnected { revision: i64, error: String },
}

/// Counters for observability.
#[derive(Debug, Default)]
pub struct CacheMetrics {
    pub full_loads: std::sync::atomic::AtomicU64,
    pub resumes: std::sync::atomic::AtomicU64,
    pub decode_errors: std::sync::atomic::AtomicU64,
    pub events: std::sync::atomic::AtomicU64,
}

/// A running registry cache. Dropping it stops the watch.
pub struct RegistryCache {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    changes: broadcast::Sender<Arc<Change>>,
    status: watch::Receiver<CacheStatus>,
    metrics: Arc<CacheMetrics>,
    task: JoinHandle<()>,
}

impl Drop for RegistryCache {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RegistryCache {
    /// Start a cache of everything under `/strait/v1/` in `backend`.
    pub fn spawn(backend: Backend) -> Self {
        let (snap_tx, snapshots) = watch::channel(Arc::new(Snapshot::default()));
        let (changes, _) = broadcast::channel(1024);
        let (status_tx, status) = watch::channel(CacheStatus::Starting);
        let metrics = Arc::new(CacheMetrics::default());
        let task = tokio::spawn(run(
            backend,
            snap_tx,
            changes.clone(),
            status_tx,
            metrics.clone(),
        ));
        Self {
            snapshots,
            changes,
            status,
            metrics,
            task,
        }
    }

    /// The latest snapshot (the last good one while the store is away).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshots.borrow().clone()
    }

    /// A receiver that sees every new snapshot.
    pub fn snapshots(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshots.clone()
    }

    /// A stream of changes from now on. A receiver that falls behind gets `Lagged` and should
    /// take [`RegistryCache::snapshot`] as its new base.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.changes.subscribe()
    }

    /// A snapshot and a change stream that starts no later than it: apply only changes whose
    /// `revision` is greater than the snapshot's (earlier ones are already in it). This is the
    /// race-free way to follow the registry incrementally.
    pub fn subscribe_with_snapshot(&self) -> (Arc<Snapshot>, broadcast::Receiver<Arc<Change>>) {
        let rx = self.changes.subscribe();
        (self.snapshot(), rx)
    }

    pub fn status(&self) -> CacheStatus {
        self.status.borrow().clone()
    }

    pub fn status_receiver(&self) -> watch::Receiver<CacheStatus> {
        self.status.clone()
    }

    pub fn metrics(&self) -> &CacheMetrics {
        &self.metrics
    }

    /// Wait until a snapshot satisfies `pred`; on timeout, returns the last snapshot as the error.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&Snapshot) -> bool,
    ) -> Result<Arc<Snapshot>, Arc<Snapshot>> {
        let mut rx = self.snapshots.clone();
        let r = tokio::time::timeout(timeout, async {
            rx.wait_for(|s| pred(s)).await.map(|s| s.clone())
        })
        .await;
        match r {
            Ok(Ok(s)) => Ok(s),
            _ => Err(self.snapshot()),
        }
    }

    /// Wait for the first full load.
    pub async fn wait_synced(&self, timeout: Duration) -> Result<Arc<Snapshot>, CacheStatus> {
        let mut rx = self.status.clone();
        let r = tokio::time::timeout(timeout, async {
            rx.wait_for(|s| matches!(s, CacheStatus::Synced { .. }))
                .await
                .is_ok()
        })
        .await;
        match r {
            Ok(true) => Ok(self.snapshot()),
            _ => Err(self.status()),
        }
    }
}

struct Sink {
    snapshots: watch::Sender<Arc<Snapshot>>,
    changes: broadcast::Sender<Arc<Change>>,
    status: watch::Sender<CacheStatus>,
}

impl Sink {
    /// The change goes out before the snapshot that contains it: whoever has seen a snapshot and
    /// subscribes afterwards never receives a change already in it.
    fn publish(&self, snapshot: &Snapshot, change: Option<Change>) {
        if let Some(c) = change {
            // No receiver is fine.
            let _ = self.changes.send(Arc::new(c));
        }
        self.snapshots.send_replace(Arc::new(snapshot.clone()));
    }
    fn status(&self, status: CacheStatus) {
        self.status.send_if_modified(|s| {
            if *s != status {
                *s = status;
                true
            } else {
                false
            }
        });
    }
}

fn decode_into(
    decoder: &mut Decoder,
    metrics: &CacheMetrics,
    raw_key: &str,
    value: &[u8],
) -> Option<(RegistryKey, Option<RegistryValue>)> {
    let key = match RegistryKey::parse(raw_key) {
        Some(k) => k,
        None => {
            tracing::debug!(
                key = raw_key,
                "ignoring a registry key this version does not know"
            );
            return None;
        }
    };
    match decoder.decode(&key, raw_key, value) {
        Ok(v) => Some((key, Some(v))),
        Err(e) => {
            metrics
                .decode_errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(error = %e, "skipping a registry entry that does not decode");
            // Treat as absent: a stale good value must not linger under a key whose current
            // value is unreadable.
            Some((key, None))
        }
    }
}

async fn run(
    backend: Backend,
    snapshots: watch::Sender<Arc<Snapshot>>,
    changes: broadcast::Sender<Arc<Change>>,
    status: watch::Sender<CacheStatus>,
    metrics: Arc<CacheMetrics>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let sink = Sink {
        snapshots,
        changes,
        status,
    };
    let mut current = Snapshot::default();
    let mut decoder = Decoder::new();
    let mut backoff = super::store_backoff();
    'load: loop {
        // Full load at one revision.
        let (revision, kvs) = match backend.get_prefix(ROOT).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, backend = %backend.describe(), "registry load failed; retrying");
                sink.status(CacheStatus::Disconnected {
                    revision: current.revision,
                    error: e.to_string(),
                });
                tokio::time::sleep(backoff.next_delay()).await;
                continue 'load;
            }
        };
        metrics.full_loads.fetch_add(1, Relaxed);
        decoder.clear();
        let mut fresh = Snapshot {
            revision,
            ..Snapshot::default()
        };
        for kv in &kvs {
            if let Some((key, value)) = decode_into(&mut decoder, &metrics, &kv.key, &kv.value) {
                fresh.set(&key, value);
            }
        }
        drop(kvs);
        let mut updates = Vec::new();
        for key in current.keys() {
            if fresh.get(&key).is_none() {
                updates.push(Update { key, value: None });
            }
        }
        for key in fresh.keys() {
            let v = fresh.get(&key);
            if current.get(&key) != v {
                updates.push(Update { key, value: v });
            }
        }
        let first = current.revision == 0;
        current = fresh;
        tracing::info!(
            revision,
            clusters = current.clusters.len(),
            endpoints = current.endpoint_count(),
            "registry snapshot loaded"
        );
        sink.publish(
            &current,
            (!updates.is_empty() || first).then_some(Change {
                revision,
                resync: true,
                updates,
            }),
        );
        sink.status(CacheStatus::Synced { revision });
        backoff.reset();

        // Watch from the next revision; resume there after every break.
        'watch: loop {
            let mut w = match backend.watch(ROOT, current.revision + 1).await {
                Ok(w) => w,
                Err(RegistryError::Compacted { .. }) => {
                    tracing::warn!(
                        revision = current.revision,
                        "registry history compacted; reloading"
                    );
                    continue 'load;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "registry watch failed; retrying");
                    sink.status(CacheStatus::Disconnected {
                        revision: current.revision,
                        error: e.to_string(),
                    });
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue 'watch;
                }
            };
            loop {
                match w.next().await {
                    Ok(batch) => {
                        backoff.reset();
                        sink.status(CacheStatus::Synced {
                            revision: current.revision.max(batch.revision),
                        });
                        if batch.events.is_empty() {
                            if batch.revision > current.revision {
                                current.revision = batch.revision;
                                sink.publish(&current, None);
                            }
                            continue;
                        }
                        let mut updates = Vec::new();
                        let mut top = current.revision;
                        for ev in batch.events {
                            let rev = ev.mod_revision();
                            if rev <= current.revision {
                                // Already applied before the stream was re-established.
                                continue;
                            }
                            top = top.max(rev);
                            metrics.events.fetch_add(1, Relaxed);
                            let decoded = match &ev {
                                WatchEvent::Put(kv) => {
                                    decode_into(&mut decoder, &metrics, &kv.key, &kv.value)
                                }
                                WatchEvent::Delete { key, .. } => {
                                    RegistryKey::parse(key).map(|k| (k, None))
                                }
                            };
                            if let Some((key, value)) = decoded
                                && current.set(&key, value.clone())
                            {
                                updates.push(Update { key, value });
                            }
                        }
                        if top > current.revision {
                            current.revision = top;
                            sink.publish(
                                &current,
                                (!updates.is_empty()).then_some(Change {
                                    revision: top,
                                    resync: false,
                                    updates,
                                }),
                            );
                        }
                    }
                    Err(RegistryError::Compacted { .. }) => {
                        tracing::warn!(
                            revision = current.revision,
                            "registry history compacted; reloading"
                        );
                        continue 'load;
                    }
                    Err(e) => {
                        metrics.resumes.fetch_add(1, Relaxed);
                        tracing::warn!(error = %e, revision = current.revision, "registry watch broke; resuming");
                        sink.status(CacheStatus::Disconnected {
                            revision: current.revision,
                            error: e.to_string(),
                        });
                        tokio::time::sleep(backoff.next_delay()).await;
                        continue 'watch;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::DiscoveryFile;
    use crate::registry::codec::cluster_state_kvs;

    fn local(yaml: &str) -> LocalState {
        let f = DiscoveryFile::parse("west.yaml", yaml).expect("discovery file");
        LocalState::decode(&cluster_state_kvs(&f.state)).expect("decodes")
    }

    const WEST: &str = "cluster: west\nregion: us-west\nservices:\n  - name: payments\n    ports: [{name: http, port: 9090, protocol: http}]\n    endpoints: [{address: 10.0.0.1, port: 9090, zone: a}]\n";

    #[test]
    fn gateway_replicas_links_are_merged_and_a_departed_replica_leaves_the_merge() {
        use crate::model::LinkHealth;
        let n = |s: &str| Name::parse("n", s).unwrap();
        let state = |h: LinkHealth, rtt: f64| {
            Some(RegistryValue::Link(Arc::new(LinkState {
                from: n("west"),
                to: n("east"),
                state: h,
                rtt_ms: rtt,
                loss: 0.0,
                since: std::time::SystemTime::UNIX_EPOCH,
            })))
        };
        let key = |r: &str| RegistryKey::ReplicaLink(n("west"), n("east"), n(r));
        let merged = |s: &Snapshot| {
            s.links
                .get(&(n("west"), n("east")))
                .map(|l| (l.state, l.rtt_ms))
        };
        let mut s = Snapshot::default();
        assert!(s.set(&key("w1"), state(LinkHealth::Down, 0.0)));
        assert_eq!(merged(&s), Some((LinkHealth::Down, 0.0)));
        // Up while any replica is; the best RTT among the up ones.
        assert!(s.set(&key("w2"), state(LinkHealth::Up, 9.0)));
        assert!(s.set(&key("w3"), state(LinkHealth::Up, 4.0)));
        assert_eq!(merged(&s), Some((LinkHealth::Up, 4.0)));
        assert!(!s.set(&key("w3"), state(LinkHealth::Up, 4.0)), "no change");
        // Degraded beats down, up beats degraded.
        assert!(s.set(&key("w3"), None));
        assert!(s.set(&key("w2"), state(LinkHealth::Degraded, 30.0)));
        assert_eq!(merged(&s), Some((LinkHealth::Degraded, 30.0)));
        // A single gateway's key (the previous release's) merges with the replicas'.
        assert!(s.set(
            &RegistryKey::Link(n("west"), n("east")),
            state(LinkHealth::Up, 2.0)
        ));
        assert_eq!(merged(&s), Some((LinkHealth::Up, 2.0)));
        assert_eq!(s.keys().len(), 3);
        assert!(s.get(&key("w1")).is_some() && s.get(&key("w3")).is_none());
        for k in [
            key("w1"),
            key("w2"),
            RegistryKey::Link(n("west"), n("east")),
        ] {
            assert!(s.set(&k, None));
        }
        assert_eq!(merged(&s), None, "no replica left: no link");
        assert!(s.link_entries.is_empty());
    }

    #[test]
    fn a_cluster_keeps_its_own_entries_when_the_registry_lost_them() {
        let mut west = local(WEST);
        // The registry lost west (its lease expired): the overlay puts it back.
        let empty = Snapshot::default();
        let with = empty
            .overlay(&mut west)
            .expect("west's entries are missing");
        assert_eq!(with.clusters.len(), 1);
        assert_eq!(with.endpoint_count(), 1);
        // Already there: nothing to do (no new generation for nothing).
        assert!(with.overlay(&mut west).is_none());
        // The registry's own, equal copy (decoded apart): nothing to do either, and west now
        // holds the registry's copy, so the next check compares pointers.
        let mut copy = local(WEST);
        let registry_copy = Snapshot::default().overlay(&mut copy).expect("built");
        assert!(registry_copy.overlay(&mut west).is_none());
        assert!(Arc::ptr_eq(&west.cluster, &copy.cluster));
        // The registry holds an older state of west (a service since removed, another
        // endpoint): the local state wins, other clusters are untouched.
        let mut older = local(&format!(
            "{}  - name: old\n    ports: [{{name: http, port: 80, protocol: http}}]\n    endpoints: [{{address: 10.0.0.9, port: 80}}]\n",
            WEST.replace("10.0.0.1", "10.0.0.2")
        ));
        let mut east = local(&WEST.replace("west", "east"));
        let registry = empty
            .overlay(&mut older)
            .and_then(|s| s.overlay(&mut east))
            .expect("built");
        let fixed = registry.overlay(&mut west).expect("differs");
        assert_eq!(
            fixed.endpoints.len(),
            2,
            "west's payments and east's payments"
        );
        let west_payments = fixed
            .endpoints
            .iter()
            .find(|((s, c), _)| s.name.as_str() == "payments" && c.as_str() == "west")
            .map(|(_, e)| e.clone())
            .expect("west's payments");
        assert_eq!(
            west_payments.endpoints[0].address.to_string(),
            "10.0.0.1",
            "the local endpoint, not the registry's older one"
        );
        assert!(
            fixed.clusters.keys().any(|c| c.as_str() == "east"),
            "other clusters untouched"
        );
    }
}
