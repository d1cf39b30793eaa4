//! Graceful shutdown: one signal for every listener and connection, and a tracker of the work
//! that must drain before the process exits.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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

    pub async fn signaled(&self) {
        self.signal.cancelled().await
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
