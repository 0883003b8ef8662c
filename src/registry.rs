//! The instance registry in Redis: how compute instances on many hosts announce themselves, and
//! how any number of gateways follow them.
//!
//! Each registered instance owns one key, `dlb:registry:instance:{id}`, holding its [`Entry`] as
//! JSON, with a short TTL that its heartbeat keeps renewing: an instance that dies without a word
//! (SIGKILL, power loss, a cut link) drops out when the TTL runs out. The ids are also kept in the
//! set `dlb:registry:ids`, so a reader never scans the keyspace. Every registration and
//! withdrawal is published on the channel `dlb:registry:changes`, so watchers react at once;
//! they also re-read the registry every second, which catches expiries (Redis publishes nothing
//! for those unless keyspace notifications are on, and a shared Redis is not ours to
//! reconfigure). Claims, refreshes, withdrawals and reads are Lua scripts, each atomic.
//!
//! One id, one owner: a claim on an id held by an instance at another address is refused with
//! [`RegistryError::Duplicate`]. A claim from the same address takes over (the old holder cannot
//! be listening there any more: the new one is), so a restarted instance is back at once.
//! Needs a single Redis (not Redis Cluster): the scripts touch keys derived from the id set.

use std::collections::BTreeMap;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

/// Prefix of each instance's key.
pub const KEY_PREFIX: &str = "dlb:registry:instance:";

/// The set of registered ids.
pub const IDS_KEY: &str = "dlb:registry:ids";

/// Where registrations and withdrawals are announced.
pub const CHANNEL: &str = "dlb:registry:changes";

/// Default lifetime of a registration without a heartbeat.
pub const DEFAULT_TTL: Duration = Duration::from_secs(5);

/// Watchers re-read the registry at least this often (catches expired entries).
pub const RESYNC: Duration = Duration::from_secs(1);

/// Bound on every Redis round trip.
const TIMEOUT: Duration = Duration::from_secs(1);

/// Longest pause between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// One registered instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Instance id (the balancer's key and `x-served-by`).
    pub id: String,
    /// HOST:PORT where gateways reach it.
    pub address: String,
    /// Its dlb version.
    pub version: String,
    /// When it started, in Unix milliseconds.
    pub started_at_ms: u64,
    /// Which process holds the registration (pid and start time): tells a refresh of our own
    /// entry from somebody else's.
    pub token: String,
}

impl Entry {
    /// The entry for this process.
    pub fn for_this_process(id: &str, address: &str) -> Self {
        let started_at_ms = crate::events::time::now_ms();
        Self {
            id: id.to_owned(),
            address: address.to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at_ms,
            token: format!("{}-{started_at_ms}", std::process::id()),
        }
    }

    fn to_json(&self) -> String {
        // A struct of strings and integers always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Why the registry said no.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The id belongs to an instance at another address.
    #[error(
        "instance id {id:?} is already registered by {address} (version {version}, started at {started}); give each instance its own --id"
    )]
    Duplicate {
        /// The id.
        id: String,
        /// Where its holder is.
        address: String,
        /// The holder's version.
        version: String,
        /// When the holder started (UTC).
        started: String,
    },
    /// Redis did not answer, or answered with an error.
    #[error("registry at {url}: {message}")]
    Redis {
        /// Where (password redacted).
        url: String,
        /// What went wrong.
        message: String,
    },
}

/// What a successful claim did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimed {
    /// The entry is new (or replaced a dead holder at our address): announced.
    New,
    /// Our own entry was renewed.
    Renewed,
}

/// Claim or renew: KEYS = [key, ids], ARGV = [value, ttl ms, address, id, channel, message].
/// Returns 1 (new), 2 (renewed) or the holder's value (refused).
const CLAIM: &str = r"
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then
  local ok, holder = pcall(cjson.decode, current)
  if not ok or holder['address'] ~= ARGV[3] then
    return current
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[4])
if current == ARGV[1] then
  return 2
end
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 1
";

/// Withdraw if ours: KEYS = [key, ids], ARGV = [value, id, channel, message]. Returns 1 or 0.
const WITHDRAW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], ARGV[2])
  redis.call('PUBLISH', ARGV[3], ARGV[4])
  return 1
end
return 0
";

/// Every live entry, forgetting ids whose key expired: KEYS = [ids], ARGV = [prefix].
const SNAPSHOT: &str = r"
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local value = redis.call('GET', ARGV[1] .. id)
  if value then
    table.insert(out, value)
  else
    redis.call('SREM', KEYS[1], id)
  end
end
return out
";

/// A handle on the registry. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Registry {
    client: redis::Client,
    url: String,
}

