//! The global endpoint registry: clusters, their services' endpoints under each cluster's lease,
//! failover policies and link states, stored in etcd (or the embedded store) under
//! `/strait/v1/`, with a local cache that gives consumers a consistent snapshot and a stream of
//! changes. The key layout and encoding are documented in `docs/registry.md`.

pub mod backend;
pub mod cache;
pub mod codec;
pub mod connection;
pub mod embedded;
pub mod etcd;
pub mod publisher;
pub mod retention;
pub mod roles;

pub use backend::{
    Backend, Condition, KeepAlive, KeyValue, LeaseId, Op, Watch, WatchBatch, WatchEvent,
};
pub use cache::{CacheStatus, Change, RegistryCache, Snapshot, Update};
pub use codec::{Decoder, ROOT, RegistryKey, RegistryValue};
pub use connection::{EtcdAuth, EtcdConnection, EtcdTls, RegistryConfig};
pub use embedded::EmbeddedRegistry;
pub use etcd::{EtcdBackend, EtcdOptions, MemberStatus};
pub use publisher::{LeasedPublisher, PublisherConfig, PublisherStatus};

/// How the cache and the publisher retry a store they cannot reach: from 100 ms, doubling, up
/// to 2 s (jittered down to half). The cap bounds how long a cluster whose lease expired while
/// etcd was out of reach stays unpublished once etcd is back (what traffic returning to it
/// waits for); an attempt every 1–2 s per process costs an unreachable etcd nothing.
pub(crate) fn store_backoff() -> crate::backoff::Backoff {
    crate::backoff::Backoff::new(
        std::time::Duration::from_millis(100),
        std::time::Duration::from_secs(2),
    )
}

/// What can go wrong talking to the registry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("{endpoints} is unreachable: {message}")]
    Unavailable { endpoints: String, message: String },
    #[error("revision {requested} has been compacted (the oldest available is {compact_revision})")]
    Compacted {
        requested: i64,
        compact_revision: i64,
    },
    #[error("lease {0:x} has expired or was revoked")]
    LeaseNotFound(LeaseId),
    #[error("the registry refused the request: {0}")]
    Rejected(String),
    #[error("{key}: cannot decode the stored value: {message}")]
    Decode { key: String, message: String },
    #[error("invalid etcd endpoint `{endpoint}`: {reason}")]
    InvalidEndpoint { endpoint: String, reason: String },
    /// etcd's roles do not let this identity do this (`strait registry roles apply`).
    #[error("etcd at {endpoints} refused to let {identity} {what}: permission denied")]
    PermissionDenied {
        endpoints: String,
        identity: String,
        what: String,
    },
    /// etcd did not accept the credentials, or wants some.
    #[error("etcd at {endpoints} did not accept {identity}: {message}")]
    Authentication {
        endpoints: String,
        identity: String,
        message: String,
    },
    /// The connection's settings cannot be used (a file missing or unreadable, an expired
    /// client certificate).
    #[error("{message}")]
    Config { message: String },
}

impl RegistryError {
    pub(crate) fn unavailable(endpoints: &str, e: impl std::fmt::Display) -> Self {
        RegistryError::Unavailable {
            endpoints: format!("etcd at {endpoints}"),
            message: e.to_string(),
        }
    }

    pub(crate) fn from_etcd(endpoints: &str, e: etcd_client::Error) -> Self {
        use etcd_client::Error as E;
        match e {
            E::GRpcStatus(s) => {
                let msg = s.message().to_string();
                let msg = msg.strip_prefix("etcdserver: ").unwrap_or(&msg).to_string();
                if msg.contains("permission denied") || s.code() == tonic::Code::PermissionDenied {
                    // Callers that know the operation and the identity fill them in.
                    RegistryError::PermissionDenied {
                        endpoints: endpoints.to_string(),
                        identity: String::new(),
                        what: String::new(),
                    }
                } else if msg.contains("authentication failed")
                    || msg.contains("user name is empty")
                    || msg.contains("invalid auth token")
                    || msg.contains("authentication is not enabled")
                    || s.code() == tonic::Code::Unauthenticated
                {
                    let message = if msg.contains("user name is empty") {
                        "etcd requires authentication: give a user and password file, or a client certificate whose common name is an etcd user".to_string()
                    } else {
                        msg
                    };
                    RegistryError::Authentication {
                        endpoints: endpoints.to_string(),
                        identity: String::new(),
                        message,
                    }
                } else if msg.contains("lease not found") {
                    // The id is not in the message in a parseable way; callers that know the
                    // lease map this to LeaseNotFound themselves.
                    RegistryError::LeaseNotFound(0)
                } else if msg.contains("required revision has been compacted") {
                    RegistryError::Compacted {
                        requested: 0,
                        compact_revision: 0,
                    }
                } else if matches!(
                    s.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Cancelled
                        | tonic::Code::Unknown
                ) {
                    let mut text = msg.clone();
                    let mut source = std::error::Error::source(&s);
                    while let Some(e) = source {
                        let t = e.to_string();
                        if !text.contains(&t) {
                            text.push_str(": ");
                            text.push_str(&t);
                        }
                        source = e.source();
                    }
                    RegistryError::unavailable(endpoints, format!("{text} ({:?})", s.code()))
                } else {
                    RegistryError::Rejected(format!("{msg} ({:?})", s.code()))
                }
            }
            E::LeaseKeepAliveError(m) if m.contains("lease not found") => {
                RegistryError::LeaseNotFound(0)
            }
            other => RegistryError::unavailable(endpoints, describe_transport(&other)),
        }
    }

    /// Whether retrying later may help (the store is away), as opposed to a request it refused.
    pub fn is_transient(&self) -> bool {
        matches!(self, RegistryError::Unavailable { .. })
    }
}

/// An etcd transport error with its causes, on one line.
fn describe_transport(e: &etcd_client::Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        source = s.source();
    }
    out
}
