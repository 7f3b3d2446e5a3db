//! A whole running petrel: queue, DNS, TLS, listeners and delivery,
//! started and stopped in the right order. `petrel serve` runs one until a
//! signal; tests run several side by side in one process.

use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::accounts::LoginLog;
use crate::auth::{Accounts, AuthLimiter};
use crate::config::Config;
use crate::delivery::{Delivery, Waker};
use crate::dns::Dns;
use crate::intake::directory::{self, Directory};
use crate::intake::gate::Gate;
use crate::intake::{Intake, OnQueued};
use crate::policy::outbound::OutboundPolicy;
use crate::protocol::session::ListenerKind;
use crate::queue::{Queue, QueueHandle};
use crate::server::control::{ControlSocket, Controls};
use crate::server::privileges;
use crate::server::{Bound, Server, ServerParts};
use crate::tls::ServerTls;

/// Read connections the sessions share for account, alias and mailbox
/// lookups (microseconds each): enough for two cores, whatever the number
/// of clients.
const SESSION_READ_CONNECTIONS: usize = 8;

/// Running deliveries get this long to finish at shutdown.
const DELIVERY_GRACE: Duration = Duration::from_secs(10);

crate::error::message_error!(InstanceError, "petrel could not start.");

fn error(e: impl std::fmt::Display) -> InstanceError {
    InstanceError(e.to_string())
}

/// Which parts to run.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Run the scheduler and delivery workers (off: accept and queue only).
    pub delivery: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { delivery: true }
    }
}

pub struct Instance {
    config: Arc<Config>,
    queue: Queue,
    tls: Arc<ServerTls>,
    server: Server,
    delivery: Option<Delivery>,
    control: Option<ControlSocket>,
    /// What SIGHUP and `petrel reload` change, and the file they read
    /// (set by `petrel serve`).
    reloader: Reloader,
    _lock: File,
}

/// What the control socket reaches: the scheduler, the AUTH limiter, and
/// what a reload changes.
struct InstanceControls {
    waker: Option<Waker>,
    limiter: Arc<AuthLimiter>,
    reloader: Reloader,
}

/// Everything that can change without a restart, with the file it comes
/// from: aliases, DKIM keys and `[dkim]`, the TLS certificate. One place
/// for SIGHUP, `petrel reload` and `newaliases`.
#[derive(Clone)]
struct Reloader {
    server: Arc<crate::server::ServerContext>,
    config_file: Arc<std::sync::Mutex<Option<std::path::PathBuf>>>,
}

