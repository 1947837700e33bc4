//! The `--etcd` flag and the connection every registry-reading command makes.

use anyhow::Context;
use federation::registry::Backend;
use federation::registry::etcd::{EtcdBackend, EtcdOptions};

/// `--etcd URL[,URL…]` (or `$STRAIT_ETCD`), defaulting to a local etcd.
#[derive(clap::Args, Debug)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated (`http://HOST:PORT`).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379",
        env = "STRAIT_ETCD"
    )]
    pub etcd: Vec<String>,
}

impl EtcdArgs {
    /// The endpoints as they appear in messages.
    pub fn list(&self) -> String {
        self.etcd.join(",")
    }

    pub async fn connect(&self) -> anyhow::Result<Backend> {
        connect(&self.etcd).await
    }
}

/// Connect to etcd; the error names the endpoints.
pub async fn connect(etcd: &[String]) -> anyhow::Result<Backend> {
    let b = EtcdBackend::connect(etcd, EtcdOptions::default())
        .await
        .with_context(|| format!("cannot connect to etcd at {}", etcd.join(",")))?;
    Ok(Backend::Etcd(b))
}
