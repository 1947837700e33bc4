//! The embedded registry: an in-process store with etcd's semantics — a global revision bumped
//! once per transaction, leases whose keys vanish when they expire or are revoked, prefix watches
//! that replay history from a revision, and compaction that makes older revisions unavailable.
//! It serves single-machine use and runs the same test suite as etcd.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use super::RegistryError;
use super::backend::{KeyValue, LeaseId, Op, WatchBatch, WatchEvent};

/// Revisions of history kept for watchers that resume, before automatic compaction.
const DEFAULT_HISTORY: usize = 100_000;

struct Stored {
    value: Vec<u8>,
    mod_revision: i64,
    lease: LeaseId,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

struct Watcher {
    connection: u64,
    prefix: String,
    /// Events below this revision are not delivered (a watch may start in the future).
    start_revision: i64,
    tx: mpsc::UnboundedSender<Result<WatchBatch, RegistryError>>,
}

struct State {
    revision: i64,
    compact_revision: i64,
    kvs: BTreeMap<String, Stored>,
    /// Every event since `compact_revision`, in revision order.
    history: VecDeque<WatchEvent>,
    history_limit: usize,
    leases: HashMap<LeaseId, Lease>,
    next_lease: LeaseId,
    watchers: Vec<Watcher>,
    /// Connections (handles) currently cut off from the store.
    unavailable: BTreeSet<u64>,
    next_connection: u64,
}

struct Shared {
    state: Mutex<State>,
    lease_changed: Notify,
}

/// An in-process registry store. Cheap to clone; all clones share one store and one
/// "connection". [`EmbeddedRegistry::connection`] makes a handle with a connection of its own,
/// which can be cut off from the store (as a network partition would) without affecting others.
#[derive(Clone)]
pub struct EmbeddedRegistry {
    shared: Arc<Shared>,
    connection: u64,
}

impl Default for EmbeddedRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl EmbeddedRegistry {
    /// A new, empty store. Must be called inside a tokio runtime (leases expire on a task); it
    /// panics otherwise, as `tokio::spawn` does.
    pub fn new() -> Self {
        Self::with_history_limit(DEFAULT_HISTORY)
    }

