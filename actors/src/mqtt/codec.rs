//! The one module that names the MQTT codec crate (`rmqtt-codec`).
//!
//! Inbound, [`MqttDecoder`] detects the protocol version from CONNECT and turns both
//! v3.1/3.1.1 and v5.0 packets into one [`Inbound`] form, so the session has one code
//! path. Outbound, [`Encoder`] builds the packet of the negotiated version and encodes
//! it into a byte buffer. Replacing the codec crate means rewriting this file only.

use std::num::{NonZeroU16, NonZeroU32};

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use rmqtt_codec::error::{DecodeError, EncodeError};
use rmqtt_codec::types::QoS;
use rmqtt_codec::v5::ToReasonCode;
use rmqtt_codec::{v3, v5, version};
use tokio_util_codec::{Decoder, Encoder as _};

// actix-codec re-exports tokio-util's codec traits, which rmqtt-codec implements.
use actix_codec as tokio_util_codec;

use crate::storage::MessageProps;

/// The protocol level negotiated at CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// MQTT 3.1 or 3.1.1 (protocol level 3 or 4).
    V3(u8),
    /// MQTT 5.0.
    V5,
}

impl Proto {
    pub fn is_v5(self) -> bool {
        self == Proto::V5
    }
    pub fn level(self) -> u8 {
        match self {
            Proto::V3(l) => l,
            Proto::V5 => 5,
        }
    }
}

/// A will message as given in CONNECT.
#[derive(Debug, Clone)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub delay_secs: u32,
    pub props: MessageProps,
}

/// CONNECT, whatever the version.
#[derive(Debug, Clone)]
pub struct Connect {
    pub proto: Proto,
    pub clean_start: bool,
    pub keep_alive: u16,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<Bytes>,
    pub will: Option<Will>,
    /// v5 Session Expiry Interval; for v3, 0 if clean session, else "never" (u32::MAX).
    pub session_expiry: u32,
    /// How many QoS 1/2 publishes the client accepts un-acknowledged (v5; 65535 for v3).
    pub receive_max: u16,
    /// Largest packet the client accepts (v5; None = protocol limit).
    pub max_packet_size: Option<u32>,
    pub topic_alias_max: u16,
    pub request_problem_info: bool,
    pub auth_method: Option<String>,
}

/// Options of one subscription in SUBSCRIBE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubOpts {
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0: send retained at subscribe; 1: only if the subscription is new; 2: never.
    pub retain_handling: u8,
}

/// PUBLISH, whatever the version.
#[derive(Debug, Clone)]
pub struct Publish {
    pub dup: bool,
    pub qos: u8,
    pub retain: bool,
    /// Empty when a v5 client sent only a topic alias; the session resolves it.
    pub topic: String,
    pub packet_id: Option<u16>,
    pub payload: Bytes,
    pub topic_alias: Option<u16>,
    pub props: MessageProps,
    /// Subscription identifiers a client must not send (MQTT-3.3.4-6); kept to reject.
    pub has_sub_ids: bool,
}

