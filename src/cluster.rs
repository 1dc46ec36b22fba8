//! The live pools built from one `Config`. Reload builds a new cluster and
//! moves over every pool whose settings did not change, so its connections
//! and waiting clients carry on; changed pools are retired.

use crate::backend::login::Credentials;
use crate::backend::{Pool, PoolSettings, Target};
use crate::config::{Config, Database, Secret};
use crate::router::route::ShardRouter;
use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Which pool: database and login user, and for sharded databases the shard
/// and the replica (`None` = the primary).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub database: String,
    pub user: String,
    pub shard: usize,
    pub replica: Option<usize>,
}

/// What the admin console paused (PAUSE, KILL): new transactions on these
/// databases wait until RESUME. Kept across reloads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Paused {
    /// PAUSE without a database.
    pub all: bool,
    pub databases: BTreeSet<String>,
}

impl Paused {
    pub fn covers(&self, database: &str) -> bool {
        self.all || self.databases.contains(database)
    }
}

/// Pools kept before unused ones of `*`-made databases are swept (see `sweep_auto_pools`).
const AUTO_POOL_SWEEP_AT: usize = 256;

pub struct Cluster {
    pub config: Arc<Config>,
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    routers: Mutex<HashMap<String, Arc<ShardRouter>>>,
    paused: Mutex<Paused>,
    /// max_db_connections / max_user_connections, shared by pools and kept across reloads.
    caps: Arc<crate::backend::cap::Caps>,
}

impl Cluster {
    pub fn new(config: Arc<Config>) -> Cluster {
        Cluster {
            config,
            pools: Mutex::new(HashMap::new()),
            routers: Mutex::new(HashMap::new()),
            paused: Mutex::new(Paused::default()),
            caps: Arc::default(),
        }
    }

    /// The shared connection caps of a new pool of `db` logged in as `login_user`, with the
    /// limits of this config.
    fn caps_for(&self, db: &Database, login_user: &str) -> Vec<Arc<crate::backend::cap::Cap>> {
        let g = &self.config.general;
        let user_max = self
            .config
            .users
            .get(login_user)
            .map(|u| u.max_user_connections)
            .filter(|n| *n > 0)
            .unwrap_or(g.max_user_connections);
        self.caps
            .for_pool(&db.name, db.max_db_connections, login_user, user_max)
    }

    /// Server connections open to a database, over all its pools.
    pub fn db_connections(&self, database: &str) -> usize {
        self.caps.db_count(database)
    }

    pub fn paused(&self) -> Paused {
        self.paused.lock().clone()
    }

    /// Pauses or resumes every pool as `paused` says; pools created later
    /// start paused if it covers their database.
    pub fn set_paused(&self, paused: Paused) {
        *self.paused.lock() = paused.clone();
        for pool in self.pools() {
            if paused.covers(&pool.settings.database) {
                pool.pause();
            } else {
                pool.resume();
            }
        }
    }

    /// Builds the cluster for a reloaded config, keeping unchanged pools.
    pub fn reload(old: &Cluster, config: Arc<Config>) -> Cluster {
        let mut new = Cluster::new(config);
        for router in old.routers() {
            // Its sampler and recovery tasks end; sessions move to the new router.
            router.retired.store(true, Ordering::Relaxed);
        }
        new.caps = old.caps.clone();
        *new.paused.lock() = old.paused();
        let old_pools = std::mem::take(&mut *old.pools.lock());
        let mut kept = HashMap::new();
        for (key, pool) in old_pools {
            if let Some(s) = new.same_settings(&key, &pool) {
                // Sizes, timeouts and lifetimes change in place; waiting clients stay queued.
                pool.retune(&s);
                if let Some(db) = new.config.database(&key.database) {
                    new.caps_for(&db, &key.user); // applies the new limits
                }
                kept.insert(key, pool);
            } else {
                tracing::info!(db = %key.database, user = %key.user, "pool settings changed; retiring old pool");
                pool.retire();
            }
        }
        *new.pools.lock() = kept;
        new
    }

