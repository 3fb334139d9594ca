//! MQTT over WebSocket: rumqttc (an independent client) over `ws://` for QoS 1, retained
//! messages and wills; TCP <-> WebSocket in both directions; frames that split and
//! merge packets; pings and the close handshake; and bad input (text frames, oversized
//! frames, plain HTTP, wrong path or subprotocol, a stalled upgrade), each of which
//! closes only its own connection while another client keeps working.

mod transport;

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use rumqttc::{LastWill, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use transport::*;

#[tokio::test]
async fn qos1_round_trip_over_websocket() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), None, |_| {});
    let ws = Via::Ws(node.ws_addr());
    let mut sub = Client::over(&ws, "ws-sub", None).await;
    sub.subscribe("ws/qos1/#", QoS::AtLeastOnce).await;
    let mut publ = Client::over(&ws, "ws-pub", None).await;
    for i in 0..20u32 {
        round_trip(&mut publ, &mut sub, "ws/qos1/a", format!("m{i}").as_bytes()).await;
    }
    // A payload far larger than one read or one frame of the session.
    let big = vec![0xa5u8; 200_000];
    round_trip(&mut publ, &mut sub, "ws/qos1/big", &big).await;
    publ.disconnect().await;
    sub.disconnect().await;
}

#[tokio::test]
async fn retained_message_over_websocket() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), None, |_| {});
    let ws = Via::Ws(node.ws_addr());
    let mut publ = Client::over(&ws, "ws-retain-pub", None).await;
    publ.publish_acked("ws/retained", b"kept", true).await;
    let mut sub = Client::over(&ws, "ws-retain-sub", None).await;
    sub.subscribe("ws/retained", QoS::AtLeastOnce).await;
    let p = sub.expect_publish().await;
    assert_eq!(&p.payload[..], b"kept");
    assert!(p.retain, "a retained message is delivered with RETAIN set");
}

#[tokio::test]
async fn will_of_a_websocket_client_is_published() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), None, |_| {});
    let ws = Via::Ws(node.ws_addr());
    let mut watcher = Client::over(&ws, "ws-will-watch", None).await;
    watcher.subscribe("ws/will", QoS::AtLeastOnce).await;
    let will = LastWill::new("ws/will", "gone", QoS::AtLeastOnce, false);
    let device = Client::over(&ws, "ws-will-device", Some(will.clone())).await;
    device.kill().await;
    let p = watcher.expect_publish().await;
    assert_eq!(&p.payload[..], b"gone");

    // A clean DISCONNECT discards the will.
    let device = Client::over(&ws, "ws-will-device-2", Some(will)).await;
    device.disconnect().await;
    assert!(watcher.publish_within_quiet().await.is_none());
}

#[tokio::test]
async fn tcp_and_websocket_clients_exchange_messages() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), None, |_| {});
    let tcp = Via::Tcp(node.mqtt_addr());
    let ws = Via::Ws(node.ws_addr());
    let mut tcp_client = Client::over(&tcp, "x-tcp", None).await;
    let mut ws_client = Client::over(&ws, "x-ws", None).await;
    tcp_client.subscribe("x/to-tcp", QoS::AtLeastOnce).await;
    ws_client.subscribe("x/to-ws", QoS::AtLeastOnce).await;
    round_trip(&mut tcp_client, &mut ws_client, "x/to-ws", b"from tcp").await;
    round_trip(&mut ws_client, &mut tcp_client, "x/to-tcp", b"from ws").await;
}

