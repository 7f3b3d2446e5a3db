//! A Unix socket in `data_dir` through which the command line reaches the
//! running server:
//! - connecting wakes the scheduler, so `petrel queue` actions take
//!   effect at once without polling;
//! - `note <text>`: the server writes the line to its log, so what an
//!   operator did appears beside what the server did;
//! - `unlock <account>` (`petrel user unlock`): lifts the AUTH lockouts of
//!   the addresses that failed at the account; the reply says which;
//! - `reload-aliases` (`newaliases`): the server reads the aliases from its
//!   config file again; the reply says how many, or why not;
//! - `reload` (`petrel reload`): what SIGHUP does: aliases, DKIM keys and
//!   `[dkim]`, the certificate; the reply is what was loaded.
//!
//! It can do nothing else, and only for petrel's own user and root: the
//! socket is mode 0600 whatever the umask, and each connection's peer is
//! asked who it is (the socket file's mode alone would leave a window
//! between bind and chmod, and `data_dir` is 0711 so others can pass).

use std::io::{self, BufRead as _, BufReader, Read as _, Write as _};
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::store::data_dir::CONTROL_SOCKET;

/// The control thread's stack.
const CONTROL_STACK: usize = 512 * 1024;

/// What the control socket can ask of the server.
pub trait Controls: Send + Sync + 'static {
    /// The queue changed: look at it again.
    fn wake(&self);
    /// Lifts the lockouts `account`'s failures caused; returns the
    /// addresses they held.
    fn unlock(&self, account: &str) -> Vec<IpAddr>;
    /// Reads the aliases from the config file again and routes with them
    /// from now on; returns how many there are.
    fn reload_aliases(&self) -> Result<usize, String>;
    /// Everything that can change without a restart (SIGHUP's work);
    /// returns what was loaded, a line for each part.
    fn reload(&self) -> Result<Vec<String>, String>;
}

pub struct ControlSocket {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
    /// The listening socket, to end the accept loop with.
    listener: UnixListener,
}

impl ControlSocket {
    pub fn start(data_dir: &Path, controls: Arc<dyn Controls>) -> io::Result<ControlSocket> {
        let path = data_dir.join(CONTROL_SOCKET);
        // A socket file left by a crash would make bind fail; only one
        // server runs per data_dir (the lock file sees to that).
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let waker = listener.try_clone()?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("control".into())
                // reload-aliases parses the whole config file (serde and
                // toml run deep in debug builds; 64 KiB overflowed). Only
                // the pages used are ever committed.
                .stack_size(CONTROL_STACK)
                .spawn(move || {
                    for connection in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        if let Ok(connection) = connection
                            && peer_may_control(&connection)
                        {
                            serve(connection, controls.as_ref());
                        }
                    }
                })?
        };
        Ok(ControlSocket {
            path,
            stop,
            thread,
            listener: waker,
        })
    }

    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        // Ends the blocked accept even when the socket file is gone (the
        // data dir removed under us): a shut-down listening socket fails
        // accept at once on Linux. Connecting is the fallback elsewhere.
        if rustix::net::shutdown(&self.listener, rustix::net::Shutdown::Read).is_err() {
            let _ = UnixStream::connect(&self.path);
        }
        let _ = self.thread.join();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Only the server's own user and root may control it.
fn peer_may_control(connection: &UnixStream) -> bool {
    let own = rustix::process::geteuid();
    match rustix::net::sockopt::socket_peercred(connection) {
        Ok(peer) if peer.uid == own || peer.uid.is_root() => true,
        Ok(peer) => {
            log::warn!(
                "control: refused a connection from uid {} (only uid {} and root may control \
                 the server)",
                peer.uid.as_raw(),
                own.as_raw()
            );
            false
        }
        Err(error) => {
            log::warn!("control: cannot tell who connected ({error}); refused");
            false
        }
    }
}

/// The longest line taken; the rest is ignored.
const MAX_LINE: u64 = 1024;

