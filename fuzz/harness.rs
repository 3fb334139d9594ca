//! Stable-Rust fuzz harness for actimq's decoders (see FUZZING.md).
//!
//! Shared by `actors/examples/fuzz.rs` (long local runs) and `actors/tests/fuzz_smoke.rs`
//! (bounded runs in CI) through `#[path]`. Coverage-free: inputs are mutated from the
//! seed corpus in `fuzz/corpus/<target>/`, and an input that produces a new *outcome
//! signature* (the sequence of decoded item kinds / error kinds) joins the pool, which
//! is a cheap stand-in for coverage feedback.
//!
//! Input formats (the first bytes of every input are harness controls):
//! * `mqtt`:    `[mode][split][stream..]`: mode % 3: 0 raw, 1 after a v3.1.1 CONNECT,
//!   2 after a v5 CONNECT; mode & 0x80: max packet size 256 (else 1 MiB). split: 0 feed
//!   at once, 1..=127 fixed chunks of that size, 128.. varying chunk sizes.
//! * `service`: `[mode][split][stream..]`: mode & 1: decode `Response` (else `Request`);
//!   mode & 2: max frame 64 bytes (else 1 MiB); split as above.
//! * `record`:  `[flags][sel][buf..]`: sel % 3 picks max_record_bytes (64, 4096, 1 MiB),
//!   sel / 3 the `from` offset of `find_next_valid`; flags & 1: fix the first record's
//!   crc (flags & 2: and its length) so that the body decoder is reached.
#![allow(dead_code)]

use std::cell::RefCell;
use std::collections::hash_map::DefaultHasher;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use actimq_actors::mqtt::codec::MqttDecoder;
use actimq_actors::service::protocol::{self as sp, FrameCodec, Request, Response};
use actimq_actors::storage::record;
use actimq_actors::storage::{Message, MessageProps, QueueName};
use actix_codec::Decoder;
use bytes::{Bytes, BytesMut};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub const TARGETS: [&str; 3] = ["mqtt", "service", "record"];

/// Directory of the committed corpus and regressions (`<repo>/fuzz`).
pub fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// Runs one input against a target. Returns an outcome signature; panics on a bug.
pub fn run(target: &str, data: &[u8]) -> u64 {
    match target {
        "mqtt" => run_mqtt(data),
        "service" => run_service(data),
        "record" => run_record(data),
        t => panic!("unknown target {t}"),
    }
}

fn chunks(split: u8, stream: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut at = 0;
    let mut i = 0usize;
    while at < stream.len() {
        let n = match split {
            0 => stream.len(),
            1..=127 => split as usize,
            s => 1 + ((s as usize) ^ (i * 31)) % 13,
        };
        let end = (at + n).min(stream.len());
        out.push(&stream[at..end]);
        at = end;
        i += 1;
    }
    out
}

/// Feeds `stream` to a decoder chunk by chunk, like `Framed` does: decode until
/// `Ok(None)` (need more) or an error (the connection would be closed), then `decode_eof`.
fn drive<D: Decoder>(dec: &mut D, split: u8, stream: &[u8], h: &mut DefaultHasher)
where
    D::Item: KindOf,
    D::Error: std::fmt::Debug,
{
    let mut buf = BytesMut::new();
    for c in chunks(split, stream) {
        buf.extend_from_slice(c);
        loop {
            let before = buf.len();
            match dec.decode(&mut buf) {
                Ok(Some(item)) => {
                    item.kind(h);
                    // An item that consumes nothing would make the read loop spin forever.
                    assert!(
                        buf.len() < before,
                        "decoder yielded an item without consuming input"
                    );
                }
                Ok(None) => break,
                Err(e) => {
                    // The kind of error, without the numbers in its message.
                    let s = format!("{e:?}");
                    s.chars()
                        .filter(|c| !c.is_ascii_digit())
                        .collect::<String>()
                        .hash(h);
                    return;
                }
            }
        }
    }
    match dec.decode_eof(&mut buf) {
        Ok(Some(item)) => item.kind(h),
        Ok(None) => 1u8.hash(h),
        Err(_) => 2u8.hash(h),
    }
}

