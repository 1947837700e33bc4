//! The proxy's ADS state machine driven directly: responses in, requests and events out.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::cluster::v3 as cluster;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint;
use envoy_types::pb::envoy::service::discovery::v3::Resource as DeltaResource;
use envoy_types::pb::google::protobuf::Any;
use proptest::prelude::*;
use prost::Message;

use super::*;

fn pack<M: Message>(type_url: &str, m: &M) -> Any {
    Any {
        type_url: type_url.to_string(),
        value: m.encode_to_vec(),
    }
}

/// An EDS cluster (`valid: false`: one without a discovery type, which the proxy refuses).
fn cluster_any(name: &str, valid: bool) -> Any {
    pack(
        CLUSTER_TYPE,
        &cluster::Cluster {
            name: name.into(),
            cluster_discovery_type: valid.then_some(cluster::cluster::ClusterDiscoveryType::Type(
                cluster::cluster::DiscoveryType::Eds as i32,
            )),
            ..Default::default()
        },
    )
}

fn assignment_any(name: &str) -> Any {
    pack(
        ASSIGNMENT_TYPE,
        &endpoint::ClusterLoadAssignment {
            cluster_name: name.into(),
            ..Default::default()
        },
    )
}

fn delta(
    type_url: &str,
    nonce: u32,
    resources: Vec<(&str, Any)>,
    removed: &[&str],
) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: type_url.into(),
        nonce: nonce.to_string(),
        resources: resources
            .into_iter()
            .map(|(n, any)| DeltaResource {
                name: n.into(),
                version: format!("v{nonce}"),
                resource: Some(any),
                ..Default::default()
            })
            .collect(),
        removed_resources: removed.iter().map(|r| r.to_string()).collect(),
        ..Default::default()
    }
}

fn requests(c: &mut AdsClient) -> Vec<Request> {
    std::iter::from_fn(|| c.poll_request()).collect()
}

fn events(c: &mut AdsClient) -> Vec<Event> {
    std::iter::from_fn(|| c.poll_event()).collect()
}

fn client() -> AdsClient {
    AdsClient::new(
        Node {
            id: "n".into(),
            ..Default::default()
        },
        Duration::from_secs(15),
        Instant::now(),
    )
}

fn delta_req(r: &Request) -> &DeltaDiscoveryRequest {
    match r {
        Request::Delta(d) => d,
        Request::Sotw(_) => panic!("a state-of-the-world request on a delta stream"),
    }
}

#[test]
fn a_first_stream_subscribes_to_clusters_and_listeners_with_the_node_once() {
    let mut c = client();
    c.open_stream(true);
    let r = requests(&mut c);
    assert_eq!(r.len(), 2);
    assert_eq!(delta_req(&r[0]).type_url, CLUSTER_TYPE);
    assert!(delta_req(&r[0]).node.is_some());
    assert_eq!(delta_req(&r[1]).type_url, LISTENER_TYPE);
    assert!(delta_req(&r[1]).node.is_none());
}

#[test]
fn endpoints_follow_the_clusters_before_the_ack_and_warm_up_waits_for_them() {
    let mut c = client();
    c.open_stream(true);
    requests(&mut c);
    let t0 = Instant::now();
    c.handle_delta(
        &delta(CLUSTER_TYPE, 1, vec![("a", cluster_any("a", true))], &[]),
        t0,
    );
    let r = requests(&mut c);
    assert_eq!(r.len(), 2, "{r:?}");
    let sub = delta_req(&r[0]);
    assert_eq!(sub.type_url, ASSIGNMENT_TYPE);
    assert_eq!(sub.resource_names_subscribe, ["a"]);
    let ack = delta_req(&r[1]);
    assert_eq!(ack.response_nonce, "1");
    assert!(ack.error_detail.is_none());
    let e = events(&mut c);
    assert!(
        matches!(e[..], [Event::Ack { .. }]),
        "not published while incomplete: {e:?}"
    );
    assert!(
        c.poll_timeout().is_some(),
        "a warm-up deadline while incomplete"
    );
    c.handle_delta(
        &delta(ASSIGNMENT_TYPE, 2, vec![("a", assignment_any("a"))], &[]),
        t0,
    );
    let e = events(&mut c);
    assert!(
        matches!(
            &e[..],
            [Event::Ack { .. }, Event::Publish { complete: true, .. }]
        ),
        "{e:?}"
    );
    assert_eq!(c.poll_timeout(), None);
    requests(&mut c);
    // A cluster removed: its endpoint subscription goes.
    c.handle_delta(&delta(CLUSTER_TYPE, 3, vec![], &["a"]), t0);
    let r = requests(&mut c);
    assert_eq!(delta_req(&r[0]).resource_names_unsubscribe, ["a"]);
    assert!(c.config().assignments.is_empty());
}

