//! SCRAM-SHA-256 in the server role. Arbitrary client messages fail cleanly (and never
//! authenticate: the proof depends on a nonce the client cannot know in advance), and a
//! real client (postgres-protocol's) authenticates exactly when its password is right.
//!
//! The verifier uses one PBKDF2 iteration so that a full exchange costs microseconds;
//! iterations change nothing else in the exchange.

use crate::auth::scram::{hmac, sha256, ScramServer};
use crate::config::secret::ScramVerifier;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use std::sync::{Arc, OnceLock};

const PASSWORD: &str = "pencil";
const SALT: &[u8] = b"weir-fuzz-salt";

fn verifier() -> Arc<ScramVerifier> {
    static VERIFIER: OnceLock<Arc<ScramVerifier>> = OnceLock::new();
    VERIFIER
        .get_or_init(|| {
            // Hi(password, salt, 1) = HMAC(password, salt || INT(1)) (RFC 5802 §2.2).
            let mut first = SALT.to_vec();
            first.extend_from_slice(&1u32.to_be_bytes());
            let salted = hmac(PASSWORD.as_bytes(), &first);
            Arc::new(ScramVerifier {
                iterations: 1,
                salt: SALT.to_vec(),
                stored_key: sha256(&hmac(&salted, b"Client Key")),
                server_key: hmac(&salted, b"Server Key"),
            })
        })
        .clone()
}

/// First byte even: `data` is a client-first message, a NUL, and a client-final message
/// (its `r=` replaced by the server's nonce so the proof check is reached). Odd: a real
/// client exchange, with the right password when the second byte is even, otherwise the
/// rest of the input as the password.
pub fn check(data: &[u8]) {
    match data.split_first() {
        Some((mode, rest)) if mode % 2 == 0 => arbitrary_messages(rest),
        Some((_, rest)) => real_client(rest),
        None => {}
    }
}

fn arbitrary_messages(data: &[u8]) {
    let (first, last) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let Ok((server, server_first)) = ScramServer::start(verifier(), first) else {
        return;
    };
    let nonce = server_first
        .strip_prefix("r=")
        .and_then(|s| s.split(',').next())
        .unwrap_or_default()
        .to_string();
    // The server's nonce is the client's followed by 18 random bytes in base64.
    assert!(
        nonce.len() >= 24 && client_nonce(first).is_some_and(|c| nonce.starts_with(c)),
        "server nonce extends the client's: {server_first}"
    );
    let last = with_nonce(last, &nonce);
    assert!(
        server.finish(&last).is_err(),
        "a client that never saw the nonce authenticated"
    );
}

fn client_nonce(first: &[u8]) -> Option<&str> {
    std::str::from_utf8(first)
        .ok()?
        .split(',')
        .find_map(|attr| attr.strip_prefix("r="))
}

/// Replaces the value of the first `r=` attribute with `nonce`.
fn with_nonce(message: &[u8], nonce: &str) -> Vec<u8> {
    let Ok(text) = std::str::from_utf8(message) else {
        return message.to_vec();
    };
    let attrs: Vec<String> = text
        .split(',')
        .scan(false, |done, attr| {
            Some(match attr.strip_prefix("r=") {
                Some(_) if !*done => {
                    *done = true;
                    format!("r={nonce}")
                }
                _ => attr.to_string(),
            })
        })
        .collect();
    attrs.join(",").into_bytes()
}

fn real_client(data: &[u8]) {
    let password = match data.split_first() {
        Some((b, _)) if b % 2 == 0 => PASSWORD.as_bytes(),
        Some((_, rest)) => rest,
        None => PASSWORD.as_bytes(),
    };
    let mut client = ScramSha256::new(password, ChannelBinding::unsupported());
    let (server, server_first) = match ScramServer::start(verifier(), client.message()) {
        Ok(started) => started,
        Err(e) => panic!("a real client-first message was refused: {e:?}"),
    };
    if client.update(server_first.as_bytes()).is_err() {
        panic!("the client refused server-first {server_first:?}");
    }
    match server.finish(client.message()) {
        Ok((server_final, _)) => {
            assert!(
                client.finish(server_final.as_bytes()).is_ok(),
                "the client refused the server's signature"
            );
            // SASLprep may map other text to the same password; plain ASCII it leaves alone.
            if password.iter().all(|b| b.is_ascii_graphic()) {
                assert_eq!(
                    password,
                    PASSWORD.as_bytes(),
                    "a wrong password authenticated"
                );
            }
        }
        Err(e) => assert!(
            password != PASSWORD.as_bytes(),
            "the right password was refused: {e:?}"
        ),
    }
}
