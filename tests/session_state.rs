//! Session state in transaction mode (README, "Session state in transaction mode"): what one
//! client leaves on a pooled server never reaches the next client, a client's own `SET`s and
//! startup options follow it to whichever server it lands on, protocol-level prepared
//! statements behave for every client as on its own PostgreSQL session, statement mode refuses
//! transaction blocks, and `pgbench -M prepared` runs without a failed transaction.
//!
//! With `default_pool_size = 1` two clients are guaranteed to share one server. With 2, a test
//! steers a client onto the other server by holding the first one in another client's open
//! transaction (`steer_away_from`), and checks where it landed with `pg_backend_pid()`.

#[path = "drivers/raw_client.rs"]
mod raw_client;
#[path = "drivers/support.rs"]
mod support;

use std::str::FromStr;
use std::sync::Arc;

use raw_client::{RawClient, Reply};
use support::common::{self, describe_error};
use support::{backend_pid, exec, scalar, Stack, APP_PASSWORD};
use tokio_postgres::{Client, SimpleQueryMessage};

/// Starts a cluster and Weir off the async runtime (both block while they start).
async fn start_stack(pool_size: usize, extra_general: &'static str) -> Arc<Stack> {
    tokio::task::spawn_blocking(move || Arc::new(Stack::start_with(pool_size, extra_general)))
        .await
        .expect("start cluster and Weir")
}

/// Runs blocking harness code (psql, pgbench, logs) off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// The server's own default of a setting, read straight from PostgreSQL (not through Weir).
async fn server_default(stack: &Arc<Stack>, setting: &'static str) -> String {
    let stack = Arc::clone(stack);
    blocking(move || stack.cluster.psql("app", &format!("SHOW {setting}"))).await
}

/// What a client sees of its session, all read in one statement (so on one server).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    pid: i32,
    search_path: String,
    statement_timeout: String,
    timezone: String,
    application_name: String,
}

async fn seen(client: &Client) -> Seen {
    let sql = "SELECT pg_backend_pid(), current_setting('search_path'), \
               current_setting('statement_timeout'), current_setting('TimeZone'), \
               current_setting('application_name')";
    let messages = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", describe_error(&e)));
    let row = messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .expect("one row");
    let col = |i: usize| row.get(i).unwrap_or("").to_string();
    Seen {
        pid: col(0).parse().expect("pid"),
        search_path: col(1),
        statement_timeout: col(2),
        timezone: col(3),
        application_name: col(4),
    }
}

/// A session with none of the settings the tests change.
struct Defaults {
    timezone: String,
}

impl Defaults {
    async fn read(stack: &Arc<Stack>) -> Defaults {
        Defaults {
            timezone: server_default(stack, "TimeZone").await,
        }
    }

    fn assert_seen_by(&self, seen: &Seen, who: &str) {
        assert_eq!(seen.search_path, "\"$user\", public", "{who}: search_path");
        assert_eq!(seen.statement_timeout, "0", "{who}: statement_timeout");
        assert_eq!(seen.timezone, self.timezone, "{who}: TimeZone");
    }
}

/// The settings client A makes in these tests.
const A_SETS: &str = "SET search_path TO a_schema, public; \
                      SET statement_timeout = '4321ms'; \
                      SET TIME ZONE 'Asia/Tokyo'";

fn assert_a_settings(seen: &Seen, when: &str) {
    assert_eq!(
        seen.search_path, "a_schema, public",
        "A {when}: search_path"
    );
    assert_eq!(
        seen.statement_timeout, "4321ms",
        "A {when}: statement_timeout"
    );
    assert_eq!(seen.timezone, "Asia/Tokyo", "A {when}: TimeZone");
}

/// Clients sitting in open transactions so that, with a pool of 2, the next transaction of
/// any other client lands on the server that is not `avoid`. Commit them with `release`.
struct Holders {
    /// Usually one client, sitting on `avoid`.
    clients: Vec<Client>,
}

