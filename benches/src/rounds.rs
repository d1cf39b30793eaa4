//! The targets measured again in alternated rounds, for their run-to-run spread.
//!
//! One run's ratio (Pylon's requests per CPU-second over nginx's, say) compares measurements
//! made minutes apart, and on a shared 2-core machine the speed of every process drifts by more
//! than the differences the targets judge: nginx's HTTP/1.1 chain has done 18,782 requests per
//! CPU-second in one run and 12,228 half an hour later. So each target workload is measured again
//! in rounds. A round runs every path once, back to back, a few seconds each, and the next round
//! starts one path further along the list (a fixed order would give one path the slot after the
//! most disruptive one every time). A ratio is taken within its round, where a drift falls
//! on every path alike, and the report gives its median over the rounds with the lowest and
//! highest beside it: the spread one run's figure can't show. The added p99 at the fixed rate is
//! taken within the round too, over direct's p99 of the same round.
//!
//! This module owns the figures and their arithmetic; `bench.rs` measures them, `report.rs`
//! judges the targets with them.

use std::fmt::Write as _;

use serde::Serialize;

use crate::chain::PathKind;
use crate::loadgen::Workload;
use crate::report::{errors_cell, num, ratio, signed, thousands, times, whole, Errors};

/// The workloads the performance targets name.
pub const WORKLOADS: [Workload; 3] = [Workload::Http1Get, Workload::H2cGet, Workload::GrpcUnary];

/// One path's figures for one workload in one round.
#[derive(Debug, Clone, Serialize)]
pub struct RoundSample {
    pub round: usize,
    pub workload: Workload,
    pub path: PathKind,
    /// p99 µs at the fixed rate ([`Rounds::rate_per_s`]).
    pub p99_us: f64,
    /// Closed loop; `None` for direct, which has no proxy.
    pub req_per_proxy_cpu_s: Option<f64>,
    /// Closed loop: the proxies' utime per completed request per proxy on the path.
    pub user_us_per_req_per_hop: Option<f64>,
    /// Successful requests over both runs of the sample.
    pub ok: u64,
    pub errors: Errors,
}

#[derive(Debug, Clone, Serialize)]
pub struct Rounds {
    pub rounds: usize,
    /// Each run of a sample (the fixed rate, then the closed loop), after a closed-loop warm-up.
    pub seconds: f64,
    pub warmup_seconds: f64,
    pub rate_per_s: u64,
    pub samples: Vec<RoundSample>,
}

/// A figure's median over the rounds, with the lowest and highest.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

/// The spread of `values` (NaNs left out); `None` when none is left.
pub fn spread(values: &[f64]) -> Option<Spread> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Spread {
        median,
        min: v[0],
        max: v[n - 1],
        n,
    })
}

impl Spread {
    /// `median (min–max)`, each number formatted by `f`.
    pub fn text(&self, f: fn(f64) -> String) -> String {
        format!("{} ({}–{})", f(self.median), f(self.min), f(self.max))
    }
}

fn one_decimal(v: f64) -> String {
    format!("{v:.1}")
}

impl Rounds {
    fn get(&self, round: usize, workload: Workload, path: PathKind) -> Option<&RoundSample> {
        self.samples
            .iter()
            .find(|s| s.round == round && s.workload == workload && s.path == path)
    }

    /// `f` of each round that measured both sides, in round order.
    fn per_round<'s>(
        &'s self,
        workload: Workload,
        f: impl Fn(&dyn Fn(PathKind) -> Option<&'s RoundSample>) -> Option<f64>,
    ) -> Vec<f64> {
        (0..self.rounds)
            .filter_map(|round| f(&|p| self.get(round, workload, p)))
            .collect()
    }

    /// Per round: Pylon's requests per proxy CPU-second over the best of `against`'s.
    pub fn per_cpu_ratio(&self, workload: Workload, against: &[PathKind]) -> Vec<f64> {
        self.per_round(workload, |at| {
            let pylon = at(PathKind::Pylon)?.req_per_proxy_cpu_s?;
            let best = against
                .iter()
                .filter_map(|&p| at(p)?.req_per_proxy_cpu_s)
                .reduce(f64::max)?;
            ratio(pylon, best)
        })
    }

    /// Per round: Pylon's user µs per request per hop over nginx's.
    pub fn user_ratio(&self, workload: Workload) -> Vec<f64> {
        self.per_round(workload, |at| {
            let pylon = at(PathKind::Pylon)?.user_us_per_req_per_hop?;
            ratio(pylon, at(PathKind::Nginx)?.user_us_per_req_per_hop?)
        })
    }

    /// Per round: `path`'s p99 at the fixed rate less direct's.
    pub fn added_p99(&self, workload: Workload, path: PathKind) -> Vec<f64> {
        self.per_round(workload, |at| {
            Some(at(path)?.p99_us - at(PathKind::Direct)?.p99_us)
        })
    }

