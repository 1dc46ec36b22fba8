//! Typed configuration with PgBouncer's key names, units and defaults.
//!
//! `weir.toml` is read with serde into the raw document types below, then
//! validated into an immutable [`Config`]. Every error names the file, the key
//! and (where it can be found) the line.

pub mod duration;
pub mod ini;
pub mod secret;
pub mod userlist;

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

pub use crate::tls::SslMode;
pub use secret::Secret;

/// A configuration problem, always tied to the file it came from.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}{}: {key}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Invalid {
        file: String,
        key: String,
        line: Option<usize>,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    Session,
    Transaction,
    Statement,
}

impl fmt::Display for PoolMode {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
            PoolMode::Statement => "statement",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum AuthType {
    #[serde(rename = "trust")]
    Trust,
    #[serde(rename = "any")]
    Any,
    #[serde(rename = "plain")]
    Plain,
    #[serde(rename = "md5")]
    Md5,
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    #[serde(rename = "cert")]
    Cert,
    #[serde(rename = "hba")]
    Hba,
}

impl fmt::Display for AuthType {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            AuthType::Trust => "trust",
            AuthType::Any => "any",
            AuthType::Plain => "plain",
            AuthType::Md5 => "md5",
            AuthType::ScramSha256 => "scram-sha-256",
            AuthType::Cert => "cert",
            AuthType::Hba => "hba",
        })
    }
}

/// A list given either as a TOML array or as PgBouncer's comma-separated string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameList(pub Vec<String>);

impl<'de> Deserialize<'de> for NameList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            One(String),
            Many(Vec<String>),
        }
        Ok(NameList(match Either::deserialize(d)? {
            Either::One(s) => s
                .split(',')
                .map(|p| p.trim().to_string())
                .filter(|p| !p.is_empty())
                .collect(),
            Either::Many(v) => v,
        }))
    }
}

impl NameList {
    pub fn contains(&self, name: &str) -> bool {
        self.0.iter().any(|n| n == name)
    }
}

fn d<T: Into<f64>>(secs: T) -> Duration {
    Duration::from_secs_f64(secs.into())
}

/// PgBouncer's default `auth_query`.
pub const DEFAULT_AUTH_QUERY: &str = "SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END FROM pg_authid WHERE rolname=$1";

