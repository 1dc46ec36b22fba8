//! Transactions that write on several shards, committed with two-phase commit
//! (`two_phase_commit = true`): two shards (PostgreSQL clusters with
//! `max_prepared_transactions`) behind one Weir, an `accounts` table sharded by `id`, and
//! transfers between accounts on different shards. Checked on each shard directly: both
//! sides of a transfer or neither, through errors, a Weir killed with SIGKILL between the
//! phases, a shard crashed between them, and a pgbench transfer load through both.

mod common;
#[path = "drivers/raw_client.rs"]
mod raw_client;

use common::{eventually, PgCluster, PgOptions, Weir};
use std::time::Duration;
use tokio_postgres::Client;
use weir::router::{shard_for, KeyType, KeyValue};

const PASSWORD: &str = "app-secret";
const ACCOUNTS: i64 = 200;
const START_BALANCE: i64 = 1000;
/// Long enough for two-phase recovery (every 2 s, for transactions prepared over 2 s ago).
const SETTLE: Duration = Duration::from_secs(30);

struct Bank {
    shards: Vec<PgCluster>,
    config: String,
    weir: Weir,
}

fn shard_of(id: i64) -> usize {
    shard_for(KeyType::Bigint, &KeyValue::Int(id), 2).expect("hash") as usize
}

fn start_shard() -> PgCluster {
    let pg = PgCluster::start_with(PgOptions {
        extra_conf: vec!["max_prepared_transactions = 20".into()],
        ..PgOptions::default()
    });
    pg.create_user("app", PASSWORD, "scram-sha-256");
    pg.create_database("bank", "app");
    pg.psql(
        "bank",
        "CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL, \
         tag text, CONSTRAINT one_tag UNIQUE (tag) DEFERRABLE INITIALLY DEFERRED); \
         ALTER TABLE accounts OWNER TO app; GRANT CREATE ON DATABASE bank TO app",
    );
    pg
}

fn config(shards: &[PgCluster]) -> String {
    let list: Vec<String> = shards
        .iter()
        .map(|s| format!("{{ primary = \"127.0.0.1:{}\" }}", s.port))
        .collect();
    format!(
        "[weir]\nauth_type = \"scram-sha-256\"\ndefault_pool_size = 6\n\n\
         [users.app]\npassword = \"{PASSWORD}\"\n\n\
         [databases.bank]\nshards = [ {} ]\n\
         sharded_tables = [ {{ table = \"accounts\", column = \"id\", type = \"bigint\" }} ]\n\
         two_phase_commit = true\n",
        list.join(", ")
    )
}

impl Bank {
    fn start() -> Bank {
        let starts: Vec<_> = (0..2).map(|_| std::thread::spawn(start_shard)).collect();
        let shards: Vec<PgCluster> = starts
            .into_iter()
            .map(|t| t.join().expect("shard start"))
            .collect();
        let config = config(&shards);
        let weir = Weir::start(&config);
        Bank {
            shards,
            config,
            weir,
        }
    }

    fn url(&self) -> String {
        self.weir.url("app", PASSWORD, "bank")
    }

    async fn client(&self) -> Client {
        common::connect(&self.url()).await
    }

    /// Opens every account with START_BALANCE, through Weir.
    async fn open_accounts(&self) {
        let c = self.client().await;
        for id in 1..=ACCOUNTS {
            c.simple_query(&format!(
                "INSERT INTO accounts (id, balance) VALUES ({id}, {START_BALANCE})"
            ))
            .await
            .expect("open an account");
        }
    }

    fn balance(&self, id: i64) -> i64 {
        self.shards[shard_of(id)]
            .psql(
                "bank",
                &format!("SELECT balance FROM accounts WHERE id = {id}"),
            )
            .parse()
            .expect("balance")
    }

    /// (rows, sum of balances) over both shards, read on each shard directly.
    fn totals(&self) -> (i64, i64) {
        let mut rows = 0;
        let mut sum = 0;
        for s in &self.shards {
            let line = s.psql(
                "bank",
                "SELECT count(*), coalesce(sum(balance), 0) FROM accounts",
            );
            let (n, total) = line.split_once('|').expect("count|sum");
            rows += n.parse::<i64>().expect("count");
            sum += total.parse::<i64>().expect("sum");
        }
        (rows, sum)
    }

