//! `Segment`: the actor that owns one commitlog segment file `{dir}/log/{base:020}.log`
//! (`base` = global position of its first record; records start at file offset 0, so the
//! record at position `p` is at file offset `p - base`).
//!
//! * Handles [`SegAppend`] (write a batch of encoded records at the end, from the
//!   `CommitLog` only, at most one in flight), [`SegRead`] (read records by
//!   (position, size), from the `QueueIndex` shards serving pulls), [`SegSeal`] (no more
//!   appends; from the `CommitLog` on a roll) and [`SegStop`] (retention or shutdown).
//! * fsync is deliberately *not* done here: the `CommitLog` hands a cloned `Arc<File>`
//!   to the `Flusher`, so reads are never stuck behind an fsync.
//! * All segment actors share one "segments" arbiter; blocking `pwrite`/`pread` is
//!   allowed there. Back-pressure: the mailbox is bounded ([`SEGMENT_MAILBOX`]) and every
//!   sender uses `send`, so a burst of pulls parks the pullers instead of queueing
//!   without bound.
//!
//! The module also holds the blocking helpers recovery uses to scan a segment file.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use actix::prelude::*;
use bytes::Bytes;
use slog::{o, Logger};

use super::record;
use super::{Position, StorageError};

pub const SEGMENT_MAILBOX: usize = 256;
/// Reads of contiguous records are merged into one `pread` up to this size.
const MAX_COALESCED_READ: u64 = 8 << 20;

pub fn segment_file_name(base: Position) -> String {
    format!("{base:020}.log")
}

pub fn segment_path(log_dir: &Path, base: Position) -> PathBuf {
    log_dir.join(segment_file_name(base))
}

/// Parses `{base:020}.log`.
pub fn parse_segment_name(name: &str) -> Option<Position> {
    let stem = name.strip_suffix(".log")?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

pub fn open_segment_file(path: &Path, create: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)
}

pub struct Segment {
    base: Position,
    path: PathBuf,
    file: Arc<File>,
    size: u64,
    sealed: bool,
    log: Logger,
}

impl Segment {
    pub fn new(
        base: Position,
        path: PathBuf,
        file: Arc<File>,
        size: u64,
        sealed: bool,
        log: &Logger,
    ) -> Self {
        let log = log.new(o!("actor" => "segment", "base" => base));
        Segment {
            base,
            path,
            file,
            size,
            sealed,
            log,
        }
    }
}

impl Actor for Segment {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(SEGMENT_MAILBOX);
        slog::debug!(self.log, "segment open"; "size" => self.size, "sealed" => self.sealed);
    }
}

/// Append `buf` (whole encoded records) at the end of the segment. Answers the new size.
#[derive(Message)]
#[rtype(result = "Result<u64, StorageError>")]
pub struct SegAppend {
    pub buf: Vec<u8>,
}

impl Handler<SegAppend> for Segment {
    type Result = Result<u64, StorageError>;
    fn handle(&mut self, msg: SegAppend, _: &mut Self::Context) -> Self::Result {
        if self.sealed {
            return Err(StorageError::Io(format!(
                "{} is sealed",
                self.path.display()
            )));
        }
        // pwrite at our own notion of the end: no shared file cursor with readers.
        if let Err(e) = self.file.write_all_at(&msg.buf, self.size) {
            let err = StorageError::from_write(e);
            // Drop whatever part of the batch did reach the file, so that the segment
            // ends at its last whole record and the next write goes where this one would
            // have (the batch is answered with the error: nothing of it is stored).
            if let Err(t) = self.file.set_len(self.size) {
                slog::error!(self.log, "segment write failed, and truncating it back failed";
                    "error" => %err, "truncate_error" => %t, "at" => self.size);
                return Err(StorageError::Io(format!("{err}; truncate: {t}")));
            }
            if !matches!(err, StorageError::NoSpace(_)) {
                slog::error!(self.log, "segment write failed"; "error" => %err, "at" => self.size);
            }
            return Err(err);
        }
        self.size += msg.buf.len() as u64;
        Ok(self.size)
    }
}

/// Read the records at `ranges` (global position, size). Answers one `Bytes` per range,
/// in order; each one is a whole encoded record (still to be checked and decoded).
#[derive(Message)]
#[rtype(result = "Result<Vec<Bytes>, StorageError>")]
pub struct SegRead {
    pub ranges: Vec<(Position, u32)>,
}

impl Handler<SegRead> for Segment {
    type Result = Result<Vec<Bytes>, StorageError>;
    fn handle(&mut self, msg: SegRead, _: &mut Self::Context) -> Self::Result {
        let mut out = Vec::with_capacity(msg.ranges.len());
        let mut i = 0;
        while i < msg.ranges.len() {
            // Merge a run of adjacent ranges into one pread.
            let (start, first) = msg.ranges[i];
            let mut end = start + first as u64;
            let mut j = i + 1;
            while j < msg.ranges.len() {
                let (p, s) = msg.ranges[j];
                if p != end || end - start + s as u64 > MAX_COALESCED_READ {
                    break;
                }
                end = p + s as u64;
                j += 1;
            }
            if start < self.base || end > self.base + self.size {
                return Err(StorageError::Corrupt {
                    file: self.path.display().to_string(),
                    position: start,
                    reason: format!(
                        "read [{start}, {end}) outside the segment [{}, {})",
                        self.base,
                        self.base + self.size
                    ),
                });
            }
            let mut buf = vec![0u8; (end - start) as usize];
            self.file.read_exact_at(&mut buf, start - self.base)?;
            let buf = Bytes::from(buf);
            for &(p, s) in &msg.ranges[i..j] {
                let off = (p - start) as usize;
                out.push(buf.slice(off..off + s as usize));
            }
            i = j;
        }
        Ok(out)
    }
}

