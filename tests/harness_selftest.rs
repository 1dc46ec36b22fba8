//! Tests of the shared test harness itself (tests/common), with PostgreSQL alone: if these
//! fail, every other integration test's failure says nothing about Weir.

mod common;

use std::time::Duration;

use common::{config_with_listen, ConfigFormat, PgCluster, PgOptions};

/// Asserts that `user` can log in to `cluster` directly with `password` and run a query, and
/// that the same user is refused with a wrong password.
async fn assert_password_login(cluster: &PgCluster, user: &str, password: &str) {
    let client = common::connect(&cluster.url(user, password, "postgres")).await;
    let row = client.query_one("SELECT 1", &[]).await.expect("SELECT 1");
    assert_eq!(row.get::<_, i32>(0), 1);

    let refused = common::try_connect(&cluster.url(user, "not-the-password", "postgres")).await;
    let Err(err) = refused else {
        panic!("a wrong password must be refused");
    };
    let code = err.code().map(|c| c.code().to_string());
    assert_eq!(
        code.as_deref(),
        Some("28P01"),
        "expected invalid_password, got {}",
        common::describe_error(&err)
    );
}

fn stored_password_prefix(cluster: &PgCluster, user: &str) -> String {
    cluster.psql(
        "postgres",
        &format!(
            "SELECT split_part(rolpassword, '$', 1) FROM pg_authid WHERE rolname = {}",
            common::quote_literal(user)
        ),
    )
}

#[tokio::test]
async fn md5_hba_accepts_md5_and_scram_stored_passwords() {
    // Under an md5 hba line PostgreSQL accepts both storage formats (SCRAM-stored passwords
    // are then authenticated with SCRAM), so both users log in.
    let cluster = PgCluster::start_with(PgOptions {
        hba_method: "md5".to_string(),
        ..PgOptions::default()
    });
    cluster.create_user("md5_user", "md5 secret", "md5");
    cluster.create_user("scram_user", "it's scram", "scram-sha-256");
    assert!(stored_password_prefix(&cluster, "md5_user").starts_with("md5"));
    assert_eq!(
        stored_password_prefix(&cluster, "scram_user"),
        "SCRAM-SHA-256"
    );

    assert_password_login(&cluster, "md5_user", "md5 secret").await;
    assert_password_login(&cluster, "scram_user", "it's scram").await;
}

#[tokio::test]
async fn scram_hba_accepts_scram_user_and_refuses_md5_stored_one() {
    let cluster = PgCluster::start();
    cluster.create_user("scram_user", "scram-secret", "scram-sha-256");
    cluster.create_user("md5_user", "md5-secret", "md5");

    assert_password_login(&cluster, "scram_user", "scram-secret").await;
    // A scram-sha-256 hba line cannot use an md5-stored password, even the right one.
    let refused = common::try_connect(&cluster.url("md5_user", "md5-secret", "postgres")).await;
    assert!(
        refused.is_err(),
        "md5-stored password under scram hba must be refused"
    );
}

#[test]
fn two_clusters_start_in_parallel() {
    let starts: Vec<_> = (0..2)
        .map(|_| std::thread::spawn(PgCluster::start))
        .collect();
    let clusters: Vec<PgCluster> = starts
        .into_iter()
        .map(|t| t.join().expect("cluster start panicked"))
        .collect();
    assert_ne!(clusters[0].port, clusters[1].port);
    for cluster in &clusters {
        assert_eq!(
            cluster.psql("postgres", "SHOW port"),
            cluster.port.to_string()
        );
        assert_eq!(cluster.psql("postgres", "SELECT 1"), "1");
    }
}

