//! `MqttSession`: one device connection, from CONNECT to close.
//!
//! * **Owns** the protocol state of one client: negotiated version, keep-alive, will,
//!   topic aliases, its subscriptions and their read offsets (one queue per
//!   subscription), the outbound in-flight window, and inbound QoS 2 packet ids.
//! * **Handles** [`Frames`] and [`ReadEnded`] (its reader task), [`Drained`] (its writer
//!   task), [`Arrived`] (a `Notifier`: new entries in a queue it watches), [`Takeover`],
//!   [`ServerShutdown`] and [`Reauthorize`] (the `ClientRegistry`; after an ACL reload
//!   it drops the subscriptions the hooks now deny).
//! * **Inbound path.** Packets go through one ordered pipeline: consecutive PUBLISHes are
//!   routed (cached routes, re-asked from the `SubscriptionShard`s when the route epoch
//!   moves) and appended to the `CommitLog` as a batch; acknowledgements (PUBACK, PUBREC)
//!   are written only when the batch is durable. SUBSCRIBE, UNSUBSCRIBE and PUBREL wait
//!   for the publishes before them, so a client sees its own effects in order.
//! * **Outbound path.** On an arrival hint the session pulls from the queue, at most as
//!   many messages as its in-flight window (QoS 1/2) and its write buffer allow, and
//!   writes them. Nothing is buffered per session beyond one pull.
//! * **Back-pressure.** Inbound: the reader task takes a semaphore permit per PUBLISH
//!   and stops reading the socket when the pipeline is full, so a fast publisher is
//!   paced by storage through TCP. Outbound: the writer task counts unwritten bytes;
//!   above `max_write_buffer` the session stops pulling until the writer reports
//!   `Drained`, so a slow subscriber leaves its backlog in the log, not in memory.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_codec::Decoder;
use bytes::{Bytes, BytesMut};
use futures::channel::mpsc;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;

use super::codec::{
    ConnAck, Connect, DecodeFailure, Encoder, Inbound, MqttDecoder, OutPublish, Proto, Publish,
    SubOpts, Will,
};
use super::hooks::{Action, AuthDecision, Authenticate, Authorize, DisconnectReason, Event};
use super::inflight::{Inflight, InflightEntry};
use super::registry::{self, qos2_key, session_key, Register, SessionState, SubState, Unregister};
use super::retain::{expiry_left, MatchRetained, SetRetained};
use super::shard::{shard_of, shards_for_filter, AddRoute, Route, RouteKind};
use super::throttle;
use super::topic::{self, first_level, parse_filter};
use super::Gateway;
use crate::storage::{
    Append, Arrived, KvPut, Message, Pull, Pulled, QueueName, StorageError, Unwatch, Watch,
};

/// Frames decoded by the reader task, in order.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Frames(pub Vec<Inbound>);

/// Ask the authorization hooks again about every subscription and drop those they now
/// deny (from the `ClientRegistry` after an ACL reload; and by a resumed session to
/// itself, since its subscriptions were allowed for an earlier connection).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reauthorize;

/// The reader task stopped: end of stream (`None`) or a decode/IO error.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReadEnded(pub Option<DecodeFailure>);

/// The writer task's backlog fell below the low watermark, or writing failed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drained {
    pub failed: bool,
}

/// Another connection took this client id (from the registry). Answers with the
/// session state to continue with.
#[derive(Message)]
#[rtype(result = "Handoff")]
pub struct Takeover {
    pub clean_start: bool,
}

/// The answer to [`Takeover`].
#[derive(Debug, MessageResponse)]
pub enum Handoff {
    /// The state the new connection continues with (`None`: the session ended).
    State(Option<SessionState>),
    /// The old connection was still registering and stopped before its registration
    /// answered: the registry falls back to the stored session.
    Unknown,
}

/// The node is stopping: close and hand back the state of a persistent session.
#[derive(Message)]
#[rtype(result = "Option<SessionState>")]
pub struct ServerShutdown;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitConnect,
    Registering,
    Connected,
    Closed,
}

/// A pipeline step, in the order the client sent it.
enum Op {
    Publish(Box<Publish>),
    Subscribe {
        packet_id: u16,
        sub_id: Option<u32>,
        filters: Vec<(String, SubOpts)>,
    },
    Unsubscribe {
        packet_id: u16,
        filters: Vec<String>,
    },
    PubRel(u16),
}

struct Sub {
    state: SubState,
    queue: QueueName,
    /// Highest max_offset heard of (hint or pull); pull while `state.next` is below it.
    known_max: u64,
    pulling: bool,
}

/// How one delivery attempt went.
#[derive(PartialEq, Eq)]
enum Delivery {
    Sent,
    Skipped,
    WindowFull,
}

/// Session state that an idle device never needs (see `MqttSession::extra`).
struct Extra {
    /// Inbound topic aliases (v5).
    aliases: HashMap<u16, String>,
    /// Packets received after CONNECT and before CONNACK went out.
    early: Vec<Inbound>,
    /// Retained messages matched on SUBSCRIBE, waiting for room in the window.
    retained_backlog: VecDeque<(Arc<Message>, u8, Vec<u32>)>,
    /// Inbound QoS 2 packet ids still in the pipeline (not yet stored).
    qos2_pending: HashSet<u16>,
    /// Cached topic → queues routes, valid while the route epoch is `routes_epoch`.
    routes: HashMap<String, Arc<[QueueName]>>,
    routes_epoch: u64,
    /// Taken over while registering: where to send the state our registration brings.
    handoff: Option<tokio::sync::oneshot::Sender<Option<SessionState>>>,
}

impl Default for Extra {
    fn default() -> Self {
        Extra {
            aliases: HashMap::new(),
            early: Vec::new(),
            retained_backlog: VecDeque::new(),
            qos2_pending: HashSet::new(),
            routes: HashMap::new(),
            routes_epoch: u64::MAX,
            handoff: None,
        }
    }
}

const TICK: Duration = Duration::from_secs(1);
/// Every this many ticks, pull every subscription once even without a hint
/// (hints may be dropped when a mailbox is full).
const PROBE_TICKS: u32 = 5;
const CHECKPOINT_TICKS: u32 = 2;
const MAX_EARLY_PACKETS: usize = 1024;
const MAX_ROUTE_CACHE: usize = 4096;
const MAX_PUBLISH_BATCH: usize = 256;
/// How long a closed connection's IO task may go on writing what was left for it.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Smallest and largest read buffer of a connection.
const MIN_READ: usize = 256;
const MAX_READ: usize = 64 * 1024;

pub struct MqttSession {
    gw: Gateway,
    conn_id: u64,
    peer: SocketAddr,
    log: slog::Logger,

    /// Encoded packets not yet handed to the writer task.
    out: BytesMut,
    /// futures' channel, not tokio's: tokio preallocates a block of 32 slots per
    /// channel, about 1 KiB for every idle connection.
    writer: Option<mpsc::UnboundedSender<Bytes>>,
    /// Bytes handed to the writer task and not yet written to the socket.
    write_pending: Arc<AtomicUsize>,
    /// Set when the session stopped pulling for lack of write buffer.
    wants_drain: Arc<AtomicBool>,
    /// The connection's IO task; aborted a grace period after the session stops.
    io_task: Option<tokio::task::JoinHandle<()>>,
    /// One permit per PUBLISH in the pipeline (taken by the reader task).
    permits: Arc<Semaphore>,
    enc: Encoder,

    phase: Phase,
    proto: Proto,
    client_id: Arc<str>,
    /// The authenticated name: the TLS certificate's CN (`cn_as_username`) or CONNECT's
    /// username. Kept for authorization (ACL `%u`) and shown in the logs.
    username: Option<Box<str>>,
    /// Known from the transport before CONNECT (replaces CONNECT's username).
    cert_username: Option<Box<str>>,
    keep_alive: Option<Duration>,
    last_seen: Instant,
    /// Boxed: most sessions have none, and inline it is a few hundred bytes.
    will: Option<Box<Will>>,
    /// State only publishers, subscribers of retained messages and clients that
    /// pipeline after CONNECT need; allocated on first use (memory per idle connection).
    extra: Option<Box<Extra>>,
    /// Whether the will goes out when the session stops (false after DISCONNECT 0x00).
    will_on_close: bool,
    session_expiry: u32,

    subs: HashMap<String, Sub>,
    by_queue: HashMap<QueueName, String>,
    inflight: Inflight,
    window_blocked: bool,
    /// Resending the in-flight messages of a resumed session; new pulls wait.
    resuming: bool,
    qos2_in: HashSet<u16>,

    pipeline: VecDeque<Op>,
    /// QoS 1/2 publishes received and not yet acknowledged (for Receive Maximum).
    unacked_in: usize,
    busy: bool,
    /// DISCONNECT or end of stream seen: close (publishing the will if `true`) once the
    /// pipeline has drained, so that publishes sent before it are not lost.
    closing: Option<bool>,

    dirty: bool,
    /// The registry has the state already (takeover, shutdown): don't unregister it.
    handed_off: bool,
    /// CONNACK went out: only then is this session's state worth keeping.
    was_connected: bool,
    /// Closes the connection if CONNECT does not come in time; cancelled on CONNECT.
    connect_timer: Option<SpawnHandle>,
    ticks: u32,
    /// Why the connection ends (for the `ClientDisconnected` event).
    end: DisconnectReason,
}

/// What `register` needs from CONNECT once the hooks have admitted the client.
struct Admit {
    clean_start: bool,
    assigned: Option<String>,
    server_ka: Option<u16>,
    capped: Option<u32>,
}

