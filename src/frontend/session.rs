//! One client connection from login to goodbye: authenticate, then for each
//! transaction borrow a server from the pool, relay, and give it back clean.

use super::cancel::{self, BackendKey, CancelEntry, FrontendKey};
use super::fanout;
use super::relay::{self, ClientCtx, Dir, Event, Progress, ServerState};
use super::routing::{self, HeldBegin, ShardSession};
use super::sqlscan::Seen;
use super::startup::{self, Start};
use super::tracker::Tracker;
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
use crate::wire::{self, build, tag};
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
    mut stream: Stream,
    peer: String,
    abort: Arc<std::sync::OnceLock<tokio::task::AbortHandle>>,
    fresh: Fresh,
) {
    let mut buf = BytesMut::with_capacity(8192);
    let cluster = app.cluster();
    let limit = cluster.config.general.client_login_timeout;
    // Boxed: the login's state is large, and a logged-in client's task should not
    // keep room for it.
    let attempt = Box::pin(login(&app, &cluster, &mut stream, &mut buf, &peer));
    let session = if limit.is_zero() {
        attempt.await
    } else {
        match tokio::time::timeout(limit, attempt).await {
            Ok(s) => s,
            Err(_) => {
                tracing::info!(%peer, "client_login_timeout");
                fatal(
                    &mut stream,
                    "08P01",
                    "client_login_timeout (server down or wrong password?)",
                )
                .await;
                None
            }
        }
    };
    let parts = match session {
        Some(Login::Client(parts)) => *parts,
        Some(Login::Admin { user, role }) => {
            crate::admin::serve(app, stream, buf, user, role).await;
            return;
        }
        None => return,
    };
    let info = Arc::new(ClientInfo::new(
        app.next_client_id(),
        &parts.user,
        &parts.db.name,
        &peer,
        parts.wanted.get("application_name").unwrap_or_default(),
        parts.key.pid,
    ));
    *info.abort.lock() = abort.get().cloned();
    app.client_list.insert(info.id, info.clone());
    let _registered = Registered {
        app: app.clone(),
        id: info.id,
        key: parts.key,
    };
    let mut session = Session {
        shutdown: app.shutdown.subscribe(),
        fresh: Some(fresh),
        info,
        app: app.clone(),
        cluster: cluster.clone(),
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
        router: None,
        shard: ShardSession::default(),
    };
    session.router = session.cluster.router(&session.db);
    session.serve().await;
    if cluster.config.general.log_disconnections {
        tracing::info!(peer = %session.peer, user = %session.user, db = %session.db.name, "client closed");
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
        self.app.client_list.remove(self.id);
        self.app.cancels.unregister(self.key);
    }
}

enum Login {
    Client(Box<LoggedIn>),
    Admin {
        user: String,
        role: crate::admin::Role,
    },
}

struct LoggedIn {
    user: String,
    db: Arc<Database>,
    pool: Arc<Pool>,
    generation: u64,
    wanted: ParamSet,
    key: FrontendKey,
    cancel: Arc<CancelEntry>,
}

