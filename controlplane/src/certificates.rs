//! Certificates without hands: the control plane issues and renews its own xDS serving
//! certificate and its cluster's gateway certificate from the cluster's CA, with the DNS names
//! and addresses their clients check.
//!
//! ```yaml
//! certificates:
//!   ca: /etc/strait/ca                 # ca.pem + ca.key: the CA that signs this cluster's identities
//!   validity: 24h                      # each certificate is renewed with a third of it left
//!   controlplane:                      # spiffe://TD/cluster/C/ns/strait-system/sa/strait-controlplane
//!     files: /var/run/strait/tls       # cert.pem, key.pem, ca.pem: what `xds.tls` reads
//!     dns_names: [strait-controlplane.strait-system.svc]
//!   gateway:                           # spiffe://TD/cluster/C/gateway
//!     secret: strait-gateway-tls       # (Kubernetes) or `files: DIR`
//!     dns_names: [gateway.east.example]
//!     ips: [203.0.113.7]
//! ```
//!
//! - A certificate is (re)issued when it is missing or unreadable, names another identity,
//!   lacks a DNS name or address it must carry, comes from another CA (the CA was rotated) or has
//!   less than a third of its validity left. Files are replaced atomically (key first); a Secret
//!   is written with server-side apply and labelled managed-by strait (a Secret of that name that
//!   is not Strait's is reported and left alone).
//! - Components re-read their certificate files when they change: the xDS server within a
//!   second, the gateway's peers and ingress at their next handshake; a Secret volume is updated
//!   by the kubelet within about a minute, long before the old certificate's last third ends.
//! - The first pass runs before the xDS server starts (a control plane cannot serve without its
//!   certificate); later passes every [`CHECK`]; a failing pass keeps what is there and is tried
//!   again. Private keys are never logged.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use federation::identity::{CertificateAuthority, ExtraNames, IssuedCert, SpiffeId, inspect_pem};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::kubernetes::identities;
use crate::kubernetes::imports::{FIELD_MANAGER, MANAGED_BY};

/// How often the certificates are checked (cheap: a file or a Secret read and parsed).
pub const CHECK: Duration = Duration::from_secs(5);
/// The namespace and service account of the control plane's default identity.
pub const CONTROLPLANE_NAMESPACE: &str = "strait-system";
pub const CONTROLPLANE_ACCOUNT: &str = "strait-controlplane";

/// `certificates` in the control plane's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificatesConfig {
    /// A CA directory (`ca.pem`, `ca.key`).
    pub ca: PathBuf,
    /// How long an issued certificate is valid; renewed with a third left.
    #[serde(
        default = "default_validity",
        with = "federation::config::duration_field"
    )]
    pub validity: Duration,
    /// The control plane's own xDS serving certificate.
    #[serde(default)]
    pub controlplane: Option<Kept>,
    /// The cluster's east-west gateway's certificate.
    #[serde(default)]
    pub gateway: Option<Kept>,
    /// The namespace of the Secrets it writes (Kubernetes).
    #[serde(default = "default_namespace")]
    pub namespace: String,
}

fn default_namespace() -> String {
    CONTROLPLANE_NAMESPACE.to_string()
}

fn default_validity() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// One certificate the control plane keeps.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kept {
    /// A directory for `cert.pem` (leaf then CA), `key.pem` (0600) and `ca.pem`.
    #[serde(default)]
    pub files: Option<PathBuf>,
    /// A Secret in the control plane's namespace (Kubernetes discovery only).
    #[serde(default)]
    pub secret: Option<String>,
    /// DNS names clients check (SANs besides the SPIFFE ID).
    #[serde(default)]
    pub dns_names: Vec<String>,
    /// IP addresses clients check.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// The control plane's SPIFFE ID, when not
    /// `spiffe://TD/cluster/C/ns/strait-system/sa/strait-controlplane` (ignored for the gateway).
    #[serde(default)]
    pub identity: Option<String>,
}

