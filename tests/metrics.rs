//! Prometheus metrics at `http://stats_addr:stats_port/metrics`: the series README.md
//! documents exist with the right types and labels, histogram counts equal the transactions
//! and round trips run, the queue-depth gauge follows clients waiting for a server, and failed
//! checkouts count as errors.

#[path = "core_support.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use support::common::{self, eventually, free_port, Weir};
use support::{app_cluster, app_config, app_url, expect_sqlstate, scalar};

/// The labels of the pool of database `app` for user `app`.
const APP_POOL: &[(&str, &str)] = &[
    ("database", "app"),
    ("user", "app"),
    ("shard", "0"),
    ("role", "primary"),
];

/// How long metrics get to catch up (the sampler runs every second).
const CATCH_UP: Duration = Duration::from_secs(10);

/// Weir in front of a fresh `app` cluster with /metrics on a port of its own.
fn start(general: &str) -> (support::common::PgCluster, Weir, u16) {
    let cluster = app_cluster();
    let stats_port = free_port();
    let weir = Weir::start(&app_config(
        cluster.port,
        &format!("{general}\nstats_port = {stats_port}"),
    ));
    eventually(CATCH_UP, "the metrics endpoint to answer", || {
        scrape(stats_port).is_ok()
    });
    (cluster, weir, stats_port)
}

/// GET /metrics over plain HTTP/1.1; the body, or why there is none.
fn scrape(port: u16) -> Result<String, String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| format!("read: {e}"))?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no header end in {response:?}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("status: {head}"));
    }
    Ok(body.to_string())
}

fn scrape_ok(port: u16) -> String {
    scrape(port).unwrap_or_else(|e| panic!("scrape /metrics: {e}"))
}

/// The value of the series `name` whose labels include all of `labels`.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, v) = line.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, "}"));
            let have = rest.strip_suffix('}')?;
            let matches = n == name
                && labels
                    .iter()
                    .all(|(k, val)| have.split(',').any(|kv| kv == format!("{k}=\"{val}\"")));
            matches.then(|| v.parse().ok()).flatten()
        })
}

/// `value` for the app pool, panicking with the scrape if the series is missing.
fn app_value(text: &str, name: &str) -> f64 {
    value(text, name, APP_POOL).unwrap_or_else(|| panic!("no {name} for the app pool in:\n{text}"))
}

fn app_bucket(text: &str, name: &str, le: &str) -> f64 {
    let mut labels = APP_POOL.to_vec();
    labels.push(("le", le));
    value(text, &format!("{name}_bucket"), &labels)
        .unwrap_or_else(|| panic!("no {name} bucket le={le} in:\n{text}"))
}

