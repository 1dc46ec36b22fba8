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
#[derive(Default)]
pub(super) struct ShardSession {
    pub pin: Option<Pin>,
    pub held: Option<HeldBegin>,
    /// Query text of the last unnamed Parse, for a later Bind of "".
    pub last_unnamed: Option<String>,
    /// The pools this session has routed to, by (shard, replica): a statement finds its
    /// pool here without the cluster's lock. Emptied when a reload builds new pools.
    pub pools: std::collections::HashMap<(usize, Option<usize>), Arc<crate::backend::Pool>>,
}

/// `CREATE`, `ALTER` or `DROP` (a statement that may change a table's columns).
pub(super) fn is_ddl(sql: &str) -> bool {
    let word = sql
        .trim_start()
        .split(|c: char| !c.is_ascii_alphabetic())
        .next()
        .unwrap_or("");
    ["create", "alter", "drop"]
        .iter()
        .any(|w| word.eq_ignore_ascii_case(w))
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
    /// How many Executes it holds (1 for a simple Query).
    pub execs: usize,
    /// The SQL and byte range of every Bind after the first (a batch of statements, as
    /// JDBC sends `BEGIN` with the first statement): each must route alike.
    pub more: Vec<(Option<String>, (usize, usize))>,
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
        execs: 0,
        more: Vec::new(),
    };
    // Statements parsed in this unit so far: the unnamed one, and named ones.
    let mut unnamed: Option<String> = None;
    let mut named: Vec<(String, Option<String>)> = Vec::new();
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
                u.execs = 1;
                u.sql = wire::cstr(wire::body(msg), 0).map(|(s, _)| s.to_string());
                u.len = pos;
                return Ok(Some(u));
            }
            tag::PARSE => {
                if let Some((name, rest)) = prepared::parse_parts(msg) {
                    let q = prepared::parse_query(rest).map(str::to_string);
                    if u.sql.is_none() {
                        u.sql = q.clone();
                    }
                    if name.is_empty() {
                        unnamed = q;
                    } else {
                        named.push((name.to_string(), q));
                    }
                }
            }
            tag::BIND if u.bind.is_some() => {
                if let Some((_, stmt, _)) = prepared::bind_parts(msg) {
                    let sql = if stmt.is_empty() {
                        unnamed.clone().or_else(|| last_unnamed.clone())
                    } else if let Some((_, q)) = named.iter().rev().find(|(n, _)| n == stmt) {
                        q.clone()
                    } else {
                        stored_sql(stmts, stmt)
                    };
                    u.more.push((sql, (pos - h.total, pos)));
                }
            }
            tag::BIND => {
                u.bind = Some((pos - h.total, pos));
                if u.sql.is_none() {
                    if let Some((_, stmt, _)) = prepared::bind_parts(msg) {
                        u.sql = if stmt.is_empty() {
                            last_unnamed.clone()
                        } else {
                            stored_sql(stmts, stmt)
                        };
                    }
                }
            }
            tag::EXECUTE => {
                u.executes = true;
                u.execs += 1;
            }
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

/// The SQL of the client's named statement `name`, as its Parse gave it.
fn stored_sql(stmts: &ClientStatements, name: &str) -> Option<String> {
    stmts
        .get(name)
        .and_then(|s| prepared::parse_parts(&s.parse))
        .and_then(|(_, rest)| prepared::parse_query(rest))
        .map(str::to_string)
}

