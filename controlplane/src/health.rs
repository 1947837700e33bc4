//! Active health checks of this cluster's endpoints from its discovery file
//! (`federation::health_check`): one prober per endpoint of each service with a check, the
//! verdicts applied to the cluster state this control plane publishes (an endpoint that fails
//! its check is `unhealthy` in the registry, so every cluster, `strait route explain` and every
//! sidecar see it), and `/metrics` and `/debug/health` for operators.
//!
//! Probes go to the endpoint's address (at the check's `port`, or the endpoint's own). An
//! endpoint behind a sidecar (`strait.io/tls-mode: mutual`) accepts only mutual TLS, so it gets
//! the TCP probe whatever the check says.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use federation::discovery::DiscoveryFile;
use federation::health_check::{HealthCheck, Probe, Tracker, apply};
use federation::model::ServiceKey;
use federation::registry::codec::cluster_state_kvs;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Registry keys and values of this cluster's state.
type Kvs = BTreeMap<String, Vec<u8>>;
/// An endpoint of a service, by its registry address.
type Key = (ServiceKey, SocketAddr);

/// What the checker knows, for `/metrics` and `/debug/health`.
#[derive(Default)]
pub struct HealthStatus {
    endpoints: Mutex<BTreeMap<Key, EndpointStatus>>,
    passes: AtomicU64,
    failures: AtomicU64,
    transitions: AtomicU64,
}

#[derive(Clone)]
struct EndpointStatus {
    probe: &'static str,
    verdict: Option<bool>,
    /// Why the last probe failed (empty after a pass).
    last_failure: String,
}

impl HealthStatus {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Key, EndpointStatus>> {
        self.endpoints.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Prometheus text.
    pub fn render(&self) -> String {
        let (mut healthy, mut unhealthy, mut pending) = (0, 0, 0);
        for s in self.lock().values() {
            match s.verdict {
                Some(true) => healthy += 1,
                Some(false) => unhealthy += 1,
                None => pending += 1,
            }
        }
        let mut out = String::new();
        let _ = write!(
            out,
            "# HELP strait_health_check_endpoints Endpoints under active health checks, by verdict.\n\
             # TYPE strait_health_check_endpoints gauge\n\
             strait_health_check_endpoints{{state=\"healthy\"}} {healthy}\n\
             strait_health_check_endpoints{{state=\"unhealthy\"}} {unhealthy}\n\
             strait_health_check_endpoints{{state=\"pending\"}} {pending}\n\
             # HELP strait_health_check_probes_total Probes made, by result.\n\
             # TYPE strait_health_check_probes_total counter\n\
             strait_health_check_probes_total{{result=\"pass\"}} {}\n\
             strait_health_check_probes_total{{result=\"fail\"}} {}\n\
             # HELP strait_health_check_transitions_total Verdicts that changed (healthy to unhealthy or back).\n\
             # TYPE strait_health_check_transitions_total counter\n\
             strait_health_check_transitions_total {}\n",
            self.passes.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
            self.transitions.load(Ordering::Relaxed),
        );
        out
    }

    /// `/debug/health`: every checked endpoint, its probe, verdict and last failure.
    pub fn dump(&self) -> serde_json::Value {
        let rows: Vec<serde_json::Value> = self
            .lock()
            .iter()
            .map(|((service, addr), s)| {
                serde_json::json!({
                    "service": service.to_string(),
                    "endpoint": addr.to_string(),
                    "probe": s.probe,
                    "verdict": match s.verdict {
                        Some(true) => "healthy",
                        Some(false) => "unhealthy",
                        None => "pending",
                    },
                    "last_failure": s.last_failure,
                })
            })
            .collect();
        serde_json::json!({ "endpoints": rows })
    }
}

/// One endpoint to probe.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    address: SocketAddr,
    probe: Probe,
    check: HealthCheck,
}

fn targets(file: &DiscoveryFile) -> HashMap<Key, Target> {
    let mut out = HashMap::new();
    for set in &file.state.services {
        let Some(check) = file.health_checks.get(&set.service.key) else {
            continue;
        };
        for e in &set.endpoints {
            // An endpoint the file itself takes out of service is not probed.
            if !e.health.is_serving() {
                continue;
            }
            let probe = if e.mutual_tls() {
                Probe::Tcp
            } else {
                check.probe.clone()
            };
            out.insert(
                (set.service.key.clone(), e.socket_addr()),
                Target {
                    address: SocketAddr::new(e.address, check.port.unwrap_or(e.port)),
                    probe,
                    check: check.clone(),
                },
            );
        }
    }
    out
}

