//! `ServerSession`: one back-end service connection on the service listener.
//!
//! * **Owns** the connection's state: the service's name (the publisher id of what it
//!   produces, and its client id for the hooks), its login, its consumer-group
//!   memberships with the partitions each owns and a read cursor per owned partition,
//!   and the queues it watches for arrivals.
//! * **Handles** [`Incoming`] (a decoded request, from its IO task, which waits for the
//!   answer before it reads the next frame), [`Arrived`] (from `Notifier`s: a partition
//!   it watches grew) and [`Closed`] (its IO task ended: leave every group, unwatch).
//!   Requests go to `Gateway::publish_batch` (produce), the `GroupCoordinator` (join,
//!   leave, assignment), the `QueueIndex` shards (pull, bounds) and the `OffsetStore`
//!   (commit, load).
//! * **Login.** A `Hello` asks the gateway's authentication hooks ([`Authenticate`],
//!   protocol [`PROTOCOL_SERVICE`], client id = the name), with their deadline and
//!   failure policy; a refusal answers an error that closes the connection. Another
//!   request before an accepted Hello asks them once about an anonymous client (as
//!   an MQTT CONNECT without user name would): admitted, the connection goes on
//!   without a Hello; refused, it is answered `LoginRequired` until a Hello succeeds.
//!   Each produced message and each Join asks the authorization hooks ([`Authorize`]:
//!   publish on the message's topic, subscribe to [`join_filter`]). On a TLS listener
//!   with `cn_as_username`, the verified client certificate's CN is the user name from
//!   the start (the hooks get it as `cert_username`) and a Hello's user name does not
//!   replace it, as for MQTT.
//! * **Back-pressure.** One request at a time per connection: the IO task reads the
//!   next frame only after writing the previous answer, so a service that produces
//!   faster than storage acknowledges is paced through TCP, and a Pull answers at most
//!   `max_pull_messages` / about `max_pull_bytes`. Pull long-polls on a `Notify` woken
//!   by `Arrived` hints and by rebalances, not by polling storage.
//!
//! At-least-once: a member's cursor moves when it is sent messages, but the group's
//! position moves only on Commit; a partition that changes owner restarts from the
//! committed offset, so what was delivered and not committed is delivered again.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use super::group::{Assignment, GetAssignment, JoinGroup, LeaveGroup};
use super::protocol::{
    client_topic, encode_frame, error_frame, Delivered, ErrorCode, FrameCodec, ProduceMessage,
    Props, Request, Response, SeekTo, StartAt, Target, VERSION,
};
use super::Service;
use crate::mqtt::hooks::{Action, AuthDecision, Authenticate, Authorize, PROTOCOL_SERVICE};
use crate::mqtt::{topic, ConnInfo};
use crate::storage::{
    Arrived, Message, MessageProps, Offset, Pull, QueueName, StorageError, Unwatch, Watch,
};

/// A decoded request; answered with its response.
#[derive(Message)]
#[rtype(result = "Response")]
pub struct Incoming(pub Request);

/// The connection's IO task has ended.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Closed;

/// The OffsetStore owner of consumer group `group`.
pub fn group_owner(group: &str) -> String {
    format!("group:{group}")
}

/// The MQTT filter a Join on first-level topic `topic` is authorized as: the group
/// reads every message whose first level is `topic` (`topic` itself included, which
/// `topic/#` matches too), so an ACL grants it with `topic read {topic}/#` (or a
/// wider filter) and refuses it when a denying rule overlaps, e.g. `{topic}/secret/#`.
pub fn join_filter(topic: &str) -> String {
    format!("{topic}/#")
}

/// QoS of the [`Action::Subscribe`] a Join is authorized as: a member receives each
/// message at the QoS it was published with.
const JOIN_QOS: u8 = 2;

/// Where a connection is in its login.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Login {
    /// Nothing asked yet.
    Pending,
    /// Admitted as an anonymous client without a Hello (a Hello may still follow).
    Anonymous,
    /// The hooks refuse anonymous clients: only a Hello is heard.
    Required,
    /// A Hello was accepted; another one is refused.
    Done,
}