/// Binary frames are only a transport: a CONNECT split over three frames, then
/// SUBSCRIBE and PUBLISH in one frame, must work like the same bytes over TCP.
#[tokio::test]
async fn packets_may_span_frames_and_frames_may_hold_several_packets() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), None, |_| {});
    let (mut ws, resp) = ws_connect(node.ws_addr(), "/mqtt", Some("mqtt"))
        .await
        .expect("upgrade");
    assert_eq!(
        resp.headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok()),
        Some("mqtt"),
        "the subprotocol is echoed"
    );

    let connect = connect_packet("raw-frames");
    for part in [&connect[..1], &connect[1..5], &connect[5..]] {
        ws.send(Message::binary(part.to_vec())).await.unwrap();
    }
    let mut both = subscribe_packet(1, "raw/t");
    both.extend(publish_packet(2, "raw/t", b"hello"));
    ws.send(Message::binary(both)).await.unwrap();

    // Expect CONNACK, SUBACK, PUBACK and the PUBLISH back, in whatever frames.
    let mut buf = Vec::new();
    let mut kinds = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while kinds.len() < 4 {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("packets in time")
            .expect("stream open")
            .expect("frame");
        match msg {
            Message::Binary(b) => buf.extend_from_slice(&b),
            other => panic!("unexpected frame {other:?}"),
        }
        for (first, body) in split_packets(&mut buf) {
            kinds.push(first >> 4);
            if first >> 4 == 3 {
                assert!(body.ends_with(b"hello"), "{body:?}");
            }
        }
    }
    kinds.sort();
    assert_eq!(kinds, vec![2, 3, 4, 9], "CONNACK, PUBLISH, PUBACK, SUBACK");

    // Ping is answered with the same payload.
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    let pong = tokio::time::timeout(WAIT, ws.next()).await.unwrap();
    match pong {
        Some(Ok(Message::Pong(p))) => assert_eq!(&p[..], b"are you there"),
        other => panic!("expected a pong, got {other:?}"),
    }

    // A close frame gets a close frame back, then the connection ends.
    ws.send(Message::Close(None)).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) => break,
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => panic!("close handshake failed: {e}"),
            Err(_) => panic!("no close reply"),
        }
    }
}

#[tokio::test]
async fn mqttv3_1_subprotocol_is_accepted_and_others_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), None, |_| {});
    let (_ws, resp) = ws_connect(node.ws_addr(), "/mqtt", Some("mqttv3.1"))
        .await
        .expect("mqttv3.1 is accepted");
    assert_eq!(
        resp.headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok()),
        Some("mqttv3.1")
    );
    let (_ws, resp) = ws_connect(node.ws_addr(), "/mqtt", Some("foo, mqtt"))
        .await
        .expect("a list containing mqtt is accepted");
    assert_eq!(
        resp.headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok()),
        Some("mqtt")
    );
    match ws_connect(node.ws_addr(), "/mqtt", Some("chat")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 400)
        }
        other => panic!("expected 400, got {:?}", other.map(|_| ())),
    }
    match ws_connect(node.ws_addr(), "/elsewhere", Some("mqtt")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 404)
        }
        other => panic!("expected 404, got {:?}", other.map(|_| ())),
    }
}

/// The next close frame's code, reading past anything else; `None` if the connection
/// ends without one.
async fn close_code(ws: &mut tokio_tungstenite::WebSocketStream<TcpStream>) -> Option<CloseCode> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| f.code),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_))) | Ok(None) => return None,
            Err(_) => panic!("the server did not close the connection"),
        }
    }
}

/// An already connected client that must survive the bad input of others.
async fn bystander(node: &actimq::testing::TestNode) -> (Client, Client) {
    let ws = Via::Ws(node.ws_addr());
    let mut sub = Client::over(&ws, "bystander-sub", None).await;
    sub.subscribe("bystander", QoS::AtLeastOnce).await;
    let publ = Client::over(&ws, "bystander-pub", None).await;
    (sub, publ)
}

#[tokio::test]
async fn text_frame_closes_that_connection_with_1003() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), None, |_| {});
    let (mut sub, mut publ) = bystander(&node).await;

    let (mut ws, _) = ws_connect(node.ws_addr(), "/mqtt", Some("mqtt"))
        .await
        .unwrap();
    ws.send(Message::binary(connect_packet("texter")))
        .await
        .unwrap();
    ws.send(Message::text("CONNECT please")).await.unwrap();
    assert_eq!(close_code(&mut ws).await, Some(CloseCode::Unsupported));

    round_trip(&mut publ, &mut sub, "bystander", b"still here").await;
}

