//! One client connection from login to goodbye: authenticate, then for each
//! transaction borrow a server from the pool, relay, and give it back clean.

mod cleanup;
mod copy;
mod login;
mod multi;
mod replication;
mod shard;

use self::login::Login;
use super::cancel::{self, BackendKey, CancelEntry, FrontendKey};
use super::fanout;
use super::relay::{self, Event, Relay, Statements};
use super::routing::{self, HeldBegin, ShardSession};
use super::sqlscan::{self, Seen};
use super::startup::{self, Start};
use crate::auth::{self, AuthError};
use crate::backend::conn::ExecError;
use crate::backend::params::ParamSet;
use crate::backend::params::{is_tracked, quote_literal};
use crate::backend::prepared::ClientStatements;
use crate::backend::{CheckoutError, Pool, ServerConn};
use crate::cluster::Cluster;
use crate::config::AuthType;
use crate::config::{Database, PoolMode};
use crate::metrics::QueryClock;
use crate::net::Stream;
use crate::router::route::{comment_hint, Decision, Pin, ShardRouter};
use crate::router::sql::Kind;
use crate::stats::{now_us, ClientInfo, ClientState, PoolTotals, ServerState as SrvState};
use crate::wire::{self, build, tag, TxStatus};
use crate::{App, Shutdown};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bound on Weir's own clean-up queries (ROLLBACK, reset) on a server.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) async fn run(
    app: Arc<App>,
    stream: Stream,
    peer: String,
    abort: Arc<std::sync::OnceLock<tokio::task::AbortHandle>>,
    late: bool,
) {
    // As PgBouncer, a client's id is taken when it connects (one sequence with servers').
    let id = app.next_client_id();
    // Each phase is a boxed future that exists only while it runs: the task of a logged-in
    // client holds no room for the login's state.
    let Some((cluster, stream, buf, login)) = Box::pin(log_in(&app, stream, &peer, late)).await
    else {
        return;
    };
    let parts = match login {
        Login::Client(parts) => *parts,
        Login::Admin { user, role } => {
            Box::pin(crate::admin::serve(app, stream, buf, user, role, &peer, id)).await;
            return;
        }
        Login::Replication(r) => {
            Box::pin(replication::serve(app, stream, buf, *r)).await;
            return;
        }
    };
    let mut session = Session::new(app, cluster, stream, buf, peer, id, parts, &abort);
    if let Some(reason) = Box::pin(session.serve()).await {
        if session.cluster.config.general.log_disconnections {
            crate::logging::closing(&session.who(), reason, session.age_secs());
        }
    }
}

/// The login phase under `client_login_timeout`; hands the socket and its buffer on.
async fn log_in(
    app: &Arc<App>,
    mut stream: Stream,
    peer: &str,
    late: bool,
) -> Option<(Arc<Cluster>, Stream, BytesMut, Login)> {
    let mut buf = BytesMut::with_capacity(8192);
    let cluster = app.cluster();
    let limit = cluster.config.general.client_login_timeout;
    let attempt = login::login(app, &cluster, &mut stream, &mut buf, peer, late);
    let login = if limit.is_zero() {
        attempt.await
    } else {
        match tokio::time::timeout(limit, attempt).await {
            Ok(s) => s,
            Err(_) => {
                if cluster.config.general.log_disconnections {
                    let who = crate::logging::Who::client(0, "", "", peer);
                    let reason = "client_login_timeout (server down or wrong password?)";
                    crate::logging::closing(&who, reason, limit.as_secs());
                }
                fatal(
                    &mut stream,
                    "08P01",
                    "client_login_timeout (server down or wrong password?)",
                )
                .await;
                None
            }
        }
    }?;
    Some((cluster, stream, buf, login))
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    fn new(
        app: Arc<App>,
        cluster: Arc<Cluster>,
        stream: Stream,
        buf: BytesMut,
        peer: String,
        id: u64,
        parts: login::LoggedIn,
        abort: &std::sync::OnceLock<tokio::task::AbortHandle>,
    ) -> Session {
        let info = Arc::new(ClientInfo::new(
            id,
            &parts.user,
            &parts.db.name,
            &peer,
            parts.wanted.get("application_name").unwrap_or_default(),
            parts.key.pid,
        ));
        *info.abort.lock() = abort.get().cloned();
        app.client_list.insert(info.id, info.clone());
        let registered = Registered {
            app: app.clone(),
            id: info.id,
            key: parts.key,
        };
        let router = cluster.router_started(&parts.db, &parts.user);
        let gate = router.as_ref().map(|_| app.reshard.gate(&parts.db.name));
        Session {
            _registered: registered,
            shutdown: app.shutdown.subscribe(),
            first_server: parts.first_server,
            info,
            app,
            cluster,
            client: stream,
            cbuf: buf,
            peer,
            user: parts.user,
            db: parts.db,
            pool: parts.pool,
            generation: parts.generation,
            wanted: parts.wanted,
            key: parts.key,
            cancel: parts.cancel,
            stmts: ClientStatements::default(),
            router,
            shard: ShardSession::default(),
            multi: None,
            gate,
        }
    }
}

