//! Authentication on both sides of Weir: clients proving a password to Weir under each
//! auth_type and each way of storing the secret (plain, md5, SCRAM verifier, auth_file), and
//! Weir logging in to PostgreSQL under each pg_hba method (scram-sha-256, md5, password, trust).

#[path = "core_support.rs"]
mod support;

use support::common::{self, free_port, ConfigFormat, PgCluster, PgOptions, Weir};
use support::{expect_sqlstate, psql_ok, psql_via_weir, scalar};

const PLAIN_USER: &str = "plain_user";
const PLAIN_PASSWORD: &str = "plain pw 1";
const HASHED_USER: &str = "hashed_user";
const HASHED_PASSWORD: &str = "hashed pw 2";

/// A cluster whose TCP logins use `hba_method`, with each (user, password) as a login role
/// whose password is stored per `encryption`, and a database `app` they can all use.
fn cluster_with_users(hba_method: &str, encryption: &str, users: &[(&str, &str)]) -> PgCluster {
    let cluster = PgCluster::start_with(PgOptions {
        hba_method: hba_method.to_string(),
        password_encryption: encryption.to_string(),
        ..PgOptions::default()
    });
    for (user, password) in users {
        cluster.create_user(user, password, encryption);
    }
    cluster.create_database("app", "postgres");
    cluster
}

/// weir.toml with the given auth_type, one `[users.NAME] password = SECRET` per entry, and
/// database `app` on `pg_port`.
fn auth_config(auth_type: &str, pg_port: u16, users: &[(&str, &str)]) -> String {
    let mut text = format!(
        "[weir]\nauth_type = \"{auth_type}\"\ndefault_pool_size = 2\nreserve_pool_size = 0\n\
         query_wait_timeout = 5\n\n"
    );
    for (user, secret) in users {
        text.push_str(&format!("[users.{user}]\npassword = \"{secret}\"\n\n"));
    }
    text.push_str(&format!(
        "[databases.app]\nhost = \"127.0.0.1\"\nport = {pg_port}\n"
    ));
    text
}

/// `user` logs in through Weir with `password` and its queries reach PostgreSQL as `user`.
async fn assert_logs_in(weir: &Weir, user: &str, password: &str) {
    let client = common::connect(&weir.url(user, password, "app")).await;
    assert_eq!(scalar(&client, "SELECT current_user").await, user);
}

/// The psql CLI logs in through Weir as `user` and runs a query.
fn assert_psql_logs_in(weir: &Weir, user: &str, password: Option<&str>) {
    let out = psql_via_weir(weir, user, password, "app", &["-c", "SELECT current_user"]);
    assert_eq!(psql_ok(&out, &format!("psql as {user}")), user);
}

