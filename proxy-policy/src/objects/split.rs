//! SMI `split.smi-spec.io` `TrafficSplit`, `v1alpha1` to `v1alpha4`: requests for the apex
//! `spec.service` are shared among `spec.backends` by weight (a backend's share is its weight
//! over the sum). Weights are integers (`v1alpha2`+) or Kubernetes quantities (`v1alpha1`'s
//! `500m`); both are accepted in every version.

use std::sync::Arc;

use serde_yaml_ng::Mapping;

use super::profile::weight_milli;
use super::{
    as_mapping, get, is_dns1035_label, note_unknown, opt_mapping, opt_seq, req_str, FieldError,
    ObjectMeta, ServiceRef,
};

/// A validated TrafficSplit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrafficSplit {
    pub meta: ObjectMeta,
    /// The apex service, in the split's namespace.
    pub service: Arc<str>,
    /// In file order; at least one.
    pub backends: Vec<SplitBackend>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitBackend {
    /// A service in the split's namespace.
    pub service: Arc<str>,
    /// Thousandths, so quantities (`500m`) stay exact.
    pub weight_milli: u64,
}

impl TrafficSplit {
    pub fn apex(&self) -> ServiceRef {
        ServiceRef {
            namespace: self.meta.namespace.clone(),
            name: self.service.clone(),
        }
    }

    pub fn backend_ref(&self, backend: &SplitBackend) -> ServiceRef {
        ServiceRef {
            namespace: self.meta.namespace.clone(),
            name: backend.service.clone(),
        }
    }

    pub fn total_weight_milli(&self) -> u64 {
        self.backends.iter().map(|b| b.weight_milli).sum()
    }
}

const SPLIT_FIELDS: &[&str] = &["apiVersion", "kind", "metadata", "spec"];
// `matches` (v1alpha3+, HTTPRouteGroup references) is not supported: reported as unknown, so
// the split applies to every request for the apex.
const SPEC_FIELDS: &[&str] = &["service", "backends"];
const BACKEND_FIELDS: &[&str] = &["service", "weight"];

pub(super) fn parse_traffic_split(
    root: &Mapping,
    meta: ObjectMeta,
    unknown: &mut Vec<String>,
) -> Result<TrafficSplit, FieldError> {
    note_unknown(root, "", SPLIT_FIELDS, unknown);
    let Some(spec) = opt_mapping(root, "", "spec")? else {
        return Err(FieldError::new("spec", "is required"));
    };
    note_unknown(spec, "spec", SPEC_FIELDS, unknown);
    let service = service_name(spec, "spec")?;

    let mut backends: Vec<SplitBackend> = Vec::new();
    for (i, item) in opt_seq(spec, "spec", "backends")?.iter().enumerate() {
        let path = format!("spec.backends[{i}]");
        let b = as_mapping(item, &path)?;
        note_unknown(b, &path, BACKEND_FIELDS, unknown);
        let name = service_name(b, &path)?;
        let Some(weight) = get(b, "weight") else {
            return Err(FieldError::new(format!("{path}.weight"), "is required"));
        };
        let weight_milli = weight_milli(weight, &format!("{path}.weight"))?;
        if let Some(j) = backends.iter().position(|x| x.service == name) {
            return Err(FieldError::new(
                format!("{path}.service"),
                format!("backend {name:?} is listed twice (also spec.backends[{j}])"),
            ));
        }
        backends.push(SplitBackend {
            service: name,
            weight_milli,
        });
    }
    if backends.is_empty() {
        return Err(FieldError::new(
            "spec.backends",
            "must list at least one backend",
        ));
    }
    Ok(TrafficSplit {
        meta,
        service,
        backends,
    })
}

/// A service named in the split's namespace: a plain name (`web-v2`); SMI has no cross-namespace
/// backends.
fn service_name(map: &Mapping, path: &str) -> Result<Arc<str>, FieldError> {
    let name = req_str(map, path, "service")?;
    if !is_dns1035_label(name) {
        return Err(FieldError::new(
            format!("{path}.service"),
            format!("invalid service name {name:?}: a Service name in the split's namespace"),
        ));
    }
    Ok(name.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::{parse_document, MeshObject, ParsedDocument};
    use serde_yaml_ng::Value;

    fn parse(yaml: &str) -> ParsedDocument {
        let v: Value = serde_yaml_ng::from_str(yaml).expect("test yaml");
        parse_document(&v, "default")
    }

    fn split(version: &str, spec: &str) -> ParsedDocument {
        parse(&format!(
            "apiVersion: split.smi-spec.io/{version}\nkind: TrafficSplit\nmetadata: {{name: web-split}}\nspec:\n{spec}"
        ))
    }

    fn valid(doc: ParsedDocument) -> (TrafficSplit, Vec<String>) {
        match doc {
            ParsedDocument::Valid {
                object: MeshObject::TrafficSplit(s),
                unknown_fields,
            } => (s, unknown_fields),
            other => panic!("expected a valid TrafficSplit, got {other:?}"),
        }
    }

    fn error(doc: ParsedDocument) -> FieldError {
        match doc {
            ParsedDocument::Invalid { error, .. } => error,
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn every_version_and_both_weight_forms() {
        for v in ["v1alpha1", "v1alpha2", "v1alpha3", "v1alpha4"] {
            let (s, unknown) = valid(split(
                v,
                "  service: web\n  backends:\n  - {service: web, weight: 900m}\n  - {service: web-v2, weight: 100}\n",
            ));
            assert_eq!(&*s.service, "web", "{v}");
            assert_eq!(s.backends[0].weight_milli, 900);
            assert_eq!(s.backends[1].weight_milli, 100_000);
            assert_eq!(&*s.apex().namespace, "default");
            assert!(unknown.is_empty(), "{unknown:?}");
        }
    }

    #[test]
    fn matches_are_reported_not_fatal() {
        let (_, unknown) = valid(split(
            "v1alpha4",
            "  service: web\n  matches:\n  - {kind: HTTPRouteGroup, name: canary}\n  backends:\n  - {service: web, weight: 1}\n",
        ));
        assert_eq!(unknown, ["spec.matches"]);
    }

    #[test]
    fn problems_name_the_field() {
        let e = error(split(
            "v1alpha2",
            "  backends:\n  - {service: web, weight: 1}\n",
        ));
        assert_eq!(e.field, "spec.service");
        let e = error(split("v1alpha2", "  service: web\n  backends: []\n"));
        assert_eq!(e.field, "spec.backends");
        let e = error(split(
            "v1alpha2",
            "  service: web\n  backends:\n  - {service: web, weight: -1}\n",
        ));
        assert_eq!(e.field, "spec.backends[0].weight");
        let e = error(split(
            "v1alpha2",
            "  service: web\n  backends:\n  - {service: web}\n",
        ));
        assert_eq!(e.field, "spec.backends[0].weight");
        let e = error(split(
            "v1alpha2",
            "  service: web\n  backends:\n  - {service: a, weight: 1}\n  - {service: a, weight: 2}\n",
        ));
        assert_eq!(e.field, "spec.backends[1].service");
        let e = error(split(
            "v1alpha2",
            "  service: web\n  backends:\n  - {service: web.other, weight: 1}\n",
        ));
        assert_eq!(e.field, "spec.backends[0].service");
    }
}
