//! The storage layer: one append-only commitlog, many small queue indexes,
//! and the notifier that turns index appends into arrival hints.
//!
//! This file is the **contract** between storage and the gateways: the types and
//! messages below are what `MqttSession`, `ServerSession` and extension actors use.
//! Everything else in `storage/` is an implementation detail behind them.
//!
//! Invariants (the commitlog's promises, stated before any code):
//! 1. A message is written once. Its [`Position`] (byte position in the log) never
//!    changes, and the record at a position is immutable.
//! 2. `Append` answers only when the record has reached the configured durability
//!    (`sync`: fsynced; `async`: written to the OS, fsynced within `flush_interval_ms`).
//! 3. Index entries are dispatched only after that point, so a queue never points at a
//!    record that a crash could take away (in `sync` mode).
//! 4. A queue's offsets are dense: entry `n` is the `n`th message dispatched to that
//!    queue. Retention moves a queue's `min_offset` forward; it never renumbers.
//! 5. Arrival hints ([`Arrived`]) may be dropped; they never block the storage path.

pub mod commitlog;
pub mod flusher;
pub mod index_file;
pub mod kv;
pub mod notifier;
pub mod offset_store;
pub mod queue_index;
pub mod record;
pub mod segment;

pub use commitlog::CommitLog;
pub use flusher::Flusher;
pub use kv::{KvDeletePrefix, KvGet, KvPut, KvScan, KvStore};
pub use notifier::{Notifier, QueueArrived};
pub use offset_store::OffsetStore;
pub use queue_index::QueueIndex;

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use bincode::{Decode, Encode};
use bytes::Bytes;

/// Byte position of a record in the commitlog (global across segments).
pub type Position = u64;
/// Logical offset of an entry inside one queue.
pub type Offset = u64;

/// The name of a queue. Queues come into being on first use.
///
/// * `t:{first-level}` (optionally `t:{first-level}#{partition}`) is the first-level topic
///   queue that services consume;
/// * `f:{filter}` is the queue of one MQTT subscription filter (exact or wildcard).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Encode, Decode)]
pub struct QueueName(pub Arc<str>);

impl QueueName {
    /// The first-level topic queue of `first_level` (e.g. `home`), partition `partition`.
    pub fn topic(first_level: &str, partition: u32) -> Self {
        if partition == 0 {
            QueueName(format!("t:{first_level}").into())
        } else {
            QueueName(format!("t:{first_level}#{partition}").into())
        }
    }
    /// The queue of one subscription filter such as `home/+/temp`.
    pub fn filter(filter: &str) -> Self {
        QueueName(format!("f:{filter}").into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// A stable 64-bit hash used to pick shards and index file names.
    pub fn hash64(&self) -> u64 {
        // FNV-1a: stable across runs and platforms (std's hasher is randomly seeded).
        let mut h: u64 = 0xcbf29ce484222325;
        for b in self.0.as_bytes() {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        h
    }
}

impl fmt::Debug for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// MQTT 5 properties that travel with a message (all optional; v3 messages have none).
#[derive(Clone, Debug, Default, PartialEq, Eq, Encode, Decode)]
pub struct MessageProps {
    pub payload_format: Option<u8>,
    /// Message Expiry Interval as given by the publisher, in seconds.
    pub message_expiry_secs: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Vec<u8>>,
    pub user_properties: Vec<(String, String)>,
}

impl MessageProps {
    pub fn is_empty(&self) -> bool {
        *self == MessageProps::default()
    }
}

/// A message as stored once in the commitlog and read back by every consumer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Full MQTT topic name, e.g. `home/room1/temp`.
    pub topic: String,
    pub payload: Bytes,
    /// QoS the publisher used (0, 1, 2); delivery uses min(this, subscription QoS).
    pub qos: u8,
    pub retain: bool,
    /// Client id of the MQTT publisher, or the service name of a producer.
    pub publisher: String,
    /// Wall-clock store time, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    pub props: MessageProps,
}

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error, Clone)]
pub enum StorageError {
    #[error("i/o error: {0}")]
    Io(String),
    #[error("corrupt record at position {position} in {file}: {reason}")]
    Corrupt {
        file: String,
        position: Position,
        reason: String,
    },
    #[error("storage is shutting down")]
    Closed,
    #[error("storage is overloaded")]
    Busy,
    #[error("message too large: {0} bytes")]
    TooLarge(usize),
    /// The disk (or a quota, or a file size limit) is full: this append was not stored,
    /// but the log is intact and later appends are tried again.
    #[error("no space left to store the message: {0}")]
    NoSpace(String),
}