    fn prepared(&self) -> Vec<String> {
        self.shards
            .iter()
            .map(|s| s.psql("bank", "SELECT string_agg(gid, ',') FROM pg_prepared_xacts"))
            .filter(|g| !g.is_empty())
            .collect()
    }

    /// Commit decisions recorded on all shards so far (kept for a minute).
    fn decisions(&self) -> i64 {
        self.shards
            .iter()
            .map(|s| {
                s.try_psql("bank", "SELECT count(*) FROM weir.two_phase_decisions")
                    .ok()
                    .and_then(|n| n.parse::<i64>().ok())
                    .unwrap_or(0)
            })
            .sum()
    }

    /// Waits until the running load committed transfers over two shards.
    fn wait_for_decisions(&self, before: i64) {
        eventually(Duration::from_secs(20), "transfers over two shards", || {
            self.decisions() > before + 5
        });
    }

    /// Waits until no shard holds a prepared transaction (recovery settled them).
    fn wait_settled(&self) {
        eventually(SETTLE, "no prepared transactions left", || {
            self.prepared().is_empty()
        });
    }
}

/// Two accounts on different shards: (on shard 0, on shard 1).
fn pair(n: i64) -> (i64, i64) {
    let a = (1..=ACCOUNTS)
        .filter(|id| shard_of(*id) == 0)
        .nth(n as usize)
        .expect("an account on shard 0");
    let b = (1..=ACCOUNTS)
        .filter(|id| shard_of(*id) == 1)
        .nth(n as usize)
        .expect("an account on shard 1");
    (a, b)
}

