//! One ADS stream's state machine, without I/O (in the manner of quinn-proto): no channels,
//! no tasks, no clock of its own. The stream's task ([`crate::xds`]) feeds it what the client
//! sent ([`AdsSession::handle`]) and the view it should hold ([`AdsSession::set_view`]), and
//! sends what [`AdsSession::poll_response`] gives until it gives nothing.
//!
//! What it keeps per type (CDS, EDS, LDS, RDS): the subscription (wildcard or names), what the
//! client holds by the server's account, the response awaiting its ACK or NACK (one at a time
//! per type), the latest nonce (older ones are stale), and for a large delta update the point
//! where its next part starts.
//!
//! - **ACK**: the response's content is what the client holds; clusters its listeners and
//!   routes refer to are known.
//! - **NACK**: the client keeps its last good config; the rejected content is not sent again
//!   until it changes.
//! - **Make-before-break**: types go out in the order CDS, EDS, LDS, RDS; a type whose update
//!   goes out in parts holds back the later types until its last part; a cluster that
//!   acknowledged listeners or routes still refer to is kept; a changed cluster's endpoints are
//!   sent again after it.
//! - **Delta**: only changed and removed names, found from the view's diff when the client is
//!   known to hold the previous view; in parts of at most `max_response_bytes`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    Resource as DeltaResource,
};

use crate::view::{ORDER, Resource, TypeKind, View};

/// A request of either protocol, normalised.
pub struct Req {
    pub node: Option<Node>,
    pub type_url: String,
    pub nonce: String,
    pub error: Option<String>,
    /// SotW: the full list of names.
    pub names: Option<Vec<String>>,
    /// Delta: changes.
    pub subscribe: Vec<String>,
    pub unsubscribe: Vec<String>,
    pub initial_versions: HashMap<String, String>,
}

impl From<DiscoveryRequest> for Req {
    fn from(r: DiscoveryRequest) -> Self {
        Self {
            node: r.node,
            type_url: r.type_url,
            nonce: r.response_nonce,
            error: r
                .error_detail
                .map(|e| format!("code {}: {}", e.code, e.message)),
            names: Some(r.resource_names),
            subscribe: Vec::new(),
            unsubscribe: Vec::new(),
            initial_versions: HashMap::new(),
        }
    }
}

impl From<DeltaDiscoveryRequest> for Req {
    fn from(r: DeltaDiscoveryRequest) -> Self {
        Self {
            node: r.node,
            type_url: r.type_url,
            nonce: r.response_nonce,
            error: r
                .error_detail
                .map(|e| format!("code {}: {}", e.code, e.message)),
            names: None,
            subscribe: r.resource_names_subscribe,
            unsubscribe: r.resource_names_unsubscribe,
            initial_versions: r.initial_resource_versions,
        }
    }
}

/// Per-type stream state.
#[derive(Default)]
struct TypeState {
    /// A request for this type has been seen.
    subscribed: bool,
    wildcard: bool,
    names: BTreeSet<String>,
    /// SotW: the last response's resources. Delta: what the client holds, by our account.
    sent: BTreeMap<String, Arc<Resource>>,
    /// Delta: versions the client said it had on (re)connect, not yet confirmed.
    client_versions: HashMap<String, String>,
    /// Delta: named subscriptions already told they do not exist.
    told_absent: BTreeSet<String>,
    /// The response awaiting its ACK/NACK.
    inflight: Option<Inflight>,
    /// The latest nonce sent for this type (empty: nothing sent yet).
    last_nonce: String,
    /// Clusters referred to by what the client acknowledged (listeners, routes).
    acked_refs: BTreeSet<String>,
    /// Re-send these even if unchanged (endpoints of a changed cluster).
    force: BTreeSet<String>,
    /// An ACK was seen (later pushes count towards convergence).
    acked_once: bool,
    /// The id of the view whose desired state `sent` was last brought to (nothing else
    /// changed since): from there only the view's diff needs looking at.
    synced: Option<u64>,
    /// Delta: the last response was one part of a larger update; more is to come.
    incomplete: bool,
    /// Delta: the last name of the last part sent; the next part starts after it.
    resume_after: Option<String>,
}

/// The response of a type awaiting its ACK or NACK.
struct Inflight {
    /// When the change it carries was seen (convergence is measured from there).
    seen: Instant,
    /// It carried resources (an ACK of it counts towards convergence).
    counts: bool,
}

/// The view the client should hold, and the generation it comes from.
struct Current {
    generation: u64,
    seen: Instant,
    view: Arc<View>,
}

