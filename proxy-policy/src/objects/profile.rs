//! `linkerd.io/v1alpha2 ServiceProfile` (and `v1alpha1`, the same shape), parsed straight
//! into the internal route model ([`RouteTable`]), so its regexes are compiled once per
//! object version and every snapshot that holds the object shares them.

use std::sync::Arc;

use serde_yaml_ng::{Mapping, Value};

use super::{
    as_mapping, get, join, note_unknown, opt_bool, opt_mapping, opt_seq, opt_str, req_str,
    type_name, FieldError, ObjectMeta,
};
use crate::duration;
use crate::route::{
    PathRegex, RequestMatcher, ResponseClass, ResponseMatcher, RetryBudgetSpec, Route, RouteTable,
    WeightedAuthority, DEFAULT_ROUTE_NAME,
};

/// A validated ServiceProfile. `meta.name` is the FQDN of the service it describes
/// (`web.default.svc.cluster.local`).
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceProfile {
    pub meta: ObjectMeta,
    pub table: Arc<RouteTable>,
}

// The only non-`Eq` field is the retry ratio, which validation keeps finite (never NaN).
impl Eq for ServiceProfile {}

const PROFILE_FIELDS: &[&str] = &["apiVersion", "kind", "metadata", "spec"];
const SPEC_FIELDS: &[&str] = &["routes", "retryBudget", "dstOverrides"];
const ROUTE_FIELDS: &[&str] = &[
    "name",
    "condition",
    "responseClasses",
    "isRetryable",
    "timeout",
];
const REQUEST_MATCH_FIELDS: &[&str] = &["method", "pathRegex", "all", "any", "not"];
const RESPONSE_CLASS_FIELDS: &[&str] = &["condition", "isFailure"];
const RESPONSE_MATCH_FIELDS: &[&str] = &["status", "all", "any", "not"];
const RANGE_FIELDS: &[&str] = &["min", "max"];
const RETRY_BUDGET_FIELDS: &[&str] = &["retryRatio", "minRetriesPerSecond", "ttl"];
const DST_OVERRIDE_FIELDS: &[&str] = &["authority", "weight"];

pub(super) fn parse_service_profile(
    root: &Mapping,
    meta: ObjectMeta,
    unknown: &mut Vec<String>,
) -> Result<ServiceProfile, FieldError> {
    note_unknown(root, "", PROFILE_FIELDS, unknown);
    let empty = Mapping::new();
    let spec = opt_mapping(root, "", "spec")?.unwrap_or(&empty);
    note_unknown(spec, "spec", SPEC_FIELDS, unknown);

    let mut routes: Vec<Route> = Vec::new();
    for (i, item) in opt_seq(spec, "spec", "routes")?.iter().enumerate() {
        let path = format!("spec.routes[{i}]");
        let route = parse_route(item, &path, unknown)?;
        if let Some(j) = routes.iter().position(|r| r.name() == route.name()) {
            return Err(FieldError::new(
                join(&path, "name"),
                format!(
                    "duplicate route name {:?} (also spec.routes[{j}])",
                    route.name()
                ),
            ));
        }
        routes.push(route);
    }

    let retry_budget = match opt_mapping(spec, "spec", "retryBudget")? {
        None => RetryBudgetSpec::default(),
        Some(b) => parse_retry_budget(b, "spec.retryBudget", unknown)?,
    };

    let mut dst_overrides = Vec::new();
    for (i, item) in opt_seq(spec, "spec", "dstOverrides")?.iter().enumerate() {
        let path = format!("spec.dstOverrides[{i}]");
        let d = as_mapping(item, &path)?;
        note_unknown(d, &path, DST_OVERRIDE_FIELDS, unknown);
        let authority = req_str(d, &path, "authority")?;
        let weight_field = join(&path, "weight");
        let weight =
            get(d, "weight").ok_or_else(|| FieldError::new(&weight_field, "is required"))?;
        dst_overrides.push(WeightedAuthority {
            authority: authority.into(),
            weight_milli: weight_milli(weight, &weight_field)?,
        });
    }

    Ok(ServiceProfile {
        meta,
        table: Arc::new(RouteTable::new(routes, retry_budget, dst_overrides)),
    })
}

