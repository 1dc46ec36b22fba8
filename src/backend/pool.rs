//! A pool of server connections for one (database, user).
//!
//! At most `pool_size` connections, plus `reserve_pool_size` more once a client
//! has waited `reserve_pool_timeout`. Clients wait in FIFO order; a waiter that
//! gives up (timeout, disconnect) removes itself. Every hand-off happens under
//! the pool's short mutex, and nothing is dropped or awaited while it is held.

use super::conn::{ConnectError, ServerConn, Target};
use super::login::Credentials;
use super::params::ParamSet;
use crate::config::secret::Secret;
use crate::config::PoolMode;
use crate::metrics::PoolMetrics;
use crate::stats::{PoolTotals, Registry, ServerInfo};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::{oneshot, Notify};

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
    /// For sharded databases: the shard, and the replica (`None` = primary).
    pub shard: Option<usize>,
    pub replica: Option<usize>,
}

#[derive(Debug, Error)]
pub enum CheckoutError {
    #[error("query_wait_timeout")]
    WaitTimeout,
    #[error(transparent)]
    Connect(#[from] ConnectError),
}

pub struct Pool {
    pub settings: PoolSettings,
    /// The client user whose login created the pool (settings derive from it).
    pub client_user: String,
    state: Mutex<State>,
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
    pub totals: PoolTotals,
    /// Prometheus handles for this pool (see `crate::metrics`).
    pub metrics: PoolMetrics,
    pub servers: Registry<ServerInfo>,
}

#[derive(Default)]
struct State {
    /// Idle connections, most recently used last (LIFO, as PgBouncer's default).
    idle: Vec<ServerConn>,
    /// Connections that exist or are being opened (idle + lent + connecting).
    total: usize,
    /// Queued clients: waiter id, when its checkout began, where to hand over.
    waiters: VecDeque<(u64, Instant, oneshot::Sender<Handoff>)>,
    next_waiter: u64,
}

/// What a waiting client receives: a ready connection, or the right to open one.
#[allow(clippy::large_enum_variant)] // moved once per hand-off; boxing would allocate
enum Handoff {
    Conn(ServerConn),
    Slot(Slot),
}

/// The right to one server connection in a pool. Dropping it frees the slot
/// for the next waiter (or shrinks the pool).
pub struct Slot {
    pool: Weak<Pool>,
    /// The connection using this slot, once open (for SHOW SERVERS).
    server: Option<u64>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.upgrade() {
            if let Some(id) = self.server {
                pool.servers.remove(id);
            }
            pool.release_slot();
        }
    }
}

/// Snapshot of a pool for SHOW POOLS and metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct PoolCounts {
    pub idle: usize,
    pub total: usize,
    pub waiting: usize,
    /// How long the oldest queued client has waited (PgBouncer's maxwait).
    pub max_wait: Duration,
}

impl Drop for Pool {
    fn drop(&mut self) {
        // A sampler copies the totals into the metrics; the last ones go now.
        self.metrics.export(&self.totals);
    }
}

impl Pool {
    pub fn new(settings: PoolSettings, client_user: &str) -> Arc<Pool> {
        let metrics = PoolMetrics::new(&settings);
        let pool = Arc::new(Pool {
            settings,
            client_user: client_user.to_string(),
            state: Mutex::new(State::default()),
            scram_key: Mutex::new(None),
            looked_up: Mutex::new(None),
            defaults: Mutex::new(None),
            retired: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            resumed: Notify::new(),
            epoch: AtomicU64::new(0),
            totals: PoolTotals::default(),
            metrics,
            servers: Registry::default(),
        });
        tokio::spawn(super::maintenance::run(Arc::downgrade(&pool)));
        pool
    }

    pub fn counts(&self) -> PoolCounts {
        let st = self.state.lock();
        PoolCounts {
            idle: st.idle.len(),
            total: st.total,
            waiting: st.waiters.len(),
            max_wait: st
                .waiters
                .front()
                .map_or(Duration::ZERO, |(_, since, _)| since.elapsed()),
        }
    }

