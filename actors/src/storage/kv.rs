//! A small durable key-value store: [`KvJournal`] (the pure-ish journal + snapshot file
//! logic, unit-tested) and the [`KvStore`] actor around it.
//!
//! Files in the store's directory:
//! * `kv.snap`: a snapshot, the live pairs as put records;
//! * `kv.log`: the journal of changes since the snapshot.
//!
//! Both hold records `[len u32][crc u32][op u8][klen u32][key][value]` (little endian;
//! `len` counts the bytes after the crc, the crc covers them; op 1 = put, 2 = delete).
//! Loading applies the snapshot then the journal; a torn or corrupt journal tail is
//! truncated with a warning (it can only hold changes that were never acknowledged in
//! `sync` mode). When the journal grows past twice the live size (and a floor), it is
//! compacted: the live map is written to `kv.snap.tmp`, fsynced, renamed over `kv.snap`, and
//! the journal is emptied. A crash between the rename and the truncation replays the old
//! journal over the new snapshot, which is harmless: the snapshot is the state *after* those
//! changes, and replaying them in order ends in the same state.
//!
//! ## The `KvStore` actor
//! * Owns one journal. Handles [`KvPut`], [`KvGet`], [`KvScan`], [`KvDeletePrefix`],
//!   [`KvStatsQuery`], [`KvShutdown`]. Senders: the MQTT gateway (retained messages,
//!   sessions), the `OffsetStore`.
//! * Changes apply to the in-memory map at once (a later get sees them), are written to the
//!   journal once the mailbox is drained (group write), and answered after one fsync for
//!   the whole group in `sync` mode (sent to a `Flusher` on its own thread; puts that
//!   arrive meanwhile join the next fsync), or after the write in `async` mode (fsync every
//!   `flush_interval_ms`).
//! * Back-pressure: bounded mailbox ([`KV_MAILBOX`]), callers use `send`.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use slog::{o, Logger};

use super::flusher::{Flusher, Fsync};
use super::{FlushMode, StorageError};

pub const KV_MAILBOX: usize = 4096;
/// Journals smaller than this are never compacted.
const MIN_COMPACT_BYTES: u64 = 1 << 20;
const MAX_KEY: usize = 64 * 1024;
const MAX_VALUE: usize = 64 << 20;
const OP_PUT: u8 = 1;
const OP_DEL: u8 = 2;

