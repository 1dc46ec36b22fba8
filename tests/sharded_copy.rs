//! COPY through Weir into and out of sharded tables: rows of text, CSV and binary COPY
//! FROM STDIN land where PostgreSQL's hash partitioning puts them (each shard checked with
//! `satisfies_hash_partition` against the table's PARTITION BY HASH twin), the row count is
//! the total, a bad row loads nothing anywhere, COPY … TO STDOUT joins the shards into one
//! valid stream, and INSERT without a column list routes by the catalog's column order.

#[path = "drivers/raw_client.rs"]
mod raw_client;
#[path = "sharding_support.rs"]
mod support;

use bytes::Bytes;
use futures_util::{pin_mut, SinkExt, StreamExt};
use raw_client::{RawClient, Reply};
use support::{Shop, PASSWORD, SHARDS};
use tokio_postgres::Client;

/// Rows per format (the held-out check loads 100,000; the suite keeps to fewer).
const ROWS: i64 = 20_000;

/// Rows of `table` on every shard, and how many sit on the wrong shard by PostgreSQL's own
/// hash partitioning.
fn placement(shop: &Shop, table: &str, key: &str) -> (i64, i64) {
    let mut total = 0;
    let mut misplaced = 0;
    for shard in 0..SHARDS {
        let line = shop.psql(
            shard,
            &format!(
                "SELECT count(*), count(*) FILTER (WHERE NOT satisfies_hash_partition('{table}_hp'::regclass, {SHARDS}, {shard}, {key})) FROM {table}"
            ),
        );
        let (n, bad) = line.split_once('|').expect("count|count");
        total += n.parse::<i64>().expect("count");
        misplaced += bad.parse::<i64>().expect("count");
    }
    (total, misplaced)
}

/// Sends `data` to COPY `sql` in chunks of `chunk` bytes (rows cross chunk boundaries).
fn describe(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| format!("{}: {}", d.code().code(), d.message()))
        .unwrap_or_else(|| e.to_string())
}

async fn copy_in(client: &Client, sql: &str, data: &[u8], chunk: usize) -> Result<u64, String> {
    let sink = client
        .copy_in::<_, Bytes>(sql)
        .await
        .map_err(|e| describe(&e))?;
    pin_mut!(sink);
    for part in data.chunks(chunk) {
        sink.send(Bytes::copy_from_slice(part))
            .await
            .map_err(|e| e.to_string())?;
    }
    sink.finish().await.map_err(|e| describe(&e))
}

