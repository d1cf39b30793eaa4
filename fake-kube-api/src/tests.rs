//! End-to-end tests through kube-rs's real client, from a generated kubeconfig.
//! Timeouts are failure guards only; every assertion follows from the event order.

use super::*;
use futures_util::{Stream, StreamExt};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams};
use kube::api::{PostParams, VersionMatch, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::discovery::Scope;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Config, ResourceExt};

const GUARD: Duration = Duration::from_secs(5);

async fn setup() -> (FakeApiServer, Client, tempfile::TempDir) {
    let server = FakeApiServer::start().await.unwrap();
    server.register_mesh_kinds();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    server.write_kubeconfig(&path).unwrap();
    let kubeconfig = Kubeconfig::read_from(&path).unwrap();
    let options = KubeConfigOptions::default();
    let config = Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .unwrap();
    (server, Client::try_from(config).unwrap(), dir)
}

fn service(ns: &str, name: &str, tier: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": ns, "labels": {"tier": tier}},
           "spec": {"ports": [{"port": 80}]}})
}

fn slice(name: &str) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": name, "namespace": "default"},
           "addressType": "IPv4", "endpoints": [{"addresses": ["10.0.0.1"]}]})
}

fn count(server: &FakeApiServer, verb: &str, plural: &str) -> u64 {
    let counts = server.request_counts();
    counts
        .get(&(verb.into(), plural.into()))
        .copied()
        .unwrap_or(0)
}

fn api_error<T>(r: kube::Result<T>) -> (u16, String) {
    match r {
        Err(kube::Error::Api(s)) => (s.code, s.reason),
        Err(e) => panic!("not an API error: {e}"),
        Ok(_) => panic!("expected an error"),
    }
}

async fn list_names(api: &Api<Service>, lp: &ListParams) -> Vec<String> {
    let list = api.list(lp).await.unwrap();
    list.items.iter().map(|o| o.name_any()).collect()
}

type Events<K> = std::pin::Pin<Box<dyn Stream<Item = watcher::Result<watcher::Event<K>>> + Send>>;

/// The next watcher event as "Init", "InitApply(name)", "Apply(name)", ... or "Err(..)".
async fn next<K: ResourceExt>(s: &mut Events<K>) -> String {
    match tokio::time::timeout(GUARD, s.next())
        .await
        .expect("an event within 5s")
    {
        Some(Ok(e)) => e.to_string(),
        Some(Err(e)) => format!("Err({e})"),
        None => "End".into(),
    }
}

async fn take<K: ResourceExt>(s: &mut Events<K>, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(next(s).await);
    }
    out
}

/// A raw watch event as "ADDED name", "BOOKMARK rv", ...
async fn next_raw<S>(s: &mut S) -> String
where
    S: Stream<Item = kube::Result<WatchEvent<Service>>> + Unpin,
{
    match tokio::time::timeout(GUARD, s.next())
        .await
        .expect("an event within 5s")
    {
        Some(Ok(WatchEvent::Added(o))) => format!("ADDED {}", o.name_any()),
        Some(Ok(WatchEvent::Modified(o))) => format!("MODIFIED {}", o.name_any()),
        Some(Ok(WatchEvent::Deleted(o))) => format!("DELETED {}", o.name_any()),
        Some(Ok(WatchEvent::Bookmark(b))) => format!("BOOKMARK {}", b.metadata.resource_version),
        Some(Ok(WatchEvent::Error(e))) => format!("ERROR {} {}", e.code, e.reason),
        Some(Err(e)) => format!("Err({e})"),
        None => "End".into(),
    }
}