#[test]
fn cluster_directory_is_removed_on_drop() {
    let cluster = PgCluster::start();
    let dir = cluster.dir.clone();
    assert!(dir.join("data").join("PG_VERSION").is_file());
    drop(cluster);
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[test]
fn try_psql_reports_sql_errors() {
    let cluster = PgCluster::start();
    let err = cluster
        .try_psql("postgres", "SELECT * FROM no_such_table")
        .expect_err("query on a missing table must fail");
    assert!(err.contains("no_such_table"), "stderr was: {err}");
}

#[test]
fn database_owner_can_run_pgbench_init_and_select_only() {
    let cluster = PgCluster::start();
    cluster.create_user("bench", "bench-secret", "scram-sha-256");
    cluster.create_database("benchdb", "bench");
    let port = cluster.port.to_string();
    let conn = ["-h", "127.0.0.1", "-p", &port, "-U", "bench", "benchdb"];
    let password = [("PGPASSWORD", "bench-secret")];

    let init: Vec<&str> = ["-i", "-q", "-s", "1"]
        .iter()
        .chain(&conn)
        .copied()
        .collect();
    let out = common::pgbench_env(&init, &password);
    assert!(out.status.success(), "pgbench -i: {out:?}");

    let run: Vec<&str> = ["-S", "-c", "2", "-j", "1", "-t", "50"]
        .iter()
        .chain(&conn)
        .copied()
        .collect();
    let out = common::pgbench_env(&run, &password);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pgbench -S: {out:?}");
    assert!(
        stdout.contains("number of transactions actually processed: 100/100"),
        "{stdout}"
    );
}

#[test]
fn replica_streams_from_primary() {
    let primary = PgCluster::start();
    primary.psql(
        "postgres",
        "CREATE TABLE t (v int); INSERT INTO t VALUES (42)",
    );
    let replica = primary.start_replica();
    assert_ne!(replica.port, primary.port);
    assert_eq!(replica.psql("postgres", "SELECT pg_is_in_recovery()"), "t");

    primary.psql("postgres", "INSERT INTO t VALUES (43)");
    common::eventually(
        Duration::from_secs(20),
        "the replica to replay row 43",
        || {
            replica
                .try_psql("postgres", "SELECT count(*) FROM t")
                .as_deref()
                == Ok("2")
        },
    );
}

#[test]
fn stopped_cluster_restarts_on_the_same_port() {
    let cluster = PgCluster::start();
    cluster.stop();
    assert!(cluster.try_psql("postgres", "SELECT 1").is_err());
    cluster.start_again();
    assert_eq!(cluster.psql("postgres", "SELECT 1"), "1");
}

#[test]
fn free_ports_are_not_handed_out_twice() {
    let ports: std::collections::BTreeSet<u16> = (0..50).map(|_| common::free_port()).collect();
    assert_eq!(ports.len(), 50);
}

#[test]
fn listen_settings_go_right_after_the_weir_header() {
    let text = "# comment\n[weir]\npool_mode = \"session\"\n\n[users.app]\npassword = \"x\"\n";
    assert_eq!(
        config_with_listen(ConfigFormat::Toml, text, 7001),
        "# comment\n[weir]\nlisten_addr = \"127.0.0.1\"\nlisten_port = 7001\n\
         pool_mode = \"session\"\n\n[users.app]\npassword = \"x\"\n"
    );
}

#[test]
fn listen_settings_get_their_own_section_when_there_is_no_weir_header() {
    let text = "[databases.app]\nport = 5432\n";
    assert_eq!(
        config_with_listen(ConfigFormat::Toml, text, 7002),
        "[weir]\nlisten_addr = \"127.0.0.1\"\nlisten_port = 7002\n\n[databases.app]\nport = 5432\n"
    );
}

#[test]
fn listen_port_is_replaced_and_listen_addr_kept() {
    let text =
        "[weir]   # main\nlisten_addr = \"*\"\nlisten_port = 6432\n[databases.app]\nport = 1\n";
    assert_eq!(
        config_with_listen(ConfigFormat::Toml, text, 7003),
        "[weir]   # main\nlisten_port = 7003\nlisten_addr = \"*\"\n[databases.app]\nport = 1\n"
    );
}

#[test]
fn pgbouncer_ini_listen_settings_are_unquoted() {
    let text =
        "[databases]\napp = host=127.0.0.1\n[pgbouncer]\nlisten_port = 6432\nauth_type = md5\n";
    assert_eq!(
        config_with_listen(ConfigFormat::Ini, text, 7004),
        "[databases]\napp = host=127.0.0.1\n[pgbouncer]\nlisten_addr = 127.0.0.1\n\
         listen_port = 7004\nauth_type = md5\n"
    );
}
