//! Drop-in operation for PgBouncer users: an unchanged pgbouncer.ini + userlist.txt, users
//! found with auth_user/auth_query, auth_type = hba, the Unix-socket admin login, and a
//! rolling restart through an so_reuseport pair.

#[path = "core_support.rs"]
mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::common::{self, ConfigFormat, PgCluster, PgOptions, Weir};
use support::{app_cluster, expect_sqlstate, scalar, APP_PASSWORD};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_ini_and_userlist_in_pgbouncer_format_serve_clients() {
    let cluster = app_cluster();
    cluster.create_database("other", "app");
    let md5 = postgres_protocol::password::md5(b"other-secret", "someone");
    // Written as a PgBouncer user would: comments with ';', a key PgBouncer has and Weir
    // does not use, the `*` fallback, and the userlist in its own quoted format.
    let ini = format!(
        ";; pgbouncer.ini\n\
         [databases]\n\
         app = host=127.0.0.1 port={port} dbname=app pool_size=3\n\
         * = host=127.0.0.1 port={port}\n\n\
         [pgbouncer]\n\
         listen_addr = 127.0.0.1\n\
         auth_type = md5\n\
         auth_file = userlist.txt\n\
         pool_mode = transaction\n\
         default_pool_size = 2\n\
         max_client_conn = 100\n\
         pkt_buf = 4096\n\
         admin_users = app\n",
        port = cluster.port
    );
    // app's plain password lets Weir log in to PostgreSQL's scram-sha-256 as app.
    let userlist = format!("\"app\" \"{APP_PASSWORD}\"\n\"someone\" \"{md5}\"\n");
    let weir = Weir::start_with(ConfigFormat::Ini, &ini, &[("userlist.txt", &userlist)]);

    let client = common::connect(&weir.url("app", APP_PASSWORD, "app")).await;
    assert_eq!(scalar(&client, "SELECT current_database()").await, "app");
    assert_eq!(scalar(&client, "SELECT current_user").await, "app");
    // The `*` entry serves a database the file does not list.
    let other = common::connect(&weir.url("app", APP_PASSWORD, "other")).await;
    assert_eq!(scalar(&other, "SELECT current_database()").await, "other");
    // A wrong password is refused as PgBouncer refuses it.
    let wrong = common::try_connect(&weir.url("app", "wrong", "app")).await;
    expect_sqlstate(wrong, "28P01", "wrong password");
    // The unused setting was named in a warning, not silently dropped.
    assert!(
        weir.log().contains("pkt_buf"),
        "no warning about pkt_buf in:\n{}",
        weir.log()
    );
    let check = Command::new(common::weir_bin())
        .arg("--check")
        .arg(&weir.config_path)
        .output()
        .expect("run weir --check");
    assert!(
        check.status.success(),
        "weir --check on pgbouncer.ini: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    // The effective config is printed in the file's own format, and checks again as such.
    let rendered = String::from_utf8_lossy(&check.stdout).into_owned();
    for section in ["[databases]", "[users]", "[pgbouncer]"] {
        assert!(rendered.contains(section), "no {section} in\n{rendered}");
    }
    let again = weir.config_path.with_file_name("rendered.ini");
    std::fs::write(&again, &rendered).expect("write rendered ini");
    let recheck = Command::new(common::weir_bin())
        .arg("--check")
        .arg(&again)
        .output()
        .expect("run weir --check");
    assert!(
        recheck.status.success(),
        "weir --check on its own ini output: {}\n{rendered}",
        String::from_utf8_lossy(&recheck.stderr)
    );
}

/// A cluster with a superuser `auth` (it may read pg_authid) and a login role `dyn` that
/// no Weir config or auth file lists.
fn auth_query_cluster(encryption: &str) -> PgCluster {
    let cluster = PgCluster::start_with(PgOptions {
        hba_method: if encryption == "md5" {
            "md5"
        } else {
            "scram-sha-256"
        }
        .into(),
        password_encryption: encryption.into(),
        ..PgOptions::default()
    });
    cluster.create_superuser("auth", "auth-secret", encryption);
    cluster.create_user("dyn", "dyn-secret", encryption);
    cluster.create_database("app", "dyn");
    cluster
}

fn auth_query_config(auth_type: &str, pg_port: u16) -> String {
    format!(
        "[weir]\nauth_type = \"{auth_type}\"\nauth_user = \"auth\"\ndefault_pool_size = 2\n\n\
         [users.auth]\npassword = \"auth-secret\"\n\n\
         [databases.app]\nhost = \"127.0.0.1\"\nport = {pg_port}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_query_admits_a_scram_user_in_no_auth_file_with_pass_through() {
    let cluster = auth_query_cluster("scram-sha-256");
    let weir = Weir::start(&auth_query_config("scram-sha-256", cluster.port));
    let client = common::connect(&weir.url("dyn", "dyn-secret", "app")).await;
    // Weir logged in to PostgreSQL as dyn without knowing its password (SCRAM pass-through).
    assert_eq!(scalar(&client, "SELECT current_user").await, "dyn");
    let wrong = common::try_connect(&weir.url("dyn", "not-it", "app")).await;
    expect_sqlstate(wrong, "28P01", "dyn with a wrong password");
    let missing = common::try_connect(&weir.url("ghost", "x", "app")).await;
    expect_sqlstate(missing, "28P01", "a user PostgreSQL does not have");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_query_admits_an_md5_user() {
    let cluster = auth_query_cluster("md5");
    let weir = Weir::start(&auth_query_config("md5", cluster.port));
    let client = common::connect(&weir.url("dyn", "dyn-secret", "app")).await;
    assert_eq!(scalar(&client, "SELECT current_user").await, "dyn");
    let wrong = common::try_connect(&weir.url("dyn", "not-it", "app")).await;
    expect_sqlstate(wrong, "28P01", "dyn with a wrong password");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hba_file_picks_the_method_for_each_connection() {
    let cluster = app_cluster();
    cluster.create_user("blocked", "blocked-secret", "scram-sha-256");
    cluster.create_user("easy", "easy-secret", "scram-sha-256");
    let hba = "# pg_hba.conf format\n\
               host  all  blocked  127.0.0.1/32  reject\n\
               host  all  easy     127.0.0.0 255.0.0.0  trust\n\
               host  app  all      0.0.0.0/0     scram-sha-256\n";
    let config = format!(
        "[weir]\nauth_type = \"hba\"\nauth_hba_file = \"hba.conf\"\n\n\
         [users.app]\npassword = \"{APP_PASSWORD}\"\n\
         [users.blocked]\npassword = \"blocked-secret\"\n\
         [users.easy]\npassword = \"easy-secret\"\n\n\
         [databases.app]\nhost = \"127.0.0.1\"\nport = {}\n",
        cluster.port
    );
    let weir = Weir::start_with(ConfigFormat::Toml, &config, &[("hba.conf", hba)]);

    let app = common::connect(&weir.url("app", APP_PASSWORD, "app")).await;
    assert_eq!(scalar(&app, "SELECT current_user").await, "app");
    let wrong = common::try_connect(&weir.url("app", "wrong", "app")).await;
    expect_sqlstate(wrong, "28P01", "app with a wrong password");
    // trust: any password (or none) is accepted.
    let easy = common::connect(&weir.url("easy", "anything", "app")).await;
    assert_eq!(scalar(&easy, "SELECT current_user").await, "easy");
    let blocked = common::try_connect(&weir.url("blocked", "blocked-secret", "app")).await;
    expect_sqlstate(blocked, "28000", "a user the hba file rejects");
}

#[test]
fn own_os_user_logs_in_to_the_admin_console_over_the_unix_socket() {
    let cluster = app_cluster();
    let socket_dir = tempfile::tempdir().expect("socket dir");
    let config = support::app_config(
        cluster.port,
        &format!("unix_socket_dir = \"{}\"", socket_dir.path().display()),
    );
    let weir = Weir::start(&config);
    let socket = socket_dir.path().join(format!(".s.PGSQL.{}", weir.port));
    common::eventually(Duration::from_secs(10), "the Unix socket to appear", || {
        socket.exists()
    });
    // No password: the process's own OS user is trusted on the socket, as in PgBouncer.
    let out = Command::new(common::pg_bin("psql"))
        .args(["-X", "-A", "-t", "-w", "-h"])
        .arg(socket_dir.path())
        .args([
            "-p",
            &weir.port.to_string(),
            "-U",
            "pgbouncer",
            "-d",
            "pgbouncer",
        ])
        .args(["-c", "SHOW VERSION"])
        .env_remove("PGPASSWORD")
        .stdin(Stdio::null())
        .output()
        .expect("run psql");
    let stdout = support::psql_ok(&out, "admin console over the Unix socket");
    assert!(!stdout.is_empty(), "SHOW VERSION answered nothing");
    // Clients use the socket too.
    let out = Command::new(common::pg_bin("psql"))
        .args(["-X", "-A", "-t", "-w", "-h"])
        .arg(socket_dir.path())
        .args(["-p", &weir.port.to_string(), "-U", "app", "-d", "app"])
        .args(["-c", "SELECT current_user"])
        .env("PGPASSWORD", APP_PASSWORD)
        .stdin(Stdio::null())
        .output()
        .expect("run psql");
    assert_eq!(support::psql_ok(&out, "client over the Unix socket"), "app");
}

/// Lets a listener that closes hand its not-yet-accepted connections to the other
/// so_reuseport listener (Linux ≥ 5.14), as the README's rolling-upgrade steps advise.
fn enable_tcp_migrate_req() {
    let _ = std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1");
}

#[test]
fn rolling_restart_through_an_so_reuseport_pair_fails_no_transaction() {
    enable_tcp_migrate_req();
    let cluster = app_cluster();
    let db_url = format!(
        "host=127.0.0.1 port={} user=postgres dbname=app",
        cluster.port
    );
    let init = common::pgbench(&["-i", "-s", "1", "-q", &db_url]);
    assert!(
        init.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    cluster.psql("app", "GRANT SELECT ON ALL TABLES IN SCHEMA public TO app");
    let config = support::app_config(
        cluster.port,
        "so_reuseport = true\nunix_socket_dir = \"\"\ndefault_pool_size = 4",
    );
    let mut old = Weir::start(&config);
    let port = old.port;

    // New connection per transaction (-C): every transaction starts on whichever process
    // the kernel picks, so the old one must finish what it accepted and the new one take over.
    let url = format!("host=127.0.0.1 port={port} user=app dbname=app");
    let bench = std::thread::spawn(move || {
        common::pgbench_env(
            &["-S", "-C", "-c", "8", "-j", "2", "-T", "8", "-n", &url],
            &[("PGPASSWORD", APP_PASSWORD)],
        )
    });
    let new = Weir::start_on_port(&config, port);
    common::eventually(
        Duration::from_secs(10),
        "the new process to serve clients",
        || new.log().contains("login"),
    );
    old.signal(libc::SIGTERM);
    let status = old
        .wait_exit(Duration::from_secs(15))
        .expect("the old process still running 15 s after SIGTERM");
    assert!(status.success(), "old weir exited with {status}");

    let out = bench.join().expect("pgbench thread");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "pgbench through the pair failed\n{stdout}\n{stderr}"
    );
    let processed: u64 = stdout
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("number of transactions actually processed: ")
        })
        .and_then(|v| v.split('/').next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no transaction count in\n{stdout}"));
    assert!(processed > 0, "{stdout}");
    let failed = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("number of failed transactions: "))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    assert_eq!(failed, 0, "{stdout}\n{stderr}");
    assert!(
        !stderr.contains("error"),
        "pgbench reported errors:\n{stderr}"
    );
    // The new process keeps serving on its own.
    let out = support::psql_via_weir(&new, "app", Some(APP_PASSWORD), "app", &["-c", "SELECT 1"]);
    assert_eq!(support::psql_ok(&out, "psql to the new process"), "1");
    new.signal(libc::SIGTERM);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_timeout_cancels_a_long_query_and_closes_its_server() {
    let cluster = app_cluster();
    let weir = Weir::start(&support::app_config(
        cluster.port,
        "query_timeout = 1\ndefault_pool_size = 2",
    ));
    let client = common::connect(&weir.url("app", APP_PASSWORD, "app")).await;
    let started = std::time::Instant::now();
    let err = client
        .simple_query("SELECT pg_sleep(30)")
        .await
        .expect_err("a 30 s query under query_timeout = 1");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the query ran for {:?}",
        started.elapsed()
    );
    assert!(
        common::describe_error(&err).contains("query timeout"),
        "{}",
        common::describe_error(&err)
    );
    // The backend's query was cancelled, not left running.
    common::eventually(Duration::from_secs(10), "pg_sleep to stop", || {
        support::count_activity(&cluster, "app", "query LIKE '%pg_sleep(30)%'") == 0
    });
    // Other clients go on.
    let other = common::connect(&weir.url("app", APP_PASSWORD, "app")).await;
    assert_eq!(scalar(&other, "SELECT 1").await, "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_name_add_host_appends_the_client_address() {
    let cluster = app_cluster();
    let weir = Weir::start(&support::app_config(
        cluster.port,
        "application_name_add_host = true",
    ));
    let url = format!(
        "{} application_name=billing",
        weir.url("app", APP_PASSWORD, "app")
    );
    let client = common::connect(&url).await;
    let name = scalar(&client, "SELECT current_setting('application_name')").await;
    assert!(
        name.starts_with("billing - 127.0.0.1:"),
        "application_name {name:?}"
    );
}

/// `listen_addr` as PgBouncer reads it: a list of addresses and host names, each name
/// resolved to every address it has, so an unchanged pgbouncer.ini listens where it did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_addr_list_with_localhost_listens_on_both_loopbacks() {
    use std::net::ToSocketAddrs;
    let cluster = app_cluster();
    let weir = Weir::start(&support::app_config(
        cluster.port,
        "listen_addr = \"localhost, ::1\"",
    ));
    let mut hosts: Vec<String> = ("localhost", 0)
        .to_socket_addrs()
        .expect("resolve localhost")
        .map(|a| a.ip().to_string())
        .collect();
    hosts.push("::1".into());
    for host in hosts {
        let url = format!(
            "host={host} port={} user=app password={APP_PASSWORD} dbname=app",
            weir.port
        );
        let client = common::try_connect(&url)
            .await
            .unwrap_or_else(|e| panic!("connect to {host}: {}", common::describe_error(&e)));
        assert_eq!(scalar(&client, "SELECT 'served'").await, "served", "{host}");
    }
}

/// `host=/path/to/socket/dir` as libpq and PgBouncer read it: Weir reaches the server through
/// `<dir>/.s.PGSQL.<port>` (peer-auth setups depend on it), and cancels go the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_directory_host_reaches_the_server_over_its_unix_socket() {
    let cluster = app_cluster();
    let config = format!(
        "[weir]\ndefault_pool_size = 2\n\n[users.app]\npassword = \"{APP_PASSWORD}\"\n\n\
         [databases.app]\nhost = \"{}\"\nport = {}\n",
        cluster.socket_dir.display(),
        cluster.port
    );
    let weir = Weir::start(&config);
    let url = support::app_url(&weir);
    let client = common::connect(&url).await;
    assert_eq!(
        scalar(&client, "SELECT (inet_server_addr() IS NULL)::text").await,
        "true",
        "the server connection is not a Unix socket"
    );
    let cancel = client.cancel_token();
    let sleeper = tokio::spawn(async move {
        let r = client.simple_query("SELECT pg_sleep(30)").await;
        (client, r)
    });
    common::eventually(Duration::from_secs(5), "pg_sleep to run", || {
        support::count_activity(&cluster, "app", "query LIKE '%pg_sleep(30)%'") == 1
    });
    cancel
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("send cancel");
    let (_client, result) = tokio::time::timeout(Duration::from_secs(10), sleeper)
        .await
        .expect("the cancel did not reach the server")
        .expect("sleeper task");
    expect_sqlstate(result, "57014", "the cancelled pg_sleep");
}

/// A host list as PgBouncer reads it (`host=a,b`): a host that cannot be resolved or refuses
/// is skipped for the next one; with `load_balance_hosts = disable` Weir keeps to the host
/// that worked (the bad one is tried once), with round-robin each connection takes the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_lists_fail_over_and_load_balance_as_pgbouncer() {
    let cluster = app_cluster();
    let config = format!(
        "[weir]\ndefault_pool_size = 3\n\n[users.app]\npassword = \"{APP_PASSWORD}\"\n\n\
         [databases.app]\nhost = \"no-such-host.invalid,127.0.0.1\"\nport = {port}\n\
         load_balance_hosts = \"disable\"\n\n\
         [databases.rr]\ndbname = \"app\"\nhost = \"127.0.0.1,::1\"\nport = {port}\n",
        port = cluster.port
    );
    let weir = Weir::start(&config);
    // Three transactions at once: three server connections.
    for db in ["app", "rr"] {
        let url = weir.url("app", APP_PASSWORD, db);
        let mut clients = Vec::new();
        for _ in 0..3 {
            let c = common::connect(&url).await;
            c.simple_query("BEGIN").await.expect("BEGIN");
            assert_eq!(scalar(&c, "SELECT 'served'").await, "served", "{db}");
            clients.push(c);
        }
    }
    let log = weir.log();
    assert_eq!(
        log.matches("closing because: server DNS lookup failed")
            .count(),
        1,
        "disable: the unresolvable host was tried more than once\n{log}"
    );
    assert!(
        log.contains("[::1]") || log.contains("::1:"),
        "round-robin never tried the second host\n{log}"
    );
}
