//! The internal route model: what the data path needs to pick a route for a request and to
//! classify its response, independent of the object it came from.
//!
//! A ServiceProfile maps onto it today; Gateway API `HTTPRoute` (with Linkerd's retry and
//! timeout annotations) is meant to map onto the same types, so nothing here mirrors the
//! ServiceProfile YAML shape.
//!
//! Everything is built (regexes compiled) once, when the object is parsed, and shared by
//! `Arc` between snapshots. Matching and classification borrow and never allocate.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// The name of the route used for requests no route matches. It cannot be a user's route
/// name (validation rejects it), and it is what Linkerd's CLI shows for unmatched traffic.
pub const DEFAULT_ROUTE_NAME: &str = "[DEFAULT]";

/// The routes of one logical destination, in match order, plus its retry budget and
/// traffic-split overrides.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteTable {
    routes: Vec<Route>,
    default: Route,
    retry_budget: RetryBudgetSpec,
    dst_overrides: Vec<WeightedAuthority>,
}

impl Default for RouteTable {
    /// No routes (every request on the default route), the default retry budget, no
    /// overrides: a destination without a profile.
    fn default() -> Self {
        Self::new(Vec::new(), RetryBudgetSpec::default(), Vec::new())
    }
}

impl RouteTable {
    pub fn new(
        routes: Vec<Route>,
        retry_budget: RetryBudgetSpec,
        dst_overrides: Vec<WeightedAuthority>,
    ) -> Self {
        Self {
            routes,
            default: Route::default_route(),
            retry_budget,
            dst_overrides,
        }
    }

    /// The first route (in order) whose matcher accepts the request, else the default
    /// route. `method` is compared exactly (HTTP methods are case-sensitive); `path` is
    /// the request path without the query string.
    pub fn route_for(&self, method: &str, path: &str) -> &Route {
        self.routes
            .iter()
            .find(|r| r.matcher.matches(method, path))
            .unwrap_or(&self.default)
    }

    /// Where [`RouteTable::route_for`]'s route sits in [`RouteTable::routes`]; `None` for the
    /// default route. Lets a caller keep per-route state in a parallel list.
    pub fn route_index(&self, method: &str, path: &str) -> Option<usize> {
        self.routes
            .iter()
            .position(|r| r.matcher.matches(method, path))
    }

    /// The configured routes, in match order (without the default route).
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The route for unmatched requests: named [`DEFAULT_ROUTE_NAME`], not retryable, no
    /// timeout, default classification.
    pub fn default_route(&self) -> &Route {
        &self.default
    }

    pub fn retry_budget(&self) -> &RetryBudgetSpec {
        &self.retry_budget
    }

    /// Traffic-split overrides; empty means "send to the destination itself".
    pub fn dst_overrides(&self) -> &[WeightedAuthority] {
        &self.dst_overrides
    }
}

/// One route: how to recognise its requests and how to treat them.
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    name: Arc<str>,
    matcher: RequestMatcher,
    classes: Vec<ResponseClass>,
    retryable: bool,
    timeout: Option<Duration>,
}

impl Route {
    pub fn new(
        name: impl Into<Arc<str>>,
        matcher: RequestMatcher,
        classes: Vec<ResponseClass>,
        retryable: bool,
        timeout: Option<Duration>,
    ) -> Self {
        Self {
            name: name.into(),
            matcher,
            classes,
            retryable,
            timeout,
        }
    }

    fn default_route() -> Self {
        Self::new(
            DEFAULT_ROUTE_NAME,
            RequestMatcher::All(Vec::new()),
            Vec::new(),
            false,
            None,
        )
    }

    /// The route's name (the `rt_route` metric label); [`DEFAULT_ROUTE_NAME`] for the
    /// default route.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Whether this is the route for unmatched requests.
    pub fn is_default(&self) -> bool {
        &*self.name == DEFAULT_ROUTE_NAME
    }

    pub fn matcher(&self) -> &RequestMatcher {
        &self.matcher
    }