impl MqttSession {
    /// Start a session for `io` on the current arbiter.
    pub fn spawn<S>(
        gw: Gateway,
        io: S,
        peer: SocketAddr,
        info: super::ConnInfo,
    ) -> Addr<MqttSession>
    where
        S: AsyncRead + AsyncWrite + Unpin + 'static,
    {
        let cfg = gw.config().clone();
        let conn_id = gw.next_id();
        let log = gw.inner.log.new(
            // FnValue: the address is formatted only when a line is logged, not
            // stored as a String in every connection's logger.
            slog::o!("actor" => "mqtt_session", "conn" => conn_id,
                "peer" => slog::FnValue(move |_: &slog::Record| peer.to_string())),
        );
        MqttSession::create(move |ctx| {
            ctx.set_mailbox_capacity(64);
            let addr = ctx.address();
            let write_pending = Arc::new(AtomicUsize::new(0));
            let wants_drain = Arc::new(AtomicBool::new(false));
            let permits = Arc::new(Semaphore::new(
                (cfg.receive_maximum as usize).max(MAX_PUBLISH_BATCH),
            ));
            let (tx, rx) = mpsc::unbounded();
            let io_task = actix::spawn(io_loop(
                io,
                MqttDecoder::new(cfg.max_packet_size),
                addr,
                permits.clone(),
                WriteSide {
                    rx,
                    pending: write_pending.clone(),
                    wants_drain: wants_drain.clone(),
                    low: cfg.max_write_buffer / 2,
                },
                throttle::Inbound::new(
                    cfg.max_inbound_messages_per_sec,
                    cfg.max_inbound_bytes_per_sec,
                )
                .map(|limits| {
                    Box::new(Throttle {
                        limits,
                        held: None,
                        resume: None,
                    })
                }),
            ));
            MqttSession {
                gw,
                conn_id,
                peer,
                log,
                out: BytesMut::new(),
                writer: Some(tx),
                write_pending,
                wants_drain,
                io_task: Some(io_task),
                permits,
                enc: Encoder::new(Proto::V3(4)),
                phase: Phase::AwaitConnect,
                proto: Proto::V3(4),
                client_id: "".into(),
                username: None,
                cert_username: info.cert_username.map(Into::into),
                keep_alive: None,
                last_seen: Instant::now(),
                will: None,
                extra: None,
                will_on_close: true,
                session_expiry: 0,
                subs: HashMap::new(),
                by_queue: HashMap::new(),
                inflight: Inflight::new(cfg.max_inflight as usize),
                window_blocked: false,
                resuming: false,
                qos2_in: HashSet::new(),
                pipeline: VecDeque::new(),
                unacked_in: 0,
                busy: false,
                closing: None,
                dirty: false,
                handed_off: false,
                was_connected: false,
                connect_timer: None,
                ticks: 0,
                end: DisconnectReason::Abnormal,
            }
        })
    }