async fn login(
    app: &Arc<App>,
    cluster: &Arc<Cluster>,
    stream: &mut Stream,
    buf: &mut BytesMut,
    peer: &str,
) -> Option<Login> {
    let generation = app.generation();
    let params = match startup::read(stream, buf, &cluster.config.tls.client).await {
        Ok(Start::Login(p)) => p,
        Ok(Start::Cancel(key)) => {
            match app.cancels.lookup(key) {
                Some(target) => cancel::forward(target).await,
                None => tracing::debug!(%peer, "cancel request for unknown or idle client"),
            }
            return None;
        }
        Ok(Start::Refused(Some((code, msg)))) => {
            fatal(stream, code, &msg).await;
            return None;
        }
        Ok(Start::Refused(None)) | Err(_) => return None,
    };
    let g = &cluster.config.general;
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let Some(user) = get("user").filter(|u| !u.is_empty()) else {
        fatal(
            stream,
            "28000",
            "no PostgreSQL user name specified in startup packet",
        )
        .await;
        return None;
    };
    let dbname = get("database")
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());
    if get("replication").is_some_and(|r| r != "false" && r != "0" && r != "off") {
        fatal(
            stream,
            "08P01",
            "replication connections are not supported by Weir",
        )
        .await;
        return None;
    }
    if crate::admin::is_admin_db(&dbname) {
        if user == "pgbouncer" && is_own_user(stream) {
            // PgBouncer lets its own OS user in over the Unix socket.
            return Some(Login::Admin {
                user,
                role: crate::admin::Role::Admin,
            });
        }
        return admin_login(stream, buf, cluster, user, &dbname, peer).await;
    }
    if app.clients.load(Ordering::Acquire) > g.max_client_conn {
        tracing::warn!(%peer, %user, db = %dbname, "no more connections allowed (max_client_conn)");
        fatal(
            stream,
            "08P01",
            "no more connections allowed (max_client_conn)",
        )
        .await;
        return None;
    }
    if app.shutdown_state() == Shutdown::Immediate {
        fatal(stream, "57P01", "Weir is shutting down").await;
        return None;
    }
    if app.disabled.lock().contains(&dbname) {
        fatal(
            stream,
            "08P01",
            &format!("database \"{dbname}\" does not allow connections"),
        )
        .await;
        return None;
    }
    let Some(db) = cluster.config.database(&dbname) else {
        tracing::info!(%peer, %user, db = %dbname, "no such database");
        fatal(stream, "3D000", &format!("no such database: {dbname}")).await;
        return None;
    };
    let auth_type = auth_type_for(cluster, stream, &dbname, &user, peer).await?;
    let known = cluster.config.users.get(&user);
    let mut looked_up = None;
    if known.and_then(|u| u.secret.as_ref()).is_none()
        && db.auth_user.is_some()
        && auth_type != AuthType::Any
    {
        match auth::query::lookup(cluster, &db, &user).await {
            Ok(found) => looked_up = found,
            Err(e) => {
                tracing::warn!(%peer, %user, db = %dbname, error = %e, "auth_query failed");
                cluster.forget_unused_auto(&dbname);
                fatal(stream, "08P01", &e.to_string()).await;
                return None;
            }
        }
    }
    if auth_type == AuthType::Trust && known.is_none() && looked_up.is_none() {
        // As PgBouncer: trust skips the password, but the user must still be known.
        tracing::warn!(%peer, %user, "unknown user (auth_type trust)");
        let e = AuthError::WrongPassword(user.clone());
        fatal(stream, e.code(), &e.to_string()).await;
        return None;
    }
    let secret = looked_up
        .as_ref()
        .or_else(|| known.and_then(|u| u.secret.as_ref()));
    let authenticated = auth::authenticate(stream, buf, auth_type, &user, secret).await;
    if authenticated.is_err() {
        cluster.forget_unused_auto(&dbname);
    }
    let proof = match authenticated {
        Ok(p) => p,
        Err(AuthError::Closed) | Err(AuthError::Io(_)) => return None,
        Err(e) => {
            tracing::warn!(%peer, %user, db = %dbname, error = %e, "client authentication failed");
            fatal(stream, e.code(), &e.to_string()).await;
            return None;
        }
    };
    let pool = cluster.pool(&db, &user);
    if looked_up.is_some() || proof.scram_client_key.is_some() {
        // Every pool this user may reach (all shards and replicas) logs in the same way.
        for p in cluster.user_pools(&db, &user) {
            if let Some(s) = &looked_up {
                p.set_looked_up_secret(s.clone());
            }
            if let Some(key) = proof.scram_client_key {
                p.set_scram_key(key);
            }
        }
    }
    let defaults = match pool.defaults() {
        Some(d) => d,
        None => match pool.checkout().await {
            Ok(conn) => {
                let d = conn.params.clone();
                pool.checkin(conn);
                d
            }
            Err(e) => {
                let (code, msg) = checkout_error(&e);
                fatal(stream, &code, &msg).await;
                return None;
            }
        },
    };
    let mut wanted = defaults.tracked_defaults();
    for (k, v) in &params {
        match k.as_str() {
            "user" | "database" | "replication" => {}
            "options" => match startup::parse_options(v) {
                Ok(list) => list.iter().for_each(|(k, v)| wanted.set(k, v)),
                Err(msg) => {
                    fatal(stream, "08P01", &msg).await;
                    return None;
                }
            },
            k if g.ignore_startup_parameters.contains(k) => {}
            k => wanted.set(k, v),
        }
    }
    if g.application_name_add_host {
        // As PgBouncer: "<application_name> - <host>:<port>" of the client.
        let name = wanted
            .get("application_name")
            .unwrap_or_default()
            .to_string();
        wanted.set("application_name", &format!("{name} - {peer}"));
    }
    app.param_sets.share(&mut wanted);
    let (key, cancel) = app.cancels.register();
    let mut out = BytesMut::with_capacity(512);
    out.put(build::auth(0, &[]));
    for (name, value) in defaults.iter() {
        let value = wanted.get(name).unwrap_or(value);
        out.put(build::parameter_status(name, value));
    }
    out.put(build::backend_key_data(key.pid, key.secret));
    out.put(build::ready_for_query(b'I'));
    if stream.write_all(&out).await.is_err() {
        app.cancels.unregister(key);
        return None;
    }
    if g.log_connections {
        tracing::info!(%peer, %user, db = %dbname, tls = stream.is_tls(), "login");
    }
    Some(Login::Client(Box::new(LoggedIn {
        user,
        db,
        pool,
        generation,
        wanted,
        key,
        cancel,
    })))
}

