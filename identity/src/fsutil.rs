//! Reading and writing identity files, with errors that name the file.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::IdentityError;

/// Identity files are a few KiB; anything much bigger is not one (and not worth reading).
const MAX_FILE_BYTES: u64 = 1 << 20;

pub(crate) fn read(path: &Path) -> Result<Vec<u8>, IdentityError> {
    let unreadable = |source| IdentityError::Unreadable {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::metadata(path) {
        Ok(meta) if meta.len() > MAX_FILE_BYTES => {
            return Err(unreadable(io::Error::other(format!(
                "{} bytes is too large for an identity file",
                meta.len()
            ))))
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(IdentityError::Missing {
                path: path.to_path_buf(),
            })
        }
        Err(e) => return Err(unreadable(e)),
    }
    match std::fs::read(path) {
        Ok(bytes) => Ok(bytes),
        // Replaced between the two calls: as good as missing for this attempt.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(IdentityError::Missing {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(unreadable(e)),
    }
}

pub(crate) fn read_string(path: &Path) -> Result<String, IdentityError> {
    String::from_utf8(read(path)?).map_err(|_| IdentityError::NotPem {
        path: path.to_path_buf(),
        what: "file",
        reason: "not UTF-8 text".into(),
    })
}

/// Every `CERTIFICATE` block of a PEM file, in order; at least one.
pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let bytes = read(path)?;
    let not_pem = |reason: String| IdentityError::NotPem {
        path: path.to_path_buf(),
        what: "certificate",
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| not_pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(not_pem("no CERTIFICATE block".into()));
    }
    Ok(certs)
}

/// The first private key block (`PRIVATE KEY`, `EC PRIVATE KEY` or `RSA PRIVATE KEY`).
pub(crate) fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, IdentityError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| IdentityError::NotPem {
        path: path.to_path_buf(),
        what: "private key",
        reason: match e {
            rustls_pki_types::pem::Error::NoItemsFound => "no PRIVATE KEY block".into(),
            other => other.to_string(),
        },
    })
}

/// Writes `path` so that a reader sees the old file or the new one, never half of one: the
/// bytes go to a temp file in the same dir (same filesystem), are synced, and the temp file
/// is renamed over `path`. The mode is set at creation, so a key is never world-readable.
pub(crate) fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), IdentityError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let write_err = |source| IdentityError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| write_err(io::Error::other("no file name")))?;
    // A leading dot: a watcher of the dir can tell temp files from real ones.
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        file_name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
        #[cfg(not(unix))]
        let _ = mode;
        let mut file = options.open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(write_err(e));
    }
    // The rename is durable once the dir is synced; best effort (not every fs allows it).
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

pub(crate) fn create_dir(dir: &Path) -> Result<(), IdentityError> {
    std::fs::create_dir_all(dir).map_err(|source| IdentityError::Write {
        path: dir.to_path_buf(),
        source,
    })
}

/// Seconds since the epoch (negative before it), sub-seconds dropped as X.509 drops them.
pub(crate) fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => {
            let before = e.duration();
            // Round towards the past, as truncation does after the epoch.
            let secs = i64::try_from(before.as_secs()).unwrap_or(i64::MAX);
            if before.subsec_nanos() > 0 {
                -secs - 1
            } else {
                -secs
            }
        }
    }
}

/// RFC 3339 in UTC, e.g. `2025-06-01T12:00:00Z`; the raw number if out of range.
pub(crate) fn fmt_unix(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("unix time {secs}"))
}
