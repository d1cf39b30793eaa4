//! Serving one accepted client connection as HTTP/1 or HTTP/2, with graceful shutdown: when the
//! proxy drains, the connection stops taking new requests and finishes the ones in flight.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::hibernate::{Activity, ActivityService, HibernatingIo};
use super::{h2_client, ProxyError, ResponseBody};
use crate::shutdown::Shutdown;

/// The largest request head (request line and headers) the proxy takes, as nginx and HAProxy
/// bound theirs: a client can't make the app receive 100 KB headers. HTTP/1 heads are measured
/// by `ValidateRequest` (answered 431): hyper's only bound is its read buffer, and a 64 KiB
/// buffer would cost large bodies extra reads and writes. h2 announces and enforces it as
/// SETTINGS_MAX_HEADER_LIST_SIZE.
pub const MAX_REQUEST_HEAD: usize = 64 * 1024;

/// What serves a connection's requests: a direction's stack, adapted to hyper.
pub trait ConnService:
    Service<
        Request<Incoming>,
        Response = Response<ResponseBody>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<S> ConnService for S where
    S: Service<
            Request<Incoming>,
            Response = Response<ResponseBody>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// Serves an accepted connection whose protocol detection found HTTP/1 or h2, in a task of its
/// own (tracked, so drain waits for it); the accepting task ends here.
///
/// Why a task: every poll of a connection's requests would otherwise pass through the futures
/// of its accept path (mesh TLS, detection, authorization). Their poll functions are sized by
/// those rare paths: 17-18 KiB of stack each, probed a page at a time on every call, so each
/// request touched more stack than L1 holds.
pub fn serve<I, S>(h2: bool, io: I, svc: S, shutdown: &Shutdown)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: ConnService,
{
    let tracker = shutdown.tracker().clone();
    if h2 {
        tracker.spawn(serve_h2(io, svc, shutdown.clone()));
    } else {
        tracker.spawn(session(
            io,
            None,
            svc,
            Arc::new(Activity::default()),
            shutdown.clone(),
        ));
    }
}

async fn serve_h2<I, S>(io: I, svc: S, shutdown: Shutdown)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: ConnService,
{
    let conn = h2_connection(io, BoxedStreams(svc));
    drive("h2", conn, &shutdown, |c| {
        c.get_mut().as_mut().graceful_shutdown()
    })
    .await
}

/// A connection's service for hyper's h2 server, whose every stream is a task of its own: the
/// stack's future goes into the task boxed. Unboxed, the whole future (the stack's every stage)
/// was copied as hyper built the stream's future and spawned it, and again as the finished task
/// swapped it for its output (h2c GET, 64 streams: memcpy 6,521 of 31,752 instructions per
/// request; boxed, 5,383 of 30,930, the box's allocation included). HTTP/1 keeps it unboxed:
/// hyper holds an HTTP/1 connection's one future in place.
#[derive(Clone)]
struct BoxedStreams<S>(S);

impl<S: ConnService> Service<Request<Incoming>> for BoxedStreams<S> {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<S::Future>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        Box::pin(self.0.call(req))
    }
}

/// An h2 connection. Boxed, like each HTTP/1 session's, so the connection's task stays small,
/// and built in a frame of its own (as `http1_connection`).
#[inline(never)]
fn h2_connection<I, S>(io: I, svc: S) -> Pin<Box<http2::Connection<TokioIo<I>, S, TokioExecutor>>>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: ConnService,
{
    Box::pin(
        http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // Fixed windows, the h2 client's: hyper's adaptive window would ping the client
            // to measure each connection's bandwidth-delay product and check on that ping
            // whenever the connection is polled (~400 instructions per gRPC request).
            .initial_stream_window_size(h2_client::STREAM_WINDOW)
            .initial_connection_window_size(h2_client::CONNECTION_WINDOW)
            .max_concurrent_streams(10_000)
            // A larger header block is refused with 431 (h2 does it for the stream).
            .max_header_list_size(MAX_REQUEST_HEAD as u32)
            .serve_connection(TokioIo::new(io), svc),
    )
}

