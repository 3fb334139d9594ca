//! actimq: an MQTT 3.1.1/5.0 broker and message store built from actix actors.
//!
//! This crate is the node shell: it reads the configuration, sets up logging, opens
//! storage, starts the MQTT gateway and the IO threads, and accepts connections. The
//! actors themselves live in the `actimq-actors` crate.
//!
//! # Layout
//! * [`config`]: the `Config` types, the built-in default (`conf/actimq.toml`) and the
//!   layering of default, `--config FILE` and `ACTIMQ__SECTION__KEY` variables, with
//!   validation that names the offending key.
//! * [`logging`]: the slog root logger (async, to stderr) that also receives the
//!   `log` records of actix and other crates.
//! * [`node`]: [`Node`] starts a node inside an actix `System` and returns a
//!   [`NodeHandle`] that stops it in an order that loses nothing; [`NodeBuilder`]
//!   registers extension hooks (actors; see README "Extending actimq").
//! * `listener`: the accept loops (connection cap, back-off on accept errors), the
//!   round-robin hand-over of sockets to the IO arbiters, and the per-transport
//!   handshakes (tcp, ws, tls, wss) before `Gateway::accept`.
//! * [`ws`]: the WebSocket upgrade and the adapter that makes a WebSocket the byte
//!   stream the MQTT session reads and writes.
//! * [`tls`]: rustls server configurations from PEM files (MQTTS, WSS, mutual TLS).
//! * [`auth`]: the built-in password file and ACL, as hook actors the node registers
//!   when `[auth]` enables them.
//! * [`client`]: the Rust client of the service protocol: `Producer` and `Consumer`.
//! * [`testing`]: [`testing::TestNode`], a node on its own thread for integration
//!   tests that do not want to know about actix.
//!
//! The binary (`src/main.rs`) only parses the command line, loads the config and runs
//! a [`Node`] until SIGINT or SIGTERM.

pub mod auth;
pub mod client;
pub mod config;
mod listener;
pub mod logging;
pub mod node;
pub mod testing;
pub mod tls;
pub mod ws;

pub use crate::config::Config;
pub use crate::node::{BoundAddrs, Node, NodeBuilder, NodeError, NodeHandle};
