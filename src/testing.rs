//! A node for tests: [`TestNode`] runs a whole node on its own thread with its own actix
//! `System`, so that a test on a plain tokio runtime (with rumqttc, or raw sockets) can
//! talk to it without knowing about actix.
//!
//! ```no_run
//! let dir = tempfile::tempdir().unwrap();
//! let node = actimq::testing::TestNode::start(dir.path(), |cfg| {
//!     cfg.mqtt.max_inflight = 8;
//! });
//! let addr = node.mqtt_addr(); // 127.0.0.1:<free port>
//! node.stop(); // graceful; dropping the node does the same
//! ```
//!
//! Set `ACTIMQ_TEST_LOG=debug` (or another level) to see the node's logs.
//!
//! This module is for tests only: its `expect`s fire on a test's own mistake (asking for
//! the address of a listener the test did not enable, or a node that could not start),
//! never on bytes from a socket or a file.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc;
use std::thread;

use slog::{o, Drain};

use crate::config::Config;
use crate::logging::parse_level;
use crate::node::{BoundAddrs, Node};

/// The configuration [`TestNode::start`] begins with: data in `dir`, two IO threads,
/// TCP, WebSocket and service listeners on `127.0.0.1:0`, TLS and WSS disabled. Also
/// handy for in-process tests that start a [`Node`] themselves (to register hooks).
pub fn test_config(dir: &Path) -> Config {
    let mut config = Config::default();
    config.node.name = "test".into();
    config.node.data_dir = dir.to_path_buf();
    config.node.io_threads = 2;
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    config.listener.tcp.enabled = true;
    config.listener.tcp.bind = any;
    config.listener.ws.enabled = true;
    config.listener.ws.bind = any;
    config.listener.tls.enabled = false;
    config.listener.tls.bind = any;
    config.listener.wss.enabled = false;
    config.listener.wss.bind = any;
    config.listener.service.enabled = true;
    config.listener.service.bind = any;
    config
}

/// A node running on its own thread; stopped gracefully by [`TestNode::stop`] or drop.
pub struct TestNode {
    /// Where the node's MQTT TCP listener is bound.
    mqtt_addr: SocketAddr,
    /// Where every listener is bound.
    addrs: BoundAddrs,
    /// Tells the node's thread to stop the node; `None` once sent.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// The node's thread, joined on stop so that its files are closed afterwards.
    thread: Option<thread::JoinHandle<()>>,
}

impl TestNode {
    /// Start a node whose data lives in `dir`, with two IO threads and every listener
    /// bound to `127.0.0.1:0`: TCP, WebSocket and service enabled, TLS and WSS disabled (they
    /// need certificate files: a tweak that sets `cert_file`/`key_file` and `enabled`
    /// turns them on), after `tweak` has changed whatever the test needs.
    ///
    /// Panics if the node does not start: this is a test helper.
    pub fn start(dir: &Path, tweak: impl FnOnce(&mut Config)) -> TestNode {
        match Self::try_start(dir, tweak) {
            Ok(node) => node,
            Err(e) => panic!("test node did not start: {e}"),
        }
    }

    /// [`TestNode::start`], answering why the node did not start instead of panicking
    /// (for tests that bind a fixed port, which another process may hold for a moment).
    pub fn try_start(dir: &Path, tweak: impl FnOnce(&mut Config)) -> Result<TestNode, String> {
        let mut config = test_config(dir);
        tweak(&mut config);

        let (ready_tx, ready_rx) = mpsc::channel::<Result<BoundAddrs, String>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = thread::Builder::new()
            .name("actimq-test-node".into())
            .spawn(move || {
                let log = test_logger();
                actix_rt::System::new().block_on(async move {
                    let node = match Node::start(config, log).await {
                        Ok(node) => node,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                            return;
                        }
                    };
                    match node.mqtt_addr() {
                        Some(_) => {
                            let _ = ready_tx.send(Ok(node.addrs()));
                            // Stop when told, or when the TestNode is gone.
                            let _ = stop_rx.await;
                        }
                        None => {
                            let _ =
                                ready_tx.send(Err("the tweak disabled the TCP listener".into()));
                        }
                    }
                    node.stop().await;
                });
            })
            .expect("spawn the test node's thread");

        match ready_rx.recv() {
            Ok(Ok(addrs)) => Ok(TestNode {
                mqtt_addr: addrs.tcp.expect("checked by the node thread"),
                addrs,
                stop: Some(stop_tx),
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err(match thread.join() {
                Err(p) => panic_message(&p),
                Ok(()) => "its thread ended".into(),
            }),
        }
    }

    /// The node's MQTT TCP address (127.0.0.1 and a free port).
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
    }

    /// The WebSocket listener's address; panics if a tweak disabled it.
    pub fn ws_addr(&self) -> SocketAddr {
        self.addrs.ws.expect("the WebSocket listener is enabled")
    }

    /// The MQTT-over-TLS listener's address; panics unless a tweak enabled it.
    pub fn tls_addr(&self) -> SocketAddr {
        self.addrs
            .tls
            .expect("the TLS listener is enabled (by the tweak)")
    }

    /// The WebSocket-over-TLS listener's address; panics unless a tweak enabled it.
    pub fn wss_addr(&self) -> SocketAddr {
        self.addrs
            .wss
            .expect("the WSS listener is enabled (by the tweak)")
    }

    /// The service-protocol listener's address; panics if a tweak disabled it.
    pub fn service_addr(&self) -> SocketAddr {
        self.addrs.service.expect("the service listener is enabled")
    }

    /// Every listener's address (`None` for disabled ones).
    pub fn addrs(&self) -> BoundAddrs {
        self.addrs
    }

    /// Stop the node gracefully and wait until it has closed its files.
    /// Panics if the node's thread panicked.
    pub fn stop(mut self) {
        if let Err(p) = self.shutdown() {
            panic!("test node panicked: {}", panic_message(&p));
        }
    }

    fn shutdown(&mut self) -> thread::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take() {
            Some(t) => t.join(),
            None => Ok(()),
        }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        let joined = self.shutdown();
        // Report a node panic, unless the test is already failing.
        if let Err(p) = joined {
            if !thread::panicking() {
                panic!("test node panicked: {}", panic_message(&p));
            }
        }
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic)".into())
}

/// Discard logs, unless `ACTIMQ_TEST_LOG` names a level.
fn test_logger() -> slog::Logger {
    match std::env::var("ACTIMQ_TEST_LOG")
        .ok()
        .and_then(|l| parse_level(&l))
    {
        Some(level) => {
            let decorator = slog_term::PlainSyncDecorator::new(std::io::stderr());
            let drain = slog_term::FullFormat::new(decorator).build();
            let drain = slog::LevelFilter::new(drain, level).fuse();
            slog::Logger::root(drain, o!("node" => "test"))
        }
        None => slog::Logger::root(slog::Discard, o!()),
    }
}
