//! Relaying one lent server connection: bytes flow both ways untouched while
//! Weir scans message headers to know when the server is free again
//! (ReadyForQuery `I` with nothing in flight) and what the client left behind.
//!
//! One task owns both sockets. Writes and reads are polled together so a
//! client that pipelines while the server streams results can never deadlock
//! the two buffers against each other.

use super::sqlscan::{self, Seen};
use super::tracker::{Expect, Tracker, Verdict, CACHED_PLAN};
use crate::backend::params::ParamSet;
use crate::backend::prepared::{self, ClientStatements, Registry, ServerStatements, Stmt};
use crate::backend::ServerConn;
use crate::net::Stream;
use crate::wire::{self, build, tag, TxStatus, WireError};
use bytes::{Buf, Bytes, BytesMut};
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;
use tokio_util::io::poll_read_buf;

/// Stop reading a side once this much is waiting to be written to the other.
const HIGH_WATER: usize = 256 * 1024;
/// Messages bigger than this are streamed through rather than buffered whole.
const STREAM_OVER: usize = 64 * 1024;
/// A simple Query up to this size is held until complete so its SQL is read for session
/// state; a larger one streams through and the server is inspected at the end instead.
pub const OBSERVE_QUERY_UP_TO: usize = 1 << 20;

/// One direction of the relay: buffered bytes, of which `ready` are scanned
/// and may be written, and `pass` more bytes of a large message still to come.
#[derive(Default)]
pub struct Dir {
    pub ready: usize,
    pub pass: usize,
    /// Bytes written onward so far (for SHOW STATS).
    pub sent: u64,
}

/// What the client has asked of the server and not yet been answered.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Queries and Syncs sent whose ReadyForQuery has not come back.
    pub inflight: u32,
    /// Extended-protocol messages sent since the last Sync.
    pub unsynced: bool,
    /// Transaction status from the last ReadyForQuery.
    pub tx: TxStatus,
    /// The client sent Terminate.
    pub terminated: bool,
    /// Queries (simple Query and Execute) sent, for SHOW STATS.
    pub queries: u64,
    /// The last command the client sent was an Execute (not a Query).
    pub after_execute: bool,
    /// Syncs the client sent since that Execute: the server ignores them if
    /// the Execute put it in COPY FROM STDIN mode.
    pub syncs_after_execute: u32,
    /// The server sent CopyInResponse and the client has not ended the copy.
    pub copy_in: bool,
    /// Client bytes that may still be scanned (and so forwarded): a sharded
    /// session forwards one routed unit at a time; otherwise unlimited.
    pub budget: usize,
    /// An Execute was sent since the last Sync.
    pub executed: bool,
    /// A transaction over several shards: a lock timeout (Weir's guard against deadlocks
    /// no one server can see) reaches the client as `40P01`, so it retries as it would
    /// after a deadlock.
    pub lock_timeout_is_deadlock: bool,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            inflight: 0,
            unsynced: false,
            tx: TxStatus::Idle,
            terminated: false,
            queries: 0,
            after_execute: false,
            syncs_after_execute: 0,
            copy_in: false,
            budget: usize::MAX,
            executed: false,
            lock_timeout_is_deadlock: false,
        }
    }
}

impl Progress {
    /// Nothing in flight and nothing half-sent: the server is at a message boundary.
    pub fn at_rest(&self, up: &Dir) -> bool {
        self.inflight == 0 && !self.unsynced && up.ready == 0 && up.pass == 0
    }
}

/// One transaction's relay state, in one owner: both directions, what is in flight, the
/// server answers expected (and which of them Weir swallows or inserts), and the session
/// state the client's SQL touched. The session keeps one per lent server; the fuzz targets
/// and benches drive the same type without sockets.
#[derive(Default)]
pub struct Relay {
    pub up: Dir,
    pub down: Dir,
    pub progress: Progress,
    pub tracker: Tracker,
    pub seen: Seen,
    /// After Weir answered a message with an error: drop client messages until Sync,
    /// as PostgreSQL would skip them.
    pub skip_to_sync: bool,
}

