//! `[server] user`: started as root, petrel hands `data_dir` to that user,
//! binds its ports and reads its certificate, then becomes it
//! (supplementary groups, group, user, in that order) before it opens
//! anything in `data_dir` and before any client is served; the switch is
//! then verified for every thread, and a way back to root must fail. Run
//! by systemd as that user with CAP_NET_BIND_SERVICE instead, there is
//! nothing to switch. Commands that write `data_dir` (`user`, `queue`)
//! switch the same way, so files they create belong to the server's user.
//!
//! The user may write in `data_dir`, so root never follows a path there:
//! the hand-over works from directory descriptors (see [`crate::safe_fs`])
//! and everything else waits until root is gone.

use std::fmt;
use std::fs;
use std::io;
use std::path::Path;

use nix::unistd::{Gid, Group, Uid, User};

use crate::config::ServerConfig;

crate::error::message_error!(PrivilegeError, "cannot run as the configured user.");

/// The user and group `[server]` names, looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub user: String,
    pub uid: u32,
    pub group: String,
    pub gid: u32,
}

impl fmt::Display for RunAs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (uid {}), group {} (gid {})",
            self.user, self.uid, self.group, self.gid
        )
    }
}

impl RunAs {
    /// None when `[server] user` is not set: petrel runs as whoever
    /// started it.
    pub fn from_config(server: &ServerConfig) -> Result<Option<RunAs>, PrivilegeError> {
        let Some(name) = &server.user else {
            if server.group.is_some() {
                return Err(PrivilegeError(
                    "server.group is set without server.user".into(),
                ));
            }
            return Ok(None);
        };
        let user = User::from_name(name)
            .map_err(|e| PrivilegeError(format!("server.user = {name:?}: cannot look it up: {e}")))?
            .ok_or_else(|| {
                PrivilegeError(format!(
                    "server.user = {name:?}: no such user (create it: useradd --system \
                     --home-dir /var/lib/petrel --shell /usr/sbin/nologin {name})"
                ))
            })?;
        let group = match &server.group {
            Some(group_name) => Group::from_name(group_name)
                .map_err(|e| {
                    PrivilegeError(format!(
                        "server.group = {group_name:?}: cannot look it up: {e}"
                    ))
                })?
                .ok_or_else(|| {
                    PrivilegeError(format!("server.group = {group_name:?}: no such group"))
                })?,
            None => Group::from_gid(user.gid)
                .ok()
                .flatten()
                .unwrap_or_else(|| unnamed_group(user.gid)),
        };
        if user.uid.is_root() {
            return Err(PrivilegeError(format!(
                "server.user = {name:?} is root: name an unprivileged user, or leave it unset"
            )));
        }
        Ok(Some(RunAs {
            user: user.name,
            uid: user.uid.as_raw(),
            group: group.name,
            gid: group.gid.as_raw(),
        }))
    }

    fn is_current(&self) -> bool {
        nix::unistd::geteuid().as_raw() == self.uid
            && nix::unistd::getuid().as_raw() == self.uid
            && nix::unistd::getegid().as_raw() == self.gid
    }
}

fn unnamed_group(gid: Gid) -> Group {
    Group {
        name: gid.as_raw().to_string(),
        passwd: Default::default(),
        gid,
        mem: Vec::new(),
    }
}

/// Whether this process may work in `data_dir` as the server does: it is
/// root (and switches), or the server's user (`[server] user`, else the
/// owner of `data_dir`). `Err` names the user it would have to be.
pub fn may_act_as_server(server: &ServerConfig, data_dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt as _;
    let euid = nix::unistd::geteuid();
    if euid.is_root() {
        return Ok(());
    }
    let needed = match RunAs::from_config(server) {
        Ok(Some(run_as)) if run_as.uid == euid.as_raw() => return Ok(()),
        Ok(Some(run_as)) => run_as.user,
        // A user that does not exist: said as a config error elsewhere.
        Err(_) => return Ok(()),
        Ok(None) => match fs::metadata(data_dir) {
            Ok(meta) if meta.uid() != euid.as_raw() => User::from_uid(Uid::from_raw(meta.uid()))
                .ok()
                .flatten()
                .map_or_else(|| format!("uid {}", meta.uid()), |user| user.name),
            // Ours, or not made yet: whoever runs it will own it.
            _ => return Ok(()),
        },
    };
    Err(needed)
}