struct Membership {
    start: StartAt,
    generation: u64,
    partitions: Vec<u32>,
    /// Next offset to deliver, per owned partition.
    cursors: HashMap<u32, Offset>,
    /// Where the next pull starts among the owned partitions (fairness).
    rotate: usize,
}

/// The connection state a request works on (taken out of the actor while it runs).
struct Conn {
    svc: Service,
    peer: SocketAddr,
    log: slog::Logger,
    name: String,
    /// The user name the ACL's `user` sections and `%u` see: the certificate's CN when
    /// there is one, else the accepted Hello's.
    username: Option<String>,
    /// The verified client certificate's CN (listener with `cn_as_username`).
    cert_username: Option<String>,
    login: Login,
    /// The [`Service::acl_epoch`] the memberships were last authorized at.
    acl_epoch: u64,
    member: u64,
    wake: Arc<Notify>,
    me: Recipient<Arrived>,
    memberships: HashMap<(String, String), Membership>,
    watching: HashSet<QueueName>,
}

pub struct ServerSession {
    conn: Option<Conn>,
    /// Wakes a waiting Pull (shared with the Conn and the group coordinator).
    wake: Arc<Notify>,
    closing: bool,
    peer: SocketAddr,
    log: slog::Logger,
}

impl ServerSession {
    /// Start the actor and the connection's IO task on the current arbiter.
    pub fn spawn<S>(svc: Service, io: S, peer: SocketAddr, info: ConnInfo)
    where
        S: AsyncRead + AsyncWrite + Unpin + 'static,
    {
        let log = svc
            .inner
            .log
            .new(slog::o!("actor" => "server_session", "peer" => peer.to_string()));
        let member = svc.next_member();
        let acl_epoch = svc.acl_epoch();
        let max_frame = svc.inner.cfg.max_frame_bytes;
        let addr = ServerSession::create(|ctx| {
            let wake = Arc::new(Notify::new());
            let conn = Conn {
                svc,
                peer,
                log: log.clone(),
                name: format!("service-{member}"),
                username: info.cert_username.clone(),
                cert_username: info.cert_username,
                login: Login::Pending,
                acl_epoch,
                member,
                wake: wake.clone(),
                me: ctx.address().recipient(),
                memberships: HashMap::new(),
                watching: HashSet::new(),
            };
            ServerSession {
                conn: Some(conn),
                wake,
                closing: false,
                peer,
                log: log.clone(),
            }
        });
        actix_rt::spawn(run_io(io, addr, max_frame, log));
    }

    fn cleanup(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            for (group, topic) in conn.memberships.keys() {
                conn.svc.inner.coordinator.do_send(LeaveGroup {
                    group: group.clone(),
                    topic: topic.clone(),
                    member: conn.member,
                });
            }
            conn.memberships.clear();
            update_watches(conn);
        }
    }
}

impl Actor for ServerSession {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Context<Self>) {
        slog::debug!(self.log, "service connection"; "peer" => %self.peer);
    }
}

impl Handler<Incoming> for ServerSession {
    type Result = ResponseActFuture<Self, Response>;

    fn handle(&mut self, m: Incoming, _: &mut Context<Self>) -> Self::Result {
        let Some(mut conn) = self.conn.take() else {
            let r = error(m.0.id(), ErrorCode::Invalid, "one request at a time");
            return Box::pin(fut::ready(r));
        };
        Box::pin(
            async move {
                let r = handle(&mut conn, m.0).await;
                (conn, r)
            }
            .into_actor(self)
            .map(|(conn, r), act, ctx| {
                act.conn = Some(conn);
                if act.closing {
                    act.cleanup();
                    ctx.stop();
                }
                r
            }),
        )
    }
}

impl Handler<Arrived> for ServerSession {
    type Result = ();

    fn handle(&mut self, _: Arrived, _: &mut Context<Self>) {
        // The same Notify as the Conn's, so this works while a Pull holds the Conn.
        self.wake.notify_one();
    }
}

