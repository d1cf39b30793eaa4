//! gRPC (h2c) through the outbound listener: a tonic client and a tonic server, no codegen.

mod support;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use http::uri::PathAndQuery;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use support::*;
use tonic::codegen::Service;
use tonic::{Code, Status, Streaming};
use tonic_prost::ProstCodec;

/// The one message type of the hand-declared `pylon.test.Echo` service.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Msg {
    #[prost(string, tag = "1")]
    pub text: String,
    #[prost(uint32, tag = "2")]
    pub seq: u32,
}

const UNARY: &str = "/pylon.test.Echo/Unary";
const STREAM: &str = "/pylon.test.Echo/Stream";
const FAIL: &str = "/pylon.test.Echo/Fail";
const GRPC_AUTHORITY: &str = "grpc.default.svc.cluster.local:80";

type Codec = ProstCodec<Msg, Msg>;
type Ready<T> = std::future::Ready<Result<T, Status>>;
type MsgStream = Pin<Box<dyn Stream<Item = Result<Msg, Status>> + Send>>;

/// Unary echo: `text` is prefixed with "echo: ".
#[derive(Clone)]
struct UnaryEcho;
impl Service<tonic::Request<Msg>> for UnaryEcho {
    type Response = tonic::Response<Msg>;
    type Error = Status;
    type Future = Ready<Self::Response>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: tonic::Request<Msg>) -> Self::Future {
        let m = req.into_inner();
        std::future::ready(Ok(tonic::Response::new(Msg {
            text: format!("echo: {}", m.text),
            seq: m.seq,
        })))
    }
}

/// Always fails with NOT_FOUND.
#[derive(Clone)]
struct Fails;
impl Service<tonic::Request<Msg>> for Fails {
    type Response = tonic::Response<Msg>;
    type Error = Status;
    type Future = Ready<Self::Response>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: tonic::Request<Msg>) -> Self::Future {
        std::future::ready(Err(Status::not_found("nope")))
    }
}

/// Bidirectional echo: every incoming message is answered as it arrives.
#[derive(Clone)]
struct StreamEcho;
impl Service<tonic::Request<Streaming<Msg>>> for StreamEcho {
    type Response = tonic::Response<MsgStream>;
    type Error = Status;
    type Future = Ready<Self::Response>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: tonic::Request<Streaming<Msg>>) -> Self::Future {
        let out = req.into_inner().map(|m| {
            m.map(|m| Msg {
                text: m.text.to_uppercase(),
                seq: m.seq,
            })
        });
        std::future::ready(Ok(tonic::Response::new(Box::pin(out) as MsgStream)))
    }
}

/// The gRPC backend: a hyper h1/h2 server dispatching to tonic's server-side codec.
async fn grpc_backend() -> Backend {
    let handler: Handler = Arc::new(|req, _st| {
        Box::pin(async move {
            let path = req.uri().path().to_string();
            let mut grpc = tonic::server::Grpc::new(Codec::default());
            let resp = match path.as_str() {
                UNARY => grpc.unary(UnaryEcho, req).await,
                FAIL => grpc.unary(Fails, req).await,
                STREAM => grpc.streaming(StreamEcho, req).await,
                _ => {
                    return http::Response::builder()
                        .status(200)
                        .header("grpc-status", "12")
                        .header("content-type", "application/grpc")
                        .body(empty())
                        .unwrap()
                }
            };
            resp.map(|b| b.map_err(|s| Box::new(s) as BoxError).boxed_unsync())
        })
    });
    Backend::start_with("grpc", handler).await
}

/// A tonic connector that dials the proxy whatever the URI says; the URI stays the logical
/// destination (`:authority`).
#[derive(Clone)]
struct ViaProxy(SocketAddr);
impl Service<http::Uri> for ViaProxy {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: http::Uri) -> Self::Future {
        let addr = self.0;
        Box::pin(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            Ok(TokioIo::new(tcp))
        })
    }
}

type Client = tonic::client::Grpc<tonic::transport::Channel>;

async fn client(proxy: &Proxy) -> Client {
    client_to(proxy.outbound()).await
}

async fn client_to(addr: SocketAddr) -> Client {
    let endpoint =
        tonic::transport::Endpoint::from_shared(format!("http://{GRPC_AUTHORITY}")).unwrap();
    let connect = endpoint.connect_with_connector(ViaProxy(addr));
    let channel = within("gRPC connect", OP_TIMEOUT, connect)
        .await
        .expect("tonic channel to the proxy");
    tonic::client::Grpc::new(channel)
}

fn grpc_setup(backend: &Backend) -> (ConfigDir, Proxy) {
    let cfg = ConfigDir::new();
    cfg.write_service(
        "grpc",
        &[SvcPort {
            name: "grpc",
            port: 80,
            target: "grpc",
        }],
    );
    cfg.set_endpoints("grpc", "grpc", &[backend.addr]);
    let proxy = Proxy::with_config(&cfg, &[]);
    (cfg, proxy)
}

async fn unary(c: &mut Client, path: &'static str, text: &str, seq: u32) -> Result<Msg, Status> {
    within("gRPC unary", OP_TIMEOUT, async {
        c.ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let req = tonic::Request::new(Msg {
            text: text.to_string(),
            seq,
        });
        c.unary(req, PathAndQuery::from_static(path), Codec::default())
            .await
            .map(tonic::Response::into_inner)
    })
    .await
}

