//! The identity dir, watched: reloaded when its files change, the last good credentials kept
//! when the new ones are broken, expiry warned about. Or credentials fed by code (an identity
//! service client) through a [`CredentialsPublisher`]: readers do not care which.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use tokio::sync::Notify;

use crate::fsutil::{fmt_unix, unix_secs};
use crate::{Credentials, IdentityError, CA_CRT, TLS_CRT, TLS_KEY};

/// Quiet time after a filesystem event before reloading: an issuer replaces three files one
/// after another, and one reload should see all of them.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// A steady stream of events still reloads this often.
const MAX_DEBOUNCE: Duration = Duration::from_secs(1);
/// The fallback re-check (and the expiry check): catches what events miss (some volume
/// mounts, network filesystems) and a not-yet-valid certificate becoming valid.
const RECHECK: Duration = Duration::from_secs(10);
/// Expiry warnings and errors repeat at most this often.
const EXPIRY_LOG_EVERY: Duration = Duration::from_secs(60);
/// Warn this close to expiry at least (or within the last fifth of the lifetime, if longer).
const MIN_EXPIRY_WARNING: i64 = 3600;

/// The current credentials of an identity dir, kept up to date by a background task, or fed
/// by a [`CredentialsPublisher`]. Cheap to clone; every clone sees the same credentials.
#[derive(Clone)]
pub struct IdentityWatcher {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for IdentityWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityWatcher")
            .field("dir", &self.shared.dir)
            .field("current", &self.shared.current.load())
            .finish()
    }
}

struct Shared {
    /// `None` when fed by a publisher.
    dir: Option<PathBuf>,
    /// Always set for a dir (its first load must succeed); a publisher's until it publishes.
    current: ArcSwapOption<Credentials>,
    /// Woken whenever `current` changes.
    changed: Notify,
    /// The last reload's error, until a reload succeeds.
    last_error: ArcSwapOption<String>,
    /// Touched only by the watch task; a mutex so the task can hand it to a blocking thread.
    state: Mutex<ReloadState>,
}

struct ReloadState {
    /// The files as of the last load attempt; unchanged files are not reloaded.
    fingerprint: Fingerprint,
    failed: bool,
    last_expiry_log: Option<Instant>,
}

/// Keeps the watch running; dropping it stops the watch (the credentials stay readable).
#[derive(Debug)]
#[must_use = "dropping the handle stops the watch"]
pub struct IdentityWatchHandle {
    _watcher: Option<notify::RecommendedWatcher>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for IdentityWatchHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone, Copy)]
struct Options {
    fs_events: bool,
    recheck: Duration,
}

impl IdentityWatcher {
    /// Loads the identity dir (an error if it does not load: a proxy must not start without
    /// its identity) and starts watching it; needs a tokio runtime.
    ///
    /// The directory is watched rather than the files, since files are replaced by rename
    /// (and Kubernetes secret mounts swap a symlink). Events are debounced ~100 ms; a
    /// re-check every 10 s catches what events miss.
    pub fn spawn(
        dir: impl AsRef<Path>,
    ) -> Result<(IdentityWatcher, IdentityWatchHandle), IdentityError> {
        Self::spawn_with(
            dir.as_ref(),
            Options {
                fs_events: true,
                recheck: RECHECK,
            },
        )
    }

    fn spawn_with(
        dir: &Path,
        options: Options,
    ) -> Result<(IdentityWatcher, IdentityWatchHandle), IdentityError> {
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| IdentityError::NoRuntime)?;
        let dir = dir.to_path_buf();
        let fingerprint = Fingerprint::of(&dir);
        let creds = Credentials::load(&dir)?;
        tracing::info!(
            dir = %dir.display(),
            identity = %creds.identity(),
            serial = creds.serial(),
            not_after = %fmt_unix(creds.not_after()),
            "identity loaded"
        );
        let shared = Arc::new(Shared {
            dir: Some(dir.clone()),
            current: ArcSwapOption::from_pointee(creds),
            changed: Notify::new(),
            last_error: ArcSwapOption::empty(),
            state: Mutex::new(ReloadState {
                fingerprint,
                failed: false,
                last_expiry_log: None,
            }),
        });
        shared.check_expiry(&mut shared.lock_state(), SystemTime::now());