#[test]
fn a_refused_resource_nacks_the_whole_response_and_applies_nothing() {
    let mut c = client();
    c.open_stream(true);
    requests(&mut c);
    let now = Instant::now();
    c.handle_delta(
        &delta(
            CLUSTER_TYPE,
            1,
            vec![
                ("a", cluster_any("a", true)),
                ("b", cluster_any("b", false)),
            ],
            &[],
        ),
        now,
    );
    let r = requests(&mut c);
    assert_eq!(r.len(), 1, "no subscription for a refused response: {r:?}");
    let nack = delta_req(&r[0]);
    let detail = nack.error_detail.as_ref().expect("a NACK");
    assert!(detail.message.contains('b'), "{}", detail.message);
    assert!(c.config().clusters.is_empty());
    assert!(matches!(&events(&mut c)[..], [Event::Nack { .. }]));
}

#[test]
fn an_incomplete_config_is_published_when_its_warm_up_runs_out() {
    let mut c = client();
    c.open_stream(true);
    requests(&mut c);
    let t0 = Instant::now();
    c.handle_delta(
        &delta(CLUSTER_TYPE, 1, vec![("a", cluster_any("a", true))], &[]),
        t0,
    );
    events(&mut c);
    let due = c.poll_timeout().expect("a warm-up deadline");
    c.handle_timeout(due - Duration::from_millis(1));
    assert!(events(&mut c).is_empty(), "not before its time");
    c.handle_timeout(due);
    let e = events(&mut c);
    assert!(
        matches!(&e[..], [Event::WarmTimeout { missing }, Event::Publish { complete: false, .. }] if !missing.is_empty()),
        "{e:?}"
    );
}

#[test]
fn a_resumed_stream_names_what_it_holds() {
    let mut c = client();
    c.open_stream(true);
    requests(&mut c);
    let now = Instant::now();
    c.handle_delta(
        &delta(CLUSTER_TYPE, 1, vec![("a", cluster_any("a", true))], &[]),
        now,
    );
    c.handle_delta(
        &delta(ASSIGNMENT_TYPE, 2, vec![("a", assignment_any("a"))], &[]),
        now,
    );
    c.close_stream();
    assert!(
        c.poll_request().is_none(),
        "nothing queued for a closed stream"
    );
    c.open_stream(true);
    let r = requests(&mut c);
    let cds = delta_req(&r[0]);
    assert_eq!(
        cds.initial_resource_versions.get("a").map(String::as_str),
        Some("v1")
    );
    let eds = r
        .iter()
        .map(delta_req)
        .find(|q| q.type_url == ASSIGNMENT_TYPE)
        .unwrap();
    assert_eq!(eds.resource_names_subscribe, ["a"]);
    assert_eq!(
        eds.initial_resource_versions.get("a").map(String::as_str),
        Some("v2")
    );
}

#[test]
fn state_of_the_world_drops_what_a_response_leaves_out_and_nacks_unknown_types() {
    let mut c = client();
    c.open_stream(false);
    let first = requests(&mut c);
    assert!(matches!(&first[0], Request::Sotw(r) if r.node.is_some()));
    let sotw = |nonce: &str, names: &[&str]| DiscoveryResponse {
        type_url: CLUSTER_TYPE.into(),
        version_info: format!("v{nonce}"),
        nonce: nonce.into(),
        resources: names.iter().map(|n| cluster_any(n, true)).collect(),
        ..Default::default()
    };
    let now = Instant::now();
    c.handle_sotw(&sotw("1", &["a", "b"]), now);
    assert_eq!(c.config().clusters.len(), 2);
    let r = requests(&mut c);
    assert!(
        matches!(&r[0], Request::Sotw(ack) if ack.version_info == "v1" && ack.response_nonce == "1")
    );
    assert!(
        matches!(&r[1], Request::Sotw(eds) if eds.type_url == ASSIGNMENT_TYPE && eds.resource_names == ["a", "b"])
    );
    c.handle_sotw(&sotw("2", &["b"]), now);
    assert_eq!(c.config().clusters.keys().collect::<Vec<_>>(), ["b"]);
    requests(&mut c);
    c.handle_sotw(
        &DiscoveryResponse {
            type_url: "type.googleapis.com/example.Unknown".into(),
            nonce: "3".into(),
            ..Default::default()
        },
        now,
    );
    let r = requests(&mut c);
    assert!(matches!(&r[..], [Request::Sotw(n)] if n.error_detail.is_some()));
}

