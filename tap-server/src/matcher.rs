//! Which requests a tap wants: Linkerd's `ObserveRequest.match`, compiled once per tap.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use linkerd2_proxy_api::tap::observe_request::r#match::{self as pb, http as pbhttp, tcp};
use linkerd2_proxy_api::tap::observe_request::Match as PbMatch;

use crate::RequestMeta;

/// A match the tap client asked for that can't be served (INVALID_ARGUMENT).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid tap match: {0}")]
pub struct InvalidMatch(pub String);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Matcher {
    Any,
    All(Vec<Matcher>),
    AnyOf(Vec<Matcher>),
    Not(Box<Matcher>),
    Source(TcpMatch),
    Destination(TcpMatch),
    Method(::http::Method),
    Scheme(String),
    Authority(StringMatch),
    Path(StringMatch),
    DestinationLabel(String, String),
    RouteLabel(String, String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TcpMatch {
    Net(IpNet),
    Ports { min: u16, max: u16 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
}

impl StringMatch {
    fn matches(&self, s: &str) -> bool {
        match self {
            Self::Exact(e) => e == s,
            Self::Prefix(p) => s.starts_with(p.as_str()),
        }
    }
}

impl Matcher {
    /// `None` (no match given) taps everything.
    pub fn compile(m: Option<PbMatch>) -> Result<Self, InvalidMatch> {
        let Some(m) = m.and_then(|m| m.r#match) else {
            return Ok(Self::Any);
        };
        Ok(match m {
            pb::Match::All(seq) => Self::All(compile_all(seq)?),
            pb::Match::Any(seq) => Self::AnyOf(compile_all(seq)?),
            pb::Match::Not(inner) => Self::Not(Box::new(Self::compile(Some(*inner))?)),
            pb::Match::Source(t) => Self::Source(compile_tcp(t)?),
            pb::Match::Destination(t) => Self::Destination(compile_tcp(t)?),
            pb::Match::Http(h) => compile_http(h)?,
            pb::Match::DestinationLabel(l) => Self::DestinationLabel(l.key, l.value),
            pb::Match::RouteLabel(l) => Self::RouteLabel(l.key, l.value),
        })
    }

    pub fn matches(&self, req: &RequestMeta<'_>) -> bool {
        match self {
            Self::Any => true,
            Self::All(ms) => ms.iter().all(|m| m.matches(req)),
            Self::AnyOf(ms) => ms.iter().any(|m| m.matches(req)),
            Self::Not(m) => !m.matches(req),
            Self::Source(t) => t.matches(req.source),
            Self::Destination(t) => t.matches(req.destination),
            Self::Method(m) => req.method == m,
            Self::Scheme(s) => req.scheme.eq_ignore_ascii_case(s),
            Self::Authority(s) => s.matches(req.authority),
            Self::Path(s) => s.matches(req.path),
            Self::DestinationLabel(k, v) => label_is(req.destination_labels, k, v),
            Self::RouteLabel(k, v) => label_is(req.route_labels, k, v),
        }
    }
}

fn label_is(labels: &[(&str, &str)], key: &str, value: &str) -> bool {
    labels.iter().any(|(k, v)| *k == key && *v == value)
}

fn compile_all(seq: pb::Seq) -> Result<Vec<Matcher>, InvalidMatch> {
    seq.matches
        .into_iter()
        .map(|m| Matcher::compile(Some(m)))
        .collect()
}

fn compile_tcp(t: pb::Tcp) -> Result<TcpMatch, InvalidMatch> {
    match t.r#match {
        Some(tcp::Match::Netmask(n)) => {
            let ip =
                n.ip.and_then(|ip| IpAddr::try_from(ip).ok())
                    .ok_or_else(|| InvalidMatch("netmask without a valid IP".into()))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            if n.mask > max {
                return Err(InvalidMatch(format!(
                    "netmask /{} is longer than {max}",
                    n.mask
                )));
            }
            let prefix = u8::try_from(n.mask).unwrap_or(u8::MAX);
            IpNet::new(ip, prefix)
                .map(TcpMatch::Net)
                .map_err(|_| InvalidMatch(format!("netmask /{} is longer than {max}", n.mask)))
        }
        Some(tcp::Match::Ports(p)) => {
            let port = |v: u32| {
                u16::try_from(v).map_err(|_| InvalidMatch(format!("port {v} out of range")))
            };
            let min = port(p.min)?;
            // A range with no maximum is the single port `min`.
            let max = if p.max == 0 { min } else { port(p.max)? };
            if max < min {
                return Err(InvalidMatch(format!("port range {min}-{max} is empty")));
            }
            Ok(TcpMatch::Ports { min, max })
        }
        None => Err(InvalidMatch("empty tcp match".into())),
    }
}

fn compile_http(h: pb::Http) -> Result<Matcher, InvalidMatch> {
    let string = |s: pbhttp::StringMatch| match s.r#match {
        Some(pbhttp::string_match::Match::Exact(e)) => Ok(StringMatch::Exact(e)),
        Some(pbhttp::string_match::Match::Prefix(p)) => Ok(StringMatch::Prefix(p)),
        None => Err(InvalidMatch("empty string match".into())),
    };
    match h.r#match {
        Some(pbhttp::Match::Method(m)) => ::http::Method::try_from(m)
            .map(Matcher::Method)
            .map_err(|e| InvalidMatch(format!("method: {e}"))),
        Some(pbhttp::Match::Scheme(s)) => {
            let scheme = ::http::uri::Scheme::try_from(s)
                .map_err(|e| InvalidMatch(format!("scheme: {e}")))?;
            Ok(Matcher::Scheme(scheme.as_str().to_owned()))
        }
        Some(pbhttp::Match::Authority(s)) => Ok(Matcher::Authority(string(s)?)),
        Some(pbhttp::Match::Path(s)) => Ok(Matcher::Path(string(s)?)),
        None => Err(InvalidMatch("empty http match".into())),
    }
}

impl TcpMatch {
    fn matches(&self, addr: Option<SocketAddr>) -> bool {
        let Some(addr) = addr else { return false };
        match self {
            Self::Ports { min, max } => (*min..=*max).contains(&addr.port()),
            // A v4 client on a dual-stack listener arrives as ::ffff:a.b.c.d.
            Self::Net(net) => net.contains(&addr.ip().to_canonical()),
        }
    }
}
