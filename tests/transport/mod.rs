//! Shared helpers of the transport tests (`tests/transport_*.rs`):
//!
//! * [`Certs`]: a test-only CA, a server certificate for 127.0.0.1/localhost and a
//!   client certificate (CN `device-42`), made with rcgen at test time and written as
//!   PEM files into a temp dir (no private key is committed);
//! * [`start`]: a [`TestNode`] with the WebSocket listener and, given certificates,
//!   the TLS and WSS listeners;
//! * [`Via`] and [`Client`]: rumqttc (an independent MQTT client) over TCP, WebSocket,
//!   TLS or WSS, with its event loop on a task forwarding incoming packets;
//! * raw WebSocket helpers ([`ws_connect`], [`connect_packet`], ...) for the tests
//!   that need to control frames byte by byte.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use actimq::testing::TestNode;
use actimq::Config;
use rumqttc::{
    AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, Publish, QoS, TlsConfiguration,
    Transport,
};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::WebSocketStream;

/// How long a test waits for something it expects.
pub const WAIT: Duration = Duration::from_secs(10);
/// How long a test waits to be confident that something does *not* come.
pub const QUIET: Duration = Duration::from_millis(500);

/// Test-only certificates, as PEM files in a temp dir.
pub struct Certs {
    _dir: tempfile::TempDir,
    /// The CA that signed both certificates (also the client CA for mutual TLS).
    pub ca_file: PathBuf,
    pub ca_pem: Vec<u8>,
    /// The server certificate (SAN 127.0.0.1 and localhost) and its key.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// A client certificate with CN `device-42`, and its key.
    pub client_cert_pem: Vec<u8>,
    pub client_key_pem: Vec<u8>,
    /// The DER of the client certificate (to check CN parsing).
    pub client_cert_der: Vec<u8>,
}

impl Certs {
    /// Make a fresh CA, server and client certificate.
    pub fn generate() -> Certs {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "actimq TEST-ONLY CA");
        let ca = ca_params.self_signed(&ca_key).expect("CA cert");

        let server_key = KeyPair::generate().expect("server key");
        let mut server_params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .expect("server params");
        server_params
            .distinguished_name
            .push(DnType::CommonName, "actimq test server");
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server = server_params
            .signed_by(&server_key, &ca, &ca_key)
            .expect("server cert");

        let client_key = KeyPair::generate().expect("client key");
        let mut client_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        client_params
            .distinguished_name
            .push(DnType::CommonName, "device-42");
        client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client = client_params
            .signed_by(&client_key, &ca, &ca_key)
            .expect("client cert");

        let write = |name: &str, pem: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).expect("write PEM");
            path
        };
        Certs {
            ca_file: write("ca.crt", &ca.pem()),
            ca_pem: ca.pem().into_bytes(),
            cert_file: write("server.crt", &server.pem()),
            key_file: write("server.key", &server_key.serialize_pem()),
            client_cert_pem: client.pem().into_bytes(),
            client_key_pem: client_key.serialize_pem().into_bytes(),
            client_cert_der: client.der().to_vec(),
            _dir: dir,
        }
    }

    /// rumqttc's TLS settings: trust our CA; present the client certificate if asked.
    pub fn client_tls(&self, with_client_cert: bool) -> TlsConfiguration {
        TlsConfiguration::Simple {
            ca: self.ca_pem.clone(),
            alpn: None,
            client_auth: with_client_cert
                .then(|| (self.client_cert_pem.clone(), self.client_key_pem.clone())),
        }
    }

    /// Turn on the TLS and WSS listeners with these files (`mtls`: also require client
    /// certificates from our CA, with cn_as_username).
    pub fn enable(&self, c: &mut Config, mtls: bool) {
        let ca = mtls.then(|| self.ca_file.clone());
        c.listener.tls.enabled = true;
        c.listener.tls.cert_file = Some(self.cert_file.clone());
        c.listener.tls.key_file = Some(self.key_file.clone());
        c.listener.tls.ca_file = ca.clone();
        c.listener.tls.cn_as_username = mtls;
        c.listener.wss.enabled = true;
        c.listener.wss.cert_file = Some(self.cert_file.clone());
        c.listener.wss.key_file = Some(self.key_file.clone());
        c.listener.wss.ca_file = ca;
        c.listener.wss.cn_as_username = mtls;
    }
}

