//! Prometheus metrics at `http://stats_addr:stats_port/metrics`, through the
//! `metrics` facade and `metrics-exporter-prometheus`.
//!
//! This module is the exporter side: the HTTP listener, HELP lines, and the
//! sampler that reads pools. The handles the data plane records into live in
//! [`handles`], which knows nothing of pools, so `backend` depends on it and not
//! the other way round.
//!
//! The hot path pays only for histograms: each pool registers its handles once
//! ([`PoolMetrics`], built with the pool) and a transaction records a few
//! observations into them. Counters are not incremented per transaction at
//! all: they are the pool's [`crate::stats::PoolTotals`] — the atomics SHOW STATS reads —
//! copied into the registry by a sampler once a second (and when a pool is
//! dropped). The same sampler sets the gauges from each pool's state.
//!
//! Every series carries the labels `database`, `user`, `shard` and `role`
//! (`primary` or `replica`); the replicas of one shard share a series, their
//! values summed. README.md ("Metrics") lists every name.

use crate::backend::pool::Pool;
use crate::App;
use metrics::Unit;
use metrics_exporter_prometheus::{BuildError, PrometheusBuilder};
use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;
use thiserror::Error;

mod handles;
pub use handles::*;

/// How often gauges are set and counters copied from the pools.
const SAMPLE_PERIOD: Duration = Duration::from_secs(1);

/// How often the exporter folds recorded histogram samples into its buckets;
/// until then they are buffered, so this bounds that buffer under load.
const UPKEEP_PERIOD: Duration = Duration::from_secs(1);

/// Histogram bucket bounds in seconds, shared by query, transaction and wait
/// times: from a fast local round trip (tens of µs) to a query_wait_timeout.
pub const BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("stats_addr {addr}: {reason}")]
    Address { addr: String, reason: String },
    #[error("cannot serve metrics: {0}")]
    Exporter(#[from] BuildError),
    #[error("a metrics recorder is already installed")]
    AlreadyInstalled,
}

/// Starts the exporter on `stats_addr:stats_port` and the sampler, if a
/// `stats_port` is configured; returns the address served. Call inside the
/// runtime, before the first pool exists (pools register their handles with
/// whatever recorder is installed when they are created).
pub fn start(app: &Arc<App>) -> Result<Option<SocketAddr>, MetricsError> {
    let cluster = app.cluster();
    let g = &cluster.config.general;
    let Some(port) = g.stats_port else {
        return Ok(None);
    };
    let addr = resolve(&g.stats_addr, port)?;
    let (recorder, exporter) = builder()?
        .with_http_listener(addr)
        .upkeep_timeout(UPKEEP_PERIOD)
        .build()?;
    metrics::set_global_recorder(recorder).map_err(|_| MetricsError::AlreadyInstalled)?;
    describe();
    metrics::gauge!(BUILD_INFO, "version" => crate::VERSION).set(1.0);
    metrics::gauge!(UP).set(1.0);
    tokio::spawn(async move {
        if let Err(e) = exporter.await {
            tracing::error!(error = ?e, "metrics exporter stopped");
        }
    });
    tokio::spawn(sample_forever(Arc::downgrade(app)));
    Ok(Some(addr))
}

/// The exporter configuration shared by [`start`] and the tests: every
/// histogram gets [`BUCKETS`], so p50/p99 come from `histogram_quantile`.
pub fn builder() -> Result<PrometheusBuilder, BuildError> {
    PrometheusBuilder::new().set_buckets(BUCKETS)
}

/// `*` (or empty) means every interface, as for `listen_addr`.
fn resolve(host: &str, port: u16) -> Result<SocketAddr, MetricsError> {
    let host = match host {
        "*" | "" => "0.0.0.0",
        other => other.trim_matches(['[', ']']),
    };
    let err = |reason: String| MetricsError::Address {
        addr: host.to_string(),
        reason,
    };
    (host, port)
        .to_socket_addrs()
        .map_err(|e| err(e.to_string()))?
        .next()
        .ok_or_else(|| err("no address".into()))
}

