//! A sharded database end to end: two shards (PostgreSQL clusters, some with a streaming
//! replica) behind one Weir, checked against PostgreSQL itself.
//!
//! - Placement: shard `i` of 2 holds exactly the rows `PARTITION BY HASH (key) MODULUS 2
//!   REMAINDER i` would hold, for keys of all four types arriving as literals or parameters.
//! - Statements by key: writes touch one shard, reads find the row, cross-shard and keyless
//!   writes are refused, hints and `SET weir.*` pin a shard, transactions stay on one shard.
//! - Keyless reads fan out and answer what one unsharded copy of the data answers, or are
//!   refused (0A000) when Weir cannot merge them.
//! - Replicas: key reads go to the shard's replica, writes and locking reads to its primary; a
//!   crashed replica is banned for `ban_time` and rejoins; a crashed primary fails its writes
//!   clearly until it is back.
//!
//! Fixtures (topology, keys, placement checks) are in sharding_support.rs.

#[path = "sharding_support.rs"]
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::common::{self, eventually, quote_literal};
use support::{
    assert_no_problems, crash, eventually_async, insert_literals, insert_parameters, scalar,
    simple, simple_count, sqlstate_and_message, Key, KeyGen, Row, Shop, Table, ACCOUNTS, DEVICES,
    NOTES, ORDERS, SHARDS, TABLES,
};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Client;
use weir::router::KeyType;

/// How long replication, bans and restarts get to take effect.
const SETTLE: Duration = Duration::from_secs(20);

/// Whether a statement was refused with SQLSTATE 0A000 and a message containing `needles`.
fn refused<T>(result: &Result<T, String>, needles: &[&str]) -> bool {
    matches!(result, Err(e) if e.starts_with("0A000") && needles.iter().all(|n| e.contains(n)))
}

/// Notes a problem unless `got == want`.
fn expect<T: PartialEq + std::fmt::Debug>(problems: &mut Vec<String>, what: &str, got: T, want: T) {
    if got != want {
        problems.push(format!("{what}: got {got:?}, expected {want:?}"));
    }
}

/// One key on each shard, of `key_type`.
fn one_key_per_shard(gen: &mut KeyGen, key_type: KeyType) -> [Key; SHARDS] {
    gen.distinct_per_shard(key_type, 1)
        .map(|mut keys| keys.pop().expect("a key"))
}

/// The port of the server that ran `sql` (which must return `inet_server_port()` first).
async fn port_of(client: &Client, sql: &str) -> Result<u16, String> {
    let rows = simple(client, sql).await?;
    rows.first()
        .and_then(|r| r[0].as_deref())
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("no port in {rows:?}"))
}

// ---------------------------------------------------------------------------------------------
// Placement
// ---------------------------------------------------------------------------------------------

/// 10,000 rows over the four key types (bigint with its extremes, integer, text with empty and
/// non-ASCII strings, uuid, plus a NULL key each): a third as binary `$n` parameters
/// (Parse/Bind/Execute), the rest as literals in multi-row INSERTs, each statement's rows on
/// one shard. Every row must be where PostgreSQL's hash partitioning puts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_keys_of_every_type_land_on_their_hash_partition() {
    let shop = Shop::start(false);
    let client = shop.client().await;
    let mut gen = KeyGen::new(1);
    let mut problems = Vec::new();
    for (table, n) in [
        (ORDERS, 4000),
        (ACCOUNTS, 2000),
        (NOTES, 2000),
        (DEVICES, 2000),
    ] {
        let mut literal = Vec::new();
        let mut param = Vec::new();
        for (i, row) in gen.rows(&table, n - 1).into_iter().enumerate() {
            if i % 3 == 0 {
                param.push(row);
            } else {
                literal.push(row);
            }
        }
        literal.push(Row {
            key: None,
            payload: gen.payload(&table),
        });
        insert_literals(&client, &table, &literal).await;
        insert_parameters(&client, &table, &param).await;
        literal.extend(param);
        problems.extend(shop.check_placement(&table, &literal).await);
    }
    assert_no_problems("placement", &problems);
}

/// tokio-postgres' `execute`/`query` with parameters first prepare the statement
/// (Parse/Describe/Sync, no Bind yet) and then bind it; a named statement prepared once is
/// executed with keys of both shards. Each execution goes to its key's shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_route_each_execution_by_its_parameters() {
    let shop = Shop::start(false);
    let client = shop.client().await;
    let keys = KeyGen::new(2).distinct_per_shard(KeyType::Bigint, 3);
    let mut rows = Vec::new();
    for (i, k) in keys.iter().flatten().enumerate() {
        let Key::Bigint(v) = k else { unreachable!() };
        let total = format!("{i}.50");
        let inserted = client
            .execute(
                "INSERT INTO orders (customer_id, total) VALUES ($1, $2::text::numeric)",
                &[v, &total],
            )
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "client.execute(INSERT … VALUES ($1, $2)) with key {v} (shard {}): {}",
                    k.shard(),
                    common::describe_error(&e)
                )
            });
        assert_eq!(inserted, 1);
        rows.push(Row::new(k.clone(), total));
    }
    assert_no_problems("placement", &shop.check_placement(&ORDERS, &rows).await);

    let lookup = client
        .prepare("SELECT total::text FROM orders WHERE customer_id = $1")
        .await
        .unwrap_or_else(|e| panic!("prepare a key lookup: {}", common::describe_error(&e)));
    for row in &rows {
        let Some(Key::Bigint(v)) = &row.key else {
            unreachable!()
        };
        let found = client
            .query(&lookup, &[v])
            .await
            .unwrap_or_else(|e| panic!("execute the prepared lookup for {v}: {e}"));
        let totals: Vec<String> = found.iter().map(|r| r.get(0)).collect();
        assert_eq!(totals, vec![row.payload.clone()], "lookup of key {v}");
    }
}