/// Start a node on `dir` (every listener on 127.0.0.1:0); with `certs`, TLS and WSS
/// are on too.
pub fn start(dir: &Path, certs: Option<&Certs>, tweak: impl FnOnce(&mut Config)) -> TestNode {
    TestNode::start(dir, |c| {
        if let Some(certs) = certs {
            certs.enable(c, false);
        }
        tweak(c);
    })
}

/// A transport for rumqttc, with what it needs.
#[derive(Clone)]
pub enum Via {
    Tcp(SocketAddr),
    Ws(SocketAddr),
    Tls(SocketAddr, TlsConfiguration),
    Wss(SocketAddr, TlsConfiguration),
}

impl Via {
    pub fn name(&self) -> &'static str {
        match self {
            Via::Tcp(_) => "tcp",
            Via::Ws(_) => "ws",
            Via::Tls(..) => "tls",
            Via::Wss(..) => "wss",
        }
    }

    /// MQTT 3.1.1 options for client `id` over this transport.
    pub fn options(&self, id: &str) -> MqttOptions {
        let mut o = match self {
            Via::Tcp(a) | Via::Tls(a, _) => MqttOptions::new(id, a.ip().to_string(), a.port()),
            Via::Ws(a) => MqttOptions::new(id, format!("ws://{a}/mqtt"), a.port()),
            Via::Wss(a, _) => MqttOptions::new(id, format!("wss://{a}/mqtt"), a.port()),
        };
        match self {
            Via::Tcp(_) => {}
            Via::Ws(_) => {
                o.set_transport(Transport::Ws);
            }
            Via::Tls(_, tls) => {
                o.set_transport(Transport::Tls(tls.clone()));
            }
            Via::Wss(_, tls) => {
                o.set_transport(Transport::Wss(tls.clone()));
            }
        }
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(1 << 20, 1 << 20);
        o
    }
}

/// A rumqttc client whose event loop runs on a task; incoming packets arrive on `rx`.
pub struct Client {
    pub client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Result<Packet, String>>,
    task: JoinHandle<()>,
}

fn spawn_loop(
    mut el: EventLoop,
) -> (
    mpsc::UnboundedReceiver<Result<Packet, String>>,
    JoinHandle<()>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(p)) => {
                    if tx.send(Ok(p)).is_err() {
                        return;
                    }
                }
                Ok(Event::Outgoing(_)) => {}
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            }
        }
    });
    (rx, task)
}

impl Client {
    /// Connect with `opts`; panics unless CONNACK arrives in time.
    pub async fn connect(opts: MqttOptions) -> Client {
        match Client::try_connect(opts).await {
            Ok(c) => c,
            Err(e) => panic!("connect failed: {e}"),
        }
    }

    /// Connect with `opts`; the error if the connection fails.
    pub async fn try_connect(opts: MqttOptions) -> Result<Client, String> {
        let (client, el) = AsyncClient::new(opts, 100);
        let (rx, task) = spawn_loop(el);
        let mut c = Client { client, rx, task };
        match c.next().await {
            Some(Ok(Packet::ConnAck(_))) => Ok(c),
            Some(Ok(other)) => Err(format!("expected CONNACK, got {other:?}")),
            Some(Err(e)) => Err(e),
            None => Err("no CONNACK in time".into()),
        }
    }

    /// Connect client `id` over `via`, optionally with a will.
    pub async fn over(via: &Via, id: &str, will: Option<LastWill>) -> Client {
        let mut o = via.options(id);
        if let Some(w) = will {
            o.set_last_will(w);
        }
        Client::connect(o).await
    }

    /// The next incoming packet (or event-loop error), or `None` after [`WAIT`].
    pub async fn next(&mut self) -> Option<Result<Packet, String>> {
        tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// Subscribe and wait for SUBACK.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS) {
        self.client.subscribe(filter, qos).await.expect("subscribe");
        loop {
            match self.next().await {
                Some(Ok(Packet::SubAck(_))) => return,
                Some(Ok(_)) => continue,
                other => panic!("no SUBACK: {other:?}"),
            }
        }
    }

    /// Publish at QoS 1 and wait for PUBACK.
    pub async fn publish_acked(&mut self, topic: &str, payload: &[u8], retain: bool) {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload.to_vec())
            .await
            .expect("publish");
        loop {
            match self.next().await {
                Some(Ok(Packet::PubAck(_))) => return,
                Some(Ok(_)) => continue,
                other => panic!("no PUBACK: {other:?}"),
            }
        }
    }

    /// The next PUBLISH; panics if none arrives in time.
    pub async fn expect_publish(&mut self) -> Publish {
        loop {
            match self.next().await {
                Some(Ok(Packet::Publish(p))) => return p,
                Some(Ok(_)) => continue,
                other => panic!("no PUBLISH: {other:?}"),
            }
        }
    }

    /// Whether a PUBLISH arrives within [`QUIET`].
    pub async fn publish_within_quiet(&mut self) -> Option<Publish> {
        let deadline = tokio::time::Instant::now() + QUIET;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(Ok(Packet::Publish(p)))) => return Some(p),
                Ok(Some(Ok(_))) => continue,
                _ => return None,
            }
        }
    }

    /// Drop the connection without DISCONNECT (as a crashed device would): the event
    /// loop, and with it the socket, is dropped.
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }

    /// DISCONNECT cleanly.
    pub async fn disconnect(mut self) {
        let _ = self.client.disconnect().await;
        // Wait for the event loop to end (it does after sending DISCONNECT).
        let _ = tokio::time::timeout(WAIT, async { while self.rx.recv().await.is_some() {} }).await;
        self.task.abort();
    }
}

/// A QoS 1 publish from `publisher` reaches `subscriber` (both already connected).
pub async fn round_trip(
    publisher: &mut Client,
    subscriber: &mut Client,
    topic: &str,
    payload: &[u8],
) {
    publisher.publish_acked(topic, payload, false).await;
    let p = subscriber.expect_publish().await;
    assert_eq!(p.topic, topic);
    assert_eq!(&p.payload[..], payload);
}

// ---------------------------------------------------------------------------------
// Raw WebSocket
// ---------------------------------------------------------------------------------

/// A raw WebSocket client connection to `addr` at `path`, offering `subprotocol`.
pub async fn ws_connect(
    addr: SocketAddr,
    path: &str,
    subprotocol: Option<&str>,
) -> Result<
    (
        WebSocketStream<TcpStream>,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    tokio_tungstenite::tungstenite::Error,
> {
    let mut req = format!("ws://{addr}{path}")
        .into_client_request()
        .expect("request");
    if let Some(p) = subprotocol {
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_str(p).expect("header"),
        );
    }
    let tcp = TcpStream::connect(addr).await?;
    tokio_tungstenite::client_async(req, tcp).await
}

/// Encode an MQTT Remaining Length.
pub fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
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

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![first];
    remaining_length(body.len(), &mut p);
    p.extend_from_slice(body);
    p
}

fn string(s: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// MQTT 3.1.1 CONNECT, clean session, keep-alive 60.
pub fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut b = Vec::new();
    string("MQTT", &mut b);
    b.extend_from_slice(&[4, 0x02, 0, 60]);
    string(client_id, &mut b);
    packet(0x10, &b)
}

/// SUBSCRIBE (packet id `pid`) to `filter` at QoS 1.
pub fn subscribe_packet(pid: u16, filter: &str) -> Vec<u8> {
    let mut b = pid.to_be_bytes().to_vec();
    string(filter, &mut b);
    b.push(1);
    packet(0x82, &b)
}

/// PUBLISH at QoS 1 with packet id `pid`.
pub fn publish_packet(pid: u16, topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    string(topic, &mut b);
    b.extend_from_slice(&pid.to_be_bytes());
    b.extend_from_slice(payload);
    packet(0x32, &b)
}

/// Split complete MQTT packets off the front of `buf`: (first byte, body) each.
pub fn split_packets(buf: &mut Vec<u8>) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        if buf.len() < 2 {
            return out;
        }
        let mut len = 0usize;
        let mut shift = 0;
        let mut i = 1;
        loop {
            let Some(&b) = buf.get(i) else { return out };
            len |= ((b & 0x7f) as usize) << shift;
            shift += 7;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        if buf.len() < i + len {
            return out;
        }
        let body = buf[i..i + len].to_vec();
        out.push((buf[0], body));
        buf.drain(..i + len);
    }
}
