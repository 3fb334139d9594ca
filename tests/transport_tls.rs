//! MQTT over TLS (MQTTS) and over WebSocket over TLS (WSS), with certificates made by
//! rcgen at test time: rumqttc (with rustls) for QoS 1, retained messages and wills on
//! both; TLS <-> TCP; mutual TLS (a client certificate from the configured CA is
//! required, its CN is readable); and handshakes that fail or never finish, which close
//! only their own connection; and the certificate CN as the user name for login and ACL.

mod transport;

use std::time::Duration;

use rumqttc::{LastWill, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use transport::*;

fn tls_and_wss(node: &actimq::testing::TestNode, certs: &Certs, client_cert: bool) -> [Via; 2] {
    [
        Via::Tls(node.tls_addr(), certs.client_tls(client_cert)),
        Via::Wss(node.wss_addr(), certs.client_tls(client_cert)),
    ]
}

#[tokio::test]
async fn qos1_retained_and_will_over_tls_and_wss() {
    let certs = Certs::generate();
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), Some(&certs), |_| {});
    for via in tls_and_wss(&node, &certs, false) {
        let name = via.name();
        let topic = format!("{name}/data");

        // QoS 1 both ways through one connection of this transport.
        let mut sub = Client::over(&via, &format!("{name}-sub"), None).await;
        sub.subscribe(&format!("{name}/#"), QoS::AtLeastOnce).await;
        let mut publ = Client::over(&via, &format!("{name}-pub"), None).await;
        for i in 0..10u32 {
            round_trip(
                &mut publ,
                &mut sub,
                &topic,
                format!("{name} {i}").as_bytes(),
            )
            .await;
        }
        round_trip(&mut publ, &mut sub, &topic, &vec![7u8; 100_000]).await;

        // Retained: a later subscriber of this transport gets it.
        publ.publish_acked(&format!("{name}/retained"), b"kept", true)
            .await;
        let p = sub.expect_publish().await;
        assert_eq!(&p.payload[..], b"kept");
        let mut late = Client::over(&via, &format!("{name}-late"), None).await;
        late.subscribe(&format!("{name}/retained"), QoS::AtLeastOnce)
            .await;
        let p = late.expect_publish().await;
        assert!(p.retain);
        assert_eq!(&p.payload[..], b"kept");

        // Will: a device of this transport that vanishes.
        let will = LastWill::new(format!("{name}/will"), "gone", QoS::AtLeastOnce, false);
        let device = Client::over(&via, &format!("{name}-device"), Some(will)).await;
        device.kill().await;
        let p = sub.expect_publish().await;
        assert_eq!(p.topic, format!("{name}/will"));
        assert_eq!(&p.payload[..], b"gone");
    }
}

#[tokio::test]
async fn tls_and_tcp_clients_exchange_messages() {
    let certs = Certs::generate();
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), Some(&certs), |_| {});
    let [tls, wss] = tls_and_wss(&node, &certs, false);
    let mut tcp_client = Client::over(&Via::Tcp(node.mqtt_addr()), "x-tcp", None).await;
    let mut tls_client = Client::over(&tls, "x-tls", None).await;
    let mut wss_client = Client::over(&wss, "x-wss", None).await;
    tcp_client.subscribe("x/to-tcp", QoS::AtLeastOnce).await;
    tls_client.subscribe("x/to-tls", QoS::AtLeastOnce).await;
    wss_client.subscribe("x/to-wss", QoS::AtLeastOnce).await;
    round_trip(&mut tcp_client, &mut tls_client, "x/to-tls", b"tcp->tls").await;
    round_trip(&mut tls_client, &mut wss_client, "x/to-wss", b"tls->wss").await;
    round_trip(&mut wss_client, &mut tcp_client, "x/to-tcp", b"wss->tcp").await;
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_from_the_ca() {
    let certs = Certs::generate();
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), None, |c| certs.enable(c, true));
    for via in tls_and_wss(&node, &certs, true) {
        let mut c = Client::over(&via, &format!("{}-mtls", via.name()), None).await;
        c.subscribe("mtls/#", QoS::AtLeastOnce).await;
        round_trip(
            &mut Client::over(&via, &format!("{}-mtls-pub", via.name()), None).await,
            &mut c,
            "mtls/x",
            b"ok",
        )
        .await;
    }
    for via in tls_and_wss(&node, &certs, false) {
        let result = Client::try_connect(via.options(&format!("{}-anon", via.name()))).await;
        assert!(
            result.is_err(),
            "{}: a client without certificate is refused",
            via.name()
        );
    }
    // The CN that cn_as_username will use (issue #6) is read from the certificate.
    assert_eq!(
        actimq::tls::common_name(&certs.client_cert_der).as_deref(),
        Some("device-42")
    );
}

/// Read until the server closes; panics if it does not within `within`.
async fn closed_within(tcp: &mut TcpStream, within: Duration) {
    let mut sink = Vec::new();
    match tokio::time::timeout(within, tcp.read_to_end(&mut sink)).await {
        Ok(_) => {}
        Err(_) => panic!("the server did not close the connection within {within:?}"),
    }
}

