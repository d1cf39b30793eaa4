//! A fake Kubernetes API server on loopback for Pylon's controller tests and benches.
//!
//! It owns an in-memory object store with a global resourceVersion counter and a bounded event
//! history, and speaks enough of the API server's HTTP protocol that kube-rs's real client and
//! `kube::runtime::watcher` work against it unchanged: discovery (plain and aggregated v2), list
//! with `limit`/`continue`/selectors/`resourceVersionMatch`, watch with replay from a
//! resourceVersion, bookmarks, streaming lists (`sendInitialEvents`), `410 Expired` after
//! compaction, create/replace/delete, TokenReview, and stop/restart on the same port.
//!
//! It must not know anything about Pylon: kinds are registered by the caller (or
//! [`FakeApiServer::register_mesh_kinds`]) and objects are plain JSON, never validated against a
//! schema. It only ever listens on the address it is given (loopback in practice).

mod selector;
mod store;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

use selector::Selector;
use store::{status, Event, EventType, State, Write};
pub use store::{FakeApiError, Fault, ResourceType};

/// The bearer token the generated kubeconfig carries.
const TOKEN: &str = "pylon-fake-kube-api-token";
const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";
const AGGREGATED_CONTENT_TYPE: &str =
    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";
const MAX_BODY: usize = 64 << 20;
const NO_RESOURCE: &str = "the server could not find the requested resource";
const NO_METHOD: &str = "the server does not allow this method on the requested resource";
/// "apiVersion Kind plural [cluster]": the core kinds Pylon reads and Linkerd's CRDs.
const MESH_KINDS: [&str; 10] = [
    "v1 Service services",
    "v1 Pod pods",
    "v1 Namespace namespaces cluster",
    "discovery.k8s.io/v1 EndpointSlice endpointslices",
    "linkerd.io/v1alpha2 ServiceProfile serviceprofiles",
    "split.smi-spec.io/v1alpha2 TrafficSplit trafficsplits",
    "policy.linkerd.io/v1beta3 Server servers",
    "policy.linkerd.io/v1alpha1 AuthorizationPolicy authorizationpolicies",
    "policy.linkerd.io/v1alpha1 MeshTLSAuthentication meshtlsauthentications",
    "policy.linkerd.io/v1alpha1 NetworkAuthentication networkauthentications",
];

/// A fake API server; clones share the same state and listener. Dropping the last clone stops it.
#[derive(Clone)]
pub struct FakeApiServer {
    shared: Arc<Shared>,
    serving: Arc<Serving>,
}

struct Shared {
    state: Mutex<State>,
    /// Bumped on every change, bookmark request or compaction; watch streams wait on it.
    changed: watch::Sender<u64>,
    open_watches: AtomicUsize,
    addr: SocketAddr,
}

