//! MQTT load generator: `cargo run --release --example mqtt_bench -- --addr 127.0.0.1:1883
//! --broker-pid PID --scenario qos0|qos1|qos0x4|qos1x4|fanout|lat0|lat1|idle|retained|all`.
//!
//! Works against any MQTT 3.1.1 broker (it is used to compare actimq with Mosquitto; see
//! `benches/compare.sh`).
//!
//! Why raw TCP and a hand-rolled codec instead of rumqttc: a load generator has to be much
//! cheaper per message than the broker it measures, or it measures itself. rumqttc runs an
//! event loop per connection with a request channel, allocates per packet and waits for
//! each PUBLISH to be handed over through that channel, so 1000 subscribers mean 1000
//! event loops. Here the generator encodes the four packets it needs (CONNECT, SUBSCRIBE,
//! PUBLISH, PUBACK) straight into one write buffer per connection, decodes CONNACK, SUBACK,
//! PUBLISH and PUBACK in place from one read buffer per connection, and drives *many
//! connections from one task* (`run_group`), all on a tokio `current_thread` runtime:
//!
//! * every socket has TCP_NODELAY; writes are batched (up to 64 KiB of packets per
//!   `write`), reads take whatever the kernel has (up to the read buffer);
//! * QoS 1 publishers are pipelined with a window (`--window`, default 100 unacknowledged
//!   PUBLISHes per publisher), subscribers PUBACK every QoS 1 message they receive;
//! * each result line carries the generator's own CPU use (utime+stime from
//!   /proc/self/stat over the measured interval, in % of one core) and the broker's CPU
//!   and RSS (/proc/<broker-pid>/stat and /proc/<broker-pid>/status VmRSS, sampled every
//!   50 ms; `rss_peak` is the largest sample), so one can see that the generator was not
//!   the bottleneck.
//!
//! Every scenario prints one `RESULT key=value ...` line (parsed by `benches/compare.sh`).

use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

// ---------------------------------------------------------------------------------------
// Clock: every timestamp is nanoseconds since the process started (one process publishes
// and subscribes, so latency needs no clock sync).

fn epoch() -> Instant {
    static E: OnceLock<Instant> = OnceLock::new();
    *E.get_or_init(Instant::now)
}
fn now_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

// ---------------------------------------------------------------------------------------
// Codec (MQTT 3.1.1, just what the generator needs).

const CONNECT: u8 = 1;
const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const SUBACK: u8 = 9;

fn put_remaining_len(w: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        w.push(b);
        if n == 0 {
            break;
        }
    }
}
fn put_str(w: &mut Vec<u8>, s: &[u8]) {
    w.extend_from_slice(&(s.len() as u16).to_be_bytes());
    w.extend_from_slice(s);
}
fn enc_connect(w: &mut Vec<u8>, client_id: &str) {
    w.push(CONNECT << 4);
    put_remaining_len(w, 10 + 2 + client_id.len());
    put_str(w, b"MQTT");
    w.push(4); // protocol level 3.1.1
    w.push(0x02); // clean session
    w.extend_from_slice(&0u16.to_be_bytes()); // keep alive 0: no PINGREQs needed
    put_str(w, client_id.as_bytes());
}
fn enc_subscribe(w: &mut Vec<u8>, pid: u16, filter: &str, qos: u8) {
    w.push(0x82);
    put_remaining_len(w, 2 + 2 + filter.len() + 1);
    w.extend_from_slice(&pid.to_be_bytes());
    put_str(w, filter.as_bytes());
    w.push(qos);
}
/// PUBLISH whose payload is `payload_len` bytes: an 8-byte little-endian send timestamp
/// (ns since the generator's epoch) and filler.
fn enc_publish(w: &mut Vec<u8>, topic: &[u8], qos: u8, retain: bool, pid: u16, payload_len: usize) {
    w.push((PUBLISH << 4) | (qos << 1) | retain as u8);
    let len = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + payload_len;
    put_remaining_len(w, len);
    put_str(w, topic);
    if qos > 0 {
        w.extend_from_slice(&pid.to_be_bytes());
    }
    w.extend_from_slice(&now_ns().to_le_bytes());
    w.resize(w.len() + payload_len.saturating_sub(8), b'x');
}
fn enc_puback(w: &mut Vec<u8>, pid: u16) {
    w.extend_from_slice(&[PUBACK << 4, 2]);
    w.extend_from_slice(&pid.to_be_bytes());
}
/// Splits one packet off the front of `b`: (first header byte, body start, packet end).
fn dec_packet(b: &[u8]) -> Option<(u8, usize, usize)> {
    let mut len = 0usize;
    let mut mult = 1usize;
    for i in 1..5 {
        let byte = *b.get(i)?;
        len += (byte & 0x7f) as usize * mult;
        mult *= 128;
        if byte & 0x80 == 0 {
            let end = i + 1 + len;
            return (b.len() >= end).then_some((b[0], i + 1, end));
        }
    }
    panic!("malformed remaining length from broker");
}
/// PUBLISH body -> (qos, packet id, payload).
fn dec_publish(hdr: u8, body: &[u8]) -> (u8, u16, &[u8]) {
    let qos = (hdr >> 1) & 3;
    let tl = u16::from_be_bytes([body[0], body[1]]) as usize;
    let mut p = 2 + tl;
    let mut pid = 0;
    if qos > 0 {
        pid = u16::from_be_bytes([body[p], body[p + 1]]);
        p += 2;
    }
    (qos, pid, &body[p..])
}

