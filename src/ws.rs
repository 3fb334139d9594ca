//! MQTT over WebSocket (RFC 6455) for the `ws` and `wss` listeners: the HTTP upgrade,
//! and [`WsIo`], the adapter that turns a WebSocket into the byte stream
//! (`AsyncRead + AsyncWrite`) that `Gateway::accept` and the MQTT session expect. There
//! is no second protocol implementation: after the upgrade, the connection is served by
//! the same `MqttSession` and codec as TCP.
//!
//! Owns, per connection, the WebSocket framing state (tokio-tungstenite's
//! `WebSocketStream`) and the rest of the last binary frame not yet read by the
//! session. An MQTT packet may span frames and a frame may hold several packets: frames
//! are only a transport, the session's decoder sees one continuous stream.
//!
//! Back-pressure: the adapter holds at most one received frame (bounded by
//! `mqtt.max_packet_size`, which is also tungstenite's `max_frame_size` and
//! `max_message_size`) and reads the next one only when the session asks for more
//! bytes (one read may take several frames that have already arrived, up to the
//! session's buffer), so a session that stops reading stops the socket; on the way out, `poll_write`
//! accepts a buffer only once the previous frame has been flushed to the socket, so the
//! session's own write back-pressure (`mqtt.max_write_buffer`) sees a slow WebSocket
//! client exactly as it sees a slow TCP client.
//!
//! The upgrade ([`accept`]) first reads the request head itself (at most
//! [`MAX_REQUEST_HEAD`] bytes), so that a request that is not a WebSocket upgrade gets
//! a plain HTTP error with a body (400, or 404 for another path) instead of a dropped
//! connection; an upgrade request then goes to tungstenite's `accept_hdr_async`, whose
//! callback checks the path (404) and picks the subprotocol: `mqtt`, else `mqttv3.1`,
//! echoed in the response (a request offering only others gets 400; one offering none
//! is accepted, as most brokers do).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// The WebSocket subprotocols accepted, in order of preference. `mqtt` is the name the
/// MQTT 3.1.1 and 5.0 specifications register; `mqttv3.1` is what MQTT 3.1 clients
/// (and older Paho JavaScript) send.
pub const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// The largest HTTP request head read before the upgrade (request line and headers).
pub const MAX_REQUEST_HEAD: usize = 8192;

/// Most headers parsed in the request head.
const MAX_HEADERS: usize = 64;

/// Settings of one WebSocket listener.
#[derive(Clone, Debug)]
pub struct WsSettings {
    /// The HTTP path of the endpoint (`listener.ws.path`).
    pub path: String,
    /// The largest frame and message accepted: `mqtt.max_packet_size`.
    pub max_frame: usize,
}

impl WsSettings {
    fn config(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .max_message_size(Some(self.max_frame))
            .max_frame_size(Some(self.max_frame))
    }
}

/// Why an upgrade did not happen.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The request was refused with this HTTP status (the response has been sent).
    #[error("refused with HTTP {status}: {reason}")]
    Refused {
        /// What the client got.
        status: u16,
        /// Why, for the log.
        reason: String,
    },
    /// The connection failed or closed during the upgrade.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// tungstenite's handshake failed.
    #[error("{0}")]
    WebSocket(#[from] WsError),
}

