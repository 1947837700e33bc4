//! The lab (`strait lab`, netns mode) as the benchmarks use it: bring it up, read its state
//! file, run `strait` commands against it, work from inside its namespaces, take it down.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

/// The `strait` binary the lab runs: the one built with the benchmarks (release), or the one
/// given with `--strait PATH` (an earlier build: the same benchmark run against the previous
/// commit).
pub fn strait_bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let args: Vec<String> = std::env::args().collect();
        args.iter()
            .position(|a| a == "--strait")
            .and_then(|i| args.get(i + 1).cloned())
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_strait").to_string())
    })
}

/// Run `strait ARGS…`; its stdout, or an error with everything it printed.
pub fn strait(args: &[&str]) -> Result<String, String> {
    let out = Command::new(strait_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run strait: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "`strait {}` failed ({}):\n{stdout}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// One cluster of the lab, as its state file says.
#[derive(Clone, Debug)]
pub struct Place {
    pub name: String,
    pub ns: String,
    /// The cluster's address, routed over the links.
    pub addr: Ipv4Addr,
    pub zones: Vec<String>,
    /// The client sidecar's outbound listener (in `ns`).
    pub client: SocketAddr,
}

/// A running lab in netns mode, taken down when dropped (also on a panic).
pub struct Lab {
    pub dir: PathBuf,
    pub name: String,
    pub state: Value,
}

impl Lab {
    /// `strait lab up --mode netns --clusters N --name NAME --dir DIR` (needs root).
    pub fn up(dir: &Path, name: &str, clusters: u8) -> Lab {
        println!(
            "bringing up a lab of {clusters} clusters in network namespaces ({})",
            dir.display()
        );
        let d = dir.to_string_lossy().into_owned();
        if let Err(e) = strait(&[
            "lab",
            "up",
            "--mode",
            "netns",
            "--clusters",
            &clusters.to_string(),
            "--name",
            name,
            "--dir",
            &d,
        ]) {
            let _ = strait(&["lab", "down", "--name", name, "--dir", &d]);
            panic!("the lab did not come up (netns mode needs root): {e}");
        }
        Lab {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            state: read_state(dir),
        }
    }

    /// Read the state file again (after a restart: new PIDs).
    pub fn reload(&mut self) {
        self.state = read_state(&self.dir);
    }

    pub fn clusters(&self) -> Vec<Place> {
        self.state["clusters"]
            .as_array()
            .map(|cs| {
                cs.iter()
                    .map(|c| {
                        let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
                        Place {
                            name: s("name"),
                            ns: s("ns"),
                            addr: s("addr").parse().expect("a cluster's address"),
                            zones: c["zones"]
                                .as_array()
                                .map(|z| {
                                    z.iter()
                                        .filter_map(|z| z.as_str().map(str::to_string))
                                        .collect()
                                })
                                .unwrap_or_default(),
                            client: c["client"]["outbound"]
                                .as_str()
                                .and_then(|a| a.parse().ok())
                                .expect("a client sidecar's address"),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn cluster(&self, name: &str) -> Place {
        self.clusters()
            .into_iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("the lab has no cluster {name}"))
    }

    /// PID of the lab's process of `role` in `cluster`.
    pub fn pid(&self, role: &str, cluster: &str) -> u32 {
        self.state["processes"]
            .as_array()
            .and_then(|ps| {
                ps.iter().find(|p| {
                    p["role"].as_str() == Some(role) && p["cluster"].as_str() == Some(cluster)
                })
            })
            .and_then(|p| p["pid"].as_u64())
            .map(|p| p as u32)
            .unwrap_or_else(|| panic!("the lab has no {role} process in {cluster}"))
    }

    /// The directory of `CLUSTER-WHO`'s certificate (`gateway`, `client`, `echo`, …).
    pub fn certs(&self, cluster: &str, who: &str) -> PathBuf {
        self.dir.join("certs").join(format!("{cluster}-{who}"))
    }

    /// `strait chaos --dir DIR ARGS…`.
    pub fn chaos(&self, args: &[&str]) -> Result<String, String> {
        let d = self.dir.to_string_lossy().into_owned();
        let mut all = vec!["chaos", "--dir", &d];
        all.extend_from_slice(args);
        strait(&all)
    }
}

/// The state file of the lab in `dir`.
fn read_state(dir: &Path) -> Value {
    std::fs::read(dir.join("lab.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .expect("the lab's state file")
}

impl Drop for Lab {
    fn drop(&mut self) {
        let d = self.dir.to_string_lossy().into_owned();
        if std::env::var_os("STRAIT_BENCH_KEEP_LAB").is_some() {
            eprintln!(
                "STRAIT_BENCH_KEEP_LAB: the lab keeps running; `strait lab down --name {} --dir {d}`",
                self.name
            );
            return;
        }
        if let Err(e) = strait(&["lab", "down", "--name", &self.name, "--dir", &d]) {
            eprintln!("{e}");
        }
    }
}

/// Run `f` on a new thread inside network namespace `ns` (sockets it makes belong there), on
/// its own current-thread runtime.
pub fn in_ns<F, Fut, T>(ns: String, f: F) -> std::thread::JoinHandle<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    std::thread::spawn(move || {
        let file = std::fs::File::open(format!("/var/run/netns/{ns}"))
            .unwrap_or_else(|e| panic!("network namespace {ns}: {e}"));
        rustix::thread::move_into_link_name_space(
            file.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .unwrap_or_else(|e| panic!("cannot enter network namespace {ns}: {e}"));
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f())
    })
}
