//! PostgreSQL's hash partitioning, reimplemented so that Weir sends a row to
//! the shard that `PARTITION BY HASH (col)` would put it in: shard `i` of `N`
//! holds the rows of the partition `FOR VALUES WITH (MODULUS N, REMAINDER i)`.
//!
//! Matched PostgreSQL 15 functions:
//! - `hash_bytes_extended` and `hash_bytes_uint32_extended`
//!   (`src/common/hashfn.c`): Bob Jenkins' lookup3 mixing with a 64-bit seed.
//! - the `integer_ops`, `text_ops` and `uuid_ops` extended hash support
//!   functions: `hashint4extended`, `hashint8extended`, `hashtextextended`
//!   (deterministic collations only) and `uuid_hash_extended`.
//! - `compute_partition_hash_value` (`src/backend/partitioning/partbounds.c`)
//!   with `HASH_PARTITION_SEED` and `hash_combine64`, and the
//!   `row_hash % modulus` lookup of `get_partition_for_tuple`.
//!
//! PostgreSQL reads the key bytes in native order, so hashes differ on
//! big-endian servers; this matches the little-endian ones (x86-64, arm64).
//!
//! Nothing here allocates, so it can sit on the per-query path.

use super::key::{KeyType, KeyValue};
use super::HashError;
use std::num::NonZeroU64;

/// `HASH_PARTITION_SEED` from `partition.h`.
pub const HASH_PARTITION_SEED: u64 = 0x7A5B_2236_7996_DCFD;

/// `0x9e3779b9 + 3923095`: lookup3's golden ratio plus PostgreSQL's offset,
/// to which the key length is added.
const INITVAL: u32 = 0x9e37_79b9_u32.wrapping_add(3_923_095);

/// The three-word lookup3 state.
struct Lookup3 {
    a: u32,
    b: u32,
    c: u32,
}

impl Lookup3 {
    /// The start of both `hash_bytes*_extended` functions: length-dependent
    /// initial value, and a seed that is mixed in only when non-zero.
    fn new(len: u32, seed: u64) -> Self {
        let init = INITVAL.wrapping_add(len);
        let mut s = Lookup3 {
            a: init,
            b: init,
            c: init,
        };
        if seed != 0 {
            s.a = s.a.wrapping_add((seed >> 32) as u32);
            s.b = s.b.wrapping_add(seed as u32);
            s.mix();
        }
        s
    }

    fn add(&mut self, a: u32, b: u32, c: u32) {
        self.a = self.a.wrapping_add(a);
        self.b = self.b.wrapping_add(b);
        self.c = self.c.wrapping_add(c);
    }

    /// lookup3's `mix()`.
    fn mix(&mut self) {
        let Lookup3 { a, b, c } = self;
        *a = a.wrapping_sub(*c) ^ c.rotate_left(4);
        *c = c.wrapping_add(*b);
        *b = b.wrapping_sub(*a) ^ a.rotate_left(6);
        *a = a.wrapping_add(*c);
        *c = c.wrapping_sub(*b) ^ b.rotate_left(8);
        *b = b.wrapping_add(*a);
        *a = a.wrapping_sub(*c) ^ c.rotate_left(16);
        *c = c.wrapping_add(*b);
        *b = b.wrapping_sub(*a) ^ a.rotate_left(19);
        *a = a.wrapping_add(*c);
        *c = c.wrapping_sub(*b) ^ b.rotate_left(4);
        *b = b.wrapping_add(*a);
    }

    /// lookup3's `final()`, then the 64-bit result `(b << 32) | c`.
    fn finish(mut self) -> u64 {
        let Lookup3 { a, b, c } = &mut self;
        *c = (*c ^ *b).wrapping_sub(b.rotate_left(14));
        *a = (*a ^ *c).wrapping_sub(c.rotate_left(11));
        *b = (*b ^ *a).wrapping_sub(a.rotate_left(25));
        *c = (*c ^ *b).wrapping_sub(b.rotate_left(16));
        *a = (*a ^ *c).wrapping_sub(c.rotate_left(4));
        *b = (*b ^ *a).wrapping_sub(a.rotate_left(14));
        *c = (*c ^ *b).wrapping_sub(b.rotate_left(24));
        (u64::from(self.b) << 32) | u64::from(self.c)
    }
}

