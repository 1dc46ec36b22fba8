//! Keyless reads on a sharded table: the same simple query runs on every
//! shard at once and the results are merged into one answer — concatenated,
//! combined aggregates (count/sum/min/max without GROUP BY), or a merge of
//! ORDER BY … LIMIT. Shapes Weir cannot merge correctly never get here
//! (the router refuses them).

use crate::backend::params::ParamSet;
use crate::backend::Pool;
use crate::router::sql::{Agg, Merge, SortCol, SortKey};
use crate::wire::{self, build, tag, TxStatus};
use bytes::{BufMut, Bytes, BytesMut};
use std::cmp::Ordering;
use std::sync::Arc;

/// What one shard answered.
#[derive(Default)]
struct ShardResult {
    row_description: Option<Bytes>,
    rows: Vec<Bytes>,
    error: Option<Bytes>,
}

/// Runs `query` (a complete Query message) on each pool and returns the
/// merged response, ending in ReadyForQuery `I`.
pub async fn run(
    pools: Vec<Arc<Pool>>,
    query: Bytes,
    wanted: &ParamSet,
    merge: &Merge,
) -> BytesMut {
    let mut set = tokio::task::JoinSet::new();
    for (i, pool) in pools.into_iter().enumerate() {
        let query = query.clone();
        let wanted = wanted.clone();
        set.spawn(async move { (i, one_shard(pool, query, wanted).await) });
    }
    let mut results: Vec<(usize, ShardResult)> = Vec::new();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(x) => results.push(x),
            Err(_) => return finish_error("XX000", "fan-out task failed"),
        }
    }
    results.sort_by_key(|(i, _)| *i);
    let mut out = BytesMut::new();
    if let Some(err) = results.iter().find_map(|(_, r)| r.error.clone()) {
        out.put(err);
        out.put(build::ready_for_query(TxStatus::Idle));
        return out;
    }
    let desc = results.iter().find_map(|(_, r)| r.row_description.clone());
    let rows: Vec<Bytes> = match merge {
        Merge::Aggregates(aggs) => {
            let fields = desc.as_deref().map(fields).unwrap_or_default();
            combine_aggregates(
                aggs,
                &fields,
                results.iter().flat_map(|(_, r)| r.rows.iter()),
            )
        }
        Merge::OrderLimit { order, limit } => {
            let fields = desc.as_deref().map(fields).unwrap_or_default();
            let keys = match resolve(order, &fields) {
                Ok(k) => k,
                Err(msg) => return finish_error("0A000", &msg),
            };
            let mut all: Vec<(Vec<Option<Bytes>>, Bytes)> = results
                .iter()
                .flat_map(|(_, r)| r.rows.iter())
                .map(|row| (columns(row), row.clone()))
                .collect();
            all.sort_by(|a, b| compare_rows(&a.0, &b.0, &keys));
            let n = limit.map(|l| l as usize).unwrap_or(all.len());
            all.into_iter().take(n).map(|(_, r)| r).collect()
        }
        _ => results.into_iter().flat_map(|(_, r)| r.rows).collect(),
    };
    if let Some(d) = desc {
        out.put(d);
    }
    let count = rows.len();
    for r in rows {
        out.put(r);
    }
    out.put(command_complete(&format!("SELECT {count}")));
    out.put(build::ready_for_query(TxStatus::Idle));
    out
}

fn finish_error(code: &str, msg: &str) -> BytesMut {
    let mut out = build::error("ERROR", code, msg);
    out.put(build::ready_for_query(TxStatus::Idle));
    out
}

fn command_complete(tag_text: &str) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u8(b'C');
    b.put_i32((4 + tag_text.len() + 1) as i32);
    b.put_slice(tag_text.as_bytes());
    b.put_u8(0);
    b
}

async fn one_shard(pool: Arc<Pool>, query: Bytes, wanted: ParamSet) -> ShardResult {
    let mut result = ShardResult::default();
    let mut server = match pool.checkout().await {
        Ok(s) => s,
        Err(e) => {
            result.error =
                Some(build::error("ERROR", "08006", &format!("shard unavailable: {e}")).freeze());
            return result;
        }
    };
    if let Some((sql, changed)) = server.params.sync_statement(&wanted) {
        let mut w = wanted.clone();
        if server.exec(&sql).await.is_err() {
            result.error = Some(
                build::error("ERROR", "08006", "shard failed applying session parameters").freeze(),
            );
            return result;
        }
        server.params.after_sync(&mut w, &changed);
    }
    use tokio::io::AsyncWriteExt;
    if server.stream.write_all(&query).await.is_err() {
        result.error = Some(build::error("ERROR", "08006", "shard connection lost").freeze());
        return result;
    }
    loop {
        let msg = match crate::net::read_message(&mut server.stream, &mut server.buf).await {
            Ok(Some(m)) => m.freeze(),
            _ => {
                result.error =
                    Some(build::error("ERROR", "08006", "shard connection lost").freeze());
                return result;
            }
        };
        match msg[0] {
            b'T' if result.row_description.is_none() => result.row_description = Some(msg),
            b'D' => result.rows.push(msg),
            tag::ERROR_RESPONSE if result.error.is_none() => result.error = Some(msg),
            tag::READY_FOR_QUERY => {
                if msg.get(5) == Some(&b'I') {
                    server.buf.clear();
                    pool.checkin(server);
                }
                return result;
            }
            _ => {}
        }
    }
}

