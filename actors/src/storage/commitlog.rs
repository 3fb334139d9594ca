//! `CommitLog`: the single writer of the log. Owns the segment set (`{dir}/log/`),
//! position assignment, group write, group commit, dispatch to the queue indexes,
//! checkpoints and retention.
//!
//! Messages handled: [`Append`] (from sessions, producers, `Storage::append`, with `send`),
//! [`LogStatsQuery`], [`RunRetention`], [`Checkpoint`] and [`Shutdown`] (from `Storage`).
//!
//! ## The append pipeline (one stage of each kind in flight, each merging what queued)
//! 1. **encode**: `Append` encodes the record straight into the pending buffer (no
//!    per-record allocation besides the `Arc<Message>`), and the reply channel is parked
//!    (see [`AppendReply`]: no task or extra channel per append).
//! 2. **write**: once the mailbox is drained (a zero-delay future spawned into the context
//!    runs after the mailbox poll), or when 1 MiB is pending, one `SegAppend` with every
//!    pending record goes to the active `Segment` (group write). Positions are assigned
//!    here, so a roll never leaves a gap.
//! 3. **sync** (`sync` mode): one `Fsync` of every file written since the last one goes to
//!    the `Flusher` (its own thread, so `Segment` reads never wait for an fsync). Appends
//!    written while it runs wait for the next one: that is group commit.
//!    `async` mode skips this stage and fsyncs every `flush_interval_ms`.
//! 4. **dispatch**: durable records become `IndexAppend`s, one per shard, all sent at once;
//!    when every shard has applied them the appends are answered. So a caller that gets
//!    its position back can pull its message at once (read-your-writes).
//!
//! ## Back-pressure
//! The mailbox is bounded ([`COMMITLOG_MAILBOX`]) and callers use `send`, so they park when
//! it is full. Records inside the pipeline are capped ([`MAX_INFLIGHT_RECORDS`],
//! [`MAX_PENDING_BYTES`]); beyond that `Append` answers `StorageError::Busy` at once instead
//! of buffering without bound. Index shards are sent one `IndexAppend` at a time each, so
//! a slow shard slows the answers (and hence the callers), it never grows a queue.
//!
//! ## Failure
//! A failed write or fsync answers the affected appends with an error and puts the log in a
//! failed state (every later append fails) until restart: after a failed fsync the page
//! cache may no longer match the disk, and recovery is the only sound way back. The one
//! exception is a lack of space (`ENOSPC`, `EDQUOT`, `EFBIG`) on a write or a roll: the
//! segment drops the partial write, the batch is refused with [`StorageError::NoSpace`],
//! and later appends are tried again, so the node resumes by itself once there is room.
//!
//! ## Recovery ([`recover`])
//! * The checkpoint file holds a position below which every index file entry has been
//!   written and `syncfs`ed. Records from there to the end are replayed into the shards
//!   (which skip entries they already have, so replaying twice is harmless).
//! * The last segment is scanned first: a torn or garbage tail is truncated (warning).
//! * A corrupt record inside the log (crc mismatch, bad header) is *skipped*: the scanner
//!   looks for the next offset that holds a valid record and goes on from there, logging an
//!   error with the file, the position and the number of bytes skipped. We chose skipping
//!   over stopping because stopping would make every later record (possibly gigabytes of
//!   acknowledged data) unreachable because of one bad sector, and over refusing to start
//!   because a broker that is down loses more than one that lost a record. Pulls that hit
//!   such a record also skip it with an error log, so consumers are never stuck.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use actix::dev::{MessageResponse, OneshotSender};
use actix::prelude::*;
use slog::{o, Logger};

use super::flusher::{Flusher, Fsync, SyncFs, WriteFileAtomic};
use super::queue_index::{DispatchEntry, FlushIndex, IndexAppend, LogBounds, QueueIndex};
use super::record;
use super::segment::{
    open_segment_file, parse_segment_name, segment_path, ScanItem, SegAppend, SegSeal, SegStop,
    Segment, SegmentScanner,
};
use super::{
    Append, AppendBatch, FlushMode, Message, Position, QueueName, StorageConfig, StorageError,
};

/// Base position -> segment actor; shared (read-mostly) with the index shards for reads.
pub type SegmentTable = Arc<RwLock<BTreeMap<Position, Addr<Segment>>>>;

pub const COMMITLOG_MAILBOX: usize = 4096;
/// Records accepted but not yet answered, beyond which `Append` answers `Busy`.
pub const MAX_INFLIGHT_RECORDS: usize = 256 * 1024;
/// Encoded bytes waiting for the write stage, beyond which `Append` answers `Busy`.
pub const MAX_PENDING_BYTES: usize = 128 << 20;
/// Pending bytes that trigger a write without waiting for the mailbox to drain.
const WRITE_BATCH_BYTES: usize = 1 << 20;
/// Records per `IndexAppend` during the recovery replay.
const REPLAY_BATCH: usize = 4096;
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
const RETENTION_INTERVAL: Duration = Duration::from_secs(5);
const CHECKPOINT_FILE: &str = "checkpoint";
const CHECKPOINT_MAGIC: &[u8; 8] = b"AMQCKPT1";

type Reply = Result<Position, StorageError>;
type Inbox = Rc<RefCell<VecDeque<Option<OneshotSender<Reply>>>>>;

/// Who gets a record's answer: the caller of one `Append`, or one slot of an
/// `AppendBatch` (answered as a whole when its last record is).
enum Responder {
    One(OneshotSender<Reply>),
    Batch(Rc<BatchReply>, usize),
}

