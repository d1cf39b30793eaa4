//! The Store: loads mesh objects from a config directory (or takes them from the Kubernetes
//! API, each object a one-document source named by its REST path), keeps the last good
//! version of each object, and publishes immutable [`Snapshot`]s that readers load without
//! locks.
//!
//! Reload pipeline: list the directory -> re-parse only files whose bytes changed ->
//! per file, keep last good objects for invalid documents -> merge all files -> publish a
//! new snapshot only if the objects or errors differ from the current one. API changes take
//! the same path from "re-parse" on, one batch of changes per snapshot.

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use serde::Deserialize;
use serde_yaml_ng::Value;
use tokio::sync::{watch, Notify};

use crate::objects::{parse_document, MeshObject, ObjectKey, ObjectKind, ParsedDocument};
use crate::snapshot::MeshContent;
pub use crate::snapshot::Snapshot;

/// How often the polling fallback compares file mtimes and sizes.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Quiet time after a filesystem event before reloading, so one save is one reload.
const DEBOUNCE: Duration = Duration::from_millis(75);
/// Upper bound on debouncing when events never stop.
const MAX_DEBOUNCE: Duration = Duration::from_millis(400);

#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Namespace for objects without `metadata.namespace` and for bare `NAME` lookups.
    pub default_namespace: String,
    pub cluster_domain: String,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            default_namespace: "default".to_string(),
            cluster_domain: "cluster.local".to_string(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read config dir {}: {cause}", path.display())]
    ReadDir { path: PathBuf, cause: io::Error },
    #[error("watching the config dir needs a tokio runtime")]
    NoRuntime,
}

/// One rejected object or document, or an unreadable file. Warnings
/// ([`Snapshot::warnings`]) have the same shape but reject nothing.
#[derive(Clone, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[error("{}: {object}: {field}: {message}", file.display())]
pub struct ConfigError {
    pub file: PathBuf,
    /// `"EndpointSlice default/web-abc"`, or `"document 3"` when the object is unnamed.
    pub object: String,
    /// `"spec.ports[0].port"`.
    pub field: String,
    pub message: String,
}

pub struct Store {
    dir: Option<PathBuf>,
    default_namespace: Arc<str>,
    cluster_domain: Arc<str>,
    current: ArcSwap<Snapshot>,
    updates: watch::Sender<Arc<Snapshot>>,
    /// Serializes reloads; readers never touch it.
    state: Mutex<LoadState>,
    config_errors_total: Arc<AtomicU64>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .field("generation", &self.current.load().generation())
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct LoadState {
    /// What the last listing saw; the poller reloads when this changes.
    listing: Vec<(PathBuf, FileFingerprint)>,
    files: BTreeMap<PathBuf, FileState>,
    dir_error_logged: bool,
    /// Objects from the Kubernetes API, by REST path, each a one-document "file" so that the
    /// last-good and error rules are the config dir's own.
    api: BTreeMap<PathBuf, ApiEntry>,
}

struct ApiEntry {
    /// The watched collection it came from, so a relist can drop what is gone.
    collection: Arc<str>,
    state: FileState,
}

/// One object as the Kubernetes API serves it.
#[derive(Clone, Debug)]
pub struct ApiObject {
    /// Its REST path (`/api/v1/namespaces/shop/services/web`): errors name it where a config
    /// dir's name the file.
    pub path: PathBuf,
    pub value: serde_json::Value,
}

/// A change seen by a watch of one collection (`"v1/services"`, any stable name).
#[derive(Clone, Debug)]
pub enum ApiChange {
    /// A (re)list: these are all of the collection's objects now; any other is gone.
    Replace {
        collection: Arc<str>,
        objects: Vec<ApiObject>,
    },
    /// Added or modified.
    Apply {
        collection: Arc<str>,
        object: ApiObject,
    },
    Delete {
        path: PathBuf,
    },
}

/// Cheap change detection for the polling fallback. The inode catches atomic
/// rename-replaces and ConfigMap symlink swaps even when size and mtime match.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileFingerprint {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

struct FileState {
    /// Bytes last parsed (`None`: the file could not be read); a reload re-parses the
    /// file only if they differ.
    content: Option<Vec<u8>>,
    /// Objects the file contributes now: its valid objects plus last good versions.
    objects: BTreeMap<ObjectKey, Arc<MeshObject>>,
    errors: Vec<ConfigError>,
    /// Unknown fields of the objects parsed from the current content.
    warnings: Vec<ConfigError>,
}

impl Store {
    /// Empty store (no config dir): every resolve returns None.
    pub fn empty(cfg: StoreConfig) -> Arc<Store> {
        Arc::new(Self::new(None, cfg))
    }

    /// Reads the dir once (sync); errors only if the dir itself can't be read.
    pub fn load_dir(dir: &Path, cfg: StoreConfig) -> Result<Arc<Store>, StoreError> {
        let store = Self::new(Some(dir.to_path_buf()), cfg);
        let listing = list_dir(dir).map_err(|cause| StoreError::ReadDir {
            path: dir.to_path_buf(),
            cause,
        })?;
        {
            let mut state = store.lock_state();
            store.reload_with(&mut state, listing);
        }
        Ok(Arc::new(store))
    }

