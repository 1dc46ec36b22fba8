//! A pool of server connections for one (database, user).
//!
//! At most `pool_size` connections, plus `reserve_pool_size` more once a client
//! has waited `reserve_pool_timeout`. Clients wait in FIFO order; a waiter that
//! gives up (timeout, disconnect) removes itself. Every hand-off happens under
//! the pool's short mutex, and nothing is dropped or awaited while it is held.

use super::cap::{self, Cap, Permits};
use super::conn::{ConnectError, ServerConn, Target};
use super::login::{Credentials, LoginError};
use super::params::ParamSet;
use super::queue::{Counts, Grant, Limits, Pooled, Queue, Start};
use crate::config::secret::Secret;
use crate::config::PoolMode;
use crate::logging::Who;
use crate::metrics::{PoolLabels, PoolMetrics};
use crate::stats::{PoolTotals, Registry, ServerInfo};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::Notify;

/// How often a pool whose server cannot be reached checks whether it is back.
const PROBE_INTERVAL: Duration = Duration::from_millis(250);

/// The fixed settings of one pool; two pools with equal settings are
/// interchangeable, which is how reload keeps connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSettings {
    pub database: String,
    pub user: String,
    pub target: Target,
    pub creds: Credentials,
    pub mode: PoolMode,
    pub pool_size: usize,
    pub reserve_size: usize,
    pub min_pool_size: usize,
    pub reserve_timeout: Duration,
    pub query_wait_timeout: Duration,
    pub server_lifetime: Duration,
    pub server_idle_timeout: Duration,
    /// An idle server unused this long runs `check_query` before it is lent again
    /// (server_check_delay / server_check_query; empty: an empty query).
    pub check_delay: Duration,
    pub check_query: String,
    /// server_login_retry: after a failed connection attempt, a waiting client tries
    /// again this much later, and new clients are turned away meanwhile (as PgBouncer).
    pub login_retry: Duration,
    /// For sharded databases: the shard, and the replica (`None` = primary).
    pub shard: Option<usize>,
    pub replica: Option<usize>,
}

/// The settings a reload changes in place; the rest name the pool (a change there
/// retires it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    pub min_pool_size: usize,
    pub server_lifetime: Duration,
    pub server_idle_timeout: Duration,
    pub login_retry: Duration,
}

impl PoolSettings {
    fn limits(&self) -> Limits {
        Limits {
            pool_size: self.pool_size,
            reserve_size: self.reserve_size,
            reserve_timeout: self.reserve_timeout,
            wait_timeout: self.query_wait_timeout,
        }
    }

    fn tuning(&self) -> Tuning {
        Tuning {
            min_pool_size: self.min_pool_size,
            server_lifetime: self.server_lifetime,
            server_idle_timeout: self.server_idle_timeout,
            login_retry: self.login_retry,
        }
    }

    /// True when `other` differs at most in what [`Pool::retune`] changes in place.
    pub fn same_pool(&self, other: &PoolSettings) -> bool {
        let mut o = other.clone();
        o.pool_size = self.pool_size;
        o.reserve_size = self.reserve_size;
        o.reserve_timeout = self.reserve_timeout;
        o.query_wait_timeout = self.query_wait_timeout;
        o.min_pool_size = self.min_pool_size;
        o.server_lifetime = self.server_lifetime;
        o.server_idle_timeout = self.server_idle_timeout;
        o.login_retry = self.login_retry;
        &o == self
    }

    /// The labels of this pool's metric series.
    pub fn labels(&self) -> PoolLabels {
        PoolLabels {
            database: self.database.clone(),
            user: self.user.clone(),
            shard: self.shard.unwrap_or(0),
            replica: self.replica.is_some(),
        }
    }
}

#[derive(Debug, Error)]
pub enum CheckoutError {
    #[error("query_wait_timeout")]
    WaitTimeout,
    /// query_timeout passed while the client waited for a server (PgBouncer counts the
    /// wait in the query's time).
    #[error("query_timeout")]
    QueryTimeout,
    /// SHUTDOWN WAIT_FOR_SERVERS while the client waited.
    #[error("server shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The pool's last connection attempt failed less than server_login_retry ago and it
    /// has no server: PgBouncer's fast fail, with the cached reason.
    #[error("server login has been failing, cached error: {0} (server_login_retry)")]
    LoginFailing(String),
}

