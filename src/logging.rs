//! Where log lines go and what they look like.
//!
//! Lines follow PgBouncer's layout, so the greps, log shippers and alert rules written for
//! it keep working:
//!
//! ```text
//! 2026-12-02 17:15:32.123 UTC [4711] LOG C-0x1: app/alice@127.0.0.1:50112 login attempt: db=app user=alice tls=no
//! ```
//!
//! Levels are PgBouncer's words: `ERROR`, `WARNING`, `LOG` (tracing's info), `DEBUG`, `NOISE`
//! (trace). Lines go to stderr unless `-q` was given (PgBouncer's meaning: quiet on stderr,
//! not less verbose) and, when `logfile` is set, are appended to that file. RELOAD, SIGHUP
//! and `SET logfile`/`SET verbose` call [`apply`]: the file is reopened (so logrotate can
//! move it away) and the verbosity follows `verbose` (0 = LOG, 1 = DEBUG, 2+ = NOISE) unless
//! `--log-level`/`RUST_LOG` chose a filter explicitly. `log_format = json` writes one JSON
//! object per line instead.

use crate::config::General;
use parking_lot::Mutex;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

/// How the process was told to log on its command line.
#[derive(Debug, Clone, Default)]
pub struct Cli {
    /// `--log-level` (or `RUST_LOG` when no flag chose a level): a tracing filter that wins
    /// over `verbose` from the config.
    pub filter: Option<String>,
    /// `-v` given this many times: added to the config's `verbose`.
    pub verbose: u8,
    /// `-q`: nothing on stderr.
    pub quiet: bool,
}

struct Sinks {
    cli: Cli,
    stderr: AtomicBool,
    json: AtomicBool,
    verbose: AtomicU8,
    file: Mutex<Option<(PathBuf, File)>>,
    filter: reload::Handle<EnvFilter, Registry>,
}

static SINKS: OnceLock<Sinks> = OnceLock::new();

/// `log_connections` / `log_disconnections` of the running config, for code that has no
/// config at hand (server connections).
static LOG_CONNECTIONS: AtomicBool = AtomicBool::new(true);
static LOG_DISCONNECTIONS: AtomicBool = AtomicBool::new(true);

pub fn log_connections() -> bool {
    LOG_CONNECTIONS.load(Ordering::Relaxed)
}

pub fn log_disconnections() -> bool {
    LOG_DISCONNECTIONS.load(Ordering::Relaxed)
}

fn filter_for(cli: &Cli, verbose: u8) -> EnvFilter {
    if let Some(f) = &cli.filter {
        return EnvFilter::new(f);
    }
    let level = match verbose.saturating_add(cli.verbose) {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    // Dependencies stay at info: their debug output is not Weir's story.
    EnvFilter::new(format!("info,weir={level}"))
}

/// Installs the global subscriber. Call once, first thing in `main`; until [`apply`] sees a
/// config, lines go to stderr only.
pub fn init(cli: Cli) {
    let (filter, handle) = reload::Layer::new(filter_for(&cli, 0));
    let sinks = Sinks {
        stderr: AtomicBool::new(!cli.quiet),
        json: AtomicBool::new(false),
        verbose: AtomicU8::new(0),
        file: Mutex::new(None),
        filter: handle,
        cli,
    };
    if SINKS.set(sinks).is_err() {
        return;
    }
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(LineLayer)
        .try_init();
}

/// Brings logging in line with a (re)loaded config: reopens `logfile` (always, so a rotated
/// file is let go), sets the verbosity and the format. Returns what could not be done.
pub fn apply(g: &General) -> Result<(), String> {
    LOG_CONNECTIONS.store(g.log_connections, Ordering::Relaxed);
    LOG_DISCONNECTIONS.store(g.log_disconnections, Ordering::Relaxed);
    let Some(s) = SINKS.get() else {
        return Ok(());
    };
    s.json.store(g.log_format == "json", Ordering::Relaxed);
    if s.verbose.swap(g.verbose, Ordering::Relaxed) != g.verbose {
        let _ = s.filter.reload(filter_for(&s.cli, g.verbose));
    }
    let mut file = s.file.lock();
    match g.logfile.as_deref().filter(|p| !p.is_empty()) {
        None => {
            *file = None;
            Ok(())
        }
        Some(path) => match OpenOptions::new().create(true).append(true).open(path) {
            Ok(f) => {
                *file = Some((PathBuf::from(path), f));
                Ok(())
            }
            Err(e) => Err(format!("cannot open logfile {path}: {e}")),
        },
    }
}

/// Whether stderr gets lines (`-q` not given).
pub fn to_stderr() -> bool {
    SINKS
        .get()
        .is_some_and(|s| s.stderr.load(Ordering::Relaxed))
}

/// Who a log line is about, in PgBouncer's prefix: `C-0x1a: app/alice@127.0.0.1:50112`
/// (`S-` for a server connection; `(nodb)`/`(nouser)` while not yet known).
#[derive(Debug, Clone, Default)]
pub struct Who {
    pub server: bool,
    pub id: u64,
    pub db: String,
    pub user: String,
    /// `host:port` (IPv6 hosts in brackets) or `unix`.
    pub peer: String,
}

impl Who {
    pub fn client(id: u64, db: &str, user: &str, peer: &str) -> Who {
        Who {
            server: false,
            id,
            db: db.to_string(),
            user: user.to_string(),
            peer: peer.to_string(),
        }
    }

    pub fn server(id: u64, db: &str, user: &str, peer: &str) -> Who {
        Who {
            server: true,
            ..Who::client(id, db, user, peer)
        }
    }
}

impl std::fmt::Display for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let or = |s: &'static str, v: &str| if v.is_empty() { s } else { "" };
        write!(
            f,
            "{}-{:#x}: {}{}/{}{}@{}",
            if self.server { 'S' } else { 'C' },
            self.id,
            or("(nodb)", &self.db),
            self.db,
            or("(nouser)", &self.user),
            self.user,
            self.peer
        )
    }
}

