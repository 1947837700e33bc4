//! HTTP/1.1 load for the proxy and mesh benchmarks: a 1 KiB server, a lean keep-alive client
//! connection, a closed loop (requests/s) and a fixed-rate run whose latencies are measured from
//! each request's due time (coordinated-omission correction).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// The size of every answer.
pub const BODY: usize = 1024;

/// The 1 KiB HTTP/1.1 server on `bind` (port 0: any); where it listens.
pub async fn server(bind: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind(bind).await.expect("bind the HTTP server");
    let addr = l.local_addr().expect("addr");
    let body = Bytes::from(vec![b'x'; BODY]);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let _ = tcp.set_nodelay(true);
            let body = body.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let body = body.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(body),
                        ))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// One keep-alive HTTP/1.1 client connection, as lean as a load generator's.
pub struct Conn {
    io: BufReader<TcpStream>,
    line: String,
    request: Vec<u8>,
}

impl Conn {
    /// Connect to `to`; every request asks for `host`.
    pub async fn open(to: SocketAddr, host: &str) -> std::io::Result<Self> {
        let s = TcpStream::connect(to).await?;
        s.set_nodelay(true)?;
        Ok(Self {
            io: BufReader::new(s),
            line: String::new(),
            request: format!("GET /1k HTTP/1.1\r\nhost: {host}\r\n\r\n").into_bytes(),
        })
    }

    /// One GET; an error unless the answer is a 200 with `BODY` bytes.
    pub async fn get(&mut self) -> Result<(), String> {
        self.io
            .get_mut()
            .write_all(&self.request)
            .await
            .map_err(|e| e.to_string())?;
        let mut len = None;
        let mut status_ok = false;
        let mut first = true;
        loop {
            self.line.clear();
            let n = self
                .io
                .read_line(&mut self.line)
                .await
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed".into());
            }
            if first {
                status_ok = self.line.starts_with("HTTP/1.1 200");
                first = false;
                continue;
            }
            if self.line == "\r\n" {
                break;
            }
            if let Some((k, v)) = self.line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse::<usize>().ok();
            }
        }
        let len = len.ok_or("no content-length")?;
        let mut body = vec![0u8; len];
        self.io
            .read_exact(&mut body)
            .await
            .map_err(|e| e.to_string())?;
        if status_ok && len == BODY {
            Ok(())
        } else {
            Err(format!("bad answer ({len} bytes)"))
        }
    }
}

/// Requests/s with `conns` connections back to back for `secs`.
pub async fn closed_loop(to: SocketAddr, host: &str, conns: usize, secs: u64) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (stop, done) = (stop.clone(), done.clone());
        let host = host.to_string();
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::open(to, &host).await.expect("connect");
            while !stop.load(Relaxed) {
                c.get().await.expect("request");
                done.fetch_add(1, Relaxed);
            }
        }));
    }
    // Warm up, then count.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (n0, t0) = (done.load(Relaxed), std::time::Instant::now());
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let rate = (done.load(Relaxed) - n0) as f64 / t0.elapsed().as_secs_f64();
    stop.store(true, Relaxed);
    for t in tasks {
        t.await.expect("client");
    }
    rate
}

/// What a fixed-rate run measured: the successful requests' latencies (sorted) and every
/// failure's reason.
pub struct RateRun {
    pub lat: Vec<Duration>,
    pub failed: Vec<String>,
}

/// Latencies at `rate` requests/s for `secs`, each from the moment the request was due, on a
/// pool of 64 keep-alive connections; sorted. A failed request panics with its reason.
pub async fn fixed_rate(to: SocketAddr, host: &str, rate: u64, secs: u64) -> Vec<Duration> {
    let run = fixed_rate_run(to, host, rate, secs).await;
    assert!(
        run.failed.is_empty(),
        "{} of {} requests to {to} failed; the first: {}",
        run.failed.len(),
        run.failed.len() + run.lat.len(),
        run.failed[0]
    );
    run.lat
}

/// As [`fixed_rate`], counting failures instead: a failed request's connection is replaced
/// by a new one (a pool that cannot reconnect shrinks).
pub async fn fixed_rate_run(to: SocketAddr, host: &str, rate: u64, secs: u64) -> RateRun {
    let n = rate * secs;
    let (free_tx, free_rx) = tokio::sync::mpsc::channel::<Conn>(256);
    for _ in 0..64 {
        free_tx
            .send(Conn::open(to, host).await.expect("connect"))
            .await
            .expect("pool");
    }
    let free_rx = Arc::new(tokio::sync::Mutex::new(free_rx));
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let interval = Duration::from_nanos(1_000_000_000 / rate);
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        let due = start + interval * i as u32;
        // tokio's timer has a 1 ms grain: sleep to just before the due time, then yield
        // until it (this core is the load generator's).
        loop {
            let now = tokio::time::Instant::now();
            if now >= due {
                break;
            }
            if due - now > Duration::from_millis(2) {
                tokio::time::sleep_until(due - Duration::from_millis(2)).await;
            } else {
                tokio::task::yield_now().await;
            }
        }
        let (free_tx, free_rx) = (free_tx.clone(), free_rx.clone());
        let host = host.to_string();
        tasks.push(tokio::spawn(async move {
            let Some(mut c) = free_rx.lock().await.recv().await else {
                return Err("no connection left in the pool".to_string());
            };
            match c.get().await {
                Ok(()) => {
                    let took = due.elapsed();
                    let _ = free_tx.send(c).await;
                    Ok(took)
                }
                Err(e) => {
                    if let Ok(fresh) = Conn::open(to, &host).await {
                        let _ = free_tx.send(fresh).await;
                    }
                    Err(e)
                }
            }
        }));
    }
    drop(free_tx);
    let mut run = RateRun {
        lat: Vec::with_capacity(tasks.len()),
        failed: Vec::new(),
    };
    for t in tasks {
        match t.await.expect("request task") {
            Ok(d) => run.lat.push(d),
            Err(e) => run.failed.push(e),
        }
    }
    run.lat.sort();
    run
}

/// Microseconds.
pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// The median of `v` (sorted in place); 0 when empty.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}
