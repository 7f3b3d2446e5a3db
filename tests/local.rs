//! Local submission: users of this host run `petrel sendmail`, which talks
//! SMTP to the server over its Unix socket, where the kernel says who they
//! are; with no server running the message waits in the maildrop. Tests
//! that switch to another user (nobody, 65534) need root, and fail
//! without it.

mod common;

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use petrel::config::Config;
use petrel::instance::Options;

const NOBODY: u32 = 65534;

/// A directory others may enter, holding a copy of the binary and a
/// config for `sendmail`: the test's own tree may be closed to them.
struct LocalSetup {
    binary: PathBuf,
    config: PathBuf,
}

impl LocalSetup {
    fn new(server_dir: &Path, config: &Config) -> LocalSetup {
        std::fs::set_permissions(server_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let binary = server_dir.join("petrel");
        // A hard link, not a copy, where it can be: a copy is a file open
        // for writing, and a child another test forks meanwhile inherits
        // that descriptor until it execs, so running the copy can fail
        // with "text file busy" (ETXTBSY).
        if std::fs::hard_link(env!("CARGO_BIN_EXE_petrel"), &binary).is_err() {
            std::fs::copy(env!("CARGO_BIN_EXE_petrel"), &binary).unwrap();
        }
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
        let config_path = server_dir.join("sendmail.toml");
        std::fs::write(
            &config_path,
            format!(
                "hostname = \"mx.test\"\ndata_dir = \"{}\"\n[domains]\nlocal = [\"localhost\", \"example.test\"]\n",
                config.data_dir.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&config_path, std::fs::Permissions::from_mode(0o644)).unwrap();
        LocalSetup {
            binary,
            config: config_path,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.binary);
        command.args(args).arg("-c").arg(&self.config);
        command
    }

    /// Runs `petrel sendmail ARGS` as `uid` (None: as ourselves) with the
    /// message on stdin; returns the exit code and stderr.
    fn sendmail(&self, uid: Option<u32>, args: &[&str], message: &[u8]) -> (i32, String) {
        use std::io::Write as _;
        let mut all = vec!["sendmail"];
        all.extend_from_slice(args);
        let mut command = self.command(&all);
        if let Some(uid) = uid {
            // std drops supplementary groups when root sets the uid.
            command.uid(uid).gid(uid);
        }
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = spawn_when_not_busy(&mut command);
        let _ = child.stdin.take().unwrap().write_all(message);
        let output = child.wait_with_output().unwrap();
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }
}

/// Spawns, trying again while the binary is "text file busy": when it had
/// to be copied, a child forked by another test may still hold the copy's
/// write descriptor for a moment (bounded: 5 s).
fn spawn_when_not_busy(command: &mut Command) -> std::process::Child {
    for _ in 0..250 {
        match command.spawn() {
            Err(error) if error.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other.unwrap(),
        }
    }
    panic!("the binary stayed busy for 5 s");
}

/// `Command::output`, with [`spawn_when_not_busy`].
fn output_when_not_busy(command: &mut Command) -> std::process::Output {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    spawn_when_not_busy(command).wait_with_output().unwrap()
}

/// Switching to user nobody needs root: these tests are ignored unless
/// asked for (`cargo test -- --ignored`, which CI runs as root), and fail
/// loudly when asked for without root rather than check nothing.
fn running_as_root(test: &str) {
    assert!(
        rustix::process::geteuid().is_root(),
        "{test} needs root: it runs sendmail as user nobody"
    );
}

fn only_message(server: &TestServer) -> String {
    let ids: Vec<String> = {
        let db = server.db();
        let mut stmt = db.prepare("SELECT id FROM messages").unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    assert_eq!(ids.len(), 1, "{ids:?}");
    ids.into_iter().next().unwrap()
}

fn raw_content(server: &TestServer, id: &str) -> String {
    let content: Vec<u8> = server
        .db()
        .query_row(
            "SELECT c.content FROM messages m JOIN message_contents c ON c.id = m.content_id WHERE m.id = ?1",
            [id],
            |r| r.get(0),
        )
        .unwrap();
    String::from_utf8(content).unwrap()
}

/// Stops a server but keeps its directory, for a second one to start on.
fn stop_keeping_dir(mut server: TestServer) -> tempfile::TempDir {
    let dir = std::mem::replace(&mut server.dir, tempfile::tempdir().unwrap());
    server.shutdown();
    dir
}

#[test]
#[ignore = "needs root"]
fn a_local_user_sends_as_themselves_and_only_root_chooses_the_sender() {
    running_as_root("a_local_user_sends_as_themselves");
    let server = TestServer::start(|_| {});
    let setup = LocalSetup::new(server.dir.path(), server.instance().config());

    let (code, err) = setup.sendmail(
        Some(NOBODY),
        &["alice@example.test"],
        b"Subject: from nobody\n\nhello\n",
    );
    assert_eq!(code, 0, "{err}");
    // Silent on success, as cron expects (it mails any output back).
    assert_eq!(err, "");
    let id = only_message(&server);
    assert_eq!(server.sender_of(&id), "nobody@localhost");
    let content = raw_content(&server, &id);
    assert!(
        content.starts_with(&format!(
            "Received: by mx.test (petrel, from userid {NOBODY}) id {id};"
        )),
        "{content}"
    );
    assert!(
        content.contains("From: <nobody@localhost>\r\n"),
        "{content}"
    );

    // Another sender is refused, at once, with the reason on stderr.
    let (code, err) = setup.sendmail(
        Some(NOBODY),
        &["-f", "alice@example.test", "alice@example.test"],
        b"Subject: forged\n\nx\n",
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("553"), "{err}");
    assert!(
        err.contains("local user nobody may only send as <nobody@localhost>"),
        "{err}"
    );
    // The From: header is bound too (it was not: a local user sent
    // "From: alice@" under our DKIM signature).
    let (code, err) = setup.sendmail(
        Some(NOBODY),
        &["alice@example.test"],
        b"From: Alice <alice@example.test>\nSubject: forged\n\nx\n",
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("553"), "{err}");
    assert!(err.contains("not owned by nobody@localhost"), "{err}");
    // The queue itself is closed to the user: no reading others' mail.
    let (code, err) = {
        let output =
            output_when_not_busy(setup.command(&["queue", "list"]).uid(NOBODY).gid(NOBODY));
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("petrel queue needs root"), "{err}");
    // So do mailq, sendmail -q and newaliases, each saying so by name
    // (they said "cannot switch users", exit 2, or reported missing
    // accounts and no server, exit 0).
    for (args, name) in [
        (&["sendmail", "-bp"][..], "sendmail -bp"),
        (&["sendmail", "-q"], "sendmail -q"),
        (&["sendmail", "-bi"], "newaliases"),
    ] {
        let output = output_when_not_busy(setup.command(args).uid(NOBODY).gid(NOBODY));
        let err = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(&format!("{name} needs root")),
            "{args:?}: {err}"
        );
    }

    // Root may use any sender (cron jobs, daemons sending for others).
    // -v tells where the message went.
    let (code, err) = setup.sendmail(
        None,
        &["-v", "-f", "reports@example.test", "alice@example.test"],
        b"Subject: from root\n\nx\n",
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.starts_with("petrel: 2.0.0 OK queued as "), "{err}");
    let (code, err) = setup.sendmail(
        None,
        &["alice@example.test"],
        b"From: Reports <reports@example.test>\nSubject: from root\n\nx\n",
    );
    assert_eq!(code, 0, "root chooses the From: too: {err}");
    assert_eq!(server.message_count(), 3);
}

#[test]
#[ignore = "needs root"]
fn members_of_the_trusted_group_choose_the_sender() {
    running_as_root("members_of_the_trusted_group_choose_the_sender");
    let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(NOBODY))
        .unwrap()
        .expect("a group with gid 65534")
        .name;
    let server = TestServer::start(|config| config.sendmail.trusted_group = Some(group));
    let setup = LocalSetup::new(server.dir.path(), server.instance().config());
    let (code, err) = setup.sendmail(
        Some(NOBODY),
        &["-f", "alerts@example.test", "alice@example.test"],
        b"Subject: from a daemon\n\nx\n",
    );
    assert_eq!(code, 0, "{err}");
    let id = only_message(&server);
    assert_eq!(server.sender_of(&id), "alerts@example.test");
}

#[test]
#[ignore = "needs root"]
fn with_the_server_stopped_mail_waits_in_the_maildrop_and_leaves_at_start() {
    running_as_root("with_the_server_stopped_mail_waits_in_the_maildrop");
    let server = TestServer::start(|_| {});
    let data_dir = server.instance().config().data_dir.clone();
    let setup = LocalSetup::new(server.dir.path(), server.instance().config());
    let dir = stop_keeping_dir(server);
    let maildrop = data_dir.join("public/maildrop");

    let (code, err) = setup.sendmail(
        Some(NOBODY),
        &["alice@example.test"],
        b"Subject: while stopped\n\nwaiting\n",
    );
    assert_eq!(code, 0, "{err}");
    // Silent on success, maildrop or not (cron mails any output).
    assert_eq!(err, "");
    let (code, err) = setup.sendmail(
        Some(NOBODY),
        &["-v", "alice@example.test"],
        b"Subject: told\n\nwaiting\n",
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("waits in the maildrop"), "{err}");
    let dropped: Vec<_> = std::fs::read_dir(&maildrop)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(dropped.len(), 2, "{dropped:?}");
    for file in &dropped {
        assert_eq!(std::fs::metadata(file).unwrap().uid(), NOBODY);
    }
    // Users may add to the maildrop but not see what others left there.
    let listing = Command::new("ls")
        .arg(&maildrop)
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    assert!(!listing.status.success(), "nobody listed the maildrop");

    // What an attacker might plant: links that would make the server
    // read another user's file (here root's, who may use any sender).
    let forged = b"EHLO x\r\nMAIL FROM:<alice@example.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nSubject: forged\r\n\r\nx\r\n.\r\nQUIT\r\n";
    let roots_file = dir.path().join("roots-file");
    std::fs::write(&roots_file, forged).unwrap();
    std::fs::hard_link(&roots_file, maildrop.join("hardlinked")).unwrap();
    std::os::unix::fs::symlink(&roots_file, maildrop.join("symlinked")).unwrap();

    let server = TestServer::start_with(standard_dns(), Options { delivery: false }, |config| {
        config.data_dir = data_dir.clone();
    });
    wait_for("the maildrop to empty", || {
        std::fs::read_dir(&maildrop).unwrap().count() == 0
    });
    assert_eq!(server.message_count(), 2);
    let ids: Vec<String> = {
        let db = server.db();
        let mut stmt = db.prepare("SELECT id FROM messages").unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    for id in &ids {
        assert_eq!(server.sender_of(id), "nobody@localhost");
    }
    assert!(
        ids.iter()
            .any(|id| raw_content(&server, id).contains("Subject: while stopped"))
    );
    let mut set_aside: Vec<String> = std::fs::read_dir(data_dir.join("maildrop-refused"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    set_aside.sort();
    assert_eq!(set_aside, ["hardlinked", "symlinked"]);
}

#[test]
fn sendmail_bs_speaks_smtp_to_pythons_smtplib() {
    let server = TestServer::start(|_| {});
    let config = server.instance().config().clone();
    let setup = LocalSetup::new(server.dir.path(), &config);
    let me = petrel::server::local::local_user(
        &config,
        rustix::process::getuid().as_raw(),
        rustix::process::getgid().as_raw(),
    );
    let output = python(
        "sendmail_bs.py",
        &[
            setup.binary.to_str().unwrap(),
            setup.config.to_str().unwrap(),
            &me.address,
            "alice@example.test",
            "no-such-user@example.test",
        ],
    );
    assert!(output.contains("refused 550"), "{output}");
    let id = queue_id_from(&output);
    assert_eq!(server.sender_of(&id), me.address);
    assert_eq!(server.recipients_of(&id), ["alice@example.test"]);
    let content = raw_content(&server, &id);
    assert!(
        content.contains(&format!("(petrel, from userid {})", me.uid)),
        "the server knew who was on the other end"
    );
    // The fix-ups plain sendmail makes (it adds no Date: or Message-ID:
    // over -bs before).
    assert!(content.contains("\r\nDate: "), "{content}");
    assert!(
        content.contains(&format!("\r\nMessage-ID: <{id}@mx.test>\r\n")),
        "{content}"
    );
    assert!(
        content.contains(&format!("\r\nFrom: <{}>\r\n", me.address)),
        "{content}"
    );
}

#[test]
fn mailq_lists_the_queue_and_sendmail_q_retries_it() {
    let server = TestServer::start(|_| {});
    let config = server.instance().config().clone();
    let setup = LocalSetup::new(server.dir.path(), &config);
    let (code, err) = setup.sendmail(
        None,
        &["-f", "", "bob@example.test"],
        b"Subject: for the queue\n\nx\n",
    );
    assert_eq!(code, 0, "{err}");
    let id = only_message(&server);

    let mailq = server.dir.path().join("mailq");
    std::os::unix::fs::symlink(&setup.binary, &mailq).unwrap();
    let output = output_when_not_busy(Command::new(&mailq).arg("-c").arg(&setup.config));
    let listing = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(listing.contains(&id), "{listing}");
    assert!(listing.contains("bob@example.test"), "{listing}");

    let output = output_when_not_busy(&mut setup.command(&["sendmail", "-q"]));
    assert!(output.status.success(), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("1 recipient"),
        "{output:?}"
    );
}

#[test]
fn cron_output_without_headers_becomes_the_body() {
    let server = TestServer::start(|_| {});
    let setup = LocalSetup::new(server.dir.path(), server.instance().config());
    // `echo "disk usage: 42%" | sendmail alice`: "disk usage" is no field
    // name, so the whole input is body, after the headers petrel adds.
    let (code, err) = setup.sendmail(None, &["alice@example.test"], b"disk usage: 42%\n");
    assert_eq!(code, 0, "{err}");
    assert_eq!(err, "", "silent on success");
    let content = raw_content(&server, &only_message(&server));
    let (header, body) = content.split_once("\r\n\r\n").expect("a blank line");
    assert!(!header.contains("disk usage"), "{content}");
    assert!(header.contains("\r\nMessage-ID: <"), "{content}");
    assert_eq!(body, "disk usage: 42%\r\n");
}

#[test]
fn newaliases_reloads_the_running_servers_aliases() {
    let server = TestServer::start(|_| {});
    let setup = LocalSetup::new(server.dir.path(), server.instance().config());
    server.instance().set_config_file(&setup.config);
    let rcpt = |address: &str| {
        let mut client = RawClient::greeted(server.smtp());
        client.command("EHLO client.test");
        assert_eq!(client.command("MAIL FROM:<>").code, 250);
        client.command(&format!("RCPT TO:<{address}>")).code
    };
    assert_eq!(rcpt("helpdesk@example.test"), 550, "no such alias yet");

    let mut text = std::fs::read_to_string(&setup.config).unwrap();
    text.push_str("[aliases]\n\"helpdesk@example.test\" = \"bob@example.test\"\n");
    std::fs::write(&setup.config, text).unwrap();
    let output = output_when_not_busy(&mut setup.command(&["sendmail", "-bi"]));
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(said.contains("1 aliases checked"), "{said}");
    assert!(
        said.contains("the running server now routes with these aliases (1)"),
        "{said}"
    );
    assert_eq!(rcpt("helpdesk@example.test"), 250, "the new alias is live");
}

/// Reads the first reply line on a local socket connection.
fn first_line(stream: &std::os::unix::net::UnixStream) -> String {
    use std::io::BufRead as _;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut line = String::new();
    let _ = std::io::BufReader::new(stream).read_line(&mut line);
    line
}

#[test]
fn a_local_user_holding_many_sessions_takes_nothing_from_tcp_clients() {
    // Before: 256 local connections made ports 25 and 587 answer 421
    // 4.3.2, and 25 of them made 127.0.0.1 get 421 4.7.0, because local
    // sessions counted against the total and as 127.0.0.1.
    let server = TestServer::start(|config| {
        config.limits.max_sessions = 64;
        config.limits.max_sessions_per_ip = 20;
    });
    let socket = petrel::store::data_dir::submit_socket(&server.instance().config().data_dir);
    let held: Vec<std::os::unix::net::UnixStream> = (0..300)
        .map(|_| std::os::unix::net::UnixStream::connect(&socket).unwrap())
        .collect();
    let greetings: Vec<String> = held.iter().map(first_line).collect();
    let served = greetings.iter().filter(|g| g.starts_with("220")).count();
    let per_user = server
        .instance()
        .config()
        .limits
        .max_local_sessions_per_user;
    assert_eq!(served, per_user, "{greetings:?}");
    assert!(
        greetings
            .iter()
            .all(|g| g.starts_with("220") || g.starts_with("421")),
        "{greetings:?}"
    );
    // TCP clients from 127.0.0.1 still get every slot that is theirs
    // (max_sessions_per_ip: 19 here and one more below).
    let tcp: Vec<RawClient> = (0..19)
        .map(|_| {
            RawClient::greeted(server.addr(petrel::protocol::session::ListenerKind::Submission))
        })
        .collect();
    let mut mx = RawClient::greeted(server.smtp());
    assert_eq!(mx.command("EHLO client.test").code, 250);
    drop(tcp);
    drop(held);
}

#[test]
fn the_maildrop_refuses_what_sendmail_would_never_write() {
    use std::os::unix::fs::OpenOptionsExt as _;
    // Written with the server stopped, as a local user could.
    let dir = tempfile::tempdir().unwrap();
    let config = serving::write_config(dir.path(), "[domains]\nlocal = [\"example.test\"]\n");
    serving::add_user(&config, "alice@example.test");
    let maildrop = dir.path().join("data/public/maildrop");
    std::fs::create_dir_all(&maildrop).unwrap();
    let dialogue = |subject: &str| {
        format!(
            "EHLO x\r\nMAIL FROM:<alice@example.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n\
             Subject: {subject}\r\n\r\nx\r\n.\r\nQUIT\r\n"
        )
    };
    let write = |name: &str, mode: u32, content: &str| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(maildrop.join(name))
            .unwrap();
        std::io::Write::write_all(&mut file, content.as_bytes()).unwrap();
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .unwrap();
        file
    };
    write("good", 0o644, &dialogue("good"));
    // A name with a line break: the log must not show a forged line.
    write("evil\nwarning: forged", 0o644, &dialogue("odd name"));
    // Writable by all: whoever wrote it, it is not its owner's word.
    write("open-to-all", 0o666, &dialogue("open"));
    // 200 GiB that take 4 KiB on disk: read, it held a core for minutes.
    write("sparse", 0o644, "").set_len(200 << 30).unwrap();
    // What a dead sendmail left long ago, and one writing right now.
    let stale = write(".stale", 0o644, "half");
    stale
        .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(7200))
        .unwrap();
    write(".being-written", 0o644, "half");

    let started = std::time::Instant::now();
    let mut serving = serving::Serving::start(&config);
    wait_for("the maildrop to be dealt with", || {
        let mut left: Vec<String> = std::fs::read_dir(&maildrop)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        left == [".being-written"]
    });
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "the sparse file was read: {:?}",
        started.elapsed()
    );
    let mut refused: Vec<String> = std::fs::read_dir(dir.path().join("data/maildrop-refused"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    refused.sort();
    assert_eq!(refused, ["open-to-all", "sparse"]);
    serving.wait_for_log("maildrop file evil\\x0awarning: forged");
    let log = serving.seen_lines();
    assert!(
        !log.iter().any(|l| l.starts_with("warning: forged")),
        "{log:?}"
    );
    assert!(log.iter().any(|l| l.contains("removed .stale")), "{log:?}");
    wait_for("two messages delivered", || {
        maildir_messages(&dir.path().join("data"), "alice@example.test").len() == 2
    });
    serving.terminate();
}

#[test]
fn sendmail_keeps_the_disk_floor_when_it_drops_mail_off() {
    let server = TestServer::start(|_| {});
    let setup = LocalSetup::new(server.dir.path(), server.instance().config());
    let dir = stop_keeping_dir(server);
    // A floor no disk has: the maildrop must refuse, not fill the disk.
    let text = std::fs::read_to_string(&setup.config).unwrap();
    std::fs::write(
        &setup.config,
        format!("{text}[queue]\nmin_free_space = \"1000000GiB\"\n"),
    )
    .unwrap();
    let (code, err) = setup.sendmail(None, &["alice@example.test"], b"Subject: x\n\nx\n");
    assert_eq!(code, 75, "{err}");
    assert!(err.contains("queue.min_free_space"), "{err}");
    drop(dir);
}

#[test]
fn a_full_name_cannot_add_header_fields() {
    // Delivered before: `-F $'Eve\r\nReply-To: attacker@evil.example'`
    // added a Reply-To: field under petrel's DKIM signature.
    let server = TestServer::start_with(standard_dns(), Options { delivery: false }, |_| {});
    let setup = LocalSetup::new(server.dir.path(), server.instance().config());
    let (code, err) = setup.sendmail(
        None,
        &[
            "-F",
            "Eve\r\nReply-To: attacker@evil.example",
            "alice@example.test",
        ],
        b"Subject: hello\n\nx\n",
    );
    assert_eq!(code, 0, "{err}");
    let content = raw_content(&server, &only_message(&server));
    assert!(
        !content.lines().any(|l| l.starts_with("Reply-To:")),
        "{content}"
    );
    assert!(
        content.contains("From: \"Eve  Reply-To: attacker@evil.example\" <"),
        "{content}"
    );
}

#[test]
fn sendmail_t_without_recipients_says_what_is_missing() {
    let server = TestServer::start(|_| {});
    let setup = LocalSetup::new(server.dir.path(), server.instance().config());
    // It said "or use -t" to someone who had.
    let (code, err) = setup.sendmail(None, &["-t"], b"Subject: nobody to\n\nx\n");
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("the message has no To:, Cc: or Bcc: field"),
        "{err}"
    );
    let (code, err) = setup.sendmail(None, &[], b"Subject: nobody to\n\nx\n");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("or use -t"), "{err}");
}
