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
    // `--version` prints "Weir X.Y.Z", the same line as the console's SHOW VERSION (as
    // PgBouncer's does); usage and help name the command.
    name = "Weir",
    bin_name = "weir",
    version = weir::VERSION,
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
    /// Quiet: nothing on stderr (PgBouncer's -q); logfile still gets every line.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Run in the background (PgBouncer's -d); logs still go to stderr, so
    /// redirect it: `weir -d weir.toml 2>>weir.log`.
    #[arg(short = 'd', long = "daemon")]
    daemon: bool,
    /// Switch to this OS user after binding the listen sockets (PgBouncer's -u).
    #[arg(short = 'u', long = "user", value_name = "USERNAME")]
    user: Option<String>,
}

/// `weir reshard SOURCE TARGET`: runs RESHARD on a running Weir and follows its progress.
#[derive(Parser, Debug)]
#[command(name = "weir reshard", bin_name = "weir reshard")]
struct ReshardArgs {
    /// The sharded database to move.
    source: String,
    /// The configured database whose shards it moves to.
    target: String,
    /// The running Weir's config file (for its port, socket and admin user).
    #[arg(
        long = "config",
        short = 'c',
        value_name = "FILE",
        default_value = "config/weir.toml"
    )]
    config: PathBuf,
    /// Console host (default: the config's unix_socket_dir, else 127.0.0.1).
    #[arg(long)]
    host: Option<String>,
    /// Console port (default: listen_port).
    #[arg(long, short = 'p')]
    port: Option<u16>,
    /// Admin user (default: the first of admin_users).
    #[arg(long = "user", short = 'U')]
    user: Option<String>,
    /// Start the reshard and return at once (follow it with SHOW RESHARD).
    #[arg(long)]
    no_wait: bool,
}

fn reshard_command(argv: Vec<std::ffi::OsString>) -> ExitCode {
    let args = ReshardArgs::parse_from(argv);
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let options = weir::reshard::cli::Options {
        source: args.source,
        target: args.target,
        host: args.host,
        port: args.port,
        user: args.user,
        password: None,
        no_wait: args.no_wait,
    };
    match runtime.block_on(weir::reshard::cli::run(&config, options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

/// Forks: the parent exits, the child leads a new session with stdio on /dev/null.
/// The write end of the pipe a `-d` parent waits on (-1: not daemonized).
static DAEMON_READY_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// `-d`: forks; the parent returns only once the child listens (exit 0) or has failed (the
/// child's exit status), as PgBouncer's -d, so `weir -d cfg && next-step` is safe.
fn daemonize() -> Result<(), String> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds has room for the two descriptors pipe() writes.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } == -1 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    let [read_end, write_end] = fds;
    // SAFETY: called before any thread (the tokio runtime) exists, so fork
    // duplicates the only thread; the child only continues normal execution.
    match unsafe { libc::fork() } {
        -1 => return Err(format!("fork: {}", std::io::Error::last_os_error())),
        0 => {
            // SAFETY: closing this process's own copy of the pipe's read end.
            unsafe { libc::close(read_end) };
            DAEMON_READY_FD.store(write_end, std::sync::atomic::Ordering::Relaxed);
        }
        child => {
            // SAFETY: the parent's own descriptors and its own child, on plain buffers.
            unsafe {
                libc::close(write_end);
                let mut byte = 0u8;
                let n = loop {
                    let n = libc::read(read_end, (&mut byte as *mut u8).cast(), 1);
                    if n != -1
                        || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
                    {
                        break n;
                    }
                };
                if n == 1 {
                    std::process::exit(0);
                }
                // The child ended before it listened: its status is ours.
                let mut status = 0;
                libc::waitpid(child, &mut status, 0);
                let code = if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    1
                };
                std::process::exit(if code == 0 { 1 } else { code });
            }
        }
    }
    // SAFETY: plain system calls on this process's own session and descriptors.
    unsafe {
        if libc::setsid() == -1 {
            return Err(format!("setsid: {}", std::io::Error::last_os_error()));
        }
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            // stderr stays where the caller pointed it (logs: `weir -d cfg 2>>weir.log`).
            libc::dup2(null, 0);
            libc::dup2(null, 1);
            if null > 2 {
                libc::close(null);
            }
        }
    }
    Ok(())
}