fn is_grpc_outbound(s: &Sample) -> bool {
    s.label("direction") == Some("outbound")
        && s.label("authority")
            .is_some_and(|a| a.starts_with("grpc.default.svc.cluster.local"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_unary_through_proxy() {
    test_body(async {
        let backend = grpc_backend().await;
        let (_cfg, proxy) = grpc_setup(&backend);
        let mut c = client(&proxy).await;

        const N: u32 = 10;
        for i in 0..N {
            let m = unary(&mut c, UNARY, &format!("hi {i}"), i)
                .await
                .unwrap_or_else(|s| panic!("unary call {i} failed through the proxy: {s:?}"));
            assert_eq!(
                m,
                Msg {
                    text: format!("echo: hi {i}"),
                    seq: i
                }
            );
        }
        assert_eq!(backend.requests(), N as usize);
        for r in backend.state.recorded() {
            assert_eq!(
                r.version,
                http::Version::HTTP_2,
                "gRPC reached the backend as {:?}; it must stay HTTP/2",
                r.version
            );
        }

        let ok = wait_until(
            || {
                proxy.metric_sum("response_total", |s| {
                    is_grpc_outbound(s)
                        && s.label("classification") == Some("success")
                        && s.label("grpc_status") == Some("0")
                }) == Some(N as f64)
            },
            Duration::from_secs(5),
        )
        .await;
        assert!(
            ok,
            "response_total{{classification=success,grpc_status=\"0\"}} != {N}; series:\n{}",
            series_of(&proxy.metrics(), "response_total")
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_bidirectional_streaming_through_proxy() {
    test_body(async {
        let backend = grpc_backend().await;
        let (_cfg, proxy) = grpc_setup(&backend);
        let mut c = client(&proxy).await;

        let (tx, rx) = tokio::sync::mpsc::channel::<Msg>(1);
        let outbound =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|m| (m, rx)) },
            );
        tx.send(Msg {
            text: "ping 0".into(),
            seq: 0,
        })
        .await
        .unwrap();
        let resp = within("gRPC stream open", OP_TIMEOUT, async {
            c.ready().await.expect("channel ready");
            c.streaming(
                tonic::Request::new(outbound),
                PathAndQuery::from_static(STREAM),
                Codec::default(),
            )
            .await
        })
        .await
        .expect("bidi stream through the proxy");
        let mut inbound = resp.into_inner();

        // Ping-pong: each reply must arrive before the next message is sent.
        for i in 0..10u32 {
            if i > 0 {
                tx.send(Msg {
                    text: format!("ping {i}"),
                    seq: i,
                })
                .await
                .unwrap();
            }
            let got = within(
                &format!("stream reply {i} (is the proxy buffering the stream?)"),
                OP_TIMEOUT,
                inbound.message(),
            )
            .await
            .unwrap_or_else(|s| panic!("stream reply {i}: {s:?}"))
            .unwrap_or_else(|| panic!("stream ended before reply {i}"));
            assert_eq!(
                got,
                Msg {
                    text: format!("PING {i}"),
                    seq: i
                }
            );
        }
        drop(tx);
        let end = within("stream end", OP_TIMEOUT, inbound.message()).await;
        assert!(
            matches!(end, Ok(None)),
            "stream should end cleanly with grpc-status 0, got {end:?}"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_error_status_is_counted_as_failure() {
    test_body(async {
        let backend = grpc_backend().await;
        let (_cfg, proxy) = grpc_setup(&backend);
        let mut c = client(&proxy).await;

        const N: usize = 3;
        for i in 0..N {
            let err = unary(&mut c, FAIL, "x", 0)
                .await
                .expect_err("the Fail method returns an error");
            assert_eq!(err.code(), Code::NotFound, "call {i}: {err:?}");
            assert_eq!(err.message(), "nope", "call {i}: {err:?}");
            assert!(
                err.metadata().get("pylon-proxy-error").is_none(),
                "an application gRPC error must not carry pylon-proxy-error: {err:?}"
            );
        }
        // One success so both classifications exist.
        unary(&mut c, UNARY, "ok", 1).await.expect("unary ok");

        let failure = |s: &Sample| {
            is_grpc_outbound(s)
                && s.label("classification") == Some("failure")
                && s.label("grpc_status") == Some("5")
        };
        let ok = wait_until(
            || proxy.metric_sum("response_total", failure) == Some(N as f64),
            Duration::from_secs(5),
        )
        .await;
        let text = proxy.metrics();
        assert!(
            ok,
            "response_total{{classification=failure,grpc_status=\"5\"}} != {N} (a gRPC error \
             in an HTTP 200 must count as a failure); series:\n{}",
            series_of(&text, "response_total")
        );
        assert_eq!(
            metric_sum(&text, "response_total", |s| is_grpc_outbound(s)
                && s.label("classification") == Some("success")),
            Some(1.0),
            "response_total classification=success; series:\n{}",
            series_of(&text, "response_total")
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_via_inbound_forward() {
    test_body(async {
        let backend = grpc_backend().await;
        let fwd = backend.addr.to_string();
        let proxy = Proxy::start(&["--inbound-forward", &fwd]);
        let mut c = client_to(proxy.inbound()).await;
        for i in 0..5 {
            let m = unary(&mut c, UNARY, "in", i)
                .await
                .unwrap_or_else(|s| panic!("inbound unary call {i}: {s:?}"));
            assert_eq!(m.text, "echo: in");
        }
        let err = unary(&mut c, FAIL, "x", 0).await.expect_err("Fail errors");
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
        let inbound_failure = |s: &Sample| {
            s.label("direction") == Some("inbound")
                && s.label("classification") == Some("failure")
                && s.label("grpc_status") == Some("5")
        };
        let ok = wait_until(
            || proxy.metric_sum("response_total", inbound_failure) == Some(1.0),
            Duration::from_secs(5),
        )
        .await;
        assert!(
            ok,
            "inbound gRPC failure not counted; series:\n{}",
            series_of(&proxy.metrics(), "response_total")
        );
    })
    .await
}
