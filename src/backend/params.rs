//! Session parameters (GUCs) as a server has them and as a client expects them,
//! and the statement that turns one into the other on checkout.

/// Parameters PostgreSQL reports with ParameterStatus that a client may change
/// and so must be carried across server connections (lower-case names).
pub const TRACKED_REPORTED: &[&str] = &[
    "application_name",
    "client_encoding",
    "datestyle",
    "intervalstyle",
    "timezone",
    "standard_conforming_strings",
];

/// True for a reported parameter that follows the client across servers.
pub fn is_tracked(name: &str) -> bool {
    TRACKED_REPORTED
        .iter()
        .any(|k| k.eq_ignore_ascii_case(name))
}

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::{Arc, Weak};

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    key: String,
    name: String,
    value: String,
    /// Came from ParameterStatus (PostgreSQL reports changes to it).
    reported: bool,
}

/// A small ordered map of parameters, keyed case-insensitively. The entries are shared
/// copy-on-write: most clients want the same parameters, and [`SharedParams`] lets them
/// hold one copy between them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParamSet {
    entries: Arc<Vec<Entry>>,
    /// Order-independent hash of the entries (key, value, reported).
    hash: u64,
    /// On a server's set: the hash of a client set found to need no sync
    /// against the current entries (cleared by any change).
    matched: MatchCache,
}

/// Not part of a set's identity: always equal.
#[derive(Debug, Clone, Copy, Default)]
struct MatchCache(Option<u64>);

impl PartialEq for MatchCache {
    fn eq(&self, _: &MatchCache) -> bool {
        true
    }
}

impl Eq for MatchCache {}

fn entry_hash(e: &Entry) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    e.key.hash(&mut h);
    e.value.hash(&mut h);
    e.reported.hash(&mut h);
    h.finish()
}

impl ParamSet {
    pub fn from_reported(list: &[(String, String)]) -> ParamSet {
        let mut p = ParamSet::default();
        for (k, v) in list {
            p.set_reported(k, v);
        }
        p
    }

    /// Recomputes the content hash after a change.
    fn changed(&mut self) {
        self.hash = self
            .entries
            .iter()
            .map(entry_hash)
            .fold(0u64, u64::wrapping_add);
        self.matched = MatchCache(None);
    }

    /// True when this server set was already found to match `wanted`
    /// (nothing changed on either side since).
    pub fn known_match(&self, wanted: &ParamSet) -> bool {
        self.matched.0 == Some(wanted.hash)
    }

    /// Remembers that this server set matches `wanted` as it is now.
    pub fn remember_match(&mut self, wanted: &ParamSet) {
        self.matched = MatchCache(Some(wanted.hash));
    }

    fn find(&self, key: &str) -> Option<usize> {
        self.entries
            .iter()
            .position(|e| e.key.eq_ignore_ascii_case(key))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.find(key).map(|i| self.entries[i].value.as_str())
    }

    /// A parameter's name as it was first spelled (`DateStyle`), with its value.
    pub fn named(&self, key: &str) -> Option<(&str, &str)> {
        self.find(key).map(|i| {
            (
                self.entries[i].name.as_str(),
                self.entries[i].value.as_str(),
            )
        })
    }

    fn put(&mut self, name: &str, value: &str, reported: bool) {
        match self.find(name) {
            Some(i) => {
                let e = &self.entries[i];
                if e.value == value && (e.reported || !reported) {
                    return;
                }
                let e = &mut Arc::make_mut(&mut self.entries)[i];
                if e.value != value {
                    e.value.clear();
                    e.value.push_str(value);
                }
                e.reported |= reported;
                if reported {
                    e.name = name.to_string();
                }
            }
            None => Arc::make_mut(&mut self.entries).push(Entry {
                key: name.to_ascii_lowercase(),
                name: name.to_string(),
                value: value.to_string(),
                reported,
            }),
        }
        self.changed();
    }

