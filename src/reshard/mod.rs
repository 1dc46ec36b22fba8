//! Online resharding: `RESHARD shop TO shop_v2` moves every row of sharded database `shop`
//! onto the shards of configured database `shop_v2` (any number of them) under live
//! traffic, then switches `shop` to them.
//!
//! Phases (SHOW RESHARD):
//! 1. `schema`: reads the tables from the source's shard 0, checks every table has a replica
//!    identity and every new shard is empty, creates one publication per old shard, and
//!    copies the schema with `pg_dump --schema-only --section=pre-data` of shard 0.
//! 2. `copy`: per old shard a worker creates a logical replication slot exporting a snapshot
//!    and copies that snapshot's rows, each to the new shard the new hash names
//!    ([`worker`]); then the indexes and constraints (`--section=post-data`).
//! 3. `streaming`: the workers apply every change after their snapshot ([`apply`]), keeping
//!    the new shards milliseconds behind.
//! 4. `cutover`: new transactions on `shop` wait (its gate, see [`Registry::gate`]) while
//!    those in flight finish; a marker written into each old shard's WAL
//!    (`pg_logical_emit_message`) comes through its stream once everything before it is
//!    applied; sequences are advanced; `shop` is switched to the new shards; the waiting
//!    transactions go on there. If this takes too long it is undone and tried again.
//! 5. `done` (or `failed`, `cancelled`): workers stop; slots and publications are dropped.

pub mod apply;
pub mod cli;
mod conn;
pub mod pgoutput;
pub mod plan;
mod schema;
mod worker;

use crate::backend::{Pool, ServerConn};
use crate::config::{Config, Database};
use crate::App;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::RwLock;
use tokio_util::sync::CancellationToken;
use worker::WorkerState;

/// How long the cutover may hold new transactions while in-flight ones finish and the new
/// shards catch up; past it the attempt is undone (nothing switched) and tried again.
const CUTOVER_LIMIT: Duration = Duration::from_secs(3);
/// Failed cutover attempts before the reshard gives up.
const CUTOVER_ATTEMPTS: u32 = 20;
/// The cutover starts once the new shards are this close behind (bytes of WAL, summed).
const CUTOVER_LAG: u64 = 8 << 20;
/// … and this close behind in time.
const CUTOVER_LAG_MS: u64 = 500;
/// How often lag is sampled and progress published.
const TICK: Duration = Duration::from_millis(100);
/// How often a progress line is logged.
const LOG_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Schema,
    Copy,
    Streaming,
    Cutover,
    Done,
    Failed,
    Cancelled,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Schema => "schema",
            Phase::Copy => "copy",
            Phase::Streaming => "streaming",
            Phase::Cutover => "cutover",
            Phase::Done => "done",
            Phase::Failed => "failed",
            Phase::Cancelled => "cancelled",
        }
    }

    fn finished(self) -> bool {
        matches!(self, Phase::Done | Phase::Failed | Phase::Cancelled)
    }
}

/// A reshard's progress, shared with the admin console and the metrics.
pub struct Progress {
    pub source: String,
    pub target: String,
    phase: Mutex<Phase>,
    error: Mutex<Option<String>>,
    /// (table, old shard) copies to make, and made.
    pub tables: AtomicU64,
    pub tables_done: AtomicU64,
    pub rows_estimate: AtomicU64,
    pub rows_copied: AtomicU64,
    pub changes_applied: AtomicU64,
    pub lag_bytes: AtomicU64,
    pub lag_ms: AtomicU64,
    /// How long the switch held new transactions.
    pub cutover_ms: AtomicU64,
    started: Instant,
    /// When the copy started and how long it took.
    copy: Mutex<(Option<Instant>, Option<Duration>)>,
    /// RESHARD CANCEL.
    cancel: CancellationToken,
}

/// One row of SHOW RESHARD.
#[derive(Debug, Clone)]
pub struct Status {
    pub database: String,
    pub target: String,
    pub phase: &'static str,
    pub tables: u64,
    pub tables_done: u64,
    pub rows_copied: u64,
    pub rows_per_sec: u64,
    pub lag_bytes: u64,
    pub lag_ms: u64,
    pub eta_s: Option<u64>,
    pub elapsed_s: u64,
    pub cutover_ms: Option<u64>,
    pub changes_applied: u64,
    pub error: Option<String>,
}

impl Progress {
    fn new(source: &str, target: &str) -> Progress {
        Progress {
            source: source.to_string(),
            target: target.to_string(),
            phase: Mutex::new(Phase::Schema),
            error: Mutex::new(None),
            tables: AtomicU64::new(0),
            tables_done: AtomicU64::new(0),
            rows_estimate: AtomicU64::new(0),
            rows_copied: AtomicU64::new(0),
            changes_applied: AtomicU64::new(0),
            lag_bytes: AtomicU64::new(0),
            lag_ms: AtomicU64::new(0),
            cutover_ms: AtomicU64::new(0),
            started: Instant::now(),
            copy: Mutex::new((None, None)),
            cancel: CancellationToken::new(),
        }
    }

