//! Online resharding end to end: `RESHARD shop TO shop_v2` on the admin console moves a
//! two-shard database onto four shards in the background while clients keep writing, and
//! from then on Weir routes `shop` to the four new shards.
//!
//! One PostgreSQL cluster (`wal_level = logical`) holds every shard as a database of its own
//! (the per-shard `dbname`): the source shards `shop_0`, `shop_1` and the empty target shards
//! `v2_0` … `v2_3`. Weir has database `shop` on the sources and `shop_v2` on the targets, both
//! with `accounts` and `history` sharded by `aid` (bigint) and `branches` unsharded (shard 0).
//! `history.id` is a bigserial whose sequence each source shard interleaves (increment 2,
//! starting at 1 and 2), so ids are unique over the shards, as a table's key must be for its
//! rows to meet on one target.
//!
//! The oracle for "the right shard" is PostgreSQL itself: after the move each target gets an
//! empty `accounts_hp (aid bigint) PARTITION BY HASH (aid)`, and
//! `satisfies_hash_partition('accounts_hp', 4, i, aid)` must hold for every `accounts` and
//! `history` row on target `i`. The oracle for "nothing lost, nothing doubled" is what the
//! clients were told was committed.
//!
//! - `a_busy_shop_moves_to_four_shards_without_a_failed_transaction`: four clients, connected
//!   before the move and never reconnecting, run transfers (UPDATE accounts + INSERT history
//!   in one transaction, both statements prepared once and reused throughout) and open new
//!   accounts while the reshard copies, streams and cuts over. No transaction fails; every row
//!   is on its hash partition's target; accounts, balances and history match what was
//!   committed; `branches` is on target 0 only; each target's sequence is past its ids; the
//!   sources get no write after `done`; Weir's fan-out over the new shards sees the totals;
//!   no replication slot or `weir%` publication is left behind.
//! - `a_cancelled_reshard_leaves_shop_on_its_two_shards`: `RESHARD CANCEL` during the copy (or
//!   the streaming) ends in phase `cancelled`, with clients writing all along; `shop` still
//!   routes to the two old shards, which hold everything committed, and slots and
//!   publications are gone.
//! - `reshard_refusals_are_explained`: an unknown target or source, a database onto itself
//!   and a table without a primary key are refused with a message naming the problem; nothing
//!   is left behind, and the same RESHARD goes through once the table is gone.
//! - `every_kind_of_change_during_the_move_is_followed`: the streaming made deterministic.
//!   Once the copy has started the test holds every target's `accounts` and `history` in
//!   ROW EXCLUSIVE mode: the COPYs go through, the primary keys and indexes after them wait,
//!   so nothing streams (SHOW RESHARD stays in `copy`) while the test writes through Weir:
//!   inserts, updates, sharding-key changes to every other new shard (on both sides of the
//!   old split, where the row stays on its old shard), deletes, a delete and re-insert, a
//!   rolled-back insert, NULLs, a two-statement transaction, a TRUNCATE of one old shard's
//!   `history` (by hint: without two_phase_commit Weir runs it on one shard only), history
//!   key changes (the key is not in the replica identity), and changes by hint to history
//!   rows whose new key names the other side. Then it lets go; after `done` the targets,
//!   and `shop` through Weir, hold exactly the rows expected (every column compared), each
//!   once and on its hash partition.
//!
//! Progress (phase changes, the longest transaction) is printed to stderr; run with
//! `--nocapture` to see it. On a failure the harness prints Weir's and PostgreSQL's logs.

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{describe_error, PgCluster, PgOptions, Weir};
use futures_util::{pin_mut, SinkExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinHandle;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, SimpleQueryMessage, Statement};
use weir::router::{shard_for, KeyType, KeyValue};

/// Role `app`'s password (a PostgreSQL superuser), in PostgreSQL and in Weir's `[users.app]`.
const PASSWORD: &str = "app-secret";
/// Role `admin`'s password: Weir's console user (also a PostgreSQL superuser).
const ADMIN_PASSWORD: &str = "admin-secret";
/// The databases of `shop`'s shards before the move.
const SOURCES: [&str; 2] = ["shop_0", "shop_1"];
/// The databases of `shop_v2`'s shards: where `shop` moves.
const TARGETS: [&str; 4] = ["v2_0", "v2_1", "v2_2", "v2_3"];
/// Accounts loaded before the busy move (aids 1..=ACCOUNTS).
const ACCOUNTS: i64 = 20_000;
/// Accounts loaded before the cancelled move: enough that the copy lasts well past the first
/// look at SHOW RESHARD that finds it copying.
const CANCEL_ACCOUNTS: i64 = 200_000;
/// Rows of the unsharded `branches` (bids 1..=BRANCHES).
const BRANCHES: i64 = 10;
/// Every this many transactions a client opens a new account instead of a transfer.
const OPEN_EVERY: u64 = 25;
/// A client's pause between two transactions: a pace (so two cores also have room for the
/// copy and the streaming), not a synchronisation.
const PACE: Duration = Duration::from_millis(5);
/// How long a reshard of the test's data may take from RESHARD to `done` (or `cancelled`).
const RESHARD_TIMEOUT: Duration = Duration::from_secs(90);
/// How long the replication slots and publications may take to go once the run has ended.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(15);
/// How often SHOW RESHARD is polled.
const POLL: Duration = Duration::from_millis(20);
/// SHOW RESHARD's documented columns, in order (Weir may show more between them).
const SHOW_RESHARD_COLUMNS: [&str; 13] = [
    "database",
    "target",
    "phase",
    "tables",
    "tables_done",
    "rows_copied",
    "rows_per_sec",
    "lag_bytes",
    "lag_ms",
    "eta_s",
    "elapsed_s",
    "cutover_ms",
    "error",
];

// ---------------------------------------------------------------------------------------------
// The topology
// ---------------------------------------------------------------------------------------------

/// The tables of a source shard, owned by `app`. `history_id_seq` hands out ids
/// `source + 1`, `source + 1 + 2`, …, so the two sources never hand out the same id.
fn schema(source: usize) -> String {
    format!(
        "SET ROLE app;\n\
         CREATE TABLE accounts (aid bigint PRIMARY KEY, balance bigint NOT NULL, filler text);\n\
         CREATE TABLE history (id bigserial PRIMARY KEY, aid bigint NOT NULL, \
             delta bigint NOT NULL, ts timestamptz NOT NULL DEFAULT now());\n\
         CREATE TABLE branches (bid int PRIMARY KEY, balance bigint NOT NULL);\n\
         ALTER SEQUENCE history_id_seq INCREMENT BY {} RESTART WITH {};\n",
        SOURCES.len(),
        source + 1
    )
}

/// The cluster every shard lives in: logical decoding on, superusers `app` and `admin`, the
/// source databases with the schema, the empty target databases.
fn start_cluster() -> PgCluster {
    let pg = PgCluster::start_with(PgOptions {
        extra_conf: vec![
            "wal_level = logical".to_string(),
            "max_replication_slots = 10".to_string(),
            "max_wal_senders = 10".to_string(),
        ],
        ..PgOptions::default()
    });
    pg.create_superuser("app", PASSWORD, "scram-sha-256");
    pg.create_superuser("admin", ADMIN_PASSWORD, "scram-sha-256");
    for (i, db) in SOURCES.iter().enumerate() {
        pg.create_database(db, "app");
        pg.psql(db, &schema(i));
    }
    for db in TARGETS {
        pg.create_database(db, "app");
    }
    pg
}

/// A `[databases.NAME]` section: the shards on 127.0.0.1:`port`, one per database in `dbs`,
/// `accounts` and `history` sharded by `aid`, logging in to PostgreSQL as `app`.
fn sharded_database(name: &str, port: u16, dbs: &[&str]) -> String {
    let shards: Vec<String> = dbs
        .iter()
        .map(|db| format!("{{ primary = \"127.0.0.1:{port}\", dbname = \"{db}\" }}"))
        .collect();
    format!(
        "[databases.{name}]\n\
         user = \"app\"\n\
         password = \"{PASSWORD}\"\n\
         shards = [ {} ]\n\
         sharded_tables = [ \
             {{ table = \"accounts\", column = \"aid\", type = \"bigint\" }}, \
             {{ table = \"history\", column = \"aid\", type = \"bigint\" }} ]\n",
        shards.join(", ")
    )
}

