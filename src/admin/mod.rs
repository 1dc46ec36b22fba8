//! The admin console: the virtual `pgbouncer` / `weir` database answering
//! PgBouncer's SHOW and control commands over the simple query protocol.
//!
//! Each answer is what PgBouncer sends: RowDescription, DataRows and
//! CommandComplete `SHOW` (or the command's own tag), then ReadyForQuery;
//! errors are ERROR 08P01 with PgBouncer's wording. `stats_users` may only
//! SHOW; everything else needs `admin_users`.
//!
//! - `parse`: the console grammar
//! - `show`: SHOW renderers, plain functions of a state snapshot
//! - `snapshot`: that snapshot, copied from the live state
//! - `command`: control commands (PAUSE, KILL, RELOAD, SET, …)
//! - `settings`: SHOW CONFIG and what SET may change
//! - `stats`: per-database totals and stats-period averages
//! - `result`: result sets on the wire

pub mod command;
pub mod parse;
pub mod result;
pub mod settings;
pub mod show;
pub mod snapshot;
pub mod stats;

use crate::net::{read_message, Stream};
use crate::stats::now_us;
use crate::stats::PoolTotals;
use crate::wire::{self, build, TxStatus};
use crate::{App, Shutdown};
use bytes::{BufMut, BytesMut};
use command::AdminError;
use parse::{ParseError, Statement};
use result::ResultSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// How often a waiting PAUSE / WAIT_CLOSE looks at the pools again.
const WAIT_POLL: Duration = Duration::from_millis(20);

/// How often the stats sampler notes new and retired pools.
const SAMPLE_PERIOD: Duration = Duration::from_secs(1);

/// Names of the virtual admin database.
pub fn is_admin_db(name: &str) -> bool {
    name == "pgbouncer" || name == "weir"
}

/// What an authenticated console user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `admin_users`: everything.
    Admin,
    /// `stats_users`: read-only SHOW commands.
    Stats,
}

/// The console's process-wide state (in [`App`]).
pub struct State {
    pub stats: stats::StatsTracker,
    consoles: AtomicUsize,
    sampler: AtomicBool,
}

impl Default for State {
    fn default() -> Self {
        State {
            stats: stats::StatsTracker::new(now_us()),
            consoles: AtomicUsize::new(0),
            sampler: AtomicBool::new(false),
        }
    }
}

impl State {
    /// Open console connections.
    pub fn consoles(&self) -> usize {
        self.consoles.load(Ordering::Relaxed)
    }
}

/// Starts the stats sampler once (stats periods, pools retired by reloads).
/// Call inside the runtime; later calls do nothing.
pub fn start(app: &Arc<App>) {
    if tokio::runtime::Handle::try_current().is_err()
        || app.admin.sampler.swap(true, Ordering::AcqRel)
    {
        return;
    }
    let weak = Arc::downgrade(app);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut period_start = Instant::now();
        loop {
            tick.tick().await;
            let Some(app) = weak.upgrade() else { return };
            let cluster = app.cluster();
            let idle_timeout = cluster.config.general.pool_idle_timeout;
            if !idle_timeout.is_zero() {
                let clients = app.client_list.snapshot();
                cluster.cleanup_idle_pools(idle_timeout, |db, user| {
                    clients.iter().any(|c| c.database == db && c.user == user)
                });
            }
            let pools = cluster.pools();
            if period_start.elapsed() >= stats::STATS_PERIOD {
                period_start = Instant::now();
                app.admin.stats.rotate(&pools, now_us());
            } else {
                app.admin.stats.observe(&pools);
            }
        }
    });
}

/// Counts an open console for SHOW LISTS / DATABASES.
struct ConsoleCount(Arc<App>);

impl ConsoleCount {
    fn new(app: &Arc<App>) -> ConsoleCount {
        app.admin.consoles.fetch_add(1, Ordering::Relaxed);
        ConsoleCount(app.clone())
    }
}

