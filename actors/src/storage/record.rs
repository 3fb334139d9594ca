//! The commitlog record format (pure code, no IO).
//!
//! ```text
//! [len u32 LE][crc32 u32 LE][version u8][flags u8][body: len bytes]
//! ```
//! * `len` is the length of the body only, so a record occupies `HEADER_LEN + len` bytes.
//! * `crc32` (IEEE, `crc32fast`) covers `version`, `flags` and the body, so a flipped
//!   version byte is caught as well as a flipped payload byte.
//! * The body is bincode 2 (standard config: varint integers, little endian) of
//!   `topic, payload, qos, retain, publisher, timestamp_ms, props, queues`. The queue set
//!   is in the body so that recovery can rebuild every queue index from the log alone.
//!
//! Decoding borrows: the body is decoded with `BorrowDecode` from the record buffer and
//! the payload becomes a `Bytes::slice_ref` of that same buffer, so the payload is copied
//! exactly once (disk -> read buffer). Decoding arbitrary bytes never panics: every
//! failure is a [`RecordError`]. Lengths are bounded twice: `len` must not exceed the
//! configured `max_record_bytes`, and bincode runs with a hard allocation limit so a
//! garbage length prefix inside a body cannot make it allocate gigabytes.

use bincode::{BorrowDecode, Encode};
use bytes::Bytes;

use super::{Message, MessageProps, QueueName};

/// Bytes before the body: len (4) + crc (4) + version (1) + flags (1).
pub const HEADER_LEN: usize = 10;
/// The only record version this code writes and reads.
pub const VERSION: u8 = 1;
/// No flag is defined yet; readers reject unknown flags so a future writer can use them.
pub const KNOWN_FLAGS: u8 = 0;
/// Absolute ceiling for `max_record_bytes` (the bincode allocation limit is 4x this).
pub const HARD_MAX_RECORD_BYTES: usize = 64 << 20;
const DECODE_LIMIT: usize = 4 * HARD_MAX_RECORD_BYTES;

fn config() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<DECODE_LIMIT>,
> {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

/// Why a byte range is not a valid record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("truncated record: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("record body of {len} bytes exceeds the maximum of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("crc mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Crc { stored: u32, computed: u32 },
    #[error("unsupported record version {0}")]
    Version(u8),
    #[error("unknown record flags {0:#04x}")]
    Flags(u8),
    #[error("undecodable body: {0}")]
    Body(String),
}

#[derive(Encode)]
struct WireRef<'a> {
    topic: &'a str,
    payload: &'a [u8],
    qos: u8,
    retain: bool,
    publisher: &'a str,
    timestamp_ms: u64,
    props: &'a MessageProps,
    queues: &'a [QueueName],
}

#[derive(BorrowDecode)]
struct WireMessage<'a> {
    topic: &'a str,
    payload: &'a [u8],
    qos: u8,
    retain: bool,
    publisher: &'a str,
    timestamp_ms: u64,
    props: MessageProps,
}

#[derive(BorrowDecode)]
struct WireFull<'a> {
    msg: WireMessage<'a>,
    queues: Vec<QueueName>,
}

/// A decoded record: the message and the queues it was dispatched to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedRecord {
    pub message: Message,
    pub queues: Vec<QueueName>,
}

/// Appends the record of (`msg`, `queues`) to `buf` and returns its size in bytes.
/// On error `buf` is left as it was.
pub fn encode_into(
    buf: &mut Vec<u8>,
    msg: &Message,
    queues: &[QueueName],
    max_record_bytes: usize,
) -> Result<usize, RecordError> {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; HEADER_LEN]);
    buf[start + 8] = VERSION;
    buf[start + 9] = 0;
    let wire = WireRef {
        topic: &msg.topic,
        payload: &msg.payload,
        qos: msg.qos,
        retain: msg.retain,
        publisher: &msg.publisher,
        timestamp_ms: msg.timestamp_ms,
        props: &msg.props,
        queues,
    };
    if let Err(e) = bincode::encode_into_std_write(&wire, buf, config()) {
        buf.truncate(start);
        return Err(RecordError::Body(e.to_string()));
    }
    let body_len = buf.len() - start - HEADER_LEN;
    if body_len > max_record_bytes || body_len > u32::MAX as usize {
        buf.truncate(start);
        return Err(RecordError::TooLarge {
            len: body_len,
            max: max_record_bytes,
        });
    }
    let crc = crc32fast::hash(&buf[start + 8..]);
    buf[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(HEADER_LEN + body_len)
}

