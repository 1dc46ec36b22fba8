//! Turns decoded changes of one old shard into SQL for the new shards: each row goes to the
//! shard the new shard count's hash names, as PostgreSQL's `PARTITION BY HASH` would put it.
//! Pure (no I/O): the worker sends what this produces.
//!
//! Where a change's old row lives: rows of old shard `i` can only be on new shards `j` with
//! `j % old == i` when the new count is a multiple of the old (hash `% new % old` is hash
//! `% old`); otherwise on any new shard. An update or delete whose old shard cannot be told
//! from the change (the sharding key is not part of the replica identity) is applied on all
//! of those candidates.

use super::pgoutput::{Relation, Value};
use super::plan::Table;
use crate::backend::params::{quote_ident, quote_literal};
use crate::router::{parse_key, shard_for, KeyType, KeyValue};

/// What the applier knows about one replicated relation.
#[derive(Debug, Clone)]
pub struct Rel {
    qualified: String,
    /// Quoted column names in the order tuples carry them.
    columns: Vec<String>,
    /// Indexes of the replica identity's columns.
    ident: Vec<usize>,
    /// Sharded: (index of the key column in `columns`, key type).
    key: Option<(usize, KeyType)>,
    key_in_ident: bool,
}

impl Rel {
    /// Describes `r` for applying, with the plan's table of the same name.
    pub fn new(r: &Relation, tables: &[Table]) -> Result<Rel, String> {
        let table = tables
            .iter()
            .find(|t| t.schema == r.schema && t.name == r.name)
            .ok_or_else(|| {
                format!(
                    "table {}.{} is not part of the reshard (created during it?)",
                    r.schema, r.name
                )
            })?;
        let key = match table.key {
            None => None,
            Some((i, kt)) => {
                let name = &table.columns[i].name;
                let at = r
                    .columns
                    .iter()
                    .position(|(c, _)| c == name)
                    .ok_or_else(|| format!("{}: key column {name} not replicated", r.name))?;
                Some((at, kt))
            }
        };
        let mut ident: Vec<usize> = (0..r.columns.len()).filter(|&i| r.columns[i].1).collect();
        let key_in_ident = key.is_some_and(|(k, _)| ident.contains(&k));
        // REPLICA IDENTITY FULL (every column sent, as RESHARD sets it where the key is not
        // in the identity): rows are found by the primary key, which types without `=` (json)
        // cannot spoil, and which is unique on a new shard as on its old one.
        if ident.len() == r.columns.len() && !table.pk.is_empty() {
            let pk: Vec<usize> = (0..r.columns.len())
                .filter(|&i| table.pk.contains(&r.columns[i].0))
                .collect();
            if pk.len() == table.pk.len() {
                ident = pk;
            }
        }
        if ident.is_empty() {
            return Err(format!(
                "table {}.{} has no replica identity",
                r.schema, r.name
            ));
        }
        Ok(Rel {
            qualified: format!("{}.{}", quote_ident(&r.schema), quote_ident(&r.name)),
            columns: r.columns.iter().map(|(c, _)| quote_ident(c)).collect(),
            key_in_ident,
            ident,
            key,
        })
    }
}

/// Where changes of one old shard go.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub old_shard: usize,
    pub old_shards: usize,
    pub new_shards: usize,
}

impl Layout {
    /// The new shards rows of this old shard can be on.
    pub fn candidates(&self) -> Vec<usize> {
        if self.new_shards.is_multiple_of(self.old_shards) {
            (0..self.new_shards)
                .filter(|j| j % self.old_shards == self.old_shard)
                .collect()
        } else {
            (0..self.new_shards).collect()
        }
    }
}

/// Statements per new shard, appended to by the change functions.
pub type Out = Vec<String>;

fn shard_of(kt: KeyType, v: &Value, shards: usize) -> Result<usize, String> {
    let r = match v {
        Value::Null => shard_for(kt, &KeyValue::Null, shards as u64),
        Value::Text(s) => parse_key(kt, s).and_then(|k| shard_for(kt, &k, shards as u64)),
        Value::Unchanged => return Err("sharding key not sent (unchanged TOAST value)".into()),
    };
    r.map(|s| s as usize)
        .map_err(|e| format!("sharding key: {e}"))
}

