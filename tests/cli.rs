//! The real `petrel` binary: config checking, exit codes, and `serve`
//! driven by swaks and stopped by SIGTERM.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::serving::{Serving, petrel, write_config};

fn check_config(config: &Path) -> std::process::Output {
    petrel()
        .args(["check-config", "-c"])
        .arg(config)
        .output()
        .unwrap()
}

#[test]
fn check_config_prints_effective_settings() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "[domains]\nlocal = [\"example.test\"]\n");
    let output = check_config(&path);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("configuration OK"), "{stdout}");
    assert!(stdout.contains("local = [\"example.test\"]"), "{stdout}");
    assert!(stdout.contains("max_message_size = \"25MiB\""), "{stdout}");
}

/// Without -c or PETREL_CONFIG, a host with petrel installed uses
/// /etc/petrel/petrel.toml: the built-in defaults cannot be tested there.
fn system_config_installed(test: &str) -> bool {
    let installed = Path::new("/etc/petrel/petrel.toml").exists();
    if installed {
        eprintln!("SKIPPED {test}: /etc/petrel/petrel.toml exists on this host");
    }
    installed
}

#[test]
fn check_config_without_file_uses_defaults() {
    if system_config_installed("check_config_without_file_uses_defaults") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let output = petrel()
        .arg("check-config")
        .current_dir(dir.path())
        .env_remove("PETREL_CONFIG")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("built-in defaults"), "{stdout}");
    assert!(stdout.contains("127.0.0.1:2525"), "{stdout}");
}

#[test]
fn bad_configs_exit_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (extra, key) in [
        ("[queue]\nmax_age = \"five days\"\n", "queue.max_age"),
        (
            "[limits]\nmax_message_size = \"25 potatoes\"\n",
            "limits.max_message_size",
        ),
        ("[limits]\nmax_sesions = 3\n", "max_sesions"),
        (
            "[relay]\ntrusted_networks = [\"10.0.0.0/33\"]\n",
            "relay.trusted_networks",
        ),
        (
            "[dns]\nnameservers = [\"not-an-address\"]\n",
            "dns.nameservers",
        ),
        // A certificate that is not there (serve said so with exit 1).
        (
            "[tls]\ncert = \"/nonexistent/cert.pem\"\nkey = \"/nonexistent/key.pem\"\n",
            "/nonexistent/cert.pem",
        ),
    ] {
        let path = write_config(dir.path(), extra);
        for command in ["check-config", "serve"] {
            let output = petrel().arg(command).arg("-c").arg(&path).output().unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(2), "{command} {extra}: {stderr}");
            assert!(
                stderr.contains(key),
                "{command}: {stderr} should name {key}"
            );
        }
    }
    let output = petrel()
        .args(["check-config", "-c", "/nonexistent/petrel.toml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/petrel.toml"));
}

#[test]
fn usage_errors_exit_2() {
    let output = petrel().arg("no-such-command").output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let output = petrel().output().unwrap();
    assert_eq!(output.status.code(), Some(2));
}

/// Runs `petrel user ...` with `stdin` as its input; Ok(stdout) on exit 0,
/// Err((code, stderr)) otherwise.
fn user(config: &Path, args: &[&str], stdin: &str) -> Result<String, (i32, String)> {
    use std::io::Write as _;
    let mut child = petrel()
        .arg("user")
        .args(args)
        .arg("-c")
        .arg(config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // petrel may exit before reading (a refused address): ignore EPIPE.
    let _ = child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{stdin}\n").as_bytes());
    let output = child.wait_with_output().unwrap();
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err((
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ))
    }
}

