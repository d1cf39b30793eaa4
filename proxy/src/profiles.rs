//! Profiles: each destination's routes as the data path uses them. The Store compiles a
//! ServiceProfile into a `RouteTable`; here each table gets what requests need at run time
//! (the route's metric handles, the destination's retry budget) and is kept current as the
//! Store changes, so a request picks its route with one lock-free load and no label lookup.

use std::sync::{Arc, Mutex, Weak};

use arc_swap::{ArcSwap, Guard};
use http::Request;
use pylon_proxy_metrics::{
    Classification, Direction, EventCounter, Metrics, RouteLabels, RouteTarget,
};
use pylon_proxy_policy::{Route, RouteTable, Snapshot, Store};

use crate::retry_budget::RetryBudget;

/// Keeps every destination's routes current.
pub struct Profiles {
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    /// Every destination handed out, to update when the Store changes. Destinations are owned
    /// (and bounded) by their callers' caches; dead entries are pruned here.
    live: Mutex<Vec<Weak<DestinationRoutes>>>,
}

/// The routes of one destination (`dst`), as of the latest Store snapshot.
pub struct DestinationRoutes {
    direction: Direction,
    dst: Arc<str>,
    /// The name a ServiceProfile for this destination would have; `None` for a bare address.
    profile_name: Option<Box<str>>,
    current: ArcSwap<RoutePolicy>,
}

/// One version of a destination's routes.
pub struct RoutePolicy {
    table: Option<Arc<RouteTable>>,
    /// Parallel to `table.routes()`.
    routes: Box<[Arc<RouteState>]>,
    default: Arc<RouteState>,
}

/// A route and what requests on it record and spend.
pub struct RouteState {
    pub route: Route,
    pub dst: Arc<str>,
    /// `route_request_total` and friends.
    pub metrics: RouteTarget,
    /// `route_actual_*` for attempts sent to the destination itself.
    actual: RouteTarget,
    /// `route_actual_*` for attempts a traffic split sent to other backends, made on first use.
    actual_backends: ArcSwap<Vec<(Arc<str>, RouteTarget)>>,
    metrics_registry: Arc<Metrics>,
    direction: Direction,
    /// Shared by every route of the destination, as in Linkerd.
    pub budget: Arc<RetryBudget>,
    pub skipped_budget: EventCounter,
    pub skipped_body: EventCounter,
}

impl RouteState {
    /// The `route_actual_*` handle for an attempt sent to `backend` (an authority).
    pub fn actual_for(&self, backend: &Arc<str>) -> RouteTarget {
        if Arc::ptr_eq(backend, &self.dst) || *backend == self.dst {
            return self.actual.clone();
        }
        if let Some((_, t)) = self
            .actual_backends
            .load()
            .iter()
            .find(|(a, _)| a == backend)
        {
            return t.clone();
        }
        // Backends come from the config, so this list stays as small as a split.
        let target = self.metrics_registry.route_actual_target(RouteLabels {
            direction: self.direction,
            dst: backend.clone(),
            route: self.route.name().clone(),
        });
        self.actual_backends.rcu(|list| {
            let mut list = Vec::clone(list);
            if !list.iter().any(|(a, _)| a == backend) {
                list.push((backend.clone(), target.clone()));
            }
            list
        });
        target
    }

    /// The route's response classes first, else 5xx / grpc-status != 0 is a failure.
    pub fn classify(&self, status: u16, grpc_status: Option<u32>) -> Classification {
        if self.route.classify(status, grpc_status) {
            Classification::Failure
        } else {
            Classification::Success
        }
    }
}

impl RoutePolicy {
    /// The first route (in order) that matches the request, else the default route.
    pub fn route_for<B>(&self, req: &Request<B>) -> &Arc<RouteState> {
        let Some(table) = &self.table else {
            return &self.default;
        };
        match table.route_index(req.method().as_str(), req.uri().path()) {
            Some(i) => self.routes.get(i).unwrap_or(&self.default),
            None => &self.default,
        }
    }
}

impl DestinationRoutes {
    pub fn load(&self) -> Guard<Arc<RoutePolicy>> {
        self.current.load()
    }

    /// The name a ServiceProfile for this destination has (a service FQDN); `None` for an
    /// address.
    pub fn profile_name(&self) -> Option<&str> {
        self.profile_name.as_deref()
    }
}