    pub fn response_classes(&self) -> &[ResponseClass] {
        &self.classes
    }

    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// The whole-request timeout (retries included), if any.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// Whether a response is a failure: the first response class whose matcher accepts the
    /// HTTP status decides; with none, a 5xx status or a gRPC status other than 0 (OK) is
    /// a failure.
    pub fn classify(&self, status: u16, grpc_status: Option<u32>) -> bool {
        match self.classes.iter().find(|c| c.matcher.matches(status)) {
            Some(class) => class.is_failure,
            None => (500..=599).contains(&status) || grpc_status.is_some_and(|g| g != 0),
        }
    }
}

/// A predicate on a request's method and path.
#[derive(Clone, Debug, PartialEq)]
pub enum RequestMatcher {
    /// Exact method, e.g. `GET`.
    Method(Box<str>),
    /// A regex that must match the whole path.
    PathRegex(PathRegex),
    /// Every matcher accepts (an empty list accepts everything).
    All(Vec<RequestMatcher>),
    /// Some matcher accepts (an empty list accepts nothing).
    Any(Vec<RequestMatcher>),
    Not(Box<RequestMatcher>),
}

impl RequestMatcher {
    pub fn matches(&self, method: &str, path: &str) -> bool {
        match self {
            Self::Method(m) => **m == *method,
            Self::PathRegex(re) => re.is_match(path),
            Self::All(ms) => ms.iter().all(|m| m.matches(method, path)),
            Self::Any(ms) => ms.iter().any(|m| m.matches(method, path)),
            Self::Not(m) => !m.matches(method, path),
        }
    }
}

/// A compiled path regex, anchored so it matches only the whole path: `/api/users/\d+`
/// accepts `/api/users/12` but not `/api/users/12/orders`.
#[derive(Clone)]
pub struct PathRegex {
    source: Box<str>,
    regex: regex::Regex,
}

impl PathRegex {
    /// Compiles `source` as `^(?:source)$`. The error is the regex crate's description.
    pub fn new(source: &str) -> Result<Self, regex::Error> {
        let regex = regex::Regex::new(&format!("^(?:{source})$")).map_err(|anchored| {
            // Report the error against the pattern as the user wrote it.
            regex::Regex::new(source).err().unwrap_or(anchored)
        })?;
        Ok(Self {
            source: source.into(),
            regex,
        })
    }

    /// The pattern as written (before anchoring).
    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn is_match(&self, path: &str) -> bool {
        self.regex.is_match(path)
    }
}

impl PartialEq for PathRegex {
    /// Same pattern, same regex.
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for PathRegex {}

impl fmt::Debug for PathRegex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PathRegex").field(&self.source).finish()
    }
}

/// How responses that match `matcher` are classified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseClass {
    pub matcher: ResponseMatcher,
    pub is_failure: bool,
}

/// A predicate on a response's HTTP status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResponseMatcher {
    /// `min..=max`.
    Status {
        min: u16,
        max: u16,
    },
    All(Vec<ResponseMatcher>),
    Any(Vec<ResponseMatcher>),
    Not(Box<ResponseMatcher>),
}

impl ResponseMatcher {
    pub fn matches(&self, status: u16) -> bool {
        match self {
            Self::Status { min, max } => (*min..=*max).contains(&status),
            Self::All(ms) => ms.iter().all(|m| m.matches(status)),
            Self::Any(ms) => ms.iter().any(|m| m.matches(status)),
            Self::Not(m) => !m.matches(status),
        }
    }
}

/// Limits retries: over any `ttl` window, retries <= `retry_ratio` x requests +
/// `min_retries_per_second` x seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryBudgetSpec {
    /// Finite and >= 0 (validated).
    pub retry_ratio: f64,
    pub min_retries_per_second: u32,
    pub ttl: Duration,
}

impl Default for RetryBudgetSpec {
    /// Linkerd's defaults: 0.2, 10, 10s.
    fn default() -> Self {
        Self {
            retry_ratio: 0.2,
            min_retries_per_second: 10,
            ttl: Duration::from_secs(10),
        }
    }
}

/// A traffic-split target. Weights are relative: a target's share is weight / sum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightedAuthority {
    pub authority: Arc<str>,
    /// The weight in thousandths, so Kubernetes quantities (`500m`) stay exact.
    pub weight_milli: u64,
}

