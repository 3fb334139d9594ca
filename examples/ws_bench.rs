//! QoS 0 throughput over WebSocket vs over TCP, against any MQTT 3.1.1 broker:
//!
//! ```sh
//! cargo run --release --example ws_bench -- --tcp 127.0.0.1:1883 \
//!     --ws ws://127.0.0.1:8083/mqtt [--count 500000] [--size 100] [--per-frame 1] \
//!     [--broker-pid PID]
//! ```
//!
//! For each transport given (`--tcp`, `--ws`, or both), one subscriber connects and
//! subscribes at QoS 0 to `bench/<transport>`, then one publisher connects over the
//! same transport and sends `--count` QoS 0 PUBLISHes of `--size` bytes as fast as the
//! socket takes them. The rate is the number delivered to the subscriber divided by
//! the time from the first publish to the last delivery (the run stops when all have
//! arrived, or after 3 s without a delivery, or after 60 s).
//!
//! Framing: over TCP, packets are written in batches of up to 64 KiB per `write`; over
//! WebSocket, each binary frame carries `--per-frame` packets (1, the default, is what
//! browsers' MQTT.js does), and frames are flushed in batches of up to 64 KiB. The
//! subscriber counts PUBLISH packets in place from whatever it reads.
//!
//! One `current_thread` runtime drives both clients, so the generator uses at most one
//! core; with `--broker-pid`, each result line also has the broker's CPU use
//! (utime+stime from /proc/PID/stat over the run, in % of one core).
//! Every run prints one `RESULT key=value ...` line.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Bytes per write (TCP) or per flush (WebSocket).
const BATCH: usize = 64 * 1024;

