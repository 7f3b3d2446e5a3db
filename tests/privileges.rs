//! `[server] user`: started as root, `petrel serve` binds a privileged
//! port, gives data_dir to the user and becomes it before serving; `user`
//! and `queue` run by root become it too; and the attacks of the server's
//! user on root (symbolic links, hard links, swapped folders) fail. Needs
//! root (as CI runs), and fails without it.

mod common;

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::path::Path;

use common::serving::{Serving, petrel};
use common::{RawClient, wait_for};

const NOBODY: u32 = 65534;

/// These tests need root: they are ignored unless asked for (`cargo test
/// -- --ignored`, which CI runs as root), and fail loudly when asked for
/// without root rather than check nothing.
fn running_as_root(test: &str) {
    assert!(
        rustix::process::geteuid().is_root(),
        "{test} needs root: it starts petrel as root and attacks it as another user"
    );
}

/// A port below 1024 that nothing listens on, on 127.0.0.1.
/// Tests run in parallel: each gets a port no other test of this process
/// was given.
fn free_privileged_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(600);
    loop {
        let port = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        assert!(port < 1000, "no free port below 1024");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
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
#[ignore = "needs root"]
fn started_as_root_the_server_binds_then_serves_as_the_configured_user() {
    running_as_root("started_as_root_the_server_binds_then_serves");
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
    // An operator action run by root is logged as root's, not as the
    // user the command became (it said uid=65534).
    let output = petrel_as_root(&config, &["queue", "retry", "--all"]);
    assert!(output.status.success(), "{output:?}");
    serving.wait_for_log("retry now, by the operator (petrel queue, uid=0)");
    // Anyone else is told what the queue needs (it said "cannot switch
    // users", exit 2).
    let output = petrel()
        .arg("-c")
        .arg(&config)
        .args(["queue", "list"])
        .uid(1)
        .gid(1)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(
        err.contains("petrel queue needs root or the user nobody"),
        "{err}"
    );
    // check-config as another user: the keys it cannot read are "not
    // checked", not "missing".
    let output = petrel_as_root(&config, &["dkim", "generate", "example.test"]);
    assert!(output.status.success(), "{output:?}");
    let output = petrel()
        .arg("-c")
        .arg(&config)
        .arg("check-config")
        .uid(1)
        .gid(1)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!err.contains("make one with"), "{err}");
    assert!(err.contains("DKIM keys and accounts in"), "{err}");
    assert!(err.contains("not checked"), "{err}");
    let (code, _) = serving.terminate();
    assert_eq!(code, 0);
    assert_eq!(not_owned_by(&data_dir, NOBODY), Vec::<String>::new());
}

