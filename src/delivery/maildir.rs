//! Local delivery into Maildirs under `data_dir/mail/<domain>/<user>/`.
//! A message is written to `tmp/`, fsynced, and renamed into `new/` (then
//! the directory is fsynced), so a reader never sees half a message and a
//! crash never loses one the queue has let go of. Folders are 0700 and
//! messages 0600, whatever the umask: mail is private.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::store::data_dir::MAIL_DIR;

/// The Maildir of an account (lookup form, `local@domain`).
pub fn maildir_path(data_dir: &Path, address: &str) -> PathBuf {
    let (local, domain) = address.rsplit_once('@').unwrap_or((address, ""));
    data_dir
        .join(MAIL_DIR)
        .join(safe_component(domain))
        .join(safe_component(local))
}

/// Quoted local parts may contain '/' or start with '.'; a path component
/// must not do either.
fn safe_component(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (index, c) in text.chars().enumerate() {
        match c {
            '/' | '\\' | '\0' => out.push_str(&format!("%{:02X}", c as u32)),
            '.' if index == 0 => out.push_str("%2E"),
            c => out.push(c),
        }
    }
    if out.is_empty() {
        out.push_str("%00");
    }
    out
}

/// Creates `tmp/`, `new/` and `cur/` if needed, readable by us only.
pub fn create(maildir: &Path) -> io::Result<()> {
    create_with(maildir, &mut |parent| File::open(parent)?.sync_all())
}

/// [`create`], syncing each parent a folder was created in with `sync`:
/// a folder's name is on disk only once its parent is fsynced, and a
/// mailbox's first message, renamed into a `new/` whose name was lost in a
/// power cut, would vanish after the queue had let it go.
fn create_with(maildir: &Path, sync: &mut dyn FnMut(&Path) -> io::Result<()>) -> io::Result<()> {
    for sub in ["tmp", "new", "cur"] {
        let dir = maildir.join(sub);
        let missing: Vec<&Path> = dir.ancestors().take_while(|p| !p.is_dir()).collect();
        for folder in missing.into_iter().rev() {
            match fs::DirBuilder::new().mode(0o700).create(folder) {
                Err(error) if error.kind() != io::ErrorKind::AlreadyExists => return Err(error),
                _ => {}
            }
            if let Some(parent) = folder.parent() {
                sync(parent)?;
            }
        }
    }
    Ok(())
}

