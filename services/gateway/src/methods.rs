//! Calls counted by method (`/package.Service/Method`), for `Gateway/Stats`, `/metrics` and the
//! dashboard. The set of methods is bounded: past [`MAX_METHODS`] distinct paths, further ones
//! are counted under [`OTHER`], so a caller making up method names cannot grow the gateway's
//! memory or the metrics' label sets.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::lock;

/// Distinct methods counted apart.
pub const MAX_METHODS: usize = 256;

/// Where methods past [`MAX_METHODS`] are counted.
pub const OTHER: &str = "other";

/// One method's totals.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MethodTotals {
    /// The pool its calls went to.
    pub pool: String,
    /// Calls finished.
    pub calls: u64,
    /// Calls that ended with a status other than OK.
    pub failures: u64,
    /// Messages from callers to instances.
    pub messages_in: u64,
    /// Messages from instances to callers.
    pub messages_out: u64,
    /// Time from a call's start to its end, summed over calls, microseconds.
    pub duration_us: u64,
}

impl MethodTotals {
    /// Counts `call` in.
    fn add(&mut self, call: Finished<'_>) {
        if self.pool.is_empty() {
            call.pool.clone_into(&mut self.pool);
        }
        self.calls += 1;
        self.failures += u64::from(call.failed);
        self.messages_in += call.messages_in;
        self.messages_out += call.messages_out;
        self.duration_us = self.duration_us.saturating_add(call.duration_us);
    }
}

/// Every method's totals.
#[derive(Debug, Default)]
pub struct MethodTable {
    methods: Mutex<BTreeMap<Arc<str>, MethodTotals>>,
}

/// One finished call, as counted.
#[derive(Debug, Clone, Copy)]
pub struct Finished<'a> {
    /// Its pool.
    pub pool: &'a str,
    /// It failed.
    pub failed: bool,
    /// Messages each way.
    pub messages_in: u64,
    /// Messages each way.
    pub messages_out: u64,
    /// How long it lasted, microseconds.
    pub duration_us: u64,
}

impl MethodTable {
    /// The key a path is counted under: itself while there is room, else [`OTHER`].
    pub fn key(&self, path: &str) -> Arc<str> {
        let methods = lock(&self.methods);
        if let Some((key, _)) = methods.get_key_value(path) {
            return Arc::clone(key);
        }
        if methods.len() < MAX_METHODS {
            Arc::from(path)
        } else {
            Arc::from(OTHER)
        }
    }

    /// Counts a finished call of `method` (a key from [`MethodTable::key`]).
    pub fn finished(&self, method: &Arc<str>, call: Finished<'_>) {
        let mut methods = lock(&self.methods);
        // Known methods (nearly every call) are found without touching the key's count,
        // which the runtimes' threads share.
        if let Some(totals) = methods.get_mut(method) {
            totals.add(call);
            return;
        }
        let key = if methods.len() < MAX_METHODS {
            Arc::clone(method)
        } else {
            Arc::from(OTHER)
        };
        methods.entry(key).or_default().add(call);
    }

    /// Every method's totals, by method.
    pub fn snapshot(&self) -> Vec<(String, MethodTotals)> {
        lock(&self.methods)
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_past_the_bound_are_counted_as_other() {
        let table = MethodTable::default();
        let call = Finished {
            pool: "default",
            failed: false,
            messages_in: 1,
            messages_out: 2,
            duration_us: 10,
        };
        for n in 0..MAX_METHODS + 5 {
            let key = table.key(&format!("/s.S/M{n}"));
            table.finished(&key, call);
        }
        let again = table.key("/s.S/M0");
        table.finished(
            &again,
            Finished {
                failed: true,
                ..call
            },
        );
        let snapshot = table.snapshot();
        assert_eq!(snapshot.len(), MAX_METHODS + 1);
        let other = snapshot.iter().find(|(k, _)| k == OTHER).unwrap();
        assert_eq!(other.1.calls, 5);
        let first = snapshot.iter().find(|(k, _)| k == "/s.S/M0").unwrap();
        assert_eq!(
            (first.1.calls, first.1.failures, first.1.messages_out),
            (2, 1, 4)
        );
    }
}
