//! A runtime per thread. With `--threads N` above 1 the gateway runs N current-thread tokio
//! runtimes, one per thread, rather than one runtime whose N workers share every task: the
//! first (the main thread's) also runs all that is not a call (membership, health monitors,
//! stats, events) and accepts the callers' connections, handing them out in turn; each runtime
//! serves the connections it was given and relays their calls over HTTP/2 connections of its
//! own to every instance ([`crate::conn::Conn`] keeps one per runtime). So a call is read,
//! relayed and answered on one thread, with no wake-up of another thread and no connection
//! state moving between cores; what the runtimes share (balancer, endpoint stats, counters) is
//! behind locks and atomics as before.

use std::cell::Cell;

thread_local! {
    /// Which runtime this thread runs: 0 for the main one (and for any thread not started
    /// here, tests' runtimes included).
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The index of the runtime on this thread (see [`Workers`]).
pub fn current() -> usize {
    INDEX.with(Cell::get)
}

/// The runtimes besides the main one, each on a thread of its own, idle until given work.
#[derive(Debug)]
pub struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    /// Starts `count` runtimes, numbered 1 to `count`, on threads named `dlb-gateway-N`.
    ///
    /// # Errors
    ///
    /// A runtime or thread that could not be started.
    pub fn start(count: usize) -> std::io::Result<Self> {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut workers = Self {
            handles: Vec::with_capacity(count),
            stop: Some(stop),
            threads: Vec::with_capacity(count),
        };
        for index in 1..=count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            workers.handles.push(runtime.handle().clone());
            let mut stopped = stopped.clone();
            let thread = std::thread::Builder::new()
                .name(format!("dlb-gateway-{index}"))
                .spawn(move || {
                    INDEX.with(|i| i.set(index));
                    runtime.block_on(async move {
                        let _ = stopped.wait_for(|stop| *stop).await;
                    });
                })?;
            workers.threads.push(thread);
        }
        Ok(workers)
    }

    /// Their handles, to spawn on.
    pub fn handles(&self) -> Vec<tokio::runtime::Handle> {
        self.handles.clone()
    }

    /// How many runtimes there are, the main one included.
    pub fn runtimes(&self) -> usize {
        self.handles.len() + 1
    }
}

impl Drop for Workers {
    /// Stops the runtimes (their tasks are dropped) and waits for their threads.
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
