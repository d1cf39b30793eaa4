//! Protocol detection: read the client's first bytes for a bounded time and decide between
//! HTTP/1.x, HTTP/2 prior knowledge and opaque TCP. The bytes read are replayed afterwards.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::io::PrefixedIo;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A request line longer than this is not HTTP we want to parse; treat the stream as TCP.
const MAX_REQUEST_LINE: usize = 8 * 1024;
/// How much of the first request's head we read to validate it before handing it to hyper.
const MAX_HEAD: usize = crate::http::server::MAX_REQUEST_HEAD;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    H2,
    /// The head of an HTTP/1 request that could not be parsed: answer 400 and close.
    MalformedHttp1,
    Tcp,
}

/// Detects a connection's protocol (a plain accepted socket, or what mesh TLS decrypted), unless
/// its port is opaque (then it is TCP at once).
/// The returned IO replays what detection read. `None`: the client left before saying anything.
pub async fn accept<I: AsyncRead + Unpin>(
    mut stream: I,
    opaque: bool,
    timeout: Duration,
    peer: std::net::SocketAddr,
) -> Option<(Protocol, PrefixedIo<I>)> {
    let (protocol, prefix) = if opaque {
        (Protocol::Tcp, Bytes::new())
    } else {
        match detect(&mut stream, timeout).await {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(client = %peer, error = %e, "connection closed during detection");
                return None;
            }
        }
    };
    Some((protocol, PrefixedIo::new(prefix, stream)))
}

