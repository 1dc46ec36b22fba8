//! COPY of a sharded table. `COPY t [(cols)] FROM STDIN` (text, CSV, binary): the client's
//! data is cut into rows (`router::copy::RowSplitter`) and each row goes to the shard its
//! sharding column names, in one COPY per shard, each in its own transaction; all commit
//! together (with two-phase commit when it is on) or none does, and the client gets the
//! total row count. `COPY t TO STDOUT` runs on every shard in turn and the streams are
//! joined into one (one header, one binary trailer).

use super::*;
use crate::backend::twophase;
use crate::router::copy::{self as cp, CopyFormat, CopyStatement, OutMerger, RowSplitter};
use crate::router::{parse_binary_key, parse_key, shard_for, KeyValue};

/// Rows for one shard are sent once this many bytes have gathered.
const FLUSH_AT: usize = 64 * 1024;

/// What PostgreSQL answers the messages of an extended-protocol COPY unit before its
/// Execute starts the copy: ParseComplete, BindComplete, and for Describe no row
/// description (a statement describes no parameters).
fn extended_prefix(unit: &[u8]) -> BytesMut {
    let mut out = BytesMut::new();
    let mut pos = 0;
    let short = |out: &mut BytesMut, t: u8| {
        out.put_u8(t);
        out.put_i32(4);
    };
    while let Ok(Some(h)) = wire::header(&unit[pos..]) {
        if unit.len() - pos < h.total {
            break;
        }
        let msg = &unit[pos..pos + h.total];
        match h.tag {
            tag::PARSE => short(&mut out, b'1'),
            tag::BIND => short(&mut out, b'2'),
            b'D' => {
                if wire::body(msg).first() == Some(&b'S') {
                    out.put_u8(b't');
                    out.put_i32(6);
                    out.put_i16(0);
                }
                short(&mut out, b'n');
            }
            tag::EXECUTE => break,
            _ => {}
        }
        pos += h.total;
    }
    out
}

