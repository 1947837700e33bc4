//! `strait demo`: the guided failover tour. It builds a lab (three clusters, in network
//! namespaces as root or on loopback addresses with user-space links otherwise: east and central in us-east, west in us-west; real etcd, control planes,
//! gateways over QUIC + mTLS, echo and payments replicas in two zones, client sidecars), sends
//! traffic from east's client sidecar, and walks through steady state → the preferred link cut →
//! failover → heal → traffic back → a zone killed → zone failover, with a live view of who
//! serves the traffic and the links' states. It writes the report (report.md, report.html) and
//! takes the lab down at the end, on Ctrl-C too.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::chaos::report;
use crate::chaos::scenario::{self, Plan, Tick, View};
use crate::lab::{self, LabDir, UpArgs};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Where the lab lives while the demo runs.
    #[arg(long, default_value_os_t = std::env::temp_dir().join("strait-demo"))]
    dir: PathBuf,
    /// Where to write the report (default: ./strait-demo-report).
    #[arg(long, default_value = "strait-demo-report")]
    report: PathBuf,
    /// Leave the lab running at the end (then `strait lab down --dir DIR --name demo`).
    #[arg(long)]
    keep: bool,
    /// netns (needs root) or loopback; default: netns as root, loopback otherwise.
    #[arg(long, default_value_t = lab::default_mode())]
    mode: String,
}

/// The tour, as a scenario (also shipped as deploy/lab/scenarios/tour.yaml).
pub const TOUR: &str = include_str!("../deploy/lab/scenarios/tour.yaml");

const NAME: &str = "demo";

struct Live;

impl View for Live {
    fn step(&mut self, t: Duration, action: &str, say: Option<&str>) {
        println!(
            "\n\x1b[1;33m▶ t={:.0}s  strait chaos {action}\x1b[0m",
            t.as_secs_f64()
        );
        if let Some(s) = say {
            println!("  \x1b[1m{s}\x1b[0m");
        }
    }

    fn tick(&mut self, tick: &Tick<'_>) {
        println!("  {}", scenario::summary_line(tick));
    }
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let plan = Plan::parse(TOUR)?;
    println!(
        "\x1b[1mStrait demo\x1b[0m: a federation of three clusters on this machine, and a failover tour.\n\
         east's client sidecar calls payments (running in west and central; policy: west, then central)\n\
         and echo (running in every cluster, two zones each; the client sits in east/zone-a).\n"
    );
    let tour = async {
        let up = UpArgs {
            at: LabDir {
                dir: args.dir.clone(),
            },
            clusters: 3,
            mode: args.mode.clone(),
            name: NAME.into(),
            replicas: 1,
        };
        let lab = lab::up(&up).await?;
        println!(
            "\nevery component is up and every link between the gateways is up. The tour takes {}.",
            plan.scenario.duration
        );
        let observed = scenario::execute(lab, &plan, &mut Live).await?;
        let verdict = report::write(&args.report, &plan.scenario, &observed)?;
        println!("\n\x1b[1mWhat was measured\x1b[0m\n\n{}", verdict.text);
        println!(
            "report: {} — open {} in a browser for the timeline.",
            args.report.join("report.md").display(),
            args.report.join("report.html").display()
        );
        anyhow::Ok(verdict.passed)
    };
    let outcome = tokio::select! {
        r = tour => Some(r),
        _ = crate::shutdown_signal() => None,
    };
    if args.keep && outcome.is_some() {
        println!(
            "\nthe lab keeps running: `strait lab status --dir {0}`, `strait chaos --dir {0} …`, \
             `strait lab down --dir {0} --name {NAME}`",
            args.dir.display()
        );
    } else {
        println!("\ntaking the lab down");
        lab::down(&args.dir, NAME)?;
    }
    match outcome {
        None => {
            println!("interrupted; the lab is down");
            Ok(())
        }
        Some(Ok(true)) => Ok(()),
        Some(Ok(false)) => {
            anyhow::bail!("the tour's expectations were not all met (see the report)")
        }
        Some(Err(e)) => Err(e),
    }
}
