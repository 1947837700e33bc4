//! The proxy's workload certificate: mutual TLS to the control plane and to the local gateway.
//!
//! The files are read again when they change (checked before each new connection), so a
//! rotated certificate is used from the next connection on; open connections are kept.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use federation::identity::{
    IdentityError, PeerVerifier, Role, SpiffeId, client_config, inspect_pem, load_certs,
    load_private_key, server_config,
};
use rustls::{ClientConfig, ServerConfig};

/// The workload certificate files (from `strait pki issue workload`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

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
}

type Stamp = [Option<SystemTime>; 3];

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

    /// A server configuration for the inbound listener (same files, same reloading): clients
    /// must present a workload certificate of the federation (any cluster) issued by its CA;
    /// ALPN as given to [`TlsSource::new`].
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
        let verifier = PeerVerifier::from_ca_file(
            &self.files.ca,
            Role::Workload,
            federation::identity::allow_any(),
        )
        .map_err(|source| TlsError::Identity {
            path: self.files.ca.clone(),
            source,
        })?;
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
