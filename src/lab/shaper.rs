//! The netns lab's packet delayer on a kernel without `tc netem`: one process (`strait lab
//! shaper`, started by `lab up` when netem is missing) that holds the packets of delayed links
//! for their delay and jitter and then lets them go on, through the kernel's NFQUEUE.
//!
//! Each link end has its own queue number. While a link is delayed, its iptables chain
//! (`strait-DEV`, which also drops for loss and cuts) ends in `-j NFQUEUE --queue-num Q`; a
//! thread of this process that entered the link end's network namespace holds each packet of
//! queue Q until `now + delay ± jitter` (uniform, like netem's default) and accepts it then.
//! Packets of one queue leave in due order (ties in arrival order), so without jitter nothing
//! is reordered. A link that is not delayed has no NFQUEUE rule: its packets never leave the
//! kernel. Loss and cuts stay iptables rules.
//!
//! Control: the relays' protocol (one JSON line each way, see [`super::relay`]):
//! `{"set": {"a": "east", "b": "west", "loss": 0, "delay_ms": 150, "jitter_ms": 10}}` sets the
//! per-direction delay of both ends of that link (loss must be 0 here), `{"stats": null}` lists
//! every queue with its figures and counters.

use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::nfqueue::{Event, QueueSocket};
use super::relay::{self, Request, Shape};

/// The shaper's plan: written by `lab up` to `DIR/shaper.json`.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub control: SocketAddr,
    pub queues: Vec<QueuePlan>,
}

/// One link end: what leaves namespace `ns` through `dev` (from `a` towards `b`).
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct QueuePlan {
    pub a: String,
    pub b: String,
    pub ns: String,
    pub dev: String,
    pub queue: u16,
}

/// What `stats` reports of one queue.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct QueueStats {
    pub a: String,
    pub b: String,
    pub ns: String,
    pub dev: String,
    pub queue: u16,
    pub delay_ms: f64,
    pub jitter_ms: f64,
    /// Packets handed to us, let go, and held right now.
    pub queued: u64,
    pub released: u64,
    pub held: u64,
    /// Times the kernel dropped packets because our socket's buffer was full.
    pub overflows: u64,
}

/// Packets a queue may hold (the kernel drops beyond it, like netem's `limit`).
const MAX_HELD: u32 = 100_000;
/// The netlink socket's receive buffer.
const SOCKET_BUFFER: usize = 16 << 20;

#[derive(Default)]
struct Figures {
    delay: Duration,
    jitter: Duration,
    queued: u64,
    released: u64,
    overflows: u64,
}

/// A held packet, ordered by when it is due (then by arrival).
#[derive(PartialEq, Eq)]
struct Held {
    due: Instant,
    seq: u64,
    queue: u16,
    id: u32,
}

impl Ord for Held {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // BinaryHeap is a max-heap: the earliest due must come out first.
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// The state one namespace's threads share.
#[derive(Default)]
struct Pending {
    heap: BinaryHeap<Held>,
    seq: u64,
}

struct Namespace {
    held: Mutex<Pending>,
    due: Condvar,
}

struct Shared {
    plan: Plan,
    figures: Mutex<HashMap<u16, Figures>>,
    namespaces: HashMap<String, Arc<Namespace>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// When a packet that arrives `now` is due: `delay ± jitter`, never before now.
fn due_at(now: Instant, delay: Duration, jitter: Duration, rng: &mut impl rand::RngExt) -> Instant {
    if jitter.is_zero() {
        return now + delay;
    }
    let j = jitter.as_secs_f64();
    let d = (delay.as_secs_f64() + rng.random_range(-j..=j)).max(0.0);
    now + Duration::from_secs_f64(d)
}

/// Open and bind the queues of namespace `ns` from a thread inside it; then receive there and
/// release from a second thread.
fn start_namespace(shared: Arc<Shared>, ns: String, queues: Vec<u16>) -> anyhow::Result<()> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let space = shared
        .namespaces
        .get(&ns)
        .cloned()
        .context("namespace without state")?;
    let name = ns.clone();
    std::thread::Builder::new()
        .name(format!("shaper-{ns}"))
        .spawn(move || {
            let socket = super::netns::enter(&name)
                .and_then(|()| QueueSocket::open(SOCKET_BUFFER))
                .map_err(|e| format!("namespace {name}: netlink socket: {e}"))
                .and_then(|s| {
                    for q in &queues {
                        s.bind_queue(*q, MAX_HELD)
                            .map_err(|e| format!("namespace {name}: binding NFQUEUE {q}: {e}"))?;
                    }
                    Ok(s)
                });
            let socket = match socket {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let releaser = match socket.try_clone() {
                Ok(r) => r,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("namespace {name}: {e}")));
                    return;
                }
            };
            let (space2, shared2, name2) = (space.clone(), shared.clone(), name.clone());
            if let Err(e) = std::thread::Builder::new()
                .name(format!("release-{name}"))
                .spawn(move || release(&releaser, &space2, &shared2, &name2))
            {
                let _ = ready_tx.send(Err(format!("namespace {name}: {e}")));
                return;
            }
            let _ = ready_tx.send(Ok(()));
            receive(&socket, &space, &shared, &name);
        })?;
    ready_rx
        .recv()
        .map_err(|_| anyhow::anyhow!("namespace {ns}: the shaper thread ended"))?
        .map_err(anyhow::Error::msg)
}

