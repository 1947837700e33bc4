//! Copying a tunnel's bytes both ways: half-close propagated (EOF one way shuts down that
//! direction's writer only), backpressure respected (a chunk must be written before the next is
//! read), an idle timeout, and byte counters.
//!
//! # Memory
//!
//! A tunnel is one hand-written future (no per-direction tasks, no async state machines, no
//! split locks): the two streams, two small direction states and an idle timer. Reads go into a
//! buffer on the polling thread's stack and are written straight from there; only when the
//! writer pushes back is the unwritten rest copied to the heap, until it is written. So an idle
//! tunnel holds no copy buffer at all, which is what keeps 10,000 idle tunnels small
//! (`docs/benchmarks.md`). A read takes whatever is ready up to 64 KiB (a QUIC stream hands over
//! many frames at once), so a bulk transfer makes few large writes.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::metrics::Metrics;
use crate::protocol::{StatusCode, TunnelStatus, parse_frame};

/// The most one read takes (the stack buffer's size).
const READ_CHUNK: usize = 64 * 1024;

/// Reads (and writes) one direction may do in one poll before it yields to other tasks.
const BUDGET: u32 = 16;

/// A QUIC bidirectional stream as one duplex byte stream.
pub struct QuicStream {
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
}

impl AsyncRead for QuicStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        AsyncRead::poll_read(Pin::new(&mut self.get_mut().recv), cx, buf)
    }
}

impl AsyncWrite for QuicStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.get_mut().send), cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.get_mut().send), cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_shutdown(Pin::new(&mut self.get_mut().send), cx)
    }
}

/// Called once with the peer's status of an early-status tunnel.
pub type OnStatus = Box<dyn FnOnce(StatusCode, &str) + Send + Sync>;

/// The peer's side of an **early-status** tunnel: the stream was opened and the header written,
/// but the peer gateway has not answered yet. Reads hand over the peer's status frame exactly
/// as it came, once it is whole and valid, then the stream's bytes — or, after a refusal, the
/// end of the stream. The sidecar reads the status from its tunnel's first bytes.
///
/// Until an OK status, writes the peer no longer takes (a refusing peer stops reading) are
/// dropped rather than failing the tunnel, so the refusal still reaches the sidecar; nothing of
/// them reached a server.
pub struct EarlyStatus {
    inner: QuicStream,
    gate: Gate,
    on_status: Option<OnStatus>,
}

enum Gate {
    /// Collecting the status frame (and whatever came with it).
    Waiting(Vec<u8>),
    /// Handing the frame (and, after an OK, what followed it) over; then the stream, or its end.
    Handing {
        bytes: Bytes,
        then_end: bool,
    },
    Open,
    /// Refused: the stream has ended for the reader; writes are dropped.
    Refused,
}

impl EarlyStatus {
    pub fn new(inner: QuicStream, on_status: OnStatus) -> Self {
        Self {
            inner,
            gate: Gate::Waiting(Vec::new()),
            on_status: Some(on_status),
        }
    }

    /// Whether the peer has said OK (writes that fail are then errors).
    fn confirmed(&self) -> bool {
        match &self.gate {
            Gate::Open => true,
            Gate::Handing { then_end, .. } => !then_end,
            Gate::Waiting(_) | Gate::Refused => false,
        }
    }
}

