//! Replication connections (`replication=database` for logical, `replication=true` for
//! physical): as PgBouncer ≥ 1.23, each gets a server connection of its own, opened with the
//! client's startup parameters, held for the whole session and closed at its end. Past the
//! login Weir relays bytes both ways unread (the walsender's CopyBoth streams, `BASE_BACKUP`
//! tar data): nothing of a replication session is pooled, so nothing needs reconciling.

use super::*;
use crate::logging::Who;

/// What the client's `replication` startup parameter asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// `replication=database`: a logical walsender bound to the database.
    Logical,
    /// `replication=true` (or on, yes, 1): a physical walsender.
    Physical,
}

impl Mode {
    /// Reads the parameter as PostgreSQL does: `database`, or a boolean. `Ok(None)`: an
    /// ordinary connection.
    pub(super) fn parse(value: &str) -> Result<Option<Mode>, String> {
        let v = value.trim().to_ascii_lowercase();
        match v.as_str() {
            "database" => Ok(Some(Mode::Logical)),
            "true" | "on" | "yes" | "1" | "t" | "y" => Ok(Some(Mode::Physical)),
            "false" | "off" | "no" | "0" | "f" | "n" => Ok(None),
            _ => Err(format!(
                "invalid value for parameter \"replication\": \"{value}\""
            )),
        }
    }

    /// The value sent on to the server.
    fn server_value(self) -> &'static str {
        match self {
            Mode::Logical => "database",
            Mode::Physical => "true",
        }
    }
}

/// A logged-in replication client and the server it has for its whole session.
pub(super) struct Replicated {
    pub(super) user: String,
    pub(super) db: String,
    pub(super) server: ServerConn,
    pub(super) key: FrontendKey,
    pub(super) pool: Arc<Pool>,
}

/// Opens the client's walsender connection and welcomes the client with the server's own
/// parameters. The client has authenticated and been admitted to the client limits; on
/// failure both are undone here and the client told why.
#[allow(clippy::too_many_arguments)]
pub(super) async fn open(
    app: &Arc<App>,
    stream: &mut Stream,
    who: &Who,
    log: bool,
    pool: Arc<Pool>,
    user: String,
    params: &[(String, String)],
    mode: Mode,
) -> Option<Replicated> {
    // The client's own parameters go to the server as it sent them (ignore_startup_parameters
    // does not apply: nothing of this session is shared).
    let mut extra: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "user" | "database" | "replication"))
        .cloned()
        .collect();
    extra.push(("replication".into(), mode.server_value().into()));
    let db = pool.settings.database.clone();
    let server = match pool.open_dedicated(&extra).await {
        Ok(s) => s,
        Err(e) => {
            app.release_client(&db, &user);
            let message = match &e {
                CheckoutError::Connect(c) => format!("login failed: {c}"),
                other => other.to_string(),
            };
            if log {
                let reason = match e {
                    CheckoutError::Connect(_) => "login failed".to_string(),
                    other => other.to_string(),
                };
                crate::logging::closing(who, &reason, 0);
            }
            fatal(stream, "08P01", &message).await;
            return None;
        }
    };
    let (key, _cancel) = app.cancels.register();
    let mut out = BytesMut::with_capacity(512);
    out.put(build::auth(0, &[]));
    for (name, value) in server.params.iter() {
        out.put(build::parameter_status(name, value));
    }
    out.put(build::backend_key_data(key.pid, key.secret));
    out.put(build::ready_for_query(TxStatus::Idle));
    if stream.write_all(&out).await.is_err() {
        app.cancels.unregister(key);
        app.release_client(&db, &user);
        return None;
    }
    if log {
        tracing::info!(
            "{who} login attempt: db={db} user={user} tls={} replication={}",
            stream.tls_description(),
            mode.server_value()
        );
    }
    Some(Replicated {
        user,
        db,
        server,
        key,
        pool,
    })
}

/// Relays the session until either side closes, then closes the server connection.
pub(super) async fn serve(app: Arc<App>, mut stream: Stream, buf: BytesMut, r: Replicated) {
    let Replicated {
        user,
        db,
        mut server,
        key,
        pool,
    } = r;
    let started = std::time::Instant::now();
    let relay = async {
        // Whatever either side sent ahead of the relay goes first.
        if !buf.is_empty() {
            server.stream.write_all(&buf).await?;
        }
        if !server.buf.is_empty() {
            let ahead = server.buf.split();
            stream.write_all(&ahead).await?;
        }
        tokio::io::copy_bidirectional(&mut stream, &mut server.stream).await
    };
    let result = relay.await;
    app.cancels.unregister(key);
    app.release_client(&db, &user);
    let log = app.cluster().config.general.log_disconnections;
    if log {
        let reason = match result {
            Ok(_) => "client close request",
            Err(_) => "client unexpected eof",
        };
        crate::logging::closing(&pool.who(&server), "replication session ended", 0);
        let peer = stream.peer();
        crate::logging::closing(
            &Who::client(0, &db, &user, &peer),
            reason,
            started.elapsed().as_secs(),
        );
    }
    drop(server);
}
