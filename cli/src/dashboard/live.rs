//! The tap page's stream: `pylon tap`'s proxies, plan and lines ([`crate::tap`]), sent to the
//! browser as server-sent events, with `pylon top`'s table of the busiest paths beside them.
//!
//! A page is a slow reader on a busy mesh, so nothing here waits on it: events go through a
//! bounded queue and those it has no room for are dropped and counted (the page is told in
//! the `top` events); each proxy samples at most `MAX_RPS` requests a second; and at most
//! [`MAX_TAPS`] pages tap at once. The proxies' streams close when the page goes.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::Event;
use futures_util::stream::Stream;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::flags::TapSource;
use crate::stat::resource::Resource;
use crate::tap::event::{Kind as EventKind, Line};
use crate::tap::select::{Filters, Plan, Selector};
use crate::tap::top::{self, Paths, SortBy};

/// Taps open at once (each holds a stream on every proxy it taps).
pub const MAX_TAPS: usize = 8;
/// Requests each proxy samples per second for one page.
const MAX_RPS: u32 = 100;
/// Events waiting for a slow page before new ones are dropped.
const QUEUE: usize = 512;
/// How often at most the top table is sent (after a request ends), and how many of its rows.
const TOP_EVERY: Duration = Duration::from_millis(250);
const TOP_ROWS: usize = 50;

/// The tap page's query: `pylon tap`'s RESOURCE, `--to`, `--from`, `-n` and filters.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct TapQuery {
    pub resource: Option<String>,
    pub to: Option<String>,
    pub from: Option<String>,
    pub namespace: Option<String>,
    pub method: Option<String>,
    pub path: Option<String>,
    pub authority: Option<String>,
}

/// Counts the open taps; a [`TapSlot`] gives its place back when dropped.
#[derive(Default)]
pub struct TapSlots(AtomicUsize);

pub struct TapSlot(Arc<TapSlots>);

impl TapSlots {
    pub fn take(self: &Arc<Self>) -> Option<TapSlot> {
        let taken = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_TAPS).then_some(n + 1)
            });
        taken.ok().map(|_| TapSlot(self.clone()))
    }
}

impl Drop for TapSlot {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn blank(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// The plan `pylon tap RESOURCE --to ... -n ...` would make; every workload's proxies when no
/// resource is given.
pub fn plan(q: &TapQuery) -> Result<Plan, String> {
    let res = Resource::parse(blank(&q.resource).unwrap_or("deployment"))?;
    let to = blank(&q.to).map(Resource::parse_to).transpose()?;
    let from = blank(&q.from).map(Resource::parse_from).transpose()?;
    if to.is_some() && from.is_some() {
        return Err("give to or from, not both".into());
    }
    let filters = Filters {
        authority: blank(&q.authority),
        method: blank(&q.method),
        path: blank(&q.path),
    };
    Plan::new(
        &res,
        to.as_ref(),
        from.as_ref(),
        &filters,
        blank(&q.namespace),
    )
}

fn json_event(name: &str, data: &serde_json::Value) -> Event {
    Event::default().event(name).data(data.to_string())
}

/// The events of one page's tap, until the page goes (the stream is dropped).
pub fn stream(
    source: TapSource,
    plan: Plan,
    slot: TapSlot,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let (tx, rx) = mpsc::channel::<Event>(QUEUE);
    tokio::spawn(async move {
        let _slot = slot;
        if let Err(message) = run(&source, plan, &tx).await {
            let _ = tx
                .send(json_event(
                    "error",
                    &serde_json::json!({ "message": message }),
                ))
                .await;
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|ev| (Ok(ev), rx))
    })
}

async fn run(source: &TapSource, plan: Plan, tx: &mpsc::Sender<Event>) -> Result<(), String> {
    let (targets, mesh) = crate::tap::targets(source, &[], &plan)
        .await
        .map_err(|e| e.to_string())?;
    let streams = crate::tap::observe_all(&targets, &plan.matcher, 0, MAX_RPS)
        .await
        .map_err(|e| e.to_string())?;
    let ready = serde_json::json!({
        "proxies": targets.len(),
        "description": targets.iter().map(ToString::to_string).collect::<Vec<_>>(),
    });
    if tx.send(json_event("ready", &ready)).await.is_err() {
        return Ok(());
    }
    let mut selector = Selector::new(plan, mesh);
    let mut paths = Paths::default();
    let mut dropped = 0u64;
    let mut top_at: Option<Instant> = None;
    let mut sink = |i: usize, ev| {
        let Some(mut line) = Line::from_event(&ev) else {
            return Ok(true);
        };
        if selector.keep(i, &ev, &line).is_none() {
            return Ok(true);
        }
        paths.observe(i, &line, None);
        // A stream id is the proxy's own: the page keys rows by proxy too.
        line.id = format!("{i}/{}", line.id);
        let data = serde_json::to_value(&line).unwrap_or_default();
        match tx.try_send(json_event("tap", &data)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => dropped += 1,
            Err(mpsc::error::TrySendError::Closed(_)) => return Ok(false),
        }
        // The table changes when a request ends.
        let ended = line.kind == Some(EventKind::End);
        if ended && top_at.is_none_or(|at| at.elapsed() >= TOP_EVERY) {
            top_at = Some(Instant::now());
            let rows = top::json_rows(&paths, SortBy::Count, TOP_ROWS);
            let top = serde_json::json!({ "rows": rows, "dropped": dropped });
            if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(json_event("top", &top))
            {
                return Ok(false);
            }
        }
        Ok(true)
    };
    crate::tap::run_streams(&targets, streams, None, tx.closed(), &mut sink)
        .await
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_query_is_read_as_pylon_tap_reads_its_flags() {
        let q = |resource: &str, to: &str| TapQuery {
            resource: Some(resource.into()),
            to: Some(to.into()),
            namespace: Some("shop".into()),
            ..TapQuery::default()
        };
        let p = plan(&q("deployment/web", "deployment/api")).expect("an edge's tap");
        assert_eq!(p.side, Some(crate::tap::select::OUTBOUND));
        assert_eq!(p.namespace.as_deref(), Some("shop"));
        let p = plan(&TapQuery::default()).expect("everything");
        assert!(p.to.is_none() && p.side.is_none());
        let err = plan(&q("svc/web", "deployment/api")).expect_err("a service sends nothing");
        assert!(err.contains("not a workload"), "{err}");
        let err = plan(&TapQuery {
            path: Some("x".into()),
            ..TapQuery::default()
        })
        .expect_err("a path prefix starts with /");
        assert!(err.contains("--path"), "{err}");
    }

    #[test]
    fn slots_are_bounded_and_given_back() {
        let slots = Arc::new(TapSlots::default());
        let taken: Vec<TapSlot> = (0..MAX_TAPS).filter_map(|_| slots.take()).collect();
        assert_eq!(taken.len(), MAX_TAPS);
        assert!(slots.take().is_none());
        drop(taken);
        assert!(slots.take().is_some());
    }
}
