//! The fake etcd: objects, the global resourceVersion counter and the bounded event history that
//! watches replay from and paginated lists take their snapshots from.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

/// A kind the server knows: discovery lists it and list/watch serve it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceType {
    /// API group; "" for the core group.
    pub group: String,
    pub version: String,
    pub kind: String,
    /// The URL path segment, e.g. "endpointslices".
    pub plural: String,
    pub namespaced: bool,
}

impl ResourceType {
    pub fn new(group: &str, version: &str, kind: &str, plural: &str, namespaced: bool) -> Self {
        Self {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
            plural: plural.into(),
            namespaced,
        }
    }

    /// "v1" for core, "group/version" otherwise.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// Why [`crate::FakeApiServer::apply`] (or a POST/PUT/PATCH) refused an object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FakeApiError {
    #[error("no kind {kind:?} registered for apiVersion {api_version:?}")]
    UnknownKind { api_version: String, kind: String },
    #[error("invalid object: {0}")]
    Invalid(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("conflict: {0}")]
    Conflict(String),
}

/// How a write treats an existing object.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Write {
    Upsert,
    Create,
    /// Replace an existing object; a set `metadata.resourceVersion` must match (optimistic concurrency).
    Update,
}

/// (namespace or "" for cluster-scoped, name)
pub(crate) type ObjKey = (String, String);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

pub(crate) struct Event {
    pub rv: u64,
    pub ty: usize,
    pub key: ObjKey,
    pub kind: EventType,
    pub object: Arc<Value>,
    /// The object before this event: lets a watch turn label-selector transitions into
    /// ADDED/DELETED and lets a list rebuild the state at an older resourceVersion.
    pub prev: Option<Arc<Value>>,
}

/// An injected failure for requests to one resource plural.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this HTTP status and a Status body.
    Status(u16),
    /// Never answer (until the client gives up or the server stops).
    Hang,
}

/// Everything behind the server's one mutex.
pub(crate) struct State {
    pub types: Vec<ResourceType>,
    /// Parallel to `types`.
    pub objects: Vec<BTreeMap<ObjKey, Arc<Value>>>,
    /// The last resourceVersion handed out, like etcd's revision.
    pub rv: u64,
    pub history: VecDeque<Event>,
    pub history_limit: usize,
    /// Events with rv <= this are forgotten: starting a watch or list page before it gets 410.
    pub compacted_rv: u64,
    /// Bumped by an explicit compact(): open watches end with 410.
    pub epoch: u64,
    pub bookmark_seq: u64,
    pub bookmark_interval: Option<Duration>,
    pub counts: BTreeMap<(String, String), u64>,
    /// token -> username
    pub tokens: HashMap<String, String>,
    pub faults: HashMap<String, (Fault, u32)>,
    next_uid: u64,
}

impl State {
    pub(crate) fn new() -> Self {
        Self {
            types: Vec::new(),
            objects: Vec::new(),
            rv: 1,
            history: VecDeque::new(),
            history_limit: 10_000,
            compacted_rv: 0,
            epoch: 0,
            bookmark_seq: 0,
            bookmark_interval: Some(Duration::from_secs(1)),
            counts: BTreeMap::new(),
            tokens: HashMap::new(),
            faults: HashMap::new(),
            next_uid: 0,
        }
    }

    pub(crate) fn register(&mut self, r: ResourceType) {
        let same =
            |t: &ResourceType| t.group == r.group && t.version == r.version && t.plural == r.plural;
        match self.types.iter().position(same) {
            Some(i) => self.types[i] = r,
            None => {
                self.types.push(r);
                self.objects.push(BTreeMap::new());
            }
        }
    }

    pub(crate) fn type_by_kind(&self, api_version: &str, kind: &str) -> Option<usize> {
        self.types
            .iter()
            .position(|t| t.kind == kind && t.api_version() == api_version)
    }

    pub(crate) fn type_by_path(&self, group: &str, version: &str, plural: &str) -> Option<usize> {
        self.types
            .iter()
            .position(|t| t.group == group && t.version == version && t.plural == plural)
    }

    pub(crate) fn key(&self, ty: usize, namespace: Option<&str>, name: &str) -> ObjKey {
        let ns = if self.types[ty].namespaced {
            namespace.unwrap_or("default")
        } else {
            ""
        };
        (ns.to_string(), name.to_string())
    }

    pub(crate) fn count(&mut self, verb: &str, resource: &str) {
        *self
            .counts
            .entry((verb.into(), resource.into()))
            .or_default() += 1;
    }