        let kick = Arc::new(Notify::new());
        let watcher = if options.fs_events {
            start_fs_watcher(&dir, kick.clone())
        } else {
            None
        };
        let task = runtime.spawn(watch_loop(Arc::downgrade(&shared), kick, options.recheck));
        Ok((
            IdentityWatcher { shared },
            IdentityWatchHandle {
                _watcher: watcher,
                task,
            },
        ))
    }

    /// Credentials fed by code rather than read from a dir: none until the publisher's first
    /// [`publish`](CredentialsPublisher::publish). Needs no runtime; the publisher does the
    /// work (and logs), the watcher only hands out the latest.
    pub fn published() -> (IdentityWatcher, CredentialsPublisher) {
        let shared = Arc::new(Shared {
            dir: None,
            current: ArcSwapOption::empty(),
            changed: Notify::new(),
            last_error: ArcSwapOption::empty(),
            state: Mutex::new(ReloadState {
                fingerprint: Fingerprint([None, None, None]),
                failed: false,
                last_expiry_log: None,
            }),
        });
        (
            IdentityWatcher {
                shared: shared.clone(),
            },
            CredentialsPublisher { shared },
        )
    }

    /// The current credentials; lock-free. Take it per handshake: a rotation only changes
    /// what later calls return. Always `Some` for a dir; `None` from a publisher that has not
    /// published yet.
    pub fn current(&self) -> Option<Arc<Credentials>> {
        self.shared.current.load_full()
    }

    /// The current credentials, once there are any (at once for a dir).
    pub async fn wait_current(&self) -> Arc<Credentials> {
        loop {
            // Registered before looking, so a publish in between is not missed.
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(creds) = self.current() {
                return creds;
            }
            notified.await;
        }
    }

    /// Why the last reload failed, while the previous credentials are still in use.
    pub fn last_error(&self) -> Option<Arc<String>> {
        self.shared.last_error.load_full()
    }

    /// The watched dir; `None` for published credentials.
    pub fn dir(&self) -> Option<&Path> {
        self.shared.dir.as_deref()
    }
}

/// Feeds an [`IdentityWatcher`] made by [`IdentityWatcher::published`]. Cheap to clone.
#[derive(Clone)]
pub struct CredentialsPublisher {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for CredentialsPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialsPublisher")
            .field("current", &self.shared.current.load())
            .finish()
    }
}

impl CredentialsPublisher {
    /// Makes `creds` current (new handshakes use them; established ones keep theirs) and
    /// clears the last error.
    pub fn publish(&self, creds: Credentials) {
        self.shared.current.store(Some(Arc::new(creds)));
        self.shared.last_error.store(None);
        self.shared.changed.notify_waiters();
    }

    /// Records why getting new credentials failed; the current ones stay in use.
    pub fn publish_error(&self, error: impl std::fmt::Display) {
        self.shared
            .last_error
            .store(Some(Arc::new(error.to_string())));
    }
}

impl Shared {
    fn lock_state(&self) -> std::sync::MutexGuard<'_, ReloadState> {
        // A panic mid-reload leaves nothing half-updated worth refusing to read.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reloads if the files changed since the last attempt (or that attempt failed: a
    /// not-yet-valid certificate becomes valid with time), then checks expiry.
    fn check(&self) {
        let Some(dir) = &self.dir else { return };
        let mut state = self.lock_state();
        let fingerprint = Fingerprint::of(dir);
        if fingerprint != state.fingerprint || state.failed {
            state.fingerprint = fingerprint;
            match Credentials::load(dir) {
                Ok(creds) => {
                    let old = self.current.load();
                    tracing::info!(
                        dir = %dir.display(),
                        identity = %creds.identity(),
                        serial = creds.serial(),
                        previous_serial = old.as_ref().map(|c| c.serial()),
                        not_after = %fmt_unix(creds.not_after()),
                        "identity reloaded"
                    );
                    self.current.store(Some(Arc::new(creds)));
                    self.changed.notify_waiters();
                    self.last_error.store(None);
                    state.failed = false;
                    // A new certificate gets its own expiry warnings.
                    state.last_expiry_log = None;
                }
                Err(error) => {
                    let message = error.to_string();
                    // The same failure seen again by the re-check is not news.
                    let repeated = self
                        .last_error
                        .load()
                        .as_deref()
                        .is_some_and(|m| *m == message);
                    if !repeated {
                        let current = self.current.load();
                        tracing::error!(
                            dir = %dir.display(),
                            file = ?error.path(),
                            %error,
                            serial = current.as_ref().map(|c| c.serial()),
                            "identity reload failed; keeping the last good credentials"
                        );
                    }
                    self.last_error.store(Some(Arc::new(message)));
                    state.failed = true;
                }
            }
        }
        self.check_expiry(&mut state, SystemTime::now());
    }

