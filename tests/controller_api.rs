//! `pylon-controller` speaks Linkerd's proxy API: a client generated from `linkerd2-proxy-api`
//! (what a stock linkerd2-proxy runs) subscribes and every field it reads is checked. The
//! controller here is fed by a config dir, so the files are the cluster; the Kubernetes source
//! is tested in `controller_kube.rs`.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use linkerd2_proxy_api::destination::{
    destination_client::DestinationClient, protocol_hint, tls_identity, update, GetDestination,
    Update, WeightedAddr,
};
use linkerd2_proxy_api::inbound::{
    authn, inbound_server_policies_client::InboundServerPoliciesClient, proxy_protocol, PortSpec,
};
use pylon_controller::mesh::MeshConfig;
use pylon_controller::policy::PolicyDefaults;
use pylon_controller::{Controller, ControllerConfig, MeshSource};
use pylon_proxy_policy::proto::socket_addr;
use tonic::Streaming;

/// A guard against a hang, not a timing assertion: updates arrive in milliseconds.
const WAIT: Duration = Duration::from_secs(10);

const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata:
  name: web-7d4b9c-aaaaa
  namespace: shop
  labels: {app: web, pod-template-hash: 7d4b9c}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-7d4b9c, uid: u1, controller: true}]
spec:
  serviceAccountName: web
  containers: [{name: app}, {name: pylon-proxy}]
status:
  phase: Running
  podIP: 10.0.0.1
  conditions: [{type: Ready, status: "True"}]
---
apiVersion: v1
kind: Pod
metadata:
  name: legacy-0
  namespace: shop
  labels: {app: web}
  ownerReferences: [{apiVersion: apps/v1, kind: StatefulSet, name: legacy, uid: u2, controller: true}]
spec:
  containers: [{name: app}]
status:
  phase: Running
  podIP: 10.0.0.2
  conditions: [{type: Ready, status: "True"}]
"#;

fn slice(ips: &[(&str, &str)]) -> String {
    let mut s = String::from(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-abc\n  namespace: shop\n  labels: {kubernetes.io/service-name: web}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n",
    );
    for (ip, pod) in ips {
        s.push_str(&format!(
            "- addresses: [\"{ip}\"]\n  zone: zone-a\n  targetRef: {{kind: Pod, name: {pod}, namespace: shop}}\n"
        ));
    }
    s
}

const PROFILE: &str = r#"
apiVersion: linkerd.io/v1alpha2
kind: ServiceProfile
metadata: {name: web.shop.svc.cluster.local, namespace: shop}
spec:
  retryBudget: {retryRatio: 0.5, minRetriesPerSecond: 3, ttl: 15s}
  routes:
  - name: GET /orders/{id}
    condition: {method: GET, pathRegex: '/orders/[^/]+'}
    isRetryable: true
    timeout: 250ms
    responseClasses:
    - condition: {status: {min: 500, max: 599}}
      isFailure: true
---
apiVersion: v1
kind: Service
metadata: {name: web-v2, namespace: shop}
spec:
  clusterIP: 10.96.0.11
  ports: [{name: http, port: 80}]
---
apiVersion: split.smi-spec.io/v1alpha2
kind: TrafficSplit
metadata: {name: web-split, namespace: shop}
spec:
  service: web
  backends: [{service: web, weight: 900}, {service: web-v2, weight: 100}]
"#;

fn write(dir: &Path, name: &str, content: &str) {
    // Write then rename, so the watcher never reads half a file.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, content).expect("write");
    std::fs::rename(&tmp, dir.join(name)).expect("rename");
}

async fn controller(dir: &Path) -> Controller {
    Controller::start(ControllerConfig {
        source: MeshSource::ConfigDir(dir.to_path_buf()),
        cluster_domain: "cluster.local".into(),
        default_namespace: "default".into(),
        mesh: MeshConfig::default(),
        policy: PolicyDefaults::default(),
        destination_addr: "127.0.0.1:0".parse().expect("addr"),
        policy_addr: "127.0.0.1:0".parse().expect("addr"),
        identity: None,
        webhook: None,
        admin_addr: "127.0.0.1:0".parse().expect("addr"),
    })
    .await
    .expect("controller starts")
}

async fn client(c: &Controller) -> DestinationClient<tonic::transport::Channel> {
    DestinationClient::connect(format!("http://{}", c.destination_addr))
        .await
        .expect("connect")
}