impl Drop for ConsoleCount {
    fn drop(&mut self) {
        self.0.admin.consoles.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A console connection in SHOW CLIENTS (as PgBouncer lists them), counted against the client
/// limits at login and released here.
struct ConsoleClient {
    app: Arc<App>,
    id: u64,
}

impl ConsoleClient {
    fn new(app: &Arc<App>, id: u64, user: &str, peer: &str) -> ConsoleClient {
        let info = crate::stats::ClientInfo::new(id, user, snapshot::ADMIN_DB, peer, "", 0);
        info.set_state(crate::stats::ClientState::Active);
        app.client_list.insert(id, Arc::new(info));
        ConsoleClient {
            app: app.clone(),
            id,
        }
    }
}

impl Drop for ConsoleClient {
    fn drop(&mut self) {
        self.app.unlist_client(self.id);
    }
}

/// Serves one console connection after authentication succeeded; sends the
/// login reply (AuthenticationOk … ReadyForQuery) itself.
pub async fn serve(
    app: Arc<App>,
    stream: Stream,
    buf: BytesMut,
    user: String,
    role: Role,
    peer: &str,
    id: u64,
) {
    start(&app);
    let _count = ConsoleCount::new(&app);
    let _listed = ConsoleClient::new(&app, id, &user, peer);
    PoolTotals::add(&app.admin.stats.console.client_logins, 1);
    tracing::debug!(%user, ?role, "admin console login");
    let mut console = Console {
        app,
        stream,
        buf,
        role,
        user,
    };
    console.run().await;
}

/// What a statement produced.
enum Reply {
    Rows(ResultSet),
    /// CommandComplete with this tag, after these messages (notices).
    Done(BytesMut, String),
    /// SHUTDOWN: no answer; the process is going away.
    Hold,
    /// The client left while the command waited.
    Gone,
}

impl Reply {
    fn done(tag: &str) -> Result<Reply, AdminError> {
        Ok(Reply::Done(BytesMut::new(), tag.to_string()))
    }
}

struct Console {
    app: Arc<App>,
    stream: Stream,
    buf: BytesMut,
    role: Role,
    /// Who logged in (RESHARD runs as this user unless the database forces one).
    user: String,
}

impl Console {
    async fn run(&mut self) {
        if self.send(welcome()).await.is_err() {
            return;
        }
        let mut shutdown = self.app.shutdown.subscribe();
        loop {
            let msg = tokio::select! {
                m = read_message(&mut self.stream, &mut self.buf) => m,
                Ok(()) = shutdown.changed() => {
                    if *shutdown.borrow_and_update() == Shutdown::Immediate {
                        return;
                    }
                    continue;
                }
            };
            let Ok(Some(msg)) = msg else { return };
            match msg[0] {
                wire::tag::QUERY => {
                    let counters = &self.app.admin.stats.console;
                    PoolTotals::add(&counters.xact_count, 1);
                    PoolTotals::add(&counters.query_count, 1);
                    let sql = wire::cstr(wire::body(&msg), 0).map(|(s, _)| s.to_string());
                    let reply = match sql {
                        Some(sql) => self.query(&sql).await,
                        None => Err(AdminError::Syntax(String::new())),
                    };
                    if !self.answer(reply).await {
                        return;
                    }
                }
                wire::tag::TERMINATE => return,
                wire::tag::PARSE | wire::tag::BIND | wire::tag::EXECUTE => {
                    let _ = self
                        .send(error(
                            "extended query protocol not supported by admin console",
                        ))
                        .await;
                    return;
                }
                other => {
                    let text = format!(
                        "unsupported packet type for admin console: '{}'",
                        char::from(other)
                    );
                    let _ = self.send(error(&text)).await;
                    return;
                }
            }
        }
    }

    /// Sends a reply; false when the connection should end.
    async fn answer(&mut self, reply: Result<Reply, AdminError>) -> bool {
        let mut out = BytesMut::new();
        match reply {
            Ok(Reply::Rows(rs)) => rs.encode(&mut out),
            Ok(Reply::Done(pre, tag)) => {
                out.put(pre);
                out.put(build::command_complete(&tag));
            }
            Ok(Reply::Hold) => {
                // As PgBouncer: the connection stays open, unanswered, until
                // the process exits.
                while let Ok(Some(_)) = read_message(&mut self.stream, &mut self.buf).await {}
                return false;
            }
            Ok(Reply::Gone) => return false,
            Err(e) => {
                tracing::info!(error = %e, "admin console error");
                out.put(build::error("ERROR", e.sqlstate(), &e.to_string()));
            }
        }
        out.put(build::ready_for_query(TxStatus::Idle));
        self.send(out).await.is_ok()
    }

    async fn send(&mut self, out: BytesMut) -> std::io::Result<()> {
        self.stream.write_all(&out).await?;
        self.stream.flush().await
    }

    async fn query(&mut self, sql: &str) -> Result<Reply, AdminError> {
        match parse::parse(sql) {
            Err(ParseError::Syntax) => Err(AdminError::Syntax(sql.to_string())),
            Err(ParseError::TooLong) => Err(AdminError::BadArguments),
            Ok(Statement::Set { key, value }) => self.set(&key, &value),
            Ok(Statement::Reshard { source, target }) => {
                self.require_admin()?;
                crate::reshard::start(&self.app, &source, &target, &self.user)
                    .map_err(AdminError::Reshard)?;
                let notice = build::notice(
                    "NOTICE",
                    "00000",
                    &format!(
                        "RESHARD {source} TO {target} started; SHOW RESHARD shows its progress"
                    ),
                );
                Ok(Reply::Done(notice, "RESHARD".into()))
            }
            Ok(Statement::Command { command, arg }) => {
                self.command(&command, arg.as_deref(), sql).await
            }
        }
    }

    fn require_admin(&self) -> Result<(), AdminError> {
        match self.role {
            Role::Admin => Ok(()),
            Role::Stats => Err(AdminError::AccessDenied),
        }
    }

    fn set(&mut self, key: &str, value: &str) -> Result<Reply, AdminError> {
        // Drivers set these on connect; PgBouncer ignores them for anyone.
        if show::FAKE_PARAMS
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case(key))
        {
            let notice = build::notice("NOTICE", "00000", "SET ignored");
            return Ok(Reply::Done(notice, "SET".into()));
        }
        self.require_admin()?;
        command::set(&self.app, key, value)?;
        Reply::done(&format!("SET {key}={value}"))
    }

    async fn command(
        &mut self,
        command: &str,
        arg: Option<&str>,
        sql: &str,
    ) -> Result<Reply, AdminError> {
        let app = self.app.clone();
        let syntax = || AdminError::Syntax(sql.to_string());
        match command {
            "show" | "select" => return self.show(arg.ok_or_else(syntax)?, sql),
            "reload" | "suspend" if arg.is_some() => return Err(syntax()),
            "shutdown" => {
                let mode = match arg.map(str::to_ascii_lowercase).as_deref() {
                    None => Shutdown::Immediate,
                    Some("wait_for_servers") => Shutdown::Graceful,
                    Some("wait_for_clients") => Shutdown::WaitForClients,
                    Some(_) => return Err(syntax()),
                };
                self.require_admin()?;
                tracing::info!(?mode, "SHUTDOWN command issued");
                app.shutdown.send_replace(mode);
                return if mode == Shutdown::Immediate {
                    Ok(Reply::Hold)
                } else {
                    Reply::done("SHUTDOWN")
                };
            }
            "pause" | "resume" | "reload" | "suspend" | "kill" | "kill_client" | "reconnect"
            | "wait_close" | "enable" | "disable" => self.require_admin()?,
            "reshard" if arg.is_some_and(|a| a.eq_ignore_ascii_case("cancel")) => {
                self.require_admin()?;
                crate::reshard::cancel(&app).map_err(AdminError::Reshard)?;
                return Reply::done("RESHARD");
            }
            _ => return Err(syntax()),
        }
        match command {
            "pause" => {
                let db = command::pause(&app, arg)?;
                self.answer_when("PAUSE", || command::pause_done(&app, db.as_deref()))
                    .await
            }
            "wait_close" => {
                let db = command::wait_close(&app, arg)?;
                tracing::info!(
                    db = db.as_deref().unwrap_or("*"),
                    "WAIT_CLOSE command issued"
                );
                self.answer_when("WAIT_CLOSE", || command::close_done(&app, db.as_deref()))
                    .await
            }
            "resume" => command::resume(&app, arg).and_then(|_| Reply::done("RESUME")),
            "reload" => command::reload(&app).and_then(|_| Reply::done("RELOAD")),
            "suspend" => Err(AdminError::Unsupported("SUSPEND")),
            "kill" => command::kill(&app, arg).and_then(|_| Reply::done("KILL")),
            "kill_client" => {
                command::kill_client(&app, arg.unwrap_or_default())?;
                Reply::done("KILL_CLIENT")
            }
            "reconnect" => command::reconnect(&app, arg).and_then(|_| Reply::done("RECONNECT")),
            "enable" => command::enable(&app, arg).and_then(|_| Reply::done("ENABLE")),
            "disable" => command::disable(&app, arg).and_then(|_| Reply::done("DISABLE")),
            _ => Err(syntax()),
        }
    }

    fn show(&mut self, what: &str, sql: &str) -> Result<Reply, AdminError> {
        if what.eq_ignore_ascii_case("help") {
            let notice = build::notice_with_detail("00000", "Console usage", HELP);
            return Ok(Reply::Done(notice, "SHOW".into()));
        }
        if let Some(rs) = show::fake_param(what) {
            return Ok(Reply::Rows(rs));
        }
        let snapshot = show::Snapshot::take(&self.app);
        show::render(what, &snapshot)
            .map(Reply::Rows)
            .ok_or_else(|| AdminError::Syntax(sql.to_string()))
    }

    /// Answers `tag` once `done` holds, polling it (as PgBouncer, PAUSE and
    /// WAIT_CLOSE answer only then). If the client goes away first, there is
    /// no one to answer; bytes it sends meanwhile wait for after the answer.
    async fn answer_when(
        &mut self,
        tag: &str,
        mut done: impl FnMut() -> bool,
    ) -> Result<Reply, AdminError> {
        use tokio::io::AsyncReadExt;
        loop {
            if done() {
                return Reply::done(tag);
            }
            tokio::select! {
                _ = tokio::time::sleep(WAIT_POLL) => {}
                n = self.stream.read_buf(&mut self.buf) => match n {
                    Ok(0) | Err(_) => return Ok(Reply::Gone),
                    Ok(_) => {}
                },
            }
        }
    }
}

/// What SHOW HELP lists (NOTICE "Console usage", as PgBouncer).
const HELP: &str = "\n\
\tSHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION\n\
\tSHOW LISTS|MEM|STATE|PEERS|PEER_POOLS|DNS_HOSTS|DNS_ZONES\n\
\tSHOW STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS\n\
\tSHOW SHARDS|REPLICATION|RESHARD\n\
\tRESHARD <db> TO <db>\n\
\tRESHARD CANCEL\n\
\tSET key = arg\n\
\tRELOAD\n\
\tPAUSE [<db>]\n\
\tRESUME [<db>]\n\
\tDISABLE <db>\n\
\tENABLE <db>\n\
\tRECONNECT [<db>]\n\
\tKILL [<db>]\n\
\tKILL_CLIENT <client_id>\n\
\tSHUTDOWN\n\
\tSHUTDOWN WAIT_FOR_SERVERS\n\
\tWAIT_CLOSE [<db>]";

fn error(message: &str) -> BytesMut {
    build::error("ERROR", "08P01", message)
}

/// The login reply: AuthenticationOk, PgBouncer's console parameters, a
/// cancel key (not registered: there is nothing to cancel), ReadyForQuery.
fn welcome() -> BytesMut {
    let mut out = BytesMut::with_capacity(256);
    out.put(build::auth(0, &[]));
    let version = format!("{}/weir", env!("CARGO_PKG_VERSION"));
    for (name, value) in [
        ("server_version", version.as_str()),
        ("client_encoding", "UTF8"),
        ("server_encoding", "UTF8"),
        ("DateStyle", "ISO"),
        ("TimeZone", "GMT"),
        ("standard_conforming_strings", "on"),
        ("is_superuser", "on"),
    ] {
        out.put(build::parameter_status(name, value));
    }
    out.put(build::backend_key_data(rand::random(), rand::random()));
    out.put(build::ready_for_query(TxStatus::Idle));
    out
}
