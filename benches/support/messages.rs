//! Protocol messages the criterion benches feed the relay (shared by `prepared.rs` and
//! `relay.rs` through `#[path]`).

use bytes::{BufMut, BytesMut};
use weir::backend::prepared;

/// Parse of `q` as statement `name`, no parameter types.
pub fn parse(name: &str, q: &str) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u8(b'P');
    b.put_i32((4 + name.len() + 1 + q.len() + 1 + 2) as i32);
    b.put_slice(name.as_bytes());
    b.put_u8(0);
    b.put_slice(q.as_bytes());
    b.put_u8(0);
    b.put_i16(0);
    b
}

/// Bind of statement `stmt` to the unnamed portal with one text parameter, `value`.
pub fn bind(stmt: &str, value: &str) -> BytesMut {
    let mut rest = BytesMut::new();
    rest.put_i16(0);
    rest.put_i16(1);
    rest.put_i32(value.len() as i32);
    rest.put_slice(value.as_bytes());
    rest.put_i16(0);
    let mut out = BytesMut::new();
    prepared::put_bind(&mut out, "", stmt, &rest);
    out
}
