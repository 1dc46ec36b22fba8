//! Read-your-writes on replicas that lag on purpose: two shards, each a primary and a streaming
//! replica with `recovery_min_apply_delay`, so a replica does not show a commit for a while.
//!
//! - `read_your_writes = "client"` (the default): after a client's write on a shard, that
//!   client's reads of the shard (by key and fanned out) see the write at once, while other
//!   clients keep reading from the replica; once the replica has replayed the write, the
//!   writer's reads go back to it.
//! - `read_your_writes = false` is the control: reads right after a write are stale, which
//!   shows the apply delay makes the other tests meaningful.
//! - `read_your_writes = "global"`: every client's reads see any client's committed writes.
//! - `max_replica_lag`: a replica further behind gets no reads; nor does a promoted one.
//!
//! Fixtures (the schema, keys, Weir's config) are in sharding_support.rs.

#[path = "sharding_support.rs"]
mod support;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::common::{self, PgCluster, Weir};
use support::{
    assert_no_problems, insert_literals, schema, simple, simple_count, weir_config_with, Key, Row,
    Shard, Shop, ORDERS, PASSWORD, SHARDS,
};
use tokio_postgres::{Client, SimpleQueryMessage, SimpleQueryRow};

/// How long replication and the sampler get to catch up.
const SETTLE: Duration = Duration::from_secs(20);
/// How often a wait polls.
const POLL: Duration = Duration::from_millis(20);
/// How long each replica holds back a commit: ample time to read right after a write.
const APPLY_DELAY: &str = "400ms";

// ---------------------------------------------------------------------------------------------
// Topology
// ---------------------------------------------------------------------------------------------

/// Two shards with one replica each, every replica delaying commits by `apply_delay`, behind a
/// Weir whose `[databases.shop]` section gets `database` (lines) added and whose console
/// admits `app`.
fn start_shop(apply_delay: &str, database: &str) -> Shop {
    let starts: Vec<_> = (0..SHARDS)
        .map(|_| {
            let delay = apply_delay.to_string();
            std::thread::spawn(move || start_shard(&delay))
        })
        .collect();
    let shards: Vec<Shard> = starts
        .into_iter()
        .map(|t| t.join().expect("shard start"))
        .collect();
    // weir_config_with ends inside [databases.shop], so appended keys belong to it.
    let config = format!(
        "{}{database}",
        weir_config_with(&shards, "admin_users = [\"app\"]")
    );
    let weir = Weir::start(&config);
    Shop { shards, weir }
}

/// A primary with the `shop` schema and a replica that applies commits `apply_delay` late.
fn start_shard(apply_delay: &str) -> Shard {
    let primary = PgCluster::start();
    primary.create_user("app", PASSWORD, "scram-sha-256");
    primary.create_database("shop", "app");
    primary.psql("shop", &schema());
    // The replica copies postgresql.conf, so it starts with the delay; a primary ignores it.
    primary.append_conf(&[format!("recovery_min_apply_delay = '{apply_delay}'")]);
    // pg_basebackup starts with a spread checkpoint; an immediate one leaves it nothing to do.
    primary.psql("postgres", "CHECKPOINT");
    let replica = primary.start_replica();
    let delay = replica.psql("postgres", "SHOW recovery_min_apply_delay");
    assert_ne!(delay, "0", "the replica has no apply delay");
    Shard {
        primary,
        replica: Some(replica),
    }
}

/// The `n`th (from 0) positive bigint key on `shard`.
fn key_on(shard: usize, n: usize) -> i64 {
    (1..)
        .filter(|&k| Key::Bigint(k).shard() == shard)
        .nth(n)
        .expect("a key")
}

// ---------------------------------------------------------------------------------------------
// Reads
// ---------------------------------------------------------------------------------------------

/// A read of `orders` by key through Weir: which server answered, how many rows the key has
/// there, and their largest total.
#[derive(Clone, Debug, PartialEq, Eq)]
struct KeyRead {
    port: u16,
    rows: u64,
    total: Option<String>,
}