/// Reads the optional line (briefly: a client that says nothing is only a
/// wake-up) and does what it asks.
fn serve(connection: UnixStream, controls: &dyn Controls) {
    let _ = connection.set_read_timeout(Some(Duration::from_millis(200)));
    let mut line = String::new();
    let Ok(mut writer) = connection.try_clone() else {
        controls.wake();
        return;
    };
    let mut reader = BufReader::new(connection.take(MAX_LINE));
    let _ = reader.read_line(&mut line);
    let line = line.trim_end();
    if line == "reload" {
        let answer = match controls.reload() {
            Ok(lines) => format!("reloaded {}", lines.join(" | ")),
            Err(error) => format!("error {error}"),
        };
        let _ = writer.set_write_timeout(Some(Duration::from_millis(200)));
        let _ = writeln!(writer, "{}", answer.replace(['\r', '\n'], " "));
        return;
    }
    if line == "reload-aliases" {
        let answer = match controls.reload_aliases() {
            Ok(count) => format!("reloaded {count}"),
            Err(error) => format!("error {}", error.replace(['\r', '\n'], " ")),
        };
        let _ = writer.set_write_timeout(Some(Duration::from_millis(200)));
        let _ = writeln!(writer, "{answer}");
        return;
    }
    if let Some(note) = line.strip_prefix("note ") {
        log::info!("{}", crate::printable::escape(note));
    } else if let Some(account) = line.strip_prefix("unlock ") {
        let lifted = controls.unlock(account);
        let list: Vec<String> = lifted.iter().map(IpAddr::to_string).collect();
        log::info!(
            "auth: {} unlocked by the operator; lockouts lifted: {}",
            crate::printable::escape(account),
            if list.is_empty() {
                "none".to_string()
            } else {
                list.join(", ")
            }
        );
        let _ = writer.set_write_timeout(Some(Duration::from_millis(200)));
        let _ = writeln!(writer, "unlocked {}", list.join(" "));
        return;
    }
    controls.wake();
}

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(CONTROL_SOCKET)
}

/// Whether the control socket of `data_dir` is there but not for us (the
/// caller is neither root nor the server's user).
pub fn permission_denied(data_dir: &Path) -> bool {
    UnixStream::connect(data_dir.join(CONTROL_SOCKET))
        .is_err_and(|error| error.kind() == io::ErrorKind::PermissionDenied)
}

/// Wakes the server running on `data_dir`, if any. Returns whether one
/// was reached.
pub fn poke(data_dir: &Path) -> bool {
    UnixStream::connect(data_dir.join(CONTROL_SOCKET)).is_ok()
}

/// Wakes the server and has it log `note` (an operator action, a local
/// submission). Returns whether a server was reached.
pub fn notify(data_dir: &Path, note: &str) -> bool {
    let Ok(mut stream) = UnixStream::connect(data_dir.join(CONTROL_SOCKET)) else {
        return false;
    };
    let line = format!("note {}\n", note.replace(['\r', '\n'], " "));
    let _ = stream.write_all(line.as_bytes());
    true
}

/// Sends one request line to the server running on `data_dir` and reads
/// its one-line answer. `None`: no server was reached, or it did not
/// answer within `wait`.
fn ask(data_dir: &Path, request: &str, wait: Duration) -> Option<String> {
    let mut stream = UnixStream::connect(data_dir.join(CONTROL_SOCKET)).ok()?;
    let _ = stream.set_read_timeout(Some(wait));
    let line = format!("{}\n", request.replace(['\r', '\n'], " "));
    stream.write_all(line.as_bytes()).ok()?;
    let mut reply = String::new();
    BufReader::new(stream.take(64 * 1024))
        .read_line(&mut reply)
        .ok()?;
    Some(reply.trim_end().to_string())
}

/// An answer that is not what was asked for: the server's reason.
fn refusal(reply: &str) -> String {
    reply.strip_prefix("error ").unwrap_or(reply).to_string()
}

/// Asks the server running on `data_dir` to lift the lockouts caused by
/// failures at `account`. `None`: no server was reached; otherwise the
/// addresses it let in again.
pub fn unlock(data_dir: &Path, account: &str) -> Option<Vec<String>> {
    let reply = ask(
        data_dir,
        &format!("unlock {account}"),
        Duration::from_secs(5),
    )?;
    let lifted = reply.strip_prefix("unlocked")?;
    Some(lifted.split_whitespace().map(str::to_string).collect())
}

/// Asks the server running on `data_dir` to reload what can change while
/// it runs (SIGHUP's work): `None` when no server answered, else the lines
/// it logged, or why it could not.
pub fn reload(data_dir: &Path) -> Option<Result<Vec<String>, String>> {
    let reply = ask(data_dir, "reload", Duration::from_secs(30))?;
    match reply.strip_prefix("reloaded ") {
        Some(lines) => Some(Ok(lines.split(" | ").map(str::to_string).collect())),
        None if reply.is_empty() => None,
        None => Some(Err(refusal(&reply))),
    }
}

/// Asks the server running on `data_dir` to read its aliases again.
/// `None`: no server was reached; `Some(Ok(count))` or the server's reason.
pub fn reload_aliases(data_dir: &Path) -> Option<Result<usize, String>> {
    let reply = ask(data_dir, "reload-aliases", Duration::from_secs(10))?;
    Some(match reply.strip_prefix("reloaded ") {
        Some(count) => count
            .parse()
            .map_err(|_| format!("unexpected reply {reply:?}")),
        None => Err(refusal(&reply)),
    })
}