struct BatchReply {
    results: RefCell<Vec<Option<Reply>>>,
    left: std::cell::Cell<usize>,
    tx: RefCell<Option<futures::channel::oneshot::Sender<Vec<Reply>>>>,
}

impl BatchReply {
    fn set(&self, i: usize, r: Reply) {
        let mut results = self.results.borrow_mut();
        if let Some(slot) = results.get_mut(i) {
            if slot.is_none() {
                *slot = Some(r);
                self.left.set(self.left.get().saturating_sub(1));
            }
        }
        if self.left.get() == 0 {
            if let Some(tx) = self.tx.borrow_mut().take() {
                let all = results
                    .drain(..)
                    .map(|r| r.unwrap_or(Err(StorageError::Closed)))
                    .collect();
                let _ = tx.send(all);
            }
        }
    }
}

impl Responder {
    fn send(self, r: Reply) {
        match self {
            Responder::One(tx) => {
                let _ = tx.send(r);
            }
            Responder::Batch(b, i) => b.set(i, r),
        }
    }
}

/// The answer of the `Append` handler. `Later` parks actix's own reply channel in the
/// commitlog's inbox (the response is handled right after the handler returns, so the
/// n-th parked channel belongs to the n-th pending record); the pipeline answers through
/// it. This avoids a spawned task and a second channel per append.
pub enum AppendReply {
    Now(Reply),
    Later(Inbox),
}

impl MessageResponse<CommitLog, Append> for AppendReply {
    fn handle(self, _: &mut Context<CommitLog>, tx: Option<OneshotSender<Reply>>) {
        match self {
            AppendReply::Now(r) => {
                if let Some(tx) = tx {
                    let _ = tx.send(r);
                }
            }
            AppendReply::Later(inbox) => inbox.borrow_mut().push_back(tx),
        }
    }
}

struct SegMeta {
    addr: Addr<Segment>,
    file: Arc<File>,
    path: PathBuf,
    size: u64,
    modified: SystemTime,
}

struct Pending {
    off: usize,
    size: u32,
    msg: Arc<Message>,
    queues: Vec<QueueName>,
    tag: u64,
    tx: Option<Responder>,
}

struct Done {
    position: Position,
    size: u32,
    msg: Arc<Message>,
    queues: Vec<QueueName>,
    tag: u64,
    tx: Option<Responder>,
}

/// Counters shared with `Storage` (readable without a message).
#[derive(Debug, Default)]
pub struct LogCounters {
    pub fsyncs: Arc<AtomicU64>,
    pub appends: AtomicU64,
}

pub struct CommitLog {
    cfg: StorageConfig,
    log: Logger,
    log_dir: PathBuf,
    dir_file: Arc<File>,
    checkpoint_path: PathBuf,
    table: SegmentTable,
    segments: BTreeMap<Position, SegMeta>,
    active: Position,
    seg_arbiter: ArbiterHandle,
    flusher: Addr<Flusher>,
    shards: Arc<[Addr<QueueIndex>]>,
    counters: Arc<LogCounters>,

    inbox: Inbox,
    tx_attached: usize,
    pending_buf: Vec<u8>,
    pending: Vec<Pending>,
    write_scheduled: bool,
    writing: bool,
    written: VecDeque<Done>,
    written_end: Position,
    end: Position,
    syncing: bool,
    unsynced: Vec<Arc<File>>,
    synced_upto: Position,
    durable: Vec<Done>,
    dispatching: bool,
    dispatched_upto: Position,
    inflight: usize,

    log_start: Position,
    checkpoint: Position,
    checkpointing: bool,
    failed: Option<String>,
    /// Appends refused for lack of space since the last successful write (logged at the
    /// first one and when space is back, not once each).
    no_space: u64,
    closing: bool,
    final_checkpoint_done: bool,
    shutdown_waiters: Vec<futures::channel::oneshot::Sender<Position>>,
    closed: bool,
}

impl Actor for CommitLog {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(COMMITLOG_MAILBOX);
        if self.cfg.flush == FlushMode::Async {
            let every = Duration::from_millis(self.cfg.flush_interval_ms.max(1));
            ctx.run_interval(every, |act, ctx| act.start_sync(ctx));
        }
        ctx.run_interval(CHECKPOINT_INTERVAL, |act, ctx| act.start_checkpoint(ctx));
        if self.cfg.retention_bytes.is_some() || self.cfg.retention_secs.is_some() {
            ctx.run_interval(RETENTION_INTERVAL, |act, _| act.run_retention());
        }
        slog::info!(self.log, "commitlog open";
            "start" => self.log_start, "end" => self.end, "segments" => self.segments.len(),
            "checkpoint" => self.checkpoint, "flush" => ?self.cfg.flush);
    }
}

impl CommitLog {
    fn active_meta(&self) -> Option<&SegMeta> {
        self.segments.get(&self.active)
    }

    /// Pairs the parked reply channels with the pending records, in order.
    fn attach_txs(&mut self) {
        let mut inbox = self.inbox.borrow_mut();
        while let Some(tx) = inbox.pop_front() {
            match self.pending.get_mut(self.tx_attached) {
                Some(p) => p.tx = tx.map(Responder::One),
                None => {
                    if let Some(tx) = tx {
                        let _ = tx.send(Err(StorageError::Io("append lost its record".into())));
                    }
                }
            }
            self.tx_attached += 1;
        }
    }

