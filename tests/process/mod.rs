//! Shared helpers of the tests that run the `actimq` binary (or, for comparison, another
//! broker) as a child process (`tests/node_cli.rs`, `tests/auth_cli.rs`,
//! `tests/hostile_clients.rs`):
//!
//! * [`NodeProcess`]: a spawned process whose stderr a thread drains all along (so the
//!   pipe never fills), keeping the recent lines, the lines that mention a panic and
//!   counts of caller-given marker substrings. It answers the TCP listener's address
//!   from actimq's "listening" log line ([`NodeProcess::tcp_addr`]), waits for a line
//!   containing a substring ([`NodeProcess::wait_for`]), sends signals with `kill(2)`,
//!   waits for the exit, and kills the process on drop;
//! * [`BIN`], the `actimq` binary, [`clear_actimq_env`], which keeps the caller's own
//!   `ACTIMQ__*` settings out of a command, and [`node_command`], a command for a node
//!   on a data directory with only MQTT over TCP on a free loopback port;
//! * [`parse_addr`], the address in a slog-term line.
#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The `actimq` binary of this build.
pub const BIN: &str = env!("CARGO_BIN_EXE_actimq");

/// How long [`NodeProcess::wait_for`] waits for its line.
pub const WAIT: Duration = Duration::from_secs(60);

/// Lines kept for [`NodeProcess::wait_for`]: a waiter misses a line only if this many
/// came after it before the waiter looked.
const KEEP: usize = 10_000;

/// Lines [`NodeProcess::log_tail`] answers.
const TAIL: usize = 200;

/// Keep the caller's own `ACTIMQ__*` settings out of `cmd`.
pub fn clear_actimq_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ACTIMQ__") {
            cmd.env_remove(k);
        }
    }
}

/// A command that runs the `actimq` binary on `data_dir` with only MQTT over TCP, on
/// `127.0.0.1:0`, two IO threads and `info` logs (the "listening" line names the port),
/// free of the caller's own `ACTIMQ__*` settings. Add settings with more `env` calls.
pub fn node_command(data_dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(BIN);
    clear_actimq_env(&mut cmd);
    cmd.env("ACTIMQ__NODE__DATA_DIR", data_dir)
        .env("ACTIMQ__NODE__IO_THREADS", "2")
        .env("ACTIMQ__LISTENER__TCP__BIND", "127.0.0.1:0")
        .env("ACTIMQ__LISTENER__WS__ENABLED", "false")
        .env("ACTIMQ__LISTENER__SERVICE__ENABLED", "false")
        .env("ACTIMQ__LOG__LEVEL", "info");
    cmd
}

/// The address in a slog-term line such as `... INFO listening, addr: 127.0.0.1:4000, ...`.
pub fn parse_addr(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("addr: ")? + "addr: ".len()..];
    rest.split([',', ' ']).next()?.parse().ok()
}

/// Whether `line` is actimq's report of its bound TCP listener.
fn is_tcp_listening(line: &str) -> bool {
    line.contains("listening") && line.contains("listener: tcp")
}

/// What the process wrote to stderr, as the draining thread saw it.
#[derive(Default)]
struct Log {
    /// The last [`KEEP`] lines.
    lines: VecDeque<String>,
    /// Lines read so far (the index after the newest line).
    total: u64,
    /// The index of the first line [`NodeProcess::wait_for`] has not looked at.
    read: u64,
    /// Lines that mention a panic.
    panics: Vec<String>,
    /// How many lines contained each marker.
    counts: BTreeMap<&'static str, u64>,
    /// The first line reporting the TCP listener, and its index.
    tcp_line: Option<(u64, String)>,
    /// The pipe reached its end (the process exited) or failed.
    closed: bool,
}