/// Every packet a client may send, in one form for both versions.
#[derive(Debug, Clone)]
pub enum Inbound {
    Connect(Box<Connect>),
    Publish(Box<Publish>),
    PubAck {
        packet_id: u16,
    },
    PubRec {
        packet_id: u16,
        failed: bool,
    },
    PubRel {
        packet_id: u16,
    },
    PubComp {
        packet_id: u16,
    },
    Subscribe {
        packet_id: u16,
        sub_id: Option<u32>,
        filters: Vec<(String, SubOpts)>,
    },
    Unsubscribe {
        packet_id: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect {
        reason: u8,
        session_expiry: Option<u32>,
    },
    Auth,
    /// A packet only a server may send (CONNACK, SUBACK, ...): a protocol error.
    ServerOnly,
}

/// Why decoding failed, with the v5 reason code the connection is closed with.
#[derive(Debug, Clone)]
pub struct DecodeFailure {
    pub reason: u8,
    pub message: String,
    /// Set when a CONNECT of this version was refused while decoding (empty client id
    /// without clean start, MQTT-3.1.3-8): answer with a CONNACK, not just a close.
    pub refuse: Option<Proto>,
    /// The socket failed (reset, ...): not the client's bytes.
    pub io: bool,
}

impl From<DecodeError> for DecodeFailure {
    fn from(e: DecodeError) -> Self {
        let reason = match &e {
            // The crate maps these to codes meant for other situations.
            DecodeError::Utf8Error | DecodeError::InvalidClientId => 0x81,
            DecodeError::UnsupportedPacketType => 0x81,
            _ => u8::from(e.to_reason_code()),
        };
        DecodeFailure {
            reason,
            message: e.to_string(),
            refuse: None,
            io: false,
        }
    }
}

impl From<std::io::Error> for DecodeFailure {
    fn from(e: std::io::Error) -> Self {
        DecodeFailure {
            reason: 0x80,
            message: e.to_string(),
            refuse: None,
            io: true,
        }
    }
}

enum State {
    Detect,
    V3(v3::Codec),
    V5(v5::Codec),
}

/// Frame decoder for one connection: detects the version from the first packet,
/// which must be CONNECT (MQTT-3.1.0-1), then decodes with that version's codec.
pub struct MqttDecoder {
    state: State,
    max_packet_size: u32,
}

impl MqttDecoder {
    pub fn new(max_packet_size: u32) -> Self {
        MqttDecoder {
            state: State::Detect,
            max_packet_size,
        }
    }
}

impl Decoder for MqttDecoder {
    type Item = Inbound;
    type Error = DecodeFailure;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Inbound>, DecodeFailure> {
        loop {
            match &mut self.state {
                State::Detect => match version::VersionCodec.decode(src)? {
                    None => return Ok(None),
                    Some(version::ProtocolVersion::MQTT3) => {
                        self.state = State::V3(v3::Codec::new(self.max_packet_size))
                    }
                    Some(version::ProtocolVersion::MQTT5) => {
                        self.state = State::V5(v5::Codec::new(self.max_packet_size, 0))
                    }
                },
                State::V3(c) => {
                    v3_subscribe_reserved_bits(src)?;
                    let Some((p, len)) = c.decode(src).map_err(refusal(Proto::V3(4)))? else {
                        return Ok(None);
                    };
                    // The crate ignores a body after these: a wrong Remaining Length.
                    no_body(
                        matches!(p, v3::Packet::PingRequest | v3::Packet::Disconnect),
                        len,
                    )?;
                    return Ok(Some(from_v3(p)));
                }
                State::V5(c) => {
                    let Some((p, len)) = c.decode(src).map_err(refusal(Proto::V5))? else {
                        return Ok(None);
                    };
                    no_body(matches!(p, v5::Packet::PingRequest), len)?;
                    return Ok(Some(from_v5(p)));
                }
            }
        }
    }
}

/// PINGREQ (and a v3 DISCONNECT) have Remaining Length 0; anything else is malformed.
fn no_body(bodiless: bool, remaining_length: u32) -> Result<(), DecodeFailure> {
    if bodiless && remaining_length != 0 {
        return Err(DecodeFailure {
            reason: 0x81,
            message: format!("remaining length {remaining_length} on a packet without a body"),
            refuse: None,
            io: false,
        });
    }
    Ok(())
}

/// MQTT-3.8.3-4 (3.1.1): the six upper bits of each Requested QoS byte are reserved,
/// and a SUBSCRIBE with any of them set is malformed (close the connection).
/// rmqtt-codec masks them away, so the raw packet is checked first, once it is whole in
/// `src` (an incomplete or otherwise malformed one is left to the codec to report).
/// (v5 has its own option bits, which the v5 codec checks.)
fn v3_subscribe_reserved_bits(src: &[u8]) -> Result<(), DecodeFailure> {
    if src.first().map(|b| b >> 4) != Some(8) {
        return Ok(());
    }
    // Remaining Length: a variable byte integer of at most four bytes.
    let (mut len, mut shift, mut at) = (0usize, 0u32, 1usize);
    loop {
        let Some(&b) = src.get(at) else {
            return Ok(());
        };
        len |= ((b & 0x7F) as usize) << shift;
        at += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            return Ok(());
        }
    }
    let Some(body) = src.get(at..at.saturating_add(len)) else {
        return Ok(());
    };
    // Packet Identifier, then (length-prefixed filter, Requested QoS) pairs.
    let mut i = 2;
    while let Some(n) = body.get(i..i + 2) {
        i += 2 + u16::from_be_bytes([n[0], n[1]]) as usize;
        match body.get(i) {
            Some(q) if q & 0xFC != 0 => {
                return Err(DecodeFailure {
                    reason: 0x81,
                    message: format!("SUBSCRIBE options byte {q:#04x} has reserved bits set"),
                    refuse: None,
                    io: false,
                })
            }
            Some(_) => i += 1,
            None => break,
        }
    }
    Ok(())
}

