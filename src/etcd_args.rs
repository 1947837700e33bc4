//! The `--etcd*` flags every registry command takes, and the connection they make.
//!
//! The flags have the environment variables of etcdctl's `ETCDCTL_*`, with our prefix:
//! `STRAIT_ETCD`, `STRAIT_ETCD_CA`, `STRAIT_ETCD_CERT`, `STRAIT_ETCD_KEY`, `STRAIT_ETCD_USER`,
//! `STRAIT_ETCD_PASSWORD_FILE`. A password is only ever read from a file.

use std::path::PathBuf;

use anyhow::Context;
use federation::registry::Backend;
use federation::registry::connection::{EtcdAuth, EtcdConnection, EtcdTls};
use federation::registry::etcd::{EtcdBackend, EtcdOptions};

/// Where etcd is and how to talk to it.
#[derive(clap::Args, Debug, Clone)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated (`http://HOST:PORT`, or `https://HOST:PORT` with
    /// `--etcd-ca`).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379",
        env = "STRAIT_ETCD"
    )]
    pub etcd: Vec<String>,
    /// PEM file of the CA that signs etcd's server certificate (for `https://`).
    #[arg(long, env = "STRAIT_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's `--client-cert-auth`; with authentication on, its
    /// common name is the etcd user.
    #[arg(long, env = "STRAIT_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "STRAIT_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,
    /// etcd user (password authentication; needs `--etcd-password-file`).
    #[arg(long, env = "STRAIT_ETCD_USER", requires = "etcd_password_file")]
    pub etcd_user: Option<String>,
    /// File holding the etcd user's password (never give a password on the command line).
    #[arg(long, env = "STRAIT_ETCD_PASSWORD_FILE", requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
}

impl EtcdArgs {
    /// The endpoints as they appear in messages.
    pub fn list(&self) -> String {
        self.etcd.join(",")
    }

    /// The connection the flags describe, checked (errors name the flag).
    pub fn connection(&self) -> anyhow::Result<EtcdConnection> {
        let tls = (self.etcd_ca.is_some() || self.etcd_cert.is_some() || self.etcd_key.is_some())
            .then(|| EtcdTls {
                ca: self.etcd_ca.clone(),
                cert: self.etcd_cert.clone(),
                key: self.etcd_key.clone(),
            });
        let auth = match (&self.etcd_user, &self.etcd_password_file) {
            (Some(user), Some(password_file)) => Some(EtcdAuth {
                user: user.clone(),
                password_file: password_file.clone(),
            }),
            _ => None,
        };
        let conn = EtcdConnection {
            endpoints: self.etcd.clone(),
            tls,
            auth,
        };
        conn.validate()
            .map_err(|e| anyhow::anyhow!("{}: {}", e.field.flag(), e.reason))?;
        Ok(conn)
    }

    /// The etcd backend for these flags (not dialled yet).
    pub fn backend(&self) -> anyhow::Result<EtcdBackend> {
        Ok(EtcdBackend::open(
            self.connection()?,
            EtcdOptions::default(),
        )?)
    }

    /// Connect and check that etcd answers and accepts the credentials; the error names the
    /// endpoints and the cause on one line.
    pub async fn connect(&self) -> anyhow::Result<Backend> {
        let b = self.backend()?;
        b.check()
            .await
            .with_context(|| format!("cannot use etcd at {}", self.list()))?;
        Ok(Backend::Etcd(b))
    }
}
