//! Helpers shared by the benchmarks: options, child processes, and what /proc says about them.
#![allow(dead_code)]

pub mod envoy;
pub mod http;
pub mod lab;
pub mod quinn;
pub mod registry;

use std::process::Child;
use std::time::Duration;

/// The value of `--name N` on the command line, or `default`.
pub fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A child process, killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Resident memory now, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// Peak resident memory, KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

/// CPU time (user + system) a process has used, in seconds.
pub fn cpu_secs(pid: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces): state is field 3.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let (u, k): (f64, f64) = (f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?);
            Some((u + k) / 100.0)
        })
        .unwrap_or(0.0)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no port")
}

/// The `p` quantile (0..=1) of sorted samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// With `STRAIT_BENCH_OUT=DIR` (set by `cargo xtask bench suite`), write the latency
/// distribution of each series to `DIR/STEM.tsv` for the suite's chart: `# title`, then
/// `series<TAB>quantile<TAB>µs` lines.
pub fn write_latency(stem: &str, title: &str, series: &[(&str, &[Duration])]) {
    let Some(dir) = std::env::var_os("STRAIT_BENCH_OUT") else {
        return;
    };
    let mut text = format!("# {title}\n");
    for (name, sorted) in series {
        for q in [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999] {
            let us = percentile(sorted, q).as_secs_f64() * 1e6;
            text.push_str(&format!("{name}\t{q}\t{:.1}\n", us.max(0.1)));
        }
    }
    let path = std::path::Path::new(&dir).join(format!("{stem}.tsv"));
    if let Err(e) = std::fs::write(&path, text) {
        eprintln!("cannot write {}: {e}", path.display());
    }
}
