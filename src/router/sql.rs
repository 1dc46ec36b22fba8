//! What a statement means for routing, read with PostgreSQL's own grammar
//! (libpg_query through the `pg_query` crate): the sharded table it touches,
//! the sharding-key values it names (literals or `$n` parameters), whether it
//! only reads, and the shape of a keyless read that would fan out.

use super::key::KeyType;
use pg_query::protobuf::{a_const, node::Node as N, AExprKind, BoolExprType, Node, SelectStmt};

/// A sharded table as configured (names lower-case).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSpec {
    pub schema: Option<String>,
    pub table: String,
    pub column: String,
    pub key_type: KeyType,
    /// 0-based position of the key column among the table's columns, from the catalog
    /// (for `INSERT … VALUES` without a column list); `None` until known.
    pub position: Option<usize>,
}

impl TableSpec {
    pub fn new(table: &str, column: &str, key_type: KeyType) -> TableSpec {
        let table = table.to_ascii_lowercase();
        let (schema, table) = match table.split_once('.') {
            Some((s, t)) => (Some(s.to_string()), t.to_string()),
            None => (None, table),
        };
        TableSpec {
            schema,
            table,
            column: column.to_ascii_lowercase(),
            key_type,
            position: None,
        }
    }

    pub fn matches(&self, schema: &str, relname: &str) -> bool {
        relname == self.table
            && (schema.is_empty() || self.schema.as_deref().is_none_or(|s| s == schema))
    }
}

/// A sharding-key value as the statement gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyExpr {
    Literal(String),
    /// `$n`, 1-based.
    Param(usize),
    Null,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kind {
    #[default]
    Other,
    Select,
    Insert,
    Update,
    Delete,
    Begin {
        read_only: bool,
    },
    /// COMMIT / ROLLBACK / END / ABORT.
    End,
}

/// An aggregate in the target list of a keyless read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agg {
    Count,
    Sum,
    Min,
    Max,
}

/// How the results of a keyless read can be combined across shards.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Merge {
    /// Rows are independent: concatenate.
    #[default]
    Concat,
    /// One row of aggregates (no GROUP BY): combine column by column.
    Aggregates(Vec<Agg>),
    /// ORDER BY on output columns, then LIMIT: merge sorted streams.
    OrderLimit {
        order: Vec<SortKey>,
        limit: Option<u64>,
    },
    /// Weir cannot merge this correctly; the reason is for the error.
    Refuse(&'static str),
}

/// An output column named by ORDER BY.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SortCol {
    /// 0-based position in the output.
    Pos(usize),
    /// A column name, found in the RowDescription (the select list has `*`).
    Name(String),
}

/// One ORDER BY item of a keyless read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SortKey {
    pub col: SortCol,
    pub desc: bool,
    pub nulls_first: bool,
}

impl SortKey {
    pub fn asc(col: usize) -> SortKey {
        SortKey {
            col: SortCol::Pos(col),
            desc: false,
            nulls_first: false,
        }
    }

