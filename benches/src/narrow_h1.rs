//! `--h1-server narrow` and `--h1-client narrow`: HTTP/1.1 without hyper, to measure what a
//! narrower path for the common case would cost before deciding whether Pylon should have one.
//! Each half combines with hyper's other half, so the two halves' savings show apart, and
//! `--h1-client ureq` puts the `ureq-proto` crate's sans-IO client in the narrow client's place.
//!
//! The common case: keep-alive requests and responses framed by `Content-Length` (or without a
//! body), one at a time per connection. Heads are parsed by `httparse` (as hyper does) into
//! `http::Request` / `http::Response` with a `HeaderMap`, because Pylon's stages (routes,
//! metrics, tap, policy) read those types: a narrow path that skipped them would be a different
//! proxy. Each head is written back from those types, hop-by-hop headers left out, with the
//! body into one buffer and one write. Anything else (chunked bodies, upgrades, `Expect`) is
//! refused here; in Pylon it would go to hyper's path.
//!
//! One upstream connection per downstream connection, as the hyper floors have. Under hyper's
//! server the narrow client collects the request body and reads the response body whole (the
//! bench's bodies are small); so does the narrow server with hyper's client. What this
//! leaves out that hyper does: the `Date` header (a proxy passes the origin's), pipelining,
//! and every framing but `Content-Length`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context as _, Result};
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1 as client1;
use hyper::server::conn::http1 as server1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MAX_HEADERS: usize = 64;
const MAX_HEAD: usize = 64 * 1024;
const READ_CHUNK: usize = 8 * 1024;

/// Where each header's name and value sit in the head, kept while `httparse`'s borrow of the
/// read buffer ends and the head becomes shared `Bytes` the values can point into.
type Spans = [(usize, usize, usize, usize); MAX_HEADERS];

/// What a head says about the message that follows it.
struct Framing {
    body_len: u64,
    close: bool,
}

/// A narrow upstream connection: the socket and what has been read from it past the last
/// message.
pub struct Upstream {
    io: TcpStream,
    buf: BytesMut,
    /// What `ureq_client` writes into.
    out: Vec<u8>,
}

/// Who answers the requests a narrow server reads.
pub enum Client {
    /// The narrow client, on one upstream connection of this downstream connection's own.
    Narrow(Option<Upstream>),
    /// hyper's HTTP/1 client, its connection future spawned as a task (as Pylon's pool does).
    Hyper(Option<client1::SendRequest<Full<Bytes>>>),
}

/// The narrow server: serves one downstream connection until either side closes it or
/// something leaves the narrow path (then the connection is closed; Pylon would hand it to
/// hyper instead).
pub async fn serve(mut down: TcpStream, to: SocketAddr, mut client: Client) {
    let _ = down.set_nodelay(true);
    let mut down_buf = BytesMut::with_capacity(READ_CHUNK);
    let mut out = Vec::with_capacity(READ_CHUNK);
    loop {
        let (req, framing) = match read_head(&mut down, &mut down_buf, parse_request).await {
            Ok(Some(req)) => req,
            Ok(None) => return,
            Err(_) => {
                let _ = down
                    .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
                return;
            }
        };
        let answered = match &mut client {
            Client::Narrow(up) => {
                narrow_exchange(&mut down, &mut down_buf, up, to, &mut out, req, &framing).await
            }
            Client::Hyper(sender) => {
                hyper_exchange(
                    &mut down,
                    &mut down_buf,
                    sender,
                    to,
                    &mut out,
                    req,
                    &framing,
                )
                .await
            }
        };
        match answered {
            Ok(true) => {}
            Ok(false) => return,
            Err(_) => return bad_gateway(&mut down).await,
        }
        if framing.close {
            return;
        }
    }
}

