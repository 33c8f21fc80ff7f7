//! Thresholds, wait-reason classes and the growth test.

use std::{collections::VecDeque, time::Duration};

/// What counts as blocked, spinning and leaking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Thresholds {
    /// A task (goroutine, tokio task) waiting this long is blocked (and a stuck candidate).
    pub block: Duration,
    /// A task running (or polled over and over) this long without waiting is spinning.
    pub spin: Duration,
    /// A tokio poll running this long in one blocking call blocks its worker.
    pub poll_block: Duration,
    /// Growth of a blocked group is judged over this window.
    pub leak_window: Duration,
    /// Net growth over the window that makes a leak.
    pub leak_min_growth: u64,
    /// How often snapshots are taken (a spinning goroutine is rescheduled far more often).
    pub scan_interval: Duration,
    /// Least time between two updates (count, age, growth) of one firing alert.
    pub update_interval: Duration,
}

impl Default for Thresholds {
    /// Production defaults: minutes, so that slow requests and batch jobs stay quiet.
    fn default() -> Self {
        Self {
            block: Duration::from_secs(5 * 60),
            spin: Duration::from_secs(2 * 60),
            poll_block: Duration::from_millis(500),
            leak_window: Duration::from_secs(10 * 60),
            leak_min_growth: 3,
            scan_interval: Duration::from_secs(15),
            update_interval: Duration::from_secs(60),
        }
    }
}

impl Thresholds {
    /// Seconds instead of minutes, for the detectors' unit tests.
    #[cfg(test)]
    pub(crate) fn for_tests() -> Self {
        Self {
            block: Duration::from_secs(2),
            spin: Duration::from_secs(3),
            poll_block: Duration::from_millis(500),
            leak_window: Duration::from_secs(6),
            leak_min_growth: 3,
            scan_interval: Duration::from_secs(1),
            update_interval: Duration::from_secs(5),
        }
    }
}

/// Nanoseconds, as the probes' clock counts: the one conversion of a duration.
pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// How a wait reason reads when the wait lasts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WaitClass {
    /// Waiting for work, input or other tasks (a channel, the network, a timer, a wake):
    /// fine however long, a leak when proven or when the group only grows.
    Idle,
    /// Waiting on a lock, or on what nothing can ever wake: stuck when it lasts.
    Stuck,
    /// The runtime's own bookkeeping tasks: never reported.
    Runtime,
}

/// Count of a group at successive scans, trimmed to what the growth test needs.
#[derive(Clone, Debug, Default)]
pub(crate) struct History {
    samples: VecDeque<(u64, u64)>,
}

impl History {
    pub(crate) fn push(&mut self, now_ns: u64, count: u64, window: Duration) {
        self.samples.push_back((now_ns, count));
        // Keep one sample at or before the window's start so `at` has an answer there.
        let start = now_ns.saturating_sub(nanos(window));
        while self.samples.len() > 1 && self.samples[1].0 <= start {
            self.samples.pop_front();
        }
    }

    /// Count at the last sample taken at or before `t_ns`.
    fn at(&self, t_ns: u64) -> Option<u64> {
        self.samples
            .iter()
            .take_while(|(t, _)| *t <= t_ns)
            .last()
            .map(|(_, c)| *c)
    }

    pub(crate) fn is_idle(&self) -> bool {
        self.samples.iter().all(|(_, c)| *c == 0)
    }

    /// Net growth over the window ending at `now_ns`, when the history covers the window.
    pub(crate) fn growth(&self, now_ns: u64, window: Duration) -> Option<i128> {
        let start = self.at(now_ns.saturating_sub(nanos(window)))?;
        let now = self.samples.back()?.1;
        Some(i128::from(now) - i128::from(start))
    }

    /// Growing: net growth of at least `min_growth` over the window, spread over at least two
    /// of its thirds, so a one-off burst (a pool filling up at start) is not a leak.
    pub(crate) fn keeps_growing(&self, now_ns: u64, window: Duration, min_growth: u64) -> bool {
        let w = nanos(window);
        let points: Option<Vec<u64>> = (0..=3)
            .map(|i| self.at(now_ns.saturating_sub(w - (u128::from(w) * i / 3) as u64)))
            .collect();
        let Some(points) = points else {
            return false;
        };
        let rising_thirds = points.windows(2).filter(|p| p[1] > p[0]).count();
        points[3] >= points[0] + min_growth && rising_thirds >= 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn history(points: &[(u64, u64)], window: Duration) -> History {
        let mut h = History::default();
        for (t, c) in points {
            h.push(t * S, *c, window);
        }
        h
    }

    #[test]
    fn steady_growth_is_a_leak() {
        let w = Duration::from_secs(9);
        let h = history(&(0..=10).map(|t| (t, t * 2)).collect::<Vec<_>>(), w);
        assert!(h.keeps_growing(10 * S, w, 3));
        assert_eq!(h.growth(10 * S, w), Some(18));
    }

    #[test]
    fn a_burst_is_not_a_leak() {
        let w = Duration::from_secs(9);
        let points: Vec<_> = (0..=10)
            .map(|t| (t, if t >= 5 { 100 } else { 0 }))
            .collect();
        assert!(!history(&points, w).keeps_growing(10 * S, w, 3));
    }

    #[test]
    fn flat_group_is_not_a_leak() {
        let w = Duration::from_secs(9);
        let points: Vec<_> = (0..=10).map(|t| (t, 8)).collect();
        let h = history(&points, w);
        assert!(!h.keeps_growing(10 * S, w, 3));
        assert_eq!(h.growth(10 * S, w), Some(0));
    }

    #[test]
    fn too_little_history_is_not_judged() {
        let w = Duration::from_secs(9);
        let h = history(&[(5, 1), (6, 5), (7, 9), (8, 20)], w);
        assert!(!h.keeps_growing(8 * S, w, 3));
        assert_eq!(h.growth(8 * S, w), None);
    }

    #[test]
    fn slow_growth_below_minimum_is_not_a_leak() {
        let w = Duration::from_secs(9);
        let points: Vec<_> = (0..=10).map(|t| (t, 10 + t / 5)).collect();
        assert!(!history(&points, w).keeps_growing(10 * S, w, 3));
    }
}
