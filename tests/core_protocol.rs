//! The PostgreSQL protocol through Weir in transaction mode: simple and extended queries,
//! pipelining, COPY in both directions, errors inside transactions, clients that vanish
//! mid-transaction or mid-COPY, and per-client session parameters on shared servers.

#[path = "core_support.rs"]
mod support;

use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, TryStreamExt};
use support::common::{self, eventually, PgCluster, Weir};
use support::{
    app_cluster_and_weir, app_url, connect_with_task, count_activity, expect_sqlstate, first_value,
    kill_client, psql_ok, psql_via_weir, scalar,
};
use tokio_postgres::types::Type;
use tokio_postgres::SimpleQueryMessage;

/// A cluster and a Weir in front of it with a pool of `pool_size` and no reserve.
fn cluster_and_weir(pool_size: usize) -> (PgCluster, Weir) {
    app_cluster_and_weir(&format!(
        "default_pool_size = {pool_size}\nreserve_pool_size = 0\nquery_wait_timeout = 5"
    ))
}

/// Rows of a simple-query result as text (NULL as ""), one Vec per row.
fn rows(messages: &[SimpleQueryMessage]) -> Vec<Vec<String>> {
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).unwrap_or("").to_string())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// Row counts of the CommandComplete messages of a simple-query result.
fn completions(messages: &[SimpleQueryMessage]) -> Vec<u64> {
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .collect()
}

/// Backends of database `app` idle inside a transaction.
fn idle_in_transaction(cluster: &PgCluster) -> usize {
    count_activity(cluster, "app", "state LIKE 'idle in transaction%'")
}

