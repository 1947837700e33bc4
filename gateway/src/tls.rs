//! The gateway's TLS material: the QUIC peer configs (gateway identities of federation members)
//! and the ingress config (workload identities of the gateway's own cluster), rebuilt when the
//! certificate files change. Existing connections keep the config they were made with.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use federation::identity::{
    self, Authorizer, IdentityError, PeerVerifier, Role, client_config, load_certs,
    load_private_key, server_config,
};
use federation::model::Name;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::config::{TlsFiles, TransportTuning};

/// ALPN of the gateway-to-gateway protocol.
pub const ALPN_PEER: &[u8] = b"strait/1";

/// The set of clusters allowed to peer (static peers, registry members).
#[derive(Clone, Default)]
pub struct Members(Arc<RwLock<BTreeSet<String>>>);

impl Members {
    pub fn contains(&self, cluster: &str) -> bool {
        self.0.read().map(|s| s.contains(cluster)).unwrap_or(false)
    }
    pub fn insert(&self, cluster: &str) {
        if let Ok(mut s) = self.0.write() {
            s.insert(cluster.to_string());
        }
    }
    pub fn replace(&self, clusters: BTreeSet<String>) {
        if let Ok(mut s) = self.0.write() {
            *s = clusters;
        }
    }
    pub fn list(&self) -> Vec<String> {
        self.0
            .read()
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// Peers pinned to a trust of their own by a peering with a CA bundle (a `FederatedCluster`
/// object): cluster → the verifier of that cluster's gateway alone.
#[derive(Clone, Default)]
pub struct Pinned(Arc<RwLock<BTreeMap<String, Arc<PeerVerifier>>>>);

impl Pinned {
    pub fn get(&self, cluster: &str) -> Option<Arc<PeerVerifier>> {
        self.0.read().ok().and_then(|m| m.get(cluster).cloned())
    }
    pub fn contains(&self, cluster: &str) -> bool {
        self.0
            .read()
            .map(|m| m.contains_key(cluster))
            .unwrap_or(false)
    }
    pub fn replace(&self, pinned: BTreeMap<String, Arc<PeerVerifier>>) {
        if let Ok(mut m) = self.0.write() {
            *m = pinned;
        }
    }
}

/// Which end of a peer handshake refused the other's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// This gateway accepted the connection (the peer is a TLS client).
    Accepting,
    /// This gateway dialled (the peer is a TLS server).
    Dialling,
}

/// Told the reason (a metric label, from the typed error: see
/// [`identity::tls_failure_reason`]) of every peer certificate the verifier refuses. Over QUIC
/// the rustls error does not reach the connection's owner (quinn keeps only the TLS alert, and
/// every identity refusal of a [`PeerVerifier`] is `certificate_unknown`), so the verifier
/// reports it here.
pub type OnReject = Arc<dyn Fn(Side, &'static str) + Send + Sync>;

/// The verifier of peer gateways, both ways: the certificate of a pinned cluster (by the
/// identity it claims) is verified against that cluster's own CA bundle and trust domain alone;
/// every other against the federation CA.
pub struct PeerGateways {
    federation: Arc<PeerVerifier>,
    pinned: Pinned,
    on_reject: OnReject,
}

impl std::fmt::Debug for PeerGateways {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerGateways")
            .field("federation", &self.federation)
            .field("pinned", &self.pinned)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Pinned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self
            .0
            .read()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        f.debug_tuple("Pinned").field(&names).finish()
    }
}

impl PeerGateways {
    fn pick(&self, end_entity: &CertificateDer<'_>) -> Arc<PeerVerifier> {
        identity::spiffe_id_from_cert(end_entity)
            .ok()
            .and_then(|id| self.pinned.get(id.cluster()))
            .unwrap_or_else(|| self.federation.clone())
    }

    fn report<T>(&self, side: Side, result: Result<T, rustls::Error>) -> Result<T, rustls::Error> {
        if let Err(e) = &result {
            (self.on_reject)(side, identity::tls_failure_reason(e));
        }
        result
    }
}

impl ClientCertVerifier for PeerGateways {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Only the federation CA's: hints are advisory, and Strait gateways present their one
        // certificate whatever they are.
        ClientCertVerifier::root_hint_subjects(self.federation.as_ref())
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .pick(end_entity)
            .verify_client_cert(end_entity, intermediates, now);
        self.report(Side::Accepting, verified)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let valid = ClientCertVerifier::verify_tls12_signature(
            self.federation.as_ref(),
            message,
            cert,
            dss,
        );
        self.report(Side::Accepting, valid)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let valid = ClientCertVerifier::verify_tls13_signature(
            self.federation.as_ref(),
            message,
            cert,
            dss,
        );
        self.report(Side::Accepting, valid)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ClientCertVerifier::supported_verify_schemes(self.federation.as_ref())
    }
}

