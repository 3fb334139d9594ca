//! The service protocol over TLS (`[listener.service]` with `cert_file` and
//! `key_file`), through real sockets: a round trip with a password login, plaintext
//! and stalled clients on the TLS port, mutual TLS with `cn_as_username`, and the
//! configuration errors. Certificates are made at run time with rcgen
//! (`tests/transport/mod.rs`: a test CA, a server certificate for 127.0.0.1 and
//! localhost, a client certificate with CN `device-42`).

mod transport;

use std::sync::Arc;
use std::time::{Duration, Instant};

use actimq::auth::password::hash_password;
use actimq::client::{
    message, ClientError, Consumer, ConsumerOptions, Credentials, ErrorCode, ProduceMessageExt,
    Producer, ProducerOptions, TlsOptions,
};
use actimq::config::AclDefault;
use actimq::testing::TestNode;
use actimq::Config;
use actimq_actors::service::protocol::{
    decode_body, encode_frame, ProduceMessage, Props, Request, Response, Target,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use transport::{Certs, WAIT};

/// The CN of the test client certificate.
const CN: &str = "device-42";

/// Turn TLS on for the service listener (`mtls`: client certificates from our CA
/// required, their CN the user name).
fn service_tls(c: &mut Config, certs: &Certs, mtls: bool) {
    c.listener.service.cert_file = Some(certs.cert_file.clone());
    c.listener.service.key_file = Some(certs.key_file.clone());
    c.listener.service.ca_file = mtls.then(|| certs.ca_file.clone());
    c.listener.service.cn_as_username = mtls;
}

/// A node with user alice (password `wonderland`), no anonymous clients, no blocking
/// of addresses, the ACL `acl` (with `acl_default = "deny"`) when given, and the
/// service listener on TLS; `tweak` changes the rest.
fn start(
    certs: &Certs,
    mtls: bool,
    acl: Option<&str>,
    tweak: impl FnOnce(&mut Config),
) -> (tempfile::TempDir, TestNode) {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("passwd");
    let line = format!("alice:{}\n", hash_password(b"wonderland").unwrap());
    std::fs::write(&pw, line).unwrap();
    let acl_file = acl.map(|text| {
        let f = dir.path().join("acl");
        std::fs::write(&f, text).unwrap();
        f
    });
    let node = TestNode::start(&dir.path().join("data"), |c| {
        c.auth.password_file = pw;
        c.auth.allow_anonymous = false;
        c.auth.max_failures = 0;
        if let Some(f) = acl_file {
            c.auth.acl_file = f;
            c.auth.acl_default = AclDefault::Deny;
        }
        service_tls(c, certs, mtls);
        tweak(c);
    });
    (dir, node)
}

/// The client's TLS settings: trust the test CA, expect a certificate for 127.0.0.1.
fn tls(certs: &Certs) -> TlsOptions {
    TlsOptions::new(&certs.ca_pem, "127.0.0.1").unwrap()
}

/// [`tls`] presenting the client certificate (CN `device-42`).
fn mtls(certs: &Certs) -> TlsOptions {
    tls(certs)
        .client_cert(&certs.client_cert_pem, &certs.client_key_pem)
        .unwrap()
}

fn alice() -> Credentials {
    Credentials::new("alice", "wonderland")
}

/// The error code of a refused client call.
fn code<T>(r: Result<T, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Server { code, .. }) => code,
        Err(e) => panic!("expected a server error, got {e}"),
        Ok(_) => panic!("expected a server error, got success"),
    }
}

/// A connected TLS producer, within [`WAIT`].
async fn producer(addr: std::net::SocketAddr, opts: ProducerOptions) -> Producer {
    tokio::time::timeout(WAIT, Producer::connect_with(addr, opts))
        .await
        .expect("connected in time")
        .expect("connected")
}

/// Read until the peer closes (or `WAIT` passes: a failure); what was read.
async fn read_to_close<S: AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the connection was not closed within {WAIT:?}"),
        }
    }
}