/// The `[weir]` section (PgBouncer's `[pgbouncer]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct General {
    pub listen_addr: String,
    pub listen_port: u16,
    pub unix_socket_dir: String,
    pub pool_mode: PoolMode,
    pub max_client_conn: usize,
    pub default_pool_size: usize,
    pub min_pool_size: usize,
    pub reserve_pool_size: usize,
    #[serde(deserialize_with = "duration::de")]
    pub reserve_pool_timeout: Duration,
    pub max_db_connections: usize,
    pub max_user_connections: usize,
    /// Clients (admin console included) one database / one user may have connected; 0 = no
    /// limit. Per database and per user too.
    pub max_db_client_connections: usize,
    pub max_user_client_connections: usize,
    #[serde(deserialize_with = "duration::de")]
    pub query_wait_timeout: Duration,
    /// A client queued this long for a server is sent a NOTICE saying so (0 = never).
    #[serde(deserialize_with = "duration::de")]
    pub query_wait_notify: Duration,
    #[serde(deserialize_with = "duration::de")]
    pub query_timeout: Duration,
    #[serde(deserialize_with = "duration::de")]
    pub server_lifetime: Duration,
    #[serde(deserialize_with = "duration::de")]
    pub server_idle_timeout: Duration,
    #[serde(deserialize_with = "duration::de")]
    pub server_connect_timeout: Duration,
    #[serde(deserialize_with = "duration::de")]
    pub server_login_retry: Duration,
    #[serde(deserialize_with = "duration::de")]
    pub client_login_timeout: Duration,
    #[serde(deserialize_with = "duration::de")]
    pub client_idle_timeout: Duration,
    #[serde(deserialize_with = "duration::de")]
    pub idle_transaction_timeout: Duration,
    /// A client longer than this in one transaction is disconnected (0 = off).
    #[serde(deserialize_with = "duration::de")]
    pub transaction_timeout: Duration,
    /// A pool with no clients and no servers for this long is freed (0 = never).
    #[serde(deserialize_with = "duration::de")]
    pub pool_idle_timeout: Duration,
    /// Session mode: close a server marked for closing (RECONNECT, changed settings) at the
    /// end of its transaction instead of the session's. Transaction mode always does.
    pub server_fast_close: bool,
    #[serde(deserialize_with = "duration::de")]
    pub server_check_delay: Duration,
    pub server_check_query: String,
    pub server_reset_query: String,
    pub server_reset_query_always: bool,
    #[serde(deserialize_with = "duration::de")]
    pub shutdown_timeout: Duration,
    pub max_prepared_statements: usize,
    /// Largest statement (a simple Query, or an extended batch up to Sync) Weir holds whole to
    /// route it on a sharded database; a larger one is refused (08P01). PgBouncer's name;
    /// capped at 1 GiB, PostgreSQL's own limit.
    pub max_packet_size: usize,
    pub auth_type: AuthType,
    pub auth_file: Option<String>,
    /// pg_hba.conf-format rules for `auth_type = hba`.
    pub auth_hba_file: Option<String>,
    /// Looks up users that are in no auth file with `auth_query`, logged in as this user.
    pub auth_user: Option<String>,
    pub auth_query: String,
    /// Database `auth_query` runs in (default: the one the client asked for).
    pub auth_dbname: Option<String>,
    pub admin_users: NameList,
    pub stats_users: NameList,
    pub stats_addr: String,
    pub stats_port: Option<u16>,
    pub ignore_startup_parameters: NameList,
    pub application_name_add_host: bool,
    /// Sent to every client as a NOTICE once it has logged in (empty: none).
    pub login_notify_message: String,
    pub so_reuseport: bool,
    pub tcp_keepalive: bool,
    pub log_connections: bool,
    pub log_disconnections: bool,
    pub log_pooler_errors: bool,
    /// Appends log lines here as well (PgBouncer's `logfile`; reopened on RELOAD/SIGHUP).
    pub logfile: Option<String>,
    /// Written with the process id at start, removed at exit.
    pub pidfile: Option<String>,
    /// 0 logs at LOG level, 1 adds DEBUG, 2 adds NOISE (PgBouncer's `verbose`).
    pub verbose: u8,
    /// `text` (PgBouncer's line layout) or `json` (one object per line; Weir addition).
    pub log_format: String,
    pub server_round_robin: bool,
    /// How long a failing replica is kept out of rotation (Weir addition).
    #[serde(deserialize_with = "duration::de")]
    pub ban_time: Duration,
    /// TLS from clients (see `crate::tls`); file paths are relative to this file.
    pub client_tls_sslmode: SslMode,
    pub client_tls_key_file: Option<String>,
    pub client_tls_cert_file: Option<String>,
    pub client_tls_ca_file: Option<String>,
    /// TLS to servers.
    pub server_tls_sslmode: SslMode,
    pub server_tls_ca_file: Option<String>,
    pub server_tls_key_file: Option<String>,
    pub server_tls_cert_file: Option<String>,
}

impl Default for General {
    fn default() -> Self {
        General {
            listen_addr: "127.0.0.1".into(),
            listen_port: 6432,
            unix_socket_dir: "/tmp".into(),
            pool_mode: PoolMode::Transaction,
            max_client_conn: 1000,
            default_pool_size: 20,
            min_pool_size: 0,
            reserve_pool_size: 5,
            reserve_pool_timeout: d(5),
            max_db_connections: 0,
            max_user_connections: 0,
            max_db_client_connections: 0,
            max_user_client_connections: 0,
            query_wait_timeout: d(120),
            query_wait_notify: d(5),
            query_timeout: d(0),
            server_lifetime: d(3600),
            server_idle_timeout: d(600),
            server_connect_timeout: d(15),
            server_login_retry: d(15),
            client_login_timeout: d(60),
            client_idle_timeout: d(0),
            idle_transaction_timeout: d(0),
            transaction_timeout: d(0),
            pool_idle_timeout: d(0),
            server_fast_close: false,
            server_check_delay: d(30),
            // PgBouncer's default: an empty query, the cheapest round trip.
            server_check_query: String::new(),
            server_reset_query: "DISCARD ALL".into(),
            server_reset_query_always: false,
            shutdown_timeout: d(0),
            max_prepared_statements: 200,
            max_packet_size: 2_147_483_647,
            auth_type: AuthType::ScramSha256,
            auth_file: None,
            auth_hba_file: None,
            auth_user: None,
            auth_query: DEFAULT_AUTH_QUERY.into(),
            auth_dbname: None,
            admin_users: NameList::default(),
            stats_users: NameList::default(),
            stats_addr: "127.0.0.1".into(),
            stats_port: None,
            ignore_startup_parameters: NameList::default(),
            application_name_add_host: false,
            login_notify_message: String::new(),
            so_reuseport: false,
            tcp_keepalive: true,
            log_connections: true,
            log_disconnections: true,
            log_pooler_errors: true,
            logfile: None,
            pidfile: None,
            verbose: 0,
            log_format: "text".into(),
            server_round_robin: false,
            ban_time: d(60),
            client_tls_sslmode: SslMode::Disable,
            client_tls_key_file: None,
            client_tls_cert_file: None,
            client_tls_ca_file: None,
            server_tls_sslmode: SslMode::Prefer,
            server_tls_ca_file: None,
            server_tls_key_file: None,
            server_tls_cert_file: None,
        }
    }
}

