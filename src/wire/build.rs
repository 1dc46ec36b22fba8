//! Messages Weir writes itself (errors, authentication requests, login replies).
//! Relayed traffic never passes through here.

use super::TxStatus;
use bytes::{BufMut, BytesMut};

/// Starts a tagged message in `buf`; returns the position of its length field.
fn begin(buf: &mut BytesMut, tag: u8) -> usize {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_i32(0);
    at
}

/// Fills in the length of a message started with [`begin`].
fn finish(buf: &mut BytesMut, at: usize) {
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(buf: &mut BytesMut, s: &str) {
    buf.put_slice(s.as_bytes());
    buf.put_u8(0);
}

/// ErrorResponse with severity, SQLSTATE and message.
pub fn error(severity: &str, code: &str, message: &str) -> BytesMut {
    let mut buf = BytesMut::with_capacity(32 + message.len());
    put_error(&mut buf, b'E', severity, code, message);
    buf
}

/// NoticeResponse with severity, SQLSTATE and message.
pub fn notice(severity: &str, code: &str, message: &str) -> BytesMut {
    let mut buf = BytesMut::with_capacity(32 + message.len());
    put_error(&mut buf, b'N', severity, code, message);
    buf
}

fn put_error(buf: &mut BytesMut, tag: u8, severity: &str, code: &str, message: &str) {
    let at = begin(buf, tag);
    buf.put_u8(b'S');
    put_cstr(buf, severity);
    buf.put_u8(b'V');
    put_cstr(buf, severity);
    buf.put_u8(b'C');
    put_cstr(buf, code);
    buf.put_u8(b'M');
    put_cstr(buf, message);
    buf.put_u8(0);
    finish(buf, at);
}

/// AuthenticationRequest with a code and optional payload.
pub fn auth(code: i32, payload: &[u8]) -> BytesMut {
    let mut buf = BytesMut::with_capacity(9 + payload.len());
    let at = begin(&mut buf, b'R');
    buf.put_i32(code);
    buf.put_slice(payload);
    finish(&mut buf, at);
    buf
}

/// AuthenticationSASL listing the mechanisms Weir offers.
pub fn auth_sasl(mechanisms: &[&str]) -> BytesMut {
    let mut payload = BytesMut::new();
    for m in mechanisms {
        put_cstr(&mut payload, m);
    }
    payload.put_u8(0);
    auth(10, &payload)
}

pub fn parameter_status(name: &str, value: &str) -> BytesMut {
    let mut buf = BytesMut::with_capacity(8 + name.len() + value.len());
    let at = begin(&mut buf, b'S');
    put_cstr(&mut buf, name);
    put_cstr(&mut buf, value);
    finish(&mut buf, at);
    buf
}

pub fn backend_key_data(pid: i32, secret: i32) -> BytesMut {
    let mut buf = BytesMut::with_capacity(13);
    let at = begin(&mut buf, b'K');
    buf.put_i32(pid);
    buf.put_i32(secret);
    finish(&mut buf, at);
    buf
}

/// NegotiateProtocolVersion: the newest protocol version spoken (as a whole version number,
/// `3 << 16` for 3.0, which is what PostgreSQL sends and libpq checks), and the protocol
/// options (`_pq_.*`) that were not recognised.
pub fn negotiate_protocol_version(version: i32, unrecognised: &[&str]) -> BytesMut {
    let mut buf =
        BytesMut::with_capacity(13 + unrecognised.iter().map(|o| o.len() + 1).sum::<usize>());
    let at = begin(&mut buf, b'v');
    buf.put_i32(version);
    buf.put_i32(unrecognised.len() as i32);
    for name in unrecognised {
        buf.put_slice(name.as_bytes());
        buf.put_u8(0);
    }
    finish(&mut buf, at);
    buf
}

pub fn ready_for_query(status: TxStatus) -> BytesMut {
    let mut buf = BytesMut::with_capacity(6);
    let at = begin(&mut buf, b'Z');
    buf.put_u8(status.byte());
    finish(&mut buf, at);
    buf
}

/// Simple Query message.
pub fn query(sql: &str) -> BytesMut {
    let mut buf = BytesMut::with_capacity(6 + sql.len());
    let at = begin(&mut buf, b'Q');
    put_cstr(&mut buf, sql);
    finish(&mut buf, at);
    buf
}

/// PasswordMessage (also used for SASL responses, which carry raw bytes).
pub fn password(data: &[u8]) -> BytesMut {
    let mut buf = BytesMut::with_capacity(5 + data.len());
    let at = begin(&mut buf, b'p');
    buf.put_slice(data);
    finish(&mut buf, at);
    buf
}

/// Cleartext or md5 PasswordMessage (NUL-terminated).
pub fn password_cstr(s: &str) -> BytesMut {
    let mut buf = BytesMut::with_capacity(6 + s.len());
    let at = begin(&mut buf, b'p');
    put_cstr(&mut buf, s);
    finish(&mut buf, at);
    buf
}

/// SASLInitialResponse.
pub fn sasl_initial(mechanism: &str, data: &[u8]) -> BytesMut {
    let mut buf = BytesMut::with_capacity(16 + data.len());
    let at = begin(&mut buf, b'p');
    put_cstr(&mut buf, mechanism);
    buf.put_i32(data.len() as i32);
    buf.put_slice(data);
    finish(&mut buf, at);
    buf
}

/// Appends a CopyData message carrying `payload` to `out`.
pub fn put_copy_data(out: &mut BytesMut, payload: &[u8]) {
    out.reserve(payload.len() + 5);
    let at = begin(out, b'd');
    out.put_slice(payload);
    finish(out, at);
}

/// CopyData carrying `payload`.
pub fn copy_data(payload: &[u8]) -> BytesMut {
    let mut buf = BytesMut::new();
    put_copy_data(&mut buf, payload);
    buf
}

/// CopyDone.
pub fn copy_done() -> BytesMut {
    let mut buf = BytesMut::with_capacity(5);
    let at = begin(&mut buf, b'c');
    finish(&mut buf, at);
    buf
}

/// CopyFail with its reason.
pub fn copy_fail(reason: &str) -> BytesMut {
    let mut buf = BytesMut::with_capacity(reason.len() + 6);
    let at = begin(&mut buf, b'f');
    put_cstr(&mut buf, reason);
    finish(&mut buf, at);
    buf
}

/// Terminate.
pub fn terminate() -> BytesMut {
    let mut buf = BytesMut::with_capacity(5);
    let at = begin(&mut buf, b'X');
    finish(&mut buf, at);
    buf
}

/// StartupMessage for protocol 3.0 with the given parameters.
pub fn startup(params: &[(&str, &str)]) -> BytesMut {
    let mut buf = BytesMut::with_capacity(64);
    buf.put_i32(0);
    buf.put_i32(super::startup::PROTOCOL_3_0);
    for (k, v) in params {
        put_cstr(&mut buf, k);
        put_cstr(&mut buf, v);
    }
    buf.put_u8(0);
    let len = buf.len() as i32;
    buf[0..4].copy_from_slice(&len.to_be_bytes());
    buf
}

/// CancelRequest for a backend.
pub fn cancel_request(pid: i32, secret: i32) -> BytesMut {
    let mut buf = BytesMut::with_capacity(16);
    buf.put_i32(16);
    buf.put_i32(super::startup::CANCEL_REQUEST);
    buf.put_i32(pid);
    buf.put_i32(secret);
    buf
}

/// SSLRequest: asks a server to switch to TLS before the StartupMessage.
pub fn ssl_request() -> [u8; 8] {
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&8i32.to_be_bytes());
    out[4..].copy_from_slice(&super::startup::SSL_REQUEST.to_be_bytes());
    out
}

