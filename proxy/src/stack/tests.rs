//! The request path driven through its layers with a scripted upstream in place of the
//! connection pools: the order of the layers shows in what each one sees.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use tokio::sync::oneshot;

use super::*;
use crate::config::{
    Assignment, ClusterConfig, EndpointConfig, EndpointHealth, LbPolicy, ListenerConfig,
    ListenerKind, LocalityConfig, OutlierDetection, PathMatch, RetryOn, RetryPolicy, RouteSource,
    RouteTable, RouteTarget, Thresholds, Upstream as Endpoint, VirtualHost,
};
use crate::runtime::Reach;
use crate::xds::ProxyConfig;

/// What the scripted upstream does with its next request.
enum Step {
    Status(u16, Vec<(&'static str, &'static str)>),
    Fail {
        connect: bool,
    },
    /// Never answers.
    Hang,
    /// Answers 200 when the sender fires (or is dropped).
    Gate(oneshot::Receiver<()>),
    /// Answers 200 whose body says it is `declared` bytes long (`None`: unknown, chunked) and
    /// fails after its first 100: a body cut on the way.
    Cut {
        declared: Option<u64>,
    },
}

/// A response body cut on the way: 100 bytes, then an error; its size hint as declared.
struct CutBody {
    sent: bool,
    declared: Option<u64>,
}

impl hyper::body::Body for CutBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        if self.sent {
            return std::task::Poll::Ready(Some(Err("the link went down".into())));
        }
        self.sent = true;
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from(vec![
            b'x';
            100
        ])))))
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.declared.map_or_else(
            hyper::body::SizeHint::default,
            hyper::body::SizeHint::with_exact,
        )
    }
}

/// One request as the upstream saw it.
struct Seen {
    endpoint: Endpoint,
    headers: HeaderMap,
    body: Bytes,
}

#[derive(Clone, Default)]
struct Scripted {
    steps: Arc<Mutex<VecDeque<Step>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    hosts: Arc<Mutex<Vec<Arc<Host>>>>,
}

impl Scripted {
    fn new(steps: Vec<Step>) -> Self {
        let s = Self::default();
        s.steps.lock().unwrap().extend(steps);
        s
    }
    fn seen(&self) -> std::sync::MutexGuard<'_, Vec<Seen>> {
        self.seen.lock().unwrap()
    }
}

impl Service<Upstreamed> for Scripted {
    type Response = Attempted;
    type Error = Infallible;
    type Future = Fut<Attempted>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, u: Upstreamed) -> Self::Future {
        let step = self.steps.lock().unwrap().pop_front();
        let (seen, hosts) = (self.seen.clone(), self.hosts.clone());
        Box::pin(async move {
            let (parts, body) = u.req.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            seen.lock().unwrap().push(Seen {
                endpoint: u.host.upstream.clone(),
                headers: parts.headers,
                body,
            });
            hosts.lock().unwrap().push(u.host.clone());
            let respond = |code: u16, headers: &[(&str, &str)]| {
                let mut r = Response::new(
                    Full::new(Bytes::from_static(b"upstream"))
                        .map_err(|never| match never {})
                        .boxed(),
                );
                *r.status_mut() = StatusCode::from_u16(code).unwrap();
                for (k, v) in headers {
                    r.headers_mut().append(
                        http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                        HeaderValue::from_str(v).unwrap(),
                    );
                }
                Attempted::Response(r)
            };
            Ok(match step {
                Some(Step::Status(code, headers)) => respond(code, &headers),
                Some(Step::Fail { connect }) => Attempted::Failed {
                    connect,
                    reason: "scripted".into(),
                    path: false,
                },
                Some(Step::Hang) => std::future::pending().await,
                Some(Step::Gate(rx)) => {
                    let _ = rx.await;
                    respond(200, &[])
                }
                Some(Step::Cut { declared }) => Attempted::Response(Response::new(
                    CutBody {
                        sent: false,
                        declared,
                    }
                    .boxed(),
                )),
                None => panic!("the upstream was called more often than scripted"),
            })
        })
    }
}

/// A config with one HTTP listener routing everything to cluster `c`, whose endpoints are
/// `endpoints` (priority 0), with `retry` and `thresholds`, outlier detection ejecting on the
/// first gateway error.
fn compiled(endpoints: usize, retry: Option<RetryPolicy>, thresholds: Thresholds) -> Arc<Compiled> {
    with_deadline(endpoints, retry, thresholds, Duration::from_secs(15))
}

