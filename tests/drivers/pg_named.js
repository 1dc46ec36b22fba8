// node-postgres (`pg`) through Weir: named queries from a pg.Pool of 10 connections.
//
// Run by tests/drivers.rs against a Weir whose pool has 2 server connections. node-postgres
// sends Parse for a named query once per connection and afterwards only Bind/Execute, so Weir
// must re-prepare the statement on whichever server each connection lands on. Some work runs
// in explicit transactions on a checked-out client; a column is added half-way through.
// Exits non-zero on any error; prints one `node-postgres ok ...` line.
//
// Connection settings come from the environment: WEIR_HOST, WEIR_PORT, WEIR_USER,
// WEIR_PASSWORD, WEIR_DB.
'use strict';

const { Pool } = require('pg');

const ROWS = 200;
const TASKS = 20;
const ROUNDS = 40;

const config = {
  host: process.env.WEIR_HOST || '127.0.0.1',
  port: Number(process.env.WEIR_PORT),
  user: process.env.WEIR_USER,
  password: process.env.WEIR_PASSWORD,
  database: process.env.WEIR_DB,
  max: 10,
};

function check(cond, what) {
  if (!cond) {
    throw new Error(`check failed: ${what}`);
  }
}

const QUERIES = {
  byId: 'SELECT name FROM items WHERE id = $1',
  countGrp: 'SELECT count(*)::int AS n FROM items WHERE grp = $1',
  range: 'SELECT id FROM items WHERE id >= $1 AND id < $2 ORDER BY id',
  add: 'SELECT $1::int + $2::int AS s',
  extra: 'SELECT extra FROM items WHERE id = $1',
};

async function named(db, name, values) {
  return db.query({ name, text: QUERIES[name], values });
}

async function setup(pool) {
  await pool.query('DROP TABLE IF EXISTS items');
  await pool.query(
    'CREATE TABLE items (id int PRIMARY KEY, grp int NOT NULL, name text NOT NULL)',
  );
  await pool.query(
    "INSERT INTO items SELECT g, g % 10, 'item-' || g FROM generate_series(0, $1::int - 1) g",
    [ROWS],
  );
}

async function oneRound(db, task, rnd) {
  const i = (task * 31 + rnd * 7) % ROWS;
  const byId = await named(db, 'byId', [i]);
  check(byId.rows[0].name === `item-${i}`, `byId ${i}`);
  const count = await named(db, 'countGrp', [i % 10]);
  check(count.rows[0].n === ROWS / 10, `countGrp ${i % 10}`);
  const range = await named(db, 'range', [i, i + 3]);
  check(range.rows.length === Math.min(3, ROWS - i), `range ${i}`);
  const add = await named(db, 'add', [task, rnd]);
  check(add.rows[0].s === task + rnd, `add ${task} ${rnd}`);
  return 4;
}

async function worker(pool, task) {
  let done = 0;
  for (let rnd = 0; rnd < ROUNDS; rnd++) {
    if (rnd % 4 === 0) {
      const client = await pool.connect();
      try {
        await client.query('BEGIN');
        done += await oneRound(client, task, rnd);
        await client.query('COMMIT');
      } finally {
        client.release();
      }
    } else {
      done += await oneRound(pool, task, rnd);
    }
  }
  return done;
}

async function addColumnMidway(pool) {
  await new Promise((resolve) => setTimeout(resolve, 300));
  await pool.query('ALTER TABLE items ADD COLUMN extra int NOT NULL DEFAULT 7');
  return 0;
}

async function afterSchemaChange(pool, task) {
  for (let rnd = 0; rnd < 10; rnd++) {
    const i = (task + rnd) % ROWS;
    const res = await named(pool, 'extra', [i]);
    check(res.rows[0].extra === 7, `extra ${i}`);
  }
  return 10;
}

async function main() {
  const pool = new Pool(config);
  try {
    await setup(pool);
    const jobs = [addColumnMidway(pool)];
    for (let t = 0; t < TASKS; t++) {
      jobs.push(worker(pool, t));
    }
    let queries = (await Promise.all(jobs)).reduce((a, b) => a + b, 0);
    const after = [];
    for (let t = 0; t < TASKS; t++) {
      after.push(afterSchemaChange(pool, t));
    }
    queries += (await Promise.all(after)).reduce((a, b) => a + b, 0);
    console.log(`node-postgres ok: tasks=${TASKS} queries=${queries}`);
  } finally {
    await pool.end();
  }
}

main().catch((err) => {
  console.error(`node-postgres FAILED: ${err.code || ''} ${err.stack || err}`);
  process.exit(1);
});