impl Registry {
    /// A registry at `url` (no I/O yet).
    ///
    /// # Errors
    ///
    /// A message when the URL is not a Redis URL.
    pub fn open(url: &str) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| {
            format!(
                "{:?} is not a valid Redis URL: {e}",
                crate::events::redact_url(url)
            )
        })?;
        Ok(Self {
            client,
            url: crate::events::redact_url(url),
        })
    }

    fn error(&self, message: impl std::fmt::Display) -> RegistryError {
        RegistryError::Redis {
            url: self.url.clone(),
            message: message.to_string(),
        }
    }

    async fn connection(&self) -> Result<MultiplexedConnection, RegistryError> {
        match tokio::time::timeout(TIMEOUT, self.client.get_multiplexed_async_connection()).await {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(error)) => Err(self.error(error)),
            Err(_) => Err(self.error(format!("no connection within {TIMEOUT:?}"))),
        }
    }

    async fn eval<T: redis::FromRedisValue>(
        &self,
        connection: &mut MultiplexedConnection,
        script: &str,
        keys: &[&str],
        args: &[&str],
    ) -> Result<T, RegistryError> {
        let mut command = redis::cmd("EVAL");
        command.arg(script).arg(keys.len()).arg(keys).arg(args);
        match tokio::time::timeout(TIMEOUT, command.query_async(connection)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(self.error(error)),
            Err(_) => Err(self.error(format!("no answer within {TIMEOUT:?}"))),
        }
    }

    /// Registers `entry` for `ttl`, or renews it.
    ///
    /// # Errors
    ///
    /// [`RegistryError::Duplicate`] when another instance holds the id;
    /// [`RegistryError::Redis`] when Redis does not answer.
    pub async fn claim(&self, entry: &Entry, ttl: Duration) -> Result<Claimed, RegistryError> {
        let mut connection = self.connection().await?;
        self.claim_on(&mut connection, entry, ttl).await
    }

    async fn claim_on(
        &self,
        connection: &mut MultiplexedConnection,
        entry: &Entry,
        ttl: Duration,
    ) -> Result<Claimed, RegistryError> {
        let key = format!("{KEY_PREFIX}{}", entry.id);
        let value = entry.to_json();
        let ttl_ms = ttl.as_millis().max(1).to_string();
        let message = format!("up {}", entry.id);
        let answer: redis::Value = self
            .eval(
                connection,
                CLAIM,
                &[&key, IDS_KEY],
                &[
                    &value,
                    &ttl_ms,
                    &entry.address,
                    &entry.id,
                    CHANNEL,
                    &message,
                ],
            )
            .await?;
        match answer {
            redis::Value::Int(1) => Ok(Claimed::New),
            redis::Value::Int(_) => Ok(Claimed::Renewed),
            other => {
                let held: String = redis::from_redis_value(other).map_err(|e| self.error(e))?;
                let holder: Option<Entry> = serde_json::from_str(&held).ok();
                Err(RegistryError::Duplicate {
                    id: entry.id.clone(),
                    address: holder
                        .as_ref()
                        .map_or_else(|| "an unreadable entry".to_owned(), |h| h.address.clone()),
                    version: holder
                        .as_ref()
                        .map_or_else(|| "?".to_owned(), |h| h.version.clone()),
                    started: holder.map_or_else(
                        || "?".to_owned(),
                        |h| crate::events::time::rfc3339_ms(h.started_at_ms),
                    ),
                })
            }
        }
    }

    /// Removes `entry` if it is still ours, and announces it.
    ///
    /// # Errors
    ///
    /// [`RegistryError::Redis`] when Redis does not answer.
    pub async fn withdraw(&self, entry: &Entry) -> Result<bool, RegistryError> {
        let mut connection = self.connection().await?;
        let key = format!("{KEY_PREFIX}{}", entry.id);
        let message = format!("down {}", entry.id);
        let removed: i64 = self
            .eval(
                &mut connection,
                WITHDRAW,
                &[&key, IDS_KEY],
                &[&entry.to_json(), &entry.id, CHANNEL, &message],
            )
            .await?;
        Ok(removed == 1)
    }

    /// Every live entry, by id. Unreadable entries are logged and left out.
    ///
    /// # Errors
    ///
    /// [`RegistryError::Redis`] when Redis does not answer.
    pub async fn snapshot(&self) -> Result<BTreeMap<String, Entry>, RegistryError> {
        let mut connection = self.connection().await?;
        self.snapshot_on(&mut connection).await
    }

    async fn snapshot_on(
        &self,
        connection: &mut MultiplexedConnection,
    ) -> Result<BTreeMap<String, Entry>, RegistryError> {
        let values: Vec<String> = self
            .eval(connection, SNAPSHOT, &[IDS_KEY], &[KEY_PREFIX])
            .await?;
        let mut entries = BTreeMap::new();
        for value in values {
            match serde_json::from_str::<Entry>(&value) {
                Ok(entry) if crate::metadata::validate_instance_id(&entry.id).is_ok() => {
                    entries.insert(entry.id.clone(), entry);
                }
                _ => {
                    tracing::warn!(value = %crate::events::preview(&value), "unreadable registry entry; ignored")
                }
            }
        }
        Ok(entries)
    }

    /// Registers `entry` at once and keeps it registered until `cancel`, then withdraws it.
    /// Renews every third of `ttl`; while Redis is away it keeps trying, and registers again
    /// when Redis is back (the entry may have expired meanwhile). Logs each change of situation
    /// once; `on_registered` runs each time the entry is (re)created.
    ///
    /// # Errors
    ///
    /// [`RegistryError::Duplicate`], returned at once, when the id is taken before this
    /// instance ever held it: the instance must stop. Once registered, a later loss of the id
    /// (taken over during a long outage) is only logged.
    pub async fn heartbeat(
        self,
        entry: Entry,
        ttl: Duration,
        cancel: CancellationToken,
        on_registered: impl Fn(&Entry) + Send + 'static,
    ) -> Result<(), RegistryError> {
        let every = (ttl / 3).max(Duration::from_millis(50));
        let mut connection: Option<MultiplexedConnection> = None;
        let mut ever_registered = false;
        let mut last: Option<String> = None;
        let mut pause = Duration::ZERO;
        loop {
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = cancel.cancelled() => break,
            }
            if connection.is_none() {
                connection = self.connection().await.ok();
            }
            let outcome = match connection.as_mut() {
                Some(c) => self.claim_on(c, &entry, ttl).await,
                None => Err(self.error("unreachable")),
            };
            if !ever_registered && matches!(outcome, Err(RegistryError::Duplicate { .. })) {
                return outcome.map(|_| ());
            }
            ever_registered |= outcome.is_ok();
            if let Ok(Claimed::New) = outcome {
                on_registered(&entry);
            }
            // After a failure, try again soon (on a new connection): the TTL is running.
            pause = if outcome.is_ok() { every } else { every / 4 };
            let situation = match &outcome {
                Ok(_) => "registered".to_owned(),
                Err(error) => {
                    if matches!(error, RegistryError::Redis { .. }) {
                        connection = None;
                    }
                    error.to_string()
                }
            };
            if last.as_deref() != Some(situation.as_str()) {
                match &outcome {
                    Ok(_) => {
                        tracing::info!(instance = %entry.id, address = %entry.address, "registered")
                    }
                    Err(error) => {
                        tracing::warn!(instance = %entry.id, %error, "not registered; retrying")
                    }
                }
                last = Some(situation);
            }
        }
        match self.withdraw(&entry).await {
            Ok(true) => tracing::info!(instance = %entry.id, "withdrawn from the registry"),
            Ok(false) => tracing::warn!(instance = %entry.id, "registration already gone"),
            Err(error) => {
                tracing::warn!(instance = %entry.id, %error, "could not withdraw; it expires by itself")
            }
        }
        Ok(())
    }

    /// Follows the registry: sends the whole membership each time it changes (the first
    /// snapshot as soon as Redis answers), until the receiver is dropped. Subscribes before
    /// reading, so no change falls between; re-reads every [`RESYNC`] and after every
    /// reconnection. While Redis is away nothing is sent: the last membership stands.
    pub fn follow(self) -> mpsc::UnboundedReceiver<BTreeMap<String, Entry>> {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(self.follow_into(tx));
        rx
    }

    async fn follow_into(self, tx: mpsc::UnboundedSender<BTreeMap<String, Entry>>) {
        let mut last: Option<BTreeMap<String, Entry>> = None;
        let mut backoff = Duration::from_millis(50);
        let mut warned = false;
        while !tx.is_closed() {
            let mut connected = false;
            match self.follow_once(&tx, &mut last, &mut connected).await {
                Ok(()) => return,
                Err(error) => {
                    if connected {
                        // It worked for a while: a new outage, logged anew.
                        warned = false;
                        backoff = Duration::from_millis(50);
                    }
                    if !warned {
                        tracing::warn!(%error, "registry unreachable; keeping the last membership and retrying");
                        warned = true;
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = tx.closed() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One connection's worth of following; `Ok` when the receiver is gone.
    async fn follow_once(
        &self,
        tx: &mpsc::UnboundedSender<BTreeMap<String, Entry>>,
        last: &mut Option<BTreeMap<String, Entry>>,
        connected: &mut bool,
    ) -> Result<(), RegistryError> {
        let mut pubsub = match tokio::time::timeout(TIMEOUT, self.client.get_async_pubsub()).await {
            Ok(Ok(pubsub)) => pubsub,
            Ok(Err(error)) => return Err(self.error(error)),
            Err(_) => return Err(self.error("no connection within 1s")),
        };
        tokio::time::timeout(TIMEOUT, pubsub.subscribe(CHANNEL))
            .await
            .map_err(|_| self.error("no answer to SUBSCRIBE"))?
            .map_err(|e| self.error(e))?;
        let mut messages = pubsub.into_on_message();
        let mut connection = self.connection().await?;
        tracing::info!(url = %self.url, "following the registry");
        *connected = true;
        let mut tick = tokio::time::interval(RESYNC);
        loop {
            let entries = self.snapshot_on(&mut connection).await?;
            if last.as_ref() != Some(&entries) {
                if tx.send(entries.clone()).is_err() {
                    return Ok(());
                }
                *last = Some(entries);
            }
            tokio::select! {
                message = messages.next() => {
                    if message.is_none() {
                        return Err(self.error("subscription closed"));
                    }
                }
                _ = tick.tick() => {}
                () = tx.closed() => return Ok(()),
            }
        }
    }
}
