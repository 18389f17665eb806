//! What the connection's raw bytes say that hyper's parsed request no longer does: whether a
//! request's header block carried both `Transfer-Encoding` and `Content-Length`.
//!
//! hyper follows RFC 9112 §6.3 for such a request: the transfer coding wins, the
//! `Content-Length` header is dropped before the request reaches the application, and the
//! connection closes after the response. That already stops the bytes a front proxy framed by
//! `Content-Length` from being read as a second request on this connection, but the request
//! itself is served. Sluice refuses it instead (400 `invalid_request`): a client that sends both
//! is either broken or probing for request smuggling, and nothing legitimate needs it. hyper has
//! no setting for that, so [`ScannedIo`] watches the bytes as hyper reads them.
//!
//! The scan treats every blank line as the end of a header block. A body can hold blank lines
//! and header-like lines too, so a body crafted to look like an ambiguous header block makes
//! the scan refuse that client's own later requests on the same connection; it cannot miss a
//! real ambiguous header block, which never holds a blank line.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const TE: &[u8] = b"transfer-encoding:";
const CL: &[u8] = b"content-length:";

/// A line-by-line scan of request bytes for a header block with both framing headers.
#[derive(Debug, Default)]
pub struct FramingScan {
    /// The current line's first bytes, lower-cased (as long as the longer header name).
    prefix: [u8; 18],
    prefix_len: usize,
    /// Bytes of the current line other than `\r`.
    line_len: usize,
    te: bool,
    cl: bool,
    ambiguous: bool,
}

impl FramingScan {
    /// Reads more bytes of the connection.
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            match b {
                b'\n' => self.end_line(),
                b'\r' => {}
                _ => {
                    if self.prefix_len < self.prefix.len() {
                        self.prefix[self.prefix_len] = b.to_ascii_lowercase();
                        self.prefix_len += 1;
                    }
                    self.line_len += 1;
                }
            }
        }
    }

    fn end_line(&mut self) {
        if self.line_len == 0 {
            self.ambiguous |= self.te && self.cl;
            self.te = false;
            self.cl = false;
        } else {
            let line = &self.prefix[..self.prefix_len];
            self.te |= line.starts_with(TE);
            self.cl |= line.starts_with(CL);
        }
        self.prefix_len = 0;
        self.line_len = 0;
    }

    /// Whether a header block read so far carried both framing headers.
    pub fn ambiguous(&self) -> bool {
        self.ambiguous
    }
}

/// A connection whose reads go through a [`FramingScan`]; [`ScannedIo::flag`] turns true once
/// an ambiguous header block has been read.
pub struct ScannedIo<T> {
    inner: T,
    scan: FramingScan,
    flag: Arc<AtomicBool>,
}

impl<T> ScannedIo<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            scan: FramingScan::default(),
            flag: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The connection itself.
    pub fn into_inner(self) -> T {
        self.inner
    }

    /// Shared with the connection's service, which refuses every request once it is set (hyper
    /// closes the connection after the ambiguous request, so that is the last one).
    pub fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.flag)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ScannedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            this.scan.feed(&buf.filled()[before..]);
            if this.scan.ambiguous() {
                this.flag.store(true, Ordering::Release);
            }
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ScannedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
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
}

#[cfg(test)]
mod tests {
    use super::FramingScan;
    use proptest::prelude::*;

    fn scan(chunks: &[&[u8]]) -> bool {
        let mut scan = FramingScan::default();
        for chunk in chunks {
            scan.feed(chunk);
        }
        scan.ambiguous()
    }

    #[test]
    fn both_framing_headers_in_one_block_are_ambiguous() {
        let both = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n";
        assert!(scan(&[both]));
        let reversed = b"POST / HTTP/1.1\r\ncontent-length: 4\nTRANSFER-ENCODING: chunked\n\n";
        assert!(scan(&[reversed]));
    }

    #[test]
    fn one_framing_header_per_block_is_not() {
        assert!(!scan(&[
            b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
        ]));
        // The header name must start the line.
        assert!(!scan(&[
            b"POST / HTTP/1.1\r\nX-Note: transfer-encoding: chunked\r\nContent-Length: 0\r\n\r\n"
        ]));
        // The block ends at the blank line, so a later block's header does not pair with it.
        assert!(!scan(&[
            b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\nGET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ]));
    }

    proptest! {
        /// However the bytes are split into reads, the verdict is the same.
        #[test]
        fn the_verdict_does_not_depend_on_read_boundaries(cut in 0usize..90, te_first in any::<bool>()) {
            let (a, b) = ("Transfer-Encoding: chunked", "Content-Length: 4");
            let (first, second) = if te_first { (a, b) } else { (b, a) };
            let request = format!("POST / HTTP/1.1\r\nHost: x\r\n{first}\r\n{second}\r\n\r\n");
            let bytes = request.as_bytes();
            let cut = cut.min(bytes.len());
            prop_assert!(scan(&[&bytes[..cut], &bytes[cut..]]));
        }
    }
}
