//! The proxy's configuration model against what Strait's control plane actually sends: every
//! resource of an Envoy view (local and tunnelled endpoints, outbound listener and routes)
//! translates faithfully; a gRPC view's `api_listener`s are accepted and ignored; and bad
//! resources are refused with an error naming the resource and the field.

use std::net::SocketAddr;
use std::sync::Arc;

use controlplane::resources::ClientKind;
use controlplane::view::{TypeKind, ViewKey, ViewSettings, build};
use envoy_types::pb::envoy::config::cluster::v3 as cluster;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use envoy_types::util::pack_any;
use federation::discovery::DiscoveryFile;
use federation::model::{ClusterId, Labels, Locality};
use federation::registry::Snapshot;
use prost::Message;
use proxy::config::{
    self, ConfigError, EndpointHealth, LbPolicy, ListenerKind, RouteSource, RouteTarget, Upstream,
};

const EAST: &str = "cluster: east\nregion: us-east\nservices:\n  - name: echo\n    ports: [{name: http, port: 8080, protocol: http}, {name: grpc, port: 9090, protocol: grpc}]\n    endpoints:\n      - {address: 10.0.0.1, port: 8080, zone: us-east-1a}\n      - {address: 10.0.0.2, port: 8080, zone: us-east-1b, health: unhealthy}\n";
const WEST: &str = "cluster: west\nregion: us-west\nservices:\n  - name: echo\n    ports: [{name: http, port: 8080, protocol: http}, {name: grpc, port: 9090, protocol: grpc}]\n    endpoints:\n      - {address: 10.1.0.1, port: 8080, zone: us-west-1a}\n";

fn snapshot() -> Snapshot {
    let mut snap = Snapshot::default();
    for text in [EAST, WEST] {
        let file = DiscoveryFile::parse("test.yaml", text).unwrap();
        for se in file.state.services {
            snap.endpoints.insert(
                (se.service.key.clone(), file.state.cluster.id.clone()),
                Arc::new(se),
            );
        }
    }
    snap
}

fn key(kind: ClientKind) -> ViewKey {
    ViewKey {
        kind,
        locality: Locality::parse("l", "us-east/us-east-1a").unwrap(),
        labels: Labels::default(),
        outbound: Some("127.0.0.1:15001".parse().unwrap()),
        transparent: None,
        tunnel: true,
        mtls: false,
    }
}

fn settings() -> ViewSettings {
    ViewSettings {
        cluster: ClusterId::parse("c", "east").unwrap(),
        region: "us-east".into(),
        gateway: true,
    }
}