async fn steer_away_from(stack: &Stack, avoid: i32) -> Holders {
    let first = common::connect(&stack.url()).await;
    exec(&first, "BEGIN").await;
    let first_pid = backend_pid(&first).await;
    if first_pid == avoid {
        return Holders {
            clients: vec![first],
        };
    }
    // `first` holds the other server, so `second` gets `avoid`; then `first` lets go.
    let second = common::connect(&stack.url()).await;
    exec(&second, "BEGIN").await;
    let second_pid = backend_pid(&second).await;
    assert_eq!(
        second_pid, avoid,
        "with a pool of 2 and one server held, the next client must get the other"
    );
    exec(&first, "COMMIT").await;
    Holders {
        clients: vec![second],
    }
}

impl Holders {
    async fn release(self) {
        for client in &self.clients {
            exec(client, "COMMIT").await;
        }
    }
}

/// Dirty server state visible to the session that runs this, as
/// (advisory locks, listened channels, temp relations, SQL prepared statements, cursors).
async fn dirty_state(client: &Client) -> Vec<String> {
    let sql = "SELECT (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'), \
               (SELECT count(*) FROM pg_listening_channels()), \
               (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()), \
               (SELECT count(*) FROM pg_prepared_statements WHERE name NOT LIKE 'weir\\_%'), \
               (SELECT count(*) FROM pg_cursors)";
    let messages = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", describe_error(&e)));
    messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                (0..5)
                    .map(|i| row.get(i).unwrap_or("").to_string())
                    .collect(),
            ),
            _ => None,
        })
        .expect("one row")
}

