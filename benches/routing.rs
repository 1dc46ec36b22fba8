//! Routing cost per statement for a sharded database: parse-cache hit
//! (a statement shape seen before), cache miss (libpg_query parse), and the
//! partition hash alone. Run: `cargo bench --bench routing`.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use weir::config::{Address, Database, ShardSection, ShardedTable};
use weir::router::route::{BindParams, ShardRouter};
use weir::router::{shard_for, KeyType, KeyValue};

fn database() -> Database {
    Database {
        name: "shop".into(),
        address: Address {
            host: "127.0.0.1".into(),
            port: 5432,
        },
        dbname: "shop".into(),
        user: None,
        password: None,
        auth_user: None,
        auth_query: String::new(),
        auth_dbname: None,
        pool_size: None,
        min_pool_size: 0,
        reserve_pool_size: 0,
        pool_mode: None,
        max_db_connections: 0,
        max_db_client_connections: 0,
        query_wait_timeout: None,
        server_lifetime: None,
        server_params: vec![],
        connect_query: None,
        hosts: vec![],
        load_balance_hosts: None,
        shards: vec![
            ShardSection {
                primary: "127.0.0.1:5433".into(),
                replicas: vec![],
                dbname: None,
            },
            ShardSection {
                primary: "127.0.0.1:5434".into(),
                replicas: vec![],
                dbname: None,
            },
        ],
        sharded_tables: vec![ShardedTable {
            table: "orders".into(),
            column: "customer_id".into(),
            key_type: "bigint".into(),
        }],
        read_from_replicas: false,
        read_your_writes: weir::config::ReadYourWrites::Off,
        replica_lsn_interval: std::time::Duration::from_millis(10),
        max_replica_lag: std::time::Duration::ZERO,
        max_replica_lag_bytes: 0,
        two_phase_commit: false,
        cross_shard_lock_timeout: std::time::Duration::from_secs(1),
    }
}

fn bench(c: &mut Criterion) {
    let router = ShardRouter::new(&database()).expect("sharded");
    let hit = "SELECT * FROM orders WHERE customer_id = 42";
    router.analyze(hit);
    c.bench_function("route_cache_hit", |b| {
        b.iter(|| {
            let a = router.analyze(black_box(hit));
            router.decide(&a, &BindParams::default(), None, false)
        })
    });
    let mut n = 0u64;
    c.bench_function("route_cache_miss", |b| {
        b.iter(|| {
            n += 1;
            let sql = format!("SELECT * FROM orders WHERE customer_id = {n} AND total > 1");
            let a = router.analyze(black_box(&sql));
            router.decide(&a, &BindParams::default(), None, false)
        })
    });
    // Simple queries that differ only in the key literal share one shape.
    let mut m = 0u64;
    c.bench_function("route_shape_hit_new_literal", |b| {
        b.iter(|| {
            m += 1;
            let sql = format!("SELECT * FROM orders WHERE customer_id = {m} AND total > 1");
            let (a, shape) = router.analyze_simple(black_box(&sql));
            let params = match &shape {
                Some(s) => BindParams::from_text(&s.values),
                None => BindParams::default(),
            };
            router.decide(&a, &params, None, false)
        })
    });
    c.bench_function("hash_bigint_only", |b| {
        b.iter(|| shard_for(KeyType::Bigint, black_box(&KeyValue::Int(42)), 2))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
