//! Hostile clients (issue #6): slowloris, a CONNECT that never completes, 10k half-open
//! connections, a subscriber that never reads under a QoS 1 flood, a client that resends
//! one QoS 2 PUBLISH forever, and one client id reconnecting in a tight loop.
//!
//! Each case starts the `actimq` binary as a child process with a config file in a temp
//! dir (so the node's memory and file descriptors can be read from `/proc/<pid>`, and
//! the test's own sockets do not count against the node's), and runs a well-behaved
//! "canary" client throughout: it publishes QoS 1 to itself every 20 ms and times each
//! round trip. Every case asserts that no canary message is lost and that its p99 and
//! maximum latency stay under a bound, that the node's memory stays bounded, and that
//! the node closes what it should; then it stops the node with SIGTERM and expects a
//! clean exit and no panic in its log.
//!
//! Each case prints one line starting with `hostile:` (figures for BENCHMARKS.md):
//!
//! ```sh
//! cargo test --release --test hostile_clients -- --nocapture --test-threads=1
//! ```
//!
//! The cases run one at a time (a lock), whatever `--test-threads` says: they measure
//! latency and memory, which other cases running alongside would disturb.
//!
//! For comparison, `HOSTILE_BROKER=mosquitto` runs the same attacks against Mosquitto
//! (`/usr/sbin/mosquitto`, or `$MOSQUITTO`; stock settings plus a loopback listener,
//! `allow_anonymous true`, `persistence false`). Its figures are printed the same way,
//! and what actimq must do is reported (`hostile: (mosquitto) not met: ...`) rather than
//! asserted; actimq's own settings (connect timeout, cache size) have no counterpart
//! there.

mod common;
mod process;

use std::collections::BTreeMap;
use std::fmt::Display;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{
    ack_packet, parse_connack, publish_packet, subscribe_packet, ConnectOpts, Pkt, Props, Raw,
    CONNACK, PUBACK, PUBCOMP, PUBREC, PUBREL, SUBACK,
};
use futures::StreamExt;
use process::{clear_actimq_env, NodeProcess, BIN};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MIB: f64 = 1024.0 * 1024.0;

/// The cases measure latency and memory: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether the cases attack Mosquitto instead of actimq (`HOSTILE_BROKER=mosquitto`).
fn against_mosquitto() -> bool {
    std::env::var("HOSTILE_BROKER").is_ok_and(|b| b == "mosquitto")
}

/// A check failed: a panic against actimq, a printed line against Mosquitto.
fn not_met(msg: String) {
    if against_mosquitto() {
        println!("hostile: (mosquitto) not met: {msg}");
    } else {
        panic!("{msg}");
    }
}

/// `assert!`, through [`not_met`].
macro_rules! check {
    ($cond:expr, $($arg:tt)+) => {
        let met: bool = $cond;
        if !met {
            not_met(format!($($arg)+));
        }
    };
}

/// `assert_eq!`, through [`not_met`].
macro_rules! check_eq {
    ($left:expr, $right:expr, $($arg:tt)+) => {
        match (&$left, &$right) {
            (left, right) => {
                if left != right {
                    not_met(format!("{}: {left:?} != {right:?}", format!($($arg)+)));
                }
            }
        }
    };
}

/// Canary bounds. Generous (a debug build on a loaded 2-core machine), but a node that
/// stalls for a second, or loses a message, fails them.
fn canary_bounds() -> (Duration, Duration) {
    if cfg!(debug_assertions) {
        (Duration::from_millis(500), Duration::from_millis(1500))
    } else {
        (Duration::from_millis(250), Duration::from_millis(1000))
    }
}

// ---------------------------------------------------------------------------------
// File descriptors of the test process
// ---------------------------------------------------------------------------------

/// Raise the soft RLIMIT_NOFILE to the hard limit (once; the node, a child, inherits
/// it) and answer the soft limit now in force.
fn nofile_limit() -> libc::rlim_t {
    static LIMIT: OnceLock<libc::rlim_t> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        let mut rl = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit only read and write the struct passed.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
                return 1024;
            }
            if rl.rlim_cur < rl.rlim_max {
                let want = libc::rlimit {
                    rlim_cur: rl.rlim_max,
                    rlim_max: rl.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                    rl.rlim_cur = rl.rlim_max;
                }
            }
        }
        rl.rlim_cur
    })
}

// ---------------------------------------------------------------------------------
// The node as a child process
// ---------------------------------------------------------------------------------

/// The `print-config` output, to tell which keys this build knows.
fn default_config() -> &'static str {
    static TEXT: OnceLock<String> = OnceLock::new();
    TEXT.get_or_init(|| {
        let out = Command::new(BIN)
            .arg("print-config")
            .output()
            .expect("run actimq print-config");
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
}

/// Whether the built-in configuration has `key` in `[section]`.
fn known_key(section: &str, key: &str) -> bool {
    let mut current = String::new();
    for line in default_config().lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name.to_string();
        } else if current == section {
            let line = line.trim_start_matches('#').trim_start();
            if line
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
            {
                return true;
            }
        }
    }
    false
}

/// The keys a case's config file sets, by section; values are TOML literals.
struct Settings(BTreeMap<String, BTreeMap<String, String>>);

impl Settings {
    /// What every case runs with: loopback on a free port, WebSocket and service
    /// listeners off, two IO threads, a 2 s connect timeout, room for 10k+ connections.
    fn new() -> Settings {
        Settings(BTreeMap::new())
            .set("node", "name", "\"hostile\"")
            .set("node", "io_threads", 2)
            .set("mqtt", "connect_timeout_secs", 2)
            .set("listener.tcp", "bind", "\"127.0.0.1:0\"")
            .set("listener.tcp", "max_connections", 12_000)
            .set("listener.ws", "enabled", false)
            .set("listener.service", "enabled", false)
            .set("log", "level", "\"info\"")
    }

    fn set(mut self, section: &str, key: &str, value: impl Display) -> Settings {
        self.0
            .entry(section.to_string())
            .or_default()
            .insert(key.to_string(), value.to_string());
        self
    }

    /// [`Settings::set`], only if this build has that key (a key it does not know
    /// would stop start-up).
    fn set_if_known(self, section: &str, key: &str, value: impl Display) -> Settings {
        if known_key(section, key) {
            self.set(section, key, value)
        } else {
            self
        }
    }

    fn render(&self, data_dir: &Path) -> String {
        let mut out = format!("[node]\ndata_dir = {:?}\n", data_dir.display().to_string());
        for (k, v) in self.0.get("node").into_iter().flatten() {
            out.push_str(&format!("{k} = {v}\n"));
        }
        for (section, keys) in self.0.iter().filter(|(s, _)| *s != "node") {
            out.push_str(&format!("\n[{section}]\n"));
            for (k, v) in keys {
                out.push_str(&format!("{k} = {v}\n"));
            }
        }
        out
    }
}

