//! Failover when an inter-cluster link is cut, Strait against an Istio-style Envoy mesh in the
//! same lab and the same run (benchmark issue, item 5).
//!
//! A lab of three clusters in network namespaces (`strait lab up`, netns mode: root). Strait's
//! path is the lab's own: east's client sidecar calls `payments` (policy: west, then central)
//! through east's gateway and the QUIC links to the replicas' sidecars. Next to it this
//! benchmark builds Istio's multi-network data path from stock Envoy 1.40, reaching the same
//! replicas (the `strait lab echo` processes): in east an Envoy sidecar (127.0.0.1:27001, one
//! worker) whose `payments` cluster has west's east-west gateway at priority 0 and central's at
//! priority 1 (Istio's locality failover), with mTLS origination (SNI
//! `outbound_.9090_._.payments.default.svc.cluster.local`), Istio's default connect timeout
//! (10 s), route (no timeout) and retry policy (2 retries on connect-failure, refused-stream,
//! unavailable, cancelled, retriable-status-codes, other hosts first), and Istio's recommended
//! outlier detection (5 consecutive 5xx or gateway errors, interval 1 s, 30 s base ejection,
//! up to 100 % ejected, panic threshold 0); in west and central an Envoy east-west gateway (TLS
//! passthrough by SNI, two workers) and an Envoy sidecar terminating mTLS in front of the four
//! replicas (one worker).
//!
//! Both run the same scenario, `deploy/lab/scenarios/bench-cut.yaml` (200 requests/s from east,
//! the link east ↔ west cut 3 s in and healed 4 s later), the Envoy mesh's load sent to its
//! sidecar (`via` in the scenario's load); runs alternate, the Envoy sidecar restarted before
//! each of its runs so that no ejection carries over. `--long-repeat N` (default 1) adds runs
//! of the same cut held for 20 s, long enough for Envoy's timeouts and ejections to act.
//! Failover time: from the cut until the end of the last disturbed request (failed, answered by
//! west, or slower than 3× the steady state's p99), as in `strait chaos` reports.
//!
//! Run: `cargo xtask bench failover` (= `cargo bench --bench failover`, as root). Options:
//! `--repeat N` (default 10).
// Tests and benchmarks: an unwrap is an assertion (a failure with the value's message).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::envoy::{
    certs, http_manager, istio_sni, sock, static_cluster, tcp_proxy, tls_inspector, tls_socket,
};
use common::lab::{Lab, Place};
use common::{Proc, arg};
use serde_json::{Value, json};

const PAYMENTS: u16 = 9090;
/// The replicas of `payments` in a cluster: 19081–19084 on its local address (zone-a: 1–2,
/// zone-b: 3–4), as the lab runs them.
const REPLICAS: [u16; 4] = [19081, 19082, 19083, 19084];
/// The Envoy server sidecar's inbound listener for a replica: its port + 1100, on the cluster
/// address.
const INBOUND_OFFSET: u16 = 1100;
const CLIENT_PORT: u16 = 27001;
const CLIENT_ADMIN: u16 = 27000;
const EW_PORT: u16 = 27443;
const EW_ADMIN: u16 = 27100;
const SERVER_ADMIN: u16 = 27200;

fn service() -> String {
    istio_sni(PAYMENTS, "payments", "default")
}

