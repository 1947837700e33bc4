//! The etcd backend (etcd v3 API through `etcd-client`).

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, ConnectOptions, EventType, GetOptions, LeaseKeepAliveStream, LeaseKeeper,
    PutOptions, Txn, TxnOp, WatchOptions,
};

use super::RegistryError;
use super::backend::{KeyValue, LeaseId, Op, WatchBatch, WatchEvent, prefix_end};

/// Keys per page when reading a prefix. With values of a few KiB a page stays well below the
/// 64 MiB message limit set below.
const PAGE_SIZE: i64 = 1000;
/// Largest gRPC message accepted from etcd.
const MAX_MESSAGE: usize = 256 << 20;

/// Timeouts for talking to etcd.
#[derive(Debug, Clone, Copy)]
pub struct EtcdOptions {
    /// How long to wait for a TCP connection.
    pub connect_timeout: Duration,
    /// How long one request (not a watch stream) may take.
    pub request_timeout: Duration,
    /// HTTP/2 keep-alive: a silently dead connection is noticed within interval + timeout (a
    /// killed etcd is noticed at once: its connections reset). Must not be shorter than the
    /// server's `--grpc-keepalive-min-time`.
    pub keep_alive_interval: Duration,
    pub keep_alive_timeout: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            // etcd refuses pings more often than its `--grpc-keepalive-min-time` (default 5 s)
            // with GOAWAY `too_many_pings`; stay above it.
            keep_alive_interval: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(3),
        }
    }
}

/// A connection to an etcd cluster. Cheap to clone.
#[derive(Clone)]
pub struct EtcdBackend {
    client: Arc<Client>,
    endpoints: Arc<str>,
}

impl EtcdBackend {
    /// Set up a client for `endpoints` (`http://host:port`). The connection is made lazily;
    /// use [`EtcdBackend::check`] to find out at once whether etcd answers.
    pub async fn connect(
        endpoints: &[String],
        options: EtcdOptions,
    ) -> Result<Self, RegistryError> {
        let joined = endpoints.join(",");
        if endpoints.is_empty() {
            return Err(RegistryError::InvalidEndpoint {
                endpoint: String::new(),
                reason: "no etcd endpoint given".into(),
            });
        }
        for e in endpoints {
            let rest = e
                .strip_prefix("http://")
                .or_else(|| e.strip_prefix("https://"))
                .unwrap_or(e);
            if rest.is_empty() || !rest.contains(':') {
                return Err(RegistryError::InvalidEndpoint {
                    endpoint: e.clone(),
                    reason: "expected http://HOST:PORT".into(),
                });
            }
        }
        let opts = ConnectOptions::new()
            .with_connect_timeout(options.connect_timeout)
            .with_timeout(options.request_timeout)
            .with_keep_alive(options.keep_alive_interval, options.keep_alive_timeout)
            .with_keep_alive_while_idle(true)
            // A member cut off from the leader must not keep serving a silent, stale watch.
            .with_require_leader(true);
        let client = Client::connect(endpoints, Some(opts))
            .await
            .map_err(|e| RegistryError::unavailable(&joined, e))?;
        Ok(Self {
            client: Arc::new(client),
            endpoints: Arc::from(joined),
        })
    }

    /// Connect and check that etcd answers.
    pub async fn connect_checked(
        endpoints: &[String],
        options: EtcdOptions,
    ) -> Result<Self, RegistryError> {
        let backend = Self::connect(endpoints, options).await?;
        backend.current_revision().await?;
        Ok(backend)
    }

    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    fn err(&self, e: etcd_client::Error) -> RegistryError {
        RegistryError::from_etcd(&self.endpoints, e)
    }

    pub async fn current_revision(&self) -> Result<i64, RegistryError> {
        let mut kv = self.client.kv_client();
        let resp = kv
            .get("/strait/", Some(GetOptions::new().with_count_only()))
            .await
            .map_err(|e| self.err(e))?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }

    pub async fn get_prefix(&self, prefix: &str) -> Result<(i64, Vec<KeyValue>), RegistryError> {
        let mut kv = self
            .client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE);
        let end = prefix_end(prefix);
        let mut start: Vec<u8> = prefix.as_bytes().to_vec();
        let mut revision = 0i64;
        let mut out = Vec::new();
        loop {
            let mut opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(PAGE_SIZE);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let mut resp = kv
                .get(start.clone(), Some(opts))
                .await
                .map_err(|e| self.err(e))?;
            if revision == 0 {
                revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            }
            let more = resp.more();
            let kvs = resp.take_kvs();
            let Some(last) = kvs.last().map(|k| k.key().to_vec()) else {
                break;
            };
            for k in kvs {
                let mod_revision = k.mod_revision();
                let lease = k.lease();
                let (key, value) = k.into_key_value();
                let key = String::from_utf8(key).map_err(|e| RegistryError::Decode {
                    key: String::from_utf8_lossy(e.as_bytes()).into_owned(),
                    message: "key is not UTF-8".into(),
                })?;
                out.push(KeyValue {
                    key,
                    value,
                    mod_revision,
                    lease,
                });
            }
            if !more {
                break;
            }
            start = last;
            start.push(0);
        }
        Ok((revision, out))
    }

    pub async fn commit(&self, ops: Vec<Op>) -> Result<i64, RegistryError> {
        let mut kv = self.client.kv_client();
        let txn_ops: Vec<TxnOp> = ops
            .into_iter()
            .map(|op| match op {
                Op::Put { key, value, lease } => {
                    let opts = lease.map(|l| PutOptions::new().with_lease(l));
                    TxnOp::put(key, value, opts)
                }
                Op::Delete { key } => TxnOp::delete(key, None),
            })
            .collect();
        // An unconditional transaction: `when` is empty, so `and_then` always runs.
        let txn = Txn::new().when(Vec::<Compare>::new()).and_then(txn_ops);
        let resp = kv.txn(txn).await.map_err(|e| self.err(e))?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }

    pub async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, RegistryError> {
        let mut lease = self.client.lease_client();
        let secs = ttl.as_secs().max(1) as i64;
        let resp = lease.grant(secs, None).await.map_err(|e| self.err(e))?;
        if !resp.error().is_empty() {
            return Err(RegistryError::Rejected(resp.error().to_string()));
        }
        Ok(resp.id())
    }

    pub async fn revoke_lease(&self, id: LeaseId) -> Result<(), RegistryError> {
        let mut lease = self.client.lease_client();
        match lease.revoke(id).await {
            Ok(_) => Ok(()),
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("lease not found") => {
                Err(RegistryError::LeaseNotFound(id))
            }
            Err(e) => Err(self.err(e)),
        }
    }

    pub async fn keep_alive(&self, id: LeaseId) -> Result<EtcdKeepAlive, RegistryError> {
        Ok(EtcdKeepAlive {
            backend: self.clone(),
            id,
            stream: None,
        })
    }

    pub async fn watch(
        &self,
        prefix: &str,
        start_revision: i64,
    ) -> Result<EtcdWatch, RegistryError> {
        let mut watch = self
            .client
            .watch_client()
            .max_decoding_message_size(MAX_MESSAGE);
        let mut opts = WatchOptions::new().with_prefix().with_progress_notify();
        if start_revision > 0 {
            opts = opts.with_start_revision(start_revision);
        }
        let stream = watch
            .watch(prefix, Some(opts))
            .await
            .map_err(|e| self.err(e))?;
        Ok(EtcdWatch {
            stream,
            endpoints: self.endpoints.clone(),
            requested: start_revision,
        })
    }

    pub async fn compact(&self, revision: i64) -> Result<(), RegistryError> {
        let mut kv = self.client.kv_client();
        kv.compact(revision, None).await.map_err(|e| self.err(e))?;
        Ok(())
    }
}

