//! `Flusher`: the actor that performs fsyncs, so that nobody else blocks on them.
//!
//! * Owns nothing but a counter; it receives cloned file handles (`Arc<File>`).
//! * Handles [`Fsync`] (fdatasync a set of files), [`SyncFs`] (one `syncfs(2)` for the
//!   filesystem of a file: how index files are made durable at a checkpoint without one
//!   fsync per queue) and [`WriteFileAtomic`] (tmp + fsync + rename + dir fsync).
//! * Senders: the `CommitLog` (group commit, checkpoints, directory fsyncs after a roll)
//!   and the `KvStore`s (each `Storage` starts one flusher for the log and one for the kv
//!   stores, so a slow kv fsync never delays a log commit).
//! * Runs alone on its own arbiter: an fsync can take milliseconds, and the segment
//!   actors that serve reads must not wait behind it.
//! * Back-pressure: senders keep at most one `Fsync` in flight each (that is what makes
//!   group commit: appends that arrive during an fsync wait for the next one), so the
//!   mailbox stays short; its capacity is set anyway.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use actix::prelude::*;

use super::StorageError;

const FLUSHER_MAILBOX: usize = 64;

pub struct Flusher {
    fsyncs: Arc<AtomicU64>,
}

impl Flusher {
    pub fn new(fsyncs: Arc<AtomicU64>) -> Self {
        Flusher { fsyncs }
    }
}

impl Actor for Flusher {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(FLUSHER_MAILBOX);
    }
}

/// fdatasync every file (in order). `data_only: false` uses a full fsync (directories,
/// files whose metadata matters).
#[derive(Message)]
#[rtype(result = "Result<(), StorageError>")]
pub struct Fsync {
    pub files: Vec<Arc<File>>,
    pub data_only: bool,
}

impl Handler<Fsync> for Flusher {
    type Result = Result<(), StorageError>;
    fn handle(&mut self, msg: Fsync, _: &mut Self::Context) -> Self::Result {
        for f in &msg.files {
            if msg.data_only {
                f.sync_data()?;
            } else {
                f.sync_all()?;
            }
            self.fsyncs.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// `syncfs(2)` on the filesystem that holds `file`.
#[derive(Message)]
#[rtype(result = "Result<(), StorageError>")]
pub struct SyncFs {
    pub file: Arc<File>,
}

impl Handler<SyncFs> for Flusher {
    type Result = Result<(), StorageError>;
    fn handle(&mut self, msg: SyncFs, _: &mut Self::Context) -> Self::Result {
        syncfs(&msg.file)?;
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(target_os = "linux")]
fn syncfs(f: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: the fd is valid for the lifetime of `f`; syncfs only reads it.
    let rc = unsafe { libc::syncfs(f.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn syncfs(_f: &File) -> std::io::Result<()> {
    // No syncfs: fall back to the global sync.
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    Ok(())
}

/// Replace `path` with `data` atomically and durably.
#[derive(Message)]
#[rtype(result = "Result<(), StorageError>")]
pub struct WriteFileAtomic {
    pub path: PathBuf,
    pub data: Vec<u8>,
}

impl Handler<WriteFileAtomic> for Flusher {
    type Result = Result<(), StorageError>;
    fn handle(&mut self, msg: WriteFileAtomic, _: &mut Self::Context) -> Self::Result {
        write_file_atomic(&msg.path, &msg.data)?;
        self.fsyncs.fetch_add(2, Ordering::Relaxed);
        Ok(())
    }
}

/// tmp file + fsync + rename + fsync of the directory.
pub fn write_file_atomic(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}
