use std::net::SocketAddr;

use http::{HeaderMap, Method};
use linkerd2_proxy_api::net::IpAddress;
use linkerd2_proxy_api::tap::observe_request::r#match::{self as pb, http as pbhttp, tcp};
use linkerd2_proxy_api::tap::observe_request::Match;
use linkerd2_proxy_api::tap::tap_event;

use super::*;

fn meta<'a>(
    method: &'a Method,
    path: &'a str,
    headers: &'a HeaderMap,
    route: &'a [(&'a str, &'a str)],
) -> RequestMeta<'a> {
    RequestMeta {
        direction: Direction::Outbound,
        source: Some("10.1.2.3:40000".parse().unwrap()),
        destination: Some("10.9.9.9:8080".parse().unwrap()),
        destination_labels: &[("authority", "web.default.svc.cluster.local:80")],
        route_labels: route,
        method,
        scheme: "http",
        authority: "web.default.svc.cluster.local:80",
        path,
        headers,
    }
}

fn path_prefix(p: &str) -> Match {
    Match {
        r#match: Some(pb::Match::Http(pb::Http {
            r#match: Some(pbhttp::Match::Path(pbhttp::StringMatch {
                r#match: Some(pbhttp::string_match::Match::Prefix(p.into())),
            })),
        })),
    }
}

#[test]
fn matchers_combine() {
    let get = Method::GET;
    let post = Method::POST;
    let h = HeaderMap::new();
    let route: &[(&str, &str)] = &[("route", "GET /users")];
    let m = Matcher::compile(Some(Match {
        r#match: Some(pb::Match::All(pb::Seq {
            matches: vec![
                path_prefix("/users"),
                Match {
                    r#match: Some(pb::Match::Http(pb::Http {
                        r#match: Some(pbhttp::Match::Method(Method::GET.into())),
                    })),
                },
                Match {
                    r#match: Some(pb::Match::Source(pb::Tcp {
                        r#match: Some(tcp::Match::Netmask(tcp::Netmask {
                            ip: Some(IpAddress::from(std::net::IpAddr::from([10, 1, 0, 0]))),
                            mask: 16,
                        })),
                    })),
                },
                Match {
                    r#match: Some(pb::Match::RouteLabel(pb::Label {
                        key: "route".into(),
                        value: "GET /users".into(),
                    })),
                },
            ],
        })),
    }))
    .expect("valid");
    assert!(m.matches(&meta(&get, "/users/1", &h, route)));
    assert!(!m.matches(&meta(&post, "/users/1", &h, route)));
    assert!(!m.matches(&meta(&get, "/orders", &h, route)));
    assert!(!m.matches(&meta(&get, "/users/1", &h, &[])));

    let not = Matcher::compile(Some(Match {
        r#match: Some(pb::Match::Not(Box::new(path_prefix("/health")))),
    }))
    .unwrap();
    assert!(!not.matches(&meta(&get, "/health", &h, route)));
    assert!(Matcher::compile(None)
        .unwrap()
        .matches(&meta(&get, "/x", &h, route)));
    let ports = Matcher::compile(Some(Match {
        r#match: Some(pb::Match::Destination(pb::Tcp {
            r#match: Some(tcp::Match::Ports(tcp::PortRange {
                min: 8000,
                max: 8999,
            })),
        })),
    }))
    .unwrap();
    assert!(ports.matches(&meta(&get, "/x", &h, route)));
    // Nonsense is refused, not guessed at.
    let bad = Matcher::compile(Some(Match {
        r#match: Some(pb::Match::Source(pb::Tcp { r#match: None })),
    }));
    assert!(bad.is_err());
}

fn request_events(taps: &Taps, n: usize, path: &str) -> usize {
    let h = HeaderMap::new();
    (0..n)
        .filter_map(|_| taps.observe_request(&meta(&Method::GET, path, &h, &[])))
        .count()
}

#[tokio::test]
async fn nothing_is_built_while_no_one_taps_and_closed_taps_go_away() {
    let taps = Taps::new();
    assert!(!taps.is_tapping());
    assert_eq!(request_events(&taps, 3, "/x"), 0);
    let rx = taps.open(Matcher::Any, 0, 1000);
    assert!(taps.is_tapping());
    assert_eq!(request_events(&taps, 3, "/x"), 3);
    drop(rx);
    assert_eq!(request_events(&taps, 1, "/x"), 0);
    assert!(!taps.is_tapping(), "a closed tap is pruned");
}

