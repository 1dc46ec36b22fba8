//! Weir's login to PostgreSQL: startup, then whatever authentication the server
//! asks for (trust, cleartext, md5, SCRAM-SHA-256 with a password or, when only a
//! SCRAM verifier is known, with the ClientKey a client proved to Weir).

use crate::auth::{md5, scram};
use crate::config::{secret::ScramVerifier, Secret};
use crate::net::{read_message, Stream};
use crate::wire::{self, build, tag, ErrorFields};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use rand::RngCore;
use thiserror::Error;
use tokio::io::AsyncWriteExt;

/// What Weir presents to the server for one pool.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub secret: Option<Secret>,
    /// ClientKey from a client's SCRAM login, for pass-through to the server.
    pub scram_client_key: Option<[u8; 32]>,
}

/// Names the user and the kinds of secret only: a ClientKey is enough to log in with.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("secret", &self.secret)
            .field("scram_client_key", &self.scram_client_key.map(|_| ".."))
            .finish()
    }
}

#[derive(Debug, Error)]
pub enum LoginError {
    /// The server refused us; its error is passed on to the client as is.
    #[error("{}", .0.message)]
    Server(ErrorFields),
    #[error("server asked for a password but none is configured for user \"{0}\"")]
    NoPassword(String),
    #[error("server requested unsupported authentication method {0}")]
    Unsupported(i32),
    #[error("protocol error during server login: {0}")]
    Protocol(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What the server told us at login.
#[derive(Debug, Default)]
pub struct LoginResult {
    pub params: Vec<(String, String)>,
    pub backend_pid: i32,
    pub backend_secret: i32,
}

pub async fn login(
    stream: &mut Stream,
    buf: &mut BytesMut,
    startup: &[(&str, &str)],
    creds: &Credentials,
) -> Result<LoginResult, LoginError> {
    stream.write_all(&build::startup(startup)).await?;
    let mut sasl: Option<Sasl> = None;
    let mut result = LoginResult::default();
    loop {
        let msg = read_message(stream, buf).await?.ok_or_else(|| {
            LoginError::Protocol("server closed the connection during login".into())
        })?;
        let body = wire::body(&msg);
        match msg[0] {
            tag::AUTHENTICATION => {
                let code = read_i32(body, 0)?;
                let payload = &body[4..];
                if let Some(reply) = auth_step(code, payload, creds, &mut sasl)? {
                    stream.write_all(&reply).await?;
                }
            }
            tag::ERROR_RESPONSE => return Err(LoginError::Server(wire::error_fields(&msg))),
            tag::PARAMETER_STATUS => {
                if let Some((k, v)) = wire::parameter_status(&msg) {
                    result.params.push((k.to_string(), v.to_string()));
                }
            }
            tag::BACKEND_KEY_DATA => {
                result.backend_pid = read_i32(body, 0)?;
                result.backend_secret = read_i32(body, 4)?;
            }
            tag::READY_FOR_QUERY => return Ok(result),
            tag::NOTICE_RESPONSE => {}
            other => {
                return Err(LoginError::Protocol(format!(
                    "unexpected message '{}'",
                    char::from(other)
                )))
            }
        }
    }
}

fn read_i32(b: &[u8], at: usize) -> Result<i32, LoginError> {
    b.get(at..at + 4)
        .map(|s| i32::from_be_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| LoginError::Protocol("short message".into()))
}

enum Sasl {
    Password(ScramSha256),
    PassThrough(PassThrough),
}

fn auth_step(
    code: i32,
    payload: &[u8],
    creds: &Credentials,
    sasl: &mut Option<Sasl>,
) -> Result<Option<BytesMut>, LoginError> {
    let no_password = || LoginError::NoPassword(creds.user.clone());
    match code {
        0 => Ok(None),
        3 => match &creds.secret {
            Some(Secret::Plain(p)) => Ok(Some(build::password_cstr(p))),
            _ => Err(no_password()),
        },
        5 => {
            let salt: [u8; 4] = payload
                .get(..4)
                .and_then(|s| s.try_into().ok())
                .ok_or_else(|| LoginError::Protocol("short md5 salt".into()))?;
            let inner = match &creds.secret {
                Some(Secret::Plain(p)) => md5::inner_hash(&creds.user, p),
                Some(Secret::Md5(h)) => h.clone(),
                _ => return Err(no_password()),
            };
            Ok(Some(build::password_cstr(&md5::salted_response(
                &inner, salt,
            ))))
        }
        10 => {
            let offers_scram = payload.split(|&b| b == 0).any(|m| m == b"SCRAM-SHA-256");
            if !offers_scram {
                return Err(LoginError::Unsupported(code));
            }
            let state = match (&creds.secret, creds.scram_client_key) {
                (Some(Secret::Plain(p)), _) => Sasl::Password(ScramSha256::new(
                    p.as_bytes(),
                    ChannelBinding::unsupported(),
                )),
                (Some(Secret::Scram(v)), Some(key)) => {
                    Sasl::PassThrough(PassThrough::new(v.clone(), key))
                }
                _ => return Err(no_password()),
            };
            let first = match &state {
                Sasl::Password(s) => s.message().to_vec(),
                Sasl::PassThrough(p) => p.client_first().into_bytes(),
            };
            *sasl = Some(state);
            Ok(Some(build::sasl_initial("SCRAM-SHA-256", &first)))
        }
        11 => {
            let reply = match sasl.as_mut() {
                Some(Sasl::Password(s)) => {
                    s.update(payload)
                        .map_err(|e| LoginError::Protocol(e.to_string()))?;
                    s.message().to_vec()
                }
                Some(Sasl::PassThrough(p)) => p.client_final(payload)?.into_bytes(),
                None => return Err(LoginError::Protocol("SASL continue before start".into())),
            };
            Ok(Some(build::password(&reply)))
        }
        12 => {
            match sasl.as_mut() {
                Some(Sasl::Password(s)) => s
                    .finish(payload)
                    .map_err(|e| LoginError::Protocol(e.to_string()))?,
                Some(Sasl::PassThrough(p)) => p.verify_server(payload)?,
                None => return Err(LoginError::Protocol("SASL final before start".into())),
            }
            Ok(None)
        }
        other => Err(LoginError::Unsupported(other)),
    }
}

/// SCRAM client that proves a ClientKey instead of a password (PgBouncer's
/// SCRAM pass-through): valid when the server holds the same verifier.
struct PassThrough {
    verifier: ScramVerifier,
    client_key: [u8; 32],
    client_first_bare: String,
    auth_message: String,
}

impl PassThrough {
    fn new(verifier: ScramVerifier, client_key: [u8; 32]) -> Self {
        let mut raw = [0u8; 18];
        rand::thread_rng().fill_bytes(&mut raw);
        PassThrough {
            verifier,
            client_key,
            client_first_bare: format!("n=,r={}", B64.encode(raw)),
            auth_message: String::new(),
        }
    }

    fn client_first(&self) -> String {
        format!("n,,{}", self.client_first_bare)
    }

    fn client_final(&mut self, server_first: &[u8]) -> Result<String, LoginError> {
        let text = std::str::from_utf8(server_first)
            .map_err(|_| LoginError::Protocol("bad SCRAM".into()))?;
        let nonce = text
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .ok_or_else(|| LoginError::Protocol("SCRAM nonce missing".into()))?;
        let salt = text.split(',').find_map(|a| a.strip_prefix("s="));
        let iter = text.split(',').find_map(|a| a.strip_prefix("i="));
        if salt != Some(B64.encode(&self.verifier.salt).as_str())
            || iter != Some(self.verifier.iterations.to_string().as_str())
        {
            return Err(LoginError::Protocol(
                "SCRAM pass-through needs the same verifier on the server".into(),
            ));
        }
        let without_proof = format!("c=biws,r={nonce}");
        self.auth_message = format!("{},{},{}", self.client_first_bare, text, without_proof);
        let sig = scram::hmac(&self.verifier.stored_key, self.auth_message.as_bytes());
        let proof: Vec<u8> = self
            .client_key
            .iter()
            .zip(sig)
            .map(|(a, b)| a ^ b)
            .collect();
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    fn verify_server(&self, server_final: &[u8]) -> Result<(), LoginError> {
        let expected = scram::hmac(&self.verifier.server_key, self.auth_message.as_bytes());
        let want = format!("v={}", B64.encode(expected));
        if server_final == want.as_bytes() {
            Ok(())
        } else {
            Err(LoginError::Protocol(
                "server SCRAM signature mismatch".into(),
            ))
        }
    }
}
