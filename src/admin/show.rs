//! SHOW commands: plain functions from a [`Snapshot`] of the live state to a
//! [`ResultSet`] with PgBouncer 1.24's column names, order and types, so
//! pgbouncer_exporter and existing dashboards read Weir unchanged.
//!
//! Where Weir has no such thing (cancel-request queues, DNS cache, peers,
//! prepared-statement counters per database) the column is there with 0.

use super::result::{num, text, Cell, ResultSet, INT4, INT8, NULL, NUMERIC, TEXT};
pub use super::snapshot::{PoolState, ShardState, Snapshot, ADMIN_DB};
use super::stats::Counters;
use crate::backend::Pool;
use crate::stats::{ClientInfo, ClientState, ServerInfo, ServerState};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Server ptr values are offset so they never equal a client's.
const SERVER_PTR: u64 = 1 << 32;

fn ptr(id: u64) -> String {
    format!("{id:#x}")
}

fn flag(b: bool) -> Cell {
    num(u8::from(b))
}

/// A timestamp column: PgBouncer's "YYYY-MM-DD HH:MM:SS TZ", here in UTC.
pub fn format_time(us: u64) -> String {
    let secs = us / 1_000_000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = crate::logging::civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub fn pools(s: &Snapshot) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("database", TEXT),
        ("user", TEXT),
        ("cl_active", INT4),
        ("cl_waiting", INT4),
        ("cl_active_cancel_req", INT4),
        ("cl_waiting_cancel_req", INT4),
        ("sv_active", INT4),
        ("sv_active_cancel", INT4),
        ("sv_being_canceled", INT4),
        ("sv_idle", INT4),
        ("sv_used", INT4),
        ("sv_tested", INT4),
        ("sv_login", INT4),
        ("maxwait", INT4),
        ("maxwait_us", INT4),
        ("pool_mode", TEXT),
        ("load_balance_hosts", TEXT),
    ]);
    for ((db, user), p) in s.pool_rows() {
        let (mut active, mut waiting, mut max_wait_us) = (0, 0, p.max_wait.as_micros() as u64);
        for c in s.clients_of(&db, &user) {
            // PgBouncer counts idle clients as cl_active too.
            if c.state() == ClientState::Waiting {
                waiting += 1;
                max_wait_us = max_wait_us.max(s.client_wait_us(c));
            } else {
                active += 1;
            }
        }
        rs.push(vec![
            text(db),
            text(user),
            num(active),
            num(waiting),
            num(0),
            num(0),
            num(p.open.saturating_sub(p.idle)),
            num(0),
            num(0),
            num(p.idle),
            num(0),
            num(0),
            num(p.total.saturating_sub(p.open)),
            num(max_wait_us / 1_000_000),
            num(max_wait_us % 1_000_000),
            text(p.mode.to_string()),
            NULL,
        ]);
    }
    rs
}

/// The columns SHOW CLIENTS and SHOW SERVERS share.
fn socket_columns() -> ResultSet {
    ResultSet::new(&[
        ("type", TEXT),
        ("user", TEXT),
        ("database", TEXT),
        ("replication", TEXT),
        ("state", TEXT),
        ("addr", TEXT),
        ("port", INT4),
        ("local_addr", TEXT),
        ("local_port", INT4),
        ("connect_time", TEXT),
        ("request_time", TEXT),
        ("wait", INT4),
        ("wait_us", INT4),
        ("close_needed", INT4),
        ("ptr", TEXT),
        ("link", TEXT),
        ("remote_pid", INT4),
        ("tls", TEXT),
        ("application_name", TEXT),
        ("prepared_statements", INT4),
        ("id", INT4),
    ])
}

fn linked_server<'a>(s: &'a Snapshot, c: &ClientInfo) -> Option<&'a Arc<ServerInfo>> {
    let pid = c.server_pid.load(Ordering::Relaxed);
    (pid != 0).then_some(())?;
    s.servers
        .iter()
        .find(|v| v.backend_pid == pid && v.client_pid.load(Ordering::Relaxed) == c.pid)
}

fn linked_client<'a>(s: &'a Snapshot, v: &ServerInfo) -> Option<&'a Arc<ClientInfo>> {
    let pid = v.client_pid.load(Ordering::Relaxed);
    (pid != 0).then_some(())?;
    s.clients.iter().find(|c| c.pid == pid)
}