impl Handler<Closed> for ServerSession {
    type Result = ();

    fn handle(&mut self, _: Closed, ctx: &mut Context<Self>) {
        slog::debug!(self.log, "service connection closed");
        if self.conn.is_some() {
            self.cleanup();
            ctx.stop();
        } else {
            self.closing = true;
        }
    }
}

fn error(id: u64, code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error {
        id,
        code,
        message: message.into(),
    }
}

/// Reads frames, hands each to the actor, writes its answer; on a bad frame, or an
/// answer whose code closes the connection (a refused login), writes the error frame
/// and closes this connection only.
async fn run_io<S>(mut io: S, addr: Addr<ServerSession>, max_frame: usize, log: slog::Logger)
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    use actix_codec::Decoder;
    let mut codec = FrameCodec::<Request>::new(max_frame);
    let mut buf = BytesMut::with_capacity(8 * 1024);
    loop {
        match codec.decode(&mut buf) {
            Ok(Some(req)) => {
                let Ok(resp) = addr.send(Incoming(req)).await else {
                    break;
                };
                // Flushed: a TLS stream may keep what it could not send yet.
                let frame = encode_frame(&resp);
                if io.write_all(&frame).await.is_err() || io.flush().await.is_err() {
                    break;
                }
                if let Response::Error { code, .. } = resp {
                    if code.closes_connection() {
                        let _ = io.shutdown().await;
                        break;
                    }
                }
            }
            Ok(None) => match io.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            },
            Err(e) => {
                slog::info!(log, "bad service frame; closing the connection"; "error" => %e);
                let _ = io.write_all(&error_frame(&e)).await;
                let _ = io.flush().await;
                let _ = io.shutdown().await;
                break;
            }
        }
    }
    addr.do_send(Closed);
}

fn storage_error(id: u64, e: impl std::fmt::Display) -> Response {
    error(id, ErrorCode::Storage, e.to_string())
}

fn valid_first_level(t: &str) -> bool {
    !t.is_empty() && !t.contains(['/', '+', '#', '\0']) && !t.starts_with('$')
}

fn to_props(p: Props) -> MessageProps {
    MessageProps {
        payload_format: p.payload_format,
        message_expiry_secs: p.message_expiry_secs,
        content_type: p.content_type,
        response_topic: p.response_topic,
        correlation_data: p.correlation_data,
        user_properties: p.user_properties,
    }
}

fn from_props(p: &MessageProps) -> Props {
    Props {
        payload_format: p.payload_format,
        message_expiry_secs: p.message_expiry_secs,
        content_type: p.content_type.clone(),
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.clone(),
        user_properties: p.user_properties.clone(),
    }
}

/// Ask the authentication hooks about this connection (allowed when there are none).
async fn authenticate(
    conn: &Conn,
    client_id: &str,
    username: Option<String>,
    password: Option<Vec<u8>>,
) -> AuthDecision {
    let hooks = conn.svc.inner.gateway.hooks();
    if !hooks.has_authenticate() {
        return AuthDecision::Allow;
    }
    hooks
        .authenticate(Authenticate {
            client_id: client_id.to_string(),
            username,
            password: password.map(Bytes::from),
            peer: conn.peer,
            cert_username: conn.cert_username.clone(),
            protocol: PROTOCOL_SERVICE,
        })
        .await
}

/// Ask the authorization hooks whether this connection may do `action`.
async fn authorize(conn: &Conn, action: Action) -> bool {
    let hooks = conn.svc.inner.gateway.hooks();
    !hooks.has_authorize()
        || hooks
            .authorize(Authorize {
                client_id: conn.name.clone(),
                username: conn.username.clone(),
                action,
            })
            .await
}

/// The answer to a Hello the authentication hooks refused with (v5 CONNACK) `code`.
fn login_refused(id: u64, code: u8, had_user: bool) -> Response {
    let (ec, why) = match code {
        0x9F => (
            ErrorCode::RateLimited,
            "too many failed logins from this address",
        ),
        0x88 | 0x89 => (ErrorCode::Unavailable, "authentication is unavailable"),
        0x87 if !had_user => (ErrorCode::BadCredentials, "credentials are required"),
        0x86 | 0x87 => (ErrorCode::BadCredentials, "bad user name or password"),
        _ => (ErrorCode::BadCredentials, "refused"),
    };
    error(
        id,
        ec,
        format!("login refused: {why} (reason code 0x{code:02X})"),
    )
}

