//! Importer for an unchanged `pgbouncer.ini`, so `weir /etc/pgbouncer/pgbouncer.ini` runs.
//!
//! The ini text becomes the same serde [`Document`] that `weir.toml` produces and then goes
//! through the same validation ([`Config::from_document`]); the structs in `mod.rs` stay the
//! single statement of which settings exist and what type each has. The format follows
//! PgBouncer (libusual's `cfparser.c` and PgBouncer's `loader.c`):
//!
//! - `[pgbouncer]` is Weir's `[weir]` section; `[databases]` and `[users]` hold one
//!   libpq-style connection string per name; `[peers]` and unknown sections are skipped
//!   with a warning.
//! - Lines starting with `;` or `#` are comments; there are no trailing comments, a value
//!   runs to the end of its line (trailing whitespace trimmed).
//! - `%include FILE` splices another file in place (relative to the including file), at most
//!   [`MAX_INCLUDE_DEPTH`] deep as in libusual; the current section carries across.
//!
//! Nothing is dropped silently: settings Weir does not use produce a warning naming the file,
//! line and key, logged and kept in [`Config::warnings`] for `weir --check`.

use super::{Config, ConfigError, DatabaseSection, Document, General, UserSection};
use serde::de::{self, DeserializeOwned, Visitor};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use toml::{Table, Value};

/// libusual's `MAX_INCLUDE`: how deep `%include` may nest (this also stops include loops).
pub const MAX_INCLUDE_DEPTH: usize = 10;

/// A pgbouncer.ini read into Weir's document, with what the import had to leave out.
#[derive(Debug)]
pub struct IniImport {
    pub document: Document,
    pub warnings: Vec<String>,
    /// Where each setting was written, keyed as validation errors name it
    /// (`weir.listen_port`, `databases.app`, `databases.app.pool_size`).
    origins: HashMap<String, Origin>,
}

/// Loads and validates a pgbouncer.ini file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: path.display().to_string(),
        source,
    })?;
    from_text(path, &text)
}

/// Validates pgbouncer.ini text as if read from `path` (includes and `auth_file` resolve
/// relative to `path`).
pub fn from_text(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let IniImport {
        document,
        warnings,
        origins,
    } = import(path, text)?;
    // The ini text is not TOML, so validation cannot find lines itself; `locate` adds them.
    let mut config =
        Config::from_document(path, "", document).map_err(|e| locate(path, &origins, e))?;
    let mut all = warnings;
    all.append(&mut config.warnings);
    config.warnings = all;
    Ok(config)
}

/// Reads pgbouncer.ini text (and its includes) into a [`Document`], logging each warning.
pub fn import(path: &Path, text: &str) -> Result<IniImport, ConfigError> {
    let mut entries = Vec::new();
    read_entries(path, text, 0, &mut entries)?;
    let mut importer = Importer::new(path);
    for entry in &entries {
        importer.entry(entry)?;
    }
    importer.finish()
}

/// Where a line of the (possibly included) configuration was written.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    file: PathBuf,
    line: usize,
}

impl Origin {
    fn error(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.display().to_string(),
            key: key.to_string(),
            line: Some(self.line),
            message: message.into(),
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// One meaningful line of the configuration, with includes already spliced in.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    Section(String),
    Setting { key: String, value: String },
}

#[derive(Debug)]
struct Entry {
    origin: Origin,
    line: Line,
}

/// Splits `text` into entries, expanding `%include` in place.
fn read_entries(
    file: &Path,
    text: &str,
    depth: usize,
    out: &mut Vec<Entry>,
) -> Result<(), ConfigError> {
    for (i, raw) in text.lines().enumerate() {
        let origin = Origin {
            file: file.to_path_buf(),
            line: i + 1,
        };
        let t = raw.trim();
        if t.is_empty() || t.starts_with([';', '#']) {
            continue;
        }
        if let Some(target) = include_target(t) {
            include(&origin, target, depth, out)?;
            continue;
        }
        let line = parse_line(t).map_err(|m| origin.error("syntax", m))?;
        out.push(Entry { origin, line });
    }
    Ok(())
}

/// The file name of a `%include FILE` line (libusual wants blank space after `%include`).
fn include_target(t: &str) -> Option<&str> {
    let rest = t.strip_prefix("%include")?;
    (rest.is_empty() || rest.starts_with(char::is_whitespace)).then(|| rest.trim())
}

fn include(
    from: &Origin,
    target: &str,
    depth: usize,
    out: &mut Vec<Entry>,
) -> Result<(), ConfigError> {
    if target.is_empty() {
        return Err(from.error("%include", "expected a file name"));
    }
    if depth + 1 >= MAX_INCLUDE_DEPTH {
        return Err(from.error(
            "%include",
            format!("includes nest deeper than {MAX_INCLUDE_DEPTH} files (an include loop?)"),
        ));
    }
    let path = super::resolve(&from.file, target);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| from.error("%include", format!("cannot read {}: {e}", path.display())))?;
    read_entries(&path, &text, depth + 1, out)
}

