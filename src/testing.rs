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

use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc;
use std::thread;

use slog::{o, Drain};

use crate::config::Config;
use crate::logging::parse_level;
use crate::node::Node;

/// A node running on its own thread; stopped gracefully by [`TestNode::stop`] or drop.
pub struct TestNode {
    /// Where the node's MQTT TCP listener is bound.
    mqtt_addr: SocketAddr,
    /// Tells the node's thread to stop the node; `None` once sent.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// The node's thread, joined on stop so that its files are closed afterwards.
    thread: Option<thread::JoinHandle<()>>,
}

impl TestNode {
    /// Start a node whose data lives in `dir`, listening on `127.0.0.1:0` (TCP only,
    /// two IO threads), after `tweak` has changed whatever the test needs.
    ///
    /// Panics if the node does not start: this is a test helper.
    pub fn start(dir: &Path, tweak: impl FnOnce(&mut Config)) -> TestNode {
        let mut config = Config::default();
        config.node.name = "test".into();
        config.node.data_dir = dir.to_path_buf();
        config.node.io_threads = 2;
        config.listener.tcp.enabled = true;
        config.listener.tcp.bind = SocketAddr::from(([127, 0, 0, 1], 0));
        config.listener.ws.enabled = false;
        tweak(&mut config);

        let (ready_tx, ready_rx) = mpsc::channel::<Result<SocketAddr, String>>();
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
                        Some(addr) => {
                            let _ = ready_tx.send(Ok(addr));
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
            Ok(Ok(mqtt_addr)) => TestNode {
                mqtt_addr,
                stop: Some(stop_tx),
                thread: Some(thread),
            },
            Ok(Err(e)) => {
                let _ = thread.join();
                panic!("test node did not start: {e}");
            }
            Err(_) => {
                let why = match thread.join() {
                    Err(p) => panic_message(&p),
                    Ok(()) => "its thread ended".into(),
                };
                panic!("test node did not start: {why}");
            }
        }
    }

    /// The node's MQTT TCP address (127.0.0.1 and a free port).
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
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