/// The prepared-statement sets scanning client bytes consults and changes.
pub struct Statements<'a> {
    /// The client's protocol-level statement names.
    pub client: &'a mut ClientStatements,
    /// The process-wide registry of statement texts.
    pub registry: &'a Registry,
    /// What the lent server has prepared.
    pub server: &'a mut ServerStatements,
    /// `max_prepared_statements`; 0 passes named statements through untouched.
    pub capacity: usize,
}

impl Relay {
    /// A relay that may forward `budget` client bytes (`usize::MAX`: unlimited).
    pub fn new(budget: usize) -> Relay {
        Relay {
            progress: Progress {
                budget,
                ..Progress::default()
            },
            ..Relay::default()
        }
    }

    /// Scans client bytes beyond `up.ready` (see [`scan_client`]).
    pub fn scan_client(
        &mut self,
        cbuf: &mut BytesMut,
        stmts: Statements<'_>,
    ) -> Result<(), WireError> {
        let mut ctx = ClientCtx {
            stmts: stmts.client,
            registry: stmts.registry,
            server: stmts.server,
            capacity: stmts.capacity,
            tracker: &mut self.tracker,
            seen: &mut self.seen,
            skip_to_sync: self.skip_to_sync,
        };
        let scanned = scan_client(cbuf, &mut self.up, &mut self.progress, &mut ctx);
        self.skip_to_sync = ctx.skip_to_sync;
        scanned
    }

    /// Puts Weir's own answers at the current boundary of the server's stream.
    pub fn insert_fakes(&mut self, sbuf: &mut BytesMut) {
        insert_fakes(sbuf, &mut self.down, &mut self.tracker);
    }

    /// Scans server bytes beyond `down.ready` (see [`scan_server`]), then forgets client
    /// statements whose Parse failed. `Ok(true)`: a ReadyForQuery left nothing in flight.
    pub fn scan_server(
        &mut self,
        sbuf: &mut BytesMut,
        server_params: &mut ParamSet,
        prepared: &mut ServerStatements,
        client_params: &mut ParamSet,
        stmts: &mut ClientStatements,
    ) -> Result<bool, WireError> {
        let mut server = ServerState {
            params: server_params,
            prepared,
            tracker: &mut self.tracker,
        };
        let scanned = scan_server(
            sbuf,
            &mut self.down,
            &mut self.progress,
            &mut server,
            client_params,
        );
        forget_failed_parses(&mut self.tracker, stmts);
        scanned
    }

    /// Nothing in flight and nothing half-sent (see [`Progress::at_rest`]).
    pub fn at_rest(&self) -> bool {
        self.progress.at_rest(&self.up)
    }
}

pub enum Event {
    ClientData,
    ServerData,
    ClientGone(io::Error),
    ServerGone(io::Error),
}

/// What scanning client messages may consult and change besides the bytes.
struct ClientCtx<'a> {
    pub stmts: &'a mut ClientStatements,
    pub registry: &'a Registry,
    pub server: &'a mut ServerStatements,
    /// `max_prepared_statements`; 0 passes named statements through untouched.
    pub capacity: usize,
    pub tracker: &'a mut Tracker,
    pub seen: &'a mut Seen,
    /// After Weir answered a message with an error: drop messages until Sync,
    /// as PostgreSQL would skip them.
    pub skip_to_sync: bool,
}

fn splice(buf: &mut BytesMut, at: usize, remove: usize, insert: &[u8]) {
    if insert.len() == remove {
        buf[at..at + remove].copy_from_slice(insert);
        return;
    }
    let tail = buf.split_off(at + remove);
    buf.truncate(at);
    buf.extend_from_slice(insert);
    buf.extend_from_slice(&tail);
}