impl AsyncRead for EarlyStatus {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match &mut this.gate {
                Gate::Waiting(head) => {
                    let mut chunk = [0u8; 4096];
                    let mut rb = ReadBuf::new(&mut chunk);
                    match AsyncRead::poll_read(Pin::new(&mut this.inner.recv), cx, &mut rb) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => return Poll::Pending,
                    }
                    if rb.filled().is_empty() {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the peer gateway ended the stream before its status",
                        )));
                    }
                    head.extend_from_slice(rb.filled());
                    let (status, used) = match parse_frame::<TunnelStatus>(head) {
                        Ok(Some(parsed)) => parsed,
                        Ok(None) => continue,
                        Err(e) => {
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!("the peer gateway's status: {e}"),
                            )));
                        }
                    };
                    let code = StatusCode::try_from(status.code).unwrap_or(StatusCode::BadHeader);
                    if let Some(f) = this.on_status.take() {
                        f(code, &status.message);
                    }
                    let mut bytes = Bytes::from(std::mem::take(head));
                    let refused = code != StatusCode::Ok;
                    if refused {
                        // Only the frame: a refusing peer sends nothing else that counts.
                        bytes.truncate(used);
                    }
                    this.gate = Gate::Handing {
                        bytes,
                        then_end: refused,
                    };
                }
                Gate::Handing { bytes, then_end } => {
                    let n = bytes.len().min(buf.remaining());
                    buf.put_slice(&bytes[..n]);
                    bytes.advance(n);
                    if bytes.is_empty() {
                        this.gate = if *then_end { Gate::Refused } else { Gate::Open };
                    }
                    return Poll::Ready(Ok(()));
                }
                Gate::Open => {
                    return AsyncRead::poll_read(Pin::new(&mut this.inner.recv), cx, buf);
                }
                Gate::Refused => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl AsyncWrite for EarlyStatus {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if matches!(this.gate, Gate::Refused) {
            return Poll::Ready(Ok(buf.len()));
        }
        match AsyncWrite::poll_write(Pin::new(&mut this.inner.send), cx, buf) {
            Poll::Ready(Err(_)) if !this.confirmed() => Poll::Ready(Ok(buf.len())),
            other => other,
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match AsyncWrite::poll_flush(Pin::new(&mut this.inner.send), cx) {
            Poll::Ready(Err(_)) if !this.confirmed() => Poll::Ready(Ok(())),
            other => other,
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match AsyncWrite::poll_shutdown(Pin::new(&mut this.inner.send), cx) {
            Poll::Ready(Err(_)) if !this.confirmed() => Poll::Ready(Ok(())),
            other => other,
        }
    }
}

impl Abort for EarlyStatus {
    fn abort(&mut self) {
        self.inner.abort();
    }
}

/// What a tunnel's end does when the tunnel fails or idles out, so that the far side sees an
/// error rather than a clean end of stream (dropping a QUIC send stream would finish it
/// gracefully, and a truncated transfer would pass for a complete one).
pub trait Abort {
    fn abort(&mut self) {}
}

/// Error code of a QUIC stream reset by a failed or idle tunnel.
pub const RESET_TUNNEL_FAILED: u32 = 0x5354;

impl Abort for QuicStream {
    fn abort(&mut self) {
        let code = quinn::VarInt::from_u32(RESET_TUNNEL_FAILED);
        let _ = self.send.reset(code);
        let _ = self.recv.stop(code);
    }
}

impl Abort for tokio::net::TcpStream {
    fn abort(&mut self) {
        // Close with a reset, not a FIN.
        let _ = socket2::SockRef::from(&*self).set_linger(Some(Duration::ZERO));
    }
}

/// An HTTP CONNECT stream from the ingress: dropping an HTTP/2 stream before its end resets it;
/// an HTTP/1.1 one closes its connection.
impl<T> Abort for hyper_util::rt::TokioIo<T> {}

/// One direction of a splice: what is left to write, and whether it has ended.
#[derive(Default)]
struct Half {
    /// Bytes read but not yet written (only while the writer pushes back).
    pending: Option<Bytes>,
    state: HalfState,
}

#[derive(Default, PartialEq)]
enum HalfState {
    #[default]
    Copying,
    ShuttingDown,
    Done,
}

impl Half {
    /// Copy from `r` to `w` until `r` ends (then shut `w` down), an error, or nothing more can
    /// move now. `moved` is set when bytes moved.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        counter: &AtomicU64,
        moved: &mut bool,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut budget = BUDGET;
        loop {
            match self.state {
                HalfState::Done => return Poll::Ready(Ok(())),
                HalfState::ShuttingDown => {
                    return match Pin::new(&mut *w).poll_shutdown(cx) {
                        Poll::Ready(Ok(())) => {
                            self.state = HalfState::Done;
                            Poll::Ready(Ok(()))
                        }
                        other => other,
                    };
                }
                HalfState::Copying => {}
            }
            if budget == 0 {
                // Fair to the other tasks on this thread: come back at once.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            budget -= 1;
            if let Some(buf) = &mut self.pending {
                let n = match Pin::new(&mut *w).poll_write(cx, buf) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                };
                buf.advance(n);
                counter.fetch_add(n as u64, Relaxed);
                *moved = true;
                if buf.is_empty() {
                    self.pending = None;
                }
                continue;
            }
            // The buffer lives only for this poll: nothing is kept while the stream is idle.
            // Uninitialised: zeroing 64 KiB on every poll would cost more than the read.
            let mut stack = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut rb = ReadBuf::uninit(&mut stack);
            match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
            let data = rb.filled();
            if data.is_empty() {
                // Half-close: the other direction keeps flowing.
                self.state = HalfState::ShuttingDown;
                continue;
            }
            *moved = true;
            match Pin::new(&mut *w).poll_write(cx, data) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    counter.fetch_add(n as u64, Relaxed);
                    if n < data.len() {
                        self.pending = Some(Bytes::copy_from_slice(&data[n..]));
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Backpressure: keep what was read (the only time a tunnel holds a copy).
                    self.pending = Some(Bytes::copy_from_slice(data));
                    return Poll::Pending;
                }
            }
        }
    }
}

