//! Load balancing with Envoy's semantics, as pure logic over a cluster's assignment and each
//! host's runtime state (active requests, outlier ejection).
//!
//! 1. **Priority load** ([`priority_load`]): each level's health score is its healthy share
//!    times the overprovisioning factor, capped at 100; levels take traffic in order, each up to
//!    its score; when the scores sum to less than 100 the loads are normalised by that sum;
//!    healthy hosts are used first, then degraded ones; a level whose available hosts fall
//!    below the panic threshold (50 %) while the whole set is short ignores health.
//! 2. **Locality**: within a level, a locality is chosen by its weight times its own health
//!    score (overprovisioned, capped at 1).
//! 3. **Host**: round robin over the locality's available hosts (weights honoured), or the less
//!    loaded of N random choices (least request).
//! 4. **Outlier detection**: consecutive 5xx and consecutive gateway failures eject a host for
//!    `base_ejection_time × times ejected`, never more than `max_ejection_percent` of the hosts
//!    (at least one may always be ejected).
//! 5. **Retries** may exclude the hosts and priorities already tried: loads are recomputed as if
//!    the excluded levels had no healthy host (Envoy's `previous_priorities`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use crate::config::{
    Assignment, ClusterConfig, EndpointHealth, LbPolicy, OutlierDetection, Upstream,
};

/// Envoy's default panic threshold, in percent.
const PANIC_THRESHOLD: u64 = 50;

/// One level's weights by availability.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LevelWeights {
    pub healthy: u64,
    pub degraded: u64,
    pub total: u64,
}

/// The share of traffic (percent) each level gets for healthy and for degraded hosts, and
/// which levels are in panic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriorityLoad {
    pub healthy: Vec<u32>,
    pub degraded: Vec<u32>,
    pub panic: Vec<bool>,
}

/// Envoy's priority load for `levels` with `overprovisioning` percent (140 = 1.4).
pub fn priority_load(levels: &[LevelWeights], overprovisioning: u32) -> PriorityLoad {
    let n = levels.len();
    let score = |w: u64, total: u64| -> u64 {
        (u64::from(overprovisioning) * w)
            .checked_div(total)
            .unwrap_or(0)
            .min(100)
    };
    let health: Vec<u64> = levels.iter().map(|l| score(l.healthy, l.total)).collect();
    let degraded: Vec<u64> = levels.iter().map(|l| score(l.degraded, l.total)).collect();
    let total_availability = (health.iter().sum::<u64>() + degraded.iter().sum::<u64>()).min(100);
    let mut load = PriorityLoad {
        healthy: vec![0; n],
        degraded: vec![0; n],
        panic: vec![false; n],
    };
    if n == 0 {
        return load;
    }
    if total_availability == 0 {
        // Nothing available anywhere: everything to the first level, in panic.
        load.healthy[0] = 100;
        load.panic[0] = true;
        return load;
    }
    let mut remaining = 100u64;
    for (slot, h) in load.healthy.iter_mut().zip(&health) {
        let l = (h * 100 / total_availability).min(remaining);
        *slot = l as u32;
        remaining -= l;
    }
    for (slot, d) in load.degraded.iter_mut().zip(&degraded) {
        let l = (d * 100 / total_availability).min(remaining);
        *slot = l as u32;
        remaining -= l;
    }
    if remaining > 0 {
        // Rounding: the rest to the first level that has anything available.
        if let Some(i) = (0..n).find(|i| health[*i] > 0) {
            load.healthy[i] += remaining as u32;
        } else if let Some(i) = (0..n).find(|i| degraded[*i] > 0) {
            load.degraded[i] += remaining as u32;
        }
    }
    if total_availability < 100 {
        for (i, l) in levels.iter().enumerate() {
            let available = l.healthy + l.degraded;
            load.panic[i] = l.total > 0 && available * 100 < PANIC_THRESHOLD * l.total;
        }
    }
    load
}