struct Outcome {
    key: Key,
    generation: u64,
    result: Result<(), String>,
}

/// Probe the endpoints of `file` (and of every later version) and publish the cluster state
/// with the verdicts applied to `desired`, until `stop`.
pub async fn run(
    mut file: watch::Receiver<Arc<DiscoveryFile>>,
    desired: watch::Sender<Kvs>,
    status: Arc<HealthStatus>,
    stop: CancellationToken,
) {
    let (tx, mut rx) = mpsc::channel::<Outcome>(256);
    let mut probers: HashMap<Key, (Target, u64, tokio::task::AbortHandle)> = HashMap::new();
    let mut trackers: HashMap<Key, Tracker> = HashMap::new();
    let mut generation = 0u64;
    let mut current = file.borrow_and_update().clone();
    loop {
        // (Re)start the probers of what the file asks for now.
        let wanted = targets(&current);
        probers.retain(|k, (t, _, h)| {
            let keep = wanted.get(k) == Some(t);
            if !keep {
                h.abort();
            }
            keep
        });
        trackers.retain(|k, _| probers.contains_key(k) || wanted.contains_key(k));
        for (k, t) in wanted {
            if probers.contains_key(&k) {
                continue;
            }
            generation += 1;
            trackers.insert(k.clone(), Tracker::default());
            let h = tokio::spawn(probe_loop(
                k.clone(),
                t.clone(),
                generation,
                tx.clone(),
                stop.clone(),
            ))
            .abort_handle();
            probers.insert(k, (t, generation, h));
        }
        {
            let mut st = status.lock();
            st.retain(|k, _| probers.contains_key(k));
            for (k, (t, _, _)) in &probers {
                st.entry(k.clone()).or_insert_with(|| EndpointStatus {
                    probe: t.probe.kind(),
                    verdict: None,
                    last_failure: String::new(),
                });
            }
        }
        publish(&current, &trackers, &desired);

        // Then results, until the file changes.
        loop {
            tokio::select! {
                () = stop.cancelled() => {
                    for (_, (_, _, h)) in probers.drain() {
                        h.abort();
                    }
                    return;
                }
                r = file.changed() => {
                    if r.is_err() {
                        return;
                    }
                    current = file.borrow_and_update().clone();
                    break;
                }
                Some(o) = rx.recv() => {
                    let Some((target, generation, _)) = probers.get(&o.key) else { continue };
                    if *generation != o.generation {
                        continue;
                    }
                    let Some(tracker) = trackers.get_mut(&o.key) else { continue };
                    let pass = o.result.is_ok();
                    if pass {
                        status.passes.fetch_add(1, Ordering::Relaxed);
                    } else {
                        status.failures.fetch_add(1, Ordering::Relaxed);
                    }
                    let was = tracker.verdict();
                    let changed = tracker.record(pass, &target.check);
                    if let Some(s) = status.lock().get_mut(&o.key) {
                        s.verdict = tracker.verdict();
                        s.last_failure = o.result.clone().err().unwrap_or_default();
                    }
                    if changed {
                        let (service, addr) = &o.key;
                        match (&o.result, was) {
                            (Err(why), _) => tracing::warn!(%service, endpoint = %addr, probe = target.probe.kind(), reason = %why, "endpoint failed its health check: unhealthy"),
                            (Ok(()), Some(false)) => tracing::info!(%service, endpoint = %addr, "endpoint passes its health check again: healthy"),
                            (Ok(()), _) => tracing::debug!(%service, endpoint = %addr, "endpoint passes its health check"),
                        }
                        if was.is_some() {
                            status.transitions.fetch_add(1, Ordering::Relaxed);
                        }
                        publish(&current, &trackers, &desired);
                    }
                }
            }
        }
    }
}

/// Publish the file's state with the failed endpoints marked unhealthy (when that changes what
/// is published).
fn publish(file: &DiscoveryFile, trackers: &HashMap<Key, Tracker>, desired: &watch::Sender<Kvs>) {
    let failed: BTreeSet<Key> = trackers
        .iter()
        .filter(|(_, t)| t.verdict() == Some(false))
        .map(|(k, _)| k.clone())
        .collect();
    let kvs = cluster_state_kvs(&apply(&file.state, &failed));
    desired.send_if_modified(|cur| {
        if *cur == kvs {
            false
        } else {
            *cur = kvs;
            true
        }
    });
}

