//! Route resolution: which endpoints of a service a proxy in a given cluster and locality should
//! use, in which priority order, with which locality weights, and why.
//!
//! Pure functions: no I/O, no clock. The control plane calls [`resolve`] for every (service,
//! proxy locality) it serves; `strait route explain` prints the same result as a table.
//!
//! # The rules
//!
//! Endpoints are grouped by (cluster, locality): a remote cluster's endpoints are localities of
//! their own with their own health, never one opaque gateway endpoint. A group is **excluded**
//! (with the reason) when:
//!
//! - its cluster is remote and the caller's gateway reports the link to it `down`;
//! - none of its endpoints is serving (healthy or degraded);
//! - the policy sets `exclude_others` and the group matches none of its targets.
//!
//! The remaining groups are ordered by a key, and each distinct key is a priority level (0 first):
//!
//! 1. **Policy target rank.** Without a policy, or for the caller's own cluster when the policy
//!    does not name it, 0. Otherwise the position of the first target (cluster or region) the
//!    group matches, counting from 1; groups matching none come after every target.
//! 2. **Locality tier**, either the default (Istio-like locality failover):
//!    own cluster same zone and subzone, own cluster same zone, own cluster same region, other
//!    clusters in the same region, own cluster elsewhere, other clusters elsewhere;
//!    or, when the policy has `failover_priority` labels, the number of leading labels whose
//!    value differs from the caller's (0: all match). The pseudo-labels
//!    `topology.kubernetes.io/region`, `topology.kubernetes.io/zone` and `strait.io/cluster`
//!    refer to the endpoint's locality and cluster. Labels split a locality's endpoints into
//!    several groups when they differ.
//! 3. **Link quality**: a remote cluster behind a `degraded` link comes after an `up` (or
//!    unknown) one with the same rank and tier.
//!
//! **Distribute.** When the policy has a `distribute` rule whose `from` matches the caller's
//! locality, the groups matching its `to` patterns form priority 0 together, weighted by the
//! pattern's percentage (split among the pattern's groups by their endpoint weight); every other
//! group keeps failing over below it by the rules above. A destination that drops out (down, no
//! healthy endpoint) loses its share to the others in proportion.
//!
//! Within a level, a group's locality weight is the sum of its serving endpoints' weights (so
//! every endpoint of a level gets a fair share), or its distributed share. Output is sorted
//! (level, cluster, locality, labels; endpoints by address): the result does not depend on the
//! order of the input.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use std::sync::Arc;

use imbl::OrdMap;

use crate::model::{
    Cluster, ClusterId, FailoverPolicy, FailoverTarget, Health, Labels, LinkHealth, LinkState,
    Locality, ServiceEndpoints, ServiceKey,
};
use crate::registry::Snapshot;

/// The pseudo-label for an endpoint's region.
pub const LABEL_REGION: &str = "topology.kubernetes.io/region";
/// The pseudo-label for an endpoint's zone.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// The pseudo-label for an endpoint's cluster.
pub const LABEL_CLUSTER: &str = "strait.io/cluster";

/// Who asks: a proxy (or gateway) in a cluster, at a locality, with its workload's labels.
#[derive(Debug, Clone)]
pub struct Caller {
    pub cluster: ClusterId,
    pub locality: Locality,
    pub labels: Labels,
}

/// Everything resolution looks at, borrowed from a registry snapshot.
pub struct Inputs<'a> {
    /// The service's endpoints in every cluster.
    pub endpoints: Vec<&'a ServiceEndpoints>,
    /// Cluster records (for regions and networks); a cluster missing here is treated as on its
    /// own network.
    pub clusters: &'a OrdMap<ClusterId, Arc<Cluster>>,
    /// The policy for this service (its own, else the default), if any.
    pub policy: Option<&'a FailoverPolicy>,
    /// Link states by (from, to), as gateways report them; the caller's own links are used. A
    /// link missing here is unknown and treated as reachable.
    pub links: &'a OrdMap<(ClusterId, ClusterId), Arc<LinkState>>,
}

