//! Shared helpers of the MQTT conformance tests (`tests/mqtt_*.rs`):
//!
//! * [`node`] starts a [`TestNode`] on a fresh temp dir;
//! * [`Raw`] is a byte-level MQTT client over TCP: write hand-built packets, read one
//!   packet with a timeout, see whether the server closed the connection;
//! * the `*_packet` functions build CONNECT / PUBLISH / SUBSCRIBE / ... bytes for
//!   MQTT 3.1.1 and 5.0 by hand, [`Props`] builds v5 properties, and the `parse_*`
//!   functions decode what the server sends;
//! * [`V4`] and [`V5`] wrap rumqttc clients whose event loop runs on a task and
//!   forwards incoming packets to a channel.
//!
//! Every test module uses only part of this, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use actimq::testing::TestNode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How long a test waits for a packet it expects.
pub const WAIT: Duration = Duration::from_secs(5);
/// How long a test waits to be confident that a packet does *not* come.
pub const QUIET: Duration = Duration::from_millis(700);

/// Start a node with the default configuration on `dir`.
pub fn node(dir: &Path) -> TestNode {
    TestNode::start(dir, |_| {})
}

// ---------------------------------------------------------------------------------
// Packet types
// ---------------------------------------------------------------------------------

pub const CONNECT: u8 = 1;
pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const PUBREC: u8 = 5;
pub const PUBREL: u8 = 6;
pub const PUBCOMP: u8 = 7;
pub const SUBSCRIBE: u8 = 8;
pub const SUBACK: u8 = 9;
pub const UNSUBSCRIBE: u8 = 10;
pub const UNSUBACK: u8 = 11;
pub const PINGREQ: u8 = 12;
pub const PINGRESP: u8 = 13;
pub const DISCONNECT: u8 = 14;

/// One packet as read from the wire: the first byte and the bytes after the
/// Remaining Length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pkt {
    pub first: u8,
    pub body: Vec<u8>,
}

impl Pkt {
    pub fn kind(&self) -> u8 {
        self.first >> 4
    }
    pub fn flags(&self) -> u8 {
        self.first & 0x0f
    }
}

/// What one read attempt gave.
#[derive(Debug)]
pub enum Recv {
    Packet(Pkt),
    /// EOF or a reset: the server closed the connection.
    Closed,
    /// Nothing complete arrived in time.
    Timeout,
}

// ---------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------

pub fn put_varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

pub fn put_str(out: &mut Vec<u8>, s: &str) {
    put_bin(out, s.as_bytes());
}

pub fn put_bin(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u16).to_be_bytes());
    out.extend_from_slice(b);
}