pub fn clients(s: &Snapshot) -> ResultSet {
    let mut rs = socket_columns();
    let g = &s.config.general;
    let listen = match g.listen_addr.as_str() {
        "*" | "" => "0.0.0.0",
        a => a,
    };
    let mut list: Vec<&Arc<ClientInfo>> = s.clients.iter().collect();
    list.sort_by_key(|c| c.id);
    for c in list {
        let state = match c.state() {
            ClientState::Active => "active",
            ClientState::Waiting => "waiting",
            ClientState::Idle => "idle",
        };
        let wait = s.client_wait_us(c);
        let local = if c.addr == "unix" { "unix" } else { listen };
        rs.push(vec![
            text("C"),
            text(c.user.clone()),
            text(c.database.clone()),
            text("none"),
            text(state),
            text(c.addr.clone()),
            num(c.port),
            text(local),
            num(g.listen_port),
            text(format_time(c.connect_time)),
            text(format_time(c.request_time.load(Ordering::Relaxed))),
            num(wait / 1_000_000),
            num(wait % 1_000_000),
            num(0),
            text(ptr(c.id)),
            text(linked_server(s, c).map_or(String::new(), |v| ptr(SERVER_PTR + v.id))),
            num(0),
            text(""),
            text(c.application_name.clone()),
            num(0),
            num(c.id),
        ]);
    }
    rs
}

pub fn servers(s: &Snapshot) -> ResultSet {
    let mut rs = socket_columns();
    let mut list: Vec<&Arc<ServerInfo>> = s.servers.iter().collect();
    list.sort_by_key(|v| v.id);
    for v in list {
        let state = match v.state() {
            ServerState::Active => "active",
            ServerState::Idle => "idle",
            ServerState::Login => "new",
        };
        let client = linked_client(s, v);
        rs.push(vec![
            text("S"),
            text(v.user.clone()),
            text(v.database.clone()),
            text("none"),
            text(state),
            text(v.addr.clone()),
            num(v.port),
            text(""),
            num(v.local_port),
            text(format_time(v.connect_time)),
            text(format_time(v.request_time.load(Ordering::Relaxed))),
            num(0),
            num(0),
            flag(v.close_needed.load(Ordering::Relaxed)),
            text(ptr(SERVER_PTR + v.id)),
            text(client.map_or(String::new(), |c| ptr(c.id))),
            num(v.backend_pid),
            text(""),
            text(client.map_or(String::new(), |c| c.application_name.clone())),
            num(0),
            num(v.id),
        ]);
    }
    rs
}

/// SHOW SOCKETS / SHOW ACTIVE_SOCKETS: every client and server connection (or only the
/// active ones), with SHOW CLIENTS' columns and PgBouncer's buffer columns after them.
/// Weir's buffers are per task, not per socket, so those read 0.
pub fn sockets(s: &Snapshot, active_only: bool) -> ResultSet {
    const BUFFERS: [&str; 7] = [
        "recv_pos",
        "pkt_pos",
        "pkt_remain",
        "send_pos",
        "send_remain",
        "pkt_avail",
        "send_avail",
    ];
    let mut rs = socket_columns();
    rs.columns.extend(BUFFERS.iter().map(|&n| (n, INT4)));
    let state = rs.columns.iter().position(|(n, _)| *n == "state");
    for mut row in clients(s).rows.into_iter().chain(servers(s).rows) {
        if active_only && state.and_then(|i| row[i].as_deref()) != Some("active") {
            continue;
        }
        row.extend(BUFFERS.iter().map(|_| num(0)));
        rs.push(row);
    }
    rs
}

