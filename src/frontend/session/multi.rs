//! Transactions over several shards (`two_phase_commit = true`): a statement of an open
//! transaction that belongs to another shard takes a server of that shard (which starts the
//! same transaction) and the earlier server waits, parked; at COMMIT every parked shard
//! runs PREPARE TRANSACTION, the current shard (the coordinator) records the decision in
//! its own transaction and commits it with the client's own COMMIT, then the prepared shards
//! commit. See `backend::twophase` for the protocol and its recovery.

use super::*;
use crate::backend::twophase;

/// How long recording the commit decision may take (it waits only for other writers of
/// the decision table, such as recovery).
const DECISION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// A shard server of the open transaction that is not the current one.
pub(super) struct Parked {
    pub shard: usize,
    pub server: ServerConn,
    pub x: Xact,
}

/// The shards a transaction prepared, waiting for the coordinator's commit.
pub(super) struct Pending {
    pub base: String,
    pub prepared: Vec<(String, Parked)>,
}

/// A sharded session's state beyond routing (boxed, made on first use: clients of
/// unsharded databases do not pay for it): a transaction over several shards, what
/// read-your-writes must wait for, COPY and BEGIN bookkeeping.
#[derive(Default)]
pub(super) struct Multi {
    pub parked: Vec<Parked>,
    /// The BEGIN (with its SET LOCAL / SET TRANSACTION) each further shard starts with.
    pub begin_sql: Option<String>,
    pub pending: Option<Pending>,
    /// Per shard, what a replica must have replayed for this client to read there: its
    /// last write transaction on that shard (read-your-writes).
    pub written: Vec<crate::router::wal::Need>,
    /// The shard whose primary the current transaction may write on.
    pub writing: Option<usize>,
    /// The transaction ran DDL: the sharded tables' columns are read again after it.
    pub ddl: bool,
    /// A sharded COPY FROM failed: the client's further copy messages are dropped.
    pub drop_copy: bool,
    /// The SQL of an extended-protocol BEGIN routed as its own unit; the transaction has
    /// run nothing else while `begin_only` (it may move to another shard).
    pub begin_unheld: Option<String>,
    pub begin_only: bool,
    /// The unit just routed in a transaction runs nothing (Parse, Describe, Close).
    pub nothing_ran: bool,
    /// The transaction began READ ONLY (its shards need no two-phase commit).
    pub read_only_tx: bool,
    /// A savepoint was taken: the transaction may not spread to another shard.
    pub savepoint: bool,
    /// The answers owed to an extended-protocol COPY unit before its copy starts.
    pub copy_prefix: Option<BytesMut>,
}

impl Multi {
    pub fn active(&self) -> bool {
        !self.parked.is_empty() || self.pending.is_some()
    }
}

/// How a transaction's COMMIT ended on the coordinator, from its answers.
fn commit_outcome(answers: &[u8]) -> Option<bool> {
    let mut pos = 0;
    let mut outcome = None;
    while let Ok(Some(h)) = wire::header(&answers[pos..]) {
        if answers.len() - pos < h.total {
            break;
        }
        let msg = &answers[pos..pos + h.total];
        match h.tag {
            tag::ERROR_RESPONSE => return Some(false),
            b'C' => {
                let body = wire::body(msg);
                if body.starts_with(b"COMMIT") {
                    outcome = Some(true);
                } else if body.starts_with(b"ROLLBACK") {
                    outcome = Some(false);
                }
            }
            _ => {}
        }
        pos += h.total;
    }
    outcome
}

impl Session {
    /// This sharded session's extra state, made on first use.
    pub(super) fn sx(&mut self) -> &mut Multi {
        self.multi.get_or_insert_with(Box::default)
    }

