//! The service protocol: frames between back-end services and a node's service listener.
//! Pure (no actors, no IO): types, the framing codec and their unit tests.
//!
//! A frame on the wire is
//!
//! ```text
//! +----------------+-----------+---------------------------------+
//! | length: u32 BE | version:u8| body: bincode 2 (standard config)|
//! +----------------+-----------+---------------------------------+
//!   length counts version + body; at most the listener's max_frame_bytes.
//! ```
//!
//! The body is a [`Request`] (client → server) or a [`Response`] (server → client).
//! The version byte is read before the body, so a frame of an unknown version is
//! answered with [`ErrorCode::UnsupportedVersion`] (in the client's own version when it
//! is an older one, see [`OLDEST_VERSION`]) and the connection is closed. A frame that is too large or whose body does not decode is
//! answered with [`ErrorCode::FrameTooLarge`] / [`ErrorCode::BadFrame`] and the
//! connection is closed. Requests are answered in order, one at a time.

use bincode::{Decode, Encode};
use bytes::{Buf, BufMut, BytesMut};

/// The protocol version this code speaks. 2: `Hello` carries credentials (1 had none).
pub const VERSION: u8 = 2;
/// The oldest version whose clients can read this server's unsupported-version error:
/// [`Response::Error`] and [`ErrorCode::UnsupportedVersion`] are encoded the same in
/// every version since, so that error goes back in the client's own version.
pub const OLDEST_VERSION: u8 = 1;
/// Bytes of the length prefix.
pub const LEN_BYTES: usize = 4;
/// Hard upper bound on a frame (and on what bincode may allocate while decoding one).
pub const HARD_MAX_FRAME: usize = 64 << 20;

fn bincode_cfg() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<HARD_MAX_FRAME>()
}

/// Where a produced message goes.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum Target {
    /// An MQTT topic name: a first-level topic (`home`) or a full topic
    /// (`home/room1/cmd`). Routed exactly like a device's PUBLISH.
    Topic(String),
    /// One device: stored on topic `$client/{client_id}/{topic}`, which that device
    /// subscribes to (a persistent session gets it when it comes back). `$` topics are
    /// not matched by filters starting with a wildcard, so `#` subscribers do not see it.
    Client { client_id: String, topic: String },
}

/// The MQTT topic a message for one device is stored on.
pub fn client_topic(client_id: &str, topic: &str) -> String {
    format!("$client/{client_id}/{topic}")
}

/// MQTT 5 properties carried by a produced or consumed message.
#[derive(Clone, Debug, Default, PartialEq, Eq, Encode, Decode)]
pub struct Props {
    pub payload_format: Option<u8>,
    pub message_expiry_secs: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Vec<u8>>,
    pub user_properties: Vec<(String, String)>,
}

/// One message to produce.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct ProduceMessage {
    pub target: Target,
    /// Chooses the partition (hash of the key); `None`: the producer's name.
    pub key: Option<String>,
    pub payload: Vec<u8>,
    /// MQTT QoS devices receive it at (min with their subscription's QoS): 0, 1 or 2.
    pub qos: u8,
    pub retain: bool,
    pub props: Props,
}

/// Where a consumer group starts on a partition that has no committed offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub enum StartAt {
    Earliest,
    Latest,
}

/// Where [`Request::Seek`] moves a group's cursors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub enum SeekTo {
    Earliest,
    Latest,
    /// The first message stored at or after this time (ms since the Unix epoch).
    Timestamp(u64),
}

/// Client → server. Every request carries an `id` that its answer repeats.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum Request {
    /// First request: names the service (the publisher id of what it produces, and
    /// the client id the authentication and ACL hooks see) and logs in. Optional
    /// when the node admits anonymous clients; otherwise every other request before
    /// an accepted Hello is answered [`ErrorCode::LoginRequired`]. A refused login is
    /// answered with an error that closes the connection
    /// ([`ErrorCode::closes_connection`]).
    Hello {
        id: u64,
        name: String,
        username: Option<String>,
        password: Option<Vec<u8>>,
    },
    /// Store messages (in order) and route them like MQTT publishes. Answered with
    /// [`Response::Produced`] once every message is durable.
    Produce {
        id: u64,
        messages: Vec<ProduceMessage>,
    },
    /// Join consumer group `group` on first-level topic `topic`.
    Join {
        id: u64,
        group: String,
        topic: String,
        start: StartAt,
    },
    /// Leave a group (also implied when the connection closes).
    Leave {
        id: u64,
        group: String,
        topic: String,
    },
    /// Up to `max` messages from the partitions this member owns; waits up to `wait_ms`
    /// for one to arrive.
    Pull {
        id: u64,
        group: String,
        topic: String,
        max: u32,
        wait_ms: u32,
    },
    /// Commit `(partition, next offset to read)` pairs for the group.
    Commit {
        id: u64,
        group: String,
        topic: String,
        offsets: Vec<(u32, u64)>,
    },
    /// Move (and commit) the cursors of the partitions this member owns.
    Seek {
        id: u64,
        group: String,
        topic: String,
        to: SeekTo,
    },
}

