//! Route resolution: table-driven cases for every rule, and properties over random inputs.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use imbl::OrdMap;

use federation::model::{
    Cluster, ClusterId, Distribute, Endpoint, FailoverPolicy, FailoverTarget, Health, Labels,
    LinkHealth, LinkState, Locality, LocalityPattern, Name, PolicyScope, Protocol, Service,
    ServiceEndpoints, ServiceKey, ServicePort,
};
use federation::route::{Caller, Inputs, Route, resolve};
use proptest::prelude::*;

fn id(c: &str) -> ClusterId {
    Name::parse("cluster", c).unwrap()
}

fn loc(s: &str) -> Locality {
    Locality::parse("locality", s).unwrap()
}

/// The federation of these tests: east and east2 in us-east, west in us-west, central in
/// us-central. east2 shares east's network; the others have their own.
fn clusters() -> OrdMap<ClusterId, Arc<Cluster>> {
    let mut m = OrdMap::new();
    for (c, region, net) in [
        ("east", "us-east", "net-east"),
        ("east2", "us-east", "net-east"),
        ("west", "us-west", "west"),
        ("central", "us-central", "central"),
    ] {
        m.insert(
            id(c),
            Arc::new(
                Cluster::new(
                    id(c),
                    region,
                    Some(Name::parse("network", net).unwrap()),
                    vec![],
                )
                .unwrap(),
            ),
        );
    }
    m
}

/// One endpoint: `n` picks the address 10.0.0.n.
struct E {
    cluster: &'static str,
    locality: &'static str,
    n: u8,
    health: Health,
    weight: u32,
    version: &'static str,
}

fn e(cluster: &'static str, locality: &'static str, n: u8) -> E {
    E {
        cluster,
        locality,
        n,
        health: Health::Healthy,
        weight: 1,
        version: "v1",
    }
}

impl E {
    fn health(mut self, h: Health) -> Self {
        self.health = h;
        self
    }
    fn weight(mut self, w: u32) -> Self {
        self.weight = w;
        self
    }
    fn version(mut self, v: &'static str) -> Self {
        self.version = v;
        self
    }
}

fn service() -> Service {
    Service::new(
        ServiceKey::new("default", "echo").unwrap(),
        vec![ServicePort::new("http", 8080, Protocol::Http).unwrap()],
    )
    .unwrap()
}

/// The endpoints grouped per cluster, as the registry holds them.
fn registry(eps: &[E]) -> Vec<ServiceEndpoints> {
    let mut by: BTreeMap<&str, Vec<Endpoint>> = BTreeMap::new();
    for x in eps {
        let labels = Labels::new(BTreeMap::from([(
            "version".to_string(),
            x.version.to_string(),
        )]))
        .unwrap();
        by.entry(x.cluster).or_default().push(
            Endpoint::new(
                IpAddr::V4(Ipv4Addr::new(10, 0, 0, x.n)),
                8080,
                loc(x.locality),
                id(x.cluster),
            )
            .unwrap()
            .with_health(x.health)
            .with_weight(x.weight)
            .unwrap()
            .with_labels(labels),
        );
    }
    by.into_iter()
        .map(|(c, v)| ServiceEndpoints::new(id(c), service(), v).unwrap())
        .collect()
}

fn caller(cluster: &str, locality: &str) -> Caller {
    Caller {
        cluster: id(cluster),
        locality: loc(locality),
        labels: Labels::new(BTreeMap::from([("version".to_string(), "v1".to_string())])).unwrap(),
    }
}

fn policy() -> FailoverPolicy {
    FailoverPolicy {
        scope: PolicyScope::Default,
        targets: vec![],
        exclude_others: false,
        failover_priority: vec![],
        distribute: vec![],
        http: vec![],
    }
}

/// Link states from `from` to each listed cluster, as the registry holds them.
fn link_map(
    from: &ClusterId,
    links: &[(&str, LinkHealth)],
) -> OrdMap<(ClusterId, ClusterId), Arc<LinkState>> {
    links
        .iter()
        .map(|(to, state)| {
            let l = LinkState {
                from: from.clone(),
                to: id(to),
                state: *state,
                rtt_ms: 1.0,
                loss: 0.0,
                since: std::time::SystemTime::UNIX_EPOCH,
            };
            ((from.clone(), id(to)), Arc::new(l))
        })
        .collect()
}

