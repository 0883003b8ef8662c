//! Outlier detection: an instance whose health says SERVING but whose answers fail (a bad
//! deploy, a broken dependency) is taken out of the rotation for a while, as Envoy's outlier
//! detection, Linkerd's failure accrual and HAProxy's `observe layer7` do.
//!
//! Each endpoint's [`Detector`] sees the status of every call it answered. Failures are the
//! codes of [`OutlierSettings::codes`] (INTERNAL, UNKNOWN, DATA_LOSS and UNAVAILABLE by
//! default); OK is a success; anything else (the caller's own mistakes, cancels, deadlines) is
//! neither. An endpoint is ejected after [`OutlierSettings::consecutive`] failures in a row, or
//! when at least [`OutlierSettings::failure_percent`] of its calls over the window failed (with
//! at least [`OutlierSettings::min_volume`] calls). It stays out for the base time multiplied
//! by the times it was ejected (capped; the multiplier drops by one for each base time from
//! its return to its next ejection), then comes back on probation: its health must say SERVING, and its
//! first failure within a base time of its return ejects it again. The pool never has more
//! than [`OutlierSettings::max_ejected_percent`] of its instances ejected so (see
//! [`crate::endpoint::EndpointTable::answered`]): with 2 of 3 bad at 50%, one stays.

use std::time::{Duration, Instant};

use tonic::Code;

/// How outliers are found and ejected (`--outlier-*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierSettings {
    /// Failures in a row that eject (0: never by count).
    pub consecutive: u32,
    /// Failure percentage over the window that ejects (0: never by rate).
    pub failure_percent: u32,
    /// Calls the window must hold before its rate counts.
    pub min_volume: u32,
    /// How far back the failure rate looks.
    pub window: Duration,
    /// First ejection's length; the n-th lasts n times as long, up to `max_ejection`.
    pub base_ejection: Duration,
    /// Longest ejection.
    pub max_ejection: Duration,
    /// Most of a pool ejected at once, percent of its instances.
    pub max_ejected_percent: u32,
    /// The statuses that count as the instance's failure.
    pub codes: Vec<Code>,
}

impl Default for OutlierSettings {
    fn default() -> Self {
        Self {
            consecutive: 5,
            failure_percent: 50,
            min_volume: 20,
            window: Duration::from_secs(10),
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 50,
            codes: DEFAULT_CODES.to_vec(),
        }
    }
}

/// The statuses counted by default: the instance's own failures.
pub const DEFAULT_CODES: [Code; 4] = [
    Code::Internal,
    Code::Unknown,
    Code::DataLoss,
    Code::Unavailable,
];

/// The statuses `--outlier-codes` may name: the server-side ones. The caller's own mistakes
/// (INVALID_ARGUMENT, NOT_FOUND, an oversize message's RESOURCE_EXHAUSTED, ...) never count.
pub const COUNTABLE_CODES: [Code; 5] = [
    Code::Internal,
    Code::Unknown,
    Code::DataLoss,
    Code::Unavailable,
    Code::Aborted,
];

/// Parses `--outlier-codes`: comma-separated names such as `internal,unknown`.
///
/// # Errors
///
/// A message naming a code that is unknown or not the instance's own failure.
pub fn parse_codes(text: &str) -> Result<Vec<Code>, String> {
    let mut codes = Vec::new();
    for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let wanted = name.replace('-', "_").to_ascii_uppercase();
        let Some(code) = COUNTABLE_CODES
            .into_iter()
            .find(|c| dlb::status::code_name(*c) == wanted)
        else {
            let allowed: Vec<String> = COUNTABLE_CODES
                .iter()
                // As `--help` and the docs write them: `data-loss`.
                .map(|c| {
                    dlb::status::code_name(*c)
                        .to_ascii_lowercase()
                        .replace('_', "-")
                })
                .collect();
            return Err(format!(
                "--outlier-codes: {name:?} is not one of {} (the caller's own errors never count)",
                allowed.join(", ")
            ));
        };
        if !codes.contains(&code) {
            codes.push(code);
        }
    }
    Ok(codes)
}