struct Serving {
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Serving {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not take every later request down with it.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl FakeApiServer {
    /// Binds 127.0.0.1 on an ephemeral port and serves in a tokio task.
    pub async fn start() -> io::Result<FakeApiServer> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    pub async fn start_on(addr: SocketAddr) -> io::Result<FakeApiServer> {
        let listener = TcpListener::bind(addr).await?;
        let mut state = State::new();
        state.register(ResourceType::new(
            "authentication.k8s.io",
            "v1",
            "TokenReview",
            "tokenreviews",
            false,
        ));
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            changed: watch::Sender::new(0),
            open_watches: AtomicUsize::new(0),
            addr: listener.local_addr()?,
        });
        let task = tokio::spawn(serve(listener, shared.clone()));
        let serving = Arc::new(Serving {
            task: Mutex::new(Some(task)),
        });
        Ok(FakeApiServer { shared, serving })
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// The bearer token in [`Self::kubeconfig_yaml`].
    pub fn token(&self) -> &str {
        TOKEN
    }

    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\nusers:\n- name: fake\n  user:\n    token: {TOKEN}\n",
            self.addr()
        )
    }

    pub fn write_kubeconfig(&self, path: &Path) -> io::Result<()> {
        std::fs::write(path, self.kubeconfig_yaml())
    }

    /// Registers a resource type so discovery and list/watch know it: group "" for core.
    pub fn register(&self, r: ResourceType) {
        self.shared.lock().register(r);
    }

    /// Registers the core kinds Pylon reads and Linkerd's CRDs.
    pub fn register_mesh_kinds(&self) {
        let mut st = self.shared.lock();
        for line in MESH_KINDS {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (group, version) = f[0].split_once('/').unwrap_or(("", f[0]));
            st.register(ResourceType::new(group, version, f[1], f[2], f.len() == 3));
        }
    }

    /// Create or replace (by apiVersion/kind/namespace/name from the object itself; a namespaced
    /// object without a namespace goes to "default"). Sets metadata.resourceVersion, and uid,
    /// creationTimestamp and generation on create; emits ADDED or MODIFIED. An apply that changes
    /// nothing is a no-op, as on a real server. Returns the stored object.
    pub fn apply(&self, object: Value) -> Result<Value, FakeApiError> {
        let stored = self.shared.lock().write(object, Write::Upsert)?;
        self.shared.notify();
        Ok((*stored).clone())
    }

    /// Deletes an object; emits DELETED with the object at a new resourceVersion, which is returned.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let mut st = self.shared.lock();
        let ty = st.type_by_kind(api_version, kind)?;
        let key = st.key(ty, namespace, name);
        let gone = st.delete(ty, &key)?;
        drop(st);
        self.shared.notify();
        Some((*gone).clone())
    }

    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let st = self.shared.lock();
        let ty = st.type_by_kind(api_version, kind)?;
        st.objects[ty]
            .get(&st.key(ty, namespace, name))
            .map(|o| (**o).clone())
    }

    /// Every stored object of a kind, sorted by namespace/name.
    pub fn list(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let st = self.shared.lock();
        let Some(ty) = st.type_by_kind(api_version, kind) else {
            return Vec::new();
        };
        st.objects[ty].values().map(|o| (**o).clone()).collect()
    }

    /// The current (last handed out) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Forgets history up to now: watches and list continuations from an older resourceVersion
    /// get 410 Expired, and every open watch ends with a 410 ERROR event so watchers relist.
    pub fn compact(&self) {
        self.shared.lock().compact();
        self.shared.notify();
    }

    /// Keeps at most `events` events of history; older ones are compacted away (default 10,000).
    pub fn set_history_limit(&self, events: usize) {
        let mut st = self.shared.lock();
        st.history_limit = events.max(1);
        while st.history.len() > st.history_limit {
            if let Some(e) = st.history.pop_front() {
                st.compacted_rv = e.rv;
            }
        }
    }

    /// Sends a BOOKMARK to every open watch that asked for bookmarks.
    pub fn bookmark_all(&self) {
        self.shared.lock().bookmark_seq += 1;
        self.shared.notify();
    }

    /// How often bookmarks are sent on their own (default 1 s); `None` only on [`Self::bookmark_all`].
    pub fn set_bookmark_interval(&self, interval: Option<Duration>) {
        self.shared.lock().bookmark_interval = interval.filter(|d| !d.is_zero());
    }

    /// Stops serving: closes the listener, every connection and watch stream. State is kept.
    pub async fn stop(&self) {
        let task = lock(&self.serving.task).take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }

    /// Serves again on the same address, continuing from the kept state. No-op when serving.
    pub async fn restart(&self) -> io::Result<()> {
        if lock(&self.serving.task).is_some() {
            return Ok(());
        }
        let listener = TcpListener::bind(self.shared.addr).await?;
        let task = tokio::spawn(serve(listener, self.shared.clone()));
        *lock(&self.serving.task) = Some(task);
        Ok(())
    }

    /// Requests by (verb, resource plural): verbs "list", "watch", "get", "create", "update",
    /// "delete"; discovery requests count as ("discovery", path).
    pub fn request_counts(&self) -> BTreeMap<(String, String), u64> {
        self.shared.lock().counts.clone()
    }

    pub fn reset_request_counts(&self) {
        self.shared.lock().counts.clear();
    }

    /// Watch streams currently open (their response has been sent and the client holds them).
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    /// A bearer token the TokenReview endpoint (and the server itself) accepts, e.g. for
    /// username "system:serviceaccount:ns:sa".
    pub fn add_token(&self, token: &str, username: &str) {
        self.shared
            .lock()
            .tokens
            .insert(token.into(), username.into());
    }

    /// Makes the next `times` requests to resource `plural` fail with `fault`.
    pub fn inject_fault(&self, plural: &str, fault: Fault, times: u32) {
        if times > 0 {
            self.shared
                .lock()
                .faults
                .insert(plural.into(), (fault, times));
        }
    }
}

