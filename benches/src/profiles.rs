//! The instruction counts `benches/profile.py` left in the results dir
//! (`profile*-latest.md`), read back so the bench's report can say what stands in the way of
//! each target it misses: what one hop of Pylon, of the floor under it (`pylon-floor`: hyper
//! and h2 alone) and of nginx and HAProxy cost per request. Instructions are exact where the
//! load figures on a noisy 2-core machine are not, so they settle what can be won and where.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::report::whole;

/// One hop's cost per request, from one profile report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HopCost {
    /// `pylon`, `pylon-outbound`, `floor`, `floor-h2`, `floor-h2s`, `floor-h1i`, `floor-h1n`,
    /// `floor-h1ns`, `floor-h1nc`, `floor-h1u`, `nginx` or `haproxy` (profile.py's `--proxy`).
    pub hop: String,
    /// profile.py's workload title: `HTTP/1.1 GET`, `h2c GET` or `gRPC unary`.
    pub workload: String,
    pub instructions: f64,
    /// The commit the report was made at.
    pub git: String,
    /// A profile-guided build (`scripts/build-release-proxy`'s default), not an ordinary one.
    pub guided: bool,
    /// Requests in flight at once (`profile.py --concurrency N`): N connections (HTTP/1.1) or
    /// streams of one connection (h2); 1 for the costs the table compares.
    pub in_flight: u32,
}

/// The hops in the order the report lists them, with what each is.
const HOPS: [(&str, &str); 12] = [
    ("pylon", "Pylon, inbound hop"),
    ("pylon-outbound", "Pylon, outbound hop"),
    ("floor", "floor: hyper's server and client alone"),
    ("floor-h2", "floor, h2 sent with the h2 crate's client"),
    (
        "floor-h2s",
        "floor, h2 served by the h2 crate too (no task per stream)",
    ),
    (
        "floor-h1i",
        "floor, HTTP/1 connections polled by the request's task",
    ),
    (
        "floor-h1n",
        "narrow HTTP/1.1 path: httparse into http types, no hyper",
    ),
    ("floor-h1ns", "narrow HTTP/1.1 server, hyper's client"),
    ("floor-h1nc", "hyper's HTTP/1.1 server, narrow client"),
    ("floor-h1u", "hyper's HTTP/1.1 server, ureq-proto's client"),
    ("nginx", "nginx"),
    ("haproxy", "HAProxy"),
];
const WORKLOADS: [&str; 3] = ["HTTP/1.1 GET", "h2c GET", "gRPC unary"];

/// Every profile report in `dir`; one that doesn't parse is left out.
pub fn read(dir: &Path) -> Vec<HopCost> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<HopCost> = entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("profile") && name.ends_with("-latest.md")
        })
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|text| parse(&text))
        .collect();
    out.sort_by(|a, b| a.hop.cmp(&b.hop).then(a.workload.cmp(&b.workload)));
    out
}

/// A report's hop, workload, commit and headline: `# Instructions per request, one HOP hop,
/// WORKLOAD (callgrind)`, `- git COMMIT, ...` and `**N instructions per request.**`.
fn parse(text: &str) -> Option<HopCost> {
    let title = text.lines().next()?;
    let rest = title.strip_prefix("# Instructions per request, one ")?;
    let (hop, rest) = rest.split_once(" hop, ")?;
    let workload = rest.strip_suffix(" (callgrind)")?;
    // `- git COMMIT, N requests (WORKLOAD), M at a time ...`
    let run = text.lines().find_map(|l| l.strip_prefix("- git "))?;
    let mut fields = run.split(", ");
    let git = fields.next()?;
    let in_flight = fields.nth(1)?.split_once(" at a time")?.0.parse().ok()?;
    let guided = text
        .lines()
        .any(|l| l.starts_with("- build: profile-guided"));
    let instructions = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("**")?
                .strip_suffix(" instructions per request.**")
        })?
        .replace(',', "")
        .parse()
        .ok()?;
    Some(HopCost {
        hop: hop.to_owned(),
        workload: workload.to_owned(),
        instructions,
        git: git.to_owned(),
        guided,
        in_flight,
    })
}

/// One hop's cost with requests sent one at a time: the costs the table compares.
fn cost(costs: &[HopCost], hop: &str, workload: &str) -> Option<f64> {
    cost_at(costs, hop, workload, 1)
}

