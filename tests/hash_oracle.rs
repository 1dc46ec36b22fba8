//! Property: for random keys of every sharding key type, and several shard counts, the shard
//! Weir computes (from the key's text, as a literal or a text parameter arrives) is the
//! remainder PostgreSQL's `satisfies_hash_partition` accepts for a `PARTITION BY HASH` table.
//! Edge values (extremes, empty and long strings, multi-byte text) are always included.

#[path = "core_support.rs"]
mod support;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::common::{self, PgCluster};
use weir::router::{parse_key, shard_for, KeyType};

const KEYS_PER_TYPE: usize = 1500;
const SHARD_COUNTS: [u64; 4] = [2, 3, 4, 7];

fn random_text(rng: &mut StdRng) -> String {
    let len = match rng.gen_range(0..10) {
        0 => 0,
        1 => rng.gen_range(100..3000),
        _ => rng.gen_range(1..24),
    };
    (0..len)
        .map(|_| match rng.gen_range(0..6) {
            0 => char::from_u32(rng.gen_range(0x80..0x800)).unwrap_or('é'),
            1 => char::from_u32(rng.gen_range(0x4e00..0x9fff)).unwrap_or('字'),
            2 => char::from_u32(rng.gen_range(0x1f300..0x1f6ff)).unwrap_or('🙂'),
            _ => char::from(rng.gen_range(0x20u8..0x7f)),
        })
        .collect()
}

/// Keys of `key_type` as PostgreSQL prints them.
fn keys(key_type: KeyType, rng: &mut StdRng) -> Vec<String> {
    let mut out: Vec<String> = match key_type {
        KeyType::Bigint => [
            "0",
            "1",
            "-1",
            "9223372036854775807",
            "-9223372036854775808",
        ]
        .map(String::from)
        .to_vec(),
        KeyType::Integer => ["0", "1", "-1", "2147483647", "-2147483648"]
            .map(String::from)
            .to_vec(),
        KeyType::Text => vec![String::new(), " ".into(), "x".repeat(5000), "ß€😀".into()],
        KeyType::Uuid => vec![
            "00000000-0000-0000-0000-000000000000".into(),
            "ffffffff-ffff-ffff-ffff-ffffffffffff".into(),
        ],
    };
    while out.len() < KEYS_PER_TYPE {
        out.push(match key_type {
            KeyType::Bigint => match rng.gen_range(0..3) {
                0 => rng.gen::<i64>().to_string(),
                1 => rng.gen_range(-1000i64..1000).to_string(),
                _ => (rng.gen::<i32>() as i64).to_string(),
            },
            KeyType::Integer => rng.gen::<i32>().to_string(),
            KeyType::Text => random_text(rng),
            KeyType::Uuid => {
                let b: [u8; 16] = rng.gen();
                let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
                format!(
                    "{}-{}-{}-{}-{}",
                    &h[..8],
                    &h[8..12],
                    &h[12..16],
                    &h[16..20],
                    &h[20..]
                )
            }
        });
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_of_every_key_type_matches_satisfies_hash_partition() {
    let cluster = tokio::task::spawn_blocking(PgCluster::start)
        .await
        .expect("cluster");
    let client = common::connect(&cluster.url("postgres", "", "postgres")).await;
    let mut rng = StdRng::seed_from_u64(0x5eed_0000_cafe);
    let mut problems = Vec::new();
    for key_type in [
        KeyType::Bigint,
        KeyType::Integer,
        KeyType::Text,
        KeyType::Uuid,
    ] {
        let ty = key_type.name();
        client
            .batch_execute(&format!(
                "CREATE TABLE hp_{ty} (k {ty}) PARTITION BY HASH (k)"
            ))
            .await
            .expect("create the oracle table");
        let keys = keys(key_type, &mut rng);
        for shards in SHARD_COUNTS {
            let sql = format!(
                "SELECT (SELECT r FROM generate_series(0, $2::int - 1) r \
                   WHERE satisfies_hash_partition('hp_{ty}'::regclass, $2::int, r, k::{ty})) \
                 FROM unnest($1::text[]) WITH ORDINALITY AS u(k, n) ORDER BY n"
            );
            let rows = client
                .query(sql.as_str(), &[&keys, &(shards as i32)])
                .await
                .unwrap_or_else(|e| panic!("{sql}: {}", common::describe_error(&e)));
            assert_eq!(rows.len(), keys.len());
            for (key, row) in keys.iter().zip(rows) {
                let want: i32 = row.get(0);
                let got = parse_key(key_type, key)
                    .map_err(|e| e.to_string())
                    .and_then(|v| shard_for(key_type, &v, shards).map_err(|e| e.to_string()));
                if got != Ok(want as u64) {
                    let shown: String = key.chars().take(40).collect();
                    problems.push(format!(
                        "{ty} {shown:?} of {shards}: Weir {got:?}, PostgreSQL {want}"
                    ));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} keys on the wrong shard:\n  {}",
        problems.len(),
        problems[..problems.len().min(20)].join("\n  ")
    );
}