    pub fn desc(col: usize) -> SortKey {
        SortKey {
            col: SortCol::Pos(col),
            desc: true,
            nulls_first: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Analysis {
    pub kind: Kind,
    /// SELECT without FOR UPDATE/SHARE and without data-modifying CTEs.
    pub read_only: bool,
    /// Index of the sharded table the statement touches.
    pub table: Option<usize>,
    /// Name of that table (for messages).
    pub table_name: String,
    /// Key values; several for multi-row INSERT or `IN (…)`.
    pub keys: Vec<KeyExpr>,
    /// How a keyless read merges.
    pub merge: Merge,
    /// Several statements in one query string.
    pub multi: bool,
    /// The statement names at least one table (sharded or not).
    pub any_table: bool,
    /// A sharded table named somewhere other than where Weir looks for keys
    /// (subquery, CTE, UNION branch): its name, when `table` is `None`.
    pub sharded_elsewhere: Option<String>,
    /// Of a transaction statement: what it is (see [`TxControl`]).
    pub tx: TxControl,
    /// An INSERT into a sharded table without a column list (its key position comes
    /// from the catalog).
    pub no_column_list: bool,
}

/// What a transaction-control statement does, from the parse tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TxControl {
    #[default]
    None,
    Commit,
    Rollback,
    /// COMMIT AND CHAIN / ROLLBACK AND CHAIN.
    Chain,
    /// SAVEPOINT, RELEASE, ROLLBACK TO.
    Savepoint,
    /// PREPARE TRANSACTION, COMMIT PREPARED, ROLLBACK PREPARED.
    TwoPhase,
}

/// Analyses one query string. `Err` carries PostgreSQL's syntax error text;
/// the caller lets the server report it.
pub fn analyze(sql: &str, tables: &[TableSpec]) -> Result<Analysis, String> {
    let parsed = pg_query::parse(sql).map_err(|e| e.to_string())?;
    let stmts = &parsed.protobuf.stmts;
    let mut a = Analysis {
        multi: stmts.len() > 1,
        any_table: !parsed.tables().is_empty(),
        ..Analysis::default()
    };
    let Some(node) = stmts
        .first()
        .and_then(|s| s.stmt.as_ref())
        .and_then(|n| n.node.as_ref())
    else {
        return Ok(a);
    };
    match node {
        N::SelectStmt(s) => {
            a.kind = Kind::Select;
            a.read_only =
                s.locking_clause.is_empty() && s.into_clause.is_none() && !has_modifying_cte(s);
            select(s, tables, &mut a);
        }
        N::InsertStmt(i) => {
            a.kind = Kind::Insert;
            a.read_only = false;
            if let Some(rel) = &i.relation {
                if let Some(t) = find_table(tables, &rel.schemaname, &rel.relname) {
                    a.table = Some(t);
                    a.table_name = rel.relname.clone();
                    a.no_column_list = i.cols.is_empty();
                    insert_keys(
                        i.cols.as_slice(),
                        i.select_stmt.as_deref(),
                        &tables[t],
                        &mut a,
                    );
                }
            }
        }
        N::UpdateStmt(u) => {
            a.kind = Kind::Update;
            if let Some(rel) = &u.relation {
                dml(rel, u.where_clause.as_deref(), tables, &mut a);
            }
        }
        N::DeleteStmt(d) => {
            a.kind = Kind::Delete;
            if let Some(rel) = &d.relation {
                dml(rel, d.where_clause.as_deref(), tables, &mut a);
            }
        }
        N::TransactionStmt(t) => {
            // TRANS_STMT_BEGIN = 1, START = 2, COMMIT = 3, ROLLBACK = 4 (pg_query's enum).
            a.kind = match t.kind {
                1 | 2 => Kind::Begin {
                    read_only: t.options.iter().any(is_read_only_option),
                },
                3 | 4 => Kind::End,
                _ => Kind::Other,
            };
            // SAVEPOINT = 5, RELEASE = 6, ROLLBACK_TO = 7, PREPARE = 8, COMMIT_PREPARED = 9,
            // ROLLBACK_PREPARED = 10.
            a.tx = match t.kind {
                3 | 4 if t.chain => TxControl::Chain,
                3 => TxControl::Commit,
                4 => TxControl::Rollback,
                5..=7 => TxControl::Savepoint,
                8..=10 => TxControl::TwoPhase,
                _ => TxControl::None,
            };
        }
        _ => {}
    }
    if a.table.is_none() {
        a.sharded_elsewhere = parsed.tables().into_iter().find(|name| {
            let (schema, rel) = name.rsplit_once('.').unwrap_or(("", name));
            find_table(tables, schema, rel).is_some()
        });
    }
    Ok(a)
}

fn is_read_only_option(n: &Node) -> bool {
    let Some(N::DefElem(d)) = &n.node else {
        return false;
    };
    if d.defname != "transaction_read_only" {
        return false;
    }
    match d.arg.as_deref().and_then(|a| a.node.as_ref()) {
        Some(N::AConst(c)) => matches!(&c.val, Some(a_const::Val::Ival(i)) if i.ival == 1),
        _ => false,
    }
}

fn has_modifying_cte(s: &SelectStmt) -> bool {
    s.with_clause.as_ref().is_some_and(|w| {
        w.ctes.iter().any(|c| match &c.node {
            Some(N::CommonTableExpr(cte)) => matches!(
                cte.ctequery.as_deref().and_then(|q| q.node.as_ref()),
                Some(N::InsertStmt(_)) | Some(N::UpdateStmt(_)) | Some(N::DeleteStmt(_))
            ),
            _ => false,
        })
    })
}

fn find_table(tables: &[TableSpec], schema: &str, relname: &str) -> Option<usize> {
    let schema = schema.to_ascii_lowercase();
    let relname = relname.to_ascii_lowercase();
    tables.iter().position(|t| t.matches(&schema, &relname))
}

fn dml(
    rel: &pg_query::protobuf::RangeVar,
    where_clause: Option<&Node>,
    tables: &[TableSpec],
    a: &mut Analysis,
) {
    if let Some(t) = find_table(tables, &rel.schemaname, &rel.relname) {
        a.table = Some(t);
        a.table_name = rel.relname.clone();
        let alias = rel.alias.as_ref().map(|al| al.aliasname.clone());
        let names = qualifiers(&rel.relname, alias.as_deref());
        if let Some(w) = where_clause {
            where_keys(w, &tables[t].column, &names, &mut a.keys);
        }
    }
}

fn qualifiers(relname: &str, alias: Option<&str>) -> Vec<String> {
    let mut v = vec![relname.to_ascii_lowercase()];
    if let Some(a) = alias {
        v.push(a.to_ascii_lowercase());
    }
    v
}

fn select(s: &SelectStmt, tables: &[TableSpec], a: &mut Analysis) {
    // Find a sharded table among FROM items (plain relations and joins).
    let mut found = None;
    for item in &s.from_clause {
        visit_ranges(item, &mut |rel| {
            if found.is_none() {
                if let Some(t) = find_table(tables, &rel.schemaname, &rel.relname) {
                    let alias = rel.alias.as_ref().map(|al| al.aliasname.clone());
                    found = Some((
                        t,
                        rel.relname.clone(),
                        qualifiers(&rel.relname, alias.as_deref()),
                    ));
                }
            }
        });
    }
    let Some((t, name, names)) = found else {
        return;
    };
    a.table = Some(t);
    a.table_name = name;
    if let Some(w) = &s.where_clause {
        where_keys(w, &tables[t].column, &names, &mut a.keys);
    }
    // How per-shard results combine matters only when the read may span shards.
    if a.keys.len() != 1 {
        a.merge = merge_shape(s);
    }
}

fn visit_ranges(n: &Node, f: &mut impl FnMut(&pg_query::protobuf::RangeVar)) {
    match &n.node {
        Some(N::RangeVar(r)) => f(r),
        Some(N::JoinExpr(j)) => {
            if let Some(l) = &j.larg {
                visit_ranges(l, f);
            }
            if let Some(r) = &j.rarg {
                visit_ranges(r, f);
            }
        }
        _ => {}
    }
}

/// Keys pinned by `col = v`, `v = col` or `col IN (…)` under top-level ANDs.
fn where_keys(n: &Node, column: &str, names: &[String], out: &mut Vec<KeyExpr>) {
    match &n.node {
        Some(N::BoolExpr(b)) if b.boolop == BoolExprType::AndExpr as i32 => {
            for arg in &b.args {
                if out.is_empty() {
                    where_keys(arg, column, names, out);
                }
            }
        }
        Some(N::AExpr(e)) => {
            let is_eq = e.kind == AExprKind::AexprOp as i32 && op_name(&e.name) == Some("=");
            let is_in = e.kind == AExprKind::AexprIn as i32 && op_name(&e.name) == Some("=");
            let (l, r) = (e.lexpr.as_deref(), e.rexpr.as_deref());
            if is_eq {
                if let (Some(l), Some(r)) = (l, r) {
                    if is_key_column(l, column, names) {
                        if let Some(k) = key_expr(r) {
                            out.push(k);
                        }
                    } else if is_key_column(r, column, names) {
                        if let Some(k) = key_expr(l) {
                            out.push(k);
                        }
                    }
                }
            } else if is_in {
                if let (
                    Some(l),
                    Some(Node {
                        node: Some(N::List(list)),
                    }),
                ) = (l, r)
                {
                    if is_key_column(l, column, names) {
                        let keys: Option<Vec<KeyExpr>> = list.items.iter().map(key_expr).collect();
                        if let Some(keys) = keys {
                            out.extend(keys);
                        }
                    }
                }
            }
        }
        _ => {}
    }
}

fn op_name(name: &[Node]) -> Option<&str> {
    match name.last().and_then(|n| n.node.as_ref()) {
        Some(N::String(s)) => Some(s.sval.as_str()),
        _ => None,
    }
}

fn is_key_column(n: &Node, column: &str, names: &[String]) -> bool {
    let Some(N::ColumnRef(c)) = &n.node else {
        return false;
    };
    let parts: Vec<&str> = c
        .fields
        .iter()
        .filter_map(|f| match &f.node {
            Some(N::String(s)) => Some(s.sval.as_str()),
            _ => None,
        })
        .collect();
    match parts.as_slice() {
        [col] => col.eq_ignore_ascii_case(column),
        [.., qual, col] => {
            col.eq_ignore_ascii_case(column) && names.iter().any(|n| n.eq_ignore_ascii_case(qual))
        }
        [] => false,
    }
}

fn key_expr(n: &Node) -> Option<KeyExpr> {
    match &n.node {
        Some(N::AConst(c)) => {
            if c.isnull {
                return Some(KeyExpr::Null);
            }
            Some(KeyExpr::Literal(match c.val.as_ref()? {
                a_const::Val::Ival(i) => i.ival.to_string(),
                a_const::Val::Fval(f) => f.fval.clone(),
                a_const::Val::Sval(s) => s.sval.clone(),
                a_const::Val::Boolval(b) => b.boolval.to_string(),
                a_const::Val::Bsval(b) => b.bsval.clone(),
            }))
        }
        Some(N::ParamRef(p)) if p.number > 0 => Some(KeyExpr::Param(p.number as usize)),
        Some(N::TypeCast(t)) => t.arg.as_deref().and_then(key_expr),
        _ => None,
    }
}

fn insert_keys(cols: &[Node], select: Option<&Node>, spec: &TableSpec, a: &mut Analysis) {
    let pos = if cols.is_empty() {
        // No column list: values in the table's column order, as the catalog gives it.
        spec.position
    } else {
        cols.iter().position(|c| match &c.node {
            Some(N::ResTarget(r)) => r.name.eq_ignore_ascii_case(&spec.column),
            _ => false,
        })
    };
    let Some(Node {
        node: Some(N::SelectStmt(s)),
    }) = select
    else {
        return;
    };
    let Some(pos) = pos else { return };
    for row in &s.values_lists {
        let Some(N::List(values)) = &row.node else {
            continue;
        };
        match values.items.get(pos).and_then(key_expr) {
            Some(k) => a.keys.push(k),
            None => {
                // A row whose key is an expression Weir cannot evaluate.
                a.keys.clear();
                a.merge = Merge::Refuse("a sharding key Weir cannot evaluate");
                return;
            }
        }
    }
}

/// Classifies how a keyless SELECT's per-shard results combine.
fn merge_shape(s: &SelectStmt) -> Merge {
    if !s.group_clause.is_empty() || s.having_clause.is_some() {
        return Merge::Refuse("GROUP BY/HAVING across shards");
    }
    if !s.distinct_clause.is_empty() {
        return Merge::Refuse("DISTINCT across shards");
    }
    if s.limit_offset.is_some() {
        return Merge::Refuse("OFFSET across shards");
    }
    let shape = Shape::of(s);
    if shape.window {
        return Merge::Refuse("window functions across shards");
    }
    if shape.nested {
        return Merge::Refuse("subqueries, WITH queries or set-returning FROM items across shards");
    }
    if shape.join {
        return Merge::Refuse("joins across shards");
    }
    let mut aggs = Vec::new();
    let mut plain = 0;
    let mut star = false;
    for t in &s.target_list {
        let Some(N::ResTarget(r)) = &t.node else {
            continue;
        };
        match r.val.as_deref().and_then(|v| v.node.as_ref()) {
            Some(N::FuncCall(f)) => match mergeable_aggregate(f) {
                Some(agg) => aggs.push(agg),
                None => plain += 1,
            },
            Some(N::ColumnRef(c)) => {
                star |= c.fields.iter().any(|f| matches!(f.node, Some(N::AStar(_))));
                plain += 1;
            }
            _ => plain += 1,
        }
    }
    if shape.aggregates > aggs.len() {
        return Merge::Refuse(
            "an aggregate Weir cannot combine (only bare count, sum, min and max)",
        );
    }
    if !aggs.is_empty() {
        if plain > 0 {
            return Merge::Refuse("aggregates mixed with other columns across shards");
        }
        return Merge::Aggregates(aggs);
    }
    let limit = match s.limit_count.as_deref().and_then(|n| n.node.as_ref()) {
        None => None,
        Some(N::AConst(c)) => match &c.val {
            Some(a_const::Val::Ival(i)) if i.ival >= 0 => Some(i.ival as u64),
            None if c.isnull => None,
            _ => return Merge::Refuse("a LIMIT Weir cannot read"),
        },
        Some(_) => return Merge::Refuse("a LIMIT Weir cannot read"),
    };
    if s.sort_clause.is_empty() {
        return match limit {
            None => Merge::Concat,
            Some(n) => Merge::OrderLimit {
                order: Vec::new(),
                limit: Some(n),
            },
        };
    }
    let mut order = Vec::new();
    for sb in &s.sort_clause {
        let Some(N::SortBy(b)) = &sb.node else {
            return Merge::Refuse("ORDER BY Weir cannot read");
        };
        // pg_query's SortByDir: DEFAULT = 1, ASC = 2, DESC = 3, USING = 4;
        // SortByNulls: DEFAULT = 1, FIRST = 2, LAST = 3.
        let desc = match b.sortby_dir {
            0..=2 => false,
            3 => true,
            _ => return Merge::Refuse("ORDER BY … USING across shards"),
        };
        let nulls_first = match b.sortby_nulls {
            2 => true,
            3 => false,
            _ => desc,
        };
        let Some(item) = b.node.as_deref() else {
            return Merge::Refuse("ORDER BY Weir cannot read");
        };
        let col = match (
            output_position(item, &s.target_list),
            star,
            item.node.as_ref(),
        ) {
            (Some(pos), false, _) => SortCol::Pos(pos),
            (_, _, Some(N::AConst(_))) => match output_position(item, &s.target_list) {
                Some(pos) => SortCol::Pos(pos),
                None => return Merge::Refuse("ORDER BY a position Weir cannot read"),
            },
            (_, true, Some(N::ColumnRef(c))) => match c.fields.last().and_then(|f| f.node.as_ref())
            {
                Some(N::String(name)) => SortCol::Name(name.sval.clone()),
                _ => return Merge::Refuse("ORDER BY Weir cannot read"),
            },
            _ => return Merge::Refuse("ORDER BY on an expression not in the select list"),
        };
        order.push(SortKey {
            col,
            desc,
            nulls_first,
        });
    }
    Merge::OrderLimit { order, limit }
}

/// `count`, `sum`, `min` or `max` called plainly (no DISTINCT, window,
/// WITHIN GROUP): per-shard results combine exactly.
fn mergeable_aggregate(f: &pg_query::protobuf::FuncCall) -> Option<Agg> {
    if f.over.is_some() || f.agg_distinct || f.agg_within_group || f.func_variadic {
        return None;
    }
    match func_name(f).as_str() {
        "count" => Some(Agg::Count),
        "sum" => Some(Agg::Sum),
        "min" => Some(Agg::Min),
        "max" => Some(Agg::Max),
        _ => None,
    }
}

fn func_name(f: &pg_query::protobuf::FuncCall) -> String {
    f.funcname
        .last()
        .and_then(|n| match &n.node {
            Some(N::String(s)) => Some(s.sval.to_ascii_lowercase()),
            _ => None,
        })
        .unwrap_or_default()
}

/// PostgreSQL's built-in aggregate functions (an aggregate Weir does not know
/// by name is still caught when it uses aggregate syntax: `*`, DISTINCT,
/// FILTER, ORDER BY or WITHIN GROUP).
const AGGREGATES: &[&str] = &[
    "count",
    "sum",
    "min",
    "max",
    "avg",
    "bit_and",
    "bit_or",
    "bit_xor",
    "bool_and",
    "bool_or",
    "every",
    "array_agg",
    "string_agg",
    "json_agg",
    "jsonb_agg",
    "json_agg_strict",
    "jsonb_agg_strict",
    "json_object_agg",
    "jsonb_object_agg",
    "json_object_agg_strict",
    "jsonb_object_agg_strict",
    "json_object_agg_unique",
    "jsonb_object_agg_unique",
    "json_object_agg_unique_strict",
    "jsonb_object_agg_unique_strict",
    "xmlagg",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "variance",
    "var_pop",
    "var_samp",
    "corr",
    "covar_pop",
    "covar_samp",
    "regr_avgx",
    "regr_avgy",
    "regr_count",
    "regr_intercept",
    "regr_r2",
    "regr_slope",
    "regr_sxx",
    "regr_sxy",
    "regr_syy",
    "mode",
    "percentile_cont",
    "percentile_disc",
    "range_agg",
    "range_intersect_agg",
    "any_value",
    "grouping",
];

/// What a SELECT contains anywhere in its tree.
#[derive(Default)]
struct Shape {
    /// Aggregate calls, wherever they are.
    aggregates: usize,
    window: bool,
    /// Subqueries, CTEs, functions in FROM.
    nested: bool,
    join: bool,
}

impl Shape {
    fn of(s: &SelectStmt) -> Shape {
        let mut shape = Shape::default();
        match serde_json::to_value(s) {
            Ok(v) => shape.walk(&v),
            // Cannot look inside: do not claim it merges.
            Err(_) => shape.nested = true,
        }
        shape
    }

    fn walk(&mut self, v: &serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    match k.as_str() {
                        "FuncCall" => self.call(x),
                        "SubLink" | "RangeSubselect" | "RangeFunction" | "CommonTableExpr"
                        | "RangeTableFunc" | "RangeTableSample" => self.nested = true,
                        "JoinExpr" => self.join = true,
                        "with_clause" if !x.is_null() => self.nested = true,
                        "larg" | "rarg" if !x.is_null() && m.contains_key("op") => {
                            // A UNION/INTERSECT/EXCEPT branch.
                            self.nested = true
                        }
                        _ => {}
                    }
                    self.walk(x);
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| self.walk(x)),
            _ => {}
        }
    }

