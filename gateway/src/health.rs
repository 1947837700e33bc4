//! Link health: the state machine that turns probe replies and connection events into a link's
//! [`LinkHealth`] (up, degraded, down), and the wire format of the probes.
//!
//! The gateway sends a probe (a QUIC datagram) on every link every `probe_interval`; the peer
//! echoes it. The [`LinkTracker`] is pure: it does no I/O and reads no clock. The caller passes
//! every instant in, so the tests drive it through hours of simulated probes deterministically.
//!
//! # The rules
//!
//! - **Down** at once when the connection is lost ([`LinkTracker::on_disconnected`]), and when
//!   probes are being sent but no reply has arrived for `down_after` (600 ms by default: with
//!   100 ms probes a blackholed LAN link is down within about 700 ms). Evaluations happen on probe
//!   ticks, so a silence short of `down_after` by less than a tenth of `probe_interval` (at most
//!   10 ms) counts as long enough: timer jitter must not cost a whole interval. That is six probes lost in
//!   a row, so heavy random loss takes a link down now and then too: at 30 % loss per round trip
//!   about one probe in 1,400 ends such a run.
//! - **Up** again (after a reconnect, or when replies come back) once `up_after_replies`
//!   consecutive probes were answered. It comes back **degraded** instead when the smoothed RTT of
//!   those replies is already at or above `degraded_rtt`, when the probes since it went down show
//!   a bad loss, or when it was degraded as it went down: a lossy link that keeps dropping out
//!   must not read up between its outages. It then recovers like any degraded link.
//! - **Degraded** after `degrade_after` consecutive evaluations with a bad loss ratio or a smoothed
//!   RTT ≥ `degraded_rtt`; back to **up** only after `recover_after` consecutive evaluations with
//!   loss < `degraded_loss / 2` and RTT < 0.8 × `degraded_rtt`.
//!
//! A probe counts only once its outcome is final: answered or not, it enters the loss window
//! `probe_timeout` after it was sent, so probes in flight never count as lost (and a reply that
//! arrives later than `probe_timeout` is ignored: the probe stays lost). The window holds the last
//! `window` such probes.
//!
//! # Why the loss rule is more than "window loss ≥ `degraded_loss`"
//!
//! With a 50-probe window the loss ratio is noisy: at 5 % random loss its standard deviation is
//! about 3 points, so a window shows ≥ 10 % loss about one time in ten and the naive rule (≥ 10 %
//! for 5 evaluations in, < 5 % for 20 evaluations out) flaps about ten times in 2,000 probes. The
//! tracker therefore asks for evidence before it calls a link lossy. The loss condition holds when,
//! with at least `min(window, 10)` probes in the window, either
//!
//! - the window's lost count exceeds `degraded_loss` by 2.5 standard errors (`lost ≥ n·p +
//!   2.5·√(n·p·(1−p))`, with `p = degraded_loss`; 11 of 50 with the defaults): heavy loss is
//!   caught within a few seconds; or
//! - both the window ratio and a long-run loss average (an exponential average over about
//!   `4 × window` probes) are ≥ `degraded_loss`: moderate loss above the threshold is caught too,
//!   only more slowly.
//!
//! Recovery needs the window ratio below `degraded_loss / 2` and either the long-run average below
//! it as well or a full window without a single loss. With the defaults, 5 % random loss keeps a
//! link up (in simulation, 4 runs of 2,000 probes in 1,000 see it degraded at all), 30 % loss
//! degrades it within a few seconds (3–7 s), and a healed link is up again about 7 s later.
//!
//! # Wire format
//!
//! A probe is 10 bytes: one byte of magic and version ([`PROBE_MAGIC`]), one byte of kind (1 ping,
//! 2 pong), and the sequence number as 8 bytes big-endian. A pong echoes the ping's sequence
//! number.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use federation::model::LinkHealth;

/// The first byte of every probe: magic `0xA` and wire version 1.
pub const PROBE_MAGIC: u8 = 0xA1;

/// The length of a probe on the wire.
pub const PROBE_LEN: usize = 10;

/// The largest accepted `window` (bounds the memory of one tracker).
pub const MAX_WINDOW: usize = 65_536;

/// Standard errors by which a window's lost count must exceed `degraded_loss` (the fast path).
const LOSS_MARGIN_SIGMAS: f64 = 2.5;

/// The long-run loss average spans this many windows (its weight per probe is
/// `1 / (LONG_RUN_WINDOWS × window)`).
const LONG_RUN_WINDOWS: f64 = 4.0;

/// The loss condition needs at least this many probes in the window (or a full window, if
/// smaller), so a loss in the first few probes of a connection cannot degrade a link.
const MIN_LOSS_SAMPLES: usize = 10;

/// The most by which a silence may fall short of `down_after` at a tick (timer jitter) and
/// still take the link down at that tick; otherwise a tenth of `probe_interval`.
const MAX_TICK_SLACK: Duration = Duration::from_millis(10);

/// The most in-flight probe records kept beyond the window, whatever the caller does.
const MAX_IN_FLIGHT: usize = 4_096;

/// The smoothing factor of the RTT (TCP's SRTT, RFC 6298).
const RTT_ALPHA: f64 = 1.0 / 8.0;

/// What a probe is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    /// Sent every probe interval.
    Ping,
    /// The echo of a ping, with the ping's sequence number.
    Pong,
    /// The sender is shutting down: open no new tunnels to it (those under way finish). A
    /// gateway of an earlier release ignores it (an unknown kind is a bad datagram).
    Leaving,
}

impl ProbeKind {
    fn to_byte(self) -> u8 {
        match self {
            ProbeKind::Ping => 1,
            ProbeKind::Pong => 2,
            ProbeKind::Leaving => 3,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(ProbeKind::Ping),
            2 => Some(ProbeKind::Pong),
            3 => Some(ProbeKind::Leaving),
            _ => None,
        }
    }
}

/// Why a datagram is not a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("a probe is {PROBE_LEN} bytes, this datagram has {0}")]
    Length(usize),
    #[error("bad probe magic/version byte {0:#04x} (expected {PROBE_MAGIC:#04x})")]
    Magic(u8),
    #[error("unknown probe kind {0}")]
    Kind(u8),
}

/// Encode a probe.
pub fn encode_probe(kind: ProbeKind, seq: u64) -> [u8; PROBE_LEN] {
    let mut out = [0u8; PROBE_LEN];
    out[0] = PROBE_MAGIC;
    out[1] = kind.to_byte();
    out[2..].copy_from_slice(&seq.to_be_bytes());
    out
}

