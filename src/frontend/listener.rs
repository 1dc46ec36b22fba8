//! Accepts client connections on TCP and hands each to a session task.

use crate::net::Stream;
use crate::{App, Shutdown};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpSocket, UnixListener, UnixStream};

/// Decrements the client count however the session task ends (even KILL).
struct ClientCount(Arc<App>);

impl Drop for ClientCount {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Binds the configured address (`*` = all interfaces).
pub fn bind(app: &App) -> std::io::Result<TcpListener> {
    let cluster = app.cluster();
    let g = &cluster.config.general;
    let host = match g.listen_addr.as_str() {
        "*" | "" => "0.0.0.0",
        other => other,
    };
    let addr: SocketAddr = format!("{host}:{}", g.listen_port)
        .parse()
        .or_else(|_| format!("[{host}]:{}", g.listen_port).parse())
        .map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("listen_addr {host}: {e}"),
            )
        })?;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if g.so_reuseport {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(1024)
}

pub async fn serve(app: Arc<App>) -> std::io::Result<()> {
    let listener = bind(&app)?;
    tracing::info!(addr = %listener.local_addr()?, "listening");
    serve_on(app, listener).await
}

/// Binds PgBouncer's Unix socket `<unix_socket_dir>/.s.PGSQL.<port>`, if a
/// directory is configured. Failure is logged, not fatal (TCP still serves).
pub fn bind_unix(app: &App) -> Option<(UnixListener, PathBuf)> {
    let cluster = app.cluster();
    let g = &cluster.config.general;
    if g.unix_socket_dir.is_empty() {
        return None;
    }
    let path = PathBuf::from(&g.unix_socket_dir).join(format!(".s.PGSQL.{}", g.listen_port));
    // A socket file left by a process that is gone (nobody answers) is stale.
    if path.exists() && std::os::unix::net::UnixStream::connect(&path).is_err() {
        let _ = std::fs::remove_file(&path);
    }
    match UnixListener::bind(&path) {
        Ok(l) => {
            // PgBouncer's unix_socket_mode default: anyone may connect.
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777));
            Some((l, path))
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot listen on Unix socket");
            None
        }
    }
}

/// Serves one accepted connection; `late`: accepted after a shutdown began (only the
/// admin console may log in).
fn spawn_session(app: &Arc<App>, stream: Stream, peer: String, late: bool) {
    app.clients.fetch_add(1, Ordering::AcqRel);
    let app = app.clone();
    let abort = Arc::new(std::sync::OnceLock::new());
    let handle = abort.clone();
    let task = tokio::spawn(async move {
        let _count = ClientCount(app.clone());
        super::session::run(app, stream, peer, handle, late).await;
    });
    let _ = abort.set(task.abort_handle());
}

/// During SHUTDOWN WAIT_FOR_CLIENTS: keeps accepting on the Unix socket (login refuses all
/// but the admin console) until an immediate shutdown.
async fn admin_only_unix(
    app: &Arc<App>,
    unix: &Option<(UnixListener, PathBuf)>,
    shutdown: &mut tokio::sync::watch::Receiver<Shutdown>,
) {
    if unix.is_none() {
        return;
    }
    loop {
        tokio::select! {
            accepted = accept_unix(unix) => {
                if let Ok(s) = accepted {
                    spawn_session(app, Stream::Unix(s), "unix".into(), true);
                }
            }
            r = shutdown.changed() => {
                if r.is_err() || *shutdown.borrow() == Shutdown::Immediate {
                    return;
                }
            }
        }
    }
}

/// Accept loop; returns when a shutdown begins (in-flight sessions go on).
pub async fn serve_on(app: Arc<App>, listener: TcpListener) -> std::io::Result<()> {
    let unix = bind_unix(&app);
    let _cleanup = unix.as_ref().map(|(_, p)| RemoveOnDrop(p.clone()));
    let mut shutdown = app.shutdown.subscribe();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    crate::net::tune_tcp(&tcp, app.cluster().config.general.tcp_keepalive);
                    spawn_session(&app, Stream::Tcp(tcp), peer.to_string(), false);
                }
                Err(e) => {
                    // EMFILE and friends: log, back off briefly, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            accepted = accept_unix(&unix) => match accepted {
                Ok(s) => spawn_session(&app, Stream::Unix(s), "unix".into(), false),
                Err(e) => {
                    tracing::warn!(error = %e, "unix accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => {
                if *shutdown.borrow() != Shutdown::Running {
                    // Connections the kernel already completed are in-flight
                    // clients: take them before the listener closes (with
                    // so_reuseport, new ones then go to the other process).
                    while let Some(Ok((tcp, peer))) = std::future::poll_fn(|cx| {
                        std::task::Poll::Ready(match listener.poll_accept(cx) {
                            std::task::Poll::Ready(r) => Some(r),
                            std::task::Poll::Pending => None,
                        })
                    })
                    .await
                    {
                        crate::net::tune_tcp(&tcp, app.cluster().config.general.tcp_keepalive);
                        spawn_session(&app, Stream::Tcp(tcp), peer.to_string(), false);
                    }
                    drop(listener);
                    if *shutdown.borrow() != Shutdown::Immediate {
                        // As PgBouncer: the Unix socket stays open for the admin console
                        // (logins to other databases are refused) until the process ends.
                        admin_only_unix(&app, &unix, &mut shutdown).await;
                    }
                    return Ok(());
                }
            }
        }
    }
}

async fn accept_unix(l: &Option<(UnixListener, PathBuf)>) -> std::io::Result<UnixStream> {
    match l {
        Some((l, _)) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