/// Scans client bytes beyond `dir.ready`, updating `progress`, rewriting
/// named-statement messages for the server. Stops at a Terminate, which is
/// never forwarded.
fn scan_client(
    buf: &mut BytesMut,
    dir: &mut Dir,
    progress: &mut Progress,
    ctx: &mut ClientCtx<'_>,
) -> Result<(), WireError> {
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
        if progress.terminated || progress.budget == 0 {
            return Ok(());
        }
        let Some(h) = wire::header(&buf[dir.ready..])? else {
            return Ok(());
        };
        let complete = buf.len() - dir.ready >= h.total;
        let at = dir.ready;
        if ctx.skip_to_sync && h.tag != tag::SYNC && h.tag != tag::TERMINATE {
            if !complete {
                return Ok(());
            }
            splice(buf, at, h.total, &[]);
            progress.budget = progress.budget.saturating_sub(h.total);
            continue;
        }
        match h.tag {
            tag::QUERY => {
                if !complete && h.total <= OBSERVE_QUERY_UP_TO {
                    return Ok(());
                }
                progress.inflight += 1;
                progress.queries += 1;
                progress.after_execute = false;
                ctx.tracker.push(Expect::Simple);
                let sql = complete
                    .then(|| wire::cstr(wire::body(&buf[at..at + h.total]), 0))
                    .flatten();
                match sql {
                    Some((sql, _)) => {
                        if let Some(replacement) = deallocate_alias(sql, ctx) {
                            splice(buf, at, h.total, &replacement);
                            dir.ready += replacement.len();
                            progress.budget = progress.budget.saturating_sub(h.total);
                            continue;
                        }
                        observe_sql(sql, ctx)
                    }
                    // Streamed unread, or not text: what it did is found out afterwards.
                    None => ctx.seen.unobserved = true,
                }
            }
            tag::FUNCTION_CALL => {
                // A fast-path call may be set_config or anything else: inspect afterwards.
                ctx.seen.unobserved = true;
                progress.inflight += 1;
                progress.after_execute = false;
                ctx.tracker.push(Expect::Simple);
            }
            tag::SYNC => {
                if progress.after_execute {
                    progress.syncs_after_execute += 1;
                }
                progress.inflight += 1;
                progress.unsynced = false;
                progress.executed = false;
                ctx.skip_to_sync = false;
                ctx.tracker.push(Expect::Sync);
            }
            tag::EXECUTE => {
                progress.unsynced = true;
                progress.after_execute = true;
                progress.executed = true;
                progress.syncs_after_execute = 0;
                progress.queries += 1;
                ctx.tracker.push(Expect::Execute);
            }
            tag::FLUSH => progress.unsynced = true,
            tag::PARSE | tag::BIND | tag::DESCRIBE | tag::CLOSE => {
                if !complete {
                    return Ok(());
                }
                progress.unsynced = true;
                let msg = &buf[at..at + h.total];
                if let Some(replacement) = rewrite_extended(h.tag, msg, ctx)? {
                    splice(buf, at, h.total, &replacement);
                    dir.ready += replacement.len();
                    progress.budget = progress.budget.saturating_sub(h.total);
                    continue;
                }
            }
            tag::COPY_DONE | tag::COPY_FAIL => {
                // PostgreSQL ignores Syncs that reach it in copy-in mode, so the
                // ones sent between an Execute of COPY FROM STDIN and the end of
                // the copy get no ReadyForQuery.
                if progress.copy_in && progress.after_execute {
                    let ignored = progress.syncs_after_execute;
                    progress.inflight = progress.inflight.saturating_sub(ignored);
                    ctx.tracker.forget_syncs(ignored as usize);
                }
                progress.copy_in = false;
                progress.after_execute = false;
                progress.syncs_after_execute = 0;
            }
            tag::COPY_DATA | tag::PASSWORD => {}
            tag::TERMINATE => {
                progress.terminated = true;
                return Ok(());
            }
            other => return Err(WireError::UnexpectedTag(other)),
        }
        // Header counted; the whole message (possibly still arriving) is passed on.
        progress.budget = progress.budget.saturating_sub(h.total);
        dir.pass = h.total;
    }
}