#[test]
fn everything_an_envoy_view_holds_translates() {
    let view = build(&snapshot(), &key(ClientKind::Envoy), &settings());

    let clusters: Vec<config::ClusterConfig> = view
        .get(TypeKind::Cluster)
        .values()
        .map(|r| config::cluster(&r.body).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    assert_eq!(clusters.len(), 2);
    let http = clusters
        .iter()
        .find(|c| c.name == "echo.default:8080")
        .unwrap();
    assert!(http.tunnel && !http.http2);
    assert_eq!(http.lb, LbPolicy::RoundRobin);
    assert!(http.outlier.is_some(), "outlier detection carried over");
    // The retry budget: never more retries than requests in flight, at least 32 retries.
    let t = http.thresholds;
    assert_eq!(
        t.retry_budget,
        Some(config::RetryBudget {
            percent_x100: 10_000,
            min_concurrency: 32
        })
    );
    assert!(t.retry_allowed(10, 31) && !t.retry_allowed(10, 32));
    assert!(t.retry_allowed(100, 99) && !t.retry_allowed(100, 100));
    // Without a budget, Envoy's `max_retries` (3) in flight.
    let plain = config::Thresholds::default();
    assert!(plain.retry_allowed(1000, 2) && !plain.retry_allowed(1000, 3));
    let grpc = clusters
        .iter()
        .find(|c| c.name == "echo.default:9090")
        .unwrap();
    assert!(grpc.http2, "gRPC ports speak HTTP/2 upstream");

    let a = config::assignment(&view.get(TypeKind::Endpoint)["echo.default:8080"].body)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(a.cluster, "echo.default:8080");
    assert_eq!(a.overprovisioning, 140);
    // Priority 0: the caller's zone, directly; then the rest of east; then west, tunnelled.
    let p0: Vec<&Upstream> = a.priorities[0]
        .iter()
        .flat_map(|l| &l.endpoints)
        .map(|e| &e.upstream)
        .collect();
    assert_eq!(
        p0,
        vec![&Upstream::Direct(
            "10.0.0.1:8080".parse::<SocketAddr>().unwrap()
        )]
    );
    let tunnelled: Vec<&config::EndpointConfig> = a
        .priorities
        .iter()
        .flatten()
        .flat_map(|l| &l.endpoints)
        .filter(|e| matches!(e.upstream, Upstream::Tunnel { .. }))
        .collect();
    assert_eq!(tunnelled.len(), 1, "{a:?}");
    assert_eq!(
        tunnelled[0].upstream,
        Upstream::Tunnel {
            cluster: "west".into(),
            authority: "echo.default:8080".into(),
            // West's endpoint by its own address: the sidecar chooses it, west's gateway
            // connects to it.
            endpoint: Some("10.1.0.1:8080".parse().unwrap()),
        }
    );
    // An endpoint name that is not ADDRESS:PORT is refused, naming the field.
    let mut cla = endpoint::ClusterLoadAssignment::decode(
        view.get(TypeKind::Endpoint)["echo.default:8080"]
            .body
            .value
            .as_slice(),
    )
    .unwrap();
    let tunnelled = cla
        .endpoints
        .iter_mut()
        .flat_map(|l| &mut l.lb_endpoints)
        .find_map(|e| e.metadata.as_mut()?.filter_metadata.get_mut("strait"))
        .expect("a tunnelled endpoint's metadata");
    tunnelled.fields.insert(
        "endpoint".into(),
        envoy_types::pb::google::protobuf::Value {
            kind: Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(
                "10.1.0.1".into(),
            )),
        },
    );
    let e = err(config::assignment(&pack_any(cla)));
    assert!(
        e.contains("metadata.filter_metadata.strait.endpoint") && e.contains("not ADDRESS:PORT"),
        "{e}"
    );
    assert!(
        a.priorities
            .iter()
            .flatten()
            .flat_map(|l| &l.endpoints)
            .all(|e| e.health == EndpointHealth::Healthy),
        "the unhealthy endpoint is not sent"
    );

    let listeners: Vec<config::ListenerConfig> = view
        .get(TypeKind::Listener)
        .values()
        .filter_map(|r| config::listener(&r.body).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    assert_eq!(listeners.len(), 1);
    assert_eq!(listeners[0].address, "127.0.0.1:15001".parse().unwrap());
    let ListenerKind::Http {
        routes: RouteSource::Rds(name),
    } = &listeners[0].kind
    else {
        panic!("{:?}", listeners[0].kind)
    };
    let table = config::route_table(&view.get(TypeKind::Route)[name].body)
        .unwrap_or_else(|e| panic!("{e}"));
    let headers = http::HeaderMap::new();
    for host in [
        "echo.default",
        "echo.default:8080",
        "ECHO.default.svc.clusterset.local",
        "echo.default.svc.cluster.local:8080",
    ] {
        let r = table
            .route(host, "/anything?x=1", &headers)
            .unwrap_or_else(|| panic!("no route for {host}"));
        assert_eq!(
            r.target,
            RouteTarget::Cluster("echo.default:8080".into()),
            "{host}"
        );
        let retry = r.retry.as_ref().expect("a retry policy");
        assert!(retry.other_priority && retry.other_host && retry.on.connect_failure);
    }
    assert_eq!(
        table
            .route("echo.default:9090", "/", &headers)
            .map(|r| &r.target),
        Some(&RouteTarget::Cluster("echo.default:9090".into()))
    );
    assert!(table.route("other.default", "/", &headers).is_none());
}

/// East's first endpoint behind a sidecar, for a proxy with a workload certificate: the
/// cluster's mutual-TLS match (east's workload identities, the port's ALPN) and the endpoint's
/// socket-match entries translate, and the balancer puts that endpoint — and only it — under
/// the match. Broken matches are refused naming the field.
#[test]
fn sidecar_endpoints_get_mutual_tls_and_broken_matches_are_refused() {
    let mut snap = Snapshot::default();
    let east = EAST.replace(
        "zone: us-east-1a}",
        "zone: us-east-1a, labels: {strait.io/tls-mode: mutual}}",
    );
    for text in [east.as_str(), WEST] {
        let file = DiscoveryFile::parse("test.yaml", text).unwrap();
        for se in file.state.services {
            snap.endpoints.insert(
                (se.service.key.clone(), file.state.cluster.id.clone()),
                Arc::new(se),
            );
        }
    }
    let with_cert = ViewKey {
        mtls: true,
        ..key(ClientKind::Envoy)
    };
    let view = build(&snap, &with_cert, &settings());
    let cds = |name: &str| view.get(TypeKind::Cluster)[name].body.clone();
    let http = config::cluster(&cds("echo.default:8080")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(http.tls_matches.len(), 1, "{http:?}");
    let m = &http.tls_matches[0];
    assert_eq!(m.name, "strait_mutual_tls/east");
    assert_eq!(
        m.criteria,
        vec![
            ("strait.io/cluster".to_string(), "east".to_string()),
            ("strait.io/tls-mode".to_string(), "mutual".to_string()),
        ]
    );
    let tls = m.tls.as_ref().expect("mutual TLS");
    assert_eq!(tls.alpn, vec![b"http/1.1".to_vec()]);
    assert!(
        matches!(&tls.san[..], [config::SanMatch::Regex(r)] if r.contains("/cluster/east/ns/")),
        "{tls:?}"
    );
    let grpc = config::cluster(&cds("echo.default:9090")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        grpc.tls_matches[0].tls.as_ref().map(|t| t.alpn.clone()),
        Some(vec![b"h2".to_vec()])
    );
    let a = config::assignment(&view.get(TypeKind::Endpoint)["echo.default:8080"].body)
        .unwrap_or_else(|e| panic!("{e}"));
    let b = proxy::lb::Balancer::new(&http, &a, None);
    let under: Vec<(String, Option<usize>)> = b
        .hosts()
        .iter()
        .map(|h| (format!("{:?}", h.upstream), h.socket))
        .collect();
    assert!(
        under.contains(&("Direct(10.0.0.1:8080)".to_string(), Some(0))),
        "{under:?}"
    );
    assert!(
        under.iter().filter(|(_, s)| s.is_some()).count() == 1,
        "only the sidecar endpoint is under the match: {under:?}"
    );

    // Broken matches: a socket the proxy does not have, inline certificates, a bad regex.
    use envoy_types::pb::envoy::config::core::v3 as core;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tlsv3;
    let raw = envoy_types::pb::envoy::config::cluster::v3::Cluster::decode(
        cds("echo.default:8080").value.as_slice(),
    )
    .unwrap();
    let with_socket = |ts: core::TransportSocket| {
        let mut c = raw.clone();
        c.transport_socket_matches[0].transport_socket = Some(ts);
        pack_any(c)
    };
    let e = err(config::cluster(&with_socket(core::TransportSocket {
        name: "envoy.transport_sockets.alts".into(),
        config_type: None,
    })));
    assert!(
        e.contains("transport_socket_matches[0].transport_socket: envoy.transport_sockets.alts is not supported"),
        "{e}"
    );
    let tls_socket = |ctx: tlsv3::UpstreamTlsContext| core::TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(core::transport_socket::ConfigType::TypedConfig(pack_any(
            ctx,
        ))),
    };
    let original = match &raw.transport_socket_matches[0].transport_socket {
        Some(core::TransportSocket {
            config_type: Some(core::transport_socket::ConfigType::TypedConfig(a)),
            ..
        }) => tlsv3::UpstreamTlsContext::decode(a.value.as_slice()).unwrap(),
        other => panic!("{other:?}"),
    };
    let mut inline = original.clone();
    if let Some(c) = inline.common_tls_context.as_mut() {
        c.tls_certificates.push(tlsv3::TlsCertificate::default());
    }
    let e = err(config::cluster(&with_socket(tls_socket(inline))));
    assert!(
        e.contains("tls_certificates: inline certificates are not supported"),
        "{e}"
    );
    let mut bad_regex = original.clone();
    let text = format!("{bad_regex:?}");
    assert!(
        text.contains("safe_regex") || text.contains("SafeRegex"),
        "{text}"
    );
    if let Some(tlsv3::common_tls_context::ValidationContextType::CombinedValidationContext(v)) =
        bad_regex
            .common_tls_context
            .as_mut()
            .and_then(|c| c.validation_context_type.as_mut())
        && let Some(d) = v.default_validation_context.as_mut()
    {
        d.match_typed_subject_alt_names[0].matcher = Some(
            envoy_types::pb::envoy::r#type::matcher::v3::StringMatcher {
                match_pattern: Some(
                    envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern::SafeRegex(
                        envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher {
                            regex: "spiffe://(".into(),
                            ..Default::default()
                        },
                    ),
                ),
                ..Default::default()
            },
        );
    }
    let e = err(config::cluster(&with_socket(tls_socket(bad_regex))));
    assert!(e.contains("matcher.safe_regex"), "{e}");
    let mut tls12 = original;
    if let Some(c) = tls12.common_tls_context.as_mut() {
        c.tls_params = Some(tlsv3::TlsParameters {
            tls_maximum_protocol_version: tlsv3::tls_parameters::TlsProtocol::TlSv12 as i32,
            ..Default::default()
        });
    }
    let e = err(config::cluster(&with_socket(tls_socket(tls12))));
    assert!(e.contains("TLS 1.3 only"), "{e}");

    // A proxy without a certificate never gets the sidecar endpoint.
    let plain = build(&snap, &key(ClientKind::Envoy), &settings());
    let a = config::assignment(&plain.get(TypeKind::Endpoint)["echo.default:8080"].body)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!format!("{a:?}").contains("10.0.0.1"), "{a:?}");
}