/// East's Envoy sidecar: `payments` at west's gateway (priority 0) and central's (priority 1).
fn envoy_client(me: &Path, west: &Place, central: &Place, trust_domain: &str) -> Value {
    let cluster = format!("outbound|{PAYMENTS}||payments.default.svc.cluster.local");
    let sans: Vec<Value> = [west, central]
        .iter()
        .map(|c| {
            json!({"san_type": "URI", "matcher": {"exact":
                format!("spiffe://{trust_domain}/cluster/{}/ns/default/sa/echo", c.name)}})
        })
        .collect();
    let tls = tls_socket(
        "UpstreamTlsContext",
        json!({
            "sni": service(),
            "common_tls_context": {
                "tls_certificates": [certs(me)],
                "validation_context": {
                    "trusted_ca": {"filename": me.join("ca.pem").to_string_lossy()},
                    "match_typed_subject_alt_names": sans,
                },
                "alpn_protocols": ["http/1.1"],
            },
        }),
    );
    let mut c = static_cluster(
        &cluster,
        &[
            (sock(west.addr, EW_PORT), 0),
            (sock(central.addr, EW_PORT), 1),
        ],
        Some(tls),
    );
    c["connect_timeout"] = json!("10s");
    c["outlier_detection"] = json!({
        "consecutive_5xx": 5,
        "enforcing_consecutive_5xx": 100,
        "consecutive_gateway_failure": 5,
        "enforcing_consecutive_gateway_failure": 100,
        "interval": "1s",
        "base_ejection_time": "30s",
        "max_ejection_percent": 100,
    });
    c["common_lb_config"] = json!({"healthy_panic_threshold": {"value": 0}});
    let route = json!({
        "timeout": "0s",
        "retry_policy": {
            "retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
            "num_retries": 2,
            "retry_host_predicate": [{
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"},
            }],
            "host_selection_retry_max_attempts": 5,
        },
    });
    json!({
        "admin": {"address": sock(Ipv4Addr::LOCALHOST, CLIENT_ADMIN)},
        "static_resources": {
            "listeners": [{
                "name": "outbound",
                "address": sock(Ipv4Addr::LOCALHOST, CLIENT_PORT),
                "filter_chains": [{"filters": [http_manager("outbound", &cluster, route)]}],
            }],
            "clusters": [c],
        },
    })
}

/// A cluster's east-west gateway: TLS passthrough by SNI to the server sidecar's listeners.
fn envoy_gateway(c: &Place) -> Value {
    let name = format!("inbound|{PAYMENTS}||payments");
    let endpoints: Vec<(Value, u32)> = REPLICAS
        .iter()
        .map(|p| (sock(c.addr, p + INBOUND_OFFSET), 0))
        .collect();
    json!({
        "admin": {"address": sock(Ipv4Addr::LOCALHOST, EW_ADMIN)},
        "static_resources": {
            "listeners": [{
                "name": "eastwest",
                "address": sock(c.addr, EW_PORT),
                "listener_filters": [tls_inspector()],
                "filter_chains": [{
                    "filter_chain_match": {"server_names": [service()]},
                    "filters": [tcp_proxy("eastwest", &name)],
                }],
            }],
            "clusters": [static_cluster(&name, &endpoints, None)],
        },
    })
}

