//! Work on targets with a deadline. Reading a process's memory, its /proc files or the files
//! it maps can block for as long as the process wants (a page fault on a hung FUSE or NFS
//! mount, a userfaultfd nobody serves, a lock held in its mm). Such work runs on worker
//! threads; the loop waits for it up to a deadline and goes on without it. A worker stuck in
//! the kernel stays stuck, but only that process waits for it: when every worker has been on
//! one job for a while, another is started, up to a bound; idle ones end after a while.

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
/// Threads started whenever work waits (each costs its stack's touched pages).
const BASE_WORKERS: usize = 2;
/// A job running this long makes its worker count as held up: work waiting then gets a new
/// worker.
const HELD_UP: Duration = Duration::from_millis(500);
/// How long an idle worker waits for work before it ends.
const IDLE: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    workers: usize,
    idle: usize,
    /// Start times of the jobs running, by job number.
    running: Vec<(u64, Instant)>,
    next_job: u64,
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
pub(crate) struct Workers {
    shared: Arc<Shared>,
}

/// The result of work handed to [`Workers::run`], when it comes.
pub(crate) struct Pending<R> {
    rx: mpsc::Receiver<R>,
    shared: Arc<Shared>,
}

/// Work that did not finish in time, or whose worker died.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum NotDone {
    Late,
    Lost,
}

impl Workers {
    /// Queues `work`; its result is taken from the returned [`Pending`].
    pub(crate) fn run<R: Send + 'static>(
        &self,
        work: impl FnOnce() -> R + Send + 'static,
    ) -> Pending<R> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let _ = tx.send(work());
        });
        let mut q = self.lock();
        q.jobs.push_back(job);
        let now = Instant::now();
        let held_up = q
            .running
            .iter()
            .filter(|(_, t)| now.duration_since(*t) >= HELD_UP)
            .count();
        let wanted = BASE_WORKERS + held_up;
        if q.idle == 0 && q.workers < wanted.min(MAX_WORKERS) {
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
    pub(crate) fn stats(&self) -> (usize, u64) {
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
            let id = q.next_job;
            q.next_job += 1;
            q.running.push((id, Instant::now()));
            drop(q);
            // A panic ends the job (its caller sees `Lost`), not the worker's accounting.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            q = shared.queue.lock().unwrap_or_else(PoisonError::into_inner);
            q.running.retain(|(j, _)| *j != id);
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
    pub(crate) fn wait(&self, deadline: Instant, stop: impl Fn() -> bool) -> Result<R, NotDone> {
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
    pub(crate) fn try_take(&self) -> Result<R, NotDone> {
        match self.rx.try_recv() {
            Ok(r) => Ok(r),
            Err(mpsc::TryRecvError::Empty) => Err(NotDone::Late),
            Err(mpsc::TryRecvError::Disconnected) => Err(NotDone::Lost),
        }
    }

    /// Counts a result taken after its deadline.
    pub(crate) fn came_late(&self) {
        self.shared.late.fetch_add(1, Ordering::Relaxed);
    }
}

/// State that belongs to one watched process and travels to a worker for each scan of it:
/// here between scans, away while a worker has it, and still away when that worker missed
/// its deadline (the process is then skipped until the worker comes back).
pub(crate) struct Slot<T, O> {
    here: Option<T>,
    away: Option<Away<T, O>>,
}

struct Away<T, O> {
    pending: Pending<(T, O)>,
    /// Whether this absence was reported.
    reported: bool,
}

/// How a scan of one process ended.
pub(crate) enum Outcome<O> {
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
    pub(crate) fn new(state: T) -> Self {
        Self {
            here: Some(state),
            away: None,
        }
    }

    /// Whether a worker has the state past its deadline.
    pub(crate) fn is_stuck(&self) -> bool {
        self.away.as_ref().is_some_and(|a| a.reported)
    }

    /// Takes the state back from a worker that came back late, with what it brought (still
    /// worth judging: a very large process's scan may take longer than the deadline).
    pub(crate) fn reclaim(&mut self) -> Option<O> {
        let away = self.away.as_ref()?;
        match away.pending.try_take() {
            Ok((state, out)) => {
                away.pending.came_late();
                self.here = Some(state);
                self.away = None;
                Some(out)
            }
            Err(NotDone::Late) => None,
            Err(NotDone::Lost) => {
                self.away = None;
                None
            }
        }
    }

    /// Sends the state to a worker to run `work` on it; false when it is away.
    pub(crate) fn dispatch(
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
    pub(crate) fn settle(&mut self, deadline: Instant, stop: impl Fn() -> bool) -> Outcome<O> {
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

/// Lets one memory-heavy piece of work run at a time (loading a module's symbols, inspecting
/// a Go executable: each reads whole tables of a file), so their transient memory does not
/// add up across workers. A holder that outlasts `stuck_after` (a file on a hung mount) no
/// longer keeps others out, up to `max` holders.
pub(crate) struct Gate {
    holders: Mutex<Vec<(u64, Instant)>>,
    freed: Condvar,
    next: AtomicU64,
    stuck_after: Duration,
    max: usize,
}

/// A place in a [`Gate`], given back when dropped.
pub(crate) struct Entered<'a> {
    gate: &'a Gate,
    id: u64,
}

impl Gate {
    pub(crate) fn new(stuck_after: Duration, max: usize) -> Self {
        Self {
            holders: Mutex::new(Vec::new()),
            freed: Condvar::new(),
            next: AtomicU64::new(0),
            stuck_after,
            max,
        }
    }

    /// Enters once nobody (but stuck holders) is in, waiting at most `wait`.
    pub(crate) fn enter(&self, wait: Duration) -> Option<Entered<'_>> {
        let started = Instant::now();
        let mut holders = self.holders.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let now = Instant::now();
            let active = holders
                .iter()
                .filter(|(_, t)| now.duration_since(*t) < self.stuck_after)
                .count();
            if active == 0 && holders.len() < self.max {
                let id = self.next.fetch_add(1, Ordering::Relaxed);
                holders.push((id, now));
                return Some(Entered { gate: self, id });
            }
            let left = wait.checked_sub(started.elapsed())?;
            // Woken when a holder leaves; else in time to see one turn stuck.
            let slice = left.min(self.stuck_after);
            holders = self
                .freed
                .wait_timeout(holders, slice)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        let mut holders = self
            .gate
            .holders
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        holders.retain(|(id, _)| *id != self.id);
        drop(holders);
        self.gate.freed.notify_all();
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
    fn a_gate_lets_one_in_and_moves_past_a_stuck_holder() {
        let gate = Gate::new(Duration::from_millis(300), 2);
        let first = gate.enter(Duration::ZERO).unwrap();
        // Busy: nobody else now, nor within a short wait.
        assert!(gate.enter(Duration::from_millis(50)).is_none());
        drop(first);
        let stuck = gate.enter(Duration::ZERO).unwrap();
        // Once the holder has been in past 300 ms it no longer keeps others out...
        let second = gate.enter(Duration::from_secs(2)).unwrap();
        // ...up to two holders in all.
        std::thread::sleep(Duration::from_millis(350));
        assert!(gate.enter(Duration::from_millis(400)).is_none());
        drop((stuck, second));
        assert!(gate.enter(Duration::ZERO).is_some());
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
