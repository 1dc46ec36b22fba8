//! The one shared harness for Weir's integration tests: throwaway PostgreSQL clusters, one Weir
//! process per test, and small helpers around psql, pgbench and tokio-postgres.
//!
//! Every cluster and every Weir lives in its own temp dir, and its `Drop` stops the process and
//! removes the dir — also when the test panics, in which case `Drop` first prints the process
//! log to stderr so the failure can be diagnosed from `cargo test` output alone.
//!
//! Everything here is blocking std code. `PgCluster::start` (about a second) and `Weir::start`
//! (until the port accepts) block the calling thread. In a `#[tokio::test]` (a current-thread
//! runtime) call them before spawning tasks, or through `tokio::task::spawn_blocking`, because
//! nothing else on that runtime runs while they block. `psql` and `pgbench` are external
//! processes and are safe to call between awaits as long as they do not wait on a lock held by
//! a connection whose task lives on the blocked runtime.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long Weir gets to start listening (or to exit, when failure is expected).
const WEIR_START_TIMEOUT: Duration = Duration::from_secs(20);
/// How often readiness and exit are polled.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// At most this much of a log is printed when a test panics.
const LOG_TAIL_BYTES: u64 = 256 * 1024;

// ---------------------------------------------------------------------------------------------
// Ports and binaries
// ---------------------------------------------------------------------------------------------

/// Ports this process has already handed out. The kernel may give the same ephemeral port to two
/// tests running in parallel once the first probe socket is closed; remembering them avoids that.
static HANDED_OUT_PORTS: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A loopback TCP port that was free a moment ago and that no other test in this process got.
pub fn free_port() -> u16 {
    let mut handed_out = HANDED_OUT_PORTS.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1000 {
        let probe = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
        let port = probe
            .local_addr()
            .expect("local_addr of probe socket")
            .port();
        if handed_out.insert(port) {
            return port;
        }
    }
    panic!("free_port: no unused port after 1000 tries");
}

/// A PostgreSQL program: `/usr/lib/postgresql/15/bin/<name>`, else the newest installed major
/// version's, else the first `<name>` on PATH, else the bare name (so the spawn error names it).
pub fn pg_bin(name: &str) -> PathBuf {
    let preferred = Path::new("/usr/lib/postgresql/15/bin").join(name);
    if preferred.is_file() {
        return preferred;
    }
    newest_versioned_pg_bin(name)
        .or_else(|| search_path(name))
        .unwrap_or_else(|| PathBuf::from(name))
}

fn newest_versioned_pg_bin(name: &str) -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|entry| {
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin").join(name);
            bin.is_file().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

fn search_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// The `weir` binary cargo built for this test run.
pub fn weir_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_weir"))
}

/// Runs pgbench (the version-matched binary from `pg_bin`) and returns its output, whatever
/// its exit status. Give a password with `pgbench_env(args, &[("PGPASSWORD", "...")])`.
pub fn pgbench(args: &[&str]) -> Output {
    pgbench_env(args, &[])
}

/// `pgbench` with extra environment variables (PGPASSWORD, PGOPTIONS, ...).
pub fn pgbench_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let bin = pg_bin("pgbench");
    Command::new(&bin)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()))
}

/// Polls `condition` every 20ms until it holds; panics naming `what` after `timeout`.
pub fn eventually(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(POLL_INTERVAL);
    }
}

// ---------------------------------------------------------------------------------------------
// Quoting
// ---------------------------------------------------------------------------------------------

