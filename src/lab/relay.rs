//! The loopback lab's links: one process (`strait lab relay`, started by `lab up --mode
//! loopback`) holding a user-space relay on every path between places — two UDP relays per
//! pair of clusters (one each way a gateway dials its peer; QUIC) and one TCP relay from each
//! cluster to etcd — and a control port through which `strait chaos` shapes them.
//!
//! The control protocol is one JSON line per connection and one JSON line back, on loopback:
//!
//! - `{"set": {"a": "east", "b": "west", "loss": 0.1, "delay_ms": 5, "jitter_ms": 1}}` shapes
//!   every path of the link between `a` and `b` with these per-direction figures (`loss` 1:
//!   cut). Answer `{"ok": true}` or `{"error": "…"}`.
//! - `{"stats": null}`: every path with its figures and counters.
//!
//! A TCP path (to etcd) can be cut and delayed; loss on a byte stream cannot be modelled in
//! user space (TCP would turn it into delay), so it is refused with a message saying so.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use testkit::relay::{Faults, TcpRelay, UdpRelay};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

/// The relays of a lab: written by `lab up` to `DIR/relays.json`, read by `lab relay`.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// The control port.
    pub control: SocketAddr,
    pub paths: Vec<PathPlan>,
}

/// One relay: traffic from `a` to `b` (the dialing side is `a`).
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct PathPlan {
    pub a: String,
    pub b: String,
    pub kind: PathKind,
    pub listen: SocketAddr,
    pub target: SocketAddr,
    /// UDP with fixed ends: the only client (`a`'s gateway replica) …
    #[serde(default)]
    pub client: Option<SocketAddr>,
    /// … and where the target sees it come from (and sends to reach it).
    #[serde(default)]
    pub outbound: Option<SocketAddr>,
    /// The shape it starts with (the link's base delay).
    pub shape: Shape,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PathKind {
    Udp,
    Tcp,
}

/// Per-direction figures of a link.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Shape {
    /// 0..=1; 1 is a cut.
    pub loss: f64,
    pub delay_ms: f64,
    pub jitter_ms: f64,
}

/// A control request (the relays' and the netns shaper's).
#[derive(Serialize, Deserialize, Debug)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum Request {
    Set {
        a: String,
        b: String,
        #[serde(flatten)]
        shape: Shape,
    },
    Stats(()),
}

/// What `stats` reports of one path.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct PathStats {
    pub a: String,
    pub b: String,
    pub kind: PathKind,
    pub listen: SocketAddr,
    pub target: SocketAddr,
    pub shape: Shape,
    /// UDP: datagrams forwarded and dropped, both directions. TCP: zero.
    pub forwarded: u64,
    pub dropped: u64,
}

enum Relay {
    Udp(UdpRelay),
    Tcp(TcpRelay),
}

struct Path {
    plan: PathPlan,
    relay: Relay,
}

fn duration_ms(ms: f64) -> Duration {
    Duration::from_secs_f64((ms / 1000.0).clamp(0.0, 3600.0))
}

impl Path {
    fn apply(&mut self, shape: Shape) -> Result<(), String> {
        if !(0.0..=1.0).contains(&shape.loss) || shape.delay_ms < 0.0 || shape.jitter_ms < 0.0 {
            return Err(format!(
                "loss must be within 0..=1 and delays not negative: {shape:?}"
            ));
        }
        match &self.relay {
            Relay::Udp(r) => r.set_faults(Faults {
                blackhole: shape.loss >= 1.0,
                loss: shape.loss,
                delay: duration_ms(shape.delay_ms),
                jitter: duration_ms(shape.jitter_ms),
            }),
            Relay::Tcp(r) => {
                if shape.loss > 0.0 && shape.loss < 1.0 {
                    return Err(format!(
                        "the path {} → {} is a TCP relay (loopback mode): it can be cut and delayed, \
                         but loss on a byte stream cannot be modelled in user space (use --mode netns)",
                        self.plan.a, self.plan.b
                    ));
                }
                if shape.jitter_ms > 0.0 {
                    return Err(format!(
                        "the path {} → {} is a TCP relay (loopback mode): it cannot add jitter \
                         (bytes on a stream keep their order); use a delay alone",
                        self.plan.a, self.plan.b
                    ));
                }
                if shape.loss >= 1.0 {
                    r.cut();
                } else {
                    r.heal();
                }
                r.set_delay(duration_ms(shape.delay_ms));
            }
        }
        self.plan.shape = shape;
        Ok(())
    }

