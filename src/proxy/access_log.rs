//! The access log: one JSON line per connection (per tunnel `access_log = "PATH" | "stderr"`,
//! off by default), the audit trail of who used a tunnel.
//!
//! A shard never writes it: at a connection's close it formats the line ([`Record::to_json`])
//! and hands it to the log's writer thread over a bounded channel, without blocking. The
//! writer batches what has queued into one write. As the audit trail the log is not
//! rate-limited; a line the writer cannot take (its queue full because the disk or the pipe
//! is slower than the connections end) is dropped and counted, as is a line a failed write
//! lost: `sealpipe_access_log_dropped_total{tunnel, reason="queue_full"|"write_error"}`.
//!
//! Invariants:
//! - Nothing here blocks a shard or allocates per record beyond the line itself; at most
//!   [`QUEUE_LINES`] lines wait per destination.
//! - Tunnels of one configuration that name the same destination share one writer, so their
//!   lines never interleave within a line. A reload opens the destinations anew (that is how a
//!   rotated file is picked up: rename it, then SIGHUP); connections still open keep nothing
//!   of the old writer, which ends once its last line is written.
//! - Dropping the last handle to a writer never waits for it (that may be a shard, after a
//!   reload): the writer finishes what is queued on its own, and [`finish_writers`], called as
//!   the process exits after its shards are gone, waits for that, so no line is lost.
//! - Files are opened for appending, created mode 0640.

use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use prometheus::IntCounter;

use crate::config::{Config, ConfigError};

/// Lines that may wait for one writer (a few hundred bytes each).
pub const QUEUE_LINES: usize = 8192;
/// Lines a writer takes from its queue for one write.
const BATCH_LINES: usize = 512;
/// A failing writer logs at most this often.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// Where a tunnel's access log goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dest {
    Stderr,
    File(PathBuf),
}

impl Dest {
    /// The setting's value: `"stderr"` or a path.
    pub fn parse(s: &str) -> Result<Dest, String> {
        match s {
            "" => Err("access_log must be \"stderr\" or a file path, not empty".into()),
            "stderr" => Ok(Dest::Stderr),
            p => Ok(Dest::File(PathBuf::from(p))),
        }
    }
}

impl std::fmt::Display for Dest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dest::Stderr => f.write_str("stderr"),
            Dest::File(p) => p.display().fmt(f),
        }
    }
}

/// What one access log line says about one connection.
#[derive(Clone, Debug, PartialEq)]
pub struct Record<'a> {
    /// When the connection ended.
    pub time: SystemTime,
    pub tunnel: &'a str,
    /// `encrypt`, `decrypt` or `forward`.
    pub mode: &'static str,
    /// The client, as the session's OPEN record names it (on the encrypt side: as a trusted
    /// PROXY header or the client's socket told it); `None` when nobody named one.
    pub client: Option<SocketAddr>,
    /// The client address came from a PROXY header (here or on the encrypt side).
    pub proxied: bool,
    /// The peer of the accepted socket: the client, a load balancer, or the encrypt side.
    pub peer: Option<SocketAddr>,
    /// The target connected to (decrypt side or backend; a Unix socket's path); `None` if none
    /// was.
    pub target: Option<super::TargetAddr>,
    /// Plaintext bytes from the client towards the backend, PROXY headers not counted.
    pub bytes_up: u64,
    /// Plaintext bytes from the backend towards the client.
    pub bytes_down: u64,
    pub duration: Duration,
    /// The close reason, as `sealpipe_connections_closed_total` counts it.
    pub reason: &'static str,
    /// The pre-shared key the session used (hex id); `None` for forward tunnels or before a
    /// hello named one.
    pub key_id: Option<String>,
    /// Whether the session had forward secrecy; `None` if no session opened.
    pub fs: Option<bool>,
}