impl Reloader {
    fn config_file(&self) -> Option<std::path::PathBuf> {
        self.config_file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Reads the config file again (the whole of it is checked, as at
    /// start; nothing changes if it is wrong) and applies what can change
    /// while running; returns one line for each part, as logged.
    fn reload(&self) -> Result<Vec<String>, String> {
        let running = &self.server.config;
        let (config, source) = match self.config_file() {
            Some(path) => (
                Config::load_file(&path).map_err(|e| e.to_string())?,
                format!("config {}", path.display()),
            ),
            // The built-in defaults do not change; keys and certificates may.
            None => (Config::clone(running), "built-in defaults".to_string()),
        };
        let mut said = vec![format!("reload: {source}")];
        said.push(format!("aliases: {}", config.aliases.len()));
        self.server
            .intake
            .directory()
            .replace_aliases(config.aliases.clone());
        said.push(match self.server.intake.dkim().reload(&config) {
            Ok(loaded) => loaded,
            Err(error) => format!("dkim: keeping the keys in use: {error}"),
        });
        if let Some(tls) = &self.server.tls {
            said.push(tls.force_reload());
        }
        let mut rest = config;
        rest.aliases = running.aliases.clone();
        rest.dkim = running.dkim.clone();
        rest.domains.local = running.domains.local.clone();
        if rest != **running {
            said.push("other changed settings apply at the next start".to_string());
        }
        for line in &said {
            log::info!("{line}");
        }
        Ok(said)
    }

    /// `newaliases`: the aliases only.
    fn reload_aliases(&self) -> Result<usize, String> {
        let path = self
            .config_file()
            .ok_or("petrel runs on its built-in defaults: there is no config file to read")?;
        // The whole file is checked, as at start; only the aliases change.
        let config = Config::load_file(&path).map_err(|e| e.to_string())?;
        let count = config.aliases.len();
        self.server
            .intake
            .directory()
            .replace_aliases(config.aliases);
        log::info!(
            "aliases reloaded from {}: {count} aliases (`petrel reload` or SIGHUP reloads keys \
             and certificates too)",
            path.display()
        );
        Ok(count)
    }
}

impl Controls for InstanceControls {
    fn wake(&self) {
        if let Some(waker) = &self.waker {
            waker.wake();
        }
    }

    fn unlock(&self, account: &str) -> Vec<std::net::IpAddr> {
        self.limiter.unlock_account(account)
    }

    fn reload_aliases(&self) -> Result<usize, String> {
        self.reloader.reload_aliases()
    }

    fn reload(&self) -> Result<Vec<String>, String> {
        self.reloader.reload()
    }
}

impl Instance {
    pub fn start(config: Config) -> Result<Instance, InstanceError> {
        Instance::start_with(config, Options::default())
    }

    pub fn start_with(config: Config, options: Options) -> Result<Instance, InstanceError> {
        let config = Arc::new(config);
        // Root's part, when started as root: hand data_dir over, bind the
        // ports, read the certificate. Nothing else in data_dir is opened
        // until root is gone.
        let run_as =
            privileges::prepare_data_dir(&config.server, &config.data_dir).map_err(error)?;
        let early_tls = certificate_before_switch(&config, run_as.is_some())?;
        // Listeners first: delivery must know every address we answer on.
        let mut bound = Bound::bind(&config, true).map_err(error)?;
        if let Some(run_as) = &run_as {
            privileges::switch(run_as).map_err(error)?;
            log::info!("running as {run_as}");
        }
        let lock = lock_data_dir(&config)?;
        let queue = Queue::open(&config.data_dir).map_err(error)?;
        for warning in crate::store::data_dir::make_private(&config.data_dir) {
            log::warn!("files: {warning}");
        }
        bound.bind_local(&config).map_err(error)?;
        let tls = match early_tls {
            Some(tls) => tls,
            None => ServerTls::load(&config).map_err(error)?,
        };
        let tls = Arc::new(tls);
        let dns = Arc::new(Dns::new(&config.dns).map_err(error)?);
        let outbound = OutboundPolicy::from_config(&config).with_listeners(bound.addresses());
        let services = directory_of(&config, &queue, &dns, &outbound);
        let gate = Gate::new(&config, Some(Arc::clone(&dns)));
        let limiter = services.auth_limiter();
        let delivery = if options.delivery {
            Some(
                Delivery::start(Arc::clone(&config), queue.handle(), dns, outbound)
                    .map_err(error)?,
            )
        } else {
            None
        };
        let parts = ServerParts {
            tls: Some(Arc::clone(&tls)),
            intake: intake_of(&config, gate, services, &queue, delivery.as_ref())?,
        };
        let server = match Server::start(Arc::clone(&config), bound, parts) {
            Ok(server) => server,
            Err(e) => {
                if let Some(delivery) = delivery {
                    delivery.shutdown(DELIVERY_GRACE);
                }
                return Err(error(e));
            }
        };
        let reloader = Reloader {
            server: server.shared_context(),
            config_file: Arc::new(std::sync::Mutex::new(None)),
        };
        let controls = InstanceControls {
            waker: delivery.as_ref().map(Delivery::waker),
            limiter,
            reloader: reloader.clone(),
        };
        let control = start_control(&config, controls);
        Ok(Instance {
            config,
            queue,
            tls,
            server,
            delivery,
            control,
            reloader,
            _lock: lock,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn local_addr(&self, kind: ListenerKind) -> Option<std::net::SocketAddr> {
        self.server.local_addr(kind)
    }

    /// Password checks (argon2) run since start: what AUTH has cost.
    pub fn password_checks(&self) -> u64 {
        self.server.context().intake.directory().password_checks()
    }

    pub fn active_sessions(&self) -> usize {
        self.server.active_sessions()
    }

    /// The file the config came from, for reloads to read.
    pub fn set_config_file(&self, path: &std::path::Path) {
        *self
            .reloader
            .config_file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(path.to_path_buf());
    }

    /// SIGHUP: applies what can change without a restart (aliases, DKIM
    /// keys and `[dkim]`, the certificate); one line each, as logged.
    pub fn reload(&self) -> Result<Vec<String>, String> {
        self.reloader.reload()
    }

    /// Session threads started so far (started as sessions need them).
    pub fn session_threads(&self) -> usize {
        self.server.worker_threads()
    }

    /// Outbound SMTP connections cached for reuse; `None` without delivery.
    pub fn delivery_connections_idle(&self) -> Option<usize> {
        self.delivery.as_ref().map(Delivery::connections_idle)
    }

    pub fn queue(&self) -> QueueHandle {
        self.queue.handle()
    }

    pub fn tls(&self) -> &ServerTls {
        &self.tls
    }

    /// Graceful: listeners close, sessions end, deliveries get a grace
    /// period, the queue writer drains.
    pub fn shutdown(self) {
        if let Some(control) = self.control {
            control.stop();
        }
        self.server.shutdown();
        if let Some(delivery) = self.delivery {
            delivery.shutdown(DELIVERY_GRACE);
        }
        self.queue.close();
    }
}

/// The configured certificate, read now when root may read it (or when
/// petrel is not root): its key is often readable by root alone. A
/// certificate in a folder another user can change is read only after the
/// switch, as that user; generated ones live in data_dir and wait too.
fn certificate_before_switch(
    config: &Config,
    will_switch: bool,
) -> Result<Option<ServerTls>, InstanceError> {
    let (Some(cert), Some(key)) = (&config.tls.cert, &config.tls.key) else {
        return Ok(None);
    };
    if nix::unistd::geteuid().is_root()
        && let Some(why) = [cert, key]
            .iter()
            .find_map(|path| crate::safe_fs::distrust(path))
    {
        if will_switch {
            log::info!("tls: the certificate is read as the server's user ({why})");
            return Ok(None);
        }
        return Err(InstanceError(format!(
            "petrel runs as root and will not read the certificate: {why}; set [server] user, \
             or keep tls.cert and tls.key where only root can change them"
        )));
    }
    ServerTls::load(config).map(Some).map_err(error)
}

/// The sessions' directory of accounts, aliases and policy; warns of
/// what in the config would keep mail from being delivered.
fn directory_of(
    config: &Arc<Config>,
    queue: &Queue,
    dns: &Arc<Dns>,
    outbound: &OutboundPolicy,
) -> Directory {
    let store = queue.handle().store().clone();
    let directory = Directory::new(
        Arc::clone(config),
        Accounts::new(store.read_pool(SESSION_READ_CONNECTIONS)),
        Some(Arc::clone(dns)),
        outbound.clone(),
        Some(LoginLog::new(store)),
    );
    let warnings = directory::deliverability_warnings(config, |address| {
        directory.accounts().exists(address).unwrap_or(false)
    });
    for warning in warnings {
        log::warn!("config: {warning}");
    }
    directory
}

/// What turns a session's envelope into queued mail, waking delivery
/// for it when delivery runs here.
fn intake_of(
    config: &Arc<Config>,
    gate: Gate,
    directory: Directory,
    queue: &Queue,
    delivery: Option<&Delivery>,
) -> Result<Intake, InstanceError> {
    let on_queued: Option<OnQueued> = delivery.map(|d| {
        let waker = d.waker();
        Box::new(move |destinations: Vec<String>| waker.new_mail_for(destinations)) as OnQueued
    });
    let dkim = crate::dkim::Keys::load(config).map_err(error)?;
    log::info!("dkim: {}", dkim.signer().summary());
    Ok(Intake::new(
        Arc::clone(config),
        gate,
        directory,
        Arc::new(dkim),
        queue.handle(),
        on_queued,
    ))
}

fn start_control(config: &Config, controls: InstanceControls) -> Option<ControlSocket> {
    match ControlSocket::start(&config.data_dir, Arc::new(controls)) {
        Ok(control) => Some(control),
        Err(error) => {
            log::warn!(
                "no control socket ({error}): changes made with `petrel queue` are noticed \
                 within a minute, and `petrel user unlock` takes effect at the next start"
            );
            None
        }
    }
}

/// Taken as the server's user, never through a symbolic link, and never
/// truncating what is there.
fn lock_data_dir(config: &Config) -> Result<File, InstanceError> {
    let path = config.data_dir.join(crate::store::data_dir::LOCK_FILE);
    crate::store::data_dir::create_private_dir(&config.data_dir).map_err(|e| {
        InstanceError(format!(
            "cannot create data_dir {}: {e}",
            config.data_dir.display()
        ))
    })?;
    let file = crate::safe_fs::open_lock_file(&path)
        .map_err(|e| InstanceError(format!("cannot open the lock file: {e}")))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(InstanceError(format!(
            "another petrel is already running on {} (it holds {})",
            config.data_dir.display(),
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(InstanceError(format!(
            "cannot lock {}: {e}",
            path.display()
        ))),
    }
}