/// Accepts connections and sends periodic bookmarks until aborted; aborting drops every
/// connection task (and so every watch body) with it.
async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    let ticker = bookmark_ticker(shared.clone());
    tokio::pin!(ticker);
    loop {
        tokio::select! {
            () = &mut ticker => {}
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let io = match accepted {
                    Ok((io, _)) => io,
                    Err(e) => {
                        // Out of file descriptors and the like: back off rather than spin.
                        tracing::debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let shared = shared.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(shared, req).await) }
                    });
                    // HTTP/1 only: an HTTP/2 connection would spawn streams outside this task,
                    // and stop() relies on aborting it to close everything.
                    let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(io), svc);
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended");
                    }
                });
            }
        }
    }
}

async fn bookmark_ticker(shared: Arc<Shared>) {
    loop {
        let interval = shared.lock().bookmark_interval;
        match interval {
            Some(d) => {
                tokio::time::sleep(d).await;
                // Re-check: set_bookmark_interval(None) during the sleep must silence this tick.
                let mut st = shared.lock();
                if st.bookmark_interval.is_some() {
                    st.bookmark_seq += 1;
                    drop(st);
                    shared.notify();
                }
            }
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// A response body: a whole JSON document or a watch stream of lines.
enum RespBody {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl http_body::Body for RespBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            RespBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            RespBody::Stream(rx) => rx
                .poll_recv(cx)
                .map(|line| line.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, RespBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            RespBody::Stream(_) => SizeHint::default(),
        }
    }
}

fn respond(code: StatusCode, content_type: &str, body: RespBody) -> Response<RespBody> {
    let mut resp = Response::new(body);
    *resp.status_mut() = code;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp
}

fn json_resp(code: StatusCode, body: String) -> Response<RespBody> {
    respond(code, "application/json", RespBody::Full(Some(body.into())))
}

fn ok(v: &Value) -> Response<RespBody> {
    json_resp(StatusCode::OK, v.to_string())
}

fn error(code: u16, reason: &str, message: &str) -> Response<RespBody> {
    let sc = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_resp(sc, status(code, reason, message).to_string())
}

fn store_error(e: &FakeApiError) -> Response<RespBody> {
    let (code, reason) = match e {
        FakeApiError::UnknownKind { .. } => (400, "BadRequest"),
        FakeApiError::Invalid(_) => (400, "BadRequest"),
        FakeApiError::AlreadyExists(_) => (409, "AlreadyExists"),
        FakeApiError::NotFound(_) => (404, "NotFound"),
        FakeApiError::Conflict(_) => (409, "Conflict"),
    };
    error(code, reason, &e.to_string())
}

/// What a request asked for, parsed from the URL.
struct Route<'a> {
    group: &'a str,
    version: &'a str,
    namespace: Option<&'a str>,
    plural: &'a str,
    name: Option<&'a str>,
    subresource: Option<&'a str>,
}

fn parse_route<'a>(segs: &[&'a str]) -> Option<Route<'a>> {
    let (group, version, rest) = match segs {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    // `/api/v1/namespaces/foo` is the Namespace "foo", not a namespace prefix.
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(*ns), rest),
        _ => (None, rest),
    };
    let (plural, name, subresource) = match rest {
        [p] => (*p, None, None),
        [p, n] => (*p, Some(*n), None),
        [p, n, s] => (*p, Some(*n), Some(*s)),
        _ => return None,
    };
    Some(Route {
        group,
        version,
        namespace,
        plural,
        name,
        subresource,
    })
}

