//! The upstream app every path ends at (`pylon-bench app`): HTTP/1.1 and h2c on one port
//! (hyper-util's auto server) and a TCP echo port. It runs as its own process so it can be pinned
//! beside the load generator, away from the proxies.
//!
//! Routes: `GET /small` answers [`SMALL_BODY`]; `GET /headers` answers it with
//! [`TYPICAL_HEADERS`] as well; `POST /upload` reads the whole body and answers
//! its length in decimal; `POST /bench.Bench/Unary` (gRPC) reads the framed request and answers
//! one framed message with `grpc-status: 0` in the trailers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The small body of `GET /small`.
pub const SMALL_BODY: &[u8] = b"pylon-bench: a small response body of 64 bytes, for the GET!!!!\n";
/// What a web service's response head typically carries besides its length and date, for
/// `GET /headers`: a hop's cost grows with the headers it parses and writes again, and a change
/// measured on `GET /small` alone (two headers) can pass for a gain and cost more on real
/// responses (`benches/profile.py --workload http1-get-headers`).
pub const TYPICAL_HEADERS: [(&str, &str); 8] = [
    ("content-type", "text/plain; charset=utf-8"),
    ("cache-control", "no-cache"),
    ("server", "app/1.2"),
    ("x-request-id", "4f2a9c1e-7b3d-4e8a-9f1c-2d5e6a7b8c9d"),
    ("vary", "accept-encoding"),
    ("x-frame-options", "DENY"),
    ("strict-transport-security", "max-age=31536000"),
    ("x-content-type-options", "nosniff"),
];
/// The gRPC method the app serves.
pub const GRPC_PATH: &str = "/bench.Bench/Unary";
/// The message (unframed) the gRPC method answers with.
pub const GRPC_REPLY: &[u8] = b"unary reply 16 B";

/// A 5-byte gRPC length prefix (uncompressed) followed by `message`.
pub fn grpc_frame(message: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(5 + message.len());
    out.push(0);
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out.into()
}

/// Serves until the process is killed.
pub async fn serve(http: SocketAddr, echo: SocketAddr) -> Result<()> {
    let http = TcpListener::bind(http)
        .await
        .with_context(|| format!("binding the app's HTTP listener {http}"))?;
    let echo = TcpListener::bind(echo)
        .await
        .with_context(|| format!("binding the app's echo listener {echo}"))?;
    tokio::try_join!(serve_http(http), serve_echo(echo))?;
    Ok(())
}

async fn serve_http(listener: TcpListener) -> Result<()> {
    loop {
        let (stream, _) = listener
            .accept()
            .await
            .context("accepting on the app's HTTP listener")?;
        // A failed setsockopt only costs latency; the connection still works.
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            // Errors here are clients going away mid-request; nothing to do.
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service_fn(handle))
                .await;
        });
    }
}

async fn serve_echo(listener: TcpListener) -> Result<()> {
    loop {
        let (stream, _) = listener
            .accept()
            .await
            .context("accepting on the app's echo listener")?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(echo(stream));
    }
}

async fn echo(mut stream: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn handle(req: Request<Incoming>) -> Result<Response<AppBody>, Infallible> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    // Read the whole request body, as a real app would before answering.
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(status(StatusCode::BAD_REQUEST)),
    };
    let response = match (method.as_str(), path.as_str()) {
        ("GET", "/small") => Response::new(AppBody::full(Bytes::from_static(SMALL_BODY))),
        ("GET", "/headers") => {
            let mut r = Response::new(AppBody::full(Bytes::from_static(SMALL_BODY)));
            for (name, value) in TYPICAL_HEADERS {
                r.headers_mut()
                    .insert(name, HeaderValue::from_static(value));
            }
            r
        }
        ("POST", "/upload") => Response::new(AppBody::full(body.len().to_string().into())),
        // A failing endpoint, for `pylon-bench train` (failure classification and retries).
        ("GET", "/fail") => status(StatusCode::INTERNAL_SERVER_ERROR),
        ("POST", GRPC_PATH) => {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            let mut r = Response::new(AppBody {
                data: Some(grpc_frame(GRPC_REPLY)),
                trailers: Some(trailers),
            });
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            r
        }
        _ => status(StatusCode::NOT_FOUND),
    };
    Ok(response)
}

fn status(code: StatusCode) -> Response<AppBody> {
    let mut r = Response::new(AppBody::full(Bytes::new()));
    *r.status_mut() = code;
    r
}

/// A body of at most one data frame, then optional trailers (what gRPC needs and `Full` lacks).
pub struct AppBody {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl AppBody {
    fn full(data: Bytes) -> Self {
        Self {
            data: Some(data),
            trailers: None,
        }
    }
}

impl Body for AppBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        let mut hint = hyper::body::SizeHint::new();
        let len = self.data.as_ref().map_or(0, |d| d.len() as u64);
        if self.trailers.is_none() {
            hint.set_exact(len);
        } else {
            hint.set_lower(len);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_a_grpc_message() {
        let f = grpc_frame(b"abc");
        assert_eq!(&f[..], &[0, 0, 0, 0, 3, b'a', b'b', b'c']);
        assert_eq!(SMALL_BODY.len(), 64);
        assert_eq!(GRPC_REPLY.len(), 16);
    }
}