/// A login as `user` with `password` is refused as PostgreSQL refuses a wrong password.
async fn assert_refused(weir: &Weir, user: &str, password: &str) {
    let result = common::try_connect(&weir.url(user, password, "app")).await;
    let err = expect_sqlstate(result, "28P01", &format!("login as {user}"));
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.severity(), "FATAL");
    // PostgreSQL's words for a wrong password (plain, md5), PgBouncer's for a SCRAM exchange
    // that proved nothing and for an unknown user under trust.
    let wrong_password = format!("password authentication failed for user \"{user}\"");
    assert!(
        db.message() == wrong_password
            || db.message() == "SASL authentication failed"
            || db.message() == "\"trust\" authentication failed",
        "{}",
        db.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_auth_accepts_plain_and_md5_secrets_and_logs_in_to_md5_hba() {
    let cluster = cluster_with_users(
        "md5",
        "md5",
        &[(PLAIN_USER, PLAIN_PASSWORD), (HASHED_USER, HASHED_PASSWORD)],
    );
    let md5_secret = postgres_protocol::password::md5(HASHED_PASSWORD.as_bytes(), HASHED_USER);
    let weir = Weir::start(&auth_config(
        "md5",
        cluster.port,
        &[(PLAIN_USER, PLAIN_PASSWORD), (HASHED_USER, &md5_secret)],
    ));

    assert_logs_in(&weir, PLAIN_USER, PLAIN_PASSWORD).await;
    assert_logs_in(&weir, HASHED_USER, HASHED_PASSWORD).await;
    assert_psql_logs_in(&weir, HASHED_USER, Some(HASHED_PASSWORD));
    assert_refused(&weir, PLAIN_USER, "wrong").await;
    assert_refused(&weir, HASHED_USER, PLAIN_PASSWORD).await;
    assert_refused(&weir, "nobody", "whatever").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_auth_accepts_plain_and_verifier_secrets_and_logs_in_to_scram_hba() {
    // The verifier is given to PostgreSQL as is, so Weir can log in with the ClientKey the
    // client proved (SCRAM pass-through needs the same salt and iteration count).
    let verifier = postgres_protocol::password::scram_sha_256(HASHED_PASSWORD.as_bytes());
    let cluster = cluster_with_users(
        "scram-sha-256",
        "scram-sha-256",
        &[(PLAIN_USER, PLAIN_PASSWORD), (HASHED_USER, &verifier)],
    );
    let weir = Weir::start(&auth_config(
        "scram-sha-256",
        cluster.port,
        &[(PLAIN_USER, PLAIN_PASSWORD), (HASHED_USER, &verifier)],
    ));

    assert_logs_in(&weir, PLAIN_USER, PLAIN_PASSWORD).await;
    assert_logs_in(&weir, HASHED_USER, HASHED_PASSWORD).await;
    assert_psql_logs_in(&weir, PLAIN_USER, Some(PLAIN_PASSWORD));
    assert_psql_logs_in(&weir, HASHED_USER, Some(HASHED_PASSWORD));
    assert_refused(&weir, PLAIN_USER, "wrong").await;
    assert_refused(&weir, HASHED_USER, PLAIN_PASSWORD).await;
    assert_refused(&weir, "nobody", "whatever").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_auth_checks_cleartext_password_and_logs_in_to_password_hba() {
    let cluster = cluster_with_users("password", "scram-sha-256", &[(PLAIN_USER, PLAIN_PASSWORD)]);
    let weir = Weir::start(&auth_config(
        "plain",
        cluster.port,
        &[(PLAIN_USER, PLAIN_PASSWORD)],
    ));

    assert_logs_in(&weir, PLAIN_USER, PLAIN_PASSWORD).await;
    assert_psql_logs_in(&weir, PLAIN_USER, Some(PLAIN_PASSWORD));
    assert_refused(&weir, PLAIN_USER, "wrong").await;
    assert_refused(&weir, "nobody", "whatever").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_auth_admits_known_users_without_password_and_logs_in_to_trust_hba() {
    let cluster = cluster_with_users("trust", "scram-sha-256", &[(PLAIN_USER, PLAIN_PASSWORD)]);
    let weir = Weir::start(&auth_config(
        "trust",
        cluster.port,
        &[(PLAIN_USER, PLAIN_PASSWORD)],
    ));

    assert_logs_in(&weir, PLAIN_USER, PLAIN_PASSWORD).await;
    // No authentication is done: any password, or none, is accepted.
    assert_logs_in(&weir, PLAIN_USER, "not the password").await;
    assert_psql_logs_in(&weir, PLAIN_USER, None);
    // As in PgBouncer, the user name must still be known to the pooler.
    assert_refused(&weir, "nobody", "whatever").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_file_userlist_supplies_plain_and_md5_passwords() {
    let cluster = cluster_with_users(
        "md5",
        "md5",
        &[(PLAIN_USER, PLAIN_PASSWORD), (HASHED_USER, HASHED_PASSWORD)],
    );
    let md5_secret = postgres_protocol::password::md5(HASHED_PASSWORD.as_bytes(), HASHED_USER);
    let userlist = format!(
        ";; PgBouncer userlist.txt\n\
         \"{PLAIN_USER}\" \"{PLAIN_PASSWORD}\"\n\
         \"{HASHED_USER}\" \"{md5_secret}\"\n"
    );
    let config = auth_config("md5", cluster.port, &[]).replacen(
        "[weir]\n",
        "[weir]\nauth_file = \"userlist.txt\"\n",
        1,
    );
    let weir = Weir::start_with(ConfigFormat::Toml, &config, &[("userlist.txt", &userlist)]);

    assert_logs_in(&weir, PLAIN_USER, PLAIN_PASSWORD).await;
    assert_logs_in(&weir, HASHED_USER, HASHED_PASSWORD).await;
    assert_psql_logs_in(&weir, PLAIN_USER, Some(PLAIN_PASSWORD));
    assert_refused(&weir, HASHED_USER, "wrong").await;
    assert_refused(&weir, "nobody", "whatever").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_database_is_refused_with_3d000() {
    // Weir refuses before it needs a server, so nothing has to listen on the database's port.
    let weir = Weir::start(&auth_config(
        "scram-sha-256",
        free_port(),
        &[(PLAIN_USER, PLAIN_PASSWORD)],
    ));
    let result = common::try_connect(&weir.url(PLAIN_USER, PLAIN_PASSWORD, "no_such_db")).await;
    let err = expect_sqlstate(result, "3D000", "login to an unknown database");
    assert_eq!(support::db_message(&err), "no such database: no_such_db");
}