fn with_deadline(
    endpoints: usize,
    retry: Option<RetryPolicy>,
    thresholds: Thresholds,
    deadline: Duration,
) -> Arc<Compiled> {
    let cluster = ClusterConfig {
        name: "c".into(),
        connect_timeout: Duration::from_secs(1),
        lb: LbPolicy::RoundRobin,
        http2: false,
        tunnel: false,
        outlier: Some(OutlierDetection {
            consecutive_5xx: 1,
            consecutive_gateway_failure: 1,
            max_ejection_percent: 100,
            ..OutlierDetection::default()
        }),
        thresholds,
        tls_matches: Vec::new(),
    };
    let assignment = Assignment {
        cluster: "c".into(),
        priorities: vec![vec![LocalityConfig {
            region: "r".into(),
            zone: "z".into(),
            subzone: String::new(),
            weight: 1,
            endpoints: (0..endpoints)
                .map(|i| EndpointConfig {
                    upstream: Endpoint::Direct(SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16))),
                    health: EndpointHealth::Healthy,
                    weight: 1,
                    socket_match: Vec::new(),
                })
                .collect(),
        }]],
        overprovisioning: 140,
    };
    let routes = RouteTable {
        name: "r".into(),
        virtual_hosts: vec![VirtualHost {
            name: "all".into(),
            domains: vec!["*".into()],
            routes: vec![Arc::new(RouteEntry {
                path: PathMatch::Prefix("/".into()),
                headers: Vec::new(),
                target: RouteTarget::Cluster("c".into()),
                timeout: Some(deadline),
                retry,
                response_buffer: crate::stack::retry::RESPONSE_BUFFER,
                idempotent: false,
            })],
        }],
    };
    let mut config = ProxyConfig::default();
    config.clusters.insert("c".into(), Arc::new(cluster));
    config.assignments.insert("c".into(), Arc::new(assignment));
    config.listeners.insert(
        "l".into(),
        Arc::new(ListenerConfig {
            name: "l".into(),
            address: SocketAddr::from(([127, 0, 0, 1], 0)),
            kind: ListenerKind::Http {
                routes: RouteSource::Inline(routes),
            },
        }),
    );
    Arc::new(Compiled::new(Arc::new(config), None, &Reach::default()))
}

fn retry_on_5xx(per_try: Option<Duration>) -> RetryPolicy {
    RetryPolicy {
        on: RetryOn {
            server_error: true,
            ..RetryOn::default()
        },
        num_retries: 2,
        per_try_timeout: per_try,
        retriable_status_codes: Vec::new(),
        other_host: true,
        other_priority: false,
    }
}

fn get(headers: &[(&str, &str)]) -> Request<Body> {
    let mut b = Request::builder().uri("/x").header("host", "svc.example");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Empty::new().map_err(|never| match never {}).boxed())
        .unwrap()
}

