//! Label sets: the target labels every HTTP and TCP series carries, the
//! response classification, and the label sets of the individual families.

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder};

/// Which side of the proxy the traffic went through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Traffic to the workload (`direction="inbound"`).
    Inbound,
    /// Traffic from the workload (`direction="outbound"`).
    Outbound,
}

impl Direction {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// The TLS status of a connection, as Linkerd labels it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Tls {
    /// TLS whose peer identity isn't named in the labels: `tls="true"`.
    Secured,
    /// Mesh TLS from a client with this identity (inbound): `tls="true"`, `client_id`.
    ClientId(Arc<str>),
    /// Mesh TLS to a server with this identity (outbound): `tls="true"`, `server_id`.
    ServerId(Arc<str>),
    /// No identity: `tls="no_identity"` plus `no_tls_reason="<reason>"`, e.g.
    /// `"not_provided_by_service_discovery"` or `"no_tls_from_remote"`.
    NoIdentity(&'static str),
}

impl Tls {
    /// `tls` and `client_id` / `server_id` / `no_tls_reason`.
    pub(crate) fn encode(&self, encoder: &mut LabelSetEncoder) -> std::fmt::Result {
        match self {
            Tls::Secured => label(encoder, "tls", "true"),
            Tls::ClientId(id) => {
                label(encoder, "tls", "true")?;
                label(encoder, "client_id", &**id)
            }
            Tls::ServerId(id) => {
                label(encoder, "tls", "true")?;
                label(encoder, "server_id", &**id)
            }
            Tls::NoIdentity(reason) => {
                label(encoder, "tls", "no_identity")?;
                label(encoder, "no_tls_reason", *reason)
            }
        }
    }
}

/// The labels of Linkerd's `inbound_{http,tcp}_authz_{allow,deny}_total`: the server (a
/// `policy.linkerd.io` Server, or `kind="default"` named by the default policy) and, for
/// allows, the authorization that let the client in, plus the client's TLS identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AuthzLabels {
    pub target_addr: Arc<str>,
    pub srv_port: u16,
    /// `srv_group`, `srv_kind`, `srv_name`.
    pub server: (Arc<str>, Arc<str>, Arc<str>),
    /// `authz_group`, `authz_kind`, `authz_name`; `None` on denials.
    pub authz: Option<(Arc<str>, Arc<str>, Arc<str>)>,
    pub tls: Tls,
}

impl EncodeLabelSet for AuthzLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> std::fmt::Result {
        label(encoder, "target_addr", &*self.target_addr)?;
        label(encoder, "srv_group", &*self.server.0)?;
        label(encoder, "srv_kind", &*self.server.1)?;
        label(encoder, "srv_name", &*self.server.2)?;
        label(encoder, "srv_port", self.srv_port)?;
        if let Some((group, kind, name)) = &self.authz {
            label(encoder, "authz_group", &**group)?;
            label(encoder, "authz_kind", &**kind)?;
            label(encoder, "authz_name", &**name)?;
        }
        self.tls.encode(encoder)
    }
}

/// Which side of the proxy a TCP connection faces, as Linkerd labels it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Peer {
    /// A connection the proxy accepted from a client: `peer="src"`.
    Src,
    /// A connection the proxy opened to an endpoint: `peer="dst"`.
    Dst,
}

impl Peer {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Peer::Src => "src",
            Peer::Dst => "dst",
        }
    }
}

/// The labels that identify a target (a logical destination, a route's
/// endpoint, an inbound server...). Resolve them once into an
/// [`HttpTarget`](crate::HttpTarget) or [`TcpTarget`](crate::TcpTarget).
///
/// Optional labels are omitted from the exposition when `None`.
///
/// The values end up verbatim (escaped) in the exposition: the caller keeps
/// their cardinality bounded (e.g. an `authority` taken from a `Host` header
/// should be one the proxy knows).
/// A destination's labels as a control plane names them (`pod`, `deployment`, ...), sorted by
/// name; each is encoded as `dst_<name>`.
pub type DstLabels = Arc<[(Arc<str>, Arc<str>)]>;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TargetLabels {
    /// `direction`.
    pub direction: Direction,
    /// `peer`, on TCP connection metrics (`None` for HTTP targets).
    pub peer: Option<Peer>,
    /// `authority`, e.g. `web.default.svc.cluster.local:80`.
    pub authority: Arc<str>,
    /// `target_addr`, e.g. `127.0.0.1:8080`.
    pub target_addr: Arc<str>,
    /// `tls` and, for [`Tls::NoIdentity`], `no_tls_reason`.
    pub tls: Tls,
    /// `dst_service` (outbound, when known).
    pub dst_service: Option<Arc<str>>,
    /// `dst_namespace` (outbound, when known).
    pub dst_namespace: Option<Arc<str>>,
    /// The rest of the destination's labels, as a control plane names them (`pod`,
    /// `deployment`, `serviceaccount`, ...), each encoded as `dst_<name>`.
    pub dst_labels: Option<DstLabels>,
    /// `srv_port` (inbound server port, when known).
    pub srv_port: Option<u16>,
}