#[tokio::test]
async fn oversized_frame_closes_that_connection_with_1009() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), None, |c| c.mqtt.max_packet_size = 4096);
    let (mut sub, mut publ) = bystander(&node).await;

    let (mut ws, _) = ws_connect(node.ws_addr(), "/mqtt", Some("mqtt"))
        .await
        .unwrap();
    ws.send(Message::binary(connect_packet("big-framer")))
        .await
        .unwrap();
    let _ = ws.send(Message::binary(vec![0u8; 10_000])).await;
    assert_eq!(close_code(&mut ws).await, Some(CloseCode::Size));

    round_trip(&mut publ, &mut sub, "bystander", b"still here").await;
}

/// Send raw bytes to the WebSocket port and read the whole answer (until the server
/// closes).
async fn http_exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut answer))
        .await
        .expect("the server closes after answering")
        .expect("read");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn plain_http_gets_a_clean_http_error() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), None, |_| {});
    let (mut sub, mut publ) = bystander(&node).await;

    let answer = http_exchange(node.ws_addr(), b"GET /mqtt HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(
        answer.contains("MQTT over WebSocket"),
        "the body explains: {answer}"
    );

    let answer = http_exchange(
        node.ws_addr(),
        b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 404 "), "{answer}");

    // MQTT bytes sent to the WebSocket port by mistake.
    let mut raw = connect_packet("confused");
    raw.extend_from_slice(b"\r\n\r\n");
    let answer = http_exchange(node.ws_addr(), &raw).await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");

    round_trip(&mut publ, &mut sub, "bystander", b"still here").await;
}

#[tokio::test]
async fn stalled_upgrade_is_cut_after_the_connect_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), None, |c| c.mqtt.connect_timeout_secs = 1);
    let (mut sub, mut publ) = bystander(&node).await;

    let mut tcp = TcpStream::connect(node.ws_addr()).await.unwrap();
    tcp.write_all(b"GET /mqtt HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut sink = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut sink))
        .await
        .expect("the server cuts a stalled upgrade");
    assert!(matches!(n, Ok(0) | Err(_)), "nothing is answered: {sink:?}");
    assert!(started.elapsed() >= Duration::from_millis(800));

    round_trip(&mut publ, &mut sub, "bystander", b"still here").await;
}

/// Many QoS 1 messages through WebSocket in both directions at once (rumqttc keeps up
/// to 100 in flight): nothing is lost or stuck in a frame that was never flushed.
#[tokio::test]
async fn a_stream_of_messages_over_websocket_arrives_whole() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), None, |_| {});
    let ws = Via::Ws(node.ws_addr());
    let mut sub = Client::over(&ws, "stream-sub", None).await;
    sub.subscribe("stream/#", QoS::AtLeastOnce).await;
    let publ = Client::over(&ws, "stream-pub", None).await;
    const N: u32 = 2000;
    let sender = publ.client.clone();
    tokio::spawn(async move {
        for i in 0..N {
            let payload = format!("{i:06}").repeat(50);
            sender
                .publish("stream/x", QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
        }
    });
    for i in 0..N {
        let p = sub.expect_publish().await;
        assert_eq!(&p.payload[..6], format!("{i:06}").as_bytes(), "in order");
    }
    drop(publ);
}

#[tokio::test]
async fn websocket_listener_has_its_own_connection_cap() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), None, |c| c.listener.ws.max_connections = 1);
    let ws = Via::Ws(node.ws_addr());
    let _first = Client::over(&ws, "cap-first", None).await;
    assert!(
        Client::try_connect(ws.options("cap-second")).await.is_err(),
        "a second WebSocket connection is refused"
    );
    // The TCP listener's cap is separate.
    let _tcp = Client::over(&Via::Tcp(node.mqtt_addr()), "cap-tcp", None).await;
}
