//! Every path petrel keeps in `data_dir`, by name, with its mode: one
//! place to look for what is where and who may read it.
//!
//! | name | what | mode |
//! | --- | --- | --- |
//! | `queue.db` (+ `-wal`, `-shm`) | the queue, accounts, lockouts, MTA-STS cache | 0600 |
//! | `spool/` | messages still being received | 0700 |
//! | `mail/DOMAIN/USER/` | Maildirs | 0700, messages 0600 |
//! | `dkim/` | DKIM keys (`dkim.key_dir` moves it) | keys 0600 |
//! | `tls/` | the generated certificate | 0700, key 0600 |
//! | `public/` | what local users reach by name | 0711 |
//! | `public/submit.sock` | local submission (`sendmail`) | 0666 |
//! | `public/maildrop/` | sendmail's files while no server runs | 1733 |
//! | `maildrop-refused/` | maildrop files set aside | 0700 |
//! | `control.sock` | the command line's way to the running server | 0600 |
//! | `petrel.lock` | held while a server runs | 0600 |
//!
//! `data_dir` itself is 0711: others may pass through to `public/`, never
//! list or read.

use std::path::{Path, PathBuf};

use super::StoreError;

pub const QUEUE_FILE: &str = "queue.db";
pub const SPOOL_DIR: &str = "spool";
pub const MAIL_DIR: &str = "mail";
pub const DKIM_DIR: &str = "dkim";
pub const TLS_DIR: &str = "tls";
pub const PUBLIC_DIR: &str = "public";
/// In [`PUBLIC_DIR`].
pub const SUBMIT_SOCKET: &str = "submit.sock";
/// In [`PUBLIC_DIR`].
pub const MAILDROP: &str = "maildrop";
/// Maildrop files that could not be accepted, kept for the operator.
pub const REFUSED_DIR: &str = "maildrop-refused";
pub const CONTROL_SOCKET: &str = "control.sock";
/// Held while a server runs: two servers on one queue would each think
/// the other's in-flight deliveries were abandoned.
pub const LOCK_FILE: &str = "petrel.lock";

/// The local submission socket `sendmail` talks to.
pub fn submit_socket(data_dir: &Path) -> PathBuf {
    data_dir.join(PUBLIC_DIR).join(SUBMIT_SOCKET)
}

/// Where `sendmail` leaves mail while no server runs.
pub fn maildrop(data_dir: &Path) -> PathBuf {
    data_dir.join(PUBLIC_DIR).join(MAILDROP)
}

/// Creates `data_dir` (0700 until the server opens it to 0711).
pub fn create(data_dir: &Path) -> Result<(), StoreError> {
    create_private_dir(data_dir).map_err(|e| {
        StoreError::new(format!(
            "cannot create data_dir {}: {e}",
            data_dir.display()
        ))
    })
}

/// Makes what petrel keeps in `data_dir` readable by its own user only,
/// whatever umask or hand made it: folders 0700, the queue database
/// (queued mail, password hashes) and private keys 0600. `data_dir` itself
/// and its `public/` folder are 0711 (others may pass through to the local
/// submission socket, never list or read), the maildrop 1733.
/// Returns a warning for each that was more open. Maildir messages are
/// written 0600 from the start; they are not walked here (there may be
/// millions).
pub fn make_private(data_dir: &Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut warnings = Vec::new();
    // `mode` is what to set when any bit of `open` is set.
    let mut restrict = |path: &Path, mode: u32, open: u32| {
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            return;
        };
        if meta.file_type().is_symlink() {
            return;
        }
        let current = meta.permissions().mode() & 0o7777;
        if current & open != 0 {
            match std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
                Ok(()) => warnings.push(format!(
                    "{} was readable by others (mode {current:o}); now {mode:o}",
                    path.display()
                )),
                Err(error) => warnings.push(format!(
                    "{} is readable by others (mode {current:o}) and cannot be changed: {error}",
                    path.display()
                )),
            }
        }
    };
    let private = 0o077;
    let passable = 0o066;
    restrict(data_dir, 0o711, passable);
    restrict(&data_dir.join(PUBLIC_DIR), 0o711, passable);
    for file in [QUEUE_FILE, "queue.db-wal", "queue.db-shm"] {
        restrict(&data_dir.join(file), 0o600, private);
    }
    for dir in [SPOOL_DIR, TLS_DIR, MAIL_DIR, REFUSED_DIR] {
        restrict(&data_dir.join(dir), 0o700, private);
    }
    if let Ok(entries) = std::fs::read_dir(data_dir.join(TLS_DIR)) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().contains("key") {
                restrict(&entry.path(), 0o600, private);
            }
        }
    }
    // Mail folders: mail/<domain>/<user>/{,tmp,new,cur}.
    if let Ok(domains) = std::fs::read_dir(data_dir.join(MAIL_DIR)) {
        for domain in domains.flatten() {
            restrict(&domain.path(), 0o700, private);
            let Ok(users) = std::fs::read_dir(domain.path()) else {
                continue;
            };
            for user in users.flatten() {
                restrict(&user.path(), 0o700, private);
                for sub in ["tmp", "new", "cur"] {
                    restrict(&user.path().join(sub), 0o700, private);
                }
            }
        }
    }
    warnings
}

/// Space left for new mail on the filesystem of `data_dir`, in octets (as
/// an unprivileged process may use it).
pub fn free_space(data_dir: &Path) -> std::io::Result<u64> {
    let stats = rustix::fs::statvfs(data_dir)?;
    Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
}

/// Creates `dir` (with its parents) for petrel's user only: 0700 whatever
/// the umask, since it holds queued mail, password hashes and keys.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}
