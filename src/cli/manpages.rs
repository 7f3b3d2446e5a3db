//! `petrel manpages DIR` (hidden): the manual pages. The commands' pages
//! are generated from the same clap definitions as `--help`, so the two
//! never disagree; `petrel(8)` adds what an operator looks up there
//! (configuration, files, signals, exit status), and `petrel.toml(5)`
//! describes the config file, every key with its default, from
//! `doc/petrel.toml` (the README's reference is the same text; a test
//! keeps them equal). Section 8, as for other mail servers; `sendmail.8`
//! is petrel-sendmail's page under the name the package's alternative
//! gives it.

use std::path::{Path, PathBuf};

use clap::CommandFactory as _;
use clap_mangen::Man;
use clap_mangen::roff::{Roff, bold, italic, roman};

use super::{Cli, Failure, say};

/// Every config key with its default and what it does, as TOML.
const REFERENCE: &str = include_str!("../../doc/petrel.toml");

pub fn write(dir: &Path) -> Result<(), Failure> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Failure::Runtime(format!("cannot create {}: {e}", dir.display())))?;
    let mut command = Cli::command().disable_help_subcommand(true);
    command.build();
    let mut written = Vec::new();
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        generate(sub, dir, &mut written)?;
    }
    written.push(write_page(dir, "petrel.8", &main_page(&command)?)?);
    if let Some(sendmail) = command.find_subcommand("sendmail") {
        let page = sendmail
            .clone()
            .name("sendmail")
            .display_name("sendmail")
            .bin_name("sendmail");
        written.push(render(page, dir)?);
    }
    written.push(write_page(dir, "petrel.toml.5", &config_page())?);
    for path in written {
        say!("{}", path.display());
    }
    Ok(())
}

fn generate(
    command: &clap::Command,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> Result<(), Failure> {
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        generate(sub, dir, written)?;
    }
    written.push(render(command.clone(), dir)?);
    Ok(())
}

fn man(command: clap::Command) -> Man {
    Man::new(command)
        .section("8")
        .manual("petrel")
        .source(format!("petrel {}", env!("CARGO_PKG_VERSION")))
}

fn render(command: clap::Command, dir: &Path) -> Result<PathBuf, Failure> {
    man(command).generate_to(dir).map_err(|e| {
        Failure::Runtime(format!(
            "cannot write a manual page in {}: {e}",
            dir.display()
        ))
    })
}

fn write_page(dir: &Path, name: &str, text: &[u8]) -> Result<PathBuf, Failure> {
    let path = dir.join(name);
    std::fs::write(&path, text)
        .map_err(|e| Failure::Runtime(format!("cannot write {}: {e}", path.display())))?;
    Ok(path)
}

/// A titled section of paragraphs; `` `code` `` spans come out bold.
fn section(roff: &mut Roff, title: &str, paragraphs: &[&str]) {
    roff.control("SH", [title]);
    for (n, paragraph) in paragraphs.iter().enumerate() {
        if n > 0 {
            roff.control("PP", []);
        }
        let inlines: Vec<_> = paragraph
            .split('`')
            .enumerate()
            .map(|(i, piece)| {
                if i % 2 == 1 {
                    bold(piece)
                } else {
                    roman(piece)
                }
            })
            .collect();
        roff.text(inlines);
    }
}

/// petrel(8): clap's title, name, synopsis, options and commands, then
/// the sections an operator looks for, instead of `--help`'s epilogue.
/// petrel(8)'s own sections, as paragraphs: before the options ...
const DESCRIPTION: &[&str] = &[
    "petrel is a mail server (SMTP MTA) in one binary. It receives mail over SMTP (the MX \
     port, submission with STARTTLS, and implicit TLS), keeps it in a durable SQLite \
     queue, and delivers it to local Maildirs, to the recipient domain's MX hosts, or \
     through a smart host, retrying with backoff until it succeeds, bounces or expires. \
     The final 250 after DATA is sent only once the message is committed to disk.",
    "Any user of the host can send with `sendmail` (a link to petrel, or `petrel \
     sendmail`); accounts log in with AUTH over TLS, with per-device app passwords. \
     Mail from local users is DKIM-signed; mail from strangers is checked with SPF, \
     DKIM and DMARC.",
];

/// ... and after the subcommands.
const AFTER_SUBCOMMANDS: &[(&str, &[&str])] = &[
    (
        "CONFIGURATION",
        &[
            "The config file is the first of `-c` FILE, `$PETREL_CONFIG`, `./petrel.toml` and \
         `/etc/petrel/petrel.toml`; without one, every command but sendmail runs on \
         built-in defaults (a demo on loopback with data in `./petrel-data`). Every key \
         and its default: petrel.toml(5). `petrel check-config` checks a file as \
         `nginx -t` does and prints the effective settings.",
        ],
    ),
    (
        "FILES",
        &[
            "`/etc/petrel/petrel.toml` the configuration.",
            "`data_dir` (`/var/lib/petrel` when packaged): `queue.db` the queue, accounts and \
         lockouts (SQLite, readable with sqlite3); `mail/DOMAIN/USER/` the Maildirs; \
         `dkim/DOMAIN.SELECTOR.pem` DKIM keys; `public/submit.sock` and \
         `public/maildrop/` local submission; `control.sock` what the command line uses \
         to reach the running server; `petrel.lock` held while it runs.",
        ],
    ),
    (
        "SIGNALS",
        &[
            "SIGTERM and SIGINT stop `petrel serve` gracefully: listeners close, idle clients \
         get 421, running deliveries get 10 seconds. SIGHUP (or `petrel reload`) reloads \
         what can change without a restart: the aliases, the DKIM keys and [dkim], and \
         the TLS certificate, and logs what it loaded.",
        ],
    ),
    (
        "EXIT STATUS",
        &[
            "0 ok; 1 runtime failure (also: a command that needs root or the server's user, \
         run by someone else); 2 usage or configuration error, naming the key; 75 try \
         again later (sendmail: the caller keeps the message).",
        ],
    ),
];

