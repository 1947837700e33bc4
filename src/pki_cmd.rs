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
    }
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
