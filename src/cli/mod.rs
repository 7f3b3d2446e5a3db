//! The `petrel` command line: argument parsing and one function per
//! command. Exit codes: 0 ok, 1 runtime failure, 2 usage or config error.

pub(crate) mod check;
mod dns_check;
mod manpages;
pub(crate) mod queue;
mod sendmail;
mod serve;
mod user;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, ConfigError, ConfigSource};

#[derive(Debug, Parser)]
#[command(
    name = "petrel",
    version,
    about = "A mail server (SMTP MTA) with a SQLite queue",
    after_long_help = "\
CONFIGURATION: the first of -c FILE, $PETREL_CONFIG, ./petrel.toml and /etc/petrel/petrel.toml; \
without one, every command but sendmail runs on built-in defaults (a demo in ./petrel-data).

EXIT STATUS: 0 ok, 1 runtime failure, 2 usage or configuration error, 75 try again later (sendmail).

SIGNALS: petrel serve stops gracefully on SIGTERM and SIGINT; SIGHUP (or petrel reload) reloads \
the aliases, the DKIM keys and [dkim], and the TLS certificate.

FILES: data_dir (/var/lib/petrel when packaged) holds queue.db (SQLite; readable with sqlite3), \
mail/DOMAIN/USER/ (Maildirs), public/submit.sock and public/maildrop/ (local submission) and \
control.sock."
)]
pub struct Cli {
    /// Config file (default: $PETREL_CONFIG, ./petrel.toml, /etc/petrel/petrel.toml, else built-in defaults)
    #[arg(short = 'c', long = "config", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: PetrelCommand,
}

#[derive(Debug, Subcommand)]
pub enum PetrelCommand {
    /// Run listeners, scheduler and delivery until SIGTERM/SIGINT
    Serve,
    /// Validate the config and print the effective settings
    CheckConfig,
    /// Have the running server apply what can change without a restart:
    /// aliases, DKIM keys and [dkim], the TLS certificate (as SIGHUP does);
    /// prints what it loaded
    Reload,
    /// Inspect and act on the queue (also while the server runs)
    Queue {
        #[command(subcommand)]
        command: queue::QueueCommand,
    },
    /// Submit a message from stdin, sendmail-style: [-t] [-i] [-f FROM] [RCPT...]
    #[command(after_long_help = SENDMAIL_HELP)]
    Sendmail {
        /// sendmail options and recipients
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Manage accounts (AUTH logins and local mailboxes)
    User {
        #[command(subcommand)]
        command: user::UserCommand,
    },
    /// DKIM keys: make one and print the DNS record to publish
    Dkim {
        #[command(subcommand)]
        command: DkimCommand,
    },
    /// Check DOMAIN's DNS for mail (MX, A/AAAA, PTR, SPF, DKIM, DMARC,
    /// MTA-STS, TLS-RPT) and print what to publish; exit 0 when every
    /// required record is right, 1 otherwise (for monitoring)
    DnsCheck {
        domain: String,
        /// This server's public address (repeatable); default: the
        /// smtp listen addresses that name one
        #[arg(long = "address")]
        addresses: Vec<std::net::IpAddr>,
        /// MTA-STS and TLS-RPT are required too
        #[arg(long)]
        strict: bool,
    },
    /// Write the manual pages (section 8) into DIR, for packaging
    #[command(hide = true)]
    Manpages { dir: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum DkimCommand {
    /// Make a key for DOMAIN in dkim.key_dir (default data_dir/dkim) and
    /// print the TXT record to publish; an existing key is never replaced
    Generate {
        domain: String,
        /// Default: dkim.selector from the config ("petrel")
        #[arg(long)]
        selector: Option<String>,
        /// ed25519 (RFC 8463; small) or rsa (2048 bits; what every
        /// verifier knows). Publishing both under two selectors is common.
        #[arg(long, default_value = "ed25519")]
        algorithm: String,
    },
}

const SENDMAIL_HELP: &str = "\
Also run when the binary is invoked as sendmail, mailq or newaliases.

The message is read from standard input (a line with a single dot ends it, unless -i) and \
handed to the running server over data_dir/public/submit.sock; when no server runs it waits \
in data_dir/public/maildrop/ and is sent when the server starts. Any user of the host may \
send; the sender is USER@ the first local domain, and -f needs root or [sendmail] \
trusted_group.

Options: -t recipients from To:, Cc: and Bcc: (Bcc: is removed); -i, -oi a lone dot does not \
end the message; -f ADDR, -r ADDR envelope sender; -F NAME full name for the From: header \
added when missing; -bm submit (default); -bs SMTP on standard input and output; -bp, mailq \
list the queue; -q retry the queue now; -bi, newaliases check the aliases and have the \
running server reload them; -v print the queue id. Other sendmail options (-o..., -B..., \
-N...) are accepted and ignored.

Silent on success (cron mails any output back to the job's owner). Exit status: 0 sent or \
queued, 1 refused (the server's reply is on standard error), 2 usage, \
75 try again later (the caller keeps the message).";

/// How a command ended; mapped to the documented exit codes.
#[derive(Debug)]
pub enum Failure {
    /// Bad usage or config: exit 2.
    Usage(String),
    /// Something failed at run time: exit 1.
    Runtime(String),
    /// Try again later (sendmail's EX_TEMPFAIL): exit 75. The caller keeps
    /// the message.
    Temporary(String),
}

/// Writes a line to standard output. A reader that went away (`petrel
/// queue list | head -1`) ends the command quietly with success, as with
/// any Unix tool, instead of a panic.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        if let Err(error) = writeln!(out, $($arg)*) {
            $crate::cli::output_failed(error);
        }
    }};
}
pub(crate) use say;

