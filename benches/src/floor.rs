//! `pylon-floor`: the least a hyper-based proxy hop can do, to measure Pylon against.
//!
//! It forwards every request to one upstream and does nothing else: no discovery, balancing,
//! routes, metrics, tap, header rewriting or error handling beyond giving up. What it costs per
//! request (`benches/profile.py --proxy floor`) is the floor of hyper, h2, tokio and jemalloc
//! under Pylon's own stages: Pylon's figure less the floor's is what Pylon's own code costs, and
//! the floor against nginx's and HAProxy's is what no change to Pylon's code alone can win.
//!
//! `--h2-client h2` sends h2 requests with the `h2` crate straight from the request's task
//! instead of through hyper's h2 client (which hands each request to its connection task and
//! spawns a task per request to wait for the response): the two floors' difference is what
//! such a client in Pylon could save.
//!
//! `--h1-client inline` polls each upstream HTTP/1 connection from the downstream connection's
//! own task (while a response head is awaited and while its body streams) instead of from a
//! task of its own, which hyper's client reaches through a channel and answers through a
//! oneshot: what such a pool in Pylon could save.
//!
//! `--h1-server narrow` and `--h1-client narrow` leave hyper out of a side of HTTP/1.1
//! (`narrow_h1.rs`): heads parsed with `httparse` into `http` types and written back from them,
//! `Content-Length` bodies only. What a narrower path for the common case could cost, against
//! hyper's, each side apart or both.
//!
//! `--h2-server h2` serves h2 with the `h2` crate, each connection's streams polled in the
//! connection's own task, instead of hyper's h2 server (which spawns a task per stream): what
//! such a server in Pylon could save.
//!
//! Same runtime and allocator as `pylon-proxy --threads 1`: a current-thread tokio runtime and
//! jemalloc, with the proxy's options.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Empty};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1 as client1, http2 as client2};
use hyper::server::conn::{http1 as server1, http2 as server2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

mod narrow_h1;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// `pylon-proxy`'s jemalloc options (proxy/src/main.rs says why each): with jemalloc's defaults
/// the floor's 8 KiB read buffers churn slabs under many connections, as Pylon's did, and the
/// floor would no longer be what Pylon's own stages sit on.
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0,\
slab_sizes:8192-8192:16,tcache_nslots_small_min:64\0";

#[derive(Debug, Parser)]
#[command(
    name = "pylon-floor",
    about = "The least a hyper-based proxy hop can do"
)]
struct Cli {
    /// HTTP/1.1 listener.
    #[arg(long)]
    listen: SocketAddr,
    /// h2c (prior knowledge) listener.
    #[arg(long)]
    listen_h2: SocketAddr,
    /// The upstream (the bench's app: HTTP/1.1 and h2c on one port).
    #[arg(long)]
    to: SocketAddr,
    /// What sends the h2 requests upstream.
    #[arg(long, value_enum, default_value_t = H2Client::Hyper)]
    h2_client: H2Client,
    /// What drives the upstream HTTP/1 connections.
    #[arg(long, value_enum, default_value_t = H1Client::Task)]
    h1_client: H1Client,
    /// What serves the HTTP/1.1 listener's connections.
    #[arg(long, value_enum, default_value_t = H1Server::Hyper)]
    h1_server: H1Server,
    /// What serves the h2c listener's connections.
    #[arg(long, value_enum, default_value_t = H2Client::Hyper)]
    h2_server: H2Client,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum H1Client {
    /// hyper's connection future spawned as a task, as Pylon's pool does.
    Task,
    /// The connection future polled by the task that waits for its response.
    Inline,
    /// `narrow_h1`'s client, on the request's task: no hyper on the upstream side.
    Narrow,
    /// As `narrow`, with `ureq-proto`'s sans-IO client doing the HTTP/1.1.
    Ureq,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum H1Server {
    /// hyper's HTTP/1 server.
    Hyper,
    /// `narrow_h1`'s server: no hyper on the downstream side.
    Narrow,
}

/// Which h2 implementation a side uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum H2Client {
    /// hyper's `client::conn::http2` / `server::conn::http2`, as Pylon uses them.
    Hyper,
    /// The `h2` crate's client (driven from the request's own task) or server (streams driven
    /// in their connection's task).
    H2,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pylon-floor: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pylon-floor: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(cli: Cli) -> Result<()> {
    let h1 = TcpListener::bind(cli.listen)
        .await
        .context("HTTP/1.1 listener")?;
    let h2 = TcpListener::bind(cli.listen_h2)
        .await
        .context("h2c listener")?;
    let upstream = H2Upstream::connect(cli.to, cli.h2_client).await?;
    let to = cli.to;
    let (h1_server, h1_client) = (cli.h1_server, cli.h1_client);
    if h1_server == H1Server::Narrow && !matches!(h1_client, H1Client::Task | H1Client::Narrow) {
        anyhow::bail!("--h1-server narrow takes --h1-client task (hyper's) or narrow");
    }
    tokio::spawn(async move {
        while let Ok((stream, _)) = h1.accept().await {
            match (h1_server, h1_client) {
                (H1Server::Narrow, H1Client::Narrow) => tokio::spawn(narrow_h1::serve(
                    stream,
                    to,
                    narrow_h1::Client::Narrow(None),
                )),
                (H1Server::Narrow, _) => {
                    tokio::spawn(narrow_h1::serve(stream, to, narrow_h1::Client::Hyper(None)))
                }
                (H1Server::Hyper, H1Client::Task) => tokio::spawn(serve_h1(stream, to)),
                (H1Server::Hyper, H1Client::Inline) => tokio::spawn(serve_h1_inline(stream, to)),
                (H1Server::Hyper, H1Client::Narrow) => {
                    tokio::spawn(narrow_h1::serve_hyper(stream, to, false))
                }
                (H1Server::Hyper, H1Client::Ureq) => {
                    tokio::spawn(narrow_h1::serve_hyper(stream, to, true))
                }
            };
        }
    });
    let upstream = Arc::new(upstream);
    loop {
        tokio::select! {
            accepted = h2.accept() => {
                let (stream, _) = accepted.context("accept")?;
                match cli.h2_server {
                    H2Client::Hyper => tokio::spawn(serve_h2(stream, upstream.clone())),
                    H2Client::H2 => tokio::spawn(serve_h2_inline(stream, upstream.clone())),
                };
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// HTTP/1.1: one upstream connection per downstream connection, as its requests come one at a
/// time. The sender is taken out while a request is being sent and put back once it is.
async fn serve_h1(stream: TcpStream, to: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let slot: Arc<Mutex<Option<client1::SendRequest<Incoming>>>> = Arc::default();
    let service = service_fn(move |req: Request<Incoming>| {
        let slot = slot.clone();
        async move {
            let taken = slot.lock().ok().and_then(|mut s| s.take());
            let mut sender = match taken {
                Some(s) => s,
                None => match connect_h1(to).await {
                    Ok(s) => s,
                    Err(_) => return Ok::<_, Infallible>(bad_gateway()),
                },
            };
            if sender.ready().await.is_err() {
                return Ok(bad_gateway());
            }
            let response = sender.send_request(req);
            if let Ok(mut s) = slot.lock() {
                *s = Some(sender);
            }
            Ok(match response.await {
                Ok(rsp) => rsp.map(Either::Left),
                Err(_) => bad_gateway(),
            })
        }
    });
    let _ = server1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

async fn connect_h1(to: SocketAddr) -> Result<client1::SendRequest<Incoming>> {
    let stream = TcpStream::connect(to).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = client1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// An upstream HTTP/1 connection whose future is polled by whoever is using it.
struct InlineH1 {
    sender: client1::SendRequest<Incoming>,
    conn: client1::Connection<TokioIo<TcpStream>, Incoming>,
}

type InlineSlot = Arc<Mutex<Option<InlineH1>>>;

/// HTTP/1.1 with `--h1-client inline`: as `serve_h1`, but nothing is spawned per upstream
/// connection; its future is polled while a response is awaited and while its body streams.
async fn serve_h1_inline(stream: TcpStream, to: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let slot: InlineSlot = Arc::default();
    let service = service_fn(move |req: Request<Incoming>| {
        let slot = slot.clone();
        async move {
            let taken = slot.lock().ok().and_then(|mut s| s.take());
            let mut up = match taken {
                Some(up) => up,
                None => match connect_h1_inline(to).await {
                    Ok(up) => up,
                    Err(_) => return Ok::<_, Infallible>(bad_gateway_inline()),
                },
            };
            let ready = std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = up.sender.poll_ready(cx) {
                    return Poll::Ready(r.is_ok());
                }
                match Pin::new(&mut up.conn).poll(cx) {
                    Poll::Ready(_) => Poll::Ready(false),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await;
            if !ready {
                return Ok(bad_gateway_inline());
            }
            let mut response = std::pin::pin!(up.sender.send_request(req));
            let rsp = std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = response.as_mut().poll(cx) {
                    return Poll::Ready(r.ok());
                }
                match Pin::new(&mut up.conn).poll(cx) {
                    Poll::Ready(_) => Poll::Ready(None),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await;
            let Some(rsp) = rsp else {
                return Ok(bad_gateway_inline());
            };
            Ok(rsp.map(|body| {
                Either::Left(InlineBody {
                    body,
                    up: Some(up),
                    slot,
                })
            }))
        }
    });
    let _ = server1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

async fn connect_h1_inline(to: SocketAddr) -> Result<InlineH1> {
    let stream = TcpStream::connect(to).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = client1::handshake(TokioIo::new(stream)).await?;
    Ok(InlineH1 { sender, conn })
}

fn bad_gateway_inline() -> Response<Either<InlineBody, Empty<Bytes>>> {
    let mut rsp = Response::new(Either::Right(Empty::new()));
    *rsp.status_mut() = StatusCode::BAD_GATEWAY;
    rsp
}

/// A response body whose connection is polled as it is read, and goes back to the slot for the
/// next request once the body has ended.
struct InlineBody {
    body: Incoming,
    up: Option<InlineH1>,
    slot: InlineSlot,
}

impl Body for InlineBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(up) = &mut this.up {
            // Reads what the body is waiting for; a closed connection ends it below.
            if Pin::new(&mut up.conn).poll(cx).is_ready() {
                this.up = None;
            }
        }
        let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
        if this.body.is_end_stream() || frame.is_none() {
            if let (Some(up), Ok(mut slot)) = (this.up.take(), this.slot.lock()) {
                *slot = Some(up);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

type FloorBody = Either<Incoming, Either<H2Body, Empty<Bytes>>>;
/// A request body as either h2 server hands it over.
type RequestBody = Either<Incoming, H2Body>;

fn bad_gateway() -> Response<FloorBody> {
    let mut rsp = Response::new(Either::Right(Either::Right(Empty::new())));
    *rsp.status_mut() = StatusCode::BAD_GATEWAY;
    rsp
}

/// h2c: every downstream connection's requests share one upstream h2 connection.
async fn serve_h2(stream: TcpStream, upstream: Arc<H2Upstream>) {
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |req: Request<Incoming>| {
        let upstream = upstream.clone();
        async move {
            let rsp = upstream.send(req.map(Either::Left)).await;
            Ok::<_, Infallible>(rsp.unwrap_or_else(|_| bad_gateway()))
        }
    });
    let _ = server2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// h2c with the `h2` crate: the connection and its streams polled in one task, no spawn per
/// stream.
async fn serve_h2_inline(stream: TcpStream, upstream: Arc<H2Upstream>) {
    use futures_util::stream::{FuturesUnordered, StreamExt};
    let _ = stream.set_nodelay(true);
    let Ok(mut conn) = h2::server::handshake(stream).await else {
        return;
    };
    let mut streams = FuturesUnordered::new();
    loop {
        tokio::select! {
            accepted = conn.accept() => match accepted {
                Some(Ok((req, respond))) => streams.push(answer(req, respond, upstream.clone())),
                _ => break,
            },
            Some(()) = streams.next(), if !streams.is_empty() => {}
        }
    }
    while streams.next().await.is_some() {}
}

/// One h2 stream: its request upstream, the response and its body back.
async fn answer(
    req: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    upstream: Arc<H2Upstream>,
) {
    let req = req.map(|recv| {
        Either::Right(H2Body {
            recv,
            data_done: false,
        })
    });
    let rsp = upstream.send(req).await.unwrap_or_else(|_| bad_gateway());
    let (head, body) = rsp.into_parts();
    let end = body.is_end_stream();
    let Ok(send) = respond.send_response(Response::from_parts(head, ()), end) else {
        return;
    };
    if !end {
        pipe(body, send).await;
    }
}

enum H2Upstream {
    Hyper(client2::SendRequest<RequestBody>),
    H2(h2::client::SendRequest<Bytes>),
}

impl H2Upstream {
    async fn connect(to: SocketAddr, client: H2Client) -> Result<Self> {
        let stream = TcpStream::connect(to)
            .await
            .context("upstream h2 connection")?;
        stream.set_nodelay(true)?;
        Ok(match client {
            H2Client::Hyper => {
                let (sender, conn) = client2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
                    .context("h2 handshake")?;
                tokio::spawn(conn);
                Self::Hyper(sender)
            }
            H2Client::H2 => {
                let (sender, conn) = h2::client::handshake(stream)
                    .await
                    .context("h2 handshake")?;
                tokio::spawn(conn);
                Self::H2(sender)
            }
        })
    }

    async fn send(&self, req: Request<RequestBody>) -> Result<Response<FloorBody>> {
        match self {
            Self::Hyper(sender) => {
                let mut sender = sender.clone();
                sender.ready().await?;
                Ok(sender.send_request(req).await?.map(Either::Left))
            }
            Self::H2(sender) => {
                let mut sender = sender.clone().ready().await?;
                let (head, body) = req.into_parts();
                let end = body.is_end_stream();
                let (response, send) = sender.send_request(Request::from_parts(head, ()), end)?;
                if !end {
                    tokio::spawn(pipe(body, send));
                }
                let rsp = response.await?;
                Ok(rsp.map(|recv| {
                    Either::Right(Either::Left(H2Body {
                        recv,
                        data_done: false,
                    }))
                }))
            }
        }
    }
}

/// A request body onto its h2 stream, as the peer's window allows.
async fn pipe<B: Body<Data = Bytes> + Unpin>(mut body: B, mut send: h2::SendStream<Bytes>) {
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            send.send_reset(h2::Reason::CANCEL);
            return;
        };
        match frame.into_data() {
            Ok(mut data) => {
                while !data.is_empty() {
                    send.reserve_capacity(data.len());
                    let granted = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                        Some(Ok(n)) => n,
                        _ => return,
                    };
                    let chunk = data.split_to(granted.min(data.len()));
                    if send.send_data(chunk, false).is_err() {
                        return;
                    }
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = send.send_trailers(trailers);
                    return;
                }
            }
        }
    }
    let _ = send.send_data(Bytes::new(), true);
}

/// A response body from its h2 stream; what is handed on is released to the peer's window.
struct H2Body {
    recv: h2::RecvStream,
    data_done: bool,
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
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => self.data_done = true,
            }
        }
        let trailers: Option<HeaderMap> = ready!(self.recv.poll_trailers(cx))?;
        Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    /// The options as `pylon-proxy` sets them: the floor is only a floor while it allocates as
    /// the proxy does.
    #[test]
    fn the_floor_sets_the_proxys_jemalloc_options() {
        let proxy_main = include_str!("../../proxy/src/main.rs");
        let start = proxy_main
            .find("malloc_conf: &[u8] = b\"")
            .map(|i| i + "malloc_conf: &[u8] = b\"".len())
            .expect("proxy/src/main.rs sets malloc_conf");
        let len = proxy_main[start..]
            .find("\";")
            .expect("malloc_conf's literal ends");
        // The literal as the compiler reads it: a line continuation drops the break.
        let proxys = proxy_main[start..start + len]
            .replace("\\\n", "")
            .replace("\\0", "\0");
        assert_eq!(proxys.as_bytes(), super::malloc_conf);
    }
}