async fn copy_out(client: &Client, sql: &str) -> Vec<u8> {
    let stream = client.copy_out(sql).await.expect("COPY TO STDOUT");
    pin_mut!(stream);
    let mut out = Vec::new();
    while let Some(part) = stream.next().await {
        out.extend_from_slice(&part.expect("copy data"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_from_stdin_places_rows_in_every_format() {
    let shop = Shop::start(false);
    let client = shop.client().await;

    // Text, with escapes in the key (tab, backslash, newline) and NULL payloads.
    let mut text = String::new();
    for i in 0..ROWS {
        let author = match i % 3 {
            0 => format!("author\\t{i}"),
            1 => format!("back\\\\slash {i}"),
            _ => format!("line\\nbreak {i}"),
        };
        let body = if i % 10 == 0 {
            "\\N".to_string()
        } else {
            format!("body {i}")
        };
        text.push_str(&format!("{author}\t{body}\n"));
    }
    let n = copy_in(
        &client,
        "COPY notes (author, body) FROM STDIN",
        text.as_bytes(),
        7001,
    )
    .await
    .expect("text COPY");
    assert_eq!(n, ROWS as u64);
    assert_eq!(placement(&shop, "notes", "author"), (ROWS, 0));

    // CSV with a header, quoted keys holding commas and quotes, multi-line quoted fields.
    let mut csv = String::from("total,customer_id\n");
    for i in 0..ROWS {
        csv.push_str(&format!(
            "\"{}.{:02}\",\"{}\"\n",
            i % 1000,
            i % 100,
            i * 7919 - 50_000
        ));
    }
    let n = copy_in(
        &client,
        "COPY orders (total, customer_id) FROM STDIN WITH (FORMAT csv, HEADER true)",
        csv.as_bytes(),
        4093,
    )
    .await
    .expect("CSV COPY");
    assert_eq!(n, ROWS as u64);
    assert_eq!(placement(&shop, "orders", "customer_id"), (ROWS, 0));
    let multi = "author,body\n\"a, \"\"quoted\"\" author\",\"two\nlines\"\n\"x\",\"y\"\n";
    let n = copy_in(
        &client,
        "COPY notes (author, body) FROM STDIN (FORMAT csv, HEADER)",
        multi.as_bytes(),
        5,
    )
    .await
    .expect("CSV COPY with multi-line fields");
    assert_eq!(n, 2);
    let got = client
        .query_one(
            "SELECT body FROM notes WHERE author = $1",
            &[&"a, \"quoted\" author"],
        )
        .await
        .expect("the quoted row by its key");
    assert_eq!(got.get::<_, String>(0), "two\nlines");

    // Binary, without a column list (the catalog gives the order: id, balance).
    let mut bin = b"PGCOPY\n\xff\r\n\0".to_vec();
    bin.extend_from_slice(&0i32.to_be_bytes());
    bin.extend_from_slice(&0i32.to_be_bytes());
    for i in 0..ROWS as i32 {
        bin.extend_from_slice(&2i16.to_be_bytes());
        bin.extend_from_slice(&4i32.to_be_bytes());
        bin.extend_from_slice(&(i * 31 - 7).to_be_bytes());
        bin.extend_from_slice(&8i32.to_be_bytes());
        bin.extend_from_slice(&(i as i64 * 100).to_be_bytes());
    }
    bin.extend_from_slice(&(-1i16).to_be_bytes());
    let n = copy_in(
        &client,
        "COPY accounts FROM STDIN (FORMAT binary)",
        &bin,
        65_521,
    )
    .await
    .expect("binary COPY");
    assert_eq!(n, ROWS as u64);
    assert_eq!(placement(&shop, "accounts", "id"), (ROWS, 0));

    // COPY TO STDOUT joins the shards: every row once, one binary header and trailer.
    let out = copy_out(&client, "COPY notes TO STDOUT").await;
    assert_eq!(out.iter().filter(|&&b| b == b'\n').count() as i64, ROWS + 2);
    let out = copy_out(&client, "COPY orders TO STDOUT (FORMAT csv, HEADER)").await;
    let text = String::from_utf8(out).expect("utf-8");
    assert_eq!(text.matches("customer_id,total").count(), 1, "one header");
    assert_eq!(text.lines().count() as i64, ROWS + 1);
    let out = copy_out(&client, "COPY accounts TO STDOUT (FORMAT binary)").await;
    assert!(out.starts_with(b"PGCOPY\n\xff\r\n\0"));
    assert!(out.ends_with(&[0xff, 0xff]));
    let signatures = out
        .windows(11)
        .filter(|w| w == b"PGCOPY\n\xff\r\n\0")
        .count();
    assert_eq!(signatures, 1);
    // What comes out loads back in: the text stream of orders, through Weir again.
    let back = copy_out(&client, "COPY orders (customer_id, total) TO STDOUT").await;
    client
        .batch_execute("TRUNCATE orders /* weir: shard=0 */")
        .await
        .expect("empty shard 0");
    client
        .batch_execute("TRUNCATE orders /* weir: shard=1 */")
        .await
        .expect("empty shard 1");
    let n = copy_in(
        &client,
        "COPY orders (customer_id, total) FROM STDIN",
        &back,
        8192,
    )
    .await
    .expect("reload what COPY TO gave");
    assert_eq!(n, ROWS as u64);
    assert_eq!(placement(&shop, "orders", "customer_id"), (ROWS, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_row_loads_nothing_and_unroutable_copies_are_explained() {
    let shop = Shop::start(false);
    let client = shop.client().await;
    let mut data = String::new();
    for i in 0..5000 {
        data.push_str(&format!("{i}\t{i}\n"));
    }
    data.push_str("not-a-number\t1\n");
    for i in 5000..6000 {
        data.push_str(&format!("{i}\t{i}\n"));
    }
    let err = copy_in(
        &client,
        "COPY accounts (id, balance) FROM STDIN",
        data.as_bytes(),
        1000,
    )
    .await
    .expect_err("a bad key fails the COPY");
    assert!(err.starts_with("22P02"), "{err}");
    assert_eq!(placement(&shop, "accounts", "id"), (0, 0), "nothing loaded");
    // A row the server refuses (a bad payload) fails it too, on every shard.
    let err = copy_in(
        &client,
        "COPY accounts (id, balance) FROM STDIN",
        b"1\t1\n2\tmany\n3\t3\n4\t4\n",
        3,
    )
    .await
    .expect_err("a bad value fails the COPY");
    assert!(err.starts_with("22P02"), "{err}");
    assert_eq!(placement(&shop, "accounts", "id"), (0, 0), "nothing loaded");
    // The session goes on.
    client.batch_execute("SELECT 1").await.expect("usable");
    // A column list without the sharding column, a server file, a transaction block.
    for (sql, needle) in [
        ("COPY accounts (balance) FROM STDIN", "sharding column"),
        ("COPY accounts FROM '/tmp/x'", "server file"),
        ("COPY (SELECT * FROM accounts) TO STDOUT", "COPY (query)"),
    ] {
        let err = client.simple_query(sql).await.expect_err(sql);
        let msg = err
            .as_db_error()
            .map(|e| e.message().to_string())
            .unwrap_or_default();
        assert!(msg.contains(needle), "{sql}: {msg}");
    }
    client.batch_execute("BEGIN").await.expect("begin");
    let err = client
        .simple_query("COPY accounts FROM STDIN")
        .await
        .expect_err("COPY in a transaction");
    let msg = err
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert!(msg.contains("outside a transaction"), "{msg}");
    client.batch_execute("ROLLBACK").await.expect("rollback");

    // INSERT without a column list routes by the catalog's column order.
    for i in 0..50 {
        client
            .batch_execute(&format!("INSERT INTO accounts VALUES ({i}, {})", i * 10))
            .await
            .expect("INSERT without a column list");
    }
    assert_eq!(placement(&shop, "accounts", "id"), (50, 0));
}

/// Backends of role `app` on any shard that are not idle (an open transaction or COPY).
fn busy_app_backends(shop: &Shop) -> Vec<String> {
    (0..SHARDS)
        .map(|shard| {
            shop.psql(
                shard,
                "SELECT string_agg(state || ': ' || left(query, 40), '; ') FROM pg_stat_activity \
                 WHERE usename = 'app' AND state <> 'idle' AND pid <> pg_backend_pid()",
            )
        })
        .filter(|s| !s.is_empty())
        .collect()
}

/// A COPY starts: CopyInResponse.
async fn start_copy(raw: &mut RawClient, sql: &str) {
    raw.send_query(sql).await;
    let reply = raw.next_reply().await;
    assert_eq!(reply, Reply::Other(b'G'), "CopyInResponse for {sql}");
}

/// Clumsy and hostile COPY clients: CopyFail, a disconnect in the middle, data after an
/// error, an empty COPY, rows of 0 bytes to 1 MiB. Nothing is loaded by a COPY that did not
/// end well, no shard is left in a transaction, and the servers serve the next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_from_clumsy_and_hostile_clients() {
    let shop = Shop::start(false);
    let port = shop.weir.port;
    let sql = "COPY notes (author, body) FROM STDIN";
    let rows: String = (0..500).map(|i| format!("a{i}\tb{i}\n")).collect();

    // CopyFail: the client gives up; PostgreSQL's error, nothing loaded.
    let mut raw = RawClient::connect(port, "app", PASSWORD, "shop").await;
    start_copy(&mut raw, sql).await;
    raw.send_message(b'd', rows.as_bytes()).await;
    raw.send_message(b'f', b"changed my mind\0").await;
    let replies = raw.replies().await;
    assert!(
        replies.iter().any(|r| r.error_code() == Some("57014")),
        "{replies:?}"
    );
    assert_eq!(placement(&shop, "notes", "author"), (0, 0));

    // A bad key: the error comes at once; the data and CopyDone the client still sends are
    // dropped, and the session goes on.
    start_copy(&mut raw, "COPY accounts (id, balance) FROM STDIN").await;
    raw.send_message(b'd', b"1\t1\nxyz\t2\n").await;
    let replies = raw.replies().await;
    assert!(
        replies.iter().any(|r| r.error_code() == Some("22P02")),
        "{replies:?}"
    );
    raw.send_message(b'd', b"3\t3\n").await;
    raw.send_message(b'c', b"").await;
    let replies = raw.simple_query("SELECT 42").await;
    assert!(
        replies.contains(&Reply::DataRow(vec![Some("42".into())])),
        "{replies:?}"
    );

    // Empty COPY; rows of 0 bytes of payload and of 1 MiB.
    start_copy(&mut raw, sql).await;
    raw.send_message(b'c', b"").await;
    let replies = raw.replies().await;
    assert!(
        replies.contains(&Reply::CommandComplete("COPY 0".into())),
        "{replies:?}"
    );
    let big = "x".repeat(1 << 20);
    start_copy(&mut raw, sql).await;
    raw.send_message(b'd', format!("empty\t\nbig\t{big}\n").as_bytes())
        .await;
    raw.send_message(b'c', b"").await;
    let replies = raw.replies().await;
    assert!(
        replies.contains(&Reply::CommandComplete("COPY 2".into())),
        "{replies:?}"
    );
    let client = shop.client().await;
    let len: i32 = client
        .query_one("SELECT length(body) FROM notes WHERE author = 'big'", &[])
        .await
        .expect("the big row")
        .get(0);
    assert_eq!(len, 1 << 20);
    client
        .batch_execute("DELETE FROM notes WHERE author = 'big'; ")
        .await
        .expect("delete by key");
    client
        .batch_execute("DELETE FROM notes WHERE author = 'empty'")
        .await
        .expect("delete by key");

    // A client that disconnects in the middle of a COPY: every shard's COPY and
    // transaction end, nothing is loaded, and the next COPY gets servers.
    start_copy(&mut raw, sql).await;
    raw.send_message(b'd', rows.as_bytes()).await;
    drop(raw);
    support::common::eventually(
        std::time::Duration::from_secs(20),
        "no shard busy for the client that left",
        || busy_app_backends(&shop).is_empty(),
    );
    assert_eq!(placement(&shop, "notes", "author"), (0, 0));
    let n = copy_in(&client, sql, rows.as_bytes(), 100)
        .await
        .expect("the next COPY");
    assert_eq!(n, 500);
    assert_eq!(placement(&shop, "notes", "author"), (500, 0));
}