/// A `[users.NAME]` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UserSection {
    pub password: Option<String>,
    pub pool_mode: Option<PoolMode>,
    pub pool_size: Option<usize>,
    pub max_user_connections: Option<usize>,
    pub max_user_client_connections: Option<usize>,
    pub reserve_pool_size: Option<usize>,
    #[serde(deserialize_with = "duration::de_opt")]
    pub query_wait_timeout: Option<Duration>,
    /// Per-user timeouts; each overrides the global one when set above 0.
    #[serde(deserialize_with = "duration::de_opt")]
    pub query_timeout: Option<Duration>,
    #[serde(deserialize_with = "duration::de_opt")]
    pub idle_transaction_timeout: Option<Duration>,
    #[serde(deserialize_with = "duration::de_opt")]
    pub transaction_timeout: Option<Duration>,
    #[serde(deserialize_with = "duration::de_opt")]
    pub client_idle_timeout: Option<Duration>,
}

/// One shard of a sharded database (used by the sharding router).
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ShardSection {
    pub primary: String,
    #[serde(default)]
    pub replicas: Vec<String>,
    /// This shard's database name on its servers (default: the database's `dbname`), so
    /// several shards can live on one server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dbname: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ShardedTable {
    pub table: String,
    pub column: String,
    #[serde(rename = "type")]
    pub key_type: String,
}

/// A `[databases.NAME]` section: PgBouncer's connection-string keys.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSection {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub dbname: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub auth_user: Option<String>,
    pub auth_query: Option<String>,
    pub auth_dbname: Option<String>,
    pub pool_size: Option<usize>,
    pub min_pool_size: Option<usize>,
    pub reserve_pool_size: Option<usize>,
    pub pool_mode: Option<PoolMode>,
    pub max_db_connections: Option<usize>,
    pub max_db_client_connections: Option<usize>,
    /// Override the global settings for this database's pools.
    #[serde(deserialize_with = "duration::de_opt")]
    pub query_wait_timeout: Option<Duration>,
    #[serde(deserialize_with = "duration::de_opt")]
    pub server_lifetime: Option<Duration>,
    pub client_encoding: Option<String>,
    pub datestyle: Option<String>,
    pub timezone: Option<String>,
    pub application_name: Option<String>,
    pub connect_query: Option<String>,
    /// With a host list (`host = "a,b"`): `round-robin` (each new server connection takes
    /// the next host, PgBouncer's default) or `disable` (keep to the host that last worked).
    pub load_balance_hosts: Option<String>,
    pub shards: Vec<ShardSection>,
    pub sharded_tables: Vec<ShardedTable>,
    pub read_from_replicas: bool,
    /// Read-your-writes on replicas (Weir addition): `off`, `client` (`true`), `global`;
    /// `client` by default when `read_from_replicas` is on.
    pub read_your_writes: Option<ReadYourWrites>,
    /// How often each shard server's WAL position is sampled (default 10ms).
    #[serde(deserialize_with = "duration::de_opt")]
    pub replica_lsn_interval: Option<Duration>,
    /// A replica further behind its primary than this (time, or bytes of WAL) gets no
    /// reads until it catches up; 0 = no limit.
    #[serde(deserialize_with = "duration::de_opt")]
    pub max_replica_lag: Option<Duration>,
    pub max_replica_lag_bytes: Option<u64>,
    /// Writes spanning shards commit with two-phase commit (needs
    /// max_prepared_transactions > 0 on the shards).
    pub two_phase_commit: bool,
    /// In a transaction spread over shards, a lock wait longer than this fails with
    /// 40P01 (a deadlock across servers no PostgreSQL can see); 0 = wait forever.
    #[serde(deserialize_with = "duration::de_opt")]
    pub cross_shard_lock_timeout: Option<Duration>,
}