/// The crate refuses an empty client id without clean start while decoding CONNECT;
/// turn that into a CONNACK 0x85 (v3: 0x02 Identifier rejected) instead of a bare close.
fn refusal(proto: Proto) -> impl Fn(DecodeError) -> DecodeFailure {
    move |e| {
        let refuse = matches!(e, DecodeError::InvalidClientId).then_some(proto);
        DecodeFailure {
            refuse,
            io: false,
            ..DecodeFailure::from(e)
        }
    }
}

fn qos_u8(q: QoS) -> u8 {
    q.value()
}

fn to_qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn bs(s: &str) -> ByteString {
    ByteString::from(s)
}

fn from_v3(p: v3::Packet) -> Inbound {
    use v3::Packet as P;
    match p {
        P::Connect(c) => Inbound::Connect(Box::new(Connect {
            proto: Proto::V3(c.protocol.level()),
            clean_start: c.clean_session,
            keep_alive: c.keep_alive,
            client_id: c.client_id.to_string(),
            username: c.username.map(|u| u.to_string()),
            password: c.password,
            will: c.last_will.map(|w| Will {
                topic: w.topic.to_string(),
                payload: w.message,
                qos: qos_u8(w.qos),
                retain: w.retain,
                delay_secs: 0,
                props: MessageProps::default(),
            }),
            session_expiry: if c.clean_session { 0 } else { u32::MAX },
            receive_max: u16::MAX,
            max_packet_size: None,
            topic_alias_max: 0,
            request_problem_info: true,
            auth_method: None,
        })),
        P::Publish(p) => Inbound::Publish(Box::new(Publish {
            dup: p.dup,
            qos: qos_u8(p.qos),
            retain: p.retain,
            topic: p.topic.to_string(),
            packet_id: p.packet_id.map(|x| x.get()),
            payload: p.payload,
            topic_alias: None,
            props: MessageProps::default(),
            has_sub_ids: false,
        })),
        P::PublishAck { packet_id } => Inbound::PubAck {
            packet_id: packet_id.get(),
        },
        P::PublishReceived { packet_id } => Inbound::PubRec {
            packet_id: packet_id.get(),
            failed: false,
        },
        P::PublishRelease { packet_id } => Inbound::PubRel {
            packet_id: packet_id.get(),
        },
        P::PublishComplete { packet_id } => Inbound::PubComp {
            packet_id: packet_id.get(),
        },
        P::Subscribe {
            packet_id,
            topic_filters,
        } => Inbound::Subscribe {
            packet_id: packet_id.get(),
            sub_id: None,
            filters: topic_filters
                .into_iter()
                .map(|(f, q)| {
                    (
                        f.to_string(),
                        SubOpts {
                            qos: qos_u8(q),
                            no_local: false,
                            retain_as_published: false,
                            retain_handling: 0,
                        },
                    )
                })
                .collect(),
        },
        P::Unsubscribe {
            packet_id,
            topic_filters,
        } => Inbound::Unsubscribe {
            packet_id: packet_id.get(),
            filters: topic_filters.into_iter().map(|f| f.to_string()).collect(),
        },
        P::PingRequest => Inbound::PingReq,
        P::Disconnect => Inbound::Disconnect {
            reason: 0,
            session_expiry: None,
        },
        P::ConnectAck(_) | P::SubscribeAck { .. } | P::UnsubscribeAck { .. } | P::PingResponse => {
            Inbound::ServerOnly
        }
    }
}

