//! Configuration text: pgbouncer.ini and weir.toml built from real setting names.

use super::pick;
use crate::mutate;
use rand::rngs::StdRng;
use rand::Rng;

const GENERAL: &[(&str, &[&str])] = &[
    ("listen_port", &["6432", "0", "99999", "abc", "-1"]),
    ("listen_addr", &["*", "127.0.0.1", ""]),
    (
        "pool_mode",
        &["transaction", "session", "statement", "sometimes"],
    ),
    ("default_pool_size", &["20", "0", "1"]),
    ("min_pool_size", &["0", "99"]),
    ("max_client_conn", &["100", "0"]),
    (
        "reserve_pool_timeout",
        &["0.5", "5s", "250ms", "1e400", "-1", "1.2.3"],
    ),
    (
        "server_lifetime",
        &["1h", "3600", "99999999999999999999", "9999999999999999999d"],
    ),
    ("query_timeout", &["0", "2min", "NaN", "inf"]),
    (
        "auth_type",
        &["md5", "scram-sha-256", "trust", "hba", "cert", "plain"],
    ),
    ("auth_file", &["users.txt", "", "../../etc/passwd"]),
    ("auth_hba_file", &["hba.conf", ""]),
    ("admin_users", &["postgres, admin", "", ","]),
    ("tcp_keepalive", &["yes", "no", "1", "maybe"]),
    ("server_reset_query", &["DISCARD ALL", "'quoted'"]),
    ("max_prepared_statements", &["0", "100", "-5"]),
    (
        "client_tls_sslmode",
        &["disable", "require", "verify-full", "bogus"],
    ),
    ("logfile", &["/x/pgbouncer.log"]),
    ("frobnicate", &["3"]),
];

const CONNSTRINGS: &[&str] = &[
    "host=localhost dbname=postgres",
    "host=127.0.0.1 port=300 user=baz password=foo client_encoding=UNICODE",
    "pool_size=50 reserve_pool=10 pool_mode=session",
    "password='it''s a \\'secret\\'' connect_query='SELECT 1'",
    "host=a,b port=5433,5434",
    "host=/srv/pg port=5499",
    "port=x",
    "password='open",
    "=x",
    "host",
    "pool_size=0",
    "shards=x",
    "",
];

fn value(rng: &mut StdRng, values: &[&str]) -> String {
    if rng.gen_bool(0.9) {
        pick(rng, values).to_string()
    } else {
        format!("{}", rng.gen::<i64>())
    }
}

/// A `pgbouncer_ini` input: sections, settings, connection strings, comments, includes.
pub fn ini_input(rng: &mut StdRng) -> Vec<u8> {
    let mut s = String::new();
    for _ in 0..rng.gen_range(1..12) {
        match rng.gen_range(0..10) {
            0 => s.push_str(pick(
                rng,
                &[
                    "[pgbouncer]",
                    "[databases]",
                    "[users]",
                    "[peers]",
                    "[other]",
                    "[pgbouncer",
                ],
            )),
            1 => s.push_str(pick(
                rng,
                &["; comment", "# comment", "", "%include extra.ini"],
            )),
            2..=5 => {
                let (key, values) = GENERAL[rng.gen_range(0..GENERAL.len())];
                s.push_str(&format!("{key} = {}", value(rng, values)));
            }
            _ => {
                let name = pick(rng, &["app", "*", "user1", "old", "x y"]);
                s.push_str(&format!("{name} = {}", pick(rng, CONNSTRINGS)));
            }
        }
        s.push('\n');
    }
    if !s.starts_with('[') && rng.gen_bool(0.7) {
        s.insert_str(0, "[pgbouncer]\n");
    }
    if rng.gen_bool(0.2) {
        mutate(rng, s.into_bytes())
    } else {
        s.into_bytes()
    }
}

const TOML_DATABASE: &[&str] = &[
    "host = \"127.0.0.1\"\nport = 5433",
    "port = 70000",
    "pool_size = 0",
    "shards = [ { primary = \"127.0.0.1:5433\", replicas = [\"127.0.0.1:5434\"] } ]\nsharded_tables = [ { table = \"orders\", column = \"customer_id\", type = \"bigint\" } ]",
    "shards = [ { primary = \"\" } ]",
    "shards = [ { primary = \"[]:5\" } ]",
    "shards = [ { primary = \"h:port\" } ]",
    "host = \"h\"\nshards = [ { primary = \"h:1\" } ]",
    "sharded_tables = [ { table = \"t\", column = \"c\", type = \"float\" } ]",
    "bogus = 1",
];

/// A `weir_toml` input: `[weir]`, `[users.*]` and `[databases.*]` tables.
pub fn toml_input(rng: &mut StdRng) -> Vec<u8> {
    let mut s = String::from("[weir]\n");
    for _ in 0..rng.gen_range(0..6) {
        let (key, values) = GENERAL[rng.gen_range(0..GENERAL.len())];
        let v = value(rng, values);
        let quoted = v.parse::<f64>().is_err() && !matches!(v.as_str(), "true" | "false");
        if quoted || rng.gen_bool(0.2) {
            s.push_str(&format!("{key} = \"{v}\"\n"));
        } else {
            s.push_str(&format!("{key} = {v}\n"));
        }
    }
    for _ in 0..rng.gen_range(0..3) {
        let name = pick(rng, &["app", "\"*\"", "shop", "x"]);
        s.push_str(&format!(
            "[databases.{name}]\n{}\n",
            pick(rng, TOML_DATABASE)
        ));
    }
    if rng.gen_bool(0.3) {
        s.push_str("[users.app]\npassword = \"secret\"\npool_mode = \"session\"\n");
    }
    if rng.gen_bool(0.2) {
        mutate(rng, s.into_bytes())
    } else {
        s.into_bytes()
    }
}
