//! Hostile and clumsy clients of an unsharded database: session state set by statements Weir
//! cannot read whole (large queries, `set_config`) never reaches the next client of the
//! server; messages before login are capped from their header; unknown users cost nothing
//! that stays.

#[path = "core_support.rs"]
mod support;

use std::time::{Duration, Instant};

use support::common::{self, Weir};
use support::{app_cluster_and_weir, app_url, scalar};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One server, so the next client gets the server the last one used.
const ONE_SERVER: &str = "auth_type = \"scram-sha-256\"\n\
                          default_pool_size = 1\n\
                          reserve_pool_size = 0\n\
                          query_wait_timeout = 10";

/// A string literal of `n` bytes.
fn literal(n: usize) -> String {
    format!("'{}'", "x".repeat(n))
}

/// After `sql` (one simple query from one client), a second client of the same single server
/// must see the server's defaults for `search_path` and `statement_timeout`, while the first
/// keeps what it set.
async fn state_stays_with_its_client(weir: &Weir, sql: &str, what: &str) {
    let first = common::connect(&app_url(weir)).await;
    let second = common::connect(&app_url(weir)).await;
    let default_path = scalar(&second, "SHOW search_path").await;
    let default_timeout = scalar(&second, "SHOW statement_timeout").await;
    first
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{what}: {}", common::describe_error(&e)));
    assert_eq!(
        scalar(&second, "SHOW search_path").await,
        default_path,
        "{what}: search_path leaked to another client"
    );
    assert_eq!(
        scalar(&second, "SHOW statement_timeout").await,
        default_timeout,
        "{what}: statement_timeout leaked to another client"
    );
    // The client that set them keeps them in its next transactions, as on PostgreSQL.
    let path = scalar(&first, "SHOW search_path").await;
    let timeout = scalar(&first, "SHOW statement_timeout").await;
    assert!(
        path.contains("leaked_a") || timeout == "4242s",
        "{what}: the client lost its own settings (search_path {path}, statement_timeout {timeout})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_in_large_queries_do_not_leak_to_the_next_client() {
    let (_cluster, weir) = tokio::task::spawn_blocking(|| app_cluster_and_weir(ONE_SERVER))
        .await
        .expect("start");
    // Around the 64 KiB a message may be streamed at, and past the 1 MiB Weir holds to read.
    for size in [60 * 1024, 70 * 1024, 900 * 1024, 2 * 1024 * 1024] {
        let lit = literal(size);
        state_stays_with_its_client(
            &weir,
            &format!("SET search_path = leaked_a; SELECT {lit}"),
            &format!("SET before a {size}-byte literal"),
        )
        .await;
        state_stays_with_its_client(
            &weir,
            &format!("SELECT {lit}; SET statement_timeout = '4242s'"),
            &format!("SET after a {size}-byte literal"),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_config_and_large_state_changes_are_cleaned() {
    let (_cluster, weir) = tokio::task::spawn_blocking(|| app_cluster_and_weir(ONE_SERVER))
        .await
        .expect("start");
    state_stays_with_its_client(
        &weir,
        "SELECT set_config('search_path', 'leaked_a', false)",
        "set_config",
    )
    .await;
    // Session state other than parameters, behind a query too large to read.
    let first = common::connect(&app_url(&weir)).await;
    let lit = literal(2 * 1024 * 1024);
    first
        .simple_query(&format!(
            "LISTEN chan_a; PREPARE leaked_p AS SELECT 1; SELECT pg_advisory_lock(42); \
             CREATE TEMP TABLE leaked_t (x int); SELECT {lit}"
        ))
        .await
        .expect("state behind a large query");
    drop(first);
    let second = common::connect(&app_url(&weir)).await;
    for (sql, want) in [
        ("SELECT count(*) FROM pg_listening_channels()", "0"),
        (
            "SELECT count(*) FROM pg_prepared_statements WHERE from_sql",
            "0",
        ),
        (
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
            "0",
        ),
        (
            "SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()",
            "0",
        ),
    ] {
        assert_eq!(scalar(&second, sql).await, want, "{sql}");
    }
}

/// VmRSS of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

fn startup(user: &str, db: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&196_608i32.to_be_bytes());
    for (k, v) in [("user", user), ("database", db)] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

/// Reads until an ErrorResponse and returns its SQLSTATE; None if the connection ends first
/// or nothing comes within 10 s.
async fn error_code(sock: &mut TcpStream) -> Option<String> {
    tokio::time::timeout(Duration::from_secs(10), read_error_code(sock))
        .await
        .ok()
        .flatten()
}

async fn read_error_code(sock: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while buf.len() >= 5 {
            let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < len + 1 {
                break;
            }
            let msg: Vec<u8> = buf.drain(..len + 1).collect();
            if msg[0] == b'E' {
                let mut fields = msg[5..].split(|&b| b == 0);
                return fields
                    .find(|f| f.first() == Some(&b'C'))
                    .map(|f| String::from_utf8_lossy(&f[1..]).into_owned());
            }
        }
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// True when the peer closed the connection (EOF or reset) within `limit`.
async fn closed_within(sock: &mut TcpStream, limit: Duration) -> bool {
    let mut chunk = [0u8; 1024];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, sock.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_before_login_are_refused_from_their_header() {
    let (_cluster, weir) = tokio::task::spawn_blocking(|| app_cluster_and_weir(ONE_SERVER))
        .await
        .expect("start");
    let addr = format!("127.0.0.1:{}", weir.port);
    let before = rss(weir.pid());
    let mut socks = Vec::new();
    for _ in 0..20 {
        let mut sock = TcpStream::connect(&addr).await.expect("connect");
        sock.write_all(&startup("app", "app"))
            .await
            .expect("startup");
        // A password message declaring 500 MB, then 4 MB of it.
        let mut msg = vec![b'p'];
        msg.extend_from_slice(&(500_000_000i32).to_be_bytes());
        sock.write_all(&msg).await.expect("header");
        let chunk = vec![b'a'; 64 * 1024];
        for _ in 0..64 {
            if sock.write_all(&chunk).await.is_err() {
                break;
            }
        }
        socks.push(sock);
    }
    for sock in &mut socks {
        // The AuthenticationSASL request comes first; then the refusal.
        assert_eq!(error_code(sock).await.as_deref(), Some("08P01"));
        assert!(closed_within(sock, Duration::from_secs(5)).await);
    }
    let grown = rss(weir.pid()).saturating_sub(before);
    assert!(
        grown < 16 << 20,
        "20 clients each sending 4 MB of an oversized password message grew Weir by {grown} bytes"
    );

    // The limit's other side: a password message just under it is read (and is wrong).
    let mut sock = TcpStream::connect(&addr).await.expect("connect");
    sock.write_all(&startup("app", "app"))
        .await
        .expect("startup");
    let body_len = weir::auth::MAX_AUTH_MESSAGE;
    let mut msg = vec![b'p'];
    msg.extend_from_slice(&((body_len + 4) as i32).to_be_bytes());
    msg.extend_from_slice(b"SCRAM-SHA-256\0");
    let data_len = body_len - 14 - 4;
    msg.extend_from_slice(&(data_len as i32).to_be_bytes());
    msg.extend(std::iter::repeat_n(b'n', data_len));
    sock.write_all(&msg)
        .await
        .expect("password message at the limit");
    // Malformed SCRAM (bad GS2 header), not "invalid message length": it was read.
    assert_eq!(error_code(&mut sock).await.as_deref(), Some("08P01"));

    // Declared lengths below 4 before login.
    for bad in [0i32, 3, -1] {
        let mut sock = TcpStream::connect(&addr).await.expect("connect");
        sock.write_all(&startup("app", "app"))
            .await
            .expect("startup");
        let mut msg = vec![b'p'];
        msg.extend_from_slice(&bad.to_be_bytes());
        sock.write_all(&msg).await.expect("header");
        assert!(
            closed_within(&mut sock, Duration::from_secs(5)).await,
            "length {bad}"
        );
    }
    // And Weir still serves.
    let client = common::connect(&app_url(&weir)).await;
    assert_eq!(scalar(&client, "SELECT 1").await, "1");
}

/// One SCRAM login attempt under `user` with a wrong password; it must fail.
async fn failed_login(weir: &Weir, user: &str) {
    let url = weir.url(user, "not-the-password", "app");
    let err = common::try_connect(&url)
        .await
        .err()
        .unwrap_or_else(|| panic!("{user} logged in with a wrong password"));
    assert_eq!(
        err.code().map(|c| c.code()),
        Some("28P01"),
        "{}",
        common::describe_error(&err)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_users_leave_nothing_behind() {
    let (_cluster, weir) = tokio::task::spawn_blocking(|| app_cluster_and_weir(ONE_SERVER))
        .await
        .expect("start");
    // Warm up allocator pools and caches with the same kind of traffic first.
    for i in 0..300 {
        failed_login(&weir, &format!("warmup_{i}_{}", "u".repeat(40))).await;
    }
    let before = rss(weir.pid());
    for i in 0..1500 {
        failed_login(&weir, &format!("nobody_{i}_{}", "u".repeat(40))).await;
    }
    let grown = rss(weir.pid()).saturating_sub(before);
    // 570 bytes a name (the old per-name verifier cache) would be over 800 KB.
    assert!(
        grown < 400 << 10,
        "1500 unknown users grew Weir's RSS by {grown} bytes"
    );
    // The same unknown name is offered the same salt each time, as a known one is.
    let salt = |user: &'static str| {
        let addr = format!("127.0.0.1:{}", weir.port);
        async move {
            let mut sock = TcpStream::connect(&addr).await.expect("connect");
            sock.write_all(&startup(user, "app"))
                .await
                .expect("startup");
            let mut first = b"n,,n=,r=abcdefghijklmnop".to_vec();
            let mut msg = vec![b'p'];
            let body_len = 14 + 4 + first.len();
            msg.extend_from_slice(&((body_len + 4) as i32).to_be_bytes());
            msg.extend_from_slice(b"SCRAM-SHA-256\0");
            msg.extend_from_slice(&(first.len() as i32).to_be_bytes());
            msg.append(&mut first);
            sock.write_all(&msg).await.expect("client-first");
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            loop {
                let n = sock.read(&mut chunk).await.expect("read");
                assert!(n > 0, "closed before server-first");
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).into_owned();
                if let Some(at) = text.find(",s=") {
                    if let Some(end) = text[at..].find(",i=") {
                        return text[at + 3..at + end].to_string();
                    }
                }
            }
        }
    };
    assert_eq!(salt("ghost").await, salt("ghost").await);
    assert_ne!(salt("ghost").await, salt("phantom").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_that_set_state_are_followed_on_every_execution() {
    let (_cluster, weir) = tokio::task::spawn_blocking(|| app_cluster_and_weir(ONE_SERVER))
        .await
        .expect("start");
    let first = common::connect(&app_url(&weir)).await;
    let second = common::connect(&app_url(&weir)).await;
    let default_path = scalar(&second, "SHOW search_path").await;
    let default_timeout = scalar(&second, "SHOW statement_timeout").await;
    // Prepared in one transaction, executed in later ones (Bind/Execute only).
    let set_timeout = first
        .prepare("SET statement_timeout = '4242s'")
        .await
        .expect("prepare SET");
    let set_path = first
        .prepare("SELECT set_config('search_path', 'leaked_a', false)")
        .await
        .expect("prepare set_config");
    assert_eq!(
        scalar(&second, "SHOW statement_timeout").await,
        default_timeout
    );
    for round in 0..2 {
        first.execute(&set_timeout, &[]).await.expect("SET");
        first.query(&set_path, &[]).await.expect("set_config");
        assert_eq!(
            scalar(&second, "SHOW statement_timeout").await,
            default_timeout,
            "round {round}: a prepared SET leaked"
        );
        assert_eq!(
            scalar(&second, "SHOW search_path").await,
            default_path,
            "round {round}: a prepared set_config leaked"
        );
        assert_eq!(scalar(&first, "SHOW statement_timeout").await, "4242s");
        assert!(scalar(&first, "SHOW search_path")
            .await
            .contains("leaked_a"));
    }
}
