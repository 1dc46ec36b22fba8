//! Login: the startup packet, authentication (trust, md5, SCRAM, hba; the admin console's
//! own users), the parameters the client wants, and the welcome it is sent.

use super::*;
use crate::logging::Who;
use crate::stats::PoolTotals;

pub(super) enum Login {
    Client(Box<LoggedIn>),
    Admin {
        user: String,
        role: crate::admin::Role,
    },
    Replication(Box<replication::Replicated>),
}

pub(super) struct LoggedIn {
    pub(super) user: String,
    pub(super) db: Arc<Database>,
    pub(super) pool: Arc<Pool>,
    pub(super) generation: u64,
    pub(super) wanted: ParamSet,
    pub(super) key: FrontendKey,
    pub(super) cancel: Arc<CancelEntry>,
    /// Session mode: the server opened to learn the pool's parameters, kept for this client
    /// (as PgBouncer links it at login).
    pub(super) first_server: Option<Box<crate::backend::ServerConn>>,
}

/// Refuses a login: the client gets the error, the log PgBouncer's closing line for it.
async fn refuse(stream: &mut Stream, who: &Who, log: bool, code: &str, message: &str) {
    if log {
        crate::logging::closing(who, message, 0);
    }
    fatal(stream, code, message).await;
}

pub(super) async fn login(
    app: &Arc<App>,
    cluster: &Arc<Cluster>,
    stream: &mut Stream,
    buf: &mut BytesMut,
    peer: &str,
    late: bool,
) -> Option<Login> {
    let generation = app.generation();
    let log = cluster.config.general.log_disconnections;
    let mut who = Who::client(0, "", "", peer);
    let params = match startup::read(stream, buf, &cluster.config.tls.client).await {
        Ok(Start::Login(p)) => p,
        Ok(Start::Cancel(key)) => {
            match app.cancels.lookup(key) {
                Some(target) => cancel::forward(target).await,
                None => tracing::debug!(%peer, "cancel request for unknown or idle client"),
            }
            return None;
        }
        Ok(Start::Refused(Some((code, msg)))) => {
            refuse(stream, &who, log, code, &msg).await;
            return None;
        }
        Ok(Start::Refused(None)) | Err(_) => return None,
    };
    let g = &cluster.config.general;
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let Some(user) = get("user").filter(|u| !u.is_empty()) else {
        refuse(
            stream,
            &who,
            log,
            "28000",
            "no PostgreSQL user name specified in startup packet",
        )
        .await;
        return None;
    };
    let dbname = get("database")
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());
    who.user = user.clone();
    who.db = dbname.clone();
    let replication = match get("replication").map(|v| replication::Mode::parse(&v)) {
        None => None,
        Some(Ok(mode)) => mode,
        Some(Err(msg)) => {
            refuse(stream, &who, log, "08P01", &msg).await;
            return None;
        }
    };
    if replication.is_some() && crate::admin::is_admin_db(&dbname) {
        refuse(
            stream,
            &who,
            log,
            "08P01",
            "replication connections to the admin console are not supported",
        )
        .await;
        return None;
    }
    if crate::admin::is_admin_db(&dbname) {
        if user == "pgbouncer" && is_own_user(stream) {
            // PgBouncer lets its own OS user in over the Unix socket (no client limit applies;
            // counted so the console's end releases it).
            let _ = app.admit_client(crate::admin::snapshot::ADMIN_DB, &user, 0, 0);
            return Some(Login::Admin {
                user,
                role: crate::admin::Role::Admin,
            });
        }
        return admin_login(app, stream, buf, cluster, user, &dbname, peer).await;
    }
    if app.clients.load(Ordering::Acquire) > g.max_client_conn {
        tracing::warn!(%peer, %user, db = %dbname, "no more connections allowed (max_client_conn)");
        refuse(
            stream,
            &who,
            log,
            "08P01",
            "no more connections allowed (max_client_conn)",
        )
        .await;
        return None;
    }
    if late {
        // Accepted on the Unix socket after a shutdown began: admin console only.
        refuse(stream, &who, log, "57P01", "pooler is shutting down").await;
        return None;
    }
    if app.shutdown_state() == Shutdown::Immediate {
        refuse(stream, &who, log, "57P01", "Weir is shutting down").await;
        return None;
    }
    if app.disabled.lock().contains(&dbname) {
        refuse(
            stream,
            &who,
            log,
            "08P01",
            &format!("database \"{dbname}\" is disabled"),
        )
        .await;
        return None;
    }
    let Some(db) = cluster.config.database(&dbname) else {
        // As PgBouncer: the client proves who it is first, so a wrong password never
        // learns whether a database exists (an unknown user fails the password check).
        let auth_type = auth_type_for(cluster, stream, &dbname, &user, peer).await?;
        let known = cluster.config.users.get(&user);
        if known.is_none() {
            tracing::info!("{who} no such user: {user}");
        }
        let secret = known.and_then(|u| u.secret.as_ref());
        if auth_type != AuthType::Trust || known.is_some() {
            match auth::authenticate(stream, buf, auth_type, &user, secret).await {
                Ok(_) => {}
                Err(AuthError::Closed) | Err(AuthError::Io(_)) => return None,
                Err(e) => {
                    refuse(stream, &who, log, e.code(), &e.to_string()).await;
                    return None;
                }
            }
        }
        tracing::info!(%peer, %user, db = %dbname, "no such database");
        refuse(
            stream,
            &who,
            log,
            "3D000",
            &format!("no such database: {dbname}"),
        )
        .await;
        return None;
    };
    let auth_type = auth_type_for(cluster, stream, &dbname, &user, peer).await?;
    let known = cluster.config.users.get(&user);
    let mut looked_up = None;
    let mut known_by_query = false;
    if known.and_then(|u| u.secret.as_ref()).is_none() && auth_type != AuthType::Any {
        if let Some(auth_user) = db.auth_user.clone() {
            match query_secret(app, cluster, Some(&db), &auth_user, &user, &who).await {
                Ok(found) => {
                    known_by_query = true;
                    looked_up = found;
                }
                Err((code, msg)) => {
                    cluster.forget_unused_auto(&dbname);
                    refuse(stream, &who, log, code, &msg).await;
                    return None;
                }
            }
        }
    }
    if auth_type == AuthType::Trust
        && known.and_then(|u| u.secret.as_ref()).is_none()
        && !known_by_query
    {
        // As PgBouncer: trust skips the password, but the user must have an auth_file entry
        // (or be found by auth_query); a [users] section alone is not enough.
        tracing::warn!(%peer, %user, "unknown user (auth_type trust)");
        let e = AuthError::TrustFailed;
        refuse(stream, &who, log, e.code(), &e.to_string()).await;
        return None;
    }
    let secret = looked_up
        .as_ref()
        .or_else(|| known.and_then(|u| u.secret.as_ref()));
    let authenticated = auth::authenticate(stream, buf, auth_type, &user, secret).await;
    if authenticated.is_err() {
        cluster.forget_unused_auto(&dbname);
    }
    let proof = match authenticated {
        Ok(p) => p,
        Err(AuthError::Closed) | Err(AuthError::Io(_)) => return None,
        Err(e) => {
            tracing::warn!(%peer, %user, db = %dbname, error = %e, "client authentication failed");
            refuse(stream, &who, log, e.code(), &e.to_string()).await;
            return None;
        }
    };
    let pool = cluster.pool(&db, &user);
    if looked_up.is_some() || proof.scram_client_key.is_some() {
        // Every pool this user may reach (all shards and replicas) logs in the same way.
        for p in cluster.user_pools(&db, &user) {
            if let Some(s) = &looked_up {
                p.set_looked_up_secret(s.clone());
            }
            if let Some(key) = proof.scram_client_key {
                p.set_scram_key(key);
            }
        }
    }
    if let Some(mode) = replication {
        let user_limit = cluster.config.user_client_limit(&user);
        if let Err(limit) =
            app.admit_client(&db.name, &user, db.max_db_client_connections, user_limit)
        {
            refuse(stream, &who, log, "08P01", limit.message()).await;
            return None;
        }
        let r = replication::open(app, stream, &who, log, pool, user, &params, mode).await?;
        return Some(Login::Replication(Box::new(r)));
    }
    let mut first_server = None;
    let defaults = match pool.defaults() {
        Some(d) => d,
        None => match checkout_in_time(&pool, cluster.config.timeouts(&user).query).await {
            Ok(conn) => {
                let d = conn.params.clone();
                if pool.settings.mode == PoolMode::Session {
                    first_server = Some(Box::new(conn));
                } else {
                    pool.checkin(conn);
                }
                d
            }
            Err(e) => {
                let (code, msg) = checkout_error(&e);
                refuse(stream, &who, log, &code, &msg).await;
                return None;
            }
        },
    };
    let mut wanted = defaults.tracked_defaults();
    for (k, v) in &params {
        match k.as_str() {
            "user" | "database" | "replication" => {}
            "options" => match startup::parse_options(v) {
                // As PgBouncer: a setting in ignore_startup_parameters is dropped here too.
                Ok(list) => list
                    .iter()
                    .filter(|(k, _)| !g.ignore_startup_parameters.contains(k))
                    .for_each(|(k, v)| wanted.set(k, v)),
                // `options` itself ignored: what cannot be parsed is dropped, not refused.
                Err(_) if g.ignore_startup_parameters.contains("options") => {}
                Err(msg) => {
                    refuse(stream, &who, log, "08P01", &msg).await;
                    return None;
                }
            },
            k if g.ignore_startup_parameters.contains(k) => {}
            k => wanted.set(k, v),
        }
    }
    if g.application_name_add_host {
        // As PgBouncer: "<application_name> - <host>:<port>" of the client.
        let name = wanted
            .get("application_name")
            .unwrap_or_default()
            .to_string();
        wanted.set("application_name", &format!("{name} - {peer}"));
    }
    app.param_sets.share(&mut wanted);
    let user_limit = cluster.config.user_client_limit(&user);
    if let Err(limit) = app.admit_client(&db.name, &user, db.max_db_client_connections, user_limit)
    {
        refuse(stream, &who, log, "08P01", limit.message()).await;
        return None;
    }
    // Released by the session's `Registered` (or below, if the welcome cannot be sent).
    let (key, cancel) = app.cancels.register();
    let mut out = BytesMut::with_capacity(512);
    out.put(build::auth(0, &[]));
    for (name, value) in defaults.iter() {
        let value = wanted.get(name).unwrap_or(value);
        out.put(build::parameter_status(name, value));
    }
    out.put(build::backend_key_data(key.pid, key.secret));
    if !g.login_notify_message.is_empty() {
        out.put(build::notice("NOTICE", "00000", &g.login_notify_message));
    }
    out.put(build::ready_for_query(TxStatus::Idle));
    if stream.write_all(&out).await.is_err() {
        app.cancels.unregister(key);
        app.release_client(&db.name, &user);
        return None;
    }
    PoolTotals::add(&pool.totals.client_logins, 1);
    if g.log_connections {
        let tls = stream.tls_description();
        tracing::info!("{who} login attempt: db={dbname} user={user} tls={tls}");
    }
    Some(Login::Client(Box::new(LoggedIn {
        user,
        db,
        pool,
        generation,
        wanted,
        key,
        cancel,
        first_server,
    })))
}

