//! The sidecar hop, side by side in one run: client → `strait proxy` → server against
//! client → Envoy 1.40 (`--concurrency 1`, an equivalent static config: one listener, one route,
//! the same retry policy, one cluster) → server, against client → server as the floor.
//!
//! Both proxies run one worker thread (`--workers 1`, `--concurrency 1`) pinned to CPU 0 (`taskset`); this process — the load generator and the
//! 1 KiB HTTP/1.1 server — to CPU 1. The strait proxy takes its config from a real control plane
//! (etcd and the control plane run in this process and are idle during the measurements).
//!
//! 1. **Closed loop**: 16 keep-alive connections, each sending the next GET as soon as the
//!    previous answer is in, for `--secs` (default 5) seconds: requests/s.
//! 2. **Fixed rate**: `--rate` (default 1,000) requests/s for `--secs`×2 seconds on a pool of
//!    keep-alive connections; each request's latency is measured from the moment it was *due*
//!    (coordinated-omission correction): added p50/p90/p99 over the direct path; CPU time of the
//!    proxy process per request.
//!    The fixed-rate run is then repeated `--repeat` (default 5) times, the three paths back
//!    to back in each round, and the median of the rounds' p99 ratios is printed.
//! 3. Peak RSS of each proxy process; then **HTTP/2** downstream: h2load (16 connections ×
//!    10 streams, h2c with prior knowledge) on CPU 1 against each proxy: requests/s.
//! 4. **Memory at scale** (`--scale 0` skips it): 1,000 clusters with 10 endpoints each
//!    (`--scale-services`, `--scale-endpoints`) pushed by the same control plane to a fresh
//!    strait proxy and a fresh Envoy (delta ADS): RSS of each once it holds every cluster.
//!
//! `--baseline PATH` (a `strait` binary of an earlier commit) adds that build's proxy as a fourth
//! path, measured in the same run and the same rounds: this commit against the previous one.
//!
//! `--count N` (with `--baseline PATH`) measures instead what the clock cannot tell on a noisy
//! VM: both builds' proxies run under `valgrind --tool=callgrind`; for each, in alternating
//! rounds (`--repeat`, default 3), counters are zeroed after a warm-up, N GETs go one after the
//! other on one keep-alive connection, and the counters are dumped: instructions and `malloc`
//! calls per request, exact to the request (no start-up, no idle time of note). The last round's
//! dumps are kept in `target/callgrind/` for `callgrind_annotate`.
//!
//! Run: `cargo xtask bench proxy` (= `cargo bench --bench proxy`).
// Tests and benchmarks: an unwrap is an assertion (a failure with the value's message).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::http::{BODY, Conn, median, us};
use common::{Proc, arg, cpu_secs, free_port, peak_rss_kib, percentile, rss_kib};
use controlplane::config::ControlPlaneConfig;
use controlplane::server::ControlPlane;
use testkit::etcd::EtcdServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HOST: &str = "echo.default";

fn pin(pid: u32, cpu: &str) {
    let ok = Command::new("taskset")
        .args(["-a", "-cp", cpu, &pid.to_string()])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("warning: could not pin process {pid} to CPU {cpu}");
    }
}

fn envoy_bootstrap(
    listen: SocketAddr,
    admin: SocketAddr,
    backend: SocketAddr,
) -> serde_json::Value {
    let sock = |a: SocketAddr| serde_json::json!({"socket_address": {"address": a.ip().to_string(), "port_value": a.port()}});
    serde_json::json!({
        "admin": {"address": sock(admin)},
        "static_resources": {
            "listeners": [{
                "name": "outbound",
                "address": sock(listen),
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "outbound",
                        "codec_type": "AUTO",
                        "route_config": {"virtual_hosts": [{
                            "name": "echo",
                            "domains": [HOST, format!("{HOST}:8080")],
                            "routes": [{"match": {"prefix": "/"}, "route": {
                                "cluster": "echo",
                                "retry_policy": common::envoy::retries()["retry_policy"],
                            }}],
                        }]},
                        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                    },
                }]}],
            }],
            "clusters": [{
                "name": "echo",
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {"cluster_name": "echo", "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": sock(backend)}}]}]},
            }],
        },
    })
}