/// The stream's next message.
async fn message<T>(stream: &mut Streaming<T>) -> T {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("a message in time")
        .expect("stream ok")
        .expect("stream open")
}

async fn next(stream: &mut Streaming<Update>) -> update::Update {
    message(stream).await.update.expect("update set")
}

async fn get(c: &Controller, path: &str) -> Streaming<Update> {
    client(c)
        .await
        .get(GetDestination {
            scheme: "k8s".into(),
            path: path.into(),
            context_token: r#"{"ns":"shop"}"#.into(),
        })
        .await
        .expect("Get")
        .into_inner()
}

fn by_addr(addrs: &[WeightedAddr]) -> HashMap<String, &WeightedAddr> {
    addrs
        .iter()
        .map(|a| {
            let addr = a.addr.as_ref().and_then(socket_addr).expect("address");
            (addr.to_string(), a)
        })
        .collect()
}

fn labels(a: &WeightedAddr) -> Vec<(String, String)> {
    let mut l: Vec<_> = a.metric_labels.clone().into_iter().collect();
    l.sort();
    l
}

fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn get_streams_endpoints_with_linkerds_labels_identity_and_hints() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "web.yaml", WEB);
    write(
        dir.path(),
        "slice.yaml",
        &slice(&[("10.0.0.1", "web-7d4b9c-aaaaa"), ("10.0.0.2", "legacy-0")]),
    );
    let c = controller(dir.path()).await;
    let mut stream = get(&c, "web.shop.svc.cluster.local:80").await;

    let update::Update::Add(set) = next(&mut stream).await else {
        panic!("the first update adds every endpoint")
    };
    let mut set_labels: Vec<_> = set.metric_labels.clone().into_iter().collect();
    set_labels.sort();
    assert_eq!(
        set_labels,
        pairs(&[("namespace", "shop"), ("service", "web")])
    );
    let addrs = by_addr(&set.addrs);
    assert_eq!(addrs.len(), 2);
    let meshed = addrs["10.0.0.1:8080"];
    assert_eq!(
        labels(meshed),
        pairs(&[
            ("deployment", "web"),
            ("pod", "web-7d4b9c-aaaaa"),
            ("pod_template_hash", "7d4b9c"),
            ("serviceaccount", "web"),
            ("zone", "zone-a"),
        ])
    );
    assert_eq!(meshed.weight, 10_000);
    let id = meshed
        .tls_identity
        .as_ref()
        .expect("a meshed endpoint has an identity");
    let expected = "web.shop.serviceaccount.identity.pylon.cluster.local";
    assert_eq!(
        id.strategy,
        Some(tls_identity::Strategy::DnsLikeIdentity(
            tls_identity::DnsLikeIdentity {
                name: expected.into()
            }
        ))
    );
    assert_eq!(
        id.server_name.as_ref().map(|n| n.name.as_str()),
        Some(expected)
    );
    let hint = meshed
        .protocol_hint
        .as_ref()
        .expect("meshed: a protocol hint");
    assert_eq!(
        hint.protocol,
        Some(protocol_hint::Protocol::H2(protocol_hint::H2 {}))
    );
    assert_eq!(hint.opaque_transport, None);

    let plain = addrs["10.0.0.2:8080"];
    assert_eq!(
        labels(plain),
        pairs(&[
            ("pod", "legacy-0"),
            ("serviceaccount", "default"),
            ("statefulset", "legacy"),
            ("zone", "zone-a"),
        ])
    );
    assert_eq!(plain.tls_identity, None, "no proxy, no identity");
    assert_eq!(plain.protocol_hint, None);

    // One endpoint leaves: a Remove naming it, nothing else.
    write(
        dir.path(),
        "slice.yaml",
        &slice(&[("10.0.0.1", "web-7d4b9c-aaaaa")]),
    );
    let update::Update::Remove(removed) = next(&mut stream).await else {
        panic!("a removal")
    };
    let removed: Vec<_> = removed.addrs.iter().filter_map(socket_addr).collect();
    assert_eq!(removed, ["10.0.0.2:8080".parse().expect("addr")]);

    // It comes back: an Add with it alone.
    write(
        dir.path(),
        "slice.yaml",
        &slice(&[("10.0.0.1", "web-7d4b9c-aaaaa"), ("10.0.0.2", "legacy-0")]),
    );
    let update::Update::Add(set) = next(&mut stream).await else {
        panic!("an addition")
    };
    assert_eq!(
        by_addr(&set.addrs).keys().collect::<Vec<_>>(),
        ["10.0.0.2:8080"]
    );

    // The service is deleted: the proxy may fall back to DNS.
    std::fs::remove_file(dir.path().join("web.yaml")).expect("rm");
    assert_eq!(
        next(&mut stream).await,
        update::Update::NoEndpoints(linkerd2_proxy_api::destination::NoEndpoints { exists: false })
    );
}

