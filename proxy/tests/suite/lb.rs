//! Envoy's load-balancing semantics: the documented priority-load table, spill-over measured
//! over many picks, retries to another priority, locality weights, weighted round robin, least
//! request, and outlier ejection (thresholds, max percent, back-off, state kept across updates).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use proxy::config::{
    Assignment, ClusterConfig, EndpointConfig, EndpointHealth, LbPolicy, LocalityConfig,
    OutlierDetection, Thresholds, Upstream,
};
use proxy::lb::{Balancer, LevelWeights, Outcome, Random, priority_load};

/// A deterministic generator (64-bit LCG), so statistical bounds never flake.
struct Lcg(u64);

impl Random for Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n.max(1)
    }
}

fn cluster(lb: LbPolicy, outlier: Option<OutlierDetection>) -> ClusterConfig {
    ClusterConfig {
        name: "c".into(),
        connect_timeout: Duration::from_secs(1),
        lb,
        http2: false,
        tunnel: false,
        outlier,
        thresholds: Thresholds::default(),
        tls_matches: Vec::new(),
    }
}

fn ep(i: u32, health: EndpointHealth, weight: u32) -> EndpointConfig {
    EndpointConfig {
        upstream: Upstream::Direct(format!("10.0.{}.{}:80", i / 250, i % 250).parse().unwrap()),
        health,
        weight,
        socket_match: Vec::new(),
    }
}

fn locality(zone: &str, weight: u32, endpoints: Vec<EndpointConfig>) -> LocalityConfig {
    LocalityConfig {
        region: "r".into(),
        zone: zone.into(),
        subzone: String::new(),
        weight,
        endpoints,
    }
}

/// P0 with `n0` hosts of which `healthy0` healthy; P1 with 10 healthy hosts.
fn two_levels(n0: u32, healthy0: u32) -> Assignment {
    let p0 = (0..n0)
        .map(|i| {
            let h = if i < healthy0 {
                EndpointHealth::Healthy
            } else {
                EndpointHealth::Unhealthy
            };
            ep(i, h, 1)
        })
        .collect();
    let p1 = (100..110)
        .map(|i| ep(i, EndpointHealth::Healthy, 1))
        .collect();
    Assignment {
        cluster: "c".into(),
        priorities: vec![vec![locality("a", 1, p0)], vec![locality("b", 1, p1)]],
        overprovisioning: 140,
    }
}

#[test]
fn priority_load_follows_envoys_table() {
    // Envoy's documented table (P1 100 % healthy, overprovisioning 1.4).
    for (healthy0, p0, p1) in [
        (100, 100, 0),
        (72, 100, 0),
        (71, 99, 1),
        (50, 70, 30),
        (25, 35, 65),
        (0, 0, 100),
    ] {
        let l = priority_load(
            &[
                LevelWeights {
                    healthy: healthy0,
                    degraded: 0,
                    total: 100,
                },
                LevelWeights {
                    healthy: 100,
                    degraded: 0,
                    total: 100,
                },
            ],
            140,
        );
        assert_eq!(
            (l.healthy[0], l.healthy[1]),
            (p0, p1),
            "P0 {healthy0} % healthy"
        );
        assert_eq!(l.panic, vec![false, false]);
    }
    // Both levels short: normalised by the total health (28 + 28 = 56 → 50/50), both in panic.
    let l = priority_load(
        &[
            LevelWeights {
                healthy: 20,
                degraded: 0,
                total: 100,
            },
            LevelWeights {
                healthy: 20,
                degraded: 0,
                total: 100,
            },
        ],
        140,
    );
    assert_eq!(l.healthy, vec![50, 50]);
    assert_eq!(l.panic, vec![true, true]);
    // Degraded hosts take what the healthy ones cannot.
    let l = priority_load(
        &[LevelWeights {
            healthy: 50,
            degraded: 50,
            total: 100,
        }],
        140,
    );
    assert_eq!((l.healthy[0], l.degraded[0]), (70, 30));
    // Nothing available: all to P0, in panic.
    let l = priority_load(
        &[LevelWeights {
            healthy: 0,
            degraded: 0,
            total: 3,
        }],
        140,
    );
    assert_eq!((l.healthy, l.panic), (vec![100], vec![true]));
}

#[test]
fn half_healthy_priority_zero_spills_seventy_thirty() {
    let b = Balancer::new(
        &cluster(LbPolicy::RoundRobin, None),
        &two_levels(10, 5),
        None,
    );
    let mut rng = Lcg(7);
    let now = Instant::now();
    let n = 20_000;
    let mut p0 = 0;
    for _ in 0..n {
        let h = b.pick(&mut rng, now, &[], &[]).expect("a host");
        assert_eq!(h.health, EndpointHealth::Healthy, "never an unhealthy host");
        if h.priority == 0 {
            p0 += 1;
        }
    }
    let share = f64::from(p0) / f64::from(n);
    assert!((0.68..0.72).contains(&share), "P0 share {share}, want 0.70");
}

