//! A running node: storage, the MQTT gateway, the IO arbiters and the listeners,
//! started in that order and stopped in the order that loses nothing.
//!
//! The node is a library: the binary only loads the [`Config`] and calls
//! [`Node::start`]; tests and embedders do the same (see [`crate::testing`]).
//!
//! Start: validate the config, start the built-in auth actors (`[auth]`: a bad password
//! or ACL file stops here), load TLS certificates, bind every listener (so that a taken
//! port fails before any file is touched), open storage, start the gateway (which restores persistent
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
use std::time::Duration;

use actimq_actors::mqtt::hooks::{Authenticate, Authorize, Event, Hooks, HooksBuilder, OnPublish};
use actimq_actors::mqtt::throttle::Rate;
use actimq_actors::mqtt::Gateway;
use actimq_actors::service::Service;
use actimq_actors::storage::{Storage, StorageError};
use actix::{Addr, Recipient};
use actix_rt::Arbiter;
use slog::{info, o, warn};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::auth::acl::AclAuth;
use crate::auth::password::{PasswordAuth, PasswordAuthConfig};
use crate::auth::Reload;
use crate::config::{AclDefault, Config, ConfigError};
use crate::listener::{IoArbiters, Listener, Transport};
use crate::tls::TlsError;
use crate::ws::WsSettings;

/// One listener to start: its name, address, cap and handshakes.
struct ListenerPlan {
    name: &'static str,
    addr: SocketAddr,
    max_connections: usize,
    max_connection_rate: u32,
    transport: Transport,
}

/// The enabled listeners of `config`, with TLS files loaded (so that a bad certificate
/// stops start-up before anything is bound or opened).
fn plan_listeners(config: &Config) -> Result<Vec<ListenerPlan>, NodeError> {
    let l = &config.listener;
    let max_frame = config.mqtt.max_packet_size as usize;
    let ws = |path: &str| {
        Arc::new(WsSettings {
            path: path.to_string(),
            max_frame,
        })
    };
    let acceptor = |listener: &'static str, files: &crate::config::TlsFiles| {
        crate::tls::acceptor(files).map_err(|source| NodeError::Tls { listener, source })
    };
    let mut plans = Vec::new();
    if l.tcp.enabled {
        plans.push(ListenerPlan {
            name: "tcp",
            addr: l.tcp.bind,
            max_connections: l.tcp.max_connections,
            max_connection_rate: l.tcp.max_connection_rate,
            transport: Transport::Tcp,
        });
    }
    if l.ws.enabled {
        plans.push(ListenerPlan {
            name: "ws",
            addr: l.ws.bind,
            max_connections: l.ws.max_connections,
            max_connection_rate: l.ws.max_connection_rate,
            transport: Transport::Ws(ws(&l.ws.path)),
        });
    }
    if let Some(files) = l.tls.files()? {
        plans.push(ListenerPlan {
            name: "tls",
            addr: l.tls.bind,
            max_connections: l.tls.max_connections,
            max_connection_rate: l.tls.max_connection_rate,
            transport: Transport::Tls {
                acceptor: acceptor("tls", &files)?,
                cn: files.cn_as_username,
            },
        });
    }
    if let Some(files) = l.wss.files()? {
        plans.push(ListenerPlan {
            name: "wss",
            addr: l.wss.bind,
            max_connections: l.wss.max_connections,
            max_connection_rate: l.wss.max_connection_rate,
            transport: Transport::Wss {
                acceptor: acceptor("wss", &files)?,
                cn: files.cn_as_username,
                ws: ws(&l.wss.path),
            },
        });
    }
    if l.service.enabled {
        // TLS only when it has a certificate: no plaintext on a TLS port.
        let transport = match l.service.files()? {
            Some(files) => Transport::ServiceTls {
                acceptor: acceptor("service", &files)?,
                cn: files.cn_as_username,
            },
            None => Transport::Service,
        };
        plans.push(ListenerPlan {
            name: "service",
            addr: l.service.bind,
            max_connections: l.service.max_connections,
            max_connection_rate: l.service.max_connection_rate,
            transport,
        });
    }
    Ok(plans)
}

