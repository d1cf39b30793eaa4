//! The response body handed back to the client. A proxied body records the response's metrics,
//! its gRPC status and the endpoint's load when its stream ends (or is dropped), because a
//! response isn't over until its last frame: gRPC reports failure in trailers.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pylon_proxy_metrics::HttpTarget;

use crate::access_log::AccessEntry;
use crate::balance::InFlight;

/// What to record when a proxied response completes.
pub struct Recorder {
    pub metrics: HttpTarget,
    pub start: Instant,
    pub status: u16,
    pub grpc_status: Option<u32>,
    pub in_flight: Option<InFlight>,
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
        drop(self.in_flight);
    }
}

pub enum ResponseBody {
    Proxied {
        inner: Incoming,
        recorder: Option<Recorder>,
    },
    Full(Option<Bytes>),
}

impl ResponseBody {
    pub fn full(bytes: Bytes) -> Self {
        Self::Full((!bytes.is_empty()).then_some(bytes))
    }

    pub fn empty() -> Self {
        Self::Full(None)
    }

    pub fn proxied(inner: Incoming, recorder: Recorder) -> Self {
        if inner.is_end_stream() {
            recorder.finish();
            return Self::Proxied {
                inner,
                recorder: None,
            };
        }
        Self::Proxied {
            inner,
            recorder: Some(recorder),
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
        match self.get_mut() {
            Self::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Proxied { inner, recorder } => {
                let polled = Pin::new(&mut *inner).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let (Some(trailers), Some(rec)) =
                            (frame.trailers_ref(), recorder.as_mut())
                        {
                            if let Some(code) = grpc_status(trailers) {
                                rec.grpc_status = Some(code);
                            }
                        }
                        if inner.is_end_stream() {
                            if let Some(rec) = recorder.take() {
                                rec.finish();
                            }
                        }
                    }
                    Poll::Ready(None) => {
                        if let Some(rec) = recorder.take() {
                            rec.finish();
                        }
                    }
                    Poll::Ready(Some(Err(_))) => {
                        // The endpoint broke the stream mid-body: count it as a failure.
                        if let Some(mut rec) = recorder.take() {
                            rec.status = rec.status.max(502);
                            rec.finish();
                        }
                    }
                    Poll::Pending => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(b) => b.is_none(),
            Self::Proxied { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Self::Full(None) => SizeHint::with_exact(0),
            Self::Proxied { inner, .. } => inner.size_hint(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // The client went away (or the server dropped the body) before the end: still record it.
        if let Self::Proxied { recorder, .. } = self {
            if let Some(rec) = recorder.take() {
                rec.finish();
            }
        }
    }
}

/// A response the proxy made itself: record it at once.
pub fn record_proxy_error(
    metrics: &HttpTarget,
    err: super::ProxyError,
    start: Instant,
    access: Option<Box<AccessEntry>>,
) {
    let latency: Duration = start.elapsed();
    metrics.response(
        Some(err.status().as_u16()),
        None,
        Some(err.reason()),
        latency,
    );
    if let Some(entry) = access {
        entry.emit(err.status().as_u16(), None, Some(err.reason()), latency);
    }
}