fn assert_type(text: &str, name: &str, kind: &str) {
    assert!(
        text.lines().any(|l| l == format!("# TYPE {name} {kind}")),
        "no `# TYPE {name} {kind}` in:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrape_shows_every_series_with_counts_matching_the_transactions_run() {
    let (_cluster, weir, stats_port) = start("default_pool_size = 2");
    const CLIENTS: usize = 4;
    const PER_CLIENT: usize = 10;
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let url = app_url(&weir);
        tasks.push(tokio::spawn(async move {
            let client = common::connect(&url).await;
            for i in 0..PER_CLIENT {
                assert_eq!(
                    scalar(&client, &format!("SELECT {c} * 100 + {i}")).await,
                    (c * 100 + i).to_string()
                );
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    // One explicit transaction: three round trips, one transaction.
    let client = common::connect(&app_url(&weir)).await;
    for sql in ["BEGIN", "SELECT 1", "COMMIT"] {
        client.simple_query(sql).await.expect(sql);
    }
    let transactions = (CLIENTS * PER_CLIENT + 1) as f64;
    let round_trips = (CLIENTS * PER_CLIENT + 3) as f64;

    let mut text = String::new();
    eventually(
        CATCH_UP,
        "counters and histograms to count every transaction",
        || {
            text = scrape_ok(stats_port);
            value(&text, "weir_pool_transactions_total", APP_POOL) == Some(transactions)
                && value(
                    &text,
                    "weir_pool_transaction_duration_seconds_count",
                    APP_POOL,
                ) == Some(transactions)
                && value(&text, "weir_pool_servers_active", APP_POOL) == Some(0.0)
        },
    );

    // Histograms: counts as run, cumulative buckets ending in +Inf = count, a positive sum.
    let xact = "weir_pool_transaction_duration_seconds";
    assert_type(&text, xact, "histogram");
    assert_eq!(app_bucket(&text, xact, "+Inf"), transactions);
    assert!(app_bucket(&text, xact, "0.001") <= app_bucket(&text, xact, "120"));
    assert!(app_value(&text, &format!("{xact}_sum")) > 0.0);
    let query = "weir_pool_query_duration_seconds";
    assert_type(&text, query, "histogram");
    assert_eq!(app_value(&text, &format!("{query}_count")), round_trips);
    assert!(app_value(&text, &format!("{query}_sum")) > 0.0);
    let wait = "weir_pool_client_wait_seconds";
    assert_type(&text, wait, "histogram");
    // Every checkout waits (0 s when a server is idle); logins may check out one more.
    assert!(app_value(&text, &format!("{wait}_count")) >= transactions);

    // Counters.
    for name in [
        "weir_pool_transactions_total",
        "weir_pool_queries_total",
        "weir_pool_received_bytes_total",
        "weir_pool_sent_bytes_total",
        "weir_pool_errors_total",
        "weir_pool_server_connects_total",
    ] {
        assert_type(&text, name, "counter");
    }
    assert_eq!(app_value(&text, "weir_pool_queries_total"), round_trips);
    assert!(app_value(&text, "weir_pool_received_bytes_total") > 0.0);
    assert!(app_value(&text, "weir_pool_sent_bytes_total") > 0.0);
    let connects = app_value(&text, "weir_pool_server_connects_total");
    assert!(
        (1.0..=2.0).contains(&connects),
        "{connects} server connects"
    );
    assert_eq!(app_value(&text, "weir_pool_errors_total"), 0.0);

    // Gauges, all at rest now: the servers are idle and nobody waits.
    for name in [
        "weir_pool_clients_active",
        "weir_pool_clients_waiting",
        "weir_pool_servers_active",
        "weir_pool_servers_idle",
        "weir_pool_servers_used",
        "weir_pool_servers_login",
        "weir_pool_maxwait_seconds",
        "weir_clients_connected",
    ] {
        assert_type(&text, name, "gauge");
    }
    assert_eq!(app_value(&text, "weir_pool_clients_waiting"), 0.0);
    assert_eq!(app_value(&text, "weir_pool_clients_active"), 0.0);
    assert_eq!(app_value(&text, "weir_pool_maxwait_seconds"), 0.0);
    assert_eq!(app_value(&text, "weir_pool_servers_login"), 0.0);
    assert_eq!(app_value(&text, "weir_pool_servers_idle"), connects);
    assert!(value(&text, "weir_clients_connected", &[]).is_some_and(|n| n >= 1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_gauge_follows_the_queue_for_a_full_pool() {
    let (_cluster, weir, stats_port) =
        start("default_pool_size = 1\nreserve_pool_size = 0\nquery_wait_timeout = 60");
    let holder = common::connect(&app_url(&weir)).await;
    holder.simple_query("BEGIN").await.expect("BEGIN");
    const QUEUED: usize = 3;
    let mut waiting = Vec::new();
    for i in 0..QUEUED {
        let client = common::connect(&app_url(&weir)).await;
        waiting.push(tokio::spawn(async move {
            scalar(&client, &format!("SELECT {i}")).await
        }));
    }

    let mut text = String::new();
    eventually(CATCH_UP, "clients_waiting to show the queue", || {
        text = scrape_ok(stats_port);
        value(&text, "weir_pool_clients_waiting", APP_POOL) == Some(QUEUED as f64)
            && value(&text, "weir_pool_maxwait_seconds", APP_POOL).is_some_and(|s| s > 0.0)
    });
    assert_eq!(app_value(&text, "weir_pool_clients_active"), 1.0);
    assert_eq!(app_value(&text, "weir_pool_servers_active"), 1.0);
    assert_eq!(app_value(&text, "weir_pool_servers_idle"), 0.0);

    holder.simple_query("COMMIT").await.expect("COMMIT");
    for (i, task) in waiting.into_iter().enumerate() {
        assert_eq!(task.await.expect("waiting client"), i.to_string());
    }
    eventually(CATCH_UP, "the queue to drain", || {
        text = scrape_ok(stats_port);
        value(&text, "weir_pool_clients_waiting", APP_POOL) == Some(0.0)
            && value(&text, "weir_pool_maxwait_seconds", APP_POOL) == Some(0.0)
    });
    // The queued clients waited a measurable time: not all in the lowest bucket.
    let wait = "weir_pool_client_wait_seconds";
    assert!(
        app_bucket(&text, wait, "0.00005") < app_value(&text, &format!("{wait}_count")),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_wait_timeout_counts_as_an_error() {
    let (_cluster, weir, stats_port) =
        start("default_pool_size = 1\nreserve_pool_size = 0\nquery_wait_timeout = 1");
    let holder = common::connect(&app_url(&weir)).await;
    holder.simple_query("BEGIN").await.expect("BEGIN");
    let late = common::connect(&app_url(&weir)).await;
    expect_sqlstate(
        late.simple_query("SELECT 1").await,
        "08P01",
        "a client waiting past query_wait_timeout",
    );
    eventually(CATCH_UP, "errors_total to count the timeout", || {
        value(&scrape_ok(stats_port), "weir_pool_errors_total", APP_POOL) == Some(1.0)
    });
    holder.simple_query("COMMIT").await.expect("COMMIT");
}

/// Before any client: `weir_up`, `weir_build_info` and each configured database's pool size,
/// server cap, queue depth and PAUSE state exist (an idle pod exports what an autoscaler and
/// a dashboard read), and PAUSE shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_weir_exports_up_build_info_and_configured_databases() {
    let (_cluster, weir, stats_port) =
        start("default_pool_size = 7\nmax_db_connections = 9\nadmin_users = [\"app\"]");
    eventually(CATCH_UP, "the database series to appear", || {
        scrape(stats_port).is_ok_and(|t| value(&t, "weir_database_pool_size", &[]).is_some())
    });
    let text = scrape_ok(stats_port);
    assert_eq!(value(&text, "weir_up", &[]), Some(1.0), "{text}");
    assert_eq!(value(&text, "weir_build_info", &[]), Some(1.0), "{text}");
    assert!(text.contains("weir_build_info{version=\""), "{text}");
    let db = [("database", "app")];
    assert_eq!(
        value(&text, "weir_database_pool_size", &db),
        Some(7.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "weir_database_max_connections", &db),
        Some(9.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "weir_database_clients_waiting", &db),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "weir_clients_waiting", &[]),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "weir_database_paused", &db),
        Some(0.0),
        "{text}"
    );
    assert!(
        !text.contains("weir_pool_clients_waiting{"),
        "a pool series before any client: {text}"
    );

    let console =
        support::common::connect(&weir.url("app", support::APP_PASSWORD, "pgbouncer")).await;
    console.simple_query("PAUSE app").await.expect("PAUSE");
    eventually(CATCH_UP, "weir_database_paused to show the PAUSE", || {
        scrape(stats_port).is_ok_and(|t| value(&t, "weir_database_paused", &db) == Some(1.0))
    });
}