/// One request through the narrow client: `Ok(false)` when the downstream connection can't go
/// on.
async fn narrow_exchange(
    down: &mut TcpStream,
    down_buf: &mut BytesMut,
    up: &mut Option<Upstream>,
    to: SocketAddr,
    out: &mut Vec<u8>,
    req: Request<()>,
    framing: &Framing,
) -> Result<bool> {
    if up.is_none() {
        *up = Some(Upstream::connect(to).await?);
    }
    let Some(Upstream { io, buf, .. }) = up.as_mut() else {
        return Ok(false);
    };
    out.clear();
    encode_request(out, &req);
    if forward_body(down, down_buf, io, out, framing.body_len)
        .await
        .is_err()
    {
        return Ok(false);
    }
    let (rsp, rsp_framing) = read_head(io, buf, parse_response)
        .await?
        .context("closed before a response")?;
    out.clear();
    encode_response(out, &rsp);
    if forward_body(io, buf, down, out, rsp_framing.body_len)
        .await
        .is_err()
    {
        return Ok(false);
    }
    if rsp_framing.close {
        *up = None;
    }
    Ok(true)
}

/// One request through hyper's client: the narrow server's half alone.
async fn hyper_exchange(
    down: &mut TcpStream,
    down_buf: &mut BytesMut,
    sender: &mut Option<client1::SendRequest<Full<Bytes>>>,
    to: SocketAddr,
    out: &mut Vec<u8>,
    mut req: Request<()>,
    framing: &Framing,
) -> Result<bool> {
    let body = read_body(down, down_buf, framing.body_len).await?;
    let mut s = match sender.take() {
        Some(s) => s,
        None => {
            let stream = Upstream::connect(to).await?.io;
            let (s, conn) = client1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            s
        }
    };
    s.ready().await?;
    strip_hop_by_hop(req.headers_mut());
    let rsp = s.send_request(req.map(|()| Full::new(body))).await?;
    *sender = Some(s);
    let (head, body) = rsp.into_parts();
    // Collected, then written with the head in one write, as hyper's server does for a body
    // this small.
    let body = body.collect().await?.to_bytes();
    let mut rsp = Response::from_parts(head, ());
    rsp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    out.clear();
    encode_response(out, &rsp);
    out.extend_from_slice(&body);
    down.write_all(out).await?;
    Ok(true)
}

/// A body of `len` bytes, whole.
async fn read_body(io: &mut TcpStream, buf: &mut BytesMut, len: u64) -> Result<Bytes> {
    let len = usize::try_from(len)?;
    while buf.len() < len {
        buf.reserve(len - buf.len());
        if io.read_buf(buf).await? == 0 {
            bail!("closed inside a body");
        }
    }
    Ok(buf.split_to(len).freeze())
}