    fn schedule_write(&mut self, ctx: &mut Context<Self>) {
        if self.write_scheduled {
            return;
        }
        self.write_scheduled = true;
        // Runs after the mailbox has been drained: everything queued joins this write.
        ctx.spawn(fut::ready(()).map(|_, act: &mut Self, ctx| {
            act.write_scheduled = false;
            act.start_write(ctx);
        }));
    }

    fn start_write(&mut self, ctx: &mut Context<Self>) {
        if self.writing || self.pending.is_empty() {
            return;
        }
        self.attach_txs();
        if let Some(reason) = self.failed.clone() {
            self.fail_pending(&StorageError::Io(reason));
            return;
        }
        let seg_bytes = self.cfg.segment_bytes;
        let active_size = self.active_meta().map(|m| m.size).unwrap_or(0);
        if active_size > 0 && active_size + self.pending[0].size as u64 > seg_bytes {
            if let Err(e) = self.roll(ctx) {
                if let Some(e) = Self::no_space(&e) {
                    // No room for a new segment: refuse what waits, keep the log usable.
                    self.note_no_space(e);
                    let e = StorageError::NoSpace(e.to_string());
                    self.fail_pending(&e);
                    return;
                }
                slog::error!(self.log, "segment roll failed"; "error" => %e);
                self.fail(e, Vec::new());
                return;
            }
        }
        let active_size = self.active_meta().map(|m| m.size).unwrap_or(0);
        let mut n = 0;
        let mut bytes = 0u64;
        for r in &self.pending {
            if n > 0 && active_size + bytes + r.size as u64 > seg_bytes {
                break;
            }
            bytes += r.size as u64;
            n += 1;
        }
        let (recs, buf) = if n == self.pending.len() {
            (
                std::mem::take(&mut self.pending),
                std::mem::take(&mut self.pending_buf),
            )
        } else {
            let mut rest = self.pending.split_off(n);
            let rest_buf = self.pending_buf.split_off(bytes as usize);
            for r in rest.iter_mut() {
                r.off -= bytes as usize;
            }
            (
                std::mem::replace(&mut self.pending, rest),
                std::mem::replace(&mut self.pending_buf, rest_buf),
            )
        };
        self.tx_attached = self.pending.len();
        let base = self.end;
        self.end += bytes;
        self.inflight += recs.len();
        let done: Vec<Done> = recs
            .into_iter()
            .map(|r| Done {
                position: base + r.off as u64,
                size: r.size,
                msg: r.msg,
                queues: r.queues,
                tag: r.tag,
                tx: r.tx,
            })
            .collect();
        let Some(meta) = self.active_meta() else {
            self.fail(StorageError::Io("no active segment".into()), done);
            return;
        };
        let (addr, file) = (meta.addr.clone(), meta.file.clone());
        let end = self.end;
        self.writing = true;
        ctx.spawn(
            addr.send(SegAppend { buf })
                .into_actor(self)
                .map(move |res, act, ctx| {
                    act.writing = false;
                    match res {
                        Ok(Ok(new_size)) => act.on_written(done, file, new_size, end, ctx),
                        Ok(Err(StorageError::NoSpace(e))) => act.refuse_no_space(e, done, base),
                        Ok(Err(e)) => act.fail(e, done),
                        Err(_) => act.fail(StorageError::Closed, done),
                    }
                    act.start_write(ctx);
                    act.check_shutdown(ctx);
                }),
        );
    }

    /// The segment refused a write for lack of space and kept nothing of it: give the
    /// batch's positions back and answer its appends with the error. The log is not put
    /// in the failed state (nothing on disk is in doubt): later appends are tried again,
    /// and succeed once there is room.
    fn refuse_no_space(&mut self, e: String, batch: Vec<Done>, base: Position) {
        self.end = base;
        self.inflight = self.inflight.saturating_sub(batch.len());
        self.note_no_space(&e);
        let err = StorageError::NoSpace(e);
        for d in batch {
            if let Some(tx) = d.tx {
                tx.send(Err(err.clone()));
            }
        }
    }

    /// `Some(reason)` if `e` is a lack of space.
    fn no_space(e: &StorageError) -> Option<&str> {
        match e {
            StorageError::NoSpace(reason) => Some(reason),
            _ => None,
        }
    }

    fn note_no_space(&mut self, reason: &str) {
        if self.no_space == 0 {
            slog::error!(self.log, "no space for the log: appends are refused until there is";
                "error" => reason);
        }
        self.no_space += 1;
    }

    fn on_written(
        &mut self,
        done: Vec<Done>,
        file: Arc<File>,
        new_size: u64,
        end: Position,
        ctx: &mut Context<Self>,
    ) {
        if let Some(m) = self.segments.get_mut(&self.active) {
            m.size = new_size;
        }
        if self.no_space > 0 {
            slog::info!(self.log, "space for the log again"; "appends_refused" => self.no_space);
            self.no_space = 0;
        }
        self.written_end = end;
        if !self.unsynced.iter().any(|f| Arc::ptr_eq(f, &file)) {
            self.unsynced.push(file);
        }
        match self.cfg.flush {
            FlushMode::Sync => {
                self.written.extend(done);
                self.start_sync(ctx);
            }
            FlushMode::Async => {
                self.durable.extend(done);
                self.start_dispatch(ctx);
            }
        }
    }