    fn extra(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Box::default)
    }

    fn cfg(&self) -> &super::MqttConfig {
        &self.gw.inner.cfg
    }

    // ---------------------------------------------------------------- writing

    /// Hand everything encoded so far to the writer task in one buffer (one write).
    fn flush(&mut self, ctx: &mut Context<Self>) {
        if self.out.is_empty() {
            return;
        }
        let buf = self.out.split().freeze();
        let pending = self.write_pending.fetch_add(buf.len(), Ordering::AcqRel) + buf.len();
        if let Some(tx) = &self.writer {
            if tx.unbounded_send(buf).is_err() {
                self.close(None, true, ctx);
                return;
            }
        }
        // Deliveries stop at max_write_buffer; only acks can push past it. A client that
        // never reads while sending without end is cut off here.
        if pending > self.cfg().max_write_buffer.saturating_mul(8).max(1 << 20) {
            slog::warn!(self.log, "client does not read; closing"; "pending_bytes" => pending);
            self.close(Some(0x97), true, ctx);
        }
    }

    fn write_room(&self) -> bool {
        self.write_pending.load(Ordering::Acquire) < self.cfg().max_write_buffer
    }

    /// Close the connection: an optional v5 DISCONNECT reason first; `will` says
    /// whether the will message is published.
    fn close(&mut self, reason: Option<u8>, will: bool, ctx: &mut Context<Self>) {
        self.close_with(reason, None, will, ctx)
    }

    fn close_with(
        &mut self,
        reason: Option<u8>,
        why: Option<&str>,
        will: bool,
        ctx: &mut Context<Self>,
    ) {
        if self.phase == Phase::Closed {
            return;
        }
        if let (Some(code), Proto::V5, Phase::Connected) = (reason, self.proto, self.phase) {
            let _ = self.enc.disconnect(code, why, &mut self.out);
        }
        let was = self.phase;
        self.phase = Phase::Closed;
        self.will_on_close = will;
        if !self.out.is_empty() {
            let buf = self.out.split().freeze();
            // The writer task subtracts what it writes: count it in, as `flush` does.
            self.write_pending.fetch_add(buf.len(), Ordering::AcqRel);
            if let Some(tx) = &self.writer {
                let _ = tx.unbounded_send(buf);
            }
        }
        if was != Phase::AwaitConnect {
            slog::debug!(self.log, "closing"; "reason" => reason, "will" => will);
        }
        ctx.stop();
    }

    /// Close once the publishes (and other steps) received before are done.
    fn close_after_pipeline(&mut self, will: bool, ctx: &mut Context<Self>) {
        if self.phase != Phase::Connected || (self.pipeline.is_empty() && !self.busy) {
            return self.close(None, will, ctx);
        }
        self.closing = Some(will);
    }

    fn protocol_error(&mut self, code: u8, what: &str, ctx: &mut Context<Self>) {
        self.end = DisconnectReason::ProtocolError;
        slog::info!(self.log, "protocol violation; closing"; "what" => what, "reason" => code);
        self.close_with(Some(code), Some(what), true, ctx);
    }

    // ---------------------------------------------------------------- CONNECT

    fn on_connect(&mut self, c: Connect, ctx: &mut Context<Self>) {
        if let Some(t) = self.connect_timer.take() {
            ctx.cancel_future(t);
        }
        self.proto = c.proto;
        self.enc = Encoder::new(c.proto);
        let cfg = self.cfg().clone();
        if c.auth_method.is_some() {
            // Enhanced authentication is not offered (v5 §4.12): 0x8C.
            return self.refuse(0x8C, ctx);
        }
        let mut assigned = None;
        let client_id = if c.client_id.is_empty() {
            // MQTT-3.1.3-8: a v3.1.1 client with an empty id must ask for a clean session.
            if (!c.proto.is_v5() && !c.clean_start) || !cfg.allow_empty_client_id {
                return self.refuse(0x85, ctx);
            }
            let id = format!("actimq-{:x}-{:x}", crate::now_ms(), self.conn_id);
            assigned = Some(id.clone());
            id
        } else {
            c.client_id.clone()
        };
        if client_id.len() > cfg.max_client_id_len {
            return self.refuse(0x85, ctx);
        }
        if let Some(w) = &c.will {
            if topic::validate_name(&w.topic, cfg.max_topic_levels).is_err() {
                return self.refuse(if c.proto.is_v5() { 0x90 } else { 0x85 }, ctx);
            }
            if w.retain && !cfg.retain_available {
                return self.refuse(0x9A, ctx);
            }
        }
        let server_ka = (cfg.max_keepalive_secs > 0
            && (c.keep_alive == 0 || c.keep_alive > cfg.max_keepalive_secs))
            .then_some(cfg.max_keepalive_secs);
        let ka = server_ka.unwrap_or(c.keep_alive);
        // MQTT-3.1.2-24: allow one and a half keep-alive periods.
        self.keep_alive = (ka > 0).then(|| Duration::from_millis(ka as u64 * 1500));
        let asked = c.session_expiry;
        self.session_expiry = asked.min(cfg.max_session_expiry_secs);
        if let Some(max) = c.max_packet_size {
            self.enc.set_max_packet_size(max);
        }
        self.inflight
            .set_capacity((cfg.max_inflight as usize).min(c.receive_max as usize));
        self.will = c.will.map(Box::new);
        let cert_username = self.cert_username.take();
        self.username = cert_username
            .clone()
            .or_else(|| c.username.clone().map(Into::into));
        self.client_id = client_id.as_str().into();
        // One logger node per connection: rebuilt from the root rather than chained.
        let cid = self.client_id.clone();
        let peer = self.peer;
        self.log = self.gw.inner.log.new(slog::o!(
            "actor" => "mqtt_session", "conn" => self.conn_id,
            "peer" => slog::FnValue(move |_: &slog::Record| peer.to_string()),
            "client_id" => slog::FnValue(move |_: &slog::Record| cid.to_string())
        ));
        self.phase = Phase::Registering;
        let admit = Admit {
            clean_start: c.clean_start,
            assigned,
            server_ka,
            capped: (c.proto.is_v5() && asked != self.session_expiry)
                .then_some(self.session_expiry),
        };
        let hooks = &self.gw.inner.hooks;
        let ask = hooks.has_authenticate() || (hooks.has_authorize() && self.will.is_some());
        if !ask {
            return self.register(admit, ctx);
        }
        // Ask the hooks in a spawned future: only this client waits for them.
        let hooks = hooks.clone();
        let auth = hooks.has_authenticate().then(|| Authenticate {
            client_id: client_id.clone(),
            username: c.username.clone(),
            password: c.password.clone(),
            peer: self.peer,
            cert_username: cert_username.map(String::from),
            protocol: c.proto.level(),
        });
        let will_auth = match (&self.will, hooks.has_authorize()) {
            (Some(w), true) => Some(Authorize {
                client_id,
                username: self.username.as_deref().map(String::from),
                action: Action::Publish {
                    topic: w.topic.clone(),
                    qos: w.qos,
                    retain: w.retain,
                },
            }),
            _ => None,
        };
        let fut = async move {
            if let Some(a) = auth {
                if let AuthDecision::Deny(code) = hooks.authenticate(a).await {
                    // A success code is no refusal: make it Not authorized.
                    return Some(if code < 0x80 { 0x87 } else { code });
                }
            }
            if let Some(w) = will_auth {
                if !hooks.authorize(w).await {
                    return Some(0x87);
                }
            }
            None
        };
        ctx.spawn(fut.into_actor(self).map(move |denied, act, ctx| {
            if act.phase != Phase::Registering {
                return;
            }
            match denied {
                Some(code) => act.refuse(code, ctx),
                None => act.register(admit, ctx),
            }
        }));
    }

    /// Register the client id (taking over a live session) and answer CONNACK.
    fn register(&mut self, admit: Admit, ctx: &mut Context<Self>) {
        let Admit {
            clean_start,
            assigned,
            server_ka,
            capped,
        } = admit;
        let cfg = self.cfg().clone();
        let reg = Register {
            client_id: self.client_id.clone(),
            conn_id: self.conn_id,
            addr: ctx.address(),
            clean_start,
            persistent: self.session_expiry > 0,
        };
        let reg = self
            .gw
            .inner
            .registry
            .send(reg)
            .into_actor(self)
            .map(move |res, act, ctx| {
                if let Some(tx) = act.extra.as_mut().and_then(|e| e.handoff.take()) {
                    // Taken over before CONNACK: the session this registration brought
                    // goes on with the new connection, unused (a session with expiry 0
                    // ends with this connection, as in `Takeover`).
                    let mut state = res.ok().and_then(Result::ok).flatten();
                    if act.session_expiry == 0 {
                        if let Some(s) = state.take() {
                            registry::remove_routes(&act.gw, &act.client_id, &s.subs);
                        }
                    }
                    let _ = tx.send(state);
                    // No CONNACK was sent, so no DISCONNECT either (MQTT-3.14.0-1).
                    return act.close(None, false, ctx);
                }
                if act.phase != Phase::Registering {
                    return;
                }
                let state = match res {
                    Ok(Ok(state)) => state,
                    _ => return act.refuse(0x88, ctx),
                };
                let ack = ConnAck {
                    session_present: state.is_some(),
                    reason: 0,
                    assigned_client_id: assigned,
                    server_keep_alive: server_ka,
                    session_expiry: capped,
                    receive_max: cfg.receive_maximum,
                    max_packet_size: cfg.max_packet_size,
                    topic_alias_max: cfg.topic_alias_maximum,
                    retain_available: cfg.retain_available,
                    reason_string: None,
                };
                let _ = act.enc.connack(&ack, &mut act.out);
                act.phase = Phase::Connected;
                act.was_connected = true;
                slog::debug!(act.log, "connected"; "proto" => act.proto.level(),
                    "session_present" => state.is_some(),
                    "username" => act.username.as_deref().unwrap_or(""));
                if act.gw.inner.hooks.has_events() {
                    act.gw.inner.hooks.emit(Event::ClientConnected {
                        client_id: act.client_id.to_string(),
                        username: act.username.as_deref().map(String::from),
                        peer: act.peer,
                        protocol: act.proto.level(),
                        session_present: state.is_some(),
                    });
                }
                if let Some(state) = state {
                    act.resume(state, ctx);
                }
                let early = act
                    .extra
                    .as_mut()
                    .map(|e| std::mem::take(&mut e.early))
                    .unwrap_or_default();
                for p in early {
                    act.on_packet(p, ctx);
                }
                // Offline messages of a resumed session wait in its queues.
                act.pull_all(ctx);
                act.drive(ctx);
                act.flush(ctx);
            });
        // Spawned, not waited: a takeover may arrive while we register, and packets
        // sent right after CONNECT are kept in `early` until CONNACK is out.
        ctx.spawn(reg);
    }

    /// Answer CONNECT with a refusal and close (no will: the session never began).
    fn refuse(&mut self, reason: u8, ctx: &mut Context<Self>) {
        let ack = ConnAck {
            reason,
            receive_max: self.cfg().receive_maximum,
            max_packet_size: self.cfg().max_packet_size,
            ..Default::default()
        };
        let _ = self.enc.connack(&ack, &mut self.out);
        slog::info!(self.log, "connection refused"; "reason" => reason);
        self.phase = Phase::Registering;
        self.close(None, false, ctx);
    }

    /// Continue a persistent session: watch its queues and resend what was in flight.
    fn resume(&mut self, state: SessionState, ctx: &mut Context<Self>) {
        if !state.subs.is_empty() && self.gw.inner.hooks.has_authorize() {
            // Allowed for an earlier connection, perhaps another user or ACL.
            ctx.notify(Reauthorize);
        }
        for s in state.subs {
            let queue = QueueName(s.queue.as_str().into());
            self.watch(&queue, ctx);
            self.by_queue.insert(queue.clone(), s.raw.clone());
            self.subs.insert(
                s.raw.clone(),
                Sub {
                    state: s,
                    queue,
                    known_max: u64::MAX,
                    pulling: false,
                },
            );
        }
        self.qos2_in.extend(state.qos2_in);
        if state.inflight.is_empty() {
            return;
        }
        // MQTT-4.4.0-1: resend unacknowledged PUBLISH and PUBREL with their original ids,
        // in order, before anything new.
        self.resuming = true;
        for e in &state.inflight {
            self.inflight.insert(e.clone());
        }
        let storage = self.gw.inner.storage.clone();
        let retain = self.gw.inner.retain.clone();
        let entries = state.inflight;
        let fut = async move {
            let mut out = Vec::with_capacity(entries.len());
            for e in entries {
                let msg = if e.released {
                    None
                } else if let Some(topic) = &e.retained_topic {
                    retain
                        .send(MatchRetained {
                            filter: topic.clone(),
                        })
                        .await
                        .ok()
                        .and_then(|v| v.into_iter().next())
                } else {
                    let pull = Pull {
                        queue: QueueName(e.queue.as_str().into()),
                        from: e.offset,
                        max: 1,
                        max_bytes: 1,
                    };
                    match storage.pull(pull).await {
                        Ok(p) => p
                            .messages
                            .into_iter()
                            .find(|m| m.offset == e.offset)
                            .map(|m| m.message),
                        Err(_) => None,
                    }
                };
                out.push((e, msg));
            }
            out
        };
        ctx.spawn(fut.into_actor(self).map(|resends, act, ctx| {
            for (e, msg) in resends {
                if e.released {
                    let _ = act.enc.pubrel(e.packet_id, 0, &mut act.out);
                    continue;
                }
                let Some(msg) = msg else {
                    // Gone from the log (retention) or the retained store: nothing to resend.
                    act.inflight.remove(e.packet_id);
                    continue;
                };
                let p = OutPublish {
                    dup: true,
                    qos: e.qos,
                    retain: e.retain,
                    topic: &msg.topic,
                    packet_id: Some(e.packet_id),
                    payload: msg.payload.clone(),
                    props: &msg.props,
                    expiry_left: expiry_left(&msg, crate::now_ms()),
                    sub_ids: &e.sub_ids,
                };
                if act.enc.publish(&p, &mut act.out).is_err() {
                    act.inflight.remove(e.packet_id);
                }
            }
            act.resuming = false;
            act.flush(ctx);
            act.pull_all(ctx);
        }));
    }

    // ---------------------------------------------------------------- inbound

    fn on_packet(&mut self, p: Inbound, ctx: &mut Context<Self>) {
        match self.phase {
            Phase::Closed => return,
            Phase::AwaitConnect => {
                return match p {
                    Inbound::Connect(c) => self.on_connect(*c, ctx),
                    // MQTT-3.1.0-1 (the decoder already refuses anything else first).
                    _ => self.close(None, false, ctx),
                };
            }
            Phase::Registering => {
                // A client may send packets right after CONNECT, before CONNACK.
                if self.extra().early.len() >= MAX_EARLY_PACKETS {
                    return self.close(None, false, ctx);
                }
                self.extra().early.push(p);
                return;
            }
            Phase::Connected => {}
        }
        if self.closing.is_some() {
            // Nothing after DISCONNECT counts (MQTT-3.14.4-1).
            return;
        }
        match p {
            // MQTT-3.1.0-2: a second CONNECT is a protocol violation.
            Inbound::Connect(_) => self.protocol_error(0x82, "second CONNECT", ctx),
            Inbound::Publish(p) => self.on_publish(p, ctx),
            Inbound::PubAck { packet_id } => self.on_ack(packet_id, ctx),
            Inbound::PubRec { packet_id, failed } => {
                if failed {
                    self.on_ack(packet_id, ctx);
                } else if let Some(e) = self.inflight.get_mut(packet_id) {
                    e.released = true;
                    self.dirty = true;
                    let _ = self.enc.pubrel(packet_id, 0, &mut self.out);
                } else {
                    // v5: PUBREL with 0x92 Packet Identifier not found.
                    let _ = self.enc.pubrel(packet_id, 0x92, &mut self.out);
                }
            }
            Inbound::PubComp { packet_id } => self.on_ack(packet_id, ctx),
            Inbound::PubRel { packet_id } => self.pipeline.push_back(Op::PubRel(packet_id)),
            Inbound::Subscribe {
                packet_id,
                sub_id,
                filters,
            } => self.pipeline.push_back(Op::Subscribe {
                packet_id,
                sub_id,
                filters,
            }),
            Inbound::Unsubscribe { packet_id, filters } => self
                .pipeline
                .push_back(Op::Unsubscribe { packet_id, filters }),
            Inbound::PingReq => {
                let _ = self.enc.pingresp(&mut self.out);
            }
            Inbound::Disconnect {
                reason,
                session_expiry,
            } => {
                if let Some(se) = session_expiry {
                    // MQTT-3.14.2-2: cannot turn a zero expiry into a non-zero one.
                    if self.session_expiry == 0 && se != 0 {
                        return self.protocol_error(0x82, "session expiry set on DISCONNECT", ctx);
                    }
                    self.session_expiry = se.min(self.cfg().max_session_expiry_secs);
                }
                // MQTT-3.14.4-3: a normal DISCONNECT discards the will; v5 0x04 keeps it.
                let will = reason == 0x04;
                self.end = DisconnectReason::Normal;
                self.close_after_pipeline(will, ctx);
            }
            Inbound::Auth => self.protocol_error(0x82, "AUTH without authentication method", ctx),
            Inbound::ServerOnly => self.protocol_error(0x82, "server-only packet", ctx),
        }
    }

    fn on_publish(&mut self, mut p: Box<Publish>, ctx: &mut Context<Self>) {
        let v5 = self.proto.is_v5();
        // Topic alias (v5 §3.3.2.3.4).
        if let Some(alias) = p.topic_alias {
            if alias == 0 || alias > self.cfg().topic_alias_maximum {
                return self.protocol_error(0x94, "topic alias out of range", ctx);
            }
            if p.topic.is_empty() {
                match self.extra().aliases.get(&alias) {
                    Some(t) => p.topic = t.clone(),
                    None => return self.protocol_error(0x82, "unknown topic alias", ctx),
                }
            } else {
                self.extra().aliases.insert(alias, p.topic.clone());
            }
        }
        if let Err(e) = topic::validate_name(&p.topic, self.cfg().max_topic_levels) {
            // MQTT-3.3.2-2 (wildcards), MQTT-4.7.3-1 (empty): 0x90 Topic Name invalid.
            return self.protocol_error(0x90, &format!("invalid topic name: {e:?}"), ctx);
        }
        if p.has_sub_ids {
            return self.protocol_error(0x82, "subscription identifier in PUBLISH", ctx);
        }
        if p.retain && !self.cfg().retain_available {
            return self.protocol_error(0x9A, "retain not supported", ctx);
        }
        if p.qos == 2 {
            if let Some(id) = p.packet_id {
                if self.qos2_in.contains(&id) {
                    // MQTT-4.3.3-9: a resent QoS 2 PUBLISH is acknowledged, not delivered again.
                    let _ = self.enc.pubrec(id, 0, &mut self.out);
                    self.permits.add_permits(1);
                    return;
                }
                if !self.extra().qos2_pending.insert(id) {
                    // The first copy is still being stored; its PUBREC will answer both.
                    self.permits.add_permits(1);
                    return;
                }
            }
        }
        if v5 && p.qos > 0 {
            // Stored and awaiting PUBREL, plus received and not yet acknowledged
            // (queued or being stored).
            let unacked = self.qos2_in.len() + self.unacked_in;
            if unacked >= self.cfg().receive_maximum as usize {
                // MQTT-3.3.4-8 / v5 §3.3.4: 0x93 Receive Maximum exceeded.
                return self.protocol_error(0x93, "receive maximum exceeded", ctx);
            }
        }
        if v5 && p.props.payload_format == Some(1) && std::str::from_utf8(&p.payload).is_err() {
            // v5 §3.3.2.3.2: the payload is not the UTF-8 it claims to be: 0x99.
            match (p.qos, p.packet_id) {
                (1, Some(id)) => {
                    let _ = self.enc.puback(id, 0x99, &mut self.out);
                }
                (2, Some(id)) => {
                    self.extra().qos2_pending.remove(&id);
                    let _ = self.enc.pubrec(id, 0x99, &mut self.out);
                }
                _ => {}
            }
            self.permits.add_permits(1);
            return;
        }
        if p.qos > 0 {
            self.unacked_in += 1;
        }
        self.pipeline.push_back(Op::Publish(p));
    }

    /// Run the next pipeline step(s) unless one is already running.
    fn drive(&mut self, ctx: &mut Context<Self>) {
        while !self.busy && self.phase == Phase::Connected {
            match self.pipeline.front() {
                None => {
                    if let Some(will) = self.closing.take() {
                        self.close(None, will, ctx);
                    }
                    return;
                }
                Some(Op::PubRel(_)) => {
                    if let Some(Op::PubRel(id)) = self.pipeline.pop_front() {
                        self.on_pubrel(id);
                    }
                }
                Some(Op::Publish(_)) => {
                    let mut batch = Vec::new();
                    while batch.len() < MAX_PUBLISH_BATCH {
                        match self.pipeline.front() {
                            Some(Op::Publish(_)) => {
                                if let Some(Op::Publish(p)) = self.pipeline.pop_front() {
                                    batch.push(*p);
                                }
                            }
                            _ => break,
                        }
                    }
                    self.busy = true;
                    self.publish_batch(batch, ctx);
                }
                Some(Op::Subscribe { .. }) => {
                    if let Some(Op::Subscribe {
                        packet_id,
                        sub_id,
                        filters,
                    }) = self.pipeline.pop_front()
                    {
                        self.busy = true;
                        self.subscribe(packet_id, sub_id, filters, ctx);
                    }
                }
                Some(Op::Unsubscribe { .. }) => {
                    if let Some(Op::Unsubscribe { packet_id, filters }) = self.pipeline.pop_front()
                    {
                        self.busy = true;
                        self.unsubscribe(packet_id, filters, ctx);
                    }
                }
            }
        }
    }

    fn on_pubrel(&mut self, id: u16) {
        let known = self.qos2_in.remove(&id);
        if known && self.session_expiry > 0 {
            self.gw.inner.storage.kv.do_send(KvPut {
                key: qos2_key(&self.client_id, id),
                value: None,
            });
        }
        // v5: 0x92 Packet Identifier not found; v3 always completes.
        let _ = self
            .enc
            .pubcomp(id, if known { 0 } else { 0x92 }, &mut self.out);
    }

    /// Route, retain and append a batch of publishes, then acknowledge them in order.
    fn publish_batch(&mut self, batch: Vec<Publish>, ctx: &mut Context<Self>) {
        let hooks = &self.gw.inner.hooks;
        if hooks.has_authorize() || hooks.has_on_publish() {
            return self.hook_batch(batch, ctx);
        }
        self.route_batch(batch, Vec::new(), ctx)
    }

    /// Ask the authorization hooks and the publish interceptors about each message of
    /// `batch` (in a spawned future), then route what they let through. A refused
    /// message is acknowledged with 0x87 (v5) or acknowledged and dropped (v3); one an
    /// interceptor drops is acknowledged.
    fn hook_batch(&mut self, mut batch: Vec<Publish>, ctx: &mut Context<Self>) {
        let hooks = self.gw.inner.hooks.clone();
        let client_id = self.client_id.to_string();
        let username = self.username.as_deref().map(String::from);
        let deny_code = if self.proto.is_v5() { 0x87 } else { 0 };
        let max_levels = self.cfg().max_topic_levels;
        let fut = async move {
            let mut verdicts = Vec::with_capacity(batch.len());
            for p in &mut batch {
                if hooks.has_authorize() {
                    let ask = Authorize {
                        client_id: client_id.clone(),
                        username: username.clone(),
                        action: Action::Publish {
                            topic: p.topic.clone(),
                            qos: p.qos,
                            retain: p.retain,
                        },
                    };
                    if !hooks.authorize(ask).await {
                        verdicts.push(Some(deny_code));
                        continue;
                    }
                }
                if hooks.has_on_publish() {
                    let msg = Message {
                        topic: std::mem::take(&mut p.topic),
                        payload: p.payload.clone(),
                        qos: p.qos,
                        retain: p.retain,
                        publisher: client_id.clone(),
                        timestamp_ms: crate::now_ms(),
                        props: std::mem::take(&mut p.props),
                    };
                    match hooks.on_publish(msg).await {
                        Some(m) if topic::validate_name(&m.topic, max_levels).is_ok() => {
                            p.topic = m.topic;
                            p.payload = m.payload;
                            p.props = m.props;
                        }
                        _ => {
                            verdicts.push(Some(0));
                            continue;
                        }
                    }
                }
                verdicts.push(None);
            }
            (batch, verdicts)
        };
        ctx.spawn(
            fut.into_actor(self)
                .map(|(batch, verdicts), act, ctx| act.route_batch(batch, verdicts, ctx)),
        );
    }

    /// Route `batch` (all but the messages with a verdict) and append it.
    fn route_batch(
        &mut self,
        batch: Vec<Publish>,
        verdicts: Vec<Option<u8>>,
        ctx: &mut Context<Self>,
    ) {
        let epoch = self.gw.inner.route_epoch.load(Ordering::Acquire);
        if epoch != self.extra().routes_epoch || self.extra().routes.len() > MAX_ROUTE_CACHE {
            self.extra().routes.clear();
            self.extra().routes_epoch = epoch;
        }
        // Each message's route: from the cache, or asked of its shard. Routes through a
        // shared-subscription group are never cached (the group's next member differs
        // per message), so they are asked once per message.
        let mut routes: Vec<Option<Arc<[QueueName]>>> = vec![None; batch.len()];
        let nshards = self.gw.inner.shards.len();
        let mut misses: Vec<(Vec<usize>, Vec<String>)> = vec![Default::default(); nshards];
        for (i, p) in batch.iter().enumerate() {
            if verdicts.get(i).copied().flatten().is_some() {
                continue;
            }
            match self.extra().routes.get(&p.topic) {
                Some(q) => routes[i] = Some(q.clone()),
                None => {
                    let (idx, topics) = &mut misses[shard_of(first_level(&p.topic), nshards)];
                    idx.push(i);
                    topics.push(p.topic.clone());
                }
            }
        }
        if misses.iter().all(|(idx, _)| idx.is_empty()) {
            return self.append_batch(batch, verdicts, routes, ctx);
        }
        let asks: Vec<_> = misses
            .into_iter()
            .enumerate()
            .filter(|(_, (idx, _))| !idx.is_empty())
            .map(|(i, (idx, topics))| {
                let req = self.gw.inner.shards[i].send(Route {
                    topics,
                    key: self.client_id.clone(),
                });
                async move { (idx, req.await) }
            })
            .collect();
        let fut = futures::future::join_all(asks);
        ctx.spawn(fut.into_actor(self).map(move |answers, act, ctx| {
            let mut routes = routes;
            for (idx, res) in answers {
                let Ok(routed) = res else {
                    return act.close(Some(0x80), true, ctx);
                };
                for (i, r) in idx.into_iter().zip(routed) {
                    let queues: Arc<[QueueName]> = r.queues.into();
                    if !r.shared {
                        let topic = batch[i].topic.clone();
                        act.extra().routes.insert(topic, queues.clone());
                    }
                    routes[i] = Some(queues);
                }
            }
            act.append_batch(batch, verdicts, routes, ctx);
        }));
    }

    /// Append `batch`; a message with a verdict (`Some(reason)`) is not stored, only
    /// acknowledged with that reason.
    fn append_batch(
        &mut self,
        batch: Vec<Publish>,
        verdicts: Vec<Option<u8>>,
        mut routes: Vec<Option<Arc<[QueueName]>>>,
        ctx: &mut Context<Self>,
    ) {
        let now = crate::now_ms();
        let retain_ok = self.cfg().retain_available;
        let mut retained = Vec::new();
        let mut appends = Vec::with_capacity(batch.len());
        let mut acks = Vec::with_capacity(batch.len());
        for (i, p) in batch.into_iter().enumerate() {
            if let Some(code) = verdicts.get(i).copied().flatten() {
                acks.push((p.qos, p.packet_id, Some(code)));
                continue;
            }
            let queues: Vec<QueueName> = routes
                .get_mut(i)
                .and_then(Option::take)
                .map(|q| q.to_vec())
                .unwrap_or_else(|| {
                    vec![crate::mqtt::shard::topic_queue(
                        &p.topic,
                        &self.client_id,
                        self.cfg().partitions,
                    )]
                });
            let msg = Message {
                topic: p.topic,
                // The decoded payload is a view into this connection's read buffer;
                // storage caches messages, and a cached view would pin the whole buffer.
                payload: Bytes::copy_from_slice(&p.payload),
                qos: p.qos,
                retain: p.retain,
                publisher: self.client_id.to_string(),
                timestamp_ms: now,
                props: p.props,
            };
            if msg.retain && retain_ok {
                retained.push(SetRetained {
                    message: msg.clone(),
                });
            }
            acks.push((msg.qos, p.packet_id, None));
            appends.push(Append {
                message: msg,
                queues,
            });
        }
        let storage = self.gw.inner.storage.clone();
        let retain = self.gw.inner.retain.clone();
        let kv = storage.kv.clone();
        let qos2_keys: Vec<String> = if self.session_expiry > 0 {
            acks.iter()
                .filter(|(q, _, verdict)| *q == 2 && verdict.is_none())
                .filter_map(|(_, id, _)| id.map(|id| qos2_key(&self.client_id, id)))
                .collect()
        } else {
            Vec::new()
        };
        let fut = async move {
            for r in retained {
                // A refused retained message (quota) is still delivered normally.
                let _ = retain.send(r).await;
            }
            // One message for the whole batch: stored in order, one group commit.
            let results = storage.append_batch(appends).await;
            // Inbound QoS 2 state is durable before PUBREC (exactly once across restarts).
            let puts: Vec<_> = qos2_keys
                .into_iter()
                .map(|key| {
                    kv.send(KvPut {
                        key,
                        value: Some(Vec::new()),
                    })
                })
                .collect();
            futures::future::join_all(puts).await;
            results
        };
        ctx.spawn(fut.into_actor(self).map(move |results, act, ctx| {
            act.permits.add_permits(acks.len());
            let acked = acks.iter().filter(|(q, _, _)| *q > 0).count();
            act.unacked_in = act.unacked_in.saturating_sub(acked);
            let mut failed = false;
            let mut results = results.into_iter();
            for (qos, id, verdict) in acks {
                let (ok, code) = match verdict {
                    Some(code) => (code < 0x80, code),
                    None => match results.next() {
                        Some(Ok(_)) => (true, 0),
                        // A full disk is a quota (v5 0x97, Quota exceeded): the
                        // commitlog logs it once, not per message.
                        Some(Err(StorageError::NoSpace(_))) => {
                            failed = true;
                            (false, 0x97)
                        }
                        Some(Err(e)) => {
                            slog::error!(act.log, "append failed"; "error" => %e);
                            failed = true;
                            (false, 0x80)
                        }
                        None => {
                            failed = true;
                            (false, 0x80)
                        }
                    },
                };
                // v3 has no negative acknowledgement: nothing is sent for a failure,
                // and the connection is closed below so the client resends.
                let answer = ok || act.proto.is_v5();
                match (qos, id) {
                    (1, Some(id)) if answer => {
                        let _ = act.enc.puback(id, code, &mut act.out);
                    }
                    (2, Some(id)) => {
                        act.extra().qos2_pending.remove(&id);
                        if ok {
                            act.qos2_in.insert(id);
                        }
                        if ok || act.proto.is_v5() {
                            let _ = act.enc.pubrec(id, code, &mut act.out);
                        }
                    }
                    _ => {}
                }
            }
            act.busy = false;
            if failed && !act.proto.is_v5() {
                // v3 has no negative acknowledgement: close so the client resends later.
                return act.close(None, true, ctx);
            }
            act.drive(ctx);
            act.flush(ctx);
        }));
    }

    fn subscribe(
        &mut self,
        packet_id: u16,
        sub_id: Option<u32>,
        filters: Vec<(String, SubOpts)>,
        ctx: &mut Context<Self>,
    ) {
        if !self.gw.inner.hooks.has_authorize() {
            return self.subscribe_checked(packet_id, sub_id, filters, Vec::new(), ctx);
        }
        // Ask the authorization hooks in a spawned future: only this client waits.
        let hooks = self.gw.inner.hooks.clone();
        let client_id = self.client_id.to_string();
        let username = self.username.as_deref().map(String::from);
        let asks: Vec<Authorize> = filters
            .iter()
            .map(|(raw, opts)| Authorize {
                client_id: client_id.clone(),
                username: username.clone(),
                action: Action::Subscribe {
                    filter: raw.clone(),
                    qos: opts.qos,
                },
            })
            .collect();
        let fut = async move {
            let mut denied = Vec::with_capacity(asks.len());
            for a in asks {
                denied.push(!hooks.authorize(a).await);
            }
            denied
        };
        ctx.spawn(fut.into_actor(self).map(move |denied, act, ctx| {
            act.subscribe_checked(packet_id, sub_id, filters, denied, ctx)
        }));
    }

    /// SUBSCRIBE, with the filters the hooks refused (`denied[i]`) answered 0x87 (v5)
    /// or 0x80 (v3).
    fn subscribe_checked(
        &mut self,
        packet_id: u16,
        sub_id: Option<u32>,
        filters: Vec<(String, SubOpts)>,
        denied: Vec<bool>,
        ctx: &mut Context<Self>,
    ) {
        let max_levels = self.cfg().max_topic_levels;
        let nshards = self.gw.inner.shards.len();
        let v5 = self.proto.is_v5();
        let mut codes = Vec::with_capacity(filters.len());
        // (raw, filter, group, opts, is_new)
        let mut plans: Vec<(String, String, Option<String>, SubOpts, bool)> = Vec::new();
        // `mqtt.max_subscriptions`: new filters beyond it are refused; replacing an
        // existing subscription is always allowed.
        let max_subs = match self.cfg().max_subscriptions {
            0 => usize::MAX,
            n => n,
        };
        let mut held = self.subs.len();
        for (i, (raw, opts)) in filters.into_iter().enumerate() {
            if denied.get(i).copied().unwrap_or(false) {
                codes.push(if v5 { 0x87 } else { 0x80 });
                continue;
            }
            match parse_filter(&raw, max_levels) {
                Err(_) => codes.push(if v5 { 0x8F } else { 0x80 }),
                Ok(pf) => {
                    if pf.share_group.is_some() && opts.no_local {
                        // MQTT-3.8.3-4: No Local on a shared subscription is a protocol error.
                        self.busy = false;
                        return self.protocol_error(0x82, "no local on shared subscription", ctx);
                    }
                    let is_new =
                        !self.subs.contains_key(&raw) && !plans.iter().any(|(r, ..)| *r == raw);
                    if is_new {
                        if held >= max_subs {
                            // 0x97 Quota exceeded (v5); v3 has only 0x80 Failure.
                            codes.push(if v5 { 0x97 } else { 0x80 });
                            continue;
                        }
                        held += 1;
                    }
                    codes.push(opts.qos);
                    plans.push((
                        raw.clone(),
                        pf.filter.to_string(),
                        pf.share_group.map(|g| g.to_string()),
                        opts,
                        is_new,
                    ));
                }
            }
        }
        let owner = self.client_id.clone();
        let shards = self.gw.inner.shards.clone();
        let storage = self.gw.inner.storage.clone();
        let retain = self.gw.inner.retain.clone();
        let retain_ok = self.cfg().retain_available;
        let steps = plans.clone();
        let fut = async move {
            let mut out = Vec::new();
            for (_raw, filter, group, opts, is_new) in steps {
                let kind = match &group {
                    Some(g) => RouteKind::Shared { group: g.clone() },
                    None => RouteKind::Filter,
                };
                let mut queue = None;
                for i in shards_for_filter(&filter, nshards) {
                    if let Ok(q) = shards[i]
                        .send(AddRoute {
                            owner: owner.clone(),
                            filter: filter.clone(),
                            kind: kind.clone(),
                        })
                        .await
                    {
                        queue = Some(q);
                    }
                }
                let Some(queue) = queue else {
                    out.push(None);
                    continue;
                };
                // A new subscription reads what arrives from now on.
                let next = storage
                    .bounds(queue.clone())
                    .await
                    .map(|b| b.max_offset)
                    .unwrap_or(0);
                // Retained messages: Retain Handling 0 always, 1 if new, 2 never; and
                // never for shared subscriptions (v5 §4.8.2).
                let send_retained = retain_ok
                    && group.is_none()
                    && (opts.retain_handling == 0 || (opts.retain_handling == 1 && is_new));
                let retained = if send_retained {
                    retain
                        .send(MatchRetained {
                            filter: filter.clone(),
                        })
                        .await
                        .unwrap_or_default()
                } else {
                    Vec::new()
                };
                out.push(Some((queue, next, retained)));
            }
            out
        };
        ctx.spawn(fut.into_actor(self).map(move |results, act, ctx| {
            let mut code_iter = 0usize;
            let mut codes = codes;
            let mut retained_out = Vec::new();
            for ((raw, filter, group, opts, _), res) in plans.into_iter().zip(results) {
                // Find this plan's code slot (plans skip invalid filters).
                while code_iter < codes.len() && codes[code_iter] >= 0x80 {
                    code_iter += 1;
                }
                let slot = code_iter;
                code_iter += 1;
                let Some((queue, next, retained)) = res else {
                    if slot < codes.len() {
                        codes[slot] = 0x80;
                    }
                    continue;
                };
                if act.gw.inner.hooks.has_events() {
                    act.gw.inner.hooks.emit(Event::Subscribed {
                        client_id: act.client_id.to_string(),
                        filter: raw.clone(),
                        qos: opts.qos,
                    });
                }
                let sub_ids: Vec<u32> = sub_id.into_iter().collect();
                for m in retained {
                    retained_out.push((m, opts.qos, sub_ids.clone()));
                }
                match act.subs.get_mut(&raw) {
                    Some(existing) => {
                        // MQTT-3.8.4-3: replace the options, keep the queue and position.
                        existing.state.qos = opts.qos;
                        existing.state.no_local = opts.no_local;
                        existing.state.retain_as_published = opts.retain_as_published;
                        existing.state.retain_handling = opts.retain_handling;
                        existing.state.sub_id = sub_id;
                    }
                    None => {
                        act.watch(&queue, ctx);
                        act.by_queue.insert(queue.clone(), raw.clone());
                        act.subs.insert(
                            raw.clone(),
                            Sub {
                                state: SubState {
                                    raw: raw.clone(),
                                    filter,
                                    share_group: group,
                                    qos: opts.qos,
                                    no_local: opts.no_local,
                                    retain_as_published: opts.retain_as_published,
                                    retain_handling: opts.retain_handling,
                                    sub_id,
                                    queue: queue.as_str().to_string(),
                                    next,
                                },
                                queue,
                                known_max: next,
                                pulling: false,
                            },
                        );
                    }
                }
            }
            act.dirty = true;
            act.persist_then(ctx, move |act, ctx| {
                let _ = act.enc.suback(packet_id, &codes, &mut act.out);
                // Retained messages follow the SUBACK (MQTT-3.3.1-8: with RETAIN set).
                if !retained_out.is_empty() {
                    act.extra().retained_backlog.extend(retained_out);
                }
                act.send_retained_backlog();
                act.busy = false;
                act.drive(ctx);
                act.flush(ctx);
            });
        }));
    }

    /// Drop the subscription `raw`: stop watching and routing to its queue. False if
    /// there was none.
    fn remove_subscription(&mut self, raw: String) -> bool {
        let Some(sub) = self.subs.remove(&raw) else {
            return false;
        };
        self.by_queue.remove(&sub.queue);
        self.unwatch(&sub.queue);
        registry::remove_routes(&self.gw, &self.client_id, &[sub.state]);
        if self.gw.inner.hooks.has_events() {
            self.gw.inner.hooks.emit(Event::Unsubscribed {
                client_id: self.client_id.to_string(),
                filter: raw,
            });
        }
        true
    }

    fn unsubscribe(&mut self, packet_id: u16, filters: Vec<String>, ctx: &mut Context<Self>) {
        let mut codes = Vec::with_capacity(filters.len());
        for raw in filters {
            // v5 0x11: No subscription existed.
            codes.push(if self.remove_subscription(raw) {
                0x00
            } else {
                0x11
            });
        }
        self.dirty = true;
        self.persist_then(ctx, move |act, ctx| {
            let _ = act.enc.unsuback(packet_id, &codes, &mut act.out);
            act.busy = false;
            act.drive(ctx);
            act.flush(ctx);
        });
    }

    /// For a persistent session, write its state and then run `then`; otherwise run
    /// `then` at once.
    fn persist_then<F>(&mut self, ctx: &mut Context<Self>, then: F)
    where
        F: FnOnce(&mut Self, &mut Context<Self>) + 'static,
    {
        if self.session_expiry == 0 {
            return then(self, ctx);
        }
        let put = self.checkpoint_put();
        ctx.spawn(
            async move {
                let _ = put.await;
            }
            .into_actor(self)
            .map(move |_, act, ctx| then(act, ctx)),
        );
    }

    fn snapshot(&self) -> SessionState {
        SessionState {
            client_id: self.client_id.to_string(),
            expiry_secs: self.session_expiry,
            saved_at_ms: crate::now_ms(),
            subs: self.subs.values().map(|s| s.state.clone()).collect(),
            inflight: self.inflight.in_order(),
            qos2_in: self.qos2_in.iter().copied().collect(),
        }
    }

    fn checkpoint_put(&mut self) -> impl std::future::Future<Output = ()> {
        self.dirty = false;
        let put = self.gw.inner.storage.kv.send(KvPut {
            key: session_key(&self.client_id),
            value: Some(self.snapshot().encode()),
        });
        async move {
            let _ = put.await;
        }
    }

    // ---------------------------------------------------------------- outbound

    fn watch(&self, queue: &QueueName, ctx: &mut Context<Self>) {
        self.gw.inner.storage.watch(Watch {
            queue: queue.clone(),
            id: self.conn_id,
            watcher: ctx.address().recipient(),
        });
    }

    fn unwatch(&self, queue: &QueueName) {
        self.gw.inner.storage.unwatch(Unwatch {
            queue: queue.clone(),
            id: self.conn_id,
        });
    }

    fn on_ack(&mut self, packet_id: u16, ctx: &mut Context<Self>) {
        if self.inflight.remove(packet_id).is_some() {
            self.dirty = true;
            if self.gw.inner.hooks.has_events() {
                self.gw.inner.hooks.emit(Event::MessageAcked {
                    client_id: self.client_id.to_string(),
                    packet_id,
                });
            }
            if self.window_blocked
                || self
                    .extra
                    .as_ref()
                    .is_some_and(|e| !e.retained_backlog.is_empty())
            {
                self.window_blocked = false;
                self.send_retained_backlog();
                self.pull_all(ctx);
            }
        }
    }

    /// Send one message to the client, taking a window slot for QoS 1/2.
    #[allow(clippy::too_many_arguments)]
    fn deliver(
        &mut self,
        msg: &Message,
        sub_qos: u8,
        retain: bool,
        sub_ids: &[u32],
        queue: &str,
        offset: u64,
        retained_topic: Option<String>,
    ) -> Delivery {
        let left = expiry_left(msg, crate::now_ms());
        if left == Some(0) {
            return Delivery::Skipped;
        }
        let qos = msg.qos.min(sub_qos);
        let packet_id = if qos > 0 {
            match self.inflight.alloc_id() {
                Some(id) => Some(id),
                None => {
                    self.window_blocked = true;
                    return Delivery::WindowFull;
                }
            }
        } else {
            None
        };
        let p = OutPublish {
            dup: false,
            qos,
            retain,
            topic: &msg.topic,
            packet_id,
            payload: msg.payload.clone(),
            props: &msg.props,
            expiry_left: left,
            sub_ids,
        };
        if self.enc.publish(&p, &mut self.out).is_err() {
            // MQTT-3.1.2-25: larger than the client accepts: discard as if delivered.
            return Delivery::Skipped;
        }
        if let Some(packet_id) = packet_id {
            self.inflight.insert(InflightEntry {
                packet_id,
                queue: queue.to_string(),
                offset,
                retained_topic,
                qos,
                retain,
                sub_ids: sub_ids.to_vec(),
                released: false,
            });
        }
        if self.gw.inner.hooks.has_events() {
            self.gw.inner.hooks.emit(Event::MessageDelivered {
                client_id: self.client_id.to_string(),
                topic: msg.topic.clone(),
                qos,
            });
        }
        Delivery::Sent
    }

    fn send_retained_backlog(&mut self) {
        if self.extra.is_none() {
            return;
        }
        while let Some((msg, qos, sub_ids)) = self.extra().retained_backlog.pop_front() {
            let topic = msg.topic.clone();
            if self.deliver(&msg, qos, true, &sub_ids, "", 0, Some(topic)) == Delivery::WindowFull {
                self.extra()
                    .retained_backlog
                    .push_front((msg, qos, sub_ids));
                return;
            }
        }
    }

    fn pull_all(&mut self, ctx: &mut Context<Self>) {
        let queues: Vec<QueueName> = self
            .subs
            .values()
            .filter(|s| !s.pulling && s.state.next < s.known_max)
            .map(|s| s.queue.clone())
            .collect();
        for q in queues {
            self.try_pull(&q, ctx);
        }
    }

    fn try_pull(&mut self, queue: &QueueName, ctx: &mut Context<Self>) {
        if self.phase != Phase::Connected || self.resuming {
            return;
        }
        if !self.write_room() {
            self.wants_drain.store(true, Ordering::Release);
            // The writer may have drained between the check and the flag.
            if !self.write_room() {
                return;
            }
        }
        let window = self.inflight.free();
        let batch = self.cfg().pull_batch;
        let max_bytes = self.cfg().max_write_buffer;
        let Some(raw) = self.by_queue.get(queue) else {
            return;
        };
        let Some(sub) = self.subs.get_mut(raw) else {
            return;
        };
        if sub.pulling || sub.state.next >= sub.known_max {
            return;
        }
        let max = if sub.state.qos > 0 {
            window.min(batch)
        } else {
            batch
        };
        if max == 0 {
            self.window_blocked = true;
            return;
        }
        sub.pulling = true;
        let pull = Pull {
            queue: queue.clone(),
            from: sub.state.next,
            max,
            max_bytes,
        };
        let q = queue.clone();
        let storage = self.gw.inner.storage.clone();
        ctx.spawn(
            async move { storage.pull(pull).await }
                .into_actor(self)
                .map(move |res, act, ctx| act.on_pulled(q, res, ctx)),
        );
    }

    fn on_pulled(
        &mut self,
        queue: QueueName,
        res: Result<Pulled, StorageError>,
        ctx: &mut Context<Self>,
    ) {
        let Some(raw) = self.by_queue.get(&queue).cloned() else {
            return;
        };
        let pulled = match res {
            Ok(p) => p,
            Err(e) => {
                slog::warn!(self.log, "pull failed"; "queue" => %queue, "error" => %e);
                if let Some(sub) = self.subs.get_mut(&raw) {
                    sub.pulling = false;
                }
                return;
            }
        };
        let Some(sub) = self.subs.get(&raw) else {
            return;
        };
        let (qos, no_local, rap, sub_ids) = (
            sub.state.qos,
            sub.state.no_local,
            sub.state.retain_as_published,
            sub.state.sub_id.into_iter().collect::<Vec<u32>>(),
        );
        let start = sub.state.next;
        let mut next = pulled.next.max(start);
        let v5 = self.proto.is_v5();
        for m in &pulled.messages {
            if m.offset < start {
                continue;
            }
            // MQTT-3.8.3-3: No Local: not back to the publisher.
            if no_local && m.message.publisher == *self.client_id {
                continue;
            }
            // MQTT-3.3.1-9 / v5 Retain As Published.
            let retain = v5 && rap && m.message.retain;
            let d = self.deliver(
                &m.message,
                qos,
                retain,
                &sub_ids,
                queue.as_str(),
                m.offset,
                None,
            );
            if d == Delivery::WindowFull {
                next = m.offset;
                break;
            }
        }
        if pulled.min_offset > next {
            next = pulled.min_offset;
        }
        if let Some(sub) = self.subs.get_mut(&raw) {
            sub.pulling = false;
            sub.state.next = next;
            sub.known_max = if sub.known_max == u64::MAX {
                pulled.max_offset
            } else {
                sub.known_max.max(pulled.max_offset)
            };
        }
        self.dirty = true;
        self.flush(ctx);
        self.try_pull(&queue, ctx);
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        self.ticks = self.ticks.wrapping_add(1);
        if let Some(ka) = self.keep_alive {
            if self.phase == Phase::Connected && self.last_seen.elapsed() > ka {
                slog::info!(self.log, "keep-alive timeout");
                self.end = DisconnectReason::KeepAliveTimeout;
                // v5 0x8D Keep Alive timeout; the will is published.
                return self.close(Some(0x8D), true, ctx);
            }
        }
        if self.phase != Phase::Connected {
            return;
        }
        if self.ticks.is_multiple_of(PROBE_TICKS) {
            for s in self.subs.values_mut() {
                if !s.pulling {
                    s.known_max = u64::MAX;
                }
            }
            self.pull_all(ctx);
        }
        if self.session_expiry > 0 && self.dirty && self.ticks.is_multiple_of(CHECKPOINT_TICKS) {
            let put = self.checkpoint_put();
            ctx.spawn(put.into_actor(self));
        }
    }
}

