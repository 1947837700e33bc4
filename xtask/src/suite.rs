//! `cargo xtask bench suite [--quick]`: every comparison with a peer in one command — the sidecar
//! hop and memory at scale against Envoy (`proxy`), the cross-cluster path against an
//! Istio-style Envoy mesh, clean and under loss (`mesh`), and failover against the same mesh
//! (`failover`) — then writes what they printed, the machine and the commands into a generated
//! block of `docs/benchmarks.md`, and the latency distributions the benchmarks leave in
//! `target/bench-suite/*.tsv` into `docs/bench-latency.svg`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

const BEGIN: &str =
    "<!-- suite:begin — written by `cargo xtask bench suite`; edits inside are overwritten -->";
const END: &str = "<!-- suite:end -->";

/// One benchmark of the suite: its name, what it compares, its options (full, quick).
struct Step {
    name: &'static str,
    what: &'static str,
    full: &'static [&'static str],
    quick: &'static [&'static str],
}

const STEPS: &[Step] = &[
    Step {
        name: "proxy",
        what: "the sidecar hop (HTTP/1.1, HTTP/2) and memory at scale: strait proxy against Envoy 1.40 and a direct connection",
        full: &["--secs", "3", "--repeat", "9"],
        quick: &["--secs", "2", "--repeat", "3", "--scale", "0"],
    },
    Step {
        name: "mesh",
        what: "the cross-cluster path against Istio's multi-network path from stock Envoys and raw quinn, clean and under loss",
        full: &[],
        quick: &[
            "--secs",
            "3",
            "--repeat",
            "1",
            "--mib",
            "64",
            "--bulk-repeat",
            "1",
            "--ttfb",
            "50",
        ],
    },
    Step {
        name: "failover",
        what: "the lab's link cut through Strait and through the Envoy mesh",
        full: &[],
        quick: &["--repeat", "3", "--long-repeat", "0"],
    },
];

fn say(msg: &str) {
    println!("\x1b[1mxtask:\x1b[0m {msg}");
}

fn text_of(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// This machine, in one line.
fn machine() -> String {
    let cpus = text_of(&mut Command::new("nproc"));
    let model = text_of(&mut Command::new("lscpu"))
        .lines()
        .find_map(|l| l.strip_prefix("Model name:").map(|m| m.trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = text_of(Command::new("uname").arg("-r"));
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    format!("{cpus} vCPU ({model}), {mem_gib:.0} GiB RAM, Linux {kernel}")
}

/// Run one benchmark, showing its output as it comes; what it printed on stdout.
fn run_step(root: &Path, step: &Step, args: &[&str], out: &Path) -> Result<String, String> {
    let shown = format!("cargo bench --bench {} -- {}", step.name, args.join(" "));
    say(&format!("{}: {}", step.name, step.what));
    say(&format!("running `{}`", shown.trim_end()));
    let mut child = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root)
        .args(["bench", "--bench", step.name, "--"])
        .args(args)
        .env("STRAIT_BENCH_OUT", out)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{shown}: {e}"))?;
    let mut printed = String::new();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("{line}");
            printed.push_str(&line);
            printed.push('\n');
        }
    }
    let status = child.wait().map_err(|e| format!("{shown}: {e}"))?;
    if status.success() {
        Ok(printed)
    } else {
        Err(format!("{shown} failed with {status}"))
    }
}