/// Log messages counted for the figures.
const MARKERS: &[&str] = &[
    "session taken over",
    "client does not read",
    "keep-alive timeout",
    "protocol violation",
    "bad input",
];

/// A node process on a temp dir, killed on drop if [`Node::stop`] was not called.
struct Node {
    /// Declared first: dropped (killed) before the temp dir is removed.
    process: NodeProcess,
    pid: u32,
    addr: SocketAddr,
    data_dir: PathBuf,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start(settings: &Settings) -> Node {
        nofile_limit();
        if against_mosquitto() {
            return Node::start_mosquitto();
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("data");
        let conf = dir.path().join("actimq.toml");
        std::fs::write(&conf, settings.render(&data_dir)).expect("write config");
        let mut cmd = Command::new(BIN);
        clear_actimq_env(&mut cmd);
        cmd.arg("--config").arg(&conf);
        let process = NodeProcess::spawn(cmd, MARKERS);
        let addr = process.tcp_addr(Duration::from_secs(60));
        Node {
            pid: process.pid(),
            process,
            addr,
            data_dir,
            _dir: dir,
        }
    }

    /// Mosquitto on a free loopback port, for comparison.
    fn start_mosquitto() -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        // Mosquitto cannot report a port it picked: take a free one and hand it over.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let conf = dir.path().join("mosquitto.conf");
        let text = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest stderr\n"
        );
        std::fs::write(&conf, text).expect("write mosquitto.conf");
        let bin = std::env::var("MOSQUITTO").unwrap_or("/usr/sbin/mosquitto".into());
        let mut cmd = Command::new(&bin);
        cmd.arg("-c").arg(&conf);
        let process = NodeProcess::spawn(cmd, MARKERS);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let node = Node {
            pid: process.pid(),
            process,
            addr,
            data_dir: dir.path().join("data"),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen; log:\n{}",
                node.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        node
    }

    fn log_tail(&self) -> String {
        self.process.log_tail()
    }

    fn count(&self, marker: &str) -> u64 {
        self.process.count(marker)
    }

    fn rss(&self) -> u64 {
        proc_status_kib(self.pid, "VmRSS:") * 1024
    }

    fn hwm(&self) -> u64 {
        proc_status_kib(self.pid, "VmHWM:") * 1024
    }

    fn fds(&self) -> usize {
        proc_fds(self.pid)
    }

    fn sockets(&self) -> usize {
        proc_sockets(self.pid)
    }

