//! `TaskTimer`: a timer that one task polls on every wake-up, beside the work it watches (an
//! HTTP/1 connection's idle and head timer, an h2 connection's keep-alive). A `Sleep`'s poll
//! registers the task's waker again each time (~60 instructions, once or twice per request);
//! once the sleep holds this task's waker, a poll here only reads whether it fired.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Waker};
use std::time::Duration;

use tokio::time::Sleep;

pub struct TaskTimer {
    sleep: Pin<Box<Sleep>>,
    /// The waker the sleep holds, until it fires or is reset (either lets it go).
    registered: RegisteredWaker,
}

/// The waker a future inside was last polled with (and so holds), for a wrapper that skips
/// polling it again while the same task asks and a cheap check says nothing has happened: a
/// `TaskTimer`'s sleep, the shutdown signal's token.
#[derive(Default)]
pub struct RegisteredWaker(Option<Waker>);

impl RegisteredWaker {
    /// Whether the future inside holds a waker that wakes `cx`'s task.
    pub fn holds(&self, cx: &Context<'_>) -> bool {
        self.0.as_ref().is_some_and(|w| w.will_wake(cx.waker()))
    }

    /// The future inside was polled with `cx` and is pending: it holds `cx`'s waker now.
    pub fn remember(&mut self, cx: &Context<'_>) {
        if !self.holds(cx) {
            self.0 = Some(cx.waker().clone());
        }
    }

    /// The future inside let its waker go (it fired, or was reset).
    pub fn forget(&mut self) {
        self.0 = None;
    }
}

impl TaskTimer {
    pub fn new(after: Duration) -> Self {
        Self {
            sleep: Box::pin(tokio::time::sleep(after)),
            registered: RegisteredWaker::default(),
        }
    }

    /// Re-arms the timer to fire `after` from now.
    pub fn reset(&mut self, after: Duration) {
        self.sleep
            .as_mut()
            .reset(tokio::time::Instant::now() + after);
        self.registered.forget();
    }

    /// Whether the timer has fired; if not, this task is woken when it does.
    pub fn poll_fired(&mut self, cx: &mut Context<'_>) -> bool {
        if self.registered.holds(cx) && !self.sleep.is_elapsed() {
            return false;
        }
        if self.sleep.as_mut().poll(cx).is_ready() {
            self.registered.forget();
            return true;
        }
        self.registered.remember(cx);
        false
    }
}

/// A waker that counts its wake-ups, for tests of futures that keep a task's waker.
#[cfg(test)]
pub(crate) struct CountingWaker(std::sync::atomic::AtomicUsize);

#[cfg(test)]
impl CountingWaker {
    /// The counter, and a waker that bumps it.
    pub(crate) fn new() -> (std::sync::Arc<Self>, Waker) {
        let counter = std::sync::Arc::new(Self(Default::default()));
        (counter.clone(), Waker::from(counter))
    }

    pub(crate) fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[cfg(test)]
impl std::task::Wake for CountingWaker {
    fn wake(self: std::sync::Arc<Self>) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn fires_once_per_arming_and_wakes_its_task() {
        let (wakes, waker) = CountingWaker::new();
        let mut cx = Context::from_waker(&waker);
        let mut timer = TaskTimer::new(Duration::from_secs(1));
        assert!(!timer.poll_fired(&mut cx));
        // Polled again by the same task before it fires: nothing has happened.
        assert!(!timer.poll_fired(&mut cx));
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(!timer.poll_fired(&mut cx));
        tokio::time::advance(Duration::from_millis(1)).await;
        tokio::task::yield_now().await;
        assert_eq!(wakes.count(), 1);
        assert!(timer.poll_fired(&mut cx));

        // Re-armed, it waits its whole period again and wakes the task again.
        timer.reset(Duration::from_secs(2));
        assert!(!timer.poll_fired(&mut cx));
        tokio::time::advance(Duration::from_millis(1999)).await;
        assert!(!timer.poll_fired(&mut cx));
        tokio::time::advance(Duration::from_millis(1)).await;
        tokio::task::yield_now().await;
        assert_eq!(wakes.count(), 2);
        assert!(timer.poll_fired(&mut cx));
    }

    #[tokio::test(start_paused = true)]
    async fn follows_a_new_waker() {
        let (first, first_waker) = CountingWaker::new();
        let (second, second_waker) = CountingWaker::new();
        let mut timer = TaskTimer::new(Duration::from_secs(1));
        assert!(!timer.poll_fired(&mut Context::from_waker(&first_waker)));
        assert!(!timer.poll_fired(&mut Context::from_waker(&second_waker)));
        tokio::time::advance(Duration::from_secs(1)).await;
        tokio::task::yield_now().await;
        assert_eq!(second.count(), 1);
        assert_eq!(first.count(), 0);
        assert!(timer.poll_fired(&mut Context::from_waker(&second_waker)));
    }
}
