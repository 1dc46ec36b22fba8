//! Security properties of Weir's front door, each pinned against a real PostgreSQL:
//!
//! - no way in without the configured credentials: wrong, empty and unknown passwords and users
//!   are refused under md5, scram-sha-256 and plain, also for users whose configured password is
//!   empty or missing (PgBouncer refuses empty passwords);
//! - the admin console admits only `admin_users` and `stats_users` proving their password, and
//!   obeys `auth_hba_file`;
//! - nothing secret reaches the log, even at `--log-level trace`: no password, md5 hash, SCRAM
//!   verifier key, SaltedPassword, ClientKey or client proof;
//! - `server_tls_sslmode = require` (and the verify modes) never fall back to plaintext against
//!   a PostgreSQL without TLS: Weir sends its SSLRequest and nothing else;
//! - a CancelRequest cancels only the query of the client whose key it carries, and a key of an
//!   idle client cancels nothing;
//! - before login, a client cannot learn which users exist from the SCRAM salt, cannot make Weir
//!   buffer a huge password message, and cannot make Weir create pools.
//!
//! The refusal tests log in to a PostgreSQL that trusts everyone, so any client Weir lets
//! through gets a working session and the test fails loudly instead of seeing the server's own
//! refusal.

#[path = "core_support.rs"]
mod support;

use std::fs::{self, File};
use std::io;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use support::common::{self, ConfigFormat, PgCluster, PgOptions, Weir};
use support::{app_cluster_and_weir, app_url, count_activity, expect_sqlstate, scalar};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weir::auth::scram::{hmac, sha256};
use weir::config::secret::ScramVerifier;

/// How long a step that should be immediate may take before the test gives up on it.
const PROMPT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Clusters and configs
// ---------------------------------------------------------------------------------------------

/// A cluster that trusts every TCP login, with a login role per name and a database `app`.
/// Whatever Weir lets through gets a working session, so a refusal can only be Weir's.
fn trusting_cluster(roles: &[&str]) -> PgCluster {
    let cluster = PgCluster::start_with(PgOptions {
        hba_method: "trust".to_string(),
        ..PgOptions::default()
    });
    for role in roles {
        cluster.create_user(role, "unused", "scram-sha-256");
    }
    cluster.create_database("app", "postgres");
    cluster
}

/// weir.toml: `auth_type`, extra `general` lines, one `[users.NAME]` per entry (with its
/// password, or none), and database `app` on `pg_port`.
fn weir_config(
    auth_type: &str,
    general: &str,
    users: &[(&str, Option<&str>)],
    pg_port: u16,
) -> String {
    let mut text = format!(
        "[weir]\nauth_type = \"{auth_type}\"\ndefault_pool_size = 2\nreserve_pool_size = 0\n\
         query_wait_timeout = 5\n{general}\n\n"
    );
    for (user, password) in users {
        text.push_str(&format!("[users.{user}]\n"));
        match password {
            Some(p) => text.push_str(&format!("password = \"{p}\"\n\n")),
            None => text.push_str("pool_size = 1\n\n"),
        }
    }
    text.push_str(&format!(
        "[databases.app]\nhost = \"127.0.0.1\"\nport = {pg_port}\n"
    ));
    text
}

/// `user` logs in with `password` and reaches PostgreSQL as itself.
async fn assert_logs_in(weir: &Weir, user: &str, password: &str, db: &str) {
    let client = common::connect(&weir.url(user, password, db)).await;
    assert_eq!(scalar(&client, "SELECT current_user").await, user);
}

/// A login is refused as PostgreSQL refuses a wrong password: FATAL 28P01 naming the user.
async fn assert_refused(weir: &Weir, user: &str, password: &str, db: &str) {
    let what = format!("login as {user:?} with password {password:?} to {db}");
    let result = common::try_connect(&weir.url(user, password, db)).await;
    let err = expect_sqlstate(result, "28P01", &what);
    let server = err.as_db_error().expect("a server error");
    assert_eq!(server.severity(), "FATAL", "{what}");
    // PostgreSQL's words for a wrong password (plain, md5), PgBouncer's for a SCRAM exchange
    // that proved nothing and for an unknown user under trust.
    let wrong_password = format!("password authentication failed for user \"{user}\"");
    assert!(
        server.message() == wrong_password
            || server.message() == "SASL authentication failed"
            || server.message() == "\"trust\" authentication failed",
        "{what}: {}",
        server.message()
    );
}

/// A login that must not succeed, whatever the error (for refusals whose SQLSTATE PgBouncer
/// and Weir may word differently).
async fn assert_not_admitted(weir: &Weir, user: &str, password: &str, db: &str) -> String {
    match common::try_connect(&weir.url(user, password, db)).await {
        Ok(client) => match client.simple_query("SHOW VERSION").await {
            Ok(_) => panic!("{user:?} with password {password:?} got into {db}"),
            Err(e) => common::describe_error(&e),
        },
        Err(e) => common::describe_error(&e),
    }
}

