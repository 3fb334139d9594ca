//! Service clients log in with the node's users, and the ACL covers what they produce
//! and consume: the same password and ACL hooks as MQTT, through real sockets.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actimq::auth::password::hash_password;
use actimq::client::{
    message, message_to_client, ClientError, Consumer, ConsumerOptions, Credentials, Delivered,
    ErrorCode, ProduceMessageExt, Producer, ProducerOptions,
};
use actimq::config::AclDefault;
use actimq::testing::{test_config, TestNode};
use actimq::Node;
use actimq_actors::mqtt::hooks::{AuthDecision, Authenticate, PROTOCOL_SERVICE};
use actimq_actors::service::protocol::{
    decode_body, encode_frame, ProduceMessage, Props, Request, Response, StartAt, Target,
    LEN_BYTES, OLDEST_VERSION,
};
use actix::prelude::*;
use common::{ConnectOpts, Raw, QUIET, V4, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Write a password file with `users` (name, password).
fn write_users(path: &Path, users: &[(&str, &str)]) {
    let mut text = String::from("# test users\n");
    for (u, p) in users {
        text.push_str(&format!("{u}:{}\n", hash_password(p.as_bytes()).unwrap()));
    }
    std::fs::write(path, text).unwrap();
}

/// A node whose data, password file (`users`) and ACL file (when given: with
/// `acl_default = "deny"`) live in a temp dir; `tweak` changes the rest.
fn start(
    users: &[(&str, &str)],
    acl: Option<&str>,
    tweak: impl FnOnce(&mut actimq::Config),
) -> (tempfile::TempDir, TestNode) {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("passwd");
    write_users(&pw, users);
    let acl_file = acl.map(|text| {
        let f = dir.path().join("acl");
        std::fs::write(&f, text).unwrap();
        f
    });
    let node = TestNode::start(&dir.path().join("data"), |c| {
        c.auth.password_file = pw;
        if let Some(f) = acl_file {
            c.auth.acl_file = f;
            c.auth.acl_default = AclDefault::Deny;
        }
        tweak(c);
    });
    (dir, node)
}

/// A node with user alice (password `wonderland`) that admits no anonymous clients
/// and never blocks an address.
fn login_required() -> (tempfile::TempDir, TestNode) {
    start(&[("alice", "wonderland")], None, |c| {
        c.auth.allow_anonymous = false;
        c.auth.max_failures = 0;
    })
}

fn producer_opts(name: &str, user: &str, password: &str) -> ProducerOptions {
    ProducerOptions::new(name).credentials(Credentials::new(user, password))
}

/// The error code of a refused client call.
fn code<T>(r: Result<T, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Server { code, .. }) => code,
        Err(e) => panic!("expected a server error, got {e}"),
        Ok(_) => panic!("expected a server error, got success"),
    }
}

fn hello(id: u64, name: &str, login: Option<(&str, &str)>) -> Request {
    Request::Hello {
        id,
        name: name.into(),
        username: login.map(|(u, _)| u.to_string()),
        password: login.map(|(_, p)| p.as_bytes().to_vec()),
    }
}

fn produce(id: u64, topics: &[&str]) -> Request {
    Request::Produce {
        id,
        messages: topics
            .iter()
            .map(|t| ProduceMessage {
                target: Target::Topic(t.to_string()),
                key: None,
                payload: b"raw".to_vec(),
                qos: 1,
                retain: false,
                props: Props::default(),
            })
            .collect(),
    }
}

fn join(id: u64, topic: &str) -> Request {
    Request::Join {
        id,
        group: "g".into(),
        topic: topic.into(),
        start: StartAt::Earliest,
    }
}

/// Read one frame: its version byte and response; `None` if the connection ended.
async fn read_versioned(s: &mut TcpStream) -> Option<(u8, Response)> {
    let len = tokio::time::timeout(WAIT, s.read_u32())
        .await
        .expect("a frame in time")
        .ok()? as usize;
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await.ok()?;
    let version = buf[0];
    // Decode the body as this version does (the error frame's body is the same).
    buf[0] = actimq_actors::service::protocol::VERSION;
    Some((version, decode_body(&buf).expect("a valid response")))
}