/// Decode a probe, rejecting anything of the wrong length, magic/version or kind.
pub fn decode_probe(bytes: &[u8]) -> Result<(ProbeKind, u64), ProbeError> {
    let b: &[u8; PROBE_LEN] = bytes
        .try_into()
        .map_err(|_| ProbeError::Length(bytes.len()))?;
    if b[0] != PROBE_MAGIC {
        return Err(ProbeError::Magic(b[0]));
    }
    let kind = ProbeKind::from_byte(b[1]).ok_or(ProbeError::Kind(b[1]))?;
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&b[2..]);
    Ok((kind, u64::from_be_bytes(seq)))
}

/// Link health tuning. See the module documentation for how each field is used.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HealthConfig {
    /// How often a probe is sent (and the state evaluated).
    pub probe_interval: Duration,
    /// A probe unanswered this long is lost; its outcome enters the loss window only then.
    pub probe_timeout: Duration,
    /// Probes sent but no reply for this long: the link is down.
    pub down_after: Duration,
    /// Consecutive replies needed before a down link is up again.
    pub up_after_replies: u32,
    /// Probes in the loss window.
    pub window: usize,
    /// Loss ratio (0..1, exclusive) at which the link is degraded.
    pub degraded_loss: f64,
    /// Smoothed RTT at which the link is degraded.
    pub degraded_rtt: Duration,
    /// Consecutive bad evaluations before an up link is degraded.
    pub degrade_after: u32,
    /// Consecutive good evaluations before a degraded link is up again.
    pub recover_after: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            probe_interval: Duration::from_millis(100),
            probe_timeout: Duration::from_millis(500),
            down_after: Duration::from_millis(600),
            up_after_replies: 3,
            window: 50,
            degraded_loss: 0.10,
            degraded_rtt: Duration::from_millis(250),
            degrade_after: 5,
            recover_after: 20,
        }
    }
}

impl HealthConfig {
    /// Check the settings; the error names the field and what is wrong with it.
    pub fn validate(&self) -> Result<(), String> {
        if self.probe_interval.is_zero() {
            return Err("probe_interval must be greater than zero".into());
        }
        if self.probe_timeout.is_zero() {
            return Err("probe_timeout must be greater than zero".into());
        }
        if self.down_after <= self.probe_interval {
            return Err(format!(
                "down_after ({:?}) must be longer than probe_interval ({:?})",
                self.down_after, self.probe_interval
            ));
        }
        if self.up_after_replies == 0 {
            return Err("up_after_replies must be at least 1".into());
        }
        if !(1..=MAX_WINDOW).contains(&self.window) {
            return Err(format!(
                "window must be between 1 and {MAX_WINDOW} probes, got {}",
                self.window
            ));
        }
        if !(self.degraded_loss > 0.0 && self.degraded_loss < 1.0) {
            return Err(format!(
                "degraded_loss must be a ratio strictly between 0 and 1, got {}",
                self.degraded_loss
            ));
        }
        if self.degraded_rtt.is_zero() {
            return Err("degraded_rtt must be greater than zero".into());
        }
        if self.degrade_after == 0 {
            return Err("degrade_after must be at least 1".into());
        }
        if self.recover_after == 0 {
            return Err("recover_after must be at least 1".into());
        }
        Ok(())
    }
}

/// A change of a link's state.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub from: LinkHealth,
    pub to: LinkHealth,
    pub at: Instant,
    /// Why, for humans: e.g. `no probe reply for 700ms`.
    pub reason: String,
}

/// One probe sent.
#[derive(Debug, Clone, Copy)]
struct Probe {
    seq: u64,
    sent: Instant,
    replied: bool,
}

/// The health of one link. Starts down and disconnected.
///
/// Call [`on_connected`](Self::on_connected) and [`on_disconnected`](Self::on_disconnected) on
/// connection events, and on every probe tick [`evaluate`](Self::evaluate) then
/// [`next_probe`](Self::next_probe); feed every pong to [`on_reply`](Self::on_reply).
#[derive(Debug, Clone)]
pub struct LinkTracker {
    config: HealthConfig,
    state: LinkHealth,
    since: Instant,
    connected: bool,
    next_seq: u64,
    /// Probes in sequence order: first the `finalized` ones (in the loss window), then the ones
    /// in flight.
    probes: VecDeque<Probe>,
    finalized: usize,
    /// Lost probes among the finalized ones.
    lost: usize,
    /// Exponential average of the loss of finalized probes, over about `4 × window` probes.
    long_loss: f64,
    long_alpha: f64,
    srtt_ms: f64,
    /// Whether `srtt_ms` has a sample from the current connection.
    rtt_sampled: bool,
    /// Consecutive replies: to probes sent one after the other, the first after an unanswered
    /// probe or since the measurement restarted.
    reply_streak: u32,
    /// When the first probe after the last reply was sent.
    silent_since: Option<Instant>,
    last_sent: Option<Instant>,
    bad_evaluations: u32,
    good_evaluations: u32,
    in_flight_cap: usize,
    /// The link was degraded when it last went down: it comes back degraded.
    resume_degraded: bool,
}

impl LinkTracker {
    /// A tracker for a link that is not connected yet (down since `now`). An invalid `config`
    /// (see [`HealthConfig::validate`]) does not panic, but its behaviour is unspecified.
    pub fn new(config: HealthConfig, now: Instant) -> Self {
        let window = config.window.clamp(1, MAX_WINDOW);
        let config = HealthConfig { window, ..config };
        // Probes in flight: one per interval for a probe timeout, and some slack for a caller
        // that ticks fast.
        let in_flight_cap = config
            .probe_timeout
            .as_nanos()
            .checked_div(config.probe_interval.as_nanos())
            .map_or(MAX_IN_FLIGHT, |n| {
                usize::try_from(n)
                    .unwrap_or(MAX_IN_FLIGHT)
                    .saturating_mul(2)
            })
            .clamp(16, MAX_IN_FLIGHT);
        Self {
            config,
            state: LinkHealth::Down,
            since: now,
            connected: false,
            next_seq: 1,
            probes: VecDeque::with_capacity(window.min(1024) + 16),
            finalized: 0,
            lost: 0,
            long_loss: 0.0,
            long_alpha: 1.0 / (LONG_RUN_WINDOWS * window as f64),
            srtt_ms: 0.0,
            rtt_sampled: false,
            reply_streak: 0,
            silent_since: None,
            last_sent: None,
            bad_evaluations: 0,
            good_evaluations: 0,
            in_flight_cap,
            resume_degraded: false,
        }
    }

    pub fn config(&self) -> &HealthConfig {
        &self.config
    }

