//! The node's configuration: what `conf/actimq.toml` says, as types.
//!
//! Layers, later ones winning:
//! 1. [`DEFAULT_TOML`], the text of `conf/actimq.toml` built into the binary. It holds
//!    every key, so it is the one place where defaults are written down;
//! 2. an optional file (`--config FILE`) holding only the keys it changes;
//! 3. environment variables `ACTIMQ__SECTION__KEY` (`__` between levels, because a
//!    single `_` is part of key names), e.g. `ACTIMQ__LISTENER__TCP__BIND`.
//!
//! Deserialising catches unknown keys and wrong types; [`Config::validate`] then
//! catches values that parse but make no sense (a segment of 0 bytes). Every error
//! names the key, so an operator can find the line to fix.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use actimq_actors::mqtt::MqttConfig;
use actimq_actors::service::protocol::HARD_MAX_FRAME;
use actimq_actors::service::ServiceConfig;
use actimq_actors::storage::record::HARD_MAX_RECORD_BYTES;
use actimq_actors::storage::{FlushMode, StorageConfig};
use serde::Deserialize;

/// The built-in default configuration: the same text as `conf/actimq.toml`.
pub const DEFAULT_TOML: &str = include_str!("../conf/actimq.toml");

/// Prefix of the environment variables that override the configuration.
pub const ENV_PREFIX: &str = "ACTIMQ";

/// The largest packet MQTT can express (the Remaining Length limit, 256 MiB - 1).
pub const MQTT_MAX_PACKET_SIZE: u32 = 268_435_455;

/// The smallest `storage.segment_bytes` (the engine would silently raise a smaller one).
pub const MIN_SEGMENT_BYTES: u64 = 4096;

/// The smallest `storage.max_record_bytes` (the engine would silently raise a smaller one).
pub const MIN_RECORD_BYTES: usize = 1024;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A layer could not be read or parsed, or a value had the wrong type or an unknown
    /// key; the `config` crate's message names the key and, for files, the file.
    #[error("{0}")]
    Load(#[from] ::config::ConfigError),
    /// A value parsed but is not allowed.
    #[error("invalid value for `{key}`: {problem}")]
    Invalid {
        /// Dotted path of the offending key, e.g. `storage.segment_bytes`.
        key: &'static str,
        /// What is wrong with it and what is allowed.
        problem: String,
    },
}

/// The whole configuration of a node, one field per section of `conf/actimq.toml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Identity, data directory and threads of the node.
    pub node: NodeSection,
    /// The storage engine (commitlog, indexes, retention).
    pub storage: StorageSection,
    /// The MQTT gateway's protocol limits.
    pub mqtt: MqttConfig,
    /// The service gateway (back-end producers and consumer groups).
    pub service: ServiceSection,
    /// Where clients connect.
    pub listener: ListenerSection,
    /// What is logged.
    pub log: LogSection,
    /// Extension hooks: their deadline and failure policy.
    pub hooks: HooksSection,
    /// Built-in authentication (password file) and ACL.
    pub auth: AuthSection,
}

/// `[auth]`: the built-in password and ACL hooks (see `crate::auth`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    /// Admit clients that send no user name (out-of-the-box start).
    pub allow_anonymous: bool,
    /// `user:$argon2id$...` lines; empty means none.
    pub password_file: PathBuf,
    /// Mosquitto-style ACL; empty means no rules.
    pub acl_file: PathBuf,
    /// What an action no ACL rule matches gets.
    pub acl_default: AclDefault,
    /// Failures per IP within the window that block it; 0 disables the limit.
    pub max_failures: u32,
    /// The window failures are counted in.
    pub failure_window_secs: u64,
    /// How long a blocked IP stays blocked.
    pub block_secs: u64,
    /// Password verification threads (argon2 runs off the IO threads).
    pub verify_threads: usize,
}

impl AuthSection {
    /// The password file, when one is configured.
    pub fn password_path(&self) -> Option<&Path> {
        (!self.password_file.as_os_str().is_empty()).then_some(self.password_file.as_path())
    }
    /// The ACL file, when one is configured.
    pub fn acl_path(&self) -> Option<&Path> {
        (!self.acl_file.as_os_str().is_empty()).then_some(self.acl_file.as_path())
    }
}

/// `auth.acl_default`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AclDefault {
    /// Allow what no rule matches.
    Allow,
    /// Deny what no rule matches.
    Deny,
}

impl<'de> Deserialize<'de> for AclDefault {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<AclDefault, D::Error> {
        match String::deserialize(d)?.as_str() {
            "allow" => Ok(AclDefault::Allow),
            "deny" => Ok(AclDefault::Deny),
            other => Err(serde::de::Error::custom(format!(
                "{other:?} is not an ACL default (\"allow\" or \"deny\")"
            ))),
        }
    }
}

/// `[hooks]`: how the gateway calls the hooks registered on `NodeBuilder`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HooksSection {
    /// Deadline of one hook call, so a stuck extension cannot hold a client forever.
    pub timeout_ms: u64,
    /// What a hook that timed out or whose actor is gone decides.
    pub on_failure: OnFailure,
}

/// `hooks.on_failure`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnFailure {
    /// Refuse the CONNECT, PUBLISH or SUBSCRIBE (and drop an intercepted message).
    Deny,
    /// Skip the failed hook, as if it had no opinion.
    Allow,
}

impl<'de> Deserialize<'de> for OnFailure {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<OnFailure, D::Error> {
        match String::deserialize(d)?.as_str() {
            "deny" => Ok(OnFailure::Deny),
            "allow" => Ok(OnFailure::Allow),
            other => Err(serde::de::Error::custom(format!(
                "{other:?} is not a failure policy (\"deny\" or \"allow\")"
            ))),
        }
    }
}

/// `[node]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// Tags every log line, so that the logs of several nodes can be told apart.
    pub name: String,
    /// Where storage keeps its files; the one piece of state a node owns on disk.
    pub data_dir: PathBuf,
    /// How many IO arbiters run connections; 0 means one per core (see
    /// [`Config::io_threads`]), so that the default fits the machine.
    pub io_threads: usize,
}

/// How acknowledged messages reach the disk (`storage.flush`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flush {
    /// fsync before the acknowledgement.
    Sync,
    /// fsync every `flush_interval_ms`.
    Async,
}

