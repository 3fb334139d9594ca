//! Accepting connections: one accept loop per enabled listener, and the pool of IO
//! arbiters that run the connections.
//!
//! The accept loop runs on the node's own arbiter and does as little as it can: it
//! takes a connection slot (or closes the socket when the listener is full), sets
//! `TCP_NODELAY`, and hands a *std* socket to the next IO arbiter, round-robin. The
//! arbiter re-registers the socket with its own IO driver (a tokio stream stays bound
//! to the driver of the thread that created it) and gives it to the gateway, which
//! starts the session actor there.
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

use actimq_actors::mqtt::Gateway;
use actix_rt::ArbiterHandle;
use slog::{debug, info, warn};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

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

/// One bound listener and what its accept loop needs.
pub(crate) struct Listener {
    /// Names the listener in logs (`tcp`).
    pub name: &'static str,
    /// The bound socket; dropped when the loop ends, which stops new connections.
    pub listener: TcpListener,
    /// One permit per live connection, `max_connections` in all: the cap that keeps a
    /// flood from exhausting file descriptors and memory.
    pub slots: Arc<Semaphore>,
    /// Where connections run.
    pub io: Arc<IoArbiters>,
    /// Who serves a connection once it is on its arbiter.
    pub gateway: Gateway,
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
        info!(self.log, "stopped accepting");
    }

    /// Give one accepted connection to an IO arbiter, or close it if we are full.
    fn hand_over(&mut self, stream: TcpStream, peer: SocketAddr) {
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            // Dropping the stream closes it: the client sees the connection end before
            // CONNACK, which is the only refusal possible before CONNECT is read.
            self.refused += 1;
            if self.refused.is_power_of_two() {
                warn!(self.log, "connection refused: max_connections reached";
                    "peer" => %peer, "refused_so_far" => self.refused);
            }
            return;
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
        let log = self.log.clone();
        let spawned = self.io.pick().spawn(async move {
            // Runs on the IO arbiter's thread, so the stream joins that thread's driver
            // and the session actor starts on that arbiter.
            match TcpStream::from_std(stream) {
                Ok(stream) => gateway.accept(
                    Limited {
                        io: stream,
                        _slot: slot,
                    },
                    peer,
                ),
                Err(e) => warn!(log, "cannot register socket"; "peer" => %peer, "error" => %e),
            }
        });
        if !spawned {
            debug!(self.log, "IO arbiter has stopped; connection dropped"; "peer" => %peer);
        }
    }
}

/// A connection that holds one of its listener's slots until the session drops it.
pub(crate) struct Limited<S> {
    /// The socket itself.
    io: S,
    /// Returned to the listener's semaphore when the connection is dropped.
    _slot: OwnedSemaphorePermit,
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