fn le32(bytes: [u8; 4]) -> u32 {
    u32::from_le_bytes(bytes)
}

/// `hash_bytes_extended` (`hash_any_extended`): the 64-bit hash of a byte
/// string.
pub fn hash_bytes_extended(key: &[u8], seed: u64) -> u64 {
    // PostgreSQL adds the length as a 32-bit int; no Datum is anywhere near
    // 4 GiB (the varlena limit is 1 GiB), so truncation cannot differ.
    let mut s = Lookup3::new(key.len() as u32, seed);
    let (blocks, tail) = key.as_chunks::<12>();
    for k in blocks {
        s.add(
            le32([k[0], k[1], k[2], k[3]]),
            le32([k[4], k[5], k[6], k[7]]),
            le32([k[8], k[9], k[10], k[11]]),
        );
        s.mix();
    }
    // The last 0..=11 bytes fill a, b and then c from its second byte up
    // ("the lowest byte of c is reserved for the length"); zero padding
    // adds nothing, which is why an empty tail needs no special case.
    let mut k = [0u8; 12];
    k[..tail.len()].copy_from_slice(tail);
    s.add(
        le32([k[0], k[1], k[2], k[3]]),
        le32([k[4], k[5], k[6], k[7]]),
        le32([k[8], k[9], k[10], k[11]]) << 8,
    );
    s.finish()
}

/// `hash_bytes_uint32_extended` (`hash_uint32_extended`): the 64-bit hash of
/// one 32-bit word.
#[inline]
pub fn hash_bytes_uint32_extended(k: u32, seed: u64) -> u64 {
    let mut s = Lookup3::new(4, seed);
    s.add(k, 0, 0);
    s.finish()
}

/// `hashint4extended`.
#[inline]
pub fn hashint4extended(value: i32, seed: u64) -> u64 {
    hash_bytes_uint32_extended(value as u32, seed)
}

/// `hashint8extended`: folds the high half into the low half so that every
/// value that fits in an `int4` hashes as `hashint4extended` does (the
/// `integer_ops` family promises cross-type equality).
#[inline]
pub fn hashint8extended(value: i64, seed: u64) -> u64 {
    let low = value as u32;
    let high = (value >> 32) as u32;
    let folded = low ^ if value >= 0 { high } else { !high };
    hash_bytes_uint32_extended(folded, seed)
}

/// `hashtextextended` for a deterministic collation: the hash of the bytes.
/// (Nondeterministic ICU collations hash a sort key instead; unsupported.)
#[inline]
pub fn hashtextextended(text: &str, seed: u64) -> u64 {
    hash_bytes_extended(text.as_bytes(), seed)
}

/// `uuid_hash_extended`: the hash of the 16 bytes.
#[inline]
pub fn uuid_hash_extended(uuid: &[u8; 16], seed: u64) -> u64 {
    hash_bytes_extended(uuid, seed)
}

/// `hash_combine64` from `hashfn.h`; C's unsigned arithmetic wraps.
#[inline]
pub fn hash_combine64(a: u64, b: u64) -> u64 {
    a ^ b
        .wrapping_add(0x49a0_f4dd_15e5_a8e3)
        .wrapping_add(a << 54)
        .wrapping_add(a >> 7)
}