/// Requests a client pipelines (sends before the previous answers arrive, as tokio-postgres
/// does for concurrent requests on one connection) are routed one by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_each_go_to_their_own_shard() {
    let shop = Shop::start(false);
    let client = shop.client().await;
    let [a, b] = KeyGen::new(3).distinct_per_shard(KeyType::Bigint, 20);
    let keys: Vec<Key> = a.into_iter().zip(b).flat_map(|(x, y)| [x, y]).collect();
    let sql = ORDERS.insert_parameters(1);
    let payload = "1.00".to_string();
    let inserts = keys.iter().map(|k| {
        let params: [(&(dyn ToSql + Sync), Type); 2] = [k.param(), (&payload, Type::TEXT)];
        let (client, sql) = (&client, &sql);
        async move { client.execute_typed(sql, &params).await }
    });
    let results = futures_util::future::join_all(inserts).await;
    let mut problems = Vec::new();
    for (k, r) in keys.iter().zip(results) {
        if let Err(e) = r {
            problems.push(format!(
                "pipelined INSERT of {k:?}: {}",
                sqlstate_and_message(&e)
            ));
        }
    }
    let rows: Vec<Row> = keys.iter().map(|k| Row::new(k.clone(), "1.00")).collect();
    problems.extend(shop.check_placement(&ORDERS, &rows).await);
    assert_no_problems("pipelined requests", &problems);
}

/// tokio-postgres' `query(&str)` prepares a named statement and, when done, sends its Close
/// (with a Sync) along with the client's next request. That next request still goes to its own
/// key's shard (here shard 1, like the statement before it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_sent_after_a_statement_close_goes_to_its_own_shard() {
    let shop = Shop::start(false);
    let client = shop.client().await;
    let [_, keys] = KeyGen::new(14).distinct_per_shard(KeyType::Bigint, 20);
    let mut problems = Vec::new();
    let want = Ok(shop.describe_port(shop.primary_port(1)));
    let served = |port: Result<u16, String>| port.map(|p| shop.describe_port(p));
    for pair in keys.chunks(2) {
        let insert = |k: &Key| {
            let sql = ORDERS.insert_literals(&[Row::new(k.clone(), "2.00")]);
            format!("{sql} RETURNING inet_server_port()")
        };
        let sql = insert(&pair[0]);
        let got = match client.query(sql.as_str(), &[]).await {
            Ok(rows) => Ok(rows[0].get::<_, i32>(0) as u16),
            Err(e) => Err(sqlstate_and_message(&e)),
        };
        let what = format!("client.query({sql})");
        expect(&mut problems, &what, served(got), want.clone());
        let sql = insert(&pair[1]);
        let got = port_of(&client, &sql).await;
        let what = format!("{sql} (simple protocol, right after the client.query)");
        expect(&mut problems, &what, served(got), want.clone());
    }
    let rows: Vec<Row> = keys.iter().map(|k| Row::new(k.clone(), "2.00")).collect();
    problems.extend(shop.check_placement(&ORDERS, &rows).await);
    assert_no_problems("requests after a Close", &problems);
}

// ---------------------------------------------------------------------------------------------
// Statements by key
// ---------------------------------------------------------------------------------------------

/// UPDATE and DELETE by key (literal and parameter) change only their shard; a read by key
/// returns the row. Checked for every key type against the full contents of both shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_by_key_touch_only_their_shard_and_reads_find_the_row() {
    let shop = Shop::start(false);
    let client = shop.client().await;
    let mut gen = KeyGen::new(4);
    let mut problems = Vec::new();
    for table in TABLES {
        let per_shard = gen.distinct_per_shard(table.key_type, 5);
        let mut rows: Vec<Row> = per_shard
            .iter()
            .flatten()
            .map(|k| Row::new(k.clone(), gen.payload(&table)))
            .collect();
        insert_literals(&client, &table, &rows).await;
        for keys in &per_shard {
            problems
                .extend(update_by_literal(&client, &table, &keys[0], &mut rows, &mut gen).await);
            problems
                .extend(update_by_parameter(&client, &table, &keys[1], &mut rows, &mut gen).await);
            problems.extend(delete_by_key(&client, &table, &keys[2], &mut rows).await);
            problems.extend(read_by_key(&client, &table, &keys[3], &rows).await);
            problems.extend(shop.check_placement(&table, &rows).await);
        }
    }
    assert_no_problems("writes by key", &problems);
}

async fn update_by_literal(
    client: &Client,
    table: &Table,
    key: &Key,
    rows: &mut [Row],
    gen: &mut KeyGen,
) -> Vec<String> {
    let payload = gen.payload(table);
    let sql = format!(
        "UPDATE {} SET {} = {} WHERE {} = {}",
        table.name,
        table.payload,
        quote_literal(&payload),
        table.column,
        key.literal()
    );
    set_payload(rows, key, &payload);
    match simple_count(client, &sql).await {
        Ok(1) => vec![],
        other => vec![format!("{sql}: {other:?}, expected 1 row")],
    }
}