impl CertificatesConfig {
    /// Checks what parsing cannot (paths relative to `base`); errors name the field.
    pub fn check(&mut self, base: &Path, kubernetes: bool) -> Result<(), (String, String)> {
        self.ca = base.join(&self.ca);
        if self.validity < Duration::from_secs(60) {
            return Err((
                "certificates.validity".into(),
                format!(
                    "{} is too short: at least 1m",
                    humantime::format_duration(self.validity)
                ),
            ));
        }
        if self.controlplane.is_none() && self.gateway.is_none() {
            return Err((
                "certificates".into(),
                "name at least one of `controlplane` and `gateway`".into(),
            ));
        }
        for (what, kept) in [
            ("controlplane", self.controlplane.as_mut()),
            ("gateway", self.gateway.as_mut()),
        ] {
            let Some(k) = kept else { continue };
            let field = format!("certificates.{what}");
            match (&mut k.files, &k.secret) {
                (Some(f), None) => *f = base.join(&*f),
                (None, Some(s)) => {
                    if !kubernetes {
                        return Err((
                            format!("{field}.secret"),
                            "a Secret needs `discovery.kubernetes`; give `files: DIR` instead"
                                .into(),
                        ));
                    }
                    if what == "controlplane" {
                        return Err((
                            format!("{field}.secret"),
                            "the control plane serves with files it writes itself (an emptyDir): give `files: DIR`".into(),
                        ));
                    }
                    federation::identity::validate_name("secret", s)
                        .map_err(|e| (format!("{field}.secret"), e.to_string()))?;
                }
                _ => {
                    return Err((
                        field,
                        "give exactly one of `files: DIR` and `secret: NAME`".into(),
                    ));
                }
            }
            for n in &k.dns_names {
                let ok = !n.is_empty()
                    && n.len() <= 253
                    && n.trim_end_matches('.').split('.').all(|l| {
                        !l.is_empty()
                            && l.len() <= 63
                            && l.bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'*')
                    });
                if !ok {
                    return Err((
                        format!("{field}.dns_names"),
                        format!("`{n}` is not a DNS name"),
                    ));
                }
            }
            if let Some(id) = &k.identity {
                if what == "gateway" {
                    return Err((
                        format!("{field}.identity"),
                        "a gateway's identity is always spiffe://TD/cluster/C/gateway".into(),
                    ));
                }
                let parsed: SpiffeId =
                    id.parse()
                        .map_err(|e: federation::identity::IdentityError| {
                            (format!("{field}.identity"), e.to_string())
                        })?;
                if parsed.namespace().is_none() {
                    return Err((
                        format!("{field}.identity"),
                        format!("`{id}` is not a workload identity (…/ns/NS/sa/SA)"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// What a kept certificate is: its identity and names, and where it goes.
#[derive(Debug, Clone)]
pub struct Wanted {
    pub what: &'static str,
    pub id: SpiffeId,
    pub names: ExtraNames,
    pub place: Place,
}

#[derive(Debug, Clone)]
pub enum Place {
    Files(PathBuf),
    Secret { namespace: String, name: String },
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Files(d) => write!(f, "{}", d.display()),
            Place::Secret { namespace, name } => write!(f, "Secret {namespace}/{name}"),
        }
    }
}

/// The certificates `cfg` asks for, for cluster `cluster` of the CA's trust domain.
pub fn wanted(
    cfg: &CertificatesConfig,
    ca: &CertificateAuthority,
    cluster: &str,
    namespace: &str,
) -> Result<Vec<Wanted>, String> {
    let mut out = Vec::new();
    let td = ca.trust_domain();
    let place = |k: &Kept| match (&k.files, &k.secret) {
        (Some(f), _) => Place::Files(f.clone()),
        (None, Some(s)) => Place::Secret {
            namespace: namespace.to_string(),
            name: s.clone(),
        },
        (None, None) => Place::Files(PathBuf::new()),
    };
    let names = |k: &Kept| ExtraNames {
        dns: k.dns_names.clone(),
        ips: k.ips.clone(),
    };
    if let Some(k) = &cfg.controlplane {
        let id = match &k.identity {
            Some(i) => i
                .parse::<SpiffeId>()
                .map_err(|e| format!("certificates.controlplane.identity: {e}"))?,
            None => SpiffeId::workload(td, cluster, CONTROLPLANE_NAMESPACE, CONTROLPLANE_ACCOUNT)
                .map_err(|e| e.to_string())?,
        };
        if id.trust_domain() != td || id.cluster() != cluster {
            return Err(format!(
                "certificates.controlplane.identity: {id} is not of cluster {cluster} in the CA's trust domain {td}"
            ));
        }
        out.push(Wanted {
            what: "controlplane",
            id,
            names: names(k),
            place: place(k),
        });
    }
    if let Some(k) = &cfg.gateway {
        out.push(Wanted {
            what: "gateway",
            id: SpiffeId::gateway(td, cluster).map_err(|e| e.to_string())?,
            names: names(k),
            place: place(k),
        });
    }
    Ok(out)
}

/// What a kept certificate holds now, as far as renewal cares.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    pub identity: Option<String>,
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub not_after_unix: i64,
    pub ca_pem: String,
}

impl Held {
    fn parse(cert_pem: &str, key_pem: &str, ca_pem: &str) -> Option<Held> {
        if !key_pem.contains("PRIVATE KEY") {
            return None;
        }
        let info = inspect_pem(cert_pem).ok()?;
        Some(Held {
            identity: info.identity,
            dns: info.dns_names,
            ips: info.ip_addresses,
            not_after_unix: info.not_after_unix,
            ca_pem: ca_pem.to_string(),
        })
    }
}

/// Why `held` must be issued again for `want` under the CA `ca_pem` at `now_unix`, or `None`.
pub fn renewal_due(
    held: Option<&Held>,
    want: &Wanted,
    ca_pem: &str,
    now_unix: i64,
    validity: Duration,
) -> Option<&'static str> {
    let Some(h) = held else {
        return Some("missing or unreadable");
    };
    if h.identity.as_deref() != Some(&want.id.to_string()) {
        return Some("another identity");
    }
    if want.names.dns.iter().any(|n| !h.dns.contains(n))
        || want.names.ips.iter().any(|ip| !h.ips.contains(ip))
    {
        return Some("names changed");
    }
    if h.ca_pem.trim() != ca_pem.trim() {
        return Some("another CA");
    }
    if now_unix >= identities::renew_at(h.not_after_unix, validity) {
        return Some("expiring");
    }
    None
}

fn unix_now() -> i64 {
    identities::unix(SystemTime::now())
}

fn read_files(dir: &Path) -> Option<Held> {
    let r = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
    Held::parse(&r("cert.pem")?, &r("key.pem")?, &r("ca.pem")?)
}

fn read_secret(secret: &Secret) -> Option<Held> {
    let text = |k: &str| identities::secret_text(secret, k);
    Held::parse(&text("cert.pem")?, &text("key.pem")?, &text("ca.pem")?)
}

/// Keeps the wanted certificates current.
pub struct Keeper {
    cfg: CertificatesConfig,
    cluster: String,
    namespace: String,
    client: Option<kube::Client>,
    ca: CertificateAuthority,
    ca_stamp: Vec<Option<(SystemTime, u64)>>,
    /// The last problem reported per certificate (reported once, not every pass).
    problems: BTreeMap<&'static str, String>,
}

impl Keeper {
    /// Reads the CA (an error names the directory).
    pub fn new(
        cfg: CertificatesConfig,
        cluster: String,
        namespace: String,
        client: Option<kube::Client>,
    ) -> Result<Self, String> {
        let ca = CertificateAuthority::load(&cfg.ca)
            .map_err(|e| format!("certificates.ca {}: {e}", cfg.ca.display()))?;
        // Fail now on an identity that cannot be.
        wanted(&cfg, &ca, &cluster, &namespace)?;
        Ok(Self {
            ca_stamp: identities::ca_stamp(&cfg.ca),
            cfg,
            cluster,
            namespace,
            client,
            ca,
            problems: BTreeMap::new(),
        })
    }

    /// One pass over every certificate; returns how many were (re)issued, or the first
    /// failure (the others were still tried).
    pub async fn pass(&mut self) -> Result<usize, String> {
        let stamp = identities::ca_stamp(&self.cfg.ca);
        if stamp != self.ca_stamp {
            match CertificateAuthority::load(&self.cfg.ca) {
                Ok(ca) => {
                    tracing::info!(ca = %self.cfg.ca.display(), "certificates: the CA changed; reissuing");
                    self.ca = ca;
                    self.ca_stamp = stamp;
                }
                Err(e) => {
                    // Half-written during a rotation, say: keep the last good CA.
                    tracing::warn!(ca = %self.cfg.ca.display(), error = %e,
                        "certificates: cannot read the CA; keeping the last good one");
                }
            }
        }
        let wanted = wanted(&self.cfg, &self.ca, &self.cluster, &self.namespace)?;
        let mut issued = 0;
        let mut first_error = None;
        for w in &wanted {
            match self.keep(w).await {
                Ok(n) => {
                    if self.problems.remove(w.what).is_some() {
                        tracing::info!(certificate = w.what, place = %w.place, "certificates: in order again");
                    }
                    issued += n;
                }
                Err(e) => {
                    let msg = format!("{} certificate ({}): {e}", w.what, w.place);
                    if self.problems.get(w.what) != Some(&msg) {
                        tracing::warn!("certificates: {msg}");
                        self.problems.insert(w.what, msg.clone());
                    }
                    first_error.get_or_insert(msg);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(issued),
        }
    }

    fn issue(&self, w: &Wanted) -> Result<IssuedCert, String> {
        self.ca
            .issue_with_names(&w.id, self.cfg.validity, &w.names)
            .map_err(|e| format!("cannot issue: {e}"))
    }

    async fn keep(&self, w: &Wanted) -> Result<usize, String> {
        let ca_pem = self.ca.ca_cert_pem();
        let now = unix_now();
        match &w.place {
            Place::Files(dir) => {
                let held = read_files(dir);
                let Some(reason) = renewal_due(held.as_ref(), w, ca_pem, now, self.cfg.validity)
                else {
                    return Ok(0);
                };
                let cert = self.issue(w)?;
                cert.write(dir).map_err(|e| format!("cannot write: {e}"))?;
                tracing::info!(certificate = w.what, identity = %w.id, dir = %dir.display(), reason,
                    "certificate issued");
                Ok(1)
            }
            Place::Secret { namespace, name } => {
                let client = self
                    .client
                    .clone()
                    .ok_or("a Secret needs the Kubernetes client")?;
                let api = Api::<Secret>::namespaced(client, namespace);
                let existing = api
                    .get_opt(name)
                    .await
                    .map_err(|e| format!("cannot read: {e}"))?;
                if let Some(s) = &existing {
                    let ours = s
                        .metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(MANAGED_BY))
                        .is_some_and(|v| v == "strait");
                    if !ours {
                        return Err(format!(
                            "exists and is not Strait's (no label {MANAGED_BY}=strait); left alone — label it or delete it to have it issued"
                        ));
                    }
                }
                let held = existing.as_ref().and_then(read_secret);
                let Some(reason) = renewal_due(held.as_ref(), w, ca_pem, now, self.cfg.validity)
                else {
                    return Ok(0);
                };
                let cert = self.issue(w)?;
                let params = PatchParams::apply(FIELD_MANAGER).force();
                api.patch(
                    name,
                    &params,
                    &Patch::Apply(&identities::managed_secret(namespace, name, &cert)),
                )
                .await
                .map_err(|e| format!("cannot write: {e}"))?;
                tracing::info!(certificate = w.what, identity = %w.id, secret = %name, reason,
                    "certificate issued");
                Ok(1)
            }
        }
    }

    /// Passes every [`CHECK`] until `stop`.
    pub async fn run(mut self, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(CHECK) => {}
            }
            let _ = self.pass().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path) -> CertificatesConfig {
        CertificatesConfig {
            ca: dir.join("ca"),
            validity: Duration::from_secs(3600),
            controlplane: Some(Kept {
                files: Some(dir.join("cp")),
                secret: None,
                dns_names: vec!["localhost".into(), "cp.example".into()],
                ips: vec!["127.0.0.1".parse().unwrap()],
                identity: None,
            }),
            gateway: Some(Kept {
                files: Some(dir.join("gw")),
                secret: None,
                dns_names: vec!["gw.example".into()],
                ips: vec![],
                identity: None,
            }),
            namespace: "strait-system".into(),
        }
    }

    #[tokio::test]
    async fn issues_what_is_missing_and_renews_what_is_due() {
        let d = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::init("td.example", Duration::from_secs(86400)).unwrap();
        ca.write(d.path().join("ca"), false).unwrap();
        let mut k =
            Keeper::new(cfg(d.path()), "east".into(), "strait-system".into(), None).unwrap();
        assert_eq!(k.pass().await.unwrap(), 2, "both missing: both issued");
        assert_eq!(k.pass().await.unwrap(), 0, "nothing due: nothing issued");
        let cp = read_files(&d.path().join("cp")).unwrap();
        assert_eq!(
            cp.identity.as_deref(),
            Some("spiffe://td.example/cluster/east/ns/strait-system/sa/strait-controlplane")
        );
        assert!(cp.dns.contains(&"cp.example".to_string()), "{cp:?}");
        assert!(cp.ips.contains(&"127.0.0.1".parse().unwrap()), "{cp:?}");
        let gw = read_files(&d.path().join("gw")).unwrap();
        assert_eq!(
            gw.identity.as_deref(),
            Some("spiffe://td.example/cluster/east/gateway")
        );
        // A broken file, a new name, a rotated CA: each reissues.
        std::fs::write(d.path().join("gw/cert.pem"), "garbage").unwrap();
        assert_eq!(k.pass().await.unwrap(), 1);
        k.cfg
            .controlplane
            .as_mut()
            .unwrap()
            .dns_names
            .push("new.example".into());
        assert_eq!(k.pass().await.unwrap(), 1);
        assert!(
            read_files(&d.path().join("cp"))
                .unwrap()
                .dns
                .contains(&"new.example".to_string())
        );
        let rotated = CertificateAuthority::init("td.example", Duration::from_secs(86400)).unwrap();
        rotated.write(d.path().join("ca"), true).unwrap();
        assert_eq!(k.pass().await.unwrap(), 2, "a rotated CA reissues both");
        assert_eq!(
            read_files(&d.path().join("gw")).unwrap().ca_pem.trim(),
            rotated.ca_cert_pem().trim()
        );
    }

    #[test]
    fn renewal_is_due_with_a_third_left() {
        let ca = CertificateAuthority::init("td.example", Duration::from_secs(86400)).unwrap();
        let w = Wanted {
            what: "gateway",
            id: SpiffeId::gateway("td.example", "east").unwrap(),
            names: ExtraNames::default(),
            place: Place::Files(PathBuf::new()),
        };
        let v = Duration::from_secs(3000);
        let held = Held {
            identity: Some(w.id.to_string()),
            dns: vec![],
            ips: vec![],
            not_after_unix: 10_000,
            ca_pem: ca.ca_cert_pem().into(),
        };
        assert_eq!(
            renewal_due(Some(&held), &w, ca.ca_cert_pem(), 8_999, v),
            None
        );
        assert_eq!(
            renewal_due(Some(&held), &w, ca.ca_cert_pem(), 9_000, v),
            Some("expiring")
        );
        assert_eq!(
            renewal_due(None, &w, ca.ca_cert_pem(), 0, v),
            Some("missing or unreadable")
        );
    }

    #[test]
    fn bad_configurations_name_the_field() {
        let d = Path::new("/x");
        let mut c = cfg(d);
        c.gateway.as_mut().unwrap().secret = Some("s".into());
        assert_eq!(c.check(d, true).unwrap_err().0, "certificates.gateway");
        let mut c = cfg(d);
        let g = c.gateway.as_mut().unwrap();
        g.files = None;
        g.secret = Some("strait-gateway-tls".into());
        assert_eq!(
            c.check(d, false).unwrap_err().0,
            "certificates.gateway.secret"
        );
        let mut c = cfg(d);
        c.controlplane.as_mut().unwrap().dns_names = vec!["bad name".into()];
        assert_eq!(
            c.check(d, false).unwrap_err().0,
            "certificates.controlplane.dns_names"
        );
        let mut c = cfg(d);
        c.gateway.as_mut().unwrap().identity = Some("spiffe://td/cluster/e/gateway".into());
        assert_eq!(
            c.check(d, false).unwrap_err().0,
            "certificates.gateway.identity"
        );
        let mut c = cfg(d);
        c.validity = Duration::from_secs(5);
        assert_eq!(c.check(d, false).unwrap_err().0, "certificates.validity");
    }
}