    fn check_expiry(&self, state: &mut ReloadState, now: SystemTime) {
        let Some(creds) = self.current.load_full() else {
            return;
        };
        let expiry = expiry(creds.not_before(), creds.not_after(), unix_secs(now));
        if expiry == Expiry::Fine {
            return;
        }
        if state
            .last_expiry_log
            .is_some_and(|t| t.elapsed() < EXPIRY_LOG_EVERY)
        {
            return;
        }
        state.last_expiry_log = Some(Instant::now());
        match expiry {
            Expiry::Fine => {}
            Expiry::Soon { remaining } => tracing::warn!(
                dir = ?self.dir,
                identity = %creds.identity(),
                not_after = %fmt_unix(creds.not_after()),
                remaining_secs = remaining,
                "identity certificate expires soon; re-issue it"
            ),
            Expiry::Expired => tracing::error!(
                dir = ?self.dir,
                identity = %creds.identity(),
                not_after = %fmt_unix(creds.not_after()),
                "identity certificate has expired; peers will refuse it"
            ),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    Fine,
    Soon { remaining: i64 },
    Expired,
}

/// Soon: within the last fifth of the lifetime, or the last hour, whichever is longer.
fn expiry(not_before: i64, not_after: i64, now: i64) -> Expiry {
    let remaining = not_after.saturating_sub(now);
    if remaining < 0 {
        return Expiry::Expired;
    }
    let lifetime = not_after.saturating_sub(not_before).max(0);
    if remaining <= (lifetime / 5).max(MIN_EXPIRY_WARNING) {
        Expiry::Soon { remaining }
    } else {
        Expiry::Fine
    }
}

/// What identifies a version of the three files: inode (renames make new ones), size and
/// mtime, following symlinks. `None` for a file that cannot be stat'ed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint([Option<(u64, u64, Option<SystemTime>)>; 3]);

impl Fingerprint {
    fn of(dir: &Path) -> Fingerprint {
        let stat = |name: &str| {
            let meta = std::fs::metadata(dir.join(name)).ok()?;
            #[cfg(unix)]
            let ino = std::os::unix::fs::MetadataExt::ino(&meta);
            #[cfg(not(unix))]
            let ino = 0;
            Some((ino, meta.len(), meta.modified().ok()))
        };
        Fingerprint([stat(CA_CRT), stat(TLS_CRT), stat(TLS_KEY)])
    }
}

fn start_fs_watcher(dir: &Path, kick: Arc<Notify>) -> Option<notify::RecommendedWatcher> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let handler = move |event: notify::Result<notify::Event>| match event {
        // Reads (our own loads included) change nothing.
        Ok(event) if matches!(event.kind, EventKind::Access(_)) => {}
        Ok(_) => kick.notify_one(),
        Err(error) => {
            tracing::debug!(%error, "identity dir watch error; re-checking to be safe");
            kick.notify_one();
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(error) => {
            tracing::warn!(%error, "cannot create a filesystem watcher; re-checking every 10s only");
            return None;
        }
    };
    match watcher.watch(dir, RecursiveMode::NonRecursive) {
        Ok(()) => Some(watcher),
        Err(error) => {
            tracing::warn!(dir = %dir.display(), %error, "cannot watch the identity dir; re-checking every 10s only");
            None
        }
    }
}

async fn watch_loop(shared: Weak<Shared>, kick: Arc<Notify>, recheck: Duration) {
    let mut tick = tokio::time::interval(recheck);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate, and the dir was just loaded.
    tick.tick().await;
    loop {
        tokio::select! {
            _ = kick.notified() => debounce(&kick).await,
            _ = tick.tick() => {}
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        // File IO and certificate parsing stay off the async workers.
        if let Err(error) = tokio::task::spawn_blocking(move || shared.check()).await {
            tracing::error!(%error, "identity reload task failed");
        }
    }
}

async fn debounce(kick: &Notify) {
    let deadline = tokio::time::Instant::now() + MAX_DEBOUNCE;
    while tokio::time::timeout(DEBOUNCE, kick.notified())
        .await
        .is_ok()
    {
        if tokio::time::Instant::now() >= deadline {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::*;

    /// Polls `cond` every 50 ms for at most `limit`.
    async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if cond() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        cond()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn picks_up_a_reissued_certificate_and_keeps_it_when_the_next_is_garbage() {
        let ca = test_ca("cluster.local");
        let (dir, first) = identity_dir(&ca, "web", "default");
        let (watcher, _handle) = IdentityWatcher::spawn(dir.path()).unwrap();
        assert_eq!(watcher.current().unwrap().serial(), first.serial);
        let config_before = watcher.current().unwrap().server_config();

        let second = ca.issue("web", "default", day()).unwrap();
        assert_ne!(second.serial, first.serial);
        second.write(dir.path()).unwrap();
        assert!(
            eventually(Duration::from_secs(5), || watcher
                .current()
                .unwrap()
                .serial()
                == second.serial)
            .await,
            "re-issued certificate not picked up"
        );
        assert!(watcher.last_error().is_none());
        // New handshakes get a new config; the old one (held by live connections) is intact.
        assert!(!Arc::ptr_eq(
            &config_before,
            &watcher.current().unwrap().server_config()
        ));

        crate::fsutil::write_atomic(&dir.path().join(TLS_CRT), b"garbage", 0o644).unwrap();
        assert!(
            eventually(Duration::from_secs(5), || watcher.last_error().is_some()).await,
            "garbage not noticed"
        );
        let error = watcher.last_error().unwrap();
        assert!(error.contains("tls.crt"), "{error}");
        assert_eq!(watcher.current().unwrap().serial(), second.serial);

        // Fixed again: picked up, error cleared.
        let third = ca.issue("web", "default", day()).unwrap();
        third.write(dir.path()).unwrap();
        assert!(
            eventually(Duration::from_secs(5), || watcher
                .current()
                .unwrap()
                .serial()
                == third.serial)
            .await
        );
        assert!(watcher.last_error().is_none());
    }

    #[tokio::test]
    async fn the_periodic_recheck_alone_picks_up_changes() {
        let ca = test_ca("cluster.local");
        let (dir, _) = identity_dir(&ca, "web", "default");
        let options = Options {
            fs_events: false,
            recheck: Duration::from_millis(100),
        };
        let (watcher, _handle) = IdentityWatcher::spawn_with(dir.path(), options).unwrap();
        let next = ca.issue("web", "default", day()).unwrap();
        next.write(dir.path()).unwrap();
        assert!(
            eventually(Duration::from_secs(5), || watcher
                .current()
                .unwrap()
                .serial()
                == next.serial)
            .await
        );
    }

    #[tokio::test]
    async fn the_initial_load_must_succeed() {
        let dir = tempfile::tempdir().unwrap();
        match IdentityWatcher::spawn(dir.path()) {
            Err(IdentityError::Missing { .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn spawning_without_a_runtime_is_an_error() {
        let ca = test_ca("cluster.local");
        let (dir, _) = identity_dir(&ca, "web", "default");
        assert!(matches!(
            IdentityWatcher::spawn(dir.path()),
            Err(IdentityError::NoRuntime)
        ));
    }

    #[tokio::test]
    async fn published_credentials_start_empty_and_follow_the_publisher() {
        let ca = test_ca("cluster.local");
        let (dir, first) = identity_dir(&ca, "web", "default");
        let (watcher, publisher) = IdentityWatcher::published();
        assert!(watcher.current().is_none());
        assert!(watcher.dir().is_none());

        // Waiting starts before anything is published and ends when something is.
        let waiting = tokio::spawn({
            let watcher = watcher.clone();
            async move { watcher.wait_current().await.serial().to_owned() }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        publisher.publish(Credentials::load(dir.path()).unwrap());
        let serial = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("waiter woken")
            .unwrap();
        assert_eq!(serial, first.serial);

        // A failure is reported while the credentials stay; the next publish clears it.
        publisher.publish_error("identity service unavailable");
        assert_eq!(
            watcher.last_error().as_deref().map(String::as_str),
            Some("identity service unavailable")
        );
        assert_eq!(watcher.current().unwrap().serial(), first.serial);
        let second = ca.issue("web", "default", day()).unwrap();
        second.write(dir.path()).unwrap();
        publisher.publish(Credentials::load(dir.path()).unwrap());
        assert!(watcher.last_error().is_none());
        assert_eq!(watcher.wait_current().await.serial(), second.serial);
    }

    #[test]
    fn expiry_warns_in_the_last_fifth_or_hour() {
        let day = 86_400;
        // A 1-day certificate: warned in its last 4.8 hours.
        assert_eq!(expiry(0, day, 0), Expiry::Fine);
        assert_eq!(expiry(0, day, day - day / 5 - 1), Expiry::Fine);
        assert_eq!(
            expiry(0, day, day - day / 5),
            Expiry::Soon { remaining: day / 5 }
        );
        assert_eq!(expiry(0, day, day), Expiry::Soon { remaining: 0 });
        assert_eq!(expiry(0, day, day + 1), Expiry::Expired);
        // A 2-hour certificate: the hour floor wins over 24 minutes.
        assert_eq!(expiry(0, 7200, 3599), Expiry::Fine);
        assert_eq!(expiry(0, 7200, 3600), Expiry::Soon { remaining: 3600 });
        // Nonsense windows do not overflow.
        assert_eq!(expiry(i64::MAX, i64::MIN, 0), Expiry::Expired);
        assert_eq!(expiry(i64::MIN, i64::MAX, 0), Expiry::Fine);
    }
}
