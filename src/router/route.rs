//! The routing decision for one statement of a sharded database: which
//! shard, primary or replica, or every shard (fan-out), or a clear refusal.

use super::shape::{self, Shape};
use super::sql::{self, Analysis, KeyExpr, Kind, Merge, TableSpec};
use super::{parse_key, parse_param, shard_for, KeyType, KeyValue, ParamFormat};
use crate::config::Database;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Parsed statements kept per database; cleared when it grows past this.
const CACHE_LIMIT: usize = 4096;

/// Where a statement goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// One shard; `read` allows a replica.
    Shard { shard: usize, read: bool },
    /// A keyless read on every shard, merged.
    FanOut(Merge),
    /// Refused, with the message for the client.
    Refuse(String),
    /// Touches no table: any shard can run it (the current one in a transaction).
    Any { read: bool },
}

/// What a client pinned with `SET weir.…` or a comment hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pin {
    Shard(usize),
    Key(String),
}

/// A table's columns in order: (name, generated).
pub type Columns = Vec<(String, bool)>;

pub struct ShardRouter {
    pub database: String,
    pub shards: usize,
    /// The sharded tables; replaced (with key positions) when the catalog is read.
    tables: parking_lot::RwLock<Arc<Vec<TableSpec>>>,
    /// Per sharded table, its columns in order as the catalog last said: (name, generated).
    columns: parking_lot::RwLock<Vec<Option<Columns>>>,
    /// When the catalog was last read (all tables).
    columns_read: parking_lot::Mutex<Option<Instant>>,
    pub read_from_replicas: bool,
    /// Replicas per shard.
    pub replicas: Vec<usize>,
    cache: Mutex<HashMap<String, Arc<Analysis>>>,
    /// Shapes PostgreSQL's grammar refuses (their queries are analysed whole).
    unshaped: Mutex<std::collections::HashSet<String>>,
    /// Round-robin position for replica reads.
    next: AtomicUsize,
    /// (shard, replica) kept out of rotation until the instant.
    banned: Mutex<HashMap<(usize, usize), Instant>>,
    /// WAL positions of the shard servers (read-your-writes, replica lag).
    pub wal: Arc<super::wal::WalState>,
    pub read_your_writes: crate::config::ReadYourWrites,
    pub two_phase_commit: bool,
    pub cross_shard_lock_timeout: Duration,
    /// The WAL sampler was started (once, by the first client or at start).
    pub sampler_started: std::sync::atomic::AtomicBool,
    /// A reload replaced this router: its background tasks end.
    pub retired: std::sync::atomic::AtomicBool,
    /// Per shard: `weir.two_phase_decisions` is known to exist there.
    pub decisions_ready: Vec<std::sync::atomic::AtomicBool>,
}

impl ShardRouter {
    /// `None` for a database without shards.
    pub fn new(db: &Database) -> Option<ShardRouter> {
        if db.shards.is_empty() {
            return None;
        }
        let tables: Vec<TableSpec> = db
            .sharded_tables
            .iter()
            .filter_map(|t| {
                let kt: KeyType = t.key_type.parse().ok()?;
                Some(TableSpec::new(&t.table, &t.column, kt))
            })
            .collect();
        let replicas: Vec<usize> = db.shards.iter().map(|s| s.replicas.len()).collect();
        let wal = super::wal::WalState::new(
            &replicas,
            db.replica_lsn_interval,
            db.max_replica_lag,
            db.max_replica_lag_bytes,
        );
        let sampled = db.read_from_replicas && replicas.iter().any(|&n| n > 0);
        wal.active.store(sampled, Ordering::Relaxed);
        if db.read_your_writes == crate::config::ReadYourWrites::Global {
            // Writes acknowledged before this router existed (a reload) are bounded by
            // its first sample.
            wal.mark_all();
        }
        Some(ShardRouter {
            wal: Arc::new(wal),
            read_your_writes: if sampled {
                db.read_your_writes
            } else {
                crate::config::ReadYourWrites::Off
            },
            two_phase_commit: db.two_phase_commit,
            cross_shard_lock_timeout: db.cross_shard_lock_timeout,
            sampler_started: std::sync::atomic::AtomicBool::new(false),
            retired: std::sync::atomic::AtomicBool::new(false),
            decisions_ready: db
                .shards
                .iter()
                .map(|_| std::sync::atomic::AtomicBool::new(false))
                .collect(),
            database: db.name.clone(),
            shards: db.shards.len(),
            read_from_replicas: db.read_from_replicas,
            columns: parking_lot::RwLock::new(vec![None; tables.len()]),
            columns_read: parking_lot::Mutex::new(None),
            tables: parking_lot::RwLock::new(Arc::new(tables)),
            replicas,
            cache: Mutex::new(HashMap::new()),
            unshaped: Mutex::new(std::collections::HashSet::new()),
            next: AtomicUsize::new(0),
            banned: Mutex::new(HashMap::new()),
        })
    }