/// A request other than Hello: admitted unless the node wants a Hello first. The
/// first such request asks the hooks about an anonymous client, once.
async fn admitted(conn: &mut Conn, id: u64) -> Result<(), Response> {
    if conn.login == Login::Pending {
        let name = conn.name.clone();
        conn.login = match authenticate(conn, &name, None, None).await {
            AuthDecision::Deny(_) => Login::Required,
            AuthDecision::Allow | AuthDecision::Next => Login::Anonymous,
        };
    }
    match conn.login {
        Login::Required => Err(error(
            id,
            ErrorCode::LoginRequired,
            "this node admits no anonymous services: send Hello with credentials first",
        )),
        _ => Ok(()),
    }
}

async fn hello(
    conn: &mut Conn,
    id: u64,
    name: String,
    username: Option<String>,
    password: Option<Vec<u8>>,
) -> Response {
    if conn.login == Login::Done {
        return error(
            id,
            ErrorCode::Invalid,
            "this connection has said Hello already",
        );
    }
    if name.is_empty() || name.len() > 256 {
        return error(id, ErrorCode::Invalid, "name must be 1..=256 bytes");
    }
    if let AuthDecision::Deny(code) = authenticate(conn, &name, username.clone(), password).await {
        slog::info!(conn.log, "service login refused"; "name" => &name,
            "user" => username.as_deref().unwrap_or(""), "reason" => code);
        return login_refused(id, code, username.is_some());
    }
    conn.name = name;
    // A certificate's CN stays the user name (Mosquitto's use_identity_as_username).
    conn.username = conn.cert_username.clone().or(username);
    conn.login = Login::Done;
    Response::HelloOk {
        id,
        partitions: conn.svc.inner.gateway.config().partitions,
        version: VERSION,
    }
}