/// Whose writes a replica read must see (see `router::wal`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadYourWrites {
    /// Replicas serve reads whatever they lag.
    #[default]
    Off,
    /// A client's reads on a shard see that client's own committed writes.
    Client,
    /// Every read sees every write this Weir acknowledged.
    Global,
}

impl ReadYourWrites {
    pub fn as_str(self) -> &'static str {
        match self {
            ReadYourWrites::Off => "off",
            ReadYourWrites::Client => "client",
            ReadYourWrites::Global => "global",
        }
    }
}

impl<'de> Deserialize<'de> for ReadYourWrites {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ReadYourWrites;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("true, false, \"off\", \"client\" or \"global\"")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(if v {
                    ReadYourWrites::Client
                } else {
                    ReadYourWrites::Off
                })
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                match v.to_ascii_lowercase().as_str() {
                    "off" | "false" => Ok(ReadYourWrites::Off),
                    "client" | "on" | "true" => Ok(ReadYourWrites::Client),
                    "global" => Ok(ReadYourWrites::Global),
                    _ => Err(E::custom(format!(
                        "read_your_writes must be off, client or global, not {v:?}"
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// The whole document as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Document {
    #[serde(alias = "pgbouncer")]
    pub weir: General,
    pub users: BTreeMap<String, UserSection>,
    pub databases: BTreeMap<String, DatabaseSection>,
}

/// A user Weir knows, with the secret clients must prove and the per-user limits.
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub secret: Option<Secret>,
    pub pool_mode: Option<PoolMode>,
    pub pool_size: Option<usize>,
    pub max_user_connections: usize,
    /// This user's own client limit (0: the global `max_user_client_connections`).
    pub max_user_client_connections: usize,
    pub timeouts: Timeouts,
    /// This user's own reserve_pool_size / query_wait_timeout (None: the database's, else the
    /// global one).
    pub reserve_pool_size: Option<usize>,
    pub query_wait_timeout: Option<Duration>,
}

/// Client timeouts: a user's own (zero: the global one applies), or those that apply to one
/// client (its user's, else the global ones).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeouts {
    pub query: Duration,
    pub idle_transaction: Duration,
    pub transaction: Duration,
    pub client_idle: Duration,
}

/// A backend address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Address {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// A database clients can connect to, resolved with defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Database {
    pub name: String,
    pub address: Address,
    pub dbname: String,
    pub user: Option<String>,
    pub password: Option<String>,
    /// `auth_user` / `auth_query` / `auth_dbname`, the database's own or the global ones.
    pub auth_user: Option<String>,
    pub auth_query: String,
    pub auth_dbname: Option<String>,
    pub pool_size: Option<usize>,
    pub min_pool_size: usize,
    pub reserve_pool_size: usize,
    pub pool_mode: Option<PoolMode>,
    pub max_db_connections: usize,
    /// Clients this database may have connected (0 = no limit).
    pub max_db_client_connections: usize,
    /// This database's own query_wait_timeout / server_lifetime (None: the global one).
    pub query_wait_timeout: Option<Duration>,
    pub server_lifetime: Option<Duration>,
    /// Startup parameters forced on server connections (client_encoding, …).
    pub server_params: Vec<(String, String)>,
    pub connect_query: Option<String>,
    /// Every host of a host list (`host=a,b`), in order; the first is `address`. Empty for
    /// a single host.
    pub hosts: Vec<Address>,
    /// `load_balance_hosts` as configured (`round-robin` when not set).
    pub load_balance_hosts: Option<String>,
    pub shards: Vec<ShardSection>,
    pub sharded_tables: Vec<ShardedTable>,
    pub read_from_replicas: bool,
    pub read_your_writes: ReadYourWrites,
    pub replica_lsn_interval: Duration,
    pub max_replica_lag: Duration,
    pub max_replica_lag_bytes: u64,
    pub two_phase_commit: bool,
    pub cross_shard_lock_timeout: Duration,
}

/// The effective, validated configuration. Immutable; reload builds a new one.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub general: General,
    pub users: BTreeMap<String, User>,
    /// Shared, so each client holds a pointer, not a copy.
    pub databases: BTreeMap<String, Arc<Database>>,
    /// Settings the loader accepted but did not use (pgbouncer.ini import).
    pub warnings: Vec<String>,
    /// The rules of `auth_hba_file` (`auth_type = hba`).
    pub hba: Option<crate::auth::hba::Hba>,
    /// TLS acceptor and connector, built from the `*_tls_*` settings when the config loads.
    pub tls: crate::tls::Tls,
    /// The document this config was built from: the admin console's SET changes one value
    /// in it and builds the config again, exactly as a reload of an edited file would.
    pub source: Arc<Document>,
}