    pub fn phase(&self) -> Phase {
        *self.phase.lock()
    }

    fn set_phase(&self, p: Phase) {
        *self.phase.lock() = p;
        if p == Phase::Copy {
            self.copy.lock().0 = Some(Instant::now());
        } else {
            self.copied();
        }
    }

    /// The rows are copied (the rate stops counting; indexes are built next).
    fn copied(&self) {
        let mut copy = self.copy.lock();
        if copy.1.is_none() {
            copy.1 = copy.0.map(|s| s.elapsed());
        }
    }

    pub fn status(&self) -> Status {
        let phase = self.phase();
        let copied = self.rows_copied.load(Ordering::Relaxed);
        let (copy_start, copy_took) = *self.copy.lock();
        let copy_secs = copy_took
            .or_else(|| copy_start.map(|s| s.elapsed()))
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let rate = if copy_secs > 0.0 {
            (copied as f64 / copy_secs) as u64
        } else {
            0
        };
        let estimate = self.rows_estimate.load(Ordering::Relaxed);
        let eta_s = match phase {
            Phase::Schema => None,
            Phase::Copy if rate > 0 => Some(estimate.saturating_sub(copied) / rate),
            Phase::Copy => None,
            _ => Some(0),
        };
        let cutover = self.cutover_ms.load(Ordering::Relaxed);
        Status {
            database: self.source.clone(),
            target: self.target.clone(),
            phase: phase.as_str(),
            tables: self.tables.load(Ordering::Relaxed),
            tables_done: self.tables_done.load(Ordering::Relaxed),
            rows_copied: copied,
            rows_per_sec: rate,
            lag_bytes: self.lag_bytes.load(Ordering::Relaxed),
            lag_ms: self.lag_ms.load(Ordering::Relaxed),
            eta_s,
            elapsed_s: self.started.elapsed().as_secs(),
            cutover_ms: (phase == Phase::Done).then_some(cutover),
            changes_applied: self.changes_applied.load(Ordering::Relaxed),
            error: self.error.lock().clone(),
        }
    }

    fn publish_metrics(&self) {
        let s = self.status();
        let db = self.source.clone();
        metrics::gauge!("weir_reshard_rows_copied", "database" => db.clone())
            .set(s.rows_copied as f64);
        metrics::gauge!("weir_reshard_lag_bytes", "database" => db.clone()).set(s.lag_bytes as f64);
        metrics::gauge!("weir_reshard_lag_seconds", "database" => db.clone())
            .set(s.lag_ms as f64 / 1000.0);
        metrics::gauge!("weir_reshard_changes_applied", "database" => db.clone())
            .set(s.changes_applied as f64);
        let phase = self.phase() as u8 as f64;
        metrics::gauge!("weir_reshard_phase", "database" => db).set(phase);
    }
}

/// Process-wide reshard state (in [`App`]).
#[derive(Default)]
pub struct Registry {
    current: Mutex<Option<Arc<Progress>>>,
    /// Databases switched by a reshard: name → where they moved. Applied to every config
    /// loaded later (RELOAD, and a restart: see [`Registry::load`]).
    switched: Mutex<BTreeMap<String, Switched>>,
    /// The state file that keeps `switched` across restarts.
    state_file: Mutex<Option<std::path::PathBuf>>,
    gates: Mutex<HashMap<String, Arc<RwLock<()>>>>,
}

/// Where a reshard moved a database: the target's name and shards (each naming its
/// database).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Switched {
    database: String,
    target: String,
    shards: Vec<crate::config::ShardSection>,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct StateFile {
    #[serde(default)]
    switched: Vec<Switched>,
}

impl Registry {
    /// The gate of a sharded database: each transaction holds it shared from before it is
    /// routed until its server is returned; a cutover takes it exclusively, so new
    /// transactions wait and those in flight finish first.
    pub fn gate(&self, database: &str) -> Arc<RwLock<()>> {
        self.gates
            .lock()
            .entry(database.to_string())
            .or_default()
            .clone()
    }

    /// The latest reshard, running or finished.
    pub fn current(&self) -> Option<Arc<Progress>> {
        self.current.lock().clone()
    }

    /// The state file of the config at `config_path`: `<config>.reshard` beside it.
    pub fn state_path(config_path: &std::path::Path) -> std::path::PathBuf {
        let mut name = config_path.as_os_str().to_owned();
        name.push(".reshard");
        std::path::PathBuf::from(name)
    }

