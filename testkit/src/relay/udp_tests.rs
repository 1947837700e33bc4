//! The fault-injecting UDP relay: forwarding both ways, blackhole and heal, loss, delay and
//! jitter, statistics, and what it ignores.

use std::net::SocketAddr;
use std::time::Duration;

use crate::relay::{Faults, RelayStats, UdpRelay};
use tokio::net::UdpSocket;
use tokio::time::Instant;

async fn socket() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.unwrap()
}

/// The next datagram on `s` within `wait`.
async fn recv(s: &UdpSocket, wait: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = vec![0u8; 65_536];
    match tokio::time::timeout(wait, s.recv_from(&mut buf)).await {
        Ok(Ok((n, from))) => Some((buf[..n].to_vec(), from)),
        Ok(Err(e)) => panic!("recv: {e}"),
        Err(_) => None,
    }
}

/// Wait (up to 10 s) until `cond` holds for the relay's statistics.
async fn stats_until(relay: &UdpRelay, cond: impl Fn(&RelayStats) -> bool) -> RelayStats {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = relay.stats();
        if cond(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "stats never got there: {s:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A client and a target joined by a relay, with one datagram each way through it so the
/// target knows where to answer.
struct Path {
    relay: UdpRelay,
    client: UdpSocket,
    target: UdpSocket,
    /// The relay's address as the target sees it.
    via: SocketAddr,
}

impl Path {
    async fn new() -> Self {
        let target = socket().await;
        let relay = UdpRelay::start(target.local_addr().unwrap()).await.unwrap();
        let client = socket().await;
        client.send_to(b"hello", relay.addr()).await.unwrap();
        let (got, via) = recv(&target, Duration::from_secs(5)).await.unwrap();
        assert_eq!(got, b"hello");
        Self {
            relay,
            client,
            target,
            via,
        }
    }
}

#[tokio::test]
async fn forwards_both_ways_between_the_latest_client_and_the_target() {
    let p = Path::new().await;
    assert_eq!(p.via, p.relay.outbound_addr());
    assert_ne!(p.via, p.relay.addr());
    assert_eq!(p.relay.client(), Some(p.client.local_addr().unwrap()));
    assert_eq!(p.relay.target(), p.target.local_addr().unwrap());

    p.target.send_to(b"world", p.via).await.unwrap();
    let (got, from) = recv(&p.client, Duration::from_secs(5)).await.unwrap();
    assert_eq!(got, b"world");
    assert_eq!(from, p.relay.addr());

    // A new client takes over: answers go to it, not to the old one.
    let other = socket().await;
    other.send_to(b"again", p.relay.addr()).await.unwrap();
    let (got, from) = recv(&p.target, Duration::from_secs(5)).await.unwrap();
    assert_eq!((got.as_slice(), from), (&b"again"[..], p.via));
    assert_eq!(p.relay.client(), Some(other.local_addr().unwrap()));
    p.target.send_to(b"to the new one", p.via).await.unwrap();
    let (got, _) = recv(&other, Duration::from_secs(5)).await.unwrap();
    assert_eq!(got, b"to the new one");
    assert_eq!(recv(&p.client, Duration::from_millis(100)).await, None);

    let s = stats_until(&p.relay, |s| s.forwarded_to_client == 2).await;
    assert_eq!(
        s,
        RelayStats {
            forwarded_to_target: 2,
            dropped_to_target: 0,
            forwarded_to_client: 2,
            dropped_to_client: 0,
        }
    );
}

#[tokio::test]
async fn large_datagrams_pass_intact() {
    let p = Path::new().await;
    let big: Vec<u8> = (0..60_000u32).map(|i| (i % 251) as u8).collect();
    p.client.send_to(&big, p.relay.addr()).await.unwrap();
    let (got, _) = recv(&p.target, Duration::from_secs(5)).await.unwrap();
    assert_eq!(got, big);
    p.target.send_to(&big, p.via).await.unwrap();
    let (got, _) = recv(&p.client, Duration::from_secs(5)).await.unwrap();
    assert_eq!(got, big);
}

#[tokio::test]
async fn blackhole_drops_everything_and_heal_restores() {
    let p = Path::new().await;
    let faults = Faults {
        blackhole: true,
        ..Faults::default()
    };
    p.relay.set_faults(faults);
    assert_eq!(p.relay.faults(), faults);
    for i in 0..50u8 {
        p.client.send_to(&[i], p.relay.addr()).await.unwrap();
        p.target.send_to(&[i], p.via).await.unwrap();
    }
    let s = stats_until(&p.relay, |s| {
        s.dropped_to_target == 50 && s.dropped_to_client == 50
    })
    .await;
    assert_eq!((s.forwarded_to_target, s.forwarded_to_client), (1, 0));
    assert_eq!(recv(&p.target, Duration::from_millis(200)).await, None);
    assert_eq!(recv(&p.client, Duration::from_millis(50)).await, None);

    p.relay.set_faults(Faults::default());
    assert_eq!(p.relay.faults(), Faults::default());
    p.client.send_to(b"healed", p.relay.addr()).await.unwrap();
    let (got, _) = recv(&p.target, Duration::from_secs(5)).await.unwrap();
    assert_eq!(got, b"healed");
    p.target.send_to(b"healed too", p.via).await.unwrap();
    let (got, _) = recv(&p.client, Duration::from_secs(5)).await.unwrap();
    assert_eq!(got, b"healed too");
    let s = stats_until(&p.relay, |s| s.forwarded_to_client == 1).await;
    assert_eq!(
        s,
        RelayStats {
            forwarded_to_target: 2,
            dropped_to_target: 50,
            forwarded_to_client: 1,
            dropped_to_client: 50,
        }
    );
}

#[tokio::test]
async fn loss_drops_about_the_given_share() {
    let p = Path::new().await;
    p.relay.set_faults(Faults {
        loss: 0.5,
        ..Faults::default()
    });
    // Count what reaches the target while sending, so no socket buffer overflows.
    let target = p.target;
    let counter = tokio::spawn(async move {
        let mut n = 0u64;
        while recv(&target, Duration::from_millis(500)).await.is_some() {
            n += 1;
        }
        n
    });
    const N: u64 = 2_000;
    for batch in 0..N / 50 {
        for i in 0..50 {
            let seq = (batch * 50 + i).to_be_bytes();
            p.client.send_to(&seq, p.relay.addr()).await.unwrap();
        }
        let sent = (batch + 1) * 50 + 1;
        stats_until(&p.relay, |s| {
            s.forwarded_to_target + s.dropped_to_target == sent
        })
        .await;
    }
    let received = counter.await.unwrap();
    let s = p.relay.stats();
    assert_eq!(s.forwarded_to_target + s.dropped_to_target, N + 1);
    let ratio = s.dropped_to_target as f64 / N as f64;
    assert!((0.35..=0.65).contains(&ratio), "dropped {ratio}");
    assert_eq!(received, s.forwarded_to_target - 1, "{s:?}");
}

#[tokio::test]
async fn delay_holds_datagrams_without_blocking_forwarding() {
    let p = Path::new().await;
    p.relay.set_faults(Faults {
        delay: Duration::from_millis(100),
        ..Faults::default()
    });
    let t = Instant::now();
    p.client.send_to(b"slow", p.relay.addr()).await.unwrap();
    let (got, _) = recv(&p.target, Duration::from_secs(5)).await.unwrap();
    let took = t.elapsed();
    assert_eq!(got, b"slow");
    assert!(took >= Duration::from_millis(100), "{took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");

    let t = Instant::now();
    p.target.send_to(b"slow back", p.via).await.unwrap();
    let (got, _) = recv(&p.client, Duration::from_secs(5)).await.unwrap();
    let took = t.elapsed();
    assert_eq!(got, b"slow back");
    assert!(took >= Duration::from_millis(100), "{took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");

    // Many datagrams held at once are all released about one delay later, not one after another.
    let t = Instant::now();
    for i in 0..100u8 {
        p.client.send_to(&[i], p.relay.addr()).await.unwrap();
    }
    for _ in 0..100 {
        recv(&p.target, Duration::from_secs(5)).await.unwrap();
    }
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(100), "{took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[tokio::test]
async fn jitter_spreads_the_delay() {
    let p = Path::new().await;
    p.relay.set_faults(Faults {
        delay: Duration::from_millis(60),
        jitter: Duration::from_millis(40),
        ..Faults::default()
    });
    let t = Instant::now();
    for i in 0..40u8 {
        p.client.send_to(&[i], p.relay.addr()).await.unwrap();
    }
    let mut seen = Vec::new();
    for _ in 0..40 {
        let (got, _) = recv(&p.target, Duration::from_secs(5)).await.unwrap();
        seen.push(got[0]);
    }
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(20), "{took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    seen.sort_unstable();
    assert_eq!(seen, (0..40u8).collect::<Vec<_>>());
    assert_eq!(p.relay.stats().forwarded_to_target, 41);
}

#[tokio::test]
async fn a_blackhole_also_swallows_held_datagrams() {
    let p = Path::new().await;
    p.relay.set_faults(Faults {
        delay: Duration::from_millis(200),
        ..Faults::default()
    });
    p.client
        .send_to(b"on the wire", p.relay.addr())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    p.relay.set_faults(Faults {
        blackhole: true,
        ..Faults::default()
    });
    assert_eq!(recv(&p.target, Duration::from_millis(400)).await, None);
    let s = stats_until(&p.relay, |s| s.dropped_to_target == 1).await;
    assert_eq!(s.forwarded_to_target, 1);
}

#[tokio::test]
async fn strangers_and_early_replies_are_not_forwarded() {
    let target = socket().await;
    let relay = UdpRelay::start(target.local_addr().unwrap()).await.unwrap();
    // The target speaks before any client: nobody to send it to.
    target
        .send_to(b"anyone?", relay.outbound_addr())
        .await
        .unwrap();
    let s = stats_until(&relay, |s| s.dropped_to_client == 1).await;
    assert_eq!(s.forwarded_to_client, 0);
    assert_eq!(relay.client(), None);

    let client = socket().await;
    client.send_to(b"hi", relay.addr()).await.unwrap();
    recv(&target, Duration::from_secs(5)).await.unwrap();
    // A third party writing to the target-side socket reaches nobody and counts nowhere.
    let stranger = socket().await;
    stranger
        .send_to(b"spoof", relay.outbound_addr())
        .await
        .unwrap();
    assert_eq!(recv(&client, Duration::from_millis(200)).await, None);
    assert_eq!(
        relay.stats(),
        RelayStats {
            forwarded_to_target: 1,
            dropped_to_target: 0,
            forwarded_to_client: 0,
            dropped_to_client: 1,
        }
    );
}

#[tokio::test]
async fn dropping_the_relay_stops_it() {
    let p = Path::new().await;
    let (addr, via) = (p.relay.addr(), p.via);
    drop(p.relay);
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The sockets are closed: nothing is forwarded, and the listening port is free again.
    let _ = p.client.send_to(b"gone", addr).await;
    assert_eq!(recv(&p.target, Duration::from_millis(200)).await, None);
    let _ = p.target.send_to(b"gone", via).await;
    assert_eq!(recv(&p.client, Duration::from_millis(200)).await, None);
    UdpSocket::bind(addr).await.unwrap();
}

#[tokio::test]
async fn listens_where_asked() {
    let target = socket().await;
    let probe = socket().await;
    let free = probe.local_addr().unwrap();
    drop(probe);
    let relay = UdpRelay::start_on(free, target.local_addr().unwrap())
        .await
        .unwrap();
    assert_eq!(relay.addr(), free);
    // A port in use is an error, not a panic.
    assert!(
        UdpRelay::start_on(free, target.local_addr().unwrap())
            .await
            .is_err()
    );
}

/// A relay with fixed ends is a wire: either end may speak first, each sees the other at one
/// stable address (the target sees the client at the relay's outbound socket), and nobody else
/// gets through either side.
#[tokio::test]
async fn a_relay_between_fixed_ends_carries_both_ways_and_nothing_else() {
    let (a, b) = (socket().await, socket().await);
    let free = || async {
        let s = socket().await;
        s.local_addr().unwrap()
    };
    let (listen, outbound) = (free().await, free().await);
    let relay = UdpRelay::between(
        listen,
        a.local_addr().unwrap(),
        outbound,
        b.local_addr().unwrap(),
    )
    .await
    .unwrap();
    assert_eq!((relay.addr(), relay.outbound_addr()), (listen, outbound));
    let wait = Duration::from_secs(5);
    // The target speaks first: it reaches the fixed client, seen as coming from `listen`.
    b.send_to(b"from b", outbound).await.unwrap();
    let (data, from) = recv(&a, wait).await.expect("b's datagram reaches a");
    assert_eq!((data.as_slice(), from), (&b"from b"[..], listen));
    a.send_to(b"from a", listen).await.unwrap();
    let (data, from) = recv(&b, wait).await.expect("a's datagram reaches b");
    assert_eq!((data.as_slice(), from), (&b"from a"[..], outbound));
    // A stranger on either side is ignored and does not become the client.
    let stranger = socket().await;
    stranger.send_to(b"intruder", listen).await.unwrap();
    stranger.send_to(b"intruder", outbound).await.unwrap();
    b.send_to(b"again", outbound).await.unwrap();
    let (data, _) = recv(&a, wait).await.expect("b still reaches a");
    assert_eq!(data, b"again");
    assert_eq!(recv(&stranger, Duration::from_millis(200)).await, None);
    assert_eq!(recv(&b, Duration::from_millis(200)).await, None);
}