async fn probe_loop(
    key: Key,
    target: Target,
    generation: u64,
    tx: mpsc::Sender<Outcome>,
    stop: CancellationToken,
) {
    // The first probe at once (a new endpoint, or a control plane that just started, knows
    // within one timeout); then every interval, each endpoint at its own offset within the
    // first tenth of it so that many endpoints are not probed in one burst.
    let spread = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        let tenth = target.check.interval.as_millis().max(10) as u64 / 10;
        Duration::from_millis(h.finish() % tenth.max(1))
    };
    loop {
        let result = match tokio::time::timeout(target.check.timeout, probe(&target)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {:?}", target.check.timeout)),
        };
        if tx
            .send(Outcome {
                key: key.clone(),
                generation,
                result,
            })
            .await
            .is_err()
        {
            return;
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(target.check.interval + spread) => {}
        }
    }
}

async fn probe(t: &Target) -> Result<(), String> {
    let tcp = TcpStream::connect(t.address)
        .await
        .map_err(|e| format!("connect {}: {e}", t.address))?;
    let _ = tcp.set_nodelay(true);
    match &t.probe {
        Probe::Tcp => Ok(()),
        Probe::Http { path, .. } => {
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .map_err(|e| format!("HTTP: {e}"))?;
            let conn = tokio::spawn(conn);
            let req = http::Request::get(path.as_str())
                .header(http::header::HOST, t.address.to_string())
                .header(http::header::USER_AGENT, "strait-health-check")
                .body(Empty::<Bytes>::new())
                .map_err(|e| format!("HTTP request: {e}"))?;
            let r = send.send_request(req).await;
            conn.abort();
            let status = r.map_err(|e| format!("HTTP: {e}"))?.status().as_u16();
            if t.probe.status_ok(status) {
                Ok(())
            } else {
                Err(format!("GET {path} answered {status}"))
            }
        }
        Probe::Grpc { service } => grpc_check(tcp, service).await,
    }
}

/// `grpc.health.v1.HealthCheckRequest`.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

/// `grpc.health.v1.HealthCheckResponse`; status 1 is `SERVING`.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    status: i32,
}

const SERVING: i32 = 1;
/// The largest answer read (a health answer is a few bytes).
const MAX_GRPC_MESSAGE: usize = 4096;

async fn grpc_check(tcp: TcpStream, service: &str) -> Result<(), String> {
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .map_err(|e| format!("HTTP/2: {e}"))?;
    let conn = tokio::spawn(conn);
    let result = async {
        let msg = prost::Message::encode_to_vec(&HealthCheckRequest {
            service: service.to_string(),
        });
        let mut body = BytesMut::with_capacity(5 + msg.len());
        body.put_u8(0);
        body.put_u32(u32::try_from(msg.len()).map_err(|_| "request too large".to_string())?);
        body.put_slice(&msg);
        let req = http::Request::post("/grpc.health.v1.Health/Check")
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .header(http::header::USER_AGENT, "strait-health-check")
            .body(Full::new(body.freeze()))
            .map_err(|e| format!("gRPC request: {e}"))?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| format!("gRPC: {e}"))?;
        if resp.status() != http::StatusCode::OK {
            return Err(format!("gRPC: HTTP status {}", resp.status()));
        }
        let grpc_status = |h: &http::HeaderMap| {
            h.get("grpc-status")
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        // A trailers-only answer carries its status in the headers.
        if let Some(s) = grpc_status(resp.headers())
            && s != "0"
        {
            return Err(format!("gRPC status {s}"));
        }
        let body = http_body_util::Limited::new(resp.into_body(), MAX_GRPC_MESSAGE + 5)
            .collect()
            .await
            .map_err(|e| format!("gRPC answer: {e}"))?;
        if let Some(s) = body.trailers().and_then(grpc_status)
            && s != "0"
        {
            return Err(format!("gRPC status {s}"));
        }
        let mut bytes = body.to_bytes();
        if bytes.len() < 5 {
            return Err("gRPC: no answer message".into());
        }
        let compressed = bytes.get_u8();
        let len = bytes.get_u32() as usize;
        if compressed != 0 || len != bytes.len() {
            return Err(format!(
                "gRPC: malformed answer (compressed {compressed}, length {len} of {})",
                bytes.len()
            ));
        }
        let answer = <HealthCheckResponse as prost::Message>::decode(bytes)
            .map_err(|e| format!("gRPC answer: {e}"))?;
        if answer.status == SERVING {
            Ok(())
        } else {
            Err(format!(
                "grpc.health.v1 status {} for service {service:?} (not SERVING)",
                answer.status
            ))
        }
    }
    .await;
    conn.abort();
    result
}