/// The authentication this connection must pass: `auth_type`, or what `auth_hba_file` asks of
/// it (for the admin console too, as PgBouncer). `None`: rejected, and the client told so.
async fn auth_type_for(
    cluster: &Cluster,
    stream: &mut Stream,
    dbname: &str,
    user: &str,
    peer: &str,
) -> Option<AuthType> {
    let g = &cluster.config.general;
    let Some(hba) = cluster
        .config
        .hba
        .as_ref()
        .filter(|_| g.auth_type == AuthType::Hba)
    else {
        return Some(g.auth_type);
    };
    if let Some(t) = hba_auth_type(hba, stream, dbname, user) {
        return Some(t);
    }
    tracing::warn!(%peer, %user, db = %dbname, "rejected by auth_hba_file");
    let host = peer.rsplit_once(':').map_or(peer, |(h, _)| h);
    fatal(
        stream,
        "28000",
        &format!("pg_hba.conf rejects connection for host \"{host}\", user \"{user}\", database \"{dbname}\""),
    )
    .await;
    None
}

/// The authentication `auth_hba_file` asks of this connection; `None` rejects it.
fn hba_auth_type(
    hba: &crate::auth::hba::Hba,
    stream: &Stream,
    dbname: &str,
    user: &str,
) -> Option<AuthType> {
    use crate::auth::hba::{Method, Peer};
    let peer = Peer {
        ip: stream
            .tcp()
            .and_then(|s| s.peer_addr().ok())
            .map(|a| a.ip()),
        tls: stream.is_tls(),
    };
    match hba.method(peer, dbname, user) {
        Method::Trust => Some(AuthType::Trust),
        Method::Md5 => Some(AuthType::Md5),
        Method::Password => Some(AuthType::Plain),
        Method::ScramSha256 => Some(AuthType::ScramSha256),
        Method::Peer if peer_os_user(stream).as_deref() == Some(user) => Some(AuthType::Any),
        Method::Peer | Method::Reject | Method::Cert => None,
    }
}

/// The OS user name of a Unix-socket peer.
fn peer_os_user(stream: &Stream) -> Option<String> {
    let Stream::Unix(s) = stream else {
        return None;
    };
    let uid = s.peer_cred().ok()?.uid();
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 4096];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer refers to live, correctly sized storage owned here;
    // getpwuid_r writes only within `buf` and `pwd`.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
        return None;
    }
    // SAFETY: on success pw_name points to a NUL-terminated string inside `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
    Some(name.to_string_lossy().into_owned())
}

/// True for a Unix-socket peer running as this process's OS user.
fn is_own_user(stream: &Stream) -> bool {
    match stream {
        Stream::Unix(s) => s
            .peer_cred()
            .map(|c| c.uid() == unsafe { libc::geteuid() })
            .unwrap_or(false),
        _ => false,
    }
}

/// Authenticates a console user: only `admin_users` and `stats_users` get in
/// (as PgBouncer; any authenticated user may connect when auth_type is trust
/// only if listed).
async fn admin_login(
    stream: &mut Stream,
    buf: &mut BytesMut,
    cluster: &Arc<Cluster>,
    user: String,
    dbname: &str,
    peer: &str,
) -> Option<Login> {
    let g = &cluster.config.general;
    let auth_type = auth_type_for(cluster, stream, dbname, &user, peer).await?;
    let known = cluster.config.users.get(&user);
    if auth_type == AuthType::Trust && known.is_none() {
        // As PgBouncer: trust skips the password, but the user must still be known.
        tracing::warn!(%peer, %user, "unknown user (auth_type trust)");
        let e = AuthError::WrongPassword(user.clone());
        fatal(stream, e.code(), &e.to_string()).await;
        return None;
    }
    let secret = known.and_then(|u| u.secret.as_ref());
    if let Err(e) = auth::authenticate(stream, buf, auth_type, &user, secret).await {
        if !matches!(e, AuthError::Closed | AuthError::Io(_)) {
            tracing::warn!(%peer, %user, error = %e, "admin console authentication failed");
            fatal(stream, e.code(), &e.to_string()).await;
        }
        return None;
    }
    let role = if g.admin_users.contains(&user) {
        crate::admin::Role::Admin
    } else if g.stats_users.contains(&user) {
        crate::admin::Role::Stats
    } else {
        fatal(stream, "08P01", "not allowed").await;
        return None;
    };
    Some(Login::Admin { user, role })
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
    }
}

