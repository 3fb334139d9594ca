//! `RetainStore`: the retained message of every topic.
//!
//! * **Owns** topic → retained message, in memory, backed by the compacted `KvStore`
//!   under `retain/{topic}`. Retained messages are copies kept outside the commitlog on
//!   purpose: they must outlive log retention.
//! * **Handles** [`SetRetained`] (from sessions and other publishers, before they
//!   acknowledge a retained PUBLISH) and [`MatchRetained`] (from sessions on SUBSCRIBE).
//! * **Back-pressure.** `SetRetained` answers only after the KvStore write is durable,
//!   so a publisher of retained messages is paced by the store.

use std::collections::HashMap;
use std::sync::Arc;

use actix::prelude::*;
use bincode::{Decode, Encode};
use bytes::Bytes;

use super::topic::matches;
use super::MqttConfig;
use crate::storage::{KvPut, KvScan, Message, MessageProps, Storage, StorageError};

const PREFIX: &str = "retain/";

#[derive(Encode, Decode)]
struct RetainedWire {
    topic: String,
    payload: Vec<u8>,
    qos: u8,
    publisher: String,
    timestamp_ms: u64,
    props: MessageProps,
}

fn encode(m: &Message) -> Vec<u8> {
    let w = RetainedWire {
        topic: m.topic.clone(),
        payload: m.payload.to_vec(),
        qos: m.qos,
        publisher: m.publisher.clone(),
        timestamp_ms: m.timestamp_ms,
        props: m.props.clone(),
    };
    bincode::encode_to_vec(&w, bincode::config::standard()).unwrap_or_default()
}

fn decode(b: &[u8]) -> Option<Message> {
    let (w, _): (RetainedWire, _) =
        bincode::decode_from_slice(b, bincode::config::standard()).ok()?;
    Some(Message {
        topic: w.topic,
        payload: Bytes::from(w.payload),
        qos: w.qos,
        retain: true,
        publisher: w.publisher,
        timestamp_ms: w.timestamp_ms,
        props: w.props,
    })
}

/// Seconds of Message Expiry left at `now_ms`, `Some(0)` once expired, `None` if the
/// message never expires.
pub fn expiry_left(m: &Message, now_ms: u64) -> Option<u32> {
    let secs = m.props.message_expiry_secs?;
    let age = now_ms.saturating_sub(m.timestamp_ms) / 1000;
    Some((secs as u64).saturating_sub(age) as u32)
}

/// Store (or, with an empty payload, delete) the retained message of `message.topic`.
#[derive(Message)]
#[rtype(result = "Result<(), RetainError>")]
pub struct SetRetained {
    pub message: Message,
}

/// Every unexpired retained message whose topic matches `filter`.
#[derive(Message)]
#[rtype(result = "Vec<Arc<Message>>")]
pub struct MatchRetained {
    pub filter: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RetainError {
    #[error("too many retained messages")]
    Quota,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

pub struct RetainStore {
    messages: HashMap<String, Arc<Message>>,
    storage: Storage,
    max: usize,
    log: slog::Logger,
}

impl RetainStore {
    /// Load every retained message from the KvStore.
    pub async fn load(
        storage: &Storage,
        cfg: &MqttConfig,
        log: slog::Logger,
    ) -> Result<RetainStore, StorageError> {
        let log = log.new(slog::o!("actor" => "retain_store"));
        let rows = storage
            .kv
            .send(KvScan {
                prefix: PREFIX.to_string(),
            })
            .await
            .map_err(|_| StorageError::Closed)??;
        let mut messages = HashMap::new();
        for (key, value) in rows {
            match decode(&value) {
                Some(m) => {
                    messages.insert(m.topic.clone(), Arc::new(m));
                }
                None => slog::warn!(log, "unreadable retained message skipped"; "key" => key),
            }
        }
        slog::info!(log, "retained messages loaded"; "count" => messages.len());
        Ok(RetainStore {
            messages,
            storage: storage.clone(),
            max: cfg.max_retained,
            log,
        })
    }
}

impl Actor for RetainStore {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(1024);
    }
}

impl Handler<SetRetained> for RetainStore {
    type Result = ResponseFuture<Result<(), RetainError>>;

    fn handle(&mut self, m: SetRetained, _: &mut Context<Self>) -> Self::Result {
        let key = format!("{PREFIX}{}", m.message.topic);
        let value = if m.message.payload.is_empty() {
            // MQTT-3.3.1-10/11: an empty retained payload deletes the retained message.
            self.messages.remove(&m.message.topic);
            None
        } else {
            if self.max > 0
                && self.messages.len() >= self.max
                && !self.messages.contains_key(&m.message.topic)
            {
                slog::warn!(self.log, "retained message limit reached"; "max" => self.max);
                return Box::pin(async { Err(RetainError::Quota) });
            }
            let bytes = encode(&m.message);
            self.messages
                .insert(m.message.topic.clone(), Arc::new(m.message));
            Some(bytes)
        };
        let put = self.storage.kv.send(KvPut { key, value });
        Box::pin(async move {
            put.await.map_err(|_| StorageError::Closed)??;
            Ok(())
        })
    }
}

impl Handler<MatchRetained> for RetainStore {
    type Result = MessageResult<MatchRetained>;

    fn handle(&mut self, m: MatchRetained, _: &mut Context<Self>) -> Self::Result {
        let now = crate::now_ms();
        let mut expired = Vec::new();
        let mut out = Vec::new();
        if !m.filter.contains(['+', '#']) {
            if let Some(msg) = self.messages.get(&m.filter) {
                out.push(msg.clone());
            }
        } else {
            for (topic, msg) in &self.messages {
                if matches(&m.filter, topic) {
                    out.push(msg.clone());
                }
            }
        }
        out.retain(|msg| {
            if expiry_left(msg, now) == Some(0) {
                expired.push(msg.topic.clone());
                false
            } else {
                true
            }
        });
        for topic in expired {
            self.messages.remove(&topic);
            self.storage.kv.do_send(KvPut {
                key: format!("{PREFIX}{topic}"),
                value: None,
            });
        }
        out.sort_by(|a, b| a.topic.cmp(&b.topic));
        MessageResult(out)
    }
}
