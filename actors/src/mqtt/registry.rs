//! `ClientRegistry`: who is connected, and the persistent sessions of who is not.
//!
//! * **Owns** client id → live session, the expiry timers of offline persistent
//!   sessions, and the timers of delayed will messages.
//! * **Handles** [`Register`] (a session after CONNECT; takes over a live session with
//!   the same client id, MQTT-3.1.4-2, or resumes an offline one), [`Unregister`] (a
//!   session that stopped; saves its state and schedules its will), [`Restore`] (the
//!   gateway at start-up: re-routes every persistent session's filters), [`Count`] and
//!   [`Shutdown`] (the node).
//! * **Back-pressure.** `Register` runs one at a time (`ctx.wait`), so two connections
//!   with the same client id are always ordered; a takeover waits at most
//!   `TAKEOVER_TIMEOUT` for the old session to hand over its state.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bincode::{Decode, Encode};

use super::codec::Will;
use super::inflight::InflightEntry;
use super::session::{Handoff, MqttSession, Takeover};
use super::shard::{shards_for_filter, AddRoute, RemoveRoute, RouteKind};
use super::Gateway;
use crate::storage::{KvPut, KvScan, Message, Storage, StorageError};

const SESSION_PREFIX: &str = "session/";
const QOS2_PREFIX: &str = "qos2/";
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(5);

/// One subscription of a session, as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct SubState {
    /// The filter as the client wrote it (the key for UNSUBSCRIBE).
    pub raw: String,
    /// The filter matched against topics (without `$share/{group}/`).
    pub filter: String,
    pub share_group: Option<String>,
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: u8,
    pub sub_id: Option<u32>,
    /// The queue this subscription reads.
    pub queue: String,
    /// The next offset to read from `queue`.
    pub next: u64,
}

impl SubState {
    pub fn kind(&self) -> RouteKind {
        match &self.share_group {
            Some(g) => RouteKind::Shared { group: g.clone() },
            None => RouteKind::Filter,
        }
    }
}

/// Everything a persistent session keeps while its client is away.
#[derive(Debug, Clone, Default, PartialEq, Eq, Encode, Decode)]
pub struct SessionState {
    pub client_id: String,
    /// Session Expiry Interval in seconds (u32::MAX: never).
    pub expiry_secs: u32,
    pub saved_at_ms: u64,
    pub subs: Vec<SubState>,
    pub inflight: Vec<InflightEntry>,
    /// Inbound QoS 2 packet ids received and not yet released (PUBREL).
    pub qos2_in: Vec<u16>,
}

impl SessionState {
    pub fn encode(&self) -> Vec<u8> {
        bincode::encode_to_vec(self, bincode::config::standard()).unwrap_or_default()
    }
    pub fn decode(b: &[u8]) -> Option<SessionState> {
        bincode::decode_from_slice(b, bincode::config::standard())
            .ok()
            .map(|(s, _)| s)
    }
    fn expires_in(&self, now_ms: u64) -> Option<Duration> {
        if self.expiry_secs == u32::MAX {
            return None;
        }
        let end = self.saved_at_ms + self.expiry_secs as u64 * 1000;
        Some(Duration::from_millis(end.saturating_sub(now_ms)))
    }
}

pub fn session_key(client_id: &str) -> String {
    format!("{SESSION_PREFIX}{client_id}")
}

pub fn qos2_key(client_id: &str, packet_id: u16) -> String {
    format!("{QOS2_PREFIX}{client_id}/{packet_id:05}")
}

/// A session finished CONNECT and wants `client_id`.
#[derive(Message)]
#[rtype(result = "Result<Option<SessionState>, StorageError>")]
pub struct Register {
    pub client_id: Arc<str>,
    pub conn_id: u64,
    pub addr: Addr<MqttSession>,
    /// Clean Start / Clean Session: discard any previous session.
    pub clean_start: bool,
    /// The new connection keeps its session after it closes (expiry > 0), so it may
    /// write session state to the KvStore.
    pub persistent: bool,
}

/// A session stopped.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unregister {
    pub client_id: Arc<str>,
    pub conn_id: u64,
    /// The state to keep, for a persistent session.
    pub state: Option<SessionState>,
    /// The will to publish (after its delay), if the close was abnormal.
    pub will: Option<Will>,
    /// The session ended (expiry 0): delete any persisted copy of it.
    pub discard: bool,
}

/// Start-up: re-route every persistent session found in the KvStore.
#[derive(Message)]
#[rtype(result = "Result<(), StorageError>")]
pub struct Restore {
    pub gateway: Gateway,
}

/// Number of live connections.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct Count;