fn run(
    c: &Caller,
    eps: &[E],
    policy: Option<&FailoverPolicy>,
    links: &[(&str, LinkHealth)],
) -> Route {
    if let Some(p) = policy {
        p.validate().unwrap();
    }
    let reg = registry(eps);
    let clusters = clusters();
    let links = link_map(&c.cluster, links);
    resolve(
        c,
        &Inputs {
            endpoints: reg.iter().collect(),
            clusters: &clusters,
            policy,
            links: &links,
        },
    )
}

/// (priority, cluster, locality) of every group, in order.
fn shape(r: &Route) -> Vec<(u32, String, String)> {
    r.groups
        .iter()
        .map(|g| (g.priority, g.cluster.to_string(), g.locality.to_string()))
        .collect()
}

fn s(p: u32, c: &str, l: &str) -> (u32, String, String) {
    (p, c.to_string(), l.to_string())
}

fn everywhere() -> Vec<E> {
    vec![
        e("east", "us-east/a", 1),
        e("east", "us-east/b", 2),
        e("east2", "us-east/a", 3),
        e("west", "us-west/a", 4),
        e("central", "us-central/a", 5),
    ]
}

#[test]
fn default_order_is_zone_then_region_then_other_clusters_in_region_then_the_rest() {
    let r = run(&caller("east", "us-east/a"), &everywhere(), None, &[]);
    assert_eq!(
        shape(&r),
        vec![
            s(0, "east", "us-east/a"),
            s(1, "east", "us-east/b"),
            s(2, "east2", "us-east/a"),
            s(3, "central", "us-central/a"),
            s(3, "west", "us-west/a"),
        ]
    );
    assert!(r.excluded.is_empty());
    // Same network: direct; other networks: through the gateway.
    let via: Vec<bool> = r.groups.iter().map(|g| g.via_gateway).collect();
    assert_eq!(via, vec![false, false, false, true, true]);
    assert!(
        r.groups[2]
            .why
            .contains("another cluster in the same region"),
        "{}",
        r.groups[2].why
    );
    // From west, its own cluster first and everything else after.
    let r = run(&caller("west", "us-west/a"), &everywhere(), None, &[]);
    assert_eq!(r.groups[0].cluster.as_str(), "west");
    assert_eq!(r.groups[0].priority, 0);
    assert!(
        r.groups[1..]
            .iter()
            .all(|g| g.priority == 1 && g.via_gateway)
    );
}

#[test]
fn subzones_come_before_the_rest_of_the_zone() {
    let eps = vec![e("east", "us-east/a/x", 1), e("east", "us-east/a/y", 2)];
    let r = run(&caller("east", "us-east/a/y"), &eps, None, &[]);
    assert_eq!(
        shape(&r),
        vec![s(0, "east", "us-east/a/y"), s(1, "east", "us-east/a/x")]
    );
}

#[test]
fn a_down_link_excludes_the_cluster_and_a_degraded_one_demotes_it() {
    let eps = vec![
        e("east", "us-east/a", 1),
        e("west", "us-west/a", 4),
        e("central", "us-central/a", 5),
    ];
    let c = caller("east", "us-east/a");
    let r = run(&c, &eps, None, &[("west", LinkHealth::Down)]);
    assert_eq!(
        shape(&r),
        vec![s(0, "east", "us-east/a"), s(1, "central", "us-central/a")]
    );
    assert_eq!(r.excluded.len(), 1);
    assert_eq!(r.excluded[0].cluster.as_str(), "west");
    assert!(
        r.excluded[0].why.contains("link east → west is down"),
        "{}",
        r.excluded[0].why
    );

    let r = run(
        &c,
        &eps,
        None,
        &[("west", LinkHealth::Degraded), ("central", LinkHealth::Up)],
    );
    assert_eq!(
        shape(&r),
        vec![
            s(0, "east", "us-east/a"),
            s(1, "central", "us-central/a"),
            s(2, "west", "us-west/a"),
        ]
    );
    assert!(r.groups[2].why.contains("degraded"));
    // The caller's own cluster never depends on a link.
    let r = run(&c, &eps, None, &[("east", LinkHealth::Down)]);
    assert_eq!(r.groups[0].cluster.as_str(), "east");
}