    fn start_sync(&mut self, ctx: &mut Context<Self>) {
        if self.syncing || self.unsynced.is_empty() || self.failed.is_some() {
            return;
        }
        let files = std::mem::take(&mut self.unsynced);
        let target = self.written_end;
        self.syncing = true;
        ctx.spawn(
            self.flusher
                .send(Fsync {
                    files,
                    data_only: true,
                })
                .into_actor(self)
                .map(move |res, act, ctx| {
                    act.syncing = false;
                    let res = match res {
                        Ok(r) => r,
                        Err(_) => Err(StorageError::Closed),
                    };
                    match res {
                        Ok(()) => {
                            act.synced_upto = act.synced_upto.max(target);
                            while act.written.front().is_some_and(|d| d.position < target) {
                                if let Some(d) = act.written.pop_front() {
                                    act.durable.push(d);
                                }
                            }
                            act.start_dispatch(ctx);
                            if act.cfg.flush == FlushMode::Sync {
                                act.start_sync(ctx);
                            }
                        }
                        Err(e) => {
                            slog::error!(act.log, "fsync failed, the log is now read-only"; "error" => %e);
                            let written: Vec<Done> = act.written.drain(..).collect();
                            act.fail(e, written);
                        }
                    }
                    act.check_shutdown(ctx);
                }),
        );
    }

    fn start_dispatch(&mut self, ctx: &mut Context<Self>) {
        if self.dispatching || self.durable.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.durable);
        let upto = batch
            .last()
            .map(|d| d.position + d.size as u64)
            .unwrap_or(self.dispatched_upto);
        let n = self.shards.len().max(1);
        let mut per: Vec<Vec<DispatchEntry>> = (0..n).map(|_| Vec::new()).collect();
        for d in &batch {
            for q in &d.queues {
                per[(q.hash64() % n as u64) as usize].push(DispatchEntry {
                    queue: q.clone(),
                    position: d.position,
                    size: d.size,
                    tag: d.tag,
                    message: Some(d.msg.clone()),
                });
            }
        }
        let synced = self.synced_upto;
        let mut sends = Vec::new();
        for (i, entries) in per.into_iter().enumerate() {
            if entries.is_empty() {
                continue;
            }
            if let Some(shard) = self.shards.get(i) {
                sends.push(shard.send(IndexAppend {
                    entries,
                    synced_upto: synced,
                    notify: true,
                }));
            }
        }
        self.dispatching = true;
        ctx.spawn(futures::future::join_all(sends).into_actor(self).map(
            move |results, act, ctx| {
                act.dispatching = false;
                let ok = results.iter().all(|r| r.is_ok());
                if ok {
                    act.dispatched_upto = act.dispatched_upto.max(upto);
                }
                act.inflight = act.inflight.saturating_sub(batch.len());
                act.counters
                    .appends
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                for d in batch {
                    if let Some(tx) = d.tx {
                        tx.send(if ok {
                            Ok(d.position)
                        } else {
                            Err(StorageError::Closed)
                        });
                    }
                }
                act.start_dispatch(ctx);
                act.check_shutdown(ctx);
            },
        ));
    }

    fn fail_pending(&mut self, e: &StorageError) {
        self.attach_txs();
        for p in self.pending.drain(..) {
            if let Some(tx) = p.tx {
                tx.send(Err(e.clone()));
            }
        }
        self.pending_buf.clear();
        self.tx_attached = 0;
    }

    fn fail(&mut self, e: StorageError, batch: Vec<Done>) {
        if self.failed.is_none() {
            slog::error!(self.log, "commitlog failed"; "error" => %e);
            self.failed = Some(e.to_string());
        }
        self.inflight = self.inflight.saturating_sub(batch.len());
        for d in batch {
            if let Some(tx) = d.tx {
                tx.send(Err(e.clone()));
            }
        }
        self.fail_pending(&e);
    }

    /// Seals the active segment and starts a new one at the current end.
    fn roll(&mut self, ctx: &mut Context<Self>) -> Result<(), StorageError> {
        let base = self.end;
        let path = segment_path(&self.log_dir, base);
        let file = Arc::new(open_segment_file(&path, true).map_err(StorageError::from_write)?);
        if let Some(old) = self.segments.get_mut(&self.active) {
            // Rare control message; the old segment gets no more appends.
            old.addr.do_send(SegSeal);
            old.modified = SystemTime::now();
        }
        let addr = {
            let (f, p, l) = (file.clone(), path.clone(), self.log.clone());
            Segment::start_in_arbiter(&self.seg_arbiter, move |_| {
                Segment::new(base, p, f, 0, false, &l)
            })
        };
        if let Ok(mut t) = self.table.write() {
            t.insert(base, addr.clone());
        }
        self.segments.insert(
            base,
            SegMeta {
                addr,
                file,
                path,
                size: 0,
                modified: SystemTime::now(),
            },
        );
        self.active = base;
        slog::info!(self.log, "rolled to a new segment"; "base" => base);
        // The new directory entry must be durable before records in the new file are
        // acknowledged; the flusher runs this before the next data fsync (FIFO).
        ctx.spawn(
            self.flusher
                .send(Fsync {
                    files: vec![self.dir_file.clone()],
                    data_only: false,
                })
                .into_actor(self)
                .map(|res, act, _| {
                    if !matches!(res, Ok(Ok(()))) {
                        act.fail(
                            StorageError::Io("fsync of the log directory failed".into()),
                            Vec::new(),
                        );
                    }
                }),
        );
        self.run_retention();
        Ok(())
    }

    /// Deletes whole sealed segments beyond the retention limits (oldest first).
    fn run_retention(&mut self) {
        if self.cfg.retention_bytes.is_none() && self.cfg.retention_secs.is_none() {
            return;
        }
        let before = self.log_start;
        while let Some((&oldest, meta)) = self.segments.iter().next() {
            if oldest == self.active {
                break;
            }
            let Some(seg_end) = self.segments.range(oldest + 1..).next().map(|(b, _)| *b) else {
                break;
            };
            if seg_end > self.dispatched_upto {
                break; // not fully indexed yet
            }
            let total: u64 = self.segments.values().map(|m| m.size).sum();
            let by_bytes = self.cfg.retention_bytes.is_some_and(|max| total > max);
            let by_age = self.cfg.retention_secs.is_some_and(|secs| {
                meta.modified
                    .elapsed()
                    .map(|age| age > Duration::from_secs(secs))
                    .unwrap_or(false)
            });
            if !(by_bytes || by_age) {
                break;
            }
            let Some(meta) = self.segments.remove(&oldest) else {
                break;
            };
            if let Ok(mut t) = self.table.write() {
                t.remove(&oldest);
            }
            meta.addr.do_send(SegStop);
            if let Err(e) = std::fs::remove_file(&meta.path) {
                slog::error!(self.log, "cannot delete segment"; "file" => %meta.path.display(), "error" => %e);
            }
            self.log_start = seg_end;
            slog::info!(self.log, "retention deleted a segment";
                "file" => %meta.path.display(), "bytes" => meta.size,
                "by_bytes" => by_bytes, "by_age" => by_age, "log_start" => seg_end);
        }
        if self.log_start != before {
            for s in self.shards.iter() {
                // Rare control message (once per deleted segment batch).
                s.do_send(LogBounds {
                    start: self.log_start,
                    end: self.end,
                });
            }
        }
    }

    fn start_checkpoint(&mut self, ctx: &mut Context<Self>) {
        if self.checkpointing {
            return;
        }
        let upto = self.dispatched_upto.min(self.synced_upto);
        if upto <= self.checkpoint {
            return;
        }
        self.checkpointing = true;
        let shards = self.shards.clone();
        let flusher = self.flusher.clone();
        let dir = self.dir_file.clone();
        let path = self.checkpoint_path.clone();
        let work = async move {
            let flushes = shards.iter().map(|s| s.send(FlushIndex { upto }));
            for r in futures::future::join_all(flushes).await {
                r.map_err(|_| StorageError::Closed)??;
            }
            // One syncfs makes every index file written above durable.
            flusher
                .send(SyncFs { file: dir })
                .await
                .map_err(|_| StorageError::Closed)??;
            flusher
                .send(WriteFileAtomic {
                    path,
                    data: encode_checkpoint(upto),
                })
                .await
                .map_err(|_| StorageError::Closed)??;
            Ok::<(), StorageError>(())
        };
        ctx.spawn(work.into_actor(self).map(move |res, act, ctx| {
            act.checkpointing = false;
            match res {
                Ok(()) => act.checkpoint = upto,
                Err(e) => slog::warn!(act.log, "checkpoint failed"; "upto" => upto, "error" => %e),
            }
            act.check_shutdown(ctx);
        }));
    }

    fn pipeline_idle(&self) -> bool {
        self.pending.is_empty()
            && !self.writing
            && !self.syncing
            && self.written.is_empty()
            && self.durable.is_empty()
            && !self.dispatching
            && !self.checkpointing
    }

    fn check_shutdown(&mut self, ctx: &mut Context<Self>) {
        if !self.closing || self.closed || !self.pipeline_idle() {
            return;
        }
        if !self.unsynced.is_empty() && self.failed.is_none() {
            self.start_sync(ctx);
            return;
        }
        if !self.final_checkpoint_done {
            self.final_checkpoint_done = true;
            self.start_checkpoint(ctx);
            if self.checkpointing {
                return;
            }
        }
        self.closed = true;
        for m in self.segments.values() {
            m.addr.do_send(SegStop);
        }
        slog::info!(self.log, "commitlog closed"; "end" => self.end, "checkpoint" => self.checkpoint);
        for w in self.shutdown_waiters.drain(..) {
            let _ = w.send(self.synced_upto);
        }
        ctx.stop();
    }
}

