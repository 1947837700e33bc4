//! The etcd backend (etcd v3 API through `etcd-client`), over plaintext or TLS, with password or
//! client-certificate authentication.
//!
//! The client is made on first use and made again when it must be: when one of its files (CA,
//! client certificate and key, password file) changes, so that rotated certificates and passwords
//! are used by every new connection without a restart; and after a request failed because etcd
//! was unreachable, so that a member that was down when the client was made is tried again. A
//! component therefore starts, and keeps its last good state, while etcd or its credentials are
//! not there yet: every operation reports what went wrong, and the cache and the publishers retry
//! with back-off.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use etcd_client::{
    Client, Compare, ConnectOptions, EventType, GetOptions, LeaseKeepAliveStream, LeaseKeeper,
    PutOptions, Txn, TxnOp, WatchOptions,
};

use super::RegistryError;
use super::backend::{KeyValue, LeaseId, Op, WatchBatch, WatchEvent, prefix_end};
use super::connection::{EtcdConnection, Scheme};

/// Keys per page when reading a prefix. With values of a few KiB a page stays well below the
/// 64 MiB message limit set below.
const PAGE_SIZE: i64 = 1000;
/// Largest gRPC message accepted from etcd.
const MAX_MESSAGE: usize = 256 << 20;
/// How often the connection's files are checked for changes (at most; only when in use).
const FILE_CHECK: Duration = Duration::from_secs(1);

/// Timeouts for talking to etcd.
#[derive(Debug, Clone, Copy)]
pub struct EtcdOptions {
    /// How long to wait for a TCP connection.
    pub connect_timeout: Duration,
    /// How long one request (not a watch stream) may take.
    pub request_timeout: Duration,
    /// How long a write (a transaction, plus 1 ms per KiB it carries; a lease grant, revocation
    /// or keep-alive) may wait for etcd's answer before it is abandoned and retried elsewhere.
    /// A proposal caught in a leader change is not answered until its deadline: this bounds how
    /// long losing the leader stalls a publisher.
    pub write_timeout: Duration,
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
            write_timeout: Duration::from_secs(1),
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
    inner: Arc<Inner>,
}

struct Inner {
    conn: EtcdConnection,
    scheme: Scheme,
    endpoints: Arc<str>,
    options: EtcdOptions,
    state: tokio::sync::Mutex<ClientState>,
    /// Set when a request found etcd unreachable (or missing our credentials): the next request
    /// makes a new client.
    stale: AtomicBool,
    /// The endpoint the current client talks to.
    member: std::sync::atomic::AtomicUsize,
    /// Whether the current client authenticates with the password (false: etcd has
    /// authentication disabled, or there is no password).
    with_password: AtomicBool,
    /// Who we are to etcd, for messages (`user strait-cluster-east`).
    identity: std::sync::RwLock<String>,
}

#[derive(Default)]
struct ClientState {
    client: Option<Client>,
    /// The endpoint the client talks to (an index into the endpoints). A client talks to one
    /// member at a time and moves to the next one when that one fails it.
    member: usize,
    /// The files as they were when the client was made.
    stamp: Vec<Option<FileStamp>>,
    checked: Option<Instant>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        modified: m.modified().ok(),
        len: m.len(),
        inode: m.ino(),
    })
}

/// Status of one etcd member, as `strait registry status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MemberStatus {
    pub name: String,
    pub id: String,
    pub client_urls: Vec<String>,
    /// The URL the status was read through (one of the configured endpoints).
    pub reached_at: Option<String>,
    pub leader: bool,
    pub revision: i64,
    pub raft_term: u64,
    pub raft_index: u64,
    pub db_size: i64,
    pub version: String,
    /// Why this member could not be asked, or the alarms it reports.
    pub error: Option<String>,
}

