//! The lab in loopback mode: every place on its own 127.1.K.* addresses, no network namespace,
//! every link a user-space relay (`strait lab relay`: UDP between gateways, TCP to etcd). The
//! same real parts as in netns mode; every shipped scenario must meet its expectations through
//! the relays, and the delay scenario too (what a kernel without tc netem cannot do in netns
//! mode); a cut shows up as datagrams dropped by the relay; an isolated cluster
//! (cut from etcd by its TCP relay) leaves the registry when its lease expires; a fault the
//! relays cannot model is refused and changes nothing; `lab down` stops every process.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpStream;
use std::time::Duration;

use crate::common::{
    Lab, SCENARIOS, an_isolated_cluster_leaves_the_registry_within_its_lease, print_measured, run,
    scenario, strait, text, wait_until,
};

/// `GET http://ADDR/` with `Host: HOST` (curl).
fn get(addr: &str, host: &str) -> String {
    let out = std::process::Command::new("curl")
        .args(["-s", "-m", "5", "-H", &format!("Host: {host}")])
        .arg(format!("http://{addr}/"))
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The relay process's statistics, asked on its control port.
fn relay_stats(control: &str) -> serde_json::Value {
    let mut s = TcpStream::connect(control).expect("the relay's control port");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"{\"stats\": null}\n").expect("send");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("answer");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("stats `{line}`: {e}"))
}

/// Datagrams the relays of `a → b` dropped.
fn dropped(control: &str, a: &str, b: &str) -> u64 {
    relay_stats(control)["paths"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["a"] == a && p["b"] == b)
        .map(|p| p["dropped"].as_u64().unwrap_or(0))
        .sum()
}

fn lab_state(dir: &str) -> serde_json::Value {
    let status = strait(&["lab", "status", "--dir", dir, "--json"]);
    assert!(status.status.success(), "{}", text(&status));
    serde_json::from_slice(&status.stdout).expect("status --json is JSON")
}

fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(") ")
                .and_then(|(_, r)| r.chars().next())
                .map(|c| c != 'Z' && c != 'X')
        })
        .unwrap_or(false)
}

#[test]
fn the_loopback_lab_fails_over_through_its_relays_without_losing_a_request() {
    let _one = crate::common::one_lab_at_a_time();
    let tmp = tempfile::tempdir().expect("tempdir");
    let name = format!("l{}", std::process::id() % 100_000);
    let dir_path = tmp.path().join("lab");
    let dir = dir_path.to_string_lossy().into_owned();
    let reports = tmp.path().join("reports");
    let _guard = Lab {
        dir: dir_path.clone(),
        name: name.clone(),
    };

    // As in netns mode: two control planes per cluster and a three-member etcd (reached
    // through a relay per member).
    let up = strait(&[
        "lab",
        "up",
        "--mode",
        "loopback",
        "--dir",
        &dir,
        "--name",
        &name,
        "--replicas",
        "2",
    ]);
    assert!(up.status.success(), "lab up failed:\n{}", text(&up));
    let state = lab_state(&dir);
    assert_eq!(state["mode"], "loopback");
    assert_eq!(state["shaper"], "relay");
    assert!(
        state["clusters"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|c| c["ns"] == ""),
        "no cluster lives in a namespace in loopback mode"
    );
    let ns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    assert!(
        !String::from_utf8_lossy(&ns.stdout).contains(&format!("strait-{name}-")),
        "loopback mode made network namespaces"
    );
    assert_eq!(
        state["processes"].as_array().map(Vec::len),
        Some(31),
        "the netns lab's 30 processes (with --replicas 2) and the relay process"
    );
    assert_eq!(state["links"].as_array().map(Vec::len), Some(6));
    let control = state["relay"]
        .as_str()
        .expect("the relay's control port in the state")
        .to_string();

    // Anyone can send traffic to a client sidecar's outbound address.
    let east_outbound = state["clusters"][0]["client"]["outbound"]
        .as_str()
        .expect("east's client outbound address")
        .to_string();
    // `lab up` waits for the links and for an answer from somewhere; that the links' states have
    // reached east's sidecar through the registry and the control plane is awaited here.
    wait_until(
        "payments from east to go to west first",
        Duration::from_secs(30),
        || {
            let answer = get(&east_outbound, "payments.default");
            if answer.starts_with("west ") {
                Ok(())
            } else {
                Err(answer)
            }
        },
    );

    // A fault the relays cannot model is refused, with the reason, and changes nothing.
    let bad = strait(&[
        "chaos", "--dir", &dir, "degrade", "east", "etcd", "--loss", "10%",
    ]);
    assert!(!bad.status.success(), "{}", text(&bad));
    assert!(
        text(&bad).contains("loss on a byte stream cannot be modelled"),
        "{}",
        text(&bad)
    );
    let links = lab_state(&dir)["links"].clone();
    assert!(
        links
            .as_array()
            .into_iter()
            .flatten()
            .all(|l| l["state"] == "up"),
        "a refused fault changed a link: {links}"
    );

    let dropped_before = dropped(&control, "east", "west") + dropped(&control, "west", "east");
    let mut failures = Vec::new();
    let etcd = format!("http://{}", state["etcd"]["addr"].as_str().expect("etcd"));
    for name in SCENARIOS.iter().chain(&[
        "degrade-delay",
        "cp-outage",
        "cert-rotation",
        "rolling-restart",
        "etcd-leader-loss",
    ]) {
        // Restarts are not withdrawals: etcd's own history shows west's record taken over by
        // each successor (a put under its lease), never deleted.
        let before = crate::common::etcd_revision("", &etcd);
        let (ok, v, out) = run(&dir, &reports, &scenario(name));
        print_measured(name, &v);
        if *name == "cp-restart" {
            crate::common::assert_records_taken_over_never_deleted(
                "",
                &etcd,
                before,
                &["west"],
                5,
                "five graceful restarts",
            );
        }
        if *name == "rolling-restart" {
            crate::common::assert_records_taken_over_never_deleted(
                "",
                &etcd,
                before,
                &["east", "central", "west"],
                1,
                "the rolling restart",
            );
        }
        if !ok {
            failures.push(format!("{name}:\n{out}"));
        }
        if *name == "cut-east-west" {
            let now = dropped(&control, "east", "west") + dropped(&control, "west", "east");
            assert!(
                now > dropped_before,
                "the cut dropped no datagram on the east ↔ west relays ({dropped_before} → {now})"
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));

    an_isolated_cluster_leaves_the_registry_within_its_lease(&dir, "", &etcd);

    // Down: every process stopped, the files gone, and again is fine.
    let pids: Vec<u64> = state["processes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["pid"].as_u64())
        .collect();
    let down = strait(&["lab", "down", "--dir", &dir, "--name", &name]);
    assert!(down.status.success(), "{}", text(&down));
    wait_until(
        "every process of the lab to be gone",
        Duration::from_secs(10),
        || match pids.iter().filter(|p| alive(**p)).count() {
            0 => Ok(()),
            n => Err(format!("{n} still running")),
        },
    );
    assert!(!dir_path.exists(), "the lab's files are left behind");
    let again = strait(&["lab", "down", "--dir", &dir, "--name", &name]);
    assert!(again.status.success(), "a second down: {}", text(&again));
}
