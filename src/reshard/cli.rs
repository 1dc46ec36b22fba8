//! `weir reshard SOURCE TARGET`: asks a running Weir (found from its config file) to
//! reshard over its admin console, then prints its progress until it is done.

use crate::backend::login::Credentials;
use crate::backend::{ServerConn, Target};
use crate::config::{Address, Config, Secret};
use std::time::Duration;

/// Where and as whom to reach the console.
pub struct Options {
    pub source: String,
    pub target: String,
    /// Console host (default: the config's Unix socket, else 127.0.0.1) and port.
    pub host: Option<String>,
    pub port: Option<u16>,
    /// Default: the first of admin_users.
    pub user: Option<String>,
    /// Default: PGPASSWORD, else the user's password in the config.
    pub password: Option<String>,
    /// Start it and return at once.
    pub no_wait: bool,
}

/// Runs the command; the error is for the operator.
pub async fn run(config: &Config, o: Options) -> Result<(), String> {
    let g = &config.general;
    let user = o
        .user
        .clone()
        .or_else(|| g.admin_users.0.first().cloned())
        .ok_or("no --user given and admin_users is empty")?;
    let port = o.port.unwrap_or(g.listen_port);
    let host = o.host.clone().unwrap_or_else(|| {
        if !g.unix_socket_dir.is_empty() {
            g.unix_socket_dir.clone()
        } else {
            "127.0.0.1".to_string()
        }
    });
    let secret = o
        .password
        .clone()
        .or_else(|| std::env::var("PGPASSWORD").ok())
        .map(Secret::Plain)
        .or_else(|| config.users.get(&user).and_then(|u| u.secret.clone()));
    let target = Target {
        address: Address { host, port },
        dbname: "pgbouncer".into(),
        params: vec![],
        connect_timeout: Duration::from_secs(10),
        tls: crate::tls::ServerTls::disabled(),
        connect_query: None,
        hosts: vec![],
        round_robin: false,
    };
    let creds = Credentials {
        user,
        secret,
        scram_client_key: None,
    };
    let mut conn = ServerConn::connect(&target, &creds)
        .await
        .map_err(|e| format!("cannot reach Weir's console at {}: {e}", target.address))?;
    let sql = format!(
        "RESHARD {} TO {}",
        quote_word(&o.source),
        quote_word(&o.target)
    );
    conn.query_rows(&sql).await.map_err(|e| e.to_string())?;
    println!("RESHARD {} TO {} started", o.source, o.target);
    if o.no_wait {
        return Ok(());
    }
    let mut last = String::new();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rows = conn
            .query_rows("SHOW RESHARD")
            .await
            .map_err(|e| e.to_string())?;
        let Some(r) = rows.into_iter().next() else {
            return Err("SHOW RESHARD has no row".into());
        };
        let v = |i: usize| r.get(i).cloned().flatten().unwrap_or_default();
        let phase = v(2);
        let line = format!(
            "{phase}: tables {}/{}, rows copied {} ({}/s), changes applied {}, lag {} bytes / {} ms, eta {} s",
            v(4),
            v(3),
            v(5),
            v(6),
            v(12),
            v(7),
            v(8),
            v(9)
        );
        if line != last {
            println!("{line}");
            last = line;
        }
        match phase.as_str() {
            "done" => {
                println!(
                    "done: {} now uses the shards of {} (cutover held transactions {} ms); \
                     give {} these shards in the config file too",
                    o.source,
                    o.target,
                    v(11),
                    o.source
                );
                return Ok(());
            }
            "failed" => return Err(format!("RESHARD failed: {}", v(13))),
            "cancelled" => return Err("RESHARD was cancelled".into()),
            _ => {}
        }
    }
}

/// A console word: as is when plain, else double-quoted.
fn quote_word(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        s.to_string()
    } else {
        format!("\"{}\"", s.replace('"', "\"\""))
    }
}
