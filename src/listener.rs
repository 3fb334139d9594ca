//! Accepting connections: one accept loop per enabled listener (tcp, ws, tls, wss,
//! and the non-MQTT service listener),
//! and the pool of IO arbiters that run the connections.
//!
//! The accept loop runs on the node's own arbiter and does as little as it can: it
//! takes a connection slot (or closes the socket when the listener is full), sets
//! `TCP_NODELAY`, and hands a *std* socket to the next IO arbiter, round-robin. The
//! arbiter re-registers the socket with its own IO driver (a tokio stream stays bound
//! to the driver of the thread that created it), runs the listener's handshakes there
//! (TLS, then the WebSocket upgrade, as [`Transport`] says; both together bounded by
//! `mqtt.connect_timeout_secs`), and gives the resulting byte stream to the gateway,
//! which starts the session actor there. Every MQTT transport ends in the same
//! `Gateway::accept`: one `MqttSession` and one codec for all of them. The service
//! listener ends in `Service::accept` (a `ServerSession`), over plain TCP or, with a
//! certificate, after the same TLS handshake as the `tls` listener.
//!
//! Back-pressure: a connection holds a slot of its listener and one of the node
//! (`listener.max_connections`) from accept to close, handshakes included, so
//! `max_connections` bounds the connections *and* the handshakes in progress; a failed
//! or timed-out handshake closes only that connection (logged with the peer address)
//! and returns its slots. `max_connection_rate` paces accepting: over it the loop
//! sleeps, and the kernel's listen backlog holds the connections that wait.
//!
//! Accept errors (usually `EMFILE`: out of file descriptors) back off exponentially
//! instead of spinning, and the loop resumes at full speed after the next success.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actimq_actors::mqtt::throttle::Rate;
use actimq_actors::mqtt::Gateway;
use actimq_actors::service::Service;
use actix_rt::ArbiterHandle;
use slog::{debug, info, warn};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::tls::common_name;
use crate::ws::{self, WsSettings};
use actimq_actors::mqtt::ConnInfo;

/// First pause after an accept error.
const MIN_BACKOFF: Duration = Duration::from_millis(5);
/// Longest pause between accept attempts while errors persist.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// The IO arbiters that run connections, handed out round-robin.
pub(crate) struct IoArbiters {
    /// One handle per IO thread; sessions live on the arbiter they were handed to.
    arbiters: Vec<ArbiterHandle>,
    /// The next arbiter to use; shared by every listener so that they balance together.
    next: AtomicUsize,
}

impl IoArbiters {
    pub(crate) fn new(arbiters: Vec<ArbiterHandle>) -> IoArbiters {
        assert!(!arbiters.is_empty(), "at least one IO arbiter");
        IoArbiters {
            arbiters,
            next: AtomicUsize::new(0),
        }
    }

    fn pick(&self) -> &ArbiterHandle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.arbiters.len();
        &self.arbiters[i]
    }
}

/// What a listener does with a connection before the MQTT session gets it.
#[derive(Clone)]
pub(crate) enum Transport {
    /// Nothing: plain MQTT over TCP.
    Tcp,
    /// The WebSocket upgrade ([`crate::ws`]).
    Ws(Arc<WsSettings>),
    /// A TLS handshake; `cn` says whether to look at the client certificate's CN.
    Tls { acceptor: TlsAcceptor, cn: bool },
    /// A TLS handshake, then the WebSocket upgrade.
    Wss {
        acceptor: TlsAcceptor,
        cn: bool,
        ws: Arc<WsSettings>,
    },
    /// Not MQTT: the service protocol, served by a `ServerSession`.
    Service,
    /// The service protocol behind a TLS handshake; `cn` as for [`Transport::Tls`].
    ServiceTls { acceptor: TlsAcceptor, cn: bool },
}

/// One bound listener and what its accept loop needs.
pub(crate) struct Listener {
    /// Names the listener in logs (`tcp`, `ws`, `tls`, `wss`, `service`).
    pub name: &'static str,
    /// The handshakes of this listener.
    pub transport: Transport,
    /// How long the handshakes may take together (`mqtt.connect_timeout_secs`).
    pub handshake_timeout: Duration,
    /// The bound socket; dropped when the loop ends, which stops new connections.
    pub listener: TcpListener,
    /// One permit per live connection, `max_connections` in all: the cap that keeps a
    /// flood from exhausting file descriptors and memory.
    pub slots: Arc<Semaphore>,
    /// The node's slots (`listener.max_connections`), shared by every listener.
    pub node_slots: Arc<Semaphore>,
    /// `max_connection_rate`; `None` when unlimited.
    pub rate: Option<Rate>,
    /// Where connections run.
    pub io: Arc<IoArbiters>,
    /// Who serves a connection once it is on its arbiter.
    pub gateway: Gateway,
    /// Who serves a service-protocol connection.
    pub service: Service,
    /// The listener's logger.
    pub log: slog::Logger,
    /// Connections refused because the listener was full; logged at 1, 2, 4, 8, ...
    /// so that a flood is visible without flooding the log.
    pub refused: u64,
}

