//! Byte streams Weir talks over (TCP, Unix socket, or TLS over TCP), and reading whole
//! messages during login, before the relay takes over.

use crate::wire::{self, WireError};
use bytes::BytesMut;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::TlsStream;

/// A client or server connection.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// TLS over TCP: a client that negotiated TLS with Weir, or Weir's connection to a
    /// server. Boxed because the TLS state is large and the plain variants are the hot path.
    Tls(Box<TlsStream<TcpStream>>),
    /// What a TCP socket leaves behind while a TLS handshake owns it, and after a failed one:
    /// reads see end-of-file, writes fail.
    Closed,
}

impl Stream {
    pub fn peer(&self) -> String {
        match self {
            Stream::Unix(_) => "unix".into(),
            Stream::Closed => "closed".into(),
            tcp => tcp
                .tcp()
                .and_then(|s| s.peer_addr().ok())
                .map_or_else(|| "?".into(), |a| a.to_string()),
        }
    }

    /// The TCP socket underneath, plain or under TLS.
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Tcp(s) => Some(s),
            Stream::Tls(s) => Some(s.get_ref().0),
            Stream::Unix(_) | Stream::Closed => None,
        }
    }

    /// Waits until a read would make progress, without a buffer to read into: an idle
    /// client holds none. Under TLS rustls keeps its own buffers, so this returns at once.
    pub async fn readable(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.readable().await,
            Stream::Unix(s) => s.readable().await,
            Stream::Tls(_) | Stream::Closed => Ok(()),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// `TLSv1.3/TLS_AES_256_GCM_SHA384` for a TLS stream (as PgBouncer logs it), `no` otherwise.
    pub fn tls_description(&self) -> String {
        let Stream::Tls(t) = self else {
            return "no".into();
        };
        let (_, conn) = t.get_ref();
        let version = match conn.protocol_version() {
            Some(tokio_rustls::rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
            Some(tokio_rustls::rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
            Some(v) => format!("{v:?}"),
            None => "TLS".to_string(),
        };
        match conn.negotiated_cipher_suite() {
            Some(cs) => format!("{version}/{:?}", cs.suite()),
            None => version,
        }
    }

    /// Takes a plain TCP socket out (to run a TLS handshake on it), leaving `Closed`.
    pub fn take_tcp(&mut self) -> Option<TcpStream> {
        match std::mem::replace(self, Stream::Closed) {
            Stream::Tcp(s) => Some(s),
            other => {
                *self = other;
                None
            }
        }
    }

    /// True while the socket is open and has nothing unread (an idle server connection that
    /// PostgreSQL closed shows its FATAL message or EOF here). Under TLS the raw socket is
    /// probed: any record arriving on an idle connection means it is no longer usable.
    pub fn is_idle_open(&self) -> bool {
        let mut probe = [0u8; 1];
        let r = match self {
            Stream::Unix(s) => s.try_read(&mut probe),
            Stream::Closed => return false,
            tcp => match tcp.tcp() {
                Some(s) => s.try_read(&mut probe),
                None => return false,
            },
        };
        matches!(r, Err(ref e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Writes `bytes` if the socket takes them now, without waiting (a goodbye from `Drop`).
    /// Under TLS the bytes are encrypted, and a close_notify follows them.
    pub fn send_nowait(&mut self, bytes: &[u8]) {
        match self {
            Stream::Tcp(s) => {
                let _ = s.try_write(bytes);
            }
            Stream::Unix(s) => {
                let _ = s.try_write(bytes);
            }
            Stream::Tls(tls) => match &mut **tls {
                TlsStream::Client(s) => {
                    let (tcp, conn) = s.get_mut();
                    send_tls_nowait(tcp, conn, bytes);
                }
                TlsStream::Server(s) => {
                    let (tcp, conn) = s.get_mut();
                    send_tls_nowait(tcp, conn, bytes);
                }
            },
            Stream::Closed => {}
        }
    }
}

fn send_tls_nowait<D>(
    tcp: &TcpStream,
    conn: &mut tokio_rustls::rustls::ConnectionCommon<D>,
    bytes: &[u8],
) {
    use std::io::Write;
    if conn.writer().write_all(bytes).is_err() {
        return;
    }
    conn.send_close_notify();
    let mut socket = NoWait(tcp);
    while conn.wants_write() {
        if !matches!(conn.write_tls(&mut socket), Ok(n) if n > 0) {
            return;
        }
    }
}

/// A synchronous writer over a non-blocking socket that fails instead of waiting.
struct NoWait<'a>(&'a TcpStream);

impl io::Write for NoWait<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn closed() -> io::Error {
    io::ErrorKind::NotConnected.into()
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => {
                // tokio-rustls reports bytes written once they are encrypted; when the socket
                // is full the records wait in its buffer until the next write or flush. Weir
                // does not flush (on TCP it is a no-op) but always goes on to read the stream it
                // wrote to, so flushing here guarantees every write is delivered.
                if let Poll::Ready(Err(e)) = Pin::new(&mut **s).poll_flush(cx) {
                    return Poll::Ready(Err(e));
                }
                Pin::new(&mut **s).poll_read(cx, buf)
            }
            Stream::Closed => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
            Stream::Closed => Poll::Ready(Err(closed())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
            Stream::Closed => Poll::Ready(Ok(())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
            Stream::Closed => Poll::Ready(Ok(())),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
            Stream::Closed => Poll::Ready(Err(closed())),
        }
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
}

fn invalid(e: WireError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Reads one complete tagged message into a fresh buffer (login phase only).
/// Returns `None` on a clean EOF before any byte of a message.
pub async fn read_message<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
) -> io::Result<Option<BytesMut>> {
    read_message_max(s, buf, wire::MAX_MESSAGE_LEN).await
}

/// [`read_message`] for a peer that is not trusted yet: a message declaring a body longer than
/// `max_body` bytes is refused from its header (`InvalidData`, before any of it is buffered), so a
/// client that has not logged in cannot make Weir hold more than that.
pub async fn read_message_max<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
    max_body: usize,
) -> io::Result<Option<BytesMut>> {
    loop {
        if let Some(h) = wire::header(buf).map_err(invalid)? {
            if h.total - 5 > max_body {
                return Err(invalid(WireError::BadLength((h.total - 1) as i64)));
            }
            if buf.len() >= h.total {
                return Ok(Some(buf.split_to(h.total)));
            }
            buf.reserve(h.total - buf.len());
        }
        if s.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
    }
}

/// Reads one complete untagged startup packet.
pub async fn read_startup<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
) -> io::Result<Option<BytesMut>> {
    loop {
        if let Some(len) = wire::startup::packet_len(buf).map_err(invalid)? {
            return Ok(Some(buf.split_to(len)));
        }
        if s.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
    }
}

/// Socket options for every TCP connection Weir makes or accepts: no Nagle
/// delay, and TCP keepalive (PgBouncer's `tcp_keepalive`, OS timings) so a
/// peer that vanished is noticed.
pub fn tune_tcp(tcp: &tokio::net::TcpStream, keepalive: bool) {
    let _ = tcp.set_nodelay(true);
    if keepalive {
        let _ = socket2::SockRef::from(tcp).set_keepalive(true);
    }
}
