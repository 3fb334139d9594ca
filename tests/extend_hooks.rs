//! Issue #7: hooks registered on `NodeBuilder` are obeyed (CONNECT, PUBLISH, SUBSCRIBE,
//! will), a hook that never answers is skipped after its deadline per the failure
//! policy without slowing other clients, a panicking hook neither stops the node nor
//! leaks sessions, and event hooks see connects and every kind of disconnect.

mod common;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actimq::config::OnFailure;
use actimq::testing::test_config;
use actimq::{Node, NodeBuilder, NodeHandle};
use actimq_actors::mqtt::hooks::{
    Action, AuthDecision, Authenticate, Authorize, Decision, DisconnectReason, Event,
};
use actix::prelude::*;
use common::*;

/// Run `test` in an actix System, with a node configured by `tweak` and `hooks`.
fn with_node<F, Fut>(
    tweak: impl FnOnce(&mut actimq::Config),
    hooks: impl FnOnce(NodeBuilder) -> NodeBuilder,
    test: F,
) where
    F: FnOnce(NodeHandle) -> Fut,
    Fut: Future<Output = NodeHandle>,
{
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    tweak(&mut config);
    actix_rt::System::new().block_on(async move {
        let node = hooks(Node::builder(config)).start().await.unwrap();
        let node = test(node).await;
        node.stop().await;
    });
}

fn addr(node: &NodeHandle) -> std::net::SocketAddr {
    node.mqtt_addr().unwrap()
}

// ----------------------------------------------------------------------- the hooks

/// Refuses client `intruder`; no opinion on others.
struct Gatekeeper;
impl Actor for Gatekeeper {
    type Context = Context<Self>;
}
impl Handler<Authenticate> for Gatekeeper {
    type Result = AuthDecision;
    fn handle(&mut self, m: Authenticate, _: &mut Context<Self>) -> AuthDecision {
        if m.client_id == "intruder" {
            AuthDecision::Deny(0x87)
        } else {
            AuthDecision::Next
        }
    }
}

/// Denies publishing under `forbidden/` and subscribing under `secret/`; never
/// answers for client `slow`.
struct Acl;
impl Actor for Acl {
    type Context = Context<Self>;
}
impl Handler<Authorize> for Acl {
    type Result = ResponseFuture<Decision>;
    fn handle(&mut self, m: Authorize, _: &mut Context<Self>) -> Self::Result {
        if m.client_id == "slow" {
            return Box::pin(futures::future::pending());
        }
        let d = match &m.action {
            Action::Publish { topic, .. } if topic.starts_with("forbidden/") => Decision::Deny,
            Action::Subscribe { filter, .. } if filter.starts_with("secret/") => Decision::Deny,
            _ => Decision::Next,
        };
        Box::pin(async move { d })
    }
}

/// Panics on every call.
struct Crasher;
impl Actor for Crasher {
    type Context = Context<Self>;
}
impl Handler<Authenticate> for Crasher {
    type Result = AuthDecision;
    fn handle(&mut self, _: Authenticate, _: &mut Context<Self>) -> AuthDecision {
        panic!("hook bug (expected by the test)");
    }
}

/// Records every event.
struct Recorder(Arc<Mutex<Vec<Event>>>);
impl Actor for Recorder {
    type Context = Context<Self>;
}
impl Handler<Event> for Recorder {
    type Result = ();
    fn handle(&mut self, e: Event, _: &mut Context<Self>) {
        self.0.lock().unwrap().push(e);
    }
}

fn acl_hooks(b: NodeBuilder) -> NodeBuilder {
    b.authenticate(Gatekeeper.start().recipient())
        .authorize(Acl.start().recipient())
}

// ----------------------------------------------------------------------- the tests