#[test]
fn user_commands_manage_accounts_with_the_password_policy() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "[domains]\nlocal = [\"example.test\"]\n");
    let add = ["add", "alice@example.test", "--password-stdin"];

    let (code, message) = user(&config, &add, "Password123!").unwrap_err();
    assert_eq!(code, 2);
    assert!(message.contains("too easy to guess"), "{message}");
    let (code, message) = user(&config, &add, "short").unwrap_err();
    assert_eq!(code, 2);
    assert!(message.contains("at least 12 characters"), "{message}");
    assert!(message.contains("add an upper-case letter"), "{message}");

    let added = user(&config, &add, "Quiet-Lantern-42!").unwrap();
    assert!(added.contains("added alice@example.test"), "{added}");
    let (code, message) = user(&config, &add, "Quiet-Lantern-42!").unwrap_err();
    assert_eq!(code, 1);
    assert!(message.contains("already exists"), "{message}");

    let (code, message) = user(
        &config,
        &["add", "eve@elsewhere.example", "--password-stdin"],
        "Quiet-Lantern-42!",
    )
    .unwrap_err();
    assert_eq!(code, 2);
    assert!(message.contains("not a local domain"), "{message}");

    // Stored as argon2id PHC, never in clear.
    let db = rusqlite::Connection::open(dir.path().join("data/queue.db")).unwrap();
    let hash: String = db
        .query_row(
            "SELECT password_hash FROM users WHERE address = 'alice@example.test'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(hash.starts_with("$argon2id$v=19$"), "{hash}");
    assert!(!hash.contains("Quiet-Lantern"));

    user(
        &config,
        &["passwd", "Alice@Example.test", "--password-stdin"],
        "Brighter-Lantern-43?",
    )
    .unwrap();
    let changed: String = db
        .query_row(
            "SELECT password_hash FROM users WHERE address = 'alice@example.test'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_ne!(changed, hash);
    assert!(petrel::auth::password::verify(
        "Brighter-Lantern-43?",
        &changed
    ));

    let listed = user(&config, &["list"], "").unwrap();
    assert!(listed.starts_with("alice@example.test\t"), "{listed}");
    user(&config, &["del", "alice@example.test"], "").unwrap();
    assert_eq!(user(&config, &["list"], "").unwrap(), "");
    // An unknown account is the caller's mistake: exit 2, one line.
    let (code, message) = user(&config, &["del", "alice@example.test"], "").unwrap_err();
    assert_eq!(code, 2);
    assert_eq!(message, "petrel: no account alice@example.test\n");
}

#[test]
fn check_config_warns_about_an_undeliverable_postmaster() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "[domains]\nlocal = [\"example.test\"]\n");
    let output = check_config(&path);
    assert_eq!(output.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("postmaster@example.test is neither an account nor an alias"),
        "{stderr}"
    );

    let path = write_config(
        dir.path(),
        "[domains]\nlocal = [\"example.test\"]\n[aliases]\n\"postmaster@example.test\" = \"admin@elsewhere.example\"\n",
    );
    let output = check_config(&path);
    assert_eq!(output.status.code(), Some(0));
    assert!(!String::from_utf8_lossy(&output.stderr).contains("postmaster"));
}

/// check-config's exit code and everything it said.
fn checked(dir: &Path, extra: &str) -> (i32, String) {
    let path = write_config(dir, extra);
    let output = check_config(&path);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().unwrap_or(-1), said)
}

#[test]
fn check_config_catches_mistakes_a_parser_cannot() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    let openssl = |name: &str| {
        let status = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-days", "30", "-subj", "/CN=mail.example.test"])
            .args(["-addext", "subjectAltName=DNS:mail.example.test"])
            .arg("-keyout")
            .arg(certs.join(format!("{name}-key.pem")))
            .arg("-out")
            .arg(certs.join(format!("{name}-cert.pem")))
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
    };
    openssl("one");
    openssl("two");
    let pair = |cert: &str, key: &str| {
        format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            certs.join(cert).display(),
            certs.join(key).display()
        )
    };

    // Errors: exit 2, with the file named.
    let (code, said) = checked(dir.path(), &pair("missing-cert.pem", "one-key.pem"));
    assert_eq!(code, 2, "{said}");
    assert!(said.contains("missing-cert.pem"), "{said}");
    let (code, said) = checked(dir.path(), &pair("one-cert.pem", "two-key.pem"));
    assert_eq!(code, 2, "{said}");
    assert!(said.contains("does not go with key"), "{said}");
    let (code, said) = checked(
        dir.path(),
        "[delivery]\nsmarthost = \"relay.example.test:587\"\nsmarthost_user = \"u\"\n\
         smarthost_password_file = \"/nonexistent/smarthost.pass\"\n",
    );
    assert_eq!(code, 2, "{said}");
    assert!(said.contains("/nonexistent/smarthost.pass"), "{said}");

    // A matching pair for another name: fine, with a warning.
    let (code, said) = checked(dir.path(), &pair("one-cert.pem", "one-key.pem"));
    assert_eq!(code, 0, "{said}");
    assert!(
        said.contains("is not valid for hostname \"mx.test\" (it is only valid for "),
        "{said}"
    );
    // In words, not in Rust's debug names.
    assert!(!said.contains("CertNotValidForName"), "{said}");

    // Valid TOML, dangerous meaning: an open relay.
    for network in ["0.0.0.0/0", "::/0", "10.0.0.0/7"] {
        let (code, said) = checked(
            dir.path(),
            &format!("[relay]\ntrusted_networks = [\"{network}\"]\n"),
        );
        assert_eq!(code, 0, "{said}");
        assert!(said.contains("an open relay"), "{network}: {said}");
    }
    let (_, said) = checked(dir.path(), "[relay]\ntrusted_networks = [\"10.0.0.0/8\"]\n");
    assert!(!said.contains("an open relay"), "{said}");
}

