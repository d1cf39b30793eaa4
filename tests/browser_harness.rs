//! The browser harness (`tests/blocking/browser.rs`) against a real headless Chromium and two
//! tiny pages served from loopback: navigation, eval, waits, clicks, Enter, screenshots, and
//! the console errors it records (for the page that makes some, not for the one that does not).

use std::net::{SocketAddr, TcpListener};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::thread;
use std::time::Duration;

mod blocking;
use blocking::*;

#[path = "blocking/browser.rs"]
mod browser;
use browser::Browser;

/// A button that adds an item to a list, and a div that is not keyboard accessible.
const CLEAN: &str = r#"<!doctype html>
<html><head><title>harness</title><link rel="icon" href="data:,"></head>
<body>
<button id="add">Add</button>
<div id="inert" onclick="void 0">not focusable</div>
<ul id="list"></ul>
<script>
document.getElementById('add').addEventListener('click', () => {
  const li = document.createElement('li');
  li.className = 'added';
  li.textContent = 'item ' + (document.querySelectorAll('li.added').length + 1);
  document.getElementById('list').appendChild(li);
});
</script>
</body></html>"#;

/// A console error, an uncaught exception and a failed image load.
const BROKEN: &str = r#"<!doctype html>
<html><head><title>broken</title><link rel="icon" href="data:,"></head>
<body>
<img src="/missing.png" alt="">
<script>console.error("boom");</script>
<script>throw new Error("bang");</script>
</body></html>"#;

/// Serves `/` (CLEAN) and `/broken` (BROKEN); 404 to anything else.
fn serve_pages() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the page server");
    let addr = listener.local_addr().expect("addr");
    thread::spawn(move || {
        for conn in listener.incoming().map_while(Result::ok) {
            thread::spawn(move || {
                serve_requests(conn, |req| {
                    let (status, body) = match req.path.as_str() {
                        "/" => ("200 OK", CLEAN),
                        "/broken" => ("200 OK", BROKEN),
                        _ => ("404 Not Found", "not found"),
                    };
                    format!(
                        "HTTP/1.1 {status}\r\ncontent-type: text/html; charset=utf-8\r\n\
                         content-length: {}\r\n\r\n{body}",
                        body.len()
                    )
                })
            });
        }
    });
    addr
}

/// The message of the panic `f` raises (not printed: it is expected).
fn panic_message(f: impl FnOnce()) -> String {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = catch_unwind(AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    let err = result.expect_err("a panic");
    err.downcast_ref::<String>()
        .cloned()
        .or_else(|| err.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

#[test]
fn drives_a_real_chromium() {
    let addr = serve_pages();
    let browser = Browser::launch();
    let page = browser.new_page();

    page.goto(&format!("http://{addr}/"));
    assert_eq!(page.eval("document.title"), "harness");
    assert_eq!(
        page.eval("new Promise(r => setTimeout(() => r(6 * 7), 50))"),
        42
    );
    assert_eq!(page.eval("undefined"), serde_json::Value::Null);
    assert_eq!(
        page.eval("[innerWidth, innerHeight]"),
        serde_json::json!([1280, 900])
    );

    page.click("#add");
    let first = page.wait_for(
        "document.querySelector('li.added')?.textContent",
        "the item the click adds",
    );
    assert_eq!(first, "item 1");
    page.press_enter("#add");
    let count = page.wait_for(
        "document.querySelectorAll('li.added').length === 2 && 2",
        "the item Enter on the focused button adds",
    );
    assert_eq!(count, 2);

    // Failures say what failed.
    let threw = panic_message(|| drop(page.eval("null.x")));
    assert!(threw.contains("TypeError"), "{threw}");
    let missing = panic_message(|| page.click("#nope"));
    assert!(missing.contains("#nope"), "{missing}");
    let inert = panic_message(|| page.press_enter("#inert"));
    assert!(inert.contains("cannot take the focus"), "{inert}");
    let waited = panic_message(|| {
        drop(page.wait_for_within(Duration::from_millis(300), "window.never", "never"))
    });
    assert!(waited.contains("waiting for never"), "{waited}");

    assert_eq!(
        page.console_errors(),
        Vec::<String>::new(),
        "the clean page"
    );

    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots/browser_harness");
    let png = dir.join("clean.png");
    let _ = std::fs::remove_file(&png);
    page.screenshot(&png);
    let bytes = std::fs::read(&png).expect("the screenshot");
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is no PNG",
        png.display()
    );
    // The IHDR chunk: width and height, big-endian.
    assert_eq!(
        bytes[16..24],
        [0, 0, 5, 0, 0, 0, 3, 132],
        "a 1280x900 screenshot"
    );

    let refused = free_addr();
    let failed = panic_message(|| page.goto(&format!("http://{refused}/")));
    assert!(failed.contains("ERR_CONNECTION_REFUSED"), "{failed}");
    page.goto(&format!("http://{addr}/#again"));
    page.goto(&format!("http://{addr}/#again-and-again"));
    assert_eq!(page.eval("location.hash"), "#again-and-again");
    assert_eq!(
        page.console_errors(),
        Vec::<String>::new(),
        "the clean page"
    );

    page.goto(&format!("http://{addr}/broken"));
    let has = |needle: &str| page.console_errors().iter().any(|e| e.contains(needle));
    for _ in 0..100 {
        if has("boom") && has("bang") && has("404") {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let errors = page.console_errors();
    assert!(
        has("console.error: boom") && has("uncaught: Error: bang") && has("404"),
        "the broken page's console error, exception and failed load: {errors:#?}"
    );
    eprintln!("recorded: {errors:#?}");
}