impl Record<'_> {
    /// The line, newline included. Field order is fixed; absent values are `null`.
    pub fn to_json(&self) -> String {
        let mut s = String::with_capacity(320);
        let opt = |s: &mut String, v: Option<&dyn std::fmt::Display>| match v {
            Some(v) => {
                s.push('"');
                let _ = write!(s, "{v}");
                s.push('"');
            }
            None => s.push_str("null"),
        };
        s.push_str("{\"ts\":\"");
        rfc3339_millis(&mut s, self.time);
        s.push_str("\",\"tunnel\":");
        json_str(&mut s, self.tunnel);
        let _ = write!(s, ",\"mode\":\"{}\",\"client\":", self.mode);
        opt(&mut s, self.client.as_ref().map(|a| a as _));
        let _ = write!(s, ",\"proxied\":{},\"peer\":", self.proxied);
        opt(&mut s, self.peer.as_ref().map(|a| a as _));
        s.push_str(",\"target\":");
        match &self.target {
            // A path may hold any character: escaped as a string.
            Some(t) => json_str(&mut s, &t.to_string()),
            None => s.push_str("null"),
        }
        let _ = write!(
            s,
            ",\"bytes_up\":{},\"bytes_down\":{},\"duration\":{:.6},\"reason\":\"{}\",\"key_id\":",
            self.bytes_up,
            self.bytes_down,
            self.duration.as_secs_f64(),
            self.reason
        );
        match &self.key_id {
            Some(k) => json_str(&mut s, k),
            None => s.push_str("null"),
        }
        s.push_str(",\"fs\":");
        match self.fs {
            Some(b) => {
                let _ = write!(s, "{b}");
            }
            None => s.push_str("null"),
        }
        s.push_str("}\n");
        s
    }
}

/// A JSON string literal (RFC 8259 escapes).
fn json_str(out: &mut String, v: &str) {
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `t` as UTC, `YYYY-MM-DDTHH:MM:SS.mmmZ` (a time before 1970 prints as the epoch).
fn rfc3339_millis(out: &mut String, t: SystemTime) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    );
}

/// One queued line, with the counter its loss is charged to if the write fails.
struct Entry {
    line: String,
    lost: IntCounter,
}

struct Inner {
    dest: Dest,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Writers whose last handle is gone, still writing what was queued (see [`finish_writers`]).
static FINISHING: Mutex<Vec<JoinHandle<()>>> = Mutex::new(Vec::new());

impl Drop for Inner {
    fn drop(&mut self) {
        // Every handle's sender is gone (see `AccessLog`'s field order): the writer ends once
        // it has written what is queued. Not waited for here (this may be a shard).
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            if let Ok(mut f) = FINISHING.lock() {
                f.retain(|t| !t.is_finished());
                f.push(t);
            }
        }
    }
}

/// Waits, at most `within`, for the writers whose handles are all gone to write what they
/// had queued; true if they all did. Call it as the process exits, after its shards ended.
pub fn finish_writers(within: Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    let writers = FINISHING
        .lock()
        .map(|mut f| std::mem::take(&mut *f))
        .unwrap_or_default();
    for t in writers {
        // A writer blocked on a stuck pipe must not hold the exit forever: poll, bounded.
        while !t.is_finished() {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = t.join();
    }
    true
}

/// A handle to one destination's writer; clones share it.
#[derive(Clone)]
pub struct AccessLog {
    /// Declared first, so a handle's sender is dropped before its share of `inner`: the last
    /// handle's `Inner::drop` then joins a writer whose channel is closed.
    tx: Sender<Entry>,
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AccessLog({})", self.inner.dest)
    }
}

/// Why a line was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// The writer is behind: its queue is full.
    QueueFull,
}