async fn update_by_parameter(
    client: &Client,
    table: &Table,
    key: &Key,
    rows: &mut [Row],
    gen: &mut KeyGen,
) -> Vec<String> {
    let payload = gen.payload(table);
    let sql = format!(
        "UPDATE {} SET {} = $2::text::{} WHERE {} = $1",
        table.name, table.payload, table.payload_type, table.column
    );
    set_payload(rows, key, &payload);
    let params = [key.param(), (&payload as &(dyn ToSql + Sync), Type::TEXT)];
    match client.execute_typed(&sql, &params).await {
        Ok(1) => vec![],
        Ok(n) => vec![format!("{sql} with {key:?}: {n} rows, expected 1")],
        Err(e) => vec![format!("{sql} with {key:?}: {}", sqlstate_and_message(&e))],
    }
}

async fn delete_by_key(
    client: &Client,
    table: &Table,
    key: &Key,
    rows: &mut Vec<Row>,
) -> Vec<String> {
    let sql = format!(
        "DELETE FROM {} WHERE {} = {}",
        table.name,
        table.column,
        key.literal()
    );
    rows.retain(|r| r.key.as_ref() != Some(key));
    match simple_count(client, &sql).await {
        Ok(1) => vec![],
        other => vec![format!("{sql}: {other:?}, expected 1 row")],
    }
}

async fn read_by_key(client: &Client, table: &Table, key: &Key, rows: &[Row]) -> Vec<String> {
    let want: Vec<Vec<Option<String>>> = rows
        .iter()
        .filter(|r| r.key.as_ref() == Some(key))
        .map(|r| vec![Some(r.payload.clone())])
        .collect();
    let sql = format!(
        "SELECT {}::text FROM {} WHERE {} = {}",
        table.payload,
        table.name,
        table.column,
        key.literal()
    );
    let mut problems = Vec::new();
    match simple(client, &sql).await {
        Ok(got) if got == want => {}
        other => problems.push(format!("{sql}: {other:?}, expected {want:?}")),
    }
    let sql = format!(
        "SELECT {}::text FROM {} WHERE {} = $1",
        table.payload, table.name, table.column
    );
    match client.query_typed(&sql, &[key.param()]).await {
        Ok(got) => {
            let got: Vec<Vec<Option<String>>> = got.iter().map(|r| vec![r.get(0)]).collect();
            if got != want {
                problems.push(format!("{sql} with {key:?}: {got:?}, expected {want:?}"));
            }
        }
        Err(e) => problems.push(format!("{sql} with {key:?}: {}", sqlstate_and_message(&e))),
    }
    problems
}

fn set_payload(rows: &mut [Row], key: &Key, payload: &str) {
    for r in rows.iter_mut().filter(|r| r.key.as_ref() == Some(key)) {
        r.payload = payload.to_string();
    }
}

/// A multi-row INSERT whose rows belong to different shards, and writes without a key, are
/// refused with 0A000 and write nothing anywhere; a table that is not sharded lives on shard 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_shard_and_keyless_writes_are_refused_and_unsharded_tables_use_shard_zero() {
    let shop = Shop::start(false);
    let client = shop.client().await;
    let mut gen = KeyGen::new(5);
    let mut problems = Vec::new();
    let existing: Vec<Row> = gen
        .distinct_per_shard(KeyType::Bigint, 3)
        .into_iter()
        .flatten()
        .map(|k| Row::new(k, "5.00"))
        .collect();
    insert_literals(&client, &ORDERS, &existing).await;

    let [k0, k1] = one_key_per_shard(&mut gen, KeyType::Bigint);
    let mixed = [Row::new(k0.clone(), "1.00"), Row::new(k1.clone(), "2.00")];
    let literal_sql = ORDERS.insert_literals(&mixed);
    let r = simple(&client, &literal_sql).await;
    if !refused(&r, &["more than one shard"]) {
        problems.push(format!(
            "{literal_sql}: {r:?}, expected 0A000 \"… more than one shard …\""
        ));
    }
    let (one, two) = ("1.00".to_string(), "2.00".to_string());
    let params = [
        k0.param(),
        (&one as _, Type::TEXT),
        k1.param(),
        (&two as _, Type::TEXT),
    ];
    let param_sql = ORDERS.insert_parameters(2);
    let r = client.execute_typed(&param_sql, &params).await;
    let r = r.map_err(|e| sqlstate_and_message(&e));
    if !refused(&r, &["more than one shard"]) {
        problems.push(format!(
            "{param_sql} with keys on shards 0 and 1: {r:?}, expected 0A000 \"… more than one shard …\""
        ));
    }

    for sql in [
        "DELETE FROM orders",
        "UPDATE orders SET total = 0",
        "UPDATE orders SET total = 0 WHERE total > 1",
    ] {
        let r = simple(&client, sql).await;
        if !refused(&r, &["\"orders\"", "/* weir:"]) {
            problems.push(format!(
                "{sql}: {r:?}, expected 0A000 naming \"orders\" and the /* weir: … */ hint"
            ));
        }
    }
    problems.extend(shop.check_placement(&ORDERS, &existing).await);

    let inserted = simple(
        &client,
        "INSERT INTO settings (name, value) VALUES ('mode', 'on')",
    )
    .await;
    let read = simple(&client, "SELECT value FROM settings WHERE name = 'mode'").await;
    if inserted.is_err() || read != Ok(vec![vec![Some("on".into())]]) {
        problems.push(format!(
            "unsharded table through Weir: insert {inserted:?}, read {read:?}"
        ));
    }
    let counts = shop.counts("settings");
    if counts != [1, 0] {
        problems.push(format!(
            "settings rows per shard: {counts:?}, expected [1, 0]"
        ));
    }
    assert_no_problems("refusals", &problems);
}

