//! `pylon-proxy` on Linkerd's control plane: a destination service on loopback (the
//! `linkerd2-proxy-api` crate's generated server) answers exactly as Linkerd's destination
//! controller does (its profile translator always lists the service itself in
//! `dst_overrides`, with a trailing-dot authority and weight 10000; its endpoint translator
//! sends Linkerd's `metric_labels`, a `...identity.linkerd.cluster.local` TLS identity and the H2
//! hint), and the proxy routes, labels and counts by it. It also checks what the proxy asks:
//! the `k8s` scheme, the authority with its port, and the context token.

mod support;

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use linkerd2_proxy_api::destination::destination_server::{Destination, DestinationServer};
use linkerd2_proxy_api::destination::{
    self as api, protocol_hint, tls_identity, update, GetDestination,
};
use linkerd2_proxy_api::http_types::{self, http_method};
use pylon_proxy_policy::proto::tcp_address;
use support::*;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

type Stream<T> = Pin<Box<dyn futures_util::Stream<Item = Result<T, tonic::Status>> + Send>>;

/// Linkerd's destination controller, as far as one service goes.
struct LinkerdDestination {
    backend: std::net::SocketAddr,
    asked: Arc<Mutex<Vec<(String, GetDestination)>>>,
}

/// Sends `first` then keeps the stream open, as the controller does.
fn open_stream<T: Send + 'static>(first: T) -> Stream<T> {
    Box::pin(futures_util::stream::iter([Ok(first)]).chain(futures_util::stream::pending()))
}

use futures_util::StreamExt;

#[tonic::async_trait]
impl Destination for LinkerdDestination {
    type GetStream = Stream<api::Update>;
    type GetProfileStream = Stream<api::DestinationProfile>;

    async fn get(
        &self,
        request: tonic::Request<GetDestination>,
    ) -> Result<tonic::Response<Self::GetStream>, tonic::Status> {
        let req = request.into_inner();
        self.asked
            .lock()
            .expect("lock")
            .push(("Get".into(), req.clone()));
        if req.path != "web.default.svc.cluster.local:80" {
            return Ok(tonic::Response::new(open_stream(api::Update {
                update: Some(update::Update::NoEndpoints(api::NoEndpoints {
                    exists: false,
                })),
            })));
        }
        let identity = "web.default.serviceaccount.identity.linkerd.cluster.local";
        let addr = api::WeightedAddr {
            addr: Some(tcp_address(self.backend)),
            weight: 10_000,
            metric_labels: [
                ("pod", "web-5d8f7-x2x4z"),
                ("pod_template_hash", "5d8f7"),
                ("serviceaccount", "web"),
                ("deployment", "web"),
                ("zone", ""),
                ("zone_locality", "unknown"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            tls_identity: Some(api::TlsIdentity {
                strategy: Some(tls_identity::Strategy::DnsLikeIdentity(
                    tls_identity::DnsLikeIdentity {
                        name: identity.into(),
                    },
                )),
                server_name: Some(tls_identity::DnsLikeIdentity {
                    name: identity.into(),
                }),
            }),
            protocol_hint: Some(api::ProtocolHint {
                protocol: Some(protocol_hint::Protocol::H2(protocol_hint::H2 {})),
                opaque_transport: None,
            }),
            ..Default::default()
        };
        Ok(tonic::Response::new(open_stream(api::Update {
            update: Some(update::Update::Add(api::WeightedAddrSet {
                addrs: vec![addr],
                metric_labels: [("namespace", "default"), ("service", "web")]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            })),
        })))
    }

    async fn get_profile(
        &self,
        request: tonic::Request<GetDestination>,
    ) -> Result<tonic::Response<Self::GetProfileStream>, tonic::Status> {
        let req = request.into_inner();
        self.asked
            .lock()
            .expect("lock")
            .push(("GetProfile".into(), req.clone()));
        let profile = if req.path.starts_with("web.default.svc.cluster.local:") {
            api::DestinationProfile {
                fully_qualified_name: "web.default.svc.cluster.local".into(),
                routes: vec![api::Route {
                    condition: Some(api::RequestMatch {
                        r#match: Some(api::request_match::Match::All(api::request_match::Seq {
                            matches: vec![
                                api::RequestMatch {
                                    r#match: Some(api::request_match::Match::Method(
                                        http_types::HttpMethod {
                                            r#type: Some(http_method::Type::Registered(
                                                http_method::Registered::Get.into(),
                                            )),
                                        },
                                    )),
                                },
                                api::RequestMatch {
                                    r#match: Some(api::request_match::Match::Path(
                                        api::PathMatch {
                                            regex: "/books/[^/]*".into(),
                                        },
                                    )),
                                },
                            ],
                        })),
                    }),
                    response_classes: Vec::new(),
                    metrics_labels: [("route".to_string(), "GET /books/{id}".to_string())].into(),
                    is_retryable: false,
                    timeout: None,
                }],
                retry_budget: Some(api::RetryBudget {
                    retry_ratio: 0.2,
                    min_retries_per_second: 10,
                    ttl: Some(prost_types::Duration {
                        seconds: 10,
                        nanos: 0,
                    }),
                }),
                // Linkerd lists the service itself, by its FQDN with a trailing dot.
                dst_overrides: vec![api::WeightedDst {
                    authority: "web.default.svc.cluster.local.:80".into(),
                    weight: 10_000,
                    backend_ref: None,
                }],
                ..Default::default()
            }
        } else {
            api::DestinationProfile::default()
        };
        Ok(tonic::Response::new(open_stream(profile)))
    }
}

