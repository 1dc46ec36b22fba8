//! Fuzz targets: one pure function per parser that peer or operator input reaches, each
//! feeding arbitrary bytes to the real code and asserting what must hold for every input
//! (no panic, round trips where a format has one, and for the message scanners that any
//! split of a stream scans like the stream whole).
//!
//! The same functions serve libFuzzer (`fuzz/`, cargo-fuzz) and the bounded stable-toolchain
//! smoke run in `tests/fuzz_smoke.rs`, so a crash found by either is reproduced by both. A
//! target returns normally or panics; it never touches the network, and the config targets
//! only read files through paths that cannot block (see [`config::reads_only_plain_files`]).

mod admin;
mod config;
mod relay;
pub use relay::input as frame_scanner_input;
mod scram;
mod sql;
mod startup;

/// Tagged message streams: `wire::header` framing, the message-body readers, and the
/// client and server relay scanners, whole against split (see [`relay`]).
pub fn frame_scanner(data: &[u8]) {
    relay::frames(data);
    relay::split_equals_whole(data);
}

/// The untagged first message: `packet_len`, `parse`, and rebuilding what was parsed.
pub fn startup_packet(data: &[u8]) {
    startup::check(data);
}

/// SCRAM-SHA-256 client-first and client-final messages against a fixed verifier.
pub fn scram_messages(data: &[u8]) {
    scram::check(data);
}

/// The admin console grammar, with the round trip of what it accepts.
pub fn admin_command(data: &[u8]) {
    admin::check(&String::from_utf8_lossy(data));
}

/// SQL a client sends: session-state scanning, comment hints, statement shapes, the
/// routing analysis and sharding keys.
pub fn sql_routing(data: &[u8]) {
    sql::check(data);
}

/// pgbouncer.ini (and the userlist and HBA files it names).
pub fn pgbouncer_ini(data: &[u8]) {
    config::ini(&String::from_utf8_lossy(data));
}

/// weir.toml.
pub fn weir_toml(data: &[u8]) {
    config::toml(&String::from_utf8_lossy(data));
}

/// One fuzz target: takes any bytes, panics only when a property fails.
pub type Target = fn(&[u8]);

/// Every target by name, for harnesses that run them all (the smoke test, the README).
pub const TARGETS: &[(&str, Target)] = &[
    ("frame_scanner", frame_scanner),
    ("startup_packet", startup_packet),
    ("scram_messages", scram_messages),
    ("admin_command", admin_command),
    ("sql_routing", sql_routing),
    ("pgbouncer_ini", pgbouncer_ini),
    ("weir_toml", weir_toml),
];