#[tokio::test]
async fn unknown_and_empty_destinations_say_whether_they_exist() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "web.yaml", WEB);
    write(dir.path(), "slice.yaml", &slice(&[]));
    let c = controller(dir.path()).await;
    let mut unknown = get(&c, "nope.shop.svc.cluster.local:80").await;
    assert_eq!(
        next(&mut unknown).await,
        update::Update::NoEndpoints(linkerd2_proxy_api::destination::NoEndpoints { exists: false })
    );
    let mut empty = get(&c, "web.shop.svc.cluster.local:80").await;
    assert_eq!(
        next(&mut empty).await,
        update::Update::NoEndpoints(linkerd2_proxy_api::destination::NoEndpoints { exists: true })
    );
    // An endpoint appears: the empty destination's stream adds it.
    write(
        dir.path(),
        "slice.yaml",
        &slice(&[("10.0.0.1", "web-7d4b9c-aaaaa")]),
    );
    assert!(matches!(next(&mut empty).await, update::Update::Add(_)));
    // By cluster IP, the same service.
    let mut by_ip = get(&c, "10.96.0.10:80").await;
    let update::Update::Add(set) = next(&mut by_ip).await else {
        panic!("the cluster IP resolves to the service")
    };
    assert_eq!(
        by_addr(&set.addrs).keys().collect::<Vec<_>>(),
        ["10.0.0.1:8080"]
    );
    // By a pod's own IP: that pod, with its identity.
    let mut pod = get(&c, "10.0.0.1:8080").await;
    let update::Update::Add(set) = next(&mut pod).await else {
        panic!("a pod IP resolves to the pod")
    };
    assert_eq!(set.addrs.len(), 1);
    assert!(set.addrs[0].tls_identity.is_some());
    // Garbage is refused, not crashed on.
    let refused = client(&c)
        .await
        .get(GetDestination {
            path: "not a host:port".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(
        refused.expect_err("invalid").code(),
        tonic::Code::InvalidArgument
    );
}

#[tokio::test]
async fn get_profile_streams_routes_budget_and_split() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "web.yaml", WEB);
    write(
        dir.path(),
        "slice.yaml",
        &slice(&[("10.0.0.1", "web-7d4b9c-aaaaa")]),
    );
    write(dir.path(), "profile.yaml", PROFILE);
    let c = controller(dir.path()).await;
    let mut stream = client(&c)
        .await
        .get_profile(GetDestination {
            scheme: "k8s".into(),
            path: "web.shop.svc.cluster.local:80".into(),
            context_token: String::new(),
        })
        .await
        .expect("GetProfile")
        .into_inner();
    let profile = message(&mut stream).await;
    assert_eq!(profile.fully_qualified_name, "web.shop.svc.cluster.local");
    assert!(!profile.opaque_protocol);
    assert_eq!(profile.routes.len(), 1);
    let route = &profile.routes[0];
    assert_eq!(route.metrics_labels["route"], "GET /orders/{id}");
    assert!(route.is_retryable);
    assert_eq!(
        route.timeout,
        Some(prost_types::Duration {
            seconds: 0,
            nanos: 250_000_000
        })
    );
    assert_eq!(route.response_classes.len(), 1);
    assert!(route.response_classes[0].is_failure);
    let budget = profile.retry_budget.as_ref().expect("budget");
    assert_eq!(
        (budget.retry_ratio, budget.min_retries_per_second),
        (0.5, 3)
    );
    assert_eq!(
        budget.ttl,
        Some(prost_types::Duration {
            seconds: 15,
            nanos: 0
        })
    );
    let overrides: Vec<_> = profile
        .dst_overrides
        .iter()
        .map(|d| (d.authority.as_str(), d.weight))
        .collect();
    assert_eq!(
        overrides,
        [
            ("web.shop.svc.cluster.local:80", 900_000),
            ("web-v2.shop.svc.cluster.local:80", 100_000)
        ]
    );
    // The round trip a Pylon proxy makes gives back the same routes.
    let table = pylon_proxy_policy::proto::profile_from_proto(&profile).expect("valid");
    assert_eq!(
        &**table.route_for("GET", "/orders/7").name(),
        "GET /orders/{id}"
    );

    // The profile changes: the stream sends the new one.
    write(
        dir.path(),
        "profile.yaml",
        &PROFILE.replace("timeout: 250ms", "timeout: 2s"),
    );
    let profile = message(&mut stream).await;
    assert_eq!(
        profile.routes[0].timeout,
        Some(prost_types::Duration {
            seconds: 2,
            nanos: 0
        })
    );
}