/// Hyper's HTTP/1 server with a narrow client (`--h1-client narrow`, or `ureq` for
/// `ureq_client`): the client's half alone.
pub async fn serve_hyper(stream: TcpStream, to: SocketAddr, ureq: bool) {
    let _ = stream.set_nodelay(true);
    let slot: Arc<Mutex<Option<Upstream>>> = Arc::default();
    let service = service_fn(move |req: Request<Incoming>| {
        let slot = slot.clone();
        async move {
            let rsp = if ureq {
                ureq_client(req, slot, to).await
            } else {
                client(req, slot, to).await
            };
            Ok::<_, Infallible>(rsp.unwrap_or_else(|_| {
                let mut rsp = Response::new(Full::default());
                *rsp.status_mut() = StatusCode::BAD_GATEWAY;
                rsp
            }))
        }
    });
    let _ = server1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// The start both clients under hyper's server share: the upstream connection waiting in
/// `slot` (or a new one), and the request with its body collected and its length set
/// (hop-by-hop headers still on it: the narrow encoder leaves them out as it writes). A macro,
/// not an async fn: a helper's future would nest in the client's and add copies (about 420
/// instructions per request, measured) that the comparison should not carry.
macro_rules! checkout {
    ($req:expr, $slot:expr, $to:expr) => {{
        let taken = $slot.lock().ok().and_then(|mut s| s.take());
        let up = match taken {
            Some(up) => up,
            None => Upstream::connect($to).await?,
        };
        let (head, body) = $req.into_parts();
        let body = body.collect().await?.to_bytes();
        let mut req = Request::from_parts(head, ());
        if !body.is_empty() {
            req.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        (up, req, body)
    }};
}

/// A connection whose response has ended, back for the next request.
fn checkin(slot: &Mutex<Option<Upstream>>, up: Upstream) {
    if let Ok(mut s) = slot.lock() {
        *s = Some(up);
    }
}

/// The narrow client under hyper's server. The upstream connection waits in `slot` between
/// requests.
async fn client(
    req: Request<Incoming>,
    slot: Arc<Mutex<Option<Upstream>>>,
    to: SocketAddr,
) -> Result<Response<Full<Bytes>>> {
    let (mut up, req, body) = checkout!(req, slot, to);
    let mut out = Vec::with_capacity(512);
    encode_request(&mut out, &req);
    out.extend_from_slice(&body);
    up.io.write_all(&out).await?;
    let (rsp, framing) = read_head(&mut up.io, &mut up.buf, parse_response)
        .await?
        .context("closed before a response")?;
    let body = read_body(&mut up.io, &mut up.buf, framing.body_len).await?;
    if !framing.close {
        checkin(&slot, up);
    }
    Ok(rsp.map(|()| Full::new(body)))
}

/// `--h1-client ureq`: as `client`, with `ureq-proto`'s sans-IO HTTP/1.1 client writing the
/// request and reading the response: what a well-kept crate would cost in place of a narrow
/// client of Pylon's own. It copies the body from the read buffer into its output, and takes
/// buffers to write into rather than growing them.
async fn ureq_client(
    req: Request<Incoming>,
    slot: Arc<Mutex<Option<Upstream>>>,
    to: SocketAddr,
) -> Result<Response<Full<Bytes>>> {
    use ureq_proto::client::{Call, RecvBodyResult, RecvResponseResult, SendRequestResult};
    let (mut up, mut req, body) = checkout!(req, slot, to);
    strip_hop_by_hop(req.headers_mut());
    let mut call = Call::new(req)?;
    call.allow_non_standard_methods(true);
    call.force_send_body();
    let mut call = call.proceed();
    up.out.resize(READ_CHUNK.max(body.len() + 1024), 0);
    let mut used = call.write(&mut up.out)?;
    let mut call = match call.proceed()?.context("request not written")? {
        SendRequestResult::RecvResponse(call) => call,
        SendRequestResult::SendBody(mut send) => {
            let (_, n) = send.write(&body, &mut up.out[used..])?;
            used += n;
            send.proceed().context("body not written")?
        }
        SendRequestResult::Await100(_) => bail!("100-continue: not measured"),
    };
    up.io.write_all(&up.out[..used]).await?;
    let rsp = loop {
        let (consumed, rsp) = call.try_response(&up.buf, false)?;
        let _ = up.buf.split_to(consumed);
        if let Some(rsp) = rsp {
            break rsp;
        }
        up.buf.reserve(READ_CHUNK);
        if up.io.read_buf(&mut up.buf).await? == 0 {
            bail!("closed before a response");
        }
    };
    let mut data = BytesMut::new();
    let close = match call.proceed().context("no response")? {
        RecvResponseResult::RecvBody(mut recv) => {
            loop {
                if !up.buf.is_empty() {
                    data.reserve(up.buf.len());
                    let at = data.len();
                    data.resize(at + up.buf.len(), 0);
                    let (consumed, produced) = recv.read(&up.buf, &mut data[at..])?;
                    data.truncate(at + produced);
                    let _ = up.buf.split_to(consumed);
                }
                if recv.can_proceed() {
                    break;
                }
                up.buf.reserve(READ_CHUNK);
                if up.io.read_buf(&mut up.buf).await? == 0 {
                    bail!("closed inside a body");
                }
            }
            match recv.proceed().context("body not read")? {
                RecvBodyResult::Cleanup(done) => done.must_close_connection(),
                RecvBodyResult::Redirect(_) => false,
            }
        }
        RecvResponseResult::Cleanup(done) => done.must_close_connection(),
        RecvResponseResult::Redirect(_) => false,
    };
    if !close {
        checkin(&slot, up);
    }
    Ok(rsp.map(|()| Full::new(data.freeze())))
}

impl Upstream {
    async fn connect(to: SocketAddr) -> Result<Self> {
        let io = TcpStream::connect(to).await?;
        io.set_nodelay(true)?;
        Ok(Self {
            io,
            buf: BytesMut::with_capacity(READ_CHUNK),
            out: Vec::new(),
        })
    }
}

async fn bad_gateway(down: &mut TcpStream) {
    let _ = down
        .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        .await;
}

/// Reads until `parse` finds a whole head; `None` when the peer closed between messages.
async fn read_head<T>(
    io: &mut TcpStream,
    buf: &mut BytesMut,
    parse: fn(&mut BytesMut) -> Result<Option<T>>,
) -> Result<Option<T>> {
    loop {
        if !buf.is_empty() {
            if let Some(head) = parse(buf)? {
                return Ok(Some(head));
            }
            if buf.len() >= MAX_HEAD {
                bail!("head larger than {MAX_HEAD} bytes");
            }
        }
        buf.reserve(READ_CHUNK);
        if io.read_buf(buf).await? == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            bail!("closed inside a head");
        }
    }
}

/// Where each header's name and value sit in `buf`, as offsets: they stay valid in the head
/// once it leaves `buf` as shared bytes. Returns how many headers there are.
fn offsets(buf: &[u8], headers: &[httparse::Header<'_>], spans: &mut Spans) -> usize {
    let base = buf.as_ptr() as usize;
    for (span, h) in spans.iter_mut().zip(headers) {
        *span = (
            h.name.as_ptr() as usize - base,
            h.name.len(),
            h.value.as_ptr() as usize - base,
            h.value.len(),
        );
    }
    headers.len()
}

fn header_map(
    head: &Bytes,
    spans: &[(usize, usize, usize, usize)],
) -> Result<(HeaderMap, Framing)> {
    let mut map = HeaderMap::with_capacity(spans.len());
    let mut framing = Framing {
        body_len: 0,
        close: false,
    };
    for &(name_at, name_len, value_at, value_len) in spans {
        let name = HeaderName::from_bytes(&head[name_at..name_at + name_len])?;
        let value = HeaderValue::from_maybe_shared(head.slice(value_at..value_at + value_len))?;
        if name == header::CONTENT_LENGTH {
            framing.body_len = value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| anyhow!("bad content-length"))?;
        } else if name == header::TRANSFER_ENCODING
            || name == header::UPGRADE
            || name == header::EXPECT
        {
            bail!("{name}: not on the narrow path");
        } else if name == header::CONNECTION {
            framing.close |= value.as_bytes().eq_ignore_ascii_case(b"close");
        }
        map.append(name, value);
    }
    Ok((map, framing))
}

fn parse_request(buf: &mut BytesMut) -> Result<Option<(Request<()>, Framing)>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut spans: Spans = [(0, 0, 0, 0); MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let len = match parsed.parse(buf)? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return Ok(None),
    };
    if parsed.version != Some(1) {
        bail!("not HTTP/1.1");
    }
    let method = Method::from_bytes(parsed.method.unwrap_or_default().as_bytes())?;
    let path = parsed.path.unwrap_or_default();
    let path_at = path.as_ptr() as usize - buf.as_ptr() as usize;
    let path_len = path.len();
    let count = offsets(buf, parsed.headers, &mut spans);
    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(path_at..path_at + path_len))?;
    let (headers, framing) = header_map(&head, &spans[..count])?;
    let mut req = Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    Ok(Some((req, framing)))
}

