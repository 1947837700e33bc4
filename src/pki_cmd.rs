//! `strait pki`: create the federation CA, issue gateway and workload certificates, inspect
//! certificates. See docs/pki.md.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use federation::identity::{
    self, CA_CERT_FILE, CA_KEY_FILE, CertificateAuthority, IssuedPaths, SpiffeId,
};

/// `strait pki` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum PkiCommand {
    /// Create the federation root CA: DIR/ca.pem and DIR/ca.key (mode 0600).
    Init {
        /// Trust domain of the federation, e.g. `prod.example.org` (lowercase DNS name).
        #[arg(long, value_name = "TD")]
        trust_domain: String,
        /// Directory to write ca.pem and ca.key to (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// How long the CA is valid, e.g. `87600h` (10 years) or `5years`.
        #[arg(long, default_value = "87600h", value_parser = parse_validity)]
        validity: Duration,
        /// Replace an existing CA in DIR. Every certificate it issued stops verifying.
        #[arg(long)]
        force: bool,
    },
    /// Issue a gateway or workload certificate signed by the CA.
    Issue {
        #[command(subcommand)]
        kind: IssueKind,
    },
    /// Every certificate in reach, with its identity and expiry: the PEM files under each
    /// directory (recursively) or named directly. Fails when one has expired or expires within
    /// `--warn` (default 7 days), so that it can run as a check.
    Status {
        /// Directories to search and files to read (e.g. the lab's certs/, /etc/strait).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Flag certificates that expire within this long.
        #[arg(long, default_value = "7d", value_parser = parse_validity)]
        warn: Duration,
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show the identity, role and validity of a certificate (the first one of a PEM file).
    Inspect {
        /// PEM file, e.g. cert.pem or ca.pem.
        file: PathBuf,
        /// Print JSON instead of `key: value` lines.
        #[arg(long)]
        json: bool,
    },
}

/// What to issue.
#[derive(Debug, clap::Subcommand)]
pub enum IssueKind {
    /// Certificate of a cluster's east-west gateway: spiffe://TD/cluster/C/gateway.
    Gateway {
        /// Cluster name (DNS label).
        #[arg(long)]
        cluster: String,
        #[command(flatten)]
        common: IssueArgs,
    },
    /// Certificate of a workload: spiffe://TD/cluster/C/ns/NS/sa/SA.
    Workload {
        /// Cluster name (DNS label).
        #[arg(long)]
        cluster: String,
        /// Namespace (DNS label).
        #[arg(long)]
        namespace: String,
        /// Service account (DNS label).
        #[arg(long)]
        service_account: String,
        #[command(flatten)]
        common: IssueArgs,
    },
}

/// Options shared by `issue gateway` and `issue workload`.
#[derive(Debug, clap::Args)]
pub struct IssueArgs {
    /// Directory holding the CA (ca.pem, ca.key), as written by `strait pki init`.
    #[arg(long, value_name = "DIR")]
    ca: PathBuf,
    /// Directory to write cert.pem (leaf then CA), key.pem (mode 0600) and ca.pem to.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// How long the certificate is valid, e.g. `24h` or `30d`.
    #[arg(long, default_value = "24h", value_parser = parse_validity)]
    validity: Duration,
    /// Also a DNS name SAN (repeatable), for clients that check host names (e.g. curl against
    /// a gateway's ingress). The SPIFFE ID stays the identity.
    #[arg(long = "dns", value_name = "NAME")]
    dns: Vec<String>,
    /// Also an IP address SAN (repeatable).
    #[arg(long = "ip", value_name = "ADDR")]
    ip: Vec<std::net::IpAddr>,
}

fn parse_validity(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e}"))?;
    if d.is_zero() {
        return Err("the validity must be longer than zero".into());
    }
    Ok(d)
}

/// Runs a `strait pki` subcommand.
pub fn run(cmd: PkiCommand) -> anyhow::Result<()> {
    match cmd {
        PkiCommand::Init {
            trust_domain,
            out,
            validity,
            force,
        } => init(&trust_domain, &out, validity, force),
        PkiCommand::Issue {
            kind: IssueKind::Gateway { cluster, common },
        } => issue(&common, |td| SpiffeId::gateway(td, &cluster)),
        PkiCommand::Issue {
            kind:
                IssueKind::Workload {
                    cluster,
                    namespace,
                    service_account,
                    common,
                },
        } => issue(&common, |td| {
            SpiffeId::workload(td, &cluster, &namespace, &service_account)
        }),
        PkiCommand::Inspect { file, json } => inspect(&file, json),
        PkiCommand::Status { paths, warn, json } => status(&paths, warn, json),
    }
}

/// Every `.pem` file under `path` (or `path` itself).
fn pem_files(path: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    if meta.is_file() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("{}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for e in entries {
        if e.is_dir() {
            pem_files(&e, out)?;
        } else if e.extension().is_some_and(|x| x == "pem" || x == "crt") {
            out.push(e);
        }
    }
    Ok(())
}