impl WeightedAuthority {
    /// The weight as a number (`500m` -> 0.5).
    pub fn weight(&self) -> f64 {
        self.weight_milli as f64 / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(re: &str) -> RequestMatcher {
        RequestMatcher::PathRegex(PathRegex::new(re).expect("regex"))
    }

    fn route(name: &str, matcher: RequestMatcher) -> Route {
        Route::new(name, matcher, Vec::new(), false, None)
    }

    #[test]
    fn path_regex_matches_the_whole_path() {
        let m = path(r"/api/users/\d+");
        assert!(m.matches("GET", "/api/users/12"));
        assert!(!m.matches("GET", "/api/users/12/orders"));
        assert!(!m.matches("GET", "/v1/api/users/12"));
        // An alternation is anchored as a whole, not just its first and last branch.
        let m = path("/a|/b");
        assert!(m.matches("GET", "/b"));
        assert!(!m.matches("GET", "/bx"));
        assert!(!m.matches("GET", "x/a"));
    }

    #[test]
    fn first_match_wins_and_unmatched_gets_the_default() {
        let table = RouteTable::new(
            vec![
                route(
                    "get-user",
                    RequestMatcher::All(vec![
                        RequestMatcher::Method("GET".into()),
                        path(r"/users/\d+"),
                    ]),
                ),
                route("any-users", path("/users/.*")),
                route("shadowed", path(r"/users/\d+")),
            ],
            RetryBudgetSpec::default(),
            Vec::new(),
        );
        assert_eq!(&**table.route_for("GET", "/users/1").name(), "get-user");
        assert_eq!(table.route_index("GET", "/users/1"), Some(0));
        assert_eq!(table.route_index("PUT", "/users/1"), Some(1));
        assert_eq!(table.route_index("GET", "/health"), None);
        assert_eq!(&**table.route_for("PUT", "/users/1").name(), "any-users");
        let default = table.route_for("GET", "/health");
        assert!(default.is_default());
        assert_eq!(&**default.name(), DEFAULT_ROUTE_NAME);
        assert!(!default.is_retryable());
        assert_eq!(default.timeout(), None);
        // Methods are case-sensitive, as in HTTP.
        assert_eq!(&**table.route_for("get", "/users/1").name(), "any-users");
    }

    #[test]
    fn classification_defaults_and_classes() {
        let plain = route("r", RequestMatcher::All(Vec::new()));
        assert!(!plain.classify(200, None));
        assert!(!plain.classify(429, None));
        assert!(plain.classify(503, None));
        assert!(plain.classify(200, Some(14)));
        assert!(!plain.classify(200, Some(0)));

        let classes = vec![
            ResponseClass {
                matcher: ResponseMatcher::Status { min: 503, max: 503 },
                is_failure: false,
            },
            ResponseClass {
                matcher: ResponseMatcher::Any(vec![
                    ResponseMatcher::Status { min: 429, max: 429 },
                    ResponseMatcher::Status { min: 500, max: 599 },
                ]),
                is_failure: true,
            },
        ];
        let r = Route::new("r", RequestMatcher::All(Vec::new()), classes, true, None);
        assert!(r.classify(429, None));
        assert!(!r.classify(503, None), "first class wins");
        assert!(r.classify(500, None));
        assert!(!r.classify(404, None));
        // A class decides even when gRPC says otherwise.
        assert!(r.classify(429, Some(0)));
    }

    #[test]
    fn not_and_empty_combinators() {
        assert!(RequestMatcher::All(Vec::new()).matches("GET", "/"));
        assert!(!RequestMatcher::Any(Vec::new()).matches("GET", "/"));
        let not_get = RequestMatcher::Not(Box::new(RequestMatcher::Method("GET".into())));
        assert!(not_get.matches("POST", "/"));
        assert!(!not_get.matches("GET", "/"));
        let not_5xx =
            ResponseMatcher::Not(Box::new(ResponseMatcher::Status { min: 500, max: 599 }));
        assert!(not_5xx.matches(200));
        assert!(!not_5xx.matches(502));
    }
}
