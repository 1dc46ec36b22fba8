//! SHOW CONFIG and SET: the `[weir]` settings by PgBouncer's key names, how
//! each is shown, and which ones SET can change while Weir runs.
//!
//! SET changes the one value in the document the running config was built from and builds
//! the config again (validation, TLS files, database defaults, auth files: everything a
//! reload of the edited file would do), then hands it to the same reload path as RELOAD, so
//! pools whose settings change are replaced exactly as after editing the file. Like
//! PgBouncer, the next RELOAD reads the file again and overrides what SET changed.

use crate::config::duration;
use crate::config::{AuthType, Config, General, NameList, PoolMode, SslMode};
use std::time::Duration;

type Getter = fn(&General) -> String;
type Setter = fn(&mut General, &str) -> Result<(), String>;

struct Setting {
    key: &'static str,
    get: Getter,
    /// `None`: fixed while running (needs a restart, or files SET cannot load).
    set: Option<Setter>,
}

fn show_secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{}", d.as_secs())
    } else {
        format!("{s}")
    }
}

fn show_bool(b: bool) -> String {
    // PgBouncer shows booleans as 1 / 0.
    if b { "1" } else { "0" }.to_string()
}

fn show_flag(b: &bool) -> String {
    show_bool(*b)
}

fn show_opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map(ToString::to_string).unwrap_or_default()
}

fn parse_num(v: &str) -> Result<usize, String> {
    v.trim()
        .parse()
        .map_err(|_| format!("invalid number {v:?}"))
}

fn parse_bool(v: &str) -> Result<bool, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "on" | "true" | "yes" => Ok(true),
        "0" | "off" | "false" | "no" => Ok(false),
        _ => Err(format!("invalid boolean {v:?}")),
    }
}

fn parse_list(v: &str) -> NameList {
    NameList(
        v.split(',')
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect(),
    )
}

fn parse_pool_mode(v: &str) -> Result<PoolMode, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        "session" => Ok(PoolMode::Session),
        "transaction" => Ok(PoolMode::Transaction),
        "statement" => Ok(PoolMode::Statement),
        _ => Err(format!("invalid pool_mode {v:?}")),
    }
}

macro_rules! fixed {
    ($k:ident, $show:expr) => {
        Setting {
            key: stringify!($k),
            get: |g| $show(&g.$k),
            set: None,
        }
    };
}

macro_rules! number {
    ($k:ident) => {
        Setting {
            key: stringify!($k),
            get: |g| g.$k.to_string(),
            set: Some(|g, v| {
                g.$k = parse_num(v)?;
                Ok(())
            }),
        }
    };
}

macro_rules! seconds {
    ($k:ident) => {
        Setting {
            key: stringify!($k),
            get: |g| show_secs(g.$k),
            set: Some(|g, v| {
                g.$k = duration::parse(v)?;
                Ok(())
            }),
        }
    };
}

macro_rules! flag {
    ($k:ident) => {
        Setting {
            key: stringify!($k),
            get: |g| show_bool(g.$k),
            set: Some(|g, v| {
                g.$k = parse_bool(v)?;
                Ok(())
            }),
        }
    };
}

macro_rules! string {
    ($k:ident) => {
        Setting {
            key: stringify!($k),
            get: |g| g.$k.clone(),
            set: Some(|g, v| {
                g.$k = v.to_string();
                Ok(())
            }),
        }
    };
}

/// An optional string (a file, a user): empty means none, as in PgBouncer.
macro_rules! optional {
    ($k:ident) => {
        Setting {
            key: stringify!($k),
            get: |g| show_opt(&g.$k),
            set: Some(|g, v| {
                let v = v.trim();
                g.$k = (!v.is_empty()).then(|| v.to_string());
                Ok(())
            }),
        }
    };
}

/// A keyword the config file takes (auth_type, the TLS modes), read the same way.
fn parse_keyword<T: serde::de::DeserializeOwned>(v: &str) -> Result<T, String> {
    use serde::de::IntoDeserializer;
    let word = v.trim().to_ascii_lowercase();
    T::deserialize(word.as_str().into_deserializer())
        .map_err(|e: serde::de::value::Error| format!("invalid value {v:?}: {e}"))
}

macro_rules! parsed {
    ($k:ident, $t:ty) => {
        Setting {
            key: stringify!($k),
            get: |g| g.$k.to_string(),
            set: Some(|g, v| {
                g.$k = parse_keyword::<$t>(v)?;
                Ok(())
            }),
        }
    };
}

