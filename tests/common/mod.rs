//! Shared test harness: an in-process petrel on loopback ports chosen by
//! the kernel, with its own temporary data_dir, plus a small raw SMTP
//! client for dialogues that real client libraries would not produce.

#![allow(dead_code)]

pub mod dns;
pub mod https;
pub mod serving;
pub mod sink;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use petrel::config::Config;
use petrel::instance::{Instance, Options};
use petrel::protocol::session::ListenerKind;

pub const WAIT: Duration = Duration::from_secs(30);

/// The password of the accounts every test server has.
pub const PASSWORD: &str = "Test-Password-42!";
/// Accounts (logins and mailboxes) every test server has.
pub const ACCOUNTS: &[&str] = &[
    "alice@example.test",
    "bob@example.test",
    "carol@example.test",
];

/// argon2id is slow on purpose; hash the shared test password once.
fn password_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| petrel::auth::password::hash(PASSWORD).unwrap())
}

/// Creates accounts in a data dir's queue database (as `petrel user add`
/// does); accounts that exist already are left as they are.
pub fn add_accounts(data_dir: &Path, addresses: &[&str]) {
    use petrel::auth::accounts::{self, AccountError};
    let conn = petrel::store::open_direct(data_dir).unwrap();
    for address in addresses {
        match accounts::add(&conn, address, password_hash()) {
            Ok(()) | Err(AccountError::AlreadyExists(_)) => {}
            Err(error) => panic!("cannot add {address}: {error}"),
        }
    }
}

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
    // Every test host lives on loopback, which delivery refuses by default.
    config.delivery.allowed_networks = vec!["127.0.0.0/8".parse().unwrap()];
    // Tests open connections in quick succession from one address; the
    // tests of the rate limit turn it back on.
    config.limits.max_connection_rate = 0;
    config
}

/// The DNS every test server sees: the sender domains tests use exist,
/// and so does the foreign domain they relay to.
pub fn standard_dns() -> dns::TestDns {
    let dns = dns::TestDns::start();
    dns.mx("example.org", 10, "mx.example.org")
        .a("mx.example.org", "127.0.0.1")
        .mx("example.test", 10, "mx.example.test")
        .a("mx.example.test", "127.0.0.1")
        .mx("elsewhere.example", 10, "mx.elsewhere.example")
        .a("mx.elsewhere.example", "127.0.0.1");
    dns
}

pub struct TestServer {
    // Dropped in order: the server stops before its DNS and data dir go.
    pub instance: Option<Instance>,
    pub dns: dns::TestDns,
    pub dir: tempfile::TempDir,
}

impl TestServer {
    /// Accepts and queues, but does not deliver: tests look at the queue.
    pub fn start(adjust: impl FnOnce(&mut Config)) -> TestServer {
        TestServer::start_with(standard_dns(), Options { delivery: false }, adjust)
    }

    /// A complete MTA, delivering what it accepts.
    pub fn start_delivering(dns: dns::TestDns, adjust: impl FnOnce(&mut Config)) -> TestServer {
        TestServer::start_with(dns, Options { delivery: true }, adjust)
    }