/// `/* weir: shard=N */` and `/* weir: sharding_key=V */` comments, and `SET weir.shard`,
/// `SET weir.sharding_key`, `RESET weir.shard` pin statements to a shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hints_and_weir_settings_pin_a_shard() {
    let shop = Shop::start(false);
    let client = shop.client().await;
    let mut gen = KeyGen::new(6);
    let rows: Vec<Row> = gen
        .distinct_per_shard(KeyType::Bigint, 4)
        .into_iter()
        .flatten()
        .map(|k| Row::new(k, "3.00"))
        .collect();
    insert_literals(&client, &ORDERS, &rows).await;
    let port = |s: usize| Ok(shop.primary_port(s));
    let shard_of_42 = Key::Bigint(42).shard();
    let alice = Key::Text("alice".into()).shard();
    let mut problems = Vec::new();
    for shard in 0..SHARDS {
        let sql = format!("/* weir: shard={shard} */ SELECT inet_server_port()");
        expect(
            &mut problems,
            &sql,
            port_of(&client, &sql).await,
            port(shard),
        );
    }
    let sql = "/* weir: sharding_key=42 */ SELECT inet_server_port()";
    expect(
        &mut problems,
        sql,
        port_of(&client, sql).await,
        port(shard_of_42),
    );
    let sql = "/* weir: sharding_key=42 */ SELECT inet_server_port(), count(*) FROM orders";
    expect(
        &mut problems,
        sql,
        port_of(&client, sql).await,
        port(shard_of_42),
    );
    // The key of a text-keyed table is read as text, not as the first table's bigint.
    let sql = "/* weir: sharding_key=alice */ SELECT inet_server_port(), count(*) FROM notes";
    expect(&mut problems, sql, port_of(&client, sql).await, port(alice));
    let sql = "/* weir: shard=7 */ SELECT 1";
    let r = simple(&client, sql).await;
    if !refused(&r, &[]) {
        problems.push(format!("{sql}: {r:?}, expected 0A000 (no shard 7)"));
    }

    let count_sql = "SELECT inet_server_port(), count(*) FROM orders";
    for (set, want) in [
        ("SET weir.shard = 1", port(1)),
        ("SET weir.shard = 0", port(0)),
        ("SET weir.sharding_key = '42'", port(shard_of_42)),
    ] {
        if let Err(e) = simple(&client, set).await {
            problems.push(format!("{set}: {e}"));
        }
        let what = format!("{count_sql} after {set}");
        expect(
            &mut problems,
            &what,
            port_of(&client, count_sql).await,
            want,
        );
    }
    if let Err(e) = simple(&client, "SET weir.shard = 1").await {
        problems.push(format!("SET weir.shard = 1: {e}"));
    }
    let pinned_delete = simple(&client, "DELETE FROM orders").await;
    if pinned_delete.is_err() {
        problems.push(format!(
            "DELETE FROM orders under SET weir.shard = 1: {pinned_delete:?}"
        ));
    }
    let counts = shop.counts("orders");
    if counts != [4, 0] {
        problems.push(format!(
            "orders per shard after DELETE under SET weir.shard = 1: {counts:?}, expected [4, 0]"
        ));
    }
    if let Err(e) = simple(&client, "RESET weir.shard").await {
        problems.push(format!("RESET weir.shard: {e}"));
    }
    // Unpinned again: a keyless count fans out (no single server port), a keyless write is
    // refused.
    let fanned = simple(&client, "SELECT count(*) FROM orders").await;
    if fanned != Ok(vec![vec![Some("4".into())]]) {
        problems.push(format!(
            "SELECT count(*) FROM orders after RESET: {fanned:?}, expected 4"
        ));
    }
    let r = simple(&client, "DELETE FROM orders").await;
    if !refused(&r, &[]) {
        problems.push(format!(
            "DELETE FROM orders after RESET: {r:?}, expected 0A000"
        ));
    }
    assert_no_problems("hints", &problems);
}

// ---------------------------------------------------------------------------------------------
// Transactions
// ---------------------------------------------------------------------------------------------

/// BEGIN; INSERT key K; UPDATE key K; COMMIT runs on K's shard; BEGIN; ROLLBACK with nothing in
/// between works; a statement Weir refuses after BEGIN fails the transaction (25P02) until
/// ROLLBACK, as PostgreSQL would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_run_on_their_key_shard_and_fail_like_postgres() {
    let shop = Shop::start(false);
    let client = shop.client().await;
    let mut gen = KeyGen::new(7);
    let mut committed = Vec::new();
    for key in one_key_per_shard(&mut gen, KeyType::Bigint) {
        let shard = key.shard();
        let k = key.literal();
        client.simple_query("BEGIN").await.expect("BEGIN");
        let insert = format!(
            "INSERT INTO orders (customer_id, total) VALUES ({k}, 1) RETURNING inet_server_port()"
        );
        assert_eq!(
            port_of(&client, &insert).await,
            Ok(shop.primary_port(shard)),
            "{insert}"
        );
        let update = format!(
            "UPDATE orders SET total = total + 1 WHERE customer_id = {k} RETURNING inet_server_port()"
        );
        assert_eq!(
            port_of(&client, &update).await,
            Ok(shop.primary_port(shard)),
            "{update}"
        );
        // Not committed yet: invisible outside the transaction.
        assert_eq!(
            shop.counts("orders").iter().sum::<u64>(),
            committed.len() as u64
        );
        client.simple_query("COMMIT").await.expect("COMMIT");
        committed.push(Row::new(key, "2.00"));
        assert_no_problems(
            "committed",
            &shop.check_placement(&ORDERS, &committed).await,
        );
    }

    client.simple_query("BEGIN").await.expect("BEGIN");
    client
        .simple_query("ROLLBACK")
        .await
        .expect("ROLLBACK right after BEGIN");
    client.simple_query("BEGIN").await.expect("BEGIN");
    client
        .simple_query("COMMIT")
        .await
        .expect("COMMIT right after BEGIN");

    let [k0, _] = one_key_per_shard(&mut gen, KeyType::Bigint);
    client.simple_query("BEGIN").await.expect("BEGIN");
    let insert = format!(
        "INSERT INTO orders (customer_id, total) VALUES ({}, 1)",
        k0.literal()
    );
    client
        .simple_query(&insert)
        .await
        .expect("INSERT in a transaction");
    client.simple_query("ROLLBACK").await.expect("ROLLBACK");
    assert_no_problems(
        "rolled back",
        &shop.check_placement(&ORDERS, &committed).await,
    );

    client.simple_query("BEGIN").await.expect("BEGIN");
    let r = simple(&client, "DELETE FROM orders").await;
    assert!(
        refused(&r, &[]),
        "DELETE FROM orders after BEGIN: {r:?}, expected 0A000"
    );
    for sql in ["SELECT 1", insert.as_str()] {
        let r = simple(&client, sql).await;
        assert!(
            matches!(&r, Err(e) if e.starts_with("25P02")),
            "{sql} after a refused statement in a transaction: {r:?}, expected 25P02"
        );
    }
    client
        .simple_query("ROLLBACK")
        .await
        .expect("ROLLBACK of the failed transaction");
    assert_eq!(scalar(&client, "SELECT 1").await, "1", "after ROLLBACK");
    assert_no_problems(
        "after the failed transaction",
        &shop.check_placement(&ORDERS, &committed).await,
    );
}

