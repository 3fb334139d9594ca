//! The per-queue index file format (pure code plus small blocking helpers).
//!
//! `{dir}/index/{hash64:016x}.idx` (or `{hash64:016x}-{n}.idx` when two queue names share
//! a hash; the header tells them apart):
//! ```text
//! header: magic "AMQIDX01" | base_offset u64 | name_len u32 | name | crc32 u32 (of the previous fields)
//! entries: [position u64 | size u32 | tag u64] * n     (all little endian, 20 bytes each)
//! ```
//! Entry `i` is the queue's offset `base_offset + i`. Entries are only ever appended; a
//! partial entry at the end (torn write) is ignored and overwritten. Entries whose
//! records retention deleted may be punched out ([`punch_hole`]): they then read as
//! zeros (position 0) and take no disk space.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{Offset, Position, QueueName};

pub const MAGIC: &[u8; 8] = b"AMQIDX01";
pub const ENTRY_LEN: usize = 20;
/// Queue names longer than this are refused (they could not be stored in a header).
pub const MAX_NAME_LEN: usize = 64 * 1024;

/// One index entry: where the record of one queue offset is in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub position: Position,
    pub size: u32,
    /// FNV-1a of the topic (see `record::topic_tag`).
    pub tag: u64,
}

impl IndexEntry {
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.position.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.tag.to_le_bytes());
    }
    /// `b` must hold at least `ENTRY_LEN` bytes.
    pub fn decode(b: &[u8]) -> Option<IndexEntry> {
        if b.len() < ENTRY_LEN {
            return None;
        }
        let mut p = [0u8; 8];
        p.copy_from_slice(&b[0..8]);
        let mut s = [0u8; 4];
        s.copy_from_slice(&b[8..12]);
        let mut t = [0u8; 8];
        t.copy_from_slice(&b[12..20]);
        Some(IndexEntry {
            position: u64::from_le_bytes(p),
            size: u32::from_le_bytes(s),
            tag: u64::from_le_bytes(t),
        })
    }
}

pub fn encode_header(name: &QueueName, base_offset: Offset) -> Vec<u8> {
    let n = name.as_str().as_bytes();
    let mut h = Vec::with_capacity(24 + n.len());
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&base_offset.to_le_bytes());
    h.extend_from_slice(&(n.len() as u32).to_le_bytes());
    h.extend_from_slice(n);
    let crc = crc32fast::hash(&h[8..]);
    h.extend_from_slice(&crc.to_le_bytes());
    h
}

/// A parsed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub base_offset: Offset,
    /// Where the entries start.
    pub len: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad index header: {0}")]
    Bad(String),
}

pub fn read_header(f: &File) -> Result<Header, HeaderError> {
    let file_len = f.metadata()?.len();
    let mut fixed = [0u8; 20];
    if file_len < 24 {
        return Err(HeaderError::Bad(format!(
            "file of {file_len} bytes is too short"
        )));
    }
    f.read_exact_at(&mut fixed, 0)?;
    if &fixed[0..8] != MAGIC {
        return Err(HeaderError::Bad("bad magic".into()));
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&fixed[8..16]);
    let base_offset = u64::from_le_bytes(b);
    let name_len = u32::from_le_bytes([fixed[16], fixed[17], fixed[18], fixed[19]]) as usize;
    if name_len > MAX_NAME_LEN || 24 + name_len as u64 > file_len {
        return Err(HeaderError::Bad(format!("bad name length {name_len}")));
    }
    let mut rest = vec![0u8; name_len + 4];
    f.read_exact_at(&mut rest, 20)?;
    let mut all = Vec::with_capacity(12 + name_len);
    all.extend_from_slice(&fixed[8..20]);
    all.extend_from_slice(&rest[..name_len]);
    let stored = u32::from_le_bytes([
        rest[name_len],
        rest[name_len + 1],
        rest[name_len + 2],
        rest[name_len + 3],
    ]);
    if crc32fast::hash(&all) != stored {
        return Err(HeaderError::Bad("header crc mismatch".into()));
    }
    let name = String::from_utf8(rest[..name_len].to_vec())
        .map_err(|_| HeaderError::Bad("name is not utf-8".into()))?;
    Ok(Header {
        name,
        base_offset,
        len: 24 + name_len as u64,
    })
}

/// Candidate file names of a queue: `{hash:016x}.idx`, then `{hash:016x}-{n}.idx`.
pub fn candidate_path(index_dir: &Path, hash: u64, n: u32) -> PathBuf {
    if n == 0 {
        index_dir.join(format!("{hash:016x}.idx"))
    } else {
        index_dir.join(format!("{hash:016x}-{n}.idx"))
    }
}

/// Free the disk blocks of `len` bytes at `offset` of `f`, keeping its length (the range
/// reads as zeros afterwards). Linux `fallocate(PUNCH_HOLE)`; elsewhere, or on a
/// filesystem without it, an error.
#[cfg(target_os = "linux")]
pub fn punch_hole(f: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(std::io::Error::other("range too large"));
    };
    // SAFETY: the fd is valid for the lifetime of `f`; fallocate reads only its arguments.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
pub fn punch_hole(_f: &File, _offset: u64, _len: u64) -> std::io::Result<()> {
    Err(std::io::Error::other("hole punching is Linux-only here"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_roundtrip() {
        let e = IndexEntry {
            position: 123456789,
            size: 77,
            tag: 0xdead_beef_0000_0001,
        };
        let mut v = Vec::new();
        e.encode_into(&mut v);
        assert_eq!(v.len(), ENTRY_LEN);
        assert_eq!(IndexEntry::decode(&v), Some(e));
        assert_eq!(IndexEntry::decode(&v[..19]), None);
    }

    #[test]
    fn header_roundtrip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.idx");
        let q = QueueName::filter("a/+/b");
        std::fs::write(&p, encode_header(&q, 42)).unwrap();
        let h = read_header(&File::open(&p).unwrap()).unwrap();
        assert_eq!(h.name, "f:a/+/b");
        assert_eq!(h.base_offset, 42);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[22] ^= 1;
        std::fs::write(&p, &bytes).unwrap();
        assert!(read_header(&File::open(&p).unwrap()).is_err());
        std::fs::write(&p, b"short").unwrap();
        assert!(read_header(&File::open(&p).unwrap()).is_err());
    }
}