impl Config {
    /// Loads and validates a config file: `*.ini` is PgBouncer's format, anything else TOML.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        if path.extension().is_some_and(|ext| ext == "ini") {
            return ini::load(path);
        }
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        let doc: Document = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            file: file.clone(),
            message: e.to_string().trim_end().to_string(),
        })?;
        Config::from_document(path, &text, doc)
    }

    /// Parses TOML text as if read from `path` (used by tests and `--check`).
    pub fn from_toml(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let doc: Document = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: path.display().to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        Config::from_document(path, text, doc)
    }

    /// Builds and validates a config from its document; `text` (the file's text, if any)
    /// lets errors name their line.
    pub fn from_document(path: &Path, text: &str, doc: Document) -> Result<Config, ConfigError> {
        let v = Validator { path, text };
        v.general(&doc.weir)?;
        let mut users = BTreeMap::new();
        if let Some(auth_file) = &doc.weir.auth_file {
            let auth_path = resolve(path, auth_file);
            for (name, password) in userlist::load(&auth_path)? {
                let secret = Secret::parse(&password);
                users.insert(name.clone(), User::new(name, Some(secret)));
            }
        }
        for (name, section) in &doc.users {
            let user = users
                .entry(name.clone())
                .or_insert_with(|| User::new(name.clone(), None));
            if let Some(p) = &section.password {
                user.secret = Some(Secret::parse(p));
            }
            user.pool_mode = section.pool_mode.or(user.pool_mode);
            user.pool_size = section.pool_size.or(user.pool_size);
            user.max_user_connections = section.max_user_connections.unwrap_or(0);
            user.max_user_client_connections = section.max_user_client_connections.unwrap_or(0);
            user.reserve_pool_size = section.reserve_pool_size;
            user.query_wait_timeout = section.query_wait_timeout;
            let own = |d: Option<Duration>| d.unwrap_or_default();
            user.timeouts = Timeouts {
                query: own(section.query_timeout),
                idle_transaction: own(section.idle_transaction_timeout),
                transaction: own(section.transaction_timeout),
                client_idle: own(section.client_idle_timeout),
            };
        }
        let mut databases = BTreeMap::new();
        for (name, section) in &doc.databases {
            databases.insert(
                name.clone(),
                Arc::new(v.database(name, section, &doc.weir)?),
            );
        }
        let warnings = Vec::new();
        let hba = match &doc.weir.auth_hba_file {
            Some(f) => {
                let hba_path = resolve(path, f);
                let file = hba_path.display().to_string();
                let text =
                    std::fs::read_to_string(&hba_path).map_err(|source| ConfigError::Read {
                        file: file.clone(),
                        source,
                    })?;
                let rules = crate::auth::hba::Hba::parse(&text).map_err(|(line, message)| {
                    ConfigError::Invalid {
                        file,
                        key: "auth_hba_file".into(),
                        line: Some(line),
                        message,
                    }
                })?;
                Some(rules)
            }
            None if doc.weir.auth_type == AuthType::Hba => {
                return Err(v.err("weir", "auth_hba_file", "auth_type hba needs auth_hba_file"));
            }
            None => None,
        };
        let tls =
            crate::tls::Tls::load(path, &doc.weir).map_err(|e| v.err("weir", e.key, e.message))?;
        Ok(Config {
            path: path.to_path_buf(),
            general: doc.weir.clone(),
            source: Arc::new(doc),
            users,
            databases,
            warnings,
            hba,
            tls,
        })
    }

    /// The timeouts for a client of `user`: its own where set, else the global ones.
    pub fn timeouts(&self, user: &str) -> Timeouts {
        let own = self.users.get(user).map(|u| u.timeouts).unwrap_or_default();
        let g = &self.general;
        let pick = |own: Duration, global: Duration| if own.is_zero() { global } else { own };
        Timeouts {
            query: pick(own.query, g.query_timeout),
            idle_transaction: pick(own.idle_transaction, g.idle_transaction_timeout),
            transaction: pick(own.transaction, g.transaction_timeout),
            client_idle: pick(own.client_idle, g.client_idle_timeout),
        }
    }

    /// How many clients `user` may have connected: its own `max_user_client_connections`,
    /// else the global one (0 = no limit).
    pub fn user_client_limit(&self, user: &str) -> usize {
        self.users
            .get(user)
            .map(|u| u.max_user_client_connections)
            .filter(|n| *n > 0)
            .unwrap_or(self.general.max_user_client_connections)
    }

    /// The database section for a client's database name, or the `*` fallback.
    pub fn database(&self, name: &str) -> Option<Arc<Database>> {
        if let Some(db) = self.databases.get(name) {
            return Some(db.clone());
        }
        let mut fallback = Database::clone(self.databases.get("*")?);
        fallback.name = name.to_string();
        fallback.dbname = name.to_string();
        Some(Arc::new(fallback))
    }
}