/// A tunnel: two duplex streams spliced both ways, as one small future.
struct Splice<'a, P, L> {
    peer: P,
    local: L,
    to_local: Half,
    to_peer: Half,
    idle: Duration,
    last_activity: Instant,
    timer: Pin<Box<tokio::time::Sleep>>,
    metrics: &'a Metrics,
}

/// How a tunnel ended.
#[derive(Debug)]
enum Ended {
    Done,
    Idle,
    Failed(io::Error),
}

impl<P, L> Future for Splice<'_, P, L>
where
    P: AsyncRead + AsyncWrite + Unpin,
    L: AsyncRead + AsyncWrite + Unpin,
{
    type Output = Ended;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Ended> {
        let this = self.get_mut();
        let mut moved = false;
        let a = this.to_local.poll_copy(
            cx,
            &mut this.peer,
            &mut this.local,
            &this.metrics.bytes_from_peers,
            &mut moved,
        );
        let b = this.to_peer.poll_copy(
            cx,
            &mut this.local,
            &mut this.peer,
            &this.metrics.bytes_to_peers,
            &mut moved,
        );
        for r in [a, b] {
            if let Poll::Ready(Err(e)) = r {
                return Poll::Ready(Ended::Failed(e));
            }
        }
        if this.to_local.state == HalfState::Done && this.to_peer.state == HalfState::Done {
            return Poll::Ready(Ended::Done);
        }
        if moved {
            this.last_activity = Instant::now();
        }
        // The idle timer: re-armed lazily, only when it fires early (the clock is read only
        // when bytes moved or the timer fired).
        while this.timer.as_mut().poll(cx).is_ready() {
            let deadline = this.last_activity + this.idle;
            if deadline <= Instant::now() {
                return Poll::Ready(Ended::Idle);
            }
            this.timer.as_mut().reset(deadline);
        }
        Poll::Pending
    }
}

/// Splice a peer stream with a local one until both directions have ended (each end's EOF
/// shuts down the other side's writer only), either fails, or nothing moves for `idle`.
pub async fn splice<P, L>(peer: P, local: L, idle: Duration, metrics: &Metrics)
where
    P: AsyncRead + AsyncWrite + Abort + Unpin,
    L: AsyncRead + AsyncWrite + Abort + Unpin,
{
    metrics.tunnels_active.fetch_add(1, Relaxed);
    metrics.tunnels_total.fetch_add(1, Relaxed);
    let now = Instant::now();
    let mut tunnel = Splice {
        peer,
        local,
        to_local: Half::default(),
        to_peer: Half::default(),
        idle,
        last_activity: now,
        timer: Box::pin(tokio::time::sleep_until(now + idle)),
        metrics,
    };
    let ended = (&mut tunnel).await;
    match ended {
        Ended::Done => {}
        Ended::Idle => tracing::debug!(?idle, "tunnel idle; closing"),
        Ended::Failed(ref e) => tracing::debug!(error = %e, "tunnel ended with an error"),
    }
    if !matches!(ended, Ended::Done) {
        tunnel.peer.abort();
        tunnel.local.abort();
    }
    metrics.tunnels_active.fetch_sub(1, Relaxed);
}

/// A reader that turns many small reads into few large ones, without holding memory while idle.
///
/// rustls reads its transport 4 KiB at a time; under a bulk TLS stream that is four system calls
/// per 16 KiB record. Wrapped in this, the socket is read up to [`COALESCE`] bytes at a time and
/// the small reads are served from that buffer. The buffer is freed as soon as it is drained and
/// the socket has nothing more, so an idle connection keeps none.
pub struct Coalesce<T> {
    inner: T,
    /// Read but not yet handed out; empty (no allocation) while the stream is idle.
    buf: BytesMut,
}

/// The largest single read of a [`Coalesce`]d stream.
pub const COALESCE: usize = 64 * 1024;