    /// Moves the open transaction to `shard`: the current server is parked, and the shard's
    /// server (parked before, or newly borrowed and started with the transaction's BEGIN)
    /// becomes current. `None`: the client was told why and the session ends.
    pub(super) async fn switch_shard(
        &mut self,
        server: ServerConn,
        x: Xact,
        shard: usize,
    ) -> Option<(ServerConn, Xact)> {
        let current = self.pool.settings.shard.unwrap_or(0);
        self.sx().parked.push(Parked {
            shard: current,
            server,
            x,
        });
        if let Some(i) = self.sx().parked.iter().position(|p| p.shard == shard) {
            let mut p = self.sx().parked.swap_remove(i);
            self.pool = p.x.pool.clone();
            if let Some(set) = self.lock_timeout_sql() {
                if !matches!(p.server.exec(&set).await, Ok(TxStatus::InBlock)) {
                    let msg = format!("could not continue the transaction on shard {shard}");
                    self.fail("08P01", &msg).await;
                    return None;
                }
                p.x.relay.progress.lock_timeout_is_deadlock = true;
            }
            self.attach_server(&p.server);
            return Some((p.server, p.x));
        }
        self.open_shard(shard).await
    }

    /// Borrows a server of `shard`'s primary and starts the transaction's BEGIN on it; it
    /// becomes the current server. `None`: the client was told why.
    pub(super) async fn open_shard(&mut self, shard: usize) -> Option<(ServerConn, Xact)> {
        let router = self.router.clone()?;
        // A READ ONLY transaction may read on a replica of the new shard too.
        let read = self.sx().read_only_tx;
        let Some(pool) = self.shard_pool(&router, shard, read) else {
            self.fail("08P01", &format!("shard {shard} has no pool"))
                .await;
            return None;
        };
        self.pool = pool;
        let mut server = match self.checkout().await {
            Ok(Some(s)) => s,
            Ok(None) => return None,
            Err(e) => {
                let (code, msg) = checkout_error(&e);
                self.fail(&code, &msg).await;
                return None;
            }
        };
        if self.apply_params(&mut server).await.is_err() {
            return None;
        }
        let mut begin = self
            .sx()
            .begin_sql
            .as_deref()
            .unwrap_or("BEGIN")
            .to_string();
        let spread = !self.sx().parked.is_empty();
        let guard = self.lock_timeout_sql().filter(|_| spread);
        if let Some(set) = &guard {
            begin.push_str("; ");
            begin.push_str(set);
        }
        if !matches!(server.exec(&begin).await, Ok(TxStatus::InBlock)) {
            self.fail(
                "08P01",
                &format!("could not start the transaction on shard {shard}"),
            )
            .await;
            return None;
        }
        self.attach_server(&server);
        let mut x = Xact::new(self.pool.clone(), 0);
        x.relay.progress.lock_timeout_is_deadlock = guard.is_some();
        Some((server, x))
    }

    /// `SET LOCAL lock_timeout` for a server of a transaction spread over shards: a cycle of
    /// lock waits across servers is invisible to each PostgreSQL, so a wait there is
    /// bounded by `cross_shard_lock_timeout` (reported as a deadlock, 40P01).
    fn lock_timeout_sql(&self) -> Option<String> {
        let t = self.router.as_ref()?.cross_shard_lock_timeout;
        (!t.is_zero()).then(|| format!("SET LOCAL lock_timeout = '{}ms'", t.as_millis().max(1)))
    }

    /// Cancel requests and SHOW CLIENTS follow the current server.
    fn attach_server(&mut self, server: &ServerConn) {
        self.cancel.attach(BackendKey {
            address: server.address.clone(),
            pid: server.backend_pid,
            secret: server.backend_secret,
        });
        self.info
            .server_pid
            .store(server.backend_pid, Ordering::Relaxed);
    }