/// `DEALLOCATE name` inside a transaction, where `name` is one of this client's
/// protocol-level statements and the server holds its Weir-wide copy (it ran in this
/// transaction, as with DBD::Pg's `do` with bind values): the alias is forgotten and the
/// server's copy deallocated under its real name, so the client gets PostgreSQL's own
/// answer. Other cases go to the server unchanged.
fn deallocate_alias(sql: &str, ctx: &mut ClientCtx<'_>) -> Option<BytesMut> {
    let lead = sql.trim_start().as_bytes();
    if !lead.get(..10)?.eq_ignore_ascii_case(b"deallocate") {
        return None;
    }
    let name = sqlscan::sole_deallocate(sql)?;
    let stmt = ctx.stmts.get(&name)?.clone();
    if !ctx.server.contains(stmt.id) {
        return None;
    }
    ctx.stmts.remove(&name);
    ctx.server.remove(stmt.id);
    Some(build::query(&format!("DEALLOCATE {}", stmt.name)))
}

/// Notes what `sql` does to session state and follows SQL that changes
/// prepared statements on the server.
fn observe_sql(sql: &str, ctx: &mut ClientCtx<'_>) {
    let dealloc_before = ctx.seen.dealloc_all;
    sqlscan::observe(sql, ctx.seen);
    if ctx.seen.dealloc_all && !dealloc_before {
        // DEALLOCATE ALL / DISCARD ALL drop Weir's statements too.
        ctx.server.clear();
        ctx.stmts.clear();
    }
    if std::mem::take(&mut ctx.seen.ddl) {
        ctx.registry.bump_epoch();
    }
}

/// Handles Parse/Bind/Describe/Close. `Ok(None)` forwards the message as is;
/// `Ok(Some(bytes))` replaces it (possibly with nothing, when Weir answers).
fn rewrite_extended(
    t: u8,
    msg: &[u8],
    ctx: &mut ClientCtx<'_>,
) -> Result<Option<BytesMut>, WireError> {
    let named = ctx.capacity > 0;
    match t {
        tag::PARSE => {
            let (name, rest) = prepared::parse_parts(msg).ok_or(WireError::Malformed("Parse"))?;
            let query = prepared::parse_query(rest);
            if let Some(q) = query {
                observe_sql(q, ctx);
            }
            if name.is_empty() || !named {
                ctx.tracker.push(Expect::Parse(None, None));
                return Ok(None);
            }
            if ctx.stmts.get(name).is_some() {
                let err = build::error(
                    "ERROR",
                    "42P05",
                    &format!("prepared statement \"{name}\" already exists"),
                );
                ctx.tracker.push(Expect::Fake(err.freeze()));
                ctx.skip_to_sync = true;
                return Ok(Some(BytesMut::new()));
            }
            let stmt = ctx.registry.intern(rest);
            if query.is_some_and(sqlscan::touches_session) {
                stmt.mark_touches_session();
            }
            ctx.stmts.insert(name, stmt.clone());
            if ctx.server.contains(stmt.id) {
                ctx.server.touch(stmt.id);
                ctx.tracker
                    .push(Expect::Fake(Bytes::from_static(prepared::PARSE_COMPLETE)));
                return Ok(Some(BytesMut::new()));
            }
            let mut out = BytesMut::with_capacity(stmt.parse.len() + 32);
            make_room(&stmt, ctx, &mut out);
            out.extend_from_slice(&stmt.parse);
            ctx.tracker
                .push(Expect::Parse(Some(stmt), Some(name.into())));
            Ok(Some(out))
        }
        tag::BIND => {
            let (portal, sname, rest) =
                prepared::bind_parts(msg).ok_or(WireError::Malformed("Bind"))?;
            let stmt = match ctx.stmts.get(sname) {
                Some(s) if named && !sname.is_empty() => s.clone(),
                _ => {
                    ctx.tracker.push(Expect::Bind(None));
                    return Ok(None);
                }
            };
            if stmt.touches_session() {
                // Executed again, maybe in a later transaction than its Parse.
                if let Some(q) = prepared::parse_parts(&stmt.parse)
                    .and_then(|(_, rest)| prepared::parse_query(rest))
                {
                    observe_sql(q, ctx);
                }
            }
            let mut out = BytesMut::with_capacity(msg.len() + 16);
            if !ensure_on_server(&stmt, ctx, &mut out) {
                return Ok(Some(out));
            }
            prepared::put_bind(&mut out, portal, &stmt.name, rest);
            ctx.tracker.push(Expect::Bind(Some(stmt)));
            Ok(Some(out))
        }
        tag::DESCRIBE => {
            let (kind, name) =
                prepared::target_parts(msg).ok_or(WireError::Malformed("Describe"))?;
            let stmt = match ctx.stmts.get(name) {
                Some(s) if named && kind == b'S' && !name.is_empty() => s.clone(),
                _ => {
                    ctx.tracker.push(Expect::Describe(None));
                    return Ok(None);
                }
            };
            let mut out = BytesMut::with_capacity(64);
            if !ensure_on_server(&stmt, ctx, &mut out) {
                return Ok(Some(out));
            }
            prepared::put_target(&mut out, tag::DESCRIBE, b'S', &stmt.name);
            ctx.tracker.push(Expect::Describe(Some(stmt)));
            Ok(Some(out))
        }
        _ => {
            let (kind, name) = prepared::target_parts(msg).ok_or(WireError::Malformed("Close"))?;
            if named && kind == b'S' && !name.is_empty() {
                // Closing a statement another client may share is Weir's to answer.
                ctx.stmts.remove(name);
                ctx.tracker
                    .push(Expect::Fake(Bytes::from_static(prepared::CLOSE_COMPLETE)));
                return Ok(Some(BytesMut::new()));
            }
            ctx.tracker.push(Expect::Close);
            Ok(None)
        }
    }
}

