//! The shard state machine of a sharded session: read one routable unit, pick the shard
//! (and primary or replica) for it, keep a transaction on its shard, and answer what
//! Weir handles itself (BEGIN held until the first statement, refusals).

use super::*;
use crate::config::ReadYourWrites;
use crate::router::route::BindParams;
use crate::router::sql::TxControl;
use crate::router::wal::Need;

/// The most bytes of SET LOCAL / SET TRANSACTION a held BEGIN gathers.
const HELD_BEGIN_MAX: usize = 64 * 1024;

/// An INSERT without a column list routes by a catalog read at most this long ago.
const CATALOG_FRESH: Duration = Duration::from_secs(1);

impl Session {
    /// The largest message or statement Weir holds whole: `max_packet_size`.
    pub(super) fn packet_limit(&self) -> usize {
        self.cluster
            .config
            .general
            .max_packet_size
            .min(wire::MAX_MESSAGE_LEN)
    }

    /// Reads until a whole routable unit is at the front of the buffer: a statement is
    /// routed by its key whatever its size, so it is held whole up to `max_packet_size`; a
    /// larger one is refused (the connection is closed, as PgBouncer does for a packet over
    /// that limit), never sent somewhere unrouted. `Err`: the client is gone or was refused.
    pub(super) async fn read_unit(&mut self) -> Result<routing::Unit, ()> {
        let limit = self.packet_limit();
        loop {
            self.drop_copy_messages();
            let pending = match routing::unit(&self.cbuf, &self.stmts, &self.shard.last_unnamed) {
                Ok(Some(u)) if u.len <= limit => {
                    routing::note_unnamed(&self.cbuf[..u.len], &mut self.shard.last_unnamed);
                    return Ok(u);
                }
                Ok(Some(u)) => u.len,
                Ok(None) => routing::pending_len(&self.cbuf),
                Err(e) => {
                    self.fail("08P01", &format!("protocol error: {e}")).await;
                    return Err(());
                }
            };
            if pending > limit {
                tracing::warn!(peer = %self.peer, bytes = pending, limit, "statement over max_packet_size refused");
                let msg = format!(
                    "statement of {pending} bytes is larger than max_packet_size ({limit}) and cannot be routed to a shard"
                );
                self.fail("08P01", &msg).await;
                self.linger().await;
                return Err(());
            }
            if pending > self.cbuf.len() {
                // Room for the rest of a large message at once, not by doubling.
                self.cbuf.reserve(pending - self.cbuf.len());
            }
            match self.client.read_buf(&mut self.cbuf).await {
                Ok(0) | Err(_) => return Err(()),
                Ok(_) => {}
            }
        }
    }

    /// After refusing a client that is still sending (a statement over max_packet_size):
    /// ends Weir's side and reads what keeps coming for up to 2 s, so the client reads the
    /// error rather than a reset its unread bytes would cause.
    async fn linger(&mut self) {
        use tokio::io::AsyncWriteExt;
        let _ = self.client.shutdown().await;
        let deadline = tokio::time::sleep(Duration::from_secs(2));
        tokio::pin!(deadline);
        loop {
            self.cbuf.clear();
            tokio::select! {
                _ = &mut deadline => return,
                n = self.client.read_buf(&mut self.cbuf) => match n {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                },
            }
        }
    }