/// Parses a non-empty, non-comment line: `[section]` or `key = value`.
fn parse_line(t: &str) -> Result<Line, String> {
    if let Some(rest) = t.strip_prefix('[') {
        let (name, after) = rest
            .split_once(']')
            .ok_or("unterminated section header; expected `[name]`")?;
        let after = after.trim_start();
        if !(after.is_empty() || after.starts_with([';', '#'])) {
            return Err(format!("unexpected {after:?} after the section header"));
        }
        return Ok(Line::Section(name.trim().to_ascii_lowercase()));
    }
    let (key, value) = t
        .split_once('=')
        .ok_or_else(|| format!("expected `key = value`, found {t:?}"))?;
    let key = key.trim();
    if key.is_empty() {
        return Err(format!("missing the name before `=` in {t:?}"));
    }
    Ok(Line::Setting {
        key: key.to_string(),
        value: value.trim().to_string(),
    })
}

/// Parses a `[databases]`/`[users]` value: libpq-style `key=value` pairs separated by
/// spaces. A value may be single-quoted; inside quotes `''` (PgBouncer) and a backslash
/// before any character (libpq, e.g. `\'`) stand for that character. Keys are lowercased.
fn parse_connstring(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        let key_end = rest
            .find(|c: char| c == '=' || c.is_whitespace())
            .unwrap_or(rest.len());
        let key = &rest[..key_end];
        let after_key = rest[key_end..].trim_start();
        let Some(after_eq) = after_key.strip_prefix('=').filter(|_| !key.is_empty()) else {
            return Err(format!("expected `key=value`, found {rest:?}"));
        };
        let after_eq = after_eq.trim_start();
        let (value, tail) = match after_eq.strip_prefix('\'') {
            Some(quoted) => unquote(quoted).ok_or_else(|| {
                format!("unterminated quoted value for {key}: missing the closing '")
            })?,
            None => {
                let end = after_eq.find(char::is_whitespace).unwrap_or(after_eq.len());
                (after_eq[..end].to_string(), &after_eq[end..])
            }
        };
        pairs.push((key.to_ascii_lowercase(), value));
        rest = tail.trim_start();
    }
    Ok(pairs)
}

/// Reads a single-quoted value whose opening quote is already consumed; returns the value
/// and the text after the closing quote, or `None` if the quote is never closed.
fn unquote(text: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => value.push(chars.next()?.1),
            '\'' if matches!(chars.peek(), Some((_, '\''))) => {
                chars.next();
                value.push('\'');
            }
            '\'' => return Some((value, &text[i + 1..])),
            c => value.push(c),
        }
    }
    None
}

/// PgBouncer `[pgbouncer]` settings Weir knows about and deliberately does not use, each
/// group with the reason its warning gives. A name ending in `*` matches a prefix.
const IGNORED: &[(&[&str], &str)] = &[
    (
        &["syslog", "syslog_ident", "syslog_facility"],
        "Weir logs to stderr and logfile, not to syslog",
    ),
    (
        &["log_stats", "stats_period"],
        "Weir reports statistics on stats_port (Prometheus), not in the log",
    ),
    (
        &["user", "conffile", "service_name", "job_name"],
        "Weir runs in the foreground as the user that starts it",
    ),
    (
        &["unix_socket_mode", "unix_socket_group"],
        "Unix socket permissions are not configurable in Weir",
    ),
    (
        &[
            "listen_backlog",
            "pkt_buf",
            "sbuf_loopcnt",
            "tcp_defer_accept",
            "tcp_socket_buffer",
            "tcp_keepcnt",
            "tcp_keepidle",
            "tcp_keepintvl",
            "tcp_user_timeout",
        ],
        "socket and buffer tuning is not configurable in Weir",
    ),
    (
        &[
            "dns_max_ttl",
            "dns_nxdomain_ttl",
            "dns_zone_check_period",
            "resolv_conf",
        ],
        "Weir resolves host names with the system resolver",
    ),
    (
        &["client_tls*", "server_tls*"],
        "TLS protocol versions and ciphers are not configurable in Weir (rustls: TLS 1.2 and 1.3 with its safe defaults)",
    ),
    (
        &[
            "auth_ident_file",
            "scram_iterations",
            "track_extra_parameters",
            "disable_pqexec",
            "peer_id",
            "autodb_idle_timeout",
            "cancel_wait_timeout",
            "suspend_timeout",
        ],
        "not supported by Weir yet",
    ),
];

