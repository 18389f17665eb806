//! The HTTP server loop, with the connection hygiene a public endpoint needs: hyper's own
//! header-read timeout (which also closes a connection idle between requests), a bound on the
//! time a request body may take, a cap on open connections overall and per client address, a
//! 400 for a request framed both by `Transfer-Encoding` and `Content-Length` ([`crate::wire`]),
//! and a graceful drain on shutdown.
//!
//! Why not `axum::serve`: it sets no timeout at all, so a client sending one header byte every
//! few seconds, or nothing, or trickling a body, holds a connection and its task forever
//! (slowloris).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use sluice_proto::ErrorCode;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tower::ServiceExt;

use crate::error::ApiError;
use crate::wire::ScannedIo;

/// What a client connection may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// To send a request's headers, and to stay idle between requests.
    pub header_read: Duration,
    /// To send a request's whole body.
    pub body_read: Duration,
    /// To send a file upload's whole body (`POST /v1/files`).
    pub upload_read: Duration,
    /// Open connections at once.
    pub max_connections: usize,
    /// Open connections at once from one client address (the TCP peer: behind a proxy, the
    /// proxy). `0`: no per-address cap.
    pub max_connections_per_client: usize,
}

/// Serves `app` on `listener` until `stopping` turns true, then stops accepting, tells every
/// open connection to finish its current request and close, and returns once all have closed
/// (the caller bounds that wait with its grace period).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    mut stopping: watch::Receiver<bool>,
) {
    let (body_read, upload_read) = (limits.body_read, limits.upload_read);
    let app = app.layer(axum::middleware::map_request(
        move |request: axum::extract::Request| async move {
            let timeout = if request.uri().path() == crate::routes::FILES_PATH {
                upload_read
            } else {
                body_read
            };
            request.map(|body| {
                axum::body::Body::new(tower_http::timeout::TimeoutBody::new(timeout, body))
            })
        },
    ));
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let per_client = PerClient::default();
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = stopped(&mut stopping) => break,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopped(&mut stopping) => break,
        };
        // Small responses and event-stream chunks go out at once: with Nagle on, an SSE
        // event written after the headers waited for the client's delayed ACK (about 40 ms).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let Some(client_slot) = per_client.enter(peer.ip(), limits.max_connections_per_client)
        else {
            tokio::spawn(refuse_over_client_cap(tcp, permit));
            continue;
        };
        let io = ScannedIo::new(tcp);
        let ambiguous = io.flag();
        let app = app.clone();
        let service = tower::service_fn(move |mut request: axum::http::Request<Incoming>| {
            let app = app.clone();
            let ambiguous = ambiguous.load(Ordering::Acquire);
            // Boxed: the connection is polled without shutdown, which needs an `Unpin` future.
            Box::pin(async move {
                if ambiguous {
                    return Ok(ambiguous_framing());
                }
                request.extensions_mut().insert(ConnectInfo(peer));
                app.oneshot(request).await
            })
        });
        let mut stopping = stopping.clone();
        tokio::spawn(async move {
            // HTTP/1.1 only (hyper-util's version-sniffing builder waits for the first bytes
            // with no timeout, before hyper's own header timer starts).
            let mut connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read)
                .serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
            let mut draining = false;
            loop {
                tokio::select! {
                    result = std::future::poll_fn(|cx| connection.poll_without_shutdown(cx)) => {
                        match result {
                            Ok(()) => linger(connection.into_parts().io.into_inner().into_inner()).await,
                            Err(e) => {
                                tracing::debug!(%peer, error = %e, "connection ended with an error");
                            }
                        }
                        break;
                    }
                    () = stopped(&mut stopping), if !draining => {
                        draining = true;
                        std::pin::Pin::new(&mut connection).graceful_shutdown();
                    }
                }
            }
            drop(client_slot);
            drop(permit);
        });
    }
    // Every open connection holds a permit: once all are back, the drain is over.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = permits.acquire_many(all).await;
}

