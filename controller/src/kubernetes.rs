//! The Store's Kubernetes source: one watch per kind the mesh reads, feeding every change into
//! the same [`Store`] a config dir feeds, so each rule (validation, last good version, lookups)
//! is written once.
//!
//! Each watch is kube-runtime's `watcher`: list, then watch from the list's resourceVersion,
//! bookmarks on, a relist when the API server answers 410 Gone, and a backoff while the API
//! server is unreachable. The Store is the reflector's cache: a (re)list replaces the kind's
//! objects atomically at `InitDone`, an event applies one object, and while the API server is
//! away the last state stays in force. kube's own reflector store is not kept as well: it would
//! hold a second, unparsed copy of every Pod in the cluster.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Client;
use pylon_proxy_policy::{ApiChange, ApiObject, Store};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::identity::{ReviewError, TokenReviewer};

/// How often a missing CRD group is looked for again (it may be installed later).
const CRD_RECHECK: Duration = Duration::from_secs(30);
/// Changes applied to the Store in one snapshot at most; a relist of many objects is one change.
const MAX_BATCH: usize = 1_000;

/// A kind the controller watches.
#[derive(Clone, Copy, Debug)]
struct WatchedKind {
    group: &'static str,
    kind: &'static str,
    /// Versions Pylon parses, most preferred first (the API server converts between them).
    versions: &'static [&'static str],
}

/// Linkerd's and SMI's custom resources: found through discovery, since a cluster may serve
/// any of their versions, or none yet.
const CUSTOM_KINDS: &[WatchedKind] = &[
    WatchedKind {
        group: "linkerd.io",
        kind: "ServiceProfile",
        versions: &["v1alpha2", "v1alpha1"],
    },
    WatchedKind {
        group: "split.smi-spec.io",
        kind: "TrafficSplit",
        versions: &["v1alpha2", "v1alpha4", "v1alpha3", "v1alpha1"],
    },
    WatchedKind {
        group: "policy.linkerd.io",
        kind: "Server",
        versions: &["v1beta3", "v1beta2", "v1beta1", "v1alpha1"],
    },
    WatchedKind {
        group: "policy.linkerd.io",
        kind: "AuthorizationPolicy",
        versions: &["v1alpha1"],
    },
    WatchedKind {
        group: "policy.linkerd.io",
        kind: "MeshTLSAuthentication",
        versions: &["v1alpha1"],
    },
    WatchedKind {
        group: "policy.linkerd.io",
        kind: "NetworkAuthentication",
        versions: &["v1alpha1"],
    },
];

/// What the watches have done, for `/metrics` and `/ready`, and for the servers to wait on
/// (`applied`).
#[derive(Debug, Default)]
pub struct WatchStatus {
    kinds: Mutex<BTreeMap<&'static str, KindStatus>>,
    /// Every watched kind has been listed once (a CRD that is not installed counts as listed).
    synced: AtomicBool,
    /// Told when `synced` turns true.
    synced_now: Notify,
    /// The queue into the Store, for `applied`'s barrier.
    queue: Option<mpsc::Sender<Queued>>,
    /// How many kinds are watched.
    watched: usize,
    pub events_total: AtomicU64,
    pub errors_total: AtomicU64,
    pub relists_total: AtomicU64,
}

#[derive(Clone, Debug, Default)]
pub struct KindStatus {
    pub listed: bool,
    /// The API version watched; `None` while the kind's CRD is not installed.
    pub version: Option<String>,
    pub objects: u64,
    pub last_error: Option<String>,
}