    /// Total size of the commitlog segments.
    fn log_bytes(&self) -> u64 {
        std::fs::read_dir(self.data_dir.join("log"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Wait until the node holds at most `n` sockets; answers the count then (or at the
    /// deadline).
    fn wait_sockets_at_most(&self, n: usize, wait: Duration) -> usize {
        let deadline = Instant::now() + wait;
        loop {
            let now = self.sockets();
            if now <= n || Instant::now() > deadline {
                return now;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM; the node must exit 0, and must not have logged a panic.
    fn stop(mut self) {
        self.process.signal("TERM");
        let status = self.process.wait_exit(Duration::from_secs(30));
        let panics = self.process.panics();
        assert!(panics.is_empty(), "the node panicked: {panics:?}");
        check!(
            status.success(),
            "node exit status {status:?}; log:\n{}",
            self.log_tail()
        );
    }
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn proc_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Descriptors that are sockets: connections and listeners (the node also opens queue
/// index files as queues are used, which are not what these cases look at).
fn proc_sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// Samples the node's RSS and socket count every 100 ms; answers the peaks.
struct Sampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<(u64, usize)>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let (mut rss, mut sockets) = (0u64, 0usize);
            while !flag.load(Ordering::Relaxed) {
                rss = rss.max(proc_status_kib(pid, "VmRSS:") * 1024);
                sockets = sockets.max(proc_sockets(pid));
                std::thread::sleep(Duration::from_millis(100));
            }
            (rss, sockets)
        });
        Sampler { stop, handle }
    }

    fn finish(self) -> (u64, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("sampler")
    }
}

// ---------------------------------------------------------------------------------
// The canary
// ---------------------------------------------------------------------------------

/// A well-behaved client on its own thread and runtime (so that the attack's tasks do
/// not delay it): every 20 ms it publishes QoS 1 to its own topic and times the round
/// trip until the message comes back.
struct Canary {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<CanaryStats>,
}

#[derive(Default)]
struct CanaryStats {
    sent: u64,
    /// Messages not back within 5 s (or never: the connection closed).
    lost: u64,
    /// PUBACKs not received within 5 s.
    lost_acks: u64,
    /// Round trips, in microseconds.
    lat_us: Vec<u64>,
}

impl CanaryStats {
    fn pct(&self, p: f64) -> f64 {
        if self.lat_us.is_empty() {
            return f64::NAN;
        }
        let mut v = self.lat_us.clone();
        v.sort_unstable();
        let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
        v[i] as f64 / 1000.0
    }

    fn max(&self) -> f64 {
        self.lat_us.iter().copied().max().unwrap_or(0) as f64 / 1000.0
    }

    fn summary(&self) -> String {
        format!(
            "canary n={} lost={} p50={:.1}ms p99={:.1}ms max={:.1}ms",
            self.sent,
            self.lost + self.lost_acks,
            self.pct(50.0),
            self.pct(99.0),
            self.max()
        )
    }

    /// No message lost, p99 and max under [`canary_bounds`].
    fn check(&self, case: &str) {
        let (p99, max) = canary_bounds();
        check!(
            self.sent >= 10,
            "{case}: the canary sent only {}",
            self.sent
        );
        check_eq!(
            (self.lost, self.lost_acks),
            (0, 0),
            "{case}: canary messages or acks lost: {}",
            self.summary()
        );
        check!(
            self.pct(99.0) < p99.as_secs_f64() * 1000.0,
            "{case}: canary p99 over {p99:?}: {}",
            self.summary()
        );
        check!(
            self.max() < max.as_secs_f64() * 1000.0,
            "{case}: canary max over {max:?}: {}",
            self.summary()
        );
    }
}

impl Canary {
    /// Connect, subscribe, and start publishing; returns once subscribed.
    fn start(addr: SocketAddr, case: &str) -> Canary {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let id = format!("canary-{case}");
        let (ready_tx, ready_rx) = mpsc::channel();
        let handle = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("canary runtime");
            rt.block_on(canary_loop(addr, id, flag, ready_tx))
        });
        ready_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the canary did not connect");
        Canary { stop, handle }
    }

    fn finish(self) -> CanaryStats {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("canary thread")
    }
}

async fn canary_loop(
    addr: SocketAddr,
    id: String,
    stop: Arc<AtomicBool>,
    ready: mpsc::Sender<()>,
) -> CanaryStats {
    const PERIOD: Duration = Duration::from_millis(20);
    const WAIT: Duration = Duration::from_secs(5);
    let topic = format!("{id}/t");
    let (mut raw, _) = Raw::connect_ok(addr, &ConnectOpts::v3(&id, true).keep_alive(30)).await;
    raw.subscribe(1, &[(&topic, 1)]).await;
    let _ = ready.send(());
    let mut stats = CanaryStats::default();
    let mut next = tokio::time::Instant::now();
    let mut pid: u16 = 1;
    while !stop.load(Ordering::Relaxed) {
        stats.sent += 1;
        pid = pid % 60_000 + 1;
        let seq = stats.sent.to_be_bytes();
        let t0 = Instant::now();
        raw.send(&publish_packet(
            false,
            &topic,
            1,
            false,
            false,
            pid,
            &Props::new(),
            &seq,
        ))
        .await;
        let mut echoed = false;
        while let Some(p) = raw.try_publish(WAIT.saturating_sub(t0.elapsed())).await {
            raw.send(&ack_packet(PUBACK, p.pid)).await;
            if p.payload == seq {
                stats.lat_us.push(t0.elapsed().as_micros() as u64);
                echoed = true;
                break;
            }
        }
        if !echoed {
            stats.lost += 1;
        }
        if raw.try_expect(PUBACK, WAIT).await.is_none() {
            stats.lost_acks += 1;
        }
        next += PERIOD;
        let now = tokio::time::Instant::now();
        if next < now {
            next = now;
        }
        tokio::time::sleep_until(next).await;
    }
    raw.disconnect().await;
    stats
}

// ---------------------------------------------------------------------------------
// Figures
// ---------------------------------------------------------------------------------

/// What every case reports besides its own figures.
struct Figures {
    case: &'static str,
    started: Instant,
    rss_before: u64,
    fds_before: usize,
    sockets_before: usize,
    sampler: Sampler,
    canary: Canary,
}

/// Everything measured, after the case.
struct Measured {
    rss_before: u64,
    rss_peak: u64,
    rss_after: u64,
    fds_before: usize,
    fds_after: usize,
    sockets_before: usize,
    sockets_peak: usize,
    sockets_after: usize,
    canary: CanaryStats,
}

impl Figures {
    /// Start the canary, then take the "before" figures and start sampling.
    fn start(case: &'static str, node: &Node) -> Figures {
        let canary = Canary::start(node.addr, case);
        // Let the canary's first round trips settle the node's buffers.
        std::thread::sleep(Duration::from_millis(300));
        Figures {
            case,
            started: Instant::now(),
            rss_before: node.rss(),
            fds_before: node.fds(),
            sockets_before: node.sockets(),
            sampler: Sampler::start(node.pid),
            canary,
        }
    }

    /// Stop sampling and the canary, print the case's line, check the canary.
    fn finish(self, node: &Node, details: &str) -> Measured {
        let (rss_peak, sockets_peak) = self.sampler.finish();
        // "After" with the canary still connected, as "before" was.
        let (rss_after, fds_after, sockets_after) = (node.rss(), node.fds(), node.sockets());
        let canary = self.canary.finish();
        let m = Measured {
            rss_before: self.rss_before,
            rss_peak: rss_peak.max(rss_after),
            rss_after,
            fds_before: self.fds_before,
            fds_after,
            sockets_before: self.sockets_before,
            sockets_peak,
            sockets_after,
            canary,
        };
        println!(
            "hostile: {:<16} {details}; rss MiB before/peak/after {:.1}/{:.1}/{:.1} (hwm {:.1}); \
             sockets before/peak/after {}/{}/{} (fds {}/{}); {}; {:.1}s",
            self.case,
            m.rss_before as f64 / MIB,
            m.rss_peak as f64 / MIB,
            m.rss_after as f64 / MIB,
            node.hwm() as f64 / MIB,
            m.sockets_before,
            m.sockets_peak,
            m.sockets_after,
            m.fds_before,
            m.fds_after,
            m.canary.summary(),
            self.started.elapsed().as_secs_f64()
        );
        m.canary.check(self.case);
        m
    }
}

impl Measured {
    fn growth_mib(&self) -> f64 {
        self.rss_peak.saturating_sub(self.rss_before) as f64 / MIB
    }

    fn assert_growth_under(&self, case: &str, mib: f64) {
        check!(
            self.growth_mib() < mib,
            "{case}: RSS grew {:.1} MiB (bound {mib} MiB)",
            self.growth_mib()
        );
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

// ---------------------------------------------------------------------------------
// Raw socket helpers
// ---------------------------------------------------------------------------------

/// Parse one whole packet at the front of `buf`, removing it.
fn take_packet(buf: &mut Vec<u8>) -> Option<Pkt> {
    let (mut len, mut mul, mut i) = (0usize, 1usize, 1usize);
    loop {
        let b = *buf.get(i)?;
        len += (b & 0x7f) as usize * mul;
        mul *= 128;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            panic!("server sent a malformed remaining length");
        }
    }
    if buf.len() < i + len {
        return None;
    }
    let p = Pkt {
        first: buf[0],
        body: buf[i..i + len].to_vec(),
    };
    buf.drain(..i + len);
    Some(p)
}

/// Read packets from `r` into `buf` until `want` accepts one; `None` on EOF, error or
/// after `wait`.
async fn read_until<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    wait: Duration,
    mut want: impl FnMut(&Pkt) -> bool,
) -> Option<Pkt> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut tmp = [0u8; 4096];
    loop {
        while let Some(p) = take_packet(buf) {
            if want(&p) {
                return Some(p);
            }
        }
        match tokio::time::timeout_at(deadline, r.read(&mut tmp)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
            Ok(Ok(n)) => buf.extend_from_slice(&tmp[..n]),
        }
    }
}

/// What one read attempt gave.
enum Got {
    Packet(Pkt),
    Closed,
    Timeout,
}

/// Read the next packet from `s` (bytes already read in `buf`).
async fn read_packet<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>, wait: Duration) -> Got {
    let deadline = tokio::time::Instant::now() + wait;
    let mut tmp = [0u8; 4096];
    loop {
        if let Some(p) = take_packet(buf) {
            return Got::Packet(p);
        }
        match tokio::time::timeout_at(deadline, r.read(&mut tmp)).await {
            Err(_) => return Got::Timeout,
            Ok(Ok(0)) | Ok(Err(_)) => return Got::Closed,
            Ok(Ok(n)) => buf.extend_from_slice(&tmp[..n]),
        }
    }
}

/// How one hostile connection ended.
#[derive(Debug, Default, Clone, Copy)]
struct Ended {
    /// When the node closed it, after `t0`; `None` if still open at the give-up time.
    closed_after: Option<Duration>,
    /// Bytes the node sent it (an incomplete CONNECT must get none).
    received: usize,
}

/// Send `bytes` one at a time, `every` apart, while watching for the node to close
/// the connection; gives up after `give_up`.
async fn trickle(
    mut s: TcpStream,
    t0: Instant,
    bytes: &[u8],
    every: Duration,
    give_up: Duration,
) -> Ended {
    let mut ended = Ended::default();
    let mut tmp = [0u8; 256];
    let mut i = 0;
    while t0.elapsed() < give_up {
        if i < bytes.len() {
            if s.write_all(&bytes[i..i + 1]).await.is_err() {
                ended.closed_after = Some(t0.elapsed());
                return ended;
            }
            i += 1;
        }
        let next = tokio::time::Instant::now() + every;
        loop {
            match tokio::time::timeout_at(next, s.read(&mut tmp)).await {
                Err(_) => break,
                Ok(Ok(0)) | Ok(Err(_)) => {
                    ended.closed_after = Some(t0.elapsed());
                    return ended;
                }
                Ok(Ok(n)) => ended.received += n,
            }
        }
    }
    ended
}

/// Wait for the node to close `s` (EOF or reset), up to `give_up` after `t0`.
async fn await_close(mut s: TcpStream, t0: Instant, give_up: Duration) -> Ended {
    let mut ended = Ended::default();
    let mut tmp = [0u8; 256];
    let deadline = tokio::time::Instant::from_std(t0 + give_up);
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut tmp)).await {
            Err(_) => return ended,
            Ok(Ok(0)) | Ok(Err(_)) => {
                ended.closed_after = Some(t0.elapsed());
                return ended;
            }
            Ok(Ok(n)) => ended.received += n,
        }
    }
}