#[test]
fn check_config_sees_a_data_dir_this_user_cannot_write() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = write_config(dir.path(), "");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o555)).unwrap();
    // root may write anywhere: check as an ordinary user then.
    let mut command = if rustix_is_root() {
        let mut command = Command::new("setpriv");
        command
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_petrel"));
        command
    } else {
        petrel()
    };
    let output = command
        .arg("check-config")
        .arg("-c")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is not writable by this user"), "{stderr}");
}

#[test]
fn check_config_wants_the_data_dir_passable_but_not_readable() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    // 0711 is what serve sets: local users reach public/submit.sock.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o711)).unwrap();
    let (code, said) = checked(dir.path(), "");
    assert_eq!(code, 0, "{said}");
    assert!(!said.contains("is mode"), "{said}");
    // Listable by others: queued mail's names and the Maildirs show.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (code, said) = checked(dir.path(), "");
    assert_eq!(code, 0, "{said}");
    assert!(
        said.contains("is mode 755; petrel serve makes it 0711"),
        "{said}"
    );
}

fn rustix_is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

#[test]
fn serve_accepts_mail_from_swaks_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let dns = common::standard_dns();
    let config = write_config(
        dir.path(),
        &format!(
            "[domains]\nlocal = [\"example.test\"]\n[dns]\nnameservers = [\"{}\"]\n",
            dns.addr
        ),
    );
    user(
        &config,
        &["add", "alice@example.test", "--password-stdin"],
        "Quiet-Lantern-42!",
    )
    .expect("account created");
    let mut serving = Serving::start(&config);
    let smtp = serving.listen_address("smtp");
    let output = Command::new("swaks")
        .args(["--server", &smtp.to_string()])
        .args(["--from", "sender@example.org", "--to", "alice@example.test"])
        .args(["--helo", "swaks.test", "--pipeline"])
        .args(["--header", "Subject: hello from swaks"])
        .output()
        .expect("swaks is installed (see .ci/run)");
    let transcript = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{transcript}");
    assert!(
        transcript.contains("250 2.0.0 OK queued as"),
        "{transcript}"
    );
    let accepted = serving.wait_for_log("accepted from=<sender@example.org>");
    assert!(accepted.contains("to=<alice@example.test>"), "{accepted}");

    // serve also delivers: the message reaches alice's Maildir.
    let delivered = serving.wait_for_log("to=<alice@example.test>, relay=local");
    assert!(delivered.contains("status=sent"), "{delivered}");
    let new = dir.path().join("data/mail/example.test/alice/new");
    let files: Vec<_> = std::fs::read_dir(&new).unwrap().collect();
    assert_eq!(files.len(), 1);
    let message = std::fs::read_to_string(files[0].as_ref().unwrap().path()).unwrap();
    assert!(
        message
            .starts_with("Return-Path: <sender@example.org>\nDelivered-To: alice@example.test\n")
    );
    assert!(message.contains("Subject: hello from swaks\n"), "{message}");

    let (code, log) = serving.terminate();
    assert_eq!(code, 0, "{}", log.join("\n"));
}