impl WatchStatus {
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Waits until every watched kind's first listing is in the Store, not only received: a
    /// proxy answered before that would be told of a half-listed cluster (a Service whose
    /// EndpointSlices are not in yet: no endpoints, and its requests failed with 503).
    pub async fn applied(&self) {
        loop {
            // Made before the check: it hears a `notify_waiters` from then on.
            let synced_now = self.synced_now.notified();
            if self.is_synced() {
                break;
            }
            synced_now.await;
        }
        // A kind's listing is queued before the kind counts as listed (`watch_kind`), so all
        // of them are ahead of a barrier queued now.
        let Some(queue) = &self.queue else {
            return;
        };
        let (done, applied) = oneshot::channel();
        if queue.send(Queued::Barrier(done)).await.is_ok() {
            let _ = applied.await;
        }
    }

    pub fn kinds(&self) -> BTreeMap<&'static str, KindStatus> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, KindStatus>> {
        self.kinds.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, kind: &'static str, f: impl FnOnce(&mut KindStatus)) {
        let mut kinds = self.lock();
        f(kinds.entry(kind).or_default());
        let all_listed = kinds.len() == self.watched && kinds.values().all(|k| k.listed);
        if all_listed && !self.synced.swap(true, Ordering::AcqRel) {
            tracing::info!("every watched kind listed; serving the cluster's state");
            self.synced_now.notify_waiters();
        }
    }
}

/// Starts the watches and the task that applies their changes to `store`; runs until the
/// runtime stops.
pub fn spawn_watches(client: Client, store: Arc<Store>) -> Arc<WatchStatus> {
    let (tx, rx) = mpsc::channel::<Queued>(4 * MAX_BATCH);
    tokio::spawn(apply_changes(rx, store));

    // The built-in kinds, at their one stable version (no discovery needed).
    let core = [
        ("Service", ApiResource::erase::<Service>(&())),
        ("EndpointSlice", ApiResource::erase::<EndpointSlice>(&())),
        ("Pod", ApiResource::erase::<Pod>(&())),
        ("Namespace", ApiResource::erase::<Namespace>(&())),
    ];
    let status = Arc::new(WatchStatus {
        watched: core.len() + CUSTOM_KINDS.len(),
        queue: Some(tx.clone()),
        ..WatchStatus::default()
    });
    for (kind, resource) in core {
        tokio::spawn(watch_kind(
            client.clone(),
            kind,
            resource,
            tx.clone(),
            status.clone(),
        ));
    }
    for kind in CUSTOM_KINDS {
        let (client, tx, status) = (client.clone(), tx.clone(), status.clone());
        tokio::spawn(async move {
            let resource = discover(&client, kind, &status).await;
            watch_kind(client, kind.kind, resource, tx, status).await;
        });
    }
    status
}

/// Finds the version of a custom kind to watch: the group's preferred one if Pylon reads it,
/// else the first Pylon reads. Waits (and says so) while the CRD is not installed.
async fn discover(client: &Client, kind: &WatchedKind, status: &WatchStatus) -> ApiResource {
    let mut warned = false;
    loop {
        let found = match kube::discovery::group(client, kind.group).await {
            Ok(group) => {
                let preferred = group.preferred_version().unwrap_or_default().to_string();
                let served: Vec<String> = group.versions().map(str::to_string).collect();
                kind.versions
                    .iter()
                    .copied()
                    .filter(|v| served.iter().any(|s| s == v))
                    // The first minimum: the preferred version, else the first Pylon lists.
                    .min_by_key(|v| **v != preferred)
                    .and_then(|v| {
                        group
                            .versioned_resources(v)
                            .into_iter()
                            .find(|(r, _)| r.kind == kind.kind)
                            .map(|(r, _)| r)
                    })
                    .ok_or_else(|| {
                        format!(
                            "the API serves {} {served:?}, none of which Pylon reads ({:?})",
                            kind.group, kind.versions
                        )
                    })
            }
            Err(e) => Err(e.to_string()),
        };
        match found {
            Ok(resource) => {
                tracing::info!(kind = kind.kind, api_version = %resource.api_version, "watching");
                return resource;
            }
            Err(error) => {
                if !warned {
                    tracing::warn!(kind = kind.kind, group = kind.group, %error, "custom resource not available; its objects are ignored until it is installed");
                    warned = true;
                }
                // Nothing to list: the kind counts as listed (empty), so readiness is not
                // held hostage by an optional CRD.
                status.update(kind.kind, |s| {
                    s.listed = true;
                    s.version = None;
                    s.last_error = Some(error);
                });
                tokio::time::sleep(CRD_RECHECK).await;
            }
        }
    }
}

