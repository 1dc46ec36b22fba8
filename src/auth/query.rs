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
    #[error("auth_dbname {0:?} is not a configured database")]
    NoAuthDatabase(String),
    #[error("auth_query failed: {0}")]
    Server(String),
    #[error("auth_query could not reach the server: {0}")]
    Connect(String),
    #[error("auth_query timed out")]
    Timeout,
}

/// Runs the database's `auth_query` for `user`. `Ok(None)`: no such user, or
/// one without a usable password (expired, or none set).
pub async fn lookup(
    cluster: &Cluster,
    db: &Database,
    user: &str,
) -> Result<Option<Secret>, LookupError> {
    let Some(auth_user) = &db.auth_user else {
        return Ok(None);
    };
    let target = match &db.auth_dbname {
        Some(name) => cluster
            .config
            .database(name)
            .ok_or_else(|| LookupError::NoAuthDatabase(name.clone()))?,
        None => Arc::new(db.clone()),
    };
    let pool = cluster.pool(&target, auth_user);
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
    // (name, password): the password column is the second one, NULL when unusable.
    Ok(row
        .get(1)
        .cloned()
        .flatten()
        .filter(|p| !p.is_empty())
        .map(|p| Secret::parse(&p)))
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