/// Text values of a DataRow (None = NULL).
fn columns(row: &[u8]) -> Vec<Option<Bytes>> {
    let b = wire::body(row);
    let mut out = Vec::new();
    if b.len() < 2 {
        return out;
    }
    let n = i16::from_be_bytes([b[0], b[1]]).max(0) as usize;
    let mut pos = 2;
    for _ in 0..n {
        let Some(len) = b
            .get(pos..pos + 4)
            .map(|l| i32::from_be_bytes([l[0], l[1], l[2], l[3]]))
        else {
            break;
        };
        pos += 4;
        if len < 0 {
            out.push(None);
        } else {
            let end = (pos + len as usize).min(b.len());
            out.push(Some(Bytes::copy_from_slice(&b[pos..end])));
            pos = end;
        }
    }
    out
}

fn data_row(values: &[Option<Vec<u8>>]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(b'D');
    let len = 4
        + 2
        + values
            .iter()
            .map(|v| 4 + v.as_ref().map_or(0, |x| x.len()))
            .sum::<usize>();
    b.put_i32(len as i32);
    b.put_i16(values.len() as i16);
    for v in values {
        match v {
            Some(x) => {
                b.put_i32(x.len() as i32);
                b.put_slice(x);
            }
            None => b.put_i32(-1),
        }
    }
    b.freeze()
}

/// One column of a RowDescription: name and type OID.
type Field = (String, u32);

/// The columns a RowDescription announces.
fn fields(desc: &[u8]) -> Vec<Field> {
    let b = wire::body(desc);
    let mut out = Vec::new();
    if b.len() < 2 {
        return out;
    }
    let n = i16::from_be_bytes([b[0], b[1]]).max(0) as usize;
    let mut pos = 2;
    for _ in 0..n {
        let Some((name, next)) = wire::cstr(b, pos) else {
            break;
        };
        // table oid (4), attnum (2), type oid (4), typlen (2), typmod (4), format (2)
        let Some(t) = b.get(next + 6..next + 10) else {
            break;
        };
        out.push((
            name.to_string(),
            u32::from_be_bytes([t[0], t[1], t[2], t[3]]),
        ));
        pos = next + 18;
    }
    out
}

/// How a column's text values order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    /// int2/4/8, oid, numeric, float4/8: by value.
    Number,
    /// Everything else: bytewise (as the C collation orders text).
    Bytes,
}

fn order_of(type_oid: u32) -> Order {
    match type_oid {
        20 | 21 | 23 | 26 | 700 | 701 | 1700 => Order::Number,
        _ => Order::Bytes,
    }
}

/// A sort key resolved against the RowDescription.
struct Key {
    col: usize,
    order: Order,
    desc: bool,
    nulls_first: bool,
}

fn resolve(order: &[SortKey], fields: &[Field]) -> Result<Vec<Key>, String> {
    order
        .iter()
        .map(|k| {
            let col = match &k.col {
                SortCol::Pos(p) => *p,
                SortCol::Name(name) => {
                    let mut hits = fields
                        .iter()
                        .enumerate()
                        .filter(|(_, (n, _))| n == name)
                        .map(|(i, _)| i);
                    match (hits.next(), hits.next()) {
                        (Some(i), None) => i,
                        _ => {
                            return Err(format!(
                                "Weir cannot merge ORDER BY \"{name}\" across shards: it is not exactly one output column"
                            ))
                        }
                    }
                }
            };
            Ok(Key {
                col,
                order: fields.get(col).map_or(Order::Bytes, |f| order_of(f.1)),
                desc: k.desc,
                nulls_first: k.nulls_first,
            })
        })
        .collect()
}

/// Orders two non-NULL text values of a column.
fn compare_values(x: &[u8], y: &[u8], order: Order) -> Ordering {
    if order == Order::Number {
        if let (Ok(a), Ok(b)) = (std::str::from_utf8(x), std::str::from_utf8(y)) {
            if let Some(o) = compare_numbers(a.trim(), b.trim()) {
                return o;
            }
        }
    }
    x.cmp(y)
}

