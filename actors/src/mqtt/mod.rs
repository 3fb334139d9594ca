//! The MQTT gateway: devices speak MQTT 3.1.1 and 5.0 (detected from CONNECT) to one
//! [`session::MqttSession`] actor per connection.
//!
//! * [`codec`] wraps the `rmqtt-codec` crate: the only module that names it.
//! * [`topic`] validates topic names and filters and matches them (pure).
//! * [`trie`] is the filter trie used by the subscription shards (pure).
//! * [`shard::SubscriptionShard`] answers "which queues does this topic go to".
//! * [`registry::ClientRegistry`] owns client-id takeover, persistent sessions,
//!   session expiry and delayed wills.
//! * [`retain::RetainStore`] keeps retained messages in the compacted KvStore.
//! * [`hooks`] are the messages extension actors receive (authenticate, authorize,
//!   intercept publishes, events); [`subscription::Subscription`] lets an extension
//!   consume a filter with its own committed offsets.
//! * [`session::MqttSession`] is the connection: protocol state, in-flight window,
//!   per-queue read offsets; it pulls from storage on arrival hints.

pub mod codec;
pub mod hooks;
pub mod inflight;
pub mod registry;
pub mod retain;
pub mod session;
pub mod shard;
pub mod subscription;
pub mod throttle;
pub mod topic;
pub mod trie;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::storage::{Message, Position, Storage, StorageError};

/// Settings of the MQTT gateway: the `[mqtt]` section of the config, deserialised as
/// it is (every key required, unknown keys refused), plus `partitions`, which the node
/// takes from `[service]`.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// Largest packet accepted from a client, and advertised as Maximum Packet Size (v5).
    pub max_packet_size: u32,
    /// Receive Maximum advertised to v5 clients: QoS 1/2 publishes a client may have
    /// unacknowledged towards us.
    pub receive_maximum: u16,
    /// Outbound in-flight window (QoS 1/2 messages sent and not yet acknowledged),
    /// further limited by the client's own Receive Maximum.
    pub max_inflight: u16,
    /// Topic Alias Maximum advertised to v5 clients (inbound aliases).
    pub topic_alias_maximum: u16,
    /// Most levels a topic name or filter may have.
    pub max_topic_levels: usize,
    /// Longest client id accepted.
    pub max_client_id_len: usize,
    /// Seconds a new connection may take to send CONNECT.
    pub connect_timeout_secs: u64,
    /// Keep-alive the server imposes when a client asks for 0 or more than this (v5 Server
    /// Keep Alive); 0 leaves the client's value alone.
    pub max_keepalive_secs: u16,
    /// Upper bound for Session Expiry Interval (v5) and for clean-session=0 (v3) sessions.
    pub max_session_expiry_secs: u32,
    /// Messages per pull from a queue.
    pub pull_batch: usize,
    /// Bytes queued for the socket before the session stops pulling (write back-pressure).
    pub max_write_buffer: usize,
    /// Whether retained messages are supported.
    pub retain_available: bool,
    /// Max retained messages (0 = unlimited).
    pub max_retained: usize,
    /// Largest payload kept as a retained message (0 = unlimited); a larger retained
    /// PUBLISH is delivered but not retained.
    pub max_retained_payload: usize,
    /// Most payload bytes of all retained messages together (0 = unlimited).
    pub max_retained_bytes: usize,
    /// Most subscriptions one client may hold (0 = unlimited); more get SUBACK 0x97
    /// (v5) or 0x80 (v3).
    pub max_subscriptions: usize,
    /// PUBLISH packets a second one client may send (0 = unlimited); above it its
    /// socket is read more slowly: throttled, not disconnected.
    pub max_inbound_messages_per_sec: u32,
    /// Bytes a second one client may send (0 = unlimited), throttled the same way.
    pub max_inbound_bytes_per_sec: u32,
    /// Subscription shards (sharded by first-level topic).
    pub subscription_shards: usize,
    /// Allow clients to connect with an empty client id (a server id is assigned).
    pub allow_empty_client_id: bool,
    /// Partitions (queues) of every first-level topic (`service.partitions`, not a key
    /// of `[mqtt]`): a
    /// publisher's messages go to one of them by hash of its client id (or a service
    /// producer's key), and consumer groups balance them among their members.
    #[serde(skip)]
    pub partitions: u32,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            max_packet_size: 1024 * 1024,
            receive_maximum: 1024,
            max_inflight: 256,
            topic_alias_maximum: 64,
            max_topic_levels: 32,
            max_client_id_len: 256,
            connect_timeout_secs: 10,
            max_keepalive_secs: 0,
            max_session_expiry_secs: 7 * 24 * 3600,
            pull_batch: 256,
            max_write_buffer: 256 * 1024,
            retain_available: true,
            max_retained: 1_000_000,
            max_retained_payload: 256 * 1024,
            max_retained_bytes: 256 * 1024 * 1024,
            max_subscriptions: 1000,
            max_inbound_messages_per_sec: 0,
            max_inbound_bytes_per_sec: 0,
            subscription_shards: 4,
            allow_empty_client_id: true,
            partitions: 4,
        }
    }
}