/// Once a transaction runs on a shard, a statement for another shard's key, or a write without
/// a key, is refused (0A000) instead of running on the transaction's shard: it must neither
/// put a row on the wrong shard nor delete a whole shard's table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_in_a_transaction_cannot_leave_its_shard() {
    let shop = Shop::start(false);
    let client = shop.client().await;
    let [k0, k1] = one_key_per_shard(&mut KeyGen::new(8), KeyType::Bigint);
    let keep = Row::new(k0.clone(), "7.00");
    insert_literals(&client, &ORDERS, std::slice::from_ref(&keep)).await;
    let mut problems = Vec::new();

    client.simple_query("BEGIN").await.expect("BEGIN");
    let first = format!(
        "UPDATE orders SET total = 7 WHERE customer_id = {}",
        k0.literal()
    );
    client.simple_query(&first).await.expect("first statement");
    let other = format!(
        "INSERT INTO orders (customer_id, total) VALUES ({}, 1) RETURNING inet_server_port()",
        k1.literal()
    );
    let r = simple(&client, &other).await;
    if !refused(&r, &[]) {
        let port = shop.primary_port(0);
        problems.push(format!(
            "in a transaction on shard 0 (port {port}): {other}: {r:?}, expected 0A000"
        ));
    }
    let _ = client.simple_query("COMMIT").await;

    client.simple_query("BEGIN").await.expect("BEGIN");
    client.simple_query(&first).await.expect("first statement");
    let r = simple(&client, "DELETE FROM orders").await;
    if !refused(&r, &[]) {
        problems.push(format!(
            "in a transaction on shard 0: DELETE FROM orders: {r:?}, expected 0A000"
        ));
    }
    let _ = client.simple_query("COMMIT").await;
    problems.extend(shop.check_placement(&ORDERS, &[keep]).await);
    assert_no_problems("transaction scope", &problems);
}

// ---------------------------------------------------------------------------------------------
// Fan-out
// ---------------------------------------------------------------------------------------------

/// The same rows in `shop` (through Weir) and in database `reference` (one plain copy on shard
/// 0's cluster, read directly).
struct FanOut {
    /// Keeps the clusters and Weir running.
    _shop: Shop,
    weir: Client,
    reference: Client,
    /// Keys of `orders`, for IN lists.
    keys: [Vec<Key>; SHARDS],
}

impl FanOut {
    async fn load(seed: u64) -> FanOut {
        let shop = Shop::start(false);
        let cluster = &shop.shards[0].primary;
        cluster.create_database("reference", "app");
        cluster.psql("reference", &support::schema());
        let weir = shop.client().await;
        let reference = common::connect(&cluster.url("postgres", "", "reference")).await;
        let mut gen = KeyGen::new(seed);
        let keys = gen.distinct_per_shard(KeyType::Bigint, 150);
        let mut orders: Vec<Row> = support::SPECIAL_BIGINT
            .iter()
            .map(|v| Row::new(Key::Bigint(*v), gen.payload(&ORDERS)))
            .collect();
        orders.extend(
            keys.iter()
                .flatten()
                .filter(|k| !orders.iter().any(|r| r.key.as_ref() == Some(k)))
                .map(|k| Row::new(k.clone(), gen.payload(&ORDERS)))
                .collect::<Vec<_>>(),
        );
        orders.push(Row {
            key: None,
            payload: "0.00".into(),
        });
        let notes: Vec<Row> = gen.rows(&NOTES, 60);
        for (table, rows) in [(ORDERS, &orders), (NOTES, &notes)] {
            insert_literals(&weir, &table, rows).await;
            reference
                .simple_query(&table.insert_literals(rows))
                .await
                .expect("load the reference copy");
        }
        FanOut {
            _shop: shop,
            weir,
            reference,
            keys,
        }
    }

