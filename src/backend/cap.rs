//! `max_db_connections` and `max_user_connections`: limits on server connections shared by
//! several pools (every user's pool of one database; one user's pools of every database).
//!
//! A pool that wants a new connection takes a permit from each cap it belongs to. When a cap
//! is full, an idle connection of another pool under the same cap is closed to make room
//! (PgBouncer's "evicted"); when none is idle, the client waits until a connection of the cap
//! closes, up to `query_wait_timeout`. Opening for `min_pool_size` never waits and never
//! evicts.

use super::pool::Pool;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use tokio::sync::Notify;

/// One shared limit.
#[derive(Default)]
pub struct Cap {
    /// 0: no limit.
    max: AtomicUsize,
    count: Mutex<usize>,
    freed: Notify,
    /// Acquirers waiting on `freed`.
    waiting: AtomicUsize,
    /// The pools under this cap, for eviction.
    pools: Mutex<Vec<Weak<Pool>>>,
}

impl Cap {
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Release);
        self.freed.notify_waiters();
    }

    pub fn max(&self) -> usize {
        self.max.load(Ordering::Acquire)
    }

    /// Connections open (or opening) under this cap.
    pub fn count(&self) -> usize {
        *self.count.lock()
    }

    pub fn has_room(&self) -> bool {
        let max = self.max();
        max == 0 || *self.count.lock() < max
    }

    /// Counts one more connection; the caller checked there is room (under `TAKING`).
    fn take(&self) {
        *self.count.lock() += 1;
    }

    fn give_back(&self) {
        let mut n = self.count.lock();
        *n = n.saturating_sub(1);
        drop(n);
        // Every waiter retries (a waiter may also be blocked on another cap, so waking only
        // one could lose the wakeup); only waiters registered now are woken, so a waiter that
        // fails again sleeps until the next release. Unlimited caps have no waiters.
        if self.max() != 0 {
            self.freed.notify_waiters();
        }
    }

    /// A connection under this cap went idle: a waiter may evict it.
    pub fn idle_available(&self) {
        if self.waiting.load(Ordering::Acquire) > 0 {
            self.freed.notify_waiters();
        }
    }

    pub fn join(&self, pool: &Arc<Pool>) {
        let mut pools = self.pools.lock();
        pools.retain(|p| p.strong_count() > 0);
        pools.push(Arc::downgrade(pool));
    }

    /// Closes one idle connection of a pool under this cap; true if one was closed (its
    /// permit is back). The asking pool's own idle connections count too: one may have gone
    /// idle while its client was already waiting here for a new one.
    fn evict_one(&self) -> bool {
        let pools: Vec<Arc<Pool>> = self.pools.lock().iter().filter_map(Weak::upgrade).collect();
        for pool in pools {
            if let Some(conn) = pool.take_one_idle() {
                pool.log_closing(&conn, "evicted");
                drop(conn);
                return true;
            }
        }
        false
    }
}

/// Permits held by one connection (or one connection being opened); dropping them gives
/// them back.
#[derive(Default)]
pub struct Permits(Vec<Arc<Cap>>);

impl Permits {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Drop for Permits {
    fn drop(&mut self) {
        for cap in self.0.drain(..) {
            cap.give_back();
        }
    }
}

/// Serialises taking permits of several caps, so an attempt that fails on one cap never
/// holds (and then gives back, waking waiters) a permit of another.
static TAKING: Mutex<()> = Mutex::new(());

/// Takes a permit of every cap without waiting; `None` if one is full.
pub fn try_acquire(caps: &[Arc<Cap>]) -> Option<Permits> {
    let _one_at_a_time = TAKING.lock();
    if !caps.iter().all(|c| c.has_room()) {
        return None;
    }
    let mut held = Permits::default();
    for cap in caps {
        cap.take();
        held.0.push(cap.clone());
    }
    Some(held)
}

/// Takes a permit of every cap, evicting idle connections of other pools under a full cap,
/// else waiting for one to close until `deadline` (`None`: no limit). `None` when the
/// deadline passed.
pub async fn acquire(caps: &[Arc<Cap>], deadline: Option<tokio::time::Instant>) -> Option<Permits> {
    loop {
        // Register interest (in the limited caps, the only ones that can be full) before
        // trying, so a permit given back in between wakes us.
        let waits: Vec<_> = caps
            .iter()
            .filter(|c| c.max() != 0)
            .map(|c| c.freed.notified())
            .collect();
        if let Some(p) = try_acquire(caps) {
            return Some(p);
        }
        if caps.iter().any(|c| !c.has_room() && c.evict_one()) {
            continue;
        }
        let _waiting = Waiting::new(caps);
        // An idle connection may have appeared between the eviction attempt and counting
        // ourselves as waiting: look once more before sleeping.
        if caps.iter().any(|c| !c.has_room() && c.evict_one()) {
            continue;
        }
        let any = futures_any(waits);
        match deadline {
            Some(d) => {
                if tokio::time::timeout_at(d, any).await.is_err() {
                    return None;
                }
            }
            None => any.await,
        }
    }
}

/// Counts an acquirer as waiting on each limited cap while it lives.
struct Waiting<'a>(&'a [Arc<Cap>]);

impl<'a> Waiting<'a> {
    fn new(caps: &'a [Arc<Cap>]) -> Self {
        caps.iter().for_each(|c| {
            c.waiting.fetch_add(1, Ordering::AcqRel);
        });
        Waiting(caps)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.iter().for_each(|c| {
            c.waiting.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// Resolves when any of the notifications fires.
async fn futures_any(waits: Vec<tokio::sync::futures::Notified<'_>>) {
    let mut waits: Vec<_> = waits.into_iter().map(Box::pin).collect();
    std::future::poll_fn(|cx| {
        for w in waits.iter_mut() {
            if w.as_mut().poll(cx).is_ready() {
                return std::task::Poll::Ready(());
            }
        }
        std::task::Poll::Pending
    })
    .await
}

use std::future::Future;

/// The caps of one Weir process, by database and by user; kept across reloads (the
/// connections they count outlive a config).
#[derive(Default)]
pub struct Caps {
    by_db: Mutex<HashMap<String, Arc<Cap>>>,
    by_user: Mutex<HashMap<String, Arc<Cap>>>,
}

impl Caps {
    /// The caps a new pool of `database` logged in as `user` belongs to, with their current
    /// limits (0: none).
    pub fn for_pool(
        &self,
        database: &str,
        db_max: usize,
        user: &str,
        user_max: usize,
    ) -> Vec<Arc<Cap>> {
        let db = self
            .by_db
            .lock()
            .entry(database.to_string())
            .or_default()
            .clone();
        db.set_max(db_max);
        let us = self
            .by_user
            .lock()
            .entry(user.to_string())
            .or_default()
            .clone();
        us.set_max(user_max);
        vec![db, us]
    }

    /// Server connections of a database (SHOW DATABASES current_connections).
    pub fn db_count(&self, database: &str) -> usize {
        self.by_db.lock().get(database).map_or(0, |c| c.count())
    }
}
