//! The request body sent to an endpoint: the client's stream as is, or, on a retryable route,
//! the client's stream with a copy kept (up to [`MAX_REPLAY_BYTES`]) so a retry can send it
//! again. It also carries the request's [`RequestCtx`] down the stack (see `ctx`): one box,
//! where the request's extensions would take three, and the request moved from stage to
//! stage stays small.
//!
//! The copy is taken while the first attempt streams the body, not before: buffering first
//! would add the body's upload time to every request and would deadlock a streaming call
//! whose client waits for response data before it sends more. A retry is possible only when
//! the first attempt read the body to its end within the limit.
//!
//! When the client's stream fails (a malformed chunk, a client that hangs up or resets its
//! stream mid-body) the body notes it in its [`ClientBodyOutcome`], so the error the endpoint
//! exchange then ends with is charged to the client, not to the endpoint.

use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::ctx::RequestCtx;
use super::ProxyError;

/// Bodies larger than this are streamed without a copy and never retried.
pub const MAX_REPLAY_BYTES: usize = 64 * 1024;

pub struct RequestBody {
    kind: Kind,
    /// Told when the client's stream fails; only while someone watches (see `watch`).
    outcome: Option<ClientBodyOutcome>,
    ctx: Box<RequestCtx>,
}

/// Whether the client's side of a request body failed, and how. Shared by the body (which
/// sets it as it streams) and the endpoint client (which reads it when the exchange fails).
#[derive(Clone, Debug, Default)]
pub struct ClientBodyOutcome(Arc<AtomicU8>);

const BODY_OK: u8 = 0;
const BODY_MALFORMED: u8 = 1;
const BODY_ABORTED: u8 = 2;

impl ClientBodyOutcome {
    /// The client's error, if its body failed.
    pub fn failure(&self) -> Option<ProxyError> {
        match self.0.load(Ordering::Acquire) {
            BODY_MALFORMED => Some(ProxyError::MalformedRequestBody),
            BODY_ABORTED => Some(ProxyError::ClientAborted),
            _ => None,
        }
    }

    fn failed(&self, err: &hyper::Error) {
        let code = if is_malformed_body(err) {
            BODY_MALFORMED
        } else {
            BODY_ABORTED
        };
        // The first failure is the one that counts.
        let _ = self
            .0
            .compare_exchange(BODY_OK, code, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// What a failure of the client's body stream means: bytes that don't parse as a body (a bad
/// chunk size, hyper's `InvalidInput`/`InvalidData`) are a malformed request; anything else (EOF
/// before the declared length, a reset stream, a dropped connection) is the client going away.
fn is_malformed_body(err: &hyper::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData
            ) {
                return true;
            }
        }
        cur = e.source();
    }
    err.is_parse()
}

/// Boxed and behind an `Arc` as needed so that `RequestBody` (in every request, moved through
/// every layer) is no larger than the streaming case it nearly always is.
enum Kind {
    Streaming(Incoming),
    Capturing(Box<Capture>),
    Replay(Replay),
}

/// A complete request body, kept for retries.
#[derive(Clone, Debug, Default)]
pub struct Captured {
    data: Arc<[Bytes]>,
    trailers: Option<Arc<HeaderMap>>,
}

impl Captured {
    fn len(&self) -> usize {
        self.data.iter().map(Bytes::len).sum()
    }
}

/// Where a capturing body leaves its copy once the client's stream has ended.
#[derive(Clone, Debug, Default)]
pub struct CaptureSlot(Arc<OnceLock<Captured>>);

impl CaptureSlot {
    /// The whole body, if the first attempt read it to its end within the limit.
    pub fn get(&self) -> Option<&Captured> {
        self.0.get()
    }
}

struct Capture {
    inner: Incoming,
    chunks: Vec<Bytes>,
    bytes: usize,
    /// Over the limit: stop copying, the request won't be retried.
    too_large: bool,
    slot: CaptureSlot,
}

struct Replay {
    body: Captured,
    next: usize,
    trailers_sent: bool,
}

impl RequestBody {
    pub fn streaming(inner: Incoming) -> Self {
        Self::with_kind(Kind::Streaming(inner), Box::default())
    }

    /// No body, for a request the proxy makes itself.
    pub fn empty() -> Self {
        Self::replay(&Captured::default(), RequestCtx::default())
    }

    fn with_kind(kind: Kind, ctx: Box<RequestCtx>) -> Self {
        Self {
            kind,
            outcome: None,
            ctx,
        }
    }

    pub fn ctx(&self) -> &RequestCtx {
        &self.ctx
    }

    pub fn ctx_mut(&mut self) -> &mut RequestCtx {
        &mut self.ctx
    }

    /// Notes from now on whether the client's stream fails (only a body still to come can).
    pub fn watch(&mut self) -> Option<ClientBodyOutcome> {
        let live = match &self.kind {
            Kind::Streaming(inner) => !inner.is_end_stream(),
            Kind::Capturing(c) => !c.inner.is_end_stream(),
            Kind::Replay(_) => false,
        };
        if !live {
            return None;
        }
        Some(self.outcome.get_or_insert_with(Default::default).clone())
    }