#[tokio::test]
async fn bad_and_stalled_handshakes_close_only_their_connection() {
    let certs = Certs::generate();
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), Some(&certs), |c| {
        c.mqtt.connect_timeout_secs = 1
    });
    let [tls, wss] = tls_and_wss(&node, &certs, false);
    let mut sub = Client::over(&tls, "bystander-sub", None).await;
    sub.subscribe("bystander", QoS::AtLeastOnce).await;
    let mut publ = Client::over(&wss, "bystander-pub", None).await;

    for addr in [node.tls_addr(), node.wss_addr()] {
        // Never starts the handshake: cut after mqtt.connect_timeout_secs.
        let started = std::time::Instant::now();
        let mut silent = TcpStream::connect(addr).await.unwrap();
        closed_within(&mut silent, Duration::from_secs(5)).await;
        assert!(started.elapsed() >= Duration::from_millis(800));

        // Plain MQTT (not TLS) to a TLS port: the handshake fails at once.
        let mut plain = TcpStream::connect(addr).await.unwrap();
        plain.write_all(&connect_packet("plain")).await.unwrap();
        closed_within(&mut plain, Duration::from_secs(5)).await;

        // A client that does not trust our certificate gives up in the handshake.
        let stranger = Certs::generate();
        let via = match addr == node.tls_addr() {
            true => Via::Tls(addr, stranger.client_tls(false)),
            false => Via::Wss(addr, stranger.client_tls(false)),
        };
        assert!(Client::try_connect(via.options("stranger")).await.is_err());
    }

    round_trip(&mut publ, &mut sub, "bystander", b"still here").await;
}

#[test]
fn tls_listener_needs_its_files_and_reports_bad_ones() {
    use actimq::Config;
    let mut c = Config::default();
    c.listener.tls.enabled = true;
    let err = c.validate().unwrap_err().to_string();
    assert!(err.contains("listener.tls.cert_file"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.crt");
    let result = std::panic::catch_unwind(|| {
        actimq::testing::TestNode::start(dir.path(), |c| {
            c.listener.tls.enabled = true;
            c.listener.tls.cert_file = Some(missing.clone());
            c.listener.tls.key_file = Some(missing.clone());
        })
    });
    let message = match result {
        Ok(_) => panic!("a node with a missing certificate file started"),
        Err(p) => p.downcast_ref::<String>().cloned().unwrap_or_default(),
    };
    assert!(message.contains("listener.tls"), "{message}");
    assert!(message.contains("nope.crt"), "{message}");
}

#[tokio::test]
async fn the_client_certificate_cn_logs_in_and_is_the_acl_username() {
    let certs = Certs::generate();
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("acl");
    std::fs::write(
        &acl,
        "pattern readwrite devices/%u/#\nuser admin\ntopic read #\n",
    )
    .unwrap();
    let passwd = dir.path().join("passwd");
    let hash = actimq::auth::password::hash_password(b"secret").unwrap();
    std::fs::write(&passwd, format!("admin:{hash}\n")).unwrap();
    let node = start(&dir.path().join("data"), None, |c| {
        certs.enable(c, true);
        c.auth.allow_anonymous = false;
        c.auth.password_file = passwd.clone();
        c.auth.acl_file = acl.clone();
        c.auth.acl_default = actimq::config::AclDefault::Deny;
    });
    // Plain TCP has no certificate: no credentials, no entry.
    let tcp = Via::Tcp(node.mqtt_addr());
    assert!(Client::try_connect(tcp.options("anonymous")).await.is_err());
    let mut o = tcp.options("admin");
    o.set_credentials("admin", "secret");
    let mut admin = Client::connect(o).await;
    admin.subscribe("devices/#", QoS::AtLeastOnce).await;

    for via in tls_and_wss(&node, &certs, true) {
        let name = via.name();
        // No user name or password in CONNECT: the certificate (CN device-42) logs in.
        let mut dev = Client::over(&via, &format!("{name}-dev"), None).await;
        dev.publish_acked("devices/device-42/temp", name.as_bytes(), false)
            .await;
        let got = admin.expect_publish().await;
        assert_eq!(got.topic, "devices/device-42/temp");
        assert_eq!(&got.payload[..], name.as_bytes());
        // `%u` is the CN: another device's topics are refused (3.1.1: acknowledged and
        // dropped).
        dev.publish_acked("devices/device-7/temp", b"spoofed", false)
            .await;
        assert!(admin.publish_within_quiet().await.is_none(), "{name}");
        // A user name in CONNECT does not override the certificate (Mosquitto's
        // use_identity_as_username): claiming to be admin gains nothing.
        let mut o = via.options(&format!("{name}-claims-admin"));
        o.set_credentials("admin", "wrong");
        let mut claimer = Client::connect(o).await;
        claimer
            .publish_acked("devices/device-7/temp", b"claimed", false)
            .await;
        claimer
            .publish_acked("devices/device-42/temp", b"as-cn", false)
            .await;
        let got = admin.expect_publish().await;
        assert_eq!(
            &got.payload[..],
            b"as-cn",
            "{name}: only the CN's topic passed"
        );
    }
}