impl CommitLog {
    /// Encode one record into the pending buffer. `tx` is `None` for a plain `Append`
    /// (its reply channel is attached later from the inbox) and the batch slot otherwise.
    fn enqueue(
        &mut self,
        msg: Append,
        tx: Option<Responder>,
        ctx: &mut Context<Self>,
    ) -> Result<(), StorageError> {
        if self.closing {
            return Err(StorageError::Closed);
        }
        if let Some(reason) = &self.failed {
            return Err(StorageError::Io(reason.clone()));
        }
        if self.pending.len() + self.inflight >= MAX_INFLIGHT_RECORDS
            || self.pending_buf.len() >= MAX_PENDING_BYTES
        {
            return Err(StorageError::Busy);
        }
        // The previous record's reply channel is in the inbox now; writing here (before
        // this record is pending) keeps channels and records aligned.
        self.attach_txs();
        if self.pending_buf.len() >= WRITE_BATCH_BYTES {
            self.start_write(ctx);
        }
        let mut queues = msg.queues;
        if queues.len() > 1 {
            if queues.len() <= 16 {
                let mut i = 1;
                while i < queues.len() {
                    if queues[..i].contains(&queues[i]) {
                        queues.remove(i);
                    } else {
                        i += 1;
                    }
                }
            } else {
                queues.sort_unstable();
                queues.dedup();
            }
        }
        let off = self.pending_buf.len();
        let size = match record::encode_into(
            &mut self.pending_buf,
            &msg.message,
            &queues,
            self.cfg.max_record_bytes,
        ) {
            Ok(n) => n as u32,
            Err(record::RecordError::TooLarge { len, .. }) => {
                return Err(StorageError::TooLarge(len))
            }
            Err(e) => return Err(StorageError::Io(e.to_string())),
        };
        let tag = record::topic_tag(&msg.message.topic);
        let attached = tx.is_some();
        self.pending.push(Pending {
            off,
            size,
            msg: Arc::new(msg.message),
            queues,
            tag,
            tx,
        });
        if attached {
            self.tx_attached += 1;
        }
        if !self.writing {
            self.schedule_write(ctx);
        }
        Ok(())
    }
}