// ---------------------------------------------------------------------------------------
// Connections driven in groups.

struct Conn {
    s: TcpStream,
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    wbuf: Vec<u8>,
    wpos: usize,
}

const WBUF_HIGH: usize = 64 * 1024;

impl Conn {
    fn new(s: TcpStream) -> Conn {
        s.set_nodelay(true).expect("nodelay");
        Conn {
            s,
            rbuf: Vec::new(),
            rstart: 0,
            rend: 0,
            wbuf: Vec::new(),
            wpos: 0,
        }
    }
    fn pending_write(&self) -> usize {
        self.wbuf.len() - self.wpos
    }
}

/// What a group of connections does; `run_group` does the I/O.
trait Role {
    /// Queue packets for connection `i` (called whenever its unsent bytes are below 64 KiB).
    fn fill(&mut self, i: usize, w: &mut Vec<u8>);
    /// One packet arrived on connection `i`; replies go to `w`.
    fn on_packet(&mut self, i: usize, w: &mut Vec<u8>, hdr: u8, body: &[u8]);
    fn done(&self) -> bool;
    /// When `fill` will have something new to send (rate-limited publishers).
    fn next_wake(&self) -> Option<Instant> {
        None
    }
}

/// Drives every connection of the group from this one task until `role.done()`.
async fn run_group<R: Role>(conns: &mut [Conn], role: &mut R, rbuf_size: usize) -> io::Result<()> {
    for c in conns.iter_mut() {
        if c.rbuf.len() < rbuf_size {
            c.rbuf.resize(rbuf_size, 0);
        }
    }
    let mut sleep: Pin<Box<Sleep>> = Box::pin(tokio::time::sleep(Duration::from_millis(20)));
    poll_fn(|cx: &mut Context<'_>| loop {
        let mut progress = false;
        for (i, c) in conns.iter_mut().enumerate() {
            // Read (a few times: bounded work per connection per round).
            for _ in 0..4 {
                if c.rstart == c.rend {
                    c.rstart = 0;
                    c.rend = 0;
                } else if c.rbuf.len() - c.rend < 4096 {
                    c.rbuf.copy_within(c.rstart..c.rend, 0);
                    c.rend -= c.rstart;
                    c.rstart = 0;
                }
                let mut rb = ReadBuf::new(&mut c.rbuf[c.rend..]);
                match Pin::new(&mut c.s).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                format!("broker closed connection {i}"),
                            )));
                        }
                        c.rend += n;
                        progress = true;
                        while let Some((hdr, b, e)) = dec_packet(&c.rbuf[c.rstart..c.rend]) {
                            let p = c.rstart;
                            role.on_packet(i, &mut c.wbuf, hdr, &c.rbuf[p + b..p + e]);
                            c.rstart += e;
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => break,
                }
            }
            // Fill and write.
            if c.pending_write() < WBUF_HIGH {
                if c.wpos > 0 {
                    c.wbuf.drain(..c.wpos);
                    c.wpos = 0;
                }
                role.fill(i, &mut c.wbuf);
            }
            while c.pending_write() > 0 {
                match Pin::new(&mut c.s).poll_write(cx, &c.wbuf[c.wpos..]) {
                    Poll::Ready(Ok(n)) => {
                        c.wpos += n;
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => break,
                }
            }
            if c.wpos == c.wbuf.len() {
                c.wbuf.clear();
                c.wpos = 0;
            }
        }
        if role.done() {
            return Poll::Ready(Ok(()));
        }
        let tick = Instant::now() + Duration::from_millis(20);
        let wake = role.next_wake().map_or(tick, |w| w.min(tick));
        if sleep.is_elapsed() || wake < sleep.deadline().into_std() {
            sleep.as_mut().reset(wake.into());
        }
        if sleep.as_mut().poll(cx).is_ready() {
            progress = true;
        }
        if !progress {
            return Poll::Pending;
        }
    })
    .await
}

