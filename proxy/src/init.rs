//! `pylon-proxy init`: installs (or removes) the nat-table iptables rules that send a pod's TCP
//! traffic through its sidecar, as Linkerd's proxy-init does. This module owns rule generation,
//! input validation and running `iptables`; nothing else in the proxy touches netfilter.
//!
//! Layout, in the `nat` table:
//! ```text
//! PREROUTING -> PYLON_INBOUND: skip ports RETURN; -p tcp REDIRECT --to-ports <inbound>
//! OUTPUT     -> PYLON_OUTPUT:  proxy uid RETURN; -o lo RETURN; skip ports RETURN;
//!                              skip CIDRs RETURN; -p tcp REDIRECT --to-ports <outbound>
//! ```
//! Installing is idempotent: the current table is read with `iptables -t nat -S`, existing own
//! chains are flushed and refilled, and each jump into them exists exactly once.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

/// The chain hooked from `PREROUTING` that redirects inbound TCP to the proxy.
pub const INBOUND_CHAIN: &str = "PYLON_INBOUND";
/// The chain hooked from `OUTPUT` that redirects the workload's outbound TCP to the proxy.
pub const OUTPUT_CHAIN: &str = "PYLON_OUTPUT";
const TABLE: &str = "nat";
/// iptables' multiport match takes at most 15 ports; a range counts as two.
const MULTIPORT_MAX: usize = 15;

/// Flags of `pylon-proxy init`.
#[derive(Debug, Clone, clap::Args)]
pub struct InitArgs {
    /// Port of the proxy's inbound listener; inbound TCP is redirected there.
    #[arg(long, env = "PYLON_INBOUND_PORT", default_value_t = 4143, value_parser = parse_port)]
    pub inbound_port: u16,

    /// Port of the proxy's outbound listener; the workload's outbound TCP is redirected there.
    #[arg(long, env = "PYLON_OUTBOUND_PORT", default_value_t = 4140, value_parser = parse_port)]
    pub outbound_port: u16,

    /// The uid the proxy runs as; its own traffic is never redirected (no loops).
    #[arg(long, env = "PYLON_PROXY_UID", default_value_t = 2102)]
    pub proxy_uid: u32,

    /// Inbound destination ports left alone (comma list of ports or ranges like 4567-4568).
    #[arg(long, env = "PYLON_SKIP_INBOUND_PORTS", default_value = "4190,4191")]
    pub skip_inbound_ports: PortList,

    /// Outbound destination ports left alone (comma list of ports or ranges like 4567-4568).
    #[arg(long, env = "PYLON_SKIP_OUTBOUND_PORTS", default_value = "")]
    pub skip_outbound_ports: PortList,

    /// Outbound destination networks left alone (comma list of IPv4 CIDRs, e.g. 10.0.0.0/8).
    #[arg(long, env = "PYLON_SKIP_OUTBOUND_CIDRS", default_value = "")]
    pub skip_outbound_cidrs: CidrList,

    /// Print the iptables commands, one per line, and change nothing.
    #[arg(long, env = "PYLON_DRY_RUN")]
    pub dry_run: bool,

    /// Remove Pylon's jumps and chains instead of installing them (no error if absent).
    #[arg(long, env = "PYLON_REMOVE")]
    pub remove: bool,

    /// The iptables binary (a name looked up in PATH, /usr/sbin and /sbin, or a path).
    #[arg(long, env = "PYLON_IPTABLES", default_value = "iptables")]
    pub iptables: String,
}

/// Why `init` failed; each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("invalid port {value:?}: {reason}")]
    InvalidPort { value: String, reason: String },

    #[error("invalid CIDR {value:?}: {reason}")]
    InvalidCidr { value: String, reason: String },

    #[error("iptables not found: install the iptables package (looked for {binary:?})")]
    IptablesNotFound { binary: String },

    #[error(
        "not permitted to change iptables rules: run as root or with CAP_NET_ADMIN \
         (`{command}` failed: {stderr})"
    )]
    NotPermitted { command: String, stderr: String },

    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        command: String,
        status: String,
        stderr: String,
    },

    #[error("could not run `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
}

