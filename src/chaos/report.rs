//! A scenario's report: the expectations checked with what was measured, per-phase figures
//! (requests, failures, latency percentiles, share per serving cluster), the steps and the link
//! states seen — as `report.md`, a self-contained `report.html` with a timeline chart, and
//! `results.json` (the same figures, plus every request's outcome, for tools and tests).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use serde::Serialize;

use super::load::Outcome;
use super::scenario::{Expect, Observed, Scenario};

/// What the report concluded.
pub struct Verdict {
    pub passed: bool,
    /// The expectation table, for the terminal.
    pub text: String,
}

#[derive(Debug, Serialize)]
pub struct Checked {
    pub what: String,
    pub goal: String,
    pub measured: String,
    /// The measured figure in ms, or the count.
    pub value: Option<f64>,
    pub passed: bool,
}

#[derive(Debug, Serialize)]
pub struct Phase {
    pub name: String,
    pub start_ms: f64,
    pub end_ms: f64,
    pub streams: Vec<PhaseStream>,
}

#[derive(Debug, Serialize)]
pub struct PhaseStream {
    pub stream: usize,
    pub requests: usize,
    pub failed: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// (serving cluster, or cluster/zone, share in percent).
    pub share: Vec<(String, f64)>,
}

#[derive(Debug, Serialize)]
struct Results<'a> {
    scenario: &'a Scenario,
    passed: bool,
    requests: usize,
    failed: usize,
    expectations: &'a [Checked],
    phases: &'a [Phase],
    observed: &'a Observed,
}

/// Whether `o` was answered by `target` (`west` or `east/zone-b`).
fn served_by(o: &Outcome, target: &str) -> bool {
    if !o.ok() {
        return false;
    }
    match target.split_once('/') {
        Some((c, z)) => o.cluster.as_deref() == Some(c) && o.zone.as_deref() == Some(z),
        None => o.cluster.as_deref() == Some(target),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((p / 100.0) * (sorted.len() as f64)).ceil() as usize;
    sorted[i.clamp(1, sorted.len()) - 1]
}

/// The serving cluster of an answer, or `cluster/zone`.
pub fn key_of(o: &Outcome, by_zone: bool) -> String {
    match (&o.cluster, &o.zone) {
        (Some(c), Some(z)) if by_zone => format!("{c}/{z}"),
        (Some(c), _) => c.clone(),
        _ => "?".into(),
    }
}

/// How many answers came from each serving cluster (or zone), sorted by name.
pub fn served<'a>(
    outcomes: impl Iterator<Item = &'a Outcome>,
    by_zone: bool,
) -> Vec<(String, usize)> {
    let mut by: Vec<(String, usize)> = Vec::new();
    for o in outcomes.filter(|o| o.ok()) {
        let k = key_of(o, by_zone);
        match by.iter_mut().find(|x| x.0 == k) {
            Some(x) => x.1 += 1,
            None => by.push((k, 1)),
        }
    }
    by.sort();
    by
}

/// Whether a stream's shares are worth showing per zone (a service every cluster runs, whose
/// zones matter), decided by the scenario's expectations naming a zone for it.
pub fn zoned(scenario: &Scenario, stream: usize) -> bool {
    scenario.expect.iter().any(|e| {
        e.traffic_on.as_deref().is_some_and(|t| t.contains('/'))
            && e.stream.is_none_or(|s| s == stream)
    })
}

pub fn phases(scenario: &Scenario, obs: &Observed) -> Vec<Phase> {
    let mut bounds = vec![(0.0, "steady state".to_string())];
    for s in &obs.steps {
        bounds.push((s.t_ms, format!("after `{}`", s.action)));
    }
    let mut out = Vec::new();
    for (i, (start, name)) in bounds.iter().enumerate() {
        let end = bounds.get(i + 1).map(|b| b.0).unwrap_or(obs.duration_ms);
        let mut streams = Vec::new();
        for s in 0..obs.load.len() {
            let os: Vec<&Outcome> = obs
                .outcomes
                .iter()
                .filter(|o| o.stream == s && o.at_ms >= *start && o.at_ms < end)
                .collect();
            let mut lat: Vec<f64> = os.iter().map(|o| o.latency_ms).collect();
            lat.sort_by(f64::total_cmp);
            let n = os.len().max(1) as f64;
            let share = served(os.iter().copied(), zoned(scenario, s))
                .into_iter()
                .map(|(k, c)| (k, c as f64 * 100.0 / n))
                .collect();
            streams.push(PhaseStream {
                stream: s,
                requests: os.len(),
                failed: os.iter().filter(|o| !o.ok()).count(),
                p50_ms: percentile(&lat, 50.0),
                p99_ms: percentile(&lat, 99.0),
                max_ms: lat.last().copied().unwrap_or(0.0),
                share,
            });
        }
        out.push(Phase {
            name: name.clone(),
            start_ms: *start,
            end_ms: end,
            streams,
        });
    }
    out
}