impl Session {
    /// Ends the session with an error: the client gets it, the log PgBouncer's closing line.
    async fn fail(&mut self, code: &str, message: &str) {
        if self.cluster.config.general.log_disconnections {
            crate::logging::closing(&self.who(), message, self.age_secs());
        }
        fatal(&mut self.client, code, message).await;
    }

    /// This client in PgBouncer's log prefix.
    fn who(&self) -> crate::logging::Who {
        crate::logging::Who::client(self.info.id, &self.db.name, &self.user, &self.peer)
    }

    fn age_secs(&self) -> u64 {
        now_us().saturating_sub(self.info.connect_time) / 1_000_000
    }
}

/// Sends a FATAL error; the caller then closes the connection.
pub(super) async fn fatal(stream: &mut Stream, code: &str, message: &str) {
    let _ = stream
        .write_all(&build::error("FATAL", code, message))
        .await;
    let _ = stream.flush().await;
}

/// Removes a session's traces however its task ends (including KILL).
struct Registered {
    app: Arc<App>,
    id: u64,
    key: FrontendKey,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.app.unlist_client(self.id);
        self.app.cancels.unregister(self.key);
    }
}

fn checkout_error(e: &CheckoutError) -> (String, String) {
    use crate::backend::conn::ConnectError;
    use crate::backend::login::LoginError;
    match e {
        CheckoutError::WaitTimeout => ("08P01".into(), "query_wait_timeout".into()),
        CheckoutError::Connect(ConnectError::Login(LoginError::Server(f))) => {
            (f.code.clone(), f.message.clone())
        }
        CheckoutError::Connect(other) => ("08P01".into(), format!("server login failed: {other}")),
        CheckoutError::LoginFailing(_)
        | CheckoutError::QueryTimeout
        | CheckoutError::ShuttingDown => ("08P01".into(), e.to_string()),
    }
}

/// One lent server's transaction: the relay state, the query clock, and the pool whose
/// totals get its counters however the transaction ends.
pub(super) struct Xact {
    pool: Arc<Pool>,
    relay: Relay,
    clock: QueryClock,
}

impl Xact {
    fn new(pool: Arc<Pool>, budget: usize) -> Xact {
        Xact {
            pool,
            relay: Relay::new(budget),
            clock: QueryClock::default(),
        }
    }

    /// Scans newly arrived client bytes, starts the query clock when something went in
    /// flight, and puts Weir's own answers into the server's stream.
    fn scan_client(
        &mut self,
        cbuf: &mut BytesMut,
        stmts: &mut ClientStatements,
        registry: &crate::backend::prepared::Registry,
        server: &mut ServerConn,
        capacity: usize,
    ) -> Result<(), wire::WireError> {
        let scanned = self.relay.scan_client(
            cbuf,
            Statements {
                client: stmts,
                registry,
                server: &mut server.prepared,
                capacity,
            },
        );
        self.clock.sent(self.relay.progress.inflight);
        scanned?;
        self.relay.insert_fakes(&mut server.buf);
        Ok(())
    }

    /// Scans newly arrived server bytes; `Ok(true)` when nothing is in flight any more.
    fn scan_server(
        &mut self,
        server: &mut ServerConn,
        stmts: &mut ClientStatements,
        wanted: &mut ParamSet,
    ) -> Result<bool, wire::WireError> {
        let idle = self.relay.scan_server(
            &mut server.buf,
            &mut server.params,
            &mut server.prepared,
            wanted,
            stmts,
        )?;
        self.clock
            .answered(self.relay.progress.inflight, &self.pool.metrics);
        Ok(idle)
    }
}

impl Drop for Xact {
    fn drop(&mut self) {
        let t = &self.pool.totals;
        PoolTotals::add(&t.query_count, self.relay.progress.queries);
        PoolTotals::add(&t.bytes_received, self.relay.up.sent);
        PoolTotals::add(&t.bytes_sent, self.relay.down.sent);
    }
}

/// Counts a client holding a server in `App::active`, however the
/// transaction ends (the admin console's KILL aborts the session task).
struct Active(Arc<App>);