impl ServerCertVerifier for PeerGateways {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.pick(end_entity).verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        self.report(Side::Dialling, verified)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let valid = ServerCertVerifier::verify_tls12_signature(
            self.federation.as_ref(),
            message,
            cert,
            dss,
        );
        self.report(Side::Dialling, valid)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let valid = ServerCertVerifier::verify_tls13_signature(
            self.federation.as_ref(),
            message,
            cert,
            dss,
        );
        self.report(Side::Dialling, valid)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ServerCertVerifier::supported_verify_schemes(self.federation.as_ref())
    }
}

/// The verifier of cluster `peer`'s gateway under its own trust (a peering's trust domain and
/// CA bundle), accepted as long as `members` has it.
pub fn pinned_verifier(
    own: &str,
    peer: &str,
    trust_domain: &str,
    ca: &[CertificateDer<'_>],
    members: Members,
) -> Result<PeerVerifier, IdentityError> {
    let (own, peer) = (own.to_string(), peer.to_string());
    let auth: Authorizer = Arc::new(move |id| {
        let c = id.cluster();
        if c != peer || c == own {
            Err(format!(
                "a certificate of `{peer}`'s CA bundle names cluster `{c}`"
            ))
        } else if !members.contains(c) {
            Err(format!("cluster `{c}` is not a member of the federation"))
        } else {
            Ok(())
        }
    });
    PeerVerifier::with_trust_domain(trust_domain, ca, Role::Gateway, auth)
}

/// Configs built from one version of the files.
pub struct Material {
    pub quic_server: quinn::ServerConfig,
    pub quic_client: quinn::ClientConfig,
    pub ingress: Arc<rustls::ServerConfig>,
    pub sidecars: SidecarTls,
    pub trust_domain: String,
}

/// Client configs for local endpoints behind sidecars: the gateway's certificate, a peer that
/// is a workload of the gateway's own cluster, one config per ALPN offered.
#[derive(Clone)]
pub struct SidecarTls {
    none: Arc<rustls::ClientConfig>,
    http1: Arc<rustls::ClientConfig>,
    h2: Arc<rustls::ClientConfig>,
}

impl SidecarTls {
    /// The config offering `alpn` (`http/1.1`, `h2`, or none).
    pub fn get(&self, alpn: Option<&str>) -> Arc<rustls::ClientConfig> {
        match alpn {
            Some("h2") => self.h2.clone(),
            Some(_) => self.http1.clone(),
            None => self.none.clone(),
        }
    }
}

/// Builds [`Material`] and notices when the files change.
pub struct TlsSource {
    files: TlsFiles,
    own: Name,
    members: Members,
    pinned: Pinned,
    transport: Arc<quinn::TransportConfig>,
    on_reject: OnReject,
    stamp: RwLock<Option<Vec<(PathBuf, SystemTime, u64)>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("{0}")]
    Quic(String),
}

impl TlsSource {
    pub fn new(
        files: TlsFiles,
        own: Name,
        members: Members,
        pinned: Pinned,
        transport: Arc<quinn::TransportConfig>,
        on_reject: OnReject,
    ) -> Self {
        Self {
            files,
            own,
            members,
            pinned,
            transport,
            on_reject,
            stamp: RwLock::new(None),
        }
    }

    fn current_stamp(&self) -> Vec<(PathBuf, SystemTime, u64)> {
        [&self.files.cert, &self.files.key, &self.files.ca]
            .into_iter()
            .map(|p| {
                let m = std::fs::metadata(p).ok();
                (
                    p.clone(),
                    m.as_ref()
                        .and_then(|m| m.modified().ok())
                        .unwrap_or(SystemTime::UNIX_EPOCH),
                    m.map(|m| m.len()).unwrap_or(0),
                )
            })
            .collect()
    }

    /// Whether the files changed since the last successful [`TlsSource::build`].
    pub fn changed(&self) -> bool {
        let now = self.current_stamp();
        self.stamp
            .read()
            .map(|s| s.as_ref() != Some(&now))
            .unwrap_or(true)
    }

