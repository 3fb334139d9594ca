//! The node shell over real sockets: start and stop, restart on the same data, the
//! connection cap, and a port already in use.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use actimq::testing::TestNode;
use actimq::{Config, Node, NodeError};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

fn client(addr: SocketAddr, id: &str) -> (AsyncClient, rumqttc::EventLoop) {
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(5));
    AsyncClient::new(opts, 10)
}

/// Poll `events` until `want` accepts an incoming packet, or panic after 20 s.
async fn wait_for<T>(
    events: &mut rumqttc::EventLoop,
    mut want: impl FnMut(&Packet) -> Option<T>,
) -> T {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(p)) => {
                    if let Some(t) = want(&p) {
                        return t;
                    }
                }
                Ok(Event::Outgoing(_)) => {}
                Err(e) => panic!("mqtt client: {e}"),
            }
        }
    })
    .await
    .expect("timed out waiting for a packet")
}

#[tokio::test]
async fn a_subscriber_receives_a_publish_through_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), |_| {});

    let (sub, mut sub_events) = client(node.mqtt_addr(), "sub");
    sub.subscribe("room/+/temp", QoS::AtLeastOnce)
        .await
        .unwrap();
    wait_for(&mut sub_events, |p| {
        matches!(p, Packet::SubAck(_)).then_some(())
    })
    .await;

    let (publ, mut pub_events) = client(node.mqtt_addr(), "pub");
    publ.publish("room/1/temp", QoS::AtLeastOnce, false, b"21.5".to_vec())
        .await
        .unwrap();
    wait_for(&mut pub_events, |p| {
        matches!(p, Packet::PubAck(_)).then_some(())
    })
    .await;

    let payload = wait_for(&mut sub_events, |p| match p {
        Packet::Publish(p) => Some(p.payload.to_vec()),
        _ => None,
    })
    .await;
    assert_eq!(payload, b"21.5");
    node.stop();
}

/// Whether the server closes `conn` within `wait` (EOF or reset), without us writing.
async fn closed_by_server(conn: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 16];
    match tokio::time::timeout(wait, conn.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => false,
        Err(_) => false, // still open
    }
}

#[tokio::test]
async fn connections_beyond_max_connections_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), |cfg| {
        cfg.listener.tcp.max_connections = 1;
        cfg.mqtt.connect_timeout_secs = 60;
    });
    let addr = node.mqtt_addr();

    let mut first = TcpStream::connect(addr).await.unwrap();
    // Give the accept loop time to take the slot before the second arrives.
    assert!(!closed_by_server(&mut first, Duration::from_millis(200)).await);
    let mut second = TcpStream::connect(addr).await.unwrap();
    assert!(
        closed_by_server(&mut second, Duration::from_secs(5)).await,
        "the second connection should be refused"
    );
    assert!(!closed_by_server(&mut first, Duration::from_millis(100)).await);

    // Closing the first frees its slot (once its session has noticed).
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut third = TcpStream::connect(addr).await.unwrap();
        if !closed_by_server(&mut third, Duration::from_millis(300)).await {
            break;
        }
        assert!(Instant::now() < deadline, "the slot was never freed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.stop();
}

#[tokio::test]
async fn a_node_restarts_on_its_own_data() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), |_| {});
    let (c, mut events) = client(node.mqtt_addr(), "retainer");
    c.publish("state/door", QoS::AtLeastOnce, true, b"open".to_vec())
        .await
        .unwrap();
    wait_for(&mut events, |p| {
        matches!(p, Packet::PubAck(_)).then_some(())
    })
    .await;
    drop(events);
    node.stop();

    let node = TestNode::start(dir.path(), |_| {});
    let (c, mut events) = client(node.mqtt_addr(), "reader");
    c.subscribe("state/#", QoS::AtLeastOnce).await.unwrap();
    let (retain, payload) = wait_for(&mut events, |p| match p {
        Packet::Publish(p) => Some((p.retain, p.payload.to_vec())),
        _ => None,
    })
    .await;
    assert!(retain);
    assert_eq!(payload, b"open");
    node.stop();
}

#[test]
fn a_port_in_use_is_a_bind_error_before_storage_is_touched() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::default();
    cfg.node.data_dir = dir.path().join("data");
    cfg.listener.tcp.bind = taken.local_addr().unwrap();
    cfg.listener.ws.enabled = false;
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let result = actix_rt::System::new().block_on(Node::start(cfg, log));
    match result {
        Err(NodeError::Bind { listener, addr, .. }) => {
            assert_eq!(listener, "tcp");
            assert_eq!(addr, taken.local_addr().unwrap());
        }
        Err(e) => panic!("expected a bind error, got {e}"),
        Ok(_) => panic!("bound a port that is in use"),
    }
    assert!(!dir.path().join("data").exists());
}

#[test]
fn an_invalid_config_is_refused_by_the_library_too() {
    let mut cfg = Config::default();
    cfg.storage.segment_bytes = 0;
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let result = actix_rt::System::new().block_on(Node::start(cfg, log));
    match result {
        Err(e @ NodeError::Config(_)) => {
            assert!(e.to_string().contains("storage.segment_bytes"), "{e}")
        }
        Err(e) => panic!("expected a config error, got {e}"),
        Ok(_) => panic!("started with segment_bytes = 0"),
    }
}
