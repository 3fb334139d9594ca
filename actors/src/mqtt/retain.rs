//! `RetainStore`: the retained message of every topic.
//!
//! * **Owns** topic → retained message, in memory, backed by the compacted `KvStore`
//!   under `retain/{topic}`. Retained messages are copies kept outside the commitlog on
//!   purpose: they must outlive log retention.
//! * **Handles** [`SetRetained`] (from sessions and other publishers, before they
//!   acknowledge a retained PUBLISH) and [`MatchRetained`] (from sessions on SUBSCRIBE).
//! * **Back-pressure.** `SetRetained` answers only after the KvStore write is durable,
//!   so a publisher of retained messages is paced by the store.
//! * **Quotas.** `mqtt.max_retained` (messages), `mqtt.max_retained_payload` (one
//!   payload) and `mqtt.max_retained_bytes` (all payloads) bound the memory held here;
//!   a retained PUBLISH over them is refused with [`RetainError::Quota`] (the message is
//!   still delivered, the topic's previous retained message stays).

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
    #[error("retained message quota exceeded")]
    Quota,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

pub struct RetainStore {
    messages: HashMap<String, Arc<Message>>,
    /// Payload bytes of `messages`.
    bytes: usize,
    storage: Storage,
    /// `mqtt.max_retained`, `max_retained_payload`, `max_retained_bytes` (0: unlimited).
    max: usize,
    max_payload: usize,
    max_bytes: usize,
    log: slog::Logger,
}

impl RetainStore {
    /// Why storing a payload of `size` bytes (replacing one of `replaced` bytes) would
    /// break a quota, if it would.
    fn over_quota(&self, size: usize, replaced: Option<usize>) -> Option<&'static str> {
        let over = |limit: usize, v: usize| limit > 0 && v > limit;
        if over(self.max_payload, size) {
            Some("max_retained_payload")
        } else if replaced.is_none() && over(self.max, self.messages.len() + 1) {
            Some("max_retained")
        } else if over(self.max_bytes, self.bytes - replaced.unwrap_or(0) + size) {
            Some("max_retained_bytes")
        } else {
            None
        }
    }

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
        let bytes = messages.values().map(|m| m.payload.len()).sum();
        // Lowered quotas apply to new messages; what is stored stays.
        slog::info!(log, "retained messages loaded"; "count" => messages.len(), "bytes" => bytes);
        Ok(RetainStore {
            messages,
            bytes,
            storage: storage.clone(),
            max: cfg.max_retained,
            max_payload: cfg.max_retained_payload,
            max_bytes: cfg.max_retained_bytes,
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
            if let Some(old) = self.messages.remove(&m.message.topic) {
                self.bytes -= old.payload.len();
            }
            None
        } else {
            let size = m.message.payload.len();
            let replaced = self
                .messages
                .get(&m.message.topic)
                .map(|old| old.payload.len());
            if let Some(why) = self.over_quota(size, replaced) {
                slog::debug!(self.log, "retained message refused"; "topic" => &m.message.topic,
                    "why" => why, "payload_bytes" => size);
                return Box::pin(async { Err(RetainError::Quota) });
            }
            self.bytes = self.bytes - replaced.unwrap_or(0) + size;
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
            if let Some(old) = self.messages.remove(&topic) {
                self.bytes -= old.payload.len();
            }
            self.storage.kv.do_send(KvPut {
                key: format!("{PREFIX}{topic}"),
                value: None,
            });
        }
        out.sort_by(|a, b| a.topic.cmp(&b.topic));
        MessageResult(out)
    }
}
