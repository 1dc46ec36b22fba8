//! Fault injection over loopback: PostgreSQL restarted under load, backends killed or frozen
//! (SIGSTOP), a frozen postmaster, clients that vanish mid-transaction or mid-COPY, a client
//! that stops reading a huge result, a thousand clients at once, clients beyond
//! max_client_conn, and clients that send malformed or truncated frames.
//!
//! Each test injects one fault and then checks that Weir contained it, as PgBouncer does: only
//! the client whose work was hit sees an error, everyone else keeps working, and afterwards the
//! pool hands out only servers that answer, with none left idle in a transaction.

#[path = "drivers/raw_client.rs"]
mod raw_client;
#[path = "core_support.rs"]
mod support;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::SinkExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use raw_client::RawClient;
use support::common::{self, eventually, PgCluster, Weir};
use support::{
    app_cluster, app_config, app_url, backends, connect_with_task, count_activity, db_message,
    expect_sqlstate, scalar, APP_PASSWORD,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::{Client, SimpleQueryMessage};

/// The password of the admin console user `admin`.
const ADMIN_PASSWORD: &str = "admin-secret";
/// A healthy pool answers a fresh client well within this (query_wait_timeout is 20 s).
const PROMPTLY: Duration = Duration::from_secs(5);
/// Bound on anything that should end by itself after a fault (errors, closes, cleanup).
const SETTLE: Duration = Duration::from_secs(10);
/// query_wait_timeout in every config here: far above `PROMPTLY`, so a client served only
/// after it would fail the test instead of passing slowly.
const QUERY_WAIT_TIMEOUT: u64 = 20;

// ---------------------------------------------------------------------------------------------
// Setup
// ---------------------------------------------------------------------------------------------

/// weir.toml for database `app` with a pool of `pool_size` (no reserve), the admin console
/// user `admin`, and `extra` lines in the `[weir]` section.
fn faults_config(pg_port: u16, pool_size: usize, extra: &str) -> String {
    let general = format!(
        "admin_users = [\"admin\"]\ndefault_pool_size = {pool_size}\nreserve_pool_size = 0\n\
         query_wait_timeout = {QUERY_WAIT_TIMEOUT}\n{extra}"
    );
    format!(
        "{}\n[users.admin]\npassword = \"{ADMIN_PASSWORD}\"\n",
        app_config(pg_port, &general)
    )
}

/// `app_cluster()` with an empty table `marker (n bigint)` that `app` may write.
fn marker_cluster() -> PgCluster {
    let cluster = app_cluster();
    cluster.psql(
        "app",
        "CREATE TABLE marker (n bigint); GRANT ALL ON marker TO app",
    );
    cluster
}

/// A marker cluster and a Weir in front of it (see `faults_config`).
fn start(pool_size: usize, extra: &str) -> (PgCluster, Weir) {
    let cluster = marker_cluster();
    let weir = Weir::start(&faults_config(cluster.port, pool_size, extra));
    (cluster, weir)
}

// ---------------------------------------------------------------------------------------------
// Checks on PostgreSQL and on the pool
// ---------------------------------------------------------------------------------------------

fn idle_in_transaction(cluster: &PgCluster) -> usize {
    count_activity(cluster, "app", "state LIKE 'idle in transaction%'")
}

fn marker_rows(cluster: &PgCluster) -> usize {
    let out = cluster.psql("app", "SELECT count(*) FROM marker");
    out.parse()
        .unwrap_or_else(|_| panic!("count(*) from marker: {out:?}"))
}

/// The pid of the one backend of `app` whose pg_stat_activity row matches `filter`, waiting
/// until there is one.
fn wait_for_backend(cluster: &PgCluster, filter: &str, what: &str) -> i32 {
    let sql = format!(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' \
         AND datname = 'app' AND ({filter})"
    );
    let mut pid = None;
    eventually(SETTLE, what, || {
        pid = cluster
            .psql("postgres", &sql)
            .lines()
            .next()
            .and_then(|l| l.parse().ok());
        pid.is_some()
    });
    pid.expect("a pid")
}

/// Polls `condition` without blocking the runtime; panics naming `what` after `timeout`.
async fn eventually_async(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A fresh client logs in and gets an answer within `PROMPTLY`.
async fn assert_fresh_client_served(weir: &Weir, what: &str) -> Client {
    let attempt = async {
        let client = common::try_connect(&app_url(weir))
            .await
            .map_err(|e| format!("login: {}", common::describe_error(&e)))?;
        let messages = client
            .simple_query("SELECT 'fresh'")
            .await
            .map_err(|e| format!("query: {}", common::describe_error(&e)))?;
        match support::first_value(&messages).as_deref() {
            Some("fresh") => Ok(client),
            other => Err(format!("answer {other:?}")),
        }
    };
    match tokio::time::timeout(PROMPTLY, attempt).await {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => panic!("{what}: a fresh client was not served: {e}"),
        Err(_) => panic!("{what}: a fresh client got no answer within {PROMPTLY:?}"),
    }
}

/// After a fault: a fresh client is served promptly and no server is left idle in a
/// transaction.
async fn assert_pool_serves(cluster: &PgCluster, weir: &Weir, what: &str) {
    assert_fresh_client_served(weir, what).await;
    eventually(
        SETTLE,
        &format!("{what}: no idle-in-transaction server"),
        || idle_in_transaction(cluster) == 0,
    );
}

/// Every server the pool may hold answers: `pool_size` clients each hold one in a transaction
/// at the same time, so a broken server left in the pool would fail one of them. Then SHOW
/// POOLS and pg_stat_activity must agree that nothing is waiting, idle in a transaction, or
/// beyond the pool size.
async fn assert_every_pooled_server_answers(
    cluster: &PgCluster,
    weir: &Weir,
    pool_size: usize,
    what: &str,
) {
    eventually(
        SETTLE,
        &format!("{what}: no idle-in-transaction server"),
        || idle_in_transaction(cluster) == 0,
    );
    let mut holders = Vec::new();
    for _ in 0..pool_size {
        holders.push(common::connect(&app_url(weir)).await);
    }
    let begins = futures_util::future::join_all(holders.iter().map(|c| async move {
        c.simple_query("BEGIN").await?;
        c.simple_query("SELECT pg_backend_pid()").await
    }));
    let answers = tokio::time::timeout(SETTLE, begins)
        .await
        .unwrap_or_else(|_| panic!("{what}: {pool_size} transactions did not all get a server"));
    let mut pids = Vec::new();
    for answer in answers {
        let messages = answer.unwrap_or_else(|e| {
            panic!(
                "{what}: a pooled server did not answer: {}",
                common::describe_error(&e)
            )
        });
        pids.push(support::first_value(&messages).expect("a pid"));
    }
    pids.sort();
    pids.dedup();
    assert_eq!(pids.len(), pool_size, "{what}: servers held: {pids:?}");
    for holder in &holders {
        holder.simple_query("COMMIT").await.expect("COMMIT");
    }

    let pools = show_pools(weir).await;
    assert_eq!(pools.cl_waiting, 0, "{what}: SHOW POOLS {pools:?}");
    assert!(
        pools.servers <= pool_size,
        "{what}: SHOW POOLS counts more servers than the pool size {pool_size}: {pools:?}"
    );
    let idle = count_activity(cluster, "app", "state = 'idle'");
    assert!(
        idle <= pool_size,
        "{what}: {idle} idle backends for a pool of {pool_size}"
    );
}

/// The `app` row of SHOW POOLS, reduced to what the checks compare.
#[derive(Debug)]
struct PoolRow {
    cl_active: usize,
    cl_waiting: usize,
    /// sv_active + sv_idle + sv_used + sv_tested + sv_login.
    servers: usize,
}

async fn show_pools(weir: &Weir) -> PoolRow {
    let admin = common::connect(&weir.url("admin", ADMIN_PASSWORD, "pgbouncer")).await;
    let messages = admin
        .simple_query("SHOW POOLS")
        .await
        .unwrap_or_else(|e| panic!("SHOW POOLS: {}", common::describe_error(&e)));
    let row = messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) if row.get("database") == Some("app") => Some(row),
            _ => None,
        })
        .expect("SHOW POOLS has a row for app");
    let number = |column: &str| -> usize {
        row.get(column)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("SHOW POOLS {column}: {:?}", row.get(column)))
    };
    PoolRow {
        cl_active: number("cl_active"),
        cl_waiting: number("cl_waiting"),
        servers: ["sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login"]
            .iter()
            .map(|c| number(c))
            .sum(),
    }
}