/// CONNECT + CONNACK on every connection.
struct ConnectRole {
    prefix: String,
    sent: Vec<bool>,
    acked: usize,
}
impl Role for ConnectRole {
    fn fill(&mut self, i: usize, w: &mut Vec<u8>) {
        if !self.sent[i] {
            enc_connect(w, &format!("{}-{i}", self.prefix));
            self.sent[i] = true;
        }
    }
    fn on_packet(&mut self, i: usize, _: &mut Vec<u8>, hdr: u8, body: &[u8]) {
        assert_eq!(hdr >> 4, CONNACK, "conn {i}: expected CONNACK");
        assert_eq!(body[1], 0, "conn {i}: CONNACK return code {}", body[1]);
        self.acked += 1;
    }
    fn done(&self) -> bool {
        self.acked == self.sent.len()
    }
}

async fn connect_many(addr: SocketAddr, n: usize, prefix: &str) -> io::Result<Vec<Conn>> {
    // In chunks of 200: TCP connect, then CONNECT/CONNACK, so that no connection waits
    // for the others and hits the broker's connect timeout.
    let mut conns: Vec<Conn> = Vec::with_capacity(n);
    while conns.len() < n {
        let first = conns.len();
        let k = (n - first).min(200);
        let fs = (0..k).map(|_| TcpStream::connect(addr));
        let mut chunk = Vec::with_capacity(k);
        for s in futures::future::join_all(fs).await {
            chunk.push(Conn::new(s?));
        }
        let mut role = ConnectRole {
            prefix: format!("{prefix}-{first}"),
            sent: vec![false; k],
            acked: 0,
        };
        // Small read buffers: idle connections must not make the generator itself big.
        run_group(&mut chunk, &mut role, 256).await?;
        conns.extend(chunk);
    }
    Ok(conns)
}

// ---------------------------------------------------------------------------------------
// Subscribers and publishers.

#[derive(Default)]
struct Shared {
    subacked: AtomicUsize,
    received: AtomicU64,
    last_recv_ns: AtomicU64,
    first_recv_ns: AtomicU64,
    acked: AtomicU64,
    stop: AtomicBool,
}

struct SubRole {
    filters: Vec<String>,
    qos: u8,
    sent: Vec<bool>,
    expected: u64,
    received: u64,
    /// Latencies in ns (latency scenarios only), with the send timestamp.
    lat: Option<Vec<(u64, u64)>>,
    shared: Arc<Shared>,
}
impl Role for SubRole {
    fn fill(&mut self, i: usize, w: &mut Vec<u8>) {
        if !self.sent[i] {
            enc_subscribe(w, 1, &self.filters[i], self.qos);
            self.sent[i] = true;
        }
    }
    fn on_packet(&mut self, i: usize, w: &mut Vec<u8>, hdr: u8, body: &[u8]) {
        match hdr >> 4 {
            PUBLISH => {
                let (qos, pid, payload) = dec_publish(hdr, body);
                if qos == 1 {
                    enc_puback(w, pid);
                }
                let now = now_ns();
                if self.received == 0 {
                    self.shared.first_recv_ns.store(now, Relaxed);
                }
                self.received += 1;
                self.shared.received.store(self.received, Relaxed);
                self.shared.last_recv_ns.store(now, Relaxed);
                if let Some(lat) = &mut self.lat {
                    let ts = u64::from_le_bytes(payload[..8].try_into().unwrap());
                    lat.push((ts, now.saturating_sub(ts)));
                }
            }
            SUBACK => {
                assert_ne!(body[2], 0x80, "conn {i}: subscription refused");
                self.shared.subacked.fetch_add(1, Relaxed);
            }
            t => panic!("subscriber {i}: unexpected packet type {t}"),
        }
    }
    fn done(&self) -> bool {
        self.received >= self.expected || self.shared.stop.load(Relaxed)
    }
}

