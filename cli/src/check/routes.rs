//! A profile's routes and retry budget: routes that can never match, retries that may repeat
//! non-idempotent requests, timeouts and budgets that are probably mistakes. All warnings: the
//! proxy does exactly what these say, which is rarely what was meant.
//!
//! The checks read the compiled route model ([`RouteTable`]), not the YAML, and only claim
//! what they can prove: a route is reported as shadowed only when an earlier route surely
//! accepts every request it would.

use std::time::Duration;

use pylon_proxy_policy::{PathRegex, RequestMatcher, Route, RouteTable};

use super::ObjectFindings;

/// Methods whose requests may change state on every attempt, so a retry may do it twice.
const NON_IDEMPOTENT: [&str; 3] = ["POST", "PATCH", "CONNECT"];

/// Below this a route timeout fails ordinary responses. Anything finer (a timeout shorter than
/// what the upstream is seen to need, e.g. under its p99, or a retryable route whose timeout
/// leaves no room for a second attempt) needs observed latencies: `route_response_latency_ms`
/// from Prometheus or the proxies' `/metrics`. A config dir does not know them; that check
/// belongs to a command that reads metrics.
const SHORTEST_SENSIBLE_TIMEOUT: Duration = Duration::from_millis(100);

/// Above this retry ratio a failing service gets more than half its traffic again as retries.
const MAX_SENSIBLE_RETRY_RATIO: f64 = 0.5;

/// The retry budget's window: shorter, and ordinary jitter in request rate empties it; longer,
/// and retries funded by a long healthy spell all land on the service when it starts failing.
const SENSIBLE_BUDGET_TTL: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));

pub(super) fn check(table: &RouteTable, out: &mut ObjectFindings) {
    let routes = table.routes();
    for (i, route) in routes.iter().enumerate() {
        if let Some(j) = routes[..i]
            .iter()
            .position(|earlier| shadows(earlier, route))
        {
            out.warning(
                format!("spec.routes[{i}]"),
                format!(
                    "route {:?} can never match: spec.routes[{j}] ({:?}) comes first and \
                     matches every request it would",
                    route.name(),
                    routes[j].name()
                ),
            );
        }
        if route.is_retryable() {
            check_retryable(route, i, out);
        }
        check_classes(route, i, out);
        if let Some(timeout) = route.timeout().filter(|t| *t < SHORTEST_SENSIBLE_TIMEOUT) {
            out.warning(
                format!("spec.routes[{i}].timeout"),
                format!(
                    "timeout {timeout:?} is probably too short: it covers the whole request, \
                     retries included, so any response slower than that fails with 504"
                ),
            );
        }
    }

    let budget = table.retry_budget();
    if budget.retry_ratio > MAX_SENSIBLE_RETRY_RATIO {
        out.warning(
            "spec.retryBudget.retryRatio",
            format!(
                "retryRatio {} lets retries add {:.0}% to the requests of a failing service: a \
                 retry storm can multiply load by up to {}x (plus {} retries/s); Linkerd's \
                 default is 0.2",
                budget.retry_ratio,
                budget.retry_ratio * 100.0,
                1.0 + budget.retry_ratio,
                budget.min_retries_per_second
            ),
        );
    }
    let (shortest, longest) = SENSIBLE_BUDGET_TTL;
    if budget.ttl < shortest {
        out.warning(
            "spec.retryBudget.ttl",
            format!(
                "ttl {:?} is under {shortest:?}: requests older than that no longer fund \
                 retries, so ordinary bursts empty the budget and block retries; Linkerd's \
                 default is 10s",
                budget.ttl
            ),
        );
    } else if budget.ttl > longest {
        out.warning(
            "spec.retryBudget.ttl",
            format!(
                "ttl {:?} is over {longest:?}: retries funded by a long healthy spell all land \
                 on the service when it starts failing; Linkerd's default is 10s",
                budget.ttl
            ),
        );
    }
}

/// A response class that makes successes failures: each 2xx status the route classifies as a
/// failure (the first class matching a status decides, as in the proxy) counts against the
/// route's success rate and, on a retryable route, is retried.
fn check_classes(route: &Route, i: usize, out: &mut ObjectFindings) {
    let failing: Vec<u16> = (200..=299).filter(|s| route.classify(*s, None)).collect();
    let (Some(first), Some(last)) = (failing.first(), failing.last()) else {
        return;
    };
    let Some(class) = route
        .response_classes()
        .iter()
        .position(|c| c.is_failure && c.matcher.matches(*first))
    else {
        return;
    };
    let statuses = if failing.len() == 100 {
        "every 2xx response".to_string()
    } else if first == last {
        format!("{first} responses")
    } else {
        format!("{} 2xx statuses ({first}..{last})", failing.len())
    };
    let retried = if route.is_retryable() {
        ", and the proxy retries them"
    } else {
        ""
    };
    out.warning(
        format!("spec.routes[{i}].responseClasses[{class}]"),
        format!(
            "isFailure classifies {statuses} of route {:?} as failures: successes count \
             against its success rate{retried}",
            route.name()
        ),
    );
}

