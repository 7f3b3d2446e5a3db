//! Delivery: a scheduler thread finds due recipients in the queue, groups
//! them per message and destination (local, smart host, or a domain's MX
//! hosts) and hands each group to a pool of delivery workers. Workers
//! deliver, then record the outcome in the queue: deliver first, commit
//! second, so a crash can duplicate a message but never lose one.
//!
//! Owns retry timing, bounces and delay warnings; never accepts mail.

mod backoff;
pub mod client;
pub mod dsn;
pub mod maildir;
pub mod outcome;
mod remote;
mod scheduler;
mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use rustls::ClientConfig;

use crate::auth::Accounts;
use crate::config::Config;
use crate::dns::Dns;
use crate::policy::outbound::OutboundPolicy;
use crate::queue::delivery::ClaimedRecipient;
use crate::queue::{QueueHandle, ReadPool};
use crate::routing::Route;

/// What a worker connects to for a job: recipients of one message that
/// share a destination share one transaction.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Destination {
    Local,
    SmartHost,
    Domain(String),
}

impl Destination {
    pub fn of(route: &Route) -> Destination {
        match route {
            Route::Local { .. } => Destination::Local,
            Route::SmartHost => Destination::SmartHost,
            Route::Remote { domain } => Destination::Domain(domain.clone()),
        }
    }
}

/// One message to one destination, for one worker.
#[derive(Debug, Clone)]
pub struct Job {
    pub message_id: String,
    pub destination: Destination,
    pub recipients: Vec<ClaimedRecipient>,
}

/// Shared by the scheduler and the workers.
pub struct DeliveryContext {
    pub config: Arc<Config>,
    pub queue: QueueHandle,
    pub reads: ReadPool,
    pub accounts: Accounts,
    pub dns: Arc<Dns>,
    /// Which hosts MX and literal delivery may connect to.
    pub outbound: OutboundPolicy,
    pub tls_unverified: Arc<ClientConfig>,
    /// `None` when the smart host's trust anchors could not be loaded.
    pub tls_smarthost: Option<Arc<ClientConfig>>,
}

/// Wakes the scheduler: new mail, a freed worker, an operator's retry.
/// Wakes coalesce, so calling it often is cheap.
#[derive(Clone)]
pub struct Waker(Sender<()>);

impl Waker {
    pub fn wake(&self) {
        let _ = self.0.try_send(());
    }
}

crate::error::message_error!(DeliveryError, "Delivery could not start.");

pub struct Delivery {
    waker: Waker,
    stop: Arc<AtomicBool>,
    scheduler: Option<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
    finished: Receiver<()>,
}