impl Actor for MqttSession {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let timeout = Duration::from_secs(self.cfg().connect_timeout_secs.max(1));
        self.connect_timer = Some(ctx.run_later(timeout, |act, ctx| {
            if act.phase == Phase::AwaitConnect {
                slog::debug!(act.log, "no CONNECT in time; closing");
                act.close(None, false, ctx);
            }
        }));
        ctx.run_interval(TICK, |act, ctx| act.tick(ctx));
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        // Dropping the sender lets the IO task write what is left and close; closing the
        // semaphore frees it if it waits for pipeline room; the abort bounds the rest (a
        // peer that never reads what is left).
        self.writer = None;
        self.permits.close();
        if let Some(task) = self.io_task.take() {
            actix::spawn(async move {
                tokio::time::sleep(CLOSE_GRACE).await;
                task.abort();
            });
        }
        for q in self.by_queue.keys() {
            self.unwatch(q);
        }
        if self.was_connected && self.gw.inner.hooks.has_events() {
            self.gw.inner.hooks.emit(Event::ClientDisconnected {
                client_id: self.client_id.to_string(),
                reason: self.end,
            });
        }
        if self.client_id.is_empty() || self.handed_off {
            return;
        }
        if !self.was_connected {
            // CONNECT never completed: leave any persisted session as it was.
            self.gw.inner.registry.do_send(Unregister {
                client_id: self.client_id.clone(),
                conn_id: self.conn_id,
                state: None,
                will: None,
                discard: false,
            });
            return;
        }
        let will = if self.will_on_close {
            self.will.take().map(|w| *w)
        } else {
            None
        };
        let state = if self.session_expiry > 0 {
            Some(self.snapshot())
        } else {
            let subs: Vec<SubState> = self.subs.values().map(|s| s.state.clone()).collect();
            registry::remove_routes(&self.gw, &self.client_id, &subs);
            None
        };
        self.gw.inner.registry.do_send(Unregister {
            client_id: self.client_id.clone(),
            conn_id: self.conn_id,
            discard: state.is_none(),
            state,
            will,
        });
    }
}