/// A cluster's server sidecar: for each replica, mTLS termination (a client certificate of
/// the lab's CA required) and HTTP to the replica.
fn envoy_server(c: &Place, me: &Path) -> Value {
    let mut listeners = Vec::new();
    let mut clusters = Vec::new();
    for port in REPLICAS {
        let name = format!("inbound|{port}");
        let tls = tls_socket(
            "DownstreamTlsContext",
            json!({
                "require_client_certificate": true,
                "common_tls_context": {
                    "tls_certificates": [certs(me)],
                    "validation_context": {"trusted_ca": {"filename": me.join("ca.pem").to_string_lossy()}},
                    "alpn_protocols": ["http/1.1"],
                },
            }),
        );
        listeners.push(json!({
            "name": name,
            "address": sock(c.addr, port + INBOUND_OFFSET),
            "filter_chains": [{
                "transport_socket": tls,
                "filters": [http_manager(&format!("inbound_{port}"), &name, json!({"timeout": "0s"}))],
            }],
        }));
        clusters.push(static_cluster(
            &name,
            &[(sock(Ipv4Addr::LOCALHOST, port), 0)],
            None,
        ));
    }
    json!({
        "admin": {"address": sock(Ipv4Addr::LOCALHOST, SERVER_ADMIN)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    })
}

/// What one scenario run measured.
#[derive(Debug, Clone)]
struct RunFigures {
    /// From the cut until all traffic is on central; `None`: never.
    failover_ms: Option<f64>,
    /// From the heal until all traffic is back on west; `None`: never.
    recovery_ms: Option<f64>,
    requests: u64,
    failed: u64,
}

fn figures(report: &Path) -> RunFigures {
    let r: Value = std::fs::read(report.join("results.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| panic!("no results in {}", report.display()));
    let value = |prefix: &str| {
        r["expectations"].as_array().and_then(|es| {
            es.iter()
                .find(|e| e["what"].as_str().is_some_and(|w| w.starts_with(prefix)))
                .and_then(|e| e["value"].as_f64())
        })
    };
    RunFigures {
        failover_ms: value("all traffic on central"),
        recovery_ms: value("all traffic on west"),
        requests: r["requests"].as_u64().unwrap_or(0),
        failed: r["failed"].as_u64().unwrap_or(0),
    }
}

/// Run `scenario` once; the Envoy mesh's runs may miss the expectations (that is measured, not
/// an error), but a run must leave its results.
fn run(lab: &Lab, scenario: &Path, report: &Path) -> RunFigures {
    let out = lab.chaos(&[
        "run",
        &scenario.to_string_lossy(),
        "--report",
        &report.to_string_lossy(),
    ]);
    if let Err(e) = &out
        && !report.join("results.json").exists()
    {
        panic!("{e}");
    }
    figures(report)
}

/// GET payments through east's Envoy sidecar until west answers (60 s at most).
fn wait_envoy_serves_west(east: &Place) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    while Instant::now() < deadline {
        let out = Command::new("ip")
            .args(["netns", "exec", &east.ns, "curl", "-s", "-m", "2"])
            .args(["-H", "Host: payments.default"])
            .arg(format!("http://127.0.0.1:{CLIENT_PORT}/"))
            .output();
        match out {
            Ok(o) if String::from_utf8_lossy(&o.stdout).starts_with("west ") => return,
            Ok(o) => last = String::from_utf8_lossy(&o.stdout).into_owned(),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "the Envoy mesh does not serve payments from west within 60 s (last answer: {last:?}); Envoy logs in target/bench-failover-envoy"
    );
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "never".into(), |v| format!("{v:.0} ms"))
}

fn summary(label: &str, runs: &[RunFigures]) -> String {
    let mut f: Vec<f64> = runs.iter().filter_map(|r| r.failover_ms).collect();
    f.sort_by(f64::total_cmp);
    let never = runs.len() - f.len();
    let median = f.get(f.len() / 2).copied();
    let worst = if never > 0 { None } else { f.last().copied() };
    let requests: u64 = runs.iter().map(|r| r.requests).sum();
    let failed: u64 = runs.iter().map(|r| r.failed).sum();
    let mut rec: Vec<f64> = runs.iter().filter_map(|r| r.recovery_ms).collect();
    rec.sort_by(f64::total_cmp);
    format!(
        "| {label} | {} | {}{} | {} | {failed} of {requests} |",
        ms(median),
        ms(worst),
        if never > 0 {
            format!(" ({never} of {} runs never)", runs.len())
        } else {
            String::new()
        },
        ms(rec.get(rec.len() / 2).copied()),
    )
}

fn compare(
    lab: &Lab,
    name: &str,
    text: &str,
    repeat: usize,
    out: &Path,
    restart: &mut dyn FnMut(),
) -> (Vec<RunFigures>, Vec<RunFigures>) {
    let strait_file = out.join(format!("{name}-strait.yaml"));
    let envoy_file = out.join(format!("{name}-envoy.yaml"));
    std::fs::write(&strait_file, text).expect("write the scenario");
    let via = text.replace(
        "service: payments.default,",
        &format!("via: \"127.0.0.1:{CLIENT_PORT}\", service: payments.default,"),
    );
    assert_ne!(via, text, "the scenario's load line has the expected shape");
    std::fs::write(&envoy_file, via).expect("write the scenario");
    println!("\n{name}: {repeat} runs each, alternating\n");
    println!(
        "| run | Strait failover | Strait recovery | Strait failed | Envoy failover | Envoy recovery | Envoy failed |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    let (mut s, mut e) = (Vec::new(), Vec::new());
    for k in 1..=repeat {
        let a = run(lab, &strait_file, &out.join(format!("{name}/strait-{k}")));
        restart();
        let b = run(lab, &envoy_file, &out.join(format!("{name}/envoy-{k}")));
        println!(
            "| {k} | {} | {} | {} of {} | {} | {} | {} of {} |",
            ms(a.failover_ms),
            ms(a.recovery_ms),
            a.failed,
            a.requests,
            ms(b.failover_ms),
            ms(b.recovery_ms),
            b.failed,
            b.requests
        );
        s.push(a);
        e.push(b);
    }
    (s, e)
}

fn main() {
    let repeat = arg("--repeat", 10);
    let long_repeat = arg("--long-repeat", 1);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = root.join("target/bench-failover");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).expect("create target/bench-failover");
    let lab = Lab::up(&root.join("target/bench-failover-lab"), "failover", 3);
    let td = lab.state["trust_domain"]
        .as_str()
        .unwrap_or("lab.strait")
        .to_string();
    let (east, west, central) = (
        lab.cluster("east"),
        lab.cluster("west"),
        lab.cluster("central"),
    );

    let envoy_dir = root.join("target/bench-failover-envoy");
    std::fs::create_dir_all(&envoy_dir).expect("create target/bench-failover-envoy");
    let start = |name: &str, ns: &str, workers: u32, boot: Value| {
        common::envoy::start_in(&envoy_dir, name, ns, workers, &boot)
    };
    let mut _remote = Vec::new();
    for c in [&west, &central] {
        _remote.push(start(
            &format!("{}-gateway", c.name),
            &c.ns,
            2,
            envoy_gateway(c),
        ));
        _remote.push(start(
            &format!("{}-server", c.name),
            &c.ns,
            1,
            envoy_server(c, &lab.certs(&c.name, "echo")),
        ));
    }
    let client_boot = envoy_client(&lab.certs(&east.name, "client"), &west, &central, &td);
    let mut client: Option<Proc> = None;
    let mut restart = || {
        drop(client.take());
        client = Some(start("east-client", &east.ns, 1, client_boot.clone()));
        wait_envoy_serves_west(&east);
    };
    restart();

    let short = std::fs::read_to_string(root.join("deploy/lab/scenarios/bench-cut.yaml"))
        .expect("deploy/lab/scenarios/bench-cut.yaml");
    let (s, e) = compare(&lab, "bench-cut", &short, repeat, &out, &mut restart);
    let long = short
        .replace("name: bench-cut", "name: bench-cut-long")
        .replace("duration: 12s", "duration: 30s")
        .replace(
            "{at: 7s, do: heal east west}",
            "{at: 23s, do: heal east west}",
        );
    let (sl, el) = if long_repeat > 0 {
        compare(
            &lab,
            "bench-cut-long",
            &long,
            long_repeat,
            &out,
            &mut restart,
        )
    } else {
        (Vec::new(), Vec::new())
    };
    drop(client);
    drop(_remote);
    drop(lab);

    println!("\nthe link east ↔ west cut for 4 s (`bench-cut`), {repeat} runs each:\n");
    println!(
        "| path | failover, median | failover, worst | recovery after the heal, median | requests failed |"
    );
    println!("| --- | --- | --- | --- | --- |");
    println!("{}", summary("Strait", &s));
    println!(
        "{}",
        summary(
            "Envoy mesh (Istio defaults, recommended outlier detection)",
            &e
        )
    );
    if !sl.is_empty() {
        println!("\nthe same cut held for 20 s, {long_repeat} runs each:\n");
        println!(
            "| path | failover, median | failover, worst | recovery after the heal, median | requests failed |"
        );
        println!("| --- | --- | --- | --- | --- |");
        println!("{}", summary("Strait", &sl));
        println!(
            "{}",
            summary(
                "Envoy mesh (Istio defaults, recommended outlier detection)",
                &el
            )
        );
    }
    println!("\nreports: {}", out.display());
}