/// A value as a SQL literal (NULL for a null; never called for an unchanged TOAST value).
fn push_value(sql: &mut String, v: &Value) {
    match v {
        Value::Text(s) => sql.push_str(&quote_literal(s)),
        _ => sql.push_str("NULL"),
    }
}

fn insert_sql(rel: &Rel, row: &[Value]) -> Result<String, String> {
    if row.contains(&Value::Unchanged) {
        return Err(format!(
            "{}: a row moving between shards has an unchanged TOAST value",
            rel.qualified
        ));
    }
    let mut sql = format!(
        "INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE VALUES (",
        rel.qualified,
        rel.columns.join(", ")
    );
    for (i, v) in row.iter().enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        push_value(&mut sql, v);
    }
    sql.push(')');
    Ok(sql)
}

fn where_ident(rel: &Rel, row: &[Value]) -> String {
    let mut sql = String::from(" WHERE ");
    for (n, &i) in rel.ident.iter().enumerate() {
        if n > 0 {
            sql.push_str(" AND ");
        }
        sql.push_str(&rel.columns[i]);
        match row.get(i) {
            Some(Value::Text(s)) => {
                sql.push_str(" = ");
                sql.push_str(&quote_literal(s));
            }
            _ => sql.push_str(" IS NULL"),
        }
    }
    sql
}

/// `UPDATE … SET` the values sent (not unchanged TOAST values, nor the identity when it did
/// not change: `GENERATED ALWAYS` identity columns may not be set) `WHERE` the identity.
fn update_sql(rel: &Rel, ident_row: &[Value], new: &[Value], ident_changed: bool) -> String {
    let mut sql = format!("UPDATE {} SET ", rel.qualified);
    let mut first = true;
    for (i, v) in new.iter().enumerate() {
        if *v == Value::Unchanged || (!ident_changed && rel.ident.contains(&i)) {
            continue;
        }
        if !first {
            sql.push_str(", ");
        }
        first = false;
        sql.push_str(&rel.columns[i]);
        sql.push_str(" = ");
        push_value(&mut sql, v);
    }
    if first {
        // Nothing but the identity: a statement that changes nothing, still valid.
        let c = &rel.columns[rel.ident[0]];
        sql.push_str(&format!("{c} = {c}"));
    }
    sql.push_str(&where_ident(rel, ident_row));
    sql
}

fn delete_sql(rel: &Rel, old: &[Value]) -> String {
    format!("DELETE FROM {}{}", rel.qualified, where_ident(rel, old))
}

/// An insert or replace of `row` keyed by the identity (the row may or may not be there).
fn upsert_sql(rel: &Rel, row: &[Value]) -> Result<String, String> {
    let mut sql = insert_sql(rel, row)?;
    let ident: Vec<&str> = rel.ident.iter().map(|&i| rel.columns[i].as_str()).collect();
    let rest: Vec<String> = (0..rel.columns.len())
        .filter(|i| !rel.ident.contains(i))
        .map(|i| format!("{c} = EXCLUDED.{c}", c = rel.columns[i]))
        .collect();
    sql.push_str(&format!(" ON CONFLICT ({}) DO ", ident.join(", ")));
    if rest.is_empty() {
        sql.push_str("NOTHING");
    } else {
        sql.push_str(&format!("UPDATE SET {}", rest.join(", ")));
    }
    Ok(sql)
}

/// The new shard of an unsharded table's change: 0, from old shard 0 only.
fn unsharded(layout: &Layout) -> Option<usize> {
    (layout.old_shard == 0).then_some(0)
}

pub fn insert(rel: &Rel, l: &Layout, new: &[Value], out: &mut [Out]) -> Result<(), String> {
    check_len(rel, new)?;
    let target = match rel.key {
        Some((k, kt)) => shard_of(kt, value(new, k)?, l.new_shards)?,
        None => match unsharded(l) {
            Some(t) => t,
            None => return Ok(()),
        },
    };
    out[target].push(insert_sql(rel, new)?);
    Ok(())
}

/// A tuple must have its relation's columns (indexes below rely on it).
fn check_len(rel: &Rel, row: &[Value]) -> Result<(), String> {
    if row.len() != rel.columns.len() {
        return Err(format!(
            "{}: replicated row has {} values for {} columns",
            rel.qualified,
            row.len(),
            rel.columns.len()
        ));
    }
    Ok(())
}

fn value(row: &[Value], i: usize) -> Result<&Value, String> {
    row.get(i)
        .ok_or_else(|| "replicated row is shorter than its relation".to_string())
}