/// Prepends what the server needs before `stmt` can be used: closing a
/// statement to make room (LRU), then the Parse itself. False when the
/// statement's result type changed since its client was told it: then the
/// client gets PostgreSQL's error (as its own session would) and the rest of
/// its batch is skipped.
fn ensure_on_server(stmt: &Arc<Stmt>, ctx: &mut ClientCtx<'_>, out: &mut BytesMut) -> bool {
    if ctx.server.contains(stmt.id) {
        ctx.server.touch(stmt.id);
        return true;
    }
    if stmt.is_retired() {
        let err = build::error("ERROR", "0A000", CACHED_PLAN);
        ctx.tracker.push(Expect::Fake(err.freeze()));
        ctx.skip_to_sync = true;
        return false;
    }
    make_room(stmt, ctx, out);
    out.extend_from_slice(&stmt.parse);
    ctx.tracker.push(Expect::SwallowParse(stmt.clone()));
    true
}

fn make_room(stmt: &Arc<Stmt>, ctx: &mut ClientCtx<'_>, out: &mut BytesMut) {
    if let Some(evicted) = ctx.server.insert(stmt.clone(), ctx.capacity) {
        prepared::put_target(out, tag::CLOSE, b'S', &evicted.name);
        ctx.tracker.push(Expect::SwallowClose(evicted));
    }
}