/// The partition-key hash of one value: the type's extended hash support
/// function with `HASH_PARTITION_SEED`, or `None` for NULL.
///
/// An `integer` key outside the `int4` range, or a value of the wrong kind,
/// is an error: PostgreSQL would never store such a row.
pub fn hash_value(key_type: KeyType, value: &KeyValue<'_>) -> Result<Option<u64>, HashError> {
    let seed = HASH_PARTITION_SEED;
    let hash = match (key_type, *value) {
        (_, KeyValue::Null) => return Ok(None),
        (KeyType::Bigint, KeyValue::Int(v)) => hashint8extended(v, seed),
        (KeyType::Integer, KeyValue::Int(v)) => {
            let v = i32::try_from(v).map_err(|_| HashError::OutOfRange(key_type))?;
            hashint4extended(v, seed)
        }
        (KeyType::Text, KeyValue::Text(s)) => hashtextextended(s, seed),
        (KeyType::Uuid, KeyValue::Uuid(u)) => uuid_hash_extended(&u, seed),
        (_, other) => {
            return Err(HashError::TypeMismatch {
                key_type,
                value: other.kind(),
            })
        }
    };
    Ok(Some(hash))
}

/// `compute_partition_hash_value`: the row hash over the partition key's
/// columns in order, starting from 0, with NULL columns skipped. A key of
/// all NULLs therefore hashes to 0 and lands in remainder 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RowHash(u64);

impl RowHash {
    pub const fn new() -> Self {
        RowHash(0)
    }

    /// Adds the next key column.
    pub fn push(&mut self, key_type: KeyType, value: &KeyValue<'_>) -> Result<(), HashError> {
        if let Some(hash) = hash_value(key_type, value)? {
            self.0 = hash_combine64(self.0, hash);
        }
        Ok(())
    }

    pub fn get(self) -> u64 {
        self.0
    }

    /// The remainder, i.e. the partition (shard) among `modulus` equal ones,
    /// as `get_partition_for_tuple` computes it: unsigned `row_hash % N`.
    pub fn remainder(self, modulus: NonZeroU64) -> u64 {
        self.0 % modulus
    }
}

/// The shard (0-based) of a single-column key among `shards` shards.
pub fn shard_for(key_type: KeyType, value: &KeyValue<'_>, shards: u64) -> Result<u64, HashError> {
    let shards = NonZeroU64::new(shards).ok_or(HashError::NoShards)?;
    let mut row = RowHash::new();
    row.push(key_type, value)?;
    Ok(row.remainder(shards))
}

#[cfg(test)]
mod tests {
    //! Every vector below was produced by PostgreSQL 15.18 (UTF8 database,
    //! C.UTF-8 collation, x86-64): hashes by `hashint8extended(v,
    //! 8816678312871386365)` and its siblings (that seed is
    //! `HASH_PARTITION_SEED` as a signed bigint), remainders by inserting
    //! each value into tables `PARTITION BY HASH (k)` with one partition per
    //! remainder for moduli 2, 3, 4 and 7 and reading back `tableoid`.

    use super::*;
    use crate::router::key::parse_key;

    const MODULI: [u64; 4] = [2, 3, 4, 7];

    /// (value, hash with HASH_PARTITION_SEED, remainders for `MODULI`)
    const BIGINT: &[(i64, u64, [u64; 4])] = &[
        (0, 0xc2e34bda39f0f0cd, [0, 2, 0, 4]),
        (1, 0x52d621058124e6d5, [0, 2, 0, 5]),
        (-1, 0xba5fc748095606c2, [1, 2, 1, 0]),
        (2, 0xa1da1e669978f897, [0, 0, 2, 6]),
        (-2, 0x1dce30b74062c547, [0, 1, 2, 4]),
        (42, 0x663218bcfb84b17f, [0, 0, 2, 0]),
        (-42, 0x5c6f545b0b7cb85f, [0, 2, 2, 4]),
        (100, 0xa0c32bd47a3fe976, [1, 2, 1, 4]),
        (1000000, 0x38e19881c1f9bfa8, [1, 0, 3, 4]),
        (2147483647, 0xac09237e4899f89c, [1, 1, 3, 0]),
        (-2147483648, 0x44893a0f1e949193, [0, 0, 2, 3]),
        (2147483648, 0x44893a0f1e949193, [0, 0, 2, 3]),
        (-2147483649, 0xac09237e4899f89c, [1, 1, 3, 0]),
        (4294967295, 0xba5fc748095606c2, [1, 2, 1, 0]),
        (4294967296, 0x52d621058124e6d5, [0, 2, 0, 5]),
        (-4294967296, 0xc2e34bda39f0f0cd, [0, 2, 0, 4]),
        (1234567890123, 0x3ac2d831d1eac5ec, [1, 0, 3, 0]),
        (-1234567890123, 0x4e50ba0490cbbefe, [1, 1, 1, 2]),
        (i64::MAX, 0x44893a0f1e949193, [0, 0, 2, 3]),
        (i64::MIN, 0xac09237e4899f89c, [1, 1, 3, 0]),
    ];

