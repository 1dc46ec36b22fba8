//! A copy of the live state the SHOW commands read, taken at one instant,
//! so each renderer is a plain function of it (and tests can build one).

use super::stats::DatabaseStats;
use crate::backend::Pool;
use crate::cluster::{Cluster, Paused};
use crate::config::{parse_address, Address, Config, PoolMode};
use crate::stats::{now_us, ClientInfo, ClientState, ServerInfo};
use crate::App;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// The virtual database PgBouncer lists in SHOW DATABASES.
pub const ADMIN_DB: &str = "pgbouncer";

/// The configured databases' names, without the `*` fallback.
pub fn configured_databases(config: &Config) -> impl Iterator<Item = String> + '_ {
    config.databases.keys().filter(|n| *n != "*").cloned()
}

/// One pool's state at the snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolState {
    pub database: String,
    /// The user the pool logs in as.
    pub user: String,
    pub mode: PoolMode,
    pub idle: usize,
    /// Open connections (idle + lent).
    pub open: usize,
    /// Open and being opened.
    pub total: usize,
    pub max_wait: Duration,
}

impl PoolState {
    pub fn of(pool: &Pool) -> PoolState {
        let c = pool.counts();
        PoolState {
            database: pool.settings.database.clone(),
            user: pool.settings.user.clone(),
            mode: pool.settings.mode,
            idle: c.idle,
            open: pool.servers.len(),
            total: c.total,
            max_wait: c.max_wait,
        }
    }
}

/// One shard's primary or replica of a sharded database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardState {
    pub database: String,
    pub shard: usize,
    /// `None` = the primary.
    pub replica: Option<usize>,
    pub address: Address,
    pub banned: bool,
    /// The database's read-your-writes mode (`off`, `client`, `global`).
    pub read_your_writes: &'static str,
    /// From the WAL sampler (`None`: not sampled, or no sample yet).
    pub wal: Option<WalView>,
}

/// One server's WAL position as last sampled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalView {
    /// Insert position (primary) or replay position (replica).
    pub lsn: u64,
    pub lag_bytes: u64,
    pub lag_ms: u64,
    pub sampled_ms_ago: u64,
    /// Replica out of recovery, or primary in recovery.
    pub wrong_role: bool,
    /// A replica within max_replica_lag and in recovery.
    pub readable: bool,
}

/// Everything SHOW reads, copied out of the live state at one instant.
pub struct Snapshot {
    pub now_us: u64,
    pub config: Arc<Config>,
    pub pools: Vec<PoolState>,
    pub clients: Vec<Arc<ClientInfo>>,
    pub servers: Vec<Arc<ServerInfo>>,
    pub paused: Paused,
    pub disabled: BTreeSet<String>,
    pub stats: DatabaseStats,
    pub shards: Vec<ShardState>,
    /// Accepted connections (logged in or not, console ones included).
    pub connections: usize,
    /// Open admin console connections.
    pub consoles: usize,
    /// The latest RESHARD.
    pub reshard: Option<crate::reshard::Status>,
}

impl Snapshot {
    /// Copies what SHOW needs out of the live state.
    pub fn take(app: &App) -> Snapshot {
        let cluster = app.cluster();
        let live = cluster.pools();
        let now_us = now_us();
        let stats = app.admin.stats.stats(&live, now_us);
        let mut servers: Vec<Arc<ServerInfo>> =
            live.iter().flat_map(|p| p.servers.snapshot()).collect();
        for retired in app.admin.stats.retired() {
            servers.extend(retired.servers.snapshot());
        }
        Snapshot {
            now_us,
            config: cluster.config.clone(),
            pools: live.iter().map(|p| PoolState::of(p)).collect(),
            clients: app.client_list.snapshot(),
            servers,
            paused: cluster.paused(),
            disabled: app.disabled.lock().iter().cloned().collect(),
            stats,
            shards: shard_states(&cluster),
            connections: app.clients.load(Ordering::Relaxed),
            consoles: app.admin.consoles(),
            reshard: app.reshard.current().map(|p| p.status()),
        }
    }

    /// The user a client's pool logs in as (a database's `user=` forces it).
    pub(super) fn pool_user(&self, c: &ClientInfo) -> String {
        self.config
            .database(&c.database)
            .and_then(|d| d.user.clone())
            .unwrap_or_else(|| c.user.clone())
    }