/// A response to send, and what it changed of what the client holds.
pub struct Outgoing {
    pub t: TypeKind,
    pub message: Message,
    /// Resources sent (delta: the changed ones; state of the world: those that changed).
    pub changed: Vec<Arc<Resource>>,
    /// Names removed (delta).
    pub removed: Vec<String>,
    /// `changed` and `removed` are all that changed of what the client holds; otherwise
    /// [`AdsSession::held`] is the whole of it.
    pub in_place: bool,
}

/// A response in the stream's protocol.
pub enum Message {
    Sotw(DiscoveryResponse),
    Delta(DeltaDiscoveryResponse),
}

/// What a request said, for the stream's logs, metrics and debug record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A type URL this server does not serve: ignored.
    UnknownType(String),
    /// A nonce that is not the latest sent for its type: ignored (state of the world) or taken
    /// as a subscription change only (delta).
    StaleNonce { t: TypeKind, nonce: String },
    /// The client accepted the response with `nonce`. `converged`: when the change it carried
    /// was seen, if it counts towards convergence.
    Ack {
        t: TypeKind,
        nonce: String,
        converged: Option<Instant>,
    },
    /// The client rejected the response with `nonce`.
    Nack {
        t: TypeKind,
        nonce: String,
        error: String,
    },
}

/// One stream's ADS state machine.
pub struct AdsSession {
    delta: bool,
    max_response_bytes: usize,
    types: [TypeState; 4],
    nonce: u64,
    current: Option<Current>,
    /// Types whose held resources changed outside a response (a delta client's reconnect).
    adopted: [bool; 4],
}

impl AdsSession {
    /// A session of a delta (`true`) or state-of-the-world stream; a delta update larger than
    /// `max_response_bytes` goes out in parts.
    pub fn new(delta: bool, max_response_bytes: usize) -> Self {
        Self {
            delta,
            max_response_bytes,
            types: Default::default(),
            nonce: 0,
            current: None,
            adopted: [false; 4],
        }
    }

    /// The view the client should hold now (of generation `generation`, whose change was seen
    /// at `seen`).
    pub fn set_view(&mut self, generation: u64, seen: Instant, view: Arc<View>) {
        self.current = Some(Current {
            generation,
            seen,
            view,
        });
    }

    /// What the client holds of type `t`, by the server's account.
    pub fn held(&self, t: TypeKind) -> &BTreeMap<String, Arc<Resource>> {
        &self.types[t as usize].sent
    }

    /// Types whose held resources changed without a response since the last call.
    pub fn take_adopted(&mut self) -> Vec<TypeKind> {
        let out = ORDER
            .into_iter()
            .filter(|t| self.adopted[*t as usize])
            .collect();
        self.adopted = [false; 4];
        out
    }

