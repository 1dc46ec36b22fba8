//! What a reshard moves, read from the source's shard 0 catalog: every ordinary table of
//! the user's schemas, its columns, whether it is sharded (and by which column and type),
//! and whether PostgreSQL can follow its updates and deletes (a replica identity).

use super::conn::{query, Result};
use crate::backend::params::{quote_ident, quote_literal};
use crate::backend::ServerConn;
use crate::config::ShardedTable;
use crate::router::KeyType;

/// Schemas a reshard never touches: PostgreSQL's own and Weir's (two-phase decisions).
pub const SKIP_SCHEMAS: &str =
    "n.nspname NOT IN ('pg_catalog', 'information_schema', 'weir') AND n.nspname !~ '^pg_'";

#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
}

#[derive(Debug, Clone)]
pub struct Table {
    pub schema: String,
    pub name: String,
    /// Columns COPY moves (generated ones excluded), in order.
    pub columns: Vec<Column>,
    /// Sharded: (index of the key in `columns`, key type). Unsharded tables live on shard 0.
    pub key: Option<(usize, KeyType)>,
    /// Estimated rows (pg_class.reltuples), for the ETA.
    pub estimate: u64,
    /// The sharding key is part of the replica identity (so an update or delete says
    /// where the row was).
    pub key_in_identity: bool,
    /// Primary key columns (empty: none).
    pub pk: Vec<String>,
    /// How to put the replica identity back after RESHARD made it FULL
    /// (`REPLICA IDENTITY DEFAULT` or `… USING INDEX x`).
    pub identity_sql: String,
}

impl Table {
    /// `schema.table`, quoted.
    pub fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }

    /// Whether old shard `shard` holds rows of this table (unsharded tables live on shard 0).
    pub fn on_old_shard(&self, shard: usize) -> bool {
        shard == 0 || self.key.is_some()
    }

    /// The column list `(a, b, …)`, quoted.
    pub fn column_list(&self) -> String {
        let names: Vec<String> = self.columns.iter().map(|c| quote_ident(&c.name)).collect();
        format!("({})", names.join(", "))
    }
}

