//! The end of a transaction: pass the last bytes on, bring the server back to a clean
//! idle state (session state the client left, what Weir could not read asked of the server
//! itself) or close it, and give it back to the pool.

use super::*;

impl Session {
    /// The transaction ended: pass the last bytes on and return the server.
    pub(super) async fn finish(&mut self, mut server: ServerConn, x: &mut Xact) -> After {
        // Read-your-writes marks the write before the client learns it committed (in
        // `global` mode another connection of the application may read at once).
        self.note_write();
        if self.multi.as_ref().is_some_and(|m| m.pending.is_some()) {
            // The answers still to send stay aside while the second phase uses the server
            // (the relay may have passed the COMMIT's tag or error on already).
            let answers = server
                .buf
                .split_to(x.relay.down.ready.min(server.buf.len()));
            let rest = server.buf.split();
            self.second_phase(&mut server, &answers).await;
            server.buf.clear();
            server.buf.extend_from_slice(&answers);
            server.buf.extend_from_slice(&rest);
        }
        let down = &mut x.relay.down;
        let result = self.client.write_all(&server.buf[..down.ready]).await;
        down.sent += down.ready as u64;
        server.buf.advance(down.ready);
        server.buf.clear();
        if self.settle(&mut server, &x.relay.seen).await {
            self.release(server, false).await;
        }
        match result {
            Ok(()) => After::Continue,
            Err(_) => After::Stop,
        }
    }

    /// The client sent Terminate while it holds `server`. What it sent before goes to the
    /// server first (a pipelined `COMMIT` + Terminate still commits, as on PostgreSQL, which
    /// reads the COMMIT before the end of the stream); then the server is returned if nothing
    /// is in flight, closed otherwise — never left waiting for a client that is gone.
    pub(super) async fn terminated(&mut self, mut server: ServerConn, x: &mut Xact) {
        if x.relay.up.ready > 0 {
            let sent = tokio::time::timeout(
                CLEANUP_TIMEOUT,
                server.stream.write_all(&self.cbuf[..x.relay.up.ready]),
            )
            .await;
            if !matches!(sent, Ok(Ok(()))) {
                return;
            }
            x.relay.up.sent += x.relay.up.ready as u64;
            self.cbuf.advance(x.relay.up.ready);
            x.relay.up.ready = 0;
        }
        self.abandon(server, x).await;
    }

    /// The client is leaving (or broke the protocol) while it holds `server`:
    /// keep the server only if it can be brought back to a clean idle state.
    pub(super) async fn abandon(&mut self, mut server: ServerConn, x: &Xact) {
        let progress = &x.relay.progress;
        if !x.relay.at_rest() {
            tracing::debug!(?server, "client left mid-query; closing server connection");
            return;
        }
        server.buf.clear();
        if progress.tx.in_block() {
            match tokio::time::timeout(CLEANUP_TIMEOUT, server.exec("ROLLBACK")).await {
                Ok(Ok(TxStatus::Idle)) => {}
                _ => return,
            }
        }
        if self.settle(&mut server, &x.relay.seen).await {
            self.release(server, true).await;
        }
    }

