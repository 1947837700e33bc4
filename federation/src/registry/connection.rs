//! How a component reaches etcd: the endpoints, TLS (a CA to verify etcd, optionally a client
//! certificate) and credentials (a user and a password file). The same settings come from the
//! `registry:` section of every YAML configuration ([`RegistryConfig`]) and from the CLI's
//! `--etcd*` flags; both are checked by [`EtcdConnection::validate`], which names the offending
//! field in the caller's terms ([`Field`]).
//!
//! Secrets stay in files: the password is read from `password_file` when a connection is made
//! (and again when the file changes), never kept in a configuration value, printed by `Debug`, or
//! logged.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// TLS towards etcd (`https://` endpoints).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTls {
    /// PEM bundle of the CA(s) that sign etcd's server certificate. Required: Strait never
    /// trusts etcd without a way to verify it.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM, leaf first) for etcd's `--client-cert-auth`; with authentication
    /// on, its common name is the etcd user.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[serde(default)]
    pub key: Option<PathBuf>,
}

/// Password authentication (etcd's users). The password lives in a file only.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdAuth {
    pub user: String,
    /// A file holding the password (one line; a trailing newline is ignored).
    pub password_file: PathBuf,
}

/// Endpoints, TLS and credentials: everything needed to open a connection to etcd.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdConnection {
    /// Client URLs (`http://HOST:PORT` or `https://HOST:PORT`); several for a cluster of members.
    pub endpoints: Vec<String>,
    pub tls: Option<EtcdTls>,
    pub auth: Option<EtcdAuth>,
}

/// A setting of an [`EtcdConnection`], so that errors name it the way the user wrote it
/// (`registry.tls.ca` in a YAML file, `--etcd-ca` on the command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Endpoints,
    Tls,
    TlsCa,
    TlsCert,
    TlsKey,
    AuthUser,
    AuthPasswordFile,
}

impl Field {
    /// The field's path in a YAML `registry:` section.
    pub fn yaml(self) -> &'static str {
        match self {
            Field::Endpoints => "registry.etcd",
            Field::Tls => "registry.tls",
            Field::TlsCa => "registry.tls.ca",
            Field::TlsCert => "registry.tls.cert",
            Field::TlsKey => "registry.tls.key",
            Field::AuthUser => "registry.auth.user",
            Field::AuthPasswordFile => "registry.auth.password_file",
        }
    }

    /// The command-line flag.
    pub fn flag(self) -> &'static str {
        match self {
            Field::Endpoints => "--etcd",
            Field::Tls => "--etcd-ca",
            Field::TlsCa => "--etcd-ca",
            Field::TlsCert => "--etcd-cert",
            Field::TlsKey => "--etcd-key",
            Field::AuthUser => "--etcd-user",
            Field::AuthPasswordFile => "--etcd-password-file",
        }
    }
}

/// A connection setting that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct InvalidConnection {
    pub field: Field,
    pub reason: String,
}