/// One transaction's relay state; its counters go to the pool's totals
/// however the transaction ends.
struct Xact {
    pool: Arc<Pool>,
    up: Dir,
    down: Dir,
    progress: Progress,
    clock: QueryClock,
}

impl Xact {
    fn new(pool: Arc<Pool>) -> Xact {
        Xact {
            pool,
            up: Dir::default(),
            down: Dir::default(),
            progress: Progress::default(),
            clock: QueryClock::default(),
        }
    }
}

impl Drop for Xact {
    fn drop(&mut self) {
        let t = &self.pool.totals;
        PoolTotals::add(&t.query_count, self.progress.queries);
        PoolTotals::add(&t.bytes_received, self.up.sent);
        PoolTotals::add(&t.bytes_sent, self.down.sent);
    }
}

/// Counts an accepted client in `App::fresh` until its first transaction ends.
pub(super) struct Fresh(Arc<App>);

impl Fresh {
    pub(super) fn new(app: &Arc<App>) -> Fresh {
        app.fresh.fetch_add(1, Ordering::AcqRel);
        Fresh(app.clone())
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        self.0.fresh.fetch_sub(1, Ordering::AcqRel);
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
    shutdown: tokio::sync::watch::Receiver<Shutdown>,
    /// Set until the first transaction ends (see `App::fresh`).
    fresh: Option<Fresh>,
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
    /// Answered by Weir; look at the next unit.
    Answered,
    /// Not for this shard: the server must fail it (so the transaction aborts).
    Refuse(usize, String),
    Closed,
}

enum Work {
    Message,
    Closed,
}

enum After {
    Continue,
    Stop,
}

impl Session {
    async fn serve(&mut self) {
        loop {
            match self.wait_for_work().await {
                Work::Message => {}
                Work::Closed => return,
            }
            self.refresh();
            let mut budget = usize::MAX;
            if self.router.is_some() {
                match Box::pin(self.route()).await {
                    Routed::Pool(p, len) => {
                        self.pool = p;
                        budget = len;
                    }
                    Routed::Done => continue,
                    Routed::Closed => return,
                }
            }
            self.info.set_state(ClientState::Waiting);
            self.info.wait_since.store(now_us(), Ordering::Relaxed);
            let mut checked = Box::pin(self.checkout()).await;
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
                        checked = Box::pin(self.checkout()).await;
                    }
                }
            }
            let mut server = match checked {
                Ok(Some(s)) => s,
                Ok(None) => return,
                Err(e) => {
                    let (code, msg) = checkout_error(&e);
                    if self.cluster.config.general.log_pooler_errors {
                        tracing::warn!(peer = %self.peer, user = %self.user, db = %self.db.name, error = %msg, "pooler error");
                    }
                    fatal(&mut self.client, &code, &msg).await;
                    return;
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
            if let Some(held) = self.shard.held.take() {
                // The BEGIN Weir answered goes to the shard the statement chose.
                if !matches!(server.exec(&held.sql).await, Ok(b'T')) {
                    fatal(
                        &mut self.client,
                        "08P01",
                        "could not start the transaction on the shard",
                    )
                    .await;
                    return;
                }
            }
            let pool = self.pool.clone();
            // Boxed, as the checkout and routing below: the task of an idle client keeps
            // only what waiting for its next message needs.
            let after = Box::pin(self.transaction(server, budget)).await;
            self.fresh = None;
            self.cancel.detach();
            self.info.set_state(ClientState::Idle);
            self.info.server_pid.store(0, Ordering::Relaxed);
            let totals = &pool.totals;
            PoolTotals::add(&totals.xact_count, 1);
            let xact_us = now_us().saturating_sub(now);
            PoolTotals::add(&totals.xact_time_us, xact_us);
            pool.metrics.transaction_done(xact_us);
            drop(active);
            if let After::Stop = after {
                return;
            }
        }
    }