fn parse_route(item: &Value, path: &str, unknown: &mut Vec<String>) -> Result<Route, FieldError> {
    let r = as_mapping(item, path)?;
    note_unknown(r, path, ROUTE_FIELDS, unknown);
    let name = req_str(r, path, "name")?;
    if name == DEFAULT_ROUTE_NAME {
        return Err(FieldError::new(
            join(path, "name"),
            format!("{DEFAULT_ROUTE_NAME:?} is reserved for unmatched requests"),
        ));
    }
    let cond_path = join(path, "condition");
    let condition =
        get(r, "condition").ok_or_else(|| FieldError::new(&cond_path, "is required"))?;
    let matcher = request_match(condition, &cond_path, unknown)?;

    let mut classes = Vec::new();
    for (i, item) in opt_seq(r, path, "responseClasses")?.iter().enumerate() {
        let class_path = format!("{path}.responseClasses[{i}]");
        let c = as_mapping(item, &class_path)?;
        note_unknown(c, &class_path, RESPONSE_CLASS_FIELDS, unknown);
        let cond_path = join(&class_path, "condition");
        let condition =
            get(c, "condition").ok_or_else(|| FieldError::new(&cond_path, "is required"))?;
        classes.push(ResponseClass {
            matcher: response_match(condition, &cond_path, unknown)?,
            is_failure: opt_bool(c, &class_path, "isFailure")?.unwrap_or(false),
        });
    }

    let retryable = opt_bool(r, path, "isRetryable")?.unwrap_or(false);
    let timeout = match opt_str(r, path, "timeout")? {
        None | Some("") => None,
        Some(s) => {
            let d = duration::parse(s)
                .map_err(|e| FieldError::new(join(path, "timeout"), e.to_string()))?;
            // A zero timeout would fail every request; like an absent one, it means none.
            (!d.is_zero()).then_some(d)
        }
    };
    Ok(Route::new(name, matcher, classes, retryable, timeout))
}

/// A `RequestMatch`. Several fields in one match must all hold. `not` takes a single match
/// (as Linkerd's docs write it) or a list (as its CRD types it), meaning "none of these".
fn request_match(
    v: &Value,
    path: &str,
    unknown: &mut Vec<String>,
) -> Result<RequestMatcher, FieldError> {
    let m = as_mapping(v, path)?;
    note_unknown(m, path, REQUEST_MATCH_FIELDS, unknown);
    let mut parts = Vec::new();
    // Empty strings are Go's zero value, i.e. unset.
    if let Some(method) = opt_str(m, path, "method")?.filter(|s| !s.is_empty()) {
        if !method.bytes().all(is_tchar) {
            return Err(FieldError::new(
                join(path, "method"),
                format!("invalid HTTP method {method:?}"),
            ));
        }
        parts.push(RequestMatcher::Method(method.into()));
    }
    if let Some(re) = opt_str(m, path, "pathRegex")?.filter(|s| !s.is_empty()) {
        let compiled = PathRegex::new(re).map_err(|e| {
            FieldError::new(
                join(path, "pathRegex"),
                format!("invalid regex {re:?}: {}", one_line(&e.to_string())),
            )
        })?;
        parts.push(RequestMatcher::PathRegex(compiled));
    }
    parts.extend(nested(m, path, unknown, request_match)?);
    combine(parts, path, "method, pathRegex, all, any, not")
}

/// A `ResponseMatch`: `status` {`min`, `max`} and `all`/`any`/`not` nesting.
fn response_match(
    v: &Value,
    path: &str,
    unknown: &mut Vec<String>,
) -> Result<ResponseMatcher, FieldError> {
    let m = as_mapping(v, path)?;
    note_unknown(m, path, RESPONSE_MATCH_FIELDS, unknown);
    let mut parts = Vec::new();
    if let Some(range) = opt_mapping(m, path, "status")? {
        let status_path = join(path, "status");
        note_unknown(range, &status_path, RANGE_FIELDS, unknown);
        let min = opt_status(range, &status_path, "min")?;
        let max = opt_status(range, &status_path, "max")?;
        if min.is_none() && max.is_none() {
            return Err(FieldError::new(status_path, "must set min, max or both"));
        }
        let (min, max) = (min.unwrap_or(100), max.unwrap_or(599));
        if min > max {
            return Err(FieldError::new(
                status_path,
                format!("min {min} is greater than max {max}"),
            ));
        }
        parts.push(ResponseMatcher::Status { min, max });
    }
    parts.extend(nested(m, path, unknown, response_match)?);
    combine(parts, path, "status, all, any, not")
}

