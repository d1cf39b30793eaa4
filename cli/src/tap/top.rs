//! `pylon top`: the busiest paths of the live traffic, from the proxies' tap streams: per
//! method, authority and path, how many requests, the best, worst and last latency, and the
//! success rate. Full-screen and live (ratatui), or one table with `--once DURATION`; `-o wide`
//! splits the rows by destination (its workload, pod or service, else its address), `-o json`
//! prints the rows of `--once` for machines.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::ValueEnum;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind};
use ratatui::layout::Constraint;
use ratatui::style::{Modifier, Style};
use ratatui::widgets::{Block, Row, Table};

use super::event::{Kind, Line};
use crate::stat::view::fmt_percent;

/// What the table is sorted by (`s` cycles through them in the live view).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SortBy {
    Count,
    Worst,
    Success,
    Path,
}

impl SortBy {
    fn next(self) -> Self {
        match self {
            Self::Count => Self::Worst,
            Self::Worst => Self::Success,
            Self::Success => Self::Path,
            Self::Path => Self::Count,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub method: String,
    pub authority: String,
    pub path: String,
    /// The destination, when the rows are split by it (`-o wide`); else empty.
    pub destination: String,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    pub count: u64,
    pub ok: u64,
    pub best_us: Option<u64>,
    pub worst_us: Option<u64>,
    pub last_us: Option<u64>,
}

impl Stats {
    pub fn success(&self) -> Option<f64> {
        (self.count > 0).then(|| self.ok as f64 / self.count as f64)
    }
}

/// Requests in flight (by proxy and stream id) and the finished ones, by path.
#[derive(Default)]
pub struct Paths {
    open: HashMap<(usize, String), (Key, Option<u64>, bool)>,
    rows: HashMap<Key, Stats>,
}

/// Bound on requests awaiting their end, so lost events can't grow memory.
const MAX_OPEN: usize = 10_000;

impl Paths {
    /// One event; a request's row is split by `destination` when one is given.
    pub fn observe(&mut self, proxy: usize, line: &Line, destination: Option<String>) {
        let id = (proxy, line.id.clone());
        match line.kind {
            Some(Kind::Req) => {
                if self.open.len() >= MAX_OPEN {
                    self.open.clear();
                }
                let key = Key {
                    method: line.method.clone().unwrap_or_default(),
                    authority: line.authority.clone().unwrap_or_default(),
                    path: line.path.clone().unwrap_or_default(),
                    destination: destination.unwrap_or_default(),
                };
                self.open.insert(id, (key, None, true));
            }
            Some(Kind::Rsp) => {
                if let Some((_, latency, ok)) = self.open.get_mut(&id) {
                    *latency = line.latency_us;
                    *ok = line.proxy_error.is_none() && line.status.is_some_and(|s| s < 500);
                }
            }
            Some(Kind::End) => {
                if let Some((key, latency, ok)) = self.open.remove(&id) {
                    let ok = ok
                        && line.reset_error.is_none()
                        && line.grpc_status.as_deref().is_none_or(|g| g == "OK");
                    let stats = self.rows.entry(key).or_default();
                    stats.count += 1;
                    stats.ok += u64::from(ok);
                    if let Some(l) = latency {
                        stats.best_us = Some(stats.best_us.map_or(l, |b| b.min(l)));
                        stats.worst_us = Some(stats.worst_us.map_or(l, |w| w.max(l)));
                        stats.last_us = Some(l);
                    }
                }
            }
            None => {}
        }
    }

    pub fn sorted(&self, by: SortBy) -> Vec<(&Key, &Stats)> {
        let mut rows: Vec<_> = self.rows.iter().collect();
        rows.sort_by(|(ka, a), (kb, b)| {
            let primary = match by {
                SortBy::Count => b.count.cmp(&a.count),
                SortBy::Worst => b.worst_us.cmp(&a.worst_us),
                SortBy::Success => a
                    .success()
                    .partial_cmp(&b.success())
                    .unwrap_or(std::cmp::Ordering::Equal),
                SortBy::Path => std::cmp::Ordering::Equal,
            };
            primary.then_with(|| ka.cmp(kb))
        });
        rows
    }
}

const HEADERS: [&str; 8] = [
    "METHOD",
    "AUTHORITY",
    "PATH",
    "COUNT",
    "BEST",
    "WORST",
    "LAST",
    "SUCCESS",
];

/// The headers, with DESTINATION after AUTHORITY when `wide`.
fn headers(wide: bool) -> Vec<&'static str> {
    let mut h = HEADERS.to_vec();
    if wide {
        h.insert(2, "DESTINATION");
    }
    h
}

fn latency(us: Option<u64>) -> String {
    match us {
        None => "-".to_owned(),
        Some(us) if us < 1_000 => format!("{us}µs"),
        Some(us) if us < 10_000 => format!("{:.1}ms", us as f64 / 1000.0),
        Some(us) => format!("{}ms", us / 1000),
    }
}

fn cells(key: &Key, s: &Stats, wide: bool) -> Vec<String> {
    let mut cells = vec![
        key.method.clone(),
        key.authority.clone(),
        key.path.clone(),
        s.count.to_string(),
        latency(s.best_us),
        latency(s.worst_us),
        latency(s.last_us),
        fmt_percent(s.success()),
    ];
    if wide {
        let dst = if key.destination.is_empty() {
            "-".to_owned()
        } else {
            key.destination.clone()
        };
        cells.insert(2, dst);
    }
    cells
}

/// The table as text (for `--once`).
pub fn render_text(paths: &Paths, by: SortBy, wide: bool) -> String {
    let rows: Vec<Vec<String>> = paths
        .sorted(by)
        .into_iter()
        .map(|(k, s)| cells(k, s, wide))
        .collect();
    crate::stat::view::table(&headers(wide), &rows)
}

/// The rows as JSON (for `--once -o json`): latencies in microseconds, success as a ratio.
pub fn render_json(paths: &Paths, by: SortBy) -> String {
    serde_json::to_string_pretty(&serde_json::json!({ "rows": json_rows(paths, by, usize::MAX) }))
        .map(|s| s + "\n")
        .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}\n"))
}