/// Min / median / max of the close times, in seconds, and how many stayed open.
fn close_times(ended: &[Ended]) -> (f64, f64, f64, usize) {
    let mut t: Vec<f64> = ended
        .iter()
        .filter_map(|e| e.closed_after.map(|d| d.as_secs_f64()))
        .collect();
    t.sort_by(f64::total_cmp);
    let open = ended.len() - t.len();
    if t.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN, open);
    }
    (t[0], t[t.len() / 2], t[t.len() - 1], open)
}

// ---------------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------------

/// The canary alone, for comparison with the attacks.
#[test]
fn hostile_baseline_canary_alone() {
    let _serial = serial();
    let node = Node::start(&Settings::new());
    let fig = Figures::start("baseline", &node);
    std::thread::sleep(Duration::from_secs(3));
    let m = fig.finish(&node, "no attack, 3 s");
    m.assert_growth_under("baseline", 32.0);
    node.stop();
}

/// Slowloris: CONNECTs trickled in one byte every 500 ms are closed at the connect
/// timeout, which the trickle cannot extend; and a connected client (keep-alive 2 s)
/// that trickles a PUBLISH is closed by its keep-alive, since only whole packets count.
#[test]
fn hostile_slowloris_is_closed_at_the_connect_timeout() {
    const CONNS: usize = 500;
    const CONNECTED: usize = 20;
    const EVERY: Duration = Duration::from_millis(500);
    const TIMEOUT: f64 = 2.0;
    let _serial = serial();
    let node = Node::start(&Settings::new().set("mqtt", "connect_timeout_secs", TIMEOUT));
    let addr = node.addr;
    let fig = Figures::start("slowloris", &node);
    let (pre, post) = runtime().block_on(async move {
        let give_up = Duration::from_secs(12);
        let mut pre = Vec::new();
        for i in 0..CONNS {
            // ~30 bytes at 2 a second: 15 s to complete, far past the timeout.
            let bytes = ConnectOpts::v3(&format!("slowloris-{i:05}"), true).bytes();
            pre.push(tokio::spawn(async move {
                let s = TcpStream::connect(addr).await.expect("connect");
                s.set_nodelay(true).unwrap();
                trickle(s, Instant::now(), &bytes, EVERY, give_up).await
            }));
        }
        let mut post = Vec::new();
        for i in 0..CONNECTED {
            post.push(tokio::spawn(async move {
                let opts = ConnectOpts::v3(&format!("slowpub-{i:03}"), true).keep_alive(2);
                let (raw, _) = Raw::connect_ok(addr, &opts).await;
                let publish = publish_packet(
                    false,
                    "slowloris/t",
                    1,
                    false,
                    false,
                    1,
                    &Props::new(),
                    &[b'x'; 200],
                );
                trickle(raw.stream, Instant::now(), &publish, EVERY, give_up).await
            }));
        }
        let mut a = Vec::new();
        for t in pre {
            a.push(t.await.unwrap());
        }
        let mut b = Vec::new();
        for t in post {
            b.push(t.await.unwrap());
        }
        (a, b)
    });
    let after = node.wait_sockets_at_most(fig.sockets_before, Duration::from_secs(5));
    let (min, med, max, open) = close_times(&pre);
    let (kmin, kmed, kmax, kopen) = close_times(&post);
    let details = format!(
        "{CONNS} conns trickling CONNECT 1 B/500 ms (timeout {TIMEOUT} s): closed after \
         min/med/max {min:.2}/{med:.2}/{max:.2} s, {open} left open; {CONNECTED} connected \
         (keep-alive 2 s) trickling PUBLISH: closed after {kmin:.2}/{kmed:.2}/{kmax:.2} s, \
         {kopen} left open"
    );
    let m = fig.finish(&node, &details);
    check_eq!(open, 0, "slowloris connections left open");
    check!(
        pre.iter().all(|e| e.received == 0),
        "an incomplete CONNECT got an answer"
    );
    check!(
        min > TIMEOUT - 0.3 && max < TIMEOUT + 1.5,
        "slowloris not closed at the connect timeout: {details}"
    );
    check_eq!(kopen, 0, "trickling connected clients left open");
    // 1.5 x keep-alive, checked every second.
    check!(
        kmin > 2.5 && kmax < 3.0 + 2.5,
        "trickling connected clients not closed by keep-alive: {details}"
    );
    check!(
        after <= m.sockets_before,
        "sockets {after}, before {}",
        m.sockets_before
    );
    m.assert_growth_under("slowloris", 32.0);
    node.stop();
}