/// The row count of a `COPY n` CommandComplete.
fn copy_count(msg: &[u8]) -> u64 {
    let body = wire::body(msg);
    let text = std::str::from_utf8(body).unwrap_or("");
    text.trim_end_matches('\0')
        .strip_prefix("COPY ")
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// One shard's server during a COPY.
struct ShardCopy {
    shard: usize,
    pool: Arc<Pool>,
    server: ServerConn,
    /// Rows gathered for it, as CopyData payload.
    out: BytesMut,
    rows: u64,
    /// Its COPY is still open (a CopyFail ends it); otherwise only its transaction is.
    copying: bool,
}

impl Session {
    /// A COPY naming a sharded table, outside a transaction: carried out here (`Some`), or
    /// refused with words that say why. `None`: not such a COPY (the usual routing goes on).
    pub(super) async fn sharded_copy(
        &mut self,
        router: &Arc<ShardRouter>,
        sql: &str,
        len: usize,
        simple: bool,
        sharded_elsewhere: bool,
        status: TxStatus,
    ) -> Option<Routed> {
        let first = sql.trim_start();
        if !first
            .get(..4)
            .is_some_and(|w| w.eq_ignore_ascii_case("copy"))
        {
            return None;
        }
        let refuse = |msg: String| build::error("ERROR", "0A000", &msg);
        let stmt = match cp::parse_copy(sql)? {
            Ok(s) => s,
            Err(msg) if sharded_elsewhere => {
                return Some(self.refuse(len, true, refuse(msg), status).await);
            }
            Err(_) => return None,
        };
        if stmt.query {
            if !sharded_elsewhere {
                return None;
            }
            let msg = "COPY (query) TO STDOUT with a sharded table in the query is not supported: use COPY table TO STDOUT, or a SELECT (which runs on every shard)".to_string();
            return Some(self.refuse(len, true, refuse(msg), status).await);
        }
        let schema = stmt.schema.clone().unwrap_or_default();
        let t = router.table_index(&schema, &stmt.table)?;
        let name = &stmt.table;
        let msg = if !stmt.stdio {
            Some(format!("COPY of sharded table \"{name}\" to or from a server file or program is not supported: each shard holds part of the table; use FROM STDIN / TO STDOUT (psql's \\copy)"))
        } else if self.shard.held.is_some() {
            Some(format!("COPY of sharded table \"{name}\" runs only outside a transaction block: Weir runs it on every shard in transactions of its own"))
        } else {
            None
        };
        if let Some(msg) = msg {
            return Some(self.refuse(len, true, refuse(msg), status).await);
        }
        // Extended protocol: PostgreSQL answers up to the Execute, and after the copy
        // ends, the client's next Sync gets ReadyForQuery (one inside the unit is ignored
        // during the copy, as PostgreSQL ignores it).
        let prefix = (!simple).then(|| extended_prefix(&self.cbuf[..len]));
        self.sx().copy_prefix = prefix;
        Some(if stmt.from {
            self.copy_in(router, t, &stmt, sql, len).await
        } else {
            self.copy_out(router, &stmt, sql, len).await
        })
    }

    /// Before the COPY's first answer: what an extended-protocol unit is owed.
    async fn send_prefix(&mut self) -> bool {
        match self.sx().copy_prefix.take() {
            Some(p) if !p.is_empty() => self.client.write_all(&p).await.is_ok(),
            _ => true,
        }
    }

    /// The end of a COPY: its last answer, with ReadyForQuery for a simple Query (an
    /// extended unit's client sends Sync for it).
    async fn copy_end(&mut self, mut out: BytesMut, extended: bool) -> Routed {
        if !extended {
            out.extend_from_slice(&build::ready_for_query(TxStatus::Idle));
        }
        match self.client.write_all(&out).await {
            Ok(()) => Routed::Done,
            Err(_) => Routed::Closed,
        }
    }

    /// The position of the sharding column among the COPY's fields.
    async fn key_field(
        &mut self,
        router: &Arc<ShardRouter>,
        t: usize,
        stmt: &CopyStatement,
    ) -> Result<usize, String> {
        let tables = router.tables();
        let column = tables[t].column.clone();
        if !stmt.columns.is_empty() {
            return stmt.columns.iter().position(|c| *c == column).ok_or_else(|| {
                format!(
                    "COPY into sharded table \"{}\" must include its sharding column \"{column}\" in the column list",
                    stmt.table
                )
            });
        }
        if router.columns(t).is_none() {
            if let Some(pool) = self.cluster.shard_pool(&self.db, &self.user, 0, None) {
                if let Err(e) = crate::backend::catalog::refresh(router, &pool).await {
                    return Err(format!(
                        "could not read the columns of \"{}\": {e}",
                        stmt.table
                    ));
                }
            }
        }
        let columns = router
            .columns(t)
            .ok_or_else(|| format!("relation \"{}\" does not exist on shard 0", stmt.table))?;
        // Without a column list COPY takes every column but generated ones, in order.
        columns
            .iter()
            .filter(|(_, generated)| !generated)
            .position(|(n, _)| *n == column)
            .ok_or_else(|| {
                format!(
                    "sharded table \"{}\" has no column \"{column}\"",
                    stmt.table
                )
            })
    }

    /// Borrows a server of `pool` with the client's session parameters.
    async fn copy_server(&mut self, pool: &Arc<Pool>) -> Result<ServerConn, BytesMut> {
        let mut server = pool.checkout().await.map_err(|e| {
            let (code, msg) = checkout_error(&e);
            build::error("ERROR", &code, &msg)
        })?;
        if let Some((sql, changed)) = server.params.sync_statement(&self.wanted) {
            if server.exec(&sql).await.is_err() {
                return Err(build::error(
                    "ERROR",
                    "08006",
                    "shard failed applying session parameters",
                ));
            }
            server.params.after_sync(&mut self.wanted, &changed);
        }
        Ok(server)
    }

    /// Sends the statement to a shard and reads up to its answer: CopyInResponse or
    /// CopyOutResponse (returned), or an error.
    async fn start_copy(server: &mut ServerConn, sql: &str) -> Result<BytesMut, BytesMut> {
        let lost = || build::error("ERROR", "08006", "shard connection lost");
        server
            .stream
            .write_all(&build::query(sql))
            .await
            .map_err(|_| lost())?;
        loop {
            let msg = match crate::net::read_message(&mut server.stream, &mut server.buf).await {
                Ok(Some(m)) => m,
                _ => return Err(lost()),
            };
            match msg[0] {
                b'G' | b'H' => return Ok(msg),
                tag::ERROR_RESPONSE => {
                    // The rest of the answer (ReadyForQuery) follows.
                    let _ = server.drain_until_ready().await;
                    return Err(msg);
                }
                _ => {}
            }
        }
    }

    /// `COPY … FROM STDIN` into sharded table `t`.
    async fn copy_in(
        &mut self,
        router: &Arc<ShardRouter>,
        t: usize,
        stmt: &CopyStatement,
        sql: &str,
        len: usize,
    ) -> Routed {
        let key_field = match self.key_field(router, t, stmt).await {
            Ok(k) => k,
            Err(msg) => {
                let err = build::error("ERROR", "42703", &msg);
                return self.refuse(len, true, err, TxStatus::Idle).await;
            }
        };
        self.cbuf.advance(len);
        let extended = self.sx().copy_prefix.is_some();
        let key_type = router.tables()[t].key_type;
        let mut shards: Vec<ShardCopy> = Vec::with_capacity(router.shards);
        let mut response = None;
        for shard in 0..router.shards {
            let started = self.start_shard_copy(router, shard, sql).await;
            match started {
                Ok((copy, msg)) => {
                    shards.push(copy);
                    response.get_or_insert(msg);
                }
                Err(err) => {
                    self.abort_copy(shards, "another shard failed").await;
                    return self.copy_answer(err).await;
                }
            }
        }
        let Some(response) = response else {
            return self
                .copy_answer(build::error("ERROR", "XX000", "no shards"))
                .await;
        };
        if !self.send_prefix().await || self.client.write_all(&response).await.is_err() {
            self.abort_copy(shards, "client connection lost").await;
            return Routed::Closed;
        }
        let limit = self.packet_limit();
        let mut splitter = RowSplitter::new(&stmt.options, key_field, limit);
        let mut rows = Vec::new();
        let mut headed = false;
        let mut row_no: u64 = 0;
        let failure: Option<BytesMut> = loop {
            let msg = match self.client_message(limit).await {
                Ok(m) => m,
                Err(None) => {
                    self.abort_copy(shards, "client connection lost").await;
                    return Routed::Closed;
                }
                Err(Some(err)) => break Some(err),
            };
            let done = match msg[0] {
                b'd' => {
                    if let Err(e) = splitter.push(wire::body(&msg), &mut rows) {
                        break Some(build::error("ERROR", e.sqlstate(), e.message()));
                    }
                    false
                }
                b'c' => {
                    if let Err(e) = splitter.finish(&mut rows) {
                        break Some(build::error("ERROR", e.sqlstate(), e.message()));
                    }
                    true
                }
                b'f' => {
                    let why = wire::cstr(wire::body(&msg), 0).map_or("", |(s, _)| s);
                    break Some(build::error(
                        "ERROR",
                        "57014",
                        &format!("COPY from stdin failed: {why}"),
                    ));
                }
                tag::FLUSH | tag::SYNC => continue,
                other => {
                    break Some(build::error(
                        "ERROR",
                        "08P01",
                        &format!("unexpected message type 0x{other:02X} during COPY from stdin"),
                    ));
                }
            };
            if !headed {
                let head = splitter.binary_header().or(splitter.header()).cloned();
                if let Some(head) = head {
                    for s in &mut shards {
                        s.out.extend_from_slice(&head);
                    }
                    headed = true;
                }
            }
            let mut bad = None;
            for row in rows.drain(..) {
                row_no += 1;
                let shard = match &row.key {
                    None => shard_for(key_type, &KeyValue::Null, router.shards as u64),
                    Some(k) if stmt.options.format == CopyFormat::Binary => {
                        parse_binary_key(key_type, k)
                            .and_then(|v| shard_for(key_type, &v, router.shards as u64))
                    }
                    Some(k) => std::str::from_utf8(k)
                        .map_err(|_| crate::router::HashError::InvalidText)
                        .and_then(|text| parse_key(key_type, text))
                        .and_then(|v| shard_for(key_type, &v, router.shards as u64)),
                };
                match shard {
                    Ok(s) => {
                        let sc = &mut shards[s as usize];
                        sc.out.extend_from_slice(&row.bytes);
                        sc.rows += 1;
                    }
                    Err(e) => {
                        bad = Some(build::error(
                            "ERROR",
                            "22P02",
                            &format!("COPY row {row_no}: sharding key: {e}"),
                        ));
                        break;
                    }
                }
            }
            if bad.is_some() {
                break bad;
            }
            if done && stmt.options.format == CopyFormat::Binary && !headed {
                // No data at all: each shard still needs a valid (empty) stream.
                headed = true;
            }
            let mut lost = false;
            for s in &mut shards {
                if s.out.len() >= FLUSH_AT || (done && !s.out.is_empty()) {
                    let m = build::copy_data(&s.out);
                    s.out.clear();
                    lost |= s.server.stream.write_all(&m).await.is_err();
                }
            }
            if lost {
                break Some(build::error(
                    "ERROR",
                    "08006",
                    "shard connection lost during COPY",
                ));
            }
            if done {
                break None;
            }
        };
        if let Some(err) = failure {
            self.abort_copy(shards, "COPY failed").await;
            // Later CopyData/CopyDone/CopyFail of this COPY are dropped, as PostgreSQL does.
            self.sx().drop_copy = true;
            return self.copy_end(err, extended).await;
        }
        // Every shard ends its COPY; all must succeed.
        let mut total = 0;
        let mut error = None;
        for s in &mut shards {
            let mut end = BytesMut::new();
            if stmt.options.format == CopyFormat::Binary && headed {
                end.extend_from_slice(&build::copy_data(&cp::BINARY_TRAILER));
            }
            end.extend_from_slice(&build::copy_done());
            s.copying = false;
            if s.server.stream.write_all(&end).await.is_err() {
                error.get_or_insert(build::error("ERROR", "08006", "shard connection lost"));
                continue;
            }
            loop {
                match crate::net::read_message(&mut s.server.stream, &mut s.server.buf).await {
                    Ok(Some(m)) => match m[0] {
                        b'C' => total += copy_count(&m),
                        tag::ERROR_RESPONSE => {
                            error.get_or_insert(m);
                        }
                        tag::READY_FOR_QUERY => break,
                        _ => {}
                    },
                    _ => {
                        error.get_or_insert(build::error(
                            "ERROR",
                            "08006",
                            "shard connection lost",
                        ));
                        break;
                    }
                }
            }
        }
        if let Some(err) = error {
            self.abort_copy(shards, "").await;
            return self.copy_end(err, extended).await;
        }
        let written: Vec<usize> = shards
            .iter()
            .filter(|s| s.rows > 0)
            .map(|s| s.shard)
            .collect();
        if let Err(err) = self.commit_copy(router, &mut shards).await {
            return self.copy_end(err, extended).await;
        }
        for s in shards {
            s.pool.checkin(s.server);
        }
        for shard in written {
            self.mark_written(shard);
        }
        let done = build::command_complete(&format!("COPY {total}"));
        self.copy_end(done, extended).await
    }

    /// Borrows shard `shard`'s primary, starts a transaction and the COPY on it.
    async fn start_shard_copy(
        &mut self,
        router: &Arc<ShardRouter>,
        shard: usize,
        sql: &str,
    ) -> Result<(ShardCopy, BytesMut), BytesMut> {
        let pool = self
            .shard_pool(router, shard, false)
            .ok_or_else(|| build::error("ERROR", "08006", "shard unavailable"))?;
        self.sx().writing = None;
        let mut server = self.copy_server(&pool).await?;
        if !matches!(server.exec("BEGIN").await, Ok(TxStatus::InBlock)) {
            return Err(build::error(
                "ERROR",
                "08006",
                "could not start a transaction on a shard",
            ));
        }
        match Self::start_copy(&mut server, sql).await {
            Ok(msg) => Ok((
                ShardCopy {
                    shard,
                    pool,
                    server,
                    out: BytesMut::new(),
                    rows: 0,
                    copying: true,
                },
                msg,
            )),
            Err(err) => {
                if matches!(server.exec("ROLLBACK").await, Ok(TxStatus::Idle)) {
                    pool.checkin(server);
                }
                Err(err)
            }
        }
    }

    /// Commits every shard's COPY: two-phase when it is on and rows went to several shards
    /// (the last shard with rows coordinates), one after the other otherwise.
    async fn commit_copy(
        &mut self,
        router: &Arc<ShardRouter>,
        shards: &mut Vec<ShardCopy>,
    ) -> Result<(), BytesMut> {
        let with_rows = shards.iter().filter(|s| s.rows > 0).count();
        let lost = |shard: usize| {
            build::error(
                "ERROR",
                "08006",
                &format!("shard {shard} was lost while committing the COPY"),
            )
        };
        if !router.two_phase_commit || with_rows < 2 {
            for s in shards.iter_mut() {
                match s.server.exec("COMMIT").await {
                    Ok(TxStatus::Idle) => {}
                    Ok(_) => return Err(lost(s.shard)),
                    Err(ExecError::Server(e)) => {
                        return Err(build::error("ERROR", &e.code, &e.message))
                    }
                    Err(_) => return Err(lost(s.shard)),
                }
            }
            return Ok(());
        }
        let Some(coord) = shards.iter().rposition(|s| s.rows > 0) else {
            return Ok(());
        };
        let coordinator = shards[coord].shard;
        let pool = shards[coord].pool.clone();
        if let Err(e) = self.ensure_decisions(coordinator, &pool).await {
            let all = std::mem::take(shards);
            self.abort_copy(all, "").await;
            return Err(build::error("ERROR", "58000", &e));
        }
        let base = twophase::new_base(coordinator);
        let mut prepared = Vec::new();
        for (i, s) in shards.iter_mut().enumerate() {
            if i == coord {
                continue;
            }
            let gid = format!("{base}_{}", s.shard);
            match s.server.exec(&format!("PREPARE TRANSACTION '{gid}'")).await {
                Ok(TxStatus::Idle) => prepared.push((i, gid)),
                other => {
                    let err = match other {
                        Err(ExecError::Server(e)) => build::error(
                            "ERROR",
                            &e.code,
                            &format!(
                                "shard {} could not prepare the COPY: {}",
                                s.shard, e.message
                            ),
                        ),
                        _ => lost(s.shard),
                    };
                    self.roll_back_prepared(shards, &prepared).await;
                    let all = std::mem::take(shards);
                    self.abort_copy(all, "").await;
                    return Err(err);
                }
            }
        }
        let decide = format!(
            "SET LOCAL synchronous_commit = on; \
             INSERT INTO weir.two_phase_decisions (gid, commit, at) \
             VALUES ('{base}', true, clock_timestamp()); COMMIT"
        );
        let decided =
            tokio::time::timeout(CLEANUP_TIMEOUT, shards[coord].server.exec(&decide)).await;
        let outcome = match decided {
            Ok(Ok(TxStatus::Idle)) => Some(Ok(())),
            Ok(Err(ExecError::Server(e))) => Some(Err(build::error("ERROR", &e.code, &e.message))),
            // Lost or stuck: the outcome is the coordinator's to know; recovery settles
            // the prepared shards from its decision row.
            _ => None,
        };
        let Some(outcome) = outcome else {
            shards.clear();
            return Err(build::error(
                "ERROR",
                "08006",
                &format!("shard {coordinator} was lost while committing; the outcome is settled by two-phase recovery from its decision row"),
            ));
        };
        let verb = if outcome.is_ok() {
            "COMMIT"
        } else {
            "ROLLBACK"
        };
        let mut unsettled = false;
        for (i, gid) in &prepared {
            let sql = format!("{verb} PREPARED '{gid}'");
            let ok = matches!(
                tokio::time::timeout(CLEANUP_TIMEOUT, shards[*i].server.exec(&sql)).await,
                Ok(Ok(TxStatus::Idle))
            );
            unsettled |= !ok;
        }
        if unsettled {
            tracing::warn!(%base, "{verb} PREPARED failed on a shard; two-phase recovery settles it");
        }
        if outcome.is_err() {
            let all = std::mem::take(shards);
            self.abort_copy(all, "").await;
        }
        outcome
    }

    async fn roll_back_prepared(&mut self, shards: &mut [ShardCopy], prepared: &[(usize, String)]) {
        for (i, gid) in prepared {
            let _ = shards[*i]
                .server
                .exec(&format!("ROLLBACK PREPARED '{gid}'"))
                .await;
        }
    }

    /// Ends every shard's COPY (CopyFail) and transaction; servers that answer go back.
    async fn abort_copy(&mut self, shards: Vec<ShardCopy>, why: &str) {
        for mut s in shards {
            let why = if why.is_empty() {
                "aborted by Weir"
            } else {
                why
            };
            let copying = s.copying;
            let ended = tokio::time::timeout(CLEANUP_TIMEOUT, async {
                if copying {
                    // The open COPY answers the CopyFail with an error and ReadyForQuery.
                    if s.server
                        .stream
                        .write_all(&build::copy_fail(why))
                        .await
                        .is_err()
                    {
                        return None;
                    }
                    let _ = s.server.drain_until_ready().await;
                }
                s.server.exec("ROLLBACK").await.ok()
            })
            .await;
            if matches!(ended, Ok(Some(TxStatus::Idle))) {
                s.server.buf.clear();
                s.pool.checkin(s.server);
            }
        }
    }

    /// Answers the client's COPY with an error and ReadyForQuery.
    async fn copy_answer(&mut self, mut err: BytesMut) -> Routed {
        if !self.send_prefix().await {
            return Routed::Closed;
        }
        err.extend_from_slice(&build::ready_for_query(TxStatus::Idle));
        match self.client.write_all(&err).await {
            Ok(()) => Routed::Done,
            Err(_) => Routed::Closed,
        }
    }

    /// The next whole message from the client during COPY. `Err(None)`: the client left;
    /// `Err(Some(error))`: a message over `limit`.
    async fn client_message(&mut self, limit: usize) -> Result<BytesMut, Option<BytesMut>> {
        loop {
            match wire::header(&self.cbuf) {
                Ok(Some(h)) if h.total > limit => {
                    return Err(Some(build::error(
                        "ERROR",
                        "08P01",
                        &format!(
                            "COPY message of {} bytes is larger than max_packet_size ({limit})",
                            h.total
                        ),
                    )));
                }
                Ok(Some(h)) if self.cbuf.len() >= h.total => {
                    return Ok(self.cbuf.split_to(h.total))
                }
                Ok(Some(h)) => self.cbuf.reserve(h.total - self.cbuf.len()),
                Ok(None) => {}
                Err(e) => {
                    return Err(Some(build::error(
                        "ERROR",
                        "08P01",
                        &format!("protocol error: {e}"),
                    )));
                }
            }
            // A client that stops sending holds a server of every shard: the idle
            // transaction limits apply (as they would to a COPY on one server).
            let limits = self.cluster.config.timeouts(&self.user);
            let limit = [limits.idle_transaction, limits.client_idle]
                .into_iter()
                .filter(|d| !d.is_zero())
                .min();
            let read = self.client.read_buf(&mut self.cbuf);
            let n = match limit {
                None => read.await,
                Some(d) => match tokio::time::timeout(d, read).await {
                    Ok(n) => n,
                    Err(_) => {
                        self.fail("08P01", "idle transaction timeout").await;
                        return Err(None);
                    }
                },
            };
            match n {
                Ok(0) | Err(_) => return Err(None),
                Ok(_) => {}
            }
        }
    }

    /// `COPY t TO STDOUT` from every shard in turn, joined into one stream.
    async fn copy_out(
        &mut self,
        router: &Arc<ShardRouter>,
        stmt: &CopyStatement,
        sql: &str,
        len: usize,
    ) -> Routed {
        self.cbuf.advance(len);
        let limit = self.packet_limit();
        let mut merger = OutMerger::new(&stmt.options, router.shards, limit);
        let mut total = 0;
        let mut started = false;
        let mut out = Vec::new();
        let mut pending = BytesMut::new();
        for shard in 0..router.shards {
            let Some(pool) = self.shard_pool(router, shard, true) else {
                return self
                    .copy_answer(build::error("ERROR", "08006", "shard unavailable"))
                    .await;
            };
            let mut server = match self.copy_server(&pool).await {
                Ok(s) => s,
                Err(err) => return self.copy_answer(err).await,
            };
            match Self::start_copy(&mut server, sql).await {
                Ok(msg) => {
                    if !started {
                        started = true;
                        if !self.send_prefix().await || self.client.write_all(&msg).await.is_err() {
                            return Routed::Closed;
                        }
                    }
                }
                Err(err) => {
                    pool.checkin(server);
                    return self.copy_answer(err).await;
                }
            }
            loop {
                // Rows go to the client in batches: when enough gathered, or before waiting
                // for more from the shard.
                let whole =
                    matches!(wire::header(&server.buf), Ok(Some(h)) if server.buf.len() >= h.total);
                if !pending.is_empty() && (pending.len() >= FLUSH_AT || !whole) {
                    if self.client.write_all(&pending).await.is_err() {
                        return Routed::Closed;
                    }
                    pending.clear();
                }
                let msg = match crate::net::read_message(&mut server.stream, &mut server.buf).await
                {
                    Ok(Some(m)) => m,
                    _ => {
                        return self
                            .copy_answer(build::error("ERROR", "08006", "shard connection lost"))
                            .await
                    }
                };
                out.clear();
                match msg[0] {
                    b'd' => {
                        if let Err(e) = merger.push(shard, wire::body(&msg), &mut out) {
                            return self
                                .copy_answer(build::error("ERROR", e.sqlstate(), e.message()))
                                .await;
                        }
                    }
                    b'c' => {
                        if let Err(e) = merger.finish_shard(shard, &mut out) {
                            return self
                                .copy_answer(build::error("ERROR", e.sqlstate(), e.message()))
                                .await;
                        }
                    }
                    b'C' => total += copy_count(&msg),
                    tag::ERROR_RESPONSE => {
                        let _ = server.drain_until_ready().await;
                        server.buf.clear();
                        pool.checkin(server);
                        pending.extend_from_slice(&msg);
                        return self.copy_answer(pending).await;
                    }
                    tag::READY_FOR_QUERY => {
                        server.buf.clear();
                        pool.checkin(server);
                        break;
                    }
                    _ => {}
                }
                if !out.is_empty() {
                    pending.extend_from_slice(&build::copy_data(&out));
                }
            }
        }
        if !pending.is_empty() && self.client.write_all(&pending).await.is_err() {
            return Routed::Closed;
        }
        out.clear();
        if let Err(e) = merger.finish(&mut out) {
            return self
                .copy_answer(build::error("ERROR", e.sqlstate(), e.message()))
                .await;
        }
        let mut end = BytesMut::new();
        if !out.is_empty() {
            end.extend_from_slice(&build::copy_data(&out));
        }
        end.extend_from_slice(&build::copy_done());
        end.extend_from_slice(&build::command_complete(&format!("COPY {total}")));
        end.extend_from_slice(&build::ready_for_query(TxStatus::Idle));
        match self.client.write_all(&end).await {
            Ok(()) => Routed::Done,
            Err(_) => Routed::Closed,
        }
    }

    /// A keyless (or many-shard) UPDATE/DELETE of a sharded table with two-phase commit on:
    /// runs on every shard, each in its own transaction, committed together. RETURNING rows
    /// are joined (held until every shard answered, up to `max_packet_size` bytes).
    pub(super) async fn fan_out_write(
        &mut self,
        router: &Arc<ShardRouter>,
        sql: &str,
        len: usize,
    ) -> Routed {
        self.cbuf.advance(len);
        let limit = self.cluster.config.general.max_packet_size;
        let mut shards: Vec<ShardCopy> = Vec::with_capacity(router.shards);
        let mut desc: Option<BytesMut> = None;
        let mut rows = BytesMut::new();
        let mut total = 0u64;
        let mut verb = String::new();
        let mut failure = None;
        for shard in 0..router.shards {
            let Some(pool) = self.shard_pool(router, shard, false) else {
                failure = Some(build::error("ERROR", "08006", "shard unavailable"));
                break;
            };
            let mut server = match self.copy_server(&pool).await {
                Ok(s) => s,
                Err(err) => {
                    failure = Some(err);
                    break;
                }
            };
            if !matches!(server.exec("BEGIN").await, Ok(TxStatus::InBlock)) {
                failure = Some(build::error(
                    "ERROR",
                    "08006",
                    "could not start a transaction on a shard",
                ));
                break;
            }
            let lost = || build::error("ERROR", "08006", "shard connection lost");
            if server.stream.write_all(&build::query(sql)).await.is_err() {
                failure = Some(lost());
                break;
            }
            let mut count = 0;
            let mut error = None;
            let mut gone = false;
            loop {
                match crate::net::read_message(&mut server.stream, &mut server.buf).await {
                    Ok(Some(m)) => match m[0] {
                        b'T' => {
                            desc.get_or_insert(m);
                        }
                        b'D' => {
                            if rows.len() + m.len() > limit {
                                error.get_or_insert(build::error(
                                    "ERROR",
                                    "54000",
                                    "RETURNING rows of a write on every shard exceed max_packet_size",
                                ));
                            } else {
                                rows.extend_from_slice(&m);
                            }
                        }
                        b'C' => {
                            let tag = String::from_utf8_lossy(wire::body(&m))
                                .trim_end_matches('\0')
                                .to_string();
                            // `UPDATE n` / `DELETE n` add up; other tags (`TRUNCATE TABLE`,
                            // `ALTER TABLE`) are passed on as they are.
                            match tag.rsplit_once(' ').map(|(v, n)| (v, n.parse::<u64>())) {
                                Some((v, Ok(n))) => {
                                    verb = v.to_string();
                                    count = n;
                                }
                                _ => verb = tag,
                            }
                        }
                        tag::ERROR_RESPONSE => {
                            error.get_or_insert(m);
                        }
                        tag::READY_FOR_QUERY => break,
                        _ => {}
                    },
                    _ => {
                        gone = true;
                        break;
                    }
                }
            }
            server.buf.clear();
            if gone {
                failure = Some(lost());
                break;
            }
            total += count;
            shards.push(ShardCopy {
                shard,
                pool,
                server,
                out: BytesMut::new(),
                rows: count.max(1),
                copying: false,
            });
            if let Some(err) = error {
                failure = Some(err);
                break;
            }
        }
        if let Some(err) = failure {
            self.abort_copy(shards, "").await;
            return self.copy_answer(err).await;
        }
        let touched: Vec<usize> = shards.iter().map(|s| s.shard).collect();
        if let Err(err) = self.commit_copy(router, &mut shards).await {
            return self.copy_answer(err).await;
        }
        for s in shards {
            s.pool.checkin(s.server);
        }
        for shard in touched {
            self.mark_written(shard);
        }
        // DDL through here changes columns: the catalog is read again.
        self.note_write();
        let mut out = BytesMut::new();
        if let Some(d) = desc {
            out.extend_from_slice(&d);
        }
        out.extend_from_slice(&rows);
        let tag = if matches!(verb.as_str(), "UPDATE" | "DELETE") {
            format!("{verb} {total}")
        } else {
            verb
        };
        out.extend_from_slice(&build::command_complete(&tag));
        self.copy_end(out, false).await
    }

    /// After a COPY that failed early: the client's further CopyData/CopyDone/CopyFail of
    /// it are dropped (as PostgreSQL drops them), up to the first other message.
    pub(super) fn drop_copy_messages(&mut self) {
        if !self.sx().drop_copy {
            return;
        }
        while let Ok(Some(h)) = wire::header(&self.cbuf) {
            if !matches!(h.tag, b'd' | b'c' | b'f') {
                self.sx().drop_copy = false;
                return;
            }
            if self.cbuf.len() < h.total {
                return;
            }
            let end = h.tag != b'd';
            self.cbuf.advance(h.total);
            if end {
                self.sx().drop_copy = false;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_copy_counts() {
        assert_eq!(copy_count(&build::command_complete("COPY 42")), 42);
        assert_eq!(copy_count(&build::command_complete("INSERT 0 1")), 0);
    }
}
