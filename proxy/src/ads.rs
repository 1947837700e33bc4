//! The proxy's side of ADS as a state machine without I/O (in the manner of quinn-proto): no
//! channels, no tasks, no clock of its own. [`crate::xds`] opens streams and moves messages;
//! this decides what they say.
//!
//! - [`AdsClient::open_stream`] queues the first requests of a stream: every cluster and
//!   listener (wildcard), the endpoints and routes already held by name, and (delta) the
//!   versions held, so a resync sends only what changed.
//! - [`AdsClient::handle_delta`] / [`AdsClient::handle_sotw`] take a response: translated and
//!   validated as a whole ([`crate::config`]); if any resource is refused, the response is
//!   NACKed with the errors and nothing of it is applied. An accepted response may change the
//!   subscriptions (endpoints follow the clusters, routes the listeners): those requests go
//!   before the ACK.
//! - **Warming**: the config is published ([`Event::Publish`]) once it is complete (every
//!   cluster has its endpoints, every listener its routes), or at [`AdsClient::poll_timeout`]
//!   with what there is.
//!
//! The machine outlives streams: what it holds is the last good config, kept while the control
//! plane is away.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;

use crate::config::{
    self, ASSIGNMENT_TYPE, CLUSTER_TYPE, ClusterResource, LISTENER_TYPE, ROUTES_TYPE,
};
use crate::xds::ProxyConfig;

/// A request in the stream's protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Delta(DeltaDiscoveryRequest),
    Sotw(DiscoveryRequest),
}

/// What happened, for the stream's task: status, logs, the published config.
#[derive(Debug, Clone)]
pub enum Event {
    Ack {
        type_url: String,
    },
    Nack {
        type_url: String,
        error: String,
    },
    /// The warm-up time ran out with the config still incomplete; it is published anyway.
    WarmTimeout {
        missing: Vec<String>,
    },
    /// Publish this config (`complete`: nothing it refers to is missing).
    Publish {
        config: Arc<ProxyConfig>,
        complete: bool,
    },
}

/// The proxy's ADS state machine.
pub struct AdsClient {
    node: Node,
    warm_timeout: Duration,
    /// What has been applied (published, or waiting to be while it is incomplete).
    current: ProxyConfig,
    /// Since when `current` has been incomplete and unpublished.
    pending_since: Option<Instant>,
    /// The open stream's protocol (`None`: no stream).
    delta: Option<bool>,
    /// State of the world, per type: the last accepted version and the last nonce.
    versions: HashMap<&'static str, String>,
    nonces: HashMap<&'static str, String>,
    requests: VecDeque<Request>,
    events: VecDeque<Event>,
}

/// The four types the proxy serves, by URL.
fn known(type_url: &str) -> Option<&'static str> {
    [CLUSTER_TYPE, ASSIGNMENT_TYPE, LISTENER_TYPE, ROUTES_TYPE]
        .into_iter()
        .find(|t| *t == type_url)
}

