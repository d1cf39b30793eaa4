//! Idle HTTP/1 client connections hibernate: once a kept-alive connection has had no request in
//! flight and no bytes either way for [`IDLE_BEFORE_HIBERNATE`], its hyper connection is retired
//! (freeing hyper's read and write buffers, 8 KiB each, and its state) and the connection waits
//! for the client's next byte holding only the socket; that byte starts a new hyper connection.
//!
//! hyper keeps those buffers for a connection's whole life and has no way to release them, which
//! made 10,000 idle keep-alive connections cost ~19 KiB each. Retiring works through hyper's own
//! clean path: [`HibernatingIo`] reports end-of-file to hyper only when the connection is idle
//! between requests (no request in flight, nothing being written, no byte read since), hyper
//! closes its side as it does for a client that hung up, and the socket (never shut down) comes
//! back through a [`Returned`] slot.
//!
//! Connections that upgraded (WebSocket, CONNECT) never hibernate: their bytes are a tunnel.
//!
//! The same IO is the slowloris guard: a client that has sent part of a request head gets
//! [`HEAD_READ_TIMEOUT`] to send the rest, then the connection is closed. (hyper's own
//! `header_read_timeout` does this by arming and dropping a timer for every request, about 3% of
//! a hop's instructions; here the connection's one timer is touched only when a head arrives in
//! pieces, and a connection idle between requests is hibernation's business.)

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::timer::TaskTimer;

/// How long a connection must be quiet between requests before it hibernates.
pub const IDLE_BEFORE_HIBERNATE: Duration = Duration::from_secs(1);

/// How long a client may take to finish a request head it has started (nginx's
/// `client_header_timeout` is 60 s, hyper's default 30 s).
pub const HEAD_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// What the connection's timer is armed for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TimerFor {
    Nothing,
    /// Hibernation, once the connection has been quiet between requests.
    Idle,
    /// The end of the head that started after this many completed requests.
    Head(u64),
}

/// What the connection's service and its IO share.
#[derive(Default)]
pub struct Activity {
    /// Requests whose response hasn't been handed over completely.
    in_flight: AtomicUsize,
    /// Requests whose response has.
    completed: AtomicU64,
    /// An upgrade or CONNECT took the connection over.
    upgraded: AtomicBool,
}

/// Where a hibernating connection's socket comes back.
pub struct Returned<I>(Arc<Mutex<Option<I>>>);

impl<I> Returned<I> {
    pub fn take(&self) -> Option<I> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// The IO handed to hyper for one session of a connection.
pub struct HibernatingIo<I> {
    inner: Option<I>,
    /// The byte that woke the connection from hibernation, for hyper to read first.
    first: Option<u8>,
    activity: Arc<Activity>,
    /// Reads and writes so far, and when the idle timer was (re)armed.
    ops: u64,
    ops_at_arm: u64,
    writing: bool,
    /// Completed requests when bytes were last read: bytes read after the last completion may
    /// be a request head hyper holds in part, so the connection isn't idle.
    read_epoch: u64,
    timer: Option<TaskTimer>,
    timer_for: TimerFor,
    hibernated: bool,
    back: Arc<Mutex<Option<I>>>,
}

impl<I> Drop for HibernatingIo<I> {
    fn drop(&mut self) {
        if self.hibernated {
            if let Some(io) = self.inner.take() {
                *self.back.lock().unwrap_or_else(|p| p.into_inner()) = Some(io);
            }
        }
    }
}

impl<I> HibernatingIo<I> {
    pub fn new(inner: I, first: Option<u8>, activity: Arc<Activity>) -> (Self, Returned<I>) {
        let back = Arc::new(Mutex::new(None));
        let io = Self {
            inner: Some(inner),
            first,
            activity,
            ops: 0,
            ops_at_arm: 0,
            writing: false,
            read_epoch: 0,
            timer: None,
            timer_for: TimerFor::Nothing,
            hibernated: false,
            back: back.clone(),
        };
        (io, Returned(back))
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection hibernated")
}

impl<I: AsyncRead + Unpin> AsyncRead for HibernatingIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.hibernated {
            // End of file, as far as hyper is concerned.
            return Poll::Ready(Ok(()));
        }
        let activity = &*this.activity;
        if let Some(b) = this.first.take() {
            buf.put_slice(&[b]);
            this.ops += 1;
            this.read_epoch = activity.completed.load(Ordering::Acquire);
            return Poll::Ready(Ok(()));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(Err(gone()));
        };
        match Pin::new(inner).poll_read(cx, buf) {
            Poll::Pending => {}
            ready => {
                this.ops += 1;
                this.read_epoch = activity.completed.load(Ordering::Acquire);
                return ready;
            }
        }
        // Nothing to read.
        if activity.upgraded.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        let in_flight = activity.in_flight.load(Ordering::Acquire) > 0 || this.writing;
        let completed = activity.completed.load(Ordering::Acquire);
        if !in_flight && this.read_epoch >= completed {
            // Part of the next request head is in (bytes came after the last response).
            return this.poll_head_timeout(cx, completed);
        }
        // The idle timer keeps watch while a request is in flight too: once its response is
        // out, hyper won't read again until something wakes the task, and this timer is what
        // will. It is armed once and re-armed only when it fires, so it costs a request nothing
        // but this poll.
        if this.timer_for != TimerFor::Idle {
            this.ops_at_arm = this.ops;
            this.arm(TimerFor::Idle, IDLE_BEFORE_HIBERNATE);
        }
        let Some(timer) = this.timer.as_mut() else {
            return Poll::Pending;
        };
        while timer.poll_fired(cx) {
            // Between requests, a connection quiet for a whole period hibernates.
            if !in_flight && this.ops == this.ops_at_arm {
                this.hibernated = true;
                return Poll::Ready(Ok(()));
            }
            // Busy since it was armed: look again one period from now.
            this.ops_at_arm = this.ops;
            timer.reset(IDLE_BEFORE_HIBERNATE);
        }
        Poll::Pending
    }
}