async fn read_key(client: &Client, key: i64) -> Result<KeyRead, String> {
    let sql = format!(
        "SELECT inet_server_port(), count(*), max(total)::text FROM orders WHERE customer_id = {key}"
    );
    let rows = simple(client, &sql)
        .await
        .map_err(|e| format!("{sql}: {e}"))?;
    let text = |v: &Option<String>| v.clone().unwrap_or_default();
    match rows.as_slice() {
        [r] => match (text(&r[0]).parse(), text(&r[1]).parse()) {
            (Ok(port), Ok(rows)) => Ok(KeyRead {
                port,
                rows,
                total: r[2].clone(),
            }),
            _ => Err(format!("{sql}: unexpected row {r:?}")),
        },
        other => Err(format!("{sql}: expected one row, got {other:?}")),
    }
}

/// `read_key` that panics on an error.
async fn must_read_key(client: &Client, key: i64) -> KeyRead {
    read_key(client, key)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Polls `check` until it gives a value; after SETTLE panics naming `what` and what `check`
/// saw last.
async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + SETTLE;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) => assert!(
                Instant::now() < deadline,
                "timed out after {SETTLE:?} waiting for {what}; last: {last}"
            ),
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A read of `key` that `port` served (and that `ok` accepts), or what was read instead.
async fn read_on(
    shop: &Shop,
    client: &Client,
    key: i64,
    port: u16,
    ok: impl Fn(&KeyRead) -> bool,
) -> Result<KeyRead, String> {
    let r = read_key(client, key).await?;
    if r.port == port && ok(&r) {
        Ok(r)
    } else {
        Err(format!(
            "key {key} read as {r:?} from {}",
            shop.describe_port(r.port)
        ))
    }
}

/// Once every replica streams (is within max_replica_lag and takes reads).
async fn replicas_streaming(console: &Client) -> Result<(), String> {
    let rows = show_replication(console).await;
    if rows
        .iter()
        .all(|r| r.state == "primary" || r.state == "streaming")
    {
        Ok(())
    } else {
        Err(format!("SHOW REPLICATION {rows:?}"))
    }
}

/// Runs a write that must affect `n` rows.
async fn write(client: &Client, sql: &str, n: u64) {
    match simple_count(client, sql).await {
        Ok(got) => assert_eq!(got, n, "{sql}: rows affected"),
        Err(e) => panic!("{sql}: {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The admin console
// ---------------------------------------------------------------------------------------------

async fn console(shop: &Shop) -> Client {
    common::connect(&shop.weir.url("app", PASSWORD, "pgbouncer")).await
}

async fn console_rows(console: &Client, sql: &str) -> Vec<SimpleQueryRow> {
    console
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", common::describe_error(&e)))
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .collect()
}

/// One row of SHOW REPLICATION, the columns this file looks at.
#[derive(Clone, Debug)]
struct Replication {
    shard: usize,
    role: String,
    replica: Option<String>,
    port: u16,
    lsn: Option<String>,
    lag_ms: Option<u64>,
    state: String,
    read_your_writes: String,
}

async fn show_replication(console: &Client) -> Vec<Replication> {
    let col = |r: &SimpleQueryRow, name: &str| r.get(name).map(str::to_string);
    console_rows(console, "SHOW REPLICATION")
        .await
        .iter()
        .filter(|r| r.get("database") == Some("shop"))
        .map(|r| Replication {
            shard: col(r, "shard").and_then(|s| s.parse().ok()).expect("shard"),
            role: col(r, "role").unwrap_or_default(),
            replica: col(r, "replica"),
            port: col(r, "port").and_then(|s| s.parse().ok()).expect("port"),
            lsn: col(r, "lsn"),
            lag_ms: col(r, "lag_ms").and_then(|s| s.parse().ok()),
            state: col(r, "state").unwrap_or_default(),
            read_your_writes: col(r, "read_your_writes").unwrap_or_default(),
        })
        .collect()
}

/// The SHOW REPLICATION row of `shard`'s replica.
async fn replica_row(console: &Client, shard: usize) -> Replication {
    let rows = show_replication(console).await;
    rows.iter()
        .find(|r| r.shard == shard && r.role == "replica")
        .cloned()
        .unwrap_or_else(|| panic!("no replica of shard {shard} in SHOW REPLICATION: {rows:?}"))
}

/// Whether an lsn is PostgreSQL's `X/Y` in hex.
fn is_lsn(lsn: &str) -> bool {
    lsn.split_once('/').is_some_and(|(hi, lo)| {
        [hi, lo]
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_hexdigit()))
    })
}

/// Problems with SHOW REPLICATION and SHOW SHARDS once every replica streams: one row per
/// server, each replica "streaming", and the mode `mode` in both commands.
async fn console_problems(shop: &Shop, console: &Client, mode: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let rows = show_replication(console).await;
    if rows.len() != 2 * SHARDS {
        problems.push(format!(
            "SHOW REPLICATION: {} rows for shop, expected {}: {rows:?}",
            rows.len(),
            2 * SHARDS
        ));
    }
    for shard in 0..SHARDS {
        for (role, port, replica, state) in [
            ("primary", shop.primary_port(shard), None, "primary"),
            (
                "replica",
                shop.replica_port(shard),
                Some("0".to_string()),
                "streaming",
            ),
        ] {
            let Some(r) = rows.iter().find(|r| r.shard == shard && r.role == role) else {
                problems.push(format!("SHOW REPLICATION: no {role} of shard {shard}"));
                continue;
            };
            if r.port != port
                || r.replica != replica
                || r.state != state
                || r.read_your_writes != mode
                || !r.lsn.as_deref().is_some_and(is_lsn)
            {
                problems.push(format!(
                    "SHOW REPLICATION: {role} of shard {shard}: got {r:?}, expected port {port}, \
                     replica {replica:?}, state {state:?}, read_your_writes {mode:?}, an X/Y lsn"
                ));
            }
        }
    }
    for r in console_rows(console, "SHOW SHARDS").await {
        if r.get("database") == Some("shop") && r.get("read_your_writes") != Some(mode) {
            problems.push(format!(
                "SHOW SHARDS: shard {:?} {:?}: read_your_writes {:?}, expected {mode:?}",
                r.get("shard"),
                r.get("role"),
                r.get("read_your_writes")
            ));
        }
    }
    problems
}

// ---------------------------------------------------------------------------------------------
// Read your own writes
// ---------------------------------------------------------------------------------------------

/// Rows loaded in the first test, keys 1..=LOADED.
const LOADED: i64 = 1500;
/// The total the first test's UPDATE sets.
const NEW_TOTAL: &str = "99999.99";

/// What the writer of `own_writes_are_read_back_at_once` must read after loading
/// 1..=LOADED (total = key), setting `updated`'s total to NEW_TOTAL and deleting `deleted`
/// (= LOADED): each read, what it must return, and whether it is a read by key.
fn expected_reads(updated: i64, deleted: i64) -> Vec<(String, Vec<Vec<Option<String>>>)> {
    let one = |v: String| vec![vec![Some(v)]];
    let cents: i64 = (1..=LOADED).sum::<i64>() * 100 - deleted * 100 - updated * 100 + 9_999_999;
    let remaining = LOADED - 1;
    vec![
        (
            "SELECT count(*) FROM orders".to_string(),
            one(remaining.to_string()),
        ),
        (
            "SELECT sum(total) FROM orders".to_string(),
            one(format!("{}.{:02}", cents / 100, cents % 100)),
        ),
        (
            "SELECT min(customer_id), max(customer_id) FROM orders".to_string(),
            vec![vec![Some("1".to_string()), Some(remaining.to_string())]],
        ),
        (
            "SELECT customer_id FROM orders ORDER BY customer_id DESC LIMIT 5".to_string(),
            (0..5)
                .map(|i| vec![Some((remaining - i).to_string())])
                .collect(),
        ),
    ]
}

/// One client loads 1,500 rows over both shards, updates one and deletes another; at once
/// and until the replicas have replayed it all, its reads by key and its fanned-out reads
/// (count, sum, min/max, ORDER BY … LIMIT) show every write, although the replicas apply
/// commits 400 ms late. A second client, which wrote nothing, reads from the replicas
/// meanwhile; once they have caught up, the writer's key reads go back to them too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_writes_are_read_back_at_once() {
    let shop = start_shop(APPLY_DELAY, "");
    let writer = shop.client().await;
    let bystander = shop.client().await;
    let console = console(&shop).await;

    let deleted = LOADED;
    let deleted_shard = Key::Bigint(deleted).shard();
    let updated_shard = 1 - deleted_shard;
    let updated = key_on(updated_shard, 3);
    let rows: Vec<Row> = (1..=LOADED)
        .map(|k| Row::new(Key::Bigint(k), format!("{k}.00")))
        .collect();
    insert_literals(&writer, &ORDERS, &rows).await;
    write(
        &writer,
        &format!("UPDATE orders SET total = {NEW_TOTAL} WHERE customer_id = {updated}"),
        1,
    )
    .await;
    write(
        &writer,
        &format!("DELETE FROM orders WHERE customer_id = {deleted}"),
        1,
    )
    .await;
    let wrote = Instant::now();

    let keyless = expected_reads(updated, deleted);
    let want_updated = |r: &KeyRead| r.rows == 1 && r.total.as_deref() == Some(NEW_TOTAL);
    let mut rounds = 0;
    let mut served_by = Vec::new();
    loop {
        rounds += 1;
        let mut problems = Vec::new();
        let u = must_read_key(&writer, updated).await;
        if !want_updated(&u) {
            problems.push(format!(
                "key {updated} (updated): read {u:?} from {}, expected 1 row with total {NEW_TOTAL}",
                shop.describe_port(u.port)
            ));
        }
        let d = must_read_key(&writer, deleted).await;
        if d.rows != 0 {
            problems.push(format!(
                "key {deleted} (deleted): read {d:?} from {}, expected no row",
                shop.describe_port(d.port)
            ));
        }
        for (sql, want) in &keyless {
            let got = simple(&writer, sql).await;
            if got.as_ref() != Ok(want) {
                problems.push(format!("{sql}: got {got:?}, expected {want:?}"));
            }
        }
        assert_no_problems(
            &format!(
                "the writer's reads in round {rounds}, {:?} after its last write",
                wrote.elapsed()
            ),
            &problems,
        );
        served_by.push((
            shop.describe_port(u.port),
            shop.describe_port(d.port),
            wrote.elapsed(),
        ));

        if rounds == 1 {
            // Meanwhile a client that wrote nothing reads from the replicas.
            for key in [updated, deleted] {
                let r = must_read_key(&bystander, key).await;
                let replica = shop.replica_port(Key::Bigint(key).shard());
                assert_eq!(
                    r.port,
                    replica,
                    "a client that wrote nothing read key {key} from {} ({r:?}) {:?} after \
                     another client's write; expected the replica",
                    shop.describe_port(r.port),
                    wrote.elapsed()
                );
            }
        }

        let back_on_replicas = u.port == shop.replica_port(updated_shard)
            && d.port == shop.replica_port(deleted_shard);
        if back_on_replicas {
            break;
        }
        assert!(
            wrote.elapsed() < SETTLE,
            "the writer's key reads did not go back to the replicas within {SETTLE:?}; \
             served by (updated key, deleted key, since the write): {:?}",
            &served_by[served_by.len().saturating_sub(5)..]
        );
        tokio::time::sleep(POLL).await;
    }
    let problems = console_problems(&shop, &console, "client").await;
    assert_no_problems("the console once the replicas caught up", &problems);
}