/// Reads the tables to move from `conn` (the source's shard 0 primary). Refuses tables
/// whose updates logical replication could not follow, and sharded tables configured but
/// missing.
pub async fn tables(conn: &mut ServerConn, sharded: &[ShardedTable]) -> Result<Vec<Table>> {
    let rows = query(
        conn,
        &format!(
            "SELECT c.oid::int8, n.nspname, c.relname, c.relreplident::text, \
             EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisprimary), \
             greatest(c.reltuples, 0)::int8 \
             FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind = 'r' AND c.relpersistence = 'p' AND {SKIP_SCHEMAS} ORDER BY 2, 3"
        ),
    )
    .await?;
    let mut out = Vec::new();
    let mut unfollowable = Vec::new();
    for r in rows {
        let get = |i: usize| r.get(i).cloned().flatten().unwrap_or_default();
        let (oid, schema, name, ident, has_pk) = (get(0), get(1), get(2), get(3), get(4));
        if ident == "n" || (ident == "d" && has_pk != "t") {
            unfollowable.push(format!("{schema}.{name}"));
        }
        let cols = query(
            conn,
            &format!(
                "SELECT attname FROM pg_catalog.pg_attribute WHERE attrelid = {} \
                 AND attnum > 0 AND NOT attisdropped AND attgenerated = '' ORDER BY attnum",
                oid.parse::<i64>().map_err(|_| "bad oid".to_string())?
            ),
        )
        .await?;
        let columns: Vec<Column> = cols
            .into_iter()
            .filter_map(|c| c.into_iter().next().flatten())
            .map(|name| Column { name })
            .collect();
        // The replica identity's columns: every column (FULL), else the identity index's.
        let ident_cols: Vec<String> = if ident == "f" {
            columns.iter().map(|c| c.name.clone()).collect()
        } else {
            query(
                conn,
                &format!(
                    "SELECT a.attname FROM pg_catalog.pg_index i JOIN pg_catalog.pg_attribute a \
                     ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) \
                     WHERE i.indrelid = {} AND ((i.indisprimary AND '{ident}' = 'd') \
                     OR (i.indisreplident AND '{ident}' = 'i'))",
                    oid.parse::<i64>().map_err(|_| "bad oid".to_string())?
                ),
            )
            .await?
            .into_iter()
            .filter_map(|r| r.into_iter().next().flatten())
            .collect()
        };
        let spec = sharded
            .iter()
            .find(|t| matches_table(&t.table, &schema, &name));
        let key = match spec {
            None => None,
            Some(t) => {
                let kt: KeyType = t
                    .key_type
                    .parse()
                    .map_err(|_| format!("table {}: unknown key type {}", t.table, t.key_type))?;
                let i = columns
                    .iter()
                    .position(|c| c.name == t.column)
                    .ok_or_else(|| format!("table {schema}.{name} has no column {}", t.column))?;
                Some((i, kt))
            }
        };
        let key_in_identity = spec.is_some_and(|t| ident_cols.contains(&t.column));
        let oid_num = oid.parse::<i64>().map_err(|_| "bad oid".to_string())?;
        let pk: Vec<String> = query(
            conn,
            &format!(
                "SELECT a.attname FROM pg_catalog.pg_index i JOIN pg_catalog.pg_attribute a \
                 ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) \
                 WHERE i.indrelid = {oid_num} AND i.indisprimary"
            ),
        )
        .await?
        .into_iter()
        .filter_map(|r| r.into_iter().next().flatten())
        .collect();
        let identity_sql = match ident.as_str() {
            "i" => query(
                conn,
                &format!(
                    "SELECT c.relname FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c \
                     ON c.oid = i.indexrelid WHERE i.indrelid = {oid_num} AND i.indisreplident"
                ),
            )
            .await?
            .into_iter()
            .next()
            .and_then(|r| r.into_iter().next().flatten())
            .map(|idx| format!("REPLICA IDENTITY USING INDEX {}", quote_ident(&idx)))
            .unwrap_or_else(|| "REPLICA IDENTITY DEFAULT".into()),
            "f" => "REPLICA IDENTITY FULL".into(),
            _ => "REPLICA IDENTITY DEFAULT".into(),
        };
        out.push(Table {
            schema,
            name,
            columns,
            key,
            estimate: get(5).parse().unwrap_or(0),
            key_in_identity,
            pk,
            identity_sql,
        });
    }
    if !unfollowable.is_empty() {
        return Err(format!(
            "table {} has no primary key or replica identity: logical replication could not \
             follow its updates and deletes (add a primary key, or ALTER TABLE … REPLICA \
             IDENTITY FULL)",
            unfollowable.join(", ")
        ));
    }
    for t in sharded {
        if !out
            .iter()
            .any(|o| o.key.is_some() && matches_table(&t.table, &o.schema, &o.name))
        {
            return Err(format!(
                "sharded table {} does not exist on shard 0",
                t.table
            ));
        }
    }
    Ok(out)
}

/// Whether a configured table name (`t` or `schema.t`) names `schema.name`.
fn matches_table(configured: &str, schema: &str, name: &str) -> bool {
    match configured.split_once('.') {
        Some((s, t)) => s == schema && t == name,
        None => configured == name && schema == "public",
    }
}

/// An error naming the first user table of a target shard, if it has one.
pub async fn check_empty(conn: &mut ServerConn, which: &str) -> Result<()> {
    let rows = query(
        conn,
        &format!(
            "SELECT n.nspname || '.' || c.relname FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p', 'S', 'v', 'm') AND {SKIP_SCHEMAS} LIMIT 1"
        ),
    )
    .await?;
    if let Some(name) = rows
        .into_iter()
        .next()
        .and_then(|r| r.into_iter().next().flatten())
    {
        return Err(format!(
            "{which} is not empty (it has {name}): RESHARD copies into empty databases"
        ));
    }
    Ok(())
}

/// Every sequence's last value on one server: (qualified name, value).
pub async fn sequences(conn: &mut ServerConn) -> Result<Vec<(String, i64)>> {
    let rows = query(
        conn,
        "SELECT format('%I.%I', schemaname, sequencename), last_value FROM pg_catalog.pg_sequences \
         WHERE last_value IS NOT NULL AND schemaname NOT IN ('weir')",
    )
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            let name = r.first().cloned().flatten()?;
            let v = r.get(1).cloned().flatten()?.parse().ok()?;
            Some((name, v))
        })
        .collect())
}

/// The statements that move every sequence of `seen` to at least its highest value.
pub fn setval_sql(seen: &std::collections::BTreeMap<String, i64>) -> String {
    seen.iter()
        .map(|(name, v)| {
            format!(
                "SELECT pg_catalog.setval({}, greatest({v}, (SELECT last_value FROM {name})), true);",
                quote_literal(name)
            )
        })
        .collect()
}