/// A request this many times slower than the steady state's p99 counts as disturbed.
pub const SLOW_FACTOR: f64 = 3.0;
/// … and never below this.
pub const SLOW_FLOOR_MS: f64 = 100.0;

/// The latency over which a request counts as disturbed: from the requests due before the
/// first step.
fn slow_threshold(obs: &Observed, stream: Option<usize>) -> f64 {
    let first = obs.steps.first().map(|s| s.t_ms).unwrap_or(obs.duration_ms);
    let mut lat: Vec<f64> = obs
        .outcomes
        .iter()
        .filter(|o| stream.is_none_or(|s| o.stream == s) && o.at_ms < first && o.ok())
        .map(|o| o.latency_ms)
        .collect();
    lat.sort_by(f64::total_cmp);
    (percentile(&lat, 99.0) * SLOW_FACTOR).max(SLOW_FLOOR_MS)
}

/// Consecutive answers from one cluster it takes to count as the route having moved there
/// (requests retried during a transition interleave for a moment).
pub const STABLE_RUN: usize = 10;

/// How often the serving cluster changed: a change is a run of [`STABLE_RUN`] answers in a row
/// from another cluster than the current one (failures are skipped).
pub fn route_changes<'a>(outcomes: impl Iterator<Item = &'a Outcome>) -> usize {
    let mut current: Option<&str> = None;
    let mut run: Option<(&str, usize)> = None;
    let mut changes = 0;
    for o in outcomes {
        let Some(c) = o.cluster.as_deref().filter(|_| o.ok()) else {
            continue;
        };
        if current.is_none() {
            current = Some(c);
        }
        if Some(c) == current {
            run = None;
            continue;
        }
        run = match run {
            Some((r, n)) if r == c => Some((r, n + 1)),
            _ => Some((c, 1)),
        };
        if let Some((r, n)) = run
            && n >= STABLE_RUN
        {
            current = Some(r);
            changes += 1;
            run = None;
        }
    }
    changes
}