    /// A store that keeps at most `limit` events of history (older ones are compacted away).
    pub fn with_history_limit(limit: usize) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                revision: 1,
                compact_revision: 0,
                kvs: BTreeMap::new(),
                history: VecDeque::new(),
                history_limit: limit.max(1),
                leases: HashMap::new(),
                next_lease: 0x5741_0000,
                watchers: Vec::new(),
                unavailable: BTreeSet::new(),
                next_connection: 1,
            }),
            lease_changed: Notify::new(),
        });
        tokio::spawn(expire_leases(Arc::downgrade(&shared)));
        Self {
            shared,
            connection: 0,
        }
    }

    /// A handle on the same store with a connection of its own.
    pub fn connection(&self) -> Self {
        let mut s = self.lock();
        s.next_connection += 1;
        let connection = s.next_connection;
        drop(s);
        Self {
            shared: self.shared.clone(),
            connection,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the store half-updated in a way later
        // callers could not handle: every mutation is completed before anything can panic.
        match self.shared.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn state(&self) -> Result<MutexGuard<'_, State>, RegistryError> {
        let s = self.lock();
        if s.unavailable.contains(&self.connection) {
            return Err(RegistryError::Unavailable {
                endpoints: "embedded".into(),
                message: "the embedded registry is marked unavailable".into(),
            });
        }
        Ok(s)
    }

    /// Cut this handle's connection off from the store (every operation fails as if the store
    /// were unreachable, and its open watches break), or bring it back.
    pub fn set_available(&self, available: bool) {
        let mut s = self.lock();
        if available {
            s.unavailable.remove(&self.connection);
        } else {
            s.unavailable.insert(self.connection);
            self.break_watches(&mut s, "the connection to the embedded registry was cut");
        }
    }

    /// Break this connection's open watch streams (as a lost connection would).
    pub fn disconnect_watchers(&self) {
        let mut s = self.lock();
        self.break_watches(&mut s, "watch stream disconnected");
    }

    fn break_watches(&self, s: &mut State, why: &str) {
        let conn = self.connection;
        s.watchers.retain(|w| {
            if w.connection == conn {
                let _ = w.tx.send(Err(RegistryError::Unavailable {
                    endpoints: "embedded".into(),
                    message: why.to_string(),
                }));
                false
            } else {
                true
            }
        });
    }

    pub fn current_revision(&self) -> Result<i64, RegistryError> {
        Ok(self.state()?.revision)
    }

    pub fn get_prefix(&self, prefix: &str) -> Result<(i64, Vec<KeyValue>), RegistryError> {
        let s = self.state()?;
        let out = s
            .kvs
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| KeyValue {
                key: k.clone(),
                value: v.value.clone(),
                mod_revision: v.mod_revision,
                lease: v.lease,
            })
            .collect();
        Ok((s.revision, out))
    }

    pub fn commit(&self, ops: Vec<Op>) -> Result<i64, RegistryError> {
        self.commit_if(None, ops).map(|r| r.unwrap_or_default())
    }

    /// [`EmbeddedRegistry::commit`] only if `condition` holds (`Ok(None)` when it does not).
    pub fn commit_if(
        &self,
        condition: Option<&super::backend::Condition>,
        ops: Vec<Op>,
    ) -> Result<Option<i64>, RegistryError> {
        let mut s = self.state()?;
        match condition {
            Some(super::backend::Condition::Absent(k)) if s.kvs.contains_key(k) => return Ok(None),
            Some(super::backend::Condition::LeaseIs(k, l))
                if s.kvs.get(k).map(|v| v.lease) != Some(*l) =>
            {
                return Ok(None);
            }
            _ => {}
        }
        let mut seen = BTreeSet::new();
        for op in &ops {
            if !seen.insert(op.key()) {
                return Err(RegistryError::Rejected(format!(
                    "duplicate key given in txn request: {}",
                    op.key()
                )));
            }
            if let Op::Put { lease: Some(l), .. } = op
                && *l != 0
                && !s.leases.contains_key(l)
            {
                return Err(RegistryError::LeaseNotFound(*l));
            }
        }
        let next = s.revision + 1;
        let mut events = Vec::new();
        let st = &mut *s;
        for op in ops {
            match op {
                Op::Put { key, value, lease } => {
                    let lease = lease.unwrap_or(0);
                    if let Some(old) = st.kvs.get(&key)
                        && old.lease != 0
                        && old.lease != lease
                        && let Some(l) = st.leases.get_mut(&old.lease)
                    {
                        l.keys.remove(&key);
                    }
                    if lease != 0
                        && let Some(l) = st.leases.get_mut(&lease)
                    {
                        l.keys.insert(key.clone());
                    }
                    st.kvs.insert(
                        key.clone(),
                        Stored {
                            value: value.clone(),
                            mod_revision: next,
                            lease,
                        },
                    );
                    events.push(WatchEvent::Put(KeyValue {
                        key,
                        value,
                        mod_revision: next,
                        lease,
                    }));
                }
                Op::Delete { key } => {
                    if let Some(old) = st.kvs.remove(&key) {
                        if let Some(l) = st.leases.get_mut(&old.lease) {
                            l.keys.remove(&key);
                        }
                        events.push(WatchEvent::Delete {
                            key,
                            mod_revision: next,
                        });
                    }
                }
            }
        }
        if events.is_empty() {
            return Ok(Some(s.revision));
        }
        s.revision = next;
        publish(&mut s, events);
        Ok(Some(next))
    }

    pub fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, RegistryError> {
        let ttl = ttl.max(Duration::from_secs(1));
        let mut s = self.state()?;
        s.next_lease += 1;
        let id = s.next_lease;
        s.leases.insert(
            id,
            Lease {
                ttl,
                deadline: Instant::now() + ttl,
                keys: BTreeSet::new(),
            },
        );
        drop(s);
        self.shared.lease_changed.notify_one();
        Ok(id)
    }

    pub fn revoke_lease(&self, id: LeaseId) -> Result<(), RegistryError> {
        let mut s = self.state()?;
        if !s.leases.contains_key(&id) {
            return Err(RegistryError::LeaseNotFound(id));
        }
        drop_lease(&mut s, id);
        Ok(())
    }

    pub fn keep_alive(&self, id: LeaseId) -> EmbeddedKeepAlive {
        EmbeddedKeepAlive {
            registry: self.clone(),
            id,
        }
    }

    pub fn watch(&self, prefix: &str, start_revision: i64) -> Result<EmbeddedWatch, RegistryError> {
        let mut s = self.state()?;
        if start_revision > 0 && start_revision < s.compact_revision {
            return Err(RegistryError::Compacted {
                requested: start_revision,
                compact_revision: s.compact_revision,
            });
        }
        let (tx, rx) = mpsc::unbounded_channel();
        if start_revision > 0 {
            // Replay history, one batch per revision.
            let mut batch: Vec<WatchEvent> = Vec::new();
            let mut batch_rev = 0;
            for ev in s.history.iter() {
                if ev.mod_revision() < start_revision || !ev.key().starts_with(prefix) {
                    continue;
                }
                if ev.mod_revision() != batch_rev && !batch.is_empty() {
                    let _ = tx.send(Ok(WatchBatch {
                        revision: batch_rev,
                        events: std::mem::take(&mut batch),
                    }));
                }
                batch_rev = ev.mod_revision();
                batch.push(ev.clone());
            }
            if !batch.is_empty() {
                let _ = tx.send(Ok(WatchBatch {
                    revision: batch_rev,
                    events: batch,
                }));
            }
        }
        s.watchers.push(Watcher {
            connection: self.connection,
            start_revision,
            prefix: prefix.to_string(),
            tx,
        });
        Ok(EmbeddedWatch { rx })
    }

    pub fn compact(&self, revision: i64) -> Result<(), RegistryError> {
        let mut s = self.state()?;
        if revision <= s.compact_revision {
            return Err(RegistryError::Rejected(format!(
                "mvcc: required revision {revision} has been compacted"
            )));
        }
        if revision > s.revision {
            return Err(RegistryError::Rejected(format!(
                "mvcc: required revision {revision} is a future revision"
            )));
        }
        compact_to(&mut s, revision);
        Ok(())
    }

    /// Number of live leases (for tests and diagnostics).
    pub fn lease_count(&self) -> usize {
        self.lock().leases.len()
    }
}