impl TargetLabels {
    /// Labels with the required fields set and every optional one `None`.
    pub fn new(
        direction: Direction,
        authority: impl Into<Arc<str>>,
        target_addr: impl Into<Arc<str>>,
        tls: Tls,
    ) -> Self {
        Self {
            direction,
            peer: None,
            authority: authority.into(),
            target_addr: target_addr.into(),
            tls,
            dst_service: None,
            dst_namespace: None,
            dst_labels: None,
            srv_port: None,
        }
    }

    /// Sets `peer` (TCP connection metrics).
    pub fn with_peer(mut self, peer: Peer) -> Self {
        self.peer = Some(peer);
        self
    }

    /// Sets `dst_service`.
    pub fn with_dst_service(mut self, service: impl Into<Arc<str>>) -> Self {
        self.dst_service = Some(service.into());
        self
    }

    /// Sets `dst_namespace`.
    pub fn with_dst_namespace(mut self, namespace: impl Into<Arc<str>>) -> Self {
        self.dst_namespace = Some(namespace.into());
        self
    }

    /// Sets `srv_port`.
    pub fn with_srv_port(mut self, port: u16) -> Self {
        self.srv_port = Some(port);
        self
    }
}

/// Encodes one `key="value"` label.
pub(crate) fn label(
    encoder: &mut LabelSetEncoder,
    key: &str,
    value: impl prometheus_client::encoding::EncodeLabelValue,
) -> std::fmt::Result {
    (key, value).encode(encoder.encode_label())
}

impl EncodeLabelSet for TargetLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> std::fmt::Result {
        label(encoder, "direction", self.direction.as_str())?;
        if let Some(peer) = self.peer {
            label(encoder, "peer", peer.as_str())?;
        }
        label(encoder, "authority", &*self.authority)?;
        label(encoder, "target_addr", &*self.target_addr)?;
        self.tls.encode(encoder)?;
        if let Some(port) = self.srv_port {
            label(encoder, "srv_port", port)?;
        }
        if let Some(ns) = &self.dst_namespace {
            label(encoder, "dst_namespace", &**ns)?;
        }
        if let Some(svc) = &self.dst_service {
            label(encoder, "dst_service", &**svc)?;
        }
        for (name, value) in self.dst_labels.iter().flat_map(|l| l.iter()) {
            label(encoder, &format!("dst_{name}"), &**value)?;
        }
        Ok(())
    }
}

/// The labels of a route: `direction`, `dst` (the authority the route belongs to, or for
/// `route_actual_*` the backend the attempt went to) and `rt_route` (the route's name,
/// `[DEFAULT]` for unmatched requests), as Linkerd labels its `route_*` series.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RouteLabels {
    /// `direction`.
    pub direction: Direction,
    /// `dst`, e.g. `web.default.svc.cluster.local:80`.
    pub dst: Arc<str>,
    /// `rt_route`.
    pub route: Arc<str>,
}

impl EncodeLabelSet for RouteLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> std::fmt::Result {
        label(encoder, "direction", self.direction.as_str())?;
        label(encoder, "dst", &*self.dst)?;
        label(encoder, "rt_route", &*self.route)
    }
}

/// A label set that identifies what an HTTP handle records for: a target ([`TargetLabels`])
/// or a route ([`RouteLabels`]).
pub trait HandleLabels:
    EncodeLabelSet + Clone + std::fmt::Debug + Eq + std::hash::Hash + Send + Sync + 'static
{
}

impl HandleLabels for TargetLabels {}
impl HandleLabels for RouteLabels {}

/// A shared label set as a family key (a local type, so it can implement prometheus-client's
/// traits).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct TargetKey<L = TargetLabels>(pub(crate) Arc<L>);

impl<L: EncodeLabelSet> EncodeLabelSet for TargetKey<L> {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> std::fmt::Result {
        self.0.encode(encoder)
    }
}

/// Whether a response counts as a success or a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Classification {
    /// `classification="success"`.
    Success,
    /// `classification="failure"`.
    Failure,
}

impl Classification {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Classification::Success => "success",
            Classification::Failure => "failure",
        }
    }

    /// `true` for [`Classification::Success`].
    pub fn is_success(self) -> bool {
        self == Classification::Success
    }
}