/// Bytes the unit at the front of `buf` spans at least, as far as its headers tell: the
/// messages seen so far, the whole of a message whose header has arrived included.
pub(super) fn pending_len(buf: &[u8]) -> usize {
    let mut pos = 0;
    while let Ok(Some(h)) = wire::header(&buf[pos..]) {
        pos += h.total;
        if pos >= buf.len() || matches!(h.tag, tag::SYNC | tag::FLUSH | tag::QUERY) {
            break;
        }
    }
    pos.max(buf.len())
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
/// `Some(Ok(Some(pin)))` sets, `Some(Ok(None))` clears, `Some(Err(why))` is such a command
/// Weir refuses (a bad value, or more statements after it that would otherwise be lost),
/// `None` is not such a command.
pub(super) fn weir_setting(sql: &str) -> Option<Result<Option<Pin>, String>> {
    let t = sql
        .trim()
        .trim_end_matches(|c: char| c == ';' || c.is_whitespace());
    // Most statements are not SET/RESET: decide that before copying the text.
    let starts = |word: &str| {
        t.get(..word.len())
            .is_some_and(|w| w.eq_ignore_ascii_case(word))
    };
    if !starts("set ") && !starts("reset ") {
        return None;
    }
    let lower = t.to_ascii_lowercase();
    if let Some(rest) = lower.strip_prefix("reset ") {
        let name = rest.trim();
        if !name.starts_with("weir.") {
            return None;
        }
        return Some(match name {
            "weir.shard" | "weir.sharding_key" => Ok(None),
            _ => Err(format!("unrecognized configuration parameter \"{name}\"")),
        });
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
    let value = match value.strip_prefix('=') {
        Some(v) => v,
        None if value.len() >= 2 && value[..2].eq_ignore_ascii_case("to") => &value[2..],
        None => value,
    }
    .trim();
    let Some(value) = setting_value(value) else {
        return Some(Err(format!(
            "SET {name} takes one value and must be a statement of its own (got: {value})"
        )));
    };
    Some(match name {
        "weir.shard" => value
            .parse()
            .map(|s| Some(Pin::Shard(s)))
            .map_err(|_| format!("invalid value for parameter \"weir.shard\": \"{value}\"")),
        "weir.sharding_key" => Ok(Some(Pin::Key(value))),
        _ => Err(format!("unrecognized configuration parameter \"{name}\"")),
    })
}

/// The one value of a SET: a quoted literal (doubled quotes inside) or a bare word; `None`
/// when anything follows it (another statement).
fn setting_value(v: &str) -> Option<String> {
    if let Some(body) = v.strip_prefix('\'') {
        let mut out = String::new();
        let mut rest = body;
        while let Some(q) = rest.find('\'') {
            out.push_str(&rest[..q]);
            rest = &rest[q + 1..];
            match rest.strip_prefix('\'') {
                Some(after) => {
                    out.push('\'');
                    rest = after;
                }
                None => return rest.trim().is_empty().then_some(out),
            }
        }
        return None;
    }
    let bare = !v.is_empty() && !v.contains(|c: char| c.is_whitespace() || c == ';' || c == '\'');
    bare.then(|| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_weir_settings() {
        assert_eq!(
            weir_setting("SET weir.shard = 1"),
            Some(Ok(Some(Pin::Shard(1))))
        );
        assert_eq!(
            weir_setting("set weir.sharding_key to 'abc';"),
            Some(Ok(Some(Pin::Key("abc".into()))))
        );
        assert_eq!(
            weir_setting("set weir.sharding_key = 'it''s'"),
            Some(Ok(Some(Pin::Key("it's".into()))))
        );
        assert_eq!(weir_setting("RESET weir.shard"), Some(Ok(None)));
        assert_eq!(weir_setting("SET search_path = x"), None);
        assert_eq!(weir_setting("SELECT 'SET weir.shard = 1'"), None);
        // Mixed case and a multi-byte first character: the quick prefix check agrees.
        assert_eq!(
            weir_setting("sEt Weir.Shard = 2"),
            Some(Ok(Some(Pin::Shard(2))))
        );
        assert_eq!(weir_setting("ReSeT WEIR.shard"), Some(Ok(None)));
        assert_eq!(weir_setting("é"), None);
        assert_eq!(weir_setting("set"), None);
    }

    #[test]
    fn refuses_weir_settings_that_would_swallow_statements() {
        for sql in [
            "SET weir.shard = 1; INSERT INTO t VALUES (1)",
            "SET weir.sharding_key = 'a'; DELETE FROM t",
            "SET weir.shard = one",
            "SET weir.shard = 1 2",
            "SET weir.sharding_key = 'unterminated",
            "SET weir.nothing = 1",
        ] {
            assert!(
                matches!(weir_setting(sql), Some(Err(_))),
                "{sql}: {:?}",
                weir_setting(sql)
            );
        }
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
