//! Work on targets with a deadline. Reading a process's memory, its /proc files or the files
//! it maps can block for as long as the process wants (a page fault on a hung FUSE or NFS
//! mount, a userfaultfd nobody serves, a lock held in its mm). Such work runs on worker
//! threads; the loop waits for it up to a deadline and goes on without it. A worker stuck in
//! the kernel stays stuck, but only that process waits for it: new workers are started for
//! the rest, up to a bound, and idle ones end after a while.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Condvar, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

type Job = Box<dyn FnOnce() + Send>;

/// Threads at most, stuck ones included: past that, work waits in the queue (and its caller
/// times out) until a stuck one comes back.
const MAX_WORKERS: usize = 32;
/// How long an idle worker waits for work before it ends.
const IDLE: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    workers: usize,
    idle: usize,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    /// Results that missed their deadline.
    late: AtomicU64,
}

/// A bounded, self-replacing pool of worker threads.
#[derive(Clone, Default)]
pub struct Workers {
    shared: Arc<Shared>,
}

/// The result of work handed to [`Workers::run`], when it comes.
pub struct Pending<R> {
    rx: mpsc::Receiver<R>,
    shared: Arc<Shared>,
}

/// Work that did not finish in time, or whose worker died.
#[derive(Debug, PartialEq, Eq)]
pub enum NotDone {
    Late,
    Lost,
}

impl Workers {
    /// Queues `work`; its result is taken from the returned [`Pending`].
    pub fn run<R: Send + 'static>(&self, work: impl FnOnce() -> R + Send + 'static) -> Pending<R> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let _ = tx.send(work());
        });
        let mut q = self.lock();
        q.jobs.push_back(job);
        if q.idle == 0 && q.workers < MAX_WORKERS {
            let shared = Arc::clone(&self.shared);
            let spawned = std::thread::Builder::new()
                .name("leakmon-worker".into())
                .spawn(move || worker(&shared));
            match spawned {
                Ok(_) => q.workers += 1,
                Err(e) => log::warn!("cannot start a worker thread: {e}"),
            }
        }
        drop(q);
        self.shared.ready.notify_one();
        Pending {
            rx,
            shared: Arc::clone(&self.shared),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.shared
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Worker threads alive, and results that came after their deadline.
    pub fn stats(&self) -> (usize, u64) {
        (
            self.lock().workers,
            self.shared.late.load(Ordering::Relaxed),
        )
    }
}

fn worker(shared: &Shared) {
    let mut q = shared.queue.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        if let Some(job) = q.jobs.pop_front() {
            drop(q);
            // A panic ends the job (its caller sees `Lost`), not the worker's accounting.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            q = shared.queue.lock().unwrap_or_else(PoisonError::into_inner);
            continue;
        }
        q.idle += 1;
        let (next, timeout) = shared
            .ready
            .wait_timeout(q, IDLE)
            .unwrap_or_else(PoisonError::into_inner);
        q = next;
        q.idle -= 1;
        if timeout.timed_out() && q.jobs.is_empty() {
            q.workers -= 1;
            return;
        }
    }
}

impl<R> Pending<R> {
    /// Waits for the result until `deadline`, giving up early when `stop` says so.
    pub fn wait(&self, deadline: Instant, stop: impl Fn() -> bool) -> Result<R, NotDone> {
        loop {
            let now = Instant::now();
            if now >= deadline || stop() {
                return self.try_take();
            }
            let slice = (deadline - now).min(Duration::from_millis(100));
            match self.rx.recv_timeout(slice) {
                Ok(r) => return Ok(r),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(NotDone::Lost),
            }
        }
    }

    /// The result if it is there now.
    pub fn try_take(&self) -> Result<R, NotDone> {
        match self.rx.try_recv() {
            Ok(r) => Ok(r),
            Err(mpsc::TryRecvError::Empty) => Err(NotDone::Late),
            Err(mpsc::TryRecvError::Disconnected) => Err(NotDone::Lost),
        }
    }

    /// Counts a result taken after its deadline.
    pub fn came_late(&self) {
        self.shared.late.fetch_add(1, Ordering::Relaxed);
    }
}

