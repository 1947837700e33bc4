//! The xDS listener's mutual TLS: a rustls server config built from the certificate, key and CA
//! files, rebuilt when they change (renewed certificates are used by every new connection; open
//! streams keep theirs), and an accept loop that bounds each handshake in time and hands tonic
//! only finished TLS streams (tonic reads the client's certificate chain from them).

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::config::TlsFiles;

/// How long a client may take over its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The xDS server's TLS configuration, kept current with its files.
pub struct ServingTls {
    files: TlsFiles,
    current: RwLock<Arc<rustls::ServerConfig>>,
    stamp: std::sync::Mutex<Vec<Option<(SystemTime, u64)>>>,
}

fn stamps(files: &TlsFiles) -> Vec<Option<(SystemTime, u64)>> {
    [&files.cert, &files.key, &files.ca]
        .into_iter()
        .map(|p: &PathBuf| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

fn build(files: &TlsFiles) -> Result<rustls::ServerConfig, String> {
    let chain = federation::identity::load_certs(&files.cert).map_err(|e| e.to_string())?;
    let key = federation::identity::load_private_key(&files.key).map_err(|e| e.to_string())?;
    let roots = federation::identity::load_roots(&files.ca).map_err(|e| e.to_string())?;
    let provider = federation::identity::crypto_provider();
    // Any certificate of the CA may open a TLS connection; the xDS service then accepts only
    // workload identities of this cluster (`Xds::require_workload_of`).
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| format!("{}: {e}", files.ca.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| format!("{}: {e}", files.cert.display()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

impl ServingTls {
    /// Read the files (an error names the file).
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, String> {
        let config = build(&files)?;
        Ok(Arc::new(Self {
            stamp: std::sync::Mutex::new(stamps(&files)),
            files,
            current: RwLock::new(Arc::new(config)),
        }))
    }

    /// The configuration new connections get.
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        self.current
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Rebuild when a file changed; a broken rotation keeps the current configuration.
    /// Returns whether the configuration changed.
    pub fn refresh(&self) -> bool {
        let now = stamps(&self.files);
        {
            let mut s = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
            if *s == now {
                return false;
            }
            *s = now;
        }
        match build(&self.files) {
            Ok(c) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(c);
                tracing::info!(cert = %self.files.cert.display(),
                    "xDS serving certificate reloaded; new connections use it");
                true
            }
            Err(e) => {
                tracing::error!(
                    "xDS serving certificate not reloaded, keeping the current one: {e}"
                );
                false
            }
        }
    }
}

/// Finished TLS connections from `listener`, for `Server::serve_with_incoming_shutdown`: each
/// handshake runs on its own task, bounded by [`HANDSHAKE_TIMEOUT`]; failures are logged and
/// counted by the caller's `on_failure`, never ending the stream. The files are checked for
/// rotation every `reload_interval` (default 1 s).
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ServingTls>,
    stop: CancellationToken,
    on_failure: impl Fn(&str) + Send + Sync + 'static,
) -> Incoming {
    let (tx, rx) = mpsc::channel::<std::io::Result<TlsStream<TcpStream>>>(64);
    let on_failure = Arc::new(on_failure);
    tokio::spawn(async move {
        let every = tls.files.reload_interval.max(Duration::from_millis(50));
        let mut reload = tokio::time::interval(every);
        loop {
            let (tcp, peer) = tokio::select! {
                _ = stop.cancelled() => return,
                _ = reload.tick() => {
                    tls.refresh();
                    continue;
                }
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and the like: back off rather than spin.
                        tracing::warn!(error = %e, "xDS accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
            let tx = tx.clone();
            let on_failure = on_failure.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "xDS TLS handshake failed");
                        on_failure("handshake");
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "xDS TLS handshake timed out");
                        on_failure("handshake_timeout");
                    }
                }
            });
        }
    });
    Incoming { rx }
}

/// The stream [`incoming`] returns.
pub struct Incoming {
    rx: mpsc::Receiver<std::io::Result<TlsStream<TcpStream>>>,
}

impl futures::Stream for Incoming {
    type Item = std::io::Result<TlsStream<TcpStream>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}
