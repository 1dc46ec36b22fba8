//! The few protocol exchanges resharding drives on its own server connections: COPY out
//! and in, batches of statements, and the messages of a replication stream.

use crate::backend::ServerConn;
use crate::net::read_message;
use crate::wire::{self, build, tag};
use bytes::{BufMut, BytesMut};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// How long one exchange with a server may take before resharding gives up on it.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(600);

pub type Result<T> = std::result::Result<T, String>;

/// The next message from the server, or an error if it closed.
pub async fn recv(conn: &mut ServerConn) -> Result<BytesMut> {
    match read_message(&mut conn.stream, &mut conn.buf).await {
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err(format!("server {} closed the connection", conn.address)),
        Err(e) => Err(format!("server {}: {e}", conn.address)),
    }
}

/// True when a whole message is already buffered (reading it will not wait).
pub fn has_buffered_message(conn: &ServerConn) -> bool {
    matches!(wire::header(&conn.buf), Ok(Some(h)) if conn.buf.len() >= h.total)
}

pub async fn send(conn: &mut ServerConn, bytes: &[u8]) -> Result<()> {
    conn.stream
        .write_all(bytes)
        .await
        .map_err(|e| format!("server {}: {e}", conn.address))
}

/// An ErrorResponse's message (with its SQLSTATE) in words.
pub fn error_text(msg: &[u8]) -> String {
    let f = wire::error_fields(msg);
    format!("{} ({})", f.message, f.code)
}

/// Runs `sql` (one or more statements) and returns the rows of all of them as text.
pub async fn query(conn: &mut ServerConn, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
    let addr = conn.address.to_string();
    match tokio::time::timeout(EXCHANGE_TIMEOUT, conn.query_rows(sql)).await {
        Ok(Ok(rows)) => Ok(rows),
        Ok(Err(e)) => Err(format!("{addr}: {e}")),
        Err(_) => Err(format!("{addr}: timed out")),
    }
}

/// [`query`] without a time limit: building a big table's indexes takes what it takes.
pub async fn query_long(conn: &mut ServerConn, sql: &str) -> Result<()> {
    let addr = conn.address.to_string();
    conn.query_rows(sql)
        .await
        .map(|_| ())
        .map_err(|e| format!("{addr}: {e}"))
}

/// Session settings for every connection resharding opens: values travel as text, so both
/// sides must write and read them alike (as pg_dump pins them).
pub const SESSION: &[(&str, &str)] = &[
    ("DateStyle", "ISO"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "3"),
];

/// Sends `sql` without waiting for the answer (see [`finish`]).
pub async fn start(conn: &mut ServerConn, sql: &str) -> Result<()> {
    send(conn, &build::query(sql)).await
}

/// Reads the answer of a query sent with [`start`] up to ReadyForQuery; its first error
/// is the result.
pub async fn finish(conn: &mut ServerConn) -> Result<()> {
    let mut error = None;
    loop {
        let m = recv(conn).await?;
        match m[0] {
            tag::READY_FOR_QUERY => return error.map_or(Ok(()), Err),
            tag::ERROR_RESPONSE if error.is_none() => {
                error = Some(format!("{}: {}", conn.address, error_text(&m)))
            }
            tag::COPY_IN_RESPONSE => {
                send(conn, &build::copy_fail("unexpected COPY")).await?;
            }
            _ => {}
        }
    }
}

/// Sends `sql` and waits for the server to answer it with a message tagged `wanted`; an
/// error instead is the result (the server is then ready again).
pub async fn start_expecting(conn: &mut ServerConn, sql: &str, wanted: u8) -> Result<()> {
    start(conn, sql).await?;
    loop {
        let m = recv(conn).await?;
        if m[0] == wanted {
            return Ok(());
        }
        if m[0] == tag::ERROR_RESPONSE {
            let e = format!("{}: {}", conn.address, error_text(&m));
            finish(conn).await.ok();
            return Err(e);
        }
    }
}

/// Starts `COPY … TO STDOUT`: returns once the server is sending data.
pub async fn copy_out_start(conn: &mut ServerConn, sql: &str) -> Result<()> {
    start_expecting(conn, sql, tag::COPY_OUT_RESPONSE).await
}

/// The next chunk of COPY data, or `None` at its end (the server is then ready again).
pub async fn copy_out_next(conn: &mut ServerConn) -> Result<Option<BytesMut>> {
    loop {
        let m = recv(conn).await?;
        match m[0] {
            b'd' => return Ok(Some(m)),
            b'c' => {
                finish(conn).await?;
                return Ok(None);
            }
            tag::ERROR_RESPONSE => {
                let e = format!("{}: {}", conn.address, error_text(&m));
                finish(conn).await.ok();
                return Err(e);
            }
            _ => {}
        }
    }
}

/// Starts `COPY … FROM STDIN`: returns once the server takes data.
pub async fn copy_in_start(conn: &mut ServerConn, sql: &str) -> Result<()> {
    start_expecting(conn, sql, tag::COPY_IN_RESPONSE).await
}

/// Ends a COPY FROM STDIN with `last` data (may be empty) and waits for its outcome.
pub async fn copy_in_end(conn: &mut ServerConn, last: &[u8]) -> Result<()> {
    let mut out = BytesMut::with_capacity(last.len() + 16);
    if !last.is_empty() {
        build::put_copy_data(&mut out, last);
    }
    out.extend_from_slice(&build::copy_done());
    send(conn, &out).await?;
    finish(conn).await
}

/// A standby status update on a replication stream: `lsn` written, flushed and applied.
pub fn status_update(lsn: u64) -> BytesMut {
    let mut body = BytesMut::with_capacity(34);
    body.put_u8(b'r');
    body.put_u64(lsn);
    body.put_u64(lsn);
    body.put_u64(lsn);
    body.put_i64(pg_now_us());
    body.put_u8(0);
    let mut out = BytesMut::with_capacity(40);
    build::put_copy_data(&mut out, &body);
    out
}

/// Microseconds since 2000-01-01, PostgreSQL's epoch.
fn pg_now_us() -> i64 {
    const PG_EPOCH_UNIX_S: i64 = 946_684_800;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    now - PG_EPOCH_UNIX_S * 1_000_000
}