/// A whole packet: first byte, Remaining Length, body.
pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    put_varint(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

/// v5 properties, in the order added (without the length prefix; the packet builders
/// add it).
#[derive(Clone, Debug, Default)]
pub struct Props(pub Vec<u8>);

impl Props {
    pub fn new() -> Props {
        Props(Vec::new())
    }
    pub fn byte(mut self, id: u8, v: u8) -> Props {
        self.0.push(id);
        self.0.push(v);
        self
    }
    pub fn u16(mut self, id: u8, v: u16) -> Props {
        self.0.push(id);
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u32(mut self, id: u8, v: u32) -> Props {
        self.0.push(id);
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn varint(mut self, id: u8, v: usize) -> Props {
        self.0.push(id);
        put_varint(&mut self.0, v);
        self
    }
    pub fn str(mut self, id: u8, v: &str) -> Props {
        self.0.push(id);
        put_str(&mut self.0, v);
        self
    }
    pub fn bin(mut self, id: u8, v: &[u8]) -> Props {
        self.0.push(id);
        put_bin(&mut self.0, v);
        self
    }
    pub fn pair(mut self, id: u8, k: &str, v: &str) -> Props {
        self.0.push(id);
        put_str(&mut self.0, k);
        put_str(&mut self.0, v);
        self
    }
    fn encode(&self, out: &mut Vec<u8>) {
        put_varint(out, self.0.len());
        out.extend_from_slice(&self.0);
    }
}

// v5 property identifiers (MQTT 5.0 §2.2.2.2).
pub const P_PAYLOAD_FORMAT: u8 = 0x01;
pub const P_MESSAGE_EXPIRY: u8 = 0x02;
pub const P_CONTENT_TYPE: u8 = 0x03;
pub const P_RESPONSE_TOPIC: u8 = 0x08;
pub const P_CORRELATION_DATA: u8 = 0x09;
pub const P_SUBSCRIPTION_ID: u8 = 0x0B;
pub const P_SESSION_EXPIRY: u8 = 0x11;
pub const P_ASSIGNED_CLIENT_ID: u8 = 0x12;
pub const P_SERVER_KEEP_ALIVE: u8 = 0x13;
pub const P_WILL_DELAY: u8 = 0x18;
pub const P_REASON_STRING: u8 = 0x1F;
pub const P_RECEIVE_MAXIMUM: u8 = 0x21;
pub const P_TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
pub const P_TOPIC_ALIAS: u8 = 0x23;
pub const P_MAXIMUM_QOS: u8 = 0x24;
pub const P_RETAIN_AVAILABLE: u8 = 0x25;
pub const P_USER_PROPERTY: u8 = 0x26;
pub const P_MAXIMUM_PACKET_SIZE: u8 = 0x27;
pub const P_WILDCARD_SUB_AVAILABLE: u8 = 0x28;
pub const P_SUB_ID_AVAILABLE: u8 = 0x29;
pub const P_SHARED_SUB_AVAILABLE: u8 = 0x2A;

/// A will for [`ConnectOpts`].
#[derive(Clone, Debug)]
pub struct WillOpts {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    /// v5 only.
    pub props: Props,
}

/// Everything a hand-built CONNECT may say.
#[derive(Clone, Debug)]
pub struct ConnectOpts {
    pub v5: bool,
    pub client_id: String,
    pub clean: bool,
    pub keep_alive: u16,
    pub props: Props,
    pub will: Option<WillOpts>,
    /// User name and password (either may be absent).
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
}

impl ConnectOpts {
    pub fn v3(client_id: &str, clean: bool) -> ConnectOpts {
        ConnectOpts {
            v5: false,
            client_id: client_id.into(),
            clean,
            keep_alive: 30,
            props: Props::new(),
            will: None,
            username: None,
            password: None,
        }
    }
    pub fn v5(client_id: &str, clean: bool) -> ConnectOpts {
        ConnectOpts {
            v5: true,
            ..ConnectOpts::v3(client_id, clean)
        }
    }
    pub fn props(mut self, props: Props) -> ConnectOpts {
        self.props = props;
        self
    }
    pub fn keep_alive(mut self, secs: u16) -> ConnectOpts {
        self.keep_alive = secs;
        self
    }
    pub fn login(mut self, user: &str, password: &str) -> ConnectOpts {
        self.username = Some(user.into());
        self.password = Some(password.as_bytes().to_vec());
        self
    }
    pub fn will(mut self, will: WillOpts) -> ConnectOpts {
        self.will = Some(will);
        self
    }
    pub fn bytes(&self) -> Vec<u8> {
        connect_packet(self)
    }
}

pub fn connect_packet(o: &ConnectOpts) -> Vec<u8> {
    let mut b = Vec::new();
    put_str(&mut b, "MQTT");
    b.push(if o.v5 { 5 } else { 4 });
    let mut flags = 0u8;
    if o.clean {
        flags |= 0x02;
    }
    if o.username.is_some() {
        flags |= 0x80;
    }
    if o.password.is_some() {
        flags |= 0x40;
    }
    if let Some(w) = &o.will {
        flags |= 0x04 | (w.qos << 3);
        if w.retain {
            flags |= 0x20;
        }
    }
    b.push(flags);
    b.extend_from_slice(&o.keep_alive.to_be_bytes());
    if o.v5 {
        o.props.encode(&mut b);
    }
    put_str(&mut b, &o.client_id);
    if let Some(w) = &o.will {
        if o.v5 {
            w.props.encode(&mut b);
        }
        put_str(&mut b, &w.topic);
        put_bin(&mut b, &w.payload);
    }
    if let Some(u) = &o.username {
        put_str(&mut b, u);
    }
    if let Some(p) = &o.password {
        put_bin(&mut b, p);
    }
    packet(0x10, &b)
}

/// A PUBLISH. `pid` is written for QoS > 0 only; `props` only for v5.
#[allow(clippy::too_many_arguments)]
pub fn publish_packet(
    v5: bool,
    topic: &str,
    qos: u8,
    retain: bool,
    dup: bool,
    pid: u16,
    props: &Props,
    payload: &[u8],
) -> Vec<u8> {
    let mut first = 0x30 | (qos << 1);
    if retain {
        first |= 0x01;
    }
    if dup {
        first |= 0x08;
    }
    let mut b = Vec::new();
    put_str(&mut b, topic);
    if qos > 0 {
        b.extend_from_slice(&pid.to_be_bytes());
    }
    if v5 {
        props.encode(&mut b);
    }
    b.extend_from_slice(payload);
    packet(first, &b)
}

/// A SUBSCRIBE of `filters` (filter, options byte: QoS in bits 0-1, v5 No Local 0x04,
/// Retain As Published 0x08, Retain Handling in bits 4-5).
pub fn subscribe_packet(v5: bool, pid: u16, filters: &[(&str, u8)], props: &Props) -> Vec<u8> {
    let mut b = pid.to_be_bytes().to_vec();
    if v5 {
        props.encode(&mut b);
    }
    for (f, opts) in filters {
        put_str(&mut b, f);
        b.push(*opts);
    }
    packet(0x82, &b)
}

pub fn unsubscribe_packet(v5: bool, pid: u16, filters: &[&str]) -> Vec<u8> {
    let mut b = pid.to_be_bytes().to_vec();
    if v5 {
        b.push(0);
    }
    for f in filters {
        put_str(&mut b, f);
    }
    packet(0xA2, &b)
}

/// PUBACK / PUBREC / PUBREL / PUBCOMP with reason Success (the same bytes in v3 and v5).
pub fn ack_packet(kind: u8, pid: u16) -> Vec<u8> {
    let first = (kind << 4) | if kind == PUBREL { 0x02 } else { 0 };
    packet(first, &pid.to_be_bytes())
}

/// DISCONNECT: v3 (`None`) or v5 with a reason code.
pub fn disconnect_packet(reason: Option<u8>) -> Vec<u8> {
    match reason {
        None => vec![0xE0, 0],
        Some(r) => vec![0xE0, 2, r, 0],
    }
}

pub fn pingreq_packet() -> Vec<u8> {
    vec![0xC0, 0]
}

// ---------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------

/// One decoded v5 property value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PropVal {
    Byte(u8),
    U16(u16),
    U32(u32),
    Var(u32),
    Str(String),
    Bin(Vec<u8>),
    Pair(String, String),
}

/// Decoded v5 properties, in wire order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PropList(pub Vec<(u8, PropVal)>);

impl PropList {
    pub fn get(&self, id: u8) -> Option<&PropVal> {
        self.0.iter().find(|(i, _)| *i == id).map(|(_, v)| v)
    }
    pub fn all(&self, id: u8) -> Vec<&PropVal> {
        self.0
            .iter()
            .filter(|(i, _)| *i == id)
            .map(|(_, v)| v)
            .collect()
    }
    pub fn byte(&self, id: u8) -> Option<u8> {
        match self.get(id) {
            Some(PropVal::Byte(b)) => Some(*b),
            _ => None,
        }
    }
    pub fn u16(&self, id: u8) -> Option<u16> {
        match self.get(id) {
            Some(PropVal::U16(b)) => Some(*b),
            _ => None,
        }
    }
    pub fn u32(&self, id: u8) -> Option<u32> {
        match self.get(id) {
            Some(PropVal::U32(b)) => Some(*b),
            _ => None,
        }
    }
    pub fn str(&self, id: u8) -> Option<&str> {
        match self.get(id) {
            Some(PropVal::Str(s)) => Some(s),
            _ => None,
        }
    }
    pub fn bin(&self, id: u8) -> Option<&[u8]> {
        match self.get(id) {
            Some(PropVal::Bin(s)) => Some(s),
            _ => None,
        }
    }
    pub fn varints(&self, id: u8) -> Vec<u32> {
        self.all(id)
            .into_iter()
            .filter_map(|v| match v {
                PropVal::Var(n) => Some(*n),
                _ => None,
            })
            .collect()
    }
    pub fn pairs(&self) -> Vec<(String, String)> {
        self.all(P_USER_PROPERTY)
            .into_iter()
            .filter_map(|v| match v {
                PropVal::Pair(k, v) => Some((k.clone(), v.clone())),
                _ => None,
            })
            .collect()
    }
}

/// A cursor over a packet body.
pub struct Cur<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cur<'a> {
    pub fn new(b: &'a [u8]) -> Cur<'a> {
        Cur { b, pos: 0 }
    }
    pub fn left(&self) -> usize {
        self.b.len() - self.pos
    }
    pub fn u8(&mut self) -> u8 {
        let v = self.b[self.pos];
        self.pos += 1;
        v
    }
    pub fn u16(&mut self) -> u16 {
        let v = u16::from_be_bytes([self.b[self.pos], self.b[self.pos + 1]]);
        self.pos += 2;
        v
    }
    pub fn u32(&mut self) -> u32 {
        let v = u32::from_be_bytes(self.b[self.pos..self.pos + 4].try_into().unwrap());
        self.pos += 4;
        v
    }
    pub fn varint(&mut self) -> u32 {
        let mut n = 0u32;
        let mut mul = 1u32;
        loop {
            let b = self.u8();
            n += (b & 0x7f) as u32 * mul;
            if b & 0x80 == 0 {
                return n;
            }
            mul *= 128;
        }
    }
    pub fn bin(&mut self) -> Vec<u8> {
        let n = self.u16() as usize;
        let v = self.b[self.pos..self.pos + n].to_vec();
        self.pos += n;
        v
    }
    pub fn str(&mut self) -> String {
        String::from_utf8(self.bin()).expect("server sent a non-UTF-8 string")
    }
    pub fn rest(&mut self) -> Vec<u8> {
        let v = self.b[self.pos..].to_vec();
        self.pos = self.b.len();
        v
    }
    pub fn props(&mut self) -> PropList {
        let len = self.varint() as usize;
        let end = self.pos + len;
        let mut out = Vec::new();
        while self.pos < end {
            let id = self.u8();
            let v = match id {
                0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => PropVal::Byte(self.u8()),
                0x13 | 0x21 | 0x22 | 0x23 => PropVal::U16(self.u16()),
                0x02 | 0x11 | 0x18 | 0x27 => PropVal::U32(self.u32()),
                0x0B => PropVal::Var(self.varint()),
                0x03 | 0x08 | 0x12 | 0x15 | 0x1A | 0x1C | 0x1F => PropVal::Str(self.str()),
                0x09 | 0x16 => PropVal::Bin(self.bin()),
                0x26 => {
                    let k = self.str();
                    PropVal::Pair(k, self.str())
                }
                other => panic!("server sent unknown property id {other:#04x}"),
            };
            out.push((id, v));
        }
        assert_eq!(self.pos, end, "property length mismatch");
        PropList(out)
    }
}

/// A decoded CONNACK.
#[derive(Clone, Debug)]
pub struct ConnAckPkt {
    pub session_present: bool,
    pub code: u8,
    pub props: PropList,
}

pub fn parse_connack(p: &Pkt, v5: bool) -> ConnAckPkt {
    assert_eq!(p.kind(), CONNACK, "expected CONNACK, got {p:?}");
    let mut c = Cur::new(&p.body);
    let flags = c.u8();
    let code = c.u8();
    let props = if v5 && c.left() > 0 {
        c.props()
    } else {
        PropList::default()
    };
    ConnAckPkt {
        session_present: flags & 1 == 1,
        code,
        props,
    }
}

/// A decoded PUBLISH.
#[derive(Clone, Debug)]
pub struct PublishPkt {
    pub topic: String,
    pub qos: u8,
    pub dup: bool,
    pub retain: bool,
    pub pid: u16,
    pub props: PropList,
    pub payload: Vec<u8>,
}

pub fn parse_publish(p: &Pkt, v5: bool) -> PublishPkt {
    assert_eq!(p.kind(), PUBLISH, "expected PUBLISH, got {p:?}");
    let mut c = Cur::new(&p.body);
    let qos = (p.first >> 1) & 3;
    let topic = c.str();
    let pid = if qos > 0 { c.u16() } else { 0 };
    let props = if v5 { c.props() } else { PropList::default() };
    PublishPkt {
        topic,
        qos,
        dup: p.first & 0x08 != 0,
        retain: p.first & 0x01 != 0,
        pid,
        props,
        payload: c.rest(),
    }
}

/// SUBACK / UNSUBACK: packet id and the reason codes (v3 UNSUBACK has none).
pub fn parse_sub_ack(p: &Pkt, v5: bool) -> (u16, Vec<u8>) {
    let mut c = Cur::new(&p.body);
    let pid = c.u16();
    if v5 {
        c.props();
    }
    (pid, c.rest())
}

/// PUBACK / PUBREC / PUBREL / PUBCOMP: packet id and reason (0 when absent).
pub fn parse_ack(p: &Pkt) -> (u16, u8) {
    let mut c = Cur::new(&p.body);
    let pid = c.u16();
    let reason = if c.left() > 0 { c.u8() } else { 0 };
    (pid, reason)
}

/// A v5 DISCONNECT's reason code (0 when absent).
pub fn disconnect_reason(p: &Pkt) -> u8 {
    assert_eq!(p.kind(), DISCONNECT, "expected DISCONNECT, got {p:?}");
    p.body.first().copied().unwrap_or(0)
}

// ---------------------------------------------------------------------------------
// The raw client
// ---------------------------------------------------------------------------------

/// A byte-level MQTT client.
pub struct Raw {
    pub stream: TcpStream,
    buf: Vec<u8>,
    /// Packets read while looking for another kind, returned first by [`Raw::recv`].
    pending: VecDeque<Pkt>,
    closed: bool,
    pub v5: bool,
}

impl Raw {
    pub async fn open(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).await.expect("connect to the node");
        stream.set_nodelay(true).unwrap();
        Raw::from_stream(stream)
    }

    /// A raw client over a stream connected elsewhere (for instance with socket
    /// options that must be set before connecting).
    pub fn from_stream(stream: TcpStream) -> Raw {
        Raw {
            stream,
            buf: Vec::new(),
            pending: VecDeque::new(),
            closed: false,
            v5: false,
        }
    }

    /// Open, send `opts`' CONNECT and wait for the CONNACK (whatever its code).
    pub async fn connect(addr: SocketAddr, opts: &ConnectOpts) -> (Raw, ConnAckPkt) {
        let mut raw = Raw::open(addr).await;
        raw.v5 = opts.v5;
        raw.send(&opts.bytes()).await;
        let p = raw.expect(CONNACK).await;
        let ack = parse_connack(&p, opts.v5);
        (raw, ack)
    }

    /// [`Raw::connect`] and assert the CONNACK is a success.
    pub async fn connect_ok(addr: SocketAddr, opts: &ConnectOpts) -> (Raw, ConnAckPkt) {
        let (raw, ack) = Raw::connect(addr, opts).await;
        assert_eq!(ack.code, 0, "CONNACK refused: {ack:?}");
        (raw, ack)
    }

    /// Write bytes; errors (a connection the server already closed) are ignored.
    pub async fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// Try to parse one packet out of the buffer.
    fn parse_buffered(&mut self) -> Option<Pkt> {
        if self.buf.len() < 2 {
            return None;
        }
        let mut len = 0usize;
        let mut mul = 1usize;
        let mut i = 1;
        loop {
            let b = *self.buf.get(i)?;
            len += (b & 0x7f) as usize * mul;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
            mul *= 128;
            assert!(i <= 4, "server sent a malformed remaining length");
        }
        if self.buf.len() < i + len {
            return None;
        }
        let p = Pkt {
            first: self.buf[0],
            body: self.buf[i..i + len].to_vec(),
        };
        self.buf.drain(..i + len);
        Some(p)
    }

    /// Read one packet from the socket (not the pending queue).
    async fn read_packet(&mut self, wait: Duration) -> Recv {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(p) = self.parse_buffered() {
                return Recv::Packet(p);
            }
            if self.closed {
                return Recv::Closed;
            }
            let mut tmp = [0u8; 8192];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut tmp)).await {
                Err(_) => return Recv::Timeout,
                Ok(Ok(0)) | Ok(Err(_)) => self.closed = true,
                Ok(Ok(n)) => self.buf.extend_from_slice(&tmp[..n]),
            }
        }
    }

    /// The next packet, whatever it is.
    pub async fn recv(&mut self, wait: Duration) -> Recv {
        if let Some(p) = self.pending.pop_front() {
            return Recv::Packet(p);
        }
        self.read_packet(wait).await
    }

    /// The next packet of `kind`, keeping the others for later [`Raw::recv`]s;
    /// `None` on timeout or close.
    pub async fn try_expect(&mut self, kind: u8, wait: Duration) -> Option<Pkt> {
        if let Some(i) = self.pending.iter().position(|p| p.kind() == kind) {
            return self.pending.remove(i);
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read_packet(left).await {
                Recv::Packet(p) if p.kind() == kind => return Some(p),
                Recv::Packet(p) => self.pending.push_back(p),
                Recv::Closed | Recv::Timeout => return None,
            }
        }
    }

    /// The next packet of `kind`; panics after [`WAIT`] or on close.
    pub async fn expect(&mut self, kind: u8) -> Pkt {
        match self.try_expect(kind, WAIT).await {
            Some(p) => p,
            None => panic!(
                "no packet of type {kind} within {WAIT:?} (closed: {}, pending: {:?})",
                self.closed, self.pending
            ),
        }
    }

    /// The next PUBLISH, decoded; panics after [`WAIT`].
    pub async fn expect_publish(&mut self) -> PublishPkt {
        let p = self.expect(PUBLISH).await;
        parse_publish(&p, self.v5)
    }

    /// The next PUBLISH within `wait`, if any.
    pub async fn try_publish(&mut self, wait: Duration) -> Option<PublishPkt> {
        let v5 = self.v5;
        self.try_expect(PUBLISH, wait)
            .await
            .map(|p| parse_publish(&p, v5))
    }

    /// Wait until the server closes the connection; returns the packets it sent
    /// before closing (e.g. a v5 DISCONNECT), or `None` if it is still open after
    /// `wait`.
    pub async fn closed_within(&mut self, wait: Duration) -> Option<Vec<Pkt>> {
        let mut seen: Vec<Pkt> = self.pending.drain(..).collect();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read_packet(left).await {
                Recv::Packet(p) => seen.push(p),
                Recv::Closed => return Some(seen),
                Recv::Timeout => {
                    self.pending.extend(seen);
                    return None;
                }
            }
        }
    }

    /// Assert the server closes the connection within [`WAIT`]; returns the v5
    /// DISCONNECT reason it sent first, if it sent one.
    pub async fn expect_closed(&mut self) -> Option<u8> {
        let seen = self
            .closed_within(WAIT)
            .await
            .unwrap_or_else(|| panic!("server did not close the connection within {WAIT:?}"));
        seen.iter()
            .rev()
            .find(|p| p.kind() == DISCONNECT)
            .map(disconnect_reason)
    }

    /// Whether the connection is still open: a PINGREQ is answered by a PINGRESP.
    pub async fn is_alive(&mut self) -> bool {
        self.send(&pingreq_packet()).await;
        self.try_expect(PINGRESP, WAIT).await.is_some()
    }

    /// SUBSCRIBE and wait for the SUBACK; returns its reason codes.
    pub async fn subscribe(&mut self, pid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
        self.subscribe_props(pid, filters, &Props::new()).await
    }

    pub async fn subscribe_props(
        &mut self,
        pid: u16,
        filters: &[(&str, u8)],
        props: &Props,
    ) -> Vec<u8> {
        let v5 = self.v5;
        self.send(&subscribe_packet(v5, pid, filters, props)).await;
        let p = self.expect(SUBACK).await;
        let (got, codes) = parse_sub_ack(&p, v5);
        assert_eq!(got, pid, "SUBACK packet id");
        codes
    }

    pub async fn unsubscribe(&mut self, pid: u16, filters: &[&str]) -> Vec<u8> {
        let v5 = self.v5;
        self.send(&unsubscribe_packet(v5, pid, filters)).await;
        let p = self.expect(UNSUBACK).await;
        let (got, codes) = parse_sub_ack(&p, v5);
        assert_eq!(got, pid, "UNSUBACK packet id");
        codes
    }

    /// PUBLISH with full QoS flow completion (waits for PUBACK, or PUBREC then sends
    /// PUBREL and waits for PUBCOMP).
    pub async fn publish(&mut self, topic: &str, qos: u8, retain: bool, pid: u16, payload: &[u8]) {
        self.publish_props(topic, qos, retain, pid, &Props::new(), payload)
            .await
    }

    pub async fn publish_props(
        &mut self,
        topic: &str,
        qos: u8,
        retain: bool,
        pid: u16,
        props: &Props,
        payload: &[u8],
    ) {
        let v5 = self.v5;
        self.send(&publish_packet(
            v5, topic, qos, retain, false, pid, props, payload,
        ))
        .await;
        match qos {
            0 => {}
            1 => {
                let (got, reason) = parse_ack(&self.expect(PUBACK).await);
                assert_eq!(got, pid, "PUBACK packet id");
                assert!(reason == 0 || reason == 0x10, "PUBACK reason {reason:#x}");
            }
            _ => {
                let (got, reason) = parse_ack(&self.expect(PUBREC).await);
                assert_eq!(got, pid, "PUBREC packet id");
                assert!(reason == 0 || reason == 0x10, "PUBREC reason {reason:#x}");
                self.send(&ack_packet(PUBREL, pid)).await;
                let (got, reason) = parse_ack(&self.expect(PUBCOMP).await);
                assert_eq!((got, reason), (pid, 0), "PUBCOMP");
            }
        }
    }

    /// Acknowledge a received PUBLISH according to its QoS (QoS 2: PUBREC, wait for
    /// PUBREL, PUBCOMP).
    pub async fn ack(&mut self, p: &PublishPkt) {
        match p.qos {
            0 => {}
            1 => self.send(&ack_packet(PUBACK, p.pid)).await,
            _ => {
                self.send(&ack_packet(PUBREC, p.pid)).await;
                let (got, _) = parse_ack(&self.expect(PUBREL).await);
                assert_eq!(got, p.pid, "PUBREL packet id");
                self.send(&ack_packet(PUBCOMP, p.pid)).await;
            }
        }
    }

    /// Receive PUBLISHes (acking them) until `wait` passes without one.
    pub async fn drain_publishes(&mut self, wait: Duration) -> Vec<PublishPkt> {
        let mut out = Vec::new();
        while let Some(p) = self.try_publish(wait).await {
            self.ack(&p).await;
            out.push(p);
        }
        out
    }

    /// Send a normal DISCONNECT and wait for the server to close.
    pub async fn disconnect(mut self) {
        let d = if self.v5 {
            disconnect_packet(Some(0))
        } else {
            disconnect_packet(None)
        };
        self.send(&d).await;
        let _ = self.closed_within(WAIT).await;
    }
}