    /// Reads the switches earlier runs made (the state file beside the config), so a
    /// restart keeps serving a resharded database from its new shards until the config
    /// file says so itself. A missing file is no switch; a broken one is an error.
    pub fn load(&self, config_path: &std::path::Path) -> Result<(), String> {
        let path = Registry::state_path(config_path);
        *self.state_file.lock() = Some(path.clone());
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let state: StateFile =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut map = self.switched.lock();
        for s in state.switched {
            map.insert(s.database.clone(), s);
        }
        Ok(())
    }

    /// Records a switch, in the state file first (written whole, synced, renamed): an error
    /// leaves nothing switched.
    fn remember(&self, s: Switched) -> Result<(), String> {
        let mut all: BTreeMap<String, Switched> = self.switched.lock().clone();
        all.insert(s.database.clone(), s);
        if let Some(path) = self.state_file.lock().clone() {
            let state = StateFile {
                switched: all.values().cloned().collect(),
            };
            let text = toml::to_string(&state).map_err(|e| e.to_string())?;
            let text = format!(
                "# Written by Weir's RESHARD: these databases now use these shards, whatever the\n\
                 # config file says. Once the config file lists the same shards, this file can go.\n{text}"
            );
            write_durably(&path, text.as_bytes()).map_err(|e| {
                format!(
                    "cannot write the reshard state {}: {e} (nothing switched)",
                    path.display()
                )
            })?;
        }
        *self.switched.lock() = all;
        Ok(())
    }

    /// Gives switched databases their new shards in a freshly loaded config.
    pub fn apply(&self, config: &mut Config) {
        for (name, to) in self.switched.lock().iter() {
            if let Some(db) = config.databases.get(name) {
                if db.shards == to.shards {
                    continue;
                }
                if let Some(d) = switched(db, &to.shards) {
                    config.databases.insert(name.clone(), Arc::new(d));
                }
            }
        }
    }
}