#[tokio::test]
async fn list_paginate_and_write_through_the_client() {
    let (server, client, _dir) = setup().await;
    for i in 0..5 {
        let tier = if i < 2 { "fe" } else { "be" };
        server
            .apply(service("default", &format!("svc-{i}"), tier))
            .unwrap();
    }
    server.apply(service("other", "elsewhere", "fe")).unwrap();
    let api: Api<Service> = Api::namespaced(client.clone(), "default");
    let all = list_names(&api, &ListParams::default()).await;
    assert_eq!(all, ["svc-0", "svc-1", "svc-2", "svc-3", "svc-4"]);
    let fe = list_names(&api, &ListParams::default().labels("tier=fe")).await;
    assert_eq!(fe, ["svc-0", "svc-1"]);
    let everywhere = Api::all(client.clone());
    let lp = ListParams::default().fields("metadata.name=elsewhere");
    assert_eq!(list_names(&everywhere, &lp).await, ["elsewhere"]);

    // Pages come from one snapshot even when objects change between pages.
    let before = server.resource_version().to_string();
    let (mut seen, mut pages, mut token) = (Vec::new(), 0, None::<String>);
    loop {
        let mut lp = ListParams::default().limit(2);
        if let Some(t) = &token {
            lp = lp.continue_token(t);
        }
        let page = api.list(&lp).await.unwrap();
        assert_eq!(page.metadata.resource_version.as_ref(), Some(&before));
        seen.extend(page.items.iter().map(|o| o.name_any()));
        pages += 1;
        if pages == 1 {
            server
                .delete("v1", "Service", Some("default"), "svc-4")
                .unwrap();
            server.apply(service("default", "svc-5", "be")).unwrap();
        }
        token = page.metadata.continue_.filter(|c| !c.is_empty());
        if token.is_none() {
            break;
        }
    }
    assert_eq!((pages, &seen[..]), (3, &all[..]));

    // An exact older resourceVersion is served from history; after compaction it is 410.
    let exact = ListParams::default()
        .at(&before)
        .matching(VersionMatch::Exact);
    assert_eq!(list_names(&api, &exact).await, all);
    let first = api.list(&ListParams::default().limit(2)).await.unwrap();
    server.apply(service("default", "svc-6", "be")).unwrap();
    server.compact(); // etcd keeps the compaction revision itself, so compact past `first`
    let token = first.metadata.continue_.unwrap();
    let expired = api
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await;
    assert_eq!(api_error(expired), (410, "Expired".into()));
    assert_eq!(api_error(api.list(&exact).await).0, 410);

    // Create, conflict, replace with optimistic concurrency, get, delete, over HTTP.
    let svc: Service = serde_json::from_value(service("default", "made", "fe")).unwrap();
    let made = api.create(&PostParams::default(), &svc).await.unwrap();
    assert!(made.metadata.uid.is_some() && made.metadata.creation_timestamp.is_some());
    assert_eq!(
        api_error(api.create(&PostParams::default(), &svc).await).0,
        409
    );
    let mut changed = made.clone();
    changed.labels_mut().insert("changed".into(), "yes".into());
    let replaced = api
        .replace("made", &PostParams::default(), &changed)
        .await
        .unwrap();
    assert_ne!(replaced.resource_version(), made.resource_version());
    let stale = api.replace("made", &PostParams::default(), &made).await;
    assert_eq!(api_error(stale), (409, "Conflict".into()));
    assert_eq!(api.get("made").await.unwrap().labels()["changed"], "yes");
    api.delete("made", &DeleteParams::default()).await.unwrap();
    assert_eq!(api_error(api.get("made").await), (404, "NotFound".into()));

    server.inject_fault("services", Fault::Status(500), 1);
    assert_eq!(api_error(api.list(&ListParams::default()).await).0, 500);
    assert!(api.list(&ListParams::default()).await.is_ok());
}

#[tokio::test]
async fn watcher_lists_then_watches() {
    let (server, client, _dir) = setup().await;
    server.apply(slice("b")).unwrap();
    server.apply(slice("a")).unwrap();
    let mut s: Events<EndpointSlice> = watcher(Api::all(client), Default::default()).boxed();
    assert_eq!(
        take(&mut s, 4).await,
        ["Init", "InitApply(a)", "InitApply(b)", "InitDone"]
    );
    server.apply(slice("c")).unwrap();
    assert_eq!(next(&mut s).await, "Apply(c)");
    server
        .delete("discovery.k8s.io/v1", "EndpointSlice", Some("default"), "a")
        .unwrap();
    assert_eq!(next(&mut s).await, "Delete(a)");
    assert_eq!(count(&server, "list", "endpointslices"), 1);
    assert_eq!(count(&server, "watch", "endpointslices"), 1);
}

#[tokio::test]
async fn watcher_streaming_lists() {
    let (server, client, _dir) = setup().await;
    server.apply(slice("a")).unwrap();
    let config = watcher::Config::default().streaming_lists();
    let mut s: Events<EndpointSlice> = watcher(Api::all(client), config).boxed();
    assert_eq!(take(&mut s, 3).await, ["Init", "InitApply(a)", "InitDone"]);
    server.apply(slice("b")).unwrap();
    assert_eq!(next(&mut s).await, "Apply(b)");
    assert_eq!(count(&server, "list", "endpointslices"), 0);
    assert_eq!(count(&server, "watch", "endpointslices"), 1);
}