/// The node is stopping: close every session (their state is saved).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

struct Live {
    conn_id: u64,
    addr: Addr<MqttSession>,
}

pub struct ClientRegistry {
    storage: Storage,
    gateway: Option<Gateway>,
    live: HashMap<Arc<str>, Live>,
    /// Offline persistent sessions and the timer that expires each.
    offline: HashMap<Arc<str>, SpawnHandle>,
    wills: HashMap<Arc<str>, SpawnHandle>,
    /// Client ids that may have state in the KvStore (a superset). A clean connection
    /// whose id is not here needs no storage round trip, which keeps connection storms
    /// cheap.
    stored: HashSet<Arc<str>>,
    shutting_down: bool,
    log: slog::Logger,
}

impl ClientRegistry {
    pub fn new(storage: Storage, log: slog::Logger) -> Self {
        ClientRegistry {
            storage,
            gateway: None,
            live: HashMap::new(),
            offline: HashMap::new(),
            wills: HashMap::new(),
            stored: HashSet::new(),
            shutting_down: false,
            log: log.new(slog::o!("actor" => "client_registry")),
        }
    }

    fn schedule_expiry(
        &mut self,
        client_id: Arc<str>,
        after: Option<Duration>,
        ctx: &mut Context<Self>,
    ) {
        if let Some(h) = self.offline.remove(&client_id) {
            ctx.cancel_future(h);
        }
        let Some(after) = after else {
            // Never expires, but remember it is offline.
            let h = ctx.run_later(Duration::from_secs(u32::MAX as u64), |_, _| {});
            self.offline.insert(client_id, h);
            return;
        };
        let id = client_id.clone();
        let h = ctx.run_later(after, move |act, ctx| {
            act.offline.remove(&id);
            act.expire(id.clone(), ctx);
        });
        self.offline.insert(client_id, h);
    }

    /// The session of `client_id` has expired: forget it and stop routing for it.
    fn expire(&mut self, client_id: Arc<str>, ctx: &mut Context<Self>) {
        slog::info!(self.log, "session expired"; "client_id" => &*client_id);
        if let Some(gw) = self.gateway.as_ref().filter(|g| g.inner.hooks.has_events()) {
            gw.inner.hooks.emit(super::hooks::Event::SessionExpired {
                client_id: client_id.to_string(),
            });
        }
        // A will still waiting for its delay was scheduled at min(delay, expiry), so it
        // fires now by itself; nothing to do for it here.
        let storage = self.storage.clone();
        let gw = self.gateway.clone();
        let fut = async move {
            let key = session_key(&client_id);
            if let Ok(Ok(Some(bytes))) = storage
                .kv
                .send(crate::storage::KvGet { key: key.clone() })
                .await
            {
                if let (Some(state), Some(gw)) = (SessionState::decode(&bytes), gw) {
                    remove_routes(&gw, &client_id, &state.subs);
                }
            }
            let _ = storage.kv.send(KvPut { key, value: None }).await;
            delete_qos2(&storage, &client_id).await;
            client_id
        };
        ctx.spawn(fut.into_actor(self).map(|cid, act, _| {
            if !act.live.contains_key(&cid) && !act.offline.contains_key(&cid) {
                act.stored.remove(&cid);
            }
        }));
    }

    fn publish_will(&self, client_id: &str, will: Will) {
        let Some(gw) = self.gateway.clone() else {
            return;
        };
        let msg = Message {
            topic: will.topic,
            payload: will.payload,
            qos: will.qos,
            retain: will.retain,
            publisher: client_id.to_string(),
            timestamp_ms: crate::now_ms(),
            props: will.props,
        };
        let log = self.log.clone();
        let cid = client_id.to_string();
        actix::spawn(async move {
            if let Err(e) = gw.publish(msg).await {
                slog::warn!(log, "will not published"; "client_id" => cid, "error" => %e);
            }
        });
    }
}

/// Remove the routes of `subs` owned by `client_id` from the shards.
pub fn remove_routes(gw: &Gateway, client_id: &Arc<str>, subs: &[SubState]) {
    let n = gw.inner.shards.len();
    for s in subs {
        for i in shards_for_filter(&s.filter, n) {
            gw.inner.shards[i].do_send(RemoveRoute {
                owner: client_id.clone(),
                filter: s.filter.clone(),
                kind: s.kind(),
            });
        }
    }
}

async fn delete_qos2(storage: &Storage, client_id: &str) {
    let prefix = format!("{QOS2_PREFIX}{client_id}/");
    if let Ok(Ok(rows)) = storage.kv.send(KvScan { prefix }).await {
        for (key, _) in rows {
            let _ = storage.kv.send(KvPut { key, value: None }).await;
        }
    }
}