    /// Per round: Pylon's added p99 over the lower of nginx's and HAProxy's.
    fn added_p99_ratio(&self, workload: Workload) -> Vec<f64> {
        self.per_round(workload, |at| {
            let direct = at(PathKind::Direct)?.p99_us;
            let added = |p| at(p).map(|s| s.p99_us - direct);
            let best = [PathKind::Nginx, PathKind::Haproxy]
                .into_iter()
                .filter_map(added)
                .reduce(f64::min)?;
            ratio(added(PathKind::Pylon)?, best)
        })
    }

    fn values(
        &self,
        workload: Workload,
        path: PathKind,
        f: fn(&RoundSample) -> Option<f64>,
    ) -> Vec<f64> {
        (0..self.rounds)
            .filter_map(|round| self.get(round, workload, path).and_then(f))
            .collect()
    }

    fn paths(&self, workload: Workload) -> Vec<PathKind> {
        PathKind::ALL
            .into_iter()
            .filter(|&p| {
                self.samples
                    .iter()
                    .any(|s| s.workload == workload && s.path == p)
            })
            .collect()
    }

    /// The section: each path's figures, then the ratios taken within each round.
    pub fn markdown(&self, md: &mut String) {
        let rate = thousands(self.rate_per_s as usize);
        let _ = write!(
            md,
            "\n## Run-to-run spread ({} alternated rounds)\n\n\
             The target workloads again, in rounds: each round runs every path once per workload, \
             back to back ({:.1} s at {rate} req/s, then {:.1} s closed loop, after a {:.1} s \
             warm-up on fresh connections), each round starting one path further along. Each \
             figure is the median over the rounds (lowest–highest); a ratio is taken within its \
             round, so a drift in the machine's speed falls on both sides of it. The targets are \
             judged on these medians.\n\n\
             | workload | path | req per proxy CPU-s | user µs per req per hop | p99 µs at {rate} req/s \
             | +p99 µs at {rate} req/s | ok | errors |\n\
             |---|---|---:|---:|---:|---:|---:|---|\n",
            self.rounds, self.seconds, self.seconds, self.warmup_seconds,
        );
        let cell = |v: &[f64], f: fn(f64) -> String| {
            spread(v).map_or_else(|| "—".to_owned(), |s| s.text(f))
        };
        for workload in WORKLOADS {
            for path in self.paths(workload) {
                let (mut ok, mut errors) = (
                    0,
                    Errors {
                        count: 0,
                        first: None,
                    },
                );
                for s in self
                    .samples
                    .iter()
                    .filter(|s| s.path == path && s.workload == workload)
                {
                    ok += s.ok;
                    errors.count += s.errors.count;
                    if errors.first.is_none() {
                        errors.first.clone_from(&s.errors.first);
                    }
                }
                let added = if path == PathKind::Direct {
                    "—".to_owned()
                } else {
                    cell(&self.added_p99(workload, path), signed)
                };
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {added} | {ok} | {} |",
                    workload.name(),
                    path.name(),
                    cell(
                        &self.values(workload, path, |s| s.req_per_proxy_cpu_s),
                        whole
                    ),
                    cell(
                        &self.values(workload, path, |s| s.user_us_per_req_per_hop),
                        one_decimal
                    ),
                    cell(&self.values(workload, path, |s| Some(s.p99_us)), num),
                    errors_cell(&errors),
                );
            }
        }
        md.push_str(
            "\n| workload | within each round | median (lowest–highest) | each round |\n\
             |---|---|---:|---|\n",
        );
        for (workload, figure, values) in self.ratios() {
            let each = values
                .iter()
                .map(|v| format!("{v:.2}"))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(
                md,
                "| {} | {figure} | {} | {each} |",
                workload.name(),
                cell(&values, times)
            );
        }
    }

    /// The ratios the section lists, with their values in round order.
    fn ratios(&self) -> Vec<(Workload, String, Vec<f64>)> {
        let both = [PathKind::Nginx, PathKind::Haproxy];
        let rate = thousands(self.rate_per_s as usize);
        let mut out = Vec::new();
        for workload in WORKLOADS {
            // As the targets put them: HTTP/1.1 against the better of the two and nginx's user
            // time, h2 against HAProxy (nginx can't proxy h2 upstream).
            if workload.is_h2() {
                out.push((
                    workload,
                    "Pylon's req per proxy CPU-s ÷ HAProxy's".to_owned(),
                    self.per_cpu_ratio(workload, &[PathKind::Haproxy]),
                ));
            } else {
                out.push((
                    workload,
                    "Pylon's req per proxy CPU-s ÷ the better of nginx and HAProxy".to_owned(),
                    self.per_cpu_ratio(workload, &both),
                ));
                out.push((
                    workload,
                    "Pylon's user µs per req per hop ÷ nginx's".to_owned(),
                    self.user_ratio(workload),
                ));
            }
            out.push((
                workload,
                format!("Pylon's +p99 at {rate} req/s ÷ the lower of nginx's and HAProxy's"),
                self.added_p99_ratio(workload),
            ));
        }
        out.retain(|(_, _, v)| !v.is_empty());
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn spread_is_median_lowest_and_highest() {
        assert_eq!(spread(&[]), None);
        assert_eq!(spread(&[f64::NAN]), None);
        let s = spread(&[3.0, 1.0, 2.0]).expect("values");
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        let s = spread(&[4.0, 1.0, 2.0, 3.0]).expect("values");
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 4.0));
        assert_eq!(s.text(times), "2.50× (1.00×–4.00×)");
    }

    fn sample(round: usize, path: PathKind, p99: f64, per_cpu: f64, user: f64) -> RoundSample {
        let proxied = path != PathKind::Direct;
        RoundSample {
            round,
            workload: Workload::Http1Get,
            path,
            p99_us: p99,
            req_per_proxy_cpu_s: proxied.then_some(per_cpu),
            user_us_per_req_per_hop: proxied.then_some(user),
            ok: 100,
            errors: Errors {
                count: 0,
                first: None,
            },
        }
    }

    /// Three rounds whose machine gets slower each round: every path's figures move, the
    /// ratios within a round do not.
    pub(crate) fn drifting() -> Rounds {
        let mut samples = Vec::new();
        for (round, slow) in [1.0, 1.5, 2.0].into_iter().enumerate() {
            samples.push(sample(round, PathKind::Direct, 100.0 * slow, 0.0, 0.0));
            samples.push(sample(
                round,
                PathKind::Pylon,
                300.0 * slow,
                9_000.0 / slow,
                9.0 * slow,
            ));
            samples.push(sample(
                round,
                PathKind::Nginx,
                500.0 * slow,
                10_000.0 / slow,
                8.0 * slow,
            ));
            samples.push(sample(
                round,
                PathKind::Haproxy,
                400.0 * slow,
                8_000.0 / slow,
                7.0 * slow,
            ));
        }
        // The third round's nginx sample is missing (as when its path failed to start).
        samples.retain(|s| !(s.round == 2 && s.path == PathKind::Nginx));
        Rounds {
            rounds: 3,
            seconds: 3.0,
            warmup_seconds: 1.0,
            rate_per_s: 1_000,
            samples,
        }
    }

    #[test]
    fn ratios_are_taken_within_each_round() {
        let r = drifting();
        let both = [PathKind::Nginx, PathKind::Haproxy];
        let per_cpu = r.per_cpu_ratio(Workload::Http1Get, &both);
        // Rounds 0 and 1 against nginx's 10,000 / slow; round 2 against HAProxy's alone.
        assert_eq!(per_cpu.len(), 3);
        assert!((per_cpu[0] - 0.9).abs() < 1e-9 && (per_cpu[1] - 0.9).abs() < 1e-9);
        assert!((per_cpu[2] - 9_000.0 / 8_000.0).abs() < 1e-9);
        // Without nginx in round 2 there is no user ratio for it.
        let user = r.user_ratio(Workload::Http1Get);
        assert_eq!(user.len(), 2);
        assert!(user.iter().all(|u| (u - 9.0 / 8.0).abs() < 1e-9));
        // Pylon's added p99 is 200 µs × the round's slowness.
        assert_eq!(
            r.added_p99(Workload::Http1Get, PathKind::Pylon),
            [200.0, 300.0, 400.0]
        );
        // Against the lower added p99 of nginx (400 × slow) and HAProxy (300 × slow).
        let added = r.added_p99_ratio(Workload::Http1Get);
        assert!(
            added.iter().all(|a| (a - 2.0 / 3.0).abs() < 1e-9),
            "{added:?}"
        );
        assert!(r.per_cpu_ratio(Workload::H2cGet, &both).is_empty());
    }

    #[test]
    fn the_section_gives_medians_with_their_spread() {
        let mut md = String::new();
        drifting().markdown(&mut md);
        assert!(
            md.contains("## Run-to-run spread (3 alternated rounds)"),
            "{md}"
        );
        // Pylon: 9,000 / slow per CPU-s; user 9 × slow; p99 300 × slow; added 200 × slow.
        assert!(
            md.contains(
                "| HTTP/1.1 GET (64 B body) | pylon | 6,000 (4,500–9,000) | 13.5 (9.0–18.0) \
                 | 450 (300–600) | +300 (+200–+400) | 300 | 0 |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| HTTP/1.1 GET (64 B body) | direct | — | — | 150 (100–200) | — |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| HTTP/1.1 GET (64 B body) | Pylon's req per proxy CPU-s ÷ the better of nginx \
                 and HAProxy | 0.90× (0.90×–1.12×) | 0.90, 0.90, 1.12 |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| Pylon's user µs per req per hop ÷ nginx's | 1.12× (1.12×–1.12×) |"),
            "{md}"
        );
        assert!(!md.contains("h2c GET"), "no h2c samples, no h2c rows: {md}");
    }
}
