//! The actors of actimq and the messages they exchange.
//!
//! # Layout
//! * [`storage`]: the commitlog (`CommitLog`, one `Segment` actor per file), the
//!   `QueueIndex` shards, the `Notifier` shards, the `OffsetStore` and the compacted
//!   `KvStore` (retained messages, persistent sessions). [`storage`]'s `mod.rs` is the
//!   contract that gateways use.
//! * [`mqtt`]: the MQTT gateway: one `MqttSession` per connection, the `ClientRegistry`
//!   (client-id takeover, persistent sessions), the `SubscriptionShard`s (filter tries
//!   that answer "which queues does this topic go to"), and the `RetainStore`.
//! * [`service`]: the service gateway: one `ServerSession` per back-end connection
//!   (produce, consumer groups, pull, commit, seek) and the `GroupCoordinator`.
//!
//! Pure logic (record format, topic matching, the filter trie, the in-flight window)
//! lives in plain modules with unit tests; the actors stay thin.

pub mod mqtt;
pub mod service;
pub mod storage;

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
