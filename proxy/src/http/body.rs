//! The response body handed back to the client. Work that belongs to the end of a response (its
//! metrics, its access-log line, releasing the endpoint's load) waits until the stream ends or is
//! dropped, because a response isn't over until its last frame: gRPC reports failure in trailers.

use std::cell::Cell;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pylon_proxy_metrics::{Classification, HttpTarget, RouteTarget};

use super::h2_client::H2Body;
use super::pool::PooledConn;
use super::request_body::ClientBodyOutcome;
use super::{ProxyError, ProxyResponse};
use crate::access_log::AccessEntry;
use crate::balance::InFlight;
use crate::profiles::RouteState;
use pylon_tap_server::TapHandle;

/// What to record when a proxied response completes: the endpoint's (or inbound authority's)
/// `response_total` and latency, and the access-log line.
pub struct Recorder {
    pub metrics: HttpTarget,
    pub start: Instant,
    /// The request's route, whose response classes decide success; `None`: the default rule.
    pub route: Option<Arc<RouteState>>,
    pub access: Option<Box<AccessEntry>>,
}

/// What to record per route when a response completes: `route_response_total` (once per
/// request the client made) or `route_actual_response_total` (once per attempt).
pub struct RouteRecord {
    pub route: Arc<RouteState>,
    pub metrics: RouteTarget,
    pub start: Instant,
}

fn classification(route: Option<&RouteState>, status: u16, grpc: Option<u32>) -> Classification {
    match route {
        Some(r) => r.classify(status, grpc),
        None => pylon_proxy_metrics::classify(Some(status), grpc, None),
    }
}

impl Recorder {
    fn finish(self, status: u16, grpc_status: Option<u32>, class: Classification, now: Instant) {
        let latency = now.saturating_duration_since(self.start);
        self.metrics
            .classified_response(Some(status), grpc_status, None, class, latency);
        if let Some(entry) = self.access {
            entry.emit(status, grpc_status, None, latency);
        }
    }
}

impl RouteRecord {
    fn finish(self, status: u16, grpc_status: Option<u32>, class: Classification, now: Instant) {
        self.metrics.classified_response(
            Some(status),
            grpc_status,
            None,
            class,
            now.saturating_duration_since(self.start),
        );
    }

    /// A response the proxy made itself (no endpoint answered in time, or at all; or the
    /// client's request was bad).
    pub fn proxy_error(self, err: ProxyError) {
        self.metrics.classified_response(
            Some(err.status().as_u16()),
            None,
            Some(err.reason()),
            err.classification(),
            self.start.elapsed(),
        );
    }
}

/// What to record when a request is cancelled before its response: hyper drops the request's
/// future when the client resets its stream or closes its connection, so nothing else would
/// record it. A cancellation is the client's doing (recorded with no status as `client aborted
/// request`, never as a failure) unless a layer above abandoned the attempt for a reason of
/// its own (see [`abandon`]): then it is recorded as that proxy error, the response the client
/// got.
pub trait OnCancel {
    fn cancelled(self);
}

/// Records `T` as cancelled when dropped before [`answered`](Self::answered).
pub struct RecordIfCancelled<T: OnCancel>(Option<T>);

impl<T: OnCancel> RecordIfCancelled<T> {
    pub fn new(record: T) -> Self {
        Self(Some(record))
    }

    /// The request got its response (or a proxy error): hands the record back.
    pub fn answered(&mut self) -> Option<T> {
        self.0.take()
    }
}

impl<T: OnCancel> Drop for RecordIfCancelled<T> {
    fn drop(&mut self) {
        if let Some(record) = self.0.take() {
            record.cancelled();
        }
    }
}

thread_local! {
    /// Why the attempt being dropped on this thread was abandoned, while [`abandon`] drops it.
    /// Dropping a future drops everything it holds at once, on this thread, so the records
    /// inside read it as they go; nothing on the request path pays for it otherwise.
    static ABANDONED_FOR: Cell<Option<ProxyError>> = const { Cell::new(None) };
}