impl StorageError {
    /// A write error: `NoSpace` for a full disk, quota or file size limit (nothing of
    /// the write is kept, so the log can go on once there is room), `Io` otherwise.
    pub fn from_write(e: std::io::Error) -> StorageError {
        match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => {
                StorageError::NoSpace(e.to_string())
            }
            _ => StorageError::Io(e.to_string()),
        }
    }
}

impl From<std::io::Error> for StorageError {
    fn from(e: std::io::Error) -> Self {
        StorageError::Io(e.to_string())
    }
}

/// Sent to the `CommitLog`: store `message` once and index it in each of `queues`.
/// Answers after the configured durability is reached (see invariant 2).
#[derive(Message, Debug)]
#[rtype(result = "Result<Position, StorageError>")]
pub struct Append {
    pub message: Message,
    pub queues: Vec<QueueName>,
}

/// Sent to the `CommitLog`: several appends in one message, stored in this order and
/// answered together (one result per item, in order) once the last is durable. Cheaper
/// than as many `Append`s, and keeps a publisher's messages in the order it sent them.
#[derive(Message, Debug)]
#[rtype(result = "Vec<Result<Position, StorageError>>")]
pub struct AppendBatch {
    pub items: Vec<Append>,
}

/// Sent to the `QueueIndex` shard that owns `queue`: read up to `max` messages
/// (and at most about `max_bytes` of payload, but always at least one if available)
/// starting at offset `from`. A `from` below the queue's `min_offset` starts at `min_offset`.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<Pulled, StorageError>")]
pub struct Pull {
    pub queue: QueueName,
    pub from: Offset,
    pub max: usize,
    pub max_bytes: usize,
}

/// One pulled message with its place in the queue and the log.
#[derive(Debug, Clone)]
pub struct PulledMessage {
    pub offset: Offset,
    pub position: Position,
    pub message: Arc<Message>,
}

/// The answer to [`Pull`].
#[derive(Debug, Clone, Default)]
pub struct Pulled {
    pub messages: Vec<PulledMessage>,
    /// The offset to pull from next.
    pub next: Offset,
    /// The lowest offset still readable (moves forward with retention).
    pub min_offset: Offset,
    /// One past the last entry: the offset the next dispatched message will get.
    pub max_offset: Offset,
}

/// Sent to the `QueueIndex` shard that owns `queue`: its current bounds.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<QueueBounds, StorageError>")]
pub struct Bounds {
    pub queue: QueueName,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueBounds {
    pub min_offset: Offset,
    pub max_offset: Offset,
}

/// Sent to the `Notifier` shard of `queue`: tell `watcher` about arrivals on `queue`.
/// `id` identifies the watcher for [`Unwatch`]; a watcher may watch many queues.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Watch {
    pub queue: QueueName,
    pub id: u64,
    pub watcher: Recipient<Arrived>,
}

/// Sent to the `Notifier` shard of `queue`: stop telling watcher `id`.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Unwatch {
    pub queue: QueueName,
    pub id: u64,
}

/// The hint a watcher gets: `queue` now has entries up to (not including) `max_offset`.
/// Carries no payload; the watcher pulls. Delivered with `try_send`, so it may be dropped.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Arrived {
    pub queue: QueueName,
    pub max_offset: Offset,
}

/// Sent to the `OffsetStore`: remember that `owner` has consumed `queue` up to `offset`
/// (the next offset to read). Durable per the flush mode before it answers.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<(), StorageError>")]
pub struct CommitOffset {
    pub owner: String,
    pub queue: QueueName,
    pub offset: Offset,
}