fn ignored_reason(key: &str) -> Option<&'static str> {
    IGNORED.iter().find_map(|(names, reason)| {
        names
            .iter()
            .any(|n| match n.strip_suffix('*') {
                Some(prefix) => key.starts_with(prefix),
                None => key == *n,
            })
            .then_some(*reason)
    })
}

/// `[pgbouncer]` settings that name a file.
fn is_file_setting(key: &str) -> bool {
    matches!(key, "auth_file" | "auth_hba_file")
        || (key.starts_with("client_tls_") || key.starts_with("server_tls_"))
            && key.ends_with("_file")
}

/// Weir-only `[databases.NAME]` keys that a one-line connection string cannot express.
const TOML_ONLY_DATABASE_KEYS: &[&str] = &["shards", "sharded_tables"];

/// Maps PgBouncer's older connection-string key names to the current ones.
fn canonical_database_key(key: String) -> String {
    match key.as_str() {
        "reserve_pool" => "reserve_pool_size".to_string(),
        _ => key,
    }
}

/// The section whose settings are being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    None,
    General,
    Databases,
    Users,
    Skipped,
}

/// Builds the TOML tables of a [`Document`] from ini entries.
struct Importer<'a> {
    main: &'a Path,
    section: Section,
    general: Table,
    databases: Table,
    users: Table,
    origins: HashMap<String, Origin>,
    warnings: Vec<String>,
}

impl<'a> Importer<'a> {
    fn new(main: &'a Path) -> Self {
        Importer {
            main,
            section: Section::None,
            general: Table::new(),
            databases: Table::new(),
            users: Table::new(),
            origins: HashMap::new(),
            warnings: Vec::new(),
        }
    }

    fn warn(&mut self, origin: &Origin, message: String) {
        let warning = format!("{origin}: {message}");
        tracing::warn!("{warning}");
        self.warnings.push(warning);
    }

    fn entry(&mut self, entry: &Entry) -> Result<(), ConfigError> {
        let origin = &entry.origin;
        let (key, value) = match &entry.line {
            Line::Section(name) => {
                self.enter(origin, name);
                return Ok(());
            }
            Line::Setting { key, value } => (key.as_str(), value.as_str()),
        };
        match self.section {
            Section::None => {
                Err(origin.error(key, "setting outside a section such as [pgbouncer]"))
            }
            Section::General => self.general(origin, key, value),
            Section::Databases => self.database(origin, key, value),
            Section::Users => self.user(origin, key, value),
            Section::Skipped => Ok(()),
        }
    }

    fn enter(&mut self, origin: &Origin, name: &str) {
        self.section = match name {
            "pgbouncer" => Section::General,
            "databases" => Section::Databases,
            "users" => Section::Users,
            "peers" => {
                self.warn(
                    origin,
                    "[peers]: peering is not supported by Weir; section ignored".into(),
                );
                Section::Skipped
            }
            other => {
                self.warn(origin, format!("[{other}]: unknown section; ignored"));
                Section::Skipped
            }
        };
    }

    fn general(&mut self, origin: &Origin, key: &str, value: &str) -> Result<(), ConfigError> {
        let key = key.to_ascii_lowercase();
        if !field_names::<General>().contains(&key.as_str()) {
            let why = ignored_reason(&key).unwrap_or("unknown setting");
            self.warn(origin, format!("[pgbouncer] {key}: {why}; ignored"));
            return Ok(());
        }
        let value = if is_file_setting(&key) {
            // PgBouncer treats an empty file setting as none.
            if value.is_empty() {
                self.general.remove(&key);
                return Ok(());
            }
            self.auth_file(origin, value)
        } else {
            value.to_string()
        };
        let typed = typed::<General>(&key, &value)
            .map_err(|m| origin.error(&format!("pgbouncer.{key}"), m))?;
        self.origins.insert(format!("weir.{key}"), origin.clone());
        self.general.insert(key, typed);
        Ok(())
    }