    /// A healthy replica of `shard` that has replayed at least `min_lsn` (0: any) and is
    /// within `max_replica_lag`, round-robin; `None` means use the primary.
    pub fn pick_replica(&self, shard: usize, min_lsn: u64) -> Option<usize> {
        let n = *self.replicas.get(shard)?;
        if n == 0 || !self.read_from_replicas {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut banned = self.banned.lock();
        if !banned.is_empty() {
            banned.retain(|_, until| *until > now);
        }
        (0..n)
            .map(|i| (start + i) % n)
            .find(|r| !banned.contains_key(&(shard, *r)) && self.wal.replica_ok(shard, *r, min_lsn))
    }

    /// The sharded tables as known now.
    pub fn tables(&self) -> Arc<Vec<TableSpec>> {
        self.tables.read().clone()
    }

    /// The index of sharded table `schema.table` (`schema` empty: any schema).
    pub fn table_index(&self, schema: &str, table: &str) -> Option<usize> {
        let schema = schema.to_ascii_lowercase();
        let table = table.to_ascii_lowercase();
        self.tables()
            .iter()
            .position(|t| t.matches(&schema, &table))
    }

    /// How long ago the catalog was read (`None`: never).
    pub fn catalog_age(&self) -> Option<Duration> {
        self.columns_read.lock().map(|at| at.elapsed())
    }

    /// The catalog was read just now.
    pub fn catalog_read(&self) {
        *self.columns_read.lock() = Some(Instant::now());
    }

    /// Table `t`'s columns in order, (name, generated), once the catalog was read.
    pub fn columns(&self, t: usize) -> Option<Columns> {
        self.columns.read().get(t).cloned().flatten()
    }

    /// Records table `t`'s columns as the catalog lists them; a changed key position
    /// drops the cached analyses (an INSERT without column list routes anew).
    pub fn set_columns(&self, t: usize, columns: Option<Columns>) {
        let mut tables = self.tables.write();
        let Some(spec) = tables.get(t) else {
            return;
        };
        let position = columns
            .as_ref()
            .and_then(|c| c.iter().position(|(name, _)| *name == spec.column));
        if spec.position != position {
            let mut next = Vec::clone(&tables);
            next[t].position = position;
            *tables = Arc::new(next);
            self.cache.lock().clear();
            self.unshaped.lock().clear();
        }
        drop(tables);
        if let Some(slot) = self.columns.write().get_mut(t) {
            *slot = columns;
        }
    }

    /// Whether replicas are sampled (read_from_replicas with replicas): the sampler runs.
    pub fn sampled(&self) -> bool {
        self.wal.active.load(Ordering::Relaxed)
    }

    /// Keeps a failing replica out of rotation for `time`.
    pub fn ban(&self, shard: usize, replica: usize, time: Duration) {
        tracing::warn!(database = %self.database, shard, replica, ?time, "replica banned");
        self.banned
            .lock()
            .insert((shard, replica), Instant::now() + time);
    }

    /// Whether a replica is banned now (for SHOW SHARDS).
    pub fn is_banned(&self, shard: usize, replica: usize) -> bool {
        self.banned
            .lock()
            .get(&(shard, replica))
            .is_some_and(|until| *until > Instant::now())
    }

    /// Analyses a simple query by its shape (key-position literals lifted out,
    /// see `shape`), so queries that differ only in those values share one
    /// parse. The lifted values come back for `BindParams::from_text`.
    pub fn analyze_simple<'a>(&self, sql: &'a str) -> (Arc<Analysis>, Option<Shape<'a>>) {
        if let Some(shape) = shape::lift(sql) {
            if let Some(a) = self.cache.lock().get(&shape.text) {
                return (a.clone(), Some(shape));
            }
            let unparsable = self.unshaped.lock().contains(&shape.text);
            if !unparsable {
                match sql::analyze(&shape.text, &self.tables()) {
                    Ok(a) => {
                        let a = Arc::new(a);
                        let mut cache = self.cache.lock();
                        if cache.len() >= CACHE_LIMIT {
                            cache.clear();
                        }
                        cache.insert(shape.text.clone(), a.clone());
                        return (a, Some(shape));
                    }
                    Err(_) => {
                        // A literal where a parameter cannot stand: use the text itself.
                        let mut set = self.unshaped.lock();
                        if set.len() >= CACHE_LIMIT {
                            set.clear();
                        }
                        set.insert(shape.text);
                    }
                }
            }
        }
        (self.analyze(sql), None)
    }