const POLICY: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  annotations: {config.linkerd.io/default-inbound-policy: cluster-authenticated}
---
apiVersion: policy.linkerd.io/v1beta3
kind: Server
metadata: {name: web-http, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  port: 8080
  proxyProtocol: HTTP/1
---
apiVersion: policy.linkerd.io/v1alpha1
kind: MeshTLSAuthentication
metadata: {name: gateway, namespace: shop}
spec:
  identityRefs: [{kind: ServiceAccount, name: gateway, namespace: edge}]
"#;

const AUTHZ: &str = r#"
apiVersion: policy.linkerd.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: from-gateway, namespace: shop}
spec:
  targetRef: {group: policy.linkerd.io, kind: Server, name: web-http}
  requiredAuthenticationRefs:
  - {group: policy.linkerd.io, kind: MeshTLSAuthentication, name: gateway}
"#;

#[tokio::test]
async fn watch_port_streams_the_ports_server_and_authorizations() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "web.yaml", WEB);
    write(dir.path(), "policy.yaml", POLICY);
    write(dir.path(), "authz.yaml", AUTHZ);
    let c = controller(dir.path()).await;
    let mut client = InboundServerPoliciesClient::connect(format!("http://{}", c.policy_addr))
        .await
        .expect("connect");
    let spec = |port| PortSpec {
        workload: r#"{"ns":"shop","pod":"web-7d4b9c-aaaaa"}"#.into(),
        port,
    };
    let mut stream = client
        .watch_port(spec(8080))
        .await
        .expect("WatchPort")
        .into_inner();
    let server = message(&mut stream).await;
    assert_eq!(server.labels["name"], "web-http");
    assert_eq!(server.labels["kind"], "server");
    assert!(matches!(
        server.protocol.as_ref().and_then(|p| p.kind.as_ref()),
        Some(proxy_protocol::Kind::Http1(h)) if h.routes.len() == 1
    ));
    assert_eq!(
        server.authorizations.len(),
        1,
        "the policy; no accessPolicy means deny"
    );
    let authz = &server.authorizations[0];
    assert_eq!(authz.labels["name"], "from-gateway");
    let Some(authn::Permit::MeshTls(mtls)) =
        authz.authentication.as_ref().and_then(|a| a.permit.clone())
    else {
        panic!("mesh TLS required")
    };
    let Some(authn::permit_mesh_tls::Clients::Identities(ids)) = mtls.clients else {
        panic!("by identity")
    };
    assert_eq!(ids.identities.len(), 1);
    assert_eq!(
        ids.identities[0].name,
        "gateway.edge.serviceaccount.identity.pylon.cluster.local"
    );
    assert_eq!(server.server_ips.len(), 1);

    // The policy goes: the stream says so.
    std::fs::remove_file(dir.path().join("authz.yaml")).expect("rm");
    let server = message(&mut stream).await;
    assert!(
        server.authorizations.is_empty(),
        "{:?}",
        server.authorizations
    );

    // A port no Server selects: the namespace's default policy.
    let other = client
        .get_port(spec(9000))
        .await
        .expect("GetPort")
        .into_inner();
    assert_eq!(other.labels["kind"], "default");
    assert_eq!(other.labels["name"], "cluster-authenticated");
    // Unknown pods and bad specs are errors, not crashes.
    let missing = client
        .get_port(PortSpec {
            workload: "shop:nope".into(),
            port: 8080,
        })
        .await;
    assert_eq!(
        missing.expect_err("no such pod").code(),
        tonic::Code::NotFound
    );
    let bad = client
        .get_port(PortSpec {
            workload: "garbage".into(),
            port: 8080,
        })
        .await;
    assert_eq!(bad.expect_err("bad").code(), tonic::Code::InvalidArgument);
}