/// A host's runtime state; shared across config updates for the same upstream.
#[derive(Debug, Default)]
pub struct HostState {
    pub active: AtomicU64,
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    times_ejected: AtomicU32,
    ejected_until: Mutex<Option<Instant>>,
}

impl HostState {
    pub fn ejected(&self, now: Instant) -> bool {
        self.ejected_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| now < t)
    }

    /// Count one more request or connection on the host (least request reads it) while the
    /// guard lives.
    pub fn active_guard(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Relaxed);
        ActiveGuard(self.clone())
    }
}

/// One request or connection on a host, counted while it lives.
#[derive(Debug)]
pub struct ActiveGuard(Arc<HostState>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
    }
}

#[derive(Debug)]
pub struct Host {
    pub upstream: Upstream,
    /// The cluster's transport-socket match this endpoint falls under (index into
    /// `ClusterConfig::tls_matches`); `None`: the cluster's default (plaintext, or the tunnel).
    pub socket: Option<usize>,
    pub health: EndpointHealth,
    pub weight: u32,
    pub priority: usize,
    pub locality: usize,
    pub state: Arc<HostState>,
}

#[derive(Debug)]
struct Locality {
    weight: u32,
    hosts: Vec<Arc<Host>>,
    rr: AtomicUsize,
}

/// What a request's outcome says about its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// 500, 501, 505, … (not a gateway error).
    ServerError,
    /// 502, 503, 504, a connect failure or a reset.
    GatewayError,
}

/// A cluster's balancer for one assignment.
#[derive(Debug)]
pub struct Balancer {
    policy: LbPolicy,
    outlier: Option<OutlierDetection>,
    overprovisioning: u32,
    levels: Vec<Vec<Locality>>,
    hosts: Vec<Arc<Host>>,
}

/// Random numbers for selection (injectable for tests).
pub trait Random {
    /// A number in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64;
}

/// `rand`'s thread-local generator.
pub struct ThreadRandom;

impl Random for ThreadRandom {
    fn below(&mut self, n: u64) -> u64 {
        use rand::RngExt;
        rand::rng().random_range(0..n.max(1))
    }
}

impl Balancer {
    /// Build from an assignment, keeping the runtime state of hosts that `previous` had.
    pub fn new(cluster: &ClusterConfig, a: &Assignment, previous: Option<&Balancer>) -> Self {
        let old: HashMap<&Upstream, &Arc<HostState>> = previous
            .map(|p| p.hosts.iter().map(|h| (&h.upstream, &h.state)).collect())
            .unwrap_or_default();
        let mut hosts = Vec::new();
        let levels = a
            .priorities
            .iter()
            .enumerate()
            .map(|(p, level)| {
                level
                    .iter()
                    .enumerate()
                    .map(|(li, l)| Locality {
                        weight: l.weight,
                        rr: AtomicUsize::new(0),
                        hosts: l
                            .endpoints
                            .iter()
                            .map(|e| {
                                let socket = match e.upstream {
                                    // The remote gateway reaches the endpoint itself.
                                    Upstream::Tunnel { .. } => None,
                                    Upstream::Direct(_) => cluster
                                        .tls_matches
                                        .iter()
                                        .position(|m| m.matches(&e.socket_match)),
                                };
                                let h = Arc::new(Host {
                                    upstream: e.upstream.clone(),
                                    socket,
                                    health: e.health,
                                    weight: e.weight,
                                    priority: p,
                                    locality: li,
                                    state: old
                                        .get(&e.upstream)
                                        .map_or_else(Default::default, |s| Arc::clone(s)),
                                });
                                hosts.push(h.clone());
                                h
                            })
                            .collect(),
                    })
                    .collect()
            })
            .collect();
        Self {
            policy: cluster.lb,
            outlier: cluster.outlier.clone(),
            overprovisioning: a.overprovisioning,
            levels,
            hosts,
        }
    }

    pub fn hosts(&self) -> &[Arc<Host>] {
        &self.hosts
    }

