//! Child processes the bench starts (the app and every proxy): each in its own process group,
//! optionally pinned with `taskset`, output to a log file in the run's temp dir, and killed with
//! its whole group when dropped, so nothing outlives the bench.

use std::collections::HashSet;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A started child process.
pub struct Managed {
    pub name: String,
    child: Child,
    log: PathBuf,
    /// Waited for already: its process group may be another's by now.
    reaped: bool,
}

impl Managed {
    /// Starts `program args` with stdout and stderr to `log_dir/<name>.log`, pinned to `cpus`
    /// (a `taskset -c` list) when given.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        envs: &[(&str, &str)],
        cpus: Option<&str>,
        log_dir: &Path,
    ) -> Result<Managed> {
        let log = log_dir.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("duplicating the log file handle")?;
        let mut cmd = match cpus {
            Some(cpus) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpus).arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        // The children must not pick up a developer's PYLON_* settings (access logs, threads).
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PYLON_") {
                cmd.env_remove(key);
            }
        }
        for (k, v) in envs {
            cmd.env(k, v);
        }
        // SAFETY: prctl is async-signal-safe and allocates nothing; it runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        Ok(Managed {
            name: name.to_owned(),
            child,
            log,
            reaped: false,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the tail of its log if the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait().context("polling a child")? {
            bail!(
                "{} exited ({status}); its log ends:\n{}",
                self.name,
                self.log_tail()
            );
        }
        Ok(())
    }

    pub fn log_tail(&self) -> String {
        match std::fs::read_to_string(&self.log) {
            Ok(text) => {
                let lines: Vec<&str> = text.lines().collect();
                let from = lines.len().saturating_sub(15);
                lines[from..].join("\n")
            }
            Err(e) => format!("(cannot read {}: {e})", self.log.display()),
        }
    }
}

impl Managed {
    /// SIGTERM to its group, up to `grace` for it to exit, then SIGKILL to what is left (nginx
    /// workers, a stuck process). Whether it exited on its own.
    fn terminate(&mut self, grace: Duration) -> bool {
        if self.reaped {
            return true;
        }
        self.reaped = true;
        let Ok(pgid) = i32::try_from(self.child.id()) else {
            return false;
        };
        // SAFETY: killpg only sends a signal to the group we created for this child.
        unsafe {
            libc::killpg(pgid, libc::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        let mut exited = false;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                exited = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above.
        unsafe {
            libc::killpg(pgid, libc::SIGKILL);
        }
        let _ = self.child.wait();
        exited
    }

    /// Stops it with SIGTERM and fails, with the tail of its log, if it did not exit within
    /// `grace` (a process that must finish its work on the way out: an instrumented proxy writes
    /// its counts as it exits).
    pub fn stop(mut self, grace: Duration) -> Result<()> {
        if !self.terminate(grace) {
            bail!(
                "{} did not exit within {grace:?} of SIGTERM; its log ends:\n{}",
                self.name,
                self.log_tail()
            );
        }
        Ok(())
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        self.terminate(Duration::from_secs(2));
    }
}

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A free loopback address (bound then released), never the same port twice in a run.
pub fn free_addr() -> Result<SocketAddr> {
    for _ in 0..100 {
        let listener =
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding a free loopback port")?;
        let addr = listener.local_addr().context("reading a bound port")?;
        let mut handed = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
        if handed.get_or_insert_with(HashSet::new).insert(addr.port()) {
            return Ok(addr);
        }
    }
    bail!("no fresh loopback port after 100 tries")
}

/// Finds an executable: `name` if it is a path, else in `/usr/sbin`, `/usr/bin`, then `$PATH`.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let given = Path::new(name);
    if given.components().count() > 1 {
        return given.is_file().then(|| given.to_path_buf());
    }
    let mut dirs = vec![PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// Runs a command to completion and returns stdout and stderr together (version strings).
pub fn output_of(program: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {}", program.display()))?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!(
            "{} {:?} failed ({}): {}",
            program.display(),
            args,
            out.status,
            text.trim()
        );
    }
    Ok(text)
}

/// Pins the calling thread (and threads it creates later) to `cpus`, e.g. `[0]`.
pub fn pin_self(cpus: &[usize]) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write inside it; sched_setaffinity reads
    // it for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        for &cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error()).context("sched_setaffinity");
        }
    }
    Ok(())
}

/// Raises RLIMIT_NOFILE (soft, and hard when allowed) to `want`; returns the soft limit now in
/// force. Children inherit it.
pub fn raise_nofile(want: u64) -> Result<u64> {
    // SAFETY: getrlimit/setrlimit read and write the struct we own.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
        }
        let mut new = lim;
        new.rlim_max = lim.rlim_max.max(want);
        new.rlim_cur = want;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &new) != 0 {
            // Not root: go as high as the hard limit allows.
            new.rlim_max = lim.rlim_max;
            new.rlim_cur = want.min(lim.rlim_max);
            if libc::setrlimit(libc::RLIMIT_NOFILE, &new) != 0 {
                return Err(std::io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
            }
        }
        Ok(new.rlim_cur)
    }
}
