//! A Rust client for the service protocol (README "Service protocol"): a [`Producer`]
//! that stores messages in a node's commitlog (routed to devices like an MQTT publish)
//! and a [`Consumer`] that reads a first-level topic as a member of a consumer group.
//!
//! Both are async (tokio) and reconnect when the connection is lost: the request that
//! failed is sent again once on the new connection (a producer may then store a
//! message twice: delivery is at least once), and a consumer re-joins its group and
//! resumes from the group's committed offsets.
//!
//! ```no_run
//! # async fn demo(addr: std::net::SocketAddr) -> Result<(), actimq::client::ClientError> {
//! use actimq::client::{message, Consumer, ProduceMessageExt, Producer};
//! let mut p = Producer::connect(addr, "billing").await?;
//! p.send(message("home/room1/cmd", b"on".to_vec()).qos(1)).await?;
//! let mut c = Consumer::connect(addr, "analytics", "home").await?;
//! let batch = c.poll(100, std::time::Duration::from_secs(1)).await?;
//! c.commit(&batch).await?;
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

/// One connection: frames out, frames in, one request at a time.
struct Conn {
    stream: TcpStream,
}

impl Conn {
    async fn open(addr: SocketAddr) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn { stream })
    }

    async fn call(&mut self, req: &Request) -> std::io::Result<Response> {
        self.stream.write_all(&encode_frame(req)).await?;
        let len = self.stream.read_u32().await? as usize;
        if len > HARD_MAX_FRAME {
            return Err(std::io::Error::other(format!("frame of {len} bytes")));
        }
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
    conn: Option<Conn>,
    next_id: u64,
    partitions: u32,
}

impl Link {
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
            match Conn::open(self.addr).await {
                Ok(mut c) => {
                    let id = self.id();
                    let hello = Request::Hello {
                        id,
                        name: self.name.clone(),
                    };
                    match c.call(&hello).await {
                        Ok(Response::HelloOk { partitions, .. }) => {
                            self.partitions = partitions;
                            self.conn = Some(c);
                            return Ok(());
                        }
                        Ok(other) => return Err(unexpected(other)),
                        Err(e) => last = Some(e),
                    }
                }
                Err(e) => last = Some(e),
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
            Ok(r) => Some(r),
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

/// Produces messages to a node.
pub struct Producer {
    link: Link,
}

impl Producer {
    /// Connect to the service listener at `addr`; `name` is the publisher id that
    /// consumers and devices see (and the default partition key).
    pub async fn connect(addr: SocketAddr, name: &str) -> Result<Producer, ClientError> {
        let mut link = Link {
            addr,
            name: name.to_string(),
            conn: None,
            next_id: 0,
            partitions: 0,
        };
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
    /// Client name (logged by the node).
    pub name: String,
}

/// A member of a consumer group on one first-level topic.
pub struct Consumer {
    link: Link,
    opts: ConsumerOptions,
    owned: Vec<u32>,
    joined: bool,
}

impl Consumer {
    /// Join `group` on first-level topic `topic`, starting at the earliest message on
    /// partitions the group has never committed.
    pub async fn connect(
        addr: SocketAddr,
        group: &str,
        topic: &str,
    ) -> Result<Consumer, ClientError> {
        Consumer::connect_with(
            addr,
            ConsumerOptions {
                group: group.into(),
                topic: topic.into(),
                start: StartAt::Earliest,
                name: format!("consumer-{group}"),
            },
        )
        .await
    }

    /// Join with explicit options.
    pub async fn connect_with(
        addr: SocketAddr,
        opts: ConsumerOptions,
    ) -> Result<Consumer, ClientError> {
        let mut c = Consumer {
            link: Link {
                addr,
                name: opts.name.clone(),
                conn: None,
                next_id: 0,
                partitions: 0,
            },
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
                Some(r) => return Ok(Some(r)),
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