#[test]
fn grpc_api_listeners_are_accepted_and_ignored() {
    let view = build(&snapshot(), &key(ClientKind::Grpc), &settings());
    assert!(!view.get(TypeKind::Listener).is_empty());
    for r in view.get(TypeKind::Listener).values() {
        assert!(
            config::listener(&r.body)
                .unwrap_or_else(|e| panic!("{e}"))
                .is_none()
        );
    }
}

/// The transparent listener and the passthrough cluster the control plane describes for a
/// node with `STRAIT_TRANSPARENT` translate to the proxy's transparent mode; a transparent
/// listener with another chain, or a listener filter the proxy cannot run, is refused.
#[test]
fn a_transparent_listener_and_its_passthrough_cluster_translate() {
    use envoy_types::pb::envoy::config::listener::v3 as listener;
    let mut k = key(ClientKind::Envoy);
    k.transparent = Some("127.0.0.1:15006".parse().unwrap());
    let view = build(&snapshot(), &k, &settings());
    let l = view
        .get(TypeKind::Listener)
        .get("strait_transparent")
        .unwrap();
    let l = config::listener(&l.body).unwrap().unwrap();
    assert_eq!(l.address, "127.0.0.1:15006".parse::<SocketAddr>().unwrap());
    match &l.kind {
        ListenerKind::Transparent { fallback } => assert_eq!(fallback, "PassthroughCluster"),
        other => panic!("{other:?}"),
    }
    let c = view
        .get(TypeKind::Cluster)
        .get("PassthroughCluster")
        .unwrap();
    assert_eq!(
        config::cluster_resource(&c.body).unwrap(),
        config::ClusterResource::OriginalDst("PassthroughCluster".into())
    );
    // An EDS cluster stays one.
    let any = pack_any(eds_cluster("a"));
    assert!(matches!(
        config::cluster_resource(&any),
        Ok(config::ClusterResource::Eds(c)) if c.name == "a"
    ));
    // ORIGINAL_DST without CLUSTER_PROVIDED, or with endpoints of its own.
    let mut od = controlplane::resources::passthrough_cluster();
    od.lb_policy = cluster::cluster::LbPolicy::RoundRobin as i32;
    let e = err(config::cluster_resource(&pack_any(od)));
    assert!(
        e.contains("PassthroughCluster") && e.contains("CLUSTER_PROVIDED"),
        "{e}"
    );
    let mut od = controlplane::resources::passthrough_cluster();
    od.load_assignment = Some(endpoint::ClusterLoadAssignment::default());
    let e = err(config::cluster_resource(&pack_any(od)));
    assert!(e.contains("load_assignment"), "{e}");

    // use_original_dst on an HTTP listener; a listener filter on any listener.
    let base = controlplane::resources::transparent_listener("127.0.0.1:15006".parse().unwrap());
    let outbound = controlplane::resources::outbound_listener("127.0.0.1:15001".parse().unwrap());
    let mut http = outbound.clone();
    http.use_original_dst = base.use_original_dst;
    let e = err(config::listener(&pack_any(http)));
    assert!(
        e.contains("use_original_dst") && e.contains("TcpProxy"),
        "{e}"
    );
    let mut filtered = outbound;
    filtered.listener_filters = base.listener_filters.clone();
    let e = err(config::listener(&pack_any(filtered)));
    assert!(
        e.contains("strait_outbound_http") && e.contains("listener_filters[0]"),
        "{e}"
    );
    let mut other = base;
    other.listener_filters.push(listener::ListenerFilter {
        name: "envoy.filters.listener.tls_inspector".into(),
        ..Default::default()
    });
    let e = err(config::listener(&pack_any(other)));
    assert!(
        e.contains("listener_filters[1]") && e.contains("tls_inspector"),
        "{e}"
    );
}