async fn wait_serving(to: SocketAddr, what: &str) {
    wait_serving_within(to, what, Duration::from_secs(30)).await;
}

async fn wait_serving_within(to: SocketAddr, what: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(mut c) = Conn::open(to, HOST).await
            && c.get().await.is_ok()
        {
            return;
        }
        assert!(Instant::now() < deadline, "{what} never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Figures {
    rps: f64,
    lat: Vec<Duration>,
    cpu_us_per_req: Option<f64>,
    peak_rss_mib: Option<f64>,
    rss_mib: Option<f64>,
}

async fn measure(to: SocketAddr, pid: Option<u32>, secs: u64, rate: u64) -> Figures {
    let rps = common::http::closed_loop(to, HOST, 16, secs).await;
    let cpu0 = pid.map(|p| cpu_secs(&p.to_string()));
    let lat = common::http::fixed_rate(to, HOST, rate, secs * 2).await;
    let cpu_us_per_req = pid
        .zip(cpu0)
        .map(|(p, c0)| (cpu_secs(&p.to_string()) - c0) * 1e6 / lat.len() as f64);
    Figures {
        rps,
        lat,
        cpu_us_per_req,
        peak_rss_mib: pid.map(|p| peak_rss_kib(p) as f64 / 1024.0),
        rss_mib: pid.map(|p| rss_kib(p) as f64 / 1024.0),
    }
}

fn main() {
    let secs = arg("--secs", 5) as u64;
    let rate = arg("--rate", 1000) as u64;
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    pin(std::process::id(), "1");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let backend = common::http::server(SocketAddr::from(([127, 0, 0, 1], 0))).await;

        // The strait proxy, fed by a real control plane.
        let etcd = EtcdServer::start(&d.join("etcd")).expect("etcd");
        std::fs::write(
            d.join("east.yaml"),
            format!(
                "cluster: east\nregion: us-east\nservices:\n  - name: echo\n    ports: [{{name: http, port: 8080, protocol: http}}]\n    endpoints:\n      - {{address: 127.0.0.1, port: {}, zone: us-east-1a}}\n",
                backend.port()
            ),
        )
        .expect("write");
        let xds = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let cfg = ControlPlaneConfig::parse(
            d.join("cp.yaml"),
            &format!(
                "cluster: east\nregion: us-east\nregistry: {{etcd: [\"{}\"]}}\n\
                 discovery: {{file: {}}}\nxds: {{listen: \"{xds}\"}}\nadmin: {{listen: \"127.0.0.1:0\"}}\n",
                etcd.endpoint(),
                d.join("east.yaml").display()
            ),
        )
        .expect("control plane config");
        let cp = ControlPlane::start(cfg).await.expect("control plane");
        if let (Some(n), Some(bin)) = (arg_opt("--count"), baseline_bin()) {
            count(d, xds, &bin, n, arg("--repeat", 3)).await;
            cp.shutdown().await;
            return;
        }
        let strait_out = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let strait = spawn_strait(
            &[],
            env!("CARGO_BIN_EXE_strait"),
            "bench",
            xds,
            strait_out,
            SocketAddr::from(([127, 0, 0, 1], free_port())),
        );
        pin(strait.0.id(), "0");
        wait_serving(strait_out, "strait proxy").await;
        // An earlier build of strait, side by side (`--baseline PATH`).
        let baseline = baseline_bin().map(|bin| {
            let out = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let p = spawn_strait(
                &[],
                &bin,
                "baseline",
                xds,
                out,
                SocketAddr::from(([127, 0, 0, 1], free_port())),
            );
            pin(p.0.id(), "0");
            (p, out, bin)
        });
        if let Some((_, out, _)) = &baseline {
            wait_serving(*out, "baseline strait proxy").await;
        }

        // Envoy, static config.
        let envoy_out = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let boot = d.join("envoy.json");
        std::fs::write(
            &boot,
            serde_json::to_vec(&envoy_bootstrap(envoy_out, admin, backend)).expect("json"),
        )
        .expect("write");
        let envoy = common::envoy::spawn(None, &boot, 1, None);
        pin(envoy.0.id(), "0");
        wait_serving(envoy_out, "envoy").await;

        println!("sidecar hop, HTTP/1.1, {BODY} B answers; closed loop 16 connections {secs} s; fixed rate {rate}/s for {} s (latency from the due time)", secs * 2);
        let direct = measure(backend, None, secs, rate).await;
        let s = measure(strait_out, Some(strait.0.id()), secs, rate).await;
        let e = measure(envoy_out, Some(envoy.0.id()), secs, rate).await;
        let b = match &baseline {
            Some((p, out, _)) => Some(measure(*out, Some(p.0.id()), secs, rate).await),
            None => None,
        };

        common::write_latency(
            "1-sidecar",
            &format!("Sidecar hop, HTTP/1.1 at {rate} requests/s (from the due time)"),
            &[
                ("direct", &direct.lat),
                ("strait proxy", &s.lat),
                ("Envoy 1.40", &e.lat),
            ],
        );
        let p = |f: &Figures, q: f64| percentile(&f.lat, q / 100.0);
        let added = |f: &Figures, q: f64| us(p(f, q)) - us(p(&direct, q));
        println!("\n| | direct | strait proxy | Envoy 1.40 | strait / Envoy |");
        println!("| --- | --- | --- | --- | --- |");
        println!(
            "| requests/s (closed loop, 16 conns, proxy on 1 core) | {:.0} | {:.0} | {:.0} | {:.2}× |",
            direct.rps, s.rps, e.rps, s.rps / e.rps
        );
        for q in [50.0, 90.0, 99.0] {
            println!(
                "| p{q:.0} at {rate}/s, µs (added over direct) | {:.0} | {:.0} ({:+.0}) | {:.0} ({:+.0}) | {:.2}× added |",
                us(p(&direct, q)),
                us(p(&s, q)),
                added(&s, q),
                us(p(&e, q)),
                added(&e, q),
                added(&s, q) / added(&e, q).max(1.0)
            );
        }
        let cpu = |f: &Figures| f.cpu_us_per_req.unwrap_or(0.0);
        println!(
            "| CPU per request at {rate}/s, µs | – | {:.0} | {:.0} | {:.2}× |",
            cpu(&s),
            cpu(&e),
            cpu(&s) / cpu(&e).max(1.0)
        );
        let rss = |f: &Figures| f.rss_mib.unwrap_or(0.0);
        let peak = |f: &Figures| f.peak_rss_mib.unwrap_or(0.0);
        println!(
            "| RSS after the runs (peak), MiB | – | {:.1} ({:.1}) | {:.1} ({:.1}) | {:.2}× |",
            rss(&s),
            peak(&s),
            rss(&e),
            peak(&e),
            peak(&s) / peak(&e).max(0.1)
        );
        if let (Some(b), Some((_, _, bin))) = (&b, &baseline) {
            println!("\nthis build against the baseline {bin}, same run\n");
            println!("| | strait proxy (this) | strait proxy (baseline) | this / baseline |");
            println!("| --- | --- | --- | --- |");
            println!(
                "| requests/s (closed loop) | {:.0} | {:.0} | {:.3}× |",
                s.rps,
                b.rps,
                s.rps / b.rps.max(1.0)
            );
            for q in [50.0, 99.0] {
                println!(
                    "| added p{q:.0} at {rate}/s, µs | {:+.0} | {:+.0} | |",
                    added(&s, q),
                    added(b, q)
                );
            }
            println!(
                "| CPU per request, µs | {:.1} | {:.1} | {:.3}× |",
                cpu(&s),
                cpu(b),
                cpu(&s) / cpu(b).max(0.1)
            );
            println!(
                "| peak RSS, MiB | {:.1} | {:.1} | |",
                peak(&s),
                peak(b)
            );
        }
        // The fixed-rate run again, `--repeat` times, the three paths back to back in each
        // round: one run's p99 is the 60th worst of 6,000 requests, and this VM's neighbours
        // move it by hundreds of µs; the median of the rounds' ratios is the figure to quote.
        let repeat = arg("--repeat", 5);
        if repeat > 0 {
            println!(
                "\nfixed rate {rate}/s, {} s per path, repeated {repeat} times (added over direct in the same round)",
                secs * 2
            );
            println!("\n| round | strait +p50 µs | Envoy +p50 µs | strait +p99 µs | Envoy +p99 µs | p99 strait / Envoy |");
            println!("| --- | --- | --- | --- | --- | --- |");
            let mut ratios = Vec::new();
            let mut p50s = Vec::new();
            let mut against_baseline = Vec::new();
            let mut rps_ratios = Vec::new();
            for round in 1..=repeat {
                let d = common::http::fixed_rate(backend, HOST, rate, secs * 2).await;
                let st = common::http::fixed_rate(strait_out, HOST, rate, secs * 2).await;
                let en = common::http::fixed_rate(envoy_out, HOST, rate, secs * 2).await;
                if let Some((_, out, _)) = &baseline {
                    // Closed loop too, the two builds back to back, alternating which goes
                    // first: one closed-loop run on this VM moves by a quarter.
                    let (t_rps, b_rps) = if round % 2 == 1 {
                        let t = common::http::closed_loop(strait_out, HOST, 16, secs).await;
                        (t, common::http::closed_loop(*out, HOST, 16, secs).await)
                    } else {
                        let b = common::http::closed_loop(*out, HOST, 16, secs).await;
                        (common::http::closed_loop(strait_out, HOST, 16, secs).await, b)
                    };
                    rps_ratios.push(t_rps / b_rps.max(1.0));
                    println!(
                        "| {round} (baseline) | closed loop: this {t_rps:.0}/s | baseline {b_rps:.0}/s | | | {:.3}× |",
                        t_rps / b_rps.max(1.0)
                    );
                    let ba = common::http::fixed_rate(*out, HOST, rate, secs * 2).await;
                    let add = |l: &[Duration], q: f64| us(percentile(l, q)) - us(percentile(&d, q));
                    let (t99, b99) = (add(&st, 0.99), add(&ba, 0.99));
                    println!(
                        "| {round} (baseline) | this +p50 {:+.0} | baseline +p50 {:+.0} | this +p99 {t99:+.0} | baseline +p99 {b99:+.0} | {:.2}× |",
                        add(&st, 0.5),
                        add(&ba, 0.5),
                        t99 / b99.max(1.0)
                    );
                    against_baseline.push(t99 / b99.max(1.0));
                }
                let add = |l: &[Duration], q: f64| {
                    us(percentile(l, q)) - us(percentile(&d, q))
                };
                let (s50, e50, s99, e99) = (
                    add(&st, 0.5),
                    add(&en, 0.5),
                    add(&st, 0.99),
                    add(&en, 0.99),
                );
                let ratio = s99 / e99.max(1.0);
                ratios.push(ratio);
                p50s.push(s50 / e50.max(1.0));
                println!(
                    "| {round} | {s50:+.0} | {e50:+.0} | {s99:+.0} | {e99:+.0} | {ratio:.2}× |"
                );
            }
            let (lo, hi) = (
                ratios.iter().copied().fold(f64::INFINITY, f64::min),
                ratios.iter().copied().fold(0.0, f64::max),
            );
            println!(
                "\nadded p99 strait / Envoy: median {:.2}× (range {lo:.2}–{hi:.2}×) over {repeat} rounds; added p50: median {:.2}×",
                median(&mut ratios),
                median(&mut p50s)
            );
            if !against_baseline.is_empty() {
                println!(
                    "added p99 this build / baseline: median {:.2}× over {repeat} rounds",
                    median(&mut against_baseline)
                );
                println!(
                    "closed-loop requests/s this build / baseline: median {:.3}× over {repeat} rounds",
                    median(&mut rps_ratios)
                );
            }
        }
        // HTTP/2 (h2c, prior knowledge) downstream, h2load on the other core.
        match (h2load(strait_out, secs).await, h2load(envoy_out, secs).await) {
            (Some(s2), Some(e2)) => {
                println!("\nHTTP/2 downstream (h2load: 16 connections × 10 streams, {secs} s, HTTP/1.1 upstream)");
                println!("\n| | strait proxy | Envoy 1.40 | strait / Envoy |");
                println!("| --- | --- | --- | --- |");
                println!("| requests/s (proxy on 1 core) | {s2:.0} | {e2:.0} | {:.2}× |", s2 / e2.max(1.0));
            }
            _ => println!("\nHTTP/2: h2load is not installed (apt-get install nghttp2-client); skipped"),
        }
        drop(strait);
        drop(envoy);
        drop(baseline);
        if arg("--scale", 1) == 1 {
            scale(d, &etcd, xds).await;
        }
        cp.shutdown().await;
        drop(etcd);
    });
}