async fn handle(conn: &mut Conn, req: Request) -> Response {
    if !matches!(req, Request::Hello { .. }) {
        if let Err(r) = admitted(conn, req.id()).await {
            return r;
        }
        reauthorize(conn).await;
    }
    match req {
        Request::Hello {
            id,
            name,
            username,
            password,
        } => hello(conn, id, name, username, password).await,
        Request::Produce { id, messages } => produce(conn, id, messages).await,
        Request::Join {
            id,
            group,
            topic,
            start,
        } => {
            if !valid_first_level(&topic) || group.is_empty() {
                return error(
                    id,
                    ErrorCode::Invalid,
                    "topic must be one first-level topic name (no '/', wildcards or '$'), group non-empty",
                );
            }
            let filter = join_filter(&topic);
            let ask = Action::Subscribe {
                filter: filter.clone(),
                qos: JOIN_QOS,
            };
            if !authorize(conn, ask).await {
                return error(
                    id,
                    ErrorCode::NotAuthorized,
                    format!("not allowed to read {filter:?}"),
                );
            }
            let key = (group.clone(), topic.clone());
            let a = conn
                .svc
                .inner
                .coordinator
                .send(JoinGroup {
                    group,
                    topic,
                    member: conn.member,
                    wake: conn.wake.clone(),
                })
                .await;
            let Ok(a) = a else {
                return storage_error(id, "the node is stopping");
            };
            conn.memberships.entry(key.clone()).or_insert(Membership {
                start,
                generation: u64::MAX,
                partitions: Vec::new(),
                cursors: HashMap::new(),
                rotate: 0,
            });
            if let Err(e) = apply(conn, &key, a).await {
                return storage_error(id, e);
            }
            Response::Joined {
                id,
                partitions: conn.memberships[&key].partitions.clone(),
            }
        }
        Request::Leave { id, group, topic } => {
            let key = (group, topic);
            if conn.memberships.remove(&key).is_none() {
                return error(id, ErrorCode::NotMember, "not a member of this group");
            }
            conn.svc.inner.coordinator.do_send(LeaveGroup {
                group: key.0,
                topic: key.1,
                member: conn.member,
            });
            update_watches(conn);
            Response::Left { id }
        }
        Request::Pull {
            id,
            group,
            topic,
            max,
            wait_ms,
        } => pull(conn, id, (group, topic), max, wait_ms).await,
        Request::Commit {
            id,
            group,
            topic,
            offsets,
        } => {
            let key = (group, topic);
            if let Err(r) = refresh(conn, &key, id).await {
                return r;
            }
            let m = &conn.memberships[&key];
            if let Some((p, _)) = offsets.iter().find(|(p, _)| !m.partitions.contains(p)) {
                return error(
                    id,
                    ErrorCode::NotOwner,
                    format!("partition {p} is not owned by this member (rebalanced?)"),
                );
            }
            let storage = conn.svc.inner.gateway.storage();
            for (p, off) in offsets {
                let q = QueueName::topic(&key.1, p);
                if let Err(e) = storage.commit_offset(group_owner(&key.0), q, off).await {
                    return storage_error(id, e);
                }
            }
            Response::Committed { id }
        }
        Request::Seek {
            id,
            group,
            topic,
            to,
        } => {
            let key = (group, topic);
            if let Err(r) = refresh(conn, &key, id).await {
                return r;
            }
            let storage = conn.svc.inner.gateway.storage().clone();
            let owned = conn.memberships[&key].partitions.clone();
            let mut out = Vec::new();
            for p in owned {
                let q = QueueName::topic(&key.1, p);
                let off = match seek_offset(&storage, &q, to).await {
                    Ok(o) => o,
                    Err(e) => return storage_error(id, e),
                };
                if let Err(e) = storage.commit_offset(group_owner(&key.0), q, off).await {
                    return storage_error(id, e);
                }
                if let Some(m) = conn.memberships.get_mut(&key) {
                    m.cursors.insert(p, off);
                }
                out.push((p, off));
            }
            Response::Seeked { id, offsets: out }
        }
    }
}

async fn produce(conn: &mut Conn, id: u64, messages: Vec<ProduceMessage>) -> Response {
    let gw = &conn.svc.inner.gateway;
    let max_levels = gw.config().max_topic_levels;
    let now = crate::now_ms();
    let mut items = Vec::with_capacity(messages.len());
    for m in messages {
        let t = match m.target {
            Target::Topic(t) => t,
            Target::Client { client_id, topic } => {
                if client_id.is_empty() || client_id.contains(['/', '+', '#', '\0']) {
                    return error(
                        id,
                        ErrorCode::Invalid,
                        format!("client id {client_id:?} cannot be addressed"),
                    );
                }
                client_topic(&client_id, &topic)
            }
        };
        if let Err(e) = topic::validate_name(&t, max_levels) {
            return error(id, ErrorCode::Invalid, format!("topic {t:?}: {e:?}"));
        }
        if m.qos > 2 {
            return error(
                id,
                ErrorCode::Invalid,
                format!("QoS {} is not 0, 1 or 2", m.qos),
            );
        }
        let msg = Message {
            topic: t,
            payload: Bytes::from(m.payload),
            qos: m.qos,
            retain: m.retain,
            publisher: conn.name.clone(),
            timestamp_ms: now,
            props: to_props(m.props),
        };
        items.push((msg, m.key));
    }
    // The whole batch or nothing: one refused message refuses the request.
    if gw.hooks().has_authorize() {
        let mut allowed: HashSet<(&str, u8, bool)> = HashSet::new();
        for (i, (m, _)) in items.iter().enumerate() {
            let k = (m.topic.as_str(), m.qos, m.retain);
            if allowed.contains(&k) {
                continue;
            }
            let ask = Action::Publish {
                topic: m.topic.clone(),
                qos: m.qos,
                retain: m.retain,
            };
            if !authorize(conn, ask).await {
                return error(
                    id,
                    ErrorCode::NotAuthorized,
                    format!(
                        "message {i}: not allowed to publish to {:?}; nothing was stored",
                        m.topic
                    ),
                );
            }
            allowed.insert(k);
        }
    }
    let mut positions = Vec::with_capacity(items.len());
    for r in gw.publish_batch(items).await {
        match r {
            Ok(p) => positions.push(p),
            Err(e) => return storage_error(id, e),
        }
    }
    Response::Produced { id, positions }
}