/// Weir's config: `shop` on the two sources, `shop_v2` on the four targets, console user
/// `admin`.
fn weir_config(port: u16) -> String {
    format!(
        "[weir]\n\
         auth_type = \"scram-sha-256\"\n\
         admin_users = [\"admin\"]\n\
         default_pool_size = 8\n\
         \n\
         [users.app]\n\
         password = \"{PASSWORD}\"\n\
         \n\
         [users.admin]\n\
         password = \"{ADMIN_PASSWORD}\"\n\
         \n\
         {}\n\
         {}",
        sharded_database("shop", port, &SOURCES),
        sharded_database("shop_v2", port, &TARGETS)
    )
}

/// The cluster and the Weir in front of it (Weir first, so it is stopped first).
struct Shop {
    weir: Weir,
    pg: PgCluster,
}

impl Shop {
    /// Starts the cluster (a few seconds) and Weir.
    fn start() -> Shop {
        let pg = start_cluster();
        let weir = Weir::start(&weir_config(pg.port));
        Shop { weir, pg }
    }

    /// A client of `shop` through Weir.
    async fn client(&self) -> Client {
        common::connect(&self.weir.url("app", PASSWORD, "shop")).await
    }

    /// A client of Weir's admin console.
    async fn console(&self) -> Client {
        common::connect(&self.weir.url("admin", ADMIN_PASSWORD, "weir")).await
    }

    /// A client straight to database `db` of the cluster, as the superuser `postgres`.
    async fn direct(&self, db: &str) -> Client {
        common::connect(&self.pg.url("postgres", "", db)).await
    }
}

// ---------------------------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------------------------

/// Loads accounts `from..=to` (balance 0) through Weir with one sharded COPY.
async fn load_accounts(client: &Client, from: i64, to: i64) {
    let mut data = String::new();
    for aid in from..=to {
        let _ = writeln!(data, "{aid}\t0\tfiller of account {aid:>20}");
    }
    let sql = "COPY accounts (aid, balance, filler) FROM STDIN";
    let sink = client
        .copy_in::<_, Bytes>(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", describe_error(&e)));
    pin_mut!(sink);
    for part in data.as_bytes().chunks(64 * 1024) {
        sink.send(Bytes::copy_from_slice(part))
            .await
            .unwrap_or_else(|e| panic!("{sql}: sending data: {}", describe_error(&e)));
    }
    let n = sink
        .finish()
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", describe_error(&e)));
    assert_eq!(n, (to - from + 1) as u64, "rows loaded by {sql}");
}

/// Inserts the branches through Weir (unsharded: they land on shard 0).
async fn open_branches(client: &Client) {
    let values: Vec<String> = (1..=BRANCHES).map(|b| format!("({b}, 0)")).collect();
    let sql = format!(
        "INSERT INTO branches (bid, balance) VALUES {}",
        values.join(", ")
    );
    client
        .batch_execute(&sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", describe_error(&e)));
}

/// Loads accounts 1..=`n` straight into the source shards, each row on the source that hash
/// partitioning over the two sources gives it (a temporary twin computes it), for a table too
/// big to load through Weir quickly.
fn fill_sources_directly(pg: &PgCluster, n: i64) {
    for (i, db) in SOURCES.iter().enumerate() {
        pg.psql(
            db,
            &format!(
                "CREATE TABLE accounts_hp (aid bigint) PARTITION BY HASH (aid);\n\
                 INSERT INTO accounts (aid, balance, filler) \
                   SELECT g, 0, 'filler of account ' || lpad(g::text, 20) \
                   FROM generate_series(1, {n}) AS g \
                   WHERE satisfies_hash_partition('accounts_hp'::regclass, {}, {i}, g::bigint);\n\
                 DROP TABLE accounts_hp;",
                SOURCES.len()
            ),
        );
        pg.psql(db, "VACUUM ANALYZE accounts");
    }
}

/// The bigint columns of the one row `sql` returns.
async fn ints(client: &Client, sql: &str) -> Vec<i64> {
    let row = client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", describe_error(&e)));
    (0..row.len()).map(|i| row.get::<_, i64>(i)).collect()
}

/// `SELECT count(*) FROM table` through Weir: a read without a sharding key, which Weir runs
/// on every shard (as a simple query, as it requires) and sums.
async fn fanout_count(client: &Client, table: &str) -> i64 {
    let sql = format!("SELECT count(*) FROM {table}");
    let messages = client
        .simple_query(&sql)
        .await
        .unwrap_or_else(|e| panic!("{sql} through Weir: {}", describe_error(&e)));
    let counts: Vec<i64> = messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
            _ => None,
        })
        .collect();
    match counts.as_slice() {
        [n] => *n,
        _ => panic!("{sql} through Weir: expected one count, got {counts:?}"),
    }
}

/// `SELECT count(*) FROM table`, or 0 when the database has no such table.
async fn count_if_exists(client: &Client, table: &str) -> i64 {
    let exists = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .unwrap_or_else(|e| panic!("to_regclass({table}): {}", describe_error(&e)))
        .get::<_, bool>(0);
    if exists {
        ints(client, &format!("SELECT count(*) FROM {table}")).await[0]
    } else {
        0
    }
}

/// Rows, balance sum, history rows and delta sum over the databases in `dbs`, read directly.
#[derive(Debug, Default, PartialEq, Eq)]
struct Totals {
    accounts: i64,
    balance: i64,
    history: i64,
    delta: i64,
}

async fn totals(shop: &Shop, dbs: &[&str]) -> Totals {
    let mut t = Totals::default();
    for db in dbs {
        let c = shop.direct(db).await;
        let a = ints(
            &c,
            "SELECT count(*), coalesce(sum(balance), 0)::bigint FROM accounts",
        )
        .await;
        let h = ints(
            &c,
            "SELECT count(*), coalesce(sum(delta), 0)::bigint FROM history",
        )
        .await;
        t.accounts += a[0];
        t.balance += a[1];
        t.history += h[0];
        t.delta += h[1];
    }
    t
}

/// Replication slots anywhere in the cluster and `weir%` publications in any shard's
/// database, one line each; empty when a reshard left nothing behind.
async fn leftovers(shop: &Shop) -> Vec<String> {
    let mut found = Vec::new();
    let c = shop.direct("postgres").await;
    for row in c
        .query(
            "SELECT slot_name::text, coalesce(database::text, ''), active FROM pg_replication_slots",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("pg_replication_slots: {}", describe_error(&e)))
    {
        found.push(format!(
            "replication slot {} (database {}, active {})",
            row.get::<_, String>(0),
            row.get::<_, String>(1),
            row.get::<_, bool>(2)
        ));
    }
    for db in SOURCES.iter().chain(TARGETS.iter()) {
        let c = shop.direct(db).await;
        for row in c
            .query(
                "SELECT pubname::text FROM pg_publication WHERE pubname LIKE 'weir%'",
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("pg_publication in {db}: {}", describe_error(&e)))
        {
            found.push(format!("publication {} in {db}", row.get::<_, String>(0)));
        }
    }
    found
}

/// Waits until the reshard left no slot and no publication; panics listing them otherwise.
async fn assert_no_leftovers(shop: &Shop) {
    let deadline = Instant::now() + CLEANUP_TIMEOUT;
    loop {
        let found = leftovers(shop).await;
        if found.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{CLEANUP_TIMEOUT:?} after the reshard ended, it left behind:\n  {}",
            found.join("\n  ")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Panics listing every problem found, if any.
fn assert_no_problems(what: &str, problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{what}: {} problem(s):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

// ---------------------------------------------------------------------------------------------
// The admin console
// ---------------------------------------------------------------------------------------------

/// One SHOW RESHARD row: column name -> value (NULL as "").
type Status = BTreeMap<String, String>;

/// A column of a SHOW RESHARD row ("" when it is NULL or missing).
fn field<'a>(status: &'a Status, name: &str) -> &'a str {
    status.get(name).map_or("", String::as_str)
}

/// A numeric column of a SHOW RESHARD row; panics naming it if it is not a number.
fn number(status: &Status, name: &str) -> f64 {
    field(status, name)
        .parse()
        .unwrap_or_else(|_| panic!("SHOW RESHARD column {name} is not a number: {status:?}"))
}

/// SHOW RESHARD's rows, each with its column names in order.
async fn show_reshard(console: &Client) -> Vec<Vec<(String, String)>> {
    let messages = console
        .simple_query("SHOW RESHARD")
        .await
        .unwrap_or_else(|e| panic!("SHOW RESHARD: {}", describe_error(&e)));
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name().to_string(), r.get(i).unwrap_or("").to_string()))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// The latest SHOW RESHARD row of database `shop`; None before any run.
async fn reshard_status(console: &Client) -> Option<Status> {
    let mut rows: Vec<Status> = show_reshard(console)
        .await
        .into_iter()
        .map(|row| row.into_iter().collect::<Status>())
        .filter(|s| field(s, "database") == "shop")
        .collect();
    rows.pop()
}

