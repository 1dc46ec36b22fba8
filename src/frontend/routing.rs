//! The session side of sharding: gather one routable unit of client messages
//! (a simple Query, or an extended batch up to Sync/Flush), find its SQL and
//! Bind parameters, and answer locally what needs no server: a held `BEGIN`,
//! `SET weir.shard`/`weir.sharding_key`, and refusals.

use crate::backend::prepared::{self, ClientStatements};
use crate::router::route::{BindParams, Pin, ShardRouter};
use crate::router::shape::Shape;
use crate::router::sql::Analysis;
use crate::wire::{self, tag, WireError};
use std::sync::Arc;

/// A `BEGIN` Weir has answered but not yet sent: it goes to the shard the
/// first real statement picks.
#[derive(Debug, Clone)]
pub(super) struct HeldBegin {
    pub sql: String,
    pub read_only: bool,
    /// A refused statement failed the (virtual) transaction.
    pub failed: bool,
}

/// Per-session sharding state.
#[derive(Debug, Default)]
pub(super) struct ShardSession {
    pub pin: Option<Pin>,
    pub held: Option<HeldBegin>,
    /// Query text of the last unnamed Parse, for a later Bind of "".
    pub last_unnamed: Option<String>,
}

/// One routable unit at the front of the client buffer.
#[derive(Debug)]
pub(super) struct Unit {
    /// Bytes the unit spans.
    pub len: usize,
    pub simple: bool,
    /// Ends with Sync (or is a simple Query): expects ReadyForQuery.
    pub synced: bool,
    pub sql: Option<String>,
    /// Byte range of the first Bind.
    pub bind: Option<(usize, usize)>,
    /// Contains an Execute (or is a simple Query): something runs.
    pub executes: bool,
}

/// Finds the unit at the front of `buf`; `None` until it is complete.
pub(super) fn unit(
    buf: &[u8],
    stmts: &ClientStatements,
    last_unnamed: &Option<String>,
) -> Result<Option<Unit>, WireError> {
    let mut pos = 0;
    let mut u = Unit {
        len: 0,
        simple: false,
        synced: false,
        sql: None,
        bind: None,
        executes: false,
    };
    loop {
        let Some(h) = wire::header(&buf[pos..])? else {
            return Ok(None);
        };
        if buf.len() - pos < h.total {
            return Ok(None);
        }
        let msg = &buf[pos..pos + h.total];
        pos += h.total;
        match h.tag {
            tag::QUERY if pos == h.total => {
                u.simple = true;
                u.synced = true;
                u.executes = true;
                u.sql = wire::cstr(wire::body(msg), 0).map(|(s, _)| s.to_string());
                u.len = pos;
                return Ok(Some(u));
            }
            tag::PARSE => {
                if let Some((name, rest)) = prepared::parse_parts(msg) {
                    let q = prepared::parse_query(rest).map(str::to_string);
                    if u.sql.is_none() {
                        u.sql = q;
                    }
                    let _ = name;
                }
            }
            tag::BIND if u.bind.is_none() => {
                u.bind = Some((pos - h.total, pos));
                if u.sql.is_none() {
                    if let Some((_, stmt, _)) = prepared::bind_parts(msg) {
                        u.sql = if stmt.is_empty() {
                            last_unnamed.clone()
                        } else {
                            stmts
                                .get(stmt)
                                .and_then(|s| prepared::parse_parts(&s.parse))
                                .and_then(|(_, rest)| prepared::parse_query(rest))
                                .map(str::to_string)
                        };
                    }
                }
            }
            tag::EXECUTE => u.executes = true,
            tag::SYNC => {
                u.synced = true;
                u.len = pos;
                return Ok(Some(u));
            }
            tag::FLUSH | tag::QUERY | tag::TERMINATE => {
                u.len = pos;
                return Ok(Some(u));
            }
            _ => {}
        }
    }
}

/// `SET LOCAL …` or `SET TRANSACTION …`: state of the transaction only, so it
/// can travel with a held `BEGIN`.
pub(super) fn is_transaction_set(sql: &str) -> bool {
    let lower = sql.trim_start().to_ascii_lowercase();
    let mut words = lower.split_whitespace();
    words.next() == Some("set")
        && matches!(words.next(), Some("local") | Some("transaction"))
        && !lower.contains("weir.")
}

