//! One server connection: its socket, what PostgreSQL told us about it, and
//! the session state Weir must reconcile before lending it to a client.

use super::login::{login, Credentials, LoginError};
use super::params::ParamSet;
use super::pool::Slot;
use super::prepared::ServerStatements;
use crate::config::Address;
use crate::net::{read_message, Stream};
use crate::stats::ServerInfo;
use crate::wire::{self, build, tag, ErrorFields, TxStatus};
use bytes::BytesMut;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Weir's id for a server connection (distinct from PostgreSQL's backend pid).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServerId(pub u64);

#[derive(Debug, Error)]
pub enum ConnectError {
    #[error("server connect timeout")]
    Timeout,
    #[error("could not connect to server {0}: {1}")]
    Connect(Address, std::io::Error),
    #[error("server {0}: {1}")]
    Tls(Address, crate::tls::ServerTlsError),
    #[error(transparent)]
    Login(#[from] LoginError),
    /// The database's `connect_query` failed on the new connection.
    #[error("connect_query failed: {0}")]
    ConnectQuery(ExecError),
}

impl ConnectError {
    /// True for failures a later attempt may not repeat: the server refused the
    /// connection, did not answer in time, or closed it during login (PgBouncer retries
    /// these after server_login_retry). A server's error, a TLS or protocol failure and
    /// a failing connect_query reach the client at once.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ConnectError::Timeout
                | ConnectError::Connect(..)
                | ConnectError::Login(LoginError::Io(_))
        )
    }

    /// PgBouncer's words for why a new server connection was closed.
    pub fn log_reason(&self) -> String {
        match self {
            ConnectError::Timeout => "connect timeout".into(),
            ConnectError::Connect(_, e) if e.kind() == std::io::ErrorKind::NotFound => {
                "server DNS lookup failed".into()
            }
            ConnectError::Connect(..) => "connect failed".into(),
            ConnectError::Tls(_, e) => format!("TLS setup failed: {e}"),
            // PgBouncer closes with the server's own words.
            ConnectError::Login(LoginError::Server(f)) => f.message.clone(),
            ConnectError::Login(e) => format!("login failed: {e}"),
            ConnectError::ConnectQuery(e) => format!("connect_query failed: {e}"),
        }
    }
}

/// Everything needed to open one server connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub address: Address,
    pub dbname: String,
    pub params: Vec<(String, String)>,
    pub connect_timeout: Duration,
    /// server_tls_sslmode and its certificates.
    pub tls: crate::tls::ServerTls,
    /// Run once on every new connection before it is used (the database's `connect_query`).
    pub connect_query: Option<String>,
    /// A host list (`host=a,b`): every host, `address` being the first; empty for one host.
    pub hosts: Vec<Address>,
    /// With a host list: each new connection takes the next host (`round-robin`), else it
    /// keeps to the one that last worked (`load_balance_hosts = disable`).
    pub round_robin: bool,
}

pub struct ServerConn {
    pub id: ServerId,
    pub stream: Stream,
    /// Bytes read from the server not yet handled (kept with the connection so
    /// its allocation is reused).
    pub buf: BytesMut,
    pub address: Address,
    pub backend_pid: i32,
    pub backend_secret: i32,
    /// Session parameters as the server currently has them.
    pub params: ParamSet,
    /// Weir-wide prepared statements this server holds.
    pub prepared: ServerStatements,
    pub created: Instant,
    pub last_used: Instant,
    /// Holds the pool slot; dropping the connection frees it.
    pub(super) slot: Option<Slot>,
    /// Shared view for SHOW SERVERS.
    pub info: Option<Arc<ServerInfo>>,
    /// Pool epoch at connect (RECONNECT closes older ones).
    pub(super) epoch: u64,
}

impl std::fmt::Debug for ServerConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ServerConn({} pid={} {})",
            self.id.0, self.backend_pid, self.address
        )
    }
}

/// A server error from an internal query, passed to the client that caused it.
#[derive(Debug, Error)]
pub enum ExecError {
    #[error("{}", .0.message)]
    Server(ErrorFields),
    #[error("server connection lost: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// The path of a server's Unix socket when its host is a directory (`host=/run/postgresql`,
/// as libpq and PgBouncer read it): `<dir>/.s.PGSQL.<port>`.
pub fn unix_socket_path(address: &Address) -> Option<std::path::PathBuf> {
    address
        .host
        .starts_with('/')
        .then(|| std::path::Path::new(&address.host).join(format!(".s.PGSQL.{}", address.port)))
}

/// Opens the transport to a server: a Unix socket when the host is a directory, else TCP.
pub async fn dial(address: &Address) -> std::io::Result<Stream> {
    match unix_socket_path(address) {
        Some(path) => Ok(Stream::Unix(tokio::net::UnixStream::connect(path).await?)),
        None => {
            // A name that does not resolve is told apart ("server DNS lookup failed").
            let addrs: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host((address.host.as_str(), address.port))
                    .await
                    .map_err(|e| {
                        std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            format!("could not resolve {}: {e}", address.host),
                        )
                    })?
                    .collect();
            Ok(Stream::Tcp(TcpStream::connect(&addrs[..]).await?))
        }
    }
}

