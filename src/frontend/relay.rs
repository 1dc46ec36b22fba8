//! Relaying one lent server connection: bytes flow both ways untouched while
//! Weir scans message headers to know when the server is free again
//! (ReadyForQuery `I` with nothing in flight) and what the client left behind.
//!
//! One task owns both sockets. Writes and reads are polled together so a
//! client that pipelines while the server streams results can never deadlock
//! the two buffers against each other.

use crate::backend::params::ParamSet;
use crate::backend::ServerConn;
use crate::net::Stream;
use crate::wire::{self, tag, WireError};
use bytes::{Buf, BytesMut};
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;
use tokio_util::io::poll_read_buf;

/// Stop reading a side once this much is waiting to be written to the other.
const HIGH_WATER: usize = 256 * 1024;
/// Messages bigger than this are streamed through rather than buffered whole.
const STREAM_OVER: usize = 64 * 1024;

/// One direction of the relay: buffered bytes, of which `ready` are scanned
/// and may be written, and `pass` more bytes of a large message still to come.
#[derive(Default)]
pub(super) struct Dir {
    pub ready: usize,
    pub pass: usize,
}

/// What the client has asked of the server and not yet been answered.
#[derive(Debug, Clone, Copy)]
pub(super) struct Progress {
    /// Queries and Syncs sent whose ReadyForQuery has not come back.
    pub inflight: u32,
    /// Extended-protocol messages sent since the last Sync.
    pub unsynced: bool,
    /// Transaction status from the last ReadyForQuery.
    pub tx: u8,
    /// The client sent Terminate.
    pub terminated: bool,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            inflight: 0,
            unsynced: false,
            tx: b'I',
            terminated: false,
        }
    }
}

impl Progress {
    /// Nothing in flight and nothing half-sent: the server is at a message boundary.
    pub fn at_rest(&self, up: &Dir) -> bool {
        self.inflight == 0 && !self.unsynced && up.ready == 0 && up.pass == 0
    }
}

pub(super) enum Event {
    ClientData,
    ServerData,
    ClientGone(io::Error),
    ServerGone(io::Error),
}

/// Scans client bytes beyond `dir.ready`, updating `progress`. Stops at a
/// Terminate, which is never forwarded.
pub(super) fn scan_client(buf: &BytesMut, dir: &mut Dir, progress: &mut Progress) -> Result<(), WireError> {
    loop {
        if dir.pass > 0 {
            let n = dir.pass.min(buf.len() - dir.ready);
            if n == 0 {
                return Ok(());
            }
            dir.ready += n;
            dir.pass -= n;
            continue;
        }
        if progress.terminated {
            return Ok(());
        }
        let Some(h) = wire::header(&buf[dir.ready..])? else {
            return Ok(());
        };
        match h.tag {
            tag::QUERY | tag::FUNCTION_CALL => progress.inflight += 1,
            tag::SYNC => {
                progress.inflight += 1;
                progress.unsynced = false;
            }
            tag::PARSE | tag::BIND | tag::DESCRIBE | tag::EXECUTE | tag::CLOSE | tag::FLUSH => {
                progress.unsynced = true
            }
            tag::COPY_DATA | tag::COPY_DONE | tag::COPY_FAIL | tag::PASSWORD => {}
            tag::TERMINATE => {
                progress.terminated = true;
                return Ok(());
            }
            other => return Err(WireError::UnexpectedTag(other)),
        }
        // Header counted; the whole message (possibly still arriving) is passed on.
        dir.pass = h.total;
    }
}

/// Scans server bytes beyond `dir.ready`: tracks ReadyForQuery and records
/// ParameterStatus on both the server's and the client's parameter sets.
/// Returns true when a ReadyForQuery left nothing in flight.
pub(super) fn scan_server(
    buf: &BytesMut,
    dir: &mut Dir,
    progress: &mut Progress,
    server_params: &mut ParamSet,
    client_params: &mut ParamSet,
) -> Result<bool, WireError> {
    let mut idle = false;
    loop {
        if dir.pass > 0 {
            let n = dir.pass.min(buf.len() - dir.ready);
            if n == 0 {
                return Ok(idle);
            }
            dir.ready += n;
            dir.pass -= n;
            continue;
        }
        let Some(h) = wire::header(&buf[dir.ready..])? else {
            return Ok(idle);
        };
        let available = buf.len() - dir.ready;
        if available < h.total {
            if h.total > STREAM_OVER && h.tag != tag::READY_FOR_QUERY && h.tag != tag::PARAMETER_STATUS {
                dir.pass = h.total;
                continue;
            }
            return Ok(idle);
        }
        let msg = &buf[dir.ready..dir.ready + h.total];
        match h.tag {
            tag::READY_FOR_QUERY => {
                progress.tx = *msg.get(5).ok_or(WireError::Malformed("ReadyForQuery"))?;
                progress.inflight = progress.inflight.saturating_sub(1);
                idle = progress.inflight == 0;
            }
            tag::PARAMETER_STATUS => {
                if let Some((k, v)) = wire::parameter_status(msg) {
                    server_params.set_reported(k, v);
                    if crate::backend::params::is_tracked(k) {
                        client_params.set_reported(k, v);
                    }
                }
                idle = false;
            }
            _ => idle = false,
        }
        dir.ready += h.total;
    }
}