fn cost_at(costs: &[HopCost], hop: &str, workload: &str, in_flight: u32) -> Option<f64> {
    hop_at(costs, hop, workload, in_flight).map(|c| c.instructions)
}

/// `hop`'s report for `workload` with `in_flight` requests at once.
fn hop_at<'a>(
    costs: &'a [HopCost],
    hop: &str,
    workload: &str,
    in_flight: u32,
) -> Option<&'a HopCost> {
    costs
        .iter()
        .find(|c| c.hop == hop && c.workload == workload && c.in_flight == in_flight)
}

/// For the report's "what stands in the way": the table of hop costs, then what they say about
/// each CPU target. Empty without reports.
pub fn markdown(costs: &[HopCost]) -> String {
    if costs.is_empty() {
        return String::new();
    }
    let mut md = String::from(
        "\nInstructions per request for one hop, from the `benches/profile.py` reports in this \
         directory (callgrind, user space; each made at the commit shown). Re-run with `python3 benches/profile.py \
         [--workload h2c-get|grpc-unary] [--proxy HOP]`.\n\n\
         | hop | HTTP/1.1 GET | h2c GET | gRPC unary | at |\n|---|---:|---:|---:|---|\n",
    );
    for (hop, what) in HOPS {
        let row: Vec<&HopCost> = costs
            .iter()
            .filter(|c| c.hop == hop && c.in_flight == 1)
            .collect();
        if row.is_empty() {
            continue;
        }
        let cells: Vec<String> = WORKLOADS
            .iter()
            .map(|w| cost(costs, hop, w).map_or("—".to_owned(), whole))
            .collect();
        let mut commits: Vec<&str> = row.iter().map(|c| c.git.as_str()).collect();
        commits.sort_unstable();
        commits.dedup();
        let guided = if row.iter().any(|c| c.guided) {
            ", profile-guided"
        } else {
            ""
        };
        let _ = writeln!(
            md,
            "| {what} (`{hop}`) | {} | {} | {} | {}{guided} |",
            cells[0],
            cells[1],
            cells[2],
            commits.join(", ")
        );
    }
    md.push('\n');

    let h1 = |hop| cost(costs, hop, "HTTP/1.1 GET");
    // Pylon's own stages are its hop less the floor's only when both are the same kind of build.
    let mixed =
        |workload: &str| guided(costs, "pylon", workload) && !guided(costs, "floor", workload);
    if let (Some(floor), Some(pylon)) = (h1("floor"), h1("pylon")) {
        let best = [h1("nginx"), h1("haproxy")]
            .into_iter()
            .flatten()
            .fold(f64::INFINITY, f64::min);
        if best.is_finite() && mixed("HTTP/1.1 GET") {
            let _ = writeln!(
                md,
                "- HTTP/1.1: Pylon's inbound hop, profile-guided as the image ships it, costs \
                 {:.2}× the cheaper baseline's whole hop{}. The floors are ordinary builds \
                 (hyper alone: {:.2}×), so the difference is no measure of Pylon's own stages; \
                 profile both with `PYLON_PGO=off` for that.",
                pylon / best,
                h1("pylon-outbound").map_or(String::new(), |o| format!(
                    ", its outbound hop {:.2}×",
                    o / best
                )),
                floor / best,
            );
        } else if best.is_finite() {
            let _ = writeln!(
                md,
                "- HTTP/1.1: hyper alone costs {:.2}× the cheaper baseline's whole hop, so \
                 while Pylon's HTTP/1 is hyper's no change to Pylon's own stages reaches \
                 1.0×. Those stages add {} instructions to the inbound hop ({:.0}% of it){}.",
                floor / best,
                whole(pylon - floor),
                100.0 * (pylon - floor) / pylon,
                outbound_share(h1("pylon-outbound"), floor)
            );
            if let Some(narrow) = h1("floor-h1n") {
                let _ = writeln!(
                    md,
                    "- A narrower HTTP/1.1 path than hyper's (`floor-h1n`: heads parsed by \
                     httparse into the http types and written back, `Content-Length` bodies) \
                     costs {} instructions, {:.2}× the cheaper baseline's hop; with Pylon's \
                     stages on it the inbound hop would cost about {} ({:.2}×).{}",
                    whole(narrow),
                    narrow / best,
                    whole(narrow + pylon - floor),
                    (narrow + pylon - floor) / best,
                    narrow_halves(h1("floor-h1ns"), h1("floor-h1nc"), floor)
                );
            }
        }
    }
    md.push_str(&under_load(costs));
    let heads = |hop| cost(costs, hop, "HTTP/1.1 GET with 10 response headers");
    if let (Some(pylon), Some(nginx)) = (heads("pylon"), heads("nginx")) {
        let _ = writeln!(
            md,
            "- HTTP/1.1 GET with a typical response head (10 headers, `--workload \
             http1-get-headers`): Pylon's inbound hop costs {} instructions, {:.2}× nginx's \
             ({}){}. Each header is parsed and written again at every hop, so the ratios on \
             `GET /small` (2 headers) are not the whole story.",
            whole(pylon),
            pylon / nginx,
            whole(nginx),
            heads("haproxy").map_or(String::new(), |h| format!(
                " and {:.2}× HAProxy's ({})",
                pylon / h,
                whole(h)
            )),
        );
    }
    for workload in ["h2c GET", "gRPC unary"] {
        let floor = ["floor", "floor-h2", "floor-h2s"]
            .into_iter()
            .filter_map(|hop| cost(costs, hop, workload))
            .fold(f64::INFINITY, f64::min);
        let (Some(haproxy), Some(pylon)) = (
            cost(costs, "haproxy", workload),
            cost(costs, "pylon", workload),
        ) else {
            continue;
        };
        if floor.is_finite() && mixed(workload) {
            let _ = writeln!(
                md,
                "- {workload}: Pylon's inbound hop, profile-guided, costs {:.2}× HAProxy's \
                 hop; the cheapest floor, an ordinary build, {:.2}×.",
                pylon / haproxy,
                floor / haproxy,
            );
        } else if floor.is_finite() {
            let _ = writeln!(
                md,
                "- {workload}: the cheapest floor costs {:.2}× HAProxy's hop; Pylon's own \
                 stages add {} instructions to the inbound hop ({:.0}% of it){}.",
                floor / haproxy,
                whole(pylon - floor),
                100.0 * (pylon - floor) / pylon,
                outbound_share(cost(costs, "pylon-outbound", workload), floor)
            );
        }
    }
    md
}