#[test]
fn denying_hooks_are_obeyed_for_connect_publish_subscribe_and_will() {
    with_node(
        |_| {},
        acl_hooks,
        |node| async move {
            let a = addr(&node);
            // CONNECT: v5 gets the hook's code, 3.1.1 its mapping (0x87 -> 5).
            let (_c, ack) = Raw::connect(a, &ConnectOpts::v5("intruder", true)).await;
            assert_eq!(ack.code, 0x87);
            let (_c, ack) = Raw::connect(a, &ConnectOpts::v3("intruder", true)).await;
            assert_eq!(ack.code, 5);
            // A will on a forbidden topic refuses the CONNECT.
            let will = WillOpts {
                topic: "forbidden/will".into(),
                payload: b"bye".to_vec(),
                qos: 0,
                retain: false,
                props: Props::new(),
            };
            let (_c, ack) = Raw::connect(a, &ConnectOpts::v3("willer", true).will(will)).await;
            assert_eq!(ack.code, 5);

            // SUBSCRIBE: the denied filter fails, the other is granted.
            let (mut v5, _) = Raw::connect_ok(a, &ConnectOpts::v5("dev5", true)).await;
            v5.send(&subscribe_packet(
                true,
                1,
                &[("secret/x", 1), ("open/#", 1)],
                &Props::new(),
            ))
            .await;
            let (_, codes) = parse_sub_ack(&v5.expect(SUBACK).await, true);
            assert_eq!(codes, vec![0x87, 1]);
            let (mut v3, _) = Raw::connect_ok(a, &ConnectOpts::v3("dev3", true)).await;
            v3.send(&subscribe_packet(
                false,
                1,
                &[("secret/y", 0), ("forbidden/#", 1), ("open/#", 1)],
                &Props::new(),
            ))
            .await;
            let (_, codes) = parse_sub_ack(&v3.expect(SUBACK).await, false);
            assert_eq!(codes, vec![0x80, 1, 1]);

            // PUBLISH, v5: negative acknowledgements.
            let np = Props::new();
            v5.send(&publish_packet(
                true,
                "forbidden/a",
                1,
                false,
                false,
                2,
                &np,
                b"x",
            ))
            .await;
            assert_eq!(parse_ack(&v5.expect(PUBACK).await), (2, 0x87));
            v5.send(&publish_packet(
                true,
                "forbidden/b",
                2,
                false,
                false,
                3,
                &np,
                b"x",
            ))
            .await;
            assert_eq!(parse_ack(&v5.expect(PUBREC).await), (3, 0x87));
            // PUBLISH, 3.1.1: acknowledged and dropped (no negative PUBACK in 3.1.1).
            let (mut p3, _) = Raw::connect_ok(a, &ConnectOpts::v3("pub3", true)).await;
            p3.send(&publish_packet(
                false,
                "forbidden/c",
                1,
                false,
                false,
                4,
                &np,
                b"no",
            ))
            .await;
            assert_eq!(parse_ack(&p3.expect(PUBACK).await), (4, 0));
            p3.send(&publish_packet(
                false, "open/c", 1, false, false, 5, &np, b"yes",
            ))
            .await;
            assert_eq!(parse_ack(&p3.expect(PUBACK).await), (5, 0));
            // The subscriber of both sees only the allowed one.
            let got = v3.expect_publish().await;
            assert_eq!(
                (got.topic.as_str(), got.payload.as_slice()),
                ("open/c", &b"yes"[..])
            );
            assert!(v3.try_publish(QUIET).await.is_none());
            // The v5 client's denied publishes reached nobody either.
            let got = v5.expect_publish().await;
            assert_eq!(got.topic, "open/c");
            node
        },
    );
}

/// The slow client's SUBSCRIBE waits for the deadline; a second client meanwhile
/// connects, subscribes, publishes and receives promptly.
fn slow_hook(policy: OnFailure, expect_code: u8) {
    const DEADLINE: Duration = Duration::from_millis(1500);
    with_node(
        |c| {
            c.hooks.timeout_ms = DEADLINE.as_millis() as u64;
            c.hooks.on_failure = policy;
        },
        acl_hooks,
        |node| async move {
            let a = addr(&node);
            let (mut slow, _) = Raw::connect_ok(a, &ConnectOpts::v5("slow", true)).await;
            let t0 = Instant::now();
            slow.send(&subscribe_packet(true, 1, &[("t/slow", 1)], &Props::new()))
                .await;

            let (mut fast, _) = Raw::connect_ok(a, &ConnectOpts::v5("fast", true)).await;
            fast.send(&subscribe_packet(true, 1, &[("t/fast", 1)], &Props::new()))
                .await;
            fast.expect(SUBACK).await;
            let np = Props::new();
            fast.send(&publish_packet(
                true, "t/fast", 1, false, false, 2, &np, b"hi",
            ))
            .await;
            fast.expect(PUBACK).await;
            assert_eq!(fast.expect_publish().await.payload, b"hi");
            let fast_took = t0.elapsed();
            assert!(
                fast_took < DEADLINE / 2,
                "another client waited for the slow hook: {fast_took:?}"
            );
            assert!(
                slow.try_expect(SUBACK, Duration::ZERO).await.is_none(),
                "SUBACK before the deadline"
            );

            let (_, codes) = parse_sub_ack(&slow.expect(SUBACK).await, true);
            let slow_took = t0.elapsed();
            assert_eq!(codes, vec![expect_code]);
            assert!(
                slow_took >= DEADLINE - Duration::from_millis(100),
                "{slow_took:?}"
            );
            node
        },
    );
}

#[test]
fn a_hook_that_never_answers_is_denied_after_its_deadline() {
    slow_hook(OnFailure::Deny, 0x87);
}

