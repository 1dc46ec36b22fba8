//! Two-phase commit across shards (`two_phase_commit = true`): the names of prepared
//! transactions, the decision table, and the recovery task that settles transactions left
//! prepared by a crash of Weir or of a shard.
//!
//! A transaction that wrote on several shards commits like this (see
//! `frontend::session::multi`): every shard but the last one touched (the *coordinator*)
//! runs `PREPARE TRANSACTION '<base>_<shard>'`; the coordinator inserts `(<base>, true)`
//! into `weir.two_phase_decisions` inside its own transaction and commits it. That commit
//! *is* the decision: it is durable and atomic with the coordinator's own writes. Then
//! every prepared shard runs `COMMIT PREPARED` (or `ROLLBACK PREPARED` when the
//! coordinator's commit failed).
//!
//! Recovery (every 2 s per sharded database): a `weir_…` transaction prepared on a shard
//! for over 2 s is settled by asking its coordinator. It first inserts `(<base>, false)`
//! with `ON CONFLICT DO NOTHING`: the decision table's primary key makes this race-free — if
//! the coordinator's commit is still in flight the insert waits for it; if it committed,
//! its row wins; otherwise Weir's abort row wins and a late coordinator commit fails on the
//! key. The row that stands decides COMMIT PREPARED or ROLLBACK PREPARED. Decision rows are
//! deleted once no shard holds a transaction of theirs and they are over a minute old.

use super::{Pool, ServerConn};
use crate::router::route::ShardRouter;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

/// How often recovery runs, and how old a prepared transaction must be to be settled.
const RECOVERY_PERIOD: Duration = Duration::from_secs(2);
const SETTLE_AFTER_SECS: u32 = 2;

pub const DECISIONS_DDL: &str = "CREATE SCHEMA IF NOT EXISTS weir; \
     CREATE TABLE IF NOT EXISTS weir.two_phase_decisions \
     (gid text PRIMARY KEY, commit boolean NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())";

/// A name unique to this process and transaction, naming its coordinator shard:
/// `weir_<coordinator>_<process>_<n>`. Prepared transactions add `_<shard>`.
pub fn new_base(coordinator: usize) -> String {
    static PROCESS: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let process = PROCESS.get_or_init(|| rand::random::<u64>() & 0xFFFF_FFFF_FFFF);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("weir_{coordinator}_{process:x}_{n}")
}

/// `(base, coordinator)` of a prepared transaction's name made by [`new_base`] plus
/// `_<shard>`; `None` for any other name (never settled by Weir).
pub fn parse_gid(gid: &str) -> Option<(String, usize)> {
    let rest = gid.strip_prefix("weir_")?;
    let parts: Vec<&str> = rest.split('_').collect();
    let [coord, process, n, shard] = parts.as_slice() else {
        return None;
    };
    let coordinator: usize = coord.parse().ok()?;
    let hex = !process.is_empty() && process.bytes().all(|b| b.is_ascii_hexdigit());
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !hex || !digits(n) || !digits(shard) {
        return None;
    }
    Some((format!("weir_{coord}_{process}_{n}"), coordinator))
}

/// Starts the recovery task of a router with two-phase commit; `primaries[i]` is shard
/// i's primary pool. It ends when the router is dropped.
pub fn start(router: &Arc<ShardRouter>, primaries: Vec<Arc<Pool>>) {
    tokio::spawn(recover_forever(Arc::downgrade(router), primaries));
}

async fn recover_forever(router: Weak<ShardRouter>, primaries: Vec<Arc<Pool>>) {
    let mut conns: Vec<Option<ServerConn>> = primaries.iter().map(|_| None).collect();
    let mut tick = tokio::time::interval(RECOVERY_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(r) = router.upgrade() else { return };
        if r.retired.load(Ordering::Relaxed) {
            return;
        }
        let database = r.database.clone();
        drop(r);
        if let Err(e) = recover_once(&primaries, &mut conns).await {
            tracing::warn!(%database, error = %e, "two-phase recovery incomplete; retrying");
        }
    }
}

/// A connection to shard `i`'s primary (opened, with the decision table, when missing).
async fn conn<'a>(
    primaries: &[Arc<Pool>],
    conns: &'a mut [Option<ServerConn>],
    i: usize,
) -> Result<&'a mut ServerConn, String> {
    if conns[i].is_none() {
        let pool = &primaries[i];
        let mut c = tokio::time::timeout(Duration::from_secs(5), pool.connect_unpooled())
            .await
            .map_err(|_| format!("shard {i}: connect timed out"))?
            .map_err(|e| format!("shard {i}: {e}"))?;
        c.exec(DECISIONS_DDL)
            .await
            .map_err(|e| format!("shard {i}: creating weir.two_phase_decisions: {e}"))?;
        conns[i] = Some(c);
    }
    conns[i].as_mut().ok_or_else(|| "no connection".to_string())
}

