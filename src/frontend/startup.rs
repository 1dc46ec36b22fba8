//! The first phase of a client connection: SSLRequest answered per
//! `client_tls_sslmode` (TLS handshake on `S`), GSSENCRequest answered `N`,
//! CancelRequest routed, StartupMessage parsed into who and what.

use super::cancel::FrontendKey;
use crate::net::{read_startup, Stream};
use crate::tls::ClientTls;
use crate::wire::build;
use crate::wire::startup::{self, StartupPacket};
use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

pub(super) enum Start {
    Login(Vec<(String, String)>),
    Cancel(FrontendKey),
    /// Closed before a startup packet, or a protocol Weir refuses (message given).
    Refused(Option<(&'static str, String)>),
}

pub(super) async fn read(
    stream: &mut Stream,
    buf: &mut BytesMut,
    tls: &ClientTls,
) -> std::io::Result<Start> {
    loop {
        let Some(packet) = read_startup(stream, buf).await? else {
            return Ok(Start::Refused(None));
        };
        let parsed = match startup::parse(&packet) {
            Ok(p) => p,
            Err(e) => {
                return Ok(Start::Refused(Some((
                    "08P01",
                    format!("invalid startup packet: {e}"),
                ))))
            }
        };
        match parsed {
            StartupPacket::Ssl | StartupPacket::GssEnc => {
                let ssl = parsed == StartupPacket::Ssl;
                if let Some(end) = encryption_request(stream, buf, tls, ssl).await? {
                    return Ok(end);
                }
            }
            StartupPacket::Startup { .. } if tls.required() && matches!(stream, Stream::Tcp(_)) => {
                // PgBouncer's refusal of plaintext when client_tls_sslmode >= require (Unix
                // sockets are exempt).
                return Ok(Start::Refused(Some(("08P01", "SSL required".into()))));
            }
            StartupPacket::Cancel { pid, secret } => {
                return Ok(Start::Cancel(FrontendKey { pid, secret }))
            }
            StartupPacket::Startup { params } => return Ok(Start::Login(params)),
            StartupPacket::NewerMinor { minor, params } => {
                // Protocol options (`_pq_.*`) are not supported: listed back and dropped.
                let (options, params): (Vec<_>, Vec<_>) = params
                    .into_iter()
                    .partition(|(k, _)| k.starts_with("_pq_."));
                let names: Vec<&str> = options.iter().map(|(k, _)| k.as_str()).collect();
                tracing::debug!(
                    minor,
                    "client asked for protocol 3.{minor}: negotiating 3.0"
                );
                stream
                    .write_all(&build::negotiate_protocol_version(3 << 16, &names))
                    .await?;
                return Ok(Start::Login(params));
            }
            StartupPacket::UnsupportedVersion(v) => {
                return Ok(Start::Refused(Some((
                    "0A000",
                    format!(
                        "unsupported frontend protocol {}.{}: server supports 3.0 to 3.0",
                        v >> 16,
                        v & 0xffff
                    ),
                ))))
            }
        }
    }
}

/// Answers an SSLRequest (`ssl`) or a GSSENCRequest: `S` and a TLS handshake that turns
/// `stream` into TLS when Weir offers TLS on this connection, `N` otherwise. `Some` ends the
/// connection.
async fn encryption_request(
    stream: &mut Stream,
    buf: &BytesMut,
    tls: &ClientTls,
    ssl: bool,
) -> std::io::Result<Option<Start>> {
    if !buf.is_empty() {
        // Bytes sent before the answer were not encrypted: a man in the middle may have
        // injected them (CVE-2021-23222). PgBouncer's wording.
        let what = if ssl {
            "SSL request"
        } else {
            "GSSAPI encryption request"
        };
        let message = format!("received unencrypted data after {what}");
        return Ok(Some(Start::Refused(Some(("08P01", message)))));
    }
    if ssl && stream.is_tls() {
        // PgBouncer: "SSL req inside SSL", closed without a message.
        return Ok(Some(Start::Refused(None)));
    }
    // No TLS over a Unix socket, as in PgBouncer and PostgreSQL.
    let tcp = if ssl && tls.offered() {
        stream.take_tcp()
    } else {
        None
    };
    let Some(mut tcp) = tcp else {
        // Declined: the client continues in plaintext (or gives up if it insists).
        stream.write_all(b"N").await?;
        return Ok(None);
    };
    tcp.write_all(b"S").await?;
    match tls.accept(tcp).await {
        Ok(encrypted) => {
            *stream = encrypted;
            Ok(None)
        }
        Err(e) => {
            tracing::info!(error = %e, "TLS handshake with a client failed");
            Ok(Some(Start::Refused(None)))
        }
    }
}

/// Splits PostgreSQL's `options` startup parameter (`-c name=value`,
/// `--name=value`) into parameters.
pub(super) fn parse_options(options: &str) -> Result<Vec<(String, String)>, String> {
    // PgBouncer's wording for anything but `-c name=value` / `--name=value`.
    const ONLY: &str =
        "unsupported options startup parameter: only '-c config=val' and '--config=val' are allowed";
    let mut out = Vec::new();
    let mut words = split_words(options).into_iter();
    while let Some(w) = words.next() {
        let setting = if w == "-c" {
            words.next().ok_or_else(|| ONLY.to_string())?
        } else if let Some(rest) = w.strip_prefix("-c") {
            rest.to_string()
        } else if let Some(rest) = w.strip_prefix("--") {
            rest.to_string()
        } else {
            return Err(ONLY.to_string());
        };
        let (k, v) = setting.split_once('=').ok_or_else(|| ONLY.to_string())?;
        out.push((k.replace('-', "_"), v.to_string()));
    }
    Ok(out)
}

/// Splits on unescaped whitespace; a backslash escapes the next character.
fn split_words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_options() {
        assert_eq!(
            parse_options("-c search_path=a,b -cstatement_timeout=5s --work-mem=4MB").unwrap(),
            vec![
                ("search_path".into(), "a,b".into()),
                ("statement_timeout".into(), "5s".into()),
                ("work_mem".into(), "4MB".into())
            ]
        );
        assert_eq!(
            parse_options("-c application_name=a\\ b").unwrap(),
            vec![("application_name".into(), "a b".into())]
        );
        assert!(parse_options("-x").is_err());
    }
}
