//! `strait chaos run SCENARIO.yaml --report DIR`: load from client sidecars, timed chaos steps,
//! link states followed on every gateway, then a report (report.md, report.html,
//! results.json) and the scenario's expectations checked. Shipped scenarios live in
//! `deploy/lab/scenarios/`; the format is in docs/lab.md.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::load::{LoadSpec, Outcome, Running};
use super::{Action, apply, parse_step};
use crate::lab;
use crate::lab::state::Lab;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The scenario file (see deploy/lab/scenarios/).
    pub scenario: PathBuf,
    /// Directory for report.md, report.html and results.json.
    #[arg(long)]
    pub report: PathBuf,
    /// Run the scenario this many times (reports in DIR/run-K) and summarise every
    /// expectation's figure over the runs (median, p99, worst) in DIR/summary.md.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub repeat: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// How long the load runs, e.g. `20s`.
    pub duration: String,
    pub load: Vec<LoadSpec>,
    #[serde(default)]
    pub steps: Vec<StepSpec>,
    #[serde(default)]
    pub expect: Vec<Expect>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    /// When, from the start of the load, e.g. `5s`.
    pub at: String,
    /// A chaos action as on the command line, e.g. `cut east west`.
    #[serde(rename = "do")]
    pub action: String,
    /// What to tell the person watching (the demo).
    #[serde(default)]
    pub say: Option<String>,
}

/// One expectation. Exactly one of `traffic_on`, `max_failed`, `link`, `route_changes`,
/// `max_links_down` is set.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// Every request after step `after` is answered by this cluster (`west`) or zone
    /// (`east/zone-b`) within `within` — the failover (or recovery) time.
    #[serde(default)]
    pub traffic_on: Option<String>,
    /// The step (as written in `steps`) the time counts from.
    #[serde(default)]
    pub after: Option<String>,
    /// e.g. `1s`.
    #[serde(default)]
    pub within: Option<String>,
    /// With `traffic_on`: count from when a gateway first saw this link reach this state after
    /// the step (`east->west up`) instead of from the step itself — recovery measured from the
    /// link being usable again, not from the fault's end.
    #[serde(default)]
    pub after_link: Option<String>,
    /// At most this many failed requests over the whole run.
    #[serde(default)]
    pub max_failed: Option<u64>,
    /// A gateway's view of a link, `FROM->TO`, reaches `state` within `within` of `after`.
    #[serde(default)]
    pub link: Option<String>,
    #[serde(default)]
    pub state: Option<String>,
    /// `FROM->TO`: the serving cluster changes no more often than FROM's gateway saw that
    /// link change state (no flapping of routes beyond the link's own).
    #[serde(default)]
    pub route_changes: Option<String>,
    /// At most this many times a cluster saw a link to another go down (or could not say:
    /// none of its gateways answered) over the whole run.
    #[serde(default)]
    pub max_links_down: Option<u64>,
    /// Only this load stream (index in `load`); default: all.
    #[serde(default)]
    pub stream: Option<usize>,
}

/// A parsed, checked scenario.
pub struct Plan {
    pub scenario: Scenario,
    pub duration: Duration,
    pub steps: Vec<(Duration, Action, StepSpec)>,
}

fn duration(field: &str, s: &str) -> anyhow::Result<Duration> {
    humantime::parse_duration(s).map_err(|e| anyhow::anyhow!("{field}: `{s}`: {e}"))
}