    /// The shared validation resolves file settings against the main file; one set in an
    /// included file elsewhere is made relative to that file, like `%include` itself.
    fn auth_file(&self, origin: &Origin, value: &str) -> String {
        if origin.file == self.main {
            value.to_string()
        } else {
            super::resolve(&origin.file, value).display().to_string()
        }
    }

    fn database(&mut self, origin: &Origin, name: &str, value: &str) -> Result<(), ConfigError> {
        let section = format!("databases.{name}");
        let pairs = parse_connstring(value).map_err(|m| origin.error(&section, m))?;
        let pairs = pairs
            .into_iter()
            .map(|(key, value)| (canonical_database_key(key), value))
            .filter_map(|(key, value)| self.single_tcp_server(origin, name, key, value))
            .collect();
        let table = self.typed_pairs::<DatabaseSection>(origin, &section, pairs)?;
        self.origins.insert(section, origin.clone());
        self.databases.insert(name.to_string(), Value::Table(table));
        Ok(())
    }

    /// PgBouncer 1.20+'s host lists (`host=a,b`) are kept (one port for all of them); of a
    /// port list (`port=1,2`) the first entry is used. A Unix socket directory
    /// (`host=/run/postgresql`) is kept: the server is reached through its socket there.
    fn single_tcp_server(
        &mut self,
        origin: &Origin,
        name: &str,
        key: String,
        value: String,
    ) -> Option<(String, String)> {
        if key != "port" {
            return Some((key, value));
        }
        let value = match value.split_once(',') {
            Some((first, _)) => {
                let first = first.trim().to_string();
                self.warn(
                    origin,
                    format!("[databases] {name}: {key} list {value:?} is not supported; using {first:?}"),
                );
                first
            }
            None => value,
        };
        Some((key, value))
    }

    fn user(&mut self, origin: &Origin, name: &str, value: &str) -> Result<(), ConfigError> {
        let section = format!("users.{name}");
        let pairs = parse_connstring(value).map_err(|m| origin.error(&section, m))?;
        let table = self.typed_pairs::<UserSection>(origin, &section, pairs)?;
        self.origins.insert(section, origin.clone());
        self.users.insert(name.to_string(), Value::Table(table));
        Ok(())
    }

    /// Types each connection-string pair against the section struct `T`; keys `T` does not
    /// have are warned about and left out.
    fn typed_pairs<T: DeserializeOwned>(
        &mut self,
        origin: &Origin,
        section: &str,
        pairs: Vec<(String, String)>,
    ) -> Result<Table, ConfigError> {
        let (kind, name) = section.split_once('.').unwrap_or((section, ""));
        let mut table = Table::new();
        for (key, raw) in pairs {
            if TOML_ONLY_DATABASE_KEYS.contains(&key.as_str()) {
                let why = "sharding is configured in weir.toml only";
                self.warn(origin, format!("[{kind}] {name}: {key}: {why}; ignored"));
                continue;
            }
            if !field_names::<T>().contains(&key.as_str()) {
                self.warn(
                    origin,
                    format!("[{kind}] {name}: unknown key {key}; ignored"),
                );
                continue;
            }
            let full_key = format!("{section}.{key}");
            let typed = typed::<T>(&key, &raw).map_err(|m| origin.error(&full_key, m))?;
            self.origins.insert(full_key, origin.clone());
            table.insert(key, typed);
        }
        Ok(table)
    }

    fn finish(mut self) -> Result<IniImport, ConfigError> {
        // PgBouncer's default pool_mode is session (Weir's own TOML default is transaction):
        // an ini that does not say runs as it would under PgBouncer.
        if !self.general.contains_key("pool_mode") {
            self.general
                .insert("pool_mode".into(), Value::String("session".into()));
        }
        let mut root = Table::new();
        root.insert("weir".into(), Value::Table(self.general));
        root.insert("databases".into(), Value::Table(self.databases));
        root.insert("users".into(), Value::Table(self.users));
        // Every setting was typed against these structs already, so this only assembles.
        let document = Value::Table(root)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                file: self.main.display().to_string(),
                message: e.to_string().trim_end().to_string(),
            })?;
        Ok(IniImport {
            document,
            warnings: self.warnings,
            origins: self.origins,
        })
    }
}