pub fn run(root: &Path, quick: bool, is_root: bool) -> Result<(), String> {
    if !is_root {
        return Err(
            "the suite needs root: `mesh` and `failover` build labs in network namespaces".into(),
        );
    }
    let out = root.join("target/bench-suite");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let date = text_of(Command::new("date").args(["-u", "+%Y-%m-%d"]));
    let started = std::time::Instant::now();
    let mut section = format!(
        "{BEGIN}\n\n## Suite run of {date} (`cargo xtask bench suite{}`)\n\n\
         Machine: {}. Every comparison below was measured side by side in this one run; the \
         sections after this one explain each benchmark and keep earlier runs.\n\n\
         ![Latency distributions at 1,000 requests/s](bench-latency.svg)\n",
        if quick { " --quick" } else { "" },
        machine()
    );
    for step in STEPS {
        let args = if quick { step.quick } else { step.full };
        let printed = run_step(root, step, args, &out)?;
        section.push_str(&format!(
            "\n### `{}`: {}\n\n`cargo bench --bench {} -- {}`\n\n{}\n",
            step.name,
            step.what,
            step.name,
            args.join(" "),
            printed.trim()
        ));
    }
    section.push_str(&format!(
        "\nThe suite took {:.0} minutes.\n\n{END}\n",
        started.elapsed().as_secs_f64() / 60.0
    ));

    let panels = read_panels(&out)?;
    let chart = root.join("docs/bench-latency.svg");
    std::fs::write(&chart, svg(&panels)).map_err(|e| format!("{}: {e}", chart.display()))?;
    let doc = root.join("docs/benchmarks.md");
    let text = std::fs::read_to_string(&doc).map_err(|e| format!("{}: {e}", doc.display()))?;
    std::fs::write(&doc, splice(&text, &section)).map_err(|e| format!("{}: {e}", doc.display()))?;
    say(&format!(
        "wrote {} and {}",
        doc.strip_prefix(root).unwrap_or(&doc).display(),
        chart.strip_prefix(root).unwrap_or(&chart).display()
    ));
    Ok(())
}

/// `text` with the generated block replaced by `section`, or, the first time, `section`
/// inserted before the first `## ` heading.
fn splice(text: &str, section: &str) -> String {
    if let (Some(a), Some(b)) = (text.find(BEGIN), text.find(END))
        && a < b
    {
        let mut s = text[..a].to_string();
        s.push_str(section.trim_end());
        s.push_str(&text[b + END.len()..]);
        return s;
    }
    match text.find("\n## ") {
        Some(i) => format!("{}\n{}\n{}", &text[..i + 1], section, &text[i + 1..]),
        None => format!("{text}\n{section}"),
    }
}

/// One chart: a title and its series of (quantile, µs) points.
#[derive(Debug, PartialEq)]
pub struct Panel {
    pub title: String,
    pub series: Vec<(String, Vec<(f64, f64)>)>,
}

/// The `*.tsv` the benchmarks wrote (`# title`, then `series<TAB>quantile<TAB>µs` lines).
fn read_panels(dir: &Path) -> Result<Vec<Panel>, String> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "tsv"))
        .collect();
    files.sort();
    let mut panels = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(|e| format!("{}: {e}", f.display()))?;
        panels.push(parse_panel(&text).map_err(|e| format!("{}: {e}", f.display()))?);
    }
    Ok(panels)
}

pub fn parse_panel(text: &str) -> Result<Panel, String> {
    let mut panel = Panel {
        title: String::new(),
        series: Vec::new(),
    };
    for (n, line) in text.lines().enumerate() {
        if let Some(t) = line.strip_prefix("# ") {
            panel.title = t.to_string();
            continue;
        }
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split('\t').collect();
        let (Some(name), Some(q), Some(us)) = (f.first(), f.get(1), f.get(2)) else {
            return Err(format!("line {}: expected series, quantile, µs", n + 1));
        };
        let q: f64 = q
            .parse()
            .map_err(|_| format!("line {}: quantile {q:?}", n + 1))?;
        let us: f64 = us
            .parse()
            .map_err(|_| format!("line {}: µs {us:?}", n + 1))?;
        if !(0.0..1.0).contains(&q) || us <= 0.0 {
            return Err(format!(
                "line {}: quantile {q} or µs {us} out of range",
                n + 1
            ));
        }
        match panel.series.iter_mut().find(|(s, _)| s == name) {
            Some((_, pts)) => pts.push((q, us)),
            None => panel.series.push((name.to_string(), vec![(q, us)])),
        }
    }
    Ok(panel)
}

