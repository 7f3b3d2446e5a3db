//! The real binary under conditions an attacker or a careless setup
//! creates: an IPv6 /64 of clients (in a network namespace the test makes),
//! a permissive umask, a 20 MiB message, a remote server whose replies
//! carry terminal escape sequences.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;

use common::serving::{Serving, add_user, petrel, write_config};
use common::sink::Sink;
use common::*;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn ipv6_clients_are_limited_per_64_in_a_namespace_of_our_own() {
    // A user and network namespace: its own loopback, where we may add a
    // whole /64 of addresses, and nothing reaches outside it.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("petrel.toml");
    std::fs::write(
        &config,
        format!(
            "hostname = \"mx.test\"\ndata_dir = \"{}\"\n\
             [smtp]\nlisten = [\"[::]:2525\"]\n[submission]\nlisten = []\n[smtps]\nlisten = []\n\
             [limits]\nmax_sessions_per_ip = 2\nmax_connection_rate = 0\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let client = r#"
import socket, sys
held = []
def greet(source):
    s = socket.create_connection(("::1", 2525), timeout=10, source_address=(source, 0))
    line = s.makefile("rb").readline().decode()
    held.append(s)
    return line[:3]
same = [greet("2001:db8:1:2::%x" % n) for n in range(1, 7)]
other = greet("2001:db8:1:3::1")
print(" ".join(same), other)
"#;
    let script = format!(
        "set -e
         ip link set lo up
         for n in 1 2 3 4 5 6; do ip -6 addr add 2001:db8:1:2::$n/64 dev lo nodad; done
         ip -6 addr add 2001:db8:1:3::1/64 dev lo nodad
         RUST_LOG=info {petrel} serve -c {config} >/dev/null 2>{log} &
         server=$!
         trap 'kill -KILL $server 2>/dev/null || true' EXIT
         for i in $(seq 100); do grep -q 'petrel ready' {log} && break; sleep 0.1; done
         python3 -c '{client}'
         kill -TERM $server
         wait $server || true",
        petrel = env!("CARGO_BIN_EXE_petrel"),
        config = config.display(),
        log = dir.path().join("serve.log").display(),
    );
    let output = Command::new("unshare")
        .args(["--user", "--map-root-user", "--net", "sh", "-c", &script])
        .output()
        .expect("unshare (util-linux) runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}\n{}",
        String::from_utf8_lossy(&output.stderr),
        std::fs::read_to_string(dir.path().join("serve.log")).unwrap_or_default()
    );
    // Six addresses of one /64 are one client: two sessions, then 421;
    // the next /64 is another client.
    assert_eq!(stdout.trim(), "220 220 421 421 421 421 220");
}

#[test]
fn files_are_private_whatever_the_umask() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "[domains]\nlocal = [\"example.test\"]\n");
    add_user(&config, "alice@example.test");
    let mut command = Command::new("sh");
    command.args([
        "-c",
        "umask 022; exec \"$0\" serve -c \"$1\"",
        env!("CARGO_BIN_EXE_petrel"),
        config.to_str().unwrap(),
    ]);
    let mut serving = Serving::spawn(command);
    let mut client = RawClient::greeted(serving.listen_address("smtp"));
    let reply = client.send_message(
        "alice@example.test",
        &["alice@example.test"],
        b"Subject: m\r\n\r\nx\r\n",
    );
    assert_eq!(reply.code, 250);
    serving.wait_for_log("status=sent");
    let data = dir.path().join("data");
    // Others may pass through (to the local submission socket), never list.
    assert_eq!(mode(&data), 0o711);
    assert_eq!(mode(&data.join("public")), 0o711);
    assert_eq!(mode(&data.join("public/submit.sock")), 0o666);
    for file in [
        "queue.db",
        "queue.db-wal",
        "queue.db-shm",
        "tls/selfsigned-key.pem",
    ] {
        assert_eq!(mode(&data.join(file)), 0o600, "{file}");
    }
    for folder in [
        "tls",
        "mail",
        "mail/example.test",
        "mail/example.test/alice",
        "mail/example.test/alice/new",
    ] {
        assert_eq!(mode(&data.join(folder)), 0o700, "{folder}");
    }
    let message = std::fs::read_dir(data.join("mail/example.test/alice/new"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert_eq!(mode(&message), 0o600);
    serving.terminate();

    // Opened up by hand: the next start closes it again and says so.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(data.join("tls"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        data.join("queue.db"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let mut serving = Serving::start(&config);
    let warning = serving
        .seen_lines()
        .into_iter()
        .find(|l| l.contains("queue.db was readable by others"))
        .expect("a warning about queue.db");
    assert!(warning.contains("mode 644"), "{warning}");
    assert_eq!(mode(&data), 0o711);
    assert_eq!(mode(&data.join("tls")), 0o700);
    assert_eq!(mode(&data.join("queue.db")), 0o600);
    serving.terminate();
}

#[test]
fn a_twenty_mib_message_is_delivered_byte_exact_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "[domains]\nlocal = [\"example.test\"]\n");
    add_user(&config, "alice@example.test");
    let mut serving = Serving::start(&config);
    let mut body = b"Subject: big\r\n\r\n".to_vec();
    let mut n = 0u64;
    while body.len() < 20 * 1024 * 1024 {
        // Varied lines, some starting with a dot, to exercise stuffing.
        let prefix = if n.is_multiple_of(7) { "." } else { "" };
        body.extend_from_slice(
            format!(
                "{prefix}line {n:08} {}\r\n",
                "abcdefgh".repeat((n % 50) as usize)
            )
            .as_bytes(),
        );
        n += 1;
    }
    let mut client = RawClient::greeted(serving.listen_address("smtp"));
    let reply = client.send_message(
        "alice@example.test",
        &["alice@example.test"],
        &dot_stuff(&body),
    );
    assert_eq!(reply.code, 250, "{reply:?}");
    serving.wait_for_log("status=sent");
    let maildir = dir.path().join("data/mail/example.test/alice/new");
    let file = std::fs::read_dir(&maildir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let delivered = std::fs::read(file).unwrap();
    // The Maildir copy has LF line ends and our trace headers on top.
    let expected: Vec<u8> = String::from_utf8(body)
        .unwrap()
        .replace("\r\n", "\n")
        .into_bytes();
    assert!(delivered.ends_with(&expected), "the body arrived intact");
    let peak = serving.peak_rss_kib();
    eprintln!("peak RSS of petrel serve with a 20 MiB message: {peak} KiB");
    // Holding the message even once would take 20 MiB on top of the
    // server's own ~20 MiB; it never is held.
    assert!(peak < 36 * 1024, "peak RSS {peak} KiB");
    serving.terminate();
}

#[test]
fn memory_of_password_checks_is_given_back_after_sequential_logins() {
    // Each argon2id check used to leave its 19 MiB with the thread that
    // ran it: 80 wrong logins one after another left 278 MiB resident.
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "[domains]\nlocal = [\"example.test\"]\n[auth]\nmax_parallel_checks = 2\n",
    );
    add_user(&config, "alice@example.test");
    let serving = Serving::start(&config);
    let smtps = serving.listen_address("smtps");
    let cert = dir.path().join("data/tls/selfsigned-cert.pem");
    let login = |n: usize| {
        // A new address and name each time: no lockout, no slowdown.
        let mut client = RawClient::connect_from(&format!("127.0.9.{}", n + 1), smtps);
        client.upgrade_tls(&cert);
        client.expect_greeting();
        client.command("EHLO client.test");
        assert_eq!(
            client
                .auth_plain(&format!("nobody{n}@example.test"), "Wrong-Password-1!")
                .code,
            535
        );
    };
    // A session without a login first: TLS and the session threads warm.
    let mut warm = RawClient::connect_from("127.0.9.200", smtps);
    warm.upgrade_tls(&cert);
    warm.expect_greeting();
    warm.command("EHLO client.test");
    drop(warm);
    let baseline = serving.rss_kib();
    for n in 0..100 {
        login(n);
    }
    let after = serving.rss_kib();
    eprintln!("RSS before 100 sequential wrong logins {baseline} KiB, after {after} KiB");
    let bound = baseline + 2 * 20 * 1024;
    assert!(
        after <= bound,
        "RSS {after} KiB after 100 sequential logins; the bound is {bound} KiB \
         (baseline {baseline} + 2 checks x 20 MiB)"
    );
    serving.terminate();
}