/// Types an ini value for field `key` of `T`: the first of string, integer, float and
/// boolean (PgBouncer's 0/1, yes/no, on/off, true/false) that `T`'s own serde accepts, so the
/// struct stays the one statement of each setting's type. On failure the error is the one
/// for the most specific reading of the text (`99999` reports the integer, not the string).
fn typed<T: DeserializeOwned>(key: &str, raw: &str) -> Result<Value, String> {
    let mut error = String::new();
    for candidate in readings(raw) {
        let is_bool = matches!(candidate, Value::Boolean(_));
        let mut probe = Table::new();
        probe.insert(key.to_string(), candidate.clone());
        match Value::Table(probe).try_into::<T>() {
            Ok(_) => return Ok(candidate),
            Err(e) if !is_bool || error.is_empty() => error = e.message().to_string(),
            Err(_) => {}
        }
    }
    Err(error)
}

/// The ways an ini value can be read, least specific first.
fn readings(raw: &str) -> Vec<Value> {
    let mut out = vec![Value::String(raw.to_string())];
    if let Ok(i) = raw.parse::<i64>() {
        out.push(Value::Integer(i));
    } else if raw.contains('.') && raw.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        if let Ok(f) = raw.parse::<f64>() {
            out.push(Value::Float(f));
        }
    }
    let boolean = match raw.to_ascii_lowercase().as_str() {
        "1" | "yes" | "on" | "true" => Some(true),
        "0" | "no" | "off" | "false" => Some(false),
        _ => None,
    };
    out.extend(boolean.map(Value::Boolean));
    out
}

/// The field names a serde-derived struct accepts, read from its derive, so that "is this
/// a setting Weir knows?" cannot drift from the struct.
fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut names: &'static [&'static str] = &[];
    let _ = T::deserialize(FieldNames(&mut names));
    names
}

/// A deserializer that only records the field list `deserialize_struct` is called with.
struct FieldNames<'a>(&'a mut &'static [&'static str]);