fn check_retryable(route: &Route, i: usize, out: &mut ObjectFindings) {
    let matcher = route.matcher();
    let risky: Vec<&str> = NON_IDEMPOTENT
        .into_iter()
        .filter(|m| accepts_method(matcher, m) != Some(false))
        .collect();
    if risky.is_empty() {
        return;
    }
    let message = if mentions_method(matcher) {
        format!(
            "isRetryable on a route that matches {}: retries may repeat non-idempotent requests",
            risky.join(", ")
        )
    } else {
        "isRetryable on a route with no method condition, so it matches POST too: retries may \
         repeat non-idempotent requests"
            .to_string()
    };
    out.warning(format!("spec.routes[{i}].isRetryable"), message);
}

/// Whether `earlier` accepts every request `later` accepts, by rules that are cheap and never
/// wrong (they miss some cases, e.g. `/users/.*` before `/users/\d+`):
///
/// - `earlier` accepts every path (`.*`, `/.*`: a request path starts with `/`) and every
///   method;
/// - `later` is one literal path (and maybe a method): ask `earlier`'s own compiled matcher;
/// - both are "method and/or regex" and `earlier` asks no more: no or the same method, and no,
///   a catch-all or the identical regex.
fn shadows(earlier: &Route, later: &Route) -> bool {
    let e = Simple::of(earlier.matcher());
    if e.as_ref()
        .is_some_and(|e| e.method.is_none() && e.path.is_some_and(is_catch_all))
    {
        return true;
    }
    let Some(l) = Simple::of(later.matcher()) else {
        return false;
    };
    if let Some(path) = l.path.and_then(|r| literal_path(r.as_str())) {
        return match l.method {
            Some(method) => earlier.matcher().matches(method, &path),
            // Any method: only a condition that ignores methods surely accepts them all.
            None => !mentions_method(earlier.matcher()) && earlier.matcher().matches("GET", &path),
        };
    }
    let Some(e) = e else {
        return false;
    };
    let method_covered = e.method.is_none() || e.method == l.method;
    let path_covered = match e.path {
        None => true,
        Some(re) => is_catch_all(re) || l.path.is_some_and(|l| l.as_str() == re.as_str()),
    };
    method_covered && path_covered
}

/// A route condition in the shape most profiles use: a method, a path regex, or both.
struct Simple<'a> {
    method: Option<&'a str>,
    path: Option<&'a PathRegex>,
}

impl<'a> Simple<'a> {
    fn of(matcher: &'a RequestMatcher) -> Option<Self> {
        match matcher {
            RequestMatcher::Method(m) => Some(Self {
                method: Some(m),
                path: None,
            }),
            RequestMatcher::PathRegex(re) => Some(Self {
                method: None,
                path: Some(re),
            }),
            RequestMatcher::All(parts) => match parts.as_slice() {
                [RequestMatcher::Method(m), RequestMatcher::PathRegex(re)]
                | [RequestMatcher::PathRegex(re), RequestMatcher::Method(m)] => Some(Self {
                    method: Some(m),
                    path: Some(re),
                }),
                _ => None,
            },
            RequestMatcher::Any(_) | RequestMatcher::Not(_) => None,
        }
    }
}

fn is_catch_all(re: &PathRegex) -> bool {
    matches!(re.as_str(), ".*" | "/.*")
}

/// The one path a regex matches when it has no operators (`\.`-style escapes allowed), else
/// `None`.
fn literal_path(re: &str) -> Option<String> {
    let mut path = String::with_capacity(re.len());
    let mut chars = re.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(escaped) if escaped.is_ascii_punctuation() => path.push(escaped),
                _ => return None,
            },
            '.' | '+' | '*' | '?' | '(' | ')' | '|' | '[' | ']' | '{' | '}' | '^' | '$' => {
                return None
            }
            c => path.push(c),
        }
    }
    Some(path)
}