    pub(super) fn clients_of<'a>(
        &'a self,
        database: &'a str,
        user: &'a str,
    ) -> impl Iterator<Item = &'a Arc<ClientInfo>> + 'a {
        self.clients
            .iter()
            .filter(move |c| c.database == database && self.pool_user(c) == user)
    }

    pub(super) fn client_wait_us(&self, c: &ClientInfo) -> u64 {
        let since = c.wait_since.load(Ordering::Relaxed);
        if c.state() == ClientState::Waiting && since > 0 {
            self.now_us.saturating_sub(since)
        } else {
            0
        }
    }

    /// Database names: configured ones (not the `*` fallback), those with
    /// pools or clients (created through `*`), and the admin database.
    pub(super) fn database_names(&self) -> BTreeSet<String> {
        let mut names: BTreeSet<String> = configured_databases(&self.config).collect();
        names.extend(self.pools.iter().map(|p| p.database.clone()));
        names.extend(self.clients.iter().map(|c| c.database.clone()));
        names.insert(ADMIN_DB.to_string());
        names
    }

    pub(super) fn user_names(&self) -> BTreeSet<String> {
        let mut names: BTreeSet<String> = self.config.users.keys().cloned().collect();
        names.extend(self.pools.iter().map(|p| p.user.clone()));
        names.extend(self.clients.iter().map(|c| c.user.clone()));
        names
    }

    /// Pools summed per (database, user): a sharded database has one pool
    /// per shard and replica, PgBouncer one per pair (SHOW SHARDS has detail).
    pub(super) fn pool_rows(&self) -> BTreeMap<(String, String), PoolState> {
        let mut rows: BTreeMap<(String, String), PoolState> = BTreeMap::new();
        for p in &self.pools {
            rows.entry((p.database.clone(), p.user.clone()))
                .and_modify(|r| {
                    r.idle += p.idle;
                    r.open += p.open;
                    r.total += p.total;
                    r.max_wait = r.max_wait.max(p.max_wait);
                })
                .or_insert_with(|| p.clone());
        }
        rows
    }
}

fn shard_states(cluster: &Cluster) -> Vec<ShardState> {
    let mut out = Vec::new();
    for db in cluster.config.databases.values() {
        let Some(router) = cluster.router(db) else {
            continue;
        };
        let mode = router.read_your_writes.as_str();
        let wal = &router.wal;
        let now = wal.now_us();
        let ago = |at: u64| (at > 0).then(|| now.saturating_sub(at) / 1000);
        for (shard, sh) in db.shards.iter().enumerate() {
            let Some(sw) = wal.shards.get(shard) else {
                continue;
            };
            if let Ok(address) = parse_address(&sh.primary) {
                let view = ago(sw.primary_sampled_at.load(Ordering::Relaxed))
                    .filter(|_| router.sampled())
                    .map(|sampled_ms_ago| WalView {
                        lsn: wal.primary_lsn(shard),
                        lag_bytes: 0,
                        lag_ms: 0,
                        sampled_ms_ago,
                        wrong_role: wal.primary_read_only(shard),
                        readable: true,
                    });
                out.push(ShardState {
                    database: db.name.clone(),
                    shard,
                    replica: None,
                    address,
                    banned: false,
                    read_your_writes: mode,
                    wal: view,
                });
            }
            for (r, addr) in sh.replicas.iter().enumerate() {
                let Ok(address) = parse_address(addr) else {
                    continue;
                };
                let view = sw.replicas.get(r).and_then(|rw| {
                    let sampled_ms_ago = ago(rw.sampled_at.load(Ordering::Relaxed))?;
                    Some(WalView {
                        lsn: rw.replay.load(Ordering::Relaxed),
                        lag_bytes: rw.lag_bytes.load(Ordering::Relaxed),
                        lag_ms: rw.lag_us.load(Ordering::Relaxed) / 1000,
                        sampled_ms_ago,
                        wrong_role: rw.promoted.load(Ordering::Relaxed),
                        readable: wal.replica_ok(shard, r, 0),
                    })
                });
                out.push(ShardState {
                    database: db.name.clone(),
                    shard,
                    replica: Some(r),
                    address,
                    banned: router.is_banned(shard, r),
                    read_your_writes: mode,
                    wal: view.filter(|_| router.sampled()),
                });
            }
        }
    }
    out
}