    /// Take in one request of the client (its node is the stream's business, not this).
    pub fn handle(&mut self, req: Req) -> Option<Event> {
        let Some(t) = TypeKind::from_url(&req.type_url) else {
            return Some(Event::UnknownType(req.type_url));
        };
        let delta = self.delta;
        let mut event = None;
        let ts = &mut self.types[t as usize];
        if !req.nonce.is_empty() {
            if req.nonce != ts.last_nonce {
                event = Some(Event::StaleNonce {
                    t,
                    nonce: req.nonce.clone(),
                });
                if !delta {
                    return event;
                }
            } else if let Some(inflight) = ts.inflight.take() {
                match &req.error {
                    Some(err) => {
                        event = Some(Event::Nack {
                            t,
                            nonce: req.nonce.clone(),
                            error: err.clone(),
                        });
                    }
                    None => {
                        let converged = (inflight.counts && ts.acked_once).then_some(inflight.seen);
                        ts.acked_once = true;
                        let refs: BTreeSet<String> = ts
                            .sent
                            .values()
                            .flat_map(|r| r.refs.iter().cloned())
                            .collect();
                        let refs_changed = refs != ts.acked_refs;
                        ts.acked_refs = refs;
                        if refs_changed {
                            // Clusters kept for the old listeners or routes may go now.
                            self.types[TypeKind::Cluster as usize].synced = None;
                        }
                        event = Some(Event::Ack {
                            t,
                            nonce: req.nonce.clone(),
                            converged,
                        });
                    }
                }
            }
        }
        let ts = &mut self.types[t as usize];
        ts.subscribed = true;
        match req.names {
            Some(names) => {
                // State of the world: the full list each time.
                let wildcard =
                    names.iter().any(|n| n == "*") || (names.is_empty() && t.wildcard_by_default());
                let names: BTreeSet<String> = names.into_iter().filter(|n| n != "*").collect();
                if wildcard != ts.wildcard || names != ts.names {
                    ts.synced = None;
                }
                ts.wildcard = wildcard;
                ts.names = names;
            }
            None => {
                if !req.subscribe.is_empty()
                    || !req.unsubscribe.is_empty()
                    || !req.initial_versions.is_empty()
                    || ts.last_nonce.is_empty()
                {
                    ts.synced = None;
                }
                let first = ts.last_nonce.is_empty() && ts.names.is_empty() && !ts.wildcard;
                if first && req.subscribe.is_empty() && t.wildcard_by_default() {
                    ts.wildcard = true;
                }
                for n in req.subscribe {
                    if n == "*" {
                        ts.wildcard = true;
                    } else {
                        ts.names.insert(n);
                    }
                }
                let dropped = !req.unsubscribe.is_empty();
                for n in req.unsubscribe {
                    if n == "*" {
                        ts.wildcard = false;
                    } else {
                        ts.names.remove(&n);
                        ts.sent.remove(&n);
                        ts.told_absent.remove(&n);
                    }
                }
                ts.client_versions.extend(req.initial_versions);
                if dropped {
                    match t {
                        // Which endpoints are kept depends on the clusters the client holds.
                        TypeKind::Cluster => self.types[TypeKind::Endpoint as usize].synced = None,
                        // The client no longer holds what it unsubscribed: its clusters need
                        // not be kept for it.
                        TypeKind::Listener | TypeKind::Route => {
                            let ts = &mut self.types[t as usize];
                            ts.acked_refs = ts
                                .sent
                                .values()
                                .flat_map(|r| r.refs.iter().cloned())
                                .collect();
                            self.types[TypeKind::Cluster as usize].synced = None;
                        }
                        TypeKind::Endpoint => {}
                    }
                }
            }
        }
        event
    }

    /// What the client should hold of type `t` now.
    fn desired(&self, t: TypeKind, view: &View) -> BTreeMap<String, Arc<Resource>> {
        let ts = &self.types[t as usize];
        let all = view.get(t);
        let mut out: BTreeMap<String, Arc<Resource>> = if ts.wildcard {
            all.clone()
        } else {
            ts.names
                .iter()
                .filter_map(|n| all.get(n).map(|r| (n.clone(), r.clone())))
                .collect()
        };
        match t {
            TypeKind::Cluster => {
                // Keep clusters the client's acknowledged listeners and routes still use.
                let refs: BTreeSet<&String> = self.types[TypeKind::Listener as usize]
                    .acked_refs
                    .iter()
                    .chain(self.types[TypeKind::Route as usize].acked_refs.iter())
                    .collect();
                for (n, r) in &ts.sent {
                    if !out.contains_key(n) && refs.contains(n) {
                        out.insert(n.clone(), r.clone());
                    }
                }
            }
            TypeKind::Endpoint => {
                // ... and their endpoints.
                let kept = &self.types[TypeKind::Cluster as usize].sent;
                for (n, r) in &ts.sent {
                    if !out.contains_key(n)
                        && kept.contains_key(n)
                        && !view.get(TypeKind::Cluster).contains_key(n)
                        && (ts.wildcard || ts.names.contains(n))
                    {
                        out.insert(n.clone(), r.clone());
                    }
                }
            }
            _ => {}
        }
        out
    }

    /// [`Self::desired`] for one name: what the client should hold under `name` now.
    fn desired_one(&self, t: TypeKind, name: &str, view: &View) -> Option<Arc<Resource>> {
        let ts = &self.types[t as usize];
        let subscribed = ts.wildcard || ts.names.contains(name);
        if subscribed && let Some(r) = view.get(t).get(name) {
            return Some(r.clone());
        }
        let sent = ts.sent.get(name)?;
        let keep = match t {
            TypeKind::Cluster => {
                self.types[TypeKind::Listener as usize]
                    .acked_refs
                    .contains(name)
                    || self.types[TypeKind::Route as usize]
                        .acked_refs
                        .contains(name)
            }
            TypeKind::Endpoint => {
                subscribed
                    && self.types[TypeKind::Cluster as usize]
                        .sent
                        .contains_key(name)
                    && !view.get(TypeKind::Cluster).contains_key(name)
            }
            _ => false,
        };
        keep.then(|| sent.clone())
    }