impl Handler<Append> for CommitLog {
    type Result = AppendReply;
    fn handle(&mut self, msg: Append, ctx: &mut Self::Context) -> AppendReply {
        match self.enqueue(msg, None, ctx) {
            Ok(()) => AppendReply::Later(self.inbox.clone()),
            Err(e) => AppendReply::Now(Err(e)),
        }
    }
}

impl Handler<AppendBatch> for CommitLog {
    type Result = ResponseFuture<Vec<Reply>>;
    fn handle(&mut self, msg: AppendBatch, ctx: &mut Self::Context) -> Self::Result {
        let n = msg.items.len();
        if n == 0 {
            return Box::pin(async { Vec::new() });
        }
        let (tx, rx) = futures::channel::oneshot::channel();
        let batch = Rc::new(BatchReply {
            results: RefCell::new((0..n).map(|_| None).collect()),
            left: std::cell::Cell::new(n),
            tx: RefCell::new(Some(tx)),
        });
        // Channels of earlier plain appends belong to earlier records.
        self.attach_txs();
        for (i, item) in msg.items.into_iter().enumerate() {
            if let Err(e) = self.enqueue(item, Some(Responder::Batch(batch.clone(), i)), ctx) {
                batch.set(i, Err(e));
            }
        }
        Box::pin(async move { rx.await.unwrap_or_default() })
    }
}

/// The log's state, for tests and monitoring.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "LogStats")]
pub struct LogStatsQuery;

#[derive(Debug, Clone, Copy, Default)]
pub struct LogStats {
    pub segments: usize,
    pub log_start: Position,
    pub log_end: Position,
    pub synced_upto: Position,
    pub checkpoint: Position,
    pub bytes: u64,
    pub appends: u64,
    pub fsyncs: u64,
}

impl Handler<LogStatsQuery> for CommitLog {
    type Result = MessageResult<LogStatsQuery>;
    fn handle(&mut self, _: LogStatsQuery, _: &mut Self::Context) -> Self::Result {
        MessageResult(LogStats {
            segments: self.segments.len(),
            log_start: self.log_start,
            log_end: self.end,
            synced_upto: self.synced_upto,
            checkpoint: self.checkpoint,
            bytes: self.segments.values().map(|m| m.size).sum(),
            appends: self.counters.appends.load(Ordering::Relaxed),
            fsyncs: self.counters.fsyncs.load(Ordering::Relaxed),
        })
    }
}

/// Apply retention now (it also runs on a timer and after each roll). Answers the log start.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "Position")]
pub struct RunRetention;

impl Handler<RunRetention> for CommitLog {
    type Result = Position;
    fn handle(&mut self, _: RunRetention, _: &mut Self::Context) -> Position {
        self.run_retention();
        self.log_start
    }
}

/// Start a checkpoint now (it also runs every second).
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Checkpoint;

impl Handler<Checkpoint> for CommitLog {
    type Result = ();
    fn handle(&mut self, _: Checkpoint, ctx: &mut Self::Context) {
        self.start_checkpoint(ctx);
    }
}

/// Stop accepting appends, finish the pipeline, fsync, checkpoint, stop the segments and
/// stop. Answers the position up to which the log is fsynced.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "Position")]
pub struct Shutdown;

impl Handler<Shutdown> for CommitLog {
    type Result = ResponseFuture<Position>;
    fn handle(&mut self, _: Shutdown, ctx: &mut Self::Context) -> Self::Result {
        self.closing = true;
        let (tx, rx) = futures::channel::oneshot::channel();
        self.shutdown_waiters.push(tx);
        self.check_shutdown(ctx);
        Box::pin(async move { rx.await.unwrap_or(0) })
    }
}

fn encode_checkpoint(pos: Position) -> Vec<u8> {
    let mut v = Vec::with_capacity(20);
    v.extend_from_slice(CHECKPOINT_MAGIC);
    v.extend_from_slice(&pos.to_le_bytes());
    v.extend_from_slice(&crc32fast::hash(&pos.to_le_bytes()).to_le_bytes());
    v
}

fn decode_checkpoint(b: &[u8]) -> Option<Position> {
    if b.len() != 20 || &b[0..8] != CHECKPOINT_MAGIC {
        return None;
    }
    let mut p = [0u8; 8];
    p.copy_from_slice(&b[8..16]);
    let crc = u32::from_le_bytes([b[16], b[17], b[18], b[19]]);
    (crc32fast::hash(&p) == crc).then(|| u64::from_le_bytes(p))
}

