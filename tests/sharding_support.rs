//! Fixtures for tests/sharding.rs: a two-shard `shop` database behind Weir (each shard a
//! PostgreSQL cluster, optionally with a streaming replica), the four sharded tables with one
//! key type each, typed keys that know their SQL literal, Bind parameter and shard, and checks
//! that read each shard directly.
//!
//! The oracle for "the right shard" is PostgreSQL itself: every shard has an empty
//! `PARTITION BY HASH` twin of each sharded table (`orders_hp`, ...), and
//! `satisfies_hash_partition(twin, 2, i, key)` says whether hash partitioning puts a key in
//! remainder `i`. Weir's own `shard_for` only predicts which rows a shard should hold.
//!
//! sharding.rs includes this file with `#[path]`; built on its own it is an empty test binary.
#![allow(dead_code)]

#[path = "common/mod.rs"]
pub mod common;

use std::fmt::Write as _;
use std::future::Future;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::BytesMut;
use common::{describe_error, eventually, quote_ident, quote_literal, PgCluster, Weir};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use tokio_postgres::{Client, SimpleQueryMessage};
use weir::router::{shard_for, KeyType, KeyValue};

/// Role `app`'s password, in PostgreSQL and in Weir's `[users.app]`.
pub const PASSWORD: &str = "app-secret";
/// Shards of `shop`.
pub const SHARDS: usize = 2;
/// Multi-row INSERTs carry at most this many rows.
const BATCH: usize = 250;

// ---------------------------------------------------------------------------------------------
// Tables
// ---------------------------------------------------------------------------------------------

/// A sharded table: its key column and type, and one payload column.
#[derive(Clone, Copy, Debug)]
pub struct Table {
    pub name: &'static str,
    pub column: &'static str,
    pub key_type: KeyType,
    pub payload: &'static str,
    /// SQL type of the payload column (a text parameter is cast to it).
    pub payload_type: &'static str,
}

pub const ORDERS: Table = Table {
    name: "orders",
    column: "customer_id",
    key_type: KeyType::Bigint,
    payload: "total",
    payload_type: "numeric(12,2)",
};
pub const ACCOUNTS: Table = Table {
    name: "accounts",
    column: "id",
    key_type: KeyType::Integer,
    payload: "balance",
    payload_type: "bigint",
};
pub const NOTES: Table = Table {
    name: "notes",
    column: "author",
    key_type: KeyType::Text,
    payload: "body",
    payload_type: "text",
};
pub const DEVICES: Table = Table {
    name: "devices",
    column: "device_id",
    key_type: KeyType::Uuid,
    payload: "label",
    payload_type: "text",
};
pub const TABLES: [Table; 4] = [ORDERS, ACCOUNTS, NOTES, DEVICES];

impl Table {
    /// The empty hash-partitioned twin used as the oracle.
    pub fn twin(&self) -> String {
        format!("{}_hp", self.name)
    }

    /// CREATE statements for the table and its twin.
    fn ddl(&self) -> String {
        let kt = self.key_type.name();
        format!(
            "CREATE TABLE {t} ({c} {kt}, {p} {pt});\n\
             CREATE TABLE {twin} ({c} {kt}) PARTITION BY HASH ({c});\n",
            t = self.name,
            c = self.column,
            p = self.payload,
            pt = self.payload_type,
            twin = self.twin(),
        )
    }

    /// `INSERT INTO t (key, payload) VALUES …` with the rows as SQL literals.
    pub fn insert_literals(&self, rows: &[Row]) -> String {
        self.insert(
            rows.iter()
                .map(|r| format!("({}, {})", r.key_literal(), quote_literal(&r.payload))),
        )
    }

    /// `INSERT INTO t (key, payload) VALUES ($1, $2::text::type), …` for `rows` rows: keys
    /// are parameters of the key type, payloads text parameters.
    pub fn insert_parameters(&self, rows: usize) -> String {
        let cast = self.payload_type;
        self.insert((0..rows).map(|i| format!("(${}, ${}::text::{cast})", 2 * i + 1, 2 * i + 2)))
    }

    fn insert(&self, rows: impl Iterator<Item = String>) -> String {
        let values: Vec<String> = rows.collect();
        let (t, c, p) = (self.name, self.column, self.payload);
        format!("INSERT INTO {t} ({c}, {p}) VALUES {}", values.join(", "))
    }
}

