//! Split weights that look like percentages gone wrong.
//!
//! A target's share is its weight over the sum, so every sum is valid: weights 1 and 3 mean
//! 25% and 75%. But weights adding up to 110 were almost certainly written as percentages by
//! someone who raised one and forgot to lower another, and the traffic they meant (90% and
//! 20%?) is not what the mesh does (81.8% and 18.2%). That case is an error, showing the real
//! shares; any other sum is left alone.

use pylon_proxy_policy::{RouteTable, TrafficSplit};

use super::ObjectFindings;

/// The totals people write weights against, in thousandths (how weights are kept, so `900m`
/// stays exact): fractions of 1, percentages, per-mille.
const INTENDED_TOTALS: [(u64, &str); 3] = [
    (1_000, "fractions of 1"),
    (100_000, "percentages"),
    (1_000_000, "per-mille"),
];

/// A sum within this fraction of an intended total (95 or 110 for 100) was meant to be it.
const NEAR: f64 = 0.10;

/// How many percentage points some target's real share must miss its weight read against the
/// intended total by: an even split rounded down (33 + 33 + 33 = 99) misses by a third of one,
/// and is what its author meant.
const MIN_MISS_POINTS: f64 = 1.0;

pub(super) fn check_split(split: &TrafficSplit, out: &mut ObjectFindings) {
    let targets: Vec<(&str, u64)> = split
        .backends
        .iter()
        .map(|b| (&*b.service, b.weight_milli))
        .collect();
    check(&targets, "spec.backends", out);
}

pub(super) fn check_dst_overrides(table: &RouteTable, out: &mut ObjectFindings) {
    let targets: Vec<(&str, u64)> = table
        .dst_overrides()
        .iter()
        .map(|d| (&*d.authority, d.weight_milli))
        .collect();
    check(&targets, "spec.dstOverrides", out);
}

/// `targets` are (name, weight in thousandths), in file order.
fn check(targets: &[(&str, u64)], field: &str, out: &mut ObjectFindings) {
    if targets.is_empty() {
        return;
    }
    let sum: u64 = targets.iter().map(|(_, w)| w).sum();
    if sum == 0 {
        out.error(field, "every weight is 0, so no target can get any traffic");
    } else if let Some(message) = percentages_gone_wrong(targets, sum) {
        out.error(field, message);
    }
}

/// The error message when the weights look like percentages (or fractions of 1, or
/// per-mille) that do not add up, else `None`.
fn percentages_gone_wrong(targets: &[(&str, u64)], sum: u64) -> Option<String> {
    let (total, unit) = INTENDED_TOTALS.into_iter().find(|(total, _)| {
        sum != *total && (sum as f64 - *total as f64).abs() <= *total as f64 * NEAR
    })?;
    let share = |weight: u64| weight as f64 * 100.0 / sum as f64;
    let worst_miss = targets
        .iter()
        .map(|(_, w)| (share(*w) - *w as f64 * 100.0 / total as f64).abs())
        .fold(0.0, f64::max);
    if worst_miss < MIN_MISS_POINTS {
        return None;
    }
    let shares: Vec<String> = targets
        .iter()
        .enumerate()
        .map(|(i, (name, w))| {
            let verb = if i == 0 { " gets" } else { "" };
            format!("{name}{verb} {:.1}%", share(*w))
        })
        .collect();
    Some(format!(
        "weights sum to {} ({}% of traffic if these are {unit}); shares are weight/sum so {}",
        weight_text(sum),
        percent_text(sum as f64 * 100.0 / total as f64),
        shares.join(", ")
    ))
}

/// Thousandths as the number a person wrote: `110`, `1.1`.
fn weight_text(milli: u64) -> String {
    let (whole, thousandths) = (milli / 1000, milli % 1000);
    if thousandths == 0 {
        whole.to_string()
    } else {
        (milli as f64 / 1000.0).to_string()
    }
}