/// An SQL identifier, double-quoted as PostgreSQL's `quote_ident` would.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// An SQL string literal (standard_conforming_strings = on, the default).
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// A libpq keyword/value connection string value, single-quoted with backslash escapes.
fn conninfo_value(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// A tokio-postgres / libpq connection string for a TCP connection to 127.0.0.1.
pub fn conninfo(port: u16, user: &str, password: &str, db: &str) -> String {
    format!(
        "host=127.0.0.1 port={port} user={} password={} dbname={}",
        conninfo_value(user),
        conninfo_value(password),
        conninfo_value(db)
    )
}

// ---------------------------------------------------------------------------------------------
// Running things as the postgres OS user
// ---------------------------------------------------------------------------------------------

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A command for a PostgreSQL server tool. initdb and postgres refuse to run as root, so as
/// root the tool runs as the `postgres` OS user; otherwise it runs as us. It runs in `cwd`
/// (a directory that user can read) because the tools complain about an unreadable cwd.
fn server_tool(name: &str, cwd: &Path) -> Command {
    let program = pg_bin(name);
    let mut cmd = if running_as_root() {
        let mut runuser = Command::new(runuser_bin());
        runuser.args(["-u", "postgres", "--"]).arg(program);
        runuser
    } else {
        Command::new(program)
    };
    cmd.current_dir(cwd).stdin(Stdio::null());
    cmd
}

fn runuser_bin() -> PathBuf {
    ["/usr/sbin/runuser", "/sbin/runuser", "/usr/bin/runuser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("runuser"))
}

/// uid and gid of the `postgres` OS user, looked up once.
fn postgres_ids() -> (u32, u32) {
    static IDS: OnceLock<(u32, u32)> = OnceLock::new();
    *IDS.get_or_init(|| (id_of("-u"), id_of("-g")))
}

fn id_of(flag: &str) -> u32 {
    let out = run_checked(
        Command::new("id").args([flag, "postgres"]),
        "looking up the postgres OS user (is the postgresql package installed?)",
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("numeric id from `id`")
}

/// Hands a directory (or file) we created to the postgres OS user when we run as root.
pub fn give_to_postgres(path: &Path) {
    if running_as_root() {
        let (uid, gid) = postgres_ids();
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown postgres {}: {e}", path.display()));
    }
}

/// Runs `cmd` to completion; panics with both output streams if it fails.
fn run_checked(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{what}: {cmd:?} failed with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// The last `LOG_TAIL_BYTES` of a file, lossily decoded; empty if it cannot be read.
fn read_tail(path: &Path) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(LOG_TAIL_BYTES);
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(start)).is_err() || file.read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes).into_owned();
    if start > 0 {
        format!("[... first {start} bytes cut ...]\n{text}")
    } else {
        text
    }
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

/// Replaces `path` with `contents` in one rename, so a process reloading it never reads half.
fn write_atomically(path: &Path, contents: &str) {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    fs::write(&tmp, contents).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL clusters
// ---------------------------------------------------------------------------------------------

/// How a test cluster is set up. `PgOptions::default()` gives SCRAM everywhere.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// pg_hba method for TCP logins other than `postgres`: scram-sha-256, md5, password, trust.
    pub hba_method: String,
    /// How new passwords are stored: scram-sha-256 or md5.
    pub password_encryption: String,
    /// Extra postgresql.conf lines, appended last so they win.
    pub extra_conf: Vec<String>,
    pub max_connections: u32,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            hba_method: "scram-sha-256".to_string(),
            password_encryption: "scram-sha-256".to_string(),
            extra_conf: Vec::new(),
            max_connections: 300,
        }
    }
}

/// A throwaway PostgreSQL cluster on 127.0.0.1:`port` with its socket in `socket_dir`.
///
/// `postgres` is a trusted superuser over the socket and over TCP; every other role logs in
/// over TCP with `PgOptions::hba_method`. Replication connections are trusted (for replicas).
pub struct PgCluster {
    pub port: u16,
    /// The temp dir holding everything below; removed on drop.
    pub dir: PathBuf,
    pub socket_dir: PathBuf,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    temp: TempDir,
}

impl PgCluster {
    /// A cluster with `PgOptions::default()`.
    pub fn start() -> PgCluster {
        Self::start_with(PgOptions::default())
    }

    /// initdb, configure, and start a cluster; panics with the server log if it cannot start.
    pub fn start_with(opts: PgOptions) -> PgCluster {
        let cluster = Self::allocate();
        cluster.initdb();
        cluster.append_conf(&cluster.base_conf(&opts));
        cluster.append_conf(&opts.extra_conf);
        cluster.write_hba(&opts.hba_method);
        cluster.start_again();
        cluster
    }

    /// A streaming hot standby of this cluster (pg_basebackup -R), started and accepting
    /// read-only connections. It inherits this cluster's configuration and pg_hba.conf.
    pub fn start_replica(&self) -> PgCluster {
        let replica = Self::allocate();
        run_checked(
            server_tool("pg_basebackup", &replica.dir)
                .arg("-D")
                .arg(&replica.data_dir)
                .arg("-h")
                .arg(&self.socket_dir)
                .args(["-p", &self.port.to_string(), "-U", "postgres"])
                .args(["-X", "stream", "-R", "--no-sync"]),
            "pg_basebackup for a replica",
        );
        replica.append_conf(&replica.listen_conf());
        replica.start_again();
        replica
    }