// ---------------------------------------------------------------------------------
// rumqttc wrappers
// ---------------------------------------------------------------------------------

/// A rumqttc v4 (MQTT 3.1.1) client whose event loop runs on a task.
pub struct V4 {
    pub client: rumqttc::AsyncClient,
    pub rx: mpsc::UnboundedReceiver<Result<rumqttc::Packet, String>>,
    task: JoinHandle<()>,
}

impl Drop for V4 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn v4_options(addr: SocketAddr, id: &str, clean: bool) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(10));
    o.set_clean_session(clean);
    o.set_max_packet_size(2 * 1024 * 1024, 2 * 1024 * 1024);
    o
}

impl V4 {
    /// Connect and wait for the CONNACK; returns the client and its session_present.
    pub async fn connect(addr: SocketAddr, id: &str, clean: bool) -> (V4, bool) {
        V4::connect_with(v4_options(addr, id, clean)).await
    }

    pub async fn connect_with(opts: rumqttc::MqttOptions) -> (V4, bool) {
        let (client, mut events) = rumqttc::AsyncClient::new(opts, 1000);
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(rumqttc::Event::Incoming(p)) => {
                        if tx.send(Ok(p)).is_err() {
                            return;
                        }
                    }
                    Ok(rumqttc::Event::Outgoing(_)) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                }
            }
        });
        let mut c = V4 { client, rx, task };
        let present = c
            .wait(|p| match p {
                rumqttc::Packet::ConnAck(a) => {
                    assert_eq!(a.code, rumqttc::ConnectReturnCode::Success, "CONNACK");
                    Some(a.session_present)
                }
                _ => None,
            })
            .await;
        (c, present)
    }

    /// Wait until `want` accepts an incoming packet; panics after [`WAIT`].
    pub async fn wait<T>(&mut self, want: impl FnMut(&rumqttc::Packet) -> Option<T>) -> T {
        self.try_wait(WAIT, want)
            .await
            .unwrap_or_else(|| panic!("v4 client: timed out waiting for a packet"))
    }

    pub async fn try_wait<T>(
        &mut self,
        wait: Duration,
        mut want: impl FnMut(&rumqttc::Packet) -> Option<T>,
    ) -> Option<T> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Err(_) => return None,
                Ok(None) => panic!("v4 client: event loop ended"),
                Ok(Some(Err(e))) => panic!("v4 client: {e}"),
                Ok(Some(Ok(p))) => {
                    if let Some(t) = want(&p) {
                        return Some(t);
                    }
                }
            }
        }
    }

    pub async fn subscribe(
        &mut self,
        filter: &str,
        qos: rumqttc::QoS,
    ) -> Vec<rumqttc::SubscribeReasonCode> {
        self.client.subscribe(filter, qos).await.unwrap();
        self.wait(|p| match p {
            rumqttc::Packet::SubAck(a) => Some(a.return_codes.clone()),
            _ => None,
        })
        .await
    }

    /// Publish and, for QoS 1/2, wait for the PUBACK / PUBCOMP.
    pub async fn publish(&mut self, topic: &str, qos: rumqttc::QoS, retain: bool, payload: &[u8]) {
        self.client
            .publish(topic, qos, retain, payload.to_vec())
            .await
            .unwrap();
        match qos {
            rumqttc::QoS::AtMostOnce => {}
            rumqttc::QoS::AtLeastOnce => {
                self.wait(|p| matches!(p, rumqttc::Packet::PubAck(_)).then_some(()))
                    .await
            }
            rumqttc::QoS::ExactlyOnce => {
                self.wait(|p| matches!(p, rumqttc::Packet::PubComp(_)).then_some(()))
                    .await
            }
        }
    }

    pub async fn next_publish(&mut self) -> rumqttc::Publish {
        self.wait(|p| match p {
            rumqttc::Packet::Publish(p) => Some(p.clone()),
            _ => None,
        })
        .await
    }

    pub async fn try_publish(&mut self, wait: Duration) -> Option<rumqttc::Publish> {
        self.try_wait(wait, |p| match p {
            rumqttc::Packet::Publish(p) => Some(p.clone()),
            _ => None,
        })
        .await
    }

    /// Disconnect normally and give the DISCONNECT time to go out.
    pub async fn disconnect(self) {
        let _ = self.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// rumqttc's v5 packet types, and its QoS.
pub mod m5 {
    pub use rumqttc::v5::mqttbytes::v5::*;
    pub use rumqttc::v5::mqttbytes::QoS;
}

/// A rumqttc v5 client whose event loop runs on a task.
pub struct V5 {
    pub client: rumqttc::v5::AsyncClient,
    pub rx: mpsc::UnboundedReceiver<Result<m5::Packet, String>>,
    task: JoinHandle<()>,
}

impl Drop for V5 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn v5_options(addr: SocketAddr, id: &str, clean: bool) -> rumqttc::v5::MqttOptions {
    let mut o = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(10));
    o.set_clean_start(clean);
    o
}