fn ms(d: &str) -> f64 {
    humantime::parse_duration(d)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// Check one expectation against what was observed.
pub fn check(e: &Expect, obs: &Observed) -> Checked {
    let in_stream = |o: &&Outcome| e.stream.is_none_or(|s| o.stream == s);
    let streams = e
        .stream
        .map(|s| format!(" (stream {s})"))
        .unwrap_or_default();
    if let Some(max) = e.max_failed {
        let failed: Vec<&Outcome> = obs
            .outcomes
            .iter()
            .filter(in_stream)
            .filter(|o| !o.ok())
            .collect();
        let first = failed
            .first()
            .map(|o| {
                format!(
                    " (first at {:.2} s: {})",
                    o.at_ms / 1000.0,
                    o.error.as_deref().unwrap_or("")
                )
            })
            .unwrap_or_default();
        return Checked {
            what: format!("failed requests{streams}"),
            goal: format!("≤ {max}"),
            measured: format!("{}{first}", failed.len()),
            value: Some(failed.len() as f64),
            passed: failed.len() as u64 <= max,
        };
    }
    if let Some(max) = e.max_links_down {
        let down: Vec<_> = obs
            .links
            .iter()
            .filter(|l| l.state != "up" && l.state != "degraded")
            .collect();
        let first = down
            .first()
            .map(|l| {
                format!(
                    " (first at {:.2} s: {}→{} {})",
                    l.t_ms / 1000.0,
                    l.from,
                    l.to,
                    l.state
                )
            })
            .unwrap_or_default();
        return Checked {
            what: "links seen down (or unknown)".into(),
            goal: format!("≤ {max}"),
            measured: format!("{}{first}", down.len()),
            value: Some(down.len() as f64),
            passed: down.len() as u64 <= max,
        };
    }
    if let Some(link) = &e.route_changes {
        let (from, to) = link.split_once("->").unwrap_or(("", ""));
        let link_changes = obs
            .links
            .iter()
            .filter(|l| l.from == from && l.to == to)
            .count()
            .saturating_sub(1);
        let routes = route_changes(obs.outcomes.iter().filter(in_stream));
        return Checked {
            what: format!("route changes{streams} vs state changes of link {from}→{to}"),
            goal: format!("≤ {link_changes}"),
            measured: routes.to_string(),
            value: Some(routes as f64),
            passed: routes <= link_changes,
        };
    }
    let after = e.after.clone().unwrap_or_default();
    let within = e.within.clone().unwrap_or_default();
    let Some(step) = obs.steps.iter().position(|s| s.action == after) else {
        return Checked {
            what: format!("after `{after}`"),
            goal: within,
            measured: "the step never ran".into(),
            value: None,
            passed: false,
        };
    };
    let t_step = obs.steps[step].t_ms;
    let t_next = obs
        .steps
        .get(step + 1)
        .map(|s| s.t_ms)
        .unwrap_or(obs.duration_ms);
    // Counted from the step, or from a link state seen after it.
    let (t0, since) = match e.after_link.as_deref().and_then(|l| l.split_once(' ')) {
        None => (t_step, format!("`{after}`")),
        Some((link, state)) => {
            let (from, to) = link.split_once("->").unwrap_or(("", ""));
            let seen = obs
                .links
                .iter()
                .find(|l| l.from == from && l.to == to && l.state == state && l.t_ms >= t_step)
                .map(|l| l.t_ms);
            let since = format!("link {from}→{to} {state} (after `{after}`)");
            match seen {
                Some(t) => (t, since),
                None => {
                    return Checked {
                        what: format!("traffic after {since}"),
                        goal: within,
                        measured: "the link never reached that state".into(),
                        value: None,
                        passed: false,
                    };
                }
            }
        }
    };
    if let Some(target) = &e.traffic_on {
        // Requests due before the next step that ended after this one. One is disturbed when
        // it failed, was answered by another than the target, or was slow: over
        // [`SLOW_FACTOR`] × the steady state's p99 (at least [`SLOW_FLOOR_MS`]) — a request
        // that hung on the dead link until it was retried elsewhere counts. The failover time
        // is how long after the step the last disturbed one ended.
        let slow = slow_threshold(obs, e.stream);
        let relevant: Vec<&Outcome> = obs
            .outcomes
            .iter()
            .filter(in_stream)
            .filter(|o| o.at_ms < t_next && o.end_ms() > t0)
            .collect();
        let good = relevant.iter().filter(|o| served_by(o, target)).count();
        let last_bad = relevant
            .iter()
            .filter(|o| !served_by(o, target) || o.latency_ms > slow)
            .map(|o| o.end_ms() - t0)
            .fold(0.0_f64, f64::max);
        let passed = good > 0 && last_bad <= ms(&within);
        return Checked {
            what: format!("all traffic on {target} after {since}{streams}"),
            goal: format!("≤ {within}"),
            measured: if good == 0 {
                "never".into()
            } else {
                format!("{:.0} ms", last_bad)
            },
            value: (good > 0).then_some(last_bad),
            passed,
        };
    }
    let link = e.link.clone().unwrap_or_default();
    let state = e.state.clone().unwrap_or_default();
    let (from, to) = link.split_once("->").unwrap_or(("", ""));
    let seen = obs
        .links
        .iter()
        .find(|l| l.from == from && l.to == to && l.state == state && l.t_ms >= t0)
        .map(|l| l.t_ms - t0);
    Checked {
        what: format!("link {from}→{to} {state} after `{after}`"),
        goal: format!("≤ {within}"),
        measured: seen
            .map(|t| format!("{t:.0} ms"))
            .unwrap_or_else(|| "never".into()),
        value: seen,
        passed: seen.is_some_and(|t| t <= ms(&within)),
    }
}

/// Write report.md, report.html and results.json into `dir`; the verdict.
pub fn write(dir: &Path, scenario: &Scenario, obs: &Observed) -> anyhow::Result<Verdict> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let checked: Vec<Checked> = scenario.expect.iter().map(|e| check(e, obs)).collect();
    let phases = phases(scenario, obs);
    let passed = checked.iter().all(|c| c.passed) && obs.steps.iter().all(|s| s.error.is_none());
    let failed = obs.outcomes.iter().filter(|o| !o.ok()).count();

    let mut table = String::new();
    let _ = writeln!(table, "| expectation | goal | measured | |");
    let _ = writeln!(table, "| --- | --- | --- | --- |");
    for c in &checked {
        let _ = writeln!(
            table,
            "| {} | {} | {} | {} |",
            c.what,
            c.goal,
            c.measured,
            if c.passed { "met" } else { "**NOT MET**" }
        );
    }

    let mut md = String::new();
    let _ = writeln!(md, "# Scenario `{}`\n", scenario.name);
    if !scenario.description.is_empty() {
        let _ = writeln!(md, "{}\n", scenario.description.trim());
    }
    let _ = writeln!(
        md,
        "Result: **{}** — {} requests, {} failed, over {:.0} s.\n",
        if passed { "passed" } else { "FAILED" },
        obs.outcomes.len(),
        failed,
        obs.duration_ms / 1000.0
    );
    let _ = writeln!(md, "## Expectations\n\n{table}");
    let _ = writeln!(md, "## Load\n");
    for (i, l) in obs.load.iter().enumerate() {
        let _ = writeln!(
            md,
            "- stream {i}: {} from {}'s client sidecar, {} requests/s",
            l.describe(),
            l.from,
            l.rate
        );
    }
    let _ = writeln!(md, "\n## Phases\n");
    let _ = writeln!(
        md,
        "| phase | from | stream | requests | failed | p50 | p99 | max | served by |"
    );
    let _ = writeln!(
        md,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for p in &phases {
        for s in &p.streams {
            let share: Vec<String> = s
                .share
                .iter()
                .map(|(k, v)| format!("{k} {v:.1}%"))
                .collect();
            let _ = writeln!(
                md,
                "| {} | {:.1} s | {} | {} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {} |",
                p.name,
                p.start_ms / 1000.0,
                s.stream,
                s.requests,
                s.failed,
                s.p50_ms,
                s.p99_ms,
                s.max_ms,
                share.join(", ")
            );
        }
    }
    let _ = writeln!(md, "\n## Steps\n");
    for s in &obs.steps {
        let _ = writeln!(
            md,
            "- {:.2} s: `{}`{}",
            s.t_ms / 1000.0,
            s.action,
            s.error
                .as_deref()
                .map(|e| format!(" — failed: {e}"))
                .unwrap_or_default()
        );
    }
    let _ = writeln!(md, "\n## Link states seen by the gateways\n");
    for l in &obs.links {
        let _ = writeln!(
            md,
            "- {:.2} s: {} → {}: {}",
            l.t_ms / 1000.0,
            l.from,
            l.to,
            l.state
        );
    }
    let errors: Vec<&Outcome> = obs.outcomes.iter().filter(|o| !o.ok()).take(20).collect();
    if !errors.is_empty() {
        let _ = writeln!(md, "\n## Failed requests (first 20)\n");
        for o in errors {
            let _ = writeln!(
                md,
                "- {:.3} s, stream {}: {}",
                o.at_ms / 1000.0,
                o.stream,
                o.error.as_deref().unwrap_or("")
            );
        }
    }
    std::fs::write(dir.join("report.md"), &md)?;
    std::fs::write(
        dir.join("report.html"),
        html(scenario, obs, &checked, passed),
    )?;
    let results = Results {
        scenario,
        passed,
        requests: obs.outcomes.len(),
        failed,
        expectations: &checked,
        phases: &phases,
        observed: obs,
    };
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    Ok(Verdict {
        passed,
        text: table,
    })
}

/// Every expectation's figure over repeated runs: median, p99, worst, runs met; requests and
/// failures in all.
pub fn summarise(scenario: &Scenario, runs: &[(Verdict, Observed)]) -> String {
    let mut out = String::new();
    let requests: usize = runs.iter().map(|(_, o)| o.outcomes.len()).sum();
    let failed: usize = runs
        .iter()
        .map(|(_, o)| o.outcomes.iter().filter(|x| !x.ok()).count())
        .sum();
    let _ = writeln!(
        out,
        "# Scenario `{}`, {} runs\n\n{requests} requests, {failed} failed, {} of {} runs met every expectation.\n",
        scenario.name,
        runs.len(),
        runs.iter().filter(|(v, _)| v.passed).count(),
        runs.len()
    );
    let _ = writeln!(
        out,
        "| expectation | goal | median | p99 | worst | runs met |"
    );
    let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- |");
    for e in &scenario.expect {
        let checked: Vec<Checked> = runs.iter().map(|(_, o)| check(e, o)).collect();
        let mut values: Vec<f64> = checked.iter().filter_map(|c| c.value).collect();
        values.sort_by(f64::total_cmp);
        let unit = if e.max_failed.is_some() || e.max_links_down.is_some() {
            ""
        } else {
            " ms"
        };
        let fmt = |v: f64| format!("{v:.0}{unit}");
        let first = &checked[0];
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} of {} |",
            first.what,
            first.goal,
            fmt(percentile(&values, 50.0)),
            fmt(percentile(&values, 99.0)),
            values.last().map(|v| fmt(*v)).unwrap_or_else(|| "—".into()),
            checked.iter().filter(|c| c.passed).count(),
            checked.len()
        );
    }
    out
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const PALETTE: [&str; 8] = [
    "#4e79a7", "#59a14f", "#f28e2b", "#b07aa1", "#76b7b2", "#edc948", "#9c755f", "#bab0ac",
];

