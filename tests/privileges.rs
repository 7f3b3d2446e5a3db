//! `[server] user`: started as root, `petrel serve` binds a privileged
//! port, gives data_dir to the user and becomes it before serving; `user`
//! and `queue` run by root become it too. Needs root (as CI runs); say so
//! when skipped.

mod common;

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::path::Path;

use common::serving::{Serving, petrel};
use common::{RawClient, wait_for};

const NOBODY: u32 = 65534;

fn running_as_root(test: &str) -> bool {
    let root = rustix::process::geteuid().is_root();
    if !root {
        eprintln!("SKIPPED {test}: needs root");
    }
    root
}

/// A port below 1024 that nothing listens on, on 127.0.0.1.
fn free_privileged_port() -> u16 {
    (600..1000)
        .find(|port| std::net::TcpListener::bind(("127.0.0.1", *port)).is_ok())
        .expect("a free port below 1024")
}

/// A directory nobody may enter (the data dir's parent must be), with a
/// config naming `extra` as its last lines.
fn setup(
    extra: &str,
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    u16,
    common::dns::TestDns,
) {
    let dns = common::standard_dns();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let port = free_privileged_port();
    let config = dir.path().join("petrel.toml");
    std::fs::write(
        &config,
        format!(
            "hostname = \"mx.test\"\ndata_dir = \"{}\"\n\
             [smtp]\nlisten = [\"127.0.0.1:{port}\"]\n\
             [submission]\nlisten = []\n[smtps]\nlisten = []\n\
             [domains]\nlocal = [\"example.test\"]\n\
             [aliases]\n\"postmaster@example.test\" = \"alice@example.test\"\n\
             [dns]\nnameservers = [\"{}\"]\n\
             [delivery]\nallowed_networks = [\"127.0.0.0/8\"]\n{extra}",
            dir.path().join("data").display(),
            dns.addr
        ),
    )
    .unwrap();
    (dir, config, port, dns)
}

fn add_user(config: &Path) -> std::process::Output {
    use std::io::Write as _;
    let mut child = petrel()
        .arg("-c")
        .arg(config)
        .args(["user", "add", "alice@example.test", "--password-stdin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Quiet-Lantern-42!\n")
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Everything in `dir` not owned by `uid`, symbolic links aside.
fn not_owned_by(dir: &Path, uid: u32) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.uid() != uid {
            found.push(format!("{} (uid {})", path.display(), meta.uid()));
        }
        if meta.is_dir() {
            stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        }
    }
    found
}

fn status_ids(pid: u32) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .filter(|l| l.starts_with("Uid:") || l.starts_with("Gid:") || l.starts_with("Groups:"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

#[test]
fn started_as_root_the_server_binds_then_serves_as_the_configured_user() {
    if !running_as_root("started_as_root_the_server_binds_then_serves") {
        return;
    }
    let (dir, config, port, _dns) = setup("[server]\nuser = \"nobody\"\n");
    let data_dir = dir.path().join("data");
    // Run by root before the server ever started: the account database is
    // created as nobody's, not root's.
    let output = add_user(&config);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(not_owned_by(&data_dir, NOBODY), Vec::<String>::new());
    // A file root left behind is handed over at start.
    std::fs::write(data_dir.join("left-by-root"), b"").unwrap();

    let mut serving = Serving::start(&config);
    let log = serving.seen_lines();
    assert!(
        log.iter()
            .any(|l| l.contains("running as nobody (uid 65534)")),
        "{log:?}"
    );
    // Every thread, not only the main one.
    let tasks = std::fs::read_dir(format!("/proc/{}/task", serving.pid())).unwrap();
    let mut threads = 0;
    for task in tasks {
        let tid: u32 = task.unwrap().file_name().to_string_lossy().parse().unwrap();
        assert_eq!(
            status_ids(tid),
            [
                "Uid: 65534 65534 65534 65534",
                "Gid: 65534 65534 65534 65534",
                "Groups: 65534"
            ],
            "thread {tid}"
        );
        threads += 1;
    }
    assert!(threads > 5, "{threads} threads");

    // Serving on the privileged port, delivering as nobody.
    let mut client = RawClient::greeted(format!("127.0.0.1:{port}").parse().unwrap());
    client.command("EHLO client.test");
    let reply = client.send_message(
        "someone@example.org",
        &["alice@example.test"],
        b"Subject: after the drop\r\n\r\nhello\r\n",
    );
    assert_eq!(reply.code, 250, "{reply:?}");
    let new = data_dir.join("mail/example.test/alice/new");
    wait_for("the Maildir delivery", || {
        std::fs::read_dir(&new).map(|d| d.count()).unwrap_or(0) == 1
    });
    let (code, _) = serving.terminate();
    assert_eq!(code, 0);
    assert_eq!(not_owned_by(&data_dir, NOBODY), Vec::<String>::new());
}

#[test]
fn a_user_that_cannot_be_used_is_a_config_error() {
    if !running_as_root("a_user_that_cannot_be_used_is_a_config_error") {
        return;
    }
    let (_dir, config, _, _dns) = setup("[server]\nuser = \"no-such-petrel-user\"\n");
    let output = petrel()
        .arg("-c")
        .arg(&config)
        .arg("serve")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(
        err.contains("server.user = \"no-such-petrel-user\": no such user"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    // Not root and not that user: cannot switch, said before binding.
    let (_dir, config, _, _dns) = setup("[server]\nuser = \"daemon\"\n");
    let output = petrel()
        .arg("-c")
        .arg(&config)
        .arg("serve")
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot switch users"), "{err}");
}

#[test]
fn check_config_asks_whether_the_user_can_read_what_it_reads_later() {
    if !running_as_root("check_config_asks_whether_the_user_can_read") {
        return;
    }
    let (dir, config, _, _dns) = setup("");
    let secret = dir.path().join("smarthost.pass");
    std::fs::write(&secret, "hunter2\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text = text.replace(
        "[delivery]\n",
        &format!(
            "[delivery]\nsmarthost = \"relay.example.net:587\"\nsmarthost_user = \"me\"\n\
             smarthost_password_file = \"{}\"\n",
            secret.display()
        ),
    );
    text.push_str("[server]\nuser = \"nobody\"\n");
    std::fs::write(&config, text).unwrap();
    let check = || {
        let output = petrel()
            .arg("-c")
            .arg(&config)
            .arg("check-config")
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, err) = check();
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("is read at each delivery, as nobody, who cannot read it"),
        "{err}"
    );
    // Group-readable by the server's group: fine.
    rustix::fs::chown(&secret, None, Some(rustix::fs::Gid::from_raw(NOBODY))).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (code, err) = check();
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("smarthost_password_file"), "{err}");
}