#[tokio::test]
async fn produce_and_consume_over_tls_with_a_password() {
    let certs = Certs::generate();
    let (_dir, node) = start(&certs, false, None, |_| {});
    let addr = node.service_addr();

    let opts = ProducerOptions::new("billing")
        .credentials(alice())
        .tls(tls(&certs));
    let mut p = producer(addr, opts).await;
    let batch = (0..5)
        .map(|i| message("home/room1/cmd", format!("m{i}").into_bytes()).qos(1))
        .collect();
    let positions = p.send_batch(batch).await.unwrap();
    assert_eq!(positions.len(), 5);
    // Large enough to span many TLS records both ways.
    let big = vec![7u8; 300_000];
    p.send(message("home/big", big.clone()).qos(1))
        .await
        .unwrap();

    let opts = ConsumerOptions::new("g", "home")
        .credentials(alice())
        .tls(tls(&certs));
    let mut c = Consumer::connect_with(addr, opts).await.unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + WAIT;
    while got.len() < 6 && Instant::now() < deadline {
        let batch = c.poll(100, Duration::from_millis(500)).await.unwrap();
        c.commit(&batch).await.unwrap();
        got.extend(batch);
    }
    assert_eq!(got.len(), 6, "every message consumed over TLS");
    let mut small: Vec<_> = got
        .iter()
        .filter(|m| m.topic == "home/room1/cmd")
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    small.sort();
    assert_eq!(small, ["m0", "m1", "m2", "m3", "m4"]);
    assert!(got
        .iter()
        .any(|m| m.topic == "home/big" && m.payload == big));
    assert!(got.iter().all(|m| m.publisher == "billing"));

    // The login is still checked: a wrong password is refused over TLS too.
    let opts = ProducerOptions::new("billing")
        .credentials(Credentials::new("alice", "guess"))
        .tls(tls(&certs));
    assert_eq!(
        code(Producer::connect_with(addr, opts).await),
        ErrorCode::BadCredentials
    );
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_server_fails_at_once() {
    let certs = Certs::generate();
    let (_dir, node) = start(&certs, false, None, |_| {});
    let addr = node.service_addr();
    let other = Certs::generate();
    for (why, tls) in [
        (
            "a server name the certificate does not carry",
            TlsOptions::new(&certs.ca_pem, "broker.example.com").unwrap(),
        ),
        (
            "another CA",
            TlsOptions::new(&other.ca_pem, "127.0.0.1").unwrap(),
        ),
    ] {
        let t0 = Instant::now();
        let opts = ProducerOptions::new("p").credentials(alice()).tls(tls);
        match Producer::connect_with(addr, opts).await {
            Err(ClientError::Io { source, .. }) => {
                assert!(
                    source.to_string().contains("certificate"),
                    "{why}: {source}"
                )
            }
            Err(e) => panic!("{why}: expected a TLS failure, got {e}"),
            Ok(_) => panic!("{why}: connected"),
        }
        // A certificate error is not retried (retries take 5 s).
        assert!(t0.elapsed() < Duration::from_secs(2), "{why}: retried");
    }
    // Bad TLS settings are reported when they are made.
    for (r, what) in [
        (TlsOptions::new(b"not PEM", "127.0.0.1"), "CA"),
        (TlsOptions::new(&certs.ca_pem, "not a name!"), "server name"),
        (tls(&certs).client_cert(&certs.client_cert_pem, b""), "key"),
        (
            TlsOptions::from_ca_file("/nonexistent/ca.crt", "x"),
            "CA file",
        ),
    ] {
        match r {
            Err(ClientError::Tls(m)) => assert!(m.contains(what), "{m}"),
            other => panic!("expected a TLS setup error about {what}, got {other:?}"),
        }
    }
    // The node is unharmed.
    let opts = ProducerOptions::new("p")
        .credentials(alice())
        .tls(tls(&certs));
    producer(addr, opts)
        .await
        .send(message("home", vec![1]))
        .await
        .unwrap();
}

#[tokio::test]
async fn plaintext_on_the_tls_port_is_closed_and_others_are_served() {
    let certs = Certs::generate();
    let (_dir, node) = start(&certs, false, None, |_| {});
    let addr = node.service_addr();
    let opts = ProducerOptions::new("steady")
        .credentials(alice())
        .tls(tls(&certs));
    let mut steady = producer(addr, opts.clone()).await;

    // A service frame in clear: the TLS handshake fails, the connection is closed, and
    // nothing but (at most) a TLS alert comes back, never a service answer.
    let mut raw = TcpStream::connect(addr).await.unwrap();
    let hello = Request::Hello {
        id: 1,
        name: "plain".into(),
        username: Some("alice".into()),
        password: Some(b"wonderland".to_vec()),
    };
    raw.write_all(&encode_frame(&hello)).await.unwrap();
    let got = read_to_close(&mut raw).await;
    assert!(
        got.is_empty() || got[0] == 0x15,
        "only a TLS alert record may come back, got {:02x?}",
        &got[..got.len().min(16)]
    );

    // The Rust client without TLS recognises the TLS alert and gives up at once.
    let t0 = Instant::now();
    let plain = ProducerOptions::new("plain").credentials(alice());
    match Producer::connect_with(addr, plain).await {
        Err(ClientError::Io { source, .. }) => {
            assert!(source.to_string().contains("TLS"), "{source}")
        }
        Err(e) => panic!("expected a connection error, got {e}"),
        Ok(_) => panic!("a plaintext client was served on the TLS port"),
    }
    assert!(t0.elapsed() < Duration::from_secs(2), "retried");

    // Those on TLS go on, and new ones connect.
    steady
        .send(message("home/a", b"still".to_vec()))
        .await
        .unwrap();
    producer(addr, opts)
        .await
        .send(message("home/b", b"new".to_vec()))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_stalled_handshake_is_closed_after_the_connect_timeout() {
    let certs = Certs::generate();
    let (_dir, node) = start(&certs, false, None, |c| c.mqtt.connect_timeout_secs = 1);
    let addr = node.service_addr();

    // One sends nothing at all, one the first bytes of a ClientHello.
    let t0 = Instant::now();
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut partial = TcpStream::connect(addr).await.unwrap();
    partial.write_all(&[0x16, 0x03, 0x01, 0x00]).await.unwrap();

    // Meanwhile others are served.
    let opts = ProducerOptions::new("p")
        .credentials(alice())
        .tls(tls(&certs));
    let mut p = producer(addr, opts.clone()).await;
    p.send(message("home/x", vec![1])).await.unwrap();

    for s in [&mut silent, &mut partial] {
        let got = read_to_close(s).await;
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_millis(900),
            "closed before the timeout: {waited:?}"
        );
        assert!(got.is_empty() || got[0] == 0x15, "{got:02x?}");
    }
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());

    // The connection that finished its handshake is not affected by the timeout.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    p.send(message("home/x", vec![2])).await.unwrap();
    producer(addr, opts)
        .await
        .send(message("home/y", vec![3]))
        .await
        .unwrap();
}