    /// Picks the pool for the unit at the front of the buffer, or answers
    /// it without a server.
    pub(super) async fn route(&mut self) -> Routed {
        let Some(router) = self.router.clone() else {
            return Routed::Pool(self.pool.clone(), usize::MAX);
        };
        let Ok(mut unit) = self.read_unit().await else {
            return Routed::Closed;
        };
        let sql = unit.sql.take().unwrap_or_default();
        let status = match &self.shard.held {
            Some(h) if h.failed => TxStatus::Failed,
            Some(_) => TxStatus::InBlock,
            None => TxStatus::Idle,
        };
        if unit.simple {
            match routing::weir_setting(&sql) {
                Some(Ok(pin)) => {
                    let tag = if pin.is_some() { "SET" } else { "RESET" };
                    self.shard.pin = pin;
                    return self.answer(unit.len, Some(tag), None, status).await;
                }
                Some(Err(msg)) => {
                    let err = build::error("ERROR", "22023", &msg);
                    return self.refuse(unit.len, unit.synced, err, status).await;
                }
                None => {}
            }
        }
        let (analysis, shape) = self.analyze_fresh(&router, &unit, &sql).await;
        self.sx().ddl |= analysis.kind == Kind::Other && routing::is_ddl(&sql);
        if unit.executes && unit.synced {
            let sharded = analysis.table.is_some() || analysis.sharded_elsewhere.is_some();
            if let Some(r) = self
                .sharded_copy(&router, &sql, unit.len, unit.simple, sharded, status)
                .await
            {
                return r;
            }
        }
        if !unit.simple && unit.execs == 1 && matches!(analysis.kind, Kind::Begin { .. }) {
            // An extended-protocol BEGIN runs where it is routed (shard 0, or the pinned
            // one); the transaction may still move to the shard its first statement names.
            self.sx().begin_unheld = Some(sql.clone());
        }
        if unit.simple && !analysis.multi {
            match analysis.kind {
                Kind::Begin { read_only } if self.shard.held.is_none() => {
                    self.shard.held = Some(HeldBegin {
                        sql: sql.clone(),
                        read_only,
                        failed: false,
                    });
                    return self
                        .answer(unit.len, Some("BEGIN"), None, TxStatus::InBlock)
                        .await;
                }
                Kind::Other
                    if self.shard.held.is_some()
                        && routing::is_transaction_set(&sql)
                        && self
                            .shard
                            .held
                            .as_ref()
                            .is_some_and(|h| h.sql.len() + sql.len() <= HELD_BEGIN_MAX) =>
                {
                    // SET LOCAL / SET TRANSACTION … right after BEGIN travel with it (up to
                    // HELD_BEGIN_MAX bytes; beyond, they go to shard 0 with the BEGIN).
                    if let Some(h) = &mut self.shard.held {
                        h.sql.push_str("; ");
                        h.sql.push_str(sql.trim().trim_end_matches(';'));
                    }
                    return self
                        .answer(unit.len, Some("SET"), None, TxStatus::InBlock)
                        .await;
                }
                Kind::End if self.shard.held.is_some() => {
                    let failed = self.shard.held.take().is_some_and(|h| h.failed);
                    let commit = {
                        let w = sql.trim_start().to_ascii_lowercase();
                        w.starts_with("commit") || w.starts_with("end")
                    };
                    let tag = if commit && !failed {
                        "COMMIT"
                    } else {
                        "ROLLBACK"
                    };
                    return self.answer(unit.len, Some(tag), None, TxStatus::Idle).await;
                }
                _ => {}
            }
        }
        if status == TxStatus::Failed {
            let err = build::error(
                "ERROR",
                "25P02",
                "current transaction is aborted, commands ignored until end of transaction block",
            );
            return self
                .answer(unit.len, None, Some(err), TxStatus::Failed)
                .await;
        }
        let params = routing::unit_params(&self.cbuf, &unit, &shape);
        let pin = comment_hint(&sql).or_else(|| self.shard.pin.clone());
        let (in_write_tx, in_read_tx) = match &self.shard.held {
            Some(h) => (!h.read_only, h.read_only),
            None => (false, false),
        };
        let decision = if unit.executes {
            let first = router.decide(&analysis, &params, pin.as_ref(), in_write_tx);
            self.decide_batch(&router, &unit, first, pin.as_ref(), in_write_tx)
        } else {
            // Parse/Describe/Close only: the statement is known on every server.
            Decision::Any { read: false }
        };
        match decision {
            Decision::Shard { shard, read } => {
                if !(read || in_read_tx) && router.wal.primary_read_only(shard) {
                    let err = build::error(
                        "ERROR",
                        "25006",
                        &format!("shard {shard}'s primary is in recovery (read-only): it cannot take this write until it is promoted or the shard's primary is changed in the config"),
                    );
                    return self.refuse(unit.len, unit.synced, err, status).await;
                }
                match self.shard_pool(&router, shard, read || in_read_tx) {
                    Some(p) => Routed::Pool(p, unit.len),
                    None => Routed::Closed,
                }
            }
            Decision::Any { read } => {
                let shard = match pin {
                    Some(Pin::Shard(s)) if s < router.shards => s,
                    _ => 0,
                };
                match self.shard_pool(&router, shard, read || in_read_tx) {
                    Some(p) => Routed::Pool(p, unit.len),
                    None => Routed::Closed,
                }
            }
            Decision::FanOut(merge) if unit.simple && self.shard.held.is_none() => {
                let pools: Option<Vec<_>> = (0..router.shards)
                    .map(|s| self.shard_pool(&router, s, true))
                    .collect();
                let Some(pools) = pools else {
                    return Routed::Closed;
                };
                let query = Bytes::copy_from_slice(&self.cbuf[..unit.len]);
                self.cbuf.advance(unit.len);
                let out = fanout::run(pools, query, &self.wanted, &merge).await;
                match self.client.write_all(&out).await {
                    Ok(()) => Routed::Done,
                    Err(_) => Routed::Closed,
                }
            }
            Decision::FanOut(_) => {
                let err = build::error(
                    "ERROR",
                    "0A000",
                    "a read without a sharding key runs on every shard only as a simple query outside a transaction; add the sharding key or a /* weir: shard=N */ hint",
                );
                self.refuse(unit.len, unit.synced, err, status).await
            }
            Decision::Refuse(msg)
                if router.two_phase_commit
                    && unit.simple
                    && self.shard.held.is_none()
                    && pin.is_none()
                    && !analysis.multi
                    && ((analysis.table.is_some()
                        && matches!(analysis.kind, Kind::Update | Kind::Delete)
                        && (analysis.keys.is_empty()
                            || msg.contains("touches more than one shard")))
                        // TRUNCATE, ALTER TABLE, CREATE INDEX … on a sharded table.
                        || (analysis.kind == Kind::Other
                            && analysis.tx == TxControl::None
                            && analysis.sharded_elsewhere.is_some())) =>
            {
                // Every shard runs it (each holds only its own rows); all commit or none.
                self.fan_out_write(&router, &sql, unit.len).await
            }
            Decision::Refuse(msg) => {
                let err = build::error("ERROR", "0A000", &msg);
                self.refuse(unit.len, unit.synced, err, status).await
            }
        }
    }