/// No more appends: the `CommitLog` rolled to a new segment.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SegSeal;

impl Handler<SegSeal> for Segment {
    type Result = ();
    fn handle(&mut self, _: SegSeal, _: &mut Self::Context) {
        self.sealed = true;
        slog::debug!(self.log, "segment sealed"; "size" => self.size);
    }
}

/// Stop the actor (the file is closed when the last `Arc<File>` goes away).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SegStop;

impl Handler<SegStop> for Segment {
    type Result = ();
    fn handle(&mut self, _: SegStop, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

/// One item found while scanning a segment file.
pub enum ScanItem {
    /// A valid record at `position` (the whole encoded record).
    Record { position: Position, bytes: Bytes },
    /// Bytes `[position, position + len)` are not valid records, but a valid record follows.
    Corrupt {
        position: Position,
        len: u64,
        reason: String,
    },
    /// Bytes from `position` to the end of the file hold no valid record (torn tail).
    TornTail {
        position: Position,
        len: u64,
        reason: String,
    },
}

/// Reads a segment file from file offset `from` in large chunks and yields its records.
/// Blocking; used by recovery on the storage arbiter.
pub struct SegmentScanner {
    file: File,
    base: Position,
    file_len: u64,
    max_record: usize,
    /// Buffer holds file bytes `[buf_start, buf_start + buf.len())`.
    buf: Bytes,
    buf_start: u64,
    pos: u64,
    done: bool,
}

const SCAN_CHUNK: usize = 4 << 20;

impl SegmentScanner {
    pub fn new(path: &Path, base: Position, from: u64, max_record: usize) -> std::io::Result<Self> {
        let file = File::open(path)?;
        let file_len = file.metadata()?.len();
        Ok(SegmentScanner {
            file,
            base,
            file_len,
            max_record,
            buf: Bytes::new(),
            buf_start: from.min(file_len),
            pos: from.min(file_len),
            done: false,
        })
    }

    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Makes sure the buffer holds at least `want` bytes from `self.pos` (or up to EOF).
    fn fill(&mut self, want: usize) -> std::io::Result<()> {
        let have_end = self.buf_start + self.buf.len() as u64;
        if self.pos >= self.buf_start && self.pos + want as u64 <= have_end {
            return Ok(());
        }
        let len = (want.max(SCAN_CHUNK) as u64).min(self.file_len - self.pos) as usize;
        let mut v = vec![0u8; len];
        self.file.read_exact_at(&mut v, self.pos)?;
        self.buf = Bytes::from(v);
        self.buf_start = self.pos;
        Ok(())
    }

    fn window(&self) -> Bytes {
        let off = (self.pos - self.buf_start) as usize;
        self.buf.slice(off..)
    }

    /// The next item, or None at the end of the file.
    pub fn next_item(&mut self) -> std::io::Result<Option<ScanItem>> {
        if self.done || self.pos >= self.file_len {
            return Ok(None);
        }
        self.fill(record::HEADER_LEN)?;
        let mut w = self.window();
        let need = if w.len() >= record::HEADER_LEN {
            let len = u32::from_le_bytes([w[0], w[1], w[2], w[3]]) as usize;
            record::HEADER_LEN + len.min(self.max_record)
        } else {
            record::HEADER_LEN
        };
        if w.len() < need {
            self.fill(need)?;
            w = self.window();
        }
        match record::check(&w, self.max_record) {
            Ok(n) => {
                let position = self.base + self.pos;
                self.pos += n as u64;
                Ok(Some(ScanItem::Record {
                    position,
                    bytes: w.slice(..n),
                }))
            }
            Err(e) => {
                let position = self.base + self.pos;
                // Resynchronise: look for the next valid record in the rest of the file.
                let rest = self.file_len - self.pos;
                let mut all = vec![0u8; rest as usize];
                self.file.read_exact_at(&mut all, self.pos)?;
                match record::find_next_valid(&all, 1, self.max_record) {
                    Some(skip) => {
                        self.pos += skip as u64;
                        self.buf = Bytes::new();
                        self.buf_start = self.pos;
                        Ok(Some(ScanItem::Corrupt {
                            position,
                            len: skip as u64,
                            reason: e.to_string(),
                        }))
                    }
                    None => {
                        self.done = true;
                        Ok(Some(ScanItem::TornTail {
                            position,
                            len: rest,
                            reason: e.to_string(),
                        }))
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(segment_file_name(42), "00000000000000000042.log");
        assert_eq!(parse_segment_name("00000000000000000042.log"), Some(42));
        assert_eq!(parse_segment_name("42.log"), None);
        assert_eq!(parse_segment_name("0000000000000000004x.log"), None);
    }
}