/// Load the inbound QoS 2 packet ids of `client_id`.
pub async fn load_qos2(storage: &Storage, client_id: &str) -> Vec<u16> {
    let prefix = format!("{QOS2_PREFIX}{client_id}/");
    match storage
        .kv
        .send(KvScan {
            prefix: prefix.clone(),
        })
        .await
    {
        Ok(Ok(rows)) => rows
            .iter()
            .filter_map(|(k, _)| k.strip_prefix(&prefix)?.parse().ok())
            .collect(),
        _ => Vec::new(),
    }
}

impl Actor for ClientRegistry {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(4096);
    }
}

impl Handler<Restore> for ClientRegistry {
    type Result = ResponseActFuture<Self, Result<(), StorageError>>;

    fn handle(&mut self, m: Restore, _: &mut Context<Self>) -> Self::Result {
        self.gateway = Some(m.gateway.clone());
        let storage = self.storage.clone();
        let fut = async move {
            storage
                .kv
                .send(KvScan {
                    prefix: SESSION_PREFIX.to_string(),
                })
                .await
                .map_err(|_| StorageError::Closed)?
        };
        Box::pin(fut.into_actor(self).map(move |rows, act, ctx| {
            let rows = rows?;
            let now = crate::now_ms();
            let gw = m.gateway;
            let n = gw.inner.shards.len();
            let mut restored = 0usize;
            for (key, value) in rows {
                let Some(state) = SessionState::decode(&value) else {
                    slog::warn!(act.log, "unreadable session skipped"; "key" => key);
                    continue;
                };
                let cid: Arc<str> = state.client_id.as_str().into();
                act.stored.insert(cid.clone());
                let left = state.expires_in(now);
                if left == Some(Duration::ZERO) {
                    act.expire(cid, ctx);
                    continue;
                }
                for s in &state.subs {
                    for i in shards_for_filter(&s.filter, n) {
                        gw.inner.shards[i].do_send(AddRoute {
                            owner: cid.clone(),
                            filter: s.filter.clone(),
                            kind: s.kind(),
                        });
                    }
                }
                act.schedule_expiry(cid, left, ctx);
                restored += 1;
            }
            slog::info!(act.log, "persistent sessions restored"; "count" => restored);
            Ok(())
        }))
    }
}

impl Handler<Register> for ClientRegistry {
    type Result = ResponseActFuture<Self, Result<Option<SessionState>, StorageError>>;

    fn handle(&mut self, m: Register, ctx: &mut Context<Self>) -> Self::Result {
        // A reconnect before the will delay has passed cancels the will (v5 §3.1.3.2.2).
        if let Some(h) = self.wills.remove(&m.client_id) {
            ctx.cancel_future(h);
        }
        if let Some(h) = self.offline.remove(&m.client_id) {
            ctx.cancel_future(h);
        }
        let old = self.live.insert(
            m.client_id.clone(),
            Live {
                conn_id: m.conn_id,
                addr: m.addr.clone(),
            },
        );
        let storage = self.storage.clone();
        let gw = self.gateway.clone();
        let cid = m.client_id.clone();
        let clean = m.clean_start;
        let log = self.log.clone();
        let had_stored = self.stored.contains(&cid);
        if m.persistent {
            self.stored.insert(cid.clone());
        }
        let (conn_id, persistent) = (m.conn_id, m.persistent);
        let fut = async move {
            // 1. Take the session over from a live connection with the same id.
            let mut state: Option<SessionState> = None;
            // Whether a live session answered: then it was the authority on the state,
            // and what the KvStore holds is older.
            let mut answered = false;
            if let Some(old) = old {
                slog::info!(log, "session taken over"; "client_id" => &*cid);
                match tokio::time::timeout(
                    TAKEOVER_TIMEOUT,
                    old.addr.send(Takeover { clean_start: clean }),
                )
                .await
                {
                    Ok(Ok(Handoff::State(s))) => {
                        state = s;
                        answered = true;
                    }
                    _ => {
                        slog::warn!(log, "old session did not hand over in time"; "client_id" => &*cid)
                    }
                }
            }
            // 2. Or resume an offline persistent session.
            if state.is_none() && !answered && had_stored {
                if let Ok(Ok(Some(bytes))) = storage
                    .kv
                    .send(crate::storage::KvGet {
                        key: session_key(&cid),
                    })
                    .await
                {
                    state = SessionState::decode(&bytes);
                }
            }
            if let (Some(s), true) = (state.as_mut(), had_stored) {
                let mut ids = load_qos2(&storage, &cid).await;
                ids.retain(|id| !s.qos2_in.contains(id));
                s.qos2_in.extend(ids);
            }
            // 3. Clean Start discards it (MQTT-3.1.2-4 / v5 §3.1.2.4).
            if clean {
                if let Some(s) = state.take() {
                    if let Some(gw) = &gw {
                        remove_routes(gw, &cid, &s.subs);
                    }
                }
                if had_stored {
                    storage
                        .kv
                        .send(KvPut {
                            key: session_key(&cid),
                            value: None,
                        })
                        .await
                        .map_err(|_| StorageError::Closed)??;
                    delete_qos2(&storage, &cid).await;
                }
            }
            Ok(state)
        };
        Box::pin(fut.into_actor(self).map(move |res, act, _| {
            // Nothing stored any more for a clean, non-persistent connection that is
            // still the current one.
            let current = act
                .live
                .get(&m.client_id)
                .is_some_and(|l| l.conn_id == conn_id);
            if res.is_ok() && clean && !persistent && current {
                act.stored.remove(&m.client_id);
            }
            res
        }))
    }
}