/// Writes `path` whole or not at all: a synced temporary file renamed over it, then the
/// directory synced.
fn write_durably(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// `to`'s shards, each naming its database.
fn shards_of(to: &Database) -> Vec<crate::config::ShardSection> {
    to.shards
        .iter()
        .map(|s| {
            let mut s = s.clone();
            if s.dbname.is_none() {
                s.dbname = Some(to.dbname.clone());
            }
            s
        })
        .collect()
}

/// `db` served from `shards`.
fn switched(db: &Database, shards: &[crate::config::ShardSection]) -> Option<Database> {
    let mut d = db.clone();
    d.address = crate::config::parse_address(&shards.first()?.primary).ok()?;
    d.shards = shards.to_vec();
    Some(d)
}

/// Starts `RESHARD source TO target`, run as `user` (the source's `user=` if it forces one).
pub fn start(app: &Arc<App>, source: &str, target: &str, user: &str) -> Result<(), String> {
    let cluster = app.cluster();
    let src = cluster
        .config
        .database(source)
        .ok_or_else(|| format!("no such database: {source}"))?;
    let dst = cluster
        .config
        .database(target)
        .ok_or_else(|| format!("no such database: {target}"))?;
    if src.shards.is_empty() {
        return Err(format!("database {source} is not sharded"));
    }
    if dst.shards.is_empty() {
        return Err(format!(
            "database {target} is not sharded: configure its shards first"
        ));
    }
    if shards_of(&src) == shards_of(&dst) || source == target {
        return Err(format!("{source} and {target} have the same shards"));
    }
    let same_tables = |a: &Database, b: &Database| {
        let mut x = a.sharded_tables.clone();
        let mut y = b.sharded_tables.clone();
        x.sort_by(|p, q| p.table.cmp(&q.table));
        y.sort_by(|p, q| p.table.cmp(&q.table));
        x == y
    };
    if !same_tables(&src, &dst) {
        return Err(format!(
            "{source} and {target} must list the same sharded_tables"
        ));
    }
    let progress = {
        let mut cur = app.reshard.current.lock();
        if cur.as_ref().is_some_and(|p| !p.phase().finished()) {
            return Err("a reshard is already running (SHOW RESHARD; RESHARD CANCEL)".into());
        }
        let p = Arc::new(Progress::new(source, target));
        *cur = Some(p.clone());
        p
    };
    let user = src.user.clone().unwrap_or_else(|| user.to_string());
    tracing::info!(database = source, target, %user, "RESHARD started");
    tokio::spawn(run(app.clone(), progress, src, dst, user));
    Ok(())
}

/// RESHARD CANCEL: stops the running reshard before its cutover.
pub fn cancel(app: &App) -> Result<(), String> {
    match app.reshard.current() {
        Some(p) if !p.phase().finished() => {
            if p.phase() == Phase::Cutover {
                // The switch may be under way; the cutover checks the token before switching.
                tracing::warn!("RESHARD CANCEL during cutover: cancelled unless already switched");
            }
            p.cancel.cancel();
            Ok(())
        }
        _ => Err("no reshard is running".into()),
    }
}

async fn run(
    app: Arc<App>,
    progress: Arc<Progress>,
    src: Arc<Database>,
    dst: Arc<Database>,
    user: String,
) {
    let result = drive(&app, &progress, &src, &dst, &user).await;
    let phase = match &result {
        Ok(()) => Phase::Done,
        Err(_) if progress.cancel.is_cancelled() => Phase::Cancelled,
        Err(e) => {
            *progress.error.lock() = Some(e.clone());
            Phase::Failed
        }
    };
    progress.set_phase(phase);
    progress.publish_metrics();
    let s = progress.status();
    match phase {
        Phase::Done => tracing::info!(
            database = %src.name, target = %dst.name, rows_copied = s.rows_copied,
            rows_per_sec = s.rows_per_sec, changes_applied = s.changes_applied,
            cutover_ms = s.cutover_ms.unwrap_or(0), "RESHARD done: {} now uses the shards of {}",
            src.name, dst.name
        ),
        Phase::Cancelled => {
            tracing::info!(database = %src.name, "RESHARD cancelled; nothing switched")
        }
        _ => {
            tracing::error!(database = %src.name, error = %s.error.unwrap_or_default(), "RESHARD failed; nothing switched")
        }
    }
}

/// Connects to every shard of a list of pools (outside their slots).
async fn connect_all(pools: &[Arc<Pool>], what: &str) -> Result<Vec<ServerConn>, String> {
    let mut out = Vec::with_capacity(pools.len());
    for (i, p) in pools.iter().enumerate() {
        let c = tokio::time::timeout(Duration::from_secs(30), p.connect_unpooled())
            .await
            .map_err(|_| format!("connecting to {what} shard {i}: timed out"))?
            .map_err(|e| format!("connecting to {what} shard {i}: {e}"))?;
        out.push(c);
    }
    Ok(out)
}

/// A slot/publication name prefix for a database: `weir_reshard_<name>`, lower case,
/// other characters `_`, short enough for PostgreSQL's 63.
fn names_for(database: &str) -> String {
    let clean: String = database
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    format!("weir_reshard_{clean}")
}

async fn drive(
    app: &Arc<App>,
    progress: &Arc<Progress>,
    src: &Arc<Database>,
    dst: &Arc<Database>,
    user: &str,
) -> Result<(), String> {
    let cluster = app.cluster();
    let pools = |db: &Database| -> Result<Vec<Arc<Pool>>, String> {
        (0..db.shards.len())
            .map(|s| cluster.shard_pool(db, user, s, None))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| format!("database {} has an unusable shard", db.name))
    };
    let old_pools = pools(src)?;
    let new_pools = pools(dst)?;
    let mut olds = connect_all(&old_pools, "old").await?;
    let mut news = connect_all(&new_pools, "new").await?;
    let names = names_for(&src.name);

    // Phase 1: plan, checks, publications, schema.
    let tables = plan::tables(&mut olds[0], &src.sharded_tables).await?;
    for (j, c) in news.iter_mut().enumerate() {
        plan::check_empty(c, &format!("new shard {j} of {}", dst.name)).await?;
    }
    for (i, c) in olds.iter_mut().enumerate() {
        let rows = conn::query(c, "SHOW wal_level").await?;
        let level = rows.first().and_then(|r| r.first().cloned().flatten());
        if level.as_deref() != Some("logical") {
            return Err(format!(
                "old shard {i} has wal_level = {}: RESHARD needs wal_level = logical",
                level.unwrap_or_default()
            ));
        }
    }
    let slot = |i: usize| format!("{names}_{i}");
    // Leftovers of an interrupted run go; a slot in use means another run: nothing is touched.
    for (i, c) in olds.iter_mut().enumerate() {
        drop_slot_and_publication(c, &slot(i), false).await?;
    }
    // Sharded tables whose key is not in their replica identity: an update or delete would
    // not say which new shard its row is on. FULL identity sends the whole old row (key
    // included) for the duration; the cleanup puts the identity back.
    let widened: Vec<plan::Table> = tables
        .iter()
        .filter(|t| t.key.is_some() && !t.key_in_identity)
        .cloned()
        .collect();
    let result = async {
        for t in &widened {
            for (i, c) in olds.iter_mut().enumerate() {
                conn::query(
                    c,
                    &format!(
                        "SET lock_timeout = '10s'; ALTER TABLE {} REPLICA IDENTITY FULL; RESET lock_timeout",
                        t.qualified()
                    ),
                )
                .await
                .map_err(|e| format!("old shard {i}: {e}"))?;
            }
            tracing::info!(database = %src.name, table = %t.qualified(),
                "RESHARD: replica identity FULL while it runs (the sharding key is not in the identity)");
        }
        for (i, c) in olds.iter_mut().enumerate() {
            let list: Vec<String> = tables
                .iter()
                .filter(|t| t.on_old_shard(i))
                .map(plan::Table::qualified)
                .collect();
            let sql = if list.is_empty() {
                format!("CREATE PUBLICATION \"{}\"", slot(i))
            } else {
                format!(
                    "CREATE PUBLICATION \"{}\" FOR TABLE {}",
                    slot(i),
                    list.join(", ")
                )
            };
            conn::query(c, &sql)
                .await
                .map_err(|e| format!("creating publication on old shard {i}: {e}"))?;
        }
        let pre = schema::dump(&old_pools[0], schema::Section::PreData).await?;
        for (j, c) in news.iter_mut().enumerate() {
            schema::apply(c, &pre)
                .await
                .map_err(|e| format!("schema on new shard {j}: {e}"))?;
        }
        let copies: usize = (0..olds.len())
            .map(|i| tables.iter().filter(|t| t.on_old_shard(i)).count())
            .sum();
        progress.tables.store(copies as u64, Ordering::Relaxed);
        // Shard 0's estimate stands for every old shard's share of a sharded table.
        let old_shards = olds.len() as u64;
        let estimate: u64 = tables
            .iter()
            .map(|t| t.estimate * if t.key.is_some() { old_shards } else { 1 })
            .sum::<u64>();
        progress.rows_estimate.store(estimate, Ordering::Relaxed);
        stream_and_switch(
            app, progress, src, dst, &old_pools, &new_pools, &mut olds, &mut news, tables, &names,
        )
        .await
    }
    .await;
    // Phase 5: whatever happened, the slots and publications go, on fresh connections (the
    // failure may have been one of the coordinator's).
    drop(olds);
    for (i, pool) in old_pools.iter().enumerate() {
        let cleaned = async {
            let mut c = tokio::time::timeout(Duration::from_secs(10), pool.connect_unpooled())
                .await
                .map_err(|_| "connect timed out".to_string())?
                .map_err(|e| e.to_string())?;
            drop_slot_and_publication(&mut c, &slot(i), true).await?;
            for t in &widened {
                conn::query(
                    &mut c,
                    &format!(
                        "SET lock_timeout = '10s'; ALTER TABLE {} {}",
                        t.qualified(),
                        t.identity_sql
                    ),
                )
                .await?;
            }
            Ok::<(), String>(())
        };
        if let Err(e) = cleaned.await {
            tracing::warn!(database = %src.name, shard = i, error = %e,
                "RESHARD could not clean up its replication slot, publication or replica identities: drop the slot by hand (pg_drop_replication_slot)");
        }
    }
    result
}