impl Request {
    pub fn id(&self) -> u64 {
        match self {
            Request::Hello { id, .. }
            | Request::Produce { id, .. }
            | Request::Join { id, .. }
            | Request::Leave { id, .. }
            | Request::Pull { id, .. }
            | Request::Commit { id, .. }
            | Request::Seek { id, .. } => *id,
        }
    }
}

/// A consumed message.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Delivered {
    /// The MQTT topic it was published on.
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    /// MQTT client id of the device, or the producing service's name.
    pub publisher: String,
    /// Store time, ms since the Unix epoch.
    pub timestamp_ms: u64,
    pub props: Props,
    pub partition: u32,
    pub offset: u64,
    /// Position of the record in the commitlog.
    pub position: u64,
}

/// Error codes of [`Response::Error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub enum ErrorCode {
    /// The frame's version byte is not one this server speaks (connection closed).
    UnsupportedVersion,
    /// The frame body did not decode (connection closed).
    BadFrame,
    /// The frame is larger than max_frame_bytes (connection closed).
    FrameTooLarge,
    /// A field is not valid (bad topic, QoS > 2, ...); the connection stays open.
    Invalid,
    /// Pull/Commit/Seek/Leave for a group this connection has not joined.
    NotMember,
    /// Commit for a partition this member does not own (any more).
    NotOwner,
    /// Storage refused or is shutting down.
    Storage,
    /// A request other than Hello before an accepted Hello, on a node that does not
    /// admit anonymous clients; the connection stays open (send Hello).
    LoginRequired,
    /// Hello refused: unknown user, wrong password, no credentials where they are
    /// required, or another refusal by an authentication hook (connection closed).
    BadCredentials,
    /// Hello refused: too many failed logins from this address (connection closed).
    RateLimited,
    /// Hello refused: an authentication hook failed or timed out (connection closed).
    Unavailable,
    /// The ACL (authorization hooks) refused a Produce or a Join; the connection stays
    /// open and nothing of the request was done.
    NotAuthorized,
}

impl ErrorCode {
    /// Whether the server closes the connection after an error with this code.
    pub fn closes_connection(self) -> bool {
        matches!(
            self,
            ErrorCode::UnsupportedVersion
                | ErrorCode::BadFrame
                | ErrorCode::FrameTooLarge
                | ErrorCode::BadCredentials
                | ErrorCode::RateLimited
                | ErrorCode::Unavailable
        )
    }
}

/// Server → client.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum Response {
    HelloOk {
        id: u64,
        partitions: u32,
        version: u8,
    },
    /// One commitlog position per produced message, in order.
    Produced {
        id: u64,
        positions: Vec<u64>,
    },
    /// Joined: the partitions owned right now (they move on rebalances).
    Joined {
        id: u64,
        partitions: Vec<u32>,
    },
    Left {
        id: u64,
    },
    Messages {
        id: u64,
        messages: Vec<Delivered>,
        /// Partitions owned when the pull was answered.
        partitions: Vec<u32>,
    },
    Committed {
        id: u64,
    },
    /// The new cursor of each owned partition.
    Seeked {
        id: u64,
        offsets: Vec<(u32, u64)>,
    },
    /// `id` is 0 when the failing frame could not be decoded.
    Error {
        id: u64,
        code: ErrorCode,
        message: String,
    },
}