impl<'de> Deserialize<'de> for Flush {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Flush, D::Error> {
        // By hand, so that the error lists the choices (the config crate prefixes the
        // key to it).
        match String::deserialize(d)?.as_str() {
            "sync" => Ok(Flush::Sync),
            "async" => Ok(Flush::Async),
            other => Err(serde::de::Error::custom(format!(
                "{other:?} is not a flush mode (\"sync\" or \"async\")"
            ))),
        }
    }
}

/// Deserialises an `IP:port` address with an error that shows the bad value.
fn socket_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "{s:?} is not an IP:port address such as \"0.0.0.0:1883\""
        ))
    })
}

/// Whether two addresses with the same port would take the same socket: equal, or one
/// of them the wildcard of its family (which takes the port on every address).
fn clash(a: &SocketAddr, b: &SocketAddr) -> bool {
    a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified()
}

/// `[storage]`: every [`StorageConfig`] field but `dir` (which is `node.data_dir`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    /// Segment size at which the commitlog rolls; also the granularity of retention.
    pub segment_bytes: u64,
    /// Durability of an acknowledgement: the trade between latency and power-loss risk.
    pub flush: Flush,
    /// The fsync period of `async` mode, i.e. the window a power loss may lose.
    pub flush_interval_ms: u64,
    /// Age limit of sealed segments, in hours (operators think in hours, not seconds).
    #[serde(default)]
    pub retention_hours: Option<u64>,
    /// Size limit of the log, so that a busy node cannot fill its disk.
    #[serde(default)]
    pub retention_bytes: Option<u64>,
    /// Queue index actors; more shards spread index work over more mailboxes.
    pub index_shards: usize,
    /// Notifier actors; more shards spread arrival fan-out.
    pub notifier_shards: usize,
    /// Idle time after which a queue's index leaves memory, which bounds memory with
    /// many short-lived queues.
    pub queue_idle_secs: u64,
    /// Cap on open segment and index files, so that 100k queues do not need 100k fds.
    pub max_open_files: usize,
    /// Largest record accepted, so that one publish cannot exhaust memory.
    pub max_record_bytes: usize,
    /// Memory for decoded messages shared by fan-out readers: the largest fixed share
    /// of the node's memory, so operators size it.
    pub cache_bytes: usize,
}

/// `[service]`: the service gateway's limits and the partitioning of topics.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSection {
    /// Queues per first-level topic: the unit of ordering (per publisher) and of
    /// consumer-group parallelism.
    pub partitions: u32,
    /// Bounds the memory one service connection may use to buffer a frame.
    pub max_frame_bytes: usize,
    /// Bounds how long a Pull holds a request slot.
    pub max_pull_wait_ms: u32,
    /// Bounds the messages one Pull answers with.
    pub max_pull_messages: u32,
    /// Bounds the payload bytes one Pull answers with (at least one message).
    pub max_pull_bytes: usize,
}

/// `[listener]`: the sockets clients connect to.
///
/// The listener sections below repeat their common keys (bind, TLS files, limits)
/// instead of sharing a `#[serde(flatten)]`ed struct: serde does not support
/// `deny_unknown_fields` together with `flatten`, and a misspelt key must stop start-up.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSection {
    /// Connections over every listener together: one cap for the node's file
    /// descriptors and memory, whichever listeners the clients use.
    pub max_connections: usize,
    /// Plain MQTT over TCP (`[listener.tcp]`).
    pub tcp: TcpListenerSection,
    /// MQTT over WebSocket (`[listener.ws]`).
    pub ws: WsListenerSection,
    /// MQTT over TLS, "MQTTS" (`[listener.tls]`).
    pub tls: TlsListenerSection,
    /// MQTT over WebSocket over TLS (`[listener.wss]`).
    pub wss: WssListenerSection,
    /// The service protocol (`[listener.service]`), for back-end producers/consumers;
    /// plain TCP, or TLS when it has a certificate.
    pub service: ServiceListenerSection,
}

/// `[listener.tcp]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpListenerSection {
    /// Lets a node run without plain TCP (e.g. WebSocket only, or an embedded node).
    pub enabled: bool,
    /// Address and port to listen on; port 0 picks a free port (tests use this).
    #[serde(deserialize_with = "socket_addr")]
    pub bind: SocketAddr,
    /// Connections beyond this are closed at once, so that a flood cannot exhaust fds.
    pub max_connections: usize,
    /// New connections accepted a second; above it accepting pauses (the kernel's
    /// backlog holds the rest), so a reconnect storm is spread out. 0: unlimited.
    pub max_connection_rate: u32,
}

/// `[listener.ws]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WsListenerSection {
    /// Lets a node serve browsers (MQTT.js) and devices behind HTTP-only proxies.
    pub enabled: bool,
    /// Address and port to listen on.
    #[serde(deserialize_with = "socket_addr")]
    pub bind: SocketAddr,
    /// HTTP path of the endpoint, which browsers' MQTT clients put in their URL.
    pub path: String,
    /// Connections beyond this are closed at once.
    pub max_connections: usize,
    /// New connections accepted a second; above it accepting pauses (the kernel's
    /// backlog holds the rest), so a reconnect storm is spread out. 0: unlimited.
    pub max_connection_rate: u32,
}

/// The TLS files of a listener, as [`TlsListenerSection`], [`WssListenerSection`] and
/// [`ServiceListenerSection`] name them; what [`crate::tls`] loads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, the server's certificate first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of that certificate.
    pub key_file: PathBuf,
    /// PEM CA certificates that client certificates must chain to; `Some` turns on
    /// mutual TLS (a client without a valid certificate is refused in the handshake).
    pub ca_file: Option<PathBuf>,
    /// Whether the client certificate's Common Name is to serve as the user name (of
    /// the MQTT client, or of the service on the service listener).
    pub cn_as_username: bool,
}