/// Bad input is the caller's mistake, not the instance's: not counted against it. So is a
/// method or an encoding the instance does not have (UNIMPLEMENTED), a deadline or a cancel
/// the caller chose, and a refusal for load (RESOURCE_EXHAUSTED).
pub fn callers_fault(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::Unimplemented
            | Code::NotFound
            | Code::OutOfRange
            | Code::FailedPrecondition
            | Code::AlreadyExists
            | Code::ResourceExhausted
            | Code::DeadlineExceeded
            | Code::Cancelled
    )
}

impl OutlierSettings {
    /// Whether `code` is the instance's failure.
    pub fn counts(&self, code: Code) -> bool {
        self.codes.contains(&code)
    }

    /// Whether the pool may have `ejected + 1` of its `members` ejected.
    pub fn may_eject(&self, ejected: usize, members: usize) -> bool {
        (ejected + 1) * 100 <= self.max_ejected_percent as usize * members
    }

    /// Checks the settings.
    ///
    /// # Errors
    ///
    /// A message naming the bad flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.failure_percent > 100 {
            return Err("--outlier-failure-percent is at most 100".to_owned());
        }
        if self.max_ejected_percent > 100 {
            return Err("--outlier-max-ejected-percent is at most 100".to_owned());
        }
        if self.window.is_zero() || self.base_ejection.is_zero() {
            return Err(
                "--outlier-window-ms and --outlier-ejection-ms must be at least 1".to_owned(),
            );
        }
        if self.max_ejection < self.base_ejection {
            return Err(
                "--outlier-max-ejection-ms must be at least --outlier-ejection-ms".to_owned(),
            );
        }
        Ok(())
    }
}

/// An ejection in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ejection {
    /// Why, for people: "5 x INTERNAL in a row".
    pub reason: String,
    /// When it ends.
    pub until: Instant,
    /// When it ends, ms since the Unix epoch.
    pub back_at_ms: u64,
    /// How long it lasts.
    pub length: Duration,
}

/// Calls counted over half a window.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    start: Instant,
    ok: u32,
    failed: u32,
}

/// One endpoint's answers and ejections.
#[derive(Debug)]
pub struct Detector {
    consecutive: u32,
    /// The current half window and the one before.
    current: Bucket,
    previous: Bucket,
    ejection: Option<Ejection>,
    /// The multiplier of the next ejection, less one (decays while back in).
    times: u32,
    /// When it last came back from an ejection.
    back_since: Option<Instant>,
    /// Ejections so far.
    total: u64,
}

impl Detector {
    /// A detector with nothing seen, as of `now`.
    pub fn new(now: Instant) -> Self {
        let empty = Bucket {
            start: now,
            ok: 0,
            failed: 0,
        };
        Self {
            consecutive: 0,
            current: empty,
            previous: empty,
            ejection: None,
            times: 0,
            back_since: None,
            total: 0,
        }
    }

    /// The ejection in force, if any.
    pub fn ejection(&self) -> Option<&Ejection> {
        self.ejection.as_ref()
    }

    /// Ejections so far.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Goes on counting ejections from `total` (the same instance, joining again).
    pub fn carry_total(&mut self, total: u64) {
        self.total = total;
    }

    /// Moves the buckets on to `now`.
    fn roll(&mut self, now: Instant, window: Duration) {
        let half = window / 2;
        let age = now.saturating_duration_since(self.current.start);
        if age < half {
            return;
        }
        let fresh = |start| Bucket {
            start,
            ok: 0,
            failed: 0,
        };
        if age < 2 * half {
            self.previous = self.current;
            self.current = fresh(self.current.start + half);
        } else {
            self.previous = fresh(now);
            self.current = fresh(now);
        }
    }

