//! Real client drivers through Weir in transaction mode with only 2 server connections:
//! asyncpg, psycopg 3, pgjdbc, node-postgres, tokio-postgres, sqlx, Ruby pg and Perl DBD::Pg,
//! each with many concurrent connections hammering protocol-level prepared statements, so
//! every statement is prepared under the driver's own name, mapped by Weir and re-prepared on
//! whichever server the next transaction lands on. Most also add a column while the load runs.
//! SQLAlchemy over psycopg2 (client-side binding, simple queries) covers an ORM with its own
//! connection pool, executemany, and commits and rollbacks that move clients between servers.
//!
//! The Python, Node, Java, Ruby and Perl programs live in tests/drivers/; `bash scripts/test.sh`
//! (and `--deps-only`) installs their libraries. A test is skipped, saying so, only when the
//! language runtime itself (python3, node, javac/java, ruby, perl) is missing; a runtime
//! without its driver library is a broken setup and fails.

#[path = "drivers/support.rs"]
mod support;

#[path = "drivers/sqlx_pool.rs"]
mod sqlx_pool;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use support::common::{self, describe_error};
use support::{drivers_dir, on_path, run_program, Stack};

/// Server connections Weir may open for `app`: clients hop between them.
const POOL_SIZE: usize = 2;
/// How long one driver program may run (it normally takes a few seconds).
const DRIVER_TIMEOUT: Duration = Duration::from_secs(120);
/// What to run when a driver library is missing.
const INSTALL_HINT: &str = "run `bash scripts/test.sh --deps-only` to install the driver libraries";

/// Prints why a test does not run; the test then returns without failing.
/// Under CI (`CI` set) the test command has installed every runtime, so a missing one fails.
fn skip(test: &str, why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {why} (CI is set: the test command should have installed it)");
    }
    eprintln!("SKIPPED {test}: {why}");
}

/// Runs a driver program with the connection environment and returns its stdout, after
/// checking that it printed `expect_prefix` and that Weir kept to its pool size.
fn run_driver(stack: &Stack, mut cmd: Command, what: &str, expect_prefix: &str) -> String {
    cmd.envs(stack.driver_env()).current_dir(drivers_dir());
    let out = run_program(cmd, what, DRIVER_TIMEOUT);
    assert!(
        out.stdout.lines().any(|l| l.starts_with(expect_prefix)),
        "{what}: no `{expect_prefix}` line\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.stdout,
        out.stderr
    );
    let servers = stack.server_connections();
    assert!(
        servers <= POOL_SIZE,
        "{what}: PostgreSQL saw {servers} connections of `app`, more than the pool's {POOL_SIZE}"
    );
    assert_no_missing_statement(stack, what);
    out.stdout
}

/// The one error Weir promises clients never see in transaction mode.
fn assert_no_missing_statement(stack: &Stack, what: &str) {
    let log = stack.cluster.log();
    let missing: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("prepared statement") && l.contains("does not exist"))
        .collect();
    assert!(
        missing.is_empty(),
        "{what}: PostgreSQL reported missing prepared statements:\n{}",
        missing.join("\n")
    );
}

/// True when `python3 -c "import <module>"` works; panics if python3 runs but lacks it.
fn python_has(module: &str) -> bool {
    runtime_has("python3", &["-c", &format!("import {module}")], module)
}

