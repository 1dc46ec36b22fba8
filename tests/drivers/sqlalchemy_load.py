"""SQLAlchemy over psycopg2 through Weir, from several threads sharing one QueuePool.

Run by tests/drivers.rs against a Weir whose pool has 2 server connections. psycopg2 binds
parameters on the client and sends simple queries, opening a transaction (BEGIN) before the
first statement of each unit of work, so every commit or rollback may move the connection to
the other server. Each thread runs ORM sessions (insert, update, query, commit, and a flushed
insert that is rolled back), a Core insert() executemany, a psycopg2 cursor.executemany on a
raw pooled connection, and one explicit transaction of several statements that must all run
on one server (same backend pid and transaction id). The totals are checked at the end.
Exits non-zero on any error; prints one `sqlalchemy ok ...` line.

Connection settings come from the environment: WEIR_HOST, WEIR_PORT, WEIR_USER,
WEIR_PASSWORD, WEIR_DB.
"""

import os
import sys
import threading
import time

from sqlalchemy import (
    Column,
    Integer,
    String,
    Table,
    create_engine,
    func,
    insert,
    select,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session, declarative_base
from sqlalchemy.pool import QueuePool

THREADS = 8
ROUNDS = 15
# Rows each Core executemany and each cursor.executemany inserts.
BATCH = 4
# Every ROLLBACK_EVERY-th round also inserts an account and rolls it back.
ROLLBACK_EVERY = 3
# What the explicit transaction moves from one account of a thread to another.
TRANSFER = 5

Base = declarative_base()


class Account(Base):
    __tablename__ = "sa_accounts"
    id = Column(Integer, primary_key=True)
    owner = Column(String(40), nullable=False, unique=True)
    balance = Column(Integer, nullable=False)


events = Table(
    "sa_events",
    Base.metadata,
    Column("id", Integer, primary_key=True),
    Column("thread", Integer, nullable=False),
    Column("seq", Integer, nullable=False),
    Column("amount", Integer, nullable=False),
    # A statement run twice would break this.
    UniqueConstraint("thread", "seq"),
)


def make_engine():
    url = URL.create(
        "postgresql+psycopg2",
        username=os.environ["WEIR_USER"],
        password=os.environ["WEIR_PASSWORD"],
        host=os.environ.get("WEIR_HOST", "127.0.0.1"),
        port=int(os.environ["WEIR_PORT"]),
        database=os.environ["WEIR_DB"],
    )
    return create_engine(url, poolclass=QueuePool, pool_size=5, max_overflow=5, pool_timeout=30)


def owner(idx, rnd):
    return f"t{idx}-r{rnd}"


def orm_round(engine, idx, rnd):
    """Insert an account, update it in a second session, and read it back."""
    with Session(engine) as session:
        session.add(Account(owner=owner(idx, rnd), balance=rnd))
        session.commit()
    with Session(engine) as session:
        acct = session.execute(
            select(Account).where(Account.owner == owner(idx, rnd))
        ).scalar_one()
        assert acct.balance == rnd, (acct.balance, rnd)
        acct.balance += 10
        session.commit()
        assert acct.balance == rnd + 10, acct.balance
    if rnd % ROLLBACK_EVERY == 0:
        name = f"gone-{idx}-{rnd}"
        count = select(func.count()).select_from(Account).where(Account.owner == name)
        with Session(engine) as session:
            session.add(Account(owner=name, balance=1000))
            session.flush()
            seen = session.execute(count).scalar_one()
            assert seen == 1, seen
            session.rollback()
            gone = session.execute(count).scalar_one()
            assert gone == 0, gone
            session.commit()


def core_executemany(engine, idx, rnd):
    """A Core insert() with a list of parameter sets, then a rolled-back one."""
    rows = [{"thread": idx, "seq": rnd * BATCH + k, "amount": k + 1} for k in range(BATCH)]
    with engine.begin() as conn:
        conn.execute(insert(events), rows)
    try:
        with engine.begin() as conn:
            gone = [{"thread": -1 - idx, "seq": r["seq"], "amount": 1000} for r in rows]
            conn.execute(insert(events), gone)
            raise RuntimeError("roll back")
    except RuntimeError:
        pass


def raw_executemany(engine, idx, rnd):
    """psycopg2's own cursor.executemany on a pooled DBAPI connection."""
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        cur.executemany(
            "INSERT INTO sa_events (thread, seq, amount) VALUES (%s, %s, %s)",
            [(idx, 10000 + rnd * BATCH + k, 2 * (k + 1)) for k in range(BATCH)],
        )
        assert cur.rowcount == BATCH, cur.rowcount
        cur.close()
        raw.commit()
    finally:
        raw.close()


def explicit_transaction(engine, idx, rnd):
    """Several statements in one transaction: all on one server, all committed together.
    The transfers of a thread go round its accounts, so balances come back to where they were;
    each also logs an event."""
    src, dst = owner(idx, rnd), owner(idx, (rnd + 1) % ROUNDS)
    with engine.begin() as conn:
        pid1, xid1 = conn.execute(text("SELECT pg_backend_pid(), txid_current()")).one()
        moved = conn.execute(
            text("UPDATE sa_accounts SET balance = balance - :n WHERE owner = :o"),
            {"n": TRANSFER, "o": src},
        ).rowcount
        assert moved == 1, moved
        moved = conn.execute(
            text("UPDATE sa_accounts SET balance = balance + :n WHERE owner = :o"),
            {"n": TRANSFER, "o": dst},
        ).rowcount
        assert moved == 1, moved
        conn.execute(
            insert(events), {"thread": idx, "seq": 20000 + rnd, "amount": TRANSFER}
        )
        pid2, xid2 = conn.execute(text("SELECT pg_backend_pid(), txid_current()")).one()
        assert (pid1, xid1) == (pid2, xid2), ((pid1, xid1), (pid2, xid2))


def worker(engine, idx, errors, counts):
    try:
        for rnd in range(ROUNDS):
            orm_round(engine, idx, rnd)
            core_executemany(engine, idx, rnd)
            raw_executemany(engine, idx, rnd)
        # Every account of this thread exists now: move money around in a ring.
        for rnd in range(ROUNDS):
            explicit_transaction(engine, idx, rnd)
        counts[idx] = ROUNDS
    except Exception as exc:  # noqa: BLE001 - reported by main
        errors.append(f"thread {idx}: {type(exc).__name__}: {exc}")


def check_totals(engine):
    """Every committed row is there, and nothing rolled back is."""
    with Session(engine) as session:
        accounts, balance = session.execute(
            select(func.count(), func.coalesce(func.sum(Account.balance), 0))
        ).one()
        gone = session.execute(
            select(func.count()).select_from(Account).where(Account.owner.like("gone-%"))
        ).scalar_one()
    with engine.connect() as conn:
        n_events, amount = conn.execute(
            select(func.count(), func.coalesce(func.sum(events.c.amount), 0))
        ).one()
    want_accounts = THREADS * ROUNDS
    # Each account got its round number plus 10; the transfers go in a ring and cancel out.
    want_balance = THREADS * sum(rnd + 10 for rnd in range(ROUNDS))
    # BATCH rows each from Core and from the cursor, and one per transfer.
    want_events = THREADS * ROUNDS * (2 * BATCH + 1)
    # Core rows carry 1..BATCH, cursor rows twice that, transfer rows TRANSFER.
    want_amount = THREADS * ROUNDS * (3 * sum(range(1, BATCH + 1)) + TRANSFER)
    got = (accounts, balance, gone, n_events, amount)
    want = (want_accounts, want_balance, 0, want_events, want_amount)
    assert got == want, f"(accounts, balance, rolled back, events, amount): got {got}, want {want}"
    return got


def main():
    engine = make_engine()
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    errors, counts = [], [0] * THREADS
    threads = [
        threading.Thread(target=worker, args=(engine, i, errors, counts)) for i in range(THREADS)
    ]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for e in errors:
            print(f"sqlalchemy FAILED: {e}", file=sys.stderr)
        sys.exit(1)
    accounts, balance, _, n_events, amount = check_totals(engine)
    engine.dispose()
    elapsed = time.monotonic() - start
    print(
        f"sqlalchemy ok: threads={THREADS} rounds={sum(counts)} accounts={accounts} "
        f"balance={balance} events={n_events} amount={amount} seconds={elapsed:.1f}"
    )


if __name__ == "__main__":
    main()
