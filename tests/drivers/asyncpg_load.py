"""asyncpg through Weir: a pool of 10 connections, 20 tasks, the default statement cache.

Run by tests/drivers.rs against a Weir whose pool has 2 server connections, so every
connection's cached statements are re-prepared by Weir on whichever server it lands on.
A table gets a new column while the tasks run (asyncpg re-prepares `SELECT *` once when the
result type changes, outside transactions). Explicit `conn.prepare()` statements are reused
across many transactions. Exits non-zero on any error; prints one `asyncpg ok ...` line.

Connection settings come from the environment: WEIR_HOST, WEIR_PORT, WEIR_USER,
WEIR_PASSWORD, WEIR_DB.
"""

import asyncio
import os
import sys

import asyncpg

ROWS = 200
TASKS = 20
ROUNDS = 40


def dsn_kwargs():
    return dict(
        host=os.environ.get("WEIR_HOST", "127.0.0.1"),
        port=int(os.environ["WEIR_PORT"]),
        user=os.environ["WEIR_USER"],
        password=os.environ["WEIR_PASSWORD"],
        database=os.environ["WEIR_DB"],
    )


async def setup():
    conn = await asyncpg.connect(**dsn_kwargs())
    try:
        await conn.execute("DROP TABLE IF EXISTS items")
        await conn.execute(
            "CREATE TABLE items (id int PRIMARY KEY, grp int NOT NULL, name text NOT NULL)"
        )
        await conn.executemany(
            "INSERT INTO items VALUES ($1, $2, $3)",
            [(i, i % 10, f"item-{i}") for i in range(ROWS)],
        )
    finally:
        await conn.close()


async def fetch_round(pool, task, rnd):
    """Several distinct parameterized queries, each its own transaction."""
    i = (task * 31 + rnd * 7) % ROWS
    name = await pool.fetchval("SELECT name FROM items WHERE id = $1", i)
    assert name == f"item-{i}", (name, i)

    grp = i % 10
    count = await pool.fetchval("SELECT count(*) FROM items WHERE grp = $1", grp)
    assert count == ROWS // 10, (count, grp)

    rows = await pool.fetch(
        "SELECT id, name FROM items WHERE id >= $1 AND id < $2 ORDER BY id", i, i + 3
    )
    assert [r["id"] for r in rows] == list(range(i, min(i + 3, ROWS))), rows

    total = await pool.fetchval("SELECT $1::int + $2::int", task, rnd)
    assert total == task + rnd

    # SELECT * changes result type when the column is added; asyncpg re-prepares it once.
    row = await pool.fetchrow("SELECT * FROM items WHERE id = $1", i)
    assert row["id"] == i and row["name"] == f"item-{i}", row
    return 5


async def worker(pool, task, midway):
    done = 0
    for rnd in range(ROUNDS):
        done += await fetch_round(pool, task, rnd)
        if rnd == ROUNDS // 3:
            midway.set()
    return done


async def explicit_prepared(pool, task):
    """One connection's explicit statements, reused across many transactions."""
    reuses = 0
    async with pool.acquire() as conn:
        by_id = await conn.prepare("SELECT name FROM items WHERE id = $1")
        in_grp = await conn.prepare("SELECT count(*) FROM items WHERE grp = $1")
        for rnd in range(ROUNDS):
            async with conn.transaction():
                i = (task + rnd) % ROWS
                assert await by_id.fetchval(i) == f"item-{i}"
                assert await in_grp.fetchval(i % 10) == ROWS // 10
            reuses += 2
            # Give the server back between transactions so the next one may land elsewhere.
            await asyncio.sleep(0)
    return reuses


async def add_column_midway(pool, midway):
    # Once the first task is a third of the way through, every connection has cached
    # `SELECT * FROM items WHERE id = $1`, and Weir has prepared it on both servers.
    await midway.wait()
    await pool.execute("ALTER TABLE items ADD COLUMN extra int NOT NULL DEFAULT 7")


async def after_schema_change(pool, task):
    for rnd in range(10):
        i = (task + rnd) % ROWS
        row = await pool.fetchrow("SELECT * FROM items WHERE id = $1", i)
        assert row["extra"] == 7, row
        extra = await pool.fetchval("SELECT extra FROM items WHERE id = $1", i)
        assert extra == 7
    return 20


async def main():
    await setup()
    pool = await asyncpg.create_pool(min_size=10, max_size=10, **dsn_kwargs())
    try:
        midway = asyncio.Event()
        jobs = [worker(pool, t, midway) for t in range(TASKS)]
        jobs += [explicit_prepared(pool, t) for t in range(4)]
        results = await asyncio.gather(add_column_midway(pool, midway), *jobs)
        queries = sum(results[1 : 1 + TASKS])
        reuses = sum(results[1 + TASKS :])
        after = await asyncio.gather(*[after_schema_change(pool, t) for t in range(TASKS)])
        queries += sum(after)
    finally:
        await pool.close()
    print(f"asyncpg ok: tasks={TASKS} queries={queries} prepared_reuses={reuses}")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except Exception as exc:  # noqa: BLE001 - any failure must make the test fail
        print(f"asyncpg FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise
