//! The PostgreSQL wire protocol, pure and synchronous.
//!
//! Weir relays bytes and only looks at what a decision needs: message tags and
//! lengths, the ReadyForQuery status, and the bodies of the few messages it acts
//! on. Everything here works on byte slices so it can be unit-tested and fuzzed
//! without sockets.

pub mod build;
pub mod startup;

/// The transaction status a ReadyForQuery carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TxStatus {
    /// `I`: not in a transaction block; a transaction-mode server may go back to the pool.
    #[default]
    Idle,
    /// `T`: in a transaction block.
    InBlock,
    /// `E`: in a failed transaction block (statements are refused until it ends).
    Failed,
}

impl TxStatus {
    /// The status of a ReadyForQuery body byte; `None` for anything else.
    pub fn from_byte(b: u8) -> Option<TxStatus> {
        match b {
            b'I' => Some(TxStatus::Idle),
            b'T' => Some(TxStatus::InBlock),
            b'E' => Some(TxStatus::Failed),
            _ => None,
        }
    }

    pub fn byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InBlock => b'T',
            TxStatus::Failed => b'E',
        }
    }

    /// Inside a transaction block (open or failed).
    pub fn in_block(self) -> bool {
        self != TxStatus::Idle
    }
}

use thiserror::Error;

/// Largest message Weir accepts from either side (PgBouncer's `max_packet_size`
/// default is 2 GiB - 1; PostgreSQL itself caps most messages at 1 GiB).
pub const MAX_MESSAGE_LEN: usize = 1 << 30;

/// Errors in the framing of a message stream.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("invalid message length {0}")]
    BadLength(i64),
    #[error("malformed {0} message")]
    Malformed(&'static str),
    #[error("unexpected message type '{}'", char::from(*.0))]
    UnexpectedTag(u8),
}

/// Header of one regular (tagged) message: its tag and total size including tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub tag: u8,
    /// Tag byte + 4 length bytes + body.
    pub total: usize,
}

/// Reads the header at the start of `buf` if at least 5 bytes are present.
pub fn header(buf: &[u8]) -> Result<Option<Header>, WireError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 || len as usize > MAX_MESSAGE_LEN {
        return Err(WireError::BadLength(len as i64));
    }
    Ok(Some(Header {
        tag: buf[0],
        total: len as usize + 1,
    }))
}

/// Body of a complete message (after tag and length).
pub fn body(msg: &[u8]) -> &[u8] {
    &msg[5..]
}

/// Reads a NUL-terminated string starting at `pos`; returns it and the next position.
pub fn cstr(buf: &[u8], pos: usize) -> Option<(&str, usize)> {
    let rest = buf.get(pos..)?;
    let end = rest.iter().position(|&b| b == 0)?;
    let s = std::str::from_utf8(&rest[..end]).ok()?;
    Some((s, pos + end + 1))
}

/// Backend message tags Weir acts on.
pub mod tag {
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const PARAMETER_STATUS: u8 = b'S';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const NOTICE_RESPONSE: u8 = b'N';
    pub const BACKEND_KEY_DATA: u8 = b'K';
    pub const AUTHENTICATION: u8 = b'R';
    pub const COPY_IN_RESPONSE: u8 = b'G';
    pub const COPY_OUT_RESPONSE: u8 = b'H';
    pub const COPY_BOTH_RESPONSE: u8 = b'W';
    pub const COMMAND_COMPLETE: u8 = b'C';

    // Frontend tags.
    pub const QUERY: u8 = b'Q';
    pub const PARSE: u8 = b'P';
    pub const BIND: u8 = b'B';
    pub const DESCRIBE: u8 = b'D';
    pub const EXECUTE: u8 = b'E';
    pub const CLOSE: u8 = b'C';
    pub const SYNC: u8 = b'S';
    pub const FLUSH: u8 = b'H';
    pub const FUNCTION_CALL: u8 = b'F';
    pub const TERMINATE: u8 = b'X';
    pub const PASSWORD: u8 = b'p';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_FAIL: u8 = b'f';
}

/// Parses a ParameterStatus body into (name, value).
pub fn parameter_status(msg: &[u8]) -> Option<(&str, &str)> {
    let b = body(msg);
    let (name, pos) = cstr(b, 0)?;
    let (value, _) = cstr(b, pos)?;
    Some((name, value))
}

/// Fields of an ErrorResponse/NoticeResponse that Weir reports or logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

/// Parses an ErrorResponse or NoticeResponse message.
pub fn error_fields(msg: &[u8]) -> ErrorFields {
    let b = body(msg);
    let mut out = ErrorFields::default();
    let mut pos = 0;
    while pos < b.len() && b[pos] != 0 {
        let field = b[pos];
        let Some((value, next)) = cstr(b, pos + 1) else {
            break;
        };
        match field {
            b'S' => out.severity = value.to_string(),
            b'C' => out.code = value.to_string(),
            b'M' => out.message = value.to_string(),
            _ => {}
        }
        pos = next;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_needs_five_bytes() {
        assert_eq!(header(b"Z\0\0\0").unwrap(), None);
        assert_eq!(
            header(b"Z\0\0\0\x05I").unwrap(),
            Some(Header {
                tag: b'Z',
                total: 6
            })
        );
    }

    #[test]
    fn header_rejects_short_length() {
        assert_eq!(header(b"Q\0\0\0\x03"), Err(WireError::BadLength(3)));
        assert!(header(b"Q\xff\xff\xff\xff").is_err());
    }

    #[test]
    fn parses_parameter_status_and_errors() {
        let msg = build::parameter_status("TimeZone", "UTC");
        assert_eq!(parameter_status(&msg), Some(("TimeZone", "UTC")));
        let err = build::error("FATAL", "08P01", "boom");
        let f = error_fields(&err);
        assert_eq!(f.code, "08P01");
        assert_eq!(f.message, "boom");
        assert_eq!(f.severity, "FATAL");
    }
}