impl ServerConn {
    /// Opens and logs in a new server connection.
    pub async fn connect(target: &Target, creds: &Credentials) -> Result<ServerConn, ConnectError> {
        let work = async {
            let mut stream = match dial(&target.address)
                .await
                .map_err(|e| ConnectError::Connect(target.address.clone(), e))?
            {
                Stream::Tcp(tcp) => {
                    crate::net::tune_tcp(&tcp, true);
                    let _ = socket2::SockRef::from(&tcp).set_keepalive(true);
                    target
                        .tls
                        .negotiate(tcp, &target.address.host)
                        .await
                        .map_err(|e| ConnectError::Tls(target.address.clone(), e))?
                }
                // As PgBouncer and libpq: no TLS over a Unix socket.
                other => other,
            };
            let mut buf = BytesMut::with_capacity(16 * 1024);
            let mut startup: Vec<(&str, &str)> = vec![
                ("user", creds.user.as_str()),
                ("database", target.dbname.as_str()),
            ];
            startup.extend(target.params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            let result = login(&mut stream, &mut buf, &startup, creds).await?;
            let now = Instant::now();
            let mut conn = ServerConn {
                id: ServerId(crate::stats::next_socket_id()),
                stream,
                buf,
                address: target.address.clone(),
                backend_pid: result.backend_pid,
                backend_secret: result.backend_secret,
                params: ParamSet::from_reported(&result.params),
                prepared: ServerStatements::default(),
                created: now,
                last_used: now,
                slot: None,
                info: None,
                epoch: 0,
            };
            if let Some(q) = &target.connect_query {
                conn.exec(q).await.map_err(ConnectError::ConnectQuery)?;
            }
            Ok(conn)
        };
        match tokio::time::timeout(target.connect_timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(ConnectError::Timeout),
        }
    }

    /// True when the socket has neither closed nor sent anything unexpected
    /// since it went idle (a terminated backend sends FATAL then EOF).
    pub fn is_alive(&self) -> bool {
        self.stream.is_idle_open()
    }

    /// Runs a simple query Weir issues itself; swallows its results and
    /// records any ParameterStatus. Returns the final transaction status.
    pub async fn exec(&mut self, sql: &str) -> Result<TxStatus, ExecError> {
        self.stream.write_all(&build::query(sql)).await?;
        self.drain_until_ready().await
    }

    /// Runs a one-row query Weir issues itself and returns that row's values.
    pub async fn query_row(&mut self, sql: &str) -> Result<Vec<Option<String>>, ExecError> {
        Ok(self
            .query_rows(sql)
            .await?
            .into_iter()
            .next()
            .unwrap_or_default())
    }

    /// Runs a query Weir issues itself (several statements allowed) and returns the rows
    /// of all of them, text values.
    pub async fn query_rows(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, ExecError> {
        self.stream.write_all(&build::query(sql)).await?;
        let mut rows = Vec::new();
        self.drain(Some(&mut rows)).await?;
        Ok(rows)
    }

    /// Reads and discards until ReadyForQuery; keeps the first error.
    pub async fn drain_until_ready(&mut self) -> Result<TxStatus, ExecError> {
        self.drain(None).await
    }

    async fn drain(
        &mut self,
        mut rows: Option<&mut Vec<Vec<Option<String>>>>,
    ) -> Result<TxStatus, ExecError> {
        let mut error = None;
        loop {
            let msg = read_message(&mut self.stream, &mut self.buf)
                .await?
                .ok_or_else(|| ExecError::Io(std::io::ErrorKind::UnexpectedEof.into()))?;
            match msg[0] {
                tag::READY_FOR_QUERY => {
                    let status = msg
                        .get(5)
                        .and_then(|&b| TxStatus::from_byte(b))
                        .ok_or_else(|| ExecError::Protocol("bad ReadyForQuery".into()))?;
                    return match error {
                        Some(e) => Err(ExecError::Server(e)),
                        None => Ok(status),
                    };
                }
                tag::ERROR_RESPONSE if error.is_none() => error = Some(wire::error_fields(&msg)),
                tag::PARAMETER_STATUS => {
                    if let Some((k, v)) = wire::parameter_status(&msg) {
                        self.params.set_reported(k, v);
                    }
                }
                b'D' => {
                    if let Some(out) = rows.as_deref_mut() {
                        out.push(
                            data_row(&msg)
                                .ok_or_else(|| ExecError::Protocol("bad DataRow".into()))?,
                        );
                    }
                }
                tag::COPY_IN_RESPONSE => {
                    self.stream
                        .write_all(&build::copy_fail("internal query cannot COPY"))
                        .await?;
                }
                _ => {}
            }
        }
    }
}

/// Text values of a DataRow.
fn data_row(msg: &[u8]) -> Option<Vec<Option<String>>> {
    let b = wire::body(msg);
    let n = i16::from_be_bytes([*b.first()?, *b.get(1)?]);
    let mut pos = 2;
    let mut out = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let len = i32::from_be_bytes(b.get(pos..pos + 4)?.try_into().ok()?);
        pos += 4;
        if len < 0 {
            out.push(None);
        } else {
            let v = b.get(pos..pos + len as usize)?;
            out.push(Some(String::from_utf8_lossy(v).into_owned()));
            pos += len as usize;
        }
    }
    Some(out)
}

impl Drop for ServerConn {
    fn drop(&mut self) {
        // Say goodbye so PostgreSQL does not log an unexpected EOF; best effort,
        // never blocks.
        self.stream.send_nowait(&build::terminate());
    }
}
