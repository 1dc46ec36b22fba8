//! What Weir reads from a sharded database's catalog: each sharded table's columns in
//! order (for `INSERT … VALUES` and `COPY` without a column list). Read from shard 0's
//! primary when the router starts (also after a RELOAD) and after DDL seen through Weir.

use super::Pool;
use crate::backend::params::quote_literal;
use crate::router::route::ShardRouter;
use std::sync::Arc;
use std::time::Duration;

/// Reads every sharded table's columns and gives them to the router.
pub async fn refresh(router: &ShardRouter, pool: &Pool) -> Result<(), String> {
    let mut conn = tokio::time::timeout(Duration::from_secs(10), pool.connect_unpooled())
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    for (t, spec) in router.tables().iter().enumerate() {
        let name = match &spec.schema {
            Some(s) => format!("{s}.{}", spec.table),
            None => spec.table.clone(),
        };
        let sql = format!(
            "SELECT a.attname, a.attgenerated <> '' FROM pg_catalog.pg_attribute a \
             WHERE a.attrelid = pg_catalog.to_regclass({}) AND a.attnum > 0 \
             AND NOT a.attisdropped ORDER BY a.attnum",
            quote_literal(&name)
        );
        let rows = tokio::time::timeout(Duration::from_secs(10), conn.query_rows(&sql))
            .await
            .map_err(|_| "catalog query timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let columns: Vec<(String, bool)> = rows
            .into_iter()
            .filter_map(|r| {
                let name = r.first().cloned().flatten()?;
                let generated = r.get(1).cloned().flatten().as_deref() == Some("t");
                Some((name, generated))
            })
            .collect();
        router.set_columns(t, (!columns.is_empty()).then_some(columns));
    }
    router.catalog_read();
    Ok(())
}

/// Runs [`refresh`] in the background, logging a failure.
pub fn spawn_refresh(router: Arc<ShardRouter>, pool: Arc<Pool>) {
    tokio::spawn(async move {
        if let Err(e) = refresh(&router, &pool).await {
            tracing::warn!(database = %router.database, error = %e, "could not read the sharded tables' columns");
        }
    });
}