/// NoticeResponse with a DETAIL field (the admin console's SHOW HELP).
pub fn notice_with_detail(code: &str, message: &str, detail: &str) -> BytesMut {
    let mut buf = BytesMut::with_capacity(32 + message.len() + detail.len());
    let at = begin(&mut buf, b'N');
    for (field, value) in [
        (b'S', "NOTICE"),
        (b'V', "NOTICE"),
        (b'C', code),
        (b'M', message),
        (b'D', detail),
    ] {
        buf.put_u8(field);
        put_cstr(&mut buf, value);
    }
    buf.put_u8(0);
    finish(&mut buf, at);
    buf
}

/// RowDescription of text-format columns: (name, type oid, type size).
pub fn row_description(columns: &[(&str, u32, i16)]) -> BytesMut {
    let mut buf = BytesMut::with_capacity(8 + columns.len() * 32);
    let at = begin(&mut buf, b'T');
    buf.put_i16(columns.len() as i16);
    for (name, oid, size) in columns {
        put_cstr(&mut buf, name);
        buf.put_u32(0); // no table
        buf.put_i16(0); // no column number
        buf.put_u32(*oid);
        buf.put_i16(*size);
        buf.put_i32(-1); // no type modifier
        buf.put_i16(0); // text format
    }
    finish(&mut buf, at);
    buf
}

