//! Weir: a PgBouncer-compatible, transaction-mode PostgreSQL connection pooler.
//!
//! `run` starts everything from a loaded [`config::Config`], so tests can run
//! Weir in-process as well as through the `weir` binary.

pub mod admin;
pub mod auth;
pub mod backend;
pub mod cluster;
pub mod config;
pub mod frontend;
/// Fuzz targets over the parsers peer and operator input reaches (`fuzz/`, `tests/fuzz_smoke.rs`).
pub mod fuzzing;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod reshard;
pub mod router;
pub mod stats;
pub mod tls;
pub mod wire;

use cluster::Cluster;
use config::Config;
use frontend::cancel::CancelRegistry;
use parking_lot::RwLock;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::watch;

/// Weir's version: `git describe --tags` of the build (e.g. `0.2.0` on a release tag,
/// `0.2.0-3-g1a2b3c4` three commits after it), else the package version. SHOW VERSION,
/// `--version`, the startup line and `weir_build_info` show it.
pub const VERSION: &str = env!("WEIR_VERSION");

/// How far a shutdown has gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    Running,
    /// SIGINT, SHUTDOWN WAIT_FOR_SERVERS: finish in-flight transactions, then leave.
    Graceful,
    /// SIGTERM, SHUTDOWN WAIT_FOR_CLIENTS: accept no new clients (the Unix socket still takes
    /// admin console logins), keep serving the connected ones, leave when the last is gone.
    WaitForClients,
    /// SIGTERM: leave now.
    Immediate,
}

/// Logged-in clients per database and per user, admin console included
/// (`max_db_client_connections`, `max_user_client_connections`; SHOW DATABASES and SHOW USERS).
#[derive(Default)]
pub struct ClientCounts {
    by_db: std::collections::HashMap<String, usize>,
    by_user: std::collections::HashMap<String, usize>,
}

/// Which client limit refused a login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientLimit {
    Database,
    User,
}

impl ClientLimit {
    /// PgBouncer's words for the refusal.
    pub fn message(self) -> &'static str {
        match self {
            ClientLimit::Database => "client connections exceeded (max_db_client_connections)",
            ClientLimit::User => "client connections exceeded (max_user_client_connections)",
        }
    }
}

/// State shared by every task of one Weir process.
pub struct App {
    cluster: RwLock<Arc<Cluster>>,
    generation: AtomicU64,
    pub cancels: CancelRegistry,
    /// Weir-wide prepared statements (query text and types → `weir_<n>`).
    pub statements: backend::prepared::Registry,
    /// One copy of each distinct client parameter set (see `SharedParams`).
    pub param_sets: backend::params::SharedParams,
    /// Connected clients (for max_client_conn).
    pub clients: AtomicUsize,
    /// Clients currently holding a server connection.
    pub active: AtomicUsize,
    pub shutdown: watch::Sender<Shutdown>,
    /// Logged-in clients, for SHOW CLIENTS and KILL.
    pub client_list: stats::Registry<stats::ClientInfo>,
    /// Where the config came from (RELOAD reads it again).
    pub config_path: PathBuf,
    /// Process start, µs since the epoch.
    pub started: u64,
    /// Databases closed to new clients by the admin DISABLE command.
    pub disabled: parking_lot::Mutex<std::collections::HashSet<String>>,
    /// The admin console's own state (stats periods, open consoles).
    pub admin: admin::State,
    /// Online resharding: the running job, switched databases, transaction gates.
    pub reshard: reshard::Registry,
    client_counts: parking_lot::Mutex<ClientCounts>,
}