/// PgBouncer's line for a connection being closed: `… closing because: REASON (age=Ns)`.
pub fn closing(who: &Who, reason: &str, age_secs: u64) {
    tracing::info!("{who} closing because: {reason} (age={age_secs}s)");
}

/// PgBouncer's word for a level.
fn level_word(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "ERROR",
        Level::WARN => "WARNING",
        Level::INFO => "LOG",
        Level::DEBUG => "DEBUG",
        Level::TRACE => "NOISE",
    }
}

/// `YYYY-MM-DD HH:MM:SS.mmm UTC` for a time since the epoch.
pub fn timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02} {:02}:{:02}:{:02}.{:03} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// well-known days-to-civil arithmetic).
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Collects an event's message and fields.
#[derive(Default)]
struct Fields {
    message: String,
    rest: Vec<(&'static str, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.rest.push((field.name(), value.to_string()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            self.rest.push((field.name(), format!("{value:?}")));
        }
    }
}

/// Formats each event as one line and hands it to the sinks.
struct LineLayer;

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for LineLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let Some(sinks) = SINKS.get() else {
            return;
        };
        let mut fields = Fields::default();
        event.record(&mut fields);
        let meta = event.metadata();
        let now = SystemTime::now();
        let line = if sinks.json.load(Ordering::Relaxed) {
            json_line(now, meta.level(), &fields)
        } else {
            text_line(now, meta.level(), &fields)
        };
        if sinks.stderr.load(Ordering::Relaxed) {
            // Best effort: a closed stderr must not stop the file from getting the line.
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
        if let Some((_, f)) = sinks.file.lock().as_mut() {
            let _ = f.write_all(line.as_bytes());
        }
    }
}

fn text_line(now: SystemTime, level: &Level, fields: &Fields) -> String {
    let mut line = format!(
        "{} [{}] {} {}",
        timestamp(now),
        std::process::id(),
        level_word(level),
        fields.message
    );
    for (k, v) in &fields.rest {
        let _ = write!(line, " {k}={v}");
    }
    line.push('\n');
    line
}

fn json_line(now: SystemTime, level: &Level, fields: &Fields) -> String {
    let mut obj = serde_json::Map::new();
    obj.insert("time".into(), timestamp(now).into());
    obj.insert("pid".into(), std::process::id().into());
    obj.insert("level".into(), level_word(level).into());
    obj.insert("message".into(), fields.message.clone().into());
    for (k, v) in &fields.rest {
        obj.insert((*k).to_string(), v.clone().into());
    }
    let mut line = serde_json::Value::Object(obj).to_string();
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        let at = |s: u64, ms: u64| UNIX_EPOCH + Duration::from_secs(s) + Duration::from_millis(ms);
        assert_eq!(timestamp(at(0, 0)), "1970-01-01 00:00:00.000 UTC");
        // 2000-02-29 (a leap day of a century leap year) 12:34:56.789
        assert_eq!(
            timestamp(at(951_827_696, 789)),
            "2000-02-29 12:34:56.789 UTC"
        );
        assert_eq!(
            timestamp(at(1_796_259_332, 5)),
            "2026-12-03 00:55:32.005 UTC"
        );
    }

    #[test]
    fn lines_use_pgbouncers_layout_and_level_words() {
        let f = Fields {
            message: "C-0x1: app/alice@127.0.0.1:5 closing because: client close request (age=0s)"
                .into(),
            rest: vec![("peer", "x".into())],
        };
        let line = text_line(UNIX_EPOCH, &Level::INFO, &f);
        let pid = std::process::id();
        assert_eq!(
            line,
            format!("1970-01-01 00:00:00.000 UTC [{pid}] LOG C-0x1: app/alice@127.0.0.1:5 closing because: client close request (age=0s) peer=x\n")
        );
        assert!(text_line(UNIX_EPOCH, &Level::WARN, &f).contains("] WARNING C-0x1"));
        let json: serde_json::Value =
            serde_json::from_str(&json_line(UNIX_EPOCH, &Level::ERROR, &f)).expect("json");
        assert_eq!(json["level"], "ERROR");
        assert_eq!(json["peer"], "x");
    }
}