/// The boolean nesting both kinds of match share.
trait Nesting: Sized {
    fn all(parts: Vec<Self>) -> Self;
    fn any(parts: Vec<Self>) -> Self;
    fn not(inner: Self) -> Self;
}

impl Nesting for RequestMatcher {
    fn all(parts: Vec<Self>) -> Self {
        Self::All(parts)
    }
    fn any(parts: Vec<Self>) -> Self {
        Self::Any(parts)
    }
    fn not(inner: Self) -> Self {
        Self::Not(Box::new(inner))
    }
}

impl Nesting for ResponseMatcher {
    fn all(parts: Vec<Self>) -> Self {
        Self::All(parts)
    }
    fn any(parts: Vec<Self>) -> Self {
        Self::Any(parts)
    }
    fn not(inner: Self) -> Self {
        Self::Not(Box::new(inner))
    }
}

type ParseMatch<T> = fn(&Value, &str, &mut Vec<String>) -> Result<T, FieldError>;

/// `all`, `any` and `not` of a match, parsed with `parse`. `not` takes a single match (as
/// Linkerd's docs write it) or a list (as its CRD types it), meaning "none of these".
fn nested<T: Nesting>(
    m: &Mapping,
    path: &str,
    unknown: &mut Vec<String>,
    parse: ParseMatch<T>,
) -> Result<Vec<T>, FieldError> {
    let list = |key: &str, unknown: &mut Vec<String>| -> Result<Vec<T>, FieldError> {
        opt_seq(m, path, key)?
            .iter()
            .enumerate()
            .map(|(i, v)| parse(v, &format!("{path}.{key}[{i}]"), unknown))
            .collect()
    };
    let mut parts = Vec::new();
    if get(m, "all").is_some() {
        parts.push(T::all(list("all", unknown)?));
    }
    if get(m, "any").is_some() {
        parts.push(T::any(list("any", unknown)?));
    }
    match get(m, "not") {
        None => {}
        Some(Value::Sequence(_)) => parts.push(T::not(T::any(list("not", unknown)?))),
        Some(v @ Value::Mapping(_)) => parts.push(T::not(parse(v, &join(path, "not"), unknown)?)),
        Some(v) => {
            return Err(FieldError::new(
                join(path, "not"),
                format!("must be a mapping or a list, found {}", type_name(v)),
            ))
        }
    }
    Ok(parts)
}

/// Several fields in one match must all hold.
fn combine<T: Nesting>(mut parts: Vec<T>, path: &str, fields: &str) -> Result<T, FieldError> {
    match parts.len() {
        0 => Err(FieldError::new(
            path,
            format!("must set at least one of {fields}"),
        )),
        1 => Ok(parts.remove(0)),
        _ => Ok(T::all(parts)),
    }
}

fn opt_status(map: &Mapping, path: &str, key: &str) -> Result<Option<u16>, FieldError> {
    let Some(v) = get(map, key) else {
        return Ok(None);
    };
    let field = join(path, key);
    match v.as_u64().and_then(|n| u16::try_from(n).ok()) {
        Some(n) if (100..=599).contains(&n) => Ok(Some(n)),
        _ => Err(FieldError::new(
            field,
            format!(
                "invalid status {}: must be an integer from 100 to 599",
                super::display_scalar(v)
            ),
        )),
    }
}

