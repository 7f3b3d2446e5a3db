//! Local submission, Postfix's postdrop and pickup in one: users of this
//! host run `petrel sendmail`, which speaks SMTP to the server over a Unix
//! socket in `data_dir/public/`. The kernel says who they are
//! (SO_PEERCRED), so nobody needs write access to `queue.db`. When the
//! server is not running, `sendmail` leaves the same SMTP dialogue as a
//! file in `data_dir/public/maildrop/`; the server replays it, as that
//! file's owner, when it starts (and every half minute after).
//!
//! Modes: `data_dir` is 0711 and `public/` 0711, so others can reach the
//! socket (0666) and the maildrop (1733: anyone may add a file, nobody may
//! list or remove others') by name, and see nothing else; everything else
//! in `data_dir` stays 0700/0600.

use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::ServerContext;
use super::connection::{self, Incoming, Stream};
use super::limits::ConnectionLimits;
use crate::config::Config;
use crate::printable::escape;
use crate::protocol::session::{ListenerKind, LocalUser};
use crate::store::data_dir::{self, PUBLIC_DIR, REFUSED_DIR};

/// How often the maildrop is looked at while the server runs (files land
/// there only when the socket could not be reached).
const PICKUP_INTERVAL: Duration = Duration::from_secs(30);
/// One maildrop file is replayed within this, or set aside.
const REPLAY_DEADLINE: Duration = Duration::from_secs(60);
/// A file still named with a leading dot (sendmail writes it so until it
/// is complete) this old was left by a sendmail that died: removed.
const STALE_TEMPORARY: Duration = Duration::from_secs(3600);

/// Creates the public part of `data_dir` with the modes above.
pub fn prepare(data_dir: &Path) -> io::Result<()> {
    let set = |path: &Path, mode: u32| fs::set_permissions(path, fs::Permissions::from_mode(mode));
    set(data_dir, 0o711)?;
    let public = data_dir.join(PUBLIC_DIR);
    let maildrop = data_dir::maildrop(data_dir);
    for dir in [&public, &maildrop] {
        if !dir.is_dir() {
            DirBuilder::new().mode(0o700).create(dir)?;
        }
    }
    set(&public, 0o711)?;
    set(&maildrop, 0o1733)
}

