//! The ADS state machine driven directly: a model client that applies what it ACKs, a wire
//! that holds responses until the client reads them, views that change at any moment.

use std::collections::{BTreeMap, VecDeque};

use envoy_types::pb::google::protobuf::Any;
use proptest::prelude::*;

use super::*;
use crate::view::Resources;

/// A resource; like a real one, its version follows from its whole content (refs included).
fn res(t: TypeKind, name: &str, version: u32, refs: &[String]) -> Arc<Resource> {
    let version = std::iter::once(format!("v{version}"))
        .chain(refs.iter().cloned())
        .collect::<Vec<_>>()
        .join("+");
    Arc::new(Resource {
        name: name.to_string(),
        body: Any {
            type_url: t.url().to_string(),
            value: format!("{name}@{version}").into_bytes(),
        },
        version,
        refs: refs.to_vec(),
    })
}

/// A view: `clusters` (name index → version; each cluster has its endpoints under the same
/// name), listeners and routes referring to clusters of the same view.
fn view(
    clusters: &BTreeMap<u8, u32>,
    listeners: &BTreeMap<u8, u32>,
    routes: &BTreeMap<u8, u32>,
    prev: Option<&View>,
) -> Arc<View> {
    let mut types: [Resources; 4] = Default::default();
    let names: Vec<String> = clusters.keys().map(|c| format!("c{c}")).collect();
    for (c, v) in clusters {
        let n = format!("c{c}");
        types[0].insert(n.clone(), res(TypeKind::Cluster, &n, *v, &[]));
        types[1].insert(n.clone(), res(TypeKind::Endpoint, &n, *v % 3, &[]));
    }
    for (i, (l, v)) in listeners.iter().enumerate() {
        let n = format!("l{l}");
        let refs: Vec<String> = names.iter().skip(i).take(2).cloned().collect();
        types[2].insert(n.clone(), res(TypeKind::Listener, &n, *v, &refs));
    }
    for (i, (r, v)) in routes.iter().enumerate() {
        let n = format!("r{r}");
        let refs: Vec<String> = names.iter().rev().skip(i).take(2).cloned().collect();
        types[3].insert(n.clone(), res(TypeKind::Route, &n, *v, &refs));
    }
    Arc::new(View::of(types, prev))
}

/// A response on the wire: its type, nonce, and content.
struct Sent {
    t: TypeKind,
    nonce: String,
    /// Delta: (name, version) updated and names removed. SotW: the whole set.
    updated: Vec<(String, String)>,
    removed: Vec<String>,
    whole: bool,
}

fn on_wire(out: Outgoing) -> Sent {
    match out.message {
        Message::Delta(m) => Sent {
            t: out.t,
            nonce: m.nonce,
            updated: m
                .resources
                .into_iter()
                .map(|r| (r.name, r.version))
                .collect(),
            removed: m.removed_resources,
            whole: false,
        },
        Message::Sotw(m) => Sent {
            t: out.t,
            nonce: m.nonce,
            updated: m
                .resources
                .into_iter()
                .map(|a| {
                    let text = String::from_utf8(a.value).unwrap();
                    let (name, v) = text.split_once('@').unwrap();
                    (name.to_string(), v.to_string())
                })
                .collect(),
            removed: Vec::new(),
            whole: true,
        },
    }
}

/// A client of the protocol: what it holds (name → version), per type; and, per type and
/// name, what it last rejected.
#[derive(Default)]
struct Client {
    held: [BTreeMap<String, String>; 4],
    /// The content of a NACKed response not since superseded by an ACKed one (`None`: a
    /// removal).
    rejected: [BTreeMap<String, Option<String>>; 4],
}