fn transfer_sql(from: i64, to: i64, amount: i64) -> [String; 2] {
    [
        format!("UPDATE accounts SET balance = balance - {amount} WHERE id = {from}"),
        format!("UPDATE accounts SET balance = balance + {amount} WHERE id = {to}"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_on_two_shards_commit_or_roll_back_together() {
    let bank = Bank::start();
    bank.open_accounts().await;
    let c = bank.client().await;
    let (a, b) = pair(0);

    // Simple protocol: both sides commit.
    let [debit, credit] = transfer_sql(a, b, 10);
    c.batch_execute("BEGIN").await.expect("begin");
    c.batch_execute(&debit).await.expect("debit on shard 0");
    c.batch_execute(&credit).await.expect("credit on shard 1");
    c.batch_execute("COMMIT").await.expect("commit");
    assert_eq!((bank.balance(a), bank.balance(b)), (990, 1010));
    // The client reads its own writes on both shards at once.
    let row = c
        .query_one("SELECT balance FROM accounts WHERE id = $1", &[&b])
        .await
        .expect("read back");
    assert_eq!(row.get::<_, i64>(0), 1010);

    // Extended protocol (a driver transaction), the other direction.
    let mut c2 = bank.client().await;
    let tx = c2.transaction().await.expect("begin");
    tx.execute(
        "UPDATE accounts SET balance = balance - $2 WHERE id = $1",
        &[&b, &5i64],
    )
    .await
    .expect("debit on shard 1");
    tx.execute(
        "UPDATE accounts SET balance = balance + $2 WHERE id = $1",
        &[&a, &5i64],
    )
    .await
    .expect("credit on shard 0");
    tx.commit().await.expect("commit");
    assert_eq!((bank.balance(a), bank.balance(b)), (995, 1005));

    // ROLLBACK undoes both.
    c.batch_execute("BEGIN").await.expect("begin");
    c.batch_execute(&debit).await.expect("debit");
    c.batch_execute(&credit).await.expect("credit");
    c.batch_execute("ROLLBACK").await.expect("rollback");
    assert_eq!((bank.balance(a), bank.balance(b)), (995, 1005));

    // An error on one shard fails the transaction; COMMIT rolls back both.
    c.batch_execute("BEGIN").await.expect("begin");
    c.batch_execute(&debit).await.expect("debit");
    let bad = c
        .batch_execute(&format!(
            "UPDATE accounts SET balance = balance / 0 WHERE id = {b}"
        ))
        .await;
    assert!(bad.is_err(), "division by zero fails");
    let _ = c.batch_execute("COMMIT").await;
    assert_eq!((bank.balance(a), bank.balance(b)), (995, 1005));

    // The coordinator (the last shard written) fails at COMMIT (a deferred unique
    // constraint): the prepared shard is rolled back too, and the client gets the error.
    let (a2, b2) = pair(1);
    c.batch_execute(&format!(
        "UPDATE accounts SET tag = 'taken' WHERE id = {}",
        pair(2).1
    ))
    .await
    .expect("tag an account on shard 1");
    c.batch_execute("BEGIN").await.expect("begin");
    c.batch_execute(&transfer_sql(a2, b2, 7)[0])
        .await
        .expect("debit");
    c.batch_execute(&format!(
        "UPDATE accounts SET balance = balance + 7, tag = 'taken' WHERE id = {b2}"
    ))
    .await
    .expect("credit (the duplicate tag is only checked at commit)");
    let commit = c.batch_execute("COMMIT").await;
    let err = commit.expect_err("COMMIT fails on the deferred constraint");
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("23505"),
        "{err:?}"
    );
    assert_eq!((bank.balance(a2), bank.balance(b2)), (1000, 1000));
    // The session goes on.
    c.batch_execute("SELECT 1").await.expect("usable after");
    assert!(
        bank.prepared().is_empty(),
        "left prepared: {:?}",
        bank.prepared()
    );
    assert_eq!(bank.totals(), (ACCOUNTS, ACCOUNTS * START_BALANCE));

    // COMMIT is read from the grammar: a leading comment still commits every shard.
    let (a3, b3) = pair(3);
    c.batch_execute("BEGIN").await.expect("begin");
    c.batch_execute(&transfer_sql(a3, b3, 1)[0])
        .await
        .expect("debit");
    c.batch_execute(&transfer_sql(a3, b3, 1)[1])
        .await
        .expect("credit");
    c.batch_execute("/* app */ COMMIT").await.expect("commit");
    assert_eq!((bank.balance(a3), bank.balance(b3)), (999, 1001));
    // A savepoint keeps the transaction on its shard.
    c.batch_execute("BEGIN").await.expect("begin");
    c.batch_execute(&transfer_sql(a3, b3, 1)[0])
        .await
        .expect("debit");
    c.batch_execute("SAVEPOINT s").await.expect("savepoint");
    let spread = c.batch_execute(&transfer_sql(a3, b3, 1)[1]).await;
    assert_eq!(
        spread
            .expect_err("no spreading after a savepoint")
            .as_db_error()
            .map(|e| e.code().code()),
        Some("0A000")
    );
    c.batch_execute("ROLLBACK").await.expect("rollback");
    assert_eq!((bank.balance(a3), bank.balance(b3)), (999, 1001));
    // Savepoints and AND CHAIN are refused once the transaction spans shards.
    c.batch_execute("BEGIN").await.expect("begin");
    c.batch_execute(&transfer_sql(a3, b3, 1)[0])
        .await
        .expect("debit");
    c.batch_execute(&transfer_sql(a3, b3, 1)[1])
        .await
        .expect("credit");
    assert!(c.batch_execute("SAVEPOINT s").await.is_err());
    c.batch_execute("ROLLBACK").await.expect("rollback");
    assert_eq!((bank.balance(a3), bank.balance(b3)), (999, 1001));
    c.batch_execute("BEGIN").await.expect("begin");
    c.batch_execute(&transfer_sql(a3, b3, 1)[0])
        .await
        .expect("debit");
    c.batch_execute(&transfer_sql(a3, b3, 1)[1])
        .await
        .expect("credit");
    assert!(c.batch_execute("COMMIT AND CHAIN").await.is_err());
    c.batch_execute("ROLLBACK").await.expect("rollback");
    assert_eq!((bank.balance(a3), bank.balance(b3)), (999, 1001));
    c.batch_execute(&format!(
        "UPDATE accounts SET balance = 1000 WHERE id = {a3}; "
    ))
    .await
    .expect("reset a3");
    c.batch_execute(&format!(
        "UPDATE accounts SET balance = 1000 WHERE id = {b3}"
    ))
    .await
    .expect("reset b3");

    // A keyless UPDATE runs on every shard, atomically; RETURNING rows are joined.
    let n = c
        .execute("UPDATE accounts SET balance = balance + 1", &[])
        .await;
    assert!(n.is_err(), "extended protocol: still refused");
    let msgs = c
        .simple_query("UPDATE accounts SET balance = balance + 1 RETURNING id")
        .await
        .expect("keyless UPDATE");
    let rows = msgs
        .iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        .count();
    assert_eq!(rows as i64, ACCOUNTS);
    assert!(msgs.iter().any(|m| matches!(
        m,
        tokio_postgres::SimpleQueryMessage::CommandComplete(n) if *n == ACCOUNTS as u64
    )));
    assert_eq!(bank.totals(), (ACCOUNTS, ACCOUNTS * (START_BALANCE + 1)));
    // One shard fails (division by zero on shard 1's row b): no shard keeps its part.
    let err = c
        .batch_execute(&format!(
            "UPDATE accounts SET balance = balance - 1 + 1 / (id - {b})"
        ))
        .await
        .expect_err("one shard fails");
    assert_eq!(err.as_db_error().map(|e| e.code().code()), Some("22012"));
    assert_eq!(bank.totals(), (ACCOUNTS, ACCOUNTS * (START_BALANCE + 1)));
    c.batch_execute("DELETE FROM accounts WHERE balance < 0")
        .await
        .expect("keyless DELETE of nothing");
    assert!(bank.prepared().is_empty());

    // DDL and TRUNCATE of a sharded table run on every shard at once.
    c.batch_execute("ALTER TABLE accounts ADD COLUMN note text")
        .await
        .expect("ALTER TABLE on every shard");
    for shard in &bank.shards {
        let n = shard.psql(
            "bank",
            "SELECT count(*) FROM information_schema.columns \
             WHERE table_name = 'accounts' AND column_name = 'note'",
        );
        assert_eq!(n, "1", "the column exists on every shard");
    }
    c.batch_execute("TRUNCATE accounts")
        .await
        .expect("TRUNCATE on every shard");
    assert_eq!(bank.totals(), (0, 0));
    assert!(bank.prepared().is_empty());
}

/// Waits until a backend of `shard` waits for a lock while running `like`.
fn wait_for_lock_wait(shard: &PgCluster, like: &str) {
    eventually(Duration::from_secs(20), "Weir to wait on the lock", || {
        shard.psql(
            "bank",
            &format!(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                 AND query LIKE '%{like}%'"
            ),
        ) != "0"
    });
}

/// Weir is killed after the other shard prepared but before the decision was recorded: on
/// restart, recovery rolls the prepared shard back. Then a shard crashes after the decision
/// was recorded but before it committed its prepared part: once it is back, recovery
/// commits it. Either way both sides of the transfer agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_between_the_phases_leave_no_half_transfer() {
    let mut bank = Bank::start();
    bank.open_accounts().await;
    let (a, b) = pair(0);
    let [debit, credit] = transfer_sql(a, b, 100);
    // One transfer creates the decision table on the coordinator (shard 1).
    let c = bank.client().await;
    c.batch_execute("BEGIN").await.expect("begin");
    c.batch_execute(&debit).await.expect("debit");
    c.batch_execute(&credit).await.expect("credit");
    c.batch_execute("COMMIT").await.expect("commit");
    assert_eq!((bank.balance(a), bank.balance(b)), (900, 1100));
    drop(c);

    // 1. Weir dies between PREPARE (shard 0) and the decision (shard 1).
    let locker = tokio_postgres::connect(
        &bank.shards[1].url("postgres", "", "bank"),
        tokio_postgres::NoTls,
    )
    .await
    .expect("direct connection");
    let (locker, conn) = locker;
    tokio::spawn(conn);
    locker
        .batch_execute("BEGIN; LOCK TABLE weir.two_phase_decisions IN EXCLUSIVE MODE")
        .await
        .expect("lock the decisions");
    let url = bank.url();
    let (d2, c2) = (debit.clone(), credit.clone());
    let stuck = tokio::spawn(async move {
        let c = common::connect(&url).await;
        c.batch_execute("BEGIN").await?;
        c.batch_execute(&d2).await?;
        c.batch_execute(&c2).await?;
        c.batch_execute("COMMIT").await
    });
    wait_for_lock_wait(&bank.shards[1], "INSERT INTO weir.two_phase_decisions");
    assert_eq!(bank.prepared().len(), 1, "shard 0 prepared");
    bank.weir.signal(libc::SIGKILL);
    bank.weir.wait_exit(Duration::from_secs(10));
    assert!(
        stuck.await.expect("join").is_err(),
        "the client lost its commit"
    );
    locker.batch_execute("COMMIT").await.expect("unlock");
    let port = bank.weir.port;
    bank.weir = Weir::start_on_port(&bank.config, port);
    let _wake = bank.client().await; // the first client starts recovery
    bank.wait_settled();
    assert_eq!(
        (bank.balance(a), bank.balance(b)),
        (900, 1100),
        "the undecided transfer was rolled back on both shards"
    );

    // 2. The prepared shard (0) crashes after the decision is recorded.
    locker
        .batch_execute("BEGIN; LOCK TABLE weir.two_phase_decisions IN EXCLUSIVE MODE")
        .await
        .expect("lock the decisions");
    let url = bank.url();
    let committed = tokio::spawn(async move {
        let c = common::connect(&url).await;
        c.batch_execute("BEGIN").await?;
        c.batch_execute(&debit).await?;
        c.batch_execute(&credit).await?;
        c.batch_execute("COMMIT").await
    });
    wait_for_lock_wait(&bank.shards[1], "INSERT INTO weir.two_phase_decisions");
    bank.shards[0].crash();
    locker.batch_execute("COMMIT").await.expect("unlock");
    committed
        .await
        .expect("join")
        .expect("the decision was recorded: the client's COMMIT succeeds");
    assert_eq!(bank.balance(b), 1200, "the coordinator committed");
    bank.shards[0].start_again();
    bank.wait_settled();
    assert_eq!(
        (bank.balance(a), bank.balance(b)),
        (800, 1200),
        "the prepared shard committed after its restart"
    );
    assert_eq!(bank.totals(), (ACCOUNTS, ACCOUNTS * START_BALANCE));
}

/// A pgbench transfer load through Weir while Weir is SIGKILLed and restarted and a shard
/// crashes and restarts: the sum of balances never changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_load_keeps_the_total_through_crashes() {
    let mut bank = Bank::start();
    bank.open_accounts().await;
    // Not in Weir's own directory, which goes with the process it belongs to.
    let scripts = tempfile::TempDir::new().expect("a temp dir");
    let script = scripts.path().join("transfer.sql");
    std::fs::write(
        &script,
        format!(
            "\\set a random(1, {ACCOUNTS})\n\\set b random(1, {ACCOUNTS})\n\\set v random(1, 50)\n\
             BEGIN;\n\
             UPDATE accounts SET balance = balance - :v WHERE id = :a;\n\
             UPDATE accounts SET balance = balance + :v WHERE id = :b;\n\
             END;\n"
        ),
    )
    .expect("write the pgbench script");
    common::give_to_postgres(&script);
    let run = |weir_port: u16, seconds: &str| {
        let script = script.to_string_lossy().to_string();
        let port = weir_port.to_string();
        let seconds = seconds.to_string();
        std::thread::spawn(move || {
            common::pgbench_env(
                &[
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-U",
                    "app",
                    "-n",
                    "-c",
                    "4",
                    "-T",
                    &seconds,
                    // A deadlock across shards is reported as 40P01: pgbench retries it.
                    "--max-tries=20",
                    "-f",
                    &script,
                    "bank",
                ],
                &[("PGPASSWORD", PASSWORD)],
            )
        })
    };
    // A clean run first: it must commit transfers, with no failure.
    let clean = run(bank.weir.port, "3").join().expect("pgbench");
    let out = String::from_utf8_lossy(&clean.stdout).to_string();
    assert!(
        clean.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&clean.stderr)
    );
    assert!(out.contains("number of failed transactions: 0"), "{out}");
    assert_eq!(bank.totals(), (ACCOUNTS, ACCOUNTS * START_BALANCE));

    // Weir is killed mid-load and restarted.
    let before = bank.decisions();
    let load = run(bank.weir.port, "4");
    bank.wait_for_decisions(before);
    bank.weir.signal(libc::SIGKILL);
    bank.weir.wait_exit(Duration::from_secs(10));
    let _ = load.join();
    let port = bank.weir.port;
    bank.weir = Weir::start_on_port(&bank.config, port);
    let _wake = bank.client().await;
    bank.wait_settled();
    assert_eq!(bank.totals(), (ACCOUNTS, ACCOUNTS * START_BALANCE));

    // A shard crashes mid-load and restarts.
    let before = bank.decisions();
    let load = run(bank.weir.port, "4");
    bank.wait_for_decisions(before);
    bank.shards[1].crash();
    let _ = load.join();
    bank.shards[1].start_again();
    bank.wait_settled();
    assert_eq!(bank.totals(), (ACCOUNTS, ACCOUNTS * START_BALANCE));
}