/// The user to become, if one is configured and we are not it already:
/// a config error when it does not exist, or when we are neither it nor
/// root (and so cannot switch).
pub fn pending_switch(server: &ServerConfig) -> Result<Option<RunAs>, PrivilegeError> {
    let Some(run_as) = RunAs::from_config(server)? else {
        return Ok(None);
    };
    if run_as.is_current() {
        return Ok(None);
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(PrivilegeError(format!(
            "server.user = {:?}, but petrel runs as uid {}, which cannot switch users: start \
             it as root, or as {} itself",
            run_as.user,
            nix::unistd::geteuid(),
            run_as.user
        )));
    }
    Ok(Some(run_as))
}

/// What root does in `data_dir` before anything else happens there: with
/// a user configured, hands `data_dir` over to it ([`hand_over`]); without
/// one, root itself will work in `data_dir`, which is refused unless nobody
/// else can change the folders on the way. Returns the user to become.
pub fn prepare_data_dir(
    server: &ServerConfig,
    data_dir: &Path,
) -> Result<Option<RunAs>, PrivilegeError> {
    let pending = pending_switch(server)?;
    match &pending {
        Some(run_as) => hand_over(data_dir, run_as)?,
        None if nix::unistd::geteuid().is_root() => root_may_work_in(data_dir)?,
        None => {}
    }
    Ok(pending)
}

/// Root itself works in `data_dir` (no user configured) only when nobody
/// else can change the folders on the way to it.
pub fn root_may_work_in(data_dir: &Path) -> Result<(), PrivilegeError> {
    match crate::safe_fs::distrust(data_dir) {
        None => Ok(()),
        Some(why) => Err(PrivilegeError(format!(
            "petrel runs as root, and data_dir {} is not safe for root: {why}; set [server] \
             user, or give data_dir a parent only root can change",
            data_dir.display()
        ))),
    }
}

/// Becomes the user, verified: from here on nothing runs as root.
pub fn switch(run_as: &RunAs) -> Result<(), PrivilegeError> {
    switch_to(run_as)?;
    verify(run_as)
}

/// Gives `data_dir` to the user, then becomes it, verified.
pub fn become_user(run_as: &RunAs, data_dir: &Path) -> Result<(), PrivilegeError> {
    hand_over(data_dir, run_as)?;
    switch(run_as)
}

/// Makes `data_dir` and what petrel keeps in it belong to the user. The
/// user may write in `data_dir`, so root works there only from directory
/// descriptors and never follows a name twice (see [`crate::safe_fs`]).
/// Not touched: symbolic links, files with more than one name (a hard link
/// may be another user's file), maildrop files (their owner says who sent
/// them) and the messages inside Maildirs (only their folders must be
/// writable). When a folder on the way to `data_dir` is not root's alone,
/// root does nothing there at all: data_dir must then be the user's already.
pub fn hand_over(data_dir: &Path, run_as: &RunAs) -> Result<(), PrivilegeError> {
    let fail =
        |e: io::Error| PrivilegeError(format!("cannot give data_dir to {}: {e}", run_as.user));
    let first_missing = data_dir
        .ancestors()
        .take_while(|path| fs::symlink_metadata(path).is_err())
        .last();
    if let Some(why) = crate::safe_fs::distrust(first_missing.unwrap_or(data_dir)) {
        log::warn!(
            "root leaves data_dir {} to {} ({why}); it must belong to {} already",
            data_dir.display(),
            run_as.user,
            run_as.user
        );
        return Ok(());
    }
    if first_missing.is_some() {
        create_data_dir(data_dir).map_err(fail)?;
    }
    let dir = crate::safe_fs::Dir::open(data_dir).map_err(fail)?;
    let mut count = 0usize;
    hand_over_dir(&dir, run_as, 0, &mut count).map_err(fail)?;
    if count > 0 {
        log::info!(
            "gave {count} {} in {} to {}",
            if count == 1 { "file" } else { "files" },
            data_dir.display(),
            run_as.user
        );
    }
    Ok(())
}

/// Root creates a missing data_dir (0700) and its missing parents (0755,
/// so the user can pass through them).
fn create_data_dir(data_dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    if let Some(parent) = data_dir.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)?;
    }
    match fs::DirBuilder::new().mode(0o700).create(data_dir) {
        Err(error) if error.kind() != io::ErrorKind::AlreadyExists => Err(error),
        _ => Ok(()),
    }
}