/// h2load's requests/s against `to` (h2c with prior knowledge, `:authority` the service), run
/// on CPU 1; `None` if h2load is missing or says nothing usable.
async fn h2load(to: SocketAddr, secs: u64) -> Option<f64> {
    // Asynchronously: the backend server runs on this thread's runtime.
    let out = tokio::process::Command::new("taskset")
        .args(["-c", "1", "h2load", "-c", "16", "-m", "10", "-t", "1"])
        .args([
            "-D",
            &secs.to_string(),
            "-H",
            &format!(":authority: {HOST}"),
        ])
        .arg(format!("http://{to}/"))
        .stdin(Stdio::null())
        .output()
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let failed = text
        .lines()
        .find_map(|l| l.strip_prefix("requests: "))
        .and_then(|l| l.split(", ").find_map(|p| p.strip_suffix(" failed")))
        .and_then(|n| n.trim().parse::<u64>().ok());
    if failed != Some(0) {
        eprintln!("h2load against {to}: {text}");
        return None;
    }
    text.lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|r| r.strip_suffix(" req/s"))
        .and_then(|r| r.trim().parse().ok())
}

/// The `strait` binary given with `--baseline PATH`.
fn baseline_bin() -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == "--baseline")?;
    args.get(i + 1).cloned()
}