#[test]
#[ignore = "needs root"]
fn a_user_that_cannot_be_used_is_a_config_error() {
    running_as_root("a_user_that_cannot_be_used_is_a_config_error");
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
#[ignore = "needs root"]
fn check_config_asks_whether_the_user_can_read_what_it_reads_later() {
    running_as_root("check_config_asks_whether_the_user_can_read");
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

/// Runs `petrel ARGS` with the config, as root, and returns its output;
/// fails the test if it has not ended within the usual wait.
fn petrel_as_root(config: &Path, args: &[&str]) -> std::process::Output {
    let mut child = petrel()
        .arg("-c")
        .arg(config)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + common::WAIT;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("petrel {args:?} did not end");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// What the attacker wants changed: a root-owned folder outside data_dir
/// with a root-owned file and folder in it; returns a description of each
/// that is no longer root's with its old mode.
fn outside_target(dir: &Path) -> std::path::PathBuf {
    let outside = dir.join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::create_dir(outside.join("example.test")).unwrap();
    std::fs::write(outside.join("victim"), b"root's file").unwrap();
    for path in [
        outside.clone(),
        outside.join("example.test"),
        outside.join("victim"),
    ] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    outside
}

fn changed_outside(outside: &Path) -> Vec<String> {
    let mut changed = Vec::new();
    for path in [
        outside.to_path_buf(),
        outside.join("example.test"),
        outside.join("victim"),
    ] {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.uid() != 0 || meta.gid() != 0 || meta.mode() & 0o7777 != 0o700 {
            changed.push(format!(
                "{} is now uid {} gid {} mode {:o}",
                path.display(),
                meta.uid(),
                meta.gid(),
                meta.mode() & 0o7777
            ));
        }
    }
    if std::fs::read(outside.join("victim")).unwrap() != b"root's file" {
        changed.push("victim was written".into());
    }
    changed
}

/// Creates a symbolic link owned by nobody, as the attacker would.
fn plant_symlink(target: &Path, link: &Path) {
    std::os::unix::fs::symlink(target, link).unwrap();
    rustix::fs::chownat(
        rustix::fs::CWD,
        link,
        Some(rustix::fs::Uid::from_raw(NOBODY)),
        Some(rustix::fs::Gid::from_raw(NOBODY)),
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

#[test]
#[ignore = "needs root"]
fn root_never_follows_links_the_servers_user_planted_in_data_dir() {
    running_as_root("root_never_follows_links_the_servers_user_planted");
    let (dir, config, _port, _dns) = setup("[server]\nuser = \"nobody\"\n");
    let data_dir = dir.path().join("data");
    assert!(add_user(&config).status.success());
    let outside = outside_target(dir.path());
    // What nobody can do in its own data_dir: symbolic links where root
    // walks (a Maildir domain, the TLS folder, the lock file), and a hard
    // link to root's file (possible where fs.protected_hardlinks is off).
    std::fs::create_dir_all(data_dir.join("mail")).unwrap();
    plant_symlink(&outside, &data_dir.join("mail/evil.test"));
    plant_symlink(&outside, &data_dir.join("tls"));
    plant_symlink(&outside.join("victim"), &data_dir.join("petrel.lock"));
    // Where root's `sendmail` (a cron job) drops mail while no server runs.
    plant_symlink(&outside, &data_dir.join("public"));
    std::fs::create_dir_all(data_dir.join("spool")).unwrap();
    std::fs::hard_link(outside.join("victim"), data_dir.join("spool/linked")).unwrap();
    rustix::fs::chown(
        data_dir.join("mail"),
        Some(rustix::fs::Uid::from_raw(NOBODY)),
        Some(rustix::fs::Gid::from_raw(NOBODY)),
    )
    .unwrap();

    for args in [
        &["queue", "list"][..],
        &["user", "list"],
        &["check-config"],
        &["serve"],
    ] {
        let output = petrel_as_root(&config, args);
        let err = String::from_utf8_lossy(&output.stderr);
        if args == ["serve"] {
            // The planted lock file stops the server, and says why.
            assert_eq!(output.status.code(), Some(1), "{err}");
            assert!(err.contains("petrel.lock is a symbolic link"), "{err}");
        }
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(
            changed_outside(&outside),
            Vec::<String>::new(),
            "after {args:?}: {err}"
        );
    }
    let mut sendmail = petrel()
        .arg("-c")
        .arg(&config)
        .args(["sendmail", "alice@example.test"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = sendmail.stdin.take().unwrap();
        stdin
            .write_all(b"Subject: cron\n\nroot's output\n")
            .unwrap();
    }
    let output = sendmail.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(75), "{err}");
    assert!(err.contains("the message was not sent"), "{err}");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 2, "{err}");
}

#[test]
#[ignore = "needs root"]
fn a_folder_swapped_for_a_link_while_root_walks_gains_nothing() {
    running_as_root("a_folder_swapped_for_a_link_while_root_walks");
    let (dir, config, _port, _dns) = setup("[server]\nuser = \"nobody\"\n");
    let data_dir = dir.path().join("data");
    assert!(add_user(&config).status.success());
    let outside = outside_target(dir.path());
    std::fs::create_dir_all(data_dir.join("mail/example.test")).unwrap();
    for path in ["mail", "mail/example.test"] {
        rustix::fs::chown(
            data_dir.join(path),
            Some(rustix::fs::Uid::from_raw(NOBODY)),
            Some(rustix::fs::Gid::from_raw(NOBODY)),
        )
        .unwrap();
    }
    plant_symlink(&outside, &data_dir.join("swap"));
    // nobody swaps its Maildir folder and a link to root's folder, as fast
    // as it can, while root runs `petrel queue list` again and again (the
    // old walk chowned root's file by the 4th run).
    let stop = dir.path().join("stop-swapping");
    let mut attacker = std::process::Command::new("python3")
        .args([
            "-c",
            "import ctypes, os, sys\n\
             libc = ctypes.CDLL(None, use_errno=True)\n\
             a, b, stop = (p.encode() for p in sys.argv[1:4])\n\
             n = 0\n\
             while not os.path.exists(stop) and n < 50_000_000:\n\
             \x20   libc.renameat2(-100, a, -100, b, 2)\n\
             \x20   n += 1\n",
        ])
        .arg(data_dir.join("mail"))
        .arg(data_dir.join("swap"))
        .arg(&stop)
        .uid(NOBODY)
        .gid(NOBODY)
        .spawn()
        .unwrap();
    for run in 0..20 {
        let output = petrel_as_root(&config, &["queue", "list"]);
        let changed = changed_outside(&outside);
        if !changed.is_empty() {
            std::fs::write(&stop, b"").unwrap();
            let _ = attacker.wait();
            panic!(
                "run {run}: {changed:?}; {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
    std::fs::write(&stop, b"").unwrap();
    assert!(attacker.wait().unwrap().success(), "the attacker ran");
}

#[test]
#[ignore = "needs root"]
fn the_control_socket_answers_only_the_servers_user_and_root() {
    running_as_root("the_control_socket_answers_only_the_servers_user");
    let (dir, config, _port, _dns) = setup("[server]\nuser = \"nobody\"\n");
    let data_dir = dir.path().join("data");
    // Under umask 000 every file would be open to all but for explicit modes.
    let mut command = std::process::Command::new("sh");
    command
        .arg("-c")
        .arg("umask 000; exec \"$0\" -c \"$1\" serve")
        .arg(env!("CARGO_BIN_EXE_petrel"))
        .arg(&config);
    let mut serving = Serving::spawn(command);
    let control = data_dir.join("control.sock");
    let meta = std::fs::metadata(&control).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert_eq!(meta.uid(), NOBODY);
    let connect = "import socket, sys\n\
                   s = socket.socket(socket.AF_UNIX)\n\
                   try:\n\
                   \x20   s.connect(sys.argv[1])\n\
                   \x20   s.sendall(b'unlock alice@example.test\\n')\n\
                   \x20   print('answer:', s.recv(100))\n\
                   except OSError as e:\n\
                   \x20   print('refused:', e)\n";
    let daemon = |serving: &mut Serving| {
        let output = std::process::Command::new("python3")
            .args(["-c", connect])
            .arg(&control)
            .uid(1)
            .gid(1)
            .output()
            .unwrap();
        let _ = serving.seen_lines();
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let said = daemon(&mut serving);
    assert!(said.starts_with("refused:"), "{said}");
    // Were the mode wrong (or in the moment between bind and chmod), the
    // server still asks the kernel who connected.
    std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o666)).unwrap();
    let said = daemon(&mut serving);
    // Closed unanswered: the write or the read finds the connection gone.
    assert!(
        said.contains("answer: b''") || said.contains("Broken pipe") || said.contains("reset"),
        "{said}"
    );
    wait_for("the refusal in the log", || {
        serving
            .seen_lines()
            .iter()
            .any(|l| l.contains("control: refused a connection from uid 1"))
    });
    let log = serving.seen_lines();
    assert!(
        !log.iter().any(|l| l.contains("unlocked by the operator")),
        "{log:?}"
    );
}