    /// Stores `obj` (create, replace or no-op when nothing but server-set metadata differs).
    pub(crate) fn write(
        &mut self,
        mut obj: Value,
        mode: Write,
    ) -> Result<Arc<Value>, FakeApiError> {
        let api_version = obj["apiVersion"].as_str().unwrap_or_default().to_string();
        let kind = obj["kind"].as_str().unwrap_or_default().to_string();
        let ty =
            self.type_by_kind(&api_version, &kind)
                .ok_or_else(|| FakeApiError::UnknownKind {
                    api_version,
                    kind: kind.clone(),
                })?;
        let meta = match obj.get_mut("metadata") {
            Some(Value::Object(m)) => m,
            _ => return Err(FakeApiError::Invalid("metadata must be an object".into())),
        };
        if meta
            .get("name")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            let Some(prefix) = meta.get("generateName").and_then(Value::as_str) else {
                return Err(FakeApiError::Invalid(
                    "metadata.name or generateName is required".into(),
                ));
            };
            let name = format!("{prefix}{:05x}", (self.next_uid + 1) & 0xfffff);
            meta.insert("name".into(), name.into());
        }
        let name = meta["name"].as_str().unwrap_or_default().to_string();
        let namespace = meta
            .get("namespace")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty());
        let key = self.key(ty, namespace, &name);
        if self.types[ty].namespaced {
            meta.insert("namespace".into(), key.0.clone().into());
        } else {
            meta.remove("namespace");
        }
        let sent_rv = meta.remove("resourceVersion");
        let existing = self.objects[ty].get(&key).cloned();
        let what = format!("{kind} {}/{name}", key.0);
        match (&existing, mode) {
            (Some(_), Write::Create) => return Err(FakeApiError::AlreadyExists(what)),
            (None, Write::Update) => return Err(FakeApiError::NotFound(what)),
            (Some(old), Write::Update) => {
                let sent = sent_rv
                    .as_ref()
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty());
                if sent.is_some_and(|rv| Some(rv) != old["metadata"]["resourceVersion"].as_str()) {
                    return Err(FakeApiError::Conflict(format!(
                        "the object {what} has been modified; please apply your changes to the latest version and try again"
                    )));
                }
            }
            _ => {}
        }
        let event = match &existing {
            Some(old) => {
                for field in ["uid", "creationTimestamp", "resourceVersion", "generation"] {
                    meta.insert(field.into(), old["metadata"][field].clone());
                }
                if obj == **old {
                    return Ok(old.clone());
                }
                // Like the API server: generation counts changes outside metadata and status.
                let strip = |v: &Value| {
                    let mut v = v.clone();
                    if let Some(m) = v.as_object_mut() {
                        m.remove("metadata");
                        m.remove("status");
                    }
                    v
                };
                if strip(&obj) != strip(old) {
                    let generation = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
                    obj["metadata"]["generation"] = generation.into();
                }
                EventType::Modified
            }
            None => {
                self.next_uid += 1;
                meta.insert(
                    "uid".into(),
                    format!("00000000-0000-4000-8000-{:012x}", self.next_uid).into(),
                );
                meta.insert("creationTimestamp".into(), now_rfc3339().into());
                meta.insert("generation".into(), 1.into());
                EventType::Added
            }
        };
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = self.rv.to_string().into();
        let obj = Arc::new(obj);
        self.objects[ty].insert(key.clone(), obj.clone());
        self.push(Event {
            rv: self.rv,
            ty,
            key,
            kind: event,
            object: obj.clone(),
            prev: existing,
        });
        Ok(obj)
    }

    /// Removes an object; the DELETED event (and the returned object) carry a new resourceVersion.
    pub(crate) fn delete(&mut self, ty: usize, key: &ObjKey) -> Option<Arc<Value>> {
        let old = self.objects[ty].remove(key)?;
        self.rv += 1;
        let mut gone = (*old).clone();
        gone["metadata"]["resourceVersion"] = self.rv.to_string().into();
        let gone = Arc::new(gone);
        let (rv, key) = (self.rv, key.clone());
        self.push(Event {
            rv,
            ty,
            key,
            kind: EventType::Deleted,
            object: gone.clone(),
            prev: Some(old),
        });
        Some(gone)
    }

    fn push(&mut self, event: Event) {
        self.history.push_back(event);
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.compacted_rv = old.rv;
            }
        }
    }

    pub(crate) fn compact(&mut self) {
        self.history.clear();
        self.compacted_rv = self.rv;
        self.epoch += 1;
    }

    /// Events after `rv`, oldest first.
    pub(crate) fn events_after(&self, rv: u64) -> impl Iterator<Item = &Event> {
        let start = self.history.partition_point(|e| e.rv <= rv);
        self.history.range(start..)
    }

    /// The objects of one type as they were at `rv` (undoing later events), or None if that
    /// point has been compacted away.
    pub(crate) fn snapshot(&self, ty: usize, rv: u64) -> Option<BTreeMap<ObjKey, Arc<Value>>> {
        if rv < self.compacted_rv {
            return None;
        }
        let mut objects = self.objects[ty].clone();
        let later: Vec<&Event> = self.events_after(rv).filter(|e| e.ty == ty).collect();
        for e in later.into_iter().rev() {
            match (&e.kind, &e.prev) {
                (EventType::Added, _) => {
                    objects.remove(&e.key);
                }
                (_, Some(prev)) => {
                    objects.insert(e.key.clone(), prev.clone());
                }
                (_, None) => {}
            }
        }
        Some(objects)
    }

    pub(crate) fn take_fault(&mut self, plural: &str) -> Option<Fault> {
        let (fault, left) = self.faults.get_mut(plural)?;
        let fault = *fault;
        *left -= 1;
        if *left == 0 {
            self.faults.remove(plural);
        }
        Some(fault)
    }
}

/// A Status object as the API server sends with errors.
pub(crate) fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn now_rfc3339() -> String {
    use time::format_description::well_known::Rfc3339;
    let now = time::OffsetDateTime::now_utc();
    // Kubernetes timestamps have whole seconds.
    now.replace_nanosecond(0)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".into())
}
