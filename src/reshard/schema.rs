//! Schema copy: PostgreSQL's own `pg_dump --schema-only` of the source's shard 0, applied
//! to every target shard. The part before the data (types, tables, sequences, functions)
//! goes first; the part after it (primary keys, indexes, constraints, triggers) once the
//! rows are copied, so the bulk copy does not maintain indexes row by row.

use super::conn::{query_long, Result};
use crate::backend::{Pool, ServerConn};
use crate::config::Secret;
use std::path::PathBuf;

#[derive(Debug, Clone, Copy)]
pub enum Section {
    PreData,
    PostData,
}

impl Section {
    fn arg(self) -> &'static str {
        match self {
            Section::PreData => "--section=pre-data",
            Section::PostData => "--section=post-data",
        }
    }
}

/// The pg_dump to run: `WEIR_PG_DUMP`, else the one on PATH, else the newest under
/// /usr/lib/postgresql/*/bin (Debian's layout).
pub fn pg_dump_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WEIR_PG_DUMP") {
        return Some(PathBuf::from(p));
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("pg_dump");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let p = e.path().join("bin/pg_dump");
            p.is_file().then_some((v, p))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p)
}

/// One section of the source schema, as SQL (psql's meta-commands removed).
pub async fn dump(pool: &Pool, section: Section) -> Result<String> {
    let bin = pg_dump_path().ok_or_else(|| {
        "pg_dump not found (put it on PATH or set WEIR_PG_DUMP): RESHARD copies the schema with it"
            .to_string()
    })?;
    let target = &pool.settings.target;
    let creds = pool.credentials();
    let mut cmd = tokio::process::Command::new(&bin);
    cmd.arg("--schema-only")
        .arg(section.arg())
        .args([
            "--no-owner",
            "--no-privileges",
            "--no-publications",
            "--no-subscriptions",
            "--exclude-schema=weir",
        ])
        .arg("-h")
        .arg(&target.address.host)
        .arg("-p")
        .arg(target.address.port.to_string())
        .arg("-U")
        .arg(&creds.user)
        .arg("-d")
        .arg(&target.dbname)
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGPASSWORD")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Some(Secret::Plain(p)) = &creds.secret {
        cmd.env("PGPASSWORD", p);
    }
    let out = cmd
        .output()
        .await
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    if !out.status.success() {
        return Err(format!(
            "pg_dump of the source schema failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8(out.stdout).map_err(|_| "pg_dump wrote non-UTF-8 output")?;
    Ok(strip_meta_commands(&text))
}

/// Drops psql meta-command lines (`\restrict`, `\connect`, …): the dump is sent as SQL.
fn strip_meta_commands(dump: &str) -> String {
    dump.lines()
        .filter(|l| !l.starts_with('\\'))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs a dumped section on a target shard (one implicit transaction).
pub async fn apply(conn: &mut ServerConn, sql: &str) -> Result<()> {
    if sql.trim().is_empty() {
        return Ok(());
    }
    query_long(conn, sql).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_commands_are_dropped_and_sql_kept() {
        let dump = "\\restrict abc\nCREATE TABLE t (a int);\n\\unrestrict abc\nSELECT '\\x';\n";
        assert_eq!(
            strip_meta_commands(dump),
            "CREATE TABLE t (a int);\nSELECT '\\x';"
        );
    }
}