/// Encodes one record into a fresh buffer.
pub fn encode(
    msg: &Message,
    queues: &[QueueName],
    max_record_bytes: usize,
) -> Result<Vec<u8>, RecordError> {
    let mut buf = Vec::with_capacity(HEADER_LEN + 64 + msg.topic.len() + msg.payload.len());
    encode_into(&mut buf, msg, queues, max_record_bytes)?;
    Ok(buf)
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Validates the record that starts at `buf[0]` (header, bounds, version, flags, crc)
/// and returns its total size. Does not decode the body.
pub fn check(buf: &[u8], max_record_bytes: usize) -> Result<usize, RecordError> {
    if buf.len() < HEADER_LEN {
        return Err(RecordError::Truncated {
            need: HEADER_LEN,
            have: buf.len(),
        });
    }
    let len = le_u32(&buf[0..4]) as usize;
    if len > max_record_bytes {
        return Err(RecordError::TooLarge {
            len,
            max: max_record_bytes,
        });
    }
    let total = HEADER_LEN + len;
    if buf.len() < total {
        return Err(RecordError::Truncated {
            need: total,
            have: buf.len(),
        });
    }
    let version = buf[8];
    if version != VERSION {
        return Err(RecordError::Version(version));
    }
    let flags = buf[9];
    if flags & !KNOWN_FLAGS != 0 {
        return Err(RecordError::Flags(flags));
    }
    let stored = le_u32(&buf[4..8]);
    let computed = crc32fast::hash(&buf[8..total]);
    if stored != computed {
        return Err(RecordError::Crc { stored, computed });
    }
    Ok(total)
}

fn body_of(buf: &[u8], max_record_bytes: usize) -> Result<(&[u8], usize), RecordError> {
    let total = check(buf, max_record_bytes)?;
    Ok((&buf[HEADER_LEN..total], total))
}

fn to_message(src: &Bytes, w: WireMessage<'_>) -> Message {
    Message {
        topic: w.topic.to_owned(),
        // slice_ref: no copy, the payload shares the read buffer.
        payload: src.slice_ref(w.payload),
        qos: w.qos,
        retain: w.retain,
        publisher: w.publisher.to_owned(),
        timestamp_ms: w.timestamp_ms,
        props: w.props,
    }
}

/// Decodes the record at the start of `src` (message and queues). Returns it with its size.
pub fn decode(src: &Bytes, max_record_bytes: usize) -> Result<(DecodedRecord, usize), RecordError> {
    let (body, total) = body_of(src, max_record_bytes)?;
    let (w, _): (WireFull<'_>, usize) = bincode::borrow_decode_from_slice(body, config())
        .map_err(|e| RecordError::Body(e.to_string()))?;
    let message = to_message(src, w.msg);
    Ok((
        DecodedRecord {
            message,
            queues: w.queues,
        },
        total,
    ))
}

/// Decodes only the message of the record at the start of `src` (the read path does not
/// need the queue set). Returns it with the record's size.
pub fn decode_message(
    src: &Bytes,
    max_record_bytes: usize,
) -> Result<(Message, usize), RecordError> {
    let (body, total) = body_of(src, max_record_bytes)?;
    let (w, _): (WireMessage<'_>, usize) = bincode::borrow_decode_from_slice(body, config())
        .map_err(|e| RecordError::Body(e.to_string()))?;
    Ok((to_message(src, w), total))
}

/// Scans `buf` from `from` for the next offset at which a record passes [`check`].
/// Used by recovery to resynchronise after a corrupt record in a sealed segment.
/// The cheap header tests (version, flags, length bound) run before the crc, so the scan
/// is close to linear on garbage.
///
/// Payloads are client data, so a payload may be full of plausible fake headers, each
/// claiming a long body: checking each would be quadratic (2 MiB of them took 2.4 s).
/// The crc work is therefore capped at [`RESYNC_BUDGET_FACTOR`] times the bytes to scan
/// plus [`RESYNC_BUDGET_MIN`]; past it the scan gives up (`None`: the rest is reported
/// unreadable), which real corruption, with rare plausible headers, never reaches.
pub fn find_next_valid(buf: &[u8], from: usize, max_record_bytes: usize) -> Option<usize> {
    find_next_valid_counted(buf, from, max_record_bytes).0
}

/// Crc work allowed for one resync, per byte scanned.
pub const RESYNC_BUDGET_FACTOR: usize = 16;
/// Crc work always allowed for one resync, in bytes.
pub const RESYNC_BUDGET_MIN: usize = 64 << 20;

/// [`find_next_valid`], also answering how many bytes it checksummed.
fn find_next_valid_counted(
    buf: &[u8],
    from: usize,
    max_record_bytes: usize,
) -> (Option<usize>, usize) {
    let scanned = buf.len().saturating_sub(from);
    let budget = scanned
        .saturating_mul(RESYNC_BUDGET_FACTOR)
        .saturating_add(RESYNC_BUDGET_MIN);
    let mut spent = 0usize;
    let mut at = from;
    while at + HEADER_LEN <= buf.len() {
        let h = &buf[at..];
        let len = le_u32(&h[0..4]) as usize;
        if h[8] == VERSION
            && h[9] & !KNOWN_FLAGS == 0
            && len <= max_record_bytes
            && HEADER_LEN + len <= h.len()
        {
            spent = spent.saturating_add(len);
            if spent > budget {
                return (None, spent - len);
            }
            if check(h, max_record_bytes).is_ok() {
                return (Some(at), spent);
            }
        }
        at += 1;
    }
    (None, spent)
}

/// FNV-1a of a topic: the `tag` stored in index entries (lets a reader skip records of
/// other topics without reading them).
pub fn topic_tag(topic: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in topic.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn msg(payload: &[u8]) -> Message {
        Message {
            topic: "home/room1/temp".into(),
            payload: Bytes::copy_from_slice(payload),
            qos: 1,
            retain: false,
            publisher: "dev-1".into(),
            timestamp_ms: 1_700_000_000_000,
            props: MessageProps {
                content_type: Some("text/plain".into()),
                user_properties: vec![("k".into(), "v".into())],
                ..Default::default()
            },
        }
    }

    #[test]
    fn roundtrip() {
        let m = msg(b"hello");
        let qs = vec![
            QueueName::topic("home", 0),
            QueueName::filter("home/+/temp"),
        ];
        let buf = Bytes::from(encode(&m, &qs, 1 << 20).unwrap());
        let (rec, n) = decode(&buf, 1 << 20).unwrap();
        assert_eq!(n, buf.len());
        assert_eq!(rec.message, m);
        assert_eq!(rec.queues, qs);
        let (m2, n2) = decode_message(&buf, 1 << 20).unwrap();
        assert_eq!(m2, m);
        assert_eq!(n2, n);
    }

    #[test]
    fn payload_is_not_copied_on_decode() {
        let m = msg(&[7u8; 1000]);
        let buf = Bytes::from(encode(&m, &[], 1 << 20).unwrap());
        let (rec, _) = decode(&buf, 1 << 20).unwrap();
        let start = buf.as_ptr() as usize;
        let p = rec.message.payload.as_ptr() as usize;
        assert!(p >= start && p < start + buf.len());
    }

    #[test]
    fn concatenated_records() {
        let mut buf = Vec::new();
        let a = encode_into(&mut buf, &msg(b"a"), &[], 1 << 20).unwrap();
        let b = encode_into(&mut buf, &msg(b"bb"), &[], 1 << 20).unwrap();
        let bytes = Bytes::from(buf);
        assert_eq!(decode(&bytes, 1 << 20).unwrap().1, a);
        let second = bytes.slice(a..);
        let (r, n) = decode(&second, 1 << 20).unwrap();
        assert_eq!(n, b);
        assert_eq!(&r.message.payload[..], b"bb");
    }

    #[test]
    fn too_large_is_rejected_both_ways() {
        let m = msg(&[0u8; 2000]);
        assert!(matches!(
            encode(&m, &[], 1000),
            Err(RecordError::TooLarge { .. })
        ));
        let buf = Bytes::from(encode(&m, &[], 1 << 20).unwrap());
        assert!(matches!(
            decode(&buf, 1000),
            Err(RecordError::TooLarge { .. })
        ));
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let buf = encode(&msg(b"xyz"), &[QueueName::topic("a", 0)], 1 << 20).unwrap();
        for i in 0..buf.len() {
            for bit in 0..8 {
                let mut b = buf.clone();
                b[i] ^= 1 << bit;
                let r = decode(&Bytes::from(b), 1 << 20);
                assert!(r.is_err(), "flip at byte {i} bit {bit} not detected");
            }
        }
    }

    #[test]
    fn truncation_is_detected() {
        let buf = encode(&msg(b"xyz"), &[], 1 << 20).unwrap();
        for n in 0..buf.len() {
            let r = decode(&Bytes::copy_from_slice(&buf[..n]), 1 << 20);
            assert!(matches!(r, Err(RecordError::Truncated { .. })), "{n}");
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        for _ in 0..20_000 {
            let n = rng.gen_range(0..200);
            let mut b: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            if b.len() >= HEADER_LEN && rng.gen_bool(0.5) {
                // Make the header plausible so the body decoder gets exercised.
                let len = (b.len() - HEADER_LEN) as u32;
                b[0..4].copy_from_slice(&len.to_le_bytes());
                b[8] = VERSION;
                b[9] = 0;
                let crc = crc32fast::hash(&b[8..]);
                b[4..8].copy_from_slice(&crc.to_le_bytes());
            }
            let bytes = Bytes::from(b);
            let _ = decode(&bytes, 1 << 20);
            let _ = decode_message(&bytes, 1 << 20);
            let _ = find_next_valid(&bytes, 0, 1 << 20);
        }
    }

    #[test]
    fn huge_length_prefix_in_body_does_not_allocate_wildly() {
        // A body whose topic length claims ~2^62 bytes, with a valid crc.
        let mut b = vec![0u8; HEADER_LEN];
        b.extend_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F]);
        let len = (b.len() - HEADER_LEN) as u32;
        b[0..4].copy_from_slice(&len.to_le_bytes());
        b[8] = VERSION;
        let crc = crc32fast::hash(&b[8..]);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            decode(&Bytes::from(b), 1 << 20),
            Err(RecordError::Body(_))
        ));
    }

    #[test]
    fn resync_over_crafted_fake_headers_is_bounded() {
        // A payload could hold a plausible header at every 16th byte, each claiming the
        // rest of the buffer: without a budget, 2^16 checks of up to 1 MiB each.
        let n = 1 << 20;
        let mut buf = vec![0u8; n];
        for at in (0..n - HEADER_LEN).step_by(16) {
            let len = (n - at - HEADER_LEN) as u32;
            buf[at..at + 4].copy_from_slice(&len.to_le_bytes());
            buf[at + 8] = VERSION;
        }
        let (found, spent) = find_next_valid_counted(&buf, 1, 16 << 20);
        assert_eq!(found, None);
        assert!(
            spent <= n * RESYNC_BUDGET_FACTOR + RESYNC_BUDGET_MIN,
            "{spent}"
        );
        // A real record after a little such garbage is still found.
        let mut buf = vec![0u8; 4096];
        for at in (0..4000).step_by(16) {
            buf[at..at + 4].copy_from_slice(&100u32.to_le_bytes());
            buf[at + 8] = VERSION;
        }
        let at = buf.len();
        encode_into(&mut buf, &msg(b"real"), &[], 1 << 20).unwrap();
        assert_eq!(find_next_valid(&buf, 1, 1 << 20), Some(at));
    }

    #[test]
    fn resync_finds_next_record() {
        let mut buf = Vec::new();
        let a = encode_into(&mut buf, &msg(b"a"), &[], 1 << 20).unwrap();
        encode_into(&mut buf, &msg(b"b"), &[], 1 << 20).unwrap();
        buf[a / 2] ^= 0xFF; // corrupt the first record
        assert!(check(&buf, 1 << 20).is_err());
        assert_eq!(find_next_valid(&buf, 1, 1 << 20), Some(a));
    }
}
