//! "Control plane silent" is not "cluster dead": a reader keeps serving the last entries of a
//! cluster whose entries left the registry without a withdrawal (its control plane is
//! restarting, or cut off from etcd, and its lease expired) for as long as this cluster's
//! gateway link to it is up, and at most a bound. Pure: the caller passes the registry's
//! snapshots and the time.
//!
//! A cluster is retained when it was in the previous snapshot, is not in the new one, was not
//! withdrawn (no tombstone), is not the reader's own cluster, and the link from the reader's
//! cluster to it is `up` or `degraded`. It is let go when it is back in the registry, withdrawn,
//! its link is down or gone, or the bound has passed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Snapshot;
use crate::model::{Cluster, ClusterId, LinkHealth, ServiceEndpoints, ServiceKey};

/// A cluster served from its last entries.
#[derive(Debug, Clone)]
pub struct Stale {
    pub record: Arc<Cluster>,
    pub endpoints: Vec<(ServiceKey, Arc<ServiceEndpoints>)>,
    /// When its entries left the registry.
    pub since: Instant,
}

/// The clusters a reader keeps serving after their entries left the registry.
#[derive(Debug)]
pub struct Retention {
    own: ClusterId,
    bound: Duration,
    stale: BTreeMap<ClusterId, Stale>,
    last: Option<Arc<Snapshot>>,
}

/// What changed in the stale set: a cluster kept (`None`) or let go (`Some(why)`).
pub type Changes = Vec<(ClusterId, Option<Release>)>;

/// Why a stale cluster was let go (for logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Release {
    Back,
    Withdrawn,
    LinkDown,
    Bound,
}

impl Retention {
    pub fn new(own: ClusterId, bound: Duration) -> Self {
        Self {
            own,
            bound,
            stale: BTreeMap::new(),
            last: None,
        }
    }

    /// The clusters served stale, with when they left the registry.
    pub fn stale(&self) -> &BTreeMap<ClusterId, Stale> {
        &self.stale
    }

    fn link_up(&self, snap: &Snapshot, to: &ClusterId) -> bool {
        snap.links
            .get(&(self.own.clone(), to.clone()))
            .is_some_and(|l| matches!(l.state, LinkHealth::Up | LinkHealth::Degraded))
    }

    /// Take the registry's new snapshot; returns the snapshot to serve (the registry's, with the
    /// stale clusters' last entries put back) and what changed in the stale set.
    pub fn apply(&mut self, snap: &Arc<Snapshot>, now: Instant) -> (Arc<Snapshot>, Changes) {
        let mut changes = Vec::new();
        // Newly gone clusters.
        if let Some(prev) = self.last.take() {
            for (id, record) in prev.clusters.iter() {
                if *id == self.own
                    || snap.clusters.contains_key(id)
                    || snap.withdrawn.contains_key(id)
                    || self.stale.contains_key(id)
                    || !self.link_up(snap, id)
                {
                    continue;
                }
                let endpoints = prev
                    .cluster_services(id)
                    .map(|s| (s.service.key.clone(), s.clone()))
                    .collect();
                self.stale.insert(
                    id.clone(),
                    Stale {
                        record: record.clone(),
                        endpoints,
                        since: now,
                    },
                );
                changes.push((id.clone(), None));
            }
        }
        self.last = Some(snap.clone());
        self.release(snap, now, &mut changes);
        (self.effective(snap), changes)
    }

    /// Re-check the bound and the links without a new snapshot (the caller's timer).
    pub fn tick(&mut self, now: Instant) -> Option<(Arc<Snapshot>, Changes)> {
        let snap = self.last.clone()?;
        let mut changes = Vec::new();
        self.release(&snap, now, &mut changes);
        (!changes.is_empty()).then(|| (self.effective(&snap), changes))
    }

    fn release(&mut self, snap: &Snapshot, now: Instant, changes: &mut Changes) {
        let mut gone = Vec::new();
        for (id, s) in &self.stale {
            let why = if snap.clusters.contains_key(id) {
                Some(Release::Back)
            } else if snap.withdrawn.contains_key(id) {
                Some(Release::Withdrawn)
            } else if !self.link_up(snap, id) {
                Some(Release::LinkDown)
            } else if now.duration_since(s.since) >= self.bound {
                Some(Release::Bound)
            } else {
                None
            };
            if let Some(why) = why {
                gone.push((id.clone(), why));
            }
        }
        for (id, why) in gone {
            self.stale.remove(&id);
            changes.push((id, Some(why)));
        }
    }