    const INTEGER: &[(i32, u64, [u64; 4])] = &[
        (0, 0xc2e34bda39f0f0cd, [0, 2, 0, 4]),
        (1, 0x52d621058124e6d5, [0, 2, 0, 5]),
        (-1, 0xba5fc748095606c2, [1, 2, 1, 0]),
        (2, 0xa1da1e669978f897, [0, 0, 2, 6]),
        (-2, 0x1dce30b74062c547, [0, 1, 2, 4]),
        (42, 0x663218bcfb84b17f, [0, 0, 2, 0]),
        (-42, 0x5c6f545b0b7cb85f, [0, 2, 2, 4]),
        (100, 0xa0c32bd47a3fe976, [1, 2, 1, 4]),
        (65536, 0xa4c9d2b4b3f7b1a1, [0, 0, 0, 0]),
        (-65536, 0xc48bdd31eb0fb51f, [0, 0, 2, 6]),
        (123456789, 0xf3311fb2440a2aea, [1, 1, 1, 4]),
        (i32::MAX, 0xac09237e4899f89c, [1, 1, 3, 0]),
        (i32::MIN, 0x44893a0f1e949193, [0, 0, 2, 3]),
    ];

    /// Prefixes of the alphabet of every length 0..=26 walk each tail
    /// length of `hash_bytes_extended` with zero, one and two full blocks.
    const TEXT: &[(&str, u64, [u64; 4])] = &[
        ("", 0xb0e33d0b543fbfc3, [0, 2, 2, 1]),
        ("a", 0xa2f240f8823ba67b, [0, 2, 2, 3]),
        ("ab", 0x0845730e49baf33d, [0, 0, 0, 6]),
        ("abc", 0x325c02d16f43e1c2, [1, 1, 1, 3]),
        ("abcd", 0x37eb4043f6fdb06e, [1, 2, 1, 5]),
        ("abcde", 0x42bdebaa1b2c17d9, [0, 1, 0, 0]),
        ("abcdef", 0xf6dc296ce47a2776, [1, 1, 1, 1]),
        ("abcdefg", 0xeaf53e7fbf379bae, [1, 2, 1, 4]),
        ("abcdefgh", 0x94619c573ca212b2, [1, 2, 1, 5]),
        ("abcdefghi", 0x92e90b933de8cba0, [1, 1, 3, 1]),
        ("abcdefghij", 0x8cba26807c1916a1, [0, 1, 0, 3]),
        ("abcdefghijk", 0xe39999edea562278, [1, 0, 3, 3]),
        ("abcdefghijkl", 0x92b003d370554786, [1, 1, 1, 3]),
        ("abcdefghijklm", 0xa1d42895caa786b3, [0, 1, 2, 0]),
        ("abcdefghijklmn", 0xb7b2713c0dbc9ab3, [0, 1, 2, 6]),
        ("abcdefghijklmno", 0x33f5ba500ae30b98, [1, 1, 3, 5]),
        ("abcdefghijklmnop", 0xd6e06f0d1d6bcb47, [0, 1, 2, 3]),
        ("abcdefghijklmnopq", 0xc4768bb0fc014eb9, [0, 0, 0, 4]),
        ("abcdefghijklmnopqr", 0xc8d1b82f5e85d036, [1, 2, 1, 5]),
        ("abcdefghijklmnopqrs", 0x58fa7c4493410593, [0, 2, 2, 1]),
        ("abcdefghijklmnopqrst", 0xcc3b5ca11578b6eb, [0, 1, 2, 2]),
        ("abcdefghijklmnopqrstu", 0x82f7e8d4da722f1e, [1, 2, 1, 2]),
        ("abcdefghijklmnopqrstuv", 0x1909c7095acd0c70, [1, 0, 3, 2]),
        ("abcdefghijklmnopqrstuvw", 0x9a59a44ce94b5481, [0, 1, 0, 4]),
        ("abcdefghijklmnopqrstuvwx", 0xffd910c13dcae36e, [1, 1, 1, 4]),
        (
            "abcdefghijklmnopqrstuvwxy",
            0x13317813436137bf,
            [0, 1, 2, 3],
        ),
        (
            "abcdefghijklmnopqrstuvwxyz",
            0x9c7a73cc5c301158,
            [1, 1, 3, 4],
        ),
        ("hello world", 0x6a5d0d0ef960c4a5, [0, 1, 0, 4]),
        ("Weir", 0x1de04f3c473aa028, [1, 0, 3, 5]),
        ("ünïcødé", 0x77e3a3a983124600, [1, 2, 3, 6]),
        ("日本語", 0x9047acd944d603db, [0, 0, 2, 6]),
        ("🦀", 0x116b5f25dfc40049, [0, 0, 0, 0]),
        (
            "The quick brown fox jumps over the lazy dog",
            0x517737d437d650e6,
            [1, 1, 1, 1],
        ),
        (" leading and trailing ", 0xc264379fbf36502b, [0, 1, 2, 3]),
        ("MixedCASE", 0x34c809ce4f3200aa, [1, 0, 1, 6]),
    ];

