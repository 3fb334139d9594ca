//! Interoperability with the mosquitto command-line clients (Debian
//! `mosquitto-clients`). Each test skips, with a note, when they are not installed.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use tokio::process::Command;

fn host_port(addr: SocketAddr) -> [String; 4] {
    [
        "-h".into(),
        addr.ip().to_string(),
        "-p".into(),
        addr.port().to_string(),
    ]
}

async fn mosquitto_pub(addr: SocketAddr, args: &[&str]) {
    let status = Command::new("mosquitto_pub")
        .args(host_port(addr))
        .args(args)
        .stdout(Stdio::null())
        .status()
        .await
        .expect("run mosquitto_pub");
    assert!(status.success(), "mosquitto_pub {args:?}: {status}");
}

/// Run `mosquitto_sub -C 1 <args>` and publish with `mosquitto_pub <pub_args>` until
/// it has received one message (we cannot see when its SUBSCRIBE is done); returns
/// what it printed.
async fn sub_one(addr: SocketAddr, sub_args: &[&str], pub_args: Option<&[&str]>) -> String {
    let child = Command::new("mosquitto_sub")
        .args(host_port(addr))
        .args(["-C", "1", "-W", "20"])
        .args(sub_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run mosquitto_sub");
    let out = child.wait_with_output();
    tokio::pin!(out);
    let out = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            tokio::select! {
                out = &mut out => return out.expect("mosquitto_sub output"),
                _ = tokio::time::sleep(Duration::from_millis(300)) => {
                    if let Some(args) = pub_args {
                        mosquitto_pub(addr, args).await;
                    }
                }
            }
        }
    })
    .await
    .expect("mosquitto_sub received nothing within 20 s");
    assert!(
        out.status.success(),
        "mosquitto_sub failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn mosquitto_sub_receives_what_mosquitto_pub_sends() {
    if !have_mosquitto() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let got = sub_one(
        node.mqtt_addr(),
        &["-t", "mosq/t", "-q", "1"],
        Some(&["-t", "mosq/t", "-q", "1", "-m", "hello mosquitto"]),
    )
    .await;
    assert_eq!(got.trim_end(), "hello mosquitto");
}

#[tokio::test]
async fn mosquitto_pub_and_sub_speak_mqtt5() {
    if !have_mosquitto() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let got = sub_one(
        node.mqtt_addr(),
        &["-V", "mqttv5", "-t", "mosq5/#", "-q", "2", "-v"],
        Some(&[
            "-V",
            "mqttv5",
            "-t",
            "mosq5/a",
            "-q",
            "2",
            "-m",
            "v5 payload",
            "-D",
            "publish",
            "user-property",
            "k",
            "v",
        ]),
    )
    .await;
    assert_eq!(got.trim_end(), "mosq5/a v5 payload");
}

#[tokio::test]
async fn mosquitto_pub_v5_reaches_a_rumqttc_v4_subscriber() {
    if !have_mosquitto() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut sub, _) = V4::connect(addr, "mosq-r4", true).await;
    sub.subscribe("mosqx/t", rumqttc::QoS::ExactlyOnce).await;
    mosquitto_pub(
        addr,
        &["-V", "mqttv5", "-t", "mosqx/t", "-q", "2", "-m", "cross"],
    )
    .await;
    let p = sub.next_publish().await;
    assert_eq!(&p.payload[..], b"cross");
    assert_eq!(p.qos, rumqttc::QoS::ExactlyOnce);
}

#[tokio::test]
async fn mosquitto_retained_message_with_r() {
    if !have_mosquitto() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    mosquitto_pub(addr, &["-t", "mosqr/t", "-q", "1", "-r", "-m", "kept"]).await;
    // No publisher while subscribed: only the retained message can satisfy -C 1.
    let got = sub_one(addr, &["-t", "mosqr/t", "-q", "1", "-v"], None).await;
    assert_eq!(got.trim_end(), "mosqr/t kept");

    // Clear it with an empty retained payload (-n), at QoS 1: mosquitto_pub returns
    // after PUBACK, which the broker sends once the retained store has the deletion
    // (at QoS 0 nothing orders the clear before the check below).
    mosquitto_pub(addr, &["-t", "mosqr/t", "-q", "1", "-r", "-n"]).await;
    let (mut raw, _) = Raw::connect_ok(addr, &ConnectOpts::v3("mosqr-check", true)).await;
    raw.subscribe(1, &[("mosqr/t", 1)]).await;
    assert!(
        raw.try_publish(QUIET).await.is_none(),
        "retained message cleared"
    );
}