struct PubRole {
    topics: Vec<Vec<u8>>,
    qos: u8,
    retain: bool,
    window: usize,
    payload: usize,
    /// Messages each publisher still has to send.
    left: Vec<u64>,
    inflight: Vec<usize>,
    next_pid: Vec<u16>,
    /// Per-publisher rate (msg/s); 0 = as fast as the window allows.
    rate: f64,
    start: Instant,
    sent: Vec<u64>,
    /// Retained scenario: topic is `<topic><seq>` (one topic per message).
    topic_per_msg: bool,
    acked: u64,
    shared: Arc<Shared>,
}
impl Role for PubRole {
    fn fill(&mut self, i: usize, w: &mut Vec<u8>) {
        let allowed = if self.rate > 0.0 {
            (self.start.elapsed().as_secs_f64() * self.rate) as u64 + 1
        } else {
            u64::MAX
        };
        let mut topic_buf = Vec::new();
        while self.left[i] > 0
            && w.len() < WBUF_HIGH
            && (self.qos == 0 || self.inflight[i] < self.window)
            && self.sent[i] < allowed
        {
            let pid = self.next_pid[i];
            self.next_pid[i] = if pid == u16::MAX { 1 } else { pid + 1 };
            let topic: &[u8] = if self.topic_per_msg {
                topic_buf.clear();
                topic_buf.extend_from_slice(&self.topics[i]);
                topic_buf.extend_from_slice(self.sent[i].to_string().as_bytes());
                &topic_buf
            } else {
                &self.topics[i]
            };
            enc_publish(w, topic, self.qos, self.retain, pid, self.payload);
            self.left[i] -= 1;
            self.sent[i] += 1;
            if self.qos > 0 {
                self.inflight[i] += 1;
            }
        }
    }
    fn on_packet(&mut self, i: usize, _: &mut Vec<u8>, hdr: u8, _: &[u8]) {
        assert_eq!(hdr >> 4, PUBACK, "publisher {i}: unexpected packet");
        self.inflight[i] -= 1;
        self.acked += 1;
        self.shared.acked.store(self.acked, Relaxed);
    }
    fn done(&self) -> bool {
        self.shared.stop.load(Relaxed)
            || (self.left.iter().all(|&l| l == 0) && self.inflight.iter().all(|&f| f == 0))
    }
    fn next_wake(&self) -> Option<Instant> {
        if self.rate > 0.0 {
            let next = self.sent.iter().min().copied().unwrap_or(0);
            Some(self.start + Duration::from_secs_f64(next as f64 / self.rate))
        } else {
            None
        }
    }
}

fn pub_role(
    topics: Vec<String>,
    qos: u8,
    per_pub: u64,
    opts: &Opts,
    shared: &Arc<Shared>,
) -> PubRole {
    let n = topics.len();
    PubRole {
        topics: topics.into_iter().map(String::into_bytes).collect(),
        qos,
        retain: false,
        window: opts.window,
        payload: opts.payload,
        left: vec![per_pub; n],
        inflight: vec![0; n],
        next_pid: vec![1; n],
        rate: 0.0,
        start: Instant::now(),
        sent: vec![0; n],
        topic_per_msg: false,
        acked: 0,
        shared: shared.clone(),
    }
}

// ---------------------------------------------------------------------------------------
// Measurement of the generator and the broker.

