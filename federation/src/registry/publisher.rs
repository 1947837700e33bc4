//! Publishing a set of keys under a lease: a cluster's endpoints (by its controlplane or
//! `strait registry publish`), or a gateway's link states.
//!
//! The publisher owns some keys and prefixes. It keeps its lease alive while it runs, writes only
//! what differs from what it last wrote (in transactions of bounded size), removes owned keys it
//! no longer wants (including those left by a previous incarnation), re-registers everything
//! under a new lease when the old one is lost (e.g. after a partition longer than the TTL), and on
//! shutdown revokes the lease so every entry disappears at once. A publisher that dies without
//! revoking leaves its entries to expire with the lease's TTL.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::RegistryError;
use super::backend::{Backend, KeepAlive, LeaseId, Op};
use crate::backoff::Backoff;

/// Tuning of a publisher.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// The lease's TTL: how long entries outlive a publisher that died.
    pub lease_ttl: Duration,
    /// Most operations in one transaction (etcd's default `--max-txn-ops` is 128).
    pub max_txn_ops: usize,
    /// Most bytes in one transaction (etcd's default `--max-request-bytes` is 1.5 MiB).
    pub max_txn_bytes: usize,
    /// Revoke the lease on shutdown, so that every entry disappears at once. Off by default:
    /// a restart is not a withdrawal — the entries stay until a successor takes them over
    /// (moves them to its own lease) or the TTL expires.
    pub withdraw_on_exit: bool,
    /// Several replicas, one publisher: publish only while holding this leadership key (created
    /// under the publisher's lease when absent; handed over on shutdown).
    pub leader: Option<Leadership>,
    /// How often the publisher reads back what it owns and rewrites what differs (keys changed
    /// or removed behind its back: by hand, by an older release's publisher).
    pub verify_interval: Duration,
}

/// The key replicas of one publisher compete for, and this replica's name in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leadership {
    pub key: String,
    pub id: String,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(10),
            max_txn_ops: 128,
            max_txn_bytes: 1 << 20,
            withdraw_on_exit: false,
            leader: None,
            verify_interval: Duration::from_secs(60),
        }
    }
}

/// The keys a publisher owns: exact keys, and prefixes (ending in `/`) — of which, with a
/// `suffix`, only the keys ending in it (one gateway replica's links among its cluster's).
#[derive(Debug, Clone, Default)]
pub struct Owned {
    pub keys: Vec<String>,
    pub prefixes: Vec<String>,
    pub suffix: Option<String>,
}

impl Owned {
    pub fn contains(&self, key: &str) -> bool {
        self.keys.iter().any(|k| k == key)
            || self.prefixes.iter().any(|p| key.starts_with(p)) && self.suffix_matches(key)
    }

    fn suffix_matches(&self, key: &str) -> bool {
        self.suffix.as_deref().is_none_or(|s| key.ends_with(s))
    }

    /// What a cluster's endpoint publisher owns: its record, its endpoints, and the tombstone
    /// of a withdrawal (removed when the cluster publishes again).
    pub fn cluster(id: &crate::model::ClusterId) -> Self {
        Self {
            keys: vec![
                super::RegistryKey::cluster(id),
                super::RegistryKey::withdrawn(id),
            ],
            prefixes: vec![super::RegistryKey::endpoints_prefix(id)],
            suffix: None,
        }
    }
}

/// Take `cluster` out of the federation on purpose: first its tombstone
/// (`/strait/v1/withdrawn/C`, so that no reader keeps serving the cluster's last endpoints as it
/// does for a control plane that merely went silent), then its record, its endpoints and its
/// gateway's link states. Returns the number of keys removed. A control plane of the cluster
/// that still runs publishes everything again (and removes the tombstone): stop it first.
pub async fn withdraw_cluster(
    backend: &Backend,
    cluster: &crate::model::ClusterId,
) -> Result<usize, RegistryError> {
    use super::RegistryKey;
    let tomb = crate::model::Withdrawal {
        cluster: cluster.clone(),
        at: std::time::SystemTime::now(),
    };
    backend
        .commit(vec![Op::Put {
            key: RegistryKey::withdrawn(cluster),
            value: super::codec::encode_withdrawal(&tomb),
            lease: None,
        }])
        .await?;
    let mut keys = Vec::new();
    for prefix in [
        RegistryKey::endpoints_prefix(cluster),
        RegistryKey::links_prefix(cluster),
    ] {
        keys.extend(
            backend
                .get_prefix(&prefix)
                .await?
                .1
                .into_iter()
                .map(|kv| kv.key),
        );
    }
    if let Some(kv) = backend.get(&RegistryKey::cluster(cluster)).await? {
        keys.push(kv.key);
    }
    let removed = keys.len();
    let ops: Vec<Op> = keys.into_iter().map(|key| Op::Delete { key }).collect();
    for batch in batches(
        ops,
        PublisherConfig::default().max_txn_ops,
        PublisherConfig::default().max_txn_bytes,
    ) {
        backend.commit(batch).await?;
    }
    Ok(removed)
}