impl<I> HibernatingIo<I> {
    /// (Re)arms the connection's one timer to fire `after` from now.
    fn arm(&mut self, timer_for: TimerFor, after: Duration) {
        match self.timer.as_mut() {
            Some(timer) => timer.reset(after),
            None => self.timer = Some(TaskTimer::new(after)),
        }
        self.timer_for = timer_for;
    }

    /// A head started after `completed` responses must be in within [`HEAD_READ_TIMEOUT`] of
    /// the first wait for its rest; then reading fails, and hyper closes the connection.
    fn poll_head_timeout(&mut self, cx: &mut Context<'_>, completed: u64) -> Poll<io::Result<()>> {
        if self.timer_for != TimerFor::Head(completed) {
            self.arm(TimerFor::Head(completed), HEAD_READ_TIMEOUT);
        }
        let Some(timer) = self.timer.as_mut() else {
            return Poll::Pending;
        };
        if !timer.poll_fired(cx) {
            return Poll::Pending;
        }
        crate::warn_limited!(
            "slow_request_head",
            timeout_s = HEAD_READ_TIMEOUT.as_secs(),
            "a client did not finish its request head in time; connection closed"
        );
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "request head not received in time",
        )))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for HibernatingIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(Err(gone()));
        };
        let polled = Pin::new(inner).poll_write(cx, buf);
        this.writing = polled.is_pending();
        this.ops += 1;
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(Err(gone()));
        };
        let polled = Pin::new(inner).poll_write_vectored(cx, bufs);
        this.writing = polled.is_pending();
        this.ops += 1;
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| i.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let polled = Pin::new(inner).poll_flush(cx);
        this.writing = polled.is_pending();
        polled
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.hibernated {
            // hyper closes its side; the socket stays open for the next session.
            return Poll::Ready(Ok(()));
        }
        match this.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

/// The connection's service, counting requests in flight until their response body is done.
#[derive(Clone)]
pub struct ActivityService<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> ActivityService<S> {
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }
}

impl<S, B> hyper::service::Service<Request<hyper::body::Incoming>> for ActivityService<S>
where
    S: hyper::service::Service<Request<hyper::body::Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
    B: Body,
{
    type Response = Response<ActiveBody<B>>;
    type Error = S::Error;
    type Future = ActivityFuture<S::Future>;

    fn call(&self, req: Request<hyper::body::Incoming>) -> Self::Future {
        self.activity.in_flight.fetch_add(1, Ordering::AcqRel);
        let guard = InFlight(self.activity.clone());
        let connect = req.method() == Method::CONNECT;
        ActivityFuture {
            inner: self.inner.call(req),
            guard: Some(guard),
            connect,
        }
    }
}

/// Decrements the connection's in-flight count when dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.completed.fetch_add(1, Ordering::AcqRel);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

pin_project_lite::pin_project! {
    pub struct ActivityFuture<F> {
        #[pin]
        inner: F,
        guard: Option<InFlight>,
        connect: bool,
    }
}

impl<F, B, E> Future for ActivityFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ActiveBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let rsp = match this.inner.poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(rsp)) => rsp,
        };
        let guard = this.guard.take();
        if rsp.status() == StatusCode::SWITCHING_PROTOCOLS
            || (*this.connect && rsp.status().is_success())
        {
            if let Some(g) = &guard {
                g.0.upgraded.store(true, Ordering::Release);
            }
        }
        Poll::Ready(Ok(rsp.map(|inner| ActiveBody { inner, guard })))
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted as in flight until hyper is done with it.
    pub struct ActiveBody<B> {
        #[pin]
        inner: B,
        guard: Option<InFlight>,
    }
}

impl<B: Body> Body for ActiveBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