/// The control: with `read_your_writes = false`, a read by key right after an update runs on
/// the replica, which has not applied the update yet; so the apply delay is long enough for
/// the other tests to catch a read that misses a write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_off_reads_stale_replicas() {
    let shop = start_shop(APPLY_DELAY, "read_your_writes = false\n");
    let client = shop.client().await;
    let console = console(&shop).await;
    let key = key_on(0, 0);
    let replica = shop.replica_port(0);
    write(
        &client,
        &format!("INSERT INTO orders (customer_id, total) VALUES ({key}, 0)"),
        1,
    )
    .await;
    wait_for("the replica to have the row", || {
        read_on(&shop, &client, key, replica, |r| r.rows == 1)
    })
    .await;

    let mut reads = Vec::new();
    for round in 1..=5 {
        write(
            &client,
            &format!("UPDATE orders SET total = {round} WHERE customer_id = {key}"),
            1,
        )
        .await;
        let r = must_read_key(&client, key).await;
        let stale = r.total.as_deref() != Some(&format!("{round}.00"));
        reads.push((round, r, stale));
    }
    assert!(
        reads.iter().any(|(_, _, stale)| *stale),
        "no read right after an update missed it with read_your_writes = false, so the replica \
         apply delay ({APPLY_DELAY}) does not make reads stale: (round, read, stale) {reads:?}"
    );
    wait_for("the replicas to catch up", || replicas_streaming(&console)).await;
    let problems = console_problems(&shop, &console, "off").await;
    assert_no_problems("the console with read_your_writes off", &problems);
}

