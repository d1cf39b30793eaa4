//! A small blocking client of the Chrome DevTools Protocol, driving a real headless Chromium
//! (Debian's `chromium`) from plain `#[test]` threads: the browser tests of the dashboard load
//! its pages, run JS in them, click, type Enter, take screenshots and check that the console
//! stayed clean.
//!
//! One WebSocket to the browser; each page is a target attached with `flatten: true`, so its
//! commands and events carry its `sessionId` over that same socket. One I/O thread owns the
//! socket: it writes the queued commands, routes each response by `id` to the caller waiting
//! for it and each page event to that page's state. Every wait is bounded and panics saying
//! what it waited for.
//!
//! Tests include it after `mod blocking;` as `#[path = "blocking/browser.rs"] mod browser;`.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use tungstenite::Message;

use crate::blocking::Proc;

/// How long one DevTools command, a navigation, or a `wait_for` may take.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// The Chromium binary: `/usr/bin/chromium`, else `chromium` on `PATH`.
pub fn chromium_path() -> Option<PathBuf> {
    let debian = PathBuf::from("/usr/bin/chromium");
    if debian.is_file() {
        return Some(debian);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("chromium"))
        .find(|p| p.is_file())
}

/// Whether Chromium is installed (`Browser::launch` panics when it is not: no silent skips).
pub fn chromium_available() -> bool {
    chromium_path().is_some()
}

/// A headless Chromium, killed (and its profile dir removed) when dropped.
pub struct Browser {
    conn: Arc<Conn>,
    /// Its last 200 stderr lines, for the panics that need them.
    stderr: Arc<Mutex<VecDeque<String>>>,
    // Dropped in this order: the process, then its profile.
    _proc: Proc,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium on a fresh profile with a DevTools port of its choosing (read from
    /// its stderr, within 30 s) and connects to it.
    pub fn launch() -> Browser {
        let Some(bin) = chromium_path() else {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true");
            let hint = if ci {
                ""
            } else {
                "; or `apt-get install chromium`"
            };
            panic!("chromium is missing (./scripts/test installs it{hint})");
        };
        let profile = tempfile::tempdir().expect("a temp dir for the Chromium profile");
        let mut child = Command::new(&bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-default-apps",
                "--mute-audio",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let stderr = child.stderr.take().expect("chromium's stderr is piped");
        let proc = Proc(child);

        // Drains stderr for the browser's whole life, so the pipe never fills.
        let (tx, rx) = mpsc::channel();
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let kept = tail.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = tx.send(url.trim().to_string());
                }
                if let Ok(mut kept) = kept.lock() {
                    if kept.len() == 200 {
                        kept.pop_front();
                    }
                    kept.push_back(line);
                }
            }
        });
        let tail_text = || {
            tail.lock()
                .map(|t| Vec::from(t.clone()).join("\n"))
                .unwrap_or_default()
        };
        let url = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| {
                panic!(
                    "chromium did not print its DevTools URL within 30 s ({e}); stderr:\n{}",
                    tail_text()
                )
            });
        let conn = Conn::connect(&url);
        Browser {
            conn,
            stderr: tail,
            _proc: proc,
            _profile: profile,
        }
    }

    /// A new tab on `about:blank` with a 1280x900 viewport, its `Page`, `Runtime` and `Log`
    /// events recorded.
    pub fn new_page(&self) -> Page {
        let conn = self.conn.clone();
        let target = conn.call(None, "Target.createTarget", json!({"url": "about:blank"}));
        let target_id = target["targetId"]
            .as_str()
            .expect("Target.createTarget answers a targetId")
            .to_string();
        let attached = conn.call(
            None,
            "Target.attachToTarget",
            json!({"targetId": target_id, "flatten": true}),
        );
        let session = attached["sessionId"]
            .as_str()
            .expect("Target.attachToTarget answers a sessionId")
            .to_string();
        let state = Arc::new(PageState::default());
        conn.sessions
            .lock()
            .expect("sessions lock")
            .insert(session.clone(), state.clone());
        let page = Page {
            conn,
            session,
            target_id,
            state,
        };
        for domain in ["Page", "Runtime", "Log"] {
            page.call(&format!("{domain}.enable"), json!({}));
        }
        // `Page.lifecycleEvent`s name the navigation (loader) that loaded: see `goto`.
        page.call("Page.setLifecycleEventsEnabled", json!({"enabled": true}));
        // `--window-size` counts the (invisible) browser UI: without this the viewport of
        // Chromium 156 is 1280x813.
        let viewport =
            json!({"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": false});
        page.call("Emulation.setDeviceMetricsOverride", viewport);
        page
    }

    /// Chromium's last stderr lines (it logs a lot of harmless dbus errors here).
    pub fn stderr_tail(&self) -> Vec<String> {
        self.stderr
            .lock()
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default()
    }
}

