//! The data plane: the listeners of the published config, bound and unbound as it changes.
//!
//! - **Hot updates.** Each published config is compiled into a [`Compiled`] snapshot (route
//!   tables, one balancer and one connection pool per cluster); requests take the snapshot of
//!   the moment they arrive, so an update never disturbs a request in flight. A cluster whose
//!   settings did not change keeps its connection pool and counters, and every host keeps its
//!   runtime state (active requests, outlier ejection). Listeners are bound when they appear
//!   and stop accepting when they go; open connections finish.
//! - **What each listener serves**: HTTP listeners the request path of [`crate::stack`]
//!   (routes, circuit breaking, retries across hosts and priorities, per-try timeouts, outlier
//!   reports, upgrades); TCP listeners [`crate::tcp`]; the transparent listener
//!   [`crate::transparent`]; inbound mTLS [`crate::inbound`]. They share
//!   [`crate::runtime`], not each other.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::ListenerKind;
use crate::runtime::accept;
use crate::tls::TlsSource;
use crate::tunnel::Gateway;
use crate::xds::ProxyConfig;

pub use crate::runtime::{Body, ClusterRuntime, Compiled, Reach};

/// A bound listener: its name, address and what it serves. A listener whose key changes is
/// bound anew.
type ListenerKey = (String, SocketAddr, Serves);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Serves {
    Http,
    Tcp(String),
    Transparent,
}

/// How the data plane reaches what is not local, and its limits on downstream clients.
#[derive(Debug, Clone)]
pub struct DataplaneOptions {
    /// The local east-west gateway: endpoints of other clusters are reached through it. Without
    /// one, an attempt on such an endpoint fails (and is retried elsewhere).
    pub gateway: Option<Arc<Gateway>>,
    /// The proxy's workload certificate: endpoints behind sidecars are reached with mutual TLS
    /// presenting it. Without one, an attempt on such an endpoint fails (and is retried
    /// elsewhere); a control plane does not send them to a proxy that did not announce one.
    pub workload_tls: Option<Arc<TlsSource>>,
    /// An HTTP/1 client must send a request's whole header within this time, or its connection
    /// is closed (slowloris).
    pub header_read_timeout: Duration,
    /// The largest request header accepted: HTTP/1 answers 431 beyond it, HTTP/2 refuses the
    /// stream.
    pub max_request_headers: usize,
}

impl Default for DataplaneOptions {
    fn default() -> Self {
        Self {
            gateway: None,
            workload_tls: None,
            header_read_timeout: Duration::from_secs(10),
            max_request_headers: 64 * 1024,
        }
    }
}

/// The running data plane.
pub struct Dataplane {
    current: watch::Receiver<Arc<Compiled>>,
    task: tokio::task::JoinHandle<()>,
    extra: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.task.abort();
        for t in &self.extra {
            t.abort();
        }
    }
}

impl Dataplane {
    /// Follow `configs` (the xDS client's published configs): compile each, bind and unbind
    /// listeners.
    pub fn start(configs: watch::Receiver<Arc<ProxyConfig>>) -> Self {
        Self::start_with(configs, DataplaneOptions::default())
    }

    /// [`Dataplane::start`] with options (the gateway that reaches other clusters).
    pub fn start_with(
        mut configs: watch::Receiver<Arc<ProxyConfig>>,
        options: DataplaneOptions,
    ) -> Self {
        let reach = Reach {
            gateway: options.gateway.clone(),
            tls: options.workload_tls.clone(),
        };
        let mut server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        server
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(options.header_read_timeout)
            .max_buf_size(options.max_request_headers.max(8192))
            .http2()
            .max_header_list_size(u32::try_from(options.max_request_headers).unwrap_or(u32::MAX));
        let first = Arc::new(Compiled::new(
            configs.borrow_and_update().clone(),
            None,
            &reach,
        ));
        let (tx, current) = watch::channel(first);
        let rx = current.clone();
        let task = tokio::spawn(async move {
            let mut listeners: HashMap<ListenerKey, tokio::task::JoinHandle<()>> = HashMap::new();
            loop {
                let compiled = tx.borrow().clone();
                // Listeners: bind the new, stop the gone (their connections finish).
                let want: HashMap<ListenerKey, ()> = compiled
                    .config
                    .listeners
                    .values()
                    .map(|l| {
                        let serves = match &l.kind {
                            ListenerKind::Tcp { cluster, .. } => Serves::Tcp(cluster.clone()),
                            ListenerKind::Http { .. } => Serves::Http,
                            ListenerKind::Transparent { .. } => Serves::Transparent,
                        };
                        ((l.name.clone(), l.address, serves), ())
                    })
                    .collect();
                listeners.retain(|k, task| {
                    let keep = want.contains_key(k);
                    if !keep {
                        task.abort();
                    }
                    keep
                });
                for key in want.keys() {
                    if listeners.contains_key(key) {
                        continue;
                    }
                    match TcpListener::bind(key.1).await {
                        Ok(l) => {
                            tracing::info!(listener = %key.0, address = %key.1, "listening");
                            let task = match &key.2 {
                                Serves::Http => tokio::spawn(serve(
                                    l,
                                    key.0.clone(),
                                    rx.clone(),
                                    server.clone(),
                                )),
                                Serves::Tcp(cluster) => tokio::spawn(crate::tcp::serve(
                                    l,
                                    key.0.clone(),
                                    cluster.clone(),
                                    rx.clone(),
                                )),
                                Serves::Transparent => tokio::spawn(crate::transparent::serve(
                                    l,
                                    key.0.clone(),
                                    rx.clone(),
                                    server.clone(),
                                )),
                            };
                            listeners.insert(key.clone(), task);
                        }
                        Err(e) => {
                            tracing::error!(listener = %key.0, address = %key.1, error = %e,
                                "cannot bind the listener");
                        }
                    }
                }
                if configs.changed().await.is_err() {
                    break;
                }
                let next = configs.borrow_and_update().clone();
                let compiled = Arc::new(Compiled::new(next, Some(&tx.borrow()), &reach));
                tx.send_replace(compiled);
            }
            for (_, t) in listeners {
                t.abort();
            }
        });
        Self {
            current,
            task,
            extra: Vec::new(),
        }
    }

    /// Serve an inbound listener: mutual TLS from workloads of the federation, terminated with
    /// `tls`, then plaintext to `app` (see [`crate::inbound`]).
    pub fn serve_inbound(
        &mut self,
        listener: TcpListener,
        app: SocketAddr,
        tls: Arc<crate::tls::TlsSource>,
    ) {
        self.extra
            .push(tokio::spawn(crate::inbound::serve(listener, app, tls)));
    }

    /// The compiled config requests use now.
    pub fn current(&self) -> Arc<Compiled> {
        self.current.borrow().clone()
    }

    /// Follow the compiled configs (for the admin endpoint).
    pub fn watch(&self) -> watch::Receiver<Arc<Compiled>> {
        self.current.clone()
    }
}

async fn serve(
    listener: TcpListener,
    name: String,
    current: watch::Receiver<Arc<Compiled>>,
    server: hyper_util::server::conn::auto::Builder<TokioExecutor>,
) {
    let name: Arc<str> = name.into();
    loop {
        let (stream, peer) = accept(&listener, &name).await;
        tokio::spawn(crate::stack::serve_connection(
            stream,
            peer,
            name.clone(),
            current.clone(),
            server.clone(),
        ));
    }
}
