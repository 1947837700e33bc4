//! Helpers shared by the binary's integration tests.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// An HTTP server answering `name` to everything, or a TCP server that greets with `name`.
pub async fn server(at: &str, name: &'static str, http: bool) -> SocketAddr {
    let l = TcpListener::bind(at).await.expect("bind a test server");
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                if http {
                    let mut got = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{name}",
                        name.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                } else {
                    let _ = s.write_all(format!("{name}\n").as_bytes()).await;
                    let mut buf = [0u8; 64];
                    let _ = s.read(&mut buf).await;
                }
            });
        }
    });
    addr
}
