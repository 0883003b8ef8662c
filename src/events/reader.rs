//! Reading the event log: the latest entries from the list, and a live tail from pub/sub.

use std::time::Duration;

use tokio_stream::{Stream, StreamExt};

use super::{DEFAULT_CHANNEL, DEFAULT_KEY, Event};

/// Bound on one read.
const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors of the reading side.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Redis refused or failed the command.
    #[error("reading the event log from Redis")]
    Redis(#[from] redis::RedisError),
    /// Redis did not answer in time.
    #[error("reading the event log from Redis timed out")]
    Timeout,
}

/// Reads the event log of one Redis.
#[derive(Debug, Clone)]
pub struct EventReader {
    client: redis::Client,
    key: String,
    channel: String,
}

impl EventReader {
    /// A reader of the default list and channel at `url`.
    ///
    /// # Errors
    ///
    /// [`ReadError::Redis`] when `url` is not a Redis URL.
    pub fn new(url: &str) -> Result<Self, ReadError> {
        Ok(Self {
            client: redis::Client::open(url)?,
            key: DEFAULT_KEY.to_owned(),
            channel: DEFAULT_CHANNEL.to_owned(),
        })
    }

    /// Reads another list and channel.
    pub fn with_names(mut self, key: &str, channel: &str) -> Self {
        key.clone_into(&mut self.key);
        channel.clone_into(&mut self.channel);
        self
    }

    /// The latest `n` events, newest first. Entries that are not dlb events are skipped.
    ///
    /// # Errors
    ///
    /// [`ReadError`] when Redis cannot be reached or does not answer in time.
    pub async fn recent(&self, n: usize) -> Result<Vec<Event>, ReadError> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let read = async {
            let mut connection = self.client.get_multiplexed_async_connection().await?;
            let entries: Vec<String> = redis::cmd("LRANGE")
                .arg(&self.key)
                .arg(0)
                .arg(n - 1)
                .query_async(&mut connection)
                .await?;
            Ok::<_, ReadError>(entries)
        };
        let entries = tokio::time::timeout(READ_TIMEOUT, read)
            .await
            .map_err(|_| ReadError::Timeout)??;
        Ok(entries
            .iter()
            .filter_map(|entry| serde_json::from_str(entry).ok())
            .collect())
    }

    /// Every event written from now on, as it is written. The stream ends when the connection
    /// to Redis is lost; call `recent` and `tail` again to resume.
    ///
    /// # Errors
    ///
    /// [`ReadError`] when Redis cannot be reached or refuses the subscription.
    pub async fn tail(&self) -> Result<impl Stream<Item = Event> + Send + 'static, ReadError> {
        let subscribe = async {
            let mut pubsub = self.client.get_async_pubsub().await?;
            pubsub.subscribe(&self.channel).await?;
            Ok::<_, ReadError>(pubsub)
        };
        let pubsub = tokio::time::timeout(READ_TIMEOUT, subscribe)
            .await
            .map_err(|_| ReadError::Timeout)??;
        Ok(pubsub.into_on_message().filter_map(|message| {
            let payload: String = message.get_payload().ok()?;
            serde_json::from_str(&payload).ok()
        }))
    }
}
