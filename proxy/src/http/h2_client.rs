//! `H2Connection`: one multiplexed HTTP/2 connection to an endpoint, used with the `h2` crate.
//!
//! Why not hyper's h2 client: it hands every request to the connection's task through a channel
//! and spawns a task per request to wait for the response and send it back through a oneshot.
//! That machinery cost about 7,000 instructions per request per hop, 12% of an h2c hop
//! (`benches/profile.py --workload h2c-get --proxy floor` against `--proxy floor-h2`). Here the
//! request's own task opens the stream, waits for the response and reads its body; the
//! connection's task only reads and writes frames. A request body that is still streaming when
//! the response starts (a gRPC stream, a slow upload) is handed to a task of its own then, so
//! it keeps flowing while the response is read.
//!
//! What hyper did here that this keeps: keep-alive pings (an endpoint that stops answering
//! fails its connection within `KEEPALIVE_TIMEOUT`, not at the next request), no server push,
//! hyper's limits on headers and buffered sends, and `content-length` for a body whose size is
//! known. What it doesn't: hyper's adaptive window; the windows are fixed (see `STREAM_WINDOW`).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use h2::client::{Connection, ResponseFuture, SendRequest};
use h2::{Ping, PingPong, RecvStream, SendStream};
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};

use super::client::{log_connection_closed, SendError};
use super::request_body::RequestBody;
use super::{boxed_out_of_line, BoxFuture, ProxyError};
use crate::connect::{Connect, EndpointIo};
use crate::mesh_tls::Alpn;
use crate::timer::TaskTimer;

/// How long a connection may go without a ping, and how long the endpoint has to answer one.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The receive window of each stream and of the connection, on both sides of the proxy (the h2
/// server uses them too). Fixed: enough for a body to stream without waiting on window updates
/// across a zone (1 MiB per round trip), and what a peer can have buffered here for the other
/// side reading slowly.
pub(super) const STREAM_WINDOW: u32 = 1024 * 1024;
pub(super) const CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;

/// hyper's limits, kept: a response head's size, and what may wait to be written.
const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
const MAX_SEND_BUFFER_SIZE: usize = 1024 * 1024;
/// Streams opened before the endpoint's SETTINGS say how many it takes.
const INITIAL_MAX_SEND_STREAMS: usize = 100;

/// The open connection: the handle requests are sent with, and whether its task has ended.
struct Open {
    sender: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

impl Open {
    fn is_open(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
    }
}

/// One multiplexed HTTP/2 connection to an endpoint, (re)established on demand; over mesh TLS
/// (ALPN `h2`) to a meshed endpoint.
pub struct H2Connection {
    connect: Arc<Connect>,
    open: ArcSwapOption<Open>,
    connecting: tokio::sync::Mutex<()>,
    keepalive: KeepAliveTimes,
}

#[derive(Clone, Copy)]
struct KeepAliveTimes {
    interval: Duration,
    timeout: Duration,
}

impl H2Connection {
    pub fn new(connect: Arc<Connect>) -> Self {
        Self {
            connect,
            open: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
            keepalive: KeepAliveTimes {
                interval: KEEPALIVE_INTERVAL,
                timeout: KEEPALIVE_TIMEOUT,
            },
        }
    }

    /// Whether the connection is open.
    pub fn is_open(&self) -> bool {
        self.open.load().as_ref().is_some_and(|o| o.is_open())
    }

    /// Opens the connection unless it is open.
    pub async fn ready(&self) -> Result<(), ProxyError> {
        if self.is_open() {
            return Ok(());
        }
        // Boxed: connecting (a TLS handshake, when meshed) holds far more state than the check.
        boxed_out_of_line(|| self.reconnect()).await.map(|_| ())
    }