/// Drops a reshard's slot and publication on an old shard; `wait` retries while the
/// slot is still in use by a worker that is ending.
async fn drop_slot_and_publication(
    c: &mut ServerConn,
    name: &str,
    wait: bool,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows = conn::query(
            c,
            &format!(
                "SELECT active FROM pg_catalog.pg_replication_slots WHERE slot_name = '{name}'"
            ),
        )
        .await?;
        match rows.first().and_then(|r| r.first().cloned().flatten()) {
            None => break,
            Some(active) if active == "t" => {
                if !wait || Instant::now() > deadline {
                    return Err(format!(
                        "replication slot {name} is in use (is another reshard running?)"
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Some(_) => {
                conn::query(
                    c,
                    &format!("SELECT pg_catalog.pg_drop_replication_slot('{name}')"),
                )
                .await?;
                break;
            }
        }
    }
    conn::query(c, &format!("DROP PUBLICATION IF EXISTS \"{name}\""))
        .await
        .map(|_| ())
}

#[allow(clippy::too_many_arguments)]
async fn stream_and_switch(
    app: &Arc<App>,
    progress: &Arc<Progress>,
    src: &Arc<Database>,
    dst: &Arc<Database>,
    old_pools: &[Arc<Pool>],
    new_pools: &[Arc<Pool>],
    olds: &mut [ServerConn],
    news: &mut [ServerConn],
    tables: Vec<plan::Table>,
    names: &str,
) -> Result<(), String> {
    progress.set_phase(Phase::Copy);
    let (post_tx, post_rx) = tokio::sync::watch::channel(false);
    let stop = CancellationToken::new();
    let job = Arc::new(worker::Job {
        progress: progress.clone(),
        tables,
        old_shards: old_pools.len(),
        new_pools: new_pools.to_vec(),
        names: names.to_string(),
        cancel: stop.clone(),
        post_data: post_rx,
    });
    let states: Vec<Arc<WorkerState>> = (0..old_pools.len()).map(WorkerState::new).collect();
    let mut workers = tokio::task::JoinSet::new();
    for (i, pool) in old_pools.iter().enumerate() {
        workers.spawn(worker::run(job.clone(), states[i].clone(), pool.clone()));
    }
    let _stop_workers = stop.clone().drop_guard();
    let mut tick = tokio::time::interval(TICK);
    let mut last_log = Instant::now();
    let mut lag = Lag::new(olds.len());
    let mut attempts = 0u32;
    let mut token = 0u64;
    let mut staged = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            done = workers.join_next(), if !workers.is_empty() => {
                match done {
                    Some(Ok(Err(e))) => return Err(e),
                    Some(Err(e)) => return Err(format!("reshard worker ended: {e}")),
                    _ => return Err("a reshard worker stopped".into()),
                }
            }
            _ = progress.cancel.cancelled() => return Err("cancelled".into()),
        }
        if progress.phase() == Phase::Copy
            && states.iter().all(|s| s.copied.load(Ordering::Acquire))
        {
            progress.copied();
            let post = schema::dump(&old_pools[0], schema::Section::PostData).await?;
            for (j, c) in news.iter_mut().enumerate() {
                schema::apply(c, &post)
                    .await
                    .map_err(|e| format!("indexes and constraints on new shard {j}: {e}"))?;
                // The dump carries the FULL identity RESHARD gave such tables: not theirs.
                for t in job
                    .tables
                    .iter()
                    .filter(|t| t.key.is_some() && !t.key_in_identity)
                {
                    conn::query(
                        c,
                        &format!("ALTER TABLE {} {}", t.qualified(), t.identity_sql),
                    )
                    .await
                    .map_err(|e| format!("replica identity on new shard {j}: {e}"))?;
                }
                // Statistics now, not from autovacuum just as the traffic arrives.
                conn::query_long(c, "ANALYZE")
                    .await
                    .map_err(|e| format!("ANALYZE on new shard {j}: {e}"))?;
            }
            post_tx.send_replace(true);
            progress.set_phase(Phase::Streaming);
        }
        if progress.phase() != Phase::Copy {
            lag.sample(progress, &states, olds, &mut token).await?;
        }
        if last_log.elapsed() >= LOG_EVERY {
            last_log = Instant::now();
            let s = progress.status();
            tracing::info!(
                database = %src.name, phase = s.phase, tables_done = s.tables_done, tables = s.tables,
                rows_copied = s.rows_copied, rows_per_sec = s.rows_per_sec,
                changes_applied = s.changes_applied, lag_bytes = s.lag_bytes, lag_ms = s.lag_ms,
                eta_s = s.eta_s.unwrap_or(0), "RESHARD progress"
            );
        }
        progress.publish_metrics();
        let streaming = states.iter().all(|s| s.streaming.load(Ordering::Acquire));
        if progress.phase() == Phase::Streaming
            && streaming
            && lag.measured()
            && progress.lag_bytes.load(Ordering::Relaxed) <= CUTOVER_LAG
            && progress.lag_ms.load(Ordering::Relaxed) <= CUTOVER_LAG_MS
        {
            if staged.is_none() {
                staged = Some(stage(app, src, dst, &job.tables).await);
            }
            let Some(staged) = &staged else { continue };
            token += 1;
            progress.set_phase(Phase::Cutover);
            if cutover(app, progress, src, dst, &states, olds, news, token, staged).await? {
                return Ok(());
            }
            progress.set_phase(Phase::Streaming);
            attempts += 1;
            if attempts >= CUTOVER_ATTEMPTS {
                return Err(format!(
                    "no cutover after {attempts} attempts: transactions on {} stayed open longer than {} ms",
                    src.name,
                    CUTOVER_LIMIT.as_millis()
                ));
            }
            tracing::warn!(database = %src.name, attempts, "RESHARD cutover attempt gave up; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// A marker written into an old shard's WAL: its token, WAL position and when.
struct Probe {
    token: u64,
    lsn: u64,
    at: Instant,
}

/// Writes marker `token` into old shard `c`'s WAL and flushes it (so the stream carries it
/// at once whatever the server's synchronous_commit); returns its WAL position.
async fn emit_marker(c: &mut ServerConn, token: u64) -> Result<u64, String> {
    let rows = conn::query(
        c,
        &format!(
            "BEGIN; SET LOCAL synchronous_commit = on; \
             SELECT pg_catalog.pg_logical_emit_message(true, '{}', '{token}')::text; COMMIT",
            worker::MARKER_PREFIX
        ),
    )
    .await?;
    rows.first()
        .and_then(|r| r.first().cloned().flatten())
        .and_then(|l| crate::router::wal::parse_lsn(&l))
        .ok_or_else(|| "pg_logical_emit_message returned no position".to_string())
}

/// Lag of the new shards, measured with markers: each tick writes one into every old
/// shard's WAL; a worker reports a marker once every change before it is committed on the
/// new shards. Lag is the WAL written since the last marker applied, and the age of the
/// oldest marker not yet applied.
struct Lag {
    probes: Vec<std::collections::VecDeque<Probe>>,
    applied_lsn: Vec<u64>,
}

impl Lag {
    fn new(shards: usize) -> Lag {
        Lag {
            probes: (0..shards).map(|_| Default::default()).collect(),
            applied_lsn: vec![0; shards],
        }
    }

    /// Every worker has applied a marker: the lag figures mean something.
    fn measured(&self) -> bool {
        self.applied_lsn.iter().all(|&l| l != 0)
    }

    async fn sample(
        &mut self,
        progress: &Progress,
        states: &[Arc<WorkerState>],
        olds: &mut [ServerConn],
        token: &mut u64,
    ) -> Result<(), String> {
        let mut bytes = 0u64;
        let mut ms = 0u64;
        for (i, c) in olds.iter_mut().enumerate() {
            *token += 1;
            let lsn = emit_marker(c, *token).await?;
            let q = &mut self.probes[i];
            q.push_back(Probe {
                token: *token,
                lsn,
                at: Instant::now(),
            });
            let seen = *states[i].marker.borrow();
            while q.front().is_some_and(|p| p.token <= seen) {
                if let Some(p) = q.pop_front() {
                    self.applied_lsn[i] = p.lsn;
                }
            }
            if let Some(oldest) = q.front() {
                ms = ms.max(oldest.at.elapsed().as_millis() as u64);
                let base = match self.applied_lsn[i] {
                    0 => oldest.lsn,
                    applied => applied,
                };
                bytes += lsn.saturating_sub(base);
            }
        }
        progress.lag_bytes.store(bytes, Ordering::Relaxed);
        progress.lag_ms.store(ms, Ordering::Relaxed);
        Ok(())
    }
}

/// The switched database's pools, built and given servers before the cutover, so the
/// transactions waiting at the gate find servers ready instead of all connecting at once.
struct Staged {
    cluster: crate::cluster::Cluster,
    /// A user of the database's pools (its router's background work runs as one).
    user: Option<String>,
}

/// Builds [`Staged`]: for every user with pools on `src`, a pool per new shard primary
/// with as many servers as that user's busiest old pool has (at most its pool size).
async fn stage(app: &App, src: &Database, dst: &Database, tables: &[plan::Table]) -> Staged {
    // Each new server reads the tables' catalog entries once before traffic arrives (a
    // fresh backend's first statement on a table costs milliseconds of CPU).
    let warm: Arc<str> = tables
        .iter()
        .map(|t| format!("SELECT FROM {} LIMIT 0;", t.qualified()))
        .collect::<String>()
        .into();
    let live = app.cluster();
    let mut config = (*live.config).clone();
    let base = live
        .config
        .database(&src.name)
        .unwrap_or_else(|| Arc::new(src.clone()));
    let db = Arc::new(switched(&base, &shards_of(dst)).unwrap_or_else(|| (*base).clone()));
    config.databases.insert(src.name.clone(), db.clone());
    let cluster = live.staging(Arc::new(config));
    let mut users: BTreeMap<String, (usize, Arc<Pool>)> = BTreeMap::new();
    for p in live.pools() {
        if p.settings.database != src.name || p.settings.replica.is_some() {
            continue;
        }
        let n = p.counts().total;
        let e = users
            .entry(p.client_user.clone())
            .or_insert_with(|| (0, p.clone()));
        e.0 = e.0.max(n);
    }
    let mut opening = tokio::task::JoinSet::new();
    for (user, (n, old)) in &users {
        for j in 0..db.shards.len() {
            let Some(pool) = cluster.shard_pool(&db, user, j, None) else {
                continue;
            };
            pool.inherit_auth(old);
            for _ in 0..(*n).clamp(1, pool.settings.pool_size.max(1)) {
                let p = pool.clone();
                let warm = warm.clone();
                opening.spawn(async move {
                    let mut got = p.checkout().await;
                    if let Ok(c) = &mut got {
                        if !warm.is_empty() && c.exec(&warm).await.is_err() {
                            got = Err(crate::backend::CheckoutError::WaitTimeout);
                        }
                    }
                    (p.clone(), got)
                });
            }
        }
    }
    let mut opened = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Ok(Some(done)) = tokio::time::timeout_at(deadline, opening.join_next()).await {
        if let Ok((pool, Ok(conn))) = done {
            opened.push((pool, conn));
        }
    }
    for (pool, conn) in opened {
        pool.checkin(conn);
    }
    Staged {
        cluster,
        user: users.keys().next().cloned(),
    }
}

/// The part of a cutover under the closed gate before the switch: no two-phase transaction
/// left between its phases on an old shard, every change before a last marker applied,
/// sequences advanced, the switch recorded. False: try again later.
#[allow(clippy::too_many_arguments)]
async fn catch_up(
    app: &App,
    progress: &Progress,
    src: &Database,
    dst: &Database,
    states: &[Arc<WorkerState>],
    olds: &mut [ServerConn],
    news: &mut [ServerConn],
    token: u64,
) -> Result<bool, String> {
    for (i, c) in olds.iter_mut().enumerate() {
        // A transaction prepared but not yet settled (its COMMIT PREPARED comes from
        // recovery) would commit on the old shard after the switch.
        let rows = conn::query(
            c,
            "SELECT count(*) FROM pg_catalog.pg_prepared_xacts WHERE gid LIKE 'weir\\_%' \
             AND database = current_database()",
        )
        .await?;
        let n = rows.first().and_then(|r| r.first().cloned().flatten());
        if n.as_deref() != Some("0") {
            tracing::info!(database = %src.name, shard = i, "RESHARD cutover waits for prepared transactions to settle");
            return Ok(false);
        }
        emit_marker(c, token)
            .await
            .map_err(|e| format!("cutover marker on old shard {i}: {e}"))?;
    }
    for s in states {
        let mut rx = s.marker.subscribe();
        if rx.wait_for(|t| *t >= token).await.is_err() {
            return Ok(false);
        }
    }
    tracing::debug!(token, "reshard cutover: caught up");
    let mut seen: BTreeMap<String, i64> = BTreeMap::new();
    for c in olds.iter_mut() {
        for (name, v) in plan::sequences(c).await? {
            let e = seen.entry(name).or_insert(v);
            *e = (*e).max(v);
        }
    }
    let setval = plan::setval_sql(&seen);
    if !setval.is_empty() {
        for (j, c) in news.iter_mut().enumerate() {
            conn::query(c, &setval)
                .await
                .map_err(|e| format!("advancing sequences on new shard {j}: {e}"))?;
        }
    }
    if progress.cancel.is_cancelled() {
        return Err("cancelled".into());
    }
    // Durable before any client runs on the new shards: a restart must not go back.
    app.reshard.remember(Switched {
        database: src.name.clone(),
        target: dst.name.clone(),
        shards: shards_of(dst),
    })?;
    Ok(true)
}

/// One cutover attempt: true once `src` uses the new shards, false if it was undone.
#[allow(clippy::too_many_arguments)]
async fn cutover(
    app: &Arc<App>,
    progress: &Progress,
    src: &Arc<Database>,
    dst: &Arc<Database>,
    states: &[Arc<WorkerState>],
    olds: &mut [ServerConn],
    news: &mut [ServerConn],
    token: u64,
    staged: &Staged,
) -> Result<bool, String> {
    let gate = app.reshard.gate(&src.name);
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + CUTOVER_LIMIT;
    // New transactions wait from here; those in flight finish.
    let Ok(guard) = tokio::time::timeout_at(deadline, gate.write_owned()).await else {
        return Ok(false);
    };
    let gated = started.elapsed();
    tracing::debug!(token, "reshard cutover: gate closed");
    // Everything under the closed gate is bounded: a server that stops answering fails the
    // reshard (nothing switched) instead of holding the database's transactions.
    let ready = tokio::time::timeout_at(
        deadline,
        catch_up(app, progress, src, dst, states, olds, news, token),
    )
    .await;
    let caught_up = started.elapsed();
    match ready {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => return Ok(false),
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(format!(
                "cutover: the shards did not answer within {} ms",
                CUTOVER_LIMIT.as_millis()
            ))
        }
    }
    let config = (*app.cluster().config).clone();
    app.reload(config);
    tracing::debug!("reshard cutover: reloaded");
    let live = app.cluster();
    live.adopt(&staged.cluster);
    // The new router (and its catalog read) before the waiting transactions need it.
    if let (Some(db), Some(user)) = (live.config.database(&src.name), &staged.user) {
        live.router_started(&db, user);
    }
    tracing::debug!("reshard cutover: adopted");
    drop(guard);
    let ms = started.elapsed().as_millis() as u64;
    progress.cutover_ms.store(ms, Ordering::Relaxed);
    tracing::info!(database = %src.name, cutover_ms = ms, in_flight_ms = gated.as_millis() as u64,
        caught_up_ms = caught_up.as_millis() as u64, "RESHARD switched {} to the shards of {}", src.name, dst.name);
    Ok(true)
}