impl Handler<Frames> for MqttSession {
    type Result = ();
    fn handle(&mut self, m: Frames, ctx: &mut Context<Self>) {
        self.last_seen = Instant::now();
        for p in m.0 {
            self.on_packet(p, ctx);
        }
        self.drive(ctx);
        self.flush(ctx);
    }
}

impl Handler<ReadEnded> for MqttSession {
    type Result = ();
    fn handle(&mut self, m: ReadEnded, ctx: &mut Context<Self>) {
        match m.0 {
            None => {
                slog::debug!(self.log, "connection closed by peer");
                self.close_after_pipeline(true, ctx);
            }
            Some(e) => {
                if let (Some(proto), Phase::AwaitConnect) = (e.refuse, self.phase) {
                    // MQTT-3.1.3-9: CONNACK 0x02 (v5 0x85), then close.
                    self.proto = proto;
                    self.enc = Encoder::new(proto);
                    return self.refuse(0x85, ctx);
                }
                slog::info!(self.log, "bad input; closing"; "error" => &e.message, "reason" => e.reason);
                self.end = if e.io {
                    DisconnectReason::Abnormal
                } else {
                    DisconnectReason::ProtocolError
                };
                self.close_with(Some(e.reason), Some(&e.message), true, ctx);
            }
        }
    }
}

