//! `QueueIndex`: one shard of the queue indexes. A queue belongs to shard
//! `queue.hash64() % index_shards`; a shard holds any number of queues.
//!
//! * Owns, per queue: the index file `{dir}/index/{hash:016x}.idx` (see `index_file`),
//!   the in-memory tail of entries not yet written to it, and the queue's bounds. Also a
//!   bounded LRU of open index files (`max_open_files / index_shards`) and a byte-bounded
//!   cache of recently appended or read messages (`Arc<Message>` by position), so that a
//!   message fanned out to many queues is decoded at most once per shard (and never when
//!   it is pulled while still in the cache: the commitlog hands over the `Arc<Message>`
//!   it was appended with).
//! * Handles [`IndexAppend`] (from the `CommitLog`, one in flight per shard, after the
//!   records are durable; also the recovery replay), [`Pull`] and [`Bounds`] (from
//!   sessions and consumers), [`FlushIndex`] (from the `CommitLog` at each checkpoint:
//!   write the buffered entries, whose log records are fsynced, to the index files; the
//!   `CommitLog` then makes them durable with one `syncfs`), [`LogBounds`] (retention moved
//!   the log start), [`EvictIdle`], [`ShardStatsQuery`].
//! * Sends `SegRead` to `Segment` actors (with `send`, awaited inside the pull's future,
//!   so the shard keeps serving while a read is in flight) and [`QueueArrived`] to the
//!   queue's `Notifier` shard with `try_send` (dropped when full, never blocks).
//! * Scale: queues idle for `queue_idle_secs` whose entries are all in their file are
//!   dropped from memory and reloaded on demand (header + file length + last entry), and
//!   files are opened through the LRU, so 100k queues cost neither 100k fds nor unbounded
//!   memory.
//! * Back-pressure: the mailbox is bounded ([`INDEX_MAILBOX`]); the `CommitLog` keeps one
//!   `IndexAppend` in flight per shard and merges what arrives meanwhile, so a slow shard
//!   slows the commitlog's answers rather than growing a queue.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::Bytes;
use slog::{o, Logger};

use super::commitlog::SegmentTable;
use super::index_file::{self, IndexEntry, ENTRY_LEN};
use super::notifier::{Notifier, QueueArrived};
use super::record;
use super::segment::SegRead;
use super::{
    Bounds, Message, Offset, Position, Pull, Pulled, PulledMessage, QueueBounds, QueueName,
    StorageError,
};

pub const INDEX_MAILBOX: usize = 1024;
/// A pull never returns more than this many messages, whatever `max` says.
pub const MAX_PULL: usize = 8192;
/// A queue with more unwritten entries than this is written out early (if durable).
const MEM_FLUSH_ENTRIES: usize = 16 * 1024;
/// Dead index entries (below the log start) freed at a time: 64 KiB of a file.
const PUNCH_MIN_ENTRIES: u64 = 64 * 1024 / ENTRY_LEN as u64;
/// How many `{hash}-{n}.idx` names are tried for hash collisions.
const MAX_CANDIDATES: u32 = 64;

/// One entry to index, from the `CommitLog`.
#[derive(Debug, Clone)]
pub struct DispatchEntry {
    pub queue: QueueName,
    pub position: Position,
    pub size: u32,
    pub tag: u64,
    /// The appended message (for the cache); `None` during recovery.
    pub message: Option<Arc<Message>>,
}

/// Append entries (in log order). Entries at or below a queue's last indexed position
/// are skipped, which makes the recovery replay idempotent.
#[derive(Message)]
#[rtype(result = "()")]
pub struct IndexAppend {
    pub entries: Vec<DispatchEntry>,
    /// Every record below this position is fsynced (index entries pointing below it may
    /// be written to index files).
    pub synced_upto: Position,
    /// Send `QueueArrived` hints (false during recovery).
    pub notify: bool,
}

/// Write every buffered entry whose record is below `upto` to its index file (no fsync:
/// the caller issues one `syncfs` afterwards).
#[derive(Message)]
#[rtype(result = "Result<(), StorageError>")]
pub struct FlushIndex {
    pub upto: Position,
}

