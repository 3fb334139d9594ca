//! A Rust client for the service protocol (README "Service protocol"): a [`Producer`]
//! that stores messages in a node's commitlog (routed to devices like an MQTT publish)
//! and a [`Consumer`] that reads a first-level topic as a member of a consumer group.
//!
//! Both are async (tokio) and reconnect when the connection is lost: the request that
//! failed is sent again once on the new connection (a producer may then store a
//! message twice: delivery is at least once), and a consumer re-joins its group and
//! resumes from the group's committed offsets. Every connection starts with a `Hello`
//! carrying the [`Credentials`] of the options (none for [`Producer::connect`] and
//! [`Consumer::connect`]); a refused login is [`ClientError::Server`] with
//! [`ErrorCode::BadCredentials`] (or `RateLimited`, `Unavailable`), and a message or
//! Join the ACL refuses is [`ErrorCode::NotAuthorized`].
//!
//! Connections are plain TCP unless the options carry [`TlsOptions`] (for a node whose
//! `[listener.service]` has a certificate): the client then trusts the given CA,
//! checks that the server's certificate names the given server name (a DNS name or an
//! IP address), and may present a client certificate (mutual TLS; with
//! `cn_as_username` its CN is the service's user name). TLS is rustls through
//! tokio-rustls, with the aws-lc-rs provider, TLS 1.2 and 1.3.
//!
//! ```no_run
//! # async fn demo(addr: std::net::SocketAddr) -> Result<(), actimq::client::ClientError> {
//! use actimq::client::{message, Consumer, ConsumerOptions, ProduceMessageExt, Producer};
//! use actimq::client::{Credentials, ProducerOptions, TlsOptions};
//! let mut p = Producer::connect(addr, "billing").await?;
//! p.send(message("home/room1/cmd", b"on".to_vec()).qos(1)).await?;
//! let mut c = Consumer::connect(addr, "analytics", "home").await?;
//! let batch = c.poll(100, std::time::Duration::from_secs(1)).await?;
//! c.commit(&batch).await?;
//! // On a node with `[auth] allow_anonymous = false`:
//! let login = Credentials::new("billing", "s3cret");
//! let opts = ProducerOptions::new("billing").credentials(login.clone());
//! let mut p = Producer::connect_with(addr, opts).await?;
//! let opts = ConsumerOptions::new("analytics", "home").credentials(login.clone());
//! let mut c = Consumer::connect_with(addr, opts).await?;
//! // Over TLS, trusting the CA in ca.crt, to a server certificate for 127.0.0.1:
//! let tls = TlsOptions::from_ca_file("ca.crt", "127.0.0.1")?;
//! let opts = ProducerOptions::new("billing").credentials(login).tls(tls);
//! let mut p = Producer::connect_with(addr, opts).await?;
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

use actimq_actors::service::protocol::{
    decode_body, encode_frame, Request, Response, HARD_MAX_FRAME,
};
pub use actimq_actors::service::protocol::{
    Delivered, ErrorCode, ProduceMessage, Props, SeekTo, StartAt, Target,
};

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection failed and could not be re-established.
    #[error("connection to {addr} failed: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The server refused the request.
    #[error("server error {code:?}: {message}")]
    Server { code: ErrorCode, message: String },
    /// The server answered something this client did not expect.
    #[error("unexpected answer: {0}")]
    Protocol(String),
    /// The TLS settings could not be built (a CA, certificate or key that does not
    /// load, a bad server name).
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// What a client logs in with (the `Hello`'s user name and password). The default is
/// none: an anonymous client, which a node admits only with `allow_anonymous`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
}

impl Credentials {
    /// A user name and its password.
    pub fn new(username: impl Into<String>, password: impl AsRef<[u8]>) -> Credentials {
        Credentials {
            username: Some(username.into()),
            password: Some(password.as_ref().to_vec()),
        }
    }
}

impl Credentials {
    /// From the environment: `ACTIMQ_USERNAME` and `ACTIMQ_PASSWORD` (each optional),
    /// as the examples and command-line tools take them, so that a password never
    /// appears in a process listing.
    pub fn from_env() -> Credentials {
        Credentials {
            username: std::env::var("ACTIMQ_USERNAME").ok(),
            password: std::env::var("ACTIMQ_PASSWORD")
                .ok()
                .map(String::into_bytes),
        }
    }
}

impl std::fmt::Debug for Credentials {
    // Never prints the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish()
    }
}