trait KindOf {
    fn kind(&self, h: &mut DefaultHasher);
}
impl KindOf for actimq_actors::mqtt::codec::Inbound {
    fn kind(&self, h: &mut DefaultHasher) {
        std::mem::discriminant(self).hash(h)
    }
}
impl KindOf for Request {
    fn kind(&self, h: &mut DefaultHasher) {
        std::mem::discriminant(self).hash(h)
    }
}
impl KindOf for Response {
    fn kind(&self, h: &mut DefaultHasher) {
        std::mem::discriminant(self).hash(h)
    }
}

fn run_mqtt(data: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    let (mode, split, rest) = match data {
        [m, s, rest @ ..] => (*m, *s, rest),
        _ => return 0,
    };
    let mut stream = match mode % 3 {
        1 => v3_connect(),
        2 => v5_connect(),
        _ => Vec::new(),
    };
    stream.extend_from_slice(rest);
    let max = if mode & 0x80 != 0 { 256 } else { 1 << 20 };
    (mode % 3).hash(&mut h);
    drive(&mut MqttDecoder::new(max), split, &stream, &mut h);
    h.finish()
}

fn run_service(data: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    let (mode, split, rest) = match data {
        [m, s, rest @ ..] => (*m, *s, rest),
        _ => return 0,
    };
    let max = if mode & 2 != 0 { 64 } else { 1 << 20 };
    (mode & 3).hash(&mut h);
    if mode & 1 == 0 {
        drive(&mut FrameCodec::<Request>::new(max), split, rest, &mut h);
        // The body decoder on its own (no length prefix).
        sp::decode_body::<Request>(rest).is_ok().hash(&mut h);
    } else {
        drive(&mut FrameCodec::<Response>::new(max), split, rest, &mut h);
        sp::decode_body::<Response>(rest).is_ok().hash(&mut h);
    }
    h.finish()
}

fn run_record(data: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    let (flags, sel, rest) = match data {
        [f, s, rest @ ..] => (*f, *s, rest),
        _ => return 0,
    };
    let max = [64, 4096, 1 << 20][(sel % 3) as usize];
    let mut buf = rest.to_vec();
    if flags & 1 != 0 && buf.len() >= record::HEADER_LEN {
        if flags & 2 != 0 {
            let len = (buf.len() - record::HEADER_LEN) as u32;
            buf[0..4].copy_from_slice(&len.to_le_bytes());
        }
        let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if let Some(end) = record::HEADER_LEN
            .checked_add(len)
            .filter(|e| *e <= buf.len())
        {
            let crc = crc32fast::hash(&buf[8..end]);
            buf[4..8].copy_from_slice(&crc.to_le_bytes());
        }
    }
    let bytes = Bytes::from(buf);
    let buf: &[u8] = &bytes;

    // The three entry points on the start of the buffer must agree with each other.
    let checked = record::check(buf, max);
    let decoded = record::decode(&bytes, max);
    let msg = record::decode_message(&bytes, max);
    if let Ok(n) = checked {
        assert!(
            n >= record::HEADER_LEN && n <= buf.len(),
            "check size {n} out of range"
        );
    }
    if let Ok((_, n)) = &decoded {
        assert_eq!(
            checked.as_ref().ok(),
            Some(n),
            "decode ok but check disagrees"
        );
        let (_, m) = msg.as_ref().expect("decode ok but decode_message failed");
        assert_eq!(m, n);
    }
    if checked.is_err() {
        assert!(
            decoded.is_err() && msg.is_err(),
            "check failed but decode succeeded"
        );
    }
    std::mem::discriminant(&checked.as_ref().map(|_| ())).hash(&mut h);
    decoded.is_ok().hash(&mut h);
    if let Err(e) = &checked {
        std::mem::discriminant(e).hash(&mut h);
    }

    // find_next_valid from an arbitrary offset inside (or just past) the buffer.
    let from = (sel / 3) as usize % (buf.len() + 2);
    if let Some(at) = record::find_next_valid(buf, from, max) {
        assert!(at >= from, "find_next_valid went backwards");
        assert!(
            record::check(&buf[at..], max).is_ok(),
            "find_next_valid: invalid record"
        );
        at.hash(&mut h);
    }

    // Recovery-style walk: decode record after record, resynchronising after garbage.
    let mut at = 0;
    let mut steps = 0;
    while at < buf.len() {
        steps += 1;
        assert!(steps <= buf.len() + 1, "record walk does not advance");
        match record::check(&buf[at..], max) {
            Ok(n) => {
                let r = record::decode(&bytes.slice(at..), max);
                r.is_ok().hash(&mut h);
                at += n;
            }
            Err(_) => match record::find_next_valid(buf, at + 1, max) {
                Some(next) => {
                    assert!(next > at);
                    at = next;
                }
                None => break,
            },
        }
    }
    h.finish()
}

