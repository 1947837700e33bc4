//! `strait chaos`: faults injected into a running lab — links cut, healed, degraded (loss,
//! delay, jitter with `tc netem`) and flapped; clusters isolated (from every other cluster and
//! from etcd); components killed (SIGKILL) and restarted — and `chaos run`, timed scenarios under
//! load with a report. See docs/lab.md.

pub mod load;
pub mod report;
pub mod scenario;

use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::lab::state::{Lab, LinkState, Role};
use crate::lab::{self, LabDir};

#[derive(Debug, clap::Args)]
pub struct ChaosArgs {
    #[command(flatten)]
    pub at: LabDir,
    #[command(subcommand)]
    pub cmd: ChaosCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum ChaosCommand {
    #[command(flatten)]
    Action(Action),
    /// Run a scenario (timed steps under load) and write its report.
    Run(scenario::RunArgs),
}

/// One fault, or its repair. Scenario steps are these, written as on the command line.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Action {
    /// Cut the link between A and B (every packet dropped, both ways).
    Cut { a: String, b: String },
    /// Heal the link between A and B; with only A, every link of A; `--all`, every link.
    Heal {
        a: Option<String>,
        b: Option<String>,
        #[arg(long, conflicts_with = "a")]
        all: bool,
    },
    /// Degrade the link between A and B: round-trip loss, added round-trip delay and jitter.
    Degrade {
        a: String,
        b: String,
        /// Round-trip loss, e.g. `30%` (each direction loses 1 - √(1 - L)).
        #[arg(long, value_parser = parse_ratio, default_value = "0%")]
        loss: f64,
        /// Added round-trip delay, e.g. `200ms` (half each way).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "0ms")]
        delay: Duration,
        /// Added round-trip jitter, e.g. `20ms`.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "0ms")]
        jitter: Duration,
    },
    /// Cut and heal the link between A and B in turn (half a period each), for a while.
    Flap {
        a: String,
        b: String,
        /// One cut-and-heal cycle.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
        period: Duration,
        /// How long to flap (the link is healed at the end).
        #[arg(long = "for", value_parser = humantime::parse_duration, default_value = "30s")]
        duration: Duration,
    },
    /// Cut cluster A from every other cluster and from etcd.
    Isolate { a: String },
    /// Kill (SIGKILL) a component: gateway|controlplane A[/REPLICA] (every replica without
    /// one), client A, echo A[/ZONE], etcd [MEMBER|leader].
    Kill {
        #[arg(value_parser = parse_role)]
        role: Role,
        target: Option<String>,
    },
    /// Restart a component as an upgrade does: SIGTERM, wait for it to exit (SIGKILL after
    /// 15 s), start it again and wait until it is ready. `--kill`: SIGKILL instead of SIGTERM.
    Restart {
        #[arg(value_parser = parse_role)]
        role: Role,
        target: Option<String>,
        /// Kill it (SIGKILL) instead of stopping it gracefully.
        #[arg(long)]
        kill: bool,
    },
    /// Stop a component gracefully (SIGTERM; SIGKILL after 15 s) and leave it stopped.
    Stop {
        #[arg(value_parser = parse_role)]
        role: Role,
        target: Option<String>,
    },
    /// Issue every certificate of cluster A anew (gateway, control plane, sidecars), in place:
    /// each component picks the new ones up from its files.
    RotateCerts { a: String },
    /// Start a component that is not running and wait until it is ready.
    Start {
        #[arg(value_parser = parse_role)]
        role: Role,
        target: Option<String>,
    },
}