    /// Runs `sql` through Weir and on the reference; `None` if the answers agree (as sets
    /// unless `ordered`), else what differs.
    async fn compare(&self, sql: &str, ordered: bool) -> Option<String> {
        let want = simple(&self.reference, sql)
            .await
            .unwrap_or_else(|e| panic!("reference: {sql}: {e}"));
        match simple(&self.weir, sql).await {
            Ok(got) if same_rows(&got, &want, ordered) => None,
            Ok(got) => Some(format!(
                "{sql}: Weir answered {} rows {:?}, one database answers {} rows {:?}",
                got.len(),
                head(&got),
                want.len(),
                head(&want)
            )),
            Err(e) => Some(format!(
                "{sql}: Weir refused ({e}), one database answers {:?}",
                head(&want)
            )),
        }
    }

    /// `None` if Weir refuses `sql` with 0A000 or answers exactly what one database answers.
    async fn refused_or_right(&self, sql: &str) -> Option<String> {
        match simple(&self.weir, sql).await {
            Err(e) if e.starts_with("0A000") => None,
            Err(e) => Some(format!(
                "{sql}: error {e}, expected 0A000 or the right answer"
            )),
            Ok(_) => self
                .compare(sql, false)
                .await
                .map(|d| format!("answered wrongly instead of refused: {d}")),
        }
    }
}

fn same_rows(got: &[Vec<Option<String>>], want: &[Vec<Option<String>>], ordered: bool) -> bool {
    if ordered {
        return got == want;
    }
    let (mut g, mut w) = (got.to_vec(), want.to_vec());
    g.sort();
    w.sort();
    g == w
}

fn head(rows: &[Vec<Option<String>>]) -> &[Vec<Option<String>>] {
    &rows[..rows.len().min(6)]
}

/// Keyless reads run on every shard and, merged, answer what one unsharded copy answers:
/// aggregates, ORDER BY … LIMIT (numbers, text, NULLs), plain rows, and IN lists spanning
/// shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_reads_fan_out_and_match_one_unsharded_copy() {
    let f = FanOut::load(9).await;
    let (a, b) = (&f.keys[0][0], &f.keys[1][0]);
    let in_list = format!(
        "SELECT customer_id, total FROM orders WHERE customer_id IN ({}, {})",
        a.literal(),
        b.literal()
    );
    let checks: Vec<(String, bool)> = vec![
        (
            "SELECT count(*), sum(total), min(customer_id), max(customer_id) FROM orders".into(),
            true,
        ),
        (
            "SELECT count(*), sum(total), min(total), max(total) FROM orders".into(),
            true,
        ),
        (
            "SELECT customer_id, total FROM orders ORDER BY customer_id DESC LIMIT 10".into(),
            true,
        ),
        (
            "SELECT customer_id, total FROM orders ORDER BY customer_id LIMIT 10".into(),
            true,
        ),
        (
            "SELECT * FROM orders ORDER BY total, customer_id LIMIT 5".into(),
            true,
        ),
        ("SELECT customer_id FROM orders".into(), false),
        (
            "SELECT author, body FROM notes ORDER BY author, body LIMIT 8".into(),
            true,
        ),
        (
            "SELECT customer_id FROM orders ORDER BY customer_id NULLS FIRST LIMIT 3".into(),
            true,
        ),
        (in_list, false),
    ];
    let mut problems = Vec::new();
    for (sql, ordered) in &checks {
        problems.extend(f.compare(sql, *ordered).await);
    }
    assert_no_problems("fan-out", &problems);
}

/// Keyless reads whose per-shard answers Weir cannot merge are refused with 0A000: GROUP BY,
/// avg(), OFFSET and DISTINCT always; other shapes are either refused or answered right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_reads_weir_cannot_merge_are_refused_not_answered_wrongly() {
    let f = FanOut::load(10).await;
    let mut problems = Vec::new();
    for sql in [
        "SELECT count(*) FROM orders GROUP BY total > 1000",
        "SELECT avg(total) FROM orders",
        "SELECT customer_id FROM orders ORDER BY customer_id LIMIT 5 OFFSET 3",
        "SELECT DISTINCT total > 1000 FROM orders",
    ] {
        let r = simple(&f.weir, sql).await;
        if !refused(&r, &[]) {
            let answer = r.map(|rows| head(&rows).to_vec());
            problems.push(format!("{sql}: {answer:?}, expected 0A000"));
        }
    }
    for sql in [
        "SELECT count(DISTINCT total > 1000) FROM orders",
        "SELECT count(*) + 0 FROM orders",
        "SELECT bool_and(total > -1000000) FROM orders",
        "SELECT customer_id, row_number() OVER (ORDER BY customer_id) FROM orders",
        "SELECT count(*) FROM (SELECT * FROM orders) AS o",
        "WITH o AS (SELECT * FROM orders) SELECT count(*) FROM o",
    ] {
        problems.extend(f.refused_or_right(sql).await);
    }
    assert_no_problems("unmergeable reads", &problems);
}

// ---------------------------------------------------------------------------------------------
// Replicas and health
// ---------------------------------------------------------------------------------------------

