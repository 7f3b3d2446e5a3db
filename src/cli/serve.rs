//! `petrel serve`: run until SIGTERM or SIGINT; SIGHUP reloads what can
//! change without a restart (aliases, DKIM keys and `[dkim]`, the TLS
//! certificate) and logs what it loaded.

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use super::{Failure, init_logging};
use crate::config::{Config, ConfigSource};
use crate::instance::Instance;
use crate::server::notify::notify;

pub fn serve(config: Config, source: ConfigSource) -> Result<(), Failure> {
    init_logging();
    log::info!(
        "petrel {} starting: config {source}, data in {}, hostname {}",
        env!("CARGO_PKG_VERSION"),
        config.data_dir.display(),
        config.hostname
    );
    // A missing user, or no way to become it, is a config error (exit 2)
    // found before anything is bound.
    crate::server::privileges::pending_switch(&config.server)
        .map_err(|e| Failure::Usage(e.to_string()))?;
    // A certificate that is not there is a config error too (exit 2, as
    // the README says), not a failure at run time.
    for (key, path) in [("tls.cert", &config.tls.cert), ("tls.key", &config.tls.key)] {
        if let Some(path) = path
            && let Err(error) = std::fs::metadata(path)
            && error.kind() == std::io::ErrorKind::NotFound
        {
            return Err(Failure::Usage(format!(
                "config error: {key}: {} does not exist",
                path.display()
            )));
        }
    }
    // Register before starting so a signal during start-up is not lost.
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| Failure::Runtime(format!("cannot install signal handlers: {e}")))?;
    let instance = Instance::start(config).map_err(|e| Failure::Runtime(e.to_string()))?;
    if let ConfigSource::File(path) = &source {
        instance.set_config_file(path);
    }
    log::info!("petrel ready");
    notify("READY=1\nSTATUS=serving");
    for signal in signals.forever() {
        if signal == SIGHUP {
            log::info!("SIGHUP: reloading aliases, DKIM keys and the certificate");
            if let Err(error) = instance.reload() {
                log::error!("SIGHUP: nothing reloaded: {error}");
            }
            continue;
        }
        log::info!("signal {signal}: shutting down");
        notify("STOPPING=1");
        break;
    }
    instance.shutdown();
    log::info!("petrel stopped");
    Ok(())
}