impl Profiles {
    pub fn new(store: Arc<Store>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            store,
            metrics,
            live: Mutex::new(Vec::new()),
        })
    }

    /// The routes of `dst` (the `dst` label), from the ServiceProfile named `profile_name`
    /// (a service FQDN) if there is one, kept current from now on.
    pub fn destination(
        &self,
        direction: Direction,
        dst: Arc<str>,
        profile_name: Option<String>,
    ) -> Arc<DestinationRoutes> {
        let profile_name = profile_name.map(|n| n.trim_end_matches('.').into());
        let snapshot = self.store.snapshot();
        let table = Self::table(&snapshot, profile_name.as_deref());
        let policy = self.build(direction, &dst, table, None);
        let dest = Arc::new(DestinationRoutes {
            direction,
            dst,
            profile_name,
            current: ArcSwap::from_pointee(policy),
        });
        let mut live = self.lock_live();
        if live.len().is_power_of_two() {
            live.retain(|w| w.strong_count() > 0);
        }
        live.push(Arc::downgrade(&dest));
        dest
    }

    /// Applies every new Store snapshot to the live destinations.
    pub fn spawn_updates(self: &Arc<Self>) {
        let mut rx = self.store.subscribe();
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let snapshot = rx.borrow_and_update().clone();
                let Some(this) = this.upgrade() else { return };
                this.apply(&snapshot);
            }
        });
    }

    fn apply(&self, snapshot: &Snapshot) {
        let live: Vec<Arc<DestinationRoutes>> = {
            let mut live = self.lock_live();
            live.retain(|w| w.strong_count() > 0);
            live.iter().filter_map(Weak::upgrade).collect()
        };
        for dest in live {
            let table = Self::table(snapshot, dest.profile_name.as_deref());
            let current = dest.current.load();
            let same = match (&current.table, &table) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if same {
                continue;
            }
            let routes = table.as_ref().map_or(0, |t| t.routes().len());
            let policy = self.build(dest.direction, &dest.dst, table, Some(&current));
            dest.current.store(Arc::new(policy));
            tracing::info!(dst = %dest.dst, routes, "routes updated");
        }
    }

    /// Replaces a destination's routes with what the control plane sent (its Store profile
    /// name is `None`, so Store updates leave it alone).
    pub fn set_table(&self, dest: &DestinationRoutes, table: Option<Arc<RouteTable>>) {
        let current = dest.current.load();
        let same = match (&current.table, &table) {
            (Some(a), Some(b)) => a == b,
            (None, None) => true,
            _ => false,
        };
        if same {
            return;
        }
        let routes = table.as_ref().map_or(0, |t| t.routes().len());
        let policy = self.build(dest.direction, &dest.dst, table, Some(&current));
        dest.current.store(Arc::new(policy));
        tracing::info!(dst = %dest.dst, routes, "routes updated from the control plane");
    }

    fn table(snapshot: &Snapshot, name: Option<&str>) -> Option<Arc<RouteTable>> {
        name.and_then(|n| snapshot.route_table(n)).cloned()
    }

    fn build(
        &self,
        direction: Direction,
        dst: &Arc<str>,
        table: Option<Arc<RouteTable>>,
        previous: Option<&RoutePolicy>,
    ) -> RoutePolicy {
        let spec = table
            .as_ref()
            .map(|t| *t.retry_budget())
            .unwrap_or_default();
        // An unchanged budget carries over, so editing a route doesn't hand out fresh retries.
        let budget = match previous {
            Some(p) if *p.default.budget.spec() == spec => p.default.budget.clone(),
            _ => Arc::new(RetryBudget::new(spec)),
        };
        let state = |route: &Route| {
            let labels = RouteLabels {
                direction,
                dst: dst.clone(),
                route: route.name().clone(),
            };
            Arc::new(RouteState {
                route: route.clone(),
                dst: dst.clone(),
                metrics: self.metrics.route_target(labels.clone()),
                actual: self.metrics.route_actual_target(labels.clone()),
                actual_backends: ArcSwap::from_pointee(Vec::new()),
                metrics_registry: self.metrics.clone(),
                direction,
                budget: budget.clone(),
                skipped_budget: self
                    .metrics
                    .route_retry_skipped(labels.clone(), "budget_exhausted"),
                skipped_body: self.metrics.route_retry_skipped(labels, "body_too_large"),
            })
        };
        let default = match &table {
            Some(t) => state(t.default_route()),
            None => state(RouteTable::default().default_route()),
        };
        let routes = table
            .as_ref()
            .map(|t| t.routes().iter().map(state).collect())
            .unwrap_or_default();
        RoutePolicy {
            table,
            routes,
            default,
        }
    }

    fn lock_live(&self) -> std::sync::MutexGuard<'_, Vec<Weak<DestinationRoutes>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }
}
