//! Per-database statistics for SHOW STATS / STATS_TOTALS / STATS_AVERAGES /
//! TOTALS: totals since start, and averages over the last stats period, as
//! PgBouncer computes them.
//!
//! A pool's counters live in the pool, and a reload retires pools whose
//! settings changed. So that a database's totals never go backwards, the
//! tracker keeps every pool it has seen until it is retired and has closed its
//! last server, then folds its counters into a per-database carry.

use crate::backend::Pool;
use crate::stats::PoolTotals;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// PgBouncer's default `stats_period`.
pub const STATS_PERIOD: Duration = Duration::from_secs(60);

const USEC: u64 = 1_000_000;

/// The counters SHOW STATS reports for one database (times in µs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub server_assignment_count: u64,
    pub xact_count: u64,
    pub query_count: u64,
    pub received: u64,
    pub sent: u64,
    pub xact_time: u64,
    pub query_time: u64,
    pub wait_time: u64,
    pub client_login_count: u64,
}

impl Counters {
    pub fn of(t: &PoolTotals) -> Counters {
        Counters {
            // Every successful checkout records one wait: one assignment.
            server_assignment_count: PoolTotals::get(&t.wait_count),
            xact_count: PoolTotals::get(&t.xact_count),
            query_count: PoolTotals::get(&t.query_count),
            received: PoolTotals::get(&t.bytes_received),
            sent: PoolTotals::get(&t.bytes_sent),
            xact_time: PoolTotals::get(&t.xact_time_us),
            query_time: PoolTotals::get(&t.query_time_us),
            wait_time: PoolTotals::get(&t.wait_time_us),
            client_login_count: PoolTotals::get(&t.client_logins),
        }
    }

    pub fn add(&mut self, o: &Counters) {
        self.server_assignment_count += o.server_assignment_count;
        self.xact_count += o.xact_count;
        self.query_count += o.query_count;
        self.received += o.received;
        self.sent += o.sent;
        self.xact_time += o.xact_time;
        self.query_time += o.query_time;
        self.wait_time += o.wait_time;
        self.client_login_count += o.client_login_count;
    }

    /// PgBouncer's averages between an older snapshot and now: counts and
    /// bytes per second; transaction and query time per transaction and
    /// query; wait time per server assignment.
    pub fn average(cur: &Counters, old: &Counters, elapsed_us: u64) -> Counters {
        if elapsed_us == 0 {
            return Counters::default();
        }
        let rate = |c: u64, o: u64| c.saturating_sub(o).saturating_mul(USEC) / elapsed_us;
        let per = |c: u64, o: u64, n: u64| c.saturating_sub(o).checked_div(n).unwrap_or(0);
        let xacts = cur.xact_count.saturating_sub(old.xact_count);
        let queries = cur.query_count.saturating_sub(old.query_count);
        let assignments = cur
            .server_assignment_count
            .saturating_sub(old.server_assignment_count);
        Counters {
            server_assignment_count: rate(cur.server_assignment_count, old.server_assignment_count),
            xact_count: rate(cur.xact_count, old.xact_count),
            query_count: rate(cur.query_count, old.query_count),
            received: rate(cur.received, old.received),
            sent: rate(cur.sent, old.sent),
            xact_time: per(cur.xact_time, old.xact_time, xacts),
            query_time: per(cur.query_time, old.query_time, queries),
            wait_time: per(cur.wait_time, old.wait_time, assignments),
            client_login_count: rate(cur.client_login_count, old.client_login_count),
        }
    }
}

/// Totals and averages per database, sorted by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DatabaseStats {
    pub totals: BTreeMap<String, Counters>,
    pub averages: BTreeMap<String, Counters>,
}

/// True once a pool has had a server, a client or a checkout. A pool whose connection
/// attempts all failed does not count: it may be one a failed login made for a `*`
/// database, which holding here would keep from being forgotten.
fn used(pool: &Pool) -> bool {
    let t = &pool.totals;
    !pool.servers.is_empty()
        || PoolTotals::get(&t.client_logins) > 0
        || PoolTotals::get(&t.wait_count) > 0
}

pub struct StatsTracker {
    inner: Mutex<Inner>,
    /// The admin console's own counters (logins, and each command as one transaction and
    /// one query), shown as database `pgbouncer` as PgBouncer does.
    pub console: PoolTotals,
}

struct Inner {
    /// Every pool seen and not yet folded into `carried`.
    seen: Vec<Arc<Pool>>,
    carried: BTreeMap<String, Counters>,
    /// Totals at the last two period boundaries, and when they were taken.
    older: BTreeMap<String, Counters>,
    newer: BTreeMap<String, Counters>,
    old_stamp_us: u64,
    new_stamp_us: u64,
}