fn proc_cpu_secs(pid: &str) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the ")" of the command name: state is field 3, utime 14, stime 15.
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0 // CLK_TCK is 100 on Linux
}
/// Seconds the broker's threads spent runnable but waiting for a CPU (sum of the second
/// field of /proc/<pid>/task/*/schedstat): large values mean other load on its core
/// disturbed the measurement.
fn proc_wait_secs(pid: u32) -> f64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    let mut ns = 0u64;
    for t in dir.flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
            ns += s
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
    }
    ns as f64 / 1e9
}
fn rss_kb(pid: u32) -> u64 {
    if pid == 0 {
        return 0;
    }
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

struct Meter {
    t0: Instant,
    gen0: f64,
    broker0: f64,
    wait0: f64,
    broker_pid: u32,
    rss_before: u64,
    rss_peak: u64,
}
impl Meter {
    fn start(broker_pid: u32) -> Meter {
        let rss = rss_kb(broker_pid);
        Meter {
            t0: Instant::now(),
            gen0: proc_cpu_secs("self"),
            broker0: proc_cpu_secs(&broker_pid.to_string()),
            wait0: proc_wait_secs(broker_pid),
            broker_pid,
            rss_before: rss,
            rss_peak: rss,
        }
    }
    fn sample(&mut self) {
        self.rss_peak = self.rss_peak.max(rss_kb(self.broker_pid));
    }
    /// `gen_cpu=..% broker_cpu=..% rss_kb_before=.. rss_kb_peak=.. rss_kb_after=..`
    fn report(&mut self) -> String {
        self.sample();
        let wall = self.t0.elapsed().as_secs_f64();
        let gen = proc_cpu_secs("self") - self.gen0;
        let broker = proc_cpu_secs(&self.broker_pid.to_string()) - self.broker0;
        let wait = proc_wait_secs(self.broker_pid) - self.wait0;
        format!(
            "wall_s={wall:.2} gen_cpu={:.0}% broker_cpu={:.0}% broker_runq_wait={:.0}% rss_kb_before={} rss_kb_peak={} rss_kb_after={}",
            gen / wall * 100.0,
            broker / wall * 100.0,
            wait / wall * 100.0,
            self.rss_before,
            self.rss_peak,
            rss_kb(self.broker_pid)
        )
    }
}

// ---------------------------------------------------------------------------------------
// Scenarios.

struct Opts {
    addr: SocketAddr,
    broker_pid: u32,
    count: u64,
    payload: usize,
    window: usize,
    fanout_subs: usize,
    fanout_count: u64,
    lat_secs: u64,
    lat_rate: f64,
    idle_conns: usize,
    retained: u64,
    deadline: Duration,
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx] as f64 / 1000.0
}

