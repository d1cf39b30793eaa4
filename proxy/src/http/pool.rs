//! `Http1Pool`: kept-alive HTTP/1.1 connections to one endpoint.
//!
//! A connection goes back to the pool when the response body it carried has ended cleanly (the
//! `ResponseBody` hands it back), so reuse never waits behind a slow reader, and no task is spawned
//! per request to watch for it. The pool belongs to the endpoint: when discovery drops the
//! endpoint, its idle connections close with it.
//!
//! Idle connections hibernate, as client connections do (`hibernate`): one unused for
//! [`IDLE_BEFORE_HIBERNATE`] has its hyper connection retired (its read and write buffers and
//! its task freed) and only its socket kept; the next request that needs it starts a new hyper
//! connection on that socket. A burst of concurrent requests leaves as many connections behind,
//! and without this each would hold ~20 KiB until reused or timed out. A sweeper task does it,
//! only while connections are idle, and closes hibernated sockets the endpoint closed or that
//! waited past [`IDLE_TIMEOUT`].
//!
//! A protocol upgrade (WebSocket) gets a hyper connection of its own, which `with_upgrades`
//! drives so that after `101` the socket carries the tunnel; it never comes back. It starts on a
//! parked socket when there is one (the balancer's connect ahead of the request parks one).
//!
//! To a meshed endpoint, only requests that can't ride the h2 connection come here (upgrades),
//! over mesh TLS announcing `http/1.1`. Mesh TLS connections never hibernate: whether the
//! endpoint closed one can't be told without reading it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use crossbeam_queue::ArrayQueue;
use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
use hyper::body::Incoming;

use super::hibernate::IDLE_BEFORE_HIBERNATE;
use super::request_body::RequestBody;
use hyper::client::conn::{http1, TrySendError};
use hyper_util::rt::TokioIo;

use super::client::{log_connection_closed, SendError};
use super::{boxed_out_of_line, BoxFuture, ProxyError};
use crate::connect::{Connect, EndpointIo};
use crate::mesh_tls::Alpn;
use crate::names::EndpointNames;

/// Idle connections kept per endpoint (live and hibernated, each); more are closed.
const MAX_IDLE: usize = 512;
/// An idle connection older than this is closed instead of reused (servers time out idle
/// keep-alive connections, and a request on one they just closed would fail).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Http1Pool {
    connect: Arc<Connect>,
    /// Live connections: hyper's connection running in its task, ready for a request.
    idle: ArrayQueue<Idle>,
    /// Sockets whose hyper connection was retired while idle.
    hibernated: ArrayQueue<Hibernated>,
    /// The sweeper runs (only while something is idle).
    sweeping: AtomicBool,
}

struct Idle {
    sender: http1::SendRequest<RequestBody>,
    /// Set before the sender is dropped to retire the connection: its task then parks the
    /// socket instead of closing it.
    hibernate: Arc<AtomicBool>,
    since: Instant,
}

struct Hibernated {
    io: EndpointIo,
    /// When the connection last carried a request.
    since: Instant,
}

impl Hibernated {
    /// Still fit to carry a request: not timed out, and (over plain TCP) not closed by the
    /// endpoint. (Mesh TLS sockets are only parked fresh, by `ensure_idle`.)
    fn is_fit(&mut self) -> bool {
        self.since.elapsed() <= IDLE_TIMEOUT && (self.io.is_tls() || self.io.is_open_and_quiet())
    }
}

/// A connection lent to one request; returned to its pool when the response has ended.
pub struct PooledConn {
    pool: Arc<Http1Pool>,
    sender: http1::SendRequest<RequestBody>,
    hibernate: Arc<AtomicBool>,
}

impl PooledConn {
    pub fn release(self) {
        if self.sender.is_closed() {
            return;
        }
        self.pool.park(Idle {
            sender: self.sender,
            hibernate: self.hibernate,
            since: Instant::now(),
        });
    }
}

/// What `Http1Pool::send` resolves to.
type Sent = Result<(Response<Incoming>, Option<PooledConn>), SendError>;