    /// A connection to the peer is established. The link stays down until
    /// `up_after_replies` probes on it were answered. Called again while connected (a new
    /// connection replaced the old one), it keeps the state and forgets the probes in flight on
    /// the old connection.
    pub fn on_connected(&mut self, now: Instant) {
        if self.connected && self.state != LinkHealth::Down {
            let finalized = self.finalized;
            let mut i = 0;
            self.probes.retain(|p| {
                let keep = i < finalized || p.replied;
                i += 1;
                keep
            });
            self.silent_since = None;
            tracing::debug!("link health: connection replaced, forgetting probes in flight");
        } else {
            self.restart_measurement();
        }
        self.connected = true;
        self.last_sent = self.last_sent.map(|t| t.max(now));
    }

    /// The connection is lost: the link is down at once. Returns the transition unless it was
    /// down already.
    pub fn on_disconnected(&mut self, now: Instant) -> Option<Transition> {
        self.connected = false;
        self.silent_since = None;
        self.reply_streak = 0;
        self.bad_evaluations = 0;
        self.good_evaluations = 0;
        self.transition(LinkHealth::Down, now, "connection lost".into())
    }

    /// Record a probe sent now; returns its sequence number (never reused by this tracker).
    pub fn next_probe(&mut self, now: Instant) -> u64 {
        // Keep send times monotonic, whatever the caller passes.
        let now = self.last_sent.map_or(now, |t| t.max(now));
        self.last_sent = Some(now);
        self.finalize(now);
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.probes.push_back(Probe {
            seq,
            sent: now,
            replied: false,
        });
        if self.connected && self.silent_since.is_none() {
            self.silent_since = Some(now);
        }
        while self.probes.len() > self.config.window + self.in_flight_cap {
            self.pop_oldest();
        }
        seq
    }

    /// A probe reply arrived. Replies to unknown probes (never sent, forgotten, or from before a
    /// reconnect), duplicates and replies later than `probe_timeout` are ignored.
    pub fn on_reply(&mut self, seq: u64, now: Instant) {
        if !self.connected {
            tracing::trace!(seq, "probe reply while disconnected: ignored");
            return;
        }
        let Ok(i) = self.probes.binary_search_by_key(&seq, |p| p.seq) else {
            tracing::trace!(seq, "reply to an unknown probe: ignored");
            return;
        };
        let timeout = self.config.probe_timeout;
        let Some(p) = self.probes.get_mut(i) else {
            return;
        };
        if p.replied {
            tracing::trace!(seq, "duplicate probe reply: ignored");
            return;
        }
        let rtt = now.saturating_duration_since(p.sent);
        if i < self.finalized || rtt >= timeout {
            tracing::trace!(seq, ?rtt, "late probe reply: ignored");
            return;
        }
        p.replied = true;
        let sample = rtt.as_secs_f64() * 1000.0;
        // The probe sent just before this one is unanswered: the replies are not consecutive.
        let gap = i
            .checked_sub(1)
            .and_then(|j| self.probes.get(j))
            .is_some_and(|q| q.seq.wrapping_add(1) == seq && !q.replied);
        if self.rtt_sampled {
            self.srtt_ms += RTT_ALPHA * (sample - self.srtt_ms);
        } else {
            self.srtt_ms = sample;
            self.rtt_sampled = true;
        }
        self.reply_streak = if gap {
            1
        } else {
            self.reply_streak.saturating_add(1)
        };
        self.silent_since = None;
    }

    /// Evaluate the link; call it on every probe tick. Returns the transition, if any.
    pub fn evaluate(&mut self, now: Instant) -> Option<Transition> {
        if !self.connected {
            return None;
        }
        self.finalize(now);
        match self.state {
            LinkHealth::Down => self.evaluate_down(now),
            LinkHealth::Up | LinkHealth::Degraded => {
                if let Some(t) = self.silent_since {
                    let silence = now.saturating_duration_since(t);
                    // Ticks come a little early or late: a silence a hair short of `down_after`
                    // at this tick must not wait for the next one.
                    let slack = (self.config.probe_interval / 10).min(MAX_TICK_SLACK);
                    if silence.saturating_add(slack) >= self.config.down_after {
                        self.restart_measurement();
                        return self.transition(
                            LinkHealth::Down,
                            now,
                            format!("no probe reply for {} ms", silence.as_millis()),
                        );
                    }
                }
                if self.state == LinkHealth::Up {
                    self.evaluate_up(now)
                } else {
                    self.evaluate_degraded(now)
                }
            }
        }
    }

    fn evaluate_down(&mut self, now: Instant) -> Option<Transition> {
        if self.reply_streak < self.config.up_after_replies {
            return None;
        }
        self.bad_evaluations = 0;
        self.good_evaluations = 0;
        let replies = self.reply_streak;
        if self.rtt_bad() {
            let reason = format!(
                "{replies} consecutive probe replies, smoothed RTT {:.1} ms",
                self.srtt_ms
            );
            self.transition(LinkHealth::Degraded, now, reason)
        } else if self.loss_bad() {
            let reason = format!(
                "{replies} consecutive probe replies, loss {:.1}% over {} probes",
                self.loss() * 100.0,
                self.finalized
            );
            self.transition(LinkHealth::Degraded, now, reason)
        } else if self.resume_degraded {
            let reason =
                format!("{replies} consecutive probe replies; it was degraded when it went down");
            self.transition(LinkHealth::Degraded, now, reason)
        } else {
            self.transition(
                LinkHealth::Up,
                now,
                format!("{replies} consecutive probe replies"),
            )
        }
    }

    fn evaluate_up(&mut self, now: Instant) -> Option<Transition> {
        let loss_bad = self.loss_bad();
        let rtt_bad = self.rtt_bad();
        if !(loss_bad || rtt_bad) {
            self.bad_evaluations = 0;
            return None;
        }
        self.bad_evaluations = self.bad_evaluations.saturating_add(1);
        if self.bad_evaluations < self.config.degrade_after {
            return None;
        }
        self.bad_evaluations = 0;
        self.good_evaluations = 0;
        let mut why = Vec::new();
        if loss_bad {
            why.push(format!(
                "loss {:.1}% over {} probes",
                self.loss() * 100.0,
                self.finalized
            ));
        }
        if rtt_bad {
            why.push(format!("smoothed RTT {:.1} ms", self.srtt_ms));
        }
        let reason = format!(
            "{} for {} evaluations",
            why.join(" and "),
            self.config.degrade_after
        );
        self.transition(LinkHealth::Degraded, now, reason)
    }

