//! Workload identities for injected pods: for every ServiceAccount of every namespace labelled
//! `strait.io/inject=enabled`, the control plane keeps the Secret `strait-identity-SA` that the
//! injected proxy mounts (`cert.pem`: the workload certificate of
//! `spiffe://TD/cluster/C/ns/NS/sa/SA` followed by the CA, `key.pem`, `ca.pem`), issued by the
//! CA it is given (`discovery.kubernetes.identities.ca`).
//!
//! - A Secret is (re)issued when it is missing or unreadable, names another identity or owner
//!   (the account was recreated), holds another CA's certificate (the CA was rotated) or has
//!   less than a third of its validity left; the proxy
//!   re-reads the files when the kubelet updates them, so rotation needs no restart.
//! - Secrets are written with server-side apply (field manager `strait-controlplane`), labelled
//!   `app.kubernetes.io/managed-by: strait` and owned by their ServiceAccount (deleted with it
//!   by the garbage collector); a managed identity Secret whose ServiceAccount or namespace left
//!   the set is deleted. A Secret of that name that is not Strait's (no label) is reported and
//!   left alone; other Secrets are never touched. A Secret that cannot be written does not hold
//!   up the others (it is reported and tried again with back-off).
//! - Namespaces and ServiceAccounts are watched (list + watch, relist after 410); nothing is
//!   written before both are listed. Every minute (and at the next renewal time) the Secrets are
//!   listed again, so one deleted by hand (or made unreadable) comes back. Failures are retried with
//!   back-off; a CA directory that cannot be read keeps the last good CA.
//! - Private keys are never logged.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use federation::identity::{CertificateAuthority, SpiffeId, inspect_pem};
use futures::StreamExt as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::ObjectKey;
use super::imports::{FIELD_MANAGER, MANAGED_BY};
use super::inject::NAMESPACE_LABEL;
use super::source::Relist;

/// The name of a ServiceAccount's identity Secret is this prefix and the account's name.
pub const SECRET_PREFIX: &str = "strait-identity-";
/// The identity a Secret holds (an annotation, for `kubectl describe`).
pub const IDENTITY_ANNOTATION: &str = "strait.io/identity";
/// How often the Secrets are listed again even when nothing changed.
const RESYNC: Duration = Duration::from_secs(60);

/// `discovery.kubernetes.identities` in the control plane's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitiesConfig {
    /// A CA directory (`ca.pem`, `ca.key`), e.g. the Secret `strait-ca` mounted.
    pub ca: PathBuf,
    /// How long an issued workload certificate is valid; renewed with a third left.
    #[serde(
        default = "default_validity",
        with = "federation::config::duration_field"
    )]
    pub validity: Duration,
}

fn default_validity() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// What an identity Secret holds, as far as renewal cares.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    pub identity: Option<String>,
    pub not_after_unix: i64,
    pub ca_pem: String,
    /// The uid of the ServiceAccount the Secret is owned by.
    pub owner_uid: Option<String>,
}

impl Held {
    /// Reads a Secret's `cert.pem` and `ca.pem`; `None` when they are missing or unreadable.
    pub fn of(secret: &Secret) -> Option<Held> {
        let text = |k: &str| secret_text(secret, k);
        let info = inspect_pem(&text("cert.pem")?).ok()?;
        Some(Held {
            identity: info.identity,
            not_after_unix: info.not_after_unix,
            ca_pem: text("ca.pem")?,
            owner_uid: secret
                .metadata
                .owner_references
                .as_ref()
                .and_then(|o| o.iter().find(|r| r.kind == "ServiceAccount"))
                .map(|r| r.uid.clone()),
        })
    }
}

/// When a certificate of `validity` ending at `not_after_unix` is due for renewal.
pub fn renew_at(not_after_unix: i64, validity: Duration) -> i64 {
    let third = i64::try_from(validity.as_secs() / 3).unwrap_or(i64::MAX);
    not_after_unix.saturating_sub(third)
}

