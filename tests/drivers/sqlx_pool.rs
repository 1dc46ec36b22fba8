//! sqlx through Weir: a PgPool of 10 connections and 20 tasks. sqlx prepares every
//! `sqlx::query` under its own per-connection names (`sqlx_s_1`, ...) and caches them, so
//! Weir must map and re-prepare them on whichever of its 2 servers a transaction lands on.
//!
//! Included by tests/drivers.rs as `mod sqlx_pool;` (needs the `sqlx` dev-dependency with
//! the `runtime-tokio` and `postgres` features).

use std::time::Duration;

use sqlx::postgres::{PgConnection, PgPoolOptions};
use sqlx::Row;

use crate::support::{Stack, APP_PASSWORD};
use crate::POOL_SIZE;

const TASKS: i32 = 20;
const ROUNDS: i32 = 40;

/// Four distinct parameterized queries, in autocommit (each its own transaction in Weir) or
/// inside one transaction.
async fn sqlx_round(db: &mut PgConnection, i: i32) -> usize {
    let name: String = sqlx::query_scalar("SELECT name FROM items WHERE id = $1")
        .bind(i)
        .fetch_one(&mut *db)
        .await
        .unwrap_or_else(|e| panic!("by id {i}: {e}"));
    assert_eq!(name, format!("item-{i}"));
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM items WHERE grp = $1")
        .bind(i % 10)
        .fetch_one(&mut *db)
        .await
        .unwrap_or_else(|e| panic!("count {i}: {e}"));
    assert_eq!(count, 20);
    let rows = sqlx::query("SELECT id, name FROM items WHERE id >= $1 AND id < $2 ORDER BY id")
        .bind(i)
        .bind(i + 3)
        .fetch_all(&mut *db)
        .await
        .unwrap_or_else(|e| panic!("range {i}: {e}"));
    let ids: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, (i..(i + 3).min(200)).collect::<Vec<_>>());
    let sum: i32 = sqlx::query_scalar("SELECT $1::int + $2::int")
        .bind(i)
        .bind(1)
        .fetch_one(&mut *db)
        .await
        .unwrap_or_else(|e| panic!("sum {i}: {e}"));
    assert_eq!(sum, i + 1);
    4
}

async fn sqlx_worker(pool: sqlx::PgPool, task: i32) -> usize {
    let mut done = 0;
    for rnd in 0..ROUNDS {
        let i = (task * 31 + rnd * 7) % 200;
        if rnd % 4 == 0 {
            let mut tx = pool.begin().await.expect("BEGIN");
            done += sqlx_round(&mut tx, i).await;
            tx.commit().await.expect("COMMIT");
        } else {
            let mut conn = pool.acquire().await.expect("acquire");
            done += sqlx_round(&mut conn, i).await;
        }
    }
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_pool_of_ten_with_cached_statements() {
    let stack = tokio::task::spawn_blocking(|| Stack::start(POOL_SIZE))
        .await
        .unwrap();
    let url = format!(
        "postgres://app:{APP_PASSWORD}@127.0.0.1:{}/app?sslmode=disable",
        stack.weir.port
    );
    let pool = PgPoolOptions::new()
        .min_connections(10)
        .max_connections(10)
        .acquire_timeout(Duration::from_secs(30))
        .connect(&url)
        .await
        .expect("sqlx pool through Weir");
    sqlx::raw_sql(
        "CREATE TABLE items (id int PRIMARY KEY, grp int NOT NULL, name text NOT NULL);
         INSERT INTO items SELECT g, g % 10, 'item-' || g FROM generate_series(0, 199) g;",
    )
    .execute(&pool)
    .await
    .expect("create items");

    let workers: Vec<_> = (0..TASKS)
        .map(|t| tokio::spawn(sqlx_worker(pool.clone(), t)))
        .collect();
    let mut queries = 0;
    for worker in workers {
        queries += worker.await.expect("sqlx worker panicked");
    }
    assert_eq!(queries, (TASKS * ROUNDS * 4) as usize);
    pool.close().await;

    tokio::task::spawn_blocking(move || {
        assert!(stack.server_connections() <= POOL_SIZE);
        crate::assert_no_missing_statement(&stack, "sqlx");
        drop(stack);
    })
    .await
    .unwrap();
}
