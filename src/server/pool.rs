//! The session threads: a worker owns one session from greeting to QUIT.
//! Workers are started as connections need them, up to
//! `limits.max_sessions`, and kept for the next ones. All of them started
//! at once and woken in turn would each touch its stack: 256 stacks, 5 MB
//! of memory after a burst of 100 senders, held for good. Started on
//! demand, a server that never had more than 20 clients at once has 20.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

use super::ServerContext;
use super::connection::{self, Incoming};

/// Worker threads run deep-ish code (TLS handshakes, SQLite, argon2 with
/// its memory on the heap) but nothing recursive; 256 KiB is plenty and
/// keeps hundreds of idle sessions cheap.
const WORKER_STACK: usize = 256 * 1024;
/// Started with the server, so the first clients never wait for a spawn.
const INITIAL_WORKERS: usize = 4;

/// The server is shutting down and takes no more sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolClosed;

pub struct WorkerPool {
    /// `None` once closed: workers finish what is queued and exit.
    jobs: Mutex<Option<Sender<Incoming>>>,
    receiver: Receiver<Incoming>,
    /// Workers waiting for a job that no submitted job has claimed yet.
    idle: Arc<AtomicUsize>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    max: usize,
    context: Arc<ServerContext>,
}

impl WorkerPool {
    pub fn start(context: Arc<ServerContext>, max: usize) -> std::io::Result<WorkerPool> {
        // Permits cap the sessions in flight at `max`, so this channel
        // never blocks an acceptor.
        let (jobs, receiver) = crossbeam_channel::bounded::<Incoming>(max.max(1));
        let pool = WorkerPool {
            jobs: Mutex::new(Some(jobs)),
            receiver,
            idle: Arc::new(AtomicUsize::new(0)),
            threads: Mutex::new(Vec::new()),
            max,
            context,
        };
        for _ in 0..INITIAL_WORKERS.min(max) {
            pool.spawn()?;
            pool.idle.fetch_add(1, Ordering::SeqCst);
        }
        Ok(pool)
    }

    /// Hands a session to a worker: an idle one if there is one, else a new
    /// one (below the limit; at the limit the permits guarantee one frees).
    /// `Err` when the pool is closed (shutting down): the job is dropped,
    /// which closes its connection.
    pub fn submit(&self, job: Incoming) -> Result<(), PoolClosed> {
        let claimed = self
            .idle
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if !claimed && let Err(error) = self.spawn() {
            log::warn!("cannot start a session thread ({error}); the session waits for one");
        }
        let sender = self
            .jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match sender {
            Some(sender) => sender.send(job).map_err(|_| PoolClosed),
            None => Err(PoolClosed),
        }
    }

    /// Starts one more worker unless the pool is at its limit.
    fn spawn(&self) -> std::io::Result<()> {
        let mut threads = self.threads.lock().unwrap_or_else(PoisonError::into_inner);
        if threads.len() >= self.max {
            return Ok(());
        }
        let receiver = self.receiver.clone();
        let context = Arc::clone(&self.context);
        let idle = Arc::clone(&self.idle);
        let handle = std::thread::Builder::new()
            .name(format!("smtp-worker-{}", threads.len()))
            .stack_size(WORKER_STACK)
            .spawn(move || worker_loop(&receiver, &context, &idle))?;
        threads.push(handle);
        Ok(())
    }

    /// Workers started so far.
    pub fn size(&self) -> usize {
        self.threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// No more jobs: workers finish their sessions and exit; waits for them.
    pub fn close(&self) {
        self.jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let threads: Vec<JoinHandle<()>> = self
            .threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
            .collect();
        for thread in threads {
            if thread.join().is_err() {
                log::error!("a worker thread panicked during shutdown");
            }
        }
    }
}

fn worker_loop(jobs: &Receiver<Incoming>, context: &ServerContext, idle: &AtomicUsize) {
    let mut buffers = connection::Buffers::default();
    while let Ok(job) = jobs.recv() {
        let peer = job.peer;
        // A bug in one session must not take a worker away from the pool.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            connection::serve(job, context, &mut buffers);
        }));
        if outcome.is_err() {
            log::error!("{peer}: session panicked; connection dropped");
        }
        idle.fetch_add(1, Ordering::SeqCst);
    }
}
