//! Loading TLS settings: modes, defaults, and the errors a bad setting gives. Handshakes
//! with real certificates are exercised in `tests/tls.rs`.

use super::*;
use crate::config::{Config, ConfigError};

fn load(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(Path::new("/nonexistent/weir.toml"), text)
}

fn error(text: &str) -> String {
    match load(text) {
        Ok(_) => panic!("config was accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn modes_use_pgbouncer_spelling_and_order() {
    for (text, mode) in [
        ("disable", SslMode::Disable),
        ("allow", SslMode::Allow),
        ("prefer", SslMode::Prefer),
        ("require", SslMode::Require),
        ("verify-ca", SslMode::VerifyCa),
        ("verify-full", SslMode::VerifyFull),
    ] {
        let parsed: SslMode = toml::Value::String(text.into()).try_into().unwrap();
        assert_eq!(parsed, mode);
        assert_eq!(mode.to_string(), text);
    }
    assert!(SslMode::Disable < SslMode::Allow && SslMode::Prefer < SslMode::Require);
    assert!(SslMode::Require < SslMode::VerifyCa && SslMode::VerifyCa < SslMode::VerifyFull);
}

#[test]
fn defaults_are_pgbouncer_s() {
    let c = load("").unwrap();
    assert_eq!(c.general.client_tls_sslmode, SslMode::Disable);
    assert_eq!(c.general.server_tls_sslmode, SslMode::Prefer);
    assert!(!c.tls.client.offered());
    assert!(!c.tls.client.required());
    assert_eq!(c.tls.server.mode, SslMode::Prefer);
}

#[test]
fn unknown_mode_names_the_line() {
    let e = error("[weir]\n\nclient_tls_sslmode = \"always\"\n");
    assert!(e.contains("line 3"), "{e}");
    assert!(e.contains("always"), "{e}");
}

#[test]
fn client_tls_needs_key_and_cert() {
    let e =
        error("[weir]\nclient_tls_sslmode = \"require\"\nclient_tls_cert_file = \"server.crt\"\n");
    assert_eq!(
        e,
        "/nonexistent/weir.toml: weir.client_tls_key_file: client_tls_sslmode require needs \
         client_tls_key_file and client_tls_cert_file"
    );
}

#[test]
fn unreadable_certificate_names_key_line_and_path() {
    let e = error(
        "[weir]\nclient_tls_sslmode = \"prefer\"\nclient_tls_key_file = \"server.key\"\n\
         client_tls_cert_file = \"server.crt\"\n",
    );
    assert!(
        e.starts_with("/nonexistent/weir.toml:4: weir.client_tls_cert_file: cannot read /nonexistent/server.crt"),
        "{e}"
    );
}

#[test]
fn a_file_without_pem_blocks_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), "not a certificate\n").unwrap();
    let e = Config::from_toml(
        &dir.path().join("weir.toml"),
        "[weir]\nserver_tls_sslmode = \"verify-ca\"\nserver_tls_ca_file = \"ca.pem\"\n",
    )
    .map(|_| ())
    .unwrap_err()
    .to_string();
    assert!(e.contains(":3: weir.server_tls_ca_file:"), "{e}");
    assert!(e.contains("holds no PEM certificate"), "{e}");
}

#[test]
fn empty_file_settings_mean_not_set() {
    // PgBouncer's `server_tls_ca_file =` (empty) is the same as leaving it out.
    let c = load("[weir]\nserver_tls_sslmode = \"require\"\nserver_tls_ca_file = \"\"\n").unwrap();
    assert_eq!(c.tls.server.mode, SslMode::Require);
}

#[test]
fn server_key_without_certificate_is_refused() {
    let e = error("[weir]\nserver_tls_key_file = \"client.key\"\n");
    assert!(e.contains("weir.server_tls_cert_file"), "{e}");
}

#[test]
fn disabled_sides_read_no_files() {
    // Files named for a disabled side are not needed (as PgBouncer, which never loads them).
    let c = load(
        "[weir]\nserver_tls_sslmode = \"disable\"\nserver_tls_ca_file = \"missing.pem\"\n\
         client_tls_cert_file = \"missing.crt\"\n",
    )
    .unwrap();
    assert_eq!(c.tls.server.mode, SslMode::Disable);
}

#[test]
fn server_tls_equality_follows_mode() {
    let a = load("[weir]\nserver_tls_sslmode = \"require\"\n").unwrap();
    let b = load("[weir]\nserver_tls_sslmode = \"require\"\n").unwrap();
    let c = load("[weir]\nserver_tls_sslmode = \"prefer\"\n").unwrap();
    assert_eq!(a.tls.server, b.tls.server);
    assert_ne!(a.tls.server, c.tls.server);
}

#[test]
fn pgbouncer_ini_settings_import() {
    let e = crate::config::ini::from_text(
        Path::new("/etc/pgbouncer/pgbouncer.ini"),
        "[pgbouncer]\nclient_tls_sslmode = require\nclient_tls_key_file =\n",
    )
    .map(|_| ())
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("/etc/pgbouncer/pgbouncer.ini:"),
        "ini errors name the ini file: {e}"
    );
    assert!(e.contains("pgbouncer.client_tls_key_file"), "{e}");
    let c = crate::config::ini::from_text(
        Path::new("/etc/pgbouncer/pgbouncer.ini"),
        "[pgbouncer]\nserver_tls_sslmode = verify-ca\nserver_tls_ca_file =\nclient_tls_ciphers = fast\n",
    );
    // verify-ca without a CA file falls back to the system bundle, which may be absent here.
    if let Ok(c) = c {
        assert_eq!(c.general.server_tls_sslmode, SslMode::VerifyCa);
        assert!(c.warnings.iter().any(|w| w.contains("client_tls_ciphers")));
    }
}