    /// Sends `req` on the connection and waits for the response's head; a request the
    /// connection could not be had (or was closed) for comes back unsent with the error.
    ///
    /// On an open connection (the common case) the stream is opened here, synchronously, and
    /// the returned future holds only what the response needs. Connecting is a future boxed
    /// out of line.
    pub fn send(self: &Arc<Self>, mut req: Request<RequestBody>) -> H2Send {
        if let Err(e) = absolute_form(&mut req) {
            return H2Send::Failed {
                error: Some(SendError::sent(e)),
            };
        }
        let open = self.open.load();
        match open.as_deref().filter(|o| o.is_open()) {
            Some(open) => self.start(open, req),
            None => {
                let this = self.clone();
                H2Send::Waiting {
                    fut: boxed_out_of_line(move || async move {
                        let open = match this.reconnect().await {
                            Ok(open) => open,
                            Err(error) => return Err(SendError::unsent(error, req)),
                        };
                        this.start(&open, req).await
                    }),
                }
            }
        }
    }

    /// Opens the request's stream on `open` and starts its body.
    fn start(self: &Arc<Self>, open: &Open, req: Request<RequestBody>) -> H2Send {
        // A fresh handle is ready unless the connection has failed: the endpoint's stream
        // limit is waited for by the response future, not here.
        let mut sender = open.sender.clone();
        if let Poll::Ready(Err(e)) = sender.poll_ready(&mut Context::from_waker(Waker::noop())) {
            // The connection is gone (closed, or told to go away) before this request was on
            // it: that connection, not one opened since, is marked closed.
            open.closed.store(true, Ordering::Release);
            let error = ProxyError::from_endpoint(&e, &self.connect);
            return H2Send::Failed {
                error: Some(SendError::unsent(error, req)),
            };
        }
        let (head, body) = req.into_parts();
        let mut head = Request::from_parts(head, ());
        if let Some(len) = body.size_hint().exact() {
            if len != 0 && !head.headers().contains_key(header::CONTENT_LENGTH) {
                head.headers_mut()
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            }
        }
        let end_of_stream = body.is_end_stream();
        match sender.send_request(head, end_of_stream) {
            Ok((response, send)) => H2Send::Responding {
                response,
                pipe: (!end_of_stream).then(|| BodyPipe::new(body, send)),
                connection: self.clone(),
            },
            Err(e) => H2Send::Failed {
                error: Some(SendError::sent(ProxyError::from_endpoint(
                    &e,
                    &self.connect,
                ))),
            },
        }
    }