async fn watch_kind(
    client: Client,
    kind: &'static str,
    resource: ApiResource,
    tx: mpsc::Sender<Queued>,
    status: Arc<WatchStatus>,
) {
    let collection: Arc<str> = format!("{}/{}", resource.api_version, resource.plural).into();
    status.update(kind, |s| s.version = Some(resource.api_version.clone()));
    let api: Api<DynamicObject> = Api::all_with(client, &resource);
    let config = watcher::Config::default().any_semantic();
    let mut events = watcher::watcher(api, config).default_backoff().boxed();
    // A (re)list in progress: applied at once when complete, so a relist never shows a
    // half-listed kind.
    let mut listing: Option<Vec<ApiObject>> = None;
    while let Some(event) = events.next().await {
        let change = match event {
            Ok(Event::Init) => {
                listing = Some(Vec::new());
                None
            }
            Ok(Event::InitApply(object)) => {
                if let Some(list) = &mut listing {
                    list.push(api_object(&resource, object));
                }
                None
            }
            Ok(Event::InitDone) => {
                let objects_listed = listing.take().unwrap_or_default();
                let objects = objects_listed.len() as u64;
                let relist = status.lock().get(kind).is_some_and(|s| s.listed);
                if relist {
                    status.relists_total.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(kind, objects, "relisted");
                }
                let listed = ApiChange::Replace {
                    collection: collection.clone(),
                    objects: objects_listed,
                };
                // Queued before the kind counts as listed: see `WatchStatus::applied`.
                if tx.send(Queued::Change(listed)).await.is_err() {
                    return;
                }
                status.update(kind, |s| {
                    s.listed = true;
                    s.objects = objects;
                    s.last_error = None;
                });
                None
            }
            Ok(Event::Apply(object)) => {
                status.events_total.fetch_add(1, Ordering::Relaxed);
                Some(ApiChange::Apply {
                    collection: collection.clone(),
                    object: api_object(&resource, object),
                })
            }
            Ok(Event::Delete(object)) => {
                status.events_total.fetch_add(1, Ordering::Relaxed);
                Some(ApiChange::Delete {
                    path: object_path(&resource, &object),
                })
            }
            Err(error) => {
                // The watcher backs off and retries by itself; the Store keeps what it has.
                status.errors_total.fetch_add(1, Ordering::Relaxed);
                let error = error.to_string();
                tracing::warn!(kind, %error, "watch failed; keeping the last state and retrying");
                status.update(kind, |s| s.last_error = Some(error));
                None
            }
        };
        if let Some(change) = change {
            if tx.send(Queued::Change(change)).await.is_err() {
                return;
            }
        }
    }
}

/// What the watches queue for the Store: a change, or a barrier told once everything queued
/// before it is applied.
#[derive(Debug)]
enum Queued {
    Change(ApiChange),
    Barrier(oneshot::Sender<()>),
}

/// Applies changes in batches: everything queued when the Store is free goes into one
/// snapshot, so a burst of events costs one rebuild, not one each.
async fn apply_changes(mut rx: mpsc::Receiver<Queued>, store: Arc<Store>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let mut changes = Vec::with_capacity(batch.len());
        let mut barriers = Vec::new();
        for queued in batch.drain(..) {
            match queued {
                Queued::Change(change) => changes.push(change),
                Queued::Barrier(done) => barriers.push(done),
            }
        }
        if !changes.is_empty() {
            let store = store.clone();
            // Parsing and building a snapshot is CPU work: keep it off the async workers.
            if let Err(error) =
                tokio::task::spawn_blocking(move || store.apply_api_changes(changes)).await
            {
                tracing::error!(%error, "applying API changes failed");
            }
        }
        for done in barriers {
            let _ = done.send(());
        }
    }
}

