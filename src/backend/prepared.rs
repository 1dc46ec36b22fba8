//! Protocol-level prepared statements across server connections.
//!
//! A client's named Parse is mapped to a Weir-wide statement keyed by its
//! query text and parameter types (`weir_<n>`). Each server connection
//! remembers which of those it holds (bounded LRU, `max_prepared_statements`);
//! when a client's Bind or Describe reaches a server that lacks its statement,
//! the Parse is prepended in the same batch and its ParseComplete swallowed.
//! A client's Close is answered by Weir and never reaches the server, so it
//! cannot break another client's use of the same statement.

use crate::wire;
use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// A statement as the servers know it.
#[derive(Debug)]
pub struct Stmt {
    pub id: u64,
    pub name: String,
    /// The complete Parse message, carrying the Weir-wide name.
    pub parse: Bytes,
    /// The registry's schema epoch when this statement was created.
    epoch: u64,
    /// A server said its result type changed: clients that hold it get
    /// PostgreSQL's error, and a new Parse of the same text gets a new statement.
    retired: AtomicBool,
    /// Its SQL changes session state (a `SET`, `set_config`, `LISTEN`, …): each execution,
    /// in whatever later transaction, must be followed as the Parse was.
    touches_session: AtomicBool,
}

impl Stmt {
    pub fn mark_touches_session(&self) {
        self.touches_session.store(true, Ordering::Relaxed);
    }

    pub fn touches_session(&self) -> bool {
        self.touches_session.load(Ordering::Relaxed)
    }

    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }
}

/// Weir-wide statements, keyed by the Parse body after the name
/// (query text and parameter types).
#[derive(Default)]
pub struct Registry {
    map: Mutex<HashMap<Bytes, Arc<Stmt>>>,
    next: AtomicU64,
    /// Bumped when a client runs DDL: a Parse after it must not reuse a
    /// server's plan from before it, whose result type may differ.
    epoch: AtomicU64,
}

/// Prune statements no client refers to once the registry grows past this.
const REGISTRY_SOFT_LIMIT: usize = 10_000;