impl StatsTracker {
    pub fn new(start_us: u64) -> StatsTracker {
        StatsTracker {
            inner: Mutex::new(Inner {
                seen: Vec::new(),
                carried: BTreeMap::new(),
                older: BTreeMap::new(),
                newer: BTreeMap::new(),
                old_stamp_us: start_us,
                new_stamp_us: start_us,
            }),
            console: PoolTotals::default(),
        }
    }

    /// Notes the live pools, and folds retired ones that closed everything.
    pub fn observe(&self, live: &[Arc<Pool>]) {
        let mut inner = self.inner.lock();
        for pool in live {
            // A pool nothing has used yet has nothing to count; holding it would keep a pool
            // a failed login made (an auto-database) from being forgotten.
            if used(pool) && !inner.seen.iter().any(|p| Arc::ptr_eq(p, pool)) {
                inner.seen.push(pool.clone());
            }
        }
        // Retired pools, and pools the cluster dropped (pool_idle_timeout, unused
        // auto-databases), are folded once their servers are closed.
        let (done, keep): (Vec<_>, Vec<_>) =
            std::mem::take(&mut inner.seen).into_iter().partition(|p| {
                (p.is_retired() || !live.iter().any(|l| Arc::ptr_eq(l, p))) && p.servers.is_empty()
            });
        inner.seen = keep;
        for pool in &done {
            let c = Counters::of(&pool.totals);
            inner
                .carried
                .entry(pool.settings.database.clone())
                .or_default()
                .add(&c);
        }
        drop(inner);
        drop(done); // outside the lock: a pool's Drop exports its metrics
    }

    /// Retired pools that still have servers open (SHOW SERVERS, WAIT_CLOSE).
    pub fn retired(&self) -> Vec<Arc<Pool>> {
        let inner = self.inner.lock();
        inner
            .seen
            .iter()
            .filter(|p| p.is_retired())
            .cloned()
            .collect()
    }

    fn totals_locked(&self, inner: &Inner) -> BTreeMap<String, Counters> {
        let mut out = inner.carried.clone();
        let console = Counters::of(&self.console);
        if console != Counters::default() {
            out.entry(crate::admin::snapshot::ADMIN_DB.to_string())
                .or_default()
                .add(&console);
        }
        for pool in &inner.seen {
            out.entry(pool.settings.database.clone())
                .or_default()
                .add(&Counters::of(&pool.totals));
        }
        out
    }

    /// Starts a new stats period (called every [`STATS_PERIOD`]).
    pub fn rotate(&self, live: &[Arc<Pool>], now_us: u64) {
        self.observe(live);
        let mut inner = self.inner.lock();
        let totals = self.totals_locked(&inner);
        inner.older = std::mem::replace(&mut inner.newer, totals);
        inner.old_stamp_us = inner.new_stamp_us;
        inner.new_stamp_us = now_us;
    }

    pub fn stats(&self, live: &[Arc<Pool>], now_us: u64) -> DatabaseStats {
        self.observe(live);
        let inner = self.inner.lock();
        let totals = self.totals_locked(&inner);
        let elapsed = now_us.saturating_sub(inner.old_stamp_us);
        let zero = Counters::default();
        let averages = totals
            .iter()
            .map(|(db, cur)| {
                let old = inner.older.get(db).unwrap_or(&zero);
                (db.clone(), Counters::average(cur, old, elapsed))
            })
            .collect();
        DatabaseStats { totals, averages }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn averages_follow_pgbouncer() {
        let old = Counters {
            server_assignment_count: 10,
            xact_count: 10,
            query_count: 20,
            received: 1000,
            sent: 2000,
            xact_time: 1000,
            query_time: 1000,
            wait_time: 100,
            client_login_count: 4,
        };
        let cur = Counters {
            server_assignment_count: 30,
            xact_count: 40,
            query_count: 80,
            received: 7000,
            sent: 8000,
            xact_time: 4000,
            query_time: 2200,
            wait_time: 500,
            client_login_count: 10,
        };
        let avg = Counters::average(&cur, &old, 2 * USEC);
        assert_eq!(avg.client_login_count, 3); // 6 logins in 2 s
        assert_eq!(avg.xact_count, 15); // 30 transactions in 2 s
        assert_eq!(avg.query_count, 30);
        assert_eq!(avg.server_assignment_count, 10);
        assert_eq!(avg.received, 3000);
        assert_eq!(avg.sent, 3000);
        assert_eq!(avg.xact_time, 100); // 3000 µs over 30 transactions
        assert_eq!(avg.query_time, 20);
        assert_eq!(avg.wait_time, 20); // 400 µs over 20 assignments
    }

    #[test]
    fn no_time_or_no_traffic_averages_zero() {
        let c = Counters {
            xact_count: 5,
            ..Default::default()
        };
        assert_eq!(Counters::average(&c, &c, USEC), Counters::default());
        assert_eq!(
            Counters::average(&c, &Counters::default(), 0),
            Counters::default()
        );
    }
}