/// Send `req` and read its answer.
async fn call(s: &mut TcpStream, req: &Request) -> Response {
    s.write_all(&encode_frame(req)).await.unwrap();
    read_versioned(s).await.expect("an answer").1
}

/// The (id, code) of an error answer.
fn err(r: Response) -> (u64, ErrorCode) {
    match r {
        Response::Error { id, code, .. } => (id, code),
        other => panic!("expected an error, got {other:?}"),
    }
}

/// Whether the server closes `s` (nothing more to read) within [`WAIT`].
async fn closed(s: &mut TcpStream) -> bool {
    let mut rest = Vec::new();
    matches!(
        tokio::time::timeout(WAIT, s.read_to_end(&mut rest)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// Poll `c` until nothing arrives for a while; everything it got, committed.
async fn drain(c: &mut Consumer) -> Vec<Delivered> {
    let mut got = Vec::new();
    loop {
        let batch = c.poll(100, Duration::from_millis(500)).await.unwrap();
        if batch.is_empty() {
            return got;
        }
        c.commit(&batch).await.unwrap();
        got.extend(batch);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_refused_right_one_accepted_and_anonymous_refused() {
    let (_dir, node) = login_required();
    let a = node.service_addr();
    // Wrong password, unknown user, no credentials at all.
    let r = Producer::connect_with(a, producer_opts("p", "alice", "guess")).await;
    assert_eq!(code(r), ErrorCode::BadCredentials);
    let r = Producer::connect_with(a, producer_opts("p", "mallory", "guess")).await;
    assert_eq!(code(r), ErrorCode::BadCredentials);
    assert_eq!(
        code(Producer::connect(a, "p").await),
        ErrorCode::BadCredentials
    );
    let r = Consumer::connect(a, "g", "home").await;
    assert_eq!(code(r), ErrorCode::BadCredentials);

    // The right password: producer and consumer work.
    let login = Credentials::new("alice", "wonderland");
    let opts = ProducerOptions::new("alice-svc").credentials(login.clone());
    let mut p = Producer::connect_with(a, opts).await.unwrap();
    p.send(message("home/room1/cmd", b"on".to_vec()))
        .await
        .unwrap();
    let opts = ConsumerOptions::new("g", "home").credentials(login);
    let mut c = Consumer::connect_with(a, opts).await.unwrap();
    let got = drain(&mut c).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].publisher, "alice-svc");

    // On the wire: the refusal is one error frame, then the connection is closed.
    let mut s = TcpStream::connect(a).await.unwrap();
    let r = call(&mut s, &hello(3, "x", Some(("alice", "nope")))).await;
    assert_eq!(err(r), (3, ErrorCode::BadCredentials));
    assert!(closed(&mut s).await, "a refused login keeps the connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_before_hello_are_refused_when_a_login_is_required() {
    let (_dir, node) = login_required();
    let a = node.service_addr();
    let mut s = TcpStream::connect(a).await.unwrap();
    // Raw bytes of a Produce, before any Hello: refused, and the connection stays.
    let frame = encode_frame(&produce(5, &["home/x"]));
    s.write_all(&frame).await.unwrap();
    let (_, r) = read_versioned(&mut s).await.expect("an answer");
    assert_eq!(err(r), (5, ErrorCode::LoginRequired));
    assert_eq!(
        err(call(&mut s, &join(6, "home")).await),
        (6, ErrorCode::LoginRequired)
    );
    // Hello without credentials is a failed login: refused and closed.
    assert_eq!(
        err(call(&mut s, &hello(7, "svc", None)).await),
        (7, ErrorCode::BadCredentials)
    );
    assert!(closed(&mut s).await);

    // A good Hello after a refused request opens everything.
    let mut s = TcpStream::connect(a).await.unwrap();
    assert_eq!(
        err(call(&mut s, &produce(1, &["home/x"])).await),
        (1, ErrorCode::LoginRequired)
    );
    let ok = call(&mut s, &hello(2, "svc", Some(("alice", "wonderland")))).await;
    assert!(matches!(ok, Response::HelloOk { id: 2, .. }), "{ok:?}");
    let r = call(&mut s, &produce(3, &["home/x"])).await;
    assert!(matches!(r, Response::Produced { id: 3, .. }), "{r:?}");
    // One Hello per connection.
    assert_eq!(
        err(call(&mut s, &hello(4, "again", Some(("alice", "wonderland")))).await),
        (4, ErrorCode::Invalid)
    );

    // A version-1 client gets the version error in a frame it can read, then the end.
    let mut s = TcpStream::connect(a).await.unwrap();
    let mut f = encode_frame(&hello(1, "old", None));
    f[LEN_BYTES] = OLDEST_VERSION;
    s.write_all(&f).await.unwrap();
    let (version, r) = read_versioned(&mut s).await.expect("an answer");
    assert_eq!(version, OLDEST_VERSION);
    assert_eq!(err(r), (0, ErrorCode::UnsupportedVersion));
    assert!(closed(&mut s).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_services_are_admitted_when_allowed_but_bad_passwords_are_not() {
    let (_dir, node) = start(&[("alice", "wonderland")], None, |c| {
        c.auth.max_failures = 0;
    });
    assert!(actimq::Config::default().auth.allow_anonymous);
    let a = node.service_addr();
    let mut p = Producer::connect(a, "anon").await.unwrap();
    p.send(message("home/x", b"1".to_vec())).await.unwrap();
    // No Hello at all, as before credentials existed.
    let mut s = TcpStream::connect(a).await.unwrap();
    let r = call(&mut s, &produce(1, &["home/x"])).await;
    assert!(matches!(r, Response::Produced { id: 1, .. }), "{r:?}");
    // A Hello with a wrong password still fails, and closes.
    assert_eq!(
        err(call(&mut s, &hello(2, "svc", Some(("alice", "nope")))).await),
        (2, ErrorCode::BadCredentials)
    );
    assert!(closed(&mut s).await);
    let r = Producer::connect_with(a, producer_opts("p", "bob", "x")).await;
    assert_eq!(code(r), ErrorCode::BadCredentials);
    Producer::connect_with(a, producer_opts("p", "alice", "wonderland"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_service_logins_block_the_address_for_mqtt_too() {
    let (_dir, node) = start(&[("alice", "wonderland")], None, |c| {
        c.auth.max_failures = 3;
        c.auth.failure_window_secs = 60;
        c.auth.block_secs = 300;
    });
    let a = node.service_addr();
    for i in 0..3 {
        let r = Producer::connect_with(a, producer_opts("p", "alice", "guess")).await;
        assert_eq!(code(r), ErrorCode::BadCredentials, "attempt {i}");
    }
    // Blocked now: even the right password, and on the MQTT listener too.
    let good = producer_opts("p", "alice", "wonderland");
    assert_eq!(
        code(Producer::connect_with(a, good).await),
        ErrorCode::RateLimited
    );
    let mqtt = ConnectOpts::v5("dev", true).login("alice", "wonderland");
    assert_eq!(Raw::connect(node.mqtt_addr(), &mqtt).await.1.code, 0x9F);
}

const ACL: &str = "\
user alice
topic deny home/secret/#
topic readwrite home/#
topic read news/#
topic write $client/+/cmd
user carol
topic read #
pattern write svc/%u/#
pattern read %c/#
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_acl_covers_produce_and_join_with_user_and_client_patterns() {
    let users = [("alice", "a-pw"), ("carol", "c-pw")];
    let (_dir, node) = start(&users, Some(ACL), |c| c.auth.max_failures = 0);
    let a = node.service_addr();
    let mut alice = Producer::connect_with(a, producer_opts("alice-svc", "alice", "a-pw"))
        .await
        .unwrap();
    alice
        .send(message("home/room1/cmd", b"ok".to_vec()))
        .await
        .unwrap();
    // Refused: a deny rule, no rule (default deny), someone else's %u.
    for t in ["home/secret/x", "other/x", "svc/bob/x"] {
        let r = alice.send(message(t, b"no".to_vec())).await;
        assert_eq!(code(r), ErrorCode::NotAuthorized, "{t}");
    }
    // %u: her own.
    alice
        .send(message("svc/alice/x", b"mine".to_vec()))
        .await
        .unwrap();
    // One device: the rule is on the topic the message is stored on.
    alice
        .send(message_to_client("dev-1", "cmd", b"c".to_vec()))
        .await
        .unwrap();
    let r = alice
        .send(message_to_client("dev-1", "other", b"c".to_vec()))
        .await;
    assert_eq!(code(r), ErrorCode::NotAuthorized);
    // A batch with one refused message stores nothing.
    let mixed = vec![
        message("home/batch", b"never".to_vec()),
        message("other/x", b"never".to_vec()),
    ];
    assert_eq!(
        code(alice.send_batch(mixed).await),
        ErrorCode::NotAuthorized
    );

    // Join: `{topic}/#` must be granted. home/secret/# is denied, so home is too;
    // news is readable; %c grants the first-level topic named like the service.
    let alice_login = Credentials::new("alice", "a-pw");
    let consumer = |group: &str, topic: &str, name: &str, login: &Credentials| {
        ConsumerOptions::new(group, topic)
            .name(name)
            .credentials(login.clone())
    };
    let r = Consumer::connect_with(a, consumer("g1", "home", "alice-c", &alice_login)).await;
    assert_eq!(code(r), ErrorCode::NotAuthorized);
    Consumer::connect_with(a, consumer("g1", "news", "alice-c", &alice_login))
        .await
        .unwrap();
    Consumer::connect_with(a, consumer("g1", "reports", "reports", &alice_login))
        .await
        .unwrap();
    let r = Consumer::connect_with(a, consumer("g1", "billing", "reports", &alice_login)).await;
    assert_eq!(code(r), ErrorCode::NotAuthorized);

    // carol reads home: exactly the allowed message, not the refused batch.
    let carol = Credentials::new("carol", "c-pw");
    let mut c = Consumer::connect_with(a, consumer("g2", "home", "carol-c", &carol))
        .await
        .unwrap();
    let got: Vec<_> = drain(&mut c)
        .await
        .into_iter()
        .map(|m| (m.topic, m.payload))
        .collect();
    assert_eq!(got, vec![("home/room1/cmd".to_string(), b"ok".to_vec())]);

    // A denial answers that request only: the same connection goes on.
    let mut s = TcpStream::connect(a).await.unwrap();
    let ok = call(&mut s, &hello(1, "raw", Some(("alice", "a-pw")))).await;
    assert!(matches!(ok, Response::HelloOk { .. }), "{ok:?}");
    assert_eq!(
        err(call(&mut s, &produce(2, &["other/x"])).await),
        (2, ErrorCode::NotAuthorized)
    );
    assert_eq!(
        err(call(&mut s, &join(3, "home")).await),
        (3, ErrorCode::NotAuthorized)
    );
    let r = call(&mut s, &produce(4, &["home/raw"])).await;
    assert!(matches!(r, Response::Produced { id: 4, .. }), "{r:?}");
    let r = call(&mut s, &join(5, "news")).await;
    assert!(matches!(r, Response::Joined { id: 5, .. }), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorised_service_reaches_an_mqtt_subscriber() {
    let users = [("alice", "a-pw"), ("bob", "b-pw")];
    let acl = "user alice\ntopic write home/#\nuser bob\ntopic read home/#\n";
    let (_dir, node) = start(&users, Some(acl), |c| {
        c.auth.allow_anonymous = false;
        c.auth.max_failures = 0;
    });
    let mut o = common::v4_options(node.mqtt_addr(), "bob-dev", true);
    o.set_credentials("bob", "b-pw");
    let (mut bob, _) = V4::connect_with(o).await;
    let codes = bob.subscribe("home/#", rumqttc::QoS::AtLeastOnce).await;
    assert_eq!(
        codes,
        vec![rumqttc::SubscribeReasonCode::Success(
            rumqttc::QoS::AtLeastOnce
        )]
    );

    let a = node.service_addr();
    let mut alice = Producer::connect_with(a, producer_opts("alice-svc", "alice", "a-pw"))
        .await
        .unwrap();
    alice
        .send(message("home/lamp", b"on".to_vec()).qos(1))
        .await
        .unwrap();
    let p = bob.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..], p.qos),
        ("home/lamp", &b"on"[..], rumqttc::QoS::AtLeastOnce)
    );
    // bob may not write home/#: his own service login is refused that produce.
    let mut b = Producer::connect_with(a, producer_opts("bob-svc", "bob", "b-pw"))
        .await
        .unwrap();
    let r = b.send(message("home/lamp", b"off".to_vec())).await;
    assert_eq!(code(r), ErrorCode::NotAuthorized);
    assert!(bob.try_publish(QUIET).await.is_none());
}

#[test]
fn reload_picks_up_new_users_and_rules_and_drops_denied_groups() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("passwd");
    let acl = dir.path().join("acl");
    write_users(&pw, &[("alice", "a-pw")]);
    std::fs::write(&acl, "user alice\ntopic readwrite a/#\n").unwrap();
    let mut config = test_config(&dir.path().join("data"));
    config.auth.password_file = pw.clone();
    config.auth.acl_file = acl.clone();
    config.auth.acl_default = AclDefault::Deny;
    config.auth.allow_anonymous = false;
    config.auth.max_failures = 0;
    actix_rt::System::new().block_on(async move {
        let node = Node::builder(config).start().await.unwrap();
        let a = node.service_addr().unwrap();
        let mut alice = Producer::connect_with(a, producer_opts("alice-svc", "alice", "a-pw"))
            .await
            .unwrap();
        let r = alice.send(message("b/x", b"1".to_vec())).await;
        assert_eq!(code(r), ErrorCode::NotAuthorized);
        alice.send(message("a/x", b"1".to_vec())).await.unwrap();
        let opts = ConsumerOptions::new("g", "a").credentials(Credentials::new("alice", "a-pw"));
        let mut reader = Consumer::connect_with(a, opts).await.unwrap();
        assert_eq!(drain(&mut reader).await.len(), 1);
        let bob = || producer_opts("bob-svc", "bob", "b-pw");
        assert_eq!(
            code(Producer::connect_with(a, bob()).await),
            ErrorCode::BadCredentials
        );

        write_users(&pw, &[("alice", "a-pw"), ("bob", "b-pw")]);
        std::fs::write(&acl, "user alice\ntopic write a/#\ntopic write b/#\n").unwrap();
        node.reload_auth().await.unwrap();
        Producer::connect_with(a, bob()).await.unwrap();
        // alice's connection stayed, and her next produce sees the new rule.
        alice.send(message("b/x", b"2".to_vec())).await.unwrap();
        alice.send(message("a/x", b"2".to_vec())).await.unwrap();
        // Her group on `a` is not readable any more: dropped before anything is
        // delivered, and joining again is refused.
        let r = reader.poll(10, Duration::from_millis(200)).await;
        assert_eq!(code(r), ErrorCode::NotMember);
        let r = reader.poll(10, Duration::from_millis(200)).await;
        assert_eq!(code(r), ErrorCode::NotAuthorized);
        node.stop().await;
    });
}

/// Records what it is asked, and never answers.
struct Silent(Arc<Mutex<Vec<Authenticate>>>);
impl Actor for Silent {
    type Context = Context<Self>;
}
impl Handler<Authenticate> for Silent {
    type Result = ResponseFuture<AuthDecision>;
    fn handle(&mut self, m: Authenticate, _: &mut Context<Self>) -> Self::Result {
        self.0.lock().unwrap().push(m);
        Box::pin(futures::future::pending())
    }
}

#[test]
fn a_hook_that_does_not_answer_follows_the_deadline_and_failure_policy() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.hooks.timeout_ms = 200;
    let asked = Arc::new(Mutex::new(Vec::new()));
    let seen = asked.clone();
    actix_rt::System::new().block_on(async move {
        let node = Node::builder(config)
            .authenticate(Silent(seen).start().recipient())
            .start()
            .await
            .unwrap();
        let a: SocketAddr = node.service_addr().unwrap();
        let opts = producer_opts("svc-1", "alice", "pw");
        let t = std::time::Instant::now();
        assert_eq!(
            code(Producer::connect_with(a, opts).await),
            ErrorCode::Unavailable
        );
        assert!(t.elapsed() < Duration::from_secs(3));
        node.stop().await;
    });
    let asked = asked.lock().unwrap();
    let m = asked.first().expect("the hook was asked");
    assert_eq!(m.protocol, PROTOCOL_SERVICE);
    assert_eq!(m.client_id, "svc-1");
    assert_eq!(m.username.as_deref(), Some("alice"));
    assert_eq!(m.password.as_deref(), Some(&b"pw"[..]));
    assert!(m.peer.ip().is_loopback());
}