/// With `read_your_writes = "global"`, a client that wrote nothing still reads what another
/// client just committed, by key and fanned out; once the replicas have caught up it reads
/// from them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_mode_covers_other_clients() {
    let shop = start_shop(APPLY_DELAY, "read_your_writes = \"global\"\n");
    let a = shop.client().await;
    let b = shop.client().await;
    let console = console(&shop).await;
    let key = key_on(0, 0);
    write(
        &a,
        &format!("INSERT INTO orders (customer_id, total) VALUES ({key}, 0)"),
        1,
    )
    .await;
    let first = must_read_key(&b, key).await;
    assert_eq!(
        first.rows,
        1,
        "client B missed client A's insert: read {first:?} from {}",
        shop.describe_port(first.port)
    );

    let mut problems = Vec::new();
    for round in 1..=5i64 {
        let new_key = key_on((round % 2) as usize, 100 + round as usize);
        write(
            &a,
            &format!("UPDATE orders SET total = {round} WHERE customer_id = {key}"),
            1,
        )
        .await;
        write(
            &a,
            &format!("INSERT INTO orders (customer_id, total) VALUES ({new_key}, {round})"),
            1,
        )
        .await;
        let r = must_read_key(&b, key).await;
        if r.rows != 1 || r.total.as_deref() != Some(&format!("{round}.00")) {
            problems.push(format!(
                "round {round}: client B read key {key} as {r:?} from {}, expected total {round}.00",
                shop.describe_port(r.port)
            ));
        }
        let n = must_read_key(&b, new_key).await;
        if n.rows != 1 {
            problems.push(format!(
                "round {round}: client B read new key {new_key} as {n:?} from {}, expected 1 row",
                shop.describe_port(n.port)
            ));
        }
        let count = simple(&b, "SELECT count(*) FROM orders").await;
        let want = Ok(vec![vec![Some((round + 1).to_string())]]);
        if count != want {
            problems.push(format!(
                "round {round}: client B's SELECT count(*) got {count:?}, expected {want:?}"
            ));
        }
    }
    assert_no_problems("client B's reads of client A's writes", &problems);

    let replica = shop.replica_port(0);
    wait_for("client B's key reads back on the replica", || {
        read_on(&shop, &b, key, replica, |r| {
            r.total.as_deref() == Some("5.00")
        })
    })
    .await;
    wait_for("the replicas to catch up", || replicas_streaming(&console)).await;
    let problems = console_problems(&shop, &console, "global").await;
    assert_no_problems("the console in global mode", &problems);
}

// ---------------------------------------------------------------------------------------------
// Lagging and promoted replicas
// ---------------------------------------------------------------------------------------------