/// Looks a user that is in no auth file up with `auth_query` as `auth_user`, in the auth
/// database of `db` (`None`: the admin console). `Err`: what the client is told (PgBouncer's
/// words: "no such user", "bouncer config error") with its SQLSTATE, the reason already logged.
/// An unknown user gets 28P01, the class drivers treat as a failed login (PgBouncer: 08P01).
async fn query_secret(
    app: &App,
    cluster: &Cluster,
    db: Option<&Arc<Database>>,
    auth_user: &str,
    user: &str,
    who: &Who,
) -> Result<Option<crate::config::secret::Secret>, (&'static str, String)> {
    use crate::auth::query::{self, AuthDbError, Lookup, LookupError};
    let target = query::auth_database(cluster, db, |name| app.disabled.lock().contains(name))
        .map_err(|e| {
            if !matches!(e, AuthDbError::Disabled(_)) {
                tracing::error!("{who} {e}");
            }
            ("08P01", e.client_message())
        })?;
    let query_of = db.map_or(&target, |d| d);
    match query::lookup(cluster, query_of, &target, auth_user, user).await {
        Ok(Lookup::Found(secret)) => Ok(secret),
        Ok(Lookup::NoSuchUser) => {
            tracing::info!("{who} no such user: {user}");
            Err(("28P01", "no such user".into()))
        }
        Err(e @ LookupError::Server(_)) => {
            tracing::error!("{who} {e}");
            Err(("08P01", "bouncer config error".into()))
        }
        Err(e) => {
            tracing::warn!("{who} {e}");
            Err(("08P01", e.to_string()))
        }
    }
}

