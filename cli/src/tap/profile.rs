//! `pylon profile --tap`: a ServiceProfile from observed requests. Paths are generalised one
//! segment at a time: all-digit segments become `\d+` (`{id}` in the route name), UUIDs a UUID
//! pattern (`{uuid}`), anything else stays literal (regex-escaped).

use std::collections::BTreeMap;

const UUID_RE: &str = "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}";

fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A route: `(name path, pathRegex)`, e.g. `("/users/{id}", "/users/\d+")`.
pub fn generalise(path: &str) -> (String, String) {
    let path = path.split(['?', '#']).next().unwrap_or("");
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    let mut name = Vec::new();
    let mut re = Vec::new();
    for seg in path.split('/') {
        if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
            name.push("{id}".to_string());
            re.push(r"\d+".to_string());
        } else if is_uuid(seg) {
            name.push("{uuid}".to_string());
            re.push(UUID_RE.to_string());
        } else {
            name.push(seg.to_string());
            re.push(regex::escape(seg));
        }
    }
    (name.join("/"), re.join("/"))
}

/// The observed routes: `(method, pathRegex)` -> (route name, requests seen).
#[derive(Clone, Default, Debug)]
pub struct Routes {
    routes: BTreeMap<(String, String), (String, u64)>,
    pub requests: u64,
}

impl Routes {
    pub fn observe(&mut self, method: &str, path: &str) {
        let (name, re) = generalise(path);
        self.requests += 1;
        self.routes
            .entry((method.to_string(), re))
            .or_insert_with(|| (format!("{method} {name}"), 0))
            .1 += 1;
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    fn merge(&mut self, other: &Routes) {
        self.requests += other.requests;
        for (key, (name, count)) in &other.routes {
            self.routes
                .entry(key.clone())
                .or_insert_with(|| (name.clone(), 0))
                .1 += count;
        }
    }

    /// The ServiceProfile YAML for `fqdn` in `namespace`; `comment` heads it.
    pub fn yaml(&self, fqdn: &str, namespace: &str, comment: &str) -> String {
        let mut out = String::new();
        for line in comment.lines() {
            out.push_str(&format!("# {line}\n"));
        }
        out.push_str("apiVersion: linkerd.io/v1alpha2\nkind: ServiceProfile\nmetadata:\n");
        out.push_str(&format!("  name: {}\n", quote(fqdn)));
        out.push_str(&format!("  namespace: {}\n", quote(namespace)));
        out.push_str("spec:\n  routes:\n");
        let mut routes: Vec<_> = self.routes.iter().collect();
        routes.sort_by(|a, b| (&a.1 .0, &a.0).cmp(&(&b.1 .0, &b.0)));
        for ((method, re), (name, count)) in routes {
            out.push_str(&format!("  # {count} request(s) observed\n"));
            out.push_str(&format!("  - name: {}\n", quote(name)));
            out.push_str("    condition:\n");
            out.push_str(&format!("      method: {}\n", quote(method)));
            out.push_str(&format!("      pathRegex: {}\n", quote(re)));
        }
        out
    }
}

/// A service: `(name, namespace)`.
pub type ServiceName = (String, String);

/// Requests observed on each side of the proxies tapped and for each service their authority
/// names (`None`: one that names no in-cluster service), so a profile counts each request once
/// (a request between two tapped proxies is seen by both: the client's outbound side and the
/// server's inbound side) and holds one service's routes.
#[derive(Default, Debug)]
pub struct Observed {
    by: BTreeMap<(bool, Option<ServiceName>), Routes>,
}

impl Observed {
    /// One request, seen on the `inbound` side or not, for `authority`.
    pub fn observe(&mut self, inbound: bool, authority: Option<&str>, method: &str, path: &str) {
        let service = authority.and_then(crate::stat::resource::service_of_authority);
        self.by
            .entry((inbound, service))
            .or_default()
            .observe(method, path);
    }

    /// The service with the most requests (on its busier side, so none is counted twice);
    /// ties go to the first by name.
    pub fn busiest_service(&self) -> Option<ServiceName> {
        let mut counts: BTreeMap<&ServiceName, (u64, u64)> = BTreeMap::new();
        for ((inbound, service), routes) in &self.by {
            let Some(service) = service else { continue };
            let c = counts.entry(service).or_default();
            if *inbound {
                c.0 += routes.requests;
            } else {
                c.1 += routes.requests;
            }
        }
        counts
            .into_iter()
            .map(|(s, (i, o))| (s, i.max(o)))
            .fold(
                None,
                |best: Option<(&ServiceName, u64)>, (s, n)| match best {
                    Some((_, m)) if m >= n => best,
                    _ => Some((s, n)),
                },
            )
            .map(|(s, _)| s.clone())
    }