impl Plan {
    pub fn load(path: &Path) -> anyhow::Result<Plan> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("{}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Plan> {
        let scenario: Scenario =
            serde_saphyr::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        let total = duration("duration", &scenario.duration)?;
        if scenario.load.is_empty() {
            bail!("load: at least one stream");
        }
        let mut steps = Vec::new();
        for (i, s) in scenario.steps.iter().enumerate() {
            let at = duration(&format!("steps[{i}].at"), &s.at)?;
            if at >= total {
                bail!(
                    "steps[{i}].at: {} is not before the end ({})",
                    s.at,
                    scenario.duration
                );
            }
            let action = parse_step(&s.action).with_context(|| format!("steps[{i}].do"))?;
            steps.push((at, action, s.clone()));
        }
        steps.sort_by_key(|s| s.0);
        for (i, e) in scenario.expect.iter().enumerate() {
            let set = [
                e.traffic_on.is_some(),
                e.max_failed.is_some(),
                e.link.is_some(),
                e.route_changes.is_some(),
                e.max_links_down.is_some(),
            ];
            if set.iter().filter(|x| **x).count() != 1 {
                bail!(
                    "expect[{i}]: exactly one of traffic_on, max_failed, link, route_changes, max_links_down"
                );
            }
            if let Some(l) = &e.route_changes
                && !l.contains("->")
            {
                bail!("expect[{i}].route_changes: `{l}`: expected FROM->TO");
            }
            if e.traffic_on.is_some() || e.link.is_some() {
                let after = e
                    .after
                    .as_deref()
                    .ok_or_else(|| anyhow::anyhow!("expect[{i}]: `after` names a step"))?;
                if !scenario.steps.iter().any(|s| s.action == after) {
                    bail!("expect[{i}].after: no step `{after}`");
                }
                let within = e
                    .within
                    .as_deref()
                    .ok_or_else(|| anyhow::anyhow!("expect[{i}]: `within` is needed"))?;
                duration(&format!("expect[{i}].within"), within)?;
            }
            if let Some(l) = &e.after_link {
                if e.traffic_on.is_none() {
                    bail!("expect[{i}].after_link: only with traffic_on");
                }
                match l.split_once(' ') {
                    Some((link, state))
                        if link.contains("->") && matches!(state, "up" | "degraded" | "down") => {}
                    _ => bail!(
                        "expect[{i}].after_link: `{l}`: expected `FROM->TO STATE` (up, degraded, down)"
                    ),
                }
            }
            if let Some(l) = &e.link {
                if !l.contains("->") {
                    bail!("expect[{i}].link: `{l}`: expected FROM->TO");
                }
                if e.state.is_none() {
                    bail!("expect[{i}]: `state` (up, degraded, down) is needed with `link`");
                }
            }
            if let Some(s) = e.stream
                && s >= scenario.load.len()
            {
                bail!(
                    "expect[{i}].stream: {s}, but there are {} load streams",
                    scenario.load.len()
                );
            }
        }
        Ok(Plan {
            scenario,
            duration: total,
            steps,
        })
    }
}

/// A link state seen on a gateway's admin endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkEvent {
    pub t_ms: f64,
    pub from: String,
    pub to: String,
    pub state: String,
}

/// A step as it ran.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRecord {
    pub t_ms: f64,
    pub action: String,
    pub error: Option<String>,
}

/// Everything a run observed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Observed {
    pub duration_ms: f64,
    pub load: Vec<LoadSpec>,
    pub outcomes: Vec<Outcome>,
    pub steps: Vec<StepRecord>,
    pub links: Vec<LinkEvent>,
}

/// One line of the live view: the last second.
pub struct Tick<'a> {
    pub t: Duration,
    pub outcomes: &'a [Outcome],
    pub links: &'a [LinkEvent],
    pub scenario: &'a Scenario,
}

/// What the person watching sees: steps with their narration, and a tick every second.
pub trait View: Send {
    fn step(&mut self, t: Duration, action: &str, say: Option<&str>);
    fn tick(&mut self, tick: &Tick<'_>);
}

/// The plain live view of `strait chaos run`.
pub struct Plain;

impl View for Plain {
    fn step(&mut self, t: Duration, action: &str, say: Option<&str>) {
        println!(
            "t={:>5.1}s  ▶ {action}{}",
            t.as_secs_f64(),
            say.map(|s| format!(" — {s}")).unwrap_or_default()
        );
    }