/// A name unique on this host (the Maildir convention: time, pid, counter).
fn unique_name(hostname: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let host: String = hostname
        .chars()
        .map(|c| if c == '/' || c == ':' { '_' } else { c })
        .collect();
    format!(
        "{}.M{}P{}Q{}.{host}",
        now.as_secs(),
        now.subsec_micros(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Writes the message with `Return-Path:` and `Delivered-To:` on top.
/// `write_body` writes the stored message (CRLF lines) into the writer it
/// is given, in pieces; Maildir files use the local newline convention
/// (LF), as Postfix and Dovecot write them.
pub fn deliver(
    data_dir: &Path,
    hostname: &str,
    address: &str,
    sender: &str,
    write_body: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> io::Result<PathBuf> {
    let maildir = maildir_path(data_dir, address);
    create(&maildir)?;
    let name = unique_name(hostname);
    let tmp = maildir.join("tmp").join(&name);
    let new = maildir.join("new").join(&name);
    let written = (|| {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        let mut out = LineEnds::new(BufWriter::with_capacity(64 * 1024, file));
        out.inner
            .write_all(format!("Return-Path: <{sender}>\nDelivered-To: {address}\n").as_bytes())?;
        write_body(&mut out)?;
        let file = out.finish()?;
        file.sync_all()?;
        fs::rename(&tmp, &new)?;
        File::open(maildir.join("new"))?.sync_all()
    })();
    if let Err(error) = written {
        let _ = fs::remove_file(&tmp);
        return Err(error);
    }
    Ok(new)
}

/// Turns CRLF into LF on the way through, across write boundaries.
struct LineEnds<W: Write> {
    inner: BufWriter<W>,
    pending_cr: bool,
}

impl<W: Write> LineEnds<W> {
    fn new(inner: BufWriter<W>) -> LineEnds<W> {
        LineEnds {
            inner,
            pending_cr: false,
        }
    }

    fn finish(mut self) -> io::Result<W> {
        if self.pending_cr {
            self.inner.write_all(b"\r")?;
        }
        self.inner.into_inner().map_err(|e| e.into_error())
    }
}

impl<W: Write> Write for LineEnds<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut rest = buf;
        if self.pending_cr && !rest.is_empty() {
            self.pending_cr = false;
            if rest[0] != b'\n' {
                self.inner.write_all(b"\r")?;
            }
        }
        while let Some(cr) = rest.iter().position(|&b| b == b'\r') {
            self.inner.write_all(&rest[..cr])?;
            match rest.get(cr + 1) {
                Some(b'\n') => {}
                Some(_) => self.inner.write_all(b"\r")?,
                None => self.pending_cr = true,
            }
            rest = &rest[cr + 1..];
        }
        self.inner.write_all(rest)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_folder_made_for_a_new_mailbox_is_synced_into_its_parent() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path();
        std::fs::create_dir(data.join("mail")).unwrap();
        let maildir = maildir_path(data, "alice@example.test");
        let mut synced = Vec::new();
        create_with(&maildir, &mut |parent| {
            synced.push(parent.strip_prefix(data).unwrap().to_path_buf());
            Ok(())
        })
        .unwrap();
        let expected: Vec<PathBuf> = [
            "mail",
            "mail/example.test",
            "mail/example.test/alice",
            "mail/example.test/alice",
            "mail/example.test/alice",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(
            synced, expected,
            "the domain, the mailbox, tmp, new and cur"
        );
        use std::os::unix::fs::PermissionsExt as _;
        for folder in [
            "example.test",
            "example.test/alice",
            "example.test/alice/new",
        ] {
            let mode = std::fs::metadata(data.join("mail").join(folder))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o700, "{folder}");
        }
        // Nothing new, nothing synced.
        synced.clear();
        create_with(&maildir, &mut |parent| {
            synced.push(parent.to_path_buf());
            Ok(())
        })
        .unwrap();
        assert!(synced.is_empty());
    }

    #[test]
    fn delivers_into_new_with_trace_headers() {
        let dir = tempfile::tempdir().unwrap();
        let path = deliver(
            dir.path(),
            "mx.test",
            "alice@example.com",
            "bob@example.org",
            // In pieces, with a CRLF split across two of them.
            |out| {
                out.write_all(b"Subject: hi\r")?;
                out.write_all(b"\n\r\nbody\r\n")
            },
        )
        .unwrap();
        assert!(path.starts_with(dir.path().join("mail/example.com/alice/new")));
        assert_eq!(
            fs::read(&path).unwrap(),
            b"Return-Path: <bob@example.org>\nDelivered-To: alice@example.com\nSubject: hi\n\nbody\n"
        );
        let tmp = fs::read_dir(dir.path().join("mail/example.com/alice/tmp")).unwrap();
        assert_eq!(tmp.count(), 0);
        let second = deliver(dir.path(), "mx.test", "alice@example.com", "", |out| {
            out.write_all(b"x\r\n")
        })
        .unwrap();
        assert_ne!(second, path);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.path().join("mail/example.com/alice/new")), 0o700);
    }

    #[test]
    fn odd_local_parts_stay_inside_the_mail_dir() {
        let dir = Path::new("/data");
        assert_eq!(
            maildir_path(dir, "\"../x/y\"@example.com"),
            PathBuf::from("/data/mail/example.com/\"..%2Fx%2Fy\"")
        );
        assert_eq!(
            maildir_path(dir, ".hidden@example.com"),
            PathBuf::from("/data/mail/example.com/%2Ehidden")
        );
    }
}