/// Why a frame could not be decoded. The session answers with an error frame and
/// closes the connection.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the limit of {1}")]
    TooLarge(usize, usize),
    #[error("unsupported protocol version {0} (this server speaks {VERSION})")]
    Version(u8),
    #[error("empty frame")]
    Empty,
    #[error("undecodable frame body: {0}")]
    Body(String),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge(..) => ErrorCode::FrameTooLarge,
            FrameError::Version(_) => ErrorCode::UnsupportedVersion,
            _ => ErrorCode::BadFrame,
        }
    }
}

/// Encode `body` as one whole frame (length, version, bincode).
pub fn encode_frame<T: Encode>(body: &T) -> Vec<u8> {
    encode_frame_as(body, VERSION)
}

/// [`encode_frame`] with another version byte: only for a body whose encoding that
/// version shares (the unsupported-version error, see [`OLDEST_VERSION`]).
pub fn encode_frame_as<T: Encode>(body: &T, version: u8) -> Vec<u8> {
    let mut out = vec![0u8; LEN_BYTES + 1];
    out[LEN_BYTES] = version;
    // Encoding into a Vec cannot fail for these types (no limit is hit on encode).
    if let Ok(b) = bincode::encode_to_vec(body, bincode::config::standard()) {
        out.extend_from_slice(&b);
    }
    let len = (out.len() - LEN_BYTES) as u32;
    out[..LEN_BYTES].copy_from_slice(&len.to_be_bytes());
    out
}

/// The error frame (id 0) that answers a frame that could not be decoded. An
/// unsupported version from [`OLDEST_VERSION`] on is answered in that version, so that
/// an older client can read why it is refused.
pub fn error_frame(e: &FrameError) -> Vec<u8> {
    let version = match e {
        FrameError::Version(v) if (OLDEST_VERSION..VERSION).contains(v) => *v,
        _ => VERSION,
    };
    let body = Response::Error {
        id: 0,
        code: e.code(),
        message: e.to_string(),
    };
    encode_frame_as(&body, version)
}

/// Decode a frame's content (version byte + body, without the length prefix).
pub fn decode_body<T: Decode<()>>(frame: &[u8]) -> Result<T, FrameError> {
    let (&version, body) = frame.split_first().ok_or(FrameError::Empty)?;
    if version != VERSION {
        return Err(FrameError::Version(version));
    }
    let (v, used) = bincode::decode_from_slice(body, bincode_cfg())
        .map_err(|e| FrameError::Body(e.to_string()))?;
    if used != body.len() {
        return Err(FrameError::Body(format!(
            "{} trailing bytes",
            body.len() - used
        )));
    }
    Ok(v)
}

/// Length-prefixed framing with a size limit; yields [`Request`]s (server side) or,
/// with `T = Response`, answers (client side).
pub struct FrameCodec<T> {
    max_frame: usize,
    _t: std::marker::PhantomData<fn() -> T>,
}

impl<T> FrameCodec<T> {
    pub fn new(max_frame: usize) -> Self {
        FrameCodec {
            max_frame: max_frame.min(HARD_MAX_FRAME),
            _t: std::marker::PhantomData,
        }
    }
}

impl<T: Decode<()>> actix_codec::Decoder for FrameCodec<T> {
    type Item = T;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<T>, FrameError> {
        if src.len() < LEN_BYTES {
            return Ok(None);
        }
        let mut len = [0u8; LEN_BYTES];
        len.copy_from_slice(&src[..LEN_BYTES]);
        let len = u32::from_be_bytes(len) as usize;
        if len > self.max_frame {
            return Err(FrameError::TooLarge(len, self.max_frame));
        }
        if src.len() < LEN_BYTES + len {
            src.reserve(LEN_BYTES + len - src.len());
            return Ok(None);
        }
        src.advance(LEN_BYTES);
        let frame = src.split_to(len);
        decode_body(&frame).map(Some)
    }
}

impl<T: Encode, E: Encode> actix_codec::Encoder<&E> for FrameCodec<T> {
    type Error = FrameError;

