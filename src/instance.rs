//! A whole running petrel: queue, TLS, listeners (and, when enabled,
//! delivery), started and stopped in the right order. `petrel serve` runs
//! one until a signal; tests run several side by side in one process.

use std::sync::Arc;

use crate::auth::Accounts;
use crate::config::Config;
use crate::protocol::session::ListenerKind;
use crate::queue::{Queue, QueueHandle, ReadPool};
use crate::server::directory::{self, Directory};
use crate::server::{Server, ServerParts};
use crate::tls::ServerTls;

#[derive(Debug)]
pub struct InstanceError(pub String);

impl std::fmt::Display for InstanceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InstanceError {}

pub struct Instance {
    config: Arc<Config>,
    queue: Queue,
    tls: Arc<ServerTls>,
    server: Server,
}

impl Instance {
    pub fn start(config: Config) -> Result<Instance, InstanceError> {
        let config = Arc::new(config);
        let queue = Queue::open(&config.data_dir).map_err(|e| InstanceError(e.to_string()))?;
        let tls = Arc::new(ServerTls::load(&config).map_err(|e| InstanceError(e.to_string()))?);
        let accounts = Accounts::new(ReadPool::new(queue.handle().path()));
        let services = Directory::new(Arc::clone(&config), accounts);
        let warnings = directory::deliverability_warnings(&config, |address| {
            services.accounts().exists(address).unwrap_or(false)
        });
        for warning in warnings {
            log::warn!("config: {warning}");
        }
        let parts = ServerParts {
            queue: queue.handle(),
            tls: Some(Arc::clone(&tls)),
            services,
            on_queued: None,
        };
        let server =
            Server::start(Arc::clone(&config), parts).map_err(|e| InstanceError(e.to_string()))?;
        Ok(Instance {
            config,
            queue,
            tls,
            server,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn local_addr(&self, kind: ListenerKind) -> Option<std::net::SocketAddr> {
        self.server.local_addr(kind)
    }

    pub fn active_sessions(&self) -> usize {
        self.server.active_sessions()
    }

    pub fn queue(&self) -> QueueHandle {
        self.queue.handle()
    }

    pub fn tls(&self) -> &ServerTls {
        &self.tls
    }

    /// Graceful: listeners close, sessions end, the queue writer drains.
    pub fn shutdown(self) {
        self.server.shutdown();
        self.queue.close();
    }
}