/// Upgrade `stream` to a WebSocket, or answer with an HTTP error and give up. The caller
/// bounds the time this takes.
pub async fn accept<S>(
    mut stream: S,
    settings: &WsSettings,
) -> Result<WsIo<Rewind<S>>, UpgradeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let head = read_head(&mut stream).await?;
    if let Err((status, reason)) = check_request(&head, &settings.path) {
        let body = match status {
            404 => format!(
                "Not found. MQTT over WebSocket is served at {}\n",
                settings.path
            ),
            431 => "Request header too large.\n".to_string(),
            _ => format!(
                "This endpoint serves MQTT over WebSocket: connect with a WebSocket client \
                 to {} (subprotocol \"mqtt\"). Problem: {reason}.\n",
                settings.path
            ),
        };
        respond(&mut stream, status, &body).await;
        return Err(UpgradeError::Refused {
            status,
            reason: reason.into(),
        });
    }

    let path = settings.path.clone();
    // The signature is tungstenite's `Callback`: its error type is an HTTP response.
    #[allow(clippy::result_large_err)]
    let callback = move |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() != path {
            return Err(error_response(
                StatusCode::NOT_FOUND,
                format!("Not found. MQTT over WebSocket is served at {path}\n"),
            ));
        }
        match choose_subprotocol(req) {
            Ok(Some(p)) => {
                resp.headers_mut()
                    .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(p));
                Ok(resp)
            }
            Ok(None) => Ok(resp),
            Err(()) => Err(error_response(
                StatusCode::BAD_REQUEST,
                format!(
                    "Unsupported WebSocket subprotocol: this endpoint speaks {}\n",
                    SUBPROTOCOLS.join(" or ")
                ),
            )),
        }
    };
    let rewound = Rewind {
        prefix: Bytes::from(head),
        inner: stream,
    };
    match tokio_tungstenite::accept_hdr_async_with_config(
        rewound,
        callback,
        Some(settings.config()),
    )
    .await
    {
        Ok(ws) => Ok(WsIo::new(ws)),
        Err(WsError::Http(resp)) => Err(UpgradeError::Refused {
            status: resp.status().as_u16(),
            reason: String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default())
                .trim_end()
                .to_string(),
        }),
        Err(e) => Err(e.into()),
    }
}

fn error_response(status: StatusCode, body: String) -> ErrorResponse {
    let mut resp = ErrorResponse::new(Some(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        "Content-Type",
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp.headers_mut()
        .insert("Connection", HeaderValue::from_static("close"));
    resp
}

/// The subprotocol to echo: `Ok(None)` if the client offered none, `Err` if it offered
/// only ones we do not speak.
fn choose_subprotocol(req: &Request) -> Result<Option<&'static str>, ()> {
    let offered: Vec<&str> = req
        .headers()
        .get_all("Sec-WebSocket-Protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    if offered.is_empty() {
        return Ok(None);
    }
    SUBPROTOCOLS
        .iter()
        .find(|ours| offered.contains(ours))
        .map(|p| Some(*p))
        .ok_or(())
}

/// Read the request head: everything up to and including the blank line. Bytes read
/// past it (a client that does not wait for the 101) stay in the returned buffer, and
/// tungstenite refuses them.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Vec<u8>, UpgradeError> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before the end of the HTTP request",
            )
            .into());
        }
        let searched_from = head.len().saturating_sub(3);
        head.extend_from_slice(&chunk[..n]);
        if head[searched_from..].windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(head);
        }
        if head.len() > MAX_REQUEST_HEAD {
            // Let check_request answer 431 on what we have.
            return Ok(head);
        }
    }
}

/// Whether `head` is a WebSocket upgrade of `path` that tungstenite will accept; if
/// not, the status and reason to answer with. The same checks as tungstenite's own
/// (which would drop the connection without a response).
fn check_request(head: &[u8], path: &str) -> Result<(), (u16, &'static str)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err((431, "request head too large")),
        Err(httparse::Error::TooManyHeaders) => return Err((431, "too many headers")),
        Err(_) => return Err((400, "not an HTTP request")),
    }
    let target = req.path.unwrap_or_default();
    let req_path = target.split('?').next().unwrap_or_default();
    if req_path != path {
        return Err((404, "wrong path"));
    }
    if req.method != Some("GET") {
        return Err((400, "the method must be GET"));
    }
    if req.version != Some(1) {
        return Err((400, "HTTP/1.1 is required"));
    }
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    if !header("Upgrade").is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket")) {
        return Err((
            400,
            "not a WebSocket upgrade (no \"Upgrade: websocket\" header)",
        ));
    }
    if !header("Connection").is_some_and(|v| {
        v.split([' ', ','])
            .any(|t| t.eq_ignore_ascii_case("upgrade"))
    }) {
        return Err((400, "no \"Connection: Upgrade\" header"));
    }
    if header("Sec-WebSocket-Version") != Some("13") {
        return Err((400, "Sec-WebSocket-Version must be 13"));
    }
    if header("Sec-WebSocket-Key").is_none() {
        return Err((400, "no Sec-WebSocket-Key header"));
    }
    Ok(())
}