/// Installs the rules (or removes them with `--remove`; prints them with `--dry-run`).
pub fn run(args: &InitArgs) -> Result<(), InitError> {
    let rules = Rules::from_args(args)?;
    if args.dry_run {
        let plan = if args.remove {
            plan_remove(&NatState::default(), true)
        } else {
            plan_install(&NatState::default(), &rules)
        };
        for cmd in &plan {
            println!("{}", cmd.display(&args.iptables));
        }
        return Ok(());
    }

    let binary = resolve_binary(&args.iptables)?;
    let listing = run_iptables(&binary, &IptablesCmd::nat(["-S"]))?;
    let state = NatState::parse(&listing);
    let plan = if args.remove {
        plan_remove(&state, false)
    } else {
        plan_install(&state, &rules)
    };
    for cmd in &plan {
        run_iptables(&binary, cmd)?;
    }
    tracing::info!(
        action = if args.remove { "removed" } else { "installed" },
        commands = plan.len(),
        "iptables rules"
    );
    Ok(())
}

// ----- inputs -----

fn parse_port(s: &str) -> Result<u16, InitError> {
    let invalid = |reason: &str| InitError::InvalidPort {
        value: s.to_string(),
        reason: reason.to_string(),
    };
    let n: u32 = s
        .trim()
        .parse()
        .map_err(|_| invalid("not a number (expected 1-65535)"))?;
    match u16::try_from(n) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(invalid("out of range (expected 1-65535)")),
    }
}

/// One port or an inclusive range of ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    /// In iptables multiport syntax (`a` or `a:b`).
    fn multiport(&self) -> String {
        if self.first == self.last {
            self.first.to_string()
        } else {
            format!("{}:{}", self.first, self.last)
        }
    }

    /// How many of multiport's 15 slots this takes.
    fn weight(&self) -> usize {
        if self.first == self.last {
            1
        } else {
            2
        }
    }
}

impl FromStr for PortRange {
    type Err = InitError;

    fn from_str(s: &str) -> Result<Self, InitError> {
        let s = s.trim();
        match s.split_once('-') {
            None => {
                let p = parse_port(s)?;
                Ok(PortRange { first: p, last: p })
            }
            Some((a, b)) => {
                let (first, last) = (parse_port(a)?, parse_port(b)?);
                if first > last {
                    return Err(InitError::InvalidPort {
                        value: s.to_string(),
                        reason: "range start is greater than its end".to_string(),
                    });
                }
                Ok(PortRange { first, last })
            }
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// A comma list of items (ports and ranges like `4190,4191,4567-4568`, or CIDRs); empty items
/// and repeats are ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommaList<T>(pub Vec<T>);

impl<T> Default for CommaList<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

pub type PortList = CommaList<PortRange>;
pub type CidrList = CommaList<Cidr>;

impl<T: FromStr<Err = InitError> + PartialEq> FromStr for CommaList<T> {
    type Err = InitError;

    fn from_str(s: &str) -> Result<Self, InitError> {
        let mut out: Vec<T> = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let item: T = item.parse()?;
            if !out.contains(&item) {
                out.push(item);
            }
        }
        Ok(CommaList(out))
    }
}

impl<T: fmt::Display> fmt::Display for CommaList<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&items.join(","))
    }
}

/// An IPv4 network; host bits are cleared, as iptables does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl FromStr for Cidr {
    type Err = InitError;

    fn from_str(s: &str) -> Result<Self, InitError> {
        let s = s.trim();
        let invalid = |reason: &str| InitError::InvalidCidr {
            value: s.to_string(),
            reason: reason.to_string(),
        };
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, prefix)) => (ip, Some(prefix)),
            None => (s, None),
        };
        if ip.contains(':') {
            return Err(invalid(
                "IPv6 is not supported (iptables handles IPv4 only)",
            ));
        }
        let addr: Ipv4Addr = ip
            .parse()
            .map_err(|_| invalid("expected an IPv4 address like 10.0.0.0/8"))?;
        let prefix: u8 = match prefix {
            None => 32,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= 32 => p,
                _ => return Err(invalid("prefix length must be 0-32")),
            },
        };
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix))
        };
        Ok(Cidr {
            addr: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
        })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

// ----- rules -----

/// The validated inputs of rule generation.
#[derive(Debug, Clone)]
struct Rules {
    inbound_port: u16,
    outbound_port: u16,
    proxy_uid: u32,
    skip_inbound: Vec<PortRange>,
    skip_outbound: Vec<PortRange>,
    skip_cidrs: Vec<Cidr>,
}