/// Scans server bytes beyond `dir.ready`: tracks ReadyForQuery, records
/// ParameterStatus on both the server's and the client's parameter sets, and
/// applies the tracker's verdicts (drop what Weir added, insert what Weir
/// answers). Returns true when a ReadyForQuery left nothing in flight.
fn scan_server(
    buf: &mut BytesMut,
    dir: &mut Dir,
    progress: &mut Progress,
    server: &mut ServerState<'_>,
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
        insert_fakes(buf, dir, server.tracker);
        let Some(h) = wire::header(&buf[dir.ready..])? else {
            return Ok(idle);
        };
        let available = buf.len() - dir.ready;
        if available < h.total {
            if h.total > STREAM_OVER
                && !matches!(
                    h.tag,
                    b'Z' | b'S' | b'E' | b'1' | b'2' | b'3' | b'T' | b'n' | b'C' | b'I' | b's'
                )
            {
                dir.pass = h.total;
                continue;
            }
            return Ok(idle);
        }
        if h.tag == tag::ERROR_RESPONSE && progress.lock_timeout_is_deadlock {
            retag_error(&mut buf[dir.ready..dir.ready + h.total], b"55P03", b"40P01");
        }
        let msg = &buf[dir.ready..dir.ready + h.total];
        let error = (h.tag == tag::ERROR_RESPONSE).then(|| wire::error_fields(msg).message);
        let verdict = server
            .tracker
            .on_server(h.tag, error.as_deref(), server.prepared);
        match h.tag {
            tag::READY_FOR_QUERY => {
                progress.tx = msg
                    .get(5)
                    .and_then(|&b| TxStatus::from_byte(b))
                    .ok_or(WireError::Malformed("ReadyForQuery"))?;
                progress.inflight = progress.inflight.saturating_sub(1);
                idle = progress.inflight == 0;
            }
            tag::COPY_IN_RESPONSE => {
                progress.copy_in = true;
                idle = false;
            }
            tag::PARAMETER_STATUS => {
                if let Some((k, v)) = wire::parameter_status(msg) {
                    server.params.set_reported(k, v);
                    if crate::backend::params::is_tracked(k) {
                        client_params.set_reported(k, v);
                    }
                }
                idle = false;
            }
            _ => idle = false,
        }
        if verdict == Verdict::Drop {
            splice(buf, dir.ready, h.total, &[]);
        } else {
            dir.ready += h.total;
        }
    }
}

/// Replaces SQLSTATE `from` by `to` (same length) in an ErrorResponse, in place.
pub fn retag_error(msg: &mut [u8], from: &[u8; 5], to: &[u8; 5]) {
    let mut pos = 5;
    while pos < msg.len() && msg[pos] != 0 {
        let field = msg[pos];
        let start = pos + 1;
        let Some(len) = msg[start..].iter().position(|&b| b == 0) else {
            return;
        };
        if field == b'C' && &msg[start..start + len] == from {
            msg[start..start + len].copy_from_slice(to);
            return;
        }
        pos = start + len + 1;
    }
}

/// Ends an extended batch the client left open (it ended with Flush, sent
/// nothing that executes, and all its answers are in): Weir sends the Sync
/// itself and swallows the ReadyForQuery, so the server can go back to the
/// pool or to another shard's traffic.
pub fn close_batch(
    cbuf: &mut BytesMut,
    up: &mut Dir,
    progress: &mut Progress,
    tracker: &mut Tracker,
) {
    splice(cbuf, up.ready, 0, &[tag::SYNC, 0, 0, 0, 4]);
    up.ready += 5;
    progress.inflight += 1;
    progress.unsynced = false;
    tracker.push(Expect::SwallowSync);
}

/// Forgets client statement names whose Parse failed on the server.
fn forget_failed_parses(tracker: &mut Tracker, stmts: &mut ClientStatements) {
    for (name, id) in tracker.failed_parses.drain(..) {
        if stmts.get(&name).is_some_and(|s| s.id == id) {
            stmts.remove(&name);
        }
    }
}

/// The parts of a server connection scanning its output touches.
struct ServerState<'a> {
    pub params: &'a mut ParamSet,
    pub prepared: &'a mut ServerStatements,
    pub tracker: &'a mut Tracker,
}

/// Puts the responses Weir gives itself at the current message boundary.
fn insert_fakes(buf: &mut BytesMut, dir: &mut Dir, tracker: &mut Tracker) {
    if dir.pass > 0 || !tracker.front_is_fake() {
        return;
    }
    let mut fakes = Vec::new();
    tracker.take_fakes(&mut fakes);
    for f in fakes {
        splice(buf, dir.ready, 0, &f);
        dir.ready += f.len();
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
                dir.sent += n as u64;
            }
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => break,
        }
    }
    Ok(())
}

