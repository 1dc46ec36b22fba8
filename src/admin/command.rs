//! Control commands: what PAUSE, RESUME, KILL, RECONNECT, ENABLE, DISABLE,
//! RELOAD and SET do to the live state, with PgBouncer's error texts. The
//! waiting ones (PAUSE, WAIT_CLOSE) expose a "done yet?" check that the
//! console polls.

use super::is_admin_db;
use crate::backend::Pool;
use crate::cluster::Paused;
use crate::App;
use std::sync::Arc;
use thiserror::Error;

/// An error the console reports; the connection stays usable.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AdminError {
    #[error("invalid command '{0}', use SHOW HELP;")]
    Syntax(String),
    #[error("bad arguments")]
    BadArguments,
    #[error("admin access needed")]
    AccessDenied,
    #[error("no such database: {0}")]
    NoSuchDatabase(String),
    #[error("cannot {0} admin db: {1}")]
    AdminDatabase(&'static str, String),
    #[error("a database is required")]
    DatabaseRequired,
    #[error("already suspended/paused")]
    AlreadyPaused,
    #[error("pooler is not paused/suspended")]
    NotPaused,
    #[error("database {0} is not paused")]
    DatabaseNotPaused(String),
    #[error("pooler is shutting down")]
    ShuttingDown,
    #[error("invalid client pointer supplied")]
    BadClientId,
    #[error("client not found")]
    NoSuchClient,
    #[error("SET failed")]
    SetFailed,
    #[error("RELOAD failed, see logs for additional details")]
    ReloadFailed,
    #[error("RESHARD: {0}")]
    Reshard(String),
    #[error("{0} is not supported by Weir")]
    Unsupported(&'static str),
}

impl AdminError {
    /// PgBouncer reports console errors as protocol violations (08P01),
    /// except a failed RELOAD (F0000, config_file_error).
    pub fn sqlstate(&self) -> &'static str {
        match self {
            AdminError::ReloadFailed => "F0000",
            _ => "08P01",
        }
    }
}

/// A database argument: must exist and must not be the console itself.
fn database(app: &App, verb: &'static str, name: &str) -> Result<String, AdminError> {
    if is_admin_db(name) {
        return Err(AdminError::AdminDatabase(verb, name.to_string()));
    }
    if app.cluster().config.database(name).is_none() {
        return Err(AdminError::NoSuchDatabase(name.to_string()));
    }
    Ok(name.to_string())
}

/// The live pools of one database, or of all.
pub fn pools_of(app: &App, db: Option<&str>) -> Vec<Arc<Pool>> {
    app.cluster()
        .pools()
        .into_iter()
        .filter(|p| db.is_none_or(|d| p.settings.database == d))
        .collect()
}

/// Changes what is paused. A reload copies the pause state into the new
/// cluster; if one raced with this change, apply it to the new one too.
fn update_paused(app: &App, change: impl Fn(&mut Paused)) {
    loop {
        let cluster = app.cluster();
        let mut paused = cluster.paused();
        change(&mut paused);
        cluster.set_paused(paused);
        if Arc::ptr_eq(&cluster, &app.cluster()) {
            return;
        }
    }
}

/// PAUSE [db]: new transactions wait; server connections are closed as
/// they are released (PgBouncer disconnects them for a database restart).
/// Then poll [`pause_done`].
pub fn pause(app: &App, db: Option<&str>) -> Result<Option<String>, AdminError> {
    if app.cluster().paused().all {
        return Err(AdminError::AlreadyPaused);
    }
    let db = db.map(|d| database(app, "pause", d)).transpose()?;
    match &db {
        None => update_paused(app, |p| p.all = true),
        Some(name) => update_paused(app, |p| {
            p.databases.insert(name.clone());
        }),
    }
    for pool in pools_of(app, db.as_deref()) {
        pool.reconnect();
    }
    tracing::info!(db = db.as_deref().unwrap_or("*"), "PAUSE command issued");
    Ok(db)
}

/// True once the paused pools have no server connection left. Closes idle
/// ones that appeared meanwhile (a client queued before the pause was served).
pub fn pause_done(app: &App, db: Option<&str>) -> bool {
    let mut open = 0;
    for pool in pools_of(app, db) {
        let counts = pool.counts();
        if counts.idle > 0 {
            pool.reconnect();
        }
        open += pool.counts().total;
    }
    open == 0
}