fn compact_to(s: &mut State, revision: i64) {
    s.compact_revision = revision;
    while s
        .history
        .front()
        .is_some_and(|e| e.mod_revision() < revision)
    {
        s.history.pop_front();
    }
}

/// Record events of one revision and hand them to matching watchers.
fn publish(s: &mut State, events: Vec<WatchEvent>) {
    let revision = s.revision;
    s.watchers.retain(|w| {
        let mine: Vec<WatchEvent> = events
            .iter()
            .filter(|e| e.key().starts_with(&w.prefix) && e.mod_revision() >= w.start_revision)
            .cloned()
            .collect();
        if mine.is_empty() {
            return !w.tx.is_closed();
        }
        w.tx.send(Ok(WatchBatch {
            revision,
            events: mine,
        }))
        .is_ok()
    });
    s.history.extend(events);
    if s.history.len() > s.history_limit {
        let excess = s.history.len() - s.history_limit;
        if let Some(e) = s.history.get(excess) {
            let keep_from = e.mod_revision();
            compact_to(s, keep_from);
        }
    }
}

fn drop_lease(s: &mut State, id: LeaseId) {
    let Some(lease) = s.leases.remove(&id) else {
        return;
    };
    let next = s.revision + 1;
    let mut events = Vec::new();
    for key in lease.keys {
        if s.kvs.get(&key).is_some_and(|v| v.lease == id) {
            s.kvs.remove(&key);
            events.push(WatchEvent::Delete {
                key,
                mod_revision: next,
            });
        }
    }
    if !events.is_empty() {
        s.revision = next;
        publish(s, events);
    }
}

async fn expire_leases(shared: Weak<Shared>) {
    loop {
        let (next_deadline, notified) = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let now = Instant::now();
            let mut s = match shared.state.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            let expired: Vec<LeaseId> = s
                .leases
                .iter()
                .filter(|(_, l)| l.deadline <= now)
                .map(|(id, _)| *id)
                .collect();
            for id in expired {
                drop_lease(&mut s, id);
            }
            let next = s.leases.values().map(|l| l.deadline).min();
            drop(s);
            // Wake at the next deadline, when a lease changes, or at least every second to notice
            // that the store has been dropped.
            let cap = now + Duration::from_secs(1);
            let deadline = next.map_or(cap, |d| d.min(cap));
            let shared2 = shared.clone();
            (
                deadline,
                async move { shared2.lease_changed.notified().await },
            )
        };
        tokio::select! {
            _ = tokio::time::sleep_until(next_deadline) => {}
            _ = notified => {}
        }
    }
}

/// Keeps an embedded lease alive.
pub struct EmbeddedKeepAlive {
    registry: EmbeddedRegistry,
    id: LeaseId,
}

impl EmbeddedKeepAlive {
    pub fn refresh(&mut self) -> Result<Duration, RegistryError> {
        let mut s = self.registry.state()?;
        let Some(l) = s
            .leases
            .get_mut(&self.id)
            .filter(|l| l.deadline > Instant::now())
        else {
            return Err(RegistryError::LeaseNotFound(self.id));
        };
        l.deadline = Instant::now() + l.ttl;
        let ttl = l.ttl;
        drop(s);
        self.registry.shared.lease_changed.notify_one();
        Ok(ttl)
    }
}

/// A prefix watch on the embedded store.
pub struct EmbeddedWatch {
    rx: mpsc::UnboundedReceiver<Result<WatchBatch, RegistryError>>,
}

impl EmbeddedWatch {
    pub async fn next(&mut self) -> Result<WatchBatch, RegistryError> {
        match self.rx.recv().await {
            Some(r) => r,
            None => Err(RegistryError::Unavailable {
                endpoints: "embedded".into(),
                message: "watch stream closed".into(),
            }),
        }
    }
}