fn receive(socket: &QueueSocket, space: &Namespace, shared: &Shared, ns: &str) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut events = Vec::new();
    let mut rng = rand::rng();
    loop {
        events.clear();
        match socket.receive(&mut buf, &mut events) {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(%ns, "the kernel dropped queued packets: our socket buffer was full");
                for f in lock(&shared.figures).values_mut() {
                    f.overflows += 1;
                }
            }
            Err(e) => {
                tracing::error!(%ns, error = %e, "NFQUEUE receive failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        }
        let now = Instant::now();
        let mut fresh = Vec::with_capacity(events.len());
        {
            let mut figures = lock(&shared.figures);
            for e in &events {
                match e {
                    Event::Packet { queue, id } => {
                        let f = figures.entry(*queue).or_default();
                        f.queued += 1;
                        fresh.push((due_at(now, f.delay, f.jitter, &mut rng), *queue, *id));
                    }
                    Event::Ack { seq, errno } if *errno != 0 => {
                        tracing::warn!(%ns, seq, errno, "the kernel refused a verdict");
                    }
                    Event::Ack { .. } => {}
                }
            }
        }
        if fresh.is_empty() {
            continue;
        }
        let mut held = lock(&space.held);
        for (due, queue, id) in fresh {
            held.seq += 1;
            let seq = held.seq;
            held.heap.push(Held {
                due,
                seq,
                queue,
                id,
            });
        }
        drop(held);
        space.due.notify_one();
    }
}

fn release(socket: &QueueSocket, space: &Namespace, shared: &Shared, ns: &str) {
    let mut ready = Vec::new();
    loop {
        {
            let mut held = lock(&space.held);
            loop {
                let now = Instant::now();
                match held.heap.peek() {
                    None => {
                        held = space.due.wait(held).unwrap_or_else(|p| p.into_inner());
                    }
                    Some(h) if h.due > now => {
                        let wait = h.due - now;
                        held = space
                            .due
                            .wait_timeout(held, wait)
                            .map(|(g, _)| g)
                            .unwrap_or_else(|p| p.into_inner().0);
                    }
                    Some(_) => break,
                }
            }
            let now = Instant::now();
            while held.heap.peek().is_some_and(|h| h.due <= now) {
                if let Some(h) = held.heap.pop() {
                    ready.push((h.queue, h.id));
                }
            }
        }
        // Counted once per batch, not once per packet under the shared lock. A batch is in
        // due order, so a queue's packets mostly come in runs.
        let mut released: Vec<(u16, u64)> = Vec::new();
        for (queue, id) in ready.drain(..) {
            if let Err(e) = socket.accept(queue, id) {
                tracing::warn!(%ns, queue, id, error = %e, "verdict not sent");
                continue;
            }
            match released.last_mut() {
                Some((q, n)) if *q == queue => *n += 1,
                _ => released.push((queue, 1)),
            }
        }
        let mut figures = lock(&shared.figures);
        for (queue, n) in released {
            figures.entry(queue).or_default().released += n;
        }
    }
}

fn stats(shared: &Shared) -> Vec<QueueStats> {
    let figures = lock(&shared.figures);
    shared
        .plan
        .queues
        .iter()
        .map(|q| {
            let f = figures.get(&q.queue);
            let (queued, released) = f.map(|f| (f.queued, f.released)).unwrap_or_default();
            QueueStats {
                a: q.a.clone(),
                b: q.b.clone(),
                ns: q.ns.clone(),
                dev: q.dev.clone(),
                queue: q.queue,
                delay_ms: f.map(|f| f.delay.as_secs_f64() * 1000.0).unwrap_or(0.0),
                jitter_ms: f.map(|f| f.jitter.as_secs_f64() * 1000.0).unwrap_or(0.0),
                queued,
                released,
                held: queued.saturating_sub(released),
                overflows: f.map(|f| f.overflows).unwrap_or(0),
            }
        })
        .collect()
}

fn answer(shared: &Shared, line: &str) -> serde_json::Value {
    let req: Request = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => return serde_json::json!({"error": format!("bad request: {e}")}),
    };
    match req {
        Request::Stats(()) => serde_json::json!({"queues": stats(shared)}),
        Request::Set { a, b, shape } => {
            if shape.loss != 0.0 {
                return serde_json::json!({"error":
                    "the shaper only delays: loss and cuts are the link's iptables rules"});
            }
            if !(shape.delay_ms >= 0.0 && shape.jitter_ms >= 0.0)
                || shape.delay_ms > 3_600_000.0
                || shape.jitter_ms > 3_600_000.0
            {
                return serde_json::json!({"error":
                    format!("delay and jitter must be within 0 ms..1 h: {shape:?}")});
            }
            let ends: Vec<u16> = shared
                .plan
                .queues
                .iter()
                .filter(|q| (q.a == a && q.b == b) || (q.a == b && q.b == a))
                .map(|q| q.queue)
                .collect();
            if ends.is_empty() {
                return serde_json::json!({"error": format!("no link between `{a}` and `{b}`")});
            }
            let mut figures = lock(&shared.figures);
            for q in ends {
                let f = figures.entry(q).or_default();
                f.delay = Duration::from_secs_f64(shape.delay_ms / 1000.0);
                f.jitter = Duration::from_secs_f64(shape.jitter_ms / 1000.0);
            }
            tracing::info!(%a, %b, delay_ms = shape.delay_ms, jitter_ms = shape.jitter_ms, "link delayed");
            serde_json::json!({"ok": true})
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct ShaperArgs {
    /// The shaper's plan (`DIR/shaper.json`, written by `lab up`).
    #[arg(long)]
    pub config: PathBuf,
}

/// `strait lab shaper`: bind every queue of the plan in its namespace, then serve the control
/// port until killed.
pub async fn run(args: ShaperArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let plan: Plan = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a shaper plan", args.config.display()))?;
    let mut by_ns: HashMap<String, Vec<u16>> = HashMap::new();
    for q in &plan.queues {
        by_ns.entry(q.ns.clone()).or_default().push(q.queue);
    }
    let shared = Arc::new(Shared {
        namespaces: by_ns
            .keys()
            .map(|ns| {
                let space = Namespace {
                    held: Mutex::new(Pending::default()),
                    due: Condvar::new(),
                };
                (ns.clone(), Arc::new(space))
            })
            .collect(),
        figures: Mutex::new(HashMap::new()),
        plan,
    });
    for (ns, queues) in by_ns {
        start_namespace(shared.clone(), ns, queues)?;
    }
    let control = shared.plan.control;
    let listener = tokio::net::TcpListener::bind(control)
        .await
        .with_context(|| format!("control port {control}"))?;
    tracing::info!(%control, queues = shared.plan.queues.len(), "lab shaper up");
    relay::serve_control(listener, move |line| answer(&shared, line)).await
}

/// Delay both ends of the link between `a` and `b` (per-direction figures).
pub fn set(
    control: SocketAddr,
    a: &str,
    b: &str,
    delay_ms: f64,
    jitter_ms: f64,
) -> Result<(), String> {
    let shape = Shape {
        loss: 0.0,
        delay_ms,
        jitter_ms,
    };
    relay::request(
        control,
        "shaper",
        &Request::Set {
            a: a.to_string(),
            b: b.to_string(),
            shape,
        },
    )
    .map(|_| ())
}

/// Every queue's figures and counters.
pub fn queue_stats(control: SocketAddr) -> Result<Vec<QueueStats>, String> {
    let v = relay::request(control, "shaper", &Request::Stats(()))?;
    serde_json::from_value(v["queues"].clone()).map_err(|e| format!("shaper stats: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_packets_leave_in_due_order_then_arrival_order() {
        let t = Instant::now();
        let mut heap = BinaryHeap::new();
        for (due_ms, seq) in [(30, 1), (10, 2), (10, 3), (20, 4)] {
            heap.push(Held {
                due: t + Duration::from_millis(due_ms),
                seq,
                queue: 1,
                id: seq as u32,
            });
        }
        let order: Vec<u64> = std::iter::from_fn(|| heap.pop().map(|h| h.seq)).collect();
        assert_eq!(order, vec![2, 3, 4, 1]);
    }

    #[test]
    fn jitter_stays_within_its_bounds_and_never_before_now() {
        let now = Instant::now();
        let mut rng = rand::rng();
        let (d, j) = (Duration::from_millis(150), Duration::from_millis(10));
        let mut seen_low = false;
        let mut seen_high = false;
        for _ in 0..10_000 {
            let due = due_at(now, d, j, &mut rng) - now;
            assert!(due >= Duration::from_millis(140) && due <= Duration::from_millis(160));
            seen_low |= due < Duration::from_millis(145);
            seen_high |= due > Duration::from_millis(155);
        }
        assert!(seen_low && seen_high, "jitter spreads both ways");
        // A jitter larger than the delay never makes a packet due in the past.
        for _ in 0..1000 {
            assert!(
                due_at(
                    now,
                    Duration::from_millis(1),
                    Duration::from_millis(50),
                    &mut rng
                ) >= now
            );
        }
        assert_eq!(due_at(now, d, Duration::ZERO, &mut rng), now + d);
    }

    fn shared() -> Shared {
        let q = |a: &str, b: &str, queue| QueuePlan {
            a: a.into(),
            b: b.into(),
            ns: format!("ns-{a}"),
            dev: format!("to-{b}"),
            queue,
        };
        Shared {
            plan: Plan {
                control: "127.0.0.1:1".parse().expect("address"),
                queues: vec![
                    q("east", "west", 1),
                    q("west", "east", 2),
                    q("east", "etcd", 3),
                ],
            },
            figures: Mutex::new(HashMap::new()),
            namespaces: HashMap::new(),
        }
    }

    #[test]
    fn control_sets_both_ends_of_a_link_and_refuses_the_rest() {
        let s = shared();
        let ok = answer(
            &s,
            r#"{"set": {"a": "west", "b": "east", "loss": 0, "delay_ms": 150, "jitter_ms": 10}}"#,
        );
        assert_eq!(ok, serde_json::json!({"ok": true}));
        let st = stats(&s);
        assert_eq!(st[0].delay_ms, 150.0);
        assert_eq!(st[1].jitter_ms, 10.0);
        assert_eq!(st[2].delay_ms, 0.0, "the etcd link is untouched");
        for (bad, why) in [
            (
                r#"{"set": {"a": "east", "b": "west", "loss": 0.1, "delay_ms": 1, "jitter_ms": 0}}"#,
                "only delays",
            ),
            (
                r#"{"set": {"a": "east", "b": "west", "loss": 0, "delay_ms": -1, "jitter_ms": 0}}"#,
                "within 0 ms",
            ),
            (
                r#"{"set": {"a": "east", "b": "north", "loss": 0, "delay_ms": 1, "jitter_ms": 0}}"#,
                "no link between",
            ),
            ("not json", "bad request"),
        ] {
            let e = answer(&s, bad);
            assert!(
                e["error"].as_str().is_some_and(|e| e.contains(why)),
                "{bad}: {e}"
            );
        }
        assert_eq!(
            stats(&s)[0].delay_ms,
            150.0,
            "a refused request changes nothing"
        );
    }
}