pin_project_lite::pin_project! {
    /// `Http1Pool::send`'s future: a named state machine rather than an `async` block, so that
    /// the common case holds hyper's response future and the connection and nothing else.
    #[project = Http1SendProj]
    #[project_replace = Http1SendTaken]
    pub enum Http1Send<F> {
        /// The request is with an idle connection's task; waiting for the response head.
        Sending {
            #[pin]
            sending: F,
            conn: PooledConn,
        },
        /// The slow path, or a resend on a fresh connection after the idle one failed.
        Waiting { fut: BoxFuture<Sent> },
        Done,
    }
}

impl<F> Future for Http1Send<F>
where
    F: Future<Output = Result<Response<Incoming>, TrySendError<Request<RequestBody>>>>,
{
    type Output = Sent;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Sent> {
        let sent = match self.as_mut().project() {
            Http1SendProj::Sending { sending, .. } => ready!(sending.poll(cx)),
            Http1SendProj::Waiting { fut } => return fut.as_mut().poll(cx),
            Http1SendProj::Done => panic!("Http1Send polled after it completed"),
        };
        let Http1SendTaken::Sending { conn, .. } = self.as_mut().project_replace(Http1Send::Done)
        else {
            unreachable!("the state was Sending just above");
        };
        match sent {
            Ok(rsp) => Poll::Ready(Ok((rsp, Some(conn)))),
            // The idle connection closed as the request went: once more, on a fresh one.
            Err(e) => {
                let pool = conn.pool;
                let resend = boxed_out_of_line(move || async move { pool.resend(e, true).await });
                self.set(Http1Send::Waiting { fut: resend });
                self.poll(cx)
            }
        }
    }
}

/// A connection checked out for one request.
struct Checkout {
    sender: http1::SendRequest<RequestBody>,
    hibernate: Arc<AtomicBool>,
    /// It carried requests before (the endpoint may have closed it just now).
    reused: bool,
}

impl Http1Pool {
    pub fn new(connect: Arc<Connect>) -> Self {
        Self {
            connect,
            idle: ArrayQueue::new(MAX_IDLE),
            hibernated: ArrayQueue::new(MAX_IDLE),
            sweeping: AtomicBool::new(false),
        }
    }

    /// Sends `req` in origin form, keeping its headers. On success, the connection comes back as
    /// `PooledConn` for the response body to release when it ends. A request no connection
    /// could be had for comes back unsent with the error.
    ///
    /// A protocol `upgrade` (WebSocket) gets a connection of its own, which after `101` carries
    /// the tunnel and is never pooled.
    ///
    /// The common case, an idle connection ready for a request, is handled here, synchronously:
    /// the request goes to the connection's task at once and the returned future holds only
    /// hyper's wait for the response. Everything else (waiting for a connection to become
    /// ready, waking a hibernated one, connecting, an upgrade) is a future boxed out of line.
    /// Either way the request is held once, not in each enclosing future.
    pub fn send(
        self: &Arc<Self>,
        mut req: Request<RequestBody>,
        upgrade: bool,
    ) -> Http1Send<
        impl Future<Output = Result<Response<Incoming>, TrySendError<Request<RequestBody>>>>,
    > {
        let pq = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(pq);
        let first = if upgrade { None } else { self.pop_open() };
        match first {
            Some(Idle {
                mut sender,
                hibernate,
                ..
            }) if sender.is_ready() => {
                let sending = sender.try_send_request(req);
                Http1Send::Sending {
                    sending,
                    conn: self.lend(sender, hibernate),
                }
            }
            first => {
                let pool = self.clone();
                Http1Send::Waiting {
                    fut: boxed_out_of_line(move || pool.send_when_ready(req, upgrade, first)),
                }
            }
        }
    }

    /// `send`'s slow path: an upgrade, or waiting for a connection (`first`, popped idle but not
    /// ready yet, is tried first).
    async fn send_when_ready(
        self: Arc<Self>,
        req: Request<RequestBody>,
        upgrade: bool,
        first: Option<Idle>,
    ) -> Sent {
        if upgrade {
            return self.send_upgrade(req).await.map(|rsp| (rsp, None));
        }
        let Checkout {
            mut sender,
            hibernate,
            reused,
        } = match self.checkout(first).await {
            Ok(checked_out) => checked_out,
            Err(error) => return Err(SendError::unsent(error, req)),
        };
        match sender.try_send_request(req).await {
            Ok(rsp) => Ok((rsp, Some(self.lend(sender, hibernate)))),
            Err(e) => self.resend(e, reused).await,
        }
    }