fn parse_response(buf: &mut BytesMut) -> Result<Option<(Response<()>, Framing)>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut spans: Spans = [(0, 0, 0, 0); MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut headers);
    let len = match parsed.parse(buf)? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return Ok(None),
    };
    let status = StatusCode::from_u16(parsed.code.unwrap_or_default())?;
    if status.is_informational() {
        bail!("1xx: not on the narrow path");
    }
    let version = if parsed.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let count = offsets(buf, parsed.headers, &mut spans);
    let head = buf.split_to(len).freeze();
    let (headers, mut framing) = header_map(&head, &spans[..count])?;
    framing.close |= version == Version::HTTP_10;
    let mut rsp = Response::new(());
    *rsp.status_mut() = status;
    *rsp.headers_mut() = headers;
    Ok(Some((rsp, framing)))
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
        header::TE,
    ]
    .contains(name)
        || name.as_str() == "keep-alive"
}

/// For the clients that write the request themselves (hyper's, ureq-proto's): what the narrow
/// encoder leaves out.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let hop: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n))
        .cloned()
        .collect();
    for name in hop {
        headers.remove(name);
    }
}

fn encode_headers(out: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        if is_hop_by_hop(name) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn encode_request(out: &mut Vec<u8>, req: &Request<()>) {
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    encode_headers(out, req.headers());
}

fn encode_response(out: &mut Vec<u8>, rsp: &Response<()>) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(rsp.status().as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        rsp.status()
            .canonical_reason()
            .unwrap_or("Unknown")
            .as_bytes(),
    );
    out.extend_from_slice(b"\r\n");
    encode_headers(out, rsp.headers());
}