/// DataRow of text values (`None` is NULL).
pub fn data_row<S: AsRef<str>>(values: &[Option<S>]) -> BytesMut {
    let mut buf = BytesMut::with_capacity(8 + values.len() * 16);
    let at = begin(&mut buf, b'D');
    buf.put_i16(values.len() as i16);
    for value in values {
        match value {
            Some(v) => {
                buf.put_i32(v.as_ref().len() as i32);
                buf.put_slice(v.as_ref().as_bytes());
            }
            None => buf.put_i32(-1),
        }
    }
    finish(&mut buf, at);
    buf
}

/// CommandComplete with its tag (`SHOW`, `PAUSE`, `SELECT 3`, …).
pub fn command_complete(tag: &str) -> BytesMut {
    let mut buf = BytesMut::with_capacity(6 + tag.len());
    let at = begin(&mut buf, b'C');
    put_cstr(&mut buf, tag);
    finish(&mut buf, at);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_set_messages_layout() {
        let desc = row_description(&[("v", 23, 4)]);
        assert_eq!(
            &desc[..],
            b"T\0\0\0\x1a\0\x01v\0\0\0\0\0\0\0\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0"
        );
        let row = data_row(&[Some("ab"), None]);
        assert_eq!(&row[..], b"D\0\0\0\x10\0\x02\0\0\0\x02ab\xff\xff\xff\xff");
        assert_eq!(&command_complete("SHOW")[..], b"C\0\0\0\x09SHOW\0");
        let n = notice_with_detail("00000", "m", "d");
        assert_eq!(crate::wire::error_fields(&n).message, "m");
    }

    #[test]
    fn ssl_request_parses_as_one() {
        let req = ssl_request();
        assert_eq!(super::super::startup::packet_len(&req), Ok(Some(8)));
        assert_eq!(
            super::super::startup::parse(&req),
            Ok(super::super::startup::StartupPacket::Ssl)
        );
    }

    #[test]
    fn ready_for_query_layout() {
        assert_eq!(&ready_for_query(TxStatus::Idle)[..], b"Z\0\0\0\x05I");
        assert_eq!(&ready_for_query(TxStatus::Failed)[..], b"Z\0\0\0\x05E");
    }

    #[test]
    fn query_layout() {
        assert_eq!(&query("SELECT 1")[..], b"Q\0\0\0\x0dSELECT 1\0");
    }

    #[test]
    fn startup_layout() {
        let s = startup(&[("user", "u")]);
        assert_eq!(&s[..], b"\0\0\0\x10\0\x03\0\0user\0u\0\0");
    }
}