/// Answers one request: the async part (reading the body, hanging) around the synchronous
/// `dispatch`, which holds the state lock.
async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<RespBody> {
    let (parts, body) = req.into_parts();
    let body = if matches!(parts.method, Method::POST | Method::PUT) {
        match Limited::new(body, MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return error(400, "BadRequest", &format!("reading request body: {e}")),
        }
    } else {
        Bytes::new()
    };
    match dispatch(&shared, &parts, &body) {
        Some(resp) => resp,
        // An injected hang: never answer; the connection closes when the client gives up or stop().
        None => std::future::pending().await,
    }
}

fn dispatch(
    shared: &Arc<Shared>,
    parts: &http::request::Parts,
    body: &[u8],
) -> Option<Response<RespBody>> {
    let mut st = shared.lock();
    // No Authorization header is an anonymous request, which we allow; a wrong token is not.
    if let Some(auth) = parts.headers.get(header::AUTHORIZATION) {
        let token = auth
            .to_str()
            .ok()
            .and_then(|a| a.strip_prefix("Bearer "))
            .map(str::trim);
        if !token.is_some_and(|t| t == TOKEN || st.tokens.contains_key(t)) {
            return Some(error(401, "Unauthorized", "Unauthorized"));
        }
    }
    let path = parts.uri.path();
    let query: HashMap<String, String> =
        form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let get = parts.method == Method::GET;
    let accept = parts
        .headers
        .get(header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .unwrap_or("");
    let found = get.then(|| {
        discovery(
            &st,
            shared.addr,
            &segs,
            accept.contains("as=APIGroupDiscoveryList"),
        )
    });
    if let Some(resp) = found.flatten() {
        st.count("discovery", path);
        return Some(resp);
    }
    let Some(route) = parse_route(&segs) else {
        return Some(error(404, "NotFound", NO_RESOURCE));
    };
    let found = st.type_by_path(route.group, route.version, route.plural);
    let Some(ty) = found.filter(|&ty| {
        route.subresource.is_none() && (route.namespace.is_none() || st.types[ty].namespaced)
    }) else {
        return Some(error(404, "NotFound", NO_RESOURCE));
    };
    let watching = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    let verb = match (&parts.method, route.name, watching) {
        (&Method::GET, _, true) => "watch",
        (&Method::GET, None, false) => "list",
        (&Method::GET, Some(_), false) => "get",
        (&Method::POST, None, _) => "create",
        (&Method::PUT, Some(_), _) => "update",
        (&Method::DELETE, Some(_), _) => "delete",
        _ => return Some(error(405, "MethodNotAllowed", NO_METHOD)),
    };
    st.count(verb, route.plural);
    match st.take_fault(route.plural) {
        Some(Fault::Status(code)) => return Some(error(code, "InternalError", "injected fault")),
        Some(Fault::Hang) => return None,
        None => {}
    }
    let t = st.types[ty].clone();
    if t.group == "authentication.k8s.io" && t.plural == "tokenreviews" {
        return Some(match verb {
            "create" => token_review(&st, body),
            _ => error(405, "MethodNotAllowed", "tokenreviews only support create"),
        });
    }
    let mut sel = match Selector::parse(
        query.get("labelSelector").map(String::as_str),
        query.get("fieldSelector").map(String::as_str),
    ) {
        Ok(sel) => sel,
        Err(e) => return Some(error(400, "BadRequest", &e)),
    };
    if let Some(ns) = route.namespace {
        sel.require_field("metadata.namespace", ns);
    }
    let key = route.name.map(|name| st.key(ty, route.namespace, name));
    let not_found =
        |name: &str| error(404, "NotFound", &format!("{} {name:?} not found", t.plural));
    let resp = match (verb, key) {
        ("watch", key) => {
            if let Some((_, name)) = key {
                sel.require_field("metadata.name", &name);
            }
            start_watch(shared, &st, ty, sel, &query)
        }
        ("list", _) => list(&st, ty, &sel, &query),
        ("get", Some(key)) => match st.objects[ty].get(&key) {
            Some(obj) => ok(obj),
            None => not_found(&key.1),
        },
        ("delete", Some(key)) => match st.delete(ty, &key) {
            Some(gone) => {
                shared.notify();
                ok(&gone)
            }
            None => not_found(&key.1),
        },
        (verb, _) => match write_from_http(&mut st, &t, route.namespace, route.name, body) {
            Ok(obj) => {
                shared.notify();
                let code = if verb == "create" {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                };
                json_resp(code, obj.to_string())
            }
            Err(e) => store_error(&e),
        },
    };
    Some(resp)
}

/// POST and PUT: the body must be of the URL's kind, namespace and name.
fn write_from_http(
    st: &mut State,
    t: &ResourceType,
    namespace: Option<&str>,
    name: Option<&str>,
    body: &[u8],
) -> Result<Arc<Value>, FakeApiError> {
    let invalid = |m: &str| FakeApiError::Invalid(m.to_string());
    let mut obj: Value = serde_json::from_slice(body).map_err(|e| invalid(&e.to_string()))?;
    let Some(o) = obj.as_object_mut() else {
        return Err(invalid("the body must be a JSON object"));
    };
    o.entry("apiVersion")
        .or_insert_with(|| t.api_version().into());
    o.entry("kind").or_insert_with(|| t.kind.clone().into());
    let meta = o.entry("metadata").or_insert_with(|| json!({}));
    if !meta.is_object() {
        return Err(invalid("metadata must be an object"));
    }
    for (field, want) in [("namespace", namespace), ("name", name)] {
        if let Some(want) = want {
            if meta[field].as_str().is_some_and(|got| got != want) {
                return Err(invalid(&format!("metadata.{field} does not match the URL")));
            }
            meta[field] = want.into();
        }
    }
    if obj["apiVersion"] != t.api_version().as_str() || obj["kind"] != t.kind.as_str() {
        return Err(invalid(&format!(
            "the body is not a {} {}",
            t.api_version(),
            t.kind
        )));
    }
    let mode = if name.is_some() {
        Write::Update
    } else {
        Write::Create
    };
    st.write(obj, mode)
}

fn list(st: &State, ty: usize, sel: &Selector, q: &HashMap<String, String>) -> Response<RespBody> {
    let t = &st.types[ty];
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|&l| l > 0);
    let (at, after) = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => match decode_continue(token) {
            Some((rv, key)) => (rv, Some(key)),
            None => return error(400, "BadRequest", "invalid continue token"),
        },
        None => {
            let rv = match q.get("resourceVersion").map(String::as_str) {
                None | Some("" | "0") => st.rv,
                Some(r) => match r.parse::<u64>() {
                    Ok(r) if r > st.rv => {
                        return error(
                            504,
                            "Timeout",
                            &format!("Too large resource version: {r}, current: {}", st.rv),
                        );
                    }
                    // Exact asks for the state at r; NotOlderThan (or unset) is happy with now.
                    Ok(r) if q.get("resourceVersionMatch").is_some_and(|m| m == "Exact") => r,
                    Ok(_) => st.rv,
                    Err(_) => {
                        return error(400, "BadRequest", &format!("invalid resourceVersion {r:?}"))
                    }
                },
            };
            (rv, None)
        }
    };
    let Some(snapshot) = st.snapshot(ty, at) else {
        let message = if after.is_some() {
            "The provided continue parameter is too old to display a consistent list result. \
             You can start a new list without the continue parameter."
                .to_string()
        } else {
            format!("too old resource version: {at} ({})", st.compacted_rv)
        };
        return error(410, "Expired", &message);
    };
    let mut matching = snapshot
        .iter()
        .filter(|(k, _)| after.as_ref().is_none_or(|a| *k > a))
        .filter(|(_, o)| sel.matches(o));
    let mut items = String::new();
    let mut last = None;
    for (i, (k, obj)) in matching
        .by_ref()
        .take(limit.unwrap_or(usize::MAX))
        .enumerate()
    {
        if i > 0 {
            items.push(',');
        }
        let _ = write!(items, "{obj}");
        last = Some(k);
    }
    let remaining = matching.count();
    let mut meta = json!({"resourceVersion": at.to_string()});
    if let (Some(last), true) = (last, remaining > 0) {
        meta["continue"] = encode_continue(at, last).into();
        meta["remainingItemCount"] = remaining.into();
    }
    let body = format!(
        r#"{{"kind":"{}List","apiVersion":"{}","metadata":{meta},"items":[{items}]}}"#,
        t.kind,
        t.api_version()
    );
    json_resp(StatusCode::OK, body)
}

