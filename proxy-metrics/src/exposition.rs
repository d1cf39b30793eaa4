//! The Prometheus text exposition format (0.0.4) and OpenMetrics text (1.0), read to the
//! letter: every sample line as `(name, labels, value)`, label values unescaped (`\\`, `\"`,
//! `\n`) and free to hold `}`, `,`, `=` or `#` (route names such as `GET /orders/{id}` do),
//! `+Inf`, `-Inf` and `NaN` values, and an optional timestamp and OpenMetrics exemplar after
//! the value, which are skipped. `# HELP`, `# TYPE`, `# UNIT` and `# EOF` lines are skipped too:
//! histogram buckets, sums and counts are samples like any other (`_bucket` with `le`).
//!
//! The CLI, the benches and the tests read `/metrics` with it. Written here because the crate
//! used before (`prometheus-parse`) dropped every line whose label values held `}`, which made
//! whole routes vanish from `pylon routes`; it lives with the families it reads back.

use std::fmt;

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// As exposed: `response_total`, `response_latency_ms_bucket`, ...
    pub name: String,
    /// In the order exposed.
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A line that is not valid exposition text, with its number (from 1) and why.
#[derive(Debug, PartialEq, Eq)]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for ParseError {}

/// Every sample of an exposition, in order.
pub fn parse(text: &str) -> Result<Vec<Sample>, ParseError> {
    let mut samples = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let sample = parse_line(line).map_err(|message| ParseError {
            line: i + 1,
            message,
        })?;
        samples.push(sample);
    }
    Ok(samples)
}

fn parse_line(line: &str) -> Result<Sample, String> {
    let bytes = line.as_bytes();
    let name_end = bytes
        .iter()
        .position(|b| !(b.is_ascii_alphanumeric() || *b == b'_' || *b == b':'))
        .unwrap_or(bytes.len());
    let name = &line[..name_end];
    if name.is_empty() || name.as_bytes()[0].is_ascii_digit() {
        return Err(format!("no metric name in {line:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        let (parsed, remaining) = parse_labels(after)?;
        labels = parsed;
        rest = remaining;
    }
    // The value, then an optional timestamp and (OpenMetrics) ` # exemplar`.
    let mut fields = rest.split_whitespace();
    let value = fields
        .next()
        .ok_or_else(|| format!("no value for {name}"))
        .and_then(parse_value)?;
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

type Labels = Vec<(String, String)>;

/// Labels after `{`, up to and including the matching `}`; the rest of the line.
fn parse_labels(mut s: &str) -> Result<(Labels, &str), String> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix('}') {
            return Ok((labels, rest));
        }
        let eq = s.find('=').ok_or("a label without '='")?;
        let name = s[..eq].trim();
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!("invalid label name {name:?}"));
        }
        s = s[eq + 1..].trim_start();
        let body = s
            .strip_prefix('"')
            .ok_or_else(|| format!("label {name}: value must be quoted"))?;
        let mut value = String::new();
        let mut chars = body.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err(format!("label {name}: unterminated value")),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    // The text format leaves other escapes as they are.
                    Some((_, c)) => {
                        value.push('\\');
                        value.push(c);
                    }
                    None => return Err(format!("label {name}: unterminated value")),
                },
                Some((_, c)) => value.push(c),
            }
        };
        labels.push((name.to_string(), value));
        s = body[end + 1..].trim_start();
        if let Some(rest) = s.strip_prefix(',') {
            s = rest;
        } else if !s.starts_with('}') {
            return Err(format!("after label {name}: expected ',' or '}}'"));
        }
    }
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse().map_err(|_| format!("invalid value {s:?}")),
    }
}

/// A label value as the text format writes it.
#[cfg(test)]
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn route_names_with_braces_and_escapes_survive() {
        let text = concat!(
            "# HELP route_request Total count of requests.\n",
            "# TYPE route_request counter\n",
            "route_request_total{direction=\"outbound\",dst=\"web:80\",rt_route=\"GET /orders/{id}\"} 7\n",
            "route_request_total{rt_route=\"a \\\"quoted\\\", \\\\ and\\nline\"} 1.5e3 1700000000000\n",
            "response_latency_ms_bucket{le=\"+Inf\"} 12 # {trace_id=\"x\"} 1.0\n",
            "up 1\n",
            "# EOF\n"
        );
        let samples = parse(text).expect("valid");
        assert_eq!(samples.len(), 4);
        assert_eq!(samples[0].label("rt_route"), Some("GET /orders/{id}"));
        assert_eq!(samples[0].value, 7.0);
        assert_eq!(
            samples[1].label("rt_route"),
            Some("a \"quoted\", \\ and\nline")
        );
        assert_eq!(samples[1].value, 1500.0);
        assert_eq!(samples[2].label("le"), Some("+Inf"));
        assert_eq!(samples[3].name, "up");
        assert!(samples[3].labels.is_empty());
    }

    #[test]
    fn special_values_and_errors() {
        let s = parse("a NaN\nb +Inf\nc -Inf\nd{} 2\n").expect("valid");
        assert!(s[0].value.is_nan());
        assert_eq!(
            (s[1].value, s[2].value, s[3].value),
            (f64::INFINITY, f64::NEG_INFINITY, 2.0)
        );
        for bad in [
            "x{a=\"1\" 2",
            "x{a=1} 2",
            "x 1\n{a=\"1\"} 2",
            "x{a=\"1\"}",
            "x abc",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse("ok 1\nbad\n").expect_err("bad").line, 2);
    }

    proptest! {
        /// Whatever a label value holds, writing it as the format does and reading it back
        /// gives it back, with the other labels and the value.
        #[test]
        fn any_label_value_round_trips(
            values in proptest::collection::vec(any::<String>(), 1..4),
            number in any::<f64>().prop_filter("finite", |v| v.is_finite()),
        ) {
            let labels: Vec<(String, String)> = values
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("l{i}"), v.clone()))
                .collect();
            let written: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            let line = format!("metric_total{{{}}} {number:?}", written.join(","));
            // A value with a raw carriage return can't be on one line of any exposition.
            prop_assume!(!line.contains('\r'));
            let samples = parse(&line).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(samples.len(), 1);
            prop_assert_eq!(&samples[0].labels, &labels);
            prop_assert_eq!(samples[0].value, number);
        }
    }
}