/// RESUME [db].
pub fn resume(app: &App, db: Option<&str>) -> Result<(), AdminError> {
    let paused = app.cluster().paused();
    match db {
        None => {
            if app.shutdown_state() != crate::Shutdown::Running {
                return Err(AdminError::ShuttingDown);
            }
            if !paused.all {
                return Err(AdminError::NotPaused);
            }
            update_paused(app, |p| p.all = false);
        }
        Some(name) => {
            if app.cluster().config.database(name).is_none() {
                return Err(AdminError::NoSuchDatabase(name.to_string()));
            }
            if !paused.databases.contains(name) {
                return Err(AdminError::DatabaseNotPaused(name.to_string()));
            }
            update_paused(app, |p| {
                p.databases.remove(name);
            });
        }
    }
    tracing::info!(db = db.unwrap_or("*"), "RESUME command issued");
    Ok(())
}

/// KILL [db]: drop the database's clients and server connections at once.
/// As in PgBouncer the database is paused too: new transactions wait for
/// RESUME.
pub fn kill(app: &App, db: Option<&str>) -> Result<(), AdminError> {
    if app.cluster().paused().all {
        return Err(AdminError::AlreadyPaused);
    }
    let db = db.map(|d| database(app, "kill", d)).transpose()?;
    let names: Vec<String> = match &db {
        Some(name) => vec![name.clone()],
        None => {
            let cluster = app.cluster();
            let mut all: Vec<String> =
                super::snapshot::configured_databases(&cluster.config).collect();
            all.extend(cluster.pools().iter().map(|p| p.settings.database.clone()));
            all
        }
    };
    update_paused(app, |p| p.databases.extend(names.iter().cloned()));
    let mut killed = 0;
    for client in app.client_list.snapshot() {
        if names.contains(&client.database) {
            if let Some(task) = client.abort.lock().as_ref() {
                task.abort();
                killed += 1;
            }
        }
    }
    // Idle connections close now; lent ones go with their aborted sessions.
    for pool in pools_of(app, db.as_deref()) {
        pool.reconnect();
    }
    tracing::info!(
        db = db.as_deref().unwrap_or("*"),
        clients = killed,
        "KILL command issued"
    );
    Ok(())
}

/// KILL_CLIENT id (an `id` from SHOW CLIENTS).
pub fn kill_client(app: &App, arg: &str) -> Result<(), AdminError> {
    let id: u64 = arg.parse().map_err(|_| AdminError::BadClientId)?;
    let client = app
        .client_list
        .snapshot()
        .into_iter()
        .find(|c| c.id == id)
        .ok_or(AdminError::NoSuchClient)?;
    if let Some(task) = client.abort.lock().as_ref() {
        task.abort();
    }
    tracing::info!(id, "KILL_CLIENT command issued");
    Ok(())
}

/// RECONNECT [db]: close each server connection when it is next released.
pub fn reconnect(app: &App, db: Option<&str>) -> Result<(), AdminError> {
    let db = db.map(|d| database(app, "reconnect", d)).transpose()?;
    for pool in pools_of(app, db.as_deref()) {
        pool.reconnect();
    }
    tracing::info!(
        db = db.as_deref().unwrap_or("*"),
        "RECONNECT command issued"
    );
    Ok(())
}

/// WAIT_CLOSE [db]: validates the argument; then poll [`close_done`].
pub fn wait_close(app: &App, db: Option<&str>) -> Result<Option<String>, AdminError> {
    db.map(|d| database(app, "wait in", d)).transpose()
}

/// True once no connection of `db` (or any) still waits to be closed after
/// a RECONNECT or a reload, in live or retired pools.
pub fn close_done(app: &App, db: Option<&str>) -> bool {
    let mut pools = pools_of(app, db);
    pools.extend(
        app.admin
            .stats
            .retired()
            .into_iter()
            .filter(|p| db.is_none_or(|d| p.settings.database == d)),
    );
    pools.iter().all(|p| p.old_connections() == 0)
}

/// DISABLE db: refuse new clients of the database.
pub fn disable(app: &App, db: Option<&str>) -> Result<(), AdminError> {
    let name = db.ok_or(AdminError::DatabaseRequired)?;
    let name = database(app, "disable", name)?;
    tracing::info!(db = %name, "DISABLE command issued");
    app.disabled.lock().insert(name);
    Ok(())
}

/// ENABLE db: accept new clients again.
pub fn enable(app: &App, db: Option<&str>) -> Result<(), AdminError> {
    let name = db.ok_or(AdminError::DatabaseRequired)?;
    if is_admin_db(name) {
        return Err(AdminError::AdminDatabase("enable", name.to_string()));
    }
    let mut disabled = app.disabled.lock();
    if !disabled.contains(name) && app.cluster().config.database(name).is_none() {
        return Err(AdminError::NoSuchDatabase(name.to_string()));
    }
    disabled.remove(name);
    drop(disabled);
    tracing::info!(db = %name, "ENABLE command issued");
    Ok(())
}