fn main_page(command: &clap::Command) -> Result<Vec<u8>, Failure> {
    let man = man(command.clone());
    let mut out = Vec::new();
    let rendered = (|| -> std::io::Result<()> {
        man.render_title(&mut out)?;
        man.render_name_section(&mut out)?;
        man.render_synopsis_section(&mut out)?;
        let mut roff = Roff::new();
        section(&mut roff, "DESCRIPTION", DESCRIPTION);
        roff.to_writer(&mut out)?;
        man.render_options_section(&mut out)?;
        man.render_subcommands_section(&mut out)?;
        let mut roff = Roff::new();
        for (title, paragraphs) in AFTER_SUBCOMMANDS {
            section(&mut roff, title, paragraphs);
        }
        roff.control("SH", ["SEE ALSO"]);
        roff.text([
            italic("petrel.toml"),
            roman("(5), "),
            italic("sendmail"),
            roman("(8), "),
            italic("petrel-queue"),
            roman("(8), "),
            italic("petrel-user"),
            roman("(8), and the README shipped in /usr/share/doc/petrel."),
        ]);
        roff.to_writer(&mut out)?;
        man.render_version_section(&mut out)?;
        Ok(())
    })();
    rendered.map_err(|e| Failure::Runtime(format!("cannot render petrel(8): {e}")))?;
    Ok(out)
}

/// petrel.toml(5): the config file, every key with its default.
fn config_page() -> Vec<u8> {
    let mut roff = Roff::new();
    roff.control(
        "TH",
        [
            "petrel.toml",
            "5",
            "",
            &format!("petrel {}", env!("CARGO_PKG_VERSION")),
            "petrel",
        ],
    );
    roff.control("SH", ["NAME"]);
    roff.text([roman(
        "petrel.toml - configuration of the petrel mail server",
    )]);
    roff.control("SH", ["SYNOPSIS"]);
    roff.text([bold("/etc/petrel/petrel.toml")]);
    section(
        &mut roff,
        "DESCRIPTION",
        &[
            "The file is TOML. Unknown keys are errors, and `petrel check-config` reports every \
             problem with the key it concerns (exit 2). Durations are a whole number and a unit: \
             \"30s\", \"5m\", \"4h\", \"5d\"; sizes \"512KiB\", \"25MiB\", \"1GiB\" (or KB, MB, \
             GB, or a plain number of bytes).",
            "It is found as the first of `-c` FILE, `$PETREL_CONFIG`, `./petrel.toml` and \
             `/etc/petrel/petrel.toml`. It must be readable by every user who runs sendmail (it \
             says where the server is); secrets go in files of their own.",
            "The aliases, the DKIM keys and [dkim], and the TLS certificate can change while \
             petrel runs: `petrel reload` or SIGHUP applies them. Other keys apply at the next \
             start.",
        ],
    );
    roff.control("SH", ["KEYS"]);
    roff.text([roman(
        "Every key, with its default or an example, and what it does (the same as the \
         README's configuration reference):",
    )]);
    roff.control("PP", []);
    roff.control("nf", []);
    for line in REFERENCE.lines() {
        roff.text([roman(line)]);
    }
    roff.control("fi", []);
    roff.control("SH", ["SEE ALSO"]);
    roff.text([italic("petrel"), roman("(8)")]);
    roff.render().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_and_the_manual_describe_the_same_keys() {
        let readme = include_str!("../../README.md");
        let start = readme
            .find("### Configuration reference")
            .and_then(|at| readme[at..].find("```toml\n").map(|b| at + b + 8))
            .expect("the README's reference block");
        let end = start + readme[start..].find("```\n").expect("its end");
        assert_eq!(
            &readme[start..end],
            REFERENCE,
            "README.md's configuration reference and doc/petrel.toml differ"
        );
    }

    #[test]
    fn every_key_petrel_knows_is_in_the_reference() {
        // The effective settings name every key; each must be documented
        // (with one milter, whose table is empty by default).
        let mut config = crate::config::Config::default();
        config.milter.push(Default::default());
        let effective = config.to_toml();
        let mut missing = Vec::new();
        for line in effective.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('[') || line.starts_with('#') {
                continue;
            }
            let key = line.split('=').next().unwrap_or_default().trim();
            let documented = REFERENCE.lines().any(|l| {
                let l = l.trim_start_matches(['#', ' ']);
                l.starts_with(key) && l[key.len()..].trim_start().starts_with('=')
            });
            if !documented {
                missing.push(key.to_string());
            }
        }
        assert!(missing.is_empty(), "undocumented keys: {missing:?}");
    }

    #[test]
    fn the_pages_are_written() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path()).unwrap();
        let main = std::fs::read_to_string(dir.path().join("petrel.8")).unwrap();
        for part in ["SIGNALS", "EXIT STATUS", "FILES", "petrel.toml"] {
            assert!(main.contains(part), "{part} in petrel.8");
        }
        let config = std::fs::read_to_string(dir.path().join("petrel.toml.5")).unwrap();
        assert!(config.contains("max_local_sessions_per_user"));
        assert!(dir.path().join("sendmail.8").exists());
    }
}