/// With read_from_replicas, a read by key runs on its shard's replica; writes, reads in a
/// read-write transaction and SELECT … FOR UPDATE run on the primary; BEGIN READ ONLY
/// transactions run on the replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_reads_use_replicas_and_writes_use_primaries() {
    let shop = Shop::start(true);
    let client = shop.client().await;
    let keys = one_key_per_shard(&mut KeyGen::new(11), KeyType::Bigint);
    let mut problems = Vec::new();
    for key in &keys {
        let (shard, k) = (key.shard(), key.literal());
        let primary = Ok(format!("{} (false)", shop.primary_port(shard)));
        let replica = Ok(format!("{} (true)", shop.replica_port(shard)));
        let served_by = "inet_server_port(), pg_is_in_recovery()";
        let where_key = format!("FROM orders WHERE customer_id = {k}");

        let insert = format!(
            "INSERT INTO orders (customer_id, total) VALUES ({k}, 4.25) RETURNING {served_by}"
        );
        expect(
            &mut problems,
            &insert,
            server(&client, "", &insert).await,
            primary.clone(),
        );
        let read = format!("SELECT {served_by} {where_key} AND total = 4.25");
        eventually_async(SETTLE, &format!("{read} on the replica"), || async {
            server(&client, "", &read).await == replica
        });
        let typed = format!("SELECT {served_by} FROM orders WHERE customer_id = $1");
        let got = match client.query_typed(&typed, &[key.param()]).await {
            Ok(r) if r.len() == 1 => Ok(format!(
                "{} ({})",
                r[0].get::<_, i32>(0),
                r[0].get::<_, bool>(1)
            )),
            Ok(r) => Err(format!("{} rows", r.len())),
            Err(e) => Err(sqlstate_and_message(&e)),
        };
        expect(
            &mut problems,
            &format!("{typed} with {k}"),
            got,
            replica.clone(),
        );

        let select = format!("SELECT {served_by} {where_key}");
        let locking = format!("{select} FOR UPDATE");
        let update = format!(
            "UPDATE orders SET total = total WHERE customer_id = {k} RETURNING {served_by}"
        );
        for (begin, sql, want) in [
            ("BEGIN READ ONLY", &select, &replica),
            ("BEGIN", &select, &primary),
            ("BEGIN", &locking, &primary),
            ("", &locking, &primary),
            ("", &update, &primary),
        ] {
            let what = format!("{begin}; {sql}");
            expect(
                &mut problems,
                &what,
                server(&client, begin, sql).await,
                want.clone(),
            );
        }
    }
    // A keyless read fans out to the replicas, which have caught up by now.
    let count = simple(&client, "SELECT count(*) FROM orders").await;
    expect(
        &mut problems,
        "keyless count",
        count,
        Ok(vec![vec![Some(SHARDS.to_string())]]),
    );
    assert_no_problems("replica routing", &problems);
}

/// "port (in recovery)" of the server that ran `sql` (which returns `inet_server_port(),
/// pg_is_in_recovery()`), inside a transaction opened by `begin` unless it is empty.
async fn server(client: &Client, begin: &str, sql: &str) -> Result<String, String> {
    if !begin.is_empty() {
        simple(client, begin).await?;
    }
    let rows = simple(client, sql).await;
    if !begin.is_empty() {
        simple(client, "COMMIT").await?;
    }
    match rows?.as_slice() {
        [r] => Ok(format!(
            "{} ({})",
            r[0].as_deref().unwrap_or("?"),
            r[1].as_deref() == Some("t")
        )),
        other => Err(format!("{} rows", other.len())),
    }
}

/// One read by key through Weir during the replica crash: when, which shard's key (`None` for
/// a failed connect), and the port that answered or the error.
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    shard: Option<usize>,
    result: Result<u16, String>,
}

/// A task reading keys through Weir in a loop, reconnecting after errors, logging every read.
struct ReadLoad {
    log: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl ReadLoad {
    fn start(url: String, keys: Vec<Key>) -> ReadLoad {
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(read_loop(url, keys, log.clone(), stop.clone()));
        ReadLoad { log, stop, task }
    }

    fn samples(&self) -> Vec<Sample> {
        self.log.lock().unwrap().clone()
    }

    /// Whether a read of `shard` after `since` had `result`.
    fn saw(&self, since: Instant, shard: usize, result: Result<u16, String>) -> bool {
        let log = self.log.lock().unwrap();
        log.iter()
            .any(|s| s.at > since && s.shard == Some(shard) && s.result == result)
    }

    /// Waits (blocking this worker, not the load) until `condition` holds.
    fn wait_for(&self, what: &str, condition: impl Fn(&ReadLoad) -> bool) {
        tokio::task::block_in_place(|| eventually(SETTLE, what, || condition(self)));
    }

    async fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Release);
        let samples = self.log.clone();
        self.task.await.expect("read load task");
        let samples = samples.lock().unwrap().clone();
        samples
    }
}

async fn read_loop(
    url: String,
    keys: Vec<Key>,
    log: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
) {
    let record = |shard, result| {
        let at = Instant::now();
        log.lock().unwrap().push(Sample { at, shard, result });
    };
    let mut client: Option<Client> = None;
    while !stop.load(Ordering::Acquire) {
        let c = match &client {
            Some(c) => c,
            None => match common::try_connect(&url).await {
                Ok(c) => client.insert(c),
                Err(e) => {
                    record(None, Err(format!("connect: {}", sqlstate_and_message(&e))));
                    continue;
                }
            },
        };
        for key in &keys {
            let sql = format!(
                "SELECT inet_server_port() FROM orders WHERE customer_id = {}",
                key.literal()
            );
            let result = tokio::time::timeout(Duration::from_secs(10), port_of(c, &sql))
                .await
                .unwrap_or_else(|_| Err("no answer within 10s".into()));
            let failed = result.is_err();
            record(Some(key.shard()), result);
            if failed {
                client = None;
                break;
            }
        }
    }
}

