"""psycopg 3 through Weir with prepare_threshold=0: every query is prepared server-side.

Run by tests/drivers.rs against a Weir whose pool has 2 server connections. 12 threads each
own a connection; psycopg names its statements _pg3_0, _pg3_1, ... per connection, and the
threads run their queries in different orders, so the same client-side name means different
queries on different connections. Half the connections have a tiny prepared_max, so psycopg
keeps closing statements (protocol Close with libpq >= 17) and preparing them again. A column
is added while the threads run. Exits non-zero on any error; prints one `psycopg ok ...` line.

Connection settings come from the environment: WEIR_HOST, WEIR_PORT, WEIR_USER,
WEIR_PASSWORD, WEIR_DB.
"""

import os
import sys
import threading
import time

import psycopg

ROWS = 200
THREADS = 12
ROUNDS = 60


def conninfo():
    return psycopg.conninfo.make_conninfo(
        host=os.environ.get("WEIR_HOST", "127.0.0.1"),
        port=os.environ["WEIR_PORT"],
        user=os.environ["WEIR_USER"],
        password=os.environ["WEIR_PASSWORD"],
        dbname=os.environ["WEIR_DB"],
    )


def connect(autocommit=True):
    return psycopg.connect(conninfo(), prepare_threshold=0, autocommit=autocommit)


def setup():
    with connect() as conn:
        conn.execute("DROP TABLE IF EXISTS items")
        conn.execute(
            "CREATE TABLE items (id int PRIMARY KEY, grp int NOT NULL, name text NOT NULL)"
        )
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO items VALUES (%s, %s, %s)",
                [(i, i % 10, f"item-{i}") for i in range(ROWS)],
            )


def q_name(conn, i):
    (name,) = conn.execute("SELECT name FROM items WHERE id = %s", (i,)).fetchone()
    assert name == f"item-{i}", (name, i)


def q_count(conn, i):
    (count,) = conn.execute("SELECT count(*) FROM items WHERE grp = %s", (i % 10,)).fetchone()
    assert count == ROWS // 10, count


def q_range(conn, i):
    ids = [
        r[0]
        for r in conn.execute(
            "SELECT id FROM items WHERE id >= %s AND id < %s ORDER BY id", (i, i + 4)
        )
    ]
    assert ids == list(range(i, min(i + 4, ROWS))), ids


def q_sum(conn, i):
    (total,) = conn.execute("SELECT %s::int + %s::int", (i, 1)).fetchone()
    assert total == i + 1


def q_upper(conn, i):
    (up,) = conn.execute("SELECT upper(name) FROM items WHERE id = %s", (i,)).fetchone()
    assert up == f"ITEM-{i}", up


def q_update(conn, i):
    conn.execute("UPDATE items SET grp = grp WHERE id = %s", (i,))


QUERIES = [q_name, q_count, q_range, q_sum, q_upper, q_update]


def worker(idx, errors, counts, schema_changed):
    try:
        conn = connect(autocommit=True)
        if idx % 2 == 1:
            # Fewer slots than queries: psycopg closes and re-prepares statements all the time.
            conn.prepared_max = 3
        order = QUERIES[idx % len(QUERIES) :] + QUERIES[: idx % len(QUERIES)]
        done = 0
        for rnd in range(ROUNDS):
            i = (idx * 17 + rnd) % ROWS
            if rnd % 3 == 0:
                with conn.transaction():
                    for q in order:
                        q(conn, i)
            else:
                for q in order:
                    q(conn, i)
            done += len(order)
            if idx == 0 and rnd == ROUNDS // 3:
                conn.execute("ALTER TABLE items ADD COLUMN extra int NOT NULL DEFAULT 7")
                schema_changed.set()
        schema_changed.wait(30)
        for rnd in range(10):
            i = (idx + rnd) % ROWS
            (extra,) = conn.execute("SELECT extra FROM items WHERE id = %s", (i,)).fetchone()
            assert extra == 7
            done += 1
        conn.close()
        counts[idx] = done
    except Exception as exc:  # noqa: BLE001 - reported by main
        errors.append(f"thread {idx}: {type(exc).__name__}: {exc}")


def main():
    setup()
    errors, counts = [], [0] * THREADS
    schema_changed = threading.Event()
    threads = [
        threading.Thread(target=worker, args=(i, errors, counts, schema_changed))
        for i in range(THREADS)
    ]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for e in errors:
            print(f"psycopg FAILED: {e}", file=sys.stderr)
        sys.exit(1)
    elapsed = time.monotonic() - start
    print(f"psycopg ok: threads={THREADS} queries={sum(counts)} seconds={elapsed:.1f}")


if __name__ == "__main__":
    main()