impl AdsClient {
    /// A client for `node` with nothing yet (unpublished since `now`).
    pub fn new(node: Node, warm_timeout: Duration, now: Instant) -> Self {
        Self {
            node,
            warm_timeout,
            current: ProxyConfig::default(),
            pending_since: Some(now),
            delta: None,
            versions: HashMap::new(),
            nonces: HashMap::new(),
            requests: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// The config applied so far.
    pub fn config(&self) -> &ProxyConfig {
        &self.current
    }

    /// A new stream (delta or state of the world): its first requests are queued.
    pub fn open_stream(&mut self, delta: bool) {
        self.delta = Some(delta);
        self.requests.clear();
        self.versions.clear();
        self.nonces.clear();
        let eds: Vec<String> = self.current.clusters.keys().cloned().collect();
        let rds: Vec<String> = self.current.route_names().into_iter().collect();
        if delta {
            let held = |t: &'static str| -> HashMap<String, String> {
                self.current
                    .versions
                    .get(t)
                    .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                    .unwrap_or_default()
            };
            let mut first = vec![
                subscribe(
                    CLUSTER_TYPE,
                    Vec::new(),
                    held(CLUSTER_TYPE),
                    Some(self.node.clone()),
                ),
                subscribe(LISTENER_TYPE, Vec::new(), held(LISTENER_TYPE), None),
            ];
            // (An empty first subscription would ask for everything: only with names.)
            if !eds.is_empty() {
                first.push(subscribe(ASSIGNMENT_TYPE, eds, held(ASSIGNMENT_TYPE), None));
            }
            if !rds.is_empty() {
                first.push(subscribe(ROUTES_TYPE, rds, held(ROUTES_TYPE), None));
            }
            self.requests.extend(first.into_iter().map(Request::Delta));
        } else {
            let mut first = vec![
                DiscoveryRequest {
                    node: Some(self.node.clone()),
                    type_url: CLUSTER_TYPE.into(),
                    ..Default::default()
                },
                DiscoveryRequest {
                    type_url: LISTENER_TYPE.into(),
                    ..Default::default()
                },
            ];
            for (t, names) in [(ASSIGNMENT_TYPE, eds), (ROUTES_TYPE, rds)] {
                if !names.is_empty() {
                    first.push(DiscoveryRequest {
                        type_url: t.into(),
                        resource_names: names,
                        ..Default::default()
                    });
                }
            }
            self.requests.extend(first.into_iter().map(Request::Sotw));
        }
    }

    /// The stream ended: nothing more is sent on it (the config is kept).
    pub fn close_stream(&mut self) {
        self.delta = None;
        self.requests.clear();
    }

    /// A delta response.
    pub fn handle_delta(&mut self, resp: &DeltaDiscoveryResponse, now: Instant) {
        let (follow_ups, error) = apply(&mut self.current, resp);
        // Subscriptions first, then the ACK (the server answers them together).
        self.requests
            .extend(follow_ups.into_iter().map(Request::Delta));
        self.requests
            .push_back(Request::Delta(DeltaDiscoveryRequest {
                type_url: resp.type_url.clone(),
                response_nonce: resp.nonce.clone(),
                error_detail: error.as_deref().map(nack_status),
                ..Default::default()
            }));
        self.settle(&resp.type_url, error, now);
    }

    /// A state-of-the-world response, turned into the delta form [`apply`] takes: the
    /// resources it carries, and for clusters and listeners the ones it no longer lists as
    /// removed.
    pub fn handle_sotw(&mut self, resp: &DiscoveryResponse, now: Instant) {
        let Some(t) = known(&resp.type_url) else {
            self.requests.push_back(Request::Sotw(DiscoveryRequest {
                type_url: resp.type_url.clone(),
                response_nonce: resp.nonce.clone(),
                error_detail: Some(nack_status("type not supported")),
                ..Default::default()
            }));
            return;
        };
        self.nonces.insert(t, resp.nonce.clone());
        let mut names = Vec::with_capacity(resp.resources.len());
        let mut bad = None;
        for any in &resp.resources {
            match config::resource_name(any) {
                Some(n) => names.push(n),
                None => {
                    bad = Some(format!(
                        "a resource of type {} cannot be decoded",
                        any.type_url
                    ))
                }
            }
        }
        let removed: Vec<String> = if t == CLUSTER_TYPE || t == LISTENER_TYPE {
            let present: BTreeSet<&String> = names.iter().collect();
            self.current
                .versions
                .get(t)
                .map(|held| {
                    held.keys()
                        .filter(|k| !present.contains(k))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let delta = DeltaDiscoveryResponse {
            type_url: t.to_string(),
            nonce: resp.nonce.clone(),
            removed_resources: removed,
            resources: resp
                .resources
                .iter()
                .zip(&names)
                .map(
                    |(any, name)| envoy_types::pb::envoy::service::discovery::v3::Resource {
                        name: name.clone(),
                        version: resp.version_info.clone(),
                        resource: Some(any.clone()),
                        ..Default::default()
                    },
                )
                .collect(),
            ..Default::default()
        };
        let (follow_ups, error) = match bad {
            Some(e) => (Vec::new(), Some(e)),
            None => apply(&mut self.current, &delta),
        };
        if error.is_none() {
            self.versions.insert(t, resp.version_info.clone());
        }
        // The ACK, then new name lists for the types whose subscriptions changed.
        let ack = DiscoveryRequest {
            version_info: self.versions.get(t).cloned().unwrap_or_default(),
            type_url: t.into(),
            resource_names: self.names_for(t),
            response_nonce: resp.nonce.clone(),
            error_detail: error.as_deref().map(nack_status),
            ..Default::default()
        };
        self.requests.push_back(Request::Sotw(ack));
        for f in follow_ups {
            let ft: &'static str = if f.type_url == ASSIGNMENT_TYPE {
                ASSIGNMENT_TYPE
            } else {
                ROUTES_TYPE
            };
            self.requests.push_back(Request::Sotw(DiscoveryRequest {
                version_info: self.versions.get(ft).cloned().unwrap_or_default(),
                type_url: ft.into(),
                resource_names: self.names_for(ft),
                response_nonce: self.nonces.get(ft).cloned().unwrap_or_default(),
                ..Default::default()
            }));
        }
        self.settle(t, error, now);
    }

    /// State of the world: the names subscribed to of type `t` (empty: wildcard).
    fn names_for(&self, t: &str) -> Vec<String> {
        match t {
            ASSIGNMENT_TYPE => self.current.clusters.keys().cloned().collect(),
            ROUTES_TYPE => self.current.route_names().into_iter().collect(),
            _ => Vec::new(),
        }
    }

    /// When the warm-up of an incomplete config runs out (`None`: nothing is waiting).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pending_since.map(|t| t + self.warm_timeout)
    }

    /// The time is `now`: an incomplete config whose warm-up ran out is published as it is.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.poll_timeout().is_some_and(|t| now >= t) {
            self.events.push_back(Event::WarmTimeout {
                missing: self.current.missing(),
            });
            self.publish(false);
        }
    }