/// Drops `attempt` (a request's future below the caller), which the caller gave up on with
/// `reason` (a route timeout): what the attempt was recording (its metrics, its tap events)
/// records the response the client gets, not a client that went away.
pub fn abandon<T>(attempt: T, reason: ProxyError) {
    struct Restore(Option<ProxyError>);
    impl Drop for Restore {
        fn drop(&mut self) {
            ABANDONED_FOR.with(|a| a.set(self.0));
        }
    }
    let _restore = Restore(ABANDONED_FOR.with(|a| a.replace(Some(reason))));
    drop(attempt);
}

/// The reason the attempt being dropped now was abandoned with, if it was (see [`abandon`]).
pub fn abandoned_for() -> Option<ProxyError> {
    ABANDONED_FOR.with(Cell::get)
}

fn record_cancelled<L: pylon_proxy_metrics::HandleLabels>(
    metrics: &pylon_proxy_metrics::HttpTarget<L>,
    start: Instant,
) {
    match abandoned_for() {
        Some(err) => metrics.classified_response(
            Some(err.status().as_u16()),
            None,
            Some(err.reason()),
            err.classification(),
            start.elapsed(),
        ),
        None => metrics.classified_response(
            None,
            None,
            Some(ProxyError::ClientAborted.reason()),
            Classification::Success,
            start.elapsed(),
        ),
    }
}

impl OnCancel for RouteRecord {
    fn cancelled(self) {
        record_cancelled(&self.metrics, self.start);
    }
}

/// An endpoint's (or inbound authority's) request, until it is answered.
pub struct Pending {
    pub metrics: HttpTarget,
    pub start: Instant,
    pub access: Option<Box<AccessEntry>>,
}

impl OnCancel for Pending {
    fn cancelled(self) {
        match abandoned_for() {
            // The proxy answered for it: recorded, and logged, as that response.
            Some(err) => record_proxy_error(&self.metrics, err, self.start, self.access),
            None => record_cancelled(&self.metrics, self.start),
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
    metrics.classified_response(
        Some(status),
        None,
        Some(err.reason()),
        err.classification(),
        latency,
    );
    if let Some(entry) = access {
        entry.emit(status, None, Some(err.reason()), latency);
    }
}

/// Records `recorder` when `rsp`'s body ends.
pub fn record_on_end(rsp: &mut ProxyResponse, recorder: Recorder) {
    observe_head(rsp);
    let body = rsp.body_mut();
    body.on_end().recorder = Some(recorder);
    body.finish_if_ended();
}

/// Records `record` when `rsp`'s body ends (at most two per response: the attempt's and the
/// request's).
pub fn record_route_on_end(rsp: &mut ProxyResponse, record: RouteRecord) {
    let (status, grpc) = observe_head(rsp);
    let body = rsp.body_mut();
    match body.on_end().routes.iter_mut().find(|r| r.is_none()) {
        Some(slot) => *slot = Some(record),
        // Both slots taken would be a stack built wrong; record now rather than lose it.
        None => {
            let class = record.route.classify(status, grpc);
            record.finish(status, grpc, class, Instant::now())
        }
    }
    body.finish_if_ended();
}

/// Keeps the endpoint's request in flight (for its load) until the stream ends, then tells
/// failure accrual how it went, classified by `route`.
pub fn release_on_end(
    rsp: &mut ProxyResponse,
    in_flight: InFlight,
    route: Option<Arc<RouteState>>,
) {
    observe_head(rsp);
    let body = rsp.body_mut();
    let on_end = body.on_end();
    on_end.classifier = route;
    on_end.in_flight = Some(in_flight);
    body.finish_if_ended();
}

/// The response's status and grpc-status, read from its head once.
fn observe_head(rsp: &mut ProxyResponse) -> (u16, Option<u32>) {
    if let Some(head) = rsp.body().0.head {
        return head;
    }
    // A trailers-only gRPC response carries its status in the headers.
    let head = (rsp.status().as_u16(), grpc_status(rsp.headers()));
    rsp.body_mut().0.head = Some(head);
    head
}

/// How a response stream ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// Read to its end: the connection can be reused.
    Clean,
    /// The endpoint broke it mid-body.
    Broken,
    /// Dropped before its end: the client went away.
    Dropped,
    /// Set aside by a retry: a failure the endpoint did answer.
    Discarded,
}

/// A response's body: everything it carries sits behind one pointer. A response is moved by
/// value through every layer on its way out, and a response of 120 bytes is copied inline where
/// one of 184 (this body inline) took a call to `memcpy` at every move. The box is the one a
/// proxied response needed anyway for the work its end does.
pub struct ResponseBody(Box<Inner>);

#[derive(Default)]
struct Inner {
    kind: Kind,
    /// Status and grpc-status (headers, then trailers) once something records this response.
    head: Option<(u16, Option<u32>)>,
    on_end: OnEnd,
}

/// What a response's end does, attached by the layers it passes on its way out.
#[derive(Default)]
struct OnEnd {
    /// The route whose classes classify the response for failure accrual. Kept apart from the
    /// recorders' routes: a body that ends at once has already finished them when the balancer
    /// attaches its in-flight guard.
    classifier: Option<Arc<RouteState>>,
    recorder: Option<Recorder>,
    routes: [Option<RouteRecord>; 2],
    in_flight: Option<InFlight>,
    /// The HTTP/1 connection that carried the response, reusable once it has ended cleanly.
    conn: Option<PooledConn>,
    /// A tap observing this response (only while someone taps).
    tap: Option<TapHandle>,
    /// The request's body, streaming alongside: if it failed, a broken response is the
    /// client's doing, not the endpoint's.
    client_body: Option<ClientBodyOutcome>,
}

enum Kind {
    /// From an HTTP/1 endpoint connection.
    Proxied(Incoming),
    /// From the endpoint's h2 connection.
    ProxiedH2(H2Body),
    Full(Option<Bytes>),
}

impl Default for Kind {
    fn default() -> Self {
        Self::Full(None)
    }
}

/// Why a proxied response's body broke: the endpoint's HTTP/1 connection, or its h2 stream.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Http1(#[from] hyper::Error),
    #[error(transparent)]
    H2(#[from] h2::Error),
}

impl ResponseBody {
    pub fn proxied(inner: Incoming) -> Self {
        Self::new(Kind::Proxied(inner))
    }