/// The value of `--NAME N`, if given.
fn arg_opt(name: &str) -> Option<u64> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1)?.parse().ok()
}

/// `--count N`: instructions and `malloc` calls per request of this build's proxy and the
/// baseline's, both under callgrind, N sequential GETs per round on one connection.
async fn count(d: &Path, xds: SocketAddr, baseline: &str, n: u64, rounds: usize) {
    let builds = [
        ("this", env!("CARGO_BIN_EXE_strait")),
        ("baseline", baseline),
    ];
    let mut running = Vec::new();
    for (name, bin) in builds {
        let out = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let file = d.join(format!("callgrind-{name}.out"));
        let valgrind = [
            "valgrind".to_string(),
            "--tool=callgrind".to_string(),
            format!("--callgrind-out-file={}", file.display()),
        ];
        let p = spawn_strait(
            &valgrind,
            bin,
            name,
            xds,
            out,
            SocketAddr::from(([127, 0, 0, 1], free_port())),
        );
        wait_serving_within(
            out,
            &format!("{name} proxy under callgrind"),
            Duration::from_secs(180),
        )
        .await;
        let mut conn = Conn::open(out, HOST).await.expect("connect");
        for _ in 0..200 {
            conn.get().await.expect("warm-up GET");
        }
        running.push((name, p, conn, file));
    }
    println!(
        "instructions and malloc calls per request under callgrind: {n} sequential GETs per round, one keep-alive connection, counters zeroed after a warm-up of 200\n"
    );
    println!("| round | build | instructions / request | malloc calls / request |");
    println!("| --- | --- | --- | --- |");
    let mut per: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); running.len()];
    for round in 1..=rounds {
        // Alternate which build goes first.
        let mut order: Vec<usize> = (0..running.len()).collect();
        if round % 2 == 0 {
            order.reverse();
        }
        for i in order {
            let (name, p, conn, file) = &mut running[i];
            let pid = p.0.id().to_string();
            callgrind_control(&["-z", &pid]);
            for _ in 0..n {
                conn.get().await.expect("GET under callgrind");
            }
            callgrind_control(&["-d", &pid]);
            let (ir, mallocs) = callgrind_last_dump(file);
            let (ir, mallocs) = (ir as f64 / n as f64, mallocs as f64 / n as f64);
            println!("| {round} | {name} | {ir:.0} | {mallocs:.2} |");
            per[i].0.push(ir);
            per[i].1.push(mallocs);
        }
    }
    let (mut t, mut b) = (per[0].clone(), per[1].clone());
    let (ti, bi, tm, bm) = (
        median(&mut t.0),
        median(&mut b.0),
        median(&mut t.1),
        median(&mut b.1),
    );
    println!(
        "\nmedian over {rounds} rounds: instructions / request this {ti:.0}, baseline {bi:.0} ({:.3}×); malloc calls / request this {tm:.2}, baseline {bm:.2} ({:.3}×)",
        ti / bi.max(1.0),
        tm / bm.max(0.01)
    );
}