    /// The next request to send on the stream.
    pub fn poll_request(&mut self) -> Option<Request> {
        self.requests.pop_front()
    }

    /// The next event for the stream's task.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// After a response: the ACK or NACK, and the config published once it is complete.
    fn settle(&mut self, type_url: &str, error: Option<String>, now: Instant) {
        match error {
            Some(error) => self.events.push_back(Event::Nack {
                type_url: type_url.to_string(),
                error,
            }),
            None => {
                self.events.push_back(Event::Ack {
                    type_url: type_url.to_string(),
                });
                if self.current.missing().is_empty() {
                    self.publish(true);
                } else if self.pending_since.is_none() {
                    self.pending_since = Some(now);
                }
            }
        }
    }

    fn publish(&mut self, complete: bool) {
        self.pending_since = None;
        self.events.push_back(Event::Publish {
            config: Arc::new(self.current.clone()),
            complete,
        });
    }
}

fn subscribe(
    t: &'static str,
    names: Vec<String>,
    initial: HashMap<String, String>,
    node: Option<Node>,
) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node,
        type_url: t.to_string(),
        resource_names_subscribe: names,
        initial_resource_versions: initial,
        ..Default::default()
    }
}

fn nack_status(message: &str) -> RpcStatus {
    RpcStatus {
        code: 3, // INVALID_ARGUMENT
        message: message.to_string(),
        details: Vec::new(),
    }
}