    /// This cluster's settings for `pool` (under `key`) when it would build that pool the
    /// same way, so the pool can be kept (reload) or taken over (adopt).
    fn same_settings(&self, key: &PoolKey, pool: &Pool) -> Option<PoolSettings> {
        self.config
            .database(&key.database)
            .and_then(|d| self.settings_at(&d, &pool.client_user, key.shard, key.replica))
            .filter(|s| s.same_pool(&pool.settings))
    }

    /// An empty cluster for `config` sharing this one's connection caps and pause state:
    /// pools are built and warmed in it before they go live (a reshard's cutover), then
    /// [`Cluster::adopt`]ed.
    pub fn staging(&self, config: Arc<Config>) -> Cluster {
        let mut c = Cluster::new(config);
        c.caps = self.caps.clone();
        *c.paused.lock() = self.paused();
        c
    }

    /// Takes over the pools of `staged` (see [`Cluster::staging`]) that this cluster lacks
    /// and would build the same.
    pub fn adopt(&self, staged: &Cluster) {
        let from = std::mem::take(&mut *staged.pools.lock());
        let mut pools = self.pools.lock();
        for (key, pool) in from {
            if self.same_settings(&key, &pool).is_some() && !pools.contains_key(&key) {
                if self.paused.lock().covers(&key.database) {
                    pool.pause();
                } else {
                    pool.resume();
                }
                pools.insert(key, pool);
            }
        }
    }

