//! Per-pool housekeeping: sweep the waiting queue (reserve connections after
//! `reserve_pool_timeout`, `query_wait_timeout`), close idle connections past
//! `server_lifetime` or `server_idle_timeout`, and keep `min_pool_size` open.

use super::pool::Pool;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// How often idle connections are checked (and the longest a sweep sleeps).
const PERIOD: Duration = Duration::from_millis(500);

/// Sleeps first: a pool made for one failed login (a `*` database) is dropped at once, and
/// no strong reference held here may keep it alive meanwhile.
pub(super) async fn run(pool: Weak<Pool>, signal: Arc<Notify>) {
    let mut housekeeping_at = Instant::now() + PERIOD;
    let mut wake = housekeeping_at;
    loop {
        // No strong reference is held while asleep: the pool may be dropped.
        tokio::select! {
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {}
            _ = signal.notified() => {}
        }
        wake = {
            let Some(pool) = pool.upgrade() else { return };
            if pool.is_retired() {
                return;
            }
            let now = Instant::now();
            let next_deadline = pool.queue().sweep(now);
            if now >= housekeeping_at {
                housekeeping_at = now + PERIOD;
                housekeep(&pool).await;
            }
            next_deadline.map_or(housekeeping_at, |d| d.min(housekeeping_at))
        };
    }
}

async fn housekeep(pool: &std::sync::Arc<Pool>) {
    let expired = pool.expire_idle();
    if crate::logging::log_disconnections() {
        for conn in &expired {
            let age = conn.created.elapsed();
            let reason = if !conn.is_alive() {
                "server conn crashed?"
            } else if age >= pool.tuning().server_lifetime {
                "server lifetime over"
            } else {
                "server idle timeout"
            };
            crate::logging::closing(&pool.who(conn), reason, age.as_secs());
        }
    }
    drop(expired);
    // A paused pool (PAUSE, KILL) closes its servers; do not reopen them.
    if pool.tuning().min_pool_size > 0 && !pool.is_paused() {
        pool.fill_min().await;
    }
}