    fn evaluate_degraded(&mut self, now: Instant) -> Option<Transition> {
        if !(self.loss_good() && self.rtt_good()) {
            self.good_evaluations = 0;
            return None;
        }
        self.good_evaluations = self.good_evaluations.saturating_add(1);
        if self.good_evaluations < self.config.recover_after {
            return None;
        }
        self.bad_evaluations = 0;
        self.good_evaluations = 0;
        let reason = format!(
            "loss {:.1}% and smoothed RTT {:.1} ms for {} evaluations",
            self.loss() * 100.0,
            self.srtt_ms,
            self.config.recover_after
        );
        self.transition(LinkHealth::Up, now, reason)
    }

    /// Whether the loss is bad enough to degrade the link (see the module documentation).
    fn loss_bad(&self) -> bool {
        let n = self.finalized;
        if n == 0 || n < MIN_LOSS_SAMPLES.min(self.config.window) {
            return false;
        }
        let p = self.config.degraded_loss;
        let nf = n as f64;
        let lost = self.lost as f64;
        let clear_excess = lost >= nf * p + LOSS_MARGIN_SIGMAS * (nf * p * (1.0 - p)).sqrt();
        let sustained = self.long_loss >= p && self.loss() >= p;
        clear_excess || sustained
    }

    /// Whether the loss is low enough for a degraded link to recover.
    fn loss_good(&self) -> bool {
        let half = self.config.degraded_loss / 2.0;
        let clean_window = self.lost == 0 && self.finalized >= self.config.window;
        self.loss() < half && (self.long_loss < half || clean_window)
    }

    fn rtt_bad(&self) -> bool {
        self.rtt_sampled && self.srtt_ms >= duration_ms(self.config.degraded_rtt)
    }

    fn rtt_good(&self) -> bool {
        !self.rtt_sampled || self.srtt_ms < 0.8 * duration_ms(self.config.degraded_rtt)
    }

    /// Move probes whose outcome is final (sent at least `probe_timeout` ago) into the window,
    /// and drop the ones that fell out of it.
    fn finalize(&mut self, now: Instant) {
        while let Some(p) = self.probes.get(self.finalized) {
            if now.saturating_duration_since(p.sent) < self.config.probe_timeout {
                break;
            }
            let lost = !p.replied;
            self.finalized += 1;
            let x = if lost {
                self.lost += 1;
                1.0
            } else {
                0.0
            };
            self.long_loss += self.long_alpha * (x - self.long_loss);
        }
        while self.finalized > self.config.window {
            self.pop_oldest();
        }
    }

    /// Forget the oldest probe (keeping the window's counts right).
    fn pop_oldest(&mut self) {
        if let Some(p) = self.probes.pop_front()
            && self.finalized > 0
        {
            self.finalized -= 1;
            if !p.replied {
                self.lost = self.lost.saturating_sub(1);
            }
        }
    }

    /// Forget every probe and counter: a new connection, or a link that went down, is measured
    /// afresh. The smoothed RTT is kept for display until the first new sample replaces it.
    fn restart_measurement(&mut self) {
        self.probes.clear();
        self.finalized = 0;
        self.lost = 0;
        self.long_loss = 0.0;
        self.rtt_sampled = false;
        self.reply_streak = 0;
        self.silent_since = None;
        self.bad_evaluations = 0;
        self.good_evaluations = 0;
    }

    fn transition(&mut self, to: LinkHealth, now: Instant, reason: String) -> Option<Transition> {
        if self.state == to {
            return None;
        }
        let from = self.state;
        if to == LinkHealth::Down {
            self.resume_degraded = from == LinkHealth::Degraded;
        }
        self.state = to;
        self.since = now;
        Some(Transition {
            from,
            to,
            at: now,
            reason,
        })
    }

    pub fn state(&self) -> LinkHealth {
        self.state
    }

    /// The smoothed RTT in milliseconds (0 before the first reply).
    pub fn rtt_ms(&self) -> f64 {
        self.srtt_ms
    }

    /// The loss ratio (0..=1) over the probes in the window (0 while it is empty). The window
    /// starts afresh on every connection and whenever the link goes down for lack of replies.
    pub fn loss(&self) -> f64 {
        if self.finalized == 0 {
            0.0
        } else {
            self.lost as f64 / self.finalized as f64
        }
    }

    /// When the link entered its current state.
    pub fn since(&self) -> Instant {
        self.since
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// How long probes have gone unanswered (zero while replies come).
    pub fn silent_for(&self, now: Instant) -> Duration {
        self.silent_since
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t))
    }
}