    fn new(dir: Option<PathBuf>, cfg: StoreConfig) -> Self {
        let default_namespace: Arc<str> = cfg.default_namespace.into();
        let cluster_domain: Arc<str> = cfg
            .cluster_domain
            .trim_matches('.')
            .to_ascii_lowercase()
            .into();
        let initial = Arc::new(Snapshot::empty(
            default_namespace.clone(),
            cluster_domain.clone(),
        ));
        let (updates, _) = watch::channel(initial.clone());
        Self {
            dir,
            default_namespace,
            cluster_domain,
            current: ArcSwap::new(initial),
            updates,
            state: Mutex::new(LoadState::default()),
            config_errors_total: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Lock-free: current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// New snapshots are sent here.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.updates.subscribe()
    }

    /// The config dir, if any.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Rejected objects and documents so far; each distinct error counts once per
    /// appearance, not once per reload.
    pub fn config_errors_total(&self) -> u64 {
        self.config_errors_total.load(Ordering::Relaxed)
    }

    /// The same count, shared, so a metrics registry can read it at scrape time.
    pub fn config_errors_counter(&self) -> Arc<AtomicU64> {
        self.config_errors_total.clone()
    }

    /// Applies changes seen on the Kubernetes API (the controller's source), then publishes
    /// one snapshot for all of them if anything changed. An invalid object keeps its last good
    /// version and is reported with its path, object and field, as a config file's would be.
    pub fn apply_api_changes(&self, changes: impl IntoIterator<Item = ApiChange>) {
        let mut state = self.lock_state();
        let mut changed = false;
        for change in changes {
            match change {
                ApiChange::Replace {
                    collection,
                    objects,
                } => {
                    let keep: HashSet<&Path> = objects.iter().map(|o| o.path.as_path()).collect();
                    state.api.retain(|path, e| {
                        e.collection != collection || keep.contains(path.as_path())
                    });
                    for object in objects {
                        self.apply_api_object(&mut state, collection.clone(), object);
                    }
                    changed = true;
                }
                ApiChange::Apply { collection, object } => {
                    self.apply_api_object(&mut state, collection, object);
                    changed = true;
                }
                ApiChange::Delete { path } => changed |= state.api.remove(&path).is_some(),
            }
        }
        if changed {
            self.publish_if_changed(&state);
        }
    }

    fn apply_api_object(&self, state: &mut LoadState, collection: Arc<str>, object: ApiObject) {
        let prev = state.api.remove(&object.path);
        let doc = match serde_yaml_ng::to_value(&object.value) {
            Ok(doc) => doc,
            // JSON always converts; keep the last good version if it somehow does not.
            Err(error) => {
                tracing::warn!(path = %object.path.display(), %error, "unreadable API object");
                if let Some(prev) = prev {
                    state.api.insert(object.path, prev);
                }
                return;
            }
        };
        let label = object.path.display().to_string();
        let parsed = parse_documents(
            &object.path,
            None,
            vec![(label, doc)],
            prev.as_ref().map(|p| &p.state),
            &self.default_namespace,
        );
        state.api.insert(
            object.path,
            ApiEntry {
                collection,
                state: parsed,
            },
        );
    }

    /// Re-read the dir now (used by watch and tests).
    pub fn reload(&self) {
        let Some(dir) = &self.dir else { return };
        let mut state = self.lock_state();
        match list_dir(dir) {
            Ok(listing) => {
                state.dir_error_logged = false;
                self.reload_with(&mut state, listing);
            }
            Err(error) => self.dir_unreadable(&mut state, dir, &error),
        }
    }

    /// Reloads only if a file's name, size, mtime or inode changed since the last reload.
    fn reload_if_listing_changed(&self) {
        let Some(dir) = &self.dir else { return };
        let mut state = self.lock_state();
        match list_dir(dir) {
            Ok(listing) => {
                state.dir_error_logged = false;
                if listing != state.listing {
                    self.reload_with(&mut state, listing);
                }
            }
            Err(error) => self.dir_unreadable(&mut state, dir, &error),
        }
    }

    /// A directory that vanishes is most likely mid-swap; keep serving what we have.
    fn dir_unreadable(&self, state: &mut LoadState, dir: &Path, error: &io::Error) {
        if !state.dir_error_logged {
            state.dir_error_logged = true;
            tracing::warn!(dir = %dir.display(), %error, "cannot read config dir; keeping the current mesh objects");
        }
    }

    fn lock_state(&self) -> MutexGuard<'_, LoadState> {
        // A panic mid-reload leaves state that is still internally consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reload_with(&self, state: &mut LoadState, listing: Vec<(PathBuf, FileFingerprint)>) {
        let mut previous = std::mem::take(&mut state.files);
        let mut files = BTreeMap::new();
        let mut changed = false;
        for (path, _) in &listing {
            let prev = previous.remove(path);
            let content = match std::fs::read(path) {
                Ok(content) => content,
                Err(error) => {
                    let file_state = match prev {
                        // Gone between listing and reading (a rename in flight): the next
                        // listing differs, so the poller comes back for it.
                        Some(prev) if error.kind() == io::ErrorKind::NotFound => prev,
                        None if error.kind() == io::ErrorKind::NotFound => continue,
                        prev => {
                            changed = true;
                            FileState {
                                content: None,
                                objects: prev.map(|p| p.objects).unwrap_or_default(),
                                errors: vec![ConfigError {
                                    file: path.clone(),
                                    object: "file".to_string(),
                                    field: "(read)".to_string(),
                                    message: error.to_string(),
                                }],
                                warnings: Vec::new(),
                            }
                        }
                    };
                    files.insert(path.clone(), file_state);
                    continue;
                }
            };
            let file_state = match prev {
                Some(prev) if prev.content.as_deref() == Some(content.as_slice()) => prev,
                prev => {
                    changed = true;
                    parse_file(path, content, prev.as_ref(), &self.default_namespace)
                }
            };
            files.insert(path.clone(), file_state);
        }
        // Whatever is left was deleted; its objects go with it.
        changed |= !previous.is_empty();
        state.files = files;
        state.listing = listing;
        if changed {
            self.publish_if_changed(state);
        }
    }

