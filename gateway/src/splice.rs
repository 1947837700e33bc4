//! Copying a tunnel's bytes both ways: half-close propagated (EOF one way shuts down that
//! direction's writer only), backpressure respected (a chunk must be written before the next is
//! read), an idle timeout, and byte counters.
//!
//! # Memory
//!
//! An idle tunnel holds no copy buffer. QUIC streams hand out and take whole [`Bytes`] chunks
//! (`read_chunk`/`write_chunk`: no copy on the QUIC side at all). A byte stream (TCP, TLS, an
//! upgraded HTTP connection) is read through a buffer on the polling task's stack: when data is
//! ready it is copied once into a chunk of exactly the size read; while the stream has nothing to
//! give, nothing but the stream itself is kept. This is what keeps 10,000 idle tunnels small
//! (`docs/benchmarks.md`).

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::metrics::Metrics;

/// The most one read of a byte stream takes (the stack buffer's size).
const READ_CHUNK: usize = 64 * 1024;

/// Most bytes gathered for one write (several QUIC frames become one system call).
const GATHER: usize = 64 * 1024;

/// Where a pump takes its bytes from.
pub trait Source {
    /// Append the next chunks to `out` (at least one), or return `false` at the end of the
    /// stream.
    fn next_chunks(
        &mut self,
        out: &mut Vec<Bytes>,
    ) -> impl Future<Output = io::Result<bool>> + Send;
}

/// Where a pump puts its bytes.
pub trait Sink {
    /// Write all of `chunks`, in order, and empty it.
    fn put(&mut self, chunks: &mut Vec<Bytes>) -> impl Future<Output = io::Result<()>> + Send;
    /// The source ended: close this direction only.
    fn close(&mut self) -> impl Future<Output = io::Result<()>> + Send;
}

/// A QUIC receive stream as a [`Source`].
pub struct QuicRecv {
    stream: quinn::RecvStream,
    /// An error met while gathering after data was already taken: reported on the next call
    /// (quinn reports a reset only once).
    deferred: Option<quinn::ReadError>,
}

impl QuicRecv {
    pub fn new(stream: quinn::RecvStream) -> Self {
        Self {
            stream,
            deferred: None,
        }
    }
}

impl Source for QuicRecv {
    async fn next_chunks(&mut self, out: &mut Vec<Bytes>) -> io::Result<bool> {
        if let Some(e) = self.deferred.take() {
            return Err(io::Error::other(e));
        }
        let first = match self.stream.read_chunk(usize::MAX, true).await {
            Ok(Some(c)) => c.bytes,
            Ok(None) => return Ok(false),
            Err(e) => return Err(io::Error::other(e)),
        };
        // One QUIC frame is about a packet: take whatever else is already here as well, so the
        // writer makes one system call for many frames.
        let mut total = first.len();
        out.push(first);
        while total < GATHER {
            match self.stream.read_chunk(usize::MAX, true).now_or_never() {
                Some(Ok(Some(c))) => {
                    total += c.bytes.len();
                    out.push(c.bytes);
                }
                Some(Err(e)) => {
                    self.deferred = Some(e);
                    break;
                }
                // Nothing more right now, or the end (seen again on the next call).
                Some(Ok(None)) | None => break,
            }
        }
        Ok(true)
    }
}

impl Sink for quinn::SendStream {
    async fn put(&mut self, chunks: &mut Vec<Bytes>) -> io::Result<()> {
        for c in chunks.drain(..) {
            self.write_chunk(c).await.map_err(io::Error::other)?;
        }
        Ok(())
    }
    async fn close(&mut self) -> io::Result<()> {
        self.finish().map_err(io::Error::other)
    }
}

/// A byte-stream reader as a [`Source`].
pub struct ReadHalf<R>(pub R);

impl<R: AsyncRead + Unpin + Send> Source for ReadHalf<R> {
    async fn next_chunks(&mut self, out: &mut Vec<Bytes>) -> io::Result<bool> {
        poll_fn(|cx| {
            // The buffer lives only for this poll: nothing is kept while the stream is idle.
            let mut stack = [0u8; READ_CHUNK];
            let mut rb = ReadBuf::new(&mut stack);
            match Pin::new(&mut self.0).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => Poll::Ready(Ok(false)),
                Poll::Ready(Ok(())) => {
                    out.push(Bytes::copy_from_slice(rb.filled()));
                    Poll::Ready(Ok(true))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }
}

/// A byte-stream writer as a [`Sink`].
pub struct WriteHalf<W>(pub W);

impl<W: AsyncWrite + Unpin + Send> Sink for WriteHalf<W> {
    async fn put(&mut self, chunks: &mut Vec<Bytes>) -> io::Result<()> {
        match chunks.len() {
            0 => {}
            1 => self.0.write_all(&chunks[0]).await?,
            _ if self.0.is_write_vectored() => {
                // Gathered write, resuming after partial writes.
                let (mut idx, mut off) = (0usize, 0usize);
                while idx < chunks.len() {
                    let slices: Vec<IoSlice<'_>> = std::iter::once(&chunks[idx][off..])
                        .chain(chunks[idx + 1..].iter().map(|c| &c[..]))
                        .map(IoSlice::new)
                        .collect();
                    let mut n = self.0.write_vectored(&slices).await?;
                    if n == 0 {
                        return Err(io::ErrorKind::WriteZero.into());
                    }
                    while n > 0 && idx < chunks.len() {
                        let left = chunks[idx].len() - off;
                        if n >= left {
                            n -= left;
                            idx += 1;
                            off = 0;
                        } else {
                            off += n;
                            n = 0;
                        }
                    }
                }
            }
            _ => {
                // A writer without gathered writes (TLS records, HTTP/2 frames): one copy into
                // one buffer beats a record or frame per chunk.
                let mut all = BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum());
                for c in chunks.iter() {
                    all.extend_from_slice(c);
                }
                self.0.write_all(&all).await?;
            }
        }
        chunks.clear();
        Ok(())
    }
    async fn close(&mut self) -> io::Result<()> {
        self.0.shutdown().await
    }
}

async fn pump<S: Source, K: Sink>(
    mut from: S,
    mut to: K,
    activity: &AtomicU64,
    start: Instant,
    counter: &AtomicU64,
) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        let mut chunks = Vec::new();
        if !from.next_chunks(&mut chunks).await? {
            // Half-close: the other direction keeps flowing.
            to.close().await?;
            return Ok(total);
        }
        let n: u64 = chunks.iter().map(|c| c.len() as u64).sum();
        // Boxed: a write's state exists only while it runs, so an idle tunnel's task stays
        // small (the read it waits in is all it holds).
        Box::pin(to.put(&mut chunks)).await?;
        total += n;
        counter.fetch_add(n, Relaxed);
        activity.store(start.elapsed().as_millis() as u64, Relaxed);
    }
}

