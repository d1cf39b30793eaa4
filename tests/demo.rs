//! End-to-end: `pylon demo` with the real binary. It must start the mesh on loopback, show
//! traffic to all three endpoints read from the proxies' metrics, serve the admin addresses it
//! prints while it runs, and leave nothing behind: exit 0, every printed admin port closed, the
//! config dir removed.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// The whole test's budget; the demo itself runs for 6 s plus start-up and shutdown.
const DEADLINE: Duration = Duration::from_secs(50);

/// Kills the demo if the test fails before it exits.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A minimal `GET path` over a fresh connection; returns the status code and body.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// `http://127.0.0.1:PORT/metrics` -> `127.0.0.1:PORT`.
fn admin_addr(url: &str) -> Option<SocketAddr> {
    url.strip_prefix("http://")?
        .strip_suffix("/metrics")?
        .parse()
        .ok()
}

fn percent(cell: &str) -> Option<f64> {
    cell.strip_suffix('%')?.parse().ok()
}

/// A row of one of the demo's tables, by column name.
struct Row {
    cells: Vec<String>,
}

struct Table {
    headers: Vec<String>,
    rows: Vec<Row>,
}

impl Table {
    fn cell(&self, row: &Row, column: &str) -> String {
        let i = self
            .headers
            .iter()
            .position(|h| h == column)
            .unwrap_or_else(|| panic!("no column {column} in {:?}", self.headers));
        row.cells.get(i).cloned().unwrap_or_default()
    }

    fn row(&self, endpoint: &str) -> &Row {
        self.rows
            .iter()
            .find(|r| r.cells.first().map(String::as_str) == Some(endpoint))
            .unwrap_or_else(|| panic!("no row for {endpoint}"))
    }
}

/// Splits the output into tables: a header line starting `ENDPOINT`, then rows until a blank
/// or non-table line.
fn tables(stdout: &[String]) -> Vec<Table> {
    let mut tables = Vec::new();
    let mut current: Option<Table> = None;
    for line in stdout {
        let cells: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        if cells.first().map(String::as_str) == Some("ENDPOINT") {
            tables.extend(current.take());
            current = Some(Table {
                headers: cells,
                rows: Vec::new(),
            });
        } else if let Some(table) = current.as_mut() {
            if cells.len() == table.headers.len() {
                table.rows.push(Row { cells });
            } else {
                tables.extend(current.take());
            }
        }
    }
    tables.extend(current);
    tables
}

const ENDPOINTS: [&str; 3] = ["ml-inference-1", "ml-inference-2", "ml-inference-3"];

/// Runs the `pylon` commands the demo printed (its `look` lines), with a 1 s window so they
/// finish while the demo runs; returns each command line, its exit status and its output.
fn run_printed_commands(out: &[String]) -> Vec<(String, bool, String)> {
    let start = out
        .iter()
        .position(|l| l.starts_with("look "))
        .expect("the demo prints the commands to look at it");
    out[start..]
        .iter()
        .map(|l| l.strip_prefix("look").unwrap_or(l).trim())
        .take_while(|l| l.starts_with("pylon "))
        .map(|cmd| {
            let args: Vec<String> = cmd
                .split_whitespace()
                .skip(1)
                .map(|a| {
                    if a == "10s" {
                        "1s".to_owned()
                    } else {
                        a.to_owned()
                    }
                })
                .collect();
            let output = Command::new(env!("CARGO_BIN_EXE_pylon"))
                .args(&args)
                .output()
                .expect("run a printed pylon command");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            (cmd.to_owned(), output.status.success(), text)
        })
        .collect()
}