/// What the transport knows about a connection before MQTT starts.
#[derive(Debug, Clone, Default)]
pub struct ConnInfo {
    /// The verified client certificate's Common Name, when its listener has
    /// `cn_as_username`: it becomes the session's username, replacing any username in
    /// CONNECT (as Mosquitto's `use_identity_as_username`).
    pub cert_username: Option<String>,
}

/// A running MQTT gateway: the shared actors that every session talks to.
/// Cheap to clone; hand a clone to each IO arbiter.
#[derive(Clone)]
pub struct Gateway {
    pub(crate) inner: Arc<GatewayInner>,
}

pub(crate) struct GatewayInner {
    pub cfg: MqttConfig,
    pub storage: Storage,
    pub registry: Addr<registry::ClientRegistry>,
    pub shards: Vec<Addr<shard::SubscriptionShard>>,
    pub retain: Addr<retain::RetainStore>,
    /// Bumped by every subscription shard whenever its filter set changes; sessions
    /// cache topic→queues routes and re-ask the shards only when it moves.
    pub route_epoch: Arc<AtomicU64>,
    /// Source of unique watcher ids and server-assigned client ids.
    pub next_id: AtomicU64,
    /// Extension hooks (empty unless registered on the node builder).
    pub hooks: hooks::Hooks,
    pub log: slog::Logger,
}

impl Gateway {
    /// Start the registry, shards and retained store, and restore persistent sessions.
    /// Call from inside a running actix System.
    pub async fn start(
        cfg: MqttConfig,
        storage: Storage,
        log: slog::Logger,
    ) -> Result<Gateway, crate::storage::StorageError> {
        Gateway::start_with_hooks(cfg, storage, hooks::Hooks::default(), log).await
    }

    /// [`Gateway::start`] with extension hooks.
    pub async fn start_with_hooks(
        cfg: MqttConfig,
        storage: Storage,
        hooks: hooks::Hooks,
        log: slog::Logger,
    ) -> Result<Gateway, crate::storage::StorageError> {
        let route_epoch = Arc::new(AtomicU64::new(0));
        let shards: Vec<_> = (0..cfg.subscription_shards.max(1))
            .map(|i| {
                shard::SubscriptionShard::new(i, cfg.partitions, route_epoch.clone(), log.clone())
                    .start()
            })
            .collect();
        let retain = retain::RetainStore::load(&storage, &cfg, log.clone())
            .await?
            .start();
        let registry = registry::ClientRegistry::new(storage.clone(), log.clone()).start();
        let gw = Gateway {
            inner: Arc::new(GatewayInner {
                cfg,
                storage,
                registry: registry.clone(),
                shards,
                retain,
                route_epoch,
                next_id: AtomicU64::new(1),
                hooks,
                log,
            }),
        };
        registry
            .send(registry::Restore {
                gateway: gw.clone(),
            })
            .await
            .map_err(|_| crate::storage::StorageError::Closed)??;
        Ok(gw)
    }

    /// Serve one accepted connection. Must be called on the arbiter that should run the
    /// session (the IO arbiter that owns `io`).
    pub fn accept<S>(&self, io: S, peer: SocketAddr)
    where
        S: AsyncRead + AsyncWrite + Unpin + 'static,
    {
        self.accept_with(io, peer, ConnInfo::default());
    }

    /// [`Gateway::accept`], with what the transport learnt about the client (TLS).
    pub fn accept_with<S>(&self, io: S, peer: SocketAddr, info: ConnInfo)
    where
        S: AsyncRead + AsyncWrite + Unpin + 'static,
    {
        session::MqttSession::spawn(self.clone(), io, peer, info);
    }

    /// Number of live MQTT connections.
    pub async fn connections(&self) -> usize {
        self.inner.registry.send(registry::Count).await.unwrap_or(0)
    }

    /// Persist every live session's state and stop accepting work. Storage is shut down
    /// separately, after this.
    /// Re-check every live session's subscriptions against the authorization hooks and
    /// drop the denied ones (after an ACL reload). Returns at once; the sessions check
    /// in the background.
    pub fn reauthorize(&self) {
        self.inner.registry.do_send(session::Reauthorize);
    }

