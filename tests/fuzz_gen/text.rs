//! Text input: admin console commands and SQL for the routing analysis.

use super::pick;
use crate::mutate;
use rand::rngs::StdRng;
use rand::Rng;

const ADMIN_WORDS: &[&str] = &[
    "SHOW",
    "show",
    "POOLS",
    "stats",
    "PAUSE",
    "resume",
    "KILL",
    "RELOAD",
    "\"My-DB\"\"x\"",
    "\"\"",
    "\"unterminated",
    "app_db",
    "a\u{e9}",
    "averyveryverylongcommandword",
    "SET",
    "set",
];

const ADMIN_VALUES: &[&str] = &[
    "5",
    "0.5",
    "'select ''x'''",
    "'",
    "''",
    "\"quoted\"",
    "on",
    "'\u{1f600}'",
];

/// An `admin_command` input: words, SET forms, separators and the odd mutation.
pub fn admin_input(rng: &mut StdRng) -> Vec<u8> {
    let space = |rng: &mut StdRng| pick(rng, &[" ", "  ", "\t", "\n", "\r\n", ""]).to_string();
    let mut s = space(rng);
    if rng.gen_bool(0.4) {
        s.push_str(pick(rng, &["SET", "set", "SeT"]));
        s.push_str(&space(rng));
        s.push_str(pick(rng, &["default_pool_size", "\"key\"", "x", ""]));
        s.push_str(&space(rng));
        s.push_str(pick(rng, &["=", "TO", "to", "==", ""]));
        s.push_str(&space(rng));
        s.push_str(pick(rng, ADMIN_VALUES));
    } else {
        for _ in 0..rng.gen_range(1..4) {
            s.push_str(pick(rng, ADMIN_WORDS));
            s.push_str(&space(rng));
        }
    }
    s.push_str(pick(rng, &["", ";", " ; ", ";;", "; SHOW STATS"]));
    if rng.gen_bool(0.2) {
        mutate(rng, s.into_bytes())
    } else {
        s.into_bytes()
    }
}

const LITERALS: &[&str] = &[
    "42",
    "-7",
    "- 7",
    "'42'",
    "'it''s'",
    "1.5",
    "1e3",
    "9223372036854775808",
    "-9223372036854775808",
    "2147483648",
    "NULL",
    "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'",
    "'{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}'",
    "'abc'::text",
    "'5'::bigint",
    "E'\\x41'",
    "$$x$$",
    "$1",
    "$2::int",
    "0x1F",
    "1_000",
    "''",
    "'\u{e9}'",
];

const TABLES: &[&str] = &[
    "orders",
    "events",
    "users",
    "devices",
    "public.devices",
    "other",
    "\"Orders\"",
];

const KEYS: &[&str] = &["customer_id", "n", "name", "id", "x"];

const TEMPLATES: &[&str] = &[
    "SELECT * FROM {t} WHERE {k} = {v}",
    "select count(*) from {t} where {k} = {v} and x = {v}",
    "SELECT a, b FROM {t} WHERE {k} IN ({v}, {v}, {v})",
    "INSERT INTO {t} ({k}, x) VALUES ({v}, {v}), ({v}, {v})",
    "INSERT INTO {t} VALUES ({v}, 'x') RETURNING *",
    "UPDATE {t} SET x = {v} WHERE {k} = {v}",
    "DELETE FROM {t} WHERE {k} = {v}",
    "SELECT * FROM {t} ORDER BY 1 LIMIT {v}",
    "SELECT sum(x), max(x) FROM {t}",
    "SELECT * FROM {t} WHERE {k} = {v} FOR UPDATE",
    "WITH w AS (SELECT * FROM {t} WHERE {k} = {v}) SELECT * FROM w",
    "SELECT * FROM other o JOIN {t} t ON t.{k} = o.id WHERE t.{k} = {v}",
    "/* weir: shard={v} */ SELECT * FROM {t}",
    "/* weir: sharding_key={v} */ UPDATE {t} SET x = 1",
    "SELECT {v} = {v}",
    "BEGIN READ ONLY; SELECT * FROM {t} WHERE {k} = {v}; COMMIT",
    "SELECT * FROM {t} WHERE {k} = {v} -- {v}",
    "SELECT * FROM {t} WHERE {k} >= {v} AND {k} <= {v}",
    "SELECT * FROM {t} WHERE {k} = ANY('{{1,2}}')",
    "SET weir.shard = {v}",
    "select * from {t} where ({k}) = ({v})",
    "select * from {t} where {k} = {v} union all select * from {t} where {k} = {v}",
];

/// A `sql_routing` input: a routing-shaped statement over the fuzz database's tables.
pub fn sql_input(rng: &mut StdRng) -> Vec<u8> {
    let template = pick(rng, TEMPLATES);
    let table = pick(rng, TABLES);
    let key = pick(rng, KEYS);
    let mut out = String::new();
    let mut rest = template;
    while let Some(at) = rest.find('{') {
        out.push_str(&rest[..at]);
        let hole = &rest[at..];
        let (text, len) = if hole.starts_with("{t}") {
            (table, 3)
        } else if hole.starts_with("{k}") {
            (key, 3)
        } else if hole.starts_with("{v}") {
            (pick(rng, LITERALS), 3)
        } else if hole.starts_with("{{") {
            ("{", 2)
        } else {
            ("{", 1)
        };
        out.push_str(text);
        rest = &hole[len..];
    }
    out.push_str(&rest.replace("}}", "}"));
    if rng.gen_bool(0.15) {
        mutate(rng, out.into_bytes())
    } else {
        out.into_bytes()
    }
}