/// Weir's resident set size in bytes, from /proc/<pid>/status.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"));
    kb * 1024
}

fn assert_weir_running(weir: &mut Weir) {
    if let Some(status) = weir.wait_exit(Duration::ZERO) {
        panic!("weir exited with {status}");
    }
}

// ---------------------------------------------------------------------------------------------
// Signals
// ---------------------------------------------------------------------------------------------

/// A process stopped with SIGSTOP; dropping the guard sends SIGCONT, also when the test
/// panics, so the cluster can still be shut down.
struct Frozen(libc::pid_t);

impl Frozen {
    fn freeze(pid: libc::pid_t) -> Frozen {
        signal(pid, libc::SIGSTOP);
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        signal(self.0, libc::SIGCONT);
    }
}

fn signal(pid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}): {}", io::Error::last_os_error());
}

fn postmaster_pid(cluster: &PgCluster) -> libc::pid_t {
    let pid_file = std::fs::read_to_string(cluster.data_dir.join("postmaster.pid"))
        .expect("read postmaster.pid");
    pid_file
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("pid in postmaster.pid")
}

fn terminate_backend(cluster: &PgCluster, pid: i32) {
    assert_eq!(
        cluster.psql("postgres", &format!("SELECT pg_terminate_backend({pid})")),
        "t"
    );
}

// ---------------------------------------------------------------------------------------------
// Raw frames
// ---------------------------------------------------------------------------------------------

/// A frontend message: tag, a declared length, and the body bytes actually sent (which need
/// not match the declared length).
fn frame(tag: u8, declared_len: i32, body: &[u8]) -> Vec<u8> {
    let mut msg = vec![tag];
    msg.extend_from_slice(&declared_len.to_be_bytes());
    msg.extend_from_slice(body);
    msg
}

/// A well-formed frontend message.
fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    frame(tag, body.len() as i32 + 4, body)
}

fn query(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    message(b'Q', &body)
}

/// Deterministic junk bytes.
fn garbage(rng: &mut StdRng, len: usize) -> Vec<u8> {
    (0..len).map(|_| rng.gen()).collect()
}