impl Registry {
    /// The statement for a Parse body's query-and-types part.
    pub fn intern(&self, key: &[u8]) -> Arc<Stmt> {
        let epoch = self.epoch.load(Ordering::Relaxed);
        let mut map = self.map.lock();
        if let Some(s) = map.get(key) {
            if s.epoch == epoch && !s.is_retired() {
                return s.clone();
            }
        }
        if map.len() >= REGISTRY_SOFT_LIMIT {
            map.retain(|_, s| Arc::strong_count(s) > 1);
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let name = format!("weir_{id}");
        let mut parse = BytesMut::with_capacity(key.len() + name.len() + 6);
        parse.put_u8(b'P');
        parse.put_i32((4 + name.len() + 1 + key.len()) as i32);
        parse.put_slice(name.as_bytes());
        parse.put_u8(0);
        parse.put_slice(key);
        let stmt = Arc::new(Stmt {
            id,
            name,
            parse: parse.freeze(),
            epoch,
            retired: AtomicBool::new(false),
            touches_session: AtomicBool::new(false),
        });
        map.insert(Bytes::copy_from_slice(key), stmt.clone());
        stmt
    }

    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    /// Schema may have changed: later Parses get fresh statements.
    pub fn bump_epoch(&self) {
        self.epoch.fetch_add(1, Ordering::Relaxed);
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Which Weir-wide statements one server connection holds, least recently
/// used first out.
#[derive(Debug, Default)]
pub struct ServerStatements {
    held: HashMap<u64, (u64, Arc<Stmt>)>,
    tick: u64,
}

impl ServerStatements {
    pub fn contains(&self, id: u64) -> bool {
        self.held.contains_key(&id)
    }

    pub fn touch(&mut self, id: u64) {
        self.tick += 1;
        if let Some(e) = self.held.get_mut(&id) {
            e.0 = self.tick;
        }
    }

    /// Records a statement; returns one to close first if over `capacity`.
    pub fn insert(&mut self, stmt: Arc<Stmt>, capacity: usize) -> Option<Arc<Stmt>> {
        self.tick += 1;
        let evicted = if self.held.len() >= capacity.max(1) && !self.held.contains_key(&stmt.id) {
            let oldest = self
                .held
                .iter()
                .min_by_key(|(_, (t, _))| *t)
                .map(|(id, _)| *id);
            oldest.and_then(|id| self.held.remove(&id)).map(|(_, s)| s)
        } else {
            None
        };
        self.held.insert(stmt.id, (self.tick, stmt));
        evicted
    }

    pub fn remove(&mut self, id: u64) {
        self.held.remove(&id);
    }

    /// After `DEALLOCATE ALL` / `DISCARD ALL` reached the server.
    pub fn clear(&mut self) {
        self.held.clear();
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

/// The statement names one client has prepared.
#[derive(Debug, Default)]
pub struct ClientStatements {
    map: HashMap<String, Arc<Stmt>>,
}

impl ClientStatements {
    pub fn get(&self, name: &str) -> Option<&Arc<Stmt>> {
        self.map.get(name)
    }
    pub fn insert(&mut self, name: &str, stmt: Arc<Stmt>) {
        self.map.insert(name.to_string(), stmt);
    }
    pub fn remove(&mut self, name: &str) -> bool {
        self.map.remove(name).is_some()
    }
    pub fn clear(&mut self) {
        self.map.clear();
    }
}

/// The name a Parse gives its statement, and the rest of its body.
pub fn parse_parts(msg: &[u8]) -> Option<(&str, &[u8])> {
    let body = wire::body(msg);
    let (name, pos) = wire::cstr(body, 0)?;
    Some((name, &body[pos..]))
}

/// The query text of a Parse body's remainder (query, types).
pub fn parse_query(rest: &[u8]) -> Option<&str> {
    wire::cstr(rest, 0).map(|(q, _)| q)
}

/// Portal, statement name and the rest of a Bind body.
pub fn bind_parts(msg: &[u8]) -> Option<(&str, &str, &[u8])> {
    let body = wire::body(msg);
    let (portal, pos) = wire::cstr(body, 0)?;
    let (stmt, pos) = wire::cstr(body, pos)?;
    Some((portal, stmt, &body[pos..]))
}

/// Kind byte ('S' or 'P') and name of a Describe or Close.
pub fn target_parts(msg: &[u8]) -> Option<(u8, &str)> {
    let body = wire::body(msg);
    let kind = *body.first()?;
    let (name, _) = wire::cstr(body, 1)?;
    Some((kind, name))
}

fn begin(out: &mut BytesMut, tag: u8) -> usize {
    out.put_u8(tag);
    let at = out.len();
    out.put_i32(0);
    at
}

fn finish(out: &mut BytesMut, at: usize) {
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Appends a Bind naming `stmt` in place of the client's statement name.
pub fn put_bind(out: &mut BytesMut, portal: &str, stmt: &str, rest: &[u8]) {
    let at = begin(out, b'B');
    out.put_slice(portal.as_bytes());
    out.put_u8(0);
    out.put_slice(stmt.as_bytes());
    out.put_u8(0);
    out.put_slice(rest);
    finish(out, at);
}

/// Appends a Describe or Close of statement `name`.
pub fn put_target(out: &mut BytesMut, tag: u8, kind: u8, name: &str) {
    let at = begin(out, tag);
    out.put_u8(kind);
    out.put_slice(name.as_bytes());
    out.put_u8(0);
    finish(out, at);
}

pub const PARSE_COMPLETE: &[u8] = b"1\0\0\0\x04";
pub const CLOSE_COMPLETE: &[u8] = b"3\0\0\0\x04";

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_msg(name: &str, query: &str) -> BytesMut {
        let mut b = BytesMut::new();
        let at = begin(&mut b, b'P');
        b.put_slice(name.as_bytes());
        b.put_u8(0);
        b.put_slice(query.as_bytes());
        b.put_u8(0);
        b.put_i16(0);
        finish(&mut b, at);
        b
    }

    #[test]
    fn same_query_same_statement() {
        let r = Registry::default();
        let m1 = parse_msg("a", "select 1");
        let m2 = parse_msg("b", "select 1");
        let (_, k1) = parse_parts(&m1).unwrap();
        let (_, k2) = parse_parts(&m2).unwrap();
        let s1 = r.intern(k1);
        let s2 = r.intern(k2);
        assert_eq!(s1.id, s2.id);
        let (name, rest) = parse_parts(&s1.parse).unwrap();
        assert_eq!(name, s1.name);
        assert_eq!(parse_query(rest), Some("select 1"));
        let s3 = r.intern(parse_parts(&parse_msg("a", "select 2")).unwrap().1);
        assert_ne!(s3.id, s1.id);
    }

    #[test]
    fn lru_evicts_least_recent() {
        let r = Registry::default();
        let a = r.intern(b"a\0\0\0");
        let b = r.intern(b"b\0\0\0");
        let c = r.intern(b"c\0\0\0");
        let mut s = ServerStatements::default();
        assert!(s.insert(a.clone(), 2).is_none());
        assert!(s.insert(b.clone(), 2).is_none());
        s.touch(a.id);
        let evicted = s.insert(c.clone(), 2).unwrap();
        assert_eq!(evicted.id, b.id);
        assert!(s.contains(a.id) && s.contains(c.id) && !s.contains(b.id));
    }

    #[test]
    fn rewrites_bind() {
        let mut out = BytesMut::new();
        put_bind(&mut out, "", "weir_1", b"\0\0\0\0\0\0");
        let (portal, stmt, rest) = bind_parts(&out).unwrap();
        assert_eq!((portal, stmt, rest), ("", "weir_1", &b"\0\0\0\0\0\0"[..]));
    }
}