/// With `max_replica_lag = "200ms"` and a replica that applies commits 2 s late, a steady
/// stream of writes on shard 0 keeps its replica out of rotation: SHOW REPLICATION says
/// "lagging (no reads)" with lag_ms over 200, and a client that wrote nothing reads shard 0
/// from the primary. Once the writes stop and the replica catches up it serves reads again,
/// until it is promoted: then SHOW REPLICATION says "promoted (no reads)" and reads go to the
/// primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_and_promoted_replicas_get_no_reads() {
    let shop = start_shop("2s", "max_replica_lag = \"200ms\"\n");
    let setup = shop.client().await;
    let reader = shop.client().await;
    let console = console(&shop).await;
    let key = key_on(0, 0);
    let (primary, replica) = (shop.primary_port(0), shop.replica_port(0));
    write(
        &setup,
        &format!("INSERT INTO orders (customer_id, total) VALUES ({key}, 0)"),
        1,
    )
    .await;
    wait_for("shard 0's replica serving reads", || {
        read_on(&shop, &reader, key, replica, |r| r.rows == 1)
    })
    .await;

    // A steady stream of writes on shard 0, from another client.
    let stop = Arc::new(AtomicBool::new(false));
    let stream = {
        let writer = shop.client().await;
        let stop = stop.clone();
        tokio::spawn(async move {
            let sql = format!("UPDATE orders SET total = total + 1 WHERE customer_id = {key}");
            let mut updates = 0u64;
            while !stop.load(Ordering::Relaxed) {
                simple_count(&writer, &sql)
                    .await
                    .map_err(|e| format!("{sql}: {e}"))?;
                updates += 1;
                // The pace of the workload, not a wait for anything.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok::<u64, String>(updates)
        })
    };

    let lagging = wait_for("SHOW REPLICATION: shard 0's replica lagging", || async {
        let row = replica_row(&console, 0).await;
        if row.state == "lagging (no reads)" && row.lag_ms.is_some_and(|l| l > 200) {
            Ok(row)
        } else {
            Err(format!("{row:?}"))
        }
    })
    .await;
    let mut reads = Vec::new();
    for _ in 0..20 {
        let r = must_read_key(&reader, key).await;
        reads.push((shop.describe_port(r.port), r.total));
        tokio::time::sleep(POLL).await;
    }
    let still = replica_row(&console, 0).await;
    stop.store(true, Ordering::Relaxed);
    let updates = stream
        .await
        .expect("the write stream")
        .unwrap_or_else(|e| panic!("the write stream: {e}"));
    assert!(updates > 0, "the write stream wrote nothing");
    let on_primary = shop.describe_port(primary);
    assert!(
        reads.iter().all(|(server, _)| *server == on_primary),
        "while shard 0's replica lagged ({lagging:?}, then {still:?}) a client that wrote \
         nothing read key {key} (server, total) as {reads:?}; expected the primary every time"
    );

    // Caught up, the replica serves reads again.
    wait_for("shard 0's replica serving reads again", || {
        read_on(&shop, &reader, key, replica, |_| true)
    })
    .await;
    let streaming = replica_row(&console, 0).await;
    assert_eq!(streaming.state, "streaming", "{streaming:?}");

    let promoted = shop.shards[0]
        .replica
        .as_ref()
        .expect("replica")
        .psql("postgres", "SELECT pg_promote()");
    assert_eq!(promoted, "t", "pg_promote() on shard 0's replica");
    let promoted = wait_for("SHOW REPLICATION: shard 0's replica promoted", || async {
        let row = replica_row(&console, 0).await;
        if row.state == "promoted (no reads)" {
            Ok(row)
        } else {
            Err(format!("{row:?}"))
        }
    })
    .await;
    let mut reads = Vec::new();
    for _ in 0..10 {
        let r = must_read_key(&reader, key).await;
        reads.push(shop.describe_port(r.port));
    }
    assert!(
        reads.iter().all(|server| *server == on_primary),
        "after shard 0's replica was promoted ({promoted:?}) a client read key {key} from \
         {reads:?}; expected the primary every time"
    );
    // Shard 1's replica is untouched and still serves reads.
    let other = key_on(1, 0);
    wait_for("shard 1's replica serving reads", || {
        read_on(&shop, &reader, other, shop.replica_port(1), |_| true)
    })
    .await;
}