/// What a publisher is doing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublisherStatus {
    /// The lease in use.
    pub lease: Option<LeaseId>,
    /// Whether the store holds exactly the desired state (as of `revision`).
    pub in_sync: bool,
    /// Revision of the last write.
    pub revision: i64,
    /// How many times a lease had to be granted.
    pub sessions: u64,
    pub last_error: Option<String>,
    /// Whether this replica publishes (always, without leadership).
    pub leader: bool,
}

/// Publishes the latest desired key/value set under a lease until shut down.
pub struct LeasedPublisher {
    backend: Backend,
    name: String,
    owned: Owned,
    config: PublisherConfig,
    desired: watch::Receiver<BTreeMap<String, Vec<u8>>>,
    status: watch::Sender<PublisherStatus>,
}

enum SessionEnd {
    Shutdown,
    LeaseLost,
}

impl LeasedPublisher {
    /// `name` is used in logs (e.g. `cluster east`). Every desired key must be owned.
    pub fn new(
        backend: Backend,
        name: impl Into<String>,
        owned: Owned,
        config: PublisherConfig,
        desired: watch::Receiver<BTreeMap<String, Vec<u8>>>,
    ) -> (Self, watch::Receiver<PublisherStatus>) {
        let (status, rx) = watch::channel(PublisherStatus::default());
        (
            Self {
                backend,
                name: name.into(),
                owned,
                config,
                desired,
                status,
            },
            rx,
        )
    }

    fn set_status(&self, f: impl FnOnce(&mut PublisherStatus)) {
        self.status.send_modify(f);
    }

