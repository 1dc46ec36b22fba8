//! SCRAM-SHA-256 (RFC 5802/7677) in the server role: Weir verifying a client.
//!
//! Plain passwords are turned into a verifier once per user and cached, because
//! the 4096 PBKDF2 rounds cost milliseconds; that work runs off the reactor.

use crate::config::secret::ScramVerifier;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

type HmacSha256 = Hmac<Sha256>;

pub fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// A verifier for a user Weir does not know, as PostgreSQL's `scram_mock_salt`: salt and keys
/// are HMACs of the name under a random per-process secret, so a name gets the same salt on
/// every attempt (an unknown user looks like a known one) and nothing is stored per name.
pub fn mock_verifier(user: &str) -> ScramVerifier {
    static SECRET: OnceLock<[u8; 32]> = OnceLock::new();
    let secret = SECRET.get_or_init(|| {
        let mut s = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut s);
        s
    });
    let derive = |label: &[u8]| {
        let mut data = label.to_vec();
        data.extend_from_slice(user.as_bytes());
        hmac(secret, &data)
    };
    ScramVerifier {
        iterations: 4096,
        salt: derive(b"salt\0")[..16].to_vec(),
        stored_key: derive(b"stored\0"),
        server_key: derive(b"server\0"),
    }
}

/// Most plain-password verifiers kept; the cache is keyed by configured users only, so this
/// bound matters only across many reloads that change passwords.
const MAX_CACHED_VERIFIERS: usize = 10_000;

/// A verifier for a plain password, derived once per (user, password) and cached.
pub async fn verifier_for_plain(user: &str, password: &str) -> Arc<ScramVerifier> {
    type Cache = Mutex<HashMap<(String, String), Arc<ScramVerifier>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (user.to_string(), password.to_string());
    if let Some(v) = cache.lock().get(&key) {
        return v.clone();
    }
    let pw = password.to_string();
    let derived = tokio::task::spawn_blocking(move || {
        let text = postgres_protocol::password::scram_sha_256(pw.as_bytes());
        ScramVerifier::parse(&text)
    })
    .await
    .ok()
    .flatten()
    .unwrap_or_else(|| mock_verifier(user));
    let v = Arc::new(derived);
    let mut cache = cache.lock();
    if cache.len() >= MAX_CACHED_VERIFIERS {
        cache.clear();
    }
    cache.insert(key, v.clone());
    v
}

/// Server side of one SCRAM exchange.
pub struct ScramServer {
    verifier: Arc<ScramVerifier>,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

/// Why a SCRAM exchange failed: a malformed message or a wrong password.
#[derive(Debug, PartialEq, Eq)]
pub enum ScramFailure {
    Malformed(&'static str),
    WrongPassword,
}

impl ScramServer {
    /// Handles client-first-message; returns the exchange and server-first-message.
    pub fn start(
        verifier: Arc<ScramVerifier>,
        client_first: &[u8],
    ) -> Result<(Self, String), ScramFailure> {
        let text =
            std::str::from_utf8(client_first).map_err(|_| ScramFailure::Malformed("not UTF-8"))?;
        let bare = match text.get(..3) {
            Some("n,,") | Some("y,,") => &text[3..],
            _ if text.starts_with("p=") => {
                return Err(ScramFailure::Malformed("channel binding is not supported"))
            }
            _ => return Err(ScramFailure::Malformed("bad GS2 header")),
        };
        let client_nonce = bare
            .split(',')
            .find_map(|attr| attr.strip_prefix("r="))
            .ok_or(ScramFailure::Malformed("missing nonce"))?;
        let mut raw = [0u8; 18];
        rand::thread_rng().fill_bytes(&mut raw);
        let nonce = format!("{client_nonce}{}", B64.encode(raw));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        Ok((
            ScramServer {
                verifier,
                client_first_bare: bare.to_string(),
                server_first: server_first.clone(),
                nonce,
            },
            server_first,
        ))
    }

    /// Handles client-final-message; on success returns server-final-message and
    /// the ClientKey the client proved it knows.
    pub fn finish(self, client_final: &[u8]) -> Result<(String, [u8; 32]), ScramFailure> {
        let text =
            std::str::from_utf8(client_final).map_err(|_| ScramFailure::Malformed("not UTF-8"))?;
        let (without_proof, proof_b64) = text
            .rsplit_once(",p=")
            .ok_or(ScramFailure::Malformed("missing proof"))?;
        let nonce = without_proof
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .ok_or(ScramFailure::Malformed("missing nonce"))?;
        if nonce != self.nonce {
            return Err(ScramFailure::Malformed("nonce mismatch"));
        }
        let proof = B64
            .decode(proof_b64)
            .map_err(|_| ScramFailure::Malformed("bad proof encoding"))?;
        if proof.len() != 32 {
            return Err(ScramFailure::Malformed("bad proof length"));
        }
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for i in 0..32 {
            client_key[i] = proof[i] ^ signature[i];
        }
        if sha256(&client_key) != self.verifier.stored_key {
            return Err(ScramFailure::WrongPassword);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok((format!("v={}", B64.encode(server_signature)), client_key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    async fn exchange(stored_pw: &str, client_pw: &str) -> Result<(), ScramFailure> {
        let verifier = verifier_for_plain("u", stored_pw).await;
        let mut client = ScramSha256::new(client_pw.as_bytes(), ChannelBinding::unsupported());
        let (server, first) = ScramServer::start(verifier, client.message())?;
        client
            .update(first.as_bytes())
            .expect("server-first accepted");
        let (fin, _) = server.finish(client.message())?;
        client
            .finish(fin.as_bytes())
            .expect("server signature verifies");
        Ok(())
    }

    #[tokio::test]
    async fn accepts_right_password_rejects_wrong() {
        assert_eq!(exchange("pw", "pw").await, Ok(()));
        assert_eq!(
            exchange("pw", "nope").await,
            Err(ScramFailure::WrongPassword)
        );
    }

    #[test]
    fn rejects_malformed_first_message() {
        let v = Arc::new(
            ScramVerifier::parse(&postgres_protocol::password::scram_sha_256(b"x")).unwrap(),
        );
        assert!(ScramServer::start(v.clone(), b"garbage").is_err());
        assert!(ScramServer::start(v, b"n,,n=,").is_err());
    }
}