fn callgrind_control(args: &[&str]) {
    let ok = Command::new("callgrind_control")
        .args(args)
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "callgrind_control {args:?} failed");
}

/// Instructions and `malloc` calls in the newest dump next to `file` (`FILE.1`, `FILE.2`, …).
fn callgrind_last_dump(file: &Path) -> (u64, u64) {
    let dir = file.parent().expect("dump directory");
    let stem = file
        .file_name()
        .and_then(|n| n.to_str())
        .expect("dump name")
        .to_string();
    let newest = std::fs::read_dir(dir)
        .expect("read the dump directory")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let k: u64 = name.strip_prefix(&format!("{stem}."))?.parse().ok()?;
            Some((k, e.path()))
        })
        .max_by_key(|(k, _)| *k)
        .expect("callgrind wrote a dump")
        .1;
    let text = std::fs::read_to_string(&newest).expect("read the dump");
    // Kept for `callgrind_annotate` (the last round of each build wins).
    let keep = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/callgrind");
    if std::fs::create_dir_all(&keep).is_ok() {
        let _ = std::fs::write(keep.join(&stem), &text);
    }
    let mut names = std::collections::HashMap::new();
    let (mut ir, mut mallocs) = (0u64, 0u64);
    let mut callee_is_malloc = false;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("summary:") {
            ir = rest.trim().parse().unwrap_or(0);
        } else if let Some(rest) = line
            .strip_prefix("fn=")
            .or_else(|| line.strip_prefix("cfn="))
        {
            // `(id) name` defines a compressed name, `(id)` uses one.
            let name = match rest.split_once(") ") {
                Some((id, name)) => {
                    names.insert(id.to_string(), name.to_string());
                    name.to_string()
                }
                None => names
                    .get(rest.trim_end_matches(')'))
                    .cloned()
                    .unwrap_or_default(),
            };
            if line.starts_with("cfn=") {
                callee_is_malloc = name == "malloc";
            }
        } else if let Some(rest) = line.strip_prefix("calls=")
            && callee_is_malloc
        {
            mallocs += rest
                .split_whitespace()
                .next()
                .and_then(|c| c.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    (ir, mallocs)
}

/// `strait proxy run` (of binary `bin`) of cluster east (us-east/us-east-1a) with one worker,
/// under `wrapper` if not empty (`wrapper[0]` with the rest of it as arguments).
fn spawn_strait(
    wrapper: &[String],
    bin: &str,
    node_id: &str,
    xds: SocketAddr,
    outbound: SocketAddr,
    admin: SocketAddr,
) -> Proc {
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    Proc(
        command
            .args([
                "--log",
                "warn",
                "proxy",
                "run",
                "--node-id",
                node_id,
                "--cluster",
                "east",
            ])
            .args([
                "--locality",
                "us-east/us-east-1a",
                "--xds",
                &xds.to_string(),
            ])
            .args(["--outbound", &outbound.to_string(), "--workers", "1"])
            .args(["--admin", &admin.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("strait proxy starts"),
    )
}

/// GET `path` from an admin port; the body (empty on any failure).
async fn admin_get(addr: SocketAddr, path: &str) -> String {
    let fut = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.ok()?;
        let text = String::from_utf8_lossy(&out).into_owned();
        text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// Memory at scale: cluster `central` publishes 1,000 services with 10 endpoints each; a fresh
/// strait proxy and a fresh Envoy (delta ADS, the bootstrap of `strait proxy bootstrap
/// --envoy`) take all of it from the same control plane; RSS of each once it holds every
/// cluster.
async fn scale(d: &Path, etcd: &EtcdServer, xds: SocketAddr) {
    use common::registry::{commit_all, endpoints, id};
    use federation::model::{Cluster, ClusterState};
    let services = arg("--scale-services", 1000);
    let per = arg("--scale-endpoints", 10);
    let backend = federation::registry::Backend::Etcd(
        federation::registry::etcd::EtcdBackend::connect(
            &[etcd.endpoint()],
            federation::registry::etcd::EtcdOptions::default(),
        )
        .await
        .expect("etcd client"),
    );
    let state = ClusterState {
        cluster: Cluster::new(id("central"), "us-east", None, vec![]).expect("valid"),
        services: (0..services)
            .map(|i| endpoints(1, "central", "us-east", i, per, 8080))
            .collect(),
    };
    commit_all(
        &backend,
        federation::registry::codec::cluster_state_kvs(&state),
    )
    .await;
    let want = services + 1; // and echo.default

    let strait_admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let started = Instant::now();
    let strait = spawn_strait(
        &[],
        env!("CARGO_BIN_EXE_strait"),
        "scale-strait",
        xds,
        SocketAddr::from(([127, 0, 0, 1], free_port())),
        strait_admin,
    );
    let strait_took = loop {
        let m = admin_get(strait_admin, "/metrics").await;
        let n = m
            .lines()
            .filter(|l| l.starts_with("strait_proxy_upstream_active{"))
            .count();
        if n >= want {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the strait proxy holds {n} of {want} clusters after 120 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let envoy_admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let spec = controlplane::bootstrap::BootstrapSpec {
        node_id: "scale-envoy".into(),
        cluster: id("east"),
        locality: federation::model::Locality::parse("l", "us-east/us-east-1a").expect("valid"),
        labels: federation::model::Labels::default(),
        xds: xds.into(),
        xds_replicas: Vec::new(),
        tls: None,
        delta: true,
        admin: envoy_admin,
        outbound: SocketAddr::from(([127, 0, 0, 1], free_port())),
        transparent: None,
        gateway: None,
    };
    let boot = d.join("envoy-scale.json");
    std::fs::write(&boot, controlplane::bootstrap::envoy(&spec).to_string()).expect("write");
    let started = Instant::now();
    let envoy = common::envoy::spawn(None, &boot, 1, None);
    let envoy_took = loop {
        let stats = admin_get(
            envoy_admin,
            "/stats?filter=cluster_manager.(active|warming)_clusters",
        )
        .await;
        let stat = |name: &str| {
            stats
                .lines()
                .find_map(|l| l.strip_prefix(&format!("cluster_manager.{name}: ")))
                .and_then(|v| v.trim().parse::<usize>().ok())
        };
        // Envoy's own xDS cluster is active too.
        if stat("active_clusters").is_some_and(|n| n > want) && stat("warming_clusters") == Some(0)
        {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "Envoy not converged after 120 s: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Let both settle (allocator, first lazy work), then read.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mib = |pid: u32| rss_kib(pid) as f64 / 1024.0;
    let (s, e) = (mib(strait.0.id()), mib(envoy.0.id()));
    let (sp, ep) = (
        peak_rss_kib(strait.0.id()) as f64 / 1024.0,
        peak_rss_kib(envoy.0.id()) as f64 / 1024.0,
    );
    println!(
        "\nmemory at scale: {services} clusters, {} endpoints, from the same control plane (delta ADS)",
        services * per
    );
    println!("\n| | strait proxy | Envoy 1.40 | strait / Envoy |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| RSS holding every cluster (peak), MiB | {s:.1} ({sp:.1}) | {e:.1} ({ep:.1}) | {:.2}× |",
        s / e.max(0.1)
    );
    println!(
        "| time from start to every cluster held, s | {:.2} | {:.2} | {:.2}× |",
        strait_took.as_secs_f64(),
        envoy_took.as_secs_f64(),
        strait_took.as_secs_f64() / envoy_took.as_secs_f64().max(0.001)
    );
}
