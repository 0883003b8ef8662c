//! Hedging for the five operations (all pure): a call not answered within the hedge delay is
//! sent a second time to another instance, within the retry budget; the first useful answer
//! wins and the other copy is dropped, which cancels it at its instance (RST_STREAM), where
//! its work stops. The delay is fixed (`--hedge-after MS`) or follows the operation's recent
//! p95 (`--hedge-after auto`), so about one call in twenty is hedged when all is well.

use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::lock;

/// `--hedge-after`: when a call gets a second copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hedge {
    /// Never.
    Off,
    /// After this long without an answer.
    After(Duration),
    /// After the operation's recent p95 (see [`RecentLatency`]).
    Auto,
}

impl FromStr for Hedge {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "off" => Ok(Hedge::Off),
            "auto" => Ok(Hedge::Auto),
            ms => match ms.parse::<u64>() {
                Ok(0) | Err(_) => Err(format!(
                    "{ms:?} is not off, auto or a number of milliseconds (at least 1)"
                )),
                Ok(ms) => Ok(Hedge::After(Duration::from_millis(ms))),
            },
        }
    }
}

/// How long one window of [`RecentLatency`] lasts.
const WINDOW: Duration = Duration::from_secs(5);

/// Answers a window must hold before its p95 is used.
const MIN_SAMPLES: u64 = 20;

/// The shortest adaptive delay: below it a hedge costs more than it saves.
const MIN_DELAY: Duration = Duration::from_millis(1);

/// One operation's latencies over the current window, and the p95 of the last full one.
#[derive(Debug)]
pub struct RecentLatency {
    inner: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    histogram: Histogram<u64>,
    started: Instant,
    /// The p95 of the last window with enough answers.
    p95: Option<Duration>,
}

impl Default for RecentLatency {
    #[allow(clippy::expect_used)]
    fn default() -> Self {
        Self {
            inner: Mutex::new(Window {
                // Constant, valid bounds: 1 us to 10 min at 2 significant digits.
                histogram: Histogram::new_with_bounds(1, 600_000_000, 2)
                    .expect("valid histogram bounds"),
                started: Instant::now(),
                p95: None,
            }),
        }
    }
}

impl RecentLatency {
    /// Counts an answer that took `latency`, at `now`.
    pub fn record(&self, latency: Duration, now: Instant) {
        let mut window = lock(&self.inner);
        if now.saturating_duration_since(window.started) >= WINDOW {
            if window.histogram.len() >= MIN_SAMPLES {
                let p95 = window.histogram.value_at_quantile(0.95);
                window.p95 = Some(Duration::from_micros(p95).max(MIN_DELAY));
            }
            window.histogram.reset();
            window.started = now;
        }
        let us = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        window.histogram.saturating_record(us);
    }

    /// The p95 of the last full window, if one had enough answers.
    pub fn p95(&self) -> Option<Duration> {
        lock(&self.inner).p95
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_parses_with_clear_errors() {
        assert_eq!("off".parse(), Ok(Hedge::Off));
        assert_eq!("auto".parse(), Ok(Hedge::Auto));
        assert_eq!("25".parse(), Ok(Hedge::After(Duration::from_millis(25))));
        assert!("0".parse::<Hedge>().unwrap_err().contains("at least 1"));
        assert!("soon".parse::<Hedge>().is_err());
    }

    #[test]
    fn the_delay_is_the_last_full_windows_p95() {
        let recent = RecentLatency::default();
        let t = Instant::now();
        for i in 1..=100 {
            recent.record(Duration::from_millis(i), t);
        }
        assert_eq!(recent.p95(), None, "no full window yet");
        recent.record(Duration::from_millis(1), t + WINDOW);
        let p95 = recent.p95().unwrap();
        assert!(
            (Duration::from_millis(94)..=Duration::from_millis(96)).contains(&p95),
            "{p95:?}"
        );
        // A window with too few answers keeps the last p95.
        recent.record(Duration::from_millis(1), t + 2 * WINDOW);
        assert_eq!(recent.p95(), Some(p95));
    }
}