/// Sends the head already in `out` with the body's `len` bytes: what the read buffer holds
/// goes in the same write, the rest as it arrives.
async fn forward_body(
    from: &mut TcpStream,
    from_buf: &mut BytesMut,
    to: &mut TcpStream,
    out: &mut Vec<u8>,
    len: u64,
) -> Result<()> {
    let buffered = from_buf
        .len()
        .min(usize::try_from(len).unwrap_or(usize::MAX));
    out.extend_from_slice(&from_buf.split_to(buffered));
    to.write_all(out).await.context("write")?;
    let mut left = len - buffered as u64;
    while left > 0 {
        from_buf.reserve(READ_CHUNK);
        if from.read_buf(from_buf).await? == 0 {
            bail!("closed inside a body");
        }
        let take = from_buf
            .len()
            .min(usize::try_from(left).unwrap_or(usize::MAX));
        to.write_all(&from_buf.split_to(take)).await?;
        left -= take as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn a_request_head_is_read_whole_and_what_follows_stays() {
        let mut buf = BytesMut::from(&b"GET /small?x=1 HTTP/1.1\r\nhost: app\r\n"[..]);
        assert!(parse_request(&mut buf).unwrap().is_none(), "partial head");
        buf.extend_from_slice(b"content-length: 3\r\nx-kept: yes\r\n\r\nabcGET");
        let (req, framing) = parse_request(&mut buf).unwrap().unwrap();
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri(), "/small?x=1");
        assert_eq!(req.headers()["x-kept"], "yes");
        assert_eq!(framing.body_len, 3);
        assert!(!framing.close);
        assert_eq!(
            &buf[..],
            b"abcGET",
            "the body and the next request stay buffered"
        );
    }

    #[test]
    fn what_the_narrow_path_does_not_take_is_refused() {
        for head in [
            &b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
            b"POST / HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 1\r\n\r\n",
            b"GET / HTTP/1.0\r\n\r\n",
            b"GET / HTTP/1.1\r\ncontent-length: x\r\n\r\n",
        ] {
            let mut buf = BytesMut::from(head);
            assert!(
                parse_request(&mut buf).is_err(),
                "{}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn heads_are_written_back_without_hop_by_hop_headers() {
        let mut buf = BytesMut::from(
            &b"GET /a HTTP/1.1\r\nhost: app\r\nconnection: keep-alive\r\nkeep-alive: 5\r\nte: gzip\r\nx-kept: 1\r\n\r\n"[..],
        );
        let (req, _) = parse_request(&mut buf).unwrap().unwrap();
        let mut out = Vec::new();
        encode_request(&mut out, &req);
        assert_eq!(out, b"GET /a HTTP/1.1\r\nhost: app\r\nx-kept: 1\r\n\r\n");

        let mut buf = BytesMut::from(
            &b"HTTP/1.0 404 Not Found\r\ncontent-length: 0\r\nx-kept: 2\r\n\r\n"[..],
        );
        let (rsp, framing) = parse_response(&mut buf).unwrap().unwrap();
        assert!(framing.close, "an HTTP/1.0 response ends its connection");
        let mut out = Vec::new();
        encode_response(&mut out, &rsp);
        assert_eq!(
            out,
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nx-kept: 2\r\n\r\n"
        );
    }

    /// Answers each request with its path as the body; counts connections and keeps the header
    /// names of every request as it arrived.
    async fn upstream() -> (SocketAddr, Arc<Mutex<(usize, Vec<String>)>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<(usize, Vec<String>)>> = Arc::default();
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut io, _)) = listener.accept().await {
                log.lock().unwrap().0 += 1;
                let log = log.clone();
                tokio::spawn(async move {
                    let mut buf = BytesMut::new();
                    while let Ok(Some((req, _))) = read_head(&mut io, &mut buf, parse_request).await
                    {
                        let names: Vec<&str> = req.headers().keys().map(|n| n.as_str()).collect();
                        log.lock().unwrap().1.push(names.join(","));
                        let body = req.uri().path().to_owned();
                        let rsp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if io.write_all(rsp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, seen)
    }

    /// The hop under test, serving one downstream connection.
    enum Hop {
        Narrow(Client),
        Hyper { ureq: bool },
    }

    async fn two_requests_on_one_connection(hop: Hop) {
        let (to, seen) = upstream().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (down, _) = listener.accept().await.unwrap();
            match hop {
                Hop::Narrow(client) => serve(down, to, client).await,
                Hop::Hyper { ureq } => serve_hyper(down, to, ureq).await,
            }
        });
        let mut conn = TcpStream::connect(proxy).await.unwrap();
        let mut buf = BytesMut::new();
        for path in ["/one", "/two"] {
            let req = format!("GET {path} HTTP/1.1\r\nhost: app\r\nconnection: keep-alive\r\n\r\n");
            conn.write_all(req.as_bytes()).await.unwrap();
            let (rsp, framing) = read_head(&mut conn, &mut buf, parse_response)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(rsp.status(), StatusCode::OK);
            let body = read_body(&mut conn, &mut buf, framing.body_len)
                .await
                .unwrap();
            assert_eq!(&body[..], path.as_bytes());
        }
        let (connections, heads) = seen.lock().unwrap().clone();
        assert_eq!(connections, 1, "one upstream connection for both requests");
        assert_eq!(heads.len(), 2);
        assert!(heads[0].contains("host"), "{}", heads[0]);
        assert!(!heads[0].contains("connection"), "{}", heads[0]);
    }

    #[tokio::test]
    async fn the_narrow_path_forwards_keep_alive_requests() {
        two_requests_on_one_connection(Hop::Narrow(Client::Narrow(None))).await;
    }

    #[tokio::test]
    async fn the_narrow_server_forwards_through_hyper_client() {
        two_requests_on_one_connection(Hop::Narrow(Client::Hyper(None))).await;
    }

    #[tokio::test]
    async fn hyper_server_forwards_through_the_narrow_client() {
        two_requests_on_one_connection(Hop::Hyper { ureq: false }).await;
    }

    #[tokio::test]
    async fn hyper_server_forwards_through_ureq_proto() {
        two_requests_on_one_connection(Hop::Hyper { ureq: true }).await;
    }
}