/// TLS for a service connection: the CA the server's certificate must chain to, the
/// name that certificate must carry, and optionally a client certificate (mutual TLS).
/// Cheap to clone (the rustls configuration is shared).
#[derive(Clone)]
pub struct TlsOptions {
    /// The CAs the server's certificate must chain to.
    roots: Arc<RootCertStore>,
    /// What the server's certificate must name (a DNS name or an IP address).
    server_name: ServerName<'static>,
    /// Whether `config` presents a client certificate.
    client_cert: bool,
    /// The rustls client configuration built from the above.
    config: Arc<ClientConfig>,
}

fn tls_error(what: &str, e: impl std::fmt::Display) -> ClientError {
    ClientError::Tls(format!("{what}: {e}"))
}

/// The certificates of PEM text; none is an error.
fn pem_certificates(what: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_error(what, e))?;
    if certs.is_empty() {
        return Err(tls_error(what, "holds no PEM CERTIFICATE block"));
    }
    Ok(certs)
}

fn read_file(what: &str, path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|e| tls_error(&format!("{what} {}", path.display()), e))
}

impl TlsOptions {
    /// Trust the CA certificates in `ca_pem` (PEM text) and expect a server certificate
    /// for `server_name`: a DNS name (`broker.example.com`) or an IP address
    /// (`127.0.0.1`), as in the certificate's subject alternative names.
    pub fn new(ca_pem: &[u8], server_name: &str) -> Result<TlsOptions, ClientError> {
        let mut roots = RootCertStore::empty();
        for ca in pem_certificates("CA", ca_pem)? {
            roots.add(ca).map_err(|e| tls_error("CA", e))?;
        }
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|e| tls_error(&format!("server name {server_name:?}"), e))?;
        let roots = Arc::new(roots);
        let config = Arc::new(client_config(roots.clone(), None)?);
        Ok(TlsOptions {
            roots,
            server_name,
            client_cert: false,
            config,
        })
    }

    /// [`TlsOptions::new`] with the CA certificates read from a PEM file.
    pub fn from_ca_file(
        ca_file: impl AsRef<Path>,
        server_name: &str,
    ) -> Result<TlsOptions, ClientError> {
        TlsOptions::new(&read_file("CA file", ca_file.as_ref())?, server_name)
    }

    /// Present the certificate chain `cert_pem` (leaf first) with its private key
    /// `key_pem` (PKCS#8, PKCS#1 or SEC1), for a listener with `ca_file`.
    pub fn client_cert(self, cert_pem: &[u8], key_pem: &[u8]) -> Result<TlsOptions, ClientError> {
        let chain = pem_certificates("client certificate", cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| tls_error("client key", e))?;
        let config = Arc::new(client_config(self.roots.clone(), Some((chain, key)))?);
        Ok(TlsOptions {
            client_cert: true,
            config,
            ..self
        })
    }

    /// [`TlsOptions::client_cert`] with both read from PEM files.
    pub fn client_cert_files(
        self,
        cert_file: impl AsRef<Path>,
        key_file: impl AsRef<Path>,
    ) -> Result<TlsOptions, ClientError> {
        let cert = read_file("client certificate file", cert_file.as_ref())?;
        let key = read_file("client key file", key_file.as_ref())?;
        self.client_cert(&cert, &key)
    }

    /// From the environment, as the examples take them: `ACTIMQ_CA_FILE` (unset or
    /// empty: `None`, plain TCP); `ACTIMQ_TLS_SERVER_NAME` (default
    /// `default_server_name`, e.g. the IP address connected to); and, for mutual TLS,
    /// `ACTIMQ_CERT_FILE` with `ACTIMQ_KEY_FILE` (one without the other is an error).
    pub fn from_env(default_server_name: &str) -> Result<Option<TlsOptions>, ClientError> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let Some(ca_file) = var("ACTIMQ_CA_FILE") else {
            return Ok(None);
        };
        let name = var("ACTIMQ_TLS_SERVER_NAME").unwrap_or_else(|| default_server_name.into());
        let tls = TlsOptions::from_ca_file(ca_file, &name)?;
        match (var("ACTIMQ_CERT_FILE"), var("ACTIMQ_KEY_FILE")) {
            (None, None) => Ok(Some(tls)),
            (Some(cert), Some(key)) => tls.client_cert_files(cert, key).map(Some),
            _ => Err(ClientError::Tls(
                "ACTIMQ_CERT_FILE and ACTIMQ_KEY_FILE go together".into(),
            )),
        }
    }

    /// The name the server's certificate must carry.
    pub fn server_name(&self) -> String {
        self.server_name.to_str().into_owned()
    }
}