impl Rules {
    fn from_args(args: &InitArgs) -> Result<Self, InitError> {
        // Clap validates on the command line; this catches `InitArgs` built in code.
        for port in [args.inbound_port, args.outbound_port] {
            if port == 0 {
                return Err(InitError::InvalidPort {
                    value: "0".to_string(),
                    reason: "out of range (expected 1-65535)".to_string(),
                });
            }
        }
        Ok(Rules {
            inbound_port: args.inbound_port,
            outbound_port: args.outbound_port,
            proxy_uid: args.proxy_uid,
            skip_inbound: args.skip_inbound_ports.0.clone(),
            skip_outbound: args.skip_outbound_ports.0.clone(),
            skip_cidrs: args.skip_outbound_cidrs.0.clone(),
        })
    }

    /// The rules of `PYLON_INBOUND`, as `-A` argument lists.
    fn inbound_chain(&self) -> Vec<IptablesCmd> {
        let mut out = Vec::new();
        for group in multiport_groups(&self.skip_inbound) {
            out.push(IptablesCmd::append(
                INBOUND_CHAIN,
                [
                    "-p",
                    "tcp",
                    "-m",
                    "multiport",
                    "--dports",
                    &group,
                    "-m",
                    "comment",
                    "--comment",
                    "pylon/inbound-skip-ports",
                    "-j",
                    "RETURN",
                ],
            ));
        }
        out.push(IptablesCmd::append(
            INBOUND_CHAIN,
            [
                "-p",
                "tcp",
                "-m",
                "comment",
                "--comment",
                "pylon/inbound-redirect",
                "-j",
                "REDIRECT",
                "--to-ports",
                &self.inbound_port.to_string(),
            ],
        ));
        out
    }

    /// The rules of `PYLON_OUTPUT`, as `-A` argument lists.
    fn output_chain(&self) -> Vec<IptablesCmd> {
        let mut out = vec![
            IptablesCmd::append(
                OUTPUT_CHAIN,
                [
                    "-m",
                    "owner",
                    "--uid-owner",
                    &self.proxy_uid.to_string(),
                    "-m",
                    "comment",
                    "--comment",
                    "pylon/outbound-skip-proxy-uid",
                    "-j",
                    "RETURN",
                ],
            ),
            IptablesCmd::append(
                OUTPUT_CHAIN,
                [
                    "-o",
                    "lo",
                    "-m",
                    "comment",
                    "--comment",
                    "pylon/outbound-skip-loopback",
                    "-j",
                    "RETURN",
                ],
            ),
        ];
        for group in multiport_groups(&self.skip_outbound) {
            out.push(IptablesCmd::append(
                OUTPUT_CHAIN,
                [
                    "-p",
                    "tcp",
                    "-m",
                    "multiport",
                    "--dports",
                    &group,
                    "-m",
                    "comment",
                    "--comment",
                    "pylon/outbound-skip-ports",
                    "-j",
                    "RETURN",
                ],
            ));
        }
        for cidr in &self.skip_cidrs {
            out.push(IptablesCmd::append(
                OUTPUT_CHAIN,
                [
                    "-d",
                    &cidr.to_string(),
                    "-m",
                    "comment",
                    "--comment",
                    "pylon/outbound-skip-cidr",
                    "-j",
                    "RETURN",
                ],
            ));
        }
        out.push(IptablesCmd::append(
            OUTPUT_CHAIN,
            [
                "-p",
                "tcp",
                "-m",
                "comment",
                "--comment",
                "pylon/outbound-redirect",
                "-j",
                "REDIRECT",
                "--to-ports",
                &self.outbound_port.to_string(),
            ],
        ));
        out
    }
}

/// Splits port ranges into multiport lists of at most 15 slots each.
fn multiport_groups(ports: &[PortRange]) -> Vec<String> {
    let mut groups = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut used = 0;
    for range in ports {
        if used + range.weight() > MULTIPORT_MAX {
            groups.push(current.join(","));
            current.clear();
            used = 0;
        }
        current.push(range.multiport());
        used += range.weight();
    }
    if !current.is_empty() {
        groups.push(current.join(","));
    }
    groups
}

/// The built-in chain each own chain is hooked from, with the jump's comment.
const HOOKS: [(&str, &str, &str); 2] = [
    ("PREROUTING", INBOUND_CHAIN, "pylon/install-inbound"),
    ("OUTPUT", OUTPUT_CHAIN, "pylon/install-outbound"),
];