/// The log now spans `[start, end)` (retention moved `start`, or recovery set both).
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct LogBounds {
    pub start: Position,
    pub end: Position,
}

/// Drop idle queues now (also runs on a timer). `idle: None` uses the configured time.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "usize")]
pub struct EvictIdle {
    pub idle: Option<Duration>,
}

#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "ShardStats")]
pub struct ShardStatsQuery;

#[derive(Debug, Clone, Copy, Default)]
pub struct ShardStats {
    pub queues_loaded: usize,
    pub open_files: usize,
    pub dirty_queues: usize,
    pub cached_messages: usize,
    pub cached_bytes: usize,
    pub cache_hits: u64,
    pub cache_misses: u64,
}

/// Flush everything that is durable in the log and stop.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "Result<(), StorageError>")]
pub struct ShardShutdown {
    pub synced_upto: Position,
}

type FileKey = (u64, u32);

/// Bounded set of open index files, least recently used closed first.
struct FileLru {
    cap: usize,
    tick: u64,
    map: HashMap<FileKey, (File, u64)>,
}

impl FileLru {
    fn new(cap: usize) -> Self {
        FileLru {
            cap: cap.max(1),
            tick: 0,
            map: HashMap::new(),
        }
    }

    /// The open file of `key`; opens (creating if `create`) it, closing the LRU file if full.
    fn get(&mut self, key: FileKey, path: &Path, create: bool) -> std::io::Result<&File> {
        self.tick += 1;
        let tick = self.tick;
        if !self.map.contains_key(&key) {
            if self.map.len() >= self.cap {
                if let Some(old) = self
                    .map
                    .iter()
                    .min_by_key(|(_, (_, t))| *t)
                    .map(|(k, _)| *k)
                {
                    self.map.remove(&old);
                }
            }
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(create)
                .truncate(false)
                .open(path)?;
            self.map.insert(key, (f, tick));
        }
        match self.map.get_mut(&key) {
            Some((f, t)) => {
                *t = tick;
                Ok(f)
            }
            None => Err(std::io::Error::other("file lru lost an entry")),
        }
    }

    fn remove(&mut self, key: &FileKey) {
        self.map.remove(key);
    }
}

/// Hasher for log positions (unique u64s): one multiply instead of SipHash, which showed
/// up in profiles of the append path.
#[derive(Default, Clone, Copy)]
struct PosHasher(u64);