    pub async fn shutdown(&self) {
        let _ = self.inner.registry.send(registry::Shutdown).await;
    }

    /// Publish a message from inside the node (wills, extensions): the same route,
    /// retain and append steps as a device's PUBLISH. Its first-level partition is
    /// chosen by the publisher's id.
    pub async fn publish(&self, message: Message) -> Result<Position, PublishError> {
        self.publish_batch(vec![(message, None)])
            .await
            .pop()
            .unwrap_or(Err(PublishError::Closed))
    }

    /// Publish several messages in order (service producers): each is routed like a
    /// device's PUBLISH, its first-level partition chosen by its key (or, without one,
    /// its publisher), retained messages are set, and all are appended with one
    /// `AppendBatch`. One result per message, in order, once the last is durable.
    pub async fn publish_batch(
        &self,
        items: Vec<(Message, Option<String>)>,
    ) -> Vec<Result<Position, PublishError>> {
        if self.inner.hooks.has_on_publish() {
            return self.publish_batch_hooked(items).await;
        }
        self.publish_batch_routed(items).await
    }

    /// [`Gateway::publish_batch`] through the `OnPublish` interceptors: dropped
    /// messages answer [`PublishError::Dropped`].
    async fn publish_batch_hooked(
        &self,
        items: Vec<(Message, Option<String>)>,
    ) -> Vec<Result<Position, PublishError>> {
        let max_levels = self.inner.cfg.max_topic_levels;
        let mut kept = Vec::with_capacity(items.len());
        let mut slots = Vec::with_capacity(items.len());
        for (m, key) in items {
            match self.inner.hooks.on_publish(m).await {
                Some(m) if topic::validate_name(&m.topic, max_levels).is_ok() => {
                    slots.push(true);
                    kept.push((m, key));
                }
                _ => slots.push(false),
            }
        }
        let mut results = self.publish_batch_routed(kept).await.into_iter();
        slots
            .into_iter()
            .map(|k| match k {
                true => results.next().unwrap_or(Err(PublishError::Closed)),
                false => Err(PublishError::Dropped),
            })
            .collect()
    }

    async fn publish_batch_routed(
        &self,
        items: Vec<(Message, Option<String>)>,
    ) -> Vec<Result<Position, PublishError>> {
        if items.is_empty() {
            return Vec::new();
        }
        let shards = &self.inner.shards;
        let n = items.len();
        let asks = items.iter().map(|(m, key)| {
            let shard = &shards[shard::shard_of(topic::first_level(&m.topic), shards.len())];
            shard.send(shard::Route {
                topics: vec![m.topic.clone()],
                key: key.as_deref().unwrap_or(&m.publisher).into(),
            })
        });
        let routes = futures::future::join_all(asks).await;
        let mut appends = Vec::with_capacity(n);
        for ((message, _), route) in items.into_iter().zip(routes) {
            let Ok(mut routed) = route else {
                return (0..n).map(|_| Err(PublishError::Closed)).collect();
            };
            let queues = routed.pop().map(|r| r.queues).unwrap_or_default();
            if message.retain && self.inner.cfg.retain_available {
                let set = self
                    .inner
                    .retain
                    .send(retain::SetRetained {
                        message: message.clone(),
                    })
                    .await;
                match set {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        let e = PublishError::from(e);
                        let msg = e.to_string();
                        return std::iter::once(Err(e))
                            .chain((1..n).map(|_| Err(PublishError::Other(msg.clone()))))
                            .collect();
                    }
                    Err(_) => return (0..n).map(|_| Err(PublishError::Closed)).collect(),
                }
            }
            appends.push(crate::storage::Append { message, queues });
        }
        self.inner
            .storage
            .append_batch(appends)
            .await
            .into_iter()
            .map(|r| r.map_err(PublishError::from))
            .collect()
    }

    /// The node's storage.
    pub fn storage(&self) -> &Storage {
        &self.inner.storage
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn config(&self) -> &MqttConfig {
        &self.inner.cfg
    }

    /// The registered extension hooks.
    pub fn hooks(&self) -> &hooks::Hooks {
        &self.inner.hooks
    }
}

/// Why a publish from inside the node failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the gateway is stopping")]
    Closed,
    #[error(transparent)]
    Retain(#[from] retain::RetainError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("dropped by an OnPublish hook")]
    Dropped,
    #[error("not published: {0}")]
    Other(String),
}