/// Send a small HTTP error response and close our side; errors are ignored (the client
/// may be gone already).
async fn respond<S: AsyncWrite + Unpin>(stream: &mut S, status: u16, body: &str) {
    let reason = match status {
        400 => "Bad Request",
        404 => "Not Found",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    };
    let msg = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(msg.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// A stream that first yields `prefix` (bytes already read from `inner`), then reads
/// `inner`. Writes go straight to `inner`.
pub struct Rewind<S> {
    /// What is left of the bytes read before the handshake.
    prefix: Bytes,
    /// The connection.
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Why the adapter is closing the WebSocket itself.
#[derive(Debug)]
struct Closing {
    /// The close code sent to the client.
    code: CloseCode,
    /// The reason sent with it, and the error the session sees.
    reason: &'static str,
    /// Whether the close frame has been queued.
    queued: bool,
}

/// A WebSocket as an MQTT byte stream: binary frames in, one binary frame per write
/// out. Pings are answered and close handshakes completed by tungstenite underneath;
/// a text frame closes the connection with 1003, an oversized frame or message with
/// 1009, any other protocol violation with 1002, and the session then sees a read
/// error. See the module documentation for back-pressure.
pub struct WsIo<S> {
    /// The WebSocket.
    ws: WebSocketStream<S>,
    /// The unread rest of the last binary frame.
    rbuf: Bytes,
    /// A frame was accepted by `poll_write` but its flush returned `Pending`: the next
    /// write waits for it, and reads drive it meanwhile, so that it cannot sit in
    /// tungstenite's buffer while the session has nothing more to send.
    unflushed: bool,
    /// Set when the adapter has decided to close the connection.
    closing: Option<Closing>,
}

fn ws_io_error(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            io::Error::new(io::ErrorKind::BrokenPipe, "WebSocket closed")
        }
        other => io::Error::other(other),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsIo<S> {
    /// Wrap an upgraded WebSocket.
    pub fn new(ws: WebSocketStream<S>) -> WsIo<S> {
        WsIo {
            ws,
            rbuf: Bytes::new(),
            unflushed: false,
            closing: None,
        }
    }

    /// The underlying connection (e.g. to read a TLS peer certificate).
    pub fn get_ref(&self) -> &S {
        self.ws.get_ref()
    }

    /// Drive a flush left pending by `poll_write`; errors surface on the next write.
    fn drive_flush(&mut self, cx: &mut Context<'_>) {
        if self.unflushed {
            if let Poll::Ready(r) = Pin::new(&mut self.ws).poll_flush(cx) {
                self.unflushed = r.is_err();
            }
        }
    }

    /// Send our close frame and then fail the read with the reason.
    fn poll_close_with(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(closing) = self.closing.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let err = io::Error::new(io::ErrorKind::InvalidData, closing.reason);
        if !closing.queued {
            if ready!(Pin::new(&mut self.ws).poll_ready(cx)).is_err() {
                return Poll::Ready(Err(err));
            }
            let frame = CloseFrame {
                code: closing.code,
                reason: closing.reason.into(),
            };
            closing.queued = true;
            if Pin::new(&mut self.ws)
                .start_send(Message::Close(Some(frame)))
                .is_err()
            {
                return Poll::Ready(Err(err));
            }
        }
        // Flushed or failed: either way the session is told, and drops the connection.
        let _ = ready!(Pin::new(&mut self.ws).poll_flush(cx));
        Poll::Ready(Err(err))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.drive_flush(cx);
        // Fill `buf` from as many frames as are already here (a browser sends one
        // packet per frame, and the session decodes a whole read at a time); stop at
        // the first frame that is not here yet, once something has been read.
        let mut filled = false;
        loop {
            if this.closing.is_some() {
                if filled {
                    // Hand over what came before the bad frame; close on the next read.
                    return Poll::Ready(Ok(()));
                }
                return this.poll_close_with(cx);
            }
            if !this.rbuf.is_empty() {
                let n = this.rbuf.len().min(buf.remaining());
                buf.put_slice(&this.rbuf[..n]);
                this.rbuf.advance(n);
                filled = true;
                if buf.remaining() == 0 {
                    return Poll::Ready(Ok(()));
                }
            }
            let next = match Pin::new(&mut this.ws).poll_next(cx) {
                Poll::Ready(next) => next,
                Poll::Pending if filled => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            };
            let (code, reason) = match next {
                // The close handshake is complete (or the peer just went): EOF, after
                // whatever was read before (the stream stays ended on the next read).
                None => return Poll::Ready(Ok(())),
                Some(Ok(Message::Binary(data))) => {
                    this.rbuf = data;
                    continue;
                }
                // tungstenite answers pings and close frames itself; the stream ends
                // after a close.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Close(_))) => continue,
                Some(Ok(Message::Frame(_))) => continue,
                Some(Ok(Message::Text(_))) => (
                    CloseCode::Unsupported,
                    "text frames are not MQTT: use binary frames",
                ),
                // The peer closed the TCP connection without a close frame: to the
                // session that is the same as a TCP peer going away.
                Some(Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake))) => {
                    return Poll::Ready(Ok(()))
                }
                Some(Err(WsError::Capacity(_))) => (
                    CloseCode::Size,
                    "frame larger than the maximum MQTT packet size",
                ),
                Some(Err(WsError::Protocol(_) | WsError::Utf8)) => {
                    (CloseCode::Protocol, "WebSocket protocol violation")
                }
                // Keep the bytes already read; the stream is ended, so the next read
                // sees EOF.
                Some(Err(_)) if filled => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(ws_io_error(e))),
            };
            this.closing = Some(Closing {
                code,
                reason,
                queued: false,
            });
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut ws = Pin::new(&mut this.ws);
        if this.unflushed {
            ready!(ws.as_mut().poll_flush(cx)).map_err(ws_io_error)?;
            this.unflushed = false;
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(ws.as_mut().poll_ready(cx)).map_err(ws_io_error)?;
        ws.as_mut()
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(ws_io_error)?;
        match ws.poll_flush(cx) {
            Poll::Ready(r) => r.map_err(ws_io_error)?,
            Poll::Pending => this.unflushed = true,
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.ws).poll_flush(cx)).map_err(ws_io_error)?;
        this.unflushed = false;
        Poll::Ready(Ok(()))
    }

    /// Starts the close handshake (close code 1000 is implied by an empty close frame)
    /// and flushes it; the connection itself closes when the session drops it.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match ready!(Pin::new(&mut this.ws).poll_close(cx)) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(ws_io_error(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade(path: &str, extra: &str) -> Vec<u8> {
        format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
        )
        .into_bytes()
    }

    #[test]
    fn checks_the_request_like_tungstenite() {
        assert_eq!(check_request(&upgrade("/mqtt", ""), "/mqtt"), Ok(()));
        assert_eq!(check_request(&upgrade("/mqtt?x=1", ""), "/mqtt"), Ok(()));
        assert_eq!(
            check_request(&upgrade("/other", ""), "/mqtt").map_err(|e| e.0),
            Err(404)
        );
        let plain = b"GET /mqtt HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(check_request(plain, "/mqtt").map_err(|e| e.0), Err(400));
        let post = b"POST /mqtt HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(check_request(post, "/mqtt").map_err(|e| e.0), Err(400));
        assert_eq!(
            check_request(b"\x10\x0c\x00\x04MQTT\r\n\r\n", "/mqtt").map_err(|e| e.0),
            Err(400)
        );
        let old = b"GET /mqtt HTTP/1.0\r\nUpgrade: websocket\r\n\r\n";
        assert_eq!(check_request(old, "/mqtt").map_err(|e| e.0), Err(400));
    }
}