impl User {
    fn new(name: String, secret: Option<Secret>) -> User {
        User {
            name,
            secret,
            pool_mode: None,
            pool_size: None,
            max_user_connections: 0,
            max_user_client_connections: 0,
            timeouts: Timeouts::default(),
            reserve_pool_size: None,
            query_wait_timeout: None,
        }
    }
}

/// Resolves a path given in a config file: relative to that file's directory, or, when
/// nothing is there but the name exists relative to the working directory, that one (which
/// is what PgBouncer, opening the name as given, finds).
pub fn resolve(config_path: &Path, p: &str) -> PathBuf {
    let candidate = Path::new(p);
    if candidate.is_absolute() {
        return candidate.to_path_buf();
    }
    let beside = config_path
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join(candidate);
    if !beside.exists() && candidate.exists() {
        return candidate.to_path_buf();
    }
    beside
}

struct Validator<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Validator<'_> {
    fn err(&self, section: &str, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.path.display().to_string(),
            key: if section.is_empty() {
                key.to_string()
            } else {
                format!("{section}.{key}")
            },
            line: find_line(self.text, section, key),
            message: message.into(),
        }
    }

    fn general(&self, g: &General) -> Result<(), ConfigError> {
        if g.listen_port == 0 {
            return Err(self.err("weir", "listen_port", "must be between 1 and 65535"));
        }
        if g.default_pool_size == 0 {
            return Err(self.err("weir", "default_pool_size", "must be at least 1"));
        }
        if g.max_client_conn == 0 {
            return Err(self.err("weir", "max_client_conn", "must be at least 1"));
        }
        if g.min_pool_size > g.default_pool_size {
            return Err(self.err(
                "weir",
                "min_pool_size",
                format!(
                    "min_pool_size ({}) exceeds default_pool_size ({})",
                    g.min_pool_size, g.default_pool_size
                ),
            ));
        }
        if let Some(name) = g
            .auth_dbname
            .as_deref()
            .filter(|n| crate::admin::is_admin_db(n))
        {
            return Err(self.err(
                "weir",
                "auth_dbname",
                format!("cannot use the reserved \"{name}\" database as an auth_dbname"),
            ));
        }
        if g.auth_type == AuthType::Cert {
            return Err(self.err(
                "weir",
                "auth_type",
                format!("auth_type {} is not supported yet", g.auth_type),
            ));
        }
        Ok(())
    }

    fn database(
        &self,
        name: &str,
        s: &DatabaseSection,
        g: &General,
    ) -> Result<Database, ConfigError> {
        let section = format!("databases.{name}");
        if s.shards.is_empty() && s.host.is_none() && name != "*" {
            // PgBouncer connects over the Unix socket when host is absent; Weir
            // uses localhost TCP, which is what that means on one machine.
        }
        if !s.shards.is_empty() && s.host.is_some() {
            return Err(self.err(
                &section,
                "host",
                "a sharded database takes shards, not host",
            ));
        }
        for (i, shard) in s.shards.iter().enumerate() {
            for addr in std::iter::once(&shard.primary).chain(&shard.replicas) {
                parse_address(addr).map_err(|m| self.err(&section, &format!("shards[{i}]"), m))?;
            }
        }
        if let Some(0) = s.pool_size {
            return Err(self.err(&section, "pool_size", "must be at least 1"));
        }
        let mut server_params = Vec::new();
        for (key, value) in [
            ("client_encoding", &s.client_encoding),
            ("datestyle", &s.datestyle),
            ("timezone", &s.timezone),
            ("application_name", &s.application_name),
        ] {
            if let Some(v) = value {
                server_params.push((key.to_string(), v.clone()));
            }
        }
        if let Some(mode) = s.load_balance_hosts.as_deref() {
            if mode != "round-robin" && mode != "disable" {
                return Err(self.err(
                    &section,
                    "load_balance_hosts",
                    "must be round-robin or disable",
                ));
            }
        }
        let port = s.port.unwrap_or(5432);
        let hosts: Vec<Address> = match &s.host {
            Some(list) if s.shards.is_empty() && list.contains(',') => list
                .split(',')
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .map(|h| Address {
                    host: h.trim_matches(|c| c == '[' || c == ']').to_string(),
                    port,
                })
                .collect(),
            _ => Vec::new(),
        };
        let address = match (s.shards.first(), hosts.first()) {
            (Some(shard), _) => {
                parse_address(&shard.primary).map_err(|m| self.err(&section, "shards", m))?
            }
            (None, Some(first)) => first.clone(),
            (None, None) => Address {
                host: s.host.clone().unwrap_or_else(|| "127.0.0.1".into()),
                port,
            },
        };
        Ok(Database {
            name: name.to_string(),
            address,
            dbname: s.dbname.clone().unwrap_or_else(|| name.to_string()),
            user: s.user.clone(),
            password: s.password.clone(),
            auth_user: s.auth_user.clone().or_else(|| g.auth_user.clone()),
            auth_query: s.auth_query.clone().unwrap_or_else(|| g.auth_query.clone()),
            auth_dbname: s.auth_dbname.clone().or_else(|| g.auth_dbname.clone()),
            pool_size: s.pool_size,
            min_pool_size: s.min_pool_size.unwrap_or(g.min_pool_size),
            reserve_pool_size: s.reserve_pool_size.unwrap_or(g.reserve_pool_size),
            pool_mode: s.pool_mode,
            max_db_connections: s.max_db_connections.unwrap_or(g.max_db_connections),
            max_db_client_connections: s
                .max_db_client_connections
                .filter(|n| *n > 0)
                .unwrap_or(g.max_db_client_connections),
            query_wait_timeout: s.query_wait_timeout,
            server_lifetime: s.server_lifetime,
            server_params,
            connect_query: s.connect_query.clone(),
            hosts,
            load_balance_hosts: s.load_balance_hosts.clone(),
            shards: s.shards.clone(),
            sharded_tables: s.sharded_tables.clone(),
            read_from_replicas: s.read_from_replicas,
            read_your_writes: s.read_your_writes.unwrap_or(if s.read_from_replicas {
                ReadYourWrites::Client
            } else {
                ReadYourWrites::Off
            }),
            replica_lsn_interval: s
                .replica_lsn_interval
                .filter(|d| !d.is_zero())
                .unwrap_or(Duration::from_millis(10))
                .max(Duration::from_millis(1)),
            max_replica_lag: s.max_replica_lag.unwrap_or_default(),
            max_replica_lag_bytes: s.max_replica_lag_bytes.unwrap_or(0),
            two_phase_commit: s.two_phase_commit,
            cross_shard_lock_timeout: s.cross_shard_lock_timeout.unwrap_or(Duration::from_secs(1)),
        })
    }
}

