//! The `weir` command: parse arguments, load the config, run, and handle
//! signals (SIGHUP reload, SIGINT graceful shutdown, SIGTERM immediate exit).

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use weir::config::Config;
use weir::{App, Shutdown};

#[derive(Parser, Debug)]
#[command(
    name = "weir",
    version,
    about = "PgBouncer-compatible PostgreSQL connection pooler"
)]
struct Args {
    /// Config file (weir.toml).
    config: Option<PathBuf>,
    /// Config file (same as the positional argument).
    #[arg(long = "config", short = 'c', value_name = "FILE")]
    config_flag: Option<PathBuf>,
    /// Validate FILE, print the effective config and exit.
    #[arg(long, value_name = "FILE")]
    check: Option<PathBuf>,
    /// Log level or tracing filter (e.g. info, debug, weir=trace); RUST_LOG also works.
    #[arg(long)]
    log_level: Option<String>,
    /// Verbose logging (PgBouncer's -v).
    #[arg(short = 'v', action = clap::ArgAction::Count)]
    verbose: u8,
    /// Quiet: only warnings and errors (PgBouncer's -q).
    #[arg(short = 'q')]
    quiet: bool,
}

fn init_logging(args: &Args) {
    use tracing_subscriber::EnvFilter;
    let filter = match (&args.log_level, args.verbose, args.quiet) {
        (Some(level), _, _) => EnvFilter::new(level),
        (None, _, true) => EnvFilter::new("warn"),
        (None, v, _) if v > 0 => EnvFilter::new(if v == 1 { "debug" } else { "trace" }),
        _ => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(&args);
    if let Some(path) = &args.check {
        return match Config::load(path) {
            Ok(cfg) => {
                for w in &cfg.warnings {
                    println!("warning: {w}");
                }
                print!("{}", cfg.render());
                println!("config OK");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(1)
            }
        };
    }
    let path = args
        .config_flag
        .clone()
        .or(args.config.clone())
        .unwrap_or_else(|| PathBuf::from("config/weir.toml"));
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(serve(path, config))
}

async fn serve(path: PathBuf, config: Config) -> ExitCode {
    let app = App::new(config);
    let listener = match weir::frontend::listener::bind(&app) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen");
            return ExitCode::from(1);
        }
    };
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, config = %path.display(), "weir {} listening", env!("CARGO_PKG_VERSION"));
    }
    let accept = tokio::spawn(weir::frontend::listener::serve_on(app.clone(), listener));
    let (Ok(mut hup), Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::hangup()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return ExitCode::from(1);
    };
    loop {
        tokio::select! {
            _ = hup.recv() => reload(&app, &path),
            _ = int.recv() => {
                tracing::info!("SIGINT: waiting for in-flight transactions, then exiting");
                let _ = app.shutdown.send(Shutdown::Graceful);
                let _ = accept.await;
                drain(&app).await;
                tracing::info!("shutdown complete");
                return ExitCode::SUCCESS;
            }
            _ = term.recv() => {
                tracing::info!("SIGTERM: exiting now");
                let _ = app.shutdown.send(Shutdown::Immediate);
                return ExitCode::SUCCESS;
            }
        }
    }
}

fn reload(app: &Arc<App>, path: &std::path::Path) {
    match Config::load(path) {
        Ok(cfg) => {
            app.reload(cfg);
            tracing::info!(config = %path.display(), "configuration reloaded");
        }
        Err(e) => tracing::error!(error = %e, "reload failed; keeping the running configuration"),
    }
}

/// How long a graceful shutdown waits for clients that connected just before
/// the listener closed to send their first transaction.
const FRESH_CLIENT_GRACE: Duration = Duration::from_secs(5);

/// Waits until no client holds a server and clients accepted before the
/// listener closed had their transaction (bounded by shutdown_timeout if set).
async fn drain(app: &Arc<App>) {
    let limit = app.cluster().config.general.shutdown_timeout;
    let started = tokio::time::Instant::now();
    while app.active.load(Ordering::Acquire) > 0
        || (app.fresh.load(Ordering::Acquire) > 0 && started.elapsed() < FRESH_CLIENT_GRACE)
    {
        if !limit.is_zero() && started.elapsed() >= limit {
            tracing::warn!("shutdown_timeout reached with transactions still running");
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