impl Client {
    /// Read `s` and answer it: apply and ACK, or NACK.
    fn answer(&mut self, s: &Sent, ack: bool, delta: bool) -> Req {
        let t = s.t as usize;
        if ack {
            if s.whole {
                self.held[t] = s.updated.iter().cloned().collect();
                self.rejected[t].clear();
            } else {
                for (n, v) in &s.updated {
                    self.held[t].insert(n.clone(), v.clone());
                    self.rejected[t].remove(n);
                }
                for n in &s.removed {
                    self.held[t].remove(n);
                    self.rejected[t].remove(n);
                }
            }
        } else if s.whole {
            // The whole set was rejected: every name of it, and every name it leaves out.
            let names: BTreeSet<String> = s
                .updated
                .iter()
                .map(|(n, _)| n.clone())
                .chain(self.held[t].keys().cloned())
                .collect();
            self.rejected[t] = names
                .into_iter()
                .map(|n| {
                    let v = s
                        .updated
                        .iter()
                        .find(|(m, _)| *m == n)
                        .map(|(_, v)| v.clone());
                    (n, v)
                })
                .collect();
        } else {
            for (n, v) in &s.updated {
                self.rejected[t].insert(n.clone(), Some(v.clone()));
            }
            for n in &s.removed {
                self.rejected[t].insert(n.clone(), None);
            }
        }
        Req {
            node: None,
            type_url: s.t.url().to_string(),
            nonce: s.nonce.clone(),
            error: (!ack).then(|| "rejected".to_string()),
            names: (!delta).then(|| vec!["*".to_string()]),
            subscribe: Vec::new(),
            unsubscribe: Vec::new(),
            initial_versions: HashMap::new(),
        }
    }
}

fn subscribe(t: TypeKind, delta: bool) -> Req {
    Req {
        node: None,
        type_url: t.url().to_string(),
        nonce: String::new(),
        error: None,
        names: (!delta).then(|| vec!["*".to_string()]),
        subscribe: if delta {
            vec!["*".to_string()]
        } else {
            Vec::new()
        },
        unsubscribe: Vec::new(),
        initial_versions: HashMap::new(),
    }
}

/// A stream: the session, a client, and the responses between them.
struct Stream {
    session: AdsSession,
    client: Client,
    wire: VecDeque<Sent>,
    delta: bool,
    events: Vec<Event>,
}

impl Stream {
    fn new(delta: bool, budget: usize) -> Self {
        let mut session = AdsSession::new(delta, budget);
        for t in ORDER {
            assert!(session.handle(subscribe(t, delta)).is_none());
        }
        Self {
            session,
            client: Client::default(),
            wire: VecDeque::new(),
            delta,
            events: Vec::new(),
        }
    }

    /// Everything the session has to send goes on the wire.
    fn pump(&mut self) -> usize {
        let mut n = 0;
        while let Some(out) = self.session.poll_response() {
            self.wire.push_back(on_wire(out));
            n += 1;
            assert!(n < 1000, "the session never stops sending");
        }
        n
    }

    /// The client reads the oldest response and answers it.
    fn deliver(&mut self, ack: bool) -> bool {
        let Some(s) = self.wire.pop_front() else {
            return false;
        };
        let req = self.client.answer(&s, ack, self.delta);
        if let Some(e) = self.session.handle(req) {
            self.events.push(e);
        }
        true
    }

    /// Until nothing more is sent, the client ACKing everything.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            self.pump();
            if !self.deliver(true) {
                return;
            }
        }
        panic!("the stream never settled");
    }

    /// The client holds the latest view, except content it rejected (which must then be the
    /// latest: rejected content is not sent again until it changes) and clusters (with their
    /// endpoints) that listeners or routes it holds still refer to (make-before-break).
    fn check(&self, latest: &View) {
        // The clusters the client's listeners and routes refer to (a version carries its
        // resource's references).
        let referred: BTreeSet<&str> = [TypeKind::Listener, TypeKind::Route]
            .into_iter()
            .flat_map(|t| self.client.held[t as usize].values())
            .flat_map(|v| v.split('+').skip(1))
            .collect();
        for t in ORDER {
            let want: BTreeMap<String, String> = latest
                .get(t)
                .iter()
                .map(|(n, r)| (n.clone(), r.version.clone()))
                .collect();
            let held = &self.client.held[t as usize];
            let rejected = &self.client.rejected[t as usize];
            let names: BTreeSet<&String> = want.keys().chain(held.keys()).collect();
            let may_keep = |n: &str| {
                matches!(t, TypeKind::Cluster | TypeKind::Endpoint) && referred.contains(n)
            };
            for n in names {
                match (want.get(n), rejected.get(n)) {
                    (Some(v), Some(r)) => assert_eq!(
                        r.as_ref(),
                        Some(v),
                        "{} {n}: the client rejected content that is not the latest, and the latest never came",
                        t.short()
                    ),
                    (Some(v), None) => assert_eq!(
                        held.get(n),
                        Some(v),
                        "{} {n}: the client does not hold the latest content",
                        t.short()
                    ),
                    (None, Some(None)) => {}
                    (None, Some(Some(_))) => assert!(
                        may_keep(n),
                        "{} {n}: rejected content of a resource gone from the view, not kept for anything",
                        t.short()
                    ),
                    (None, None) => assert!(
                        !held.contains_key(n) || may_keep(n),
                        "{} {n}: the client still holds a resource gone from the view (held {:?})",
                        t.short(),
                        self.client.held
                    ),
                }
            }
        }
    }
}