    fn stats(&self) -> PathStats {
        let (forwarded, dropped) = match &self.relay {
            Relay::Udp(r) => {
                let s = r.stats();
                (
                    s.forwarded_to_target + s.forwarded_to_client,
                    s.dropped_to_target + s.dropped_to_client,
                )
            }
            Relay::Tcp(_) => (0, 0),
        };
        PathStats {
            a: self.plan.a.clone(),
            b: self.plan.b.clone(),
            kind: self.plan.kind,
            listen: self.plan.listen,
            target: self.plan.target,
            shape: self.plan.shape,
            forwarded,
            dropped,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct RelayArgs {
    /// The relay plan (`DIR/relays.json`, written by `lab up`).
    #[arg(long)]
    pub config: PathBuf,
}

/// `strait lab relay`: start every relay of the plan and serve the control port until killed.
pub async fn run(args: RelayArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let plan: Plan = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a relay plan", args.config.display()))?;
    let mut paths = Vec::new();
    for p in plan.paths {
        let relay = match p.kind {
            PathKind::Udp => Relay::Udp(
                match (p.client, p.outbound) {
                    (Some(client), Some(outbound)) => {
                        UdpRelay::between(p.listen, client, outbound, p.target).await
                    }
                    _ => UdpRelay::start_on(p.listen, p.target).await,
                }
                .with_context(|| format!("UDP relay {} → {} on {}", p.a, p.b, p.listen))?,
            ),
            PathKind::Tcp => Relay::Tcp(
                TcpRelay::start_on(p.listen, p.target)
                    .await
                    .with_context(|| format!("TCP relay {} → {} on {}", p.a, p.b, p.listen))?,
            ),
        };
        let shape = p.shape;
        let mut path = Path { plan: p, relay };
        path.apply(shape).map_err(anyhow::Error::msg)?;
        paths.push(path);
    }
    let listener = TcpListener::bind(plan.control)
        .await
        .with_context(|| format!("control port {}", plan.control))?;
    tracing::info!(control = %plan.control, paths = paths.len(), "lab relays up");
    let paths = Mutex::new(paths);
    serve_control(listener, move |line| answer(&paths, line)).await
}

/// Serve a control port: one JSON line in, `answer`'s JSON line out, per connection.
pub(crate) async fn serve_control(
    listener: TcpListener,
    answer: impl Fn(&str) -> serde_json::Value + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let answer = Arc::new(answer);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "control accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let answer = answer.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            let mut r = tokio::io::BufReader::new(r);
            let read = tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line)).await;
            let answer = match read {
                Ok(Ok(_)) => answer(&line),
                _ => serde_json::json!({"error": "no request line within 5 s"}),
            };
            let _ = w.write_all(format!("{answer}\n").as_bytes()).await;
        });
    }
}

fn answer(paths: &Mutex<Vec<Path>>, line: &str) -> serde_json::Value {
    let req: Request = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => return serde_json::json!({"error": format!("bad request: {e}")}),
    };
    let mut paths = paths.lock().unwrap_or_else(|p| p.into_inner());
    match req {
        Request::Stats(()) => {
            serde_json::json!({"paths": paths.iter().map(Path::stats).collect::<Vec<_>>()})
        }
        Request::Set { a, b, shape } => {
            let mut found = 0;
            for p in paths
                .iter_mut()
                .filter(|p| (p.plan.a == a && p.plan.b == b) || (p.plan.a == b && p.plan.b == a))
            {
                if let Err(e) = p.apply(shape) {
                    return serde_json::json!({ "error": e });
                }
                found += 1;
            }
            if found == 0 {
                serde_json::json!({"error": format!("no relay between `{a}` and `{b}`")})
            } else {
                tracing::info!(%a, %b, ?shape, "link shaped");
                serde_json::json!({"ok": true})
            }
        }
    }
}

/// Send one request to the lab's `what` process (relay, shaper) at `control`; its answer.
pub(crate) fn request(
    control: SocketAddr,
    what: &str,
    req: &Request,
) -> Result<serde_json::Value, String> {
    let io = |e: std::io::Error| format!("the lab's {what} process at {control}: {e}");
    let mut s =
        std::net::TcpStream::connect_timeout(&control, Duration::from_secs(2)).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(io)?;
    s.set_write_timeout(Some(Duration::from_secs(5)))
        .map_err(io)?;
    let line = serde_json::to_string(req).map_err(|e| e.to_string())?;
    s.write_all(format!("{line}\n").as_bytes()).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).map_err(io)?;
    let v: serde_json::Value = serde_json::from_str(answer.trim())
        .map_err(|e| format!("the lab's {what} process at {control} answered `{answer}`: {e}"))?;
    match v.get("error").and_then(|e| e.as_str()) {
        Some(e) => Err(e.to_string()),
        None => Ok(v),
    }
}

/// Shape every path of the link between `a` and `b`.
pub fn set(control: SocketAddr, a: &str, b: &str, shape: Shape) -> Result<(), String> {
    request(
        control,
        "relay",
        &Request::Set {
            a: a.to_string(),
            b: b.to_string(),
            shape,
        },
    )
    .map(|_| ())
}

/// Every path's figures and counters.
pub fn stats(control: SocketAddr) -> Result<Vec<PathStats>, String> {
    let v = request(control, "relay", &Request::Stats(()))?;
    serde_json::from_value(v["paths"].clone()).map_err(|e| format!("relay stats: {e}"))
}
