//! Pylon's route model in Linkerd's proxy API (`io.linkerd.proxy.destination`), both ways: the
//! controller sends a [`RouteTable`] as a `DestinationProfile`, and a proxy that gets its
//! profiles from a controller (Pylon's or Linkerd's) turns one back into a [`RouteTable`].
//! Keeping both directions here, beside the model, is what lets a round trip be tested.

use std::time::Duration;

use linkerd2_proxy_api::destination as api;
use linkerd2_proxy_api::http_types::{self, http_method};
use linkerd2_proxy_api::net::{ip_address, IpAddress, TcpAddress};

use crate::route::{
    PathRegex, RequestMatcher, ResponseClass, ResponseMatcher, RetryBudgetSpec, Route, RouteTable,
    WeightedAuthority,
};

/// A profile the proxy could not use, naming the part that was wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct ProtoError {
    pub field: String,
    pub message: String,
}

fn proto_error(field: impl Into<String>, message: impl Into<String>) -> ProtoError {
    ProtoError {
        field: field.into(),
        message: message.into(),
    }
}

/// The `rt_route` label Linkerd's controller puts in each route's `metrics_labels`.
const ROUTE_LABEL: &str = "route";

/// A destination's routes as a `DestinationProfile` (`fqdn` without a port; empty when the
/// destination is not a service).
pub fn profile_to_proto(table: &RouteTable, fqdn: &str, opaque: bool) -> api::DestinationProfile {
    let budget = table.retry_budget();
    api::DestinationProfile {
        fully_qualified_name: fqdn.to_string(),
        opaque_protocol: opaque,
        routes: table.routes().iter().map(route_to_proto).collect(),
        retry_budget: Some(api::RetryBudget {
            retry_ratio: budget.retry_ratio as f32,
            min_retries_per_second: budget.min_retries_per_second,
            ttl: duration_to_proto(budget.ttl),
        }),
        dst_overrides: table
            .dst_overrides()
            .iter()
            .map(|o| api::WeightedDst {
                authority: o.authority.to_string(),
                // Linkerd's controller sends weights in thousandths too (`500m` -> 500).
                weight: u32::try_from(o.weight_milli).unwrap_or(u32::MAX),
                backend_ref: None,
            })
            .collect(),
        endpoint: None,
        parent_ref: None,
        profile_ref: None,
    }
}

fn route_to_proto(route: &Route) -> api::Route {
    api::Route {
        condition: Some(request_match_to_proto(route.matcher())),
        response_classes: route
            .response_classes()
            .iter()
            .map(|c| api::ResponseClass {
                condition: Some(response_match_to_proto(&c.matcher)),
                is_failure: c.is_failure,
            })
            .collect(),
        metrics_labels: [(ROUTE_LABEL.to_string(), route.name().to_string())].into(),
        is_retryable: route.is_retryable(),
        timeout: route.timeout().and_then(duration_to_proto),
    }
}