/// The checks a client runs to see that the server it got carries nothing of an earlier
/// client's transaction: outside a transaction `now()` is this statement's start.
async fn assert_outside_transaction(client: &tokio_postgres::Client) {
    assert_eq!(
        scalar(client, "SELECT now() = statement_timestamp()").await,
        "t",
        "the server is still inside an earlier transaction"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_protocol_multi_statement_error_and_empty_query() {
    let (_cluster, weir) = cluster_and_weir(2);
    let client = common::connect(&app_url(&weir)).await;

    let out = client
        .simple_query("SELECT 1; SELECT 'two', 3; VALUES (4), (5)")
        .await
        .expect("multi-statement query");
    assert_eq!(
        rows(&out),
        vec![vec!["1"], vec!["two", "3"], vec!["4"], vec!["5"]]
    );
    assert_eq!(completions(&out), vec![1, 1, 2]);

    let err = expect_sqlstate(client.simple_query("SELECT 1/0").await, "22012", "1/0");
    assert_eq!(support::db_message(&err), "division by zero");
    // An error in the middle of a multi-statement query ends it there.
    expect_sqlstate(
        client.simple_query("SELECT 1; SELECT 1/0; SELECT 3").await,
        "22012",
        "error inside a multi-statement query",
    );
    assert_eq!(
        scalar(&client, "SELECT 'after errors'").await,
        "after errors"
    );

    for empty in ["", ";", "-- only a comment"] {
        let out = client.simple_query(empty).await.expect("empty query");
        assert!(rows(&out).is_empty(), "{empty:?} returned rows");
        assert_eq!(
            completions(&out),
            vec![0],
            "{empty:?}: one EmptyQueryResponse"
        );
    }
    assert_outside_transaction(&client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_parameters_and_unnamed_statements() {
    let (_cluster, weir) = cluster_and_weir(2);
    let client = common::connect(&app_url(&weir)).await;

    // query_typed: Parse (unnamed), Bind, Describe, Execute, Sync in one round trip.
    let row = client
        .query_typed_one(
            "SELECT $1::int4 + $2::int4, $3::text, $4::text IS NULL",
            &[
                (&20i32, Type::INT4),
                (&22i32, Type::INT4),
                (&"héllo", Type::TEXT),
                (&None::<&str>, Type::TEXT),
            ],
        )
        .await
        .expect("query_typed with parameters");
    assert_eq!(row.get::<_, i32>(0), 42);
    assert_eq!(row.get::<_, &str>(1), "héllo");
    assert!(row.get::<_, bool>(2));

    let rows = client
        .query_typed(
            "SELECT g FROM generate_series(1, $1::int4) g",
            &[(&1000i32, Type::INT4)],
        )
        .await
        .expect("many rows");
    assert_eq!(rows.len(), 1000);
    assert_eq!(rows[999].get::<_, i32>(0), 1000);

    expect_sqlstate(
        client
            .query_typed("SELECT 1 / $1::int4", &[(&0i32, Type::INT4)])
            .await,
        "22012",
        "extended-protocol error",
    );
    expect_sqlstate(
        client.query_typed("SELECT FROM nowhere_at_all", &[]).await,
        "42P01",
        "error at Parse",
    );

    // A named statement prepared and executed inside one transaction (one server).
    let mut client = client;
    let tx = client.transaction().await.expect("BEGIN");
    let statement = tx.prepare("SELECT $1::int8 * 2").await.expect("prepare");
    for n in [1i64, 21, 500] {
        let row = tx.query_one(&statement, &[&n]).await.expect("execute");
        assert_eq!(row.get::<_, i64>(0), n * 2);
    }
    tx.commit().await.expect("COMMIT");
    assert_outside_transaction(&client).await;
}

/// One client's pipeline: tokio-postgres writes concurrent requests back to back (each ending
/// in Sync) without waiting for answers. Request 100 fails and must fail alone. Returns
/// (request number, value sent, result) for each.
async fn pipeline(
    client: &tokio_postgres::Client,
    offset: i32,
) -> Vec<(
    i32,
    i32,
    Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>,
)> {
    let requests = (0..200i32).map(|i| async move {
        let value = offset + i;
        let sql = if i == 100 {
            "SELECT 1 / ($1::int4 - $1::int4)"
        } else {
            "SELECT $1::int4"
        };
        (
            i,
            value,
            client.query_typed(sql, &[(&value, Type::INT4)]).await,
        )
    });
    futures_util::future::join_all(requests).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_queries_get_their_own_answers_in_order() {
    let (_cluster, weir) = cluster_and_weir(1);
    let first = common::connect(&app_url(&weir)).await;
    let second = common::connect(&app_url(&weir)).await;

    // Two clients share the one server, so Weir hands it back and forth between Syncs.
    let (a, b) = tokio::join!(pipeline(&first, 0), pipeline(&second, 10_000));
    for (i, value, result) in a.into_iter().chain(b) {
        if i == 100 {
            expect_sqlstate(result, "22012", "the failing request of the pipeline");
        } else {
            let rows = result.unwrap_or_else(|e| {
                panic!("pipelined request {i}: {}", common::describe_error(&e))
            });
            assert_eq!(rows[0].get::<_, i32>(0), value, "answer to request {i}");
        }
    }
    assert_outside_transaction(&first).await;
    assert_outside_transaction(&second).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_of_50k_rows() {
    const ROWS: usize = 50_000;
    let (_cluster, weir) = cluster_and_weir(2);
    let mut client = common::connect(&app_url(&weir)).await;
    client
        .simple_query("CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL)")
        .await
        .expect("create table");

    // tokio-postgres prepares COPY as a named statement: keep both steps on one server.
    let tx = client.transaction().await.expect("BEGIN");
    let sink = tx
        .copy_in("COPY items (id, name) FROM STDIN")
        .await
        .expect("COPY FROM STDIN");
    let mut sink = std::pin::pin!(sink);
    for chunk in (0..ROWS).collect::<Vec<_>>().chunks(1000) {
        let mut data = String::new();
        for id in chunk {
            writeln!(data, "{id}\titem number {id}").unwrap();
        }
        sink.send(Bytes::from(data)).await.expect("send COPY data");
    }
    assert_eq!(sink.finish().await.expect("finish COPY"), ROWS as u64);
    tx.commit().await.expect("COMMIT");
    assert_eq!(
        scalar(&client, "SELECT count(*) || ' ' || sum(id) FROM items").await,
        format!("{ROWS} {}", ROWS * (ROWS - 1) / 2)
    );

    let tx = client.transaction().await.expect("BEGIN");
    let stream = tx
        .copy_out("COPY (SELECT id, name FROM items ORDER BY id) TO STDOUT")
        .await
        .expect("COPY TO STDOUT");
    let chunks: Vec<Bytes> = stream.try_collect().await.expect("COPY data");
    tx.commit().await.expect("COMMIT");
    let text = String::from_utf8(chunks.concat()).expect("UTF-8 COPY output");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), ROWS);
    assert_eq!(lines[0], "0\titem number 0");
    assert_eq!(
        lines[ROWS - 1],
        format!("{}\titem number {}", ROWS - 1, ROWS - 1)
    );
    assert_outside_transaction(&client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_copy_round_trips_through_weir() {
    let (_cluster, weir) = cluster_and_weir(2);
    let client = common::connect(&app_url(&weir)).await;
    client
        .simple_query("CREATE TABLE notes (id int, body text)")
        .await
        .expect("create table");
    let files = tempfile::tempdir().expect("temp dir");
    let source = files.path().join("in.tsv");
    let target = files.path().join("out.tsv");
    let data: String = (0..20_000)
        .map(|i| format!("{i}\tnote {i} with a tab-free body\n"))
        .collect();
    std::fs::write(&source, &data).expect("write COPY input");

    let copy_in = format!("\\copy notes FROM '{}'", source.display());
    let psql = |command: &str| {
        let out = psql_via_weir(
            &weir,
            "app",
            Some(support::APP_PASSWORD),
            "app",
            &["-c", command],
        );
        psql_ok(&out, command);
    };
    psql(&copy_in);
    let copy_out = format!(
        "\\copy (SELECT * FROM notes ORDER BY id) TO '{}'",
        target.display()
    );
    psql(&copy_out);

    assert_eq!(std::fs::read_to_string(&target).expect("COPY output"), data);
    assert_eq!(scalar(&client, "SELECT count(*) FROM notes").await, "20000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_copy_leaves_connection_and_server_usable() {
    let (cluster, weir) = cluster_and_weir(1);
    let client = common::connect(&app_url(&weir)).await;
    client
        .simple_query("CREATE TABLE numbers (n int)")
        .await
        .expect("create table");

    // Bad data: the server rejects the COPY when the bad line arrives or at the end.
    let sink = client
        .copy_in("COPY numbers FROM STDIN")
        .await
        .expect("COPY FROM STDIN");
    let mut sink = std::pin::pin!(sink);
    let sent = sink
        .send(Bytes::from_static(b"1\n2\nnot a number\n3\n"))
        .await;
    let result = match sent {
        Ok(()) => sink.finish().await,
        Err(e) => Err(e),
    };
    expect_sqlstate(result, "22P02", "COPY with bad data");
    assert_eq!(scalar(&client, "SELECT count(*) FROM numbers").await, "0");

    // The client gives up half-way: tokio-postgres sends CopyFail when the sink is dropped.
    let sink = client
        .copy_in::<_, Bytes>("COPY numbers FROM STDIN")
        .await
        .expect("COPY FROM STDIN");
    drop(sink);
    assert_eq!(scalar(&client, "SELECT count(*) FROM numbers").await, "0");

    // The one server is clean for another client.
    let other = common::connect(&app_url(&weir)).await;
    assert_eq!(scalar(&other, "SELECT count(*) FROM numbers").await, "0");
    assert_outside_transaction(&other).await;
    assert_eq!(idle_in_transaction(&cluster), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_inside_transaction_aborts_it_until_rollback() {
    let (cluster, weir) = cluster_and_weir(1);
    let client = common::connect(&app_url(&weir)).await;
    let other = common::connect(&app_url(&weir)).await;

    for end in ["ROLLBACK", "COMMIT"] {
        client.simple_query("BEGIN").await.expect("BEGIN");
        expect_sqlstate(client.simple_query("SELECT 1/0").await, "22012", "1/0");
        expect_sqlstate(
            client.simple_query("SELECT 1").await,
            "25P02",
            "query in an aborted transaction",
        );
        // COMMIT of an aborted transaction rolls it back, as ROLLBACK does.
        client.simple_query(end).await.expect(end);
        assert_eq!(scalar(&client, "SELECT 'works again'").await, "works again");
        assert_outside_transaction(&client).await;
        // The same (only) server now serves the other client, outside any transaction.
        assert_outside_transaction(&other).await;
    }
    assert_eq!(idle_in_transaction(&cluster), 0);
}

/// A pool of one in front of a cluster with an empty table `marker (n int)`.
async fn cluster_with_marker_table() -> (PgCluster, Weir) {
    let (cluster, weir) = cluster_and_weir(1);
    let setup = common::connect(&app_url(&weir)).await;
    setup
        .simple_query("CREATE TABLE marker (n int)")
        .await
        .expect("create table");
    (cluster, weir)
}

/// After a client vanished holding the only server, the next client gets that server (or a
/// new one) with nothing left over: none of the vanished client's rows, no open transaction,
/// and a transaction of its own commits normally.
async fn assert_next_client_starts_clean(cluster: &PgCluster, weir: &Weir) {
    let next = common::connect(&app_url(weir)).await;
    assert_eq!(scalar(&next, "SELECT count(*) FROM marker").await, "0");
    assert_outside_transaction(&next).await;
    for sql in ["BEGIN", "INSERT INTO marker VALUES (42)", "COMMIT"] {
        next.simple_query(sql).await.expect(sql);
    }
    assert_eq!(
        scalar(&next, "SELECT string_agg(n::text, ',') FROM marker").await,
        "42"
    );
    eventually(
        Duration::from_secs(5),
        "no backend idle in transaction",
        || idle_in_transaction(cluster) == 0,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_killed_inside_transaction_leaves_no_open_transaction() {
    let (cluster, weir) = cluster_with_marker_table().await;

    let (victim, connection) = connect_with_task(&app_url(&weir)).await;
    victim.simple_query("BEGIN").await.expect("BEGIN");
    victim
        .simple_query("INSERT INTO marker VALUES (1)")
        .await
        .expect("uncommitted insert");
    assert_eq!(idle_in_transaction(&cluster), 1);
    kill_client(connection).await;

    assert_next_client_starts_clean(&cluster, &weir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_killed_during_copy_in_leaves_no_open_copy() {
    let (cluster, weir) = cluster_with_marker_table().await;

    let (victim, connection) = connect_with_task(&app_url(&weir)).await;
    let sink = victim
        .copy_in("COPY marker FROM STDIN")
        .await
        .expect("COPY FROM STDIN");
    let mut sink = std::pin::pin!(sink);
    sink.send(Bytes::from_static(b"1\n2\n3\n"))
        .await
        .expect("send COPY data");
    let copying = "state = 'active' AND query LIKE 'COPY marker%'";
    eventually(Duration::from_secs(5), "the COPY to run", || {
        count_activity(&cluster, "app", copying) == 1
    });
    kill_client(connection).await;

    assert_next_client_starts_clean(&cluster, &weir).await;
    eventually(Duration::from_secs(5), "the abandoned COPY to end", || {
        count_activity(&cluster, "app", copying) == 0
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_stay_with_their_client_on_a_shared_server() {
    let (cluster, weir) = cluster_and_weir(1);
    let url = |app: &str, zone: &str| {
        format!(
            "{} application_name={app} options='-c TimeZone={zone}'",
            app_url(&weir)
        )
    };
    let new_york = common::connect(&url("alpha", "America/New_York")).await;
    let tokyo = common::connect(&url("beta", "Asia/Tokyo")).await;

    // One server, used in turn: each client sees its own settings every time.
    for _ in 0..3 {
        assert_eq!(scalar(&new_york, "SHOW TimeZone").await, "America/New_York");
        assert_eq!(scalar(&new_york, "SHOW application_name").await, "alpha");
        assert_eq!(scalar(&tokyo, "SHOW TimeZone").await, "Asia/Tokyo");
        assert_eq!(scalar(&tokyo, "SHOW application_name").await, "beta");
    }

    // A SET outside a transaction sticks to the client that ran it, and only to it.
    tokyo
        .simple_query("SET TimeZone = 'UTC'")
        .await
        .expect("SET TimeZone");
    assert_eq!(scalar(&new_york, "SHOW TimeZone").await, "America/New_York");
    assert_eq!(scalar(&tokyo, "SHOW TimeZone").await, "UTC");
    let in_transaction = new_york
        .simple_query("BEGIN; SHOW TimeZone; COMMIT")
        .await
        .expect("SHOW inside a transaction");
    assert_eq!(
        first_value(&in_transaction).as_deref(),
        Some("America/New_York")
    );
    assert_eq!(scalar(&tokyo, "SHOW TimeZone").await, "UTC");

    // A plain client gets the server's defaults, not a previous client's settings.
    let plain = common::connect(&app_url(&weir)).await;
    assert_eq!(scalar(&plain, "SHOW application_name").await, "");
    assert_eq!(
        scalar(&plain, "SHOW TimeZone").await,
        cluster.psql("app", "SHOW TimeZone")
    );
}