/// pgbench's prepared and extended modes send BEGIN through the extended protocol, where
/// Weir cannot hold it: it runs on shard 0, and the transaction moves to the shard its
/// first statement names (single-shard scripts), or spans both (transfers). No failures,
/// and the total stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_transactions_route_by_their_first_statement() {
    let bank = Bank::start();
    bank.open_accounts().await;
    let scripts = tempfile::TempDir::new().expect("a temp dir");
    let one = scripts.path().join("one.sql");
    let transfer = scripts.path().join("transfer.sql");
    std::fs::write(
        &one,
        format!(
            "\\set a random(1, {ACCOUNTS})\nBEGIN;\n\
             UPDATE accounts SET balance = balance + 0 WHERE id = :a;\n\
             SELECT balance FROM accounts WHERE id = :a;\nEND;\n"
        ),
    )
    .expect("write a script");
    std::fs::write(
        &transfer,
        format!(
            "\\set a random(1, {ACCOUNTS})\n\\set b random(1, {ACCOUNTS})\n\
             BEGIN;\n\
             UPDATE accounts SET balance = balance - 3 WHERE id = :a;\n\
             UPDATE accounts SET balance = balance + 3 WHERE id = :b;\n\
             END;\n"
        ),
    )
    .expect("write a script");
    common::give_to_postgres(&one);
    common::give_to_postgres(&transfer);
    let port = bank.weir.port.to_string();
    for (mode, script) in [
        ("prepared", &one),
        ("extended", &one),
        ("prepared", &transfer),
        ("extended", &transfer),
    ] {
        let single = script == &one;
        let before = bank.decisions();
        let script = script.to_string_lossy().to_string();
        let out = common::pgbench_env(
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "app",
                "-n",
                "-c",
                "3",
                "-t",
                "100",
                "-M",
                mode,
                "--max-tries=20",
                "-f",
                &script,
                "bank",
            ],
            &[("PGPASSWORD", PASSWORD)],
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "-M {mode} {script}: {text}");
        assert!(
            text.contains("number of transactions actually processed: 300/300"),
            "-M {mode} {script}: {text}"
        );
        if single {
            // Moved, not spread: one shard, no two-phase commit.
            assert_eq!(
                bank.decisions(),
                before,
                "-M {mode}: single-shard transactions used 2PC"
            );
        }
    }
    assert!(bank.prepared().is_empty());
    assert_eq!(bank.totals(), (ACCOUNTS, ACCOUNTS * START_BALANCE));
}

