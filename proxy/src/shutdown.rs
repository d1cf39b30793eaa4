//! Graceful shutdown: one signal for every listener and connection, and a tracker of the work
//! that must drain before the process exits.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;

use crate::timer::RegisteredWaker;

#[derive(Clone, Default)]
pub struct Shutdown {
    signal: CancellationToken,
    tasks: TaskTracker,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts draining: listeners stop accepting, HTTP connections finish in-flight requests.
    pub fn begin(&self) {
        self.signal.cancel();
    }

    pub fn is_draining(&self) -> bool {
        self.signal.is_cancelled()
    }

    /// Ready once draining begins. Cheap to poll again: a connection's task polls it beside its
    /// connection on every wake-up.
    pub fn signaled(&self) -> Signaled<'_> {
        Signaled {
            wait: self.signal.cancelled(),
            token: &self.signal,
            registered: RegisteredWaker::default(),
        }
    }

    /// Connection and request tasks register here so shutdown can wait for them.
    pub fn tracker(&self) -> &TaskTracker {
        &self.tasks
    }

    /// Waits for tracked work, at most `grace`. Returns whether everything drained.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.tasks.close();
        tokio::time::timeout(grace, self.tasks.wait()).await.is_ok()
    }
}

pin_project_lite::pin_project! {
    /// [`Shutdown::signaled`]'s future. Polling the token's own future again takes its waiter
    /// list's lock each time (~170 instructions, twice per HTTP/1 request in `tokio::select!`
    /// beside the connection). Once registered with a waker that wakes the same task, a poll
    /// here is one atomic load: cancelling wakes that waker, and the next poll sees the flag.
    pub struct Signaled<'a> {
        #[pin]
        wait: WaitForCancellationFuture<'a>,
        token: &'a CancellationToken,
        registered: RegisteredWaker,
    }
}

impl Future for Signaled<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.registered.holds(cx) {
            return if this.token.is_cancelled() {
                Poll::Ready(())
            } else {
                Poll::Pending
            };
        }
        let poll = this.wait.poll(cx);
        if poll.is_pending() {
            this.registered.remember(cx);
        }
        poll
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timer::CountingWaker;

    #[test]
    fn signaled_wakes_the_registered_task_once_draining_begins() {
        let shutdown = Shutdown::new();
        let (counter, waker) = CountingWaker::new();
        let mut cx = Context::from_waker(&waker);
        let mut signaled = Box::pin(shutdown.signaled());
        assert!(signaled.as_mut().poll(&mut cx).is_pending());
        // Polled again by the same task: still pending, nothing woken.
        assert!(signaled.as_mut().poll(&mut cx).is_pending());
        assert_eq!(counter.count(), 0);
        shutdown.begin();
        assert_eq!(counter.count(), 1);
        assert!(signaled.as_mut().poll(&mut cx).is_ready());
    }

    #[test]
    fn signaled_follows_a_move_to_another_task() {
        let shutdown = Shutdown::new();
        let (_first, first_waker) = CountingWaker::new();
        let (second, second_waker) = CountingWaker::new();
        let mut signaled = Box::pin(shutdown.signaled());
        assert!(signaled
            .as_mut()
            .poll(&mut Context::from_waker(&first_waker))
            .is_pending());
        assert!(signaled
            .as_mut()
            .poll(&mut Context::from_waker(&second_waker))
            .is_pending());
        shutdown.begin();
        assert_eq!(second.count(), 1);
        assert!(signaled
            .as_mut()
            .poll(&mut Context::from_waker(&second_waker))
            .is_ready());
    }

    #[test]
    fn signaled_after_draining_began_is_ready_at_once() {
        let shutdown = Shutdown::new();
        shutdown.begin();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(Box::pin(shutdown.signaled())
            .as_mut()
            .poll(&mut cx)
            .is_ready());
    }
}
