//! The startup packet: whatever `packet_len` delimits, `parse` reads without panicking,
//! and a parsed StartupMessage or CancelRequest rebuilt by `wire::build` parses back to
//! the same thing.

use crate::wire::build;
use crate::wire::startup::{self, StartupPacket, MAX_STARTUP_LEN};

pub fn check(data: &[u8]) {
    let _ = startup::parse(data);
    let Ok(Some(len)) = startup::packet_len(data) else {
        return;
    };
    assert!((8..=MAX_STARTUP_LEN).contains(&len) && len <= data.len());
    if let Ok(packet) = startup::parse(&data[..len]) {
        round_trip(&packet);
    }
}

fn round_trip(packet: &StartupPacket) {
    let rebuilt = match packet {
        StartupPacket::Startup { params } => {
            let pairs: Vec<(&str, &str)> = params
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            build::startup(&pairs)
        }
        StartupPacket::Cancel { pid, secret } => build::cancel_request(*pid, *secret),
        _ => return,
    };
    assert_eq!(
        startup::packet_len(&rebuilt),
        Ok(Some(rebuilt.len())),
        "rebuilt packet is delimited by its own length"
    );
    assert_eq!(
        startup::parse(&rebuilt).as_ref(),
        Ok(packet),
        "rebuilt packet parses back"
    );
}