fn request_match_to_proto(m: &RequestMatcher) -> api::RequestMatch {
    use api::request_match::{Match, Seq};
    let seq = |ms: &[RequestMatcher]| Seq {
        matches: ms.iter().map(request_match_to_proto).collect(),
    };
    let m = match m {
        RequestMatcher::Method(method) => Match::Method(method_to_proto(method)),
        RequestMatcher::PathRegex(re) => Match::Path(api::PathMatch {
            regex: re.as_str().to_string(),
        }),
        RequestMatcher::All(ms) => Match::All(seq(ms)),
        RequestMatcher::Any(ms) => Match::Any(seq(ms)),
        RequestMatcher::Not(m) => Match::Not(Box::new(request_match_to_proto(m))),
    };
    api::RequestMatch { r#match: Some(m) }
}

fn method_to_proto(method: &str) -> http_types::HttpMethod {
    let ty = match http::Method::from_bytes(method.as_bytes()) {
        Ok(m) => http_method::Type::from(m),
        Err(_) => http_method::Type::Unregistered(method.to_string()),
    };
    http_types::HttpMethod { r#type: Some(ty) }
}

fn response_match_to_proto(m: &ResponseMatcher) -> api::ResponseMatch {
    use api::response_match::{Match, Seq};
    let seq = |ms: &[ResponseMatcher]| Seq {
        matches: ms.iter().map(response_match_to_proto).collect(),
    };
    let m = match m {
        ResponseMatcher::Status { min, max } => Match::Status(api::HttpStatusRange {
            min: u32::from(*min),
            max: u32::from(*max),
        }),
        ResponseMatcher::All(ms) => Match::All(seq(ms)),
        ResponseMatcher::Any(ms) => Match::Any(seq(ms)),
        ResponseMatcher::Not(m) => Match::Not(Box::new(response_match_to_proto(m))),
    };
    api::ResponseMatch { r#match: Some(m) }
}

fn duration_to_proto(d: Duration) -> Option<prost_types::Duration> {
    prost_types::Duration::try_from(d).ok()
}

/// The routes a `DestinationProfile` describes. A route without a `route` metric label gets
/// `route-N` (its position), so it still has a name to count under.
pub fn profile_from_proto(profile: &api::DestinationProfile) -> Result<RouteTable, ProtoError> {
    let routes = profile
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| route_from_proto(r, i))
        .collect::<Result<Vec<_>, _>>()?;
    let retry_budget = match &profile.retry_budget {
        None => RetryBudgetSpec::default(),
        Some(b) => {
            let ratio = f64::from(b.retry_ratio);
            if !ratio.is_finite() || ratio < 0.0 {
                return Err(proto_error(
                    "retry_budget.retry_ratio",
                    format!("must be a number >= 0, got {ratio}"),
                ));
            }
            RetryBudgetSpec {
                retry_ratio: ratio,
                min_retries_per_second: b.min_retries_per_second,
                ttl: b
                    .ttl
                    .as_ref()
                    .map(|d| duration_from_proto(d, "retry_budget.ttl"))
                    .transpose()?
                    .unwrap_or(RetryBudgetSpec::default().ttl),
            }
        }
    };
    let dst_overrides = profile
        .dst_overrides
        .iter()
        .filter(|d| d.weight > 0)
        .map(|d| WeightedAuthority {
            authority: d.authority.as_str().into(),
            weight_milli: u64::from(d.weight),
        })
        .collect();
    Ok(RouteTable::new(routes, retry_budget, dst_overrides))
}

fn route_from_proto(route: &api::Route, index: usize) -> Result<Route, ProtoError> {
    let field = format!("routes[{index}]");
    let name = route
        .metrics_labels
        .get(ROUTE_LABEL)
        .cloned()
        .unwrap_or_else(|| format!("route-{index}"));
    let matcher = match &route.condition {
        Some(c) => request_match_from_proto(c, &format!("{field}.condition"))?,
        // Linkerd's proxy treats a route without a condition as matching nothing.
        None => RequestMatcher::Any(Vec::new()),
    };
    let classes = route
        .response_classes
        .iter()
        .enumerate()
        .map(|(j, c)| {
            let path = format!("{field}.response_classes[{j}].condition");
            let matcher = match &c.condition {
                Some(m) => response_match_from_proto(m, &path)?,
                None => ResponseMatcher::Any(Vec::new()),
            };
            Ok(ResponseClass {
                matcher,
                is_failure: c.is_failure,
            })
        })
        .collect::<Result<Vec<_>, ProtoError>>()?;
    let timeout = route
        .timeout
        .as_ref()
        .map(|d| duration_from_proto(d, &format!("{field}.timeout")))
        .transpose()?
        .filter(|d| !d.is_zero());
    Ok(Route::new(
        name,
        matcher,
        classes,
        route.is_retryable,
        timeout,
    ))
}

fn request_match_from_proto(
    m: &api::RequestMatch,
    field: &str,
) -> Result<RequestMatcher, ProtoError> {
    use api::request_match::Match;
    let seq = |ms: &[api::RequestMatch], kind: &str| {
        ms.iter()
            .enumerate()
            .map(|(i, m)| request_match_from_proto(m, &format!("{field}.{kind}[{i}]")))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(match &m.r#match {
        None => return Err(proto_error(field, "empty match")),
        Some(Match::All(s)) => RequestMatcher::All(seq(&s.matches, "all")?),
        Some(Match::Any(s)) => RequestMatcher::Any(seq(&s.matches, "any")?),
        Some(Match::Not(m)) => RequestMatcher::Not(Box::new(request_match_from_proto(
            m,
            &format!("{field}.not"),
        )?)),
        Some(Match::Path(p)) => RequestMatcher::PathRegex(
            PathRegex::new(&p.regex)
                .map_err(|e| proto_error(format!("{field}.path"), e.to_string()))?,
        ),
        Some(Match::Method(m)) => {
            let method = match &m.r#type {
                Some(http_method::Type::Registered(_)) => m
                    .clone()
                    .try_into()
                    .map(|m: http::Method| m.as_str().to_string())
                    .map_err(|e| proto_error(format!("{field}.method"), e.to_string()))?,
                Some(http_method::Type::Unregistered(s)) => s.clone(),
                None => return Err(proto_error(format!("{field}.method"), "no method")),
            };
            RequestMatcher::Method(method.into())
        }
    })
}

fn response_match_from_proto(
    m: &api::ResponseMatch,
    field: &str,
) -> Result<ResponseMatcher, ProtoError> {
    use api::response_match::Match;
    let seq = |ms: &[api::ResponseMatch], kind: &str| {
        ms.iter()
            .enumerate()
            .map(|(i, m)| response_match_from_proto(m, &format!("{field}.{kind}[{i}]")))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(match &m.r#match {
        None => return Err(proto_error(field, "empty match")),
        Some(Match::All(s)) => ResponseMatcher::All(seq(&s.matches, "all")?),
        Some(Match::Any(s)) => ResponseMatcher::Any(seq(&s.matches, "any")?),
        Some(Match::Not(m)) => ResponseMatcher::Not(Box::new(response_match_from_proto(
            m,
            &format!("{field}.not"),
        )?)),
        Some(Match::Status(r)) => {
            let status = |v: u32| u16::try_from(v).ok().filter(|s| (100..=599).contains(s));
            // Either bound unset (0) means the range is the other one alone.
            let (min, max) = match (r.min, r.max) {
                (0, 0) => return Err(proto_error(format!("{field}.status"), "no status")),
                (0, v) | (v, 0) => (status(v), status(v)),
                (min, max) => (status(min), status(max)),
            };
            match (min, max) {
                (Some(min), Some(max)) if min <= max => ResponseMatcher::Status { min, max },
                _ => {
                    return Err(proto_error(
                        format!("{field}.status"),
                        format!("invalid status range {}-{}", r.min, r.max),
                    ))
                }
            }
        }
    })
}

fn duration_from_proto(d: &prost_types::Duration, field: &str) -> Result<Duration, ProtoError> {
    Duration::try_from(*d).map_err(|e| proto_error(field, e.to_string()))
}

/// A socket address as the proxy API carries it.
pub fn tcp_address(addr: std::net::SocketAddr) -> TcpAddress {
    TcpAddress {
        ip: Some(IpAddress::from(addr.ip())),
        port: u32::from(addr.port()),
    }
}

/// The inverse of [`tcp_address`]; `None` for a malformed address.
pub fn socket_addr(addr: &TcpAddress) -> Option<std::net::SocketAddr> {
    let ip = match addr.ip.as_ref()?.ip.as_ref()? {
        ip_address::Ip::Ipv4(v4) => std::net::IpAddr::from(v4.to_be_bytes()),
        ip_address::Ip::Ipv6(v6) => {
            let bits = (u128::from(v6.first) << 64) | u128::from(v6.last);
            std::net::IpAddr::from(bits.to_be_bytes())
        }
    };
    Some(std::net::SocketAddr::new(
        ip,
        u16::try_from(addr.port).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::{parse_document, MeshObject, ParsedDocument};

    const PROFILE: &str = r#"
apiVersion: linkerd.io/v1alpha2
kind: ServiceProfile
metadata: {name: web.shop.svc.cluster.local, namespace: shop}
spec:
  retryBudget: {retryRatio: 0.25, minRetriesPerSecond: 7, ttl: 20s}
  dstOverrides:
  - {authority: web-v2.shop.svc.cluster.local:80, weight: 500m}
  - {authority: web.shop.svc.cluster.local:80, weight: 500m}
  routes:
  - name: GET /orders/{id}
    condition:
      all:
      - method: GET
      - pathRegex: /orders/[^/]+
    responseClasses:
    - condition: {status: {min: 500, max: 504}}
      isFailure: true
    - condition: {not: {status: {min: 200, max: 299}}}
      isFailure: false
    isRetryable: true
    timeout: 300ms
  - name: any PURGE
    condition:
      any:
      - method: PURGE
      - not: {pathRegex: /x}
"#;

    fn table() -> RouteTable {
        let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(PROFILE).expect("yaml");
        match parse_document(&doc, "default") {
            ParsedDocument::Valid {
                object: MeshObject::ServiceProfile(p),
                ..
            } => (*p.table).clone(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_profile_survives_the_round_trip() {
        let table = table();
        let proto = profile_to_proto(&table, "web.shop.svc.cluster.local", false);
        assert_eq!(proto.routes[0].metrics_labels["route"], "GET /orders/{id}");
        assert_eq!(proto.dst_overrides[0].weight, 500);
        assert_eq!(
            proto.routes[0].timeout,
            Some(prost_types::Duration {
                seconds: 0,
                nanos: 300_000_000
            })
        );
        let back = profile_from_proto(&proto).expect("valid");
        assert_eq!(back, table);
        let route = back.route_for("GET", "/orders/12");
        assert_eq!(&**route.name(), "GET /orders/{id}");
        assert!(route.classify(503, None));
        assert!(!route.classify(404, None));
        assert_eq!(&**back.route_for("PURGE", "/x").name(), "any PURGE");
    }

    #[test]
    fn bad_profiles_name_the_field() {
        let mut proto = profile_to_proto(&table(), "", false);
        proto.routes[0].response_classes[0].condition = Some(api::ResponseMatch {
            r#match: Some(api::response_match::Match::Status(api::HttpStatusRange {
                min: 600,
                max: 700,
            })),
        });
        let error = profile_from_proto(&proto).expect_err("invalid");
        assert_eq!(
            error.field,
            "routes[0].response_classes[0].condition.status"
        );
        let mut proto = profile_to_proto(&table(), "", false);
        proto.routes[1].condition = Some(api::RequestMatch {
            r#match: Some(api::request_match::Match::Path(api::PathMatch {
                regex: "(".into(),
            })),
        });
        let error = profile_from_proto(&proto).expect_err("invalid");
        assert_eq!(error.field, "routes[1].condition.path");
    }

    #[test]
    fn addresses_convert_both_ways() {
        for addr in ["10.1.2.3:8080", "[fd00::1:2]:443"] {
            let addr: std::net::SocketAddr = addr.parse().expect("addr");
            assert_eq!(socket_addr(&tcp_address(addr)), Some(addr));
        }
    }
}