#[tokio::test]
async fn a_pylon_proxy_uses_linkerds_destination_answers() {
    test_body(async {
        let backend = Backend::start("web").await;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shared = Arc::new(Mutex::new(Vec::new()));
        let service = LinkerdDestination {
            backend: backend.addr,
            asked: shared.clone(),
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(DestinationServer::new(service))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        let proxy = Proxy::builder()
            .env("LINKERD2_PROXY_DESTINATION_SVC_ADDR", addr.to_string())
            .env(
                "LINKERD2_PROXY_DESTINATION_CONTEXT",
                r#"{"ns":"default","nodeName":"node-1","pod":"client-0"}"#,
            )
            .start();
        for path in ["/books/1", "/books/2", "/other"] {
            let rsp = get(proxy.outbound(), "web.default.svc.cluster.local", path)
                .await
                .expect("a response");
            assert_eq!(rsp.status, 200, "{}\n{}", rsp.text(), proxy.log_tail(20));
            assert_eq!(rsp.backend(), Some("web"));
        }

        // What Linkerd's controller is asked, as it expects to be asked.
        let asked = shared.lock().expect("lock").clone();
        let first = &asked[0];
        assert_eq!(first.0, "GetProfile");
        assert_eq!(first.1.scheme, "k8s");
        assert_eq!(first.1.path, "web.default.svc.cluster.local:80");
        assert!(first.1.context_token.contains("\"ns\":\"default\""));
        assert!(asked
            .iter()
            .any(|(rpc, r)| rpc == "Get" && r.path == "web.default.svc.cluster.local:80"));

        // Linkerd's labels and route names show in the proxy's metrics.
        let metrics = proxy.metrics();
        let by_pod = metric_sum(&metrics, "response_total", |s| {
            s.label("dst_pod") == Some("web-5d8f7-x2x4z")
                && s.label("dst_deployment") == Some("web")
                && s.label("dst_serviceaccount") == Some("web")
                && s.label("dst_namespace") == Some("default")
                && s.label("dst_service") == Some("web")
        });
        assert_eq!(
            by_pod,
            Some(3.0),
            "{}",
            series_of(&metrics, "response_total")
        );
        let route = metric_sum(&metrics, "route_response_total", |s| {
            s.label("rt_route") == Some("GET /books/{id}")
        });
        assert_eq!(
            route,
            Some(2.0),
            "{}",
            series_of(&metrics, "route_response_total")
        );
        // The self-override is the service itself: no split, no second destination.
        let logs = proxy.logs_joined();
        assert!(
            !logs.contains("split backend unavailable"),
            "{}",
            proxy.log_tail(30)
        );
        // One subscription per stream, however many requests: the proxy doesn't poll.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let calls = shared.lock().expect("lock").len();
        assert_eq!(calls, 2, "{asked:?}");
    })
    .await
}
