//! The CPU pool: where heavy operations run, off the async runtime, with bounded concurrency.
//!
//! A job first takes an admission permit without waiting (`workers + queue` in all); when none is
//! left the call is refused at once with RESOURCE_EXHAUSTED rather than queued without bound.
//! It then waits for one of `workers` run permits and runs on tokio's blocking thread pool.
//! Both permits move into the job and are released only when the job really stops, so a cancelled
//! call cannot leave more work running than the bounds allow. Dropping the caller's future (the
//! client went away, or its deadline passed) cancels the job's token, and the job stops at its
//! next check.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Semaphore;

use crate::ops::{Cancel, Cancelled};

/// Default number of heavy jobs queued (waiting for a worker) before calls are refused.
pub const DEFAULT_QUEUE: usize = 32;

/// Why a job did not produce a value.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Every worker is busy and the queue is full.
    #[error("all {workers} CPU workers are busy and {queue} calls are queued")]
    Full {
        /// Configured workers.
        workers: usize,
        /// Configured queue length.
        queue: usize,
    },
    /// The job saw its cancellation token fire.
    #[error("cancelled")]
    Cancelled(#[from] Cancelled),
    /// The job panicked or the runtime is shutting down.
    #[error("CPU job failed")]
    Join(#[from] tokio::task::JoinError),
}

/// A bounded pool for CPU-heavy jobs. Cheap to clone.
#[derive(Debug, Clone)]
pub struct CpuPool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    workers: usize,
    queue: usize,
    admitted: Arc<Semaphore>,
    running: Arc<Semaphore>,
    rejected: AtomicU64,
    cancelled: Arc<AtomicU64>,
}

impl CpuPool {
    /// A pool running at most `workers` jobs at once with at most `queue` more waiting.
    pub fn new(workers: usize, queue: usize) -> Self {
        let workers = workers.max(1);
        Self {
            inner: Arc::new(Inner {
                workers,
                queue,
                admitted: Arc::new(Semaphore::new(workers + queue)),
                running: Arc::new(Semaphore::new(workers)),
                rejected: AtomicU64::new(0),
                cancelled: Arc::new(AtomicU64::new(0)),
            }),
        }
    }

    /// Runs `job` on a blocking thread once a worker is free.
    ///
    /// # Errors
    ///
    /// [`PoolError::Full`] at once when the pool and its queue are full; [`PoolError::Cancelled`]
    /// when the job gave up; [`PoolError::Join`] when it panicked.
    pub async fn run<T, F>(&self, job: F) -> Result<T, PoolError>
    where
        T: Send + 'static,
        F: FnOnce(&Cancel) -> Result<T, Cancelled> + Send + 'static,
    {
        let Ok(admission) = Arc::clone(&self.inner.admitted).try_acquire_owned() else {
            self.inner.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(PoolError::Full {
                workers: self.inner.workers,
                queue: self.inner.queue,
            });
        };
        let running = Arc::clone(&self.inner.running)
            .acquire_owned()
            .await
            // The semaphore is never closed; map it anyway instead of panicking.
            .map_err(|_| PoolError::Cancelled(Cancelled))?;
        let cancel = Cancel::new();
        let guard = cancel.clone().drop_guard();
        let cancelled = Arc::clone(&self.inner.cancelled);
        let handle = tokio::task::spawn_blocking(move || {
            let _permits = (admission, running);
            let result = job(&cancel);
            if result.is_err() {
                cancelled.fetch_add(1, Ordering::Relaxed);
            }
            result
        });
        let result = handle.await;
        guard.disarm();
        Ok(result??)
    }

    /// Jobs running right now.
    pub fn busy(&self) -> usize {
        self.inner.workers - self.inner.running.available_permits()
    }

    /// Jobs refused because the pool was full, since start.
    pub fn rejected(&self) -> u64 {
        self.inner.rejected.load(Ordering::Relaxed)
    }

    /// Jobs that stopped early because their caller went away, since start.
    pub fn cancelled(&self) -> u64 {
        self.inner.cancelled.load(Ordering::Relaxed)
    }

    /// The configured number of workers.
    pub fn workers(&self) -> usize {
        self.inner.workers
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn full_pool_refuses_at_once_and_recovers() {
        let pool = CpuPool::new(1, 1);
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = std::sync::Mutex::new(release_rx);
        let release_rx = Arc::new(release_rx);
        let blockers: Vec<_> = (0..2)
            .map(|_| {
                let pool = pool.clone();
                let rx = Arc::clone(&release_rx);
                tokio::spawn(async move {
                    pool.run(move |_| {
                        let _ = rx.lock().map(|r| r.recv());
                        Ok(())
                    })
                    .await
                })
            })
            .collect();
        // Wait until one job runs and one waits in the queue.
        while pool.inner.admitted.available_permits() > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let refused = pool.run(|_| Ok(())).await;
        assert!(matches!(
            refused,
            Err(PoolError::Full {
                workers: 1,
                queue: 1
            })
        ));
        assert_eq!(pool.rejected(), 1);
        release_tx.send(()).unwrap();
        release_tx.send(()).unwrap();
        for b in blockers {
            b.await.unwrap().unwrap();
        }
        assert!(pool.run(|_| Ok(())).await.is_ok());
    }

    #[tokio::test]
    async fn dropping_the_caller_cancels_the_job() {
        let pool = CpuPool::new(1, 0);
        let (saw_cancel_tx, saw_cancel_rx) = tokio::sync::oneshot::channel();
        let call = pool.run(move |cancel: &Cancel| {
            while !cancel.is_cancelled() {
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = saw_cancel_tx.send(());
            Err::<(), _>(Cancelled)
        });
        // Give up on the call after a short time, as an expired deadline would.
        assert!(
            tokio::time::timeout(Duration::from_millis(30), call)
                .await
                .is_err()
        );
        tokio::time::timeout(Duration::from_secs(5), saw_cancel_rx)
            .await
            .expect("the job saw its cancellation")
            .unwrap();
        // The worker is free again.
        tokio::time::timeout(Duration::from_secs(5), async {
            while pool.busy() > 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .unwrap();
        assert!(pool.run(|_| Ok(())).await.is_ok());
        assert_eq!(pool.cancelled(), 1);
    }
}
