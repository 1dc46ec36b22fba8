//! The untagged first message of a connection: StartupMessage, SSLRequest,
//! GSSENCRequest or CancelRequest.

use super::WireError;

pub const PROTOCOL_3_0: i32 = 196_608;
pub const SSL_REQUEST: i32 = 80_877_103;
pub const GSSENC_REQUEST: i32 = 80_877_104;
pub const CANCEL_REQUEST: i32 = 80_877_102;

/// Startup packets larger than this are refused (PostgreSQL uses 10000).
pub const MAX_STARTUP_LEN: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    Startup {
        /// Parameters in the order the client sent them.
        params: Vec<(String, String)>,
    },
    Ssl,
    GssEnc,
    Cancel {
        pid: i32,
        secret: i32,
    },
    /// A protocol 3.x newer than 3.0 (3.2 from libpq 18): Weir answers with
    /// NegotiateProtocolVersion and speaks 3.0, as PostgreSQL does with a newer minor.
    NewerMinor {
        minor: u16,
        params: Vec<(String, String)>,
    },
    /// A protocol version Weir does not speak (e.g. 2.0).
    UnsupportedVersion(i32),
}

/// Returns the total length of the startup packet at the start of `buf` if complete.
pub fn packet_len(buf: &[u8]) -> Result<Option<usize>, WireError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 8 || len as usize > MAX_STARTUP_LEN {
        return Err(WireError::BadLength(len as i64));
    }
    Ok((buf.len() >= len as usize).then_some(len as usize))
}

/// Parses one complete startup packet (as delimited by [`packet_len`]).
pub fn parse(packet: &[u8]) -> Result<StartupPacket, WireError> {
    if packet.len() < 8 {
        return Err(WireError::Malformed("startup"));
    }
    let code = i32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
    match code {
        SSL_REQUEST => Ok(StartupPacket::Ssl),
        GSSENC_REQUEST => Ok(StartupPacket::GssEnc),
        CANCEL_REQUEST => {
            if packet.len() != 16 {
                return Err(WireError::Malformed("CancelRequest"));
            }
            let pid = i32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]);
            let secret = i32::from_be_bytes([packet[12], packet[13], packet[14], packet[15]]);
            Ok(StartupPacket::Cancel { pid, secret })
        }
        PROTOCOL_3_0 => parse_params(&packet[8..]).map(|params| StartupPacket::Startup { params }),
        v if v >> 16 == 3 => parse_params(&packet[8..]).map(|params| StartupPacket::NewerMinor {
            minor: (v & 0xffff) as u16,
            params,
        }),
        other => Ok(StartupPacket::UnsupportedVersion(other)),
    }
}

fn parse_params(mut rest: &[u8]) -> Result<Vec<(String, String)>, WireError> {
    let mut params = Vec::new();
    loop {
        match rest.first() {
            None => return Err(WireError::Malformed("startup")),
            Some(0) => return Ok(params),
            Some(_) => {}
        }
        let (name, after) = take_cstr(rest)?;
        let (value, after) = take_cstr(after)?;
        params.push((name, value));
        rest = after;
    }
}

fn take_cstr(buf: &[u8]) -> Result<(String, &[u8]), WireError> {
    let end = buf
        .iter()
        .position(|&b| b == 0)
        .ok_or(WireError::Malformed("startup"))?;
    let s = std::str::from_utf8(&buf[..end]).map_err(|_| WireError::Malformed("startup"))?;
    Ok((s.to_string(), &buf[end + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::build;

    #[test]
    fn parses_startup_params() {
        let pkt = build::startup(&[("user", "app"), ("database", "db")]);
        let len = packet_len(&pkt).unwrap().unwrap();
        assert_eq!(len, pkt.len());
        assert_eq!(
            parse(&pkt).unwrap(),
            StartupPacket::Startup {
                params: vec![
                    ("user".into(), "app".into()),
                    ("database".into(), "db".into())
                ]
            }
        );
    }

    #[test]
    fn parses_cancel_and_ssl() {
        let pkt = build::cancel_request(7, -9);
        assert_eq!(
            parse(&pkt).unwrap(),
            StartupPacket::Cancel { pid: 7, secret: -9 }
        );
        assert_eq!(
            parse(b"\0\0\0\x08\x04\xd2\x16\x2f").unwrap(),
            StartupPacket::Ssl
        );
    }

    #[test]
    fn rejects_garbage() {
        assert!(packet_len(b"\xff\xff\xff\xff").is_err());
        assert!(packet_len(b"\0\0\0\x02").is_err());
        assert!(parse(b"\0\0\0\x0a\0\x03\0\0ab").is_err());
    }
}