impl EtcdBackend {
    /// Plaintext endpoints without credentials (tests, the lab on loopback).
    pub async fn connect(
        endpoints: &[String],
        options: EtcdOptions,
    ) -> Result<Self, RegistryError> {
        Self::open(EtcdConnection::plain(endpoints.iter().cloned()), options)
    }

    /// Set up a client for `conn` after checking its settings. Nothing is read or dialled yet:
    /// the first request makes the connection (see the module's documentation); use
    /// [`EtcdBackend::check`] to find out at once whether etcd answers.
    pub fn open(conn: EtcdConnection, options: EtcdOptions) -> Result<Self, RegistryError> {
        let scheme = conn
            .validate()
            .map_err(|e| RegistryError::InvalidEndpoint {
                endpoint: conn.shown(),
                reason: format!("{}: {}", e.field.flag(), e.reason),
            })?;
        let identity = describe_identity(&conn);
        let first = rand::random_range(0..conn.endpoints.len().max(1));
        Ok(Self {
            inner: Arc::new(Inner {
                endpoints: Arc::from(conn.shown()),
                conn,
                scheme,
                options,
                // Components start on different members, so that load spreads.
                state: tokio::sync::Mutex::new(ClientState {
                    member: first,
                    ..ClientState::default()
                }),
                stale: AtomicBool::new(false),
                member: std::sync::atomic::AtomicUsize::new(first),
                with_password: AtomicBool::new(false),
                identity: std::sync::RwLock::new(identity),
            }),
        })
    }

    /// Connect and check that etcd answers (and accepts the credentials).
    pub async fn connect_checked(
        endpoints: &[String],
        options: EtcdOptions,
    ) -> Result<Self, RegistryError> {
        let backend = Self::connect(endpoints, options).await?;
        backend.check().await?;
        Ok(backend)
    }

    /// Whether etcd answers a read of the registry with these settings.
    pub async fn check(&self) -> Result<(), RegistryError> {
        self.current_revision().await.map(|_| ())
    }

    pub fn endpoints(&self) -> &str {
        &self.inner.endpoints
    }

    /// The connection's settings.
    pub fn connection(&self) -> &EtcdConnection {
        &self.inner.conn
    }