    /// Records a value PostgreSQL reported (ParameterStatus).
    pub fn set_reported(&mut self, name: &str, value: &str) {
        self.put(name, value, true)
    }

    /// Records a value set by a SET that PostgreSQL does not report.
    pub fn set(&mut self, name: &str, value: &str) {
        self.put(name, value, false)
    }

    /// True when `name` is held here from a SET rather than from ParameterStatus.
    pub fn is_unreported(&self, name: &str) -> bool {
        self.find(name).is_some_and(|i| !self.entries[i].reported)
    }

    pub fn remove(&mut self, name: &str) {
        if let Some(i) = self.find(name) {
            Arc::make_mut(&mut self.entries).remove(i);
            self.changed();
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries
            .iter()
            .map(|e| (e.name.as_str(), e.value.as_str()))
    }

    /// The subset a new client inherits as its defaults: the tracked reported
    /// parameters of a fresh server connection.
    pub fn tracked_defaults(&self) -> ParamSet {
        let mut p = ParamSet {
            entries: Arc::new(
                self.entries
                    .iter()
                    .filter(|e| TRACKED_REPORTED.contains(&e.key.as_str()))
                    .cloned()
                    .collect(),
            ),
            ..ParamSet::default()
        };
        p.changed();
        p
    }

    /// The statement that makes a server with parameters `self` match what
    /// `wanted` expects, or `None` when they already match. Keys that are set
    /// on the server but unknown to the client are reset to their defaults.
    pub fn sync_statement(&self, wanted: &ParamSet) -> Option<(String, Vec<String>)> {
        let mut sets = Vec::new();
        let mut changed = Vec::new();
        for e in wanted.entries.iter() {
            if self.get(&e.key) != Some(e.value.as_str()) {
                sets.push(format!(
                    "pg_catalog.set_config({}, {}, false)",
                    quote_literal(&e.key),
                    quote_literal(&e.value)
                ));
                changed.push(e.key.clone());
            }
        }
        let mut resets = Vec::new();
        for e in self.entries.iter() {
            if !e.reported && wanted.find(&e.key).is_none() {
                resets.push(format!("RESET {}", quote_ident(&e.key)));
                changed.push(e.key.clone());
            }
        }
        if changed.is_empty() {
            return None;
        }
        let mut sql = String::new();
        if !sets.is_empty() {
            sql.push_str("SELECT ");
            sql.push_str(&sets.join(", "));
        }
        for r in resets {
            if !sql.is_empty() {
                sql.push_str("; ");
            }
            sql.push_str(&r);
        }
        Some((sql, changed))
    }

    /// After a sync: non-reported keys now hold the client's values; reported
    /// keys were updated from ParameterStatus. The client adopts the server's
    /// spelling of reported values (e.g. `utf8` → `UTF8`) so later checkouts
    /// compare equal.
    pub fn after_sync(&mut self, wanted: &mut ParamSet, changed: &[String]) {
        for key in changed {
            match wanted.find(key) {
                Some(i) => {
                    let e = wanted.entries[i].clone();
                    if TRACKED_REPORTED.contains(&e.key.as_str()) && self.get(key).is_some() {
                        let v = self.get(key).unwrap_or_default().to_string();
                        Arc::make_mut(&mut wanted.entries)[i].value = v;
                        wanted.changed();
                    } else {
                        self.put(&e.name, &e.value, false);
                    }
                }
                None => self.remove(key),
            }
        }
    }
}

/// Logins whose parameter sets are equal share one copy of the entries (a thousand idle
/// clients of one app hold one set, not a thousand).
#[derive(Default)]
pub struct SharedParams {
    sets: Mutex<SharedSets>,
}

#[derive(Default)]
struct SharedSets {
    by_hash: HashMap<u64, Vec<Weak<Vec<Entry>>>>,
    /// Insertions since sets nobody holds any more were forgotten.
    since_prune: usize,
}

/// Forget unheld sets after this many new ones.
const PRUNE_EVERY: usize = 1024;

impl SharedParams {
    /// Makes `set` share the entries of an equal set already held, or offers its own.
    pub fn share(&self, set: &mut ParamSet) {
        let mut sets = self.sets.lock();
        let bucket = sets.by_hash.entry(set.hash).or_default();
        for held in bucket.iter().filter_map(Weak::upgrade) {
            if *held == *set.entries {
                set.entries = held;
                return;
            }
        }
        bucket.retain(|w| w.strong_count() > 0);
        bucket.push(Arc::downgrade(&set.entries));
        sets.since_prune += 1;
        if sets.since_prune >= PRUNE_EVERY {
            sets.since_prune = 0;
            sets.by_hash.retain(|_, b| {
                b.retain(|w| w.strong_count() > 0);
                !b.is_empty()
            });
        }
    }