macro_rules! list {
    ($k:ident) => {
        Setting {
            key: stringify!($k),
            get: |g| g.$k.0.join(","),
            set: Some(|g, v| {
                g.$k = parse_list(v);
                Ok(())
            }),
        }
    };
}

/// Every setting, sorted by key as PgBouncer (1.25) lists them.
fn settings() -> Vec<Setting> {
    let mut all = vec![
        list!(admin_users),
        flag!(application_name_add_host),
        optional!(auth_dbname),
        optional!(auth_file),
        optional!(auth_hba_file),
        string!(auth_query),
        parsed!(auth_type, AuthType),
        optional!(auth_user),
        seconds!(ban_time),
        seconds!(client_idle_timeout),
        seconds!(client_login_timeout),
        optional!(client_tls_ca_file),
        optional!(client_tls_cert_file),
        optional!(client_tls_key_file),
        parsed!(client_tls_sslmode, SslMode),
        number!(default_pool_size),
        seconds!(idle_transaction_timeout),
        list!(ignore_startup_parameters),
        fixed!(listen_addr, String::clone),
        fixed!(listen_port, ToString::to_string),
        flag!(log_connections),
        flag!(log_disconnections),
        string!(log_format),
        flag!(log_pooler_errors),
        string!(login_notify_message),
        optional!(logfile),
        number!(max_client_conn),
        number!(max_db_client_connections),
        number!(max_db_connections),
        number!(max_packet_size),
        number!(max_prepared_statements),
        number!(max_user_client_connections),
        number!(max_user_connections),
        number!(min_pool_size),
        fixed!(pidfile, show_opt),
        seconds!(pool_idle_timeout),
        Setting {
            key: "pool_mode",
            get: |g| g.pool_mode.to_string(),
            set: Some(|g, v| {
                g.pool_mode = parse_pool_mode(v)?;
                Ok(())
            }),
        },
        seconds!(query_timeout),
        seconds!(query_wait_notify),
        seconds!(query_wait_timeout),
        number!(reserve_pool_size),
        seconds!(reserve_pool_timeout),
        string!(server_check_query),
        seconds!(server_check_delay),
        seconds!(server_connect_timeout),
        flag!(server_fast_close),
        seconds!(server_idle_timeout),
        seconds!(server_lifetime),
        seconds!(server_login_retry),
        string!(server_reset_query),
        flag!(server_reset_query_always),
        flag!(server_round_robin),
        optional!(server_tls_ca_file),
        optional!(server_tls_cert_file),
        optional!(server_tls_key_file),
        parsed!(server_tls_sslmode, SslMode),
        seconds!(shutdown_timeout),
        fixed!(so_reuseport, show_flag),
        fixed!(stats_addr, String::clone),
        fixed!(stats_port, show_opt),
        list!(stats_users),
        fixed!(tcp_keepalive, show_flag),
        seconds!(transaction_timeout),
        fixed!(unix_socket_dir, String::clone),
        Setting {
            key: "verbose",
            get: |g| g.verbose.to_string(),
            set: Some(|g, v| {
                g.verbose = v
                    .trim()
                    .parse()
                    .map_err(|_| format!("invalid verbose {v:?}"))?;
                Ok(())
            }),
        },
    ];
    all.sort_by_key(|s| s.key);
    all
}

/// SHOW CONFIG rows: key, value, default, changeable (`yes` = SET takes it).
pub fn rows(g: &General) -> Vec<[String; 4]> {
    let defaults = General::default();
    settings()
        .iter()
        .map(|s| {
            [
                s.key.to_string(),
                (s.get)(g),
                (s.get)(&defaults),
                if s.set.is_some() { "yes" } else { "no" }.to_string(),
            ]
        })
        .collect()
}