impl AccessLog {
    /// Opens `dest` (a file for appending, created mode 0640) and starts its writer thread.
    pub fn open(dest: &Dest) -> io::Result<AccessLog> {
        let out: Box<dyn io::Write + Send> = match dest {
            Dest::Stderr => Box::new(io::stderr()),
            Dest::File(p) => Box::new(open_file(p)?),
        };
        let (tx, rx) = crossbeam_channel::bounded(QUEUE_LINES);
        let name = dest.to_string();
        let thread = std::thread::Builder::new()
            .name("sealpipe-access-log".into())
            .spawn(move || writer(rx, out, &name))?;
        Ok(AccessLog {
            tx,
            inner: Arc::new(Inner {
                dest: dest.clone(),
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    pub fn dest(&self) -> &Dest {
        &self.inner.dest
    }

    /// Queues `line` without blocking; `lost` is bumped if the writer later fails to write it.
    pub fn send(&self, line: String, lost: &IntCounter) -> Result<(), Dropped> {
        let e = Entry {
            line,
            lost: lost.clone(),
        };
        match self.tx.try_send(e) {
            Ok(()) => Ok(()),
            // A writer that is gone (it never is while a handle lives) loses lines like a
            // full one.
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => Err(Dropped::QueueFull),
        }
    }
}

fn open_file(p: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(p)
}

/// The writer thread: waits for a line, takes what else is queued (up to a batch), writes it
/// in one call. Lines of a failed write are counted and the next batch tries again.
fn writer(rx: Receiver<Entry>, mut out: Box<dyn io::Write + Send>, name: &str) {
    let mut batch = Vec::with_capacity(64 * 1024);
    let mut charged: Vec<IntCounter> = Vec::with_capacity(BATCH_LINES);
    let mut next_error_log = std::time::Instant::now();
    let mut unlogged_errors = 0u64;
    while let Ok(first) = rx.recv() {
        batch.clear();
        charged.clear();
        for e in std::iter::once(first).chain(rx.try_iter().take(BATCH_LINES - 1)) {
            batch.extend_from_slice(e.line.as_bytes());
            charged.push(e.lost);
        }
        if let Err(e) = out.write_all(&batch).and_then(|()| out.flush()) {
            for c in &charged {
                c.inc();
            }
            unlogged_errors += charged.len() as u64;
            let now = std::time::Instant::now();
            if now >= next_error_log {
                next_error_log = now + ERROR_LOG_EVERY;
                tracing::error!(access_log = %name, error = %e, lines_lost = unlogged_errors, "cannot write the access log; its lines are lost (sealpipe_access_log_dropped_total{{reason=\"write_error\"}})");
                unlogged_errors = 0;
            }
        }
    }
}

/// Opens every tunnel's access log (one writer per distinct destination), in tunnel order.
/// A destination that cannot be opened is a configuration error naming the tunnel and key.
pub fn open_all(cfg: &Config) -> Result<Vec<Option<AccessLog>>, ConfigError> {
    let mut opened: Vec<AccessLog> = Vec::new();
    let mut out = Vec::with_capacity(cfg.tunnels.len());
    for t in &cfg.tunnels {
        let Some(dest) = &t.identity.access_log else {
            out.push(None);
            continue;
        };
        if let Some(l) = opened.iter().find(|l| l.dest() == dest) {
            out.push(Some(l.clone()));
            continue;
        }
        let l = AccessLog::open(dest).map_err(|e| ConfigError::Tunnel {
            tunnel: t.name.clone(),
            message: format!("access_log: cannot open {dest}: {e}"),
        })?;
        opened.push(l.clone());
        out.push(Some(l));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record<'static> {
        Record {
            time: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            tunnel: "redis",
            mode: "decrypt",
            client: Some("192.0.2.7:40001".parse().unwrap()),
            proxied: true,
            peer: Some("[2001:db8::9]:5555".parse().unwrap()),
            target: Some("10.1.2.3:6379".parse::<SocketAddr>().unwrap().into()),
            bytes_up: 123,
            bytes_down: 4567,
            duration: Duration::from_micros(1_500_250),
            reason: "clean",
            key_id: Some("0123456789abcdef".into()),
            fs: Some(true),
        }
    }

    #[test]
    fn a_record_is_one_json_line_with_every_field() {
        assert_eq!(
            record().to_json(),
            concat!(
                r#"{"ts":"2023-11-14T22:13:20.123Z","tunnel":"redis","mode":"decrypt","#,
                r#""client":"192.0.2.7:40001","proxied":true,"peer":"[2001:db8::9]:5555","#,
                r#""target":"10.1.2.3:6379","bytes_up":123,"bytes_down":4567,"#,
                r#""duration":1.500250,"reason":"clean","key_id":"0123456789abcdef","fs":true}"#,
                "\n"
            )
        );
        let none = Record {
            client: None,
            proxied: false,
            peer: None,
            target: None,
            key_id: None,
            fs: None,
            ..record()
        };
        let line = none.to_json();
        for k in ["client", "peer", "target", "key_id", "fs"] {
            assert!(line.contains(&format!("\"{k}\":null")), "{k}: {line}");
        }
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["proxied"], false);
        assert_eq!(v.as_object().unwrap().len(), 13);
    }

    #[test]
    fn strings_are_escaped_and_lines_parse() {
        let r = Record {
            tunnel: "a\"b\\c\nd\u{1}é",
            ..record()
        };
        let line = r.to_json();
        assert_eq!(line.matches('\n').count(), 1, "one line: {line}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["tunnel"], "a\"b\\c\nd\u{1}é");
        assert_eq!(v["client"], "192.0.2.7:40001");
        assert_eq!(v["bytes_down"], 4567);
        assert_eq!(v["duration"].as_f64(), Some(1.50025));
    }

    #[test]
    fn timestamps_are_utc_civil_dates() {
        let at = |secs: u64, ms: u64| {
            let mut s = String::new();
            rfc3339_millis(&mut s, UNIX_EPOCH + Duration::from_millis(secs * 1000 + ms));
            s
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(at(4_107_542_399, 999), "2100-02-28T23:59:59.999Z");
        assert_eq!(at(1_709_251_199, 0), "2024-02-29T23:59:59.000Z");
        assert_eq!(at(253_402_300_799, 0), "9999-12-31T23:59:59.000Z");
    }

    #[test]
    fn the_writer_appends_every_queued_line_before_the_last_handle_is_gone() {
        let dir = std::env::temp_dir().join(format!("sealpipe-al-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.log");
        let _ = std::fs::remove_file(&path);
        std::fs::write(&path, "existing\n").unwrap();
        let lost = IntCounter::new("lost", "lost").unwrap();
        let log = AccessLog::open(&Dest::File(path.clone())).unwrap();
        let other = log.clone();
        let mut sent = 0;
        for i in 0..2000 {
            let l = if i % 2 == 0 { &log } else { &other };
            if l.send(format!("line {i}\n"), &lost).is_ok() {
                sent += 1;
            }
        }
        drop(log);
        drop(other);
        assert!(finish_writers(Duration::from_secs(20)));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "existing", "appended, not truncated");
        assert_eq!(lines.len(), 1 + sent);
        assert_eq!(sent, 2000, "2000 lines fit the queue");
        assert_eq!(lost.get(), 0);
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::remove_file(&path);
        let fresh = dir.join("fresh.log");
        drop(AccessLog::open(&Dest::File(fresh.clone())).unwrap());
        assert!(finish_writers(Duration::from_secs(20)));
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640 & !umask());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The process's umask (read by setting and restoring it would race other tests; read
    /// it from /proc instead).
    fn umask() -> u32 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Umask:"))
                    .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            })
            .unwrap_or(0o022)
    }

    #[test]
    fn a_full_queue_drops_instead_of_blocking_and_write_errors_are_counted() {
        // /dev/full fails every write: lines that were queued are charged as lost.
        let lost = IntCounter::new("lost", "lost").unwrap();
        let log = AccessLog::open(&Dest::File("/dev/full".into())).unwrap();
        for i in 0..10 {
            log.send(format!("line {i}\n"), &lost).unwrap();
        }
        drop(log);
        assert!(finish_writers(Duration::from_secs(20)));
        assert_eq!(lost.get(), 10);
        // A writer stuck on a write: the queue fills, and sending returns at once.
        let (tx, rx) = crossbeam_channel::bounded(2);
        let stuck = AccessLog {
            tx,
            inner: Arc::new(Inner {
                dest: Dest::Stderr,
                thread: Mutex::new(None),
            }),
        };
        assert!(stuck.send("a\n".into(), &lost).is_ok());
        assert!(stuck.send("b\n".into(), &lost).is_ok());
        assert_eq!(stuck.send("c\n".into(), &lost), Err(Dropped::QueueFull));
        drop(rx);
    }
}
