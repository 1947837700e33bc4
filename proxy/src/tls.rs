//! The proxy's workload certificate: mutual TLS to the control plane, to the local gateway, to
//! other sidecars (endpoints behind them), and on its inbound listeners.
//!
//! The files are read again when they change (checked before each new connection), so a
//! rotated certificate is used from the next connection on; open connections are kept.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use std::collections::HashMap;

use federation::identity::{
    Authorizer, IdentityError, PeerVerifier, Role, SpiffeId, client_config, inspect_pem,
    load_certs, load_private_key, server_config,
};
use rustls::{ClientConfig, ServerConfig};

use crate::config::{SanMatch, UpstreamTls};

/// The workload certificate files (from `strait pki issue workload`; one shape for every
/// component).
pub use federation::identity::TlsFiles;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Identity {
        path: PathBuf,
        source: IdentityError,
    },
    #[error("{path}: {message}")]
    Certificate { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Who the peer must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// The east-west gateway of the proxy's own cluster (`spiffe://TD/cluster/C/gateway`).
    Gateway,
    /// A workload of the proxy's own cluster (the control plane).
    Workload,
}

/// A client TLS configuration built from [`TlsFiles`], rebuilt when the files change.
pub struct TlsSource {
    files: TlsFiles,
    peer: Peer,
    alpn: Vec<Vec<u8>>,
    cache: Mutex<Option<(Stamp, Arc<ClientConfig>)>>,
    server_cache: Mutex<Option<(Stamp, Arc<ServerConfig>)>>,
    upstream_cache: Mutex<HashMap<UpstreamTls, Arc<Slot<ClientConfig>>>>,
}

type Stamp = [Option<SystemTime>; 3];
/// A cached configuration and the file stamps it was built from.
type Slot<T> = Mutex<Option<(Stamp, Arc<T>)>>;

impl std::fmt::Debug for TlsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSource")
            .field("files", &self.files)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl TlsSource {
    /// Load the files now (so that a wrong file is reported at start-up) for connections to
    /// `peer`, offering `alpn`.
    pub fn new(files: TlsFiles, peer: Peer, alpn: &[&[u8]]) -> Result<Self, TlsError> {
        let source = Self {
            files,
            peer,
            alpn: alpn.iter().map(|a| a.to_vec()).collect(),
            cache: Mutex::new(None),
            server_cache: Mutex::new(None),
            upstream_cache: Mutex::new(HashMap::new()),
        };
        source.config()?;
        Ok(source)
    }

    /// The proxy's own identity, read from its certificate.
    pub fn identity(&self) -> Result<SpiffeId, TlsError> {
        identity_of(&self.files.cert)
    }

    /// The configuration for a new connection: the cached one, or a fresh one if a file
    /// changed. A file that became unreadable or invalid is reported, and the last good
    /// configuration is used meanwhile.
    pub fn config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        self.cached(&self.cache, || self.build())
    }

    /// A client configuration for an endpoint behind another sidecar: this workload
    /// certificate, the federation CA, a workload peer whose SPIFFE id matches `u`'s SAN rules,
    /// `u`'s ALPN. Cached per `u`, rebuilt when the files change.
    pub fn upstream_config(&self, u: &UpstreamTls) -> Result<Arc<ClientConfig>, TlsError> {
        let slot = {
            let mut all = self
                .upstream_cache
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            all.entry(u.clone()).or_default().clone()
        };
        self.cached(&slot, || self.build_upstream(u))
    }

    fn build_upstream(&self, u: &UpstreamTls) -> Result<ClientConfig, TlsError> {
        let (certs, key) = self.own()?;
        let mut exact = Vec::new();
        let mut prefixes = Vec::new();
        let mut patterns = Vec::new();
        for m in &u.san {
            match m {
                SanMatch::Exact(e) => exact.push(e.clone()),
                SanMatch::Prefix(p) => prefixes.push(p.clone()),
                SanMatch::Regex(r) => patterns.push(format!("^(?:{r})$")),
            }
        }
        let regexes = regex::RegexSet::new(&patterns).map_err(|e| TlsError::Certificate {
            path: self.files.ca.clone(),
            message: format!("SAN pattern: {e}"),
        })?;
        let any = u.san.is_empty();
        let authorizer: Authorizer = Arc::new(move |id: &SpiffeId| {
            let san = id.to_string();
            if any
                || exact.contains(&san)
                || prefixes.iter().any(|p| san.starts_with(p.as_str()))
                || regexes.is_match(&san)
            {
                Ok(())
            } else {
                Err(format!("{san} is not an identity this endpoint may have"))
            }
        });
        let verifier = PeerVerifier::from_ca_file(&self.files.ca, Role::Workload, authorizer)
            .map_err(|source| TlsError::Identity {
                path: self.files.ca.clone(),
                source,
            })?;
        let mut config =
            client_config(certs, key, Arc::new(verifier)).map_err(|source| TlsError::Identity {
                path: self.files.cert.clone(),
                source,
            })?;
        config.alpn_protocols = u.alpn.clone();
        Ok(config)
    }

    /// A server configuration for the inbound listener (same files, same reloading): clients
    /// must present a workload certificate of the federation (any cluster) issued by its CA, or
    /// be the east-west gateway of the proxy's own cluster (which brings other clusters'
    /// requests); ALPN as given to [`TlsSource::new`].
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        self.cached(&self.server_cache, || self.build_server())
    }

    fn cached<T>(
        &self,
        cache: &Mutex<Option<(Stamp, Arc<T>)>>,
        build: impl FnOnce() -> Result<T, TlsError>,
    ) -> Result<Arc<T>, TlsError> {
        let stamp = [
            mtime(&self.files.cert),
            mtime(&self.files.key),
            mtime(&self.files.ca),
        ];
        let mut cache = match cache.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some((s, c)) = cache.as_ref()
            && *s == stamp
        {
            return Ok(c.clone());
        }
        match build() {
            Ok(c) => {
                let c = Arc::new(c);
                if cache.is_some() {
                    tracing::info!(cert = %self.files.cert.display(), "workload certificate reloaded");
                }
                *cache = Some((stamp, c.clone()));
                Ok(c)
            }
            Err(e) => match cache.as_ref() {
                Some((_, c)) => {
                    tracing::warn!(error = %e, "cannot reload the workload certificate; keeping the previous one");
                    Ok(c.clone())
                }
                None => Err(e),
            },
        }
    }

    fn build_server(&self) -> Result<ServerConfig, TlsError> {
        let (certs, key) = self.own()?;
        let own = self.identity()?.cluster().to_string();
        let authorizer: Authorizer = Arc::new(move |id: &SpiffeId| {
            if id.role() == Role::Gateway && id.cluster() != own {
                Err(format!(
                    "only the gateway of cluster `{own}` may connect, not {id}"
                ))
            } else {
                Ok(())
            }
        });
        let verifier = PeerVerifier::from_ca_file(&self.files.ca, Role::Workload, authorizer)
            .map_err(|source| TlsError::Identity {
                path: self.files.ca.clone(),
                source,
            })?
            .also_accepting(Role::Gateway);
        let mut config =
            server_config(certs, key, Arc::new(verifier)).map_err(|source| TlsError::Identity {
                path: self.files.cert.clone(),
                source,
            })?;
        config.alpn_protocols = self.alpn.clone();
        Ok(config)
    }

    fn own(
        &self,
    ) -> Result<
        (
            Vec<rustls_pki_types::CertificateDer<'static>>,
            rustls_pki_types::PrivateKeyDer<'static>,
        ),
        TlsError,
    > {
        let certs = load_certs(&self.files.cert).map_err(|source| TlsError::Identity {
            path: self.files.cert.clone(),
            source,
        })?;
        let key = load_private_key(&self.files.key).map_err(|source| TlsError::Identity {
            path: self.files.key.clone(),
            source,
        })?;
        Ok((certs, key))
    }

    fn build(&self) -> Result<ClientConfig, TlsError> {
        let me = self.identity()?;
        let (certs, key) = self.own()?;
        let (role, cluster) = match self.peer {
            Peer::Gateway => (Role::Gateway, me.cluster().to_string()),
            Peer::Workload => (Role::Workload, me.cluster().to_string()),
        };
        let ca_err = |source| TlsError::Identity {
            path: self.files.ca.clone(),
            source,
        };
        let verifier = PeerVerifier::from_ca_file(
            &self.files.ca,
            role,
            federation::identity::allow_clusters([cluster]),
        )
        .map_err(ca_err)?;
        let mut config =
            client_config(certs, key, Arc::new(verifier)).map_err(|source| TlsError::Identity {
                path: self.files.cert.clone(),
                source,
            })?;
        config.alpn_protocols = self.alpn.clone();
        Ok(config)
    }
}