/// Decodes a seed the way `run` does and returns (items decoded, first error): every
/// committed seed must decode completely, or the corpus is not what it claims to be.
pub fn seed_items(target: &str, data: &[u8]) -> (usize, Option<String>) {
    fn all<D: Decoder>(mut dec: D, stream: &[u8]) -> (usize, Option<String>)
    where
        D::Error: std::fmt::Debug,
    {
        let mut buf = BytesMut::from(stream);
        let mut n = 0;
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(_)) => n += 1,
                Ok(None) if buf.is_empty() => return (n, None),
                Ok(None) => return (n, Some(format!("{} bytes left over", buf.len()))),
                Err(e) => return (n, Some(format!("{e:?}"))),
            }
        }
    }
    let (mode, rest) = (data[0], &data[2..]);
    match target {
        "mqtt" => {
            let mut stream = match mode % 3 {
                1 => v3_connect(),
                2 => v5_connect(),
                _ => Vec::new(),
            };
            stream.extend_from_slice(rest);
            let max = if mode & 0x80 != 0 { 256 } else { 1 << 20 };
            all(MqttDecoder::new(max), &stream)
        }
        "service" if mode & 1 == 0 => all(FrameCodec::<Request>::new(1 << 20), rest),
        "service" => all(FrameCodec::<Response>::new(1 << 20), rest),
        _ => {
            let bytes = Bytes::copy_from_slice(rest);
            let (mut at, mut n) = (0, 0);
            while at < rest.len() {
                match record::decode(&bytes.slice(at..), 1 << 20) {
                    Ok((_, len)) => {
                        at += len;
                        n += 1;
                    }
                    Err(e) => return (n, Some(format!("at {at}: {e}"))),
                }
            }
            (n, None)
        }
    }
}

// ---------------------------------------------------------------- seed corpus

fn varint(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            out.push(b | 0x80);
        } else {
            out.push(b);
            return;
        }
    }
}