/// One iptables invocation on the nat table, without the binary.
#[derive(Debug, Clone, PartialEq, Eq)]
struct IptablesCmd(Vec<String>);

impl IptablesCmd {
    fn nat<'a>(args: impl IntoIterator<Item = &'a str>) -> Self {
        let mut v: Vec<String> = ["-w", "-t", TABLE].iter().map(|s| s.to_string()).collect();
        v.extend(args.into_iter().map(str::to_string));
        IptablesCmd(v)
    }

    fn append<'a>(chain: &str, rule: impl IntoIterator<Item = &'a str>) -> Self {
        let mut cmd = IptablesCmd::nat(["-A", chain]);
        cmd.0.extend(rule.into_iter().map(str::to_string));
        cmd
    }

    /// `op` (`-A` or `-D`) of the jump from `hook` into `chain`.
    fn jump(op: &str, hook: &str, chain: &str, comment: &str) -> Self {
        IptablesCmd::nat([op, hook, "-m", "comment", "--comment", comment, "-j", chain])
    }

    /// The command as a shell line, quoting words that need it.
    fn display(&self, binary: &str) -> String {
        std::iter::once(binary)
            .chain(self.0.iter().map(String::as_str))
            .map(shell_quote)
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:,=+@%".contains(c));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// What `iptables -t nat -S` says exists: user chains and each rule as its words.
#[derive(Debug, Clone, Default)]
struct NatState {
    chains: Vec<String>,
    rules: Vec<Vec<String>>,
}

impl NatState {
    fn parse(listing: &str) -> Self {
        let mut state = NatState::default();
        for line in listing.lines() {
            let words = split_words(line);
            match words.first().map(String::as_str) {
                Some("-N") => {
                    if let Some(chain) = words.get(1) {
                        state.chains.push(chain.clone());
                    }
                }
                Some("-A") => state.rules.push(words),
                _ => {}
            }
        }
        state
    }

    fn has_chain(&self, chain: &str) -> bool {
        self.chains.iter().any(|c| c == chain)
    }

    /// Rules in `hook` (e.g. `PREROUTING`) that jump to `chain`, as listed (`-A hook ...`).
    fn jumps(&self, hook: &str, chain: &str) -> Vec<&Vec<String>> {
        self.rules
            .iter()
            .filter(|r| r.get(1).is_some_and(|h| h == hook))
            .filter(|r| r.windows(2).any(|w| w[0] == "-j" && w[1] == chain))
            .collect()
    }
}

/// Splits an `iptables -S` line into words, honouring its double quotes and backslashes.
fn split_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => {
                if let Some(next) = chars.next() {
                    current.push(next);
                }
            }
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut current));
                    in_word = false;
                }
            }
            c => {
                current.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(current);
    }
    words
}

/// The commands that bring `state` to the wanted rules: own chains created or flushed and
/// refilled, exactly one jump into each.
fn plan_install(state: &NatState, rules: &Rules) -> Vec<IptablesCmd> {
    let mut plan = Vec::new();
    let chains = [
        (INBOUND_CHAIN, rules.inbound_chain()),
        (OUTPUT_CHAIN, rules.output_chain()),
    ];
    for (chain, chain_rules) in chains {
        let op = if state.has_chain(chain) { "-F" } else { "-N" };
        plan.push(IptablesCmd::nat([op, chain]));
        plan.extend(chain_rules);
    }
    for (hook, chain, comment) in HOOKS {
        let existing = state.jumps(hook, chain);
        match existing.split_first() {
            None => plan.push(IptablesCmd::jump("-A", hook, chain, comment)),
            Some((_keep, extra)) => plan.extend(extra.iter().map(|r| delete_of(r))),
        }
    }
    plan
}

/// The commands that take every jump into the own chains and the chains away. With `assume_all`
/// (dry run, state unknown) it lists what removing a full install runs.
fn plan_remove(state: &NatState, assume_all: bool) -> Vec<IptablesCmd> {
    let mut plan = Vec::new();
    for (hook, chain, comment) in HOOKS {
        if assume_all {
            plan.push(IptablesCmd::jump("-D", hook, chain, comment));
        } else {
            plan.extend(state.jumps(hook, chain).into_iter().map(|r| delete_of(r)));
        }
    }
    for (_, chain, _) in HOOKS {
        if assume_all || state.has_chain(chain) {
            plan.push(IptablesCmd::nat(["-F", chain]));
            plan.push(IptablesCmd::nat(["-X", chain]));
        }
    }
    plan
}