/// Writes what is ready in both directions and waits for the next read.
pub async fn step(
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
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Event::ServerGone(io::ErrorKind::UnexpectedEof.into()))
                }
                Poll::Ready(Ok(_)) => return Poll::Ready(Event::ServerData),
                Poll::Ready(Err(e)) => return Poll::Ready(Event::ServerGone(e)),
                Poll::Pending => {}
            }
        }
        if client_open && up.ready < HIGH_WATER {
            reserve(cbuf);
            match poll_read_buf(Pin::new(&mut *client), cx, cbuf) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Event::ClientGone(io::ErrorKind::UnexpectedEof.into()))
                }
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

    struct Fixture {
        stmts: ClientStatements,
        registry: Registry,
        server: ServerStatements,
        tracker: Tracker,
        seen: Seen,
    }

    impl Fixture {
        fn new() -> Self {
            Fixture {
                stmts: ClientStatements::default(),
                registry: Registry::default(),
                server: ServerStatements::default(),
                tracker: Tracker::default(),
                seen: Seen::default(),
            }
        }
        fn scan(
            &mut self,
            buf: &mut BytesMut,
            dir: &mut Dir,
            p: &mut Progress,
        ) -> Result<(), WireError> {
            let mut ctx = ClientCtx {
                stmts: &mut self.stmts,
                registry: &self.registry,
                server: &mut self.server,
                capacity: 2,
                tracker: &mut self.tracker,
                seen: &mut self.seen,
                skip_to_sync: false,
            };
            scan_client(buf, dir, p, &mut ctx)
        }
    }

    fn parse(name: &str, q: &str) -> Vec<u8> {
        let mut b = vec![b'P'];
        let len = 4 + name.len() + 1 + q.len() + 1 + 2;
        b.extend_from_slice(&(len as i32).to_be_bytes());
        b.extend_from_slice(name.as_bytes());
        b.push(0);
        b.extend_from_slice(q.as_bytes());
        b.push(0);
        b.extend_from_slice(&[0, 0]);
        b
    }

    fn bind(stmt: &str) -> Vec<u8> {
        let mut out = BytesMut::new();
        prepared::put_bind(&mut out, "", stmt, &[0, 0, 0, 0, 0, 0]);
        out.to_vec()
    }

    #[test]
    fn counts_queries_and_syncs() {
        let mut f = Fixture::new();
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&build::query("select 1"));
        buf.extend_from_slice(&parse("", "select 1"));
        let mut dir = Dir::default();
        let mut p = Progress::default();
        f.scan(&mut buf, &mut dir, &mut p).unwrap();
        assert_eq!(p.inflight, 1);
        assert!(p.unsynced);
        assert_eq!(dir.ready, buf.len());
        buf.extend_from_slice(b"S\0\0\0\x04");
        f.scan(&mut buf, &mut dir, &mut p).unwrap();
        assert_eq!(p.inflight, 2);
        assert!(!p.unsynced);
    }

    #[test]
    fn terminate_is_not_forwarded() {
        let mut f = Fixture::new();
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&build::query("select 1"));
        let qlen = buf.len();
        buf.extend_from_slice(&build::terminate());
        let mut dir = Dir::default();
        let mut p = Progress::default();
        f.scan(&mut buf, &mut dir, &mut p).unwrap();
        assert!(p.terminated);
        assert_eq!(dir.ready, qlen);
    }

    #[test]
    fn large_query_streams_through_as_it_arrives() {
        let mut f = Fixture::new();
        let q = build::query(&"x".repeat(OBSERVE_QUERY_UP_TO + 10));
        let mut buf = BytesMut::from(&q[..7]);
        let mut dir = Dir::default();
        let mut p = Progress::default();
        f.scan(&mut buf, &mut dir, &mut p).unwrap();
        assert_eq!(dir.ready, 7);
        assert_eq!(dir.pass, q.len() - 7);
        buf.extend_from_slice(&q[7..]);
        f.scan(&mut buf, &mut dir, &mut p).unwrap();
        assert_eq!(dir.ready, q.len());
        assert_eq!(dir.pass, 0);
    }

    #[test]
    fn query_up_to_the_observe_limit_is_held_and_read() {
        let mut f = Fixture::new();
        let sql = format!("SET search_path = a; SELECT '{}'", "x".repeat(70_000));
        let q = build::query(&sql);
        let mut buf = BytesMut::from(&q[..q.len() / 2]);
        let mut dir = Dir::default();
        let mut p = Progress::default();
        f.scan(&mut buf, &mut dir, &mut p).unwrap();
        assert_eq!((dir.ready, dir.pass), (0, 0), "held until complete");
        buf.extend_from_slice(&q[q.len() / 2..]);
        f.scan(&mut buf, &mut dir, &mut p).unwrap();
        assert_eq!(dir.ready, q.len());
        assert_eq!(f.seen.params, vec!["search_path"]);
        assert!(!f.seen.unobserved);
    }

    #[test]
    fn query_over_the_observe_limit_streams_and_is_marked_unobserved() {
        let mut f = Fixture::new();
        let q = build::query(&"x".repeat(OBSERVE_QUERY_UP_TO + 1));
        let mut buf = BytesMut::from(&q[..1000]);
        let mut dir = Dir::default();
        let mut p = Progress::default();
        f.scan(&mut buf, &mut dir, &mut p).unwrap();
        assert_eq!(dir.ready, 1000);
        assert!(f.seen.unobserved);
    }

    #[test]
    fn named_parse_is_renamed_and_bind_follows() {
        let mut f = Fixture::new();
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&parse("s1", "select 1"));
        buf.extend_from_slice(&bind("s1"));
        buf.extend_from_slice(b"S\0\0\0\x04");
        let mut dir = Dir::default();
        let mut p = Progress::default();
        f.scan(&mut buf, &mut dir, &mut p).unwrap();
        assert_eq!(dir.ready, buf.len());
        let (name, _) = prepared::parse_parts(&buf).unwrap();
        assert_eq!(name, "weir_1");
        let h = wire::header(&buf).unwrap().unwrap();
        let (_, stmt, _) = prepared::bind_parts(&buf[h.total..]).unwrap();
        assert_eq!(stmt, "weir_1");
    }

    #[test]
    fn bind_on_a_server_without_the_statement_prepends_parse() {
        let mut f = Fixture::new();
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&parse("s1", "select 1"));
        let mut dir = Dir::default();
        let mut p = Progress::default();
        f.scan(&mut buf, &mut dir, &mut p).unwrap();
        // A different server: nothing prepared there.
        f.server = ServerStatements::default();
        f.tracker.clear();
        let mut buf = BytesMut::from(&bind("s1")[..]);
        let mut dir = Dir::default();
        f.scan(&mut buf, &mut dir, &mut p).unwrap();
        assert_eq!(buf[0], b'P');
        let h = wire::header(&buf).unwrap().unwrap();
        assert_eq!(buf[h.total], b'B');
        let mut ignored = ServerStatements::default();
        assert_eq!(f.tracker.on_server(b'1', None, &mut ignored), Verdict::Drop);
    }

    #[test]
    fn close_of_a_statement_is_answered_by_weir() {
        let mut f = Fixture::new();
        let mut buf = BytesMut::new();
        let mut close = BytesMut::new();
        prepared::put_target(&mut close, b'C', b'S', "s1");
        buf.extend_from_slice(&close);
        let mut dir = Dir::default();
        let mut p = Progress::default();
        f.scan(&mut buf, &mut dir, &mut p).unwrap();
        assert!(buf.is_empty());
        assert!(f.tracker.front_is_fake());
    }

    #[test]
    fn bad_client_tag_is_an_error() {
        let mut f = Fixture::new();
        let mut buf = BytesMut::from(&b"?\0\0\0\x04"[..]);
        let mut dir = Dir::default();
        let mut p = Progress::default();
        assert!(f.scan(&mut buf, &mut dir, &mut p).is_err());
    }
}
