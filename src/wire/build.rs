//! Messages Weir writes itself (errors, authentication requests, login replies).
//! Relayed traffic never passes through here.

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

pub fn ready_for_query(status: u8) -> BytesMut {
    let mut buf = BytesMut::with_capacity(6);
    let at = begin(&mut buf, b'Z');
    buf.put_u8(status);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_for_query_layout() {
        assert_eq!(&ready_for_query(b'I')[..], b"Z\0\0\0\x05I");
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