    /// Opens the pools PgBouncer keeps warm without any client: those of databases with a
    /// forced `user=` and a `min_pool_size` (their housekeeping opens the connections).
    /// Needs a Tokio runtime; without one (config checks) it does nothing.
    pub fn open_forced_pools(&self) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        for db in self.config.databases.values() {
            if let Some(user) = &db.user {
                // A sharded database with a login of its own is watched from the start.
                self.router_started(db, user);
            }
            if let (Some(user), true) = (&db.user, db.min_pool_size > 0) {
                for pool in self.user_pools(db, user) {
                    drop(pool);
                }
            }
        }
    }

    /// The pool for a client of `db` logged in as `user`, created on first use.
    pub fn pool(&self, db: &Database, user: &str) -> Arc<Pool> {
        self.shard_pool(db, user, 0, None)
            .unwrap_or_else(|| self.shard_pool_fallback(db, user))
    }

    /// Every pool of `db` for `user`: each shard's primary and replicas.
    pub fn user_pools(&self, db: &Database, user: &str) -> Vec<Arc<Pool>> {
        if db.shards.is_empty() {
            return vec![self.pool(db, user)];
        }
        let mut out = Vec::new();
        for (i, shard) in db.shards.iter().enumerate() {
            out.extend(self.shard_pool(db, user, i, None));
            for r in 0..shard.replicas.len() {
                out.extend(self.shard_pool(db, user, i, Some(r)));
            }
        }
        out
    }

    /// The pool for one shard's primary (`replica = None`) or one replica.
    pub fn shard_pool(
        &self,
        db: &Database,
        user: &str,
        shard: usize,
        replica: Option<usize>,
    ) -> Option<Arc<Pool>> {
        let key = PoolKey {
            database: db.name.clone(),
            user: db.user.clone().unwrap_or_else(|| user.to_string()),
            shard,
            replica,
        };
        if let Some(p) = self.pools.lock().get(&key) {
            return Some(p.clone());
        }
        let settings = self.settings_at(db, user, shard, replica)?;
        let caps = self.caps_for(db, &settings.user);
        let mut pools = self.pools.lock();
        let auto = !self.config.databases.contains_key(&db.name);
        if pools.len() >= AUTO_POOL_SWEEP_AT && auto {
            self.sweep_auto_pools(&mut pools);
        }
        if auto && !pools.keys().any(|k| k.database == db.name) {
            // PgBouncer's words, once per database the `*` entry stands in for.
            tracing::info!("registered new auto-database: {}", db.name);
        }
        Some(
            pools
                .entry(key)
                .or_insert_with(|| {
                    let pool = Pool::new(settings, user, caps);
                    if self.paused.lock().covers(&db.name) {
                        pool.pause();
                    }
                    pool
                })
                .clone(),
        )
    }

    /// Drops pools of databases that only the `*` entry made (a name a client chose, maybe
    /// before logging in, as auth_query looks users up there) that hold no server and that
    /// nobody uses, so such names cannot grow the map without bound.
    fn sweep_auto_pools(&self, pools: &mut HashMap<PoolKey, Arc<Pool>>) {
        pools.retain(|key, pool| {
            self.config.databases.contains_key(&key.database)
                || Arc::strong_count(pool) > 1
                || pool.counts().total > 0
        });
    }

    /// After a failed login to a database only the `*` entry made: forget its pools if they
    /// hold no server and nobody else uses them (auth_query may have made one for the lookup).
    pub fn forget_unused_auto(&self, database: &str) {
        if self.config.databases.contains_key(database) {
            return;
        }
        self.pools.lock().retain(|key, pool| {
            key.database != database || Arc::strong_count(pool) > 1 || pool.counts().total > 0
        });
    }

    fn shard_pool_fallback(&self, db: &Database, user: &str) -> Arc<Pool> {
        // Only reachable for a database whose shard 0 is missing, which
        // validation prevents; keep a working pool rather than panic.
        let settings = self.settings(db, user);
        let caps = self.caps_for(db, &settings.user);
        Pool::new(settings, user, caps)
    }

    /// The shard router of a sharded database (shared by its sessions).
    pub fn router(&self, db: &Database) -> Option<Arc<ShardRouter>> {
        if db.shards.is_empty() {
            return None;
        }
        let mut routers = self.routers.lock();
        if let Some(r) = routers.get(&db.name) {
            return Some(r.clone());
        }
        let r = Arc::new(ShardRouter::new(db)?);
        routers.insert(db.name.clone(), r.clone());
        Some(r)
    }

    /// The router of a sharded database with its background work started: the WAL
    /// sampler (read-your-writes, replica lag) once per router, with `user`'s credentials.
    pub fn router_started(&self, db: &Database, user: &str) -> Option<Arc<ShardRouter>> {
        let router = self.router(db)?;
        let start = tokio::runtime::Handle::try_current().is_ok()
            && !router.sampler_started.swap(true, Ordering::SeqCst);
        if start && !router.tables().is_empty() {
            if let Some(pool) = self.shard_pool(db, user, 0, None) {
                crate::backend::catalog::spawn_refresh(router.clone(), pool);
            }
        }
        if start && router.two_phase_commit {
            let primaries: Option<Vec<_>> = (0..db.shards.len())
                .map(|s| self.shard_pool(db, user, s, None))
                .collect();
            if let Some(p) = primaries {
                crate::backend::twophase::start(&router, p);
            }
        }
        if start && router.sampled() {
            let mut servers = Vec::new();
            for (shard, sh) in db.shards.iter().enumerate() {
                let roles = std::iter::once(None).chain((0..sh.replicas.len()).map(Some));
                for replica in roles {
                    if let Some(pool) = self.shard_pool(db, user, shard, replica) {
                        servers.push((shard, replica, pool));
                    }
                }
            }
            crate::backend::walsample::start(&router, servers);
        }
        Some(router)
    }

    /// Every shard router built so far.
    pub fn routers(&self) -> Vec<Arc<ShardRouter>> {
        self.routers.lock().values().cloned().collect()
    }

    /// pool_idle_timeout: frees pools that had no client and no server for `timeout`
    /// (`in_use(database, client_user)` says whether a client uses one); pools kept open by
    /// `min_pool_size` stay.
    pub fn cleanup_idle_pools(&self, timeout: Duration, in_use: impl Fn(&str, &str) -> bool) {
        let now = crate::stats::now_us();
        let limit = timeout.as_micros() as u64;
        let mut freed = Vec::new();
        self.pools.lock().retain(|_, pool| {
            // As PgBouncer: idle counts from the last client (servers may outlive it until
            // server_idle_timeout); the pool goes once it also has no server.
            let unused = pool.tuning().min_pool_size == 0
                && !in_use(&pool.settings.database, &pool.client_user);
            if !unused {
                pool.unused_since.store(0, Ordering::Relaxed);
                return true;
            }
            let since = pool.unused_since.load(Ordering::Relaxed);
            if since == 0 {
                pool.unused_since.store(now, Ordering::Relaxed);
                return true;
            }
            if now.saturating_sub(since) < limit || pool.counts().total > 0 {
                return true;
            }
            freed.push((pool.clone(), now.saturating_sub(since) / 1_000_000));
            false
        });
        for (pool, age) in freed {
            pool.retire();
            tracing::info!(
                "cleaning up idle pool for user {} on db {} because: pool idle timeout (age= {age}s)",
                pool.settings.user,
                pool.settings.database
            );
        }
    }

    pub fn pools(&self) -> Vec<Arc<Pool>> {
        self.pools.lock().values().cloned().collect()
    }

    /// Settings for a shard's primary or replica pool; `None` if it does not exist.
    pub fn settings_at(
        &self,
        db: &Database,
        client_user: &str,
        shard: usize,
        replica: Option<usize>,
    ) -> Option<PoolSettings> {
        let mut s = self.settings(db, client_user);
        if db.shards.is_empty() {
            return (shard == 0 && replica.is_none()).then_some(s);
        }
        let sh = db.shards.get(shard)?;
        let addr = match replica {
            None => &sh.primary,
            Some(r) => sh.replicas.get(r)?,
        };
        s.target.address = crate::config::parse_address(addr).ok()?;
        if let Some(name) = &sh.dbname {
            s.target.dbname = name.clone();
        }
        s.target.hosts.clear();
        s.shard = Some(shard);
        s.replica = replica;
        Some(s)
    }

    /// Pool settings for (database, client user), following PgBouncer: a
    /// database with `user=` forces that login for every client.
    pub fn settings(&self, db: &Database, client_user: &str) -> PoolSettings {
        let g = &self.config.general;
        let login_user = db.user.clone().unwrap_or_else(|| client_user.to_string());
        let user_cfg = self.config.users.get(&login_user);
        let secret = match (&db.user, &db.password) {
            (Some(_), Some(p)) => Some(Secret::parse(p)),
            _ => user_cfg.and_then(|u| u.secret.clone()),
        };
        let client_cfg = self.config.users.get(client_user);
        PoolSettings {
            database: db.name.clone(),
            user: login_user.clone(),
            target: Target {
                address: db.address.clone(),
                // A sharded database's own pool is shard 0's primary.
                dbname: db
                    .shards
                    .first()
                    .and_then(|s| s.dbname.clone())
                    .unwrap_or_else(|| db.dbname.clone()),
                params: db.server_params.clone(),
                connect_timeout: g.server_connect_timeout,
                tls: self.config.tls.server.clone(),
                connect_query: db.connect_query.clone(),
                hosts: db.hosts.clone(),
                round_robin: db.load_balance_hosts.as_deref() != Some("disable"),
            },
            creds: Credentials {
                user: login_user,
                secret,
                scram_client_key: None,
            },
            mode: client_cfg
                .and_then(|u| u.pool_mode)
                .or(db.pool_mode)
                .unwrap_or(g.pool_mode),
            // As PgBouncer: the pool's user's own setting (the forced user's, where the
            // database names one) over the database's over the global one.
            pool_size: user_cfg
                .and_then(|u| u.pool_size)
                .or(db.pool_size)
                .unwrap_or(g.default_pool_size),
            reserve_size: user_cfg
                .and_then(|u| u.reserve_pool_size)
                .unwrap_or(db.reserve_pool_size),
            min_pool_size: db.min_pool_size,
            reserve_timeout: g.reserve_pool_timeout,
            query_wait_timeout: user_cfg
                .and_then(|u| u.query_wait_timeout)
                .or(db.query_wait_timeout)
                .unwrap_or(g.query_wait_timeout),
            server_lifetime: db.server_lifetime.unwrap_or(g.server_lifetime),
            server_idle_timeout: g.server_idle_timeout,
            login_retry: g.server_login_retry,
            check_delay: g.server_check_delay,
            check_query: g.server_check_query.clone(),
            shard: None,
            replica: None,
        }
    }
}