    /// `sender`, lent to the request it carries; back in the pool when its response has ended.
    fn lend(
        self: &Arc<Self>,
        sender: http1::SendRequest<RequestBody>,
        hibernate: Arc<AtomicBool>,
    ) -> PooledConn {
        PooledConn {
            pool: self.clone(),
            sender,
            hibernate,
        }
    }

    /// A pooled connection the server closed just as we sent gives the request back unsent:
    /// then it goes once more, on a fresh connection.
    async fn resend(
        self: &Arc<Self>,
        mut e: TrySendError<Request<RequestBody>>,
        reused: bool,
    ) -> Sent {
        let req = match e.take_message() {
            Some(req) if reused => req,
            unsent => {
                let error = ProxyError::from_endpoint(e.error(), &self.connect);
                return Err(SendError { error, unsent });
            }
        };
        let (mut sender, hibernate) = match self.connect().await {
            Ok(fresh) => fresh,
            Err(error) => return Err(SendError::unsent(error, req)),
        };
        let rsp = sender
            .send_request(req)
            .await
            .map_err(|e| SendError::sent(ProxyError::from_endpoint(&e, &self.connect)))?;
        Ok((rsp, Some(self.lend(sender, hibernate))))
    }

    /// Sends an upgrade request on a new connection that `with_upgrades` drives, so that a
    /// `101` hands the socket to the tunnel.
    async fn send_upgrade(
        &self,
        req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, SendError> {
        let stream = match self.take_hibernated() {
            Some(parked) => parked,
            None => match self.connect.connect(Alpn::Http1).await {
                Ok(stream) => stream,
                Err(e) => return Err(SendError::unsent(ProxyError::from_connect(&e), req)),
            },
        };
        let (mut sender, conn) = match http1::Builder::new().handshake(TokioIo::new(stream)).await {
            Ok(handshaken) => handshaken,
            Err(e) => {
                let error = ProxyError::from_endpoint(&e, &self.connect);
                return Err(SendError::unsent(error, req));
            }
        };
        let connect = self.connect.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                log_connection_closed(&connect, "http/1", &e);
            }
        });
        sender
            .try_send_request(req)
            .await
            .map_err(|e| SendError::from_try_send(e, &self.connect))
    }

    /// Discovery's names for its endpoint, for the logs.
    pub fn names(&self) -> &Arc<EndpointNames> {
        self.connect.names()
    }

    /// Whether a connection is idle, ready for a request.
    pub fn has_idle(&self) -> bool {
        !self.idle.is_empty() || !self.hibernated.is_empty()
    }

    /// Opens a connection and parks its socket idle, unless one is idle already. The request
    /// that follows starts hyper's connection on it (one that upgrades, a connection that can
    /// carry the tunnel).
    pub async fn ensure_idle(self: &Arc<Self>) -> Result<(), ProxyError> {
        if self.has_idle() {
            return Ok(());
        }
        let io = self
            .connect
            .connect(Alpn::Http1)
            .await
            .map_err(|e| ProxyError::from_connect(&e))?;
        // A full pool closes it.
        let _ = self.hibernated.push(Hibernated {
            io,
            since: Instant::now(),
        });
        self.ensure_sweeper();
        Ok(())
    }

    /// A parked socket still fit to carry a request (the unfit ones met on the way close).
    fn take_hibernated(&self) -> Option<EndpointIo> {
        while let Some(mut parked) = self.hibernated.pop() {
            if parked.is_fit() {
                return Some(parked.io);
            }
        }
        None
    }

    /// Keeps a connection idle for the next request (a full pool closes it), and makes sure the
    /// sweeper watches it.
    fn park(self: &Arc<Self>, idle: Idle) {
        // A full pool closes it (dropping the sender).
        let _ = self.idle.push(idle);
        self.ensure_sweeper();
    }

    /// An idle connection whose endpoint has not closed it. (None idle for long: the sweeper
    /// retires those idle for [`IDLE_BEFORE_HIBERNATE`], far short of [`IDLE_TIMEOUT`].)
    fn pop_open(&self) -> Option<Idle> {
        while let Some(idle) = self.idle.pop() {
            if !idle.sender.is_closed() {
                return Some(idle);
            }
        }
        None
    }

    fn ensure_sweeper(self: &Arc<Self>) {
        if !self.sweeping.swap(true, Ordering::AcqRel) {
            tokio::spawn(sweep(Arc::downgrade(self)));
        }
    }

    async fn checkout(self: &Arc<Self>, first: Option<Idle>) -> Result<Checkout, ProxyError> {
        let mut next = first;
        while let Some(Idle {
            mut sender,
            hibernate,
            ..
        }) = next.take().or_else(|| self.pop_open())
        {
            // Ready once its task has finished with the previous response.
            if sender.ready().await.is_ok() {
                return Ok(Checkout {
                    sender,
                    hibernate,
                    reused: true,
                });
            }
        }
        while let Some(io) = self.take_hibernated() {
            // Waking it costs a new hyper connection on the socket, not a connect. (Boxed, as
            // connects are: it would size every request's future.)
            if let Ok((sender, hibernate)) = boxed_out_of_line(|| self.handshake(io)).await {
                return Ok(Checkout {
                    sender,
                    hibernate,
                    reused: true,
                });
            }
        }
        let (sender, hibernate) = boxed_out_of_line(|| self.connect()).await?;
        Ok(Checkout {
            sender,
            hibernate,
            reused: false,
        })
    }

    /// Opens a connection. Boxed where it is awaited: a connect (a TLS handshake, when meshed)
    /// holds far more state than a request on an open connection, and unboxed it would size
    /// every request's future.
    async fn connect(
        self: &Arc<Self>,
    ) -> Result<(http1::SendRequest<RequestBody>, Arc<AtomicBool>), ProxyError> {
        let stream = self
            .connect
            .connect(Alpn::Http1)
            .await
            .map_err(|e| ProxyError::from_connect(&e))?;
        self.handshake(stream).await
    }

    /// Starts hyper's connection on `io`, in a task of its own. When the pool retires it
    /// (sets the returned flag and drops the sender) while it is idle, the task hibernates the
    /// socket.
    async fn handshake(
        self: &Arc<Self>,
        io: EndpointIo,
    ) -> Result<(http1::SendRequest<RequestBody>, Arc<AtomicBool>), ProxyError> {
        let (sender, mut conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| ProxyError::from_endpoint(&e, &self.connect))?;
        let hibernate = Arc::new(AtomicBool::new(false));
        let retired = hibernate.clone();
        let pool = Arc::downgrade(self);
        let connect = self.connect.clone();
        tokio::spawn(async move {
            let result = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)).await;
            match result {
                Err(e) => log_connection_closed(&connect, "http/1", &e),
                // Retired idle by the pool: the socket is kept, unless the endpoint sent
                // something after the last response. (Otherwise the endpoint closed it.)
                Ok(()) if retired.load(Ordering::Acquire) => {
                    let Some(pool) = pool.upgrade() else {
                        return;
                    };
                    let parts = conn.into_parts();
                    // Over mesh TLS a closed socket can't be told from a quiet one: closed.
                    if parts.read_buf.is_empty() && !parts.io.inner().is_tls() {
                        let _ = pool.hibernated.push(Hibernated {
                            io: parts.io.into_inner(),
                            since: Instant::now(),
                        });
                        pool.ensure_sweeper();
                    }
                }
                Ok(()) => {}
            }
        });
        Ok((sender, hibernate))
    }

    /// Retires the live connections idle for [`IDLE_BEFORE_HIBERNATE`] (their tasks hibernate
    /// them), and closes the hibernated sockets the endpoint closed or that waited past
    /// [`IDLE_TIMEOUT`]. False when nothing is left idle.
    fn sweep_once(&self) -> bool {
        for _ in 0..self.idle.len() {
            let Some(idle) = self.idle.pop() else {
                break;
            };
            if idle.sender.is_closed() {
                continue;
            }
            if idle.since.elapsed() < IDLE_BEFORE_HIBERNATE {
                let _ = self.idle.push(idle);
                continue;
            }
            idle.hibernate.store(true, Ordering::Release);
            // Dropping the sender ends hyper's connection, idle as it is.
        }
        for _ in 0..self.hibernated.len() {
            let Some(mut hibernated) = self.hibernated.pop() else {
                break;
            };
            if hibernated.is_fit() {
                let _ = self.hibernated.push(hibernated);
            }
        }
        // Retired connections reach `hibernated` from their tasks a moment later, and start
        // the sweeper again if it has stopped.
        self.has_idle()
    }
}

