//! TLS on both sides of Weir: clients (psql with `sslmode=verify-full` against a test CA,
//! plaintext refused under `client_tls_sslmode = require`, client certificates under
//! `verify-ca`), Weir to a PostgreSQL that accepts only TLS, certificates picked up on SIGHUP,
//! and the server-side modes' certificate checks against a stand-in server.

#[path = "core_support.rs"]
mod support;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair};
use support::common::{self, give_to_postgres, PgCluster, Weir};
use support::APP_PASSWORD;
use support::{app_cluster, app_config, app_url, expect_sqlstate, psql_ok, psql_via_weir, scalar};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir::config::Config;
use weir::tls::{ServerTls, ServerTlsError, SslMode};

// ---------------------------------------------------------------------------------------------
// Test certificates
// ---------------------------------------------------------------------------------------------

/// A throwaway certificate authority.
struct Ca {
    cert: Certificate,
    key: KeyPair,
}

/// A certificate and its private key, PEM-encoded.
struct Issued {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("generate CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("self-sign CA");
        Ca { cert, key }
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A certificate for `names` (host names or IP addresses) signed by this CA.
    fn issue(&self, common_name: &str, names: &[&str]) -> Issued {
        let key = KeyPair::generate().expect("generate key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("certificate params");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("sign certificate");
        Issued {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// What a server certificate for this machine names.
const LOCAL_NAMES: &[&str] = &["localhost", "127.0.0.1"];

/// Writes a PEM file readable only by its owner (libpq and PostgreSQL insist for keys).
fn write_private(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
    path
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

/// A TOML string literal for a path.
fn toml_path(path: &Path) -> String {
    format!("{:?}", path_str(path))
}

// ---------------------------------------------------------------------------------------------
// Clients to Weir
// ---------------------------------------------------------------------------------------------

/// `app_config` with client TLS in `mode`, serving a certificate for this machine from `ca`
/// (written next to the config), plus `extra` lines.
fn start_tls_weir(pg_port: u16, mode: &str, ca: &Ca, extra: &str) -> Weir {
    let server = ca.issue("localhost", LOCAL_NAMES);
    let general = format!(
        "client_tls_sslmode = \"{mode}\"\nclient_tls_key_file = \"server.key\"\n\
         client_tls_cert_file = \"server.crt\"\n{extra}"
    );
    Weir::start_with(
        common::ConfigFormat::Toml,
        &app_config(pg_port, &general),
        &[("server.crt", &server.cert), ("server.key", &server.key)],
    )
}

/// psql through Weir with extra connection parameters (`sslmode=…`), running `SELECT 1`.
/// A cluster and a Weir in front of it with `client_tls_sslmode = require`, and its CA.
fn cluster_and_weir_requiring_tls() -> (PgCluster, Ca, Weir) {
    let cluster = app_cluster();
    let ca = Ca::new("Weir test CA");
    let weir = start_tls_weir(cluster.port, "require", &ca, "");
    (cluster, ca, weir)
}

/// psql's parameters to check Weir's certificate against `root`.
fn verify_full(root: &Path) -> String {
    format!("sslmode=verify-full sslrootcert={}", path_str(root))
}

fn psql_select_1(weir: &Weir, params: &str) -> std::process::Output {
    psql_via_weir(
        weir,
        "app",
        Some(APP_PASSWORD),
        &format!("dbname=app {params}"),
        &["-c", "SELECT 1"],
    )
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn psql_verify_full_against_the_test_ca_reaches_postgres() {
    let (_cluster, ca, weir) = cluster_and_weir_requiring_tls();
    let files = tempfile::tempdir().expect("temp dir");
    let root = write_private(files.path(), "root.crt", &ca.pem());

    let out = psql_select_1(&weir, &verify_full(&root));
    assert_eq!(psql_ok(&out, "psql sslmode=verify-full"), "1");
    // A result much larger than the socket buffers crosses intact (TLS records that wait in
    // the buffer while the client is slow to read must still be sent).
    let big = psql_via_weir(
        &weir,
        "app",
        Some(APP_PASSWORD),
        &format!("dbname=app {}", verify_full(&root)),
        &[
            "-c",
            "SELECT repeat('x', 1000) FROM generate_series(1, 20000)",
        ],
    );
    let rows = psql_ok(&big, "a 20 MB result over TLS");
    assert_eq!(rows.lines().count(), 20_000);
    assert!(rows.lines().all(|l| l.len() == 1000));
    assert!(
        weir.log().contains("tls=TLSv1."),
        "the login is logged as TLS:\n{}",
        weir.log()
    );

    // A client trusting another CA refuses Weir's certificate.
    let stranger = write_private(files.path(), "other.crt", &Ca::new("Other CA").pem());
    let out = psql_select_1(&weir, &verify_full(&stranger));
    assert!(
        !out.status.success(),
        "an untrusted certificate was accepted"
    );
    assert!(
        stderr(&out).contains("certificate verify failed"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_refuses_plaintext_clients_with_pgbouncer_s_error() {
    let (_cluster, _ca, weir) = cluster_and_weir_requiring_tls();

    let out = psql_select_1(&weir, "sslmode=disable");
    assert!(!out.status.success(), "a plaintext psql got in");
    assert!(stderr(&out).contains("SSL required"), "{}", stderr(&out));

    // tokio-postgres without TLS sends a plaintext StartupMessage.
    let result = common::try_connect(&app_url(&weir)).await;
    let err = expect_sqlstate(result, "08P01", "plaintext login under require");
    assert_eq!(err.as_db_error().map(|d| d.message()), Some("SSL required"));

    // The Unix socket is exempt, as in PgBouncer.
    let out = psql_via_weir(
        &weir,
        "app",
        Some(APP_PASSWORD),
        "app",
        &["-h", "/tmp", "-c", "SELECT 1"],
    );
    assert_eq!(psql_ok(&out, "psql over the Unix socket"), "1");

    // sslmode=require from psql gets TLS (no certificate check) and works.
    assert_eq!(
        psql_ok(&psql_select_1(&weir, "sslmode=require"), "sslmode=require"),
        "1"
    );
}

/// Sends raw startup-phase bytes to Weir and returns everything it answers until it closes.
fn raw_exchange(weir: &Weir, bytes: &[u8]) -> Vec<u8> {
    let mut socket =
        std::net::TcpStream::connect(("127.0.0.1", weir.port)).expect("connect to weir");
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set read timeout");
    socket.write_all(bytes).expect("send to weir");
    let mut answer = Vec::new();
    let _ = socket.read_to_end(&mut answer);
    answer
}

fn startup_packet(code: i32) -> Vec<u8> {
    let mut p = 8i32.to_be_bytes().to_vec();
    p.extend(code.to_be_bytes());
    p
}

const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;

#[test]
fn gssenc_is_declined_and_unencrypted_data_after_ssl_request_is_refused() {
    let (_cluster, _ca, weir) = cluster_and_weir_requiring_tls();

    // GSSENCRequest: `N`, then a plaintext StartupMessage is refused because TLS is required.
    let startup = weir::wire::build::startup(&[("user", "app"), ("database", "app")]);
    let mut socket =
        std::net::TcpStream::connect(("127.0.0.1", weir.port)).expect("connect to weir");
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set read timeout");
    socket
        .write_all(&startup_packet(GSSENC_REQUEST))
        .expect("send GSSENCRequest");
    let mut n = [0u8; 1];
    socket.read_exact(&mut n).expect("answer to GSSENCRequest");
    assert_eq!(&n, b"N");
    socket.write_all(&startup).expect("send StartupMessage");
    let mut rest = Vec::new();
    let _ = socket.read_to_end(&mut rest);
    let text = String::from_utf8_lossy(&rest);
    assert!(
        text.contains("08P01") && text.contains("SSL required"),
        "{text}"
    );

    // Bytes sent together with the SSLRequest were not encrypted: refused (CVE-2021-23222).
    let mut injected = startup_packet(SSL_REQUEST);
    injected.extend_from_slice(&startup);
    let answer = raw_exchange(&weir, &injected);
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.contains("received unencrypted data after SSL request"),
        "{text}"
    );
}

#[test]
fn verify_ca_demands_a_client_certificate_from_the_ca() {
    let cluster = app_cluster();
    let ca = Ca::new("Weir test CA");
    let files = tempfile::tempdir().expect("temp dir");
    let root = write_private(files.path(), "root.crt", &ca.pem());
    let weir = start_tls_weir(
        cluster.port,
        "verify-ca",
        &ca,
        &format!("client_tls_ca_file = {}\n", toml_path(&root)),
    );

    let without = psql_select_1(&weir, &verify_full(&root));
    assert!(
        !without.status.success(),
        "a client without a certificate got in"
    );

    // psql presenting `client` as its certificate.
    let psql_as = |name: &str, client: &Issued| {
        let cert = write_private(files.path(), &format!("{name}.crt"), &client.cert);
        let key = write_private(files.path(), &format!("{name}.key"), &client.key);
        let params = format!(
            "{} sslcert={} sslkey={}",
            verify_full(&root),
            path_str(&cert),
            path_str(&key)
        );
        psql_select_1(&weir, &params)
    };
    let with = psql_as("client", &ca.issue("app", &[]));
    assert_eq!(psql_ok(&with, "psql with a client certificate"), "1");

    // A certificate from another CA is refused.
    let out = psql_as("stranger", &Ca::new("Other CA").issue("app", &[]));
    assert!(!out.status.success(), "a foreign client certificate got in");
}

#[test]
fn sighup_picks_up_a_new_certificate() {
    let cluster = app_cluster();
    let old_ca = Ca::new("Old CA");
    let new_ca = Ca::new("New CA");
    let weir = start_tls_weir(cluster.port, "require", &old_ca, "");
    let files = tempfile::tempdir().expect("temp dir");
    let old_root = write_private(files.path(), "old.crt", &old_ca.pem());
    let new_root = write_private(files.path(), "new.crt", &new_ca.pem());
    let verify_with = |root: &Path| psql_select_1(&weir, &verify_full(root));
    psql_ok(&verify_with(&old_root), "before the reload");

    let renewed = new_ca.issue("localhost", LOCAL_NAMES);
    weir.write_file("server.key", &renewed.key);
    weir.write_file("server.crt", &renewed.cert);
    weir.signal(libc::SIGHUP);
    common::eventually(Duration::from_secs(10), "the reload to be logged", || {
        weir.log().contains("configuration reloaded")
    });

    psql_ok(&verify_with(&new_root), "after the reload");
    assert!(
        !verify_with(&old_root).status.success(),
        "the old certificate is still served after SIGHUP"
    );
}

// ---------------------------------------------------------------------------------------------
// Weir to PostgreSQL
// ---------------------------------------------------------------------------------------------

/// Turns `cluster` into one that accepts TCP logins only over TLS, with a client certificate
/// from `ca` (`clientcert=verify-ca`), serving `server`. Restarts it.
fn require_tls(cluster: &PgCluster, ca: &Ca, server: &Issued) {
    let install = |name: &str, contents: &str| {
        let path = write_private(&cluster.dir, name, contents);
        give_to_postgres(&path);
        path
    };
    let cert = install("server.crt", &server.cert);
    let key = install("server.key", &server.key);
    let root = install("root.crt", &ca.pem());
    cluster.append_conf(&[
        "ssl = on".to_string(),
        format!("ssl_cert_file = {}", common::quote_literal(path_str(&cert))),
        format!("ssl_key_file = {}", common::quote_literal(path_str(&key))),
        format!("ssl_ca_file = {}", common::quote_literal(path_str(&root))),
    ]);
    // Truncating the existing file keeps its postgres ownership.
    fs::write(
        cluster.data_dir.join("pg_hba.conf"),
        "local all all trust\n\
         hostssl all all 127.0.0.1/32 scram-sha-256 clientcert=verify-ca\n",
    )
    .expect("write pg_hba.conf");
    cluster.stop();
    cluster.start_again();
}

/// Weir in front of `cluster` with the given `server_tls_*` lines.
fn weir_with_server_tls(cluster: &PgCluster, lines: &str) -> Weir {
    Weir::start(&app_config(
        cluster.port,
        &format!("{lines}\nquery_wait_timeout = 10\nserver_connect_timeout = 5"),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_reaches_a_tls_only_postgres_with_a_client_certificate() {
    let cluster = app_cluster();
    let ca = Ca::new("Weir test CA");
    require_tls(&cluster, &ca, &ca.issue("localhost", LOCAL_NAMES));
    let files = tempfile::tempdir().expect("temp dir");
    let root = write_private(files.path(), "root.crt", &ca.pem());
    let weir_cert = ca.issue("app", &[]);
    let cert = write_private(files.path(), "weir.crt", &weir_cert.cert);
    let key = write_private(files.path(), "weir.key", &weir_cert.key);

    let verified = weir_with_server_tls(
        &cluster,
        &format!(
            "server_tls_sslmode = \"verify-full\"\nserver_tls_ca_file = {}\n\
             server_tls_cert_file = {}\nserver_tls_key_file = {}",
            toml_path(&root),
            toml_path(&cert),
            toml_path(&key)
        ),
    );
    let client = common::connect(&app_url(&verified)).await;
    assert_eq!(
        scalar(
            &client,
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
        .await,
        "t"
    );
    assert_eq!(scalar(&client, "SELECT 40 + 2").await, "42");
    let rows = client
        .simple_query("SELECT repeat('x', 1000) FROM generate_series(1, 20000)")
        .await
        .expect("a 20 MB result over TLS");
    let count = rows
        .iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        .count();
    assert_eq!(count, 20_000);
    // Cancel requests reach the server too (PostgreSQL takes them in plaintext even when
    // pg_hba.conf allows only TLS, as it handles them before authentication).
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(60)").await });
    common::eventually(Duration::from_secs(10), "the sleep to start", || {
        cluster.psql(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'",
        ) == "1"
    });
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("send the cancel request");
    let cancelled = sleeper.await.expect("sleeper task");
    expect_sqlstate(cancelled, "57014", "cancelled sleep");

    // Without TLS the server has no pg_hba.conf line for Weir; without a client certificate
    // it refuses the login. Both errors reach the client.
    for (lines, expect) in [
        ("server_tls_sslmode = \"disable\"", "no encryption"),
        ("server_tls_sslmode = \"require\"", "certificate"),
    ] {
        let weir = weir_with_server_tls(&cluster, lines);
        let err = match common::try_connect(&app_url(&weir)).await {
            Ok(client) => client
                .simple_query("SELECT 1")
                .await
                .expect_err(&format!("{lines}: the login should fail")),
            Err(e) => e,
        };
        let text = common::describe_error(&err);
        assert!(text.contains(expect), "{lines}: {text}");
    }
}

// ---------------------------------------------------------------------------------------------
// server_tls_sslmode against a stand-in server
// ---------------------------------------------------------------------------------------------

fn config(lines: &str, dir: &Path) -> Config {
    Config::from_toml(&dir.join("weir.toml"), &format!("[weir]\n{lines}\n"))
        .unwrap_or_else(|e| panic!("config {lines:?}: {e}"))
}

/// A stand-in for PostgreSQL's side of SSL negotiation: answers one SSLRequest with `answer`,
/// on `S` runs the handshake with `config`'s client TLS, then echoes four bytes.
async fn stand_in_server(answer: u8, config: Config) -> u16 {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .expect("bind");
    let port = listener.local_addr().expect("local addr").port();
    tokio::spawn(async move {
        let Ok((mut tcp, _)) = listener.accept().await else {
            return;
        };
        let mut request = [0u8; 8];
        if tcp.read_exact(&mut request).await.is_err() || request[..] != startup_packet(SSL_REQUEST)
        {
            return;
        }
        if tcp.write_all(&[answer]).await.is_err() {
            return;
        }
        let mut stream = if answer == b'S' {
            match config.tls.client.accept(tcp).await {
                Ok(s) => s,
                Err(_) => return,
            }
        } else {
            weir::net::Stream::Tcp(tcp)
        };
        let mut ping = [0u8; 4];
        if stream.read_exact(&mut ping).await.is_ok() {
            let _ = stream.write_all(&ping).await;
            let _ = stream.flush().await;
        }
    });
    port
}

/// Connects to a stand-in server as Weir would, with `tls`, and round-trips four bytes.
async fn negotiate(tls: &ServerTls, port: u16, host: &str) -> Result<bool, ServerTlsError> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the stand-in");
    let mut stream = tls.negotiate(tcp, host).await?;
    stream.write_all(b"ping").await?;
    let mut echo = [0u8; 4];
    stream.read_exact(&mut echo).await?;
    assert_eq!(&echo, b"ping");
    Ok(stream.is_tls())
}

#[tokio::test]
async fn server_modes_check_what_libpq_checks() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = Ca::new("Weir test CA");
    write_private(dir.path(), "ca.crt", &ca.pem());
    write_private(dir.path(), "other.crt", &Ca::new("Other CA").pem());
    // The server's certificate is from the CA but names another host.
    let server = ca.issue("db.example", &["db.example"]);
    write_private(dir.path(), "server.crt", &server.cert);
    write_private(dir.path(), "server.key", &server.key);
    let server_side = "client_tls_sslmode = \"require\"\nclient_tls_key_file = \"server.key\"\n\
                       client_tls_cert_file = \"server.crt\"";
    let weir_side = |mode: &str, ca_file: &str| {
        config(
            &format!("server_tls_sslmode = \"{mode}\"\nserver_tls_ca_file = \"{ca_file}\""),
            dir.path(),
        )
        .tls
        .server
    };

    for (mode, ca_file, host, ok) in [
        ("require", "other.crt", "127.0.0.1", true),
        ("verify-ca", "ca.crt", "127.0.0.1", true),
        ("verify-ca", "other.crt", "127.0.0.1", false),
        ("verify-full", "ca.crt", "127.0.0.1", false),
        ("verify-full", "ca.crt", "db.example", true),
    ] {
        let port = stand_in_server(b'S', config(server_side, dir.path())).await;
        let result = negotiate(&weir_side(mode, ca_file), port, host).await;
        match (result, ok) {
            (Ok(tls), true) => assert!(tls, "{mode}: not encrypted"),
            (Err(ServerTlsError::Handshake(_)), false) => {}
            (other, _) => panic!("{mode} with {ca_file} to {host}: {other:?}"),
        }
    }

    // A server without TLS: prefer and allow go on in plaintext, require gives up.
    for mode in ["allow", "prefer"] {
        let port = stand_in_server(b'N', config(server_side, dir.path())).await;
        let tls = weir_side(mode, "ca.crt");
        assert!(!negotiate(&tls, port, "127.0.0.1").await.expect(mode));
    }
    let port = stand_in_server(b'N', config(server_side, dir.path())).await;
    let tls = weir_side("require", "ca.crt");
    assert_eq!(tls.mode, SslMode::Require);
    let refused = negotiate(&tls, port, "127.0.0.1").await;
    assert!(
        matches!(refused, Err(ServerTlsError::Refused)),
        "{refused:?}"
    );
}

#[test]
fn a_changed_server_certificate_changes_the_pool_target() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = Ca::new("Weir test CA");
    let first = ca.issue("app", &[]);
    write_private(dir.path(), "weir.crt", &first.cert);
    write_private(dir.path(), "weir.key", &first.key);
    let lines = "server_tls_sslmode = \"require\"\nserver_tls_cert_file = \"weir.crt\"\n\
                 server_tls_key_file = \"weir.key\"";
    let before = config(lines, dir.path()).tls.server;
    assert_eq!(before, config(lines, dir.path()).tls.server);
    let second = ca.issue("app", &[]);
    write_private(dir.path(), "weir.crt", &second.cert);
    write_private(dir.path(), "weir.key", &second.key);
    assert_ne!(before, config(lines, dir.path()).tls.server);

    // A key that does not belong to the certificate is a config error naming the key file.
    write_private(dir.path(), "weir.key", &first.key);
    let e = Config::from_toml(&dir.path().join("weir.toml"), &format!("[weir]\n{lines}\n"))
        .map(|_| ())
        .expect_err("mismatched key and certificate");
    assert!(e.to_string().contains("server_tls_key_file"), "{e}");
}

#[tokio::test]
async fn a_write_the_socket_cannot_take_at_once_is_still_delivered() {
    // tokio-rustls reports a write done once it is encrypted; with the socket full the rest
    // waits in its buffer. Weir does not flush (a no-op on TCP); its next read of the stream
    // must push the rest out, or a client waiting for ReadyForQuery would wait forever.
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Ca::new("Weir test CA").issue("localhost", LOCAL_NAMES);
    write_private(dir.path(), "server.crt", &server.cert);
    write_private(dir.path(), "server.key", &server.key);
    let config = config(
        "client_tls_sslmode = \"require\"\nclient_tls_key_file = \"server.key\"\n\
         client_tls_cert_file = \"server.crt\"",
        dir.path(),
    );
    const SIZE: usize = 60_000;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (written_tx, written_rx) = tokio::sync::oneshot::channel();
    let weir_side = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.expect("accept");
        socket2::SockRef::from(&tcp)
            .set_send_buffer_size(4096)
            .expect("shrink the send buffer");
        let mut request = [0u8; 8];
        tcp.read_exact(&mut request).await.expect("SSLRequest");
        tcp.write_all(b"S").await.expect("answer S");
        let mut stream = config.tls.client.accept(tcp).await.expect("handshake");
        stream.write_all(&[7u8; SIZE]).await.expect("write");
        let _ = written_tx.send(());
        let mut reply = [0u8; 2];
        stream
            .read_exact(&mut reply)
            .await
            .expect("the peer's reply");
        reply
    });

    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("shrink the receive buffer");
    let tcp = socket.connect(addr).await.expect("connect");
    let tls = config_with_server_mode("require", dir.path());
    let mut stream = tls.negotiate(tcp, "localhost").await.expect("negotiate");
    // Read nothing until the whole write has been reported done.
    written_rx.await.expect("the write finished");
    let mut got = vec![0u8; SIZE];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut got))
        .await
        .expect("the rest of the write never came")
        .expect("read");
    assert!(got.iter().all(|&b| b == 7));
    stream.write_all(b"ok").await.expect("reply");
    assert_eq!(&weir_side.await.expect("weir side"), b"ok");
}

fn config_with_server_mode(mode: &str, dir: &Path) -> ServerTls {
    config(&format!("server_tls_sslmode = \"{mode}\""), dir)
        .tls
        .server
}