    /// Analyses a query, from the cache when this text was seen before.
    pub fn analyze(&self, sql: &str) -> Arc<Analysis> {
        if let Some(a) = self.cache.lock().get(sql) {
            return a.clone();
        }
        let a = Arc::new(sql::analyze(sql, &self.tables()).unwrap_or_default());
        let mut cache = self.cache.lock();
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(sql.to_string(), a.clone());
        a
    }

    /// The shard for one key literal of table `t`.
    fn shard_of_text(&self, t: usize, text: &str) -> Result<usize, String> {
        let kt = self.tables()[t].key_type;
        let v = parse_key(kt, text).map_err(|e| format!("sharding key {text:?}: {e}"))?;
        shard_for(kt, &v, self.shards as u64)
            .map(|s| s as usize)
            .map_err(|e| e.to_string())
    }

    fn shard_of_key(
        &self,
        t: usize,
        k: &KeyExpr,
        params: &BindParams<'_>,
    ) -> Result<usize, String> {
        let kt = self.tables()[t].key_type;
        match k {
            KeyExpr::Literal(text) => self.shard_of_text(t, text),
            KeyExpr::Null => shard_for(kt, &KeyValue::Null, self.shards as u64)
                .map(|s| s as usize)
                .map_err(|e| e.to_string()),
            KeyExpr::Param(n) => {
                let (format, value) = params
                    .get(*n)
                    .ok_or_else(|| format!("parameter ${n} for the sharding key was not bound"))?;
                let v = parse_param(kt, format, value)
                    .map_err(|e| format!("sharding key ${n}: {e}"))?;
                shard_for(kt, &v, self.shards as u64)
                    .map(|s| s as usize)
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// Decides where a statement goes.
    pub fn decide(
        &self,
        a: &Analysis,
        params: &BindParams<'_>,
        pin: Option<&Pin>,
        in_write_tx: bool,
    ) -> Decision {
        let read = a.kind == Kind::Select && a.read_only && !in_write_tx;
        let keyed = self.decide_by_keys(a, params, read);
        let Some(pin) = pin else {
            return keyed;
        };
        let pinned = match self.pinned_shard(a, pin) {
            Ok(shard) => shard,
            Err(e) => return Decision::Refuse(e),
        };
        match keyed {
            // A hint or SET weir.* never moves a row away from the shard its key names.
            Decision::Shard { shard, .. } if a.table.is_some() && !a.keys.is_empty() => {
                if shard == pinned {
                    Decision::Shard { shard, read }
                } else {
                    Decision::Refuse(format!(
                        "the sharding key of this statement belongs to shard {shard}, but a hint or SET weir.* names shard {pinned}; remove the hint or fix the key"
                    ))
                }
            }
            Decision::Refuse(e) if a.table.is_some() && !a.keys.is_empty() => Decision::Refuse(e),
            _ => Decision::Shard {
                shard: pinned,
                read,
            },
        }
    }

    /// The shard a hint or `SET weir.*` names.
    fn pinned_shard(&self, a: &Analysis, pin: &Pin) -> Result<usize, String> {
        match pin {
            Pin::Shard(s) if *s < self.shards => Ok(*s),
            Pin::Shard(s) => Err(format!(
                "shard {s} does not exist (database \"{}\" has {} shards)",
                self.database, self.shards
            )),
            Pin::Key(k) if !self.tables().is_empty() => self.shard_of_text(a.table.unwrap_or(0), k),
            Pin::Key(_) => Ok(0),
        }
    }

    /// The decision the statement's own sharding keys (or their absence) make.
    fn decide_by_keys(&self, a: &Analysis, params: &BindParams<'_>, read: bool) -> Decision {
        let Some(t) = a.table else {
            if let Some(name) = &a.sharded_elsewhere {
                if a.kind == Kind::Other {
                    return Decision::Refuse(format!(
                        "this statement names sharded table \"{name}\", and Weir routes only SELECT, INSERT, UPDATE, DELETE and COPY by their key: run it on each shard with a comment /* weir: shard=N */, or (outside a transaction) let Weir run it on every shard at once with two_phase_commit = true"
                    ));
                }
                return Decision::Refuse(format!(
                    "sharded table \"{name}\" is used in a subquery, WITH query or set operation, where Weir cannot find its sharding key; add a comment /* weir: shard=N */ or /* weir: sharding_key=<value> */"
                ));
            }
            if !a.any_table {
                return Decision::Any { read };
            }
            // Tables that are not sharded live on shard 0.
            return Decision::Shard { shard: 0, read };
        };
        if a.keys.is_empty() {
            if a.kind == Kind::Select && a.read_only {
                return match &a.merge {
                    Merge::Refuse(why) => Decision::Refuse(format!(
                        "Weir cannot merge {why} for sharded table \"{}\"; add a condition on \"{}\" or a hint /* weir: shard=N */",
                        a.table_name, self.tables()[t].column
                    )),
                    m => Decision::FanOut(m.clone()),
                };
            }
            return Decision::Refuse(format!(
                "statement on sharded table \"{}\" has no sharding key: add {} = <value>, a comment /* weir: sharding_key=<value> */ or /* weir: shard=N */, or SET weir.sharding_key / weir.shard",
                a.table_name, self.tables()[t].column
            ));
        }
        let mut shard = None;
        for k in &a.keys {
            let s = match self.shard_of_key(t, k, params) {
                Ok(s) => s,
                Err(e) => return Decision::Refuse(e),
            };
            match shard {
                None => shard = Some(s),
                Some(prev) if prev != s => {
                    return if a.kind == Kind::Select && a.read_only {
                        match &a.merge {
                            Merge::Refuse(why) => {
                                Decision::Refuse(format!("Weir cannot merge {why}"))
                            }
                            m => Decision::FanOut(m.clone()),
                        }
                    } else {
                        Decision::Refuse(format!(
                            "statement on sharded table \"{}\" touches more than one shard (keys map to shards {prev} and {s}); write each shard's rows in its own statement",
                            a.table_name
                        ))
                    };
                }
                Some(_) => {}
            }
        }
        Decision::Shard {
            shard: shard.unwrap_or(0),
            read,
        }
    }
}

/// A hint in a comment: `/* weir: shard=N */` or `/* weir: sharding_key=V */` (also in a
/// `-- weir: …` comment). Only real comments count: text inside string literals, quoted
/// identifiers and dollar quotes is data, never a hint. The first hint wins.
pub fn comment_hint(sql: &str) -> Option<Pin> {
    let mut found = None;
    for_each_comment(sql, |c| {
        if found.is_none() {
            found = hint_in(c);
        }
        found.is_none()
    });
    found
}

fn hint_in(comment: &str) -> Option<Pin> {
    let at = comment.find("weir:")?;
    let body = comment[at + 5..].trim();
    let (k, v) = body.split_once('=')?;
    let v = v.trim().trim_matches(['\'', '"']);
    match k.trim() {
        "shard" => v.parse().ok().map(Pin::Shard),
        "sharding_key" => Some(Pin::Key(v.to_string())),
        _ => None,
    }
}

/// Calls `f` with the text of each comment of `sql` (without `--`, `/*`, `*/`), skipping
/// string literals (`'…'`, `E'…'` with backslash escapes), quoted identifiers and dollar
/// quotes, as PostgreSQL's lexer does; `f` returns false to stop.
pub fn for_each_comment(sql: &str, mut f: impl FnMut(&str) -> bool) {
    let b = sql.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'-' if b.get(i + 1) == Some(&b'-') => {
                let end = b[i..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(b.len(), |p| i + p);
                if !f(&sql[i + 2..end]) {
                    return;
                }
                i = end;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let end = shape::skip_block_comment(b, i);
                let inner_end = if b[..end].ends_with(b"*/") && end >= i + 4 {
                    end - 2
                } else {
                    end
                };
                if !f(&sql[i + 2..inner_end]) {
                    return;
                }
                i = end;
            }
            b'\'' | b'"' => i = skip_quoted(b, i, false),
            b'$' => i = shape::skip_dollar_quote(b, i),
            c if c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80 => {
                // A word: `$` inside it (a$b) is not a dollar quote.
                let start = i;
                i = shape::word_end(b, i);
                // E'…' (the word is just E) takes backslash escapes; DATE'…' does not.
                if i == start + 1 && matches!(b[start], b'E' | b'e') && b.get(i) == Some(&b'\'') {
                    i = skip_quoted(b, i, true);
                }
            }
            _ => i += 1,
        }
    }
}

/// The end of a quoted literal or identifier at `start`: a doubled quote stays inside, and
/// with `escapes` (an `E'…'` string) so does a backslash-escaped character.
fn skip_quoted(b: &[u8], start: usize, escapes: bool) -> usize {
    let q = b[start];
    let mut i = start + 1;
    while i < b.len() {
        let escaped = escapes && b[i] == b'\\';
        if escaped || (b[i] == q && b.get(i + 1) == Some(&q)) {
            i += 2;
        } else if b[i] == q {
            return i + 1;
        } else {
            i += 1;
        }
    }
    b.len()
}

/// The parameters of a Bind message, by 1-based number.
#[derive(Debug, Default)]
pub struct BindParams<'a> {
    formats: Vec<i16>,
    values: Vec<Option<&'a [u8]>>,
}

impl<'a> BindParams<'a> {
    /// Reads the parameters of a complete Bind message.
    pub fn parse(msg: &'a [u8]) -> Option<BindParams<'a>> {
        let body = msg.get(5..)?;
        let (_, pos) = crate::wire::cstr(body, 0)?;
        let (_, mut pos) = crate::wire::cstr(body, pos)?;
        let rd16 = |p: usize| body.get(p..p + 2).map(|b| i16::from_be_bytes([b[0], b[1]]));
        // Counts are int16: a negative one is malformed (as PostgreSQL says), and capacity is
        // bounded by what the message can hold.
        let count = |p: usize| rd16(p).and_then(|c| usize::try_from(c).ok());
        let nfmt = count(pos)?;
        pos += 2;
        let mut formats = Vec::with_capacity(nfmt.min(body.len() / 2));
        for _ in 0..nfmt {
            formats.push(rd16(pos)?);
            pos += 2;
        }
        let n = count(pos)?;
        pos += 2;
        let mut values = Vec::with_capacity(n.min(body.len() / 4));
        for _ in 0..n {
            let len = i32::from_be_bytes(body.get(pos..pos + 4)?.try_into().ok()?);
            pos += 4;
            if len < 0 {
                values.push(None);
            } else {
                values.push(Some(body.get(pos..pos + len as usize)?));
                pos += len as usize;
            }
        }
        Some(BindParams { formats, values })
    }

    /// Text values for `$1`, `$2`, … (literals lifted out of a query's shape).
    pub fn from_text(values: &'a [std::borrow::Cow<'a, str>]) -> BindParams<'a> {
        BindParams {
            formats: Vec::new(),
            values: values.iter().map(|v| Some(v.as_bytes())).collect(),
        }
    }

