//! Local delivery into Maildirs under `data_dir/mail/<domain>/<user>/`.
//! A message is written to `tmp/`, fsynced, and renamed into `new/` (then
//! the directory is fsynced), so a reader never sees half a message and a
//! crash never loses one the queue has let go of.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub const MAIL_DIR: &str = "mail";

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

/// Creates `tmp/`, `new/` and `cur/` if needed.
pub fn create(maildir: &Path) -> io::Result<()> {
    for sub in ["tmp", "new", "cur"] {
        fs::create_dir_all(maildir.join(sub))?;
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
/// Maildir files use the local newline convention (LF), as Postfix and
/// Dovecot write them.
pub fn deliver(
    data_dir: &Path,
    hostname: &str,
    address: &str,
    sender: &str,
    content: &[u8],
) -> io::Result<PathBuf> {
    let maildir = maildir_path(data_dir, address);
    create(&maildir)?;
    let name = unique_name(hostname);
    let tmp = maildir.join("tmp").join(&name);
    let new = maildir.join("new").join(&name);
    let mut message = format!("Return-Path: <{sender}>\nDelivered-To: {address}\n").into_bytes();
    message.reserve(content.len());
    let mut rest = content;
    while let Some(end) = rest.windows(2).position(|w| w == b"\r\n") {
        message.extend_from_slice(&rest[..end]);
        message.push(b'\n');
        rest = &rest[end + 2..];
    }
    message.extend_from_slice(rest);
    let written = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        file.write_all(&message)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivers_into_new_with_trace_headers() {
        let dir = tempfile::tempdir().unwrap();
        let path = deliver(
            dir.path(),
            "mx.test",
            "alice@example.com",
            "bob@example.org",
            b"Subject: hi\r\n\r\nbody\r\n",
        )
        .unwrap();
        assert!(path.starts_with(dir.path().join("mail/example.com/alice/new")));
        assert_eq!(
            fs::read(&path).unwrap(),
            b"Return-Path: <bob@example.org>\nDelivered-To: alice@example.com\nSubject: hi\n\nbody\n"
        );
        let tmp = fs::read_dir(dir.path().join("mail/example.com/alice/tmp")).unwrap();
        assert_eq!(tmp.count(), 0);
        let second = deliver(dir.path(), "mx.test", "alice@example.com", "", b"x\r\n").unwrap();
        assert_ne!(second, path);
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