#[tokio::test]
async fn events_carry_the_request_and_redact_secrets() {
    let taps = Taps::new();
    let mut rx = taps.open(Matcher::Any, 0, 1000);
    let mut h = HeaderMap::new();
    h.insert("authorization", "Bearer secret".parse().unwrap());
    h.insert("x-request-id", "abc".parse().unwrap());
    let route: &[(&str, &str)] = &[("route", "GET /users")];
    let mut handle = taps
        .observe_request(&meta(&Method::GET, "/users/7", &h, route))
        .expect("tapped");
    handle.response_init(503, &HeaderMap::new(), Some("no endpoints"));
    handle.add_bytes(12);
    handle.response_end(Some(14), None);

    let init = rx.recv().await.expect("request init");
    assert_eq!(
        init.proxy_direction,
        tap_event::ProxyDirection::Outbound as i32
    );
    assert_eq!(
        init.route_meta.as_ref().unwrap().labels["route"],
        "GET /users"
    );
    let Some(tap_event::Event::Http(tap_event::Http {
        event: Some(tap_event::http::Event::RequestInit(req)),
    })) = init.event
    else {
        panic!("not a request init: {init:?}")
    };
    assert_eq!(req.path, "/users/7");
    let hs = req.headers.unwrap().headers;
    let auth = hs.iter().find(|h| h.name == "authorization").unwrap();
    assert_eq!(auth.value, b"REDACTED");
    assert!(hs
        .iter()
        .any(|h| h.name == "x-request-id" && h.value == b"abc"));

    let rsp = rx.recv().await.expect("response init");
    assert_eq!(
        rsp.destination_meta.as_ref().unwrap().labels["pylon-proxy-error"],
        "no endpoints"
    );
    let end = rx.recv().await.expect("response end");
    // The end says so too, for a client that prints each event on its own.
    assert_eq!(
        end.destination_meta.as_ref().unwrap().labels[PROXY_ERROR_LABEL],
        "no endpoints"
    );
    let Some(tap_event::Event::Http(tap_event::Http {
        event: Some(tap_event::http::Event::ResponseEnd(end)),
    })) = end.event
    else {
        panic!("not a response end")
    };
    assert_eq!(end.response_bytes, 12);
    assert_eq!(end.eos.unwrap().end, Some(pb_eos_grpc(14)));
}

fn pb_eos_grpc(code: u32) -> linkerd2_proxy_api::tap::eos::End {
    linkerd2_proxy_api::tap::eos::End::GrpcStatusCode(code)
}

#[tokio::test]
async fn limit_rate_and_a_stalled_client() {
    let taps = Taps::new();
    // Limit: 5 requests, then the tap is done.
    let _limited = taps.open(Matcher::Any, 5, 1000);
    assert_eq!(request_events(&taps, 20, "/x"), 5);
    assert!(!taps.is_tapping());

    // Rate: at most 10 requests a second are sampled.
    let _sampled = taps.open(Matcher::Any, 0, 10);
    assert!(request_events(&taps, 100, "/x") <= 11);

    // A client that never reads: events beyond the queue are dropped and counted, and once
    // the queue is full requests are not observed at all (no event is built for them).
    let taps = Taps::new();
    let _stalled = taps.open(Matcher::Any, 0, u32::MAX);
    let n = QUEUE + 50;
    let mut handles: Vec<_> = (0..n)
        .filter_map(|_| taps.observe_request(&meta(&Method::GET, "/x", &HeaderMap::new(), &[])))
        .collect();
    assert_eq!(handles.len(), QUEUE);
    assert_eq!(taps.dropped_counter().load(Ordering::Relaxed), 50);
    // Responses of requests already observed are dropped (and counted) too.
    if let Some(h) = handles.first_mut() {
        h.response_init(200, &HeaderMap::new(), None);
    }
    assert_eq!(taps.dropped_counter().load(Ordering::Relaxed), 51);
}

#[test]
fn authz_is_loopback_unless_configured() {
    let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
    let other: SocketAddr = "10.0.0.7:5000".parse().unwrap();
    let mapped: SocketAddr = "[::ffff:127.0.0.1]:5000".parse().unwrap();
    let d = Authz::default();
    assert!(d.allows(Some(local)) && d.allows(Some(mapped)));
    assert!(!d.allows(Some(other)) && !d.allows(None));
    let c = Authz::networks(&["10.0.0.0/8".into()]).unwrap();
    assert!(c.allows(Some(other)) && !c.allows(Some(local)));
    assert!(Authz::networks(&["10.0.0.0/33".into()]).is_err());
    assert!(Authz::networks(&["nope".into()]).is_err());
}
