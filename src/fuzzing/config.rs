//! The operator's configuration formats: pgbouncer.ini (with the userlist and HBA formats
//! it names) and weir.toml. Any text loads or is refused with an error, never a panic.
//!
//! Both loaders read the files a config names (`%include`, `auth_file`, TLS files). The
//! config is placed in a directory that does not exist, so relative names never resolve
//! (Linux will not walk `..` out of a missing directory); text naming the special file
//! systems, where a read could block or never end, is skipped.

use crate::config::secret::Secret;
use crate::config::{duration, ini, parse_address, userlist, Config};
use std::path::Path;

const BASE: &str = "/nonexistent-weir-fuzz";

/// False for text that may name a file whose read could block or never end.
pub fn reads_only_plain_files(text: &str) -> bool {
    const SPECIAL: &[&str] = &[
        "/dev", "/proc", "/sys", "/run", "/tmp", "/var", "\\u", "\\U",
    ];
    !SPECIAL.iter().any(|s| text.contains(s))
}

pub fn ini(text: &str) {
    let _ = userlist::parse(text);
    let _ = crate::auth::hba::Hba::parse(text);
    let _ = Secret::parse(text);
    if !reads_only_plain_files(text) {
        return;
    }
    let path = Path::new(BASE).join("pgbouncer.ini");
    match ini::from_text(&path, text) {
        Ok(config) => loaded(&config),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

pub fn toml(text: &str) {
    let _ = duration::parse(text);
    address_round_trip(text);
    if !reads_only_plain_files(text) {
        return;
    }
    match Config::from_toml(&Path::new(BASE).join("weir.toml"), text) {
        Ok(config) => loaded(&config),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

fn loaded(config: &Config) {
    let _ = crate::admin::settings::render_effective(config);
    let _ = config.database("some_db");
}

/// An address written back as `host:port` (`[host]:port` when the host has a colon or
/// starts with a bracket) reads as the same address.
fn address_round_trip(text: &str) {
    let Ok(address) = parse_address(text) else {
        return;
    };
    assert!(!address.host.is_empty(), "{text:?} gave an empty host");
    let host = &address.host;
    let written = if host.contains(':') || host.starts_with('[') {
        format!("[{host}]:{}", address.port)
    } else {
        format!("{host}:{}", address.port)
    };
    assert_eq!(
        parse_address(&written).as_ref(),
        Ok(&address),
        "{text:?} written as {written:?}"
    );
}