fn parse_retry_budget(
    b: &Mapping,
    path: &str,
    unknown: &mut Vec<String>,
) -> Result<RetryBudgetSpec, FieldError> {
    note_unknown(b, path, RETRY_BUDGET_FIELDS, unknown);
    let mut budget = RetryBudgetSpec::default();
    if let Some(v) = get(b, "retryRatio") {
        let field = join(path, "retryRatio");
        let ratio = v.as_f64().ok_or_else(|| {
            FieldError::new(&field, format!("must be a number, found {}", type_name(v)))
        })?;
        if !ratio.is_finite() || ratio < 0.0 {
            return Err(FieldError::new(
                field,
                format!("invalid retry ratio {ratio}: must be a number >= 0"),
            ));
        }
        budget.retry_ratio = ratio;
    }
    if let Some(v) = get(b, "minRetriesPerSecond") {
        budget.min_retries_per_second =
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    FieldError::new(
                        join(path, "minRetriesPerSecond"),
                        format!(
                            "invalid value {}: must be a non-negative integer",
                            super::display_scalar(v)
                        ),
                    )
                })?;
    }
    if let Some(ttl) = opt_str(b, path, "ttl")? {
        budget.ttl =
            duration::parse(ttl).map_err(|e| FieldError::new(join(path, "ttl"), e.to_string()))?;
    }
    Ok(budget)
}

/// A weight as an integer, a number, or a Kubernetes quantity (`500m`, `1`, `100`, `1k`),
/// in thousandths.
pub(super) fn weight_milli(v: &Value, field: &str) -> Result<u64, FieldError> {
    let value = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => parse_quantity(s),
        _ => None,
    };
    let Some(value) = value.filter(|x| x.is_finite()) else {
        return Err(FieldError::new(
            field,
            format!(
                "invalid weight {}: expected an integer or a quantity such as 500m",
                super::display_scalar(v)
            ),
        ));
    };
    if value < 0.0 {
        return Err(FieldError::new(
            field,
            format!(
                "invalid weight {}: must not be negative",
                super::display_scalar(v)
            ),
        ));
    }
    let milli = (value * 1000.0).round();
    if milli > 1e15 {
        return Err(FieldError::new(
            field,
            format!("invalid weight {}: too large", super::display_scalar(v)),
        ));
    }
    // In range and non-negative, checked above.
    Ok(milli as u64)
}

/// A Kubernetes resource quantity: a signed decimal number followed by a binary suffix
/// (`Ki`..`Ei`), a decimal suffix (`n`, `u`, `m`, `k`, `M`..`E`), or an exponent (`1e3`).
fn parse_quantity(s: &str) -> Option<f64> {
    let s = s.trim();
    let num_len = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(num_len);
    if !num.bytes().any(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: f64 = num.parse().ok()?;
    let scale = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        _ => {
            let exp = suffix
                .strip_prefix('e')
                .or_else(|| suffix.strip_prefix('E'))?;
            10f64.powi(exp.parse::<i32>().ok()?)
        }
    };
    Some(n * scale)
}