/// `-D` of a rule listed as `-A chain ...`.
fn delete_of(listed: &[String]) -> IptablesCmd {
    let mut cmd = IptablesCmd::nat(["-D"]);
    cmd.0.extend(listed.iter().skip(1).cloned());
    cmd
}

// ----- running iptables -----

/// Finds the iptables binary: a path as given, else PATH, then /usr/sbin and /sbin (often
/// missing from a non-root PATH).
fn resolve_binary(name: &str) -> Result<PathBuf, InitError> {
    let not_found = || InitError::IptablesNotFound {
        binary: name.to_string(),
    };
    if name.is_empty() {
        return Err(not_found());
    }
    if name.contains('/') {
        let path = Path::new(name);
        return if path.is_file() {
            Ok(path.to_path_buf())
        } else {
            Err(not_found())
        };
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(not_found)
}

/// Runs one command and returns its stdout, classifying failures.
fn run_iptables(binary: &Path, cmd: &IptablesCmd) -> Result<String, InitError> {
    let command = cmd.display(&binary.to_string_lossy());
    tracing::debug!(%command, "running");
    let output = Command::new(binary)
        .args(&cmd.0)
        .output()
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => InitError::IptablesNotFound {
                binary: binary.to_string_lossy().into_owned(),
            },
            _ => InitError::Spawn {
                command: command.clone(),
                source,
            },
        })?;
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
    if is_permission_error(&stderr) {
        return Err(InitError::NotPermitted { command, stderr });
    }
    Err(InitError::CommandFailed {
        command,
        status: output.status.to_string(),
        stderr,
    })
}

