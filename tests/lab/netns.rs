//! The lab end to end, in netns mode (loopback mode: tests/lab/loopback.rs), with every real
//! part: `strait lab up` builds three clusters (real etcd, control planes, gateways over QUIC + mTLS, echo replicas, client
//! sidecars) in network namespaces; the shipped chaos scenarios run against it under load
//! (`strait chaos run`) and must meet their expectations — failover within 1 s and not one
//! failed request when a link is cut, a gateway or a zone dies, a cluster is isolated, a link
//! flaps or turns lossy, or etcd is away for a minute. Each prints its measured times. A
//! scenario whose expectation is wrong must fail; bad chaos commands get clear errors; an
//! endpoint added while etcd is away reaches every cluster once etcd is back; an isolated
//! cluster leaves the registry when its lease expires; `lab down` removes everything and is
//! safe to run twice.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{
    BIN, Lab, SCENARIOS, an_isolated_cluster_leaves_the_registry_within_its_lease, print_measured,
    run, scenario, strait, text, wait_until,
};

/// Without tc netem, degrade-delay's packets went through the NFQUEUE shaper: it held packets
/// of both ends of east ↔ west (and let every one go), and none of a link never delayed.
fn the_shaper_held_the_delayed_links_packets(state: &serde_json::Value) {
    use std::io::{BufRead as _, Write as _};
    let control = state["shaper_control"].as_str().expect("shaper_control");
    let mut s = std::net::TcpStream::connect(control).expect("shaper control port");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"{\"stats\": null}\n").expect("stats request");
    let mut line = String::new();
    std::io::BufReader::new(s)
        .read_line(&mut line)
        .expect("stats answer");
    let v: serde_json::Value = serde_json::from_str(&line).expect("stats JSON");
    let queues = v["queues"].as_array().expect("queues");
    let of = |a: &str, b: &str| {
        queues
            .iter()
            .find(|q| q["a"] == a && q["b"] == b)
            .unwrap_or_else(|| panic!("no queue {a} → {b}: {v}"))
    };
    for (a, b) in [("east", "west"), ("west", "east")] {
        let q = of(a, b);
        let queued = q["queued"].as_u64().unwrap_or(0);
        assert!(queued > 100, "{a} → {b}: only {queued} packets held: {q}");
        assert_eq!(
            q["held"], 0,
            "{a} → {b}: packets still held after the heal: {q}"
        );
        assert_eq!(
            q["delay_ms"], 0.0,
            "{a} → {b}: delay left after the heal: {q}"
        );
    }
    assert_eq!(
        of("central", "etcd")["queued"],
        0,
        "a link never delayed: {v}"
    );
    println!("shaper: {}", serde_json::to_string(&v).unwrap_or_default());
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