/// Why a Secret holding `held` must be issued again for `id` (the account's uid `owner_uid`)
/// under the CA `ca_pem` at `now_unix`, or `None` when it is fine.
pub fn renewal_due(
    held: Option<&Held>,
    id: &str,
    owner_uid: &str,
    ca_pem: &str,
    now_unix: i64,
    validity: Duration,
) -> Option<&'static str> {
    let Some(h) = held else {
        return Some("missing or unreadable");
    };
    if h.identity.as_deref() != Some(id) {
        return Some("another identity");
    }
    if h.owner_uid.as_deref() != Some(owner_uid) {
        return Some("the account was recreated");
    }
    if h.ca_pem.trim() != ca_pem.trim() {
        return Some("another CA");
    }
    if now_unix >= renew_at(h.not_after_unix, validity) {
        return Some("expiring");
    }
    None
}

/// The Secret of `sa` (uid `sa_uid`) in `namespace` holding `cert`.
pub fn secret_for(
    namespace: &str,
    sa: &str,
    sa_uid: &str,
    cert: &federation::identity::IssuedCert,
) -> Secret {
    let mut secret = managed_secret(namespace, &format!("{SECRET_PREFIX}{sa}"), cert);
    secret.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "ServiceAccount".into(),
        name: sa.to_string(),
        uid: sa_uid.to_string(),
        ..Default::default()
    }]);
    secret
}

/// A Secret `namespace/name` holding `cert` as `cert.pem` (chain), `key.pem` and `ca.pem`,
/// labelled managed-by strait and annotated with the identity.
pub(crate) fn managed_secret(
    namespace: &str,
    name: &str,
    cert: &federation::identity::IssuedCert,
) -> Secret {
    let data: BTreeMap<String, ByteString> = [
        ("cert.pem", cert.chain_pem().into_bytes()),
        ("key.pem", cert.key_pem().as_bytes().to_vec()),
        ("ca.pem", cert.ca_pem().as_bytes().to_vec()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), ByteString(v)))
    .collect();
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some([(MANAGED_BY.to_string(), "strait".to_string())].into()),
            annotations: Some([(IDENTITY_ANNOTATION.to_string(), cert.id().to_string())].into()),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    }
}

/// The text of a Secret's key `k`, when present and UTF-8.
pub(crate) fn secret_text(secret: &Secret, k: &str) -> Option<String> {
    secret
        .data
        .as_ref()?
        .get(k)
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
}

/// When and how large the CA files are: they are read again only when this changes (a
/// Kubernetes Secret volume swaps them on update).
pub(crate) fn ca_stamp(dir: &std::path::Path) -> Vec<Option<(SystemTime, u64)>> {
    ["ca.pem", "ca.key"]
        .iter()
        .map(|f| {
            std::fs::metadata(dir.join(f))
                .ok()
                .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
        })
        .collect()
}

pub(crate) fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// What one pass did.
#[derive(Debug, Default)]
struct Pass {
    written: usize,
    deleted: usize,
    /// The earliest renewal among the Secrets in step (Unix seconds).
    next_renewal: Option<i64>,
    /// Whether a write, delete or read failed (the pass is tried again with back-off).
    failed: bool,
}