    /// A fresh temp dir (owned by postgres), a socket dir inside it, and a port; nothing runs.
    /// Returned early so that `Drop` cleans up if a later step panics.
    fn allocate() -> PgCluster {
        // Under /tmp, not $TMPDIR: the postgres user must be able to reach it, and the socket
        // path must stay under the ~107-byte limit of sun_path.
        let temp = tempfile::Builder::new()
            .prefix("weir-pg-")
            .tempdir_in("/tmp")
            .expect("create temp dir for a PostgreSQL cluster");
        let dir = temp.path().to_path_buf();
        let socket_dir = dir.join("sock");
        fs::create_dir(&socket_dir).expect("create socket dir");
        give_to_postgres(&dir);
        give_to_postgres(&socket_dir);
        PgCluster {
            port: free_port(),
            data_dir: dir.join("data"),
            log_path: dir.join("postgres.log"),
            socket_dir,
            dir,
            temp,
        }
    }

    fn initdb(&self) {
        run_checked(
            server_tool("initdb", &self.dir)
                .arg("-D")
                .arg(&self.data_dir)
                .args(["-U", "postgres", "--auth-local=trust", "--auth-host=trust"])
                .args(["-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"]),
            "initdb",
        );
    }

    /// Where the server listens: its own port on 127.0.0.1 and a private socket dir.
    fn listen_conf(&self) -> Vec<String> {
        vec![
            "listen_addresses = '127.0.0.1'".to_string(),
            format!("port = {}", self.port),
            format!(
                "unix_socket_directories = {}",
                quote_literal(&self.socket_dir.to_string_lossy())
            ),
        ]
    }

    /// Fast, durability-free settings for tests, plus what replicas need.
    fn base_conf(&self, opts: &PgOptions) -> Vec<String> {
        let mut conf = self.listen_conf();
        conf.extend([
            format!("max_connections = {}", opts.max_connections),
            format!(
                "password_encryption = {}",
                quote_literal(&opts.password_encryption)
            ),
            "fsync = off".to_string(),
            "synchronous_commit = off".to_string(),
            "full_page_writes = off".to_string(),
            "shared_buffers = 64MB".to_string(),
            "wal_level = replica".to_string(),
            "max_wal_senders = 10".to_string(),
            "log_line_prefix = '%m [%p] %q%u@%d '".to_string(),
        ]);
        conf
    }

