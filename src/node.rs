//! A running node: storage, the MQTT gateway, the IO arbiters and the listeners,
//! started in that order and stopped in the order that loses nothing.
//!
//! The node is a library: the binary only loads the [`Config`] and calls
//! [`Node::start`]; tests and embedders do the same (see [`crate::testing`]).
//!
//! Start: validate the config, bind every listener (so that a taken port fails before
//! any file is touched), open storage, start the gateway (which restores persistent
//! sessions), start `io_threads` IO arbiters, and spawn one accept loop per listener on
//! the current arbiter.
//!
//! Stop ([`NodeHandle::stop`]): stop accepting and close the listeners; shut the
//! gateway down (sessions persist their state); stop and join the IO arbiters, so that
//! no connection can send storage more work; then shut storage down, which flushes,
//! fsyncs and closes the segments.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use actimq_actors::mqtt::Gateway;
use actimq_actors::storage::{Storage, StorageError};
use actix_rt::Arbiter;
use slog::{info, o, warn};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::config::{Config, ConfigError};
use crate::listener::{IoArbiters, Listener};

/// Why a node did not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The configuration is not valid (see [`Config::validate`]).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The data directory could not be created.
    #[error("cannot create data directory {dir}: {source}")]
    DataDir {
        /// `node.data_dir`.
        dir: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// A listener could not bind its address (in use, or not ours).
    #[error("cannot listen on {addr} (listener.{listener}.bind): {source}")]
    Bind {
        /// Which listener: `tcp` or `ws`.
        listener: &'static str,
        /// The configured address.
        addr: SocketAddr,
        /// What the OS said.
        source: io::Error,
    },
    /// Storage could not open or recover its files.
    #[error("cannot open storage in {dir}: {source}")]
    Storage {
        /// `node.data_dir`.
        dir: PathBuf,
        /// The storage engine's reason.
        source: StorageError,
    },
    /// The gateway could not load its state (retained messages, persistent sessions).
    #[error("cannot start the MQTT gateway: {0}")]
    Gateway(StorageError),
}

/// Starts nodes. Extension points (hooks) will be registered on [`NodeBuilder`].
pub struct Node;

impl Node {
    /// Start a node with `config`, logging to `log`. Must be called inside a running
    /// actix `System` (e.g. in `actix_rt::System::new().block_on(...)`); the accept
    /// loops run on the current arbiter.
    pub async fn start(config: Config, log: slog::Logger) -> Result<NodeHandle, NodeError> {
        Node::builder(config).logger(log).start().await
    }

    /// A builder, for settings beyond the config file.
    pub fn builder(config: Config) -> NodeBuilder {
        NodeBuilder { config, log: None }
    }
}

/// Assembles a node; see [`Node::builder`].
pub struct NodeBuilder {
    /// What the node runs with.
    config: Config,
    /// Where it logs; `None` discards logs (handy in embedders that do not care).
    log: Option<slog::Logger>,
}

impl NodeBuilder {
    /// Log to `log` (a child logger is made for each part of the node).
    pub fn logger(mut self, log: slog::Logger) -> NodeBuilder {
        self.log = Some(log);
        self
    }

    /// Start the node; see [`Node::start`].
    pub async fn start(self) -> Result<NodeHandle, NodeError> {
        let NodeBuilder { config, log } = self;
        let log = log.unwrap_or_else(|| slog::Logger::root(slog::Discard, o!()));
        config.validate()?;

        // Bind first: a port in use is the commonest start-up failure, and it should
        // not cost a storage recovery.
        let tcp = if config.listener.tcp.enabled {
            let addr = config.listener.tcp.bind;
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| NodeError::Bind {
                    listener: "tcp",
                    addr,
                    source,
                })?;
            let bound = listener.local_addr().map_err(|source| NodeError::Bind {
                listener: "tcp",
                addr,
                source,
            })?;
            Some((listener, bound))
        } else {
            None
        };
        if config.listener.ws.enabled {
            warn!(log, "the WebSocket listener is not implemented yet; [listener.ws] is ignored";
                "bind" => %config.listener.ws.bind);
        }