/// One pass: make the managed identity Secrets what `want` ((namespace, account) → the
/// account's uid) calls for. Only a failed list fails the pass; a Secret that cannot be written
/// or deleted is a problem of its own (reported, tried again next pass), and the others go on.
async fn reconcile(
    client: &Client,
    ca: &CertificateAuthority,
    cluster: &str,
    want: &BTreeMap<ObjectKey, String>,
    validity: Duration,
    problems: &mut BTreeSet<String>,
) -> Result<Pass, String> {
    let listed = Api::<Secret>::all(client.clone())
        .list(&ListParams::default().labels(&format!("{MANAGED_BY}=strait")))
        .await
        .map_err(|e| format!("cannot list the identity Secrets ({MANAGED_BY}=strait): {e}"))?;
    let mut have: BTreeMap<ObjectKey, Secret> = BTreeMap::new();
    for s in listed.items {
        if let (Some(ns), Some(name)) = (s.metadata.namespace.clone(), s.metadata.name.clone())
            && let Some(sa) = name.strip_prefix(SECRET_PREFIX)
        {
            have.insert((ns, sa.to_string()), s);
        }
    }
    let mut pass = Pass::default();
    let mut now_problems = BTreeSet::new();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let earliest = |n: &mut Option<i64>, at: i64| *n = Some(n.map_or(at, |n| n.min(at)));
    for ((ns, sa), uid) in want {
        let id = match SpiffeId::workload(ca.trust_domain(), cluster, ns, sa) {
            Ok(id) => id,
            Err(e) => {
                now_problems.insert(format!("ServiceAccount {ns}/{sa}: {e}; no identity issued"));
                continue;
            }
        };
        let name = format!("{SECRET_PREFIX}{sa}");
        if name.len() > 253 {
            now_problems.insert(format!(
                "ServiceAccount {ns}/{sa}: the Secret name `{name}` is longer than 253 characters; no identity issued"
            ));
            continue;
        }
        let api = Api::<Secret>::namespaced(client.clone(), ns);
        let managed = have.get(&(ns.clone(), sa.clone()));
        if managed.is_none() {
            // A Secret of that name that is not Strait's (made by hand, say) is left alone.
            match api.get_opt(&name).await {
                Ok(None) => {}
                Ok(Some(_)) => {
                    now_problems.insert(format!(
                        "Secret {ns}/{name} exists and is not Strait's (no label {MANAGED_BY}=strait); left alone — label it or delete it to have the identity issued"
                    ));
                    continue;
                }
                Err(e) => {
                    now_problems.insert(format!("Secret {ns}/{name}: cannot read: {e}"));
                    pass.failed = true;
                    continue;
                }
            }
        }
        let held = managed.and_then(Held::of);
        let id_text = id.to_string();
        let now = unix(SystemTime::now());
        let Some(reason) = renewal_due(
            held.as_ref(),
            &id_text,
            uid,
            ca.ca_cert_pem(),
            now,
            validity,
        ) else {
            if let Some(h) = &held {
                earliest(&mut pass.next_renewal, renew_at(h.not_after_unix, validity));
            }
            continue;
        };
        let cert = match ca.issue(&id, validity) {
            Ok(c) => c,
            Err(e) => {
                now_problems.insert(format!("ServiceAccount {ns}/{sa}: cannot issue: {e}"));
                continue;
            }
        };
        let secret = secret_for(ns, sa, uid, &cert);
        if let Err(e) = api.patch(&name, &params, &Patch::Apply(&secret)).await {
            now_problems.insert(format!("Secret {ns}/{name}: cannot write: {e}"));
            pass.failed = true;
            continue;
        }
        tracing::info!(namespace = %ns, service_account = %sa, identity = %id_text, reason,
            "workload identity issued");
        if let Ok(info) = inspect_pem(cert.cert_pem()) {
            earliest(
                &mut pass.next_renewal,
                renew_at(info.not_after_unix, validity),
            );
        }
        pass.written += 1;
    }
    for (ns, sa) in have.keys() {
        if !want.contains_key(&(ns.clone(), sa.clone())) {
            let name = format!("{SECRET_PREFIX}{sa}");
            match Api::<Secret>::namespaced(client.clone(), ns)
                .delete(&name, &DeleteParams::default())
                .await
            {
                Ok(_) => {
                    tracing::info!(namespace = %ns, secret = %name, "workload identity withdrawn");
                    pass.deleted += 1;
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => {
                    now_problems.insert(format!("Secret {ns}/{name}: cannot delete: {e}"));
                    pass.failed = true;
                }
            }
        }
    }
    for p in now_problems.difference(problems) {
        tracing::warn!("workload identities: {p}");
    }
    *problems = now_problems;
    Ok(pass)
}

/// Whether a namespace has injection enabled (and is not being deleted).
fn enabled(ns: &Namespace) -> bool {
    ns.metadata.deletion_timestamp.is_none()
        && ns
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(NAMESPACE_LABEL))
            .is_some_and(|v| v == "enabled")
}