impl Active {
    fn new(app: &Arc<App>) -> Active {
        app.active.fetch_add(1, Ordering::AcqRel);
        Active(app.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Session {
    /// Unregisters the client however the task ends.
    _registered: Registered,
    shutdown: tokio::sync::watch::Receiver<Shutdown>,
    /// Session mode: the server the login opened, used for the first checkout.
    first_server: Option<Box<ServerConn>>,
    info: Arc<ClientInfo>,
    app: Arc<App>,
    /// The cluster this session's pool belongs to (refreshed after a reload).
    cluster: Arc<Cluster>,
    client: Stream,
    cbuf: BytesMut,
    peer: String,
    user: String,
    db: Arc<Database>,
    pool: Arc<Pool>,
    generation: u64,
    wanted: ParamSet,
    key: FrontendKey,
    cancel: Arc<CancelEntry>,
    /// This client's protocol-level prepared statements.
    stmts: ClientStatements,
    /// Set for a sharded database.
    router: Option<Arc<ShardRouter>>,
    shard: ShardSession,
    /// Sharded sessions only, made on first use (see `multi::Multi`).
    multi: Option<Box<multi::Multi>>,
    /// Sharded: the database's transaction gate (see `reshard::Registry::gate`).
    gate: Option<Arc<tokio::sync::RwLock<()>>>,
}

/// Where the next transaction goes (sharded databases): a pool and the
/// length of the unit of client bytes routed.
enum Routed {
    Pool(Arc<Pool>, usize),
    /// Answered without a server.
    Done,
    Closed,
}

/// What to do with the next unit inside a transaction on a shard.
enum InTx {
    /// Forward this many bytes to the same server.
    Go(usize),
    /// The unit (this many bytes) belongs to another shard: move the transaction there
    /// (two-phase commit).
    Switch(usize, usize),
    /// COMMIT (true) or ROLLBACK of a transaction over several shards, this many bytes.
    EndMulti(bool, usize),
    /// The transaction has run only its BEGIN: start it again on this shard, for the
    /// unit of this many bytes.
    Move(usize, usize),
    /// Answered by Weir; look at the next unit.
    Answered,
    /// Not for this shard: the server must fail it (so the transaction aborts).
    Refuse(usize, String),
    Closed,
}

/// The limits that end a transaction from outside.
#[derive(Debug, Clone, Copy)]
enum Limit {
    IdleTransaction,
    Query,
    Transaction,
}

enum Work {
    Message,
    /// The client left, with the reason to log (`None`: logged already).
    Closed(Option<&'static str>),
}

enum After {
    Continue,
    Stop,
}

impl Session {
    /// Serves transactions until the client leaves; returns the reason to log when it was
    /// not logged already.
    async fn serve(&mut self) -> Option<&'static str> {
        loop {
            match self.wait_for_work().await {
                Work::Message => {}
                Work::Closed(reason) => return reason,
            }
            // Sharded: the transaction holds the database's gate from before it is routed
            // until its server is back, so a reshard's cutover waits for it and it does not
            // start during one (it then runs on the new shards: refresh comes after).
            let _gate = match &self.gate {
                Some(g) => Some(g.clone().read_owned().await),
                None => None,
            };
            self.refresh();
            // Boxed: the task of an idle client keeps only what waiting for its next
            // message needs, not room for a transaction's state.
            if let After::Stop = Box::pin(self.next_transaction()).await {
                return None;
            }
        }
    }

    /// `DEALLOCATE name` of a protocol-level statement, sent between transactions (as
    /// DBD::Pg does when a statement handle goes): the name is this client's alias of a
    /// Weir-wide statement that servers share, so Weir forgets the alias and answers, as it
    /// answers a Close, instead of sending it to a server that may not hold that name.
    async fn deallocate_between_transactions(&mut self) -> Option<After> {
        let h = wire::header(&self.cbuf).ok().flatten()?;
        if h.tag != tag::QUERY || self.cbuf.len() < h.total || self.shard.held.is_some() {
            return None;
        }
        let body = wire::body(&self.cbuf[..h.total]);
        let start = body.iter().position(|b| !b.is_ascii_whitespace())?;
        if !body[start..].get(..10)?.eq_ignore_ascii_case(b"deallocate") {
            return None;
        }
        let (sql, _) = wire::cstr(body, 0)?;
        let name = sqlscan::sole_deallocate(sql)?;
        if !self.stmts.remove(&name) {
            return None;
        }
        let _ = self.cbuf.split_to(h.total);
        let mut out = build::command_complete("DEALLOCATE");
        out.extend_from_slice(&build::ready_for_query(TxStatus::Idle));
        if self.client.write_all(&out).await.is_err() {
            return Some(After::Stop);
        }
        Some(After::Continue)
    }

    /// Routes (sharded), borrows a server, relays one transaction and gives the server back.
    async fn next_transaction(&mut self) -> After {
        if let Some(after) = self.deallocate_between_transactions().await {
            return after;
        }
        {
            let mut budget = usize::MAX;
            if self.router.is_some() {
                match Box::pin(self.route()).await {
                    Routed::Pool(p, len) => {
                        self.pool = p;
                        budget = len;
                    }
                    Routed::Done => return After::Continue,
                    Routed::Closed => return After::Stop,
                }
            }
            self.info.set_state(ClientState::Waiting);
            self.info.wait_since.store(now_us(), Ordering::Relaxed);
            let mut checked = self.checkout().await;
            if checked.is_err() {
                if let (Some(router), Some(shard), Some(r)) = (
                    &self.router,
                    self.pool.settings.shard,
                    self.pool.settings.replica,
                ) {
                    // A replica that cannot be reached: ban it, read from the primary.
                    router.ban(shard, r, self.cluster.config.general.ban_time);
                    if let Some(p) = self.cluster.shard_pool(&self.db, &self.user, shard, None) {
                        self.pool = p;
                        checked = self.checkout().await;
                    }
                }
            }
            let mut server = match checked {
                Ok(Some(s)) => s,
                Ok(None) => return After::Stop,
                Err(e) => {
                    let (code, msg) = checkout_error(&e);
                    if self.cluster.config.general.log_pooler_errors {
                        tracing::warn!(peer = %self.peer, user = %self.user, db = %self.db.name, error = %msg, "pooler error");
                    }
                    self.fail(&code, &msg).await;
                    return After::Stop;
                }
            };
            let active = Active::new(&self.app);
            self.info.set_state(ClientState::Active);
            self.info.wait_since.store(0, Ordering::Relaxed);
            let now = now_us();
            self.info.request_time.store(now, Ordering::Relaxed);
            self.info
                .server_pid
                .store(server.backend_pid, Ordering::Relaxed);
            if let Some(si) = &server.info {
                si.set_state(SrvState::Active);
                si.client_pid.store(self.key.pid, Ordering::Relaxed);
                si.request_time.store(now, Ordering::Relaxed);
            }
            if let Some(m) = self.multi.as_deref_mut() {
                m.begin_sql = m.begin_unheld.take();
                m.begin_only = m.begin_sql.is_some();
                m.savepoint = false;
                m.read_only_tx = false;
            }
            if let Some(held) = self.shard.held.take() {
                // The BEGIN Weir answered goes to the shard the statement chose.
                self.sx().begin_sql = Some(held.sql.clone());
                self.sx().read_only_tx = held.read_only;
                if !matches!(server.exec(&held.sql).await, Ok(TxStatus::InBlock)) {
                    self.fail("08P01", "could not start the transaction on the shard")
                        .await;
                    return After::Stop;
                }
            }
            let pool = self.pool.clone();
            let after = self.transaction(server, budget).await;
            self.note_write();
            if let Some(m) = self.multi.as_deref_mut().filter(|m| m.active()) {
                // Left by an error: closing the connections rolls their transactions back;
                // prepared ones are settled by two-phase recovery.
                m.parked.clear();
                m.pending = None;
            }
            self.cancel.detach();
            self.info.set_state(ClientState::Idle);
            self.info.server_pid.store(0, Ordering::Relaxed);
            if pool.settings.mode != PoolMode::Session {
                // (Session mode counted each of its transactions as it ended.)
                count_xact(&pool, now_us().saturating_sub(now));
            }
            drop(active);
            after
        }
    }

    /// Waits until the client has started a message (or leaves).
    async fn wait_for_work(&mut self) -> Work {
        if self.cbuf.is_empty() && !self.client.is_tls() {
            // An idle client holds no read buffer (see `read_client`).
            self.cbuf = BytesMut::new();
        }
        let idle_limit = self.cluster.config.timeouts(&self.user).client_idle;
        loop {
            match wire::header(&self.cbuf) {
                Ok(Some(h)) if h.tag == tag::TERMINATE => {
                    return Work::Closed(Some("client close request"))
                }
                Ok(Some(_)) => {
                    if *self.shutdown.borrow() == Shutdown::Graceful {
                        // As PgBouncer's SHUTDOWN WAIT_FOR_SERVERS: a client that needs a
                        // server for a new transaction is closed.
                        self.fail("08P01", "server shutting down").await;
                        return Work::Closed(None);
                    }
                    return Work::Message;
                }
                Ok(None) => {}
                Err(e) => {
                    self.fail("08P01", &format!("protocol error: {e}")).await;
                    return Work::Closed(None);
                }
            }
            if *self.shutdown.borrow_and_update() == Shutdown::Immediate {
                self.fail("57P01", "Weir is shutting down").await;
                return Work::Closed(None);
            }
            // A timer only when client_idle_timeout is set (boxed: most clients have none).
            let idle = async {
                if idle_limit.is_zero() {
                    std::future::pending::<()>().await
                } else {
                    Box::pin(tokio::time::sleep(idle_limit)).await
                }
            };
            tokio::select! {
                n = read_client(&mut self.client, &mut self.cbuf) => match n {
                    Ok(0) | Err(_) => return Work::Closed(Some("client unexpected eof")),
                    Ok(_) => {}
                },
                _ = self.shutdown.changed() => {}
                _ = idle => {
                    self.fail("08P01", "client_idle_timeout").await;
                    return Work::Closed(None);
                }
            }
        }
    }

    /// Looks the pool up again after a reload, then borrows a server,
    /// noticing if the client leaves while it waits.
    /// After a reload: look the database, pool and router up again.
    fn refresh(&mut self) {
        if self.generation != self.app.generation() {
            self.generation = self.app.generation();
            // The login's server belongs to the pool a reload may have replaced.
            self.first_server = None;
            self.cluster = self.app.cluster();
            if let Some(db) = self.cluster.config.database(&self.db.name) {
                self.db = db;
                self.pool = self.cluster.pool(&self.db, &self.user);
                self.router = self.cluster.router_started(&self.db, &self.user);
                self.shard.pools.clear();
                if let Some(r) = &self.router {
                    let written = self.multi.as_deref_mut().map(|m| &mut m.written);
                    if let Some(written) = written {
                        if written.len() != r.shards && written.iter().any(|n| n.seq != 0) {
                            // A reshard moved the rows: what this client wrote may now be
                            // on any shard; each waits for a sample of the new primaries.
                            *written = (0..r.shards).map(|s| r.wal.mark(s)).collect();
                        } else {
                            // Sample numbers are the old router's: wait for the new one's next.
                            for (shard, need) in written.iter_mut().enumerate() {
                                if need.seq != 0 && need.lsn == 0 {
                                    *need = r.wal.mark(shard);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    async fn checkout(&mut self) -> Result<Option<ServerConn>, CheckoutError> {
        if let Some(server) = self.first_server.take() {
            return Ok(Some(*server));
        }
        let pool = self.pool.clone();
        let wait = pool.checkout();
        tokio::pin!(wait);
        // Most checkouts find a server at once: they set up no timer.
        let first = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::future::Future::poll(wait.as_mut(), cx) {
                std::task::Poll::Ready(r) => Some(r),
                std::task::Poll::Pending => None,
            })
        })
        .await;
        if let Some(r) = first {
            return r.map(Some);
        }
        // query_wait_notify: a client queued this long is told so, once per wait.
        let notify_after = self.cluster.config.general.query_wait_notify;
        let notify = tokio::time::sleep(notify_after);
        tokio::pin!(notify);
        let mut notified = notify_after.is_zero();
        // query_timeout counts the wait too (PgBouncer's janitor applies it to queued clients).
        let query_limit = self.cluster.config.timeouts(&self.user).query;
        let query_timer = tokio::time::sleep(query_limit);
        tokio::pin!(query_timer);
        loop {
            tokio::select! {
                r = &mut wait => return r.map(Some),
                _ = &mut query_timer, if !query_limit.is_zero() => {
                    return Err(CheckoutError::QueryTimeout);
                }
                // As PgBouncer: SHUTDOWN WAIT_FOR_SERVERS turns queued clients away at once.
                Ok(()) = self.shutdown.changed() => {
                    if *self.shutdown.borrow_and_update() != Shutdown::Running {
                        return Err(CheckoutError::ShuttingDown);
                    }
                }
                _ = &mut notify, if !notified => {
                    notified = true;
                    let notice = build::notice(
                        "NOTICE",
                        "00000",
                        "No server connection available in postgres backend, client being queued",
                    );
                    if self.client.write_all(&notice).await.is_err() {
                        return Ok(None);
                    }
                }
                n = self.client.read_buf(&mut self.cbuf), if self.cbuf.len() < 1 << 20 => match n {
                    Ok(0) | Err(_) => return Ok(None),
                    Ok(_) => {}
                },
            }
        }
    }

    /// server_fast_close: closes a session's stale server between transactions, and the
    /// client with it (in session mode they are bound), in PgBouncer's words.
    async fn fast_close(&mut self, server: ServerConn) {
        self.pool
            .log_closing(&server, "database configuration changed");
        drop(server);
        self.fail("08P01", "database configuration changed").await;
    }

    fn mode(&self) -> PoolMode {
        self.pool.settings.mode
    }

    /// Relays one transaction (or, in session mode, the rest of the session).
    async fn transaction(&mut self, mut server: ServerConn, budget: usize) -> After {
        self.cancel.attach(BackendKey {
            address: server.address.clone(),
            pid: server.backend_pid,
            secret: server.backend_secret,
        });
        if let Err(after) = self.apply_params(&mut server).await {
            return after;
        }
        let limits = self.cluster.config.timeouts(&self.user);
        let idle_tx_limit = limits.idle_transaction;
        let capacity = self.cluster.config.general.max_prepared_statements;
        let app = self.app.clone();
        let mut x = Xact::new(self.pool.clone(), budget);
        let mut query_since: Option<tokio::time::Instant> = None;
        // When the server's session entered the current transaction block (transaction_timeout).
        let mut block_since: Option<tokio::time::Instant> = None;
        // Session mode: when the current transaction began (SHOW STATS counts each one).
        let session_mode = self.mode() == PoolMode::Session;
        let mut xact_began: Option<u64> = None;
        loop {
            let scanned = x.scan_client(
                &mut self.cbuf,
                &mut self.stmts,
                &app.statements,
                &mut server,
                capacity,
            );
            if let Err(e) = scanned {
                self.fail("08P01", &format!("protocol error: {e}")).await;
                self.abandon(server, &x).await;
                return After::Stop;
            }
            if x.relay.progress.terminated {
                self.terminated(server, &mut x).await;
                return After::Stop;
            }
            if self.router.is_some()
                && x.relay.progress.budget == 0
                && x.relay.up.ready == 0
                && x.relay.up.pass == 0
                && x.relay.progress.inflight == 0
            {
                if x.relay.progress.unsynced {
                    if x.relay.progress.executed {
                        // The rest of a batch left open rides along with it.
                        if let Ok(Some(u)) =
                            routing::unit(&self.cbuf, &self.stmts, &self.shard.last_unnamed)
                        {
                            routing::note_unnamed(
                                &self.cbuf[..u.len],
                                &mut self.shard.last_unnamed,
                            );
                            x.relay.progress.budget = u.len;
                            continue;
                        }
                    } else if x.relay.tracker.is_empty() {
                        relay::close_batch(
                            &mut self.cbuf,
                            &mut x.relay.up,
                            &mut x.relay.progress,
                            &mut x.relay.tracker,
                        );
                    }
                } else if x.relay.progress.tx.in_block() && x.relay.tracker.is_empty() {
                    // Between statements of a transaction: answers out, then check
                    // that the next unit belongs to this shard.
                    if x.relay.down.ready > 0 {
                        if self
                            .client
                            .write_all(&server.buf[..x.relay.down.ready])
                            .await
                            .is_err()
                        {
                            self.abandon(server, &x).await;
                            return After::Stop;
                        }
                        x.relay.down.sent += x.relay.down.ready as u64;
                        server.buf.advance(x.relay.down.ready);
                        x.relay.down.ready = 0;
                    }
                    let current = self.pool.settings.shard.unwrap_or(0);
                    let status = x.relay.progress.tx;
                    let next = if idle_tx_limit.is_zero() {
                        self.route_in_tx(current, status).await
                    } else {
                        match tokio::time::timeout(idle_tx_limit, self.route_in_tx(current, status))
                            .await
                        {
                            Ok(n) => n,
                            Err(_) => {
                                self.fail("08P01", "idle transaction timeout").await;
                                self.abandon(server, &x).await;
                                return After::Stop;
                            }
                        }
                    };
                    match next {
                        InTx::Go(n) => x.relay.progress.budget = n,
                        InTx::Switch(shard, n) => match self.switch_shard(server, x, shard).await {
                            Some((s, nx)) => {
                                server = s;
                                x = nx;
                                x.relay.progress.budget = n;
                            }
                            None => return After::Stop,
                        },
                        InTx::Move(shard, n) => {
                            let rolled_back = matches!(
                                tokio::time::timeout(CLEANUP_TIMEOUT, server.exec("ROLLBACK"))
                                    .await,
                                Ok(Ok(TxStatus::Idle))
                            );
                            if !rolled_back {
                                self.fail("08P01", "server conn crashed?").await;
                                return After::Stop;
                            }
                            server.buf.clear();
                            if self.settle(&mut server, &x.relay.seen).await {
                                self.release(server, false).await;
                            }
                            drop(x);
                            match self.open_shard(shard).await {
                                Some((s, nx)) => {
                                    server = s;
                                    x = nx;
                                    x.relay.progress.budget = n;
                                }
                                None => return After::Stop,
                            }
                        }
                        InTx::EndMulti(false, n) => {
                            self.release_parked(true).await;
                            x.relay.progress.budget = n;
                        }
                        InTx::EndMulti(true, n) => {
                            match self.prepare_multi(&mut server, status).await {
                                Ok(()) => x.relay.progress.budget = n,
                                Err((err, idle)) => {
                                    // Nothing committed: the error ends the transaction.
                                    self.cbuf.advance(n);
                                    let mut out = err;
                                    out.extend_from_slice(&build::ready_for_query(TxStatus::Idle));
                                    let written = self.client.write_all(&out).await;
                                    server.buf.clear();
                                    if idle && self.settle(&mut server, &x.relay.seen).await {
                                        self.release(server, false).await;
                                    }
                                    return match written {
                                        Ok(()) => After::Continue,
                                        Err(_) => After::Stop,
                                    };
                                }
                            }
                        }
                        InTx::Answered => {}
                        InTx::Refuse(len, msg) => {
                            let q = routing::raise_query("0A000", &msg);
                            self.cbuf.advance(len);
                            let rest = self.cbuf.split();
                            self.cbuf.extend_from_slice(&q);
                            self.cbuf.extend_from_slice(&rest);
                            x.relay.progress.budget = q.len();
                        }
                        InTx::Closed => {
                            self.abandon(server, &x).await;
                            return After::Stop;
                        }
                    }
                    continue;
                }
            }
            let waiting_in_tx = x.relay.progress.inflight == 0
                && x.relay.progress.tx.in_block()
                && x.relay.up.ready == 0;
            // server_fast_close in session mode: a server RECONNECT or a reload made stale
            // closes as soon as its session is between transactions.
            let watch_close = session_mode
                && x.relay.progress.tx == TxStatus::Idle
                && x.relay.progress.at_rest(&x.relay.up)
                && self.app.cluster().config.general.server_fast_close;
            let pool = watch_close.then(|| self.pool.clone());
            let changed = pool.as_ref().map(|p| p.changed());
            if pool.as_ref().is_some_and(|p| p.is_stale(&server)) {
                self.fast_close(server).await;
                return After::Stop;
            }
            let hold_client = x.relay.progress.budget == 0 && self.cbuf.len() > 1 << 20;
            let step = relay::step(
                &mut self.client,
                &mut self.cbuf,
                &mut x.relay.up,
                !x.relay.progress.terminated && !hold_client,
                &mut server,
                &mut x.relay.down,
            );
            // Clocks are read only for the limits that are set.
            if x.relay.progress.inflight == 0 {
                query_since = None;
            } else if query_since.is_none() && !limits.query.is_zero() {
                query_since = Some(tokio::time::Instant::now());
            }
            if !x.relay.progress.tx.in_block() {
                block_since = None;
            } else if block_since.is_none() && !limits.transaction.is_zero() {
                block_since = Some(tokio::time::Instant::now());
            }
            let mut deadline: Option<(tokio::time::Instant, Limit)> = None;
            let mut consider = |at: tokio::time::Instant, limit: Limit| {
                if deadline.is_none_or(|(d, _)| at < d) {
                    deadline = Some((at, limit));
                }
            };
            if waiting_in_tx && !idle_tx_limit.is_zero() {
                consider(
                    tokio::time::Instant::now() + idle_tx_limit,
                    Limit::IdleTransaction,
                );
            }
            if let Some(since) = query_since {
                consider(since + limits.query, Limit::Query);
            }
            if let Some(since) = block_since {
                consider(since + limits.transaction, Limit::Transaction);
            }
            let step = async {
                match changed {
                    None => Some(step.await),
                    Some(changed) => tokio::select! {
                        ev = step => Some(ev),
                        _ = changed => None,
                    },
                }
            };
            let event = match deadline {
                None => step.await,
                Some((at, limit)) => match tokio::time::timeout_at(at, step).await {
                    Ok(ev) => ev,
                    Err(_) => {
                        self.timed_out(server, &x, limit).await;
                        return After::Stop;
                    }
                },
            };
            let Some(event) = event else {
                self.fast_close(server).await;
                return After::Stop;
            };
            match event {
                Event::ClientData => {
                    if session_mode && xact_began.is_none() {
                        xact_began = Some(now_us());
                    }
                }
                Event::ServerData => {
                    let idle = match x.scan_server(&mut server, &mut self.stmts, &mut self.wanted) {
                        Ok(idle) => idle,
                        Err(e) => {
                            tracing::warn!(error = %e, ?server, "protocol error from server");
                            PoolTotals::add(&x.pool.totals.errors, 1);
                            self.fail("08P01", "server conn crashed?").await;
                            return After::Stop;
                        }
                    };
                    if idle
                        && x.relay.progress.tx == TxStatus::Idle
                        && x.relay.progress.at_rest(&x.relay.up)
                    {
                        if !session_mode {
                            return self.finish(server, &mut x).await;
                        }
                        // Session mode keeps its server: count the transaction that ended.
                        let began = xact_began.take().unwrap_or_else(now_us);
                        count_xact(&x.pool, now_us().saturating_sub(began));
                    }
                    if idle && x.relay.progress.tx.in_block() && self.mode() == PoolMode::Statement
                    {
                        // PgBouncer refuses multi-statement transactions here.
                        let _ = self
                            .client
                            .write_all(&server.buf[..x.relay.down.ready])
                            .await;
                        self.fail(
                            "08P01",
                            "transaction blocks not allowed in statement pooling mode",
                        )
                        .await;
                        server.buf.advance(x.relay.down.ready);
                        self.abandon(server, &x).await;
                        return After::Stop;
                    }
                }
                Event::ClientGone(e) => {
                    tracing::debug!(peer = %self.peer, error = %e, "client connection lost");
                    self.abandon(server, &x).await;
                    return After::Stop;
                }
                Event::ServerGone(e) => {
                    tracing::warn!(error = %e, ?server, peer = %self.peer, "server connection lost");
                    PoolTotals::add(&x.pool.totals.errors, 1);
                    if let (Some(router), Some(shard), Some(r)) = (
                        &self.router,
                        self.pool.settings.shard,
                        self.pool.settings.replica,
                    ) {
                        router.ban(shard, r, self.cluster.config.general.ban_time);
                    }
                    let _ = self
                        .client
                        .write_all(&server.buf[..x.relay.down.ready])
                        .await;
                    self.fail("08P01", "server conn crashed?").await;
                    return After::Stop;
                }
            }
        }
    }

    /// A limit on the transaction ran out: as PgBouncer, the server is closed with the limit's
    /// name (a running query cancelled first) and the client told why.
    async fn timed_out(&mut self, server: ServerConn, x: &Xact, limit: Limit) {
        let (server_reason, code, client_reason) = match limit {
            // PgBouncer's SQLSTATE for every disconnect, and the server's reason as the client's.
            Limit::IdleTransaction => (
                "idle transaction timeout",
                "08P01",
                "idle transaction timeout",
            ),
            Limit::Query => ("query timeout", "08P01", "query timeout"),
            Limit::Transaction => ("transaction timeout", "08P01", "transaction timeout"),
        };
        PoolTotals::add(&self.pool.totals.errors, 1);
        self.pool.log_closing(&server, server_reason);
        if x.relay.progress.inflight > 0 {
            tokio::spawn(cancel::forward(BackendKey {
                address: server.address.clone(),
                pid: server.backend_pid,
                secret: server.backend_secret,
            }));
        }
        self.fail(code, client_reason).await;
        // Closed, not returned: dropping it frees its pool slot.
        drop(server);
    }

    /// Brings the server's session parameters in line with this client's.
    async fn apply_params(&mut self, server: &mut ServerConn) -> Result<(), After> {
        if server.params.known_match(&self.wanted) {
            return Ok(());
        }
        let Some((sql, changed)) = server.params.sync_statement(&self.wanted) else {
            server.params.remember_match(&self.wanted);
            return Ok(());
        };
        let noise = tracing::enabled!(tracing::Level::TRACE);
        if noise {
            // PgBouncer's NOISE lines for the same events (operators grep them).
            for key in &changed {
                if let Some((name, v)) = self.wanted.named(key) {
                    tracing::trace!("varcache_apply: SET {name}={}", quote_literal(v));
                }
            }
        }
        match server.exec(&sql).await {
            Ok(_) => {
                let asked: Vec<(String, String)> = if noise {
                    changed
                        .iter()
                        .filter_map(|k| {
                            let (name, v) = self.wanted.named(k)?;
                            Some((name.to_string(), v.to_string()))
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                server.params.after_sync(&mut self.wanted, &changed);
                for (key, old) in asked {
                    match self.wanted.get(&key) {
                        Some(new) if new != old => tracing::trace!(
                            "varcache_set_canonical: setting {key} to its canonical version {old} -> {new}"
                        ),
                        _ => {}
                    }
                }
                Ok(())
            }
            Err(ExecError::Server(e)) => {
                self.fail(&e.code, &e.message).await;
                Err(After::Stop)
            }
            Err(e) => {
                tracing::warn!(error = %e, "server failed while applying session parameters");
                self.fail("08P01", "server conn crashed?").await;
                Err(After::Stop)
            }
        }
    }
}

/// Counts one finished transaction of `pool` for SHOW STATS and the metrics.
fn count_xact(pool: &Pool, xact_us: u64) {
    PoolTotals::add(&pool.totals.xact_count, 1);
    PoolTotals::add(&pool.totals.xact_time_us, xact_us);
    pool.metrics.transaction_done(xact_us);
}

/// Bytes a client read starts with when it holds no buffer.
const READ_CHUNK: usize = 8192;

/// Reads from the client. A client that holds no buffer (idle) waits for data first and only
/// then takes one, so thousands of idle clients cost no buffer memory.
async fn read_client(client: &mut Stream, buf: &mut BytesMut) -> std::io::Result<usize> {
    if buf.capacity() == buf.len() {
        client.readable().await?;
        buf.reserve(READ_CHUNK);
    }
    client.read_buf(buf).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size_of_future<A, F: std::future::Future>(_: impl FnOnce(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn an_idle_clients_task_stays_small() {
        let serve = size_of_future(|s: &'static mut Session| s.serve());
        let session = std::mem::size_of::<Session>();
        let run = size_of_future(
            |(app, stream, peer, abort, late): (
                Arc<App>,
                Stream,
                String,
                Arc<std::sync::OnceLock<tokio::task::AbortHandle>>,
                bool,
            )| run(app, stream, peer, abort, late),
        );
        eprintln!("Session {session} B, serve {serve} B, run {run} B");
        // What an idle client's task holds: `run` (with the session in it) and the boxed
        // `serve` future.
        assert!(run + serve < 1200, "{run} + {serve} bytes");
    }
}
