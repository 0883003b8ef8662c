//! The one background writer of an [`EventLog`](super::EventLog): batches off the queue, one
//! pipeline per batch, reconnection with backoff. A failed batch goes back to the queue.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use tokio_util::sync::CancellationToken;

use super::{EventLogConfig, Pending, Shared};

/// First wait after a failed connection attempt; it doubles up to the configured maximum.
const INITIAL_BACKOFF: Duration = Duration::from_millis(50);

/// Bound on establishing a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Bound on one pipeline round trip; a Redis that stops answering counts as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Bound on the last flush when the log stops.
const FINAL_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// Runs until `cancel` fires, then makes one bounded attempt to flush what is queued.
pub(super) async fn run(shared: Arc<Shared>, config: EventLogConfig, cancel: CancellationToken) {
    let Some(url) = config.redis_url.clone() else {
        return;
    };
    let client = match redis::Client::open(url.as_str()) {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%url, %error, "invalid Redis URL; the event log is off");
            return;
        }
    };
    let mut writer = Writer {
        shared,
        config,
        client,
        connection: None,
        backoff: INITIAL_BACKOFF,
        ever_connected: false,
    };
    writer.serve(&cancel).await;
    writer
        .flush_all(tokio::time::Instant::now() + FINAL_FLUSH_TIMEOUT)
        .await;
}

struct Writer {
    shared: Arc<Shared>,
    config: EventLogConfig,
    client: redis::Client,
    connection: Option<MultiplexedConnection>,
    backoff: Duration,
    ever_connected: bool,
}

impl Writer {
    async fn serve(&mut self, cancel: &CancellationToken) {
        loop {
            if self.shared.len() == 0 {
                tokio::select! {
                    () = self.shared.wake.notified() => {}
                    () = cancel.cancelled() => return,
                }
            }
            // Let a batch fill unless one is already full.
            if self.shared.len() < self.config.batch_max {
                tokio::select! {
                    () = tokio::time::sleep(self.config.flush_interval) => {}
                    () = cancel.cancelled() => return,
                }
            }
            while self.shared.len() > 0 {
                if !self.write_one_batch().await {
                    tokio::select! {
                        () = tokio::time::sleep(self.backoff) => {}
                        () = cancel.cancelled() => return,
                    }
                    self.backoff = (self.backoff * 2).min(self.config.max_backoff);
                    break;
                }
            }
        }
    }

    /// Writes until the queue is empty or `deadline` passes, retrying after failures (a stale
    /// connection is only found out by using it). A batch already sent is never cut short;
    /// what is still queued at the deadline is counted as dropped.
    async fn flush_all(&mut self, deadline: tokio::time::Instant) {
        while self.shared.len() > 0 && tokio::time::Instant::now() < deadline {
            if !self.write_one_batch().await {
                tokio::time::sleep(INITIAL_BACKOFF).await;
            }
        }
        let left = self.shared.take_batch(usize::MAX).len() as u64;
        if left > 0 {
            self.shared.dropped.fetch_add(left, Ordering::Relaxed);
            tracing::warn!(
                events = left,
                "event log stopped with events it could not write"
            );
        }
    }

    /// Connects if needed and writes one batch. False when Redis is unreachable (the batch, if
    /// any, is back in the queue).
    async fn write_one_batch(&mut self) -> bool {
        let Some(connection) = self.connect().await else {
            return false;
        };
        let batch = self.shared.take_batch(self.config.batch_max);
        if batch.is_empty() {
            return true;
        }
        let written = batch.len() as u64;
        match tokio::time::timeout(WRITE_TIMEOUT, self.send(connection, &batch)).await {
            Ok(Ok(())) => {
                self.shared.written.fetch_add(written, Ordering::Relaxed);
                true
            }
            outcome => {
                let error = match outcome {
                    Ok(Err(error)) => error.to_string(),
                    _ => "timed out".to_owned(),
                };
                tracing::warn!(%error, events = written, "event log write failed; will retry");
                self.shared.put_back(batch);
                self.lost_connection();
                false
            }
        }
    }

    async fn connect(&mut self) -> Option<MultiplexedConnection> {
        if let Some(connection) = &self.connection {
            return Some(connection.clone());
        }
        match tokio::time::timeout(
            CONNECT_TIMEOUT,
            self.client.get_multiplexed_async_connection(),
        )
        .await
        {
            Ok(Ok(connection)) => {
                if self.ever_connected {
                    self.shared.reconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::info!("event log reconnected to Redis");
                }
                self.ever_connected = true;
                self.backoff = INITIAL_BACKOFF;
                self.shared.connected.store(true, Ordering::Relaxed);
                self.connection = Some(connection.clone());
                Some(connection)
            }
            outcome => {
                if self.shared.connected.swap(false, Ordering::Relaxed) || !self.ever_connected {
                    let error = match outcome {
                        Ok(Err(error)) => error.to_string(),
                        _ => "timed out".to_owned(),
                    };
                    tracing::warn!(
                        %error,
                        "event log cannot reach Redis; events wait in memory (oldest dropped when full)"
                    );
                }
                None
            }
        }
    }

    fn lost_connection(&mut self) {
        self.connection = None;
        self.shared.connected.store(false, Ordering::Relaxed);
    }

    async fn send(
        &self,
        mut connection: MultiplexedConnection,
        batch: &[Pending],
    ) -> redis::RedisResult<()> {
        let payloads: Vec<String> = batch
            .iter()
            .filter_map(|pending| {
                let event = pending
                    .clone()
                    .into_event(&self.shared.service, &self.shared.instance);
                serde_json::to_string(&event).ok()
            })
            .collect();
        let mut pipe = redis::pipe();
        // LPUSH with several values pushes each to the head in turn: the newest ends first.
        pipe.cmd("LPUSH")
            .arg(&self.config.key)
            .arg(&payloads)
            .ignore()
            .cmd("LTRIM")
            .arg(&self.config.key)
            .arg(0)
            .arg(self.config.max_entries.saturating_sub(1))
            .ignore();
        for payload in &payloads {
            pipe.cmd("PUBLISH")
                .arg(&self.config.channel)
                .arg(payload)
                .ignore();
        }
        pipe.query_async::<()>(&mut connection).await
    }
}