    pub fn proxied_h2(inner: H2Body) -> Self {
        Self::new(Kind::ProxiedH2(inner))
    }

    pub fn full(bytes: Bytes) -> Self {
        Self::new(Kind::Full((!bytes.is_empty()).then_some(bytes)))
    }

    pub fn empty() -> Self {
        Self::new(Kind::Full(None))
    }

    fn new(kind: Kind) -> Self {
        // Made where it lies: the whole is ~0.5 KiB, its kind 48 bytes.
        let mut inner = Box::<Inner>::default();
        inner.kind = kind;
        Self(inner)
    }

    fn on_end(&mut self) -> &mut OnEnd {
        &mut self.0.on_end
    }

    /// Watches the request body that streams alongside this response (see `client_body`).
    pub fn client_body(&mut self, outcome: ClientBodyOutcome) {
        self.on_end().client_body = Some(outcome);
    }

    /// Sends the tap's response-end event when the stream ends (counting its bytes till then).
    pub fn tap_on_end(&mut self, handle: TapHandle) {
        self.on_end().tap = Some(handle);
        self.finish_if_ended();
    }

    /// A response the proxy won't send on (a retry replaces it): record it as it is.
    pub fn discard(mut self) {
        self.finish(End::Discarded);
    }

    fn finish_if_ended(&mut self) {
        if self.is_end_stream() {
            self.finish(End::Clean);
        }
    }

    /// Returns the connection to its pool when the body has been read to its end.
    pub fn reuse_on_end(&mut self, conn: PooledConn) {
        if self.is_end_stream() {
            conn.release();
        } else {
            self.on_end().conn = Some(conn);
        }
    }