#[test]
fn a_hook_that_never_answers_is_skipped_after_its_deadline_under_allow() {
    slow_hook(OnFailure::Allow, 1);
}

fn crasher_on_own_arbiter() -> Recipient<Authenticate> {
    let arbiter = Arbiter::new();
    let addr = Crasher::start_in_arbiter(&arbiter.handle(), |_| Crasher);
    addr.recipient()
}

async fn connections_drop_to_zero(node: &NodeHandle) {
    let deadline = Instant::now() + WAIT;
    loop {
        let n = node.gateway().connections().await;
        if n == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{n} connections left");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn a_panicking_hook_under_allow_neither_stops_the_node_nor_leaks_sessions() {
    with_node(
        |c| c.hooks.on_failure = OnFailure::Allow,
        |b| b.authenticate(crasher_on_own_arbiter()),
        |node| async move {
            let a = addr(&node);
            let mut clients = Vec::new();
            for i in 0..3 {
                let (c, ack) = Raw::connect(a, &ConnectOpts::v3(&format!("c{i}"), true)).await;
                assert_eq!(ack.code, 0, "client {i}");
                clients.push(c);
            }
            assert_eq!(node.gateway().connections().await, 3);
            for mut c in clients {
                c.send(&disconnect_packet(None)).await;
            }
            connections_drop_to_zero(&node).await;
            node
        },
    );
}

#[test]
fn a_panicking_hook_under_deny_refuses_and_leaks_nothing() {
    with_node(
        |c| c.hooks.on_failure = OnFailure::Deny,
        |b| b.authenticate(crasher_on_own_arbiter()),
        |node| async move {
            let a = addr(&node);
            for i in 0..3 {
                // 0x88 Server unavailable; 3.1.1 return code 3.
                let (_c, ack) = Raw::connect(a, &ConnectOpts::v3(&format!("d{i}"), true)).await;
                assert_eq!(ack.code, 3, "client {i}");
            }
            connections_drop_to_zero(&node).await;
            node
        },
    );
}

#[test]
fn event_hooks_see_connects_and_every_kind_of_disconnect() {
    let seen = Arc::new(Mutex::new(Vec::<Event>::new()));
    let rec = seen.clone();
    with_node(
        |_| {},
        move |b| b.events(Recorder(rec).start().recipient()),
        |node| {
            let seen = seen.clone();
            async move {
                let a = addr(&node);
                let wait_for = |what: &'static str, pred: Box<dyn Fn(&Event) -> bool>| {
                    let seen = seen.clone();
                    async move {
                        let deadline = Instant::now() + WAIT;
                        while !seen.lock().unwrap().iter().any(&pred) {
                            assert!(
                                Instant::now() < deadline,
                                "no {what} event; saw {:?}",
                                seen.lock().unwrap()
                            );
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                };
                let gone =
                    |id: &'static str, why: DisconnectReason| -> Box<dyn Fn(&Event) -> bool> {
                        Box::new(move |e| {
                            matches!(e, Event::ClientDisconnected { client_id, reason }
                            if client_id == id && *reason == why)
                        })
                    };

                // Connect, then take over.
                let (_first, _) = Raw::connect_ok(a, &ConnectOpts::v5("ev-a", false)).await;
                wait_for(
                    "connected",
                    Box::new(|e| {
                        matches!(e, Event::ClientConnected { client_id, protocol: 5,
                            session_present: false, .. } if client_id == "ev-a")
                    }),
                )
                .await;
                let (mut second, _) = Raw::connect_ok(a, &ConnectOpts::v3("ev-a", false)).await;
                wait_for("taken over", gone("ev-a", DisconnectReason::TakenOver)).await;
                wait_for(
                    "reconnected",
                    Box::new(|e| {
                        matches!(e, Event::ClientConnected { client_id, protocol: 4, .. }
                            if client_id == "ev-a")
                    }),
                )
                .await;

                // Subscribe, deliver, acknowledge.
                second
                    .send(&subscribe_packet(false, 1, &[("ev/t", 1)], &Props::new()))
                    .await;
                second.expect(SUBACK).await;
                wait_for(
                    "subscribed",
                    Box::new(|e| matches!(e, Event::Subscribed { filter, .. } if filter == "ev/t")),
                )
                .await;
                let (mut p, _) = Raw::connect_ok(a, &ConnectOpts::v3("ev-p", true)).await;
                let np = Props::new();
                p.send(&publish_packet(
                    false, "ev/t", 1, false, false, 1, &np, b"x",
                ))
                .await;
                let got = second.expect_publish().await;
                second.send(&ack_packet(PUBACK, got.pid)).await;
                wait_for(
                    "delivered",
                    Box::new(
                        |e| matches!(e, Event::MessageDelivered { topic, .. } if topic == "ev/t"),
                    ),
                )
                .await;
                wait_for(
                    "acked",
                    Box::new(|e| matches!(e, Event::MessageAcked { client_id, .. } if client_id == "ev-a")),
                )
                .await;

                // Normal DISCONNECT.
                second.send(&disconnect_packet(None)).await;
                wait_for("normal", gone("ev-a", DisconnectReason::Normal)).await;
                // Dropped without DISCONNECT.
                drop(p);
                wait_for("abnormal", gone("ev-p", DisconnectReason::Abnormal)).await;
                // Keep-alive timeout: 1 s, then silence (closed after 1.5 s, seen by
                // the next 1 s tick).
                let (_quiet, _) =
                    Raw::connect_ok(a, &ConnectOpts::v3("ev-k", true).keep_alive(1)).await;
                wait_for(
                    "keep-alive",
                    gone("ev-k", DisconnectReason::KeepAliveTimeout),
                )
                .await;
                node
            }
        },
    );
}

/// Rewrites `in/…` to `out/…` and drops payload `drop`.
struct Rewriter;
impl Actor for Rewriter {
    type Context = Context<Self>;
}
impl Handler<actimq_actors::mqtt::hooks::OnPublish> for Rewriter {
    type Result = actimq_actors::mqtt::hooks::PublishDecision;
    fn handle(
        &mut self,
        m: actimq_actors::mqtt::hooks::OnPublish,
        _: &mut Context<Self>,
    ) -> Self::Result {
        use actimq_actors::mqtt::hooks::PublishDecision;
        let mut msg = m.message;
        if &msg.payload[..] == b"drop" {
            return PublishDecision::Drop;
        }
        if let Some(rest) = msg.topic.strip_prefix("in/") {
            msg.topic = format!("out/{rest}");
        }
        PublishDecision::Continue(msg)
    }
}

#[test]
fn on_publish_rewrites_and_drops_and_session_expiry_is_an_event() {
    let seen = Arc::new(Mutex::new(Vec::<Event>::new()));
    let rec = seen.clone();
    with_node(
        |_| {},
        move |b| {
            b.on_publish(Rewriter.start().recipient())
                .events(Recorder(rec).start().recipient())
        },
        |node| async move {
            let a = addr(&node);
            let (mut sub, _) = Raw::connect_ok(a, &ConnectOpts::v3("sub", true)).await;
            sub.send(&subscribe_packet(
                false,
                1,
                &[("out/#", 0), ("in/#", 0)],
                &Props::new(),
            ))
            .await;
            sub.expect(SUBACK).await;
            let (mut p, _) = Raw::connect_ok(a, &ConnectOpts::v5("pub", true)).await;
            let np = Props::new();
            p.send(&publish_packet(
                true, "in/a", 1, false, false, 1, &np, b"drop",
            ))
            .await;
            assert_eq!(
                parse_ack(&p.expect(PUBACK).await),
                (1, 0),
                "dropped, yet acked"
            );
            p.send(&publish_packet(
                true, "in/a", 1, false, false, 2, &np, b"keep",
            ))
            .await;
            p.expect(PUBACK).await;
            let got = sub.expect_publish().await;
            assert_eq!(
                (got.topic.as_str(), &got.payload[..]),
                ("out/a", &b"keep"[..])
            );
            assert!(sub.try_publish(QUIET).await.is_none());

            // In-process publishes go through the interceptor too.
            let m = |payload: &'static str| actimq_actors::storage::Message {
                topic: "in/b".into(),
                payload: payload.into(),
                qos: 0,
                retain: false,
                publisher: "ext".into(),
                timestamp_ms: actimq_actors::now_ms(),
                props: Default::default(),
            };
            assert!(matches!(
                node.gateway().publish(m("drop")).await,
                Err(actimq_actors::mqtt::PublishError::Dropped)
            ));
            node.gateway().publish(m("in-process")).await.unwrap();
            let got = sub.expect_publish().await;
            assert_eq!(
                (got.topic.as_str(), &got.payload[..]),
                ("out/b", &b"in-process"[..])
            );

            // A persistent session with a 1 s expiry expires offline: an event.
            let opts = ConnectOpts::v5("short", true).props(Props::new().u32(0x11, 1));
            let (mut s, _) = Raw::connect_ok(a, &opts).await;
            s.send(&disconnect_packet(Some(0))).await;
            let deadline = Instant::now() + WAIT;
            while !seen
                .lock()
                .unwrap()
                .iter()
                .any(|e| matches!(e, Event::SessionExpired { client_id } if client_id == "short"))
            {
                assert!(Instant::now() < deadline, "no SessionExpired event");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            node
        },
    );
}