enum Event {
    Namespace(Box<Result<watcher::Event<Namespace>, watcher::Error>>),
    Account(Box<Result<watcher::Event<ServiceAccount>, watcher::Error>>),
}

/// Keep the identity Secrets of the cluster's injected namespaces until `stop`. `ca` is read
/// at every pass (a rotated CA is picked up); `first_ca` is the one read at start.
pub async fn follow_identities(
    client: Client,
    cluster: String,
    cfg: IdentitiesConfig,
    first_ca: CertificateAuthority,
    coalesce: Duration,
    stop: CancellationToken,
) {
    let streams: Vec<futures::stream::BoxStream<'static, Event>> = vec![
        watcher(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .map(|r| Event::Namespace(Box::new(r)))
        .boxed(),
        watcher(
            Api::<ServiceAccount>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .map(|r| Event::Account(Box::new(r)))
        .boxed(),
    ];
    let mut events = futures::stream::select_all(streams);
    let mut namespaces: BTreeMap<String, bool> = BTreeMap::new();
    let mut accounts: BTreeMap<ObjectKey, String> = BTreeMap::new();
    let mut ns_relist: Relist<String, bool> = Relist::default();
    let mut sa_relist: Relist<ObjectKey, String> = Relist::default();
    let mut ca = first_ca;
    let mut stamp = ca_stamp(&cfg.ca);
    let mut ca_problem: Option<String> = None;
    let mut problems = BTreeSet::new();
    let mut retry = Duration::from_millis(500);
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(timer);
    let mut due = false;
    let mut retrying = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            e = events.next() => {
                let Some(e) = e else { return };
                let changed = match e {
                    Event::Namespace(r) => match *r {
                        Ok(e) => ns_relist.apply(&mut namespaces, e, |n: Namespace| {
                            Some((n.metadata.name.clone()?, enabled(&n)))
                        }),
                        Err(e) => { super::source::warn("Namespaces", &e); continue }
                    },
                    Event::Account(r) => match *r {
                        Ok(e) => sa_relist.apply(&mut accounts, e, |a: ServiceAccount| {
                            let m = &a.metadata;
                            Some(((m.namespace.clone()?, m.name.clone()?), m.uid.clone().unwrap_or_default()))
                        }),
                        Err(e) => { super::source::warn("ServiceAccounts", &e); continue }
                    },
                };
                // While retrying, the back-off holds: a change is taken by the next try.
                if changed && !due && !retrying {
                    due = true;
                    timer.as_mut().reset(tokio::time::Instant::now() + coalesce);
                }
            }
            () = &mut timer => {
                due = false;
                if !(ns_relist.synced && sa_relist.synced) {
                    timer.as_mut().reset(tokio::time::Instant::now() + RESYNC);
                    continue;
                }
                let now_stamp = ca_stamp(&cfg.ca);
                if now_stamp != stamp {
                    match CertificateAuthority::load(&cfg.ca) {
                        Ok(c) => {
                            if c.ca_cert_pem() != ca.ca_cert_pem() {
                                tracing::info!(ca = %cfg.ca.display(), "workload CA changed; identities will be issued again");
                            }
                            ca = c;
                            stamp = now_stamp;
                            ca_problem = None;
                        }
                        Err(e) => {
                            let text = e.to_string();
                            if ca_problem.as_deref() != Some(text.as_str()) {
                                tracing::error!(error = %text, "cannot read the workload CA; keeping the last good one");
                            }
                            ca_problem = Some(text);
                        }
                    }
                }
                let want: BTreeMap<ObjectKey, String> = accounts
                    .iter()
                    .filter(|((ns, _), _)| namespaces.get(ns).copied().unwrap_or(false))
                    .map(|(k, uid)| (k.clone(), uid.clone()))
                    .collect();
                match reconcile(&client, &ca, &cluster, &want, cfg.validity, &mut problems).await {
                    Ok(pass) if pass.failed => {
                        retrying = true;
                        timer.as_mut().reset(tokio::time::Instant::now() + retry);
                        retry = (retry * 2).min(Duration::from_secs(30));
                    }
                    Ok(pass) => {
                        if pass.written + pass.deleted > 0 {
                            tracing::info!(written = pass.written, deleted = pass.deleted,
                                identities = want.len(), "workload identities in step");
                        }
                        retrying = false;
                        retry = Duration::from_millis(500);
                        let mut next = tokio::time::Instant::now() + RESYNC;
                        if let Some(at) = pass.next_renewal {
                            let wait = at.saturating_sub(unix(SystemTime::now())).max(1);
                            let wait = Duration::from_secs(u64::try_from(wait).unwrap_or(1));
                            next = next.min(tokio::time::Instant::now() + wait);
                        }
                        timer.as_mut().reset(next);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?retry, "workload identities: retrying");
                        retrying = true;
                        timer.as_mut().reset(tokio::time::Instant::now() + retry);
                        retry = (retry * 2).min(Duration::from_secs(30));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_when_missing_foreign_rotated_or_in_the_last_third() {
        let ca = CertificateAuthority::init("td.example", Duration::from_secs(86400)).unwrap();
        let id = SpiffeId::workload("td.example", "east", "shop", "web").unwrap();
        let validity = Duration::from_secs(3 * 3600);
        let cert = ca.issue(&id, validity).unwrap();
        let secret = secret_for("shop", "web", "uid-1", &cert);
        assert_eq!(secret.metadata.name.as_deref(), Some("strait-identity-web"));
        assert_eq!(
            secret.metadata.owner_references.as_ref().unwrap()[0].uid,
            "uid-1"
        );
        let held = Held::of(&secret).expect("readable");
        let id_text = id.to_string();
        let now = unix(SystemTime::now());
        let due = |held: Option<&Held>, id: &str, uid: &str, ca_pem: &str, at: i64| {
            renewal_due(held, id, uid, ca_pem, at, validity)
        };
        assert_eq!(
            due(Some(&held), &id_text, "uid-1", ca.ca_cert_pem(), now),
            None
        );
        assert_eq!(
            due(None, &id_text, "uid-1", ca.ca_cert_pem(), now),
            Some("missing or unreadable")
        );
        assert_eq!(
            due(Some(&held), &id_text, "uid-2", ca.ca_cert_pem(), now),
            Some("the account was recreated")
        );
        let other = SpiffeId::workload("td.example", "east", "shop", "db")
            .unwrap()
            .to_string();
        assert_eq!(
            due(Some(&held), &other, "uid-1", ca.ca_cert_pem(), now),
            Some("another identity")
        );
        let rotated = CertificateAuthority::init("td.example", Duration::from_secs(86400)).unwrap();
        assert_eq!(
            due(Some(&held), &id_text, "uid-1", rotated.ca_cert_pem(), now),
            Some("another CA")
        );
        // Two hours on (of three), a third is left: due.
        assert_eq!(
            due(
                Some(&held),
                &id_text,
                "uid-1",
                ca.ca_cert_pem(),
                now + 2 * 3600 + 60
            ),
            Some("expiring")
        );
        assert_eq!(
            due(Some(&held), &id_text, "uid-1", ca.ca_cert_pem(), now + 3600),
            None
        );
        // A Secret whose certificate is garbage is unreadable.
        let mut broken = secret;
        broken
            .data
            .as_mut()
            .unwrap()
            .insert("cert.pem".into(), ByteString(b"garbage".to_vec()));
        assert_eq!(Held::of(&broken), None);
    }
}
