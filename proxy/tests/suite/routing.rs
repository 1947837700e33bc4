//! HTTP routing rules of a service's policy, applied by the control plane to every data plane:
//! the strait proxy and a stock Envoy 1.40, fed by the same control plane (real etcd), route by
//! host, path (prefix, exact, regex) and header, split by weight within statistical bounds,
//! retry a per-try timeout on another host, answer 504 at a route's deadline, and follow a rule
//! change (a rollout to 100 %) without a restart.

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::*;
use controlplane::bootstrap::{BootstrapSpec, envoy};
use federation::model::{Labels, Locality, Name};
use federation::registry::RegistryKey;
use federation::registry::codec::encode_policy;
use proxy::dataplane::Dataplane;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

/// A server that accepts connections and never answers (it keeps reading).
async fn black_hole() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((mut s, _)) = l.accept().await {
            conns.spawn(async move {
                let mut buf = [0u8; 4096];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    (addr, task)
}

fn discovery(echo: SocketAddr, v2: SocketAddr, items: SocketAddr, hole: SocketAddr) -> String {
    let svc = |name: &str, eps: &[SocketAddr]| {
        let eps: Vec<String> = eps
            .iter()
            .map(|a| {
                format!(
                    "{{address: 127.0.0.1, port: {}, zone: us-east-1a}}",
                    a.port()
                )
            })
            .collect();
        format!(
            "  - name: {name}\n    ports: [{{name: http, port: 8080, protocol: http}}]\n    endpoints: [{}]\n",
            eps.join(", ")
        )
    };
    format!(
        "cluster: east\nregion: us-east\nservices:\n{}{}{}{}{}",
        svc("echo", &[echo]),
        svc("echo-v2", &[v2]),
        svc("items", &[items]),
        // One endpoint that never answers and one that does.
        svc("slow", &[hole, items]),
        svc("hang", &[hole]),
    )
}

fn policy(split_v1: u32) -> String {
    format!(
        "policies:
  - service: echo.default
    http:
      - name: canary
        match: {{path: {{prefix: /api}}, headers: [{{name: x-canary, exact: \"1\"}}]}}
        to: [{{service: echo-v2.default}}]
      - name: items
        match: {{path: {{regex: \"/items/[0-9]+\"}}}}
        to: [{{service: items.default}}]
      - name: split
        match: {{path: {{prefix: /split}}}}
        to: [{{service: echo.default, weight: {split_v1}}}, {{service: echo-v2.default, weight: {}}}]
      - name: hedged
        match: {{path: {{exact: /slow}}}}
        to: [{{service: slow.default}}]
        timeout: 5s
        retries: {{attempts: 2, on: [5xx], per_try_timeout: 300ms}}
      - name: deadline
        match: {{path: {{exact: /deadline}}}}
        to: [{{service: hang.default}}]
        timeout: 300ms
        retries: {{attempts: 0}}
",
        100 - split_v1
    )
}

async fn apply(reg: &Registry, text: &str) {
    for p in federation::policy_file::parse("policies.yaml", text).expect("policy parses") {
        reg.put(
            RegistryKey::Policy(p.scope.clone()).encode(),
            encode_policy(&p),
        )
        .await;
    }
}

/// Every rule, checked through one data plane (`who` names it in failures).
async fn check_rules(who: &str, proxy: SocketAddr) {
    let get = |host: &'static str, path: &'static str, headers: &'static [(&str, &str)]| async move {
        request(proxy, host, path, headers)
            .await
            .unwrap_or_else(|e| panic!("{who}: {e}"))
    };
    let ok = |body: &str| (200, body.to_string());
    // Host.
    assert_eq!(get("echo.default", "/", &[]).await, ok("v1"), "{who}: host");
    assert_eq!(
        get("echo-v2.default", "/", &[]).await,
        ok("v2"),
        "{who}: host"
    );
    // Path prefix and header, both needed.
    let canary: &[(&str, &str)] = &[("x-canary", "1")];
    assert_eq!(
        get("echo.default", "/api/x", canary).await,
        ok("v2"),
        "{who}: canary"
    );
    assert_eq!(
        get("echo.default", "/api/x", &[]).await,
        ok("v1"),
        "{who}: no header"
    );
    assert_eq!(
        get("echo.default", "/api/x", &[("x-canary", "2")]).await,
        ok("v1"),
        "{who}: other header value"
    );
    assert_eq!(
        get("echo.default", "/other", canary).await,
        ok("v1"),
        "{who}: other path"
    );
    // Regex: the whole path must match.
    assert_eq!(
        get("echo.default", "/items/42", &[]).await,
        ok("items"),
        "{who}: regex"
    );
    assert_eq!(
        get("echo.default", "/items/4x2", &[]).await,
        ok("v1"),
        "{who}: regex miss"
    );
    // Rules belong to their service: echo-v2 has none.
    assert_eq!(
        get("echo-v2.default", "/items/42", &[]).await,
        ok("v2"),
        "{who}: own rules"
    );
    // Per-try timeout: an attempt on the endpoint that never answers is retried on the other.
    for i in 0..6 {
        assert_eq!(
            get("echo.default", "/slow", &[]).await,
            ok("items"),
            "{who}: hedged {i}"
        );
    }
    // The route's deadline: 504.
    let (status, _) = get("echo.default", "/deadline", &[]).await;
    assert_eq!(status, 504, "{who}: deadline");
    // Weighted split, 80/20: 1,000 requests; the 20 % side within ±5 standard deviations
    // (σ ≈ 12.6).
    let mut v2 = 0;
    for _ in 0..1000 {
        match get("echo.default", "/split", &[]).await {
            (200, b) if b == "v2" => v2 += 1,
            (200, b) if b == "v1" => {}
            other => panic!("{who}: split answered {other:?}"),
        }
    }
    assert!(
        (137..=263).contains(&v2),
        "{who}: {v2} of 1000 went to v2, expected about 200"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_route_by_host_path_and_header_and_split_by_weight_in_strait_and_envoy() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let reg = Registry::start(d).await;
    let (v1, _t1) = http_backend("v1").await;
    let (v2, _t2) = http_backend("v2").await;
    let (items, _t3) = http_backend("items").await;
    let (hole, _t4) = black_hole().await;
    reg.publish(&discovery(v1, v2, items, hole)).await;
    apply(&reg, &policy(80)).await;
    let cp = start_cp(&reg, "east", "us-east").await;

    // The strait proxy.
    let (client, outbound) = crate::support::east_client(cp.xds_addr);
    let _dp = Dataplane::start(client.config.clone());

    // Envoy, from the same control plane.
    let (admin, envoy_out) = (free_addr(), free_addr());
    let spec = BootstrapSpec {
        node_id: "envoy-1".into(),
        cluster: Name::parse("c", "east").unwrap(),
        locality: Locality::parse("l", "us-east/us-east-1a").unwrap(),
        labels: Labels::default(),
        xds: cp.xds_addr.into(),
        xds_replicas: Vec::new(),
        tls: None,
        delta: true,
        admin,
        outbound: envoy_out,
        transparent: None,
        gateway: None,
    };
    let envoy_proc = Envoy::start(d, "envoy-1", &envoy(&spec), admin, envoy_out);

    for (who, at) in [("strait", outbound), ("envoy", envoy_out)] {
        wait_for(
            Duration::from_secs(30),
            &format!("{who} to route /items/42 to items"),
            || async {
                match request(at, "echo.default", "/items/42", &[]).await? {
                    (200, b) if b == "items" => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await;
    }
    check_rules("strait", outbound).await;
    check_rules("envoy", envoy_out).await;

    // A rollout: the split goes to 100 % v2, applied by both without a restart.
    apply(&reg, &policy(0)).await;
    for (who, at) in [("strait", outbound), ("envoy", envoy_out)] {
        wait_for(
            Duration::from_secs(10),
            &format!("{who} to send /split to v2 only"),
            // 30 in a row: under the old 80/20 split that happens with p = 0.2^30.
            || async {
                for _ in 0..30 {
                    match request(at, "echo.default", "/split", &[]).await? {
                        (200, b) if b == "v2" => {}
                        other => return Err(format!("{other:?}")),
                    }
                }
                Ok(())
            },
        )
        .await;
        for i in 0..50 {
            let r = request(at, "echo.default", "/split", &[]).await;
            assert_eq!(
                r,
                Ok((200, "v2".to_string())),
                "{who}: request {i} after the rollout"
            );
        }
    }
    // Envoy accepted every update (no NACK).
    let rejected: u64 = envoy_proc
        .stats("update_rejected")
        .await
        .iter()
        .map(|(_, v)| v)
        .sum();
    assert_eq!(
        rejected,
        0,
        "Envoy rejected an update:\n{}",
        envoy_proc.log_tail()
    );
    drop(envoy_proc);
    drop(client);
    cp.shutdown().await;
}