/// Splice a peer side (`peer_r`/`peer_w`) with a local side (`local_r`/`local_w`) until both
/// directions have ended, either fails, or nothing moves for `idle`.
pub async fn splice<PR, PW, LR, LW>(
    peer_r: PR,
    peer_w: PW,
    local_r: LR,
    local_w: LW,
    idle: Duration,
    metrics: &Metrics,
) where
    PR: Source,
    PW: Sink,
    LR: Source,
    LW: Sink,
{
    metrics.tunnels_active.fetch_add(1, Relaxed);
    metrics.tunnels_total.fetch_add(1, Relaxed);
    let start = Instant::now();
    let activity = AtomicU64::new(0);
    let to_local = pump(peer_r, local_w, &activity, start, &metrics.bytes_from_peers);
    let to_peer = pump(local_r, peer_w, &activity, start, &metrics.bytes_to_peers);
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

/// A reader that turns many small reads into few large ones, without holding memory while idle.
///
/// rustls reads its transport 4 KiB at a time; under a bulk TLS stream that is four system calls
/// per 16 KiB record. Wrapped in this, the socket is read up to [`COALESCE`] bytes at a time and
/// the small reads are served from that buffer. The buffer is freed as soon as it is drained and
/// the socket has nothing more, so an idle connection keeps none.
pub struct Coalesce<T> {
    inner: T,
    buf: Vec<u8>,
    pos: usize,
    len: usize,
}

/// The largest single read of a [`Coalesce`]d stream.
pub const COALESCE: usize = 64 * 1024;

impl<T> Coalesce<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            pos: 0,
            len: 0,
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
        if this.pos == this.len && out.remaining() >= COALESCE {
            // A large read gains nothing from the buffer.
            return Pin::new(&mut this.inner).poll_read(cx, out);
        }
        if this.pos == this.len {
            if this.buf.is_empty() {
                this.buf = vec![0u8; COALESCE];
            }
            let mut rb = ReadBuf::new(&mut this.buf);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    this.pos = 0;
                    this.len = rb.filled().len();
                    if this.len == 0 {
                        this.buf = Vec::new();
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Err(e)) => {
                    this.buf = Vec::new();
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => {
                    // Idle: keep nothing.
                    this.buf = Vec::new();
                    return Poll::Pending;
                }
            }
        }
        let n = out.remaining().min(this.len - this.pos);
        out.put_slice(&this.buf[this.pos..this.pos + n]);
        this.pos += n;
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
    use tokio::io::AsyncReadExt;

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

    /// Accepts at most 7 bytes per write, gathered or not.
    struct Trickle {
        out: Vec<u8>,
        vectored: bool,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(7);
            self.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut left = 7;
            for b in bufs {
                let n = b.len().min(left);
                self.out.extend_from_slice(&b[..n]);
                left -= n;
                if left == 0 {
                    break;
                }
            }
            Poll::Ready(Ok(7 - left))
        }
        fn is_write_vectored(&self) -> bool {
            self.vectored
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn coalesce_serves_small_reads_from_few_large_ones_and_frees_when_idle() {
        let (mut w, r) = tokio::io::duplex(1 << 20);
        let data = pattern(200_000);
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
        // EOF passes through.
        drop(w);
        assert_eq!(c.read(&mut small).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn gathered_and_plain_writes_keep_order_across_partial_writes() {
        for vectored in [true, false] {
            let chunks: Vec<Bytes> = [5usize, 1, 13, 7, 0, 22]
                .iter()
                .enumerate()
                .map(|(i, &n)| Bytes::from(vec![i as u8 + 1; n]))
                .collect();
            let want: Vec<u8> = chunks.iter().flat_map(|c| c.to_vec()).collect();
            let mut sink = WriteHalf(Trickle {
                out: Vec::new(),
                vectored,
            });
            let mut v = chunks.clone();
            sink.put(&mut v).await.unwrap();
            assert!(v.is_empty());
            assert_eq!(sink.0.out, want, "vectored = {vectored}");
        }
    }

    #[tokio::test]
    async fn a_byte_stream_source_ends_with_false() {
        let (mut w, r) = tokio::io::duplex(64);
        let mut src = ReadHalf(r);
        w.write_all(b"abc").await.unwrap();
        drop(w);
        let mut out = Vec::new();
        assert!(src.next_chunks(&mut out).await.unwrap());
        assert_eq!(out, vec![Bytes::from_static(b"abc")]);
        assert!(!src.next_chunks(&mut out).await.unwrap());
    }
}
