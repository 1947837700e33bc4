//! The TCP relay: bytes both ways with half-close, a cut that closes connections and refuses
//! new ones, heal, and a delay that holds bytes back in order.

use std::time::Duration;

use crate::relay::TcpRelay;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// An echo server that answers every byte until EOF, then closes its side.
async fn echo_server() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

async fn read_exactly(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf))
        .await
        .expect("no answer within 10 s")
        .expect("read");
    buf
}

#[tokio::test]
async fn carries_bytes_both_ways_and_passes_half_close_on() {
    let relay = TcpRelay::start(echo_server().await).await.unwrap();
    let mut s = TcpStream::connect(relay.addr()).await.unwrap();
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    s.write_all(&payload).await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut back))
        .await
        .expect("EOF passed through the relay both ways")
        .unwrap();
    assert_eq!(back.len(), payload.len());
    assert!(back == payload, "bytes changed on the way");
}

#[tokio::test]
async fn a_cut_closes_connections_and_refuses_new_ones_until_healed() {
    let relay = TcpRelay::start(echo_server().await).await.unwrap();
    let mut s = TcpStream::connect(relay.addr()).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    assert_eq!(read_exactly(&mut s, 4).await, b"ping");

    relay.cut();
    assert!(!relay.is_up());
    let mut buf = [0u8; 8];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("a cut connection is closed, not left hanging");
    assert!(matches!(r, Ok(0) | Err(_)), "read after the cut: {r:?}");

    // A new connection is accepted by the kernel and closed at once by the relay.
    let mut n = TcpStream::connect(relay.addr()).await.unwrap();
    let _ = n.write_all(b"ping").await;
    let r = tokio::time::timeout(Duration::from_secs(5), n.read(&mut buf))
        .await
        .expect("a connection during a cut is closed");
    assert!(matches!(r, Ok(0) | Err(_)), "read during the cut: {r:?}");

    relay.heal();
    let mut h = TcpStream::connect(relay.addr()).await.unwrap();
    h.write_all(b"pong").await.unwrap();
    assert_eq!(read_exactly(&mut h, 4).await, b"pong");
}

#[tokio::test]
async fn a_delay_holds_bytes_back_in_order_and_can_be_lifted() {
    let relay = TcpRelay::start(echo_server().await).await.unwrap();
    let mut s = TcpStream::connect(relay.addr()).await.unwrap();
    s.write_all(b"warm").await.unwrap();
    read_exactly(&mut s, 4).await;

    let delay = Duration::from_millis(500);
    relay.set_delay(delay);
    assert_eq!(relay.delay(), delay);
    let start = Instant::now();
    for chunk in [b"one-".as_slice(), b"two-", b"three"] {
        s.write_all(chunk).await.unwrap();
    }
    let got = read_exactly(&mut s, 13).await;
    let took = start.elapsed();
    assert_eq!(got, b"one-two-three", "order kept under delay");
    // Both directions are delayed: at least twice the delay for the round trip.
    assert!(
        took >= delay * 2,
        "round trip took {took:?} with {delay:?} each way"
    );

    relay.set_delay(Duration::ZERO);
    let start = Instant::now();
    s.write_all(b"fast").await.unwrap();
    read_exactly(&mut s, 4).await;
    // Not a timing test: only that the lifted delay no longer holds 500 ms each way.
    assert!(
        start.elapsed() < delay * 2,
        "the delay stayed after it was lifted: {:?}",
        start.elapsed()
    );
}