pub struct Pool {
    pub settings: PoolSettings,
    /// The client user whose login created the pool (settings derive from it).
    pub client_user: String,
    queue: Queue<ServerConn>,
    tuning: Mutex<Tuning>,
    /// max_db_connections and max_user_connections this pool counts against.
    caps: Vec<Arc<Cap>>,
    scram_key: Mutex<Option<[u8; 32]>>,
    /// A secret `auth_query` found, for users no config or auth file lists.
    looked_up: Mutex<Option<Secret>>,
    defaults: Mutex<Option<ParamSet>>,
    retired: AtomicBool,
    /// PAUSE: checkouts wait until RESUME.
    paused: AtomicBool,
    resumed: Notify,
    /// Bumped by RECONNECT: older connections are closed when returned.
    epoch: AtomicU64,
    /// Fired by RECONNECT and retirement (server_fast_close sessions watch it).
    changed: Notify,
    /// The last connection attempt failed in a way a retry may cure (refused, timed out,
    /// closed during login): when, and PgBouncer's reason. Cleared by a successful one.
    connect_failure: Mutex<Option<(Instant, String)>>,
    failing: AtomicBool,
    /// With a host list: the next host (round-robin) or the one that last worked.
    next_host: std::sync::atomic::AtomicUsize,
    /// Held while a `load_balance_hosts = disable` pool opens a connection.
    host_lock: tokio::sync::Mutex<()>,
    /// A probe task is watching for the server to accept connections again.
    probing: AtomicBool,
    /// Fired when a connection attempt succeeds or the server looks back up (clients waiting
    /// to retry try at once), and when a server goes idle while attempts fail.
    reconnected: Notify,
    /// pool_idle_timeout: when the pool was first seen with no client and no server
    /// (microseconds since the epoch; 0 = in use).
    pub unused_since: AtomicU64,
    pub totals: PoolTotals,
    /// Prometheus handles for this pool (see `crate::metrics`).
    pub metrics: PoolMetrics,
    pub servers: Registry<ServerInfo>,
}

/// The right to one server connection in a pool. Dropping it frees the slot
/// for the next waiter (or shrinks the pool).
pub struct Slot {
    pool: Weak<Pool>,
    /// The connection using this slot, once open (for SHOW SERVERS).
    server: Option<u64>,
    /// Its places under max_db_connections / max_user_connections.
    permits: Permits,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.upgrade() {
            if let Some(id) = self.server {
                pool.servers.remove(id);
            }
            pool.queue.release_slot();
        }
    }
}

impl Pooled for ServerConn {
    type Failure = crate::wire::ErrorFields;
    fn is_alive(&self) -> bool {
        ServerConn::is_alive(self)
    }
}

/// Snapshot of a pool for SHOW POOLS and metrics.
pub type PoolCounts = Counts;

impl Drop for Pool {
    fn drop(&mut self) {
        // A sampler copies the totals into the metrics; the last ones go now.
        self.metrics.export(&self.totals);
    }
}

impl Pool {
    pub fn new(settings: PoolSettings, client_user: &str, caps: Vec<Arc<Cap>>) -> Arc<Pool> {
        let metrics = PoolMetrics::new(settings.labels());
        let pool = Arc::new(Pool {
            queue: Queue::new(settings.limits()),
            tuning: Mutex::new(settings.tuning()),
            caps,
            settings,
            client_user: client_user.to_string(),
            scram_key: Mutex::new(None),
            looked_up: Mutex::new(None),
            defaults: Mutex::new(None),
            retired: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            resumed: Notify::new(),
            epoch: AtomicU64::new(0),
            changed: Notify::new(),
            connect_failure: Mutex::new(None),
            failing: AtomicBool::new(false),
            next_host: std::sync::atomic::AtomicUsize::new(0),
            host_lock: tokio::sync::Mutex::new(()),
            probing: AtomicBool::new(false),
            reconnected: Notify::new(),
            unused_since: AtomicU64::new(0),
            totals: PoolTotals::default(),
            metrics,
            servers: Registry::default(),
        });
        for cap in &pool.caps {
            cap.join(&pool);
        }
        tokio::spawn(super::maintenance::run(
            Arc::downgrade(&pool),
            pool.queue.sweep_signal(),
        ));
        pool
    }

    /// An idle connection to close so another pool under a shared cap may open one.
    pub(super) fn take_one_idle(&self) -> Option<ServerConn> {
        self.queue.take_one_idle()
    }

