//! Accepts client connections on TCP and hands each to a session task.

use crate::net::Stream;
use crate::{App, Shutdown};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpSocket};

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

/// Accept loop; returns when a shutdown begins (in-flight sessions go on).
pub async fn serve_on(app: Arc<App>, listener: TcpListener) -> std::io::Result<()> {
    let mut shutdown = app.shutdown.subscribe();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: log, back off briefly, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                app.clients.fetch_add(1, Ordering::AcqRel);
                let app = app.clone();
                let abort = Arc::new(std::sync::OnceLock::new());
                let handle = abort.clone();
                let task = tokio::spawn(async move {
                    let _count = ClientCount(app.clone());
                    super::session::run(app, Stream::Tcp(tcp), peer.to_string(), handle).await;
                });
                let _ = abort.set(task.abort_handle());
            }
            _ = shutdown.changed() => {
                if *shutdown.borrow() != Shutdown::Running {
                    return Ok(());
                }
            }
        }
    }
}
