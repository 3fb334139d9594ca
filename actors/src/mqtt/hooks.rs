//! Hooks: the messages an extension actor receives from the MQTT gateway, and the
//! [`Hooks`] set the gateway carries (registered on `actimq::NodeBuilder`).
//!
//! An extension is an actix actor; a hook is a [`Recipient`] of one of these messages.
//!
//! * **Owns** nothing: pure message types plus the registered recipients, the deadline
//!   and the failure policy ([`HooksConfig`]).
//! * **Who sends**: `MqttSession` sends [`Authenticate`] (CONNECT, before the client is
//!   registered), [`Authorize`] (each PUBLISH, each SUBSCRIBE filter, the will at
//!   CONNECT), [`OnPublish`] (before the append; also `Gateway::publish_batch`), and
//!   [`Event`]s; the `ClientRegistry` sends [`Event::SessionExpired`]. The service
//!   gateway's `ServerSession` sends [`Authenticate`] (Hello, with
//!   [`PROTOCOL_SERVICE`]) and [`Authorize`] (each produced message, each Join).
//! * **Order and answers**: decision hooks run in registration order; the first `Allow`
//!   or `Deny` decides, `Next` asks the next one, and when every hook says `Next` the
//!   action is allowed.
//! * **Back-pressure and failure**: each call has a deadline (`hooks.timeout_ms`); a
//!   hook that times out, whose actor is dead, or whose mailbox is closed is handled by
//!   the failure policy (`hooks.on_failure`: deny, or skip it as if it said `Next`). A
//!   session awaits its hook in a spawned future, so only that client waits. Events are
//!   sent with `try_send` and dropped when the hook's mailbox is full: they never block.
//! * **Cost**: with no hooks registered every check is one `is_empty` and no message
//!   is built.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytes::Bytes;

use crate::storage::Message;

/// [`Authenticate::protocol`] of a service-protocol login (a `Hello` on the service
/// listener; MQTT protocol levels are 3 to 5). `client_id` is then the service's name.
pub const PROTOCOL_SERVICE: u8 = 0;

/// Asked on CONNECT, before the client id is registered: may this client connect?
/// Also asked for a service's `Hello` ([`PROTOCOL_SERVICE`]).
#[derive(Message, Debug, Clone)]
#[rtype(result = "AuthDecision")]
pub struct Authenticate {
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<Bytes>,
    pub peer: SocketAddr,
    /// The verified TLS client certificate's CN, when its listener has `cn_as_username`.
    pub cert_username: Option<String>,
    /// Protocol level: 3 (3.1), 4 (3.1.1) or 5; [`PROTOCOL_SERVICE`] for a service.
    pub protocol: u8,
}

/// The answer to [`Authenticate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, MessageResponse)]
pub enum AuthDecision {
    Allow,
    /// Refuse with this CONNACK reason code (v5 codes; for 3.1.1, 0x86 becomes 4 and
    /// 0x87 becomes 5, anything else 3).
    Deny(u8),
    /// No opinion: ask the next hook.
    Next,
}

/// What a client wants to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Publish {
        topic: String,
        qos: u8,
        retain: bool,
    },
    Subscribe {
        filter: String,
        qos: u8,
    },
}

/// Asked for each PUBLISH (and the will, at CONNECT) and each SUBSCRIBE filter.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Decision")]
pub struct Authorize {
    pub client_id: String,
    pub username: Option<String>,
    pub action: Action,
}

/// The answer to [`Authorize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, MessageResponse)]
pub enum Decision {
    Allow,
    Deny,
    Next,
}

/// Asked for every message about to be appended: an interceptor that may change the
/// topic, payload or properties, or drop the message.
#[derive(Message, Debug, Clone)]
#[rtype(result = "PublishDecision")]
pub struct OnPublish {
    pub message: Message,
}

/// The answer to [`OnPublish`]. Not boxed: one reply per message, an allocation each.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, MessageResponse)]
pub enum PublishDecision {
    /// Store this (possibly changed) message. A topic that is not a valid topic name
    /// drops it.
    Continue(Message),
    /// Acknowledge and drop it.
    Drop,
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectReason {
    /// The client sent DISCONNECT.
    Normal,
    /// The connection dropped (or wrote failed) without DISCONNECT.
    Abnormal,
    /// Another connection took the client id over.
    TakenOver,
    /// Nothing heard for 1.5 keep-alive periods.
    KeepAliveTimeout,
    /// The client broke the protocol or sent bad input.
    ProtocolError,
    /// The node is stopping.
    ServerShutdown,
}

/// Fire-and-forget notifications (sent with `try_send`).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub enum Event {
    ClientConnected {
        client_id: String,
        username: Option<String>,
        peer: SocketAddr,
        protocol: u8,
        session_present: bool,
    },
    ClientDisconnected {
        client_id: String,
        reason: DisconnectReason,
    },
    Subscribed {
        client_id: String,
        filter: String,
        qos: u8,
    },
    Unsubscribed {
        client_id: String,
        filter: String,
    },
    /// A message was written to a subscriber.
    MessageDelivered {
        client_id: String,
        topic: String,
        qos: u8,
    },
    /// A QoS 1/2 delivery was acknowledged (PUBACK or PUBCOMP).
    MessageAcked {
        client_id: String,
        packet_id: u16,
    },
    /// A persistent session expired offline.
    SessionExpired {
        client_id: String,
    },
}