/// Tables on every shard: the sharded four, their twins, and `settings`, which is not
/// sharded (so it lives on shard 0).
pub fn schema() -> String {
    let mut sql = String::from("SET ROLE app;\n");
    for t in TABLES {
        sql.push_str(&t.ddl());
    }
    sql.push_str("CREATE TABLE settings (name text, value text);\n");
    sql
}

// ---------------------------------------------------------------------------------------------
// Keys and rows
// ---------------------------------------------------------------------------------------------

/// A non-null sharding key of one of the four types.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    Bigint(i64),
    Integer(i32),
    Text(String),
    Uuid(Uuid),
}

/// A uuid sent as a binary Bind parameter (tokio-postgres has no uuid type without a feature).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Uuid(pub [u8; 16]);

impl std::fmt::Display for Uuid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl ToSql for Uuid {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&self.0);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::UUID
    }

    to_sql_checked!();
}

impl Key {
    /// Where PostgreSQL's hash partitioning (and so Weir) puts this key among `SHARDS`.
    pub fn shard(&self) -> usize {
        let value = match self {
            Key::Bigint(v) => KeyValue::Int(*v),
            Key::Integer(v) => KeyValue::Int((*v).into()),
            Key::Text(s) => KeyValue::Text(s),
            Key::Uuid(u) => KeyValue::Uuid(u.0),
        };
        let key_type = self.key_type();
        let shard = shard_for(key_type, &value, SHARDS as u64);
        shard.unwrap_or_else(|e| panic!("shard_for({key_type}, {self:?}): {e}")) as usize
    }

    pub fn key_type(&self) -> KeyType {
        match self {
            Key::Bigint(_) => KeyType::Bigint,
            Key::Integer(_) => KeyType::Integer,
            Key::Text(_) => KeyType::Text,
            Key::Uuid(_) => KeyType::Uuid,
        }
    }

    /// The value as PostgreSQL prints it (`key::text`).
    pub fn text(&self) -> String {
        match self {
            Key::Bigint(v) => v.to_string(),
            Key::Integer(v) => v.to_string(),
            Key::Text(s) => s.clone(),
            Key::Uuid(u) => u.to_string(),
        }
    }

    /// The value as a SQL literal.
    pub fn literal(&self) -> String {
        match self {
            Key::Bigint(v) => v.to_string(),
            Key::Integer(v) => v.to_string(),
            Key::Text(s) => quote_literal(s),
            Key::Uuid(u) => quote_literal(&u.to_string()),
        }
    }

    /// The value as a (binary) Bind parameter and its type.
    pub fn param(&self) -> (&(dyn ToSql + Sync), Type) {
        match self {
            Key::Bigint(v) => (v, Type::INT8),
            Key::Integer(v) => (v, Type::INT4),
            Key::Text(s) => (s, Type::TEXT),
            Key::Uuid(u) => (u, Type::UUID),
        }
    }
}

/// One row of a sharded table; `key: None` is a NULL key (shard 0, as in PostgreSQL).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub key: Option<Key>,
    pub payload: String,
}

impl Row {
    pub fn new(key: Key, payload: impl Into<String>) -> Row {
        Row {
            key: Some(key),
            payload: payload.into(),
        }
    }

    pub fn shard(&self) -> usize {
        self.key.as_ref().map_or(0, Key::shard)
    }

    pub fn key_literal(&self) -> String {
        self.key
            .as_ref()
            .map_or_else(|| "NULL".into(), Key::literal)
    }

    pub fn key_text(&self) -> Option<String> {
        self.key.as_ref().map(Key::text)
    }
}

/// Random keys with a fixed seed, so a failure can be replayed.
pub struct KeyGen {
    rng: StdRng,
}

/// Text keys worth having whatever the random draw: empty, non-ASCII, quotes, spaces, and
/// digits (which sort differently as text and as numbers).
pub const SPECIAL_TEXT: &[&str] = &[
    "",
    "a",
    "ünïcødé",
    "日本語",
    "🦀",
    "it's",
    "O'Brien \"quoted\"",
    " leading and trailing ",
    "MixedCASE",
    "10",
    "9",
    "100",
];