/// HTTP/1.1 with as many connections in flight as the load bench keeps busy, where each
/// connection's state and the allocator's bursts cost what one request at a time never shows.
fn under_load(costs: &[HopCost]) -> String {
    let workload = "HTTP/1.1 GET";
    let mut shapes: Vec<u32> = costs
        .iter()
        .filter(|c| c.workload == workload && c.in_flight > 1)
        .map(|c| c.in_flight)
        .collect();
    shapes.sort_unstable();
    shapes.dedup();
    let mut md = String::new();
    for n in shapes {
        let at = |hop| cost_at(costs, hop, workload, n);
        let (Some(pylon), Some(nginx)) = (at("pylon"), at("nginx")) else {
            continue;
        };
        let chain = at("pylon-outbound").map_or(String::new(), |o| {
            format!(
                ", its outbound hop {} ({:.2}×): the chain {:.2}× nginx's",
                whole(o),
                o / nginx,
                (pylon + o) / (2.0 * nginx)
            )
        });
        let floor = hop_at(costs, "floor", workload, n)
            .map_or(String::new(), |f| floor_under_load(f, pylon, nginx));
        let _ = writeln!(
            md,
            "- HTTP/1.1 with {n} connections in flight (`--concurrency {n}`; the load bench \
             keeps {} busy): Pylon's inbound hop costs {} instructions, {:.2}× nginx's ({}){chain}.{floor}",
            crate::bench::SLOTS,
            whole(pylon),
            pylon / nginx,
            whole(nginx),
        );
    }
    md
}

/// What hyper's floor under the same load leaves Pylon's stages: only a floor built as Pylon
/// is (profile-guided, `scripts/build-release-floor`) can be subtracted from Pylon's hop.
fn floor_under_load(floor: &HopCost, pylon: f64, nginx: f64) -> String {
    let f = floor.instructions;
    if !floor.guided {
        return format!(
            " hyper's floor alone (`floor`) costs {}, {:.2}× nginx's, in an ordinary build: \
             not comparable with the profile-guided hops (`scripts/build-release-floor` builds \
             it as they are).",
            whole(f),
            f / nginx
        );
    }
    let room = if nginx > f {
        format!("nginx's hop leaves them {}", whole(nginx - f))
    } else {
        "nginx's hop costs less than the floor alone".to_string()
    };
    format!(
        " hyper's floor alone (`floor`, profile-guided as Pylon is) costs {}, {:.2}× nginx's: \
         Pylon's own stages add {} to the inbound hop, and {room}.",
        whole(f),
        f / nginx,
        whole(pylon - f),
    )
}