#[test]
fn health_decides_membership_and_weights() {
    let eps = vec![
        e("east", "us-east/a", 1).health(Health::Unhealthy),
        e("east", "us-east/a", 2).health(Health::Draining),
        e("east", "us-east/b", 3).weight(3),
        e("east", "us-east/b", 4).health(Health::Draining).weight(5),
        e("east", "us-east/b", 5).health(Health::Degraded),
    ];
    let r = run(&caller("east", "us-east/a"), &eps, None, &[]);
    // Zone a has nothing serving: out, and zone b moves up to priority 0.
    assert_eq!(shape(&r), vec![s(0, "east", "us-east/b")]);
    assert_eq!(r.excluded[0].why, "no healthy endpoint");
    assert_eq!(r.excluded[0].endpoints, 2);
    // Draining endpoints stay listed (so proxies drain them) but do not count for weight.
    let g = &r.groups[0];
    assert_eq!(g.endpoints.len(), 3);
    assert_eq!(g.serving(), 2);
    assert_eq!(g.weight, 4);
}

#[test]
fn policy_targets_order_clusters_after_the_callers_own() {
    let mut p = policy();
    p.targets = vec![
        FailoverTarget::Cluster(id("west")),
        FailoverTarget::Region("us-central".into()),
    ];
    let r = run(&caller("east", "us-east/a"), &everywhere(), Some(&p), &[]);
    assert_eq!(
        shape(&r),
        vec![
            s(0, "east", "us-east/a"),
            s(1, "east", "us-east/b"),
            s(2, "west", "us-west/a"),
            s(3, "central", "us-central/a"),
            s(4, "east2", "us-east/a"),
        ]
    );
    assert!(
        r.groups[2].why.contains("policy target #1 (cluster west)"),
        "{}",
        r.groups[2].why
    );
    assert!(
        r.groups[4].why.contains("not a policy target"),
        "{}",
        r.groups[4].why
    );

    // Naming the caller's own cluster puts it where it is named.
    p.targets.insert(1, FailoverTarget::Cluster(id("east")));
    let r = run(&caller("east", "us-east/a"), &everywhere(), Some(&p), &[]);
    assert_eq!(r.groups[0].cluster.as_str(), "west");
    assert_eq!(r.groups[1].cluster.as_str(), "east");

    // exclude_others: only the targets.
    p.targets = vec![FailoverTarget::Cluster(id("west"))];
    p.exclude_others = true;
    let r = run(&caller("east", "us-east/a"), &everywhere(), Some(&p), &[]);
    assert_eq!(shape(&r), vec![s(0, "west", "us-west/a")]);
    assert_eq!(r.excluded.len(), 4);
    assert!(
        r.excluded
            .iter()
            .all(|x| x.why.contains("only its targets"))
    );
}