/// One response of a random run: clusters to add (name index, valid) and to remove, or the
/// endpoints of some clusters.
#[derive(Debug, Clone)]
enum Step {
    Clusters(Vec<(u8, bool)>, Vec<u8>),
    Endpoints(Vec<u8>),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (
            proptest::collection::vec((0u8..6, proptest::bool::weighted(0.85)), 0..4),
            proptest::collection::vec(0u8..6, 0..3)
        )
            .prop_map(|(a, r)| Step::Clusters(a, r)),
        proptest::collection::vec(0u8..6, 1..4).prop_map(Step::Endpoints),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Whatever the control plane sends: a response is applied whole or not at all (a NACK
    /// leaves the config as it was); the endpoint subscriptions the client asked for always
    /// name exactly the clusters it holds; every ACKed complete config is published, and what
    /// is published is what the client holds.
    #[test]
    fn responses_apply_whole_and_subscriptions_follow_the_clusters(
        steps in proptest::collection::vec(step(), 1..30),
    ) {
        let mut c = client();
        c.open_stream(true);
        requests(&mut c);
        let now = Instant::now();
        let mut subscribed: BTreeSet<String> = BTreeSet::new();
        let mut published: Option<Arc<ProxyConfig>> = None;
        for (i, s) in steps.into_iter().enumerate() {
            let nonce = u32::try_from(i + 1).unwrap();
            let before: BTreeMap<String, String> = c
                .config()
                .versions
                .get(CLUSTER_TYPE)
                .cloned()
                .unwrap_or_default();
            let before_assignments: BTreeSet<String> =
                c.config().assignments.keys().cloned().collect();
            let resp = match &s {
                Step::Clusters(add, remove) => {
                    let names: Vec<String> = add.iter().map(|(n, _)| format!("c{n}")).collect();
                    let removed: Vec<String> = remove
                        .iter()
                        .map(|n| format!("c{n}"))
                        .filter(|n| !names.contains(n))
                        .collect();
                    let removed: Vec<&str> = removed.iter().map(String::as_str).collect();
                    delta(
                        CLUSTER_TYPE,
                        nonce,
                        add.iter()
                            .zip(&names)
                            .map(|((_, ok), n)| (n.as_str(), cluster_any(n, *ok)))
                            .collect(),
                        &removed,
                    )
                }
                Step::Endpoints(of) => {
                    let names: BTreeSet<String> = of.iter().map(|n| format!("c{n}")).collect();
                    let names: Vec<&str> = names.iter().map(String::as_str).collect();
                    delta(
                        ASSIGNMENT_TYPE,
                        nonce,
                        names.iter().map(|n| (*n, assignment_any(n))).collect(),
                        &[],
                    )
                }
            };
            c.handle_delta(&resp, now);
            let reqs = requests(&mut c);
            let ack = delta_req(reqs.last().unwrap());
            prop_assert_eq!(&ack.response_nonce, &nonce.to_string());
            for r in &reqs[..reqs.len() - 1] {
                let r = delta_req(r);
                prop_assert_eq!(&r.type_url, ASSIGNMENT_TYPE);
                subscribed.extend(r.resource_names_subscribe.iter().cloned());
                for n in &r.resource_names_unsubscribe {
                    subscribed.remove(n);
                }
            }
            if ack.error_detail.is_some() {
                prop_assert!(reqs.len() == 1, "a NACKed response changes no subscription");
                let after: BTreeMap<String, String> = c
                    .config()
                    .versions
                    .get(CLUSTER_TYPE)
                    .cloned()
                    .unwrap_or_default();
                prop_assert_eq!(&after, &before, "a NACKed response changed the config");
                let after_assignments: BTreeSet<String> =
                    c.config().assignments.keys().cloned().collect();
                prop_assert_eq!(after_assignments, before_assignments);
            }
            let held: BTreeSet<String> = c.config().clusters.keys().cloned().collect();
            prop_assert_eq!(&subscribed, &held, "endpoint subscriptions do not follow the clusters");
            for e in events(&mut c) {
                if let Event::Publish { config, complete } = e {
                    prop_assert!(complete, "published incomplete before any timeout");
                    prop_assert!(config.missing().is_empty());
                    published = Some(config);
                }
            }
            if ack.error_detail.is_none() && c.config().missing().is_empty() {
                let p = published.as_ref().expect("a complete config was never published");
                prop_assert_eq!(
                    p.clusters.keys().collect::<Vec<_>>(),
                    c.config().clusters.keys().collect::<Vec<_>>()
                );
            }
        }
    }
}