pub const SPECIAL_BIGINT: &[i64] = &[
    i64::MIN,
    i64::MIN + 1,
    -4_294_967_296,
    -2_147_483_649,
    -2_147_483_648,
    -1,
    0,
    1,
    42,
    2_147_483_647,
    2_147_483_648,
    4_294_967_296,
    i64::MAX - 1,
    i64::MAX,
];

pub const SPECIAL_INTEGER: &[i32] = &[i32::MIN, i32::MIN + 1, -1, 0, 1, 42, i32::MAX - 1, i32::MAX];

impl KeyGen {
    pub fn new(seed: u64) -> KeyGen {
        KeyGen {
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// `n` keys of `key_type`: the special values of the type first, then random ones.
    pub fn keys(&mut self, key_type: KeyType, n: usize) -> Vec<Key> {
        let special: Vec<Key> = match key_type {
            KeyType::Bigint => SPECIAL_BIGINT.iter().map(|v| Key::Bigint(*v)).collect(),
            KeyType::Integer => SPECIAL_INTEGER.iter().map(|v| Key::Integer(*v)).collect(),
            KeyType::Text => SPECIAL_TEXT
                .iter()
                .map(|s| Key::Text(s.to_string()))
                .collect(),
            KeyType::Uuid => [[0u8; 16], [0xff; 16]].map(|b| Key::Uuid(Uuid(b))).to_vec(),
        };
        let mut keys: Vec<Key> = special.into_iter().take(n).collect();
        while keys.len() < n {
            keys.push(self.key(key_type));
        }
        keys
    }

    fn key(&mut self, key_type: KeyType) -> Key {
        match key_type {
            KeyType::Bigint => Key::Bigint(if self.rng.gen_bool(0.5) {
                self.rng.gen()
            } else {
                self.rng.gen_range(-100_000..100_000)
            }),
            KeyType::Integer => Key::Integer(self.rng.gen()),
            KeyType::Text => Key::Text(self.text()),
            KeyType::Uuid => Key::Uuid(Uuid(self.rng.gen())),
        }
    }

    fn text(&mut self) -> String {
        const ALPHABET: &[char] = &[
            'a', 'b', 'c', 'x', 'y', 'z', 'A', 'Q', '0', '7', ' ', '-', '\'', '"', 'é', 'ß', 'ø',
            'Ж', 'λ', '中', '文', '🦀', '🙂',
        ];
        let len = self.rng.gen_range(0..24);
        (0..len)
            .map(|_| ALPHABET[self.rng.gen_range(0..ALPHABET.len())])
            .collect()
    }

    /// A payload value for `table`'s payload column.
    pub fn payload(&mut self, table: &Table) -> String {
        match table.payload_type {
            "numeric(12,2)" => {
                let cents: i64 = self.rng.gen_range(-1_000_000..10_000_000);
                let sign = if cents < 0 { "-" } else { "" };
                format!("{sign}{}.{:02}", cents.abs() / 100, cents.abs() % 100)
            }
            "bigint" => self.rng.gen::<i32>().to_string(),
            _ => format!("payload {}", self.rng.gen::<u32>()),
        }
    }

    /// `n` rows of `table`: keys from `keys`, random payloads.
    pub fn rows(&mut self, table: &Table, n: usize) -> Vec<Row> {
        self.keys(table.key_type, n)
            .into_iter()
            .map(|k| {
                let payload = self.payload(table);
                Row::new(k, payload)
            })
            .collect()
    }

    /// `n` distinct keys of `key_type` on each shard.
    pub fn distinct_per_shard(&mut self, key_type: KeyType, n: usize) -> [Vec<Key>; SHARDS] {
        let mut out: [Vec<Key>; SHARDS] = Default::default();
        let mut seen = std::collections::HashSet::new();
        while out.iter().any(|v| v.len() < n) {
            let k = self.key(key_type);
            let s = k.shard();
            if out[s].len() < n && seen.insert(k.clone()) {
                out[s].push(k);
            }
        }
        out
    }
}

/// Rows grouped by shard, in their original order within a shard.
pub fn by_shard(rows: &[Row]) -> [Vec<Row>; SHARDS] {
    let mut out: [Vec<Row>; SHARDS] = Default::default();
    for r in rows {
        out[r.shard()].push(r.clone());
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Loading rows through Weir
// ---------------------------------------------------------------------------------------------

/// Inserts `rows` with the simple protocol: multi-row INSERTs of literals, one shard each.
pub async fn insert_literals(client: &Client, table: &Table, rows: &[Row]) {
    for shard_rows in by_shard(rows) {
        for chunk in shard_rows.chunks(BATCH) {
            let sql = table.insert_literals(chunk);
            if let Err(e) = client.simple_query(&sql).await {
                panic!(
                    "simple-protocol INSERT of {} {} rows (first key {:?}): {}",
                    chunk.len(),
                    table.name,
                    chunk[0].key,
                    describe_error(&e)
                );
            }
        }
    }
}

/// Inserts `rows` (non-null keys) with the extended protocol: Parse/Bind/Execute with the key
/// as a binary `$n` parameter of its own type, two rows per statement when the shard has
/// another row left.
pub async fn insert_parameters(client: &Client, table: &Table, rows: &[Row]) {
    for shard_rows in by_shard(rows) {
        for pair in shard_rows.chunks(2) {
            let mut params: Vec<(&(dyn ToSql + Sync), Type)> = Vec::new();
            for r in pair {
                let key = r
                    .key
                    .as_ref()
                    .expect("insert_parameters takes non-null keys");
                params.push(key.param());
                params.push((&r.payload, Type::TEXT));
            }
            let sql = table.insert_parameters(pair.len());
            match client.execute_typed(&sql, &params).await {
                Ok(n) => assert_eq!(n, pair.len() as u64, "{sql}"),
                Err(e) => panic!(
                    "extended-protocol INSERT into {} of keys {:?}: {}",
                    table.name,
                    pair.iter().map(|r| &r.key).collect::<Vec<_>>(),
                    describe_error(&e)
                ),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The topology
// ---------------------------------------------------------------------------------------------

/// One shard: a primary and, when asked for, a streaming replica.
pub struct Shard {
    pub primary: PgCluster,
    pub replica: Option<PgCluster>,
}

/// Two shards of database `shop` behind one Weir.
pub struct Shop {
    pub shards: Vec<Shard>,
    pub weir: Weir,
}

impl Shop {
    /// Starts the shards (in parallel) and Weir; with `replicas`, each shard gets one replica
    /// and reads may go to it. Blocks for a few seconds.
    pub fn start(replicas: bool) -> Shop {
        let starts: Vec<_> = (0..SHARDS)
            .map(|_| std::thread::spawn(move || start_shard(replicas)))
            .collect();
        let shards: Vec<Shard> = starts
            .into_iter()
            .map(|t| t.join().expect("shard start"))
            .collect();
        let weir = Weir::start(&weir_config(&shards));
        Shop { shards, weir }
    }

    pub fn url(&self) -> String {
        self.weir.url("app", PASSWORD, "shop")
    }

    /// A client of `shop` through Weir.
    pub async fn client(&self) -> Client {
        common::connect(&self.url()).await
    }

    /// A client straight to shard `i`'s primary, as the superuser.
    pub async fn direct(&self, shard: usize) -> Client {
        common::connect(&self.shards[shard].primary.url("postgres", "", "shop")).await
    }

    pub fn primary_port(&self, shard: usize) -> u16 {
        self.shards[shard].primary.port
    }

    pub fn replica_port(&self, shard: usize) -> u16 {
        self.shards[shard].replica.as_ref().expect("replica").port
    }

    /// Which shard's primary or replica listens on `port`, for messages.
    pub fn describe_port(&self, port: u16) -> String {
        for (i, s) in self.shards.iter().enumerate() {
            if s.primary.port == port {
                return format!("shard {i} primary (port {port})");
            }
            if s.replica.as_ref().is_some_and(|r| r.port == port) {
                return format!("shard {i} replica (port {port})");
            }
        }
        format!("unknown server (port {port})")
    }

    /// Runs SQL on shard `i`'s primary as the superuser.
    pub fn psql(&self, shard: usize, sql: &str) -> String {
        self.shards[shard].primary.psql("shop", sql)
    }

    /// Rows of `table` on each shard's primary as (key text, payload text), sorted.
    pub async fn contents(&self, table: &Table) -> Vec<Vec<(Option<String>, Option<String>)>> {
        let sql = format!(
            "SELECT {}::text, {}::text FROM {}",
            table.column, table.payload, table.name
        );
        let mut out = Vec::new();
        for shard in 0..SHARDS {
            let direct = self.direct(shard).await;
            let rows = direct.query(sql.as_str(), &[]).await.expect("read a shard");
            let mut rows: Vec<_> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            // Rust's order (NULL first, bytes) rather than PostgreSQL's, to compare with.
            rows.sort();
            out.push(rows);
        }
        out
    }

    /// Number of rows of `table` on each shard's primary.
    pub fn counts(&self, table: &str) -> Vec<u64> {
        (0..SHARDS)
            .map(|s| {
                let n = self.psql(s, &format!("SELECT count(*) FROM {}", quote_ident(table)));
                n.parse().expect("count")
            })
            .collect()
    }

    /// Checks, on every shard's primary, that `table` holds exactly the rows of `rows` that
    /// hash partitioning assigns to it, according to PostgreSQL's `satisfies_hash_partition`
    /// and to the expected per-shard contents. Returns what is wrong, one line each.
    pub async fn check_placement(&self, table: &Table, rows: &[Row]) -> Vec<String> {
        let mut problems = Vec::new();
        let expected = by_shard(rows);
        let actual = self.contents(table).await;
        for shard in 0..SHARDS {
            let misplaced = self.misplaced(table, shard).await;
            if !misplaced.is_empty() {
                problems.push(format!(
                    "{}: shard {shard} holds {} of its {} rows in another hash remainder, e.g. keys {:?}",
                    table.name,
                    misplaced.len(),
                    actual[shard].len(),
                    &misplaced[..misplaced.len().min(5)]
                ));
            }
            let mut want: Vec<(Option<String>, Option<String>)> = expected[shard]
                .iter()
                .map(|r| (r.key_text(), Some(r.payload.clone())))
                .collect();
            want.sort();
            if actual[shard] != want {
                problems.push(format!(
                    "{}: shard {shard} has {} rows, expected {}; {}",
                    table.name,
                    actual[shard].len(),
                    want.len(),
                    first_differences(&actual[shard], &want)
                ));
            }
        }
        let placed: usize = actual.iter().map(Vec::len).sum();
        if placed != rows.len() {
            problems.push(format!(
                "{}: {placed} rows on the shards, {} inserted",
                table.name,
                rows.len()
            ));
        }
        problems
    }

    /// Keys of `table` on shard `shard` that PARTITION BY HASH would put in another remainder.
    async fn misplaced(&self, table: &Table, shard: usize) -> Vec<Option<String>> {
        let sql = format!(
            "SELECT {c}::text FROM {t} \
             WHERE NOT satisfies_hash_partition('{twin}'::regclass, {SHARDS}, {shard}, {c})",
            c = table.column,
            t = table.name,
            twin = table.twin()
        );
        let direct = self.direct(shard).await;
        let rows = direct.query(sql.as_str(), &[]).await;
        let rows = rows.unwrap_or_else(|e| panic!("{sql}: {}", describe_error(&e)));
        rows.iter().map(|r| r.get(0)).collect()
    }
}

/// A few rows present on one side only, for a failure message.
fn first_differences<T: Ord + std::fmt::Debug + Clone>(actual: &[T], want: &[T]) -> String {
    let extra: Vec<&T> = actual
        .iter()
        .filter(|r| want.binary_search(r).is_err())
        .collect();
    let missing: Vec<&T> = want
        .iter()
        .filter(|r| actual.binary_search(r).is_err())
        .collect();
    let mut out = String::new();
    let _ = write!(
        out,
        "unexpected {:?}; missing {:?}",
        &extra[..extra.len().min(5)],
        &missing[..missing.len().min(5)]
    );
    out
}

fn start_shard(replicas: bool) -> Shard {
    let primary = PgCluster::start();
    primary.create_user("app", PASSWORD, "scram-sha-256");
    primary.create_database("shop", "app");
    primary.psql("shop", &schema());
    let replica = replicas.then(|| {
        // pg_basebackup starts with a spread checkpoint, which paces the many buffers CREATE
        // DATABASE dirtied over minutes; an immediate one first leaves it nothing to write.
        primary.psql("postgres", "CHECKPOINT");
        primary.start_replica()
    });
    Shard { primary, replica }
}

/// The reference configuration of the brief, pointed at `shards`.
fn weir_config(shards: &[Shard]) -> String {
    weir_config_with(shards, "")
}

/// Weir's config for `shards`, with `general` (newline-separated `key = value` lines) added to
/// its `[weir]` section.
pub fn weir_config_with(shards: &[Shard], general: &str) -> String {
    let shard_list: Vec<String> = shards
        .iter()
        .map(|s| {
            let replicas: Vec<String> = s
                .replica
                .iter()
                .map(|r| format!("\"127.0.0.1:{}\"", r.port))
                .collect();
            format!(
                "{{ primary = \"127.0.0.1:{}\", replicas = [{}] }}",
                s.primary.port,
                replicas.join(", ")
            )
        })
        .collect();
    let tables: Vec<String> = TABLES
        .iter()
        .map(|t| {
            format!(
                "{{ table = \"{}\", column = \"{}\", type = \"{}\" }}",
                t.name,
                t.column,
                t.key_type.name()
            )
        })
        .collect();
    format!(
        "[weir]\n\
         auth_type = \"scram-sha-256\"\n\
         default_pool_size = 4\n\
         ban_time = \"2s\"\n\
         {general}\n\
         \n\
         [users.app]\n\
         password = \"{PASSWORD}\"\n\
         \n\
         [databases.shop]\n\
         shards = [ {} ]\n\
         sharded_tables = [ {} ]\n\
         read_from_replicas = true\n",
        shard_list.join(", "),
        tables.join(", ")
    )
}

// ---------------------------------------------------------------------------------------------
// Queries and waiting
// ---------------------------------------------------------------------------------------------

/// The rows of a simple-protocol result as text (NULL as None).
pub fn rows_of(messages: &[SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
            }
            _ => None,
        })
        .collect()
}

/// Runs `sql` with the simple protocol: its rows, or the error as "SQLSTATE: message".
pub async fn simple(client: &Client, sql: &str) -> Result<Vec<Vec<Option<String>>>, String> {
    match client.simple_query(sql).await {
        Ok(m) => Ok(rows_of(&m)),
        Err(e) => Err(sqlstate_and_message(&e)),
    }
}

/// Runs a write with the simple protocol: the rows it affected, or the error.
pub async fn simple_count(client: &Client, sql: &str) -> Result<u64, String> {
    let messages = client
        .simple_query(sql)
        .await
        .map_err(|e| sqlstate_and_message(&e))?;
    messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .ok_or_else(|| format!("no CommandComplete in {} messages", messages.len()))
}

/// "SQLSTATE: message" of an error (or its Debug form when it did not come from a server).
pub fn sqlstate_and_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => describe_error(e),
    }
}

/// The first column of the only row of `sql`; panics naming the statement otherwise.
pub async fn scalar(client: &Client, sql: &str) -> String {
    let rows = simple(client, sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    match rows.as_slice() {
        [row] => row[0].clone().unwrap_or_default(),
        _ => panic!("{sql}: expected one row, got {rows:?}"),
    }
}

/// `common::eventually` for a condition that queries through the runtime (needs the
/// multi-threaded runtime: the waiting worker steps aside while the condition runs).
pub fn eventually_async<F, Fut>(timeout: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let handle = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| eventually(timeout, what, || handle.block_on(condition())));
}

/// Stops a cluster the way a crash would (`pg_ctl stop -m immediate`); `start_again` brings it
/// back (with crash recovery).
pub fn crash(cluster: &PgCluster) {
    let pg_ctl = common::pg_bin("pg_ctl");
    // SAFETY: geteuid has no preconditions.
    let mut cmd = if unsafe { libc::geteuid() } == 0 {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(pg_ctl);
        c
    } else {
        Command::new(pg_ctl)
    };
    let out = cmd
        .arg("-D")
        .arg(&cluster.data_dir)
        .args(["-m", "immediate", "-w", "-t", "30", "stop"])
        .current_dir(&cluster.dir)
        .stdin(Stdio::null())
        .output()
        .expect("run pg_ctl stop");
    assert!(
        out.status.success(),
        "pg_ctl stop -m immediate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Panics listing every problem found, if any.
pub fn assert_no_problems(what: &str, problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{what}: {} problem(s):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}