/// Drops root privileges to `name` (PgBouncer's -u).
fn switch_user(name: &str) -> Result<(), String> {
    let cname = std::ffi::CString::new(name).map_err(|_| format!("bad user name {name:?}"))?;
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 4096];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: all pointers refer to live storage of the given sizes owned here.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return Err(format!("no such OS user {name:?}"));
    }
    // SAFETY: plain system calls; the group is set before the user gives it up.
    unsafe {
        if libc::initgroups(cname.as_ptr(), pwd.pw_gid) != 0
            || libc::setgid(pwd.pw_gid) != 0
            || libc::setuid(pwd.pw_uid) != 0
        {
            return Err(format!(
                "cannot switch to user {name:?}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

fn init_logging(args: &Args) {
    weir::logging::init(weir::logging::Cli {
        filter: args
            .log_level
            .clone()
            .or_else(|| std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty())),
        verbose: args.verbose,
        quiet: args.quiet,
    });
}

/// The `pidfile`: refused if it names a live process, written with this process's id,
/// removed when the process ends normally.
struct PidFile(PathBuf);

impl PidFile {
    fn create(path: &str) -> Result<PidFile, String> {
        let path = PathBuf::from(path);
        if let Ok(old) = std::fs::read_to_string(&path) {
            if let Ok(pid) = old.trim().parse::<i32>() {
                // SAFETY: signal 0 only checks that the process exists.
                if pid > 0 && unsafe { libc::kill(pid, 0) } == 0 {
                    return Err(format!(
                        "pidfile {} names a running process ({pid}): is another instance running?",
                        path.display()
                    ));
                }
            }
        }
        std::fs::write(&path, format!("{}\n", std::process::id()))
            .map_err(|e| format!("cannot write pidfile {}: {e}", path.display()))?;
        Ok(PidFile(path))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == "reshard") {
        return reshard_command(argv.into_iter().skip(1).collect());
    }
    let args = Args::parse();
    init_logging(&args);
    if let Some(path) = &args.check {
        return match Config::load(path) {
            Ok(cfg) => {
                // What start would refuse beyond the file itself: addresses that do not
                // resolve and a logfile that cannot be opened (nothing is bound or written).
                let g = &cfg.general;
                let mut problems = Vec::new();
                if let Err(e) =
                    weir::frontend::listener::listen_addresses(&g.listen_addr, g.listen_port)
                {
                    problems.push(e.to_string());
                }
                if let Some(p) = g.logfile.as_deref().filter(|p| !p.is_empty()) {
                    if let Err(e) = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(p)
                    {
                        problems.push(format!("cannot open logfile {p}: {e}"));
                    }
                }
                if !problems.is_empty() {
                    for p in problems {
                        eprintln!("{}: {p}", path.display());
                    }
                    return ExitCode::from(1);
                }
                for w in &cfg.warnings {
                    eprintln!("warning: {w}");
                }
                print!("{}", weir::admin::settings::render_effective(&cfg));
                eprintln!("config OK");
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
    if let Err(e) = weir::logging::apply(&config.general) {
        eprintln!("{e}");
        return ExitCode::from(1);
    }
    if args.daemon {
        if let Err(e) = daemonize() {
            eprintln!("cannot run in the background: {e}");
            return ExitCode::from(1);
        }
    }
    let _pidfile = match config.general.pidfile.as_deref().filter(|p| !p.is_empty()) {
        Some(p) => match PidFile::create(p) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::from(1);
            }
        },
        None => None,
    };
    // WEIR_WORKERS: worker threads. One worker runs every task on this thread with no
    // work-stealing scheduler at all (PgBouncer's model): on a machine of 2 cores or fewer,
    // where PostgreSQL or the application share the cores, that costs ~15% less CPU per
    // transaction than two stealing workers (benches/pgbench.sh), so it is the default
    // there; bigger machines get one worker per core.
    let workers = std::env::var("WEIR_WORKERS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores <= 2).then_some(1)
        });
    let mut builder = match workers {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all();
    if let Some(n) = workers.filter(|n| *n > 1) {
        builder.worker_threads(n);
    }
    let runtime = match builder.build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(serve(path, config, args.user.clone()))
}

async fn serve(path: PathBuf, config: Config, run_as: Option<String>) -> ExitCode {
    let app = App::new(config);
    let listeners = match weir::frontend::listener::bind(&app) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen");
            return ExitCode::from(1);
        }
    };
    match weir::metrics::start(&app) {
        Ok(Some(addr)) => tracing::info!(%addr, "serving Prometheus metrics at /metrics"),
        Ok(None) => {}
        Err(e) => {
            tracing::error!(error = %e, "stats_port");
            return ExitCode::from(1);
        }
    }
    if let Some(user) = &run_as {
        if let Err(e) = switch_user(user) {
            tracing::error!(error = %e, "-u");
            return ExitCode::from(1);
        }
    }
    for addr in listeners.iter().filter_map(|l| l.local_addr().ok()) {
        tracing::info!(%addr, config = %path.display(), "weir {} listening", weir::VERSION);
    }
    // Ends with the process: after a shutdown began it still serves the admin console on
    // the Unix socket.
    tokio::spawn(weir::frontend::listener::serve_on(app.clone(), listeners));
    let (Ok(mut hup), Ok(mut int), Ok(mut term), Ok(mut quit), Ok(mut usr1), Ok(mut usr2)) = (
        signal(SignalKind::hangup()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::quit()),
        signal(SignalKind::user_defined1()),
        signal(SignalKind::user_defined2()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return ExitCode::from(1);
    };
    weir::admin::start(&app);
    daemon_ready();
    sd_notify("READY=1\nSTATUS=accepting connections");
    let mut stopping_told = false;
    // PgBouncer's signal table (1.23+): SIGHUP reload, SIGTERM = SHUTDOWN WAIT_FOR_CLIENTS,
    // SIGINT = SHUTDOWN WAIT_FOR_SERVERS, SIGQUIT = SHUTDOWN; a second SIGTERM or SIGINT
    // during a shutdown exits at once; SIGUSR1 = PAUSE, SIGUSR2 = RESUME. The admin
    // console's SHUTDOWN arrives through the same watch.
    let mut console = app.shutdown.subscribe();
    let immediate = |why: &str| {
        tracing::info!("{why}: exiting now");
        let _ = app.shutdown.send(Shutdown::Immediate);
        ExitCode::SUCCESS
    };
    loop {
        let state = app.shutdown_state();
        if state != Shutdown::Running && !stopping_told {
            stopping_told = true;
            sd_notify("STOPPING=1");
        }
        tokio::select! {
            _ = hup.recv() => {
                sd_notify(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_us()));
                reload(&app, &path);
                sd_notify("READY=1");
            }
            _ = usr1.recv() => {
                tracing::info!("got SIGUSR1, pausing all activity");
                let _ = weir::admin::command::pause(&app, None);
            }
            _ = usr2.recv() => {
                if state != Shutdown::Running {
                    tracing::info!("got SIGUSR2 while shutting down, ignoring");
                } else {
                    tracing::info!("got SIGUSR2, continuing");
                    let _ = weir::admin::command::resume(&app, None);
                }
            }
            _ = quit.recv() => return immediate("SIGQUIT"),
            _ = int.recv() => {
                if state != Shutdown::Running {
                    return immediate("second SIGINT during shutdown");
                }
                tracing::info!("got SIGINT, shutting down, waiting for servers");
                app.shutdown.send_replace(Shutdown::Graceful);
            }
            _ = term.recv() => {
                if state != Shutdown::Running {
                    return immediate("second SIGTERM during shutdown");
                }
                tracing::info!("got SIGTERM, shutting down, waiting for clients");
                app.shutdown.send_replace(Shutdown::WaitForClients);
            }
            Ok(()) = console.changed() => {
                if *console.borrow_and_update() == Shutdown::Immediate {
                    tracing::info!("SHUTDOWN: exiting now");
                    return ExitCode::SUCCESS;
                }
            }
            _ = finished(&app, state), if state != Shutdown::Running => {
                tracing::info!("shutdown complete");
                return ExitCode::SUCCESS;
            }
        }
    }
}

/// Resolves when a shutdown in `state` may end the process: WAIT_FOR_SERVERS once no client
/// holds a server (see `drain`), WAIT_FOR_CLIENTS once no client is connected at all.
async fn finished(app: &Arc<App>, state: Shutdown) {
    match state {
        // The listener task goes on serving the admin console on the Unix socket.
        Shutdown::Graceful => drain(app).await,
        Shutdown::WaitForClients => {
            while app.clients.load(Ordering::Acquire) > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Shutdown::Running | Shutdown::Immediate => std::future::pending().await,
    }
}

/// Tells a `-d` parent that the process listens (it then exits 0).
fn daemon_ready() {
    let fd = DAEMON_READY_FD.swap(-1, std::sync::atomic::Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: the pipe's write end, owned by this process and closed once.
        unsafe {
            libc::write(fd, b"1".as_ptr().cast(), 1);
            libc::close(fd);
        }
    }
}

/// systemd's sd_notify for `Type=notify` units: one datagram to `$NOTIFY_SOCKET` (a path, or
/// `@name` in the abstract namespace); nothing when it is not set.
fn sd_notify(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = std::os::unix::net::UnixDatagram::unbound().and_then(|sock| {
        match target.as_encoded_bytes().strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                sock.send_to_addr(state.as_bytes(), &addr)
            }
            None => sock.send_to(state.as_bytes(), std::path::Path::new(&target)),
        }
    });
    if let Err(e) = sent {
        tracing::warn!(error = %e, "sd_notify to NOTIFY_SOCKET failed");
    }
}

/// CLOCK_MONOTONIC in microseconds (sd_notify's MONOTONIC_USEC).
fn monotonic_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec for clock_gettime to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
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

/// Waits until no client holds a server (bounded by shutdown_timeout if set); clients
/// that want a new one meanwhile are closed with "server shutting down".
async fn drain(app: &Arc<App>) {
    let limit = app.cluster().config.general.shutdown_timeout;
    let started = tokio::time::Instant::now();
    while app.active.load(Ordering::Acquire) > 0 {
        if !limit.is_zero() && started.elapsed() >= limit {
            tracing::warn!("shutdown_timeout reached with transactions still running");
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