impl Delivery {
    /// Puts whatever was in flight when petrel last stopped back in the
    /// queue, then starts the scheduler and workers.
    pub fn start(
        config: Arc<Config>,
        queue: QueueHandle,
        dns: Arc<Dns>,
        outbound: OutboundPolicy,
    ) -> Result<Delivery, DeliveryError> {
        let requeued = queue
            .requeue_all()
            .map_err(|e| DeliveryError(format!("cannot recover in-flight deliveries: {e}")))?;
        if requeued > 0 {
            log::warn!(
                "delivery: {requeued} recipients were in flight at the last stop; retrying them"
            );
        }
        assign_routes(&config, &queue)?;
        let tls_unverified =
            crate::tls::client::unverified().map_err(|e| DeliveryError(e.to_string()))?;
        let tls_smarthost =
            match crate::tls::client::verified(&crate::tls::client::SmarthostTrust {
                ca_file: config.delivery.smarthost_ca.clone(),
                fingerprint: config
                    .delivery
                    .smarthost_fingerprint
                    .as_deref()
                    .and_then(|f| crate::config::parse_fingerprint(f).ok()),
            }) {
                Ok(tls) => Some(tls),
                Err(error) => {
                    log::error!(
                        "delivery: smart host TLS: {error}; mail to the smart host will wait"
                    );
                    None
                }
            };
        let reads = ReadPool::new(queue.path());
        let accounts = Accounts::new(ReadPool::new(queue.path()));
        let context = Arc::new(DeliveryContext {
            config: Arc::clone(&config),
            queue,
            reads,
            accounts,
            dns,
            outbound,
            tls_unverified,
            tls_smarthost,
        });

        let (wake_sender, wake_receiver) = crossbeam_channel::bounded(1);
        let waker = Waker(wake_sender);
        let stop = Arc::new(AtomicBool::new(false));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let (jobs, job_receiver) = crossbeam_channel::unbounded::<Job>();
        let (finished_sender, finished) = crossbeam_channel::unbounded();

        let mut workers = Vec::new();
        for index in 0..config.delivery.workers {
            let jobs = job_receiver.clone();
            let context = Arc::clone(&context);
            let in_flight = Arc::clone(&in_flight);
            let waker = waker.clone();
            let finished = finished_sender.clone();
            let handle = std::thread::Builder::new()
                .name(format!("delivery-{index}"))
                .spawn(move || {
                    worker::run(jobs, &context, &in_flight, &waker);
                    let _ = finished.send(());
                })
                .map_err(|e| DeliveryError(format!("cannot start delivery worker: {e}")))?;
            workers.push(handle);
        }

        let scheduler = scheduler::Scheduler {
            context: Arc::clone(&context),
            jobs,
            wake: wake_receiver,
            stop: Arc::clone(&stop),
            in_flight,
            capacity: config.delivery.workers,
        };
        let scheduler = std::thread::Builder::new()
            .name("scheduler".into())
            .spawn(move || scheduler.run())
            .map_err(|e| DeliveryError(format!("cannot start the scheduler: {e}")))?;

        log::info!("delivery: {} workers started", config.delivery.workers);
        Ok(Delivery {
            waker,
            stop,
            scheduler: Some(scheduler),
            workers,
            finished,
        })
    }

    pub fn waker(&self) -> Waker {
        self.waker.clone()
    }

    /// Stops scheduling, then gives running deliveries `grace` to finish.
    /// Deliveries still running after that are abandoned: their recipients
    /// are retried at the next start (at least once, never lost).
    pub fn shutdown(mut self, grace: Duration) {
        self.stop.store(true, Ordering::SeqCst);
        self.waker.wake();
        if let Some(scheduler) = self.scheduler.take()
            && scheduler.join().is_err()
        {
            log::error!("delivery: the scheduler panicked");
        }
        // The scheduler held the only job sender; workers now drain and exit.
        let deadline = Instant::now() + grace;
        let mut done = 0;
        while done < self.workers.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.finished.recv_timeout(left) {
                Ok(()) => done += 1,
                Err(_) => break,
            }
        }
        if done < self.workers.len() {
            log::warn!(
                "delivery: {} deliveries still running at shutdown; they will be retried at the next start",
                self.workers.len() - done
            );
            return;
        }
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// Routes recipients queued by an older petrel and lets waiting remote
/// recipients follow a changed smart host setting (see
/// [`crate::queue::delivery::assign_routes`]).
fn assign_routes(config: &Config, queue: &QueueHandle) -> Result<(), DeliveryError> {
    let mut conn = queue
        .reader()
        .map_err(|e| DeliveryError(format!("cannot open the queue to route it: {e}")))?;
    let changes = crate::queue::delivery::assign_routes(&mut conn, config)
        .map_err(|e| DeliveryError(format!("cannot route queued recipients: {e}")))?;
    if changes.routed > 0 {
        log::info!(
            "delivery: {} recipients queued by an older petrel were given their route",
            changes.routed
        );
    }
    if changes.rerouted > 0 {
        log::info!(
            "delivery: {} waiting recipients now go {} (delivery.smarthost changed)",
            changes.rerouted,
            if config.delivery.smarthost.is_some() {
                "through the smart host"
            } else {
                "to their MX hosts"
            }
        );
    }
    for id in changes.unroutable {
        log::error!(
            "delivery: recipient row {id} has an address that cannot be parsed; it stays in \
             the queue undelivered (see `petrel queue list`; delete or bounce its message)"
        );
    }
    Ok(())
}