/// RELOAD: read the config file again and apply it.
pub fn reload(app: &App) -> Result<(), AdminError> {
    tracing::info!("RELOAD command issued");
    app.reload_from_disk().map_err(|e| {
        tracing::error!(error = %e, "RELOAD failed; keeping the running configuration");
        AdminError::ReloadFailed
    })
}

/// SET key = value, applied like a reload of the changed config.
pub fn set(app: &App, key: &str, value: &str) -> Result<(), AdminError> {
    let config = app.cluster().config.clone();
    match super::settings::apply(&config, key, value) {
        Ok(new) => {
            tracing::info!(%key, %value, "SET command issued");
            app.reload(new);
            Ok(())
        }
        Err(e) => {
            tracing::warn!(%key, %value, error = %e, "SET failed");
            Err(AdminError::SetFailed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn app() -> Arc<App> {
        let config = Config::from_toml(
            Path::new("/tmp/weir.toml"),
            "[databases.app]\nport = 1\n[databases.other]\nport = 1\n",
        )
        .expect("config");
        App::new(config)
    }

    #[test]
    fn errors_read_like_pgbouncer() {
        assert_eq!(
            AdminError::Syntax("FOO".into()).to_string(),
            "invalid command 'FOO', use SHOW HELP;"
        );
        assert_eq!(
            AdminError::AdminDatabase("pause", "pgbouncer".into()).to_string(),
            "cannot pause admin db: pgbouncer"
        );
        assert_eq!(AdminError::AccessDenied.sqlstate(), "08P01");
        assert_eq!(AdminError::ReloadFailed.sqlstate(), "F0000");
    }

    #[tokio::test]
    async fn pause_and_resume_follow_pgbouncer_rules() {
        let app = app();
        assert_eq!(
            pause(&app, Some("nope")),
            Err(AdminError::NoSuchDatabase("nope".into()))
        );
        assert_eq!(
            pause(&app, Some("weir")),
            Err(AdminError::AdminDatabase("pause", "weir".into()))
        );
        assert_eq!(pause(&app, Some("app")), Ok(Some("app".into())));
        assert!(app.cluster().paused().covers("app"));
        assert!(!app.cluster().paused().covers("other"));
        assert!(pause_done(&app, Some("app")));
        // RESUME without a database only ends a global PAUSE.
        assert_eq!(resume(&app, None), Err(AdminError::NotPaused));
        assert_eq!(
            resume(&app, Some("other")),
            Err(AdminError::DatabaseNotPaused("other".into()))
        );
        assert_eq!(resume(&app, Some("app")), Ok(()));
        assert_eq!(pause(&app, None), Ok(None));
        assert_eq!(pause(&app, Some("app")), Err(AdminError::AlreadyPaused));
        assert_eq!(kill(&app, Some("app")), Err(AdminError::AlreadyPaused));
        assert_eq!(resume(&app, None), Ok(()));
        assert_eq!(app.cluster().paused(), Paused::default());
    }

    #[tokio::test]
    async fn pause_survives_a_reload_and_reaches_new_pools() {
        let app = app();
        pause(&app, Some("app")).expect("pause");
        let config = app.cluster().config.as_ref().clone();
        app.reload(config);
        let cluster = app.cluster();
        assert!(cluster.paused().covers("app"));
        let db = cluster.config.database("app").expect("db");
        assert!(cluster.pool(&db, "u").is_paused());
        let other = cluster.config.database("other").expect("db");
        assert!(!cluster.pool(&other, "u").is_paused());
    }

    #[tokio::test]
    async fn enable_disable_and_set() {
        let app = app();
        assert_eq!(disable(&app, None), Err(AdminError::DatabaseRequired));
        assert_eq!(disable(&app, Some("app")), Ok(()));
        assert!(app.disabled.lock().contains("app"));
        assert_eq!(enable(&app, Some("app")), Ok(()));
        assert!(app.disabled.lock().is_empty());
        assert_eq!(set(&app, "default_pool_size", "3"), Ok(()));
        assert_eq!(app.cluster().config.general.default_pool_size, 3);
        assert_eq!(set(&app, "listen_port", "1"), Err(AdminError::SetFailed));
        assert_eq!(kill_client(&app, "x"), Err(AdminError::BadClientId));
        assert_eq!(kill_client(&app, "99"), Err(AdminError::NoSuchClient));
    }
}