    fn tick(&mut self, tick: &Tick<'_>) {
        println!("{}", summary_line(tick));
    }
}

/// `t=  5s  payments.default from east: west 100%  failed 0 | links not up: …`.
pub fn summary_line(tick: &Tick<'_>) -> String {
    let now_ms = tick.t.as_secs_f64() * 1000.0;
    let mut parts = Vec::new();
    for (i, spec) in tick.scenario.load.iter().enumerate() {
        let recent: Vec<&Outcome> = tick
            .outcomes
            .iter()
            .filter(|o| o.stream == i && o.end_ms() > now_ms - 1000.0)
            .collect();
        let failed = recent.iter().filter(|o| !o.ok()).count();
        let by = super::report::served(
            recent.iter().copied(),
            super::report::zoned(tick.scenario, i),
        );
        let total = recent.len().max(1) as f64;
        let shares: Vec<String> = by
            .iter()
            .map(|(k, n)| format!("{k} {:>3.0}%", *n as f64 * 100.0 / total))
            .collect();
        parts.push(format!(
            "{} from {}: {}{}",
            spec.service,
            spec.from,
            if shares.is_empty() {
                "—".to_string()
            } else {
                shares.join(" ")
            },
            if failed > 0 {
                format!("  \x1b[31mfailed {failed}\x1b[0m")
            } else {
                String::new()
            }
        ));
    }
    let mut latest: Vec<(&str, &str, &str)> = Vec::new();
    for e in tick.links {
        match latest
            .iter_mut()
            .find(|(f, t, _)| *f == e.from && *t == e.to)
        {
            Some(x) => x.2 = &e.state,
            None => latest.push((&e.from, &e.to, &e.state)),
        }
    }
    let bad: Vec<String> = latest
        .iter()
        .filter(|(_, _, s)| *s != "up")
        .map(|(f, t, s)| format!("{f}→{t} {s}"))
        .collect();
    format!(
        "t={:>5.1}s  {}  | links: {}",
        tick.t.as_secs_f64(),
        parts.join("  ·  "),
        if bad.is_empty() {
            "all up".to_string()
        } else {
            bad.join(", ")
        }
    )
}

/// Wait until the client sidecar of every stream's cluster serves its service.
async fn warm_up(lab: &Lab, load: &[LoadSpec]) -> anyhow::Result<()> {
    for spec in load {
        let c = lab.cluster(&spec.from)?;
        let within = Duration::from_secs(30);
        match spec.protocol {
            super::load::LoadProtocol::Tcp => {
                lab::wait_served_tcp(lab, c, &spec.service, within).await
            }
            _ => lab::wait_served(c, &spec.service, &spec.path, within).await,
        }
        .context("before the run")?;
    }
    Ok(())
}

/// Run `plan` against the lab: load, steps at their times, link states followed.
pub async fn execute(lab: Lab, plan: &Plan, view: &mut dyn View) -> anyhow::Result<Observed> {
    warm_up(&lab, &plan.scenario.load).await?;
    let start = Instant::now();
    let running = Running::start(Arc::new(lab.clone()), &plan.scenario.load, start);
    let links: Arc<Mutex<Vec<LinkEvent>>> = Arc::default();
    let poller = tokio::spawn(follow_links(lab.clone(), start, links.clone()));
    let mut lab = lab;
    let mut records = Vec::new();
    let mut flaps = Vec::new();
    let mut next_tick = start + Duration::from_secs(1);
    let end = start + plan.duration;
    let mut steps = plan.steps.iter().peekable();
    loop {
        let next_step = steps.peek().map(|s| start + s.0);
        let wake = [Some(next_tick), next_step, Some(end)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(end);
        tokio::time::sleep_until(wake).await;
        let now = Instant::now();
        if now >= next_tick {
            let outcomes = running.outcomes.lock().unwrap_or_else(|p| p.into_inner());
            let l = links.lock().unwrap_or_else(|p| p.into_inner());
            view.tick(&Tick {
                t: now - start,
                outcomes: &outcomes,
                links: &l,
                scenario: &plan.scenario,
            });
            drop((outcomes, l));
            next_tick += Duration::from_secs(1);
        }
        if let Some((_, action, spec)) = steps.peek().filter(|s| now >= start + s.0) {
            let t = Instant::now() - start;
            view.step(t, &spec.action, spec.say.as_deref());
            let error = if let super::Action::Flap { .. } = action {
                let (mut copy, action) = (lab.clone(), action.clone());
                flaps.push(tokio::spawn(async move { apply(&mut copy, &action).await }));
                None
            } else {
                apply(&mut lab, action)
                    .await
                    .err()
                    .map(|e| format!("{e:#}"))
            };
            if let Some(e) = &error {
                println!("  step failed: {e}");
            }
            records.push(StepRecord {
                t_ms: t.as_secs_f64() * 1000.0,
                action: spec.action.clone(),
                error,
            });
            steps.next();
            continue;
        }
        if now >= end {
            break;
        }
    }
    let outcomes = running.finish().await?;
    for f in flaps {
        if let Ok(Err(e)) = f.await {
            println!("  flap failed: {e:#}");
        }
    }
    // A flap works on a copy of the lab's state and leaves its link healed.
    for (_, action, _) in &plan.steps {
        if let super::Action::Flap { a, b, .. } = action
            && let Ok(i) = lab.link_index(a, b)
        {
            lab.links[i].state = crate::lab::state::LinkState::Up;
        }
    }
    lab.save()?;
    poller.abort();
    let links = links.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok(Observed {
        duration_ms: plan.duration.as_secs_f64() * 1000.0,
        load: plan.scenario.load.clone(),
        outcomes,
        steps: records,
        links,
    })
}

/// Poll every gateway's `/links` every 100 ms; record each change.
async fn follow_links(lab: Lab, start: Instant, out: Arc<Mutex<Vec<LinkEvent>>>) {
    let mut last: std::collections::HashMap<(String, String), String> = Default::default();
    loop {
        for c in &lab.clusters {
            let seen = lab::gateway_links(c).await;
            let t_ms = (Instant::now() - start).as_secs_f64() * 1000.0;
            let now: Vec<(String, String)> = match seen {
                Ok(l) => l,
                // An unreachable gateway (killed) reports nothing: its links are unknown.
                Err(_) => lab
                    .clusters
                    .iter()
                    .filter(|o| o.name != c.name)
                    .map(|o| (o.name.clone(), "unknown".to_string()))
                    .collect(),
            };
            for (peer, state) in now {
                let key = (c.name.clone(), peer.clone());
                if last.get(&key) != Some(&state) {
                    last.insert(key, state.clone());
                    out.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(LinkEvent {
                            t_ms,
                            from: c.name.clone(),
                            to: peer,
                            state,
                        });
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn run(dir: &Path, args: RunArgs) -> anyhow::Result<()> {
    let plan = Plan::load(&args.scenario)?;
    println!(
        "scenario {}: {} of load, {} steps{}",
        plan.scenario.name,
        plan.scenario.duration,
        plan.steps.len(),
        if args.repeat > 1 {
            format!(", {} runs", args.repeat)
        } else {
            String::new()
        }
    );
    let mut runs = Vec::new();
    for k in 1..=args.repeat {
        let lab = Lab::load(dir)?;
        let report_dir = if args.repeat == 1 {
            args.report.clone()
        } else {
            println!("\nrun {k} of {}", args.repeat);
            args.report.join(format!("run-{k}"))
        };
        let observed = execute(lab, &plan, &mut Plain).await?;
        let verdict = super::report::write(&report_dir, &plan.scenario, &observed)?;
        println!("\n{}", verdict.text);
        println!(
            "report: {} (and report.html, results.json)",
            report_dir.join("report.md").display()
        );
        runs.push((verdict, observed));
    }
    if args.repeat > 1 {
        let summary = super::report::summarise(&plan.scenario, &runs);
        std::fs::write(args.report.join("summary.md"), &summary)?;
        println!("\n{summary}");
    }
    let failed_runs = runs.iter().filter(|(v, _)| !v.passed).count();
    if failed_runs > 0 {
        bail!(
            "scenario {}: expectations not met in {failed_runs} of {} runs",
            plan.scenario.name,
            runs.len()
        );
    }
    Ok(())
}