/// The authentication this connection must pass: `auth_type`, or what `auth_hba_file` asks of
/// it (for the admin console too, as PgBouncer). `None`: rejected, and the client told so.
async fn auth_type_for(
    cluster: &Cluster,
    stream: &mut Stream,
    dbname: &str,
    user: &str,
    peer: &str,
) -> Option<AuthType> {
    let g = &cluster.config.general;
    let Some(hba) = cluster
        .config
        .hba
        .as_ref()
        .filter(|_| g.auth_type == AuthType::Hba)
    else {
        return Some(g.auth_type);
    };
    if let Some(t) = hba_auth_type(hba, stream, dbname, user) {
        return Some(t);
    }
    tracing::warn!(%peer, %user, db = %dbname, "rejected by auth_hba_file");
    let host = peer.rsplit_once(':').map_or(peer, |(h, _)| h);
    refuse(
        stream,
        &Who::client(0, dbname, user, peer),
        g.log_disconnections,
        "28000",
        &format!("pg_hba.conf rejects connection for host \"{host}\", user \"{user}\", database \"{dbname}\""),
    )
    .await;
    None
}

/// The authentication `auth_hba_file` asks of this connection; `None` rejects it.
fn hba_auth_type(
    hba: &crate::auth::hba::Hba,
    stream: &Stream,
    dbname: &str,
    user: &str,
) -> Option<AuthType> {
    use crate::auth::hba::{Method, Peer};
    let peer = Peer {
        ip: stream
            .tcp()
            .and_then(|s| s.peer_addr().ok())
            .map(|a| a.ip()),
        tls: stream.is_tls(),
    };
    match hba.method(peer, dbname, user) {
        Method::Trust => Some(AuthType::Trust),
        Method::Md5 => Some(AuthType::Md5),
        Method::Password => Some(AuthType::Plain),
        Method::ScramSha256 => Some(AuthType::ScramSha256),
        Method::Peer if peer_os_user(stream).as_deref() == Some(user) => Some(AuthType::Any),
        Method::Peer | Method::Reject | Method::Cert => None,
    }
}