/// Pending connections the kernel may queue per listener.
const LISTEN_BACKLOG: u32 = 4096;

/// Bind one listener; the error names it.
async fn bind(
    name: &'static str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), NodeError> {
    let err = |source| NodeError::Bind {
        listener: name,
        addr,
        source,
    };
    // A deep accept queue: devices reconnect in bursts (after a network blip, every one
    // at once), and a full queue makes the kernel drop SYNs, which clients retry only
    // after a second. The kernel caps this at net.core.somaxconn.
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    let listener = socket.listen(LISTEN_BACKLOG).map_err(err)?;
    let bound = listener.local_addr().map_err(err)?;
    Ok((listener, bound))
}

/// Where each listener really listens (ports are known only after binding).
#[derive(Clone, Copy, Debug, Default)]
pub struct BoundAddrs {
    /// `listener.tcp`.
    pub tcp: Option<SocketAddr>,
    /// `listener.ws`.
    pub ws: Option<SocketAddr>,
    /// `listener.tls`.
    pub tls: Option<SocketAddr>,
    /// `listener.wss`.
    pub wss: Option<SocketAddr>,
    /// `listener.service`.
    pub service: Option<SocketAddr>,
}

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
    /// A TLS listener's certificate, key or CA could not be loaded.
    #[error("cannot set up TLS for listener.{listener}: {source}")]
    Tls {
        /// Which listener: `tls`, `wss` or `service`.
        listener: &'static str,
        /// What was wrong (names the file).
        source: TlsError,
    },
    /// A listener could not bind its address (in use, or not ours).
    #[error("cannot listen on {addr} (listener.{listener}.bind): {source}")]
    Bind {
        /// Which listener: `tcp`, `ws`, `tls`, `wss` or `service`.
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
    /// The password or ACL file (`[auth]`) could not be read or parsed.
    #[error("cannot load auth.{key}: {problem}")]
    Auth {
        /// `password_file` or `acl_file`.
        key: &'static str,
        /// What was wrong (names the file and line).
        problem: String,
    },
}

/// The built-in auth actors a node started (see [`crate::auth`]).
#[derive(Clone, Default)]
struct AuthActors {
    password: Option<Addr<PasswordAuth>>,
    acl: Option<Addr<AclAuth>>,
}

/// Start the built-in hooks `config.auth` asks for: password authentication when a
/// password file is set or anonymous clients are refused; the ACL when an ACL file is
/// set or the default is deny.
fn start_auth(config: &Config, log: &slog::Logger) -> Result<AuthActors, NodeError> {
    let a = &config.auth;
    let mut actors = AuthActors::default();
    if a.password_path().is_some() || !a.allow_anonymous {
        let cfg = PasswordAuthConfig {
            allow_anonymous: a.allow_anonymous,
            password_file: a.password_path().map(PathBuf::from),
            max_failures: a.max_failures,
            failure_window: Duration::from_secs(a.failure_window_secs),
            block: Duration::from_secs(a.block_secs),
            verify_threads: a.verify_threads,
            verify_deadline: Duration::from_millis(config.hooks.timeout_ms),
        };
        let addr = PasswordAuth::start(cfg, log.new(o!("actor" => "password_auth"))).map_err(
            |problem| NodeError::Auth {
                key: "password_file",
                problem,
            },
        )?;
        actors.password = Some(addr);
    }
    if a.acl_path().is_some() || a.acl_default == AclDefault::Deny {
        let addr = AclAuth::start(
            a.acl_path().map(PathBuf::from),
            a.acl_default == AclDefault::Allow,
            log.new(o!("actor" => "acl")),
        )
        .map_err(|problem| NodeError::Auth {
            key: "acl_file",
            problem,
        })?;
        actors.acl = Some(addr);
    }
    Ok(actors)
}

/// Starts nodes. Extension points (hooks) are registered on [`NodeBuilder`].
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
        NodeBuilder {
            config,
            log: None,
            hooks: Hooks::builder(),
            authenticate: Vec::new(),
            authorize: Vec::new(),
        }
    }
}

