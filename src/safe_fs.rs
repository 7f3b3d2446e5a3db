//! File operations for code that may run as root on paths other users can
//! write. Root must never follow a path inside a folder another user can
//! change: between a check and a use, that user can swap a folder for a
//! symbolic link, or hard-link one of root's files into the folder. So:
//! - a path root uses by name is first shown to be *trusted* ([`distrust`]
//!   says why it is not): every folder on the way belongs to root and nobody
//!   else may write to it (a sticky folder such as `/tmp` counts when root
//!   owns the entry in it, which nobody else may then rename or remove);
//! - inside a folder another user may write, code goes from a directory
//!   descriptor ([`Dir`]), one name at a time, never following a symbolic
//!   link, and acts on the descriptor it opened (`fstat`, `fchown`), never
//!   on the name again.
//!
//! Nothing here decides *whether* root should be in a folder; that is the
//! caller's (see [`crate::server::privileges`]).

use std::ffi::{OsStr, OsString};
use std::fs::{File, Metadata};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags};

/// Why root may not use `path` by name, if it may not: the first folder on
/// the way that another user could change, or that is missing. `path`
/// itself may belong to anyone; its folders may not.
pub fn distrust(path: &Path) -> Option<String> {
    let absolute = match std::path::absolute(path) {
        Ok(absolute) => absolute,
        Err(error) => return Some(format!("{}: {error}", path.display())),
    };
    let (Some(parent), Some(name)) = (absolute.parent(), absolute.file_name()) else {
        return None; // "/" itself
    };
    // Symbolic links on the way are resolved once, here; every folder of
    // the result is then checked, so none of them can be changed later.
    let parent = match std::fs::canonicalize(parent) {
        Ok(parent) => parent,
        Err(error) => return Some(format!("{}: {error}", parent.display())),
    };
    let mut folders: Vec<PathBuf> = parent.ancestors().map(Path::to_path_buf).collect();
    folders.reverse();
    for (index, folder) in folders.iter().enumerate() {
        let meta = match std::fs::symlink_metadata(folder) {
            Ok(meta) => meta,
            Err(error) => return Some(format!("{}: {error}", folder.display())),
        };
        let next = folders
            .get(index + 1)
            .cloned()
            .unwrap_or_else(|| parent.join(name));
        if let Some(why) = folder_distrust(folder, &meta, &next) {
            return Some(why);
        }
    }
    None
}

fn folder_distrust(folder: &Path, meta: &Metadata, next: &Path) -> Option<String> {
    const STICKY: u32 = 0o1000;
    if meta.uid() != 0 {
        return Some(format!(
            "{} belongs to uid {}, not root",
            folder.display(),
            meta.uid()
        ));
    }
    let mode = meta.mode();
    if mode & 0o022 == 0 {
        return None;
    }
    if mode & STICKY != 0 {
        // Others may add entries but not rename or remove root's.
        return match std::fs::symlink_metadata(next) {
            Ok(next_meta) if next_meta.uid() == 0 => None,
            Ok(next_meta) => Some(format!(
                "{} is in the shared folder {} and belongs to uid {}",
                next.display(),
                folder.display(),
                next_meta.uid()
            )),
            Err(_) => Some(format!(
                "{} does not exist yet in the shared folder {}, where anyone may create it",
                next.display(),
                folder.display()
            )),
        };
    }
    Some(format!(
        "{} may be written by others than root (mode {:o})",
        folder.display(),
        mode & 0o7777
    ))
}

/// A folder opened once; everything below it is reached from this
/// descriptor, a name at a time, never through a symbolic link.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

/// A folder is held by an `O_PATH` descriptor: passing through needs only
/// search permission (data_dir is 0711 to other users), and listing it
/// opens it again for reading.
const DIRECTORY: OFlags = OFlags::PATH
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