/// Binds the submission socket (replacing one a crash left behind; only
/// one server runs per data_dir).
pub fn bind(data_dir: &Path) -> io::Result<UnixListener> {
    prepare(data_dir)?;
    let path = data_dir::submit_socket(data_dir);
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let listener = UnixListener::bind(&path)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

/// Who a uid is, as far as sending mail goes.
pub fn local_user(config: &Config, uid: u32, gid: u32) -> LocalUser {
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten();
    let name = user
        .as_ref()
        .map(|u| u.name.clone())
        .unwrap_or_else(|| format!("uid{uid}"));
    let domain = config
        .domains
        .local
        .first()
        .cloned()
        .unwrap_or_else(|| config.hostname.clone());
    let trusted = uid == 0
        || config
            .sendmail
            .trusted_group
            .as_deref()
            .is_some_and(|group| {
                nix::unistd::Group::from_name(group)
                    .ok()
                    .flatten()
                    .is_some_and(|group| group.gid.as_raw() == gid || group.mem.contains(&name))
            });
    LocalUser {
        uid,
        address: format!("{name}@{domain}"),
        name,
        trusted,
    }
}

/// Accepts on the local socket and hands sessions to the worker pool.
pub struct LocalAcceptor {
    pub listener: UnixListener,
    pub pool: Arc<super::pool::WorkerPool>,
    pub limits: Arc<ConnectionLimits>,
    pub context: Arc<ServerContext>,
}

impl LocalAcceptor {
    pub fn run(self) {
        for stream in self.listener.incoming() {
            if self.context.is_shutting_down() {
                return;
            }
            let stream = match stream {
                Ok(stream) => stream,
                Err(error) => {
                    log::warn!("accept on the local socket failed: {error}");
                    std::thread::sleep(super::acceptor::ACCEPT_ERROR_PAUSE);
                    continue;
                }
            };
            let Ok(credentials) = rustix::net::sockopt::socket_peercred(&stream) else {
                continue;
            };
            let user = local_user(
                &self.context.config,
                credentials.uid.as_raw(),
                credentials.gid.as_raw(),
            );
            // Local users have a share of their own, and a limit each;
            // they never count as a TCP client (127.0.0.1).
            let permit = match self.limits.try_acquire_local(user.uid) {
                Ok(permit) => permit,
                Err(refusal) => {
                    log::info!("local: uid={} refused: {}", user.uid, refusal.describe());
                    refuse_busy(stream, &self.context);
                    continue;
                }
            };
            let job = Incoming {
                stream: Stream::Unix(stream),
                peer: std::net::SocketAddr::new(loopback(), 0),
                listener: ListenerKind::Local,
                permit,
                local: Some(user),
            };
            if self.pool.submit(job).is_err() {
                return;
            }
        }
    }
}

fn loopback() -> std::net::IpAddr {
    std::net::IpAddr::from([127, 0, 0, 1])
}

fn refuse_busy(mut stream: UnixStream, context: &ServerContext) {
    use std::io::Write as _;
    let reply = crate::protocol::reply::Reply::new(
        crate::protocol::reply::TOO_BUSY,
        format!(
            "{} Too many sessions, try again later",
            context.config.hostname
        ),
    );
    let _ = stream.set_write_timeout(Some(Duration::from_millis(500)));
    let _ = stream.write_all(reply.to_wire().as_bytes());
}

/// Replays the maildrop every [`PICKUP_INTERVAL`] until `stop`.
pub fn pickup_loop(
    context: Arc<ServerContext>,
    limits: Arc<ConnectionLimits>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::SeqCst) {
        pickup(&context, &limits, &stop);
        // Sleep in short steps so shutdown is prompt.
        for _ in 0..(PICKUP_INTERVAL.as_millis() / 100) {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Submits every complete file in the maildrop, each as its owner, until
/// `stop`; removes what sendmail left half-written long ago.
pub fn pickup(context: &ServerContext, limits: &Arc<ConnectionLimits>, stop: &Arc<AtomicBool>) {
    let maildrop = data_dir::maildrop(&context.config.data_dir);
    let Ok(entries) = fs::read_dir(&maildrop) else {
        return;
    };
    for entry in entries.flatten() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let path = entry.path();
        let shown = escape(&entry.file_name().to_string_lossy()).into_owned();
        // Files being written are named with a leading dot until complete.
        if entry.file_name().to_string_lossy().starts_with('.') {
            remove_if_stale(&path, &shown);
            continue;
        }
        if let Err(error) = pickup_one(context, limits, &path, stop) {
            log::error!("pickup: maildrop file {shown}: {error}");
        }
    }
}

/// A dot file nobody has touched for [`STALE_TEMPORARY`]: its sendmail
/// died before finishing it (and told its caller the message was not
/// sent), so it is only taking up room.
fn remove_if_stale(path: &Path, shown: &str) {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return;
    };
    let age = meta
        .modified()
        .ok()
        .and_then(|modified| modified.elapsed().ok())
        .unwrap_or_default();
    if age < STALE_TEMPORARY {
        return;
    }
    match fs::remove_file(path) {
        Ok(()) => log::info!(
            "pickup: removed {shown}, an unfinished maildrop file of uid {} ({} octets), left {} ago",
            meta.uid(),
            meta.len(),
            crate::timefmt::short_duration(age)
        ),
        Err(error) => log::warn!("pickup: cannot remove the stale maildrop file {shown}: {error}"),
    }
}

/// The most a maildrop file may hold: a message of the largest size, every
/// line of it dot-stuffed, and its commands.
fn maildrop_limit(config: &Config) -> u64 {
    config
        .limits
        .max_message_size
        .bytes()
        .saturating_mul(2)
        .saturating_add(1024 * 1024)
}

/// Opens a maildrop file for replay, or says why it may not be. The owner
/// decides who the message is from, so the file must be what its owner
/// wrote there, the way sendmail writes it: not a symbolic link (followed,
/// it would be read with the server's rights), not a hard link to somebody
/// else's file, not writable by anyone but its owner (a file root once
/// left open to all, linked here and its other name removed, would be
/// replayed as root with someone else's words), and no larger than a
/// message can be (a sparse file of 200 GiB took minutes to read, every
/// 30 seconds).
fn open_dropped(path: &Path, limit: u64) -> io::Result<(fs::File, u32, u32)> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags((rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    if meta.nlink() != 1 {
        return Err(io::Error::other(format!(
            "{} hard links to one file; refusing to guess who wrote it",
            meta.nlink()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(io::Error::other(format!(
            "writable by others than its owner (mode {:o}); refusing to guess who wrote it",
            meta.mode() & 0o7777
        )));
    }
    if meta.len() > limit {
        return Err(io::Error::other(format!(
            "{} octets, more than a message of limits.max_message_size can take ({limit})",
            meta.len()
        )));
    }
    Ok((file, meta.uid(), meta.gid()))
}

/// A maildrop file as a session reads it: the read fails once the
/// replay's deadline has passed or the server stops.
struct Replay {
    file: fs::File,
    deadline: std::time::Instant,
    stop: Arc<AtomicBool>,
    timed_out: Arc<AtomicBool>,
}

impl io::Read for Replay {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.stop.load(Ordering::SeqCst) {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "shutting down"));
        }
        if std::time::Instant::now() >= self.deadline {
            self.timed_out.store(true, Ordering::SeqCst);
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "replay took too long",
            ));
        }
        self.file.read(buf)
    }
}