/// Continue tokens are opaque to clients: hex of "rv/namespace/name".
fn encode_continue(rv: u64, (ns, name): &(String, String)) -> String {
    format!("{rv}/{ns}/{name}")
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_continue(token: &str) -> Option<(u64, (String, String))> {
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| {
            token
                .get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()?;
    let s = String::from_utf8(bytes).ok()?;
    let mut parts = s.splitn(3, '/');
    let rv = parts.next()?.parse().ok()?;
    Some((rv, (parts.next()?.to_string(), parts.next()?.to_string())))
}

/// One open watch's position.
struct WatchCursor {
    ty: usize,
    sel: Selector,
    bookmarks: bool,
    kind: String,
    api_version: String,
    /// Every event up to here has been sent (or filtered out).
    rv: u64,
    epoch: u64,
    bookmark_seq: u64,
    done: bool,
}

fn line(ty: &str, obj: &Value) -> Bytes {
    format!("{{\"type\":\"{ty}\",\"object\":{obj}}}\n").into()
}

impl WatchCursor {
    fn bookmark(&self, initial_end: bool) -> Bytes {
        let mut obj = json!({"kind": self.kind, "apiVersion": self.api_version,
                             "metadata": {"resourceVersion": self.rv.to_string()}});
        if initial_end {
            obj["metadata"]["annotations"] = json!({INITIAL_EVENTS_END: "true"});
        }
        line("BOOKMARK", &obj)
    }

    /// The lines for everything that happened since the last call.
    fn collect(&mut self, st: &State) -> Vec<Bytes> {
        if st.epoch != self.epoch || self.rv < st.compacted_rv {
            self.done = true;
            let msg = format!(
                "too old resource version: {} ({})",
                self.rv, st.compacted_rv
            );
            return vec![line("ERROR", &status(410, "Expired", &msg))];
        }
        let mut out: Vec<Bytes> = st
            .events_after(self.rv)
            .filter(|e| e.ty == self.ty)
            .filter_map(|e| self.transition(e))
            .collect();
        self.rv = self.rv.max(st.rv);
        if self.bookmarks && st.bookmark_seq != self.bookmark_seq {
            out.push(self.bookmark(false));
        }
        self.bookmark_seq = st.bookmark_seq;
        out
    }

    /// The event as this watch's selector sees it: an object that starts or stops matching is
    /// ADDED or DELETED, as the real server's watch cache does.
    fn transition(&self, e: &Event) -> Option<Bytes> {
        let now = self.sel.matches(&e.object);
        let before = e.prev.as_ref().is_some_and(|p| self.sel.matches(p));
        match (e.kind, before, now) {
            (EventType::Added, _, true) => Some(line("ADDED", &e.object)),
            (EventType::Deleted, _, true) => Some(line("DELETED", &e.object)),
            (EventType::Modified, true, true) => Some(line("MODIFIED", &e.object)),
            (EventType::Modified, false, true) => Some(line("ADDED", &e.object)),
            (EventType::Modified, true, false) => {
                let mut gone = e.prev.as_deref().cloned().unwrap_or_default();
                gone["metadata"]["resourceVersion"] = e.rv.to_string().into();
                Some(line("DELETED", &gone))
            }
            _ => None,
        }
    }
}

/// Counts an open watch for as long as its producer runs.
struct OpenWatch(Arc<Shared>);

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.open_watches.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Starts a watch: the starting point and initial events are fixed here, under the lock and
/// before the response goes out, so anything the client does after the response is seen.
fn start_watch(
    shared: &Arc<Shared>,
    st: &State,
    ty: usize,
    sel: Selector,
    q: &HashMap<String, String>,
) -> Response<RespBody> {
    let flag = |k: &str| q.get(k).is_some_and(|v| v == "true" || v == "1");
    let send_initial = flag("sendInitialEvents");
    let t = &st.types[ty];
    let mut w = WatchCursor {
        ty,
        sel,
        bookmarks: flag("allowWatchBookmarks"),
        kind: t.kind.clone(),
        api_version: t.api_version(),
        rv: st.rv,
        epoch: st.epoch,
        bookmark_seq: st.bookmark_seq,
        done: false,
    };
    let mut lines = Vec::new();
    let from = match q.get("resourceVersion").map(String::as_str) {
        None | Some("" | "0") => None,
        Some(r) => match r.parse::<u64>() {
            Ok(r) => Some(r),
            Err(_) => return error(400, "BadRequest", &format!("invalid resourceVersion {r:?}")),
        },
    };
    match from {
        // Resume: replay what happened after `rv`, if we still have it.
        Some(rv) if !send_initial => {
            w.rv = rv;
            if rv < st.compacted_rv {
                let msg = format!("too old resource version: {rv} ({})", st.compacted_rv);
                lines.push(line("ERROR", &status(410, "Expired", &msg)));
                w.done = true;
            } else {
                lines = w.collect(st);
            }
        }
        // Unset/"0" or a streaming list: synthetic ADDED for the current state, then live.
        _ => {
            let objects = st.objects[ty].values().filter(|o| w.sel.matches(o));
            lines.extend(objects.map(|o| line("ADDED", o)));
            if send_initial && w.bookmarks {
                lines.push(w.bookmark(true));
            }
        }
    }
    let (tx, rx) = mpsc::channel(256);
    let changed = shared.changed.subscribe();
    shared.open_watches.fetch_add(1, Ordering::SeqCst);
    let open = OpenWatch(shared.clone());
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|&s| s > 0);
    tokio::spawn(run_watch(
        open,
        w,
        lines,
        tx,
        changed,
        timeout.map(Duration::from_secs),
    ));
    respond(StatusCode::OK, "application/json", RespBody::Stream(rx))
}

async fn run_watch(
    open: OpenWatch,
    mut w: WatchCursor,
    mut batch: Vec<Bytes>,
    tx: mpsc::Sender<Bytes>,
    mut changed: watch::Receiver<u64>,
    timeout: Option<Duration>,
) {
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let expired = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(expired);
    loop {
        for l in batch.drain(..) {
            // Backpressure: a slow reader falls behind in the history, and past its end gets 410.
            tokio::select! {
                sent = tx.send(l) => if sent.is_err() { return },
                () = &mut expired => return,
            }
        }
        if w.done {
            return;
        }
        tokio::select! {
            () = tx.closed() => return,
            () = &mut expired => return, // timeoutSeconds: end the stream cleanly
            r = changed.changed() => if r.is_err() { return },
        }
        changed.borrow_and_update();
        batch = w.collect(&open.0.lock());
    }
}

fn version_rank(v: &str) -> (u8, u64, u64) {
    let rest = v.strip_prefix('v').unwrap_or("");
    let digits = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    let major = rest[..digits].parse().unwrap_or(0);
    let (stability, minor) = match &rest[digits..] {
        "" => (3, ""),
        s if s.starts_with("beta") => (2, &s[4..]),
        s if s.starts_with("alpha") => (1, &s[5..]),
        _ => (0, ""),
    };
    (stability, major, minor.parse().unwrap_or(0))
}

/// Non-core groups, each with its versions most preferred first.
fn groups(st: &State) -> BTreeMap<&str, Vec<&str>> {
    let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for t in st.types.iter().filter(|t| !t.group.is_empty()) {
        let versions = groups.entry(&t.group).or_default();
        if !versions.contains(&t.version.as_str()) {
            versions.push(&t.version);
        }
    }
    for versions in groups.values_mut() {
        versions.sort_by_key(|v| std::cmp::Reverse(version_rank(v)));
    }
    groups
}

fn verbs(t: &ResourceType) -> Value {
    if t.plural == "tokenreviews" {
        json!(["create"])
    } else {
        json!(["create", "delete", "get", "list", "patch", "update", "watch"])
    }
}

fn resources<'a>(
    st: &'a State,
    group: &'a str,
    version: &'a str,
) -> impl Iterator<Item = &'a ResourceType> {
    st.types
        .iter()
        .filter(move |t| t.group == group && t.version == version)
}