    /// This body, keeping a copy in the returned slot when it ends within [`MAX_REPLAY_BYTES`].
    /// The client's stream is what gets copied; a replay is its own copy already.
    pub fn capturing(self) -> (Self, CaptureSlot) {
        let slot = CaptureSlot::default();
        let inner = match self.kind {
            Kind::Streaming(inner) => inner,
            Kind::Replay(r) => {
                let _ = slot.0.set(r.body.clone());
                return (Self::with_kind(Replay::start(r.body), self.ctx), slot);
            }
            // Already copying for someone else: the slot stays empty, no retry.
            Kind::Capturing(_) => return (self, slot),
        };
        let too_large = inner
            .size_hint()
            .lower()
            .try_into()
            .map_or(true, |n: usize| n > MAX_REPLAY_BYTES);
        let mut capture = Capture {
            inner,
            chunks: Vec::new(),
            bytes: 0,
            too_large,
            slot: slot.clone(),
        };
        if capture.inner.is_end_stream() {
            // No body at all (a GET): nothing to wait for.
            capture.finish(None);
        }
        let body = Self {
            kind: Kind::Capturing(Box::new(capture)),
            outcome: self.outcome,
            ctx: self.ctx,
        };
        (body, slot)
    }

    /// The captured body again, for a retry with the context `ctx`.
    pub fn replay(body: &Captured, ctx: RequestCtx) -> Self {
        Self::with_kind(Replay::start(body.clone()), Box::new(ctx))
    }
}

impl Replay {
    fn start(body: Captured) -> Kind {
        Kind::Replay(Replay {
            body,
            next: 0,
            trailers_sent: false,
        })
    }
}

impl Capture {
    fn record(&mut self, frame: &Frame<Bytes>) {
        if self.too_large {
            return;
        }
        if let Some(data) = frame.data_ref() {
            self.bytes += data.len();
            if self.bytes > MAX_REPLAY_BYTES {
                self.too_large = true;
                self.chunks = Vec::new();
                return;
            }
            if !data.is_empty() {
                self.chunks.push(data.clone());
            }
        }
    }

    fn finish(&mut self, trailers: Option<HeaderMap>) {
        if self.too_large {
            return;
        }
        let captured = Captured {
            data: std::mem::take(&mut self.chunks).into(),
            trailers: trailers.map(Arc::new),
        };
        // Only the first end counts; a body ends once.
        let _ = self.slot.0.set(captured);
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = match &mut this.kind {
            Kind::Streaming(inner) => Pin::new(inner).poll_frame(cx),
            Kind::Capturing(c) => {
                let polled = Pin::new(&mut c.inner).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        c.record(frame);
                        if let Some(trailers) = frame.trailers_ref() {
                            c.finish(Some(trailers.clone()));
                        } else if c.inner.is_end_stream() {
                            c.finish(None);
                        }
                    }
                    Poll::Ready(None) => c.finish(None),
                    Poll::Ready(Some(Err(_))) | Poll::Pending => {}
                }
                polled
            }
            Kind::Replay(r) => {
                if let Some(chunk) = r.body.data.get(r.next) {
                    r.next += 1;
                    return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
                }
                if !r.trailers_sent {
                    r.trailers_sent = true;
                    if let Some(t) = &r.body.trailers {
                        return Poll::Ready(Some(Ok(Frame::trailers(HeaderMap::clone(t)))));
                    }
                }
                Poll::Ready(None)
            }
        };
        if let (Poll::Ready(Some(Err(e))), Some(outcome)) = (&polled, &this.outcome) {
            outcome.failed(e);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Streaming(inner) => inner.is_end_stream(),
            Kind::Capturing(c) => c.inner.is_end_stream(),
            Kind::Replay(r) => {
                r.next >= r.body.data.len() && (r.trailers_sent || r.body.trailers.is_none())
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Streaming(inner) => inner.size_hint(),
            Kind::Capturing(c) => c.inner.size_hint(),
            Kind::Replay(r) => {
                let sent: usize = r.body.data[..r.next].iter().map(Bytes::len).sum();
                SizeHint::with_exact((r.body.len() - sent) as u64)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn replay_yields_the_captured_data_and_trailers() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-timeout", "1S".parse().unwrap());
        let captured = Captured {
            data: vec![Bytes::from_static(b"ab"), Bytes::from_static(b"cd")].into(),
            trailers: Some(Arc::new(trailers.clone())),
        };
        let body = RequestBody::replay(&captured, RequestCtx::default());
        assert_eq!(body.size_hint().exact(), Some(4));
        let collected = body.collect().await.expect("replay never fails");
        assert_eq!(collected.trailers(), Some(&trailers));
        assert_eq!(&collected.to_bytes()[..], b"abcd");
        // Twice: a body can be replayed for every retry.
        let again = RequestBody::replay(&captured, RequestCtx::default())
            .collect()
            .await
            .unwrap();
        assert_eq!(&again.to_bytes()[..], b"abcd");
    }

    #[tokio::test]
    async fn empty_replay_ends_at_once() {
        let body = RequestBody::empty();
        assert!(body.is_end_stream());
        assert!(body.collect().await.unwrap().to_bytes().is_empty());
    }
}