impl V5 {
    /// Connect and wait for the CONNACK; returns the client and the CONNACK.
    pub async fn connect(addr: SocketAddr, id: &str, clean: bool) -> (V5, m5::ConnAck) {
        V5::connect_with(v5_options(addr, id, clean)).await
    }

    pub async fn connect_with(opts: rumqttc::v5::MqttOptions) -> (V5, m5::ConnAck) {
        let (client, mut events) = rumqttc::v5::AsyncClient::new(opts, 1000);
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(rumqttc::v5::Event::Incoming(p)) => {
                        if tx.send(Ok(p)).is_err() {
                            return;
                        }
                    }
                    Ok(rumqttc::v5::Event::Outgoing(_)) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                }
            }
        });
        let mut c = V5 { client, rx, task };
        let ack = c
            .wait(|p| match p {
                m5::Packet::ConnAck(a) => Some(a.clone()),
                _ => None,
            })
            .await;
        assert_eq!(ack.code, m5::ConnectReturnCode::Success, "CONNACK");
        (c, ack)
    }

    pub async fn wait<T>(&mut self, want: impl FnMut(&m5::Packet) -> Option<T>) -> T {
        self.try_wait(WAIT, want)
            .await
            .unwrap_or_else(|| panic!("v5 client: timed out waiting for a packet"))
    }

    pub async fn try_wait<T>(
        &mut self,
        wait: Duration,
        mut want: impl FnMut(&m5::Packet) -> Option<T>,
    ) -> Option<T> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Err(_) => return None,
                Ok(None) => panic!("v5 client: event loop ended"),
                Ok(Some(Err(e))) => panic!("v5 client: {e}"),
                Ok(Some(Ok(p))) => {
                    if let Some(t) = want(&p) {
                        return Some(t);
                    }
                }
            }
        }
    }

    pub async fn subscribe(&mut self, filter: m5::Filter) -> Vec<m5::SubscribeReasonCode> {
        self.client
            .subscribe_many(std::iter::once(filter))
            .await
            .unwrap();
        self.wait(|p| match p {
            m5::Packet::SubAck(a) => Some(a.return_codes.clone()),
            _ => None,
        })
        .await
    }

    pub async fn publish(
        &mut self,
        topic: &str,
        qos: m5::QoS,
        retain: bool,
        props: Option<m5::PublishProperties>,
        payload: &[u8],
    ) {
        match props {
            Some(props) => self
                .client
                .publish_with_properties(topic, qos, retain, payload.to_vec(), props)
                .await
                .unwrap(),
            None => self
                .client
                .publish(topic, qos, retain, payload.to_vec())
                .await
                .unwrap(),
        }
        match qos {
            m5::QoS::AtMostOnce => {}
            m5::QoS::AtLeastOnce => {
                self.wait(|p| matches!(p, m5::Packet::PubAck(..)).then_some(()))
                    .await
            }
            m5::QoS::ExactlyOnce => {
                self.wait(|p| matches!(p, m5::Packet::PubComp(..)).then_some(()))
                    .await
            }
        }
    }

    pub async fn next_publish(&mut self) -> m5::Publish {
        self.wait(|p| match p {
            m5::Packet::Publish(p) => Some(p.clone()),
            _ => None,
        })
        .await
    }

    pub async fn try_publish(&mut self, wait: Duration) -> Option<m5::Publish> {
        self.try_wait(wait, |p| match p {
            m5::Packet::Publish(p) => Some(p.clone()),
            _ => None,
        })
        .await
    }

    pub async fn disconnect(self) {
        let _ = self.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether the mosquitto command-line clients are installed; prints a note if not.
pub fn have_mosquitto() -> bool {
    let ok = ["mosquitto_pub", "mosquitto_sub"].iter().all(|b| {
        std::process::Command::new(b)
            .arg("--help")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok()
    });
    if !ok {
        eprintln!("note: mosquitto_pub/mosquitto_sub not installed; skipping this test");
    }
    ok
}
