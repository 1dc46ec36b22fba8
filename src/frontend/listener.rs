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

/// The addresses `listen_addr` names, as PgBouncer reads it: a comma-separated list of IP
/// addresses and host names (each name resolved, `localhost` to both loopbacks), `*` for
/// every IPv4 and IPv6 address. Empty: no TCP listener (Unix socket only).
pub fn listen_addresses(listen_addr: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
    use std::net::{Ipv4Addr, Ipv6Addr, ToSocketAddrs};
    let mut out: Vec<SocketAddr> = Vec::new();
    for item in listen_addr
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let found: Vec<SocketAddr> = if item == "*" {
            vec![
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
                SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
            ]
        } else if let Ok(ip) = item
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
        {
            vec![SocketAddr::new(ip, port)]
        } else {
            (item, port)
                .to_socket_addrs()
                .map_err(|e| std::io::Error::new(e.kind(), format!("listen_addr {item}: {e}")))?
                .collect()
        };
        for a in found {
            if !out.contains(&a) {
                out.push(a);
            }
        }
    }
    Ok(out)
}

/// Binds every address of `listen_addr` (see [`listen_addresses`]). As PgBouncer, an
/// address that cannot be bound is skipped with a warning when another one works (`*` on a
/// host without IPv6); none at all is an error.
pub fn bind(app: &App) -> std::io::Result<Vec<TcpListener>> {
    let cluster = app.cluster();
    let g = &cluster.config.general;
    let addrs = listen_addresses(&g.listen_addr, g.listen_port)?;
    let mut listeners = Vec::new();
    let mut first_error = None;
    for addr in &addrs {
        match bind_one(*addr, g.so_reuseport) {
            Ok(l) => listeners.push(l),
            Err(e) => {
                let e = std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"));
                if addrs.len() > 1 {
                    tracing::warn!("{e}");
                }
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) if listeners.is_empty() => Err(e),
        _ => Ok(listeners),
    }
}

fn bind_one(addr: SocketAddr, reuseport: bool) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        let s = TcpSocket::new_v6()?;
        // `::` beside `0.0.0.0`: IPv6 only, so both bind.
        socket2::SockRef::from(&s).set_only_v6(true)?;
        s
    };
    socket.set_reuseaddr(true)?;
    if reuseport {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(1024)
}

pub async fn serve(app: Arc<App>) -> std::io::Result<()> {
    let listeners = bind(&app)?;
    for l in &listeners {
        tracing::info!(addr = %l.local_addr()?, "listening");
    }
    serve_on(app, listeners).await
}

/// The next connection on any of `listeners` (pending forever when there are none).
async fn accept_any(
    listeners: &[TcpListener],
) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    std::future::poll_fn(|cx| {
        for l in listeners {
            if let std::task::Poll::Ready(r) = l.poll_accept(cx) {
                return std::task::Poll::Ready(r);
            }
        }
        std::task::Poll::Pending
    })
    .await
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
pub async fn serve_on(app: Arc<App>, listeners: Vec<TcpListener>) -> std::io::Result<()> {
    let unix = bind_unix(&app);
    let _cleanup = unix.as_ref().map(|(_, p)| RemoveOnDrop(p.clone()));
    let mut shutdown = app.shutdown.subscribe();
    loop {
        tokio::select! {
            accepted = accept_any(&listeners) => match accepted {
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
                    for listener in &listeners {
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
                    }
                    drop(listeners);
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

#[cfg(test)]
mod tests {
    use super::listen_addresses;

    #[test]
    fn listen_addr_lists_star_and_literals() {
        let star = listen_addresses("*", 6432).expect("*");
        assert_eq!(star.len(), 2);
        assert!(star.iter().any(|a| a.is_ipv4()) && star.iter().any(|a| a.is_ipv6()));
        let list = listen_addresses(" 127.0.0.1 ,::1,127.0.0.1,", 7).expect("list");
        let shown: Vec<String> = list.iter().map(|a| a.to_string()).collect();
        assert_eq!(shown, vec!["127.0.0.1:7", "[::1]:7"]);
        assert!(listen_addresses("", 6432).expect("empty").is_empty());
        assert!(listen_addresses("no-such-host.invalid", 6432).is_err());
    }
}