    /// Who this client is to etcd (`user strait-cluster-east`, `client certificate CN …`).
    pub fn identity(&self) -> String {
        self.inner
            .identity
            .read()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// The current client: made on first use, again when a file changed or a request found etcd
    /// unreachable.
    async fn client(&self) -> Result<Client, RegistryError> {
        let mut st = self.inner.state.lock().await;
        let stale = self.inner.stale.swap(false, Ordering::AcqRel);
        if let Some(c) = st.client.clone()
            && !stale
        {
            if st.checked.is_some_and(|t| t.elapsed() < FILE_CHECK) {
                return Ok(c);
            }
            let now: Vec<_> = self.inner.conn.files().into_iter().map(stamp).collect();
            st.checked = Some(Instant::now());
            if now == st.stamp {
                return Ok(c);
            }
            tracing::info!(etcd = %self.inner.endpoints,
                "the etcd client's certificate, key, CA or password file changed; reconnecting with them");
        }
        if stale {
            // The member failed us: ask the next one.
            st.member = (st.member + 1) % self.inner.conn.endpoints.len().max(1);
            tracing::debug!(etcd = %self.inner.endpoints, member = st.member, "moving to another etcd member");
        }
        let stamp_before: Vec<_> = self.inner.conn.files().into_iter().map(stamp).collect();
        self.inner.member.store(st.member, Ordering::Release);
        let (client, with_password) = self.make_client(st.member).await?;
        st.client = Some(client.clone());
        st.stamp = stamp_before;
        st.checked = Some(Instant::now());
        self.inner
            .with_password
            .store(with_password, Ordering::Release);
        Ok(client)
    }

    /// Read the files and make a client of the `member`th endpoint. With a password, this
    /// authenticates at once.
    async fn make_client(&self, member: usize) -> Result<(Client, bool), RegistryError> {
        let conn = &self.inner.conn;
        let o = &self.inner.options;
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(o.connect_timeout)
            .with_timeout(o.request_timeout)
            .with_keep_alive(o.keep_alive_interval, o.keep_alive_timeout)
            .with_keep_alive_while_idle(true)
            // A member cut off from the leader must not keep serving a silent, stale watch.
            .with_require_leader(true)
            // etcd's simple tokens expire (`--auth-token-ttl`) and die with a restart: requests
            // that meet an invalid token authenticate again and are retried once.
            .with_auto_token_refresh(true);
        let mut cn = None;
        if self.inner.scheme == Scheme::Https {
            let tls = conn.tls.clone().unwrap_or_default();
            let mut config = etcd_client::TlsOptions::new();
            if let Some(ca) = &tls.ca {
                let pem = read_file(ca, "the etcd CA")?;
                crate::identity::load_certs(ca).map_err(config_error)?;
                config = config.ca_certificate(etcd_client::Certificate::from_pem(pem));
            }
            if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
                let cert_pem = read_file(cert, "the etcd client certificate")?;
                let key_pem = read_file(key, "the etcd client key")?;
                let chain = crate::identity::load_certs(cert).map_err(config_error)?;
                crate::identity::load_private_key(key).map_err(config_error)?;
                if let Some(leaf) = chain.first() {
                    let info = leaf_info(leaf.as_ref()).map_err(|m| RegistryError::Config {
                        message: format!("{}: {m}", cert.display()),
                    })?;
                    if let Some(expired) = info.expired {
                        return Err(RegistryError::Config {
                            message: format!(
                                "the client certificate {} expired at {expired}; renew it",
                                cert.display()
                            ),
                        });
                    }
                    cn = info.common_name;
                }
                config = config.identity(etcd_client::Identity::from_pem(cert_pem, key_pem));
            }
            opts = opts.with_tls(config);
        }
        let password = match &conn.auth {
            Some(a) => Some((a.user.clone(), read_password(&a.password_file)?)),
            None => None,
        };
        self.set_identity(match (&conn.auth, &cn) {
            (Some(a), _) => format!("user `{}`", a.user),
            (None, Some(cn)) => format!("client certificate CN `{cn}`"),
            (None, None) => "no credentials".to_string(),
        });
        let endpoints = &conn.endpoints[member.min(conn.endpoints.len().saturating_sub(1))..][..1];
        match password {
            None => {
                let c = Client::connect(endpoints, Some(opts))
                    .await
                    .map_err(|e| self.err(e, "connect"))?;
                Ok((c, false))
            }
            Some((user, pw)) => {
                let with_user = opts.clone().with_user(user.clone(), pw);
                match Client::connect(endpoints, Some(with_user)).await {
                    Ok(c) => Ok((c, true)),
                    Err(etcd_client::Error::GRpcStatus(s))
                        if s.message().contains("authentication is not enabled") =>
                    {
                        tracing::warn!(etcd = %self.inner.endpoints, user = %user,
                            "etcd has authentication disabled: the password is not used, and anyone who reaches etcd can write the registry (see `strait registry roles apply --enable-auth`)");
                        let c = Client::connect(endpoints, Some(opts))
                            .await
                            .map_err(|e| self.err(e, "connect"))?;
                        Ok((c, false))
                    }
                    Err(e) => Err(self.err(e, "authenticate")),
                }
            }
        }
    }

    fn set_identity(&self, id: String) {
        if let Ok(mut w) = self.inner.identity.write() {
            *w = id;
        }
    }