/// The first `limit` rows as JSON objects (`render_json`'s, and the dashboard's top table).
pub fn json_rows(paths: &Paths, by: SortBy, limit: usize) -> Vec<serde_json::Value> {
    paths
        .sorted(by)
        .into_iter()
        .take(limit)
        .map(|(k, s)| {
            let mut row = serde_json::json!({
                "method": k.method,
                "authority": k.authority,
                "path": k.path,
                "count": s.count,
                "success_rate": s.success(),
                "best_us": s.best_us,
                "worst_us": s.worst_us,
                "last_us": s.last_us,
            });
            if let (Some(obj), false) = (row.as_object_mut(), k.destination.is_empty()) {
                obj.insert("destination".into(), k.destination.clone().into());
            }
            row
        })
        .collect()
}

/// The live view: redraws twice a second until `q` (or Esc, or Ctrl-C); `s` changes the sort.
pub fn interactive(
    paths: Arc<Mutex<Paths>>,
    title: String,
    mut by: SortBy,
    wide: bool,
) -> std::io::Result<()> {
    let mut terminal = ratatui::init();
    let result = (|| loop {
        let snapshot = {
            let p = paths.lock().unwrap_or_else(|e| e.into_inner());
            p.sorted(by)
                .into_iter()
                .map(|(k, s)| cells(k, s, wide))
                .collect::<Vec<_>>()
        };
        terminal.draw(|frame| {
            let rows = snapshot.iter().map(|c| Row::new(c.clone()));
            let mut widths = vec![
                Constraint::Length(7),
                Constraint::Percentage(25),
                Constraint::Percentage(35),
                Constraint::Length(8),
                Constraint::Length(9),
                Constraint::Length(9),
                Constraint::Length(9),
                Constraint::Length(9),
            ];
            if wide {
                widths.insert(2, Constraint::Percentage(20));
            }
            let table = Table::new(rows, widths)
                .header(Row::new(headers(wide)).style(Style::new().add_modifier(Modifier::BOLD)))
                .block(
                    Block::bordered()
                        .title(format!(" {title} — sorted by {by:?} (s: sort, q: quit) ")),
                );
            frame.render_widget(table, frame.area());
        })?;
        if event::poll(Duration::from_millis(500))? {
            if let Event::Key(key) = event::read()? {
                if key.kind != KeyEventKind::Press {
                    continue;
                }
                match key.code {
                    KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                    KeyCode::Char('c')
                        if key
                            .modifiers
                            .contains(ratatui::crossterm::event::KeyModifiers::CONTROL) =>
                    {
                        return Ok(())
                    }
                    KeyCode::Char('s') => by = by.next(),
                    _ => {}
                }
            }
        }
    })();
    ratatui::restore();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(kind: Kind, id: &str) -> Line {
        Line {
            kind: Some(kind),
            id: id.to_owned(),
            proxy: "out",
            ..Line::default()
        }
    }

    fn request(paths: &mut Paths, id: &str, path: &str, status: u32, latency_us: u64) {
        let mut req = line(Kind::Req, id);
        req.method = Some("GET".into());
        req.authority = Some("web:80".into());
        req.path = Some(path.into());
        paths.observe(0, &req, None);
        let mut rsp = line(Kind::Rsp, id);
        rsp.status = Some(status);
        rsp.latency_us = Some(latency_us);
        paths.observe(0, &rsp, None);
        paths.observe(0, &line(Kind::End, id), None);
    }

    #[test]
    fn paths_are_counted_and_sorted() {
        let mut paths = Paths::default();
        request(&mut paths, "1", "/a", 200, 500);
        request(&mut paths, "2", "/a", 503, 9_000);
        request(&mut paths, "3", "/a", 200, 1_200);
        request(&mut paths, "4", "/b", 200, 20_000);
        let by_count = paths.sorted(SortBy::Count);
        assert_eq!(by_count[0].0.path, "/a");
        let a = by_count[0].1;
        assert_eq!((a.count, a.ok), (3, 2));
        assert_eq!(
            (a.best_us, a.worst_us, a.last_us),
            (Some(500), Some(9_000), Some(1_200))
        );
        assert_eq!(paths.sorted(SortBy::Worst)[0].0.path, "/b");
        assert_eq!(paths.sorted(SortBy::Success)[0].0.path, "/a");
        let text = render_text(&paths, SortBy::Count, false);
        assert!(text.starts_with("METHOD"), "{text}");
        assert!(text.contains("66.67%") && text.contains("500µs") && text.contains("9.0ms"));
        assert!(text.contains("20ms"), "{text}");
        let json: serde_json::Value =
            serde_json::from_str(&render_json(&paths, SortBy::Count)).unwrap();
        assert_eq!(json["rows"][0]["path"], "/a");
        assert_eq!(json["rows"][0]["count"], 3);
        assert_eq!(json["rows"][0]["worst_us"], 9_000);
        assert!(json["rows"][0].get("destination").is_none());
    }

    #[test]
    fn wide_rows_are_split_by_destination() {
        let mut paths = Paths::default();
        for (id, dst) in [
            ("1", "deployment/b"),
            ("2", "deployment/b"),
            ("3", "pod/c-0"),
        ] {
            let mut req = line(Kind::Req, id);
            req.method = Some("GET".into());
            req.authority = Some("b:80".into());
            req.path = Some("/x".into());
            paths.observe(0, &req, Some(dst.into()));
            paths.observe(0, &line(Kind::End, id), None);
        }
        let text = render_text(&paths, SortBy::Count, true);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("METHOD   AUTHORITY   DESTINATION"),
            "{text}"
        );
        let cols: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(cols[2], "deployment/b", "{text}");
        assert_eq!(cols[4], "2", "{text}");
        let json: serde_json::Value =
            serde_json::from_str(&render_json(&paths, SortBy::Count)).unwrap();
        assert_eq!(json["rows"][1]["destination"], "pod/c-0");
    }

    #[test]
    fn proxy_errors_and_resets_are_failures() {
        let mut paths = Paths::default();
        let mut req = line(Kind::Req, "1");
        req.path = Some("/x".into());
        paths.observe(0, &req, None);
        let mut rsp = line(Kind::Rsp, "1");
        rsp.status = Some(200);
        rsp.proxy_error = Some("no endpoints".into());
        paths.observe(0, &rsp, None);
        paths.observe(0, &line(Kind::End, "1"), None);
        paths.observe(1, &req, None);
        let mut end = line(Kind::End, "1");
        end.reset_error = Some(8);
        paths.observe(1, &end, None);
        let stats = paths.sorted(SortBy::Count)[0].1.clone();
        assert_eq!((stats.count, stats.ok), (2, 0));
        // An end without its request is ignored.
        paths.observe(0, &line(Kind::End, "nope"), None);
        assert_eq!(paths.sorted(SortBy::Count)[0].1.count, 2);
    }
}