/// Runs `sql` on shard `i`'s primary; a failure drops the connection.
async fn run(
    primaries: &[Arc<Pool>],
    conns: &mut [Option<ServerConn>],
    i: usize,
    sql: &str,
) -> Result<Vec<Vec<Option<String>>>, String> {
    let c = conn(primaries, conns, i).await?;
    match tokio::time::timeout(Duration::from_secs(10), c.query_rows(sql)).await {
        Ok(Ok(rows)) => Ok(rows),
        Ok(Err(crate::backend::conn::ExecError::Server(e))) => {
            Err(format!("shard {i}: {}", e.message))
        }
        Ok(Err(e)) => {
            conns[i] = None;
            Err(format!("shard {i}: {e}"))
        }
        Err(_) => {
            conns[i] = None;
            Err(format!("shard {i}: timed out"))
        }
    }
}

/// One pass: settle old prepared transactions, then drop decisions no shard needs.
pub async fn recover_once(
    primaries: &[Arc<Pool>],
    conns: &mut [Option<ServerConn>],
) -> Result<(), String> {
    let mut first_error = None;
    let mut all_listed = true;
    let mut still_prepared = std::collections::HashSet::new();
    for i in 0..primaries.len() {
        let list = format!(
            "SELECT gid, prepared < now() - interval '{SETTLE_AFTER_SECS} seconds' \
             FROM pg_catalog.pg_prepared_xacts \
             WHERE database = current_database() AND gid LIKE 'weir\\_%'"
        );
        let rows = match run(primaries, conns, i, &list).await {
            Ok(rows) => rows,
            Err(e) => {
                all_listed = false;
                first_error.get_or_insert(e);
                continue;
            }
        };
        for row in rows {
            let (Some(Some(gid)), Some(old)) = (row.first(), row.get(1)) else {
                continue;
            };
            let Some((base, coordinator)) = parse_gid(gid) else {
                continue;
            };
            still_prepared.insert(base.clone());
            if old.as_deref() != Some("t") || coordinator >= primaries.len() {
                continue;
            }
            // The coordinator's row decides; Weir's abort row stands only if it has none.
            let decide = format!(
                "INSERT INTO weir.two_phase_decisions (gid, commit, at) \
                 VALUES ('{base}', false, clock_timestamp()) \
                 ON CONFLICT (gid) DO NOTHING; \
                 SELECT commit FROM weir.two_phase_decisions WHERE gid = '{base}'"
            );
            let commit = match run(primaries, conns, coordinator, &decide).await {
                Ok(rows) => rows
                    .first()
                    .and_then(|r| r.first().cloned().flatten())
                    .is_some_and(|v| v == "t"),
                Err(e) => {
                    first_error.get_or_insert(e);
                    continue;
                }
            };
            let verb = if commit { "COMMIT" } else { "ROLLBACK" };
            match run(primaries, conns, i, &format!("{verb} PREPARED '{gid}'")).await {
                Ok(_) => {
                    tracing::info!(shard = i, %gid, "two-phase recovery: {verb} PREPARED");
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
    }
    if all_listed {
        for i in 0..primaries.len() {
            let keep: Vec<String> = still_prepared
                .iter()
                .filter(|b| parse_gid(&format!("{b}_0")).is_some_and(|(_, c)| c == i))
                .map(|b| format!("'{b}'"))
                .collect();
            let not_kept = if keep.is_empty() {
                String::new()
            } else {
                format!(" AND gid NOT IN ({})", keep.join(", "))
            };
            let sql = format!(
                "DELETE FROM weir.two_phase_decisions WHERE at < now() - interval '1 minute'{not_kept}"
            );
            if let Err(e) = run(primaries, conns, i, &sql).await {
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_foreign_names_are_ignored() {
        let base = new_base(3);
        let gid = format!("{base}_1");
        assert_eq!(parse_gid(&gid), Some((base.clone(), 3)));
        assert_ne!(new_base(3), base);
        for other in [
            "weir_",
            "weir_1_abc",
            "weir_x_abc_1_2",
            "weir_1_zz_1_2",
            "weir_1_ab_1_2_3",
            "weir_1_ab_1_2'; DROP TABLE t; --",
            "pgdog_1",
            "",
        ] {
            assert_eq!(parse_gid(other), None, "{other}");
        }
    }
}