    /// Map an etcd error of the operation `what` (e.g. `write /strait/v1/clusters/east`), and
    /// remember to make a new client when etcd was unreachable.
    fn err(&self, e: etcd_client::Error, what: &str) -> RegistryError {
        let mapped = RegistryError::from_etcd(&self.inner.endpoints, e);
        let mapped = match mapped {
            RegistryError::PermissionDenied { .. } => RegistryError::PermissionDenied {
                endpoints: self.inner.endpoints.to_string(),
                identity: self.identity(),
                what: what.to_string(),
            },
            RegistryError::Authentication { message, .. } => RegistryError::Authentication {
                endpoints: self.inner.endpoints.to_string(),
                identity: self.identity(),
                message,
            },
            RegistryError::Unavailable { endpoints, message } => RegistryError::Unavailable {
                endpoints: self.member_shown().unwrap_or(endpoints),
                message: self.hint(message),
            },
            other => other,
        };
        match &mapped {
            RegistryError::Unavailable { .. } => self.inner.stale.store(true, Ordering::Release),
            // etcd turned authentication on after we connected without a token: authenticate.
            RegistryError::PermissionDenied { .. }
                if self.inner.conn.auth.is_some() && !self.uses_password() =>
            {
                self.inner.stale.store(true, Ordering::Release)
            }
            _ => {}
        }
        mapped
    }

    /// With several endpoints, the one that failed (`etcd at URL (member 2 of 3)`).
    fn member_shown(&self) -> Option<String> {
        let n = self.inner.conn.endpoints.len();
        if n < 2 {
            return None;
        }
        let i = self.inner.member.load(Ordering::Acquire).min(n - 1);
        Some(format!(
            "etcd at {} (member {} of {n})",
            self.inner.conn.endpoints[i],
            i + 1
        ))
    }

    fn uses_password(&self) -> bool {
        self.inner.with_password.load(Ordering::Acquire)
    }

    /// Add what the transport error most likely means for this connection.
    fn hint(&self, message: String) -> String {
        let ca = self
            .inner
            .conn
            .tls
            .as_ref()
            .and_then(|t| t.ca.as_ref())
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let cert = self
            .inner
            .conn
            .tls
            .as_ref()
            .and_then(|t| t.cert.as_ref())
            .map(|p| p.display().to_string());
        let lower = message.to_ascii_lowercase();
        let hint = if lower.contains("unknownissuer") || lower.contains("unknown issuer") {
            Some(format!(
                "etcd's certificate is not signed by the CA in {ca}"
            ))
        } else if lower.contains("notvalidforname") || lower.contains("not valid for name") {
            Some("etcd's certificate does not name the host of the endpoint".to_string())
        } else if lower.contains("certificate")
            && lower.contains("expired")
            && !lower.contains("alert")
        {
            Some("etcd's certificate has expired".to_string())
        } else if lower.contains("alert")
            && (lower.contains("certificate") || lower.contains("handshake"))
        {
            Some(match &cert {
                Some(c) => format!("etcd refused the client certificate {c}"),
                None => "etcd asks for a client certificate: give one (--etcd-cert/--etcd-key, registry.tls.cert/key)".to_string(),
            })
        } else if self.inner.scheme == Scheme::Https
            && cert.is_none()
            && (lower.contains("connection closed")
                || lower.contains("broken pipe")
                || lower.contains("connection reset")
                || lower.contains("unexpected end of file")
                || lower.contains("certificaterequired")
                || lower.contains("certificate required"))
        {
            Some("etcd closed the connection during or after the TLS handshake: if it requires client certificates (--client-cert-auth), give one (--etcd-cert/--etcd-key, registry.tls.cert/key)".to_string())
        } else if self.inner.scheme == Scheme::Http
            && (lower.contains("frame with invalid size")
                || lower.contains("invalid http/2 preface")
                || lower.contains("protocol error")
                || lower.contains("h2 protocol"))
        {
            Some("etcd does not speak plaintext HTTP/2 here: if it serves TLS, use https:// and give its CA".to_string())
        } else if self.inner.scheme == Scheme::Http
            && (lower.contains("connection reset")
                || lower.contains("connection closed")
                || lower.contains("broken pipe")
                || lower.contains("unexpected end of file"))
        {
            Some("etcd closed the connection: it stopped, or it serves TLS (then use https:// and give its CA)".to_string())
        } else if self.inner.scheme == Scheme::Https
            && (lower.contains("invalidcontenttype")
                || lower.contains("corrupt message")
                || lower.contains("invalid content type"))
        {
            Some("etcd does not speak TLS on this port: use http://".to_string())
        } else {
            None
        };
        match hint {
            Some(h) => format!("{h} ({message})"),
            None => message,
        }
    }