/// Compares two numbers written as text: exactly for integers and decimals,
/// as floats (NaN above everything, as PostgreSQL) otherwise.
fn compare_numbers(a: &str, b: &str) -> Option<Ordering> {
    if let (Ok(x), Ok(y)) = (a.parse::<i128>(), b.parse::<i128>()) {
        return Some(x.cmp(&y));
    }
    if let (Some(x), Some(y)) = (Decimal::parse(a), Decimal::parse(b)) {
        return Some(x.cmp(&y));
    }
    let f = |s: &str| -> Option<f64> {
        match s {
            "NaN" => Some(f64::NAN),
            "Infinity" => Some(f64::INFINITY),
            "-Infinity" => Some(f64::NEG_INFINITY),
            _ => s.parse().ok(),
        }
    };
    let (x, y) = (f(a)?, f(b)?);
    Some(match (x.is_nan(), y.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        _ => x.partial_cmp(&y)?,
    })
}

/// A decimal number as sign, integer digits and fraction digits (no exponent).
#[derive(Debug, PartialEq, Eq)]
struct Decimal {
    negative: bool,
    int: String,
    frac: String,
}

impl Decimal {
    fn parse(s: &str) -> Option<Decimal> {
        let (negative, digits) = match s.strip_prefix('-') {
            Some(d) => (true, d),
            None => (false, s.strip_prefix('+').unwrap_or(s)),
        };
        let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
        if int.is_empty() && frac.is_empty()
            || !int.bytes().all(|c| c.is_ascii_digit())
            || !frac.bytes().all(|c| c.is_ascii_digit())
        {
            return None;
        }
        let int = int.trim_start_matches('0').to_string();
        let frac = frac.trim_end_matches('0').to_string();
        let zero = int.is_empty() && frac.is_empty();
        Some(Decimal {
            negative: negative && !zero,
            int,
            frac,
        })
    }

    fn magnitude_cmp(&self, other: &Decimal) -> Ordering {
        self.int
            .len()
            .cmp(&other.int.len())
            .then_with(|| self.int.cmp(&other.int))
            .then_with(|| self.frac.cmp(&other.frac))
    }
}

impl Ord for Decimal {
    fn cmp(&self, other: &Decimal) -> Ordering {
        match (self.negative, other.negative) {
            (false, true) => Ordering::Greater,
            (true, false) => Ordering::Less,
            (false, false) => self.magnitude_cmp(other),
            (true, true) => other.magnitude_cmp(self),
        }
    }
}

impl PartialOrd for Decimal {
    fn partial_cmp(&self, other: &Decimal) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

fn compare_rows(a: &[Option<Bytes>], b: &[Option<Bytes>], keys: &[Key]) -> Ordering {
    for k in keys {
        let o = match (
            a.get(k.col).cloned().flatten(),
            b.get(k.col).cloned().flatten(),
        ) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) if k.nulls_first => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(_), None) if k.nulls_first => Ordering::Greater,
            (Some(_), None) => Ordering::Less,
            (Some(x), Some(y)) => {
                let o = compare_values(&x, &y, k.order);
                if k.desc {
                    o.reverse()
                } else {
                    o
                }
            }
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    Ordering::Equal
}

/// Combines one aggregate row per shard into the answer for all shards.
fn combine_aggregates<'a>(
    aggs: &[Agg],
    fields: &[Field],
    rows: impl Iterator<Item = &'a Bytes>,
) -> Vec<Bytes> {
    let mut acc: Vec<Option<Bytes>> = vec![None; aggs.len()];
    for row in rows {
        let cols = columns(row);
        for (i, agg) in aggs.iter().enumerate() {
            let Some(v) = cols.get(i).cloned().flatten() else {
                continue;
            };
            let order = fields.get(i).map_or(Order::Bytes, |f| order_of(f.1));
            acc[i] = Some(match (&acc[i], agg) {
                (None, _) => v,
                (Some(cur), Agg::Count | Agg::Sum) => add_numbers(cur, &v),
                (Some(cur), Agg::Min) => {
                    if compare_values(&v, cur, order) == Ordering::Less {
                        v
                    } else {
                        cur.clone()
                    }
                }
                (Some(cur), Agg::Max) => {
                    if compare_values(&v, cur, order) == Ordering::Greater {
                        v
                    } else {
                        cur.clone()
                    }
                }
            });
        }
    }
    // count() of no rows is 0, not NULL.
    for (i, agg) in aggs.iter().enumerate() {
        if *agg == Agg::Count && acc[i].is_none() {
            acc[i] = Some(Bytes::from_static(b"0"));
        }
    }
    let values: Vec<Option<Vec<u8>>> = acc.into_iter().map(|v| v.map(|b| b.to_vec())).collect();
    vec![data_row(&values)]
}