/// JDBC with autocommit off sends `BEGIN` in one batch with the first statement (Parse,
/// Bind, Execute of each, then one Sync): the batch runs on the shard of the statement's
/// key, not where BEGIN alone would go; a batch whose statements name different shards is
/// refused, never run on one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_begin_runs_on_its_statements_shard() {
    let bank = Bank::start();
    bank.open_accounts().await;
    let (a, b) = pair(4);
    let mut raw = raw_client::RawClient::connect(bank.weir.port, "app", PASSWORD, "bank").await;
    let replies = raw
        .parse("", "BEGIN")
        .bind("", &[])
        .execute()
        .parse(
            "",
            "UPDATE accounts SET balance = balance + 5 WHERE id = $1",
        )
        .bind("", &[&b.to_string()])
        .execute()
        .sync()
        .await;
    assert!(
        replies.iter().all(|r| r.error_code().is_none()),
        "{replies:?}"
    );
    let replies = raw.simple_query("COMMIT").await;
    assert!(
        replies.iter().all(|r| r.error_code().is_none()),
        "{replies:?}"
    );
    assert_eq!(
        bank.balance(b),
        1005,
        "the update ran on account {b}'s shard"
    );
    // Statements of one batch on two shards: refused, nothing runs.
    let replies = raw
        .parse(
            "",
            "UPDATE accounts SET balance = balance + 1 WHERE id = $1",
        )
        .bind("", &[&a.to_string()])
        .execute()
        .parse(
            "",
            "UPDATE accounts SET balance = balance + 1 WHERE id = $1",
        )
        .bind("", &[&b.to_string()])
        .execute()
        .sync()
        .await;
    assert!(
        replies.iter().any(|r| r.error_code() == Some("0A000")),
        "{replies:?}"
    );
    assert_eq!((bank.balance(a), bank.balance(b)), (1000, 1005));
}