    const UUID: &[(&str, u64, [u64; 4])] = &[
        (
            "00000000-0000-0000-0000-000000000000",
            0xb6b5d3c4aa5d92c2,
            [1, 0, 1, 2],
        ),
        (
            "ffffffff-ffff-ffff-ffff-ffffffffffff",
            0xfdeeb1999c98549e,
            [1, 1, 1, 0],
        ),
        (
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            0x05e42c7f7f75bced,
            [0, 1, 0, 6],
        ),
        (
            "123e4567-e89b-12d3-a456-426614174000",
            0xee9f87f344f2caa2,
            [1, 1, 1, 5],
        ),
        (
            "550e8400-e29b-41d4-a716-446655440000",
            0xcfdf92ea773ffce6,
            [1, 2, 1, 4],
        ),
        (
            "6ba7b810-9dad-11d1-80b4-00c04fd430c8",
            0xe2d8106b9773f303,
            [0, 1, 2, 4],
        ),
        (
            "01890a5d-ac96-774b-bcce-b302099a8057",
            0x3ffa5ced18d1636d,
            [0, 2, 0, 1],
        ),
        (
            "f81d4fae-7dec-11d0-a765-00a0c91e6bf6",
            0xf727bb466280fbfd,
            [0, 2, 0, 3],
        ),
    ];

    fn check(key_type: KeyType, value: KeyValue<'_>, hash: u64, remainders: [u64; 4]) {
        assert_eq!(hash_value(key_type, &value), Ok(Some(hash)), "{value:?}");
        for (modulus, want) in MODULI.into_iter().zip(remainders) {
            let got = shard_for(key_type, &value, modulus);
            assert_eq!(got, Ok(want), "{value:?} modulus {modulus}");
        }
    }

    #[test]
    fn partition_seed_is_the_signed_bigint_postgres_prints() {
        assert_eq!(HASH_PARTITION_SEED, 8816678312871386365);
    }

    #[test]
    fn bigint_keys_land_where_postgres_puts_them() {
        for &(v, hash, remainders) in BIGINT {
            assert_eq!(hashint8extended(v, HASH_PARTITION_SEED), hash, "{v}");
            check(KeyType::Bigint, KeyValue::Int(v), hash, remainders);
        }
    }

    #[test]
    fn integer_keys_land_where_postgres_puts_them() {
        for &(v, hash, remainders) in INTEGER {
            assert_eq!(hashint4extended(v, HASH_PARTITION_SEED), hash, "{v}");
            check(KeyType::Integer, KeyValue::Int(v.into()), hash, remainders);
        }
    }

