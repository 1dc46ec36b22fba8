//! Client authentication: Weir in PostgreSQL's server role, checking the
//! password a client proves against the secret from `[users]` or `auth_file`.
//! (Weir's own login to PostgreSQL lives in `backend::login`.)

pub mod hba;
pub mod md5;
pub mod query;
pub mod scram;

use crate::config::{secret::ScramVerifier, AuthType, Secret};
use crate::net::{read_message_max, Stream};
use crate::wire::{self, build};
use bytes::BytesMut;
use rand::RngCore;
use std::sync::Arc;
use thiserror::Error;
use tokio::io::AsyncWriteExt;

#[derive(Debug, Error)]
pub enum AuthError {
    #[error("password authentication failed for user \"{0}\"")]
    WrongPassword(String),
    /// A SCRAM exchange that did not prove the password (PgBouncer's wording).
    #[error("SASL authentication failed")]
    SaslFailed,
    /// `auth_type = trust` and a user Weir does not know (PgBouncer's wording).
    #[error("\"trust\" authentication failed")]
    TrustFailed,
    #[error("{0}")]
    Protocol(String),
    #[error("client closed the connection during authentication")]
    Closed,
    #[error("i/o error during authentication: {0}")]
    Io(#[from] std::io::Error),
}

impl AuthError {
    /// SQLSTATE PostgreSQL uses for this failure.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::WrongPassword(_) | AuthError::SaslFailed | AuthError::TrustFailed => "28P01",
            _ => "08P01",
        }
    }
}

/// What a successful login proved; the SCRAM ClientKey allows pass-through.
#[derive(Debug, Default, Clone)]
pub struct Proof {
    pub scram_client_key: Option<[u8; 32]>,
    /// The cleartext password when the client sent one (plain auth).
    pub cleartext: Option<String>,
}

/// Runs the authentication exchange with a client. `secret` is `None` for a
/// user Weir does not know: the exchange still runs against a random secret
/// and fails, so the reply does not reveal which users exist (as PostgreSQL).
pub async fn authenticate(
    stream: &mut Stream,
    buf: &mut BytesMut,
    auth_type: AuthType,
    user: &str,
    secret: Option<&Secret>,
) -> Result<Proof, AuthError> {
    if matches!(auth_type, AuthType::Trust | AuthType::Any) {
        return Ok(Proof::default());
    }
    // An empty stored password admits nobody, as in PgBouncer (PostgreSQL never stores one).
    let secret = secret.filter(|s| !matches!(s, Secret::Plain(p) if p.is_empty()));
    let Some(secret) = secret else {
        return unknown_user(stream, buf, auth_type, user).await;
    };
    match (auth_type, secret) {
        (AuthType::Plain, _) => cleartext(stream, buf, user, secret).await,
        (AuthType::Md5, Secret::Scram(v)) => scram(stream, buf, Arc::new(v.clone())).await,
        (AuthType::Md5, _) | (AuthType::ScramSha256, Secret::Md5(_)) => {
            md5_exchange(stream, buf, user, secret).await
        }
        (_, Secret::Scram(v)) => scram(stream, buf, Arc::new(v.clone())).await,
        (_, Secret::Plain(p)) => {
            let v = scram::verifier_for_plain(user, p).await;
            scram(stream, buf, v).await
        }
        (_, Secret::Md5(_)) => md5_exchange(stream, buf, user, secret).await,
    }
}

