//! Copying a tunnel's bytes both ways: half-close propagated (EOF one way shuts down that
//! direction's writer only), backpressure respected (a write must finish before the next read),
//! an idle timeout, and byte counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::metrics::Metrics;

const BUF: usize = 64 * 1024;

async fn pump<R, W>(
    mut r: R,
    mut w: W,
    activity: Arc<AtomicU64>,
    start: Instant,
    counter: &AtomicU64,
) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            // Half-close: the other direction keeps flowing.
            w.shutdown().await?;
            return Ok(total);
        }
        w.write_all(&buf[..n]).await?;
        total += n as u64;
        counter.fetch_add(n as u64, Relaxed);
        activity.store(start.elapsed().as_millis() as u64, Relaxed);
    }
}

/// Splice a peer stream (`peer_r`/`peer_w`) with a local connection (`local_r`/`local_w`) until
/// both directions have ended, either fails, or nothing moves for `idle`.
pub async fn splice<PR, PW, LR, LW>(
    peer_r: PR,
    peer_w: PW,
    local_r: LR,
    local_w: LW,
    idle: Duration,
    metrics: &Metrics,
) where
    PR: AsyncRead + Unpin,
    PW: AsyncWrite + Unpin,
    LR: AsyncRead + Unpin,
    LW: AsyncWrite + Unpin,
{
    metrics.tunnels_active.fetch_add(1, Relaxed);
    metrics.tunnels_total.fetch_add(1, Relaxed);
    let start = Instant::now();
    let activity = Arc::new(AtomicU64::new(0));
    let to_local = pump(
        peer_r,
        local_w,
        activity.clone(),
        start,
        &metrics.bytes_from_peers,
    );
    let to_peer = pump(
        local_r,
        peer_w,
        activity.clone(),
        start,
        &metrics.bytes_to_peers,
    );
    let both = async {
        // An error either way ends the tunnel; an orderly EOF waits for the other direction.
        tokio::try_join!(to_local, to_peer)
    };
    let watchdog = async {
        let step = (idle / 4).max(Duration::from_millis(10));
        loop {
            tokio::time::sleep(step).await;
            let last = Duration::from_millis(activity.load(Relaxed));
            if start.elapsed().saturating_sub(last) >= idle {
                return;
            }
        }
    };
    tokio::select! {
        r = both => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "tunnel ended with an error");
            }
        }
        _ = watchdog => tracing::debug!(?idle, "tunnel idle; closing"),
    }
    metrics.tunnels_active.fetch_sub(1, Relaxed);
}