/// Encodes one journal record into `out`.
pub fn encode_op(out: &mut Vec<u8>, key: &str, value: Option<&[u8]>) {
    let v = value.unwrap_or(&[]);
    let len = 1 + 4 + key.len() + v.len();
    let start = out.len();
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.push(if value.is_some() { OP_PUT } else { OP_DEL });
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(v);
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// One decoded journal record.
#[derive(Debug, PartialEq, Eq)]
pub struct Op {
    pub key: String,
    pub value: Option<Vec<u8>>,
}

/// Decodes the record at the start of `b`; `Ok(None)` if `b` is empty, `Err` with a reason if
/// it is torn or corrupt. Never panics.
pub fn decode_op(b: &[u8]) -> Result<Option<(Op, usize)>, String> {
    if b.is_empty() {
        return Ok(None);
    }
    if b.len() < 8 {
        return Err("torn header".into());
    }
    let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
    if !(5..=5 + MAX_KEY + MAX_VALUE).contains(&len) {
        return Err(format!("bad length {len}"));
    }
    if b.len() < 8 + len {
        return Err("torn record".into());
    }
    let crc = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let body = &b[8..8 + len];
    if crc32fast::hash(body) != crc {
        return Err("crc mismatch".into());
    }
    let op = body[0];
    let klen = u32::from_le_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if klen > len - 5 {
        return Err("bad key length".into());
    }
    let key = std::str::from_utf8(&body[5..5 + klen])
        .map_err(|_| "key is not utf-8".to_string())?
        .to_owned();
    let value = match op {
        OP_PUT => Some(body[5 + klen..].to_vec()),
        OP_DEL => None,
        _ => return Err(format!("bad op {op}")),
    };
    Ok(Some((Op { key, value }, 8 + len)))
}

/// The journal + snapshot of one store, and its live map.
pub struct KvJournal {
    dir: PathBuf,
    journal: Arc<File>,
    journal_bytes: u64,
    live: BTreeMap<String, Vec<u8>>,
    live_bytes: u64,
    compactions: u64,
    log: Logger,
}

fn entry_bytes(k: &str, v: &[u8]) -> u64 {
    (8 + 5 + k.len() + v.len()) as u64
}

impl KvJournal {
    pub fn open(dir: &Path, log: &Logger) -> std::io::Result<KvJournal> {
        std::fs::create_dir_all(dir)?;
        let mut live = BTreeMap::new();
        let snap = dir.join("kv.snap");
        match std::fs::read(&snap) {
            Ok(b) => {
                let (_, err) = apply_all(&b, &mut live);
                if let Some((at, e)) = err {
                    // The snapshot was fsynced before its rename: damage here is media damage.
                    slog::error!(log, "corrupt kv snapshot, keeping what precedes the damage";
                        "file" => %snap.display(), "offset" => at, "error" => e);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let jpath = dir.join("kv.log");
        let mut f = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&jpath)?;
        let mut b = Vec::new();
        f.read_to_end(&mut b)?;
        let (good, err) = apply_all(&b, &mut live);
        if let Some((at, e)) = err {
            slog::warn!(log, "truncating torn kv journal tail";
                "file" => %jpath.display(), "offset" => at, "bytes" => b.len() - at, "error" => e);
            f.set_len(good as u64)?;
            f.sync_all()?;
        }
        let live_bytes = live.iter().map(|(k, v)| entry_bytes(k, v)).sum();
        Ok(KvJournal {
            dir: dir.to_path_buf(),
            journal: Arc::new(f),
            journal_bytes: good as u64,
            live,
            live_bytes,
            compactions: 0,
            log: log.clone(),
        })
    }

    /// Applies a change in memory and encodes it into `out` (to be written with `write`).
    pub fn apply(&mut self, key: String, value: Option<Vec<u8>>, out: &mut Vec<u8>) {
        encode_op(out, &key, value.as_deref());
        if let Some(old) = self.live.get(&key) {
            self.live_bytes -= entry_bytes(&key, old);
        }
        match value {
            Some(v) => {
                self.live_bytes += entry_bytes(&key, &v);
                self.live.insert(key, v);
            }
            None => {
                self.live.remove(&key);
            }
        }
    }

    /// Appends encoded changes to the journal (no fsync).
    pub fn write(&mut self, buf: &[u8]) -> std::io::Result<()> {
        if let Err(e) = (&*self.journal).write_all(buf) {
            // Drop a partial write, so that the journal ends at its last whole entry and
            // the same bytes can be written again later (the file is in append mode).
            if let Err(t) = self.journal.set_len(self.journal_bytes) {
                return Err(std::io::Error::other(format!("{e}; truncate: {t}")));
            }
            return Err(e);
        }
        self.journal_bytes += buf.len() as u64;
        Ok(())
    }

    pub fn file(&self) -> Arc<File> {
        self.journal.clone()
    }

    pub fn sync(&self) -> std::io::Result<()> {
        self.journal.sync_data()
    }

    pub fn get(&self, key: &str) -> Option<&Vec<u8>> {
        self.live.get(key)
    }

    pub fn scan(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        self.live
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn keys_with_prefix(&self, prefix: &str) -> Vec<String> {
        self.live
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
    pub fn journal_bytes(&self) -> u64 {
        self.journal_bytes
    }
    pub fn live_bytes(&self) -> u64 {
        self.live_bytes
    }
    pub fn compactions(&self) -> u64 {
        self.compactions
    }

    pub fn needs_compaction(&self) -> bool {
        self.journal_bytes > MIN_COMPACT_BYTES && self.journal_bytes > 2 * self.live_bytes
    }

    /// Writes the live map as the new snapshot and empties the journal. Blocking.
    pub fn compact(&mut self) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(self.live_bytes as usize);
        for (k, v) in &self.live {
            encode_op(&mut buf, k, Some(v));
        }
        super::flusher::write_file_atomic(&self.dir.join("kv.snap"), &buf)?;
        self.journal.set_len(0)?;
        self.journal.sync_all()?;
        slog::info!(self.log, "kv compacted";
            "journal_bytes" => self.journal_bytes, "live_bytes" => self.live_bytes, "keys" => self.live.len());
        self.journal_bytes = 0;
        self.compactions += 1;
        Ok(())
    }
}

/// Applies every record of `b`; returns the length of the valid prefix and the first error.
fn apply_all(b: &[u8], live: &mut BTreeMap<String, Vec<u8>>) -> (usize, Option<(usize, String)>) {
    let mut at = 0;
    loop {
        match decode_op(&b[at..]) {
            Ok(None) => return (at, None),
            Ok(Some((op, n))) => {
                match op.value {
                    Some(v) => {
                        live.insert(op.key, v);
                    }
                    None => {
                        live.remove(&op.key);
                    }
                }
                at += n;
            }
            Err(e) => return (at, Some((at, e))),
        }
    }
}

/// Put (`Some`) or delete (`None`) `key`. Answers once durable per the flush mode.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<(), StorageError>")]
pub struct KvPut {
    pub key: String,
    pub value: Option<Vec<u8>>,
}

#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<Option<Vec<u8>>, StorageError>")]
pub struct KvGet {
    pub key: String,
}

/// Every pair whose key starts with `prefix`, in key order.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<Vec<(String, Vec<u8>)>, StorageError>")]
pub struct KvScan {
    pub prefix: String,
}

/// Delete every key that starts with `prefix`; answers how many were deleted, once durable.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<usize, StorageError>")]
pub struct KvDeletePrefix {
    pub prefix: String,
}

#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "KvStats")]
pub struct KvStatsQuery;

#[derive(Debug, Clone, Copy, Default)]
pub struct KvStats {
    pub keys: usize,
    pub live_bytes: u64,
    pub journal_bytes: u64,
    pub compactions: u64,
}

/// Write and fsync everything, then stop.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "Result<(), StorageError>")]
pub struct KvShutdown;

type Waiter = futures::channel::oneshot::Sender<Result<(), StorageError>>;

pub struct KvStore {
    j: KvJournal,
    flusher: Addr<Flusher>,
    mode: FlushMode,
    interval: Duration,
    buf: Vec<u8>,
    buf_waiters: Vec<Waiter>,
    write_scheduled: bool,
    /// Written, waiting for the next fsync.
    written: Vec<Waiter>,
    unsynced: bool,
    syncing: bool,
    failed: Option<String>,
    /// Writes refused for lack of space since the last one that succeeded.
    no_space: u64,
    closed: bool,
    log: Logger,
}

impl KvStore {
    pub fn new(
        j: KvJournal,
        flusher: Addr<Flusher>,
        mode: FlushMode,
        interval: Duration,
        name: &str,
        log: &Logger,
    ) -> Self {
        KvStore {
            j,
            flusher,
            mode,
            interval,
            buf: Vec::new(),
            buf_waiters: Vec::new(),
            write_scheduled: false,
            written: Vec::new(),
            unsynced: false,
            syncing: false,
            failed: None,
            no_space: 0,
            closed: false,
            log: log.new(o!("actor" => "kv", "store" => name.to_owned())),
        }
    }

    fn change(
        &mut self,
        key: String,
        value: Option<Vec<u8>>,
        ctx: &mut Context<Self>,
    ) -> Result<futures::channel::oneshot::Receiver<Result<(), StorageError>>, StorageError> {
        if self.closed {
            return Err(StorageError::Closed);
        }
        if let Some(f) = &self.failed {
            return Err(StorageError::Io(f.clone()));
        }
        if key.len() > MAX_KEY {
            return Err(StorageError::TooLarge(key.len()));
        }
        if value.as_ref().is_some_and(|v| v.len() > MAX_VALUE) {
            return Err(StorageError::TooLarge(value.map(|v| v.len()).unwrap_or(0)));
        }
        self.j.apply(key, value, &mut self.buf);
        let (tx, rx) = futures::channel::oneshot::channel();
        self.buf_waiters.push(tx);
        if !self.write_scheduled {
            self.write_scheduled = true;
            // After the mailbox drains: one write for every queued change.
            ctx.spawn(fut::ready(()).map(|_, act: &mut Self, ctx| {
                act.write_scheduled = false;
                act.write_now(ctx);
            }));
        }
        Ok(rx)
    }

    fn write_now(&mut self, ctx: &mut Context<Self>) {
        if self.buf.is_empty() {
            return;
        }
        let buf = std::mem::take(&mut self.buf);
        let waiters = std::mem::take(&mut self.buf_waiters);
        if let Err(e) = self.j.write(&buf) {
            let e = StorageError::from_write(e);
            for w in waiters {
                let _ = w.send(Err(e.clone()));
            }
            if matches!(e, StorageError::NoSpace(_)) {
                // No room (nothing of it was kept): the changes are already in the live
                // map, so keep their bytes to be written before the next ones, and let
                // the store go on. The callers were told it failed; it may still be
                // stored later, which for puts and deletes of whole values is harmless.
                if self.no_space == 0 {
                    slog::error!(self.log, "no space for the kv journal; retrying with the next write";
                        "error" => %e);
                }
                self.no_space += 1;
                let mut again = buf;
                again.extend_from_slice(&self.buf);
                self.buf = again;
                return;
            }
            slog::error!(self.log, "kv journal write failed"; "error" => %e);
            self.failed = Some(e.to_string());
            return;
        }
        if self.no_space > 0 {
            slog::info!(self.log, "space for the kv journal again"; "writes_refused" => self.no_space);
            self.no_space = 0;
        }
        self.unsynced = true;
        match self.mode {
            FlushMode::Async => {
                for w in waiters {
                    let _ = w.send(Ok(()));
                }
            }
            FlushMode::Sync => {
                self.written.extend(waiters);
                self.start_sync(ctx);
            }
        }
    }

    fn start_sync(&mut self, ctx: &mut Context<Self>) {
        if self.syncing || !self.unsynced || self.failed.is_some() {
            return;
        }
        self.syncing = true;
        self.unsynced = false;
        let waiters = std::mem::take(&mut self.written);
        ctx.spawn(
            self.flusher
                .send(Fsync {
                    files: vec![self.j.file()],
                    data_only: true,
                })
                .into_actor(self)
                .map(move |res, act, ctx| {
                    act.syncing = false;
                    let res = match res {
                        Ok(r) => r,
                        Err(_) => Err(StorageError::Closed),
                    };
                    if let Err(e) = &res {
                        slog::error!(act.log, "kv fsync failed"; "error" => %e);
                        act.failed = Some(e.to_string());
                    }
                    for w in waiters {
                        let _ = w.send(res.clone());
                    }
                    if act.mode == FlushMode::Sync {
                        act.start_sync(ctx);
                    }
                    act.maybe_compact();
                }),
        );
    }

    fn maybe_compact(&mut self) {
        if self.syncing || self.unsynced || !self.buf.is_empty() || !self.j.needs_compaction() {
            return;
        }
        if let Err(e) = self.j.compact() {
            // The journal is intact; compaction is retried later.
            slog::warn!(self.log, "kv compaction failed"; "error" => %e);
        }
    }
}

impl Actor for KvStore {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(KV_MAILBOX);
        let every = if self.mode == FlushMode::Async {
            self.interval.max(Duration::from_millis(1))
        } else {
            Duration::from_secs(1)
        };
        ctx.run_interval(every, |act, ctx| {
            act.start_sync(ctx);
            act.maybe_compact();
        });
    }
}

impl Handler<KvPut> for KvStore {
    type Result = ResponseFuture<Result<(), StorageError>>;
    fn handle(&mut self, m: KvPut, ctx: &mut Self::Context) -> Self::Result {
        let rx = self.change(m.key, m.value, ctx);
        Box::pin(async move {
            match rx {
                Ok(rx) => rx.await.unwrap_or(Err(StorageError::Closed)),
                Err(e) => Err(e),
            }
        })
    }
}

impl Handler<KvDeletePrefix> for KvStore {
    type Result = ResponseFuture<Result<usize, StorageError>>;
    fn handle(&mut self, m: KvDeletePrefix, ctx: &mut Self::Context) -> Self::Result {
        let keys = self.j.keys_with_prefix(&m.prefix);
        let n = keys.len();
        let mut last = None;
        for k in keys {
            match self.change(k, None, ctx) {
                Ok(rx) => last = Some(rx),
                Err(e) => return Box::pin(async move { Err(e) }),
            }
        }
        Box::pin(async move {
            // Changes are written and synced in order: the last one durable => all durable.
            if let Some(rx) = last {
                rx.await.unwrap_or(Err(StorageError::Closed))?;
            }
            Ok(n)
        })
    }
}

impl Handler<KvGet> for KvStore {
    type Result = Result<Option<Vec<u8>>, StorageError>;
    fn handle(&mut self, m: KvGet, _: &mut Self::Context) -> Self::Result {
        Ok(self.j.get(&m.key).cloned())
    }
}

impl Handler<KvScan> for KvStore {
    type Result = Result<Vec<(String, Vec<u8>)>, StorageError>;
    fn handle(&mut self, m: KvScan, _: &mut Self::Context) -> Self::Result {
        Ok(self.j.scan(&m.prefix))
    }
}

impl Handler<KvStatsQuery> for KvStore {
    type Result = MessageResult<KvStatsQuery>;
    fn handle(&mut self, _: KvStatsQuery, _: &mut Self::Context) -> Self::Result {
        MessageResult(KvStats {
            keys: self.j.len(),
            live_bytes: self.j.live_bytes(),
            journal_bytes: self.j.journal_bytes(),
            compactions: self.j.compactions(),
        })
    }
}

impl Handler<KvShutdown> for KvStore {
    type Result = Result<(), StorageError>;
    fn handle(&mut self, _: KvShutdown, ctx: &mut Self::Context) -> Self::Result {
        if self.closed {
            return Ok(());
        }
        self.write_now(ctx);
        self.closed = true;
        // Blocking fsync here is fine: the store is going away and this is its own thread.
        let r = self.j.sync().map_err(StorageError::from);
        for w in self.written.drain(..) {
            let _ = w.send(r.clone());
        }
        ctx.stop();
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logger() -> Logger {
        Logger::root(slog::Discard, o!())
    }

    #[test]
    fn op_roundtrip_and_garbage() {
        let mut b = Vec::new();
        encode_op(&mut b, "a/b", Some(b"xyz"));
        encode_op(&mut b, "a/c", None);
        let (op, n) = decode_op(&b).unwrap().unwrap();
        assert_eq!(
            op,
            Op {
                key: "a/b".into(),
                value: Some(b"xyz".to_vec())
            }
        );
        let (op2, _) = decode_op(&b[n..]).unwrap().unwrap();
        assert_eq!(op2.value, None);
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x40;
            let _ = decode_op(&c); // must not panic
        }
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..10_000 {
            let n = rng.gen_range(0..64);
            let g: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            let _ = decode_op(&g);
        }
    }

    #[test]
    fn journal_survives_reopen_torn_tail_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let log = logger();
        {
            let mut j = KvJournal::open(dir.path(), &log).unwrap();
            let mut buf = Vec::new();
            for i in 0..1000 {
                j.apply(format!("k{}", i % 10), Some(vec![i as u8; 2000]), &mut buf);
            }
            j.apply("gone".into(), Some(b"x".to_vec()), &mut buf);
            j.apply("gone".into(), None, &mut buf);
            j.write(&buf).unwrap();
            j.sync().unwrap();
            assert!(j.needs_compaction());
            j.compact().unwrap();
            assert_eq!(j.journal_bytes(), 0);
            let mut buf = Vec::new();
            j.apply("after".into(), Some(b"1".to_vec()), &mut buf);
            j.write(&buf).unwrap();
            j.sync().unwrap();
        }
        // A torn record at the end of the journal.
        let jp = dir.path().join("kv.log");
        let mut f = OpenOptions::new().append(true).open(&jp).unwrap();
        f.write_all(&[9, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        let j = KvJournal::open(dir.path(), &log).unwrap();
        assert_eq!(j.len(), 11);
        assert_eq!(j.get("k9").unwrap()[0], 999u32 as u8);
        assert_eq!(j.get("after").map(|v| v.as_slice()), Some(&b"1"[..]));
        assert!(j.get("gone").is_none());
        assert_eq!(j.scan("k").len(), 10);
        assert_eq!(std::fs::metadata(&jp).unwrap().len(), j.journal_bytes());
    }

    #[test]
    fn crash_between_snapshot_rename_and_journal_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let log = logger();
        let mut j = KvJournal::open(dir.path(), &log).unwrap();
        let mut buf = Vec::new();
        j.apply("a".into(), Some(b"1".to_vec()), &mut buf);
        j.apply("a".into(), None, &mut buf);
        j.apply("b".into(), Some(b"2".to_vec()), &mut buf);
        j.write(&buf).unwrap();
        let journal = std::fs::read(dir.path().join("kv.log")).unwrap();
        j.compact().unwrap();
        drop(j);
        // Simulate: the journal was not truncated.
        std::fs::write(dir.path().join("kv.log"), journal).unwrap();
        let j = KvJournal::open(dir.path(), &log).unwrap();
        assert_eq!(j.len(), 1);
        assert_eq!(j.get("b").map(|v| v.as_slice()), Some(&b"2"[..]));
    }
}