/// Whether the client opens with a TLS ClientHello (mesh TLS from another proxy, or TLS for
/// the app itself): reads the few bytes that tell and, when they say TLS, the rest of the
/// first record, where the ClientHello's SNI is (at most 2^14 bytes, within the same
/// `timeout`; a record cut short by EOF or the timeout comes back as read). The bytes read
/// come back to be replayed. Silence (a server-speaks-first protocol) is not TLS.
pub async fn detect_tls<I: AsyncRead + Unpin>(
    io: &mut I,
    timeout: Duration,
) -> std::io::Result<(bool, Bytes)> {
    use pylon_identity::{detect_client_hello, Detect};
    let mut buf = BytesMut::with_capacity(512);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match detect_client_hello(&buf) {
            Detect::Tls => break,
            Detect::NotTls => return Ok((false, buf.freeze())),
            Detect::NeedMore => {}
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Err(_elapsed) => return Ok((false, buf.freeze())),
            Ok(Ok(0)) if buf.is_empty() => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(Ok(0)) => return Ok((false, buf.freeze())),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
    // `detect_client_hello` checked the record header: a length of at most 2^14.
    let record_end = 5 + usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    buf.reserve(record_end.saturating_sub(buf.len()));
    while buf.len() < record_end {
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Err(_) | Ok(Ok(0)) => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
    Ok((true, buf.freeze()))
}

/// Reads until the protocol is known or `timeout` passes. No data (a server-speaks-first
/// protocol) or unrecognised data is TCP, never an error; a client that closes without sending
/// anything is `UnexpectedEof`.
pub async fn detect<I: AsyncRead + Unpin>(
    io: &mut I,
    timeout: Duration,
) -> std::io::Result<(Protocol, Bytes)> {
    let mut buf = BytesMut::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut progress = Progress::default();
    loop {
        if progress.worth_classifying(&buf) {
            if let Some(p) = classify(&buf) {
                return Ok((p, buf.freeze()));
            }
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Err(_elapsed) => {
                // A partial request line that never completed is not something hyper can serve.
                return Ok((Protocol::Tcp, buf.freeze()));
            }
            Ok(Ok(0)) if buf.is_empty() => {
                // Closed without a byte (a health check, a pool warming up): nothing to proxy.
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            Ok(Ok(0)) => {
                let p = classify_at_eof(&buf);
                return Ok((p, buf.freeze()));
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// How far detection got, so each read only looks at its new bytes: a head trickled in one byte
/// at a time costs linear, not quadratic, time.
#[derive(Default)]
struct Progress {
    /// Bytes already seen by `worth_classifying`.
    seen: usize,
    /// The request line is complete (and was HTTP/1, or `classify` would have decided).
    line_done: bool,
}

impl Progress {
    /// Whether the bytes that arrived since the last call could change `classify`'s answer.
    fn worth_classifying(&mut self, buf: &[u8]) -> bool {
        // Look back a few bytes so a delimiter split across reads is still found.
        let fresh = &buf[self.seen.saturating_sub(3).min(buf.len())..];
        let first = self.seen == 0;
        self.seen = buf.len();
        let line_was_done = self.line_done;
        self.line_done = line_was_done || memchr::memchr(b'\n', fresh).is_some();
        if first || buf.len() <= H2_PREFACE.len() {
            return true;
        }
        if !line_was_done {
            return self.line_done || buf.len() >= MAX_REQUEST_LINE;
        }
        ends_head(fresh) || buf.len() >= MAX_HEAD
    }
}

/// Classifies the bytes read so far; `None` means "need more bytes".
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Protocol::H2);
    }
    // Binary protocols (TLS, databases) are told apart by their first bytes, before any scan.
    if !plausible_method_prefix(buf) {
        return Some(Protocol::Tcp);
    }
    let Some(line_end) = find_line_end(buf) else {
        return (buf.len() >= MAX_REQUEST_LINE).then_some(Protocol::Tcp);
    };
    let line = &buf[..line_end];
    if !(line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0")) {
        return Some(Protocol::Tcp);
    }
    // It claims to be HTTP/1: validate the head of the first request so a malformed one gets a
    // proxy-made 400 that says why.
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => Some(Protocol::Http1),
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => None,
        // Too large for us to validate; hyper enforces its own limits.
        Ok(httparse::Status::Partial) => Some(Protocol::Http1),
        // More headers than we validate is not malformed; let hyper judge.
        Err(httparse::Error::TooManyHeaders) => Some(Protocol::Http1),
        Err(_) => Some(Protocol::MalformedHttp1),
    }
}

fn classify_at_eof(buf: &[u8]) -> Protocol {
    match classify(buf) {
        Some(p) => p,
        // The client closed mid-head: HTTP that can't complete is still malformed HTTP.
        None if find_line_end(buf).is_some() => Protocol::MalformedHttp1,
        None => Protocol::Tcp,
    }
}

/// Where the first line ends (before its CRLF, or a bare LF: RFC 9112 §2.2 lets a recipient
/// take LF alone as a line terminator, and hyper's parser does, so detection must too: else a
/// bare-LF request would pass as opaque TCP, past per-request policy).
fn find_line_end(buf: &[u8]) -> Option<usize> {
    let lf = memchr::memchr(b'\n', buf)?;
    Some(if lf > 0 && buf[lf - 1] == b'\r' {
        lf - 1
    } else {
        lf
    })
}

/// Whether `buf` contains the blank line that ends a request head (CRLF or bare LF).
fn ends_head(buf: &[u8]) -> bool {
    memchr::memchr_iter(b'\n', buf).any(|i| {
        (i >= 1 && buf[i - 1] == b'\n') || (i >= 2 && buf[i - 1] == b'\r' && buf[i - 2] == b'\n')
    })
}

/// While the request line is incomplete, keep reading only if it could still be HTTP: a token
/// of upper-case letters (the method) and then a space. Binary protocols are decided at once.
fn plausible_method_prefix(buf: &[u8]) -> bool {
    for (i, &b) in buf.iter().enumerate() {
        match b {
            b'A'..=b'Z' | b'-' | b'_' => continue,
            b' ' => return i > 0,
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn detect_bytes(input: &'static [u8], close: bool) -> (Protocol, Bytes) {
        let (mut client, mut server) = tokio::io::duplex(1 << 20);
        client.write_all(input).await.unwrap();
        if close {
            drop(client);
            detect(&mut server, Duration::from_millis(200))
                .await
                .unwrap()
        } else {
            let r = detect(&mut server, Duration::from_millis(200))
                .await
                .unwrap();
            drop(client);
            r
        }
    }

    #[tokio::test]
    async fn tls_detection_reads_the_whole_first_record() {
        // A handshake record of 300 bytes (ClientHello type), sent in three pieces, then more.
        let mut record = vec![22, 3, 1, 1, 44, 1];
        record.resize(5 + 300, 0xab);
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        let pieces = [
            record[..4].to_vec(),
            record[4..100].to_vec(),
            record[100..].to_vec(),
        ];
        let writer = tokio::spawn(async move {
            for piece in pieces {
                client.write_all(&piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            client.write_all(b"next record").await.unwrap();
            client
        });
        let (tls, prefix) = detect_tls(&mut server, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(tls);
        assert_eq!(&prefix[..record.len()], &record[..]);
        let client = writer.await.unwrap();

        // Cut short: what arrived before EOF comes back, still TLS.
        let (mut client2, mut server) = tokio::io::duplex(1 << 16);
        client2.write_all(&record[..50]).await.unwrap();
        drop((client, client2));
        let (tls, prefix) = detect_tls(&mut server, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(tls);
        assert_eq!(&prefix[..], &record[..50]);
    }

    #[tokio::test]
    async fn http1_request() {
        let (p, b) = detect_bytes(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", false).await;
        assert_eq!(p, Protocol::Http1);
        assert_eq!(&b[..], b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    }

    #[tokio::test]
    async fn h2_preface() {
        let (p, _) = detect_bytes(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0", false).await;
        assert_eq!(p, Protocol::H2);
    }

    #[tokio::test]
    async fn binary_is_tcp_without_waiting() {
        let start = std::time::Instant::now();
        let (p, b) = detect_bytes(b"\x16\x03\x01\x02\x00", false).await;
        assert_eq!(p, Protocol::Tcp);
        assert_eq!(b.len(), 5);
        assert!(
            start.elapsed() < Duration::from_millis(150),
            "decided without the timeout"
        );
    }

    #[tokio::test]
    async fn silence_is_tcp_after_timeout() {
        let (p, b) = detect_bytes(b"", false).await;
        assert_eq!(p, Protocol::Tcp);
        assert!(b.is_empty());
    }

    #[tokio::test]
    async fn head_trickled_byte_by_byte_is_detected() {
        let head = b"GET /path HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n";
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        let writer = tokio::spawn(async move {
            for b in head {
                client.write_all(&[*b]).await.unwrap();
                tokio::task::yield_now().await;
            }
            client
        });
        let (p, bytes) = detect(&mut server, Duration::from_secs(5)).await.unwrap();
        assert_eq!(p, Protocol::Http1);
        assert_eq!(&bytes[..], &head[..]);
        drop(writer.await.unwrap());
    }

    #[test]
    fn progress_skips_bytes_that_cannot_decide() {
        let mut progress = Progress::default();
        let mut buf = b"GET /".to_vec();
        assert!(progress.worth_classifying(&buf), "first read");
        buf.extend_from_slice(&[b'a'; 40]);
        assert!(
            !progress.worth_classifying(&buf),
            "request line still incomplete"
        );
        buf.extend_from_slice(b" HTTP/1.1\r");
        assert!(!progress.worth_classifying(&buf));
        buf.extend_from_slice(b"\nHost: a\r\n");
        assert!(progress.worth_classifying(&buf), "request line complete");
        buf.extend_from_slice(b"Accept: x\r\n");
        assert!(!progress.worth_classifying(&buf), "head not complete");
        buf.extend_from_slice(b"\r\n");
        assert!(
            progress.worth_classifying(&buf),
            "end of head (split across reads)"
        );

        // The request line complete in the first read, the end of the head later.
        let mut progress = Progress::default();
        let mut buf = b"GET / HTTP/1.1\r\nHost: a".to_vec();
        assert!(progress.worth_classifying(&buf));
        buf.extend_from_slice(b"\r\nAccept: x");
        assert!(!progress.worth_classifying(&buf));
        buf.extend_from_slice(b"\r\n\r\n");
        assert!(progress.worth_classifying(&buf), "end of head");
    }

    #[tokio::test]
    async fn close_without_data_is_eof() {
        let (client, mut server) = tokio::io::duplex(64);
        drop(client);
        let err = detect(&mut server, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn bare_lf_http_is_http() {
        // RFC 9112 §2.2: a recipient may take LF alone as a line end; hyper does.
        for head in [
            &b"GET / HTTP/1.1\nHost: a\n\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\n\n",
            b"GET / HTTP/1.1\nHost: a\r\n\r\n",
        ] {
            let (p, _) = detect_bytes(head, false).await;
            assert_eq!(p, Protocol::Http1, "{:?}", String::from_utf8_lossy(head));
        }
        let mut progress = Progress::default();
        assert!(progress.worth_classifying(b"GET / HTTP/1.1\nHost: a\n"));
        assert!(ends_head(b"Host: a\n\n"));
        assert!(ends_head(b"Host: a\r\n\r\n"));
        assert!(!ends_head(b"Host: a\r\nB: c\r\n"));
    }

    #[tokio::test]
    async fn text_protocol_is_tcp() {
        let (p, _) = detect_bytes(b"PING\r\n", false).await;
        assert_eq!(p, Protocol::Tcp);
    }

    #[tokio::test]
    async fn malformed_header_is_detected() {
        let (p, _) = detect_bytes(b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n", false).await;
        assert_eq!(p, Protocol::MalformedHttp1);
    }

    #[tokio::test]
    async fn truncated_head_at_eof_is_malformed() {
        let (p, _) = detect_bytes(b"GET / HTTP/1.1\r\nHost: a\r\n", true).await;
        assert_eq!(p, Protocol::MalformedHttp1);
    }
}