/// `[listener.tls]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsListenerSection {
    /// Off by default: it needs a certificate, which only the operator can provide.
    pub enabled: bool,
    /// Address and port to listen on.
    #[serde(deserialize_with = "socket_addr")]
    pub bind: SocketAddr,
    /// PEM certificate chain; required when enabled.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key; required when enabled.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// PEM CA bundle for client certificates; setting it requires them (mutual TLS).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Use the client certificate's CN as the username (needs `ca_file`).
    pub cn_as_username: bool,
    /// Connections beyond this are closed at once (TLS handshakes included).
    pub max_connections: usize,
    /// New connections accepted a second; above it accepting pauses (the kernel's
    /// backlog holds the rest), so a reconnect storm is spread out. 0: unlimited.
    pub max_connection_rate: u32,
}

/// `[listener.wss]`: the keys of `[listener.tls]` plus the WebSocket `path`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WssListenerSection {
    /// Off by default: it needs a certificate, which only the operator can provide.
    pub enabled: bool,
    /// Address and port to listen on.
    #[serde(deserialize_with = "socket_addr")]
    pub bind: SocketAddr,
    /// HTTP path of the endpoint.
    pub path: String,
    /// PEM certificate chain; required when enabled.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key; required when enabled.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// PEM CA bundle for client certificates; setting it requires them (mutual TLS).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Use the client certificate's CN as the username (needs `ca_file`).
    pub cn_as_username: bool,
    /// Connections beyond this are closed at once (handshakes included).
    pub max_connections: usize,
    /// New connections accepted a second; above it accepting pauses (the kernel's
    /// backlog holds the rest), so a reconnect storm is spread out. 0: unlimited.
    pub max_connection_rate: u32,
}

/// A path key that is set and not empty (an empty environment variable unsets it).
fn nonempty(p: &Option<PathBuf>) -> Option<&PathBuf> {
    p.as_ref().filter(|p| !p.as_os_str().is_empty())
}

/// Check a TLS listener's file keys; `keys` are their dotted names (cert, key, ca,
/// cn_as_username) for the error message, and `required` what a missing certificate
/// or key file is told.
fn tls_files(
    enabled: bool,
    cert_file: &Option<PathBuf>,
    key_file: &Option<PathBuf>,
    ca_file: &Option<PathBuf>,
    cn_as_username: bool,
    keys: [&'static str; 4],
    required: &str,
) -> Result<Option<TlsFiles>, ConfigError> {
    let bad = |key, problem: &str| ConfigError::Invalid {
        key,
        problem: problem.into(),
    };
    if !enabled {
        return Ok(None);
    }
    let Some(cert_file) = nonempty(cert_file) else {
        return Err(bad(keys[0], required));
    };
    let Some(key_file) = nonempty(key_file) else {
        return Err(bad(keys[1], required));
    };
    let ca_file = nonempty(ca_file).cloned();
    if cn_as_username && ca_file.is_none() {
        return Err(bad(
            keys[3],
            "needs a ca_file (client certificates are only asked for with one)",
        ));
    }
    Ok(Some(TlsFiles {
        cert_file: cert_file.clone(),
        key_file: key_file.clone(),
        ca_file,
        cn_as_username,
    }))
}

/// What a TLS-only listener enabled without its certificate or key is told.
const ENABLED_NEEDS_FILES: &str = "is required when the listener is enabled";

impl TlsListenerSection {
    /// The files to load, or `None` when the listener is disabled; an error names the
    /// missing key.
    pub fn files(&self) -> Result<Option<TlsFiles>, ConfigError> {
        tls_files(
            self.enabled,
            &self.cert_file,
            &self.key_file,
            &self.ca_file,
            self.cn_as_username,
            [
                "listener.tls.cert_file",
                "listener.tls.key_file",
                "listener.tls.ca_file",
                "listener.tls.cn_as_username",
            ],
            ENABLED_NEEDS_FILES,
        )
    }
}

impl WssListenerSection {
    /// The files to load, or `None` when the listener is disabled; an error names the
    /// missing key.
    pub fn files(&self) -> Result<Option<TlsFiles>, ConfigError> {
        tls_files(
            self.enabled,
            &self.cert_file,
            &self.key_file,
            &self.ca_file,
            self.cn_as_username,
            [
                "listener.wss.cert_file",
                "listener.wss.key_file",
                "listener.wss.ca_file",
                "listener.wss.cn_as_username",
            ],
            ENABLED_NEEDS_FILES,
        )
    }
}

/// `[listener.service]`: the service protocol, over plain TCP or, with `cert_file` and
/// `key_file`, over TLS only (the keys of `[listener.tls]`, which mean the same).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceListenerSection {
    /// Lets a node run without the service protocol (MQTT only).
    pub enabled: bool,
    /// Address and port to listen on; port 0 picks a free port (tests use this).
    #[serde(deserialize_with = "socket_addr")]
    pub bind: SocketAddr,
    /// PEM certificate chain; with `key_file`, the listener speaks TLS only, so that
    /// service passwords do not cross the network in clear.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// PEM CA bundle for client certificates; setting it requires them (mutual TLS).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Use the client certificate's CN as the service's user name (needs `ca_file`).
    pub cn_as_username: bool,
    /// Connections beyond this are closed at once (TLS handshakes included).
    pub max_connections: usize,
    /// New connections accepted a second; above it accepting pauses (the kernel's
    /// backlog holds the rest), so a reconnect storm is spread out. 0: unlimited.
    pub max_connection_rate: u32,
}

impl ServiceListenerSection {
    /// The TLS files to load, or `None` when the listener is disabled or plain TCP
    /// (none of `cert_file`, `key_file`, `ca_file`, `cn_as_username` set). Any of them
    /// asks for TLS, which needs both `cert_file` and `key_file`: an error names the
    /// missing key.
    pub fn files(&self) -> Result<Option<TlsFiles>, ConfigError> {
        let tls = nonempty(&self.cert_file).is_some()
            || nonempty(&self.key_file).is_some()
            || nonempty(&self.ca_file).is_some()
            || self.cn_as_username;
        tls_files(
            self.enabled && tls,
            &self.cert_file,
            &self.key_file,
            &self.ca_file,
            self.cn_as_username,
            [
                "listener.service.cert_file",
                "listener.service.key_file",
                "listener.service.ca_file",
                "listener.service.cn_as_username",
            ],
            "is required for TLS on this listener (set cert_file and key_file together, \
             or none of the TLS keys for plain TCP)",
        )
    }
}

/// `[log]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// Least severe level written; one of [`LOG_LEVELS`].
    pub level: String,
}