        let dir = config.node.data_dir.clone();
        std::fs::create_dir_all(&dir).map_err(|source| NodeError::DataDir {
            dir: dir.clone(),
            source,
        })?;
        let storage = Storage::open(config.storage_config(), log.new(o!("part" => "storage")))
            .await
            .map_err(|source| NodeError::Storage {
                dir: dir.clone(),
                source,
            })?;
        let gateway = match Gateway::start(
            config.mqtt_config(),
            storage.clone(),
            log.new(o!("part" => "mqtt")),
        )
        .await
        {
            Ok(g) => g,
            Err(e) => {
                storage.shutdown().await;
                return Err(NodeError::Gateway(e));
            }
        };

        let arbiters: Vec<Arbiter> = (0..config.io_threads()).map(|_| Arbiter::new()).collect();
        let io = Arc::new(IoArbiters::new(
            arbiters.iter().map(|a| a.handle()).collect(),
        ));

        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut accept_loops = Vec::new();
        let mut mqtt_addr = None;
        if let Some((listener, bound)) = tcp {
            let listener = Listener {
                name: "tcp",
                listener,
                slots: Arc::new(Semaphore::new(config.listener.tcp.max_connections)),
                io: io.clone(),
                gateway: gateway.clone(),
                log: log.new(o!("listener" => "tcp")),
                refused: 0,
            };
            // Tests and the CLI test read the real port from this line.
            info!(log, "listening"; "listener" => listener.name, "addr" => %bound);
            accept_loops.push(actix_rt::spawn(listener.run(shutdown_rx.clone())));
            mqtt_addr = Some(bound);
        }
        info!(log, "node started";
            "data_dir" => %dir.display(), "io_threads" => arbiters.len(),
            "flush" => ?config.storage.flush);

        Ok(NodeHandle {
            storage,
            gateway,
            mqtt_addr,
            shutdown,
            accept_loops,
            arbiters,
            log,
        })
    }
}

/// A running node. Stop it with [`NodeHandle::stop`]; dropping it only stops accepting
/// and stops the IO arbiters, without the orderly flush of storage.
pub struct NodeHandle {
    /// The storage layer, for in-process producers and consumers.
    storage: Storage,
    /// The MQTT gateway, for in-process users and to shut sessions down.
    gateway: Gateway,
    /// Where the TCP listener really listens (the port is known only after binding).
    mqtt_addr: Option<SocketAddr>,
    /// Tells every accept loop to stop (also when dropped).
    shutdown: watch::Sender<bool>,
    /// The accept loops, awaited on stop so that no listener outlives the node.
    accept_loops: Vec<JoinHandle<()>>,
    /// The IO threads; stopped and joined on stop.
    arbiters: Vec<Arbiter>,
    /// The node's logger.
    log: slog::Logger,
}

impl NodeHandle {
    /// The address the MQTT TCP listener is bound to, or `None` if it is disabled.
    pub fn mqtt_addr(&self) -> Option<SocketAddr> {
        self.mqtt_addr
    }

    /// The address of the WebSocket listener: always `None` until it is implemented.
    pub fn ws_addr(&self) -> Option<SocketAddr> {
        None
    }

    /// The node's storage.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The node's MQTT gateway.
    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    /// Stop gracefully: stop accepting, shut the gateway down, stop the IO arbiters
    /// (closing every connection), then flush, fsync and close storage.
    pub async fn stop(mut self) {
        info!(self.log, "stopping");
        let _ = self.shutdown.send(true);
        for accept in std::mem::take(&mut self.accept_loops) {
            let _ = accept.await;
        }
        self.gateway.shutdown().await;

        let arbiters = std::mem::take(&mut self.arbiters);
        for a in &arbiters {
            a.stop();
        }
        // Joining blocks until each thread has dropped its connections; do it off the
        // System's thread so that actors here keep running meanwhile.
        let joined = tokio::task::spawn_blocking(move || {
            arbiters
                .into_iter()
                .map(Arbiter::join)
                .filter(Result::is_err)
                .count()
        })
        .await;
        match joined {
            Ok(0) => {}
            Ok(n) => warn!(self.log, "IO arbiters panicked"; "count" => n),
            Err(e) => warn!(self.log, "joining IO arbiters failed"; "error" => %e),
        }

        self.storage.shutdown().await;
        info!(self.log, "stopped");
    }
}

impl Drop for NodeHandle {
    fn drop(&mut self) {
        // After stop() these are empty. Otherwise: the dropped `shutdown` sender stops
        // the accept loops, and this stops the IO threads (without joining them).
        for a in &self.arbiters {
            a.stop();
        }
    }
}