#[tokio::test]
async fn compaction_makes_watchers_relist() {
    let (server, client, _dir) = setup().await;
    server.apply(slice("a")).unwrap();
    let api: Api<EndpointSlice> = Api::all(client);
    let mut s: Events<EndpointSlice> = watcher(api.clone(), Default::default()).boxed();
    assert_eq!(take(&mut s, 3).await, ["Init", "InitApply(a)", "InitDone"]);
    server.apply(slice("b")).unwrap();
    assert_eq!(next(&mut s).await, "Apply(b)"); // so the watch is open
    let old_rv = (server.resource_version() - 1).to_string();
    server.compact();
    server.apply(slice("c")).unwrap();

    let events = take(&mut s, 6).await;
    assert!(
        events[0].starts_with("Err(") && events[0].contains("Expired"),
        "{events:?}"
    );
    let relist = [
        "Init",
        "InitApply(a)",
        "InitApply(b)",
        "InitApply(c)",
        "InitDone",
    ];
    assert_eq!(events[1..], relist);
    server.apply(slice("d")).unwrap();
    assert_eq!(next(&mut s).await, "Apply(d)");
    assert_eq!(count(&server, "list", "endpointslices"), 2);

    // A watch from before the compaction gets one ERROR event, then the stream ends.
    let mut raw = api
        .watch(&WatchParams::default(), &old_rv)
        .await
        .unwrap()
        .boxed();
    let first = tokio::time::timeout(GUARD, raw.next()).await.unwrap();
    assert!(matches!(first, Some(Ok(WatchEvent::Error(s))) if s.code == 410));
    assert!(tokio::time::timeout(GUARD, raw.next())
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn watcher_survives_a_restart() {
    let (server, client, _dir) = setup().await;
    server.apply(slice("a")).unwrap();
    let config = watcher::Config::default();
    let mut s: Events<EndpointSlice> = watcher(Api::all(client), config).default_backoff().boxed();
    assert_eq!(take(&mut s, 3).await, ["Init", "InitApply(a)", "InitDone"]);
    server.apply(slice("b")).unwrap();
    assert_eq!(next(&mut s).await, "Apply(b)");

    server.stop().await;
    server.apply(slice("c")).unwrap();
    server.restart().await.unwrap();
    // Connection errors while the watcher backs off, then the change made while down.
    let mut e = next(&mut s).await;
    while e.starts_with("Err(") {
        e = next(&mut s).await;
    }
    assert_eq!(e, "Apply(c)");
    // It resumed the watch from its resourceVersion: no second list was needed.
    assert_eq!(count(&server, "list", "endpointslices"), 1);
}

#[tokio::test]
async fn raw_watches_bookmarks_selectors_and_timeout() {
    let (server, client, _dir) = setup().await;
    server.set_bookmark_interval(None);
    let api: Api<Service> = Api::namespaced(client, "default");
    let rv = server.resource_version().to_string();
    let mut with = api
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    let no_bookmarks = WatchParams::default().disable_bookmarks();
    let mut without = api.watch(&no_bookmarks, &rv).await.unwrap().boxed();
    assert_eq!(server.open_watches(), 2);
    server.bookmark_all();
    assert_eq!(next_raw(&mut with).await, format!("BOOKMARK {rv}"));
    server.apply(service("default", "x", "fe")).unwrap();
    assert_eq!(next_raw(&mut with).await, "ADDED x");
    assert_eq!(next_raw(&mut without).await, "ADDED x");

    // Namespace and label filtering; objects crossing the selector are ADDED / DELETED.
    server.apply(service("default", "y", "be")).unwrap();
    let fe = WatchParams::default().labels("tier=fe").disable_bookmarks();
    let mut w = api.watch(&fe, "0").await.unwrap().boxed();
    assert_eq!(next_raw(&mut w).await, "ADDED x");
    server.apply(service("other", "z", "fe")).unwrap();
    server.apply(service("default", "x", "be")).unwrap();
    server.apply(service("default", "y", "fe")).unwrap();
    let mut y = service("default", "y", "fe");
    y["spec"]["ports"][0]["port"] = 81.into();
    server.apply(y).unwrap();
    let seen = [
        next_raw(&mut w).await,
        next_raw(&mut w).await,
        next_raw(&mut w).await,
    ];
    assert_eq!(seen, ["DELETED x", "ADDED y", "MODIFIED y"]);

    // timeoutSeconds: the stream replays from `rv` and ends cleanly after 1 s.
    let mut short = api
        .watch(&WatchParams::default().timeout(1), &rv)
        .await
        .unwrap()
        .boxed();
    let mut events = Vec::new();
    while let Some(e) = tokio::time::timeout(GUARD, short.next()).await.unwrap() {
        events.push(e.unwrap());
    }
    assert_eq!(events.len(), 5, "{events:?}"); // x, y, x, y, y: z is in another namespace
}

#[tokio::test]
async fn dynamic_objects_and_discovery() {
    let (server, client, _dir) = setup().await;
    let profile = |name: &str| {
        json!({"apiVersion": "linkerd.io/v1alpha2", "kind": "ServiceProfile",
               "metadata": {"name": name, "namespace": "default"}, "spec": {"routes": []}})
    };
    server
        .apply(profile("web.default.svc.cluster.local"))
        .unwrap();
    let gvk = GroupVersionKind::gvk("linkerd.io", "v1alpha2", "ServiceProfile");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "serviceprofiles");
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    assert_eq!(
        api.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
    let mut s: Events<DynamicObject> = watcher(api, Default::default()).boxed();
    let init = [
        "Init",
        "InitApply(web.default.svc.cluster.local)",
        "InitDone",
    ];
    assert_eq!(take(&mut s, 3).await, init);
    server
        .apply(profile("api.default.svc.cluster.local"))
        .unwrap();
    assert_eq!(next(&mut s).await, "Apply(api.default.svc.cluster.local)");

    assert_eq!(
        client.apiserver_version().await.unwrap().git_version,
        "v1.33.0"
    );
    let policy = kube::discovery::group(&client, "policy.linkerd.io")
        .await
        .unwrap();
    let (server_ar, caps) = policy.recommended_kind("Server").unwrap();
    assert_eq!(
        (&server_ar.version[..], &server_ar.plural[..]),
        ("v1beta3", "servers")
    );
    assert_eq!(caps.scope, Scope::Namespaced);
    let core = kube::discovery::group(&client, "").await.unwrap();
    let namespace = core.recommended_kind("Namespace").unwrap();
    assert_eq!(namespace.1.scope, Scope::Cluster);

    let all = kube::Discovery::new(client.clone()).run().await.unwrap();
    for group in ["linkerd.io", "discovery.k8s.io", "authentication.k8s.io"] {
        assert!(all.has_group(group), "{group}");
    }
    let aggregated = kube::Discovery::new(client).run_aggregated().await.unwrap();
    let policy = aggregated.get("policy.linkerd.io").unwrap();
    assert_eq!(policy.preferred_version_or_latest(), "v1beta3");
    // recommended_kind looks only at the preferred version, as against a real cluster.
    let v1alpha1 = policy.versioned_resources("v1alpha1");
    assert!(v1alpha1
        .iter()
        .any(|(ar, _)| ar.kind == "MeshTLSAuthentication"));
    assert!(aggregated
        .get("")
        .unwrap()
        .recommended_kind("Service")
        .is_some());
}

#[tokio::test]
async fn token_review_and_auth() {
    let (server, client, _dir) = setup().await;
    server.add_token("sa-token", "system:serviceaccount:emojivoto:web");
    let api: Api<TokenReview> = Api::all(client);
    let review = |token: &str| TokenReview {
        spec: TokenReviewSpec {
            token: token.into(),
            audiences: None,
        },
        ..Default::default()
    };
    let good = api
        .create(&PostParams::default(), &review("sa-token"))
        .await
        .unwrap();
    let status = good.status.unwrap();
    assert_eq!(status.authenticated, Some(true));
    let user = status.user.unwrap();
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:emojivoto:web")
    );
    assert!(user
        .groups
        .unwrap()
        .contains(&"system:serviceaccounts:emojivoto".into()));
    let bad = api
        .create(&PostParams::default(), &review("nope"))
        .await
        .unwrap();
    assert_eq!(bad.status.unwrap().authenticated, Some(false));
    assert_eq!(count(&server, "create", "tokenreviews"), 2);

    // A wrong bearer token is refused.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut raw = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    let req = "GET /api/v1/services HTTP/1.1\r\nHost: fake\r\n\
               Authorization: Bearer wrong\r\nConnection: close\r\n\r\n";
    raw.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    raw.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");
}