    /// Waits until the client has started a message (or leaves).
    async fn wait_for_work(&mut self) -> Work {
        if self.cbuf.is_empty() && !self.client.is_tls() {
            // An idle client holds no read buffer (see `read_client`).
            self.cbuf = BytesMut::new();
        }
        let idle_limit = self.cluster.config.general.client_idle_timeout;
        loop {
            match wire::header(&self.cbuf) {
                Ok(Some(h)) if h.tag == tag::TERMINATE => return Work::Closed,
                Ok(Some(_)) => return Work::Message,
                Ok(None) => {}
                Err(e) => {
                    fatal(&mut self.client, "08P01", &format!("protocol error: {e}")).await;
                    return Work::Closed;
                }
            }
            let state = *self.shutdown.borrow_and_update();
            // A graceful shutdown still serves a client that connected before
            // the listener closed and has not had its first transaction.
            if state == Shutdown::Immediate || (state == Shutdown::Graceful && self.fresh.is_none())
            {
                fatal(&mut self.client, "57P01", "Weir is shutting down").await;
                return Work::Closed;
            }
            let idle = async {
                if idle_limit.is_zero() {
                    std::future::pending::<()>().await
                } else {
                    tokio::time::sleep(idle_limit).await
                }
            };
            tokio::select! {
                n = read_client(&mut self.client, &mut self.cbuf) => match n {
                    Ok(0) | Err(_) => return Work::Closed,
                    Ok(_) => {}
                },
                _ = self.shutdown.changed() => {}
                _ = idle => {
                    fatal(&mut self.client, "08P01", "client_idle_timeout").await;
                    return Work::Closed;
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
            self.cluster = self.app.cluster();
            if let Some(db) = self.cluster.config.database(&self.db.name) {
                self.db = db;
                self.pool = self.cluster.pool(&self.db, &self.user);
                self.router = self.cluster.router(&self.db);
            }
        }
    }

    async fn checkout(&mut self) -> Result<Option<ServerConn>, CheckoutError> {
        let pool = self.pool.clone();
        let wait = pool.checkout();
        tokio::pin!(wait);
        loop {
            tokio::select! {
                r = &mut wait => return r.map(Some),
                n = self.client.read_buf(&mut self.cbuf), if self.cbuf.len() < 1 << 20 => match n {
                    Ok(0) | Err(_) => return Ok(None),
                    Ok(_) => {}
                },
            }
        }
    }

    /// Reads until a whole routable unit is at the front of the buffer: a statement is
    /// routed by its key whatever its size, so it is held whole up to `max_packet_size`; a
    /// larger one is refused (the connection is closed, as PgBouncer does for a packet over
    /// that limit), never sent somewhere unrouted. `Err`: the client is gone or was refused.
    async fn read_unit(&mut self) -> Result<routing::Unit, ()> {
        let limit = self
            .cluster
            .config
            .general
            .max_packet_size
            .min(wire::MAX_MESSAGE_LEN);
        loop {
            let pending = match routing::unit(&self.cbuf, &self.stmts, &self.shard.last_unnamed) {
                Ok(Some(u)) if u.len <= limit => {
                    routing::note_unnamed(&self.cbuf[..u.len], &mut self.shard.last_unnamed);
                    return Ok(u);
                }
                Ok(Some(u)) => u.len,
                Ok(None) => routing::pending_len(&self.cbuf),
                Err(e) => {
                    fatal(&mut self.client, "08P01", &format!("protocol error: {e}")).await;
                    return Err(());
                }
            };
            if pending > limit {
                tracing::warn!(peer = %self.peer, bytes = pending, limit, "statement over max_packet_size refused");
                let msg = format!(
                    "statement of {pending} bytes is larger than max_packet_size ({limit}) and cannot be routed to a shard"
                );
                fatal(&mut self.client, "08P01", &msg).await;
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

    /// Picks the pool for the unit at the front of the buffer, or answers
    /// it without a server.
    async fn route(&mut self) -> Routed {
        let Some(router) = self.router.clone() else {
            return Routed::Pool(self.pool.clone(), usize::MAX);
        };
        let Ok(unit) = self.read_unit().await else {
            return Routed::Closed;
        };
        let sql = unit.sql.clone().unwrap_or_default();
        let status = match &self.shard.held {
            Some(h) if h.failed => b'E',
            Some(_) => b'T',
            None => b'I',
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
        let (analysis, shape) = routing::analyze_unit(&router, &unit, &sql);
        if unit.simple && !analysis.multi {
            match analysis.kind {
                Kind::Begin { read_only } if self.shard.held.is_none() => {
                    self.shard.held = Some(HeldBegin {
                        sql: sql.clone(),
                        read_only,
                        failed: false,
                    });
                    return self.answer(unit.len, Some("BEGIN"), None, b'T').await;
                }
                Kind::Other if self.shard.held.is_some() && routing::is_transaction_set(&sql) => {
                    // SET LOCAL / SET TRANSACTION … right after BEGIN travel with it.
                    if let Some(h) = &mut self.shard.held {
                        h.sql.push_str("; ");
                        h.sql.push_str(sql.trim().trim_end_matches(';'));
                    }
                    return self.answer(unit.len, Some("SET"), None, b'T').await;
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
                    return self.answer(unit.len, Some(tag), None, b'I').await;
                }
                _ => {}
            }
        }
        if status == b'E' {
            let err = build::error(
                "ERROR",
                "25P02",
                "current transaction is aborted, commands ignored until end of transaction block",
            );
            return self.answer(unit.len, None, Some(err), b'E').await;
        }
        let params = routing::unit_params(&self.cbuf, &unit, &shape);
        let pin = comment_hint(&sql).or_else(|| self.shard.pin.clone());
        let (in_write_tx, in_read_tx) = match &self.shard.held {
            Some(h) => (!h.read_only, h.read_only),
            None => (false, false),
        };
        let decision = if unit.executes {
            router.decide(&analysis, &params, pin.as_ref(), in_write_tx)
        } else {
            // Parse/Describe/Close only: the statement is known on every server.
            Decision::Any { read: false }
        };
        match decision {
            Decision::Shard { shard, read } => {
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
            Decision::Refuse(msg) => {
                let err = build::error("ERROR", "0A000", &msg);
                self.refuse(unit.len, unit.synced, err, status).await
            }
        }
    }

    /// Checks the next unit of a transaction that runs on shard `current`.
    async fn route_in_tx(&mut self, current: usize, status: u8) -> InTx {
        let Some(router) = self.router.clone() else {
            return InTx::Go(usize::MAX);
        };
        let Ok(unit) = self.read_unit().await else {
            return InTx::Closed;
        };
        if !unit.executes || status == b'E' {
            // Nothing runs, or the server refuses it anyway.
            return InTx::Go(unit.len);
        }
        let sql = unit.sql.clone().unwrap_or_default();
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
        let (analysis, shape) = routing::analyze_unit(&router, &unit, &sql);
        if matches!(analysis.kind, Kind::Begin { .. } | Kind::End) || analysis.multi {
            return InTx::Go(unit.len);
        }
        let params = routing::unit_params(&self.cbuf, &unit, &shape);
        let pin = comment_hint(&sql).or_else(|| self.shard.pin.clone());
        match router.decide(&analysis, &params, pin.as_ref(), true) {
            Decision::Any { .. } => InTx::Go(unit.len),
            Decision::Shard { shard, .. } if shard == current => InTx::Go(unit.len),
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

    /// The pool of a shard: a healthy replica for reads when allowed.
    fn shard_pool(&self, router: &ShardRouter, shard: usize, read: bool) -> Option<Arc<Pool>> {
        let replica = if read {
            router.pick_replica(shard)
        } else {
            None
        };
        self.cluster
            .shard_pool(&self.db, &self.user, shard, replica)
            .or_else(|| self.cluster.shard_pool(&self.db, &self.user, shard, None))
    }

    /// Refuses a unit: an error, and ReadyForQuery if the client expects one.
    async fn refuse(&mut self, len: usize, synced: bool, err: BytesMut, status: u8) -> Routed {
        let status = match &mut self.shard.held {
            Some(h) => {
                h.failed = true;
                b'E'
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
    async fn answer(
        &mut self,
        len: usize,
        tag: Option<&str>,
        err: Option<BytesMut>,
        status: u8,
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
        let idle_tx_limit = self.cluster.config.general.idle_transaction_timeout;
        let capacity = self.cluster.config.general.max_prepared_statements;
        let app = self.app.clone();
        let mut x = Xact::new(self.pool.clone());
        let mut tracker = Tracker::default();
        let mut seen = Seen::default();
        let mut skip_to_sync = false;
        let query_limit = self.cluster.config.general.query_timeout;
        let mut query_since: Option<tokio::time::Instant> = None;
        x.progress.budget = budget;
        loop {
            let scanned = {
                let mut ctx = ClientCtx {
                    stmts: &mut self.stmts,
                    registry: &app.statements,
                    server: &mut server.prepared,
                    capacity,
                    tracker: &mut tracker,
                    seen: &mut seen,
                    skip_to_sync,
                };
                let r = relay::scan_client(&mut self.cbuf, &mut x.up, &mut x.progress, &mut ctx);
                skip_to_sync = ctx.skip_to_sync;
                r
            };
            x.clock.sent(x.progress.inflight);
            if let Err(e) = scanned {
                fatal(&mut self.client, "08P01", &format!("protocol error: {e}")).await;
                self.abandon(server, &x.progress, &x.up, &seen).await;
                return After::Stop;
            }
            relay::insert_fakes(&mut server.buf, &mut x.down, &mut tracker);
            if x.progress.terminated {
                self.terminated(server, &mut x, &seen).await;
                return After::Stop;
            }
            if self.router.is_some()
                && x.progress.budget == 0
                && x.up.ready == 0
                && x.up.pass == 0
                && x.progress.inflight == 0
            {
                if x.progress.unsynced {
                    if x.progress.executed {
                        // The rest of a batch left open rides along with it.
                        if let Ok(Some(u)) =
                            routing::unit(&self.cbuf, &self.stmts, &self.shard.last_unnamed)
                        {
                            routing::note_unnamed(
                                &self.cbuf[..u.len],
                                &mut self.shard.last_unnamed,
                            );
                            x.progress.budget = u.len;
                            continue;
                        }
                    } else if tracker.is_empty() {
                        relay::close_batch(
                            &mut self.cbuf,
                            &mut x.up,
                            &mut x.progress,
                            &mut tracker,
                        );
                    }
                } else if x.progress.tx != b'I' && tracker.is_empty() {
                    // Between statements of a transaction: answers out, then check
                    // that the next unit belongs to this shard.
                    if x.down.ready > 0 {
                        if self
                            .client
                            .write_all(&server.buf[..x.down.ready])
                            .await
                            .is_err()
                        {
                            self.abandon(server, &x.progress, &x.up, &seen).await;
                            return After::Stop;
                        }
                        x.down.sent += x.down.ready as u64;
                        server.buf.advance(x.down.ready);
                        x.down.ready = 0;
                    }
                    let current = self.pool.settings.shard.unwrap_or(0);
                    let status = x.progress.tx;
                    let next = if idle_tx_limit.is_zero() {
                        self.route_in_tx(current, status).await
                    } else {
                        match tokio::time::timeout(idle_tx_limit, self.route_in_tx(current, status))
                            .await
                        {
                            Ok(n) => n,
                            Err(_) => {
                                fatal(&mut self.client, "25P03", "idle transaction timeout").await;
                                self.abandon(server, &x.progress, &x.up, &seen).await;
                                return After::Stop;
                            }
                        }
                    };
                    match next {
                        InTx::Go(n) => x.progress.budget = n,
                        InTx::Answered => {}
                        InTx::Refuse(len, msg) => {
                            let q = routing::raise_query("0A000", &msg);
                            self.cbuf.advance(len);
                            let rest = self.cbuf.split();
                            self.cbuf.extend_from_slice(&q);
                            self.cbuf.extend_from_slice(&rest);
                            x.progress.budget = q.len();
                        }
                        InTx::Closed => {
                            self.abandon(server, &x.progress, &x.up, &seen).await;
                            return After::Stop;
                        }
                    }
                    continue;
                }
            }
            let waiting_in_tx =
                x.progress.inflight == 0 && x.progress.tx != b'I' && x.up.ready == 0;
            let hold_client = x.progress.budget == 0 && self.cbuf.len() > 1 << 20;
            let step = relay::step(
                &mut self.client,
                &mut self.cbuf,
                &mut x.up,
                !x.progress.terminated && !hold_client,
                &mut server,
                &mut x.down,
            );
            if x.progress.inflight == 0 {
                query_since = None;
            } else if query_since.is_none() {
                query_since = Some(tokio::time::Instant::now());
            }
            let event = if waiting_in_tx && !idle_tx_limit.is_zero() {
                match tokio::time::timeout(idle_tx_limit, step).await {
                    Ok(ev) => ev,
                    Err(_) => {
                        fatal(&mut self.client, "25P03", "idle transaction timeout").await;
                        self.abandon(server, &x.progress, &x.up, &seen).await;
                        return After::Stop;
                    }
                }
            } else if let Some(since) = query_since.filter(|_| !query_limit.is_zero()) {
                match tokio::time::timeout_at(since + query_limit, step).await {
                    Ok(ev) => ev,
                    Err(_) => {
                        // As PgBouncer: the query is cancelled, its server closed,
                        // and the client told why.
                        tracing::warn!(peer = %self.peer, ?server, "query_timeout");
                        PoolTotals::add(&self.pool.totals.errors, 1);
                        tokio::spawn(cancel::forward(BackendKey {
                            address: server.address.clone(),
                            pid: server.backend_pid,
                            secret: server.backend_secret,
                        }));
                        fatal(&mut self.client, "08P01", "query_timeout").await;
                        return After::Stop;
                    }
                }
            } else {
                step.await
            };
            match event {
                Event::ClientData => {}
                Event::ServerData => {
                    let mut state = ServerState {
                        params: &mut server.params,
                        prepared: &mut server.prepared,
                        tracker: &mut tracker,
                    };
                    let idle = match relay::scan_server(
                        &mut server.buf,
                        &mut x.down,
                        &mut x.progress,
                        &mut state,
                        &mut self.wanted,
                    ) {
                        Ok(idle) => {
                            relay::forget_failed_parses(&mut tracker, &mut self.stmts);
                            x.clock.answered(x.progress.inflight, &x.pool.metrics);
                            idle
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, ?server, "protocol error from server");
                            PoolTotals::add(&x.pool.totals.errors, 1);
                            fatal(&mut self.client, "08P01", "server conn crashed?").await;
                            return After::Stop;
                        }
                    };
                    if idle
                        && x.progress.tx == b'I'
                        && x.progress.at_rest(&x.up)
                        && self.mode() != PoolMode::Session
                    {
                        return self.finish(server, &mut x.down, &seen).await;
                    }
                    if idle && x.progress.tx != b'I' && self.mode() == PoolMode::Statement {
                        // PgBouncer refuses multi-statement transactions here.
                        let _ = self.client.write_all(&server.buf[..x.down.ready]).await;
                        fatal(
                            &mut self.client,
                            "08P01",
                            "transaction blocks not allowed in statement pooling mode",
                        )
                        .await;
                        server.buf.advance(x.down.ready);
                        self.abandon(server, &x.progress, &x.up, &seen).await;
                        return After::Stop;
                    }
                }
                Event::ClientGone(e) => {
                    tracing::debug!(peer = %self.peer, error = %e, "client connection lost");
                    self.abandon(server, &x.progress, &x.up, &seen).await;
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
                    let _ = self.client.write_all(&server.buf[..x.down.ready]).await;
                    fatal(&mut self.client, "08P01", "server conn crashed?").await;
                    return After::Stop;
                }
            }
        }
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
        match server.exec(&sql).await {
            Ok(_) => {
                server.params.after_sync(&mut self.wanted, &changed);
                Ok(())
            }
            Err(ExecError::Server(e)) => {
                fatal(&mut self.client, &e.code, &e.message).await;
                Err(After::Stop)
            }
            Err(e) => {
                tracing::warn!(error = %e, "server failed while applying session parameters");
                fatal(&mut self.client, "08P01", "server conn crashed?").await;
                Err(After::Stop)
            }
        }
    }

    /// The transaction ended: pass the last bytes on and return the server.
    async fn finish(&mut self, mut server: ServerConn, down: &mut Dir, seen: &Seen) -> After {
        let result = self.client.write_all(&server.buf[..down.ready]).await;
        down.sent += down.ready as u64;
        server.buf.advance(down.ready);
        server.buf.clear();
        if self.settle(&mut server, seen).await {
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
    async fn terminated(&mut self, mut server: ServerConn, x: &mut Xact, seen: &Seen) {
        if x.up.ready > 0 {
            let sent = tokio::time::timeout(
                CLEANUP_TIMEOUT,
                server.stream.write_all(&self.cbuf[..x.up.ready]),
            )
            .await;
            if !matches!(sent, Ok(Ok(()))) {
                return;
            }
            x.up.sent += x.up.ready as u64;
            self.cbuf.advance(x.up.ready);
            x.up.ready = 0;
        }
        self.abandon(server, &x.progress, &x.up, seen).await;
    }

    /// The client is leaving (or broke the protocol) while it holds `server`:
    /// keep the server only if it can be brought back to a clean idle state.
    async fn abandon(
        &mut self,
        mut server: ServerConn,
        progress: &Progress,
        up: &Dir,
        seen: &Seen,
    ) {
        if !progress.at_rest(up) {
            tracing::debug!(?server, "client left mid-query; closing server connection");
            return;
        }
        server.buf.clear();
        if progress.tx != b'I' {
            match tokio::time::timeout(CLEANUP_TIMEOUT, server.exec("ROLLBACK")).await {
                Ok(Ok(b'I')) => {}
                _ => return,
            }
        }
        if self.settle(&mut server, seen).await {
            self.release(server, true).await;
        }
    }

    /// After a transaction in transaction/statement mode: remember the
    /// session parameters the client set, and clean state the next client
    /// must not inherit. Returns false if the server must be closed instead.
    async fn settle(&mut self, server: &mut ServerConn, seen: &Seen) -> bool {
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
                Ok(Ok(b'I')) => {}
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
    fn changed_params(&self, server: &ServerConn, seen: &Seen) -> Vec<String> {
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
    async fn release(&mut self, mut server: ServerConn, session_end: bool) {
        let general = &self.cluster.config.general;
        let wants_reset = !general.server_reset_query.is_empty()
            && ((self.mode() == PoolMode::Session && session_end)
                || general.server_reset_query_always);
        if wants_reset {
            let reset = general.server_reset_query.clone();
            match tokio::time::timeout(CLEANUP_TIMEOUT, server.exec(&reset)).await {
                Ok(Ok(b'I')) => {}
                _ => return,
            }
        }
        self.pool.checkin(server);
    }
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

/// What a transaction whose SQL Weir could not read left on `server`, asked of the server
/// itself: every parameter set at session level (`pg_settings.source = 'session'`), SQL
/// prepared statements, LISTEN channels, session advisory locks, holdable cursors and
/// temporary tables, and whether Weir's own prepared statements are still all there. The
/// result adds to `seen` so the usual clean-up follows. `None`: the server failed.
async fn inspect(server: &mut ServerConn, seen: &Seen) -> Option<Seen> {
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