impl Dir {
    /// Opens `path`, which must be a folder and not a symbolic link (the
    /// folders on the way are followed: trust them first, see [`distrust`]).
    pub fn open(path: &Path) -> io::Result<Dir> {
        let fd = rustix::fs::openat(rustix::fs::CWD, path, DIRECTORY, Mode::empty())
            .map_err(|e| with_path(path, e.into()))?;
        Ok(Dir {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// Opens `relative` below `path` one component at a time, refusing a
    /// symbolic link or `..` anywhere below `path`.
    pub fn open_beneath(path: &Path, relative: &Path) -> io::Result<Dir> {
        let mut dir = Dir::open(path)?;
        for component in relative.components() {
            match component {
                Component::Normal(name) => dir = dir.open_dir(name)?,
                Component::CurDir => {}
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{} leaves {}", relative.display(), path.display()),
                    ));
                }
            }
        }
        Ok(dir)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The folder named `name` in this one (not a symbolic link).
    pub fn open_dir(&self, name: &OsStr) -> io::Result<Dir> {
        let path = self.path.join(name);
        check_name(name, &path)?;
        let fd = rustix::fs::openat(&self.fd, name, DIRECTORY, Mode::empty())
            .map_err(|e| with_path(&path, e.into()))?;
        Ok(Dir { fd, path })
    }

    /// Creates the folder `name` with `mode` (the umask still applies;
    /// set the mode on the opened folder when it matters).
    pub fn create_dir(&self, name: &OsStr, mode: u32) -> io::Result<()> {
        let path = self.path.join(name);
        check_name(name, &path)?;
        rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(mode))
            .map_err(|e| with_path(&path, e.into()))
    }

    /// Creates a new file `name` (never an existing one, never through a
    /// symbolic link), for writing.
    pub fn create_new_file(&self, name: &OsStr, mode: u32) -> io::Result<File> {
        let path = self.path.join(name);
        check_name(name, &path)?;
        let flags = OFlags::WRONLY
            | OFlags::CREATE
            | OFlags::EXCL
            | OFlags::NOFOLLOW
            | OFlags::CLOEXEC
            | OFlags::NOCTTY;
        rustix::fs::openat(&self.fd, name, flags, Mode::from_raw_mode(mode))
            .map(File::from)
            .map_err(|e| with_path(&path, e.into()))
    }

    /// A handle on whatever `name` is (a symbolic link itself, not its
    /// target), good for `fstat` and `fchown` but not for reading.
    pub fn open_entry(&self, name: &OsStr) -> io::Result<Entry> {
        let path = self.path.join(name);
        check_name(name, &path)?;
        let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&self.fd, name, flags, Mode::empty())
            .map_err(|e| with_path(&path, e.into()))?;
        let file = File::from(fd);
        let meta = file.metadata().map_err(|e| with_path(&path, e))?;
        Ok(Entry { file, meta, path })
    }

    /// Renames `from` to `to`, both in this folder.
    pub fn rename(&self, from: &OsStr, to: &OsStr) -> io::Result<()> {
        check_name(from, &self.path.join(from))?;
        check_name(to, &self.path.join(to))?;
        rustix::fs::renameat(&self.fd, from, &self.fd, to)
            .map_err(|e| with_path(&self.path.join(from), e.into()))
    }

    /// Removes the file `name` from this folder.
    pub fn remove_file(&self, name: &OsStr) -> io::Result<()> {
        let path = self.path.join(name);
        check_name(name, &path)?;
        rustix::fs::unlinkat(&self.fd, name, AtFlags::empty())
            .map_err(|e| with_path(&path, e.into()))
    }

    /// The names in this folder, `.` and `..` left out.
    pub fn names(&self) -> io::Result<Vec<OsString>> {
        let readable = rustix::fs::openat(
            &self.fd,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| with_path(&self.path, e.into()))?;
        let reader =
            rustix::fs::Dir::read_from(&readable).map_err(|e| with_path(&self.path, e.into()))?;
        let mut names = Vec::new();
        for entry in reader {
            let entry = entry.map_err(|e| with_path(&self.path, e.into()))?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(OsStr::from_bytes(name).to_os_string());
            }
        }
        Ok(names)
    }

    pub fn metadata(&self) -> io::Result<Metadata> {
        let file = File::from(self.fd.try_clone()?);
        file.metadata()
    }

    /// Gives the folder itself (by its descriptor) to `uid`:`gid`.
    pub fn chown(&self, uid: u32, gid: u32) -> io::Result<()> {
        chown_fd(&self.fd, uid, gid).map_err(|e| with_path(&self.path, e))
    }
}

impl AsFd for Dir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// One entry of a [`Dir`], opened without following it.
#[derive(Debug)]
pub struct Entry {
    file: File,
    meta: Metadata,
    path: PathBuf,
}