    /// Load the files and build every config.
    pub fn build(&self) -> Result<Material, TlsError> {
        let stamp = self.current_stamp();
        let chain = load_certs(&self.files.cert)?;
        let key = load_private_key(&self.files.key)?;
        let ca = load_certs(&self.files.ca)?;

        // Our own certificate must be this cluster's gateway identity.
        let own_id = chain
            .first()
            .map(identity::spiffe_id_from_cert)
            .transpose()?
            .ok_or_else(|| {
                TlsError::Quic(format!("{}: no certificate", self.files.cert.display()))
            })?;
        if own_id.role() != Role::Gateway || own_id.cluster() != self.own.as_str() {
            return Err(TlsError::Quic(format!(
                "{}: the certificate is {own_id}, not the gateway of cluster {}",
                self.files.cert.display(),
                self.own
            )));
        }

        let members = self.members.clone();
        let pinned = self.pinned.clone();
        let own = self.own.to_string();
        let peer_auth: Authorizer = Arc::new(move |id| {
            let c = id.cluster();
            if c == own {
                return Err(format!("cluster `{c}` is this gateway's own cluster"));
            }
            if pinned.contains(c) {
                return Err(format!(
                    "cluster `{c}` is pinned to its own CA bundle, not the federation CA"
                ));
            }
            if members.contains(c) {
                Ok(())
            } else {
                Err(format!("cluster `{c}` is not a member of the federation"))
            }
        });
        let federation = Arc::new(PeerVerifier::new(&ca, Role::Gateway, peer_auth)?);
        let trust_domain = federation.trust_domain().to_string();
        let peer_verifier = Arc::new(PeerGateways {
            federation,
            pinned: self.pinned.clone(),
            on_reject: self.on_reject.clone(),
        });

        let mut server = server_config(chain.clone(), key.clone_key(), peer_verifier.clone())?;
        server.alpn_protocols = vec![ALPN_PEER.to_vec()];
        let mut client = client_config(chain.clone(), key.clone_key(), peer_verifier)?;
        client.alpn_protocols = vec![ALPN_PEER.to_vec()];

        let quic_server_crypto =
            quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(server))
                .map_err(|e| TlsError::Quic(format!("QUIC server TLS: {e}")))?;
        let mut quic_server = quinn::ServerConfig::with_crypto(Arc::new(quic_server_crypto));
        quic_server.transport_config(self.transport.clone());
        let quic_client_crypto =
            quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(client))
                .map_err(|e| TlsError::Quic(format!("QUIC client TLS: {e}")))?;
        let mut quic_client = quinn::ClientConfig::new(Arc::new(quic_client_crypto));
        quic_client.transport_config(self.transport.clone());

        // Any workload of the federation passes the handshake; the ingress then answers 403 with
        // the reason when it belongs to another cluster (clearer than a TLS alert).
        let workload_auth: Authorizer = identity::allow_any();
        let workload_verifier = Arc::new(PeerVerifier::new(&ca, Role::Workload, workload_auth)?);
        let mut ingress = server_config(chain.clone(), key.clone_key(), workload_verifier)?;
        ingress.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

        // Sidecars of this cluster in front of local endpoints.
        let sidecar_verifier = Arc::new(PeerVerifier::new(
            &ca,
            Role::Workload,
            identity::allow_clusters([self.own.to_string()]),
        )?);
        let sidecar = |alpn: &[u8]| -> Result<Arc<rustls::ClientConfig>, TlsError> {
            let mut c = client_config(chain.clone(), key.clone_key(), sidecar_verifier.clone())?;
            if !alpn.is_empty() {
                c.alpn_protocols = vec![alpn.to_vec()];
            }
            Ok(Arc::new(c))
        };
        let sidecars = SidecarTls {
            none: sidecar(b"")?,
            http1: sidecar(b"http/1.1")?,
            h2: sidecar(b"h2")?,
        };

        if let Ok(mut s) = self.stamp.write() {
            *s = Some(stamp);
        }
        Ok(Material {
            quic_server,
            quic_client,
            ingress: Arc::new(ingress),
            sidecars,
            trust_domain,
        })
    }
}

/// The QUIC transport for peer links.
pub fn transport(
    tuning: &TransportTuning,
    keep_alive: std::time::Duration,
    idle: std::time::Duration,
) -> Result<quinn::TransportConfig, String> {
    let mut t = quinn::TransportConfig::default();
    let var = |v: u64, what: &str| {
        quinn::VarInt::from_u64(v).map_err(|_| format!("{what} {v} is too large"))
    };
    t.stream_receive_window(var(tuning.stream_window, "transport.stream_window")?);
    t.receive_window(var(
        tuning.connection_window,
        "transport.connection_window",
    )?);
    t.send_window(tuning.send_window);
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(tuning.max_streams));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t.keep_alive_interval(Some(keep_alive));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(idle)
            .map_err(|_| format!("link.idle_timeout {idle:?} is too large"))?,
    ));
    t.datagram_receive_buffer_size(Some(64 * 1024));
    match tuning.congestion {
        crate::config::Congestion::Cubic => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()));
        }
        crate::config::Congestion::NewReno => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default()));
        }
        crate::config::Congestion::Bbr => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
        }
    }
    Ok(t)
}
