//! A row lands where its key says, or the statement is refused — whatever its size, and
//! whatever its data looks like: large keyed statements are routed (up to `max_packet_size`,
//! refused beyond it), text that looks like a hint inside literals is data, and a hint or
//! `SET weir.*` never moves a row away from its key's shard.

#[path = "sharding_support.rs"]
mod support;

use std::time::Duration;

use support::common::{self, eventually};
use support::{
    assert_no_problems, simple, sqlstate_and_message, weir_config_with, Key, KeyGen, Row, Shop,
    NOTES, SHARDS,
};
use tokio_postgres::types::{ToSql, Type};

/// A key of `notes` (text) on each shard, distinct from every other test key.
fn keys(seed: u64) -> [Vec<Key>; SHARDS] {
    KeyGen::new(seed).distinct_per_shard(NOTES.key_type, 4)
}

async fn start_shop() -> Shop {
    tokio::task::spawn_blocking(|| Shop::start(false))
        .await
        .expect("shop start")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_keyed_statements_are_routed_by_their_key() {
    let shop = start_shop().await;
    let client = shop.client().await;
    let keys = keys(81);
    let big = |c: char| c.to_string().repeat(6 << 20);
    let mut rows = Vec::new();
    for shard_keys in &keys {
        // Simple protocol, the key and a 6 MB payload as literals.
        let row = Row::new(shard_keys[0].clone(), big('s'));
        client
            .simple_query(&NOTES.insert_literals(std::slice::from_ref(&row)))
            .await
            .unwrap_or_else(|e| panic!("simple 6 MB insert: {}", common::describe_error(&e)));
        rows.push(row);
        // Extended protocol, both as parameters.
        let row = Row::new(shard_keys[1].clone(), big('e'));
        let key = shard_keys[1].text();
        let params: [&(dyn ToSql + Sync); 2] = [&key, &row.payload];
        let stmt = client
            .prepare_typed(&NOTES.insert_parameters(1), &[Type::TEXT, Type::TEXT])
            .await
            .expect("prepare");
        client
            .execute(&stmt, &params)
            .await
            .unwrap_or_else(|e| panic!("extended 6 MB insert: {}", common::describe_error(&e)));
        rows.push(row);
    }
    assert_no_problems(
        "6 MB keyed inserts",
        &shop.check_placement(&NOTES, &rows).await,
    );

    // Weir's limit on what it holds to route, on both sides of it.
    let limit = 1 << 20;
    shop.weir.rewrite_config(&weir_config_with(
        &shop.shards,
        &format!("max_packet_size = {limit}"),
    ));
    shop.weir.signal(libc::SIGHUP);
    eventually(Duration::from_secs(10), "reload", || {
        shop.weir.log().contains("configuration reloaded")
    });
    let client = shop.client().await;
    let insert = |key: &Key, total: usize| {
        let head = format!(
            "INSERT INTO notes (author, body) VALUES ({}, '",
            key.literal()
        );
        // Query message: tag, length, text, NUL.
        let fill = total - 5 - 1 - head.len() - 2;
        format!("{head}{}')", "f".repeat(fill))
    };
    let under = Row::new(keys[1][2].clone(), String::new());
    client
        .simple_query(&insert(&under.key.clone().expect("key"), limit))
        .await
        .unwrap_or_else(|e| panic!("insert at max_packet_size: {}", common::describe_error(&e)));
    let over_key = keys[1][3].clone();
    let err = client
        .simple_query(&insert(&over_key, limit + 1))
        .await
        .expect_err("a statement over max_packet_size must be refused");
    assert!(
        sqlstate_and_message(&err).contains("max_packet_size"),
        "{}",
        sqlstate_and_message(&err)
    );
    let where_is = |key: &Key| {
        (0..SHARDS)
            .map(|s| {
                shop.psql(
                    s,
                    &format!(
                        "SELECT count(*) FROM notes WHERE author = {}",
                        key.literal()
                    ),
                )
            })
            .collect::<Vec<_>>()
    };
    let mut want = vec!["0".to_string(); SHARDS];
    want[under.shard()] = "1".into();
    assert_eq!(where_is(under.key.as_ref().expect("key")), want);
    assert_eq!(where_is(&over_key), vec!["0".to_string(); SHARDS]);
    // Others are served as before.
    let other = shop.client().await;
    assert_eq!(
        simple(&other, "SELECT 1").await,
        Ok(vec![vec![Some("1".into())]])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_that_looks_like_a_hint_is_data() {
    let shop = start_shop().await;
    let client = shop.client().await;
    let keys = keys(82);
    let k0 = &keys[0];
    let mut rows = Vec::new();
    // Hints inside literals, E'' strings with escaped quotes, dollar quotes and identifiers.
    let payloads = [
        "'/* weir: shard=1 */'".to_string(),
        "'-- weir: shard=1'".to_string(),
        r"E'it\'s /* weir: shard=1 */'".to_string(),
        "$$ /* weir: shard=1 */ $$".to_string(),
    ];
    for (i, payload) in payloads.iter().enumerate() {
        let sql = format!(
            "INSERT INTO notes (author, body) VALUES ({}, {payload})",
            k0[i].literal()
        );
        simple(&client, &sql).await.expect(&sql);
        let text = simple(&client, &format!("SELECT {payload}"))
            .await
            .expect("payload text");
        let value = text[0][0].clone().expect("not null");
        rows.push(Row::new(k0[i].clone(), value));
    }
    assert_no_problems(
        "hints in literals",
        &shop.check_placement(&NOTES, &rows).await,
    );

    // A real hint that names another shard than the key: refused, nothing written.
    let k1 = &keys[1];
    let sql = format!(
        "/* weir: shard=1 */ INSERT INTO notes (author, body) VALUES ({}, 'x')",
        k0[0].literal()
    );
    let refused = simple(&client, &sql).await;
    assert!(
        matches!(&refused, Err(e) if e.starts_with("0A000") && e.contains("shard")),
        "{refused:?}"
    );
    // One that agrees is fine.
    let sql = format!(
        "/* weir: shard=1 */ INSERT INTO notes (author, body) VALUES ({}, 'agrees')",
        k1[0].literal()
    );
    simple(&client, &sql).await.expect("agreeing hint");
    rows.push(Row::new(k1[0].clone(), "agrees"));

    // SET weir.* with a statement after it would lose that statement: refused.
    let sql = format!(
        "SET weir.shard = 1; INSERT INTO notes (author, body) VALUES ({}, 'lost')",
        k1[1].literal()
    );
    let refused = simple(&client, &sql).await;
    assert!(
        matches!(&refused, Err(e) if e.starts_with("22023")),
        "{refused:?}"
    );
    // A session pin contradicting a key is refused too.
    simple(&client, "SET weir.shard = 0").await.expect("pin");
    let sql = format!(
        "INSERT INTO notes (author, body) VALUES ({}, 'pinned')",
        k1[2].literal()
    );
    let refused = simple(&client, &sql).await;
    assert!(
        matches!(&refused, Err(e) if e.starts_with("0A000")),
        "{refused:?}"
    );
    simple(&client, "RESET weir.shard").await.expect("unpin");
    assert_no_problems(
        "refused statements wrote nothing",
        &shop.check_placement(&NOTES, &rows).await,
    );
}