#[test]
fn a_retry_moves_to_another_priority() {
    let b = Balancer::new(
        &cluster(LbPolicy::RoundRobin, None),
        &two_levels(4, 4),
        None,
    );
    let mut rng = Lcg(1);
    let now = Instant::now();
    for _ in 0..100 {
        let first = b.pick(&mut rng, now, &[], &[]).unwrap();
        assert_eq!(first.priority, 0);
        let retry = b
            .pick(
                &mut rng,
                now,
                &[first.priority],
                std::slice::from_ref(&first),
            )
            .unwrap();
        assert_eq!(retry.priority, 1, "previous_priorities");
    }
    // With only one level, a retry stays there but avoids the host already tried.
    let one = Assignment {
        cluster: "c".into(),
        priorities: vec![vec![locality(
            "a",
            1,
            vec![
                ep(1, EndpointHealth::Healthy, 1),
                ep(2, EndpointHealth::Healthy, 1),
            ],
        )]],
        overprovisioning: 140,
    };
    let b = Balancer::new(&cluster(LbPolicy::RoundRobin, None), &one, None);
    for _ in 0..50 {
        let first = b.pick(&mut rng, now, &[], &[]).unwrap();
        let retry = b
            .pick(&mut rng, now, &[0], std::slice::from_ref(&first))
            .unwrap();
        assert!(!Arc::ptr_eq(&first, &retry), "previous_hosts");
    }
}

#[test]
fn localities_by_weight_and_hosts_by_weighted_round_robin() {
    let a = Assignment {
        cluster: "c".into(),
        priorities: vec![vec![
            locality("a", 1, vec![ep(1, EndpointHealth::Healthy, 1)]),
            locality(
                "b",
                3,
                vec![
                    ep(2, EndpointHealth::Healthy, 1),
                    ep(3, EndpointHealth::Healthy, 3),
                ],
            ),
        ]],
        overprovisioning: 140,
    };
    let b = Balancer::new(&cluster(LbPolicy::RoundRobin, None), &a, None);
    let mut rng = Lcg(3);
    let now = Instant::now();
    let mut counts = [0u32; 4];
    for _ in 0..40_000 {
        let h = b.pick(&mut rng, now, &[], &[]).unwrap();
        let Upstream::Direct(addr) = h.upstream else {
            panic!()
        };
        counts[usize::from(addr.ip().to_string().ends_with(".3")) * 2
            + usize::from(addr.ip().to_string().ends_with(".2"))] += 1;
    }
    // Locality a: 1/4 of the traffic; in b, host .3 gets 3× host .2.
    let a_share = f64::from(counts[0]) / 40_000.0;
    assert!((0.23..0.27).contains(&a_share), "locality a {a_share}");
    let ratio = f64::from(counts[2]) / f64::from(counts[1]);
    assert!((2.8..3.2).contains(&ratio), "weights 3:1 gave {ratio}");
}

#[test]
fn least_request_prefers_the_idle_host() {
    let a = Assignment {
        cluster: "c".into(),
        priorities: vec![vec![locality(
            "a",
            1,
            vec![
                ep(1, EndpointHealth::Healthy, 1),
                ep(2, EndpointHealth::Healthy, 1),
            ],
        )]],
        overprovisioning: 140,
    };
    let b = Balancer::new(
        &cluster(LbPolicy::LeastRequest { choices: 2 }, None),
        &a,
        None,
    );
    b.hosts()[0].state.active.store(10, Relaxed);
    let mut rng = Lcg(5);
    let now = Instant::now();
    let idle = (0..1000)
        .filter(|_| Arc::ptr_eq(&b.pick(&mut rng, now, &[], &[]).unwrap(), &b.hosts()[1]))
        .count();
    // Two choices: the busy host wins only when both choices are it (≈ 1/4).
    assert!(idle > 700, "the idle host got {idle} of 1000");
}

#[test]
fn outlier_detection_ejects_backs_off_and_survives_updates() {
    let od = OutlierDetection {
        consecutive_5xx: 5,
        consecutive_gateway_failure: 3,
        interval: Duration::from_secs(1),
        base_ejection_time: Duration::from_secs(5),
        max_ejection_percent: 50,
    };
    let a = two_levels(4, 4);
    let c = cluster(LbPolicy::RoundRobin, Some(od));
    let b = Balancer::new(&c, &a, None);
    let now = Instant::now();
    let h0 = b.hosts()[0].clone();
    // Four 5xx, a success (resets), four more: not ejected; the fifth in a row ejects.
    for _ in 0..4 {
        assert!(!b.report(&h0, Outcome::ServerError, now));
    }
    b.report(&h0, Outcome::Success, now);
    for _ in 0..4 {
        assert!(!b.report(&h0, Outcome::ServerError, now));
    }
    assert!(
        b.report(&h0, Outcome::ServerError, now),
        "5 consecutive 5xx eject"
    );
    assert!(h0.state.ejected(now));
    let mut rng = Lcg(9);
    for _ in 0..200 {
        assert!(!Arc::ptr_eq(&b.pick(&mut rng, now, &[], &[]).unwrap(), &h0));
    }
    // Gateway failures: 3 in a row.
    let h1 = b.hosts()[1].clone();
    for i in 0..3 {
        let ejected = b.report(&h1, Outcome::GatewayError, now);
        assert_eq!(ejected, i == 2);
    }
    // max_ejection_percent 50 of 14 hosts: 7 at most.
    let mut n = 2;
    for h in &b.hosts()[2..] {
        for _ in 0..3 {
            if b.report(h, Outcome::GatewayError, now) {
                n += 1;
            }
        }
    }
    assert_eq!(n, 7, "never more than 50 % ejected");
    // The state survives a config update of the same hosts.
    let b2 = Balancer::new(&c, &a, Some(&b));
    assert!(b2.hosts()[0].state.ejected(now));
    // Back after base_ejection_time; a second ejection lasts twice as long.
    let later = now + Duration::from_secs(6);
    assert!(!h0.state.ejected(later));
    for _ in 0..5 {
        b2.report(&b2.hosts()[0], Outcome::ServerError, later);
    }
    assert!(b2.hosts()[0].state.ejected(later + Duration::from_secs(9)));
    assert!(!b2.hosts()[0].state.ejected(later + Duration::from_secs(11)));
}