/// HELP lines for the scrape output.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        CLIENTS_CONNECTED,
        "Clients connected to Weir (all pools, admin console included)"
    );
    describe_gauge!(
        CLIENTS_ACTIVE,
        "Clients holding a server connection of the pool"
    );
    describe_gauge!(
        CLIENTS_WAITING,
        "Clients queued for a server connection of the pool (queue depth; HPA signal)"
    );
    describe_gauge!(SERVERS_ACTIVE, "Server connections lent to clients");
    describe_gauge!(UP, "1 while Weir runs");
    describe_gauge!(
        REPLICA_LAG_BYTES,
        "Bytes of WAL a shard replica has not replayed yet (as last sampled)"
    );
    describe_gauge!(
        REPLICA_LAG_SECONDS,
        "How long the oldest WAL a shard replica has not replayed has existed on its primary"
    );
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the label `version` is Weir's version"
    );
    describe_gauge!(
        CLIENTS_WAITING_ALL,
        "Clients waiting for a server, all pools"
    );
    describe_gauge!(DATABASE_POOL_SIZE, "Configured pool size of a database");
    describe_gauge!(
        DATABASE_MAX_CONNECTIONS,
        "max_db_connections of a database (0: no limit)"
    );
    describe_gauge!(
        DATABASE_CLIENTS_WAITING,
        "Clients waiting for a server, per database"
    );
    describe_gauge!(DATABASE_PAUSED, "1 while the database is paused (PAUSE)");
    describe_gauge!(
        DATABASE_DISABLED,
        "1 while the database is disabled (DISABLE)"
    );
    describe_gauge!(
        SERVERS_IDLE,
        "Server connections idle and ready for a client"
    );
    describe_gauge!(
        SERVERS_USED,
        "Server connections waiting for a check before reuse (always 0: Weir checks at checkout)"
    );
    describe_gauge!(SERVERS_LOGIN, "Server connections being opened");
    describe_gauge!(
        MAXWAIT,
        Unit::Seconds,
        "How long the oldest client in the pool's queue has waited"
    );
    describe_counter!(
        TRANSACTIONS,
        "Transactions relayed (one server checkout each)"
    );
    describe_counter!(QUERIES, "Queries relayed (Query and Execute messages)");
    describe_counter!(RECEIVED_BYTES, Unit::Bytes, "Bytes received from clients");
    describe_counter!(SENT_BYTES, Unit::Bytes, "Bytes sent to clients");
    describe_counter!(
        ERRORS,
        "Pooler errors: failed checkouts (query_wait_timeout, server login) and servers lost mid-transaction"
    );
    describe_counter!(
        SERVER_CONNECTS,
        "Server connections Weir opened (or tried to)"
    );
    describe_histogram!(
        QUERY_TIME,
        Unit::Seconds,
        "Time from a client request reaching the server until ReadyForQuery answered everything in flight"
    );
    describe_histogram!(
        TRANSACTION_TIME,
        Unit::Seconds,
        "Time a client held a server connection for one transaction"
    );
    describe_histogram!(
        WAIT_TIME,
        Unit::Seconds,
        "Time a client waited for a server connection (0 when one was idle)"
    );
}

/// A pool's gauges at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PoolGauges {
    pub clients_active: usize,
    pub clients_waiting: usize,
    pub servers_active: usize,
    pub servers_idle: usize,
    pub servers_login: usize,
    pub maxwait: Duration,
}

impl PoolGauges {
    pub fn of(pool: &Pool) -> PoolGauges {
        let counts = pool.counts();
        // Opened connections are registered; the rest of `total` is logging in.
        let open = pool.servers.len();
        let lent = open.saturating_sub(counts.idle);
        PoolGauges {
            clients_active: lent,
            clients_waiting: counts.waiting,
            servers_active: lent,
            servers_idle: counts.idle,
            servers_login: counts.total.saturating_sub(open),
            maxwait: counts.max_wait,
        }
    }

    /// Folds in another pool with the same labels (a shard's replicas).
    fn add(&mut self, other: &PoolGauges) {
        self.clients_active += other.clients_active;
        self.clients_waiting += other.clients_waiting;
        self.servers_active += other.servers_active;
        self.servers_idle += other.servers_idle;
        self.servers_login += other.servers_login;
        self.maxwait = self.maxwait.max(other.maxwait);
    }

    fn set(&self, labels: &PoolLabels) {
        let l = labels.to_labels();
        let gauges = [
            (CLIENTS_ACTIVE, self.clients_active as f64),
            (CLIENTS_WAITING, self.clients_waiting as f64),
            (SERVERS_ACTIVE, self.servers_active as f64),
            (SERVERS_IDLE, self.servers_idle as f64),
            (SERVERS_USED, 0.0),
            (SERVERS_LOGIN, self.servers_login as f64),
            (MAXWAIT, self.maxwait.as_secs_f64()),
        ];
        for (name, value) in gauges {
            metrics::gauge!(name, l.clone()).set(value);
        }
    }
}

