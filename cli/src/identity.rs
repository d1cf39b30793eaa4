//! `pylon identity init-ca` and `pylon identity issue`: a mesh CA and workload certificates
//! on disk, for a proxy's `ca.crt`/`tls.crt`/`tls.key` identity dir.
//!
//! The work is [`pylon_identity::ca`]'s; this module owns the flags, the duration syntax
//! (Go-style plus whole days, `7d`) and what is printed. Exit codes: 0 written, 1 not (the
//! reason on stderr), 2 a bad command line (clap's).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use pylon_identity::{ca, format_unix_time};

#[derive(Args, Debug)]
pub struct IdentityArgs {
    #[command(subcommand)]
    command: IdentityCommand,
}

#[derive(Subcommand, Debug)]
enum IdentityCommand {
    /// Create a CA: a self-signed trust anchor (ca.crt, ca.key) and an intermediate issuer
    /// (issuer.crt, issuer.key) signed by it, ECDSA P-256.
    InitCa(InitCaArgs),

    /// Issue a workload certificate (tls.crt, tls.key, and the anchor as ca.crt) for a
    /// service account, signed by the CA's issuer. Re-issuing into the same dir rotates it.
    Issue(IssueArgs),
}

#[derive(Args, Debug)]
struct InitCaArgs {
    /// The mesh's trust domain, the last part of every identity name.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,

    /// Where to write the CA files (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,

    /// How long the CA is valid: 8760h, 30d, 90m...
    #[arg(long, default_value = "8760h", value_parser = parse_validity)]
    valid_for: Duration,

    /// Replace a CA already in DIR (every certificate it issued stops being trusted).
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
struct IssueArgs {
    /// The CA dir written by `pylon identity init-ca`.
    #[arg(long, value_name = "DIR")]
    ca: PathBuf,

    /// The workload's service account.
    #[arg(long, value_name = "NAME")]
    sa: String,

    /// The workload's namespace.
    #[arg(long, short = 'n', value_name = "NS")]
    namespace: String,

    /// Where to write the identity files (created if missing): the proxy's identity dir.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,

    /// How long the certificate is valid (cut to the CA's own expiry): 24h, 30m, 7d...
    #[arg(long, default_value = "24h", value_parser = parse_validity)]
    valid_for: Duration,
}

pub fn run(args: IdentityArgs) -> ExitCode {
    let (verb, result) = match args.command {
        IdentityCommand::InitCa(args) => ("init-ca", init_ca(args)),
        IdentityCommand::Issue(args) => ("issue", issue(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pylon identity {verb}: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_ca(args: InitCaArgs) -> Result<(), String> {
    if !args.force {
        // Overwriting a CA orphans everything it issued; make that a deliberate act.
        if let Some(existing) = [pylon_identity::CA_CRT, pylon_identity::CA_KEY]
            .iter()
            .map(|f| args.out.join(f))
            .find(|p| p.exists())
        {
            return Err(format!(
                "{} already exists; pass --force to replace the CA",
                existing.display()
            ));
        }
    }
    let summary =
        ca::init_ca(&args.trust_domain, &args.out, args.valid_for).map_err(|e| e.to_string())?;
    println!(
        "CA for trust domain {} in {}, valid until {}",
        summary.trust_domain,
        args.out.display(),
        format_unix_time(summary.not_after)
    );
    print_files(&summary.files);
    println!(
        "next: pylon identity issue --ca {} --sa NAME --namespace NS --out DIR",
        args.out.display()
    );
    Ok(())
}

fn issue(args: IssueArgs) -> Result<(), String> {
    if !args.ca.is_dir() {
        return Err(format!(
            "CA dir {} does not exist (make one with `pylon identity init-ca --out DIR`)",
            args.ca.display()
        ));
    }
    let (issued, files) = ca::issue(
        &args.ca,
        &args.sa,
        &args.namespace,
        &args.out,
        args.valid_for,
    )
    .map_err(|e| e.to_string())?;
    println!("identity {}", issued.identity);
    println!("spiffe   {}", issued.identity.spiffe_id());
    println!(
        "valid    {} .. {}",
        format_unix_time(issued.not_before),
        format_unix_time(issued.not_after)
    );
    println!("serial   {}", issued.serial);
    print_files(&files);
    Ok(())
}

fn print_files(files: &[PathBuf]) {
    for file in files {
        println!("wrote {}", file_label(file));
    }
}

fn file_label(path: &Path) -> String {
    let secret = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(".key"));
    if secret {
        format!("{} (private key, mode 0600)", path.display())
    } else {
        path.display().to_string()
    }
}

/// Go-style durations (`24h`, `30m`, `90s`, `1h30m`), optionally led by whole days (`7d`,
/// `1d12h`), which certificate lifetimes want and Go's syntax lacks. Zero is refused.
fn parse_validity(s: &str) -> Result<Duration, String> {
    const MAX_DAYS: u64 = 100 * 366;
    let s = s.trim();
    let (days, rest) = match s.split_once('d') {
        Some((days, rest)) => {
            let days: u64 = days
                .parse()
                .map_err(|_| format!("invalid duration {s:?}: expected e.g. 24h, 30m, 90s, 7d"))?;
            if days > MAX_DAYS {
                return Err(format!("invalid duration {s:?}: more than {MAX_DAYS} days"));
            }
            (days, rest)
        }
        None => (0, s),
    };
    let rest = if rest.is_empty() {
        Duration::ZERO
    } else {
        pylon_proxy_policy::duration::parse(rest).map_err(|e| e.to_string())?
    };
    let total = Duration::from_secs(days * 86_400) + rest;
    if total.is_zero() {
        return Err(format!("invalid duration {s:?}: must be more than zero"));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity_durations() {
        let h = 3600;
        assert_eq!(parse_validity("24h"), Ok(Duration::from_secs(24 * h)));
        assert_eq!(parse_validity("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_validity("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_validity("7d"), Ok(Duration::from_secs(7 * 24 * h)));
        assert_eq!(parse_validity("1d12h"), Ok(Duration::from_secs(36 * h)));
        assert_eq!(parse_validity("8760h"), Ok(Duration::from_secs(8760 * h)));
        for bad in [
            "",
            "0",
            "0d",
            "d",
            "7",
            "xd",
            "-1d",
            "1.5d",
            "7d7d",
            "1h1d",
            "99999999d",
        ] {
            assert!(parse_validity(bad).is_err(), "{bad:?} parsed");
        }
    }
}