/// Writes a command's report; a reader that went away (`| head`) is not an error.
fn write_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn status(paths: &[PathBuf], warn: Duration, json: bool) -> anyhow::Result<()> {
    let mut files = Vec::new();
    for p in paths {
        pem_files(p, &mut files)?;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let mut rows = Vec::new();
    let mut trouble = 0usize;
    for f in &files {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        // Key files and other PEM blocks are not certificates.
        if !text.contains("-----BEGIN CERTIFICATE-----") {
            continue;
        }
        let info = match identity::inspect_pem(&text) {
            Ok(i) => i,
            Err(e) => {
                rows.push(serde_json::json!({"file": f, "error": e.to_string()}));
                trouble += 1;
                continue;
            }
        };
        let left = info.not_after_unix - now;
        let state = if info.expired {
            "EXPIRED"
        } else if left < warn.as_secs() as i64 {
            "EXPIRES SOON"
        } else {
            "ok"
        };
        if state != "ok" {
            trouble += 1;
        }
        rows.push(serde_json::json!({
            "file": f,
            "role": info.role.as_str(),
            "identity": info.identity.clone().unwrap_or_else(|| info.subject.clone()),
            "not_after": info.not_after,
            "seconds_left": left.max(0),
            "state": state,
        }));
    }
    let mut out = String::new();
    if json {
        out.push_str(&serde_json::to_string_pretty(&rows)?);
        out.push('\n');
    } else {
        use std::fmt::Write as _;
        let _ = writeln!(
            out,
            "{:<14} {:<22} {:>9} {:<6} IDENTITY — FILE",
            "STATE", "NOT AFTER", "DAYS LEFT", "ROLE"
        );
        for r in &rows {
            if let Some(e) = r["error"].as_str() {
                let _ = writeln!(
                    out,
                    "{:<14} {e} — {}",
                    "UNREADABLE",
                    r["file"].as_str().unwrap_or("")
                );
                continue;
            }
            let _ = writeln!(
                out,
                "{:<14} {:<22} {:>9.1} {:<6} {} — {}",
                r["state"].as_str().unwrap_or(""),
                r["not_after"].as_str().unwrap_or(""),
                r["seconds_left"].as_i64().unwrap_or(0) as f64 / 86400.0,
                r["role"].as_str().unwrap_or(""),
                r["identity"].as_str().unwrap_or(""),
                r["file"].as_str().unwrap_or("")
            );
        }
    }
    write_stdout(&out)?;
    if rows.is_empty() {
        anyhow::bail!(
            "no certificate found under {}",
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if trouble > 0 {
        anyhow::bail!(
            "{trouble} certificate(s) expired, expiring within {} or unreadable",
            humantime::format_duration(warn)
        );
    }
    Ok(())
}

fn init(trust_domain: &str, out: &Path, validity: Duration, force: bool) -> anyhow::Result<()> {
    // Validate and check for an existing CA before the (cheap, but pointless) key generation.
    identity::validate_trust_domain(trust_domain)?;
    if !force {
        for name in [CA_CERT_FILE, CA_KEY_FILE] {
            let path = out.join(name);
            if path.symlink_metadata().is_ok() {
                return Err(identity::IdentityError::CaExists { path }.into());
            }
        }
    }
    let ca = CertificateAuthority::init(trust_domain, validity)
        .with_context(|| format!("creating the CA for trust domain `{trust_domain}`"))?;
    ca.write(out, force)?;
    let info = identity::inspect_pem(ca.ca_cert_pem())?;
    println!("created CA for trust domain {trust_domain}");
    println!("identity: {}", identity::trust_domain_id(trust_domain));
    println!("cert: {}", out.join(CA_CERT_FILE).display());
    println!("key: {}", out.join(CA_KEY_FILE).display());
    println!("not_after: {}", info.not_after);
    Ok(())
}

/// Issues the identity `make_id` builds from the CA's trust domain.
fn issue(
    args: &IssueArgs,
    make_id: impl FnOnce(&str) -> Result<SpiffeId, identity::IdentityError>,
) -> anyhow::Result<()> {
    let ca = CertificateAuthority::load(&args.ca)
        .with_context(|| format!("loading the CA from {}", args.ca.display()))?;
    let id = make_id(ca.trust_domain())?;
    let names = identity::ExtraNames {
        dns: args.dns.clone(),
        ips: args.ip.clone(),
    };
    let issued = ca
        .issue_with_names(&id, args.validity, &names)
        .with_context(|| format!("issuing {id}"))?;
    let IssuedPaths { cert, key, ca } = issued.write(&args.out)?;
    let info = identity::inspect_pem(issued.cert_pem())?;
    println!("issued {id}");
    println!("role: {}", id.role());
    println!("cert: {}", cert.display());
    println!("key: {}", key.display());
    println!("ca: {}", ca.display());
    println!("not_after: {}", info.not_after);
    Ok(())
}

fn inspect(file: &Path, json: bool) -> anyhow::Result<()> {
    let pem =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let info =
        identity::inspect_pem(&pem).with_context(|| format!("inspecting {}", file.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        println!("{info}");
    }
    Ok(())
}