fn eds_cluster(name: &str) -> cluster::Cluster {
    cluster::Cluster {
        name: name.into(),
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::Eds as i32,
        )),
        ..Default::default()
    }
}

fn err(r: Result<impl std::fmt::Debug, ConfigError>) -> String {
    match r {
        Ok(v) => panic!("accepted: {v:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_resources_are_refused_naming_resource_and_field() {
    // Wrong type, garbage.
    let any = pack_any(eds_cluster("a"));
    assert!(err(config::assignment(&any)).contains("type_url"));
    let garbage = Any {
        type_url: config::CLUSTER_TYPE.into(),
        value: vec![0xff, 0xff, 0xff],
    };
    assert!(err(config::cluster(&garbage)).contains("(encoding)"));

    // Clusters.
    let mut c = eds_cluster("web");
    c.cluster_discovery_type = Some(cluster::cluster::ClusterDiscoveryType::Type(
        cluster::cluster::DiscoveryType::Static as i32,
    ));
    let e = err(config::cluster(&pack_any(c)));
    assert!(e.contains("cluster \"web\": type: only EDS"), "{e}");
    let mut c = eds_cluster("web");
    c.lb_policy = cluster::cluster::LbPolicy::Maglev as i32;
    let e = err(config::cluster(&pack_any(c)));
    assert!(e.contains("lb_policy: MAGLEV is not supported"), "{e}");
    let ok = config::cluster(&pack_any(eds_cluster("web"))).unwrap();
    assert_eq!(ok.lb, LbPolicy::RoundRobin);
    assert!(!ok.tunnel && ok.outlier.is_none());

    // Load assignments: levels must be dense, weights positive.
    let cla = endpoint::ClusterLoadAssignment {
        cluster_name: "web".into(),
        endpoints: vec![endpoint::LocalityLbEndpoints {
            priority: 1,
            ..Default::default()
        }],
        ..Default::default()
    };
    let e = err(config::assignment(&pack_any(cla)));
    assert!(e.contains("priority 0 is empty"), "{e}");
    let cla = endpoint::ClusterLoadAssignment {
        cluster_name: "web".into(),
        endpoints: vec![endpoint::LocalityLbEndpoints {
            lb_endpoints: vec![endpoint::LbEndpoint {
                load_balancing_weight: Some(UInt32Value { value: 0 }),
                host_identifier: Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(
                    endpoint::Endpoint::default(),
                )),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let e = err(config::assignment(&pack_any(cla)));
    assert!(
        e.contains("endpoints[0].lb_endpoints[0].endpoint.address: missing"),
        "{e}"
    );

    // Routes: a bad regex, an unknown retry condition, duplicate domains.
    let rc = |r: route::Route, domains: Vec<&str>| route::RouteConfiguration {
        name: "rt".into(),
        virtual_hosts: vec![route::VirtualHost {
            name: "vh".into(),
            domains: domains.into_iter().map(String::from).collect(),
            routes: vec![r],
            ..Default::default()
        }],
        ..Default::default()
    };
    let action = |retry_on: &str| {
        Some(route::route::Action::Route(route::RouteAction {
            cluster_specifier: Some(route::route_action::ClusterSpecifier::Cluster("c".into())),
            retry_policy: Some(route::RetryPolicy {
                retry_on: retry_on.into(),
                ..Default::default()
            }),
            ..Default::default()
        }))
    };
    let bad_regex = route::Route {
        r#match: Some(route::RouteMatch {
            path_specifier: Some(route::route_match::PathSpecifier::SafeRegex(
                envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher {
                    regex: "(unclosed".into(),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
        action: action("5xx"),
        ..Default::default()
    };
    let e = err(config::route_table(&pack_any(rc(bad_regex, vec!["a"]))));
    assert!(
        e.contains("virtual_hosts[0].routes[0].match.safe_regex: invalid regex"),
        "{e}"
    );
    let prefix = || {
        Some(route::RouteMatch {
            path_specifier: Some(route::route_match::PathSpecifier::Prefix("/".into())),
            ..Default::default()
        })
    };
    let bad_retry = route::Route {
        r#match: prefix(),
        action: action("5xx,teapot"),
        ..Default::default()
    };
    let e = err(config::route_table(&pack_any(rc(bad_retry, vec!["a"]))));
    assert!(e.contains("retry_on: \"teapot\" is not supported"), "{e}");
    let good = route::Route {
        r#match: prefix(),
        action: action("5xx"),
        ..Default::default()
    };
    let e = err(config::route_table(&pack_any(rc(
        good.clone(),
        vec!["a", "A"],
    ))));
    assert!(e.contains("appears twice"), "{e}");
    let t = config::route_table(&pack_any(rc(good, vec!["a"]))).unwrap();
    let r = t.route("a", "/x", &http::HeaderMap::new()).unwrap();
    assert_eq!(r.timeout, Some(std::time::Duration::from_secs(15)));
    // No metadata: in-flight protection at its default, for idempotent methods only.
    assert_eq!(
        (r.response_buffer, r.idempotent),
        (proxy::stack::retry::RESPONSE_BUFFER, false)
    );

    // A policy rule's in-flight protection, as the control plane writes it, read back.
    let policies = federation::policy_file::parse(
        "p.yaml",
        "policies:\n  - service: echo.default\n    http:\n      - {to: [{service: a.default}], idempotent: true, response_buffer: 256KiB}\n",
    )
    .unwrap();
    let rule = controlplane::resources::rule_route(&controlplane::resources::ResolvedRule {
        index: 0,
        rule: &policies[0].http[0],
        clusters: vec![("c".into(), 100)],
    });
    let t = config::route_table(&pack_any(rc(rule.clone(), vec!["a"]))).unwrap();
    let r = t.route("a", "/x", &http::HeaderMap::new()).unwrap();
    assert_eq!((r.response_buffer, r.idempotent), (256 * 1024, true));
    // Out of range or of the wrong type: refused, naming the field.
    let mut bad = rule;
    bad.metadata
        .as_mut()
        .unwrap()
        .filter_metadata
        .get_mut("strait")
        .unwrap()
        .fields
        .insert(
            "response_buffer".into(),
            envoy_types::pb::google::protobuf::Value {
                kind: Some(envoy_types::pb::google::protobuf::value::Kind::NumberValue(
                    -1.0,
                )),
            },
        );
    let e = err(config::route_table(&pack_any(rc(bad, vec!["a"]))));
    assert!(
        e.contains("metadata.filter_metadata.strait.response_buffer: must be a whole number"),
        "{e}"
    );
}

#[test]
fn virtual_hosts_follow_envoys_domain_precedence() {
    let vh = |name: &str, domains: &[&str]| route::VirtualHost {
        name: name.into(),
        domains: domains.iter().map(|d| d.to_string()).collect(),
        routes: vec![route::Route {
            r#match: Some(route::RouteMatch {
                path_specifier: Some(route::route_match::PathSpecifier::Prefix("/".into())),
                ..Default::default()
            }),
            action: Some(route::route::Action::Route(route::RouteAction {
                cluster_specifier: Some(route::route_action::ClusterSpecifier::Cluster(
                    name.into(),
                )),
                ..Default::default()
            })),
            ..Default::default()
        }],
        ..Default::default()
    };
    let rc = route::RouteConfiguration {
        name: "rt".into(),
        virtual_hosts: vec![
            vh("any", &["*"]),
            vh("prefix", &["api.*"]),
            vh("suffix", &["*.example.com"]),
            vh("longer-suffix", &["*.eu.example.com"]),
            vh("exact", &["api.example.com"]),
        ],
        ..Default::default()
    };
    let t = config::route_table(&pack_any(rc)).unwrap();
    let pick = |h: &str| t.virtual_host(h).map(|v| v.name.clone()).unwrap();
    assert_eq!(pick("api.example.com"), "exact");
    assert_eq!(pick("x.eu.example.com"), "longer-suffix");
    assert_eq!(pick("x.example.com"), "suffix");
    assert_eq!(pick("api.internal"), "prefix");
    assert_eq!(pick("other"), "any");
}