    fn effective(&self, snap: &Arc<Snapshot>) -> Arc<Snapshot> {
        if self.stale.is_empty() {
            return snap.clone();
        }
        let mut out = (**snap).clone();
        for (id, s) in &self.stale {
            out.clusters.insert(id.clone(), s.record.clone());
            for (key, set) in &s.endpoints {
                out.endpoints.insert((key.clone(), id.clone()), set.clone());
            }
        }
        Arc::new(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        Endpoint, LinkState, Locality, Name, Protocol, Service, ServicePort, Withdrawal,
    };

    fn id(s: &str) -> ClusterId {
        Name::parse("c", s).unwrap()
    }

    fn with_cluster(mut s: Snapshot, c: &str, port: u16) -> Snapshot {
        let cid = id(c);
        let record = Cluster::new(cid.clone(), "r", None, vec![]).unwrap();
        s.clusters.insert(cid.clone(), Arc::new(record));
        let key = ServiceKey::new("default", "echo").unwrap();
        let svc = Service::new(
            key.clone(),
            vec![ServicePort::new("http", 80, Protocol::Http).unwrap()],
        )
        .unwrap();
        let ep = Endpoint::new(
            "10.0.0.1".parse().unwrap(),
            port,
            Locality::new("r", "z", "").unwrap(),
            cid.clone(),
        )
        .unwrap();
        let set = ServiceEndpoints::new(cid.clone(), svc, vec![ep]).unwrap();
        s.endpoints.insert((key, cid), Arc::new(set));
        s
    }

    fn without(mut s: Snapshot, c: &str) -> Snapshot {
        let cid = id(c);
        s.clusters.remove(&cid);
        let keys: Vec<_> = s
            .endpoints
            .keys()
            .filter(|(_, k)| *k == cid)
            .cloned()
            .collect();
        for k in keys {
            s.endpoints.remove(&k);
        }
        s
    }

    fn link(mut s: Snapshot, from: &str, to: &str, state: LinkHealth) -> Snapshot {
        let l = LinkState {
            from: id(from),
            to: id(to),
            state,
            rtt_ms: 1.0,
            loss: 0.0,
            since: std::time::SystemTime::UNIX_EPOCH,
        };
        s.links.insert((id(from), id(to)), Arc::new(l));
        s
    }

    fn serves(s: &Snapshot, c: &str) -> bool {
        s.clusters.contains_key(&id(c)) && s.cluster_services(&id(c)).count() == 1
    }

    #[test]
    fn a_silent_cluster_is_served_while_its_link_is_up_and_within_the_bound() {
        let t0 = Instant::now();
        let mut r = Retention::new(id("east"), Duration::from_secs(60));
        let base = link(
            with_cluster(with_cluster(Snapshot::default(), "east", 1), "west", 2),
            "east",
            "west",
            LinkHealth::Up,
        );
        let (eff, ch) = r.apply(&Arc::new(base.clone()), t0);
        assert!(serves(&eff, "west") && ch.is_empty());
        // West's lease expires; the link is up: west is kept, stale.
        let gone = Arc::new(without(base.clone(), "west"));
        let (eff, ch) = r.apply(&gone, t0 + Duration::from_secs(1));
        assert!(serves(&eff, "west"), "{eff:?}");
        assert_eq!(ch, [(id("west"), None)]);
        assert!(r.stale().contains_key(&id("west")));
        // Unrelated changes keep it.
        let (eff, ch) = r.apply(&gone, t0 + Duration::from_secs(30));
        assert!(serves(&eff, "west") && ch.is_empty());
        // The bound passes: let go.
        let (eff, ch) = r.tick(t0 + Duration::from_secs(62)).unwrap();
        assert!(!serves(&eff, "west"));
        assert_eq!(ch, [(id("west"), Some(Release::Bound))]);
        assert!(r.tick(t0 + Duration::from_secs(70)).is_none());
    }

    #[test]
    fn a_down_link_a_withdrawal_or_a_return_ends_it() {
        let t0 = Instant::now();
        let base = link(
            with_cluster(with_cluster(Snapshot::default(), "east", 1), "west", 2),
            "east",
            "west",
            LinkHealth::Up,
        );
        let gone = without(base.clone(), "west");
        // Link down.
        let mut r = Retention::new(id("east"), Duration::from_secs(60));
        r.apply(&Arc::new(base.clone()), t0);
        r.apply(&Arc::new(gone.clone()), t0);
        let (eff, ch) = r.apply(
            &Arc::new(link(gone.clone(), "east", "west", LinkHealth::Down)),
            t0,
        );
        assert!(!serves(&eff, "west"));
        assert_eq!(ch, [(id("west"), Some(Release::LinkDown))]);
        // Withdrawn: never kept, even with the link up.
        let mut r = Retention::new(id("east"), Duration::from_secs(60));
        r.apply(&Arc::new(base.clone()), t0);
        let mut w = gone.clone();
        w.withdrawn.insert(
            id("west"),
            Arc::new(Withdrawal {
                cluster: id("west"),
                at: std::time::SystemTime::UNIX_EPOCH,
            }),
        );
        let (eff, ch) = r.apply(&Arc::new(w), t0);
        assert!(!serves(&eff, "west") && ch.is_empty());
        // Back: the registry's entries again (a new port: not the kept ones).
        let mut r = Retention::new(id("east"), Duration::from_secs(60));
        r.apply(&Arc::new(base.clone()), t0);
        r.apply(&Arc::new(gone.clone()), t0);
        let back = Arc::new(with_cluster(gone.clone(), "west", 9));
        let (eff, ch) = r.apply(&back, t0);
        assert_eq!(ch, [(id("west"), Some(Release::Back))]);
        assert!(Arc::ptr_eq(&eff, &back));
        // With the link already down when it went: not kept. Nor the reader's own cluster.
        let mut r = Retention::new(id("east"), Duration::from_secs(60));
        r.apply(
            &Arc::new(link(base.clone(), "east", "west", LinkHealth::Down)),
            t0,
        );
        let (eff, _) = r.apply(&Arc::new(link(gone, "east", "west", LinkHealth::Down)), t0);
        assert!(!serves(&eff, "west"));
        let mut r = Retention::new(id("east"), Duration::from_secs(60));
        r.apply(&Arc::new(base.clone()), t0);
        let (eff, _) = r.apply(&Arc::new(without(base, "east")), t0);
        assert!(!serves(&eff, "east"));
    }
}