/// After an ACL reload ([`Service::reauthorize`]): leave the groups whose
/// [`join_filter`] the authorization hooks now deny (their next request answers
/// `NotMember`).
async fn reauthorize(conn: &mut Conn) {
    let epoch = conn.svc.acl_epoch();
    if epoch == conn.acl_epoch {
        return;
    }
    conn.acl_epoch = epoch;
    if !conn.svc.inner.gateway.hooks().has_authorize() {
        return;
    }
    let keys: Vec<(String, String)> = conn.memberships.keys().cloned().collect();
    let mut left = false;
    for key in keys {
        let ask = Action::Subscribe {
            filter: join_filter(&key.1),
            qos: JOIN_QOS,
        };
        if authorize(conn, ask).await {
            continue;
        }
        slog::info!(conn.log, "ACL reload: leaving a group no longer allowed";
            "group" => &key.0, "topic" => &key.1);
        conn.memberships.remove(&key);
        conn.svc.inner.coordinator.do_send(LeaveGroup {
            group: key.0,
            topic: key.1,
            member: conn.member,
        });
        left = true;
    }
    if left {
        update_watches(conn);
    }
}

/// Ask the coordinator for this member's partitions and apply a change.
async fn refresh(conn: &mut Conn, key: &(String, String), id: u64) -> Result<(), Response> {
    if !conn.memberships.contains_key(key) {
        return Err(error(
            id,
            ErrorCode::NotMember,
            format!("not a member of group {:?} on topic {:?}", key.0, key.1),
        ));
    }
    let a = conn
        .svc
        .inner
        .coordinator
        .send(GetAssignment {
            group: key.0.clone(),
            topic: key.1.clone(),
            member: conn.member,
        })
        .await;
    match a {
        Ok(Some(a)) => apply(conn, key, a).await.map_err(|e| storage_error(id, e)),
        Ok(None) => {
            conn.memberships.remove(key);
            update_watches(conn);
            Err(error(id, ErrorCode::NotMember, "no longer a member"))
        }
        Err(_) => Err(storage_error(id, "the node is stopping")),
    }
}

/// Take on assignment `a`: drop the cursors of lost partitions, start new ones at the
/// group's committed offset (or, for a partition the group never committed, at the
/// member's `StartAt`, committed at once so that every later owner agrees).
async fn apply(conn: &mut Conn, key: &(String, String), a: Assignment) -> Result<(), StorageError> {
    let storage = conn.svc.inner.gateway.storage().clone();
    let Some(m) = conn.memberships.get_mut(key) else {
        return Ok(());
    };
    if m.generation == a.generation {
        return Ok(());
    }
    m.cursors.retain(|p, _| a.partitions.contains(p));
    for &p in &a.partitions {
        if m.cursors.contains_key(&p) {
            continue;
        }
        let q = QueueName::topic(&key.1, p);
        let owner = group_owner(&key.0);
        let off = match storage.load_offset(owner.clone(), q.clone()).await? {
            Some(o) => o,
            None => {
                let b = storage.bounds(q.clone()).await?;
                let o = match m.start {
                    StartAt::Earliest => b.min_offset,
                    StartAt::Latest => b.max_offset,
                };
                storage.commit_offset(owner, q, o).await?;
                o
            }
        };
        m.cursors.insert(p, off);
    }
    m.partitions = a.partitions;
    m.generation = a.generation;
    update_watches(conn);
    Ok(())
}