    pub async fn current_revision(&self) -> Result<i64, RegistryError> {
        let mut kv = self.client().await?.kv_client();
        // The registry's root itself: a key every registry role may read.
        let resp = kv
            .get(super::ROOT, Some(GetOptions::new().with_count_only()))
            .await
            .map_err(|e| self.err(e, &format!("read {}", super::ROOT)))?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }

    /// One key, if it exists.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, RegistryError> {
        let mut kv = self.client().await?.kv_client();
        let mut resp = kv
            .get(key, None)
            .await
            .map_err(|e| self.err(e, &format!("read {key}")))?;
        let Some(k) = resp.take_kvs().into_iter().next() else {
            return Ok(None);
        };
        let mod_revision = k.mod_revision();
        let lease = k.lease();
        let (_, value) = k.into_key_value();
        Ok(Some(KeyValue {
            key: key.to_string(),
            value,
            mod_revision,
            lease,
        }))
    }

    pub async fn get_prefix(&self, prefix: &str) -> Result<(i64, Vec<KeyValue>), RegistryError> {
        let mut kv = self
            .client()
            .await?
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
                .map_err(|e| self.err(e, &format!("read {prefix}…")))?;
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
        self.commit_if(None, ops)
            .await
            .map(|r| r.unwrap_or_default())
    }

    /// [`EtcdBackend::commit`] only if `condition` holds (`Ok(None)` when it does not).
    pub async fn commit_if(
        &self,
        condition: Option<super::backend::Condition>,
        ops: Vec<Op>,
    ) -> Result<Option<i64>, RegistryError> {
        use super::backend::Condition;
        use etcd_client::CompareOp;
        let what = describe_ops(&ops);
        let bytes: usize = ops.iter().map(Op::wire_size).sum();
        let deadline =
            self.inner.options.write_timeout + Duration::from_millis((bytes / 1024) as u64);
        let mut kv = self.client().await?.kv_client();
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
        // Without a condition `when` is empty, so `and_then` always runs.
        let when: Vec<Compare> = match condition {
            None => Vec::new(),
            Some(Condition::Absent(k)) => vec![Compare::create_revision(k, CompareOp::Equal, 0)],
            Some(Condition::LeaseIs(k, l)) => vec![Compare::lease(k, CompareOp::Equal, l)],
        };
        let txn = Txn::new().when(when).and_then(txn_ops);
        let resp = self
            .bounded(deadline, &what, kv.txn(txn))
            .await?
            .map_err(|e| self.err(e, &what))?;
        if !resp.succeeded() {
            return Ok(None);
        }
        Ok(Some(resp.header().map(|h| h.revision()).unwrap_or(0)))
    }

    pub async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, RegistryError> {
        let mut lease = self.client().await?.lease_client();
        let secs = ttl.as_secs().max(1) as i64;
        let resp = self
            .bounded(
                self.inner.options.write_timeout,
                "grant a lease",
                lease.grant(secs, None),
            )
            .await?
            .map_err(|e| self.err(e, "grant a lease"))?;
        if !resp.error().is_empty() {
            return Err(RegistryError::Rejected(resp.error().to_string()));
        }
        Ok(resp.id())
    }

    pub async fn revoke_lease(&self, id: LeaseId) -> Result<(), RegistryError> {
        let mut lease = self.client().await?.lease_client();
        let what = format!("revoke lease {id:x}");
        match self
            .bounded(self.inner.options.write_timeout, &what, lease.revoke(id))
            .await?
        {
            Ok(_) => Ok(()),
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("lease not found") => {
                Err(RegistryError::LeaseNotFound(id))
            }
            Err(e) => Err(self.err(e, &what)),
        }
    }

    /// `fut`, abandoned after `limit` (etcd unreachable: the next request makes a new client).
    async fn bounded<T>(
        &self,
        limit: Duration,
        what: &str,
        fut: impl std::future::Future<Output = T>,
    ) -> Result<T, RegistryError> {
        match tokio::time::timeout(limit, fut).await {
            Ok(r) => Ok(r),
            Err(_) => {
                self.inner.stale.store(true, Ordering::Release);
                Err(RegistryError::Unavailable {
                    endpoints: self
                        .member_shown()
                        .unwrap_or_else(|| format!("etcd at {}", self.inner.endpoints)),
                    message: format!("no answer within {limit:?} to `{what}`"),
                })
            }
        }
    }

    pub async fn keep_alive(&self, id: LeaseId) -> Result<EtcdKeepAlive, RegistryError> {
        Ok(EtcdKeepAlive {
            backend: self.clone(),
            id,
            stream: None,
        })
    }

    /// Watch `prefix` from `start_revision`. Returns once etcd has accepted the watch, so that a
    /// refusal (no permission to read the prefix) is an error here rather than a silent stream.
    pub async fn watch(
        &self,
        prefix: &str,
        start_revision: i64,
    ) -> Result<EtcdWatch, RegistryError> {
        let mut refreshed = false;
        loop {
            let client = self.client().await?;
            let mut watch = client.watch_client().max_decoding_message_size(MAX_MESSAGE);
            let mut opts = WatchOptions::new().with_prefix().with_progress_notify();
            if start_revision > 0 {
                opts = opts.with_start_revision(start_revision);
            }
            let what = format!("watch {prefix}…");
            let mut stream = watch
                .watch(prefix, Some(opts))
                .await
                .map_err(|e| self.err(e, &what))?;
            // The first response says whether the watch was created.
            let first = stream.message().await.map_err(|e| self.err(e, &what))?;
            let pending = match first {
                None => {
                    self.inner.stale.store(true, Ordering::Release);
                    return Err(RegistryError::Unavailable {
                        endpoints: self.inner.endpoints.to_string(),
                        message: "etcd closed the watch stream".into(),
                    });
                }
                Some(r) if r.canceled() && r.compact_revision() == 0 => {
                    let reason = r.cancel_reason().to_string();
                    if reason.contains("permission denied") {
                        // etcd checks a watch's token only when it is created, and answers an
                        // expired one with "permission denied": authenticate again, once.
                        if !refreshed && self.uses_password() {
                            refreshed = true;
                            if client.refresh_token().await.is_ok() {
                                continue;
                            }
                        }
                        return Err(RegistryError::PermissionDenied {
                            endpoints: self.inner.endpoints.to_string(),
                            identity: self.identity(),
                            what,
                        });
                    }
                    self.inner.stale.store(true, Ordering::Release);
                    return Err(RegistryError::Unavailable {
                        endpoints: self.inner.endpoints.to_string(),
                        message: format!("etcd canceled the watch: {reason}"),
                    });
                }
                Some(r) if r.created() && r.events().is_empty() && !r.canceled() => None,
                Some(r) => Some(r),
            };
            return Ok(EtcdWatch {
                stream,
                pending,
                backend: self.clone(),
                requested: start_revision,
                _client: client,
            });
        }
    }

    pub async fn compact(&self, revision: i64) -> Result<(), RegistryError> {
        let mut kv = self.client().await?.kv_client();
        kv.compact(revision, None)
            .await
            .map_err(|e| self.err(e, &format!("compact to revision {revision}")))?;
        Ok(())
    }

    /// The etcd client itself, for administration (`strait registry roles apply`).
    pub async fn raw_client(&self) -> Result<Client, RegistryError> {
        self.client().await
    }

    /// Map an error of an administrative call made on [`EtcdBackend::raw_client`].
    pub fn map_error(&self, e: etcd_client::Error, what: &str) -> RegistryError {
        self.err(e, what)
    }

    /// Every member of the etcd cluster with its status, asked through each configured endpoint
    /// (a member that cannot be reached is listed with the reason).
    pub async fn members(&self) -> Result<Vec<MemberStatus>, RegistryError> {
        let mut client = self.client().await?;
        let list = client
            .member_list()
            .await
            .map_err(|e| self.err(e, "list the members"))?;
        let mut out: Vec<MemberStatus> = list
            .members()
            .iter()
            .map(|m| MemberStatus {
                name: m.name().to_string(),
                id: format!("{:x}", m.id()),
                client_urls: m.client_urls().to_vec(),
                reached_at: None,
                leader: false,
                revision: 0,
                raft_term: 0,
                raft_index: 0,
                db_size: 0,
                version: String::new(),
                error: Some("not reached through any configured endpoint".into()),
            })
            .collect();
        let mut unreached = Vec::new();
        for endpoint in &self.inner.conn.endpoints {
            let mut one = self.inner.conn.clone();
            one.endpoints = vec![endpoint.clone()];
            let member = Self::open(one, self.inner.options)?;
            let status = async {
                let mut c = member.client().await?;
                let s = tokio::time::timeout(self.inner.options.request_timeout, c.status())
                    .await
                    .map_err(|_| RegistryError::Unavailable {
                        endpoints: endpoint.clone(),
                        message: "no answer".into(),
                    })?
                    .map_err(|e| member.err(e, "read the member's status"))?;
                Ok::<_, RegistryError>(s)
            }
            .await;
            match status {
                Ok(s) => {
                    let id = s.header().map(|h| h.member_id()).unwrap_or(0);
                    let revision = s.header().map(|h| h.revision()).unwrap_or(0);
                    let Some(row) = out.iter_mut().find(|m| m.id == format!("{id:x}")) else {
                        continue;
                    };
                    row.reached_at = Some(endpoint.clone());
                    row.leader = s.leader() == id && id != 0;
                    row.revision = revision;
                    row.raft_term = s.raft_term();
                    row.raft_index = s.raft_index();
                    row.db_size = s.db_size();
                    row.version = s.version().to_string();
                    row.error = (!s.errors().is_empty()).then(|| s.errors().join("; "));
                }
                Err(e) => unreached.push((endpoint.clone(), e)),
            }
        }
        // Members not reached: say why, when one of their URLs is a configured endpoint.
        for (endpoint, e) in unreached {
            if let Some(row) = out.iter_mut().find(|m| {
                m.reached_at.is_none() && m.client_urls.iter().any(|u| same_url(u, &endpoint))
            }) {
                row.error = Some(e.to_string());
            }
        }
        Ok(out)
    }
}

