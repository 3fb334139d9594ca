//! The service gateway (issue #5): back-end services produce and consume the very
//! messages devices exchange, from the same commitlog, over their own framed protocol
//! ([`protocol`]).
//!
//! * [`session::ServerSession`]: one actor per service connection.
//! * [`group::GroupCoordinator`]: consumer-group membership and partition assignment.
//!
//! Produce goes through [`crate::mqtt::Gateway::publish_batch`] (the same route, retain
//! and append path as a device PUBLISH). Logins and the ACL are the gateway's hooks
//! ([`crate::mqtt::Gateway::hooks`]): a Hello is an `Authenticate`, each produced
//! message and each Join an `Authorize`. Consumers read the first-level topic queues
//! `t:{topic}` / `t:{topic}#{p}` (`mqtt.partitions` of them per first-level topic) with
//! offsets committed per (group, partition) in the `OffsetStore`.

pub mod group;
pub mod protocol;
pub mod session;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::mqtt::{ConnInfo, Gateway};

/// Settings of the service gateway (the `[service]` section of the config).
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// Largest frame accepted from a service, in bytes.
    pub max_frame_bytes: usize,
    /// Longest a Pull may wait for messages, in milliseconds (longer waits are cut).
    pub max_pull_wait_ms: u32,
    /// Most messages one Pull answers with.
    pub max_pull_messages: u32,
    /// About the most payload bytes one Pull answers with (at least one message).
    pub max_pull_bytes: usize,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            max_frame_bytes: 16 << 20,
            max_pull_wait_ms: 30_000,
            max_pull_messages: 1024,
            max_pull_bytes: 4 << 20,
        }
    }
}

/// A running service gateway. Cheap to clone; hand a clone to each IO arbiter.
#[derive(Clone)]
pub struct Service {
    pub(crate) inner: Arc<ServiceInner>,
}

pub(crate) struct ServiceInner {
    pub cfg: ServiceConfig,
    pub gateway: Gateway,
    pub coordinator: Addr<group::GroupCoordinator>,
    pub next_member: AtomicU64,
    /// Bumped by [`Service::reauthorize`]; a session whose memberships were checked
    /// at an older value checks them again.
    pub acl_epoch: AtomicU64,
    pub log: slog::Logger,
}

impl Service {
    /// Start the group coordinator (on the current arbiter).
    pub fn start(cfg: ServiceConfig, gateway: Gateway, log: slog::Logger) -> Service {
        let coordinator =
            group::GroupCoordinator::new(gateway.config().partitions, log.clone()).start();
        Service {
            inner: Arc::new(ServiceInner {
                cfg,
                gateway,
                coordinator,
                next_member: AtomicU64::new(1),
                acl_epoch: AtomicU64::new(0),
                log,
            }),
        }
    }

    /// Serve one accepted service connection; call it on the arbiter that should run
    /// the session.
    pub fn accept<S>(&self, io: S, peer: SocketAddr)
    where
        S: AsyncRead + AsyncWrite + Unpin + 'static,
    {
        self.accept_with(io, peer, ConnInfo::default());
    }

    /// [`Service::accept`], with what the transport learnt about the client: a
    /// verified TLS client certificate's CN (`cn_as_username`) is the service's user
    /// name, which a Hello's user name does not replace.
    pub fn accept_with<S>(&self, io: S, peer: SocketAddr, info: ConnInfo)
    where
        S: AsyncRead + AsyncWrite + Unpin + 'static,
    {
        session::ServerSession::spawn(self.clone(), io, peer, info);
    }

    /// Re-check every connection's consumer-group memberships against the
    /// authorization hooks (after an ACL reload): each connection does so before its
    /// next request and before it pulls again, and leaves the groups now denied.
    pub fn reauthorize(&self) {
        self.inner.acl_epoch.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn acl_epoch(&self) -> u64 {
        self.inner.acl_epoch.load(Ordering::Relaxed)
    }

    pub(crate) fn next_member(&self) -> u64 {
        self.inner.next_member.fetch_add(1, Ordering::Relaxed)
    }

    pub fn config(&self) -> &ServiceConfig {
        &self.inner.cfg
    }
}
