//! The admin console: the virtual `pgbouncer` / `weir` database answering
//! PgBouncer's SHOW and control commands over the simple query protocol.

use crate::net::Stream;
use crate::App;
use bytes::BytesMut;
use std::sync::Arc;

/// Names of the virtual admin database.
pub fn is_admin_db(name: &str) -> bool {
    name == "pgbouncer" || name == "weir"
}

/// What an authenticated console user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `admin_users`: everything.
    Admin,
    /// `stats_users`: read-only SHOW commands.
    Stats,
}

/// Serves one console connection after authentication succeeded; sends the
/// login reply (AuthenticationOk … ReadyForQuery) itself.
pub async fn serve(app: Arc<App>, stream: Stream, buf: BytesMut, user: String, role: Role) {
    let _ = (app, stream, buf, user, role);
}