/// A logged-in socket for writing raw frames.
async fn raw_login(weir: &Weir) -> TcpStream {
    RawClient::connect(weir.port, "app", APP_PASSWORD, "app")
        .await
        .into_stream()
}

/// Backend messages read from a raw socket.
struct Frames {
    stream: TcpStream,
    buf: BytesMut,
}

impl Frames {
    fn new(stream: TcpStream) -> Frames {
        Frames {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// The next message as (tag, body); `None` once the server closed the connection.
    async fn next(&mut self) -> io::Result<Option<(u8, Vec<u8>)>> {
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes(self.buf[1..5].try_into().unwrap());
                let total = usize::try_from(len).expect("backend message length") + 1;
                if self.buf.len() >= total {
                    let msg = self.buf.split_to(total);
                    return Ok(Some((msg[0], msg[5..].to_vec())));
                }
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Ok(None);
            }
        }
    }

    /// Reads until a message with `tag`; panics if the connection ends first.
    async fn until(&mut self, tag: u8) -> Vec<u8> {
        loop {
            match self.next().await {
                Ok(Some((t, body))) if t == tag => return body,
                Ok(Some(_)) => {}
                other => panic!("waiting for {:?}: {other:?}", tag as char),
            }
        }
    }
}

/// The SQLSTATE field of an ErrorResponse body.
fn sqlstate(body: &[u8]) -> String {
    let mut fields = body.split(|&b| b == 0);
    fields
        .find_map(|f| f.strip_prefix(b"C"))
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// 1. PostgreSQL restarted under load
// ---------------------------------------------------------------------------------------------

/// One transaction a load worker tried, and how it ended.
struct Outcome {
    worker: usize,
    started: Instant,
    ended: Instant,
    result: Result<(), String>,
}

/// Longer than any transaction may take, even one caught by the restart.
const TRANSACTION_LIMIT: Duration = Duration::from_secs(15);

/// Loops small write transactions through Weir until `stop`, reconnecting after an error as
/// an application's driver would. Transaction `i` of worker `w` inserts `w * 1e6 + i`.
async fn load_worker(
    url: String,
    worker: usize,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Outcome>>>,
) {
    let mut client: Option<Client> = None;
    let mut i = 0;
    while !stop.load(Ordering::Acquire) {
        i += 1;
        let started = Instant::now();
        let n = worker as i64 * 1_000_000 + i;
        let result = tokio::time::timeout(TRANSACTION_LIMIT, transaction(&mut client, &url, n))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {TRANSACTION_LIMIT:?}")));
        let failed = result.is_err();
        log.lock().unwrap().push(Outcome {
            worker,
            started,
            ended: Instant::now(),
            result,
        });
        if failed {
            client = None;
            // Pacing while PostgreSQL is down, not synchronisation.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn transaction(client: &mut Option<Client>, url: &str, n: i64) -> Result<(), String> {
    if client.as_ref().is_none_or(|c| c.is_closed()) {
        let fresh = common::try_connect(url)
            .await
            .map_err(|e| format!("login: {}", common::describe_error(&e)))?;
        *client = Some(fresh);
    }
    let c = client.as_ref().expect("connected");
    let insert = format!("INSERT INTO marker VALUES ({n})");
    for sql in ["BEGIN", &insert, "SELECT pg_sleep(0.005)", "COMMIT"] {
        c.simple_query(sql)
            .await
            .map_err(|e| format!("{sql}: {}", common::describe_error(&e)))?;
    }
    Ok(())
}

/// Weir noticed PostgreSQL was back within a second (not after server_login_retry's 15 s:
/// its probe sees the port accept again), every transaction begun after the first one it
/// served then succeeded, none hung, and the committed rows match: each success committed
/// one, each failure at most one. (Until Weir notices, new clients are turned away with
/// "server login has been failing", as PgBouncer does.)
fn assert_only_inflight_work_failed(log: &[Outcome], up_at: Instant, rows: usize) {
    let served_at = log
        .iter()
        .filter(|o| o.started >= up_at && o.result.is_ok())
        .map(|o| o.ended)
        .min()
        .expect("no transaction succeeded after the restart");
    assert!(
        served_at - up_at < Duration::from_secs(1),
        "the first transaction after the restart ended {:?} after PostgreSQL was back",
        served_at - up_at
    );
    let failed_after: Vec<String> = log
        .iter()
        .filter(|o| o.started >= served_at)
        .filter_map(|o| {
            o.result
                .as_ref()
                .err()
                .map(|e| format!("worker {}: {e}", o.worker))
        })
        .collect();
    assert!(
        failed_after.is_empty(),
        "transactions begun after Weir served again failed:\n{}",
        failed_after.join("\n")
    );
    let hung: Vec<&String> = log
        .iter()
        .filter_map(|o| o.result.as_ref().err())
        .filter(|e| e.starts_with("no answer"))
        .collect();
    assert!(hung.is_empty(), "transactions hung: {hung:?}");
    let failed_before = log
        .iter()
        .filter(|o| o.started < served_at && o.result.is_err())
        .count();
    let succeeded = log.iter().filter(|o| o.result.is_ok()).count();
    assert!(
        rows >= succeeded && rows <= succeeded + failed_before,
        "{rows} rows for {succeeded} committed and {failed_before} failed transactions"
    );
    eprintln!("{failed_before} transactions failed around the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_under_load_fails_only_inflight_work() {
    const WORKERS: usize = 4;
    const POOL: usize = 3;
    let cluster = Arc::new(marker_cluster());
    let weir = Weir::start(&faults_config(cluster.port, POOL, ""));
    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| tokio::spawn(load_worker(app_url(&weir), w, stop.clone(), log.clone())))
        .collect();
    let successes_since = |since: Instant| {
        let log = log.lock().unwrap();
        (0..WORKERS)
            .map(|w| {
                log.iter()
                    .filter(|o| o.worker == w && o.started >= since && o.result.is_ok())
                    .count()
            })
            .min()
            .unwrap_or(0)
    };
    let begun = Instant::now();
    eventually_async(SETTLE, "every worker to commit 10 transactions", || {
        successes_since(begun) >= 10
    })
    .await;

    let down_at = Instant::now();
    let restarter = cluster.clone();
    tokio::task::spawn_blocking(move || {
        restarter.stop();
        restarter.start_again();
    })
    .await
    .expect("restart PostgreSQL");
    let up_at = Instant::now();
    eventually_async(
        Duration::from_secs(30),
        "every worker to commit 20 transactions after the restart",
        || successes_since(up_at) >= 20,
    )
    .await;
    stop.store(true, Ordering::Release);
    for worker in workers {
        tokio::time::timeout(TRANSACTION_LIMIT + SETTLE, worker)
            .await
            .expect("a load worker did not stop")
            .expect("load worker");
    }

    let log = std::mem::take(&mut *log.lock().unwrap());
    eprintln!("restart took {:?}", up_at - down_at);
    assert_only_inflight_work_failed(&log, up_at, marker_rows(&cluster));

    assert_every_pooled_server_answers(&cluster, &weir, POOL, "after the restart").await;
}

/// PostgreSQL down when a client arrives: as PgBouncer, the client waits (its attempt is
/// retried) rather than failing at once; a client arriving while attempts keep failing is
/// turned away at once with the cached reason; once PostgreSQL is back the waiting client is
/// served without waiting out server_login_retry (here 30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_first_client_waits_newcomers_fail_fast_recovery_is_prompt() {
    let cluster = Arc::new(marker_cluster());
    let weir = Weir::start(&faults_config(cluster.port, 2, "server_login_retry = 30"));
    cluster.stop();
    let url = app_url(&weir);
    let first = tokio::spawn({
        let url = url.clone();
        async move { common::try_connect(&url).await }
    });
    eventually_async(SETTLE, "the first connection attempt to fail", || {
        weir.log().contains("closing because: connect failed")
    })
    .await;
    assert!(!first.is_finished(), "the first client was failed at once");
    let err = common::try_connect(&url)
        .await
        .expect_err("a newcomer was let in while PostgreSQL is down");
    assert_eq!(
        db_message(&err),
        "server login has been failing, cached error: connect failed (server_login_retry)"
    );

    let restarter = cluster.clone();
    tokio::task::spawn_blocking(move || restarter.start_again())
        .await
        .expect("start PostgreSQL");
    let client = tokio::time::timeout(SETTLE, first)
        .await
        .expect("the waiting client was not served within 10 s of PostgreSQL's return")
        .expect("client task")
        .unwrap_or_else(|e| panic!("waiting client: {}", common::describe_error(&e)));
    assert_eq!(scalar(&client, "SELECT 'back'").await, "back");
    let newcomer = common::try_connect(&url)
        .await
        .unwrap_or_else(|e| panic!("newcomer after the restart: {}", common::describe_error(&e)));
    assert_eq!(scalar(&newcomer, "SELECT 'new'").await, "new");
}

/// SIGINT is SHUTDOWN WAIT_FOR_SERVERS, as PgBouncer's: the transaction in flight goes on to
/// COMMIT; a client queued for a server is closed at once and an idle one when it starts a
/// new transaction, both with "server shutting down"; Weir exits once no server is lent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_closes_queued_and_new_transactions_with_server_shutting_down() {
    let (_cluster, mut weir) = start(1, "");
    let url = app_url(&weir);
    let holder = common::connect(&url).await;
    let idle = common::connect(&url).await;
    let queued = common::connect(&url).await;
    holder.simple_query("BEGIN").await.expect("BEGIN");
    scalar(&holder, "SELECT 1").await;
    let waiting = tokio::spawn(async move { queued.simple_query("SELECT 'queued'").await });
    let deadline = Instant::now() + SETTLE;
    while show_pools(&weir).await.cl_waiting == 0 {
        assert!(Instant::now() < deadline, "the third client never queued");
        tokio::time::sleep(Duration::from_millis(20)).await; // polling interval
    }
    weir.signal(libc::SIGINT);

    let refused = tokio::time::timeout(SETTLE, waiting)
        .await
        .expect("the queued client was not closed at SIGINT")
        .expect("queued task")
        .expect_err("the queued client got a server during a WAIT_FOR_SERVERS shutdown");
    assert_eq!(db_message(&refused), "server shutting down");
    assert_eq!(scalar(&holder, "SELECT 'in flight'").await, "in flight");
    let err = idle
        .simple_query("SELECT 'new transaction'")
        .await
        .expect_err("an idle client started a transaction during a WAIT_FOR_SERVERS shutdown");
    assert_eq!(db_message(&err), "server shutting down");
    holder.simple_query("COMMIT").await.expect("COMMIT");
    let status = weir
        .wait_exit(SETTLE)
        .expect("weir still running 10 s after the last lent server came back");
    assert!(status.success(), "weir exited with {status} after SIGINT");
}

// ---------------------------------------------------------------------------------------------
// 2. A backend killed mid-query and mid-COPY
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_killed_mid_query_fails_only_that_client() {
    const POOL: usize = 3;
    let (cluster, weir) = start(POOL, "");
    let bystander = common::connect(&app_url(&weir)).await;
    let victim = common::connect(&app_url(&weir)).await;
    bystander.simple_query("BEGIN").await.expect("BEGIN");
    bystander
        .simple_query("INSERT INTO marker VALUES (1)")
        .await
        .expect("INSERT");

    let sleeping = tokio::spawn(async move {
        let result = victim
            .simple_query("SELECT pg_sleep(30) /* victim */")
            .await;
        (victim, result)
    });
    let pid = wait_for_backend(
        &cluster,
        "state = 'active' AND query LIKE '%pg_sleep(30) /* victim */'",
        "the victim's pg_sleep to run",
    );
    terminate_backend(&cluster, pid);

    let (_victim, result) = tokio::time::timeout(SETTLE, sleeping)
        .await
        .expect("the query whose backend was killed hung")
        .expect("victim task");
    let err = result.expect_err("a query whose backend was killed succeeded");
    eprintln!("victim got: {}", common::describe_error(&err));

    bystander
        .simple_query("COMMIT")
        .await
        .expect("bystander COMMIT");
    assert_eq!(scalar(&bystander, "SELECT count(*) FROM marker").await, "1");
    assert_every_pooled_server_answers(&cluster, &weir, POOL, "after the kill").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_killed_mid_copy_fails_only_that_client() {
    const POOL: usize = 3;
    let (cluster, weir) = start(POOL, "");
    let bystander = common::connect(&app_url(&weir)).await;
    let (victim, _connection) = connect_with_task(&app_url(&weir)).await;
    bystander.simple_query("BEGIN").await.expect("BEGIN");
    bystander
        .simple_query("INSERT INTO marker VALUES (1)")
        .await
        .expect("INSERT");

    let sink = victim
        .copy_in("COPY marker FROM STDIN")
        .await
        .expect("COPY FROM STDIN");
    let mut sink = std::pin::pin!(sink);
    sink.send(Bytes::from_static(b"100\n101\n"))
        .await
        .expect("send COPY data");
    let pid = wait_for_backend(
        &cluster,
        "state = 'active' AND query LIKE 'COPY marker%'",
        "the victim's COPY to run",
    );
    terminate_backend(&cluster, pid);

    let rest = async {
        sink.send(Bytes::from_static(b"102\n")).await?;
        sink.as_mut().finish().await
    };
    let result = tokio::time::timeout(SETTLE, rest)
        .await
        .expect("the COPY whose backend was killed hung");
    let err = result.expect_err("a COPY whose backend was killed succeeded");
    eprintln!("victim got: {}", common::describe_error(&err));

    bystander
        .simple_query("COMMIT")
        .await
        .expect("bystander COMMIT");
    assert_eq!(
        scalar(&bystander, "SELECT string_agg(n::text, ',') FROM marker").await,
        "1",
        "only the bystander's row is committed"
    );
    assert_every_pooled_server_answers(&cluster, &weir, POOL, "after the kill").await;
}

// ---------------------------------------------------------------------------------------------
// 3. A server that stops answering
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_backend_hits_query_timeout_while_others_keep_working() {
    const POOL: usize = 2;
    let (cluster, weir) = start(POOL, "query_timeout = 1");
    let bystander = common::connect(&app_url(&weir)).await;
    let victim = common::connect(&app_url(&weir)).await;
    // Inside a transaction the victim keeps its server, so the pid is the one it will use.
    victim.simple_query("BEGIN").await.expect("BEGIN");
    let pid: i32 = scalar(&victim, "SELECT pg_backend_pid()")
        .await
        .parse()
        .expect("pid");
    let frozen = Frozen::freeze(pid);

    let started = Instant::now();
    let waiting = tokio::spawn(async move {
        let result = victim.simple_query("SELECT 'never answered'").await;
        (victim, result, started.elapsed())
    });
    for i in 0..5 {
        let answer = tokio::time::timeout(PROMPTLY, scalar(&bystander, &format!("SELECT {i}")))
            .await
            .expect("the bystander hung while another backend was frozen");
        assert_eq!(answer, i.to_string());
    }
    let (_victim, result, waited) = tokio::time::timeout(SETTLE, waiting)
        .await
        .expect("the client of the frozen backend hung despite query_timeout = 1")
        .expect("victim task");
    let err = result.expect_err("a query on a frozen backend succeeded");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "query_timeout = 1 ended the query after {waited:?}: {}",
        common::describe_error(&err)
    );

    drop(frozen);
    assert_pool_serves(&cluster, &weir, "after query_timeout").await;
    assert_every_pooled_server_answers(&cluster, &weir, POOL, "after query_timeout").await;
}

/// A postmaster that does not answer: the attempt is abandoned after server_connect_timeout
/// ("closing because: connect timeout"), the client keeps waiting as PgBouncer's do, and the
/// retry after the postmaster is thawed serves it; the transaction in flight is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_postmaster_hits_server_connect_timeout_and_the_client_is_served_after() {
    const POOL: usize = 3;
    let (cluster, weir) = start(POOL, "server_connect_timeout = 1\nserver_login_retry = 1");
    let holder = common::connect(&app_url(&weir)).await;
    holder.simple_query("BEGIN").await.expect("BEGIN");
    scalar(&holder, "SELECT 1").await;
    let newcomer = common::connect(&app_url(&weir)).await;
    assert_eq!(
        count_activity(&cluster, "app", "state = 'idle'"),
        0,
        "precondition: every open server is busy, so the newcomer needs a new one"
    );

    let frozen = Frozen::freeze(postmaster_pid(&cluster));
    let query = tokio::spawn(async move {
        let r = newcomer.simple_query("SELECT 'new server'").await;
        (newcomer, r)
    });
    eventually(
        SETTLE,
        "an attempt abandoned at server_connect_timeout",
        || weir.log().contains("closing because: connect timeout"),
    );
    assert!(
        !query.is_finished(),
        "the waiting client was failed by a connect timeout"
    );
    // The holder's backend runs on; only the postmaster is frozen.
    assert_eq!(scalar(&holder, "SELECT 'holder'").await, "holder");
    holder.simple_query("COMMIT").await.expect("COMMIT");

    drop(frozen);
    let (_newcomer, answer) = tokio::time::timeout(SETTLE, query)
        .await
        .expect("the waiting client was not served after the postmaster was thawed")
        .expect("query task");
    answer.unwrap_or_else(|e| panic!("waiting client: {}", common::describe_error(&e)));
    assert_pool_serves(&cluster, &weir, "after the postmaster was thawed").await;
}