    /// Checks the next unit of a transaction that runs on shard `current`. A transaction
    /// that has run only its BEGIN moves to the shard its first statement names.
    pub(super) async fn route_in_tx(&mut self, current: usize, status: TxStatus) -> InTx {
        let begin_only = self.sx().begin_only;
        let next = self.route_in_tx_unit(current, status).await;
        // Only a unit that runs something ends "nothing but BEGIN" (a Parse does not).
        self.sx().begin_only =
            begin_only && (matches!(next, InTx::Answered | InTx::Closed) || self.sx().nothing_ran);
        self.sx().nothing_ran = false;
        next
    }

    async fn route_in_tx_unit(&mut self, current: usize, status: TxStatus) -> InTx {
        let Some(router) = self.router.clone() else {
            return InTx::Go(usize::MAX);
        };
        let Ok(mut unit) = self.read_unit().await else {
            return InTx::Closed;
        };
        let multi = !self.sx().parked.is_empty();
        self.sx().nothing_ran = !unit.executes;
        if !unit.executes || (status == TxStatus::Failed && !multi) {
            // Nothing runs, or the server refuses it anyway.
            return InTx::Go(unit.len);
        }
        let sql = unit.sql.take().unwrap_or_default();
        if multi {
            let (analysis, _) = routing::analyze_unit(&router, &unit, &sql);
            if analysis.multi || !unit.synced || unit.execs > 1 {
                return InTx::Refuse(
                    unit.len,
                    "a transaction over several shards takes one statement at a time, each ending with Sync".into(),
                );
            }
            let read_only = self.sx().read_only_tx;
            match analysis.tx {
                TxControl::Commit if !read_only => return InTx::EndMulti(true, unit.len),
                // A read-only transaction has nothing to commit on the other shards.
                TxControl::Commit | TxControl::Rollback => return InTx::EndMulti(false, unit.len),
                TxControl::Chain | TxControl::Savepoint | TxControl::TwoPhase => {
                    return InTx::Refuse(
                        unit.len,
                        "savepoints, AND CHAIN and two-phase commands are not supported in a transaction over several shards".into(),
                    );
                }
                TxControl::None => {}
            }
            if status == TxStatus::Failed {
                return InTx::Go(unit.len);
            }
        }
        if unit.simple {
            match routing::weir_setting(&sql) {
                Some(Ok(pin)) => {
                    let tag = if pin.is_some() { "SET" } else { "RESET" };
                    self.shard.pin = pin;
                    return match self.answer(unit.len, Some(tag), None, status).await {
                        Routed::Closed => InTx::Closed,
                        _ => InTx::Answered,
                    };
                }
                Some(Err(msg)) => return InTx::Refuse(unit.len, msg),
                None => {}
            }
        }
        let (analysis, shape) = self.analyze_fresh(&router, &unit, &sql).await;
        self.sx().ddl |= analysis.kind == Kind::Other && routing::is_ddl(&sql);
        if analysis.tx == TxControl::Savepoint {
            // The transaction stays on this shard from now on (a savepoint is per server).
            self.sx().savepoint = true;
        }
        if matches!(analysis.kind, Kind::Begin { .. } | Kind::End) || analysis.multi {
            return InTx::Go(unit.len);
        }
        let params = routing::unit_params(&self.cbuf, &unit, &shape);
        let pin = comment_hint(&sql).or_else(|| self.shard.pin.clone());
        let first = router.decide(&analysis, &params, pin.as_ref(), true);
        match self.decide_batch(&router, &unit, first, pin.as_ref(), true) {
            Decision::Any { .. } => InTx::Go(unit.len),
            Decision::Shard { shard, .. } if shard == current => InTx::Go(unit.len),
            Decision::Shard { shard, .. }
                if self.sx().begin_only && status == TxStatus::InBlock && unit.synced =>
            {
                InTx::Move(shard, unit.len)
            }
            Decision::Shard { shard, .. }
                if router.two_phase_commit
                    && status == TxStatus::InBlock
                    && unit.synced
                    && unit.execs == 1
                    && !self.sx().savepoint =>
            {
                InTx::Switch(shard, unit.len)
            }
            Decision::Shard { shard, .. } => InTx::Refuse(
                unit.len,
                format!(
                    "this transaction runs on shard {current}; the statement belongs to shard {shard}. A transaction stays on one shard: commit it and run the statement in its own transaction"
                ),
            ),
            Decision::FanOut(_) => InTx::Refuse(
                unit.len,
                format!(
                    "this transaction runs on shard {current}; a read without a sharding key would need every shard. Add the sharding key, or run it outside the transaction"
                ),
            ),
            Decision::Refuse(msg) => InTx::Refuse(unit.len, msg),
        }
    }