    /// After a transaction in transaction/statement mode: remember the
    /// session parameters the client set, and clean state the next client
    /// must not inherit. Returns false if the server must be closed instead.
    pub(super) async fn settle(&mut self, server: &mut ServerConn, seen: &Seen) -> bool {
        if seen.is_empty() || self.mode() == PoolMode::Session {
            return true;
        }
        let inspected;
        let seen = if seen.unobserved {
            match tokio::time::timeout(CLEANUP_TIMEOUT, inspect(server, seen)).await {
                Ok(Some(s)) => {
                    self.app.statements.bump_epoch();
                    inspected = s;
                    &inspected
                }
                _ => return false,
            }
        } else {
            seen
        };
        let names = self.changed_params(server, seen);
        if !names.is_empty() {
            let sql = format!(
                "SELECT {}",
                names
                    .iter()
                    .map(|n| format!("pg_catalog.current_setting({}, true)", quote_literal(n)))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            match tokio::time::timeout(CLEANUP_TIMEOUT, server.query_row(&sql)).await {
                Ok(Ok(values)) => {
                    for (name, value) in names.iter().zip(values) {
                        match value {
                            Some(v) => {
                                self.wanted.set(name, &v);
                                server.params.set(name, &v);
                            }
                            None => {
                                self.wanted.remove(name);
                                server.params.remove(name);
                            }
                        }
                    }
                }
                _ => return false,
            }
        }
        if seen.dirty.any() {
            let sql = seen.dirty.cleanup_sql();
            match tokio::time::timeout(CLEANUP_TIMEOUT, server.exec(&sql)).await {
                Ok(Ok(TxStatus::Idle)) => {}
                _ => return false,
            }
            if seen.dirty.prepared {
                server.prepared.clear();
            }
        }
        true
    }

    /// Parameters whose session value may have changed and that PostgreSQL
    /// does not report by itself.
    pub(super) fn changed_params(&self, server: &ServerConn, seen: &Seen) -> Vec<String> {
        let mut names: Vec<String> = seen
            .params
            .iter()
            .filter(|n| !is_tracked(n))
            .cloned()
            .collect();
        if seen.reset_all {
            for (name, _) in self.wanted.iter().chain(server.params.iter()) {
                let lower = name.to_ascii_lowercase();
                if !is_tracked(&lower)
                    && server.params.is_unreported(&lower)
                    && !names.contains(&lower)
                {
                    names.push(lower);
                }
            }
            for (name, _) in self.wanted.iter() {
                let lower = name.to_ascii_lowercase();
                if !is_tracked(&lower)
                    && !names.contains(&lower)
                    && server.params.get(&lower).is_none()
                {
                    names.push(lower);
                }
            }
        }
        names
    }

    /// Returns an idle server, running the reset query where PgBouncer would.
    pub(super) async fn release(&mut self, mut server: ServerConn, session_end: bool) {
        let general = &self.cluster.config.general;
        let wants_reset = !general.server_reset_query.is_empty()
            && ((self.mode() == PoolMode::Session && session_end)
                || general.server_reset_query_always);
        if wants_reset {
            let reset = general.server_reset_query.clone();
            match tokio::time::timeout(CLEANUP_TIMEOUT, server.exec(&reset)).await {
                Ok(Ok(TxStatus::Idle)) => {}
                _ => return,
            }
        }
        self.pool.checkin(server);
    }
}

/// What a transaction whose SQL Weir could not read left on `server`, asked of the server
/// itself: every parameter set at session level (`pg_settings.source = 'session'`), SQL
/// prepared statements, LISTEN channels, session advisory locks, holdable cursors and
/// temporary tables, and whether Weir's own prepared statements are still all there. The
/// result adds to `seen` so the usual clean-up follows. `None`: the server failed.
pub(super) async fn inspect(server: &mut ServerConn, seen: &Seen) -> Option<Seen> {
    const SQL: &str = "SELECT \
        (SELECT count(*) FROM pg_catalog.pg_prepared_statements WHERE from_sql), \
        (SELECT count(*) FROM pg_catalog.pg_prepared_statements WHERE NOT from_sql), \
        (SELECT count(*) FROM pg_catalog.pg_listening_channels()), \
        (SELECT count(*) FROM pg_catalog.pg_locks \
            WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid()), \
        (SELECT count(*) FROM pg_catalog.pg_cursors WHERE is_holdable), \
        (SELECT count(*) FROM pg_catalog.pg_class \
            WHERE relnamespace = pg_catalog.pg_my_temp_schema()), \
        (SELECT pg_catalog.json_agg(name) FROM pg_catalog.pg_settings WHERE source = 'session')";
    let row = server.query_row(SQL).await.ok()?;
    let count = |i: usize| -> u64 {
        row.get(i)
            .and_then(|v| v.as_deref())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let mut out = seen.clone();
    out.unobserved = false;
    out.reset_all = true;
    out.dirty.prepared |= count(0) > 0;
    if count(1) != server.prepared.len() as u64 {
        // Some of Weir's statements were deallocated by SQL: forget them all.
        out.dirty.prepared = true;
    }
    out.dirty.listen |= count(2) > 0;
    out.dirty.advisory |= count(3) > 0;
    out.dirty.hold_cursor |= count(4) > 0;
    out.dirty.temp |= count(5) > 0;
    let names: Vec<String> = row
        .get(6)
        .and_then(|v| v.as_deref())
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default();
    for name in names {
        let name = name.to_ascii_lowercase();
        if !out.params.contains(&name) {
            out.params.push(name);
        }
    }
    Some(out)
}