    /// A host's health with outlier ejection applied.
    fn availability(&self, h: &Host, now: Instant) -> EndpointHealth {
        if h.state.ejected(now) {
            EndpointHealth::Unhealthy
        } else {
            h.health
        }
    }

    /// Level weights as seen now, with `excluded` levels counted as having nothing available.
    pub fn level_weights(&self, now: Instant, excluded: &[usize]) -> Vec<LevelWeights> {
        self.levels
            .iter()
            .enumerate()
            .map(|(p, level)| {
                let mut w = LevelWeights::default();
                for h in level.iter().flat_map(|l| &l.hosts) {
                    let weight = u64::from(h.weight);
                    w.total += weight;
                    if excluded.contains(&p) {
                        continue;
                    }
                    match self.availability(h, now) {
                        EndpointHealth::Healthy => w.healthy += weight,
                        EndpointHealth::Degraded => w.degraded += weight,
                        EndpointHealth::Unhealthy => {}
                    }
                }
                w
            })
            .collect()
    }

    /// Pick a host, avoiding `excluded_priorities` (retries to another priority) and, when
    /// another choice exists, `excluded_hosts`.
    pub fn pick(
        &self,
        rng: &mut dyn Random,
        now: Instant,
        excluded_priorities: &[usize],
        excluded_hosts: &[Arc<Host>],
    ) -> Option<Arc<Host>> {
        if self.levels.is_empty() {
            return None;
        }
        let mut excluded_priorities = excluded_priorities.to_vec();
        let mut weights = self.level_weights(now, &excluded_priorities);
        if weights.iter().all(|w| w.healthy + w.degraded == 0) && !excluded_priorities.is_empty() {
            // Every other level is down too: the excluded ones are better than nothing.
            excluded_priorities.clear();
            weights = self.level_weights(now, &[]);
        }
        let load = priority_load(&weights, self.overprovisioning);
        let r = rng.below(100) as u32;
        let mut acc = 0u32;
        let mut chosen: Option<(usize, bool)> = None;
        'outer: for (kind, loads) in [(true, &load.healthy), (false, &load.degraded)] {
            for (p, l) in loads.iter().enumerate() {
                acc += l;
                if r < acc {
                    chosen = Some((p, kind));
                    break 'outer;
                }
            }
        }
        let (p, healthy) = chosen.unwrap_or((0, true));
        let panic = load.panic.get(p).copied().unwrap_or(false);
        let level = &self.levels[p];
        let want = |h: &Host| {
            if panic {
                return true;
            }
            match self.availability(h, now) {
                EndpointHealth::Healthy => healthy,
                EndpointHealth::Degraded => !healthy,
                EndpointHealth::Unhealthy => false,
            }
        };
        // Locality: weight × its own (overprovisioned) availability.
        let lw: Vec<u64> = level
            .iter()
            .map(|l| {
                let total: u64 = l.hosts.iter().map(|h| u64::from(h.weight)).sum();
                let avail: u64 = l
                    .hosts
                    .iter()
                    .filter(|h| want(h))
                    .map(|h| u64::from(h.weight))
                    .sum();
                if total == 0 || avail == 0 {
                    return 0;
                }
                let score = (u64::from(self.overprovisioning) * avail / total).min(100);
                u64::from(l.weight) * score
            })
            .collect();
        let sum: u64 = lw.iter().sum();
        let li = if sum == 0 {
            // Panic with no weights: any locality with hosts.
            level.iter().position(|l| !l.hosts.is_empty())?
        } else {
            let mut x = rng.below(sum);
            lw.iter()
                .position(|w| {
                    if x < *w {
                        true
                    } else {
                        x -= w;
                        false
                    }
                })
                .unwrap_or(0)
        };
        let loc = &level[li];
        let candidates: Vec<&Arc<Host>> = loc.hosts.iter().filter(|h| want(h)).collect();
        let fresh: Vec<&Arc<Host>> = candidates
            .iter()
            .copied()
            .filter(|h| !excluded_hosts.iter().any(|e| Arc::ptr_eq(e, h)))
            .collect();
        let pool = if fresh.is_empty() { candidates } else { fresh };
        if pool.is_empty() {
            return None;
        }
        let host = match self.policy {
            LbPolicy::RoundRobin => {
                // Weighted round robin: each host appears `weight` times in the cycle.
                let total: u64 = pool.iter().map(|h| u64::from(h.weight)).sum();
                let mut x = (loc.rr.fetch_add(1, Relaxed) as u64) % total.max(1);
                pool.iter()
                    .find(|h| {
                        let w = u64::from(h.weight);
                        if x < w {
                            true
                        } else {
                            x -= w;
                            false
                        }
                    })
                    .copied()
                    .unwrap_or(pool[0])
            }
            LbPolicy::LeastRequest { choices } => {
                let mut best = pool[rng.below(pool.len() as u64) as usize];
                for _ in 1..choices {
                    let c = pool[rng.below(pool.len() as u64) as usize];
                    if c.state.active.load(Relaxed) < best.state.active.load(Relaxed) {
                        best = c;
                    }
                }
                best
            }
        };
        Some(host.clone())
    }

    /// Record a request's outcome on its host; returns true if this ejected the host.
    pub fn report(&self, host: &Host, outcome: Outcome, now: Instant) -> bool {
        let Some(od) = &self.outlier else {
            return false;
        };
        let s = &host.state;
        let (c5, cg) = match outcome {
            Outcome::Success => {
                s.consecutive_5xx.store(0, Relaxed);
                s.consecutive_gateway.store(0, Relaxed);
                return false;
            }
            Outcome::ServerError => {
                s.consecutive_gateway.store(0, Relaxed);
                (s.consecutive_5xx.fetch_add(1, Relaxed) + 1, 0)
            }
            Outcome::GatewayError => (
                s.consecutive_5xx.fetch_add(1, Relaxed) + 1,
                s.consecutive_gateway.fetch_add(1, Relaxed) + 1,
            ),
        };
        let trip = (od.consecutive_5xx > 0 && c5 >= od.consecutive_5xx)
            || (od.consecutive_gateway_failure > 0 && cg >= od.consecutive_gateway_failure);
        if !trip || s.ejected(now) {
            return false;
        }
        let ejected = self.hosts.iter().filter(|h| h.state.ejected(now)).count();
        let total = self.hosts.len();
        // Never beyond max_ejection_percent, but one host may always go.
        if ejected > 0 && (ejected + 1) * 100 > od.max_ejection_percent as usize * total {
            return false;
        }
        let times = s.times_ejected.fetch_add(1, Relaxed) + 1;
        // Envoy caps the ejection time at max_ejection_time (default 300 s).
        let span = od
            .base_ejection_time
            .saturating_mul(times)
            .min(Duration::from_secs(300).max(od.base_ejection_time));
        *s.ejected_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(now + span);
        s.consecutive_5xx.store(0, Relaxed);
        s.consecutive_gateway.store(0, Relaxed);
        true
    }
}

/// The hosts and priorities one request (or connection) has tried, for retries that move on.
#[derive(Default)]
pub struct Tried {
    hosts: Vec<Arc<Host>>,
    priorities: Vec<usize>,
}

impl Tried {
    /// The next host from `balancer`, avoiding the priorities and the hosts tried so far where
    /// asked; it counts as tried from now on.
    pub fn next(
        &mut self,
        balancer: &Balancer,
        rng: &mut dyn Random,
        now: Instant,
        other_priority: bool,
        other_host: bool,
    ) -> Option<Arc<Host>> {
        let avoid_p: &[usize] = if other_priority {
            &self.priorities
        } else {
            &[]
        };
        let avoid_h: &[Arc<Host>] = if other_host { &self.hosts } else { &[] };
        let host = balancer.pick(rng, now, avoid_p, avoid_h)?;
        self.hosts.push(host.clone());
        if !self.priorities.contains(&host.priority) {
            self.priorities.push(host.priority);
        }
        Some(host)
    }
}