    /// The decision for a unit of several statements (a batch up to Sync, as JDBC sends
    /// `BEGIN` with the first statement): every statement must route to the same shard,
    /// given `first`, the first statement's decision.
    fn decide_batch(
        &self,
        router: &ShardRouter,
        unit: &routing::Unit,
        first: Decision,
        pin: Option<&Pin>,
        in_write_tx: bool,
    ) -> Decision {
        if unit.more.is_empty() {
            return first;
        }
        let mut shard: Option<usize> = None;
        let mut all_read = true;
        let rest = unit.more.iter().map(|(sql, (a, b))| match sql {
            Some(sql) => {
                let analysis = router.analyze(sql);
                let params = BindParams::parse(&self.cbuf[*a..*b]).unwrap_or_default();
                router.decide(&analysis, &params, pin, in_write_tx)
            }
            None => Decision::Any { read: false },
        });
        for d in std::iter::once(first).chain(rest) {
            match d {
                Decision::Shard { shard: s, read } => {
                    if let Some(prev) = shard.filter(|p| *p != s) {
                        return Decision::Refuse(format!(
                            "the statements of one batch (up to Sync) belong to shards {prev} and {s}; send them in separate transactions"
                        ));
                    }
                    shard = Some(s);
                    all_read &= read;
                }
                Decision::Any { read } => all_read &= read,
                Decision::FanOut(_) => {
                    return Decision::Refuse(
                        "a read without a sharding key cannot run in a batch with other statements; send it on its own".into(),
                    )
                }
                Decision::Refuse(m) => return Decision::Refuse(m),
            }
        }
        match shard {
            Some(s) => Decision::Shard {
                shard: s,
                read: all_read,
            },
            None => Decision::Any { read: all_read },
        }
    }