fn pkt(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    varint(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

fn s(x: &str) -> Vec<u8> {
    let mut out = (x.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(x.as_bytes());
    out
}

fn props(p: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    varint(p.len(), &mut out);
    out.extend_from_slice(p);
    out
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// A minimal valid v3.1.1 CONNECT (clean session, client id `c1`).
pub fn v3_connect() -> Vec<u8> {
    pkt(0x10, &cat(&[&s("MQTT"), &[4, 0x02, 0, 60], &s("c1")]))
}

/// A minimal valid v5 CONNECT (clean start, no properties, client id `c1`).
pub fn v5_connect() -> Vec<u8> {
    pkt(
        0x10,
        &cat(&[&s("MQTT"), &[5, 0x02, 0, 60], &props(&[]), &s("c1")]),
    )
}

fn v3_packets() -> Vec<(&'static str, Vec<u8>)> {
    let pid = [0u8, 7];
    vec![
        ("publish_qos0", pkt(0x30, &cat(&[&s("a/b"), b"hello"]))),
        (
            "publish_qos1_retain",
            pkt(0x33, &cat(&[&s("a/b"), &pid, b"hi"])),
        ),
        (
            "publish_qos2_dup",
            pkt(0x3c, &cat(&[&s("a/b/c"), &pid, b""])),
        ),
        ("puback", pkt(0x40, &pid)),
        ("pubrec", pkt(0x50, &pid)),
        ("pubrel", pkt(0x62, &pid)),
        ("pubcomp", pkt(0x70, &pid)),
        (
            "subscribe",
            pkt(0x82, &cat(&[&pid, &s("a/+"), &[1], &s("#"), &[2]])),
        ),
        (
            "unsubscribe",
            pkt(0xa2, &cat(&[&pid, &s("a/+"), &s("x/#")])),
        ),
        ("pingreq", pkt(0xc0, &[])),
        ("disconnect", pkt(0xe0, &[])),
        ("connack", pkt(0x20, &[0, 0])),
        ("suback", pkt(0x90, &[0, 7, 1])),
        ("unsuback", pkt(0xb0, &pid)),
        ("pingresp", pkt(0xd0, &[])),
    ]
}

fn v5_packets() -> Vec<(&'static str, Vec<u8>)> {
    let pid = [0u8, 9];
    let user = cat(&[&[0x26], &s("k"), &s("v")]);
    let pub_props = cat(&[
        &[0x01, 1],                         // payload format indicator
        &[0x02, 0, 0, 0, 30],               // message expiry
        &[0x23, 0, 1],                      // topic alias
        &cat(&[&[0x08], &s("resp/t")]),     // response topic
        &cat(&[&[0x09], &s("corr")]),       // correlation data
        &cat(&[&[0x03], &s("text/plain")]), // content type
        &user,
    ]);
    vec![
        (
            "publish_qos0",
            pkt(0x30, &cat(&[&s("a/b"), &props(&[]), b"hello"])),
        ),
        (
            "publish_qos1_props",
            pkt(0x33, &cat(&[&s("a/b"), &pid, &props(&pub_props), b"x"])),
        ),
        (
            "publish_qos2_alias_only",
            pkt(0x34, &cat(&[&s(""), &pid, &props(&[0x23, 0, 1]), b"y"])),
        ),
        ("puback", pkt(0x40, &cat(&[&pid, &[0x10], &props(&[])]))),
        ("puback_short", pkt(0x40, &pid)),
        (
            "pubrec",
            pkt(
                0x50,
                &cat(&[&pid, &[0x80], &props(&cat(&[&[0x1f], &s("why")]))]),
            ),
        ),
        ("pubrel", pkt(0x62, &cat(&[&pid, &[0], &props(&[])]))),
        ("pubcomp", pkt(0x70, &cat(&[&pid, &[0x92], &props(&user)]))),
        (
            "subscribe",
            pkt(
                0x82,
                &cat(&[
                    &pid,
                    &props(&[0x0b, 0x81, 0x01]),
                    &s("a/+"),
                    &[0x2d],
                    &s("$share/g/#"),
                    &[0x01],
                ]),
            ),
        ),
        (
            "unsubscribe",
            pkt(0xa2, &cat(&[&pid, &props(&user), &s("a/+")])),
        ),
        ("pingreq", pkt(0xc0, &[])),
        ("disconnect", pkt(0xe0, &[])),
        (
            "disconnect_props",
            pkt(0xe0, &cat(&[&[0x04], &props(&[0x11, 0, 0, 0, 10])])),
        ),
        (
            "auth",
            pkt(
                0xf0,
                &cat(&[
                    &[0x18],
                    &props(&cat(&[&[0x15], &s("SCRAM"), &[0x16], &s("data")])),
                ]),
            ),
        ),
        (
            "connack",
            pkt(0x20, &cat(&[&[0, 0], &props(&[0x22, 0, 10])])),
        ),
        ("suback", pkt(0x90, &cat(&[&pid, &props(&[]), &[1, 0x80]]))),
        ("unsuback", pkt(0xb0, &cat(&[&pid, &props(&[]), &[0]]))),
        ("pingresp", pkt(0xd0, &[])),
    ]
}

fn v3_connect_full() -> Vec<u8> {
    // clean session, will (qos 1, retain), username, password.
    pkt(
        0x10,
        &cat(&[
            &s("MQTT"),
            &[4, 0xee, 0, 30],
            &s("client-x"),
            &s("will/t"),
            &s("bye"),
            &s("user"),
            &s("pw"),
        ]),
    )
}

fn v5_connect_full() -> Vec<u8> {
    let cprops = cat(&[
        &[0x11, 0, 0, 0x0e, 0x10], // session expiry
        &[0x21, 0, 20],            // receive maximum
        &[0x27, 0, 1, 0, 0],       // maximum packet size
        &[0x22, 0, 5],             // topic alias maximum
        &[0x17, 1],                // request problem information
        &cat(&[&[0x26], &s("k"), &s("v")]),
    ]);
    let wprops = cat(&[
        &[0x18, 0, 0, 0, 5],
        &[0x01, 1],
        &[0x02, 0, 0, 0, 60],
        &cat(&[&[0x03], &s("t")]),
    ]);
    pkt(
        0x10,
        &cat(&[
            &s("MQTT"),
            &[5, 0xd6, 0, 30],
            &props(&cprops),
            &s("client-y"),
            &props(&wprops),
            &s("will/t"),
            &s("bye"),
            &s("user"),
            &s("pw"),
        ]),
    )
}

fn framed(mode: u8, split: u8, stream: &[u8]) -> Vec<u8> {
    cat(&[&[mode, split], stream])
}

fn sample_props() -> sp::Props {
    sp::Props {
        payload_format: Some(1),
        message_expiry_secs: Some(60),
        content_type: Some("text/plain".into()),
        response_topic: Some("r/t".into()),
        correlation_data: Some(vec![1, 2, 3]),
        user_properties: vec![("k".into(), "v".into())],
    }
}

fn requests() -> Vec<(&'static str, Request)> {
    let g = || "g1".to_string();
    let t = || "home".to_string();
    vec![
        (
            "hello",
            Request::Hello {
                id: 1,
                name: "svc".into(),
                username: Some("alice".into()),
                password: Some(b"s3cret".to_vec()),
            },
        ),
        (
            "produce",
            Request::Produce {
                id: 2,
                messages: vec![
                    sp::ProduceMessage {
                        target: sp::Target::Topic("home/room1".into()),
                        key: Some("k".into()),
                        payload: b"payload".to_vec(),
                        qos: 1,
                        retain: false,
                        props: sample_props(),
                    },
                    sp::ProduceMessage {
                        target: sp::Target::Client {
                            client_id: "dev1".into(),
                            topic: "cmd".into(),
                        },
                        key: None,
                        payload: vec![],
                        qos: 2,
                        retain: true,
                        props: sp::Props::default(),
                    },
                ],
            },
        ),
        (
            "join",
            Request::Join {
                id: 3,
                group: g(),
                topic: t(),
                start: sp::StartAt::Earliest,
            },
        ),
        (
            "leave",
            Request::Leave {
                id: 4,
                group: g(),
                topic: t(),
            },
        ),
        (
            "pull",
            Request::Pull {
                id: 5,
                group: g(),
                topic: t(),
                max: 100,
                wait_ms: 1000,
            },
        ),
        (
            "commit",
            Request::Commit {
                id: 6,
                group: g(),
                topic: t(),
                offsets: vec![(0, 10), (3, 1 << 40)],
            },
        ),
        (
            "seek",
            Request::Seek {
                id: 7,
                group: g(),
                topic: t(),
                to: sp::SeekTo::Timestamp(1_700_000_000_000),
            },
        ),
        (
            "seek_latest",
            Request::Seek {
                id: 8,
                group: g(),
                topic: t(),
                to: sp::SeekTo::Latest,
            },
        ),
    ]
}

fn responses() -> Vec<(&'static str, Response)> {
    vec![
        (
            "hello_ok",
            Response::HelloOk {
                id: 1,
                partitions: 8,
                version: 1,
            },
        ),
        (
            "produced",
            Response::Produced {
                id: 2,
                positions: vec![0, 1 << 33],
            },
        ),
        (
            "joined",
            Response::Joined {
                id: 3,
                partitions: vec![0, 1, 2],
            },
        ),
        ("left", Response::Left { id: 4 }),
        (
            "messages",
            Response::Messages {
                id: 5,
                messages: vec![sp::Delivered {
                    topic: "home/room1".into(),
                    payload: b"x".to_vec(),
                    qos: 1,
                    retain: false,
                    publisher: "dev".into(),
                    timestamp_ms: 1_700_000_000_000,
                    props: sample_props(),
                    partition: 1,
                    offset: 42,
                    position: 4096,
                }],
                partitions: vec![1],
            },
        ),
        ("committed", Response::Committed { id: 6 }),
        (
            "seeked",
            Response::Seeked {
                id: 7,
                offsets: vec![(0, 5)],
            },
        ),
        (
            "error",
            Response::Error {
                id: 0,
                code: sp::ErrorCode::BadFrame,
                message: "bad".into(),
            },
        ),
    ]
}

fn sample_message(topic: &str, payload: &[u8], with_props: bool) -> Message {
    Message {
        topic: topic.into(),
        payload: Bytes::copy_from_slice(payload),
        qos: 1,
        retain: with_props,
        publisher: "client-1".into(),
        timestamp_ms: 1_700_000_000_000,
        props: if with_props {
            MessageProps {
                payload_format: Some(1),
                message_expiry_secs: Some(30),
                content_type: Some("application/json".into()),
                response_topic: Some("r".into()),
                correlation_data: Some(vec![9, 9]),
                user_properties: vec![("a".into(), "b".into())],
            }
        } else {
            MessageProps::default()
        },
    }
}

/// The seed corpus of a target: (file name, content). `gen-corpus` writes these.
pub fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    match target {
        "mqtt" => {
            for (n, p) in v3_packets() {
                out.push((format!("v3_{n}"), framed(1, 0, &p)));
            }
            for (n, p) in v5_packets() {
                out.push((format!("v5_{n}"), framed(2, 0, &p)));
            }
            let v3_all: Vec<u8> = v3_packets()
                .into_iter()
                .take(11)
                .flat_map(|(_, p)| p)
                .collect();
            let v5_all: Vec<u8> = v5_packets()
                .into_iter()
                .take(14)
                .flat_map(|(_, p)| p)
                .collect();
            out.push(("v3_connect".into(), framed(0, 0, &v3_connect())));
            out.push(("v5_connect".into(), framed(0, 0, &v5_connect())));
            out.push(("v3_connect_full".into(), framed(0, 0, &v3_connect_full())));
            out.push(("v5_connect_full".into(), framed(0, 0, &v5_connect_full())));
            out.push((
                "v3_session".into(),
                framed(0, 0, &cat(&[&v3_connect_full(), &v3_all])),
            ));
            out.push((
                "v5_session".into(),
                framed(0, 0, &cat(&[&v5_connect_full(), &v5_all])),
            ));
            out.push(("v3_session_split1".into(), framed(1, 1, &v3_all)));
            out.push(("v5_session_split_vary".into(), framed(2, 200, &v5_all)));
            out.push(("v5_session_small_max".into(), framed(0x80, 7, &v5_all)));
        }
        "service" => {
            for (n, r) in requests() {
                out.push((format!("req_{n}"), framed(0, 0, &sp::encode_frame(&r))));
            }
            for (n, r) in responses() {
                out.push((format!("resp_{n}"), framed(1, 0, &sp::encode_frame(&r))));
            }
            let all: Vec<u8> = requests()
                .iter()
                .flat_map(|(_, r)| sp::encode_frame(r))
                .collect();
            out.push(("req_all_split3".into(), framed(0, 3, &all)));
            let all: Vec<u8> = responses()
                .iter()
                .flat_map(|(_, r)| sp::encode_frame(r))
                .collect();
            out.push(("resp_all_split_vary".into(), framed(1, 150, &all)));
        }
        "record" => {
            let q = [
                QueueName::topic("home", 0),
                QueueName::topic("home", 3),
                QueueName::filter("home/+/t"),
            ];
            let r1 = record::encode(
                &sample_message("home/r1/t", b"21.5", false),
                &q[..1],
                1 << 20,
            )
            .unwrap();
            let r2 = record::encode(&sample_message("home/r2/t", &[0u8; 40], true), &q, 1 << 20)
                .unwrap();
            let r3 = record::encode(&sample_message("a", b"", false), &[], 1 << 20).unwrap();
            out.push(("plain".into(), cat(&[&[0, 1], &r1])));
            out.push(("props".into(), cat(&[&[0, 2], &r2])));
            out.push(("empty".into(), cat(&[&[0, 0], &r3])));
            out.push(("fixcrc_props".into(), cat(&[&[3, 2], &r2])));
            out.push(("log3".into(), cat(&[&[0, 1], &r1, &r2, &r3])));
            out.push((
                "log_garbage_between".into(),
                cat(&[&[0, 31], &r1, &[0xde, 0xad, 1, 0, 0], &r2, &r1[..7]]),
            ));
        }
        t => panic!("unknown target {t}"),
    }
    out
}

/// Loads `fuzz/<sub>/<target>/*` (sorted); empty when the directory does not exist.
pub fn load_dir(sub: &str, target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = fuzz_dir().join(sub).join(target);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .map(|p| {
            let d = std::fs::read(&p).unwrap();
            (p, d)
        })
        .collect();
    out.sort();
    out
}

// ---------------------------------------------------------------- mutation engine

const INTERESTING_U8: [u8; 10] = [0, 1, 2, 0x7f, 0x80, 0xff, 0x10, 0x20, 0x3f, 0xfe];
const INTERESTING_U32: [u32; 10] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0xffff,
    0x10000,
    0x7fff_ffff,
    0xffff_ffff,
    0x0400_0000,
];

fn mutate(rng: &mut StdRng, input: &mut Vec<u8>, pool: &[Vec<u8>]) {
    let rounds = 1 + rng.gen_range(0..4) * rng.gen_range(0..3);
    for _ in 0..rounds {
        // Keep the two control bytes mutable but rarely touched.
        let lo = if input.len() > 2 && rng.gen_ratio(7, 8) {
            2
        } else {
            0
        };
        let len = input.len();
        match rng.gen_range(0..12) {
            0 | 1 if len > lo => {
                let i = rng.gen_range(lo..len);
                input[i] ^= 1 << rng.gen_range(0..8);
            }
            2 if len > lo => {
                let i = rng.gen_range(lo..len);
                input[i] = INTERESTING_U8[rng.gen_range(0..INTERESTING_U8.len())];
            }
            3 if len > lo => {
                let i = rng.gen_range(lo..len);
                input[i] =
                    input[i].wrapping_add(rng.gen_range(1u8..=8).wrapping_mul(if rng.gen() {
                        1
                    } else {
                        255
                    }));
            }
            4 => {
                // insert random bytes
                let i = rng.gen_range(lo.min(len)..=len);
                let n = rng.gen_range(1..=16);
                let b: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
                input.splice(i..i, b);
            }
            5 if len > lo => {
                // delete a range
                let i = rng.gen_range(lo..len);
                let n = rng.gen_range(1..=(len - i).min(32));
                input.drain(i..i + n);
            }
            6 if len > lo => {
                // duplicate a range
                let i = rng.gen_range(lo..len);
                let n = rng.gen_range(1..=(len - i).min(64));
                let b = input[i..i + n].to_vec();
                let j = rng.gen_range(lo..=len);
                input.splice(j..j, b);
            }
            7 if !pool.is_empty() => {
                // splice: our head + another input's tail
                let other = &pool[rng.gen_range(0..pool.len())];
                if other.len() > 2 {
                    let i = rng.gen_range(lo.min(len)..=len);
                    let j = rng.gen_range(2..other.len());
                    input.truncate(i);
                    input.extend_from_slice(&other[j..]);
                }
            }
            8 if len >= lo + 4 => {
                // length-field tweak: a 32-bit value, LE or BE
                let i = rng.gen_range(lo..=len - 4);
                let v = INTERESTING_U32[rng.gen_range(0..INTERESTING_U32.len())];
                let b = if rng.gen() {
                    v.to_le_bytes()
                } else {
                    v.to_be_bytes()
                };
                input[i..i + 4].copy_from_slice(&b);
            }
            9 if len >= lo + 2 => {
                // 16-bit length tweak (MQTT strings, packet ids)
                let i = rng.gen_range(lo..=len - 2);
                let v = [0u16, 1, 0x7f, 0x80, 0xff, 0xffff, 0x8000][rng.gen_range(0..7)];
                input[i..i + 2].copy_from_slice(&v.to_be_bytes());
            }
            10 if len > lo => {
                // varint tweak: continuation bytes (MQTT remaining length, bincode varints)
                let i = rng.gen_range(lo..len);
                let b: &[u8] = [
                    &[0xff, 0xff, 0xff, 0x7f][..],
                    &[0x80, 0x80, 0x80, 0x80, 0x01],
                    &[0xfb],
                    &[0xfc],
                    &[0xfd],
                ][rng.gen_range(0..5)];
                let end = (i + b.len()).min(len);
                input.splice(i..end, b.iter().copied());
            }
            11 if len > lo => {
                input.truncate(rng.gen_range(lo..len));
            }
            _ => {
                if len >= 2 {
                    input[rng.gen_range(0..2)] = rng.gen();
                }
            }
        }
    }
    input.truncate(1 << 16);
}

thread_local! {
    static PANIC_MSG: RefCell<String> = const { RefCell::new(String::new()) };
    static IN_RUN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Installs (once) a panic hook that records the message of a panic inside
/// [`run_catch`] instead of printing it; other panics go to the previous hook.
pub fn quiet_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_RUN.with(|f| f.get()) {
                return prev(info);
            }
            let loc = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let msg = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            PANIC_MSG.with(|m| *m.borrow_mut() = format!("{msg}{loc}"));
        }));
    });
}

