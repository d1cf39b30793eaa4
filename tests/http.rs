//! End-to-end HTTP behaviour of the outbound and inbound listeners (non-transparent mode).

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::Frame;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A `web` service backed by `backends`, and a proxy using it.
fn web_proxy(backends: &[&Backend], args: &[&str]) -> (ConfigDir, Proxy) {
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let cfg = ConfigDir::web(&addrs);
    let proxy = Proxy::with_config(&cfg, args);
    (cfg, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keep_alive_reuses_client_and_upstream_connections() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let (_cfg, proxy) = web_proxy(&[&backend], &[]);

        const N: usize = 50;
        let mut client = h1_client(proxy.outbound()).await;
        for i in 0..N {
            let resp = send_h1(&mut client, h1_request("GET", WEB_FQDN, "/", empty()))
                .await
                .unwrap_or_else(|e| {
                    panic!("request {i} on the kept-alive client connection failed: {e}")
                });
            assert_eq!(resp.status, 200, "request {i}: {resp:?}");
            assert_eq!(resp.backend(), Some("web-a"), "request {i}: {resp:?}");
        }
        assert_eq!(backend.requests(), N, "backend request count");
        let upstream = backend.connections();
        assert!(
            upstream < N,
            "proxy opened {upstream} upstream connections for {N} sequential requests \
             on one client connection: upstream connections are not pooled"
        );
        eprintln!("keep-alive: {N} requests used {upstream} upstream connection(s)");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn absolute_form_and_host_header_routing() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let (_cfg, proxy) = web_proxy(&[&backend], &[]);

        // Absolute-form request target, as `curl -x` sends it.
        let mut raw = RawConn::connect(proxy.outbound()).await;
        raw.send(format!(
            "GET http://{WEB_FQDN}/abs HTTP/1.1\r\nHost: {WEB_FQDN}\r\n\r\n"
        ))
        .await;
        let resp = raw.response().await.expect("absolute-form response");
        assert_eq!(resp.status, 200, "absolute-form GET: {resp:?}");
        assert_eq!(resp.text(), "web-a", "absolute-form GET body");
        let seen = backend.state.last().expect("backend saw the request");
        assert!(
            seen.uri.ends_with("/abs"),
            "backend saw request-target {:?}, want path /abs",
            seen.uri
        );

        // Origin-form with a Host header.
        let resp = get(proxy.outbound(), WEB_FQDN, "/host")
            .await
            .expect("Host GET");
        assert_eq!(resp.status, 200, "Host-header GET: {resp:?}");
        assert_eq!(resp.backend(), Some("web-a"));

        // RFC 9112 3.2.2: with absolute-form, the proxy ignores Host and uses the URI's authority.
        let mut raw = RawConn::connect(proxy.outbound()).await;
        raw.send(format!(
            "GET http://{WEB_FQDN}/abs2 HTTP/1.1\r\nHost: other.invalid\r\n\r\n"
        ))
        .await;
        let resp = raw.response().await.expect("absolute-form response");
        assert_eq!(
            resp.status, 200,
            "absolute-form with a conflicting Host header must route by the URI: {resp:?}"
        );
        let seen = backend.state.last().unwrap();
        let host = seen
            .headers
            .get("host")
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        assert!(
            host.starts_with(WEB_FQDN),
            "backend got Host {host:?}; the proxy must rewrite Host to the absolute URI's \
             authority ({WEB_FQDN})"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h2_prior_knowledge_multiplexes_streams() {
    test_body(async {
        let backend = Backend::with_delay("web-a", Duration::from_millis(300)).await;
        let (_cfg, proxy) = web_proxy(&[&backend], &[]);

        const STREAMS: usize = 40;
        let client = h2_client(proxy.outbound()).await;
        let mut tasks = Vec::new();
        for i in 0..STREAMS {
            let mut c = client.clone();
            tasks.push(tokio::spawn(async move {
                let path = format!("/stream/{i}");
                send_h2(&mut c, abs_request("GET", WEB_FQDN, &path, empty())).await
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            let resp = t
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("h2 stream {i} failed: {e}"));
            assert_eq!(resp.status, 200, "h2 stream {i}: {resp:?}");
            assert_eq!(resp.backend(), Some("web-a"));
        }
        assert_eq!(backend.requests(), STREAMS);
        let max = backend.state.max_in_flight.load(Ordering::SeqCst);
        assert!(
            max >= 2,
            "backend saw at most {max} request(s) in flight for {STREAMS} concurrent h2 \
             streams on one client connection: the proxy serialized them"
        );
    })
    .await
}

const RSS_LIMIT_KIB: u64 = 100 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upload_1gib_streams_with_bounded_memory() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let (_cfg, proxy) = web_proxy(&[&backend], &[]);
        const LEN: u64 = 1 << 30;

        let stop = Arc::new(AtomicU64::new(0));
        let sampler = rss_sampler(proxy.pid(), stop.clone());
        let sent = Arc::new(AtomicU64::new(0));
        let mut client = h1_client(proxy.outbound()).await;
        let body = RepeatBody::new(LEN, 64 * 1024).counting(sent.clone());
        let req = h1_request("POST", WEB_FQDN, "/count", body.boxed_body());
        let result = within("1 GiB upload", Duration::from_secs(50), async {
            client.ready().await?;
            let resp = client.send_request(req).await?;
            read_resp(resp).await
        })
        .await;
        stop.store(1, Ordering::SeqCst);
        let max_rss = sampler.await.unwrap();
        let resp = result.unwrap_or_else(|e| {
            panic!(
                "1 GiB upload failed after {} bytes sent, {} received by the backend: {e}",
                sent.load(Ordering::SeqCst),
                backend.state.bytes_received.load(Ordering::SeqCst)
            )
        });
        assert_eq!(resp.status, 200, "{resp:?}");
        assert_eq!(resp.text(), LEN.to_string(), "backend byte count");
        eprintln!("1 GiB upload: proxy max RSS {max_rss} KiB");
        assert!(
            max_rss < RSS_LIMIT_KIB,
            "proxy RSS reached {max_rss} KiB while streaming a 1 GiB upload (limit \
             {RSS_LIMIT_KIB} KiB): the body is buffered instead of streamed"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn download_backpressure_with_stalled_reader() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let (_cfg, proxy) = web_proxy(&[&backend], &[]);
        const LEN: u64 = 256 << 20;

        let stop = Arc::new(AtomicU64::new(0));
        let sampler = rss_sampler(proxy.pid(), stop.clone());
        let mut client = h1_client(proxy.outbound()).await;
        let path = format!("/generate?bytes={LEN}");
        let resp = within("download headers", OP_TIMEOUT, async {
            client.ready().await.unwrap();
            client
                .send_request(h1_request("GET", WEB_FQDN, &path, empty()))
                .await
        })
        .await
        .expect("download response");
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut got: u64 = 0;
        // Read a little, then stall: the backend keeps producing as fast as it can.
        while got < 1 << 20 {
            let f = within("first MiB", OP_TIMEOUT, body.frame())
                .await
                .expect("body ended early")
                .expect("body error");
            got += f.data_ref().map_or(0, |d| d.len() as u64);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss_during_stall = proxy.rss_kib().unwrap_or(0);
        within("rest of the download", Duration::from_secs(40), async {
            while let Some(f) = body.frame().await {
                got += f
                    .expect("body error")
                    .data_ref()
                    .map_or(0, |d| d.len() as u64);
            }
        })
        .await;
        stop.store(1, Ordering::SeqCst);
        let max_rss = sampler.await.unwrap();
        assert_eq!(got, LEN, "downloaded byte count");
        eprintln!("256 MiB download: RSS during stall {rss_during_stall} KiB, max {max_rss} KiB");
        assert!(
            max_rss < RSS_LIMIT_KIB,
            "proxy RSS reached {max_rss} KiB while the client stalled a 256 MiB download \
             (limit {RSS_LIMIT_KIB} KiB): no backpressure towards the backend"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chunked_request_and_response_stream_full_duplex() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let (_cfg, proxy) = web_proxy(&[&backend], &[]);

        // 1. Ping-pong over /echo: each chunk must come back before the next is sent, which only
        //    works if the proxy streams the chunked request and the response as they flow.
        let mut client = h1_client(proxy.outbound()).await;
        let (tx, body) = channel_body();
        let req = h1_request("POST", WEB_FQDN, "/echo", body);
        let resp = within("echo response headers", OP_TIMEOUT, async {
            client.ready().await.unwrap();
            let send = client.send_request(req);
            tx.send(Frame::data(Bytes::from_static(b"ping-0")))
                .await
                .unwrap();
            send.await
        })
        .await
        .expect("echo response");
        assert_eq!(resp.status(), 200);
        let mut rbody = resp.into_body();
        let mut echoed = Vec::new();
        for round in 0..5 {
            if round > 0 {
                tx.send(Frame::data(Bytes::from(format!("ping-{round}"))))
                    .await
                    .unwrap();
            }
            let want = format!("ping-{round}");
            while !String::from_utf8_lossy(&echoed).ends_with(&want) {
                let f = within(
                    &format!("echo of chunk {round} (is the proxy buffering?)"),
                    OP_TIMEOUT,
                    rbody.frame(),
                )
                .await
                .expect("echo body ended early")
                .expect("echo body error");
                if let Some(d) = f.data_ref() {
                    echoed.extend_from_slice(d);
                }
            }
        }
        drop(tx);
        while let Some(f) = within("echo end", OP_TIMEOUT, rbody.frame()).await {
            if let Some(d) = f.expect("echo body").data_ref() {
                echoed.extend_from_slice(d);
            }
        }
        assert_eq!(
            String::from_utf8_lossy(&echoed),
            "ping-0ping-1ping-2ping-3ping-4"
        );

        // 2. A raw chunked request body is decoded and forwarded intact.
        let mut raw = RawConn::connect(proxy.outbound()).await;
        raw.send(format!(
            "POST /count HTTP/1.1\r\nHost: {WEB_FQDN}\r\nTransfer-Encoding: chunked\r\n\r\n\
             6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n"
        ))
        .await;
        let resp = raw.response().await.expect("chunked upload response");
        assert_eq!(resp.status, 200, "{resp:?}");
        assert_eq!(resp.text(), "11", "backend byte count of the chunked body");

        // 3. A chunked response (no Content-Length) arrives intact.
        raw.send(format!("GET /chunked HTTP/1.1\r\nHost: {WEB_FQDN}\r\n\r\n"))
            .await;
        let resp = raw.response().await.expect("chunked response");
        assert_eq!(resp.status, 200, "{resp:?}");
        assert_eq!(resp.text(), "chunk-0;chunk-1;chunk-2;chunk-3;chunk-4;");
        assert!(
            resp.chunked,
            "a streamed response without Content-Length should be chunked on HTTP/1.1, got \
             headers {:?}",
            resp.headers
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trailers_over_h2() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let (_cfg, proxy) = web_proxy(&[&backend], &[]);

        let mut client = h2_client(proxy.outbound()).await;
        let (tx, body) = channel_body();
        let mut req = abs_request("POST", WEB_FQDN, "/trailers", body);
        req.headers_mut()
            .insert("te", http::HeaderValue::from_static("trailers"));
        tokio::spawn(async move {
            let _ = tx.send(Frame::data(Bytes::from_static(b"abc"))).await;
            let mut t = HeaderMap::new();
            t.insert("x-client-trailer", http::HeaderValue::from_static("h2"));
            let _ = tx.send(Frame::trailers(t)).await;
        });
        let resp = send_h2(&mut client, req)
            .await
            .expect("h2 trailers request");
        assert_eq!(resp.status, 200, "{resp:?}");
        assert_eq!(&resp.body[..], b"trailers-ok");
        let trailers = resp.trailers.clone().unwrap_or_default();
        assert_eq!(
            trailers.get("x-backend-trailer").map(|v| v.as_bytes()),
            Some(&b"yes"[..]),
            "response trailers lost through the proxy: got {:?}",
            resp.trailers
        );
        let seen = backend.state.trailers.lock().unwrap().clone();
        assert!(
            seen.iter()
                .any(|t| t.get("x-client-trailer").map(|v| v.as_bytes()) == Some(b"h2")),
            "request trailers lost through the proxy: backend saw {seen:?}"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trailers_over_h1_chunked() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let (_cfg, proxy) = web_proxy(&[&backend], &[]);

        let mut raw = RawConn::connect(proxy.outbound()).await;
        raw.send(format!(
            "POST /trailers HTTP/1.1\r\nHost: {WEB_FQDN}\r\nTE: trailers\r\n\
             Transfer-Encoding: chunked\r\nTrailer: x-client-trailer\r\n\r\n\
             3\r\nabc\r\n0\r\nx-client-trailer: h1\r\n\r\n"
        ))
        .await;
        let resp = raw.response().await.expect("h1 trailers response");
        assert_eq!(resp.status, 200, "{resp:?}");
        assert_eq!(resp.text(), "trailers-ok");
        assert!(
            resp.chunked,
            "response with trailers must be chunked: {resp:?}"
        );
        assert_eq!(
            resp.trailer("x-backend-trailer"),
            Some("yes"),
            "response trailers lost through the proxy (client sent TE: trailers): {resp:?}"
        );
        let seen = backend.state.trailers.lock().unwrap().clone();
        assert!(
            seen.iter()
                .any(|t| t.get("x-client-trailer").map(|v| v.as_bytes()) == Some(b"h1")),
            "request trailers lost through the proxy: backend saw {seen:?}"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expect_100_continue() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let (_cfg, proxy) = web_proxy(&[&backend], &[]);

        let mut raw = RawConn::connect(proxy.outbound()).await;
        raw.send(format!(
            "POST /count HTTP/1.1\r\nHost: {WEB_FQDN}\r\nContent-Length: 11\r\n\
             Expect: 100-continue\r\n\r\n"
        ))
        .await;
        // The client waits for the interim response before sending the body.
        let interim = raw.head().await.expect("interim response");
        assert_eq!(
            interim.status, 100,
            "expected `100 Continue` before sending the body, got {interim:?}"
        );
        raw.send("hello world").await;
        let resp = raw.response().await.expect("final response");
        assert_eq!(resp.status, 200, "{resp:?}");
        assert_eq!(resp.text(), "11", "backend byte count");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hop_by_hop_headers_are_removed() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let (_cfg, proxy) = web_proxy(&[&backend], &[]);

        let mut raw = RawConn::connect(proxy.outbound()).await;
        raw.send(format!(
            "GET /hop HTTP/1.1\r\nHost: {WEB_FQDN}\r\n\
             Connection: keep-alive, X-Custom-Hop\r\nKeep-Alive: timeout=5\r\n\
             Proxy-Connection: keep-alive\r\nTE: gzip\r\nX-Custom-Hop: secret\r\n\
             X-End-To-End: kept\r\n\r\n"
        ))
        .await;
        let resp = raw.response().await.expect("response");
        assert_eq!(resp.status, 200, "{resp:?}");
        let seen = backend.state.last().expect("backend saw the request");
        for h in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "x-custom-hop",
        ] {
            assert!(
                seen.headers.get(h).is_none(),
                "hop-by-hop header {h:?} reached the backend: {:?}",
                seen.headers
            );
        }
        if let Some(te) = seen.headers.get("te") {
            assert_eq!(
                te.as_bytes(),
                b"trailers",
                "TE other than `trailers` reached the backend: {:?}",
                seen.headers
            );
        }
        assert_eq!(
            seen.headers.get("x-end-to-end").map(|v| v.as_bytes()),
            Some(&b"kept"[..]),
            "end-to-end header lost: {:?}",
            seen.headers
        );
    })
    .await
}

/// A WebSocket to `ws.default.svc.cluster.local` through the outbound proxy at `proxy`.
async fn websocket_via(
    proxy: std::net::SocketAddr,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (ws, resp) = within(
        "websocket handshake",
        OP_TIMEOUT,
        tokio_tungstenite::client_async("ws://ws.default.svc.cluster.local/chat", tcp),
    )
    .await
    .expect("websocket handshake through the proxy");
    assert_eq!(resp.status(), 101);
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websocket_upgrade_is_tunnelled() {
    use tokio_tungstenite::tungstenite::Message;
    test_body(async {
        let ws_server = WsServer::echo().await;
        let cfg = ConfigDir::new();
        cfg.write_service("ws", &[HTTP_PORT]);
        cfg.set_endpoints("ws", "http", &[ws_server.addr]);
        let proxy = Proxy::with_config(&cfg, &[]);

        let mut ws = websocket_via(proxy.outbound()).await;
        for i in 0..5 {
            let text = format!("hello {i}");
            ws.send(Message::text(text.clone())).await.unwrap();
            let got = within("ws echo", OP_TIMEOUT, ws.next())
                .await
                .expect("ws closed")
                .expect("ws error");
            assert_eq!(got, Message::text(text));
        }
        let blob: Vec<u8> = (0..100_000u32).map(|i| (i % 256) as u8).collect();
        ws.send(Message::binary(blob.clone())).await.unwrap();
        let got = within("ws binary echo", OP_TIMEOUT, ws.next())
            .await
            .expect("ws closed")
            .expect("ws error");
        assert_eq!(got.into_data().as_ref(), &blob[..], "binary echo");
        ws.close(None).await.ok();
        assert_eq!(ws_server.connections.load(Ordering::SeqCst), 1);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connect_is_tunnelled() {
    test_body(async {
        let echo = TcpServer::echo().await;
        let proxy = Proxy::start(&[]);

        let mut raw = RawConn::connect(proxy.outbound()).await;
        raw.send(format!(
            "CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n",
            echo.addr
        ))
        .await;
        let head = raw.head().await.expect("CONNECT response");
        assert_eq!(head.status, 200, "CONNECT response: {head:?}");
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 256) as u8).collect();
        let writer = {
            let payload = payload.clone();
            let mut w = raw.writer;
            tokio::spawn(async move {
                w.write_all(&payload).await.unwrap();
                w
            })
        };
        let mut got = vec![0u8; payload.len()];
        within("tunnel echo", OP_TIMEOUT, raw.reader.read_exact(&mut got))
            .await
            .expect("read echoed bytes through the CONNECT tunnel");
        assert!(got == payload, "bytes through the CONNECT tunnel differ");
        let _w = writer.await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_request_gets_400_and_close_others_unaffected() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let (_cfg, proxy) = web_proxy(&[&backend], &[]);

        let mut good = h1_client(proxy.outbound()).await;
        let r = send_h1(&mut good, h1_request("GET", WEB_FQDN, "/", empty()))
            .await
            .expect("well-formed request before");
        assert_eq!(r.status, 200);

        // A header line without a colon.
        let mut bad = RawConn::connect(proxy.outbound()).await;
        bad.send("GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
            .await;
        let resp = bad
            .response()
            .await
            .expect("response to a malformed header");
        assert_eq!(resp.status, 400, "malformed header line: {resp:?}");
        assert!(
            bad.closed_within(Duration::from_secs(5)).await,
            "connection not closed after a 400 for a malformed request"
        );
        // An invalid request line after the connection was detected as HTTP.
        let mut bad2 = RawConn::connect(proxy.outbound()).await;
        bad2.send(format!("GET / HTTP/1.1\r\nHost: {WEB_FQDN}\r\n\r\n"))
            .await;
        let first = bad2.response().await.expect("first (valid) response");
        assert_eq!(first.status, 200, "{first:?}");
        bad2.send("BAD\x01REQUEST LINE\r\n\r\n").await;
        let resp2 = bad2
            .response()
            .await
            .expect("response to a bad request line");
        assert_eq!(resp2.status, 400, "invalid request line: {resp2:?}");
        assert!(
            bad2.closed_within(Duration::from_secs(5)).await,
            "connection not closed after a 400 for an invalid request line"
        );

        // The concurrent well-formed client keeps working, and new ones too.
        let r = send_h1(&mut good, h1_request("GET", WEB_FQDN, "/", empty()))
            .await
            .expect("well-formed request after");
        assert_eq!(r.status, 200);
        let r = get(proxy.outbound(), WEB_FQDN, "/")
            .await
            .expect("fresh client");
        assert_eq!(r.status, 200);

        // The first request on a connection is validated during detection, so its 400 is the
        // proxy's own and says why. A later malformed request on a kept-alive connection is
        // rejected by hyper's parser, whose built-in 400 can't carry extra headers: status and
        // close are what we can promise there.
        assert_eq!(
            resp.header("pylon-proxy-error"),
            Some("malformed request"),
            "the proxy's 400 lacks the `pylon-proxy-error` header: {} {:?}",
            resp.status_line,
            resp.headers
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_endpoint_is_502_with_proxy_error() {
    test_body(async {
        let cfg = ConfigDir::web(&[closed_port()]);
        let proxy = Proxy::with_config(&cfg, &[]);
        let resp = get(proxy.outbound(), WEB_FQDN, "/")
            .await
            .expect("response");
        assert_eq!(resp.status, 502, "refused endpoint: {resp:?}");
        assert!(
            resp.proxy_error().is_some_and(|v| !v.is_empty()),
            "502 lacks `pylon-proxy-error`: {resp:?}"
        );
        let warned = proxy
            .wait_for_log(Duration::from_secs(5), |l| l.contains("\"level\":\"WARN\""))
            .await;
        assert!(
            warned.is_some(),
            "a proxy-generated 502 must be logged at warn; logs:\n{}",
            proxy.log_tail(10)
        );
        let failure = |s: &Sample| {
            s.label("direction") == Some("outbound")
                && s.label("classification") == Some("failure")
        };
        let counted = wait_until(
            || proxy.metric_sum("response_total", failure) == Some(1.0),
            Duration::from_secs(5),
        )
        .await;
        assert!(
            counted,
            "the proxy-generated 502 is not counted as response_total{{classification=failure}}:\n{}",
            series_of(&proxy.metrics(), "response_total")
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_ready_endpoints_is_503_with_proxy_error() {
    test_body(async {
        let cfg = ConfigDir::web(&[]);
        let proxy = Proxy::with_config(&cfg, &[]);
        let resp = get(proxy.outbound(), WEB_FQDN, "/")
            .await
            .expect("response");
        assert_eq!(resp.status, 503, "no endpoints: {resp:?}");
        assert!(
            resp.proxy_error().is_some_and(|v| !v.is_empty()),
            "503 lacks `pylon-proxy-error`: {resp:?}"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_backend_hits_response_timeout_504() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let (_cfg, proxy) = web_proxy(&[&backend], &["--response-timeout", "200ms"]);
        let resp = get_with(proxy.outbound(), WEB_FQDN, "/", &[("x-delay-ms", "5000")])
            .await
            .expect("response");
        assert_eq!(resp.status, 504, "response timeout: {resp:?}");
        assert!(
            resp.proxy_error().is_some_and(|v| !v.is_empty()),
            "504 lacks `pylon-proxy-error`: {resp:?}"
        );
        // A fast request on the same proxy is unaffected by the timeout.
        let resp = get(proxy.outbound(), WEB_FQDN, "/")
            .await
            .expect("response");
        assert_eq!(
            resp.status, 200,
            "fast request under --response-timeout: {resp:?}"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inbound_forwards_and_records_inbound_direction() {
    test_body(async {
        let backend = Backend::start("app").await;
        let fwd = backend.addr.to_string();
        let proxy = Proxy::start(&["--inbound-forward", &fwd]);
        const N: usize = 5;
        for i in 0..N {
            let resp = get(proxy.inbound(), "app.example:8080", "/in")
                .await
                .unwrap_or_else(|e| panic!("inbound request {i}: {e}"));
            assert_eq!(resp.status, 200, "inbound request {i}: {resp:?}");
            assert_eq!(resp.backend(), Some("app"));
        }
        assert_eq!(backend.requests(), N);
        let v = proxy
            .wait_metric(
                "request_total",
                &[("direction", "inbound")],
                N as f64,
                Duration::from_secs(5),
            )
            .await;
        assert_eq!(
            v,
            Some(N as f64),
            "request_total{{direction=\"inbound\"}}; series:\n{}",
            series_of(&proxy.metrics(), "request_total")
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outbound_request_and_response_metrics() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let (_cfg, proxy) = web_proxy(&[&backend], &[]);
        let target = backend.addr.to_string();

        const OK: usize = 10;
        const NOT_FOUND: usize = 3;
        const FAIL: usize = 4;
        let mut client = h1_client(proxy.outbound()).await;
        for (n, status) in [(OK, "200"), (NOT_FOUND, "404"), (FAIL, "500")] {
            for _ in 0..n {
                let mut req = h1_request("GET", WEB_FQDN, "/m", empty());
                req.headers_mut()
                    .insert("x-status", http::HeaderValue::from_static(status));
                let resp = send_h1(&mut client, req).await.expect("request");
                assert_eq!(resp.status.as_str(), status);
                assert!(
                    resp.proxy_error().is_none(),
                    "an application {status} must not carry pylon-proxy-error: {resp:?}"
                );
            }
        }
        let total = (OK + NOT_FOUND + FAIL) as f64;
        let is_web = |s: &Sample| {
            s.label("direction") == Some("outbound")
                && s.label("authority")
                    .is_some_and(|a| a.starts_with(WEB_FQDN))
        };
        let ok = wait_until(
            || proxy.metric_sum("request_total", is_web) == Some(total),
            Duration::from_secs(5),
        )
        .await;
        let text = proxy.metrics();
        assert!(
            ok,
            "request_total{{direction=outbound,authority={WEB_FQDN}[:80]}} != {total}; series:\n{}",
            series_of(&text, "request_total")
        );
        assert_eq!(
            metric_value(
                &text,
                "request_total",
                &[("direction", "outbound"), ("target_addr", &target)]
            ),
            Some(total),
            "request_total by target_addr={target}; series:\n{}",
            series_of(&text, "request_total")
        );
        assert_eq!(
            metric_value(
                &text,
                "request_total",
                &[
                    ("direction", "outbound"),
                    ("dst_service", "web"),
                    ("dst_namespace", "default")
                ]
            ),
            Some(total),
            "request_total by dst_service/dst_namespace; series:\n{}",
            series_of(&text, "request_total")
        );
        let samples = parse_metrics(&text).unwrap();
        let unlabelled: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.name == "request_total" && is_web(s) && s.label("tls").is_none())
            .collect();
        assert!(
            unlabelled.is_empty(),
            "request_total series without a `tls` label: {unlabelled:?}"
        );
        let rt = series_of(&text, "response_total");
        assert_eq!(
            metric_value(
                &text,
                "response_total",
                &[("direction", "outbound"), ("classification", "failure")]
            ),
            Some(FAIL as f64),
            "response_total classification=failure (5xx); series:\n{rt}"
        );
        assert_eq!(
            metric_value(
                &text,
                "response_total",
                &[
                    ("direction", "outbound"),
                    ("classification", "failure"),
                    ("status_code", "500")
                ]
            ),
            Some(FAIL as f64),
            "response_total failure status_code=500; series:\n{rt}"
        );
        assert_eq!(
            metric_value(
                &text,
                "response_total",
                &[("direction", "outbound"), ("classification", "success")]
            ),
            Some((OK + NOT_FOUND) as f64),
            "response_total classification=success (2xx and 4xx); series:\n{rt}"
        );
        assert_eq!(
            metric_value(
                &text,
                "response_latency_ms_count",
                &[("direction", "outbound")]
            ),
            Some(total),
            "response_latency_ms histogram count; series:\n{}",
            series_of(&text, "response_latency_ms_count")
        );
    })
    .await
}

/// A loopback address whose accept queue is full, so further SYNs are dropped and connects hang.
/// Returns the listening socket and the queued connections (keep them alive).
fn blackholed_addr() -> (
    socket2::Socket,
    Vec<std::net::TcpStream>,
    std::net::SocketAddr,
) {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    sock.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    sock.listen(0).unwrap();
    let addr = sock.local_addr().unwrap().as_socket().unwrap();
    let mut queued = Vec::new();
    for _ in 0..8 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => queued.push(s),
            Err(_) => break,
        }
    }
    let probe = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500));
    assert!(
        probe.is_err(),
        "test setup: could not make a loopback port whose connects hang"
    );
    (sock, queued, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connect_timeout_is_504_with_proxy_error() {
    test_body(async {
        let (_sock, _queued, addr) = blackholed_addr();
        let cfg = ConfigDir::web(&[addr]);
        let proxy = Proxy::with_config(&cfg, &["--connect-timeout", "300ms"]);
        let resp = get(proxy.outbound(), WEB_FQDN, "/")
            .await
            .expect("response");
        assert_eq!(
            resp.status, 504,
            "connect to a hanging endpoint with --connect-timeout 300ms: {resp:?}"
        );
        assert!(
            resp.proxy_error().is_some_and(|v| !v.is_empty()),
            "504 lacks `pylon-proxy-error`: {resp:?}"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn response_hop_by_hop_headers_are_removed() {
    test_body(async {
        let handler: Handler = Arc::new(|_req, _st| {
            Box::pin(async move {
                http::Response::builder()
                    .header("connection", "x-resp-hop")
                    .header("keep-alive", "timeout=5")
                    .header("proxy-connection", "keep-alive")
                    .header("x-resp-hop", "secret")
                    .header("x-resp-e2e", "kept")
                    .body(full("ok"))
                    .unwrap()
            })
        });
        let backend = Backend::start_with("web-a", handler).await;
        let (_cfg, proxy) = web_proxy(&[&backend], &[]);

        let mut raw = RawConn::connect(proxy.outbound()).await;
        raw.send(format!("GET / HTTP/1.1\r\nHost: {WEB_FQDN}\r\n\r\n"))
            .await;
        let resp = raw.response().await.expect("response");
        assert_eq!(resp.status, 200, "{resp:?}");
        for h in ["keep-alive", "proxy-connection", "x-resp-hop"] {
            assert!(
                resp.header(h).is_none(),
                "hop-by-hop response header {h:?} reached the client: {:?}",
                resp.headers
            );
        }
        if let Some(c) = resp.header("connection") {
            assert!(
                !c.to_ascii_lowercase().contains("x-resp-hop"),
                "the backend's Connection header reached the client: {c:?}"
            );
        }
        assert_eq!(
            resp.header("x-resp-e2e"),
            Some("kept"),
            "{:?}",
            resp.headers
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h2_large_bodies_respect_flow_control() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let (_cfg, proxy) = web_proxy(&[&backend], &[]);
        const LEN: u64 = 64 << 20;

        let mut client = h2_client(proxy.outbound()).await;
        // Upload 64 MiB (the backend counts it) on one stream...
        let up = abs_request(
            "POST",
            WEB_FQDN,
            "/count",
            RepeatBody::new(LEN, 16 * 1024).boxed_body(),
        );
        let mut c2 = client.clone();
        let upload = tokio::spawn(async move {
            within("h2 64 MiB upload", Duration::from_secs(40), async {
                c2.ready().await?;
                read_resp(c2.send_request(up).await?).await
            })
            .await
        });
        // ...while downloading 64 MiB on another.
        let path = format!("/generate?bytes={LEN}");
        let down = within("h2 64 MiB download", Duration::from_secs(40), async {
            client.ready().await?;
            let resp = client
                .send_request(abs_request("GET", WEB_FQDN, &path, empty()))
                .await?;
            let mut body = resp.into_body();
            let mut n: u64 = 0;
            while let Some(f) = body.frame().await {
                n += f?.data_ref().map_or(0, |d| d.len() as u64);
            }
            Ok::<_, BoxError>(n)
        })
        .await
        .expect("h2 download");
        assert_eq!(down, LEN, "h2 downloaded bytes");
        let up = upload.await.unwrap().expect("h2 upload");
        assert_eq!(up.status, 200, "{up:?}");
        assert_eq!(
            up.text(),
            LEN.to_string(),
            "h2 uploaded bytes counted by the backend"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn head_request_has_no_body_and_connection_stays_usable() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let (_cfg, proxy) = web_proxy(&[&backend], &[]);

        let mut raw = RawConn::connect(proxy.outbound()).await;
        raw.send(format!(
            "HEAD /generate?bytes=1000 HTTP/1.1\r\nHost: {WEB_FQDN}\r\n\r\n"
        ))
        .await;
        let head = within(
            "HEAD response",
            OP_TIMEOUT,
            read_raw_response(&mut raw.reader, true),
        )
        .await
        .expect("HEAD response");
        assert_eq!(head.status, 200, "{head:?}");
        // The next response on the same connection must parse: no body was sent for HEAD.
        raw.send(format!("GET / HTTP/1.1\r\nHost: {WEB_FQDN}\r\n\r\n"))
            .await;
        let next = raw
            .response()
            .await
            .expect("response after HEAD on the same connection");
        assert_eq!(
            next.status, 200,
            "request after HEAD: {next:?} (a body after HEAD corrupts framing)"
        );
        assert_eq!(next.text(), "web-a");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelined_requests_are_answered_in_order() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let (_cfg, proxy) = web_proxy(&[&backend], &[]);

        let mut raw = RawConn::connect(proxy.outbound()).await;
        // Three requests in one write; the first one is slower than the others.
        raw.send(format!(
            "GET /p1 HTTP/1.1\r\nHost: {WEB_FQDN}\r\nx-delay-ms: 200\r\n\r\n\
             POST /count HTTP/1.1\r\nHost: {WEB_FQDN}\r\nContent-Length: 3\r\n\r\nabc\
             GET /p3 HTTP/1.1\r\nHost: {WEB_FQDN}\r\n\r\n"
        ))
        .await;
        let r1 = raw.response().await.expect("pipelined response 1");
        let r2 = raw.response().await.expect("pipelined response 2");
        let r3 = raw.response().await.expect("pipelined response 3");
        assert_eq!(
            (r1.status, r1.text()),
            (200, "web-a".to_string()),
            "response 1: {r1:?}"
        );
        assert_eq!(
            (r2.status, r2.text()),
            (200, "3".to_string()),
            "response 2: {r2:?}"
        );
        assert_eq!(
            (r3.status, r3.text()),
            (200, "web-a".to_string()),
            "response 3: {r3:?}"
        );
        let paths: Vec<String> = backend
            .state
            .recorded()
            .iter()
            .map(|r| r.uri.clone())
            .collect();
        assert_eq!(paths.len(), 3, "backend saw {paths:?}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ambiguous_framing_is_not_smuggled() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let (_cfg, proxy) = web_proxy(&[&backend], &[]);

        // Content-Length and Transfer-Encoding together (RFC 9112 6.1): reject, or forward with
        // Transfer-Encoding only; either way close the connection afterwards.
        let mut raw = RawConn::connect(proxy.outbound()).await;
        raw.send(format!(
            "POST /count HTTP/1.1\r\nHost: {WEB_FQDN}\r\nContent-Length: 4\r\n\
             Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        ))
        .await;
        let resp = raw.response().await.expect("response");
        match resp.status {
            400 => {}
            200 => {
                assert_eq!(
                    resp.text(),
                    "5",
                    "Transfer-Encoding must win over Content-Length"
                );
                let seen = backend.state.last().unwrap();
                assert!(
                    !(seen.headers.contains_key("content-length")
                        && seen.headers.contains_key("transfer-encoding")),
                    "both framing headers were forwarded: {:?}",
                    seen.headers
                );
            }
            s => panic!("CL + TE: unexpected status {s}: {resp:?}"),
        }
        assert!(
            raw.closed_within(Duration::from_secs(5)).await,
            "connection kept open after a request with both Content-Length and \
             Transfer-Encoding (RFC 9112 6.1 requires closing it)"
        );

        // Two different Content-Length values: invalid framing, 400 and close.
        let mut raw = RawConn::connect(proxy.outbound()).await;
        raw.send(format!(
            "POST /count HTTP/1.1\r\nHost: {WEB_FQDN}\r\nContent-Length: 3\r\n\
             Content-Length: 5\r\n\r\nabcde"
        ))
        .await;
        let resp = raw.response().await.expect("response");
        assert_eq!(
            resp.status, 400,
            "conflicting Content-Length values: {resp:?}"
        );
        assert!(
            raw.closed_within(Duration::from_secs(5)).await,
            "connection kept open after conflicting Content-Length values"
        );
        assert!(
            backend.state.recorded().iter().all(|r| r
                .headers
                .get_all("content-length")
                .iter()
                .count()
                <= 1),
            "a request with conflicting Content-Length values reached the backend"
        );
    })
    .await
}

/// An endpoint that closes each kept-alive connection right after its response (without saying
/// `Connection: close`): the proxy must notice the pooled connection is gone, or resend the
/// unsent request on a fresh one, so no client request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn endpoint_closing_idle_connections_loses_no_request() {
    test_body(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = accepted.clone();
        let server = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                counter.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut head = Vec::new();
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                    // Close without having announced it.
                });
            }
        });
        let cfg = ConfigDir::web(&[addr]);
        let proxy = Proxy::with_config(&cfg, &[]);
        const N: u64 = 50;
        for i in 0..N {
            let r = get(proxy.outbound(), WEB_FQDN, "/")
                .await
                .unwrap_or_else(|e| panic!("request {i}: {e}"));
            assert_eq!(r.status, 200, "request {i}: {r:?}");
            // Give the close a moment to race with the next request's checkout.
            if i % 2 == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        assert_eq!(
            accepted.load(Ordering::Relaxed),
            N,
            "one connection per request"
        );
        server.abort();
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Idle HTTP/1 connections hibernate (hyper's buffers freed) and wake on the next request.
// ---------------------------------------------------------------------------------------------

/// Longer than the proxy's idle period before hibernating (1 s) and its re-check (a connection
/// found busy when its timer fires is looked at again a period later), with margin.
const PAST_HIBERNATION: Duration = Duration::from_millis(3_500);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_keep_alive_connection_wakes_for_its_next_request() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let cfg = ConfigDir::web(&[backend.addr]);
        let proxy = Proxy::builder()
            .arg("--config-dir")
            .arg(cfg.path_str())
            .env("PYLON_LOG", "info,pylon_proxy::http::server=debug")
            .start();
        let mut raw = RawConn::connect(proxy.outbound()).await;
        let get = format!("GET /small HTTP/1.1\r\nHost: {WEB_FQDN}\r\n\r\n");
        for round in 0..3 {
            raw.send(&get).await;
            let rsp = raw.response().await.expect("response");
            assert_eq!(rsp.status, 200, "round {round}");
            assert_eq!(rsp.header("x-backend"), Some("web-a"));
            tokio::time::sleep(PAST_HIBERNATION).await;
        }
        let hibernations = proxy
            .wait_for_log_count(Duration::from_secs(10), 3, |l| {
                l.contains("idle connection hibernated")
            })
            .await;
        assert!(hibernations >= 3, "hibernated {hibernations} times");
        // One client connection throughout: hibernation never closed it.
        let opened = proxy
            .metric_sum("tcp_open_total", |s| {
                s.label("direction") == Some("outbound") && s.label("peer") == Some("src")
            })
            .unwrap_or(0.0);
        assert_eq!(opened, 1.0);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_head_split_by_a_long_pause_is_not_lost() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let cfg = ConfigDir::web(&[backend.addr]);
        let proxy = Proxy::with_config(&cfg, &[]);
        let mut raw = RawConn::connect(proxy.outbound()).await;
        let get = format!("GET /small HTTP/1.1\r\nHost: {WEB_FQDN}\r\n\r\n");
        raw.send(&get).await;
        assert_eq!(raw.response().await.expect("response").status, 200);
        // Half a head, a pause past the idle period, then the rest.
        raw.send("GET /small HTTP/1.1\r\nHo").await;
        tokio::time::sleep(PAST_HIBERNATION).await;
        raw.send(format!("st: {WEB_FQDN}\r\n\r\n")).await;
        let rsp = raw.response().await.expect("the split request is answered");
        assert_eq!(rsp.status, 200);
        assert_eq!(backend.requests(), 2);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelined_requests_after_hibernation_are_all_answered() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let cfg = ConfigDir::web(&[backend.addr]);
        let proxy = Proxy::with_config(&cfg, &[]);
        let mut raw = RawConn::connect(proxy.outbound()).await;
        let get = format!("GET /small HTTP/1.1\r\nHost: {WEB_FQDN}\r\n\r\n");
        raw.send(&get).await;
        assert_eq!(raw.response().await.expect("response").status, 200);
        tokio::time::sleep(PAST_HIBERNATION).await;
        raw.send(get.repeat(3)).await;
        for i in 0..3 {
            let rsp = raw.response().await.expect("pipelined response");
            assert_eq!(rsp.status, 200, "pipelined request {i}");
        }
        assert_eq!(backend.requests(), 4);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_quiet_websocket_is_not_hibernated() {
    use tokio_tungstenite::tungstenite::Message;
    test_body(async {
        let ws_server = WsServer::echo().await;
        let cfg = ConfigDir::new();
        cfg.write_service("ws", &[HTTP_PORT]);
        cfg.set_endpoints("ws", "http", &[ws_server.addr]);
        let proxy = Proxy::with_config(&cfg, &[]);
        let mut ws = websocket_via(proxy.outbound()).await;
        for i in 0..2 {
            tokio::time::sleep(PAST_HIBERNATION).await;
            let text = format!("after a pause {i}");
            ws.send(Message::text(text.clone())).await.unwrap();
            let got = within("ws echo", OP_TIMEOUT, ws.next())
                .await
                .expect("ws closed")
                .expect("ws error");
            assert_eq!(got, Message::text(text));
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// What the logs say of a failing endpoint: what was malformed, which pod, no Rust Debug forms.
// ---------------------------------------------------------------------------------------------

const AUTH_POD: &str = "auth-5d8f7-x2x4z";

/// The proxy's JSON log lines at `level` (as `jq 'select(.level == "ERROR")'` keeps them).
fn logs_at(proxy: &Proxy, level: &str) -> Vec<serde_json::Value> {
    json_logs(&proxy.logs())
        .into_iter()
        .filter(|l| l["level"] == level)
        .collect()
}

fn field<'a>(line: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    log_field(line, key).and_then(|v| v.as_str())
}

/// The incident: a new authentication service answered with invalid HTTP headers and the mesh
/// turned its successes into errors. The client gets 502 `endpoint protocol error`; the proxy's
/// error-level log line says what hyper found malformed and which endpoint sent it, by address
/// and by pod, so `... | jq 'select(.level == "ERROR")'` names the culprit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_malformed_response_is_named_in_an_error_log_line() {
    test_body(async {
        let cases: [(&[u8], &str); 3] = [
            // A header name with a space in it.
            (
                b"HTTP/1.1 200 OK\r\nx-auth token: abc\r\ncontent-length: 2\r\n\r\nok",
                "invalid HTTP header parsed",
            ),
            // A header value with a control character.
            (
                b"HTTP/1.1 200 OK\r\nx-auth: a\x01b\r\ncontent-length: 2\r\n\r\nok",
                "invalid HTTP header parsed",
            ),
            // A status line that isn't one.
            (
                b"HTTP/1.1 2OO OK\r\ncontent-length: 2\r\n\r\nok",
                "invalid HTTP status-code parsed",
            ),
        ];
        for (response, cause) in cases {
            let auth = RawHttpServer::start(response).await;
            let cfg = ConfigDir::web(&[auth.addr]);
            cfg.write(
                "auth-pod.yaml",
                &deployment_pod_yaml(AUTH_POD, "auth", auth.addr.ip()),
            );
            let proxy = Proxy::with_config(&cfg, &[]);

            let rsp = get(proxy.outbound(), WEB_FQDN, "/login").await.unwrap();
            assert_eq!(rsp.status, 502, "{cause}: {}", rsp.text());
            assert_eq!(rsp.proxy_error(), Some("endpoint protocol error"));
            // Linkerd's header carries what was malformed, as Linkerd's messages do.
            let message = format!("endpoint protocol error: {cause}");
            assert_eq!(rsp.header("l5d-proxy-error"), Some(message.as_str()));
            assert_eq!(auth.requests(), 1, "{cause}: sent once, not retried");

            let named = proxy
                .wait_for_log(Duration::from_secs(5), |l| l.contains(cause))
                .await;
            assert!(named.is_some(), "{cause}: {}", proxy.log_tail(20));
            let errors = logs_at(&proxy, "ERROR");
            assert_eq!(errors.len(), 1, "{cause}: {errors:#?}");
            let line = &errors[0];
            let endpoint = auth.addr.to_string();
            assert_eq!(field(line, "endpoint"), Some(endpoint.as_str()), "{line}");
            assert_eq!(field(line, "endpoint_pod"), Some(AUTH_POD), "{line}");
            assert_eq!(
                field(line, "endpoint_workload"),
                Some("deployment/auth"),
                "{line}"
            );
            assert_eq!(field(line, "endpoint_namespace"), Some("default"), "{line}");
            assert_eq!(
                field(line, "destination"),
                Some("web.default.svc.cluster.local:80"),
                "{line}"
            );
            assert_eq!(
                field(line, "error"),
                Some("endpoint protocol error"),
                "{line}"
            );
            assert_eq!(field(line, "cause"), Some(cause), "{line}");
            assert!(
                field(line, "message").is_some_and(|m| m.contains(cause)),
                "{line}"
            );
            // The 502 itself is the usual proxy-error warning, with the same endpoint. Waited
            // for: it is logged after the error line, and reaches the log buffer after it.
            let warned = proxy
                .wait_for_log(Duration::from_secs(5), |l| {
                    serde_json::from_str::<serde_json::Value>(l).is_ok_and(|l| {
                        l["level"] == "WARN"
                            && field(&l, "error") == Some("endpoint protocol error")
                            && field(&l, "endpoint_pod") == Some(AUTH_POD)
                    })
                })
                .await;
            assert!(warned.is_some(), "{}", proxy.log_tail(20));
        }
    })
    .await
}

/// The incident as a mesh has it: the client's proxy calls the auth service's proxy, which
/// reads the malformed response. That proxy logs it at error; the client's proxy, which only
/// gets a 502 from it, logs at error too what its peer said (`l5d-proxy-error`), naming the
/// pod: the client side's `jq 'select(.level == "ERROR")'` names the culprit and the header.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_malformed_response_behind_a_peer_proxy_is_named_on_both_sides() {
    test_body(async {
        let auth = RawHttpServer::start(
            b"HTTP/1.1 200 OK\r\nx-auth user: alice\r\ncontent-length: 2\r\n\r\nok",
        )
        .await;
        let app = auth.addr.to_string();
        let server = Proxy::start(&["--inbound-forward", &app]);
        let cfg = ConfigDir::web(&[server.inbound()]);
        cfg.write(
            "auth-pod.yaml",
            &deployment_pod_yaml(AUTH_POD, "auth", server.inbound().ip()),
        );
        let client = Proxy::with_config(&cfg, &[]);

        let rsp = get(client.outbound(), WEB_FQDN, "/login").await.unwrap();
        assert_eq!(rsp.status, 502, "{}", rsp.text());
        let message = "endpoint protocol error: invalid HTTP header parsed";
        assert_eq!(rsp.header("l5d-proxy-error"), Some(message));

        for (side, proxy) in [("server", &server), ("client", &client)] {
            let logged = proxy
                .wait_for_log(Duration::from_secs(5), |l| {
                    l.contains("\"ERROR\"") && l.contains("invalid HTTP header parsed")
                })
                .await;
            assert!(logged.is_some(), "{side}: {}", proxy.log_tail(20));
        }
        let errors = logs_at(&client, "ERROR");
        assert_eq!(errors.len(), 1, "{errors:#?}");
        let line = &errors[0];
        let endpoint = server.inbound().to_string();
        assert_eq!(field(line, "endpoint"), Some(endpoint.as_str()), "{line}");
        assert_eq!(field(line, "endpoint_pod"), Some(AUTH_POD), "{line}");
        assert_eq!(
            field(line, "destination"),
            Some("web.default.svc.cluster.local:80"),
            "{line}"
        );
        assert_eq!(field(line, "error"), Some(message), "{line}");
    })
    .await
}

/// Every error path of both directions, with the proxy's own debug lines and the access log
/// on: no log field holds a Rust `Debug` form (`Some(10.0.0.5:8080)`, `None`, a struct), and
/// lines about an endpoint discovery knows a pod for name it next to the address.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logs_name_endpoints_by_pod_and_hold_no_debug_forms() {
    test_body(async {
        let malformed =
            RawHttpServer::start(b"HTTP/1.1 200 OK\r\nbad header\r\ncontent-length: 2\r\n\r\nok")
                .await;
        let app = Backend::start("app").await;
        let cfg = ConfigDir::web(&[malformed.addr]);
        // Every endpoint here is on 127.0.0.1, so this pod names them all.
        cfg.write("auth-pod.yaml", &deployment_pod_yaml(AUTH_POD, "auth", malformed.addr.ip()));
        cfg.write_service("refused", &[HTTP_PORT]);
        cfg.set_endpoints("refused", "http", &[closed_port()]);
        cfg.write_service("empty", &[HTTP_PORT]);
        cfg.set_endpoints("empty", "http", &[]);
        cfg.write_service("slow", &[HTTP_PORT]);
        cfg.set_endpoints("slow", "http", &[app.addr]);
        cfg.write(
            "slow-profile.yaml",
            "apiVersion: linkerd.io/v1alpha2\nkind: ServiceProfile\nmetadata: {name: slow.default.svc.cluster.local, namespace: default}\nspec:\n  routes:\n  - name: GET /slow\n    condition: {method: GET, pathRegex: /slow}\n    timeout: 200ms\n",
        );
        cfg.write("app-server.yaml", &identity_only_server_yaml(app.addr.port()));
        let forward = app.addr.to_string();
        let proxy = Proxy::builder()
            .arg("--config-dir")
            .arg(cfg.path_str())
            .args(["--inbound-forward", &forward, "--workload-labels", "app=web", "--namespace", "default"])
            .env("PYLON_LOG", "info,pylon_proxy=debug,pylon_tap_server=debug")
            .env("PYLON_ACCESS_LOG", "json")
            .start();

        let status = |authority: &'static str, path: &'static str, headers: &'static [(&'static str, &'static str)]| {
            let addr = proxy.outbound();
            async move { get_with(addr, authority, path, headers).await.unwrap().status }
        };
        assert_eq!(status(WEB_FQDN, "/malformed", &[]).await, 502);
        assert_eq!(status("refused.default.svc.cluster.local", "/refused", &[]).await, 502);
        assert_eq!(status("empty.default.svc.cluster.local", "/empty", &[]).await, 503);
        assert_eq!(
            status("slow.default.svc.cluster.local", "/slow", &[("x-delay-ms", "30000")]).await,
            504
        );
        assert_eq!(get(proxy.inbound(), "web", "/denied").await.unwrap().status, 403);
        // A malformed request: two Host headers.
        let mut raw = RawConn::connect(proxy.outbound()).await;
        raw.send("GET / HTTP/1.1\r\nhost: web\r\nhost: other\r\n\r\n").await;
        assert_eq!(raw.response().await.unwrap().status, 400);

        // The last of them logged (each is logged before its response is sent).
        let last = proxy
            .wait_for_log(Duration::from_secs(5), |l| l.contains("malformed request"))
            .await;
        assert!(last.is_some(), "{}", proxy.log_tail(30));
        let debug = debug_forms_in_logs(&proxy.logs());
        assert!(debug.is_empty(), "Debug forms in the logs:\n{}", debug.join("\n"));
        // (The check itself finds what it looks for.)
        let planted = [
            r#"{"level":"WARN","endpoint":"Some(10.0.0.5:8080)"}"#,
            r#"{"level":"INFO","fields":{"client_id":"None"}}"#,
            r#"{"level":"INFO","backend":"Service(ServiceRef { namespace: \"default\" })"}"#,
        ];
        let planted: Vec<String> = planted.iter().map(|l| l.to_string()).collect();
        assert_eq!(debug_forms_in_logs(&planted).len(), 3);

        // The route timeout's cancelled attempt is the 504 the client got, in the access log
        // and in the endpoint's metrics: not a client that went away.
        let slow = json_logs(&proxy.logs())
            .into_iter()
            .find(|l| l["message"] == "access" && l["path"] == "/slow")
            .unwrap_or_else(|| panic!("no access line for /slow: {}", proxy.log_tail(30)));
        assert_eq!(slow["status"], 504, "{slow}");
        assert_eq!(slow["proxy_error"], "route timeout", "{slow}");
        assert_eq!(
            proxy.metric_value(
                "response_total",
                &[("authority", "slow.default.svc.cluster.local:80"), ("error", "route timeout"), ("classification", "failure")]
            ),
            Some(1.0),
            "{}",
            series_of(&proxy.metrics(), "response_total")
        );

        // The refused endpoint's warning names its pod next to its address.
        let refused = json_logs(&proxy.logs())
            .into_iter()
            .find(|l| {
                field(l, "error") == Some("endpoint connection refused")
                    && field(l, "message").is_some_and(|m| m.starts_with("proxy error response"))
            })
            .unwrap_or_else(|| panic!("no refused warning: {}", proxy.log_tail(30)));
        assert!(field(&refused, "endpoint").is_some(), "{refused}");
        assert_eq!(field(&refused, "endpoint_pod"), Some(AUTH_POD), "{refused}");
        assert_eq!(field(&refused, "endpoint_workload"), Some("deployment/auth"), "{refused}");
        // No field is logged empty: an absent value is left out.
        for line in json_logs(&proxy.logs()) {
            for key in ["endpoint", "endpoint_pod", "destination", "client_id"] {
                assert_ne!(log_field(&line, key).and_then(|v| v.as_str()), Some(""), "{line}");
                assert!(!log_field(&line, key).is_some_and(|v| v.is_null()), "{line}");
            }
        }
    })
    .await
}
