//! `petrel manpages DIR` (hidden): the manual pages, generated from the
//! same clap definitions as `--help` so the two never disagree. Section 8,
//! as for other mail servers; `sendmail.8` is petrel-sendmail's page under
//! the name the package's alternative gives it.

use std::path::Path;

use clap::CommandFactory as _;
use clap_mangen::Man;

use super::{Cli, Failure, say};

pub fn write(dir: &Path) -> Result<(), Failure> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Failure::Runtime(format!("cannot create {}: {e}", dir.display())))?;
    let mut command = Cli::command().disable_help_subcommand(true);
    command.build();
    let mut written = Vec::new();
    generate(&command, dir, &mut written)?;
    if let Some(sendmail) = command.find_subcommand("sendmail") {
        let page = sendmail
            .clone()
            .name("sendmail")
            .display_name("sendmail")
            .bin_name("sendmail");
        written.push(render(page, dir)?);
    }
    for path in written {
        say!("{}", path.display());
    }
    Ok(())
}

fn generate(
    command: &clap::Command,
    dir: &Path,
    written: &mut Vec<std::path::PathBuf>,
) -> Result<(), Failure> {
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        generate(sub, dir, written)?;
    }
    written.push(render(command.clone(), dir)?);
    Ok(())
}

fn render(command: clap::Command, dir: &Path) -> Result<std::path::PathBuf, Failure> {
    Man::new(command)
        .section("8")
        .manual("petrel")
        .source(format!("petrel {}", env!("CARGO_PKG_VERSION")))
        .generate_to(dir)
        .map_err(|e| {
            Failure::Runtime(format!(
                "cannot write a manual page in {}: {e}",
                dir.display()
            ))
        })
}