fn same_url(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

/// What a transaction writes, for messages: its first key and how many more.
fn describe_ops(ops: &[Op]) -> String {
    match ops {
        [] => "write nothing".to_string(),
        [one] => format!("write {}", one.key()),
        [first, rest @ ..] => format!("write {} (and {} more keys)", first.key(), rest.len()),
    }
}

fn config_error(e: crate::identity::IdentityError) -> RegistryError {
    RegistryError::Config {
        message: e.to_string(),
    }
}

fn read_file(path: &PathBuf, what: &str) -> Result<Vec<u8>, RegistryError> {
    std::fs::read(path).map_err(|e| RegistryError::Config {
        message: format!("cannot read {what} {}: {e}", path.display()),
    })
}

/// The password in `path`: its first line (a trailing newline is not part of it).
fn read_password(path: &PathBuf) -> Result<String, RegistryError> {
    let bytes = read_file(path, "the etcd password file")?;
    let text = String::from_utf8(bytes).map_err(|_| RegistryError::Config {
        message: format!("the etcd password file {} is not UTF-8", path.display()),
    })?;
    let pw = text.lines().next().unwrap_or("").to_string();
    if pw.is_empty() {
        return Err(RegistryError::Config {
            message: format!("the etcd password file {} is empty", path.display()),
        });
    }
    Ok(pw)
}

struct LeafInfo {
    common_name: Option<String>,
    expired: Option<String>,
}

fn leaf_info(der: &[u8]) -> Result<LeafInfo, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("not a valid certificate: {e}"))?;
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    let validity = cert.validity();
    let now = x509_parser::time::ASN1Time::now();
    let expired = (validity.not_after < now).then(|| validity.not_after.to_string());
    Ok(LeafInfo {
        common_name,
        expired,
    })
}