impl Drop for Browser {
    /// Asks Chromium to quit, so that it reaps its helper processes, and waits (2 s) for it;
    /// then `Proc` kills whatever is left.
    fn drop(&mut self) {
        let quit = Duration::from_secs(2);
        let _ = self.conn.try_call(None, "Browser.close", json!({}), quit);
        let deadline = Instant::now() + quit;
        while matches!(self._proc.0.try_wait(), Ok(None)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One tab. Console errors, uncaught exceptions and `error` log entries of every document it
/// loads are recorded (see `console_errors`).
pub struct Page {
    conn: Arc<Conn>,
    session: String,
    target_id: String,
    state: Arc<PageState>,
}

#[derive(Default)]
struct PageState {
    errors: Mutex<Vec<String>>,
    /// The navigations (loader ids) whose `load` event fired, and a signal on each.
    loads: Mutex<HashSet<String>>,
    loaded: Condvar,
}

impl Page {
    /// Sends one command to this page (bounded, panics on a CDP error).
    pub fn call(&self, method: &str, params: Value) -> Value {
        self.conn.call(Some(&self.session), method, params)
    }

    /// Navigates to `url` and waits (20 s) for the load event of that navigation (not of an
    /// earlier one still finishing). A same-document navigation (only the `#fragment`
    /// changes) loads nothing: it returns at once.
    pub fn goto(&self, url: &str) {
        let nav = self.call("Page.navigate", json!({"url": url}));
        if let Some(err) = nav.get("errorText").and_then(Value::as_str) {
            panic!("goto {url}: {err}");
        }
        let Some(loader) = nav.get("loaderId").and_then(Value::as_str) else {
            return;
        };
        let loads = self.state.loads.lock().expect("loads lock");
        let (loads, timeout) = self
            .state
            .loaded
            .wait_timeout_while(loads, TIMEOUT, |done| !done.contains(loader))
            .expect("loads lock");
        drop(loads);
        if timeout.timed_out() {
            panic!(
                "goto {url}: no load event within {TIMEOUT:?}; console errors: {:#?}",
                self.console_errors()
            );
        }
    }

    /// The value of a JS expression (promises awaited), as JSON (`undefined` is `null`).
    /// Panics with the exception if it throws.
    pub fn eval(&self, js: &str) -> Value {
        self.try_eval(js)
            .unwrap_or_else(|e| panic!("eval {js:?} threw: {e}"))
    }

    fn try_eval(&self, js: &str) -> Result<Value, String> {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": js, "returnByValue": true, "awaitPromise": true}),
        );
        if let Some(ex) = r.get("exceptionDetails") {
            let description = ex["exception"]["description"].as_str();
            return Err(description
                .or(ex["text"].as_str())
                .unwrap_or("an exception")
                .to_string());
        }
        let result = &r["result"];
        Ok(result
            .get("value")
            .or(result.get("unserializableValue"))
            .cloned()
            .unwrap_or(Value::Null))
    }

    /// Polls the JS expression `js_predicate` every 100 ms until it is truthy (a throw counts
    /// as not yet), for at most 20 s: its value. Panics with `what`, the last value and the
    /// console errors so far.
    pub fn wait_for(&self, js_predicate: &str, what: &str) -> Value {
        self.wait_for_within(TIMEOUT, js_predicate, what)
    }

    /// `wait_for` with another bound.
    pub fn wait_for_within(&self, limit: Duration, js_predicate: &str, what: &str) -> Value {
        // The newline lets the predicate end with a `//` comment.
        let js = format!(
            "(async () => {{ const v = await ({js_predicate}\n); return {{ ok: !!v, v }}; }})()"
        );
        let deadline = Instant::now() + limit;
        loop {
            let last = match self.try_eval(&js) {
                Ok(r) if r["ok"] == true => return r["v"].clone(),
                Ok(r) => r["v"].to_string(),
                Err(e) => format!("threw {e}"),
            };
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {limit:?} waiting for {what} ({js_predicate}); last value: {last}; \
                     console errors: {:#?}",
                    self.console_errors()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Clicks the first element matching `css_selector` (a bubbling `click` event).
    pub fn click(&self, css_selector: &str) {
        let sel = Value::from(css_selector);
        let js = format!(
            "(() => {{ const el = document.querySelector({sel}); if (!el) return false; \
             el.dispatchEvent(new MouseEvent('click', {{ bubbles: true, cancelable: true, view: window }})); \
             return true; }})()"
        );
        if self.eval(&js) != true {
            panic!("click: no element matches {css_selector:?}");
        }
    }

    /// Focuses the first element matching `css_selector` and presses Enter as a keyboard
    /// would (real key events): keyboard access works only if that element is focusable and
    /// acts on Enter.
    pub fn press_enter(&self, css_selector: &str) {
        let sel = Value::from(css_selector);
        let js = format!(
            "(() => {{ const el = document.querySelector({sel}); if (!el) return 'missing'; \
             el.focus(); return document.activeElement === el ? 'focused' : 'unfocusable'; }})()"
        );
        match self.eval(&js).as_str() {
            Some("focused") => {}
            Some("missing") => panic!("press_enter: no element matches {css_selector:?}"),
            _ => panic!(
                "press_enter: {css_selector:?} cannot take the focus (not keyboard accessible)"
            ),
        }
        for kind in ["keyDown", "keyUp"] {
            let mut key =
                json!({"type": kind, "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13});
            if kind == "keyDown" {
                // The text makes it a keypress too, which is what activates buttons and links.
                key["text"] = "\r".into();
            }
            self.call("Input.dispatchKeyEvent", key);
        }
    }

    /// Saves a PNG of the viewport to `path` (creating its parent dirs).
    pub fn screenshot(&self, path: &Path) {
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let data = shot["data"]
            .as_str()
            .expect("Page.captureScreenshot answers base64 data");
        let png = base64::engine::general_purpose::STANDARD
            .decode(data)
            .expect("Page.captureScreenshot's data is base64");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        }
        std::fs::write(path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// What went wrong in the page so far: `console.error`/`console.assert` calls, uncaught
    /// exceptions (and unhandled rejections), and `error` log entries (e.g. failed loads).
    pub fn console_errors(&self) -> Vec<String> {
        self.state.errors.lock().expect("errors lock").clone()
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        let params = json!({"targetId": self.target_id});
        let _ = self
            .conn
            .try_call(None, "Target.closeTarget", params, Duration::from_secs(2));
        if let Ok(mut sessions) = self.conn.sessions.lock() {
            sessions.remove(&self.session);
        }
    }
}

/// The browser's WebSocket, shared by the browser and its pages.
struct Conn {
    next_id: AtomicU64,
    /// Commands for the I/O thread to send.
    outbox: mpsc::Sender<String>,
    /// The callers waiting for a response, by command id; `None` once the socket closed.
    pending: Mutex<Option<HashMap<u64, mpsc::Sender<Value>>>>,
    /// Why the socket closed.
    closed: Mutex<String>,
    sessions: Mutex<HashMap<String, Arc<PageState>>>,
}

impl Conn {
    fn connect(url: &str) -> Arc<Conn> {
        let authority = url
            .strip_prefix("ws://")
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_else(|| panic!("chromium's DevTools URL is ws://HOST:PORT/...: {url}"));
        let stream = TcpStream::connect(authority).unwrap_or_else(|e| panic!("connect {url}: {e}"));
        stream
            .set_read_timeout(Some(TIMEOUT))
            .expect("set a read timeout");
        let (mut ws, _) = tungstenite::client(url, stream)
            .unwrap_or_else(|e| panic!("WebSocket handshake with {url}: {e}"));
        // From now on reads time out quickly, so that the I/O thread gets to write between them.
        ws.get_ref()
            .set_read_timeout(Some(Duration::from_millis(5)))
            .expect("set a read timeout");
        let (outbox, queued) = mpsc::channel::<String>();
        let conn = Arc::new(Conn {
            next_id: AtomicU64::new(1),
            outbox,
            pending: Mutex::new(Some(HashMap::new())),
            closed: Mutex::new(String::new()),
            sessions: Mutex::new(HashMap::new()),
        });
        let io = conn.clone();
        thread::spawn(move || {
            let why = loop {
                if let Some(e) = queued
                    .try_iter()
                    .find_map(|text| ws.send(Message::text(text)).err())
                {
                    break format!("sending: {e}");
                }
                match ws.read() {
                    Ok(Message::Text(text)) => io.dispatch(text.as_str()),
                    Ok(Message::Close(frame)) => break format!("chromium closed it: {frame:?}"),
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e))
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => break format!("reading: {e}"),
                }
            };
            *io.closed.lock().expect("closed lock") = why;
            // Dropping the senders wakes every waiting caller.
            io.pending.lock().expect("pending lock").take();
        });
        conn
    }

    /// Routes one message from Chromium: a response to its caller, an event to its page.
    fn dispatch(&self, text: &str) {
        let Ok(msg) = serde_json::from_str::<Value>(text) else {
            return;
        };
        if let Some(id) = msg.get("id").and_then(Value::as_u64) {
            let waiter = self
                .pending
                .lock()
                .expect("pending lock")
                .as_mut()
                .and_then(|p| p.remove(&id));
            if let Some(waiter) = waiter {
                let _ = waiter.send(msg);
            }
            return;
        }
        let Some(session) = msg.get("sessionId").and_then(Value::as_str) else {
            return;
        };
        let Some(page) = self
            .sessions
            .lock()
            .expect("sessions lock")
            .get(session)
            .cloned()
        else {
            return;
        };
        let p = &msg["params"];
        let error = match msg["method"].as_str().unwrap_or("") {
            "Page.lifecycleEvent" if p["name"] == "load" => {
                let loader = p["loaderId"].as_str().unwrap_or("").to_string();
                page.loads.lock().expect("loads lock").insert(loader);
                page.loaded.notify_all();
                None
            }
            "Runtime.consoleAPICalled"
                if matches!(p["type"].as_str(), Some("error" | "assert")) =>
            {
                let args: Vec<String> = p["args"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(remote_text)
                    .collect();
                let at = &p["stackTrace"]["callFrames"][0];
                Some(format!(
                    "console.{}: {} ({})",
                    p["type"].as_str().unwrap_or(""),
                    args.join(" "),
                    location(at)
                ))
            }
            "Runtime.exceptionThrown" => {
                let ex = &p["exceptionDetails"];
                let what = ex["exception"]["description"]
                    .as_str()
                    .or(ex["text"].as_str())
                    .unwrap_or("?");
                Some(format!("uncaught: {what} ({})", location(ex)))
            }
            "Log.entryAdded" if p["entry"]["level"] == "error" => {
                let e = &p["entry"];
                Some(format!(
                    "log {}: {} ({})",
                    e["source"].as_str().unwrap_or("?"),
                    e["text"].as_str().unwrap_or(""),
                    location(e)
                ))
            }
            _ => None,
        };
        if let Some(error) = error {
            page.errors.lock().expect("errors lock").push(error);
        }
    }

    /// Sends one command and waits (20 s) for its result; panics naming the method.
    fn call(&self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.try_call(session, method, params, TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_call(
        &self,
        session: Option<&str>,
        method: &str,
        params: Value,
        limit: Duration,
    ) -> Result<Value, String> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            msg["sessionId"] = session.into();
        }
        let (tx, rx) = mpsc::channel();
        let closed = || {
            format!(
                "CDP {method}: the DevTools connection is closed ({})",
                self.closed.lock().map(|c| c.clone()).unwrap_or_default()
            )
        };
        match self.pending.lock().expect("pending lock").as_mut() {
            Some(pending) => pending.insert(id, tx),
            None => return Err(closed()),
        };
        self.outbox.send(msg.to_string()).map_err(|_| closed())?;
        let answer = match rx.recv_timeout(limit) {
            Ok(answer) => answer,
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err(closed()),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some(pending) = self.pending.lock().expect("pending lock").as_mut() {
                    pending.remove(&id);
                }
                return Err(format!("CDP {method}: no answer within {limit:?}"));
            }
        };
        if let Some(error) = answer.get("error") {
            return Err(format!("CDP {method} failed: {error}"));
        }
        Ok(answer.get("result").cloned().unwrap_or(Value::Null))
    }
}

/// A console argument as text: strings as they are, other values as JSON, objects by their
/// description.
fn remote_text(arg: &Value) -> String {
    match (arg.get("value"), arg["description"].as_str()) {
        (Some(Value::String(s)), _) => s.clone(),
        (Some(v), _) => v.to_string(),
        (None, Some(d)) => d.to_string(),
        (None, None) => arg["type"].as_str().unwrap_or("?").to_string(),
    }
}

/// `url:line` of a call frame, exception or log entry (CDP counts lines from 0; this from 1).
fn location(v: &Value) -> String {
    let url = v["url"].as_str().unwrap_or("");
    match v["lineNumber"].as_u64() {
        Some(line) => format!("{url}:{}", line + 1),
        None => url.to_string(),
    }
}