/// Sent to the `OffsetStore`: the committed offset of (`owner`, `queue`), if any.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<Option<Offset>, StorageError>")]
pub struct LoadOffset {
    pub owner: String,
    pub queue: QueueName,
}

/// Sent to the `OffsetStore`: forget every offset of `owner` (e.g. a session expired).
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<(), StorageError>")]
pub struct DropOwner {
    pub owner: String,
}

// ---------------------------------------------------------------------------------------
// The handle (added by the storage engine; everything above is the original contract).
// ---------------------------------------------------------------------------------------

/// When an `Append` (and a `KvPut`, `CommitOffset`) is answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlushMode {
    /// After fsync (many appends share one fsync: group commit).
    Sync,
    /// After write(2); fsync every `flush_interval_ms`. A power loss (not a process
    /// crash) can lose up to that much acknowledged data.
    Async,
}

#[derive(Clone, Debug)]
pub struct StorageConfig {
    /// Root directory: `log/`, `index/`, `kv/`, `offsets/`, `checkpoint`.
    pub dir: PathBuf,
    /// A segment is rolled when the next record would take it past this size.
    pub segment_bytes: u64,
    pub flush: FlushMode,
    pub flush_interval_ms: u64,
    /// Delete sealed segments older than this (by the time they were sealed).
    pub retention_secs: Option<u64>,
    /// Delete the oldest sealed segments while the log is larger than this.
    pub retention_bytes: Option<u64>,
    pub index_shards: usize,
    pub notifier_shards: usize,
    /// Queues untouched this long drop their in-memory state (reloaded on demand).
    pub queue_idle_secs: u64,
    /// Open index files across all shards (segment and kv files are not counted: there
    /// are few of them).
    pub max_open_files: usize,
    /// Largest record body; larger appends fail with `TooLarge`, larger records on disk are
    /// treated as corrupt. Clamped to `record::HARD_MAX_RECORD_BYTES` (64 MiB).
    pub max_record_bytes: usize,
    /// Decoded messages kept in memory (in all, split across the index shards) so that
    /// fan-out to many queues and readers close to the head do not decode a record many
    /// times. The largest fixed share of the node's memory.
    pub cache_bytes: usize,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            dir: PathBuf::from("data"),
            segment_bytes: 128 << 20,
            flush: FlushMode::Async,
            flush_interval_ms: 100,
            retention_secs: None,
            retention_bytes: None,
            index_shards: 4,
            notifier_shards: 4,
            queue_idle_secs: 60,
            max_open_files: 256,
            max_record_bytes: 16 << 20,
            cache_bytes: 32 << 20,
        }
    }
}

/// A snapshot of the storage's state (for tests, metrics and the benchmark).
#[derive(Debug, Clone, Copy, Default)]
pub struct StorageStats {
    pub segments: usize,
    pub log_start: Position,
    pub log_end: Position,
    pub log_bytes: u64,
    pub checkpoint: Position,
    /// Records appended (answered) since open.
    pub appends: u64,
    /// fsyncs (and syncfs) issued for the log and checkpoints since open.
    pub fsyncs: u64,
    /// fsyncs issued by the kv stores since open.
    pub kv_fsyncs: u64,
    pub queues_loaded: usize,
    pub open_index_files: usize,
    pub cached_messages: usize,
    pub cache_hits: u64,
    pub cache_misses: u64,
}

struct Inner {
    arbiters: Mutex<Vec<ArbiterHandle>>,
    closed: AtomicBool,
    log_counters: Arc<commitlog::LogCounters>,
    kv_fsyncs: Arc<AtomicU64>,
    log: slog::Logger,
}

/// The storage node: addresses of its actors. Cheap to clone.
#[derive(Clone)]
pub struct Storage {
    pub commitlog: Addr<CommitLog>,
    pub offsets: Addr<OffsetStore>,
    /// General-purpose durable kv (retained messages under `retain/`, sessions under
    /// `session/`); independent of log retention.
    pub kv: Addr<KvStore>,
    indexes: Arc<[Addr<QueueIndex>]>,
    notifiers: Arc<[Addr<Notifier>]>,
    inner: Arc<Inner>,
}