pub fn databases(s: &Snapshot) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("name", TEXT),
        ("host", TEXT),
        ("port", INT4),
        ("database", TEXT),
        ("force_user", TEXT),
        ("pool_size", INT4),
        ("min_pool_size", INT4),
        ("reserve_pool_size", INT4),
        ("server_lifetime", INT4),
        ("pool_mode", TEXT),
        ("load_balance_hosts", TEXT),
        ("max_connections", INT4),
        ("current_connections", INT4),
        ("max_client_connections", INT4),
        ("current_client_connections", INT4),
        ("paused", INT4),
        ("disabled", INT4),
    ]);
    let g = &s.config.general;
    let lifetime = g.server_lifetime.as_secs();
    for name in s.database_names() {
        if name == ADMIN_DB {
            // PgBouncer's virtual database: statement pooling, 2 connections.
            rs.push(vec![
                text(ADMIN_DB),
                NULL,
                num(g.listen_port),
                text(ADMIN_DB),
                text(ADMIN_DB),
                num(2),
                num(0),
                num(0),
                num(lifetime),
                text("statement"),
                NULL,
                num(0),
                num(0),
                num(g.max_db_client_connections),
                num(s.clients.iter().filter(|c| c.database == ADMIN_DB).count()),
                num(0),
                num(0),
            ]);
            continue;
        }
        let Some(db) = s.config.database(&name) else {
            continue;
        };
        let servers = s.servers.iter().filter(|v| v.database == name).count();
        let clients = s.clients.iter().filter(|c| c.database == name).count();
        rs.push(vec![
            text(name.clone()),
            text(if db.hosts.is_empty() {
                db.address.host.clone()
            } else {
                db.hosts
                    .iter()
                    .map(|a| a.host.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            }),
            num(db.address.port),
            text(db.dbname.clone()),
            db.user.clone(),
            num(db.pool_size.unwrap_or(g.default_pool_size)),
            num(db.min_pool_size),
            num(db.reserve_pool_size),
            num(lifetime),
            db.pool_mode.map(|m| m.to_string()),
            db.load_balance_hosts.clone(),
            num(db.max_db_connections),
            num(servers),
            num(db.max_db_client_connections),
            num(clients),
            flag(s.paused.covers(&name)),
            flag(s.disabled.contains(&name)),
        ]);
    }
    rs
}

pub fn users(s: &Snapshot) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("name", TEXT),
        ("pool_size", TEXT),
        ("reserve_pool_size", TEXT),
        ("pool_mode", TEXT),
        ("max_user_connections", INT4),
        ("current_connections", INT4),
        ("max_user_client_connections", INT4),
        ("current_client_connections", INT4),
    ]);
    let g = &s.config.general;
    for name in s.user_names() {
        let u = s.config.users.get(&name);
        // PgBouncer prints a set pool_size with "%9d" and an unset one as "".
        let pool_size = u
            .and_then(|u| u.pool_size)
            .map_or(String::new(), |n| format!("{n:9}"));
        let reserve_pool_size = u
            .and_then(|u| u.reserve_pool_size)
            .map_or(String::new(), |n| format!("{n:9}"));
        let max = u
            .map(|u| u.max_user_connections)
            .filter(|n| *n > 0)
            .unwrap_or(g.max_user_connections);
        let max_clients = s.config.user_client_limit(&name);
        rs.push(vec![
            text(name.clone()),
            text(pool_size),
            text(reserve_pool_size),
            u.and_then(|u| u.pool_mode).map(|m| m.to_string()),
            num(max),
            num(s.servers.iter().filter(|v| v.user == name).count()),
            num(max_clients),
            num(s.clients.iter().filter(|c| c.user == name).count()),
        ]);
    }
    rs
}

/// The twelve counters in PgBouncer's column order; Weir does not count protocol
/// Parse and Bind messages per database, so those three are 0.
fn values(c: &Counters) -> [u64; 12] {
    [
        c.server_assignment_count,
        c.xact_count,
        c.query_count,
        c.received,
        c.sent,
        c.xact_time,
        c.query_time,
        c.wait_time,
        0,
        0,
        0,
        c.client_login_count,
    ]
}

pub fn stats(s: &Snapshot) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("database", TEXT),
        ("total_server_assignment_count", NUMERIC),
        ("total_xact_count", NUMERIC),
        ("total_query_count", NUMERIC),
        ("total_received", NUMERIC),
        ("total_sent", NUMERIC),
        ("total_xact_time", NUMERIC),
        ("total_query_time", NUMERIC),
        ("total_wait_time", NUMERIC),
        ("total_client_parse_count", NUMERIC),
        ("total_server_parse_count", NUMERIC),
        ("total_bind_count", NUMERIC),
        ("total_client_login_count", NUMERIC),
        ("avg_server_assignment_count", NUMERIC),
        ("avg_xact_count", NUMERIC),
        ("avg_query_count", NUMERIC),
        ("avg_recv", NUMERIC),
        ("avg_sent", NUMERIC),
        ("avg_xact_time", NUMERIC),
        ("avg_query_time", NUMERIC),
        ("avg_wait_time", NUMERIC),
        ("avg_client_parse_count", NUMERIC),
        ("avg_server_parse_count", NUMERIC),
        ("avg_bind_count", NUMERIC),
        ("avg_client_login_count", NUMERIC),
    ]);
    for (db, total) in &s.stats.totals {
        let avg = s.stats.averages.get(db).copied().unwrap_or_default();
        let mut row = vec![text(db.clone())];
        row.extend(values(total).iter().map(num));
        row.extend(values(&avg).iter().map(num));
        rs.push(row);
    }
    rs
}