/// A raw TLS connection presenting the client certificate, for requests the Rust
/// client does not send (no Hello).
async fn raw_mtls(
    certs: &Certs,
    addr: std::net::SocketAddr,
) -> impl AsyncRead + AsyncWrite + Unpin {
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&certs.ca_pem) {
        roots.add(ca.unwrap()).unwrap();
    }
    let chain = CertificateDer::pem_slice_iter(&certs.client_cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(&certs.client_key_pem).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap().to_owned();
    TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap()
}

/// Send `req` on `s` and read its answer.
async fn call<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, req: &Request) -> Response {
    s.write_all(&encode_frame(req)).await.unwrap();
    s.flush().await.unwrap();
    let len = tokio::time::timeout(WAIT, s.read_u32())
        .await
        .expect("an answer in time")
        .unwrap() as usize;
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await.unwrap();
    decode_body(&buf).unwrap()
}

#[tokio::test]
async fn mutual_tls_makes_the_certificate_cn_the_user() {
    let certs = Certs::generate();
    // Each user may use the first-level topic of its name, nothing else.
    let (_dir, node) = start(&certs, true, Some("pattern readwrite %u/#\n"), |_| {});
    let addr = node.service_addr();
    let own = format!("{CN}/status");

    // No password: the certificate is the login.
    let opts = ProducerOptions::new("svc").tls(mtls(&certs));
    let mut p = producer(addr, opts).await;
    p.send(message(own.clone(), b"up".to_vec()).qos(1))
        .await
        .unwrap();
    assert_eq!(
        code(p.send(message("alice/status", b"x".to_vec())).await),
        ErrorCode::NotAuthorized,
        "only the CN's own topic"
    );

    // A Hello's user name does not replace the CN, with or without a right password.
    for login in [alice(), Credentials::new("alice", "guess")] {
        let opts = ProducerOptions::new("svc")
            .credentials(login)
            .tls(mtls(&certs));
        let mut p = producer(addr, opts).await;
        assert_eq!(
            code(p.send(message("alice/status", b"x".to_vec())).await),
            ErrorCode::NotAuthorized
        );
        p.send(message(own.clone(), b"again".to_vec()))
            .await
            .unwrap();
    }

    // A consumer group on the CN's topic is allowed, on another not.
    let opts = ConsumerOptions::new("g", CN).tls(mtls(&certs));
    let mut c = Consumer::connect_with(addr, opts).await.unwrap();
    let mut n = 0;
    let deadline = Instant::now() + WAIT;
    while n < 3 && Instant::now() < deadline {
        let batch = c.poll(100, Duration::from_millis(500)).await.unwrap();
        assert!(batch.iter().all(|m| m.topic == own), "{batch:?}");
        n += batch.len();
    }
    assert_eq!(n, 3);
    let opts = ConsumerOptions::new("g", "alice").tls(mtls(&certs));
    assert_eq!(
        code(Consumer::connect_with(addr, opts).await),
        ErrorCode::NotAuthorized
    );

    // Without a Hello the connection is the CN too (anonymous clients are refused).
    let mut raw = raw_mtls(&certs, addr).await;
    let produce = |id, topic: &str| Request::Produce {
        id,
        messages: vec![ProduceMessage {
            target: Target::Topic(topic.into()),
            key: None,
            payload: b"raw".to_vec(),
            qos: 1,
            retain: false,
            props: Props::default(),
        }],
    };
    match call(&mut raw, &produce(1, &own)).await {
        Response::Produced { id: 1, positions } => assert_eq!(positions.len(), 1),
        other => panic!("expected Produced, got {other:?}"),
    }
    match call(&mut raw, &produce(2, "alice/x")).await {
        Response::Error { code, .. } => assert_eq!(code, ErrorCode::NotAuthorized),
        other => panic!("expected NotAuthorized, got {other:?}"),
    }

    // Without a client certificate the handshake is refused.
    let opts = ProducerOptions::new("nocert")
        .credentials(alice())
        .tls(tls(&certs));
    match tokio::time::timeout(WAIT, Producer::connect_with(addr, opts)).await {
        Ok(Err(ClientError::Io { .. })) => {}
        Ok(Err(e)) => panic!("expected a TLS failure, got {e}"),
        Ok(Ok(_)) => panic!("connected without a client certificate"),
        Err(_) => panic!("not refused in time"),
    }
}

/// The configuration errors of the service listener's TLS stop the node at start
/// and name the key or listener.
#[test]
fn tls_configuration_errors_stop_the_start() {
    let certs = Certs::generate();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let err = match TestNode::try_start(&data, |c| {
        c.listener.service.cert_file = Some(certs.cert_file.clone());
    }) {
        Err(e) => e,
        Ok(_) => panic!("started with a certificate but no key"),
    };
    assert!(err.contains("listener.service.key_file"), "{err}");

    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let err = match TestNode::try_start(&data, |c| {
        c.listener.service.cert_file = Some(empty.clone());
        c.listener.service.key_file = Some(certs.key_file.clone());
    }) {
        Err(e) => e,
        Ok(_) => panic!("started with an empty certificate file"),
    };
    assert!(
        err.contains("listener.service") && err.contains("empty.pem"),
        "{err}"
    );
}