impl Log {
    fn add(&mut self, line: String, markers: &[&'static str]) {
        if line.contains("panicked") {
            self.panics.push(line.clone());
        }
        for m in markers {
            if line.contains(m) {
                *self.counts.entry(m).or_default() += 1;
            }
        }
        if self.tcp_line.is_none() && is_tcp_listening(&line) {
            self.tcp_line = Some((self.total, line.clone()));
        }
        if self.lines.len() >= KEEP {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
        self.total += 1;
    }

    fn tail(&self) -> String {
        let skip = self.lines.len().saturating_sub(TAIL);
        let tail: Vec<&str> = self.lines.iter().skip(skip).map(String::as_str).collect();
        tail.join("\n")
    }
}

/// The log and a condition variable signalled on every line and at the end.
#[derive(Default)]
struct Shared {
    log: Mutex<Log>,
    changed: Condvar,
}

/// A child process with its stderr drained by a thread; killed on drop unless it has
/// exited ([`NodeProcess::wait_exit`]).
pub struct NodeProcess {
    child: Child,
    pid: u32,
    shared: Arc<Shared>,
    /// Set once the process has been waited for (its pid may then be reused).
    exited: Option<ExitStatus>,
}

impl NodeProcess {
    /// Spawn `cmd` with stdin and stdout null and stderr piped to a thread that counts
    /// the lines containing each of `markers`.
    pub fn spawn(mut cmd: Command, markers: &'static [&'static str]) -> NodeProcess {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()));
        let pid = child.id();
        let stderr = child.stderr.take().expect("piped stderr");
        let shared = Arc::new(Shared::default());
        let sink = shared.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                lock(&sink).add(line, markers);
                sink.changed.notify_all();
            }
            lock(&sink).closed = true;
            sink.changed.notify_all();
        });
        NodeProcess {
            child,
            pid,
            shared,
            exited: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The TCP listener's address, from actimq's "listening ... listener: tcp" line;
    /// panics if it does not come within `timeout`. [`NodeProcess::wait_for`] then looks
    /// only at the lines after that one.
    pub fn tcp_addr(&self, timeout: Duration) -> SocketAddr {
        let line = self.wait_log(timeout, "node did not report its address", |log| {
            let (index, line) = log.tcp_line.clone()?;
            log.read = log.read.max(index + 1);
            Some(line)
        });
        parse_addr(&line).unwrap_or_else(|| panic!("no addr in {line:?}"))
    }

    /// Wait up to [`WAIT`] for a stderr line containing `what`, after the line the
    /// previous call answered; returns it.
    pub fn wait_for(&self, what: &str) -> String {
        self.wait_for_within(what, WAIT)
    }

    /// [`NodeProcess::wait_for`], waiting up to `timeout`.
    pub fn wait_for_within(&self, what: &str, timeout: Duration) -> String {
        self.wait_log(timeout, &format!("no {what:?} line"), |log| {
            let first = log.total - log.lines.len() as u64;
            let from = log.read.max(first);
            let skip = (from - first) as usize;
            let found = log.lines.iter().skip(skip).position(|l| l.contains(what));
            log.read = found.map_or(log.total, |i| from + i as u64 + 1);
            found.map(|i| log.lines[skip + i].clone())
        })
    }

    /// Call `found` on the log as it grows until it answers something; panics with
    /// `missing` and the log tail if the process's stderr ends first or `timeout` passes.
    fn wait_log<T>(
        &self,
        timeout: Duration,
        missing: &str,
        mut found: impl FnMut(&mut Log) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        let mut log = lock(&self.shared);
        loop {
            if let Some(answer) = found(&mut log) {
                return answer;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if log.closed || left.is_zero() {
                let tail = log.tail();
                drop(log);
                panic!("{missing}; stderr:\n{tail}");
            }
            log = self.wait_change(log, left);
        }
    }

    /// Send the signal `name` (`"TERM"`, `"INT"`, `"HUP"`, `"KILL"`, with or without
    /// `SIG`).
    pub fn signal(&self, name: &str) {
        let sig = match name.trim_start_matches("SIG") {
            "TERM" => libc::SIGTERM,
            "INT" => libc::SIGINT,
            "HUP" => libc::SIGHUP,
            "KILL" => libc::SIGKILL,
            "QUIT" => libc::SIGQUIT,
            other => panic!("unknown signal {other:?}"),
        };
        assert!(
            self.exited.is_none(),
            "signal {name} to process {} after it exited",
            self.pid
        );
        // SAFETY: kill(2) on our own child's pid, not yet waited for (so not reused).
        let rc = unsafe { libc::kill(self.pid as libc::pid_t, sig) };
        assert_eq!(
            rc,
            0,
            "kill -{name} {}: {}",
            self.pid,
            std::io::Error::last_os_error()
        );
    }

    /// Wait up to `timeout` for the process to exit (panics, with the log tail, if it
    /// does not), then briefly for the draining thread to read its last lines.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(status) = self.exited {
            return status;
        }
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for the process") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "process {} did not exit within {timeout:?}; stderr:\n{}",
                self.pid,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        self.exited = Some(status);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut log = lock(&self.shared);
        while !log.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            log = self.wait_change(log, left);
        }
        status
    }

    /// The last lines of stderr, for diagnostics.
    pub fn log_tail(&self) -> String {
        lock(&self.shared).tail()
    }

    /// How many lines contained `marker` (one of those given to [`NodeProcess::spawn`]).
    pub fn count(&self, marker: &str) -> u64 {
        lock(&self.shared).counts.get(marker).copied().unwrap_or(0)
    }

    /// The lines that mention a panic.
    pub fn panics(&self) -> Vec<String> {
        lock(&self.shared).panics.clone()
    }

    fn wait_change<'a>(&'a self, log: MutexGuard<'a, Log>, left: Duration) -> MutexGuard<'a, Log> {
        self.shared
            .changed
            .wait_timeout(log, left)
            .unwrap_or_else(|e| e.into_inner())
            .0
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn lock(shared: &Shared) -> MutexGuard<'_, Log> {
    shared.log.lock().unwrap_or_else(|e| e.into_inner())
}
