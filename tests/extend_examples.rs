//! Issue #7: the extension examples run, in-process, and do what they say, checked
//! end to end with independent MQTT clients (rumqttc).

#[path = "../examples/embedded.rs"]
#[allow(dead_code)]
mod embedded;

#[path = "../examples/custom_actor.rs"]
#[allow(dead_code)]
mod custom_actor;

#[path = "../examples/auth_hook.rs"]
#[allow(dead_code)]
mod auth_hook;

use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::{AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

/// A rumqttc client whose event loop runs on a task; incoming PUBLISHes come out of
/// the channel as (topic, payload), after the SUBACKs of `subscribe` have arrived.
async fn client(
    addr: SocketAddr,
    id: &str,
    subscribe: &[&str],
) -> (AsyncClient, mpsc::UnboundedReceiver<(String, String)>) {
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(10));
    let (c, mut events) = AsyncClient::new(opts, 64);
    for f in subscribe {
        c.subscribe(*f, QoS::AtLeastOnce).await.unwrap();
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let mut acks = subscribe.len();
    actix_rt::spawn(async move {
        if acks == 0 {
            let _ = ready_tx.send(());
        }
        while let Ok(e) = events.poll().await {
            match e {
                Event::Incoming(Packet::SubAck(_)) => {
                    acks -= 1;
                    if acks == 0 {
                        let _ = ready_tx.send(());
                    }
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let payload = String::from_utf8_lossy(&p.payload).into_owned();
                    let _ = tx.send((p.topic.clone(), payload));
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(5), ready_rx.recv())
        .await
        .expect("SUBACK in time");
    (c, rx)
}

async fn next(rx: &mut mpsc::UnboundedReceiver<(String, String)>) -> (String, String) {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a message in time")
        .expect("client running")
}

#[test]
fn embedded_example_publishes_and_receives() {
    let dir = tempfile::tempdir().unwrap();
    let got = actix_rt::System::new()
        .block_on(embedded::demo(dir.path()))
        .unwrap();
    assert_eq!(got, vec![("greetings/world".into(), "hello".into())]);
}

#[test]
fn custom_actor_example_alerts_when_the_average_crosses_the_threshold() {
    let dir = tempfile::tempdir().unwrap();
    actix_rt::System::new().block_on(async {
        let node = custom_actor::start(dir.path(), 3, 30.0).await.unwrap();
        let addr = node.mqtt_addr().unwrap();
        let (_ops, mut alerts) = client(addr, "operator", &["alerts/#"]).await;
        let (sensors, _) = client(addr, "sensors", &[]).await;
        let readings = [
            ("kitchen", "20"),
            ("hall", "25"),
            ("kitchen", "21"),
            ("hall", "35"), // hall avg 30.0: not above
            ("kitchen", "22"),
            ("hall", "40"), // hall avg (25+35+40)/3 = 33.3: alert
            ("hall", "41"), // still above: no second alert
            ("kitchen", "not a number"),
        ];
        for (sensor, t) in readings {
            sensors
                .publish(
                    format!("sensors/{sensor}/temperature"),
                    QoS::AtLeastOnce,
                    false,
                    t,
                )
                .await
                .unwrap();
        }
        assert_eq!(
            next(&mut alerts).await,
            ("alerts/hall".into(), "33.3".into())
        );
        let more = tokio::time::timeout(Duration::from_millis(700), alerts.recv()).await;
        assert!(more.is_err(), "unexpected alert {more:?}");

        // Falls back below, crosses again: a new alert.
        for t in ["10", "10", "10", "50", "50"] {
            sensors
                .publish("sensors/hall/temperature", QoS::AtLeastOnce, false, t)
                .await
                .unwrap();
        }
        assert_eq!(
            next(&mut alerts).await,
            ("alerts/hall".into(), "36.7".into())
        );
        node.stop().await;
    });
}

#[test]
fn auth_hook_example_admits_only_signed_client_ids() {
    let dir = tempfile::tempdir().unwrap();
    let secret = b"s3cret";
    actix_rt::System::new().block_on(async {
        let node = auth_hook::start(dir.path(), secret).await.unwrap();
        let addr = node.mqtt_addr().unwrap();
        let good = auth_hook::password_for(secret, "dev-1");
        auth_hook::try_connect(addr, "dev-1", &good).await.unwrap();
        // Another device's signature, a wrong secret, and garbage are refused.
        let refused = |r: Result<(), ConnectionError>| {
            matches!(
                r,
                Err(ConnectionError::ConnectionRefused(
                    ConnectReturnCode::BadUserNamePassword
                ))
            )
        };
        assert!(refused(auth_hook::try_connect(addr, "dev-2", &good).await));
        let other = auth_hook::password_for(b"other", "dev-1");
        assert!(refused(auth_hook::try_connect(addr, "dev-1", &other).await));
        assert!(refused(
            auth_hook::try_connect(addr, "dev-1", "zz\u{e9}").await
        ));
        // A signed device publishes and receives through the hooked node.
        let (_sub, mut rx) = client_with_password(addr, "dev-3", secret, &["x/#"]).await;
        let (p, _) = client_with_password(addr, "dev-4", secret, &[]).await;
        p.publish("x/1", QoS::AtLeastOnce, false, "ok")
            .await
            .unwrap();
        assert_eq!(next(&mut rx).await, ("x/1".into(), "ok".into()));
        node.stop().await;
    });
}

async fn client_with_password(
    addr: SocketAddr,
    id: &str,
    secret: &[u8],
    subscribe: &[&str],
) -> (AsyncClient, mpsc::UnboundedReceiver<(String, String)>) {
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_credentials("device", auth_hook::password_for(secret, id));
    let (c, mut events) = AsyncClient::new(opts, 64);
    for f in subscribe {
        c.subscribe(*f, QoS::AtLeastOnce).await.unwrap();
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let mut acks = subscribe.len();
    actix_rt::spawn(async move {
        while let Ok(e) = events.poll().await {
            match e {
                Event::Incoming(Packet::ConnAck(_)) if acks == 0 => {
                    let _ = ready_tx.send(());
                }
                Event::Incoming(Packet::SubAck(_)) => {
                    acks -= 1;
                    if acks == 0 {
                        let _ = ready_tx.send(());
                    }
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let payload = String::from_utf8_lossy(&p.payload).into_owned();
                    let _ = tx.send((p.topic.clone(), payload));
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(5), ready_rx.recv())
        .await
        .expect("connected in time");
    (c, rx)
}