/// A self-contained page: per stream, the share of requests by serving cluster (and failures)
/// over time in 250 ms buckets; under it, the links' states; steps as vertical lines.
fn html(scenario: &Scenario, obs: &Observed, checked: &[Checked], passed: bool) -> String {
    let rows: String = checked
        .iter()
        .map(|c| {
            format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
                esc(&c.what),
                esc(&c.goal),
                esc(&c.measured),
                if c.passed { "met" } else { "NOT MET" }
            )
        })
        .collect();
    let (w, left, plot_h) = (1000.0_f64, 150.0_f64, 160.0_f64);
    let bucket = 250.0;
    let n = (obs.duration_ms / bucket).ceil().max(1.0) as usize;
    let bw = (w - left - 10.0) / n as f64;
    let x = |t: f64| left + t / obs.duration_ms * (w - left - 10.0);
    let mut keys: Vec<String> = obs
        .outcomes
        .iter()
        .filter(|o| o.ok())
        .map(|o| key_of(o, zoned(scenario, o.stream)))
        .collect();
    keys.sort();
    keys.dedup();
    let color = |k: &str| {
        keys.iter()
            .position(|x| x == k)
            .map(|i| PALETTE[i % PALETTE.len()])
            .unwrap_or("#999")
    };
    let mut pairs: Vec<(String, String)> = obs
        .links
        .iter()
        .filter(|l| {
            obs.links
                .iter()
                .any(|m| m.from == l.from && m.to == l.to && m.state != "up")
        })
        .map(|l| (l.from.clone(), l.to.clone()))
        .collect();
    pairs.sort();
    pairs.dedup();
    let streams = obs.load.len();
    let h = 40.0 + streams as f64 * (plot_h + 30.0) + pairs.len() as f64 * 22.0 + 60.0;
    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\n"
    );
    let mut y0 = 30.0;
    for (s, spec) in obs.load.iter().enumerate() {
        let _ = writeln!(
            svg,
            "<text x='{left}' y='{}' font-weight='bold'>{} from {} ({} req/s): share of requests by serving cluster</text>",
            y0 - 8.0,
            esc(&spec.service),
            esc(&spec.from),
            spec.rate
        );
        let by_zone = zoned(scenario, s);
        for b in 0..n {
            let (t0, t1) = (b as f64 * bucket, (b + 1) as f64 * bucket);
            let os: Vec<&Outcome> = obs
                .outcomes
                .iter()
                .filter(|o| o.stream == s && o.at_ms >= t0 && o.at_ms < t1)
                .collect();
            if os.is_empty() {
                continue;
            }
            let total = os.len() as f64;
            let mut y = y0 + plot_h;
            let mut parts: Vec<(String, f64)> = keys
                .iter()
                .map(|k| {
                    (
                        k.clone(),
                        os.iter()
                            .filter(|o| o.ok() && key_of(o, by_zone) == *k)
                            .count() as f64,
                    )
                })
                .collect();
            parts.push((
                "failed".into(),
                os.iter().filter(|o| !o.ok()).count() as f64,
            ));
            for (k, c) in parts {
                if c == 0.0 {
                    continue;
                }
                let hh = c / total * plot_h;
                y -= hh;
                let fill = if k == "failed" { "#e15759" } else { color(&k) };
                let _ = writeln!(
                    svg,
                    "<rect x='{:.1}' y='{y:.1}' width='{:.1}' height='{hh:.1}' fill='{fill}'><title>{:.2}–{:.2} s: {} {c}/{total}</title></rect>",
                    x(t0),
                    bw.max(1.0),
                    t0 / 1000.0,
                    t1 / 1000.0,
                    esc(&k)
                );
            }
        }
        let _ = writeln!(
            svg,
            "<rect x='{left}' y='{y0}' width='{:.1}' height='{plot_h}' fill='none' stroke='#333'/>",
            w - left - 10.0
        );
        let _ = writeln!(
            svg,
            "<text x='{}' y='{}'>100%</text>",
            left - 40.0,
            y0 + 10.0
        );
        let _ = writeln!(
            svg,
            "<text x='{}' y='{}'>0%</text>",
            left - 30.0,
            y0 + plot_h
        );
        y0 += plot_h + 30.0;
    }
    // Link states.
    for (from, to) in &pairs {
        let evs: Vec<_> = obs
            .links
            .iter()
            .filter(|l| l.from == *from && l.to == *to)
            .collect();
        let _ = writeln!(
            svg,
            "<text x='5' y='{}'>link {} → {}</text>",
            y0 + 13.0,
            esc(from),
            esc(to)
        );
        for (i, e) in evs.iter().enumerate() {
            let t1 = evs.get(i + 1).map(|n| n.t_ms).unwrap_or(obs.duration_ms);
            let fill = match e.state.as_str() {
                "up" => "#59a14f",
                "degraded" => "#f28e2b",
                "down" => "#e15759",
                _ => "#bab0ac",
            };
            let _ = writeln!(
                svg,
                "<rect x='{:.1}' y='{y0}' width='{:.1}' height='16' fill='{fill}'><title>{} from {:.2} s</title></rect>",
                x(e.t_ms),
                (x(t1) - x(e.t_ms)).max(1.0),
                esc(&e.state),
                e.t_ms / 1000.0
            );
        }
        y0 += 22.0;
    }
    // Steps.
    for s in &obs.steps {
        let _ = writeln!(
            svg,
            "<line x1='{0:.1}' x2='{0:.1}' y1='20' y2='{y0}' stroke='#000' stroke-dasharray='4 3'/><text x='{1:.1}' y='{2}' >{3:.1} s {4}</text>",
            x(s.t_ms),
            x(s.t_ms) + 3.0,
            y0 + 14.0,
            s.t_ms / 1000.0,
            esc(&s.action)
        );
        y0 += 14.0;
    }
    // Legend.
    let mut lx = left;
    let ly = y0 + 24.0;
    for k in keys.iter().map(String::as_str).chain(["failed"]) {
        let fill = if k == "failed" { "#e15759" } else { color(k) };
        let _ = writeln!(
            svg,
            "<rect x='{lx}' y='{}' width='12' height='12' fill='{fill}'/><text x='{}' y='{ly}'>{}</text>",
            ly - 10.0,
            lx + 16.0,
            esc(k)
        );
        lx += 30.0 + 8.0 * k.len() as f64;
    }
    svg.push_str("</svg>");
    let svg = svg.replace(&format!("height='{h}'"), &format!("height='{}'", ly + 10.0));
    format!(
        "<!doctype html>\n<html><head><meta charset='utf-8'><title>Strait scenario {name}</title>\
         <style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}</style>\
         </head><body><h1>Scenario {name}: {verdict}</h1><p>{desc}</p>\
         <table><tr><th>expectation</th><th>goal</th><th>measured</th><th></th></tr>\n{rows}</table>\
         <h2>Timeline</h2>{svg}<p>Each bar is 250 ms of requests by the time they were due; \
         the details are in report.md and results.json.</p></body></html>\n",
        name = esc(&scenario.name),
        verdict = if passed { "passed" } else { "FAILED" },
        desc = esc(scenario.description.trim()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::load::LoadSpec;
    use crate::chaos::scenario::{Plan, StepRecord};

    fn outcome(at_ms: f64, latency_ms: f64, cluster: Option<&str>) -> Outcome {
        Outcome {
            stream: 0,
            at_ms,
            latency_ms,
            cluster: cluster.map(str::to_string),
            zone: Some("zone-a".into()),
            error: cluster
                .is_none()
                .then(|| "503 no healthy upstream".to_string()),
        }
    }

    /// 10 s at 100 req/s: west until the cut at 5 s; then requests due in the first `hang`
    /// ms hang until then and are answered by central, later ones by central at once.
    fn observed(hang: f64, failed_at: Option<f64>) -> Observed {
        let mut outcomes = Vec::new();
        for i in 0..1000 {
            let at = i as f64 * 10.0;
            let o = if at < 5000.0 {
                outcome(at, 2.0, Some("west"))
            } else if Some(at) == failed_at {
                outcome(at, 3.0, None)
            } else if at < 5000.0 + hang {
                outcome(at, 5000.0 + hang - at, Some("central"))
            } else {
                outcome(at, 2.0, Some("central"))
            };
            outcomes.push(o);
        }
        Observed {
            duration_ms: 10_000.0,
            load: vec![LoadSpec {
                from: "east".into(),
                service: "payments.default".into(),
                rate: 100.0,
                path: "/".into(),
                protocol: Default::default(),
                via: None,
            }],
            outcomes,
            steps: vec![StepRecord {
                t_ms: 5000.0,
                action: "cut east west".into(),
                error: None,
            }],
            links: Vec::new(),
        }
    }

    fn expect(target: &str, within: &str) -> Expect {
        Expect {
            traffic_on: Some(target.into()),
            after: Some("cut east west".into()),
            within: Some(within.into()),
            ..Default::default()
        }
    }

    #[test]
    fn requests_that_hung_on_the_dead_link_count_in_the_failover_time() {
        let c = check(&expect("central", "1s"), &observed(700.0, None));
        assert!(c.passed, "{c:?}");
        let v = c.value.expect("measured");
        assert!((v - 700.0).abs() < 15.0, "failover ≈ 700 ms, got {v}");
        let c = check(&expect("central", "500ms"), &observed(700.0, None));
        assert!(!c.passed, "700 ms is not within 500 ms: {c:?}");
    }

    #[test]
    fn a_failed_request_is_disturbed_and_counted() {
        let obs = observed(0.0, Some(8000.0));
        let c = check(&expect("central", "1s"), &obs);
        assert!(
            !c.passed,
            "a failure at 8 s puts the failover at 3 s: {c:?}"
        );
        let failed = check(
            &Expect {
                max_failed: Some(0),
                ..Default::default()
            },
            &obs,
        );
        assert!(!failed.passed);
        assert!(
            failed.measured.starts_with("1 (first at 8.00 s"),
            "{failed:?}"
        );
    }

    #[test]
    fn links_seen_down_or_unknown_are_counted_degraded_ones_are_not() {
        let event = |t_ms: f64, state: &str| super::super::scenario::LinkEvent {
            t_ms,
            from: "east".into(),
            to: "west".into(),
            state: state.into(),
        };
        let no_down = Expect {
            max_links_down: Some(0),
            ..Default::default()
        };
        let mut obs = observed(0.0, None);
        obs.links = vec![event(0.0, "up"), event(10.0, "degraded"), event(20.0, "up")];
        let c = check(&no_down, &obs);
        assert!(c.passed && c.value == Some(0.0), "{c:?}");
        obs.links.push(event(30.0, "unknown"));
        obs.links.push(event(40.0, "down"));
        let c = check(&no_down, &obs);
        assert!(!c.passed && c.value == Some(2.0), "{c:?}");
        assert!(
            c.measured.contains("first at 0.03 s: east→west unknown"),
            "{c:?}"
        );
    }

    #[test]
    fn route_changes_count_stable_moves_only() {
        let seq = |clusters: &[(&str, usize)]| {
            let mut v = Vec::new();
            for (c, n) in clusters {
                for _ in 0..*n {
                    v.push(outcome(v.len() as f64, 1.0, Some(c)));
                }
            }
            v
        };
        // west → central → west: two changes; a short interleave of central is none.
        let o = seq(&[("west", 50), ("central", 40), ("west", 50)]);
        assert_eq!(route_changes(o.iter()), 2);
        let o = seq(&[("west", 50), ("central", 3), ("west", 50)]);
        assert_eq!(route_changes(o.iter()), 0);
        let o = seq(&[("west", 20), ("central", 10), ("west", 10), ("central", 10)]);
        assert_eq!(route_changes(o.iter()), 3);
    }

    #[test]
    fn recovery_counts_from_the_link_state_when_asked() {
        let event = |t_ms: f64, state: &str| super::super::scenario::LinkEvent {
            t_ms,
            from: "east".into(),
            to: "west".into(),
            state: state.into(),
        };
        // Traffic settles on central 700 ms after the cut; the link is seen down at 5,400 ms.
        let mut obs = observed(700.0, None);
        let since_down = Expect {
            after_link: Some("east->west down".into()),
            ..expect("central", "1s")
        };
        obs.links = vec![event(1000.0, "down"), event(5400.0, "down")];
        let c = check(&since_down, &obs);
        assert!(c.passed, "{c:?}");
        let v = c.value.expect("measured");
        assert!(
            (v - 300.0).abs() < 15.0,
            "700 ms after the cut is 300 ms after the link: {v}"
        );
        assert!(c.what.contains("link east→west down"), "{c:?}");
        // A state never seen after the step: not met, and said so.
        obs.links = vec![event(1000.0, "down")];
        let c = check(&since_down, &obs);
        assert!(!c.passed && c.measured.contains("never reached"), "{c:?}");
    }

    #[test]
    fn traffic_never_on_the_target_is_never() {
        let c = check(&expect("north", "5s"), &observed(0.0, None));
        assert!(!c.passed);
        assert_eq!(c.measured, "never");
    }

    #[test]
    fn phases_split_at_steps_with_shares_and_percentiles() {
        let obs = observed(0.0, None);
        let scenario = Plan::parse(
            "name: x\nduration: 10s\nload: [{from: east, service: payments.default}]\nsteps: [{at: 5s, do: cut east west}]\n",
        )
        .expect("parses")
        .scenario;
        let p = phases(&scenario, &obs);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].streams[0].requests, 500);
        assert_eq!(p[0].streams[0].share, vec![("west".to_string(), 100.0)]);
        assert_eq!(p[1].streams[0].share, vec![("central".to_string(), 100.0)]);
        assert_eq!(p[1].streams[0].p99_ms, 2.0);
    }

    #[test]
    fn bad_scenarios_are_refused_with_the_field() {
        for (yaml, needle) in [
            (
                "name: x\nduration: 10s\nload: [{from: east, service: a.b}]\nsteps: [{at: 5s, do: cut east}]\n",
                "steps[0].do",
            ),
            (
                "name: x\nduration: 10s\nload: [{from: east, service: a.b}]\nsteps: [{at: 12s, do: cut east west}]\n",
                "steps[0].at",
            ),
            (
                "name: x\nduration: 10s\nload: [{from: east, service: a.b}]\nexpect: [{traffic_on: west, after: heal east west, within: 1s}]\n",
                "no step `heal east west`",
            ),
            (
                "name: x\nduration: 10s\nload: [{from: east, service: a.b}]\nexpect: [{max_failed: 0, traffic_on: west}]\n",
                "exactly one of",
            ),
            (
                "name: x\nduration: 10s\nload: [{from: east, service: a.b}]\nsteps: [{at: 5s, do: heal east west}]\nexpect: [{traffic_on: west, after: heal east west, after_link: east->west happy, within: 1s}]\n",
                "expect[0].after_link",
            ),
            ("name: x\nduration: soon\nload: []\n", "duration"),
            (
                "name: x\nduration: 10s\nload: [{from: east, service: a.b, rtae: 5}]\n",
                "rtae",
            ),
        ] {
            let err = match Plan::parse(yaml) {
                Ok(_) => panic!("accepted:\n{yaml}"),
                Err(e) => format!("{e:#}"),
            };
            assert!(err.contains(needle), "`{needle}` not in: {err}");
        }
    }

    #[test]
    fn every_shipped_scenario_parses() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/lab/scenarios");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("deploy/lab/scenarios") {
            let path = entry.expect("entry").path();
            if let Err(e) = Plan::load(&path) {
                panic!("{e:#}");
            }
            n += 1;
        }
        assert!(n >= 8, "only {n} scenarios shipped");
    }
}