/// Apply one response to `cfg` if every resource in it translates. Returns the subscription
/// changes it calls for, and the NACK message if it was refused.
pub(crate) fn apply(
    cfg: &mut ProxyConfig,
    resp: &DeltaDiscoveryResponse,
) -> (Vec<DeltaDiscoveryRequest>, Option<String>) {
    let Some(t) = known(&resp.type_url) else {
        let other = &resp.type_url;
        return (Vec::new(), Some(format!("type {other} is not supported")));
    };
    let mut errors = Vec::new();
    let mut next = cfg.clone();
    let versions = next.versions.entry(t).or_default();
    for name in &resp.removed_resources {
        versions.remove(name);
    }
    for r in &resp.resources {
        let Some(any) = &r.resource else {
            errors.push(format!("{}: no resource body", r.name));
            continue;
        };
        versions.insert(r.name.clone(), r.version.clone());
        let named = |got: &str| {
            (got != r.name).then(|| format!("{}: the resource inside is named {got:?}", r.name))
        };
        match t {
            CLUSTER_TYPE => match config::cluster_resource(any) {
                Ok(ClusterResource::Eds(c)) => match named(&c.name) {
                    Some(e) => errors.push(e),
                    None => {
                        next.passthrough.remove(&c.name);
                        next.clusters.insert(c.name.clone(), Arc::new(c));
                    }
                },
                Ok(ClusterResource::OriginalDst(name)) => match named(&name) {
                    Some(e) => errors.push(e),
                    None => {
                        next.clusters.remove(&name);
                        next.passthrough.insert(name);
                    }
                },
                Err(e) => errors.push(e.to_string()),
            },
            ASSIGNMENT_TYPE => match config::assignment(any) {
                Ok(a) => match named(&a.cluster) {
                    Some(e) => errors.push(e),
                    None => {
                        next.assignments.insert(a.cluster.clone(), Arc::new(a));
                    }
                },
                Err(e) => errors.push(e.to_string()),
            },
            LISTENER_TYPE => match config::listener(any) {
                Ok(Some(l)) => match named(&l.name) {
                    Some(e) => errors.push(e),
                    None => {
                        next.listeners.insert(l.name.clone(), Arc::new(l));
                    }
                },
                Ok(None) => {}
                Err(e) => errors.push(e.to_string()),
            },
            _ => match config::route_table(any) {
                Ok(rt) => match named(&rt.name) {
                    Some(e) => errors.push(e),
                    None => {
                        next.routes.insert(rt.name.clone(), Arc::new(rt));
                    }
                },
                Err(e) => errors.push(e.to_string()),
            },
        }
    }
    if !errors.is_empty() {
        return (Vec::new(), Some(errors.join("; ")));
    }
    for name in &resp.removed_resources {
        match t {
            CLUSTER_TYPE => {
                next.clusters.remove(name);
                next.passthrough.remove(name);
            }
            ASSIGNMENT_TYPE => {
                next.assignments.remove(name);
            }
            LISTENER_TYPE => {
                next.listeners.remove(name);
            }
            _ => {
                next.routes.remove(name);
            }
        }
    }
    // Follow the clusters with endpoint subscriptions, the listeners with route ones.
    let mut follow = Vec::new();
    let diff = |old: BTreeSet<String>, new: BTreeSet<String>, t: &'static str| {
        let sub: Vec<String> = new.difference(&old).cloned().collect();
        let unsub: Vec<String> = old.difference(&new).cloned().collect();
        (!sub.is_empty() || !unsub.is_empty()).then(|| DeltaDiscoveryRequest {
            type_url: t.to_string(),
            resource_names_subscribe: sub,
            resource_names_unsubscribe: unsub,
            ..Default::default()
        })
    };
    if t == CLUSTER_TYPE {
        let old: BTreeSet<String> = cfg.clusters.keys().cloned().collect();
        let new: BTreeSet<String> = next.clusters.keys().cloned().collect();
        for gone in old.difference(&new) {
            next.assignments.remove(gone);
            if let Some(v) = next.versions.get_mut(ASSIGNMENT_TYPE) {
                v.remove(gone);
            }
        }
        follow.extend(diff(old, new, ASSIGNMENT_TYPE));
    }
    if t == LISTENER_TYPE {
        let old = cfg.route_names();
        let new = next.route_names();
        for gone in old.difference(&new) {
            next.routes.remove(gone);
            if let Some(v) = next.versions.get_mut(ROUTES_TYPE) {
                v.remove(gone);
            }
        }
        follow.extend(diff(old, new, ROUTES_TYPE));
    }
    *cfg = next;
    (follow, None)
}

#[cfg(test)]
mod tests;
