//! The real `petrel` binary as a child process, for tests that need a
//! separate process: signals, crashes, the command line.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use super::WAIT;

/// A config file in `dir` with every listener on a free port, data in
/// `dir/data`, and `extra` appended. Delivery may reach loopback, where
/// every test peer lives (in `extra`'s own `[delivery]` table if it has one).
/// Without a `[dns]` table of `extra`'s (a test DNS server), the inbound
/// SPF/DKIM/DMARC checks are off: they would ask the system's resolver.
pub fn write_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let path = dir.join("petrel.toml");
    let loopback = "allowed_networks = [\"127.0.0.0/8\"]\n";
    let mut extra = if extra.contains("[delivery]\n") {
        extra.replace("[delivery]\n", &format!("[delivery]\n{loopback}"))
    } else {
        format!("{extra}\n[delivery]\n{loopback}")
    };
    if !extra.contains("[dns]\n") && !extra.contains("[mail_auth]\n") {
        extra.push_str("\n[mail_auth]\nenabled = false\n");
    }
    let text = format!(
        "hostname = \"mx.test\"\ndata_dir = \"{}\"\n\
         [smtp]\nlisten = [\"127.0.0.1:0\"]\n\
         [submission]\nlisten = [\"127.0.0.1:0\"]\n\
         [smtps]\nlisten = [\"127.0.0.1:0\"]\n{extra}",
        dir.join("data").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

pub fn petrel() -> Command {
    Command::new(env!("CARGO_BIN_EXE_petrel"))
}

/// `petrel -c CONFIG dkim generate ARGS...`: the TXT record it printed,
/// as its name and its character strings (for the test DNS server).
#[allow(dead_code)] // not every test binary makes DKIM keys
pub fn dkim_generate(config: &Path, args: &[&str]) -> (String, Vec<String>) {
    let output = petrel()
        .args(["-c", config.to_str().unwrap(), "dkim", "generate"])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(output.status.success(), "{stdout}");
    let (name, rest) = stdout.trim().split_once(". IN TXT ").expect("a TXT record");
    let strings = rest
        .split("\" \"")
        .map(|s| s.trim_matches('"').to_string())
        .collect();
    (name.to_string(), strings)
}

/// `petrel user add ADDRESS` with the shared test password.
#[allow(dead_code)] // not every test binary adds users
pub fn add_user(config: &Path, address: &str) {
    use std::io::Write as _;
    let mut child = petrel()
        .arg("-c")
        .arg(config)
        .args(["user", "add", address, "--password-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{}\n", super::PASSWORD).as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "user add {address}");
}

/// A `petrel serve` child whose log is read line by line.
pub struct Serving {
    child: Child,
    log: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Serving {
    pub fn start(config: &Path) -> Serving {
        let mut command = petrel();
        command.arg("serve").arg("-c").arg(config);
        Serving::spawn(command)
    }

    /// Runs `command` (a `petrel serve` however started) and waits until
    /// it is ready.
    pub fn spawn(mut command: Command) -> Serving {
        let mut child = command
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (sender, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let mut serving = Serving {
            child,
            log,
            seen: Vec::new(),
        };
        serving.wait_for_log("petrel ready");
        serving
    }

    pub fn wait_for_log(&mut self, fragment: &str) -> String {
        let deadline = Instant::now() + WAIT;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.log.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(fragment) {
                        return line;
                    }
                }
                Err(_) => break,
            }
        }
        panic!(
            "log never said {fragment:?}; it said:\n{}",
            self.seen.join("\n")
        );
    }

    pub fn listen_address(&self, kind: &str) -> SocketAddr {
        let suffix = format!("({kind})");
        let line = self
            .seen
            .iter()
            .find(|l| l.contains("listening on") && l.ends_with(&suffix))
            .expect("listen line");
        line.split("listening on ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|addr| addr.parse().ok())
            .expect("address in listen line")
    }

    /// The log lines read so far (drains what has arrived).
    pub fn seen_lines(&mut self) -> Vec<String> {
        while let Ok(line) = self.log.try_recv() {
            self.seen.push(line);
        }
        self.seen.clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The peak resident memory of the server so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/PID/status")
    }

    /// The server's resident memory now (VmRSS), in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    pub fn terminate(mut self) -> (i32, Vec<String>) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        self.wait_for_log("petrel stopped");
        let exit = self.child.wait().unwrap();
        (exit.code().unwrap_or(-1), std::mem::take(&mut self.seen))
    }

    /// SIGKILL: no shutdown code runs, as in a crash or power cut.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Serving {
    /// A test that fails half-way must not leave a server running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
