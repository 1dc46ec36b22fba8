//! Helpers shared by the `core_*` integration tests, on top of the harness in tests/common.
//!
//! Each `core_*` file includes this one with `#[path = "core_support.rs"] mod support;` and
//! reaches the harness as `support::common`, so the harness is compiled once per test binary.
//! Built on its own (cargo builds every tests/*.rs), it is an empty test binary.
#![allow(dead_code)]

#[path = "common/mod.rs"]
pub mod common;

use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{PgCluster, PgOptions, Weir};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

/// The password of role `app`, in PostgreSQL and in Weir's `[users.app]`.
pub const APP_PASSWORD: &str = "app-secret";

/// A cluster with `PgOptions::default()` whose login role `app` owns database `app`.
pub fn app_cluster() -> PgCluster {
    let cluster = PgCluster::start_with(PgOptions::default());
    cluster.create_user("app", APP_PASSWORD, "scram-sha-256");
    cluster.create_database("app", "app");
    cluster
}

/// weir.toml for database `app` on `pg_port`, user `app` with a plain password, and `general`
/// (newline-separated `key = value` lines) in the `[weir]` section.
pub fn app_config(pg_port: u16, general: &str) -> String {
    format!(
        "[weir]\n{general}\n\n\
         [users.app]\npassword = \"{APP_PASSWORD}\"\n\n\
         [databases.app]\nhost = \"127.0.0.1\"\nport = {pg_port}\n"
    )
}

/// `app_cluster()` and a Weir in front of it configured by `app_config(port, general)`.
pub fn app_cluster_and_weir(general: &str) -> (PgCluster, Weir) {
    let cluster = app_cluster();
    let weir = Weir::start(&app_config(cluster.port, general));
    (cluster, weir)
}

/// A tokio-postgres connection string for `app` to database `app` through `weir`.
pub fn app_url(weir: &Weir) -> String {
    weir.url("app", APP_PASSWORD, "app")
}

/// Runs `sql` with the simple protocol and returns the first column of the first row.
pub async fn scalar(client: &Client, sql: &str) -> String {
    let messages = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", common::describe_error(&e)));
    first_value(&messages).unwrap_or_else(|| panic!("{sql}: returned no row"))
}

/// The first column of the first row among simple-query messages (NULL as "").
pub fn first_value(messages: &[SimpleQueryMessage]) -> Option<String> {
    messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => Some(row.get(0).unwrap_or("").to_string()),
        _ => None,
    })
}

/// Unwraps the error of a request that must fail with SQLSTATE `code`.
pub fn expect_sqlstate<T>(
    result: Result<T, tokio_postgres::Error>,
    code: &str,
    what: &str,
) -> tokio_postgres::Error {
    let Err(err) = result else {
        panic!("{what}: succeeded, expected SQLSTATE {code}");
    };
    assert_eq!(
        err.code().map(|c| c.code()),
        Some(code),
        "{what}: expected SQLSTATE {code}, got {}",
        common::describe_error(&err)
    );
    err
}

/// The message of a server error (empty when the error did not come from the server).
pub fn db_message(err: &tokio_postgres::Error) -> String {
    err.as_db_error()
        .map(|db| db.message().to_string())
        .unwrap_or_default()
}

/// How a tokio-postgres connection ended: its error, if it ended with one.
pub type ConnectionTask = tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>;

/// Connects and returns the connection task too, to see how the connection ends or to end it
/// abruptly with `kill_client`.
pub async fn connect_with_task(url: &str) -> (Client, ConnectionTask) {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {}", common::describe_error(&e)));
    (client, tokio::spawn(connection))
}

/// Closes a client's socket without a Terminate message, as a killed client process would,
/// and waits until it is closed.
pub async fn kill_client(task: ConnectionTask) {
    task.abort();
    let _ = task.await;
}

/// Client backends connected to database `db` (psql's own session is in `postgres`).
pub fn backends(cluster: &PgCluster, db: &str) -> usize {
    count_activity(cluster, db, "true")
}

/// Client backends of `db` whose pg_stat_activity row matches the SQL condition `filter`.
pub fn count_activity(cluster: &PgCluster, db: &str, filter: &str) -> usize {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE backend_type = 'client backend' AND datname = {} AND ({filter})",
        common::quote_literal(db)
    );
    let out = cluster.psql("postgres", &sql);
    out.parse()
        .unwrap_or_else(|_| panic!("count from {sql:?}: {out:?}"))
}

/// Runs the psql CLI against Weir (no psqlrc, unaligned tuples-only output).
pub fn psql_via_weir(
    weir: &Weir,
    user: &str,
    password: Option<&str>,
    db: &str,
    args: &[&str],
) -> Output {
    let mut cmd = Command::new(common::pg_bin("psql"));
    cmd.args([
        "-X",
        "-A",
        "-t",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        "127.0.0.1",
    ])
    .args(["-p", &weir.port.to_string(), "-U", user, "-d", db])
    .args(args)
    .env("PGCONNECT_TIMEOUT", "10")
    .env_remove("PGPASSWORD")
    .stdin(Stdio::null());
    if let Some(password) = password {
        cmd.env("PGPASSWORD", password);
    }
    cmd.output().expect("run psql")
}

/// Panics with psql's output unless it succeeded; returns its trimmed stdout.
pub fn psql_ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: psql failed with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Samples `backends(cluster, db)` from a thread until `finish`, to check that a pool never
/// opens more server connections than it may.
pub struct BackendSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Instant, usize)>>,
}

/// Time between two samples (each sample is a psql run of its own).
const SAMPLE_INTERVAL: Duration = Duration::from_millis(25);

impl BackendSampler {
    pub fn start(cluster: Arc<PgCluster>, db: &str) -> BackendSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let db = db.to_string();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !flag.load(Ordering::Acquire) {
                // Stamped when the count is known: a count that took long under load
                // must not be dated back to when it was asked for.
                let n = backends(&cluster, &db);
                samples.push((Instant::now(), n));
                std::thread::sleep(SAMPLE_INTERVAL);
            }
            samples
        });
        BackendSampler { stop, thread }
    }

    /// Stops sampling and returns every (time, count) sample taken.
    pub fn finish(self) -> Vec<(Instant, usize)> {
        self.stop.store(true, Ordering::Release);
        self.thread.join().expect("backend sampler thread panicked")
    }
}

/// The largest count among samples.
pub fn peak(samples: &[(Instant, usize)]) -> usize {
    samples.iter().map(|&(_, n)| n).max().unwrap_or(0)
}