/// What `recover` needs.
pub struct RecoverParams {
    pub cfg: StorageConfig,
    pub log: Logger,
    pub seg_arbiter: ArbiterHandle,
    pub index_arbiters: Vec<ArbiterHandle>,
    pub notifiers: Arc<[Addr<super::notifier::Notifier>]>,
    pub flusher: Addr<Flusher>,
    pub counters: Arc<LogCounters>,
}

/// The result of `recover`.
pub struct Recovered {
    pub commitlog: Addr<CommitLog>,
    pub shards: Arc<[Addr<QueueIndex>]>,
}

fn list_segments(log_dir: &Path, log: &Logger) -> std::io::Result<Vec<(Position, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(log_dir)? {
        let e = e?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        match parse_segment_name(name) {
            Some(base) => out.push((base, e.path())),
            None if name.ends_with(".log") => {
                slog::warn!(log, "ignoring a file with a bad segment name"; "file" => name)
            }
            None => {}
        }
    }
    out.sort();
    Ok(out)
}

/// Opens the log under `cfg.dir`: scans segments, truncates a torn tail, starts the segment
/// actors and the index shards, replays the log from the checkpoint into the shards and
/// starts the `CommitLog`. Must run on the log arbiter (blocking IO).
pub async fn recover(p: RecoverParams) -> Result<Recovered, StorageError> {
    let cfg = p.cfg;
    let log = p.log.new(o!("actor" => "commitlog"));
    let log_dir = cfg.dir.join("log");
    let index_dir = cfg.dir.join("index");
    std::fs::create_dir_all(&log_dir)?;
    std::fs::create_dir_all(&index_dir)?;
    let dir_file = Arc::new(File::open(&log_dir)?);
    let checkpoint_path = cfg.dir.join(CHECKPOINT_FILE);
    let checkpoint = match std::fs::read(&checkpoint_path) {
        Ok(b) => match decode_checkpoint(&b) {
            Some(p) => Some(p),
            None => {
                slog::warn!(log, "unreadable checkpoint, replaying the whole log");
                None
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e.into()),
    };
    let max_record = cfg.max_record_bytes;
    let mut segs = list_segments(&log_dir, &log)?;
    if segs.is_empty() {
        let base = checkpoint.unwrap_or(0);
        let path = segment_path(&log_dir, base);
        open_segment_file(&path, true)?;
        dir_file.sync_all()?;
        segs.push((base, path));
    }

    // 1. The last segment: find the end of its valid records, truncate a torn tail.
    let (last_base, last_path) = segs[segs.len() - 1].clone();
    let scan_from = match checkpoint {
        Some(c) if c >= last_base => c - last_base,
        _ => 0,
    };
    let mut scanner = SegmentScanner::new(&last_path, last_base, scan_from, max_record)?;
    let mut last_valid_end = last_base + scan_from.min(scanner.file_len());
    let mut corrupt_records = 0u64;
    while let Some(item) = scanner.next_item()? {
        match item {
            ScanItem::Record { position, bytes } => last_valid_end = position + bytes.len() as u64,
            ScanItem::Corrupt {
                position,
                len,
                reason,
            } => {
                corrupt_records += 1;
                slog::error!(log, "corrupt record in the last segment, skipped";
                    "file" => %last_path.display(), "position" => position, "bytes_skipped" => len,
                    "reason" => reason);
                last_valid_end = position + len;
            }
            ScanItem::TornTail {
                position,
                len,
                reason,
            } => {
                slog::warn!(log, "truncating torn tail of the last segment";
                    "file" => %last_path.display(), "position" => position, "bytes" => len,
                    "reason" => reason);
                let f = open_segment_file(&last_path, false)?;
                f.set_len(position - last_base)?;
                f.sync_all()?;
                last_valid_end = position;
            }
        }
    }
    let log_end = last_valid_end;
    let log_start = segs[0].0;

    // 2. Segment actors and the shared table.
    let table: SegmentTable = Arc::new(RwLock::new(BTreeMap::new()));
    let mut segments = BTreeMap::new();
    for (i, (base, path)) in segs.iter().enumerate() {
        let last = i + 1 == segs.len();
        let file = Arc::new(open_segment_file(path, false)?);
        let md = file.metadata()?;
        let size = md.len();
        if let Some((next, _)) = segs.get(i + 1) {
            if base + size != *next {
                slog::error!(log, "sealed segment does not end where the next one starts";
                    "file" => %path.display(), "end" => base + size, "next_base" => next);
            }
        }
        let (b, pth, f, l) = (*base, path.clone(), file.clone(), log.clone());
        let addr = Segment::start_in_arbiter(&p.seg_arbiter, move |_| {
            Segment::new(b, pth, f, size, !last, &l)
        });
        if let Ok(mut t) = table.write() {
            t.insert(*base, addr.clone());
        }
        segments.insert(
            *base,
            SegMeta {
                addr,
                file,
                path: path.clone(),
                size,
                modified: md.modified().unwrap_or_else(|_| SystemTime::now()),
            },
        );
    }

    // 3. Index shards.
    let per_shard_files = (cfg.max_open_files / cfg.index_shards.max(1)).max(1);
    let bounds = LogBounds {
        start: log_start,
        end: log_end,
    };
    let mut shards = Vec::with_capacity(cfg.index_shards);
    for i in 0..cfg.index_shards.max(1) {
        let arb = &p.index_arbiters[i % p.index_arbiters.len().max(1)];
        let (dir, tbl, nts, l) = (
            index_dir.clone(),
            table.clone(),
            p.notifiers.clone(),
            log.clone(),
        );
        let idle = Duration::from_secs(cfg.queue_idle_secs);
        let cache = cfg.cache_bytes / cfg.index_shards.max(1);
        shards.push(QueueIndex::start_in_arbiter(arb, move |_| {
            QueueIndex::new(
                i,
                dir,
                max_record,
                idle,
                per_shard_files,
                cache,
                tbl,
                nts,
                bounds,
                &l,
            )
        }));
    }
    let shards: Arc<[Addr<QueueIndex>]> = shards.into();

    // 4. Replay from the checkpoint into the shards.
    let replay_from = match checkpoint {
        Some(c) if c > log_end => {
            slog::warn!(log, "checkpoint is past the end of the log"; "checkpoint" => c, "end" => log_end);
            log_start
        }
        Some(c) => c.max(log_start),
        None => log_start,
    };
    let mut replayed = 0u64;
    let mut batch: Vec<Vec<DispatchEntry>> = (0..shards.len()).map(|_| Vec::new()).collect();
    let mut in_batch = 0usize;
    for (i, (base, path)) in segs.iter().enumerate() {
        let size = segments.get(base).map(|m| m.size).unwrap_or(0);
        if base + size <= replay_from {
            continue;
        }
        let last = i + 1 == segs.len();
        let from = replay_from.saturating_sub(*base);
        let mut scanner = SegmentScanner::new(path, *base, from, max_record)?;
        while let Some(item) = scanner.next_item()? {
            match item {
                ScanItem::Record { position, bytes } => {
                    if position >= log_end && last {
                        break;
                    }
                    match record::decode(&bytes, max_record) {
                        Ok((rec, size)) => {
                            let tag = record::topic_tag(&rec.message.topic);
                            for q in rec.queues {
                                let s = (q.hash64() % shards.len() as u64) as usize;
                                batch[s].push(DispatchEntry {
                                    queue: q,
                                    position,
                                    size: size as u32,
                                    tag,
                                    message: None,
                                });
                            }
                            replayed += 1;
                            in_batch += 1;
                        }
                        Err(e) => {
                            corrupt_records += 1;
                            slog::error!(log, "undecodable record skipped";
                                "file" => %path.display(), "position" => position, "error" => %e);
                        }
                    }
                    if in_batch >= REPLAY_BATCH {
                        send_replay(&shards, &mut batch, log_end).await?;
                        in_batch = 0;
                    }
                }
                ScanItem::Corrupt {
                    position,
                    len,
                    reason,
                } => {
                    if !last {
                        corrupt_records += 1;
                        slog::error!(log, "corrupt record in a sealed segment, skipped to the next valid record";
                            "file" => %path.display(), "position" => position, "bytes_skipped" => len,
                            "reason" => reason);
                    }
                }
                ScanItem::TornTail {
                    position,
                    len,
                    reason,
                } => {
                    if !last {
                        corrupt_records += 1;
                        slog::error!(log, "sealed segment ends with bytes that are not records";
                            "file" => %path.display(), "position" => position, "bytes" => len,
                            "reason" => reason);
                    }
                }
            }
        }
    }
    send_replay(&shards, &mut batch, log_end).await?;
    if corrupt_records > 0 {
        slog::error!(log, "recovery found corrupt data"; "corrupt_regions" => corrupt_records);
    }
    slog::info!(log, "recovery replayed the log";
        "from" => replay_from, "to" => log_end, "records" => replayed);

    let active = last_base;
    if let Some(m) = segments.get_mut(&active) {
        m.size = log_end - last_base;
    }
    let cl = CommitLog {
        cfg,
        log,
        log_dir,
        dir_file,
        checkpoint_path,
        table,
        segments,
        active,
        seg_arbiter: p.seg_arbiter,
        flusher: p.flusher,
        shards: shards.clone(),
        counters: p.counters,
        inbox: Rc::new(RefCell::new(VecDeque::new())),
        tx_attached: 0,
        pending_buf: Vec::new(),
        pending: Vec::new(),
        write_scheduled: false,
        writing: false,
        written: VecDeque::new(),
        written_end: log_end,
        end: log_end,
        syncing: false,
        unsynced: Vec::new(),
        synced_upto: log_end,
        durable: Vec::new(),
        dispatching: false,
        dispatched_upto: log_end,
        inflight: 0,
        log_start,
        checkpoint: checkpoint.unwrap_or(0).min(replay_from),
        checkpointing: false,
        failed: None,
        no_space: 0,
        closing: false,
        final_checkpoint_done: false,
        shutdown_waiters: Vec::new(),
        closed: false,
    };
    let commitlog = cl.start();
    Ok(Recovered { commitlog, shards })
}

async fn send_replay(
    shards: &[Addr<QueueIndex>],
    batch: &mut [Vec<DispatchEntry>],
    log_end: Position,
) -> Result<(), StorageError> {
    let mut sends = Vec::new();
    for (i, entries) in batch.iter_mut().enumerate() {
        if entries.is_empty() {
            continue;
        }
        sends.push(shards[i].send(IndexAppend {
            entries: std::mem::take(entries),
            synced_upto: log_end,
            notify: false,
        }));
    }
    for r in futures::future::join_all(sends).await {
        r.map_err(|_| StorageError::Closed)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_roundtrip() {
        let b = encode_checkpoint(123_456);
        assert_eq!(decode_checkpoint(&b), Some(123_456));
        let mut bad = b.clone();
        bad[10] ^= 1;
        assert_eq!(decode_checkpoint(&bad), None);
        assert_eq!(decode_checkpoint(&b[..19]), None);
    }
}