    /// Distinct sets held (for tests and SHOW MEM-like views).
    pub fn len(&self) -> usize {
        let sets = self.sets.lock();
        sets.by_hash
            .values()
            .flatten()
            .filter(|w| w.strong_count() > 0)
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An SQL string literal that is correct whatever `standard_conforming_strings` is.
pub fn quote_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 3);
    out.push_str("E'");
    for c in s.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// A double-quoted SQL identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(pairs: &[(&str, &str)]) -> ParamSet {
        let mut p = ParamSet::default();
        for (k, v) in pairs {
            p.set_reported(k, v);
        }
        p
    }

    #[test]
    fn no_statement_when_equal() {
        let s = set(&[("TimeZone", "UTC"), ("server_version", "15")]);
        let w = set(&[("timezone", "UTC")]);
        assert_eq!(s.sync_statement(&w), None);
    }

    #[test]
    fn sets_differences_with_quoting() {
        let s = set(&[("TimeZone", "UTC")]);
        let w = set(&[("TimeZone", "Europe/O'Brien\\")]);
        let (sql, changed) = s.sync_statement(&w).unwrap();
        assert_eq!(
            sql,
            "SELECT pg_catalog.set_config(E'timezone', E'Europe/O''Brien\\\\', false)"
        );
        assert_eq!(changed, vec!["timezone"]);
    }

    #[test]
    fn resets_unreported_keys_the_client_does_not_want() {
        let mut s = set(&[("TimeZone", "UTC")]);
        s.set("search_path", "a");
        let w = set(&[("TimeZone", "UTC")]);
        let (sql, _) = s.sync_statement(&w).unwrap();
        assert_eq!(sql, "RESET \"search_path\"");
    }

    #[test]
    fn equal_sets_share_entries_until_one_changes() {
        let shared = SharedParams::default();
        let mut a = set(&[("TimeZone", "UTC"), ("DateStyle", "ISO, MDY")]);
        let mut b = set(&[("TimeZone", "UTC"), ("DateStyle", "ISO, MDY")]);
        shared.share(&mut a);
        shared.share(&mut b);
        assert!(Arc::ptr_eq(&a.entries, &b.entries));
        assert_eq!(shared.len(), 1);
        b.set("TimeZone", "Asia/Tokyo");
        assert!(!Arc::ptr_eq(&a.entries, &b.entries));
        assert_eq!(a.get("timezone"), Some("UTC"));
        assert_eq!(b.get("timezone"), Some("Asia/Tokyo"));
        drop(a);
        assert_eq!(shared.len(), 0);
    }

    #[test]
    fn client_adopts_canonical_spelling() {
        let mut s = set(&[("client_encoding", "SQL_ASCII")]);
        let mut w = set(&[("client_encoding", "utf8")]);
        let (_, changed) = s.sync_statement(&w).unwrap();
        s.set_reported("client_encoding", "UTF8");
        s.after_sync(&mut w, &changed);
        assert_eq!(w.get("client_encoding"), Some("UTF8"));
        assert_eq!(s.sync_statement(&w), None);
    }
}