/// STATS_TOTALS and STATS_AVERAGES share PgBouncer's column names, except
/// that the averages' three prepared-statement columns keep an `avg_` prefix.
fn per_database(s: &Snapshot, averages: bool) -> ResultSet {
    let prepared = if averages {
        [
            "avg_client_parse_count",
            "avg_server_parse_count",
            "avg_bind_count",
            "avg_client_login_count",
        ]
    } else {
        [
            "client_parse_count",
            "server_parse_count",
            "bind_count",
            "client_login_count",
        ]
    };
    let mut cols = vec![("database", TEXT)];
    cols.extend(
        [
            "server_assignment_count",
            "xact_count",
            "query_count",
            "bytes_received",
            "bytes_sent",
            "xact_time",
            "query_time",
            "wait_time",
        ]
        .into_iter()
        .chain(prepared)
        .map(|n| (n, NUMERIC)),
    );
    let mut rs = ResultSet::new(&cols);
    let source = if averages {
        &s.stats.averages
    } else {
        &s.stats.totals
    };
    for (db, c) in source {
        let mut row = vec![text(db.clone())];
        row.extend(values(c).iter().map(num));
        rs.push(row);
    }
    rs
}

pub fn stats_totals(s: &Snapshot) -> ResultSet {
    per_database(s, false)
}

pub fn stats_averages(s: &Snapshot) -> ResultSet {
    per_database(s, true)
}

/// SHOW TOTALS: every counter summed over databases, one per row, named as
/// PgBouncer names them (after its internal fields: `total_client_bytes` is
/// what SHOW STATS calls `total_received`).
pub fn totals(s: &Snapshot) -> ResultSet {
    let mut rs = ResultSet::new(&[("name", TEXT), ("value", NUMERIC)]);
    let mut total = Counters::default();
    let mut avg = Counters::default();
    for c in s.stats.totals.values() {
        total.add(c);
    }
    for c in s.stats.averages.values() {
        avg.add(c);
    }
    let fields = [
        "server_assignment_count",
        "xact_count",
        "query_count",
        "client_bytes",
        "server_bytes",
        "xact_time",
        "query_time",
        "wait_time",
        "ps_client_parse_count",
        "ps_server_parse_count",
        "ps_bind_count",
        "client_login_count",
    ];
    for (prefix, c) in [("total", &total), ("avg", &avg)] {
        for (field, v) in fields.iter().zip(values(c)) {
            rs.push(vec![text(format!("{prefix}_{field}")), num(v)]);
        }
    }
    rs
}

pub fn lists(s: &Snapshot) -> ResultSet {
    let mut rs = ResultSet::new(&[("list", TEXT), ("items", INT4)]);
    let used_clients = s.clients.len();
    let rows: [(&str, usize); 14] = [
        ("databases", s.database_names().len()),
        ("users", s.user_names().len()),
        ("peers", 0),
        ("pools", s.pool_rows().len()),
        ("peer_pools", 0),
        ("free_clients", 0),
        ("used_clients", used_clients),
        ("login_clients", s.connections.saturating_sub(used_clients)),
        ("free_servers", 0),
        ("used_servers", s.servers.len()),
        ("dns_names", 0),
        ("dns_zones", 0),
        ("dns_queries", 0),
        ("dns_pending", 0),
    ];
    for (name, n) in rows {
        rs.push(vec![text(name), num(n)]);
    }
    rs
}