impl<'de> de::Deserializer<'de> for FieldNames<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(de::Error::custom("field names recorded"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

/// Gives a validation error from the shared code the file and line where the ini set it,
/// and PgBouncer's section name for general settings.
fn locate(main: &Path, origins: &HashMap<String, Origin>, err: ConfigError) -> ConfigError {
    match err {
        ConfigError::Invalid {
            file,
            key,
            line: None,
            message,
        } if Path::new(&file) == main => {
            let origin = origins.get(&key).or_else(|| {
                key.rsplit_once('.')
                    .and_then(|(section, _)| origins.get(section))
            });
            ConfigError::Invalid {
                file: origin.map_or(file, |o| o.file.display().to_string()),
                key: match key.strip_prefix("weir.") {
                    Some(k) => format!("pgbouncer.{k}"),
                    None => key,
                },
                line: origin.map(|o| o.line),
                message,
            }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AuthType, PoolMode, Secret};
    use std::time::Duration;

    const INI: &str = "/etc/pgbouncer/pgbouncer.ini";

    fn load(text: &str) -> Result<Config, ConfigError> {
        from_text(Path::new(INI), text)
    }

    fn invalid_line(e: &ConfigError) -> Option<usize> {
        match e {
            ConfigError::Invalid { line, .. } => *line,
            _ => None,
        }
    }

    /// Shaped like PgBouncer's own etc/pgbouncer.ini example.
    const EXAMPLE: &str = r#"
;; database name = connect string
;;
;; connect string params:
;;   dbname= host= port= user= password= auth_user=
;;   client_encoding= datestyle= timezone=
;;   pool_size= reserve_pool_size= max_db_connections=
;;   pool_mode= connect_query= application_name=
[databases]
postgres = host=localhost dbname=postgres
bardb = host=localhost dbname=bazdb
forcedb = host=127.0.0.1 port=300 user=baz password=foo client_encoding=UNICODE datestyle=ISO connect_query='SELECT 1'
nondefaultdb = pool_size=50 reserve_pool_size=10 pool_mode=session
foodb =
* = host=testserver

[users]
user1 = pool_mode=session max_user_connections=10

[pgbouncer]
logfile = /var/log/pgbouncer/pgbouncer.log
pidfile = /var/run/pgbouncer/pgbouncer.pid
listen_addr = *
listen_port = 6432
auth_type = md5
admin_users = postgres, admin
stats_users = stats
pool_mode = transaction
server_reset_query = DISCARD ALL
ignore_startup_parameters = extra_float_digits
max_client_conn = 100
default_pool_size = 20
reserve_pool_timeout = 0.5
server_lifetime = 1h
log_connections = 0
tcp_keepalive = yes
server_round_robin = on
unix_socket_dir =
client_tls_ciphers = fast
frobnicate = 3
"#;

    #[test]
    fn imports_pgbouncer_example_config() {
        let c = load(EXAMPLE).unwrap();
        let g = &c.general;
        assert_eq!(g.listen_addr, "*");
        assert_eq!(g.listen_port, 6432);
        assert_eq!(g.auth_type, AuthType::Md5);
        assert_eq!(g.admin_users.0, vec!["postgres", "admin"]);
        assert_eq!(g.stats_users.0, vec!["stats"]);
        assert_eq!(g.pool_mode, PoolMode::Transaction);
        assert_eq!(g.server_reset_query, "DISCARD ALL");
        assert_eq!(g.ignore_startup_parameters.0, vec!["extra_float_digits"]);
        assert_eq!(g.max_client_conn, 100);
        assert_eq!(g.reserve_pool_timeout, Duration::from_millis(500));
        assert_eq!(g.server_lifetime, Duration::from_secs(3600));
        assert!(!g.log_connections && g.tcp_keepalive && g.server_round_robin);
        assert_eq!(g.unix_socket_dir, "");
        assert_eq!(
            g.logfile.as_deref(),
            Some("/var/log/pgbouncer/pgbouncer.log")
        );
        assert_eq!(
            g.pidfile.as_deref(),
            Some("/var/run/pgbouncer/pgbouncer.pid")
        );

        let forcedb = &c.databases["forcedb"];
        assert_eq!(forcedb.address.to_string(), "127.0.0.1:300");
        assert_eq!(forcedb.user.as_deref(), Some("baz"));
        assert_eq!(forcedb.password.as_deref(), Some("foo"));
        assert_eq!(forcedb.connect_query.as_deref(), Some("SELECT 1"));
        assert!(forcedb
            .server_params
            .contains(&("client_encoding".into(), "UNICODE".into())));
        assert_eq!(c.databases["bardb"].dbname, "bazdb");
        let nondefault = &c.databases["nondefaultdb"];
        assert_eq!(nondefault.pool_size, Some(50));
        assert_eq!(nondefault.reserve_pool_size, 10);
        assert_eq!(nondefault.pool_mode, Some(PoolMode::Session));
        assert_eq!(c.databases["foodb"].dbname, "foodb");
        let any = c.database("whatever").unwrap();
        assert_eq!(
            (any.address.host.as_str(), any.dbname.as_str()),
            ("testserver", "whatever")
        );

        assert_eq!(c.users["user1"].pool_mode, Some(PoolMode::Session));
        assert_eq!(c.users["user1"].max_user_connections, 10);
    }

    #[test]
    fn warns_about_every_setting_it_does_not_use() {
        let c = load(EXAMPLE).unwrap();
        let has = |needle: &str| c.warnings.iter().any(|w| w.contains(needle));
        assert!(!has("logfile") && !has("pidfile"), "{:#?}", c.warnings);
        assert!(has(
            "[pgbouncer] client_tls_ciphers: TLS protocol versions and ciphers are not configurable"
        ));
        assert!(has(
            "pgbouncer.ini:40: [pgbouncer] frobnicate: unknown setting; ignored"
        ));
        assert!(!has("max_user_connections"), "{:#?}", c.warnings);
        assert_eq!(c.warnings.len(), 2, "{:#?}", c.warnings);
    }

    #[test]
    fn warns_about_unknown_connection_string_keys_and_sections() {
        let c = load(
            "[databases]\napp = host=db frobnicate='SELECT 1' load_balance_hostz=disable\n\
             [peers]\n1 = host=/tmp/a\n[users]\nbob = frobnicate=3\n",
        )
        .unwrap();
        let w = c.warnings.join("\n");
        assert!(
            w.contains(":2: [databases] app: unknown key frobnicate; ignored"),
            "{w}"
        );
        assert!(
            w.contains(":2: [databases] app: unknown key load_balance_hostz"),
            "{w}"
        );
        assert!(w.contains(":3: [peers]: peering is not supported"), "{w}");
        assert!(w.contains(":6: [users] bob: unknown key frobnicate"), "{w}");
        assert_eq!(c.databases["app"].address.host, "db");
        assert!(!w.contains("host=/tmp/a"));
    }

    #[test]
    fn reads_old_key_names_and_refuses_sharding_keys() {
        let c = load("[databases]\nold = reserve_pool=3 shards=x\n").unwrap();
        assert_eq!(c.databases["old"].reserve_pool_size, 3);
        assert!(c.databases["old"].shards.is_empty());
        let w = c.warnings.join("\n");
        assert!(
            w.contains("[databases] old: shards: sharding is configured in weir.toml only"),
            "{w}"
        );
    }

    #[test]
    fn connection_string_quoting_follows_libpq_and_pgbouncer() {
        let pairs = parse_connstring(
            r"host=h password='it''s a \'secret\'' dbname = 'a\\b' application_name='' port=1",
        )
        .unwrap();
        let expected = [
            ("host", "h"),
            ("password", "it's a 'secret'"),
            ("dbname", r"a\b"),
            ("application_name", ""),
            ("port", "1"),
        ];
        let expected: Vec<(String, String)> = expected
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(pairs, expected);
        assert_eq!(parse_connstring("HOST=x").unwrap()[0].0, "host");
        assert!(parse_connstring("password='open").is_err());
        assert!(parse_connstring("password='ends in backslash\\'").is_err());
        assert!(parse_connstring("host").is_err());
        assert!(parse_connstring("=x").is_err());
    }

    #[test]
    fn quoted_values_reach_the_database() {
        let c = load("[databases]\napp = password='p w''d' connect_query='SET x = 1'\n").unwrap();
        assert_eq!(c.databases["app"].password.as_deref(), Some("p w'd"));
        assert_eq!(
            c.databases["app"].connect_query.as_deref(),
            Some("SET x = 1")
        );
    }

    #[test]
    fn values_keep_their_text_where_a_string_is_expected() {
        let c = load("[databases]\napp = dbname=0123 user=42 password=1.5 port=5433\n").unwrap();
        let app = &c.databases["app"];
        assert_eq!(app.dbname, "0123");
        assert_eq!(app.user.as_deref(), Some("42"));
        assert_eq!(app.password.as_deref(), Some("1.5"));
        assert_eq!(app.address.port, 5433);
    }

    #[test]
    fn malformed_lines_name_file_and_line() {
        let cases = [
            (
                "[pgbouncer]\nlisten_port 6432\n",
                2,
                "expected `key = value`",
            ),
            (
                "[databases]\napp = password='oops\n",
                2,
                "unterminated quoted value",
            ),
            ("[pgbouncer\n", 1, "unterminated section header"),
            ("listen_port = 1\n", 1, "outside a section"),
            ("[pgbouncer]\n\nlisten_port = abc\n", 3, "expected u16"),
            ("[pgbouncer]\nlisten_port = 99999\n", 2, "99999"),
            ("[pgbouncer]\npool_mode = sometimes\n", 2, "sometimes"),
            ("[pgbouncer]\ntcp_keepalive = maybe\n", 2, "maybe"),
            ("[databases]\napp = port=x\n", 2, "databases.app.port"),
            ("[pgbouncer]\n%include\n", 2, "expected a file name"),
        ];
        for (text, line, needle) in cases {
            let e = load(text).unwrap_err();
            let s = e.to_string();
            assert_eq!(invalid_line(&e), Some(line), "{text:?}: {s}");
            assert!(s.starts_with(INI), "{s}");
            assert!(s.contains(needle), "{text:?}: {s}");
            assert!(!s.contains('\n'), "one line: {s}");
        }
    }

    #[test]
    fn validation_errors_point_at_the_ini_line() {
        let e = load("[pgbouncer]\n; pool\ndefault_pool_size = 0\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{INI}:3: pgbouncer.default_pool_size: must be at least 1")
        );
        let e = load("[databases]\n\napp = host=h pool_size=0\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{INI}:3: databases.app.pool_size: must be at least 1")
        );
    }

    #[test]
    fn host_lists_and_socket_directories_are_kept_port_lists_reduced() {
        let c = load(
            "[databases]\nlb = host=a,b port=5433,5434\nsock = host=/var/run/postgresql port=5499\n",
        )
        .unwrap();
        assert_eq!(c.databases["lb"].address.to_string(), "a:5433");
        let hosts: Vec<String> = c.databases["lb"]
            .hosts
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(hosts, vec!["a:5433", "b:5433"]);
        assert_eq!(c.databases["sock"].address.host, "/var/run/postgresql");
        assert_eq!(c.databases["sock"].address.port, 5499);
        let w = c.warnings.join("\n");
        assert!(!w.contains("host list"), "{w}");
        assert!(w.contains("[databases] lb: port list"), "{w}");
        assert!(!w.contains("sock"), "{w}");
    }

    #[test]
    fn recognises_field_names_from_the_structs() {
        assert!(field_names::<General>().contains(&"listen_port"));
        assert!(field_names::<DatabaseSection>().contains(&"connect_query"));
        assert!(field_names::<UserSection>().contains(&"max_user_connections"));
        assert!(field_names::<General>().contains(&"logfile"));
        assert!(!field_names::<General>().contains(&"syslog"));
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn include_splices_files_relative_to_the_includer() {
        let dir = tempfile::tempdir().unwrap();
        let main = write(
            dir.path(),
            "pgbouncer.ini",
            "[pgbouncer]\nlisten_port = 7000\n%include conf.d/extra.ini\nlater = port=5556\n",
        );
        // Still in [pgbouncer] until the included file switches section; nested include
        // resolves against conf.d/.
        write(
            dir.path(),
            "conf.d/extra.ini",
            "default_pool_size = 7\n%include dbs.ini\n",
        );
        write(
            dir.path(),
            "conf.d/dbs.ini",
            "[databases]\napp = port=5555\n",
        );
        let c = Config::load(&main).unwrap();
        assert_eq!(c.general.listen_port, 7000);
        assert_eq!(c.general.default_pool_size, 7);
        assert_eq!(c.databases["app"].address.port, 5555);
        // Back in the main file the section is still [databases], as in PgBouncer.
        assert_eq!(c.databases["later"].address.port, 5556);
    }

    #[test]
    fn include_errors_name_the_including_line() {
        let dir = tempfile::tempdir().unwrap();
        let main = write(
            dir.path(),
            "pgbouncer.ini",
            "[pgbouncer]\n\n%include missing.ini\n",
        );
        let e = Config::load(&main).unwrap_err();
        assert_eq!(invalid_line(&e), Some(3));
        assert!(e.to_string().contains("cannot read"), "{e}");

        let looping = write(dir.path(), "loop.ini", "[pgbouncer]\n%include loop.ini\n");
        let e = Config::load(&looping).unwrap_err().to_string();
        assert!(
            e.contains("loop.ini:2: %include: includes nest deeper than 10"),
            "{e}"
        );
    }

    #[test]
    fn errors_in_included_files_name_that_file() {
        let dir = tempfile::tempdir().unwrap();
        let main = write(
            dir.path(),
            "pgbouncer.ini",
            "[pgbouncer]\n%include sub.ini\n",
        );
        let sub = write(
            dir.path(),
            "sub.ini",
            "listen_port = 6000\nmin_pool_size = 99\n",
        );
        let e = Config::load(&main).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{}:2: pgbouncer.min_pool_size", sub.display())),
            "{e}"
        );
    }

    #[test]
    fn auth_file_is_relative_to_the_file_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "userlist.txt",
            "\"app\" \"md5a3556571e93b0d20722ba62be61e8c2d\"\n",
        );
        write(dir.path(), "conf.d/users.txt", "\"other\" \"secret\"\n");
        let main = write(
            dir.path(),
            "pgbouncer.ini",
            "[pgbouncer]\nauth_type = md5\nauth_file = userlist.txt\n",
        );
        let c = Config::load(&main).unwrap();
        assert!(matches!(c.users["app"].secret, Some(Secret::Md5(_))));

        write(dir.path(), "conf.d/auth.ini", "auth_file = users.txt\n");
        let main = write(
            dir.path(),
            "two.ini",
            "[pgbouncer]\n%include conf.d/auth.ini\n",
        );
        let c = Config::load(&main).unwrap();
        assert!(c.users.contains_key("other"));
    }

    #[test]
    fn empty_auth_file_means_none() {
        let c = load("[pgbouncer]\nauth_file =\n").unwrap();
        assert!(c.general.auth_file.is_none());
    }

    #[test]
    fn other_extensions_stay_toml() {
        let dir = tempfile::tempdir().unwrap();
        let toml = write(dir.path(), "weir.toml", "[weir]\nlisten_port = 7001\n");
        assert_eq!(Config::load(&toml).unwrap().general.listen_port, 7001);
        let conf = write(dir.path(), "weir.conf", "[pgbouncer]\nlisten_port = 7002\n");
        assert_eq!(Config::load(&conf).unwrap().general.listen_port, 7002);
    }
}