#[test]
fn control_characters_from_the_network_are_escaped() {
    let sink = Sink::start("hostile", 0);
    let dns = standard_dns();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "[domains]\nlocal = [\"example.test\"]\n[relay]\ntrusted_networks = [\"127.0.0.0/8\"]\n\
             [dns]\nnameservers = [\"{}\"]\n[delivery]\nport = {}\n",
            dns.addr, sink.port
        ),
    );
    let mut serving = Serving::start(&config);
    let mut client = RawClient::greeted(serving.listen_address("smtp"));
    let reply = client.send_message(
        "x@example.org",
        &["friend@elsewhere.example"],
        b"Subject: \x1b[31mred\x1b[0m\r\n\r\nx\r\n",
    );
    assert_eq!(reply.code, 250);
    let id = queue_id_from(&reply.text());
    let line = serving.wait_for_log("status=deferred");
    assert!(!line.contains('\x1b'), "raw escape in the log: {line:?}");
    assert!(line.contains("\\x1b]0;pwned\\x07"), "{line}");
    let queue = |args: &[&str]| {
        let output = petrel()
            .args(["-c", config.to_str().unwrap(), "queue"])
            .args(args)
            .output()
            .unwrap();
        assert!(output.status.success());
        String::from_utf8(output.stdout).unwrap()
    };
    // The worker logs before the queue writer has recorded the attempt.
    wait_for("the deferral to be recorded", || {
        queue(&["list"]).contains("queued, 1 attempts")
    });
    for output in [queue(&["list"]), queue(&["show", &id])] {
        assert!(
            !output.contains('\x1b') && !output.contains('\x07'),
            "{output:?}"
        );
        assert!(output.contains("\\x1b]0;pwned\\x07"), "{output}");
    }
    let shown = queue(&["show", &id]);
    assert!(shown.contains("Subject: \\x1b[31mred\\x1b[0m"));
    // Folding tabs are printable: shown as they are (they showed as \x09).
    assert!(!shown.contains("\\x09"), "{shown}");
    assert!(shown.contains("\tby mx.test (petrel)"), "{shown}");
    serving.terminate();
}