/// `npubs` publishers each publish `per_pub` messages to `topics[i]`; `nsubs` subscribers
/// subscribe to `filters[j]`; returns when `expected` messages arrived, or the publishers
/// are done and nothing arrived for 2 s, or at the deadline.
#[allow(clippy::too_many_arguments)]
async fn pubsub(
    name: &str,
    opts: &Opts,
    qos: u8,
    topics: Vec<String>,
    filters: Vec<String>,
    per_pub: u64,
    expected: u64,
    rate: f64,
) -> io::Result<()> {
    let shared = Arc::new(Shared::default());
    let nsubs = filters.len();
    let mut subs = connect_many(opts.addr, nsubs, &format!("{name}-sub")).await?;
    let lat = rate > 0.0;
    let mut srole = SubRole {
        sent: vec![false; nsubs],
        filters,
        qos,
        expected,
        received: 0,
        lat: lat.then(|| Vec::with_capacity(expected as usize)),
        shared: shared.clone(),
    };
    let rbuf = if nsubs > 100 { 64 * 1024 } else { 256 * 1024 };
    let sub_task = tokio::spawn(async move {
        let r = run_group(&mut subs, &mut srole, rbuf).await;
        (r, srole.lat, subs)
    });
    let t_sub = Instant::now();
    while shared.subacked.load(Relaxed) < nsubs {
        if t_sub.elapsed() > Duration::from_secs(20) || sub_task.is_finished() {
            return Err(io::Error::other("SUBACKs did not arrive"));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut pubs = connect_many(opts.addr, topics.len(), &format!("{name}-pub")).await?;
    let mut prole = pub_role(topics, qos, per_pub, opts, &shared);
    prole.rate = rate;
    let mut meter = Meter::start(opts.broker_pid);
    let t0_ns = now_ns();
    prole.start = Instant::now();
    let pub_task = tokio::spawn(async move {
        let r = run_group(&mut pubs, &mut prole, 64 * 1024).await;
        (r, prole.sent.iter().sum::<u64>(), pubs)
    });
    let mut last = (0, Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        meter.sample();
        let got = shared.received.load(Relaxed);
        if got >= expected || sub_task.is_finished() {
            break;
        }
        if got != last.0 {
            last = (got, Instant::now());
        }
        let idle = last.1.elapsed() > Duration::from_secs(2);
        if (pub_task.is_finished() && idle) || meter.t0.elapsed() > opts.deadline {
            break;
        }
    }
    shared.stop.store(true, Relaxed);
    let (rs, lat, _subs) = sub_task.await.unwrap();
    let (rp, sent, _pubs) = pub_task.await.unwrap();
    let report = meter.report();
    rs?;
    rp?;
    let got = shared.received.load(Relaxed);
    let span = (shared.last_recv_ns.load(Relaxed).saturating_sub(t0_ns)) as f64 / 1e9;
    let mut line = format!(
        "RESULT scenario={name} qos={qos} sent={sent} expected={expected} received={got} loss={} ",
        expected - got.min(expected)
    );
    if let Some(lat) = lat {
        // Drop the first second (connection warm-up).
        let skip_before = t0_ns + 1_000_000_000;
        let mut v: Vec<u64> = lat
            .iter()
            .filter(|(ts, _)| *ts >= skip_before)
            .map(|(_, l)| *l)
            .collect();
        v.sort_unstable();
        line += &format!(
            "rate={rate:.0} samples={} p50_us={:.0} p99_us={:.0} p999_us={:.0} max_us={:.0} ",
            v.len(),
            percentile(&v, 0.50),
            percentile(&v, 0.99),
            percentile(&v, 0.999),
            percentile(&v, 1.0)
        );
    } else {
        line += &format!("msgs_per_s={:.0} span_s={span:.2} ", got as f64 / span);
    }
    println!("{line}{report}");
    Ok(())
}

async fn idle(opts: &Opts) -> io::Result<()> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut meter = Meter::start(opts.broker_pid);
    let conns = connect_many(opts.addr, opts.idle_conns, "idle").await?;
    let t_conn = meter.t0.elapsed().as_secs_f64();
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        meter.sample();
    }
    // Are they all still open (a read would block)?
    let mut open = 0;
    let mut b = [0u8; 16];
    for c in &conns {
        if matches!(c.s.try_read(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
            open += 1;
        }
    }
    let rss_after = rss_kb(opts.broker_pid);
    let per = (rss_after as f64 - meter.rss_before as f64) * 1024.0 / opts.idle_conns as f64;
    println!(
        "RESULT scenario=idle conns={} open={open} connect_s={t_conn:.2} bytes_per_conn={per:.0} {}",
        opts.idle_conns,
        meter.report()
    );
    drop(conns);
    Ok(())
}

async fn retained(opts: &Opts) -> io::Result<()> {
    let n = opts.retained;
    let shared = Arc::new(Shared::default());
    let mut pubs = connect_many(opts.addr, 1, "ret-pub").await?;
    let mut prole = pub_role(vec!["ret/".into()], 1, n, opts, &shared);
    prole.retain = true;
    prole.topic_per_msg = true;
    let t = Instant::now();
    run_group(&mut pubs, &mut prole, 64 * 1024).await?;
    let t_pub = t.elapsed().as_secs_f64();
    let mut subs = connect_many(opts.addr, 1, "ret-sub").await?;
    let mut srole = SubRole {
        filters: vec!["ret/+".into()],
        qos: 1,
        sent: vec![false],
        expected: n,
        received: 0,
        lat: None,
        shared: shared.clone(),
    };
    let mut meter = Meter::start(opts.broker_pid);
    let t0 = now_ns();
    let stop = shared.clone();
    let deadline = opts.deadline;
    let watchdog = tokio::spawn(async move {
        tokio::time::sleep(deadline).await;
        stop.stop.store(true, Relaxed);
    });
    run_group(&mut subs, &mut srole, 256 * 1024).await?;
    watchdog.abort();
    let got = shared.received.load(Relaxed);
    let ms = (shared.last_recv_ns.load(Relaxed).saturating_sub(t0)) as f64 / 1e6;
    let first_ms = (shared.first_recv_ns.load(Relaxed).saturating_sub(t0)) as f64 / 1e6;
    println!(
        "RESULT scenario=retained retained={n} received={got} publish_s={t_pub:.2} first_ms={first_ms:.1} all_ms={ms:.1} {}",
        meter.report()
    );
    Ok(())
}

async fn scenario(name: &str, o: &Opts) -> io::Result<()> {
    let one = |p: &str, n: usize| (0..n).map(|i| format!("{p}{i}")).collect::<Vec<_>>();
    match name {
        "qos0" | "qos1" => {
            let q = (name == "qos1") as u8;
            pubsub(
                name,
                o,
                q,
                one("bench/", 1),
                one("bench/", 1),
                o.count,
                o.count,
                0.0,
            )
            .await
        }
        "qos0x4" | "qos1x4" => {
            let q = (name == "qos1x4") as u8;
            let per = o.count / 4;
            pubsub(
                name,
                o,
                q,
                one("bench/", 4),
                one("bench/", 4),
                per,
                per * 4,
                0.0,
            )
            .await
        }
        "fanout" => {
            let n = o.fanout_subs;
            let filters = vec!["fan/+".to_string(); n];
            let c = o.fanout_count;
            pubsub(
                name,
                o,
                0,
                vec!["fan/1".into()],
                filters,
                c,
                c * n as u64,
                0.0,
            )
            .await
        }
        "lat0" | "lat1" => {
            let q = (name == "lat1") as u8;
            let n = (o.lat_rate * o.lat_secs as f64) as u64;
            pubsub(name, o, q, one("lat/", 1), one("lat/", 1), n, n, o.lat_rate).await
        }
        "idle" => idle(o).await,
        "retained" => retained(o).await,
        _ => Err(io::Error::other(format!("unknown scenario {name}"))),
    }
}

fn main() {
    epoch();
    let mut args = std::env::args().skip(1);
    let mut o = Opts {
        addr: "127.0.0.1:1883".parse().unwrap(),
        broker_pid: 0,
        count: 200_000,
        payload: 64,
        window: 100,
        fanout_subs: 1000,
        fanout_count: 1000,
        lat_secs: 10,
        lat_rate: 1000.0,
        idle_conns: 10_000,
        retained: 10_000,
        deadline: Duration::from_secs(45),
    };
    let mut scenarios = Vec::new();
    while let Some(a) = args.next() {
        let mut v = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--addr" => o.addr = v().parse().expect("--addr"),
            "--broker-pid" => o.broker_pid = v().parse().expect("--broker-pid"),
            "--count" => o.count = v().parse().expect("--count"),
            "--payload" => o.payload = v().parse::<usize>().expect("--payload").max(8),
            "--window" => o.window = v().parse().expect("--window"),
            "--fanout-subs" => o.fanout_subs = v().parse().expect("--fanout-subs"),
            "--fanout-count" => o.fanout_count = v().parse().expect("--fanout-count"),
            "--lat-secs" => o.lat_secs = v().parse().expect("--lat-secs"),
            "--lat-rate" => o.lat_rate = v().parse().expect("--lat-rate"),
            "--idle-conns" => o.idle_conns = v().parse().expect("--idle-conns"),
            "--retained" => o.retained = v().parse().expect("--retained"),
            "--deadline" => o.deadline = Duration::from_secs(v().parse().expect("--deadline")),
            "--scenario" => scenarios.push(v()),
            "-h" | "--help" => {
                println!(
                    "mqtt_bench --addr HOST:PORT --broker-pid PID --scenario \
                     qos0|qos1|qos0x4|qos1x4|fanout|lat0|lat1|idle|retained|all \
                     [--count N] [--payload B] [--window W] [--fanout-subs N] [--fanout-count N] \
                     [--lat-secs S] [--lat-rate R] [--idle-conns N] [--retained N] [--deadline S]"
                );
                return;
            }
            _ => panic!("unknown argument {a}"),
        }
    }
    if scenarios.is_empty() || scenarios.iter().any(|s| s == "all") {
        scenarios = [
            "qos0", "qos1", "qos0x4", "qos1x4", "fanout", "lat0", "lat1", "retained", "idle",
        ]
        .map(String::from)
        .to_vec();
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut failed = false;
    for s in &scenarios {
        if let Err(e) = rt.block_on(scenario(s, &o)) {
            println!("RESULT scenario={s} error=\"{e}\"");
            failed = true;
        }
    }
    std::process::exit(failed as i32);
}