impl std::fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsOptions")
            .field("server_name", &self.server_name)
            .field("client_cert", &self.client_cert)
            .finish_non_exhaustive()
    }
}

/// TLS 1.2 and 1.3 with the aws-lc-rs provider's safe defaults (the node's too),
/// trusting `roots`, presenting `client` if given.
fn client_config(
    roots: Arc<RootCertStore>,
    client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<ClientConfig, ClientError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error("protocol versions", e))?
        .with_root_certificates(roots);
    match client {
        None => Ok(builder.with_no_client_auth()),
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| tls_error("client certificate", e)),
    }
}

/// A message for `topic` (a first-level topic or a full MQTT topic) at QoS 0.
pub fn message(topic: impl Into<String>, payload: Vec<u8>) -> ProduceMessage {
    ProduceMessage {
        target: Target::Topic(topic.into()),
        key: None,
        payload,
        qos: 0,
        retain: false,
        props: Props::default(),
    }
}

/// A message for the one device with MQTT client id `client_id` (online, or a
/// persistent session that is offline), on its topic `$client/{client_id}/{topic}`:
/// the device subscribes to `$client/{its id}/#`.
pub fn message_to_client(
    client_id: impl Into<String>,
    topic: impl Into<String>,
    payload: Vec<u8>,
) -> ProduceMessage {
    ProduceMessage {
        target: Target::Client {
            client_id: client_id.into(),
            topic: topic.into(),
        },
        ..message("", payload)
    }
}

/// Builder-style setters for [`ProduceMessage`].
pub trait ProduceMessageExt {
    /// QoS devices receive it at (min with their subscription's QoS).
    fn qos(self, qos: u8) -> Self;
    /// Partition key (default: the producer's name).
    fn key(self, key: impl Into<String>) -> Self;
    /// Keep it as the topic's retained message.
    fn retain(self, retain: bool) -> Self;
    /// MQTT 5 properties.
    fn props(self, props: Props) -> Self;
}

impl ProduceMessageExt for ProduceMessage {
    fn qos(mut self, qos: u8) -> Self {
        self.qos = qos;
        self
    }
    fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }
    fn retain(mut self, retain: bool) -> Self {
        self.retain = retain;
        self
    }
    fn props(mut self, props: Props) -> Self {
        self.props = props;
        self
    }
}

/// The byte stream of a connection: a `TcpStream`, or TLS over one.
trait Io: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Io for T {}

/// Why a connection could not be opened.
enum OpenError {
    /// TCP failed, or the server closed or broke the connection: worth a retry.
    Io(std::io::Error),
    /// The TLS handshake failed on what the server sent (untrusted certificate, wrong
    /// name, not TLS): a retry would fail the same way.
    Tls(std::io::Error),
}

/// One connection: frames out, frames in, one request at a time.
struct Conn {
    stream: Box<dyn Io>,
}

impl Conn {
    async fn open(addr: SocketAddr, tls: Option<&TlsOptions>) -> Result<Conn, OpenError> {
        let stream = TcpStream::connect(addr).await.map_err(OpenError::Io)?;
        stream.set_nodelay(true).map_err(OpenError::Io)?;
        let Some(tls) = tls else {
            return Ok(Conn {
                stream: Box::new(stream),
            });
        };
        let connector = TlsConnector::from(tls.config.clone());
        match connector.connect(tls.server_name.clone(), stream).await {
            Ok(stream) => Ok(Conn {
                stream: Box::new(stream),
            }),
            // tokio-rustls reports TLS errors (certificate, alert, garbage) this way.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => Err(OpenError::Tls(e)),
            Err(e) => Err(OpenError::Io(e)),
        }
    }

    async fn call(&mut self, req: &Request) -> std::io::Result<Response> {
        self.stream.write_all(&encode_frame(req)).await?;
        // TLS may hold back what the socket did not take yet.
        self.stream.flush().await?;
        let len = self.stream.read_u32().await?;
        if len as usize > HARD_MAX_FRAME {
            // A TLS record (an alert, 0x15, or a handshake, 0x16, of version 3.x) where
            // a frame was expected: a plain client on a TLS listener.
            let [kind, major, ..] = len.to_be_bytes();
            if matches!(kind, 0x15 | 0x16) && major == 3 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "the server answered with TLS: connect with TlsOptions",
                ));
            }
            return Err(std::io::Error::other(format!("frame of {len} bytes")));
        }
        let len = len as usize;
        let mut buf = vec![0u8; len];
        self.stream.read_exact(&mut buf).await?;
        decode_body(&buf).map_err(|e| std::io::Error::other(e.to_string()))
    }
}

