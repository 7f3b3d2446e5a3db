//! Delivery: a scheduler thread finds due recipients in the queue, groups
//! them per message and destination (local, smart host, or a domain's MX
//! hosts) and hands each group to a pool of delivery workers. Workers
//! deliver, then record the outcome in the queue: deliver first, commit
//! second, so a crash can duplicate a message but never lose one.
//!
//! Owns retry timing, bounces and delay warnings; never accepts mail.

mod backoff;
pub mod client;
pub mod connections;
pub mod dsn;
pub mod maildir;
pub mod next_state;
pub mod outcome;
mod remote;
mod scheduler;
mod worker;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use rustls::ClientConfig;

use crate::auth::Accounts;
use crate::config::Config;
use crate::dns::Dns;
use crate::envelope::Destination;
use crate::policy::outbound::OutboundPolicy;
use crate::queue::QueueHandle;
use crate::queue::delivery::ClaimedRecipient;
use crate::store::ReadPool;

/// What a finished job showed about its destination, for its window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// A host answered past EHLO: the destination works.
    Reached,
    /// Every try failed before a conversation: no host, no connection,
    /// no greeting, a temporary DNS failure.
    Unreachable,
    /// Nothing learned (a local job, an internal failure).
    Unknown,
}

impl Reach {
    pub fn of(attempts: &[outcome::Attempt]) -> Reach {
        use outcome::{Stage, Verdict};
        let before_conversation = |attempt: &outcome::Attempt| {
            attempt.verdict == Verdict::Temporary
                && matches!(
                    attempt.stage,
                    Stage::Routing | Stage::Connect | Stage::Greeting | Stage::Hello
                )
        };
        if attempts.is_empty() {
            Reach::Unknown
        } else if attempts.iter().all(before_conversation) {
            Reach::Unreachable
        } else {
            Reach::Reached
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
    /// Outbound SMTP connections waiting for the next message.
    pub connections: connections::ConnectionCache,
    /// MTA-STS policies; `None` when `delivery.mta_sts` is off or the
    /// trust anchors could not be loaded.
    pub mta_sts: Option<crate::mta_sts::Policies>,
    /// Verifies MX hosts' certificates where a policy demands it.
    pub tls_mx_verified: Option<Arc<ClientConfig>>,
}

/// Wakes the scheduler: new mail, an operator's retry, a shutdown.
/// Wakes coalesce, so calling it often is cheap.
#[derive(Clone)]
pub struct Waker {
    signal: Sender<()>,
    news: Arc<Mutex<News>>,
}

impl Waker {
    /// Something changed that only a look at the whole queue can tell.
    pub fn wake(&self) {
        self.news().anything = true;
        let _ = self.signal.try_send(());
    }

    /// A message was queued for these destinations (keys, as
    /// [`Destination::key`]). Mail for destinations that already have a
    /// backlog needs no walk over the queue: their refills reach it.
    pub fn new_mail_for(&self, destinations: impl IntoIterator<Item = String>) {
        {
            let mut news = self.news();
            news.destinations.extend(destinations);
            if news.destinations.len() > NEWS_DESTINATIONS {
                news.destinations.clear();
                news.anything = true;
            }
        }
        let _ = self.signal.try_send(());
    }

    #[cfg(test)]
    pub(crate) fn for_test(signal: Sender<()>, news: Arc<Mutex<News>>) -> Waker {
        Waker { signal, news }
    }

    fn news(&self) -> MutexGuard<'_, News> {
        connections::lock(&self.news)
    }
}

/// Destinations named between two wakes, at most: past this many, the
/// scheduler simply looks at the whole queue.
const NEWS_DESTINATIONS: usize = 1024;

/// What the wakes since the scheduler last looked said.
#[derive(Debug, Default)]
pub struct News {
    /// A change only a walk over the queue can find.
    pub anything: bool,
    /// Destinations that got new mail.
    pub destinations: HashSet<String>,
}

impl News {
    /// Takes what was said, leaving nothing.
    pub fn take(shared: &Mutex<News>) -> News {
        std::mem::take(&mut *connections::lock(shared))
    }
}

crate::error::message_error!(DeliveryError, "Delivery could not start.");

pub struct Delivery {
    context: Arc<DeliveryContext>,
    waker: Waker,
    stop: Arc<AtomicBool>,
    scheduler: Option<JoinHandle<scheduler::Stopped>>,
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
        let tls_mx_verified = if config.delivery.mta_sts {
            match crate::tls::client::verified(&crate::tls::client::SmarthostTrust {
                ca_file: config.delivery.ca_file.clone(),
                fingerprint: None,
            }) {
                Ok(tls) => Some(tls),
                Err(error) => {
                    log::error!("delivery: MTA-STS is off: delivery.ca_file: {error}");
                    None
                }
            }
        } else {
            None
        };
        let mta_sts = tls_mx_verified.as_ref().map(|tls| {
            crate::mta_sts::Policies::new(
                Arc::clone(&dns),
                outbound.clone(),
                queue.store().clone(),
                Arc::clone(tls),
                config.delivery.mta_sts_port,
            )
        });
        // One connection per delivery thread (and the scheduler): a worker
        // holds its own while it streams content to a slow server, and
        // never waits for another's.
        let threads = config.delivery.workers + config.delivery.local_workers + 1;
        let reads = queue.store().read_pool(threads);
        let accounts = Accounts::new(queue.store().read_pool(threads));
        let context = Arc::new(DeliveryContext {
            config: Arc::clone(&config),
            queue,
            reads,
            accounts,
            dns,
            outbound,
            tls_unverified,
            tls_smarthost,
            mta_sts,
            tls_mx_verified,
            connections: connections::ConnectionCache::new(
                config.delivery.workers,
                config.delivery.connection_reuse_limit,
                config.delivery.connection_idle.get(),
            ),
        });

