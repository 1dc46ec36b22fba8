//! PostgreSQL's md5 password scheme: `"md5" + md5(md5(password || user) || salt)`.

use md5::{Digest, Md5};

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// md5(password || user) as 32 hex digits: what `pg_authid` stores after "md5".
pub fn inner_hash(user: &str, password: &str) -> String {
    let mut h = Md5::new();
    h.update(password.as_bytes());
    h.update(user.as_bytes());
    hex(&h.finalize())
}

/// The response a client sends for a given inner hash and salt.
pub fn salted_response(inner_hex: &str, salt: [u8; 4]) -> String {
    let mut h = Md5::new();
    h.update(inner_hex.as_bytes());
    h.update(salt);
    format!("md5{}", hex(&h.finalize()))
}

/// Constant-time comparison of two responses.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_postgres_protocol() {
        let salt = [1, 2, 3, 4];
        let ours = salted_response(&inner_hash("user", "pw"), salt);
        let theirs = postgres_protocol::authentication::md5_hash(b"user", b"pw", salt);
        assert_eq!(ours, theirs);
        assert!(same(ours.as_bytes(), theirs.as_bytes()));
        assert!(!same(b"a", b"b"));
    }
}