/// Keeps an etcd lease alive over one keep-alive stream, re-opened when it breaks.
pub struct EtcdKeepAlive {
    backend: EtcdBackend,
    id: LeaseId,
    stream: Option<Box<(LeaseKeeper, LeaseKeepAliveStream)>>,
}

impl EtcdKeepAlive {
    pub async fn refresh(&mut self) -> Result<Duration, RegistryError> {
        let result = self.refresh_once().await;
        if result.is_err() {
            // Re-open the stream next time.
            self.stream = None;
        }
        result
    }

    async fn refresh_once(&mut self) -> Result<Duration, RegistryError> {
        if self.stream.is_none() {
            let mut lease = self.backend.client.lease_client();
            let s = lease
                .keep_alive(self.id)
                .await
                .map_err(|e| self.backend.err(e))?;
            self.stream = Some(Box::new(s));
        }
        let Some((keeper, stream)) = self.stream.as_deref_mut() else {
            return Err(RegistryError::Rejected("keep-alive stream missing".into()));
        };
        keeper.keep_alive().await.map_err(|e| self.backend.err(e))?;
        let timeout = Duration::from_secs(5);
        let msg = tokio::time::timeout(timeout, stream.message())
            .await
            .map_err(|_| RegistryError::Unavailable {
                endpoints: self.backend.endpoints.to_string(),
                message: "no keep-alive answer within 5s".into(),
            })?
            .map_err(|e| self.backend.err(e))?;
        match msg {
            Some(resp) if resp.ttl() > 0 => Ok(Duration::from_secs(resp.ttl() as u64)),
            Some(_) => Err(RegistryError::LeaseNotFound(self.id)),
            None => Err(RegistryError::Unavailable {
                endpoints: self.backend.endpoints.to_string(),
                message: "keep-alive stream closed".into(),
            }),
        }
    }
}

/// A prefix watch on etcd.
pub struct EtcdWatch {
    stream: etcd_client::WatchStream,
    endpoints: Arc<str>,
    requested: i64,
}

impl EtcdWatch {
    pub async fn next(&mut self) -> Result<WatchBatch, RegistryError> {
        loop {
            let msg = self
                .stream
                .message()
                .await
                .map_err(|e| RegistryError::from_etcd(&self.endpoints, e))?;
            let Some(resp) = msg else {
                return Err(RegistryError::Unavailable {
                    endpoints: self.endpoints.to_string(),
                    message: "etcd closed the watch stream".into(),
                });
            };
            if resp.canceled() {
                if resp.compact_revision() > 0 {
                    return Err(RegistryError::Compacted {
                        requested: self.requested,
                        compact_revision: resp.compact_revision(),
                    });
                }
                return Err(RegistryError::Unavailable {
                    endpoints: self.endpoints.to_string(),
                    message: format!("etcd canceled the watch: {}", resp.cancel_reason()),
                });
            }
            if resp.created() && resp.events().is_empty() {
                continue;
            }
            let header_revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            let mut events = Vec::with_capacity(resp.events().len());
            // The revision this response brings us to counts every event, even ones skipped
            // below; the header revision only stands in for a response without events.
            let mut revision = resp
                .events()
                .iter()
                .filter_map(|e| e.kv().map(|kv| kv.mod_revision()))
                .max()
                .unwrap_or(0);
            let had_events = !resp.events().is_empty();
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let key = match kv.key_str() {
                    Ok(k) => k.to_string(),
                    Err(_) => {
                        tracing::warn!("skipping a registry event whose key is not UTF-8");
                        continue;
                    }
                };
                match ev.event_type() {
                    EventType::Put => events.push(WatchEvent::Put(KeyValue {
                        key,
                        value: kv.value().to_vec(),
                        mod_revision: kv.mod_revision(),
                        lease: kv.lease(),
                    })),
                    EventType::Delete => events.push(WatchEvent::Delete {
                        key,
                        mod_revision: kv.mod_revision(),
                    }),
                }
            }
            if !had_events {
                revision = header_revision;
            }
            return Ok(WatchBatch { revision, events });
        }
    }
}