/// Standard output failed: a closed pipe ends the command with success,
/// anything else with the runtime failure code.
pub(crate) fn output_failed(error: std::io::Error) -> ! {
    if error.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("petrel: cannot write to standard output: {error}");
    std::process::exit(1);
}

impl From<ConfigError> for Failure {
    fn from(error: ConfigError) -> Failure {
        Failure::Usage(format!("config error: {error}"))
    }
}

pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    // Invoked as `sendmail` (a symlink), or as `petrel sendmail`: sendmail
    // options do not fit clap's conventions, so they are parsed by hand.
    let invoked_as = args
        .first()
        .map(|a| a.rsplit('/').next().unwrap_or(a).to_string())
        .unwrap_or_default();
    if matches!(invoked_as.as_str(), "sendmail" | "mailq" | "newaliases") {
        return exit(run_sendmail(&args[1..], &invoked_as));
    }
    if args.get(1).map(String::as_str) == Some("sendmail") {
        return exit(run_sendmail(&args[2..], "sendmail"));
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            // clap prints help/version to stdout with success, errors with code 2.
            let _ = error.print();
            return ExitCode::from(if error.use_stderr() { 2 } else { 0 });
        }
    };
    exit(run(cli))
}

/// `-c FILE` (petrel's) may appear anywhere among sendmail's arguments.
fn run_sendmail(args: &[String], invoked_as: &str) -> Result<(), Failure> {
    if args.iter().any(|a| a == "--help") {
        return sendmail_help(invoked_as);
    }
    let mut config_file = None;
    let mut rest = Vec::new();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        if arg == "-c" || arg == "--config" {
            let file = iter
                .next()
                .ok_or_else(|| Failure::Usage("-c needs a file".into()))?;
            config_file = Some(PathBuf::from(file));
        } else {
            rest.push(arg.clone());
        }
    }
    let config = sendmail_config(config_file.as_deref())?;
    sendmail::run(&config, &rest, invoked_as)
}