/// SHOW MEM: PgBouncer lists its slab caches; Weir lists the same kinds of
/// object with their size and how many are live (there is no free list).
pub fn mem(s: &Snapshot) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("name", TEXT),
        ("size", INT4),
        ("used", INT4),
        ("free", INT4),
        ("memtotal", INT4),
    ]);
    let rows = [
        (
            "user_cache",
            std::mem::size_of::<crate::config::User>(),
            s.user_names().len(),
        ),
        (
            "db_cache",
            std::mem::size_of::<crate::config::Database>(),
            s.database_names().len(),
        ),
        ("pool_cache", std::mem::size_of::<Pool>(), s.pools.len()),
        (
            "server_cache",
            std::mem::size_of::<crate::backend::ServerConn>(),
            s.servers.len(),
        ),
        (
            "client_cache",
            std::mem::size_of::<ClientInfo>(),
            s.clients.len(),
        ),
    ];
    for (name, size, used) in rows {
        rs.push(vec![
            text(name),
            num(size),
            num(used),
            num(0),
            num(size * used),
        ]);
    }
    rs
}

pub fn config(s: &Snapshot) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("key", TEXT),
        ("value", TEXT),
        ("default", TEXT),
        ("changeable", TEXT),
    ]);
    for row in super::settings::rows(&s.config.general) {
        rs.push(row.into_iter().map(Some).collect());
    }
    rs
}

pub fn version() -> ResultSet {
    let mut rs = ResultSet::new(&[("version", TEXT)]);
    rs.push(vec![text(format!("Weir {}", crate::VERSION))]);
    rs
}

pub fn state(s: &Snapshot) -> ResultSet {
    let mut rs = ResultSet::new(&[("key", TEXT), ("value", TEXT)]);
    let yes_no = |b: bool| text(if b { "yes" } else { "no" });
    rs.push(vec![text("active"), yes_no(!s.paused.all)]);
    rs.push(vec![text("paused"), yes_no(s.paused.all)]);
    rs.push(vec![text("suspended"), yes_no(false)]);
    rs
}

pub fn peers() -> ResultSet {
    ResultSet::new(&[
        ("peer_id", INT4),
        ("host", TEXT),
        ("port", INT4),
        ("pool_size", INT4),
    ])
}

pub fn peer_pools() -> ResultSet {
    ResultSet::new(&[
        ("peer_id", INT4),
        ("cl_active_cancel_req", INT4),
        ("cl_waiting_cancel_req", INT4),
        ("sv_active_cancel", INT4),
        ("sv_login", INT4),
    ])
}

pub fn dns_hosts() -> ResultSet {
    ResultSet::new(&[("hostname", TEXT), ("ttl", INT8), ("addrs", TEXT)])
}

pub fn dns_zones() -> ResultSet {
    ResultSet::new(&[("zonename", TEXT), ("serial", INT8), ("count", INT4)])
}

/// Weir addition: each shard's primary and replicas, and whether a replica is
/// banned (kept out of rotation after failing).
pub fn shards(s: &Snapshot) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("database", TEXT),
        ("shard", INT4),
        ("role", TEXT),
        ("host", TEXT),
        ("port", INT4),
        ("state", TEXT),
        ("read_your_writes", TEXT),
    ]);
    for sh in &s.shards {
        rs.push(vec![
            text(sh.database.clone()),
            num(sh.shard),
            text(if sh.replica.is_some() {
                "replica"
            } else {
                "primary"
            }),
            text(sh.address.host.clone()),
            num(sh.address.port),
            text(if sh.banned { "banned" } else { "healthy" }),
            text(sh.read_your_writes),
        ]);
    }
    rs
}

/// Weir addition: each shard server's WAL position as the sampler last saw it, replicas'
/// lag behind their primary in bytes and time, and whether a replica takes reads.
pub fn replication(s: &Snapshot) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("database", TEXT),
        ("shard", INT4),
        ("role", TEXT),
        ("replica", INT4),
        ("host", TEXT),
        ("port", INT4),
        ("lsn", TEXT),
        ("lag_bytes", INT8),
        ("lag_ms", INT8),
        ("sampled_ms_ago", INT8),
        ("state", TEXT),
        ("read_your_writes", TEXT),
    ]);
    for sh in &s.shards {
        let primary = sh.replica.is_none();
        let state = match (&sh.wal, primary) {
            (None, _) => "not sampled",
            (Some(w), true) if w.wrong_role => "in recovery (writes refused)",
            (Some(_), true) => "primary",
            (Some(w), false) if w.wrong_role => "promoted (no reads)",
            (Some(_), false) if sh.banned => "banned",
            (Some(w), false) if !w.readable => "lagging (no reads)",
            (Some(_), false) => "streaming",
        };
        let wal = sh.wal.as_ref();
        rs.push(vec![
            text(sh.database.clone()),
            num(sh.shard),
            text(if primary { "primary" } else { "replica" }),
            sh.replica.map_or(NULL, num),
            text(sh.address.host.clone()),
            num(sh.address.port),
            wal.map_or(NULL, |w| text(crate::router::wal::format_lsn(w.lsn))),
            wal.map_or(NULL, |w| num(w.lag_bytes)),
            wal.map_or(NULL, |w| num(w.lag_ms)),
            wal.map_or(NULL, |w| num(w.sampled_ms_ago)),
            text(state),
            text(sh.read_your_writes),
        ]);
    }
    rs
}