    #[test]
    fn text_keys_land_where_postgres_puts_them() {
        for &(v, hash, remainders) in TEXT {
            check(KeyType::Text, KeyValue::Text(v), hash, remainders);
        }
    }

    #[test]
    fn uuid_keys_land_where_postgres_puts_them() {
        for &(text, hash, remainders) in UUID {
            let value = parse_key(KeyType::Uuid, text);
            assert!(matches!(value, Ok(KeyValue::Uuid(_))), "{text}");
            if let Ok(value) = value {
                check(KeyType::Uuid, value, hash, remainders);
            }
        }
    }

    #[test]
    fn null_keys_land_in_remainder_zero() {
        for t in [
            KeyType::Bigint,
            KeyType::Integer,
            KeyType::Text,
            KeyType::Uuid,
        ] {
            assert_eq!(hash_value(t, &KeyValue::Null), Ok(None));
            for modulus in MODULI {
                assert_eq!(shard_for(t, &KeyValue::Null, modulus), Ok(0));
            }
        }
    }

    /// `SELECT hashtextextended(s, seed), hashint4extended(i, seed)`,
    /// covering the seed-zero path that skips the seed `mix()`.
    #[test]
    fn raw_hashes_match_postgres_for_other_seeds() {
        let cases: [(&str, i32, u64, u64, u64); 6] = [
            ("", 0, 0, 0x9fb1b765a7ea466d, 0x39a825beefbec0af),
            ("abc", 1, 0, 0xa25b273dd12feb97, 0xcd0f69c48e731746),
            (
                "abcdefghijklm",
                -1,
                0,
                0x7b1e572e1830c6d0,
                0xe5cb8f9016fe094a,
            ),
            ("abc", 42, 1, 0x1d7feafe1d185a5d, 0x34e8f2e667710bc0),
            ("abc", 42, u64::MAX, 0x1a86146d4d561077, 0xa9fbad3d2e66a3ca),
            ("abc", 42, 1 << 32, 0xee60c9babd69c208, 0x43573fca134b0e3f),
        ];
        for (text, int, seed, text_hash, int_hash) in cases {
            assert_eq!(hashtextextended(text, seed), text_hash, "{text:?} {seed}");
            assert_eq!(hashint4extended(int, seed), int_hash, "{int} {seed}");
        }
    }

    /// A table `PARTITION BY HASH (a bigint, b text)` with modulus 7.
    #[test]
    fn multi_column_keys_land_where_postgres_puts_them() {
        use KeyValue::{Int, Null, Text};
        let rows = [
            (Int(1), Text("a"), 0),
            (Int(42), Text("hello world"), 5),
            (Int(-1), Text(""), 0),
            (Null, Text("abc"), 3),
            (Int(7), Null, 6),
            (Null, Null, 0),
            (Int(i64::MAX), Text("🦀"), 2),
            (Int(0), Text("Weir"), 3),
        ];
        let seven = NonZeroU64::MIN.saturating_add(6);
        for (a, b, want) in rows {
            let mut row = RowHash::new();
            assert_eq!(row.push(KeyType::Bigint, &a), Ok(()));
            assert_eq!(row.push(KeyType::Text, &b), Ok(()));
            assert_eq!(row.remainder(seven), want, "({a:?}, {b:?})");
        }
    }

    #[test]
    fn mismatched_or_out_of_range_values_are_errors() {
        let int = KeyType::Integer;
        let too_big = KeyValue::Int(1 << 31);
        assert_eq!(hash_value(int, &too_big), Err(HashError::OutOfRange(int)));
        let mismatch = hash_value(KeyType::Uuid, &KeyValue::Text("x"));
        let want = HashError::TypeMismatch {
            key_type: KeyType::Uuid,
            value: "text",
        };
        assert_eq!(mismatch, Err(want));
        let zero = shard_for(KeyType::Bigint, &KeyValue::Int(1), 0);
        assert_eq!(zero, Err(HashError::NoShards));
    }
}