#[test]
fn failover_priority_orders_by_leading_matching_labels() {
    let mut p = policy();
    p.failover_priority = vec![
        "topology.kubernetes.io/region".into(),
        "strait.io/cluster".into(),
        "version".into(),
    ];
    let eps = vec![
        e("east", "us-east/b", 1).version("v1"),
        e("east", "us-east/b", 2).version("v2"),
        e("east2", "us-east/a", 3).version("v1"),
        e("west", "us-west/a", 4).version("v1"),
    ];
    let r = run(&caller("east", "us-east/a"), &eps, Some(&p), &[]);
    // All three labels match → 0; region and cluster → 1; region only → 2; nothing → 3.
    let got: Vec<(u32, String, Vec<u8>)> = r
        .groups
        .iter()
        .map(|g| {
            (
                g.priority,
                g.cluster.to_string(),
                g.endpoints
                    .iter()
                    .map(|x| match x.address {
                        IpAddr::V4(a) => a.octets()[3],
                        IpAddr::V6(_) => 0,
                    })
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (0, "east".into(), vec![1]),
            (1, "east".into(), vec![2]),
            (2, "east2".into(), vec![3]),
            (3, "west".into(), vec![4]),
        ]
    );
    assert!(
        r.groups[1].why.contains("differs in `version`"),
        "{}",
        r.groups[1].why
    );
}

fn pattern(p: &str) -> LocalityPattern {
    LocalityPattern::parse("p", p).unwrap()
}

#[test]
fn distribute_splits_priority_zero_and_failover_continues_below() {
    let mut p = policy();
    p.distribute = vec![Distribute {
        from: pattern("us-east/*"),
        to: BTreeMap::from([(pattern("us-east/*"), 80), (pattern("us-west/*"), 20)]),
    }];
    let eps = vec![
        e("east", "us-east/a", 1),
        e("east", "us-east/b", 2).weight(3),
        e("west", "us-west/a", 4),
        e("central", "us-central/a", 5),
    ];
    let c = caller("east", "us-east/a");
    let r = run(&c, &eps, Some(&p), &[]);
    assert_eq!(
        shape(&r),
        vec![
            s(0, "east", "us-east/a"),
            s(0, "east", "us-east/b"),
            s(0, "west", "us-west/a"),
            s(1, "central", "us-central/a"),
        ]
    );
    // 80 % split 1:3 by endpoint weight, 20 % to west (in hundredths of a percent).
    let w: Vec<u32> = r.groups.iter().map(|g| g.weight).collect();
    assert_eq!(w[..3], [2000, 6000, 2000]);
    assert!(
        r.groups[2]
            .why
            .contains("distribute from us-east/*: 20% to us-west/*")
    );

    // West's link goes down: its share is gone, the rest of priority 0 carries on, and central
    // is still the failover.
    let r = run(&c, &eps, Some(&p), &[("west", LinkHealth::Down)]);
    assert_eq!(
        shape(&r),
        vec![
            s(0, "east", "us-east/a"),
            s(0, "east", "us-east/b"),
            s(1, "central", "us-central/a"),
        ]
    );

    // A caller outside `from` gets the default order.
    let r = run(&caller("west", "us-west/a"), &eps, Some(&p), &[]);
    assert_eq!(r.groups[0].cluster.as_str(), "west");
    assert_eq!(r.groups[0].priority, 0);
    assert!(r.groups[1..].iter().all(|g| g.priority == 1));
}

#[test]
fn the_explain_table_says_why() {
    let r = run(
        &caller("east", "us-east/a"),
        &everywhere(),
        None,
        &[("west", LinkHealth::Down)],
    );
    let t = r.to_string();
    assert!(t.starts_with("PRIORITY"), "{t}");
    assert!(t.contains("own cluster, same zone"), "{t}");
    assert!(t.contains("(via gateway)"), "{t}");
    assert!(t.contains("link east → west is down"), "{t}");
    assert_eq!(t.lines().count(), 1 + 4 + 1, "{t}");
}

// ---- properties ------------------------------------------------------------------------------

const CLUSTERS: [&str; 4] = ["east", "east2", "west", "central"];

fn region(c: &str) -> &'static str {
    match c {
        "east" | "east2" => "us-east",
        "west" => "us-west",
        _ => "us-central",
    }
}

fn arb_endpoints() -> impl Strategy<Value = Vec<(usize, usize, u8, u32, bool)>> {
    // (cluster, zone, health, weight, version v1?)
    prop::collection::vec(
        (0..4usize, 0..3usize, 0..4u8, 1..4u32, any::<bool>()),
        0..40,
    )
}

fn build(raw: &[(usize, usize, u8, u32, bool)]) -> Vec<E> {
    const ZONES: [[&str; 3]; 4] = [
        ["us-east/a", "us-east/b", "us-east/c"],
        ["us-east/a", "us-east/b", "us-east/c"],
        ["us-west/a", "us-west/b", "us-west/c"],
        ["us-central/a", "us-central/b", "us-central/c"],
    ];
    raw.iter()
        .enumerate()
        .map(|(i, (c, z, h, w, v1))| {
            let health = [
                Health::Healthy,
                Health::Degraded,
                Health::Draining,
                Health::Unhealthy,
            ][*h as usize];
            debug_assert_eq!(
                region(CLUSTERS[*c]),
                &ZONES[*c][0][..ZONES[*c][0].find('/').unwrap_or(0)]
            );
            E {
                cluster: CLUSTERS[*c],
                locality: ZONES[*c][*z],
                n: i as u8 + 1,
                health,
                weight: *w,
                version: if *v1 { "v1" } else { "v2" },
            }
        })
        .collect()
}

fn arb_links() -> impl Strategy<Value = Vec<Option<u8>>> {
    prop::collection::vec(prop::option::of(0..3u8), 4)
}

