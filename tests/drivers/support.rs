//! Helpers shared by tests/drivers.rs and tests/session_state.rs on top of the harness in
//! tests/common: one PostgreSQL cluster with role and database `app` behind one Weir with a
//! small pool, running external driver programs with a deadline, and simple-query shortcuts.
//!
//! Both test files include it with `#[path = "drivers/support.rs"] mod support;`. It lives in
//! tests/drivers/ (beside the driver scripts) so cargo does not build it as a test of its own.
#![allow(dead_code)]

#[path = "../common/mod.rs"]
pub mod common;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{PgCluster, PgOptions, Weir};
use tokio_postgres::{Client, SimpleQueryMessage};

/// The password of role `app`, in PostgreSQL and in Weir's `[users.app]`.
pub const APP_PASSWORD: &str = "app-secret";

/// A PostgreSQL cluster with login role `app` owning database `app`, behind a Weir.
/// Weir is declared first so it is stopped before the cluster.
pub struct Stack {
    pub weir: Weir,
    pub cluster: PgCluster,
}

impl Stack {
    /// A cluster and a Weir in transaction mode whose pool for `app` has `pool_size` server
    /// connections and no reserve, so clients share (and hop between) exactly that many.
    pub fn start(pool_size: usize) -> Stack {
        Self::start_with(pool_size, "")
    }

    /// Like `start`, with extra `key = value` lines in the `[weir]` section.
    pub fn start_with(pool_size: usize, extra_general: &str) -> Stack {
        let cluster = PgCluster::start_with(PgOptions::default());
        cluster.create_user("app", APP_PASSWORD, "scram-sha-256");
        cluster.create_database("app", "app");
        let weir = Weir::start(&weir_config(cluster.port, pool_size, extra_general));
        Stack { weir, cluster }
    }

    /// A tokio-postgres connection string for `app` to database `app` through Weir.
    pub fn url(&self) -> String {
        self.weir.url("app", APP_PASSWORD, "app")
    }

    /// The environment the driver scripts in tests/drivers/ read their connection from.
    pub fn driver_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("WEIR_HOST", "127.0.0.1".to_string()),
            ("WEIR_PORT", self.weir.port.to_string()),
            ("WEIR_USER", "app".to_string()),
            ("WEIR_PASSWORD", APP_PASSWORD.to_string()),
            ("WEIR_DB", "app".to_string()),
        ]
    }

    /// How many server connections role `app` has open, seen from PostgreSQL itself.
    pub fn server_connections(&self) -> usize {
        self.cluster
            .psql(
                "postgres",
                "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'",
            )
            .parse()
            .expect("count(*) is a number")
    }
}

/// weir.toml for database `app` on `pg_port` with `default_pool_size = pool_size`, no reserve,
/// SCRAM for clients, and `extra_general` lines in `[weir]`.
pub fn weir_config(pg_port: u16, pool_size: usize, extra_general: &str) -> String {
    format!(
        "[weir]\n\
         auth_type = \"scram-sha-256\"\n\
         default_pool_size = {pool_size}\n\
         reserve_pool_size = 0\n\
         {extra_general}\n\n\
         [users.app]\npassword = \"{APP_PASSWORD}\"\n\n\
         [databases.app]\nhost = \"127.0.0.1\"\nport = {pg_port}\n"
    )
}

/// tests/drivers/, where the driver scripts live.
pub fn drivers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drivers")
}

/// True when `program` is found on PATH.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// What an external program printed, once it exited successfully.
pub struct ProgramOutput {
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` with stdout and stderr captured to files, killing it after `timeout`. Panics
/// with both streams (and, through `Weir`'s drop, Weir's log) unless it exits with status 0.
pub fn run_program(mut cmd: Command, what: &str, timeout: Duration) -> ProgramOutput {
    let dir = tempfile::tempdir().expect("temp dir for program output");
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    cmd.stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("create stdout file"))
        .stderr(File::create(&err_path).expect("create stderr file"));
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait on driver program") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = ProgramOutput {
        stdout: fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: fs::read_to_string(&err_path).unwrap_or_default(),
    };
    let outcome = match status {
        Some(status) if status.success() => return output,
        Some(status) => format!("exited with {status}"),
        None => format!("was killed after {timeout:?}"),
    };
    panic!(
        "{what} {outcome}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.stdout, output.stderr
    );
}

/// Runs `sql` with the simple protocol and returns the first column of the first row.
pub async fn scalar(client: &Client, sql: &str) -> String {
    let messages = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", common::describe_error(&e)));
    messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row.get(0).unwrap_or("").to_string()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: returned no row"))
}

/// Runs `sql` with the simple protocol, panicking with the server's error.
pub async fn exec(client: &Client, sql: &str) {
    client
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", common::describe_error(&e)));
}

/// The backend pid of the server connection this statement ran on.
pub async fn backend_pid(client: &Client) -> i32 {
    scalar(client, "SELECT pg_backend_pid()")
        .await
        .parse()
        .expect("pg_backend_pid() is a number")
}
