//! `pylon completion bash|zsh|fish`: a completion script for the shell, made by
//! `clap_complete` from the same command definition the CLI parses with, so it always
//! offers the subcommands and flags this build has.

use std::io::Write;
use std::process::ExitCode;

use clap::{Args, Command, ValueEnum};
use clap_complete::Shell;

#[derive(Args, Debug)]
#[command(after_help = "Load it:\n  \
    bash: source <(pylon completion bash)   (or save it in /etc/bash_completion.d/pylon)\n  \
    zsh:  pylon completion zsh > \"${fpath[1]}/_pylon\"   (then start a new shell)\n  \
    fish: pylon completion fish > ~/.config/fish/completions/pylon.fish")]
pub struct CompletionArgs {
    /// The shell to complete in.
    #[arg(value_enum)]
    shell: CompletionShell,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

impl CompletionShell {
    fn shell(self) -> Shell {
        match self {
            Self::Bash => Shell::Bash,
            Self::Zsh => Shell::Zsh,
            Self::Fish => Shell::Fish,
        }
    }
}

/// The script for `shell`, completing `cmd` (the whole `pylon` command).
pub fn script(shell: CompletionShell, cmd: &mut Command) -> Vec<u8> {
    let mut out = Vec::new();
    clap_complete::generate(shell.shell(), cmd, "pylon", &mut out);
    out
}

pub fn run(args: CompletionArgs, mut cmd: Command) -> ExitCode {
    let script = script(args.shell, &mut cmd);
    match std::io::stdout().lock().write_all(&script) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pylon completion: error: writing the output: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn text(shell: CompletionShell) -> String {
        let bytes = script(shell, &mut crate::Cli::command());
        String::from_utf8(bytes).expect("UTF-8")
    }

    #[test]
    fn every_shell_gets_a_script_with_the_subcommands_and_shared_flags() {
        for shell in [
            CompletionShell::Bash,
            CompletionShell::Zsh,
            CompletionShell::Fish,
        ] {
            let s = text(shell);
            for word in [
                "stat",
                "routes",
                "edges",
                "tap",
                "top",
                "profile",
                "check",
                "completion",
                // Fish names long flags without their dashes.
                "config-dir",
                "all-namespaces",
                "prometheus",
                "tap-addr",
            ] {
                assert!(s.contains(word), "{shell:?} script lacks {word}");
            }
        }
    }

    /// The shells that are installed accept their scripts (`bash -n`, `zsh -n`,
    /// `fish --no-execute`: parsed, not run).
    #[test]
    fn the_installed_shells_parse_their_scripts() {
        let checks = [
            (CompletionShell::Bash, "bash", &["-n"][..]),
            (CompletionShell::Zsh, "zsh", &["-n"][..]),
            (CompletionShell::Fish, "fish", &["--no-execute"][..]),
        ];
        let dir = tempfile::tempdir().expect("tempdir");
        let mut checked = 0;
        for (shell, program, args) in checks {
            let file = dir.path().join(program);
            std::fs::write(&file, text(shell)).expect("write the script");
            let Ok(out) = std::process::Command::new(program)
                .args(args)
                .arg(&file)
                .output()
            else {
                continue;
            };
            checked += 1;
            assert!(
                out.status.success(),
                "{program} rejects its script: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // Debian always has bash; CI must check at least that one.
        assert!(
            checked > 0 || std::env::var("CI").is_err(),
            "no shell to check the scripts with"
        );
    }
}