/// Mutual TLS over `tcp` to an endpoint's sidecar, within `timeout`; the error says why (the
/// peer's identity refused, its CA, a timeout, …).
pub async fn handshake(
    tls: &TlsSource,
    settings: &UpstreamTls,
    tcp: tokio::net::TcpStream,
    timeout: std::time::Duration,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let peer = tcp
        .peer_addr()
        .map_or_else(|_| "the endpoint".to_string(), |a| a.to_string());
    let config = tls.upstream_config(settings).map_err(|e| e.to_string())?;
    // Identities are SPIFFE ids, verified by the peer verifier; the server name is unused.
    let name = rustls_pki_types::ServerName::IpAddress(
        tcp.peer_addr()
            .map_or(std::net::Ipv4Addr::LOCALHOST.into(), |a| a.ip())
            .into(),
    );
    tokio::time::timeout(
        timeout,
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .map_err(|_| format!("{peer}: mutual TLS to its sidecar: no handshake within {timeout:?}"))?
    .map_err(|e| {
        format!(
            "{peer}: mutual TLS to its sidecar: {}",
            federation::identity::handshake_failure(&e)
        )
    })
}

/// Why an endpoint behind a sidecar cannot be reached by a proxy without a workload certificate.
pub fn no_certificate(endpoint: &dyn std::fmt::Display) -> String {
    format!(
        "{endpoint}: the endpoint is behind a sidecar (mutual TLS) and this proxy has no workload certificate"
    )
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// The SPIFFE identity of a workload certificate file; anything else is an error naming it.
pub fn identity_of(cert: &Path) -> Result<SpiffeId, TlsError> {
    let pem = std::fs::read_to_string(cert).map_err(|source| TlsError::Io {
        path: cert.to_path_buf(),
        source,
    })?;
    let info = inspect_pem(&pem).map_err(|source| TlsError::Identity {
        path: cert.to_path_buf(),
        source,
    })?;
    let id = info
        .identity
        .as_deref()
        .ok_or_else(|| TlsError::Certificate {
            path: cert.to_path_buf(),
            message: format!(
                "no SPIFFE identity ({})",
                info.identity_error.as_deref().unwrap_or("no URI SAN")
            ),
        })?;
    let id: SpiffeId = id.parse().map_err(|source| TlsError::Identity {
        path: cert.to_path_buf(),
        source,
    })?;
    if id.role() != Role::Workload {
        return Err(TlsError::Certificate {
            path: cert.to_path_buf(),
            message: format!("{id} is not a workload identity"),
        });
    }
    Ok(id)
}