#[test]
fn demo_shows_the_mesh_and_leaves_nothing_behind() {
    let started = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_pylon"))
        .args(["demo", "--duration", "6", "--rps", "40"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pylon demo");
    let mut demo = KillOnDrop(child);

    let stdout = demo.0.stdout.take().expect("stdout");
    let stderr = demo.0.stderr.take().expect("stderr");
    let (lines_tx, lines) = mpsc::channel::<String>();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let stderr_reader = thread::spawn(move || {
        let mut text = String::new();
        let _ = BufReader::new(stderr).read_to_string(&mut text);
        text
    });

    // Read stdout as it comes; once the admin addresses are out (and the first table shows the
    // mesh is serving), scrape one of them while the demo runs.
    let mut out: Vec<String> = Vec::new();
    let mut scraped_while_running = None;
    let mut looked_while_running = None;
    loop {
        let left = DEADLINE.saturating_sub(started.elapsed());
        assert!(
            !left.is_zero(),
            "pylon demo took longer than {DEADLINE:?}; stdout:\n{}",
            out.join("\n")
        );
        match lines.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok(line) => {
                let first_table = line.starts_with("ENDPOINT");
                out.push(line);
                if first_table && scraped_while_running.is_none() {
                    let admin = out
                        .iter()
                        .filter(|l| l.starts_with("admin "))
                        .filter_map(|l| l.split_whitespace().last().and_then(admin_addr))
                        .next()
                        .expect("an admin address before the first table");
                    scraped_while_running = Some(http_get(admin, "/metrics"));
                    looked_while_running = Some(run_printed_commands(&out));
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = loop {
        if let Some(status) = demo.0.try_wait().expect("wait") {
            break status;
        }
        assert!(started.elapsed() < DEADLINE, "pylon demo did not exit");
        thread::sleep(Duration::from_millis(50));
    };
    let err = stderr_reader.join().unwrap_or_default();
    let stdout_text = out.join("\n");
    let context = format!("stdout:\n{stdout_text}\nstderr:\n{err}");
    assert!(
        status.success(),
        "pylon demo exited with {status}; {context}"
    );
    assert!(
        !err.contains("warning:"),
        "pylon demo warned (a proxy did not stop cleanly?); {context}"
    );

    // The admin addresses: the outbound proxy's and one per endpoint.
    let admins: Vec<SocketAddr> = out
        .iter()
        .filter(|l| l.starts_with("admin "))
        .filter_map(|l| l.split_whitespace().last().and_then(admin_addr))
        .collect();
    assert_eq!(admins.len(), 4, "expected 4 admin addresses; {context}");
    match scraped_while_running {
        Some(Ok((200, body))) => assert!(
            body.contains("request_total") || body.contains("process_"),
            "the admin /metrics served no metrics: {body}"
        ),
        other => {
            panic!("the admin /metrics was not reachable during the run: {other:?}; {context}")
        }
    }

    // The commands the demo prints work against it.
    let looked = looked_while_running.expect("the printed commands ran during the demo");
    assert_eq!(
        looked.len(),
        5,
        "stat, routes, edges, tap and top are printed: {looked:#?}"
    );
    for (cmd, ok, text) in &looked {
        assert!(ok, "`{cmd}` failed against the running demo:\n{text}");
    }
    assert!(
        looked[0].2.contains("ml-inference"),
        "stat: {}",
        looked[0].2
    );
    assert!(
        looked[1].2.contains("POST /predict"),
        "routes: {}",
        looked[1].2
    );
    assert!(
        looked[2].2.contains("loadgen") && looked[2].2.contains("ml-inference"),
        "edges: {}",
        looked[2].2
    );
    // The demo's hops are mTLS: the edge is secured, with the service's identity.
    let edge = looked[2]
        .2
        .lines()
        .find(|l| l.starts_with("loadgen"))
        .unwrap_or_default();
    assert!(
        edge.split_whitespace().nth(4) == Some("yes")
            && edge.contains("ml-inference.default.serviceaccount.identity.pylon.cluster.local"),
        "edges: the demo's edge is secured with the service's identity: {}",
        looked[2].2
    );
    let tapped = looked[3]
        .2
        .lines()
        .filter(|l| l.starts_with("req "))
        .count();
    assert_eq!(tapped, 3, "tap --limit 3: {}", looked[3].2);
    assert!(
        looked[4].2.contains("/predict"),
        "top --once: {}",
        looked[4].2
    );

    // The tables: one per second, then the run's summary.
    let tables = tables(&out);
    let (summary, intervals): (Vec<&Table>, Vec<&Table>) = tables
        .iter()
        .partition(|t| t.headers.iter().any(|h| h == "REQUESTS"));
    assert!(
        intervals.len() >= 4,
        "expected a table per second; {context}"
    );
    assert_eq!(summary.len(), 1, "expected one summary; {context}");
    for table in &intervals {
        for column in [
            "RPS",
            "SUCCESS",
            "LATENCY_P50",
            "LATENCY_P99",
            "INBOUND_SUCCESS",
        ] {
            assert!(
                table.headers.iter().any(|h| h == column),
                "no {column}; {context}"
            );
        }
    }
    // The healthy and the flaky endpoint got traffic in some second, with a parsed success rate.
    // The slow one may get none: the balancer (P2C over PeakEWMA) prefers faster endpoints.
    for endpoint in ENDPOINTS {
        let rates: Vec<(Option<f64>, Option<f64>)> = intervals
            .iter()
            .map(|t| {
                let row = t.row(endpoint);
                (
                    t.cell(row, "RPS").parse().ok(),
                    percent(&t.cell(row, "SUCCESS")),
                )
            })
            .collect();
        assert!(
            rates.iter().all(|(rps, _)| rps.is_some()),
            "{endpoint} has an unparsable RPS; {context}"
        );
        if endpoint != "ml-inference-3" {
            let busy = rates
                .iter()
                .any(|&(rps, success)| rps > Some(0.0) && success.is_some());
            assert!(busy, "{endpoint} never showed traffic; {context}");
        }
    }
    // Over the run, from the proxies' counters.
    let summary = summary[0];
    let requests = |endpoint: &str| -> f64 {
        let row = summary.row(endpoint);
        summary.cell(row, "REQUESTS").parse().unwrap_or(-1.0)
    };
    let total: f64 = ENDPOINTS.iter().map(|e| requests(e)).sum();
    for endpoint in ENDPOINTS {
        let row = summary.row(endpoint);
        let served = requests(endpoint);
        assert!(served >= 0.0, "{endpoint} has no request count; {context}");
        if served == 0.0 {
            continue;
        }
        let success = percent(&summary.cell(row, "SUCCESS"));
        assert!(
            success.is_some(),
            "{endpoint} has no success rate; {context}"
        );
        let inbound = percent(&summary.cell(row, "INBOUND_SUCCESS"));
        assert!(
            inbound.is_some(),
            "{endpoint} has no inbound success rate; {context}"
        );
        let p99 = summary.cell(row, "LATENCY_P99");
        assert!(p99.ends_with("ms"), "{endpoint} p99 {p99:?}; {context}");
        if endpoint == "ml-inference-2" && served >= 20.0 {
            // The flaky app fails its 8th request and every 50th after: its proxies see it.
            assert!(
                success < Some(100.0),
                "{endpoint} showed no failures; {context}"
            );
            assert!(
                inbound < Some(100.0),
                "{endpoint} inbound showed no failures; {context}"
            );
        }
        if endpoint != "ml-inference-2" {
            assert_eq!(
                success,
                Some(100.0),
                "{endpoint} failed requests; {context}"
            );
        }
    }
    assert!(
        requests("ml-inference-3") < requests("ml-inference-1"),
        "the slow endpoint got as much traffic as the healthy one; {context}"
    );
    // 40 rps for ~6 s: most of it should arrive (generous, for a loaded machine).
    assert!(
        total >= 120.0,
        "only {total} requests in the run; {context}"
    );

    // Nothing left behind: every proxy is gone and the config dir removed.
    for admin in &admins {
        assert!(
            TcpStream::connect_timeout(admin, Duration::from_millis(500)).is_err(),
            "{admin} still accepts connections after the demo exited"
        );
    }
    let config_dir: PathBuf = out
        .iter()
        .find_map(|l| l.strip_prefix("config dir"))
        .map(|p| PathBuf::from(p.trim()))
        .expect("the config dir is printed");
    assert!(
        config_dir.starts_with(std::env::temp_dir()),
        "config dir {} is not a temporary dir",
        config_dir.display()
    );
    assert!(
        !config_dir.exists(),
        "{} was not removed",
        config_dir.display()
    );
}
