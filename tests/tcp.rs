//! Opaque TCP through the inbound listener (`--inbound-forward`): opaque ports, protocol
//! detection falling back to TCP, server-speaks-first, and the tcp_* metrics.

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn connect(addr: std::net::SocketAddr) -> TcpStream {
    within("connect", OP_TIMEOUT, TcpStream::connect(addr))
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"))
}

/// Writes `payload` and reads the same number of bytes back (concurrently, so a large payload
/// cannot deadlock on socket buffers).
async fn round_trip(tcp: &mut TcpStream, payload: &[u8]) -> Vec<u8> {
    let (mut r, mut w) = tcp.split();
    let mut got = vec![0u8; payload.len()];
    let write = async {
        w.write_all(payload).await.expect("write");
    };
    let read = async {
        r.read_exact(&mut got).await.expect("read echo");
    };
    within("echo round trip", OP_TIMEOUT, async {
        tokio::join!(write, read);
    })
    .await;
    got
}

/// The connections the inbound proxy accepted (Linkerd's `peer="src"` series).
fn inbound(s: &Sample) -> bool {
    s.label("direction") == Some("inbound") && s.label("peer") == Some("src")
}

/// The connections the inbound proxy opened to the app (`peer="dst"`).
fn inbound_to_app(s: &Sample) -> bool {
    s.label("direction") == Some("inbound") && s.label("peer") == Some("dst")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn opaque_port_echo_via_inbound_and_tcp_metrics() {
    test_body(async {
        let echo = TcpServer::echo().await;
        let port = echo.addr.port().to_string();
        let fwd = echo.addr.to_string();
        let proxy = Proxy::start(&["--inbound-forward", &fwd, "--opaque-ports", &port]);

        let mut tcp = connect(proxy.inbound()).await;
        let payload: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 31 % 256) as u8).collect();
        let got = round_trip(&mut tcp, &payload).await;
        assert!(
            got == payload,
            "1 MiB echoed through the opaque port differs"
        );
        let got = round_trip(&mut tcp, b"hello").await;
        assert_eq!(&got, b"hello");

        // While the connection is open.
        let open = wait_until(
            || proxy.metric_sum("tcp_open_connections", inbound) == Some(1.0),
            Duration::from_secs(5),
        )
        .await;
        assert!(
            open,
            "tcp_open_connections{{direction=inbound}} != 1 while a connection is open:\n{}",
            series_of(&proxy.metrics(), "tcp_open_connections")
        );

        drop(tcp);
        let closed = wait_until(
            || proxy.metric_sum("tcp_close_total", inbound) == Some(1.0),
            Duration::from_secs(5),
        )
        .await;
        let text = proxy.metrics();
        assert!(
            closed,
            "tcp_close_total{{direction=inbound}} != 1 after the client closed:\n{}",
            series_of(&text, "tcp_close_total")
        );
        assert_eq!(
            metric_sum(&text, "tcp_open_total", inbound),
            Some(1.0),
            "tcp_open_total{{direction=inbound}}:\n{}",
            series_of(&text, "tcp_open_total")
        );
        assert_eq!(
            metric_sum(&text, "tcp_open_connections", inbound),
            Some(0.0),
            "tcp_open_connections{{direction=inbound}} after close:\n{}",
            series_of(&text, "tcp_open_connections")
        );
        let sent = (payload.len() + 5) as f64;
        for name in ["tcp_read_bytes_total", "tcp_write_bytes_total"] {
            let v = metric_sum(&text, name, inbound).unwrap_or(0.0);
            assert!(
                v >= sent,
                "{name}{{direction=inbound}} = {v}, want >= {sent} (bytes each way):\n{}",
                series_of(&text, name)
            );
        }
        let dur = metric_sum(&text, "tcp_connection_duration_ms_count", inbound);
        assert_eq!(
            dur,
            Some(1.0),
            "tcp_connection_duration_ms_count{{direction=inbound}}:\n{}",
            series_of(&text, "tcp_connection_duration_ms_count")
        );
        // The proxy's own connection to the app is counted on its side: one, closed, same bytes.
        for (name, want) in [("tcp_open_total", 1.0), ("tcp_close_total", 1.0)] {
            assert_eq!(
                metric_sum(&text, name, inbound_to_app),
                Some(want),
                "{name}{{direction=inbound,peer=dst}}:\n{}",
                series_of(&text, name)
            );
        }
        for name in ["tcp_read_bytes_total", "tcp_write_bytes_total"] {
            let v = metric_sum(&text, name, inbound_to_app).unwrap_or(0.0);
            assert!(
                v >= sent,
                "{name}{{direction=inbound,peer=dst}} = {v}, want >= {sent}:\n{}",
                series_of(&text, name)
            );
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn opaque_ports_skip_detection_for_server_first_protocols() {
    test_body(async {
        let server = TcpServer::speaks_first(b"+OK pylon banner\r\n").await;
        let port = server.addr.port().to_string();
        let fwd = server.addr.to_string();
        // The default detect timeout (10 s) applies; an opaque port must not wait for it.
        let proxy = Proxy::start(&["--inbound-forward", &fwd, "--opaque-ports", &port]);

        let mut tcp = connect(proxy.inbound()).await;
        let start = Instant::now();
        let mut banner = vec![0u8; 18];
        within(
            "banner through an opaque port",
            OP_TIMEOUT,
            tcp.read_exact(&mut banner),
        )
        .await
        .expect("read banner");
        let waited = start.elapsed();
        assert_eq!(&banner, b"+OK pylon banner\r\n");
        assert!(
            waited < Duration::from_secs(5),
            "banner took {waited:?} on an --opaque-ports port: protocol detection was not \
             skipped (the 10 s detect timeout ran)"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn non_http_bytes_are_detected_as_tcp() {
    test_body(async {
        let echo = TcpServer::echo().await;
        let fwd = echo.addr.to_string();
        let proxy = Proxy::start(&["--inbound-forward", &fwd]);

        let mut tcp = connect(proxy.inbound()).await;
        let first: &[u8] = b"\x00\x01\x02\x03PYLON-OPAQUE-PROTOCOL\xff\xfe\r\n\r\n";
        let got = round_trip(&mut tcp, first).await;
        assert_eq!(got, first, "non-HTTP bytes through detection");
        let more: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        let got = round_trip(&mut tcp, &more).await;
        assert!(got == more, "100 kB after detection differ");
        assert_eq!(
            echo.connections.load(std::sync::atomic::Ordering::SeqCst),
            1
        );

        drop(tcp);
        let counted = wait_until(
            || proxy.metric_sum("tcp_close_total", inbound) == Some(1.0),
            Duration::from_secs(5),
        )
        .await;
        assert!(
            counted,
            "opaque connection after detection not counted in tcp_close_total:\n{}",
            series_of(&proxy.metrics(), "tcp_close_total")
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_speaks_first_after_detect_timeout() {
    test_body(async {
        let server = TcpServer::speaks_first(b"220 pylon.test ESMTP\r\n").await;
        let fwd = server.addr.to_string();
        let proxy = Proxy::start(&["--inbound-forward", &fwd, "--detect-timeout", "300ms"]);

        // The client sends nothing first: after the detect timeout the proxy must connect and
        // relay the server's banner.
        let mut tcp = connect(proxy.inbound()).await;
        let mut banner = vec![0u8; 22];
        within(
            "banner after the 300ms detect timeout",
            OP_TIMEOUT,
            tcp.read_exact(&mut banner),
        )
        .await
        .expect("read banner");
        assert_eq!(&banner, b"220 pylon.test ESMTP\r\n");
        let got = round_trip(&mut tcp, b"QUIT\r\n").await;
        assert_eq!(&got, b"QUIT\r\n");
    })
    .await
}