/// Parses `host:port` or `[host]:port` (an IPv6 address in brackets); the port defaults to
/// 5432, so `host` and `[::1]` are addresses too.
pub fn parse_address(text: &str) -> Result<Address, String> {
    if text.is_empty() {
        return Err("empty address".into());
    }
    let (host, port) = match text.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !text.ends_with(']') => (host, Some(port)),
        _ => (text, None),
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(format!("empty host in address {text:?}"));
    }
    let port = match port {
        Some(p) => p
            .parse()
            .map_err(|_| format!("invalid port in address {text:?}"))?,
        None => 5432,
    };
    Ok(Address {
        host: host.to_string(),
        port,
    })
}

/// Finds the 1-based line where `key` is set inside `[section]` of a TOML text.
fn find_line(text: &str, section: &str, key: &str) -> Option<usize> {
    let mut in_section = section.is_empty();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            let name = t.trim_matches(['[', ']']).trim().replace('"', "");
            in_section = name == section || (section == "weir" && name == "pgbouncer");
            continue;
        }
        if in_section {
            if let Some((k, _)) = t.split_once('=') {
                if k.trim() == key {
                    return Some(i + 1);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(Path::new("/tmp/weir.toml"), text)
    }

    #[test]
    fn defaults_match_pgbouncer_except_reserve() {
        let c = load("").unwrap();
        assert_eq!(c.general.listen_port, 6432);
        assert_eq!(c.general.default_pool_size, 20);
        assert_eq!(c.general.reserve_pool_size, 5);
        assert_eq!(c.general.reserve_pool_timeout, Duration::from_secs(5));
        assert_eq!(c.general.query_wait_timeout, Duration::from_secs(120));
        assert_eq!(c.general.pool_mode, PoolMode::Transaction);
    }

    #[test]
    fn reads_the_reference_shape() {
        let c = load(
            r#"
[weir]
listen_port = 7000
reserve_pool_timeout = "250ms"
admin_users = ["admin"]
stats_users = "a, b"

[users.app]
password = "secret"

[databases.app]
host = "127.0.0.1"
port = 5433

[databases.shop]
shards = [ { primary = "127.0.0.1:5433", replicas = ["127.0.0.1:5434"] } ]
sharded_tables = [ { table = "orders", column = "customer_id", type = "bigint" } ]
"#,
        )
        .unwrap();
        assert_eq!(c.general.listen_port, 7000);
        assert_eq!(c.general.reserve_pool_timeout, Duration::from_millis(250));
        assert_eq!(c.general.stats_users.0, vec!["a", "b"]);
        assert_eq!(c.databases["app"].dbname, "app");
        assert_eq!(c.databases["app"].address.port, 5433);
        assert_eq!(c.databases["shop"].address.port, 5433);
        assert!(matches!(c.users["app"].secret, Some(Secret::Plain(_))));
    }

    #[test]
    fn unknown_key_names_the_line() {
        let e = load("[weir]\nlisten_port = 1\nbogus_key = 3\n").unwrap_err();
        let s = e.to_string();
        assert!(s.contains("/tmp/weir.toml"), "{s}");
        assert!(s.contains("line 3"), "{s}");
        assert!(s.contains("bogus_key"), "{s}");
    }

    #[test]
    fn semantic_error_names_key_and_line() {
        let e = load("[weir]\n\ndefault_pool_size = 0\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "/tmp/weir.toml:3: weir.default_pool_size: must be at least 1"
        );
    }

    #[test]
    fn addresses_take_brackets_and_default_the_port() {
        let a = |host: &str, port| {
            Ok(Address {
                host: host.into(),
                port,
            })
        };
        assert_eq!(parse_address("db:6000"), a("db", 6000));
        assert_eq!(parse_address("db"), a("db", 5432));
        assert_eq!(parse_address("[::1]:6000"), a("::1", 6000));
        // Found by the weir_toml fuzz target: these used to give "invalid port" and an
        // empty host.
        assert_eq!(parse_address("[::1]"), a("::1", 5432));
        assert!(parse_address("[]:5").is_err());
        assert!(parse_address("db:port").is_err());
        assert!(parse_address("").is_err());
    }

    #[test]
    fn star_database_is_a_fallback() {
        let c = load("[databases.\"*\"]\nport = 5999\n").unwrap();
        let db = c.database("anything").unwrap();
        assert_eq!(db.dbname, "anything");
        assert_eq!(db.address.port, 5999);
    }
}