impl std::hash::Hasher for PosHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ *b as u64).wrapping_mul(0x100000001b3);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (v ^ (v >> 29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type PosMap<V> = HashMap<Position, V, std::hash::BuildHasherDefault<PosHasher>>;

/// FIFO cache of decoded messages by position, bounded by bytes.
struct MsgCache {
    cap: usize,
    bytes: usize,
    map: PosMap<Arc<Message>>,
    fifo: VecDeque<(Position, usize)>,
    hits: u64,
    misses: u64,
}

impl MsgCache {
    fn new(cap: usize) -> Self {
        MsgCache {
            cap,
            bytes: 0,
            map: PosMap::default(),
            fifo: VecDeque::new(),
            hits: 0,
            misses: 0,
        }
    }
    fn weight(m: &Message) -> usize {
        m.payload.len() + m.topic.len() + m.publisher.len() + 128
    }
    fn insert(&mut self, pos: Position, m: Arc<Message>) {
        if self.cap == 0 || self.map.contains_key(&pos) {
            return;
        }
        let w = Self::weight(&m);
        if w > self.cap / 4 {
            return; // one huge message would flush everything else
        }
        while self.bytes + w > self.cap {
            match self.fifo.pop_front() {
                Some((p, pw)) => {
                    self.map.remove(&p);
                    self.bytes -= pw;
                }
                None => break,
            }
        }
        self.map.insert(pos, m);
        self.fifo.push_back((pos, w));
        self.bytes += w;
    }
    fn get(&mut self, pos: Position) -> Option<Arc<Message>> {
        match self.map.get(&pos) {
            Some(m) => {
                self.hits += 1;
                Some(m.clone())
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }
}

/// The in-memory state of one loaded queue.
struct QueueState {
    key: FileKey,
    file_exists: bool,
    header_len: u64,
    /// Offset of the first entry of the file.
    base: Offset,
    /// Entries in the file: offsets `[base, base + file_entries)`.
    file_entries: u64,
    /// Entries `[mem_start, max_offset)`; everything at or beyond `base + file_entries` is here.
    mem: VecDeque<IndexEntry>,
    mem_start: Offset,
    min_offset: Offset,
    /// The log start `min_offset` was computed for.
    min_checked: Position,
    /// The file's entries below this offset have had their disk blocks freed.
    punched: Offset,
    last_position: Option<Position>,
    last_used: Instant,
}

impl QueueState {
    fn max_offset(&self) -> Offset {
        self.mem_start + self.mem.len() as u64
    }
    fn file_end(&self) -> Offset {
        self.base + self.file_entries
    }
}

pub struct QueueIndex {
    shard: usize,
    index_dir: PathBuf,
    max_record: usize,
    idle: Duration,
    segments: SegmentTable,
    notifiers: Arc<[Addr<Notifier>]>,
    queues: HashMap<QueueName, QueueState>,
    reserved: HashSet<FileKey>,
    dirty: HashSet<QueueName>,
    files: FileLru,
    cache: MsgCache,
    log_start: Position,
    log_end: Position,
    synced_upto: Position,
    log: Logger,
}

#[allow(clippy::too_many_arguments)]
impl QueueIndex {
    pub fn new(
        shard: usize,
        index_dir: PathBuf,
        max_record: usize,
        idle: Duration,
        max_open_files: usize,
        cache_bytes: usize,
        segments: SegmentTable,
        notifiers: Arc<[Addr<Notifier>]>,
        bounds: LogBounds,
        log: &Logger,
    ) -> Self {
        QueueIndex {
            shard,
            index_dir,
            max_record,
            idle,
            segments,
            notifiers,
            queues: HashMap::new(),
            reserved: HashSet::new(),
            dirty: HashSet::new(),
            files: FileLru::new(max_open_files),
            cache: MsgCache::new(cache_bytes),
            log_start: bounds.start,
            log_end: bounds.end,
            synced_upto: bounds.end,
            log: log.new(o!("actor" => "queue_index", "shard" => shard)),
        }
    }

    fn path_of(&self, key: FileKey) -> PathBuf {
        index_file::candidate_path(&self.index_dir, key.0, key.1)
    }

    /// Loads `q` (from its file if it has one) unless it is loaded.
    fn ensure_loaded(&mut self, q: &QueueName) -> Result<(), StorageError> {
        if let Some(st) = self.queues.get_mut(q) {
            st.last_used = Instant::now();
            return Ok(());
        }
        let hash = q.hash64();
        let mut chosen = None;
        for n in 0..MAX_CANDIDATES {
            let key = (hash, n);
            if self.reserved.contains(&key) {
                continue; // loaded by a queue with the same hash
            }
            let path = self.path_of(key);
            let file = match self.files.get(key, &path, false) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    chosen = Some((key, None));
                    break;
                }
                Err(e) => return Err(e.into()),
            };
            match index_file::read_header(file) {
                Ok(h) if h.name == q.as_str() => {
                    let len = file.metadata()?.len();
                    chosen = Some((key, Some((h, len))));
                    break;
                }
                Ok(_) => continue, // another queue with the same hash
                Err(e) => {
                    // A file whose header never made it to disk (crash right after
                    // creation) or was damaged: keep it aside for inspection and reuse the
                    // name. The replay from the checkpoint re-adds recent entries.
                    slog::error!(self.log, "unreadable index file, moving it aside";
                        "file" => %path.display(), "error" => %e, "queue" => %q);
                    self.files.remove(&key);
                    let aside = path.with_extension(format!("corrupt-{}", crate::now_ms()));
                    std::fs::rename(&path, &aside)?;
                    chosen = Some((key, None));
                    break;
                }
            }
        }
        let Some((key, found)) = chosen else {
            return Err(StorageError::Io(format!(
                "more than {MAX_CANDIDATES} index files share the hash of {q}"
            )));
        };
        let mut st = QueueState {
            key,
            file_exists: false,
            header_len: 0,
            base: 0,
            file_entries: 0,
            mem: VecDeque::new(),
            mem_start: 0,
            min_offset: 0,
            min_checked: 0,
            punched: 0,
            last_position: None,
            last_used: Instant::now(),
        };
        if let Some((h, len)) = found {
            st.file_exists = true;
            st.header_len = h.len;
            st.base = h.base_offset;
            let mut n = len.saturating_sub(h.len) / ENTRY_LEN as u64;
            // Defensive: drop trailing entries that point past the end of the log (only
            // possible if the disk lost log data that had been fsynced).
            let path = self.path_of(key);
            let file = self.files.get(key, &path, false)?;
            let mut buf = [0u8; ENTRY_LEN];
            let mut last = None;
            while n > 0 {
                file.read_exact_at(&mut buf, h.len + (n - 1) * ENTRY_LEN as u64)?;
                match IndexEntry::decode(&buf) {
                    Some(e) if e.position + e.size as u64 <= self.log_end && e.size > 0 => {
                        last = Some(e.position);
                        break;
                    }
                    _ => n -= 1,
                }
            }
            let whole = h.len + n * ENTRY_LEN as u64;
            if whole != len {
                slog::warn!(self.log, "truncating index file tail";
                    "file" => %path.display(), "from" => len, "to" => whole);
                file.set_len(whole)?;
            }
            st.file_entries = n;
            st.mem_start = st.base + n;
            st.min_offset = st.base;
            st.last_position = last;
        }
        self.reserved.insert(key);
        self.queues.insert(q.clone(), st);
        Ok(())
    }

    /// The entry at offset `o` (which must be in `[base, max_offset)`).
    fn entry_at(
        files: &mut FileLru,
        dir: &Path,
        st: &QueueState,
        o: Offset,
    ) -> Result<IndexEntry, StorageError> {
        if o >= st.mem_start {
            return st
                .mem
                .get((o - st.mem_start) as usize)
                .copied()
                .ok_or_else(|| StorageError::Io(format!("offset {o} beyond the queue")));
        }
        let path = index_file::candidate_path(dir, st.key.0, st.key.1);
        let f = files.get(st.key, &path, false)?;
        let mut buf = [0u8; ENTRY_LEN];
        f.read_exact_at(&mut buf, st.header_len + (o - st.base) * ENTRY_LEN as u64)?;
        IndexEntry::decode(&buf).ok_or_else(|| StorageError::Io("short index entry".into()))
    }

    /// Entries `[from, from + n)`.
    fn entries(
        files: &mut FileLru,
        dir: &Path,
        st: &QueueState,
        from: Offset,
        n: usize,
    ) -> Result<Vec<IndexEntry>, StorageError> {
        let mut out = Vec::with_capacity(n);
        let end = from + n as u64;
        if from < st.mem_start {
            let file_to = end.min(st.mem_start);
            let count = (file_to - from) as usize;
            let path = index_file::candidate_path(dir, st.key.0, st.key.1);
            let f = files.get(st.key, &path, false)?;
            let mut buf = vec![0u8; count * ENTRY_LEN];
            f.read_exact_at(
                &mut buf,
                st.header_len + (from - st.base) * ENTRY_LEN as u64,
            )?;
            for c in buf.chunks_exact(ENTRY_LEN) {
                if let Some(e) = IndexEntry::decode(c) {
                    out.push(e);
                }
            }
        }
        let mem_from = from.max(st.mem_start);
        for o in mem_from..end {
            match st.mem.get((o - st.mem_start) as usize) {
                Some(e) => out.push(*e),
                None => break,
            }
        }
        Ok(out)
    }

    /// Moves `min_offset` past the entries whose records retention deleted.
    fn refresh_min(&mut self, q: &QueueName) -> Result<(), StorageError> {
        let log_start = self.log_start;
        let Some(st) = self.queues.get_mut(q) else {
            return Ok(());
        };
        if st.min_checked >= log_start {
            return Ok(());
        }
        let (mut lo, mut hi) = (st.min_offset.max(st.base), st.max_offset());
        // First offset whose record is at or after log_start (positions increase).
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let e = Self::entry_at(&mut self.files, &self.index_dir, st, mid)?;
            if e.position < log_start {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        st.min_offset = lo;
        st.min_checked = log_start;
        // Index files only grow; give the disk blocks of the dead prefix back (the file
        // keeps its length and offsets, the holes read as zeros: position 0, below any
        // log start, which is what the search above expects of dead entries). The last
        // entry of the file is kept: a reload reads it as the queue's last position.
        let dead_end = lo.min(st.file_end().saturating_sub(1));
        let from = st.punched.max(st.base);
        if st.file_exists && dead_end >= from.saturating_add(PUNCH_MIN_ENTRIES) {
            let path = index_file::candidate_path(&self.index_dir, st.key.0, st.key.1);
            let f = self.files.get(st.key, &path, false)?;
            let start = st.header_len;
            let len = (dead_end - st.base) * ENTRY_LEN as u64;
            match index_file::punch_hole(f, start, len) {
                Ok(()) => st.punched = dead_end,
                Err(e) => {
                    // Not supported by this filesystem: keep the blocks, stop trying.
                    slog::debug!(self.log, "cannot free dead index entries"; "error" => %e);
                    st.punched = u64::MAX;
                }
            }
        }
        Ok(())
    }

    /// Writes the buffered entries of `q` below `upto` to its file.
    fn flush_queue(&mut self, q: &QueueName, upto: Position) -> Result<(), StorageError> {
        let Some(st) = self.queues.get_mut(q) else {
            return Ok(());
        };
        let skip = (st.file_end() - st.mem_start) as usize;
        let mut buf = Vec::new();
        let mut n = 0u64;
        for e in st.mem.iter().skip(skip) {
            if e.position >= upto {
                break;
            }
            e.encode_into(&mut buf);
            n += 1;
        }
        if n == 0 {
            return Ok(());
        }
        let path = index_file::candidate_path(&self.index_dir, st.key.0, st.key.1);
        let f = self.files.get(st.key, &path, true)?;
        if !st.file_exists {
            let header = index_file::encode_header(q, st.base);
            // Header and first entries in one write, at the start of a fresh file.
            let mut all = header.clone();
            all.extend_from_slice(&buf);
            f.set_len(0)?;
            f.write_all_at(&all, 0)?;
            st.header_len = header.len() as u64;
            st.file_exists = true;
        } else {
            f.write_all_at(&buf, st.header_len + st.file_entries * ENTRY_LEN as u64)?;
        }
        st.file_entries += n;
        let file_end = st.file_end();
        while st.mem_start < file_end && st.mem.pop_front().is_some() {
            st.mem_start += 1;
        }
        if st.mem.is_empty() && st.mem.capacity() > 64 {
            st.mem = VecDeque::new();
        }
        Ok(())
    }

    fn flush_all(&mut self, upto: Position) -> Result<(), StorageError> {
        let dirty: Vec<QueueName> = self.dirty.iter().cloned().collect();
        let mut first_err = None;
        let mut failed = 0usize;
        for q in dirty {
            if let Err(e) = self.flush_queue(&q, upto) {
                // One line per flush, not per queue: with a full disk every queue fails.
                if first_err.is_none() {
                    slog::error!(self.log, "index flush failed"; "queue" => %q, "error" => %e);
                }
                failed += 1;
                first_err.get_or_insert(e);
                continue;
            }
            if let Some(st) = self.queues.get(&q) {
                if st.file_end() == st.max_offset() {
                    self.dirty.remove(&q);
                }
            }
        }
        match first_err {
            Some(e) => {
                if failed > 1 {
                    slog::error!(self.log, "index flush failed for more queues"; "queues" => failed);
                }
                Err(e)
            }
            None => Ok(()),
        }
    }

    fn evict_idle(&mut self, idle: Duration) -> usize {
        let now = Instant::now();
        let victims: Vec<QueueName> = self
            .queues
            .iter()
            .filter(|(_, st)| {
                now.duration_since(st.last_used) >= idle && st.file_end() == st.max_offset()
            })
            .map(|(q, _)| q.clone())
            .collect();
        for q in &victims {
            if let Some(st) = self.queues.remove(q) {
                self.reserved.remove(&st.key);
                self.files.remove(&st.key);
                self.dirty.remove(q);
            }
        }
        if self.queues.capacity() > 4 * self.queues.len() + 1024 {
            self.queues.shrink_to_fit();
            self.reserved.shrink_to_fit();
        }
        victims.len()
    }

    fn bounds_of(&mut self, q: &QueueName) -> Result<QueueBounds, StorageError> {
        self.ensure_loaded(q)?;
        self.refresh_min(q)?;
        let st = self
            .queues
            .get(q)
            .ok_or_else(|| StorageError::Io("queue vanished".into()))?;
        Ok(QueueBounds {
            min_offset: st.min_offset,
            max_offset: st.max_offset(),
        })
    }
}

impl Actor for QueueIndex {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(INDEX_MAILBOX);
        let every = (self.idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(15));
        ctx.run_interval(every, |act, _| {
            let n = act.evict_idle(act.idle);
            if n > 0 {
                slog::debug!(act.log, "evicted idle queues"; "count" => n, "loaded" => act.queues.len());
            }
        });
        slog::debug!(self.log, "queue index shard started"; "shard" => self.shard);
    }
}

impl Handler<IndexAppend> for QueueIndex {
    type Result = ();
    fn handle(&mut self, msg: IndexAppend, _: &mut Self::Context) {
        self.synced_upto = self.synced_upto.max(msg.synced_upto);
        let mut touched: HashMap<QueueName, Offset> = HashMap::new();
        let mut big = Vec::new();
        for e in msg.entries {
            if let Some(m) = e.message {
                self.cache.insert(e.position, m);
            }
            // The log reaches at least this far (used to validate index files on load).
            self.log_end = self.log_end.max(e.position + e.size as u64);
            if let Err(err) = self.ensure_loaded(&e.queue) {
                slog::error!(self.log, "cannot load queue, entry not indexed";
                    "queue" => %e.queue, "position" => e.position, "error" => %err);
                continue;
            }
            let Some(st) = self.queues.get_mut(&e.queue) else {
                continue;
            };
            if st.last_position.is_some_and(|l| l >= e.position) {
                continue; // already indexed (replay)
            }
            st.mem.push_back(IndexEntry {
                position: e.position,
                size: e.size,
                tag: e.tag,
            });
            st.last_position = Some(e.position);
            let max = st.max_offset();
            if st.mem.len() > MEM_FLUSH_ENTRIES {
                big.push(e.queue.clone());
            }
            if !self.dirty.contains(&e.queue) {
                self.dirty.insert(e.queue.clone());
            }
            if msg.notify {
                touched.insert(e.queue, max);
            }
        }
        for q in big {
            if let Err(err) = self.flush_queue(&q, self.synced_upto) {
                slog::error!(self.log, "early index flush failed"; "queue" => %q, "error" => %err);
            }
        }
        if !self.notifiers.is_empty() {
            let n = self.notifiers.len() as u64;
            for (queue, max_offset) in touched {
                let addr = &self.notifiers[(queue.hash64() % n) as usize];
                // A hint: dropped when the notifier is full.
                let _ = addr.try_send(QueueArrived { queue, max_offset });
            }
        }
    }
}

/// What a pull needs once the missing records have been read.
struct PullPlan {
    from: Offset,
    min_offset: Offset,
    max_offset: Offset,
    entries: Vec<IndexEntry>,
    msgs: Vec<Option<Arc<Message>>>,
}

/// Misses to read: the indexes into the plan and the segment holding them.
type SegReads = Vec<(Vec<usize>, Option<Addr<super::segment::Segment>>)>;

enum ReadOutcome {
    Read(Vec<usize>, Result<Vec<Bytes>, StorageError>),
}

impl QueueIndex {
    fn plan_pull(&mut self, p: &Pull) -> Result<(PullPlan, SegReads), StorageError> {
        self.ensure_loaded(&p.queue)?;
        self.refresh_min(&p.queue)?;
        let st = self
            .queues
            .get(&p.queue)
            .ok_or_else(|| StorageError::Io("queue vanished".into()))?;
        let (min_offset, max_offset) = (st.min_offset, st.max_offset());
        let from = p.from.max(min_offset);
        let avail = max_offset.saturating_sub(from);
        let n = (p.max.min(MAX_PULL) as u64).min(avail) as usize;
        let mut entries = if n == 0 {
            Vec::new()
        } else {
            Self::entries(&mut self.files, &self.index_dir, st, from, n)?
        };
        // Byte budget (record sizes as the estimate), at least one message.
        let mut bytes = 0usize;
        let mut take = 0;
        for e in &entries {
            if take > 0 && bytes + e.size as usize > p.max_bytes {
                break;
            }
            bytes += e.size as usize;
            take += 1;
        }
        entries.truncate(take);
        let mut msgs = Vec::with_capacity(entries.len());
        let mut groups: Vec<(Position, Vec<usize>)> = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            let m = self.cache.get(e.position);
            if m.is_none() {
                match groups.last_mut() {
                    Some((_, v)) if !v.is_empty() => v.push(i),
                    _ => groups.push((e.position, vec![i])),
                }
            }
            msgs.push(m);
        }
        // Split the misses by segment.
        let mut by_seg: SegReads = Vec::new();
        if !groups.is_empty() {
            let table = self
                .segments
                .read()
                .map_err(|_| StorageError::Io("segment table poisoned".into()))?;
            let mut current: Option<Position> = None;
            for (_, idxs) in groups {
                for i in idxs {
                    let pos = entries[i].position;
                    let seg = table
                        .range(..=pos)
                        .next_back()
                        .map(|(b, a)| (*b, a.clone()));
                    let base = seg.as_ref().map(|(b, _)| *b);
                    if current != base || by_seg.is_empty() {
                        by_seg.push((Vec::new(), seg.map(|(_, a)| a)));
                        current = base;
                    }
                    if let Some(last) = by_seg.last_mut() {
                        last.0.push(i);
                    }
                }
            }
        }
        Ok((
            PullPlan {
                from,
                min_offset,
                max_offset,
                entries,
                msgs,
            },
            by_seg,
        ))
    }

    fn finish_pull(
        &mut self,
        mut plan: PullPlan,
        reads: Vec<ReadOutcome>,
    ) -> Result<Pulled, StorageError> {
        let mut skip = vec![false; plan.entries.len()];
        let mut failed: Vec<Option<StorageError>> = vec![None; plan.entries.len()];
        for ReadOutcome::Read(idxs, res) in reads {
            match res {
                Ok(bufs) => {
                    for (i, b) in idxs.into_iter().zip(bufs) {
                        let pos = plan.entries[i].position;
                        match record::decode_message(&b, self.max_record) {
                            Ok((m, _)) => {
                                let m = Arc::new(m);
                                self.cache.insert(pos, m.clone());
                                plan.msgs[i] = Some(m);
                            }
                            Err(e) => {
                                slog::error!(self.log, "corrupt record skipped by pull";
                                    "position" => pos, "error" => %e);
                                skip[i] = true;
                            }
                        }
                    }
                }
                Err(e) => {
                    for i in idxs {
                        if plan.entries[i].position < self.log_start {
                            skip[i] = true; // deleted by retention meanwhile
                        } else if matches!(e, StorageError::Corrupt { .. }) {
                            slog::error!(self.log, "unreadable record skipped by pull";
                                "position" => plan.entries[i].position, "error" => %e);
                            skip[i] = true;
                        } else {
                            failed[i] = Some(e.clone());
                        }
                    }
                }
            }
        }
        let mut out = Vec::with_capacity(plan.entries.len());
        let mut next = plan.from + plan.entries.len() as u64;
        for (i, e) in plan.entries.iter().enumerate() {
            if let Some(m) = plan.msgs[i].take() {
                out.push(PulledMessage {
                    offset: plan.from + i as u64,
                    position: e.position,
                    message: m,
                });
            } else if skip[i] {
                continue;
            } else {
                let err = failed[i].take().unwrap_or_else(|| {
                    StorageError::Io(format!("record at {} not read", e.position))
                });
                if out.is_empty() {
                    return Err(err);
                }
                next = plan.from + i as u64;
                break;
            }
        }
        Ok(Pulled {
            messages: out,
            next,
            min_offset: plan.min_offset,
            max_offset: plan.max_offset,
        })
    }
}

impl Handler<Pull> for QueueIndex {
    type Result = ResponseActFuture<Self, Result<Pulled, StorageError>>;
    fn handle(&mut self, p: Pull, _: &mut Self::Context) -> Self::Result {
        let (plan, by_seg) = match self.plan_pull(&p) {
            Ok(x) => x,
            Err(e) => return Box::pin(fut::ready(Err(e))),
        };
        if by_seg.is_empty() {
            let r = self.finish_pull(plan, Vec::new());
            return Box::pin(fut::ready(r));
        }
        let mut reads = Vec::with_capacity(by_seg.len());
        for (idxs, addr) in by_seg {
            let ranges: Vec<(Position, u32)> = idxs
                .iter()
                .map(|&i| (plan.entries[i].position, plan.entries[i].size))
                .collect();
            reads.push(async move {
                let res = match addr {
                    Some(a) => match a.send(SegRead { ranges }).await {
                        Ok(r) => r,
                        Err(_) => Err(StorageError::Io("segment closed".into())),
                    },
                    None => Err(StorageError::Io("no segment holds the position".into())),
                };
                ReadOutcome::Read(idxs, res)
            });
        }
        Box::pin(
            futures::future::join_all(reads)
                .into_actor(self)
                .map(move |reads, act, _| act.finish_pull(plan, reads)),
        )
    }
}

impl Handler<Bounds> for QueueIndex {
    type Result = Result<QueueBounds, StorageError>;
    fn handle(&mut self, b: Bounds, _: &mut Self::Context) -> Self::Result {
        self.bounds_of(&b.queue)
    }
}

impl Handler<FlushIndex> for QueueIndex {
    type Result = Result<(), StorageError>;
    fn handle(&mut self, f: FlushIndex, _: &mut Self::Context) -> Self::Result {
        self.synced_upto = self.synced_upto.max(f.upto);
        self.flush_all(f.upto)
    }
}

impl Handler<LogBounds> for QueueIndex {
    type Result = ();
    fn handle(&mut self, b: LogBounds, _: &mut Self::Context) {
        self.log_start = self.log_start.max(b.start);
        self.log_end = self.log_end.max(b.end);
    }
}

impl Handler<EvictIdle> for QueueIndex {
    type Result = usize;
    fn handle(&mut self, e: EvictIdle, _: &mut Self::Context) -> usize {
        self.evict_idle(e.idle.unwrap_or(self.idle))
    }
}

impl Handler<ShardStatsQuery> for QueueIndex {
    type Result = MessageResult<ShardStatsQuery>;
    fn handle(&mut self, _: ShardStatsQuery, _: &mut Self::Context) -> Self::Result {
        MessageResult(ShardStats {
            queues_loaded: self.queues.len(),
            open_files: self.files.map.len(),
            dirty_queues: self.dirty.len(),
            cached_messages: self.cache.map.len(),
            cached_bytes: self.cache.bytes,
            cache_hits: self.cache.hits,
            cache_misses: self.cache.misses,
        })
    }
}

impl Handler<ShardShutdown> for QueueIndex {
    type Result = Result<(), StorageError>;
    fn handle(&mut self, s: ShardShutdown, ctx: &mut Self::Context) -> Self::Result {
        self.synced_upto = self.synced_upto.max(s.synced_upto);
        let r = self.flush_all(self.synced_upto);
        self.files.map.clear();
        ctx.stop();
        r
    }
}