/// The help `petrel sendmail` has in clap, which the manual page
/// sendmail.8 is made of too; needs no config.
fn sendmail_help(invoked_as: &str) -> Result<(), Failure> {
    use clap::CommandFactory as _;
    // Built whole, so that the global -c is among its options.
    let mut command = Cli::command();
    command.build();
    let Some(sendmail) = command.find_subcommand("sendmail") else {
        return Err(Failure::Runtime("no help for sendmail".into()));
    };
    let name = if invoked_as == "sendmail" && std::env::args().nth(1).as_deref() == Some("sendmail")
    {
        "petrel sendmail".to_string()
    } else {
        invoked_as.to_string()
    };
    let help = sendmail
        .clone()
        .override_usage(format!("{name} [OPTIONS] [RCPT]..."))
        .render_long_help();
    say!("{}", help.to_string().trim_end());
    Ok(())
}

/// `sendmail` never runs on the demo defaults: a data dir invented in the
/// caller's working directory would swallow mail nobody delivers.
fn sendmail_config(explicit: Option<&std::path::Path>) -> Result<Config, Failure> {
    match Config::locate(explicit) {
        Ok(path) => Config::load_file(&path).map_err(|error| {
            Failure::Temporary(format!("config error: {error}; the message was not sent"))
        }),
        Err(looked_at) => Err(Failure::Temporary(format!(
            "no config file ({}, ${} unset); the message was not sent",
            looked_at
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            crate::config::CONFIG_ENV
        ))),
    }
}

/// The config for every other command; the defaults are announced.
fn load_config(explicit: Option<&std::path::Path>) -> Result<(Config, ConfigSource), Failure> {
    let (config, source) = Config::load(explicit)?;
    if let Some(notice) = source.defaults_notice() {
        eprintln!("petrel: {notice}");
    }
    Ok((config, source))
}

fn exit(result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            eprintln!("petrel: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(message)) => {
            eprintln!("petrel: {message}");
            ExitCode::from(1)
        }
        Err(Failure::Temporary(message)) => {
            eprintln!("petrel: {message}");
            ExitCode::from(75)
        }
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        PetrelCommand::Serve => {
            let (config, source) = load_config(cli.config.as_deref())?;
            serve::serve(config, source)
        }
        PetrelCommand::CheckConfig => {
            let (config, source) = load_config(cli.config.as_deref())?;
            check::run(&config, &source)
        }
        PetrelCommand::Reload => {
            let (config, _) = load_config(cli.config.as_deref())?;
            reload(&config)
        }
        PetrelCommand::Queue { command } => {
            let (config, _) = load_config(cli.config.as_deref())?;
            queue::run(&config, command)
        }
        PetrelCommand::Sendmail { args } => {
            let config = sendmail_config(cli.config.as_deref())?;
            sendmail::run(&config, &args, "sendmail")
        }
        PetrelCommand::User { command } => {
            let (config, _) = load_config(cli.config.as_deref())?;
            user::run(&config, command)
        }
        PetrelCommand::Dkim { command } => {
            let (config, _) = load_config(cli.config.as_deref())?;
            dkim(&config, command)
        }
        PetrelCommand::DnsCheck {
            domain,
            addresses,
            strict,
        } => {
            let (config, _) = load_config(cli.config.as_deref())?;
            dns_check::run(&config, &domain, &addresses, strict)
        }
        PetrelCommand::Manpages { dir } => manpages::write(&dir),
    }
}

/// `petrel reload`: SIGHUP's work, asked over the control socket, so that
/// the answer says what was loaded.
fn reload(config: &Config) -> Result<(), Failure> {
    let socket = crate::server::control::socket_path(&config.data_dir);
    if crate::server::control::permission_denied(&config.data_dir) {
        return Err(Failure::Runtime(format!(
            "{} is for root and the server's user only (permission denied)",
            socket.display()
        )));
    }
    match crate::server::control::reload(&config.data_dir) {
        Some(Ok(lines)) => {
            for line in lines {
                say!("{line}");
            }
            Ok(())
        }
        Some(Err(why)) => Err(Failure::Runtime(format!(
            "the running server did not reload: {why}"
        ))),
        None => Err(Failure::Runtime(format!(
            "no running server answered at {}",
            socket.display()
        ))),
    }
}