impl Handler<Unregister> for ClientRegistry {
    type Result = ();

    fn handle(&mut self, m: Unregister, ctx: &mut Context<Self>) {
        let current = self
            .live
            .get(&m.client_id)
            .map(|l| l.conn_id == m.conn_id)
            .unwrap_or(false);
        if current {
            self.live.remove(&m.client_id);
        }
        if let Some(will) = m.will {
            if will.delay_secs == 0 || !current {
                self.publish_will(&m.client_id, will);
            } else {
                let cid = m.client_id.clone();
                let expiry = m.state.as_ref().map(|s| s.expiry_secs).unwrap_or(0);
                // The will goes at the delay or when the session ends, whichever is first.
                let delay = Duration::from_secs(will.delay_secs.min(expiry) as u64);
                let h = ctx.run_later(delay, move |act, _| {
                    act.wills.remove(&cid);
                    act.publish_will(&cid, will);
                });
                self.wills.insert(m.client_id.clone(), h);
            }
        }
        if current && m.discard {
            let storage = self.storage.clone();
            let cid = m.client_id.clone();
            ctx.spawn(
                async move {
                    let _ = storage
                        .kv
                        .send(KvPut {
                            key: session_key(&cid),
                            value: None,
                        })
                        .await;
                    delete_qos2(&storage, &cid).await;
                }
                .into_actor(self),
            );
            return;
        }
        if !current || self.shutting_down && m.state.is_none() {
            return;
        }
        if let Some(state) = m.state {
            let left = state.expires_in(crate::now_ms());
            let key = session_key(&state.client_id);
            let value = Some(state.encode());
            let kv = self.storage.kv.clone();
            ctx.spawn(
                async move {
                    let _ = kv.send(KvPut { key, value }).await;
                }
                .into_actor(self),
            );
            if !self.shutting_down {
                self.schedule_expiry(m.client_id, left, ctx);
            }
        }
    }
}

impl Handler<super::session::Reauthorize> for ClientRegistry {
    type Result = ();

    /// Passed on to every live session (`do_send`: one message each per reload, past
    /// a full mailbox too, so that no session keeps a revoked subscription).
    fn handle(&mut self, _: super::session::Reauthorize, _: &mut Context<Self>) {
        for live in self.live.values() {
            live.addr.do_send(super::session::Reauthorize);
        }
    }
}

impl Handler<Count> for ClientRegistry {
    type Result = usize;
    fn handle(&mut self, _: Count, _: &mut Context<Self>) -> usize {
        self.live.len()
    }
}

impl Handler<Shutdown> for ClientRegistry {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Shutdown, _: &mut Context<Self>) -> Self::Result {
        self.shutting_down = true;
        let sessions: Vec<Addr<MqttSession>> = self.live.values().map(|l| l.addr.clone()).collect();
        let kv = self.storage.kv.clone();
        let fut = async move {
            let closes = sessions.into_iter().map(|a| async move {
                a.send(super::session::ServerShutdown).await.ok().flatten()
            });
            let states =
                tokio::time::timeout(Duration::from_secs(5), futures::future::join_all(closes))
                    .await
                    .unwrap_or_default();
            for state in states.into_iter().flatten() {
                let _ = kv
                    .send(KvPut {
                        key: session_key(&state.client_id),
                        value: Some(state.encode()),
                    })
                    .await;
            }
        };
        Box::pin(fut.into_actor(self).map(|_, _, _| ()))
    }
}