/// A CONNECT that never completes (nothing, half a CONNECT, or a header that announces
/// more than ever comes) is closed at the connect timeout, with no answer.
#[test]
fn hostile_incomplete_connect_is_closed_at_the_connect_timeout() {
    const EACH: usize = 100;
    const TIMEOUT: f64 = 2.0;
    let _serial = serial();
    let node = Node::start(&Settings::new().set("mqtt", "connect_timeout_secs", TIMEOUT));
    let addr = node.addr;
    let fig = Figures::start("incomplete", &node);
    let ended = runtime().block_on(async move {
        let mut tasks = Vec::new();
        for i in 0..3 * EACH {
            let full = ConnectOpts::v3(&format!("incomplete-{i:05}"), true).bytes();
            let bytes = match i % 3 {
                0 => Vec::new(),
                1 => full[..full.len() / 2].to_vec(),
                // A CONNECT header announcing 200 bytes, then 10 of them.
                _ => [&[0x10, 200, 1][..], &full[2..12]].concat(),
            };
            tasks.push(tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.expect("connect");
                let t0 = Instant::now();
                s.write_all(&bytes).await.expect("write");
                await_close(s, t0, Duration::from_secs(10)).await
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    let after = node.wait_sockets_at_most(fig.sockets_before, Duration::from_secs(5));
    let (min, med, max, open) = close_times(&ended);
    let details = format!(
        "{} conns (none / half a CONNECT / header of 200 B + 10 B; timeout {TIMEOUT} s): \
         closed after min/med/max {min:.2}/{med:.2}/{max:.2} s, {open} left open",
        3 * EACH
    );
    let m = fig.finish(&node, &details);
    check_eq!(open, 0, "incomplete CONNECTs left open");
    check!(
        ended.iter().all(|e| e.received == 0),
        "an incomplete CONNECT got an answer"
    );
    check!(
        min > TIMEOUT - 0.3 && max < TIMEOUT + 1.5,
        "not closed at the connect timeout: {details}"
    );
    check!(
        after <= m.sockets_before,
        "sockets {after}, before {}",
        m.sockets_before
    );
    m.assert_growth_under("incomplete", 32.0);
    node.stop();
}

/// 10k connections that complete TCP and then send nothing, or half a CONNECT, all at
/// once: all are closed by the connect timeout, and the node's descriptors come back
/// to where they were.
#[test]
fn hostile_10k_half_open_connections_are_all_closed() {
    const WANT: usize = 10_000;
    const TIMEOUT: f64 = 5.0;
    let _serial = serial();
    // The test and the node each hold one descriptor per connection.
    let limit = nofile_limit() as usize;
    let conns = WANT.min(limit.saturating_sub(600));
    if conns < WANT {
        println!(
            "hostile: half-open: RLIMIT_NOFILE is {limit}; scaling the 10k connections \
             down to {conns}"
        );
    }
    // A longer timeout, so that all of them are open together; no accept-rate limit
    // (if this build has one), so that opening them is not what is measured.
    let node = Node::start(
        &Settings::new()
            .set("mqtt", "connect_timeout_secs", TIMEOUT)
            .set("listener.tcp", "max_connections", conns + 1000)
            .set_if_known("listener.tcp", "max_connection_rate", 0),
    );
    let addr = node.addr;
    let fig = Figures::start("half-open", &node);
    let started = Instant::now();
    let (ended, opened_in, fresh_connect) = runtime().block_on(async move {
        // Open them 200 at a time; each gets a task that waits for the node to close it.
        let tasks: Vec<(usize, _)> = futures::stream::iter(0..conns)
            .map(|i| async move {
                let mut s = TcpStream::connect(addr).await.expect("connect");
                let t0 = Instant::now();
                if i % 2 == 1 {
                    let full = ConnectOpts::v3(&format!("half-{i:05}"), true).bytes();
                    s.write_all(&full[..full.len() / 2]).await.expect("write");
                }
                let give_up = Duration::from_secs_f64(TIMEOUT + 15.0);
                (i, tokio::spawn(await_close(s, t0, give_up)))
            })
            .buffer_unordered(200)
            .collect()
            .await;
        let opened_in = started.elapsed();
        // A well-behaved client connecting now, with 10k connections waiting.
        let t = Instant::now();
        let (fresh, _) = Raw::connect_ok(addr, &ConnectOpts::v3("fresh", true)).await;
        let fresh_connect = t.elapsed();
        fresh.disconnect().await;
        let mut out = Vec::with_capacity(conns);
        for (_, t) in tasks {
            out.push(t.await.unwrap());
        }
        (out, opened_in, fresh_connect)
    });
    let after = node.wait_sockets_at_most(fig.sockets_before, Duration::from_secs(5));
    let (min, med, max, open) = close_times(&ended);
    let details = format!(
        "{conns} conns (half nothing, half half a CONNECT; timeout {TIMEOUT} s) opened in \
         {:.1} s; a fresh client connected meanwhile in {:.0} ms; closed after min/med/max \
         {min:.2}/{med:.2}/{max:.2} s, {open} left open",
        opened_in.as_secs_f64(),
        fresh_connect.as_secs_f64() * 1000.0
    );
    let m = fig.finish(&node, &details);
    check_eq!(open, 0, "half-open connections left open: {details}");
    check!(
        ended.iter().all(|e| e.received == 0),
        "an incomplete CONNECT got an answer"
    );
    check!(
        min > TIMEOUT - 0.3 && max < TIMEOUT + 3.0,
        "not closed at the connect timeout: {details}"
    );
    check!(
        m.sockets_peak >= m.sockets_before + conns * 9 / 10,
        "the connections were not open together (peak sockets {}): {details}",
        m.sockets_peak
    );
    check!(
        after <= m.sockets_before,
        "sockets {after}, before {}",
        m.sockets_before
    );
    // A few KiB per waiting connection (about 4 measured).
    m.assert_growth_under("half-open", 32.0 + conns as f64 * 8.0 / 1024.0);
    node.stop();
}

/// Write PUBLISHes as fast as the node takes them until `until`; the read half counts
/// PUBACKs. Answers (sent, acked) once every PUBACK is in (or 20 s later).
async fn flood_qos1(addr: SocketAddr, topic: &str, payload: usize, until: Instant) -> (u64, u64) {
    let (raw, _) = Raw::connect_ok(addr, &ConnectOpts::v3("flooder", true)).await;
    raw.stream.set_nodelay(false).ok();
    let (mut r, mut w) = raw.stream.into_split();
    let acked = Arc::new(AtomicU64::new(0));
    let counter = acked.clone();
    let reader = tokio::spawn(async move {
        let mut buf = Vec::new();
        while read_until(&mut r, &mut buf, Duration::from_secs(30), |p| {
            p.kind() == PUBACK
        })
        .await
        .is_some()
        {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    let mut sent = 0u64;
    let mut body = vec![b'x'; payload];
    while Instant::now() < until {
        let mut batch = Vec::with_capacity(64 * (payload + 32));
        for _ in 0..64 {
            body[..8].copy_from_slice(&sent.to_be_bytes());
            let pid = (sent % 65_535) as u16 + 1;
            batch.extend(publish_packet(
                false,
                topic,
                1,
                false,
                false,
                pid,
                &Props::new(),
                &body,
            ));
            sent += 1;
        }
        w.write_all(&batch).await.expect("flood");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while acked.load(Ordering::Relaxed) < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    reader.abort();
    (sent, acked.load(Ordering::Relaxed))
}

/// A subscriber whose socket takes 4 KiB and is never read, subscribed at `qos`.
async fn stuck_subscriber(addr: SocketAddr, id: &str, filter: &str, qos: u8) -> Raw {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&addr.into()).expect("connect");
    sock.set_nonblocking(true).unwrap();
    let stream = TcpStream::from_std(std::net::TcpStream::from(sock)).unwrap();
    let mut raw = Raw::from_stream(stream);
    raw.send(&ConnectOpts::v3(id, true).keep_alive(0).bytes())
        .await;
    let ack = parse_connack(&raw.expect(CONNACK).await, false);
    assert_eq!(ack.code, 0);
    raw.send(&subscribe_packet(false, 1, &[(filter, qos)], &Props::new()))
        .await;
    raw.expect(SUBACK).await;
    raw
}

/// Read (and acknowledge) `n` messages; answers their sequence numbers.
async fn read_seqs(raw: &mut Raw, n: usize) -> Vec<u64> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let Some(p) = raw.try_publish(Duration::from_secs(10)).await else {
            break;
        };
        if p.qos == 1 {
            raw.send(&ack_packet(PUBACK, p.pid)).await;
        }
        out.push(u64::from_be_bytes(p.payload[..8].try_into().unwrap()));
    }
    out
}

/// Two subscribers that never read (QoS 0: bounded by the write buffer; QoS 1: by the
/// in-flight window) while a publisher floods QoS 1 for 5 s: the node's memory stays
/// bounded (the backlog stays in the log), and when they read again, they get the
/// messages from the first one, in order.
#[test]
fn hostile_stuck_subscriber_under_a_qos1_flood_keeps_memory_bounded() {
    const SECS: f64 = 5.0;
    // Small, so that the log written stays modest (~120 MB in a debug build, ~500 MB in
    // release): the cost under test is per message.
    const PAYLOAD: usize = 256;
    const CACHE: u64 = 8 << 20;
    let _serial = serial();
    let node = Node::start(&Settings::new().set("storage", "cache_bytes", CACHE));
    let addr = node.addr;
    let fig = Figures::start("stuck-sub", &node);
    let pid = node.pid;
    let (sent, acked, mid, first0, first1) = std::thread::scope(|scope| {
        let rt = runtime();
        let mut stuck = rt.block_on(async {
            (
                stuck_subscriber(addr, "stuck-q0", "flood/#", 0).await,
                stuck_subscriber(addr, "stuck-q1", "flood/#", 1).await,
            )
        });
        let until = Instant::now() + Duration::from_secs_f64(SECS);
        let mid = scope.spawn(|| {
            std::thread::sleep(Duration::from_secs_f64(SECS / 2.0));
            proc_status_kib(pid, "VmRSS:") * 1024
        });
        let (sent, acked) = rt.block_on(flood_qos1(addr, "flood/data", PAYLOAD, until));
        let mid = mid.join().unwrap();
        // Read again: the backlog is in the log, from the first message on.
        let (first0, first1) = rt.block_on(async {
            (
                read_seqs(&mut stuck.0, 2000).await,
                read_seqs(&mut stuck.1, 2000).await,
            )
        });
        (sent, acked, mid, first0, first1)
    });
    let end = node.rss();
    let second_half = end.saturating_sub(mid) as f64 / MIB;
    let published = acked as f64 * PAYLOAD as f64 / MIB;
    let details = format!(
        "1 publisher QoS 1 x {PAYLOAD} B for {SECS} s: {acked} acked ({published:.0} MiB, \
         {:.0} msg/s) while 2 subscribers (QoS 0 and 1) never read; RSS at half time \
         {:.1} MiB, at end {:.1} MiB (second half +{second_half:.1} MiB); stuck subscribers \
         then read {}+{} in order",
        acked as f64 / SECS,
        mid as f64 / MIB,
        end as f64 / MIB,
        first0.len(),
        first1.len()
    );
    let m = fig.finish(&node, &details);
    check_eq!(sent, acked, "every flooded PUBLISH acknowledged");
    for got in [&first0, &first1] {
        let want: Vec<u64> = (0..got.len() as u64).collect();
        check_eq!(
            got.len(),
            2000,
            "a stuck subscriber did not get its backlog"
        );
        check_eq!(got, &want, "the backlog, in order, from the first message");
    }
    // What memory may hold: the message cache, one pull per session, buffers.
    m.assert_growth_under("stuck-sub", CACHE as f64 / MIB + 48.0);
    check!(
        second_half < 8.0_f64.max(published / 2.0 / 8.0),
        "memory grew {second_half:.1} MiB in the second half of the flood: {details}"
    );
    node.stop();
}

/// Counts of what one QoS 2 resender got back.
#[derive(Default)]
struct Q2Counts {
    pubrec: AtomicU64,
    pubcomp: AtomicU64,
    closed: AtomicBool,
}

/// One client resending one QoS 2 PUBLISH (same packet id, DUP) in a tight loop for
/// `secs`, never sending PUBREL; then, if it `reads`, PUBREL (expects PUBCOMP) and a new
/// message with the same packet id, completed. Answers (resends, counts).
async fn qos2_resender(
    addr: SocketAddr,
    opts: ConnectOpts,
    topic: String,
    tag: &'static str,
    reads: bool,
    until: Instant,
) -> (u64, Arc<Q2Counts>) {
    const PID: u16 = 7;
    let v5 = opts.v5;
    let (raw, _) = Raw::connect_ok(addr, &opts).await;
    let (mut r, mut w) = raw.stream.into_split();
    let counts = Arc::new(Q2Counts::default());
    let c = counts.clone();
    let reader = reads.then(|| {
        tokio::spawn(async move {
            let mut buf = Vec::new();
            while let Some(p) =
                read_until(&mut r, &mut buf, Duration::from_secs(60), |_| true).await
            {
                match p.kind() {
                    PUBREC => c.pubrec.fetch_add(1, Ordering::Relaxed),
                    PUBCOMP => c.pubcomp.fetch_add(1, Ordering::Relaxed),
                    _ => 0,
                };
            }
            c.closed.store(true, Ordering::Relaxed);
        })
    });
    let mut payload = format!("{tag}:1:").into_bytes();
    payload.resize(1024, b'.');
    let first = publish_packet(v5, &topic, 2, false, false, PID, &Props::new(), &payload);
    let dup = publish_packet(v5, &topic, 2, false, true, PID, &Props::new(), &payload);
    let batch: Vec<u8> = dup.iter().copied().cycle().take(dup.len() * 256).collect();
    let mut resends = 0u64;
    if w.write_all(&first).await.is_err() {
        counts.closed.store(true, Ordering::Relaxed);
        return (0, counts);
    }
    while Instant::now() < until {
        // A client that does not read may block here: bounded by `until` (a write cut
        // short leaves half a packet, but that client sends nothing more). A client that
        // reads is never blocked for long, and must not cut a packet short.
        let write = w.write_all(&batch);
        let written = if reads {
            Ok(write.await)
        } else {
            tokio::time::timeout_at(until.into(), write).await
        };
        match written {
            Ok(Ok(())) => resends += 256,
            Ok(Err(_)) => {
                counts.closed.store(true, Ordering::Relaxed);
                break;
            }
            Err(_) => break,
        }
    }
    if let Some(reader) = reader {
        let wait_for = |n: u64, c: &Arc<Q2Counts>, f: fn(&Q2Counts) -> u64| {
            let c = c.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(10);
                while f(&c) < n && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        // Complete the first message, then send a second one with the same id.
        let mut payload = format!("{tag}:2:").into_bytes();
        payload.resize(1024, b'.');
        let second = publish_packet(v5, &topic, 2, false, false, PID, &Props::new(), &payload);
        let flow = async {
            w.write_all(&ack_packet(PUBREL, PID)).await?;
            wait_for(1, &counts, |c| c.pubcomp.load(Ordering::Relaxed)).await;
            let recs = counts.pubrec.load(Ordering::Relaxed);
            w.write_all(&second).await?;
            wait_for(recs + 1, &counts, |c| c.pubrec.load(Ordering::Relaxed)).await;
            w.write_all(&ack_packet(PUBREL, PID)).await?;
            wait_for(2, &counts, |c| c.pubcomp.load(Ordering::Relaxed)).await;
            Ok::<_, std::io::Error>(())
        };
        if flow.await.is_err() {
            counts.closed.store(true, Ordering::Relaxed);
        }
        reader.abort();
    }
    (resends, counts)
}

/// Clients resending one QoS 2 PUBLISH (DUP, same packet id) in a tight loop, never
/// sending PUBREL (a v3 and a v5 client that read the PUBRECs, and a v3 client that
/// never reads): the message is stored once and delivered once, the log does not grow
/// with the resends, and memory stays bounded.
#[test]
fn hostile_qos2_resent_forever_is_stored_once() {
    const SECS: f64 = 4.0;
    let _serial = serial();
    let node = Node::start(&Settings::new());
    let addr = node.addr;
    let fig = Figures::start("qos2-resend", &node);
    let log_before = node.log_bytes();
    let rt = runtime();
    // A subscriber that completes every QoS 2 delivery and records the payload tags.
    let (mut sub, _) = rt.block_on(Raw::connect_ok(addr, &ConnectOpts::v3("q2-sub", true)));
    rt.block_on(sub.subscribe(1, &[("q2/#", 2)]));
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let subscriber = rt.spawn(async move {
        let mut got: Vec<String> = Vec::new();
        while !flag.load(Ordering::Relaxed) {
            if let Some(p) = sub.try_publish(Duration::from_millis(200)).await {
                sub.ack(&p).await;
                let tag = String::from_utf8_lossy(&p.payload);
                got.push(tag.split(':').take(2).collect::<Vec<_>>().join(":"));
            }
        }
        got
    });
    let until = Instant::now() + Duration::from_secs_f64(SECS);
    let results = rt.block_on(async move {
        let a = tokio::spawn(qos2_resender(
            addr,
            ConnectOpts::v3("q2-v3", true),
            "q2/v3".into(),
            "v3",
            true,
            until,
        ));
        let b = tokio::spawn(qos2_resender(
            addr,
            ConnectOpts::v5("q2-v5", true),
            "q2/v5".into(),
            "v5",
            true,
            until,
        ));
        let c = tokio::spawn(qos2_resender(
            addr,
            ConnectOpts::v3("q2-deaf", true),
            "q2/deaf".into(),
            "deaf",
            false,
            until,
        ));
        [a.await.unwrap(), b.await.unwrap(), c.await.unwrap()]
    });
    // Anything late would come within this.
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let mut got = rt.block_on(subscriber).unwrap();
    got.sort();
    let log_growth = node.log_bytes().saturating_sub(log_before);
    let resent: u64 = results.iter().map(|(n, _)| n).sum();
    let [(n3, c3), (n5, c5), (nd, cd)] = &results;
    let details = format!(
        "3 clients resending one QoS 2 PUBLISH of 1 KiB for {SECS} s: v3 {n3} resends / {} \
         PUBREC, v5 {n5} / {}, non-reading v3 {nd}; closed by the broker: {:?}; {:.0} MiB \
         resent, log grew {:.1} KiB; subscriber got {got:?}",
        c3.pubrec.load(Ordering::Relaxed),
        c5.pubrec.load(Ordering::Relaxed),
        [c3, c5, cd].map(|c| c.closed.load(Ordering::Relaxed)),
        resent as f64 * 1024.0 / MIB,
        log_growth as f64 / 1024.0
    );
    let m = fig.finish(&node, &details);
    check_eq!(
        got,
        ["deaf:1", "v3:1", "v3:2", "v5:1", "v5:2"],
        "each message exactly once: {details}"
    );
    for (name, c) in [("v3", c3), ("v5", c5)] {
        check_eq!(c.pubcomp.load(Ordering::Relaxed), 2, "{name}: PUBCOMPs");
        check!(!c.closed.load(Ordering::Relaxed), "{name}: closed");
    }
    // Six 1 KiB messages and the canary's, not the resends.
    check!(
        log_growth < 1 << 20,
        "the log grew {log_growth} bytes: {details}"
    );
    m.assert_growth_under("qos2-resend", 32.0);
    node.stop();
}

/// How a reconnect loop went.
#[derive(Default, Clone, Copy)]
struct Loop {
    /// CONNACKs with reason 0.
    ok: u64,
    /// CONNACKs with another reason.
    refused: u64,
    /// Connections the node closed before their CONNACK (another loop took over).
    closed: u64,
    /// CONNECTs with neither a CONNACK nor a close within 5 s, or connects that failed.
    stalled: u64,
}

/// One looping client: CONNECT again and again until `until`, cycling through `opts`,
/// keeping the previous connection open until the new one is accepted (so that every
/// CONNECT takes the session over).
async fn reconnect_loop(addr: SocketAddr, opts: Vec<ConnectOpts>, until: Instant) -> Loop {
    let mut n = Loop::default();
    let mut previous: Option<TcpStream> = None;
    let mut i = 0;
    while Instant::now() < until {
        let o = &opts[i % opts.len()];
        i += 1;
        let Ok(mut s) = TcpStream::connect(addr).await else {
            n.stalled += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if s.write_all(&o.bytes()).await.is_err() {
            n.closed += 1;
            continue;
        }
        let mut buf = Vec::new();
        match read_packet(&mut s, &mut buf, Duration::from_secs(5)).await {
            Got::Packet(p) if p.kind() == CONNACK && parse_connack(&p, o.v5).code == 0 => {
                n.ok += 1;
                previous = Some(s);
            }
            Got::Packet(_) => n.refused += 1,
            Got::Closed => n.closed += 1,
            Got::Timeout => n.stalled += 1,
        }
    }
    drop(previous);
    n
}

/// One client id reconnecting as fast as it can for `secs` from `loops` loops at once,
/// each cycling through `opts` (persistent sessions), each CONNECT taking the session
/// over. Checks that the node stays healthy, its sockets come back, memory stays flat,
/// and the session is intact after: present, its one subscription delivering exactly
/// once.
fn reconnect_case(case: &'static str, secs: f64, loops: Vec<Vec<ConnectOpts>>) {
    const ID: &str = "flappy";
    let _serial = serial();
    let node = Node::start(&Settings::new());
    let addr = node.addr;
    let rt = runtime();
    // The session: persistent, one subscription.
    rt.block_on(async {
        let (mut raw, _) = Raw::connect_ok(addr, &ConnectOpts::v3(ID, false)).await;
        raw.subscribe(1, &[("flappy/t", 1)]).await;
        raw.disconnect().await;
    });
    let fig = Figures::start(case, &node);
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let pid = node.pid;
    let (mid, n) = std::thread::scope(|scope| {
        let mid = scope.spawn(move || {
            std::thread::sleep(Duration::from_secs_f64(secs / 2.0));
            proc_status_kib(pid, "VmRSS:") * 1024
        });
        let counts = rt.block_on(async move {
            let tasks: Vec<_> = loops
                .into_iter()
                .map(|opts| tokio::spawn(reconnect_loop(addr, opts, until)))
                .collect();
            let mut n = Loop::default();
            for t in tasks {
                let l = t.await.unwrap();
                n.ok += l.ok;
                n.refused += l.refused;
                n.closed += l.closed;
                n.stalled += l.stalled;
            }
            n
        });
        (mid.join().unwrap(), counts)
    });
    let end = node.rss();
    let after = node.wait_sockets_at_most(fig.sockets_before, Duration::from_secs(5));
    // The session after the storm: present, and its subscription delivers once.
    let (present, delivered) = rt.block_on(async {
        let (mut raw, ack) = Raw::connect_ok(addr, &ConnectOpts::v3(ID, false)).await;
        let (mut publisher, _) = Raw::connect_ok(addr, &ConnectOpts::v3("flappy-pub", true)).await;
        publisher.publish("flappy/t", 1, false, 1, b"after").await;
        let got = raw.drain_publishes(Duration::from_millis(700)).await;
        raw.disconnect().await;
        publisher.disconnect().await;
        (ack.session_present, got.len())
    });
    let takeovers = node.count("session taken over");
    let second_half = end.saturating_sub(mid) as f64 / MIB;
    let details = format!(
        "client id {ID:?} reconnecting for {secs} s: {} CONNACKs ({:.0}/s), refused {}, \
         closed before CONNACK {}, stalled {}; node logged {takeovers} takeovers; RSS at \
         half time {:.1} MiB, at end {:.1} MiB (second half +{second_half:.1} MiB); after: \
         session present {present}, 1 publish delivered {delivered}x",
        n.ok,
        n.ok as f64 / secs,
        n.refused,
        n.closed,
        n.stalled,
        mid as f64 / MIB,
        end as f64 / MIB
    );
    let m = fig.finish(&node, &details);
    check!(n.ok > 100, "too few reconnects: {details}");
    check_eq!((n.refused, n.stalled), (0, 0), "{details}");
    check!(present, "the session was lost: {details}");
    check_eq!(
        delivered,
        1,
        "the subscription delivered {delivered} copies: {details}"
    );
    check!(
        after <= m.sockets_before,
        "sockets {after}, before {}",
        m.sockets_before
    );
    m.assert_growth_under(case, 48.0);
    check!(
        second_half < 8.0,
        "memory grew {second_half:.1} MiB in the second half: {details}"
    );
    node.stop();
}

fn v5_persistent(id: &str) -> ConnectOpts {
    ConnectOpts::v5(id, false).props(Props::new().u32(common::P_SESSION_EXPIRY, 300))
}

/// One client id reconnecting in a tight loop for 6 s (alternately MQTT 3.1.1 and 5.0,
/// persistent session), each CONNECT taking over the connection before.
#[test]
fn hostile_reconnect_loop_with_one_client_id() {
    reconnect_case(
        "reconnect",
        6.0,
        vec![vec![
            ConnectOpts::v3("flappy", false),
            v5_persistent("flappy"),
        ]],
    );
}

/// Two loops reconnecting one client id at once, so that a CONNECT often takes over a
/// connection whose own takeover is still under way.
#[test]
fn hostile_concurrent_reconnect_loops_keep_the_session() {
    reconnect_case(
        "reconnect-2x",
        3.0,
        vec![
            vec![ConnectOpts::v3("flappy", false)],
            vec![v5_persistent("flappy")],
        ],
    );
}

/// The smallest form of the same race: two CONNECTs for one persistent session sent at
/// the same moment. One connection is often taken over before its CONNACK; every
/// CONNACK must say the session is present, and the session must keep its subscription.
/// (Before 37517e5 the second connection got no session: present 0, subscription gone.)
#[test]
fn hostile_two_simultaneous_connects_keep_the_session() {
    let _serial = serial();
    let node = Node::start(&Settings::new());
    let addr = node.addr;
    runtime().block_on(async {
        let (mut raw, _) = Raw::connect_ok(addr, &ConnectOpts::v3("twin", false)).await;
        raw.subscribe(1, &[("twin/t", 1)]).await;
        raw.disconnect().await;
        let connect = ConnectOpts::v3("twin", false).bytes();
        let (mut a, mut b) = (Raw::open(addr).await, Raw::open(addr).await);
        tokio::join!(a.send(&connect), b.send(&connect));
        let mut present = Vec::new();
        for c in [&mut a, &mut b] {
            if let Some(p) = c.try_expect(CONNACK, Duration::from_secs(5)).await {
                present.push(parse_connack(&p, false).session_present);
            }
        }
        drop((a, b));
        check!(
            !present.is_empty() && present.iter().all(|p| *p),
            "CONNACKs' session present: {present:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (mut raw, ack) = Raw::connect_ok(addr, &ConnectOpts::v3("twin", false)).await;
        let (mut publisher, _) = Raw::connect_ok(addr, &ConnectOpts::v3("twin-pub", true)).await;
        publisher.publish("twin/t", 1, false, 1, b"after").await;
        let got = raw.drain_publishes(Duration::from_millis(700)).await;
        check!(ack.session_present, "the session was lost");
        check_eq!(got.len(), 1, "copies the subscription delivered");
    });
    node.stop();
}
