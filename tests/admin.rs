//! The admin console end to end: psql against the virtual `pgbouncer`
//! database sees PgBouncer 1.24's SHOW columns, and the control commands
//! change what clients experience (PAUSE, RESUME, KILL, RELOAD, SET,
//! SHUTDOWN), with `stats_users` limited to SHOW.

mod common;

use common::{PgCluster, PgOptions, Weir};
use std::future::Future;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use tokio_postgres::{Client, SimpleQueryMessage, SimpleQueryRow};

const APP_PASSWORD: &str = "app-secret";
const ADMIN_PASSWORD: &str = "admin-secret";
const STATS_PASSWORD: &str = "stats-secret";

/// How long a condition polled through the console may take to hold.
const SETTLE: Duration = Duration::from_secs(15);

fn app_cluster() -> PgCluster {
    let cluster = PgCluster::start_with(PgOptions::default());
    cluster.create_user("app", APP_PASSWORD, "scram-sha-256");
    cluster.create_database("app", "app");
    cluster
}

/// weir.toml with database `app` (pool `pool_size`), a sharded `shop` whose
/// shards all point at the same server (only SHOW SHARDS looks at it), an
/// admin user and a stats user.
fn config(pg_port: u16, pool_size: usize) -> String {
    format!(
        "[weir]\nadmin_users = [\"admin\"]\nstats_users = [\"stats\"]\nreserve_pool_size = 0\n\n\
         [users.app]\npassword = \"{APP_PASSWORD}\"\n\
         [users.admin]\npassword = \"{ADMIN_PASSWORD}\"\n\
         [users.stats]\npassword = \"{STATS_PASSWORD}\"\n\n\
         [databases.app]\nhost = \"127.0.0.1\"\nport = {pg_port}\npool_size = {pool_size}\n\n\
         [databases.shop]\ndbname = \"app\"\n\
         shards = [ {{ primary = \"127.0.0.1:{pg_port}\" }}, \
                    {{ primary = \"127.0.0.1:{pg_port}\", replicas = [\"127.0.0.1:{pg_port}\"] }} ]\n\
         sharded_tables = [ {{ table = \"orders\", column = \"id\", type = \"bigint\" }} ]\n"
    )
}

fn start(pool_size: usize) -> (PgCluster, Weir) {
    let cluster = app_cluster();
    let weir = Weir::start(&config(cluster.port, pool_size));
    (cluster, weir)
}