impl Action {
    /// The action as written on the command line (`cut east west`).
    pub fn describe(&self) -> String {
        match self {
            Action::Cut { a, b } => format!("cut {a} {b}"),
            Action::Heal { all: true, .. } => "heal --all".into(),
            Action::Heal { a, b, .. } => format!(
                "heal {}{}",
                a.as_deref().unwrap_or(""),
                b.as_deref().map(|b| format!(" {b}")).unwrap_or_default()
            ),
            Action::Degrade {
                a,
                b,
                loss,
                delay,
                jitter,
            } => format!(
                "degrade {a} {b} --loss {:.0}% --delay {delay:?} --jitter {jitter:?}",
                loss * 100.0
            ),
            Action::Flap {
                a,
                b,
                period,
                duration,
            } => format!("flap {a} {b} --period {period:?} --for {duration:?}"),
            Action::Isolate { a } => format!("isolate {a}"),
            Action::Kill { role, target } => {
                format!("kill {} {}", role.as_str(), target.as_deref().unwrap_or(""))
                    .trim_end()
                    .to_string()
            }
            Action::Restart { role, target, kill } => format!(
                "restart {} {}{}",
                role.as_str(),
                target.as_deref().unwrap_or(""),
                if *kill { " --kill" } else { "" }
            )
            .replace("  ", " ")
            .trim_end()
            .to_string(),
            Action::RotateCerts { a } => format!("rotate-certs {a}"),
            Action::Stop { role, target } => {
                format!("stop {} {}", role.as_str(), target.as_deref().unwrap_or(""))
                    .trim_end()
                    .to_string()
            }
            Action::Start { role, target } => format!(
                "start {} {}",
                role.as_str(),
                target.as_deref().unwrap_or("")
            )
            .trim_end()
            .to_string(),
        }
    }
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    let (num, scale) = match s.strip_suffix('%') {
        Some(n) => (n, 100.0),
        None => (s, 1.0),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}`: expected a ratio like 30% or 0.3"))?;
    let v = v / scale;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("`{s}`: must be between 0% and 100%"));
    }
    Ok(v)
}

fn parse_role(s: &str) -> Result<Role, String> {
    match s {
        // `etcd-member I` reads as what it is: one member (`etcd I`).
        "etcd" | "etcd-member" => Ok(Role::Etcd),
        "controlplane" => Ok(Role::Controlplane),
        "gateway" => Ok(Role::Gateway),
        "echo" => Ok(Role::Echo),
        "client" => Ok(Role::Client),
        _ => Err(format!(
            "`{s}`: expected gateway, controlplane, client, echo, etcd or etcd-member"
        )),
    }
}

pub async fn run(args: ChaosArgs) -> anyhow::Result<()> {
    match args.cmd {
        ChaosCommand::Action(action) => {
            let mut lab = Lab::load(&args.at.dir)?;
            apply(&mut lab, &action).await?;
            println!("done: {}", action.describe());
            Ok(())
        }
        ChaosCommand::Run(run) => scenario::run(&args.at.dir, run).await,
    }
}

/// Parse a scenario step (`cut east west`) as the command line would.
pub fn parse_step(step: &str) -> anyhow::Result<Action> {
    #[derive(clap::Parser, Debug)]
    #[command(name = "step", no_binary_name = true)]
    struct Step {
        #[command(subcommand)]
        action: Action,
    }
    use clap::Parser as _;
    let words = step.split_whitespace();
    Step::try_parse_from(words)
        .map(|s| s.action)
        .map_err(|e| anyhow::anyhow!("step `{step}`: {}", e.render().to_string().trim()))
}

/// Set one link's state and shape it; the error names the link.
fn set_link(lab: &mut Lab, a: &str, b: &str, state: LinkState) -> anyhow::Result<()> {
    let i = lab.link_index(a, b)?;
    lab.links[i].state = state;
    lab::shape(lab, &lab.links[i]).map_err(|e| anyhow::anyhow!("link {a} ↔ {b}: {e}"))?;
    lab.save()
}

fn check_place(lab: &Lab, p: &str) -> anyhow::Result<()> {
    if p == "etcd" {
        return Ok(());
    }
    lab.cluster(p).map(|_| ())
}

/// Apply one action to the lab (and save its state). `flap` returns when it is over.
pub async fn apply(lab: &mut Lab, action: &Action) -> anyhow::Result<()> {
    match action {
        Action::Cut { a, b } => set_link(lab, a, b, LinkState::Cut),
        Action::Heal { all: true, .. } => {
            for l in lab.links.clone() {
                set_link(lab, &l.a, &l.b, LinkState::Up)?;
            }
            Ok(())
        }
        Action::Heal {
            a: Some(a),
            b: Some(b),
            ..
        } => set_link(lab, a, b, LinkState::Up),
        Action::Heal {
            a: Some(a),
            b: None,
            ..
        } => {
            check_place(lab, a)?;
            for l in lab.links.clone() {
                if l.a == *a || l.b == *a {
                    set_link(lab, &l.a, &l.b, LinkState::Up)?;
                }
            }
            Ok(())
        }
        Action::Heal { a: None, .. } => bail!("heal: name a link (A B), a place (A) or --all"),
        Action::Degrade {
            a,
            b,
            loss,
            delay,
            jitter,
        } => set_link(
            lab,
            a,
            b,
            LinkState::Degraded {
                loss: *loss,
                delay_ms: delay.as_secs_f64() * 1000.0,
                jitter_ms: jitter.as_secs_f64() * 1000.0,
            },
        ),
        Action::Flap {
            a,
            b,
            period,
            duration,
        } => {
            lab.link_index(a, b)?;
            let half = *period / 2;
            let end = tokio::time::Instant::now() + *duration;
            let mut next = tokio::time::Instant::now();
            while next < end {
                set_link(lab, a, b, LinkState::Cut)?;
                next += half;
                tokio::time::sleep_until(next.min(end)).await;
                set_link(lab, a, b, LinkState::Up)?;
                next += half;
                tokio::time::sleep_until(next.min(end)).await;
            }
            set_link(lab, a, b, LinkState::Up)
        }
        Action::Isolate { a } => {
            lab.cluster(a)?;
            for l in lab.links.clone() {
                if l.a == *a || l.b == *a {
                    set_link(lab, &l.a, &l.b, LinkState::Cut)?;
                }
            }
            Ok(())
        }
        Action::Kill { role, target } => {
            let chosen = select(lab, *role, target.as_deref()).await?;
            for i in chosen {
                let p = &mut lab.processes[i];
                if lab::alive(p.pid) {
                    lab::signal(p.pid, "KILL")
                        .map_err(|e| anyhow::anyhow!("killing {}: {e}", p.label()))?;
                }
                p.pid = 0;
            }
            lab.save()
        }
        Action::Restart { role, target, kill } => {
            let chosen = select(lab, *role, target.as_deref()).await?;
            for &i in &chosen {
                let p = &mut lab.processes[i];
                let how = if *kill { "KILL" } else { "TERM" };
                stop_process(p, how).await;
                lab::spawn(p).with_context(|| format!("restarting {}", p.label()))?;
            }
            lab.save()?;
            wait_started(lab, *role, &chosen).await
        }
        Action::RotateCerts { a } => lab::rotate_certificates(lab, a),
        Action::Stop { role, target } => {
            let chosen = select(lab, *role, target.as_deref()).await?;
            for i in chosen {
                let p = &mut lab.processes[i];
                stop_process(p, "TERM").await;
                p.pid = 0;
            }
            lab.save()
        }
        Action::Start { role, target } => {
            let chosen = select(lab, *role, target.as_deref()).await?;
            let mut started = Vec::new();
            for i in chosen {
                let p = &mut lab.processes[i];
                if !lab::alive(p.pid) {
                    lab::spawn(p).with_context(|| format!("starting {}", p.label()))?;
                    started.push(i);
                }
            }
            lab.save()?;
            wait_started(lab, *role, &started).await
        }
    }
}

/// Send `signal` to a running process and wait for it to exit (SIGKILL after 15 s).
async fn stop_process(p: &crate::lab::state::Proc, signal: &str) {
    if !lab::alive(p.pid) {
        return;
    }
    let _ = lab::signal(p.pid, signal);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while lab::alive(p.pid) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if lab::alive(p.pid) {
        tracing::warn!(process = %p.label(), "did not exit within 15 s of SIG{signal}; killing it");
        let _ = lab::signal(p.pid, "KILL");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while lab::alive(p.pid) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Wait until the processes `chosen` (of `role`) answer: one wait per cluster covers them.
async fn wait_started(lab: &Lab, role: Role, chosen: &[usize]) -> anyhow::Result<()> {
    let mut clusters: Vec<Option<String>> = chosen
        .iter()
        .map(|&i| lab.processes[i].cluster.clone())
        .collect();
    clusters.dedup();
    for c in clusters {
        lab::wait_ready(lab, role, c.as_deref(), Duration::from_secs(30)).await?;
    }
    Ok(())
}

/// The processes an action on `role` and `target` means: `A` (all of A's), `A/ZONE` (echo),
/// `A/I` (control-plane or gateway replica I, 0 the first), for etcd nothing (every member), a member's index or `leader`.
async fn select(lab: &Lab, role: Role, target: Option<&str>) -> anyhow::Result<Vec<usize>> {
    if role == Role::Etcd {
        return select_etcd(lab, target).await;
    }
    let (cluster, zone) = match target {
        None => bail!("{}: name the cluster (e.g. `east`)", role.as_str()),
        Some(t) => match t.split_once('/') {
            Some((c, z)) if role == Role::Echo => (Some(c), Some(z)),
            Some((c, r)) if matches!(role, Role::Controlplane | Role::Gateway) => {
                let info = lab.cluster(c)?;
                let i: usize = r.parse().map_err(|_| {
                    anyhow::anyhow!("{} {t}: `{r}` is not a replica number", role.as_str())
                })?;
                let replicas = match role {
                    Role::Gateway => info.gateways().len(),
                    _ => info.controlplane_replicas.len() + 1,
                };
                if i >= replicas {
                    bail!(
                        "cluster {c} has no {} replica {i} (replicas 0 to {})",
                        role.as_str(),
                        replicas - 1
                    );
                }
                return Ok(lab
                    .processes
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| {
                        p.role == role && p.cluster.as_deref() == Some(c) && p.replica() == i
                    })
                    .map(|(i, _)| i)
                    .collect());
            }
            Some(_) => bail!(
                "{}: a zone can be named only for echo, a replica only for controlplane and gateway",
                role.as_str()
            ),
            None => (Some(t), None),
        },
    };
    if let Some(c) = cluster {
        let info = lab.cluster(c)?;
        if let Some(z) = zone
            && !info.zones.iter().any(|x| x == z)
        {
            bail!(
                "cluster {c} has no zone `{z}` (zones: {})",
                info.zones.join(", ")
            );
        }
    }
    let chosen: Vec<usize> = lab
        .processes
        .iter()
        .enumerate()
        .filter(|(_, p)| {
            p.role == role
                && cluster.is_none_or(|c| p.cluster.as_deref() == Some(c))
                && zone.is_none_or(|z| p.zone.as_deref() == Some(z))
        })
        .map(|(i, _)| i)
        .collect();
    if chosen.is_empty() {
        bail!("no {} {} in this lab", role.as_str(), target.unwrap_or(""));
    }
    Ok(chosen)
}

/// etcd's processes: every member, member `I`, or the current `leader` (asked of the members).
async fn select_etcd(lab: &Lab, target: Option<&str>) -> anyhow::Result<Vec<usize>> {
    let members: Vec<usize> = lab
        .processes
        .iter()
        .enumerate()
        .filter(|(_, p)| p.role == Role::Etcd)
        .map(|(i, _)| i)
        .collect();
    let Some(t) = target else {
        return Ok(members);
    };
    let index = if t == "leader" {
        etcd_leader(lab).await?
    } else {
        t.parse::<usize>().map_err(|_| {
            anyhow::anyhow!("etcd {t}: name a member by its number (0, 1, 2) or `leader`")
        })?
    };
    let found: Vec<usize> = members
        .into_iter()
        .filter(|&i| {
            lab.processes[i].zone.as_deref() == Some(&index.to_string())
                || (lab.processes[i].zone.is_none() && index == 0)
        })
        .collect();
    if found.is_empty() {
        bail!(
            "etcd has no member {index} (members: 0 to {})",
            lab.etcd.member_addrs().len().saturating_sub(1)
        );
    }
    Ok(found)
}

/// The index of etcd's leader, from its members' status (the first that answers).
async fn etcd_leader(lab: &Lab) -> anyhow::Result<usize> {
    let addrs = lab.etcd.member_addrs();
    let mut ids = vec![None; addrs.len()];
    let mut leader = None;
    let mut errors = Vec::new();
    for (m, a) in addrs.iter().enumerate() {
        // Asked in etcd's own namespace (none in loopback mode).
        match lab::http::post(
            &lab.etcd.ns,
            *a,
            "etcd",
            "/v3/maintenance/status",
            "{}",
            Duration::from_secs(2),
        )
        .await
        {
            Ok((200, body)) => {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                ids[m] = v["header"]["member_id"].as_str().map(str::to_string);
                if let Some(l) = v["leader"].as_str() {
                    leader = Some(l.to_string());
                }
            }
            Ok((status, body)) => errors.push(format!("member {m}: {status} {}", body.trim())),
            Err(e) => errors.push(format!("member {m}: {e}")),
        }
    }
    let Some(leader) = leader else {
        bail!("no etcd member named its leader ({})", errors.join("; "));
    };
    ids.iter()
        .position(|id| id.as_deref() == Some(leader.as_str()))
        .ok_or_else(|| anyhow::anyhow!("etcd's leader {leader} is not a member this lab can reach"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_member_is_another_name_for_one_etcd_member_and_unknown_roles_are_named() {
        assert_eq!(parse_role("etcd-member"), Ok(Role::Etcd));
        assert_eq!(parse_role("etcd"), Ok(Role::Etcd));
        assert_eq!(parse_role("gateway"), Ok(Role::Gateway));
        let err = parse_role("etcd-members").unwrap_err();
        assert!(
            err.contains("`etcd-members`") && err.contains("etcd-member"),
            "{err}"
        );
    }
}
