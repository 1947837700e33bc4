//! The fault-injecting UDP relay used to cut and degrade links in tests and the loopback lab.

use std::time::{Duration, Instant};

use federation::relay::{Faults, UdpRelay};
use tokio::net::UdpSocket;

async fn echo_target() -> std::net::SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = s.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_535];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let _ = s.send_to(&buf[..n], from).await;
        }
    });
    addr
}

async fn roundtrip(
    client: &UdpSocket,
    relay: std::net::SocketAddr,
    msg: &[u8],
    wait: Duration,
) -> Option<Vec<u8>> {
    client.send_to(msg, relay).await.unwrap();
    let mut buf = vec![0u8; 65_535];
    match tokio::time::timeout(wait, client.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

#[tokio::test]
async fn forwards_both_ways_cuts_and_heals() {
    let relay = UdpRelay::start(echo_target().await).await.unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    assert_eq!(
        roundtrip(&client, relay.addr(), b"hello", Duration::from_secs(2))
            .await
            .as_deref(),
        Some(&b"hello"[..])
    );
    relay.set_faults(Faults {
        blackhole: true,
        ..Faults::default()
    });
    assert_eq!(
        roundtrip(&client, relay.addr(), b"lost", Duration::from_millis(300)).await,
        None
    );
    relay.set_faults(Faults::default());
    assert_eq!(
        roundtrip(&client, relay.addr(), b"back", Duration::from_secs(2))
            .await
            .as_deref(),
        Some(&b"back"[..])
    );
    let st = relay.stats();
    assert_eq!(
        (st.forwarded_to_target, st.forwarded_to_client, st.dropped),
        (2, 2, 1)
    );
}

#[tokio::test]
async fn loss_drops_about_that_share() {
    let target = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let relay = UdpRelay::start(target.local_addr().unwrap()).await.unwrap();
    relay.set_faults(Faults {
        loss: 0.5,
        ..Faults::default()
    });
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..2000u32 {
        client
            .send_to(&i.to_be_bytes(), relay.addr())
            .await
            .unwrap();
    }
    let mut got = 0;
    let mut buf = [0u8; 16];
    while let Ok(Ok(_)) =
        tokio::time::timeout(Duration::from_millis(300), target.recv_from(&mut buf)).await
    {
        got += 1;
    }
    assert!(
        (700..=1300).contains(&got),
        "{got} of 2000 arrived at 50% loss"
    );
    assert_eq!(
        relay.stats().dropped + relay.stats().forwarded_to_target,
        2000
    );
}

#[tokio::test]
async fn delay_holds_datagrams() {
    let relay = UdpRelay::start(echo_target().await).await.unwrap();
    relay.set_faults(Faults {
        delay: Duration::from_millis(100),
        ..Faults::default()
    });
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let t = Instant::now();
    let r = roundtrip(&client, relay.addr(), b"slow", Duration::from_secs(2)).await;
    assert_eq!(r.as_deref(), Some(&b"slow"[..]));
    // Both directions are delayed.
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
}