impl App {
    pub fn new(config: Config) -> Arc<App> {
        let (shutdown, _) = watch::channel(Shutdown::Running);
        let config_path = config.path.clone();
        let reshard = reshard::Registry::default();
        if let Err(e) = reshard.load(&config_path) {
            tracing::error!("{e}");
        }
        let mut config = config;
        reshard.apply(&mut config);
        let cluster = Cluster::new(Arc::new(config));
        cluster.open_forced_pools();
        Arc::new(App {
            cluster: RwLock::new(Arc::new(cluster)),
            generation: AtomicU64::new(0),
            cancels: CancelRegistry::default(),
            statements: backend::prepared::Registry::default(),
            param_sets: backend::params::SharedParams::default(),
            clients: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            shutdown,
            client_list: stats::Registry::default(),
            config_path,
            started: stats::now_us(),
            disabled: Default::default(),
            admin: admin::State::default(),
            reshard,
            client_counts: Default::default(),
        })
    }

    /// Counts a logged-in client of `db` and `user` unless that would pass a limit (0: none);
    /// a counted client is released with [`App::release_client`].
    pub fn admit_client(
        &self,
        db: &str,
        user: &str,
        db_limit: usize,
        user_limit: usize,
    ) -> Result<(), ClientLimit> {
        let mut c = self.client_counts.lock();
        let on_db = c.by_db.get(db).copied().unwrap_or(0);
        let of_user = c.by_user.get(user).copied().unwrap_or(0);
        if db_limit > 0 && on_db >= db_limit {
            return Err(ClientLimit::Database);
        }
        if user_limit > 0 && of_user >= user_limit {
            return Err(ClientLimit::User);
        }
        *c.by_db.entry(db.to_string()).or_default() += 1;
        *c.by_user.entry(user.to_string()).or_default() += 1;
        Ok(())
    }

    pub fn release_client(&self, db: &str, user: &str) {
        let mut guard = self.client_counts.lock();
        let c = &mut *guard;
        for (map, key) in [(&mut c.by_db, db), (&mut c.by_user, user)] {
            if let Some(n) = map.get_mut(key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(key);
                }
            }
        }
    }

    /// Takes a client off SHOW CLIENTS and releases its place under the client limits (it
    /// was counted by [`App::admit_client`] under the same database and user).
    pub fn unlist_client(&self, id: u64) {
        if let Some(info) = self.client_list.remove(id) {
            self.release_client(&info.database, &info.user);
        }
    }

    /// Logged-in clients of a database.
    pub fn db_clients(&self, db: &str) -> usize {
        self.client_counts
            .lock()
            .by_db
            .get(db)
            .copied()
            .unwrap_or(0)
    }

    /// Logged-in clients of a user.
    pub fn user_clients(&self, user: &str) -> usize {
        self.client_counts
            .lock()
            .by_user
            .get(user)
            .copied()
            .unwrap_or(0)
    }

    pub fn cluster(&self) -> Arc<Cluster> {
        self.cluster.read().clone()
    }

    /// Bumped on every reload so sessions know to look their pool up again.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Swaps in a new config; unchanged pools keep their connections.
    pub fn reload(&self, mut config: Config) {
        // A database RESHARD switched keeps its new shards whatever the file says.
        self.reshard.apply(&mut config);
        if let Err(e) = logging::apply(&config.general) {
            tracing::error!("{e}");
        }
        let mut guard = self.cluster.write();
        let new = Cluster::reload(&guard, Arc::new(config));
        new.open_forced_pools();
        *guard = Arc::new(new);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// A new client's id, from the one sequence clients and servers share (as PgBouncer's
    /// socket ids; SHOW SOCKETS lists both).
    pub fn next_client_id(&self) -> u64 {
        crate::stats::next_socket_id()
    }

    /// Reads the config file again and applies it (SIGHUP, RELOAD).
    pub fn reload_from_disk(&self) -> Result<(), config::ConfigError> {
        let cfg = Config::load(&self.config_path)?;
        self.reload(cfg);
        Ok(())
    }

    pub fn shutdown_state(&self) -> Shutdown {
        *self.shutdown.borrow()
    }
}

/// Runs Weir until shutdown. Signals are handled by the caller (main).
pub async fn run(app: Arc<App>) -> std::io::Result<()> {
    frontend::listener::serve(app).await
}