/// Weir addition: the latest RESHARD's progress (no row if none ran).
pub fn reshard(s: &Snapshot) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("database", TEXT),
        ("target", TEXT),
        ("phase", TEXT),
        ("tables", INT8),
        ("tables_done", INT8),
        ("rows_copied", INT8),
        ("rows_per_sec", INT8),
        ("lag_bytes", INT8),
        ("lag_ms", INT8),
        ("eta_s", INT8),
        ("elapsed_s", INT8),
        ("cutover_ms", INT8),
        ("changes_applied", INT8),
        ("error", TEXT),
    ]);
    if let Some(r) = &s.reshard {
        rs.push(vec![
            text(r.database.clone()),
            text(r.target.clone()),
            text(r.phase),
            num(r.tables),
            num(r.tables_done),
            num(r.rows_copied),
            num(r.rows_per_sec),
            num(r.lag_bytes),
            num(r.lag_ms),
            r.eta_s.map_or(NULL, num),
            num(r.elapsed_s),
            r.cutover_ms.map_or(NULL, num),
            num(r.changes_applied),
            r.error.clone().map_or(NULL, text),
        ]);
    }
    rs
}

/// Parameters some drivers SHOW or SET on connect; PgBouncer answers them
/// with fixed values instead of an error.
pub const FAKE_PARAMS: [(&str, &str); 6] = [
    ("client_encoding", "UTF-8"),
    ("default_transaction_isolation", "read committed"),
    ("standard_conforming_strings", "on"),
    ("datestyle", "ISO"),
    ("timezone", "GMT"),
    ("extra_float_digits", "2"),
];

pub fn fake_param(name: &str) -> Option<ResultSet> {
    let (key, value) = FAKE_PARAMS
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))?;
    let mut rs = ResultSet::new(&[(*key, TEXT)]);
    rs.push(vec![text(*value)]);
    Some(rs)
}