    fn call(&mut self, f: &serde_json::Value) {
        let set = |key: &str| match f.get(key) {
            Some(serde_json::Value::Bool(b)) => *b,
            Some(serde_json::Value::Null) | None => false,
            Some(serde_json::Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
        };
        if set("over") {
            self.window = true;
            return;
        }
        let name = f
            .get("funcname")
            .and_then(|n| n.as_array())
            .and_then(|a| a.last())
            .and_then(|n| n.pointer("/node/String/sval"))
            .and_then(|s| s.as_str())
            .unwrap_or_default()
            .to_ascii_lowercase();
        if AGGREGATES.contains(&name.as_str())
            || set("agg_star")
            || set("agg_distinct")
            || set("agg_filter")
            || set("agg_order")
            || set("agg_within_group")
        {
            self.aggregates += 1;
        }
    }
}

/// Position in the target list of an ORDER BY item (by number or by name).
fn output_position(n: &Node, targets: &[Node]) -> Option<usize> {
    match &n.node {
        Some(N::AConst(c)) => match &c.val {
            Some(a_const::Val::Ival(i)) if i.ival >= 1 && (i.ival as usize) <= targets.len() => {
                Some(i.ival as usize - 1)
            }
            _ => None,
        },
        Some(N::ColumnRef(c)) => {
            let name = match c.fields.last().and_then(|f| f.node.as_ref()) {
                Some(N::String(s)) => s.sval.to_ascii_lowercase(),
                _ => return None,
            };
            targets.iter().position(|t| match &t.node {
                Some(N::ResTarget(r)) => {
                    if !r.name.is_empty() {
                        return r.name.eq_ignore_ascii_case(&name);
                    }
                    match r.val.as_deref().and_then(|v| v.node.as_ref()) {
                        Some(N::ColumnRef(rc)) => matches!(
                            rc.fields.last().and_then(|f| f.node.as_ref()),
                            Some(N::String(s)) if s.sval.eq_ignore_ascii_case(&name)
                        ),
                        _ => false,
                    }
                }
                _ => false,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables() -> Vec<TableSpec> {
        vec![
            TableSpec::new("orders", "customer_id", KeyType::Bigint),
            TableSpec::new("public.users", "id", KeyType::Uuid),
        ]
    }

    fn an(sql: &str) -> Analysis {
        analyze(sql, &tables()).unwrap()
    }

    #[test]
    fn insert_keys_literal_and_params() {
        let a = an("INSERT INTO orders (id, customer_id) VALUES (1, 42), (2, $2)");
        assert_eq!(a.kind, Kind::Insert);
        assert_eq!(a.table, Some(0));
        assert_eq!(
            a.keys,
            vec![KeyExpr::Literal("42".into()), KeyExpr::Param(2)]
        );
    }

    #[test]
    fn where_keys_with_alias_schema_and_in() {
        let a = an("SELECT * FROM public.orders o WHERE o.customer_id = 7 AND o.id > 3");
        assert_eq!(a.keys, vec![KeyExpr::Literal("7".into())]);
        assert!(a.read_only);
        let a = an("UPDATE orders SET x = 1 WHERE customer_id IN (1, 2, $1)");
        assert_eq!(a.keys.len(), 3);
        let a = an("DELETE FROM orders WHERE '9' = customer_id");
        assert_eq!(a.keys, vec![KeyExpr::Literal("9".into())]);
        let a = an("SELECT * FROM users WHERE id = $1::uuid");
        assert_eq!(a.keys, vec![KeyExpr::Param(1)]);
    }

    #[test]
    fn locking_reads_are_writes() {
        assert!(!an("SELECT * FROM orders WHERE customer_id = 1 FOR UPDATE").read_only);
    }

    #[test]
    fn keyless_read_shapes() {
        assert_eq!(an("SELECT * FROM orders").merge, Merge::Concat);
        assert_eq!(
            an("SELECT count(*), sum(total), min(id), max(id) FROM orders").merge,
            Merge::Aggregates(vec![Agg::Count, Agg::Sum, Agg::Min, Agg::Max])
        );
        assert_eq!(
            an("SELECT id, total FROM orders ORDER BY total DESC, 1 LIMIT 5").merge,
            Merge::OrderLimit {
                order: vec![SortKey::desc(1), SortKey::asc(0)],
                limit: Some(5)
            }
        );
        assert!(matches!(
            an("SELECT avg(total) FROM orders").merge,
            Merge::Refuse(_)
        ));
        assert!(matches!(
            an("SELECT customer_id, count(*) FROM orders GROUP BY 1").merge,
            Merge::Refuse(_)
        ));
    }

    #[test]
    fn keyless_reads_weir_cannot_merge() {
        for sql in [
            "SELECT count(DISTINCT total > 1000) FROM orders",
            "SELECT count(*) + 0 FROM orders",
            "SELECT count(*)::int FROM orders",
            "SELECT bool_and(total > 0) FROM orders",
            "SELECT customer_id, row_number() OVER (ORDER BY customer_id) FROM orders",
            "SELECT count(*) FROM (SELECT * FROM orders) AS o",
            "SELECT * FROM orders WHERE total > (SELECT avg(total) FROM orders)",
            "SELECT * FROM orders o JOIN other x ON x.id = o.id",
        ] {
            let a = an(sql);
            let refused = matches!(a.merge, Merge::Refuse(_))
                || (a.table.is_none() && a.sharded_elsewhere.is_some());
            assert!(refused, "{sql}: {a:?}");
        }
        let a = an("WITH o AS (SELECT * FROM orders) SELECT count(*) FROM o");
        assert_eq!(a.table, None);
        assert_eq!(a.sharded_elsewhere.as_deref(), Some("orders"));
    }

    #[test]
    fn order_by_name_with_star_and_nulls() {
        assert_eq!(
            an("SELECT * FROM orders ORDER BY total DESC NULLS LAST, customer_id LIMIT 5").merge,
            Merge::OrderLimit {
                order: vec![
                    SortKey {
                        col: SortCol::Name("total".into()),
                        desc: true,
                        nulls_first: false
                    },
                    SortKey {
                        col: SortCol::Name("customer_id".into()),
                        desc: false,
                        nulls_first: false
                    }
                ],
                limit: Some(5)
            }
        );
    }

    #[test]
    fn begin_and_other_tables() {
        assert_eq!(an("BEGIN READ ONLY").kind, Kind::Begin { read_only: true });
        assert_eq!(an("begin").kind, Kind::Begin { read_only: false });
        assert_eq!(an("COMMIT").kind, Kind::End);
        assert_eq!(an("SELECT * FROM other WHERE customer_id = 1").table, None);
    }
}