    /// The open connection, connecting when there is none (checked again here: another
    /// request may have connected meanwhile).
    async fn reconnect(&self) -> Result<Arc<Open>, ProxyError> {
        // One connect at a time; the others wait and reuse it.
        let _guard = self.connecting.lock().await;
        if let Some(open) = self.open.load_full().filter(|o| o.is_open()) {
            return Ok(open);
        }
        let stream = self
            .connect
            .connect(Alpn::H2)
            .await
            .map_err(|e| ProxyError::from_connect(&e))?;
        let (sender, mut conn) = h2::client::Builder::new()
            .enable_push(false)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
            .max_header_list_size(MAX_HEADER_LIST_SIZE)
            .max_send_buffer_size(MAX_SEND_BUFFER_SIZE)
            .handshake::<_, Bytes>(stream)
            .await
            .map_err(|e| ProxyError::from_endpoint(&e, &self.connect))?;
        let closed = Arc::new(AtomicBool::new(false));
        let driver = Driver {
            keepalive: conn.ping_pong().map(|p| KeepAlive::new(p, self.keepalive)),
            conn,
        };
        let connect = self.connect.clone();
        let on_close = closed.clone();
        tokio::spawn(async move {
            if let Err(e) = driver.await {
                log_connection_closed(&connect, "h2", &e);
            }
            on_close.store(true, Ordering::Release);
        });
        let open = Arc::new(Open { sender, closed });
        self.open.store(Some(open.clone()));
        Ok(open)
    }
}

/// h2 needs the request's URI in absolute form (`:scheme`, `:authority`, `:path`): an origin-form
/// URI gets `http` and, when it has no path, `/`.
fn absolute_form(req: &mut Request<RequestBody>) -> Result<(), ProxyError> {
    if req.uri().scheme().is_some() {
        return Ok(());
    }
    let mut parts = req.uri().clone().into_parts();
    parts.scheme = Some(Scheme::HTTP);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    *req.uri_mut() = Uri::from_parts(parts).map_err(|_| ProxyError::MissingAuthority)?;
    Ok(())
}

/// `H2Connection::send`'s future. While `Responding` it waits for the response's head while
/// sending the request's body. Most bodies (a gRPC request, a small upload) are sent before the
/// response starts; one still streaming then goes on in a task of its own. Dropped before the
/// response, both go, and h2 resets the stream.
pub enum H2Send {
    Responding {
        response: ResponseFuture,
        pipe: Option<BodyPipe>,
        /// For the errors' endpoint.
        connection: Arc<H2Connection>,
    },
    /// Connecting first (boxed out of line).
    Waiting {
        fut: BoxFuture<Result<Response<H2Body>, SendError>>,
    },
    /// Failed before a stream was opened; taken when polled.
    Failed { error: Option<SendError> },
}

impl Future for H2Send {
    type Output = Result<Response<H2Body>, SendError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            H2Send::Responding {
                response,
                pipe,
                connection,
            } => {
                if let Some(p) = pipe.as_mut() {
                    if Pin::new(p).poll(cx).is_ready() {
                        *pipe = None;
                    }
                }
                let rsp = ready!(Pin::new(response).poll(cx)).map_err(|e| {
                    SendError::sent(ProxyError::from_endpoint(&e, &connection.connect))
                })?;
                if let Some(pipe) = pipe.take() {
                    tokio::spawn(pipe);
                }
                let (head, recv) = rsp.into_parts();
                // For the size hint: an HTTP/1 client's response gets its length from it.
                let remaining = head
                    .headers
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok());
                Poll::Ready(Ok(Response::from_parts(head, H2Body::new(recv, remaining))))
            }
            H2Send::Waiting { fut } => fut.as_mut().poll(cx),
            H2Send::Failed { error } => match error.take() {
                Some(error) => Poll::Ready(Err(error)),
                None => panic!("H2Send polled after it completed"),
            },
        }
    }
}

/// A request body onto its stream, as the endpoint's window allows. Ends when the body does,
/// when the body fails (the client's request broke: the stream is cancelled), or when the
/// endpoint resets the stream.
pub struct BodyPipe {
    body: RequestBody,
    send: SendStream<Bytes>,
    /// Data waiting for window.
    pending: Option<Bytes>,
}

impl BodyPipe {
    fn new(body: RequestBody, send: SendStream<Bytes>) -> Self {
        Self {
            body,
            send,
            pending: None,
        }
    }
}

impl Future for BodyPipe {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            if this.send.poll_reset(cx).is_ready() {
                // The endpoint reset the stream (or the connection is gone): nothing more goes.
                return Poll::Ready(());
            }
            if let Some(data) = this.pending.as_mut() {
                this.send.reserve_capacity(data.len());
                let granted = match ready!(this.send.poll_capacity(cx)) {
                    Some(Ok(0)) => continue,
                    Some(Ok(n)) => n,
                    Some(Err(_)) | None => return Poll::Ready(()),
                };
                let chunk = data.split_to(granted.min(data.len()));
                let last = data.is_empty();
                if last {
                    this.pending = None;
                }
                let end_of_stream = last && this.body.is_end_stream();
                if this.send.send_data(chunk, end_of_stream).is_err() || end_of_stream {
                    return Poll::Ready(());
                }
                continue;
            }
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if data.is_empty() => {}
                    Ok(data) => this.pending = Some(data),
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            let _ = this.send.send_trailers(trailers);
                            return Poll::Ready(());
                        }
                    }
                },
                Some(Err(_)) => {
                    // RequestBody has recorded the failure as the client's.
                    this.send.send_reset(h2::Reason::CANCEL);
                    return Poll::Ready(());
                }
                None => {
                    let _ = this.send.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
            }
        }
    }
}