fn one_view() -> (BTreeMap<u8, u32>, BTreeMap<u8, u32>, BTreeMap<u8, u32>) {
    (
        [(0, 1), (1, 1), (2, 1)].into(),
        [(0, 1)].into(),
        [(0, 1)].into(),
    )
}

#[test]
fn a_new_client_gets_every_type_in_order_and_acks_converge() {
    for delta in [false, true] {
        let mut s = Stream::new(delta, 1 << 20);
        assert!(s.session.poll_response().is_none(), "nothing before a view");
        let (c, l, r) = one_view();
        let v = view(&c, &l, &r, None);
        s.session.set_view(1, Instant::now(), v.clone());
        s.pump();
        let order: Vec<TypeKind> = s.wire.iter().map(|w| w.t).collect();
        assert_eq!(order, ORDER.to_vec(), "CDS, EDS, LDS, RDS");
        assert_eq!(s.pump(), 0, "one response in flight per type");
        s.settle();
        s.check(&v);
        assert!(
            s.events.iter().all(|e| matches!(e, Event::Ack { .. })),
            "{:?}",
            s.events
        );
    }
}

#[test]
fn delta_sends_only_what_changed_and_a_changed_clusters_endpoints_again() {
    let mut s = Stream::new(true, 1 << 20);
    let (mut c, l, r) = one_view();
    let v1 = view(&c, &l, &r, None);
    s.session.set_view(1, Instant::now(), v1.clone());
    s.settle();
    c.insert(1, 7);
    let v2 = view(&c, &l, &r, Some(&v1));
    s.session.set_view(2, Instant::now(), v2.clone());
    s.pump();
    let cds = s.wire.pop_front().unwrap();
    assert_eq!(cds.t, TypeKind::Cluster);
    assert_eq!(cds.updated, vec![("c1".to_string(), "v7".to_string())]);
    let ack = s.client.answer(&cds, true, true);
    s.session.handle(ack);
    s.pump();
    let eds = s.wire.pop_front().unwrap();
    assert_eq!(eds.t, TypeKind::Endpoint);
    assert_eq!(
        eds.updated
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>(),
        ["c1"],
        "the changed cluster's endpoints are sent again, unchanged ones are not"
    );
    s.settle();
    s.check(&v2);
}

#[test]
fn a_nack_keeps_the_last_good_config_and_is_not_resent_until_content_changes() {
    for delta in [false, true] {
        let mut s = Stream::new(delta, 1 << 20);
        let (mut c, l, r) = one_view();
        let v1 = view(&c, &l, &r, None);
        s.session.set_view(1, Instant::now(), v1.clone());
        s.settle();
        c.insert(2, 9);
        let v2 = view(&c, &l, &r, Some(&v1));
        s.session.set_view(2, Instant::now(), v2.clone());
        s.pump();
        assert_eq!(s.wire.front().map(|w| w.t), Some(TypeKind::Cluster));
        s.deliver(false);
        assert!(
            matches!(
                s.events.last(),
                Some(Event::Nack {
                    t: TypeKind::Cluster,
                    ..
                })
            ),
            "{:?}",
            s.events
        );
        assert_eq!(s.client.held[0].get("c2").map(String::as_str), Some("v1"));
        // The rejected cluster is not sent again; its endpoints still follow.
        s.settle();
        assert_eq!(s.client.held[0].get("c2").map(String::as_str), Some("v1"));
        s.check(&v2);
        // New content: sent.
        c.insert(2, 10);
        let v3 = view(&c, &l, &r, Some(&v2));
        s.session.set_view(3, Instant::now(), v3.clone());
        s.settle();
        assert_eq!(s.client.held[0].get("c2").map(String::as_str), Some("v10"));
        s.check(&v3);
    }
}

