//! Per-pool housekeeping: close idle connections past `server_lifetime` or
//! `server_idle_timeout`, and keep `min_pool_size` open.

use super::pool::Pool;
use std::sync::Weak;
use std::time::Duration;

pub(super) async fn run(pool: Weak<Pool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        if pool.is_retired() {
            return;
        }
        let expired = pool.expire_idle();
        if !expired.is_empty() {
            tracing::debug!(db = %pool.settings.database, count = expired.len(), "closing idle server connections");
        }
        drop(expired);
        // A paused pool (PAUSE, KILL) closes its servers; do not reopen them.
        if pool.settings.min_pool_size > 0 && !pool.is_paused() {
            pool.fill_min().await;
        }
    }
}
