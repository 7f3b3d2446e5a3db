//! A Unix socket in `data_dir` through which `petrel queue` (and `petrel
//! sendmail`) wake the running scheduler, so operator actions take effect
//! at once without polling. Connecting is the wake-up; a client may also
//! send one line, `note <text>`, which the server writes to its log, so
//! what an operator did appears beside what the server did. It can do
//! nothing else. The socket is in the private data dir: only petrel's own
//! user (and root) can reach it.

use std::io::{self, BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use super::Waker;

pub const CONTROL_SOCKET: &str = "control.sock";

pub struct ControlSocket {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl ControlSocket {
    pub fn start(data_dir: &Path, waker: Waker) -> io::Result<ControlSocket> {
        let path = data_dir.join(CONTROL_SOCKET);
        // A socket file left by a crash would make bind fail; only one
        // server runs per data_dir (the lock file sees to that).
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        let listener = UnixListener::bind(&path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("control".into())
                .stack_size(64 * 1024)
                .spawn(move || {
                    for connection in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        if let Ok(connection) = connection {
                            log_note(connection);
                            waker.wake();
                        }
                    }
                })?
        };
        Ok(ControlSocket { path, stop, thread })
    }

    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.path);
        let _ = self.thread.join();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The longest note taken; the rest is ignored.
const MAX_NOTE: u64 = 1024;

/// Reads the optional `note <text>` line (briefly: a client that says
/// nothing is only a wake-up) and logs it.
fn log_note(connection: UnixStream) {
    let _ = connection.set_read_timeout(Some(Duration::from_millis(200)));
    let mut line = String::new();
    let mut reader = BufReader::new(connection.take(MAX_NOTE));
    if reader.read_line(&mut line).is_ok()
        && let Some(note) = line.trim_end().strip_prefix("note ")
    {
        log::info!("{}", crate::printable::escape(note));
    }
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
