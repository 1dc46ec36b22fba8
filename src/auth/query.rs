//! `auth_user` + `auth_query`: the secret of a user that is in no auth file
//! comes from PostgreSQL itself, read over a pooled connection of `auth_user`.

use crate::backend::conn::ExecError;
use crate::backend::params::quote_literal;
use crate::cluster::Cluster;
use crate::config::secret::Secret;
use crate::config::Database;
use std::sync::Arc;
use std::time::Duration;

/// Bound on one lookup (connecting included).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a lookup gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("auth_query failed: {0}")]
    Server(String),
    #[error("auth_query could not reach the server: {0}")]
    Connect(String),
    #[error("auth_query timed out")]
    Timeout,
}

/// What `auth_query` said about a user.
#[derive(Debug)]
pub enum Lookup {
    /// No row: PgBouncer turns the client away with "no such user".
    NoSuchUser,
    /// A row; `None` when its password is NULL or empty (expired, or none set), which
    /// fails the password check.
    Found(Option<Secret>),
}

/// Runs `auth_query` of `db` for `user` as `auth_user`, in the database `target` (the
/// auth database, see [`auth_database`]).
pub async fn lookup(
    cluster: &Cluster,
    db: &Database,
    target: &Arc<Database>,
    auth_user: &str,
    user: &str,
) -> Result<Lookup, LookupError> {
    let pool = cluster.pool(target, auth_user);
    let sql = query_for(&db.auth_query, user);
    let work = async {
        let mut conn = pool
            .checkout()
            .await
            .map_err(|e| LookupError::Connect(e.to_string()))?;
        match conn.query_row(&sql).await {
            Ok(row) => {
                pool.checkin(conn);
                Ok(row)
            }
            Err(ExecError::Server(e)) => {
                pool.checkin(conn);
                Err(LookupError::Server(e.message))
            }
            Err(e) => Err(LookupError::Server(e.to_string())),
        }
    };
    let row = tokio::time::timeout(LOOKUP_TIMEOUT, work)
        .await
        .map_err(|_| LookupError::Timeout)??;
    if row.is_empty() {
        return Ok(Lookup::NoSuchUser);
    }
    // (name, password): the password column is the second one, NULL when unusable.
    Ok(Lookup::Found(
        row.get(1)
            .cloned()
            .flatten()
            .filter(|p| !p.is_empty())
            .map(|p| Secret::parse(&p)),
    ))
}

/// Why the database `auth_query` should run in cannot be used; each is "bouncer config
/// error" to the client, as PgBouncer, except a disabled one.
#[derive(Debug, thiserror::Error)]
pub enum AuthDbError {
    #[error("authentication database \"{0}\" is not configured.")]
    NotConfigured(String),
    #[error("authentication database \"{0}\" is disabled")]
    Disabled(String),
    #[error("cannot use the reserved \"{0}\" database as an auth_dbname")]
    Reserved(String),
}

impl AuthDbError {
    /// What the client is told.
    pub fn client_message(&self) -> String {
        match self {
            AuthDbError::Disabled(_) => self.to_string(),
            _ => "bouncer config error".into(),
        }
    }
}

/// The database `auth_query` runs in for a client of `db` (PgBouncer's order: the
/// database's `auth_dbname`, the global one, else `db` itself; an unlisted name falls back
/// to the `*` database). `db` is `None` for the admin console, which has no database of
/// its own to run a query in.
pub fn auth_database(
    cluster: &Cluster,
    db: Option<&Arc<Database>>,
    is_disabled: impl Fn(&str) -> bool,
) -> Result<Arc<Database>, AuthDbError> {
    let name = db
        .and_then(|d| d.auth_dbname.clone())
        .or_else(|| cluster.config.general.auth_dbname.clone());
    let target = match (&name, db) {
        (Some(n), _) if crate::admin::is_admin_db(n) => {
            return Err(AuthDbError::Reserved(n.clone()))
        }
        (Some(n), _) => cluster
            .config
            .database(n)
            .ok_or_else(|| AuthDbError::NotConfigured(n.clone()))?,
        (None, Some(d)) => d.clone(),
        (None, None) => {
            return Err(AuthDbError::Reserved(
                crate::admin::snapshot::ADMIN_DB.to_string(),
            ))
        }
    };
    if is_disabled(&target.name) {
        return Err(AuthDbError::Disabled(target.name.clone()));
    }
    Ok(target)
}

/// The query with `$1` replaced by the user name as a string literal.
fn query_for(query: &str, user: &str) -> String {
    query.replace("$1", &quote_literal(user))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_the_user_name() {
        assert_eq!(
            query_for(
                "SELECT usename, passwd FROM pg_shadow WHERE usename=$1",
                "o'brien"
            ),
            "SELECT usename, passwd FROM pg_shadow WHERE usename=E'o''brien'"
        );
    }
}