    /// True when every cap this pool is under has room for one more connection.
    fn caps_have_room(&self) -> bool {
        self.caps.iter().all(|c| c.has_room())
    }

    pub fn counts(&self) -> PoolCounts {
        self.queue.counts()
    }

    /// Applies a reload's new sizes, timeouts and lifetimes to this pool in place (see
    /// [`PoolSettings::same_pool`]): its connections and waiting clients carry on.
    pub fn retune(&self, new: &PoolSettings) {
        *self.tuning.lock() = new.tuning();
        self.queue.set_limits(new.limits());
    }

    pub fn tuning(&self) -> Tuning {
        *self.tuning.lock()
    }

    /// The lending queue, for the housekeeping task's sweep.
    pub(super) fn queue(&self) -> &Queue<ServerConn> {
        &self.queue
    }

    /// Marks the pool as replaced by a reload: returned connections are closed.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        self.mark_close_needed();
        drop(self.queue.take_idle());
        self.changed.notify_waiters();
    }

    /// PAUSE: new checkouts wait until [`Pool::resume`].
    pub fn pause(&self) {
        self.paused.store(true, Ordering::Release);
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::Release);
        self.resumed.notify_waiters();
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// Servers currently lent to clients.
    pub fn active(&self) -> usize {
        let c = self.queue.counts();
        c.total.saturating_sub(c.idle)
    }

    /// RECONNECT: close idle connections now and the lent ones when returned.
    pub fn reconnect(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.mark_close_needed();
        drop(self.queue.take_idle());
        self.changed.notify_waiters();
    }

    /// Resolves at the next RECONNECT or retirement; create it before checking
    /// [`Pool::is_stale`] so no change is missed.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// True when `conn` must close rather than serve again (RECONNECT, reload).
    pub fn is_stale(&self, conn: &ServerConn) -> bool {
        self.is_retired() || conn.epoch != self.epoch.load(Ordering::Acquire)
    }

    /// Flags every open connection for SHOW SERVERS' close_needed.
    fn mark_close_needed(&self) {
        for info in self.servers.snapshot() {
            info.close_needed.store(true, Ordering::Relaxed);
        }
    }

    /// Connections opened before the last RECONNECT (or retirement) that are
    /// still open.
    pub fn old_connections(&self) -> usize {
        self.servers
            .snapshot()
            .iter()
            .filter(|s| s.close_needed.load(Ordering::Relaxed))
            .count()
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// Remembers the ClientKey of a client that logged in with SCRAM, for
    /// pass-through when only a verifier is known.
    pub fn set_scram_key(&self, key: [u8; 32]) {
        *self.scram_key.lock() = Some(key);
    }

    /// Remembers the secret `auth_query` returned for this pool's user.
    pub fn set_looked_up_secret(&self, secret: Secret) {
        *self.looked_up.lock() = Some(secret);
    }

    /// Parameters of a fresh server connection, learned from the first one.
    pub fn defaults(&self) -> Option<ParamSet> {
        self.defaults.lock().clone()
    }

    /// Lends a server connection, waiting in line if the pool is full. A
    /// failure counts as a pooler error in the pool's totals.
    pub async fn checkout(self: &Arc<Self>) -> Result<ServerConn, CheckoutError> {
        let result = self.wait_for_server().await;
        if result.is_err() {
            PoolTotals::add(&self.totals.errors, 1);
        }
        result
    }

    async fn wait_for_server(self: &Arc<Self>) -> Result<ServerConn, CheckoutError> {
        let start = Instant::now();
        while self.paused.load(Ordering::Acquire) {
            let resumed = self.resumed.notified();
            if !self.paused.load(Ordering::Acquire) {
                break;
            }
            resumed.await;
        }
        if let Some(reason) = self.login_failing() {
            return Err(CheckoutError::LoginFailing(reason));
        }
        let grant = match self.queue.start(start) {
            Start::Idle(conn) => Grant::Conn(conn),
            Start::Open => Grant::Slot,
            Start::Wait(ticket) => ticket.wait().await,
        };
        self.take(grant, start).await
    }

    /// server_check_delay: a server idle at least that long must answer `check_query`
    /// before it is lent (a connection a firewall dropped fails here, not in a client's
    /// transaction). True when it may be lent.
    async fn passes_check(&self, conn: &mut ServerConn) -> bool {
        let s = &self.settings;
        if conn.last_used.elapsed() < s.check_delay {
            return true;
        }
        let check = tokio::time::timeout(s.target.connect_timeout, conn.exec(&s.check_query));
        match check.await {
            Ok(Ok(crate::wire::TxStatus::Idle)) => true,
            _ => {
                self.log_closing(conn, "server check query failed");
                false
            }
        }
    }

    fn new_slot(self: &Arc<Self>) -> Slot {
        Slot {
            pool: Arc::downgrade(self),
            server: None,
            permits: Permits::default(),
        }
    }

    async fn take(
        self: &Arc<Self>,
        grant: Grant<ServerConn>,
        start: Instant,
    ) -> Result<ServerConn, CheckoutError> {
        match grant {
            Grant::Conn(mut conn) => {
                if conn.is_alive() && self.passes_check(&mut conn).await {
                    self.record_wait(start);
                    conn.last_used = Instant::now();
                    return Ok(conn);
                }
                // A dead connection: keep its slot and open a fresh one with it.
                let mut slot = conn.slot.take().unwrap_or_else(|| self.new_slot());
                // The slot outlives its dead connection: unlist that one.
                if let Some(id) = slot.server.take() {
                    self.servers.remove(id);
                }
                drop(conn);
                self.open(slot, start).await
            }
            Grant::Slot => {
                let limits = self.queue.limits();
                if start.elapsed() >= limits.reserve_timeout
                    && self.queue.counts().total > limits.pool_size
                {
                    tracing::warn!(
                        "{} taking connection from reserve_pool",
                        Who::client(0, &self.settings.database, &self.settings.user, "")
                    );
                }
                self.open(self.new_slot(), start).await
            }
            Grant::TimedOut => Err(CheckoutError::WaitTimeout),
            Grant::Failed(f) => Err(CheckoutError::Connect(ConnectError::Login(
                LoginError::Server(f),
            ))),
        }
    }

    /// A server connection for one client's whole session (a replication connection):
    /// opened with `extra` startup parameters on top of the pool's own, it takes a slot of
    /// the pool (closing an idle connection to free one, as PgBouncer evicts) and is never
    /// lent again: dropping it closes it and frees the slot.
    pub async fn open_dedicated(
        self: &Arc<Self>,
        extra: &[(String, String)],
    ) -> Result<ServerConn, CheckoutError> {
        let start = Instant::now();
        let grant = match self.queue.start(start) {
            Start::Idle(conn) => Grant::Conn(conn),
            Start::Open => Grant::Slot,
            Start::Wait(ticket) => ticket.wait().await,
        };
        let slot = match grant {
            Grant::Conn(mut conn) => {
                self.log_closing(&conn, "evicted");
                let mut slot = conn.slot.take().unwrap_or_else(|| self.new_slot());
                if let Some(id) = slot.server.take() {
                    self.servers.remove(id);
                }
                drop(conn);
                slot
            }
            Grant::Slot => self.new_slot(),
            Grant::TimedOut => {
                PoolTotals::add(&self.totals.errors, 1);
                return Err(CheckoutError::WaitTimeout);
            }
            Grant::Failed(f) => {
                PoolTotals::add(&self.totals.errors, 1);
                return Err(CheckoutError::Connect(ConnectError::Login(
                    LoginError::Server(f),
                )));
            }
        };
        let mut target = self.settings.target.clone();
        for (k, v) in extra {
            target.params.retain(|(name, _)| name != k);
            target.params.push((k.clone(), v.clone()));
        }
        self.open_to(&target, slot, start).await
    }

    async fn open(
        self: &Arc<Self>,
        slot: Slot,
        start: Instant,
    ) -> Result<ServerConn, CheckoutError> {
        self.open_to(&self.settings.target, slot, start).await
    }

    async fn open_to(
        self: &Arc<Self>,
        target: &Target,
        slot: Slot,
        start: Instant,
    ) -> Result<ServerConn, CheckoutError> {
        let mut slot = slot;
        if slot.permits.is_empty() && !self.caps.is_empty() {
            let wait = self.queue.limits().wait_timeout;
            let deadline = (!wait.is_zero()).then(|| tokio::time::Instant::from_std(start + wait));
            match cap::acquire(&self.caps, deadline).await {
                Some(p) => slot.permits = p,
                None => {
                    PoolTotals::add(&self.totals.errors, 1);
                    return Err(CheckoutError::WaitTimeout);
                }
            }
        }
        let creds = self.credentials();
        let dedicated = !std::ptr::eq(target, &self.settings.target);
        loop {
            let e = match self.connect_any(target, &creds, start, dedicated).await {
                Ok(conn) => {
                    self.recovered();
                    return Ok(self.adopt(conn, slot, start, dedicated));
                }
                Err((e, address)) => {
                    self.log_connect_failure(&e, start, dedicated, &address);
                    e
                }
            };
            // A shard's pool fails at once instead: a replica read then moves to the
            // primary (the replica is banned), and a write names the server that is down.
            if !dedicated && self.settings.shard.is_none() && e.is_transient() {
                // As PgBouncer: the client keeps waiting and the pool tries again after
                // server_login_retry (sooner if another attempt gets through), until the
                // client's query_wait_timeout.
                let now = Instant::now();
                *self.connect_failure.lock() = Some((now, e.log_reason()));
                self.failing.store(true, Ordering::Release);
                self.start_probe();
                let retry_at = now + self.tuning().login_retry;
                let wait = self.queue.limits().wait_timeout;
                let deadline = (!wait.is_zero()).then(|| start + wait);
                let until = deadline.map_or(retry_at, |d| d.min(retry_at));
                let woken = self.reconnected.notified();
                tokio::select! {
                    _ = tokio::time::sleep_until(until.into()) => {}
                    _ = woken => {}
                }
                // A server another client returned meanwhile serves this one.
                if let Some(conn) = self.queue.take_one_idle().filter(|c| c.is_alive()) {
                    drop(slot);
                    self.record_wait(start);
                    return Ok(conn);
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(CheckoutError::WaitTimeout);
                }
                continue;
            }
            if let ConnectError::Login(LoginError::Server(f)) = &e {
                // As PgBouncer: the next login would fail the same way, so clients waiting
                // for this pool get the server's error now, unless a usable connection
                // remains or the server is only starting up (57P03).
                let usable = self
                    .servers
                    .snapshot()
                    .iter()
                    .any(|s| !s.close_needed.load(Ordering::Relaxed));
                if !dedicated && !usable && f.code != "57P03" {
                    self.queue.fail_waiters(f);
                }
            }
            // Freed after the waiters were turned away: none of them reuses the slot.
            drop(slot);
            return Err(e.into());
        }
    }

    /// Opens one connection: to `target`'s host, or with a host list to the next host
    /// (round-robin) or the one that last worked (`disable`), going on to the following
    /// hosts while one refuses, ignores or cannot be resolved (each failure logged). The
    /// error is the last host's, with its address.
    async fn connect_any(
        &self,
        target: &Target,
        creds: &Credentials,
        start: Instant,
        dedicated: bool,
    ) -> Result<ServerConn, (ConnectError, crate::config::Address)> {
        let n = target.hosts.len();
        if n < 2 {
            PoolTotals::add(&self.totals.server_connects, 1);
            return ServerConn::connect(target, creds)
                .await
                .map_err(|e| (e, target.address.clone()));
        }
        // `disable`: one attempt at a time (as PgBouncer opens them), so a host that fails
        // is tried once and the next attempt starts from the host that worked.
        let _one_at_a_time = if target.round_robin {
            None
        } else {
            Some(self.host_lock.lock().await)
        };
        let first = if target.round_robin {
            self.next_host.fetch_add(1, Ordering::Relaxed)
        } else {
            self.next_host.load(Ordering::Relaxed)
        };
        let mut last = (ConnectError::Timeout, target.address.clone());
        for i in 0..n {
            let at = (first + i) % n;
            let mut one = target.clone();
            one.address = target.hosts[at].clone();
            PoolTotals::add(&self.totals.server_connects, 1);
            match ServerConn::connect(&one, creds).await {
                Ok(conn) => {
                    if !target.round_robin {
                        self.next_host.store(at, Ordering::Relaxed);
                    }
                    return Ok(conn);
                }
                Err(e) if e.is_transient() && i + 1 < n => {
                    self.log_connect_failure(&e, start, dedicated, &one.address);
                }
                Err(e) => {
                    last = (e, one.address);
                    break;
                }
            }
        }
        Err(last)
    }

    /// The server took a connection: new clients are no longer turned away and clients
    /// waiting to retry try at once.
    fn recovered(&self) {
        if self.failing.swap(false, Ordering::AcqRel) {
            self.connect_failure.lock().take();
        }
        self.reconnected.notify_waiters();
    }

    /// While connection attempts fail, checks every [`PROBE_INTERVAL`] with a bare TCP
    /// connect (no login) whether the server is back, so a restarted server ends the
    /// fast-fail window and the retry wait at once rather than after server_login_retry.
    fn start_probe(self: &Arc<Self>) {
        if self.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let pool = Arc::downgrade(self);
        let address = self.settings.target.address.clone();
        let limit = self.settings.target.connect_timeout.max(PROBE_INTERVAL);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROBE_INTERVAL).await;
                match pool.upgrade() {
                    Some(p) if p.failing.load(Ordering::Acquire) && !p.is_retired() => {}
                    Some(p) => {
                        p.probing.store(false, Ordering::Release);
                        // A failure recorded just now found the flag still set: keep going.
                        if p.failing.load(Ordering::Acquire)
                            && !p.is_retired()
                            && !p.probing.swap(true, Ordering::AcqRel)
                        {
                            continue;
                        }
                        return;
                    }
                    None => return,
                }
                let connect = super::conn::dial(&address);
                if let Ok(Ok(_)) = tokio::time::timeout(limit, connect).await {
                    if let Some(p) = pool.upgrade() {
                        p.recovered();
                    }
                }
            }
        });
    }

    /// PgBouncer's fast fail: the last connection attempt failed less than
    /// server_login_retry ago and the pool has no server, so a new client is turned away
    /// at once with the cached reason rather than queued behind a server that is down.
    fn login_failing(&self) -> Option<String> {
        if !self.failing.load(Ordering::Acquire) {
            return None;
        }
        let failure = self.connect_failure.lock();
        let (at, reason) = failure.as_ref()?;
        if at.elapsed() >= self.tuning().login_retry || !self.servers.snapshot().is_empty() {
            return None;
        }
        Some(reason.clone())
    }

    /// Registers a freshly opened connection in its slot, SHOW SERVERS and the log.
    fn adopt(
        &self,
        mut conn: ServerConn,
        mut slot: Slot,
        start: Instant,
        dedicated: bool,
    ) -> ServerConn {
        slot.server = Some(conn.id.0);
        conn.epoch = self.epoch.load(Ordering::Acquire);
        let local_port = conn
            .stream
            .tcp()
            .and_then(|t| t.local_addr().ok())
            .map_or(0, |a| a.port());
        let info = Arc::new(ServerInfo::new(
            conn.id.0,
            &self.settings.database,
            &self.settings.user,
            &conn.address.host,
            conn.address.port,
            local_port,
            conn.backend_pid,
        ));
        self.servers.insert(conn.id.0, info.clone());
        conn.info = Some(info);
        conn.slot = Some(slot);
        if !dedicated {
            self.defaults
                .lock()
                .get_or_insert_with(|| conn.params.clone());
        }
        self.record_wait(start);
        if crate::logging::log_connections() {
            let from = conn
                .stream
                .tcp()
                .and_then(|t| t.local_addr().ok())
                .map_or_else(|| "unix socket".to_string(), |a| a.to_string());
            tracing::info!("{} new connection to server (from {from})", self.who(&conn));
        }
        conn
    }

    /// Logs a failed connection attempt in PgBouncer's words.
    fn log_connect_failure(
        &self,
        e: &ConnectError,
        start: Instant,
        dedicated: bool,
        address: &crate::config::Address,
    ) {
        let who = Who::server(
            0,
            &self.settings.database,
            &self.settings.user,
            &address.to_string(),
        );
        // As PgBouncer: a replication login's failure is the server's error in the
        // log and plain "login failed" as the reason (it does not fail the pool).
        if let ConnectError::Login(LoginError::Server(f)) = e {
            if !dedicated {
                tracing::warn!("{who} server login failed: {} {}", f.severity, f.message);
            }
        }
        let reason = if dedicated {
            tracing::warn!("{who} S: login failed: {e}");
            "login failed".to_string()
        } else {
            e.log_reason()
        };
        if crate::logging::log_disconnections() {
            crate::logging::closing(&who, &reason, start.elapsed().as_secs());
        }
        tracing::warn!(db = %self.settings.database, user = %self.settings.user, error = %e, "server connection failed");
    }

    /// A server connection of this pool in PgBouncer's log prefix.
    /// Logs PgBouncer's `closing because: <reason>` line for one of this pool's servers
    /// (when log_disconnections is on).
    pub fn log_closing(&self, conn: &ServerConn, reason: &str) {
        if crate::logging::log_disconnections() {
            let age = conn.created.elapsed().as_secs();
            crate::logging::closing(&self.who(conn), reason, age);
        }
    }

    pub fn who(&self, conn: &ServerConn) -> Who {
        Who::server(
            conn.id.0,
            &self.settings.database,
            &self.settings.user,
            &conn.address.to_string(),
        )
    }

    /// A connection outside the pool's slots, with the pool's target and credentials: for
    /// Weir's own monitoring (WAL sampling, two-phase recovery), never lent to a client.
    pub async fn connect_unpooled(&self) -> Result<ServerConn, ConnectError> {
        ServerConn::connect(&self.settings.target, &self.credentials()).await
    }

    /// [`Pool::connect_unpooled`] with `extra` startup parameters (`replication=database`
    /// for resharding's logical replication).
    pub async fn connect_unpooled_with(
        &self,
        extra: &[(&str, &str)],
    ) -> Result<ServerConn, ConnectError> {
        let mut target = self.settings.target.clone();
        for (k, v) in extra {
            target.params.retain(|(name, _)| name != k);
            target.params.push((k.to_string(), v.to_string()));
        }
        ServerConn::connect(&target, &self.credentials()).await
    }

    /// Takes over what logins taught `other` (a SCRAM client key, an auth_query secret): a
    /// pool that replaces it logs in the same way before any client logs in again.
    pub fn inherit_auth(&self, other: &Pool) {
        if let Some(k) = *other.scram_key.lock() {
            self.set_scram_key(k);
        }
        if let Some(s) = other.looked_up.lock().clone() {
            self.set_looked_up_secret(s);
        }
    }

    /// The credentials this pool logs in with (Weir's own tools, e.g. pg_dump, use them).
    pub fn credentials(&self) -> Credentials {
        let mut creds = self.settings.creds.clone();
        creds.scram_client_key = *self.scram_key.lock();
        if creds.secret.is_none() {
            creds.secret = self.looked_up.lock().clone();
        }
        creds
    }

    fn record_wait(&self, start: Instant) {
        let us = start.elapsed().as_micros() as u64;
        PoolTotals::add(&self.totals.wait_count, 1);
        PoolTotals::add(&self.totals.wait_time_us, us);
        self.totals.max_wait_us.fetch_max(us, Ordering::Relaxed);
        self.metrics.client_waited(us);
    }

    /// Returns a clean connection (idle, outside any transaction).
    pub fn checkin(&self, mut conn: ServerConn) {
        conn.last_used = Instant::now();
        if let Some(info) = &conn.info {
            info.set_state(crate::stats::ServerState::Idle);
            info.client_pid.store(0, Ordering::Relaxed);
        }
        if self.is_retired()
            || conn.epoch != self.epoch.load(Ordering::Acquire)
            || conn.created.elapsed() >= self.tuning().server_lifetime
        {
            return; // dropping closes it and frees the slot
        }
        if self.queue.checkin(conn) {
            // Another pool under a full shared cap may be waiting to evict it.
            self.caps.iter().for_each(|c| c.idle_available());
            // So may a client of this pool waiting to retry a failed connection.
            if self.failing.load(Ordering::Relaxed) {
                self.reconnected.notify_waiters();
            }
        }
    }

    /// Takes idle connections past their lifetime or idle timeout (keeping
    /// `min_pool_size`), for the maintenance task to close outside the lock.
    pub(super) fn expire_idle(&self) -> Vec<ServerConn> {
        let now = Instant::now();
        let s = self.tuning();
        self.queue.take_idle_where(|c, total| {
            let too_old = now.duration_since(c.created) >= s.server_lifetime;
            let idle_long = !s.server_idle_timeout.is_zero()
                && now.duration_since(c.last_used) >= s.server_idle_timeout
                && total > s.min_pool_size;
            too_old || idle_long || !c.is_alive()
        })
    }

    /// Opens connections up to `min_pool_size` (only when nobody is waiting).
    pub(super) async fn fill_min(self: &Arc<Self>) {
        while self.caps_have_room() && self.queue.claim_spare(self.tuning().min_pool_size) {
            match self.open(self.new_slot(), Instant::now()).await {
                Ok(conn) => self.checkin(conn),
                Err(_) => return,
            }
        }
    }
}