pub fn update(
    rel: &Rel,
    l: &Layout,
    old: Option<&[Value]>,
    new: &[Value],
    out: &mut [Out],
) -> Result<(), String> {
    check_len(rel, new)?;
    if let Some(o) = old {
        check_len(rel, o)?;
    }
    let ident_row = old.unwrap_or(new);
    // Whether the identity itself changed (a FULL identity sends the old row every time).
    let ident_changed = old.is_some_and(|o| {
        rel.ident
            .iter()
            .any(|&i| new[i] != Value::Unchanged && o[i] != new[i])
    });
    let Some((k, kt)) = rel.key else {
        if let Some(t) = unsharded(l) {
            out[t].push(update_sql(rel, ident_row, new, ident_changed));
        }
        return Ok(());
    };
    let new_key = match value(new, k)? {
        Value::Unchanged => value(ident_row, k)?,
        v => v,
    };
    let to = shard_of(kt, new_key, l.new_shards)?;
    if rel.key_in_ident {
        let from = match old {
            Some(o) => shard_of(kt, value(o, k)?, l.new_shards)?,
            None => to,
        };
        if from == to {
            out[to].push(update_sql(rel, ident_row, new, ident_changed));
        } else {
            out[from].push(delete_sql(rel, ident_row));
            out[to].push(insert_sql(rel, new)?);
        }
        return Ok(());
    }
    // The key is not part of the identity: its old value (and so where the row was) is not
    // sent. Remove the row wherever else it may be and put the new one in place.
    for j in l.candidates() {
        if j != to {
            out[j].push(delete_sql(rel, ident_row));
        }
    }
    if new.contains(&Value::Unchanged) {
        // The row may be arriving from another shard: an UPDATE would find nothing there.
        return Err(format!(
            "{}: an update whose old row cannot be located carries an unchanged TOAST value \
             (make the sharding key part of the replica identity, or REPLICA IDENTITY FULL)",
            rel.qualified
        ));
    } else {
        if old.is_some() {
            out[to].push(delete_sql(rel, ident_row));
        }
        out[to].push(upsert_sql(rel, new)?);
    }
    Ok(())
}

pub fn delete(rel: &Rel, l: &Layout, old: &[Value], out: &mut [Out]) -> Result<(), String> {
    check_len(rel, old)?;
    match rel.key {
        Some((k, kt)) if rel.key_in_ident => {
            let from = shard_of(kt, value(old, k)?, l.new_shards)?;
            out[from].push(delete_sql(rel, old));
        }
        Some(_) => {
            for j in l.candidates() {
                out[j].push(delete_sql(rel, old));
            }
        }
        None => {
            if let Some(t) = unsharded(l) {
                out[t].push(delete_sql(rel, old));
            }
        }
    }
    Ok(())
}