/// psql against the console in CSV mode (a header line, then rows).
fn psql_console(weir: &Weir, user: &str, password: &str, sql: &str) -> Output {
    Command::new(common::pg_bin("psql"))
        .args(["-X", "--csv", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
        .args(["-p", &weir.port.to_string(), "-U", user, "-d", "pgbouncer"])
        .args(["-c", sql])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null())
        .output()
        .expect("run psql")
}

fn stdout_ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: psql failed with {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// PgBouncer's columns at its current release (1.24's, plus 1.25's client_login_count), in
/// order (usage.md and admin.c / stats.c).
const SOCKET_COLUMNS: &str = "type,user,database,replication,state,addr,port,local_addr,\
local_port,connect_time,request_time,wait,wait_us,close_needed,ptr,link,remote_pid,tls,\
application_name,prepared_statements,id";

const EXPECTED_HEADERS: &[(&str, &str)] = &[
    (
        "SHOW POOLS",
        "database,user,cl_active,cl_waiting,cl_active_cancel_req,cl_waiting_cancel_req,\
         sv_active,sv_active_cancel,sv_being_canceled,sv_idle,sv_used,sv_tested,sv_login,\
         maxwait,maxwait_us,pool_mode,load_balance_hosts",
    ),
    (
        "SHOW STATS",
        "database,total_server_assignment_count,total_xact_count,total_query_count,\
         total_received,total_sent,total_xact_time,total_query_time,total_wait_time,\
         total_client_parse_count,total_server_parse_count,total_bind_count,\
         total_client_login_count,\
         avg_server_assignment_count,avg_xact_count,avg_query_count,avg_recv,avg_sent,\
         avg_xact_time,avg_query_time,avg_wait_time,avg_client_parse_count,\
         avg_server_parse_count,avg_bind_count,avg_client_login_count",
    ),
    (
        "SHOW STATS_TOTALS",
        "database,server_assignment_count,xact_count,query_count,bytes_received,bytes_sent,\
         xact_time,query_time,wait_time,client_parse_count,server_parse_count,bind_count,\
         client_login_count",
    ),
    (
        "SHOW STATS_AVERAGES",
        "database,server_assignment_count,xact_count,query_count,bytes_received,bytes_sent,\
         xact_time,query_time,wait_time,avg_client_parse_count,avg_server_parse_count,\
         avg_bind_count,avg_client_login_count",
    ),
    ("SHOW TOTALS", "name,value"),
    ("SHOW CLIENTS", SOCKET_COLUMNS),
    ("SHOW SERVERS", SOCKET_COLUMNS),
    (
        "SHOW DATABASES",
        "name,host,port,database,force_user,pool_size,min_pool_size,reserve_pool_size,\
         server_lifetime,pool_mode,load_balance_hosts,max_connections,current_connections,\
         max_client_connections,current_client_connections,paused,disabled",
    ),
    (
        "SHOW USERS",
        "name,pool_size,reserve_pool_size,pool_mode,max_user_connections,current_connections,\
         max_user_client_connections,current_client_connections",
    ),
    ("SHOW CONFIG", "key,value,default,changeable"),
    ("SHOW LISTS", "list,items"),
    ("SHOW MEM", "name,size,used,free,memtotal"),
    ("SHOW VERSION", "version"),
    (
        "SHOW SHARDS",
        "database,shard,role,host,port,state,read_your_writes",
    ),
    (
        "SHOW REPLICATION",
        "database,shard,role,replica,host,port,lsn,lag_bytes,lag_ms,sampled_ms_ago,state,\
         read_your_writes",
    ),
];

fn normalize(header: &str) -> String {
    header
        .split(',')
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn every_show_header_matches_pgbouncer() {
    let (_cluster, weir) = start(2);
    // A client with a transaction behind it, so pools, servers and stats have rows.
    let out = Command::new(common::pg_bin("psql"))
        .args(["-X", "-A", "-t", "-h", "127.0.0.1"])
        .args(["-p", &weir.port.to_string(), "-U", "app", "-d", "app"])
        .args(["-c", "SELECT 1"])
        .env("PGPASSWORD", APP_PASSWORD)
        .stdin(Stdio::null())
        .output()
        .expect("run psql");
    assert_eq!(stdout_ok(&out, "client query").trim(), "1");

    for (sql, expected) in EXPECTED_HEADERS {
        let out = psql_console(&weir, "admin", ADMIN_PASSWORD, sql);
        let text = stdout_ok(&out, sql);
        let header = text.lines().next().unwrap_or_default();
        assert_eq!(header, normalize(expected), "{sql}");
    }

    // Case-insensitive, optional semicolon; rows are there.
    let pools = stdout_ok(
        &psql_console(&weir, "admin", ADMIN_PASSWORD, "show pools;"),
        "show pools;",
    );
    assert!(
        pools.lines().any(|l| l.starts_with("app,app,")),
        "SHOW POOLS has no app/app row:\n{pools}"
    );
    let stats = stdout_ok(
        &psql_console(&weir, "admin", ADMIN_PASSWORD, "SHOW STATS"),
        "SHOW STATS",
    );
    let app_stats = stats
        .lines()
        .find(|l| l.starts_with("app,"))
        .unwrap_or_else(|| panic!("SHOW STATS has no app row:\n{stats}"));
    let xacts: u64 = app_stats
        .split(',')
        .nth(2)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(xacts >= 1, "total_xact_count after a query: {app_stats}");
    let shards = stdout_ok(
        &psql_console(&weir, "admin", ADMIN_PASSWORD, "SHOW SHARDS"),
        "SHOW SHARDS",
    );
    let roles: Vec<&str> = shards
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').nth(2))
        .collect();
    assert_eq!(roles, ["primary", "primary", "replica"], "{shards}");
    assert!(
        shards.lines().skip(1).all(|l| l.ends_with(",healthy,off")),
        "{shards}"
    );

    // SHOW HELP answers with a NOTICE; an unknown command with PgBouncer's error.
    let help = psql_console(&weir, "admin", ADMIN_PASSWORD, "SHOW HELP");
    stdout_ok(&help, "SHOW HELP");
    assert!(String::from_utf8_lossy(&help.stderr).contains("Console usage"));
    let bad = psql_console(&weir, "admin", ADMIN_PASSWORD, "SHOW NOPE");
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr)
            .contains("invalid command 'SHOW NOPE', use SHOW HELP;"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

// -------------------------------------------------------------------------------------------
// Control commands, through tokio-postgres
// -------------------------------------------------------------------------------------------

async fn console(weir: &Weir, user: &str, password: &str) -> Client {
    common::connect(&weir.url(user, password, "pgbouncer")).await
}

async fn app_client(weir: &Weir) -> Client {
    common::connect(&weir.url("app", APP_PASSWORD, "app")).await
}

async fn rows(client: &Client, sql: &str) -> Vec<SimpleQueryRow> {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", common::describe_error(&e)))
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .collect()
}

/// Runs a console command that must succeed.
async fn run(client: &Client, sql: &str) {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", common::describe_error(&e)));
}

/// `column` of the row of `SHOW what` whose `key_col` is `key`.
async fn show_value(
    admin: &Client,
    what: &str,
    key_col: &str,
    key: &str,
    column: &str,
) -> Option<String> {
    rows(admin, &format!("SHOW {what}"))
        .await
        .into_iter()
        .find(|r| r.get(key_col) == Some(key))
        .and_then(|r| r.get(column).map(str::to_string))
}

/// Polls `condition` until it holds; panics naming `what` after [`SETTLE`].
async fn until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + SETTLE;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn scalar(client: &Client, sql: &str) -> String {
    rows(client, sql)
        .await
        .first()
        .and_then(|r| r.get(0).map(str::to_string))
        .unwrap_or_else(|| panic!("{sql}: no row"))
}

#[tokio::test]
async fn pause_waits_for_servers_and_blocks_new_transactions_until_resume() {
    let (_cluster, weir) = start(2);
    let admin = console(&weir, "admin", ADMIN_PASSWORD).await;
    let watcher = console(&weir, "admin", ADMIN_PASSWORD).await;
    let holder = app_client(&weir).await;
    let waiter = app_client(&weir).await;
    assert_eq!(scalar(&waiter, "SELECT 1").await, "1");

    // PAUSE does not answer while a transaction holds a server.
    run(&holder, "BEGIN").await;
    assert_eq!(scalar(&holder, "SELECT 2").await, "2");
    let pause = tokio::spawn(async move {
        run(&admin, "PAUSE app").await;
        admin
    });
    until("SHOW DATABASES to mark app paused", || async {
        show_value(&watcher, "DATABASES", "name", "app", "paused")
            .await
            .as_deref()
            == Some("1")
    })
    .await;
    assert!(
        !pause.is_finished(),
        "PAUSE answered while a server was in use"
    );
    run(&holder, "COMMIT").await;
    let admin = pause.await.expect("PAUSE task");
    assert_eq!(
        show_value(&admin, "POOLS", "database", "app", "sv_active")
            .await
            .as_deref(),
        Some("0")
    );

    // A new transaction now waits…
    let blocked = tokio::spawn(async move { scalar(&waiter, "SELECT 42").await });
    until("the paused client to show as waiting", || async {
        show_value(&admin, "POOLS", "database", "app", "cl_waiting")
            .await
            .as_deref()
            == Some("1")
    })
    .await;
    assert!(
        !blocked.is_finished(),
        "a transaction ran on a paused database"
    );
    // …until RESUME.
    run(&admin, "RESUME app").await;
    assert_eq!(blocked.await.expect("blocked task"), "42");
    assert_eq!(
        show_value(&admin, "DATABASES", "name", "app", "paused")
            .await
            .as_deref(),
        Some("0")
    );

    // PgBouncer's errors for resuming what is not paused.
    let err = admin
        .simple_query("RESUME")
        .await
        .expect_err("RESUME unpaused");
    let db = err.as_db_error().expect("server error");
    assert_eq!(db.code().code(), "08P01");
    assert_eq!(db.message(), "pooler is not paused/suspended");
    let err = admin
        .simple_query("PAUSE nope")
        .await
        .expect_err("PAUSE nope");
    assert_eq!(
        err.as_db_error().map(|e| e.message()),
        Some("no such database: nope")
    );
}

#[tokio::test]
async fn kill_drops_the_database_clients_and_servers() {
    let (cluster, weir) = start(2);
    let admin = console(&weir, "admin", ADMIN_PASSWORD).await;
    let victim = app_client(&weir).await;
    let pid = scalar(&victim, "SELECT pg_backend_pid()").await;

    run(&admin, "KILL app").await;
    until("the killed client to be gone from SHOW CLIENTS", || async {
        let clients = rows(&admin, "SHOW CLIENTS").await;
        // As PgBouncer, the console lists its own connection (database pgbouncer).
        clients
            .iter()
            .all(|r| r.get("database") == Some("pgbouncer"))
            && clients.iter().any(|r| r.get("user") == Some("admin"))
    })
    .await;
    assert!(
        victim.simple_query("SELECT 1").await.is_err(),
        "a killed client could still run a query"
    );
    until("the server connection to close", || async {
        let sql = format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}");
        cluster.psql("postgres", &sql) == "0"
    })
    .await;
    // Killed databases stay paused until RESUME, as in PgBouncer.
    assert_eq!(
        show_value(&admin, "DATABASES", "name", "app", "paused")
            .await
            .as_deref(),
        Some("1")
    );
    run(&admin, "RESUME app").await;
    let fresh = app_client(&weir).await;
    assert_eq!(scalar(&fresh, "SELECT 1").await, "1");
}

#[tokio::test]
async fn reload_and_set_apply_a_changed_pool_size() {
    let (cluster, weir) = start(1);
    let admin = console(&weir, "admin", ADMIN_PASSWORD).await;
    let first = app_client(&weir).await;
    let second = app_client(&weir).await;

    // Pool of one: a second transaction waits for the first.
    run(&first, "BEGIN").await;
    scalar(&first, "SELECT 1").await;
    let queued = tokio::spawn(async move {
        run(&second, "BEGIN").await;
        second
    });
    until("the second client to wait for the only server", || async {
        show_value(&admin, "POOLS", "database", "app", "cl_waiting")
            .await
            .as_deref()
            == Some("1")
    })
    .await;
    run(&first, "COMMIT").await;
    let second = queued.await.expect("queued task");
    run(&second, "COMMIT").await;

    // RELOAD with pool_size = 2: two transactions at once.
    weir.rewrite_config(&config(cluster.port, 2));
    run(&admin, "RELOAD").await;
    assert_eq!(
        show_value(&admin, "DATABASES", "name", "app", "pool_size")
            .await
            .as_deref(),
        Some("2")
    );
    run(&first, "BEGIN").await;
    run(&second, "BEGIN").await;
    let a = scalar(&first, "SELECT pg_backend_pid()").await;
    let b = scalar(&second, "SELECT pg_backend_pid()").await;
    assert_ne!(a, b, "two concurrent transactions share one server");
    run(&first, "COMMIT").await;
    run(&second, "COMMIT").await;

    // SET changes a runtime setting the same way.
    run(&admin, "SET default_pool_size = 7").await;
    assert_eq!(
        show_value(&admin, "CONFIG", "key", "default_pool_size", "value")
            .await
            .as_deref(),
        Some("7")
    );
    let err = admin
        .simple_query("SET listen_port = 1")
        .await
        .expect_err("SET listen_port");
    assert_eq!(err.as_db_error().map(|e| e.message()), Some("SET failed"));
}

#[tokio::test]
async fn stats_users_may_only_show() {
    let (_cluster, weir) = start(2);
    let stats = console(&weir, "stats", STATS_PASSWORD).await;
    assert_eq!(rows(&stats, "SHOW LISTS").await.len(), 14);
    rows(&stats, "SHOW POOLS").await;
    for sql in [
        "PAUSE",
        "PAUSE app",
        "RESUME",
        "RELOAD",
        "KILL app",
        "SET default_pool_size = 3",
        "SHUTDOWN",
        "DISABLE app",
    ] {
        let err = stats.simple_query(sql).await.expect_err(sql);
        let db = err
            .as_db_error()
            .unwrap_or_else(|| panic!("{sql}: {err:?}"));
        assert_eq!(db.code().code(), "08P01", "{sql}");
        assert_eq!(db.message(), "admin access needed", "{sql}");
    }
    // The console stays usable after a refusal.
    assert_eq!(
        scalar(&stats, "SHOW VERSION").await.split(' ').next(),
        Some("Weir")
    );
    // A user in neither list cannot log in to the console.
    let refused = common::try_connect(&weir.url("app", APP_PASSWORD, "pgbouncer")).await;
    assert!(refused.is_err(), "app logged in to the admin console");
}

#[tokio::test]
async fn disable_refuses_new_clients_until_enable() {
    let (_cluster, weir) = start(2);
    let admin = console(&weir, "admin", ADMIN_PASSWORD).await;
    run(&admin, "DISABLE app").await;
    let refused = common::try_connect(&weir.url("app", APP_PASSWORD, "app")).await;
    assert!(refused.is_err(), "a disabled database accepted a client");
    run(&admin, "ENABLE app").await;
    let client = app_client(&weir).await;
    assert_eq!(scalar(&client, "SELECT 1").await, "1");
    // RECONNECT then WAIT_CLOSE: the idle server is replaced, nothing old stays.
    run(&admin, "RECONNECT app").await;
    run(&admin, "WAIT_CLOSE app").await;
    assert_eq!(scalar(&client, "SELECT 2").await, "2");
}

#[test]
fn shutdown_command_stops_weir() {
    let (_cluster, mut weir) = start(2);
    // PgBouncer does not answer SHUTDOWN: psql sees the connection close.
    let _ = psql_console(&weir, "admin", ADMIN_PASSWORD, "SHUTDOWN");
    let status = weir
        .wait_exit(Duration::from_secs(20))
        .expect("weir still running after SHUTDOWN");
    assert!(status.success(), "weir exited with {status}");
}

/// The message of a refused login.
async fn refused(weir: &Weir, user: &str, password: &str, db: &str) -> String {
    match common::try_connect(&weir.url(user, password, db)).await {
        Ok(_) => panic!("{user}@{db} was let in"),
        Err(e) => common::describe_error(&e),
    }
}

#[tokio::test]
async fn client_limits_per_database_and_user_admit_up_to_the_limit_and_no_more() {
    let (_cluster, weir) = start(2);
    let admin = console(&weir, "admin", ADMIN_PASSWORD).await;
    run(&admin, "SET max_db_client_connections = 2").await;
    let first = app_client(&weir).await;
    let second = app_client(&weir).await;
    let err = refused(&weir, "app", APP_PASSWORD, "app").await;
    assert!(
        err.contains("client connections exceeded (max_db_client_connections)"),
        "{err}"
    );
    assert_eq!(
        show_value(
            &admin,
            "DATABASES",
            "name",
            "app",
            "current_client_connections"
        )
        .await,
        Some("2".into())
    );
    assert_eq!(
        show_value(&admin, "DATABASES", "name", "app", "max_client_connections").await,
        Some("2".into())
    );
    // A client that leaves frees its place.
    drop(first);
    until("the place of the client that left to be free", || async {
        common::try_connect(&weir.url("app", APP_PASSWORD, "app"))
            .await
            .is_ok()
    })
    .await;

    run(&admin, "SET max_db_client_connections = 0").await;
    run(&admin, "SET max_user_client_connections = 1").await;
    let err = refused(&weir, "app", APP_PASSWORD, "app").await;
    assert!(err.contains("(max_user_client_connections)"), "{err}");
    assert_eq!(
        show_value(
            &admin,
            "USERS",
            "name",
            "app",
            "max_user_client_connections"
        )
        .await,
        Some("1".into())
    );
    // Admin users are never turned away from the console by the limits.
    let _again = console(&weir, "admin", ADMIN_PASSWORD).await;
    run(&admin, "SET max_user_client_connections = 0").await;
    let _third = app_client(&weir).await;
    drop(second);
}

#[tokio::test]
async fn set_applies_settings_that_rebuild_the_config_and_logfile_gets_pgbouncer_lines() {
    let (_cluster, weir) = start(2);
    let admin = console(&weir, "admin", ADMIN_PASSWORD).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("weir.log");
    run(&admin, &format!("SET logfile = '{}'", log.display())).await;
    run(&admin, "SET auth_type = 'md5'").await;
    assert_eq!(
        show_value(&admin, "CONFIG", "key", "auth_type", "value").await,
        Some("md5".into())
    );
    // md5 logins against a plain password from the config work; a wrong password is refused
    // and logged in PgBouncer's words.
    let _ok = app_client(&weir).await;
    let err = refused(&weir, "app", "wrong", "app").await;
    assert!(err.contains("password authentication failed"), "{err}");
    // A value the loader would refuse is refused, and the running config is kept.
    let bad = admin.simple_query("SET auth_type = 'nonsense'").await;
    assert!(bad.is_err(), "an invalid auth_type was accepted");
    assert_eq!(
        show_value(&admin, "CONFIG", "key", "auth_type", "value").await,
        Some("md5".into())
    );
    until("the log to hold the login and the refusal", || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("login attempt: db=app user=app tls=no")
            && text.contains("closing because: password authentication failed")
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let line = text
        .lines()
        .find(|l| l.contains("login attempt"))
        .unwrap_or_default();
    // PgBouncer's layout: "YYYY-MM-DD HH:MM:SS.mmm UTC [pid] LOG C-0x…: app/app@127.0.0.1:port …"
    assert!(line.contains(" UTC ["), "{line}");
    assert!(line.contains("] LOG C-0x"), "{line}");
    assert!(line.contains(": app/app@127.0.0.1:"), "{line}");
}

#[tokio::test]
async fn transaction_timeout_ends_a_long_transaction_and_spares_short_ones() {
    let (_cluster, weir) = start(2);
    let admin = console(&weir, "admin", ADMIN_PASSWORD).await;
    run(&admin, "SET transaction_timeout = 2").await;
    let client = app_client(&weir).await;
    // Well under the limit: untouched, however many statements it has.
    client.batch_execute("BEGIN").await.expect("BEGIN");
    client.batch_execute("SELECT 1").await.expect("SELECT 1");
    client.batch_execute("COMMIT").await.expect("COMMIT");
    // A transaction that outlives the limit is ended by Weir, not by the query finishing.
    let started = Instant::now();
    client.batch_execute("BEGIN").await.expect("BEGIN");
    let err = client
        .batch_execute("SELECT pg_sleep(30)")
        .await
        .expect_err("a transaction past transaction_timeout went on");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "ended after {:?}",
        started.elapsed()
    );
    let text = common::describe_error(&err);
    assert!(text.contains("transaction timeout"), "{text}");
    // The next client gets a working server.
    let next = app_client(&weir).await;
    assert_eq!(scalar(&next, "SELECT 1").await, "1");
}

/// weir.toml for the settings tests: database `app` with `db_extra` lines, general `general`.
fn settings_config(pg_port: u16, general: &str, db_extra: &str) -> String {
    format!(
        "[weir]\nadmin_users = [\"admin\"]\n{general}\n\n\
         [users.app]\npassword = \"{APP_PASSWORD}\"\n\
         [users.admin]\npassword = \"{ADMIN_PASSWORD}\"\n\n\
         [databases.app]\nhost = \"127.0.0.1\"\nport = {pg_port}\n{db_extra}\n"
    )
}

/// An app client whose NOTICE messages are collected (the connection task keeps them).
async fn client_with_notices(
    weir: &Weir,
) -> (Client, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let url = weir.url("app", APP_PASSWORD, "app");
    let (client, mut connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect: {}", common::describe_error(&e)));
    let notices = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = notices.clone();
    tokio::spawn(async move {
        while let Some(Ok(msg)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let tokio_postgres::AsyncMessage::Notice(n) = msg {
                seen.lock().expect("notices").push(n.message().to_string());
            }
        }
    });
    (client, notices)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_query_and_login_and_queue_notices() {
    let cluster = app_cluster();
    let weir = Weir::start(&settings_config(
        cluster.port,
        "login_notify_message = \"Welcome to Weir\"\nquery_wait_notify = 1\nreserve_pool_size = 0",
        "pool_size = 1\nconnect_query = \"SET enable_seqscan = off; SET enable_nestloop = off\"",
    ));
    let (holder, holder_notices) = client_with_notices(&weir).await;
    // connect_query ran on the server before any client used it.
    assert_eq!(scalar(&holder, "SHOW enable_seqscan").await, "off");
    assert_eq!(scalar(&holder, "SHOW enable_nestloop").await, "off");
    assert_eq!(
        holder_notices.lock().expect("notices").as_slice(),
        ["Welcome to Weir"],
        "login_notify_message once at login"
    );

    // A client that waits past query_wait_notify for the only server is told so, once.
    holder.simple_query("BEGIN").await.expect("BEGIN");
    let (waiter, waiter_notices) = client_with_notices(&weir).await;
    let waiting = tokio::spawn(async move {
        let r = scalar(&waiter, "SELECT 'served'").await;
        (waiter, r)
    });
    common::eventually(Duration::from_secs(10), "the queue notice", || {
        waiter_notices.lock().expect("notices").len() == 2
    });
    holder.simple_query("COMMIT").await.expect("COMMIT");
    let (waiter, served) = waiting.await.expect("waiter");
    assert_eq!(served, "served");
    assert_eq!(
        waiter_notices.lock().expect("notices").as_slice(),
        [
            "Welcome to Weir",
            "No server connection available in postgres backend, client being queued"
        ]
    );
    // Served at once: no notice.
    assert_eq!(scalar(&waiter, "SELECT 1").await, "1");
    assert_eq!(waiter_notices.lock().expect("notices").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_fast_close_ends_a_session_whose_server_was_reconnected() {
    let cluster = app_cluster();
    let weir = Weir::start(&settings_config(
        cluster.port,
        "pool_mode = \"session\"",
        "",
    ));
    let admin = console(&weir, "admin", ADMIN_PASSWORD).await;
    // Without server_fast_close a session keeps its server through RECONNECT.
    let keeps = app_client(&weir).await;
    assert_eq!(scalar(&keeps, "SELECT 1").await, "1");
    run(&admin, "RECONNECT app").await;
    assert_eq!(scalar(&keeps, "SELECT 2").await, "2");
    drop(keeps);

    run(&admin, "SET server_fast_close = 1").await;
    let closed = app_client(&weir).await;
    assert_eq!(scalar(&closed, "SELECT 1").await, "1");
    run(&admin, "RECONNECT app").await;
    let err = closed
        .simple_query("SELECT 2")
        .await
        .expect_err("a session whose server was reconnected under server_fast_close");
    let text = common::describe_error(&err);
    assert!(
        text.contains("database configuration changed") || closed.is_closed(),
        "{text}"
    );
    common::eventually(Duration::from_secs(10), "the close to be logged", || {
        weir.log()
            .contains("closing because: database configuration changed")
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_idle_timeout_frees_unused_pools_only() {
    let cluster = app_cluster();
    let other = format!(
        "\n[databases.other]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"app\"\n",
        cluster.port
    );
    let weir = Weir::start(&settings_config(
        cluster.port,
        "pool_idle_timeout = 1\nserver_idle_timeout = 1",
        &other,
    ));
    let admin = console(&weir, "admin", ADMIN_PASSWORD).await;
    // `app` keeps a client; `other` is used once and left.
    let stays = app_client(&weir).await;
    assert_eq!(scalar(&stays, "SELECT 1").await, "1");
    let once = common::connect(&weir.url("app", APP_PASSWORD, "other")).await;
    assert_eq!(scalar(&once, "SELECT 1").await, "1");
    drop(once);
    until("other's pool to be freed", || async {
        weir.log()
            .contains("cleaning up idle pool for user app on db other because: pool idle timeout")
    })
    .await;
    assert_eq!(
        show_value(&admin, "POOLS", "database", "other", "user").await,
        None
    );
    assert_eq!(
        show_value(&admin, "POOLS", "database", "app", "user")
            .await
            .as_deref(),
        Some("app"),
        "a pool with a client is kept"
    );
    assert!(!weir.log().contains("idle pool for user app on db app "));
    // A freed pool comes back with the next client.
    let again = common::connect(&weir.url("app", APP_PASSWORD, "other")).await;
    assert_eq!(scalar(&again, "SELECT 2").await, "2");
}
