//! Per-pool housekeeping: sweep the waiting queue (reserve connections after
//! `reserve_pool_timeout`, `query_wait_timeout`), close idle connections past
//! `server_lifetime` or `server_idle_timeout`, and keep `min_pool_size` open.

use super::pool::Pool;
use std::sync::Weak;
use std::time::{Duration, Instant};

/// How often idle connections are checked (and the longest a sweep sleeps).
const PERIOD: Duration = Duration::from_millis(500);

pub(super) async fn run(pool: Weak<Pool>) {
    let Some(signal) = pool.upgrade().map(|p| p.queue().sweep_signal()) else {
        return;
    };
    let mut housekeeping_at = Instant::now() + PERIOD;
    loop {
        let wake = {
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
        // No strong reference is held while asleep: the pool may be dropped.
        tokio::select! {
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {}
            _ = signal.notified() => {}
        }
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