/// The SHOW command for a name, if there is one.
pub fn render(what: &str, s: &Snapshot) -> Option<ResultSet> {
    Some(match what.to_ascii_lowercase().as_str() {
        "pools" => pools(s),
        "clients" => clients(s),
        "servers" => servers(s),
        "sockets" => sockets(s, false),
        "active_sockets" => sockets(s, true),
        "databases" => databases(s),
        "users" => users(s),
        "stats" => stats(s),
        "stats_totals" => stats_totals(s),
        "stats_averages" => stats_averages(s),
        "totals" => totals(s),
        "lists" => lists(s),
        "mem" => mem(s),
        "config" => config(s),
        "version" => version(),
        "state" => state(s),
        "peers" => peers(),
        "peer_pools" => peer_pools(),
        "dns_hosts" => dns_hosts(),
        "dns_zones" => dns_zones(),
        "shards" => shards(s),
        "replication" => replication(s),
        "reshard" => reshard(s),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::super::stats::DatabaseStats;
    use super::*;
    use crate::cluster::Paused;
    use crate::config::{Address, Config, PoolMode};
    use std::path::Path;
    use std::time::Duration;

    fn snapshot() -> Snapshot {
        let config = Config::from_toml(
            Path::new("/tmp/weir.toml"),
            "[weir]\nlisten_port = 6432\nmax_user_connections = 9\n\
             [users.app]\npassword = \"x\"\npool_size = 4\n\
             [databases.app]\nport = 5433\n\
             [databases.forced]\nport = 5433\nuser = \"app\"\npool_mode = \"session\"\n",
        )
        .expect("config");
        let waiting = Arc::new(ClientInfo::new(1, "app", "app", "10.0.0.1:5000", "w", 11));
        waiting.set_state(ClientState::Waiting);
        waiting.wait_since.store(7_000_000, Ordering::Relaxed);
        let active = Arc::new(ClientInfo::new(
            2,
            "app",
            "app",
            "10.0.0.2:5001",
            "psql",
            12,
        ));
        active.set_state(ClientState::Active);
        active.server_pid.store(500, Ordering::Relaxed);
        let server = Arc::new(ServerInfo::new(
            3,
            "app",
            "app",
            "127.0.0.1",
            5433,
            40000,
            500,
        ));
        server.set_state(ServerState::Active);
        server.client_pid.store(12, Ordering::Relaxed);
        let mut stats = DatabaseStats::default();
        stats.totals.insert(
            "app".into(),
            Counters {
                xact_count: 10,
                received: 100,
                ..Default::default()
            },
        );
        Snapshot {
            now_us: 9_500_000,
            config: Arc::new(config),
            pools: vec![PoolState {
                database: "app".into(),
                user: "app".into(),
                mode: PoolMode::Transaction,
                idle: 1,
                open: 2,
                total: 3,
                max_wait: Duration::from_millis(5),
            }],
            clients: vec![waiting, active],
            servers: vec![server],
            paused: Paused {
                all: false,
                databases: ["app".to_string()].into_iter().collect(),
            },
            disabled: ["forced".to_string()].into_iter().collect(),
            stats,
            shards: vec![ShardState {
                database: "shop".into(),
                shard: 1,
                replica: Some(0),
                address: Address {
                    host: "10.1.1.1".into(),
                    port: 5434,
                },
                banned: true,
                read_your_writes: "client",
                wal: None,
            }],
            connections: 4,
            consoles: 1,
            reshard: None,
        }
    }

    fn row<'a>(
        rs: &'a ResultSet,
        key_col: &str,
        key: &str,
    ) -> Vec<(&'static str, Option<&'a str>)> {
        let i = rs
            .columns
            .iter()
            .position(|(n, _)| *n == key_col)
            .expect("key column");
        let r = rs
            .rows
            .iter()
            .find(|r| r[i].as_deref() == Some(key))
            .expect("row");
        rs.columns
            .iter()
            .map(|(n, _)| *n)
            .zip(r.iter().map(|c| c.as_deref()))
            .collect()
    }

    fn get<'a>(r: &[(&str, Option<&'a str>)], col: &str) -> Option<&'a str> {
        r.iter().find(|(n, _)| *n == col).and_then(|(_, v)| *v)
    }

    #[test]
    fn pools_count_clients_and_servers_like_pgbouncer() {
        let rs = pools(&snapshot());
        assert_eq!(rs.columns.len(), 17);
        assert!(rs.columns[2..15].iter().all(|(_, t)| *t == INT4));
        let r = row(&rs, "database", "app");
        assert_eq!(get(&r, "cl_active"), Some("1"));
        assert_eq!(get(&r, "cl_waiting"), Some("1"));
        assert_eq!(get(&r, "sv_active"), Some("1"));
        assert_eq!(get(&r, "sv_idle"), Some("1"));
        assert_eq!(get(&r, "sv_login"), Some("1"));
        // The waiting client has waited 2.5 s, longer than the pool queue's 5 ms.
        assert_eq!(get(&r, "maxwait"), Some("2"));
        assert_eq!(get(&r, "maxwait_us"), Some("500000"));
        assert_eq!(get(&r, "pool_mode"), Some("transaction"));
        assert_eq!(get(&r, "load_balance_hosts"), None);
    }

    #[test]
    fn clients_and_servers_link_to_each_other() {
        let s = snapshot();
        let c = clients(&s);
        assert_eq!(c.columns.len(), 21);
        let active = row(&c, "id", "2");
        assert_eq!(get(&active, "state"), Some("active"));
        assert_eq!(get(&active, "link"), Some("0x100000003"));
        assert_eq!(get(&active, "application_name"), Some("psql"));
        let waiting = row(&c, "id", "1");
        assert_eq!(get(&waiting, "state"), Some("waiting"));
        assert_eq!(get(&waiting, "wait"), Some("2"));
        assert_eq!(get(&waiting, "addr"), Some("10.0.0.1"));
        let v = servers(&s);
        let srv = row(&v, "id", "3");
        assert_eq!(get(&srv, "type"), Some("S"));
        assert_eq!(get(&srv, "link"), Some("0x2"));
        assert_eq!(get(&srv, "remote_pid"), Some("500"));
        assert_eq!(get(&srv, "application_name"), Some("psql"));
        assert_eq!(get(&srv, "close_needed"), Some("0"));
    }

    #[test]
    fn databases_show_overrides_pause_and_disable() {
        let rs = databases(&snapshot());
        let app = row(&rs, "name", "app");
        assert_eq!(get(&app, "port"), Some("5433"));
        assert_eq!(get(&app, "force_user"), None);
        assert_eq!(get(&app, "pool_size"), Some("20"));
        assert_eq!(get(&app, "paused"), Some("1"));
        assert_eq!(get(&app, "disabled"), Some("0"));
        assert_eq!(get(&app, "current_connections"), Some("1"));
        assert_eq!(get(&app, "current_client_connections"), Some("2"));
        let forced = row(&rs, "name", "forced");
        assert_eq!(get(&forced, "force_user"), Some("app"));
        assert_eq!(get(&forced, "pool_mode"), Some("session"));
        assert_eq!(get(&forced, "disabled"), Some("1"));
        let admin = row(&rs, "name", "pgbouncer");
        assert_eq!(get(&admin, "pool_mode"), Some("statement"));
        assert_eq!(get(&admin, "host"), None);
    }

    #[test]
    fn users_pad_pool_size_like_pgbouncer() {
        let rs = users(&snapshot());
        let app = row(&rs, "name", "app");
        assert_eq!(get(&app, "pool_size"), Some("        4"));
        assert_eq!(get(&app, "reserve_pool_size"), Some(""));
        assert_eq!(get(&app, "pool_mode"), None);
        assert_eq!(get(&app, "max_user_connections"), Some("9"));
        assert_eq!(get(&app, "current_client_connections"), Some("2"));
    }

    #[test]
    fn stats_are_numeric_and_totals_use_pgbouncer_field_names() {
        let s = snapshot();
        let st = stats(&s);
        assert_eq!(st.columns.len(), 25);
        assert!(st.columns[1..].iter().all(|(_, t)| *t == NUMERIC));
        let app = row(&st, "database", "app");
        assert_eq!(get(&app, "total_xact_count"), Some("10"));
        assert_eq!(get(&app, "total_received"), Some("100"));
        assert_eq!(stats_totals(&s).columns.len(), 13);
        assert_eq!(stats_averages(&s).columns[9].0, "avg_client_parse_count");
        let t = totals(&s);
        assert_eq!(t.rows.len(), 24);
        assert_eq!(row(&t, "name", "total_client_bytes")[1].1, Some("100"));
        assert_eq!(row(&t, "name", "avg_ps_bind_count")[1].1, Some("0"));
    }

    #[test]
    fn lists_mem_state_and_shards() {
        let s = snapshot();
        let l = lists(&s);
        assert_eq!(l.rows.len(), 14);
        assert_eq!(row(&l, "list", "used_clients")[1].1, Some("2"));
        assert_eq!(row(&l, "list", "login_clients")[1].1, Some("2"));
        assert_eq!(row(&l, "list", "pools")[1].1, Some("1"));
        assert_eq!(mem(&s).columns.len(), 5);
        assert_eq!(row(&state(&s), "key", "paused")[1].1, Some("no"));
        let sh = shards(&s);
        let sh = row(&sh, "database", "shop");
        assert_eq!(get(&sh, "role"), Some("replica"));
        assert_eq!(get(&sh, "state"), Some("banned"));
        assert_eq!(get(&sh, "shard"), Some("1"));
    }

    #[test]
    fn every_show_name_renders_and_unknown_does_not() {
        let s = snapshot();
        for name in [
            "POOLS",
            "clients",
            "servers",
            "sockets",
            "active_sockets",
            "databases",
            "users",
            "stats",
            "stats_totals",
            "stats_averages",
            "totals",
            "lists",
            "mem",
            "config",
            "version",
            "state",
            "shards",
            "replication",
            "reshard",
        ] {
            assert!(render(name, &s).is_some(), "{name}");
        }
        assert!(render("fds", &s).is_none());
        assert_eq!(
            fake_param("TimeZone").map(|r| r.rows[0].clone()),
            Some(vec![text("GMT")])
        );
    }

    #[test]
    fn timestamps_are_utc_calendar_times() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_time(951_782_400_000_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(
            format_time(1_719_878_400_500_000),
            "2024-07-02 00:00:00 UTC"
        );
    }
}