fn props_from_v5(p: &v5::PublishProperties) -> MessageProps {
    MessageProps {
        payload_format: p.is_utf8_payload.then_some(1),
        message_expiry_secs: p.message_expiry_interval.map(|x| x.get()),
        content_type: p.content_type.as_ref().map(|s| s.to_string()),
        response_topic: p.response_topic.as_ref().map(|s| s.to_string()),
        correlation_data: p.correlation_data.as_ref().map(|b| b.to_vec()),
        user_properties: p
            .user_properties
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn from_v5(p: v5::Packet) -> Inbound {
    use v5::Packet as P;
    match p {
        P::Connect(c) => Inbound::Connect(Box::new(Connect {
            proto: Proto::V5,
            clean_start: c.clean_start,
            keep_alive: c.keep_alive,
            client_id: c.client_id.to_string(),
            username: c.username.map(|u| u.to_string()),
            password: c.password,
            will: c.last_will.map(|w| Will {
                topic: w.topic.to_string(),
                payload: w.message,
                qos: qos_u8(w.qos),
                retain: w.retain,
                delay_secs: w.will_delay_interval_sec.unwrap_or(0),
                props: MessageProps {
                    payload_format: w.is_utf8_payload.and_then(|u| u.then_some(1)),
                    message_expiry_secs: w.message_expiry_interval.map(|x| x.get()),
                    content_type: w.content_type.map(|s| s.to_string()),
                    response_topic: w.response_topic.map(|s| s.to_string()),
                    correlation_data: w.correlation_data.map(|b| b.to_vec()),
                    user_properties: w
                        .user_properties
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                },
            }),
            session_expiry: c.session_expiry_interval_secs,
            receive_max: c.receive_max.map(|r| r.get()).unwrap_or(u16::MAX),
            max_packet_size: c.max_packet_size.map(|m| m.get()),
            topic_alias_max: c.topic_alias_max,
            request_problem_info: c.request_problem_info,
            auth_method: c.auth_method.map(|s| s.to_string()),
        })),
        P::Publish(p) => {
            let (props, alias, has_sub_ids) = match &p.properties {
                Some(pp) => (
                    props_from_v5(pp),
                    pp.topic_alias.map(|a| a.get()),
                    !pp.subscription_ids.is_empty(),
                ),
                None => (MessageProps::default(), None, false),
            };
            Inbound::Publish(Box::new(Publish {
                dup: p.dup,
                qos: qos_u8(p.qos),
                retain: p.retain,
                topic: p.topic.to_string(),
                packet_id: p.packet_id.map(|x| x.get()),
                payload: p.payload,
                topic_alias: alias,
                props,
                has_sub_ids,
            }))
        }
        P::PublishAck(a) => Inbound::PubAck {
            packet_id: a.packet_id.get(),
        },
        P::PublishReceived(a) => Inbound::PubRec {
            packet_id: a.packet_id.get(),
            failed: u8::from(a.reason_code) >= 0x80,
        },
        P::PublishRelease(a) => Inbound::PubRel {
            packet_id: a.packet_id.get(),
        },
        P::PublishComplete(a) => Inbound::PubComp {
            packet_id: a.packet_id.get(),
        },
        P::Subscribe(s) => Inbound::Subscribe {
            packet_id: s.packet_id.get(),
            sub_id: s.id.map(|i| i.get()),
            filters: s
                .topic_filters
                .into_iter()
                .map(|(f, o)| {
                    (
                        f.to_string(),
                        SubOpts {
                            qos: qos_u8(o.qos),
                            no_local: o.no_local,
                            retain_as_published: o.retain_as_published,
                            retain_handling: o.retain_handling as u8,
                        },
                    )
                })
                .collect(),
        },
        P::Unsubscribe(u) => Inbound::Unsubscribe {
            packet_id: u.packet_id.get(),
            filters: u.topic_filters.into_iter().map(|f| f.to_string()).collect(),
        },
        P::PingRequest => Inbound::PingReq,
        P::Disconnect(d) => Inbound::Disconnect {
            reason: u8::from(d.reason_code),
            session_expiry: d.session_expiry_interval_secs,
        },
        P::Auth(_) => Inbound::Auth,
        P::ConnectAck(_) | P::SubscribeAck(_) | P::UnsubscribeAck(_) | P::PingResponse => {
            Inbound::ServerOnly
        }
    }
}

/// What the server tells a client in CONNACK.
#[derive(Debug, Clone, Default)]
pub struct ConnAck {
    pub session_present: bool,
    /// v5 reason code; mapped to the nearest v3 return code for v3 clients.
    pub reason: u8,
    pub assigned_client_id: Option<String>,
    pub server_keep_alive: Option<u16>,
    pub session_expiry: Option<u32>,
    pub receive_max: u16,
    pub max_packet_size: u32,
    pub topic_alias_max: u16,
    pub retain_available: bool,
    pub reason_string: Option<String>,
}

/// An outbound PUBLISH.
#[derive(Debug, Clone)]
pub struct OutPublish<'a> {
    pub dup: bool,
    pub qos: u8,
    pub retain: bool,
    pub topic: &'a str,
    pub packet_id: Option<u16>,
    pub payload: Bytes,
    pub props: &'a MessageProps,
    /// Remaining Message Expiry Interval, when the message has one.
    pub expiry_left: Option<u32>,
    pub sub_ids: &'a [u32],
}

/// Which publish acknowledgement (PUBACK, PUBREC, PUBREL, PUBCOMP).
#[derive(Clone, Copy)]
enum AckKind {
    Ack,
    Rec,
    Rel,
    Comp,
}

/// Encodes outbound packets of the negotiated version.
pub struct Encoder {
    proto: Proto,
    v3: v3::Codec,
    v5: v5::Codec,
}

/// Encoding failed: the packet is larger than the client's Maximum Packet Size
/// (the caller discards it, MQTT-3.1.2-25), or a bug.
#[derive(Debug)]
pub struct EncodeFailure(pub String);

impl From<EncodeError> for EncodeFailure {
    fn from(e: EncodeError) -> Self {
        EncodeFailure(e.to_string())
    }
}

fn nz16(v: u16) -> NonZeroU16 {
    NonZeroU16::new(v).unwrap_or(NonZeroU16::MIN)
}

fn v3_connack_code(reason: u8) -> v3::ConnectAckReason {
    use v3::ConnectAckReason as R;
    match reason {
        0 => R::ConnectionAccepted,
        0x84 => R::UnacceptableProtocolVersion,
        0x85 => R::IdentifierRejected,
        0x86 => R::BadUserNameOrPassword,
        0x87 => R::NotAuthorized,
        _ => R::ServiceUnavailable,
    }
}

impl Encoder {
    pub fn new(proto: Proto) -> Self {
        Encoder {
            proto,
            v3: v3::Codec::new(0),
            v5: v5::Codec::new(0, 0),
        }
    }

    pub fn proto(&self) -> Proto {
        self.proto
    }

    /// Never send a packet larger than this (the client's Maximum Packet Size).
    pub fn set_max_packet_size(&mut self, max: u32) {
        self.v5.set_max_outbound_size(max);
    }

    fn put3(&mut self, p: v3::Packet, dst: &mut BytesMut) -> Result<(), EncodeFailure> {
        Ok(self.v3.encode(p, dst)?)
    }

    fn put5(&mut self, p: v5::Packet, dst: &mut BytesMut) -> Result<(), EncodeFailure> {
        Ok(self.v5.encode(p, dst)?)
    }

    pub fn connack(&mut self, a: &ConnAck, dst: &mut BytesMut) -> Result<(), EncodeFailure> {
        match self.proto {
            Proto::V3(_) => self.put3(
                v3::Packet::ConnectAck(v3::ConnectAck {
                    return_code: v3_connack_code(a.reason),
                    session_present: a.session_present,
                }),
                dst,
            ),
            Proto::V5 => {
                let reason = v5::ConnectAckReason::try_from(a.reason)
                    .unwrap_or(v5::ConnectAckReason::UnspecifiedError);
                let ack = v5::ConnectAck {
                    session_present: a.session_present,
                    reason_code: reason,
                    session_expiry_interval_secs: a.session_expiry,
                    receive_max: nz16(a.receive_max),
                    max_qos: QoS::ExactlyOnce,
                    max_packet_size: Some(a.max_packet_size),
                    assigned_client_id: a.assigned_client_id.as_deref().map(bs),
                    topic_alias_max: a.topic_alias_max,
                    retain_available: a.retain_available,
                    wildcard_subscription_available: true,
                    subscription_identifiers_available: true,
                    shared_subscription_available: true,
                    server_keepalive_sec: a.server_keep_alive,
                    reason_string: a.reason_string.as_deref().map(bs),
                    ..Default::default()
                };
                self.put5(v5::Packet::ConnectAck(Box::new(ack)), dst)
            }
        }
    }

    pub fn publish(&mut self, p: &OutPublish<'_>, dst: &mut BytesMut) -> Result<(), EncodeFailure> {
        let properties = if self.proto.is_v5() {
            let props = p.props;
            Some(v5::PublishProperties {
                topic_alias: None,
                correlation_data: props.correlation_data.clone().map(Bytes::from),
                message_expiry_interval: p.expiry_left.and_then(NonZeroU32::new),
                content_type: props.content_type.as_deref().map(bs),
                user_properties: props
                    .user_properties
                    .iter()
                    .map(|(k, v)| (bs(k), bs(v)))
                    .collect(),
                is_utf8_payload: props.payload_format == Some(1),
                response_topic: props.response_topic.as_deref().map(bs),
                subscription_ids: p
                    .sub_ids
                    .iter()
                    .filter_map(|i| NonZeroU32::new(*i))
                    .collect(),
            })
        } else {
            None
        };
        let publish = rmqtt_codec::types::Publish {
            dup: p.dup,
            retain: p.retain,
            qos: to_qos(p.qos),
            topic: bs(p.topic),
            packet_id: p.packet_id.map(nz16),
            payload: p.payload.clone(),
            properties,
        };
        match self.proto {
            Proto::V3(_) => self.put3(v3::Packet::Publish(Box::new(publish)), dst),
            Proto::V5 => self.put5(v5::Packet::Publish(Box::new(publish)), dst),
        }
    }

    fn ack5(packet_id: u16, reason: u8) -> v5::PublishAck {
        v5::PublishAck {
            packet_id: nz16(packet_id),
            reason_code: v5::PublishAckReason::try_from(reason)
                .unwrap_or(v5::PublishAckReason::UnspecifiedError),
            properties: Vec::new(),
            reason_string: None,
        }
    }

    fn ack5_2(packet_id: u16, reason: u8) -> v5::PublishAck2 {
        v5::PublishAck2 {
            packet_id: nz16(packet_id),
            reason_code: v5::PublishAck2Reason::try_from(reason)
                .unwrap_or(v5::PublishAck2Reason::PacketIdNotFound),
            properties: Vec::new(),
            reason_string: None,
        }
    }

    /// One of the four publish acknowledgements: the v3 packet carries only the id, the
    /// v5 one a reason code too.
    fn ack(
        &mut self,
        kind: AckKind,
        packet_id: u16,
        reason: u8,
        dst: &mut BytesMut,
    ) -> Result<(), EncodeFailure> {
        let id = nz16(packet_id);
        match self.proto {
            Proto::V3(_) => self.put3(
                match kind {
                    AckKind::Ack => v3::Packet::PublishAck { packet_id: id },
                    AckKind::Rec => v3::Packet::PublishReceived { packet_id: id },
                    AckKind::Rel => v3::Packet::PublishRelease { packet_id: id },
                    AckKind::Comp => v3::Packet::PublishComplete { packet_id: id },
                },
                dst,
            ),
            Proto::V5 => self.put5(
                match kind {
                    AckKind::Ack => v5::Packet::PublishAck(Self::ack5(packet_id, reason)),
                    AckKind::Rec => v5::Packet::PublishReceived(Self::ack5(packet_id, reason)),
                    AckKind::Rel => v5::Packet::PublishRelease(Self::ack5_2(packet_id, reason)),
                    AckKind::Comp => v5::Packet::PublishComplete(Self::ack5_2(packet_id, reason)),
                },
                dst,
            ),
        }
    }

    pub fn puback(
        &mut self,
        packet_id: u16,
        reason: u8,
        dst: &mut BytesMut,
    ) -> Result<(), EncodeFailure> {
        self.ack(AckKind::Ack, packet_id, reason, dst)
    }

    pub fn pubrec(
        &mut self,
        packet_id: u16,
        reason: u8,
        dst: &mut BytesMut,
    ) -> Result<(), EncodeFailure> {
        self.ack(AckKind::Rec, packet_id, reason, dst)
    }

    pub fn pubrel(
        &mut self,
        packet_id: u16,
        reason: u8,
        dst: &mut BytesMut,
    ) -> Result<(), EncodeFailure> {
        self.ack(AckKind::Rel, packet_id, reason, dst)
    }

    pub fn pubcomp(
        &mut self,
        packet_id: u16,
        reason: u8,
        dst: &mut BytesMut,
    ) -> Result<(), EncodeFailure> {
        self.ack(AckKind::Comp, packet_id, reason, dst)
    }

    /// SUBACK with one v5 reason code per filter (0..=2 granted QoS, >= 0x80 failure).
    pub fn suback(
        &mut self,
        packet_id: u16,
        codes: &[u8],
        dst: &mut BytesMut,
    ) -> Result<(), EncodeFailure> {
        match self.proto {
            Proto::V3(_) => self.put3(
                v3::Packet::SubscribeAck {
                    packet_id: nz16(packet_id),
                    status: codes
                        .iter()
                        .map(|c| match c {
                            0..=2 => v3::SubscribeReturnCode::Success(to_qos(*c)),
                            _ => v3::SubscribeReturnCode::Failure,
                        })
                        .collect(),
                },
                dst,
            ),
            Proto::V5 => self.put5(
                v5::Packet::SubscribeAck(v5::SubscribeAck {
                    packet_id: nz16(packet_id),
                    properties: Vec::new(),
                    reason_string: None,
                    status: codes
                        .iter()
                        .map(|c| {
                            v5::SubscribeAckReason::try_from(*c)
                                .unwrap_or(v5::SubscribeAckReason::UnspecifiedError)
                        })
                        .collect(),
                }),
                dst,
            ),
        }
    }

    pub fn unsuback(
        &mut self,
        packet_id: u16,
        codes: &[u8],
        dst: &mut BytesMut,
    ) -> Result<(), EncodeFailure> {
        match self.proto {
            Proto::V3(_) => self.put3(
                v3::Packet::UnsubscribeAck {
                    packet_id: nz16(packet_id),
                },
                dst,
            ),
            Proto::V5 => self.put5(
                v5::Packet::UnsubscribeAck(v5::UnsubscribeAck {
                    packet_id: nz16(packet_id),
                    properties: Vec::new(),
                    reason_string: None,
                    status: codes
                        .iter()
                        .map(|c| {
                            v5::UnsubscribeAckReason::try_from(*c)
                                .unwrap_or(v5::UnsubscribeAckReason::UnspecifiedError)
                        })
                        .collect(),
                }),
                dst,
            ),
        }
    }

    pub fn pingresp(&mut self, dst: &mut BytesMut) -> Result<(), EncodeFailure> {
        match self.proto {
            Proto::V3(_) => self.put3(v3::Packet::PingResponse, dst),
            Proto::V5 => self.put5(v5::Packet::PingResponse, dst),
        }
    }

    /// DISCONNECT from the server: v5 only (a v3 server just closes the connection).
    pub fn disconnect(
        &mut self,
        reason: u8,
        reason_string: Option<&str>,
        dst: &mut BytesMut,
    ) -> Result<(), EncodeFailure> {
        match self.proto {
            Proto::V3(_) => Ok(()),
            Proto::V5 => self.put5(
                v5::Packet::Disconnect(v5::Disconnect {
                    reason_code: v5::DisconnectReasonCode::try_from(reason)
                        .unwrap_or(v5::DisconnectReasonCode::UnspecifiedError),
                    session_expiry_interval_secs: None,
                    server_reference: None,
                    reason_string: reason_string.map(bs),
                    user_properties: Vec::new(),
                }),
                dst,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_and_decodes_v311_connect() {
        let mut d = MqttDecoder::new(1024);
        let mut b = BytesMut::from(&b"\x10\x0f\x00\x04MQTT\x04\x02\x00\x3c\x00\x03abc"[..]);
        match d.decode(&mut b).unwrap() {
            Some(Inbound::Connect(c)) => {
                assert_eq!(c.client_id, "abc");
                assert_eq!(c.proto, Proto::V3(4));
                assert!(c.clean_start);
                assert_eq!(c.keep_alive, 60);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn first_packet_must_be_connect() {
        // MQTT-3.1.0-1: a PUBLISH before CONNECT is refused.
        let mut d = MqttDecoder::new(1024);
        let mut b = BytesMut::from(&b"\x30\x05\x00\x01a\x00\x00"[..]);
        assert!(d.decode(&mut b).is_err());
    }

    #[test]
    fn partial_connect_waits() {
        let mut d = MqttDecoder::new(1024);
        let mut b = BytesMut::from(&b"\x10\x0f\x00\x04MQ"[..]);
        assert!(d.decode(&mut b).unwrap().is_none());
    }

    #[test]
    fn oversized_packet_is_refused() {
        let mut d = MqttDecoder::new(16);
        let mut b = BytesMut::from(&b"\x10\x0f\x00\x04MQTT\x04\x02\x00\x3c\x00\x03abc"[..]);
        assert!(d.decode(&mut b).unwrap().is_some());
        let mut b = BytesMut::from(&b"\x30\x7f"[..]);
        let e = d.decode(&mut b).unwrap_err();
        assert_eq!(e.reason, 0x95);
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x12345678u32;
        for _ in 0..2000 {
            let mut d = MqttDecoder::new(1024);
            let mut bytes =
                BytesMut::from(&b"\x10\x0f\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x03abc"[..]);
            for _ in 0..64 {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                bytes.extend_from_slice(&[(seed & 0xff) as u8]);
            }
            while let Ok(Some(_)) = d.decode(&mut bytes) {}
        }
    }
}