impl Handler<Drained> for MqttSession {
    type Result = ();
    fn handle(&mut self, m: Drained, ctx: &mut Context<Self>) {
        if m.failed {
            return self.close(None, true, ctx);
        }
        self.pull_all(ctx);
    }
}

impl Handler<Arrived> for MqttSession {
    type Result = ();
    fn handle(&mut self, m: Arrived, ctx: &mut Context<Self>) {
        let Some(raw) = self.by_queue.get(&m.queue) else {
            return;
        };
        if let Some(sub) = self.subs.get_mut(raw) {
            if sub.known_max == u64::MAX || sub.known_max < m.max_offset {
                sub.known_max = m.max_offset;
            }
        }
        self.try_pull(&m.queue, ctx);
    }
}

impl Handler<Reauthorize> for MqttSession {
    type Result = ();

    fn handle(&mut self, _: Reauthorize, ctx: &mut Context<Self>) {
        let hooks = self.gw.inner.hooks.clone();
        if self.phase != Phase::Connected || self.subs.is_empty() || !hooks.has_authorize() {
            return;
        }
        let client_id = self.client_id.to_string();
        let username = self.username.as_deref().map(String::from);
        let held: Vec<(String, u8)> = self
            .subs
            .iter()
            .map(|(raw, sub)| (raw.clone(), sub.state.qos))
            .collect();
        let fut = async move {
            let mut denied = Vec::new();
            for (filter, qos) in held {
                let ask = Authorize {
                    client_id: client_id.clone(),
                    username: username.clone(),
                    action: Action::Subscribe {
                        filter: filter.clone(),
                        qos,
                    },
                };
                if !hooks.authorize(ask).await {
                    denied.push(filter);
                }
            }
            denied
        };
        ctx.spawn(fut.into_actor(self).map(|denied, act, _| {
            // MQTT has no server-side unsubscribe: the client is not told, it simply
            // receives nothing more on these filters (as with Mosquitto, which checks
            // the ACL on every delivery).
            for raw in denied {
                if act.remove_subscription(raw.clone()) {
                    slog::info!(act.log, "subscription revoked by the ACL"; "filter" => raw);
                    act.dirty = true;
                }
            }
        }));
    }
}