fn is_permission_error(stderr: &str) -> bool {
    [
        "Permission denied",
        "must be root",
        "Operation not permitted",
    ]
    .iter()
    .any(|m| stderr.contains(m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        init: InitArgs,
    }

    fn args(extra: &[&str]) -> InitArgs {
        let argv = std::iter::once("init").chain(extra.iter().copied());
        Cli::try_parse_from(argv).expect("arguments parse").init
    }

    fn lines(plan: &[IptablesCmd]) -> Vec<String> {
        plan.iter().map(|c| c.display("iptables")).collect()
    }

    fn install(extra: &[&str], state: &NatState) -> Vec<String> {
        let rules = Rules::from_args(&args(extra)).expect("valid rules");
        lines(&plan_install(state, &rules))
    }

    #[test]
    fn port_lists_parse_ports_and_ranges() {
        let list: PortList = " 4190, 4191,,4567-4568 ,4190".parse().expect("parses");
        assert_eq!(
            list.0,
            vec![
                PortRange {
                    first: 4190,
                    last: 4190
                },
                PortRange {
                    first: 4191,
                    last: 4191
                },
                PortRange {
                    first: 4567,
                    last: 4568
                },
            ]
        );
        assert_eq!(list.to_string(), "4190,4191,4567-4568");
        assert_eq!("".parse::<PortList>().expect("empty is fine").0, vec![]);
    }

    #[test]
    fn bad_ports_are_rejected_with_the_value() {
        for bad in ["0", "65536", "http", "-5", "10-", "20-10", "1-2-3"] {
            let err = bad.parse::<PortList>().expect_err(bad).to_string();
            assert!(err.starts_with("invalid port"), "{bad}: {err}");
        }
        let err = "80,99999"
            .parse::<PortList>()
            .expect_err("range")
            .to_string();
        assert!(err.contains("99999") && err.contains("1-65535"), "{err}");
        let err = "20-10"
            .parse::<PortList>()
            .expect_err("reversed")
            .to_string();
        assert!(err.contains("greater"), "{err}");
    }

    #[test]
    fn cidrs_parse_normalise_and_reject() {
        let list: CidrList = "10.0.0.0/8, 192.168.1.7/24,169.254.169.254"
            .parse()
            .expect("ok");
        assert_eq!(
            list.to_string(),
            "10.0.0.0/8,192.168.1.0/24,169.254.169.254/32"
        );
        assert_eq!("0.0.0.0/0".parse::<Cidr>().expect("default").prefix, 0);
        for bad in [
            "10.0.0.0/33",
            "10.0.0/8",
            "banana",
            "10.0.0.0/x",
            "fd00::/8",
        ] {
            let err = bad.parse::<CidrList>().expect_err(bad).to_string();
            assert!(err.starts_with("invalid CIDR"), "{bad}: {err}");
        }
        let err = "fd00::/8".parse::<Cidr>().expect_err("v6").to_string();
        assert!(err.contains("IPv6"), "{err}");
    }

    #[test]
    fn clap_defaults_and_validation() {
        let a = args(&[]);
        assert_eq!(
            (a.inbound_port, a.outbound_port, a.proxy_uid),
            (4143, 4140, 2102)
        );
        assert_eq!(a.skip_inbound_ports.to_string(), "4190,4191");
        assert!(a.skip_outbound_ports.0.is_empty() && a.skip_outbound_cidrs.0.is_empty());
        assert_eq!(a.iptables, "iptables");
        assert!(!a.dry_run && !a.remove);

        let err = Cli::try_parse_from(["init", "--inbound-port", "70000"]).expect_err("port");
        assert!(err.to_string().contains("70000"), "{err}");
        let err = Cli::try_parse_from(["init", "--skip-outbound-cidrs", "10.0.0.0/40"])
            .expect_err("cidr");
        assert!(err.to_string().contains("prefix length"), "{err}");
    }

    #[test]
    fn fresh_install_rules_in_order() {
        let got = install(
            &[
                "--skip-outbound-ports",
                "25,4567-4568",
                "--skip-outbound-cidrs",
                "10.96.0.0/12",
            ],
            &NatState::default(),
        );
        let want = [
            "iptables -w -t nat -N PYLON_INBOUND",
            "iptables -w -t nat -A PYLON_INBOUND -p tcp -m multiport --dports 4190,4191 -m comment --comment pylon/inbound-skip-ports -j RETURN",
            "iptables -w -t nat -A PYLON_INBOUND -p tcp -m comment --comment pylon/inbound-redirect -j REDIRECT --to-ports 4143",
            "iptables -w -t nat -N PYLON_OUTPUT",
            "iptables -w -t nat -A PYLON_OUTPUT -m owner --uid-owner 2102 -m comment --comment pylon/outbound-skip-proxy-uid -j RETURN",
            "iptables -w -t nat -A PYLON_OUTPUT -o lo -m comment --comment pylon/outbound-skip-loopback -j RETURN",
            "iptables -w -t nat -A PYLON_OUTPUT -p tcp -m multiport --dports 25,4567:4568 -m comment --comment pylon/outbound-skip-ports -j RETURN",
            "iptables -w -t nat -A PYLON_OUTPUT -d 10.96.0.0/12 -m comment --comment pylon/outbound-skip-cidr -j RETURN",
            "iptables -w -t nat -A PYLON_OUTPUT -p tcp -m comment --comment pylon/outbound-redirect -j REDIRECT --to-ports 4140",
            "iptables -w -t nat -A PREROUTING -m comment --comment pylon/install-inbound -j PYLON_INBOUND",
            "iptables -w -t nat -A OUTPUT -m comment --comment pylon/install-outbound -j PYLON_OUTPUT",
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn no_skip_ports_means_no_skip_rule() {
        let got = install(&["--skip-inbound-ports", ""], &NatState::default());
        assert!(!got.iter().any(|l| l.contains("multiport")), "{got:#?}");
    }

    #[test]
    fn long_port_lists_split_at_fifteen_multiport_slots() {
        let ranges: Vec<PortRange> = (1..=14)
            .map(|p| PortRange { first: p, last: p })
            .chain([PortRange {
                first: 100,
                last: 200,
            }])
            .collect();
        let groups = multiport_groups(&ranges);
        assert_eq!(groups.len(), 2, "{groups:?}");
        assert_eq!(groups[1], "100:200");
        let groups = multiport_groups(&ranges[..13]);
        assert_eq!(groups.len(), 1);
    }

    /// What `iptables-nft -t nat -S` printed after one install.
    const INSTALLED: &str = r#"-P PREROUTING ACCEPT
-P INPUT ACCEPT
-P OUTPUT ACCEPT
-P POSTROUTING ACCEPT
-N PYLON_INBOUND
-N PYLON_OUTPUT
-A PREROUTING -m comment --comment "pylon/install-inbound" -j PYLON_INBOUND
-A OUTPUT -m comment --comment "pylon/install-outbound" -j PYLON_OUTPUT
-A PYLON_INBOUND -p tcp -m comment --comment "pylon/inbound-redirect" -j REDIRECT --to-ports 4143
-A PYLON_OUTPUT -p tcp -m comment --comment "pylon/outbound-redirect" -j REDIRECT --to-ports 4140
"#;

    #[test]
    fn reinstall_flushes_and_adds_no_jump() {
        let got = install(&[], &NatState::parse(INSTALLED));
        assert_eq!(got[0], "iptables -w -t nat -F PYLON_INBOUND");
        assert!(got.contains(&"iptables -w -t nat -F PYLON_OUTPUT".to_string()));
        assert!(!got.iter().any(|l| l.contains(" -N ")), "{got:#?}");
        assert!(
            !got.iter()
                .any(|l| l.contains("-A PREROUTING") || l.contains("-A OUTPUT")),
            "{got:#?}"
        );
    }

    #[test]
    fn duplicate_jumps_are_healed() {
        let listing = format!(
            "{INSTALLED}-A OUTPUT -j PYLON_OUTPUT\n-A OUTPUT -m comment --comment \"other \\\"x\\\"\" -j PYLON_OUTPUT\n"
        );
        let got = install(&[], &NatState::parse(&listing));
        let deletes: Vec<&String> = got.iter().filter(|l| l.contains(" -D ")).collect();
        assert_eq!(
            deletes,
            [
                "iptables -w -t nat -D OUTPUT -j PYLON_OUTPUT",
                r#"iptables -w -t nat -D OUTPUT -m comment --comment 'other "x"' -j PYLON_OUTPUT"#,
            ]
        );
    }

    #[test]
    fn remove_takes_jumps_then_chains_and_nothing_when_absent() {
        let got = lines(&plan_remove(&NatState::parse(INSTALLED), false));
        assert_eq!(
            got,
            [
                "iptables -w -t nat -D PREROUTING -m comment --comment pylon/install-inbound -j PYLON_INBOUND",
                "iptables -w -t nat -D OUTPUT -m comment --comment pylon/install-outbound -j PYLON_OUTPUT",
                "iptables -w -t nat -F PYLON_INBOUND",
                "iptables -w -t nat -X PYLON_INBOUND",
                "iptables -w -t nat -F PYLON_OUTPUT",
                "iptables -w -t nat -X PYLON_OUTPUT",
            ]
        );
        let empty = NatState::parse("-P PREROUTING ACCEPT\n-P OUTPUT ACCEPT\n");
        assert!(plan_remove(&empty, false).is_empty());
        // The dry run of --remove lists the same commands as removing a full install.
        assert_eq!(lines(&plan_remove(&NatState::default(), true)), got);
    }

    #[test]
    fn dry_run_needs_no_iptables() {
        let mut a = args(&["--dry-run", "--iptables", "/nonexistent/iptables"]);
        run(&a).expect("dry run touches nothing");
        a.remove = true;
        run(&a).expect("dry run of remove touches nothing");
    }

    #[test]
    fn missing_binary_is_reported_clearly() {
        let a = args(&["--iptables", "/nonexistent/iptables"]);
        let err = run(&a).expect_err("no binary").to_string();
        assert!(
            err.starts_with("iptables not found: install the iptables package"),
            "{err}"
        );
        let err = resolve_binary("pylon-no-such-iptables").expect_err("not in PATH");
        assert!(matches!(err, InitError::IptablesNotFound { .. }));
    }

    #[test]
    fn failures_carry_command_and_stderr() {
        // `false` stands in for an iptables that refuses.
        let err = run_iptables(Path::new("/bin/false"), &IptablesCmd::nat(["-S"]))
            .expect_err("false fails");
        let msg = err.to_string();
        assert!(msg.contains("/bin/false -w -t nat -S"), "{msg}");
        assert!(is_permission_error(
            "iptables v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)"
        ));
        assert!(!is_permission_error("iptables: Chain already exists."));
    }

    #[test]
    fn words_split_like_iptables_quotes() {
        assert_eq!(
            split_words(r#"-A X -m comment --comment "a \"b\" c" -j Y"#),
            [
                "-A",
                "X",
                "-m",
                "comment",
                "--comment",
                r#"a "b" c"#,
                "-j",
                "Y"
            ]
        );
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