/// Depth 0 is data_dir; mail/<domain>/<local>/<cur|new|tmp> is depth 4.
fn hand_over_dir(
    dir: &crate::safe_fs::Dir,
    run_as: &RunAs,
    depth: usize,
    count: &mut usize,
) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let owned = |meta: &fs::Metadata| meta.uid() == run_as.uid && meta.gid() == run_as.gid;
    if !owned(&dir.metadata()?) {
        dir.chown(run_as.uid, run_as.gid)?;
        *count += 1;
    }
    let path = dir.path();
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let leave_contents = match depth {
        1 => name == crate::store::data_dir::REFUSED_DIR,
        2 => name == crate::store::data_dir::MAILDROP,
        // Only the Maildir tree goes four deep.
        3 => !is_under_mail(path),
        4 => true,
        _ => false,
    };
    if leave_contents {
        return Ok(());
    }
    for name in dir.names()? {
        let entry = match dir.open_entry(&name) {
            Ok(entry) => entry,
            // Gone since the listing: nothing to hand over.
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(error) => return Err(error),
        };
        let meta = entry.metadata();
        if meta.file_type().is_symlink() {
            continue;
        }
        if meta.is_dir() {
            hand_over_dir(&entry.as_dir()?, run_as, depth + 1, count)?;
            continue;
        }
        if meta.nlink() > 1 {
            log::warn!(
                "{} has {} names (hard links); not given to {}: one of them may be another \
                 user's file",
                crate::printable::escape(&entry.path().display().to_string()),
                meta.nlink(),
                run_as.user
            );
            continue;
        }
        if !owned(meta) {
            entry.chown(run_as.uid, run_as.gid)?;
            *count += 1;
        }
    }
    Ok(())
}

fn is_under_mail(path: &Path) -> bool {
    path.ancestors()
        .nth(2)
        .and_then(|p| p.file_name())
        .is_some_and(|n| n == "mail")
}

fn switch_to(run_as: &RunAs) -> Result<(), PrivilegeError> {
    let gid = Gid::from_raw(run_as.gid);
    let uid = Uid::from_raw(run_as.uid);
    let step = |what: &str, result: nix::Result<()>| {
        result.map_err(|e| PrivilegeError(format!("cannot switch to {run_as}: {what}: {e}")))
    };
    // Groups before the user: once the uid is not root, they cannot change.
    step("setgroups", nix::unistd::setgroups(&[gid]))?;
    step("setgid", nix::unistd::setgid(gid))?;
    step("setuid", nix::unistd::setuid(uid))?;
    Ok(())
}

/// Every thread (the queue writer and the DNS runtime start before the
/// switch; glibc switches them all) must now be the user, with no way back.
fn verify(run_as: &RunAs) -> Result<(), PrivilegeError> {
    let failed = |what: String| PrivilegeError(format!("switching to {run_as} failed: {what}"));
    if nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(failed("setuid(0) still works".into()));
    }
    let tasks = fs::read_dir("/proc/self/task").map_err(|e| failed(format!("/proc: {e}")))?;
    for task in tasks {
        let task = task.map_err(|e| failed(format!("/proc: {e}")))?;
        let status = fs::read_to_string(task.path().join("status"))
            .map_err(|e| failed(format!("/proc: {e}")))?;
        for (field, want) in [
            ("Uid:", run_as.uid),
            ("Gid:", run_as.gid),
            ("Groups:", run_as.gid),
        ] {
            let values: Vec<&str> = status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .unwrap_or("")
                .split_whitespace()
                .collect();
            let ok = if field == "Groups:" {
                values.iter().all(|v| *v == want.to_string())
            } else {
                values.len() == 4 && values.iter().all(|v| *v == want.to_string())
            };
            if !ok {
                return Err(failed(format!(
                    "thread {}: {field} {}",
                    task.file_name().to_string_lossy(),
                    values.join(" ")
                )));
            }
        }
    }
    Ok(())
}

impl RunAs {
    /// Whether this user (with only its own group, as after the switch)
    /// may read `path`, by the mode bits of the file and every folder on
    /// the way: check-config asks this as root, for files the server reads
    /// again after the switch (renewed certificates, the smart host
    /// password).
    pub fn can_read(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt as _;
        let Ok(absolute) = std::path::absolute(path) else {
            return false;
        };
        let allowed = |meta: &fs::Metadata, owner_bit: u32| {
            let mode = meta.mode();
            if meta.uid() == self.uid {
                mode & owner_bit != 0
            } else if meta.gid() == self.gid {
                mode & (owner_bit >> 3) != 0
            } else {
                mode & (owner_bit >> 6) != 0
            }
        };
        for folder in absolute.ancestors().skip(1) {
            match fs::metadata(folder) {
                Ok(meta) if allowed(&meta, 0o100) => {}
                _ => return false,
            }
        }
        fs::metadata(&absolute).is_ok_and(|meta| allowed(&meta, 0o400))
    }
}