/// Connection attempts on a reconnect, and the pause between them.
const RECONNECT_ATTEMPTS: u32 = 20;
const RECONNECT_PAUSE: Duration = Duration::from_millis(250);

/// The shared connection logic of producers and consumers.
struct Link {
    addr: SocketAddr,
    name: String,
    credentials: Credentials,
    tls: Option<TlsOptions>,
    conn: Option<Conn>,
    next_id: u64,
    partitions: u32,
}

impl Link {
    fn new(
        addr: SocketAddr,
        name: String,
        credentials: Credentials,
        tls: Option<TlsOptions>,
    ) -> Link {
        Link {
            addr,
            name,
            credentials,
            tls,
            conn: None,
            next_id: 0,
            partitions: 0,
        }
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Connect (retrying) and say hello.
    async fn connect(&mut self) -> Result<(), ClientError> {
        let mut last = None;
        for attempt in 0..RECONNECT_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(RECONNECT_PAUSE).await;
            }
            match Conn::open(self.addr, self.tls.as_ref()).await {
                Ok(mut c) => {
                    let id = self.id();
                    let hello = Request::Hello {
                        id,
                        name: self.name.clone(),
                        username: self.credentials.username.clone(),
                        password: self.credentials.password.clone(),
                    };
                    match c.call(&hello).await {
                        Ok(Response::HelloOk { partitions, .. }) => {
                            self.partitions = partitions;
                            self.conn = Some(c);
                            return Ok(());
                        }
                        Ok(other) => return Err(unexpected(other)),
                        // A TLS failure, which would come again: with TLS 1.3 the server
                        // checks a client certificate after the client's handshake
                        // ended, and its refusal (an alert) comes here; without TLS,
                        // a TLS listener's alert comes here.
                        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                            return Err(ClientError::Io {
                                addr: self.addr,
                                source: e,
                            })
                        }
                        Err(e) => last = Some(e),
                    }
                }
                Err(OpenError::Io(e)) => last = Some(e),
                Err(OpenError::Tls(e)) => {
                    return Err(ClientError::Io {
                        addr: self.addr,
                        source: e,
                    })
                }
            }
        }
        Err(ClientError::Io {
            addr: self.addr,
            source: last.unwrap_or_else(|| std::io::Error::other("no attempt")),
        })
    }

    /// Send `req` (made with a fresh id); `None` means the connection broke and the
    /// caller should reconnect (and re-join) and try once more.
    async fn try_call(&mut self, req: &Request) -> Option<Response> {
        let conn = self.conn.as_mut()?;
        match conn.call(req).await {
            Ok(r) => {
                if matches!(&r, Response::Error { code, .. } if code.closes_connection()) {
                    self.conn = None;
                }
                Some(r)
            }
            Err(_) => {
                self.conn = None;
                None
            }
        }
    }
}

fn unexpected(r: Response) -> ClientError {
    match r {
        Response::Error { code, message, .. } => ClientError::Server { code, message },
        other => ClientError::Protocol(format!("{other:?}")),
    }
}

/// Options of a [`Producer`].
#[derive(Clone, Debug)]
pub struct ProducerOptions {
    /// The publisher id consumers and devices see, the default partition key, and the
    /// client id the node's ACL sees (`client` sections, `%c`).
    pub name: String,
    /// What the producer logs in with.
    pub credentials: Credentials,
    /// TLS settings; `None` (the default) connects over plain TCP.
    pub tls: Option<TlsOptions>,
}

impl ProducerOptions {
    /// A producer named `name`, without credentials.
    pub fn new(name: impl Into<String>) -> ProducerOptions {
        ProducerOptions {
            name: name.into(),
            credentials: Credentials::default(),
            tls: None,
        }
    }

    /// Log in with `credentials`.
    pub fn credentials(mut self, credentials: Credentials) -> ProducerOptions {
        self.credentials = credentials;
        self
    }

    /// Connect over TLS (to a service listener with a certificate).
    pub fn tls(mut self, tls: TlsOptions) -> ProducerOptions {
        self.tls = Some(tls);
        self
    }
}

/// Produces messages to a node.
pub struct Producer {
    link: Link,
}