/// Closes a connection the way a server that may have refused a body should: send FIN, then
/// read and discard what the client still sends (the body of a request answered 413 at once,
/// say) until it closes too, for at most [`LINGER`] and [`LINGER_BYTES`]. Closing a socket
/// with unread input makes the kernel answer with a reset, which can destroy the response
/// still on its way to the client.
async fn linger(mut tcp: tokio::net::TcpStream) {
    use tokio::io::AsyncReadExt;
    if tcp.shutdown().await.is_err() {
        return;
    }
    let mut buf = [0u8; 8192];
    let mut left = LINGER_BYTES;
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(n @ 1..) = tcp.read(&mut buf).await {
            left = left.saturating_sub(n);
            if left == 0 {
                break;
            }
        }
    })
    .await;
}

/// How long [`linger`] waits for the client to close.
const LINGER: Duration = Duration::from_secs(2);
/// How much of an unwanted body [`linger`] reads at most.
const LINGER_BYTES: usize = 1 << 20;

/// 400 for a request whose header block held both `Transfer-Encoding` and `Content-Length`.
fn ambiguous_framing() -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut response = ApiError::client(
        ErrorCode::InvalidRequest,
        "the request has both Transfer-Encoding and Content-Length: send one",
    )
    .into_response();
    response.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    response
}

/// Open connections per client address.
#[derive(Clone, Default)]
struct PerClient(Arc<Mutex<HashMap<IpAddr, usize>>>);

/// One open connection of one address; counted down on drop.
struct ClientSlot {
    clients: PerClient,
    ip: IpAddr,
}

impl PerClient {
    /// A slot for one more connection from `ip`, or `None` when it holds `cap` already.
    fn enter(&self, ip: IpAddr, cap: usize) -> Option<ClientSlot> {
        let mut open = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(ip).or_insert(0);
        if cap > 0 && *count >= cap {
            return None;
        }
        *count += 1;
        Some(ClientSlot {
            clients: self.clone(),
            ip,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.clients.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Answers a connection over its address's cap with a 429 and closes it, without reading the
/// request (a bounded write: a client that does not read is dropped after a second).
async fn refuse_over_client_cap(
    mut tcp: tokio::net::TcpStream,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    const BODY: &str = r#"{"error":{"code":"rate_limited","message":"too many open connections from this address"}}"#;
    let response = format!(
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        tcp.write_all(response.as_bytes()).await?;
        tcp.shutdown().await
    })
    .await;
    drop(permit);
}

/// Resolves once `stopping` is true (or its sender is gone).
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is dropped here: it must not live across an await.
    let _ = stopping.wait_for(|s| *s).await.map(|_| ());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn server(limits: ConnectionLimits) -> (SocketAddr, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = Router::new().route(
            "/",
            axum::routing::post(|body: axum::body::Bytes| async move { body.len().to_string() }),
        );
        let (tx, rx) = watch::channel(false);
        tokio::spawn(serve(listener, app, limits, rx));
        (addr, tx)
    }

    const LIMITS: ConnectionLimits = ConnectionLimits {
        header_read: Duration::from_millis(300),
        body_read: Duration::from_millis(300),
        upload_read: Duration::from_millis(300),
        max_connections: 2,
        max_connections_per_client: 0,
    };

    /// Reads until the server closes the connection; how long that took.
    async fn closed_after(stream: &mut tokio::net::TcpStream, what: &str) -> (Duration, String) {
        let started = std::time::Instant::now();
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out));
        assert!(
            read.await.is_ok(),
            "the server never closed the {what} connection"
        );
        (
            started.elapsed(),
            String::from_utf8_lossy(&out).into_owned(),
        )
    }