/// A response body from its stream. What is handed on is released to the endpoint's window,
/// so the endpoint sends on as fast as the client reads.
pub struct H2Body {
    recv: RecvStream,
    /// The data is all read; trailers (if any) are next.
    data_done: bool,
    /// The trailers are read: nothing can follow (known without asking the stream, which
    /// takes the connection's lock).
    trailers_done: bool,
    /// What `content-length` said is left, for the size hint.
    remaining: Option<u64>,
}

impl H2Body {
    fn new(recv: RecvStream, remaining: Option<u64>) -> Self {
        Self {
            recv,
            data_done: false,
            trailers_done: false,
            remaining,
        }
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let len = data.len();
                    // Only fails once the stream is gone, when there is nothing to release.
                    let _ = self.recv.flow_control().release_capacity(len);
                    if let Some(left) = self.remaining.as_mut() {
                        *left = left.saturating_sub(len as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => self.data_done = true,
            }
        }
        let trailers: Option<HeaderMap> = ready!(self.recv.poll_trailers(cx))?;
        self.trailers_done = true;
        Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.trailers_done || self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// The connection's task: reads and writes its frames, and pings the endpoint every
/// `KEEPALIVE_INTERVAL`, closing the connection when a ping goes unanswered.
struct Driver {
    conn: Connection<EndpointIo, Bytes>,
    keepalive: Option<KeepAlive>,
}

#[derive(Debug, thiserror::Error)]
enum DriverError {
    #[error(transparent)]
    Connection(#[from] h2::Error),
    #[error("no answer to a keep-alive ping within {0:?}")]
    KeepAliveTimeout(Duration),
}

impl Future for Driver {
    type Output = Result<(), DriverError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Poll::Ready(done) = Pin::new(&mut self.conn).poll(cx) {
            return Poll::Ready(done.map_err(DriverError::from));
        }
        match self.keepalive.as_mut() {
            Some(k) => k.poll(cx).map(Err),
            None => Poll::Pending,
        }
    }
}

struct KeepAlive {
    ping_pong: PingPong,
    times: KeepAliveTimes,
    timer: TaskTimer,
    awaiting_pong: bool,
}

impl KeepAlive {
    fn new(ping_pong: PingPong, times: KeepAliveTimes) -> Self {
        Self {
            ping_pong,
            times,
            timer: TaskTimer::new(times.interval),
            awaiting_pong: false,
        }
    }

    /// Pending while the endpoint answers its pings.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<DriverError> {
        loop {
            if self.awaiting_pong {
                match self.ping_pong.poll_pong(cx) {
                    Poll::Ready(Ok(_)) => {
                        self.awaiting_pong = false;
                        self.timer.reset(self.times.interval);
                        continue;
                    }
                    // The connection failed; its own poll reports why.
                    Poll::Ready(Err(_)) => return Poll::Pending,
                    Poll::Pending => {}
                }
                if !self.timer.poll_fired(cx) {
                    return Poll::Pending;
                }
                return Poll::Ready(DriverError::KeepAliveTimeout(self.times.timeout));
            }
            if !self.timer.poll_fired(cx) {
                return Poll::Pending;
            }
            if self.ping_pong.send_ping(Ping::opaque()).is_err() {
                return Poll::Pending;
            }
            self.awaiting_pong = true;
            self.timer.reset(self.times.timeout);
        }
    }
}

#[cfg(test)]
mod tests {
    //! Against real h2 servers on loopback: hyper's (what an endpoint or a peer proxy runs), and
    //! one that stops reading its connection after the handshake.

    use std::convert::Infallible;
    use std::net::SocketAddr;

    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::net::TcpListener;

    use super::*;
    use crate::http::test_support::incoming;

    const MIB: usize = 1024 * 1024;

    fn connection(addr: SocketAddr) -> Arc<H2Connection> {
        Arc::new(H2Connection::new(Arc::new(Connect::plain(
            addr,
            Duration::from_secs(5),
        ))))
    }