/// True when `runtime` is on PATH and `runtime <load_args>` (which loads `library`) succeeds;
/// panics if the runtime runs but cannot load the library.
fn runtime_has(runtime: &str, load_args: &[&str], library: &str) -> bool {
    if !on_path(runtime) {
        return false;
    }
    let out = Command::new(runtime)
        .args(load_args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {runtime}: {e}"));
    assert!(
        out.status.success(),
        "{runtime} cannot load {library}: {INSTALL_HINT}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

/// Checks the `key=value` totals a driver printed on its `prefix` line against what
/// PostgreSQL itself (not through Weir) holds: `sql` returns one row with one column per key.
fn assert_server_holds(
    stack: &Stack,
    what: &str,
    stdout: &str,
    prefix: &str,
    keys: &[&str],
    sql: &str,
) {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("{what}: no `{prefix}` line in\n{stdout}"));
    let printed: Vec<&str> = keys
        .iter()
        .map(|key| {
            line.split_whitespace()
                .find_map(|field| field.strip_prefix(key)?.strip_prefix('='))
                .unwrap_or_else(|| panic!("{what}: no `{key}=` in `{line}`"))
        })
        .collect();
    let held = stack.cluster.psql("app", sql);
    assert_eq!(
        held,
        printed.join("|"),
        "{what}: PostgreSQL holds {keys:?} = {held}, the driver saw `{line}`"
    );
}

#[test]
fn asyncpg_pool_with_statement_cache_and_explicit_prepare() {
    if !python_has("asyncpg") {
        return skip("asyncpg", "python3 is not installed");
    }
    let stack = Stack::start(POOL_SIZE);
    let mut cmd = Command::new("python3");
    cmd.arg("asyncpg_load.py");
    let out = run_driver(&stack, cmd, "asyncpg_load.py", "asyncpg ok:");
    eprintln!("{out}");
}

#[test]
fn psycopg_prepare_threshold_zero_from_many_threads() {
    if !python_has("psycopg") {
        return skip("psycopg", "python3 is not installed");
    }
    let stack = Stack::start(POOL_SIZE);
    let mut cmd = Command::new("python3");
    cmd.arg("psycopg_load.py");
    let out = run_driver(&stack, cmd, "psycopg_load.py", "psycopg ok:");
    eprintln!("{out}");
}

/// SQLAlchemy's QueuePool, ORM sessions (commit and rollback), Core and psycopg2 executemany,
/// and multi-statement transactions from 8 threads; the totals must be what PostgreSQL holds.
#[test]
fn psycopg2_sqlalchemy_orm_and_executemany_from_a_queue_pool() {
    if !python_has("psycopg2, sqlalchemy") {
        return skip("psycopg2 with SQLAlchemy", "python3 is not installed");
    }
    let stack = Stack::start(POOL_SIZE);
    let mut cmd = Command::new("python3");
    cmd.arg("sqlalchemy_load.py");
    let out = run_driver(&stack, cmd, "sqlalchemy_load.py", "sqlalchemy ok:");
    assert_server_holds(
        &stack,
        "sqlalchemy_load.py",
        &out,
        "sqlalchemy ok:",
        &["accounts", "balance", "events", "amount"],
        "SELECT (SELECT count(*) FROM sa_accounts), (SELECT sum(balance) FROM sa_accounts),
                (SELECT count(*) FROM sa_events), (SELECT sum(amount) FROM sa_events)",
    );
    eprintln!("{out}");
}

/// Ruby pg: `prepare` once per connection, `exec_prepared` in and out of `transaction` blocks
/// (some rolled back), and `exec_params`, from 8 threads.
#[test]
fn ruby_pg_exec_prepared_across_transactions_from_many_threads() {
    if !runtime_has("ruby", &["-e", "require 'pg'"], "pg (ruby-pg)") {
        return skip("ruby-pg", "ruby is not installed");
    }
    let stack = Stack::start(POOL_SIZE);
    let mut cmd = Command::new("ruby");
    cmd.arg("ruby_pg_load.rb");
    let out = run_driver(&stack, cmd, "ruby_pg_load.rb", "ruby-pg ok:");
    assert_server_holds(
        &stack,
        "ruby_pg_load.rb",
        &out,
        "ruby-pg ok:",
        &["ledger_rows", "ledger_sum"],
        "SELECT count(*), sum(amount) FROM rb_ledger",
    );
    eprintln!("{out}");
}

/// DBD::Pg with `pg_server_prepare`: statements parsed once per connection and executed in
/// `AutoCommit => 0` transactions, committed or rolled back, from 4 processes that reconnect.
#[test]
fn dbd_pg_server_prepared_statements_with_commit_and_rollback() {
    if !runtime_has("perl", &["-MDBD::Pg", "-e", "1"], "DBD::Pg") {
        return skip("DBD::Pg", "perl is not installed");
    }
    let stack = Stack::start(POOL_SIZE);
    let mut cmd = Command::new("perl");
    cmd.arg("dbd_pg_load.pl");
    let out = run_driver(&stack, cmd, "dbd_pg_load.pl", "dbd-pg ok:");
    assert_server_holds(
        &stack,
        "dbd_pg_load.pl",
        &out,
        "dbd-pg ok:",
        &["ledger_rows", "ledger_sum"],
        "SELECT count(*), sum(amount) FROM pl_ledger",
    );
    eprintln!("{out}");
}

/// Where Debian's libpostgresql-jdbc-java puts the pgjdbc jar.
const PGJDBC_JAR: &str = "/usr/share/java/postgresql.jar";

#[test]
fn pgjdbc_prepare_threshold_one_from_many_threads() {
    if !(on_path("javac") && on_path("java")) {
        return skip("pgjdbc", "no JDK (javac and java) is installed");
    }
    assert!(
        Path::new(PGJDBC_JAR).is_file(),
        "{PGJDBC_JAR} is missing: {INSTALL_HINT}"
    );
    let classes = tempfile::tempdir().expect("temp dir for compiled classes");
    let mut javac = Command::new("javac");
    javac
        .args(["-cp", PGJDBC_JAR, "-d"])
        .arg(classes.path())
        .arg(drivers_dir().join("JdbcLoad.java"));
    run_program(javac, "javac JdbcLoad.java", DRIVER_TIMEOUT);

    let stack = Stack::start(POOL_SIZE);
    let classpath = format!("{}:{PGJDBC_JAR}", classes.path().display());
    let mut java = Command::new("java");
    java.args(["-cp", &classpath, "JdbcLoad"]);
    let out = run_driver(&stack, java, "java JdbcLoad", "pgjdbc ok:");
    eprintln!("{out}");
}

#[test]
fn node_postgres_named_queries_from_a_pool_of_ten() {
    if !on_path("node") {
        return skip("node-postgres", "node is not installed");
    }
    assert!(
        drivers_dir().join("node_modules/pg").is_dir(),
        "tests/drivers/node_modules/pg is missing: {INSTALL_HINT}"
    );
    let stack = Stack::start(POOL_SIZE);
    let mut cmd = Command::new("node");
    cmd.arg("pg_named.js");
    let out = run_driver(&stack, cmd, "pg_named.js", "node-postgres ok:");
    eprintln!("{out}");
}

/// Clients of the tokio-postgres test, and rounds each runs.
const TOKIO_CLIENTS: usize = 12;
const TOKIO_ROUNDS: i32 = 60;

/// One tokio-postgres client: statements prepared once, then executed in every round, in
/// autocommit and inside transactions, while the other clients share the same two servers.
async fn tokio_postgres_worker(url: String, idx: i32) -> usize {
    let mut client = common::connect(&url).await;
    let by_id = client
        .prepare("SELECT name FROM items WHERE id = $1")
        .await
        .expect("prepare by_id");
    let in_grp = client
        .prepare("SELECT count(*) FROM items WHERE grp = $1")
        .await
        .expect("prepare in_grp");
    let add = client
        .prepare("SELECT $1::int + $2::int")
        .await
        .expect("prepare add");
    let mut done = 0;
    for rnd in 0..TOKIO_ROUNDS {
        let i = (idx * 17 + rnd) % 200;
        if rnd % 3 == 0 {
            let tx = client.transaction().await.expect("BEGIN");
            check_round(&tx, &by_id, &in_grp, &add, i, idx + rnd).await;
            tx.commit().await.expect("COMMIT");
        } else {
            check_round(&client, &by_id, &in_grp, &add, i, idx + rnd).await;
        }
        done += 3;
    }
    done
}

async fn check_round(
    db: &impl tokio_postgres::GenericClient,
    by_id: &tokio_postgres::Statement,
    in_grp: &tokio_postgres::Statement,
    add: &tokio_postgres::Statement,
    i: i32,
    n: i32,
) {
    let name: String = db
        .query_one(by_id, &[&i])
        .await
        .unwrap_or_else(|e| panic!("by_id {i}: {}", describe_error(&e)))
        .get(0);
    assert_eq!(name, format!("item-{i}"));
    let count: i64 = db
        .query_one(in_grp, &[&(i % 10)])
        .await
        .unwrap_or_else(|e| panic!("in_grp {i}: {}", describe_error(&e)))
        .get(0);
    assert_eq!(count, 20);
    let sum: i32 = db
        .query_one(add, &[&n, &1i32])
        .await
        .unwrap_or_else(|e| panic!("add {n}: {}", describe_error(&e)))
        .get(0);
    assert_eq!(sum, n + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_prepared_once_executed_across_transactions() {
    let stack = Arc::new(
        tokio::task::spawn_blocking(|| Stack::start(POOL_SIZE))
            .await
            .unwrap(),
    );
    let url = stack.url();
    let setup = common::connect(&url).await;
    support::exec(
        &setup,
        "CREATE TABLE items (id int PRIMARY KEY, grp int NOT NULL, name text NOT NULL);
         INSERT INTO items SELECT g, g % 10, 'item-' || g FROM generate_series(0, 199) g;",
    )
    .await;

    let workers: Vec<_> = (0..TOKIO_CLIENTS as i32)
        .map(|idx| tokio::spawn(tokio_postgres_worker(url.clone(), idx)))
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Adding a column does not change the result types of these statements, so PostgreSQL
    // re-plans them silently on every server that holds them.
    support::exec(
        &setup,
        "ALTER TABLE items ADD COLUMN extra int NOT NULL DEFAULT 7",
    )
    .await;
    let mut queries = 0;
    for worker in workers {
        queries += worker.await.expect("tokio-postgres worker panicked");
    }
    assert_eq!(queries, TOKIO_CLIENTS * TOKIO_ROUNDS as usize * 3);

    let stack2 = Arc::clone(&stack);
    tokio::task::spawn_blocking(move || {
        assert!(stack2.server_connections() <= POOL_SIZE);
        assert_no_missing_statement(&stack2, "tokio-postgres");
    })
    .await
    .unwrap();
}
