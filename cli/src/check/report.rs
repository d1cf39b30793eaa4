//! The report: a list grouped by file for people, a JSON document for machines.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use super::{Finding, Summary};

/// Findings grouped by file, each with its severity, object and field on one line and the
/// message under it, then one summary line:
///
/// ```text
/// mesh/split.yaml
///   error    TrafficSplit default/web-split  spec.backends
///            weights sum to 110 (...)
///
/// 1 error, 0 warnings in 5 objects (mesh)
/// ```
pub(super) fn human(dir: &Path, findings: &[Finding], summary: Summary) -> String {
    let mut out = String::new();
    let mut file = None;
    for f in findings {
        if file != Some(&f.file) {
            if file.is_some() {
                out.push('\n');
            }
            file = Some(&f.file);
            out.push_str(&f.file);
            out.push('\n');
        }
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "  {:<8} {}  {}\n{:11}{}",
            f.severity.as_str(),
            f.object,
            f.field,
            "",
            f.message
        );
    }
    if !findings.is_empty() {
        out.push('\n');
    }
    let counts = if findings.is_empty() {
        "no problems found".to_string()
    } else {
        format!(
            "{}, {}",
            plural(summary.errors, "error"),
            plural(summary.warnings, "warning")
        )
    };
    let _ = writeln!(
        out,
        "{counts} in {} ({})",
        plural(summary.objects, "object"),
        dir.display()
    );
    out
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

#[derive(Serialize)]
struct Document<'a> {
    dir: String,
    findings: &'a [Finding],
    summary: Summary,
}

/// `{"dir": ..., "findings": [{"severity", "file", "object", "field", "message"}], "summary":
/// {"errors", "warnings", "objects"}}`, pretty-printed.
pub(super) fn json(
    dir: &Path,
    findings: &[Finding],
    summary: Summary,
) -> Result<String, serde_json::Error> {
    let document = Document {
        dir: dir.display().to_string(),
        findings,
        summary,
    };
    let mut text = serde_json::to_string_pretty(&document)?;
    text.push('\n');
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::super::Severity;
    use super::*;

    fn finding(severity: Severity, file: &str, field: &str) -> Finding {
        Finding {
            severity,
            file: file.to_string(),
            object: "TrafficSplit default/web-split".to_string(),
            field: field.to_string(),
            message: "something".to_string(),
        }
    }

    #[test]
    fn human_groups_by_file_and_counts() {
        let findings = [
            finding(Severity::Error, "mesh/a.yaml", "spec.backends"),
            finding(Severity::Warning, "mesh/a.yaml", "spec.service"),
            finding(Severity::Error, "mesh/b.yaml", "spec.backends"),
        ];
        let summary = Summary {
            errors: 2,
            warnings: 1,
            objects: 7,
        };
        assert_eq!(
            human(Path::new("mesh"), &findings, summary),
            "mesh/a.yaml\n\
             \x20 error    TrafficSplit default/web-split  spec.backends\n\
             \x20          something\n\
             \x20 warning  TrafficSplit default/web-split  spec.service\n\
             \x20          something\n\
             \n\
             mesh/b.yaml\n\
             \x20 error    TrafficSplit default/web-split  spec.backends\n\
             \x20          something\n\
             \n\
             2 errors, 1 warning in 7 objects (mesh)\n"
        );
    }

    #[test]
    fn human_says_when_there_is_nothing_to_fix() {
        let summary = Summary {
            errors: 0,
            warnings: 0,
            objects: 1,
        };
        assert_eq!(
            human(Path::new("."), &[], summary),
            "no problems found in 1 object (.)\n"
        );
    }

    #[test]
    fn json_has_findings_and_summary() {
        let findings = [finding(Severity::Warning, "a.yaml", "spec.service")];
        let summary = Summary {
            errors: 0,
            warnings: 1,
            objects: 2,
        };
        let text = json(Path::new("mesh"), &findings, summary).expect("json");
        let v: serde_json::Value = serde_json::from_str(&text).expect("parses");
        assert_eq!(v["dir"], "mesh");
        assert_eq!(v["findings"][0]["severity"], "warning");
        assert_eq!(v["findings"][0]["file"], "a.yaml");
        assert_eq!(v["findings"][0]["object"], "TrafficSplit default/web-split");
        assert_eq!(v["findings"][0]["field"], "spec.service");
        assert_eq!(v["findings"][0]["message"], "something");
        assert_eq!(v["summary"]["warnings"], 1);
        assert_eq!(v["summary"]["errors"], 0);
        assert_eq!(v["summary"]["objects"], 2);
    }
}
