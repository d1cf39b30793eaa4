//! The response body handed back to the client. Work that belongs to the end of a response (its
//! metrics, its access-log line, releasing the endpoint's load) waits until the stream ends or is
//! dropped, because a response isn't over until its last frame: gRPC reports failure in trailers.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pylon_proxy_metrics::HttpTarget;

use super::pool::PooledConn;
use super::ProxyError;
use crate::access_log::AccessEntry;
use crate::balance::InFlight;

/// What to record when a proxied response completes.
pub struct Recorder {
    pub metrics: HttpTarget,
    pub start: Instant,
    pub status: u16,
    pub grpc_status: Option<u32>,
    pub access: Option<Box<AccessEntry>>,
}

impl Recorder {
    fn finish(self) {
        let latency = self.start.elapsed();
        self.metrics
            .response(Some(self.status), self.grpc_status, None, latency);
        if let Some(entry) = self.access {
            entry.emit(self.status, self.grpc_status, None, latency);
        }
    }
}

/// A response the proxy made itself: record it at once.
pub fn record_proxy_error(
    metrics: &HttpTarget,
    err: ProxyError,
    start: Instant,
    access: Option<Box<AccessEntry>>,
) {
    let latency: Duration = start.elapsed();
    let status = err.status().as_u16();
    metrics.response(Some(status), None, Some(err.reason()), latency);
    if let Some(entry) = access {
        entry.emit(status, None, Some(err.reason()), latency);
    }
}

pub struct ResponseBody {
    kind: Kind,
    recorder: Option<Recorder>,
    in_flight: Option<InFlight>,
    /// The HTTP/1 connection that carried the response, reusable once it has ended cleanly.
    conn: Option<PooledConn>,
}

enum Kind {
    Proxied(Incoming),
    Full(Option<Bytes>),
}

impl ResponseBody {
    pub fn proxied(inner: Incoming) -> Self {
        Self::new(Kind::Proxied(inner))
    }

    pub fn full(bytes: Bytes) -> Self {
        Self::new(Kind::Full((!bytes.is_empty()).then_some(bytes)))
    }

    pub fn empty() -> Self {
        Self::new(Kind::Full(None))
    }

    fn new(kind: Kind) -> Self {
        Self {
            kind,
            recorder: None,
            in_flight: None,
            conn: None,
        }
    }

    /// Records the response's metrics when the stream ends.
    pub fn record_on_end(&mut self, recorder: Recorder) {
        self.recorder = Some(recorder);
        if self.is_end_stream() {
            self.finish(true);
        }
    }

    /// Keeps the endpoint's request in flight (for its load) until the stream ends.
    pub fn release_on_end(&mut self, in_flight: InFlight) {
        if !self.is_end_stream() {
            self.in_flight = Some(in_flight);
        }
    }

    /// Returns the connection to its pool when the body has been read to its end.
    pub fn reuse_on_end(&mut self, conn: PooledConn) {
        if self.is_end_stream() {
            conn.release();
        } else {
            self.conn = Some(conn);
        }
    }

    /// `clean`: the stream reached its end; otherwise the connection is not reused.
    fn finish(&mut self, clean: bool) {
        if let Some(rec) = self.recorder.take() {
            rec.finish();
        }
        self.in_flight = None;
        if let Some(conn) = self.conn.take() {
            if clean {
                conn.release();
            }
        }
    }
}

pub fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse().ok())
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = match &mut this.kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Proxied(inner) => Pin::new(inner).poll_frame(cx),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(trailers), Some(rec)) = (frame.trailers_ref(), this.recorder.as_mut())
                {
                    if let Some(code) = grpc_status(trailers) {
                        rec.grpc_status = Some(code);
                    }
                }
                if this.is_end_stream() {
                    this.finish(true);
                }
            }
            Poll::Ready(None) => this.finish(true),
            Poll::Ready(Some(Err(_))) => {
                // The endpoint broke the stream mid-body: count it as a failure.
                if let Some(rec) = this.recorder.as_mut() {
                    rec.status = rec.status.max(502);
                }
                this.finish(false);
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Proxied(inner) => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Proxied(inner) => inner.size_hint(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // The client went away (or the server dropped the body) before the end: still record it.
        self.finish(false);
    }
}