    /// Marks the pool as replaced by a reload: returned connections are closed.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        self.mark_close_needed();
        let idle = std::mem::take(&mut self.state.lock().idle);
        drop(idle);
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
        let st = self.state.lock();
        st.total.saturating_sub(st.idle.len())
    }

    /// RECONNECT: close idle connections now and the lent ones when returned.
    pub fn reconnect(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.mark_close_needed();
        let idle = std::mem::take(&mut self.state.lock().idle);
        drop(idle);
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
        #[allow(clippy::large_enum_variant)]
        enum First {
            Idle(ServerConn),
            Open,
            Wait(u64, oneshot::Receiver<Handoff>),
        }
        let mut dead = Vec::new();
        let first = {
            let mut st = self.state.lock();
            let mut found = None;
            while let Some(conn) = st.idle.pop() {
                if conn.is_alive() {
                    found = Some(conn);
                    break;
                }
                dead.push(conn);
            }
            if let Some(conn) = found {
                First::Idle(conn)
            } else if st.total < self.settings.pool_size {
                st.total += 1;
                First::Open
            } else {
                let id = st.next_waiter;
                st.next_waiter += 1;
                let (tx, rx) = oneshot::channel();
                st.waiters.push_back((id, start, tx));
                First::Wait(id, rx)
            }
        };
        drop(dead);
        let (id, rx) = match first {
            First::Idle(mut conn) => {
                self.record_wait(start);
                conn.last_used = Instant::now();
                return Ok(conn);
            }
            First::Open => return self.open(self.new_slot(), start).await,
            First::Wait(id, rx) => (id, rx),
        };
        let mut waiter = WaiterGuard {
            pool: self,
            id,
            rx,
            done: false,
        };
        let reserve_at = tokio::time::Instant::from_std(start + self.settings.reserve_timeout);
        let mut reserve_armed = self.settings.reserve_size > 0;
        let deadline = (!self.settings.query_wait_timeout.is_zero())
            .then(|| tokio::time::Instant::from_std(start + self.settings.query_wait_timeout));
        loop {
            tokio::select! {
                handoff = &mut waiter.rx => {
                    waiter.done = true;
                    return match handoff {
                        Ok(h) => self.take(h, start).await,
                        // The sender is only dropped with the pool itself.
                        Err(_) => Err(CheckoutError::WaitTimeout),
                    };
                }
                _ = tokio::time::sleep_until(reserve_at), if reserve_armed => {
                    reserve_armed = false;
                    if let Some(h) = self.try_reserve(id, &mut waiter.rx) {
                        waiter.done = true;
                        return self.take(h, start).await;
                    }
                }
                _ = sleep_until_opt(deadline) => {
                    waiter.done = true;
                    return match self.leave_queue(id, &mut waiter.rx) {
                        Some(h) => self.take(h, start).await,
                        None => Err(CheckoutError::WaitTimeout),
                    };
                }
            }
        }
    }

    fn new_slot(self: &Arc<Self>) -> Slot {
        Slot {
            pool: Arc::downgrade(self),
            server: None,
        }
    }

    async fn take(
        self: &Arc<Self>,
        h: Handoff,
        start: Instant,
    ) -> Result<ServerConn, CheckoutError> {
        match h {
            Handoff::Conn(mut conn) if conn.is_alive() => {
                self.record_wait(start);
                conn.last_used = Instant::now();
                Ok(conn)
            }
            Handoff::Conn(mut conn) => {
                // A dead connection: keep its slot and open a fresh one with it.
                let mut slot = conn.slot.take().unwrap_or_else(|| self.new_slot());
                // The slot outlives its dead connection: unlist that one.
                if let Some(id) = slot.server.take() {
                    self.servers.remove(id);
                }
                drop(conn);
                self.open(slot, start).await
            }
            Handoff::Slot(slot) => self.open(slot, start).await,
        }
    }

    /// Opens a reserve connection for waiter `id` if the reserve has room.
    fn try_reserve(
        self: &Arc<Self>,
        id: u64,
        rx: &mut oneshot::Receiver<Handoff>,
    ) -> Option<Handoff> {
        let mut st = self.state.lock();
        if st.total >= self.settings.pool_size + self.settings.reserve_size {
            return None;
        }
        st.waiters.retain(|(w, _, _)| *w != id);
        if let Ok(h) = rx.try_recv() {
            return Some(h);
        }
        st.total += 1;
        drop(st);
        tracing::info!(db = %self.settings.database, user = %self.settings.user, "opening reserve connection");
        Some(Handoff::Slot(self.new_slot()))
    }

    /// Removes waiter `id`; returns a hand-off that raced with the removal.
    fn leave_queue(&self, id: u64, rx: &mut oneshot::Receiver<Handoff>) -> Option<Handoff> {
        let mut st = self.state.lock();
        st.waiters.retain(|(w, _, _)| *w != id);
        drop(st);
        rx.try_recv().ok()
    }

    async fn open(
        self: &Arc<Self>,
        slot: Slot,
        start: Instant,
    ) -> Result<ServerConn, CheckoutError> {
        let creds = self.credentials();
        PoolTotals::add(&self.totals.server_connects, 1);
        let result = ServerConn::connect(&self.settings.target, &creds).await;
        match result {
            Ok(mut conn) => {
                let mut slot = slot;
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
                self.defaults
                    .lock()
                    .get_or_insert_with(|| conn.params.clone());
                self.record_wait(start);
                tracing::debug!(db = %self.settings.database, user = %self.settings.user, ?conn, "server connection opened");
                Ok(conn)
            }
            Err(e) => {
                tracing::warn!(db = %self.settings.database, user = %self.settings.user, error = %e, "server connection failed");
                drop(slot);
                Err(e.into())
            }
        }
    }

    fn credentials(&self) -> Credentials {
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
            || conn.created.elapsed() >= self.settings.server_lifetime
        {
            return; // dropping closes it and frees the slot
        }
        let mut st = self.state.lock();
        let mut handoff = Handoff::Conn(conn);
        while let Some((_, _, tx)) = st.waiters.pop_front() {
            match tx.send(handoff) {
                Ok(()) => return,
                Err(back) => handoff = back,
            }
        }
        if let Handoff::Conn(conn) = handoff {
            st.idle.push(conn);
        }
    }

    /// Called when a slot is freed: hand it to the next waiter or shrink.
    fn release_slot(self: &Arc<Self>) {
        let mut st = self.state.lock();
        while let Some((_, _, tx)) = st.waiters.pop_front() {
            match tx.send(Handoff::Slot(Slot {
                pool: Arc::downgrade(self),
                server: None,
            })) {
                Ok(()) => return,
                // The same slot comes back; forget it rather than drop it here.
                Err(Handoff::Slot(slot)) => std::mem::forget(slot),
                Err(Handoff::Conn(_)) => unreachable!("only slots are sent here"),
            }
        }
        st.total = st.total.saturating_sub(1);
    }

    /// Takes idle connections past their lifetime or idle timeout (keeping
    /// `min_pool_size`), for the maintenance task to close outside the lock.
    pub(super) fn expire_idle(&self) -> Vec<ServerConn> {
        let mut st = self.state.lock();
        let now = Instant::now();
        let keep_min = self.settings.min_pool_size;
        let mut expired = Vec::new();
        let mut i = 0;
        while i < st.idle.len() {
            let c = &st.idle[i];
            let too_old = now.duration_since(c.created) >= self.settings.server_lifetime;
            let idle_long = !self.settings.server_idle_timeout.is_zero()
                && now.duration_since(c.last_used) >= self.settings.server_idle_timeout
                && st.total - expired.len() > keep_min;
            if too_old || idle_long || !c.is_alive() {
                expired.push(st.idle.remove(i));
            } else {
                i += 1;
            }
        }
        expired
    }

    /// Opens connections up to `min_pool_size` (only when nobody is waiting).
    pub(super) async fn fill_min(self: &Arc<Self>) {
        loop {
            {
                let mut st = self.state.lock();
                if st.total >= self.settings.min_pool_size || !st.waiters.is_empty() {
                    return;
                }
                st.total += 1;
            }
            match self.open(self.new_slot(), Instant::now()).await {
                Ok(conn) => self.checkin(conn),
                Err(_) => return,
            }
        }
    }
}

/// A place in the queue; leaving it early (client gone) removes it, and a
/// connection handed over in that instant goes back to the pool.
struct WaiterGuard<'a> {
    pool: &'a Arc<Pool>,
    id: u64,
    rx: oneshot::Receiver<Handoff>,
    done: bool,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.pool
            .state
            .lock()
            .waiters
            .retain(|(w, _, _)| *w != self.id);
        if let Ok(Handoff::Conn(conn)) = self.rx.try_recv() {
            self.pool.checkin(conn);
        }
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