/// Watch exactly the partitions some membership of this connection owns.
fn update_watches(conn: &mut Conn) {
    let want: HashSet<QueueName> = conn
        .memberships
        .iter()
        .flat_map(|((_, t), m)| m.partitions.iter().map(move |p| QueueName::topic(t, *p)))
        .collect();
    let storage = conn.svc.inner.gateway.storage();
    for q in conn.watching.difference(&want) {
        storage.unwatch(Unwatch {
            queue: q.clone(),
            id: conn.member,
        });
    }
    for q in want.difference(&conn.watching) {
        storage.watch(Watch {
            queue: q.clone(),
            id: conn.member,
            watcher: conn.me.clone(),
        });
    }
    conn.watching = want;
}

async fn pull(conn: &mut Conn, id: u64, key: (String, String), max: u32, wait_ms: u32) -> Response {
    let cfg = conn.svc.inner.cfg.clone();
    let max = max.min(cfg.max_pull_messages).max(1) as usize;
    let wait = Duration::from_millis(wait_ms.min(cfg.max_pull_wait_ms) as u64);
    let deadline = tokio::time::Instant::now() + wait;
    let storage = conn.svc.inner.gateway.storage().clone();
    loop {
        // A long poll may span an ACL reload: nothing is delivered under old rules.
        reauthorize(conn).await;
        if let Err(r) = refresh(conn, &key, id).await {
            return r;
        }
        let m = match conn.memberships.get_mut(&key) {
            Some(m) => m,
            None => return error(id, ErrorCode::NotMember, "no longer a member"),
        };
        let mut out: Vec<Delivered> = Vec::new();
        let mut bytes = 0usize;
        let n = m.partitions.len();
        m.rotate = m.rotate.wrapping_add(1);
        for i in 0..n {
            if out.len() >= max || bytes >= cfg.max_pull_bytes {
                break;
            }
            let p = m.partitions[(m.rotate + i) % n];
            let from = m.cursors.get(&p).copied().unwrap_or(0);
            let pulled = storage
                .pull(Pull {
                    queue: QueueName::topic(&key.1, p),
                    from,
                    max: max - out.len(),
                    max_bytes: cfg.max_pull_bytes.saturating_sub(bytes).max(1),
                })
                .await;
            let pulled = match pulled {
                Ok(p) => p,
                Err(e) => return storage_error(id, e),
            };
            m.cursors.insert(p, pulled.next);
            for pm in pulled.messages {
                let msg = &pm.message;
                bytes += msg.payload.len();
                out.push(Delivered {
                    topic: msg.topic.clone(),
                    payload: msg.payload.to_vec(),
                    qos: msg.qos,
                    retain: msg.retain,
                    publisher: msg.publisher.clone(),
                    timestamp_ms: msg.timestamp_ms,
                    props: from_props(&msg.props),
                    partition: p,
                    offset: pm.offset,
                    position: pm.position,
                });
            }
        }
        if !out.is_empty() || tokio::time::Instant::now() >= deadline {
            return Response::Messages {
                id,
                messages: out,
                partitions: m.partitions.clone(),
            };
        }
        let wake = conn.wake.clone();
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}

/// The offset `to` designates in `q`. Timestamps: binary search over the queue's
/// messages' store times (non-decreasing within a queue, up to clock steps).
async fn seek_offset(
    storage: &crate::storage::Storage,
    q: &QueueName,
    to: SeekTo,
) -> Result<Offset, StorageError> {
    let b = storage.bounds(q.clone()).await?;
    match to {
        SeekTo::Earliest => Ok(b.min_offset),
        SeekTo::Latest => Ok(b.max_offset),
        SeekTo::Timestamp(ts) => {
            let (mut lo, mut hi) = (b.min_offset, b.max_offset);
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                let p = storage
                    .pull(Pull {
                        queue: q.clone(),
                        from: mid,
                        max: 1,
                        max_bytes: 1,
                    })
                    .await?;
                match p.messages.first() {
                    Some(m) if m.message.timestamp_ms < ts => lo = m.offset.max(mid) + 1,
                    Some(_) => hi = mid,
                    None => lo = mid + 1,
                }
            }
            Ok(lo)
        }
    }
}
