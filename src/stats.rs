//! Live state and counters that the admin console (`SHOW …`) and the
//! Prometheus exporter read. Writers are the session and pool hot paths, so
//! everything is a relaxed atomic updated at transaction boundaries.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Ids of client and server connections: one sequence, as PgBouncer's socket ids.
static NEXT_SOCKET_ID: AtomicU64 = AtomicU64::new(1);

/// The next client or server connection id.
pub fn next_socket_id() -> u64 {
    NEXT_SOCKET_ID.fetch_add(1, Ordering::Relaxed)
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Per-pool totals, PgBouncer's SHOW STATS counters.
#[derive(Debug, Default)]
pub struct PoolTotals {
    pub xact_count: AtomicU64,
    pub query_count: AtomicU64,
    /// Bytes received from clients.
    pub bytes_received: AtomicU64,
    /// Bytes sent to clients.
    pub bytes_sent: AtomicU64,
    pub xact_time_us: AtomicU64,
    pub query_time_us: AtomicU64,
    pub wait_time_us: AtomicU64,
    pub wait_count: AtomicU64,
    pub max_wait_us: AtomicU64,
    pub server_connects: AtomicU64,
    pub errors: AtomicU64,
    /// Clients that logged in to this pool (PgBouncer's client_login_count).
    pub client_logins: AtomicU64,
}

impl PoolTotals {
    pub fn add(counter: &AtomicU64, v: u64) {
        counter.fetch_add(v, Ordering::Relaxed);
    }
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// What a client is doing, as SHOW CLIENTS reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ClientState {
    /// Logged in, no server (PgBouncer counts these as cl_active).
    Idle = 0,
    /// Waiting for a server.
    Waiting = 1,
    /// Holding a server.
    Active = 2,
}

/// One logged-in client.
#[derive(Debug)]
pub struct ClientInfo {
    pub id: u64,
    pub user: String,
    pub database: String,
    pub addr: String,
    pub port: u16,
    pub connect_time: u64,
    pub application_name: String,
    pub pid: i32,
    pub request_time: AtomicU64,
    pub wait_since: AtomicU64,
    state: AtomicU8,
    /// Backend pid of the server it holds (0 = none).
    pub server_pid: AtomicI32,
    /// Aborts the client's task (KILL).
    pub abort: Mutex<Option<tokio::task::AbortHandle>>,
}

impl ClientInfo {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        user: &str,
        database: &str,
        peer: &str,
        application_name: &str,
        pid: i32,
    ) -> ClientInfo {
        let (addr, port) = split_peer(peer);
        let now = now_us();
        ClientInfo {
            id,
            user: user.to_string(),
            database: database.to_string(),
            addr,
            port,
            connect_time: now,
            application_name: application_name.to_string(),
            pid,
            request_time: AtomicU64::new(now),
            wait_since: AtomicU64::new(0),
            state: AtomicU8::new(ClientState::Idle as u8),
            server_pid: AtomicI32::new(0),
            abort: Mutex::new(None),
        }
    }

    pub fn state(&self) -> ClientState {
        match self.state.load(Ordering::Relaxed) {
            1 => ClientState::Waiting,
            2 => ClientState::Active,
            _ => ClientState::Idle,
        }
    }

    pub fn set_state(&self, s: ClientState) {
        self.state.store(s as u8, Ordering::Relaxed);
    }
}

/// Splits "ip:port" (IPv6 in brackets) for the addr/port columns.
pub fn split_peer(peer: &str) -> (String, u16) {
    match peer.rsplit_once(':') {
        Some((a, p)) => (
            a.trim_matches(['[', ']']).to_string(),
            p.parse().unwrap_or(0),
        ),
        None => (peer.to_string(), 0),
    }
}

/// State of a server connection for SHOW SERVERS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ServerState {
    Idle = 0,
    Active = 1,
    Login = 2,
}

/// One server connection.
#[derive(Debug)]
pub struct ServerInfo {
    pub id: u64,
    pub database: String,
    pub user: String,
    pub addr: String,
    pub port: u16,
    pub local_port: u16,
    pub connect_time: u64,
    pub backend_pid: i32,
    pub request_time: AtomicU64,
    state: AtomicU8,
    /// Weir pid of the client holding it (0 = none).
    pub client_pid: AtomicI32,
    /// RECONNECT or a reload replaced it: closed when released (WAIT_CLOSE).
    pub close_needed: AtomicBool,
}

impl ServerInfo {
    pub fn new(
        id: u64,
        database: &str,
        user: &str,
        addr: &str,
        port: u16,
        local_port: u16,
        backend_pid: i32,
    ) -> Self {
        let now = now_us();
        ServerInfo {
            id,
            database: database.to_string(),
            user: user.to_string(),
            addr: addr.to_string(),
            port,
            local_port,
            connect_time: now,
            backend_pid,
            request_time: AtomicU64::new(now),
            state: AtomicU8::new(ServerState::Idle as u8),
            client_pid: AtomicI32::new(0),
            close_needed: AtomicBool::new(false),
        }
    }

    pub fn state(&self) -> ServerState {
        match self.state.load(Ordering::Relaxed) {
            1 => ServerState::Active,
            2 => ServerState::Login,
            _ => ServerState::Idle,
        }
    }

    pub fn set_state(&self, s: ServerState) {
        self.state.store(s as u8, Ordering::Relaxed);
    }
}

/// A set of live entries by id (clients of the process, servers of a pool).
#[derive(Debug)]
pub struct Registry<T> {
    map: Mutex<HashMap<u64, Arc<T>>>,
}

impl<T> Default for Registry<T> {
    fn default() -> Self {
        Registry {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<T> Registry<T> {
    pub fn insert(&self, id: u64, v: Arc<T>) {
        self.map.lock().insert(id, v);
    }
    pub fn remove(&self, id: u64) -> Option<Arc<T>> {
        self.map.lock().remove(&id)
    }
    pub fn snapshot(&self) -> Vec<Arc<T>> {
        self.map.lock().values().cloned().collect()
    }
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