    fn publish_if_changed(&self, state: &LoadState) {
        let content = merge_files(
            state
                .files
                .iter()
                .chain(state.api.iter().map(|(path, e)| (path, &e.state))),
        );
        let current = self.current.load();
        if current.has_content(&content) {
            return;
        }
        let seen: HashSet<&ConfigError> = current.errors().iter().collect();
        for e in content.errors.iter().filter(|e| !seen.contains(e)) {
            self.config_errors_total.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                file = %e.file.display(),
                object = %e.object,
                field = %e.field,
                "invalid mesh config: {}",
                e.message
            );
        }
        let snapshot = Arc::new(Snapshot::build(
            current.generation() + 1,
            self.default_namespace.clone(),
            self.cluster_domain.clone(),
            content,
        ));
        // Derived from the objects, so they are logged here rather than as files are read.
        let known: HashSet<&ConfigError> = current.reference_warnings().iter().collect();
        for w in snapshot
            .reference_warnings()
            .iter()
            .filter(|w| !known.contains(w))
        {
            tracing::warn!(
                file = %w.file.display(),
                object = %w.object,
                field = %w.field,
                "dangling reference: {}",
                w.message
            );
        }
        tracing::info!(
            generation = snapshot.generation(),
            objects = snapshot.object_map().len(),
            errors = snapshot.errors().len(),
            warnings = snapshot.warnings().len(),
            "mesh config updated"
        );
        self.current.store(snapshot.clone());
        self.updates.send_replace(snapshot);
    }

    /// Starts watching (needs a tokio runtime); returns when the watcher is set up. Stops
    /// when the Store is dropped or the returned handle is dropped.
    ///
    /// Filesystem events trigger a debounced reload; a poll every 500 ms catches what
    /// events miss (renames by editors, ConfigMap symlink swaps). An empty Store has
    /// nothing to watch and returns an idle handle.
    pub fn watch(self: &Arc<Self>) -> Result<WatchHandle, StoreError> {
        self.watch_with(true)
    }

    /// `fs_events: false` runs the polling fallback alone (tests prove it suffices).
    fn watch_with(self: &Arc<Self>, fs_events: bool) -> Result<WatchHandle, StoreError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| StoreError::NoRuntime)?;
        let Some(dir) = &self.dir else {
            return Ok(WatchHandle {
                _watcher: None,
                task: None,
                stopped: Arc::default(),
            });
        };
        let kick = Arc::new(Notify::new());
        let watcher = if fs_events {
            start_fs_watcher(dir, kick.clone())
        } else {
            None
        };
        let stopped = Arc::new(Mutex::new(false));
        let task = runtime.spawn(watch_loop(Arc::downgrade(self), kick, stopped.clone()));
        Ok(WatchHandle {
            _watcher: watcher,
            task: Some(task),
            stopped,
        })
    }
}

/// Keeps the watch running; dropping it stops the watch.
#[derive(Debug)]
#[must_use = "dropping the handle stops the watch"]
pub struct WatchHandle {
    _watcher: Option<notify::RecommendedWatcher>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// Set when the handle drops; each reload checks it while holding it. Aborting the task
    /// can't stop a reload already handed to the blocking pool, which may not have started
    /// yet (a loaded machine): without this it could still pick up a change made after the
    /// handle was dropped.
    stopped: Arc<Mutex<bool>>,
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
        // Waits out a reload in progress, so none runs once the handle is gone.
        *self.stopped.lock().unwrap_or_else(PoisonError::into_inner) = true;
    }
}

fn start_fs_watcher(dir: &Path, kick: Arc<Notify>) -> Option<notify::RecommendedWatcher> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let handler = move |event: notify::Result<notify::Event>| match event {
        // Opens and reads (ours included) change nothing.
        Ok(event) if matches!(event.kind, EventKind::Access(_)) => {}
        Ok(_) => kick.notify_one(),
        Err(error) => {
            tracing::debug!(%error, "config dir watch error; reloading to be safe");
            kick.notify_one();
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(error) => {
            tracing::warn!(%error, "cannot create a filesystem watcher; polling only");
            return None;
        }
    };
    match watcher.watch(dir, RecursiveMode::NonRecursive) {
        Ok(()) => Some(watcher),
        Err(error) => {
            tracing::warn!(dir = %dir.display(), %error, "cannot watch config dir; polling only");
            None
        }
    }
}

async fn watch_loop(store: Weak<Store>, kick: Arc<Notify>, stopped: Arc<Mutex<bool>>) {
    let mut poll = tokio::time::interval(POLL_INTERVAL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = tokio::select! {
            _ = kick.notified() => {
                debounce(&kick).await;
                true
            }
            _ = poll.tick() => false,
        };
        let Some(store) = store.upgrade() else { return };
        // File IO stays off the async workers.
        let stopped = stopped.clone();
        let reload = tokio::task::spawn_blocking(move || {
            let stopped = stopped.lock().unwrap_or_else(PoisonError::into_inner);
            if *stopped {
                return;
            }
            if event {
                store.reload();
            } else {
                store.reload_if_listing_changed();
            }
        });
        if let Err(error) = reload.await {
            tracing::error!(%error, "config reload failed");
        }
    }
}

async fn debounce(kick: &Notify) {
    let deadline = tokio::time::Instant::now() + MAX_DEBOUNCE;
    while tokio::time::timeout(DEBOUNCE, kick.notified())
        .await
        .is_ok()
    {
        if tokio::time::Instant::now() >= deadline {
            break;
        }
    }
}

/// Config files: `*.yaml`, `*.yml`, `*.json`; hidden files (editor swap files, the
/// `..data` entries of ConfigMap mounts) are skipped. Public so readers of the same dir
/// (the CLI's proxy listing) pick the same files.
pub fn is_config_file_name(name: &str) -> bool {
    if name.starts_with('.') {
        return false;
    }
    let lower = name.to_ascii_lowercase();
    [".yaml", ".yml", ".json"]
        .iter()
        .any(|ext| lower.len() > ext.len() && lower.ends_with(ext))
}

fn list_dir(dir: &Path) -> io::Result<Vec<(PathBuf, FileFingerprint)>> {
    let mut listing = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if !name.to_str().is_some_and(is_config_file_name) {
            continue;
        }
        let path = entry.path();
        // Follows symlinks: ConfigMap files are links into a swapped directory.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&meta);
        #[cfg(not(unix))]
        let inode = 0;
        listing.push((
            path,
            FileFingerprint {
                modified: meta.modified().ok(),
                len: meta.len(),
                inode,
            },
        ));
    }
    listing.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(listing)
}

