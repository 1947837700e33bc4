//! The built-in load generator: fixed-rate (open-loop) HTTP GETs from a cluster's client
//! sidecar to a service, each request's outcome, latency and serving cluster recorded. Latency
//! is measured from the moment a request was due, not when it was sent, so a stalled
//! generator cannot hide a stall of the system (no coordinated omission).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt as _;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::lab::http::pooled;
use crate::lab::state::Lab;

/// One stream of load.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadSpec {
    /// The cluster whose client sidecar sends the requests.
    pub from: String,
    /// `SERVICE.NAMESPACE`, sent as the Host header.
    pub service: String,
    /// Requests per second.
    #[serde(default = "default_rate")]
    pub rate: f64,
    /// The request path.
    #[serde(default = "default_path")]
    pub path: String,
}

fn default_rate() -> f64 {
    100.0
}

fn default_path() -> String {
    "/".into()
}

/// What happened to one request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    /// Index of the load stream.
    pub stream: usize,
    /// When it was due, in ms since the run started.
    pub at_ms: f64,
    /// From due to the end of the response (or the failure).
    pub latency_ms: f64,
    /// The serving cluster, for a 200.
    pub cluster: Option<String>,
    /// The serving zone, for a 200.
    pub zone: Option<String>,
    /// What went wrong, otherwise.
    pub error: Option<String>,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }

    pub fn end_ms(&self) -> f64 {
        self.at_ms + self.latency_ms
    }
}

/// How long one request may take before it counts as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Send `spec`'s requests from `start` until `stop` turns true; every outcome goes to `out`.
/// Returns once every request sent has an outcome.
pub async fn generate(
    lab: &Lab,
    index: usize,
    spec: &LoadSpec,
    start: Instant,
    mut stop: watch::Receiver<bool>,
    out: mpsc::UnboundedSender<Outcome>,
) -> anyhow::Result<()> {
    let c = lab.cluster(&spec.from)?;
    if !(spec.rate > 0.0 && spec.rate <= 20_000.0) {
        anyhow::bail!(
            "load from {}: rate {} is not in (0, 20000] requests/s",
            spec.from,
            spec.rate
        );
    }
    let client = pooled(&c.ns, c.client.outbound);
    let uri: http::Uri = format!("http://{}{}", spec.service, spec.path)
        .parse()
        .map_err(|e| anyhow::anyhow!("load to `{}{}`: {e}", spec.service, spec.path))?;
    let interval = Duration::from_secs_f64(1.0 / spec.rate);
    let mut tasks = tokio::task::JoinSet::new();
    let mut due = start;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            break;
        }
        let at_ms = due.duration_since(start).as_secs_f64() * 1000.0;
        let (client, uri, out, when) = (client.clone(), uri.clone(), out.clone(), due);
        tasks.spawn(async move {
            let req = http::Request::get(uri).body(http_body_util::Empty::new());
            let result = match req {
                Err(e) => Err(format!("request: {e}")),
                Ok(req) => {
                    let fut = async {
                        let resp = client.request(req).await.map_err(|e| {
                            let mut s = format!("{e}");
                            let mut src = std::error::Error::source(&e);
                            while let Some(x) = src {
                                s.push_str(&format!(": {x}"));
                                src = x.source();
                            }
                            s
                        })?;
                        let status = resp.status().as_u16();
                        let body = resp
                            .into_body()
                            .collect()
                            .await
                            .map_err(|e| format!("body: {e}"))?
                            .to_bytes();
                        let body = String::from_utf8_lossy(&body).into_owned();
                        if status == 200 {
                            Ok(body)
                        } else {
                            Err(format!("{status} {}", body.trim()))
                        }
                    };
                    tokio::time::timeout(REQUEST_TIMEOUT, fut)
                        .await
                        .unwrap_or_else(|_| Err(format!("no answer within {REQUEST_TIMEOUT:?}")))
                }
            };
            let latency_ms = when.elapsed().as_secs_f64() * 1000.0;
            let mut o = Outcome {
                stream: index,
                at_ms,
                latency_ms,
                cluster: None,
                zone: None,
                error: None,
            };
            match result {
                Ok(body) => {
                    let mut words = body.split_whitespace();
                    o.cluster = words.next().map(str::to_string);
                    o.zone = words.next().map(str::to_string);
                    if o.cluster.is_none() {
                        o.error = Some("200 with an empty body".into());
                    }
                }
                Err(e) => o.error = Some(e),
            }
            let _ = out.send(o);
        });
        // Reap finished requests as we go, so the set stays small.
        while tasks.try_join_next().is_some() {}
        due += interval;
        // Behind schedule by more than a second (a stalled generator): skip ahead rather than
        // fire a burst; the skipped requests are not counted as failures (the generator, not
        // the system, stalled) and the gap shows in the timeline.
        let now = Instant::now();
        if now > due + Duration::from_secs(1) {
            tracing::warn!(
                "load from {} fell {:?} behind schedule",
                spec.from,
                now - due
            );
            due = now;
        }
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// Load streams sharing one stop signal; outcomes collected as they complete.
pub struct Running {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    collector: tokio::task::JoinHandle<()>,
    /// Every outcome so far, in order of completion.
    pub outcomes: Arc<Mutex<Vec<Outcome>>>,
}

impl Running {
    pub fn start(lab: Arc<Lab>, specs: &[LoadSpec], start: Instant) -> Running {
        let (stop, stop_rx) = watch::channel(false);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let tasks = specs
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let (lab, spec, stop_rx, tx) =
                    (lab.clone(), spec.clone(), stop_rx.clone(), tx.clone());
                tokio::spawn(async move { generate(&lab, i, &spec, start, stop_rx, tx).await })
            })
            .collect();
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let sink = outcomes.clone();
        let collector = tokio::spawn(async move {
            while let Some(o) = rx.recv().await {
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(o);
            }
        });
        Running {
            stop,
            tasks,
            collector,
            outcomes,
        }
    }

    /// Stop sending and wait for every request in flight; every outcome, by due time.
    pub async fn finish(self) -> anyhow::Result<Vec<Outcome>> {
        let _ = self.stop.send(true);
        let mut first_error = None;
        for t in self.tasks {
            match t.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => first_error = first_error.or(Some(e)),
                Err(e) => first_error = first_error.or(Some(anyhow::anyhow!("load task: {e}"))),
            }
        }
        let _ = self.collector.await;
        if let Some(e) = first_error {
            return Err(e);
        }
        let mut all = std::mem::take(&mut *self.outcomes.lock().unwrap_or_else(|p| p.into_inner()));
        all.sort_by(|a, b| a.at_ms.total_cmp(&b.at_ms));
        Ok(all)
    }
}