/// Two transactions lock rows on two shards in opposite orders: each PostgreSQL sees only a
/// wait, not the cycle. The wait on the second shard is bounded by
/// `cross_shard_lock_timeout` and reported as a deadlock (40P01); the other transaction
/// commits, and both shards agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadlock_across_shards_ends_in_40p01_not_a_hang() {
    let bank = Bank::start();
    bank.open_accounts().await;
    let (a, b) = pair(5);
    let c1 = bank.client().await;
    let c2 = bank.client().await;
    c1.batch_execute("BEGIN").await.expect("begin");
    c2.batch_execute("BEGIN").await.expect("begin");
    c1.batch_execute(&format!(
        "UPDATE accounts SET balance = balance - 1 WHERE id = {a}"
    ))
    .await
    .expect("c1 locks a");
    c2.batch_execute(&format!(
        "UPDATE accounts SET balance = balance - 1 WHERE id = {b}"
    ))
    .await
    .expect("c2 locks b");
    let t1 = tokio::spawn(async move {
        let r = c1
            .batch_execute(&format!(
                "UPDATE accounts SET balance = balance + 1 WHERE id = {b}"
            ))
            .await;
        (c1, r)
    });
    let t2 = tokio::spawn(async move {
        let r = c2
            .batch_execute(&format!(
                "UPDATE accounts SET balance = balance + 1 WHERE id = {a}"
            ))
            .await;
        (c2, r)
    });
    let within = std::time::Duration::from_secs(20);
    let (c1, r1) = tokio::time::timeout(within, t1)
        .await
        .expect("no hang")
        .expect("join");
    let (c2, r2) = tokio::time::timeout(within, t2)
        .await
        .expect("no hang")
        .expect("join");
    let codes: Vec<Option<String>> = [&r1, &r2]
        .iter()
        .map(|r| match r {
            Ok(()) => None,
            Err(e) => e.as_db_error().map(|d| d.code().code().to_string()),
        })
        .collect();
    assert!(
        codes.contains(&Some("40P01".to_string())),
        "one side is told it deadlocked: {codes:?}"
    );
    for (c, r) in [(&c1, &r1), (&c2, &r2)] {
        if r.is_ok() {
            c.batch_execute("COMMIT")
                .await
                .expect("the survivor commits");
        } else {
            c.batch_execute("ROLLBACK")
                .await
                .expect("the victim rolls back");
        }
    }
    assert!(bank.prepared().is_empty());
    assert_eq!(bank.totals(), (ACCOUNTS, ACCOUNTS * START_BALANCE));
}