/// Splits a file into documents labelled for error messages. A syntax error anywhere
/// rejects the whole file.
fn split_documents(path: &Path, content: &[u8]) -> Result<Vec<(String, Value)>, ConfigError> {
    let error = |object: String, field: &str, message: String| ConfigError {
        file: path.to_path_buf(),
        object,
        field: field.to_string(),
        message,
    };
    let text = std::str::from_utf8(content)
        .map_err(|e| error("file".into(), "(encoding)", format!("not UTF-8: {e}")))?;
    let is_json = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));

    let mut docs = Vec::new();
    if is_json {
        // JSON is parsed as JSON: YAML rejects some valid JSON (tabs in indentation).
        for (i, doc) in serde_json::Deserializer::from_str(text)
            .into_iter::<serde_json::Value>()
            .enumerate()
        {
            let label = format!("document {}", i + 1);
            let doc = doc.map_err(|e| error(label.clone(), "(json syntax)", e.to_string()))?;
            let doc = serde_yaml_ng::to_value(doc)
                .map_err(|e| error(label.clone(), "(json syntax)", e.to_string()))?;
            docs.push((label, doc));
        }
    } else {
        for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let label = format!("document {}", i + 1);
            let mut doc = Value::deserialize(de)
                .map_err(|e| error(label.clone(), "(yaml syntax)", e.to_string()))?;
            doc.apply_merge()
                .map_err(|e| error(label.clone(), "(yaml syntax)", e.to_string()))?;
            docs.push((label, doc));
        }
    }

    // `kind: List` (what `kubectl get -o yaml` prints) holds its objects in `items`.
    let mut expanded = Vec::with_capacity(docs.len());
    for (label, doc) in docs {
        let is_list = doc.get("kind").and_then(Value::as_str) == Some("List");
        match doc.get("items").and_then(Value::as_sequence) {
            Some(items) if is_list => {
                for (j, item) in items.iter().enumerate() {
                    expanded.push((format!("{label} items[{j}]"), item.clone()));
                }
            }
            _ => expanded.push((label, doc)),
        }
    }
    Ok(expanded)
}

/// Parses one file's new content. Objects that are now invalid keep the version the file
/// last contributed.
fn parse_file(
    path: &Path,
    content: Vec<u8>,
    prev: Option<&FileState>,
    default_namespace: &str,
) -> FileState {
    match split_documents(path, &content) {
        Ok(docs) => parse_documents(path, Some(content), docs, prev, default_namespace),
        Err(error) => FileState {
            content: Some(content),
            objects: prev.map(|p| p.objects.clone()).unwrap_or_default(),
            errors: vec![error],
            warnings: Vec::new(),
        },
    }
}

/// Parses the documents of one file (or one API object). Objects that are now invalid keep
/// the version the source last contributed.
fn parse_documents(
    path: &Path,
    content: Option<Vec<u8>>,
    docs: Vec<(String, Value)>,
    prev: Option<&FileState>,
    default_namespace: &str,
) -> FileState {
    let prev_objects = prev.map(|p| &p.objects);

    let mut objects: BTreeMap<ObjectKey, Arc<MeshObject>> = BTreeMap::new();
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let mut keep_last_good: Vec<ObjectKey> = Vec::new();
    // Kinds of invalid documents whose name could not be read (None: kind unknown too).
    let mut unidentified: Vec<Option<ObjectKind>> = Vec::new();
    for (label, doc) in &docs {
        match parse_document(doc, default_namespace) {
            ParsedDocument::Empty => {}
            ParsedDocument::Skipped { api_version, kind } => {
                tracing::debug!(file = %path.display(), object = %label, %api_version, %kind, "skipping unknown kind");
            }
            ParsedDocument::Valid {
                object,
                unknown_fields,
            } => {
                let key = object.key();
                for field in &unknown_fields {
                    tracing::warn!(file = %path.display(), object = %key, %field, "unknown field ignored");
                }
                if objects.contains_key(&key) {
                    errors.push(ConfigError {
                        file: path.to_path_buf(),
                        object: key.to_string(),
                        field: "metadata.name".to_string(),
                        message: format!("duplicate object ({label}); the first one is used"),
                    });
                    continue;
                }
                warnings.extend(unknown_fields.into_iter().map(|field| ConfigError {
                    file: path.to_path_buf(),
                    object: key.to_string(),
                    field,
                    message: "unknown field, ignored".to_string(),
                }));
                objects.insert(key, Arc::new(object));
            }
            ParsedDocument::Invalid { key, kind, error } => {
                errors.push(ConfigError {
                    file: path.to_path_buf(),
                    object: key
                        .as_ref()
                        .map_or_else(|| label.clone(), ToString::to_string),
                    field: error.field,
                    message: error.message,
                });
                match key {
                    Some(key) => keep_last_good.push(key),
                    None => unidentified.push(kind),
                }
            }
        }
    }

    if let Some(prev_objects) = prev_objects {
        for key in keep_last_good {
            if let Some(old) = prev_objects.get(&key) {
                objects.entry(key).or_insert_with(|| old.clone());
            }
        }
        // An invalid document we cannot name may be any object the file used to hold, so
        // none of those (of its kind) is dropped until the file is fixed.
        for (key, old) in prev_objects {
            if unidentified.iter().any(|k| k.is_none_or(|k| k == key.kind)) {
                objects.entry(key.clone()).or_insert_with(|| old.clone());
            }
        }
    }

    FileState {
        content,
        objects,
        errors,
        warnings,
    }
}

