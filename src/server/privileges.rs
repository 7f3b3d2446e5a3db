//! `[server] user`: started as root, petrel binds its ports and reads its
//! keys, hands `data_dir` to that user and becomes it (supplementary
//! groups, group, user, in that order) before any client is served; the
//! switch is then verified for every thread, and a way back to root must
//! fail. Run by systemd as that user with CAP_NET_BIND_SERVICE instead,
//! there is nothing to switch. Commands that write `data_dir` (`user`,
//! `queue`) switch the same way, so files they create belong to the
//! server's user and not to root.

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

/// Gives `data_dir` to the user, then becomes it, verified.
pub fn become_user(run_as: &RunAs, data_dir: &Path) -> Result<(), PrivilegeError> {
    hand_over(data_dir, run_as)?;
    switch_to(run_as)?;
    verify(run_as)
}

/// [`pending_switch`] then [`become_user`], for who needs both at once.
pub fn become_configured_user(
    server: &ServerConfig,
    data_dir: &Path,
) -> Result<Option<RunAs>, PrivilegeError> {
    let pending = pending_switch(server)?;
    if let Some(run_as) = &pending {
        become_user(run_as, data_dir)?;
    }
    Ok(pending)
}

/// Makes `data_dir` and what petrel keeps in it belong to the user. Not
/// touched: maildrop files (their owner says who sent them), the messages
/// inside Maildirs (only their folders must be writable), and anything
/// reached through a symbolic link.
fn hand_over(data_dir: &Path, run_as: &RunAs) -> Result<(), PrivilegeError> {
    crate::queue::create_private_dir(data_dir).map_err(|e| {
        PrivilegeError(format!(
            "cannot create data_dir {}: {e}",
            data_dir.display()
        ))
    })?;
    let mut count = 0usize;
    chown_tree(data_dir, run_as, 0, &mut count).map_err(|(path, e)| {
        PrivilegeError(format!(
            "cannot give {} to {}: {e}",
            path.display(),
            run_as.user
        ))
    })?;
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

/// Depth 0 is data_dir; mail/<domain>/<local>/<cur|new|tmp> is depth 4.
fn chown_tree(
    path: &Path,
    run_as: &RunAs,
    depth: usize,
    count: &mut usize,
) -> Result<(), (std::path::PathBuf, io::Error)> {
    use std::os::unix::fs::MetadataExt as _;
    let fail = |e: io::Error| (path.to_path_buf(), e);
    let meta = fs::symlink_metadata(path).map_err(fail)?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    if meta.uid() != run_as.uid || meta.gid() != run_as.gid {
        rustix::fs::chownat(
            rustix::fs::CWD,
            path,
            Some(rustix::fs::Uid::from_raw(run_as.uid)),
            Some(rustix::fs::Gid::from_raw(run_as.gid)),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| fail(e.into()))?;
        *count += 1;
    }
    if !meta.is_dir() {
        return Ok(());
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let leave_contents = match depth {
        1 => name == crate::server::local::REFUSED_DIR,
        2 => name == crate::server::local::MAILDROP,
        4 => true,
        _ => false,
    };
    if leave_contents {
        return Ok(());
    }
    // Only the Maildir tree goes four deep.
    if depth == 3 && !is_under_mail(path) {
        return Ok(());
    }
    for entry in fs::read_dir(path).map_err(fail)? {
        let entry = entry.map_err(fail)?;
        chown_tree(&entry.path(), run_as, depth + 1, count)?;
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
