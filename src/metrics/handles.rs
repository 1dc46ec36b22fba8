//! The data plane's side of metrics: the handles a pool records into, with no
//! knowledge of pools, the exporter or the sampler. A pool registers its
//! [`PoolMetrics`] once when it is built; a transaction then records a few
//! histogram observations into them and nothing else (counters are copied from
//! the pool's [`PoolTotals`] by the sampler in the parent module).

use crate::stats::PoolTotals;
use metrics::{Counter, Histogram, Label};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub const CLIENTS_CONNECTED: &str = "weir_clients_connected";
pub const UP: &str = "weir_up";
pub const REPLICA_LAG_BYTES: &str = "weir_replica_lag_bytes";
pub const REPLICA_LAG_SECONDS: &str = "weir_replica_lag_seconds";
pub const BUILD_INFO: &str = "weir_build_info";
pub const CLIENTS_WAITING_ALL: &str = "weir_clients_waiting";
pub const DATABASE_POOL_SIZE: &str = "weir_database_pool_size";
pub const DATABASE_MAX_CONNECTIONS: &str = "weir_database_max_connections";
pub const DATABASE_CLIENTS_WAITING: &str = "weir_database_clients_waiting";
pub const DATABASE_PAUSED: &str = "weir_database_paused";
pub const DATABASE_DISABLED: &str = "weir_database_disabled";
pub const CLIENTS_ACTIVE: &str = "weir_pool_clients_active";
pub const CLIENTS_WAITING: &str = "weir_pool_clients_waiting";
pub const SERVERS_ACTIVE: &str = "weir_pool_servers_active";
pub const SERVERS_IDLE: &str = "weir_pool_servers_idle";
pub const SERVERS_USED: &str = "weir_pool_servers_used";
pub const SERVERS_LOGIN: &str = "weir_pool_servers_login";
pub const MAXWAIT: &str = "weir_pool_maxwait_seconds";
pub const TRANSACTIONS: &str = "weir_pool_transactions_total";
pub const QUERIES: &str = "weir_pool_queries_total";
pub const RECEIVED_BYTES: &str = "weir_pool_received_bytes_total";
pub const SENT_BYTES: &str = "weir_pool_sent_bytes_total";
pub const ERRORS: &str = "weir_pool_errors_total";
pub const SERVER_CONNECTS: &str = "weir_pool_server_connects_total";
pub const QUERY_TIME: &str = "weir_pool_query_duration_seconds";
pub const TRANSACTION_TIME: &str = "weir_pool_transaction_duration_seconds";
pub const WAIT_TIME: &str = "weir_pool_client_wait_seconds";

/// The labels that tell pools apart in the output.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolLabels {
    pub database: String,
    pub user: String,
    pub shard: usize,
    pub replica: bool,
}

impl PoolLabels {
    pub(super) fn to_labels(&self) -> Vec<Label> {
        let role = if self.replica { "replica" } else { "primary" };
        vec![
            Label::new("database", self.database.clone()),
            Label::new("user", self.user.clone()),
            Label::new("shard", self.shard.to_string()),
            Label::new("role", role),
        ]
    }
}

/// One pool's registered handles, so recording needs no label lookup.
pub struct PoolMetrics {
    pub labels: PoolLabels,
    query_time: Histogram,
    transaction_time: Histogram,
    wait_time: Histogram,
    counters: [(Counter, AtomicU64); 6],
}

impl std::fmt::Debug for PoolMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolMetrics")
            .field("labels", &self.labels)
            .finish_non_exhaustive()
    }
}

/// The counters, in the order of [`PoolMetrics::counters`] and [`totals_of`].
const COUNTERS: [&str; 6] = [
    TRANSACTIONS,
    QUERIES,
    RECEIVED_BYTES,
    SENT_BYTES,
    ERRORS,
    SERVER_CONNECTS,
];

fn totals_of(t: &PoolTotals) -> [u64; 6] {
    [
        &t.xact_count,
        &t.query_count,
        &t.bytes_received,
        &t.bytes_sent,
        &t.errors,
        &t.server_connects,
    ]
    .map(PoolTotals::get)
}

impl PoolMetrics {
    /// Registers the pool's series with the installed recorder (no-op
    /// handles when metrics are off).
    pub fn new(labels: PoolLabels) -> PoolMetrics {
        let l = labels.to_labels();
        PoolMetrics {
            query_time: metrics::histogram!(QUERY_TIME, l.clone()),
            transaction_time: metrics::histogram!(TRANSACTION_TIME, l.clone()),
            wait_time: metrics::histogram!(WAIT_TIME, l.clone()),
            counters: COUNTERS.map(|name| (metrics::counter!(name, l.clone()), AtomicU64::new(0))),
            labels,
        }
    }

    pub fn transaction_done(&self, micros: u64) {
        self.transaction_time.record(micros as f64 / 1e6);
    }

    pub fn client_waited(&self, micros: u64) {
        self.wait_time.record(micros as f64 / 1e6);
    }

    pub fn query_done(&self, elapsed: Duration) {
        self.query_time.record(elapsed.as_secs_f64());
    }

    /// Adds to each counter what the pool's totals gained since the last call.
    pub fn export(&self, totals: &PoolTotals) {
        for ((counter, exported), now) in self.counters.iter().zip(totals_of(totals)) {
            // fetch_max: two exports racing still add each unit exactly once.
            let before = exported.fetch_max(now, Ordering::Relaxed);
            if now > before {
                counter.increment(now - before);
            }
        }
    }
}

/// Times client requests on a lent server: from the moment something is in
/// flight until a ReadyForQuery leaves nothing in flight (one round trip; a
/// pipelined burst counts once). Two clock reads per round trip.
#[derive(Debug, Default)]
pub struct QueryClock(Option<Instant>);

impl QueryClock {
    /// After client bytes were scanned; `inflight` as the relay counts it.
    pub fn sent(&mut self, inflight: u32) {
        if inflight > 0 && self.0.is_none() {
            self.0 = Some(Instant::now());
        }
    }

    /// After server bytes were scanned.
    pub fn answered(&mut self, inflight: u32, metrics: &PoolMetrics) {
        if inflight == 0 {
            if let Some(start) = self.0.take() {
                metrics.query_done(start.elapsed());
            }
        }
    }
}