struct Args {
    tcp: Option<String>,
    ws: Option<String>,
    count: u64,
    size: usize,
    per_frame: usize,
    broker_pid: Option<u32>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        tcp: None,
        ws: None,
        count: 500_000,
        size: 100,
        per_frame: 1,
        broker_pid: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let num = |v: String| v.parse::<u64>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--tcp" => a.tcp = Some(value()?),
            "--ws" => a.ws = Some(value()?),
            "--count" => a.count = num(value()?)?,
            "--size" => a.size = num(value()?)? as usize,
            "--per-frame" => a.per_frame = (num(value()?)? as usize).max(1),
            "--broker-pid" => a.broker_pid = Some(num(value()?)? as u32),
            "-h" | "--help" => {
                return Err(
                    "usage: ws_bench [--tcp ADDR] [--ws URL] [--count N] [--size B] \
                            [--per-frame K] [--broker-pid PID]"
                        .into(),
                )
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.tcp.is_none() && a.ws.is_none() {
        return Err("give --tcp ADDR and/or --ws URL".into());
    }
    Ok(a)
}

// ---------------------------------------------------------------------------------------
// MQTT 3.1.1 encoding: just CONNECT, SUBSCRIBE and QoS 0 PUBLISH.

fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

fn packet(first: u8, body: &[u8], out: &mut Vec<u8>) {
    out.push(first);
    remaining_length(body.len(), out);
    out.extend_from_slice(body);
}

fn string(s: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn connect(id: &str) -> Vec<u8> {
    let mut b = Vec::new();
    string("MQTT", &mut b);
    b.extend_from_slice(&[4, 0x02, 0, 60]);
    string(id, &mut b);
    let mut out = Vec::new();
    packet(0x10, &b, &mut out);
    out
}

fn subscribe(filter: &str) -> Vec<u8> {
    let mut b = 1u16.to_be_bytes().to_vec();
    string(filter, &mut b);
    b.push(0);
    let mut out = Vec::new();
    packet(0x82, &b, &mut out);
    out
}

fn publish(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    string(topic, &mut b);
    b.extend_from_slice(payload);
    let mut out = Vec::new();
    packet(0x30, &b, &mut out);
    out
}

/// Counts packets in a byte stream without copying them out.
#[derive(Default)]
struct Counter {
    /// Bytes of the packet in progress still to skip.
    skip: usize,
    /// A fixed header split across reads.
    head: Vec<u8>,
    /// Complete packets by type (index = type).
    kinds: [u64; 16],
}

impl Counter {
    fn feed(&mut self, mut data: &[u8]) {
        loop {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                if self.skip > 0 {
                    return;
                }
            }
            // Read a fixed header: type byte + 1..4 length bytes.
            while let Some((&b, rest)) = data.split_first() {
                self.head.push(b);
                data = rest;
                if self.head.len() >= 2 && b & 0x80 == 0 {
                    break;
                }
            }
            if self.head.len() < 2 || self.head[self.head.len() - 1] & 0x80 != 0 {
                return;
            }
            let mut len = 0usize;
            for (i, b) in self.head[1..].iter().enumerate() {
                len |= ((b & 0x7f) as usize) << (7 * i);
            }
            self.kinds[(self.head[0] >> 4) as usize] += 1;
            self.head.clear();
            self.skip = len;
            if self.skip == 0 && data.is_empty() {
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Connections.

enum Conn {
    Tcp(TcpStream),
    Ws(Box<WebSocketStream<TcpStream>>),
}

impl Conn {
    async fn open(target: &Target) -> Result<Conn, String> {
        match target {
            Target::Tcp(addr) => {
                let s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
                s.set_nodelay(true).map_err(|e| e.to_string())?;
                Ok(Conn::Tcp(s))
            }
            Target::Ws(url) => {
                let mut req = url
                    .as_str()
                    .into_client_request()
                    .map_err(|e| e.to_string())?;
                req.headers_mut()
                    .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
                let host = req
                    .uri()
                    .authority()
                    .map(|a| a.to_string())
                    .ok_or("no host in the URL")?;
                let s = TcpStream::connect(host).await.map_err(|e| e.to_string())?;
                s.set_nodelay(true).map_err(|e| e.to_string())?;
                let (ws, _) = tokio_tungstenite::client_async(req, s)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(Conn::Ws(Box::new(ws)))
            }
        }
    }

    /// Send `bytes` (whole packets) at once.
    async fn send(&mut self, bytes: Vec<u8>) -> Result<(), String> {
        match self {
            Conn::Tcp(s) => s.write_all(&bytes).await.map_err(|e| e.to_string()),
            Conn::Ws(ws) => ws
                .send(Message::binary(bytes))
                .await
                .map_err(|e| e.to_string()),
        }
    }

    /// Read some bytes into `counter`; `false` at the end of the stream.
    async fn recv(&mut self, buf: &mut [u8], counter: &mut Counter) -> Result<bool, String> {
        match self {
            Conn::Tcp(s) => {
                let n = s.read(buf).await.map_err(|e| e.to_string())?;
                counter.feed(&buf[..n]);
                Ok(n > 0)
            }
            Conn::Ws(ws) => match ws.next().await {
                Some(Ok(Message::Binary(b))) => {
                    counter.feed(&b);
                    Ok(true)
                }
                Some(Ok(_)) => Ok(true),
                Some(Err(e)) => Err(e.to_string()),
                None => Ok(false),
            },
        }
    }

    /// Wait until `counter` has seen `n` packets of `kind`.
    async fn until(&mut self, counter: &mut Counter, kind: usize, n: u64) -> Result<(), String> {
        let mut buf = vec![0u8; 4096];
        let wait = tokio::time::timeout(Duration::from_secs(10), async {
            while counter.kinds[kind] < n {
                if !self.recv(&mut buf, counter).await? {
                    return Err("closed".to_string());
                }
            }
            Ok(())
        });
        wait.await
            .map_err(|_| format!("no packet of type {kind} in time"))?
    }
}

enum Target {
    Tcp(String),
    Ws(String),
}

/// utime+stime of a process, in clock ticks (100 per second on Linux).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the ")" that closes the command name; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

async fn run(name: &str, target: Target, a: &Args) -> Result<String, String> {
    let topic = format!("bench/{name}");
    let mut sub = Conn::open(&target).await?;
    let mut sub_counter = Counter::default();
    sub.send(connect(&format!("ws-bench-sub-{name}"))).await?;
    sub.until(&mut sub_counter, 2, 1).await?;
    sub.send(subscribe(&topic)).await?;
    sub.until(&mut sub_counter, 9, 1).await?;

    let mut publ = Conn::open(&target).await?;
    let mut pub_counter = Counter::default();
    publ.send(connect(&format!("ws-bench-pub-{name}"))).await?;
    publ.until(&mut pub_counter, 2, 1).await?;

    let one = publish(&topic, &vec![b'x'; a.size]);
    let per_send = match target {
        Target::Tcp(_) => (BATCH / one.len()).max(1),
        Target::Ws(_) => a.per_frame,
    };
    let count = a.count;
    let ticks0 = a.broker_pid.and_then(cpu_ticks);
    let start = Instant::now();

    let publisher = async move {
        let mut sent = 0u64;
        let mut frames_since_flush = 0usize;
        while sent < count {
            let k = (per_send as u64).min(count - sent) as usize;
            let mut buf = Vec::with_capacity(one.len() * k);
            for _ in 0..k {
                buf.extend_from_slice(&one);
            }
            match &mut publ {
                Conn::Tcp(_) => publ.send(buf).await?,
                Conn::Ws(ws) => {
                    // Queue frames and flush every ~64 KiB: one syscall for many frames.
                    ws.feed(Message::binary(buf))
                        .await
                        .map_err(|e| e.to_string())?;
                    frames_since_flush += one.len() * k;
                    if frames_since_flush >= BATCH {
                        ws.flush().await.map_err(|e| e.to_string())?;
                        frames_since_flush = 0;
                    }
                }
            }
            sent += k as u64;
        }
        if let Conn::Ws(ws) = &mut publ {
            ws.flush().await.map_err(|e| e.to_string())?;
        }
        Ok::<_, String>(publ)
    };
    let subscriber = async {
        let mut buf = vec![0u8; 256 * 1024];
        let mut last = start;
        let deadline = start + Duration::from_secs(60);
        while sub_counter.kinds[3] < count && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(3), sub.recv(&mut buf, &mut sub_counter))
                .await
            {
                Ok(Ok(true)) => last = Instant::now(),
                Ok(Ok(false)) | Ok(Err(_)) | Err(_) => break,
            }
        }
        last
    };
    let (publ, last) = tokio::join!(publisher, subscriber);
    let _publ = publ?;
    let secs = last.duration_since(start).as_secs_f64().max(1e-9);
    let got = sub_counter.kinds[3];
    let cpu = match (a.broker_pid.and_then(cpu_ticks), ticks0) {
        (Some(t1), Some(t0)) => format!(" broker_cpu={:.0}%", (t1 - t0) as f64 / secs),
        _ => String::new(),
    };
    Ok(format!(
        "RESULT transport={name} size={} per_frame={} sent={count} received={got} \
         secs={secs:.2} msgs_per_s={:.0} MB_per_s={:.1}{cpu}",
        a.size,
        if name == "tcp" { per_send } else { a.per_frame },
        got as f64 / secs,
        got as f64 * a.size as f64 / secs / 1e6,
    ))
}

fn main() {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut failed = false;
    for (name, target) in [
        ("tcp", a.tcp.clone().map(Target::Tcp)),
        ("ws", a.ws.clone().map(Target::Ws)),
    ] {
        let Some(target) = target else { continue };
        match rt.block_on(run(name, target, &a)) {
            Ok(line) => println!("{line}"),
            Err(e) => {
                println!("RESULT transport={name} error={e:?}");
                failed = true;
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}