/// `GET http://ADDR/PATH` from inside namespace `ns` (curl).
fn get_in(ns: &str, addr: &str, path: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-s", "-m", "5"])
        .arg(format!("http://{addr}{path}"))
        .output()
        .expect("ip netns exec curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// How many of `cluster`'s payments endpoints the client sidecar in `ns` holds.
fn payments_endpoints(ns: &str, cluster: &str, own: bool) -> usize {
    get_in(ns, "127.0.0.1:15020", "/clusters")
        .lines()
        .filter(|l| l.starts_with("payments.default:9090::"))
        .filter(|l| {
            if own {
                !l.contains("via gateway")
            } else {
                l.contains(&format!("via gateway to {cluster}::"))
            }
        })
        .count()
}

/// etcd down; west's discovery file gains a payments endpoint: west's own sidecar gets it at
/// once (its control plane takes its own entries from the file), the others only once etcd is
/// back — then everywhere; removed again afterwards.
fn an_endpoint_added_while_etcd_is_away_appears_everywhere_after(dir: &str, name: &str) {
    let ns = |c: &str| format!("strait-{name}-{c}");
    let file = Path::new(dir).join("west/discovery.yaml");
    let original = std::fs::read_to_string(&file).expect("west's discovery file");
    let before = payments_endpoints(&ns("west"), "west", true);
    assert_eq!(
        before, 4,
        "west's own client holds west's four payments replicas"
    );
    assert_eq!(payments_endpoints(&ns("east"), "west", false), 4);

    let kill = strait(&["chaos", "--dir", dir, "kill", "etcd"]);
    assert!(kill.status.success(), "{}", text(&kill));
    let added = original.replacen(
        "    endpoints:\n      - {address: 10.240.0.3, port: 19081",
        "    endpoints:\n      - {address: 10.240.0.3, port: 19099, zone: zone-b}\n      - {address: 10.240.0.3, port: 19081",
        1,
    );
    assert_ne!(
        added, original,
        "the payments endpoints of west's discovery file:\n{original}"
    );
    std::fs::write(&file, &added).expect("edit west's discovery file");
    wait_until(
        "west's own client to see the new endpoint while etcd is away",
        Duration::from_secs(15),
        || match payments_endpoints(&ns("west"), "west", true) {
            5 => Ok(()),
            n => Err(format!("{n} endpoints")),
        },
    );
    assert_eq!(
        payments_endpoints(&ns("east"), "west", false),
        4,
        "east cannot know of it before etcd is back"
    );

    let restart = strait(&["chaos", "--dir", dir, "restart", "etcd"]);
    assert!(restart.status.success(), "{}", text(&restart));
    let took = wait_until(
        "east and central to see west's new endpoint after etcd's return",
        Duration::from_secs(30),
        || {
            let (e, c) = (
                payments_endpoints(&ns("east"), "west", false),
                payments_endpoints(&ns("central"), "west", false),
            );
            if e == 5 && c == 5 {
                Ok(())
            } else {
                Err(format!("east {e}, central {c}"))
            }
        },
    );
    println!(
        "an endpoint added during the etcd outage reached east and central {took:?} after etcd's restart"
    );

    std::fs::write(&file, &original).expect("restore west's discovery file");
    wait_until(
        "the endpoint to be removed everywhere",
        Duration::from_secs(30),
        || {
            let (w, e) = (
                payments_endpoints(&ns("west"), "west", true),
                payments_endpoints(&ns("east"), "west", false),
            );
            if w == 4 && e == 4 {
                Ok(())
            } else {
                Err(format!("west {w}, east {e}"))
            }
        },
    );
}

/// West's control plane stopped (SIGTERM) for longer than its lease: east keeps west's last
/// endpoints (stale); an endpoint added to west's discovery file meanwhile reaches east within
/// 2 s of the control plane's return. Then `strait registry withdraw --cluster west` (its
/// control plane stopped first) takes west out of east's and central's routes within 1 s, and
/// starting west's control plane again brings it back.
fn control_plane_outages_and_withdrawals(dir: &str, name: &str) {
    let ns = |c: &str| format!("strait-{name}-{c}");
    let file = Path::new(dir).join("west/discovery.yaml");
    let original = std::fs::read_to_string(&file).expect("west's discovery file");
    assert_eq!(payments_endpoints(&ns("east"), "west", false), 4);
    let chaos = |args: &[&str]| {
        let mut all = vec!["chaos", "--dir", dir];
        all.extend(args);
        let out = strait(&all);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
    };
    chaos(&["stop", "controlplane", "west"]);
    let added = original.replacen(
        "    endpoints:\n      - {address: 10.240.0.3, port: 19081",
        "    endpoints:\n      - {address: 10.240.0.3, port: 19099, zone: zone-b}\n      - {address: 10.240.0.3, port: 19081",
        1,
    );
    assert_ne!(added, original);
    std::fs::write(&file, &added).expect("edit west's discovery file");
    // Longer than west's lease (5 s): its entries leave the registry, east keeps them.
    wait_until(
        "west's entries to leave the registry while its control plane is stopped",
        Duration::from_secs(20),
        || match west_keys_in(&ns("etcd")) {
            0 => Ok(()),
            n => Err(format!("{n} keys of west")),
        },
    );
    assert_eq!(
        payments_endpoints(&ns("east"), "west", false),
        4,
        "east serves west's last endpoints while west's control plane is away"
    );
    chaos(&["start", "controlplane", "west"]);
    let took = wait_until(
        "east to see west's new endpoint after its control plane's return",
        Duration::from_secs(2),
        || match payments_endpoints(&ns("east"), "west", false) {
            5 => Ok(()),
            n => Err(format!("{n} endpoints")),
        },
    );
    println!(
        "an endpoint added while west's control plane was away reached east {took:?} after its return"
    );
    std::fs::write(&file, &original).expect("restore west's discovery file");
    wait_until(
        "the endpoint to be removed",
        Duration::from_secs(30),
        || match payments_endpoints(&ns("east"), "west", false) {
            4 => Ok(()),
            n => Err(format!("{n} endpoints")),
        },
    );

    // Withdrawal: west's control plane stopped first, then the command.
    chaos(&["stop", "controlplane", "west"]);
    let t = Instant::now();
    let out = Command::new("ip")
        .args(["netns", "exec", &ns("etcd")])
        .args([
            BIN,
            "registry",
            "withdraw",
            "--cluster",
            "west",
            "--etcd",
            "http://127.0.0.1:2379",
        ])
        .output()
        .expect("strait registry withdraw");
    assert!(out.status.success(), "{}", text(&out));
    wait_until(
        "west to leave east's and central's routes after its withdrawal",
        Duration::from_secs(1).saturating_sub(t.elapsed()),
        || {
            let (e, c) = (
                payments_endpoints(&ns("east"), "west", false),
                payments_endpoints(&ns("central"), "west", false),
            );
            if e == 0 && c == 0 {
                Ok(())
            } else {
                Err(format!("east {e}, central {c}"))
            }
        },
    );
    println!(
        "west left east's and central's routes {:?} after `strait registry withdraw`",
        t.elapsed()
    );
    chaos(&["start", "controlplane", "west"]);
    wait_until(
        "west to rejoin",
        Duration::from_secs(30),
        || match payments_endpoints(&ns("east"), "west", false) {
            4 => Ok(()),
            n => Err(format!("{n} endpoints")),
        },
    );
}

/// How many registry keys of west etcd holds, read inside etcd's namespace.
fn west_keys_in(etcd_ns: &str) -> usize {
    let out = Command::new("ip")
        .args(["netns", "exec", etcd_ns])
        .args([
            BIN,
            "registry",
            "dump",
            "--json",
            "--etcd",
            "http://127.0.0.1:2379",
        ])
        .output()
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

#[test]
fn the_lab_survives_every_shipped_chaos_scenario_without_losing_a_request() {
    let _one = crate::common::one_lab_at_a_time();
    let tmp = tempfile::tempdir().expect("tempdir");
    let name = format!("t{}", std::process::id() % 100_000);
    let dir_path = tmp.path().join("lab");
    let dir = dir_path.to_string_lossy().into_owned();
    let reports = tmp.path().join("reports");
    let _guard = Lab {
        dir: dir_path.clone(),
        name: name.clone(),
    };

    // Two control-plane replicas per cluster and a three-member etcd: every scenario runs with
    // them, and the rolling restart and the loss of etcd's leader need them.
    let up = strait(&[
        "lab",
        "up",
        "--dir",
        &dir,
        "--name",
        &name,
        "--replicas",
        "2",
    ]);
    assert!(up.status.success(), "lab up failed:\n{}", text(&up));
    {
        let st: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir_path.join("lab.json")).expect("lab.json"),
        )
        .expect("lab state");
        let procs = st["processes"].as_array().cloned().unwrap_or_default();
        let count = |role: &str| procs.iter().filter(|p| p["role"] == role).count();
        assert_eq!(count("etcd"), 3, "a three-member etcd");
        assert_eq!(count("controlplane"), 6, "two control planes per cluster");
        assert_eq!(count("gateway"), 6, "two gateways per cluster");
    }
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
    let shaper = usize::from(state["shaper"] == "nfqueue");
    assert_eq!(
        state["processes"].as_array().map(Vec::len),
        Some(30 + shaper),
        "three etcd members; per cluster two control planes, two gateways, a client, and per zone echo replicas and their sidecar; the NFQUEUE shaper without netem"
    );
    // Every gateway replica holds a connection to every replica of every other cluster's.
    for c in ["east", "central", "west"] {
        for admin in ["127.0.0.1:15000", "127.0.0.1:15100"] {
            let links: serde_json::Value =
                serde_json::from_str(&get_in(&format!("{prefix}{c}"), admin, "/links"))
                    .expect("/links is JSON");
            for l in links.as_array().into_iter().flatten() {
                let up = l["replicas"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|r| r["state"] == "up")
                    .count();
                assert_eq!(
                    up, 2,
                    "{c}'s gateway {admin}: link to {}: {l}",
                    l["cluster"]
                );
            }
        }
    }
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
    let bad = strait(&["chaos", "--dir", &dir, "restart", "gateway", "east/2"]);
    assert!(!bad.status.success());
    assert!(
        text(&bad).contains("cluster east has no gateway replica 2 (replicas 0 to 1)"),
        "{}",
        text(&bad)
    );
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
    let mut scenarios = SCENARIOS.to_vec();
    // A minute of control-plane outage: here only (the loopback lab runs the restarts).
    scenarios.push("cp-outage");
    // Every certificate renewed in place under load: here only (one lab suffices).
    scenarios.push("cert-rotation");
    // Replicas and etcd members restarted one after another; etcd's leader lost.
    scenarios.push("rolling-restart");
    scenarios.push("etcd-leader-loss");
    if state["shaper"] != "iptables" {
        // Delays need tc netem or NFQUEUE (the loopback test runs it in any case).
        scenarios.push("degrade-delay");
    }
    let lab_name = name.clone();
    for name in scenarios {
        // A rolling restart is not a withdrawal: etcd's own history of the cluster records
        // holds takeovers (puts under the successors' leases), never a delete.
        let etcd_ns = format!("strait-{lab_name}-etcd");
        let before = crate::common::etcd_revision(&etcd_ns, "http://127.0.0.1:2379");
        let (ok, v, out) = run(&dir, &reports, &scenario(name));
        print_measured(name, &v);
        if name == "rolling-restart" {
            crate::common::assert_records_taken_over_never_deleted(
                &etcd_ns,
                "http://127.0.0.1:2379",
                before,
                &["east", "central", "west"],
                1,
                "the rolling restart",
            );
        }
        if !ok {
            failures.push(format!("{name}:\n{out}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    if state["shaper"] == "nfqueue" {
        the_shaper_held_the_delayed_links_packets(&state);
    }

    an_endpoint_added_while_etcd_is_away_appears_everywhere_after(&dir, &name);
    control_plane_outages_and_withdrawals(&dir, &name);
    an_isolated_cluster_leaves_the_registry_within_its_lease(
        &dir,
        &format!("strait-{name}-etcd"),
        "http://127.0.0.1:2379",
    );

    // Down: everything gone, and again is fine.
    let down = strait(&["lab", "down", "--dir", &dir, "--name", &name]);
    assert!(down.status.success(), "{}", text(&down));
    assert!(namespaces(&prefix).is_empty(), "namespaces left behind");
    assert!(!dir_path.exists(), "the lab's files are left behind");
    let again = strait(&["lab", "down", "--dir", &dir, "--name", &name]);
    assert!(again.status.success(), "a second down: {}", text(&again));
}