fn duration_ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A deterministic pseudo-random generator (xorshift64*).
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Self {
            Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }
        fn next_f64(&mut self) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
            (x >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// A simulated link: a clock, the tracker, and replies in flight.
    struct Sim {
        t: LinkTracker,
        start: Instant,
        now: Instant,
        interval: Duration,
        /// (arrival, seq), in any order.
        in_flight: Vec<(Instant, u64)>,
        transitions: Vec<Transition>,
    }

    impl Sim {
        fn new(config: HealthConfig) -> Self {
            let start = Instant::now();
            Self {
                interval: config.probe_interval,
                t: LinkTracker::new(config, start),
                start,
                now: start,
                in_flight: Vec::new(),
                transitions: Vec::new(),
            }
        }

        /// Connected and up (after the replies it takes).
        fn up() -> Self {
            let mut s = Self::new(HealthConfig::default());
            s.connect();
            s.run(10, |_| Some(MS));
            assert_eq!(s.t.state(), LinkHealth::Up);
            s.transitions.clear();
            s
        }

        fn connect(&mut self) {
            self.t.on_connected(self.now);
        }

        /// Deliver the replies due by `until`, in arrival order.
        fn deliver(&mut self, until: Instant) {
            self.in_flight.sort();
            let due = self.in_flight.partition_point(|(at, _)| *at <= until);
            for (at, seq) in self.in_flight.drain(..due).collect::<Vec<_>>() {
                self.t.on_reply(seq, at);
            }
        }

        /// One probe tick: replies due arrive, the tracker evaluates, a probe is sent. `rtt`
        /// says whether (and after how long) the probe is answered.
        fn tick(&mut self, rtt: Option<Duration>) -> Option<Transition> {
            self.now += self.interval;
            self.deliver(self.now);
            let tr = self.t.evaluate(self.now);
            if let Some(tr) = &tr {
                self.transitions.push(tr.clone());
            }
            let seq = self.t.next_probe(self.now);
            if let Some(rtt) = rtt {
                self.in_flight.push((self.now + rtt, seq));
            }
            tr
        }

        /// `n` ticks; `f(i)` gives each probe's fate.
        fn run(&mut self, n: usize, mut f: impl FnMut(usize) -> Option<Duration>) {
            for i in 0..n {
                self.tick(f(i));
            }
        }

        /// Ticks until the state is `want` (at most `max` ticks); returns how long it took.
        fn until(
            &mut self,
            want: LinkHealth,
            max: usize,
            mut f: impl FnMut(usize) -> Option<Duration>,
        ) -> Option<Duration> {
            let from = self.now;
            for i in 0..max {
                self.tick(f(i));
                if self.t.state() == want {
                    return Some(self.now - from);
                }
            }
            None
        }
    }

    #[test]
    fn defaults_are_valid_and_as_documented() {
        let c = HealthConfig::default();
        c.validate().unwrap();
        assert_eq!(c.probe_interval, 100 * MS);
        assert_eq!(c.probe_timeout, 500 * MS);
        assert_eq!(c.down_after, 600 * MS);
        assert_eq!(c.up_after_replies, 3);
        assert_eq!(c.window, 50);
        assert_eq!(c.degraded_loss, 0.10);
        assert_eq!(c.degraded_rtt, 250 * MS);
        assert_eq!(c.degrade_after, 5);
        assert_eq!(c.recover_after, 20);
    }

    #[test]
    fn validate_rejects_bad_settings() {
        let d = HealthConfig::default();
        let bad = [
            (
                HealthConfig {
                    probe_interval: Duration::ZERO,
                    ..d
                },
                "probe_interval",
            ),
            (
                HealthConfig {
                    probe_timeout: Duration::ZERO,
                    ..d
                },
                "probe_timeout",
            ),
            (
                HealthConfig {
                    down_after: 100 * MS,
                    ..d
                },
                "down_after",
            ),
            (
                HealthConfig {
                    up_after_replies: 0,
                    ..d
                },
                "up_after_replies",
            ),
            (HealthConfig { window: 0, ..d }, "window"),
            (
                HealthConfig {
                    window: MAX_WINDOW + 1,
                    ..d
                },
                "window",
            ),
            (
                HealthConfig {
                    degraded_loss: 0.0,
                    ..d
                },
                "degraded_loss",
            ),
            (
                HealthConfig {
                    degraded_loss: 1.0,
                    ..d
                },
                "degraded_loss",
            ),
            (
                HealthConfig {
                    degraded_loss: f64::NAN,
                    ..d
                },
                "degraded_loss",
            ),
            (
                HealthConfig {
                    degraded_rtt: Duration::ZERO,
                    ..d
                },
                "degraded_rtt",
            ),
            (
                HealthConfig {
                    degrade_after: 0,
                    ..d
                },
                "degrade_after",
            ),
            (
                HealthConfig {
                    recover_after: 0,
                    ..d
                },
                "recover_after",
            ),
        ];
        for (c, field) in bad {
            let e = c.validate().unwrap_err();
            assert!(e.starts_with(field), "{field}: {e}");
        }
        HealthConfig { window: 1, ..d }.validate().unwrap();
    }

    #[test]
    fn probe_wire_format() {
        let b = encode_probe(ProbeKind::Ping, 0x0102_0304_0506_0708);
        assert_eq!(b, [0xA1, 1, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(
            decode_probe(&b).unwrap(),
            (ProbeKind::Ping, 0x0102_0304_0506_0708)
        );
        for seq in [0, 1, u64::MAX] {
            for kind in [ProbeKind::Ping, ProbeKind::Pong, ProbeKind::Leaving] {
                assert_eq!(decode_probe(&encode_probe(kind, seq)).unwrap(), (kind, seq));
            }
        }
        assert_eq!(decode_probe(&b[..9]), Err(ProbeError::Length(9)));
        assert_eq!(decode_probe(&[]), Err(ProbeError::Length(0)));
        let mut long = b.to_vec();
        long.push(0);
        assert_eq!(decode_probe(&long), Err(ProbeError::Length(11)));
        let mut m = b;
        m[0] = 0xA2;
        assert_eq!(decode_probe(&m), Err(ProbeError::Magic(0xA2)));
        for k in [0u8, 4, 255] {
            let mut m = b;
            m[1] = k;
            assert_eq!(decode_probe(&m), Err(ProbeError::Kind(k)));
        }
        assert!(ProbeError::Magic(0xA2).to_string().contains("0xa2"));
    }

    #[test]
    fn starts_down_and_ignores_ticks_while_disconnected() {
        let mut s = Sim::new(HealthConfig::default());
        assert_eq!(s.t.state(), LinkHealth::Down);
        assert!(!s.t.is_connected());
        assert_eq!(s.t.since(), s.start);
        assert_eq!(s.t.on_disconnected(s.now), None);
        // Probes and replies without a connection change nothing.
        s.run(20, |_| Some(MS));
        assert_eq!(s.t.state(), LinkHealth::Down);
        assert!(s.transitions.is_empty());
        assert_eq!(s.t.rtt_ms(), 0.0);
    }

    #[test]
    fn up_after_three_replies_after_connecting() {
        let mut s = Sim::new(HealthConfig::default());
        s.connect();
        assert!(s.t.is_connected());
        assert_eq!(s.t.state(), LinkHealth::Down);
        // Two replies are not enough.
        s.run(3, |_| Some(MS));
        assert_eq!(s.t.state(), LinkHealth::Down);
        let took = s.until(LinkHealth::Up, 20, |_| Some(MS)).unwrap();
        assert!(took <= 200 * MS, "{took:?}");
        assert_eq!(s.transitions.len(), 1);
        let tr = &s.transitions[0];
        assert_eq!((tr.from, tr.to), (LinkHealth::Down, LinkHealth::Up));
        assert_eq!(tr.at, s.now);
        assert_eq!(s.t.since(), s.now);
        assert!(tr.reason.contains("3 consecutive"), "{}", tr.reason);
        assert!((s.t.rtt_ms() - 1.0).abs() < 1e-9);
        assert_eq!(s.t.loss(), 0.0);
    }

    #[test]
    fn down_within_a_second_of_a_blackhole() {
        let mut s = Sim::up();
        s.run(100, |_| Some(MS));
        let cut = s.now;
        let took = s.until(LinkHealth::Down, 100, |_| None).unwrap();
        assert!(took < Duration::from_secs(1), "{took:?}");
        // Not before `down_after` of silence either.
        assert!(took >= 600 * MS, "{took:?}");
        let tr = s.transitions.last().unwrap();
        assert_eq!((tr.from, tr.to), (LinkHealth::Up, LinkHealth::Down));
        assert!(tr.reason.starts_with("no probe reply for"), "{}", tr.reason);
        assert!(s.t.since() - cut < Duration::from_secs(1));
        // Timer jitter does not cost a whole probe interval: a tick a few milliseconds late when
        // the silence began, and one on time 600 ms later, take the link down.
        let mut s2 = Sim::up();
        s2.run(10, |_| Some(MS));
        s2.deliver(s2.now + 50 * MS);
        let from = s2.now + 3 * MS;
        s2.t.next_probe(from);
        let took = s2.until(LinkHealth::Down, 100, |_| None).unwrap();
        assert_eq!(s2.now - from, 597 * MS, "{took:?}");
        // Still connected (the caller decides what to do with the connection), and it stays down.
        assert!(s.t.is_connected());
        s.run(100, |_| None);
        assert_eq!(s.t.state(), LinkHealth::Down);
        assert_eq!(s.transitions.len(), 1);
    }

    #[test]
    fn down_at_once_on_disconnect() {
        let mut s = Sim::up();
        s.run(10, |_| Some(MS));
        s.now += 30 * MS;
        let tr = s.t.on_disconnected(s.now).unwrap();
        assert_eq!(
            (tr.from, tr.to, tr.at),
            (LinkHealth::Up, LinkHealth::Down, s.now)
        );
        assert_eq!(tr.reason, "connection lost");
        assert_eq!(s.t.state(), LinkHealth::Down);
        assert_eq!(s.t.since(), s.now);
        assert!(!s.t.is_connected());
        // Once only; and a degraded link goes down the same way.
        assert_eq!(s.t.on_disconnected(s.now), None);
        let mut s = Sim::up();
        s.until(LinkHealth::Degraded, 100, |_| Some(300 * MS))
            .unwrap();
        let tr = s.t.on_disconnected(s.now).unwrap();
        assert_eq!((tr.from, tr.to), (LinkHealth::Degraded, LinkHealth::Down));
    }

    #[test]
    fn up_again_within_two_seconds_of_a_reconnect() {
        let mut s = Sim::up();
        s.run(50, |_| Some(MS));
        s.t.on_disconnected(s.now).unwrap();
        // Disconnected for a while: replies still in flight from the old connection are ignored.
        s.run(3, |_| None);
        s.tick(None);
        s.connect();
        let took = s.until(LinkHealth::Up, 100, |_| Some(2 * MS)).unwrap();
        assert!(took < Duration::from_secs(2), "{took:?}");
        assert!(took >= 300 * MS, "{took:?}");
        assert_eq!(s.transitions.last().unwrap().from, LinkHealth::Down);
    }

    #[test]
    fn replies_after_a_silence_bring_the_link_back_without_a_reconnect() {
        let mut s = Sim::up();
        s.until(LinkHealth::Down, 20, |_| None).unwrap();
        // Lossy replies do not count as consecutive.
        s.run(40, |i| i.is_multiple_of(2).then_some(MS));
        assert_eq!(s.t.state(), LinkHealth::Down);
        s.run(40, |i| (i % 3 != 2).then_some(MS));
        assert_eq!(s.t.state(), LinkHealth::Down);
        // Three in a row are, even when the next one is lost; the loss seen meanwhile makes it come
        // back degraded rather than up.
        let from = s.now;
        for i in 0..5 {
            s.tick((i % 4 != 3).then_some(MS));
        }
        assert_eq!(s.t.state(), LinkHealth::Degraded);
        assert_eq!(s.t.since() - from, 300 * MS);
        let tr = s.transitions.last().unwrap();
        assert!(tr.reason.contains("loss"), "{}", tr.reason);
        // Degraded as it went down, it comes back degraded, then recovers.
        s.until(LinkHealth::Down, 20, |_| None).unwrap();
        s.until(LinkHealth::Degraded, 10, |_| Some(MS)).unwrap();
        // (The probe sent as it went down was lost: the recovery waits until it weighs < 5 %.)
        let took = s.until(LinkHealth::Up, 100, |_| Some(MS)).unwrap();
        assert!(took < Duration::from_secs(5), "{took:?}");
        s.until(LinkHealth::Down, 20, |_| None).unwrap();
        let took = s.until(LinkHealth::Up, 50, |_| Some(MS)).unwrap();
        assert!(took < Duration::from_secs(2), "{took:?}");
        // The probes lost in the silence do not count against the link afterwards.
        s.run(500, |_| Some(MS));
        assert_eq!(s.t.state(), LinkHealth::Up);
        assert_eq!(s.t.loss(), 0.0);
    }

    #[test]
    fn a_single_lost_probe_never_changes_the_state() {
        // Right after the link comes up, in the middle, and repeatedly but rarely.
        for lost_at in [0usize, 1, 5, 30, 200] {
            let mut s = Sim::up();
            s.run(1_000, |i| (i != lost_at).then_some(MS));
            assert!(
                s.transitions.is_empty(),
                "lost at {lost_at}: {:?}",
                s.transitions
            );
        }
        let mut s = Sim::new(HealthConfig::default());
        s.connect();
        s.run(3, |i| (i != 0).then_some(MS));
        s.run(1_000, |_| Some(MS));
        assert_eq!(s.t.state(), LinkHealth::Up);
        assert_eq!(s.transitions.len(), 1);
        let mut s = Sim::up();
        s.run(5_000, |i| (!i.is_multiple_of(97)).then_some(MS));
        assert!(s.transitions.is_empty(), "{:?}", s.transitions);
    }

    #[test]
    fn five_percent_random_loss_neither_downs_nor_flaps_the_link() {
        for seed in 1..=20 {
            let mut s = Sim::up();
            let mut rng = Rng::new(seed);
            s.run(2_000, |_| (rng.next_f64() >= 0.05).then_some(MS));
            let downs = s
                .transitions
                .iter()
                .filter(|t| t.to == LinkHealth::Down)
                .count();
            assert_eq!(downs, 0, "seed {seed}: {:?}", s.transitions);
            assert!(s.transitions.len() <= 1, "seed {seed}: {:?}", s.transitions);
            assert_ne!(s.t.state(), LinkHealth::Down);
            assert!(s.t.loss() < 0.2, "seed {seed}: {}", s.t.loss());
        }
    }

    #[test]
    fn thirty_percent_loss_degrades_but_does_not_down_the_link() {
        // Evenly spread: 3 of every 10 probes, never more than one in a row.
        let mut s = Sim::up();
        let took = s
            .until(LinkHealth::Degraded, 100, |i| {
                ((i * 7) % 10 >= 3).then_some(MS)
            })
            .unwrap();
        assert!(took < Duration::from_secs(5), "{took:?}");
        s.run(2_000, |i| ((i * 7) % 10 >= 3).then_some(MS));
        assert_eq!(s.t.state(), LinkHealth::Degraded);
        assert_eq!(s.transitions.len(), 1, "{:?}", s.transitions);
        let tr = &s.transitions[0];
        assert!(tr.reason.starts_with("loss "), "{}", tr.reason);
        assert!((s.t.loss() - 0.3).abs() < 0.05, "{}", s.t.loss());

        // Pseudo-random, with the bursts that would take the link down (6 lost in a row, the
        // `down_after` of silence) broken up.
        for seed in 1..=5 {
            let mut s = Sim::up();
            let mut rng = Rng::new(seed);
            let mut run = 0;
            s.run(2_000, |_| {
                let lost = rng.next_f64() < 0.3 && run < 4;
                run = if lost { run + 1 } else { 0 };
                (!lost).then_some(MS)
            });
            assert_eq!(s.t.state(), LinkHealth::Degraded, "seed {seed}");
            assert_eq!(s.transitions.len(), 1, "seed {seed}: {:?}", s.transitions);
        }
    }

    #[test]
    fn slow_replies_degrade_the_link() {
        let mut s = Sim::up();
        let took = s
            .until(LinkHealth::Degraded, 100, |_| Some(300 * MS))
            .unwrap();
        assert!(took < Duration::from_secs(3), "{took:?}");
        s.run(500, |_| Some(300 * MS));
        assert_eq!(s.t.state(), LinkHealth::Degraded);
        assert_eq!(s.transitions.len(), 1);
        assert!((s.t.rtt_ms() - 300.0).abs() < 1.0, "{}", s.t.rtt_ms());
        assert_eq!(s.t.loss(), 0.0);
        assert!(
            s.transitions[0].reason.contains("RTT"),
            "{}",
            s.transitions[0].reason
        );
        // A fast link stays up.
        let mut s = Sim::up();
        s.run(500, |_| Some(20 * MS));
        assert!(s.transitions.is_empty());
        assert!((s.t.rtt_ms() - 20.0).abs() < 0.01);
    }

    #[test]
    fn a_slow_link_comes_back_degraded_not_up() {
        let mut s = Sim::new(HealthConfig::default());
        s.connect();
        s.until(LinkHealth::Degraded, 20, |_| Some(300 * MS))
            .unwrap();
        assert_eq!(s.transitions.len(), 1);
        assert_eq!(s.transitions[0].from, LinkHealth::Down);
    }

    #[test]
    fn recovery_from_loss_takes_hysteresis() {
        let mut s = Sim::up();
        s.until(LinkHealth::Degraded, 200, |i| {
            (!i.is_multiple_of(3)).then_some(MS)
        })
        .unwrap();
        s.run(300, |i| (!i.is_multiple_of(3)).then_some(MS));
        // Healed: the window must clear and then stay clean for `recover_after` evaluations.
        let took = s.until(LinkHealth::Up, 500, |_| Some(MS)).unwrap();
        assert!(took >= 20 * 100 * MS, "{took:?}");
        assert!(took < Duration::from_secs(15), "{took:?}");
        let tr = s.transitions.last().unwrap();
        assert_eq!((tr.from, tr.to), (LinkHealth::Degraded, LinkHealth::Up));
        assert_eq!(s.t.since(), s.now);
        // Exactly `recover_after` consecutive good evaluations, counted from the first one.
        let lossy = |i: usize| (!i.is_multiple_of(3)).then_some(MS);
        let mut s = Sim::up();
        s.until(LinkHealth::Degraded, 200, lossy).unwrap();
        s.run(300, lossy);
        let mut ticks = 0;
        while !(s.t.loss_good() && s.t.rtt_good()) {
            s.tick(Some(MS));
            ticks += 1;
            assert!(ticks < 1_000);
        }
        for _ in 1..19 {
            assert_eq!(s.tick(Some(MS)), None);
        }
        assert_eq!(s.t.state(), LinkHealth::Degraded);
        assert_eq!(s.tick(Some(MS)).map(|t| t.to), Some(LinkHealth::Up));
        // Good spells too short to clear the window and then hold for `recover_after`
        // evaluations keep a lossy link degraded.
        let mut s = Sim::up();
        s.until(LinkHealth::Degraded, 200, lossy).unwrap();
        s.run(300, lossy);
        for _ in 0..20 {
            s.run(60, |_| Some(MS));
            s.run(30, lossy);
        }
        assert_eq!(s.t.state(), LinkHealth::Degraded);
        assert_eq!(s.transitions.len(), 1, "{:?}", s.transitions);
    }

    #[test]
    fn a_lossy_link_that_drops_out_comes_back_degraded() {
        let lossy = |i: usize| ((i * 7) % 10 >= 3).then_some(MS);
        let mut s = Sim::up();
        s.until(LinkHealth::Degraded, 200, lossy).unwrap();
        s.until(LinkHealth::Down, 20, |_| None).unwrap();
        s.until(LinkHealth::Degraded, 20, |_| Some(MS)).unwrap();
        let tr = s.transitions.last().unwrap();
        assert_eq!(tr.from, LinkHealth::Down);
        assert!(tr.reason.contains("was degraded"), "{}", tr.reason);
        // Healthy now: up after the usual recovery.
        let took = s.until(LinkHealth::Up, 100, |_| Some(MS)).unwrap();
        assert!(took >= 20 * 100 * MS, "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        // The same across a reconnect; an up link that drops out comes back up.
        s.until(LinkHealth::Degraded, 200, lossy).unwrap();
        s.t.on_disconnected(s.now).unwrap();
        s.connect();
        s.until(LinkHealth::Degraded, 20, |_| Some(MS)).unwrap();
        s.until(LinkHealth::Up, 100, |_| Some(MS)).unwrap();
        s.t.on_disconnected(s.now).unwrap();
        s.connect();
        s.until(LinkHealth::Up, 20, |_| Some(MS)).unwrap();
    }

    #[test]
    fn recovery_from_rtt_takes_hysteresis() {
        let mut s = Sim::up();
        s.until(LinkHealth::Degraded, 100, |_| Some(300 * MS))
            .unwrap();
        // Better, but not below 0.8 × degraded_rtt: stays degraded.
        s.run(1_000, |_| Some(220 * MS));
        assert_eq!(s.t.state(), LinkHealth::Degraded);
        // RTT hovering around the threshold does not flap an up link either.
        let took = s.until(LinkHealth::Up, 200, |_| Some(10 * MS)).unwrap();
        assert!(took >= 20 * 100 * MS, "{took:?}");
        assert!(took < Duration::from_secs(6), "{took:?}");
        // A relapse before `recover_after` good evaluations starts the count again.
        s.until(LinkHealth::Degraded, 100, |_| Some(300 * MS))
            .unwrap();
        while !s.t.rtt_good() {
            s.tick(Some(190 * MS));
        }
        // Slow replies (450 ms) arrive from the fifth tick on: the RTT is bad again.
        s.run(6, |_| Some(450 * MS));
        assert!(!s.t.rtt_good(), "{}", s.t.rtt_ms());
        assert_eq!(s.t.state(), LinkHealth::Degraded);
        let took = s.until(LinkHealth::Up, 200, |_| Some(10 * MS)).unwrap();
        assert!(took >= 20 * 100 * MS, "{took:?}");
        s.transitions.clear();
        s.run(2_000, |i| {
            Some(if i.is_multiple_of(2) {
                240 * MS
            } else {
                200 * MS
            })
        });
        assert!(s.transitions.is_empty(), "{:?}", s.transitions);
    }

    #[test]
    fn srtt_is_smoothed_with_one_eighth() {
        let mut s = Sim::new(HealthConfig::default());
        s.connect();
        // Each reply arrives before the next tick.
        s.tick(Some(100 * MS));
        s.tick(Some(20 * MS));
        assert!((s.t.rtt_ms() - 100.0).abs() < 1e-9, "{}", s.t.rtt_ms());
        s.tick(None);
        assert!((s.t.rtt_ms() - 90.0).abs() < 1e-9, "{}", s.t.rtt_ms());
        // After a reconnect, the first sample starts afresh.
        s.t.on_disconnected(s.now);
        s.connect();
        s.tick(Some(40 * MS));
        s.tick(None);
        assert!((s.t.rtt_ms() - 40.0).abs() < 1e-9, "{}", s.t.rtt_ms());
    }

    #[test]
    fn late_duplicate_and_unknown_replies_are_ignored() {
        let mut s = Sim::new(HealthConfig::default());
        s.connect();
        // One probe answered three times: one reply.
        let now = s.now;
        assert_eq!(s.t.evaluate(now), None);
        let seq = s.t.next_probe(now);
        for k in 1..=3 {
            s.t.on_reply(seq, now + k * MS);
        }
        // Replies to probes never sent.
        s.t.on_reply(seq + 1, now + 4 * MS);
        s.t.on_reply(seq + 1000, now + 4 * MS);
        s.t.on_reply(0, now + 4 * MS);
        s.t.on_reply(u64::MAX, now + 4 * MS);
        s.now += 100 * MS;
        assert_eq!(s.t.evaluate(s.now), None);
        assert_eq!(s.t.state(), LinkHealth::Down);
        assert!((s.t.rtt_ms() - 1.0).abs() < 1e-9);

        // A late reply (after probe_timeout) neither measures RTT nor counts as a reply.
        let mut s = Sim::up();
        s.run(100, |_| Some(MS));
        s.run(100, |i| {
            Some(if i.is_multiple_of(10) { 700 * MS } else { MS })
        });
        assert!((s.t.rtt_ms() - 1.0).abs() < 1e-6, "{}", s.t.rtt_ms());
        assert!((s.t.loss() - 0.1).abs() < 0.03, "{}", s.t.loss());

        // Replies from before a reconnect are ignored.
        let mut s = Sim::up();
        s.run(5, |_| Some(MS));
        let old = s.t.next_probe(s.now);
        s.t.on_disconnected(s.now).unwrap();
        s.connect();
        s.t.on_reply(old, s.now + MS);
        s.t.on_reply(old - 1, s.now + MS);
        s.t.on_reply(old - 2, s.now + MS);
        s.run(2, |_| None);
        assert_eq!(s.t.state(), LinkHealth::Down);
    }

    #[test]
    fn memory_is_bounded() {
        let c = HealthConfig::default();
        let mut s = Sim::up();
        s.run(10_000, |i| (!i.is_multiple_of(4)).then_some(MS));
        assert!(s.t.probes.len() <= c.window + 10, "{}", s.t.probes.len());
        assert_eq!(s.t.finalized, c.window);
        // A caller that sends probes without ever evaluating.
        let mut t = LinkTracker::new(c, s.now);
        t.on_connected(s.now);
        let mut now = s.now;
        for _ in 0..100_000 {
            now += MS;
            t.next_probe(now);
            assert!(t.probes.len() <= c.window + t.in_flight_cap);
        }
        assert!(t.in_flight_cap <= MAX_IN_FLIGHT);
        // Even without time passing.
        for _ in 0..100_000 {
            t.next_probe(now);
        }
        assert!(t.probes.len() <= c.window + t.in_flight_cap);
        // Answers to the survivors still work.
        let last = t.next_probe(now);
        t.on_reply(last, now + MS);
        assert!((t.rtt_ms() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn loss_counts_only_probes_older_than_the_timeout() {
        let mut s = Sim::up();
        s.run(100, |_| Some(MS));
        // Four probes in flight and unanswered: not (yet) lost.
        s.run(4, |_| None);
        assert_eq!(s.t.loss(), 0.0);
        s.run(3, |_| Some(MS));
        assert!(s.t.loss() > 0.0);
        assert_eq!(s.t.state(), LinkHealth::Up);
    }

    #[test]
    fn instants_out_of_order_do_not_panic() {
        let mut s = Sim::up();
        let now = s.now;
        let earlier = now - Duration::from_secs(1);
        let seq = s.t.next_probe(now);
        s.t.on_reply(seq, earlier);
        s.t.next_probe(earlier);
        s.t.evaluate(earlier);
        s.t.on_disconnected(earlier);
        s.t.on_connected(earlier);
        s.t.evaluate(now);
        assert!(s.t.rtt_ms() >= 0.0);
    }

    #[test]
    fn a_replacing_connection_keeps_the_state() {
        let mut s = Sim::up();
        s.run(100, |_| Some(MS));
        // Probes in flight on the old connection are never answered.
        s.run(3, |_| None);
        s.connect();
        s.run(1_000, |_| Some(MS));
        assert!(s.transitions.is_empty(), "{:?}", s.transitions);
        assert_eq!(s.t.loss(), 0.0);
    }

    #[test]
    fn invalid_configs_do_not_panic() {
        let now = Instant::now();
        for c in [
            HealthConfig {
                window: 0,
                probe_interval: Duration::ZERO,
                probe_timeout: Duration::ZERO,
                degraded_loss: f64::NAN,
                ..HealthConfig::default()
            },
            HealthConfig {
                window: usize::MAX,
                probe_timeout: Duration::MAX,
                down_after: Duration::MAX,
                degraded_rtt: Duration::MAX,
                up_after_replies: 0,
                degrade_after: 0,
                recover_after: 0,
                ..HealthConfig::default()
            },
        ] {
            let mut t = LinkTracker::new(c, now);
            t.on_connected(now);
            let mut at = now;
            for i in 0..200u64 {
                at += 10 * MS;
                let _ = t.evaluate(at);
                let seq = t.next_probe(at);
                if !i.is_multiple_of(3) {
                    t.on_reply(seq, at + MS);
                }
            }
            assert!((0.0..=1.0).contains(&t.loss()));
        }
    }
}