/// The effective configuration in the format of the file it came from (`weir --check`):
/// PgBouncer's ini (`[databases]`, `[users]`, `[pgbouncer]`) for a `.ini` file, else Weir's
/// TOML. Every `[pgbouncer]`/`[weir]` setting is listed with the value in force (defaults
/// included); passwords are never printed.
pub fn render_effective(config: &crate::config::Config) -> String {
    let ini = config.path.extension().is_some_and(|e| e == "ini");
    let mut out = String::new();
    let comment = if ini { ";" } else { "#" };
    out.push_str(&format!(
        "{comment} effective configuration of {}\n",
        config.path.display()
    ));
    let general = rows(&config.general);
    if ini {
        out.push_str("\n[databases]\n");
        for db in config.databases.values() {
            out.push_str(&format!("{} = {}\n", db.name, ini_database(db)));
        }
        out.push_str("\n[users]\n");
        for u in config.users.values() {
            let mut parts = Vec::new();
            if let Some(m) = u.pool_mode {
                parts.push(format!("pool_mode={m}"));
            }
            if let Some(n) = u.pool_size {
                parts.push(format!("pool_size={n}"));
            }
            if u.max_user_connections > 0 {
                parts.push(format!("max_user_connections={}", u.max_user_connections));
            }
            if !parts.is_empty() {
                out.push_str(&format!("{} = {}\n", u.name, parts.join(" ")));
            }
        }
        out.push_str("\n[pgbouncer]\n");
        for [key, value, default, _] in &general {
            if value.is_empty() && value == default {
                out.push_str(&format!("; {key} is not set\n"));
            } else {
                out.push_str(&format!("{key} = {value}\n"));
            }
        }
        return out;
    }
    out.push_str("\n[weir]\n");
    for [key, value, default, _] in &general {
        // An empty value that is also the default stays unset: "" is not always a valid
        // value (a file path), and unset means exactly the default.
        match toml_value(key, value).filter(|_| !(value.is_empty() && value == default)) {
            Some(v) => out.push_str(&format!("{key} = {v}\n")),
            None => out.push_str(&format!("# {key} is not set\n")),
        }
    }
    for db in config.databases.values() {
        out.push_str(&format!("\n[databases.{}]\n", toml_string(&db.name)));
        out.push_str(&format!("host = {}\n", toml_string(&db.address.host)));
        out.push_str(&format!("port = {}\n", db.address.port));
        if db.dbname != db.name {
            out.push_str(&format!("dbname = {}\n", toml_string(&db.dbname)));
        }
        if let Some(u) = &db.user {
            out.push_str(&format!("user = {}\n", toml_string(u)));
        }
        if let Some(n) = db.pool_size {
            out.push_str(&format!("pool_size = {n}\n"));
        }
        if let Some(m) = db.pool_mode {
            out.push_str(&format!("pool_mode = \"{m}\"\n"));
        }
        if !db.shards.is_empty() {
            out.push_str(&format!("# {} shards\n", db.shards.len()));
        }
    }
    for u in config.users.values() {
        out.push_str(&format!("\n[users.{}]\n", toml_string(&u.name)));
        if let Some(m) = u.pool_mode {
            out.push_str(&format!("pool_mode = \"{m}\"\n"));
        }
        if let Some(n) = u.pool_size {
            out.push_str(&format!("pool_size = {n}\n"));
        }
    }
    out
}

/// A database as a PgBouncer `[databases]` connection string.
fn ini_database(db: &crate::config::Database) -> String {
    let quote = |v: &str| {
        if v.is_empty() || v.contains(|c: char| c.is_whitespace() || c == '\'') {
            format!("'{}'", v.replace('\'', "''"))
        } else {
            v.to_string()
        }
    };
    let mut parts = vec![
        format!("host={}", quote(&db.address.host)),
        format!("port={}", db.address.port),
    ];
    // The default dbname is the entry's own name (for `*`, the name a client asks for).
    if db.dbname != db.name {
        parts.push(format!("dbname={}", quote(&db.dbname)));
    }
    if let Some(u) = &db.user {
        parts.push(format!("user={}", quote(u)));
    }
    if let Some(n) = db.pool_size {
        parts.push(format!("pool_size={n}"));
    }
    if db.min_pool_size > 0 {
        parts.push(format!("min_pool_size={}", db.min_pool_size));
    }
    parts.push(format!("reserve_pool_size={}", db.reserve_pool_size));
    if let Some(m) = db.pool_mode {
        parts.push(format!("pool_mode={m}"));
    }
    if db.max_db_connections > 0 {
        parts.push(format!("max_db_connections={}", db.max_db_connections));
    }
    if let Some(q) = &db.connect_query {
        parts.push(format!("connect_query={}", quote(q)));
    }
    for (k, v) in &db.server_params {
        parts.push(format!("{k}={}", quote(v)));
    }
    parts.join(" ")
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// `value` (as SHOW CONFIG shows it) in the TOML form the `[weir]` section accepts for
/// `key`: bare when it reads back as a number, a flag as a boolean, else a string; `None`
/// for an unset optional setting (no TOML value means "unset").
fn toml_value(key: &str, value: &str) -> Option<String> {
    let candidates = [
        value.to_string(),
        match value {
            "1" => "true".to_string(),
            "0" => "false".to_string(),
            other => other.to_string(),
        },
        toml_string(value),
    ];
    for c in &candidates {
        let doc = format!("[weir]\n{key} = {c}\n");
        if toml::from_str::<crate::config::Document>(&doc).is_ok() {
            return Some(c.clone());
        }
    }
    (!value.is_empty()).then(|| toml_string(value))
}

/// Why a SET was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetError {
    UnknownKey,
    /// Fixed while running.
    NotChangeable,
    Invalid(String),
}