impl Producer {
    /// Connect to the service listener at `addr` without credentials; `name` is the
    /// publisher id that consumers and devices see (and the default partition key).
    pub async fn connect(addr: SocketAddr, name: &str) -> Result<Producer, ClientError> {
        Producer::connect_with(addr, ProducerOptions::new(name)).await
    }

    /// Connect with explicit options (credentials).
    pub async fn connect_with(
        addr: SocketAddr,
        opts: ProducerOptions,
    ) -> Result<Producer, ClientError> {
        let mut link = Link::new(addr, opts.name, opts.credentials, opts.tls);
        link.connect().await?;
        Ok(Producer { link })
    }

    /// Store one message; answers its commitlog position once it is durable.
    pub async fn send(&mut self, message: ProduceMessage) -> Result<u64, ClientError> {
        let mut p = self.send_batch(vec![message]).await?;
        p.pop()
            .ok_or_else(|| ClientError::Protocol("no position".into()))
    }

    /// Store messages in order with one request; one position per message.
    pub async fn send_batch(
        &mut self,
        messages: Vec<ProduceMessage>,
    ) -> Result<Vec<u64>, ClientError> {
        for attempt in 0..2 {
            if self.link.conn.is_none() {
                self.link.connect().await?;
            }
            let req = Request::Produce {
                id: self.link.id(),
                messages: messages.clone(),
            };
            match self.link.try_call(&req).await {
                Some(Response::Produced { positions, .. }) => return Ok(positions),
                Some(other) => return Err(unexpected(other)),
                None if attempt == 0 => continue,
                None => break,
            }
        }
        Err(ClientError::Io {
            addr: self.link.addr,
            source: std::io::Error::other("connection lost"),
        })
    }

    /// Partitions per first-level topic on the node.
    pub fn partitions(&self) -> u32 {
        self.link.partitions
    }
}

/// Options of a [`Consumer`].
#[derive(Clone, Debug)]
pub struct ConsumerOptions {
    /// Consumer group.
    pub group: String,
    /// First-level topic (e.g. `home`).
    pub topic: String,
    /// Where the group starts on partitions it has never committed.
    pub start: StartAt,
    /// Client name: logged by the node, and the client id its ACL sees (`client`
    /// sections, `%c`).
    pub name: String,
    /// What the consumer logs in with.
    pub credentials: Credentials,
    /// TLS settings; `None` (the default) connects over plain TCP.
    pub tls: Option<TlsOptions>,
}

impl ConsumerOptions {
    /// Group `group` on first-level topic `topic`, from the earliest message, named
    /// `consumer-{group}`, without credentials.
    pub fn new(group: impl Into<String>, topic: impl Into<String>) -> ConsumerOptions {
        let group = group.into();
        ConsumerOptions {
            name: format!("consumer-{group}"),
            group,
            topic: topic.into(),
            start: StartAt::Earliest,
            credentials: Credentials::default(),
            tls: None,
        }
    }

    /// Where the group starts on partitions it has never committed.
    pub fn start(mut self, start: StartAt) -> ConsumerOptions {
        self.start = start;
        self
    }

    /// The client name.
    pub fn name(mut self, name: impl Into<String>) -> ConsumerOptions {
        self.name = name.into();
        self
    }

    /// Log in with `credentials`.
    pub fn credentials(mut self, credentials: Credentials) -> ConsumerOptions {
        self.credentials = credentials;
        self
    }

    /// Connect over TLS (to a service listener with a certificate).
    pub fn tls(mut self, tls: TlsOptions) -> ConsumerOptions {
        self.tls = Some(tls);
        self
    }
}

/// A member of a consumer group on one first-level topic.
pub struct Consumer {
    link: Link,
    opts: ConsumerOptions,
    owned: Vec<u32>,
    joined: bool,
}

impl Consumer {
    /// Join `group` on first-level topic `topic` without credentials, starting at the
    /// earliest message on partitions the group has never committed.
    pub async fn connect(
        addr: SocketAddr,
        group: &str,
        topic: &str,
    ) -> Result<Consumer, ClientError> {
        Consumer::connect_with(addr, ConsumerOptions::new(group, topic)).await
    }

    /// Join with explicit options (credentials, start, name).
    pub async fn connect_with(
        addr: SocketAddr,
        opts: ConsumerOptions,
    ) -> Result<Consumer, ClientError> {
        let mut c = Consumer {
            link: Link::new(
                addr,
                opts.name.clone(),
                opts.credentials.clone(),
                opts.tls.clone(),
            ),
            opts,
            owned: Vec::new(),
            joined: false,
        };
        c.call(|_| None).await?;
        Ok(c)
    }