/// RFC 9110 token characters, the alphabet of method names.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The regex crate's errors draw the pattern and a caret over several lines; logs and
/// `pylon check` want one line.
fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::{parse_document, MeshObject, ParsedDocument};

    fn parse(yaml: &str) -> ParsedDocument {
        let v: Value = serde_yaml_ng::from_str(yaml).expect("test yaml");
        parse_document(&v, "default")
    }

    const HEAD: &str = "apiVersion: linkerd.io/v1alpha2\nkind: ServiceProfile\n\
                        metadata: {name: web.default.svc.cluster.local, namespace: default}\n";

    fn profile(spec: &str) -> (ServiceProfile, Vec<String>) {
        match parse(&format!("{HEAD}spec:\n{spec}")) {
            ParsedDocument::Valid {
                object: MeshObject::ServiceProfile(p),
                unknown_fields,
            } => (p, unknown_fields),
            other => panic!("expected a valid ServiceProfile, got {other:?}"),
        }
    }

    fn error(spec: &str) -> FieldError {
        match parse(&format!("{HEAD}spec:\n{spec}")) {
            ParsedDocument::Invalid { key, error, .. } => {
                assert_eq!(
                    key.map(|k| k.to_string()).as_deref(),
                    Some("ServiceProfile default/web.default.svc.cluster.local")
                );
                error
            }
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn both_api_versions_are_accepted() {
        for v in ["v1alpha1", "v1alpha2"] {
            let yaml = format!(
                "apiVersion: linkerd.io/{v}\nkind: ServiceProfile\nmetadata: {{name: web.default.svc.cluster.local}}\nspec: {{}}"
            );
            assert!(
                matches!(
                    parse(&yaml),
                    ParsedDocument::Valid {
                        object: MeshObject::ServiceProfile(_),
                        ..
                    }
                ),
                "{v}"
            );
        }
    }

    #[test]
    fn not_accepts_an_object_and_a_list() {
        let (p, unknown) = profile(
            "  routes:
  - name: not-object
    condition:
      pathRegex: /a/.*
      not: {method: GET}
  - name: not-list
    condition:
      pathRegex: /b/.*
      not: [{method: GET}, {method: HEAD}]
",
        );
        assert!(unknown.is_empty(), "{unknown:?}");
        let t = &p.table;
        assert_eq!(&**t.route_for("POST", "/a/x").name(), "not-object");
        assert!(t.route_for("GET", "/a/x").is_default());
        assert_eq!(&**t.route_for("POST", "/b/x").name(), "not-list");
        assert!(t.route_for("GET", "/b/x").is_default());
        assert!(t.route_for("HEAD", "/b/x").is_default());
    }

    #[test]
    fn nested_conditions_and_whole_path_anchoring() {
        let (p, _) = profile(
            r"  routes:
  - name: GET /api/users/{id}
    condition:
      all:
      - method: GET
      - any: [{pathRegex: '/api/users/\d+'}, {pathRegex: '/v2/users/\d+'}]
    isRetryable: true
    timeout: 1m30s
  - name: orders
    condition: {pathRegex: '/api/users/\d+/orders'}
",
        );
        let t = &p.table;
        let r = t.route_for("GET", "/v2/users/7");
        assert_eq!(&**r.name(), "GET /api/users/{id}");
        assert!(r.is_retryable());
        assert_eq!(r.timeout(), Some(std::time::Duration::from_secs(90)));
        assert_eq!(
            &**t.route_for("GET", "/api/users/12/orders").name(),
            "orders"
        );
        assert!(t.route_for("POST", "/api/users/12").is_default());
        // Defaults when no retryBudget is given.
        assert_eq!(*t.retry_budget(), RetryBudgetSpec::default());
    }

    #[test]
    fn response_classes_parse_with_nesting() {
        let (p, _) = profile(
            "  routes:
  - name: health
    condition: {method: GET, pathRegex: /healthz}
    responseClasses:
    - condition: {status: {min: 503, max: 503}}
      isFailure: false
    - condition:
        any: [{status: {min: 429, max: 429}}, {status: {min: 500}}]
      isFailure: true
    - condition:
        not: [{status: {max: 399}}]
      isFailure: true
",
        );
        let r = p.table.route_for("GET", "/healthz");
        assert_eq!(&**r.name(), "health");
        assert!(!r.classify(503, None));
        assert!(r.classify(429, None));
        assert!(r.classify(502, None));
        assert!(r.classify(404, None), "not(<=399)");
        assert!(!r.classify(200, None));
        // No class matches 200, so the default rule sees the gRPC status.
        assert!(r.classify(200, Some(2)));
    }

    #[test]
    fn retry_budget_and_quantity_weights() {
        let (p, _) = profile(
            "  retryBudget: {retryRatio: 0.5, minRetriesPerSecond: 3, ttl: 30s}
  dstOverrides:
  - {authority: web-v1.default.svc.cluster.local:80, weight: 500m}
  - {authority: web-v2.default.svc.cluster.local:80, weight: '1'}
  - {authority: web-v3.default.svc.cluster.local:80, weight: 100}
  - {authority: web-v4.default.svc.cluster.local:80, weight: 1k}
",
        );
        let b = p.table.retry_budget();
        assert_eq!(b.retry_ratio, 0.5);
        assert_eq!(b.min_retries_per_second, 3);
        assert_eq!(b.ttl, std::time::Duration::from_secs(30));
        let w: Vec<f64> = p.table.dst_overrides().iter().map(|d| d.weight()).collect();
        assert_eq!(w, [0.5, 1.0, 100.0, 1000.0]);
        assert_eq!(
            &*p.table.dst_overrides()[0].authority,
            "web-v1.default.svc.cluster.local:80"
        );
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("500m"), Some(0.5));
        assert_eq!(parse_quantity("1.5"), Some(1.5));
        assert_eq!(parse_quantity("2Ki"), Some(2048.0));
        assert_eq!(parse_quantity("1e3"), Some(1000.0));
        assert_eq!(parse_quantity("-1"), Some(-1.0));
        assert_eq!(parse_quantity("m"), None);
        assert_eq!(parse_quantity("10x"), None);
        assert_eq!(parse_quantity(""), None);
    }

    #[test]
    fn validation_errors_name_the_field() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "  routes:\n  - {name: a, condition: {method: GET}}\n  - {name: b, condition: {pathRegex: '/x'}}\n  - {name: c, condition: {pathRegex: '/users/(\\d+'}}\n",
                "spec.routes[2].condition.pathRegex",
                "unclosed group",
            ),
            (
                "  routes:\n  - {name: a, condition: {all: [{method: GET}, {not: {pathRegex: '['}}]}}\n",
                "spec.routes[0].condition.all[1].not.pathRegex",
                "invalid regex",
            ),
            (
                "  routes:\n  - {name: a, condition: {method: GET}, timeout: 5 seconds}\n",
                "spec.routes[0].timeout",
                "invalid duration",
            ),
            (
                "  routes:\n  - {name: a, condition: {method: GET}, responseClasses: [{condition: {status: {min: 500, max: 400}}}]}\n",
                "spec.routes[0].responseClasses[0].condition.status",
                "greater than max",
            ),
            (
                "  routes:\n  - {name: a, condition: {method: GET}, responseClasses: [{condition: {status: {min: 99}}}]}\n",
                "spec.routes[0].responseClasses[0].condition.status.min",
                "100 to 599",
            ),
            (
                "  routes:\n  - {name: a, condition: {method: GET}, responseClasses: [{condition: {any: [{status: {max: 600}}]}}]}\n",
                "spec.routes[0].responseClasses[0].condition.any[0].status.max",
                "100 to 599",
            ),
            (
                "  routes:\n  - {name: '', condition: {method: GET}}\n",
                "spec.routes[0].name",
                "is required",
            ),
            (
                "  routes:\n  - {name: a, condition: {method: GET}}\n  - {name: a, condition: {method: PUT}}\n",
                "spec.routes[1].name",
                "duplicate route name",
            ),
            (
                "  routes:\n  - {name: a}\n",
                "spec.routes[0].condition",
                "is required",
            ),
            (
                "  routes:\n  - {name: a, condition: {}}\n",
                "spec.routes[0].condition",
                "at least one",
            ),
            (
                "  routes:\n  - {name: a, condition: {not: GET}}\n",
                "spec.routes[0].condition.not",
                "mapping or a list",
            ),
            (
                "  dstOverrides: [{authority: a:80, weight: 1}, {authority: b:80, weight: -1}]\n",
                "spec.dstOverrides[1].weight",
                "negative",
            ),
            (
                "  dstOverrides: [{authority: b:80, weight: '-500m'}]\n",
                "spec.dstOverrides[0].weight",
                "negative",
            ),
            (
                "  dstOverrides: [{authority: b:80, weight: lots}]\n",
                "spec.dstOverrides[0].weight",
                "quantity",
            ),
            (
                "  retryBudget: {retryRatio: -0.1}\n",
                "spec.retryBudget.retryRatio",
                ">= 0",
            ),
            (
                "  retryBudget: {minRetriesPerSecond: -1}\n",
                "spec.retryBudget.minRetriesPerSecond",
                "non-negative",
            ),
            (
                "  retryBudget: {ttl: 10}\n",
                "spec.retryBudget.ttl",
                "must be a string",
            ),
        ];
        for (spec, field, message) in cases {
            let err = error(spec);
            assert_eq!(err.field, *field, "{spec}");
            assert!(err.message.contains(message), "{spec}: {err:?}");
            assert!(!err.message.contains('\n'), "{err:?}");
        }
    }

    #[test]
    fn unknown_fields_are_reported_not_fatal() {
        let (p, unknown) = profile(
            "  opaquePorts: ['3306']
  routes:
  - name: a
    condition: {method: GET, header: x}
    responseClasses: [{condition: {status: {min: 500, mid: 550}}, isFailure: true}]
    retries: 3
",
        );
        assert_eq!(
            unknown,
            [
                "spec.opaquePorts",
                "spec.routes[0].retries",
                "spec.routes[0].condition.header",
                "spec.routes[0].responseClasses[0].condition.status.mid",
            ]
        );
        assert_eq!(p.table.routes().len(), 1);
    }
}
