//! A light look at the SQL a client sends in transaction mode, for the
//! session state Weir must carry or clean: `SET`/`RESET` of parameters, and
//! state a pooled server must not keep (SQL `PREPARE`, `LISTEN`, session
//! advisory locks, temporary tables, `WITH HOLD` cursors).
//!
//! Only statement-initial keywords are read (plus a search for advisory-lock
//! calls), skipping quotes, dollar quotes and comments; no full parse.

use crate::router::shape::{skip_block_comment, skip_dollar_quote, skip_quoted, word_end};

/// Server state a client left that another client must not inherit.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dirty {
    pub prepared: bool,
    pub listen: bool,
    pub advisory: bool,
    pub temp: bool,
    pub hold_cursor: bool,
}

impl Dirty {
    pub fn any(&self) -> bool {
        self.prepared || self.listen || self.advisory || self.temp || self.hold_cursor
    }

    /// The clean-up statement, only what is needed.
    pub fn cleanup_sql(&self) -> String {
        let mut parts = Vec::new();
        if self.hold_cursor {
            parts.push("CLOSE ALL");
        }
        if self.prepared {
            parts.push("DEALLOCATE ALL");
        }
        if self.listen {
            parts.push("UNLISTEN *");
        }
        if self.advisory {
            parts.push("SELECT pg_catalog.pg_advisory_unlock_all()");
        }
        if self.temp {
            parts.push("DISCARD TEMP");
        }
        parts.join("; ")
    }
}

/// What the SQL of one transaction did that Weir must follow.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Parameters set or reset at session level (lower case).
    pub params: Vec<String>,
    pub reset_all: bool,
    /// `DEALLOCATE ALL` or `DISCARD ALL`: every prepared statement is gone.
    pub dealloc_all: bool,
    /// `DEALLOCATE [PREPARE] name`.
    pub dealloc: Vec<String>,
    pub dirty: Dirty,
    /// DDL that may change a prepared statement's result type (ALTER, DROP,
    /// CREATE OR REPLACE); consumed by the relay.
    pub ddl: bool,
    /// SQL whose effect on session state this light scan cannot know: a query too large to
    /// hold back (streamed through unread) or a `set_config(…)` call. The server is inspected
    /// when the transaction ends (`pg_settings`, `pg_prepared_statements`, …).
    pub unobserved: bool,
}

impl Seen {
    pub fn is_empty(&self) -> bool {
        *self == Seen::default()
    }
}

/// Reads one query string (possibly several statements).
pub fn observe(sql: &str, seen: &mut Seen) {
    let (stmts, calls) = statements(sql);
    if calls.advisory {
        seen.dirty.advisory = true;
    }
    if calls.set_config {
        seen.unobserved = true;
    }
    for stmt in stmts {
        observe_statement(&stmt, seen);
    }
}

/// Whether `sql` changes session state that outlives its transaction (so each execution of a
/// prepared statement with this text must be followed). DDL alone does not count.
pub fn touches_session(sql: &str) -> bool {
    let mut seen = Seen::default();
    observe(sql, &mut seen);
    seen.ddl = false;
    !seen.is_empty()
}

fn observe_statement(words: &[String], seen: &mut Seen) {
    let w = |i: usize| words.get(i).map(String::as_str).unwrap_or("");
    match w(0) {
        "set" => {
            let (scope, name_at) = match w(1) {
                "local" => return,
                "session" if w(2) != "authorization" && w(2) != "characteristics" => ("session", 2),
                _ => ("", 1),
            };
            let _ = scope;
            let name = match (w(name_at), w(name_at + 1)) {
                ("time", "zone") => "timezone".to_string(),
                ("names", _) => "client_encoding".to_string(),
                ("schema", _) => "search_path".to_string(),
                ("transaction", _) | ("constraints", _) | ("characteristics", _) => return,
                ("session", "authorization") => "session_authorization".to_string(),
                (n, _) if !n.is_empty() => n.to_string(),
                _ => return,
            };
            push_unique(&mut seen.params, name);
        }
        "reset" => match w(1) {
            "all" => seen.reset_all = true,
            "time" => push_unique(&mut seen.params, "timezone".into()),
            "session" => push_unique(&mut seen.params, "session_authorization".into()),
            "" => {}
            n => push_unique(&mut seen.params, n.to_string()),
        },
        "discard" => match w(1) {
            "all" => {
                seen.reset_all = true;
                seen.dealloc_all = true;
            }
            "plans" => {}
            _ => {}
        },
        "deallocate" => {
            let name = if w(1) == "prepare" { w(2) } else { w(1) };
            if name == "all" {
                seen.dealloc_all = true;
            } else if !name.is_empty() {
                seen.dealloc.push(name.to_string());
            }
        }
        "prepare" if w(1) != "transaction" => seen.dirty.prepared = true,
        "listen" => seen.dirty.listen = true,
        "alter" | "drop" => seen.ddl = true,
        "create" => {
            if w(1) == "or" && w(2) == "replace" {
                seen.ddl = true;
            }
            let temp = words
                .iter()
                .skip(1)
                .take(3)
                .any(|x| x == "temp" || x == "temporary");
            if temp {
                seen.dirty.temp = true;
            }
        }
        "declare" if words.windows(2).any(|p| p[0] == "with" && p[1] == "hold") => {
            seen.dirty.hold_cursor = true;
        }
        _ => {}
    }
}