impl Listener {
    /// Accept until `shutdown` turns true (or its sender is dropped).
    pub(crate) async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = MIN_BACKOFF;
        loop {
            if let Some(rate) = &self.rate {
                // Pace accepting: connections wait in the kernel's backlog meanwhile.
                while let Some(wait) = rate.take(1) {
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.changed() => return self.stopped(),
                    }
                }
            }
            let accepted = tokio::select! {
                r = self.listener.accept() => r,
                _ = shutdown.changed() => break,
            };
            match accepted {
                Ok((stream, peer)) => {
                    backoff = MIN_BACKOFF;
                    self.hand_over(stream, peer);
                }
                Err(e) => {
                    warn!(self.log, "accept failed; backing off";
                        "error" => %e, "backoff_ms" => backoff.as_millis() as u64);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => break,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        self.stopped()
    }

    fn stopped(&self) {
        info!(self.log, "stopped accepting");
    }

    /// Give one accepted connection to an IO arbiter, or close it if we are full.
    fn hand_over(&mut self, stream: TcpStream, peer: SocketAddr) {
        let slots = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| "listener");
        let slots = slots.and_then(|l| {
            let node = self.node_slots.clone().try_acquire_owned();
            node.map(|n| (l, n)).map_err(|_| "node")
        });
        let slot = match slots {
            Ok(slot) => slot,
            Err(which) => {
                // Dropping the stream closes it: the client sees the connection end
                // before CONNACK, the only refusal possible before CONNECT is read.
                self.refused += 1;
                if self.refused.is_power_of_two() {
                    warn!(self.log, "connection refused: max_connections reached";
                        "limit" => which, "peer" => %peer, "refused_so_far" => self.refused);
                }
                return;
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            // The peer may already have gone; the session will find out.
            debug!(self.log, "set TCP_NODELAY failed"; "peer" => %peer, "error" => %e);
        }
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                warn!(self.log, "cannot detach socket"; "peer" => %peer, "error" => %e);
                return;
            }
        };
        let gateway = self.gateway.clone();
        let service = self.service.clone();
        let log = self.log.clone();
        let transport = self.transport.clone();
        let timeout = self.handshake_timeout;
        let spawned = self.io.pick().spawn(async move {
            // Runs on the IO arbiter's thread, so the stream joins that thread's driver
            // and the session actor starts on that arbiter.
            let stream = match TcpStream::from_std(stream) {
                Ok(stream) => Limited {
                    io: stream,
                    _slot: slot,
                },
                Err(e) => {
                    warn!(log, "cannot register socket"; "peer" => %peer, "error" => %e);
                    return;
                }
            };
            let handshake = serve(transport, stream, peer, gateway, service, log.clone());
            if tokio::time::timeout(timeout, handshake).await.is_err() {
                // Dropping the handshake future closes the connection and frees its slot.
                warn!(log, "handshake timed out; connection closed";
                    "peer" => %peer, "timeout_secs" => timeout.as_secs());
            }
        });
        if !spawned {
            debug!(self.log, "IO arbiter has stopped; connection dropped"; "peer" => %peer);
        }
    }
}

/// Run `transport`'s handshakes on `stream` and hand the result to the gateway; on
/// failure, log it with the peer address and drop (close) the connection.
async fn serve(
    transport: Transport,
    stream: Limited<TcpStream>,
    peer: SocketAddr,
    gateway: Gateway,
    service: Service,
    log: slog::Logger,
) {
    match transport {
        Transport::Tcp => gateway.accept(stream, peer),
        Transport::Service => service.accept(stream, peer),
        Transport::ServiceTls { acceptor, cn } => {
            if let Some((tls, info)) = tls_handshake(&acceptor, stream, peer, cn, &log).await {
                service.accept_with(tls, peer, info);
            }
        }
        Transport::Ws(settings) => match ws::accept(stream, &settings).await {
            Ok(io) => gateway.accept(io, peer),
            Err(e) => upgrade_failed(&log, peer, e),
        },
        Transport::Tls { acceptor, cn } => {
            if let Some((tls, info)) = tls_handshake(&acceptor, stream, peer, cn, &log).await {
                gateway.accept_with(tls, peer, info);
            }
        }
        Transport::Wss { acceptor, cn, ws } => {
            let Some((tls, info)) = tls_handshake(&acceptor, stream, peer, cn, &log).await else {
                return;
            };
            match ws::accept(tls, &ws).await {
                Ok(io) => gateway.accept_with(io, peer, info),
                Err(e) => upgrade_failed(&log, peer, e),
            }
        }
    }
}

/// The TLS handshake; `None` (logged) if it failed. With `cn`, the verified client
/// certificate's Common Name becomes the session's username (MQTT or service).
async fn tls_handshake(
    acceptor: &TlsAcceptor,
    stream: Limited<TcpStream>,
    peer: SocketAddr,
    cn: bool,
    log: &slog::Logger,
) -> Option<(TlsStream<Limited<TcpStream>>, ConnInfo)> {
    match acceptor.accept(stream).await {
        Ok(tls) => {
            let mut info = ConnInfo::default();
            if cn {
                info.cert_username = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(|cert| common_name(cert));
                debug!(log, "TLS client certificate"; "peer" => %peer,
                    "cn" => info.cert_username.as_deref().unwrap_or("(none)"));
            }
            Some((tls, info))
        }
        Err(e) => {
            warn!(log, "TLS handshake failed; connection closed"; "peer" => %peer, "error" => %e);
            None
        }
    }
}

fn upgrade_failed(log: &slog::Logger, peer: SocketAddr, e: ws::UpgradeError) {
    match e {
        // An HTTP client that got its answer: routine, not an alarm.
        ws::UpgradeError::Refused { status, reason } => {
            info!(log, "WebSocket upgrade refused"; "peer" => %peer, "status" => status,
                "reason" => reason)
        }
        e => warn!(log, "WebSocket upgrade failed; connection closed";
            "peer" => %peer, "error" => %e),
    }
}

/// A connection that holds one of its listener's slots until the session drops it.
pub(crate) struct Limited<S> {
    /// The socket itself.
    io: S,
    /// The listener's slot and the node's, returned when the connection is dropped.
    _slot: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

impl<S: AsyncRead + Unpin> AsyncRead for Limited<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Limited<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