/// Sets every pool's gauges; pools gone since the last call (removed by a
/// reload) are set to zero so no stale queue depth lingers.
pub fn publish(now: &HashMap<PoolLabels, PoolGauges>, shown: &mut HashSet<PoolLabels>) {
    for gone in shown.iter().filter(|l| !now.contains_key(*l)) {
        PoolGauges::default().set(gone);
    }
    for (labels, gauges) in now {
        gauges.set(labels);
    }
    *shown = now.keys().cloned().collect();
}

async fn sample_forever(app: Weak<App>) {
    let mut tick = tokio::time::interval(SAMPLE_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shown = HashSet::new();
    loop {
        tick.tick().await;
        let Some(app) = app.upgrade() else { return };
        sample(&app, &mut shown);
    }
}

fn sample(app: &App, shown: &mut HashSet<PoolLabels>) {
    let mut now: HashMap<PoolLabels, PoolGauges> = HashMap::new();
    for pool in app.cluster().pools() {
        pool.metrics.export(&pool.totals);
        now.entry(pool.metrics.labels.clone())
            .or_default()
            .add(&PoolGauges::of(&pool));
    }
    publish(&now, shown);
    metrics::gauge!(CLIENTS_CONNECTED).set(app.clients.load(Ordering::Relaxed) as f64);
    publish_databases(app, &now);
}

/// Series that exist from the start, before any client (an idle pod still exports what an
/// autoscaler reads): `weir_up`, the clients waiting in all pools, and per configured
/// database its pool size, server cap, queue depth and PAUSE/DISABLE state.
fn publish_databases(app: &App, now: &HashMap<PoolLabels, PoolGauges>) {
    let cluster = app.cluster();
    let g = &cluster.config.general;
    metrics::gauge!(UP).set(1.0);
    let waiting = |db: Option<&str>| {
        now.iter()
            .filter(|(l, _)| db.is_none_or(|d| l.database == d))
            .map(|(_, p)| p.clients_waiting)
            .sum::<usize>() as f64
    };
    metrics::gauge!(CLIENTS_WAITING_ALL).set(waiting(None));
    let paused = cluster.paused();
    let disabled = app.disabled.lock().clone();
    for db in cluster.config.databases.values().filter(|d| d.name != "*") {
        let l = [("database", db.name.clone())];
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        metrics::gauge!(DATABASE_POOL_SIZE, &l)
            .set(db.pool_size.unwrap_or(g.default_pool_size) as f64);
        metrics::gauge!(DATABASE_MAX_CONNECTIONS, &l).set(db.max_db_connections as f64);
        metrics::gauge!(DATABASE_CLIENTS_WAITING, &l).set(waiting(Some(&db.name)));
        metrics::gauge!(DATABASE_PAUSED, &l).set(flag(paused.covers(&db.name)));
        metrics::gauge!(DATABASE_DISABLED, &l).set(flag(disabled.contains(&db.name)));
    }
    for router in cluster.routers() {
        if !router.sampled() {
            continue;
        }
        for (shard, sw) in router.wal.shards.iter().enumerate() {
            for (r, rw) in sw.replicas.iter().enumerate() {
                if rw.sampled_at.load(Ordering::Relaxed) == 0 {
                    continue;
                }
                let l = [
                    ("database", router.database.clone()),
                    ("shard", shard.to_string()),
                    ("replica", r.to_string()),
                ];
                metrics::gauge!(REPLICA_LAG_BYTES, &l)
                    .set(rw.lag_bytes.load(Ordering::Relaxed) as f64);
                metrics::gauge!(REPLICA_LAG_SECONDS, &l)
                    .set(rw.lag_us.load(Ordering::Relaxed) as f64 / 1e6);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::PoolTotals;
    use metrics_exporter_prometheus::PrometheusRecorder;

    fn recorder() -> PrometheusRecorder {
        builder().expect("buckets").build_recorder()
    }

    fn labels(replica: bool) -> PoolLabels {
        PoolLabels {
            database: "app".into(),
            user: "u".into(),
            shard: 1,
            replica,
        }
    }

    fn metrics_for(labels: &PoolLabels) -> PoolMetrics {
        PoolMetrics::new(labels.clone())
    }

    /// The value of the series whose line starts with `prefix` (name and labels).
    fn value(text: &str, prefix: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.trim().parse().ok())
    }

    const SERIES: &str = "{database=\"app\",user=\"u\",shard=\"1\",role=\"primary\"}";

    #[test]
    fn counters_export_only_what_the_totals_gained() {
        let rec = recorder();
        let handle = rec.handle();
        let m = metrics::with_local_recorder(&rec, || metrics_for(&labels(false)));
        let totals = PoolTotals::default();
        PoolTotals::add(&totals.xact_count, 3);
        PoolTotals::add(&totals.bytes_sent, 100);
        m.export(&totals);
        m.export(&totals);
        PoolTotals::add(&totals.xact_count, 2);
        m.export(&totals);
        let text = handle.render();
        assert_eq!(
            value(&text, &format!("{TRANSACTIONS}{SERIES}")),
            Some(5.0),
            "{text}"
        );
        assert_eq!(value(&text, &format!("{SENT_BYTES}{SERIES}")), Some(100.0));
        assert_eq!(value(&text, &format!("{ERRORS}{SERIES}")), Some(0.0));
    }

    #[test]
    fn histograms_use_the_configured_buckets() {
        let rec = recorder();
        let handle = rec.handle();
        let m = metrics::with_local_recorder(&rec, || metrics_for(&labels(false)));
        m.transaction_done(300); // 0.3 ms
        m.transaction_done(2_000_000); // 2 s
        m.client_waited(0);
        let text = handle.render();
        let name = TRANSACTION_TIME;
        let bucket = |le: &str| {
            value(
                &text,
                &format!("{name}_bucket{{database=\"app\",user=\"u\",shard=\"1\",role=\"primary\",le=\"{le}\"}}"),
            )
        };
        assert_eq!(bucket("0.0001"), Some(0.0), "{text}");
        assert_eq!(bucket("0.0005"), Some(1.0));
        assert_eq!(bucket("2.5"), Some(2.0));
        assert_eq!(bucket("+Inf"), Some(2.0));
        assert_eq!(value(&text, &format!("{name}_count{SERIES}")), Some(2.0));
        assert_eq!(
            value(&text, &format!("{WAIT_TIME}_count{SERIES}")),
            Some(1.0)
        );
    }

    #[test]
    fn gauges_of_a_vanished_pool_drop_to_zero() {
        let rec = recorder();
        let handle = rec.handle();
        let mut shown = HashSet::new();
        let busy = PoolGauges {
            clients_waiting: 4,
            maxwait: Duration::from_millis(1500),
            ..Default::default()
        };
        metrics::with_local_recorder(&rec, || {
            publish(&HashMap::from([(labels(false), busy)]), &mut shown);
        });
        let text = handle.render();
        assert_eq!(
            value(&text, &format!("{CLIENTS_WAITING}{SERIES}")),
            Some(4.0)
        );
        assert_eq!(value(&text, &format!("{MAXWAIT}{SERIES}")), Some(1.5));
        metrics::with_local_recorder(&rec, || publish(&HashMap::new(), &mut shown));
        let text = handle.render();
        assert_eq!(
            value(&text, &format!("{CLIENTS_WAITING}{SERIES}")),
            Some(0.0)
        );
        assert!(shown.is_empty());
    }

    #[test]
    fn replicas_of_a_shard_share_one_series() {
        let mut a = PoolGauges {
            clients_waiting: 1,
            servers_idle: 2,
            maxwait: Duration::from_secs(1),
            ..Default::default()
        };
        a.add(&PoolGauges {
            clients_waiting: 2,
            servers_idle: 1,
            maxwait: Duration::from_secs(3),
            ..Default::default()
        });
        assert_eq!(a.clients_waiting, 3);
        assert_eq!(a.servers_idle, 3);
        assert_eq!(a.maxwait, Duration::from_secs(3));
        let role = |replica| {
            labels(replica)
                .to_labels()
                .iter()
                .find(|l| l.key() == "role")
                .map(|l| l.value().to_string())
        };
        assert_eq!(role(true).as_deref(), Some("replica"));
        assert_eq!(role(false).as_deref(), Some("primary"));
    }

    #[test]
    fn query_clock_times_one_round_trip() {
        let rec = recorder();
        let handle = rec.handle();
        let m = metrics::with_local_recorder(&rec, || metrics_for(&labels(false)));
        let mut clock = QueryClock::default();
        clock.answered(0, &m); // nothing sent: nothing recorded
        clock.sent(0);
        clock.sent(2);
        clock.sent(3);
        clock.answered(1, &m);
        clock.answered(0, &m);
        clock.answered(0, &m);
        let text = handle.render();
        assert_eq!(
            value(&text, &format!("{QUERY_TIME}_count{SERIES}")),
            Some(1.0)
        );
    }

    #[test]
    fn stats_addr_star_means_every_interface() {
        let a = resolve("*", 9930).expect("resolve");
        assert_eq!(a, SocketAddr::from(([0, 0, 0, 0], 9930)));
        let b = resolve("127.0.0.1", 1).expect("resolve");
        assert_eq!(b.port(), 1);
        assert!(resolve("::1", 2).is_ok_and(|a| a.is_ipv6()));
    }
}