impl<T> Coalesce<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            buf: BytesMut::new(),
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buf.is_empty() {
            if out.remaining() >= COALESCE {
                // A large read gains nothing from the buffer.
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            // Allocated (or the drained allocation reclaimed), not zeroed: the read fills it.
            this.buf.clear();
            this.buf.reserve(COALESCE);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.buf) {
                Poll::Ready(Ok(0)) => {
                    this.buf = BytesMut::new();
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    this.buf = BytesMut::new();
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => {
                    // Idle: keep nothing.
                    this.buf = BytesMut::new();
                    return Poll::Pending;
                }
            }
        }
        let n = out.remaining().min(this.buf.len());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::SeqCst;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    impl Abort for DuplexStream {}

    /// Counts the reads that reach the inner stream.
    struct Counting<T> {
        inner: T,
        reads: usize,
    }

    impl<T: AsyncRead + Unpin> AsyncRead for Counting<T> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            self.reads += 1;
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    fn pattern(n: usize, seed: usize) -> Vec<u8> {
        (0..n).map(|i| ((i * 31 + seed) % 251) as u8).collect()
    }

    #[tokio::test]
    async fn coalesce_serves_small_reads_from_few_large_ones_and_frees_when_idle() {
        let (mut w, r) = tokio::io::duplex(1 << 20);
        let data = pattern(200_000, 0);
        w.write_all(&data).await.unwrap();
        let mut c = Coalesce::new(Counting { inner: r, reads: 0 });
        let mut got = Vec::new();
        let mut small = [0u8; 4096];
        while got.len() < data.len() {
            let n = c.read(&mut small).await.unwrap();
            got.extend_from_slice(&small[..n]);
        }
        assert_eq!(got, data);
        let reads = c.get_ref().reads;
        assert!(reads <= 4, "{reads} reads of the inner stream for 200 kB");
        // Drained and nothing more to read: the buffer is released.
        let pending = futures::FutureExt::now_or_never(c.read(&mut small));
        assert!(pending.is_none());
        assert_eq!(c.buf.capacity(), 0);
        assert!(c.buf.is_empty());
        drop(w);
        assert_eq!(c.read(&mut small).await.unwrap(), 0);
    }

    /// Both ways at once through tiny pipes (constant backpressure and partial writes), then
    /// half-close each way in turn.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bytes_arrive_intact_both_ways_under_backpressure_and_half_close_works() {
        let metrics = Metrics::default();
        let (peer, mut remote) = tokio::io::duplex(61);
        let (local, mut app) = tokio::io::duplex(67);
        let down = pattern(300_000, 1);
        let up = pattern(200_000, 2);
        let splice_done = async {
            splice(peer, local, Duration::from_secs(30), &metrics).await;
        };
        let remote_side = async {
            let (mut r, mut w) = tokio::io::split(&mut remote);
            let send = async {
                w.write_all(&down).await.unwrap();
                // Half-close towards the app; the other direction keeps flowing.
                w.shutdown().await.unwrap();
            };
            let recv = async {
                let mut got = Vec::new();
                r.read_to_end(&mut got).await.unwrap();
                got
            };
            tokio::join!(send, recv).1
        };
        let app_side = async {
            let (mut r, mut w) = tokio::io::split(&mut app);
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.unwrap();
            // The app saw the end of the remote's data and still answers.
            w.write_all(&up).await.unwrap();
            w.shutdown().await.unwrap();
            got
        };
        let (_, at_remote, at_app) = tokio::time::timeout(Duration::from_secs(30), async {
            tokio::join!(splice_done, remote_side, app_side)
        })
        .await
        .expect("splice finished");
        assert_eq!(at_app, down);
        assert_eq!(at_remote, up);
        assert_eq!(metrics.bytes_from_peers.load(SeqCst), down.len() as u64);
        assert_eq!(metrics.bytes_to_peers.load(SeqCst), up.len() as u64);
        assert_eq!(metrics.tunnels_active.load(SeqCst), 0);
        assert_eq!(metrics.tunnels_total.load(SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_tunnel_is_closed_and_an_active_one_is_not() {
        let metrics = Metrics::default();
        let (peer, mut remote) = tokio::io::duplex(1024);
        let (local, mut app) = tokio::io::duplex(1024);
        let idle = Duration::from_secs(10);
        let started = tokio::time::Instant::now();
        let tunnel = splice(peer, local, idle, &metrics);
        let traffic = async {
            // Activity every 6 s for 30 s keeps it open past several idle periods.
            for i in 0..5u8 {
                tokio::time::sleep(Duration::from_secs(6)).await;
                remote.write_all(&[i]).await.unwrap();
                let mut b = [0u8; 1];
                app.read_exact(&mut b).await.unwrap();
                assert_eq!(b[0], i);
            }
        };
        tokio::time::timeout(Duration::from_secs(120), async {
            tokio::join!(tunnel, traffic);
        })
        .await
        .expect("an idle tunnel was never closed");
        let lived = started.elapsed();
        assert!(
            lived >= Duration::from_secs(40),
            "closed while active: {lived:?}"
        );
        assert!(
            lived < Duration::from_secs(41),
            "not closed when idle: {lived:?}"
        );
        assert_eq!(metrics.tunnels_active.load(SeqCst), 0);
        // Both ends see the tunnel gone.
        let mut b = [0u8; 1];
        assert_eq!(app.read(&mut b).await.unwrap_or(0), 0);
    }
}