// ---------------------------------------------------------------------------------------------
// 4. A client killed mid-transaction and mid-COPY
// ---------------------------------------------------------------------------------------------

/// After a client holding the only server vanished: PostgreSQL has no transaction or COPY
/// left open, the client's rows were not committed, and the next client is served.
async fn assert_vanished_client_left_nothing(cluster: &PgCluster, weir: &Weir) {
    eventually(SETTLE, "no idle-in-transaction server", || {
        idle_in_transaction(cluster) == 0
    });
    eventually(SETTLE, "no COPY still running", || {
        count_activity(
            cluster,
            "app",
            "query LIKE 'COPY marker%' AND state = 'active'",
        ) == 0
    });
    assert_eq!(
        marker_rows(cluster),
        0,
        "the vanished client's rows were committed"
    );
    let next = assert_fresh_client_served(weir, "after the client vanished").await;
    for sql in ["BEGIN", "INSERT INTO marker VALUES (42)", "COMMIT"] {
        next.simple_query(sql).await.expect(sql);
    }
    assert_eq!(marker_rows(cluster), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vanishing_mid_transaction_leaves_no_open_transaction() {
    let (cluster, weir) = start(1, "");
    let mut victim = RawClient::connect(weir.port, "app", APP_PASSWORD, "app").await;
    for sql in ["BEGIN", "INSERT INTO marker VALUES (1)"] {
        let replies = victim.simple_query(sql).await;
        assert!(
            !replies.iter().any(|r| r.error_code().is_some()),
            "{sql}: {replies:?}"
        );
    }
    assert_eq!(idle_in_transaction(&cluster), 1);
    drop(victim);

    assert_vanished_client_left_nothing(&cluster, &weir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vanishing_mid_copy_in_leaves_no_open_copy() {
    let (cluster, weir) = start(1, "");
    let mut frames = Frames::new(raw_login(&weir).await);
    frames
        .stream
        .write_all(&query("COPY marker FROM STDIN"))
        .await
        .expect("send COPY");
    frames.until(b'G').await;
    frames
        .stream
        .write_all(&message(b'd', b"1\n2\n3\n"))
        .await
        .expect("send CopyData");
    wait_for_backend(
        &cluster,
        "state = 'active' AND query LIKE 'COPY marker%'",
        "the COPY to run",
    );
    drop(frames);

    assert_vanished_client_left_nothing(&cluster, &weir).await;
}

// ---------------------------------------------------------------------------------------------
// 5. A client that stops reading
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_stops_reading_a_huge_result_keeps_weir_memory_bounded() {
    const POOL: usize = 2;
    const MAX_GROWTH: u64 = 64 << 20;
    let (cluster, weir) = start(POOL, "");
    let bystander = common::connect(&app_url(&weir)).await;
    scalar(&bystander, "SELECT 1").await;
    let mut reader = raw_login(&weir).await;
    let baseline = rss_bytes(weir.pid());
    // About 2 GB of rows, never read.
    reader
        .write_all(&query(
            "SELECT repeat('x', 1000) FROM generate_series(1, 2000000) /* unread */",
        ))
        .await
        .expect("send the query");
    let check_rss = |when: &str| {
        let rss = rss_bytes(weir.pid());
        assert!(
            rss < baseline + MAX_GROWTH,
            "{when}: weir's RSS grew from {} MiB to {} MiB",
            baseline >> 20,
            rss >> 20
        );
    };
    // Once Weir stops reading, the backend blocks writing to it.
    let blocked = "query LIKE '%/* unread */' AND wait_event = 'ClientWrite'";
    eventually(
        Duration::from_secs(30),
        "the backend to block on ClientWrite",
        || {
            check_rss("while the result streamed");
            count_activity(&cluster, "app", blocked) == 1
        },
    );
    for i in 0..20 {
        let answer = tokio::time::timeout(PROMPTLY, scalar(&bystander, &format!("SELECT {i}")))
            .await
            .expect("the bystander hung while another client stopped reading");
        assert_eq!(answer, i.to_string());
        check_rss("while the bystander worked");
    }
    assert_eq!(
        count_activity(&cluster, "app", blocked),
        1,
        "the unread query stopped blocking: Weir kept reading its result"
    );
    check_rss("at the end");

    drop(reader);
    assert_pool_serves(&cluster, &weir, "after the slow reader left").await;
    eventually(SETTLE, "the unread query to end", || {
        count_activity(
            &cluster,
            "app",
            "query LIKE '%/* unread */' AND state = 'active'",
        ) == 0
    });
    assert_every_pooled_server_answers(&cluster, &weir, POOL, "after the slow reader").await;
}

// ---------------------------------------------------------------------------------------------
// 6. A thousand clients at once
// ---------------------------------------------------------------------------------------------

/// Raises this process's soft RLIMIT_NOFILE to at least `wanted` (up to the hard limit);
/// returns the soft limit now in force. Weir, spawned afterwards, inherits it.
fn raise_nofile_limit(wanted: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        if limit.rlim_cur < wanted {
            limit.rlim_cur = wanted.min(limit.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        }
    }
    limit.rlim_cur
}

/// The soft "Max open files" of a process, from /proc/<pid>/limits.
fn open_files_limit(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read limits");
    limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .expect("Max open files in /proc/<pid>/limits")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_clients_connecting_at_once_are_all_served() {
    const CLIENTS: usize = 1000;
    const POOL: usize = 4;
    // Both ends of every connection live on this machine: 1,000 sockets here, 1,000 in Weir.
    let nofile = raise_nofile_limit(4096);
    assert!(
        nofile >= 2 * CLIENTS as u64,
        "RLIMIT_NOFILE is only {nofile}"
    );
    let (cluster, weir) = start(POOL, "max_client_conn = 1100");
    let weir_nofile = open_files_limit(weir.pid());
    assert!(
        weir_nofile > CLIENTS as u64 + 100,
        "weir may open only {weir_nofile} files"
    );

    let url = app_url(&weir);
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let client = common::try_connect(&url)
                    .await
                    .map_err(|e| format!("client {i} login: {}", common::describe_error(&e)))?;
                let messages = client
                    .simple_query(&format!("SELECT {i}"))
                    .await
                    .map_err(|e| format!("client {i} query: {}", common::describe_error(&e)))?;
                match support::first_value(&messages) {
                    Some(v) if v == i.to_string() => Ok(client),
                    other => Err(format!("client {i}: answer {other:?}")),
                }
            })
        })
        .collect();
    let results = tokio::time::timeout(
        Duration::from_secs(90),
        futures_util::future::join_all(tasks),
    )
    .await
    .expect("1,000 clients were not all served within 90 s");
    let mut clients = Vec::new();
    let mut failures = Vec::new();
    for result in results {
        match result.expect("client task") {
            Ok(client) => clients.push(client),
            Err(e) => failures.push(e),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {CLIENTS} clients failed, e.g.: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    // All 1,000 are still connected at once.
    let pools = show_pools(&weir).await;
    assert_eq!(pools.cl_active + pools.cl_waiting, CLIENTS, "{pools:?}");
    assert!(backends(&cluster, "app") <= POOL);
    assert_eq!(scalar(&clients[CLIENTS - 1], "SELECT 'last'").await, "last");
}

// ---------------------------------------------------------------------------------------------
// 7. max_client_conn
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_beyond_max_client_conn_are_refused_while_admitted_ones_work() {
    const MAX: usize = 4;
    let (_cluster, weir) = start(2, &format!("max_client_conn = {MAX}"));
    let url = app_url(&weir);
    // Weir::start probed the port with a connection of its own; until Weir has seen that one
    // close it may still count it, so the last admission may need a retry.
    let mut admitted = Vec::new();
    let deadline = Instant::now() + PROMPTLY;
    while admitted.len() < MAX {
        match common::try_connect(&url).await {
            Ok(client) => admitted.push(client),
            Err(e) if db_message(&e).contains("max_client_conn") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("client {}: {}", admitted.len(), common::describe_error(&e)),
        }
    }

    let refused = futures_util::future::join_all((0..10).map(|_| common::try_connect(&url)));
    let working = futures_util::future::join_all(
        admitted
            .iter()
            .enumerate()
            .map(|(i, c)| async move { scalar(c, &format!("SELECT {i}")).await }),
    );
    let (refused, answers) = tokio::time::timeout(SETTLE, async { tokio::join!(refused, working) })
        .await
        .expect("refusing or serving clients hung");
    for result in refused {
        let err = expect_sqlstate(result, "08P01", "a client beyond max_client_conn");
        assert_eq!(
            db_message(&err),
            "no more connections allowed (max_client_conn)"
        );
    }
    let expected: Vec<String> = (0..MAX).map(|i| i.to_string()).collect();
    assert_eq!(answers, expected);
    for (i, client) in admitted.iter().enumerate() {
        assert_eq!(
            scalar(client, &format!("SELECT 'again {i}'")).await,
            format!("again {i}")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 8. Misbehaving clients on a pool of one
// ---------------------------------------------------------------------------------------------

/// Writes `bytes` and closes the socket; write errors are expected (Weir may hang up first).
async fn send_and_close(mut stream: TcpStream, bytes: &[u8]) {
    let _ = stream.write_all(bytes).await;
    let _ = stream.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_extended_messages_then_disconnect_leave_the_pool_usable() {
    let (cluster, weir) = start(1, "");
    let mut rng = StdRng::seed_from_u64(8);
    let mut stream = raw_login(&weir).await;
    let frames = [
        message(b'E', &garbage(&mut rng, 33)),
        message(b'X', &garbage(&mut rng, 19)),
        message(b'P', &garbage(&mut rng, 24)),
        frame(b'D', 0, &[]),
    ];
    for bytes in frames {
        let _ = stream.write_all(&bytes).await;
        // Pacing, not synchronisation: each frame must reach Weir as a read of its own, as
        // from a client writing them one by one (sent in one write, the bug hides). Weir
        // answers none of them, so there is no reply to wait for.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(stream);

    assert_pool_serves(&cluster, &weir, "after garbage E, X, P, D").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_message_lengths_get_08p01_and_close() {
    let (cluster, weir) = start(1, "");
    for declared in [3, 0, -1, (1 << 30) + 5, i32::MAX] {
        let mut frames = Frames::new(raw_login(&weir).await);
        let _ = frames
            .stream
            .write_all(&frame(b'Q', declared, b"SELECT 1\0"))
            .await;
        let answer = tokio::time::timeout(PROMPTLY, async {
            let mut seen = Vec::new();
            loop {
                match frames.next().await {
                    Ok(Some(msg)) => seen.push(msg),
                    Ok(None) | Err(_) => return seen,
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("length {declared}: the connection stayed open"));
        let errors: Vec<String> = answer
            .iter()
            .filter(|(tag, _)| *tag == b'E')
            .map(|(_, body)| sqlstate(body))
            .collect();
        assert_eq!(
            errors,
            ["08P01"],
            "length {declared}: expected one ErrorResponse 08P01 before the close, got {:?}",
            answer.iter().map(|(t, _)| *t as char).collect::<String>()
        );
        assert_pool_serves(&cluster, &weir, &format!("after length {declared}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_in_the_middle_of_a_message_leaves_the_pool_usable() {
    let (cluster, weir) = start(1, "");
    // A Query whose header promises 40 body bytes, of which 20 arrive.
    let stream = raw_login(&weir).await;
    let body = b"SELECT 'half a message', 1234567890\0\0\0\0\0";
    send_and_close(stream, &frame(b'Q', 44, &body[..20])).await;
    assert_pool_serves(&cluster, &weir, "after half a Query").await;

    // The same in the extended protocol, after a complete Parse was sent.
    let stream = raw_login(&weir).await;
    let mut bytes = message(b'P', b"\0SELECT 1\0\0\0");
    bytes.extend(&frame(b'B', 40, b"\0\0\0\0\0\0")[..]);
    send_and_close(stream, &bytes).await;
    assert_pool_serves(&cluster, &weir, "after half a Bind").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_during_a_running_query_leaves_the_pool_usable() {
    let (cluster, weir) = start(1, "");
    let mut stream = raw_login(&weir).await;
    stream
        .write_all(&query("SELECT pg_sleep(30) /* abandoned */"))
        .await
        .expect("send pg_sleep");
    wait_for_backend(
        &cluster,
        "state = 'active' AND query LIKE '%/* abandoned */'",
        "pg_sleep to run",
    );
    drop(stream);

    assert_pool_serves(&cluster, &weir, "after a client left during pg_sleep").await;
}

/// Frame types a random session draws from.
const RANDOM_TAGS: &[u8] = b"QPBEDSHCdcfXp";

/// One random frame: a tag from `RANDOM_TAGS`, a short random body, and a declared length
/// that is usually right but sometimes too short, negative, huge, or longer than the body.
fn random_frame(rng: &mut StdRng) -> Vec<u8> {
    let tag = RANDOM_TAGS[rng.gen_range(0..RANDOM_TAGS.len())];
    let body_len = rng.gen_range(0..48);
    let body = garbage(rng, body_len);
    let right = body.len() as i32 + 4;
    let declared = match rng.gen_range(0..10) {
        0 => rng.gen_range(0..4),
        1 => -rng.gen_range(1..=i32::MAX),
        2 => rng.gen_range((1 << 30) + 1..=i32::MAX),
        3 => right + rng.gen_range(1..64),
        _ => right,
    };
    frame(tag, declared, &body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_frame_sessions_leave_the_pool_usable() {
    const SESSIONS: u64 = 150;
    let (cluster, mut weir) = start(1, "");
    for seed in 0..SESSIONS {
        let mut rng = StdRng::seed_from_u64(seed);
        let frames: Vec<u8> = (0..rng.gen_range(1..8))
            .flat_map(|_| random_frame(&mut rng))
            .collect();
        let stream = raw_login(&weir).await;
        send_and_close(stream, &frames).await;
    }
    assert_weir_running(&mut weir);
    assert_pool_serves(&cluster, &weir, "after 150 random-frame sessions").await;
    eventually(SETTLE, "at most one server for a pool of one", || {
        backends(&cluster, "app") <= 1
    });
    assert_weir_running(&mut weir);
}