fn dkim(config: &Config, command: DkimCommand) -> Result<(), Failure> {
    let DkimCommand::Generate {
        domain,
        selector,
        algorithm,
    } = command;
    let algorithm =
        crate::dkim::Algorithm::parse(&algorithm).map_err(|e| Failure::Usage(e.to_string()))?;
    let selector = selector.unwrap_or_else(|| config.dkim.selector.clone());
    as_server_user(config, "petrel dkim generate")?;
    let (path, record) =
        crate::dkim::generate(&config.dkim_key_dir(), &domain, &selector, algorithm)
            .map_err(|e| Failure::Runtime(e.to_string()))?;
    eprintln!(
        "petrel: key written to {}; publish this record:",
        path.display()
    );
    println!("{record}");
    eprintln!("petrel: {}", key_use(config, &domain, &selector));
    Ok(())
}

/// Whether the running server (or the next one) signs with a key just
/// made for `domain` and `selector`, and what to do if not.
fn key_use(config: &Config, domain: &str, selector: &str) -> String {
    let (domains, _) = crate::dkim::signing_domains(config);
    if selector != config.dkim.selector {
        return format!(
            "the server signs with selector {:?}: once the record is published, set \
             dkim.selector = {selector:?} and run `petrel reload` (or send SIGHUP) to sign with \
             this key",
            config.dkim.selector
        );
    }
    if !domains.iter().any(|d| d.eq_ignore_ascii_case(domain)) {
        return format!(
            "mail from {domain} is not signed: add {domain:?} to [domains] local (or to [dkim] \
             domains), then run `petrel reload`"
        );
    }
    if crate::server::control::poke(&config.data_dir) {
        format!(
            "the running server signs mail from {domain} with this key from now on (it notices \
             new keys within seconds, no restart needed); publish the record at once"
        )
    } else {
        format!("petrel serve signs mail from {domain} with this key when it starts")
    }
}

/// `user` and `queue` write in `data_dir`: run by root, they become the
/// server's user first, so that what they create stays the server's (and
/// root never follows a path in a folder that user can change). Anyone
/// else is told what `command` needs (exit 1). Returns the uid of who
/// asked, for the log: after the switch, the process is the server's.
pub(crate) fn as_server_user(config: &Config, command: &str) -> Result<u32, Failure> {
    use crate::server::privileges;
    let caller = rustix::process::getuid().as_raw();
    needs_server_rights(config, command)?;
    let pending = privileges::prepare_data_dir(&config.server, &config.data_dir)
        .map_err(|e| Failure::Usage(e.to_string()))?;
    if let Some(run_as) = pending {
        privileges::switch(&run_as).map_err(|e| Failure::Runtime(e.to_string()))?;
    }
    Ok(caller)
}

/// `command` works in the server's private data dir: root or the
/// server's user may run it, and anyone else is told so.
pub(crate) fn needs_server_rights(config: &Config, command: &str) -> Result<(), Failure> {
    crate::server::privileges::may_act_as_server(&config.server, &config.data_dir).map_err(|user| {
        let who = if user == "root" {
            "root".to_string()
        } else {
            format!("root or the user {user}")
        };
        Failure::Runtime(format!(
            "{command} needs {who} (the queue and accounts are private to the server): try \
                 sudo {command}"
        ))
    })
}

/// Logging for long-running commands: `RUST_LOG` wins, `info` by default.
pub fn init_logging() {
    let env = env_logger::Env::default().default_filter_or("info");
    let _ = env_logger::Builder::from_env(env).try_init();
}