/// Assembles a node; see [`Node::builder`].
pub struct NodeBuilder {
    /// What the node runs with.
    config: Config,
    /// Where it logs; `None` discards logs (handy in embedders that do not care).
    log: Option<slog::Logger>,
    /// Extension hooks, in registration order (on_publish and events).
    hooks: HooksBuilder,
    /// Authentication hooks, asked after the built-in one.
    authenticate: Vec<Recipient<Authenticate>>,
    /// Authorization hooks, asked after the built-in ACL.
    authorize: Vec<Recipient<Authorize>>,
}

impl NodeBuilder {
    /// Log to `log` (a child logger is made for each part of the node).
    pub fn logger(mut self, log: slog::Logger) -> NodeBuilder {
        self.log = Some(log);
        self
    }

    /// Ask `hook` on every CONNECT, before the client is registered (see
    /// `actimq_actors::mqtt::hooks`). Hooks of one kind run in registration order.
    /// The built-in password hook (`[auth]`), when enabled, is asked first.
    pub fn authenticate(mut self, hook: Recipient<Authenticate>) -> NodeBuilder {
        self.authenticate.push(hook);
        self
    }

    /// Ask `hook` about every PUBLISH (and will) and every SUBSCRIBE filter.
    /// The built-in ACL (`[auth]`), when enabled, is asked first.
    pub fn authorize(mut self, hook: Recipient<Authorize>) -> NodeBuilder {
        self.authorize.push(hook);
        self
    }

    /// Let `hook` change or drop every message before it is stored.
    pub fn on_publish(mut self, hook: Recipient<OnPublish>) -> NodeBuilder {
        self.hooks = self.hooks.on_publish(hook);
        self
    }

    /// Tell `hook` about connections, subscriptions, deliveries and expiries
    /// (fire-and-forget: dropped when its mailbox is full).
    pub fn events(mut self, hook: Recipient<Event>) -> NodeBuilder {
        self.hooks = self.hooks.events(hook);
        self
    }