impl Entry {
    pub fn metadata(&self) -> &Metadata {
        &self.meta
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The entry as a folder, when it is one.
    pub fn as_dir(&self) -> io::Result<Dir> {
        let fd = rustix::fs::openat(&self.file, ".", DIRECTORY, Mode::empty())
            .map_err(|e| with_path(&self.path, e.into()))?;
        Ok(Dir {
            fd,
            path: self.path.clone(),
        })
    }

    /// Gives this very entry (not whatever its name points at by now) to
    /// `uid`:`gid`.
    pub fn chown(&self, uid: u32, gid: u32) -> io::Result<()> {
        chown_fd(&self.file, uid, gid).map_err(|e| with_path(&self.path, e))
    }
}

/// `fchownat(fd, "", AT_EMPTY_PATH)`: works on `O_PATH` descriptors too.
fn chown_fd(fd: impl AsFd, uid: u32, gid: u32) -> io::Result<()> {
    rustix::fs::chownat(
        fd,
        "",
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
        AtFlags::EMPTY_PATH,
    )
    .map_err(Into::into)
}

/// A single name: no slash, not `.` or `..`, not empty.
fn check_name(name: &OsStr, path: &Path) -> io::Result<()> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: not a single file name", path.display()),
        ));
    }
    Ok(())
}

fn with_path(path: &Path, error: io::Error) -> io::Error {
    io::Error::new(error.kind(), format!("{}: {error}", path.display()))
}

/// Opens `path` for locking: created if missing (mode 0600), never
/// truncated, never through a symbolic link.
pub fn open_lock_file(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags((OFlags::NOFOLLOW | OFlags::NOCTTY).bits() as i32)
        .open(path)
        .map_err(|error| {
            if error.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
                io::Error::new(
                    error.kind(),
                    format!("{} is a symbolic link; remove it", path.display()),
                )
            } else {
                with_path(path, error)
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn a_symbolic_link_is_never_followed_below_an_opened_folder() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"s").unwrap();
        let inside = dir.path().join("inside");
        std::fs::create_dir(&inside).unwrap();
        std::os::unix::fs::symlink(&outside, inside.join("link")).unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), inside.join("file")).unwrap();

        let opened = Dir::open(&inside).unwrap();
        assert!(opened.open_dir(OsStr::new("link")).is_err());
        assert!(Dir::open_beneath(&inside, Path::new("link")).is_err());
        assert!(Dir::open_beneath(dir.path(), Path::new("inside/../outside")).is_err());
        assert!(Dir::open(&inside.join("link")).is_err());
        // The entry is the link itself.
        let entry = opened.open_entry(OsStr::new("file")).unwrap();
        assert!(entry.metadata().file_type().is_symlink());
        // A new file never replaces or follows what is there.
        assert!(opened.create_new_file(OsStr::new("file"), 0o600).is_err());
        assert_eq!(std::fs::read(outside.join("secret")).unwrap(), b"s");
        assert!(opened.create_new_file(OsStr::new("a/b"), 0o600).is_err());
        let mut names = opened.names().unwrap();
        names.sort();
        assert_eq!(names, ["file", "link"]);
    }

    #[test]
    fn the_lock_file_is_neither_followed_nor_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("precious");
        std::fs::write(&target, b"keep me").unwrap();
        let lock = dir.path().join("petrel.lock");
        std::os::unix::fs::symlink(&target, &lock).unwrap();
        let error = open_lock_file(&lock).unwrap_err().to_string();
        assert!(error.contains("symbolic link"), "{error}");
        assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
        // An ordinary lock file keeps what it holds.
        std::fs::remove_file(&lock).unwrap();
        std::fs::write(&lock, b"12345").unwrap();
        open_lock_file(&lock).unwrap();
        assert_eq!(std::fs::read(&lock).unwrap(), b"12345");
    }

    #[test]
    fn folders_others_may_write_are_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        let why = distrust(&shared.join("data")).unwrap();
        assert!(why.contains("may be written by others"), "{why}");
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
        // As root, the test's own folders are root's; as anyone else, they
        // belong to that user, which root must not trust either.
        let as_root = rustix::process::geteuid().is_root();
        assert_eq!(distrust(&shared.join("data")).is_none(), as_root);
        // A symbolic link on the way is judged by where it leads.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&shared, &link).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let why = distrust(&link.join("data")).unwrap();
        if as_root {
            assert!(
                why.contains("does not exist yet in the shared folder"),
                "{why}"
            );
        }
    }
}