/// Who a connection is to etcd before it is made (refined once the certificate is read).
fn describe_identity(conn: &EtcdConnection) -> String {
    match (&conn.auth, conn.tls.as_ref().and_then(|t| t.cert.as_ref())) {
        (Some(a), _) => format!("user `{}`", a.user),
        (None, Some(c)) => format!("the client certificate {}", c.display()),
        (None, None) => "no credentials".to_string(),
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
        let what = format!("keep lease {:x} alive", self.id);
        if self.stream.is_none() {
            let mut lease = self.backend.client().await?.lease_client();
            let s = lease
                .keep_alive(self.id)
                .await
                .map_err(|e| self.backend.err(e, &what))?;
            self.stream = Some(Box::new(s));
        }
        let Some((keeper, stream)) = self.stream.as_deref_mut() else {
            return Err(RegistryError::Rejected("keep-alive stream missing".into()));
        };
        keeper
            .keep_alive()
            .await
            .map_err(|e| self.backend.err(e, &what))?;
        let limit = self.backend.inner.options.write_timeout;
        let msg = self
            .backend
            .bounded(limit, &what, stream.message())
            .await?
            .map_err(|e| self.backend.err(e, &what))?;
        match msg {
            Some(resp) if resp.ttl() > 0 => Ok(Duration::from_secs(resp.ttl() as u64)),
            Some(_) => Err(RegistryError::LeaseNotFound(self.id)),
            None => Err(RegistryError::Unavailable {
                endpoints: self.backend.endpoints().to_string(),
                message: "keep-alive stream closed".into(),
            }),
        }
    }
}