/// Adds two decimal numbers given as text, exactly.
fn add_numbers(a: &[u8], b: &[u8]) -> Bytes {
    let (sa, sb) = (String::from_utf8_lossy(a), String::from_utf8_lossy(b));
    if let (Ok(x), Ok(y)) = (sa.trim().parse::<i128>(), sb.trim().parse::<i128>()) {
        return Bytes::from((x + y).to_string());
    }
    Bytes::from(add_decimal(sa.trim(), sb.trim()).unwrap_or_else(|| {
        let x: f64 = sa.trim().parse().unwrap_or(0.0);
        let y: f64 = sb.trim().parse().unwrap_or(0.0);
        (x + y).to_string()
    }))
}

/// Exact sum of two decimal strings (numeric results of sum()).
fn add_decimal(a: &str, b: &str) -> Option<String> {
    fn split(s: &str) -> Option<(i128, usize)> {
        let (int, frac) = s.split_once('.').unwrap_or((s, ""));
        let digits = format!("{int}{frac}");
        Some((digits.parse().ok()?, frac.len()))
    }
    let (x, fx) = split(a)?;
    let (y, fy) = split(b)?;
    let scale = fx.max(fy);
    let x = x.checked_mul(10i128.checked_pow((scale - fx) as u32)?)?;
    let y = y.checked_mul(10i128.checked_pow((scale - fy) as u32)?)?;
    let sum = x.checked_add(y)?;
    if scale == 0 {
        return Some(sum.to_string());
    }
    let neg = sum < 0;
    let digits = format!("{:0>width$}", sum.unsigned_abs(), width = scale + 1);
    let (i, f) = digits.split_at(digits.len() - scale);
    Some(format!("{}{i}.{f}", if neg { "-" } else { "" }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(vals: &[Option<&str>]) -> Bytes {
        let v: Vec<Option<Vec<u8>>> = vals
            .iter()
            .map(|x| x.map(|s| s.as_bytes().to_vec()))
            .collect();
        data_row(&v)
    }

    #[test]
    fn sums_exactly() {
        assert_eq!(&add_numbers(b"10", b"32")[..], b"42");
        assert_eq!(&add_numbers(b"1.25", b"2.5")[..], b"3.75");
        assert_eq!(&add_numbers(b"-1.5", b"0.25")[..], b"-1.25");
    }

    #[test]
    fn combines_aggregates() {
        let rows = [
            row(&[Some("3"), Some("10"), Some("1"), Some("9")]),
            row(&[Some("2"), None, Some("-4"), Some("7")]),
        ];
        let fields: Vec<Field> = (0..4).map(|i| (format!("c{i}"), 20)).collect();
        let out = combine_aggregates(
            &[Agg::Count, Agg::Sum, Agg::Min, Agg::Max],
            &fields,
            rows.iter(),
        );
        let cols = columns(&out[0]);
        let text: Vec<Option<String>> = cols
            .iter()
            .map(|c| c.as_ref().map(|b| String::from_utf8_lossy(b).into_owned()))
            .collect();
        assert_eq!(
            text,
            vec![
                Some("5".into()),
                Some("10".into()),
                Some("-4".into()),
                Some("9".into())
            ]
        );
    }

    fn key(desc: bool, nulls_first: bool) -> Key {
        Key {
            col: 0,
            order: Order::Number,
            desc,
            nulls_first,
        }
    }

    #[test]
    fn orders_numbers_numerically_with_nulls_where_asked() {
        let a = vec![Some(Bytes::from_static(b"10"))];
        let b = vec![Some(Bytes::from_static(b"9"))];
        let n = vec![None];
        assert_eq!(
            compare_rows(&a, &b, &[key(false, false)]),
            Ordering::Greater
        );
        assert_eq!(compare_rows(&a, &b, &[key(true, true)]), Ordering::Less);
        assert_eq!(
            compare_rows(&n, &a, &[key(false, false)]),
            Ordering::Greater
        );
        assert_eq!(compare_rows(&n, &a, &[key(false, true)]), Ordering::Less);
    }

    #[test]
    fn compares_extreme_integers_and_decimals_exactly() {
        let o = |a: &str, b: &str| compare_numbers(a, b);
        assert_eq!(
            o("-9223372036854775808", "-9223372036854775807"),
            Some(Ordering::Less)
        );
        assert_eq!(o("0.10000000000000000001", "0.1"), Some(Ordering::Greater));
        assert_eq!(o("-2.5", "-2.40"), Some(Ordering::Less));
        assert_eq!(o("-0.0", "0"), Some(Ordering::Equal));
        assert_eq!(o("NaN", "Infinity"), Some(Ordering::Greater));
        assert_eq!(o("1e3", "999"), Some(Ordering::Greater));
    }
}