/// The accepted values of `log.level`, most verbose first.
/// `warn` is accepted too, as most tools spell it.
pub const LOG_LEVELS: [&str; 7] = [
    "trace", "debug", "info", "warning", "warn", "error", "critical",
];

impl Default for Config {
    /// The built-in default ([`DEFAULT_TOML`]), without file or environment layers.
    fn default() -> Self {
        Config::load_layers(None, Some(HashMap::new()))
            .expect("the built-in conf/actimq.toml is valid (checked by a unit test)")
    }
}

impl Config {
    /// Load the configuration as the binary does: the built-in default, then `file` if
    /// given, then the `ACTIMQ__*` environment variables; then validate it.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Config::load_layers(file, None)
    }

    /// [`Config::load`] with the environment given as a map instead of read from the
    /// process (`None` reads the process environment). Tests use this so that they do
    /// not race on the process-wide environment.
    pub fn load_layers(
        file: Option<&Path>,
        env: Option<HashMap<String, String>>,
    ) -> Result<Config, ConfigError> {
        let mut builder = ::config::Config::builder().add_source(::config::File::from_str(
            DEFAULT_TOML,
            ::config::FileFormat::Toml,
        ));
        if let Some(file) = file {
            builder = builder.add_source(
                ::config::File::from(file)
                    .format(::config::FileFormat::Toml)
                    .required(true),
            );
        }
        builder = builder.add_source(
            ::config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .source(env),
        );
        let cfg: Config = builder.build()?.try_deserialize()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check the values that deserialise but are not allowed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn bad(key: &'static str, problem: impl Into<String>) -> Result<(), ConfigError> {
            Err(ConfigError::Invalid {
                key,
                problem: problem.into(),
            })
        }
        fn positive(key: &'static str, v: u64) -> Result<(), ConfigError> {
            if v == 0 {
                return bad(key, "must be greater than 0");
            }
            Ok(())
        }

        if self.node.name.trim().is_empty() {
            bad("node.name", "must not be empty")?;
        }
        positive("hooks.timeout_ms", self.hooks.timeout_ms)?;
        if self.auth.max_failures > 0 {
            positive("auth.failure_window_secs", self.auth.failure_window_secs)?;
            positive("auth.block_secs", self.auth.block_secs)?;
        }
        positive("auth.verify_threads", self.auth.verify_threads as u64)?;
        if self.node.data_dir.as_os_str().is_empty() {
            bad("node.data_dir", "must not be empty")?;
        }

        let s = &self.storage;
        if s.segment_bytes < MIN_SEGMENT_BYTES {
            bad(
                "storage.segment_bytes",
                format!(
                    "{} is below the minimum of {MIN_SEGMENT_BYTES}",
                    s.segment_bytes
                ),
            )?;
        }
        if s.flush == Flush::Async {
            positive("storage.flush_interval_ms", s.flush_interval_ms)?;
        }
        if let Some(h) = s.retention_hours {
            positive("storage.retention_hours", h)?;
            if h.checked_mul(3600).is_none() {
                bad("storage.retention_hours", "is too large")?;
            }
        }
        if let Some(b) = s.retention_bytes {
            positive("storage.retention_bytes", b)?;
        }
        positive("storage.index_shards", s.index_shards as u64)?;
        positive("storage.notifier_shards", s.notifier_shards as u64)?;
        positive("storage.max_open_files", s.max_open_files as u64)?;
        if !(MIN_RECORD_BYTES..=HARD_MAX_RECORD_BYTES).contains(&s.max_record_bytes) {
            bad(
                "storage.max_record_bytes",
                format!(
                    "{} is outside {MIN_RECORD_BYTES}..={HARD_MAX_RECORD_BYTES}",
                    s.max_record_bytes
                ),
            )?;
        }

        let m = &self.mqtt;
        if m.max_packet_size == 0 || m.max_packet_size > MQTT_MAX_PACKET_SIZE {
            bad(
                "mqtt.max_packet_size",
                format!(
                    "{} is outside 1..={MQTT_MAX_PACKET_SIZE} (the MQTT limit)",
                    m.max_packet_size
                ),
            )?;
        }
        positive("mqtt.receive_maximum", m.receive_maximum as u64)?;
        positive("mqtt.max_inflight", m.max_inflight as u64)?;
        positive("mqtt.max_topic_levels", m.max_topic_levels as u64)?;
        if m.max_client_id_len < 23 {
            bad(
                "mqtt.max_client_id_len",
                format!(
                    "{} is below 23, the length every server must accept (MQTT-3.1.3-5)",
                    m.max_client_id_len
                ),
            )?;
        }
        positive("mqtt.connect_timeout_secs", m.connect_timeout_secs)?;
        positive("mqtt.pull_batch", m.pull_batch as u64)?;
        positive("mqtt.max_write_buffer", m.max_write_buffer as u64)?;
        positive("mqtt.subscription_shards", m.subscription_shards as u64)?;

        let l = &self.listener;
        positive("listener.max_connections", l.max_connections as u64)?;
        positive("listener.tcp.max_connections", l.tcp.max_connections as u64)?;
        positive("listener.ws.max_connections", l.ws.max_connections as u64)?;
        positive("listener.tls.max_connections", l.tls.max_connections as u64)?;
        positive("listener.wss.max_connections", l.wss.max_connections as u64)?;
        positive(
            "listener.service.max_connections",
            l.service.max_connections as u64,
        )?;
        let sv = &self.service;
        if sv.partitions == 0 || sv.partitions > 1024 {
            bad(
                "service.partitions",
                format!("{} is outside 1..=1024", sv.partitions),
            )?;
        }
        if sv.max_frame_bytes < 1024 || sv.max_frame_bytes > HARD_MAX_FRAME {
            bad(
                "service.max_frame_bytes",
                format!("{} is outside 1024..={HARD_MAX_FRAME}", sv.max_frame_bytes),
            )?;
        }
        positive("service.max_pull_messages", sv.max_pull_messages as u64)?;
        positive("service.max_pull_bytes", sv.max_pull_bytes as u64)?;
        for (key, path) in [
            ("listener.ws.path", &l.ws.path),
            ("listener.wss.path", &l.wss.path),
        ] {
            if !path.starts_with('/') {
                bad(key, format!("{path:?} must start with \"/\""))?;
            }
        }
        l.tls.files()?;
        l.wss.files()?;
        l.service.files()?;
        // Every enabled listener needs its own address (port 0 picks a fresh one each).
        let binds = [
            ("listener.tcp.bind", l.tcp.enabled, l.tcp.bind),
            ("listener.ws.bind", l.ws.enabled, l.ws.bind),
            ("listener.tls.bind", l.tls.enabled, l.tls.bind),
            ("listener.wss.bind", l.wss.enabled, l.wss.bind),
            ("listener.service.bind", l.service.enabled, l.service.bind),
        ];
        for (i, (key, enabled, addr)) in binds.iter().enumerate() {
            if !enabled || addr.port() == 0 {
                continue;
            }
            if let Some((other, _, _)) = binds[..i]
                .iter()
                .find(|(_, on, a)| *on && a.port() == addr.port() && clash(a, addr))
            {
                bad(key, format!("{addr} is also {other}"))?;
            }
        }

        if !LOG_LEVELS.contains(&self.log.level.as_str()) {
            bad(
                "log.level",
                format!(
                    "{:?} is not one of {}",
                    self.log.level,
                    LOG_LEVELS.join(", ")
                ),
            )?;
        }
        Ok(())
    }

    /// The number of IO arbiters to start: `node.io_threads`, or one per core if 0.
    pub fn io_threads(&self) -> usize {
        match self.node.io_threads {
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            n => n,
        }
    }

    /// The storage engine's settings (its directory is `node.data_dir`).
    pub fn storage_config(&self) -> StorageConfig {
        let s = &self.storage;
        StorageConfig {
            dir: self.node.data_dir.clone(),
            segment_bytes: s.segment_bytes,
            flush: match s.flush {
                Flush::Sync => FlushMode::Sync,
                Flush::Async => FlushMode::Async,
            },
            flush_interval_ms: s.flush_interval_ms,
            // validate() has checked that the product fits.
            retention_secs: s.retention_hours.map(|h| h.saturating_mul(3600)),
            retention_bytes: s.retention_bytes,
            index_shards: s.index_shards,
            notifier_shards: s.notifier_shards,
            queue_idle_secs: s.queue_idle_secs,
            max_open_files: s.max_open_files,
            max_record_bytes: s.max_record_bytes,
            cache_bytes: s.cache_bytes,
        }
    }

    /// The MQTT gateway's settings.
    pub fn mqtt_config(&self) -> MqttConfig {
        MqttConfig {
            partitions: self.service.partitions,
            ..self.mqtt.clone()
        }
    }

    /// The hooks' deadline and failure policy.
    pub fn hooks_config(&self) -> actimq_actors::mqtt::hooks::HooksConfig {
        use actimq_actors::mqtt::hooks::{FailurePolicy, HooksConfig};
        HooksConfig {
            timeout: std::time::Duration::from_millis(self.hooks.timeout_ms),
            on_failure: match self.hooks.on_failure {
                OnFailure::Deny => FailurePolicy::Deny,
                OnFailure::Allow => FailurePolicy::Allow,
            },
        }
    }

    /// The service gateway's settings.
    pub fn service_config(&self) -> ServiceConfig {
        let s = &self.service;
        ServiceConfig {
            max_frame_bytes: s.max_frame_bytes,
            max_pull_wait_ms: s.max_pull_wait_ms,
            max_pull_messages: s.max_pull_messages,
            max_pull_bytes: s.max_pull_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn load_env(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::load_layers(None, env(pairs))
    }

    /// The error message for one bad environment value.
    fn env_error(key: &str, value: &str) -> String {
        match load_env(&[(key, value)]) {
            Ok(_) => panic!("{key}={value} was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn embedded_default_is_complete_and_valid() {
        let cfg = Config::default();
        assert_eq!(cfg.node.name, "actimq");
        assert_eq!(cfg.node.data_dir, PathBuf::from("./data"));
        assert_eq!(cfg.listener.tcp.bind, "0.0.0.0:1883".parse().unwrap());
        assert!(cfg.listener.tcp.enabled);
        assert_eq!(cfg.listener.ws.bind, "0.0.0.0:8083".parse().unwrap());
        assert_eq!(cfg.listener.ws.path, "/mqtt");
        assert_eq!(cfg.storage.flush, Flush::Async);
        assert_eq!(cfg.storage.retention_hours, None);
        assert_eq!(cfg.storage.retention_bytes, None);
        assert_eq!(cfg.log.level, "info");
        assert!(cfg.io_threads() >= 1);
    }

    #[test]
    fn auth_defaults_and_limits() {
        let a = Config::default().auth;
        assert!(a.allow_anonymous);
        assert_eq!(a.password_path(), None);
        assert_eq!(a.acl_path(), None);
        assert_eq!(a.acl_default, AclDefault::Allow);
        assert_eq!(
            (a.max_failures, a.failure_window_secs, a.block_secs),
            (5, 60, 300)
        );
        assert_eq!(a.verify_threads, 1);
        let e = env_error("ACTIMQ__AUTH__ACL_DEFAULT", "maybe");
        assert!(e.contains("acl_default"), "{e}");
        let e = env_error("ACTIMQ__AUTH__VERIFY_THREADS", "0");
        assert!(e.contains("auth.verify_threads"), "{e}");
        let e = env_error("ACTIMQ__AUTH__BLOCK_SECS", "0");
        assert!(e.contains("auth.block_secs"), "{e}");
        let off = load_env(&[
            ("ACTIMQ__AUTH__MAX_FAILURES", "0"),
            ("ACTIMQ__AUTH__BLOCK_SECS", "0"),
        ])
        .unwrap();
        assert_eq!(off.auth.max_failures, 0);
        let c = load_env(&[
            ("ACTIMQ__AUTH__ALLOW_ANONYMOUS", "false"),
            ("ACTIMQ__AUTH__PASSWORD_FILE", "/etc/actimq/passwd"),
        ])
        .unwrap();
        assert!(!c.auth.allow_anonymous);
        assert_eq!(
            c.auth.password_path(),
            Some(Path::new("/etc/actimq/passwd"))
        );
    }

    #[test]
    fn embedded_default_is_the_file_in_conf() {
        let on_disk =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/actimq.toml"))
                .unwrap();
        assert_eq!(on_disk, DEFAULT_TOML);
    }

    /// The defaults written in conf/actimq.toml are the ones the gateway itself uses,
    /// so the documentation cannot drift from the code.
    #[test]
    fn mqtt_defaults_match_the_gateway() {
        let ours = Config::default().mqtt_config();
        assert_eq!(format!("{ours:?}"), format!("{:?}", MqttConfig::default()));
    }

    /// Likewise for the storage engine (except `dir`, which comes from `node.data_dir`).
    #[test]
    fn storage_defaults_match_the_engine() {
        let ours = Config::default().storage_config();
        let engine = StorageConfig {
            dir: ours.dir.clone(),
            ..StorageConfig::default()
        };
        assert_eq!(format!("{ours:?}"), format!("{engine:?}"));
    }

    #[test]
    fn file_layer_overrides_default_and_env_overrides_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(
            &path,
            "[node]\nname = \"from-file\"\n[storage]\nflush = \"sync\"\nsegment_bytes = 4096\n",
        )
        .unwrap();
        let cfg = Config::load_layers(Some(&path), env(&[])).unwrap();
        assert_eq!(cfg.node.name, "from-file");
        assert_eq!(cfg.storage.flush, Flush::Sync);
        assert_eq!(cfg.storage.segment_bytes, 4096);
        // Keys the file does not name keep their defaults.
        assert_eq!(cfg.node.data_dir, PathBuf::from("./data"));

        let cfg = Config::load_layers(
            Some(&path),
            env(&[
                ("ACTIMQ__NODE__NAME", "from-env"),
                ("ACTIMQ__STORAGE__SEGMENT_BYTES", "8192"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.node.name, "from-env");
        assert_eq!(cfg.storage.segment_bytes, 8192);
        assert_eq!(cfg.storage.flush, Flush::Sync, "file value kept");
    }

    #[test]
    fn env_overrides_nested_keys_with_double_underscores() {
        let cfg = load_env(&[
            ("ACTIMQ__LISTENER__TCP__BIND", "127.0.0.1:0"),
            ("ACTIMQ__LISTENER__WS__ENABLED", "false"),
            ("ACTIMQ__NODE__DATA_DIR", "/tmp/x"),
            ("ACTIMQ__NODE__IO_THREADS", "3"),
            ("ACTIMQ__STORAGE__RETENTION_HOURS", "24"),
            ("ACTIMQ__MQTT__MAX_PACKET_SIZE", "65536"),
            ("ACTIMQ__LOG__LEVEL", "debug"),
            // Not ours: ignored.
            ("ACTIMQ_OTHER", "x"),
            ("HOME", "/root"),
        ])
        .unwrap();
        assert_eq!(cfg.listener.tcp.bind, "127.0.0.1:0".parse().unwrap());
        assert!(!cfg.listener.ws.enabled);
        assert_eq!(cfg.node.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(cfg.io_threads(), 3);
        assert_eq!(cfg.storage.retention_hours, Some(24));
        assert_eq!(cfg.storage_config().retention_secs, Some(24 * 3600));
        assert_eq!(cfg.mqtt.max_packet_size, 65536);
        assert_eq!(cfg.log.level, "debug");
    }

    #[test]
    fn missing_config_file_is_an_error_naming_it() {
        let err = Config::load_layers(Some(Path::new("/nonexistent/actimq.toml")), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/actimq.toml"), "{err}");
    }

    #[test]
    fn bad_toml_in_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "[storage\nflush = ").unwrap();
        let err = Config::load_layers(Some(&path), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.toml"), "{err}");
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let err = env_error("ACTIMQ__STORAGE__SEGMENT_SIZE", "10");
        assert!(err.contains("segment_size"), "{err}");
    }

    #[test]
    fn zero_or_tiny_segment_size_is_rejected() {
        let err = env_error("ACTIMQ__STORAGE__SEGMENT_BYTES", "0");
        assert_eq!(
            err,
            "invalid value for `storage.segment_bytes`: 0 is below the minimum of 4096"
        );
        let err = env_error("ACTIMQ__STORAGE__SEGMENT_BYTES", "4095");
        assert!(err.contains("storage.segment_bytes"), "{err}");
        load_env(&[("ACTIMQ__STORAGE__SEGMENT_BYTES", "4096")]).unwrap();
    }

    #[test]
    fn record_size_outside_the_engine_limits_is_rejected() {
        let err = env_error("ACTIMQ__STORAGE__MAX_RECORD_BYTES", "1023");
        assert!(
            err.starts_with("invalid value for `storage.max_record_bytes`"),
            "{err}"
        );
        let err = env_error("ACTIMQ__STORAGE__MAX_RECORD_BYTES", "67108865");
        assert!(err.contains("67108864"), "{err}");
    }

    #[test]
    fn unknown_flush_mode_is_rejected() {
        let err = env_error("ACTIMQ__STORAGE__FLUSH", "sometimes");
        assert!(err.contains("storage.flush"), "{err}");
        assert!(err.contains("sometimes"), "{err}");
        assert!(err.contains("sync") && err.contains("async"), "{err}");
    }

    #[test]
    fn zero_flush_interval_is_rejected_in_async_mode_only() {
        let err = env_error("ACTIMQ__STORAGE__FLUSH_INTERVAL_MS", "0");
        assert!(err.contains("storage.flush_interval_ms"), "{err}");
        load_env(&[
            ("ACTIMQ__STORAGE__FLUSH", "sync"),
            ("ACTIMQ__STORAGE__FLUSH_INTERVAL_MS", "0"),
        ])
        .unwrap();
    }

    #[test]
    fn zero_retention_is_rejected() {
        let err = env_error("ACTIMQ__STORAGE__RETENTION_HOURS", "0");
        assert!(err.contains("storage.retention_hours"), "{err}");
        let err = env_error("ACTIMQ__STORAGE__RETENTION_BYTES", "0");
        assert!(err.contains("storage.retention_bytes"), "{err}");
        let err = env_error("ACTIMQ__STORAGE__RETENTION_HOURS", "18446744073709551615");
        assert!(err.contains("storage.retention_hours"), "{err}");
    }

    #[test]
    fn zero_shards_and_limits_are_rejected() {
        for (var, key) in [
            ("ACTIMQ__STORAGE__INDEX_SHARDS", "storage.index_shards"),
            (
                "ACTIMQ__STORAGE__NOTIFIER_SHARDS",
                "storage.notifier_shards",
            ),
            ("ACTIMQ__STORAGE__MAX_OPEN_FILES", "storage.max_open_files"),
            ("ACTIMQ__MQTT__RECEIVE_MAXIMUM", "mqtt.receive_maximum"),
            ("ACTIMQ__MQTT__MAX_INFLIGHT", "mqtt.max_inflight"),
            ("ACTIMQ__MQTT__MAX_TOPIC_LEVELS", "mqtt.max_topic_levels"),
            (
                "ACTIMQ__MQTT__CONNECT_TIMEOUT_SECS",
                "mqtt.connect_timeout_secs",
            ),
            ("ACTIMQ__MQTT__PULL_BATCH", "mqtt.pull_batch"),
            ("ACTIMQ__MQTT__MAX_WRITE_BUFFER", "mqtt.max_write_buffer"),
            (
                "ACTIMQ__MQTT__SUBSCRIPTION_SHARDS",
                "mqtt.subscription_shards",
            ),
            (
                "ACTIMQ__LISTENER__MAX_CONNECTIONS",
                "listener.max_connections",
            ),
            (
                "ACTIMQ__LISTENER__TCP__MAX_CONNECTIONS",
                "listener.tcp.max_connections",
            ),
            (
                "ACTIMQ__LISTENER__WS__MAX_CONNECTIONS",
                "listener.ws.max_connections",
            ),
            (
                "ACTIMQ__LISTENER__TLS__MAX_CONNECTIONS",
                "listener.tls.max_connections",
            ),
            (
                "ACTIMQ__LISTENER__WSS__MAX_CONNECTIONS",
                "listener.wss.max_connections",
            ),
        ] {
            let err = env_error(var, "0");
            assert_eq!(
                err,
                format!("invalid value for `{key}`: must be greater than 0")
            );
        }
    }

    #[test]
    fn max_packet_size_above_the_protocol_limit_is_rejected() {
        let err = env_error("ACTIMQ__MQTT__MAX_PACKET_SIZE", "268435456");
        assert!(
            err.starts_with("invalid value for `mqtt.max_packet_size`"),
            "{err}"
        );
        assert!(err.contains("268435455"), "{err}");
        load_env(&[("ACTIMQ__MQTT__MAX_PACKET_SIZE", "268435455")]).unwrap();
        let err = env_error("ACTIMQ__MQTT__MAX_PACKET_SIZE", "0");
        assert!(err.contains("mqtt.max_packet_size"), "{err}");
    }

    #[test]
    fn out_of_range_integer_names_the_key() {
        let err = env_error("ACTIMQ__MQTT__RECEIVE_MAXIMUM", "70000");
        assert!(err.contains("mqtt.receive_maximum"), "{err}");
        let err = env_error("ACTIMQ__STORAGE__SEGMENT_BYTES", "lots");
        assert!(err.contains("storage.segment_bytes"), "{err}");
    }

    #[test]
    fn short_client_id_limit_is_rejected() {
        let err = env_error("ACTIMQ__MQTT__MAX_CLIENT_ID_LEN", "22");
        assert!(err.contains("mqtt.max_client_id_len"), "{err}");
        assert!(err.contains("23"), "{err}");
    }

    #[test]
    fn unparseable_bind_is_rejected() {
        let err = env_error("ACTIMQ__LISTENER__TCP__BIND", "localhost");
        assert!(err.contains("listener.tcp.bind"), "{err}");
        assert!(err.contains("localhost"), "{err}");
        let err = env_error("ACTIMQ__LISTENER__WS__BIND", "1.2.3.4:99999");
        assert!(err.contains("listener.ws.bind"), "{err}");
    }

    #[test]
    fn same_bind_for_both_listeners_is_rejected() {
        let err = load_env(&[
            ("ACTIMQ__LISTENER__TCP__BIND", "127.0.0.1:1883"),
            ("ACTIMQ__LISTENER__WS__BIND", "127.0.0.1:1883"),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("listener.ws.bind"), "{err}");
    }

    #[test]
    fn every_enabled_listener_needs_its_own_address() {
        let err = load_env(&[("ACTIMQ__LISTENER__WS__BIND", "0.0.0.0:1883")])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "invalid value for `listener.ws.bind`: 0.0.0.0:1883 is also listener.tcp.bind"
        );
        // A wildcard takes the port on every address.
        let err = load_env(&[("ACTIMQ__LISTENER__WS__BIND", "127.0.0.1:1883")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("listener.ws.bind"), "{err}");
        let err = load_env(&[
            ("ACTIMQ__LISTENER__WSS__ENABLED", "true"),
            ("ACTIMQ__LISTENER__WSS__CERT_FILE", "/c"),
            ("ACTIMQ__LISTENER__WSS__KEY_FILE", "/k"),
            ("ACTIMQ__LISTENER__WSS__BIND", "0.0.0.0:8083"),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("listener.wss.bind") && err.contains("listener.ws.bind"),
            "{err}"
        );
        // Disabled listeners and port 0 do not clash; other ports or addresses do not.
        load_env(&[("ACTIMQ__LISTENER__TLS__BIND", "0.0.0.0:1883")]).unwrap();
        load_env(&[
            ("ACTIMQ__LISTENER__TCP__BIND", "127.0.0.1:0"),
            ("ACTIMQ__LISTENER__WS__BIND", "127.0.0.1:0"),
        ])
        .unwrap();
        load_env(&[
            ("ACTIMQ__LISTENER__TCP__BIND", "127.0.0.1:1883"),
            ("ACTIMQ__LISTENER__WS__BIND", "127.0.0.2:1883"),
        ])
        .unwrap();
    }

    #[test]
    fn service_defaults_and_limits() {
        let cfg = Config::default();
        assert!(cfg.listener.service.enabled);
        assert_eq!(cfg.listener.service.bind, "0.0.0.0:9883".parse().unwrap());
        assert_eq!(cfg.service.partitions, 4);
        assert_eq!(cfg.mqtt_config().partitions, 4);
        assert_eq!(cfg.service_config().max_frame_bytes, 16 << 20);
        for (key, val, needle) in [
            ("ACTIMQ__SERVICE__PARTITIONS", "0", "service.partitions"),
            (
                "ACTIMQ__SERVICE__MAX_FRAME_BYTES",
                "10",
                "service.max_frame_bytes",
            ),
            (
                "ACTIMQ__LISTENER__SERVICE__BIND",
                "0.0.0.0:1883",
                "listener.service.bind",
            ),
        ] {
            let err = load_env(&[(key, val)]).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn tls_listeners_are_off_by_default_and_need_their_files() {
        let cfg = Config::default();
        assert!(!cfg.listener.tls.enabled && !cfg.listener.wss.enabled);
        assert_eq!(cfg.listener.tls.bind, "0.0.0.0:8883".parse().unwrap());
        assert_eq!(cfg.listener.wss.bind, "0.0.0.0:8084".parse().unwrap());
        assert_eq!(cfg.listener.wss.path, "/mqtt");
        assert_eq!(cfg.listener.tls.cert_file, None);
        assert_eq!(cfg.listener.tls.files().unwrap(), None);

        for l in ["TLS", "WSS"] {
            let key = |k: &str| format!("ACTIMQ__LISTENER__{l}__{k}");
            let name = l.to_lowercase();
            let err = load_env(&[(&key("ENABLED"), "true")])
                .unwrap_err()
                .to_string();
            assert_eq!(
                err,
                format!(
                    "invalid value for `listener.{name}.cert_file`: is required when the \
                     listener is enabled"
                )
            );
            let err = load_env(&[(&key("ENABLED"), "true"), (&key("CERT_FILE"), "/c.pem")])
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("listener.{name}.key_file")), "{err}");
            let err = load_env(&[
                (&key("ENABLED"), "true"),
                (&key("CERT_FILE"), "/c.pem"),
                (&key("KEY_FILE"), "/k.pem"),
                (&key("CN_AS_USERNAME"), "true"),
            ])
            .unwrap_err()
            .to_string();
            assert!(
                err.contains(&format!("listener.{name}.cn_as_username")),
                "{err}"
            );
            let cfg = load_env(&[
                (&key("ENABLED"), "true"),
                (&key("CERT_FILE"), "/c.pem"),
                (&key("KEY_FILE"), "/k.pem"),
                (&key("CA_FILE"), "/ca.pem"),
                (&key("CN_AS_USERNAME"), "true"),
            ])
            .unwrap();
            let files = match l {
                "TLS" => cfg.listener.tls.files(),
                _ => cfg.listener.wss.files(),
            };
            assert_eq!(
                files.unwrap(),
                Some(TlsFiles {
                    cert_file: "/c.pem".into(),
                    key_file: "/k.pem".into(),
                    ca_file: Some("/ca.pem".into()),
                    cn_as_username: true,
                })
            );
        }
        let err = env_error("ACTIMQ__LISTENER__WSS__PATH", "mqtt");
        assert!(err.contains("listener.wss.path"), "{err}");
    }

    #[test]
    fn service_listener_is_plain_without_files_and_tls_with_both() {
        let cfg = Config::default();
        let svc = &cfg.listener.service;
        assert_eq!(
            (&svc.cert_file, &svc.key_file, &svc.ca_file),
            (&None, &None, &None)
        );
        assert!(!svc.cn_as_username);
        assert_eq!(svc.files().unwrap(), None, "plain TCP by default");

        let key = |k: &str| format!("ACTIMQ__LISTENER__SERVICE__{k}");
        // One file without the other names the missing key.
        let err = load_env(&[(&key("CERT_FILE"), "/c.pem")])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("invalid value for `listener.service.key_file`: is required for TLS"),
            "{err}"
        );
        let err = load_env(&[(&key("KEY_FILE"), "/k.pem")])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("invalid value for `listener.service.cert_file`"),
            "{err}"
        );
        // A CA or cn_as_username asks for TLS too.
        let err = load_env(&[(&key("CA_FILE"), "/ca.pem")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("listener.service.cert_file"), "{err}");
        let err = load_env(&[
            (&key("CERT_FILE"), "/c.pem"),
            (&key("KEY_FILE"), "/k.pem"),
            (&key("CN_AS_USERNAME"), "true"),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("listener.service.cn_as_username"), "{err}");
        // An empty value (as an empty environment variable gives) is unset.
        let cfg = load_env(&[(&key("CERT_FILE"), ""), (&key("KEY_FILE"), "")]).unwrap();
        assert_eq!(cfg.listener.service.files().unwrap(), None);
        // A disabled listener's files are not checked.
        load_env(&[(&key("ENABLED"), "false"), (&key("CERT_FILE"), "/c.pem")]).unwrap();

        let cfg = load_env(&[
            (&key("CERT_FILE"), "/c.pem"),
            (&key("KEY_FILE"), "/k.pem"),
            (&key("CA_FILE"), "/ca.pem"),
            (&key("CN_AS_USERNAME"), "true"),
        ])
        .unwrap();
        assert_eq!(
            cfg.listener.service.files().unwrap(),
            Some(TlsFiles {
                cert_file: "/c.pem".into(),
                key_file: "/k.pem".into(),
                ca_file: Some("/ca.pem".into()),
                cn_as_username: true,
            })
        );
        let err = env_error("ACTIMQ__LISTENER__SERVICE__CERT", "/c.pem");
        assert!(err.contains("cert"), "unknown key: {err}");
    }

    #[test]
    fn ws_path_must_be_absolute() {
        let err = env_error("ACTIMQ__LISTENER__WS__PATH", "mqtt");
        assert!(err.contains("listener.ws.path"), "{err}");
    }

    #[test]
    fn bad_bool_names_the_key() {
        let err = env_error("ACTIMQ__MQTT__RETAIN_AVAILABLE", "maybe");
        assert!(err.contains("mqtt.retain_available"), "{err}");
    }

    #[test]
    fn unknown_log_level_is_rejected() {
        let err = env_error("ACTIMQ__LOG__LEVEL", "loud");
        assert!(err.contains("log.level"), "{err}");
        assert!(err.contains("loud"), "{err}");
    }

    #[test]
    fn empty_name_is_rejected() {
        let err = env_error("ACTIMQ__NODE__NAME", " ");
        assert!(err.contains("node.name"), "{err}");
    }
}