fn push_unique(v: &mut Vec<String>, s: String) {
    if !v.contains(&s) {
        v.push(s);
    }
}

fn contains_ci(hay: &str, needle: &str) -> bool {
    hay.as_bytes()
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

/// Statement-initial keywords Weir acts on.
const INTERESTING: &[&str] = &[
    "set",
    "reset",
    "discard",
    "deallocate",
    "prepare",
    "listen",
    "create",
    "declare",
    "alter",
    "drop",
];

/// Splits SQL into statements and returns each one's words (lower-cased
/// identifiers and keywords; quoted identifiers keep their case; literals and
/// punctuation are dropped). Only the first words matter to callers. Also
/// reports whether any word names an advisory-lock function.
fn statements(sql: &str) -> (Vec<Vec<String>>, Calls) {
    const MAX_WORDS: usize = 12;
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut cur: Vec<String> = Vec::new();
    // Set when a statement's first word is of no interest: its words are not kept.
    let mut skip = false;
    let mut calls = Calls::default();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b';' => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                skip = false;
                i += 1;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => i = skip_block_comment(b, i),
            b'\'' => i = skip_quoted(b, i, b'\''),
            b'"' => {
                let end = skip_quoted(b, i, b'"');
                if cur.is_empty() {
                    skip = true;
                }
                if !skip && cur.len() < MAX_WORDS {
                    // Without its closing quote (unterminated) the name runs to the end.
                    let closed = end > i + 1 && b[end - 1] == b'"';
                    let inner = &b[i + 1..if closed { end - 1 } else { end }];
                    cur.push(String::from_utf8_lossy(inner).replace("\"\"", "\""));
                }
                i = end;
            }
            // $tag$ … $tag$ (or a parameter $1).
            b'$' => i = skip_dollar_quote(b, i),
            c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                let start = i;
                i = word_end(b, i);
                // Dotted names (custom GUCs such as myapp.tenant) stay one word.
                while i < b.len()
                    && b[i] == b'.'
                    && b.get(i + 1)
                        .is_some_and(|x| x.is_ascii_alphabetic() || *x == b'_')
                {
                    i += 1;
                    while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                        i += 1;
                    }
                }
                // pg_advisory_lock, pg_try_advisory_lock_shared, … (any schema).
                if i - start >= 13 && !calls.advisory {
                    calls.advisory = contains_ci(&sql[start..i], "advisory_lock");
                }
                // set_config(name, value, false) sets a parameter for the session.
                if i - start >= 10 && !calls.set_config {
                    let word = &b[start..i];
                    calls.set_config = word[word.len() - 10..].eq_ignore_ascii_case(b"set_config");
                }
                if cur.is_empty() && !skip {
                    let word = &sql[start..i];
                    skip = !INTERESTING.iter().any(|k| k.eq_ignore_ascii_case(word));
                }
                if !skip && cur.len() < MAX_WORDS {
                    cur.push(sql[start..i].to_ascii_lowercase());
                }
            }
            _ => i += 1,
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    (out, calls)
}

/// The statement name of a query that is exactly `DEALLOCATE [PREPARE] name` (an optional
/// trailing `;`, no comment, not `ALL`): unquoted names fold to lower case, as PostgreSQL's.
pub fn sole_deallocate(sql: &str) -> Option<String> {
    let s = sql.trim();
    let s = s.strip_suffix(';').unwrap_or(s).trim_end();
    let (first, rest) = s.split_once(|c: char| c.is_ascii_whitespace())?;
    if !first.eq_ignore_ascii_case("deallocate") {
        return None;
    }
    let mut rest = rest.trim_start();
    if let Some((word, after)) = rest.split_once(|c: char| c.is_ascii_whitespace()) {
        if !word.eq_ignore_ascii_case("prepare") {
            return None;
        }
        rest = after.trim_start();
    }
    if let Some(quoted) = rest.strip_prefix('"') {
        let inner = quoted.strip_suffix('"')?;
        let name = inner.replace("\"\"", "\"");
        // A lone quote inside would have ended the name: not one identifier.
        return (!inner.replace("\"\"", "").contains('"') && !name.is_empty()).then_some(name);
    }
    let mut chars = rest.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || !c.is_ascii());
    let ident = first_ok
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$' || !c.is_ascii());
    (ident && !rest.eq_ignore_ascii_case("all")).then(|| rest.to_ascii_lowercase())
}

