//! rspamd for real (Debian's package), as operators run it with Postfix:
//! its proxy worker in milter mode, started by the test with a config
//! directory of its own on a loopback port. GTUBE is refused at the end of
//! DATA with rspamd's reply, an ordinary message arrives with the headers
//! rspamd adds, and with rspamd stopped `on_failure` decides, logged.
//!
//! rspamd's own DNS goes to a loopback port where nothing answers: it
//! never asks the world (its remote maps simply fail to load).

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::serving::{Serving, add_user, write_config};
use common::sink::free_port;
use common::standard_dns;

const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";

struct Rspamd {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Rspamd {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Rspamd {
    fn start() -> Rspamd {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let root = dir.path();
        for sub in ["db", "run", "local/local.d"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        let write = |name: &str, text: String| std::fs::write(root.join(name), text).unwrap();
        write(
            "rspamd.conf",
            format!(
                ".include \"$CONFDIR/common.conf\"\n\
                 options {{\n  pidfile = \"$RUNDIR/rspamd.pid\";\n  .include \"$CONFDIR/options.inc\"\n  \
                 .include(priority=10) \"$LOCAL_CONFDIR/options.inc\"\n}}\n\
                 logging {{\n  type = \"console\";\n  level = \"notice\";\n}}\n\
                 worker \"rspamd_proxy\" {{\n  bind_socket = \"127.0.0.1:{port}\";\n  \
                 .include \"$CONFDIR/worker-proxy.inc\"\n  \
                 .include(priority=10) \"$LOCAL_CONFDIR/worker-proxy.inc\"\n}}\n"
            ),
        );
        write(
            "local/options.inc",
            "filters = \"chartable,dkim,regexp\";\n\
             cache_file = \"$DBDIR/symbols.cache\";\n\
             dynamic_conf = \"$DBDIR/rspamd_dynamic\";\n\
             history_file = \"$DBDIR/rspamd.history\";\n\
             control_socket = \"$DBDIR/rspamd.sock mode=0600\";\n\
             enable_test_patterns = true;\n\
             dns {\n  nameserver = [\"127.0.0.1:1\"];\n  timeout = 0.2s;\n  retransmits = 1;\n}\n"
                .into(),
        );
        // The proxy scans by itself: no normal worker to forward to.
        write(
            "local/worker-proxy.inc",
            "milter = yes;\ntimeout = 120s;\ncount = 1;\n\
             upstream \"local\" {\n  default = yes;\n  self_scan = yes;\n}\n"
                .into(),
        );
        // Its verdict in the message, for loopback clients too.
        write(
            "local/local.d/milter_headers.conf",
            "use = [\"x-spamd-result\", \"x-spam-level\"];\n\
             skip_local = false;\nskip_authenticated = false;\n"
                .into(),
        );
        let var = |name: &str, path: &Path| format!("--var={name}={}", path.display());
        let child = Command::new("rspamd")
            .args(["-f", "-i", "-u", "root", "-g", "root", "-c"])
            .arg(root.join("rspamd.conf"))
            .arg(var("DBDIR", &root.join("db")))
            .arg(var("RUNDIR", &root.join("run")))
            .arg(var("LOGDIR", root))
            .arg(var("LOCAL_CONFDIR", &root.join("local")))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("rspamd (Debian package rspamd, see .ci/run)");
        // Loading its rules takes rspamd some seconds (ten on a 2-core
        // machine); polled, with a generous bound.
        let deadline = Instant::now() + Duration::from_secs(120);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "rspamd never listened on {port}");
            std::thread::sleep(Duration::from_millis(200));
        }
        Rspamd {
            child,
            port,
            _dir: dir,
        }
    }

    fn stop(&mut self) {
        // The main process takes its workers along on SIGTERM.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

fn swaks(serving: &Serving, body: &str, subject: &str) -> String {
    let smtp = serving.listen_address("smtp");
    let output = Command::new("swaks")
        .args(["--server", &smtp.to_string()])
        .args([
            "--from",
            "someone@example.org",
            "--to",
            "alice@example.test",
        ])
        .args(["--helo", "client.example.org"])
        .args(["--header", &format!("Subject: {subject}")])
        .args(["--body", body])
        .output()
        .expect("swaks (see .ci/run)");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn petrel_with_rspamd(
    dir: &Path,
    dns: std::net::SocketAddr,
    port: u16,
    on_failure: &str,
) -> Serving {
    let config = write_config(
        dir,
        &format!(
            "[domains]\nlocal = [\"example.test\"]\n[dns]\nnameservers = [\"{dns}\"]\n\
             [mail_auth]\nenabled = false\n\
             [[milter]]\naddress = \"inet:127.0.0.1:{port}\"\non_failure = \"{on_failure}\"\n\
             command_timeout = \"10s\"\n"
        ),
    );
    add_user(&config, "alice@example.test");
    Serving::start(&config)
}

fn maildir_with(data_dir: &Path, subject: &str) -> String {
    let new = data_dir.join("mail/example.test/alice/new");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for entry in std::fs::read_dir(&new).into_iter().flatten().flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            if text
                .lines()
                .any(|line| line.trim_end() == format!("Subject: {subject}"))
            {
                return text;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no message {subject:?} in {}",
            new.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn rspamd_refuses_gtube_marks_the_rest_and_its_absence_is_on_failures_to_decide() {
    let mut rspamd = Rspamd::start();
    let dns = standard_dns();
    let dir = tempfile::tempdir().unwrap();
    let mut serving = petrel_with_rspamd(dir.path(), dns.addr, rspamd.port, "tempfail");

    let said = swaks(&serving, GTUBE, "gtube");
    assert!(said.contains("<** 554 5.7.1 Gtube pattern"), "{said}");
    let reject = serving.wait_for_log("milter-reject: END-OF-MESSAGE from unknown[127.0.0.1]");
    assert!(
        reject.contains(
            ": 554 5.7.1 Gtube pattern; from=<someone@example.org> to=<alice@example.test>"
        ),
        "{reject}"
    );

    let said = swaks(&serving, "An ordinary message.", "ordinary");
    assert!(said.contains("<-  250 2.0.0 OK queued as"), "{said}");
    let delivered = maildir_with(&dir.path().join("data"), "ordinary");
    assert!(
        delivered.contains("\nX-Spamd-Result: default: False"),
        "{delivered}"
    );
    assert!(!delivered.contains(GTUBE));

    // rspamd stopped: tempfail defers the message, and says why.
    rspamd.stop();
    let said = swaks(&serving, "While rspamd is down.", "down");
    assert!(
        said.contains("<** 451 4.7.1 Service unavailable - try again later"),
        "{said}"
    );
    let line = serving.wait_for_log("message deferred (on_failure = tempfail)");
    assert!(line.contains("cannot connect"), "{line}");

    // ... and accept lets it through unfiltered, logged.
    let dir = tempfile::tempdir().unwrap();
    let mut serving = petrel_with_rspamd(dir.path(), dns.addr, rspamd.port, "accept");
    let said = swaks(&serving, "While rspamd is down.", "down, accepted");
    assert!(said.contains("<-  250 2.0.0 OK queued as"), "{said}");
    serving.wait_for_log("message accepted unfiltered (on_failure = accept)");
    let delivered = maildir_with(&dir.path().join("data"), "down, accepted");
    assert!(!delivered.contains("X-Spamd-Result"), "{delivered}");
}