    /// Counts an answer with `code`; says why it should be ejected, if it should. Answers
    /// while ejected (calls sent before) are not counted.
    pub fn observe(
        &mut self,
        code: Code,
        now: Instant,
        settings: &OutlierSettings,
    ) -> Option<String> {
        if self.ejection.is_some() {
            return None;
        }
        self.roll(now, settings.window);
        if code == Code::Ok {
            self.consecutive = 0;
            self.current.ok += 1;
            return None;
        }
        if !settings.counts(code) {
            return None;
        }
        self.consecutive += 1;
        self.current.failed += 1;
        let name = dlb::status::code_name(code);
        if let Some(back) = self.back_since
            && now.saturating_duration_since(back) < settings.base_ejection
        {
            return Some(format!(
                "{name} on probation, after {} ejection(s)",
                self.times
            ));
        }
        if settings.consecutive > 0 && self.consecutive >= settings.consecutive {
            return Some(format!("{} x {name} in a row", self.consecutive));
        }
        let failed = self.current.failed + self.previous.failed;
        let total = failed + self.current.ok + self.previous.ok;
        if settings.failure_percent > 0
            && total >= settings.min_volume.max(1)
            && u64::from(failed) * 100 >= u64::from(settings.failure_percent) * u64::from(total)
        {
            return Some(format!(
                "{}% of {total} calls failed within {} s (last: {name})",
                u64::from(failed) * 100 / u64::from(total),
                settings.window.as_secs_f64()
            ));
        }
        None
    }

    /// Ejects it now, for the base time times its multiplier; returns the ejection.
    pub fn eject(&mut self, reason: String, now: Instant, settings: &OutlierSettings) -> &Ejection {
        if let Some(back) = self.back_since {
            // One step down for each base time it has been back in since its last ejection.
            let clean = now.saturating_duration_since(back).as_nanos()
                / settings.base_ejection.as_nanos().max(1);
            self.times = self
                .times
                .saturating_sub(u32::try_from(clean).unwrap_or(u32::MAX));
        }
        self.times = self.times.saturating_add(1);
        let length = settings
            .base_ejection
            .saturating_mul(self.times)
            .min(settings.max_ejection);
        self.consecutive = 0;
        self.current = Bucket {
            start: now,
            ok: 0,
            failed: 0,
        };
        self.previous = self.current;
        self.total += 1;
        let back_at_ms =
            dlb::events::time::now_ms() + u64::try_from(length.as_millis()).unwrap_or(u64::MAX);
        self.ejection.insert(Ejection {
            reason,
            until: now + length,
            back_at_ms,
            length,
        })
    }

    /// The share of the answers in its window that failed, 0 to 1 (0 with none).
    pub fn failure_ratio(&self) -> f64 {
        let failed = self.current.failed + self.previous.failed;
        let total = failed + self.current.ok + self.previous.ok;
        if total == 0 {
            0.0
        } else {
            f64::from(failed) / f64::from(total)
        }
    }