/// The OS user name of a Unix-socket peer.
fn peer_os_user(stream: &Stream) -> Option<String> {
    let Stream::Unix(s) = stream else {
        return None;
    };
    let uid = s.peer_cred().ok()?.uid();
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 4096];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer refers to live, correctly sized storage owned here;
    // getpwuid_r writes only within `buf` and `pwd`.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
        return None;
    }
    // SAFETY: on success pw_name points to a NUL-terminated string inside `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
    Some(name.to_string_lossy().into_owned())
}

/// True for a Unix-socket peer running as this process's OS user.
fn is_own_user(stream: &Stream) -> bool {
    match stream {
        Stream::Unix(s) => s
            .peer_cred()
            .map(|c| c.uid() == unsafe { libc::geteuid() })
            .unwrap_or(false),
        _ => false,
    }
}

/// Authenticates a console user: only `admin_users` and `stats_users` get in
/// (as PgBouncer; any authenticated user may connect when auth_type is trust
/// only if listed).
async fn admin_login(
    app: &App,
    stream: &mut Stream,
    buf: &mut BytesMut,
    cluster: &Arc<Cluster>,
    user: String,
    dbname: &str,
    peer: &str,
) -> Option<Login> {
    let g = &cluster.config.general;
    let who = Who::client(0, dbname, &user, peer);
    let log = g.log_disconnections;
    let auth_type = auth_type_for(cluster, stream, dbname, &user, peer).await?;
    let known = cluster.config.users.get(&user);
    let mut looked_up = None;
    let mut known_by_query = false;
    if known.and_then(|u| u.secret.as_ref()).is_none() && auth_type != AuthType::Any {
        // As PgBouncer: a console user in no auth file is looked up with the global
        // auth_user and auth_query, in the global auth_dbname.
        if let Some(auth_user) = g.auth_user.clone() {
            match query_secret(app, cluster, None, &auth_user, &user, &who).await {
                Ok(found) => {
                    known_by_query = true;
                    looked_up = found;
                }
                Err((code, msg)) => {
                    refuse(stream, &who, log, code, &msg).await;
                    return None;
                }
            }
        }
    }
    if auth_type == AuthType::Trust
        && known.and_then(|u| u.secret.as_ref()).is_none()
        && !known_by_query
    {
        // As PgBouncer: trust skips the password, but the user must have an auth_file entry
        // (or be found by auth_query); a [users] section alone is not enough.
        tracing::warn!(%peer, %user, "unknown user (auth_type trust)");
        let e = AuthError::TrustFailed;
        refuse(stream, &who, log, e.code(), &e.to_string()).await;
        return None;
    }
    let secret = looked_up
        .as_ref()
        .or_else(|| known.and_then(|u| u.secret.as_ref()));
    if let Err(e) = auth::authenticate(stream, buf, auth_type, &user, secret).await {
        if !matches!(e, AuthError::Closed | AuthError::Io(_)) {
            tracing::warn!(%peer, %user, error = %e, "admin console authentication failed");
            refuse(stream, &who, log, e.code(), &e.to_string()).await;
        }
        return None;
    }
    let role = if g.admin_users.contains(&user) {
        crate::admin::Role::Admin
    } else if g.stats_users.contains(&user) {
        crate::admin::Role::Stats
    } else {
        refuse(stream, &who, log, "08P01", "not allowed").await;
        return None;
    };
    // As PgBouncer: admin users are never turned away by the client limits on the console.
    let (db_limit, user_limit) = match role {
        crate::admin::Role::Admin => (0, 0),
        crate::admin::Role::Stats => (
            g.max_db_client_connections,
            cluster.config.user_client_limit(&user),
        ),
    };
    if let Err(limit) = app.admit_client(
        crate::admin::snapshot::ADMIN_DB,
        &user,
        db_limit,
        user_limit,
    ) {
        refuse(stream, &who, log, "08P01", limit.message()).await;
        return None;
    }
    // Released by the console when it ends (`admin::serve`).
    Some(Login::Admin { user, role })
}

/// A checkout during login, bounded by query_timeout as PgBouncer bounds every waiting
/// client (zero: only query_wait_timeout applies).
async fn checkout_in_time(
    pool: &Arc<crate::backend::pool::Pool>,
    limit: std::time::Duration,
) -> Result<crate::backend::conn::ServerConn, CheckoutError> {
    if limit.is_zero() {
        return pool.checkout().await;
    }
    tokio::time::timeout(limit, pool.checkout())
        .await
        .unwrap_or(Err(CheckoutError::QueryTimeout))
}
