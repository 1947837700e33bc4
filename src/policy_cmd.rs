//! `strait policy apply|list|delete`: failover policies in the registry.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Subcommand;
use federation::model::{FailoverPolicy, PolicyScope, ServiceKey};
use federation::registry::codec::encode_policy;
use federation::registry::{Backend, Decoder, Op, ROOT, RegistryKey, RegistryValue};

use crate::etcd_args::EtcdArgs;

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Validate a policy file and store its policies in the registry (all or nothing).
    Apply {
        /// The policy file (YAML; see docs/routing.md).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Print the policies in the registry.
    List {
        #[command(flatten)]
        etcd: EtcdArgs,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Remove a policy: `default` or `SERVICE.NAMESPACE`.
    Delete {
        scope: String,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
}

pub async fn run(cmd: PolicyCommand) -> anyhow::Result<()> {
    match cmd {
        PolicyCommand::Apply { file, etcd } => apply(file, &etcd).await,
        PolicyCommand::List { etcd, json } => list(&etcd, json).await,
        PolicyCommand::Delete { scope, etcd } => delete(&scope, &etcd).await,
    }
}

async fn apply(file: PathBuf, etcd: &EtcdArgs) -> anyhow::Result<()> {
    // Validate everything before touching the registry.
    let policies = federation::policy_file::load(&file)?;
    let backend = etcd.connect().await?;
    let ops: Vec<Op> = policies
        .iter()
        .map(|p| Op::Put {
            key: RegistryKey::Policy(p.scope.clone()).encode(),
            value: encode_policy(p),
            lease: None,
        })
        .collect();
    let rev = backend
        .commit(ops)
        .await
        .with_context(|| format!("cannot write the policies to etcd at {}", etcd.list()))?;
    for p in &policies {
        println!("policy {} applied", p.scope);
    }
    println!("registry revision {rev}");
    Ok(())
}

async fn read_policies(backend: &Backend, etcd: &EtcdArgs) -> anyhow::Result<Vec<FailoverPolicy>> {
    let prefix = format!("{ROOT}policies/");
    let (_, kvs) = backend
        .get_prefix(&prefix)
        .await
        .with_context(|| format!("cannot read the registry from etcd at {}", etcd.list()))?;
    let mut decoder = Decoder::new();
    let mut out = Vec::new();
    for kv in &kvs {
        let Some(key) = RegistryKey::parse(&kv.key) else {
            eprintln!("warning: {}: not a policy key; skipped", kv.key);
            continue;
        };
        match decoder.decode(&key, &kv.key, &kv.value) {
            Ok(RegistryValue::Policy(p)) => out.push((*p).clone()),
            Ok(_) => eprintln!("warning: {}: not a policy; skipped", kv.key),
            Err(e) => eprintln!("warning: {e}; skipped"),
        }
    }
    Ok(out)
}

async fn list(etcd: &EtcdArgs, json: bool) -> anyhow::Result<()> {
    let backend = etcd.connect().await?;
    let policies = read_policies(&backend, etcd).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&policies)?);
        return Ok(());
    }
    if policies.is_empty() {
        println!("no policies: every service uses the default locality failover");
        return Ok(());
    }
    for p in &policies {
        println!("{}", p.scope);
        if !p.targets.is_empty() {
            let t: Vec<String> = p.targets.iter().map(ToString::to_string).collect();
            println!(
                "  targets: {}{}",
                t.join(", "),
                if p.exclude_others {
                    " (only these)"
                } else {
                    ""
                }
            );
        }
        if !p.failover_priority.is_empty() {
            println!("  failover_priority: {}", p.failover_priority.join(", "));
        }
        for d in &p.distribute {
            let to: Vec<String> = d.to.iter().map(|(k, w)| format!("{k} {w}%")).collect();
            println!("  distribute from {}: {}", d.from, to.join(", "));
        }
        for (i, r) in p.http.iter().enumerate() {
            println!("  http {}: {r}", r.display_name(i));
        }
    }
    Ok(())
}

async fn delete(scope: &str, etcd: &EtcdArgs) -> anyhow::Result<()> {
    let scope = if scope == "default" {
        PolicyScope::Default
    } else {
        PolicyScope::Service(
            ServiceKey::parse("SCOPE", scope).map_err(|e| anyhow::anyhow!("{e} (or `default`)"))?,
        )
    };
    let backend = etcd.connect().await?;
    let existing = read_policies(&backend, etcd).await?;
    if !existing.iter().any(|p| p.scope == scope) {
        bail!("there is no policy for `{scope}`");
    }
    backend
        .commit(vec![Op::Delete {
            key: RegistryKey::Policy(scope.clone()).encode(),
        }])
        .await
        .with_context(|| format!("cannot write to etcd at {}", etcd.list()))?;
    println!("policy {scope} deleted");
    Ok(())
}