/// Runs one input, catching a panic. `Err(message)` is a crash.
pub fn run_catch(target: &str, data: &[u8]) -> Result<u64, String> {
    IN_RUN.with(|f| f.set(true));
    let r = catch_unwind(AssertUnwindSafe(|| run(target, data)));
    IN_RUN.with(|f| f.set(false));
    r.map_err(|_| PANIC_MSG.with(|m| m.borrow().clone()))
}

pub struct Crash {
    pub input: Vec<u8>,
    pub message: String,
}

#[derive(Default)]
pub struct Stats {
    pub iterations: u64,
    pub crashes: Vec<Crash>,
    pub pool: usize,
    pub signatures: usize,
    pub slowest: Duration,
    pub slowest_input: Vec<u8>,
}

/// Fuzzes `target` from `corpus` until `deadline` or `max_iters`, whichever comes first.
/// Deterministic for a given `seed` (apart from where the deadline cuts it).
pub fn fuzz(
    target: &str,
    corpus: Vec<Vec<u8>>,
    seed: u64,
    deadline: Instant,
    max_iters: u64,
    mut progress: impl FnMut(&Stats),
) -> Stats {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut pool: Vec<Vec<u8>> = corpus;
    if pool.is_empty() {
        pool.push(vec![0, 0]);
    }
    let mut seen = HashSet::new();
    let mut st = Stats::default();
    for p in &pool {
        if let Ok(sig) = run_catch(target, p) {
            seen.insert(sig);
        }
    }
    let mut crash_msgs = HashSet::new();
    let mut last_progress = Instant::now();
    while st.iterations < max_iters {
        if st.iterations % 256 == 0 && Instant::now() >= deadline {
            break;
        }
        let mut input = pool[rng.gen_range(0..pool.len())].clone();
        mutate(&mut rng, &mut input, &pool);
        let t0 = Instant::now();
        let r = run_catch(target, &input);
        let dt = t0.elapsed();
        st.iterations += 1;
        if dt > st.slowest {
            st.slowest = dt;
            st.slowest_input = input.clone();
        }
        match r {
            Ok(sig) => {
                if seen.len() >= 1 << 22 {
                    // Bound memory: outcomes are fine-grained, forget the old ones.
                    seen.clear();
                }
                if seen.insert(sig) {
                    if pool.len() < 8192 {
                        pool.push(input);
                    } else {
                        // Full: replace a random entry, so the pool keeps moving.
                        let i = rng.gen_range(0..pool.len());
                        pool[i] = input;
                    }
                }
            }
            Err(message) => {
                // Keep one input per distinct panic site.
                if crash_msgs.insert(message.clone()) {
                    st.crashes.push(Crash { input, message });
                }
            }
        }
        if last_progress.elapsed() >= Duration::from_secs(10) {
            st.pool = pool.len();
            st.signatures = seen.len();
            progress(&st);
            last_progress = Instant::now();
        }
    }
    st.pool = pool.len();
    st.signatures = seen.len();
    st
}