    /// The unit's analysis; an INSERT without a column list routes by the key's position
    /// in the catalog, read again first unless it is fresh (columns may have been dropped
    /// or added on the shards directly).
    async fn analyze_fresh<'a>(
        &mut self,
        router: &Arc<ShardRouter>,
        unit: &routing::Unit,
        sql: &'a str,
    ) -> (
        Arc<crate::router::sql::Analysis>,
        Option<crate::router::shape::Shape<'a>>,
    ) {
        let (analysis, shape) = routing::analyze_unit(router, unit, sql);
        // The catalog's clock (a lock) is read only for such an INSERT, not per statement.
        if !analysis.no_column_list || router.catalog_age().is_some_and(|age| age <= CATALOG_FRESH)
        {
            return (analysis, shape);
        }
        if let Some(pool) = self.cluster.shard_pool(&self.db, &self.user, 0, None) {
            if let Err(e) = crate::backend::catalog::refresh(router, &pool).await {
                tracing::warn!(error = %e, "could not read the sharded tables' columns");
            }
        }
        routing::analyze_unit(router, unit, sql)
    }

    /// After a transaction: if it could write on a shard's primary, remember how far a
    /// replica must replay before this client reads that shard there.
    pub(super) fn note_write(&mut self) {
        if self.multi.is_none() {
            return;
        }
        if std::mem::take(&mut self.sx().ddl) {
            if let (Some(router), Some(pool)) = (
                self.router.clone(),
                self.cluster.shard_pool(&self.db, &self.user, 0, None),
            ) {
                crate::backend::catalog::spawn_refresh(router, pool);
            }
        }
        if let Some(shard) = self.sx().writing.take() {
            self.mark_written(shard);
        }
    }

    /// Read-your-writes: this client's write transaction on `shard` ended.
    pub(super) fn mark_written(&mut self, shard: usize) {
        let Some(router) = self.router.clone() else {
            return;
        };
        if router.read_your_writes == ReadYourWrites::Off {
            return;
        }
        let written = &mut self.sx().written;
        if written.len() < router.shards {
            written.resize(router.shards, Need::default());
        }
        if let Some(w) = written.get_mut(shard) {
            *w = router.wal.mark(shard);
        }
    }

    /// What a replica of `shard` must have replayed for this client's read (`Some(0)`: any
    /// replica; `None`: none can serve it yet, read from the primary).
    fn read_bound(&mut self, router: &ShardRouter, shard: usize) -> Option<u64> {
        let mut need = match router.read_your_writes {
            ReadYourWrites::Off => return Some(0),
            ReadYourWrites::Client => self.sx().written.get(shard).copied().unwrap_or_default(),
            ReadYourWrites::Global => router.wal.global_need(shard),
        };
        if !router.wal.resolve(shard, &mut need) {
            return None;
        }
        if router.read_your_writes == ReadYourWrites::Client {
            if let Some(w) = self.sx().written.get_mut(shard) {
                *w = need;
            }
        }
        Some(need.lsn)
    }

    /// The pool of a shard: for reads, a healthy replica that holds what this client must
    /// see, when allowed; the primary otherwise. A pool chosen for a statement that may
    /// write marks the transaction as writing on that shard.
    pub(super) fn shard_pool(
        &mut self,
        router: &ShardRouter,
        shard: usize,
        read: bool,
    ) -> Option<Arc<Pool>> {
        let replica = if read {
            match router.replicas.get(shard) {
                Some(&n) if n > 0 && router.read_from_replicas => self
                    .read_bound(router, shard)
                    .and_then(|min| router.pick_replica(shard, min)),
                _ => None,
            }
        } else {
            self.sx().writing = Some(shard);
            None
        };
        if let Some(p) = self.shard.pools.get(&(shard, replica)) {
            return Some(p.clone());
        }
        if let Some(p) = self
            .cluster
            .shard_pool(&self.db, &self.user, shard, replica)
        {
            self.shard.pools.insert((shard, replica), p.clone());
            return Some(p);
        }
        self.cluster.shard_pool(&self.db, &self.user, shard, None)
    }

    /// Refuses a unit: an error, and ReadyForQuery if the client expects one.
    pub(super) async fn refuse(
        &mut self,
        len: usize,
        synced: bool,
        err: BytesMut,
        status: TxStatus,
    ) -> Routed {
        let status = match &mut self.shard.held {
            Some(h) => {
                h.failed = true;
                TxStatus::Failed
            }
            None => status,
        };
        if synced {
            self.answer(len, None, Some(err), status).await
        } else {
            self.cbuf.advance(len);
            match self.client.write_all(&err).await {
                Ok(()) => Routed::Done,
                Err(_) => Routed::Closed,
            }
        }
    }

    /// Consumes a unit and answers it: CommandComplete or an error, then ReadyForQuery.
    pub(super) async fn answer(
        &mut self,
        len: usize,
        tag: Option<&str>,
        err: Option<BytesMut>,
        status: TxStatus,
    ) -> Routed {
        self.cbuf.advance(len);
        let mut out = BytesMut::with_capacity(64);
        if let Some(t) = tag {
            out.put_u8(b'C');
            out.put_i32((4 + t.len() + 1) as i32);
            out.put_slice(t.as_bytes());
            out.put_u8(0);
        }
        if let Some(e) = err {
            out.put(e);
        }
        out.put(build::ready_for_query(status));
        match self.client.write_all(&out).await {
            Ok(()) => Routed::Done,
            Err(_) => Routed::Closed,
        }
    }
}