/// Whether the endpoints speak TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl EtcdConnection {
    /// Plaintext endpoints without credentials (tests, the lab on loopback).
    pub fn plain(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            tls: None,
            auth: None,
        }
    }

    /// The endpoints as shown in messages.
    pub fn shown(&self) -> String {
        self.endpoints.join(",")
    }

    /// Check the settings without touching the files: endpoints of one scheme, `https://` with a
    /// CA to verify etcd, TLS settings only with `https://`, a certificate with its key, a user
    /// with a password file.
    pub fn validate(&self) -> Result<Scheme, InvalidConnection> {
        let bad = |field, reason: String| Err(InvalidConnection { field, reason });
        if self.endpoints.is_empty() {
            return bad(Field::Endpoints, "no etcd endpoint given".into());
        }
        let mut scheme = None;
        for e in &self.endpoints {
            let (s, rest) = if let Some(r) = e.strip_prefix("https://") {
                (Scheme::Https, r)
            } else if let Some(r) = e.strip_prefix("http://") {
                (Scheme::Http, r)
            } else {
                return bad(
                    Field::Endpoints,
                    format!("`{e}`: expected http://HOST:PORT or https://HOST:PORT"),
                );
            };
            let rest = rest.strip_suffix('/').unwrap_or(rest);
            let port_ok = rest
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok || rest.contains('/') {
                return bad(
                    Field::Endpoints,
                    format!("`{e}`: expected http://HOST:PORT or https://HOST:PORT"),
                );
            }
            match scheme {
                None => scheme = Some(s),
                Some(first) if first != s => {
                    return bad(
                        Field::Endpoints,
                        format!(
                            "`{e}`: every endpoint must use the same scheme (mixing http:// and https:// would send credentials in the clear)"
                        ),
                    );
                }
                Some(_) => {}
            }
        }
        let scheme = scheme.unwrap_or(Scheme::Http);
        match (scheme, &self.tls) {
            (Scheme::Http, Some(_)) => {
                return bad(
                    Field::Tls,
                    format!(
                        "TLS settings need https:// endpoints, but `{}` is plaintext",
                        self.endpoints[0]
                    ),
                );
            }
            (Scheme::Https, None) => {
                return bad(
                    Field::TlsCa,
                    format!(
                        "`{}` is TLS: give the CA that signs etcd's certificate, to verify it",
                        self.endpoints[0]
                    ),
                );
            }
            (Scheme::Https, Some(t)) => {
                if t.ca.is_none() {
                    return bad(
                        Field::TlsCa,
                        format!(
                            "`{}` is TLS: give the CA that signs etcd's certificate, to verify it",
                            self.endpoints[0]
                        ),
                    );
                }
                match (&t.cert, &t.key) {
                    (Some(_), None) => {
                        return bad(
                            Field::TlsKey,
                            "a client certificate needs its private key".into(),
                        );
                    }
                    (None, Some(_)) => {
                        return bad(
                            Field::TlsCert,
                            "a private key without its client certificate".into(),
                        );
                    }
                    _ => {}
                }
            }
            (Scheme::Http, None) => {}
        }
        if let Some(a) = &self.auth {
            if a.user.trim().is_empty() {
                return bad(Field::AuthUser, "the etcd user name is empty".into());
            }
            if a.password_file.as_os_str().is_empty() {
                return bad(
                    Field::AuthPasswordFile,
                    "give the file that holds the password".into(),
                );
            }
        }
        Ok(scheme)
    }

    /// Make relative file paths relative to `base` (the directory of the configuration file).
    pub fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(t) = &mut self.tls {
            for p in [&mut t.ca, &mut t.cert, &mut t.key].into_iter().flatten() {
                fix(p);
            }
        }
        if let Some(a) = &mut self.auth {
            fix(&mut a.password_file);
        }
    }

    /// Every file the connection reads (re-read when one of them changes).
    pub fn files(&self) -> Vec<&Path> {
        let mut out = Vec::new();
        if let Some(t) = &self.tls {
            out.extend(
                [&t.ca, &t.cert, &t.key]
                    .into_iter()
                    .flatten()
                    .map(|p| p.as_path()),
            );
        }
        if let Some(a) = &self.auth {
            out.push(a.password_file.as_path());
        }
        out
    }
}

/// The `registry:` section of the control plane's and the gateway's configuration.
///
/// ```yaml
/// registry:
///   etcd: ["https://etcd-0.example:2379", "https://etcd-1.example:2379", "https://etcd-2.example:2379"]
///   tls: {ca: etcd/ca.pem, cert: etcd/client.pem, key: etcd/client-key.pem}
///   auth: {user: strait-cluster-east, password_file: etcd/password}   # or the certificate's CN
///   lease_ttl: 10s
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// etcd client URLs.
    #[serde(default)]
    pub etcd: Vec<String>,
    /// An in-process registry instead (a single cluster, or tests; the control plane only).
    #[serde(default)]
    pub embedded: bool,
    #[serde(default)]
    pub tls: Option<EtcdTls>,
    #[serde(default)]
    pub auth: Option<EtcdAuth>,
    /// TTL of the lease over what this component publishes.
    #[serde(default = "default_lease_ttl", with = "crate::config::duration_field")]
    pub lease_ttl: Duration,
    /// A cluster whose entries left the registry without being withdrawn (its control plane
    /// went silent) is still served — its last endpoints, marked stale — while its gateway link
    /// is up, and still a member of the federation for the gateways, for at most this long.
    #[serde(
        default = "default_stale_bound",
        with = "crate::config::duration_field"
    )]
    pub stale_bound: Duration,
}

fn default_lease_ttl() -> Duration {
    Duration::from_secs(10)
}

/// Default of [`RegistryConfig::stale_bound`].
pub fn default_stale_bound() -> Duration {
    Duration::from_secs(600)
}

impl RegistryConfig {
    /// The etcd connection these settings describe.
    pub fn connection(&self) -> EtcdConnection {
        EtcdConnection {
            endpoints: self.etcd.clone(),
            tls: self.tls.clone(),
            auth: self.auth.clone(),
        }
    }