/// The same exchange as for a known user, run against a secret no password matches, so neither
/// the answer, its timing nor Weir's memory tells which users exist. Nothing is cached or
/// derived per name: a SCRAM client gets PostgreSQL's kind of mock verifier (salt and keys
/// derived from a per-process secret and the name, so a name always sees the same salt).
async fn unknown_user(
    stream: &mut Stream,
    buf: &mut BytesMut,
    auth_type: AuthType,
    user: &str,
) -> Result<Proof, AuthError> {
    let proof = match auth_type {
        AuthType::Plain => {
            let mut raw = [0u8; 32];
            rand::thread_rng().fill_bytes(&mut raw);
            cleartext(stream, buf, user, &Secret::Md5(hex(&raw))).await
        }
        AuthType::Md5 => {
            let mut raw = [0u8; 16];
            rand::thread_rng().fill_bytes(&mut raw);
            md5_exchange(stream, buf, user, &Secret::Md5(hex(&raw))).await
        }
        _ => scram(stream, buf, Arc::new(scram::mock_verifier(user))).await,
    };
    // However the exchange went, an unknown user does not get in.
    proof.and(Err(AuthError::WrongPassword(user.into())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Longest authentication message body Weir reads, as PostgreSQL (`PG_MAX_AUTH_TOKEN_LENGTH`):
/// a longer one is refused from its header, before it is buffered.
pub const MAX_AUTH_MESSAGE: usize = 65_535;

async fn read_password(stream: &mut Stream, buf: &mut BytesMut) -> Result<BytesMut, AuthError> {
    let msg = match read_message_max(stream, buf, MAX_AUTH_MESSAGE).await {
        Ok(Some(msg)) => msg,
        Ok(None) => return Err(AuthError::Closed),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            return Err(AuthError::Protocol("invalid message length".into()))
        }
        Err(e) => return Err(e.into()),
    };
    if msg[0] != wire::tag::PASSWORD {
        return Err(AuthError::Protocol(format!(
            "expected password response, got message type {}",
            char::from(msg[0])
        )));
    }
    Ok(msg)
}

fn body_cstr(msg: &[u8]) -> Result<&str, AuthError> {
    wire::cstr(wire::body(msg), 0)
        .map(|(s, _)| s)
        .ok_or_else(|| AuthError::Protocol("malformed password message".into()))
}

async fn cleartext(
    stream: &mut Stream,
    buf: &mut BytesMut,
    user: &str,
    secret: &Secret,
) -> Result<Proof, AuthError> {
    stream.write_all(&build::auth(3, &[])).await?;
    let msg = read_password(stream, buf).await?;
    let given = body_cstr(&msg)?;
    let ok = !given.is_empty()
        && match secret {
            Secret::Plain(p) => md5::same(p.as_bytes(), given.as_bytes()),
            Secret::Md5(h) => md5::same(md5::inner_hash(user, given).as_bytes(), h.as_bytes()),
            Secret::Scram(v) => {
                // PBKDF2 with the verifier's iteration count (which auth_query may supply):
                // off the reactor, as every key derivation.
                let (v, pw) = (v.clone(), given.to_string());
                tokio::task::spawn_blocking(move || scram_matches_plain(&v, &pw))
                    .await
                    .unwrap_or(false)
            }
        };
    if ok {
        Ok(Proof {
            scram_client_key: None,
            cleartext: Some(given.to_string()),
        })
    } else {
        Err(AuthError::WrongPassword(user.into()))
    }
}

fn scram_matches_plain(v: &ScramVerifier, password: &str) -> bool {
    // Derive the stored key for this password with the verifier's salt.
    let salted = pbkdf2(password.as_bytes(), &v.salt, v.iterations);
    let client_key = scram::hmac(&salted, b"Client Key");
    scram::sha256(&client_key) == v.stored_key
}

fn pbkdf2(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut block = salt.to_vec();
    block.extend_from_slice(&1u32.to_be_bytes());
    let mut u = scram::hmac(password, &block);
    let mut out = u;
    for _ in 1..iterations {
        u = scram::hmac(password, &u);
        for (o, x) in out.iter_mut().zip(u.iter()) {
            *o ^= x;
        }
    }
    out
}

async fn md5_exchange(
    stream: &mut Stream,
    buf: &mut BytesMut,
    user: &str,
    secret: &Secret,
) -> Result<Proof, AuthError> {
    let mut salt = [0u8; 4];
    rand::thread_rng().fill_bytes(&mut salt);
    stream.write_all(&build::auth(5, &salt)).await?;
    let msg = read_password(stream, buf).await?;
    let given = body_cstr(&msg)?;
    let inner = match secret {
        Secret::Plain(p) => md5::inner_hash(user, p),
        Secret::Md5(h) => h.clone(),
        Secret::Scram(_) => return Err(AuthError::WrongPassword(user.into())),
    };
    let expected = md5::salted_response(&inner, salt);
    if md5::same(expected.as_bytes(), given.as_bytes()) {
        Ok(Proof::default())
    } else {
        Err(AuthError::WrongPassword(user.into()))
    }
}

async fn scram(
    stream: &mut Stream,
    buf: &mut BytesMut,
    verifier: Arc<ScramVerifier>,
) -> Result<Proof, AuthError> {
    stream
        .write_all(&build::auth_sasl(&["SCRAM-SHA-256"]))
        .await?;
    let msg = read_password(stream, buf).await?;
    let body = wire::body(&msg);
    let (mechanism, pos) = wire::cstr(body, 0)
        .ok_or_else(|| AuthError::Protocol("malformed SASLInitialResponse".into()))?;
    if mechanism != "SCRAM-SHA-256" {
        return Err(AuthError::Protocol(format!(
            "SASL authentication mechanism {mechanism} is not supported"
        )));
    }
    let data = body
        .get(pos + 4..)
        .ok_or_else(|| AuthError::Protocol("malformed SASLInitialResponse".into()))?;
    let (server, first) = scram::ScramServer::start(verifier, data).map_err(|e| match e {
        scram::ScramFailure::Malformed(m) => {
            AuthError::Protocol(format!("malformed SCRAM message: {m}"))
        }
        scram::ScramFailure::WrongPassword => AuthError::SaslFailed,
    })?;
    stream.write_all(&build::auth(11, first.as_bytes())).await?;
    let msg = read_password(stream, buf).await?;
    match server.finish(wire::body(&msg)) {
        Ok((fin, client_key)) => {
            stream.write_all(&build::auth(12, fin.as_bytes())).await?;
            Ok(Proof {
                scram_client_key: Some(client_key),
                cleartext: None,
            })
        }
        Err(scram::ScramFailure::WrongPassword) => Err(AuthError::SaslFailed),
        Err(scram::ScramFailure::Malformed(m)) => {
            Err(AuthError::Protocol(format!("malformed SCRAM message: {m}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pbkdf2_matches_postgres_verifier() {
        let text = postgres_protocol::password::scram_sha_256(b"secret");
        let v = ScramVerifier::parse(&text).unwrap();
        assert!(scram_matches_plain(&v, "secret"));
        assert!(!scram_matches_plain(&v, "other"));
    }
}