    /// Ends the ejection if its time has come (it is then on probation); says whether it did.
    pub fn end_if_due(&mut self, now: Instant) -> bool {
        match &self.ejection {
            Some(ejection) if ejection.until <= now => {
                self.ejection = None;
                self.back_since = Some(now);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> OutlierSettings {
        OutlierSettings {
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(25),
            ..OutlierSettings::default()
        }
    }

    #[test]
    fn failures_in_a_row_eject_and_a_success_between_resets_the_count() {
        let s = settings();
        let t = Instant::now();
        let mut d = Detector::new(t);
        for _ in 0..4 {
            assert_eq!(d.observe(Code::Internal, t, &s), None);
        }
        assert_eq!(d.observe(Code::Ok, t, &s), None);
        for _ in 0..4 {
            assert_eq!(d.observe(Code::Unknown, t, &s), None);
        }
        assert_eq!(
            d.observe(Code::Unknown, t, &s).as_deref(),
            Some("5 x UNKNOWN in a row")
        );
    }

    #[test]
    fn the_callers_own_errors_never_count() {
        let s = settings();
        let t = Instant::now();
        let mut d = Detector::new(t);
        for code in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::ResourceExhausted,
            Code::Cancelled,
            Code::DeadlineExceeded,
            Code::Unimplemented,
        ] {
            for _ in 0..100 {
                assert_eq!(d.observe(code, t, &s), None, "{code:?}");
            }
        }
    }

    #[test]
    fn a_failure_rate_ejects_once_the_window_holds_enough_calls() {
        let s = settings();
        let t = Instant::now();
        let mut d = Detector::new(t);
        // Alternating: never 5 in a row, but half of all calls fail.
        let mut verdicts = Vec::new();
        for i in 0..20 {
            let code = if i % 2 == 0 { Code::Ok } else { Code::Internal };
            verdicts.push(d.observe(code, t, &s));
        }
        assert!(verdicts[..19].iter().all(Option::is_none));
        assert_eq!(
            verdicts[19].as_deref(),
            Some("50% of 20 calls failed within 10 s (last: INTERNAL)")
        );
        // Over a window later, the old calls no longer count.
        let mut d = Detector::new(t);
        for _ in 0..4 {
            d.observe(Code::Internal, t, &s);
        }
        let later = t + Duration::from_secs(11);
        for _ in 0..15 {
            d.observe(Code::Ok, later, &s);
        }
        assert_eq!(d.observe(Code::Internal, later, &s), None);
    }

    #[test]
    fn ejections_grow_to_the_cap_then_shrink_while_clean() {
        let s = settings();
        let t = Instant::now();
        let mut d = Detector::new(t);
        assert_eq!(d.eject("x".into(), t, &s).length, Duration::from_secs(10));
        assert!(!d.end_if_due(t + Duration::from_secs(9)));
        assert_eq!(
            d.observe(Code::Internal, t, &s),
            None,
            "not counted while out"
        );
        let back = t + Duration::from_secs(10);
        assert!(d.end_if_due(back));
        // On probation: the first failure ejects again, for twice as long.
        let reason = d.observe(Code::Internal, back, &s).unwrap();
        assert_eq!(reason, "INTERNAL on probation, after 1 ejection(s)");
        assert_eq!(d.eject(reason, back, &s).length, Duration::from_secs(20));
        let back = back + Duration::from_secs(20);
        assert!(d.end_if_due(back));
        assert_eq!(
            d.eject("x".into(), back, &s).length,
            Duration::from_secs(25),
            "capped"
        );
        let back = back + Duration::from_secs(25);
        assert!(d.end_if_due(back));
        // Clean for two base times: two steps down (3 -> 1), so the next lasts 2 x base.
        let later = back + Duration::from_secs(21);
        assert_eq!(
            d.observe(Code::Internal, later, &s),
            None,
            "probation is over"
        );
        assert_eq!(
            d.eject("x".into(), later, &s).length,
            Duration::from_secs(20)
        );
        assert_eq!(d.total(), 4);
    }

    #[test]
    fn the_cap_leaves_the_rest_of_the_pool_in() {
        let s = settings();
        // 50%: one of 3, two of 4, never the last one.
        assert!(s.may_eject(0, 3));
        assert!(!s.may_eject(1, 3));
        assert!(s.may_eject(1, 4));
        assert!(!s.may_eject(2, 4));
        assert!(!s.may_eject(0, 1));
    }

    #[test]
    fn codes_parse_with_clear_errors() {
        assert_eq!(
            parse_codes("internal, data-loss,INTERNAL"),
            Ok(vec![Code::Internal, Code::DataLoss])
        );
        let error = parse_codes("internal,invalid_argument").unwrap_err();
        assert!(
            error.contains("\"invalid_argument\" is not one of internal"),
            "{error}"
        );
        // The list is written as the flag's own default writes it.
        assert!(error.contains("data-loss"), "{error}");
    }
}
