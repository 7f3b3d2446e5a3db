//! A Unix socket in `data_dir` through which `petrel queue retry|bounce`
//! (and `petrel sendmail`) wake the running scheduler, so operator actions
//! take effect at once without polling. Connecting is the whole protocol:
//! it carries no data and can do nothing but trigger a queue scan.

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

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
                        if connection.is_ok() {
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

/// Wakes the server running on `data_dir`, if any. Returns whether one
/// was reached.
pub fn poke(data_dir: &Path) -> bool {
    UnixStream::connect(data_dir.join(CONTROL_SOCKET)).is_ok()
}
