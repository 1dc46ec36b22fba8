# Ruby pg (libpq) through Weir: protocol-level prepared statements from several threads.
#
# Run by tests/drivers.rs against a Weir whose pool has 2 server connections. Each thread owns
# a PG::Connection and prepares its statements once (conn.prepare sends Parse under the given
# name; every thread uses the same names for different queries), then runs them with
# exec_prepared in autocommit and inside conn.transaction blocks, so Weir must map the names
# and re-prepare them on whichever server each transaction lands on. exec_params (unnamed
# statements) and a transaction that raises and is rolled back are mixed in. The committed
# rows are checked at the end. Exits non-zero on any error; prints one `ruby-pg ok ...` line.
#
# Connection settings come from the environment: WEIR_HOST, WEIR_PORT, WEIR_USER,
# WEIR_PASSWORD, WEIR_DB.

require 'pg'

THREADS = 8
ROUNDS = 60
ROWS = 100

class CheckFailed < StandardError; end

def check(cond, what)
  raise CheckFailed, "check failed: #{what}" unless cond
end

def connect
  PG.connect(
    host: ENV.fetch('WEIR_HOST', '127.0.0.1'),
    port: Integer(ENV.fetch('WEIR_PORT')),
    user: ENV.fetch('WEIR_USER'),
    password: ENV.fetch('WEIR_PASSWORD'),
    dbname: ENV.fetch('WEIR_DB'),
  )
end

def setup
  conn = connect
  conn.exec('DROP TABLE IF EXISTS rb_items, rb_ledger')
  conn.exec('CREATE TABLE rb_items (id int PRIMARY KEY, grp int NOT NULL, name text NOT NULL)')
  conn.exec_params(
    "INSERT INTO rb_items SELECT g, g % 10, 'item-' || g FROM generate_series(0, $1::int - 1) g",
    [ROWS],
  )
  conn.exec(
    'CREATE TABLE rb_ledger (thread int NOT NULL, rnd int NOT NULL, amount int NOT NULL, ' \
    'PRIMARY KEY (thread, rnd))',
  )
  conn.close
end

# The same names on every connection, bound to different queries depending on the thread, so
# a statement of one client must never be run for another.
QUERIES = [
  ['SELECT name FROM rb_items WHERE id = $1', ->(r, i) { r.getvalue(0, 0) == "item-#{i}" }],
  ['SELECT count(*) FROM rb_items WHERE grp = $1 % 10',
   ->(r, _) { r.getvalue(0, 0) == (ROWS / 10).to_s }],
  ['SELECT $1::int + 1000', ->(r, i) { r.getvalue(0, 0) == (i + 1000).to_s }],
  ['SELECT upper(name) FROM rb_items WHERE id = $1', ->(r, i) { r.getvalue(0, 0) == "ITEM-#{i}" }],
].freeze

def prepare_all(conn, idx)
  QUERIES.size.times do |k|
    sql, = QUERIES[(idx + k) % QUERIES.size]
    conn.prepare("q#{k}", sql)
  end
  conn.prepare('ledger', 'INSERT INTO rb_ledger (thread, rnd, amount) VALUES ($1, $2, $3)')
  conn.prepare('ledger_sum',
               'SELECT count(*), coalesce(sum(amount), 0) FROM rb_ledger WHERE thread = $1')
end

def run_prepared(conn, idx, i)
  QUERIES.size.times do |k|
    sql, ok = QUERIES[(idx + k) % QUERIES.size]
    res = conn.exec_prepared("q#{k}", [i])
    check(ok.call(res, i), "thread #{idx} q#{k} (#{sql}) for #{i}: #{res.values.inspect}")
  end
  QUERIES.size
end

def worker(idx)
  conn = connect
  prepare_all(conn, idx)
  done = 0
  ROUNDS.times do |rnd|
    i = (idx * 13 + rnd) % ROWS
    case rnd % 4
    when 0
      conn.transaction do |tx|
        pid = tx.exec('SELECT pg_backend_pid()').getvalue(0, 0)
        done += run_prepared(tx, idx, i)
        tx.exec_prepared('ledger', [idx, rnd, rnd + 1])
        same = tx.exec('SELECT pg_backend_pid()').getvalue(0, 0) == pid
        check(same, 'one server per transaction')
        done += 1
      end
    when 1
      # A transaction that fails half-way: its ledger row must not stay.
      begin
        conn.transaction do |tx|
          tx.exec_prepared('ledger', [idx, rnd, 1_000_000])
          run_prepared(tx, idx, i)
          raise CheckFailed, 'roll back'
        end
      rescue CheckFailed => e
        raise unless e.message == 'roll back'
      end
    when 2
      done += run_prepared(conn, idx, i)
      res = conn.exec_params('SELECT name, grp FROM rb_items WHERE id = $1 AND grp = $2',
                             [i, i % 10])
      check(res.ntuples == 1 && res.getvalue(0, 0) == "item-#{i}", "exec_params #{i}")
      done += 1
    else
      done += run_prepared(conn, idx, i)
      conn.exec_prepared('ledger', [idx, rnd, rnd + 1])
      done += 1
    end
  end
  # Rounds 0 and 3 (mod 4) committed a row of rnd + 1; rounds 1 were rolled back.
  kept = (0...ROUNDS).select { |r| [0, 3].include?(r % 4) }
  res = conn.exec_prepared('ledger_sum', [idx])
  check(res.getvalue(0, 0).to_i == kept.size, "thread #{idx} ledger rows #{res.values.inspect}")
  check(res.getvalue(0, 1).to_i == kept.sum { |r| r + 1 },
        "thread #{idx} ledger sum #{res.values.inspect}")
  conn.close
  done + 1
end

def main
  setup
  started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
  errors = Queue.new
  counts = Array.new(THREADS, 0)
  threads = Array.new(THREADS) do |idx|
    Thread.new do
      counts[idx] = worker(idx)
    rescue StandardError => e
      errors << "thread #{idx}: #{e.class}: #{e.message}"
    end
  end
  threads.each(&:join)
  unless errors.empty?
    warn "ruby-pg FAILED: #{errors.pop}" until errors.empty?
    exit 1
  end
  conn = connect
  res = conn.exec('SELECT count(*), coalesce(sum(amount), 0) FROM rb_ledger')
  rows, total = res.values.first.map(&:to_i)
  conn.close
  kept = (0...ROUNDS).select { |r| [0, 3].include?(r % 4) }
  check(rows == THREADS * kept.size, "ledger rows #{rows}")
  check(total == THREADS * kept.sum { |r| r + 1 }, "ledger sum #{total}")
  elapsed = Process.clock_gettime(Process::CLOCK_MONOTONIC) - started
  puts format('ruby-pg ok: threads=%d queries=%d ledger_rows=%d ledger_sum=%d seconds=%.1f',
              THREADS, counts.sum, rows, total, elapsed)
end

main
