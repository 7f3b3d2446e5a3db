//! A receiving SMTP server written by others: Python's aiosmtpd, run from
//! tests/python/sink.py, recording every message it accepts to a folder.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub struct Sink {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

/// One message as the sink received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    pub content: Vec<u8>,
}

impl Sink {
    /// `mode` as documented in sink.py; `port` 0 lets the kernel choose.
    pub fn start(mode: &str, port: u16) -> Sink {
        let dir = tempfile::tempdir().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/sink.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(mode)
            .arg(dir.path())
            .arg(port.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().unwrap_or_else(|_| {
            panic!("sink.py did not start (is aiosmtpd installed? see .ci/run): {line:?}")
        });
        Sink { child, port, dir }
    }

    fn files(&self, extension: &str) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == extension))
            .collect();
        files.sort();
        files
    }

    pub fn messages(&self) -> Vec<Received> {
        self.files("eml")
            .into_iter()
            .map(|eml| {
                let envelope = std::fs::read_to_string(eml.with_extension("env")).unwrap();
                let mut lines = envelope.lines().map(str::to_string);
                Received {
                    mail_from: lines.next().unwrap_or_default(),
                    rcpt_to: lines.collect(),
                    content: std::fs::read(&eml).unwrap(),
                }
            })
            .collect()
    }

    /// Every DATA command it saw, accepted or not.
    pub fn data_attempts(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("attempts.log"))
            .map(|log| log.lines().count())
            .unwrap_or(0)
    }

    /// Connections opened and closed so far.
    pub fn connections(&self) -> (usize, usize) {
        let log =
            std::fs::read_to_string(self.dir.path().join("connections.log")).unwrap_or_default();
        let count = |event: &str| log.lines().filter(|l| *l == event).count();
        (count("open"), count("closed"))
    }

    pub fn wait_for_messages(&self, count: usize) -> Vec<Received> {
        super::wait_for(&format!("{count} messages at the sink"), || {
            self.files("eml").len() >= count
        });
        self.messages()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port that nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
