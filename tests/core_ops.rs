//! Operating Weir: SIGHUP reloads (good and bad configs), SIGINT's graceful shutdown, SIGTERM's
//! wait for clients (a second one, or SIGQUIT, exits at once), and config errors at startup
//! and from `weir --check`.

#[path = "core_support.rs"]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::common::{self, config_with_listen, eventually, weir_bin, ConfigFormat, Weir};
use support::{app_cluster, app_cluster_and_weir, app_config, app_url, count_activity, scalar};

/// Waits until Weir's log has a line containing `text` (after a signal was sent).
fn wait_for_log(weir: &Weir, text: &str) {
    eventually(
        Duration::from_secs(10),
        &format!("weir log: {text}"),
        || weir.log().contains(text),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reload_moves_the_database_to_another_cluster() {
    let starts = [
        std::thread::spawn(app_cluster),
        std::thread::spawn(app_cluster),
    ];
    let [old, new] = starts.map(|t| t.join().expect("cluster start"));
    let general = "default_pool_size = 2\nquery_wait_timeout = 5";
    let weir = Weir::start(&app_config(old.port, general));
    let existing = common::connect(&app_url(&weir)).await;
    assert_eq!(scalar(&existing, "SHOW port").await, old.port.to_string());

    weir.rewrite_config(&app_config(new.port, general));
    weir.signal(libc::SIGHUP);
    wait_for_log(&weir, "configuration reloaded");

    let newcomer = common::connect(&app_url(&weir)).await;
    assert_eq!(scalar(&newcomer, "SHOW port").await, new.port.to_string());
    // The connected client keeps working; as in PgBouncer its next transaction goes to the
    // database's new address.
    assert_eq!(scalar(&existing, "SHOW port").await, new.port.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reload_applies_a_larger_pool_size() {
    let (cluster, weir) = app_cluster_and_weir(
        "default_pool_size = 1\nreserve_pool_size = 0\nquery_wait_timeout = 2",
    );
    let holder = common::connect(&app_url(&weir)).await;
    let other = common::connect(&app_url(&weir)).await;
    holder.simple_query("BEGIN").await.expect("BEGIN");

    weir.rewrite_config(&app_config(
        cluster.port,
        "default_pool_size = 2\nreserve_pool_size = 0\nquery_wait_timeout = 2",
    ));
    weir.signal(libc::SIGHUP);
    wait_for_log(&weir, "configuration reloaded");

    // With the old pool of one this would wait for query_wait_timeout and fail.
    let started = Instant::now();
    assert_eq!(
        scalar(&other, "SELECT 'second server'").await,
        "second server"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    holder
        .simple_query("COMMIT")
        .await
        .expect("COMMIT in the old pool");
    assert_eq!(scalar(&holder, "SELECT 'holder'").await, "holder");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_an_invalid_config_keeps_the_running_one() {
    let (cluster, weir) = app_cluster_and_weir("default_pool_size = 2");
    let existing = common::connect(&app_url(&weir)).await;

    weir.rewrite_config(&app_config(cluster.port, "default_pool_size = 0"));
    weir.signal(libc::SIGHUP);
    wait_for_log(&weir, "reload failed");

    assert_eq!(scalar(&existing, "SELECT 1").await, "1");
    let newcomer = common::connect(&app_url(&weir)).await;
    assert_eq!(scalar(&newcomer, "SELECT 2").await, "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_lets_an_open_transaction_commit_then_exits_zero() {
    let (cluster, mut weir) = app_cluster_and_weir("default_pool_size = 2");
    let client = common::connect(&app_url(&weir)).await;
    client
        .simple_query("CREATE TABLE done (n int)")
        .await
        .expect("create table");
    client.simple_query("BEGIN").await.expect("BEGIN");
    client
        .simple_query("INSERT INTO done VALUES (1)")
        .await
        .expect("insert");

    let sleeper = tokio::spawn(async move {
        let result = client.simple_query("SELECT pg_sleep(1)").await;
        (client, result)
    });
    eventually(Duration::from_secs(5), "pg_sleep to run", || {
        count_activity(
            &cluster,
            "app",
            "state = 'active' AND query LIKE '%pg_sleep(1)%'",
        ) == 1
    });
    weir.signal(libc::SIGINT);

    let (client, slept) = sleeper.await.expect("sleeper task");
    slept.unwrap_or_else(|e| panic!("pg_sleep after SIGINT: {}", common::describe_error(&e)));
    client
        .simple_query("COMMIT")
        .await
        .unwrap_or_else(|e| panic!("COMMIT after SIGINT: {}", common::describe_error(&e)));
    assert_eq!(cluster.psql("app", "SELECT count(*) FROM done"), "1");

    let status = weir
        .wait_exit(Duration::from_secs(10))
        .expect("weir still running 10 s after its last transaction ended");
    assert!(status.success(), "weir exited with {status} after SIGINT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_for_clients_and_a_second_one_exits_promptly() {
    let (_cluster, mut weir) = app_cluster_and_weir("default_pool_size = 2");
    let client = common::connect(&app_url(&weir)).await;
    client.simple_query("BEGIN").await.expect("BEGIN");

    // As PgBouncer 1.23+: SIGTERM is SHUTDOWN WAIT_FOR_CLIENTS. The connected client goes on…
    weir.signal(libc::SIGTERM);
    client
        .simple_query("SELECT 1")
        .await
        .expect("a connected client is still served after SIGTERM");
    // …a new one is turned away (the listener is closed)…
    let mut refused = false;
    for _ in 0..100 {
        if common::try_connect(&app_url(&weir)).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "new clients were still let in after SIGTERM");
    assert!(
        weir.wait_exit(Duration::from_millis(300)).is_none(),
        "exited with a client connected"
    );
    // …and a second SIGTERM exits at once.
    weir.signal(libc::SIGTERM);
    let status = weir.wait_exit(Duration::from_secs(3));
    assert!(
        status.is_some(),
        "weir still running 3 s after a second SIGTERM"
    );
    assert!(client.simple_query("SELECT 1").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_when_the_last_client_leaves_and_sigquit_exits_at_once() {
    let (_cluster, mut weir) = app_cluster_and_weir("default_pool_size = 2");
    let client = common::connect(&app_url(&weir)).await;
    client.simple_query("SELECT 1").await.expect("SELECT 1");
    weir.signal(libc::SIGTERM);
    client
        .simple_query("SELECT 1")
        .await
        .expect("served after SIGTERM");
    drop(client);
    let status = weir.wait_exit(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "weir did not exit 0 once its last client left: {status:?}"
    );

    let (_cluster, mut weir) = app_cluster_and_weir("default_pool_size = 2");
    let client = common::connect(&app_url(&weir)).await;
    client.simple_query("BEGIN").await.expect("BEGIN");
    weir.signal(libc::SIGQUIT);
    let status = weir.wait_exit(Duration::from_secs(3));
    assert!(status.is_some(), "weir still running 3 s after SIGQUIT");
}

/// The 1-based line of `key = ...` in `config` as Weir receives it (with listen settings added).
fn line_in_effective_config(config: &str, key: &str) -> usize {
    config_with_listen(ConfigFormat::Toml, config, 1)
        .lines()
        .position(|l| l.trim_start().starts_with(&format!("{key} =")))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("{key} not in config"))
}

/// Asserts that `log` names `key` and the line it is on.
fn assert_names_key_and_line(log: &str, key: &str, line: usize) {
    assert!(log.contains(key), "the error does not name {key}:\n{log}");
    assert!(
        log.contains(&format!("line {line}")) || log.contains(&format!(":{line}:")),
        "the error does not name line {line}:\n{log}"
    );
}

#[test]
fn config_errors_stop_startup_naming_key_and_line() {
    let cases = [
        (
            "[weir]\ndefault_pool_size = 2\nbogus_key = 1\n",
            "bogus_key",
        ),
        (
            "[weir]\nauth_type = \"md5\"\ndefault_pool_size = 0\n",
            "default_pool_size",
        ),
        (
            "[weir]\ndefault_pool_size = 2\n\n[databases.app]\nhots = \"127.0.0.1\"\n",
            "hots",
        ),
    ];
    for (config, key) in cases {
        let (status, log) = Weir::start_expect_failure(config);
        assert!(!status.success(), "weir accepted {key}: {status}\n{log}");
        assert_names_key_and_line(&log, key, line_in_effective_config(config, key));
    }
}

#[test]
fn check_flag_validates_a_config_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let good = dir.path().join("good.toml");
    std::fs::write(&good, app_config(5432, "default_pool_size = 3")).expect("write config");
    let check = |path: &std::path::Path| {
        Command::new(weir_bin())
            .arg("--check")
            .arg(path)
            .output()
            .expect("run weir --check")
    };
    let out = check(&good);
    assert!(
        out.status.success(),
        "weir --check on a valid file: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The effective config comes out as TOML that checks again, with the value in force.
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stdout.contains("default_pool_size = 3"), "{stdout}");
    assert!(
        stdout.contains("server_login_retry = "),
        "defaults listed too: {stdout}"
    );
    let again = dir.path().join("again.toml");
    std::fs::write(&again, &stdout).expect("write rendered config");
    let out = check(&again);
    assert!(
        out.status.success(),
        "weir --check on its own output: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );

    // What start would fail on fails --check too: an address that does not resolve.
    let unresolvable = dir.path().join("unresolvable.toml");
    std::fs::write(
        &unresolvable,
        app_config(5432, "listen_addr = \"no-such-host.invalid\""),
    )
    .expect("write config");
    let out = check(&unresolvable);
    assert!(
        !out.status.success(),
        "weir --check accepted an unresolvable listen_addr"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no-such-host.invalid"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = dir.path().join("bad.toml");
    let text = "[weir]\n\ndefault_pool_size = 0\n";
    std::fs::write(&bad, text).expect("write config");
    let out = check(&bad);
    assert!(
        !out.status.success(),
        "weir --check accepted default_pool_size = 0"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_names_key_and_line(&stderr, "default_pool_size", 3);
}

/// Sends `sig` to `pid`.
fn kill(pid: i32, sig: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill {pid} {sig}");
}

/// The next sd_notify datagram, as text.
fn next_notification(sock: &std::os::unix::net::UnixDatagram, what: &str) -> String {
    let mut buf = [0u8; 512];
    let n = sock
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no sd_notify message ({what}): {e}"));
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// systemd `Type=notify`: READY=1 once Weir listens, RELOADING=1 (with MONOTONIC_USEC) then
/// READY=1 around a SIGHUP reload, STOPPING=1 when a shutdown begins.
#[test]
fn sd_notify_reports_ready_reloading_and_stopping() {
    let cluster = app_cluster();
    let dir = tempfile::tempdir().expect("temp dir");
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    let port = common::free_port();
    let config = dir.path().join("weir.toml");
    std::fs::write(
        &config,
        config_with_listen(ConfigFormat::Toml, &app_config(cluster.port, ""), port),
    )
    .expect("write config");
    let mut child = Command::new(weir_bin())
        .arg(&config)
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn weir");
    let pid = i32::try_from(child.id()).expect("pid");

    let ready = next_notification(&sock, "start");
    assert!(ready.contains("READY=1"), "{ready}");
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("READY=1 came before listening");

    kill(pid, libc::SIGHUP);
    let reloading = next_notification(&sock, "reload");
    assert!(
        reloading.contains("RELOADING=1") && reloading.contains("MONOTONIC_USEC="),
        "{reloading}"
    );
    let ready = next_notification(&sock, "after the reload");
    assert!(ready.contains("READY=1"), "{ready}");

    kill(pid, libc::SIGTERM);
    let stopping = next_notification(&sock, "shutdown");
    assert!(stopping.contains("STOPPING=1"), "{stopping}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("try_wait").is_none() {
        assert!(
            Instant::now() < deadline,
            "weir still running after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20)); // polling interval
    }
}

/// `-d` as PgBouncer's: the parent exits 0 only once the daemon listens (so a client may
/// connect at once), and with the daemon's failure as its status when it cannot start.
#[test]
fn daemon_parent_returns_once_the_child_listens_or_with_its_failure() {
    let cluster = app_cluster();
    let dir = tempfile::tempdir().expect("temp dir");
    let port = common::free_port();
    let pidfile = dir.path().join("weir.pid");
    let general = format!("pidfile = \"{}\"", pidfile.display());
    let config = dir.path().join("weir.toml");
    std::fs::write(
        &config,
        config_with_listen(
            ConfigFormat::Toml,
            &app_config(cluster.port, &general),
            port,
        ),
    )
    .expect("write config");
    let run = |config: &std::path::Path| {
        Command::new(weir_bin())
            .arg("-d")
            .arg(config)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("run weir -d")
    };
    let status = run(&config);
    assert!(status.success(), "weir -d exited with {status}");
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("weir -d returned before listening");
    let daemon: i32 = std::fs::read_to_string(&pidfile)
        .expect("pidfile")
        .trim()
        .parse()
        .expect("pid in pidfile");

    // A second daemon on the same port cannot listen: the parent says so.
    let second = dir.path().join("second.toml");
    std::fs::write(
        &second,
        config_with_listen(ConfigFormat::Toml, &app_config(cluster.port, ""), port),
    )
    .expect("write config");
    let status = run(&second);
    kill(daemon, libc::SIGQUIT);
    assert!(!status.success(), "weir -d on a taken port exited 0");
}