impl<'a> Inputs<'a> {
    /// The inputs for `service` as the registry snapshot holds them.
    pub fn from_snapshot(snapshot: &'a Snapshot, service: &ServiceKey) -> Self {
        Self {
            endpoints: snapshot.service(service).map(|s| &**s).collect(),
            clusters: &snapshot.clusters,
            policy: snapshot.policy_for(service).map(|p| &**p),
            links: &snapshot.links,
        }
    }
}

/// One endpoint in a resolved route.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RoutedEndpoint {
    pub address: IpAddr,
    pub port: u16,
    pub health: Health,
    pub weight: u32,
    /// A sidecar fronts it: reached with mutual TLS ([`crate::model::TLS_MODE_LABEL`]).
    pub mutual_tls: bool,
}

/// A group of endpoints of one cluster and locality (and label class) at one priority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalityGroup {
    pub priority: u32,
    pub cluster: ClusterId,
    pub locality: Locality,
    /// True when the cluster is on another network than the caller's: reached through the
    /// caller's east-west gateway.
    pub via_gateway: bool,
    /// Locality load-balancing weight (≥ 1).
    pub weight: u32,
    pub endpoints: Vec<RoutedEndpoint>,
    /// Which rules put the group at this priority.
    pub why: String,
}

impl LocalityGroup {
    pub fn serving(&self) -> usize {
        self.endpoints
            .iter()
            .filter(|e| e.health.is_serving())
            .count()
    }
}

/// A group left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exclusion {
    pub cluster: ClusterId,
    pub locality: Locality,
    pub endpoints: usize,
    pub why: String,
}

/// The resolved route of one service for one caller.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Route {
    /// Sorted by priority, then cluster, locality.
    pub groups: Vec<LocalityGroup>,
    pub excluded: Vec<Exclusion>,
}

impl Route {
    /// The number of priority levels.
    pub fn levels(&self) -> u32 {
        self.groups.last().map_or(0, |g| g.priority + 1)
    }
}

/// The default locality tiers, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Tier {
    OwnSameSubzone,
    OwnSameZone,
    OwnSameRegion,
    OtherSameRegion,
    OwnElsewhere,
    OtherElsewhere,
}

impl Tier {
    fn describe(self) -> &'static str {
        match self {
            Tier::OwnSameSubzone => "own cluster, same zone and subzone",
            Tier::OwnSameZone => "own cluster, same zone",
            Tier::OwnSameRegion => "own cluster, same region",
            Tier::OtherSameRegion => "another cluster in the same region",
            Tier::OwnElsewhere => "own cluster, another region",
            Tier::OtherElsewhere => "another cluster in another region",
        }
    }
}

/// The ordering key of a group (smaller is preferred).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    /// 0: in the caller's `distribute` set (priority 0 together); 1: failover by the rules.
    distributed: u8,
    target: usize,
    tier: usize,
    degraded: bool,
}

fn region_of<'a>(clusters: &'a OrdMap<ClusterId, Arc<Cluster>>, c: &ClusterId) -> Option<&'a str> {
    clusters.get(c).map(|c| &*c.region)
}

fn network_of<'a>(clusters: &'a OrdMap<ClusterId, Arc<Cluster>>, c: &'a ClusterId) -> &'a str {
    clusters.get(c).map_or(c.as_str(), |c| c.network.as_str())
}

fn label_value<'a>(
    key: &str,
    cluster: &'a ClusterId,
    loc: &'a Locality,
    labels: &'a Labels,
) -> Option<&'a str> {
    match key {
        LABEL_REGION => Some(loc.region()),
        LABEL_ZONE => (!loc.zone().is_empty()).then_some(loc.zone()),
        LABEL_CLUSTER => Some(cluster.as_str()),
        k => labels.get(k),
    }
}

/// A group that stays in the route: its key, identity, endpoints, reasons and distribute share.
type Kept = (
    Key,
    (ClusterId, Locality, Vec<Option<String>>),
    Vec<RoutedEndpoint>,
    Vec<String>,
    Option<usize>,
);