/// A query Weir sends in place of a unit it refuses inside a transaction:
/// the server raises the error, so the transaction aborts as it would on
/// PostgreSQL and a later COMMIT cannot keep half of it.
pub(super) fn raise_query(code: &str, message: &str) -> bytes::BytesMut {
    let message = message.replace('$', "");
    crate::wire::build::query(&format!(
        "DO $weir$BEGIN RAISE EXCEPTION USING ERRCODE = '{code}', MESSAGE = $m${message}$m$; END$weir$"
    ))
}

/// The analysis of a unit's SQL: by shape for a simple query (see
/// `router::shape`), by its text otherwise.
pub(super) fn analyze_unit<'a>(
    router: &ShardRouter,
    unit: &Unit,
    sql: &'a str,
) -> (Arc<Analysis>, Option<Shape<'a>>) {
    if unit.simple {
        router.analyze_simple(sql)
    } else {
        (router.analyze(sql), None)
    }
}

/// The parameter values routing reads: the literals lifted from a simple
/// query's shape, or the unit's Bind.
pub(super) fn unit_params<'a>(
    cbuf: &'a [u8],
    unit: &Unit,
    shape: &'a Option<Shape<'a>>,
) -> BindParams<'a> {
    match shape {
        Some(s) => BindParams::from_text(&s.values),
        None => unit
            .bind
            .and_then(|(a, b)| BindParams::parse(&cbuf[a..b]))
            .unwrap_or_default(),
    }
}

/// Remembers the text of unnamed Parses in a unit.
pub(super) fn note_unnamed(buf: &[u8], last: &mut Option<String>) {
    let mut pos = 0;
    while let Ok(Some(h)) = wire::header(&buf[pos..]) {
        if buf.len() - pos < h.total {
            return;
        }
        let msg = &buf[pos..pos + h.total];
        if h.tag == tag::PARSE {
            if let Some(("", rest)) = prepared::parse_parts(msg) {
                *last = prepared::parse_query(rest).map(str::to_string);
            }
        }
        pos += h.total;
    }
}

/// `SET weir.shard = N`, `SET weir.sharding_key = 'v'`, `RESET weir.…`:
/// `Some(Some(pin))` sets, `Some(None)` clears, `None` is not such a command.
pub(super) fn weir_setting(sql: &str) -> Option<Option<Pin>> {
    let t = sql.trim().trim_end_matches(';').trim();
    let lower = t.to_ascii_lowercase();
    if let Some(rest) = lower.strip_prefix("reset ") {
        return rest.trim().starts_with("weir.").then_some(None);
    }
    let rest = lower.strip_prefix("set ")?.trim_start();
    let rest = rest.strip_prefix("session ").unwrap_or(rest).trim_start();
    let name_end = rest.find(|c: char| c.is_whitespace() || c == '=')?;
    let name = &rest[..name_end];
    if !name.starts_with("weir.") {
        return None;
    }
    let value_at = t.len() - rest.len() + name_end;
    let value = t[value_at..].trim_start();
    let value = value
        .strip_prefix('=')
        .or_else(|| value.strip_prefix("to"))
        .or_else(|| value.strip_prefix("TO"))
        .unwrap_or(value)
        .trim()
        .trim_matches('\'');
    match name {
        "weir.shard" => Some(value.parse().ok().map(Pin::Shard)),
        "weir.sharding_key" => Some(Some(Pin::Key(value.to_string()))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_weir_settings() {
        assert_eq!(
            weir_setting("SET weir.shard = 1"),
            Some(Some(Pin::Shard(1)))
        );
        assert_eq!(
            weir_setting("set weir.sharding_key to 'abc';"),
            Some(Some(Pin::Key("abc".into())))
        );
        assert_eq!(weir_setting("RESET weir.shard"), Some(None));
        assert_eq!(weir_setting("SET search_path = x"), None);
    }

    #[test]
    fn finds_units() {
        let q = crate::wire::build::query("select 1");
        let u = unit(&q, &ClientStatements::default(), &None)
            .unwrap()
            .unwrap();
        assert!(u.simple && u.synced);
        assert_eq!(u.len, q.len());
        assert!(unit(&q[..3], &ClientStatements::default(), &None)
            .unwrap()
            .is_none());
    }
}