        let (wake_sender, wake_receiver) = crossbeam_channel::bounded(1);
        let news = Arc::new(Mutex::new(News::default()));
        let waker = Waker {
            signal: wake_sender,
            news: Arc::clone(&news),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (local_jobs, local_receiver) = crossbeam_channel::unbounded::<Job>();
        let (remote_jobs, remote_receiver) = crossbeam_channel::unbounded::<Job>();
        let (events, event_receiver) = crossbeam_channel::unbounded::<scheduler::Event>();
        let (finished_sender, finished) = crossbeam_channel::unbounded();

        let mut workers = Vec::new();
        let lanes = [
            ("local", config.delivery.local_workers, &local_receiver),
            ("delivery", config.delivery.workers, &remote_receiver),
        ];
        for (name, count, lane) in lanes {
            for index in 0..count {
                let jobs = lane.clone();
                let context = Arc::clone(&context);
                let events = events.clone();
                let stop = Arc::clone(&stop);
                let finished = finished_sender.clone();
                let handle = std::thread::Builder::new()
                    .name(format!("{name}-{index}"))
                    .spawn(move || {
                        worker::run(jobs, &context, &events, &stop);
                        let _ = finished.send(());
                    })
                    .map_err(|e| DeliveryError(format!("cannot start delivery worker: {e}")))?;
                workers.push(handle);
            }
        }
        // Only workers hold event senders: the scheduler sees them all go.
        drop(events);

        let scheduler = scheduler::Scheduler::new(
            Arc::clone(&context),
            scheduler::Lanes {
                local: local_jobs,
                remote: remote_jobs,
            },
            (local_receiver, remote_receiver),
            event_receiver,
            wake_receiver,
            news,
            Arc::clone(&stop),
        );
        let scheduler = std::thread::Builder::new()
            .name("scheduler".into())
            .spawn(move || scheduler.run())
            .map_err(|e| DeliveryError(format!("cannot start the scheduler: {e}")))?;

        log::info!(
            "delivery: {} remote and {} local workers started",
            config.delivery.workers,
            config.delivery.local_workers
        );
        Ok(Delivery {
            context,
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

    /// Outbound connections waiting for their next message.
    pub fn connections_idle(&self) -> usize {
        self.context.connections.idle()
    }

    /// Stops scheduling; jobs not started go back to the queue untouched;
    /// running deliveries get `grace` to finish. Deliveries still running
    /// after that are abandoned: their recipients are retried at the next
    /// start (the only case where a message can be sent twice).
    pub fn shutdown(mut self, grace: Duration) {
        self.stop.store(true, Ordering::SeqCst);
        self.waker.wake();
        let stopped = match self.scheduler.take().map(JoinHandle::join) {
            Some(Ok(stopped)) => Some(stopped),
            Some(Err(_)) => {
                log::error!("delivery: the scheduler panicked");
                None
            }
            None => None,
        };
        // The scheduler held the only job senders; idle workers now exit.
        let deadline = Instant::now() + grace;
        let mut done = 0;
        while done < self.workers.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.finished.recv_timeout(left) {
                Ok(()) => done += 1,
                Err(_) => break,
            }
        }
        // Jobs a worker took after the stop and handed back.
        if let Some(stopped) = stopped {
            let ids: Vec<i64> = stopped
                .events
                .try_iter()
                .filter_map(|event| match event {
                    scheduler::Event::Unstarted(job) => Some(job),
                    scheduler::Event::Finished { .. } => None,
                })
                .flat_map(|job| job.recipients.into_iter().map(|r| r.id))
                .collect();
            if !ids.is_empty()
                && let Err(error) = self.context.queue.requeue(ids)
            {
                log::error!(
                    "delivery: cannot put back unstarted jobs ({error}); recovered at next start"
                );
            }
        }
        self.context.connections.close_all();
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