/// `110`, `99.5`: one decimal only when there is one.
fn percent_text(percent: f64) -> String {
    let tenths = (percent * 10.0).round();
    if tenths % 10.0 == 0.0 {
        format!("{}", tenths / 10.0)
    } else {
        format!("{:.1}", tenths / 10.0)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{audit_files, on_field, profile, service};
    use super::super::Severity;
    use super::*;

    fn split(backends: &[(&str, &str)]) -> String {
        let mut yaml = "apiVersion: split.smi-spec.io/v1alpha1\nkind: TrafficSplit\n\
                        metadata: {name: web-split}\nspec:\n  service: web\n  backends:\n"
            .to_string();
        for (service, weight) in backends {
            yaml.push_str(&format!("  - {{service: {service}, weight: {weight}}}\n"));
        }
        yaml
    }

    /// The weight findings for a split of `web` and `web-v2`, both ready.
    fn split_findings(weights: &[&str]) -> Vec<(Severity, String)> {
        let names = ["web", "web-v2", "web-v3"];
        let backends: Vec<(&str, &str)> =
            names.iter().copied().zip(weights.iter().copied()).collect();
        let findings = audit_files(&[
            ("split.yaml", &split(&backends)),
            ("web.yaml", &service("web", Some(true))),
            ("web-v2.yaml", &service("web-v2", Some(true))),
            ("web-v3.yaml", &service("web-v3", Some(true))),
        ]);
        on_field(&findings, "spec.backends")
            .into_iter()
            .map(|(s, m)| (s, m.to_string()))
            .collect()
    }

    #[test]
    fn percentages_adding_up_to_110_are_an_error_with_the_real_shares() {
        assert_eq!(
            split_findings(&["90", "20"]),
            [(
                Severity::Error,
                "weights sum to 110 (110% of traffic if these are percentages); shares are \
                 weight/sum so web gets 81.8%, web-v2 18.2%"
                    .to_string()
            )]
        );
        let short = split_findings(&["90", "5"]);
        assert_eq!(short.len(), 1, "{short:?}");
        assert!(
            short[0]
                .1
                .starts_with("weights sum to 95 (95% of traffic if these are percentages)"),
            "{short:?}"
        );
    }

    #[test]
    fn quantities_adding_up_to_1_1_are_an_error() {
        assert_eq!(
            split_findings(&["900m", "200m"]),
            [(
                Severity::Error,
                "weights sum to 1.1 (110% of traffic if these are fractions of 1); shares are \
                 weight/sum so web gets 81.8%, web-v2 18.2%"
                    .to_string()
            )]
        );
        let per_mille = split_findings(&["900", "150"]);
        assert!(
            per_mille[0]
                .1
                .starts_with("weights sum to 1050 (105% of traffic if these are per-mille)"),
            "{per_mille:?}"
        );
    }

    #[test]
    fn exact_totals_relative_weights_and_rounded_even_splits_are_fine() {
        for weights in [
            &["90", "10"][..],
            &["900m", "100m"],
            &["1", "3"],
            &["100", "100"],
            &["33", "33", "33"],
            &["1", "0"],
            &["50", "30", "60"],
        ] {
            assert_eq!(split_findings(weights), [], "{weights:?}");
        }
    }

    #[test]
    fn all_zero_weights_are_an_error() {
        let findings = split_findings(&["0", "0"]);
        assert_eq!(findings.len(), 1, "{findings:?}");
        assert_eq!(findings[0].0, Severity::Error);
        assert!(findings[0].1.contains("every weight is 0"), "{findings:?}");
    }

    #[test]
    fn dst_overrides_are_checked_the_same_way() {
        let findings = audit_files(&[
            ("web.yaml", &service("web", Some(true))),
            ("web-v2.yaml", &service("web-v2", Some(true))),
            (
                "profile.yaml",
                &profile(
                    "  dstOverrides:\n  \
                     - {authority: web.default.svc.cluster.local:80, weight: 90}\n  \
                     - {authority: web-v2.default.svc.cluster.local:80, weight: 20}\n",
                ),
            ),
        ]);
        assert_eq!(
            on_field(&findings, "spec.dstOverrides"),
            [(
                Severity::Error,
                "weights sum to 110 (110% of traffic if these are percentages); shares are \
                 weight/sum so web.default.svc.cluster.local:80 gets 81.8%, \
                 web-v2.default.svc.cluster.local:80 18.2%"
            )]
        );
        assert_eq!(findings.len(), 1, "{findings:#?}");
    }

    #[test]
    fn number_texts() {
        assert_eq!(weight_text(110_000), "110");
        assert_eq!(weight_text(1_100), "1.1");
        assert_eq!(weight_text(250), "0.25");
        assert_eq!(percent_text(110.0), "110");
        assert_eq!(percent_text(99.5), "99.5");
        assert_eq!(percent_text(104.99), "105");
    }
}