    /// Start the node; see [`Node::start`].
    pub async fn start(self) -> Result<NodeHandle, NodeError> {
        let NodeBuilder {
            config,
            log,
            mut hooks,
            authenticate,
            authorize,
        } = self;
        let log = log.unwrap_or_else(|| slog::Logger::root(slog::Discard, o!()));
        config.validate()?;

        // A bad password or ACL file stops start-up before anything is bound or opened.
        // Built-in hooks go first: what they decide is final.
        let auth = start_auth(&config, &log)?;
        if let Some(a) = &auth.password {
            hooks = hooks.authenticate(a.clone().recipient());
        }
        for h in authenticate {
            hooks = hooks.authenticate(h);
        }
        if let Some(a) = &auth.acl {
            hooks = hooks.authorize(a.clone().recipient());
        }
        for h in authorize {
            hooks = hooks.authorize(h);
        }

        // Load certificates and bind first: a port in use or a bad certificate is the
        // commonest start-up failure, and it should not cost a storage recovery.
        let mut bound = Vec::new();
        for plan in plan_listeners(&config)? {
            let (listener, addr) = bind(plan.name, plan.addr).await?;
            bound.push((plan, listener, addr));
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
        let hooks = hooks.config(config.hooks_config()).build();
        let gateway = match Gateway::start_with_hooks(
            config.mqtt_config(),
            storage.clone(),
            hooks,
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

        let service = Service::start(
            config.service_config(),
            gateway.clone(),
            log.new(o!("part" => "service")),
        );

        let arbiters: Vec<Arbiter> = (0..config.io_threads()).map(|_| Arbiter::new()).collect();
        let io = Arc::new(IoArbiters::new(
            arbiters.iter().map(|a| a.handle()).collect(),
        ));

        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut accept_loops = Vec::new();
        let mut addrs = BoundAddrs::default();
        let handshake_timeout = Duration::from_secs(config.mqtt.connect_timeout_secs.max(1));
        // `listener.max_connections`: one pool of slots over every listener.
        let node_slots = Arc::new(Semaphore::new(config.listener.max_connections));
        for (plan, listener, addr) in bound {
            let listener = Listener {
                name: plan.name,
                transport: plan.transport,
                handshake_timeout,
                listener,
                slots: Arc::new(Semaphore::new(plan.max_connections)),
                node_slots: node_slots.clone(),
                rate: Rate::per_second(plan.max_connection_rate),
                io: io.clone(),
                gateway: gateway.clone(),
                service: service.clone(),
                log: log.new(o!("listener" => plan.name)),
                refused: 0,
            };
            // Tests and the CLI test read the real port from this line.
            let tls = matches!(
                listener.transport,
                Transport::Tls { .. } | Transport::Wss { .. } | Transport::ServiceTls { .. }
            );
            info!(log, "listening"; "listener" => listener.name, "addr" => %addr, "tls" => tls);
            accept_loops.push(actix_rt::spawn(listener.run(shutdown_rx.clone())));
            let slot = match plan.name {
                "tcp" => &mut addrs.tcp,
                "ws" => &mut addrs.ws,
                "tls" => &mut addrs.tls,
                "service" => &mut addrs.service,
                _ => &mut addrs.wss,
            };
            *slot = Some(addr);
        }
        info!(log, "node started";
            "data_dir" => %dir.display(), "io_threads" => arbiters.len(),
            "flush" => ?config.storage.flush);

        Ok(NodeHandle {
            storage,
            gateway,
            service,
            addrs,
            shutdown,
            accept_loops,
            arbiters,
            auth,
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
    /// The service gateway, to re-check its consumer groups after an ACL reload.
    service: Service,
    /// Where the listeners really listen (ports are known only after binding).
    addrs: BoundAddrs,
    /// Tells every accept loop to stop (also when dropped).
    shutdown: watch::Sender<bool>,
    /// The accept loops, awaited on stop so that no listener outlives the node.
    accept_loops: Vec<JoinHandle<()>>,
    /// The IO threads; stopped and joined on stop.
    arbiters: Vec<Arbiter>,
    /// The built-in password and ACL actors, for [`NodeHandle::reload_auth`].
    auth: AuthActors,
    /// The node's logger.
    log: slog::Logger,
}

impl NodeHandle {
    /// The address the MQTT TCP listener is bound to, or `None` if it is disabled.
    pub fn mqtt_addr(&self) -> Option<SocketAddr> {
        self.addrs.tcp
    }

    /// The address of the WebSocket listener, or `None` if it is disabled.
    pub fn ws_addr(&self) -> Option<SocketAddr> {
        self.addrs.ws
    }

    /// The address of the MQTT-over-TLS listener, or `None` if it is disabled.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.addrs.tls
    }

    /// The address of the WebSocket-over-TLS listener, or `None` if it is disabled.
    pub fn wss_addr(&self) -> Option<SocketAddr> {
        self.addrs.wss
    }

    /// The address of the service-protocol listener, or `None` if it is disabled.
    pub fn service_addr(&self) -> Option<SocketAddr> {
        self.addrs.service
    }

    /// Every listener's address.
    pub fn addrs(&self) -> BoundAddrs {
        self.addrs
    }

    /// The node's storage.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The node's MQTT gateway.
    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    /// Re-read the password and ACL files (what SIGHUP does), without touching any
    /// connection. A file that cannot be read or parsed keeps its old contents (and
    /// is logged); the error lists every file that failed.
    pub async fn reload_auth(&self) -> Result<(), String> {
        let mut errors = Vec::new();
        let mut note = |what: &str, r: Result<Result<usize, String>, actix::MailboxError>| match r {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => errors.push(e),
            Err(e) => errors.push(format!("{what}: {e}")),
        };
        if let Some(a) = &self.auth.password {
            note("password_file", a.send(Reload).await);
        }
        if let Some(a) = &self.auth.acl {
            let reloaded = a.send(Reload).await;
            if matches!(reloaded, Ok(Ok(_))) {
                // Subscriptions made under the old rules are checked under the new ones.
                self.gateway.reauthorize();
                self.service.reauthorize();
            }
            note("acl_file", reloaded);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
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