    /// Check the section and make its paths relative to the configuration file's directory
    /// `base`. `allow_embedded`: whether `embedded: true` is a choice for this component.
    /// Errors name the field as written (`registry.tls.ca`).
    pub fn check(
        &mut self,
        base: &Path,
        allow_embedded: bool,
    ) -> Result<(), (&'static str, String)> {
        match (self.etcd.is_empty(), self.embedded) {
            (true, false) if allow_embedded => {
                return Err((
                    "registry",
                    "give `etcd: [URL, …]` or `embedded: true`".into(),
                ));
            }
            (true, false) => {
                return Err(("registry.etcd", "give `etcd: [URL, …]`".into()));
            }
            (_, true) if !allow_embedded => {
                return Err((
                    "registry.embedded",
                    "this component needs etcd: give `etcd: [URL, …]`".into(),
                ));
            }
            (false, true) => {
                return Err((
                    "registry",
                    "`etcd` and `embedded` exclude each other".into(),
                ));
            }
            (true, true) => {
                if self.tls.is_some() || self.auth.is_some() {
                    return Err((
                        "registry",
                        "`tls` and `auth` are settings of etcd, not of the embedded registry"
                            .into(),
                    ));
                }
                return Ok(());
            }
            (false, false) => {}
        }
        let mut conn = self.connection();
        conn.validate().map_err(|e| (e.field.yaml(), e.reason))?;
        conn.resolve_paths(base);
        self.tls = conn.tls;
        self.auth = conn.auth;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(endpoints: &[&str], tls: Option<EtcdTls>, auth: Option<EtcdAuth>) -> EtcdConnection {
        EtcdConnection {
            endpoints: endpoints.iter().map(|s| s.to_string()).collect(),
            tls,
            auth,
        }
    }

    fn ca_only() -> EtcdTls {
        EtcdTls {
            ca: Some("ca.pem".into()),
            ..EtcdTls::default()
        }
    }

    #[test]
    fn valid_connections() {
        assert_eq!(
            conn(&["http://127.0.0.1:2379"], None, None).validate(),
            Ok(Scheme::Http)
        );
        assert_eq!(
            conn(
                &["https://etcd-0:2379", "https://etcd-1:2379"],
                Some(ca_only()),
                None
            )
            .validate(),
            Ok(Scheme::Https)
        );
        let full = EtcdTls {
            ca: Some("ca.pem".into()),
            cert: Some("c.pem".into()),
            key: Some("k.pem".into()),
        };
        let auth = EtcdAuth {
            user: "strait-cluster-east".into(),
            password_file: "pw".into(),
        };
        assert_eq!(
            conn(&["https://[::1]:2379"], Some(full), Some(auth.clone())).validate(),
            Ok(Scheme::Https)
        );
        // Credentials over plaintext are allowed (a lab on loopback), TLS settings are not.
        assert_eq!(
            conn(&["http://127.0.0.1:2379"], None, Some(auth)).validate(),
            Ok(Scheme::Http)
        );
    }

    #[test]
    fn invalid_connections_name_their_field() {
        let field = |c: EtcdConnection| c.validate().unwrap_err().field;
        assert_eq!(field(conn(&[], None, None)), Field::Endpoints);
        assert_eq!(
            field(conn(&["127.0.0.1:2379"], None, None)),
            Field::Endpoints
        );
        assert_eq!(
            field(conn(&["http://127.0.0.1"], None, None)),
            Field::Endpoints
        );
        assert_eq!(field(conn(&["http://:2379"], None, None)), Field::Endpoints);
        assert_eq!(
            field(conn(&["http://a:1", "https://b:2"], Some(ca_only()), None)),
            Field::Endpoints
        );
        assert_eq!(
            field(conn(&["http://a:2379"], Some(ca_only()), None)),
            Field::Tls
        );
        assert_eq!(field(conn(&["https://a:2379"], None, None)), Field::TlsCa);
        assert_eq!(
            field(conn(&["https://a:2379"], Some(EtcdTls::default()), None)),
            Field::TlsCa
        );
        let cert_only = EtcdTls {
            cert: Some("c.pem".into()),
            ..ca_only()
        };
        assert_eq!(
            field(conn(&["https://a:2379"], Some(cert_only), None)),
            Field::TlsKey
        );
        let key_only = EtcdTls {
            key: Some("k.pem".into()),
            ..ca_only()
        };
        assert_eq!(
            field(conn(&["https://a:2379"], Some(key_only), None)),
            Field::TlsCert
        );
        let no_user = EtcdAuth {
            user: " ".into(),
            password_file: "pw".into(),
        };
        assert_eq!(
            field(conn(&["http://a:2379"], None, Some(no_user))),
            Field::AuthUser
        );
        let e = conn(&["https://a:2379"], None, None)
            .validate()
            .unwrap_err();
        assert_eq!(e.field.yaml(), "registry.tls.ca");
        assert_eq!(e.field.flag(), "--etcd-ca");
        assert!(e.reason.contains("https://a:2379"), "{}", e.reason);
    }

    #[test]
    fn paths_are_made_relative_to_the_file() {
        let mut c = conn(
            &["https://a:2379"],
            Some(EtcdTls {
                ca: Some("etcd/ca.pem".into()),
                cert: Some("/abs/c.pem".into()),
                key: Some("k.pem".into()),
            }),
            Some(EtcdAuth {
                user: "u".into(),
                password_file: "pw".into(),
            }),
        );
        c.resolve_paths(Path::new("/etc/strait"));
        let files: Vec<_> = c.files().iter().map(|p| p.display().to_string()).collect();
        assert_eq!(
            files,
            [
                "/etc/strait/etcd/ca.pem",
                "/abs/c.pem",
                "/etc/strait/k.pem",
                "/etc/strait/pw"
            ]
        );
    }
}