/// What happens when a hook times out or its actor is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// Deny (CONNECT refused with 0x88 Server unavailable, PUBLISH/SUBSCRIBE denied).
    #[default]
    Deny,
    /// Skip the failed hook, as if it had answered `Next`.
    Allow,
}

/// Deadline and failure policy (`[hooks]` in the config).
#[derive(Debug, Clone, Copy)]
pub struct HooksConfig {
    pub timeout: Duration,
    pub on_failure: FailurePolicy,
}

impl Default for HooksConfig {
    fn default() -> Self {
        HooksConfig {
            timeout: Duration::from_millis(1000),
            on_failure: FailurePolicy::Deny,
        }
    }
}

/// The registered hooks, in registration order. Cheap to clone.
#[derive(Clone, Default)]
pub struct Hooks {
    inner: Arc<HookSet>,
}

#[derive(Default)]
struct HookSet {
    cfg: HooksConfig,
    authenticate: Vec<Recipient<Authenticate>>,
    authorize: Vec<Recipient<Authorize>>,
    on_publish: Vec<Recipient<OnPublish>>,
    events: Vec<Recipient<Event>>,
}

/// Builds a [`Hooks`].
#[derive(Default)]
pub struct HooksBuilder {
    set: HookSet,
}

impl HooksBuilder {
    pub fn config(mut self, cfg: HooksConfig) -> Self {
        self.set.cfg = cfg;
        self
    }
    pub fn authenticate(mut self, r: Recipient<Authenticate>) -> Self {
        self.set.authenticate.push(r);
        self
    }
    pub fn authorize(mut self, r: Recipient<Authorize>) -> Self {
        self.set.authorize.push(r);
        self
    }
    pub fn on_publish(mut self, r: Recipient<OnPublish>) -> Self {
        self.set.on_publish.push(r);
        self
    }
    pub fn events(mut self, r: Recipient<Event>) -> Self {
        self.set.events.push(r);
        self
    }
    pub fn build(self) -> Hooks {
        Hooks {
            inner: Arc::new(self.set),
        }
    }
}

/// How one hook call ended.
enum Called<T> {
    Answer(T),
    Failed,
}

impl Hooks {
    pub fn builder() -> HooksBuilder {
        HooksBuilder::default()
    }

    /// No hook of any kind.
    pub fn is_empty(&self) -> bool {
        let s = &self.inner;
        s.authenticate.is_empty()
            && s.authorize.is_empty()
            && s.on_publish.is_empty()
            && s.events.is_empty()
    }
    pub fn has_authenticate(&self) -> bool {
        !self.inner.authenticate.is_empty()
    }
    pub fn has_authorize(&self) -> bool {
        !self.inner.authorize.is_empty()
    }
    pub fn has_on_publish(&self) -> bool {
        !self.inner.on_publish.is_empty()
    }
    pub fn has_events(&self) -> bool {
        !self.inner.events.is_empty()
    }
    pub fn config(&self) -> HooksConfig {
        self.inner.cfg
    }

    async fn call<M>(&self, r: &Recipient<M>, m: M) -> Called<M::Result>
    where
        M: actix::Message + Send + 'static,
        M::Result: Send,
    {
        match tokio::time::timeout(self.inner.cfg.timeout, r.send(m)).await {
            Ok(Ok(answer)) => Called::Answer(answer),
            _ => Called::Failed,
        }
    }

    /// Ask the authentication hooks; `Allow` when none decides.
    pub async fn authenticate(&self, m: Authenticate) -> AuthDecision {
        for r in &self.inner.authenticate {
            match self.call(r, m.clone()).await {
                Called::Answer(AuthDecision::Next) => {}
                Called::Answer(d) => return d,
                Called::Failed => match self.inner.cfg.on_failure {
                    FailurePolicy::Deny => return AuthDecision::Deny(0x88),
                    FailurePolicy::Allow => {}
                },
            }
        }
        AuthDecision::Allow
    }

    /// Ask the authorization hooks; true when allowed (also when none decides).
    pub async fn authorize(&self, m: Authorize) -> bool {
        for r in &self.inner.authorize {
            match self.call(r, m.clone()).await {
                Called::Answer(Decision::Allow) => return true,
                Called::Answer(Decision::Deny) => return false,
                Called::Answer(Decision::Next) => {}
                Called::Failed => match self.inner.cfg.on_failure {
                    FailurePolicy::Deny => return false,
                    FailurePolicy::Allow => {}
                },
            }
        }
        true
    }

    /// Run the publish interceptors in order; `None` when one drops the message (or
    /// fails under the deny policy).
    pub async fn on_publish(&self, mut message: Message) -> Option<Message> {
        let allow = self.inner.cfg.on_failure == FailurePolicy::Allow;
        for r in &self.inner.on_publish {
            // The call consumes the message: keep a copy only if a failure skips the hook.
            let backup = allow.then(|| message.clone());
            match self.call(r, OnPublish { message }).await {
                Called::Answer(PublishDecision::Continue(m)) => message = m,
                Called::Answer(PublishDecision::Drop) => return None,
                Called::Failed => message = backup?,
            }
        }
        Some(message)
    }

    /// Tell every event hook, without waiting; dropped for a full or closed mailbox.
    pub fn emit(&self, e: Event) {
        if let Some((last, rest)) = self.inner.events.split_last() {
            for r in rest {
                let _ = r.try_send(e.clone());
            }
            let _ = last.try_send(e);
        }
    }
}