fn guided(costs: &[HopCost], hop: &str, workload: &str) -> bool {
    costs
        .iter()
        .any(|c| c.hop == hop && c.workload == workload && c.guided)
}

/// What each narrow half saves alone, against hyper's both: where the cost is.
fn narrow_halves(server: Option<f64>, client: Option<f64>, floor: f64) -> String {
    match (server, client) {
        (Some(server), Some(client)) => format!(
            " Alone, the narrow server saves {} of hyper's (`floor-h1ns`) and the narrow \
             client {} (`floor-h1nc`).",
            whole(floor - server),
            whole(floor - client)
        ),
        _ => String::new(),
    }
}

/// `, and N to the outbound hop (P% of it)` when the outbound hop was profiled too.
fn outbound_share(outbound: Option<f64>, floor: f64) -> String {
    outbound.map_or(String::new(), |o| {
        format!(
            " and {} to the outbound hop ({:.0}% of it)",
            whole(o - floor),
            100.0 * (o - floor) / o
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = "# Instructions per request, one floor-h2 hop, gRPC unary (callgrind)\n\n\
        - git 979f92912345, 3000 requests (grpc-unary), 1 at a time on one connection\n\
        - `benches/profile.py` ...\n\n**61,786 instructions per request.**\n\n## Own cost\n";

    fn hop_cost(hop: &str, workload: &str, instructions: f64, guided: bool) -> HopCost {
        HopCost {
            hop: hop.into(),
            workload: workload.into(),
            instructions,
            git: "abc".into(),
            guided,
            in_flight: 1,
        }
    }

    #[test]
    fn a_report_is_read_back() {
        assert_eq!(
            parse(REPORT),
            Some(HopCost {
                hop: "floor-h2".into(),
                workload: "gRPC unary".into(),
                instructions: 61_786.0,
                git: "979f92912345".into(),
                guided: false,
                in_flight: 1,
            })
        );
        assert_eq!(parse("# something else\n"), None);
        let many = REPORT.replace(
            "1 at a time on one connection",
            "64 at a time, on as many connections",
        );
        assert_eq!(parse(&many).map(|c| c.in_flight), Some(64));
    }

    #[test]
    fn costs_under_load_get_a_line_of_their_own() {
        let c = |hop: &str, n: f64, in_flight: u32| HopCost {
            in_flight,
            ..hop_cost(hop, "HTTP/1.1 GET", n, true)
        };
        let md = markdown(&[
            c("pylon", 20_000.0, 1),
            c("nginx", 16_000.0, 1),
            c("pylon", 18_000.0, 64),
            c("pylon-outbound", 21_000.0, 64),
            c("nginx", 15_000.0, 64),
        ]);
        // The table and its ratios are the one-at-a-time costs...
        assert!(
            md.contains("| Pylon, inbound hop (`pylon`) | 20,000 | — | — | abc, profile-guided |"),
            "{md}"
        );
        assert!(!md.contains("| 18,000 |"), "{md}");
        // ...and the 64-connection ones are set beside nginx's under the same load.
        assert!(
            md.contains(
                "- HTTP/1.1 with 64 connections in flight (`--concurrency 64`; the load bench \
                 keeps 64 busy): Pylon's inbound hop costs 18,000 instructions, 1.20× nginx's \
                 (15,000), its outbound hop 21,000 (1.40×): the chain 1.30× nginx's."
            ),
            "{md}"
        );
    }

    #[test]
    fn under_load_the_floor_says_what_pylons_stages_cost() {
        let c = |hop: &str, n: f64, guided: bool| HopCost {
            in_flight: 64,
            ..hop_cost(hop, "HTTP/1.1 GET", n, guided)
        };
        let line = |floor_guided: bool| {
            markdown(&[
                c("pylon", 19_000.0, true),
                c("nginx", 15_500.0, false),
                c("floor", 14_000.0, floor_guided),
            ])
        };
        let md = line(true);
        assert!(
            md.contains(
                "nginx's (15,500). hyper's floor alone (`floor`, profile-guided as Pylon is) \
                 costs 14,000, 0.90× nginx's: Pylon's own stages add 5,000 to the inbound hop, \
                 and nginx's hop leaves them 1,500."
            ),
            "{md}"
        );
        // An ordinary floor is not subtracted from a profile-guided hop.
        let md = line(false);
        assert!(md.contains("in an ordinary build: not comparable"), "{md}");
        assert!(!md.contains("stages add"), "{md}");
    }

    #[test]
    fn the_section_says_what_the_floor_leaves() {
        let c = |hop: &str, workload: &str, n: f64| hop_cost(hop, workload, n, false);
        let md = markdown(&[
            c("pylon", "HTTP/1.1 GET", 30_000.0),
            c("floor", "HTTP/1.1 GET", 20_000.0),
            c("nginx", "HTTP/1.1 GET", 16_000.0),
            c("haproxy", "HTTP/1.1 GET", 27_000.0),
            c("pylon-outbound", "HTTP/1.1 GET", 40_000.0),
            c("floor-h1n", "HTTP/1.1 GET", 10_000.0),
            c("floor-h1ns", "HTTP/1.1 GET", 19_000.0),
            c("floor-h1nc", "HTTP/1.1 GET", 13_000.0),
            c("pylon", "HTTP/1.1 GET with 10 response headers", 27_000.0),
            c("nginx", "HTTP/1.1 GET with 10 response headers", 24_000.0),
            c("haproxy", "HTTP/1.1 GET with 10 response headers", 36_000.0),
            c("pylon", "gRPC unary", 70_000.0),
            c("floor-h2", "gRPC unary", 60_000.0),
            c("haproxy", "gRPC unary", 40_000.0),
        ]);
        assert!(
            md.contains("| Pylon, inbound hop (`pylon`) | 30,000 | — | 70,000 | abc |"),
            "{md}"
        );
        assert!(md.contains("hyper alone costs 1.25×"), "{md}");
        assert!(
            md.contains("add 10,000 instructions to the inbound hop (33%"),
            "{md}"
        );
        assert!(
            md.contains(
                "costs 10,000 instructions, 0.62× the cheaper baseline's hop; with \
                         Pylon's stages on it the inbound hop would cost about 20,000 (1.25×). \
                         Alone, the narrow server saves 1,000 of hyper's (`floor-h1ns`) and \
                         the narrow client 7,000"
            ),
            "{md}"
        );
        assert!(
            md.contains("gRPC unary: the cheapest floor costs 1.50×"),
            "{md}"
        );
        assert!(
            md.contains(
                "Pylon's inbound hop costs 27,000 instructions, 1.12× nginx's (24,000) and \
                 0.75× HAProxy's (36,000)"
            ),
            "{md}"
        );
        assert!(markdown(&[]).is_empty());
    }

    #[test]
    fn a_profile_guided_pylon_is_not_measured_against_an_ordinary_floor() {
        let guided_report = REPORT.replace(
            "- `benches/profile.py` ...",
            "- `benches/profile.py` ...\n- build: profile-guided, as the image ships it",
        );
        assert!(parse(&guided_report).is_some_and(|c| c.guided));
        let c = hop_cost;
        let md = markdown(&[
            c("pylon", "HTTP/1.1 GET", 20_000.0, true),
            c("pylon-outbound", "HTTP/1.1 GET", 24_000.0, true),
            c("floor", "HTTP/1.1 GET", 20_000.0, false),
            c("nginx", "HTTP/1.1 GET", 16_000.0, false),
            c("floor-h1n", "HTTP/1.1 GET", 10_000.0, false),
            c("pylon", "h2c GET", 39_000.0, true),
            c("floor-h2", "h2c GET", 41_000.0, false),
            c("haproxy", "h2c GET", 34_000.0, false),
        ]);
        assert!(
            md.contains(
                "| Pylon, inbound hop (`pylon`) | 20,000 | 39,000 | — | abc, profile-guided |"
            ),
            "{md}"
        );
        assert!(
            md.contains("profile-guided as the image ships it, costs 1.25× the cheaper baseline's whole hop, its outbound hop 1.50×"),
            "{md}"
        );
        assert!(md.contains("(hyper alone: 1.25×)"), "{md}");
        assert!(!md.contains("add 0 instructions"), "{md}");
        assert!(!md.contains("narrower HTTP/1.1 path"), "{md}");
        assert!(
            md.contains("h2c GET: Pylon's inbound hop, profile-guided, costs 1.15× HAProxy's hop; the cheapest floor, an ordinary build, 1.21×."),
            "{md}"
        );
    }
}
