//! Shared test harness: an in-process petrel on loopback ports chosen by
//! the kernel, with its own temporary data_dir, plus a small raw SMTP
//! client for dialogues that real client libraries would not produce.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use petrel::config::Config;
use petrel::instance::Instance;
use petrel::protocol::session::ListenerKind;

pub const WAIT: Duration = Duration::from_secs(30);

/// A config for tests: every listener on 127.0.0.1:0, data in `dir`.
pub fn test_config(dir: &Path) -> Config {
    let any_port: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut config = Config {
        hostname: "mx.test".into(),
        data_dir: dir.join("data"),
        ..Config::default()
    };
    config.smtp.listen = vec![any_port];
    config.submission.listen = vec![any_port];
    config.smtps.listen = vec![any_port];
    config.domains.local = vec!["localhost".into(), "example.test".into()];
    config
}

pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub instance: Option<Instance>,
}

impl TestServer {
    pub fn start(adjust: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = test_config(dir.path());
        adjust(&mut config);
        let instance = Instance::start(config).expect("petrel starts");
        TestServer {
            dir,
            instance: Some(instance),
        }
    }

    pub fn instance(&self) -> &Instance {
        self.instance.as_ref().expect("running")
    }

    pub fn addr(&self, kind: ListenerKind) -> SocketAddr {
        self.instance().local_addr(kind).expect("listener bound")
    }

    pub fn smtp(&self) -> SocketAddr {
        self.addr(ListenerKind::Smtp)
    }

    pub fn db_path(&self) -> PathBuf {
        self.instance().config().data_dir.join("queue.db")
    }

    pub fn db(&self) -> rusqlite::Connection {
        let conn = rusqlite::Connection::open(self.db_path()).expect("open queue db");
        conn.busy_timeout(Duration::from_secs(10)).unwrap();
        conn
    }

    pub fn message_count(&self) -> i64 {
        self.db()
            .query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
            .unwrap()
    }

    /// The stored content of a message, without our Received header.
    pub fn content_of(&self, id: &str) -> Vec<u8> {
        let content: Vec<u8> = self
            .db()
            .query_row("SELECT content FROM messages WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .unwrap();
        strip_received(&content)
    }

    pub fn recipients_of(&self, id: &str) -> Vec<String> {
        let db = self.db();
        let mut stmt = db
            .prepare("SELECT address FROM recipients WHERE message_id = ?1 ORDER BY id")
            .unwrap();
        stmt.query_map([id], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    pub fn sender_of(&self, id: &str) -> String {
        self.db()
            .query_row("SELECT sender FROM messages WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .unwrap()
    }

    pub fn shutdown(mut self) {
        if let Some(instance) = self.instance.take() {
            instance.shutdown();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(instance) = self.instance.take() {
            instance.shutdown();
        }
    }
}

/// Removes the leading `Received:` header (with its folded lines).
pub fn strip_received(content: &[u8]) -> Vec<u8> {
    assert!(
        content.starts_with(b"Received: "),
        "no Received header first"
    );
    let mut pos = 0;
    loop {
        let end = content[pos..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("header line end")
            + pos
            + 2;
        pos = end;
        if !matches!(content.get(pos), Some(b' ') | Some(b'\t')) {
            return content[pos..].to_vec();
        }
    }
}

/// Polls `condition` until it holds or the deadline passes.
pub fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if condition() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out waiting for {what}");
}

/// The queue id from a "250 2.0.0 OK queued as ID" reply text.
pub fn queue_id_from(text: &str) -> String {
    text.rsplit(' ').next().unwrap().trim().to_string()
}

/// A bare SMTP client speaking over a plain TCP socket.
pub struct RawClient {
    pub reader: BufReader<TcpStream>,
    pub writer: TcpStream,
}

#[derive(Debug, Clone)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }
}

impl RawClient {
    pub fn connect(addr: SocketAddr) -> RawClient {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let writer = stream.try_clone().unwrap();
        RawClient {
            reader: BufReader::new(stream),
            writer,
        }
    }

    /// Connects and reads the greeting, asserting it is 220.
    pub fn greeted(addr: SocketAddr) -> RawClient {
        let mut client = RawClient::connect(addr);
        let greeting = client.reply();
        assert_eq!(greeting.code, 220, "{greeting:?}");
        client
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("write");
    }

    pub fn send(&mut self, line: &str) {
        self.send_raw(format!("{line}\r\n").as_bytes());
    }

    /// Reads one (possibly multi-line) reply.
    pub fn reply(&mut self) -> Reply {
        self.try_reply().expect("reply from server")
    }

    /// `None` when the server closed the connection.
    pub fn try_reply(&mut self) -> Option<Reply> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
            let line = line.trim_end_matches(['\r', '\n']).to_string();
            assert!(line.len() >= 3, "short reply line {line:?}");
            let code: u16 = line[..3].parse().expect("reply code");
            let last = line.as_bytes().get(3) != Some(&b'-');
            lines.push(line.get(4..).unwrap_or("").to_string());
            if last {
                return Some(Reply { code, lines });
            }
        }
    }

    pub fn command(&mut self, line: &str) -> Reply {
        self.send(line);
        self.reply()
    }

    /// Asserts the server closed the connection.
    pub fn expect_closed(&mut self) {
        let mut rest = Vec::new();
        let _ = self.reader.read_to_end(&mut rest);
        assert!(
            rest.is_empty(),
            "unexpected bytes: {:?}",
            String::from_utf8_lossy(&rest)
        );
    }

    /// EHLO, MAIL, RCPT..., DATA, body (already dot-stuffed, ending CRLF),
    /// and the final reply.
    pub fn send_message(&mut self, from: &str, to: &[&str], body: &[u8]) -> Reply {
        let ehlo = self.command("EHLO client.test");
        assert_eq!(ehlo.code, 250, "{ehlo:?}");
        let mail = self.command(&format!("MAIL FROM:<{from}>"));
        assert_eq!(mail.code, 250, "{mail:?}");
        for rcpt in to {
            let reply = self.command(&format!("RCPT TO:<{rcpt}>"));
            assert_eq!(reply.code, 250, "{reply:?}");
        }
        let data = self.command("DATA");
        assert_eq!(data.code, 354, "{data:?}");
        self.send_raw(body);
        self.send_raw(b".\r\n");
        self.reply()
    }
}

/// Dot-stuffs a message for DATA (RFC 5321 4.5.2).
pub fn dot_stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 16);
    let mut at_line_start = true;
    for &byte in body {
        if at_line_start && byte == b'.' {
            out.push(b'.');
        }
        out.push(byte);
        at_line_start = byte == b'\n';
    }
    out
}

/// Runs a Python script from tests/python with arguments; returns stdout.
pub fn python(script: &str, args: &[&str]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(script);
    let output = std::process::Command::new("python3")
        .arg(&path)
        .args(args)
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "{script} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Reads everything a stream says within its timeout (for logs in asserts).
pub fn read_available(stream: &mut impl Read) -> String {
    let mut buf = Vec::new();
    let _ = stream.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}