    /// The client's COMMIT of a transaction with parked shards: prepares them and records
    /// the decision in the current (coordinator) shard's transaction, so that the client's
    /// COMMIT, sent on next, commits the decision with the coordinator's writes. `Err`:
    /// nothing was committed; every shard was rolled back and the error is for the client.
    pub(super) async fn prepare_multi(
        &mut self,
        server: &mut ServerConn,
        tx: TxStatus,
    ) -> Result<(), (BytesMut, bool)> {
        if tx == TxStatus::Failed {
            // The client's COMMIT rolls the coordinator back; so go the others.
            self.release_parked(true).await;
            return Ok(());
        }
        let coordinator = self.pool.settings.shard.unwrap_or(0);
        let pool = self.pool.clone();
        if let Err(e) = self.ensure_decisions(coordinator, &pool).await {
            let idle = self.abort_multi(server, Vec::new()).await;
            return Err((build::error("ERROR", "58000", &e), idle));
        }
        let base = twophase::new_base(coordinator);
        let mut prepared: Vec<(String, Parked)> = Vec::new();
        let parked = std::mem::take(&mut self.sx().parked);
        let mut failure = None;
        for mut p in parked {
            if failure.is_some() {
                self.sx().parked.push(p);
                continue;
            }
            let gid = format!("{base}_{}", p.shard);
            let sql = format!("PREPARE TRANSACTION '{gid}'");
            match tokio::time::timeout(CLEANUP_TIMEOUT, p.server.exec(&sql)).await {
                Ok(Ok(TxStatus::Idle)) => prepared.push((gid, p)),
                Ok(Err(ExecError::Server(e))) => {
                    failure = Some(build::error(
                        "ERROR",
                        &e.code,
                        &format!(
                            "shard {} could not prepare the transaction: {}",
                            p.shard, e.message
                        ),
                    ));
                    // Its transaction is over (PREPARE failed and rolled it back).
                    self.sx().parked.push(p);
                }
                _ => {
                    failure = Some(build::error(
                        "ERROR",
                        "08006",
                        &format!("shard {} was lost while preparing the transaction; nothing was committed", p.shard),
                    ));
                    // Dropped: its connection closes, so its transaction rolls back.
                }
            }
        }
        if let Some(err) = failure {
            let idle = self.abort_multi(server, prepared).await;
            return Err((err, idle));
        }
        // The decision waits for nothing of the client's (no lock timeout), and its commit
        // must be durable whatever the server's synchronous_commit: once it is acknowledged
        // the prepared shards commit.
        let record = format!(
            "SET LOCAL lock_timeout = 0; SET LOCAL synchronous_commit = on; \
             INSERT INTO weir.two_phase_decisions (gid, commit, at) \
             VALUES ('{base}', true, clock_timestamp())"
        );
        match tokio::time::timeout(DECISION_TIMEOUT, server.exec(&record)).await {
            Ok(Ok(TxStatus::InBlock)) => {
                self.sx().pending = Some(Pending { base, prepared });
                Ok(())
            }
            Ok(Err(ExecError::Server(e))) => {
                let idle = self.abort_multi(server, prepared).await;
                let msg = format!(
                    "could not record the commit decision on shard {coordinator}: {}",
                    e.message
                );
                Err((build::error("ERROR", &e.code, &msg), idle))
            }
            _ => {
                // The coordinator's session is lost or stuck: it is closed, so its
                // transaction (and the decision in it) rolls back, and recovery rolls the
                // prepared shards back.
                drop(prepared);
                self.release_parked(true).await;
                let msg =
                    format!("shard {coordinator} was lost while committing; nothing was committed");
                Err((build::error("ERROR", "08006", &msg), false))
            }
        }
    }

    /// Rolls every shard of the transaction back: the prepared ones, the parked ones and the
    /// coordinator (`server`).
    /// Returns whether the coordinator is back to idle (else it must be closed).
    async fn abort_multi(
        &mut self,
        server: &mut ServerConn,
        prepared: Vec<(String, Parked)>,
    ) -> bool {
        for (gid, mut p) in prepared {
            let sql = format!("ROLLBACK PREPARED '{gid}'");
            match tokio::time::timeout(CLEANUP_TIMEOUT, p.server.exec(&sql)).await {
                Ok(Ok(TxStatus::Idle)) => self.put_back(p).await,
                _ => {
                    tracing::warn!(%gid, "could not roll back a prepared transaction; recovery will")
                }
            }
        }
        self.release_parked(true).await;
        matches!(
            tokio::time::timeout(CLEANUP_TIMEOUT, server.exec("ROLLBACK")).await,
            Ok(Ok(TxStatus::Idle))
        )
    }

    /// Ends the parked servers' transactions (ROLLBACK) and returns them to their pools.
    pub(super) async fn release_parked(&mut self, rollback: bool) {
        for mut p in std::mem::take(&mut self.sx().parked) {
            if rollback {
                match tokio::time::timeout(CLEANUP_TIMEOUT, p.server.exec("ROLLBACK")).await {
                    Ok(Ok(TxStatus::Idle)) => {}
                    _ => continue,
                }
            }
            self.put_back(p).await;
        }
    }