/// Runs `f` on `arbiter` and starts the actor it builds there.
async fn start_on<A, F>(arbiter: &ArbiterHandle, f: F) -> Result<Addr<A>, StorageError>
where
    A: Actor<Context = Context<A>>,
    F: FnOnce() -> Result<A, StorageError> + Send + 'static,
{
    let (tx, rx) = futures::channel::oneshot::channel();
    let sent = arbiter.spawn_fn(move || {
        let _ = tx.send(f().map(|a| a.start()));
    });
    if !sent {
        return Err(StorageError::Closed);
    }
    rx.await.map_err(|_| StorageError::Closed)?
}

impl Storage {
    /// Opens (creating or recovering) the storage in `cfg.dir`. Starts the storage arbiters
    /// (log, segments, flushers, index shards, notifiers, kv); must be called from inside a
    /// running actix `System`.
    pub async fn open(mut cfg: StorageConfig, log: slog::Logger) -> Result<Storage, StorageError> {
        cfg.index_shards = cfg.index_shards.max(1);
        cfg.notifier_shards = cfg.notifier_shards.max(1);
        cfg.max_open_files = cfg.max_open_files.max(cfg.index_shards);
        cfg.max_record_bytes = cfg
            .max_record_bytes
            .clamp(1024, record::HARD_MAX_RECORD_BYTES);
        cfg.segment_bytes = cfg.segment_bytes.max(4096);
        let log = log.new(slog::o!("component" => "storage"));
        let mut arbiters = Vec::new();
        let mut arbiter = || {
            let a = Arbiter::new().handle();
            arbiters.push(a.clone());
            a
        };
        let log_arb = arbiter();
        let seg_arb = arbiter();
        let flush_arb = arbiter();
        let kv_arb = arbiter();
        let kv_flush_arb = arbiter();
        let notify_arb = arbiter();
        let n_index_arbs = cfg
            .index_shards
            .min(
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2),
            )
            .max(1);
        let index_arbs: Vec<ArbiterHandle> = (0..n_index_arbs).map(|_| arbiter()).collect();
        let inner = Arc::new(Inner {
            arbiters: Mutex::new(arbiters),
            closed: AtomicBool::new(false),
            log_counters: Arc::new(commitlog::LogCounters::default()),
            kv_fsyncs: Arc::new(AtomicU64::new(0)),
            log: log.clone(),
        });
        let stop_all = |inner: &Inner| {
            if let Ok(a) = inner.arbiters.lock() {
                for h in a.iter() {
                    h.stop();
                }
            }
        };

        let notifiers: Arc<[Addr<Notifier>]> = (0..cfg.notifier_shards)
            .map(|i| {
                let l = log.clone();
                Notifier::start_in_arbiter(&notify_arb, move |_| Notifier::new(i, &l))
            })
            .collect::<Vec<_>>()
            .into();
        let fsyncs = inner.log_counters.fsyncs.clone();
        let flusher = Flusher::start_in_arbiter(&flush_arb, move |_| flusher::Flusher::new(fsyncs));
        let kvf = inner.kv_fsyncs.clone();
        let kv_flusher =
            Flusher::start_in_arbiter(&kv_flush_arb, move |_| flusher::Flusher::new(kvf));

