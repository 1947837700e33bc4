//! The lab end to end, in netns mode, with every real part: `strait lab up` builds three
//! clusters (real etcd, control planes, gateways over QUIC + mTLS, echo replicas, client
//! sidecars) in network namespaces; the shipped chaos scenarios run against it under load
//! (`strait chaos run`) and must meet their expectations — failover within 1 s and not one
//! failed request when a link is cut, a gateway or a zone dies, a cluster is isolated, a link
//! flaps or turns lossy, or etcd is away for a minute. Each prints its measured times. A
//! scenario whose expectation is wrong must fail; bad chaos commands get clear errors; `lab
//! down` removes everything and is safe to run twice.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_strait");

fn strait(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("strait {}: {e}", args.join(" ")))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Takes the lab down however the test ends.
struct Lab {
    dir: PathBuf,
    name: String,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let dir = self.dir.to_string_lossy().into_owned();
        let _ = strait(&["lab", "down", "--dir", &dir, "--name", &self.name]);
    }
}

fn namespaces(prefix: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

fn scenario(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/lab/scenarios")
        .join(format!("{name}.yaml"))
        .to_string_lossy()
        .into_owned()
}

/// Run a scenario; its results.json.
fn run(dir: &str, reports: &Path, file: &str) -> (bool, serde_json::Value, String) {
    let name = Path::new(file)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let report = reports.join(&name);
    let out = strait(&[
        "chaos",
        "--dir",
        dir,
        "run",
        file,
        "--report",
        &report.to_string_lossy(),
    ]);
    let results = std::fs::read_to_string(report.join("results.json"))
        .unwrap_or_else(|e| panic!("scenario {name}: no results.json ({e}):\n{}", text(&out)));
    let v: serde_json::Value = serde_json::from_str(&results).expect("results.json is JSON");
    for f in ["report.md", "report.html"] {
        let body = std::fs::read_to_string(report.join(f)).unwrap_or_default();
        assert!(
            body.contains(&name),
            "scenario {name}: {f} is missing or does not name the scenario"
        );
    }
    (out.status.success(), v, text(&out))
}

fn print_measured(name: &str, v: &serde_json::Value) {
    println!(
        "scenario {name}: {} requests, {} failed",
        v["requests"], v["failed"]
    );
    for e in v["expectations"].as_array().into_iter().flatten() {
        println!(
            "  {}: {} (goal {}){}",
            e["what"].as_str().unwrap_or_default(),
            e["measured"].as_str().unwrap_or_default(),
            e["goal"].as_str().unwrap_or_default(),
            if e["passed"].as_bool() == Some(true) {
                ""
            } else {
                "  NOT MET"
            }
        );
    }
}

#[test]
fn the_lab_survives_every_shipped_chaos_scenario_without_losing_a_request() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let name = format!("t{}", std::process::id() % 100_000);
    let dir_path = tmp.path().join("lab");
    let dir = dir_path.to_string_lossy().into_owned();
    let reports = tmp.path().join("reports");
    let _guard = Lab {
        dir: dir_path.clone(),
        name: name.clone(),
    };

    let up = strait(&["lab", "up", "--dir", &dir, "--name", &name]);
    assert!(up.status.success(), "lab up failed:\n{}", text(&up));
    let prefix = format!("strait-{name}-");
    let mut ns = namespaces(&prefix);
    ns.sort();
    assert_eq!(
        ns,
        ["central", "east", "etcd", "west"]
            .iter()
            .map(|p| format!("{prefix}{p}"))
            .collect::<Vec<_>>(),
        "one namespace per cluster and one for etcd"
    );
    let status = strait(&["lab", "status", "--dir", &dir, "--json"]);
    assert!(status.status.success(), "{}", text(&status));
    let state: serde_json::Value =
        serde_json::from_slice(&status.stdout).expect("status --json is JSON");
    assert_eq!(state["clusters"].as_array().map(Vec::len), Some(3));
    assert_eq!(
        state["links"].as_array().map(Vec::len),
        Some(6),
        "a full mesh of three clusters, and each to etcd"
    );
    assert_eq!(state["processes"].as_array().map(Vec::len), Some(16));
    let east = &state["clusters"][0];
    assert_eq!(east["name"], "east");
    assert!(
        east["client"]["outbound"].as_str().is_some(),
        "the client sidecar's outbound address is given: {east}"
    );

    // Bad chaos commands: clear errors, nothing disturbed.
    let bad = strait(&["chaos", "--dir", &dir, "cut", "east", "nowhere"]);
    assert!(!bad.status.success());
    assert!(
        text(&bad).contains("no link between `east` and `nowhere`"),
        "{}",
        text(&bad)
    );
    let bad = strait(&["chaos", "--dir", &dir, "kill", "gateway"]);
    assert!(!bad.status.success());
    assert!(text(&bad).contains("name the cluster"), "{}", text(&bad));
    let bad = strait(&["chaos", "--dir", &dir, "kill", "echo", "east/zone-q"]);
    assert!(
        text(&bad).contains("cluster east has no zone `zone-q`"),
        "{}",
        text(&bad)
    );
    if state["shaper"] == "iptables" {
        let bad = strait(&[
            "chaos", "--dir", &dir, "degrade", "east", "west", "--delay", "300ms",
        ]);
        assert!(!bad.status.success());
        assert!(text(&bad).contains("no tc netem"), "{}", text(&bad));
    }

    // A scenario that expects the impossible fails, and says what it measured.
    let wrong = tmp.path().join("wrong.yaml");
    std::fs::write(
        &wrong,
        "name: wrong\nduration: 4s\nload: [{from: east, service: payments.default, rate: 50}]\n\
         steps:\n  - {at: 1s, do: cut east west}\n  - {at: 3s, do: heal east west}\n\
         expect:\n  - {traffic_on: west, after: cut east west, within: 1s}\n",
    )
    .expect("write scenario");
    let (ok, v, out) = run(&dir, &reports, &wrong.to_string_lossy());
    assert!(
        !ok,
        "a scenario whose expectation cannot hold passed:\n{out}"
    );
    assert_eq!(v["passed"], false);
    assert_eq!(v["expectations"][0]["passed"], false, "{out}");

    let mut failures = Vec::new();
    for name in [
        "cut-east-west",
        "kill-zone",
        "kill-gateway",
        "isolate-west",
        "degrade-loss",
        "flap",
        "kill-etcd",
    ] {
        let (ok, v, out) = run(&dir, &reports, &scenario(name));
        print_measured(name, &v);
        assert!(
            v["requests"].as_u64().unwrap_or(0) > 500,
            "scenario {name}: too few requests to mean anything: {}",
            v["requests"]
        );
        if !ok {
            failures.push(format!("{name}:\n{out}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));

    // Down: everything gone, and again is fine.
    let down = strait(&["lab", "down", "--dir", &dir, "--name", &name]);
    assert!(down.status.success(), "{}", text(&down));
    assert!(namespaces(&prefix).is_empty(), "namespaces left behind");
    assert!(!dir_path.exists(), "the lab's files are left behind");
    let again = strait(&["lab", "down", "--dir", &dir, "--name", &name]);
    assert!(again.status.success(), "a second down: {}", text(&again));
}