/// TRUNCATE of sharded tables empties the new shards this old shard's rows went to (one
/// statement per new shard naming every table, as the source ran it; no CASCADE: the
/// tables a cascade reached come in the same message). When the new count is not a
/// multiple of the old, those rows are spread over shards that hold other old shards'
/// rows too, and the reshard fails rather than empty them.
pub fn truncate(rels: &[&Rel], l: &Layout, out: &mut [Out]) -> Result<(), String> {
    let mut per: Vec<Vec<&str>> = vec![Vec::new(); out.len()];
    for rel in rels {
        let targets = match rel.key {
            Some(_) if !l.new_shards.is_multiple_of(l.old_shards) => {
                return Err(format!(
                    "TRUNCATE {} during a reshard to {} shards from {} (not a multiple): its \
                     rows share new shards with other old shards' rows",
                    rel.qualified, l.new_shards, l.old_shards
                ))
            }
            Some(_) => l.candidates(),
            None => unsharded(l).into_iter().collect(),
        };
        for j in targets {
            per[j].push(&rel.qualified);
        }
    }
    for (j, names) in per.into_iter().enumerate() {
        if !names.is_empty() {
            out[j].push(format!("TRUNCATE {}", names.join(", ")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reshard::plan::Column;

    fn tables() -> Vec<Table> {
        vec![
            Table {
                schema: "public".into(),
                name: "accounts".into(),
                columns: vec![
                    Column { name: "aid".into() },
                    Column {
                        name: "balance".into(),
                    },
                ],
                key: Some((0, KeyType::Bigint)),
                estimate: 0,
                key_in_identity: true,
                pk: vec!["aid".into()],
                identity_sql: String::new(),
            },
            Table {
                schema: "public".into(),
                name: "history".into(),
                columns: vec![Column { name: "id".into() }, Column { name: "aid".into() }],
                key: Some((1, KeyType::Bigint)),
                estimate: 0,
                key_in_identity: false,
                pk: vec!["id".into()],
                identity_sql: String::new(),
            },
        ]
    }

    fn rel(name: &str, cols: &[(&str, bool)]) -> Rel {
        let r = Relation {
            oid: 1,
            schema: "public".into(),
            name: name.into(),
            columns: cols.iter().map(|(c, k)| (c.to_string(), *k)).collect(),
        };
        Rel::new(&r, &tables()).unwrap()
    }

    fn t(s: &str) -> Value {
        Value::Text(s.into())
    }

    fn shard(key: i64, n: u64) -> usize {
        shard_for(KeyType::Bigint, &KeyValue::Int(key), n).unwrap() as usize
    }

    #[test]
    fn rows_go_where_the_new_count_hashes_them() {
        let accounts = rel("accounts", &[("aid", true), ("balance", false)]);
        let l = Layout {
            old_shard: 1,
            old_shards: 2,
            new_shards: 4,
        };
        for key in 0..50i64 {
            let mut out = vec![Out::new(); 4];
            insert(&accounts, &l, &[t(&key.to_string()), t("it's")], &mut out).unwrap();
            let to = shard(key, 4);
            assert_eq!(out[to].len(), 1);
            assert!(out[to][0].contains("E'it''s'"), "{}", out[to][0]);
            assert_eq!(out.iter().map(Vec::len).sum::<usize>(), 1);
        }
    }

    #[test]
    fn key_change_moves_the_row() {
        let accounts = rel("accounts", &[("aid", true), ("balance", false)]);
        let l = Layout {
            old_shard: 0,
            old_shards: 2,
            new_shards: 4,
        };
        let (a, b) = (0..100)
            .flat_map(|a| (0..100).map(move |b| (a, b)))
            .find(|&(a, b)| shard(a, 4) != shard(b, 4))
            .unwrap();
        let mut out = vec![Out::new(); 4];
        let old = [t(&a.to_string()), Value::Null];
        update(
            &accounts,
            &l,
            Some(&old),
            &[t(&b.to_string()), t("5")],
            &mut out,
        )
        .unwrap();
        assert!(out[shard(a, 4)][0].starts_with("DELETE"));
        assert!(out[shard(b, 4)][0].starts_with("INSERT"));
    }

    #[test]
    fn key_outside_identity_is_removed_from_every_candidate() {
        let history = rel("history", &[("id", true), ("aid", false)]);
        let l = Layout {
            old_shard: 1,
            old_shards: 2,
            new_shards: 4,
        };
        assert_eq!(l.candidates(), vec![1, 3]);
        let mut out = vec![Out::new(); 4];
        update(&history, &l, None, &[t("9"), t("3")], &mut out).unwrap();
        let to = shard(3, 4);
        assert!(out[to].iter().any(|s| s.contains("ON CONFLICT (\"id\")")));
        for j in l.candidates() {
            if j != to {
                assert!(out[j][0].starts_with("DELETE"));
            }
        }
        let odd = Layout {
            old_shard: 0,
            old_shards: 2,
            new_shards: 3,
        };
        assert_eq!(odd.candidates(), vec![0, 1, 2]);
    }

    #[test]
    fn null_and_unchanged_values() {
        let accounts = rel("accounts", &[("aid", true), ("balance", false)]);
        let l = Layout {
            old_shard: 0,
            old_shards: 1,
            new_shards: 2,
        };
        let mut out = vec![Out::new(); 2];
        update(&accounts, &l, None, &[t("1"), Value::Unchanged], &mut out).unwrap();
        let sql = out.concat().join(";");
        assert!(!sql.contains("balance"), "{sql}");
        // The identity did not change: it is not SET (GENERATED ALWAYS would refuse it).
        assert!(!sql.contains("SET \"aid\" = E"), "{sql}");
        let mut out = vec![Out::new(); 2];
        delete(&accounts, &l, &[Value::Null, Value::Null], &mut out).unwrap();
        assert!(out.concat()[0].ends_with("\"aid\" IS NULL"));
    }
}