    fn write_hba(&self, host_method: &str) {
        let hba = format!(
            "local all all trust\n\
             local replication all trust\n\
             host all postgres 127.0.0.1/32 trust\n\
             host replication all 127.0.0.1/32 trust\n\
             host all all 127.0.0.1/32 {host_method}\n"
        );
        // Truncating the existing file keeps its postgres ownership.
        fs::write(self.data_dir.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
    }

    /// Appends lines to postgresql.conf; later lines override earlier ones. Takes effect on the
    /// next start, or on `reload()` for settings that allow it.
    pub fn append_conf(&self, lines: &[String]) {
        if lines.is_empty() {
            return;
        }
        let path = self.data_dir.join("postgresql.conf");
        let mut conf = fs::read_to_string(&path).expect("read postgresql.conf");
        conf.push_str("\n# added by the Weir test harness\n");
        for line in lines {
            conf.push_str(line);
            conf.push('\n');
        }
        // Writing an existing file keeps its postgres ownership.
        fs::write(&path, conf).expect("write postgresql.conf");
    }

    /// Starts the server (again, after `stop`); panics with the server log if it cannot.
    pub fn start_again(&self) {
        let out = self
            .pg_ctl()
            .arg("-l")
            .arg(&self.log_path)
            .args(["-w", "-t", "60", "start"])
            .output()
            .expect("run pg_ctl start");
        if !out.status.success() {
            panic!(
                "PostgreSQL failed to start on port {} ({}):\n{}{}\n--- server log ---\n{}",
                self.port,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                read_lossy(&self.log_path)
            );
        }
    }

    /// A fast shutdown (sessions are ended, the server exits cleanly); `start_again` restarts.
    pub fn stop(&self) {
        run_checked(
            self.pg_ctl().args(["-m", "fast", "-w", "-t", "60", "stop"]),
            "pg_ctl stop",
        );
    }

    /// Crashes the server as a power loss would for its clients: an immediate shutdown
    /// (SIGQUIT to the postmaster, no checkpoint; crash recovery on `start_again`). Returns
    /// once the postmaster has exited.
    pub fn crash(&self) {
        let pid_file = self.data_dir.join("postmaster.pid");
        let pid: i32 = fs::read_to_string(&pid_file)
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()))
            .expect("postmaster.pid names the postmaster");
        // SAFETY: kill(2) with a pid read from the cluster's own pid file.
        unsafe {
            libc::kill(pid, libc::SIGQUIT);
        }
        eventually(Duration::from_secs(30), "the postmaster to exit", || {
            // SAFETY: signal 0 only checks that the process exists.
            unsafe { libc::kill(pid, 0) != 0 }
        });
    }

    /// Re-reads postgresql.conf and pg_hba.conf (pg_ctl reload).
    pub fn reload(&self) {
        run_checked(self.pg_ctl().arg("reload"), "pg_ctl reload");
    }

    fn pg_ctl(&self) -> Command {
        let mut cmd = server_tool("pg_ctl", &self.dir);
        cmd.arg("-D").arg(&self.data_dir);
        cmd
    }

    /// Runs SQL as `postgres` over the socket; returns trimmed unaligned tuples-only stdout.
    /// Panics with psql's stderr on failure.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        self.try_psql(db, sql)
            .unwrap_or_else(|err| panic!("psql -d {db} -c {sql:?} failed:\n{err}"))
    }

    /// `psql` that returns psql's stderr instead of panicking.
    pub fn try_psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(pg_bin("psql"))
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.socket_dir)
            .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", db])
            .args(["-c", sql])
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(format!(
                "{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// A login role whose password is stored as `encryption` ("md5" or "scram-sha-256").
    pub fn create_user(&self, name: &str, password: &str, encryption: &str) {
        self.create_role(name, password, encryption, "LOGIN");
    }

    /// Like `create_user`, but a superuser (for tests that need to do anything, e.g. pgbench -i
    /// in a database it does not own).
    pub fn create_superuser(&self, name: &str, password: &str, encryption: &str) {
        self.create_role(name, password, encryption, "LOGIN SUPERUSER");
    }

    fn create_role(&self, name: &str, password: &str, encryption: &str, options: &str) {
        self.psql(
            "postgres",
            &format!(
                "SET password_encryption = {}; CREATE ROLE {} {options} PASSWORD {};",
                quote_literal(encryption),
                quote_ident(name),
                quote_literal(password)
            ),
        );
    }

    /// A database owned by `owner`. Since PostgreSQL 15 the owner is the one role (besides
    /// superusers) that may create tables in its `public` schema, which is what pgbench -i needs.
    pub fn create_database(&self, name: &str, owner: &str) {
        self.psql(
            "postgres",
            &format!(
                "CREATE DATABASE {} OWNER {}",
                quote_ident(name),
                quote_ident(owner)
            ),
        );
    }

    /// A tokio-postgres connection string straight to this cluster over TCP.
    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        conninfo(self.port, user, password, db)
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        read_lossy(&self.log_path)
    }

    /// Stops the server however it can: an immediate shutdown, else SIGKILL to the postmaster.
    fn stop_for_drop(&self) {
        let stopped = self
            .pg_ctl()
            .args(["-m", "immediate", "-w", "-t", "20", "stop"])
            .output()
            .map(|out| out.status.success())
            .unwrap_or(false);
        if !stopped {
            self.kill_postmaster();
        }
    }

    fn kill_postmaster(&self) {
        let pid_file = read_lossy(&self.data_dir.join("postmaster.pid"));
        if let Some(pid) = pid_file.lines().next().and_then(|l| l.trim().parse().ok()) {
            // SAFETY: kill has no memory-safety preconditions; a stale pid only yields ESRCH.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- PostgreSQL log, port {} ({}) ----\n{}\n---- end of PostgreSQL log ----",
                self.port,
                self.log_path.display(),
                read_tail(&self.log_path)
            );
        }
        self.stop_for_drop();
        // `temp` is removed after this returns.
    }
}

// ---------------------------------------------------------------------------------------------
// Weir processes
// ---------------------------------------------------------------------------------------------

/// Which of Weir's two config formats a test hands over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigFormat {
    /// weir.toml with a `[weir]` section.
    Toml,
    /// An unchanged pgbouncer.ini with a `[pgbouncer]` section.
    Ini,
}

impl ConfigFormat {
    fn file_name(self) -> &'static str {
        match self {
            ConfigFormat::Toml => "weir.toml",
            ConfigFormat::Ini => "pgbouncer.ini",
        }
    }

    fn section(self) -> &'static str {
        match self {
            ConfigFormat::Toml => "weir",
            ConfigFormat::Ini => "pgbouncer",
        }
    }

    fn listen_addr_line(self) -> &'static str {
        match self {
            ConfigFormat::Toml => "listen_addr = \"127.0.0.1\"",
            ConfigFormat::Ini => "listen_addr = 127.0.0.1",
        }
    }
}