/// What is wrong with the reads in `window`: any error, and any read of a shard not served by
/// `want[shard]`.
fn check_window(window: &[&Sample], want: [u16; SHARDS]) -> Vec<String> {
    let mut problems = Vec::new();
    let errors: Vec<&Result<u16, String>> = window
        .iter()
        .filter(|s| s.result.is_err())
        .map(|s| &s.result)
        .collect();
    if !errors.is_empty() {
        let sample = &errors[..errors.len().min(5)];
        problems.push(format!(
            "{} of {} reads failed: {sample:?}",
            errors.len(),
            window.len()
        ));
    }
    for (shard, port) in want.into_iter().enumerate() {
        let reads: Vec<&Sample> = window
            .iter()
            .copied()
            .filter(|s| s.shard == Some(shard))
            .collect();
        let elsewhere: Vec<&Result<u16, String>> = reads
            .iter()
            .filter(|s| s.result.as_ref().is_ok_and(|p| *p != port))
            .map(|s| &s.result)
            .collect();
        if reads.len() < 5 || !elsewhere.is_empty() {
            problems.push(format!(
                "shard {shard}: {} reads, {} served by another port than {port}: {:?}",
                reads.len(),
                elsewhere.len(),
                &elsewhere[..elsewhere.len().min(5)]
            ));
        }
    }
    problems
}

/// A replica crashes during a read load: after the first failed read, Weir bans it and the
/// shard's reads go to its primary without errors (also when ban_time runs out while the
/// replica is still down); the other shard's replica keeps serving; once the replica is back
/// it returns to rotation after ban_time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_replica_is_banned_and_rejoins_after_ban_time() {
    const GRACE: Duration = Duration::from_millis(500);
    /// Longer than ban_time (2s), so the ban runs out once while the replica is down.
    const WINDOW: Duration = Duration::from_secs(5);
    let shop = Shop::start(true);
    let keys = one_key_per_shard(&mut KeyGen::new(12), KeyType::Bigint);
    let rows: Vec<Row> = keys.iter().map(|k| Row::new(k.clone(), "1.00")).collect();
    insert_literals(&shop.client().await, &ORDERS, &rows).await;
    let replica = |s: usize| Ok(shop.replica_port(s));
    let load = ReadLoad::start(shop.url(), keys.to_vec());
    let started = Instant::now();
    load.wait_for("both replicas serving key reads", |l| {
        l.saw(started, 0, replica(0)) && l.saw(started, 1, replica(1))
    });

    let crashed_at = Instant::now();
    crash(shop.shards[0].replica.as_ref().expect("replica"));
    load.wait_for("reads after the crash", |l| {
        l.samples()
            .iter()
            .any(|s| s.at > crashed_at + GRACE + WINDOW)
    });
    let samples = load.samples();
    let first_error = samples
        .iter()
        .find(|s| s.at > crashed_at && s.result.is_err())
        .map(|s| s.at);
    let from = first_error.unwrap_or(crashed_at) + GRACE;
    let window: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at > from && s.at < from + WINDOW)
        .collect();
    let problems = check_window(&window, [shop.primary_port(0), shop.replica_port(1)]);
    assert!(
        problems.is_empty(),
        "reads from {GRACE:?} after the first error ({:?} after the crash) for {WINDOW:?}:\n  {}\n--- weir log ---\n{}",
        first_error.map(|t| t - crashed_at),
        problems.join("\n  "),
        shop.weir.log()
    );

    let restarted = Instant::now();
    let crashed = shop.shards[0].replica.as_ref().expect("replica");
    crashed.start_again();
    load.wait_for("replica 0 back in rotation", |l| {
        l.saw(restarted, 0, replica(0))
    });
    let samples = load.finish().await;
    let late: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at > from && s.result.is_err())
        .collect();
    assert!(
        late.is_empty(),
        "reads failed after the ban took effect: {late:?}"
    );
}

/// While a shard's primary is down its writes fail with a clear error and the other shard's
/// writes go on; once it is back, its writes succeed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_fail_clearly_while_their_primary_is_down_and_recover() {
    let shop = Shop::start(false);
    let [k0, k1] = one_key_per_shard(&mut KeyGen::new(13), KeyType::Bigint);
    let insert = |k: &Key| {
        format!(
            "INSERT INTO orders (customer_id, total) VALUES ({}, 1)",
            k.literal()
        )
    };
    let client = shop.client().await;
    client
        .simple_query(&insert(&k1))
        .await
        .expect("write before the crash");

    // The harness runs PostgreSQL with synchronous_commit = off: make that write durable
    // before the crash.
    shop.psql(1, "CHECKPOINT");
    crash(&shop.shards[1].primary);
    let client = shop.client().await;
    let failed = tokio::time::timeout(Duration::from_secs(30), client.simple_query(&insert(&k1)))
        .await
        .expect("a write to a down primary answers within 30s");
    let err = failed.expect_err("a write to a down primary fails");
    let db = err.as_db_error().unwrap_or_else(|| {
        panic!("a write to a down primary: expected an error message from Weir, got {err:?}")
    });
    let down = shop.primary_port(1).to_string();
    assert!(
        db.message().contains(&down),
        "a write to a down primary: {}: expected a message naming the server (port {down})",
        sqlstate_and_message(&err)
    );
    let other = shop.client().await;
    other
        .simple_query(&insert(&k0))
        .await
        .expect("the other shard's write while shard 1 is down");

    shop.shards[1].primary.start_again();
    eventually_async(SETTLE, "a write to the restarted primary", || async {
        match common::try_connect(&shop.url()).await {
            Ok(c) => c.simple_query(&insert(&k1)).await.is_ok(),
            Err(_) => false,
        }
    });
    let rows = [
        Row::new(k1.clone(), "1.00"),
        Row::new(k0, "1.00"),
        Row::new(k1, "1.00"),
    ];
    assert_no_problems(
        "after recovery",
        &shop.check_placement(&ORDERS, &rows).await,
    );
}