/// The object as the Store reads it: list items come without `apiVersion` and `kind`, which
/// the Store needs to know what it is.
fn api_object(resource: &ApiResource, object: DynamicObject) -> ApiObject {
    let path = object_path(resource, &object);
    let mut value = serde_json::to_value(&object).unwrap_or(serde_json::Value::Null);
    if let Some(map) = value.as_object_mut() {
        map.insert("apiVersion".into(), resource.api_version.clone().into());
        map.insert("kind".into(), resource.kind.clone().into());
    }
    ApiObject { path, value }
}

/// The object's REST path (`/api/v1/namespaces/shop/pods/web-1`), which names it in errors.
fn object_path(resource: &ApiResource, object: &DynamicObject) -> PathBuf {
    let base = if resource.group.is_empty() {
        format!("/api/{}", resource.version)
    } else {
        format!("/apis/{}/{}", resource.group, resource.version)
    };
    let name = object.metadata.name.as_deref().unwrap_or("");
    let path = match object.metadata.namespace.as_deref() {
        Some(ns) => format!("{base}/namespaces/{ns}/{}/{name}", resource.plural),
        None => format!("{base}/{}/{name}", resource.plural),
    };
    PathBuf::from(path)
}

/// Reviews ServiceAccount tokens with the API server (`authentication.k8s.io/v1 TokenReview`),
/// as Linkerd's identity controller does.
pub struct KubeTokenReviewer {
    client: Client,
}

impl KubeTokenReviewer {
    pub fn new(client: Client) -> Self {
        Self { client }
    }
}

#[tonic::async_trait]
impl TokenReviewer for KubeTokenReviewer {
    async fn review(&self, token: &str, audiences: &[String]) -> Result<String, ReviewError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: (!audiences.is_empty()).then(|| audiences.to_vec()),
            },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| ReviewError::Unavailable(e.to_string()))?;
        let status = reviewed
            .status
            .ok_or_else(|| ReviewError::Unavailable("the TokenReview has no status".into()))?;
        if status.authenticated != Some(true) {
            return Err(ReviewError::NotAuthenticated(
                status.error.unwrap_or_else(|| "not authenticated".into()),
            ));
        }
        status
            .user
            .and_then(|u| u.username)
            .ok_or_else(|| ReviewError::NotAuthenticated("no username in the review".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pylon_proxy_policy::StoreConfig;

    #[tokio::test]
    async fn servers_wait_until_every_listing_is_in_the_store() {
        let store = Store::empty(StoreConfig {
            default_namespace: "default".into(),
            cluster_domain: "cluster.local".into(),
        });
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(apply_changes(rx, store.clone()));
        let status = Arc::new(WatchStatus {
            watched: 2,
            queue: Some(tx.clone()),
            ..WatchStatus::default()
        });
        let waiting = tokio::spawn({
            let status = status.clone();
            async move { status.applied().await }
        });
        let before = store.snapshot().generation();

        // One kind of two listed: the servers still wait.
        status.update("EndpointSlice", |s| s.listed = true);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());

        // The last kind's listing is queued, then the kind counts as listed (as `watch_kind`
        // does): once the wait ends, that listing is in the Store.
        let listing = ApiChange::Replace {
            collection: "v1/services".into(),
            objects: vec![ApiObject {
                path: "/api/v1/namespaces/default/services/web".into(),
                value: serde_json::json!({
                    "apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": "web", "namespace": "default"},
                    "spec": {"ports": [{"port": 80}]}
                }),
            }],
        };
        assert!(tx.send(Queued::Change(listing)).await.is_ok());
        status.update("Service", |s| s.listed = true);
        assert!(status.is_synced());
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the wait ends once synced and applied")
            .expect("the waiting task");
        assert!(store.snapshot().generation() > before);
    }
}