/// The pool's sweeper: runs while connections are idle, and ends with the pool.
async fn sweep(pool: Weak<Http1Pool>) {
    loop {
        tokio::time::sleep(IDLE_BEFORE_HIBERNATE).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        if pool.sweep_once() {
            continue;
        }
        pool.sweeping.store(false, Ordering::Release);
        // Something parked between the sweep and now found the flag still set: take it on.
        if !pool.has_idle() || pool.sweeping.swap(true, Ordering::AcqRel) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use http::StatusCode;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::Notify;

    use super::*;

    /// A raw HTTP/1.1 server: answers every request on a connection with `200 ok` (keep-alive),
    /// counts connections and requests, and closes every open connection when `close` fires.
    async fn server() -> (
        std::net::SocketAddr,
        Arc<AtomicUsize>,
        Arc<AtomicUsize>,
        Arc<Notify>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (conns, requests) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let close = Arc::new(Notify::new());
        let (c, r, n) = (conns.clone(), requests.clone(), close.clone());
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let (r, n) = (r.clone(), n.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        let read = tokio::select! {
                            read = tcp.read(&mut chunk) => read,
                            _ = n.notified() => return,
                        };
                        match read {
                            Ok(0) | Err(_) => return,
                            Ok(k) => buf.extend_from_slice(&chunk[..k]),
                        }
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            r.fetch_add(1, Ordering::SeqCst);
                            let rsp = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if tcp.write_all(rsp).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, conns, requests, close)
    }

    fn get() -> Request<RequestBody> {
        Request::builder()
            .uri("/")
            .header(http::header::HOST, "web")
            .body(RequestBody::empty())
            .expect("request")
    }

    /// One request through the pool, its body read to the end (which hands the connection back).
    async fn exchange(pool: &Arc<Http1Pool>) {
        let (rsp, conn) = match pool.send(get(), false).await {
            Ok(sent) => sent,
            Err(e) => panic!("send failed: {:?}", e.error),
        };
        assert_eq!(rsp.status(), StatusCode::OK);
        let body = rsp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"ok");
        conn.expect("pooled").release();
    }

    fn pool(addr: std::net::SocketAddr) -> Arc<Http1Pool> {
        Arc::new(Http1Pool::new(Arc::new(Connect::plain(
            addr,
            Duration::from_secs(5),
        ))))
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_hibernates_and_wakes_on_its_socket() {
        let (addr, conns, requests, _close) = server().await;
        let pool = pool(addr);
        exchange(&pool).await;
        assert_eq!((pool.idle.len(), pool.hibernated.len()), (1, 0));

        // Quiet for longer than IDLE_BEFORE_HIBERNATE: hyper's connection is retired, the
        // socket kept.
        tokio::time::sleep(IDLE_BEFORE_HIBERNATE * 3).await;
        assert_eq!((pool.idle.len(), pool.hibernated.len()), (0, 1));

        // The next request wakes it: the same socket, no new connection.
        exchange(&pool).await;
        assert_eq!(conns.load(Ordering::SeqCst), 1);
        assert_eq!(requests.load(Ordering::SeqCst), 2);
        assert_eq!((pool.idle.len(), pool.hibernated.len()), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_hibernated_socket_the_endpoint_closed_is_not_used() {
        let (addr, conns, requests, close) = server().await;
        let pool = pool(addr);
        exchange(&pool).await;
        tokio::time::sleep(IDLE_BEFORE_HIBERNATE * 3).await;
        assert_eq!(pool.hibernated.len(), 1);

        // The server times the idle connection out.
        close.notify_waiters();
        tokio::task::yield_now().await;

        // The next request goes on a new connection, and succeeds.
        exchange(&pool).await;
        assert_eq!(conns.load(Ordering::SeqCst), 2);
        assert_eq!(requests.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn hibernated_sockets_close_after_the_idle_timeout() {
        let (addr, _conns, _requests, _close) = server().await;
        let pool = pool(addr);
        exchange(&pool).await;
        tokio::time::sleep(IDLE_TIMEOUT + IDLE_BEFORE_HIBERNATE * 3).await;
        assert_eq!((pool.idle.len(), pool.hibernated.len()), (0, 0));
        // With nothing idle, the sweeper has stopped.
        assert!(!pool.sweeping.load(Ordering::SeqCst));
    }
}