/// Whether a condition accepts requests with this method: `Some` when the method alone
/// decides, `None` when it depends on the path.
fn accepts_method(matcher: &RequestMatcher, method: &str) -> Option<bool> {
    match matcher {
        RequestMatcher::Method(m) => Some(**m == *method),
        RequestMatcher::PathRegex(_) => None,
        RequestMatcher::All(parts) => {
            let each: Vec<Option<bool>> = parts.iter().map(|p| accepts_method(p, method)).collect();
            if each.contains(&Some(false)) {
                Some(false)
            } else if each.iter().all(|a| *a == Some(true)) {
                Some(true)
            } else {
                None
            }
        }
        RequestMatcher::Any(parts) => {
            let each: Vec<Option<bool>> = parts.iter().map(|p| accepts_method(p, method)).collect();
            if each.contains(&Some(true)) {
                Some(true)
            } else if each.iter().all(|a| *a == Some(false)) {
                Some(false)
            } else {
                None
            }
        }
        RequestMatcher::Not(inner) => accepts_method(inner, method).map(|a| !a),
    }
}

fn mentions_method(matcher: &RequestMatcher) -> bool {
    match matcher {
        RequestMatcher::Method(_) => true,
        RequestMatcher::PathRegex(_) => false,
        RequestMatcher::All(parts) | RequestMatcher::Any(parts) => {
            parts.iter().any(mentions_method)
        }
        RequestMatcher::Not(inner) => mentions_method(inner),
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{audit_files, profile, service};
    use super::super::{Finding, Severity};
    use super::*;

    /// The findings for a profile of `web` (which exists and is ready) with these routes.
    fn findings(spec: &str) -> Vec<Finding> {
        audit_files(&[
            ("web.yaml", &service("web", Some(true))),
            ("profile.yaml", &profile(spec)),
        ])
    }

    fn fields_and_messages(findings: &[Finding]) -> Vec<(&str, &str)> {
        assert!(
            findings.iter().all(|f| f.severity == Severity::Warning),
            "{findings:#?}"
        );
        findings
            .iter()
            .map(|f| (f.field.as_str(), f.message.as_str()))
            .collect()
    }

    #[test]
    fn routes_behind_a_catch_all_or_an_identical_route_are_shadowed() {
        let found = findings(
            r"  routes:
  - {name: users, condition: {pathRegex: '/users/\d+'}}
  - {name: everything, condition: {pathRegex: '/.*'}}
  - {name: get-users-again, condition: {method: GET, pathRegex: '/users/\d+'}}
  - {name: post-orders, condition: {method: POST, pathRegex: '/orders/.*'}}
",
        );
        assert_eq!(
            fields_and_messages(&found),
            [
                (
                    "spec.routes[2]",
                    "route \"get-users-again\" can never match: spec.routes[0] (\"users\") comes \
                     first and matches every request it would"
                ),
                (
                    "spec.routes[3]",
                    "route \"post-orders\" can never match: spec.routes[1] (\"everything\") comes \
                     first and matches every request it would"
                ),
            ]
        );
    }

    #[test]
    fn literal_paths_under_an_earlier_prefix_are_shadowed() {
        let found = findings(
            r"  routes:
  - {name: api, condition: {pathRegex: '/api/.*'}}
  - {name: gets, condition: {method: GET}}
  - {name: health, condition: {pathRegex: '/api/health'}}
  - {name: get-version, condition: {method: GET, pathRegex: '/version\.json'}}
  - {name: put-version, condition: {method: PUT, pathRegex: '/version\.json'}}
  - {name: other, condition: {pathRegex: '/other'}}
",
        );
        assert_eq!(
            fields_and_messages(&found),
            [
                (
                    "spec.routes[2]",
                    "route \"health\" can never match: spec.routes[0] (\"api\") comes first and \
                     matches every request it would"
                ),
                (
                    "spec.routes[3]",
                    "route \"get-version\" can never match: spec.routes[1] (\"gets\") comes first \
                     and matches every request it would"
                ),
            ]
        );
    }

    #[test]
    fn routes_that_only_overlap_are_not_reported() {
        let found = findings(
            r"  routes:
  - {name: get-users, condition: {method: GET, pathRegex: '/users/.*'}}
  - {name: users, condition: {pathRegex: '/users/.*'}}
  - {name: one-user, condition: {pathRegex: '/users/\d+'}}
  - {name: not-get, condition: {not: {method: GET}}}
  - {name: post-user, condition: {method: POST, pathRegex: '/users/1'}}
",
        );
        // post-user is shadowed (by users first, and by not-get: a literal path is checked
        // against any earlier condition), but get-users does not shadow users, and nothing is
        // claimed about the \d+ regex.
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(found[0].field, "spec.routes[4]");
        assert!(
            found[0].message.contains("spec.routes[1] (\"users\")"),
            "{found:?}"
        );
    }

    #[test]
    fn retryable_routes_that_match_non_idempotent_methods_are_warned_about() {
        let found = findings(
            r"  routes:
  - {name: create, condition: {method: POST, pathRegex: '/orders'}, isRetryable: true}
  - {name: any-method, condition: {pathRegex: '/carts/.*'}, isRetryable: true}
  - {name: get, condition: {method: GET, pathRegex: '/orders/.*'}, isRetryable: true}
  - {name: not-get, condition: {not: {method: GET}, pathRegex: '/x'}, isRetryable: true}
  - {name: reads, condition: {any: [{method: GET}, {method: HEAD}]}, isRetryable: true}
  - {name: post-unretried, condition: {method: POST, pathRegex: '/y'}}
",
        );
        assert_eq!(
            fields_and_messages(&found),
            [
                (
                    "spec.routes[0].isRetryable",
                    "isRetryable on a route that matches POST: retries may repeat \
                     non-idempotent requests"
                ),
                (
                    "spec.routes[1].isRetryable",
                    "isRetryable on a route with no method condition, so it matches POST too: \
                     retries may repeat non-idempotent requests"
                ),
                (
                    "spec.routes[3].isRetryable",
                    "isRetryable on a route that matches POST, PATCH, CONNECT: retries may \
                     repeat non-idempotent requests"
                ),
            ]
        );
    }

    #[test]
    fn response_classes_that_fail_successes_are_warned_about() {
        let found = findings(
            r"  routes:
  - name: auth
    condition: {pathRegex: '/auth'}
    responseClasses:
    - {condition: {status: {min: 500, max: 599}}, isFailure: true}
    - {condition: {status: {min: 200, max: 299}}, isFailure: true}
  - name: created
    condition: {method: GET, pathRegex: '/orders'}
    isRetryable: true
    responseClasses:
    - {condition: {status: {min: 201, max: 201}}, isFailure: true}
  - name: fine
    condition: {pathRegex: '/ok'}
    responseClasses:
    - {condition: {status: {min: 200, max: 299}}, isFailure: false}
    - {condition: {status: {min: 200, max: 599}}, isFailure: true}
",
        );
        assert_eq!(
            fields_and_messages(&found),
            [
                (
                    "spec.routes[0].responseClasses[1]",
                    "isFailure classifies every 2xx response of route \"auth\" as failures: \
                     successes count against its success rate"
                ),
                (
                    "spec.routes[1].responseClasses[0]",
                    "isFailure classifies 201 responses of route \"created\" as failures: \
                     successes count against its success rate, and the proxy retries them"
                ),
            ]
        );
    }

    #[test]
    fn short_timeouts_are_warned_about() {
        let found = findings(
            r"  routes:
  - {name: fast, condition: {pathRegex: '/a'}, timeout: 50ms}
  - {name: fine, condition: {pathRegex: '/b'}, timeout: 100ms}
  - {name: none, condition: {pathRegex: '/c'}}
",
        );
        assert_eq!(
            fields_and_messages(&found),
            [(
                "spec.routes[0].timeout",
                "timeout 50ms is probably too short: it covers the whole request, retries \
                 included, so any response slower than that fails with 504"
            )]
        );
    }

    #[test]
    fn retry_budgets_that_invite_retry_storms_are_warned_about() {
        let found =
            findings("  retryBudget: {retryRatio: 0.8, minRetriesPerSecond: 10, ttl: 10s}\n");
        assert_eq!(
            fields_and_messages(&found),
            [(
                "spec.retryBudget.retryRatio",
                "retryRatio 0.8 lets retries add 80% to the requests of a failing service: a \
                 retry storm can multiply load by up to 1.8x (plus 10 retries/s); Linkerd's \
                 default is 0.2"
            )]
        );
        for (ttl, says) in [("500ms", "is under 1s"), ("5m", "is over 60s")] {
            let found = findings(&format!("  retryBudget: {{ttl: {ttl}}}\n"));
            let got = fields_and_messages(&found);
            assert_eq!(got.len(), 1, "{got:?}");
            assert_eq!(got[0].0, "spec.retryBudget.ttl");
            assert!(got[0].1.contains(says), "{got:?}");
        }
        for fine in [
            "{retryRatio: 0.5, ttl: 1s}",
            "{ttl: 60s}",
            "{retryRatio: 0.2}",
        ] {
            assert_eq!(findings(&format!("  retryBudget: {fine}\n")), [], "{fine}");
        }
    }

    #[test]
    fn literal_paths() {
        assert_eq!(literal_path("/api/health").as_deref(), Some("/api/health"));
        assert_eq!(literal_path(r"/v1\.json").as_deref(), Some("/v1.json"));
        assert_eq!(literal_path("/v1.json"), None);
        assert_eq!(literal_path(r"/users/\d+"), None);
        assert_eq!(literal_path("/a|/b"), None);
    }
}