    /// Make sure we are connected and joined, then send `make(id)` if it is a request
    /// (retrying once on a new connection).
    async fn call(
        &mut self,
        make: impl Fn(u64) -> Option<Request>,
    ) -> Result<Option<Response>, ClientError> {
        for attempt in 0..2 {
            if self.link.conn.is_none() {
                self.joined = false;
                self.link.connect().await?;
            }
            if !self.joined {
                let join = Request::Join {
                    id: self.link.id(),
                    group: self.opts.group.clone(),
                    topic: self.opts.topic.clone(),
                    start: self.opts.start,
                };
                match self.link.try_call(&join).await {
                    Some(Response::Joined { partitions, .. }) => {
                        self.owned = partitions;
                        self.joined = true;
                    }
                    Some(other) => return Err(unexpected(other)),
                    None if attempt == 0 => continue,
                    None => break,
                }
            }
            let Some(req) = make(self.link.id()) else {
                return Ok(None);
            };
            match self.link.try_call(&req).await {
                Some(r) => {
                    // Dropped from the group (an ACL reload, say): join again next time,
                    // which tells whether the group is still allowed.
                    if matches!(
                        &r,
                        Response::Error {
                            code: ErrorCode::NotMember,
                            ..
                        }
                    ) {
                        self.joined = false;
                    }
                    return Ok(Some(r));
                }
                None if attempt == 0 => continue,
                None => break,
            }
        }
        Err(ClientError::Io {
            addr: self.link.addr,
            source: std::io::Error::other("connection lost"),
        })
    }

    /// Up to `max` messages from the partitions this member owns, waiting up to `wait`
    /// for the first. An empty batch means none arrived in time.
    pub async fn poll(&mut self, max: u32, wait: Duration) -> Result<Vec<Delivered>, ClientError> {
        let (group, topic) = (self.opts.group.clone(), self.opts.topic.clone());
        let wait_ms = wait.as_millis().min(u32::MAX as u128) as u32;
        let r = self
            .call(|id| {
                Some(Request::Pull {
                    id,
                    group: group.clone(),
                    topic: topic.clone(),
                    max,
                    wait_ms,
                })
            })
            .await?;
        match r {
            Some(Response::Messages {
                messages,
                partitions,
                ..
            }) => {
                self.owned = partitions;
                Ok(messages)
            }
            Some(other) => Err(unexpected(other)),
            None => Err(ClientError::Protocol("no answer".into())),
        }
    }

    /// Commit everything in `messages` (the highest offset + 1 of each partition).
    /// Fails with [`ErrorCode::NotOwner`] for a partition that moved to another member
    /// since it was polled (that member will see those messages again).
    pub async fn commit(&mut self, messages: &[Delivered]) -> Result<(), ClientError> {
        let mut next: BTreeMap<u32, u64> = BTreeMap::new();
        for m in messages {
            let e = next.entry(m.partition).or_default();
            *e = (*e).max(m.offset + 1);
        }
        if next.is_empty() {
            return Ok(());
        }
        self.commit_offsets(next.into_iter().collect()).await
    }

    /// Commit `(partition, next offset to read)` pairs.
    pub async fn commit_offsets(&mut self, offsets: Vec<(u32, u64)>) -> Result<(), ClientError> {
        let (group, topic) = (self.opts.group.clone(), self.opts.topic.clone());
        match self
            .call(|id| {
                Some(Request::Commit {
                    id,
                    group: group.clone(),
                    topic: topic.clone(),
                    offsets: offsets.clone(),
                })
            })
            .await?
        {
            Some(Response::Committed { .. }) => Ok(()),
            Some(other) => Err(unexpected(other)),
            None => Err(ClientError::Protocol("no answer".into())),
        }
    }

    /// Move (and commit) the cursors of the partitions this member owns.
    pub async fn seek(&mut self, to: SeekTo) -> Result<Vec<(u32, u64)>, ClientError> {
        let (group, topic) = (self.opts.group.clone(), self.opts.topic.clone());
        match self
            .call(|id| {
                Some(Request::Seek {
                    id,
                    group: group.clone(),
                    topic: topic.clone(),
                    to,
                })
            })
            .await?
        {
            Some(Response::Seeked { offsets, .. }) => Ok(offsets),
            Some(other) => Err(unexpected(other)),
            None => Err(ClientError::Protocol("no answer".into())),
        }
    }

    /// The partitions this member owned at its last request.
    pub fn partitions(&self) -> &[u32] {
        &self.owned
    }
}