fn reserve(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16 * 1024);
    }
}

fn flush(
    cx: &mut Context<'_>,
    to: &mut Stream,
    buf: &mut BytesMut,
    dir: &mut Dir,
) -> Result<(), io::Error> {
    while dir.ready > 0 {
        match Pin::new(&mut *to).poll_write(cx, &buf[..dir.ready]) {
            Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => {
                buf.advance(n);
                dir.ready -= n;
            }
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => break,
        }
    }
    Ok(())
}

/// Writes what is ready in both directions and waits for the next read.
pub(super) async fn step(
    client: &mut Stream,
    cbuf: &mut BytesMut,
    up: &mut Dir,
    client_open: bool,
    server: &mut ServerConn,
    down: &mut Dir,
) -> Event {
    poll_fn(|cx| {
        if let Err(e) = flush(cx, &mut server.stream, cbuf, up) {
            return Poll::Ready(Event::ServerGone(e));
        }
        if let Err(e) = flush(cx, client, &mut server.buf, down) {
            return Poll::Ready(Event::ClientGone(e));
        }
        if down.ready < HIGH_WATER {
            reserve(&mut server.buf);
            match poll_read_buf(Pin::new(&mut server.stream), cx, &mut server.buf) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Event::ServerGone(io::ErrorKind::UnexpectedEof.into())),
                Poll::Ready(Ok(_)) => return Poll::Ready(Event::ServerData),
                Poll::Ready(Err(e)) => return Poll::Ready(Event::ServerGone(e)),
                Poll::Pending => {}
            }
        }
        if client_open && up.ready < HIGH_WATER {
            reserve(cbuf);
            match poll_read_buf(Pin::new(&mut *client), cx, cbuf) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Event::ClientGone(io::ErrorKind::UnexpectedEof.into())),
                Poll::Ready(Ok(_)) => return Poll::Ready(Event::ClientData),
                Poll::Ready(Err(e)) => return Poll::Ready(Event::ClientGone(e)),
                Poll::Pending => {}
            }
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::build;

    #[test]
    fn counts_queries_and_syncs() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&build::query("select 1"));
        buf.extend_from_slice(b"P\0\0\0\x08\0\0\0\0");
        let mut dir = Dir::default();
        let mut p = Progress::default();
        scan_client(&buf, &mut dir, &mut p).unwrap();
        assert_eq!(p.inflight, 1);
        assert!(p.unsynced);
        assert_eq!(dir.ready, buf.len());
        buf.extend_from_slice(b"S\0\0\0\x04");
        scan_client(&buf, &mut dir, &mut p).unwrap();
        assert_eq!(p.inflight, 2);
        assert!(!p.unsynced);
    }

    #[test]
    fn terminate_is_not_forwarded() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&build::query("select 1"));
        let qlen = buf.len();
        buf.extend_from_slice(&build::terminate());
        let mut dir = Dir::default();
        let mut p = Progress::default();
        scan_client(&buf, &mut dir, &mut p).unwrap();
        assert!(p.terminated);
        assert_eq!(dir.ready, qlen);
    }

    #[test]
    fn partial_client_message_passes_through_as_it_arrives() {
        let q = build::query("select 12345");
        let mut buf = BytesMut::from(&q[..7]);
        let mut dir = Dir::default();
        let mut p = Progress::default();
        scan_client(&buf, &mut dir, &mut p).unwrap();
        assert_eq!(dir.ready, 7);
        assert_eq!(dir.pass, q.len() - 7);
        buf.extend_from_slice(&q[7..]);
        scan_client(&buf, &mut dir, &mut p).unwrap();
        assert_eq!(dir.ready, q.len());
        assert_eq!(dir.pass, 0);
    }

    #[test]
    fn ready_for_query_ends_the_exchange() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(b"C\0\0\0\x0dSELECT 1\0");
        buf.extend_from_slice(&build::parameter_status("TimeZone", "UTC"));
        buf.extend_from_slice(&build::ready_for_query(b'T'));
        let mut dir = Dir::default();
        let mut p = Progress {
            inflight: 1,
            ..Progress::default()
        };
        let mut sp = ParamSet::default();
        let mut cp = ParamSet::default();
        assert!(scan_server(&buf, &mut dir, &mut p, &mut sp, &mut cp).unwrap());
        assert_eq!(p.tx, b'T');
        assert_eq!(sp.get("timezone"), Some("UTC"));
        assert_eq!(cp.get("TimeZone"), Some("UTC"));
        assert_eq!(dir.ready, buf.len());
    }

    #[test]
    fn bad_client_tag_is_an_error() {
        let buf = BytesMut::from(&b"?\0\0\0\x04"[..]);
        let mut dir = Dir::default();
        let mut p = Progress::default();
        assert!(scan_client(&buf, &mut dir, &mut p).is_err());
    }
}