/// The config text with Weir's listen settings merged into its main section (`[weir]` or
/// `[pgbouncer]`): `listen_port = port` right after the header, replacing any listen_port the
/// text had, and `listen_addr = 127.0.0.1` unless the text sets its own listen_addr. Without
/// that section, a new one holding both lines is put at the top.
pub fn config_with_listen(format: ConfigFormat, text: &str, port: u16) -> String {
    let port_line = format!("listen_port = {port}");
    let lines: Vec<&str> = text.lines().collect();
    let Some(header) = lines
        .iter()
        .position(|line| is_section(line, format.section()))
    else {
        let addr_line = format.listen_addr_line();
        return format!("[{}]\n{addr_line}\n{port_line}\n\n{text}", format.section());
    };
    let body_end = lines[header + 1..]
        .iter()
        .position(|line| is_any_header(line))
        .map_or(lines.len(), |i| header + 1 + i);
    let body = &lines[header + 1..body_end];

    let mut merged: Vec<&str> = lines[..=header].to_vec();
    if !body.iter().any(|line| key_of(line) == Some("listen_addr")) {
        merged.push(format.listen_addr_line());
    }
    merged.push(&port_line);
    merged.extend(
        body.iter()
            .filter(|line| key_of(line) != Some("listen_port")),
    );
    merged.extend(&lines[body_end..]);
    let mut out = merged.join("\n");
    out.push('\n');
    out
}

/// A header line without its trailing comment, e.g. `[weir]  # main` -> `[weir]`.
fn header_text(line: &str) -> Option<&str> {
    let code = line.split(['#', ';']).next().unwrap_or("").trim();
    (code.starts_with('[') && code.ends_with(']')).then_some(code)
}

fn is_any_header(line: &str) -> bool {
    header_text(line).is_some()
}

fn is_section(line: &str, name: &str) -> bool {
    header_text(line).is_some_and(|h| h[1..h.len() - 1].trim().eq_ignore_ascii_case(name))
}

/// The key of a `key = value` line.
fn key_of(line: &str) -> Option<&str> {
    let (key, _) = line.split_once('=')?;
    Some(key.trim())
}

/// A running `weir` process on 127.0.0.1:`port`, started from a config in its own temp dir.
/// Dropping it SIGKILLs the process; if the test is panicking, its log goes to stderr first.
pub struct Weir {
    pub port: u16,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    format: ConfigFormat,
    log_shown: bool,
    child: Child,
    dir: TempDir,
}

impl Weir {
    /// Starts Weir from weir.toml text without listen settings (see `config_with_listen`) and
    /// waits until its port accepts TCP connections. Blocks up to 20 s.
    pub fn start(config_toml: &str) -> Weir {
        Self::start_with(ConfigFormat::Toml, config_toml, &[])
    }

    /// Like `start`, in either format, first writing `files` (name, contents) — an auth_file,
    /// certificates — next to the config so relative paths in it resolve.
    pub fn start_with(format: ConfigFormat, config: &str, files: &[(&str, &str)]) -> Weir {
        let mut weir = Self::spawn(format, config, files);
        weir.wait_until_listening();
        weir
    }

    /// Like `start`, listening on a given port (e.g. a second process with so_reuseport).
    pub fn start_on_port(config_toml: &str, port: u16) -> Weir {
        let mut weir = Self::spawn_on(ConfigFormat::Toml, config_toml, &[], port);
        weir.wait_until_listening();
        weir
    }

    /// Starts Weir with a config it must reject; returns its exit status and log. Panics if it
    /// starts listening or is still running after 20 s.
    pub fn start_expect_failure(config_toml: &str) -> (ExitStatus, String) {
        Self::expect_failure_with(ConfigFormat::Toml, config_toml, &[])
    }