    /// The routes of `service`: those requests for it (or for no in-cluster service) seen on
    /// the inbound side, the requests it served, else on the outbound side, the requests its
    /// clients sent. Requests for other services are left out.
    pub fn routes_of(&self, service: &ServiceName) -> Routes {
        let side = |inbound: bool| {
            let mut routes = Routes::default();
            for key in [(inbound, Some(service.clone())), (inbound, None)] {
                if let Some(r) = self.by.get(&key) {
                    routes.merge(r);
                }
            }
            routes
        };
        let inbound = side(true);
        if inbound.is_empty() {
            side(false)
        } else {
            inbound
        }
    }

    pub fn is_empty(&self) -> bool {
        self.by.values().all(Routes::is_empty)
    }
}

/// A single-quoted YAML scalar (no escapes but `''`).
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_and_uuid_segments_become_patterns() {
        assert_eq!(
            generalise("/users/7"),
            ("/users/{id}".into(), r"/users/\d+".into())
        );
        assert_eq!(
            generalise("/users/123/orders/9?x=1"),
            (
                "/users/{id}/orders/{id}".into(),
                r"/users/\d+/orders/\d+".into()
            )
        );
        let (name, re) = generalise("/items/3f2504e0-4f89-41d3-9a0c-0305e82c3301/tags");
        assert_eq!(name, "/items/{uuid}/tags");
        assert_eq!(re, format!("/items/{UUID_RE}/tags"));
        let re = regex::Regex::new(&format!("^(?:{re})$")).unwrap();
        assert!(re.is_match("/items/3F2504E0-4F89-41D3-9A0C-0305E82C3301/tags"));
        assert!(!re.is_match("/items/abc/tags"));
    }

    #[test]
    fn other_segments_stay_literal_and_escaped() {
        assert_eq!(generalise("/"), ("/".into(), "/".into()));
        assert_eq!(
            generalise("/v1.2/a+b/"),
            ("/v1.2/a+b/".into(), r"/v1\.2/a\+b/".into())
        );
        // Mixed segments are literal, not numbers.
        assert_eq!(generalise("/page7").1, "/page7");
        assert!(!is_uuid("3f2504e0-4f89-41d3-9a0c-0305e82c330"));
    }

    #[test]
    fn routes_group_by_method_and_generalised_path() {
        let mut routes = Routes::default();
        routes.observe("GET", "/users/1");
        routes.observe("GET", "/users/2");
        routes.observe("POST", "/users/2");
        routes.observe("GET", "/health");
        let yaml = routes.yaml("web.default.svc.cluster.local", "default", "made by a test");
        let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&yaml).unwrap();
        assert_eq!(v["kind"], "ServiceProfile");
        assert_eq!(v["metadata"]["name"], "web.default.svc.cluster.local");
        let names: Vec<&str> = v["spec"]["routes"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["GET /health", "GET /users/{id}", "POST /users/{id}"]
        );
        assert_eq!(
            v["spec"]["routes"][1]["condition"]["pathRegex"],
            r"/users/\d+"
        );
        assert_eq!(v["spec"]["routes"][1]["condition"]["method"], "GET");
        assert_eq!(routes.requests, 4);
        assert_eq!(quote("it's"), "'it''s'");
    }

    #[test]
    fn each_request_is_counted_once_for_one_service() {
        const B: &str = "b.default.svc.cluster.local:80";
        const C: &str = "c.default.svc.cluster.local:80";
        let b = ("b".to_string(), "default".to_string());
        let mut seen = Observed::default();
        // Three requests to b, seen by the client's outbound side and b's inbound side.
        for i in 1..=3 {
            seen.observe(false, Some(B), "GET", &format!("/users/{i}"));
            seen.observe(true, Some(B), "GET", &format!("/users/{i}"));
        }
        // The client also calls c, and b is called once by a bare host name.
        seen.observe(false, Some(C), "GET", "/c-only");
        seen.observe(false, Some(C), "GET", "/c-only");
        seen.observe(true, Some("10.0.0.5:8080"), "GET", "/health");
        assert_eq!(seen.busiest_service(), Some(b.clone()));
        let routes = seen.routes_of(&b);
        assert_eq!(routes.requests, 4, "inbound only: {routes:?}");
        let yaml = routes.yaml("b.default.svc.cluster.local", "default", "x");
        assert!(
            yaml.contains("# 3 request(s) observed\n  - name: 'GET /users/{id}'"),
            "{yaml}"
        );
        assert!(yaml.contains("'GET /health'"), "{yaml}");
        assert!(!yaml.contains("c-only"), "{yaml}");

        // Only clients tapped: their side.
        let mut seen = Observed::default();
        seen.observe(false, Some(B), "GET", "/x");
        assert_eq!(seen.routes_of(&b).requests, 1);
        assert!(!seen.is_empty());
        assert!(Observed::default().is_empty());
        assert_eq!(Observed::default().busiest_service(), None);
    }
}