async fn send(leaf: &Scripted, compiled: &Arc<Compiled>, req: Request<Body>) -> Response<Body> {
    let mut svc = stack(leaf.clone());
    match svc
        .call(Downstream {
            req,
            compiled: compiled.clone(),
            listener: "l".into(),
        })
        .await
    {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

fn reason(r: &Response<Body>) -> &str {
    r.headers()
        .get("x-strait-reason")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// The stack, listed: the order a request meets the layers.
#[test]
fn the_journey_lists_its_layers_in_order() {
    let listed = format!("{:?}", journey());
    let names: Vec<&str> = listed
        .trim_start_matches("ServiceBuilder(")
        .trim_end_matches(')')
        .split(", ")
        .filter(|n| *n != "Identity")
        .collect();
    assert_eq!(
        names,
        [
            "RouteLayer",
            "CircuitBreakerLayer",
            "UpgradeLayer",
            "ReplayLayer",
            "RetryLayer",
            "OutlierLayer",
            "PerTryTimeoutLayer",
            "HygieneLayer",
        ],
        "the request path's layers, outermost first: {listed}"
    );
}

/// Outlier reporting is inside retries: each attempt is reported (the 503 ejects its host at
/// once with this config), and the retry goes to the other host.
#[tokio::test]
async fn every_attempt_is_reported_and_retried_on_another_host() {
    let leaf = Scripted::new(vec![Step::Status(503, vec![]), Step::Status(200, vec![])]);
    let c = compiled(2, Some(retry_on_5xx(None)), Thresholds::default());
    let r = send(&leaf, &c, get(&[])).await;
    assert_eq!(r.status(), StatusCode::OK);
    let seen = leaf.seen();
    assert_eq!(seen.len(), 2, "one retry");
    assert_ne!(
        seen[0].endpoint, seen[1].endpoint,
        "the retry went to the other host"
    );
    let hosts = leaf.hosts.lock().unwrap();
    assert!(
        hosts[0].state.ejected(std::time::Instant::now()),
        "the host that answered 503 was ejected"
    );
    assert!(!hosts[1].state.ejected(std::time::Instant::now()));
}

/// Without a retry policy an error is the answer, and it is still reported.
#[tokio::test]
async fn no_policy_no_retry() {
    let leaf = Scripted::new(vec![Step::Fail { connect: true }]);
    let c = compiled(2, None, Thresholds::default());
    let r = send(&leaf, &c, get(&[])).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(reason(&r).contains("scripted"), "{}", reason(&r));
    assert_eq!(leaf.seen().len(), 1);
    assert!(
        leaf.hosts.lock().unwrap()[0]
            .state
            .ejected(std::time::Instant::now())
    );
}

/// The per-try timeout is inside retries: a hung attempt times out and the next host answers,
/// well within the route's deadline.
#[tokio::test]
async fn a_per_try_timeout_is_retried() {
    let leaf = Scripted::new(vec![Step::Hang, Step::Status(200, vec![])]);
    let c = compiled(
        2,
        Some(retry_on_5xx(Some(Duration::from_millis(250)))),
        Thresholds::default(),
    );
    let started = tokio::time::Instant::now();
    let r = send(&leaf, &c, get(&[])).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(leaf.seen().len(), 2);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(10),
        "the first attempt waited its per-try timeout, no more: {took:?}"
    );
}

/// The route's deadline ends the request: a timeout that is the deadline's is not retried.
#[tokio::test]
async fn the_deadline_is_not_retried() {
    let leaf = Scripted::new(vec![Step::Hang]);
    let c = with_deadline(
        2,
        Some(retry_on_5xx(None)),
        Thresholds::default(),
        Duration::from_millis(200),
    );
    let r = send(&leaf, &c, get(&[])).await;
    assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(leaf.seen().len(), 1);
}

/// Header hygiene: hop-by-hop headers (and those `Connection` names) do not go upstream,
/// `te: trailers` and `Host` do; hop-by-hop headers of the response do not come back. A
/// buffered body is sent again on the retry.
#[tokio::test]
async fn hop_by_hop_headers_stay_behind_and_the_body_is_replayed() {
    let leaf = Scripted::new(vec![
        Step::Status(500, vec![]),
        Step::Status(
            200,
            vec![
                ("keep-alive", "timeout=5"),
                ("x-app", "1"),
                ("upgrade", "h2c"),
            ],
        ),
    ]);
    let c = compiled(2, Some(retry_on_5xx(None)), Thresholds::default());
    let mut req = get(&[
        ("connection", "x-private"),
        ("x-private", "secret"),
        ("keep-alive", "timeout=5"),
        ("te", "trailers"),
        ("x-app", "1"),
    ]);
    *req.body_mut() = Full::new(Bytes::from_static(b"payload"))
        .map_err(|never| match never {})
        .boxed();
    *req.method_mut() = http::Method::POST;
    let r = send(&leaf, &c, req).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().get("keep-alive").is_none());
    assert!(r.headers().get("upgrade").is_none());
    assert_eq!(r.headers().get("x-app").unwrap(), "1");
    let seen = leaf.seen();
    for s in seen.iter() {
        for h in ["connection", "x-private", "keep-alive"] {
            assert!(s.headers.get(h).is_none(), "{h} went upstream");
        }
        assert_eq!(s.headers.get("te").unwrap(), "trailers");
        assert_eq!(s.headers.get("host").unwrap(), "svc.example");
        assert_eq!(
            s.body,
            Bytes::from_static(b"payload"),
            "every attempt has the body"
        );
    }
}

/// The circuit breaker is in front of everything upstream: at `max_requests` a request is
/// answered 503 without reaching an upstream, and the permit comes back with the response.
#[tokio::test]
async fn the_circuit_breaker_answers_before_any_upstream() {
    let (open, gate) = oneshot::channel();
    let leaf = Scripted::new(vec![Step::Gate(gate), Step::Status(200, vec![])]);
    let c = compiled(
        1,
        None,
        Thresholds {
            max_requests: 1,
            ..Thresholds::default()
        },
    );
    let held = tokio::spawn({
        let (leaf, c) = (leaf.clone(), c.clone());
        async move { send(&leaf, &c, get(&[])).await.status() }
    });
    // The first request holds the only permit once the upstream has it.
    let cluster = c.clusters.get("c").unwrap().clone();
    tokio::time::timeout(Duration::from_secs(10), async {
        while leaf.seen().is_empty() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the first request never reached the upstream");
    assert_eq!(cluster.requests.in_use(), 1);
    let r = send(&leaf, &c, get(&[])).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reason(&r), "cluster c is at max_requests");
    assert_eq!(
        leaf.seen().len(),
        1,
        "the refused request reached no upstream"
    );
    open.send(()).unwrap();
    assert_eq!(held.await.unwrap(), StatusCode::OK);
    assert_eq!(cluster.requests.in_use(), 0, "the permit came back");
    let r = send(&leaf, &c, get(&[])).await;
    assert_eq!(r.status(), StatusCode::OK);
}

/// The retry budget is a permit: with `max_retries: 0` a failure is not retried.
#[tokio::test]
async fn retries_take_the_budget() {
    let leaf = Scripted::new(vec![Step::Status(503, vec![])]);
    let c = compiled(
        2,
        Some(retry_on_5xx(None)),
        Thresholds {
            max_retries: 0,
            ..Thresholds::default()
        },
    );
    let r = send(&leaf, &c, get(&[])).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(leaf.seen().len(), 1, "no budget, no retry");
    assert_eq!(c.clusters.get("c").unwrap().retries.in_use(), 0);
}

/// Route selection answers on its own: no route 404, no cluster 503, and no upstream is
/// touched.
#[tokio::test]
async fn route_selection_replies_locally() {
    let leaf = Scripted::new(vec![]);
    let c = compiled(1, None, Thresholds::default());
    let mut svc = stack(leaf.clone());
    let r = svc
        .call(Downstream {
            req: get(&[]),
            compiled: c.clone(),
            listener: "missing".into(),
        })
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reason(&r), "listener has no routes yet");
    assert!(leaf.seen().is_empty());
}

fn retry_on_reset() -> RetryPolicy {
    RetryPolicy {
        on: RetryOn {
            reset: true,
            connect_failure: true,
            gateway_error: true,
            ..RetryOn::default()
        },
        num_retries: 2,
        per_try_timeout: None,
        retriable_status_codes: Vec::new(),
        other_host: true,
        other_priority: true,
    }
}

/// In-flight protection: a GET's response of known, small length whose body is cut on the way
/// is held, not sent, and retried on another host; the client gets the whole second answer.
#[tokio::test]
async fn a_cut_response_body_is_retried_and_the_client_gets_a_whole_one() {
    let leaf = Scripted::new(vec![
        Step::Cut {
            declared: Some(1024),
        },
        Step::Status(200, vec![]),
    ]);
    let c = compiled(2, Some(retry_on_reset()), Thresholds::default());
    let r = send(&leaf, &c, get(&[])).await;
    assert_eq!(r.status(), StatusCode::OK);
    let body = r
        .into_body()
        .collect()
        .await
        .expect("a whole body")
        .to_bytes();
    assert_eq!(&body[..], b"upstream", "the second host's answer, whole");
    let seen = leaf.seen();
    assert_eq!(seen.len(), 2, "retried once");
    assert_ne!(seen[0].endpoint, seen[1].endpoint, "on another host");
}

/// What is not held goes through as it comes, so the cut reaches the client: a response of
/// unknown length (it may be a stream of events), one larger than the buffer, a POST, and any
/// response when no retry is left.
#[tokio::test]
async fn streams_large_bodies_posts_and_last_attempts_are_not_held() {
    let cases: Vec<(Option<u64>, http::Method, Option<RetryPolicy>)> = vec![
        (None, http::Method::GET, Some(retry_on_reset())),
        (
            Some(crate::stack::retry::RESPONSE_BUFFER + 1),
            http::Method::GET,
            Some(retry_on_reset()),
        ),
        (Some(1024), http::Method::POST, Some(retry_on_reset())),
        (Some(1024), http::Method::GET, None),
    ];
    for (declared, method, policy) in cases {
        let what = format!(
            "{method} of {declared:?} bytes, retries {}",
            policy.is_some()
        );
        let leaf = Scripted::new(vec![Step::Cut { declared }]);
        let c = compiled(2, policy, Thresholds::default());
        let mut req = get(&[]);
        *req.method_mut() = method;
        let r = send(&leaf, &c, req).await;
        assert_eq!(r.status(), StatusCode::OK, "{what}");
        assert!(
            r.into_body().collect().await.is_err(),
            "{what}: the cut went through to the client"
        );
        assert_eq!(leaf.seen().len(), 1, "{what}: not retried");
    }
}