fn pickup_one(
    context: &ServerContext,
    limits: &Arc<ConnectionLimits>,
    path: &Path,
    stop: &Arc<AtomicBool>,
) -> io::Result<()> {
    let (file, uid, gid) = match open_dropped(path, maildrop_limit(&context.config)) {
        Ok(opened) => opened,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => {
            // Nothing it says can be trusted: out of the way, unread.
            set_aside(context, path)?;
            return Err(error);
        }
    };
    let Ok(permit) = limits.try_acquire_local(uid) else {
        // Busy: the next pickup takes it.
        return Ok(());
    };
    let shown = escape(&path.file_name().unwrap_or_default().to_string_lossy()).into_owned();
    // Names the file, so "where did my mail go?" has an answer between
    // sendmail's "waits in the maildrop" and the accepted line.
    log::info!("pickup: uid={uid} maildrop file {shown}");
    let timed_out = Arc::new(AtomicBool::new(false));
    let replay = Replay {
        file,
        deadline: std::time::Instant::now() + REPLAY_DEADLINE,
        stop: Arc::clone(stop),
        timed_out: Arc::clone(&timed_out),
    };
    let job = Incoming {
        stream: Stream::Replay(Box::new(io::BufReader::new(replay))),
        peer: std::net::SocketAddr::new(loopback(), 0),
        listener: ListenerKind::Local,
        permit,
        local: Some(local_user(&context.config, uid, gid)),
    };
    let outcome = connection::serve(job, context, &mut connection::Buffers::default());
    if outcome.queued > 0 {
        fs::remove_file(path)?;
    } else if outcome.refused_for_good || timed_out.load(Ordering::SeqCst) {
        // Refused for good (e.g. no such mailbox), or too slow to replay:
        // sendmail had nobody to tell, so the file is kept where the
        // operator can see it.
        let target = set_aside(context, path)?;
        log::error!(
            "pickup: a message from uid {uid} was {}; kept in {}",
            if outcome.refused_for_good {
                "refused"
            } else {
                "not replayed in time"
            },
            escape(&target.display().to_string())
        );
    }
    // Otherwise a temporary failure (or the server is stopping): left for
    // the next pickup.
    Ok(())
}

/// Moves a maildrop file where the operator can see it and pickup will
/// not try it again.
fn set_aside(context: &ServerContext, path: &Path) -> io::Result<PathBuf> {
    let refused = context.config.data_dir.join(REFUSED_DIR);
    crate::store::data_dir::create_private_dir(&refused)?;
    let target = refused.join(path.file_name().unwrap_or_default());
    fs::rename(path, &target)?;
    Ok(target)
}