#[test]
fn a_stale_nonce_is_ignored() {
    let mut s = Stream::new(false, 1 << 20);
    let (mut c, l, r) = one_view();
    let v1 = view(&c, &l, &r, None);
    s.session.set_view(1, Instant::now(), v1.clone());
    s.pump();
    let first_cds = s.wire.pop_front().unwrap();
    let stale = Req {
        nonce: "999".into(),
        ..subscribe(TypeKind::Cluster, false)
    };
    assert!(matches!(
        s.session.handle(stale),
        Some(Event::StaleNonce {
            t: TypeKind::Cluster,
            ..
        })
    ));
    assert_eq!(s.pump(), 0, "a stale request changes nothing");
    let ack = s.client.answer(&first_cds, true, false);
    assert!(matches!(s.session.handle(ack), Some(Event::Ack { .. })));
    c.insert(0, 5);
    let v2 = view(&c, &l, &r, Some(&v1));
    s.session.set_view(2, Instant::now(), v2.clone());
    s.settle();
    s.check(&v2);
}

#[test]
fn a_large_delta_update_goes_in_parts_and_holds_back_later_types() {
    let mut s = Stream::new(true, 1);
    let (c, l, r) = one_view();
    let v = view(&c, &l, &r, None);
    s.session.set_view(1, Instant::now(), v.clone());
    s.pump();
    assert_eq!(
        s.wire.len(),
        1,
        "one part, and nothing else until it is acknowledged"
    );
    assert_eq!(s.wire[0].t, TypeKind::Cluster);
    assert_eq!(s.wire[0].updated.len(), 1);
    s.deliver(true);
    s.pump();
    assert_eq!(s.wire.len(), 1);
    assert_eq!(
        s.wire[0].t,
        TypeKind::Cluster,
        "the second part before any EDS"
    );
    s.settle();
    s.check(&v);
}

#[test]
fn unknown_types_are_reported() {
    let mut s = AdsSession::new(true, 1024);
    let req = Req {
        type_url: "type.googleapis.com/example.Unknown".into(),
        ..subscribe(TypeKind::Cluster, true)
    };
    assert_eq!(
        s.handle(req),
        Some(Event::UnknownType(
            "type.googleapis.com/example.Unknown".into()
        ))
    );
}

/// One step of a random run.
#[derive(Debug, Clone)]
enum Op {
    /// The view changes: these clusters, listeners and routes (index → version).
    View(BTreeMap<u8, u32>, BTreeMap<u8, u32>, BTreeMap<u8, u32>),
    /// The session sends what it has.
    Pump,
    /// The client reads the oldest response: ACK (`true`) or NACK.
    Deliver(bool),
}

fn op() -> impl Strategy<Value = Op> {
    let set = || proptest::collection::btree_map(0u8..5, 0u32..3, 0..5);
    prop_oneof![
        2 => (set(), proptest::collection::btree_map(0u8..3, 0u32..3, 0..3),
              proptest::collection::btree_map(0u8..3, 0u32..3, 0..3))
            .prop_map(|(c, l, r)| Op::View(c, l, r)),
        3 => Just(Op::Pump),
        4 => any::<bool>().prop_map(Op::Deliver),
        2 => Just(Op::Deliver(true)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Any interleaving of view changes, sends, ACKs and NACKs, in either protocol and with
    /// or without parts, ends (once the client ACKs what comes) with the client holding the
    /// latest view, or, for content it rejected, that content being the latest.
    #[test]
    fn any_interleaving_ends_with_the_latest_view(
        delta in any::<bool>(),
        small in any::<bool>(),
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        let mut s = Stream::new(delta, if small { 150 } else { 1 << 20 });
        let mut latest: Option<Arc<View>> = None;
        let mut generation = 0;
        for op in ops {
            match op {
                Op::View(c, l, r) => {
                    let v = view(&c, &l, &r, latest.as_deref());
                    generation += 1;
                    s.session.set_view(generation, Instant::now(), v.clone());
                    latest = Some(v);
                }
                Op::Pump => {
                    s.pump();
                }
                Op::Deliver(ack) => {
                    s.deliver(ack);
                }
            }
        }
        s.settle();
        if let Some(v) = &latest {
            s.check(v);
        }
    }
}

/// Found by the property test (with a generator whose resources kept their version when their
/// references changed): a listener removed after a NACK of the clusters it kept.
#[test]
fn a_listener_removed_after_a_nack_releases_its_clusters() {
    let mut s = Stream::new(false, 1 << 20);
    let v1 = view(&[(0, 0)].into(), &[(0, 0)].into(), &[(1, 0)].into(), None);
    s.session.set_view(1, Instant::now(), v1.clone());
    s.pump();
    s.deliver(false);
    s.deliver(false);
    s.deliver(true);
    let v2 = view(&[(1, 0)].into(), &[].into(), &[(1, 0)].into(), Some(&v1));
    s.session.set_view(2, Instant::now(), v2.clone());
    s.settle();
    s.check(&v2);
}
