//! The pool under pressure and failure: servers killed while idle or mid-transaction, clients
//! waiting past query_wait_timeout, the reserve pool, max_client_conn, cancel requests, and
//! pgbench with many clients on few servers.

#[path = "core_support.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::common::{self, eventually, PgCluster, Weir};
use support::{
    app_cluster, app_cluster_and_weir, app_config, app_url, backends, connect_with_task,
    count_activity, db_message, expect_sqlstate, peak, scalar, BackendSampler, ConnectionTask,
};
use tokio_postgres::{NoTls, SimpleQueryMessage};

/// Ends the backend with process id `pid` the way an administrator would.
fn terminate_backend(cluster: &PgCluster, pid: &str) {
    assert_eq!(
        cluster.psql("postgres", &format!("SELECT pg_terminate_backend({pid})")),
        "t"
    );
    eventually(Duration::from_secs(5), "the backend to exit", || {
        count_activity(cluster, "app", &format!("pid = {pid}")) == 0
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_server_killed_between_transactions_is_replaced() {
    let (cluster, weir) = app_cluster_and_weir(
        "default_pool_size = 1\nreserve_pool_size = 0\nquery_wait_timeout = 5",
    );
    let client = common::connect(&app_url(&weir)).await;

    for round in 0..2 {
        let pid = scalar(&client, "SELECT pg_backend_pid()").await;
        terminate_backend(&cluster, &pid);
        // The client is idle between transactions: it never held the dead server, so its next
        // transaction must run on a fresh one without the client noticing.
        let result = client.simple_query("SELECT pg_backend_pid()").await;
        let messages = result.unwrap_or_else(|e| {
            panic!(
                "round {round}: query after the idle server was killed: {}",
                common::describe_error(&e)
            )
        });
        let new_pid = support::first_value(&messages).expect("a row");
        assert_ne!(new_pid, pid, "round {round}: still the killed backend");
    }
    assert_eq!(backends(&cluster, "app"), 1);
}

/// The error of a client whose server died: PostgreSQL's own 57P01 passed on, or Weir's 08P01.
fn assert_server_died_error(err: &tokio_postgres::Error, who: &str) {
    let code = err.code().map(|c| c.code().to_string());
    assert!(
        matches!(code.as_deref(), Some("57P01" | "08P01")),
        "{who}: expected the server's 57P01 or Weir's 08P01, got {}",
        common::describe_error(err)
    );
}

/// Waits for a victim's connection to end and returns the error it ended with: a client whose
/// server died must be told so, not left hanging or cut off without a word.
async fn connection_error(task: ConnectionTask, who: &str) -> tokio_postgres::Error {
    let ended = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap_or_else(|_| panic!("{who}: connection still open 10 s after its server died"));
    match ended.expect("connection task") {
        Ok(()) => panic!("{who}: connection closed without an error message"),
        Err(e) => e,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_mid_transaction_fails_only_that_client() {
    let (cluster, weir) = app_cluster_and_weir(
        "default_pool_size = 3\nreserve_pool_size = 0\nquery_wait_timeout = 5",
    );
    let (idle_victim, idle_connection) = connect_with_task(&app_url(&weir)).await;
    let (busy_victim, busy_connection) = connect_with_task(&app_url(&weir)).await;
    let bystander = common::connect(&app_url(&weir)).await;

    // One victim idles inside its transaction, the other is running a query in it.
    idle_victim.simple_query("BEGIN").await.expect("BEGIN");
    let idle_pid = scalar(&idle_victim, "SELECT pg_backend_pid()").await;
    busy_victim.simple_query("BEGIN").await.expect("BEGIN");
    let busy_pid = scalar(&busy_victim, "SELECT pg_backend_pid()").await;
    let sleeping = tokio::spawn(async move {
        let result = busy_victim.simple_query("SELECT pg_sleep(30)").await;
        (busy_victim, result)
    });
    eventually(Duration::from_secs(5), "pg_sleep to run", || {
        count_activity(
            &cluster,
            "app",
            &format!("pid = {busy_pid} AND state = 'active'"),
        ) == 1
    });
    assert_eq!(scalar(&bystander, "SELECT 1").await, "1");
    terminate_backend(&cluster, &idle_pid);
    terminate_backend(&cluster, &busy_pid);

    let (_busy_victim, slept) = tokio::time::timeout(Duration::from_secs(10), sleeping)
        .await
        .expect("the query whose server died hung")
        .expect("sleeper task");
    let err = slept.expect_err("a query whose server died succeeded");
    assert_server_died_error(&err, "running query");
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        idle_victim.simple_query("SELECT 1"),
    )
    .await
    .expect("the client whose server died mid-transaction hung");
    assert!(
        answer.is_err(),
        "a query in a transaction whose server died succeeded"
    );
    // The error reached the idle client while it had no request out: tokio-postgres then
    // ends the connection with it.
    let err = connection_error(idle_connection, "idle victim").await;
    assert_server_died_error(&err, "idle victim");
    drop(busy_connection);

    for _ in 0..5 {
        assert_eq!(scalar(&bystander, "SELECT 2").await, "2");
    }
    let newcomer = common::connect(&app_url(&weir)).await;
    assert_eq!(scalar(&newcomer, "SELECT 3").await, "3");
    assert!(backends(&cluster, "app") <= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_waiting_past_query_wait_timeout_gets_an_error() {
    let (cluster, weir) = app_cluster_and_weir(
        "default_pool_size = 1\nreserve_pool_size = 0\nquery_wait_timeout = 1",
    );
    let holder = common::connect(&app_url(&weir)).await;
    let waiter = common::connect(&app_url(&weir)).await;
    holder.simple_query("BEGIN").await.expect("BEGIN");

    let started = Instant::now();
    let answer =
        tokio::time::timeout(Duration::from_secs(10), waiter.simple_query("SELECT 1")).await;
    let waited = started.elapsed();
    let result = answer.expect("the waiting client hung past query_wait_timeout");
    let err = expect_sqlstate(result, "08P01", "query while the only server is busy");
    assert_eq!(db_message(&err), "query_wait_timeout");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "query_wait_timeout = 1 fired after {waited:?}"
    );

    holder.simple_query("COMMIT").await.expect("COMMIT");
    assert_eq!(scalar(&holder, "SELECT 'holder'").await, "holder");
    let next = common::connect(&app_url(&weir)).await;
    assert_eq!(scalar(&next, "SELECT 'next'").await, "next");
    assert_eq!(backends(&cluster, "app"), 1);
}

/// Runs `sql` and says how long after `started` its answer came.
async fn query_since(
    client: &tokio_postgres::Client,
    sql: &str,
    started: Instant,
) -> (
    Result<Vec<SimpleQueryMessage>, tokio_postgres::Error>,
    Duration,
) {
    let result = client.simple_query(sql).await;
    (result, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_pool_opens_only_after_reserve_pool_timeout() {
    let cluster = Arc::new(app_cluster());
    let weir = Weir::start(&app_config(
        cluster.port,
        "default_pool_size = 1\nreserve_pool_size = 1\nreserve_pool_timeout = 1\n\
         query_wait_timeout = 10",
    ));
    let holder = common::connect(&app_url(&weir)).await;
    let first = common::connect(&app_url(&weir)).await;
    let second = common::connect(&app_url(&weir)).await;
    holder.simple_query("BEGIN").await.expect("BEGIN");
    assert_eq!(backends(&cluster, "app"), 1);

    let sampler = BackendSampler::start(cluster.clone(), "app");
    let started = Instant::now();
    let ((a, waited_a), (b, waited_b)) = tokio::join!(
        query_since(&first, "SELECT pg_backend_pid()", started),
        query_since(&second, "SELECT pg_backend_pid()", started)
    );
    let samples = sampler.finish();
    for (result, waited) in [(a, waited_a), (b, waited_b)] {
        result.unwrap_or_else(|e| panic!("waiting client: {}", common::describe_error(&e)));
        assert!(
            waited >= Duration::from_millis(900),
            "served after {waited:?}, before reserve_pool_timeout = 1 s"
        );
    }
    let early: Vec<usize> = samples
        .iter()
        .filter(|(at, _)| at.duration_since(started) < Duration::from_millis(800))
        .map(|&(_, n)| n)
        .collect();
    assert!(
        !early.is_empty() && early.iter().all(|&n| n == 1),
        "servers during the first 0.8 s: {early:?}"
    );
    assert!(
        peak(&samples) <= 2,
        "pool 1 + reserve 1, yet {} servers",
        peak(&samples)
    );
    assert_eq!(
        backends(&cluster, "app"),
        2,
        "the reserve server was opened"
    );
    holder.simple_query("COMMIT").await.expect("COMMIT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_client_conn_refuses_the_extra_client() {
    let (_cluster, weir) = app_cluster_and_weir("max_client_conn = 2\ndefault_pool_size = 2");
    let first = common::connect(&app_url(&weir)).await;
    // Weir::start probed the port with a connection of its own; until Weir has seen that one
    // close, it may still count it.
    let mut second = None;
    for _ in 0..250 {
        match common::try_connect(&app_url(&weir)).await {
            Ok(client) => {
                second = Some(client);
                break;
            }
            Err(e) if db_message(&e).contains("max_client_conn") => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("second client: {}", common::describe_error(&e)),
        }
    }
    let second = second.expect("a second client within max_client_conn = 2");

    let err = expect_sqlstate(
        common::try_connect(&app_url(&weir)).await,
        "08P01",
        "third client",
    );
    assert_eq!(
        db_message(&err),
        "no more connections allowed (max_client_conn)"
    );
    assert_eq!(scalar(&first, "SELECT 1").await, "1");
    assert_eq!(scalar(&second, "SELECT 2").await, "2");

    // A slot frees up when a client leaves.
    drop(first);
    let mut third = None;
    let deadline = Instant::now() + Duration::from_secs(5);
    while third.is_none() && Instant::now() < deadline {
        third = common::try_connect(&app_url(&weir)).await.ok();
    }
    let third = third.expect("a client after another one left");
    assert_eq!(scalar(&third, "SELECT 3").await, "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_stops_a_running_query() {
    let (cluster, weir) = app_cluster_and_weir("default_pool_size = 2");
    let client = common::connect(&app_url(&weir)).await;
    let cancel = client.cancel_token();

    let sleeper = tokio::spawn(async move {
        let result = client.simple_query("SELECT pg_sleep(30)").await;
        (client, result)
    });
    eventually(Duration::from_secs(5), "pg_sleep to run", || {
        count_activity(
            &cluster,
            "app",
            "state = 'active' AND query LIKE '%pg_sleep(30)%'",
        ) == 1
    });
    let started = Instant::now();
    cancel
        .cancel_query(NoTls)
        .await
        .expect("send cancel request");
    let (client, result) = tokio::time::timeout(Duration::from_secs(10), sleeper)
        .await
        .expect("the cancelled query did not end")
        .expect("sleeper task");
    let err = expect_sqlstate(result, "57014", "cancelled pg_sleep");
    assert_eq!(db_message(&err), "canceling statement due to user request");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "cancel took {:?}",
        started.elapsed()
    );
    assert_eq!(
        scalar(&client, "SELECT 'after cancel'").await,
        "after cancel"
    );
}

/// pgbench against Weir: init, then a select-only run of 50 clients on a pool of 5 (+2 reserve),
/// sampling the database's backends all along.
fn pgbench_select_only(protocol: &str) {
    const POOL: usize = 5;
    const RESERVE: usize = 2;
    let cluster = Arc::new(PgCluster::start());
    cluster.create_user("bench", "bench-secret", "scram-sha-256");
    cluster.create_database("benchdb", "bench");
    let weir = Weir::start(&format!(
        "[weir]\ndefault_pool_size = {POOL}\nreserve_pool_size = {RESERVE}\n\
         max_client_conn = 200\nquery_wait_timeout = 30\n\n\
         [users.bench]\npassword = \"bench-secret\"\n\n\
         [databases.benchdb]\nhost = \"127.0.0.1\"\nport = {}\n",
        cluster.port
    ));
    let port = weir.port.to_string();
    let target = ["-h", "127.0.0.1", "-p", &port, "-U", "bench", "benchdb"];
    let password = [("PGPASSWORD", "bench-secret")];
    let run = |args: &[&str]| {
        let all: Vec<&str> = args.iter().chain(&target).copied().collect();
        let out = common::pgbench_env(&all, &password);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "pgbench {args:?} failed with {}\n--- stdout ---\n{stdout}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };

    run(&["-i", "-q", "-s", "1"]);
    let sampler = BackendSampler::start(cluster.clone(), "benchdb");
    let stdout = run(&["-S", "-M", protocol, "-c", "50", "-j", "2", "-T", "5"]);
    let samples = sampler.finish();

    assert!(
        stdout.contains("number of failed transactions: 0 "),
        "pgbench -M {protocol}:\n{stdout}"
    );
    let processed = stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no transaction count in:\n{stdout}"));
    assert!(processed > 0, "{stdout}");
    assert!(
        peak(&samples) <= POOL + RESERVE,
        "{} servers for pool {POOL} + reserve {RESERVE}",
        peak(&samples)
    );
}

#[test]
fn pgbench_select_only_simple_protocol_has_no_failures() {
    pgbench_select_only("simple");
}

#[test]
fn pgbench_select_only_extended_protocol_has_no_failures() {
    pgbench_select_only("extended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_db_connections_caps_every_user_s_pool_and_evicts_idle_servers() {
    let cluster = app_cluster();
    cluster.create_user("other", "other-secret", "scram-sha-256");
    let config = format!(
        "[weir]\ndefault_pool_size = 5\nquery_wait_timeout = 2\n\n\
         [users.app]\npassword = \"{}\"\n\
         [users.other]\npassword = \"other-secret\"\n\n\
         [databases.app]\nhost = \"127.0.0.1\"\nport = {}\nmax_db_connections = 2\n",
        support::APP_PASSWORD,
        cluster.port
    );
    let weir = Weir::start(&config);
    let other_url = weir.url("other", "other-secret", "app");
    // Logging in opens a first server for each pool (for its parameters), as PgBouncer.
    let other = common::connect(&other_url).await;
    let other2 = common::connect(&other_url).await;

    // Two of app's clients hold both places of the database (other's idle server is evicted).
    let a1 = common::connect(&app_url(&weir)).await;
    let a2 = common::connect(&app_url(&weir)).await;
    a1.simple_query("BEGIN").await.expect("BEGIN a1");
    a2.simple_query("BEGIN").await.expect("BEGIN a2");
    assert_eq!(backends(&cluster, "app"), 2);

    // Under the cap: other's pool may not open a third server, and gives up at
    // query_wait_timeout with PgBouncer's error.
    let err = expect_sqlstate(
        other.simple_query("SELECT 1").await,
        "08P01",
        "a third server for the database",
    );
    assert_eq!(db_message(&err), "query_wait_timeout");
    assert_eq!(backends(&cluster, "app"), 2);

    // At the cap, a server app leaves idle is closed for other's waiting client.
    let other = other2;
    let waiting = tokio::spawn(async move {
        let r = scalar(&other, "SELECT current_user").await;
        (other, r)
    });
    a1.simple_query("COMMIT").await.expect("COMMIT a1");
    let (other, who) = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("other's client was never served after a server went idle")
        .expect("other's query");
    assert_eq!(who, "other");
    assert_eq!(backends(&cluster, "app"), 2);
    drop(other);
    a2.simple_query("COMMIT").await.expect("COMMIT a2");
}