    /// Format and value of `$n`.
    pub fn get(&self, n: usize) -> Option<(ParamFormat, Option<&'a [u8]>)> {
        let i = n.checked_sub(1)?;
        let value = *self.values.get(i)?;
        let code = match self.formats.len() {
            0 => 0,
            1 => self.formats[0],
            _ => *self.formats.get(i)?,
        };
        Some((ParamFormat::from_code(code).ok()?, value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ShardSection, ShardedTable};

    fn router() -> ShardRouter {
        let db = Database {
            name: "shop".into(),
            address: crate::config::Address {
                host: "h".into(),
                port: 1,
            },
            dbname: "shop".into(),
            user: None,
            password: None,
            auth_user: None,
            auth_query: String::new(),
            auth_dbname: None,
            pool_size: None,
            min_pool_size: 0,
            reserve_pool_size: 0,
            pool_mode: None,
            max_db_connections: 0,
            max_db_client_connections: 0,
            query_wait_timeout: None,
            server_lifetime: None,
            server_params: vec![],
            connect_query: None,
            hosts: vec![],
            load_balance_hosts: None,
            shards: vec![
                ShardSection {
                    primary: "a:1".into(),
                    replicas: vec![],
                    dbname: None,
                },
                ShardSection {
                    primary: "b:1".into(),
                    replicas: vec![],
                    dbname: None,
                },
            ],
            sharded_tables: vec![ShardedTable {
                table: "orders".into(),
                column: "customer_id".into(),
                key_type: "bigint".into(),
            }],
            read_from_replicas: true,
            read_your_writes: crate::config::ReadYourWrites::Client,
            replica_lsn_interval: Duration::from_millis(10),
            max_replica_lag: Duration::ZERO,
            max_replica_lag_bytes: 0,
            two_phase_commit: false,
            cross_shard_lock_timeout: std::time::Duration::from_secs(1),
        };
        ShardRouter::new(&db).unwrap()
    }

    fn decide(r: &ShardRouter, sql: &str) -> Decision {
        let a = r.analyze(sql);
        r.decide(
            &a,
            &BindParams::default(),
            comment_hint(sql).as_ref(),
            false,
        )
    }

    #[test]
    fn routes_by_key_like_postgres() {
        let r = router();
        // hashint8extended(1, seed) % 2 per PostgreSQL: key 1 -> shard 0? computed by router::hash.
        let expected = shard_for(KeyType::Bigint, &KeyValue::Int(1), 2).unwrap() as usize;
        assert_eq!(
            decide(&r, "SELECT * FROM orders WHERE customer_id = 1"),
            Decision::Shard {
                shard: expected,
                read: true
            }
        );
        assert_eq!(
            decide(&r, "UPDATE orders SET x = 1 WHERE customer_id = 1"),
            Decision::Shard {
                shard: expected,
                read: false
            }
        );
    }

    #[test]
    fn keyless_writes_are_refused_and_reads_fan_out() {
        let r = router();
        assert!(
            matches!(decide(&r, "DELETE FROM orders"), Decision::Refuse(m) if m.contains("customer_id"))
        );
        assert_eq!(
            decide(&r, "SELECT * FROM orders"),
            Decision::FanOut(Merge::Concat)
        );
        assert_eq!(
            decide(&r, "SELECT * FROM other"),
            Decision::Shard {
                shard: 0,
                read: true
            }
        );
    }

    #[test]
    fn hints_pin_a_shard() {
        let r = router();
        assert_eq!(
            decide(&r, "/* weir: shard=1 */ DELETE FROM orders"),
            Decision::Shard {
                shard: 1,
                read: false
            }
        );
        assert!(matches!(
            decide(&r, "/* weir: shard=7 */ SELECT 1"),
            Decision::Refuse(_)
        ));
    }

    #[test]
    fn hints_are_read_only_in_real_comments() {
        assert_eq!(
            comment_hint("SELECT 1 -- weir: shard=1"),
            Some(Pin::Shard(1))
        );
        assert_eq!(
            comment_hint("/* a /* nested */ weir: sharding_key=k */ SELECT 1"),
            Some(Pin::Key("k".into()))
        );
        for data in [
            "INSERT INTO t VALUES (1, '/* weir: shard=1 */')",
            "INSERT INTO t VALUES (1, '-- weir: shard=1')",
            r"INSERT INTO t VALUES (1, E'\' /* weir: shard=1 */')",
            "INSERT INTO t VALUES (1, 'it''s /* weir: shard=1 */')",
            "INSERT INTO t VALUES (1, $$ /* weir: shard=1 */ $$)",
            "INSERT INTO t VALUES (1, $q$ -- weir: shard=1 $q$)",
            "SELECT \"/* weir: shard=1 */\" FROM t",
            "SELECT 'unterminated /* weir: shard=1 */",
        ] {
            assert_eq!(comment_hint(data), None, "{data}");
        }
        // A word ending in E before a quote is not an escape string: the quote closes at '.
        assert_eq!(
            comment_hint(r"SELECT DATE'2020\' /* weir: shard=1 */"),
            Some(Pin::Shard(1))
        );
        // Lone or odd bytes never panic.
        for odd in ["/*", "--", "$", "$a", "E'", "/*/", "'", "\"", "é/*é*/"] {
            let _ = comment_hint(odd);
        }
    }

    #[test]
    fn a_pin_never_moves_a_keyed_statement() {
        let r = router();
        let shard_of = |i: i64| shard_for(KeyType::Bigint, &KeyValue::Int(i), 2).unwrap() as usize;
        let k0 = (0..50).find(|i| shard_of(*i) == 0).unwrap();
        let sql = format!("/* weir: shard=1 */ INSERT INTO orders (customer_id) VALUES ({k0})");
        assert!(matches!(decide(&r, &sql), Decision::Refuse(m) if m.contains("shard 0")));
        let sql = format!("/* weir: shard=0 */ INSERT INTO orders (customer_id) VALUES ({k0})");
        assert_eq!(
            decide(&r, &sql),
            Decision::Shard {
                shard: 0,
                read: false
            }
        );
    }

    #[test]
    fn multi_row_insert_across_shards_is_refused() {
        let r = router();
        let mut keys =
            (0..50).map(|i| (i, shard_for(KeyType::Bigint, &KeyValue::Int(i), 2).unwrap()));
        let a = keys.find(|(_, s)| *s == 0).unwrap().0;
        let b = keys.find(|(_, s)| *s == 1).unwrap().0;
        let sql = format!("INSERT INTO orders (customer_id) VALUES ({a}), ({b})");
        assert!(
            matches!(decide(&r, &sql), Decision::Refuse(m) if m.contains("more than one shard"))
        );
    }

    #[test]
    fn negative_bind_counts_are_malformed() {
        // Found by the frame_scanner fuzz target: used to panic with "capacity overflow".
        assert!(BindParams::parse(b"B\0\0\0\x08\0\0\xff\xff").is_none());
        assert!(BindParams::parse(b"B\0\0\0\x0a\0\0\0\0\xff\xff").is_none());
    }

    #[test]
    fn reads_bind_parameters() {
        // tag, length, portal "", statement "", 0 formats, 1 parameter of 2 bytes.
        let mut msg = vec![b'B', 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2];
        msg.extend_from_slice(b"42");
        msg.extend_from_slice(&[0, 0]);
        let p = BindParams::parse(&msg).unwrap();
        assert_eq!(p.get(1), Some((ParamFormat::Text, Some(&b"42"[..]))));
        assert_eq!(p.get(2), None);
    }
}