    /// hyper's h2 server answering every request with `answer`.
    async fn h2_server<F, Fut>(answer: F) -> SocketAddr
    where
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let answer = answer.clone();
                let svc = hyper::service::service_fn(move |req| {
                    let answer = answer.clone();
                    async move { Ok::<_, Infallible>(answer(req).await) }
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc),
                );
            }
        });
        addr
    }

    async fn request(body: Bytes) -> Request<RequestBody> {
        let req = Request::post("http://web.example/upload")
            .body(Full::new(body))
            .unwrap();
        incoming(req).await.map(RequestBody::streaming)
    }

    #[tokio::test]
    async fn bodies_larger_than_the_windows_flow_both_ways() {
        // 3 MiB up (hyper's server grants 64 KiB at first), 6 MiB down (more than this
        // connection's 4 MiB window: it flows only if what was read is released).
        let addr = h2_server(|req: Request<Incoming>| async move {
            let received = req.into_body().collect().await.unwrap().to_bytes();
            let mut rsp = Response::new(Full::new(Bytes::from(vec![7u8; 6 * MIB])));
            rsp.headers_mut()
                .insert("x-received", HeaderValue::from(received.len()));
            rsp
        })
        .await;
        let conn = connection(addr);
        let upload = Bytes::from(vec![1u8; 3 * MIB]);
        let exchange = async {
            let rsp = conn.send(request(upload).await).await.ok().unwrap();
            assert_eq!(rsp.headers()["x-received"], "3145728");
            assert_eq!(rsp.body().size_hint().exact(), Some(6 * MIB as u64));
            rsp.into_body().collect().await.unwrap().to_bytes().len()
        };
        let downloaded = tokio::time::timeout(Duration::from_secs(30), exchange)
            .await
            .expect("the bodies flow");
        assert_eq!(downloaded, 6 * MIB);
        assert!(conn.is_open());
    }

    #[tokio::test]
    async fn a_body_still_streaming_when_the_response_starts_goes_on() {
        // The endpoint answers at once and reads the body afterwards (as a gRPC stream may):
        // what it reads arrives after the response's head has been handed back.
        let (read_tx, read_rx) = tokio::sync::oneshot::channel::<usize>();
        let read_tx = Arc::new(std::sync::Mutex::new(Some(read_tx)));
        let addr = h2_server(move |req: Request<Incoming>| {
            let read_tx = read_tx.clone();
            async move {
                tokio::spawn(async move {
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    if let Some(tx) = read_tx.lock().unwrap().take() {
                        let _ = tx.send(body.len());
                    }
                });
                Response::new(Full::new(Bytes::from_static(b"early")))
            }
        })
        .await;
        let conn = connection(addr);
        let rsp = conn
            .send(request(Bytes::from(vec![2u8; 2 * MIB])).await)
            .await;
        let rsp = rsp.ok().unwrap();
        assert_eq!(rsp.into_body().collect().await.unwrap().to_bytes(), "early");
        let read = tokio::time::timeout(Duration::from_secs(30), read_rx)
            .await
            .expect("the body arrives")
            .unwrap();
        assert_eq!(read, 2 * MIB);
    }

    #[tokio::test]
    async fn a_request_body_the_client_aborts_is_reset_not_ended() {
        // The client sends a chunk of its chunked body and hangs up. The endpoint must see its
        // stream reset: ending it cleanly would hand the app a truncated request as if it were
        // whole (no content-length tells it otherwise).
        type Seen = Result<usize, String>;
        /// What the endpoint made of the body; hyper drops the handler of a stream the client
        /// resets, which reports the reset.
        struct Report(Option<tokio::sync::oneshot::Sender<Seen>>);
        impl Drop for Report {
            fn drop(&mut self) {
                if let Some(tx) = self.0.take() {
                    let _ = tx.send(Err("the stream was reset".to_owned()));
                }
            }
        }
        let (seen_tx, seen_rx) = tokio::sync::oneshot::channel::<Seen>();
        let seen_tx = Arc::new(std::sync::Mutex::new(Some(seen_tx)));
        let (arrived_tx, arrived_rx) = tokio::sync::oneshot::channel::<()>();
        let arrived_tx = Arc::new(std::sync::Mutex::new(Some(arrived_tx)));
        let addr = h2_server(move |req: Request<Incoming>| {
            let mut report = Report(seen_tx.lock().unwrap().take());
            if let Some(tx) = arrived_tx.lock().unwrap().take() {
                let _ = tx.send(());
            }
            async move {
                let seen = match req.into_body().collect().await {
                    Ok(body) => Ok(body.to_bytes().len()),
                    Err(e) => Err(e.to_string()),
                };
                if let Some(tx) = report.0.take() {
                    let _ = tx.send(seen);
                }
                Response::new(Full::new(Bytes::new()))
            }
        })
        .await;
        // The client's side: an HTTP/1 server handing what arrives to the h2 connection.
        let conn = Arc::new(connection(addr));
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = front.accept().await.unwrap();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let conn = conn.clone();
                async move {
                    let mut req = req.map(RequestBody::streaming);
                    crate::http::headers::strip_hop_by_hop(req.headers_mut(), false);
                    let status = match conn.send(req).await {
                        Ok(_) => http::StatusCode::OK,
                        Err(_) => http::StatusCode::BAD_GATEWAY,
                    };
                    let mut rsp = Response::new(Full::new(Bytes::new()));
                    *rsp.status_mut() = status;
                    Ok::<_, Infallible>(rsp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
        let mut client = tokio::net::TcpStream::connect(front_addr).await.unwrap();
        use tokio::io::AsyncWriteExt;
        let head = "POST http://web/upload HTTP/1.1\r\nHost: web\r\n\
                    Transfer-Encoding: chunked\r\n\r\n32\r\n";
        client.write_all(head.as_bytes()).await.unwrap();
        client.write_all(&[b'x'; 50]).await.unwrap();
        client.write_all(b"\r\n").await.unwrap();
        let seen = async {
            // Once the request is at the endpoint, the client hangs up: the proxy reads the
            // end of the connection where the rest of the body should be.
            arrived_rx.await.unwrap();
            drop(client);
            seen_rx.await.unwrap()
        };
        let seen = tokio::time::timeout(Duration::from_secs(30), seen)
            .await
            .expect("the endpoint hears of it");
        assert!(
            seen.is_err(),
            "the endpoint took a truncated body as whole: {seen:?}"
        );
    }

    #[tokio::test]
    async fn a_connection_whose_task_ended_is_replaced_for_the_next_request() {
        let addr = h2_server(|_req: Request<Incoming>| async move {
            Response::new(Full::new(Bytes::from_static(b"ok")))
        })
        .await;
        let conn = connection(addr);
        conn.ready().await.unwrap();
        assert!(conn.is_open());
        // The connection's task ended (as when the endpoint closes it).
        if let Some(open) = conn.open.load().as_ref() {
            open.closed.store(true, Ordering::Release);
        }
        assert!(!conn.is_open());
        let rsp = conn.send(request(Bytes::new()).await).await.ok().unwrap();
        assert_eq!(rsp.into_body().collect().await.unwrap().to_bytes(), "ok");
        assert!(conn.is_open());
    }

    #[tokio::test]
    async fn an_endpoint_that_stops_answering_pings_fails_its_requests() {
        // An endpoint whose h2 connection is handshaken, then never read again: alive to TCP,
        // dead to HTTP/2. Its pending request fails once a ping goes unanswered.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (held_tx, held_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let conn = h2::server::handshake(tcp).await.unwrap();
            let _ = held_tx.send(conn);
        });
        let mut conn = H2Connection::new(Arc::new(Connect::plain(addr, Duration::from_secs(5))));
        conn.keepalive = KeepAliveTimes {
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(200),
        };
        let conn = Arc::new(conn);
        let send = conn.send(request(Bytes::new()).await);
        let failed = tokio::time::timeout(Duration::from_secs(30), send)
            .await
            .expect("the request fails rather than waits forever");
        let error = failed.err().map(|e| e.error);
        assert_eq!(error, Some(ProxyError::ConnectionReset));
        assert!(!conn.is_open());
        drop(held_rx);
    }
}
