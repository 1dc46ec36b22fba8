//! Query routing for sharded databases: which shard holds a given sharding
//! key.
//!
//! Weir shards the way PostgreSQL's declarative hash partitioning does, so a
//! sharded table can be moved into (or checked against) one server's
//! `PARTITION BY HASH (key)` table and every row stays where it was: shard
//! `i` of `N` is the partition `FOR VALUES WITH (MODULUS N, REMAINDER i)`.
//! [`hash`] reproduces PostgreSQL's hash functions; [`key`] reads a key the
//! way PostgreSQL's input functions do. [`HashRouter`] joins the two for one
//! configured key column, without allocating.

pub mod copy;
pub mod hash;
pub mod key;
pub mod route;
pub mod shape;
pub mod sql;
pub mod wal;

pub use hash::{hash_value, shard_for, RowHash, HASH_PARTITION_SEED};
pub use key::{
    parse_binary_key, parse_key, parse_param, KeyType, KeyValue, ParamFormat, UnknownKeyType,
};

use std::num::NonZeroU64;
use thiserror::Error;

/// Why a key could not be routed. Carries no heap data, so errors are as
/// cheap as successes on the hot path; the caller has the input for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum HashError {
    #[error("invalid input syntax for type {0}")]
    InvalidSyntax(KeyType),
    #[error("value out of range for type {0}")]
    OutOfRange(KeyType),
    #[error("a binary {key_type} parameter cannot be {len} bytes long")]
    BinaryLength { key_type: KeyType, len: usize },
    #[error("text key is not valid UTF-8 or contains a zero byte")]
    InvalidText,
    #[error("a {value} value cannot be a {key_type} sharding key")]
    TypeMismatch {
        key_type: KeyType,
        value: &'static str,
    },
    #[error("unknown parameter format code {0}")]
    UnknownFormat(i16),
    #[error("the number of shards must be at least 1")]
    NoShards,
}

/// Routes keys of one column type among a fixed number of shards: the
/// per-query hot path, which neither allocates nor fails on a valid key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashRouter {
    key_type: KeyType,
    shards: NonZeroU64,
}

impl HashRouter {
    pub fn new(key_type: KeyType, shards: u64) -> Result<Self, HashError> {
        let shards = NonZeroU64::new(shards).ok_or(HashError::NoShards)?;
        Ok(HashRouter { key_type, shards })
    }

    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    pub fn shards(&self) -> u64 {
        self.shards.get()
    }

    /// The shard of an already parsed key.
    pub fn shard_of(&self, value: &KeyValue<'_>) -> Result<u64, HashError> {
        let mut row = RowHash::new();
        row.push(self.key_type, value)?;
        Ok(row.remainder(self.shards))
    }

    /// The shard of a key written as an (unquoted) SQL literal.
    pub fn shard_of_literal(&self, literal: &str) -> Result<u64, HashError> {
        self.shard_of(&parse_key(self.key_type, literal)?)
    }

    /// The shard of a Bind parameter; `None` is NULL.
    pub fn shard_of_param(
        &self,
        format: ParamFormat,
        value: Option<&[u8]>,
    ) -> Result<u64, HashError> {
        self.shard_of(&parse_param(self.key_type, format, value)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_and_binary_parameter_route_alike() {
        let router = HashRouter::new(KeyType::Bigint, 7);
        assert!(router.is_ok());
        let Ok(router) = router else { return };
        let bytes = 1_234_567_890_123_i64.to_be_bytes();
        let binary = router.shard_of_param(ParamFormat::Binary, Some(&bytes));
        let text = router.shard_of_param(ParamFormat::Text, Some(b"1234567890123"));
        // PostgreSQL put 1234567890123 in remainder 0 of modulus 7.
        assert_eq!(router.shard_of_literal(" 1234567890123 "), Ok(0));
        assert_eq!(binary, Ok(0));
        assert_eq!(text, Ok(0));
    }

    #[test]
    fn null_parameter_routes_to_shard_zero() {
        let router = HashRouter::new(KeyType::Uuid, 4);
        let shard = router.and_then(|r| r.shard_of_param(ParamFormat::Text, None));
        assert_eq!(shard, Ok(0));
    }

    #[test]
    fn zero_shards_is_rejected_up_front() {
        assert_eq!(HashRouter::new(KeyType::Text, 0), Err(HashError::NoShards));
    }
}