    #[tokio::test]
    async fn silent_slow_and_idle_connections_are_closed() {
        let (addr, _stop) = server(LIMITS).await;
        // Sends nothing.
        let mut silent = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (took, _) = closed_after(&mut silent, "silent").await;
        assert!(took < Duration::from_secs(3), "{took:?}");
        // Half a request line, then nothing more.
        let mut slow = tokio::net::TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"POST / HT").await.expect("write");
        let (took, _) = closed_after(&mut slow, "slow").await;
        assert!(took < Duration::from_secs(3), "{took:?}");
        // A finished request on a keep-alive connection, then idle.
        let mut idle = tokio::net::TcpStream::connect(addr).await.expect("connect");
        idle.write_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nhi")
            .await
            .expect("write");
        let (took, answer) = closed_after(&mut idle, "idle").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(took < Duration::from_secs(3), "{took:?}");
    }

    #[tokio::test]
    async fn a_trickled_body_is_cut_off() {
        let (addr, _stop) = server(LIMITS).await;
        let mut trickle = tokio::net::TcpStream::connect(addr).await.expect("connect");
        trickle
            .write_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nab")
            .await
            .expect("write");
        let (took, answer) = closed_after(&mut trickle, "trickling").await;
        assert!(took < Duration::from_secs(3), "{took:?}");
        assert!(!answer.starts_with("HTTP/1.1 200"), "{answer}");
    }

    #[tokio::test]
    async fn connections_past_the_cap_wait_and_shutdown_drains() {
        let (addr, stop) = server(ConnectionLimits {
            header_read: Duration::from_secs(30),
            ..LIMITS
        })
        .await;
        let _a = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let _b = tokio::net::TcpStream::connect(addr).await.expect("connect");
        // The third is accepted by the kernel but not served while two are open.
        let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
        c.write_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 16];
        let early = tokio::time::timeout(Duration::from_millis(500), c.read(&mut buf)).await;
        assert!(early.is_err(), "served past the cap");
        drop(_a);
        let served = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await;
        assert!(matches!(served, Ok(Ok(n)) if n > 0), "{served:?}");
        stop.send(true).expect("stop");
    }

    #[tokio::test]
    async fn a_client_past_its_own_cap_gets_a_429() {
        let (addr, _stop) = server(ConnectionLimits {
            header_read: Duration::from_secs(30),
            max_connections: 8,
            max_connections_per_client: 2,
            ..LIMITS
        })
        .await;
        let a = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let _b = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (_, answer) = closed_after(&mut c, "third").await;
        assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
        assert!(answer.contains(r#""code":"rate_limited""#), "{answer}");
        // A closed connection frees its slot.
        drop(a);
        let mut d = tokio::net::TcpStream::connect(addr).await.expect("connect");
        d.write_all(
            b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nconnection: close\r\n\r\nhi",
        )
        .await
        .expect("write");
        let (_, answer) = closed_after(&mut d, "freed").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }

    #[tokio::test]
    async fn a_body_refused_unread_still_gets_its_answer() {
        // A route that answers before reading the body, as the 413 on a declared
        // Content-Length over the limit does.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = Router::new().route(
            "/",
            axum::routing::post(|| async { (axum::http::StatusCode::PAYLOAD_TOO_LARGE, "no") }),
        );
        let (_stop, rx) = watch::channel(false);
        tokio::spawn(serve(listener, app, LIMITS, rx));
        for _ in 0..20 {
            let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (mut read, mut write) = stream.into_split();
            let body = vec![b'x'; 512 * 1024];
            let writer = tokio::spawn(async move {
                let head = format!(
                    "POST / HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                let _ = write.write_all(head.as_bytes()).await;
                let _ = write.write_all(&body).await;
                write
            });
            let mut answer = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(10), read.read_to_end(&mut answer));
            let result = read.await.expect("closed in time");
            let answer = String::from_utf8_lossy(&answer);
            assert!(
                result.is_ok(),
                "reset before the answer: {result:?} {answer}"
            );
            assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
            drop(writer.await);
        }
    }

    #[tokio::test]
    async fn ambiguous_framing_is_refused_and_smuggles_nothing() {
        let (addr, _stop) = server(LIMITS).await;
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        // Framed by Content-Length, the body is "0\r\n\r\n" followed by a second request; framed
        // by Transfer-Encoding, the body is empty and the second request is smuggled in.
        stream
            .write_all(
                b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nPOST / HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nhi",
            )
            .await
            .expect("write");
        let (_, answer) = closed_after(&mut stream, "ambiguous").await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains(r#""code":"invalid_request""#), "{answer}");
        assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
    }
}
