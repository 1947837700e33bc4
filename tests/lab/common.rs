//! What the lab's end-to-end tests share: the `strait` binary, a guard that takes a lab down
//! however a test ends, shipped scenarios run with their report checked, bounded waits.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_strait");

/// Held by each lab test while it runs: two labs at once would share the machine's two cores
/// (and loopback ports), and every figure they measure would be the other's noise.
static LAB: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Wait for the other lab test to finish (a failed one poisons nothing worth keeping).
pub fn one_lab_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    LAB.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn strait(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("strait {}: {e}", args.join(" ")))
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Takes the lab down however the test ends.
pub struct Lab {
    pub dir: PathBuf,
    pub name: String,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let dir = self.dir.to_string_lossy().into_owned();
        let _ = strait(&["lab", "down", "--dir", &dir, "--name", &self.name]);
    }
}

/// The shipped scenarios every lab must pass (netns and loopback mode alike); `degrade-delay`
/// also, where links can be delayed.
pub const SCENARIOS: [&str; 8] = [
    "cut-east-west",
    "cp-restart",
    "kill-zone",
    "kill-gateway",
    "isolate-west",
    "degrade-loss",
    "flap",
    "kill-etcd",
];

pub fn scenario(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/lab/scenarios")
        .join(format!("{name}.yaml"))
        .to_string_lossy()
        .into_owned()
}

