//! SQL a client sends, through every reader Weir applies to it: the session-state scan, the
//! comment hint, statement shapes, the routing analysis and decision, and sharding keys.
//!
//! Properties beyond "no panic":
//! - a shape has the parameters it claims and is its own shape (`lift` of it is `None`);
//! - routing by shape (what `analyze_simple` does for a simple query) decides as routing
//!   the text whole does, whenever both parse: a lifted literal must never change where a
//!   statement goes (refusals may word their reason differently);
//! - a sharding key read from text, from a text parameter, from its canonical text, and
//!   from its binary form hashes alike.

use crate::config::{Config, Database};
use crate::frontend::sqlscan::{self, Seen};
use crate::router::route::{comment_hint, BindParams, Decision, ShardRouter};
use crate::router::shape;
use crate::router::{
    hash_value, parse_binary_key, parse_key, parse_param, sql, KeyType, KeyValue, ParamFormat,
};
use std::path::Path;
use std::sync::OnceLock;

const KEY_TYPES: [KeyType; 4] = [
    KeyType::Bigint,
    KeyType::Integer,
    KeyType::Text,
    KeyType::Uuid,
];

/// A sharded database with one table per key type.
const SHOP: &str = r#"
[databases.shop]
shards = [ { primary = "127.0.0.1:5433" }, { primary = "127.0.0.1:5434" }, { primary = "127.0.0.1:5435" } ]
sharded_tables = [
    { table = "orders", column = "customer_id", type = "bigint" },
    { table = "events", column = "n", type = "integer" },
    { table = "users", column = "name", type = "text" },
    { table = "public.devices", column = "id", type = "uuid" },
]
"#;

fn shop() -> &'static Database {
    static SHOP_DB: OnceLock<Database> = OnceLock::new();
    SHOP_DB.get_or_init(|| {
        let config = Config::from_toml(Path::new("/nonexistent-weir-fuzz/weir.toml"), SHOP)
            .expect("the fuzz database config is valid");
        Database::clone(
            &config
                .database("shop")
                .expect("the fuzz config has database shop"),
        )
    })
}

pub fn check(data: &[u8]) {
    let sql = String::from_utf8_lossy(data);
    sqlscan::observe(&sql, &mut Seen::default());
    shape_is_consistent(&sql);
    routes_alike(&sql);
    keys_agree(&sql);
    for key_type in KEY_TYPES {
        if let Ok(v) = parse_binary_key(key_type, data) {
            let _ = hash_value(key_type, &v);
        }
    }
}

fn shape_is_consistent(sql: &str) {
    let Some(shape) = shape::lift(sql) else {
        return;
    };
    assert!(!shape.values.is_empty(), "a shape lifts at least one value");
    for n in shape.first..shape.first + shape.values.len() {
        assert!(
            shape.text.contains(&format!("${n}")),
            "shape {shape:?} lacks ${n}"
        );
    }
    assert_eq!(
        shape::lift(&shape.text),
        None,
        "the shape of {sql:?} is not its own shape"
    );
}

fn routes_alike(sql: &str) {
    let Some(router) = ShardRouter::new(shop()) else {
        panic!("the fuzz database is sharded");
    };
    let pin = comment_hint(sql);
    let (analysis, shape) = router.analyze_simple(sql);
    let lifted = shape
        .as_ref()
        .map(|s| BindParams::from_text(&s.values))
        .unwrap_or_default();
    let by_shape = router.decide(&analysis, &lifted, None, false);
    let _ = router.decide(&analysis, &lifted, pin.as_ref(), true);
    let Ok(whole) = sql::analyze(sql, &router.tables()) else {
        return;
    };
    for key in &whole.keys {
        if let sql::KeyExpr::Param(n) = key {
            assert!(*n >= 1, "parameters are numbered from 1");
        }
    }
    let by_text = router.decide(&whole, &BindParams::default(), None, false);
    let alike = match (&by_text, &by_shape) {
        (Decision::Refuse(_), Decision::Refuse(_)) => true,
        (a, b) => a == b,
    };
    assert!(
        alike,
        "{sql:?} routes to {by_text:?} whole but to {by_shape:?} by its shape {shape:?}"
    );
}

fn keys_agree(text: &str) {
    for key_type in KEY_TYPES {
        let parsed = parse_key(key_type, text);
        let as_param = parse_param(key_type, ParamFormat::Text, Some(text.as_bytes()));
        assert_eq!(
            parsed, as_param,
            "{key_type} {text:?}: literal and text parameter"
        );
        let Ok(value) = parsed else {
            continue;
        };
        let hash = hash_value(key_type, &value);
        let canonical = canonical_text(&value);
        let reparsed = parse_key(key_type, &canonical).map(|v| hash_value(key_type, &v));
        assert_eq!(reparsed, Ok(hash), "{key_type} {text:?} as {canonical:?}");
        let binary = binary_form(key_type, &value);
        let from_binary = parse_binary_key(key_type, &binary).map(|v| hash_value(key_type, &v));
        assert_eq!(from_binary, Ok(hash), "{key_type} {text:?} in binary");
    }
}

fn canonical_text(value: &KeyValue<'_>) -> String {
    match value {
        KeyValue::Null => String::new(),
        KeyValue::Int(i) => i.to_string(),
        KeyValue::Text(s) => s.to_string(),
        KeyValue::Uuid(u) => {
            let hex: String = u.iter().map(|b| format!("{b:02x}")).collect();
            format!(
                "{}-{}-{}-{}-{}",
                &hex[..8],
                &hex[8..12],
                &hex[12..16],
                &hex[16..20],
                &hex[20..]
            )
        }
    }
}

/// The value as a binary Bind parameter of the column's own type.
fn binary_form(key_type: KeyType, value: &KeyValue<'_>) -> Vec<u8> {
    match (key_type, value) {
        (KeyType::Integer, KeyValue::Int(i)) => {
            i32::try_from(*i).unwrap_or_default().to_be_bytes().to_vec()
        }
        (_, KeyValue::Int(i)) => i.to_be_bytes().to_vec(),
        (_, KeyValue::Text(s)) => s.as_bytes().to_vec(),
        (_, KeyValue::Uuid(u)) => u.to_vec(),
        (_, KeyValue::Null) => Vec::new(),
    }
}