/// HTTP/1 in sessions: each session is one hyper connection, which ends when the client hangs
/// up or when the connection goes quiet between requests and hibernates (see `hibernate`).
/// A hibernating connection is parked in a task of its own that holds only the socket and the
/// stack; the client's next byte starts the next session in a new task. (Awaiting it here would
/// keep this task, sized for hyper, alive for the whole idle time.)
async fn session<I, S>(
    io: I,
    first: Option<u8>,
    svc: S,
    activity: Arc<Activity>,
    shutdown: Shutdown,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: ConnService,
{
    let (session_io, returned) = HibernatingIo::new(io, first, activity.clone());
    let conn = http1_connection(
        session_io,
        ActivityService::new(svc.clone(), activity.clone()),
    );
    drive("http/1", conn, &shutdown, |c| {
        c.get_mut().as_mut().graceful_shutdown()
    })
    .await;
    // Otherwise the client hung up, hyper closed, or an upgrade took the socket.
    if let Some(io) = returned.take() {
        tracing::debug!("idle connection hibernated");
        let tracker = shutdown.tracker().clone();
        tracker.spawn(park(io, svc, activity, shutdown));
    }
}

/// A session's hyper connection. Boxed so the task's own state stays small, and built in a frame
/// of its own (as `boxed_out_of_line` does) so its size is not in the frame of every poll of the
/// session.
#[inline(never)]
#[allow(clippy::type_complexity)]
fn http1_connection<I, S>(
    io: HibernatingIo<I>,
    svc: ActivityService<S>,
) -> Pin<Box<http1::UpgradeableConnection<TokioIo<HibernatingIo<I>>, ActivityService<S>>>>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: ConnService,
{
    Box::pin(
        http1::Builder::new()
            .keep_alive(true)
            // Vectored writes, hyper's default on TCP (here and in the pool's client). Flattened
            // writes (`.writev(false)`: the body copied behind the head, one `write`) were
            // measured: 2.5-2.7% fewer instructions per HTTP/1.1 GET (each vectored flush
            // fills a 64-entry IoSlice array), but a 64 KiB POST's hop took ~3.5 µs more user
            // time (benches/hop_cpu.py, 18.0 -> 21.5 µs), a cost that grows with the body.
            // HibernatingIo guards the head's time, without a timer per request.
            .header_read_timeout(None)
            .serve_connection(TokioIo::new(io), svc)
            .with_upgrades(),
    )
}

/// A hibernating connection: waits for the client's next byte, then starts a session.
fn park<I, S>(
    mut io: I,
    svc: S,
    activity: Arc<Activity>,
    shutdown: Shutdown,
) -> Pin<Box<dyn Future<Output = ()> + Send>>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: ConnService,
{
    Box::pin(async move {
        let mut byte = [0u8; 1];
        let first = tokio::select! {
            read = io.read(&mut byte) => match read {
                Ok(1) => byte[0],
                // Closed (or failed) while hibernating.
                _ => return,
            },
            _ = shutdown.signaled() => return,
        };
        let tracker = shutdown.tracker().clone();
        tracker.spawn(session(io, Some(first), svc, activity, shutdown));
    })
}

/// Runs a connection to its end; once shutdown begins it takes no new requests and finishes the
/// ones in flight.
async fn drive<C>(
    proto: &str,
    conn: C,
    shutdown: &Shutdown,
    graceful_shutdown: impl FnOnce(Pin<&mut C>),
) where
    C: Future<Output = Result<(), hyper::Error>>,
{
    tokio::pin!(conn);
    // Biased: polled in this order, without a random draw on every wake-up.
    let res = tokio::select! {
        biased;
        res = conn.as_mut() => res,
        _ = shutdown.signaled() => {
            graceful_shutdown(conn.as_mut());
            conn.await
        }
    };
    if let Err(e) = res {
        log_conn_error(proto, &e);
    }
}

fn log_conn_error(proto: &str, e: &hyper::Error) {
    if e.is_parse() || e.is_parse_status() || e.is_parse_too_large() {
        crate::warn_limited!("malformed_request", protocol = proto, error = %e, "malformed request; answered 4xx and closed");
    } else {
        tracing::debug!(protocol = proto, error = %e, "client connection closed with error");
    }
}

/// The first request on the connection could not be parsed: answer 400 with the reason and
/// close. hyper handles later malformed requests on a kept-alive connection the same way.
pub async fn reject_malformed<I>(mut io: I, peer: std::net::SocketAddr)
where
    I: AsyncWrite + Unpin,
{
    let err = ProxyError::MalformedRequest;
    crate::warn_limited!("malformed_request", client = %peer, error = %err, "malformed HTTP/1 request; answering 400");
    let rsp = format!(
        "HTTP/1.1 400 Bad Request\r\n{}: {reason}\r\n{}: {reason}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        super::errors::PROXY_ERROR_HEADER,
        super::errors::L5D_PROXY_ERROR_HEADER,
        reason = err.reason()
    );
    let _ = io.write_all(rsp.as_bytes()).await;
    let _ = io.shutdown().await;
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::time::Instant;

    use super::super::hibernate::HEAD_READ_TIMEOUT;
    use super::*;

    /// A client connection to a served HTTP/1 connection whose service answers with the
    /// request body's length, once it has all of it.
    fn connect() -> DuplexStream {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
            let len = match req.into_body().collect().await {
                Ok(body) => body.to_bytes().len(),
                Err(_) => 0,
            };
            Ok::<_, Infallible>(Response::new(ResponseBody::full(Bytes::from(
                len.to_string(),
            ))))
        });
        serve(false, server, svc, &Shutdown::new());
        client
    }

    /// Reads one response (whose body is short and all in the read); `None` when closed.
    async fn response(client: &mut DuplexStream) -> Option<String> {
        let mut buf = vec![0u8; 4096];
        match client.read(&mut buf).await {
            Ok(0) | Err(_) => None,
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        }
    }

    /// How long until the server closes, with the client saying nothing more.
    async fn closed_after(client: &mut DuplexStream) -> Duration {
        let start = Instant::now();
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(HEAD_READ_TIMEOUT * 3, client.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "still open: {read:?}");
        start.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_left_unfinished_is_given_up_after_the_head_timeout() {
        // The first request, and one after a completed exchange on the same connection.
        let mut first = connect();
        first.write_all(b"GET / HTTP/1.1\r\nHost: a").await.unwrap();
        let waited = closed_after(&mut first).await;
        assert!(
            waited >= HEAD_READ_TIMEOUT && waited < HEAD_READ_TIMEOUT + Duration::from_secs(1),
            "{waited:?}"
        );

        let mut later = connect();
        later
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let rsp = response(&mut later).await.unwrap();
        assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
        later.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
        let waited = closed_after(&mut later).await;
        assert!(
            waited >= HEAD_READ_TIMEOUT && waited < HEAD_READ_TIMEOUT + Duration::from_secs(1),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_sent_slowly_but_within_the_timeout_is_served() {
        let mut client = connect();
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        tokio::time::sleep(HEAD_READ_TIMEOUT - Duration::from_secs(5)).await;
        client.write_all(b"Host: a\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_secs(4)).await;
        client.write_all(b"\r\n").await.unwrap();
        let rsp = response(&mut client).await.unwrap();
        assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
    }

    #[tokio::test(start_paused = true)]
    async fn neither_a_slow_body_nor_an_idle_connection_is_a_slow_head() {
        let mut client = connect();
        // The head is complete; the body takes longer than the head timeout.
        client
            .write_all(b"POST / HTTP/1.1\r\nHost: a\r\ncontent-length: 4\r\n\r\nab")
            .await
            .unwrap();
        tokio::time::sleep(HEAD_READ_TIMEOUT * 2).await;
        client.write_all(b"cd").await.unwrap();
        let rsp = response(&mut client).await.unwrap();
        assert!(
            rsp.starts_with("HTTP/1.1 200") && rsp.ends_with("\r\n\r\n4"),
            "{rsp}"
        );

        // Idle between requests for longer than the head timeout (it hibernates), then asked
        // again on the same connection.
        tokio::time::sleep(HEAD_READ_TIMEOUT * 2).await;
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let rsp = response(&mut client).await.unwrap();
        assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
    }
}