    /// Run until `shutdown` completes; then, with `withdraw_on_exit`, revoke the lease. Errors
    /// talking to the store are retried with back-off, never returned.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut backoff = super::store_backoff();
        loop {
            // A lease first.
            let lease = loop {
                tokio::select! {
                    _ = &mut shutdown => return,
                    r = self.backend.grant_lease(self.config.lease_ttl) => match r {
                        Ok(l) => break l,
                        Err(e) => {
                            tracing::warn!(publisher = %self.name, error = %e, "cannot grant a registry lease; retrying");
                            self.set_status(|s| s.last_error = Some(e.to_string()));
                            tokio::select! {
                                _ = &mut shutdown => return,
                                _ = tokio::time::sleep(backoff.next_delay()) => {}
                            }
                        }
                    }
                }
            };
            tracing::info!(publisher = %self.name, lease = format!("{lease:x}"), ttl = ?self.config.lease_ttl, "registry lease granted");
            self.set_status(|s| {
                s.lease = Some(lease);
                s.in_sync = false;
                s.sessions += 1;
            });
            match self.session(lease, &mut shutdown, &mut backoff).await {
                SessionEnd::Shutdown if !self.config.withdraw_on_exit => {
                    if let Some(l) = &self.config.leader
                        && self.status.borrow().leader
                    {
                        // Hand over: another replica takes the key (and the entries) at once.
                        let resign = self.backend.commit_if(
                            super::backend::Condition::LeaseIs(l.key.clone(), lease),
                            vec![Op::Delete { key: l.key.clone() }],
                        );
                        match tokio::time::timeout(Duration::from_secs(2), resign).await {
                            Ok(Ok(_)) => {
                                tracing::info!(publisher = %self.name, "leadership handed over")
                            }
                            Ok(Err(e)) => {
                                tracing::warn!(publisher = %self.name, error = %e, "could not hand leadership over; another replica takes it when the lease expires")
                            }
                            Err(_) => {
                                tracing::warn!(publisher = %self.name, "handing leadership over timed out; another replica takes it when the lease expires")
                            }
                        }
                    }
                    tracing::info!(publisher = %self.name, lease = format!("{lease:x}"), ttl = ?self.config.lease_ttl,
                        "stopping; the entries stay until a successor takes them over or the lease expires");
                    self.set_status(|s| {
                        s.lease = None;
                        s.in_sync = false;
                        s.leader = false;
                    });
                    return;
                }
                SessionEnd::Shutdown => {
                    let revoke = tokio::time::timeout(
                        Duration::from_secs(3),
                        self.backend.revoke_lease(lease),
                    )
                    .await;
                    match revoke {
                        Ok(Ok(())) => {
                            tracing::info!(publisher = %self.name, "lease revoked; entries removed")
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(publisher = %self.name, error = %e, "could not revoke the lease; entries expire with its TTL")
                        }
                        Err(_) => {
                            tracing::warn!(publisher = %self.name, "revoking the lease timed out; entries expire with its TTL")
                        }
                    }
                    self.set_status(|s| {
                        s.lease = None;
                        s.in_sync = false;
                    });
                    return;
                }
                SessionEnd::LeaseLost => {
                    tracing::warn!(publisher = %self.name, lease = format!("{lease:x}"), "registry lease lost; publishing again under a new lease");
                    self.set_status(|s| {
                        s.lease = None;
                        s.in_sync = false;
                        s.leader = false;
                    });
                }
            }
        }
    }

    async fn session(
        &mut self,
        lease: LeaseId,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
        backoff: &mut Backoff,
    ) -> SessionEnd {
        let interval = (self.config.lease_ttl / 3).max(Duration::from_millis(100));
        // The lease is kept alive by a task of its own, so that slow writes never delay a
        // keep-alive past the TTL.
        let (lost_tx, mut lost) = oneshot::channel::<()>();
        let keeper = AbortOnDrop(tokio::spawn(keep_lease_alive(
            self.backend.clone(),
            self.name.clone(),
            lease,
            self.config.lease_ttl,
            interval,
            lost_tx,
        )));
        // With several replicas: publish only as the leader.
        if let Some(l) = self.config.leader.clone() {
            let mut waiting_logged = false;
            loop {
                let attempt = self.backend.commit_if(
                    super::backend::Condition::Absent(l.key.clone()),
                    vec![Op::Put {
                        key: l.key.clone(),
                        value: l.id.clone().into_bytes(),
                        lease: Some(lease),
                    }],
                );
                let won = tokio::select! {
                    _ = shutdown.as_mut() => return SessionEnd::Shutdown,
                    _ = &mut lost => return SessionEnd::LeaseLost,
                    r = attempt => r,
                };
                match won {
                    Ok(Some(_)) => {
                        tracing::info!(publisher = %self.name, replica = %l.id, "this replica leads: publishing");
                        self.set_status(|s| s.leader = true);
                        break;
                    }
                    Ok(None) => {
                        if !waiting_logged {
                            tracing::info!(publisher = %self.name, replica = %l.id, "another replica publishes; standing by");
                            waiting_logged = true;
                        }
                        self.set_status(|s| {
                            s.leader = false;
                            s.in_sync = false;
                        });
                    }
                    Err(RegistryError::LeaseNotFound(_)) => return SessionEnd::LeaseLost,
                    Err(e) => {
                        self.set_status(|s| s.last_error = Some(e.to_string()));
                    }
                }
                tokio::select! {
                    _ = shutdown.as_mut() => return SessionEnd::Shutdown,
                    _ = &mut lost => return SessionEnd::LeaseLost,
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
        } else {
            self.set_status(|s| s.leader = true);
        }
        // What the store holds under our lease, as far as we know. `None` until reconciled.
        let mut written: Option<BTreeMap<String, Vec<u8>>> = None;
        let mut verify_at = Instant::now() + self.config.verify_interval;
        let mut dirty = true;
        let mut retry_at: Option<Instant> = None;
        let mut desired_closed = false;
        let end = loop {
            if dirty && retry_at.is_none_or(|t| t <= Instant::now()) {
                let desired = self.desired.borrow_and_update().clone();
                let result = tokio::select! {
                    _ = shutdown.as_mut() => break SessionEnd::Shutdown,
                    _ = &mut lost => break SessionEnd::LeaseLost,
                    r = self.reconcile(lease, &desired, &mut written) => r,
                };
                match result {
                    Ok((rev, refused)) => {
                        backoff.reset();
                        dirty = false;
                        retry_at = None;
                        let error = (!refused.is_empty()).then(|| {
                            format!(
                                "the registry refused {} key(s): {}",
                                refused.len(),
                                refused.join("; ")
                            )
                        });
                        self.set_status(|s| {
                            s.in_sync = true;
                            s.revision = rev.max(s.revision);
                            s.last_error = error;
                        });
                    }
                    Err(RegistryError::LeaseNotFound(_)) => break SessionEnd::LeaseLost,
                    Err(e) => {
                        tracing::warn!(publisher = %self.name, error = %e, "publishing failed; retrying");
                        retry_at = Some(Instant::now() + backoff.next_delay());
                        self.set_status(|s| {
                            s.in_sync = false;
                            s.last_error = Some(e.to_string());
                        });
                    }
                }
            }
            let retry = async {
                match retry_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.as_mut() => break SessionEnd::Shutdown,
                _ = &mut lost => break SessionEnd::LeaseLost,
                _ = retry => {}
                _ = tokio::time::sleep_until(verify_at) => {
                    // Read back what we own and rewrite what differs.
                    verify_at = Instant::now() + self.config.verify_interval;
                    written = None;
                    dirty = true;
                }
                r = self.desired.changed(), if !desired_closed => {
                    if r.is_err() {
                        // The sender is gone: nothing will change any more; keep the lease.
                        desired_closed = true;
                    } else {
                        dirty = true;
                        self.set_status(|s| s.in_sync = false);
                    }
                }
            }
        };
        drop(keeper);
        end
    }

    /// Bring the store to `desired`, writing only differences. Returns the last revision
    /// written and the keys the store refused (logged; retried with the next change).
    async fn reconcile(
        &self,
        lease: LeaseId,
        desired: &BTreeMap<String, Vec<u8>>,
        written: &mut Option<BTreeMap<String, Vec<u8>>>,
    ) -> Result<(i64, Vec<String>), RegistryError> {
        for k in desired.keys() {
            if !self.owned.contains(k) {
                return Err(RegistryError::Rejected(format!(
                    "publisher {} does not own key {k}",
                    self.name
                )));
            }
        }
        let mut ops = Vec::new();
        let mut state = match written.as_ref() {
            None => {
                // First write under this lease: find what a previous incarnation left behind.
                let mut existing: BTreeMap<String, (Vec<u8>, LeaseId)> = BTreeMap::new();
                for p in &self.owned.prefixes {
                    let (_, kvs) = self.backend.get_prefix(p).await?;
                    existing.extend(
                        kvs.into_iter()
                            .filter(|kv| self.owned.suffix_matches(&kv.key))
                            .map(|kv| (kv.key, (kv.value, kv.lease))),
                    );
                }
                for k in &self.owned.keys {
                    if let Some(kv) = self.backend.get(k).await? {
                        existing.insert(kv.key, (kv.value, kv.lease));
                    }
                }
                let mut state = BTreeMap::new();
                for (k, (v, l)) in existing {
                    if !desired.contains_key(&k) {
                        ops.push(Op::Delete { key: k });
                    } else if l == lease {
                        state.insert(k, v);
                    }
                }
                state
            }
            Some(w) => {
                for k in w.keys() {
                    if !desired.contains_key(k) {
                        ops.push(Op::Delete { key: k.clone() });
                    }
                }
                w.clone()
            }
        };
        for (k, v) in desired {
            if state.get(k) != Some(v) {
                ops.push(Op::Put {
                    key: k.clone(),
                    value: v.clone(),
                    lease: Some(lease),
                });
            }
        }
        let total = ops.len();
        let mut revision = 0;
        let mut refused = Vec::new();
        let lease_err = |e: RegistryError| match e {
            RegistryError::LeaseNotFound(_) => RegistryError::LeaseNotFound(lease),
            RegistryError::Rejected(m) if m.contains("lease not found") => {
                RegistryError::LeaseNotFound(lease)
            }
            other => other,
        };
        let first_write = written.is_none();
        for batch in batches(ops, self.config.max_txn_ops, self.config.max_txn_bytes) {
            match self.backend.commit(batch.clone()).await.map_err(lease_err) {
                Ok(rev) => {
                    revision = rev;
                    apply(&mut state, batch);
                }
                Err(RegistryError::Rejected(why)) => {
                    // One operation the store will never take (e.g. a value over its request
                    // limit) must not block the others: write them one by one.
                    tracing::warn!(publisher = %self.name, error = %why, "a registry transaction was refused; writing its operations one by one");
                    for op in batch {
                        match self
                            .backend
                            .commit(vec![op.clone()])
                            .await
                            .map_err(lease_err)
                        {
                            Ok(rev) => {
                                revision = rev;
                                apply(&mut state, vec![op]);
                            }
                            Err(RegistryError::Rejected(why)) => {
                                tracing::error!(publisher = %self.name, key = op.key(), error = %why, "the registry refused this key");
                                refused.push(format!("{}: {why}", op.key()));
                            }
                            Err(e) => {
                                if !first_write {
                                    *written = Some(state);
                                }
                                return Err(e);
                            }
                        }
                    }
                }
                Err(e) => {
                    // Keep what is known to be written; a first write starts over (re-reading
                    // what is there) next time.
                    if !first_write {
                        *written = Some(state);
                    }
                    return Err(e);
                }
            }
        }
        *written = Some(state);
        if total > 0 {
            tracing::debug!(publisher = %self.name, ops = total, revision, "registry updated");
        }
        Ok((revision, refused))
    }
}

fn apply(state: &mut BTreeMap<String, Vec<u8>>, ops: Vec<Op>) {
    for op in ops {
        match op {
            Op::Put { key, value, .. } => {
                state.insert(key, value);
            }
            Op::Delete { key } => {
                state.remove(&key);
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Refresh `lease` every `interval`; report on `lost` when it is gone (the store says so, or no
/// refresh succeeded for a whole TTL).
async fn keep_lease_alive(
    backend: Backend,
    name: String,
    lease: LeaseId,
    ttl: Duration,
    interval: Duration,
    lost: oneshot::Sender<()>,
) {
    let mut keep_alive: Option<KeepAlive> = None;
    let mut last_refresh = Instant::now();
    let mut wait = interval;
    loop {
        tokio::time::sleep(wait).await;
        wait = interval;
        if keep_alive.is_none() {
            match backend.keep_alive(lease).await {
                Ok(k) => keep_alive = Some(k),
                Err(e) => {
                    tracing::warn!(publisher = %name, error = %e, "cannot open a lease keep-alive");
                    wait = interval.min(Duration::from_millis(500));
                }
            }
        }
        if let Some(k) = keep_alive.as_mut() {
            match tokio::time::timeout(interval, k.refresh()).await {
                Ok(Ok(_)) => last_refresh = Instant::now(),
                Ok(Err(RegistryError::LeaseNotFound(_))) => {
                    let _ = lost.send(());
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(publisher = %name, error = %e, "lease keep-alive failed");
                    keep_alive = None;
                    wait = interval.min(Duration::from_millis(500));
                }
                Err(_) => {
                    tracing::warn!(publisher = %name, "lease keep-alive timed out");
                    keep_alive = None;
                    wait = interval.min(Duration::from_millis(500));
                }
            }
        }
        if last_refresh.elapsed() > ttl {
            // The lease has certainly expired by now.
            let _ = lost.send(());
            return;
        }
    }
}

/// Split `ops` into transactions of at most `max_ops` operations and about `max_bytes` bytes.
pub fn batches(ops: Vec<Op>, max_ops: usize, max_bytes: usize) -> Vec<Vec<Op>> {
    let max_ops = max_ops.max(1);
    let mut out = Vec::new();
    let mut cur: Vec<Op> = Vec::new();
    let mut bytes = 0;
    for op in ops {
        let size = op.wire_size();
        if !cur.is_empty() && (cur.len() >= max_ops || bytes + size > max_bytes) {
            out.push(std::mem::take(&mut cur));
            bytes = 0;
        }
        bytes += size;
        cur.push(op);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gateway_replica_owns_its_own_link_keys_only() {
        let owned = Owned {
            keys: vec![],
            prefixes: vec!["/strait/v1/links/west/".into()],
            suffix: Some("/w1".into()),
        };
        assert!(owned.contains("/strait/v1/links/west/east/w1"));
        assert!(!owned.contains("/strait/v1/links/west/east/w2"));
        assert!(!owned.contains("/strait/v1/links/west/east"));
        assert!(!owned.contains("/strait/v1/links/east/west/w1"));
        let single = Owned {
            suffix: None,
            ..owned
        };
        assert!(single.contains("/strait/v1/links/west/east"));
    }

    #[test]
    fn batching_respects_both_limits() {
        let ops: Vec<Op> = (0..300)
            .map(|i| Op::Put {
                key: format!("k{i:03}"),
                value: vec![0; 100],
                lease: None,
            })
            .collect();
        let b = batches(ops.clone(), 128, 1 << 20);
        assert_eq!(
            b.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![128, 128, 44]
        );
        let b = batches(ops, 128, 1200);
        assert!(
            b.iter().all(|x| x.len() <= 10),
            "{:?}",
            b.iter().map(Vec::len).collect::<Vec<_>>()
        );
        assert_eq!(b.iter().map(Vec::len).sum::<usize>(), 300);
    }
}