fn arb_policy() -> impl Strategy<Value = Option<FailoverPolicy>> {
    prop::option::of((
        prop::sample::subsequence(vec![0usize, 1, 2, 3], 0..=4).prop_shuffle(),
        any::<bool>(),
        prop::sample::subsequence(
            vec![
                "topology.kubernetes.io/region",
                "strait.io/cluster",
                "topology.kubernetes.io/zone",
                "version",
            ],
            0..=3,
        ),
    ))
    .prop_map(|o| {
        o.map(|(targets, region_first, labels)| {
            let mut p = policy();
            p.targets = targets
                .into_iter()
                .map(|i| {
                    if region_first && i == 3 {
                        FailoverTarget::Region("us-central".into())
                    } else {
                        FailoverTarget::Cluster(id(CLUSTERS[i]))
                    }
                })
                .collect();
            p.failover_priority = labels.into_iter().map(String::from).collect();
            p
        })
    })
}

fn links_of(l: &[Option<u8>]) -> Vec<(&'static str, LinkHealth)> {
    l.iter()
        .enumerate()
        .filter_map(|(i, s)| {
            s.map(|s| {
                (
                    CLUSTERS[i],
                    [LinkHealth::Up, LinkHealth::Degraded, LinkHealth::Down][s as usize],
                )
            })
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Every serving endpoint is reachable at some priority unless its cluster's link is down
    /// (policies here never exclude); nothing unreachable sneaks in; levels are 0..n without gaps;
    /// every group can take traffic.
    #[test]
    fn every_healthy_endpoint_is_reachable_and_levels_are_dense(
        raw in arb_endpoints(), links in arb_links(), p in arb_policy(), caller_c in 0..4usize,
    ) {
        let eps = build(&raw);
        let c = caller(CLUSTERS[caller_c], &format!("{}/a", region(CLUSTERS[caller_c])));
        let links = links_of(&links);
        let r = run(&c, &eps, p.as_ref(), &links);
        let down: Vec<&str> = links
            .iter()
            .filter(|(cl, l)| *l == LinkHealth::Down && *cl != CLUSTERS[caller_c])
            .map(|(cl, _)| *cl)
            .collect();
        for x in &eps {
            let placed = r.groups.iter().any(|g| {
                g.cluster.as_str() == x.cluster
                    && g.endpoints.iter().any(|y| y.address == IpAddr::V4(Ipv4Addr::new(10, 0, 0, x.n)))
            });
            let reachable = !down.contains(&x.cluster);
            if x.health.is_serving() && reachable {
                prop_assert!(placed, "serving endpoint 10.0.0.{} of {} missing:\n{}", x.n, x.cluster, r);
            }
            if !reachable {
                prop_assert!(!placed, "endpoint behind a down link placed:\n{}", r);
            }
        }
        let mut expect = 0;
        for g in &r.groups {
            prop_assert!(g.priority == expect || g.priority == expect + 1, "gap:\n{}", r);
            if g.priority == expect + 1 { expect += 1; }
            prop_assert!(g.serving() > 0);
            prop_assert!(g.weight >= 1);
        }
        if let Some(first) = r.groups.first() {
            prop_assert_eq!(first.priority, 0);
        }
    }

    /// The result does not depend on the order of the input.
    #[test]
    fn the_result_does_not_depend_on_input_order(
        raw in arb_endpoints(), links in arb_links(), p in arb_policy(), seed in any::<u64>(),
    ) {
        let eps = build(&raw);
        let c = caller("east", "us-east/a");
        let links = links_of(&links);
        let a = run(&c, &eps, p.as_ref(), &links);
        // Shuffle endpoints (deterministically from the seed) and the per-cluster records.
        let mut shuffled: Vec<E> = build(&raw);
        let mut x = seed | 1;
        for i in (1..shuffled.len()).rev() {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            shuffled.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let reg = {
            let mut r = registry(&shuffled);
            r.reverse();
            r
        };
        let clusters = clusters();
        let lmap = link_map(&c.cluster, &links);
        let b = resolve(&c, &Inputs { endpoints: reg.iter().collect(), clusters: &clusters, policy: p.as_ref(), links: &lmap });
        prop_assert_eq!(a, b);
    }
}
