//! Label and field selectors as the API server parses them from `labelSelector` / `fieldSelector`.

use serde_json::Value;

#[derive(Clone, Debug, PartialEq)]
enum Label {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed `labelSelector` plus `fieldSelector` (and the path's namespace or name, which the
/// server applies as field requirements too).
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Selector {
    labels: Vec<Label>,
    /// (dotted field path, equal?, value)
    fields: Vec<(String, bool, String)>,
}

impl Selector {
    pub(crate) fn parse(labels: Option<&str>, fields: Option<&str>) -> Result<Self, String> {
        let mut sel = Selector::default();
        for term in split_terms(labels.unwrap_or("")) {
            sel.labels.push(parse_label(term)?);
        }
        for term in split_terms(fields.unwrap_or("")) {
            let (key, eq, value) = if let Some((k, v)) = term.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (k, true, v)
            } else {
                return Err(format!(
                    "invalid field selector: {term:?}: expected an operator"
                ));
            };
            sel.fields
                .push((key.trim().to_string(), eq, value.trim().to_string()));
        }
        Ok(sel)
    }

    /// Adds `field=value`, as a namespaced path (`.../namespaces/ns/...`) or a single-object watch does.
    pub(crate) fn require_field(&mut self, field: &str, value: &str) {
        self.fields
            .push((field.to_string(), true, value.to_string()));
    }

    pub(crate) fn matches(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        let label = |k: &str| labels.get(k).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|req| match req {
            Label::Eq(k, v) => label(k) == Some(v.as_str()),
            // `!=` and `notin` also match objects without the label, as in Kubernetes.
            Label::NotEq(k, v) => label(k) != Some(v.as_str()),
            Label::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Label::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Label::Exists(k) => label(k).is_some(),
            Label::NotExists(k) => label(k).is_none(),
        });
        labels_ok
            && self.fields.iter().all(|(path, eq, want)| {
                let got = path.split('.').try_fold(obj, |v, seg| v.get(seg));
                let got = match got {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Null) | None => String::new(),
                    Some(other) => other.to_string(),
                };
                (got == *want) == *eq
            })
    }
}

/// Splits on commas outside parentheses: `a in (x,y),b` is two terms.
fn split_terms(s: &str) -> Vec<&str> {
    let (mut terms, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&s[start..]);
    terms
        .into_iter()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

fn parse_label(term: &str) -> Result<Label, String> {
    let key = |k: &str| {
        let k = k.trim();
        if k.is_empty() || k.contains(char::is_whitespace) {
            Err(format!("invalid label selector term: {term:?}"))
        } else {
            Ok(k.to_string())
        }
    };
    if let Some(rest) = term.strip_prefix('!') {
        return Ok(Label::NotExists(key(rest)?));
    }
    if let (Some(open), Some(list)) = (term.find('('), term.strip_suffix(')')) {
        let values = list[open + 1..]
            .split(',')
            .map(|v| v.trim().to_string())
            .collect();
        let head = term[..open].trim_end();
        if let Some(k) = head.strip_suffix(" notin") {
            return Ok(Label::NotIn(key(k)?, values));
        }
        if let Some(k) = head.strip_suffix(" in") {
            return Ok(Label::In(key(k)?, values));
        }
        return Err(format!("invalid label selector term: {term:?}"));
    }
    if let Some((k, v)) = term.split_once("!=") {
        return Ok(Label::NotEq(key(k)?, v.trim().to_string()));
    }
    if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return Ok(Label::Eq(key(k)?, v.trim().to_string()));
    }
    Ok(Label::Exists(key(term)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_and_field_selectors() {
        let obj = json!({"metadata": {"name": "web", "namespace": "ns", "labels": {"app": "web", "tier": "fe"}},
                         "status": {"phase": "Running"}});
        let m = |l: &str, f: &str| Selector::parse(Some(l), Some(f)).unwrap().matches(&obj);
        assert!(m("", ""));
        assert!(m("app=web,tier", "metadata.name=web"));
        assert!(m(
            "app==web",
            "metadata.namespace!=other,status.phase=Running"
        ));
        assert!(!m("app!=web", ""));
        assert!(m("missing!=x,!missing", ""));
        assert!(m("tier in (be, fe),app notin (db)", ""));
        assert!(!m("tier in (be)", ""));
        assert!(!m("!app", ""));
        assert!(!m("", "metadata.name=other"));
        assert!(Selector::parse(Some("a b"), None).is_err());
        assert!(Selector::parse(None, Some("metadata.name")).is_err());
    }
}