fn aggregated_group(st: &State, group: &str, versions: &[&str]) -> Value {
    let versions: Vec<Value> = versions
        .iter()
        .map(|v| {
            let resources: Vec<Value> = resources(st, group, v)
                .map(|t| json!({"resource": t.plural, "singularResource": t.kind.to_lowercase(),
                     "responseKind": {"group": group, "version": v, "kind": t.kind},
                     "scope": if t.namespaced { "Namespaced" } else { "Cluster" }, "verbs": verbs(t)}))
                .collect();
            json!({"version": v, "resources": resources, "freshness": "Current"})
        })
        .collect();
    json!({"metadata": {"name": group}, "versions": versions})
}

fn discovery(
    st: &State,
    addr: SocketAddr,
    segs: &[&str],
    aggregated: bool,
) -> Option<Response<RespBody>> {
    let group_json = |g: &str, versions: &[&str]| {
        let gv = |v: &&str| json!({"groupVersion": format!("{g}/{v}"), "version": v});
        json!({"kind": "APIGroup", "apiVersion": "v1", "name": g,
               "versions": versions.iter().map(gv).collect::<Vec<_>>(),
               "preferredVersion": versions.first().map(gv)})
    };
    let resource_list = |group: &str, version: &str| {
        let list: Vec<Value> = resources(st, group, version)
            .map(|t| json!({"name": t.plural, "singularName": t.kind.to_lowercase(), "namespaced": t.namespaced,
                            "kind": t.kind, "verbs": verbs(t)}))
            .collect();
        let gv = if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        };
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": list})
    };
    let aggregated_list = |items: Vec<Value>| {
        let body = json!({"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2",
                          "metadata": {}, "items": items});
        respond(
            StatusCode::OK,
            AGGREGATED_CONTENT_TYPE,
            RespBody::Full(Some(body.to_string().into())),
        )
    };
    let groups = groups(st);
    Some(match segs {
        ["version"] => ok(
            &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0", "gitCommit": "fake",
            "gitTreeState": "clean", "buildDate": "2025-04-23T00:00:00Z", "goVersion": "go1.24.2",
            "compiler": "gc", "platform": "linux/amd64"}),
        ),
        ["healthz" | "livez" | "readyz"] => respond(
            StatusCode::OK,
            "text/plain",
            RespBody::Full(Some("ok".into())),
        ),
        ["api"] if aggregated => aggregated_list(vec![aggregated_group(st, "", &["v1"])]),
        ["api"] => ok(&json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": addr.to_string()}]})),
        ["api", "v1"] => ok(&resource_list("", "v1")),
        ["apis"] if aggregated => aggregated_list(
            groups
                .iter()
                .map(|(g, vs)| aggregated_group(st, g, vs))
                .collect(),
        ),
        ["apis"] => ok(&json!({"kind": "APIGroupList", "apiVersion": "v1",
            "groups": groups.iter().map(|(g, vs)| group_json(g, vs)).collect::<Vec<_>>()})),
        ["apis", g] => ok(&group_json(g, groups.get(g)?)),
        ["apis", g, v] if groups.get(g)?.contains(v) => ok(&resource_list(g, v)),
        _ => return None,
    })
}

fn token_review(st: &State, body: &[u8]) -> Response<RespBody> {
    let Ok(review) = serde_json::from_slice::<Value>(body) else {
        return error(400, "BadRequest", "invalid TokenReview");
    };
    let token = review["spec"]["token"].as_str().unwrap_or("");
    let wanted: Vec<&str> = review["spec"]["audiences"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let result = match st.tokens.get(token) {
        Some(user) => {
            // Service-account users belong to their namespace's service-account group.
            let mut groups = vec!["system:authenticated".to_string()];
            let sa = user.strip_prefix("system:serviceaccount:");
            if let Some(ns) = sa.and_then(|r| r.split(':').next()) {
                groups.extend([
                    "system:serviceaccounts".into(),
                    format!("system:serviceaccounts:{ns}"),
                ]);
            }
            json!({"authenticated": true, "user": {"username": user, "groups": groups}, "audiences": wanted})
        }
        None => json!({"authenticated": false, "user": {}, "error": "invalid bearer token"}),
    };
    let body = json!({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                      "metadata": {"creationTimestamp": null}, "spec": review["spec"], "status": result});
    json_resp(StatusCode::CREATED, body.to_string())
}

#[cfg(test)]
mod tests;