const NO_DIRTY_STATE: [&str; 5] = ["0", "0", "0", "0", "0"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_left_by_one_client_is_gone_for_the_next() {
    let stack = start_stack(1, "").await;
    let defaults = Defaults::read(&stack).await;
    let a = common::connect(&stack.url()).await;
    let b = common::connect(&stack.url()).await;
    exec(
        &a,
        "CREATE SCHEMA a_schema; CREATE TABLE a_schema.only_a (x int)",
    )
    .await;

    for sql in [
        "SET search_path TO a_schema, public",
        "SET statement_timeout = '4321ms'",
        "SET TIME ZONE 'Asia/Tokyo'",
        "SELECT pg_advisory_lock(4242)",
        "LISTEN a_channel",
        "CREATE TEMP TABLE a_temp (x int)",
        "PREPARE a_stmt AS SELECT 1",
        "BEGIN; DECLARE a_cur CURSOR WITH HOLD FOR SELECT 1; COMMIT",
    ] {
        exec(&a, sql).await;
    }
    let a_pid = backend_pid(&a).await;

    let b_seen = seen(&b).await;
    assert_eq!(b_seen.pid, a_pid, "a pool of 1: B must run on A's server");
    defaults.assert_seen_by(&b_seen, "B after A");
    assert_eq!(
        dirty_state(&b).await,
        NO_DIRTY_STATE,
        "B sees A's (advisory locks, LISTENs, temp tables, SQL prepared statements, cursors)"
    );
    assert_eq!(
        scalar(&b, "SELECT to_regclass('only_a') IS NULL").await,
        "t",
        "B resolves A's search_path"
    );

    let a_seen = seen(&a).await;
    assert_a_settings(&a_seen, "in its next transaction");
    assert_eq!(scalar(&a, "SELECT count(*) FROM only_a").await, "0");

    // Re-applying A's settings must not have left them behind for B either.
    let b_seen = seen(&b).await;
    assert_eq!(b_seen.pid, a_pid);
    defaults.assert_seen_by(&b_seen, "B after A's settings were re-applied");
    assert_eq!(dirty_state(&b).await, NO_DIRTY_STATE);

    // The same state made inside one transaction, where the probe must see all of it.
    exec(&a, "BEGIN").await;
    for sql in [
        "SELECT pg_advisory_lock(4243)",
        "LISTEN another_channel",
        "CREATE TEMP TABLE a_temp2 (x int)",
        "PREPARE a_stmt2 AS SELECT 2",
        "DECLARE a_cur2 CURSOR WITH HOLD FOR SELECT 2",
    ] {
        exec(&a, sql).await;
    }
    // LISTEN takes effect only at COMMIT, so the probe sees everything but it.
    assert_eq!(
        dirty_state(&a).await,
        ["1", "0", "1", "1", "1"],
        "the probe itself"
    );
    exec(&a, "COMMIT").await;
    assert_eq!(
        dirty_state(&b).await,
        NO_DIRTY_STATE,
        "B after A's transaction"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_settings_follow_their_client_to_another_server() {
    let stack = start_stack(2, "").await;
    let defaults = Defaults::read(&stack).await;
    let a = common::connect(&stack.url()).await;
    exec(&a, "CREATE SCHEMA a_schema").await;
    exec(&a, A_SETS).await;
    let first = seen(&a).await;
    assert_a_settings(&first, "where it set them");

    let holders = steer_away_from(&stack, first.pid).await;
    let other = seen(&a).await;
    assert_ne!(other.pid, first.pid, "A must land on the other server");
    assert_a_settings(&other, "on the other server");
    // The holder runs on the server A set things on, after A's transactions ended there.
    defaults.assert_seen_by(&seen(&holders.clients[0]).await, "a client after A");
    holders.release().await;

    let holders = steer_away_from(&stack, other.pid).await;
    let back = seen(&a).await;
    assert_eq!(back.pid, first.pid, "A must be back on its first server");
    assert_a_settings(&back, "back on its first server");
    defaults.assert_seen_by(&seen(&holders.clients[0]).await, "a client after A");
    holders.release().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_local_and_rolled_back_set_end_with_their_transaction() {
    let stack = start_stack(2, "").await;
    let a = common::connect(&stack.url()).await;
    exec(&a, "SET statement_timeout = '4321ms'").await;

    let in_tx = a
        .simple_query(
            "BEGIN; SET LOCAL statement_timeout = '777ms'; \
             SELECT current_setting('statement_timeout'), pg_backend_pid(); COMMIT",
        )
        .await
        .unwrap_or_else(|e| panic!("SET LOCAL: {}", describe_error(&e)));
    let row = in_tx
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .expect("a row");
    assert_eq!(
        row.get(0),
        Some("777ms"),
        "SET LOCAL inside its transaction"
    );
    let pid: i32 = row.get(1).unwrap().parse().unwrap();

    let after = seen(&a).await;
    assert_eq!(
        after.statement_timeout, "4321ms",
        "after COMMIT, same or other server"
    );

    // A SET inside a transaction that rolls back is undone by PostgreSQL; Weir must not
    // carry it to another server either.
    exec(
        &a,
        "BEGIN; SET statement_timeout = '555ms'; SET search_path TO pg_catalog; ROLLBACK",
    )
    .await;
    for avoid in [pid, after.pid] {
        let holders = steer_away_from(&stack, avoid).await;
        let seen_a = seen(&a).await;
        assert_ne!(seen_a.pid, avoid);
        assert_eq!(
            seen_a.statement_timeout, "4321ms",
            "SET LOCAL or a rolled-back SET leaked into a later transaction (server {})",
            seen_a.pid
        );
        assert_eq!(seen_a.search_path, "\"$user\", public");
        holders.release().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_all_restores_defaults_on_every_server() {
    let stack = start_stack(2, "").await;
    let defaults = Defaults::read(&stack).await;
    let a = common::connect(&stack.url()).await;
    exec(&a, "CREATE SCHEMA a_schema").await;
    exec(&a, A_SETS).await;
    let set_on = seen(&a).await;
    assert_a_settings(&set_on, "after SET");

    // RESET ALL on one server; then A visits both servers.
    let holders = steer_away_from(&stack, set_on.pid).await;
    exec(&a, "RESET ALL").await;
    let reset_on = seen(&a).await;
    defaults.assert_seen_by(&reset_on, "A right after RESET ALL");
    holders.release().await;

    for avoid in [reset_on.pid, set_on.pid] {
        let holders = steer_away_from(&stack, avoid).await;
        let later = seen(&a).await;
        assert_ne!(later.pid, avoid);
        defaults.assert_seen_by(&later, "A after RESET ALL, on either server");
        holders.release().await;
    }

    // A single RESET of one parameter is remembered too.
    exec(&a, A_SETS).await;
    exec(&a, "RESET statement_timeout").await;
    let now = seen(&a).await;
    let holders = steer_away_from(&stack, now.pid).await;
    let hopped = seen(&a).await;
    assert_eq!(
        hopped.statement_timeout, "0",
        "RESET statement_timeout on a hop"
    );
    assert_eq!(hopped.timezone, "Asia/Tokyo", "the other settings stay");
    holders.release().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_options_follow_their_client_and_never_leak() {
    let stack = start_stack(2, "").await;
    let defaults = Defaults::read(&stack).await;
    let mut config = tokio_postgres::Config::from_str(&stack.url()).expect("url");
    config
        .options("-c statement_timeout=1234")
        .application_name("client-a");
    let (a, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect with options: {}", describe_error(&e)));
    tokio::spawn(connection);
    let b = common::connect(&stack.url()).await;

    let mut pids = Vec::new();
    for _ in 0..2 {
        let a_seen = seen(&a).await;
        assert_eq!(a_seen.statement_timeout, "1234ms", "A's -c option");
        assert_eq!(a_seen.application_name, "client-a");
        // B on the server A just used, then B on the other one.
        let holders = steer_away_from(&stack, a_seen.pid).await;
        let b_elsewhere = seen(&b).await;
        defaults.assert_seen_by(&b_elsewhere, "B on the server A did not just use");
        assert_ne!(b_elsewhere.application_name, "client-a");
        holders.release().await;
        let holders = steer_away_from(&stack, b_elsewhere.pid).await;
        let b_after_a = seen(&b).await;
        assert_eq!(b_after_a.pid, a_seen.pid);
        defaults.assert_seen_by(&b_after_a, "B on A's server");
        assert_ne!(b_after_a.application_name, "client-a");
        holders.release().await;
        pids.push(a_seen.pid);
        // A's next round on the other server.
        let holders = steer_away_from(&stack, a_seen.pid).await;
        let a_hopped = seen(&a).await;
        assert_ne!(a_hopped.pid, a_seen.pid);
        assert_eq!(
            a_hopped.statement_timeout, "1234ms",
            "A's -c option after a hop"
        );
        assert_eq!(a_hopped.application_name, "client-a");
        holders.release().await;
    }
}

/// The SQLSTATEs among raw replies.
fn codes(replies: &[Reply]) -> Vec<&str> {
    replies.iter().filter_map(Reply::error_code).collect()
}

fn data_rows(replies: &[Reply]) -> Vec<Vec<Option<String>>> {
    replies
        .iter()
        .filter_map(|r| match r {
            Reply::DataRow(values) => Some(values.clone()),
            _ => None,
        })
        .collect()
}

fn one_value(v: &str) -> Vec<Vec<Option<String>>> {
    vec![vec![Some(v.to_string())]]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_shared_statement_does_not_break_other_clients() {
    let stack = start_stack(1, "").await;
    let a = common::connect(&stack.url()).await;
    let b = common::connect(&stack.url()).await;

    let a_add = a.prepare("SELECT $1::int + 1").await.expect("A prepare");
    let b_add = b.prepare("SELECT $1::int + 1").await.expect("B prepare");
    let b_mul = b.prepare("SELECT $1::int * 2").await.expect("B prepare");
    for i in 0..5i32 {
        let x: i32 = a.query_one(&a_add, &[&i]).await.expect("A add").get(0);
        assert_eq!(x, i + 1);
        let y: i32 = b.query_one(&b_add, &[&i]).await.expect("B add").get(0);
        assert_eq!(y, i + 1);
        let z: i32 = b.query_one(&b_mul, &[&i]).await.expect("B mul").get(0);
        assert_eq!(z, i * 2);
    }

    // Dropping the Statement makes tokio-postgres send Close for it.
    drop(a_add);
    assert_eq!(scalar(&a, "SELECT 'a still works'").await, "a still works");
    for i in 0..5i32 {
        let y: i32 = b
            .query_one(&b_add, &[&i])
            .await
            .unwrap_or_else(|e| panic!("B after A's Close: {}", describe_error(&e)))
            .get(0);
        assert_eq!(y, i + 1);
        let z: i32 = b.query_one(&b_mul, &[&i]).await.expect("B mul").get(0);
        assert_eq!(z, i * 2);
    }
    let again = a
        .prepare("SELECT $1::int + 1")
        .await
        .expect("A prepares again");
    let x: i32 = a
        .query_one(&again, &[&41i32])
        .await
        .expect("A again")
        .get(0);
    assert_eq!(x, 42);

    let log = blocking({
        let stack = Arc::clone(&stack);
        move || stack.cluster.log()
    })
    .await;
    assert!(
        !log.contains("does not exist"),
        "PostgreSQL reported a missing statement:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_statement_names_behave_as_on_postgres() {
    let stack = start_stack(1, "").await;
    let port = stack.weir.port;
    let mut r1 = RawClient::connect(port, "app", APP_PASSWORD, "app").await;
    let mut r2 = RawClient::connect(port, "app", APP_PASSWORD, "app").await;

    let replies = r1.parse("dup", "SELECT 1").sync().await;
    assert_eq!(replies[0], Reply::ParseComplete, "{replies:?}");
    for sql in ["SELECT 1", "SELECT 2"] {
        let replies = r1.parse("dup", sql).sync().await;
        assert_eq!(
            codes(&replies),
            ["42P05"],
            "Parse of an existing name: {replies:?}"
        );
    }
    let replies = r1.bind("dup", &[]).execute().sync().await;
    assert_eq!(data_rows(&replies), one_value("1"), "{replies:?}");

    // Names are per client: r2 may use "dup" for another query.
    let replies = r2.parse("dup", "SELECT 3").sync().await;
    assert_eq!(codes(&replies), Vec::<&str>::new(), "{replies:?}");
    let replies = r2.bind("dup", &[]).execute().sync().await;
    assert_eq!(data_rows(&replies), one_value("3"), "{replies:?}");

    let replies = r1.bind("nope", &[]).execute().sync().await;
    assert_eq!(
        codes(&replies),
        ["26000"],
        "Bind of an unknown name: {replies:?}"
    );
    let replies = r1.describe_statement("nope").sync().await;
    assert_eq!(
        codes(&replies),
        ["26000"],
        "Describe of an unknown name: {replies:?}"
    );

    // Close forgets the name for this client only; closing an unknown name is no error.
    let replies = r1
        .close_statement("dup")
        .close_statement("never")
        .sync()
        .await;
    assert_eq!(
        replies[..2],
        [Reply::CloseComplete, Reply::CloseComplete],
        "{replies:?}"
    );
    let replies = r1.bind("dup", &[]).execute().sync().await;
    assert_eq!(codes(&replies), ["26000"], "Bind after Close: {replies:?}");
    let replies = r1.parse("dup", "SELECT $1::int * 10").sync().await;
    assert_eq!(
        replies[0],
        Reply::ParseComplete,
        "Parse after Close: {replies:?}"
    );
    let replies = r1.bind("dup", &["4"]).execute().sync().await;
    assert_eq!(data_rows(&replies), one_value("40"), "{replies:?}");
    let replies = r2.bind("dup", &[]).execute().sync().await;
    assert_eq!(
        data_rows(&replies),
        one_value("3"),
        "r2 after r1's Close: {replies:?}"
    );

    // A Parse that fails creates nothing, and the rest of its batch is skipped: the name is
    // free for a new Parse, and a Bind of it finds no statement.
    for name in ["bad1", "bad2"] {
        let replies = r1
            .parse(name, "SELEC 1")
            .bind(name, &[])
            .execute()
            .sync()
            .await;
        assert_eq!(codes(&replies), ["42601"], "{replies:?}");
    }
    let replies = r1.parse("bad1", "SELECT 5").sync().await;
    assert_eq!(
        replies[0],
        Reply::ParseComplete,
        "Parse of a name whose Parse failed: {replies:?}"
    );
    let replies = r1.bind("bad1", &[]).execute().sync().await;
    assert_eq!(data_rows(&replies), one_value("5"), "{replies:?}");
    let replies = r1.bind("bad2", &[]).execute().sync().await;
    assert_eq!(
        codes(&replies),
        ["26000"],
        "Bind of a name whose Parse failed: {replies:?}"
    );
    // And the connection is still fine.
    let replies = r1.simple_query("SELECT 'ok'").await;
    assert_eq!(data_rows(&replies), one_value("ok"), "{replies:?}");
}

/// Runs `stmt` inside BEGIN/COMMIT and returns the server it ran on and its result.
async fn run_on_some_server(
    client: &Client,
    stmt: &tokio_postgres::Statement,
) -> (i32, Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>) {
    exec(client, "BEGIN").await;
    let pid = backend_pid(client).await;
    let result = client.query(stmt, &[]).await;
    exec(client, if result.is_ok() { "COMMIT" } else { "ROLLBACK" }).await;
    (pid, result)
}

const CACHED_PLAN: &str = "cached plan must not change result type";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_change_costs_at_most_one_error_and_a_re_prepare_works_on_every_server() {
    let stack = start_stack(2, "").await;
    let a = common::connect(&stack.url()).await;
    let b = common::connect(&stack.url()).await;
    exec(
        &a,
        "CREATE TABLE t (a int, b text); INSERT INTO t VALUES (1, 'one')",
    )
    .await;

    // A's statement runs on both servers, so both hold it with the old result type.
    let star = a.prepare("SELECT * FROM t").await.expect("prepare");
    let (first_pid, rows) = run_on_some_server(&a, &star).await;
    assert_eq!(rows.expect("first run").len(), 1);
    let holders = steer_away_from(&stack, first_pid).await;
    let (second_pid, rows) = run_on_some_server(&a, &star).await;
    assert_ne!(second_pid, first_pid);
    assert_eq!(rows.expect("second run").len(), 1);
    holders.release().await;

    exec(&b, "ALTER TABLE t ADD COLUMN c int").await;

    // The old statement may fail once, as on PostgreSQL; after that the client prepares the
    // same text again (what asyncpg and pgjdbc do), and that must work on both servers.
    let (failed_on, result) = run_on_some_server(&a, &star).await;
    if let Err(err) = &result {
        assert_eq!(
            err.code().map(|c| c.code()),
            Some("0A000"),
            "the only acceptable error: {}",
            describe_error(err)
        );
        assert!(describe_error(err).contains(CACHED_PLAN));
    }
    let mut servers = Vec::new();
    for avoid in [failed_on, second_pid, first_pid] {
        let holders = steer_away_from(&stack, avoid).await;
        let again = a.prepare("SELECT * FROM t").await.unwrap_or_else(|e| {
            panic!(
                "re-prepare after the schema change, away from server {avoid}: {}",
                describe_error(&e)
            )
        });
        assert_eq!(again.columns().len(), 3, "the new result type");
        let (pid, rows) = run_on_some_server(&a, &again).await;
        let rows =
            rows.unwrap_or_else(|e| panic!("re-prepared on server {pid}: {}", describe_error(&e)));
        assert_eq!(rows[0].len(), 3);
        servers.push(pid);
        holders.release().await;
    }
    let b_star = b.prepare("SELECT * FROM t").await.expect("B prepares");
    assert_eq!(b_star.columns().len(), 3);
    assert!(servers.contains(&first_pid) && servers.contains(&second_pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_always_have_the_shape_their_statement_was_described_with() {
    // PostgreSQL refuses to run a prepared statement whose result type changed ("cached plan
    // must not change result type") because its client was told the old shape. asyncpg, for
    // one, checks every DataRow against the Describe it got.
    let stack = start_stack(1, "").await;
    let port = stack.weir.port;
    let a = common::connect(&stack.url()).await;
    exec(
        &a,
        "CREATE TABLE t (a int, b text); INSERT INTO t VALUES (1, 'one')",
    )
    .await;
    let mut raw = RawClient::connect(port, "app", APP_PASSWORD, "app").await;
    let replies = raw
        .parse("star", "SELECT * FROM t")
        .describe_statement("star")
        .sync()
        .await;
    assert!(replies.contains(&Reply::RowDescription(2)), "{replies:?}");
    let star = a.prepare("SELECT * FROM t").await.expect("A prepares");
    a.query(&star, &[]).await.expect("A runs it");

    exec(&a, "ALTER TABLE t ADD COLUMN c int").await;
    // A meets the error and prepares the statement again, with the new shape.
    let _ = a.query(&star, &[]).await;
    let again = a.prepare("SELECT * FROM t").await.expect("A re-prepares");
    assert_eq!(again.columns().len(), 3);
    a.query(&again, &[]).await.expect("A runs the new one");

    for attempt in 1..=2 {
        let replies = raw.bind("star", &[]).execute().sync().await;
        for row in data_rows(&replies) {
            assert_eq!(
                row.len(),
                2,
                "attempt {attempt}: a DataRow of {} values for a statement described with 2 \
                 (PostgreSQL answers {CACHED_PLAN}): {replies:?}",
                row.len()
            );
        }
        if let Some(code) = codes(&replies).first() {
            assert_eq!(*code, "0A000", "{replies:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_mode_refuses_transaction_blocks() {
    let stack = start_stack(2, "pool_mode = \"statement\"").await;
    let client = common::connect(&stack.url()).await;
    assert_eq!(scalar(&client, "SELECT 1").await, "1");
    let row = client
        .query_one("SELECT $1::int + 1", &[&41i32])
        .await
        .unwrap_or_else(|e| panic!("extended protocol: {}", describe_error(&e)));
    assert_eq!(row.get::<_, i32>(0), 42);
    let stmt = client.prepare("SELECT $1::text").await.expect("prepare");
    for word in ["a", "b"] {
        let row = client.query_one(&stmt, &[&word]).await.expect("execute");
        assert_eq!(row.get::<_, String>(0), word);
    }

    // As in PgBouncer, a statement that leaves the server inside a transaction (here the
    // BEGIN of `BEGIN`, `SELECT 1`, `COMMIT` sent one by one, as psql sends a script) ends
    // the client with a FATAL error. The BEGIN's own reply may arrive first, so the error is
    // read from the connection. A whole transaction in one Query message ends idle, and
    // PgBouncer lets it through; that case is not tested here.
    let (tx_client, connection) = tokio_postgres::connect(&stack.url(), tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect: {}", describe_error(&e)));
    let connection = tokio::spawn(connection);
    let mut errors = Vec::new();
    for sql in ["BEGIN", "SELECT 1", "COMMIT"] {
        if let Err(e) = tx_client.batch_execute(sql).await {
            errors.push(describe_error(&e));
            break;
        }
    }
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), connection)
        .await
        .expect("Weir must close the connection")
        .expect("connection task");
    if let Err(e) = ended {
        errors.push(describe_error(&e));
    }
    assert!(
        errors
            .iter()
            .any(|e| e.contains("transaction blocks not allowed in statement pooling mode")),
        "got {errors:?}"
    );

    // Other clients are unaffected, and no server is left inside a transaction.
    let other = common::connect(&stack.url()).await;
    assert_eq!(scalar(&other, "SELECT 2").await, "2");
    let open = blocking({
        let stack = Arc::clone(&stack);
        move || {
            stack.cluster.psql(
                "postgres",
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE usename = 'app' AND state LIKE 'idle in transaction%'",
            )
        }
    })
    .await;
    assert_eq!(
        open, "0",
        "a server was left inside the refused transaction"
    );
}

#[test]
fn pgbench_prepared_select_only_through_weir_has_no_failed_transactions() {
    let stack = Stack::start(2);
    let cluster_port = stack.cluster.port.to_string();
    let init = common::pgbench_env(
        &[
            "-i",
            "-s",
            "1",
            "-q",
            "-h",
            "127.0.0.1",
            "-p",
            &cluster_port,
            "-U",
            "app",
            "app",
        ],
        &[("PGPASSWORD", APP_PASSWORD)],
    );
    assert!(
        init.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&init.stderr)
    );

    let weir_port = stack.weir.port.to_string();
    let run = common::pgbench_env(
        &[
            "-M",
            "prepared",
            "-S",
            "-c",
            "50",
            "-j",
            "2",
            "-T",
            "5",
            "-h",
            "127.0.0.1",
            "-p",
            &weir_port,
            "-U",
            "app",
            "app",
        ],
        &[("PGPASSWORD", APP_PASSWORD)],
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "pgbench through Weir failed with {}\n{stdout}\n{stderr}",
        run.status
    );
    assert!(
        stdout.contains("number of failed transactions: 0 "),
        "pgbench reported failed transactions:\n{stdout}\n{stderr}"
    );
    let processed: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|rest| rest.split('/').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no processed count in:\n{stdout}"));
    assert!(processed > 0, "pgbench processed nothing:\n{stdout}");
    assert!(
        !stderr.contains("does not exist"),
        "pgbench saw missing statements:\n{stderr}"
    );
    assert!(stack.server_connections() <= 2);
}