/// Merges every file's contribution; files are visited in path order, so when two files
/// define the same object the first path wins and the other is reported (and the ignored
/// copy's warnings are dropped).
fn merge_files<'a>(files: impl Iterator<Item = (&'a PathBuf, &'a FileState)>) -> MeshContent {
    let mut content = MeshContent::default();
    for (path, file) in files {
        content.errors.extend(file.errors.iter().cloned());
        let mut ignored = Vec::new();
        for (key, object) in &file.objects {
            if let Some(first) = content.sources.get(key) {
                content.errors.push(ConfigError {
                    file: path.clone(),
                    object: key.to_string(),
                    field: "metadata.name".to_string(),
                    message: format!("already defined in {}; ignored", first.display()),
                });
                ignored.push(key.to_string());
                continue;
            }
            content.sources.insert(key.clone(), path.clone());
            content.objects.insert(key.clone(), object.clone());
        }
        content.warnings.extend(
            file.warnings
                .iter()
                .filter(|w| !ignored.contains(&w.object))
                .cloned(),
        );
    }
    content
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{addrs, endpoint, load, web_slice, write, WEB_SERVICE};

    fn cfg() -> StoreConfig {
        StoreConfig::default()
    }

    /// Waits (at most 1 s) until a published snapshot satisfies `pred`.
    async fn wait_for(
        rx: &mut watch::Receiver<Arc<Snapshot>>,
        pred: impl Fn(&Snapshot) -> bool,
    ) -> Arc<Snapshot> {
        let waited = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                let snap = rx.borrow_and_update().clone();
                if pred(&snap) {
                    return snap;
                }
                rx.changed().await.expect("store alive");
            }
        })
        .await;
        waited.expect("the change should be seen within 1 s")
    }

    fn web_addrs(snap: &Snapshot) -> Vec<String> {
        snap.resolve_name("web.shop", 80)
            .map(|r| addrs(&r))
            .unwrap_or_default()
    }

    #[test]
    fn multi_document_file_with_unknown_kinds_and_empty_documents() {
        let file = format!(
            "---\n{WEB_SERVICE}---\n# only a comment\n---\napiVersion: apps/v1\nkind: Deployment\n\
             metadata: {{name: web}}\n---\n{}",
            web_slice("web-a", &endpoint("10.0.0.1", "web-1"))
        );
        let (_dir, store) = load(&[("all.yaml", &file)], cfg());
        let snap = store.snapshot();
        assert_eq!(snap.generation(), 1);
        assert!(snap.errors().is_empty(), "{:?}", snap.errors());
        assert_eq!(store.config_errors_total(), 0);
        assert_eq!(snap.objects().count(), 2);
        assert_eq!(web_addrs(&snap), ["10.0.0.1:8080"]);
    }

    #[test]
    fn json_files_and_lists_load_and_other_files_are_ignored() {
        let json = r#"{"apiVersion": "v1", "kind": "List", "items": [
	{"apiVersion": "v1", "kind": "Service",
	 "metadata": {"name": "api", "namespace": "shop"},
	 "spec": {"ports": [{"port": 8080}]}}]}"#;
        let (dir, store) = load(
            &[
                ("api.json", json),
                (".hidden.yaml", WEB_SERVICE),
                ("web.yaml~", WEB_SERVICE),
                ("web.yaml.swp", WEB_SERVICE),
                ("notes.txt", "not yaml: ["),
            ],
            cfg(),
        );
        std::fs::create_dir(dir.path().join("sub.yaml")).expect("subdir");
        store.reload();
        let snap = store.snapshot();
        assert!(snap.errors().is_empty(), "{:?}", snap.errors());
        assert!(snap.resolve_name("api.shop", 8080).is_some());
        assert!(snap.resolve_name("web.shop", 80).is_none());
    }

    #[test]
    fn invalid_object_is_reported_and_last_good_version_stays() {
        let good = format!(
            "{WEB_SERVICE}---\n{}",
            web_slice("web-a", &endpoint("10.0.0.1", "p1"))
        );
        let (dir, store) = load(&[("web.yaml", &good)], cfg());
        let path = dir.path().join("web.yaml");
        assert_eq!(web_addrs(&store.snapshot()), ["10.0.0.1:8080"]);

        // The slice gains an endpoint but also a bad port: the whole new version is rejected.
        let bad = good.replace("port: 8080", "port: 70000") + &endpoint("10.0.0.2", "p2");
        write(dir.path(), "web.yaml", &bad);
        store.reload();
        let snap = store.snapshot();
        assert_eq!(snap.generation(), 2);
        assert_eq!(web_addrs(&snap), ["10.0.0.1:8080"], "last good slice stays");
        assert_eq!(snap.errors().len(), 1);
        let err = &snap.errors()[0];
        assert_eq!(err.file, path);
        assert_eq!(err.object, "EndpointSlice shop/web-a");
        assert_eq!(err.field, "ports[0].port");
        assert_eq!(
            err.to_string(),
            format!(
                "{}: EndpointSlice shop/web-a: ports[0].port: invalid port 70000: must be an \
                 integer from 1 to 65535",
                path.display()
            )
        );
        assert_eq!(store.config_errors_total(), 1);

        // Polling the same broken file again neither republishes nor recounts.
        store.reload();
        store.reload_if_listing_changed();
        assert_eq!(store.snapshot().generation(), 2);
        assert_eq!(store.config_errors_total(), 1);

        // Fixing it publishes the new version and clears the error.
        write(
            dir.path(),
            "web.yaml",
            &(good.clone() + &endpoint("10.0.0.2", "p2")),
        );
        store.reload();
        let snap = store.snapshot();
        assert_eq!(snap.generation(), 3);
        assert!(snap.errors().is_empty());
        assert_eq!(web_addrs(&snap), ["10.0.0.1:8080", "10.0.0.2:8080"]);
        assert_eq!(store.config_errors_total(), 1);
    }

    #[test]
    fn last_good_is_kept_per_object() {
        let api = WEB_SERVICE
            .replace("name: web\n", "name: api\n")
            .replace("10.96.0.10", "10.96.0.20");
        let (dir, store) = load(&[("svcs.yaml", &format!("{WEB_SERVICE}---\n{api}"))], cfg());
        // web changes validly (new cluster IP); api's new version is invalid.
        let web2 = WEB_SERVICE.replace("10.96.0.10", "10.96.0.11");
        let api2 = api.replace("10.96.0.20", "10.96.0.300");
        write(dir.path(), "svcs.yaml", &format!("{web2}---\n{api2}"));
        store.reload();
        let snap = store.snapshot();
        let ip = |s: &str| s.parse().expect("addr");
        assert!(
            snap.resolve_cluster_ip(ip("10.96.0.11:80")).is_some(),
            "web updated"
        );
        assert!(snap.resolve_cluster_ip(ip("10.96.0.10:80")).is_none());
        let api_now = snap
            .resolve_cluster_ip(ip("10.96.0.20:80"))
            .expect("api kept");
        assert_eq!(&*api_now.service.name, "api");
        assert_eq!(snap.errors().len(), 1);
        assert_eq!(snap.errors()[0].object, "Service shop/api");
        assert_eq!(snap.errors()[0].field, "spec.clusterIP");
    }

    #[test]
    fn a_document_that_lost_its_name_does_not_drop_objects() {
        let slice = web_slice("web-a", &endpoint("10.0.0.1", "p1"));
        let (dir, store) = load(
            &[("web.yaml", &format!("{WEB_SERVICE}---\n{slice}"))],
            cfg(),
        );
        // The slice's name is deleted by mistake: it can't be identified, so the file's
        // previous slices stay until the file is fixed.
        let broken = slice.replace("  name: web-a\n", "");
        write(
            dir.path(),
            "web.yaml",
            &format!("{WEB_SERVICE}---\n{broken}"),
        );
        store.reload();
        let snap = store.snapshot();
        assert_eq!(web_addrs(&snap), ["10.0.0.1:8080"]);
        assert_eq!(snap.errors()[0].object, "document 2");
        assert_eq!(snap.errors()[0].field, "metadata.name");
    }

    #[test]
    fn syntax_error_keeps_the_files_objects() {
        let good = format!(
            "{WEB_SERVICE}---\n{}",
            web_slice("web-a", &endpoint("10.0.0.1", "p1"))
        );
        let (dir, store) = load(&[("web.yaml", &good)], cfg());
        write(
            dir.path(),
            "web.yaml",
            &format!("{WEB_SERVICE}---\nkind: [unclosed\n"),
        );
        store.reload();
        let snap = store.snapshot();
        assert_eq!(web_addrs(&snap), ["10.0.0.1:8080"]);
        assert_eq!(snap.errors().len(), 1);
        assert_eq!(snap.errors()[0].object, "document 2");
        assert_eq!(snap.errors()[0].field, "(yaml syntax)");
        assert_eq!(store.config_errors_total(), 1);
    }

    #[test]
    fn unnamed_invalid_document_is_labelled_by_position() {
        let file = format!(
            "{WEB_SERVICE}---\napiVersion: v1\nkind: Service\nmetadata: {{namespace: shop}}\n"
        );
        let (dir, store) = load(&[("web.yaml", &file)], cfg());
        let snap = store.snapshot();
        assert!(
            snap.resolve_name("web.shop", 80).is_some(),
            "valid neighbour loads"
        );
        let err = &snap.errors()[0];
        assert_eq!(
            err.to_string(),
            format!(
                "{}: document 2: metadata.name: is required",
                dir.path().join("web.yaml").display()
            )
        );
    }

    #[test]
    fn deleted_file_removes_its_objects() {
        let slice = web_slice("web-a", &endpoint("10.0.0.1", "p1"));
        let (dir, store) = load(&[("web.yaml", WEB_SERVICE), ("slice.yaml", &slice)], cfg());
        let mut rx = store.subscribe();
        std::fs::remove_file(dir.path().join("slice.yaml")).expect("rm");
        store.reload();
        assert!(rx.has_changed().expect("alive"));
        let snap = rx.borrow_and_update().clone();
        assert_eq!(snap.generation(), 2);
        let web = snap.resolve_name("web.shop", 80).expect("service stays");
        assert!(web.endpoints.is_empty());
        std::fs::remove_file(dir.path().join("web.yaml")).expect("rm");
        store.reload();
        assert_eq!(store.snapshot().resolve_name("web.shop", 80), None);
    }

    #[test]
    fn a_reload_that_changes_nothing_publishes_nothing() {
        let (dir, store) = load(&[("web.yaml", WEB_SERVICE)], cfg());
        let rx = store.subscribe();
        store.reload();
        // Same objects, new bytes (a comment): still nothing to publish.
        write(dir.path(), "web.yaml", &format!("# touched\n{WEB_SERVICE}"));
        store.reload();
        assert!(!rx.has_changed().expect("alive"));
        assert_eq!(store.snapshot().generation(), 1);
    }

    #[test]
    fn same_object_in_two_files_first_path_wins() {
        let other = WEB_SERVICE.replace("10.96.0.10", "10.96.0.99");
        let (dir, store) = load(&[("a.yaml", WEB_SERVICE), ("b.yaml", &other)], cfg());
        let snap = store.snapshot();
        assert!(snap
            .resolve_cluster_ip("10.96.0.10:80".parse().expect("addr"))
            .is_some());
        assert!(snap
            .resolve_cluster_ip("10.96.0.99:80".parse().expect("addr"))
            .is_none());
        assert_eq!(snap.errors().len(), 1);
        assert_eq!(snap.errors()[0].file, dir.path().join("b.yaml"));
        assert_eq!(snap.errors()[0].object, "Service shop/web");
    }

    #[test]
    fn unknown_field_is_warned_about_but_accepted() {
        use std::io::Write;
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl Write for Buf {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().expect("log buffer").extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish();
        let svc = WEB_SERVICE.replace("  - name: admin\n", "  - name: admin\n    weight: 5\n");
        let (_dir, store) =
            tracing::subscriber::with_default(subscriber, || load(&[("web.yaml", &svc)], cfg()));
        let snap = store.snapshot();
        assert!(snap.errors().is_empty());
        assert_eq!(store.config_errors_total(), 0);
        assert!(snap.resolve_name("web.shop", 9000).is_some());
        let logs = String::from_utf8(buf.0.lock().expect("log buffer").clone()).expect("utf8");
        assert!(logs.contains("WARN"), "{logs}");
        assert!(logs.contains("unknown field ignored"), "{logs}");
        assert!(logs.contains("field=spec.ports[1].weight"), "{logs}");
        assert!(logs.contains("object=Service shop/web"), "{logs}");
        assert!(logs.contains("web.yaml"), "{logs}");
    }

    #[test]
    fn unknown_fields_are_published_as_warnings_and_objects_name_their_file() {
        let svc = WEB_SERVICE.replace("  - name: admin\n", "  - name: admin\n    weight: 5\n");
        let (dir, store) = load(&[("web.yaml", &svc)], cfg());
        let path = dir.path().join("web.yaml");
        let snap = store.snapshot();
        assert!(snap.errors().is_empty(), "{:?}", snap.errors());
        assert_eq!(
            snap.warnings(),
            [ConfigError {
                file: path.clone(),
                object: "Service shop/web".to_string(),
                field: "spec.ports[1].weight".to_string(),
                message: "unknown field, ignored".to_string(),
            }]
        );
        let key = snap.objects().next().expect("the service").key();
        assert_eq!(snap.source_file(&key), Some(path.as_path()));

        // A later file's copy of the same object is ignored, and so are its warnings.
        write(dir.path(), "z.yaml", &svc);
        store.reload();
        let snap = store.snapshot();
        assert_eq!(snap.errors().len(), 1);
        assert_eq!(snap.warnings().len(), 1);
        assert_eq!(snap.warnings()[0].file, path);
        assert_eq!(snap.source_file(&key), Some(path.as_path()));

        // Fixing the field clears the warning: a new snapshot, though no object changed.
        std::fs::remove_file(dir.path().join("z.yaml")).expect("rm");
        write(dir.path(), "web.yaml", WEB_SERVICE);
        store.reload();
        let snap = store.snapshot();
        assert!(snap.warnings().is_empty(), "{:?}", snap.warnings());
        assert!(snap.errors().is_empty());
        assert_eq!(snap.generation(), 3);
    }

    #[test]
    fn unreadable_dir_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope");
        let err = Store::load_dir(&missing, cfg()).expect_err("missing dir");
        assert!(matches!(err, StoreError::ReadDir { .. }));
        assert!(
            err.to_string().contains(&missing.display().to_string()),
            "{err}"
        );

        let file = dir.path().join("file.yaml");
        write(dir.path(), "file.yaml", WEB_SERVICE);
        let err = Store::load_dir(&file, cfg()).expect_err("not a dir");
        assert!(err.to_string().contains("file.yaml"), "{err}");
    }

    #[test]
    fn vanished_dir_keeps_serving_the_last_objects() {
        let (dir, store) = load(&[("web.yaml", WEB_SERVICE)], cfg());
        let path = dir.path().to_path_buf();
        drop(dir);
        store.reload();
        store.reload_if_listing_changed();
        assert!(!path.exists());
        assert!(store.snapshot().resolve_name("web.shop", 80).is_some());
    }

    #[test]
    fn polling_notices_changed_files() {
        let (dir, store) = load(&[("web.yaml", WEB_SERVICE)], cfg());
        write(
            dir.path(),
            "slice.yaml",
            &web_slice("web-a", &endpoint("10.0.0.1", "p1")),
        );
        store.reload_if_listing_changed();
        assert_eq!(web_addrs(&store.snapshot()), ["10.0.0.1:8080"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watch_picks_up_a_rewritten_slice() {
        let slice = web_slice("web-a", &endpoint("10.0.0.1", "p1"));
        let (dir, store) = load(&[("web.yaml", WEB_SERVICE), ("slice.yaml", &slice)], cfg());
        let _watch = store.watch().expect("watch");
        let mut rx = store.subscribe();
        let two = web_slice(
            "web-a",
            &(endpoint("10.0.0.1", "p1") + &endpoint("10.0.0.2", "p2")),
        );
        write(dir.path(), "slice.yaml", &two);
        let snap = wait_for(&mut rx, |s| web_addrs(s).len() == 2).await;
        assert_eq!(web_addrs(&snap), ["10.0.0.1:8080", "10.0.0.2:8080"]);
        assert!(snap.generation() >= 2);
        assert_eq!(store.snapshot().generation(), snap.generation());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watch_picks_up_an_atomic_rename_replace() {
        let slice = web_slice("web-a", &endpoint("10.0.0.1", "p1"));
        let (dir, store) = load(&[("web.yaml", WEB_SERVICE), ("slice.yaml", &slice)], cfg());
        let _watch = store.watch().expect("watch");
        let mut rx = store.subscribe();
        // What editors and `kubectl`-style tools do: write a temp file, rename over.
        write(
            dir.path(),
            ".slice.yaml.tmp",
            &web_slice("web-a", &endpoint("10.0.0.3", "p3")),
        );
        std::fs::rename(
            dir.path().join(".slice.yaml.tmp"),
            dir.path().join("slice.yaml"),
        )
        .expect("rename");
        let snap = wait_for(&mut rx, |s| web_addrs(s) == ["10.0.0.3:8080"]).await;
        assert!(snap.errors().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn polling_alone_picks_up_changes_within_a_second() {
        let (dir, store) = load(&[("web.yaml", WEB_SERVICE)], cfg());
        let _watch = store.watch_with(false).expect("watch");
        let mut rx = store.subscribe();
        write(
            dir.path(),
            "slice.yaml",
            &web_slice("web-a", &endpoint("10.0.0.1", "p1")),
        );
        wait_for(&mut rx, |s| web_addrs(s) == ["10.0.0.1:8080"]).await;
        std::fs::remove_file(dir.path().join("slice.yaml")).expect("rm");
        wait_for(&mut rx, |s| web_addrs(s).is_empty()).await;
    }

    #[cfg(unix)]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watch_picks_up_a_configmap_style_symlink_swap() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        // Kubernetes' layout: name.yaml -> ..data/name.yaml, ..data -> ..<timestamp>/.
        std::fs::create_dir(root.join("..v1")).expect("mkdir");
        write(&root.join("..v1"), "web.yaml", WEB_SERVICE);
        write(
            &root.join("..v1"),
            "slice.yaml",
            &web_slice("web-a", &endpoint("10.0.0.1", "p1")),
        );
        symlink("..v1", root.join("..data")).expect("symlink");
        symlink("..data/web.yaml", root.join("web.yaml")).expect("symlink");
        symlink("..data/slice.yaml", root.join("slice.yaml")).expect("symlink");
        let store = Store::load_dir(root, cfg()).expect("load");
        assert_eq!(web_addrs(&store.snapshot()), ["10.0.0.1:8080"]);
        let _watch = store.watch().expect("watch");
        let mut rx = store.subscribe();

        std::fs::create_dir(root.join("..v2")).expect("mkdir");
        write(&root.join("..v2"), "web.yaml", WEB_SERVICE);
        write(
            &root.join("..v2"),
            "slice.yaml",
            &web_slice("web-a", &endpoint("10.0.0.5", "p5")),
        );
        symlink("..v2", root.join("..data_tmp")).expect("symlink");
        std::fs::rename(root.join("..data_tmp"), root.join("..data")).expect("swap");
        std::fs::remove_dir_all(root.join("..v1")).expect("rm old");

        let snap = wait_for(&mut rx, |s| web_addrs(s) == ["10.0.0.5:8080"]).await;
        assert!(snap.errors().is_empty(), "{:?}", snap.errors());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_the_handle_stops_watching() {
        let (dir, store) = load(&[("web.yaml", WEB_SERVICE)], cfg());
        let watch = store.watch().expect("watch");
        drop(watch);
        write(
            dir.path(),
            "slice.yaml",
            &web_slice("web-a", &endpoint("10.0.0.1", "p1")),
        );
        tokio::time::sleep(POLL_INTERVAL * 2).await;
        assert_eq!(store.snapshot().generation(), 1);
        // An explicit reload still works.
        store.reload();
        assert_eq!(web_addrs(&store.snapshot()), ["10.0.0.1:8080"]);
    }

    #[tokio::test]
    async fn empty_store_watch_is_idle() {
        let store = Store::empty(cfg());
        let _watch = store.watch().expect("watch");
        store.reload();
        assert_eq!(store.snapshot().generation(), 0);
    }

    #[test]
    fn watch_without_runtime_is_an_error() {
        let (_dir, store) = load(&[], cfg());
        assert!(matches!(store.watch(), Err(StoreError::NoRuntime)));
    }

    /// A YAML test object as the API would serve it, at `path`.
    fn api_object(path: &str, yaml: &str) -> ApiObject {
        ApiObject {
            path: path.into(),
            value: serde_yaml_ng::from_str(yaml).expect("test YAML"),
        }
    }

    #[test]
    fn api_changes_follow_the_config_dirs_rules() {
        let store = Store::empty(cfg());
        let services: Arc<str> = "v1/services".into();
        let slices: Arc<str> = "discovery.k8s.io/v1/endpointslices".into();
        let svc_path = "/api/v1/namespaces/shop/services/web";
        let slice = |name: &str, ip: &str| {
            api_object(
                &format!("/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices/{name}"),
                &web_slice(name, &endpoint(ip, "p1")),
            )
        };
        store.apply_api_changes([
            ApiChange::Replace {
                collection: services.clone(),
                objects: vec![api_object(svc_path, WEB_SERVICE)],
            },
            ApiChange::Replace {
                collection: slices.clone(),
                objects: vec![slice("web-a", "10.0.0.1")],
            },
        ]);
        // Both changes, one snapshot.
        assert_eq!(store.snapshot().generation(), 1);
        assert_eq!(web_addrs(&store.snapshot()), ["10.0.0.1:8080"]);

        // An invalid version keeps the last good one and names the API path and the field.
        let mut bad = serde_yaml_ng::from_str::<serde_json::Value>(&web_slice(
            "web-a",
            &endpoint("10.0.0.2", "p1"),
        ))
        .expect("yaml");
        bad["addressType"] = "IPv5".into();
        store.apply_api_changes([ApiChange::Apply {
            collection: slices.clone(),
            object: ApiObject {
                path: "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices/web-a".into(),
                value: bad,
            },
        }]);
        let snap = store.snapshot();
        assert_eq!(web_addrs(&snap), ["10.0.0.1:8080"]);
        let error = &snap.errors()[0];
        assert_eq!(
            error.to_string(),
            "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices/web-a: \
             EndpointSlice shop/web-a: addressType: unsupported address type \"IPv5\": \
             expected IPv4, IPv6 or FQDN"
        );
        assert_eq!(store.config_errors_total(), 1);

        // A relist drops what is gone from that collection only.
        store.apply_api_changes([ApiChange::Replace {
            collection: slices.clone(),
            objects: vec![slice("web-b", "10.0.0.3")],
        }]);
        let snap = store.snapshot();
        assert_eq!(web_addrs(&snap), ["10.0.0.3:8080"]);
        assert!(snap.errors().is_empty());
        store.apply_api_changes([ApiChange::Delete {
            path: svc_path.into(),
        }]);
        assert!(store.snapshot().resolve_name("web.shop", 80).is_none());
        // Deleting what is not there publishes nothing.
        let generation = store.snapshot().generation();
        store.apply_api_changes([ApiChange::Delete {
            path: svc_path.into(),
        }]);
        assert_eq!(store.snapshot().generation(), generation);
    }
}