/// Resolve the route of one service for `caller`.
pub fn resolve(caller: &Caller, inputs: &Inputs<'_>) -> Route {
    let policy = inputs.policy;
    let prio_labels: &[String] = policy.map_or(&[], |p| &p.failover_priority);

    // Group endpoints by (cluster, locality, label class).
    type GroupKey = (ClusterId, Locality, Vec<Option<String>>);
    let mut groups: BTreeMap<GroupKey, Vec<RoutedEndpoint>> = BTreeMap::new();
    for se in &inputs.endpoints {
        for e in &se.endpoints {
            let class: Vec<Option<String>> = prio_labels
                .iter()
                .map(|k| label_value(k, &e.cluster, &e.locality, &e.labels).map(str::to_string))
                .collect();
            groups
                .entry((e.cluster.clone(), (*e.locality).clone(), class))
                .or_default()
                .push(RoutedEndpoint {
                    address: e.address,
                    port: e.port,
                    health: e.health,
                    weight: e.weight,
                    mutual_tls: e.mutual_tls(),
                });
        }
    }

    let own_region = caller.locality.region();
    let own_network = network_of(inputs.clusters, &caller.cluster).to_string();
    let distribute = policy.and_then(|p| {
        p.distribute
            .iter()
            .find(|d| d.from.matches(&caller.locality))
    });

    let mut kept: Vec<Kept> = Vec::new();
    let mut excluded = Vec::new();
    for ((cluster, locality, class), mut eps) in groups {
        eps.sort();
        let own = cluster == caller.cluster;
        let link = if own {
            None
        } else {
            inputs
                .links
                .get(&(caller.cluster.clone(), cluster.clone()))
                .map(|l| l.state)
        };
        let exclude = |why: String| Exclusion {
            cluster: cluster.clone(),
            locality: locality.clone(),
            endpoints: eps.len(),
            why,
        };
        if link == Some(LinkHealth::Down) {
            excluded.push(exclude(format!(
                "link {} → {cluster} is down",
                caller.cluster
            )));
            continue;
        }
        if !eps.iter().any(|e| e.health.is_serving()) {
            excluded.push(exclude("no healthy endpoint".into()));
            continue;
        }
        let mut why = Vec::new();

        // 1. Policy target rank.
        let target = match policy {
            None => 0,
            Some(p) => {
                let hit = p.targets.iter().position(|t| match t {
                    FailoverTarget::Cluster(c) => *c == cluster,
                    FailoverTarget::Region(r) => {
                        region_of(inputs.clusters, &cluster).unwrap_or(locality.region()) == r
                    }
                });
                match hit {
                    Some(i) => {
                        why.push(format!("policy target #{} ({})", i + 1, p.targets[i]));
                        i + 1
                    }
                    None if p.exclude_others => {
                        excluded.push(exclude(format!(
                            "policy allows only its targets ({})",
                            p.targets
                                .iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(", ")
                        )));
                        continue;
                    }
                    None if p.targets.is_empty() => 0,
                    None if own => {
                        why.push("own cluster (before the policy's targets)".into());
                        0
                    }
                    None => {
                        why.push("not a policy target (after them)".into());
                        p.targets.len() + 1
                    }
                }
            }
        };

        // 2. Locality tier or label priority.
        let tier = if prio_labels.is_empty() {
            let same_region = locality.region() == own_region;
            let same_zone = same_region && locality.zone() == caller.locality.zone();
            let t = match (own, same_zone, same_region) {
                (true, true, _) if locality.subzone() == caller.locality.subzone() => {
                    Tier::OwnSameSubzone
                }
                (true, true, _) => Tier::OwnSameZone,
                (true, false, true) => Tier::OwnSameRegion,
                (false, _, true) => Tier::OtherSameRegion,
                (true, _, false) => Tier::OwnElsewhere,
                (false, _, false) => Tier::OtherElsewhere,
            };
            why.push(t.describe().to_string());
            t as usize
        } else {
            let mut matched = 0;
            for (i, k) in prio_labels.iter().enumerate() {
                let mine = label_value(k, &caller.cluster, &caller.locality, &caller.labels);
                if mine.is_some() && mine == class[i].as_deref() {
                    matched += 1;
                } else {
                    break;
                }
            }
            why.push(if matched == prio_labels.len() {
                format!(
                    "matches all failover_priority labels ({})",
                    prio_labels.join(", ")
                )
            } else if matched == 0 {
                format!("differs in `{}`", prio_labels[0])
            } else {
                format!(
                    "matches {} ({}), differs in `{}`",
                    matched,
                    prio_labels[..matched].join(", "),
                    prio_labels[matched]
                )
            });
            prio_labels.len() - matched
        };

        // 3. Link quality.
        let degraded = link == Some(LinkHealth::Degraded);
        if degraded {
            why.push(format!("link {} → {cluster} degraded", caller.cluster));
        }

        // Distribute.
        let share =
            distribute.and_then(|d| d.to.iter().position(|(pat, _)| pat.matches(&locality)));
        let key = Key {
            distributed: u8::from(share.is_none()),
            target: if share.is_some() { 0 } else { target },
            tier: if share.is_some() { 0 } else { tier },
            degraded: share.is_none() && degraded,
        };
        if let (Some(i), Some(d)) = (share, distribute)
            && let Some((pat, w)) = d.to.iter().nth(i)
        {
            why = vec![format!("distribute from {}: {w}% to {pat}", d.from)];
            if degraded {
                why.push(format!("link {} → {cluster} degraded", caller.cluster));
            }
        }
        kept.push((key, (cluster, locality, class), eps, why, share));
    }

    // Priority levels: distinct keys in order.
    let keys: BTreeSet<Key> = kept.iter().map(|k| k.0).collect();
    let level_of: BTreeMap<Key, u32> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (*k, i as u32))
        .collect();

    // Distributed weights: a pattern's percentage split among its groups by endpoint weight.
    let mut pattern_total: BTreeMap<usize, u64> = BTreeMap::new();
    for (_, _, eps, _, share) in &kept {
        if let Some(i) = share {
            *pattern_total.entry(*i).or_default() += serving_weight(eps);
        }
    }
    let pattern_weight = |i: usize| -> u64 {
        distribute
            .and_then(|d| d.to.values().nth(i))
            .map_or(0, |w| u64::from(*w))
    };

    let mut out: Vec<LocalityGroup> = kept
        .into_iter()
        .map(|(key, (cluster, locality, _), eps, why, share)| {
            let weight = match share {
                Some(i) => {
                    let total = pattern_total.get(&i).copied().unwrap_or(1).max(1);
                    // Percent × 100 for resolution, split by endpoint weight.
                    let w = pattern_weight(i) * 100 * serving_weight(&eps) / total;
                    u32::try_from(w.max(1)).unwrap_or(u32::MAX)
                }
                None => u32::try_from(serving_weight(&eps).max(1)).unwrap_or(u32::MAX),
            };
            LocalityGroup {
                priority: level_of.get(&key).copied().unwrap_or(0),
                via_gateway: network_of(inputs.clusters, &cluster) != own_network,
                cluster,
                locality,
                weight,
                endpoints: eps,
                why: why.join("; "),
            }
        })
        .collect();
    out.sort_by(|a, b| {
        (a.priority, &a.cluster, &a.locality, &a.endpoints).cmp(&(
            b.priority,
            &b.cluster,
            &b.locality,
            &b.endpoints,
        ))
    });
    excluded
        .sort_by(|a, b| (&a.cluster, &a.locality, &a.why).cmp(&(&b.cluster, &b.locality, &b.why)));
    Route {
        groups: out,
        excluded,
    }
}

fn serving_weight(eps: &[RoutedEndpoint]) -> u64 {
    eps.iter()
        .filter(|e| e.health.is_serving())
        .map(|e| u64::from(e.weight))
        .sum()
}

impl fmt::Display for Route {
    /// The `strait route explain` table.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<8} {:<12} {:<28} {:>9} {:>7}  why",
            "PRIORITY", "CLUSTER", "LOCALITY", "ENDPOINTS", "WEIGHT"
        )?;
        for g in &self.groups {
            writeln!(
                f,
                "{:<8} {:<12} {:<28} {:>9} {:>7}  {}{}",
                g.priority,
                g.cluster.as_str(),
                g.locality.to_string(),
                format!("{}/{}", g.serving(), g.endpoints.len()),
                g.weight,
                g.why,
                if g.via_gateway { " (via gateway)" } else { "" }
            )?;
        }
        for x in &self.excluded {
            writeln!(
                f,
                "{:<8} {:<12} {:<28} {:>9} {:>7}  {}",
                "-",
                x.cluster.as_str(),
                x.locality.to_string(),
                format!("0/{}", x.endpoints),
                "-",
                x.why
            )?;
        }
        Ok(())
    }
}