/// A console command that must succeed.
async fn console_ok(console: &Client, sql: &str) {
    console
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", describe_error(&e)));
}

/// A console command that must fail: its error as "SQLSTATE: message".
async fn console_error(console: &Client, sql: &str) -> String {
    match console.batch_execute(sql).await {
        Ok(()) => panic!("{sql} was accepted; it should have been refused"),
        Err(e) => match e.as_db_error() {
            Some(db) => format!("{}: {}", db.code().code(), db.message()),
            None => panic!("{sql}: no error from the console but {e:?}"),
        },
    }
}

/// Polls SHOW RESHARD until `shop`'s run is in one of the `wanted` phases and returns that
/// row. Prints each phase change. Panics if the run ends in a phase not wanted (`failed`
/// with its error column, `done`, `cancelled`), or after `timeout`.
async fn wait_for_phase(console: &Client, wanted: &[&str], timeout: Duration) -> Status {
    let started = Instant::now();
    let mut last_phase = String::new();
    loop {
        let status = reshard_status(console).await;
        if let Some(s) = &status {
            let phase = field(s, "phase");
            if phase != last_phase {
                eprintln!(
                    "reshard at {:.2}s: phase {phase}, tables {}/{}, rows_copied {}, \
                     rows_per_sec {}, lag_bytes {}, lag_ms {}",
                    started.elapsed().as_secs_f64(),
                    field(s, "tables_done"),
                    field(s, "tables"),
                    field(s, "rows_copied"),
                    field(s, "rows_per_sec"),
                    field(s, "lag_bytes"),
                    field(s, "lag_ms"),
                );
                last_phase = phase.to_string();
            }
            if wanted.contains(&phase) {
                return s.clone();
            }
            if phase == "failed" {
                panic!(
                    "the reshard failed while waiting for phase {wanted:?}: {}\nSHOW RESHARD: {s:?}",
                    field(s, "error")
                );
            }
            if matches!(phase, "done" | "cancelled") {
                panic!("the reshard ended {phase} while waiting for phase {wanted:?}: {s:?}");
            }
        }
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting for phase {wanted:?}; last SHOW RESHARD: {status:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Issues `sql` (a RESHARD that should be refused) and returns the refusal: the console's
/// error if it answers with one, else the error column of the run once it has failed.
async fn refusal(console: &Client, sql: &str) -> String {
    match console.batch_execute(sql).await {
        Err(e) => describe_error(&e),
        Ok(()) => {
            let status = wait_for_phase(console, &["failed"], RESHARD_TIMEOUT).await;
            field(&status, "error").to_string()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The workload
// ---------------------------------------------------------------------------------------------

/// What the clients were told was committed, and what went wrong.
#[derive(Debug, Default)]
struct Tally {
    /// Committed transfers: one history row each.
    transfers: u64,
    /// Sum of the deltas of the committed transfers.
    delta: i64,
    /// Aids of the accounts opened (committed).
    opened: Vec<i64>,
    /// The longest transaction, committed or not.
    longest: Duration,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.transfers += other.transfers;
        self.delta += other.delta;
        self.opened.extend(other.opened);
        self.longest = self.longest.max(other.longest);
    }
}

/// What a workload client shares with the test and the other clients.
struct Shared {
    statements: Statements,
    /// Transfers go to accounts 1..=accounts.
    accounts: i64,
    /// The aid of the next account opened.
    next_aid: Arc<AtomicI64>,
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
}

/// A client's statements, prepared once before the reshard and used until the end.
struct Statements {
    update: Statement,
    history: Statement,
    open: Statement,
}

/// Clients of `shop` writing in a loop until stopped.
struct Workload {
    stop: Arc<AtomicBool>,
    /// Transactions committed so far, over all clients.
    committed: Arc<AtomicU64>,
    /// Failed transactions, one line each (a client stops at its first).
    errors: Arc<Mutex<Vec<String>>>,
    tasks: Vec<JoinHandle<Tally>>,
}

impl Workload {
    /// Connects `clients` clients to `shop`, prepares their statements, and starts them:
    /// transfers between random accounts among 1..=`accounts`, and every OPEN_EVERY-th
    /// transaction a new account with the next aid from `first_new_aid` up.
    async fn start(shop: &Shop, clients: u64, accounts: i64, first_new_aid: i64) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let next_aid = Arc::new(AtomicI64::new(first_new_aid));
        let mut tasks = Vec::new();
        for n in 0..clients {
            let client = shop.client().await;
            let shared = Shared {
                statements: prepare(&client).await,
                accounts,
                next_aid: next_aid.clone(),
                stop: stop.clone(),
                committed: committed.clone(),
                errors: errors.clone(),
            };
            tasks.push(tokio::spawn(run_client(n, client, shared)));
        }
        Workload {
            stop,
            committed,
            errors,
            tasks,
        }
    }

    /// Transactions committed so far.
    fn committed(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }

    /// The failed transactions so far.
    fn errors(&self) -> Vec<String> {
        self.errors
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Waits until the clients have committed `n` more transactions than `since` (so the
    /// workload is known to be running), or panics after `timeout`, or once every client has
    /// stopped, listing their errors.
    async fn wait_for_commits(&self, since: u64, n: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.committed() < since + n {
            let all_stopped = self.tasks.iter().all(JoinHandle::is_finished);
            if all_stopped || Instant::now() >= deadline {
                panic!(
                    "the clients committed {} transactions, not {n}, within {timeout:?} \
                     (all stopped: {all_stopped}); failed transactions:\n  {}",
                    self.committed() - since,
                    self.errors().join("\n  ")
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the clients after their current transaction; what they all did, and the failed
    /// transactions.
    async fn stop(mut self) -> (Tally, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut tally = Tally::default();
        for task in self.tasks.drain(..) {
            tally.merge(task.await.expect("a workload client panicked"));
        }
        (tally, self.errors())
    }
}

/// Prepares `sql` with parameters of `types` on `client`; panics with the error.
async fn prepare_one(client: &Client, sql: &str, types: &[Type]) -> Statement {
    client
        .prepare_typed(sql, types)
        .await
        .unwrap_or_else(|e| panic!("prepare {sql}: {}", describe_error(&e)))
}

/// The workload's three statements, prepared on `client`.
async fn prepare(client: &Client) -> Statements {
    let int8 = [Type::INT8, Type::INT8];
    Statements {
        update: prepare_one(
            client,
            "UPDATE accounts SET balance = balance + $1 WHERE aid = $2",
            &int8,
        )
        .await,
        history: prepare_one(
            client,
            "INSERT INTO history (aid, delta) VALUES ($1, $2)",
            &int8,
        )
        .await,
        open: prepare_one(
            client,
            "INSERT INTO accounts (aid, balance, filler) VALUES ($1, 0, 'opened by the workload')",
            &int8[..1],
        )
        .await,
    }
}

/// One transfer: BEGIN; UPDATE accounts; INSERT INTO history; COMMIT. An UPDATE that finds
/// no account is an error (the row is missing from the shard the key routes to).
async fn transfer(client: &mut Client, s: &Statements, aid: i64, delta: i64) -> Result<(), String> {
    let tx = client
        .transaction()
        .await
        .map_err(|e| format!("BEGIN: {}", describe_error(&e)))?;
    let n = tx
        .execute(&s.update, &[&delta, &aid])
        .await
        .map_err(|e| format!("UPDATE: {}", describe_error(&e)))?;
    if n != 1 {
        // Dropping the transaction rolls it back.
        return Err(format!("UPDATE found {n} rows, not 1"));
    }
    tx.execute(&s.history, &[&aid, &delta])
        .await
        .map_err(|e| format!("INSERT INTO history: {}", describe_error(&e)))?;
    tx.commit()
        .await
        .map_err(|e| format!("COMMIT: {}", describe_error(&e)))
}

/// Client `n`'s loop: transactions until `stop`, each timed; stops at the first error.
async fn run_client(n: u64, mut client: Client, shared: Shared) -> Tally {
    let Shared {
        statements: s,
        accounts,
        next_aid,
        stop,
        committed,
        errors,
    } = shared;
    let mut rng = StdRng::seed_from_u64(n);
    let mut tally = Tally::default();
    let started = Instant::now();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let begun = Instant::now();
        let (what, outcome) = if i.is_multiple_of(OPEN_EVERY) {
            let aid = next_aid.fetch_add(1, Ordering::Relaxed);
            let outcome = match client.execute(&s.open, &[&aid]).await {
                Ok(1) => Ok(()),
                Ok(rows) => Err(format!("INSERT INTO accounts inserted {rows} rows")),
                Err(e) => Err(format!("INSERT INTO accounts: {}", describe_error(&e))),
            };
            if outcome.is_ok() {
                tally.opened.push(aid);
            }
            (format!("opening account {aid}"), outcome)
        } else {
            let aid = rng.gen_range(1..=accounts);
            let delta = rng.gen_range(-5000..5000);
            let outcome = transfer(&mut client, &s, aid, delta).await;
            if outcome.is_ok() {
                tally.transfers += 1;
                tally.delta += delta;
            }
            (format!("transfer of {delta} to account {aid}"), outcome)
        };
        tally.longest = tally.longest.max(begun.elapsed());
        match outcome {
            Ok(()) => {
                committed.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                errors
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .push(format!(
                        "client {n}, transaction {i} ({what}), {:.2}s into the run: {e}",
                        started.elapsed().as_secs_f64()
                    ));
                break;
            }
        }
        tokio::time::sleep(PACE).await;
    }
    tally
}

// ---------------------------------------------------------------------------------------------
// The checks on the targets
// ---------------------------------------------------------------------------------------------

/// What one target shard holds, read directly.
#[derive(Debug)]
struct TargetShard {
    accounts: i64,
    misplaced_accounts: i64,
    balance: i64,
    history: i64,
    misplaced_history: i64,
    delta: i64,
    max_history_id: i64,
    sequence_last_value: i64,
    branches: i64,
    /// Aids above the loaded ones: the accounts the workload opened.
    opened: Vec<i64>,
}

/// Target `i`'s contents, after giving it the `accounts_hp` twin the oracle needs.
async fn read_target(shop: &Shop, i: usize) -> TargetShard {
    let n = TARGETS.len();
    let c = shop.direct(TARGETS[i]).await;
    c.batch_execute("CREATE TABLE accounts_hp (aid bigint) PARTITION BY HASH (aid)")
        .await
        .unwrap_or_else(|e| panic!("twin on {}: {}", TARGETS[i], describe_error(&e)));
    let misplaced = format!(
        "count(*) FILTER (WHERE NOT satisfies_hash_partition('accounts_hp'::regclass, {n}, {i}, aid))"
    );
    let a = ints(
        &c,
        &format!("SELECT count(*), {misplaced}, coalesce(sum(balance), 0)::bigint FROM accounts"),
    )
    .await;
    let h = ints(
        &c,
        &format!(
            "SELECT count(*), {misplaced}, coalesce(sum(delta), 0)::bigint, \
             coalesce(max(id), 0) FROM history"
        ),
    )
    .await;
    let sequence_last_value = ints(&c, "SELECT last_value FROM history_id_seq").await[0];
    let opened = c
        .query(
            "SELECT aid FROM accounts WHERE aid > $1 ORDER BY aid",
            &[&ACCOUNTS],
        )
        .await
        .unwrap_or_else(|e| panic!("opened accounts: {}", describe_error(&e)))
        .iter()
        .map(|r| r.get::<_, i64>(0))
        .collect();
    TargetShard {
        accounts: a[0],
        misplaced_accounts: a[1],
        balance: a[2],
        history: h[0],
        misplaced_history: h[1],
        delta: h[2],
        max_history_id: h[3],
        sequence_last_value,
        branches: count_if_exists(&c, "branches").await,
        opened,
    }
}

/// History rows on the sources: the same before and after a point means no write reached
/// them in between.
async fn source_history_rows(shop: &Shop) -> i64 {
    totals(shop, &SOURCES).await.history
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_shop_moves_to_four_shards_without_a_failed_transaction() {
    let shop = Shop::start();
    let loader = shop.client().await;
    load_accounts(&loader, 1, ACCOUNTS).await;
    open_branches(&loader).await;
    let console = shop.console().await;

    let workload = Workload::start(&shop, 4, ACCOUNTS, ACCOUNTS + 1).await;
    workload
        .wait_for_commits(0, 50, Duration::from_secs(30))
        .await;
    let before = workload.committed();
    console_ok(&console, "RESHARD shop TO shop_v2").await;
    let started = Instant::now();
    let done = wait_for_phase(&console, &["done"], RESHARD_TIMEOUT).await;
    let took = started.elapsed();
    let at_done = workload.committed();
    let sources_at_done = source_history_rows(&shop).await;
    // The clients go on for a while on the new shards.
    workload
        .wait_for_commits(at_done, 50, Duration::from_secs(30))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (tally, errors) = workload.stop().await;
    eprintln!(
        "reshard took {took:?} (cutover_ms {}); {} transfers and {} new accounts committed, \
         {before} before RESHARD, {} after done; longest transaction {:?}",
        field(&done, "cutover_ms"),
        tally.transfers,
        tally.opened.len(),
        tally.transfers + tally.opened.len() as u64 - at_done,
        tally.longest
    );
    assert_no_problems("clients writing through the reshard", &errors);

    // SHOW RESHARD's account of the run.
    let rows = show_reshard(&console).await;
    let names: Vec<&str> = rows[0].iter().map(|(name, _)| name.as_str()).collect();
    let mut rest = names.iter();
    assert!(
        SHOW_RESHARD_COLUMNS
            .iter()
            .all(|want| rest.any(|name| name == want)),
        "SHOW RESHARD's columns {names:?} should include {SHOW_RESHARD_COLUMNS:?} in that order"
    );
    let mut problems = Vec::new();
    for (column, want) in [("database", "shop"), ("target", "shop_v2"), ("error", "")] {
        if field(&done, column) != want {
            problems.push(format!(
                "SHOW RESHARD {column} = {:?}, expected {want:?}",
                field(&done, column)
            ));
        }
    }
    // Tables to copy, as Weir counts them (it may count a table once per source shard).
    if number(&done, "tables") < 3.0 || field(&done, "tables_done") != field(&done, "tables") {
        problems.push(format!(
            "SHOW RESHARD tables_done/tables = {}/{}, expected all of at least 3 \
             (accounts, history, branches)",
            field(&done, "tables_done"),
            field(&done, "tables")
        ));
    }
    if number(&done, "rows_copied") < (ACCOUNTS + BRANCHES) as f64 {
        problems.push(format!(
            "SHOW RESHARD rows_copied = {}, expected at least the {} loaded rows",
            field(&done, "rows_copied"),
            ACCOUNTS + BRANCHES
        ));
    }
    for column in ["elapsed_s", "cutover_ms"] {
        if number(&done, column) < 0.0 {
            problems.push(format!("SHOW RESHARD {column} = {}", field(&done, column)));
        }
    }

    // The sources got no write once the run was done.
    let sources_now = source_history_rows(&shop).await;
    if sources_now != sources_at_done {
        problems.push(format!(
            "the sources held {sources_at_done} history rows at done and {sources_now} later: \
             writes still reached them"
        ));
    }

    // Every row on the target hash partitioning gives it; nothing lost or doubled.
    let mut targets = Vec::new();
    for i in 0..TARGETS.len() {
        targets.push(read_target(&shop, i).await);
    }
    for (db, t) in TARGETS.iter().zip(&targets) {
        eprintln!(
            "{db}: {} accounts ({} opened during the run), {} history rows, {} branches, \
             history_id_seq at {}",
            t.accounts,
            t.opened.len(),
            t.history,
            t.branches,
            t.sequence_last_value
        );
    }
    for (i, t) in targets.iter().enumerate() {
        if t.misplaced_accounts > 0 || t.misplaced_history > 0 {
            problems.push(format!(
                "{}: {} of {} accounts and {} of {} history rows belong on another target",
                TARGETS[i], t.misplaced_accounts, t.accounts, t.misplaced_history, t.history
            ));
        }
        if t.accounts == 0 || t.history == 0 {
            problems.push(format!(
                "{}: no accounts or no history at all: {t:?}",
                TARGETS[i]
            ));
        }
        let want_branches = if i == 0 { BRANCHES } else { 0 };
        if t.branches != want_branches {
            problems.push(format!(
                "{}: {} branches, expected {want_branches} (unsharded rows go to shard 0)",
                TARGETS[i], t.branches
            ));
        }
        if t.sequence_last_value < t.max_history_id {
            problems.push(format!(
                "{}: history_id_seq is at {}, behind history id {}",
                TARGETS[i], t.sequence_last_value, t.max_history_id
            ));
        }
    }
    let sum = |f: fn(&TargetShard) -> i64| targets.iter().map(f).sum::<i64>();
    let mut want_opened = tally.opened.clone();
    want_opened.sort_unstable();
    let mut opened: Vec<i64> = targets.iter().flat_map(|t| t.opened.clone()).collect();
    opened.sort_unstable();
    let expected_accounts = ACCOUNTS + want_opened.len() as i64;
    for (what, got, want) in [
        ("accounts", sum(|t| t.accounts), expected_accounts),
        ("sum(balance)", sum(|t| t.balance), tally.delta),
        ("history rows", sum(|t| t.history), tally.transfers as i64),
        ("sum(history.delta)", sum(|t| t.delta), tally.delta),
    ] {
        if got != want {
            problems.push(format!("{what} over the targets: {got}, committed: {want}"));
        }
    }
    if opened != want_opened {
        problems.push(format!(
            "the targets hold {} of the accounts opened during the run, {} were committed",
            opened.len(),
            want_opened.len()
        ));
    }
    assert_no_problems("after the reshard", &problems);

    // Weir's fan-out over the new shards, from a new client and from one of before the move.
    let fresh = shop.client().await;
    let through_weir = fanout_count(&fresh, "accounts").await;
    assert_eq!(
        through_weir, expected_accounts,
        "count(*) of accounts through Weir"
    );
    for aid in 1..=8i64 {
        loader
            .execute("INSERT INTO history (aid, delta) VALUES ($1, 0)", &[&aid])
            .await
            .unwrap_or_else(|e| panic!("a new history row for aid {aid}: {}", describe_error(&e)));
    }
    let history = fanout_count(&fresh, "history").await;
    assert_eq!(
        history,
        tally.transfers as i64 + 8,
        "count(*) of history through Weir"
    );

    assert_no_leftovers(&shop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_reshard_leaves_shop_on_its_two_shards() {
    let shop = Shop::start();
    fill_sources_directly(&shop.pg, CANCEL_ACCOUNTS);
    let console = shop.console().await;
    let workload = Workload::start(&shop, 2, CANCEL_ACCOUNTS, CANCEL_ACCOUNTS + 1).await;
    workload
        .wait_for_commits(0, 20, Duration::from_secs(30))
        .await;

    console_ok(&console, "RESHARD shop TO shop_v2").await;
    let copying = wait_for_phase(&console, &["copy", "streaming"], RESHARD_TIMEOUT).await;
    console_ok(&console, "RESHARD CANCEL").await;
    let cancelled = wait_for_phase(&console, &["cancelled"], RESHARD_TIMEOUT).await;
    eprintln!(
        "cancelled in phase {}: {cancelled:?}",
        field(&copying, "phase")
    );
    let since = workload.committed();
    workload
        .wait_for_commits(since, 20, Duration::from_secs(30))
        .await;
    let (tally, errors) = workload.stop().await;
    assert_no_problems("clients writing through the cancelled reshard", &errors);
    assert_no_leftovers(&shop).await;

    // The sources still hold everything, and still get the writes.
    let on_sources = totals(&shop, &SOURCES).await;
    let want = Totals {
        accounts: CANCEL_ACCOUNTS + tally.opened.len() as i64,
        balance: tally.delta,
        history: tally.transfers as i64,
        delta: tally.delta,
    };
    assert_eq!(on_sources, want, "the sources against what was committed");

    let client = shop.client().await;
    let aid = 1_000_000_007i64;
    client
        .execute(
            "INSERT INTO accounts (aid, balance, filler) VALUES ($1, 7, 'after the cancel')",
            &[&aid],
        )
        .await
        .unwrap_or_else(|e| panic!("a write after the cancel: {}", describe_error(&e)));
    let balance: i64 = client
        .query_one("SELECT balance FROM accounts WHERE aid = $1", &[&aid])
        .await
        .unwrap_or_else(|e| panic!("a read after the cancel: {}", describe_error(&e)))
        .get(0);
    assert_eq!(
        balance, 7,
        "the account written after the cancel, read through Weir"
    );
    let mut holders = Vec::new();
    for (i, db) in SOURCES.iter().enumerate() {
        let c = shop.direct(db).await;
        c.batch_execute("CREATE TABLE accounts_hp (aid bigint) PARTITION BY HASH (aid)")
            .await
            .unwrap_or_else(|e| panic!("twin on {db}: {}", describe_error(&e)));
        let found = ints(
            &c,
            &format!(
                "SELECT count(*), count(*) FILTER (WHERE satisfies_hash_partition(\
                 'accounts_hp'::regclass, {}, {i}, aid)) FROM accounts WHERE aid = {aid}",
                SOURCES.len()
            ),
        )
        .await;
        if found[0] > 0 {
            holders.push((db.to_string(), found[1] == found[0]));
        }
    }
    for db in TARGETS {
        let c = shop.direct(db).await;
        let exists = c
            .query_one("SELECT to_regclass('accounts') IS NOT NULL", &[])
            .await
            .expect("to_regclass")
            .get::<_, bool>(0);
        if exists
            && ints(
                &c,
                &format!("SELECT count(*) FROM accounts WHERE aid = {aid}"),
            )
            .await[0]
                > 0
        {
            holders.push((db.to_string(), false));
        }
    }
    assert!(
        matches!(holders.as_slice(), [(db, true)] if db.starts_with("shop_")),
        "the account written after the cancel is on {holders:?} (database, on its hash \
         partition); expected on exactly one source shard, the one hash partitioning gives it"
    );
    let through_weir = fanout_count(&client, "accounts").await;
    assert_eq!(
        through_weir,
        want.accounts + 1,
        "count(*) of accounts through Weir"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reshard_refusals_are_explained() {
    let shop = Shop::start();
    let client = shop.client().await;
    load_accounts(&client, 1, 100).await;
    let console = shop.console().await;

    for (sql, needle) in [
        ("RESHARD shop TO nosuchdb", "nosuchdb"),
        ("RESHARD nosuchdb TO shop_v2", "nosuchdb"),
        ("RESHARD shop TO shop", ""),
    ] {
        let err = console_error(&console, sql).await;
        assert!(err.starts_with("08P01: "), "{sql}: {err}");
        assert!(
            err.contains(needle),
            "{sql}: the error should name {needle:?}: {err}"
        );
        eprintln!("{sql}: {err}");
    }

    // A table with neither a primary key nor a replica identity cannot be streamed.
    for db in SOURCES {
        shop.pg
            .psql(db, "SET ROLE app; CREATE TABLE audit_notes (note text)");
    }
    let refused = refusal(&console, "RESHARD shop TO shop_v2").await;
    eprintln!("a table without a primary key: {refused}");
    assert!(
        refused.contains("audit_notes"),
        "the refusal should name the table without a primary key: {refused}"
    );
    assert_no_leftovers(&shop).await;
    let count = fanout_count(&client, "accounts").await;
    assert_eq!(count, 100, "shop after the refusal, through Weir");

    // Without it, the same RESHARD goes through.
    for db in SOURCES {
        shop.pg.psql(db, "DROP TABLE audit_notes");
    }
    console_ok(&console, "RESHARD shop TO shop_v2").await;
    wait_for_phase(&console, &["done"], RESHARD_TIMEOUT).await;
    assert_no_leftovers(&shop).await;
    let on_targets = totals(&shop, &TARGETS).await;
    assert_eq!(on_targets.accounts, 100, "accounts on the targets");
    let count = fanout_count(&client, "accounts").await;
    assert_eq!(count, 100, "shop on its new shards, through Weir");
}

// ---------------------------------------------------------------------------------------------
// Every kind of change, held back until the copy is done
// ---------------------------------------------------------------------------------------------

/// Accounts loaded before the move in `every_kind_of_change_during_the_move_is_followed`.
const SMALL_ACCOUNTS: i64 = 2_000;
/// History rows loaded before that move (aids 1..=SMALL_HISTORY, one row each).
const SMALL_HISTORY: i64 = 40;
/// The first key the test hands out for keys changed during that move (above all others).
const FRESH_KEYS: i64 = 10_000;
/// How long that move may take to copy its rows and reach the (held) index step.
const HOLD_TIMEOUT: Duration = Duration::from_secs(30);

/// The shard of bigint key `k` among `shards` (as hash partitioning, and so Weir, puts it).
fn shard_of(k: i64, shards: usize) -> usize {
    shard_for(KeyType::Bigint, &KeyValue::Int(k), shards as u64)
        .unwrap_or_else(|e| panic!("shard_for({k}, {shards}): {e}")) as usize
}

/// The source shard key `k` routes to before the move.
fn old_shard(k: i64) -> usize {
    shard_of(k, SOURCES.len())
}

/// The target shard key `k` belongs on after the move.
fn new_shard(k: i64) -> usize {
    shard_of(k, TARGETS.len())
}

/// Keys no row has had: each call hands out the next one `wanted` accepts.
struct FreshKeys(i64);

impl FreshKeys {
    fn pick(&mut self, wanted: impl Fn(i64) -> bool) -> i64 {
        loop {
            let k = self.0;
            self.0 += 1;
            if wanted(k) {
                return k;
            }
        }
    }
}

/// A table's row as the comparison sees it: (table, primary key) -> the other columns.
type RowKey = (&'static str, i64);

fn account_row(balance: i64, filler: Option<&str>) -> String {
    format!("balance {balance}, filler {filler:?}")
}

fn history_row(aid: i64, delta: i64) -> String {
    format!("aid {aid}, delta {delta}")
}

fn branch_row(balance: i64) -> String {
    format!("balance {balance}")
}

/// What `shop` must hold: the rows the test was told were committed, and for each row
/// touched during the move what happened to it (for the failure message).
#[derive(Default)]
struct Expected {
    /// aid -> (balance, filler)
    accounts: BTreeMap<i64, (i64, Option<String>)>,
    /// id -> (aid, delta)
    history: BTreeMap<i64, (i64, i64)>,
    /// bid -> balance
    branches: BTreeMap<i64, i64>,
    notes: BTreeMap<RowKey, String>,
}

impl Expected {
    fn note(&mut self, row: RowKey, what: String) {
        let n = self.notes.entry(row).or_default();
        if !n.is_empty() {
            n.push_str("; then ");
        }
        n.push_str(&what);
    }

    fn rows(&self) -> BTreeMap<RowKey, String> {
        let mut rows = BTreeMap::new();
        for (aid, (balance, filler)) in &self.accounts {
            rows.insert(("accounts", *aid), account_row(*balance, filler.as_deref()));
        }
        for (id, (aid, delta)) in &self.history {
            rows.insert(("history", *id), history_row(*aid, *delta));
        }
        for (bid, balance) in &self.branches {
            rows.insert(("branches", *bid), branch_row(*balance));
        }
        rows
    }

    /// A history row's aid (it must exist).
    fn aid_of(&self, id: i64) -> i64 {
        self.history
            .get(&id)
            .unwrap_or_else(|| panic!("the test lost track of history row {id}"))
            .0
    }
}

/// Where each row was found: (table, key) -> (database, row, whether it is on the shard
/// its key names there).
type Found = BTreeMap<RowKey, Vec<(String, String, bool)>>;

/// The rows of a simple query, as text.
async fn text_rows(client: &Client, sql: &str, whose: &str) -> Vec<Vec<Option<String>>> {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql} on {whose}: {}", describe_error(&e)))
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
            }
            _ => None,
        })
        .collect()
}

fn int_at(row: &[Option<String>], i: usize) -> i64 {
    row[i]
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("column {i} of {row:?} is not a number"))
}

/// Reads `accounts`, `history` and (if `branches`) `branches` through `client` into
/// `found`, labelled `whose`. With `target = Some(i)` (a target with the `accounts_hp`
/// twin) each sharded row is checked against hash partition `i`, and branches must be on
/// target 0.
async fn collect_rows(
    client: &Client,
    whose: &str,
    target: Option<usize>,
    branches: bool,
    found: &mut Found,
) {
    let placed = match target {
        Some(i) => format!(
            "satisfies_hash_partition('accounts_hp'::regclass, {}, {i}, aid)",
            TARGETS.len()
        ),
        None => "true".to_string(),
    };
    let mut add = |table: &'static str, key: i64, row: String, ok: bool| {
        found
            .entry((table, key))
            .or_default()
            .push((whose.to_string(), row, ok));
    };
    let sql = format!("SELECT aid, balance, filler, {placed} FROM accounts");
    for r in text_rows(client, &sql, whose).await {
        let row = account_row(int_at(&r, 1), r[2].as_deref());
        add("accounts", int_at(&r, 0), row, r[3].as_deref() == Some("t"));
    }
    let sql = format!("SELECT id, aid, delta, {placed} FROM history");
    for r in text_rows(client, &sql, whose).await {
        let row = history_row(int_at(&r, 1), int_at(&r, 2));
        add("history", int_at(&r, 0), row, r[3].as_deref() == Some("t"));
    }
    if branches {
        for r in text_rows(client, "SELECT bid, balance FROM branches", whose).await {
            add(
                "branches",
                int_at(&r, 0),
                branch_row(int_at(&r, 1)),
                target.is_none_or(|i| i == 0),
            );
        }
    }
}

/// Every difference between `found` (read from `place`) and what `want` says, one line
/// each: rows missing, unexpected, with other values, found twice or on the wrong shard.
fn compare(want: &Expected, found: &Found, place: &str) -> Vec<String> {
    let rows = want.rows();
    let mut problems = Vec::new();
    let keys: std::collections::BTreeSet<&RowKey> = rows.keys().chain(found.keys()).collect();
    for key in keys {
        let (table, k) = *key;
        let what = match want.notes.get(key) {
            Some(n) => format!("{table} {k} ({n})"),
            None => format!("{table} {k}"),
        };
        let expected = rows.get(key);
        let got = found.get(key).map_or(&[][..], Vec::as_slice);
        let seen: Vec<String> = got
            .iter()
            .map(|(db, row, _)| format!("{row} on {db}"))
            .collect();
        match (expected, got) {
            (None, []) => {}
            (Some(w), []) => problems.push(format!("{what}: missing from {place}, expected {w}")),
            (None, _) => problems.push(format!(
                "{what}: expected to be gone, found {}",
                seen.join(" and ")
            )),
            (Some(w), [_, _, ..]) => problems.push(format!(
                "{what}: found {} times: {}; expected once: {w}",
                got.len(),
                seen.join(" and ")
            )),
            (Some(w), _) => {
                for (db, row, _) in got {
                    if row != w {
                        problems.push(format!("{what}: {row} on {db}, expected {w}"));
                    }
                }
            }
        }
        for (db, _, ok) in got {
            if !ok {
                problems.push(format!(
                    "{what}: on {db}, which is not the shard its key names"
                ));
            }
        }
    }
    problems
}

/// A write through Weir that must affect exactly `rows` rows.
async fn write(client: &Client, sql: &str, params: &[&(dyn ToSql + Sync)], rows: u64) {
    let n = client
        .execute(sql, params)
        .await
        .unwrap_or_else(|e| panic!("{sql} {params:?} through Weir: {}", describe_error(&e)));
    assert_eq!(n, rows, "rows affected by {sql} {params:?} through Weir");
}

/// A simple-query write through Weir (for statements with a hint) that must affect
/// exactly `rows` rows (TRUNCATE reports none).
async fn write_simple(client: &Client, sql: &str, rows: u64) {
    let n: u64 = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql} through Weir: {}", describe_error(&e)))
        .iter()
        .map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => *n,
            _ => 0,
        })
        .sum();
    assert_eq!(n, rows, "rows affected by {sql} through Weir");
}

/// INSERT INTO history through Weir; the new row's id.
async fn add_history(client: &Client, aid: i64, delta: i64) -> i64 {
    let sql = "INSERT INTO history (aid, delta) VALUES ($1, $2) RETURNING id";
    client
        .query_one(sql, &[&aid, &delta])
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{sql} ({aid}, {delta}) through Weir: {}",
                describe_error(&e)
            )
        })
        .get(0)
}

/// Waits until a statement on a target waits for a lock: the index step, which runs only
/// once every source's rows are copied, is held by the test's locks. Returns what waits.
async fn wait_for_held_index_step(shop: &Shop, console: &Client) -> String {
    let c = shop.direct("postgres").await;
    let targets: Vec<&str> = TARGETS.to_vec();
    let deadline = Instant::now() + HOLD_TIMEOUT;
    loop {
        let waiting: Vec<String> = c
            .query(
                "SELECT d.datname::text, l.mode::text FROM pg_locks l \
                 JOIN pg_database d ON d.oid = l.database \
                 WHERE NOT l.granted AND d.datname::text = ANY($1)",
                &[&targets],
            )
            .await
            .unwrap_or_else(|e| panic!("pg_locks: {}", describe_error(&e)))
            .iter()
            .map(|r| {
                format!(
                    "a statement on {} waits for {}",
                    r.get::<_, String>(0),
                    r.get::<_, String>(1)
                )
            })
            .collect();
        if !waiting.is_empty() {
            return waiting.join(" | ");
        }
        let status = reshard_status(console).await;
        let phase = status.as_ref().map_or("", |s| field(s, "phase"));
        assert!(
            phase == "copy",
            "while the test held the targets' tables, the reshard went from copy to {phase}: \
             {status:?}"
        );
        assert!(
            Instant::now() < deadline,
            "no statement on a target waited for the test's locks within {HOLD_TIMEOUT:?}; \
             last SHOW RESHARD: {status:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// SHOW RESHARD must still be in phase `copy` (`when` says at which point of the test).
async fn assert_still_copying(console: &Client, when: &str) {
    let status = reshard_status(console).await;
    let phase = status.as_ref().map_or("", |s| field(s, "phase"));
    assert_eq!(
        phase, "copy",
        "{when}, with the targets' tables held, SHOW RESHARD should still say copy: {status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_change_during_the_move_is_followed() {
    let started = Instant::now();
    let shop = Shop::start();
    let mut c = shop.client().await;
    let console = shop.console().await;
    let mut want = Expected::default();
    let mut fresh = FreshKeys(FRESH_KEYS);

    // Before the move: accounts (key = primary key), history (key aid, primary key id),
    // branches (unsharded).
    load_accounts(&c, 1, SMALL_ACCOUNTS).await;
    for aid in 1..=SMALL_ACCOUNTS {
        let filler = format!("filler of account {aid:>20}");
        want.accounts.insert(aid, (0, Some(filler)));
    }
    open_branches(&c).await;
    for bid in 1..=BRANCHES {
        want.branches.insert(bid, 0);
    }
    let mut copied = [Vec::new(), Vec::new()];
    for aid in 1..=SMALL_HISTORY {
        let id = add_history(&c, aid, 10 * aid).await;
        want.history.insert(id, (aid, 10 * aid));
        copied[old_shard(aid)].push(id);
    }

    // The move starts; once the copy is under way the test holds every target's accounts
    // and history in ROW EXCLUSIVE mode: the COPYs go through, the indexes and primary
    // keys that follow them cannot be built, so nothing streams until the test lets go.
    console_ok(&console, "RESHARD shop TO shop_v2").await;
    let status = wait_for_phase(&console, &["copy", "streaming", "cutover"], RESHARD_TIMEOUT).await;
    assert_eq!(
        field(&status, "phase"),
        "copy",
        "the test should catch the reshard copying: {status:?}"
    );
    let mut locks = Vec::new();
    for db in TARGETS {
        let l = shop.direct(db).await;
        l.batch_execute("BEGIN; LOCK TABLE accounts, history IN ROW EXCLUSIVE MODE")
            .await
            .unwrap_or_else(|e| panic!("holding {db}'s tables: {}", describe_error(&e)));
        locks.push(l);
    }
    let held = wait_for_held_index_step(&shop, &console).await;
    eprintln!(
        "copy done at {:.2}s, index step held: {held}",
        started.elapsed().as_secs_f64()
    );
    assert_still_copying(&console, "once the copy was done").await;

    // ---- accounts: the sharding key is the primary key ----
    for aid in 3001..=3040i64 {
        let filler = (aid != 3007).then(|| format!("opened during the move {aid}"));
        write(
            &c,
            "INSERT INTO accounts (aid, balance, filler) VALUES ($1, $2, $3)",
            &[&aid, &aid, &filler],
            1,
        )
        .await;
        want.accounts.insert(aid, (aid, filler));
        want.note(("accounts", aid), "inserted during the move".into());
    }
    {
        let tx = c.transaction().await.expect("BEGIN");
        tx.execute(
            "INSERT INTO accounts (aid, balance, filler) VALUES (3999, 1, 'rolled back')",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("INSERT of 3999: {}", describe_error(&e)));
        tx.rollback().await.expect("ROLLBACK");
        want.note(("accounts", 3999), "inserted and rolled back".into());
    }
    for aid in (100..=190i64).step_by(3) {
        let delta = 7 * aid;
        write(
            &c,
            "UPDATE accounts SET balance = balance + $1 WHERE aid = $2",
            &[&delta, &aid],
            1,
        )
        .await;
        if let Some(a) = want.accounts.get_mut(&aid) {
            a.0 += delta;
        }
        want.note(("accounts", aid), format!("balance + {delta}"));
    }
    // Two accounts of one source shard in one transaction.
    let pair = (
        400i64,
        (401..)
            .find(|&a| old_shard(a) == old_shard(400))
            .expect("a key"),
    );
    {
        // Prepared before BEGIN, as the workload does: a statement prepared inside the
        // transaction would tie it to a shard before its key is known.
        let set = prepare_one(
            &c,
            "UPDATE accounts SET balance = $1 WHERE aid = $2",
            &[Type::INT8, Type::INT8],
        )
        .await;
        let tx = c.transaction().await.expect("BEGIN");
        for (aid, balance) in [(pair.0, 41i64), (pair.1, 42)] {
            let n = tx
                .execute(&set, &[&balance, &aid])
                .await
                .unwrap_or_else(|e| {
                    panic!("UPDATE of {aid} in a transaction: {}", describe_error(&e))
                });
            assert_eq!(n, 1, "UPDATE of account {aid} in a transaction");
            if let Some(a) = want.accounts.get_mut(&aid) {
                a.0 = balance;
            }
            want.note(
                ("accounts", aid),
                format!("balance = {balance} in a transaction"),
            );
        }
        tx.commit().await.expect("COMMIT");
    }
    for aid in [500i64, 501] {
        write(
            &c,
            "UPDATE accounts SET filler = NULL WHERE aid = $1",
            &[&aid],
            1,
        )
        .await;
        if let Some(a) = want.accounts.get_mut(&aid) {
            a.1 = None;
        }
        want.note(("accounts", aid), "filler = NULL".into());
    }
    // Key changes: each to a key of another new shard; one in three stays on its source
    // shard's side (new shard of the same parity), the others cross to the other side
    // (Weir routes an UPDATE by its WHERE, so such a row stays on its old source shard).
    let mut same_side = Vec::new();
    for (n, old) in (200..=211i64).enumerate() {
        let to = new_shard(old) ^ [2, 1, 3][n % 3];
        let new = fresh.pick(|k| new_shard(k) == to);
        let bump = n as i64;
        write(
            &c,
            "UPDATE accounts SET aid = $1, balance = balance + $3 WHERE aid = $2",
            &[&new, &old, &bump],
            1,
        )
        .await;
        let Some((balance, filler)) = want.accounts.remove(&old) else {
            panic!("the test lost track of account {old}");
        };
        want.accounts.insert(new, (balance + bump, filler));
        let side = if old_shard(new) == old_shard(old) {
            same_side.push(new);
            "same"
        } else {
            "other"
        };
        want.note(
            ("accounts", old),
            format!(
                "key changed to {new} (new shard {} -> {to})",
                new_shard(old)
            ),
        );
        want.note(
            ("accounts", new),
            format!(
                "was {old} on source {}, key changed (new shard {} -> {to}, {side} side)",
                SOURCES[old_shard(old)],
                new_shard(old)
            ),
        );
    }
    assert!(same_side.len() >= 2, "same-side key changes: {same_side:?}");
    // A moved account changed again (reachable by its new key: same side) and one deleted.
    write(
        &c,
        "UPDATE accounts SET balance = balance + 1000 WHERE aid = $1",
        &[&same_side[0]],
        1,
    )
    .await;
    if let Some(a) = want.accounts.get_mut(&same_side[0]) {
        a.0 += 1000;
    }
    want.note(("accounts", same_side[0]), "balance + 1000".into());
    write(
        &c,
        "DELETE FROM accounts WHERE aid = $1",
        &[&same_side[1]],
        1,
    )
    .await;
    want.accounts.remove(&same_side[1]);
    want.note(("accounts", same_side[1]), "deleted".into());
    for aid in 300..=320i64 {
        write(&c, "DELETE FROM accounts WHERE aid = $1", &[&aid], 1).await;
        want.accounts.remove(&aid);
        want.note(("accounts", aid), "deleted".into());
    }
    write(
        &c,
        "INSERT INTO accounts (aid, balance, filler) VALUES (320, 320320, 'reopened')",
        &[],
        1,
    )
    .await;
    want.accounts.insert(320, (320320, Some("reopened".into())));
    want.note(("accounts", 320), "inserted again".into());

    // ---- history: sharding key aid, not part of the primary key (id) ----
    // TRUNCATE of a sharded table: Weir refuses it without two_phase_commit (which the
    // fixtures' config does not set) but runs it on the shard a hint names. Source shard 1's
    // history goes; only source 1's rows are moved onto the targets of source 0's side
    // below, so the TRUNCATE and the other source's stream touch different rows.
    write_simple(&c, "/* weir: shard=1 */ TRUNCATE history", 0).await;
    for id in copied[1].drain(..) {
        want.history.remove(&id);
        want.note(("history", id), "truncated on source shop_1".into());
    }
    let mut added = [Vec::new(), Vec::new()];
    for aid in 41..=80i64 {
        let id = add_history(&c, aid, 1000 + aid).await;
        want.history.insert(id, (aid, 1000 + aid));
        want.note(("history", id), "inserted during the move".into());
        added[old_shard(aid)].push(id);
    }
    let (copied0, added0, added1) = (&copied[0], &added[0], &added[1]);
    assert!(
        copied0.len() >= 10 && added0.len() >= 2 && added1.len() >= 11,
        "history rows per source shard: {} copied on shop_0, {added0:?} and {added1:?} added",
        copied0.len()
    );
    let move_history = |want: &mut Expected, fresh: &mut FreshKeys, id: i64, cross: bool| {
        let aid = want.aid_of(id);
        let from = old_shard(aid);
        let aid2 =
            fresh.pick(|k| new_shard(k) != new_shard(aid) && (old_shard(k) == from) != cross);
        (aid, aid2)
    };
    // Moves that stay on the source shard's side: copied and added rows of shop_0, added
    // rows of shop_1.
    let mut moved0 = Vec::new();
    for &id in copied0[..4].iter().chain(&added0[..2]).chain(&added1[..3]) {
        let (aid, aid2) = move_history(&mut want, &mut fresh, id, false);
        write(
            &c,
            "UPDATE history SET aid = $1 WHERE id = $2 AND aid = $3",
            &[&aid2, &id, &aid],
            1,
        )
        .await;
        want.history.entry(id).and_modify(|h| h.0 = aid2);
        want.note(
            ("history", id),
            format!(
                "aid {aid} -> {aid2} (new shard {} -> {}, same side)",
                new_shard(aid),
                new_shard(aid2)
            ),
        );
        if old_shard(aid) == 0 {
            moved0.push(id);
        }
    }
    // Moves of shop_1's rows to the targets of shop_0's side.
    let crossed: Vec<i64> = added1[3..7].to_vec();
    for &id in &crossed {
        let (aid, aid2) = move_history(&mut want, &mut fresh, id, true);
        write(
            &c,
            "UPDATE history SET aid = $1 WHERE id = $2 AND aid = $3",
            &[&aid2, &id, &aid],
            1,
        )
        .await;
        want.history.entry(id).and_modify(|h| h.0 = aid2);
        want.note(
            ("history", id),
            format!(
                "aid {aid} -> {aid2} (new shard {} -> {}, other side; the row stays on shop_1)",
                new_shard(aid),
                new_shard(aid2)
            ),
        );
    }
    // Other columns, and deletes, by key.
    for &id in copied0[4..7].iter().chain(&added1[7..9]) {
        let aid = want.aid_of(id);
        write(
            &c,
            "UPDATE history SET delta = delta + 1 WHERE id = $1 AND aid = $2",
            &[&id, &aid],
            1,
        )
        .await;
        want.history.entry(id).and_modify(|h| h.1 += 1);
        want.note(("history", id), "delta + 1".into());
    }
    for &id in copied0[7..10]
        .iter()
        .chain(&added1[9..11])
        .chain(&moved0[..1])
    {
        let aid = want.aid_of(id);
        write(
            &c,
            "DELETE FROM history WHERE id = $1 AND aid = $2",
            &[&id, &aid],
            1,
        )
        .await;
        want.history.remove(&id);
        want.note(("history", id), "deleted".into());
    }
    // The rows moved to the other side live on shop_1 still, where their new key does not
    // route: a hint reaches them. One gets a new delta, one is deleted, one moves again.
    let hinted = |id: i64, set: &str| format!("/* weir: shard=1 */ {set} WHERE id = {id}");
    write_simple(
        &c,
        &hinted(crossed[0], "UPDATE history SET delta = delta + 5"),
        1,
    )
    .await;
    want.history.entry(crossed[0]).and_modify(|h| h.1 += 5);
    want.note(
        ("history", crossed[0]),
        "delta + 5 (on shop_1, by hint)".into(),
    );
    write_simple(&c, &hinted(crossed[1], "DELETE FROM history"), 1).await;
    want.history.remove(&crossed[1]);
    want.note(
        ("history", crossed[1]),
        "deleted (on shop_1, by hint)".into(),
    );
    let (aid, aid2) = move_history(&mut want, &mut fresh, crossed[2], false);
    write_simple(
        &c,
        &hinted(crossed[2], &format!("UPDATE history SET aid = {aid2}")),
        1,
    )
    .await;
    want.history.entry(crossed[2]).and_modify(|h| h.0 = aid2);
    want.note(
        ("history", crossed[2]),
        format!(
            "aid {aid} -> {aid2} (new shard {} -> {}, on shop_1, by hint)",
            new_shard(aid),
            new_shard(aid2)
        ),
    );

    // ---- branches: unsharded ----
    write(
        &c,
        "INSERT INTO branches (bid, balance) VALUES (11, 110), (12, 120)",
        &[],
        2,
    )
    .await;
    for bid in [11i64, 12] {
        want.branches.insert(bid, bid * 10);
        want.note(("branches", bid), "inserted during the move".into());
    }
    write(&c, "DELETE FROM branches WHERE bid = 3", &[], 1).await;
    want.branches.remove(&3);
    want.note(("branches", 3), "deleted".into());
    write(&c, "UPDATE branches SET balance = 55 WHERE bid = 5", &[], 1).await;
    want.branches.insert(5, 55);
    want.note(("branches", 5), "balance = 55".into());

    // The test's account of the changes against the sources themselves.
    let mut on_sources = Found::new();
    for (i, db) in SOURCES.iter().enumerate() {
        let s = shop.direct(db).await;
        collect_rows(&s, db, None, i == 0, &mut on_sources).await;
    }
    assert_no_problems(
        "the test's expectation against the sources (a mistake of the test)",
        &compare(&want, &on_sources, "the sources"),
    );
    assert_still_copying(&console, "after the changes").await;
    let changed = want.notes.len();

    // Let go: indexes, streaming, cutover.
    for (db, l) in TARGETS.iter().zip(&locks) {
        l.batch_execute("COMMIT")
            .await
            .unwrap_or_else(|e| panic!("releasing {db}'s tables: {}", describe_error(&e)));
    }
    drop(locks);
    let released = Instant::now();
    let done = wait_for_phase(&console, &["done"], RESHARD_TIMEOUT).await;
    eprintln!(
        "{changed} rows changed during the copy; done {:.2}s after the release (cutover_ms {})",
        released.elapsed().as_secs_f64(),
        field(&done, "cutover_ms")
    );

    // Every target: its rows, each on the shard hash partitioning names.
    let mut problems = Vec::new();
    let mut on_targets = Found::new();
    for (i, db) in TARGETS.iter().enumerate() {
        let t = read_target(&shop, i).await;
        if t.sequence_last_value < t.max_history_id {
            problems.push(format!(
                "{db}: history_id_seq is at {}, behind history id {}",
                t.sequence_last_value, t.max_history_id
            ));
        }
        let d = shop.direct(db).await;
        collect_rows(&d, db, Some(i), true, &mut on_targets).await;
    }
    problems.extend(compare(&want, &on_targets, "the targets"));
    // And `shop` through Weir, now on the targets.
    let fresh_client = shop.client().await;
    let mut through_weir = Found::new();
    collect_rows(
        &fresh_client,
        "shop through Weir",
        None,
        true,
        &mut through_weir,
    )
    .await;
    problems.extend(
        compare(&want, &through_weir, "shop through Weir")
            .into_iter()
            .map(|p| format!("through Weir: {p}")),
    );
    assert_no_problems("after the move", &problems);
    assert_no_leftovers(&shop).await;
    eprintln!("test took {:.2}s", started.elapsed().as_secs_f64());
}