const COLORS: [&str; 5] = ["#4e79a7", "#e15759", "#59a14f", "#f28e2b", "#76b7b2"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The panels one above the other: x the quantile on a "nines" scale (50 %, 90 %, 99 %,
/// 99.9 %), y the latency on a log scale.
pub fn svg(panels: &[Panel]) -> String {
    let (w, h, left, right, top, bottom) = (760.0, 300.0, 70.0, 170.0, 34.0, 40.0);
    let total = h * panels.len().max(1) as f64;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{total}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let nines = |q: f64| -(1.0 - q).log10();
    let (x0, x1) = (nines(0.5), nines(0.999));
    for (i, p) in panels.iter().enumerate() {
        let oy = h * i as f64;
        let all: Vec<f64> = p
            .series
            .iter()
            .flat_map(|(_, v)| v.iter().map(|x| x.1))
            .collect();
        let lo = all
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min)
            .max(1.0)
            .log10()
            .floor();
        let hi = all
            .iter()
            .copied()
            .fold(0.0, f64::max)
            .max(10.0)
            .log10()
            .ceil()
            .max(lo + 1.0);
        let (pw, ph) = (w - left - right, h - top - bottom);
        let x = |q: f64| left + (nines(q) - x0) / (x1 - x0) * pw;
        let y = |us: f64| oy + top + ph - (us.log10() - lo) / (hi - lo) * ph;
        s.push_str(&format!(
            "<text x=\"{left}\" y=\"{}\" font-size=\"14\" font-weight=\"bold\">{}</text>\n",
            oy + 20.0,
            esc(&p.title)
        ));
        for q in [0.5, 0.9, 0.99, 0.999] {
            let gx = x(q);
            s.push_str(&format!(
                "<line x1=\"{gx:.1}\" y1=\"{:.1}\" x2=\"{gx:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>\
                 <text x=\"{gx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">p{}</text>\n",
                oy + top,
                oy + top + ph,
                oy + top + ph + 16.0,
                q * 100.0
            ));
        }
        let mut decade = lo;
        while decade <= hi {
            let us = 10f64.powf(decade);
            let gy = y(us);
            let label = if us >= 1000.0 {
                format!("{} ms", us / 1000.0)
            } else {
                format!("{us} µs")
            };
            s.push_str(&format!(
                "<line x1=\"{left}\" y1=\"{gy:.1}\" x2=\"{:.1}\" y2=\"{gy:.1}\" stroke=\"#ddd\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{label}</text>\n",
                left + pw,
                left - 6.0,
                gy + 4.0
            ));
            decade += 1.0;
        }
        for (k, (name, pts)) in p.series.iter().enumerate() {
            let color = COLORS[k % COLORS.len()];
            let line: Vec<String> = pts
                .iter()
                .filter(|(q, _)| *q >= 0.5)
                .map(|(q, us)| format!("{:.1},{:.1}", x(*q), y(*us)))
                .collect();
            s.push_str(&format!(
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n\
                 <rect x=\"{:.1}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{color}\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n",
                line.join(" "),
                left + pw + 16.0,
                oy + top + 18.0 * k as f64,
                left + pw + 34.0,
                oy + top + 10.0 + 18.0 * k as f64,
                esc(name)
            ));
        }
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_block_is_inserted_once_then_replaced() {
        let doc = "# Benchmarks\n\nintro\n\n## Registry\n\ntext\n";
        let once = splice(doc, &format!("{BEGIN}\nfirst\n{END}\n"));
        assert!(once.starts_with("# Benchmarks\n\nintro\n\n"), "{once}");
        assert!(
            once.contains("first") && once.contains("## Registry\n\ntext"),
            "{once}"
        );
        let twice = splice(&once, &format!("{BEGIN}\nsecond\n{END}\n"));
        assert!(
            !twice.contains("first") && twice.contains("second"),
            "{twice}"
        );
        assert_eq!(twice.matches(BEGIN).count(), 1);
        assert!(twice.contains("## Registry\n\ntext"), "{twice}");
    }

    #[test]
    fn latency_files_become_panels_and_bad_lines_are_named() {
        let p = parse_panel("# Sidecar\nstrait\t0.5\t80\nstrait\t0.99\t120\nenvoy\t0.5\t170\n")
            .unwrap();
        assert_eq!(p.title, "Sidecar");
        assert_eq!(p.series.len(), 2);
        assert_eq!(p.series[0].1, vec![(0.5, 80.0), (0.99, 120.0)]);
        let e = parse_panel("# t\nstrait\t0.5\n").unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        let e = parse_panel("# t\nstrait\t1.5\t3\n").unwrap_err();
        assert!(e.contains("out of range"), "{e}");
        let chart = svg(&[p]);
        assert!(
            chart.starts_with("<svg") && chart.contains("polyline"),
            "{chart}"
        );
        assert!(chart.contains(">strait<") && chart.contains(">envoy<"));
    }
}