    /// Returns a parked server (idle now) to its pool, clean.
    async fn put_back(&mut self, mut p: Parked) {
        p.server.buf.clear();
        // Settled and checked in as a server of its own pool, not the current shard's.
        let current = std::mem::replace(&mut self.pool, p.x.pool.clone());
        if self.settle(&mut p.server, &p.x.relay.seen).await {
            self.release(p.server, false).await;
        }
        self.pool = current;
    }

    /// The second phase, once the coordinator answered the client's COMMIT (`answers`):
    /// COMMIT PREPARED on every prepared shard if it committed, ROLLBACK PREPARED if not.
    /// Runs before the client reads its COMMIT, so a committed transaction is visible on
    /// every shard once the client knows it committed.
    pub(super) async fn second_phase(&mut self, coordinator: &mut ServerConn, answers: &[u8]) {
        let Some(pending) = self.sx().pending.take() else {
            return;
        };
        let committed = match commit_outcome(answers) {
            Some(c) => Some(c),
            None => {
                let q = format!(
                    "SELECT commit FROM weir.two_phase_decisions WHERE gid = '{}'",
                    pending.base
                );
                match tokio::time::timeout(CLEANUP_TIMEOUT, coordinator.query_row(&q)).await {
                    Ok(Ok(row)) => Some(row.first().cloned().flatten().as_deref() == Some("t")),
                    _ => None,
                }
            }
        };
        let Some(committed) = committed else {
            tracing::warn!(base = %pending.base, "commit outcome unknown; two-phase recovery settles it");
            return;
        };
        let verb = if committed { "COMMIT" } else { "ROLLBACK" };
        if committed {
            if let Some(shard) = self.pool.settings.shard {
                self.mark_written(shard);
            }
        }
        for (gid, mut p) in pending.prepared {
            let sql = format!("{verb} PREPARED '{gid}'");
            match tokio::time::timeout(CLEANUP_TIMEOUT, p.server.exec(&sql)).await {
                Ok(Ok(TxStatus::Idle)) => {
                    if committed {
                        self.mark_written(p.shard);
                    }
                    self.put_back(p).await;
                }
                _ => tracing::warn!(%gid, "{verb} PREPARED failed; two-phase recovery settles it"),
            }
        }
    }

    /// Creates `weir.two_phase_decisions` on the coordinator shard the first time it is
    /// needed (the recovery task creates it too), on a connection of its own.
    pub(super) async fn ensure_decisions(
        &mut self,
        shard: usize,
        pool: &Arc<Pool>,
    ) -> Result<(), String> {
        let Some(router) = self.router.clone() else {
            return Err("not a sharded database".into());
        };
        let Some(flag) = router.decisions_ready.get(shard) else {
            return Err(format!("shard {shard} does not exist"));
        };
        if flag.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut last = String::new();
        for _ in 0..3 {
            let conn = tokio::time::timeout(CLEANUP_TIMEOUT, pool.connect_unpooled()).await;
            let mut conn = match conn {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Err(format!("shard {shard}: {e}")),
                Err(_) => return Err(format!("shard {shard}: connect timed out")),
            };
            match conn.exec(twophase::DECISIONS_DDL).await {
                Ok(_) => {
                    flag.store(true, Ordering::Release);
                    return Ok(());
                }
                // Concurrent CREATE … IF NOT EXISTS can collide; the next try sees it.
                Err(e) => last = e.to_string(),
            }
        }
        Err(format!(
            "two-phase commit needs table weir.two_phase_decisions on shard {shard}: {last}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_commit_outcome() {
        let mut ok = build::command_complete("COMMIT");
        ok.extend_from_slice(&build::ready_for_query(TxStatus::Idle));
        assert_eq!(commit_outcome(&ok), Some(true));
        let mut rolled = build::command_complete("ROLLBACK");
        rolled.extend_from_slice(&build::ready_for_query(TxStatus::Idle));
        assert_eq!(commit_outcome(&rolled), Some(false));
        let mut err = build::error("ERROR", "40001", "could not serialize");
        err.extend_from_slice(&build::ready_for_query(TxStatus::Idle));
        assert_eq!(commit_outcome(&err), Some(false));
        assert_eq!(
            commit_outcome(&build::ready_for_query(TxStatus::Idle)),
            None
        );
    }
}