/// A prefix watch on etcd.
pub struct EtcdWatch {
    stream: etcd_client::WatchStream,
    /// A response read while the watch was being created that already carries events.
    pending: Option<etcd_client::WatchResponse>,
    backend: EtcdBackend,
    requested: i64,
    /// The client the stream runs on (kept while the stream lives).
    _client: Client,
}

impl EtcdWatch {
    pub async fn next(&mut self) -> Result<WatchBatch, RegistryError> {
        loop {
            let resp = match self.pending.take() {
                Some(r) => r,
                None => {
                    let msg = self
                        .stream
                        .message()
                        .await
                        .map_err(|e| self.backend.err(e, "watch"))?;
                    let Some(resp) = msg else {
                        self.backend.inner.stale.store(true, Ordering::Release);
                        return Err(RegistryError::Unavailable {
                            endpoints: self.backend.endpoints().to_string(),
                            message: "etcd closed the watch stream".into(),
                        });
                    };
                    resp
                }
            };
            if resp.canceled() {
                if resp.compact_revision() > 0 {
                    return Err(RegistryError::Compacted {
                        requested: self.requested,
                        compact_revision: resp.compact_revision(),
                    });
                }
                // e.g. the member lost its leader (`require_leader`): watch again elsewhere.
                self.backend.inner.stale.store(true, Ordering::Release);
                return Err(RegistryError::Unavailable {
                    endpoints: self.backend.endpoints().to_string(),
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