/// A cleaned-up /run, an operator's stray `rm`: shutdown must not
/// depend on the socket file still being there.
#[test]
fn sigterm_stops_the_server_after_its_socket_file_was_removed() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "[dns]\nnameservers = [\"127.0.0.1:9\"]\n");
    let serving = Serving::start(&config);
    std::fs::remove_file(dir.path().join("data/public/submit.sock")).unwrap();
    let (code, log) = serving.terminate();
    assert_eq!(code, 0, "{}", log.join("\n"));
}

#[test]
fn config_is_found_by_variable_then_in_the_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let from_variable = write_config(elsewhere.path(), "[domains]\nlocal = [\"variable.test\"]\n");
    let from_cwd = write_config(dir.path(), "[domains]\nlocal = [\"cwd.test\"]\n");
    let local_domains_of = |output: std::process::Output| {
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        stdout
            .lines()
            .find(|l| l.starts_with("local = "))
            .unwrap_or_default()
            .to_string()
    };
    let run = |env: Option<&Path>| {
        let mut command = petrel();
        command.arg("check-config").current_dir(dir.path());
        match env {
            Some(path) => command.env("PETREL_CONFIG", path),
            None => command.env_remove("PETREL_CONFIG"),
        };
        command.output().unwrap()
    };
    assert!(local_domains_of(run(Some(&from_variable))).contains("variable.test"));
    assert!(local_domains_of(run(None)).contains("cwd.test"));
    assert_eq!(from_cwd.parent().unwrap(), dir.path());
}

#[test]
fn defaults_are_announced_and_sendmail_refuses_to_invent_a_data_dir() {
    if system_config_installed("defaults_are_announced_and_sendmail_refuses") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let output = petrel()
        .args(["queue", "list"])
        .current_dir(dir.path())
        .env_remove("PETREL_CONFIG")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("using the built-in defaults"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");

    // sendmail, as cron calls it: no -c, no config anywhere.
    let empty = tempfile::tempdir().unwrap();
    let mut child = petrel()
        .args(["sendmail", "root"])
        .current_dir(empty.path())
        .env_remove("PETREL_CONFIG")
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let _ = child
            .stdin
            .take()
            .unwrap()
            .write_all(b"Subject: cron\n\nhello\n");
    }
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(75), "EX_TEMPFAIL");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("petrel.toml") && stderr.contains("/etc/petrel/petrel.toml"),
        "{stderr}"
    );
    assert!(
        std::fs::read_dir(empty.path()).unwrap().next().is_none(),
        "nothing created in the working directory"
    );
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    for args in [
        vec!["check-config"],
        vec!["queue", "list"],
        vec!["user", "list"],
    ] {
        let mut child = petrel()
            .arg("-c")
            .arg(&config)
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Read one line, then hang up, as `| head -1` does.
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut stdout, &mut line);
        drop(stdout);
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(output.status.code(), Some(0), "{args:?}: {stderr}");
    }
}

#[test]
fn help_works_on_every_command_without_a_config() {
    // `petrel sendmail --help` said "unknown sendmail option --help" (or,
    // without a config, "the message was not sent", exit 75).
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let output = petrel()
            .args(args)
            .current_dir(dir.path())
            .env("PETREL_CONFIG", dir.path().join("missing.toml"))
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    };
    let (code, help) = run(&["sendmail", "--help"]);
    assert_eq!(code, Some(0), "{help}");
    assert!(help.contains("Usage: petrel sendmail [OPTIONS]"), "{help}");
    assert!(help.contains("-bs SMTP on standard input"), "{help}");
    assert!(help.contains("--config <FILE>"), "{help}");
    // Invoked as sendmail, the page names itself so.
    let link = dir.path().join("sendmail");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_petrel"), &link).unwrap();
    let output = Command::new(&link).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{help}");
    assert!(help.contains("Usage: sendmail [OPTIONS]"), "{help}");
    for command in [
        &["serve", "--help"][..],
        &["check-config", "--help"],
        &["queue", "--help"],
        &["queue", "show", "--help"],
        &["user", "--help"],
        &["user", "app-password", "add", "--help"],
        &["dkim", "generate", "--help"],
        &["dns-check", "--help"],
    ] {
        let (code, help) = run(command);
        assert_eq!(code, Some(0), "{command:?}: {help}");
        assert!(help.contains("Usage: petrel"), "{command:?}: {help}");
    }
}
