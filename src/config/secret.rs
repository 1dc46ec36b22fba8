//! The password forms PgBouncer and PostgreSQL store: plain text, `md5<hex>`
//! and SCRAM-SHA-256 verifiers (`SCRAM-SHA-256$<iter>:<salt>$<stored>:<server>`).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    Plain(String),
    /// The 32 hex digits of md5(password || username).
    Md5(String),
    Scram(ScramVerifier),
}

#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret::{}(..)", self.kind())
    }
}

impl Secret {
    /// Classifies a stored password; anything that is not a well-formed md5 or
    /// SCRAM secret is a plain password, as in PgBouncer.
    pub fn parse(text: &str) -> Secret {
        if let Some(hex) = text.strip_prefix("md5") {
            if hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Secret::Md5(hex.to_ascii_lowercase());
            }
        }
        if let Some(v) = ScramVerifier::parse(text) {
            return Secret::Scram(v);
        }
        Secret::Plain(text.to_string())
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Secret::Plain(_) => "plain",
            Secret::Md5(_) => "md5",
            Secret::Scram(_) => "scram-sha-256",
        }
    }
}

impl ScramVerifier {
    pub fn parse(text: &str) -> Option<ScramVerifier> {
        let rest = text.strip_prefix("SCRAM-SHA-256$")?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iter, salt) = iter_salt.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(ScramVerifier {
            iterations: iter.parse().ok()?,
            salt: B64.decode(salt).ok()?,
            stored_key: B64.decode(stored).ok()?.try_into().ok()?,
            server_key: B64.decode(server).ok()?.try_into().ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_secrets() {
        assert_eq!(Secret::parse("hunter2").kind(), "plain");
        assert_eq!(
            Secret::parse("md5a3556571e93b0d20722ba62be61e8c2d").kind(),
            "md5"
        );
        assert_eq!(Secret::parse("md5short").kind(), "plain");
        let v = postgres_protocol::password::scram_sha_256(b"pw");
        match Secret::parse(&v) {
            Secret::Scram(s) => assert_eq!(s.iterations, 4096),
            other => panic!("{other:?}"),
        }
    }
}