impl Handler<Takeover> for MqttSession {
    type Result = ResponseFuture<Handoff>;
    fn handle(&mut self, m: Takeover, ctx: &mut Context<Self>) -> Self::Result {
        // MQTT-3.1.4-2 / v5 0x8E Session taken over.
        self.handed_off = true;
        self.end = DisconnectReason::TakenOver;
        if self.phase == Phase::Registering {
            // Our own registration (which may be resuming the session from storage, or
            // taking it from an older connection) has not answered yet: hand over what
            // it brings when it does. The will goes nowhere: this session never began.
            let (tx, rx) = tokio::sync::oneshot::channel();
            self.extra().handoff = Some(tx);
            self.will = None;
            return Box::pin(async move { rx.await.map_or(Handoff::Unknown, Handoff::State) });
        }
        // A session with expiry 0 ends with its connection (v5 §3.1.2.11.2; v3 clean
        // session): the new connection starts afresh.
        let state = if self.session_expiry > 0 && self.was_connected {
            Some(self.snapshot())
        } else {
            let subs: Vec<SubState> = self.subs.values().map(|s| s.state.clone()).collect();
            registry::remove_routes(&self.gw, &self.client_id, &subs);
            None
        };
        // v5 §3.1.3.2.2: a delayed will is not sent if the session continues.
        let will = self
            .will
            .take()
            .map(|w| *w)
            .filter(|w| w.delay_secs == 0 || m.clean_start);
        if let Some(will) = will {
            self.gw.inner.registry.do_send(Unregister {
                client_id: self.client_id.clone(),
                conn_id: self.conn_id,
                state: None,
                will: Some(will),
                discard: false,
            });
        }
        self.close(Some(0x8E), false, ctx);
        Box::pin(std::future::ready(Handoff::State(state)))
    }
}