    fn encode(&mut self, item: &E, dst: &mut BytesMut) -> Result<(), FrameError> {
        let f = encode_frame(item);
        dst.reserve(f.len());
        dst.put_slice(&f);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_codec::{Decoder, Encoder};

    fn produce() -> Request {
        Request::Produce {
            id: 7,
            messages: vec![ProduceMessage {
                target: Target::Topic("a/b/c".into()),
                key: Some("k".into()),
                payload: b"hello".to_vec(),
                qos: 1,
                retain: false,
                props: Props {
                    response_topic: Some("r".into()),
                    correlation_data: Some(vec![1, 2]),
                    user_properties: vec![("x".into(), "y".into())],
                    ..Props::default()
                },
            }],
        }
    }

    fn hello() -> Request {
        Request::Hello {
            id: 1,
            name: "svc".into(),
            username: Some("alice".into()),
            password: Some(b"pw".to_vec()),
        }
    }

    #[test]
    fn round_trip_in_pieces() {
        let mut c = FrameCodec::<Request>::new(1 << 20);
        let mut buf = BytesMut::new();
        c.encode(&produce(), &mut buf).unwrap();
        c.encode(&hello(), &mut buf).unwrap();
        let all = buf.split().freeze();
        let mut src = BytesMut::new();
        let mut got = Vec::new();
        for b in all.iter() {
            src.put_u8(*b);
            while let Some(r) = c.decode(&mut src).unwrap() {
                got.push(r);
            }
        }
        assert_eq!(got, vec![produce(), hello()]);
        assert_eq!(got[0].id(), 7);
    }

    #[test]
    fn rejects_bad_frames() {
        let mut c = FrameCodec::<Request>::new(64);
        // too large
        let mut src = BytesMut::from(&[0u8, 0, 1, 0][..]);
        assert_eq!(
            c.decode(&mut src).unwrap_err().code(),
            ErrorCode::FrameTooLarge
        );
        // unknown version
        let mut f = encode_frame(&hello());
        f[LEN_BYTES] = 9;
        let mut src = BytesMut::from(&f[..]);
        assert_eq!(
            c.decode(&mut src).unwrap_err().code(),
            ErrorCode::UnsupportedVersion
        );
        // garbage body
        let mut src = BytesMut::from(&[0u8, 0, 0, 4, VERSION, 0xff, 0xff, 0xff][..]);
        assert_eq!(c.decode(&mut src).unwrap_err().code(), ErrorCode::BadFrame);
        // empty frame
        let mut src = BytesMut::from(&[0u8, 0, 0, 0][..]);
        assert_eq!(c.decode(&mut src).unwrap_err().code(), ErrorCode::BadFrame);
        // a huge claimed vector length inside a small frame must not allocate it
        let mut body = vec![VERSION, 1, 7]; // Produce, id 7
        body.extend_from_slice(&[0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f]);
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&body);
        let mut c = FrameCodec::<Request>::new(1 << 20);
        let mut src = BytesMut::from(&f[..]);
        assert!(c.decode(&mut src).is_err());
    }

    #[test]
    fn responses_round_trip() {
        let r = Response::Messages {
            id: 3,
            messages: vec![Delivered {
                topic: "t".into(),
                payload: vec![1],
                qos: 2,
                retain: true,
                publisher: "dev".into(),
                timestamp_ms: 5,
                props: Props::default(),
                partition: 1,
                offset: 9,
                position: 100,
            }],
            partitions: vec![1, 3],
        };
        let f = encode_frame(&r);
        let back: Response = decode_body(&f[LEN_BYTES..]).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn an_older_client_reads_the_version_error_in_its_own_version() {
        let mut c = FrameCodec::<Request>::new(1 << 20);
        let mut f = encode_frame(&hello());
        f[LEN_BYTES] = OLDEST_VERSION;
        let e = c.decode(&mut BytesMut::from(&f[..])).unwrap_err();
        let answer = error_frame(&e);
        assert_eq!(answer[LEN_BYTES], OLDEST_VERSION);
        // The body is what this version sends: the same bytes in both versions.
        let mut now = answer.clone();
        now[LEN_BYTES] = VERSION;
        match decode_body::<Response>(&now[LEN_BYTES..]).unwrap() {
            Response::Error { id: 0, code, .. } => {
                assert_eq!(code, ErrorCode::UnsupportedVersion);
                assert!(code.closes_connection());
            }
            other => panic!("{other:?}"),
        }
        // A newer (unknown) version gets this server's version.
        f[LEN_BYTES] = VERSION + 1;
        let e = c.decode(&mut BytesMut::from(&f[..])).unwrap_err();
        assert_eq!(error_frame(&e)[LEN_BYTES], VERSION);
        assert!(!ErrorCode::NotAuthorized.closes_connection());
        assert!(!ErrorCode::LoginRequired.closes_connection());
        assert!(ErrorCode::BadCredentials.closes_connection());
    }
}
