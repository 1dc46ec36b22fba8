// pgjdbc through Weir with prepareThreshold=1: every PreparedStatement becomes a named
// server-side statement (S_1, S_2, ... per connection) from its first execution.
//
// Run by tests/drivers.rs against a Weir whose pool has 2 server connections. 12 threads each
// own a connection and reuse their PreparedStatements across autocommit statements and
// explicit transactions, so Weir re-prepares them on whichever server a transaction lands
// on. Thread 0 adds a column a third of the way through. Exits non-zero on any error; prints
// one `pgjdbc ok ...` line.
//
// Connection settings come from the environment: WEIR_HOST, WEIR_PORT, WEIR_USER,
// WEIR_PASSWORD, WEIR_DB.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.ConcurrentLinkedQueue;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicLong;

public class JdbcLoad {
    static final int ROWS = 200;
    static final int THREADS = 12;
    static final int ROUNDS = 80;

    static String url() {
        String host = System.getenv().getOrDefault("WEIR_HOST", "127.0.0.1");
        return "jdbc:postgresql://" + host + ":" + System.getenv("WEIR_PORT") + "/"
                + System.getenv("WEIR_DB");
    }

    static Connection connect() throws SQLException {
        Properties props = new Properties();
        props.setProperty("user", System.getenv("WEIR_USER"));
        props.setProperty("password", System.getenv("WEIR_PASSWORD"));
        props.setProperty("prepareThreshold", "1");
        props.setProperty("sslmode", "disable");
        return DriverManager.getConnection(url(), props);
    }

    static void check(boolean cond, String what) {
        if (!cond) {
            throw new IllegalStateException("check failed: " + what);
        }
    }

    static void setup() throws SQLException {
        try (Connection conn = connect(); Statement st = conn.createStatement()) {
            st.execute("DROP TABLE IF EXISTS items");
            st.execute("CREATE TABLE items (id int PRIMARY KEY, grp int NOT NULL, name text NOT NULL)");
            st.execute("INSERT INTO items SELECT g, g % 10, 'item-' || g FROM generate_series(0, "
                    + (ROWS - 1) + ") g");
        }
    }

    /** One connection's statements, prepared once and executed every round. */
    static final class Statements {
        final PreparedStatement byId;
        final PreparedStatement countGrp;
        final PreparedStatement range;
        final PreparedStatement touch;

        Statements(Connection conn) throws SQLException {
            byId = conn.prepareStatement("SELECT name FROM items WHERE id = ?");
            countGrp = conn.prepareStatement("SELECT count(*) FROM items WHERE grp = ?");
            range = conn.prepareStatement("SELECT id FROM items WHERE id >= ? AND id < ? ORDER BY id");
            touch = conn.prepareStatement("UPDATE items SET grp = grp WHERE id = ?");
        }

        int round(int i) throws SQLException {
            byId.setInt(1, i);
            try (ResultSet rs = byId.executeQuery()) {
                check(rs.next() && rs.getString(1).equals("item-" + i), "byId " + i);
            }
            countGrp.setInt(1, i % 10);
            try (ResultSet rs = countGrp.executeQuery()) {
                check(rs.next() && rs.getLong(1) == ROWS / 10, "countGrp " + i);
            }
            range.setInt(1, i);
            range.setInt(2, i + 3);
            int n = 0;
            try (ResultSet rs = range.executeQuery()) {
                while (rs.next()) {
                    check(rs.getInt(1) == i + n, "range " + i);
                    n++;
                }
            }
            check(n == Math.min(3, ROWS - i), "range count " + i);
            touch.setInt(1, i);
            check(touch.executeUpdate() == 1, "touch " + i);
            return 4;
        }
    }

    static long work(int idx, CountDownLatch schemaChanged) throws Exception {
        long done = 0;
        try (Connection conn = connect()) {
            Statements st = new Statements(conn);
            for (int rnd = 0; rnd < ROUNDS; rnd++) {
                int i = (idx * 17 + rnd) % ROWS;
                if (rnd % 3 == 0) {
                    conn.setAutoCommit(false);
                    done += st.round(i);
                    done += st.round((i + 1) % ROWS);
                    conn.commit();
                    conn.setAutoCommit(true);
                } else {
                    done += st.round(i);
                }
                if (idx == 0 && rnd == ROUNDS / 3) {
                    try (Statement ddl = conn.createStatement()) {
                        ddl.execute("ALTER TABLE items ADD COLUMN extra int NOT NULL DEFAULT 7");
                    }
                    schemaChanged.countDown();
                }
            }
            check(schemaChanged.await(30, TimeUnit.SECONDS), "schema change within 30 s");
            try (PreparedStatement extra = conn.prepareStatement("SELECT extra FROM items WHERE id = ?")) {
                for (int rnd = 0; rnd < 10; rnd++) {
                    extra.setInt(1, (idx + rnd) % ROWS);
                    try (ResultSet rs = extra.executeQuery()) {
                        check(rs.next() && rs.getInt(1) == 7, "extra");
                    }
                    done++;
                }
            }
        }
        return done;
    }

    public static void main(String[] args) throws Exception {
        setup();
        CountDownLatch schemaChanged = new CountDownLatch(1);
        ConcurrentLinkedQueue<String> errors = new ConcurrentLinkedQueue<>();
        AtomicLong queries = new AtomicLong();
        List<Thread> threads = new ArrayList<>();
        for (int t = 0; t < THREADS; t++) {
            final int idx = t;
            Thread th = new Thread(() -> {
                try {
                    queries.addAndGet(work(idx, schemaChanged));
                } catch (Exception e) {
                    String state = e instanceof SQLException ? " [" + ((SQLException) e).getSQLState() + "]" : "";
                    errors.add("thread " + idx + ": " + e + state);
                }
            });
            threads.add(th);
            th.start();
        }
        for (Thread th : threads) {
            th.join();
        }
        if (!errors.isEmpty()) {
            for (String e : errors) {
                System.err.println("pgjdbc FAILED: " + e);
            }
            System.exit(1);
        }
        System.out.println("pgjdbc ok: threads=" + THREADS + " queries=" + queries.get());
    }
}