impl Handler<ServerShutdown> for MqttSession {
    type Result = MessageResult<ServerShutdown>;
    fn handle(&mut self, _: ServerShutdown, ctx: &mut Context<Self>) -> Self::Result {
        let state =
            (self.session_expiry > 0 && !self.client_id.is_empty()).then(|| self.snapshot());
        self.handed_off = true;
        self.end = DisconnectReason::ServerShutdown;
        // v5 0x8B Server shutting down.
        self.close(Some(0x8B), false, ctx);
        MessageResult(state)
    }
}

/// The write side of a connection's IO task, shared with its session.
struct WriteSide {
    rx: mpsc::UnboundedReceiver<Bytes>,
    pending: Arc<AtomicUsize>,
    wants_drain: Arc<AtomicBool>,
    /// Below this many unwritten bytes, a session that asked is told `Drained`.
    low: usize,
}

/// One task per connection does all its IO (one task, not a reader and a writer, to keep
/// an idle connection small): it reads the socket, decodes packets and hands them to the
/// session in batches, and it writes what the session hands over, one buffer per write.
///
/// Back-pressure: before handing over PUBLISHes it takes one permit each from the
/// session's pipeline semaphore, so reading stops while the pipeline is full. Writing
/// counts unwritten bytes in `pending` and tells the session `Drained` when they fall
/// below `low`. The task ends when the session drops its sender (after writing what is
/// left); a session that stopped aborts it after a grace period, so a peer that never
/// reads cannot keep it alive.
async fn io_loop<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    mut dec: MqttDecoder,
    addr: Addr<MqttSession>,
    permits: Arc<Semaphore>,
    mut out: WriteSide,
    mut throttle: Option<Box<Throttle>>,
) {
    let (mut r, mut w) = tokio::io::split(io);
    // Read-buffer size adapts: small for the many idle devices (memory per connection),
    // doubling while reads fill it (throughput for busy publishers).
    let mut want = MIN_READ;
    let mut buf = BytesMut::new();
    let mut reading = true;
    loop {
        if reading {
            if buf.is_empty() && buf.capacity() > 2 * want {
                // Drop a buffer grown for a burst once it is drained (no copy: it is empty).
                buf = BytesMut::new();
            }
            if buf.capacity() - buf.len() < want {
                buf.reserve(want);
            }
        }
        let room = buf.capacity() - buf.len();
        let paused = throttle.as_ref().is_some_and(|t| t.resume.is_some());
        tokio::select! {
            // Writes first: they free the client's window and the session's buffer.
            biased;
            next = out.rx.next() => {
                let Some(bytes) = next else { break };
                if Box::pin(w.write_all(&bytes)).await.is_err() {
                    addr.do_send(Drained { failed: true });
                    break;
                }
                let left = out
                    .pending
                    .fetch_sub(bytes.len(), Ordering::AcqRel)
                    .saturating_sub(bytes.len());
                if left <= out.low && out.wants_drain.swap(false, Ordering::AcqRel) {
                    addr.do_send(Drained { failed: false });
                }
            }
            // A throttled client: hand on the packet that waited, then what follows it.
            // (The timer lives in the heap-allocated `Throttle`: a `Sleep` here would
            // be part of every connection's task, throttled or not.)
            _ = async {
                    match throttle.as_mut().and_then(|t| t.resume.as_mut()) {
                        Some(sleep) => sleep.await,
                        None => std::future::pending().await,
                    }
                },
                if paused =>
            {
                reading = Box::pin(deliver(&mut dec, &mut buf, &addr, &permits, throttle.as_deref_mut())).await;
            }
            // `read_buf` is cancel-safe: losing the race to a write loses no bytes.
            res = r.read_buf(&mut buf), if reading && !paused => {
                match res {
                    Ok(0) => {
                        addr.do_send(ReadEnded(None));
                        reading = false;
                    }
                    Err(e) => {
                        addr.do_send(ReadEnded(Some(e.into())));
                        reading = false;
                    }
                    Ok(n) => {
                        if n >= room {
                            want = (want * 2).min(MAX_READ);
                        } else if n < want / 4 {
                            want = (want / 2).max(MIN_READ);
                        }
                        // Boxed: this future (permit wait, mailbox send, frames) is only
                        // alive while packets are handed over; inline it would make every
                        // idle connection's task several hundred bytes larger.
                        reading = Box::pin(deliver(&mut dec, &mut buf, &addr, &permits, throttle.as_deref_mut())).await;
                    }
                }
            }
        }
    }
    let _ = w.flush().await;
    let _ = w.shutdown().await;
}

/// A client's inbound rate limits and the packet that is waiting for them.
struct Throttle {
    limits: Box<throttle::Inbound>,
    /// The packet that must wait: the packet, its size, and whether its message unit
    /// is taken.
    held: Option<(Inbound, usize, bool)>,
    /// When to ask again for `held`; reading the socket stops until then.
    resume: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// Decode every whole packet in `buf` and hand them to the session, in batches of at
/// most `MAX_PUBLISH_BATCH`. False when reading should stop (bad input, session gone).
///
/// With rate limits (`throttle`), a packet over the limit is held and `resume` set:
/// the IO task stops reading (TCP then pushes back on the client) and calls again
/// then, while it goes on writing.
async fn deliver(
    dec: &mut MqttDecoder,
    buf: &mut BytesMut,
    addr: &Addr<MqttSession>,
    permits: &Semaphore,
    mut throttle: Option<&mut Throttle>,
) -> bool {
    if let Some(t) = throttle.as_deref_mut() {
        t.resume = None;
    }
    loop {
        let mut frames = Vec::new();
        let mut failure = None;
        let mut paused = false;
        while frames.len() < MAX_PUBLISH_BATCH {
            let (p, size, mut taken) = match throttle.as_deref_mut().and_then(|t| t.held.take()) {
                Some(held) => held,
                None => {
                    let before = buf.len();
                    match dec.decode(buf) {
                        Ok(Some(p)) => (p, before.saturating_sub(buf.len()), false),
                        Ok(None) => break,
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    }
                }
            };
            if let Some(t) = throttle.as_deref_mut() {
                let publish = matches!(p, Inbound::Publish(_));
                if let Some(wait) = t.limits.wait(publish, size, &mut taken) {
                    t.held = Some((p, size, taken));
                    t.resume = Some(Box::pin(tokio::time::sleep(wait)));
                    paused = true;
                    break;
                }
            }
            frames.push(p);
        }
        let full = frames.len() >= MAX_PUBLISH_BATCH;
        let publishes = frames
            .iter()
            .filter(|f| matches!(f, Inbound::Publish(_)))
            .count() as u32;
        if publishes > 0 {
            // Back-pressure: wait for room in the session's pipeline before reading on.
            match permits.acquire_many(publishes).await {
                Ok(p) => p.forget(),
                Err(_) => return false,
            }
        }
        if !frames.is_empty() && addr.send(Frames(frames)).await.is_err() {
            return false;
        }
        if let Some(e) = failure {
            addr.do_send(ReadEnded(Some(e)));
            return false;
        }
        if paused || !full {
            return true;
        }
    }
}