    pub fn start_with(
        dns: dns::TestDns,
        options: Options,
        adjust: impl FnOnce(&mut Config),
    ) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = test_config(dir.path());
        config.dns.nameservers = vec![dns.addr];
        adjust(&mut config);
        add_accounts(&config.data_dir, ACCOUNTS);
        let instance = Instance::start_with(config, options).expect("petrel starts");
        TestServer {
            instance: Some(instance),
            dns,
            dir,
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

    /// The generated self-signed certificate, for clients to trust.
    pub fn cert_path(&self) -> PathBuf {
        self.instance()
            .config()
            .data_dir
            .join("tls/selfsigned-cert.pem")
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
        strip_received(&self.stored_content_of(id))
    }

    /// The stored content of a message, as it is.
    pub fn stored_content_of(&self, id: &str) -> Vec<u8> {
        self.db()
            .query_row(
                "SELECT c.content FROM messages m JOIN message_contents c ON c.id = m.content_id WHERE m.id = ?1",
                [id],
                |r| r.get(0),
            )
            .unwrap()
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

/// Removes the leading `Received:` header and the
/// `Authentication-Results:` that may follow it (with their folded lines).
pub fn strip_received(content: &[u8]) -> Vec<u8> {
    assert!(
        content.starts_with(b"Received: "),
        "no Received header first"
    );
    let rest = &content[field_end(content, 0)..];
    if rest.starts_with(b"Authentication-Results: ") {
        return rest[field_end(rest, 0)..].to_vec();
    }
    rest.to_vec()
}

/// Where the header field that starts at `pos` ends.
fn field_end(content: &[u8], mut pos: usize) -> usize {
    loop {
        let end = content[pos..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("header line end")
            + pos
            + 2;
        pos = end;
        if !matches!(content.get(pos), Some(b' ') | Some(b'\t')) {
            return pos;
        }
    }
}

/// The files in the Maildir `new/` of a local `address`, in name order.
pub fn maildir_messages(data_dir: &Path, address: &str) -> Vec<PathBuf> {
    let (local, domain) = address.split_once('@').unwrap();
    let new = data_dir.join("mail").join(domain).join(local).join("new");
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&new) {
        Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
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

type Transport = petrel::tls::Transport<rustls::ClientConnection>;

/// A bare SMTP client over TCP, optionally upgraded to TLS.
pub struct RawClient {
    transport: Transport,
    buffer: Vec<u8>,
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
        RawClient::over(TcpStream::connect(addr).expect("connect"))
    }

    /// Connects from a chosen loopback address (127.0.0.2, ...), so tests can
    /// play several clients.
    pub fn connect_from(source: &str, addr: SocketAddr) -> RawClient {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        let source: SocketAddr = format!("{source}:0").parse().unwrap();
        socket.bind(&source.into()).unwrap();
        socket.connect(&addr.into()).unwrap();
        RawClient::over(socket.into())
    }

    fn over(stream: TcpStream) -> RawClient {
        stream.set_read_timeout(Some(WAIT)).unwrap();
        RawClient {
            transport: Transport::Plain(stream),
            buffer: Vec::new(),
        }
    }

    /// Connects and reads the greeting, asserting it is 220.
    pub fn greeted(addr: SocketAddr) -> RawClient {
        let mut client = RawClient::connect(addr);
        client.expect_greeting();
        client
    }

    pub fn expect_greeting(&mut self) {
        let greeting = self.reply();
        assert_eq!(greeting.code, 220, "{greeting:?}");
    }

    /// Implicit TLS (port 465 style): handshake first, then the greeting.
    pub fn implicit_tls(addr: SocketAddr, trust: &Path) -> RawClient {
        let mut client = RawClient::connect(addr);
        client.upgrade_tls(trust);
        client.expect_greeting();
        client
    }

    /// Runs the TLS handshake now, trusting the PEM certificate at `trust`.
    /// Anything the server sent before it that we have not read is a bug.
    pub fn upgrade_tls(&mut self, trust: &Path) {
        self.try_upgrade_tls(trust).expect("TLS handshake");
    }

    pub fn try_upgrade_tls(&mut self, trust: &Path) -> std::io::Result<()> {
        assert!(
            self.buffer.is_empty(),
            "plaintext left over before TLS: {:?}",
            String::from_utf8_lossy(&self.buffer)
        );
        let config = client_tls_config(trust);
        let name = rustls::pki_types::ServerName::try_from("mx.test").unwrap();
        let connection = rustls::ClientConnection::new(config, name).unwrap();
        let placeholder = Transport::Plain(self.transport.tcp().try_clone().unwrap());
        let plain = std::mem::replace(&mut self.transport, placeholder);
        self.transport = plain.upgrade(connection, None)?;
        Ok(())
    }

    /// The DER certificate the server presented.
    pub fn peer_certificate(&self) -> Vec<u8> {
        let tls = self.transport.tls().expect("in TLS");
        tls.peer_certificates().expect("certificate")[0].to_vec()
    }

    /// STARTTLS, then the handshake; the caller must EHLO again.
    pub fn starttls(&mut self, trust: &Path) {
        let reply = self.command("STARTTLS");
        assert_eq!(reply.code, 220, "{reply:?}");
        self.upgrade_tls(trust);
    }

    pub fn tls_version(&self) -> Option<rustls::ProtocolVersion> {
        self.transport.tls().and_then(|tls| tls.protocol_version())
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.transport.send(bytes).expect("write");
    }

    /// Writes without asserting: the server may have hung up.
    pub fn try_send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.transport.send(bytes)
    }

    pub fn send(&mut self, line: &str) {
        self.send_raw(format!("{line}\r\n").as_bytes());
    }

    /// Reads one (possibly multi-line) reply.
    pub fn reply(&mut self) -> Reply {
        self.try_reply().expect("reply from server")
    }

    fn read_line(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                return Some(
                    String::from_utf8_lossy(&line)
                        .trim_end_matches(['\r', '\n'])
                        .to_string(),
                );
            }
            let mut chunk = [0u8; 4096];
            match self.transport.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// `None` when the server closed the connection.
    pub fn try_reply(&mut self) -> Option<Reply> {
        let mut lines = Vec::new();
        loop {
            let line = self.read_line()?;
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

    /// Asserts the server closed the connection without saying more.
    pub fn expect_closed(&mut self) {
        let mut rest = std::mem::take(&mut self.buffer);
        let _ = self.transport.read_to_end(&mut rest);
        assert!(
            rest.is_empty(),
            "unexpected bytes: {:?}",
            String::from_utf8_lossy(&rest)
        );
    }

    /// AUTH PLAIN with an initial response.
    pub fn auth_plain(&mut self, user: &str, password: &str) -> Reply {
        use base64::Engine as _;
        let token =
            base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
        self.command(&format!("AUTH PLAIN {token}"))
    }

    /// EHLO, MAIL, RCPT..., DATA, body (already dot-stuffed, ending CRLF),
    /// and the final reply.
    pub fn send_message(&mut self, from: &str, to: &[&str], body: &[u8]) -> Reply {
        let ehlo = self.command("EHLO client.test");
        assert_eq!(ehlo.code, 250, "{ehlo:?}");
        self.send_transaction(from, to, body)
    }

    /// MAIL, RCPT..., DATA and body, after EHLO.
    pub fn send_transaction(&mut self, from: &str, to: &[&str], body: &[u8]) -> Reply {
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

/// A rustls client configuration that trusts exactly the PEM certificate
/// at `trust` (the test server's self-signed one).
pub fn client_tls_config(trust: &Path) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(trust).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    std::sync::Arc::new(config)
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
