//! The key-value store under the registry: etcd, or the embedded store with the same semantics
//! (revisions, leases, prefix watches that resume from a revision, compaction).

use std::time::Duration;

use super::RegistryError;
use super::embedded::{EmbeddedKeepAlive, EmbeddedRegistry, EmbeddedWatch};
use super::etcd::{EtcdBackend, EtcdKeepAlive, EtcdWatch};

/// A lease id (etcd's int64).
pub type LeaseId = i64;

/// A stored key and value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
    pub lease: LeaseId,
}

/// One write in a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
}

impl Op {
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => key,
        }
    }
    /// Approximate size on the wire, for batching under the store's request-size limit.
    pub fn wire_size(&self) -> usize {
        match self {
            Op::Put { key, value, .. } => key.len() + value.len() + 16,
            Op::Delete { key } => key.len() + 8,
        }
    }
}

/// What a conditional transaction requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// The key does not exist.
    Absent(String),
    /// The key exists under this lease.
    LeaseIs(String, LeaseId),
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(KeyValue),
    Delete { key: String, mod_revision: i64 },
}

impl WatchEvent {
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put(kv) => &kv.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }
    pub fn mod_revision(&self) -> i64 {
        match self {
            WatchEvent::Put(kv) => kv.mod_revision,
            WatchEvent::Delete { mod_revision, .. } => *mod_revision,
        }
    }
}

/// What a watch delivers: events (whole revisions, never half a transaction), or a progress
/// notification saying that everything up to `revision` has been delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchBatch {
    /// With events: the highest event revision. Without: the store's revision (progress).
    pub revision: i64,
    pub events: Vec<WatchEvent>,
}

/// The smallest key greater than every key starting with `prefix` (etcd's range end).
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A registry store: etcd or embedded. Cheap to clone.
#[derive(Clone)]
pub enum Backend {
    Etcd(EtcdBackend),
    Embedded(EmbeddedRegistry),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Backend {
    /// Where this backend is, for logs and errors.
    pub fn describe(&self) -> String {
        match self {
            Backend::Etcd(e) => format!("etcd at {}", e.endpoints()),
            Backend::Embedded(_) => "the embedded registry".to_string(),
        }
    }

    /// Every key under `prefix`, read at one revision (paginated for etcd). Returns that revision.
    pub async fn get_prefix(&self, prefix: &str) -> Result<(i64, Vec<KeyValue>), RegistryError> {
        match self {
            Backend::Etcd(e) => e.get_prefix(prefix).await,
            Backend::Embedded(e) => e.get_prefix(prefix),
        }
    }

    /// One key, if it exists (a read of exactly that key: what a role that may read only this
    /// key is allowed).
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, RegistryError> {
        match self {
            Backend::Etcd(e) => e.get(key).await,
            Backend::Embedded(e) => Ok(e.get_prefix(key)?.1.into_iter().find(|kv| kv.key == key)),
        }
    }

    /// Apply `ops` atomically in one transaction if `condition` holds; `Ok(None)` when it does
    /// not (nothing written).
    pub async fn commit_if(
        &self,
        condition: Condition,
        ops: Vec<Op>,
    ) -> Result<Option<i64>, RegistryError> {
        match self {
            Backend::Etcd(e) => e.commit_if(Some(condition), ops).await,
            Backend::Embedded(e) => e.commit_if(Some(&condition), ops),
        }
    }

    /// Apply `ops` atomically in one transaction; returns the new revision.
    pub async fn commit(&self, ops: Vec<Op>) -> Result<i64, RegistryError> {
        match self {
            Backend::Etcd(e) => e.commit(ops).await,
            Backend::Embedded(e) => e.commit(ops),
        }
    }

    pub async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, RegistryError> {
        match self {
            Backend::Etcd(e) => e.grant_lease(ttl).await,
            Backend::Embedded(e) => e.grant_lease(ttl),
        }
    }

    pub async fn revoke_lease(&self, lease: LeaseId) -> Result<(), RegistryError> {
        match self {
            Backend::Etcd(e) => e.revoke_lease(lease).await,
            Backend::Embedded(e) => e.revoke_lease(lease),
        }
    }

    /// A keep-alive handle for `lease`.
    pub async fn keep_alive(&self, lease: LeaseId) -> Result<KeepAlive, RegistryError> {
        Ok(match self {
            Backend::Etcd(e) => KeepAlive::Etcd(e.keep_alive(lease).await?),
            Backend::Embedded(e) => KeepAlive::Embedded(e.keep_alive(lease)),
        })
    }

    /// Watch every key under `prefix` from `start_revision` (0: from now on).
    pub async fn watch(&self, prefix: &str, start_revision: i64) -> Result<Watch, RegistryError> {
        Ok(match self {
            Backend::Etcd(e) => Watch::Etcd(Box::new(e.watch(prefix, start_revision).await?)),
            Backend::Embedded(e) => Watch::Embedded(e.watch(prefix, start_revision)?),
        })
    }

    /// Discard history before `revision`.
    pub async fn compact(&self, revision: i64) -> Result<(), RegistryError> {
        match self {
            Backend::Etcd(e) => e.compact(revision).await,
            Backend::Embedded(e) => e.compact(revision),
        }
    }

    /// The store's current revision.
    pub async fn current_revision(&self) -> Result<i64, RegistryError> {
        match self {
            Backend::Etcd(e) => e.current_revision().await,
            Backend::Embedded(e) => e.current_revision(),
        }
    }
}

/// Keeps one lease alive.
pub enum KeepAlive {
    Etcd(EtcdKeepAlive),
    Embedded(EmbeddedKeepAlive),
}

impl KeepAlive {
    /// Refresh the lease; returns its remaining TTL, or `LeaseNotFound` when it has expired.
    pub async fn refresh(&mut self) -> Result<Duration, RegistryError> {
        match self {
            KeepAlive::Etcd(k) => k.refresh().await,
            KeepAlive::Embedded(k) => k.refresh(),
        }
    }
}

/// A prefix watch.
pub enum Watch {
    Etcd(Box<EtcdWatch>),
    Embedded(EmbeddedWatch),
}

impl Watch {
    /// The next batch. `Err(Compacted)` when the start revision is gone; other errors mean the
    /// stream broke and must be re-established from the last seen revision.
    pub async fn next(&mut self) -> Result<WatchBatch, RegistryError> {
        match self {
            Watch::Etcd(w) => w.next().await,
            Watch::Embedded(w) => w.next().await,
        }
    }
}