    fn finish(&mut self, end: End) {
        self.0.finish(end);
    }
}

impl OnEnd {
    fn finish(&mut self, head: Option<(u16, Option<u32>)>, end: End) {
        if let Some((status, grpc)) = head {
            // Every recorder of one response shares its route, so classify and read the clock
            // once.
            let route = self
                .classifier
                .as_deref()
                .or_else(|| self.routes.iter().flatten().next().map(|r| &*r.route))
                .or_else(|| self.recorder.as_ref().and_then(|r| r.route.as_deref()));
            let class = classification(route, status, grpc);
            let now = Instant::now();
            if let Some(rec) = self.recorder.take() {
                rec.finish(status, grpc, class, now);
            }
            for rec in self.routes.iter_mut().filter_map(Option::take) {
                rec.finish(status, grpc, class, now);
            }
            if let Some(in_flight) = self.in_flight.as_mut() {
                // A client that went away says nothing about the endpoint.
                if end != End::Dropped {
                    in_flight.finished(class.is_success());
                }
            }
        }
        if let Some(tap) = self.tap.take() {
            // Anything but a clean end is reported as a reset by the handle itself.
            if end == End::Clean {
                tap.response_end(head.and_then(|h| h.1), None);
            }
        }
        self.in_flight = None;
        if let Some(conn) = self.conn.take() {
            if end == End::Clean {
                conn.release();
            }
        }
    }
}

/// Named once: a `&str` key is parsed into a header name at every lookup.
const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

pub fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    // Read on every response head and every trailer block, which carry a few headers:
    // comparing their names costs less than hashing this one (a miss, mostly).
    let value = if headers.len() <= 8 {
        headers
            .iter()
            .find_map(|(name, value)| (*name == GRPC_STATUS).then_some(value))
    } else {
        headers.get(GRPC_STATUS)
    };
    value
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse().ok())
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self.get_mut().0;
        let polled = match &mut this.kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Proxied(inner) => Pin::new(inner).poll_frame(cx).map_err(BodyError::from),
            Kind::ProxiedH2(inner) => Pin::new(inner).poll_frame(cx).map_err(BodyError::from),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(tap)) = (frame.data_ref(), this.on_end.tap.as_mut()) {
                    tap.add_bytes(data.len() as u64);
                }
                if let (Some(trailers), Some(head)) = (frame.trailers_ref(), this.head.as_mut()) {
                    if let Some(code) = grpc_status(trailers) {
                        head.1 = Some(code);
                    }
                }
                if this.kind.is_end_stream() {
                    this.finish(End::Clean);
                }
            }
            Poll::Ready(None) => this.finish(End::Clean),
            Poll::Ready(Some(Err(_))) => {
                if this
                    .on_end
                    .client_body
                    .as_ref()
                    .is_some_and(|c| c.failure().is_some())
                {
                    // The client's request broke first: the exchange ended on its account.
                    this.finish(End::Dropped);
                } else {
                    // The endpoint broke the stream mid-body: count it as a failure.
                    if let Some(head) = this.head.as_mut() {
                        head.0 = head.0.max(502);
                    }
                    this.finish(End::Broken);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.0.kind.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0.kind {
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Proxied(inner) => inner.size_hint(),
            Kind::ProxiedH2(inner) => inner.size_hint(),
        }
    }
}

impl Kind {
    fn is_end_stream(&self) -> bool {
        match self {
            Kind::Full(b) => b.is_none(),
            Kind::Proxied(inner) => inner.is_end_stream(),
            Kind::ProxiedH2(inner) => inner.is_end_stream(),
        }
    }
}

impl Inner {
    fn finish(&mut self, end: End) {
        self.on_end.finish(self.head, end);
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // The client went away (or the server dropped the body) before the end: still record it.
        self.finish(End::Dropped);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values over 128 bytes are moved with a call to `memcpy`; a response moves at every layer.
    #[test]
    fn a_response_is_copied_inline() {
        assert!(std::mem::size_of::<ProxyResponse>() <= 128);
        assert!(std::mem::size_of::<Poll<Result<ProxyResponse, ProxyError>>>() <= 128);
    }

    #[test]
    fn grpc_status_is_found_in_few_headers_and_in_many() {
        let mut headers = HeaderMap::new();
        assert_eq!(grpc_status(&headers), None);
        headers.insert("grpc-message", http::HeaderValue::from_static("no"));
        headers.insert(GRPC_STATUS, http::HeaderValue::from_static(" 14 "));
        assert_eq!(grpc_status(&headers), Some(14));
        for i in 0..10 {
            let name = http::HeaderName::try_from(format!("x-pad-{i}")).unwrap();
            headers.insert(name, http::HeaderValue::from_static("1"));
        }
        assert!(headers.len() > 8);
        assert_eq!(grpc_status(&headers), Some(14));
        headers.insert(GRPC_STATUS, http::HeaderValue::from_static("OK"));
        assert_eq!(grpc_status(&headers), None, "not a number");
    }
}