        let open_kv = |sub: &'static str| {
            let (dir, l, f, mode, every) = (
                cfg.dir.join(sub),
                log.clone(),
                kv_flusher.clone(),
                cfg.flush.clone(),
                Duration::from_millis(cfg.flush_interval_ms),
            );
            start_on(&kv_arb, move || {
                let j = kv::KvJournal::open(&dir, &l.new(slog::o!("store" => sub)))?;
                Ok(KvStore::new(j, f, mode, every, sub, &l))
            })
        };
        let kv = match open_kv("kv").await {
            Ok(a) => a,
            Err(e) => {
                stop_all(&inner);
                return Err(e);
            }
        };
        let offsets_kv = match open_kv("offsets").await {
            Ok(a) => a,
            Err(e) => {
                stop_all(&inner);
                return Err(e);
            }
        };
        let offsets = OffsetStore::start_in_arbiter(&kv_arb, move |_| OffsetStore::new(offsets_kv));

        let params = commitlog::RecoverParams {
            cfg: cfg.clone(),
            log: log.clone(),
            seg_arbiter: seg_arb,
            index_arbiters: index_arbs,
            notifiers: notifiers.clone(),
            flusher,
            counters: inner.log_counters.clone(),
        };
        let (tx, rx) = futures::channel::oneshot::channel();
        log_arb.spawn_fn(move || {
            actix_rt::spawn(async move {
                let _ = tx.send(commitlog::recover(params).await);
            });
        });
        let recovered = match rx.await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                slog::error!(log, "storage recovery failed"; "error" => %e);
                stop_all(&inner);
                return Err(e);
            }
            Err(_) => {
                stop_all(&inner);
                return Err(StorageError::Closed);
            }
        };
        Ok(Storage {
            commitlog: recovered.commitlog,
            offsets,
            kv,
            indexes: recovered.shards,
            notifiers,
            inner,
        })
    }

    /// The `QueueIndex` shard that owns `q`.
    pub fn index_for(&self, q: &QueueName) -> &Addr<QueueIndex> {
        &self.indexes[(q.hash64() % self.indexes.len() as u64) as usize]
    }

    /// The `Notifier` shard that owns `q`.
    pub fn notifier_for(&self, q: &QueueName) -> &Addr<Notifier> {
        &self.notifiers[(q.hash64() % self.notifiers.len() as u64) as usize]
    }

    pub fn index_shards(&self) -> &[Addr<QueueIndex>] {
        &self.indexes
    }

    /// Appends `message` for `queues`; answers its position once durable and indexed.
    pub async fn append(
        &self,
        message: Message,
        queues: Vec<QueueName>,
    ) -> Result<Position, StorageError> {
        self.commitlog
            .send(Append { message, queues })
            .await
            .map_err(|_| StorageError::Closed)?
    }

    /// Appends several messages in order with one message to the commitlog; one result
    /// per item, in order.
    pub async fn append_batch(&self, items: Vec<Append>) -> Vec<Result<Position, StorageError>> {
        let n = items.len();
        match self.commitlog.send(AppendBatch { items }).await {
            Ok(r) => r,
            Err(_) => (0..n).map(|_| Err(StorageError::Closed)).collect(),
        }
    }

    pub async fn pull(&self, p: Pull) -> Result<Pulled, StorageError> {
        self.index_for(&p.queue)
            .send(p)
            .await
            .map_err(|_| StorageError::Closed)?
    }

    pub async fn bounds(&self, queue: QueueName) -> Result<QueueBounds, StorageError> {
        self.index_for(&queue)
            .send(Bounds { queue })
            .await
            .map_err(|_| StorageError::Closed)?
    }

    /// Register a watcher (a rare control message: `do_send`).
    pub fn watch(&self, w: Watch) {
        self.notifier_for(&w.queue).do_send(w);
    }

    pub fn unwatch(&self, u: Unwatch) {
        self.notifier_for(&u.queue).do_send(u);
    }

    pub async fn commit_offset(
        &self,
        owner: String,
        queue: QueueName,
        offset: Offset,
    ) -> Result<(), StorageError> {
        self.offsets
            .send(CommitOffset {
                owner,
                queue,
                offset,
            })
            .await
            .map_err(|_| StorageError::Closed)?
    }

    pub async fn load_offset(
        &self,
        owner: String,
        queue: QueueName,
    ) -> Result<Option<Offset>, StorageError> {
        self.offsets
            .send(LoadOffset { owner, queue })
            .await
            .map_err(|_| StorageError::Closed)?
    }

    /// fsyncs issued for the log so far (group commit makes this far lower than appends).
    pub fn log_fsyncs(&self) -> u64 {
        self.inner.log_counters.fsyncs.load(Ordering::Relaxed)
    }

    /// A snapshot of the storage's state.
    pub async fn stats(&self) -> Result<StorageStats, StorageError> {
        let l = self
            .commitlog
            .send(commitlog::LogStatsQuery)
            .await
            .map_err(|_| StorageError::Closed)?;
        let mut s = StorageStats {
            segments: l.segments,
            log_start: l.log_start,
            log_end: l.log_end,
            log_bytes: l.bytes,
            checkpoint: l.checkpoint,
            appends: l.appends,
            fsyncs: l.fsyncs,
            kv_fsyncs: self.inner.kv_fsyncs.load(Ordering::Relaxed),
            ..Default::default()
        };
        for ix in self.indexes.iter() {
            let st = ix
                .send(queue_index::ShardStatsQuery)
                .await
                .map_err(|_| StorageError::Closed)?;
            s.queues_loaded += st.queues_loaded;
            s.open_index_files += st.open_files;
            s.cached_messages += st.cached_messages;
            s.cache_hits += st.cache_hits;
            s.cache_misses += st.cache_misses;
        }
        Ok(s)
    }

    /// Open index files (bounded by `max_open_files`).
    pub async fn open_files(&self) -> Result<usize, StorageError> {
        Ok(self.stats().await?.open_index_files)
    }

    /// Apply retention now. Answers the new log start.
    pub async fn run_retention(&self) -> Result<Position, StorageError> {
        self.commitlog
            .send(commitlog::RunRetention)
            .await
            .map_err(|_| StorageError::Closed)
    }

    /// Drop idle queues from memory now (`idle: None`: the configured idle time).
    pub async fn evict_idle(&self, idle: Option<Duration>) -> Result<usize, StorageError> {
        let mut n = 0;
        for ix in self.indexes.iter() {
            n += ix
                .send(queue_index::EvictIdle { idle })
                .await
                .map_err(|_| StorageError::Closed)?;
        }
        Ok(n)
    }

    /// Finish pending appends, fsync, checkpoint, flush every index and kv store, close all
    /// files and stop the storage arbiters. Idempotent.
    pub async fn shutdown(&self) {
        if self.inner.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        let synced = self.commitlog.send(commitlog::Shutdown).await.unwrap_or(0);
        for ix in self.indexes.iter() {
            if let Ok(Err(e)) = ix
                .send(queue_index::ShardShutdown {
                    synced_upto: synced,
                })
                .await
            {
                slog::error!(self.inner.log, "index shard shutdown failed"; "error" => %e);
            }
        }
        if let Ok(Err(e)) = self.kv.send(kv::KvShutdown).await {
            slog::error!(self.inner.log, "kv shutdown failed"; "error" => %e);
        }
        if let Ok(Err(e)) = self.offsets.send(offset_store::OffsetShutdown).await {
            slog::error!(self.inner.log, "offset store shutdown failed"; "error" => %e);
        }
        let arbiters = match self.inner.arbiters.lock() {
            Ok(mut a) => std::mem::take(&mut *a),
            Err(_) => Vec::new(),
        };
        for a in arbiters {
            a.stop();
        }
        slog::info!(self.inner.log, "storage closed");
    }
}

#[cfg(test)]
mod tests {
    use super::StorageError;

    #[test]
    fn a_full_disk_quota_or_size_limit_is_no_space_and_other_errors_are_io() {
        for errno in [libc::ENOSPC, libc::EDQUOT, libc::EFBIG] {
            let e = StorageError::from_write(std::io::Error::from_raw_os_error(errno));
            assert!(matches!(e, StorageError::NoSpace(_)), "{errno}: {e:?}");
        }
        for errno in [libc::EIO, libc::EBADF, libc::EROFS] {
            let e = StorageError::from_write(std::io::Error::from_raw_os_error(errno));
            assert!(matches!(e, StorageError::Io(_)), "{errno}: {e:?}");
        }
    }
}
