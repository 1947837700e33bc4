//! Hot updates under load with real parts: while four clients send requests back to back
//! through the proxy, the control plane pushes 100 configurations in a row (an endpoint joins,
//! then leaves, again and again). Every push is applied (the test waits for each) and not one
//! request fails.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::common::*;
use http_body_util::{BodyExt, Empty};
use proxy::dataplane::Dataplane;

fn discovery(eps: &[SocketAddr]) -> String {
    let mut s = "cluster: east\nregion: us-east\nservices:\n  - name: echo\n    ports: [{name: http, port: 8080, protocol: http}]\n    endpoints:\n".to_string();
    for e in eps {
        s.push_str(&format!(
            "      - {{address: 127.0.0.1, port: {}, zone: us-east-1a}}\n",
            e.port()
        ));
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_config_pushes_under_load_fail_no_request() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let reg = Registry::start(d).await;
    let (a, _ta) = http_backend("A").await;
    let (b, _tb) = http_backend("B").await;
    let (c, _tc) = http_backend("C").await;
    let file = d.join("east.yaml");
    std::fs::write(&file, discovery(&[a, b])).unwrap();
    let cp = start_cp_discovery(&reg, &file, "20ms").await;
    let (client, outbound) = crate::support::east_client(cp.xds_addr);
    let dp = Arc::new(Dataplane::start(client.config.clone()));
    wait_for(Duration::from_secs(20), "the proxy to serve", || async {
        match get(outbound, "echo.default").await {
            Ok((200, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // Load: four keep-alive clients, back to back.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let served_by_c = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (stop, ok, by_c, failures) = (
            stop.clone(),
            ok.clone(),
            served_by_c.clone(),
            failures.clone(),
        );
        workers.push(tokio::spawn(async move {
            let http =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http::<Empty<bytes::Bytes>>();
            while !stop.load(Relaxed) {
                let req = http::Request::builder()
                    .uri(format!("http://{outbound}/"))
                    .header("host", "echo.default")
                    .body(Empty::new())
                    .expect("request");
                let r = match http.request(req).await {
                    Ok(resp) => {
                        let status = resp.status();
                        match resp.into_body().collect().await {
                            Ok(b) if status == 200 => Ok(b.to_bytes()),
                            Ok(b) => Err(format!(
                                "{status}: {}",
                                String::from_utf8_lossy(&b.to_bytes())
                            )),
                            Err(e) => Err(format!("body: {e}")),
                        }
                    }
                    Err(e) => Err(format!("request: {e:?}")),
                };
                match r {
                    Ok(body) => {
                        ok.fetch_add(1, Relaxed);
                        if &body[..] == b"C" {
                            by_c.fetch_add(1, Relaxed);
                        }
                    }
                    Err(e) => failures.lock().unwrap_or_else(|p| p.into_inner()).push(e),
                }
            }
        }));
    }

    // 100 pushes: C joins, C leaves, ...; each waits until the proxy holds it.
    for i in 0..100 {
        let with_c = i % 2 == 0;
        let eps: Vec<SocketAddr> = if with_c { vec![a, b, c] } else { vec![a, b] };
        std::fs::write(&file, discovery(&eps)).unwrap();
        let want = eps.len();
        wait_for(
            Duration::from_secs(20),
            &format!("push {i} ({want} endpoints) to reach the proxy"),
            || async {
                let n = dp
                    .current()
                    .clusters
                    .get("echo.default:8080")
                    .map_or(0, |c| c.balancer.hosts().len());
                if n == want {
                    Ok(())
                } else {
                    Err(format!("{n} endpoints"))
                }
            },
        )
        .await;
        // Let a few requests run on this config before the next push.
        let seen = ok.load(Relaxed);
        wait_for(Duration::from_secs(10), "requests to flow", || async {
            if ok.load(Relaxed) >= seen + 4 {
                Ok(())
            } else {
                Err(ok.load(Relaxed).to_string())
            }
        })
        .await;
    }
    stop.store(true, Relaxed);
    for w in workers {
        w.await.expect("worker");
    }
    let failures = failures.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let total = ok.load(Relaxed);
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during 100 pushes; first: {:?}",
        failures.len(),
        total + failures.len() as u64,
        failures.first()
    );
    assert!(total >= 400, "the load ran throughout ({total} requests)");
    assert!(
        served_by_c.load(Relaxed) > 0,
        "the pushes took effect: C served while it was configured"
    );
    drop(dp);
    drop(client);
    cp.shutdown().await;
}