/// Run a scenario; its results.json.
pub fn run(dir: &str, reports: &Path, file: &str) -> (bool, serde_json::Value, String) {
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

pub fn print_measured(name: &str, v: &serde_json::Value) {
    // The longest stall: the slowest request (from when it was due to its answer).
    let longest = v["observed"]["outcomes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["latency_ms"].as_f64())
        .fold(0.0, f64::max);
    println!(
        "scenario {name}: {} requests, {} failed, longest request {longest:.0} ms",
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

/// Wait (bounded) until `check` holds; panics with `what` and the last observation.
pub fn wait_until(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> Result<(), String>,
) -> Duration {
    let start = Instant::now();
    loop {
        match check() {
            Ok(()) => return start.elapsed(),
            Err(seen) if start.elapsed() > within => {
                panic!("{what}: not within {within:?}; last seen: {seen}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// How many registry keys of cluster `west` etcd holds (read with `strait registry dump`, from
/// namespace `ns` unless it is empty).
fn west_keys(ns: &str, etcd: &str) -> usize {
    let dump = [BIN, "registry", "dump", "--json", "--etcd", etcd];
    let out = if ns.is_empty() {
        Command::new(BIN).args(&dump[1..]).output()
    } else {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(dump)
            .output()
    }
    .expect("registry dump");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["entries"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|e| {
                    let k = e["key"].as_str().unwrap_or_default();
                    k.contains("/clusters/west") || k.contains("/endpoints/west/")
                })
                .count()
        })
        .unwrap_or(0)
}

/// West cut from everything (etcd included): its entries leave the registry when its lease
/// (5 s) expires — not before 2 s, so an explicit deletion would not pass for expiry — and come
/// back after the heal. `etcd_ns` and `etcd` are where etcd is reached from.
pub fn an_isolated_cluster_leaves_the_registry_within_its_lease(
    dir: &str,
    etcd_ns: &str,
    etcd: &str,
) {
    wait_until(
        "west's cluster record and its services in the registry",
        Duration::from_secs(30),
        || match west_keys(etcd_ns, etcd) {
            n if n >= 3 => Ok(()),
            n => Err(format!("{n} keys of west")),
        },
    );
    // Timed from before the command: the cut of west's etcd link may come first among its links.
    let cut = Instant::now();
    let isolate = strait(&["chaos", "--dir", dir, "isolate", "west"]);
    assert!(isolate.status.success(), "{}", text(&isolate));
    wait_until(
        "west's entries to leave the registry",
        Duration::from_secs(15),
        || match west_keys(etcd_ns, etcd) {
            0 => Ok(()),
            n => Err(format!("{n} keys of west")),
        },
    );
    let gone = cut.elapsed();
    println!("isolated west left the registry {gone:?} after the cut (lease TTL 5 s)");
    // The last renewal before the cut can be up to a third of the TTL old: expiry comes at the
    // earliest ~3.3 s after it; an explicit deletion would come at once.
    assert!(
        gone >= Duration::from_secs(2),
        "west's entries vanished before its lease could expire ({gone:?})"
    );
    let heal = strait(&["chaos", "--dir", dir, "heal", "west"]);
    assert!(heal.status.success(), "{}", text(&heal));
    wait_until(
        "west's entries to come back",
        Duration::from_secs(30),
        || match west_keys(etcd_ns, etcd) {
            0 => Err("none".into()),
            _ => Ok(()),
        },
    );
}

/// etcd's current revision (asked of the member at `etcd`, from namespace `ns`, "" for none).
pub fn etcd_revision(ns: &str, etcd: &str) -> i64 {
    use base64::Engine as _;
    let key = base64::engine::general_purpose::STANDARD.encode("/");
    let out = curl_in(
        ns,
        &["-s", "-m", "5", &format!("{etcd}/v3/kv/range")],
        &format!("{{\"key\": \"{key}\", \"count_only\": true}}"),
    );
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("etcd's range answer `{out}`: {e}"));
    v["header"]["revision"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no revision in {out}"))
}

/// What etcd itself records for keys under `prefix` after revision `from` (a watch from that
/// revision, which etcd replays from its history): (`PUT` or `DELETE`, key) per event.
pub fn etcd_history(ns: &str, etcd: &str, prefix: &str, from: i64) -> Vec<(String, String)> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    let request = format!(
        "{{\"create_request\": {{\"key\": \"{}\", \"range_end\": \"{}\", \"start_revision\": {}}}}}",
        b64.encode(prefix),
        b64.encode(&end),
        from + 1
    );
    // The stream stays open: what etcd replays arrives at once, the time limit ends it.
    let out = curl_in(
        ns,
        &["-s", "-N", "-m", "3", &format!("{etcd}/v3/watch")],
        &request,
    );
    let mut events = Vec::new();
    let mut de = serde_json::Deserializer::from_str(&out).into_iter::<serde_json::Value>();
    while let Some(Ok(v)) = de.next() {
        for e in v["result"]["events"].as_array().into_iter().flatten() {
            let kind = e["type"].as_str().unwrap_or("PUT").to_string();
            let key = e["kv"]["key"]
                .as_str()
                .and_then(|k| b64.decode(k).ok())
                .map(|k| String::from_utf8_lossy(&k).into_owned())
                .unwrap_or_default();
            events.push((kind, key));
        }
    }
    events
}

fn curl_in(ns: &str, args: &[&str], body: &str) -> String {
    let mut c = if ns.is_empty() {
        Command::new("curl")
    } else {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, "curl"]);
        c
    };
    let out = c
        .args(args)
        .args(["-H", "Content-Type: application/json", "-d", body])
        .output()
        .expect("curl runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// etcd's history of the cluster records since revision `from` holds no delete, and at least
/// `min` takeovers (puts under a successor's lease) of each of `clusters`' records.
pub fn assert_records_taken_over_never_deleted(
    ns: &str,
    etcd: &str,
    from: i64,
    clusters: &[&str],
    min: usize,
    during: &str,
) {
    let events = etcd_history(ns, etcd, "/strait/v1/clusters/", from);
    let deletes: Vec<_> = events.iter().filter(|(k, _)| k == "DELETE").collect();
    assert!(
        deletes.is_empty(),
        "cluster records deleted during {during}: {deletes:?}"
    );
    for c in clusters {
        let key = format!("/strait/v1/clusters/{c}");
        let takeovers = events
            .iter()
            .filter(|(k, at)| k == "PUT" && *at == key)
            .count();
        assert!(
            takeovers >= min,
            "{during}: {takeovers} takeovers of {c}'s record (at least {min} expected): {events:?}"
        );
    }
}