/// State that belongs to one watched process and travels to a worker for each scan of it:
/// here between scans, away while a worker has it, and still away when that worker missed
/// its deadline (the process is then skipped until the worker comes back).
pub struct Slot<T, O> {
    here: Option<T>,
    away: Option<Away<T, O>>,
}

struct Away<T, O> {
    pending: Pending<(T, O)>,
    /// Whether this absence was reported.
    reported: bool,
}

/// How a scan of one process ended.
pub enum Outcome<O> {
    Done(O),
    /// Past the deadline; `first` the first time for this absence (report it then).
    Late {
        first: bool,
    },
    /// The worker died (a bug): the state is gone.
    Lost,
    /// Nothing was asked of it.
    Idle,
}

impl<T: Send + 'static, O: Send + 'static> Slot<T, O> {
    pub fn new(state: T) -> Self {
        Self {
            here: Some(state),
            away: None,
        }
    }

    /// The state, when it is here.
    pub fn get(&self) -> Option<&T> {
        self.here.as_ref()
    }

    /// Whether a worker has the state past its deadline.
    pub fn is_stuck(&self) -> bool {
        self.away.as_ref().is_some_and(|a| a.reported)
    }

    /// Takes the state back from a worker that came back late; true when it did.
    pub fn reclaim(&mut self) -> bool {
        let Some(away) = &self.away else {
            return false;
        };
        match away.pending.try_take() {
            Ok((state, _stale_result)) => {
                away.pending.came_late();
                self.here = Some(state);
                self.away = None;
                true
            }
            Err(NotDone::Late) => false,
            Err(NotDone::Lost) => {
                self.away = None;
                false
            }
        }
    }

    /// Sends the state to a worker to run `work` on it; false when it is away.
    pub fn dispatch(
        &mut self,
        workers: &Workers,
        work: impl FnOnce(&mut T) -> O + Send + 'static,
    ) -> bool {
        let Some(mut state) = self.here.take() else {
            return false;
        };
        let pending = workers.run(move || {
            let out = work(&mut state);
            (state, out)
        });
        self.away = Some(Away {
            pending,
            reported: false,
        });
        true
    }

    /// Waits for the work sent by [`Slot::dispatch`] until `deadline` (or `stop`).
    pub fn settle(&mut self, deadline: Instant, stop: impl Fn() -> bool) -> Outcome<O> {
        let Some(away) = &mut self.away else {
            return Outcome::Idle;
        };
        match away.pending.wait(deadline, stop) {
            Ok((state, out)) => {
                self.here = Some(state);
                self.away = None;
                Outcome::Done(out)
            }
            Err(NotDone::Late) => {
                let first = !away.reported;
                away.reported = true;
                Outcome::Late { first }
            }
            Err(NotDone::Lost) => {
                self.away = None;
                Outcome::Lost
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stuck_job_delays_nobody_else() {
        let workers = Workers::default();
        let (release, stuck) = mpsc::channel::<()>();
        let blocked = workers.run(move || stuck.recv().is_ok());
        let deadline = Instant::now() + Duration::from_millis(200);
        let quick: Vec<_> = (0..8u32).map(|i| workers.run(move || i * 2)).collect();
        for (i, p) in quick.iter().enumerate() {
            assert_eq!(p.wait(deadline, || false), Ok(i as u32 * 2));
        }
        assert_eq!(blocked.wait(deadline, || false), Err(NotDone::Late));
        release.send(()).unwrap();
        let later = Instant::now() + Duration::from_secs(5);
        assert_eq!(blocked.wait(later, || false), Ok(true));
    }

    #[test]
    fn waiting_ends_when_told_to_stop_and_panics_are_lost_results() {
        let workers = Workers::default();
        let never = workers.run(|| std::thread::sleep(Duration::from_secs(3)));
        let started = Instant::now();
        let far = started + Duration::from_secs(60);
        assert_eq!(never.wait(far, || true), Err(NotDone::Late));
        assert!(started.elapsed() < Duration::from_secs(1));
        #[allow(clippy::panic, reason = "the panic under test")]
        let dies = workers.run(|| -> u32 { panic!("worker panic under test") });
        assert_eq!(dies.wait(far, || false), Err(NotDone::Lost));
    }
}