impl std::fmt::Display for SetError {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            SetError::UnknownKey => f.write_str("unknown parameter"),
            SetError::NotChangeable => f.write_str("cannot be changed while running"),
            SetError::Invalid(m) => f.write_str(m),
        }
    }
}

/// The config with `key` set to `value`: the running config's document with that one value
/// changed, built and validated as the loader would (TLS files read, database defaults
/// derived again).
pub fn apply(config: &Config, key: &str, value: &str) -> Result<Config, SetError> {
    let list = settings();
    let setting = list
        .iter()
        .find(|s| s.key.eq_ignore_ascii_case(key))
        .ok_or(SetError::UnknownKey)?;
    let set = setting.set.ok_or(SetError::NotChangeable)?;
    let mut doc = (*config.source).clone();
    set(&mut doc.weir, value).map_err(SetError::Invalid)?;
    let mut new = Config::from_document(&config.path, "", doc)
        .map_err(|e| SetError::Invalid(e.to_string()))?;
    new.warnings = config.warnings.clone();
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(text: &str) -> Config {
        Config::from_toml(Path::new("/tmp/weir.toml"), text).expect("config")
    }

    #[test]
    fn show_config_lists_keys_sorted_with_defaults() {
        let c = config("[weir]\ndefault_pool_size = 7\nreserve_pool_timeout = \"250ms\"\n");
        let rows = rows(&c.general);
        let keys: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        assert_eq!(keys, sorted);
        let row = |k: &str| rows.iter().find(|r| r[0] == k).cloned().expect(k);
        assert_eq!(
            row("default_pool_size"),
            ["default_pool_size", "7", "20", "yes"]
        );
        assert_eq!(row("reserve_pool_timeout")[1], "0.25");
        assert_eq!(row("query_wait_timeout")[1], "120");
        assert_eq!(row("listen_port")[3], "no");
        assert_eq!(row("log_connections")[1], "1");
        // pgbouncer_exporter parses these two as numbers.
        assert!(row("max_client_conn")[1].parse::<f64>().is_ok());
        assert!(row("max_user_connections")[1].parse::<f64>().is_ok());
    }

    #[test]
    fn set_changes_one_value_and_inherited_database_values() {
        let c = config(
            "[weir]\nreserve_pool_size = 5\n\
             [databases.a]\nport = 5432\n\
             [databases.b]\nport = 5432\nreserve_pool_size = 1\n",
        );
        let n = apply(&c, "default_pool_size", "3").expect("set");
        assert_eq!(n.general.default_pool_size, 3);
        let n = apply(&c, "RESERVE_POOL_SIZE", "2").expect("set");
        assert_eq!(n.databases["a"].reserve_pool_size, 2);
        assert_eq!(n.databases["b"].reserve_pool_size, 1);
        let n = apply(&c, "query_wait_timeout", "0.5").expect("set");
        assert_eq!(n.general.query_wait_timeout, Duration::from_millis(500));
        let n = apply(&c, "pool_mode", "session").expect("set");
        assert_eq!(n.general.pool_mode, PoolMode::Session);
    }

    #[test]
    fn set_refuses_unknown_fixed_and_invalid() {
        let c = config("");
        assert_eq!(apply(&c, "nope", "1").err(), Some(SetError::UnknownKey));
        assert_eq!(
            apply(&c, "listen_port", "1").err(),
            Some(SetError::NotChangeable)
        );
        assert!(matches!(
            apply(&c, "default_pool_size", "0"),
            Err(SetError::Invalid(_))
        ));
        assert!(matches!(
            apply(&c, "max_client_conn", "many"),
            Err(SetError::Invalid(_))
        ));
    }
}