// ---------------------------------------------------------------------------------------------
// Client authentication
// ---------------------------------------------------------------------------------------------

const ALICE_PW: &str = "alice-Pw-3e81c";
const BOB_PW: &str = "bob-Pw-77d0a";

/// Bob's secret as stored in Weir: an md5 hash for md5 and plain, a SCRAM verifier for SCRAM.
fn bob_secret(auth_type: &str) -> String {
    match auth_type {
        "scram-sha-256" => postgres_protocol::password::scram_sha_256(BOB_PW.as_bytes()),
        _ => postgres_protocol::password::md5(BOB_PW.as_bytes(), "bob"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_scram_and_plain_refuse_wrong_empty_and_unknown_credentials() {
    let cluster = trusting_cluster(&["alice", "bob", "carol"]);
    for auth_type in ["md5", "scram-sha-256", "plain"] {
        let bob = bob_secret(auth_type);
        let users = [
            ("alice", Some(ALICE_PW)),
            ("bob", Some(bob.as_str())),
            // Known to Weir, but without a password: nobody can prove one.
            ("carol", None),
        ];
        let weir = Weir::start(&weir_config(auth_type, "", &users, cluster.port));

        // The right passwords get in, so the refusals below are about the credentials.
        assert_logs_in(&weir, "alice", ALICE_PW, "app").await;
        assert_logs_in(&weir, "bob", BOB_PW, "app").await;

        for (user, password) in [
            ("alice", "wrong"),
            ("alice", ""),
            ("alice", &ALICE_PW[..ALICE_PW.len() - 1]),
            ("bob", "wrong"),
            ("bob", ""),
            // Pass-the-hash: the stored secret itself is not the password.
            ("bob", bob.as_str()),
            ("carol", ""),
            ("carol", "anything"),
            ("nobody", "whatever"),
            ("nobody", ""),
        ] {
            assert_refused(&weir, user, password, "app").await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_empty_password_admits_nobody() {
    // PgBouncer's check_client_passwd: "disallow empty passwords", for the stored password as
    // for the one the client sends. PostgreSQL itself never stores an empty password.
    let cluster = trusting_cluster(&["empty_toml", "empty_file"]);
    for auth_type in ["md5", "scram-sha-256", "plain"] {
        let config = weir_config(
            auth_type,
            "auth_file = \"userlist.txt\"",
            &[("empty_toml", Some(""))],
            cluster.port,
        );
        let userlist = "\"empty_file\" \"\"\n";
        let weir = Weir::start_with(ConfigFormat::Toml, &config, &[("userlist.txt", userlist)]);
        for user in ["empty_toml", "empty_file"] {
            assert_refused(&weir, user, "", "app").await;
            assert_refused(&weir, user, "x", "app").await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_users_see_the_same_scram_salt_every_time() {
    // PostgreSQL's scram_mock_salt: an unknown user gets a made-up verifier whose salt depends
    // only on the name, so comparing two attempts does not tell which users exist.
    let cluster = trusting_cluster(&["alice"]);
    let weir = Weir::start(&weir_config(
        "scram-sha-256",
        "",
        &[("alice", Some(ALICE_PW))],
        cluster.port,
    ));
    for user in ["alice", "nobody", "nobody_else"] {
        let first = scram_server_first(weir.port, user, "app").await;
        let second = scram_server_first(weir.port, user, "app").await;
        assert_eq!(
            scram_attr(&first, "s="),
            scram_attr(&second, "s="),
            "{user}: the salt changed between two attempts ({first} / {second})"
        );
        assert_eq!(scram_attr(&first, "i="), "4096", "{user}: {first}");
    }
    assert_ne!(
        scram_attr(&scram_server_first(weir.port, "nobody", "app").await, "s="),
        scram_attr(
            &scram_server_first(weir.port, "nobody_else", "app").await,
            "s="
        ),
        "two unknown users share one salt"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_password_message_is_refused_before_it_is_buffered() {
    // PostgreSQL refuses authentication messages over PG_MAX_AUTH_TOKEN_LENGTH (65535 bytes)
    // from their header. A client that has not logged in must not make Weir wait for, and
    // reserve room for, half a gigabyte.
    let cluster = trusting_cluster(&["alice"]);
    let weir = Weir::start(&weir_config(
        "scram-sha-256",
        "",
        &[("alice", Some(ALICE_PW))],
        cluster.port,
    ));
    for user in ["alice", "nobody"] {
        let mut stream = TcpStream::connect(("127.0.0.1", weir.port))
            .await
            .expect("connect to weir");
        stream
            .write_all(&startup_message(user, "app"))
            .await
            .expect("send startup");
        let (tag, body) = read_backend_message(&mut stream)
            .await
            .expect("SASL request");
        assert_eq!((tag, auth_code(&body)), (b'R', 10), "{user}: SASL request");
        // A SASLInitialResponse header announcing 512 MiB, then a few bytes of it.
        let mut header = vec![b'p'];
        header.extend_from_slice(&(512i32 << 20).to_be_bytes());
        header.extend_from_slice(b"SCRAM-SHA-256\0");
        stream.write_all(&header).await.expect("send header");
        let answer = tokio::time::timeout(PROMPT, read_backend_message(&mut stream)).await;
        match answer {
            // Refused with an error, or the connection closed: either way nothing is buffered.
            Ok(Ok((b'E', _))) | Ok(Err(_)) => {}
            Ok(Ok((tag, _))) => panic!("{user}: unexpected reply {:?}", char::from(tag)),
            Err(_) => panic!("{user}: weir is still waiting for a 512 MiB password message"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The admin console
// ---------------------------------------------------------------------------------------------

const ADMIN_PW: &str = "admin-Pw-5b2f9";
const STATS_PW: &str = "stats-Pw-19ac4";
const APP_PW: &str = "app-Pw-c03e7";

fn console_config(auth_type: &str, pg_port: u16) -> String {
    weir_config(
        auth_type,
        "admin_users = \"admin\"\nstats_users = \"stats\"",
        &[
            ("admin", Some(ADMIN_PW)),
            ("stats", Some(STATS_PW)),
            ("app", Some(APP_PW)),
        ],
        pg_port,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_console_needs_an_admin_or_stats_user_and_its_password() {
    let cluster = trusting_cluster(&["app"]);
    for auth_type in ["scram-sha-256", "md5", "plain"] {
        let weir = Weir::start(&console_config(auth_type, cluster.port));
        for db in ["pgbouncer", "weir"] {
            let admin = common::connect(&weir.url("admin", ADMIN_PW, db)).await;
            admin
                .simple_query("SHOW VERSION")
                .await
                .expect("admin SHOW");
            let stats = common::connect(&weir.url("stats", STATS_PW, db)).await;
            stats.simple_query("SHOW POOLS").await.expect("stats SHOW");
            let reload = stats.simple_query("RELOAD").await;
            assert!(reload.is_err(), "{auth_type}: a stats user ran RELOAD");

            for (user, password) in [
                ("admin", "wrong"),
                ("admin", ""),
                ("admin", STATS_PW),
                ("stats", ""),
                ("nobody", "whatever"),
                // Only its own OS user over the Unix socket gets in as pgbouncer unasked.
                ("pgbouncer", ""),
                ("pgbouncer", "pgbouncer"),
            ] {
                assert_refused(&weir, user, password, db).await;
            }
            // A user with the right password but no console role.
            let refused = assert_not_admitted(&weir, "app", APP_PW, db).await;
            assert!(refused.contains("not allowed"), "{auth_type}: {refused}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_trust_the_console_still_needs_a_known_console_user() {
    let cluster = trusting_cluster(&["app"]);
    let weir = Weir::start(&console_config("trust", cluster.port));
    // As PgBouncer: trust skips the password, not the user name checks.
    let admin = common::connect(&weir.url("admin", "", "pgbouncer")).await;
    admin
        .simple_query("SHOW VERSION")
        .await
        .expect("admin SHOW");
    assert_refused(&weir, "nobody", "", "pgbouncer").await;
    let refused = assert_not_admitted(&weir, "app", "", "pgbouncer").await;
    assert!(refused.contains("not allowed"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_hba_file_rules_apply_to_the_admin_console_too() {
    // PgBouncer evaluates auth_hba_file for every database, its console included; operators
    // use that to keep the console off the network.
    let cluster = trusting_cluster(&["app", "blocked"]);
    let hba = "host pgbouncer all 127.0.0.1/32 reject\n\
               host weir all 127.0.0.1/32 reject\n\
               host app blocked 127.0.0.1/32 reject\n\
               host all all 127.0.0.1/32 scram-sha-256\n";
    let config = weir_config(
        "hba",
        "auth_hba_file = \"hba.conf\"\nadmin_users = \"admin\"",
        &[
            ("admin", Some(ADMIN_PW)),
            ("app", Some(APP_PW)),
            ("blocked", Some(APP_PW)),
        ],
        cluster.port,
    );
    let weir = Weir::start_with(ConfigFormat::Toml, &config, &[("hba.conf", hba)]);

    // The rules are in force for ordinary databases.
    assert_logs_in(&weir, "app", APP_PW, "app").await;
    let blocked = common::try_connect(&weir.url("blocked", APP_PW, "app")).await;
    expect_sqlstate(blocked, "28000", "blocked by a reject line");

    for db in ["pgbouncer", "weir"] {
        let refused = assert_not_admitted(&weir, "admin", ADMIN_PW, db).await;
        assert!(refused.contains("28000"), "{db}: {refused}");
    }
}

// ---------------------------------------------------------------------------------------------
// Nothing secret in the log
// ---------------------------------------------------------------------------------------------

const SCRAM_USER: &str = "sec_scram";
const SCRAM_PW: &str = "scram-Pw-a9f31e";
const SCRAM_PLAIN_USER: &str = "sec_scram_plain";
const SCRAM_PLAIN_PW: &str = "scramplain-Pw-4c7d02";
const MD5_USER: &str = "sec_md5";
const MD5_PW: &str = "md5-Pw-e61b58";
const PLAIN_USER: &str = "sec_plain";
const PLAIN_PW: &str = "plain-Pw-0d94c3";
const LOG_ADMIN: &str = "sec_admin";
const LOG_ADMIN_PW: &str = "admin-Pw-f2e805";
const WRONG_PW: &str = "wrong-Pw-77aa10";

/// A Weir started with `--log-level trace` (the harness's `Weir` takes no arguments), with
/// its own temp dir; killed on drop, its log printed first when the test panics.
struct TracedWeir {
    port: u16,
    log_path: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl TracedWeir {
    fn start(config: &str, files: &[(&str, &str)]) -> TracedWeir {
        let dir = tempfile::Builder::new()
            .prefix("weir-trace-")
            .tempdir()
            .expect("temp dir for weir");
        for (name, contents) in files {
            fs::write(dir.path().join(name), contents).expect("write a file for weir");
        }
        let port = common::free_port();
        let config_path = dir.path().join("weir.toml");
        let text = common::config_with_listen(ConfigFormat::Toml, config, port);
        fs::write(&config_path, text).expect("write weir.toml");
        let log_path = dir.path().join("weir.log");
        let log = File::create(&log_path).expect("create weir.log");
        let stderr = log.try_clone().expect("clone log handle");
        let child = Command::new(common::weir_bin())
            .arg(&config_path)
            .args(["--log-level", "trace"])
            .current_dir(dir.path())
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .expect("spawn weir");
        let weir = TracedWeir {
            port,
            log_path,
            child,
            _dir: dir,
        };
        common::eventually(Duration::from_secs(20), "weir to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        weir
    }

    fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    fn url(&self, user: &str, password: &str, db: &str) -> String {
        common::conninfo(self.port, user, password, db)
    }
}

impl Drop for TracedWeir {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let tail = &log[log.len().saturating_sub(64 * 1024)..];
            eprintln!("---- weir log (trace) ----\n{tail}\n---- end of weir log ----");
        }
    }
}

/// What SCRAM derives from a password and the salt and iteration count of a server-first
/// message (RFC 5802): each of these lets an attacker log in as the user or crack the password.
struct ScramKeys {
    salted_password: [u8; 32],
    client_key: [u8; 32],
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

fn scram_keys(password: &str, server_first: &str) -> ScramKeys {
    let salt = B64
        .decode(scram_attr(server_first, "s="))
        .expect("base64 salt");
    let iterations: u32 = scram_attr(server_first, "i=").parse().expect("iterations");
    // PBKDF2-HMAC-SHA-256 with one output block.
    let mut block = salt;
    block.extend_from_slice(&1u32.to_be_bytes());
    let mut u = hmac(password.as_bytes(), &block);
    let mut salted_password = u;
    for _ in 1..iterations {
        u = hmac(password.as_bytes(), &u);
        for (out, x) in salted_password.iter_mut().zip(u) {
            *out ^= x;
        }
    }
    let client_key = hmac(&salted_password, b"Client Key");
    ScramKeys {
        salted_password,
        client_key,
        stored_key: sha256(&client_key),
        server_key: hmac(&salted_password, b"Server Key"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The ways a key could be written into a log line: base64, hex, and Rust's Debug of the array.
fn renderings(bytes: &[u8]) -> Vec<String> {
    vec![
        B64.encode(bytes),
        hex(bytes),
        hex(bytes).to_uppercase(),
        format!("{bytes:?}"),
    ]
}

/// Everything about one SCRAM login that must stay out of the log.
fn scram_login_secrets(password: &str, login: &ScramLogin) -> Vec<String> {
    let keys = scram_keys(password, &login.server_first);
    let mut out = vec![scram_attr(&login.client_final, "p=").to_string()];
    for key in [
        keys.salted_password,
        keys.client_key,
        keys.stored_key,
        keys.server_key,
    ] {
        out.extend(renderings(&key));
    }
    out
}

/// Everything about a stored SCRAM verifier that must stay out of the log.
fn verifier_secrets(verifier: &str) -> Vec<String> {
    let parsed = ScramVerifier::parse(verifier).expect("a SCRAM verifier");
    let mut out = vec![verifier.to_string()];
    out.extend(renderings(&parsed.stored_key));
    out.extend(renderings(&parsed.server_key));
    out
}

/// `base64` strings of SCRAM proof length (32 bytes: 43 characters and `=`) after `p=`.
fn scram_proofs_in(log: &str) -> Vec<String> {
    log.match_indices("p=")
        .filter_map(|(at, _)| log.get(at + 2..at + 46))
        .filter(|s| {
            let b = s.as_bytes();
            b[43] == b'='
                && b[..43]
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/')
        })
        .map(str::to_string)
        .collect()
}

/// `md5` followed by 32 hex digits: a stored md5 secret or a salted md5 response.
fn md5_secrets_in(log: &str) -> Vec<String> {
    log.match_indices("md5")
        .filter_map(|(at, _)| log.get(at..at + 35))
        .filter(|s| s[3..].bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_log_scanners_find_proofs_and_md5_secrets() {
    let proof = B64.encode([7u8; 32]);
    let md5 = postgres_protocol::password::md5(b"pw", "user");
    let log = format!("x c=biws,r=abc,p={proof} y {md5} z p=short md5nothex");
    assert_eq!(scram_proofs_in(&log), vec![proof]);
    assert_eq!(md5_secrets_in(&log), vec![md5]);
    assert!(scram_proofs_in("p=é").is_empty() && md5_secrets_in("md5é").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_log_of_scram_md5_and_plain_logins_holds_no_secret() {
    // PostgreSQL asks md5, so it does SCRAM for the roles stored as SCRAM: Weir logs in with a
    // plain password, an md5 hash, and (for the verifier-only user) the client's ClientKey.
    let cluster = PgCluster::start_with(PgOptions {
        hba_method: "md5".to_string(),
        ..PgOptions::default()
    });
    let verifier = postgres_protocol::password::scram_sha_256(SCRAM_PW.as_bytes());
    cluster.create_user(SCRAM_USER, &verifier, "scram-sha-256");
    cluster.create_user(SCRAM_PLAIN_USER, SCRAM_PLAIN_PW, "scram-sha-256");
    cluster.create_user(MD5_USER, MD5_PW, "md5");
    cluster.create_user(PLAIN_USER, PLAIN_PW, "scram-sha-256");
    cluster.create_database("app", "postgres");

    let md5_secret = postgres_protocol::password::md5(MD5_PW.as_bytes(), MD5_USER);
    let hba = format!(
        "host all {MD5_USER} 127.0.0.1/32 md5\n\
         host all {PLAIN_USER} 127.0.0.1/32 password\n\
         host all all 127.0.0.1/32 scram-sha-256\n"
    );
    let config = weir_config(
        "hba",
        &format!(
            "auth_hba_file = \"hba.conf\"\nadmin_users = \"{LOG_ADMIN}\"\n\
             log_connections = true\nlog_disconnections = true"
        ),
        &[
            (SCRAM_USER, Some(verifier.as_str())),
            (SCRAM_PLAIN_USER, Some(SCRAM_PLAIN_PW)),
            (MD5_USER, Some(md5_secret.as_str())),
            (PLAIN_USER, Some(PLAIN_PW)),
            (LOG_ADMIN, Some(LOG_ADMIN_PW)),
        ],
        cluster.port,
    );
    let weir = TracedWeir::start(&config, &[("hba.conf", &hba)]);

    let mut secrets: Vec<String> = [
        SCRAM_PW,
        SCRAM_PLAIN_PW,
        MD5_PW,
        PLAIN_PW,
        LOG_ADMIN_PW,
        WRONG_PW,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (user, password) in [
        (SCRAM_USER, SCRAM_PW),
        (SCRAM_PLAIN_USER, SCRAM_PLAIN_PW),
        (MD5_USER, MD5_PW),
        (PLAIN_USER, PLAIN_PW),
        (LOG_ADMIN, LOG_ADMIN_PW),
    ] {
        let md5 = postgres_protocol::password::md5(password.as_bytes(), user);
        secrets.push(md5[3..].to_string());
        secrets.push(md5);
    }
    secrets.extend(verifier_secrets(&verifier));

    // SCRAM by hand, to know the salt, the proof and the keys of each exchange.
    for (user, password) in [(SCRAM_USER, SCRAM_PW), (SCRAM_PLAIN_USER, SCRAM_PLAIN_PW)] {
        let good = scram_login(weir.port, user, password, "app").await;
        assert_eq!(good.error, None, "{user}: login");
        assert!(good.key.is_some(), "{user}: no BackendKeyData");
        secrets.extend(scram_login_secrets(password, &good));
        let bad = scram_login(weir.port, user, WRONG_PW, "app").await;
        assert_eq!(
            bad.error.as_deref(),
            Some("28P01"),
            "{user}: wrong password"
        );
        secrets.extend(scram_login_secrets(WRONG_PW, &bad));
    }
    let unknown = scram_login(weir.port, "sec_nobody", WRONG_PW, "app").await;
    assert_eq!(unknown.error.as_deref(), Some("28P01"), "unknown user");
    secrets.extend(scram_login_secrets(WRONG_PW, &unknown));

    // And through a driver, with a query each (the server side logs in on first use).
    for (user, password) in [
        (SCRAM_USER, SCRAM_PW),
        (SCRAM_PLAIN_USER, SCRAM_PLAIN_PW),
        (MD5_USER, MD5_PW),
        (PLAIN_USER, PLAIN_PW),
    ] {
        let client = common::connect(&weir.url(user, password, "app")).await;
        assert_eq!(scalar(&client, "SELECT current_user").await, user);
        let wrong = common::try_connect(&weir.url(user, WRONG_PW, "app")).await;
        expect_sqlstate(wrong, "28P01", &format!("{user} with a wrong password"));
    }
    let console = common::connect(&weir.url(LOG_ADMIN, LOG_ADMIN_PW, "pgbouncer")).await;
    for sql in ["SHOW CLIENTS", "SHOW SERVERS", "SHOW USERS", "SHOW CONFIG"] {
        console.simple_query(sql).await.expect(sql);
    }
    let wrong = common::try_connect(&weir.url(LOG_ADMIN, WRONG_PW, "pgbouncer")).await;
    expect_sqlstate(wrong, "28P01", "console with a wrong password");
    drop(console);

    let log = weir.log();
    assert!(
        log.contains("DEBUG") && log.contains("login"),
        "the log does not look like a trace log:\n{log}"
    );
    for secret in &secrets {
        assert!(
            !log.contains(secret.as_str()),
            "the log holds a secret: {secret}"
        );
    }
    assert_eq!(scram_proofs_in(&log), Vec::<String>::new(), "SCRAM proofs");
    assert_eq!(md5_secrets_in(&log), Vec::<String>::new(), "md5 secrets");
    assert!(
        !log.contains("SCRAM-SHA-256$"),
        "a SCRAM verifier is logged"
    );
}

// ---------------------------------------------------------------------------------------------
// TLS towards PostgreSQL
// ---------------------------------------------------------------------------------------------

/// Bytes each connection through a `recording_proxy` sent towards the server.
type Recorded = Arc<Mutex<Vec<Vec<u8>>>>;

/// A TCP proxy to 127.0.0.1:`upstream` that records what each connection sends upstream.
async fn recording_proxy(upstream: u16) -> (u16, Recorded) {
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .await
        .expect("bind proxy");
    let port = listener.local_addr().expect("proxy address").port();
    let recorded = Recorded::default();
    let record = recorded.clone();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let index = {
                let mut all = record.lock().expect("recording");
                all.push(Vec::new());
                all.len() - 1
            };
            let Ok(outbound) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                continue;
            };
            let (mut from_client, mut to_client) = inbound.into_split();
            let (mut from_server, mut to_server) = outbound.into_split();
            let record = record.clone();
            tokio::spawn(async move {
                let mut chunk = [0u8; 4096];
                while let Ok(n @ 1..) = from_client.read(&mut chunk).await {
                    record.lock().expect("recording")[index].extend_from_slice(&chunk[..n]);
                    if to_server.write_all(&chunk[..n]).await.is_err() {
                        break;
                    }
                }
            });
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
            });
        }
    });
    (port, recorded)
}

/// A self-signed CA certificate in PEM (for `server_tls_ca_file`; never used to sign).
fn some_ca_pem() -> String {
    let key = rcgen::KeyPair::generate().expect("CA key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.self_signed(&key).expect("self-sign CA").pem()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_tls_require_never_falls_back_to_plaintext() {
    // The harness's PostgreSQL runs without ssl, so it answers an SSLRequest with 'N'.
    let cluster = trusting_cluster(&["app"]);
    let ca = some_ca_pem();
    for mode in ["require", "verify-ca", "verify-full"] {
        let (proxy_port, recorded) = recording_proxy(cluster.port).await;
        let config = weir_config(
            "scram-sha-256",
            &format!(
                "server_tls_sslmode = \"{mode}\"\nserver_tls_ca_file = \"ca.crt\"\n\
                 server_connect_timeout = 5"
            ),
            &[("app", Some(APP_PW))],
            proxy_port,
        );
        let weir = Weir::start_with(ConfigFormat::Toml, &config, &[("ca.crt", &ca)]);

        let refused = assert_not_admitted_to_app(&weir).await;
        let sent = recorded.lock().expect("recording").clone();
        assert!(!sent.is_empty(), "{mode}: weir never tried the server");
        for bytes in &sent {
            assert_eq!(
                bytes.as_slice(),
                &SSL_REQUEST[..],
                "{mode}: weir sent more than an SSLRequest ({refused}): {:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        assert!(
            refused.contains("SSL"),
            "{mode}: the client is not told why: {refused}"
        );
    }
}

/// Logs in as `app` to `app` and runs a query; returns the error it must end with.
async fn assert_not_admitted_to_app(weir: &Weir) -> String {
    match common::try_connect(&weir.url("app", APP_PW, "app")).await {
        Ok(client) => match client.simple_query("SELECT 1").await {
            Ok(_) => panic!("a query reached PostgreSQL"),
            Err(e) => common::describe_error(&e),
        },
        Err(e) => common::describe_error(&e),
    }
}

// ---------------------------------------------------------------------------------------------
// Cancel requests
// ---------------------------------------------------------------------------------------------

/// Sends a CancelRequest and waits until Weir has handled it (it closes the connection).
async fn send_cancel(port: u16, (pid, secret): (i32, i32)) {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect for a cancel request");
    let mut msg = 16i32.to_be_bytes().to_vec();
    msg.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
    msg.extend_from_slice(&pid.to_be_bytes());
    msg.extend_from_slice(&secret.to_be_bytes());
    stream.write_all(&msg).await.expect("send cancel request");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(PROMPT, stream.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "weir kept a cancel connection open");
    assert!(rest.is_empty(), "weir answered a cancel request: {rest:?}");
}

/// Waits until `n` backends of `app` run pg_sleep.
fn wait_for_sleepers(cluster: &PgCluster, n: usize) {
    common::eventually(PROMPT, "pg_sleep to run", || {
        count_activity(
            cluster,
            "app",
            "state = 'active' AND query LIKE '%pg_sleep%'",
        ) == n
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_request_stops_only_the_query_of_the_client_whose_key_it_carries() {
    // One server connection, so every client's query runs on the same backend.
    let (cluster, weir) = app_cluster_and_weir(
        "default_pool_size = 1\nreserve_pool_size = 0\nquery_wait_timeout = 60",
    );
    let mut victim = scram_login(weir.port, "app", support::APP_PASSWORD, "app").await;
    assert_eq!(victim.error, None, "victim login");
    let victim_key = victim.key.expect("victim's BackendKeyData");
    let idle = scram_login(weir.port, "app", support::APP_PASSWORD, "app").await;
    let idle_key = idle.key.expect("idle client's BackendKeyData");
    assert_ne!(victim_key, idle_key, "two clients got the same cancel key");

    // The victim is idle while another client's query holds the server: the victim's key,
    // right as it is, cancels nothing.
    let bystander = common::connect(&app_url(&weir)).await;
    let sleeping = tokio::spawn(async move {
        bystander
            .simple_query("SELECT pg_sleep(2)")
            .await
            .map(|_| ())
            .map_err(|e| common::describe_error(&e))
    });
    wait_for_sleepers(&cluster, 1);
    send_cancel(weir.port, victim_key).await;
    send_cancel(weir.port, idle_key).await;
    let outcome = tokio::time::timeout(Duration::from_secs(20), sleeping)
        .await
        .expect("the bystander's query did not end")
        .expect("bystander task");
    assert_eq!(
        outcome,
        Ok(()),
        "an idle client's key cancelled another's query"
    );

    // Now the victim runs a query; wrong keys and another client's key leave it running.
    victim
        .stream
        .write_all(&query_message("SELECT pg_sleep(30)"))
        .await
        .expect("send the victim's query");
    wait_for_sleepers(&cluster, 1);
    let (pid, secret) = victim_key;
    for wrong in [
        (pid, secret.wrapping_add(1)),
        (pid, !secret),
        (pid.wrapping_add(1), secret),
        (0, 0),
        idle_key,
    ] {
        send_cancel(weir.port, wrong).await;
    }
    let early = tokio::time::timeout(
        Duration::from_secs(1),
        read_backend_message(&mut victim.stream),
    )
    .await;
    assert!(early.is_err(), "the victim's query ended early: {early:?}");
    assert_eq!(
        count_activity(
            &cluster,
            "app",
            "state = 'active' AND query LIKE '%pg_sleep%'"
        ),
        1,
        "the victim's query stopped after wrong cancel keys"
    );

    // Its own key does stop it.
    send_cancel(weir.port, victim_key).await;
    let code = tokio::time::timeout(PROMPT, async {
        loop {
            let (tag, body) = read_backend_message(&mut victim.stream)
                .await
                .expect("victim's reply");
            if tag == b'E' {
                return sqlstate(&body);
            }
        }
    })
    .await
    .expect("the victim's own key did not cancel its query");
    assert_eq!(code, "57014");
}

// ---------------------------------------------------------------------------------------------
// Pools before login
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_to_wildcard_databases_create_no_pools() {
    // With a `*` database and auth_user, a client names any database before proving anything.
    // Weir must not keep a pool (and open server connections) per name it is told.
    let cluster = trusting_cluster(&[]);
    cluster.create_superuser("authu", "unused", "scram-sha-256");
    let config = format!(
        "[weir]\nauth_type = \"scram-sha-256\"\nadmin_users = \"admin\"\nquery_wait_timeout = 5\n\n\
         [users.admin]\npassword = \"{ADMIN_PW}\"\n\n\
         [users.authu]\npassword = \"unused\"\n\n\
         [databases.\"*\"]\nhost = \"127.0.0.1\"\nport = {}\nauth_user = \"authu\"\n",
        cluster.port
    );
    let weir = Weir::start(&config);
    for i in 0..20 {
        let (user, db) = (format!("ghost{i}"), format!("nowhere{i}"));
        let result = common::try_connect(&weir.url(&user, "guess", &db)).await;
        assert!(result.is_err(), "{user} got into {db}");
    }
    let console = common::connect(&weir.url("admin", ADMIN_PW, "pgbouncer")).await;
    let pools: Vec<String> = console
        .simple_query("SHOW POOLS")
        .await
        .expect("SHOW POOLS")
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get("database").map(str::to_string),
            _ => None,
        })
        .filter(|db| db.starts_with("nowhere"))
        .collect();
    assert_eq!(pools, Vec::<String>::new(), "pools left by failed logins");
}

// ---------------------------------------------------------------------------------------------
// The wire protocol by hand
// ---------------------------------------------------------------------------------------------

const PROTOCOL_3_0: i32 = 196_608;
const CANCEL_REQUEST_CODE: i32 = 80_877_102;
/// An SSLRequest: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

fn startup_message(user: &str, db: &str) -> Vec<u8> {
    let mut body = PROTOCOL_3_0.to_be_bytes().to_vec();
    for (key, value) in [("user", user), ("database", db)] {
        body.extend_from_slice(key.as_bytes());
        body.push(0);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = (body.len() as i32 + 4).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    msg
}

fn tagged(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut msg = vec![tag];
    msg.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    msg.extend_from_slice(body);
    msg
}

fn query_message(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    tagged(b'Q', &body)
}

fn sasl_initial_response(client_first: &[u8]) -> Vec<u8> {
    let mut body = b"SCRAM-SHA-256\0".to_vec();
    body.extend_from_slice(&(client_first.len() as i32).to_be_bytes());
    body.extend_from_slice(client_first);
    tagged(b'p', &body)
}

/// One backend message: its tag and body.
async fn read_backend_message(stream: &mut TcpStream) -> io::Result<(u8, Vec<u8>)> {
    let tag = stream.read_u8().await?;
    let len = stream.read_i32().await?;
    let body_len = usize::try_from(len - 4)
        .ok()
        .filter(|n| *n < 1 << 20)
        .ok_or_else(|| io::Error::other(format!("bad message length {len}")))?;
    let mut body = vec![0; body_len];
    stream.read_exact(&mut body).await?;
    Ok((tag, body))
}

/// The request code of an Authentication message body.
fn auth_code(body: &[u8]) -> i32 {
    body.get(..4)
        .map_or(-1, |b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// The SQLSTATE of an ErrorResponse body.
fn sqlstate(body: &[u8]) -> String {
    body.split(|&b| b == 0)
        .find_map(|field| field.strip_prefix(b"C"))
        .map(|code| String::from_utf8_lossy(code).into_owned())
        .unwrap_or_default()
}

/// The value of attribute `name` (`s=`, `i=`, `p=`, ...) of a SCRAM message.
fn scram_attr<'a>(message: &'a str, name: &str) -> &'a str {
    message
        .split(',')
        .find_map(|attr| attr.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name} in SCRAM message {message:?}"))
}

/// A SCRAM-SHA-256 login done by hand, with the messages it exchanged.
struct ScramLogin {
    stream: TcpStream,
    server_first: String,
    client_final: String,
    /// BackendKeyData (pid, secret) of a login that succeeded.
    key: Option<(i32, i32)>,
    /// The SQLSTATE that ended a login that failed.
    error: Option<String>,
}

/// Starts a login and answers Weir's SASL request; returns the stream after client-first.
async fn scram_start(port: u16, user: &str, db: &str, client_first: &[u8]) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to weir");
    stream
        .write_all(&startup_message(user, db))
        .await
        .expect("send startup");
    let (tag, body) = read_backend_message(&mut stream)
        .await
        .expect("SASL request");
    assert_eq!((tag, auth_code(&body)), (b'R', 10), "{user}: SASL request");
    stream
        .write_all(&sasl_initial_response(client_first))
        .await
        .expect("send client-first");
    let (tag, body) = read_backend_message(&mut stream)
        .await
        .expect("server-first");
    assert_eq!((tag, auth_code(&body)), (b'R', 11), "{user}: SASLContinue");
    let server_first = String::from_utf8(body[4..].to_vec()).expect("UTF-8 server-first");
    (stream, server_first)
}

/// The server-first message Weir sends `user` (the login is then abandoned).
async fn scram_server_first(port: u16, user: &str, db: &str) -> String {
    let client = ScramSha256::new(b"irrelevant", ChannelBinding::unsupported());
    scram_start(port, user, db, client.message()).await.1
}

async fn scram_login(port: u16, user: &str, password: &str, db: &str) -> ScramLogin {
    let mut scram = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
    let (mut stream, server_first) = scram_start(port, user, db, scram.message()).await;
    scram
        .update(server_first.as_bytes())
        .expect("a well-formed server-first message");
    let client_final = String::from_utf8(scram.message().to_vec()).expect("UTF-8 client-final");
    stream
        .write_all(&tagged(b'p', scram.message()))
        .await
        .expect("send client-final");
    let (mut key, mut error) = (None, None);
    loop {
        let (tag, body) = read_backend_message(&mut stream)
            .await
            .expect("login reply");
        match tag {
            b'R' if auth_code(&body) == 12 => scram
                .finish(&body[4..])
                .expect("the server signature verifies"),
            b'K' => {
                let word = |at: usize| {
                    i32::from_be_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]])
                };
                key = Some((word(0), word(4)));
            }
            b'E' => {
                error = Some(sqlstate(&body));
                break;
            }
            b'Z' => break,
            _ => {}
        }
    }
    ScramLogin {
        stream,
        server_first,
        client_final,
        key,
        error,
    }
}