/// The classification rule shared by metrics, tap and the access log:
/// a response is a failure when the proxy made it (`error` is present), when
/// its status is 5xx, or when it carried a `grpc-status` other than 0 (OK);
/// otherwise a success.
pub fn classify(
    status: Option<u16>,
    grpc_status: Option<u32>,
    error: Option<&'static str>,
) -> Classification {
    let failed =
        error.is_some() || status.is_some_and(|s| s >= 500) || grpc_status.is_some_and(|g| g != 0);
    if failed {
        Classification::Failure
    } else {
        Classification::Success
    }
}

/// `response_total` labels: target + classification + status_code +
/// grpc_status + error (the optional ones omitted when absent).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ResponseLabels<L = TargetLabels> {
    pub(crate) target: Arc<L>,
    pub(crate) key: ResponseKey,
}

/// What distinguishes one response series of a target from another. The classification is
/// part of the key because a route's response classes may call, say, a 429 a failure where
/// the default rule says success.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ResponseKey {
    pub(crate) status: Option<u16>,
    pub(crate) grpc_status: Option<u32>,
    pub(crate) error: Option<&'static str>,
    pub(crate) classification: Classification,
}

impl<L: EncodeLabelSet> EncodeLabelSet for ResponseLabels<L> {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> std::fmt::Result {
        self.target.encode(encoder)?;
        label(encoder, "classification", self.key.classification.as_str())?;
        if let Some(status) = self.key.status {
            label(encoder, "status_code", status)?;
        }
        if let Some(grpc) = self.key.grpc_status {
            label(encoder, "grpc_status", grpc)?;
        }
        if let Some(error) = self.key.error {
            label(encoder, "error", error)?;
        }
        Ok(())
    }
}

/// `response_latency_ms` labels: target + classification + status_code.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct LatencyLabels<L = TargetLabels> {
    pub(crate) target: Arc<L>,
    pub(crate) classification: Classification,
    pub(crate) status: Option<u16>,
}

impl<L: EncodeLabelSet> EncodeLabelSet for LatencyLabels<L> {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> std::fmt::Result {
        self.target.encode(encoder)?;
        label(encoder, "classification", self.classification.as_str())?;
        if let Some(status) = self.status {
            label(encoder, "status_code", status)?;
        }
        Ok(())
    }
}

/// `route_retry_skipped_total` labels: route + reason.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct SkippedLabels {
    pub(crate) route: Arc<RouteLabels>,
    pub(crate) reason: &'static str,
}

impl EncodeLabelSet for SkippedLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> std::fmt::Result {
        self.route.encode(encoder)?;
        label(encoder, "reason", self.reason)
    }
}

/// `tcp_close_total` / `tcp_connection_duration_ms` labels: target + errno
/// (`errno=""` for a clean close, as Linkerd does).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct CloseLabels {
    pub(crate) target: Arc<TargetLabels>,
    pub(crate) errno: Option<&'static str>,
}

impl EncodeLabelSet for CloseLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> std::fmt::Result {
        self.target.encode(encoder)?;
        label(encoder, "errno", self.errno.unwrap_or(""))
    }
}

/// `proxy_warnings_total` labels.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct EventLabels {
    pub(crate) event: &'static str,
}

impl EncodeLabelSet for EventLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> std::fmt::Result {
        label(encoder, "event", self.event)
    }
}

/// `proxy_build_info` labels.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct BuildLabels {
    pub(crate) version: &'static str,
}

impl EncodeLabelSet for BuildLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> std::fmt::Result {
        label(encoder, "version", self.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Case = (
        Option<u16>,
        Option<u32>,
        Option<&'static str>,
        Classification,
    );

    #[test]
    fn classification_table() {
        use Classification::{Failure, Success};
        let cases: &[Case] = &[
            (Some(200), None, None, Success),
            (Some(204), None, None, Success),
            (Some(302), None, None, Success),
            (Some(404), None, None, Success),
            (Some(499), None, None, Success),
            (Some(500), None, None, Failure),
            (Some(503), None, None, Failure),
            (Some(599), None, None, Failure),
            (Some(200), Some(0), None, Success),
            (Some(200), Some(2), None, Failure),
            (Some(200), Some(14), None, Failure),
            (Some(500), Some(0), None, Failure),
            (None, Some(0), None, Success),
            (None, None, None, Success),
            (Some(504), None, Some("response_timeout"), Failure),
            (Some(403), None, Some("unauthorized"), Failure),
            (Some(200), None, Some("weird"), Failure),
            (None, None, Some("connection_reset"), Failure),
        ];
        for &(status, grpc, error, want) in cases {
            assert_eq!(
                classify(status, grpc, error),
                want,
                "status={status:?} grpc={grpc:?} error={error:?}"
            );
        }
        assert_eq!(Success.as_str(), "success");
        assert_eq!(Failure.as_str(), "failure");
        assert!(Success.is_success() && !Failure.is_success());
    }
}