    /// The names that may differ between what the client holds of type `t` and what it should
    /// hold, when that is known without looking at every resource: the view's diff since the
    /// view `sent` was last brought to, plus the names to re-send.
    fn candidates(&self, t: TypeKind, view: &View) -> Option<BTreeSet<String>> {
        let ts = &self.types[t as usize];
        if !ts.client_versions.is_empty() {
            return None;
        }
        let mut out = match ts.synced {
            Some(id) if id == view.id && id != 0 => BTreeSet::new(),
            Some(id) => match &view.diff {
                Some(d) if d.base == id && id != 0 => d.changed[t as usize].clone(),
                _ => return None,
            },
            None => return None,
        };
        out.extend(ts.force.iter().cloned());
        Some(out)
    }

    /// The next response to send, if any; the session counts it as sent.
    pub fn poll_response(&mut self) -> Option<Outgoing> {
        let (view, g) = match &self.current {
            Some(c) => (
                c.view.clone(),
                Generation {
                    id: c.generation,
                    seen: c.seen,
                },
            ),
            None => return None,
        };
        for t in ORDER {
            let ts = &self.types[t as usize];
            if ts.incomplete && ts.inflight.is_some() {
                // Make-before-break: later types wait until this one's update is complete.
                break;
            }
            if !ts.subscribed || ts.inflight.is_some() {
                continue;
            }
            let candidates = self.candidates(t, &view);
            if candidates.as_ref().is_some_and(|c| c.is_empty()) {
                // Nothing can have changed for this type.
                self.types[t as usize].synced = Some(view.id);
                self.types[t as usize].incomplete = false;
                continue;
            }
            let nonce = format!("{}", self.nonce + 1);
            // (changed resources, removed names, whether `sent` was updated in place, whether
            // more remains to be sent)
            let (message, sent, removed, in_place, partial) = if self.delta {
                let mut changed: Vec<Arc<Resource>> = Vec::new();
                let mut removed: Vec<String> = Vec::new();
                match &candidates {
                    Some(names) => {
                        // Only the names that may differ.
                        for n in names {
                            let want = self.desired_one(t, n, &view);
                            let ts = &self.types[t as usize];
                            match want {
                                Some(r) => {
                                    let have = ts.sent.get(n).map(|s| s.version.as_str());
                                    if have != Some(r.version.as_str()) || ts.force.contains(n) {
                                        changed.push(r);
                                    }
                                }
                                None => {
                                    if ts.sent.contains_key(n)
                                        || (!ts.wildcard
                                            && ts.names.contains(n)
                                            && !ts.told_absent.contains(n))
                                    {
                                        removed.push(n.clone());
                                    }
                                }
                            }
                        }
                    }
                    None => {
                        let want = self.desired(t, &view);
                        let ts = &self.types[t as usize];
                        // Resources the client said it holds (delta reconnect) in the version
                        // it should: not sent again, but recorded as held.
                        let mut adopt: Vec<Arc<Resource>> = Vec::new();
                        for (n, r) in &want {
                            let sent = ts.sent.get(n).map(|s| s.version.as_str());
                            let held = ts.client_versions.get(n).map(String::as_str);
                            let have = sent.or(held);
                            if have != Some(r.version.as_str()) || ts.force.contains(n) {
                                changed.push(r.clone());
                            } else if sent.is_none() {
                                adopt.push(r.clone());
                            }
                        }
                        removed.extend(ts.sent.keys().filter(|n| !want.contains_key(*n)).cloned());
                        removed.extend(
                            ts.client_versions
                                .keys()
                                .filter(|n| !want.contains_key(*n) && !ts.sent.contains_key(*n))
                                .cloned(),
                        );
                        if !ts.wildcard {
                            for n in &ts.names {
                                if !want.contains_key(n)
                                    && !ts.sent.contains_key(n)
                                    && !ts.told_absent.contains(n)
                                {
                                    removed.push(n.clone());
                                }
                            }
                        }
                        if !adopt.is_empty() {
                            let ts = &mut self.types[t as usize];
                            for r in &adopt {
                                ts.sent.insert(r.name.clone(), r.clone());
                            }
                            self.adopted[t as usize] = true;
                        }
                    }
                }
                removed.sort();
                removed.dedup();
                // A large update goes out in parts (each after the previous one's ACK), so no
                // stream holds one huge message; later types wait until this one is complete.
                let budget = self.max_response_bytes;
                if let Some(after) = &self.types[t as usize].resume_after {
                    // Continue after the previous part (then wrap): names that change again
                    // and again cannot starve the rest.
                    changed.sort_by_key(|r| r.name.as_str() <= after.as_str());
                }
                let mut size = 0usize;
                let fits = changed
                    .iter()
                    .position(|r| {
                        size += r.body.value.len()
                            + r.body.type_url.len()
                            + r.name.len()
                            + r.version.len();
                        size > budget
                    })
                    .map_or(changed.len(), |i| i.max(1));
                let partial = fits < changed.len();
                changed.truncate(fits);
                self.types[t as usize].resume_after = if partial {
                    changed.last().map(|r| r.name.clone())
                } else {
                    None
                };
                let ts = &mut self.types[t as usize];
                if changed.is_empty() && removed.is_empty() && !ts.last_nonce.is_empty() {
                    ts.client_versions.clear();
                    ts.force.clear();
                    ts.synced = Some(view.id);
                    ts.incomplete = false;
                    continue;
                }
                for n in &removed {
                    ts.sent.remove(n);
                    if ts.names.contains(n) {
                        ts.told_absent.insert(n.clone());
                    }
                }
                for r in &changed {
                    ts.sent.insert(r.name.clone(), r.clone());
                    ts.told_absent.remove(&r.name);
                }
                if partial {
                    // What was not sent yet is found by the next full comparison.
                    for r in &changed {
                        ts.client_versions.remove(&r.name);
                        ts.force.remove(&r.name);
                    }
                    for n in &removed {
                        ts.client_versions.remove(n);
                    }
                } else {
                    ts.client_versions.clear();
                }
                let resp = DeltaDiscoveryResponse {
                    system_version_info: format!("{}", g.id),
                    resources: changed
                        .iter()
                        .map(|r| DeltaResource {
                            name: r.name.clone(),
                            version: r.version.clone(),
                            resource: Some(r.body.clone()),
                            ..Default::default()
                        })
                        .collect(),
                    type_url: t.url().to_string(),
                    removed_resources: removed.clone(),
                    nonce: nonce.clone(),
                    ..Default::default()
                };
                (
                    Message::Delta(resp),
                    changed,
                    removed,
                    candidates.is_some(),
                    partial,
                )
            } else {
                let ts = &self.types[t as usize];
                if let Some(names) = &candidates {
                    // State of the world: skip unless one of the names really changed.
                    let any = names.iter().any(|n| {
                        ts.force.contains(n)
                            || self.desired_one(t, n, &view).map(|r| r.version.clone())
                                != ts.sent.get(n).map(|r| r.version.clone())
                    });
                    if !any && !ts.last_nonce.is_empty() {
                        let ts = &mut self.types[t as usize];
                        ts.force.clear();
                        ts.synced = Some(view.id);
                        continue;
                    }
                }
                let want = self.desired(t, &view);
                let ts = &mut self.types[t as usize];
                let same = !ts.last_nonce.is_empty()
                    && ts.force.is_empty()
                    && want.len() == ts.sent.len()
                    && want
                        .iter()
                        .zip(ts.sent.iter())
                        .all(|((a, ra), (b, rb))| a == b && ra.version == rb.version);
                if same {
                    ts.synced = Some(view.id);
                    continue;
                }
                let changed: Vec<Arc<Resource>> = want
                    .values()
                    .filter(|r| {
                        ts.sent.get(&r.name).map(|s| s.version.as_str()) != Some(r.version.as_str())
                    })
                    .cloned()
                    .collect();
                let resp = DiscoveryResponse {
                    version_info: format!("{}", g.id),
                    resources: want.values().map(|r| r.body.clone()).collect(),
                    type_url: t.url().to_string(),
                    nonce: nonce.clone(),
                    ..Default::default()
                };
                ts.sent = want;
                (Message::Sotw(resp), changed, Vec::new(), false, false)
            };
            self.nonce += 1;
            let ts = &mut self.types[t as usize];
            ts.incomplete = partial;
            if partial {
                ts.synced = None;
            } else {
                ts.force.clear();
                ts.synced = Some(view.id);
            }
            ts.last_nonce = nonce.clone();
            ts.inflight = Some(Inflight {
                seen: g.seen,
                counts: !sent.is_empty(),
            });
            if t == TypeKind::Cluster {
                // A changed cluster re-warms: send its endpoints again. Clusters added or
                // removed change which endpoints are kept: look at them all next time.
                let eds = &mut self.types[TypeKind::Endpoint as usize];
                for r in &sent {
                    if eds.sent.contains_key(&r.name) {
                        eds.force.insert(r.name.clone());
                    }
                }
                eds.synced = None;
            }
            return Some(Outgoing {
                t,
                message,
                changed: sent,
                removed,
                in_place,
            });
        }
        None
    }
}

/// The generation a response carries.
struct Generation {
    id: u64,
    seen: Instant,
}

#[cfg(test)]
mod tests;