    /// `start_expect_failure` in either format, with extra files as in `start_with`.
    pub fn expect_failure_with(
        format: ConfigFormat,
        config: &str,
        files: &[(&str, &str)],
    ) -> (ExitStatus, String) {
        let mut weir = Self::spawn(format, config, files);
        let deadline = Instant::now() + WEIR_START_TIMEOUT;
        loop {
            if let Some(status) = weir.child.try_wait().expect("try_wait on weir") {
                return (status, weir.log());
            }
            assert!(
                !weir.accepts_connections(),
                "weir started listening on port {} although its config should be rejected",
                weir.port
            );
            assert!(
                Instant::now() < deadline,
                "weir was still running after {WEIR_START_TIMEOUT:?} although its config should be rejected"
            );
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Writes the files and the merged config into a fresh temp dir and spawns weir on it.
    fn spawn(format: ConfigFormat, config: &str, files: &[(&str, &str)]) -> Weir {
        Self::spawn_on(format, config, files, free_port())
    }

    fn spawn_on(format: ConfigFormat, config: &str, files: &[(&str, &str)], port: u16) -> Weir {
        let dir = tempfile::Builder::new()
            .prefix("weir-test-")
            .tempdir()
            .expect("create temp dir for weir");
        for (name, contents) in files {
            let path = dir.path().join(name);
            fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        }
        let config_path = dir.path().join(format.file_name());
        fs::write(&config_path, config_with_listen(format, config, port))
            .expect("write weir config");
        let log_path = dir.path().join("weir.log");
        let child = Self::spawn_process(&config_path, &log_path, dir.path());
        Weir {
            port,
            config_path,
            log_path,
            format,
            log_shown: false,
            child,
            dir,
        }
    }

    fn spawn_process(config_path: &Path, log_path: &Path, cwd: &Path) -> Child {
        let log = File::create(log_path).expect("create weir log file");
        let log_for_stderr = log.try_clone().expect("clone weir log handle");
        let mut cmd = Command::new(weir_bin());
        cmd.arg(config_path)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_for_stderr);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "weir=debug");
        }
        // tracing-subscriber colours its output even into a file; tests grep plain text.
        cmd.env("NO_COLOR", "1");
        if std::env::var_os("RUST_BACKTRACE").is_none() {
            cmd.env("RUST_BACKTRACE", "1");
        }
        cmd.spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", weir_bin().display()))
    }

    fn wait_until_listening(&mut self) {
        let deadline = Instant::now() + WEIR_START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait on weir") {
                self.log_shown = true;
                panic!(
                    "weir exited with {status} before listening on port {}\n---- weir log ----\n{}\n---- end of weir log ----",
                    self.port,
                    read_tail(&self.log_path)
                );
            }
            if self.accepts_connections() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "weir did not listen on port {} within {WEIR_START_TIMEOUT:?}",
                self.port
            );
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    fn accepts_connections(&self) -> bool {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    }

    /// Weir's stdout and stderr so far.
    pub fn log(&self) -> String {
        read_lossy(&self.log_path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`libc::SIGHUP`, `libc::SIGTERM`, `libc::SIGINT`, ...) to weir.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill has no memory-safety preconditions.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {signal}): {}",
            std::io::Error::last_os_error()
        );
    }

    /// Waits up to `timeout` for weir to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait on weir") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Replaces the config with new text in the same format, keeping the listen port (for
    /// SIGHUP reload tests). The file is swapped in one rename.
    pub fn rewrite_config(&self, config: &str) {
        write_atomically(
            &self.config_path,
            &config_with_listen(self.format, config, self.port),
        );
    }

    /// Writes (or atomically replaces) a file next to the config, e.g. an auth_file.
    pub fn write_file(&self, name: &str, contents: &str) {
        write_atomically(&self.dir.path().join(name), contents);
    }

    /// The temp dir holding the config, the log and any extra files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A tokio-postgres connection string to this Weir.
    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        conninfo(self.port, user, password, db)
    }
}

impl Drop for Weir {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() && !self.log_shown {
            eprintln!(
                "---- weir log, port {} ({}) ----\n{}\n---- end of weir log ----",
                self.port,
                self.log_path.display(),
                read_tail(&self.log_path)
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// tokio-postgres
// ---------------------------------------------------------------------------------------------

/// Connects without TLS and spawns the connection task; panics with the error on failure.
/// Must be called inside a tokio runtime.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    try_connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {}", describe_error(&e)))
}

/// `connect` that returns the error (for tests that expect a login to fail).
pub async fn try_connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        // The error, if any, surfaces on the client's next request.
        let _ = connection.await;
    });
    Ok(client)
}

/// A tokio-postgres error with the server's SQLSTATE and message when there is one
/// (its Display says only "db error").
pub fn describe_error(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{} ({}): {}", db.severity(), db.code().code(), db.message()),
        None => format!("{err:?}"),
    }
}