/// Functions whose call changes session state, wherever they appear in a statement.
#[derive(Debug, Default, Clone, Copy)]
struct Calls {
    advisory: bool,
    set_config: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(sql: &str) -> Seen {
        let mut s = Seen::default();
        observe(sql, &mut s);
        s
    }

    #[test]
    fn finds_session_sets() {
        assert_eq!(seen("SET search_path TO a, b").params, vec!["search_path"]);
        assert_eq!(
            seen("set session statement_timeout = '5s'").params,
            vec!["statement_timeout"]
        );
        assert_eq!(seen("SET TIME ZONE 'UTC'").params, vec!["timezone"]);
        assert_eq!(seen("SET myapp.tenant = 7").params, vec!["myapp.tenant"]);
        assert!(seen("SET LOCAL search_path TO x").params.is_empty());
        assert!(seen("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
            .params
            .is_empty());
        assert_eq!(seen("RESET work_mem").params, vec!["work_mem"]);
        assert!(seen("RESET ALL").reset_all);
        assert_eq!(seen("select 1; SET role = x;").params, vec!["role"]);
    }

    #[test]
    fn ignores_keywords_in_literals_and_comments() {
        assert!(seen("SELECT 'set x = 1; listen y'").is_empty());
        assert!(seen("-- listen x\nSELECT 1").is_empty());
        assert!(seen("/* prepare */ SELECT $$ ; listen a $$").is_empty());
        assert!(seen("SELECT \"listen\" FROM t").is_empty());
    }

    #[test]
    fn finds_dirty_state() {
        assert!(seen("PREPARE p AS SELECT 1").dirty.prepared);
        assert!(seen("LISTEN chan").dirty.listen);
        assert!(seen("select pg_advisory_lock(1)").dirty.advisory);
        assert!(!seen("select pg_advisory_xact_lock(1)").dirty.advisory);
        assert!(seen("CREATE TEMP TABLE t (x int)").dirty.temp);
        assert!(seen("create temporary table t (x int)").dirty.temp);
        assert!(seen("create global temporary table t (x int)").dirty.temp);
        assert!(
            seen("DECLARE c CURSOR WITH HOLD FOR SELECT 1")
                .dirty
                .hold_cursor
        );
        assert!(!seen("DECLARE c CURSOR FOR SELECT 1").dirty.hold_cursor);
        let d = seen("LISTEN a; PREPARE p AS SELECT 1").dirty;
        assert_eq!(d.cleanup_sql(), "DEALLOCATE ALL; UNLISTEN *");
    }

    #[test]
    fn set_config_calls_are_unobserved_state() {
        assert!(seen("SELECT set_config('search_path', 'x', false)").unobserved);
        assert!(seen("select PG_CATALOG.SET_CONFIG('a.b', '1', false)").unobserved);
        assert!(!seen("SELECT 'set_config(1)'").unobserved);
        assert!(!seen("SELECT my_set_configs()").unobserved);
    }

    #[test]
    fn unterminated_quoted_name_ending_in_multibyte_text() {
        // Found by the sql_routing fuzz target: used to slice inside the 'é'.
        assert_eq!(seen("SET \"é").params, vec!["é"]);
        assert_eq!(seen("SET \"a\"\"b\" = 1").params, vec!["a\"b"]);
    }

    #[test]
    fn sole_deallocate_takes_one_named_statement_only() {
        assert_eq!(
            sole_deallocate("DEALLOCATE dbdpg_p1_2").as_deref(),
            Some("dbdpg_p1_2")
        );
        assert_eq!(
            sole_deallocate(" deallocate prepare Foo ; ").as_deref(),
            Some("foo")
        );
        assert_eq!(
            sole_deallocate("DEALLOCATE \"Mixed\"\"q\"").as_deref(),
            Some("Mixed\"q")
        );
        for other in [
            "DEALLOCATE ALL",
            "DEALLOCATE PREPARE all",
            "DEALLOCATE",
            "DEALLOCATE a; SELECT 1",
            "DEALLOCATE a b",
            "DEALLOCATE a -- c",
            "DEALLOCATE \"a\"b\"",
            "DEALLOCATE \"\"",
            "SELECT 1",
            "deallocatex a",
        ] {
            assert_eq!(sole_deallocate(other), None, "{other}");
        }
    }

    #[test]
    fn deallocate_and_discard() {
        assert_eq!(seen("DEALLOCATE foo").dealloc, vec!["foo"]);
        assert_eq!(seen("deallocate prepare foo").dealloc, vec!["foo"]);
        assert!(seen("DEALLOCATE ALL").dealloc_all);
        let s = seen("DISCARD ALL");
        assert!(s.dealloc_all && s.reset_all);
    }
}
